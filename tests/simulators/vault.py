"""A HashiCorp Vault HTTP API simulator for tests: token auth, Transit and KV v2, with Vault's response shapes.

Implements only what the project uses: GET sys/health, GET auth/token/lookup-self, Transit
(keys create/read/rotate, encrypt, decrypt, datakey/plaintext|wrapped) and KV v2 data read/write.
Errors follow Vault: ``{"errors": [...]}`` with 400 (bad request, e.g. "encryption key not
found", "cipher: message authentication failed"), 403 "permission denied", 404, 503 sealed.
Not implemented: policies, leases, namespaces, other engines. Run the same tests against a real
Vault by setting VAULT_ADDR and VAULT_TOKEN.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM


class VaultSimulator:
    def __init__(self, root_token: str = "sim-root-token"):
        self.root_token = root_token
        self.transit: dict[str, dict[str, Any]] = {}   # "mount/name" -> {"versions": {n: key}, "latest": n, "min": n}
        self.kv: dict[str, list[dict[str, Any]]] = {}  # "mount/path" -> versions
        self.sealed = False
        self._fail: list[int] = []
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        sim = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                token = self.headers.get("X-Vault-Token") or self.headers.get("Authorization", "").removeprefix("Bearer ")
                status, body = sim.handle(self.command, parts.path, parse_qs(parts.query), raw, token)
                payload = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = do_LIST = _serve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> "VaultSimulator":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "VaultSimulator":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def seal(self) -> None:
        self.sealed = True

    def unseal(self) -> None:
        self.sealed = False

    def fail_next(self, n: int, status: int = 503) -> None:
        with self._lock:
            self._fail.extend([status] * n)

    # -- request handling --
    def handle(self, method: str, path: str, query: dict[str, list[str]], raw: bytes, token: str) -> tuple[int, Any]:
        with self._lock:
            self.requests.append((method, path))
            injected = self._fail.pop(0) if self._fail else None
        if injected is not None:
            return injected, {"errors": ["injected failure"]}
        if path == "/v1/sys/health":
            return (503 if self.sealed else 200), {"initialized": True, "sealed": self.sealed, "standby": False, "version": "1.17.0-sim"}
        if self.sealed:
            return 503, {"errors": ["Vault is sealed"]}
        if token != self.root_token:
            return 403, {"errors": ["permission denied"]}
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            return 400, {"errors": ["failed to parse JSON input"]}
        segs = path.removeprefix("/v1/").split("/")
        if segs[:3] == ["auth", "token", "lookup-self"]:
            return 200, self._envelope({"id": token, "policies": ["root"], "ttl": 0})
        if len(segs) >= 3 and segs[1] in {"keys", "encrypt", "decrypt", "datakey"}:
            return self._transit(method, segs, body)
        if len(segs) >= 3 and segs[1] == "data":
            return self._kv(method, segs[0], "/".join(segs[2:]), body, query)
        return 404, {"errors": [f"no handler for route \"{path.removeprefix('/v1/')}\". route entry not found."]}

    @staticmethod
    def _envelope(data: Any) -> dict[str, Any]:
        return {"request_id": str(uuid.uuid4()), "lease_id": "", "renewable": False, "lease_duration": 0,
                "data": data, "wrap_info": None, "warnings": None, "auth": None}

    def _transit(self, method: str, segs: list[str], body: dict[str, Any]) -> tuple[int, Any]:
        mount, op = segs[0], segs[1]
        if op == "datakey":
            kind, name = segs[2], "/".join(segs[3:])
        else:
            kind, name = "", "/".join(segs[2:])
        rotate = name.endswith("/rotate")
        name = name.removesuffix("/rotate")
        ref = f"{mount}/{name}"
        with self._lock:
            key = self.transit.get(ref)
            if op == "keys":
                if method in {"POST", "PUT"}:
                    if key is None:
                        self.transit[ref] = {"versions": {1: os.urandom(32)}, "latest": 1, "min": 1,
                                             "created": {1: datetime.now(timezone.utc).isoformat()}}
                    elif rotate:
                        n = key["latest"] + 1
                        key["versions"][n] = os.urandom(32)
                        key["created"][n] = datetime.now(timezone.utc).isoformat()
                        key["latest"] = n
                    return 204, None
                if key is None:
                    return 404, {"errors": []}
                return 200, self._envelope({"name": name, "type": "aes256-gcm96", "latest_version": key["latest"],
                                            "min_decryption_version": key["min"], "keys": {str(v): t for v, t in key["created"].items()}})
            if key is None:
                if op == "encrypt":  # Vault creates the key on first encrypt (upsert)
                    key = self.transit[ref] = {"versions": {1: os.urandom(32)}, "latest": 1, "min": 1,
                                               "created": {1: datetime.now(timezone.utc).isoformat()}}
                else:
                    return 400, {"errors": ["encryption key not found"]}
        if op in {"encrypt", "datakey"}:
            if op == "datakey":
                if kind not in {"plaintext", "wrapped"}:
                    return 400, {"errors": [f"invalid type {kind!r}"]}
                plain = os.urandom(int(body.get("bits", 256)) // 8)
            else:
                plain = base64.b64decode(body.get("plaintext", ""))
            version = key["latest"]
            nonce = os.urandom(12)
            sealed = AESGCM(key["versions"][version]).encrypt(nonce, plain, None)
            data = {"ciphertext": f"vault:v{version}:" + base64.b64encode(nonce + sealed).decode(), "key_version": version}
            if op == "datakey" and kind == "plaintext":
                data["plaintext"] = base64.b64encode(plain).decode()
            return 200, self._envelope(data)
        # decrypt
        text = str(body.get("ciphertext", ""))
        parts = text.split(":")
        if len(parts) != 3 or parts[0] != "vault" or not parts[1].startswith("v") or not parts[1][1:].isdigit():
            return 400, {"errors": ["invalid ciphertext: no prefix"]}
        version = int(parts[1][1:])
        if version < key["min"]:
            return 400, {"errors": ["ciphertext or signature version is disallowed by policy (too old)"]}
        if version not in key["versions"]:
            return 400, {"errors": ["invalid key version"]}
        try:
            blob = base64.b64decode(parts[2])
            plain = AESGCM(key["versions"][version]).decrypt(blob[:12], blob[12:], None)
        except (InvalidTag, ValueError):
            return 400, {"errors": ["cipher: message authentication failed"]}
        return 200, self._envelope({"plaintext": base64.b64encode(plain).decode()})

    def _kv(self, method: str, mount: str, path: str, body: dict[str, Any], query: dict[str, list[str]]) -> tuple[int, Any]:
        ref = f"{mount}/{path}"
        with self._lock:
            versions = self.kv.setdefault(ref, []) if method in {"POST", "PUT"} else self.kv.get(ref, [])
            if method in {"POST", "PUT"}:
                meta = {"created_time": datetime.now(timezone.utc).isoformat(), "deletion_time": "", "destroyed": False,
                        "version": len(versions) + 1, "custom_metadata": None}
                versions.append({"data": dict(body.get("data") or {}), "metadata": meta})
                return 200, self._envelope(meta)
            if not versions:
                return 404, {"errors": []}
            wanted = int(query.get("version", ["0"])[0] or 0) or len(versions)
            if wanted > len(versions):
                return 404, {"errors": []}
            return 200, self._envelope(versions[wanted - 1])
