"""Fault-injecting proxies, to test failures over real connections.

``FaultProxy`` sits in front of the S3 server: requests pass through to the upstream unchanged
unless a rule matches: then the proxy answers with an S3-style error (e.g. 503 SlowDown) or holds
the request until released, or flips a bit of a request on its way. ``StallProxy`` sits in front of any TCP server and goes silent mid-stream.
"""

from __future__ import annotations

import contextlib
import http.client
import threading
from dataclasses import dataclass
from typing import Any, Callable
from http.server import BaseHTTPRequestHandler

from tests.quiet_server import QuietHTTPServer
from urllib.parse import urlsplit

_ERROR = b"""<?xml version="1.0" encoding="UTF-8"?>
<Error><Code>{code}</Code><Message>injected by the test proxy</Message><RequestId>fault</RequestId></Error>"""


@dataclass
class Rule:
    method: str
    query_contains: str
    status: int
    code: str
    times: int  # -1: always
    after_upstream: bool = False  # forward the request first (the write lands), then answer the error


class FaultProxy:
    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname or "127.0.0.1", parts.port or 80
        self.rules: list[Rule] = []
        # (method, path?query, upstream's status or None when not forwarded, status answered)
        self.seen: list[tuple[str, str, int | None, int]] = []
        self.hold = threading.Event()
        self.hold.set()  # set = let requests through
        self.held = threading.Event()
        # which requests a cleared ``hold`` holds: by default the parts of multipart uploads
        self.hold_when: Callable[[str, str], bool] = lambda method, path: "partNumber" in path
        # requests whose body gets one bit flipped on the way (damage between sender and storage)
        self.corrupt_request_when: Callable[[str, str], bool] = lambda method, path: False
        self.corrupted_request = threading.Event()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                body = self._body()
                rule = proxy._match(self.command, self.path)
                if rule is not None and not rule.after_upstream:
                    self._answer_error(rule, None)
                    return
                if not proxy.hold.is_set() and proxy.hold_when(self.command, self.path):
                    proxy.held.set()
                    proxy.hold.wait()
                if body and proxy.corrupt_request_when(self.command, self.path) and not proxy.corrupted_request.is_set():
                    flipped = bytearray(body)
                    flipped[len(flipped) // 2] ^= 0x01  # once: one bit of one request
                    body = bytes(flipped)
                    proxy.corrupted_request.set()
                conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in {"host", "connection", "expect", "transfer-encoding", "content-length"}}
                headers["Content-Length"] = str(len(body))
                headers["Host"] = f"{proxy.upstream_host}:{proxy.upstream_port}"
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if rule is not None:
                    self._answer_error(rule, resp.status)
                    return
                # recorded before answering: a client that has its answer finds it counted
                proxy._record(self.command, self.path, resp.status, resp.status)
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in {"transfer-encoding", "connection", "content-length"}:
                        self.send_header(k, v)
                # a HEAD answer has no body but says the object's length
                length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else len(data)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _answer_error(self, rule: Rule, upstream_status: int | None) -> None:
                payload = _ERROR.replace(b"{code}", rule.code.encode())
                proxy._record(self.command, self.path, upstream_status, rule.status)
                self.send_response(rule.status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _body(self) -> bytes:
                """The request body, also when sent with chunked transfer encoding (a stream of unknown size)."""
                if "chunked" not in (self.headers.get("Transfer-Encoding") or "").lower():
                    length = int(self.headers.get("Content-Length") or 0)
                    return self.rfile.read(length) if length else b""
                parts = []
                while True:
                    size = int(self.rfile.readline().split(b";", 1)[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                            pass
                        return b"".join(parts)
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = QuietHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> "FaultProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.hold.set()
        self.server.shutdown()
        self.server.server_close()

    def fail(self, method: str, query_contains: str, status: int = 503, code: str = "SlowDown", times: int = -1,
             after_upstream: bool = False) -> None:
        with self._lock:
            self.rules.append(Rule(method, query_contains, status, code, times, after_upstream))

    def _match(self, method: str, path: str) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.method == method and rule.query_contains in path and rule.times != 0:
                    rule.times -= 1 if rule.times > 0 else 0
                    return rule
        return None

    def _record(self, method: str, path: str, upstream: int | None, answered: int) -> None:
        with self._lock:
            self.seen.append((method, path, upstream, answered))

    def count(self, method: str, query_contains: str, status: int | None = None) -> int:
        """Requests answered (with ``status``, if given) whose path and query contain ``query_contains``."""
        with self._lock:
            return sum(1 for m, p, _, s in self.seen
                       if m == method and query_contains in p and (status is None or s == status))


class StallProxy:
    """A TCP relay that goes silent: after ``stall_after`` bytes from the server on a connection it forwards
    nothing more either way, and keeps the sockets open, as a host that vanished behind a firewall or a cut
    link does (no reset, no FIN: the client hears nothing)."""

    def __init__(self, upstream_port: int, stall_after: int):
        import socket

        self.upstream_port = upstream_port
        self.stall_after = stall_after
        self.stalled = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closing = threading.Event()
        self._sockets: list[Any] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream_port))
            self._sockets += [client, server]
            connection = {"sent": 0, "stalled": threading.Event()}
            threading.Thread(target=self._pump, args=(client, server, connection, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, connection, True), daemon=True).start()

    def _pump(self, src: Any, dst: Any, connection: dict[str, Any], from_server: bool) -> None:
        while not self._closing.is_set():
            try:
                data = src.recv(16384)
                if not data or connection["stalled"].is_set():
                    break
                if from_server:
                    room = self.stall_after - connection["sent"]
                    if room <= len(data):
                        dst.sendall(data[:max(room, 0)])
                        connection["stalled"].set()
                        self.stalled.set()
                        break
                    connection["sent"] += len(data)
                dst.sendall(data)
            except OSError:
                break
        if connection["stalled"].is_set():
            self._closing.wait()  # silent, not closed

    def close(self) -> None:
        self._closing.set()
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()


class Blackhole:
    """Packets to and from a loopback port dropped by the kernel (iptables), as when a host is powered off or its
    link is cut: unlike a silent relay, nothing answers a TCP keepalive probe or acknowledges data sent. Needs
    root; the rules are removed on exit."""

    def __init__(self, port: int):
        self.rules = [["INPUT", "-i", "lo", "-p", "tcp", "--dport", str(port), "-j", "DROP"],
                      ["INPUT", "-i", "lo", "-p", "tcp", "--sport", str(port), "-j", "DROP"]]
        self.added: list[list[str]] = []

    def __enter__(self) -> "Blackhole":
        import subprocess

        for rule in self.rules:
            subprocess.run(["iptables", "-w", "-I", *rule], check=True, capture_output=True)
            self.added.append(rule)
        return self

    def __exit__(self, *exc: object) -> None:
        import subprocess

        for rule in self.added:
            subprocess.run(["iptables", "-w", "-D", *rule], check=True, capture_output=True)
        self.added.clear()
