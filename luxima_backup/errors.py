"""The one error hierarchy: every failure the project raises on purpose, transient or permanent.

Retries are decided here and nowhere else: an error is retried when its ``transient``
flag is set (a connection reset, an S3 5xx, Vault sealed or unreachable). Bad
configuration, authentication failures and corrupt data are permanent: retrying them
only delays the alert. Each kind of failure has one retry layer (docs/architecture.md):
an error its own layer already retried (an S3 request botocore gave up on) says so in
``retried``, and no layer above tries it again.
"""

from __future__ import annotations

import errno
import socket


class BackupError(Exception):
    """Root of the project's errors. ``hint`` tells the operator what to do about it."""

    transient: bool = False
    retried: bool = False  # the layer that owns this kind of failure has retried it already

    def __init__(self, message: str, *, hint: str | None = None, transient: bool | None = None, retried: bool = False):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if transient is not None:
            self.transient = transient
        if retried:
            self.retried = True

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(BackupError):
    """A setting is missing or invalid; the run stops before doing anything."""


class SecretError(ConfigError):
    """A secret reference cannot be resolved."""


class StorageError(BackupError):
    """Object storage refused or failed a request."""


class ObjectNotFound(StorageError):
    """The object (or bucket) does not exist."""


class KeyProviderError(BackupError):
    """The key provider (Vault, key file) failed or refused."""


class WrongKeyError(KeyProviderError):
    """The key at hand is not the one the backup was encrypted with."""


class IntegrityError(BackupError):
    """Data failed authentication or a checksum: tampered, truncated or corrupt. Never retried."""


class FormatError(IntegrityError):
    """Data is not in a format (or version) this program can read."""


class DatabaseError(BackupError):
    """The database refused or failed (connection, authentication, SQL)."""

    sqlstate: str | None = None  # the server's SQLSTATE, when it sent one


class ToolError(BackupError):
    """An external program (pg_dump, pg_restore, ...) is missing, too old, or failed."""


class GitError(BackupError):
    """A git command on the config repository failed (a network failure reaching the remote is transient)."""


class ProxmoxError(BackupError):
    """The Proxmox VE API refused or failed a request, or a task it ran did not end OK."""


class VerificationError(BackupError):
    """A backup or restore did not match what was recorded for it."""


class SourceError(BackupError):
    """What a backup reads is missing, empty, or shrank beyond its threshold: worth an alert, never an empty backup."""


class StageAborted(BackupError):
    """A streaming stage stopped because a neighbouring stage failed; never the root cause."""


class Cancelled(BackupError):
    """The operator refused or did not confirm a destructive action."""


class TimeLimitExceeded(TimeoutError):
    """A run went past its configured ``timeout_seconds``: never retried; Prefect records a TimeoutError as TimedOut."""


class TimeLimitInterrupt(BaseException):
    """Raised into the main thread when a time limit expires, and turned into ``TimeLimitExceeded`` where the limit
    was set. Not an ``Exception`` (let alone an ``OSError`` like ``TimeoutError``): the code it interrupts (botocore,
    urllib3, paramiko) takes those for network errors and retries them, which would hold the run past its limit."""


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the step that raised ``exc`` may succeed."""
    if isinstance(exc, TimeLimitExceeded):
        return False
    if isinstance(exc, BackupError):
        return exc.transient
    if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout)):
        return True
    if isinstance(exc, OSError) and exc.errno in {errno.ECONNRESET, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH}:
        return True
    return False


def should_retry(exc: BaseException) -> bool:
    """Whether a retry layer (a task's retries, a new stream attempt) should try again after ``exc``: transient,
    and not already retried by the layer below that owns its kind (retries that multiply make a failing run
    take unpredictably long to report)."""
    return is_transient(exc) and not getattr(exc, "retried", False)


def root_cause(errors: list[BaseException]) -> BaseException:
    """The error that started a failure among several concurrent ones (not a ``StageAborted``)."""
    for exc in errors:
        if not isinstance(exc, (StageAborted, BrokenPipeError)):
            return exc
    return errors[0]
