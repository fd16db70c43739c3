"""HashiCorp Vault access through hvac: authentication, and Vault errors in the project's terms."""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from typing import Any, Callable, Iterator, Mapping

import hvac
import hvac.exceptions
import requests

from .errors import BackupError, KeyProviderError, SecretError, WrongKeyError
from .secrets import register
from .settings import VaultSettings

log = logging.getLogger(__name__)

_lock = threading.Lock()
# Keyed by id() and holding the settings object itself, so an id is never reused while cached.
_clients: dict[int, tuple[VaultSettings, hvac.Client]] = {}


def client(cfg: VaultSettings) -> hvac.Client:
    """An authenticated hvac client for ``cfg``, made once per process and settings object."""
    with _lock:
        cached = _clients.get(id(cfg))
        if cached is not None and cached[0] is cfg:
            if cached[1].is_authenticated():
                return cached[1]
            # The token expired (or was revoked) during the run: an AppRole logs in again; a
            # static token fails the login below with a clear "invalid token" error.
            log.info("the Vault token is no longer valid (expired or revoked); logging in to %s again", cfg.address)
        c = _login(cfg)
        _clients[id(cfg)] = (cfg, c)
        return c


def _login(cfg: VaultSettings) -> hvac.Client:
    verify: bool | str = str(cfg.ca_cert) if cfg.ca_cert else cfg.verify_tls
    c = hvac.Client(url=cfg.address, namespace=cfg.namespace, verify=verify, timeout=cfg.timeout)
    with translate_errors("authenticating to Vault"):
        if cfg.auth == "token":
            assert cfg.token is not None  # guaranteed by VaultSettings validation
            c.token = cfg.token.resolve()
            c.auth.token.lookup_self()  # proves the token now, with a clear error, not at first use
        else:
            assert cfg.role_id is not None and cfg.secret_id is not None
            resp = c.auth.approle.login(
                role_id=cfg.role_id.resolve(), secret_id=cfg.secret_id.resolve(), mount_point=cfg.approle_mount
            )
            register(resp["auth"]["client_token"])
    return c


@contextlib.contextmanager
def translate_errors(action: str, refusals: Mapping[str, Callable[[str], BackupError]] | None = None) -> Iterator[None]:
    """Turn hvac/requests failures into project errors: unavailability is transient, refusals are not.

    ``refusals`` maps a fragment of a Vault 400 message to the error the caller wants for it,
    for refusals only the call site can explain (it knows the key, the version, the command to fix it).
    """
    try:
        yield
    except (hvac.exceptions.VaultDown, hvac.exceptions.InternalServerError, hvac.exceptions.BadGateway,
            hvac.exceptions.RateLimitExceeded) as exc:
        raise KeyProviderError(f"Vault unavailable while {action}: {_errors(exc)}", transient=True) from None
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise KeyProviderError(f"cannot reach Vault while {action}: {type(exc).__name__}", transient=True) from None
    except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized) as exc:
        text = _errors(exc)
        if "invalid token" in text:
            raise KeyProviderError(
                f"Vault denied access while {action}: {text}",
                hint="the Vault token is expired, revoked or wrong: give keys.vault.token a valid one, or use "
                     "auth = 'approle', which logs in again when its token expires",
            ) from None
        raise KeyProviderError(
            f"Vault denied access while {action}: {text}",
            hint="check the token/AppRole and that its policy allows this path (Transit datakey and decrypt "
                 "need the 'update' capability, 'create' is not enough; KV reads need 'read')",
        ) from None
    except hvac.exceptions.InvalidPath as exc:
        text = _errors(exc)
        raise KeyProviderError(f"Vault path not found while {action}" + (f": {text}" if text else ""),
                               hint="check the mount and key/secret names in [keys.vault]") from None
    except hvac.exceptions.InvalidRequest as exc:
        text = _errors(exc)
        for fragment, error in (refusals or {}).items():
            if fragment in text:
                raise error(text) from None
        if "invalid role or secret id" in text.lower():
            raise KeyProviderError(
                f"Vault refused the AppRole login: {text}",
                hint="check keys.vault.role_id and keys.vault.secret_id (a secret_id may have expired or run out of uses)",
            ) from None
        if "message authentication failed" in text or "invalid ciphertext" in text:
            raise WrongKeyError(
                f"Vault could not unwrap the data key while {action}: {text}",
                hint="the backup was encrypted under a different Vault key (or the wrapped key is corrupt)",
            ) from None
        raise KeyProviderError(f"Vault refused the request while {action}: {text}") from None
    except hvac.exceptions.VaultError as exc:
        raise KeyProviderError(f"Vault error while {action}: {_errors(exc)}") from None


# Vault joins several errors with go-multierror: "2 errors occurred:\n\t* permission denied\n\t* invalid token\n\n".
_MULTIERROR = re.compile(r"^\d+ errors? occurred:\s*\n((?:\s*\* .*\n?)+)\s*$")


def _errors(exc: hvac.exceptions.VaultError) -> str:
    """Vault's error messages on one line ("" when its JSON listed none, as for a plain 404)."""
    errs = getattr(exc, "errors", None)
    if isinstance(errs, list):
        lines = []
        for err in map(str, errs):
            m = _MULTIERROR.match(err)
            lines += [item.strip().removeprefix("* ") for item in m.group(1).splitlines() if item.strip()] if m else [err.strip()]
        return "; ".join(line for line in lines if line)
    text = str(exc).split(", on ")[0]
    return type(exc).__name__ if text in {"", "None"} else text


def read_kv(cfg: VaultSettings, path: str, field: str, version: int | None = None) -> tuple[str, int]:
    """A field of a KV v2 secret at ``MOUNT/PATH`` (the mount is the first segment) and its version."""
    mount, _, sub = path.partition("/")
    if not sub:
        raise SecretError(f"vault reference {path!r} needs MOUNT/PATH")
    with translate_errors(f"reading secret {path}"):
        try:
            resp: dict[str, Any] = client(cfg).secrets.kv.v2.read_secret_version(
                path=sub, mount_point=mount, version=version, raise_on_deleted_version=True
            )
        except hvac.exceptions.InvalidPath as exc:
            if exc.errors:  # Vault named the problem (no such mount, ...): translate_errors says it
                raise
            raise _missing_version(path, field, version, exc.json) from None
    data = resp["data"]["data"]
    if field not in data:
        raise SecretError(f"Vault secret {path} has no field {field!r}", hint=f"fields present: {sorted(data)}")
    value = str(data[field])
    register(value)
    return value, int(resp["data"]["metadata"]["version"])


def _missing_version(path: str, field: str, version: int | None, body: Any) -> KeyProviderError:
    """Why KV v2 answered 404: a deleted or destroyed version (its metadata comes with the 404), or no such secret."""
    mount, _, sub = path.partition("/")
    data = body.get("data") if isinstance(body, dict) else None
    meta = data.get("metadata") if isinstance(data, dict) else None
    if not isinstance(meta, dict):
        which = f" version {version}" if version else ""
        return KeyProviderError(f"Vault has no secret{which} at {path}",
                                hint="check keys.vault.kv_mount and keys.vault.kv_path (or the vault: reference)")
    n = meta.get("version")
    which = f"version {n}" if version else f"the latest version ({n})"
    if meta.get("destroyed"):
        return KeyProviderError(
            f"{which} of Vault secret {path} was destroyed",
            hint="a destroyed version cannot be recovered; backups wrapped with it cannot be decrypted"
            if version else f"write a new version holding a new master key (32 random bytes, base64): "
                            f"vault kv put -mount={mount} {sub} {field}=...",
        )
    return KeyProviderError(
        f"{which} of Vault secret {path} was deleted (at {meta.get('deletion_time')})",
        hint=f"undelete it if it is still needed: vault kv undelete -mount={mount} -versions={n} {sub}",
    )
