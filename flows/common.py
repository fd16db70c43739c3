"""What the flows share: stream attempts retried as a whole, best-effort log tasks, clean-up of failed runs."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, TypeVar

import prefect
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from luxima_backup import manifest, runtime
from luxima_backup.errors import BackupError, TimeLimitExceeded, should_retry
from luxima_backup.secrets import redact
from luxima_backup.workdir import ensure_private

R = TypeVar("R")


class Flow(prefect.Flow[..., R]):
    """Prefect's flow, its runs' parameters shown (UI, API) as plain JSON.

    Prefect encodes them with FastAPI's ``jsonable_encoder``, imported for it: 0.15 s and 4 MiB of every
    run that starts a subflow. Ours take names, numbers, flags, times and lists or mappings of them."""

    def serialize_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        return shown_parameters(parameters)


def flow(**options: Any) -> Callable[[Callable[..., R]], Flow[R]]:
    """``prefect.flow``'s decorator (keyword options only) making a :class:`Flow`."""
    return lambda fn: Flow(fn, **options)


def shown_parameters(parameters: dict[str, Any]) -> dict[str, Any]:
    """``parameters`` as JSON values: times as ISO text, paths as text, models and dataclasses as their fields;
    anything else by its type's name, as Prefect shows a value it cannot encode."""
    def plain(value: Any) -> Any:
        if hasattr(value, "isoformat"):
            return value.isoformat()
        if isinstance(value, Path):
            return str(value)
        if hasattr(value, "model_dump"):
            return value.model_dump(mode="json")
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return dataclasses.asdict(value)
        return f"<{type(value).__name__}>"

    shown = {}
    for key, value in parameters.items():
        try:
            shown[key] = json.loads(json.dumps(value, default=plain))
        except (TypeError, ValueError, RecursionError):
            shown[key] = f"<{type(value).__name__}>"
    return shown


def stream_with_retries(attempt_flow: Callable[..., Any], args: tuple[Any, ...], attempts: int,
                        delays: list[float], attempt_limit: Callable[[Any], float] | None = None,
                        setting: str = "stage_timeout_seconds") -> dict[str, Any]:
    """Run a streaming subflow (its last parameter is the attempt number) until it completes.

    Its stages cannot be retried alone once their input stream is consumed, so the whole
    stream is the unit of retry; only transient errors start another attempt. With
    ``attempt_limit`` (seconds, from the settings), an attempt still running then is stopped (its
    children killed, its waits cancelled) and counts as a transient failure: a stalled network or
    a hung tool gets another attempt within the run's own limit.
    """
    logger = get_run_logger()
    for attempt in range(1, attempts + 1):
        limit = (runtime.time_limit(attempt_limit, f"attempt {attempt} of {attempt_flow.name}", setting)
                 if attempt_limit is not None else contextlib.nullcontext(threading.Event()))
        state = None
        try:
            with limit as expired:
                state = attempt_flow(*args, attempt, return_state=True)
        except TimeLimitExceeded:
            if not expired.is_set():
                raise  # the run's own limit, not this attempt's
        if state is not None and state.is_completed():  # done, even if the limit ran out at the very end
            return state.result()
        if expired.is_set():  # whatever the stopped stages said: the cause is the limit
            exc: Any = BackupError(f"attempt {attempt} of {attempt_flow.name} ran past {setting}; it was stopped",
                                   transient=True)
        else:
            assert state is not None
            exc = state.result(raise_on_failure=False)
            if not isinstance(exc, BaseException):
                exc = BackupError(f"stream attempt {attempt} ended {state.type.value}: {state.message}")
        if attempt == attempts or not should_retry(exc):
            raise exc
        delay = delays[min(attempt - 1, len(delays) - 1)] if delays else 0
        logger.warning("attempt %d/%d failed with a transient error (%s); retrying in %.0fs", attempt, attempts, exc, delay)
        time.sleep(delay)
    raise AssertionError("unreachable")


def backup_start(store: Any, prefix: str, component: str, name: str, work_dir: Path | None = None) -> datetime:
    """Now, as the start that names a new backup of ``name``: its id and keys carry this second.

    Two backups of one target started within the same second would share them, and the second would
    overwrite the first's objects (a run takes well under a second on a small target). If a backup
    already holds this second's name, wait for the next one (as pgBackRest does for its labels). Two runs
    starting at once (a run from the shell beside a scheduled one) both find the name free in storage, so
    each also claims it on this host (a file made with O_EXCL under ``work_dir``): the second waits too.
    """
    while True:
        now = datetime.now(timezone.utc)
        try:
            taken = next(iter(store.list(manifest.stem(prefix, component, name, now))), None) is not None
        except BackupError:
            return now  # storage unreachable: the run fails at its upload, logged as such, not here unlogged
        if not taken and (work_dir is None or _claim(work_dir, component, name, now)):
            return now
        time.sleep(1.001 - now.microsecond / 1e6)


CLAIMS_KEPT_SECONDS = 600


def _claim(work_dir: Path, component: str, name: str, now: datetime) -> bool:
    """Claim this second's name for one run on this host; False when another run has it."""
    folder = ensure_private(ensure_private(work_dir) / "claims", "work_dir/claims")
    for old in folder.iterdir():  # a claim matters for its second only: forget old ones
        with contextlib.suppress(OSError):
            if old.stat().st_mtime < time.time() - CLAIMS_KEPT_SECONDS:
                old.unlink()
    target = hashlib.sha256(f"{component}\0{name}".encode()).hexdigest()[:24]  # any target name, as a file name
    try:
        os.close(os.open(folder / f"{target}-{now:%Y%m%dT%H%M%S}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    return True


def logged(fn: Any, what: str, *args: Any, skip: bool = False) -> Any:
    """Run a log task; its failure is a warning and never the backup's outcome."""
    if skip:
        return None
    state = fn(*args, return_state=True)
    if state.is_completed():
        return state.result()
    get_run_logger().warning("backup log %s not written: %s", what, redact(str(state.result(raise_on_failure=False))))
    return None


def outcome(state: Any) -> tuple[Any, BaseException | None]:
    """A subflow's result, or the exception it ended with (one failing target must not stop the others)."""
    if state.is_completed():
        return state.result(), None
    exc = state.result(raise_on_failure=False)
    return None, exc if isinstance(exc, BaseException) else BackupError(str(state.message))


@task(name="manifest", cache_policy=NO_CACHE, persist_result=False, **runtime.TRANSIENT_RETRIES)
def save_manifest(key: str, document: manifest.Manifest) -> str:
    """Write the manifest, signed, last: from now on the backup exists (where its component's backups are)."""
    runtime.catalog(document.component).save(key, document)
    return key


def sealed_with(encrypted: dict[str, Any]) -> manifest.Encryption:
    """The manifest's record of how an encrypt stage sealed its object: format, chunk size, the key's id (the
    wrapped data key is in the object's header, not here)."""
    return manifest.Encryption(format=encrypted["format"], chunk_size=encrypted["chunk_size"],
                               recovery_key_id=encrypted.get("recovery_key_id"),
                               **{k: v for k, v in encrypted["key"].items() if k != "wrapped"})


def discard(keys: list[str], logger: Any, store: Any = None, manifest_key: str | None = None) -> None:
    """Remove objects of a failed run (from ``store``, default [storage]) so nothing that looks like a backup is left.

    ``manifest_key``: the run's manifest, whose write may have landed though the call reported a failure. It goes
    first, so the catalog stops offering the backup before its data goes; if it cannot be removed, the data stays
    too: a manifest must never point at nothing (the sweeper of retention removes what is left).
    """
    store = store or runtime.store()
    if manifest_key is not None:
        try:
            store.remove(manifest_key)
        except Exception as exc:
            logger.error("could not remove the manifest %s of the failed run (%s); its objects are kept so that it "
                         "does not point at nothing: %s", manifest_key, redact(str(exc)), ", ".join(keys))
            return
    for key in keys:
        try:
            store.remove(key)
            logger.info("removed %s of the failed run", key)
        except Exception as exc:  # best effort; retention sweeps what is left
            logger.warning("could not remove %s of the failed run: %s", key, exc)
