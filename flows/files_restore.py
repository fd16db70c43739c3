"""The files restore flow: index → extract (every archive of the chain) → deliver → md5 check, logged.

The backup is found from the manifests in storage alone. Its index says which files to restore
(all, or one folder or file) and which archive holds each; every archive is streamed from
storage, authenticated chunk by chunk, and its files written into a private staging folder,
each checked against the index as it lands. Only when everything has been extracted and
checked does anything reach the destination: a local folder, a folder on a host (rsync over
SSH), or a bucket. Then the md5 of every restored file, read back where it now lives, is
compared with the backup's (the procedure's md5sum check); any mismatch fails the run and is
listed in an artifact.

Nothing existing is overwritten without ``confirm`` naming the destination; then each
overwritten file is kept beside it (``<destination>.pre-restore-<time>`` locally, rsync's
backup folder on a host).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from luxima_backup import destinations, events, runtime
from luxima_backup.catalog import Backup
from luxima_backup.destinations import Destination
from luxima_backup.errors import ConfigError, VerificationError
from luxima_backup.filetree import DIR, FILE, Entry
from luxima_backup.manifest import FilesManifest, StoredObject
from luxima_backup.secrets import install_log_redaction, redact
from luxima_backup.settings import Settings
from luxima_backup.workdir import private_dir
from flows.common import flow
from tasks.archive import load_index
from tasks.download import download
from luxima_backup.filetree import apply_metadata
from tasks.extract import extract, link_escapes, make_links_and_dirs, selector
from tasks.log import log_run

EXAMPLES = 10


@dataclass
class Plan:
    backup: Backup
    destination: Destination
    path_filter: str | None
    files: int = 0
    bytes: int = 0
    dirs: int = 0
    symlinks: int = 0
    archives: dict[str, StoredObject] = field(default_factory=dict)  # needed ones, in chain order
    conflicts: list[str] = field(default_factory=list)
    conflict_count: int = 0
    escaping_links: list[str] = field(default_factory=list)
    escaping_count: int = 0

    @property
    def manifest(self) -> FilesManifest:
        assert isinstance(self.backup.manifest, FilesManifest)  # the flow took only file backups
        return self.backup.manifest


def scan(plan: Plan, entries: Iterator[Entry], allow_escaping_links: bool,
         conflict: Callable[[Entry], str | None]) -> Plan:
    """One pass over the index: what will be restored, from which archives, and what it would overwrite
    (``conflict``, from the destination; a host's are found by an rsync dry run just before delivery)."""
    keep = selector(plan.path_filter)
    needed: set[str] = set()
    for e in entries:
        if not keep(e):
            continue
        if e.type == FILE:
            plan.files += 1
            plan.bytes += e.size
            assert e.archive is not None
            needed.add(e.archive)
        elif e.type == DIR:
            plan.dirs += 1
        else:
            plan.symlinks += 1
            if link_escapes(e):
                plan.escaping_count += 1
                if len(plan.escaping_links) < EXAMPLES:
                    plan.escaping_links.append(f"{e.name} -> {os.fsdecode(e.target or b'')}")
        overwritten = conflict(e)
        if overwritten is not None:
            plan.conflict_count += 1
            if len(plan.conflicts) < EXAMPLES:
                plan.conflicts.append(overwritten)
    missing = needed - set(plan.manifest.archives)
    if missing:
        raise ConfigError(f"the manifest of {plan.backup.backup_id} does not name archives {sorted(missing)}")
    plan.archives = {k: v for k, v in plan.manifest.archives.items() if k in needed}
    if plan.escaping_count and not allow_escaping_links:
        raise ConfigError(
            f"{plan.escaping_count} symlinks point outside the destination, e.g. {plan.escaping_links[:3]}",
            hint="set allow_escaping_links = true to make them anyway (they are links, not files), "
                 "or restore a path that leaves them out; nothing was restored",
        )
    return plan


def _entries(index_spool: str, index_codec: str, path_filter: str | None) -> Callable[[], Iterator[Entry]]:
    settings = runtime.settings()
    unwrap = runtime.key_provider(settings).unwrap
    keep = selector(path_filter)
    return lambda: (e for e in load_index(index_spool, index_codec, unwrap) if keep(e))


@task(name="deliver", cache_policy=NO_CACHE, persist_result=False)
def deliver(dest: Destination, staging: str, index_spool: str, index_codec: str, path_filter: str | None,
            confirmed: bool, stamp: str) -> dict[str, Any]:
    """Put the checked files in place; what they overwrite is kept aside (luxima_backup/destinations.py)."""
    return dest.deliver(runtime.settings(), Path(staging), _entries(index_spool, index_codec, path_filter), confirmed, stamp)


@task(name="verify-restored-files", cache_policy=NO_CACHE, persist_result=False)
def verify_restored(dest: Destination, index_spool: str, index_codec: str, path_filter: str | None) -> dict[str, Any]:
    """md5 of every restored file where it now lives, against the backup (the procedure's md5sum check)."""
    checked, mismatches = dest.md5_check(runtime.settings(), _entries(index_spool, index_codec, path_filter)())
    return {"checked": checked, "mismatches": mismatches}


@flow(name="files-restore", validate_parameters=True, persist_result=True)
def files_restore(
    destination: str,
    backup: str = "latest",
    source: str | None = None,
    as_of: datetime | None = None,
    path: str | None = None,
    confirm: str | None = None,
    allow_escaping_links: bool = False,
) -> dict[str, Any]:
    """Restore a file backup into a folder (here or on a host), then check the md5 of every restored file.

    Args:
        destination: an absolute folder here (created if missing), HOST:/folder for a [hosts.HOST], or
            s3://BUCKET/PREFIX of a bucket a [files_backup.sources.NAME] reads (its endpoint and credentials).
        backup: "latest" (newest verified backup of the source), a backup id, or an object key.
        source: which [files_backup.sources.NAME] the backup was taken of (default: the only one).
        as_of: with "latest": the newest verified backup completed at or before this time.
        path: restore only this folder or file (relative to the source's root), e.g. "avatars/2026".
        confirm: needed when existing files would be overwritten: the destination exactly as given.
            Each overwritten file is kept (beside the destination, in a backup folder on the host, or
            copied under PREFIX.luxima-pre-restore-TIME/ in the bucket).
        allow_escaping_links: make symlinks that point outside the destination (refused by default).
    """
    with runtime.time_limit(lambda s: s.restore.timeout_seconds, "files-restore"):  # read from the settings at run time
        t0 = time.monotonic()
        started = datetime.now(timezone.utc)
        settings = runtime.settings()
        install_log_redaction()
        logger = get_run_logger()
        dest = destinations.parse(settings, destination, source)
        names = list(settings.files_backup.sources)
        if source is None and backup == "latest":
            if len(names) != 1:
                raise ConfigError(f"say which source to restore: one of {names}", hint="set source")
            source = names[0]
        found = runtime.catalog("files", settings).resolve("files", backup, source=source, as_of=as_of)
        if not isinstance(found.manifest, FilesManifest):
            raise ConfigError(f"{found.manifest_key} is not a file backup",
                              hint="name a backup listed by `luxima-backup list --component files`")
        source_name = found.manifest.source.name
        confirmed = confirm is not None and confirm.strip() == destination.strip()
        if confirm is not None and not confirmed:
            raise ConfigError(f"confirm = {confirm!r} does not match destination {destination!r}",
                              hint="confirm must repeat the destination exactly")
        stamp = started.strftime("%Y%m%dT%H%M%SZ")
        plan = Plan(found, dest, path)
        idx = found.manifest.index
        codec = idx.compression.codec
        timings: dict[str, float] = {}
        checks: list[dict[str, Any]] = []
        mismatches: list[dict[str, Any]] = []
        outcome: dict[str, Any] = {}
        work = private_dir(settings.work_dir, "files-restore-")
        staging: Path | None = None
        try:
            index_spool = str(work / "index.enc")
            dl = download(idx.key, index_spool, idx.size_encrypted, idx.sha256_encrypted,
                          expect=found.manifest.binding_of(idx.key))
            timings["index"] = dl["seconds"]
            unwrap = runtime.key_provider(settings).unwrap
            # a bucket holds no links: they are counted, not refused
            scan(plan, load_index(index_spool, codec, unwrap), allow_escaping_links or not dest.holds_links,
                 dest.conflicts(settings))
            if plan.files + plan.dirs + plan.symlinks == 0:
                raise ConfigError(f"nothing in {found.backup_id} matches path {path!r}", hint="paths are relative to the source's root")
            if plan.conflict_count and not confirmed:
                raise ConfigError(f"restoring into {dest.label} would overwrite {plan.conflict_count} existing entries, e.g. {plan.conflicts[:3]}",
                                  hint=f"choose a new folder, or set confirm = {destination!r} to overwrite (each is kept aside)")
            logger.info("restoring %d files (%d bytes) of %s from %d archive(s) into %s", plan.files, plan.bytes,
                        found.backup_id, len(plan.archives), dest.label)
            staging = dest.staging(settings, stamp)

            t = time.monotonic()
            for archive_id, info in plan.archives.items():
                result = extract(archive_id, info, index_spool, codec, path, str(staging), found.manifest.binding_of(info.key))
                mismatches += result["mismatches"]
            links = make_links_and_dirs((e for e in load_index(index_spool, codec, unwrap) if selector(path)(e)),
                                        staging, allow_escaping_links)
            apply_metadata((e for e in load_index(index_spool, codec, unwrap) if selector(path)(e)), staging, os.geteuid() == 0)
            timings["extract"] = round(time.monotonic() - t, 3)
            if mismatches:
                raise VerificationError(f"{len(mismatches)} files of {found.backup_id} do not match the index; nothing was restored")

            t = time.monotonic()
            delivered = deliver(dest, str(staging), index_spool, codec, path, confirmed, stamp)
            if dest.consumes_staging:
                staging = None  # it is the destination now, or emptied and removed
            timings["deliver"] = round(time.monotonic() - t, 3)

            t = time.monotonic()
            verified = verify_restored(dest, index_spool, codec, path)
            timings["verify"] = round(time.monotonic() - t, 3)
            mismatches += verified["mismatches"]
            checks = [
                _check("files restored", plan.files, verified["checked"]),
                _check("md5 mismatches", 0, len(verified["mismatches"])),
                _check("symlinks made", plan.symlinks if dest.holds_links else links["symlinks"], links["symlinks"]),
            ]
            rto = time.monotonic() - t0
            _publish(plan, checks, mismatches, rto, settings.restore.rto_target_minutes * 60, timings, delivered)
            if mismatches or not all(c["ok"] for c in checks):
                raise VerificationError(f"restored files in {dest.label} failed the md5 check: {len(mismatches)} mismatches",
                                        hint="see the restore artifact for the list")
            outcome = {"status": "success", "rto_seconds": round(rto, 3)}
        except BaseException as exc:
            if events.is_verification_failure(exc):
                if not checks:
                    _publish(plan, checks, mismatches, time.monotonic() - t0, settings.restore.rto_target_minutes * 60, timings, {})
                events.verification_failed("restore", "files", source_name, str(exc), backup_id=found.backup_id,
                                           destination=dest.label)
            outcome = {"status": "failed", "error": redact(f"{type(exc).__name__}: {exc}")}
            raise
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
            _log(settings, plan, source_name, started, outcome, timings, checks, mismatches)
        events.restore_succeeded("files", source_name, found.backup_id, destination=dest.label, rto_seconds=outcome["rto_seconds"])
        logger.info("restore of %s into %s complete: %d files, md5 checked, in %.0fs", found.backup_id, dest.label,
                    plan.files, outcome["rto_seconds"])
        return {"backup_id": found.backup_id, "destination": dest.label, "path": path, "files": plan.files,
                "bytes": plan.bytes, "dirs": plan.dirs, "symlinks": links["symlinks"], "archives_read": len(plan.archives),
                "md5_checked": verified["checked"], "kept": delivered.get("kept"), "kept_in": delivered.get("kept_in"),
                "timings": timings, "rto_seconds": outcome["rto_seconds"]}


def _check(name: str, expected: Any, actual: Any) -> dict[str, Any]:
    return {"check": name, "expected": str(expected), "actual": str(actual), "ok": expected == actual}


def _publish(plan: Plan, checks: list[dict[str, Any]], mismatches: list[dict[str, Any]], rto: float, rto_target: float,
             timings: dict[str, float], delivered: dict[str, Any]) -> None:
    key = "".join(ch if ch.isalnum() else "-" for ch in f"files-restore-{plan.manifest.source.name}".lower())
    if mismatches:
        create_table_artifact(key=f"{key}-mismatches", table=mismatches[:1000],
                              description=f"Files of {plan.backup.backup_id} that do not match the backup ({len(mismatches)})")
    ok = not mismatches and all(c["ok"] for c in checks)
    lines = [
        f"## Restore of `{plan.backup.backup_id}` into `{plan.destination.label}`" + (f" (path `{plan.path_filter}`)" if plan.path_filter else ""),
        "",
        f"**{'All checks passed' if ok else 'CHECKS FAILED'}** — {plan.files} files ({plan.bytes} bytes), {plan.dirs} folders, "
        f"{plan.symlinks} symlinks, from {len(plan.archives)} archive(s)",
        "",
        f"RTO (start to verified): **{rto / 60:.1f} min** against the {rto_target / 60:.0f} min target",
        "",
        "| stage | seconds |", "|---|---:|", *[f"| {s} | {v:.1f} |" for s, v in timings.items()],
        "",
        "| check | expected | actual | ok |", "|---|---|---|---|",
        *[f"| {c['check']} | {c['expected']} | {c['actual']} | {'yes' if c['ok'] else '**NO**'} |" for c in checks],
    ]
    if delivered.get("kept_in"):
        lines += ["", f"Overwritten entries were kept in `{delivered['kept_in']}`."]
    if mismatches:
        lines += ["", f"### {len(mismatches)} mismatches", "", "| file | problem |", "|---|---|",
                  *[f"| `{m['path']}` | {m['problem']} |" for m in mismatches[:50]]]
    create_markdown_artifact(key=f"{key}-summary", markdown=redact("\n".join(lines)), description="Files restore summary")


def _log(settings: Settings, plan: Plan, source: str, started: datetime, outcome: dict[str, Any], timings: dict[str, float],
         checks: list[dict[str, Any]], mismatches: list[dict[str, Any]]) -> None:
    if not settings.log.enabled or not outcome:
        return
    a = plan.manifest.archive
    state = log_run(
        "restore", "files", plan.destination.label, source, outcome["status"], started, plan.backup.backup_id, a.key,
        str(flow_run.id) if flow_run.id else None, outcome.get("error"),
        {"timings": timings, "checks": checks, "mismatches": mismatches[:100], "path": plan.path_filter,
         "files": plan.files, "bytes": plan.bytes, "archives": list(plan.archives), "rto_seconds": outcome.get("rto_seconds")},
        {"size_encrypted": a.size_encrypted, "sha256_encrypted": a.sha256_encrypted, "key_id": a.encryption.key_id},
        return_state=True,
    )
    if not state.is_completed():
        get_run_logger().warning("restore log not written: %s", redact(str(state.result(raise_on_failure=False))))
