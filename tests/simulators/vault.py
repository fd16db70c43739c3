"""A HashiCorp Vault HTTP API simulator for tests, answering as Vault 1.17 does: paths, shapes, status codes, errors.

It implements only what the project and its tests use, following Vault 1.17's API documentation
and source (vault/request_handling.go, builtin/logical/transit, builtin/credential/approle,
sdk/helper/keysutil, the KV v2 plugin):

  sys/health, sys/mounts[/PATH], sys/auth[/PATH], sys/policies/acl/NAME
  auth/token/: create, lookup-self, renew-self, revoke-self
  auth/<approle mount>/: role/NAME, role/NAME/role-id, role/NAME/secret-id[/lookup], login
  Transit: keys (list), keys/NAME (create, read, delete), keys/NAME/rotate, keys/NAME/config,
           encrypt/NAME, decrypt/NAME, datakey/{plaintext,wrapped}/NAME
  KV v2:   data/PATH (write, read ?version=, delete latest), delete/, undelete/, destroy/PATH,
           metadata/PATH (read, list, delete)

What it holds to, as Vault does:
- Tokens carry policies; ACL policies (the HCL ``path "..." { capabilities = [...] }`` subset,
  ``*`` and ``+`` globs, ``deny``, Vault's priority rules between patterns) are checked on
  every request; the root token bypasses them. A POST/PUT needs ``update``, except where the
  backend has an existence check and the target does not exist yet (Transit ``encrypt`` of a
  new key, a new KV v2 secret): then it needs ``create``.
- Tokens have TTLs: ``lookup-self`` reports them, ``renew-self`` extends them up to their max
  TTL, and a token past its TTL is gone: 403 with "permission denied" and "invalid token".
- AppRole secret IDs have TTLs and use counts (``secret_id_ttl``, ``secret_id_num_uses`` on
  the role, or ``ttl``/``num_uses`` when generating one); a used-up or expired one gets 400
  "invalid role or secret ID". Vault deletes an expired secret ID in its periodic tidy, within
  a minute of expiry; the simulator refuses it at the second it expires.
- Transit checks a ciphertext as keysutil does: prefix, fields, version (``v0`` is read as v1,
  Vault's compatibility with keys that once started at zero; above the latest is "version is
  too new"; below ``min_decryption_version`` is "too old"), base64, length, then the tag. Key
  names follow Vault's name pattern, so a name with ``/`` matches no route (404). ``keys`` in
  a key's description maps each version to its creation time in unix seconds.
- Transit ``hmac/:name`` and ``verify/:name`` (path_hmac.go): each key version has its own HMAC
  key; ``vault:vN:<base64>``; one ``input`` or a ``batch_input`` answered item by item (a bad
  item gets its own ``error``, the request still 200), in input order with ``reference`` copied.
- KV v2 deletion is soft: a deleted (or destroyed) version reads as 404 with ``data: null``
  and the version's metadata (``deletion_time`` set, or ``destroyed: true``).
- Malformed input gets Vault's 400 and ``{"errors": [...]}`` (a non-integer field is "Field
  validation failed: ..."), never a dropped connection. An error inside the simulator itself is
  a 500 "internal error" and is recorded in ``internal_errors`` so the tests can fail on it.

Time is the simulator's own clock, ``now()``: ``advance_clock(seconds)`` ages every token and
secret ID at once, so TTL tests do not sleep. Like a dev-mode server it starts unsealed with a
KV v2 engine at ``secret/``; Transit and AppRole are enabled through the API.

Not simulated: leases of secrets, token ``num_uses``, periodic tokens, child-token revocation
with the parent, token roles, namespaces, response wrapping, CIDR bindings, the checks that a
secret ID's own ``ttl``/``num_uses`` stay within the role's, Transit key types other than
aes256-gcm96 (and derived or convergent keys), ``min_encryption_version``, batch encrypt/decrypt, KV
v2 ``cas`` and ``max_versions``. The same simulator tests run against a real Vault when
VAULT_ADDR and VAULT_TOKEN are set (tests/test_vault_simulator.py), so it cannot certify itself.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import os
import re
import threading
import time
import traceback
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.quiet_server import QuietHTTPServer

Response = tuple[int, Any]

VERSION = "1.17.0"
DEFAULT_TTL = MAX_TTL = 768 * 3600  # a dev server's default and max lease TTL (32 days)

_POLICY_RULE = re.compile(r'path\s+"([^"]+)"\s*\{\s*capabilities\s*=\s*\[([^\]]*)\]\s*\}', re.S)
_CAPABILITIES = {"create", "read", "update", "patch", "delete", "list", "sudo", "deny"}
# Vault's built-in "default" policy: every token may look itself up, renew and revoke itself.
_DEFAULT_POLICY = [("auth/token/lookup-self", {"read"}), ("auth/token/renew-self", {"update"}),
                   ("auth/token/revoke-self", {"update"})]
_UNAUTHENTICATED = re.compile(r"^(sys/health|auth/[^/]+/login)$")
# framework.GenericNameRegex: Go's \w is ASCII, and a name starts and ends with one.
_NAME = r"[0-9A-Za-z_](?:[0-9A-Za-z_.-]*[0-9A-Za-z_])?"
_ROLE_NAME = r"[0-9A-Za-z_.\- ]+"
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h|d)")
_B64_ALPHABET = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
_ZERO_TIME = "0001-01-01T00:00:00Z"

PERMISSION_DENIED = "1 error occurred:\n\t* permission denied\n\n"
INVALID_TOKEN = "2 errors occurred:\n\t* permission denied\n\t* invalid token\n\n"
_HMAC_ALGORITHMS = {"sha2-224": "sha224", "sha2-256": "sha256", "sha2-384": "sha384", "sha2-512": "sha512",
                    "sha3-224": "sha3_224", "sha3-256": "sha3_256", "sha3-384": "sha3_384", "sha3-512": "sha3_512"}
UNSUPPORTED_PATH = "1 error occurred:\n\t* unsupported path\n\n"
UNSUPPORTED_OPERATION = "1 error occurred:\n\t* unsupported operation\n\n"
TOO_OLD = "ciphertext or signature version is disallowed by policy (too old)"


class _Reply(Exception):
    """An answer decided deep in a handler (almost always an error), returned as is."""

    def __init__(self, status: int, body: Any):
        super().__init__(status)
        self.status, self.body = status, body


def _fail(status: int, *messages: str) -> _Reply:
    return _Reply(status, {"errors": list(messages)})


def _error(status: int, *messages: str) -> Response:
    return status, {"errors": list(messages)}


def _rfc3339(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _go_duration(seconds: int) -> str:
    # Go's time.Duration.String(), as Vault's TTL warnings print it.
    h, rest = divmod(int(seconds), 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m}m{s}s" if h else f"{m}m{s}s" if m else f"{s}s"


def _field_error(field: str, value: Any, reason: str) -> _Reply:
    # sdk/framework: FieldData.Validate's error, wrapped by Backend.HandleRequest.
    return _fail(400, f'Field validation failed: error converting input {value} for field "{field}": {reason}')


def _int_field(body: dict[str, Any], field: str, default: int = 0) -> int:
    """A TypeInt field as mapstructure.WeakDecode reads it."""
    if field not in body or body[field] is None:
        return default
    value = body[field]
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    text = str(value)
    if text == "":
        return 0
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    raise _field_error(field, value, f"cannot parse '' as int: strconv.ParseInt: parsing {json.dumps(text)}: invalid syntax")


def _bool_field(body: dict[str, Any], field: str, default: bool) -> bool:
    if field not in body or body[field] is None:
        return default
    value = body[field]
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value != 0
    text = str(value).lower()
    if text in {"1", "t", "true"}:
        return True
    if text in {"0", "f", "false", ""}:
        return False
    raise _field_error(field, value, f"cannot parse '' as bool: strconv.ParseBool: parsing {json.dumps(str(value))}: invalid syntax")


def _duration_field(body: dict[str, Any], field: str, default: int = 0) -> int:
    """A TypeDurationSecond field as parseutil.ParseDurationSecond reads it: seconds, or "90s", "1h30m", "2d"."""
    if field not in body or body[field] is None:
        return default
    value = body[field]
    if isinstance(value, bool):
        raise _field_error(field, value, "could not parse duration from input")
    if isinstance(value, (int, float)):
        return int(value)
    text = str(value).strip()
    if text == "":
        return 0
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise _field_error(field, value, f"time: invalid duration {json.dumps(text)}")
    return int(sum(float(n) * _DURATION_UNITS[u] for n, u in parts))


def _policies_field(body: dict[str, Any], *fields: str) -> list[str] | None:
    for field in fields:
        if body.get(field) is not None:
            raw = body[field]
            items = raw.split(",") if isinstance(raw, str) else list(raw)
            return [str(p).strip().lower() for p in items if str(p).strip()]
    return None


def _go_b64decode(text: str) -> bytes:
    """base64.StdEncoding.DecodeString: padded standard alphabet; ValueError with Go's message."""
    stripped = text.replace("\r", "").replace("\n", "")
    try:
        return base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError):
        for i, ch in enumerate(text):
            if ch not in _B64_ALPHABET and ch not in "=\r\n":
                raise ValueError(f"illegal base64 data at input byte {i}") from None
        pad = text.find("=")
        at = pad if pad >= 0 else len(text) - len(text) % 4
        raise ValueError(f"illegal base64 data at input byte {at}") from None


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


def _priority(pattern: str) -> tuple[int, bool, int, int, str]:
    """Vault's ACL priority between two matching patterns, higher sorts later: the later first
    wildcard, no trailing glob, fewer ``+`` segments, the longer pattern, then lexical order."""
    wilds = [i for i, ch in enumerate(pattern) if ch in "+*"]
    return (wilds[0] if wilds else len(pattern) + 1, not pattern.endswith("*"), -pattern.count("+"), len(pattern), pattern)


def _route(routes: list[tuple[str, Callable[..., Response], set[str]]], sub: str, op: str) -> tuple[Callable[..., Response], dict[str, str]]:
    for pattern, handler, ops in routes:
        m = re.fullmatch(pattern, sub)
        if m:
            if op not in ops:
                raise _fail(405, UNSUPPORTED_OPERATION)
            return handler, m.groupdict()
    raise _fail(404, UNSUPPORTED_PATH)


class VaultSimulator:
    def __init__(self, root_token: str = "sim-root-token"):
        self.root_token = root_token
        self._clock_offset = 0.0
        now = self.now()
        self.tokens: dict[str, dict[str, Any]] = {root_token: {
            "accessor": str(uuid.uuid4()), "policies": ["root"], "meta": None, "display_name": "root",
            "path": "auth/token/root", "issued": now, "ttl": 0, "expires": None, "max_expires": None,
            "renewable": False, "renew_ttl": 0, "explicit_max_ttl": 0, "orphan": True, "last_renewal": None}}
        self.policies: dict[str, tuple[str, list[tuple[str, set[str]]]]] = {}
        self.mounts: dict[str, dict[str, Any]] = {
            "secret/": {"type": "kv", "options": {"version": "2"}, "description": "key/value secret storage"},
            "cubbyhole/": {"type": "cubbyhole", "options": None, "description": "per-token private secret storage"},
            "identity/": {"type": "identity", "options": None, "description": "identity store"},
            "sys/": {"type": "system", "options": None, "description": "system endpoints used for control, policy and debugging"},
        }
        self.auth_mounts: dict[str, dict[str, Any]] = {"token/": {"type": "token", "options": None, "description": "token based credentials"}}
        self.approles: dict[str, dict[str, dict[str, Any]]] = {}  # mount -> role name -> role
        self.transit: dict[str, dict[str, Any]] = {}  # "mount/name" -> key state
        self.kv: dict[str, dict[str, Any]] = {}  # "mount/path" -> {"versions": [...], "created", "updated"}
        self.sealed = False
        self._fail: list[int] = []
        self.requests: list[tuple[str, str]] = []
        self.internal_errors: list[str] = []
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
                status, body = sim.handle(self.command, unquote(parts.path), parse_qs(parts.query), raw, token)
                payload = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                self.send_header("Cache-Control", "no-store")
                if payload:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = do_LIST = _serve

        self.server = QuietHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        # A short poll so that stop() returns at once: each simulator test starts and stops its own.
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

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

    # -- test controls (what an operator, an outage or the passing of time would do to a real Vault) --
    def now(self) -> float:
        """The simulator's clock: wall time plus whatever ``advance_clock`` added."""
        return time.time() + self._clock_offset

    def advance_clock(self, seconds: float) -> None:
        """Move the clock forward: tokens and secret IDs age as if ``seconds`` had passed."""
        with self._lock:
            self._clock_offset += seconds

    def seal(self) -> None:
        self.sealed = True

    def unseal(self) -> None:
        self.sealed = False

    def fail_next(self, n: int, status: int = 503) -> None:
        """The next ``n`` requests fail with ``status`` (e.g. a standby or overloaded node)."""
        with self._lock:
            self._fail.extend([status] * n)

    def logins(self, mount: str = "approle") -> int:
        """How many AppRole logins reached the simulator (to see a client log in again)."""
        return sum(1 for m, p in self.requests if m in {"POST", "PUT"} and p == f"/v1/auth/{mount}/login")

    # -- request handling --
    def handle(self, method: str, path: str, query: dict[str, list[str]], raw: bytes, token: str) -> Response:
        with self._lock:
            self.requests.append((method, path))
            injected = self._fail.pop(0) if self._fail else None
        if injected is not None:
            return _error(injected, "injected failure")
        try:
            with self._lock:
                return self._handle(method, path, query, raw, token)
        except _Reply as reply:
            return reply.status, reply.body
        except Exception:  # a bug in the simulator: answer as Vault does, and keep it for the tests
            self.internal_errors.append(f"{method} {path}\n{traceback.format_exc()}")
            return _error(500, "1 error occurred:\n\t* internal error\n\n")

    def _handle(self, method: str, path: str, query: dict[str, list[str]], raw: bytes, token: str) -> Response:
        route = path.removeprefix("/v1/").strip("/")
        if route == "sys/health":
            return (503 if self.sealed else 200), {
                "initialized": True, "sealed": self.sealed, "standby": False, "performance_standby": False,
                "replication_performance_mode": "disabled", "replication_dr_mode": "disabled",
                "server_time_utc": int(self.now()), "version": VERSION, "cluster_name": "vault-sim",
                "cluster_id": "00000000-0000-0000-0000-000000000000"}
        if self.sealed:
            return _error(503, "Vault is sealed")
        op = {"GET": "read", "DELETE": "delete", "LIST": "list", "POST": "write", "PUT": "write"}.get(method)
        if op is None:
            return _error(405, UNSUPPORTED_OPERATION)
        if op == "read" and query.get("list") == ["true"]:
            op = "list"
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError as exc:
            return _error(400, f"failed to parse JSON input: {exc}")
        if not isinstance(body, dict):
            return _error(400, "failed to parse JSON input: expected a JSON object")
        if op == "write" and path.endswith("/"):
            return _error(400, "cannot write to a path ending in '/'")
        if not _UNAUTHENTICATED.match(route):
            self._authorize(token, op, route)
        return self._dispatch(op, route, body, query, token)

    # -- authentication and ACLs --
    def _token_entry(self, token: str) -> dict[str, Any]:
        if not token:
            raise _fail(400, "missing client token")
        entry = self.tokens.get(token)
        if entry is not None and entry["expires"] is not None and self.now() >= entry["expires"]:
            del self.tokens[token]  # the expiration manager revokes a token at the end of its TTL
            entry = None
        if entry is None:
            raise _fail(403, INVALID_TOKEN)
        return entry

    def _authorize(self, token: str, op: str, route: str) -> None:
        entry = self._token_entry(token)
        if "root" in entry["policies"]:
            return
        needed = op
        if op == "write":
            needed = "create" if self._exists(route) is False else "update"
        merged: dict[str, set[str]] = {}
        for pattern, caps in list(_DEFAULT_POLICY) + [r for p in entry["policies"] for r in self.policies.get(p, ("", []))[1]]:
            merged.setdefault(pattern, set()).update(caps)  # one pattern in several policies: capabilities add up
        matching = [p for p in merged if _matches(p, route)]
        if not matching:
            raise _fail(403, PERMISSION_DENIED)
        caps = merged[max(matching, key=_priority)]
        if "deny" in caps or needed not in caps:
            raise _fail(403, PERMISSION_DENIED)

    def _exists(self, route: str) -> bool | None:
        """A backend's existence check for a write, or None where the path has none (then a write is an update)."""
        engine = self._mount_of(route)
        if engine is None:
            return None
        mount, info = engine
        sub = route[len(mount):]
        if info["type"] == "transit":
            m = re.fullmatch(rf"encrypt/({_NAME})", sub)
            return (f"{mount.rstrip('/')}/{m.group(1)}" in self.transit) if m else None
        if info["type"] == "kv":
            m = re.fullmatch(r"data/(.+)", sub)
            return (f"{mount.rstrip('/')}/{m.group(1)}" in self.kv) if m else None
        return None

    # -- routing --
    def _dispatch(self, op: str, route: str, body: dict[str, Any], query: dict[str, list[str]], token: str) -> Response:
        segs = route.split("/")
        if segs[0] == "sys":
            return self._sys(op, segs[1:], body)
        if segs[0] == "auth" and len(segs) >= 2:
            mount = segs[1] + "/"
            kind = self.auth_mounts.get(mount, {}).get("type")
            sub = "/".join(segs[2:])
            if kind == "token":
                return self._token(op, sub, body, token)
            if kind == "approle":
                return self._approle(op, mount, sub, body)
        engine = self._mount_of(route)
        if engine is not None:
            mount, info = engine
            sub = route[len(mount):]
            if info["type"] == "transit":
                return self._transit(op, mount.rstrip("/"), sub, body)
            if info["type"] == "kv":
                return self._kv(op, mount.rstrip("/"), sub, body, query)
        return _error(404, f'no handler for route "{route}". route entry not found.')

    def _mount_of(self, route: str) -> tuple[str, dict[str, Any]] | None:
        for mount in sorted(self.mounts, key=len, reverse=True):
            if (route + "/").startswith(mount):
                return mount, self.mounts[mount]
        return None

    @staticmethod
    def _envelope(data: Any = None, auth: Any = None, warnings: list[str] | None = None) -> dict[str, Any]:
        return {"request_id": str(uuid.uuid4()), "lease_id": "", "renewable": False, "lease_duration": 0,
                "data": data, "wrap_info": None, "warnings": warnings or None, "auth": auth, "mount_type": ""}

    # sys/
    def _sys(self, op: str, segs: list[str], body: dict[str, Any]) -> Response:
        if segs and segs[0] in {"mounts", "auth"}:
            table = self.mounts if segs[0] == "mounts" else self.auth_mounts
            if len(segs) == 1 and op == "read":
                listing = {k: dict(v) for k, v in table.items()}
                return 200, {**listing, **self._envelope(listing)}
            path = "/".join(segs[1:]).strip("/") + "/"
            if op == "write" and len(segs) >= 2:
                if path in table:
                    return _error(400, f"path is already in use at {path}")
                kind = body.get("type")
                allowed = {"transit", "kv", "kv-v2"} if segs[0] == "mounts" else {"approle"}
                if kind not in allowed:
                    return _error(400, f"plugin not found in the catalog: {kind}")
                options = body.get("options") or {}
                if kind == "kv-v2":
                    kind, options = "kv", {"version": "2"}
                if kind == "kv" and str(options.get("version", "1")) != "2":
                    return _error(400, "KV version 1 is not simulated")
                table[path] = {"type": kind, "options": options or None, "description": body.get("description", "")}
                if kind == "approle":
                    self.approles[path] = {}
                return 204, None
            if op == "delete" and len(segs) >= 2:
                table.pop(path, None)
                self.approles.pop(path, None)
                prefix = path.rstrip("/") + "/"
                for store in (self.transit, self.kv):
                    for ref in [r for r in store if r.startswith(prefix)]:
                        del store[ref]
                return 204, None
        if segs[:2] == ["policies", "acl"] and len(segs) == 3:
            name = segs[2].lower()  # Vault stores policy names in lower case
            if op == "write":
                try:
                    rules = parse_policy(str(body.get("policy", "")))
                except ValueError as exc:
                    return _error(400, f"failed to parse policy: {exc}")
                self.policies[name] = (str(body["policy"]), rules)
                return 204, None
            if op == "read":
                if name not in self.policies:
                    return _error(404)
                return 200, self._envelope({"name": name, "policy": self.policies[name][0]})
            if op == "delete":
                self.policies.pop(name, None)
                return 204, None
        return _error(404, f'no handler for route "sys/{"/".join(segs)}". route entry not found.')

    # auth/token/
    def _token(self, op: str, sub: str, body: dict[str, Any], token: str) -> Response:
        if sub not in {"lookup-self", "renew-self", "revoke-self", "create"}:
            return _error(404, UNSUPPORTED_PATH)  # auth/token/login among them: the token store has no login
        entry = self.tokens[token]
        if sub == "lookup-self" and op == "read":
            return 200, self._envelope(self._describe_token(token, entry))
        if sub == "renew-self" and op == "write":
            return self._renew(token, entry, _duration_field(body, "increment"))
        if sub == "revoke-self" and op == "write":
            del self.tokens[token]
            return 204, None
        if sub == "create" and op == "write":
            if "root" not in entry["policies"]:
                return _error(400, "child tokens of non-root tokens are not simulated")
            policies = _policies_field(body, "policies")
            policies = entry["policies"] if policies is None else policies
            root = "root" in policies
            explicit = _duration_field(body, "explicit_max_ttl")
            ttl = _duration_field(body, "ttl") or (0 if root else DEFAULT_TTL)
            max_ttl = min(explicit or MAX_TTL, MAX_TTL) if ttl else 0
            meta = body.get("meta") if isinstance(body.get("meta"), dict) else None
            auth = self._issue(policies, meta, ttl=min(ttl, max_ttl) if ttl else 0, max_ttl=max_ttl,
                               renewable=_bool_field(body, "renewable", True), renew_ttl=DEFAULT_TTL, path="auth/token/create",
                               display_name="token", explicit_max_ttl=explicit, add_default=not _bool_field(body, "no_default_policy", False))
            return 200, self._envelope(auth=auth)
        return _error(405, UNSUPPORTED_OPERATION)

    def _describe_token(self, token: str, entry: dict[str, Any]) -> dict[str, Any]:
        data = {"accessor": entry["accessor"], "creation_time": int(entry["issued"]), "creation_ttl": entry["ttl"],
                "display_name": entry["display_name"], "entity_id": "", "expire_time": _rfc3339(entry["expires"]),
                "explicit_max_ttl": entry["explicit_max_ttl"], "id": token, "issue_time": _rfc3339(entry["issued"]),
                "meta": entry["meta"], "num_uses": 0, "orphan": entry["orphan"], "path": entry["path"],
                "policies": entry["policies"], "renewable": entry["renewable"],
                "ttl": 0 if entry["expires"] is None else int(entry["expires"] - self.now()), "type": "service"}
        if entry["last_renewal"] is not None:
            data["last_renewal"] = _rfc3339(entry["last_renewal"])
            data["last_renewal_time"] = int(entry["last_renewal"])
        return data

    def _issue(self, policies: list[str], metadata: dict[str, str] | None, *, ttl: int, max_ttl: int, renewable: bool,
               renew_ttl: int, path: str, display_name: str, explicit_max_ttl: int = 0, add_default: bool = True) -> dict[str, Any]:
        token, accessor, now = "hvs.sim" + uuid.uuid4().hex, str(uuid.uuid4()), self.now()
        names = set(policies)
        if add_default and "root" not in names:
            names.add("default")
        all_policies = sorted(names)
        self.tokens[token] = {
            "accessor": accessor, "policies": all_policies, "meta": metadata, "display_name": display_name, "path": path,
            "issued": now, "ttl": ttl, "expires": now + ttl if ttl else None, "max_expires": now + max_ttl if ttl else None,
            "renewable": renewable and bool(ttl), "renew_ttl": renew_ttl, "explicit_max_ttl": explicit_max_ttl,
            "orphan": True, "last_renewal": None}
        return self._auth_block(token)

    def _auth_block(self, token: str) -> dict[str, Any]:
        entry = self.tokens[token]
        lease = 0 if entry["expires"] is None else int(round(entry["expires"] - self.now()))
        return {"client_token": token, "accessor": entry["accessor"], "policies": entry["policies"],
                "token_policies": entry["policies"], "metadata": entry["meta"], "lease_duration": lease,
                "renewable": entry["renewable"], "entity_id": "", "token_type": "service", "orphan": entry["orphan"],
                "mfa_requirement": None, "num_uses": 0}

    def _renew(self, token: str, entry: dict[str, Any], increment: int) -> Response:
        if not entry["renewable"]:
            return _error(400, "lease is not renewable")
        now = self.now()
        wanted = increment if increment > 0 else entry["renew_ttl"]
        left = int(round(entry["max_expires"] - now))
        warnings = None
        if wanted > left:
            warnings = [f'TTL of "{_go_duration(wanted)}" exceeded the effective max_ttl of "{_go_duration(left)}"; '
                        "TTL value is capped accordingly"]
            wanted = left
        entry["expires"], entry["last_renewal"] = now + wanted, now
        return 200, self._envelope(auth=self._auth_block(token), warnings=warnings)

    # auth/<approle>/
    def _approle(self, op: str, mount: str, sub: str, body: dict[str, Any]) -> Response:
        roles = self.approles[mount]
        routes: list[tuple[str, Callable[..., Response], set[str]]] = [
            (r"login", lambda: self._approle_login(roles, body), {"write"}),
            (r"role/?", lambda: (200, self._envelope({"keys": sorted(roles)})) if roles else _error(404), {"list"}),
            (rf"role/(?P<name>{_ROLE_NAME})", lambda name: self._role(roles, name, op, body), {"read", "write", "delete"}),
            (rf"role/(?P<name>{_ROLE_NAME})/role-id", lambda name: self._role_id(roles, name), {"read"}),
            (rf"role/(?P<name>{_ROLE_NAME})/secret-id", lambda name: self._secret_id(roles, name, body), {"write"}),
            (rf"role/(?P<name>{_ROLE_NAME})/secret-id/lookup", lambda name: self._secret_id_lookup(roles, name, body), {"write"}),
        ]
        handler, args = _route(routes, sub, op)
        return handler(**args)

    def _role(self, roles: dict[str, dict[str, Any]], name: str, op: str, body: dict[str, Any]) -> Response:
        # Vault finds a role whatever the case of its name, and keeps the name as written.
        if op == "delete":
            roles.pop(name.lower(), None)
            return 204, None
        role = roles.get(name.lower())
        if op == "read":
            if role is None:
                return _error(404)
            shown = {k: role[k] for k in ("bind_secret_id", "secret_id_num_uses", "secret_id_ttl", "token_max_ttl",
                                          "token_policies", "token_ttl")}
            return 200, self._envelope({**shown, "policies": role["token_policies"], "token_type": "default"})
        new = role is None
        role = role or {"name": name, "role_id": str(uuid.uuid4()), "secret_ids": {}, "token_policies": [], "token_ttl": 0,
                        "token_max_ttl": 0, "secret_id_ttl": 0, "secret_id_num_uses": 0, "bind_secret_id": True}
        policies = _policies_field(body, "token_policies", "policies")
        changes = {
            "token_policies": policies if policies is not None else role["token_policies"],
            "token_ttl": _duration_field(body, "token_ttl", role["token_ttl"]),
            "token_max_ttl": _duration_field(body, "token_max_ttl", role["token_max_ttl"]),
            "secret_id_ttl": _duration_field(body, "secret_id_ttl", role["secret_id_ttl"]),
            "secret_id_num_uses": _int_field(body, "secret_id_num_uses", role["secret_id_num_uses"]),
            "bind_secret_id": _bool_field(body, "bind_secret_id", role["bind_secret_id"]),
        }
        if changes["secret_id_num_uses"] < 0:
            return _error(400, "secret_id_num_uses cannot be negative")
        if changes["token_max_ttl"] and changes["token_ttl"] > changes["token_max_ttl"]:
            return _error(400, "token_ttl should not be greater than token_max_ttl")
        if not changes["bind_secret_id"]:
            return _error(400, "roles without bind_secret_id are not simulated")
        role.update(changes)
        if new:
            roles[name.lower()] = role
        return 204, None

    def _existing_role(self, roles: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
        role = roles.get(name.lower())
        if role is None:
            raise _fail(404, f'role "{name}" does not exist')
        return role

    def _role_id(self, roles: dict[str, dict[str, Any]], name: str) -> Response:
        if name.lower() not in roles:
            return _error(404)
        return 200, self._envelope({"role_id": roles[name.lower()]["role_id"]})

    def _secret_id(self, roles: dict[str, dict[str, Any]], name: str, body: dict[str, Any]) -> Response:
        role = self._existing_role(roles, name)
        ttl = _duration_field(body, "ttl", role["secret_id_ttl"])
        num_uses = _int_field(body, "num_uses", role["secret_id_num_uses"])
        if num_uses < 0:
            return _error(400, "num_uses cannot be negative")
        secret_id, accessor, now = str(uuid.uuid4()), str(uuid.uuid4()), self.now()
        role["secret_ids"][secret_id] = {"accessor": accessor, "num_uses": num_uses, "ttl": ttl, "created": now,
                                         "updated": now, "expires": now + ttl if ttl else None,
                                         "metadata": dict(body.get("metadata") or {}) if isinstance(body.get("metadata"), dict) else {}}
        return 200, self._envelope({"secret_id": secret_id, "secret_id_accessor": accessor,
                                    "secret_id_ttl": ttl, "secret_id_num_uses": num_uses})

    def _live_secret_id(self, role: dict[str, Any], secret_id: str) -> dict[str, Any] | None:
        entry = role["secret_ids"].get(secret_id)
        if entry is not None and entry["expires"] is not None and self.now() >= entry["expires"]:
            del role["secret_ids"][secret_id]  # what Vault's tidy does to an expired secret ID
            entry = None
        return entry

    def _secret_id_lookup(self, roles: dict[str, dict[str, Any]], name: str, body: dict[str, Any]) -> Response:
        role = self._existing_role(roles, name)
        secret_id = str(body.get("secret_id") or "")
        if not secret_id:
            return _error(400, "missing secret_id")
        entry = self._live_secret_id(role, secret_id)
        if entry is None:
            return 204, None
        return 200, self._envelope({
            "cidr_list": [], "creation_time": _rfc3339(entry["created"]),
            "expiration_time": _rfc3339(entry["expires"]) if entry["expires"] else _ZERO_TIME,
            "last_updated_time": _rfc3339(entry["updated"]), "metadata": entry["metadata"],
            "secret_id_accessor": entry["accessor"], "secret_id_num_uses": entry["num_uses"],
            "secret_id_ttl": entry["ttl"], "token_bound_cidrs": []})

    def _approle_login(self, roles: dict[str, dict[str, Any]], body: dict[str, Any]) -> Response:
        role_id = str(body.get("role_id") or "").strip()
        if not role_id:
            return _error(400, "missing role_id")
        role = next((r for r in roles.values() if r["role_id"] == role_id), None)
        if role is None:
            return _error(400, "invalid role or secret ID")
        secret_id = str(body.get("secret_id") or "").strip()
        if not secret_id:
            return _error(400, "missing secret_id")
        entry = self._live_secret_id(role, secret_id)
        if entry is None:
            return _error(400, "invalid role or secret ID")
        if entry["num_uses"] == 1:
            del role["secret_ids"][secret_id]  # its last use: this login succeeds, the next is refused
        elif entry["num_uses"] > 1:
            entry["num_uses"] -= 1
            entry["updated"] = self.now()
        max_ttl = min(role["token_max_ttl"] or MAX_TTL, MAX_TTL)
        ttl = min(role["token_ttl"] or DEFAULT_TTL, max_ttl)
        auth = self._issue(role["token_policies"], {"role_name": role["name"]}, ttl=ttl, max_ttl=max_ttl, renewable=True,
                           renew_ttl=role["token_ttl"] or DEFAULT_TTL, path=f"auth/{self._mount_name(roles)}/login",
                           display_name=self._mount_name(roles).rstrip("/"))
        return 200, self._envelope(auth=auth)

    def _mount_name(self, roles: dict[str, dict[str, Any]]) -> str:
        return next(m for m, r in self.approles.items() if r is roles).rstrip("/")

    # Transit
    def _transit(self, op: str, mount: str, sub: str, body: dict[str, Any]) -> Response:
        routes: list[tuple[str, Callable[..., Response], set[str]]] = [
            (r"keys/?", lambda: self._transit_list(mount), {"list"}),
            (rf"keys/(?P<name>{_NAME})", lambda name: self._transit_key(op, mount, name, body), {"read", "write", "delete"}),
            (rf"keys/(?P<name>{_NAME})/rotate", lambda name: self._transit_rotate(mount, name), {"write"}),
            (rf"keys/(?P<name>{_NAME})/config", lambda name: self._transit_config(mount, name, body), {"write"}),
            (rf"encrypt/(?P<name>{_NAME})", lambda name: self._transit_encrypt(mount, name, body), {"write"}),
            (rf"decrypt/(?P<name>{_NAME})", lambda name: self._transit_decrypt(mount, name, body), {"write"}),
            (rf"datakey/(?P<kind>{_NAME})/(?P<name>{_NAME})", lambda kind, name: self._transit_datakey(mount, kind, name, body), {"write"}),
            (rf"hmac/(?P<name>{_NAME})(?:/(?P<alg>{_NAME}))?", lambda name, alg: self._transit_hmac(mount, name, alg, body, verify=False), {"write"}),
            (rf"verify/(?P<name>{_NAME})(?:/(?P<alg>{_NAME}))?", lambda name, alg: self._transit_hmac(mount, name, alg, body, verify=True), {"write"}),
        ]
        handler, args = _route(routes, sub, op)
        return handler(**args)

    def _new_key(self, ref: str) -> dict[str, Any]:
        now = self.now()
        # each version has its own HMAC key beside its encryption key (keysutil.KeyEntry.HMACKey)
        key = self.transit[ref] = {"versions": {1: os.urandom(32)}, "hmac": {1: os.urandom(32)}, "created": {1: now}, "latest": 1,
                                   "min_decryption": 1, "deletion_allowed": False}
        return key

    def _describe_key(self, name: str, key: dict[str, Any]) -> dict[str, Any]:
        return {"allow_plaintext_backup": False, "auto_rotate_period": 0, "deletion_allowed": key["deletion_allowed"],
                "derived": False, "exportable": False, "imported_key": False,
                # aes256-gcm96: each version's creation time in unix seconds (KeyEntry.DeprecatedCreationTime)
                "keys": {str(v): int(t) for v, t in key["created"].items()},
                "latest_version": key["latest"], "min_available_version": 0,
                "min_decryption_version": key["min_decryption"], "min_encryption_version": 0, "name": name,
                "supports_decryption": True, "supports_derivation": True, "supports_encryption": True,
                "supports_signing": False, "type": "aes256-gcm96"}

    def _transit_list(self, mount: str) -> Response:
        names = sorted(ref.split("/", 1)[1] for ref in self.transit if ref.startswith(mount + "/"))
        return (200, self._envelope({"keys": names})) if names else _error(404)

    def _transit_key(self, op: str, mount: str, name: str, body: dict[str, Any]) -> Response:
        ref = f"{mount}/{name}"
        key = self.transit.get(ref)
        if op == "read":
            return (404, {"errors": []}) if key is None else (200, self._envelope(self._describe_key(name, key)))
        if op == "delete":
            if key is None:
                return _error(400, f"error deleting policy {name}: could not delete key; not found")
            if not key["deletion_allowed"]:
                return _error(400, f"error deleting policy {name}: deletion is not allowed for this key")
            del self.transit[ref]
            return 204, None
        kind = str(body.get("type") or "aes256-gcm96")
        if kind != "aes256-gcm96":
            return _error(400, f"key type {kind} is not simulated (only aes256-gcm96)")
        if _bool_field(body, "derived", False) or _bool_field(body, "convergent_encryption", False):
            return _error(400, "derived and convergent keys are not simulated")
        warnings = [f"key {name} already existed"] if key is not None else None
        key = key or self._new_key(ref)
        return 200, self._envelope(self._describe_key(name, key), warnings=warnings)

    def _transit_rotate(self, mount: str, name: str) -> Response:
        key = self.transit.get(f"{mount}/{name}")
        if key is None:
            return _error(400, "key not found")
        n = key["latest"] + 1
        key["versions"][n], key["hmac"][n], key["created"][n], key["latest"] = os.urandom(32), os.urandom(32), self.now(), n
        return 200, self._envelope(self._describe_key(name, key))

    def _transit_config(self, mount: str, name: str, body: dict[str, Any]) -> Response:
        key = self.transit.get(f"{mount}/{name}")
        if key is None:
            return _error(400, f"no existing key named {name} could be found")
        wanted = _int_field(body, "min_decryption_version")  # validated before anything changes, as Vault's framework does
        allow_deletion = _bool_field(body, "deletion_allowed", key["deletion_allowed"])
        warnings = None
        if "min_decryption_version" in body:
            if wanted < 0:
                return _error(400, "min decryption version cannot be negative")
            if wanted == 0:
                wanted = 1
                warnings = ["since Vault 0.3, transit key numbering starts at 1; forcing minimum to 1"]
            if wanted != key["min_decryption"]:
                if wanted > key["latest"]:
                    return _error(400, f"cannot set min decryption version of {wanted}, latest key version is {key['latest']}")
                key["min_decryption"] = wanted
        key["deletion_allowed"] = allow_deletion
        return 200, self._envelope(self._describe_key(name, key), warnings=warnings)

    def _seal_with(self, key: dict[str, Any], plain: bytes) -> dict[str, Any]:
        version, nonce = key["latest"], os.urandom(12)
        sealed = AESGCM(key["versions"][version]).encrypt(nonce, plain, None)
        return {"ciphertext": f"vault:v{version}:" + base64.b64encode(nonce + sealed).decode(), "key_version": version}

    def _transit_encrypt(self, mount: str, name: str, body: dict[str, Any]) -> Response:
        if body.get("plaintext") is None:
            return _error(400, "missing plaintext to encrypt")
        try:
            plain = _go_b64decode(str(body["plaintext"]))
        except ValueError as exc:
            return _error(400, str(exc))
        key = self.transit.get(f"{mount}/{name}") or self._new_key(f"{mount}/{name}")  # upsert, as Vault allows by default
        return 200, self._envelope(self._seal_with(key, plain))

    def _transit_datakey(self, mount: str, kind: str, name: str, body: dict[str, Any]) -> Response:
        if kind not in {"plaintext", "wrapped"}:
            return _error(400, "Invalid path, must be 'plaintext' or 'wrapped'")
        bits = _int_field(body, "bits", 256)
        key = self.transit.get(f"{mount}/{name}")
        if key is None:
            return _error(400, "encryption key not found")
        if bits not in {128, 256, 512}:
            return _error(400, "invalid bit length")
        plain = os.urandom(bits // 8)
        data = self._seal_with(key, plain)
        if kind == "plaintext":
            data["plaintext"] = base64.b64encode(plain).decode()
        return 200, self._envelope(data)

    def _transit_hmac(self, mount: str, name: str, alg: str | None, body: dict[str, Any], verify: bool) -> Response:
        """hmac/:name and verify/:name (path_hmac.go): one input or batch_input, results in input order."""
        key = self.transit.get(f"{mount}/{name}")
        if key is None:
            return _error(400, "encryption key not found")
        algorithm = alg or str(body.get("hash_algorithm") or body.get("algorithm") or "sha2-256")
        digest = _HMAC_ALGORITHMS.get(algorithm)
        if digest is None:
            return 400, {"errors": [f'unsupported algorithm "{algorithm}"']}
        version = key["latest"]
        if not verify:
            wanted = _int_field(body, "key_version")
            if wanted > key["latest"] or (0 < wanted < key["min_decryption"]):  # keysutil.Policy.HMACKey
                return _error(400, f"key version does not exist; latest key version is {key['latest']}" if wanted > key["latest"]
                              else f"key version disallowed by policy (minimum is {key['min_decryption']})")
            version = wanted or key["latest"]
        batch = body.get("batch_input")
        if batch is not None:
            if not isinstance(batch, list) or not batch:
                return _error(400, "missing batch input to process")
            items = [dict(i) if isinstance(i, dict) else {} for i in batch]
        elif verify:
            items = [{"input": str(body.get("input") or ""), "hmac": str(body.get("hmac") or "")}]
        else:
            if "input" not in body:
                return _error(400, "missing input for HMAC")
            items = [{"input": str(body["input"])}]
        results = [self._hmac_item(key, version, digest, item, verify) for item in items]
        if batch is not None:
            for result, item in zip(results, items):
                result["reference"] = str(item.get("reference", ""))
            return 200, self._envelope({"batch_results": results})
        if "error" in results[0]:
            return _error(400, results[0]["error"])
        return 200, self._envelope({"valid": results[0]["valid"]} if verify else {"hmac": results[0]["hmac"]})

    @staticmethod
    def _hmac_item(key: dict[str, Any], version: int, digest: str, item: dict[str, Any], verify: bool) -> dict[str, Any]:
        if "input" not in item:
            return {"valid": False, "error": "missing input" if verify else "missing input for HMAC"}
        try:
            data = base64.b64decode(str(item["input"]), validate=True)
        except ValueError as exc:
            return {"valid": False, "error": f"unable to decode input as base64: {exc}"}
        if not verify:
            mac = hmac.new(key["hmac"][version], data, digest).digest()
            return {"hmac": f"vault:v{version}:" + base64.b64encode(mac).decode(), "valid": False}
        given = item.get("hmac")
        if given is None:
            return {"valid": False, "error": "missing hmac"}
        given = str(given)
        if not given.startswith("vault:v"):
            return {"valid": False, "error": "invalid HMAC to verify: no prefix"}
        fields = given.removeprefix("vault:v").split(":", 1)
        if len(fields) != 2:
            return {"valid": False, "error": "invalid HMAC: wrong number of fields"}
        if not re.fullmatch(r"[+-]?\d+", fields[0]):
            return {"valid": False, "error": "invalid HMAC: version number could not be decoded"}
        try:
            expected = base64.b64decode(fields[1], validate=True)
        except ValueError as exc:
            return {"valid": False, "error": f"unable to decode verification HMAC as base64: {exc}"}
        n = int(fields[0])
        if n > key["latest"]:
            return {"valid": False, "error": "invalid HMAC: version is too new"}
        if key["min_decryption"] > 0 and n < key["min_decryption"]:
            return {"valid": False, "error": "cannot verify HMAC: version is too old (disallowed by policy)"}
        if n not in key["hmac"]:
            return {"valid": False, "error": f"key version disallowed by policy (minimum is {key['min_decryption']})"}
        mac = hmac.new(key["hmac"][n], data, digest).digest()
        return {"valid": hmac.compare_digest(mac, expected)}

    def _transit_decrypt(self, mount: str, name: str, body: dict[str, Any]) -> Response:
        text = str(body.get("ciphertext") or "")
        if not text:
            return _error(400, "missing ciphertext to decrypt")
        key = self.transit.get(f"{mount}/{name}")
        if key is None:
            return _error(400, "encryption key not found")
        # keysutil.Policy.DecryptWithFactory, check by check and in its order
        if not text.startswith("vault:v"):
            return _error(400, "invalid ciphertext: no prefix")
        fields = text.removeprefix("vault:v").split(":", 1)
        if len(fields) != 2:
            return _error(400, "invalid ciphertext: wrong number of fields")
        if not re.fullmatch(r"[+-]?\d+", fields[0]):
            return _error(400, "invalid ciphertext: version number could not be decoded")
        version = int(fields[0]) or 1  # v0: keys once started at zero, and Vault still reads it as v1
        if version > key["latest"]:
            return _error(400, "invalid ciphertext: version is too new")
        if version < key["min_decryption"]:
            return _error(400, TOO_OLD)
        try:
            blob = _go_b64decode(fields[1])
        except ValueError:
            return _error(400, "invalid ciphertext: could not decode base64")
        if len(blob) < 12:
            return _error(400, "invalid ciphertext length")
        try:
            plain = AESGCM(key["versions"][version]).decrypt(blob[:12], blob[12:], None)
        except (InvalidTag, ValueError):
            return _error(400, "cipher: message authentication failed")
        return 200, self._envelope({"plaintext": base64.b64encode(plain).decode()})

    # KV v2
    def _kv(self, op: str, mount: str, sub: str, body: dict[str, Any], query: dict[str, list[str]]) -> Response:
        routes: list[tuple[str, Callable[..., Response], set[str]]] = [
            (r"data/(?P<path>.+)", lambda path: self._kv_data(op, mount, path, body, query), {"read", "write", "delete"}),
            (r"delete/(?P<path>.+)", lambda path: self._kv_mark(mount, path, body, "delete"), {"write"}),
            (r"undelete/(?P<path>.+)", lambda path: self._kv_mark(mount, path, body, "undelete"), {"write"}),
            (r"destroy/(?P<path>.+)", lambda path: self._kv_mark(mount, path, body, "destroy"), {"write"}),
            (r"metadata/?(?P<path>.*)", lambda path: self._kv_metadata(op, mount, path), {"read", "list", "delete"}),
        ]
        handler, args = _route(routes, sub, op)
        return handler(**args)

    def _version_meta(self, n: int, v: dict[str, Any]) -> dict[str, Any]:
        return {"created_time": _rfc3339(v["created"]), "custom_metadata": None,
                "deletion_time": _rfc3339(v["deleted"]) if v["deleted"] is not None else "",
                "destroyed": v["destroyed"], "version": n}

    def _kv_data(self, op: str, mount: str, path: str, body: dict[str, Any], query: dict[str, list[str]]) -> Response:
        ref = f"{mount}/{path}"
        secret = self.kv.get(ref)
        now = self.now()
        if op == "write":
            data = body.get("data")
            if data is None:
                return _error(400, "no data provided")
            if not isinstance(data, dict):
                return _error(400, "data must be a JSON object")
            secret = self.kv.setdefault(ref, {"versions": [], "created": now, "updated": now})
            secret["versions"].append({"data": dict(data), "created": now, "deleted": None, "destroyed": False})
            secret["updated"] = now
            n = len(secret["versions"])
            return 200, self._envelope(self._version_meta(n, secret["versions"][-1]))
        if op == "delete":
            if secret and secret["versions"]:
                latest = secret["versions"][-1]
                if latest["deleted"] is None and not latest["destroyed"]:
                    latest["deleted"] = now
            return 204, None
        if secret is None:
            return 404, {"errors": []}
        raw = (query.get("version") or ["0"])[0]
        if not re.fullmatch(r"\d*", raw):
            return _error(400, f"invalid version {raw!r}")
        n = int(raw or 0) or len(secret["versions"])
        if not 1 <= n <= len(secret["versions"]):
            return 404, {"errors": []}
        version = secret["versions"][n - 1]
        meta = self._version_meta(n, version)
        if version["destroyed"] or (version["deleted"] is not None and version["deleted"] <= now):
            return 404, self._envelope({"data": None, "metadata": meta})
        return 200, self._envelope({"data": dict(version["data"]), "metadata": meta})

    def _kv_mark(self, mount: str, path: str, body: dict[str, Any], action: str) -> Response:
        raw = body.get("versions")
        versions = raw.split(",") if isinstance(raw, str) else list(raw or [])
        if not versions:
            return _error(400, "no version number provided")
        secret = self.kv.get(f"{mount}/{path}")
        now = self.now()
        for item in versions:
            n = _int_field({"versions": item}, "versions")
            if secret is None or not 1 <= n <= len(secret["versions"]):
                continue
            v = secret["versions"][n - 1]
            if action == "delete" and v["deleted"] is None and not v["destroyed"]:
                v["deleted"] = now
            elif action == "undelete" and not v["destroyed"]:
                v["deleted"] = None
            elif action == "destroy":
                v["destroyed"], v["data"] = True, {}
        return 204, None

    def _kv_metadata(self, op: str, mount: str, path: str) -> Response:
        ref = f"{mount}/{path}"
        if op == "list":
            prefix = f"{mount}/{path.rstrip('/')}/" if path.strip("/") else f"{mount}/"
            keys = sorted({r[len(prefix):].split("/")[0] + ("/" if "/" in r[len(prefix):] else "")
                           for r in self.kv if r.startswith(prefix)})
            return (200, self._envelope({"keys": keys})) if keys else (404, {"errors": []})
        if op == "delete":
            self.kv.pop(ref, None)
            return 204, None
        secret = self.kv.get(ref)
        if secret is None:
            return 404, {"errors": []}
        versions = {str(n): {k: v for k, v in self._version_meta(n, ver).items() if k in {"created_time", "deletion_time", "destroyed"}}
                    for n, ver in enumerate(secret["versions"], 1)}
        return 200, self._envelope({"cas_required": False, "created_time": _rfc3339(secret["created"]),
                                    "current_version": len(secret["versions"]), "custom_metadata": None,
                                    "delete_version_after": "0s", "max_versions": 0, "oldest_version": 0,
                                    "updated_time": _rfc3339(secret["updated"]), "versions": versions})
