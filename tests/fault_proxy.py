"""A fault-injecting HTTP proxy in front of the S3 server, to test failures over real HTTP.

Requests pass through to the upstream unchanged unless a rule matches: then the proxy answers
with an S3-style error (e.g. 503 SlowDown) or holds the request until released.
"""

from __future__ import annotations

import http.client
import threading
from dataclasses import dataclass
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


class FaultProxy:
    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname or "127.0.0.1", parts.port or 80
        self.rules: list[Rule] = []
        self.seen: list[tuple[str, str, int]] = []  # (method, path?query, status answered)
        self.hold = threading.Event()
        self.hold.set()  # set = let requests through
        self.held = threading.Event()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                rule = proxy._match(self.command, self.path)
                if rule is not None:
                    payload = _ERROR.replace(b"{code}", rule.code.encode())
                    self.send_response(rule.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    proxy._record(self.command, self.path, rule.status)
                    return
                if "partNumber" in self.path and not proxy.hold.is_set():
                    proxy.held.set()
                    proxy.hold.wait()
                conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in {"host", "connection"}}
                headers["Host"] = f"{proxy.upstream_host}:{proxy.upstream_port}"
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in {"transfer-encoding", "connection", "content-length"}:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()
                proxy._record(self.command, self.path, resp.status)

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

    def fail(self, method: str, query_contains: str, status: int = 503, code: str = "SlowDown", times: int = -1) -> None:
        with self._lock:
            self.rules.append(Rule(method, query_contains, status, code, times))

    def _match(self, method: str, path: str) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.method == method and rule.query_contains in path and rule.times != 0:
                    rule.times -= 1 if rule.times > 0 else 0
                    return rule
        return None

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.seen.append((method, path, status))

    def count(self, method: str, query_contains: str, status: int | None = None) -> int:
        with self._lock:
            return sum(1 for m, p, s in self.seen if m == method and query_contains in p and (status is None or s == status))
