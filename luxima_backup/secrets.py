"""Secret references: settings name where a secret lives, and it is resolved only when used.

A reference is one of
  ``env:NAME``                   an environment variable,
  ``file:/path``                 a file's content (e.g. a mounted Docker/Kubernetes secret),
  ``prefect-secret:BLOCK``       a Prefect Secret block,
  ``vault:MOUNT/PATH#FIELD``     a field of a Vault KV v2 secret (needs ``[keys.vault]``).
Every resolved value is registered for redaction, so it is scrubbed from logs, error
messages and artifacts even if some code path were careless with it.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import SecretError

SCHEMES = ("env", "file", "prefect-secret", "vault")
_REF_RE = re.compile(r"^(env|file|prefect-secret|vault):(.+)$")
REDACTED = "***"


@dataclass(frozen=True)
class SecretRef:
    """Where a secret lives; ``str()`` shows the reference, never the value."""

    scheme: str
    target: str

    @classmethod
    def parse(cls, text: str) -> "SecretRef":
        m = _REF_RE.match(text.strip())
        if not m:
            raise ValueError(
                f"not a secret reference: use one of {', '.join(s + ':...' for s in SCHEMES)} "
                "(secret values are never written inline in the settings)"
            )
        scheme, target = m.group(1), m.group(2)
        if scheme == "vault" and "#" not in target:
            raise ValueError("a vault: reference needs a field: vault:MOUNT/PATH#FIELD")
        return cls(scheme, target)

    def __str__(self) -> str:
        return f"{self.scheme}:{self.target}"

    def resolve(self, vault_reader: Callable[[str, str], str] | None = None) -> str:
        """The secret's value; raises ``SecretError`` naming the reference (never a value)."""
        value = _resolve(self, vault_reader)
        if not value:
            raise SecretError(f"secret {self} is empty", hint="set it to the secret's value")
        register(value)
        return value


def _resolve(ref: SecretRef, vault_reader: Callable[[str, str], str] | None) -> str:
    if ref.scheme == "env":
        if ref.target not in os.environ:
            raise SecretError(f"environment variable {ref.target} is not set", hint=f"export {ref.target}=... before the run")
        return os.environ[ref.target]
    if ref.scheme == "file":
        path = Path(ref.target).expanduser()
        try:
            return path.read_text().strip()
        except OSError as exc:
            raise SecretError(f"cannot read secret file {path}: {exc.strerror}", hint="check the path and its permissions") from None
    if ref.scheme == "prefect-secret":
        from prefect.blocks.system import Secret

        try:
            value = Secret.load(ref.target).get()
        except ValueError as exc:
            raise SecretError(f"Prefect Secret block {ref.target!r} not found", hint="create it in the UI or with `prefect block create secret`") from exc
        return str(value)
    # vault
    if vault_reader is None:
        raise SecretError(f"secret {ref} needs Vault, but [keys.vault] is not configured", hint="configure [keys.vault] or use an env: reference")
    path, field = ref.target.split("#", 1)
    return vault_reader(path, field)


# --- redaction -------------------------------------------------------------------------

_lock = threading.Lock()
_secrets: set[str] = set()


def register(value: str) -> None:
    """Remember a secret value so ``redact`` scrubs it everywhere from now on."""
    # Very short values would turn ordinary words into asterisks and protect nothing.
    if len(value) >= 4:
        with _lock:
            _secrets.add(value)


def redact(text: str) -> str:
    """``text`` with every registered secret value replaced by ``***``."""
    with _lock:
        values = sorted(_secrets, key=len, reverse=True)
    for value in values:
        if value in text:
            text = text.replace(value, REDACTED)
    return text


class RedactingFilter(logging.Filter):
    """Scrubs registered secrets from log records before any handler sees them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _secrets:
            message = record.getMessage()
            clean = redact(message)
            if clean != message:
                record.msg, record.args = clean, None
            if record.exc_info and record.exc_info[1] is not None:
                record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
                record.exc_info = None
        return True


_FILTER = RedactingFilter()


def install_log_redaction() -> None:
    """Attach the redacting filter to every handler now configured (Prefect's API handler included)."""
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
