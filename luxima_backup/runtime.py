"""Per-process wiring: the settings, object store and key provider each flow and task shares.

Built once per settings object (so once per run in practice), and only when first needed:
SDK imports and logins happen here, not at module import.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Callable, Iterator

from prefect.tasks import exponential_backoff

from . import procs
from .catalog import Catalog
from .errors import TimeLimitExceeded, TimeLimitInterrupt, should_retry
from .keys import KeyProvider, provider_from_settings
from .settings import Settings, load_settings
from .storage import ObjectStore, store_from_settings

_lock = threading.Lock()
# Keyed by id() and holding the settings object itself, so an id is never reused while cached.
_stores: dict[int, tuple[Settings, ObjectStore]] = {}
_providers: dict[int, tuple[Settings, KeyProvider]] = {}
_config_stores: dict[int, tuple[Settings, ObjectStore]] = {}
_signers: dict[int, tuple[Settings, Any]] = {}


# The site a run works on when it is not the primary one (the DR drill: the DR copies, the DR servers): see ``site``.
_site: Settings | None = None


def settings() -> Settings:
    if _site is not None:
        return _site
    return load_settings()


@contextlib.contextmanager
def site(derived: Settings, store: ObjectStore | None = None) -> Iterator[Settings]:
    """Run what is inside against ``derived`` settings (another site: its storage, servers, keys) instead of the loaded
    ones; ``store``: the object store for its [storage] (e.g. a DR directory reached over SSH).

    Process-wide, not per context: stages run in threads of their own, and every one of them must see the same site
    (a DR drill must never read the primary's storage by accident). Flows run one per process (CLI, worker, serve),
    so nothing else is affected; one site at a time.
    """
    global _site
    with _lock:
        if _site is not None:
            raise RuntimeError("a run is already using another site")
        _site = derived
        if store is not None:
            _stores[id(derived)] = (derived, store)
    try:
        yield derived
    finally:
        with _lock:
            _site = None
            for cache in (_stores, _providers, _config_stores, _signers):
                cache.pop(id(derived), None)


def lock_days(s: Settings) -> dict[str, int]:
    """How long object lock retains each component's objects (with storage.object_lock on): its retention."""
    return {"db": s.db_backup.retention_days, "files": s.files_backup.retention_days, "configs": s.configs.retention_days,
            "images": s.images.retention_days, "image-objects": s.images.retention_days}


def store(s: Settings | None = None) -> ObjectStore:
    s = s or settings()
    with _lock:
        cached = _stores.get(id(s))
        if cached is None or cached[0] is not s:
            cached = _stores[id(s)] = (s, store_from_settings(s.storage, lock_days(s)))
        return cached[1]


def pruner_store(component: str, s: Settings | None = None) -> ObjectStore:
    """The store a prune deletes from: reached with the pruner's credentials when they are set (the backups' own
    credentials then need no right to delete, and a stolen one cannot destroy backups)."""
    s = s or settings()
    cfg = s.configs.storage if component == "configs" and s.configs.storage is not None else s.storage
    if cfg.pruner_access_key_id is None:
        return config_store(s) if component == "configs" else store(s)
    return store_from_settings(cfg.for_pruner(), lock_days(s))


def config_store(s: Settings | None = None) -> ObjectStore:
    """Where config archives go: [configs.storage] when set (e.g. the Proxmox backup server's disk), else [storage]."""
    s = s or settings()
    if s.configs.storage is None:
        return store(s)
    with _lock:
        cached = _config_stores.get(id(s))
        if cached is None or cached[0] is not s:
            cached = _config_stores[id(s)] = (s, store_from_settings(s.configs.storage, lock_days(s)))
        return cached[1]


def location(component: str, s: Settings | None = None) -> tuple[ObjectStore, str]:
    """Where a component's backups and manifests are: config archives may have their own storage ([configs.storage])."""
    s = s or settings()
    if component == "configs":
        return config_store(s), config_prefix(s)
    return store(s), s.storage.prefix


def catalog(component: str, s: Settings | None = None) -> Catalog:
    """The authenticated catalog of a component's backups (its manifests, checked with the configured key provider)."""
    s = s or settings()
    return catalog_at(*location(component, s), s)


def catalog_at(store: ObjectStore, prefix: str, s: Settings | None = None) -> Catalog:
    """The catalog of the manifests under ``prefix`` of ``store`` (a DR copy, say), signed and checked as configured."""
    s = s or settings()
    return Catalog(store, prefix, key_provider(s), recovery_signer(s))


def recovery_signer(s: Settings | None = None) -> Any:
    """What also signs catalog documents for the recovery key (``mac_recovery``), when one is configured; not in
    break-glass mode (which writes nothing)."""
    s = s or settings()
    if s.keys.recovery_catalog_key is None or s.keys.recovery_public_key is None or s.keys.recovery_private_key:
        return None
    with _lock:
        cached = _signers.get(id(s))
    if cached is None or cached[0] is not s:
        from .recovery import RecoveryMac

        signer = RecoveryMac.from_text(secret(s.keys.recovery_catalog_key, s), s.keys.recovery_public_key)
        with _lock:
            cached = _signers[id(s)] = (s, signer)
    return cached[1]


def recovery_key_id(s: Settings | None = None) -> str | None:
    """The fingerprint of the configured offline recovery key, if one is."""
    from .recovery import fingerprint, load_public

    s = s or settings()
    return fingerprint(load_public(s.keys.recovery_public_key)) if s.keys.recovery_public_key else None


def config_prefix(s: Settings | None = None) -> str:
    s = s or settings()
    return (s.configs.storage or s.storage).prefix


def key_provider(s: Settings | None = None) -> KeyProvider:
    s = s or settings()
    with _lock:
        cached = _providers.get(id(s))
        if cached is None or cached[0] is not s:
            cached = _providers[id(s)] = (s, provider_from_settings(s.keys))
        return cached[1]


def secret(ref: Any, s: Settings | None = None) -> str:
    """Resolve a secret reference, with Vault (``vault:`` references) when [keys.vault] is configured."""
    s = s or settings()
    reader = None
    if s.keys.vault is not None:
        from .vault import read_kv

        vault_cfg = s.keys.vault
        reader = lambda path, field: read_kv(vault_cfg, path, field)[0]  # noqa: E731
    return str(ref.resolve(reader))


def connect_host(name: str, s: Settings | None = None) -> Any:
    """A connected SSH client (paramiko) for ``[hosts.NAME]``, its key resolved through ``secret`` (Vault too)."""
    from . import ssh

    s = s or settings()
    cfg = s.hosts[name]
    return ssh.connect(cfg, secret(cfg.key, s))


def proxmox(name: str | None = None, s: Settings | None = None) -> Any:
    """A ``ProxmoxClient`` for ``[proxmox.NAME]`` (default: vm_backup.proxmox), its token resolved through ``secret``."""
    from .proxmox import ProxmoxClient

    s = s or settings()
    name = name or s.vm_backup.proxmox
    cfg = s.proxmox_endpoint(name)
    return ProxmoxClient(name, cfg, secret(cfg.token_secret, s))


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry a task only when its error says it is transient."""
    try:
        state.result()
    except Exception as exc:  # the task's own exception, re-raised by result()
        return should_retry(exc)
    return False


# Task options for steps that talk to a server: a few retries, with backoff, for transient errors only.
TRANSIENT_RETRIES: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": exponential_backoff(backoff_factor=2),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_if_transient,
}


@contextlib.contextmanager
def time_limit(limit_of: Callable[[Settings], float], name: str,
               setting: str = "timeout_seconds") -> Iterator[threading.Event]:
    """Bound a flow's body, or one stage of it, by a limit from the settings (``limit_of(settings)`` seconds).

    Prefect's own ``timeout_seconds`` is fixed when the flow is defined, before any settings exist;
    this one is read at run time. When it expires, a timer thread stops every child process (pg_dump,
    pg_restore, rsync, ...) and cancels registered waits, which ends the stages blocked on them, then
    signals the main thread, where ``TimeLimitExceeded`` is raised: the flow's clean-up runs and the
    run ends TimedOut. (What the signal raises is a ``TimeLimitInterrupt``, a BaseException, so that no
    library retries it as a network error; Prefect marks a task or subflow it passes through Crashed.
    The signal is sent to the main thread itself: a process-wide alarm may land on
    another thread and leave the main one blocked.) Flows run in their process's main thread (CLI,
    worker, serve); elsewhere the limit is not enforced. Limits nest: a stage's inside its flow's.
    Yields the event set when the limit expired (a subflow may have turned the error into its state).
    """
    expired = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield expired
        return
    seconds = float(limit_of(settings()))
    finished = threading.Lock()  # held by the run's end: no alarm after the handler is put back
    message = (f"{name} ran past its limit of {seconds:g} s; its child processes were stopped "
               f"(raise {setting} if runs this long are expected)")

    def expire() -> None:
        if not finished.acquire(blocking=False):
            return
        try:
            expired.set()
            procs.stop_all(grace=2)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGALRM)  # type: ignore[arg-type]
        finally:
            finished.release()

    def on_alarm(signum: int, frame: Any) -> None:
        if expired.is_set():
            if not ending.is_set():  # the block already ended on its own: nothing left to stop
                raise TimeLimitInterrupt(message)
            return
        if callable(previous):  # an enclosing limit's alarm, or someone else's (e.g. a test runner's)
            previous(signum, frame)

    ending = threading.Event()
    previous = signal.signal(signal.SIGALRM, on_alarm)
    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield expired
    except BaseException as exc:
        # The stages stopped by the limit may fail first, with errors of their own: the cause is the limit.
        if expired.is_set() and not isinstance(exc, TimeLimitExceeded):
            raise TimeLimitExceeded(message) from exc
        raise
    finally:
        ending.set()
        timer.cancel()
        with finished:
            signal.signal(signal.SIGALRM, previous)
