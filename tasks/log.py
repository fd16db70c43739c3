"""Log stage: one row per run in ``internal.backup_logs``, written as ``backup_admin``.

The row is inserted as ``running`` when a run starts and updated when it ends. Logging is
best effort by design: a log that cannot be written is reported as a warning and never
changes the outcome of the backup itself.
"""

from __future__ import annotations

import importlib.resources
import json
from typing import Any

import psycopg
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from luxima_backup import pg, runtime
from luxima_backup.errors import DatabaseError
from luxima_backup.secrets import redact
from luxima_backup.settings import PostgresConnection, Settings

LOCK_ID = 0x4C75_7869_6D61  # advisory lock serialising concurrent migrations ("Luxima")
ROLE = "backup_admin"


def migrations() -> list[tuple[str, str]]:
    """(name, SQL) of every shipped migration, in order."""
    files = importlib.resources.files("luxima_backup.migrations")
    return sorted((f.name, f.read_text()) for f in files.iterdir() if f.name.endswith(".sql"))


def migrate(conn: psycopg.Connection) -> list[str]:
    """Apply the migrations not yet applied; returns their names. Idempotent and concurrency-safe."""
    applied: list[str] = []
    with pg.translate_errors("applying the backup log migrations"), conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_ID,))
        conn.execute("CREATE SCHEMA IF NOT EXISTS internal")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS internal.backup_log_migrations"
            " (name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        conn.execute("REVOKE ALL ON internal.backup_log_migrations FROM PUBLIC")
        done = {r[0] for r in conn.execute("SELECT name FROM internal.backup_log_migrations").fetchall()}
        for name, text in migrations():
            if name not in done:
                conn.execute(text)  # type: ignore[arg-type]  # shipped SQL, not user input
                conn.execute("INSERT INTO internal.backup_log_migrations (name) VALUES (%s)", (name,))
                applied.append(name)
    return applied


def log_database(settings: Settings, target: str, component: str = "db") -> PostgresConnection:
    """The database holding the log: log.database, else the database backed up (or, for files and
    configs, whose targets are not databases, db_backup.database)."""
    if settings.log.database:
        return settings.database(settings.log.database)
    return settings.database(target if component == "db" else settings.db_backup.database)


def _connect_as_admin(cfg: PostgresConnection) -> psycopg.Connection:
    conn = pg.connect(cfg)
    try:
        with pg.translate_errors(f"switching to role {ROLE}"):
            conn.execute(f"SET ROLE {ROLE}")
    except DatabaseError as exc:
        conn.close()
        raise DatabaseError(f"{exc.message}", hint=f"GRANT {ROLE} TO {cfg.user}; only {ROLE} may write the backup log") from None
    return conn


def start_entry(cfg: PostgresConnection, *, kind: str, component: str, target: str, backup_id: str | None,
                object_key: str | None, flow_run_id: str | None, apply_migrations: bool) -> int:
    if apply_migrations:
        with pg.connect(cfg) as conn:
            migrate(conn)
    with _connect_as_admin(cfg) as conn, pg.translate_errors("inserting into internal.backup_logs"):
        row = conn.execute(
            "INSERT INTO internal.backup_logs (kind, component, target, backup_id, object_key, flow_run_id)"
            " VALUES (%s, %s, %s, %s, %s, %s) RETURNING id",
            (kind, component, target, backup_id, object_key, flow_run_id),
        ).fetchone()
    assert row is not None
    return int(row[0])


_FIELDS = ("object_key", "size_raw", "size_compressed", "size_encrypted", "sha256_raw", "sha256_encrypted", "key_id")


def finish_entry(cfg: PostgresConnection, entry_id: int, *, status: str, error: str | None = None,
                 details: dict[str, Any] | None = None, **fields: Any) -> None:
    unknown = set(fields) - set(_FIELDS)
    if unknown:
        raise ValueError(f"unknown log fields {unknown}")
    sets = ", ".join(f"{name} = COALESCE(%({name})s, {name})" for name in _FIELDS)
    params = {name: fields.get(name) for name in _FIELDS}
    params.update(id=entry_id, status=status, error=redact(error) if error else None,
                  details=json.dumps(details or {}, default=str))
    with _connect_as_admin(cfg) as conn, pg.translate_errors("updating internal.backup_logs"):
        conn.execute(
            f"UPDATE internal.backup_logs SET status = %(status)s, error = %(error)s, {sets},"
            " finished_at = now(), duration_ms = (extract(epoch FROM now() - started_at) * 1000)::bigint,"
            " details = details || %(details)s::jsonb WHERE id = %(id)s",
            params,
        )


@task(name="log", cache_policy=NO_CACHE, persist_result=False, **runtime.TRANSIENT_RETRIES)
def log_start(kind: str, component: str, target: str, backup_id: str | None, object_key: str | None,
              flow_run_id: str | None) -> int:
    """Record the run as ``running`` in internal.backup_logs."""
    settings = runtime.settings()
    entry = start_entry(
        log_database(settings, target, component), kind=kind, component=component, target=target, backup_id=backup_id,
        object_key=object_key, flow_run_id=flow_run_id, apply_migrations=settings.log.apply_migrations,
    )
    get_run_logger().info("backup log entry %d (%s %s %s) started", entry, kind, component, target)
    return entry


@task(name="log", cache_policy=NO_CACHE, persist_result=False, **runtime.TRANSIENT_RETRIES)
def log_finish(entry_id: int, target: str, status: str, error: str | None, details: dict[str, Any],
               fields: dict[str, Any], component: str = "db") -> None:
    """Record the run's outcome in internal.backup_logs."""
    finish_entry(log_database(runtime.settings(), target, component), entry_id, status=status, error=error, details=details, **fields)


def record_entry(cfg: PostgresConnection, *, kind: str, component: str, target: str, status: str,
                 started_at: Any, backup_id: str | None, object_key: str | None, flow_run_id: str | None,
                 error: str | None, details: dict[str, Any], apply_migrations: bool, **fields: Any) -> int:
    """Insert one complete row for a run that has ended (restores, whose target may be replaced mid-run)."""
    if apply_migrations:
        with pg.connect(cfg) as conn:
            migrate(conn)
    entry = start_entry(cfg, kind=kind, component=component, target=target, backup_id=backup_id,
                        object_key=object_key, flow_run_id=flow_run_id, apply_migrations=False)
    with _connect_as_admin(cfg) as conn, pg.translate_errors("updating internal.backup_logs"):
        conn.execute("UPDATE internal.backup_logs SET started_at = %s WHERE id = %s", (started_at, entry))
    finish_entry(cfg, entry, status=status, error=error, details=details, **fields)
    return entry


@task(name="log", cache_policy=NO_CACHE, persist_result=False, **runtime.TRANSIENT_RETRIES)
def log_run(kind: str, component: str, target: str, log_target: str, status: str, started_at: Any,
            backup_id: str | None, object_key: str | None, flow_run_id: str | None, error: str | None,
            details: dict[str, Any], fields: dict[str, Any]) -> int:
    """Record a finished run (its outcome, stage timings and checks) in internal.backup_logs."""
    settings = runtime.settings()
    entry = record_entry(
        log_database(settings, log_target, component), kind=kind, component=component, target=target, status=status,
        started_at=started_at, backup_id=backup_id, object_key=object_key, flow_run_id=flow_run_id, error=error,
        details=details, apply_migrations=settings.log.apply_migrations, **fields,
    )
    get_run_logger().info("backup log entry %d (%s %s %s): %s", entry, kind, component, target, status)
    return entry
