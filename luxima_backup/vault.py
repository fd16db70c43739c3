"""HashiCorp Vault access through hvac: authentication, and Vault errors in the project's terms."""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

import hvac
import hvac.exceptions
import requests

from .errors import KeyProviderError, SecretError, WrongKeyError
from .secrets import register
from .settings import VaultSettings

_lock = threading.Lock()
# Keyed by id() and holding the settings object itself, so an id is never reused while cached.
_clients: dict[int, tuple[VaultSettings, hvac.Client]] = {}


def client(cfg: VaultSettings) -> hvac.Client:
    """An authenticated hvac client for ``cfg``, made once per process and settings object."""
    with _lock:
        cached = _clients.get(id(cfg))
        if cached is not None and cached[0] is cfg and cached[1].is_authenticated():
            return cached[1]
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
def translate_errors(action: str) -> Iterator[None]:
    """Turn hvac/requests failures into project errors: unavailability is transient, refusals are not."""
    try:
        yield
    except (hvac.exceptions.VaultDown, hvac.exceptions.InternalServerError, hvac.exceptions.BadGateway,
            hvac.exceptions.RateLimitExceeded) as exc:
        raise KeyProviderError(f"Vault unavailable while {action}: {_errors(exc)}", transient=True) from None
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise KeyProviderError(f"cannot reach Vault while {action}: {type(exc).__name__}", transient=True) from None
    except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized) as exc:
        raise KeyProviderError(
            f"Vault denied access while {action}: {_errors(exc)}",
            hint="check the token/AppRole and that its policy allows this path",
        ) from None
    except hvac.exceptions.InvalidPath as exc:
        raise KeyProviderError(f"Vault path not found while {action}: {_errors(exc)}", hint="check the mount and key/secret names in [keys.vault]") from None
    except hvac.exceptions.InvalidRequest as exc:
        text = _errors(exc)
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


def _errors(exc: hvac.exceptions.VaultError) -> str:
    errs = getattr(exc, "errors", None)
    if isinstance(errs, list) and errs:
        return "; ".join(str(e) for e in errs)
    return str(exc).split(", on ")[0] or type(exc).__name__


def read_kv(cfg: VaultSettings, path: str, field: str, version: int | None = None) -> tuple[str, int]:
    """A field of a KV v2 secret at ``MOUNT/PATH`` (the mount is the first segment) and its version."""
    mount, _, sub = path.partition("/")
    if not sub:
        raise SecretError(f"vault reference {path!r} needs MOUNT/PATH")
    with translate_errors(f"reading secret {path}"):
        resp: dict[str, Any] = client(cfg).secrets.kv.v2.read_secret_version(
            path=sub, mount_point=mount, version=version, raise_on_deleted_version=True
        )
    data = resp["data"]["data"]
    if field not in data:
        raise SecretError(f"Vault secret {path} has no field {field!r}", hint=f"fields present: {sorted(data)}")
    value = str(data[field])
    register(value)
    return value, int(resp["data"]["metadata"]["version"])
