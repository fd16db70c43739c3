"""The PostgreSQL restore flow: download → decrypt → decompress → restore → verify, logged.

The backup is found from the manifests in storage alone, then streamed in one pass from storage
into ``pg_restore``, which writes only into a database this run created: every chunk is
authenticated before its plaintext moves on, and a stream that fails authentication, ends early
or does not match the manifest's checksums aborts ``pg_restore --single-transaction`` and drops
that database. Nothing of the backup touches the disk on the way: no ciphertext spool, no
plaintext dump (a parallel restore builds indexes and constraints from the dump's table of
contents, held in memory).

Nothing existing is overwritten by default: a restore goes into a new database. Replacing a
database needs ``mode='replace'`` and ``confirm`` naming it; the restore then goes into a new
database, is verified, and only then swapped in, the old one kept beside it under another name.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from luxima_backup import catalog, events, pg, runtime
from luxima_backup.catalog import Backup
from luxima_backup.envelope import DecryptingReader
from luxima_backup.manifest import DbManifest
from luxima_backup.errors import BackupError, ConfigError, IntegrityError, VerificationError, should_retry
from luxima_backup.pipes import Link
from luxima_backup.progress import Progress
from luxima_backup.secrets import install_log_redaction, redact
from luxima_backup.settings import Settings
from luxima_backup.stages import run_linked
from luxima_backup.compression import DecompressingReader
from luxima_backup.workdir import private_dir
from flows.common import flow
from tasks.compress import decompress
from tasks.decrypt import decrypt
from tasks.download import download_stream
from tasks.log import log_run
from tasks.restore import (
    ArchiveHead, apply_statements, create_database, database_exists, database_properties, drop_database, quote_ident, restore,
    restore_globals_sql, swap_databases,
)
from tasks.verify.readback import check_row
from tasks.verify.restored_db import verify_restored_db

MAX_IDENT = 63  # PostgreSQL truncates longer names


@dataclass
class Plan:
    """What one restore will do, decided and checked before anything is touched."""

    backup: Backup
    source: str
    target: str
    mode: str
    restore_into: str               # the database pg_restore writes (always created by this run)
    replaces: str | None = None     # mode replace: the database swapped out
    retired_as: str | None = None   # ... and the name it keeps afterwards
    schemas: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    jobs: int = 1
    expected_counts: dict[str, int] = field(default_factory=dict)
    table_names: dict[str, tuple[str, str]] = field(default_factory=dict)  # count key -> (schema, table)

    @property
    def selective(self) -> bool:
        return bool(self.schemas or self.tables)

    @property
    def manifest(self) -> DbManifest:
        assert isinstance(self.backup.manifest, DbManifest)  # plan_restore took only database backups
        return self.backup.manifest


def plan_restore(settings: Settings, backup: str, as_of: datetime | None, source: str | None, target: str | None,
                 target_database: str | None, mode: str, confirm: str | None, schemas: list[str], tables: list[str],
                 jobs: int | None, now: datetime) -> Plan:
    """Resolve the backup and check the parameters; every refusal says what to change."""
    source_name = source or settings.db_backup.database
    settings.database(source_name)  # an unknown section is refused here, naming the configured ones
    target_name = target or settings.restore.target or settings.db_backup.database
    target_cfg = settings.database(target_name)
    # Backups are filed by section; those filed by database name before (db/<dbname>/) are found too.
    found = runtime.catalog("db", settings).resolve("db", backup,
                            source=source_name, as_of=as_of,
                            also_under=catalog.legacy_folders(settings, "db", source_name))
    if not isinstance(found.manifest, DbManifest):
        raise ConfigError(f"{found.manifest_key} is not a database backup",
                          hint="name a backup listed by `luxima-backup list --component db`")
    stamp = now.strftime("%Y%m%d%H%M%S")
    tables = [t if "." in t else f"public.{t}" for t in tables]
    plan = Plan(found, source_name, target_name, mode, restore_into="", schemas=list(schemas), tables=tables,
                jobs=jobs or settings.restore.jobs)
    if mode == "new":
        plan.restore_into = target_database or f"{found.manifest.source.database}_restore_{stamp}"
    else:
        replaced = target_database or target_cfg.dbname
        if plan.selective:
            raise ConfigError("mode 'replace' restores whole databases",
                              hint="restore the tables into a new database (mode 'new') and copy the rows back")
        if confirm != replaced:
            raise ConfigError(f"replacing database {replaced!r} on {target_cfg.host}:{target_cfg.port} needs confirm = {replaced!r}",
                              hint="set confirm to the name of the database being replaced; it is kept, renamed, not dropped")
        if not database_exists(target_cfg, replaced):
            raise ConfigError(f"database {replaced!r} does not exist on {target_name}; nothing to replace",
                              hint="use mode 'new' to restore into a new database")
        plan.replaces, plan.retired_as = replaced, f"{replaced}_pre_restore_{stamp}"
        plan.restore_into = f"{replaced}_restoring_{stamp}"
    for name in filter(None, (plan.restore_into, plan.retired_as)):
        if len(name.encode()) > MAX_IDENT:
            raise ConfigError(f"database name {name!r} is longer than {MAX_IDENT} bytes", hint="set a shorter target_database")
    counted: dict[str, int] = dict(found.manifest.row_counts)
    if plan.selective:
        counted = {t: n for t, n in counted.items() if t in tables or t.split(".", 1)[0] in schemas}
        unknown = [t for t in tables if t not in found.manifest.row_counts]
        if unknown:
            get_run_logger().warning("tables not counted at backup time, restored unchecked: %s", ", ".join(unknown))
    plan.expected_counts = counted
    plan.table_names = {k: (v.schema_name, v.name) for k, v in found.manifest.tables.items()}
    return plan


@task(name="restore-globals", cache_policy=NO_CACHE, persist_result=False)
def restore_globals(target: str, globals_key: str, codec: str, dump_major: int, expect: dict[str, str] | None) -> dict[str, Any]:
    """Create the roles of the backed-up cluster (pg_dumpall --globals-only) on the target server."""
    settings = runtime.settings()
    cfg = settings.database(target)
    with runtime.store(settings).load(globals_key) as body:
        text = DecompressingReader(DecryptingReader(body, runtime.key_provider(settings).unwrap, expect=expect, where=globals_key),  # type: ignore[arg-type]
                                   codec).read()  # type: ignore[arg-type]
    tool = pg.find_tool("psql", dump_major, settings.db_backup.pg_bin_dir)
    existing = restore_globals_sql(tool, cfg, text)
    return {"statements_skipped": len(existing)}


@flow(name="db-restore", task_runner=ThreadPoolTaskRunner(max_workers=4), validate_parameters=True, persist_result=True)
def db_restore(
    backup: str = "latest",
    as_of: datetime | None = None,
    source: str | None = None,
    target: str | None = None,
    target_database: str | None = None,
    mode: Literal["new", "replace"] = "new",
    confirm: str | None = None,
    schemas: list[str] | None = None,
    tables: list[str] | None = None,
    jobs: int | None = None,
    restore_globals_first: bool = False,
    no_owner: bool = False,
) -> dict[str, Any]:
    """Restore a PostgreSQL backup into a new database (default) or in place of one, then verify it.

    Args:
        backup: "latest" (newest verified backup), a backup id, or an object key of the backup.
        as_of: with "latest": the newest verified backup completed at or before this time.
        source: which [databases.NAME] the backup was taken of (default: db_backup.database).
        target: which [databases.NAME] server to restore into (default: restore.target).
        target_database: name of the database to create (mode new) or to replace (mode replace).
        mode: "new" creates a database and never touches existing ones; "replace" swaps the restored database in.
        confirm: for mode "replace": must be the exact name of the database being replaced.
        schemas: restore only these schemas (into a new database).
        tables: restore only these tables, as schema.table, with their rows (into a new database; pg_restore -t
            brings the table and its data, not its indexes or constraints: enough to copy rows back).
        jobs: connections loading the rows at once, then pg_restore jobs for indexes and constraints (default:
            restore.jobs); 1 restores through one pg_restore stream.
        restore_globals_first: create the backed-up roles on the target server first (off by default).
        no_owner: restore without ownership and privileges (when the roles do not exist on the target).
    """
    with runtime.time_limit(lambda s: s.restore.timeout_seconds, "db-restore"):  # read from the settings at run time
        t0 = time.monotonic()
        started = datetime.now(timezone.utc)
        settings = runtime.settings()
        install_log_redaction()
        logger = get_run_logger()
        plan = plan_restore(settings, backup, as_of, source, target, target_database, mode, confirm,
                            list(schemas or []), list(tables or []), jobs, started)
        doc = plan.manifest
        dump_info = doc.dump
        codec = dump_info.compression.codec
        dump_major = int(str(doc.tool["pg_dump_version"]).split(".")[0])
        logger.info("restoring %s (%s) into %s on %s%s", plan.backup.backup_id, dump_info.key, plan.restore_into,
                    plan.target, f", then replacing {plan.replaces}" if plan.replaces else "")
        target_cfg = settings.database(plan.target)
        timings: dict[str, float] = {}
        checks: list[dict[str, Any]] = []
        created = False
        keep_for_inspection = False  # only a database that was restored whole and then failed a check is kept
        work = private_dir(settings.work_dir, "restore-")
        outcome: dict[str, Any] = {}
        try:
            if restore_globals_first:
                if not doc.globals.key:
                    raise ConfigError(f"backup {plan.backup.backup_id} has no globals: {doc.globals.warning or ''}")
                restore_globals(plan.target, doc.globals.key, codec, dump_major, doc.binding_of(doc.globals.key))

            create_database(target_cfg, plan.restore_into)
            created = True
            head = ArchiveHead()
            passed = _restore_pass(settings, plan, codec, dump_major, no_owner, target_cfg, head)
            timings.update(passed["timings"])
            checks.append(check_row("sha256 of the stored object", dump_info.sha256_encrypted, passed["sha256_encrypted"]))
            checks.append(check_row("sha256 of the dump", dump_info.sha256_plain, passed["plain_sha256"]))
            checks.append(check_row("size of the dump", dump_info.size_plain, passed["plain_bytes"]))
            if passed["plain_sha256"] != dump_info.sha256_plain or passed["plain_bytes"] != dump_info.size_plain:
                # Every chunk authenticated, yet not the dump the manifest describes: what went in is not trusted.
                raise IntegrityError(f"the decrypted dump of {plan.backup.backup_id} does not match its manifest; the "
                                     f"database restored from it is dropped", hint="restore another backup")
            properties = _database_properties(settings, plan, work, head, dump_major, no_owner, target_cfg)
            if not plan.replaces:
                apply_statements(target_cfg, properties, plan.restore_into)

            t = time.monotonic()
            with stage_limit("verify"):
                checks += verify_restored_db(plan.target, plan.restore_into, plan.expected_counts, plan.table_names)
            timings["verify"] = round(time.monotonic() - t, 3)
            rto = time.monotonic() - t0
            rto_target = settings.restore.rto_target_minutes * 60
            _publish(plan, checks, rto, rto_target, timings)
            failed = [c["check"] for c in checks if not c["ok"]]
            if failed:
                keep_for_inspection = True
                raise VerificationError(f"restored database {plan.restore_into} failed checks: {', '.join(failed)}",
                                        hint="see the restore artifact; the database is kept for inspection")
            if plan.replaces:
                assert plan.retired_as is not None
                swap_databases(target_cfg, plan.restore_into, plan.replaces, plan.retired_as, properties)
                logger.info("%s now holds the restored data; the previous database is kept as %s", plan.replaces, plan.retired_as)
            outcome = {"status": "success", "rto_seconds": round(rto, 3), "rto_target_seconds": rto_target}
        except BaseException as exc:
            if events.is_verification_failure(exc):
                events.verification_failed("restore", "db", plan.source, str(exc), backup_id=plan.backup.backup_id,
                                           database=plan.restore_into)
            if created and not keep_for_inspection:
                _drop_quietly(target_cfg, plan.restore_into, logger)
            outcome = {"status": "failed", "error": redact(f"{type(exc).__name__}: {exc}")}
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
            _log(settings, plan, started, outcome, timings, checks)
        database = plan.replaces or plan.restore_into
        events.restore_succeeded("db", plan.source, plan.backup.backup_id, database=database, rto_seconds=outcome["rto_seconds"])
        summary = {
            "backup_id": plan.backup.backup_id, "object_key": dump_info.key, "database": database,
            "target": plan.target, "mode": plan.mode, "retired_database": plan.retired_as,
            "checks_passed": len(checks), "timings": timings, **{k: v for k, v in outcome.items() if k != "status"},
        }
        logger.info("restore of %s complete: %s verified in %.0fs (RTO target %.0f min)", plan.backup.backup_id, database,
                    outcome["rto_seconds"], settings.restore.rto_target_minutes)
        return summary


def _restore_pass(settings: Settings, plan: Plan, codec: str, dump_major: int, no_owner: bool, target_cfg: Any,
                  head: ArchiveHead) -> dict[str, Any]:
    """One pass, storage to database: download → decrypt → decompress → pg_restore, all streaming at once.

    Each chunk is authenticated before its plaintext moves on; a stream that fails authentication, ends
    early or breaks kills pg_restore before its transaction commits. Transient failures (a connection
    cut mid-stream) start the whole pass over on an emptied database.
    """
    dump = plan.manifest.dump
    attempts = settings.restore.attempts
    for attempt in range(1, attempts + 1):
        t = time.monotonic()
        try:
            with stage_limit(f"restore attempt {attempt}"):
                links = fetched, decrypted, dumped = (Link("download→decrypt"), Link("decrypt→decompress"),
                                                      Link("decompress→restore"))
                dl: dict[str, Any] = {}

                def submit(fs: list[Any]) -> None:
                    fs.append(decrypt.submit(fetched, decrypted))
                    fs.append(decompress.submit(decrypted, codec, sink=dumped,
                                                progress=Progress(f"restore into {plan.restore_into}", dump.size_plain)))
                    fs.append(restore.submit(plan.target, plan.restore_into, dump_major, plan.jobs, plan.schemas,
                                             plan.tables, no_owner, source=dumped, head=head))
                    # The download runs in the flow's own thread: a stage limit's signal interrupts a read that
                    # storage holds there (a worker thread would wait for the storage client's own timeouts).
                    dl.update(download_stream(dump.key, fetched, dump.size_encrypted, dump.sha256_encrypted,
                                              expect=plan.manifest.binding_of(dump.key)))

                dec, plain, restored = run_linked(submit, list(links))
            get_run_logger().info("downloaded, decrypted and restored %s (%d bytes; sha256 matches the manifest)",
                                  dump.key, dl["bytes"])
            timings = {"download": dl["seconds"], "decrypt": dec["seconds"], "decompress": plain["seconds"],
                       "restore": round(time.monotonic() - t, 3)}
            if "rows" in restored:
                timings["rows (parallel)"] = restored["rows"]["seconds"]
            if "post_data_seconds" in restored:
                timings["post-data (parallel)"] = restored["post_data_seconds"]
            return {"timings": timings, "sha256_encrypted": dl["sha256"], "plain_sha256": plain["plain_sha256"],
                    "plain_bytes": plain["plain_bytes"]}
        except BackupError as exc:
            if attempt == attempts or not should_retry(exc):
                raise
            get_run_logger().warning("restore attempt %d/%d failed with a transient error (%s); starting over", attempt, attempts, exc)
            drop_database(target_cfg, plan.restore_into)
            create_database(target_cfg, plan.restore_into)
    raise AssertionError("unreachable")


def _database_properties(settings: Settings, plan: Plan, work: Any, head: ArchiveHead, dump_major: int, no_owner: bool,
                         target_cfg: Any) -> list[str]:
    """The backed-up database's own properties (owner, ACL, settings, comment, connection limit) for the database this
    restore leaves in place, from the dump's table of contents; none for a selective restore, which goes into a
    scratch database for copying rows."""
    if plan.selective:
        return []
    tool = pg.find_tool("pg_restore", dump_major, settings.db_backup.pg_bin_dir)
    statements = database_properties(tool, head.open, str(work), plan.manifest.source.database,
                                      plan.replaces or plan.restore_into, quote_ident(target_cfg), no_owner)
    get_run_logger().info("%d database-level statement(s) from the backup (owner, grants, settings, comment)", len(statements))
    return statements


def stage_limit(stage: str) -> Any:
    """One stage of a restore, bounded by restore.stage_timeout_seconds (within the run's own limit)."""
    return runtime.time_limit(lambda s: s.restore.stage_timeout_seconds, stage, "restore.stage_timeout_seconds")


def _drop_quietly(cfg: Any, dbname: str, logger: Any) -> None:
    try:
        drop_database(cfg, dbname)
        logger.info("dropped %s, created by this failed restore", dbname)
    except Exception as exc:  # the failure that brought us here matters more
        logger.warning("could not drop %s after the failed restore: %s", dbname, exc)


def _publish(plan: Plan, checks: list[dict[str, Any]], rto: float, rto_target: float, timings: dict[str, float]) -> None:
    """The restore's artifacts: the table of checks, and the RTO against its target."""
    key = "".join(ch if ch.isalnum() else "-" for ch in f"db-restore-{plan.target}".lower())
    create_table_artifact(key=key, table=checks, description=f"Checks of {plan.restore_into} from {plan.backup.backup_id}")
    ok = all(c["ok"] for c in checks)
    lines = [
        f"## Restore of `{plan.backup.backup_id}` into `{plan.restore_into}`" + (f" (replacing `{plan.replaces}`)" if plan.replaces else ""),
        "",
        f"**{'All checks passed' if ok else 'CHECKS FAILED'}** — {sum(c['ok'] for c in checks)}/{len(checks)}",
        "",
        f"RTO (start to verified): **{rto / 60:.1f} min** against the {rto_target / 60:.0f} min target "
        f"({'within' if rto <= rto_target else 'OVER'})",
        "",
        "| stage | seconds |",
        "|---|---:|",
        *[f"| {stage} | {secs:.1f} |" for stage, secs in timings.items()],
        "",
        "| check | expected | actual | ok |",
        "|---|---|---|---|",
        *[f"| {c['check']} | {c['expected']} | {c['actual']} | {'yes' if c['ok'] else '**NO**'} |" for c in checks],
    ]
    create_markdown_artifact(key=f"{key}-summary", markdown=redact("\n".join(lines)), description="Restore summary and RTO")


def _log(settings: Settings, plan: Plan, started: datetime, outcome: dict[str, Any], timings: dict[str, float],
         checks: list[dict[str, Any]]) -> None:
    """One row in internal.backup_logs for this restore; a log failure is only a warning."""
    if not settings.log.enabled or not outcome:
        return
    dump_info = plan.manifest.dump
    state = log_run(
        "restore", "db", f"{plan.target}/{plan.replaces or plan.restore_into}", plan.source, outcome["status"], started,
        plan.backup.backup_id, dump_info.key, str(flow_run.id) if flow_run.id else None, outcome.get("error"),
        {"timings": timings, "checks": checks, "mode": plan.mode, "restored_into": plan.restore_into,
         "retired_database": plan.retired_as, "rto_seconds": outcome.get("rto_seconds")},
        {"size_raw": dump_info.size_plain, "size_encrypted": dump_info.size_encrypted,
         "sha256_raw": dump_info.sha256_plain, "sha256_encrypted": dump_info.sha256_encrypted,
         "key_id": dump_info.encryption.key_id},
        return_state=True,
    )
    if not state.is_completed():
        get_run_logger().warning("restore log not written: %s", redact(str(state.result(raise_on_failure=False))))
