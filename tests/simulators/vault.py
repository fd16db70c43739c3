"""A HashiCorp Vault HTTP API simulator for tests, with Vault's paths, response shapes and errors.

It implements only what the project and its tests use, following Vault's API documentation:

  sys/health, sys/mounts[/PATH], sys/auth[/PATH], sys/policies/acl/NAME
  auth/token/create, auth/token/lookup-self
  auth/<approle mount>/role/NAME, .../role-id, .../secret-id, auth/<approle mount>/login
  Transit: keys/NAME (create, read), keys/NAME/rotate, keys/NAME/config (min_decryption_version),
           encrypt/NAME, decrypt/NAME, datakey/{plaintext,wrapped}/NAME
  KV v2:   data/PATH (read with ?version=, write)

Tokens carry policies, and ACL policies (the HCL ``path "..." { capabilities = [...] }``
subset, with ``*`` and ``+`` globs and ``deny``) are enforced on every request, as Vault does;
the root token bypasses them. Errors are ``{"errors": [...]}`` with Vault's status codes: 400
(bad request: "encryption key not found", "cipher: message authentication failed", "invalid
role or secret ID"), 403 "permission denied", 404 (no such path or secret), 503 sealed.
Like a dev-mode server it starts unsealed with a KV v2 engine at ``secret/``; Transit and
AppRole must be enabled through the API, as on a real server.

Not simulated: leases and token expiry, namespaces, response wrapping, other engines. The same
tests run against a real Vault when VAULT_ADDR and VAULT_TOKEN are set.
"""

from __future__ import annotations

import base64
import json
import os
import re
import threading
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler

from tests.quiet_server import QuietHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

Response = tuple[int, Any]

_POLICY_RULE = re.compile(r'path\s+"([^"]+)"\s*\{\s*capabilities\s*=\s*\[([^\]]*)\]\s*\}', re.S)
_CAPABILITIES = {"create", "read", "update", "patch", "delete", "list", "sudo", "deny"}
# Vault's built-in "default" policy lets every token look itself up.
_DEFAULT_POLICY = [("auth/token/lookup-self", {"read"}), ("auth/token/renew-self", {"update"}),
                   ("auth/token/revoke-self", {"update"})]
_UNAUTHENTICATED = re.compile(r"^(sys/health|auth/[^/]+/login)$")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _error(status: int, *messages: str) -> Response:
    return status, {"errors": list(messages)}


def parse_policy(text: str) -> list[tuple[str, set[str]]]:
    """The ``path "..." { capabilities = [...] }`` rules of an HCL policy; ValueError if malformed."""
    rules = []
    for m in _POLICY_RULE.finditer(text):
        caps = {c.strip().strip('"') for c in m.group(2).split(",") if c.strip()}
        if not caps <= _CAPABILITIES:
            raise ValueError(f"invalid capabilities {sorted(caps - _CAPABILITIES)}")
        rules.append((m.group(1), caps))
    leftover = _POLICY_RULE.sub("", re.sub(r"#[^\n]*", "", text)).strip()
    if leftover or not rules:
        raise ValueError("failed to parse policy")
    return rules


def _matches(pattern: str, path: str) -> bool:
    # "+" stands for one path segment, a trailing "*" for any suffix (Vault's ACL globs).
    regex = "".join("[^/]+" if part == "+" else re.escape(part) for part in re.split(r"(\+)", pattern.rstrip("*")))
    return re.fullmatch(regex + (".*" if pattern.endswith("*") else ""), path) is not None


class VaultSimulator:
    def __init__(self, root_token: str = "sim-root-token"):
        self.root_token = root_token
        self.tokens: dict[str, dict[str, Any]] = {root_token: {"policies": ["root"], "accessor": str(uuid.uuid4())}}
        self.policies: dict[str, tuple[str, list[tuple[str, set[str]]]]] = {}
        self.mounts: dict[str, dict[str, Any]] = {
            "secret/": {"type": "kv", "options": {"version": "2"}, "description": "key/value secret storage"},
            "sys/": {"type": "system", "options": None, "description": "system endpoints"},
        }
        self.auth_mounts: dict[str, dict[str, Any]] = {"token/": {"type": "token", "description": "token based credentials"}}
        self.approles: dict[str, dict[str, dict[str, Any]]] = {}  # mount -> role name -> role
        self.transit: dict[str, dict[str, Any]] = {}  # "mount/name" -> key state
        self.kv: dict[str, list[dict[str, Any]]] = {}  # "mount/path" -> versions
        self.sealed = False
        self._fail: list[int] = []
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.RLock()
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
                if payload:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = do_LIST = _serve

        self.server = QuietHTTPServer(("127.0.0.1", 0), Handler)
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

    # -- test controls (what an operator or an outage would do to a real Vault) --
    def seal(self) -> None:
        self.sealed = True

    def unseal(self) -> None:
        self.sealed = False

    def fail_next(self, n: int, status: int = 503) -> None:
        """The next ``n`` requests fail with ``status`` (e.g. a standby or overloaded node)."""
        with self._lock:
            self._fail.extend([status] * n)

    # -- request handling --
    def handle(self, method: str, path: str, query: dict[str, list[str]], raw: bytes, token: str) -> Response:
        with self._lock:
            self.requests.append((method, path))
            injected = self._fail.pop(0) if self._fail else None
        if injected is not None:
            return _error(injected, "injected failure")
        route = path.removeprefix("/v1/").strip("/")
        if route == "sys/health":
            return (503 if self.sealed else 200), {"initialized": True, "sealed": self.sealed, "standby": False,
                                                    "version": "1.17.0-sim", "cluster_name": "vault-sim"}
        if self.sealed:
            return _error(503, "Vault is sealed")
        if method == "GET" and query.get("list") == ["true"]:
            method = "LIST"
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            return _error(400, "failed to parse JSON input")
        if not _UNAUTHENTICATED.match(route):
            denied = self._authorize(token, method, route)
            if denied:
                return denied
        with self._lock:
            return self._route(method, route, body, query, token)

    def _authorize(self, token: str, method: str, route: str) -> Response | None:
        entry = self.tokens.get(token)
        if entry is None:
            return _error(403, "permission denied", "invalid token")
        if "root" in entry["policies"]:
            return None
        needed = {"GET": {"read"}, "LIST": {"list"}, "DELETE": {"delete"}}.get(method, {"create", "update"})
        rules = list(_DEFAULT_POLICY)
        for name in entry["policies"]:
            rules += self.policies.get(name, ("", []))[1]
        # Vault picks the most specific matching rule; the longest pattern stands in for that here.
        matching = sorted((r for r in rules if _matches(r[0], route)), key=lambda r: len(r[0].rstrip("*+")), reverse=True)
        if not matching or "deny" in matching[0][1] or not (matching[0][1] & needed):
            return _error(403, "1 error occurred:\n\t* permission denied\n\n")
        return None

    def _route(self, method: str, route: str, body: dict[str, Any], query: dict[str, list[str]], token: str) -> Response:
        segs = route.split("/")
        if segs[0] == "sys":
            return self._sys(method, segs[1:], body)
        if segs[0] == "auth" and len(segs) >= 3:
            mount = segs[1] + "/"
            kind = self.auth_mounts.get(mount, {}).get("type")
            if kind == "token":
                return self._token(method, segs[2:], body, token)
            if kind == "approle":
                return self._approle(method, mount, segs[2:], body)
        engine = self._mount_of(route)
        if engine is not None:
            mount, info = engine
            sub = route[len(mount):].split("/")
            if info["type"] == "transit":
                return self._transit(method, mount.rstrip("/"), sub, body)
            if info["type"] == "kv" and sub[0] == "data":
                return self._kv(method, mount.rstrip("/"), "/".join(sub[1:]), body, query)
        return _error(404, f'no handler for route "{route}". route entry not found.')

    def _mount_of(self, route: str) -> tuple[str, dict[str, Any]] | None:
        for mount in sorted(self.mounts, key=len, reverse=True):
            if (route + "/").startswith(mount):
                return mount, self.mounts[mount]
        return None

    @staticmethod
    def _envelope(data: Any = None, auth: Any = None) -> dict[str, Any]:
        return {"request_id": str(uuid.uuid4()), "lease_id": "", "renewable": False, "lease_duration": 0,
                "data": data, "wrap_info": None, "warnings": None, "auth": auth}

    # sys/
    def _sys(self, method: str, segs: list[str], body: dict[str, Any]) -> Response:
        if segs and segs[0] in {"mounts", "auth"}:
            table = self.mounts if segs[0] == "mounts" else self.auth_mounts
            if len(segs) == 1 and method == "GET":
                listing = {k: dict(v) for k, v in table.items()}
                return 200, {**listing, **self._envelope(listing)}
            path = "/".join(segs[1:]).strip("/") + "/"
            if method in {"POST", "PUT"} and len(segs) >= 2:
                if path in table:
                    return _error(400, f"path is already in use at {path}")
                kind = body.get("type")
                allowed = {"transit", "kv", "kv-v2"} if segs[0] == "mounts" else {"approle"}
                if kind not in allowed:
                    return _error(400, f'plugin not found in the catalog: {kind}')
                options = body.get("options") or {}
                if kind == "kv-v2":
                    kind, options = "kv", {"version": "2"}
                table[path] = {"type": kind, "options": options or None, "description": body.get("description", "")}
                if kind == "approle":
                    self.approles[path] = {}
                return 204, None
            if method == "DELETE" and len(segs) >= 2:
                table.pop(path, None)
                return 204, None
        if segs[:2] == ["policies", "acl"] and len(segs) == 3:
            name = segs[2]
            if method in {"POST", "PUT"}:
                try:
                    rules = parse_policy(str(body.get("policy", "")))
                except ValueError as exc:
                    return _error(400, f"failed to parse policy: {exc}")
                self.policies[name] = (str(body["policy"]), rules)
                return 204, None
            if method == "GET":
                if name not in self.policies:
                    return _error(404)
                return 200, self._envelope({"name": name, "policy": self.policies[name][0]})
            if method == "DELETE":
                self.policies.pop(name, None)
                return 204, None
        return _error(404, f'no handler for route "sys/{"/".join(segs)}". route entry not found.')

    # auth/token/
    def _token(self, method: str, segs: list[str], body: dict[str, Any], token: str) -> Response:
        if segs == ["lookup-self"] and method == "GET":
            entry = self.tokens[token]
            return 200, self._envelope({"id": token, "accessor": entry["accessor"], "policies": entry["policies"],
                                        "ttl": 0 if "root" in entry["policies"] else 3600, "type": "service"})
        if segs == ["create"] and method in {"POST", "PUT"}:
            if "root" not in self.tokens[token]["policies"]:
                return _error(403, "permission denied")  # child tokens with subset policies: not simulated
            return 200, self._envelope(auth=self._issue(list(body.get("policies") or ["default"]), {}))
        return _error(404, f'no handler for route "auth/token/{"/".join(segs)}". route entry not found.')

    def _issue(self, policies: list[str], metadata: dict[str, str]) -> dict[str, Any]:
        token, accessor = "hvs.sim" + uuid.uuid4().hex, str(uuid.uuid4())
        all_policies = sorted(set(policies) | {"default"})
        self.tokens[token] = {"policies": all_policies, "accessor": accessor}
        return {"client_token": token, "accessor": accessor, "policies": all_policies,
                "token_policies": all_policies, "metadata": metadata, "lease_duration": 3600,
                "renewable": True, "entity_id": "", "token_type": "service", "orphan": True}

    # auth/<approle>/
    def _approle(self, method: str, mount: str, segs: list[str], body: dict[str, Any]) -> Response:
        roles = self.approles[mount]
        if segs == ["login"] and method in {"POST", "PUT"}:
            role_id, secret_id = str(body.get("role_id", "")), str(body.get("secret_id", ""))
            if not role_id:
                return _error(400, "missing role_id")
            for name, role in roles.items():
                if role["role_id"] == role_id and secret_id in role["secret_ids"]:
                    return 200, self._envelope(auth=self._issue(role["token_policies"], {"role_name": name}))
            return _error(400, "invalid role or secret ID")
        if len(segs) >= 2 and segs[0] == "role":
            name = segs[1]
            if len(segs) == 2 and method in {"POST", "PUT"}:
                role = roles.setdefault(name, {"role_id": str(uuid.uuid4()), "secret_ids": {}})
                policies = body.get("token_policies", body.get("policies", []))
                role["token_policies"] = policies.split(",") if isinstance(policies, str) else list(policies)
                return 204, None
            if name not in roles:
                return _error(404, f"role {name} does not exist") if len(segs) > 2 else (404, None)
            if segs[2:] == ["role-id"] and method == "GET":
                return 200, self._envelope({"role_id": roles[name]["role_id"]})
            if segs[2:] == ["secret-id"] and method in {"POST", "PUT"}:
                secret_id, accessor = str(uuid.uuid4()), str(uuid.uuid4())
                roles[name]["secret_ids"][secret_id] = accessor
                return 200, self._envelope({"secret_id": secret_id, "secret_id_accessor": accessor,
                                            "secret_id_ttl": 0, "secret_id_num_uses": 0})
        return _error(404, f'no handler for route "auth/{mount}{"/".join(segs)}". route entry not found.')

    # Transit
    def _new_key(self, ref: str) -> dict[str, Any]:
        key = self.transit[ref] = {"versions": {1: os.urandom(32)}, "latest": 1, "min": 1, "created": {1: _now()}}
        return key

    def _transit(self, method: str, mount: str, segs: list[str], body: dict[str, Any]) -> Response:
        op = segs[0]
        if op == "datakey":
            if len(segs) < 3:
                return _error(404)
            kind, name = segs[1], "/".join(segs[2:])
        else:
            kind, name = "", "/".join(segs[1:])
        action = ""
        for suffix in ("/rotate", "/config"):
            if op == "keys" and name.endswith(suffix):
                name, action = name.removesuffix(suffix), suffix[1:]
        ref = f"{mount}/{name}"
        key = self.transit.get(ref)
        if op == "keys":
            if method in {"POST", "PUT"}:
                if action == "rotate":
                    if key is None:
                        return _error(400, "key not found")
                    n = key["latest"] + 1
                    key["versions"][n], key["created"][n], key["latest"] = os.urandom(32), _now(), n
                elif action == "config":
                    if key is None:
                        return _error(400, "no existing key named " + name + " could be found")
                    if "min_decryption_version" in body:
                        wanted = int(body["min_decryption_version"])
                        if wanted > key["latest"]:
                            return _error(400, "cannot set min decryption version to a version greater than the latest version")
                        key["min"] = max(1, wanted)
                elif key is None:
                    self._new_key(ref)
                return 204, None
            if key is None:
                return _error(404)
            return 200, self._envelope({"name": name, "type": "aes256-gcm96", "latest_version": key["latest"],
                                        "min_decryption_version": key["min"], "deletion_allowed": False,
                                        "keys": {str(v): t for v, t in key["created"].items()}})
        if op not in {"encrypt", "decrypt", "datakey"} or method not in {"POST", "PUT"}:
            return _error(404)
        if key is None:
            if op != "encrypt":
                return _error(400, "encryption key not found")
            key = self._new_key(ref)  # Vault creates the key on first encrypt (upsert)
        if op in {"encrypt", "datakey"}:
            if op == "datakey":
                if kind not in {"plaintext", "wrapped"}:
                    return _error(400, f"invalid type {kind!r}")
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
        text = str(body.get("ciphertext", ""))
        parts = text.split(":")
        if len(parts) != 3 or parts[0] != "vault" or not parts[1].startswith("v") or not parts[1][1:].isdigit():
            return _error(400, "invalid ciphertext: no prefix")
        version = int(parts[1][1:])
        if version < key["min"]:
            return _error(400, "ciphertext or signature version is disallowed by policy (too old)")
        if version not in key["versions"]:
            return _error(400, "invalid key version")
        try:
            blob = base64.b64decode(parts[2])
            plain = AESGCM(key["versions"][version]).decrypt(blob[:12], blob[12:], None)
        except (InvalidTag, ValueError):
            return _error(400, "cipher: message authentication failed")
        return 200, self._envelope({"plaintext": base64.b64encode(plain).decode()})

    # KV v2
    def _kv(self, method: str, mount: str, path: str, body: dict[str, Any], query: dict[str, list[str]]) -> Response:
        ref = f"{mount}/{path}"
        if method in {"POST", "PUT"}:
            versions = self.kv.setdefault(ref, [])
            meta = {"created_time": _now(), "deletion_time": "", "destroyed": False,
                    "version": len(versions) + 1, "custom_metadata": None}
            versions.append({"data": dict(body.get("data") or {}), "metadata": meta})
            return 200, self._envelope(meta)
        versions = self.kv.get(ref, [])
        if not versions:
            return _error(404)
        wanted = int(query.get("version", ["0"])[0] or 0) or len(versions)
        if wanted > len(versions):
            return _error(404)
        return 200, self._envelope(versions[wanted - 1])
