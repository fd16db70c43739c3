"""Replication stages: a backup copied to a DR target, checked there, its manifest last.

Only what the primary's authenticated catalog offers is copied, and each object only when its bytes,
as read from the primary, have the size and sha256 its manifest records: an object encrypted or
swapped on the primary by an attacker is refused, never carried over a good copy. At the DR target
each copy is read back where it lies (the host hashes it, or it is read from the bucket) before the
manifest is written, so the DR catalog only ever offers a complete, checked backup. Nothing is ever
deleted at the DR target because it is gone from the primary: the DR copy has its own retention.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, BinaryIO

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from luxima_backup import catalog, runtime
from luxima_backup.errors import BackupError, IntegrityError, ObjectNotFound
from luxima_backup.pipes import Meter, MeteredReader, drain
from luxima_backup.ssh_store import SshStore
from luxima_backup.storage import ObjectStore
from luxima_backup.workdir import private_dir
from tasks.verify.stored import objects_of

READ_SIZE = 1 << 20


class Throttled:
    """A reader that keeps to ``kib_per_second`` on average (0: no limit), for a DR link shared with production."""

    def __init__(self, src: BinaryIO, kib_per_second: int):
        self._src, self._rate = src, kib_per_second * 1024
        self._start, self._sent = time.monotonic(), 0

    def read(self, n: int = -1) -> bytes:
        block = self._src.read(n)
        self._sent += len(block)
        if self._rate:
            ahead = self._sent / self._rate - (time.monotonic() - self._start)
            if ahead > 0:
                time.sleep(ahead)
        return block

    def readable(self) -> bool:
        return True


def dr_sha256(store: Any, key: str) -> str:
    """The sha256 of a copy, read where it lies: hashed by the DR host, or read back from the DR bucket."""
    if isinstance(store, SshStore):
        return store.sha256(key)
    meter = Meter()
    with store.load(key) as body:
        drain(MeteredReader(body, meter))
    meter.finish()
    return meter.hexdigest


def copy_object(src: ObjectStore, dst: Any, key: str, size: int, sha256: str, limit_kib: int, work: Path) -> str:
    """One object to the DR target unless a checked copy is there; returns what was done ("present" or "copied").

    The primary's bytes are checked against the manifest while they are read; at the target the copy is checked
    where it lies. A wrong copy at the target (a cut transfer, damage) is replaced; a wrong original never is copied.
    """
    try:
        there = dst.stat(key)
        if there.size == size and dr_sha256(dst, key) == sha256:
            return "present"
    except ObjectNotFound:
        pass
    meter = Meter()
    if isinstance(dst, SshStore):
        spool = work / "object.enc"  # ciphertext only, for rsync; removed after
        try:
            with src.load(key) as body, open(spool, "wb", opener=lambda p, f: os.open(p, f, 0o600)) as out:
                while True:
                    block = body.read(READ_SIZE)
                    if not block:
                        break
                    meter.update(block)
                    out.write(block)
            meter.finish()
            _check_source(key, meter, size, sha256)
            dst.put_file(spool, key, limit_kib)
        finally:
            spool.unlink(missing_ok=True)
    else:
        with src.load(key) as body:
            dst.save(key, Throttled(MeteredReader(body, meter), limit_kib))  # type: ignore[arg-type]
        meter.finish()
        try:
            _check_source(key, meter, size, sha256)
        except IntegrityError:
            dst.remove(key)  # what was read was not the backup: it must not stand at the DR site as one
            raise
    got = dr_sha256(dst, key)
    if got != sha256:
        raise IntegrityError(f"the copy of {key} at the DR target has sha256 {got}; its manifest says {sha256}",
                             hint="the DR target altered or lost bytes on write; the next run copies it again", transient=True)
    return "copied"


def _check_source(key: str, meter: Meter, size: int, sha256: str) -> None:
    if meter.size != size or meter.hexdigest != sha256:
        raise IntegrityError(
            f"{key} on the primary is {meter.size} bytes with sha256 {meter.hexdigest}; its manifest says {size} bytes, "
            f"{sha256}: it was altered or replaced after the backup, and is not copied",
            hint="check who can write to the backup storage; the DR site keeps the copies it has")


def replicate_one(src: ObjectStore, src_cat: catalog.Catalog, dst: Any, backup: catalog.Backup, limit_kib: int,
                  work: Path) -> dict[str, Any]:
    """One backup to the DR target: its objects (each checked at both ends), then its manifest as the primary signed
    it. A backup whose manifest is already at the target is complete there (the manifest is written last)."""
    try:
        dst.stat(backup.manifest_key)
        return {"backup": backup.backup_id, "action": "present", "bytes": 0}
    except ObjectNotFound:
        pass
    with src.load(backup.manifest_key) as body:
        raw = body.read()
    checked = src_cat.authentic(backup.manifest_key, raw)  # the bytes copied are the bytes checked
    copied = 0
    for obj in objects_of(catalog.Backup.of(backup.manifest_key, checked)):
        if copy_object(src, dst, obj["key"], obj["size"], obj["sha256"], limit_kib, work) == "copied":
            copied += obj["size"]
    dst.save_bytes(backup.manifest_key, raw, "application/json")
    return {"backup": backup.backup_id, "action": "copied", "bytes": copied}


def _kept_at_dr(settings: Any, component: str, primary: list[catalog.Backup], dst_cat: catalog.Catalog) -> set[str]:
    """The primary's backups the DR site's retention would keep, judged with the copies it has: only those are sent
    (a backup the DR prune removes at once would otherwise be sent again every day)."""
    from datetime import datetime, timezone

    from tasks.prune import plan_of

    at_dr, _ = dst_cat.by_target(component)
    here: dict[str, list[catalog.Backup]] = {}
    for b in primary:
        here.setdefault(b.source_name or "", []).append(b)
    wanted: set[str] = set()
    now = datetime.now(timezone.utc)
    for target, backups in here.items():
        both = {b.backup_id: b for b in [*at_dr.get(target, []), *backups]}
        plan = plan_of(settings, component, target, list(both.values()), now, force=True)
        wanted |= {d.backup_id for d in plan.decisions if d.keep or plan.held}
    return wanted


def dr_store(name: str, settings: Any, pruner: bool = False) -> Any:
    """The store of a DR target: its bucket (or directory), or its directory on a host over SSH; ``pruner``: reached
    with the DR bucket's pruner credentials when it has them."""
    from luxima_backup.storage import store_from_settings

    target = settings.dr.targets[name]
    if target.kind == "storage":
        cfg = target.storage.for_pruner() if pruner and target.storage.pruner_access_key_id is not None else target.storage
        return store_from_settings(cfg, runtime.lock_days(settings))
    host = settings.hosts[target.host]
    return SshStore(host, runtime.secret(host.key, settings), target.path, settings.work_dir, name=f"dr target {name}")


@task(name="replicate", cache_policy=NO_CACHE, persist_result=False, **runtime.TRANSIENT_RETRIES)
def replicate(target: str, component: str, only: list[str] | None = None) -> dict[str, Any]:
    """Every verified backup of a component that the DR target lacks, oldest first (a files chain arrives whole);
    one that cannot be copied is reported and the others go on. ``only``: just these backup ids (the VM backups whose
    archive is on the DR node)."""
    settings = runtime.settings()
    logger = get_run_logger()
    src, prefix = runtime.location(component, settings)
    src_cat = runtime.catalog(component, settings)
    dst = dr_store(target, settings)
    limit = settings.dr.targets[target].bandwidth_limit_kib
    rows: list[dict[str, Any]] = []
    dst_cat = runtime.catalog_at(dst, prefix, settings)
    primary = src_cat.list_backups(component)
    wanted = _kept_at_dr(settings, component, primary, dst_cat)
    work = private_dir(settings.work_dir, "dr-replicate-")
    try:
        for backup in primary:
            if not backup.verified or (only is not None and backup.backup_id not in only) or backup.backup_id not in wanted:
                continue
            try:
                row = replicate_one(src, src_cat, dst, backup, limit, work)
            except BackupError as exc:
                if exc.transient:
                    raise  # the task's retry (the link came back): what was copied and checked stays
                row = {"backup": backup.backup_id, "action": "refused", "bytes": 0, "why": str(exc)}
                logger.error("%s: %s not copied to %s: %s", component, backup.backup_id, target, exc)
            rows.append({"target": target, "component": component, "source": backup.source_name, **row})
        dst_cat.refresh(component)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(dst, SshStore):
            dst.close()
    copied = [r for r in rows if r["action"] == "copied"]
    logger.info("%s to %s: %d backup(s) copied (%d bytes), %d already there, %d refused", component, target, len(copied),
                sum(r["bytes"] for r in copied), sum(r["action"] == "present" for r in rows),
                sum(r["action"] == "refused" for r in rows))
    return {"rows": rows}
