"""The file-storage backup flow: sync → archive → compress → encrypt → upload → verify → manifest, logged.

Each source is first brought into a persistent local staging mirror (rsync, or a bucket sync), so
a day moves only what changed. The mirror is then archived as tar; archive | compress | encrypt |
upload stream concurrently through OS pipes, retried together (``files-backup-stream``) on
transient errors only. Full archives alternate with incremental ones that hold only new and
changed files; every backup's index lists every file (path, size, mtime, mode, md5, sha256) and
which archive holds it, and its manifest names every archive a restore needs.

A source that vanished, came back empty, or lost more files than its threshold fails the run
(an alert), and the mirror keeps what it had.
"""

from __future__ import annotations

import shutil
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from luxima_backup import __version__, catalog, events, manifest, runtime
from luxima_backup.compression import SUFFIX
from luxima_backup.errors import BackupError, SourceError, VerificationError, is_transient
from luxima_backup.pipes import Link
from luxima_backup.progress import Progress
from luxima_backup.secrets import install_log_redaction, redact
from luxima_backup.settings import FileSource, Settings
from luxima_backup.stages import run_linked
from flows.common import backup_start, discard, flow, logged, outcome, save_manifest, sealed_with, stream_with_retries
from luxima_backup.workdir import private_dir
from tasks.archive import archive
from tasks.compress import compress
from tasks.download import download
from tasks.encrypt import encrypt
from tasks.log import log_finish, log_start
from tasks.sync import sync
from tasks.upload import upload
from tasks.verify.file_archive import chain_gaps, verify_archive_stream, verify_file_archive



_STAGE_SETTING = "files_backup.stage_timeout_seconds"


def _stage_limit(settings: Settings) -> float:
    """Read at run time, so a run started from the UI uses the settings the worker has now."""
    return settings.files_backup.stage_timeout_seconds

@flow(name="files-backup-stream", task_runner=ThreadPoolTaskRunner(max_workers=5), validate_parameters=False, persist_result=False)
def archive_to_storage(source: str, backup_id: str, object_key: str, index_key: str, index_spool: str,
                       previous_index: dict[str, Any] | None, full: bool, expected_bytes: int | None, deep: bool,
                       attempt: int = 1) -> dict[str, Any]:
    """One attempt at streaming the mirror to storage: archive | compress | encrypt | upload (and, with ``deep``, a
    check of the ciphertext beside the upload, which must pass before the upload completes)."""
    cfg = runtime.settings().files_backup
    links = [tarred, packed, sealed] = [Link("archive→compress"), Link("compress→encrypt"), Link("encrypt→upload")]
    checked = Link("encrypt→verify") if deep else None
    if checked is not None:
        links.append(checked)
    bind = manifest.binding(backup_id, "files", source, object_key)
    Path(index_spool).unlink(missing_ok=True)  # left by a failed attempt
    # A full archive holds about the source's bytes; an incremental one an unknown part of them.
    progress = Progress(f"{'full' if full else 'incremental'} archive of {source}", expected_bytes if full else None,
                        estimated=True)

    def submit(futures: list[Any]) -> None:
        futures.append(archive.submit(source, tarred, backup_id, index_spool, previous_index, full,
                                      manifest.binding(backup_id, "files", source, index_key)))
        futures.append(compress.submit(tarred, packed, cfg.compression, cfg.effective_level, cfg.threads, progress))
        futures.append(encrypt.submit(packed, sealed, "tar archive of files", bind, checked))
        futures.append(upload.submit(sealed, object_key))
        if checked is not None:
            futures.append(verify_archive_stream.submit(checked, cfg.compression, bind))

    a, c, e, u, *v = run_linked(submit, links)
    return {"archive": a, "compress": c, "encrypt": e, "upload": u, "verify": v[0] if v else None}


@task(name="upload-index", cache_policy=NO_CACHE, persist_result=False, **runtime.TRANSIENT_RETRIES)
def upload_index(index_spool: str, object_key: str, size: int) -> dict[str, Any]:
    """Upload the encrypted file index; ``verify_file_archive`` then confirms storage holds it as written."""
    store = runtime.store()
    with open(index_spool, "rb") as f:
        info = store.save(object_key, f)  # type: ignore[arg-type]
    if info.size != size:
        raise VerificationError(f"storage reports {info.size} bytes for {object_key}, {size} were written")
    return {"size": info.size, "proven_etag": info.etag if info.proven else None}


def previous_backup(settings: Settings, source: str) -> catalog.Backup | None:
    """The newest verified backup of ``source``: the base of an incremental, and what 'changed' is measured against."""
    found = [b for b in runtime.catalog("files", settings).list_backups("files", source) if b.verified]
    return found[-1] if found else None


def wants_full(settings: Settings, previous: catalog.Backup | None, now: datetime, forced: bool) -> tuple[bool, str]:
    every = settings.files_backup.full_every_days
    if forced:
        return True, "full requested"
    if previous is None:
        return True, "no earlier verified backup"
    if every == 0:
        return True, "files_backup.full_every_days = 0"
    if previous.manifest.archive.compression.codec != settings.files_backup.compression:
        return True, "compression changed"
    full_at = previous.manifest.full_completed_at
    if now - full_at >= timedelta(days=every):
        return True, f"the last full archive is older than {every} days"
    return False, f"incremental on {previous.backup_id}"


def check_counts(name: str, source: FileSource, files: int, previous_files: int | None, allow_shrink: bool) -> None:
    """A vanished or emptied source is a failure worth an alert, never an empty "successful" backup."""
    if files < source.min_files:
        raise SourceError(f"source {name} has {files} files, fewer than its min_files = {source.min_files}",
                          hint="check the source (an unmounted volume? a wrong path?); set min_files = 0 if empty is expected")
    if previous_files and not allow_shrink:
        floor = previous_files * (1 - source.max_shrink_percent / 100)
        if files < floor:
            raise SourceError(
                f"source {name} has {files} files, the last backup had {previous_files}: more than "
                f"{source.max_shrink_percent:g}% are gone",
                hint="if they were removed on purpose, run once with allow_shrink = true",
            )


@flow(name="files-backup-source", validate_parameters=False, persist_result=False)
def backup_source(name: str, full: bool = False, allow_shrink: bool = False) -> dict[str, Any]:
    """Back up one file source: sync into its mirror, archive, encrypt, upload, verify, manifest, log."""
    settings = runtime.settings()
    install_log_redaction()
    logger = get_run_logger()
    cfg = settings.files_backup
    source = settings.file_source(name)
    started = backup_start(runtime.store(settings), settings.storage.prefix, "files", name, settings.work_dir)
    t0 = time.monotonic()
    keys = manifest.files_keys(settings.storage.prefix, name, started, SUFFIX[cfg.compression])
    run_id = str(flow_run.id) if flow_run.id else None
    marks: dict[str, float] = {}  # the steps around the stages, timed (since t0) for the manifest too
    previous = previous_backup(settings, name)
    is_full, why = wants_full(settings, previous, started, full)
    previous_files = previous.manifest.totals["files"] if previous else None
    # rsync's --max-delete counts folders and links as well as files
    previous_entries = sum(previous.manifest.totals.get(k, 0) for k in ("files", "dirs", "symlinks")) if previous else None
    logger.info("backing up %s (%s): %s", name, "full" if is_full else "incremental", why)

    entry = None
    if settings.log.enabled:
        entry = logged(log_start, "start", "backup", "files", name, keys.backup_id, keys.archive, run_id)
    uploaded: list[str] = []
    work = private_dir(settings.work_dir, "files-backup-")
    lock = None
    try:
        if source.direct:
            # Archived in place: no staging copy to fill, so no mirror to guard. A vanished or shrunken source is
            # caught by the counts of what was archived, before any manifest is written.
            synced = _direct_source(name, source)
        else:
            lock = _lock_mirror(settings, name)
            with runtime.time_limit(_stage_limit, f"mirror of {name}", _STAGE_SETTING):
                synced = sync(name, previous_entries, allow_shrink)
            check_counts(name, source, synced["regular_files"], previous_files, allow_shrink)
        marks["synced"] = time.monotonic()
        previous_index = None
        if previous is not None:
            previous_index, is_full, why = _previous_index(previous, work, is_full, why)
        if previous is not None and not is_full:
            is_full, why = _chain_intact(previous, is_full, why)
        marks["previous"] = time.monotonic()
        index_spool = str(work / "index.enc")
        stream = stream_with_retries(archive_to_storage, (name, keys.backup_id, keys.archive, keys.index, index_spool, previous_index,
                                                          is_full, synced.get("total_bytes"), cfg.deep_verify),
                                     cfg.attempts, cfg.retry_delay_seconds, _stage_limit, _STAGE_SETTING)
        uploaded.append(keys.archive)
        a, c, e, u = stream["archive"], stream["compress"], stream["encrypt"], stream["upload"]
        if e["encrypted_sha256"] != u["sha256"] or e["encrypted_bytes"] != u["bytes"]:
            raise BackupError("the bytes uploaded differ from the bytes encrypted")
        check_counts(name, source, a["totals"]["files"], previous_files, allow_shrink)
        if source.direct:
            ch = a["changes"]
            synced.update(files=a["totals"]["files"], regular_files=a["totals"]["files"], total_bytes=a["totals"]["bytes"],
                          transferred_files=ch["added"] + ch["changed"], transferred_bytes=ch["added_bytes"] + ch["changed_bytes"],
                          deleted_files=ch["removed"])
        if "changed_while_read" in a:
            synced["changed_while_read"] = a["changed_while_read"]
        index_info = manifest.FileIndex(key=keys.index, **a["index"])
        uploaded.append(keys.index)
        index_stored = upload_index(index_spool, keys.index, index_info.size_encrypted)
        this_archive = manifest.FileArchive(
            key=keys.archive, format="tar-pax", compression=manifest.Compression(codec=c["codec"], level=c["level"]),
            encryption=sealed_with(e), size_plain=c["plain_bytes"], size_compressed=c["compressed_bytes"],
            size_encrypted=u["bytes"], sha256_plain=c["plain_sha256"], sha256_encrypted=u["sha256"],
            files=a["stored"]["files"], bytes=a["stored"]["bytes"], bound=e["bound"])
        older = _older_archives(previous, is_full)
        marks["streamed"] = time.monotonic()
        with runtime.time_limit(_stage_limit, f"verify of {name}", _STAGE_SETTING):
            verification = verify_file_archive(keys.backup_id, this_archive, index_info, index_spool, older, cfg.deep_verify,
                                               {keys.archive: u["proven_etag"], keys.index: index_stored["proven_etag"]},
                                               stream["verify"])
        marks["verified"] = time.monotonic()
        finished = datetime.now(timezone.utc)
        document = manifest.FilesManifest(
            backup_id=keys.backup_id, status="verified", started_at=started, completed_at=finished,
            recovery_key_id=runtime.recovery_key_id(settings),
            source=manifest.FilesSource(name=name, kind=source.kind, host=source.host, path=source.path, bucket=source.bucket),
            tool={"luxima_backup": __version__},
            type="full" if is_full else "incremental", reason=why,
            previous=previous.backup_id if previous else None,
            full_completed_at=finished if is_full or previous is None else previous.manifest.full_completed_at,
            archive=this_archive, index=index_info,
            archives={**older, keys.backup_id: manifest.StoredObject(
                key=this_archive.key, compression=this_archive.compression, size_encrypted=this_archive.size_encrypted,
                sha256_encrypted=this_archive.sha256_encrypted, bound=this_archive.bound)},
            totals=a["totals"], changes=a["changes"], sync=synced,
            verification={**verification, "verified_at": finished.isoformat()},
            timings={"sync": synced["seconds"], "archive": round(a["seconds"], 3),
                     "compress": round(c["seconds"], 3), "encrypt": round(e["seconds"], 3),
                     "upload": round(u["seconds"], 3),
                     # the rest of the run, step by step: up to the sync's end less the sync (the previous backup
                     # found, the log's first row), the previous index and the chain checked, the stream's attempts
                     # and the index's upload, the read-back
                     "start": round(marks["synced"] - t0 - synced["seconds"], 3),
                     "previous": round(marks["previous"] - marks["synced"], 3),
                     "stream": round(marks["streamed"] - marks["previous"], 3),
                     "verify": round(marks["verified"] - marks["streamed"], 3),
                     "total": round((finished - started).total_seconds(), 3)},
            flow_run_id=run_id,
        )
        save_manifest(keys.manifest, document)
    except BaseException as exc:
        if events.is_verification_failure(exc) or isinstance(exc, SourceError):
            events.verification_failed("backup", "files", name, str(exc), backup_id=keys.backup_id)
        discard(uploaded, logger, manifest_key=keys.manifest)
        logged(log_finish, "finish", entry, name, "failed", redact(f"{type(exc).__name__}: {exc}"),
                {"elapsed_seconds": round(time.monotonic() - t0, 3)}, {}, "files", skip=entry is None)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if lock is not None:
            lock.close()
    seconds = time.monotonic() - t0
    _publish(document, seconds)
    logged(log_finish, "finish", entry, name, "success", None,
            {"type": document.type, "totals": document.totals, "changes": document.changes,
             "sync": synced, "timings": document.timings},
            {"object_key": keys.archive, "size_raw": c["plain_bytes"], "size_compressed": c["compressed_bytes"],
             "size_encrypted": u["bytes"], "sha256_raw": c["plain_sha256"], "sha256_encrypted": u["sha256"],
             "key_id": e["key"]["key_id"]}, "files", skip=entry is None)
    events.backup_succeeded("files", name, keys.backup_id, object_key=keys.archive, size_encrypted=u["bytes"])
    logger.info("backup %s complete: %d files, %s (%d bytes encrypted)", keys.backup_id, document.totals["files"],
                keys.archive, u["bytes"])
    return {"backup_id": keys.backup_id, "type": document.type, "manifest_key": keys.manifest,
            "object_key": keys.archive, "totals": document.totals, "changes": document.changes,
            "stored": a["stored"], "transferred_files": synced["transferred_files"],
            "transferred_bytes": synced["transferred_bytes"], "size_encrypted": u["bytes"], "seconds": round(seconds, 3)}


@flow(name="files-backup", validate_parameters=True, persist_result=True)
def files_backup(sources: list[str] | None = None, full: bool = False, allow_shrink: bool = False) -> dict[str, Any]:
    """Back up the configured file sources (object-storage files, directories on hosts) to storage, encrypted and verified.

    Args:
        sources: which [files_backup.sources.NAME] to back up (default: all of them).
        full: write a full archive even when an incremental one is due.
        allow_shrink: accept a source that lost more files than its max_shrink_percent (files removed on purpose).
    """
    with runtime.time_limit(lambda s: s.files_backup.timeout_seconds, "files-backup"):  # read from the settings at run time
        settings = runtime.settings()
        names = list(sources or settings.files_backup.sources)
        if not names:
            from luxima_backup.errors import ConfigError

            raise ConfigError("no file sources configured", hint="add [files_backup.sources.NAME] sections to the settings")
        for n in names:
            settings.file_source(n)  # every name checked before any work starts
        results: dict[str, Any] = {}
        failures: dict[str, BaseException] = {}
        for n in names:
            result, exc = outcome(backup_source(n, full, allow_shrink, return_state=True))
            if exc is None:
                results[n] = result
            else:
                failures[n] = exc
        if failures:
            detail = "; ".join(f"{n}: {redact(str(exc))}" for n, exc in failures.items())
            first = next(iter(failures.values()))
            raise type(first)(f"file backup failed for {', '.join(failures)}: {detail}") if isinstance(first, BackupError) \
                else BackupError(f"file backup failed for {', '.join(failures)}: {detail}")
        return results


def _direct_source(name: str, source: FileSource) -> dict[str, Any]:
    """The sync statistics of a source archived in place (filled in from the archive's counts)."""
    if not Path(source.path).is_dir():
        raise SourceError(f"source {name}: {source.path} does not exist or is not a directory",
                          hint="the source vanished (an unmounted volume?); the backups are untouched")
    return {"tool": "none (archived in place)", "files": 0, "regular_files": 0, "transferred_files": 0,
            "transferred_bytes": 0, "deleted_files": 0, "seconds": 0.0}


def _lock_mirror(settings: Settings, name: str) -> Any:
    """Hold the source's mirror for this run: two runs syncing and archiving one mirror would mix their trees."""
    import fcntl

    from tasks.sync import mirror_path

    path = mirror_path(settings, name).with_suffix(".lock")
    f = open(path, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise BackupError(f"another backup of {name} is running (it holds {path})",
                          hint="wait for it to finish; this run changed nothing") from None
    return f


def _previous_index(previous: catalog.Backup, work: Path, is_full: bool, why: str) -> tuple[dict[str, Any] | None, bool, str]:
    """Fetch the previous backup's index, to diff against and (incremental) to carry unchanged files over.

    An index that cannot be read (its key retired, the object gone or damaged) makes this run a
    full one, with a warning, rather than a failure: the new backup does not depend on it then.
    """
    from luxima_backup.errors import IntegrityError, KeyProviderError, ObjectNotFound

    from tasks.archive import load_index

    idx = previous.manifest.index
    spool = str(work / "previous-index.enc")
    try:
        download(idx.key, spool, idx.size_encrypted, idx.sha256_encrypted, expect=previous.manifest.binding_of(idx.key))
        codec = idx.compression.codec
        next(iter(load_index(spool, codec, runtime.key_provider().unwrap)), None)  # unwraps the key, checks the first chunk
        return {"spool": spool, "codec": codec}, is_full, why
    except (IntegrityError, KeyProviderError, ObjectNotFound) as exc:
        if is_transient(exc):  # Vault down: the next attempt may read it; a full archive is no answer
            raise
        get_run_logger().warning("the index of %s cannot be read (%s); writing a full archive", previous.backup_id, exc)
        return None, True, f"the index of {previous.backup_id} cannot be read"


def _chain_intact(previous: catalog.Backup, is_full: bool, why: str) -> tuple[bool, str]:
    """An incremental backup reads every archive of the previous chain: one missing or damaged (deleted by
    hand, by a lifecycle rule) would make it unrestorable, so this run writes a full archive instead."""
    gaps = chain_gaps(runtime.store(), previous.manifest.archives)
    broken = [f"{backup_id} ({'missing' if size is None else 'damaged'})" for backup_id, (_, size) in gaps.items()]
    if not broken:
        return is_full, why
    get_run_logger().warning("the chain of %s is broken: the archives of %s; writing a full archive",
                             previous.backup_id, ", ".join(broken))
    return True, f"the archives of {', '.join(broken)} are not in storage as recorded"


def _older_archives(previous: catalog.Backup | None, full: bool) -> dict[str, manifest.StoredObject]:
    """The archives of earlier backups an incremental one still reads (all of the previous chain; a superset is safe)."""
    if full or previous is None:
        return {}
    return dict(previous.manifest.archives)


def _publish(doc: manifest.FilesManifest, seconds: float) -> None:
    """The run's artifact: counts, sizes, throughput, and what changed since the last backup."""
    a, t, ch, sy = doc.archive, doc.totals, doc.changes, doc.sync
    mib = 1024 * 1024
    lines = [
        f"## File backup `{doc.backup_id}` ({doc.type})",
        "",
        f"Source `{doc.source.name}` ({doc.source.kind}): **{t['files']} files**, {t['dirs']} folders, "
        f"{t['symlinks']} symlinks, {t['bytes'] / mib:.1f} MiB" + (f"; {t['skipped_special']} special files skipped" if t["skipped_special"] else ""),
        "",
        f"Sync ({sy['tool']}): {sy['transferred_files']} files transferred ({sy['transferred_bytes'] / mib:.1f} MiB), "
        f"{sy['deleted_files']} deleted, in {sy['seconds']:.1f}s",
        "",
        f"Archive `{a.key}`: {a.files} files stored ({a.bytes / mib:.1f} MiB); tar {a.size_plain} bytes → "
        f"{a.compression.codec} {a.size_compressed} → encrypted {a.size_encrypted} bytes, key `{a.encryption.key_id}`",
        "",
        f"Restores read {len(doc.archives)} archive(s). Took {seconds:.1f}s "
        f"({a.size_plain / mib / seconds if seconds else 0:.1f} MiB/s of tar).",
        "",
        "### Changes since the previous backup" + (f" `{doc.previous}`" if doc.previous else " (none: everything is new)"),
        "",
        "| change | entries | bytes |",
        "|---|---:|---:|",
        f"| added | {ch['added']} | {ch['added_bytes']} |",
        f"| changed | {ch['changed']} | {ch['changed_bytes']} |",
        f"| removed | {ch['removed']} | |",
        f"| unchanged | {ch['unchanged']} | |",
    ]
    if sy.get("changed_while_read"):
        c = sy["changed_while_read"]
        lines += ["", f"**{c['count']} file(s) changed while they were read** (stored as read; the next run stores them "
                  "again):", "", *[f"- `{f}`" for f in c["files"]]]
    key = "".join(ch_ if ch_.isalnum() else "-" for ch_ in f"files-backup-{doc.source.name}".lower())
    create_markdown_artifact(key=key, markdown=redact("\n".join(lines)), description=f"Backup {doc.backup_id}")
