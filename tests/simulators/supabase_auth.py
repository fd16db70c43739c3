"""A Supabase Auth (GoTrue) simulator: only the password grant of ``POST /auth/v1/token``.

Shapes from the GoTrue API: success is 200 with ``access_token``, ``token_type`` "bearer",
``expires_in``, ``refresh_token`` and ``user``; bad credentials are 400 with
``{"code": 400, "error_code": "invalid_credentials", "msg": "Invalid login credentials"}``; a
missing or wrong ``apikey`` header is 401 ``{"message": "Invalid API key"}`` (the API gateway).
"""

from __future__ import annotations

import json
import secrets
import threading
import uuid
from http.server import BaseHTTPRequestHandler

from tests.quiet_server import QuietHTTPServer
from urllib.parse import parse_qs, urlsplit


class SupabaseAuthSimulator:
    def __init__(self, apikey: str, users: dict[str, str]):
        self.apikey = apikey
        self.users = dict(users)  # email -> password
        self.logins: list[str] = []
        sim = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                status, body = sim.handle(parts.path, parse_qs(parts.query), self.headers.get("apikey"), raw)
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = QuietHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "SupabaseAuthSimulator":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def handle(self, path: str, query: dict[str, list[str]], apikey: str | None, raw: bytes) -> tuple[int, dict]:
        if apikey != self.apikey:
            return 401, {"message": "Invalid API key"}
        if path != "/auth/v1/token" or query.get("grant_type") != ["password"]:
            return 404, {"code": 404, "error_code": "not_found", "msg": "Not found"}
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            return 400, {"code": 400, "error_code": "bad_json", "msg": "Could not parse request body as JSON"}
        email, password = str(body.get("email", "")), str(body.get("password", ""))
        self.logins.append(email)
        if self.users.get(email) != password:
            return 400, {"code": 400, "error_code": "invalid_credentials", "msg": "Invalid login credentials"}
        return 200, {"access_token": secrets.token_urlsafe(32), "token_type": "bearer", "expires_in": 3600,
                     "refresh_token": secrets.token_urlsafe(16),
                     "user": {"id": str(uuid.uuid4()), "aud": "authenticated", "role": "authenticated", "email": email}}
