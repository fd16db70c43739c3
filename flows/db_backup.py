"""The PostgreSQL backup flow: dump → compress → encrypt → upload → verify → manifest, logged.

The four streaming stages run concurrently as separate tasks joined by OS pipes, so plaintext
never touches disk and memory stays bounded; with the deep verify, a fifth checks a copy of the
ciphertext as it uploads. A stage cannot be retried alone once its input stream is consumed, so
they are retried together: each attempt is one run of the ``db-backup-stream`` subflow, and only
transient failures start another attempt.
"""

from __future__ import annotations

import hashlib
import time
from datetime import datetime, timezone
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from luxima_backup import __version__, events, manifest, pg, runtime
from luxima_backup.progress import Progress
from luxima_backup.envelope import encrypt_bytes
from luxima_backup.errors import BackupError
from luxima_backup.pipes import Link
from luxima_backup.recovery import header_seal
from luxima_backup.secrets import install_log_redaction, redact
from luxima_backup.settings import PostgresConnection
from luxima_backup.stages import run_linked
from luxima_backup.compression import SUFFIX, compressor
from flows.common import backup_start, discard, flow, logged, save_manifest, sealed_with, stream_with_retries
from tasks.compress import compress
from tasks.dump import dump, dump_globals
from tasks.encrypt import encrypt
from tasks.log import log_finish, log_start
from tasks.upload import upload
from tasks.verify.dump import verify_dump, verify_stream
from tasks.verify.readback import confirm_stored


@flow(name="db-backup-stream", task_runner=ThreadPoolTaskRunner(max_workers=5), validate_parameters=False, persist_result=False)
def dump_to_storage(database: str, object_key: str, binding: dict[str, str], deep: bool, attempt: int = 1) -> dict[str, Any]:
    """One attempt at streaming the database to storage: dump | compress | encrypt | upload (and, with ``deep``, a
    check of the ciphertext beside the upload, which must pass before the upload completes)."""
    settings = runtime.settings()
    cfg = settings.db_backup
    links = [dumped, packed, sealed] = [Link("dump→compress"), Link("compress→encrypt"), Link("encrypt→upload")]
    checked = Link("encrypt→verify") if deep else None
    if checked is not None:
        links.append(checked)

    progress = Progress(f"dump of {database}", pg.database_size(settings.database(database)), estimated=True)

    def submit(futures: list[Any]) -> None:
        futures.append(dump.submit(database, dumped))
        futures.append(compress.submit(dumped, packed, cfg.compression, cfg.effective_level, cfg.threads, progress))
        futures.append(encrypt.submit(packed, sealed, "pg_dump custom archive", binding, checked))
        futures.append(upload.submit(sealed, object_key))
        if checked is not None:
            futures.append(verify_stream.submit(checked, cfg.compression, binding))

    d, c, e, u, *v = run_linked(submit, links)
    return {"dump": d, "compress": c, "encrypt": e, "upload": u, "verify": v[0] if v else None}


@task(name="dump-globals", cache_policy=NO_CACHE, persist_result=False, **runtime.TRANSIENT_RETRIES)
def backup_globals(database: str, server_major: int, object_key: str, binding: dict[str, str]) -> dict[str, Any]:
    """Dump roles and tablespaces (pg_dumpall --globals-only), encrypted, beside the backup."""
    settings = runtime.settings()
    text, warning = dump_globals(settings.database(database), server_major, settings.db_backup.pg_bin_dir)
    if text is None:
        get_run_logger().warning("%s", warning)
        return {"warning": warning}
    comp = compressor(settings.db_backup.compression, settings.db_backup.effective_level, 1)  # a few KiB of SQL
    packed = comp.compress(text) + comp.flush()
    data_key = runtime.key_provider(settings).new_data_key()
    blob = encrypt_bytes(packed, data_key.plaintext, data_key.wrapped, settings.keys.chunk_kib * 1024, {"content": "pg_dumpall globals", **binding,
                                      **header_seal(settings.keys.recovery_public_key, data_key.plaintext, object_key)})
    store = runtime.store(settings)
    saved = store.save_bytes(object_key, blob)
    result = {"key": object_key, "plain_bytes": len(text), "encrypted_bytes": len(blob),
              "encrypted_sha256": hashlib.sha256(blob).hexdigest(), "plain_sha256": hashlib.sha256(text).hexdigest(),
              "bound": True}
    confirm_stored(store, object_key, result["encrypted_bytes"], result["encrypted_sha256"], saved.etag if saved.proven else None)
    if warning:
        get_run_logger().warning("%s", warning)
        result["warning"] = warning
    return result


@flow(name="db-backup", validate_parameters=True, persist_result=True)
def db_backup(database: str | None = None, deep_verify: bool | None = None) -> dict[str, Any]:
    """Back up one configured PostgreSQL database to object storage, encrypted, verified and logged.

    Args:
        database: which [databases.NAME] of the settings to back up (default: db_backup.database).
        deep_verify: after upload, also decrypt, decompress and parse the dump (default: settings).
    """
    with runtime.time_limit(lambda s: s.db_backup.timeout_seconds, "db-backup"):  # read from the settings at run time
        settings = runtime.settings()
        install_log_redaction()
        logger = get_run_logger()
        cfg = settings.db_backup
        name = database or cfg.database
        target = settings.database(name)
        deep = cfg.deep_verify if deep_verify is None else deep_verify
        started = backup_start(runtime.store(settings), settings.storage.prefix, "db", name, settings.work_dir)
        t0 = time.monotonic()
        # Named by the settings' section, not the database: every Supabase project's database is called postgres.
        keys = manifest.db_keys(settings.storage.prefix, name, started, SUFFIX[cfg.compression])
        run_id = str(flow_run.id) if flow_run.id else None

        entry = None
        if settings.log.enabled:
            entry = logged(log_start, "start", "backup", "db", name, keys.backup_id, keys.data, run_id)
        uploaded: list[str] = []
        try:
            stream = stream_with_retries(dump_to_storage, (name, keys.data, manifest.binding(keys.backup_id, "db", name, keys.data), deep),
                                         cfg.attempts, cfg.retry_delay_seconds,
                                         lambda s: s.db_backup.stage_timeout_seconds, "db_backup.stage_timeout_seconds")
            uploaded.append(keys.data)
            d, c, e, u = stream["dump"], stream["compress"], stream["encrypt"], stream["upload"]
            expected = {"encrypted_bytes": u["bytes"], "encrypted_sha256": u["sha256"], "proven_etag": u["proven_etag"],
                        "plain_bytes": c["plain_bytes"], "plain_sha256": c["plain_sha256"]}
            if e["encrypted_sha256"] != u["sha256"] or e["encrypted_bytes"] != u["bytes"]:
                raise BackupError("the bytes uploaded differ from the bytes encrypted")
            globals_info: dict[str, Any] = {"warning": "disabled by db_backup.globals"}
            if cfg.globals:
                globals_info = backup_globals(name, d["server_version_num"] // 10000, keys.globals,
                                              manifest.binding(keys.backup_id, "db", name, keys.globals))
                if "key" in globals_info:
                    uploaded.append(keys.globals)
            with runtime.time_limit(lambda s: s.db_backup.stage_timeout_seconds, "verify", "db_backup.stage_timeout_seconds"):
                verification = verify_dump(keys.data, expected, stream["verify"], d["tables"], d["large_objects"])
            finished = datetime.now(timezone.utc)
            document = _manifest(keys, name, target, started, finished, d, c, e, u, globals_info, verification, run_id)
            save_manifest(keys.manifest, document)
        except BaseException as exc:
            if events.is_verification_failure(exc):
                events.verification_failed("backup", "db", name, str(exc), backup_id=keys.backup_id)
            discard(uploaded, logger, manifest_key=keys.manifest)
            logged(log_finish, "finish", entry, name, "failed", redact(f"{type(exc).__name__}: {exc}"),
                    {"elapsed_seconds": round(time.monotonic() - t0, 3)}, {}, skip=entry is None)
            raise
        summary = _summary(document, keys.manifest, time.monotonic() - t0)
        _publish(document, summary, name)
        logged(log_finish, "finish", entry, name, "success", None, {"row_counts": d["row_counts"], "timings": document.timings},
                {"object_key": keys.data, "size_raw": c["plain_bytes"], "size_compressed": c["compressed_bytes"],
                 "size_encrypted": u["bytes"], "sha256_raw": c["plain_sha256"], "sha256_encrypted": u["sha256"],
                 "key_id": e["key"]["key_id"]}, skip=entry is None)
        events.backup_succeeded("db", name, keys.backup_id, object_key=keys.data, size_encrypted=u["bytes"])
        logger.info("backup %s complete: %s (%s bytes encrypted)", keys.backup_id, keys.data, u["bytes"])
        return summary


def _manifest(keys: manifest.BackupKeys, name: str, target: PostgresConnection, started: datetime, finished: datetime,
              d: dict[str, Any], c: dict[str, Any], e: dict[str, Any], u: dict[str, Any], g: dict[str, Any],
              verification: dict[str, Any], run_id: str | None) -> manifest.DbManifest:
    return manifest.DbManifest(
        backup_id=keys.backup_id, status="verified", started_at=started, completed_at=finished,
        recovery_key_id=runtime.recovery_key_id(),
        source=manifest.DbSource(
            name=name, database=target.dbname, host=target.host, port=target.port,
            system_identifier=d["system_identifier"], server_version=d["server_version"],
            server_version_num=d["server_version_num"], snapshot=d["snapshot"], exclude_schemas=list(target.exclude_schemas)),
        tool={"luxima_backup": __version__, "pg_dump_version": d["pg_dump_version"]},
        dump=manifest.DataObject(
            key=keys.data, format="pg_dump-custom", compression=manifest.Compression(codec=c["codec"], level=c["level"]),
            encryption=sealed_with(e), size_plain=c["plain_bytes"], size_compressed=c["compressed_bytes"],
            size_encrypted=u["bytes"], sha256_plain=c["plain_sha256"], sha256_encrypted=u["sha256"], bound=e["bound"]),
        globals=manifest.DbGlobals(**g),
        row_counts=d["row_counts"],
        tables={f"{t['schema']}.{t['name']}": manifest.Table(schema=t["schema"], name=t["name"], kind=t["kind"],
                                                             partitions=len(t["data_oids"]) if t["kind"] == "p" else None)
                for t in d["tables"]},
        large_objects=d["large_objects"],
        verification={**verification, "verified_at": finished.isoformat()},
        timings={"dump": round(d["seconds"], 3), "compress": round(c["seconds"], 3),
                 "encrypt": round(e["seconds"], 3), "upload": round(u["seconds"], 3),
                 "total": round((finished - started).total_seconds(), 3)},
        flow_run_id=run_id,
    )


def _summary(doc: manifest.DbManifest, manifest_key: str, seconds: float) -> dict[str, Any]:
    dump_info = doc.dump
    return {
        "backup_id": doc.backup_id, "object_key": dump_info.key, "manifest_key": manifest_key,
        "size_plain": dump_info.size_plain, "size_compressed": dump_info.size_compressed,
        "size_encrypted": dump_info.size_encrypted, "sha256_plain": dump_info.sha256_plain,
        "sha256_encrypted": dump_info.sha256_encrypted, "row_counts": doc.row_counts,
        "key_id": dump_info.encryption.key_id, "timings": doc.timings, "seconds": round(seconds, 3),
    }


def _publish(doc: manifest.DbManifest, summary: dict[str, Any], name: str) -> None:
    """The run's artifact in the Prefect UI: sizes, ratio, stage speeds, checksums, row counts."""
    d = doc.dump
    mib = 1024 * 1024
    ratio = d.size_plain / d.size_compressed if d.size_compressed else 0.0
    lines = [
        f"## Database backup `{doc.backup_id}`",
        "",
        f"Object `{d.key}` — key `{d.encryption.key_id}`, {d.compression.codec} level {d.compression.level}, ratio {ratio:.2f}×",
        "",
        "| stage | seconds | MiB/s |",
        "|---|---:|---:|",
    ]
    for stage, size in (("dump", d.size_plain), ("compress", d.size_plain), ("encrypt", d.size_compressed), ("upload", d.size_encrypted)):
        secs = doc.timings[stage]
        lines.append(f"| {stage} | {secs:.2f} | {size / mib / secs if secs else 0:.1f} |")
    lines += [
        f"| total | {doc.timings['total']:.2f} | |",
        "",
        "| size | bytes | sha256 |",
        "|---|---:|---|",
        f"| raw dump | {d.size_plain} | `{d.sha256_plain}` |",
        f"| compressed | {d.size_compressed} | |",
        f"| encrypted | {d.size_encrypted} | `{d.sha256_encrypted}` |",
        "",
        f"Verification: {'deep (decrypt, decompress, pg_restore --list)' if doc.verification.get('deep') else 'size and sha256'} — passed",
        "",
        "| table | rows |",
        "|---|---:|",
    ]
    lines += [f"| {t} | {n} |" for t, n in doc.row_counts.items()]
    foreign = [k for k, t in doc.tables.items() if t.kind == "f"]
    if foreign:
        lines += ["", f"Foreign tables (their rows live on another server and are not in a dump): {', '.join(foreign)}"]
    if doc.globals.warning:
        lines += ["", f"Warning: {doc.globals.warning}"]
    create_markdown_artifact(
        key=f"db-backup-{_artifact_key(name)}", markdown=redact("\n".join(lines)), description=f"Backup {summary['backup_id']}",
    )


def _artifact_key(name: str) -> str:
    # Artifact keys allow lowercase letters, digits and dashes only.
    return "".join(ch if ch.isalnum() else "-" for ch in name.lower())
