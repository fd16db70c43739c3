"""Dump stage: pg_dump (custom format, uncompressed) of one consistent snapshot, plus its row counts.

The snapshot is exported from a REPEATABLE READ transaction that stays open for the whole dump;
pg_dump imports it (``--snapshot``) and the row counts are taken in that same transaction, so a
restore can be compared with the counts exactly.
"""

from __future__ import annotations

import re
import time
from typing import Any

from prefect import get_run_logger, task
from psycopg import IsolationLevel
from psycopg import sql as psql
from prefect.cache_policies import NO_CACHE

from luxima_backup import pg, procs, runtime
from luxima_backup.errors import ToolError
from luxima_backup.pipes import Link
from luxima_backup.secrets import redact
from luxima_backup.settings import PostgresConnection

def pg_dump_args(snapshot: str, conninfo: str, lock_wait_seconds: float, exclude_schemas: list[str] = ()) -> list[str]:  # type: ignore[assignment]
    # Custom format: restorable selectively and in parallel. -Z0: we compress, better and faster.
    # --create: the archive also carries the database's own properties (owner, ACL, ALTER DATABASE/ROLE ... SET,
    # comment, connection limit), which pg_restore applies only when asked; a restore uses them (tasks/restore.py).
    args = ["--format=custom", "--compress=0", "--create", f"--snapshot={snapshot}",
            f"--lock-wait-timeout={int(lock_wait_seconds * 1000)}", f"--dbname={conninfo}"]
    return args + [f"--exclude-schema={s}" for s in exclude_schemas]


_LOCK_QUERY_RE = re.compile(r"Query was: LOCK TABLE (.+) IN ACCESS SHARE MODE")


def dump_database(cfg: PostgresConnection, sink: Link, bin_dir: Any = None, lock_wait_seconds: float = 120) -> dict[str, Any]:
    """Dump ``cfg``'s database into ``sink`` and count its main tables in the same snapshot."""
    started = time.monotonic()
    conn = None
    process: pg.ClientProcess | None = None
    try:
        conn = pg.connect(cfg, autocommit=False)
        info = pg.server_info(conn)
        system_id = pg.system_identifier(conn)
        tool = pg.find_tool("pg_dump", info.major, bin_dir)
        with pg.translate_errors("exporting a snapshot"):
            conn.rollback()  # end the transaction the version queries opened
            conn.isolation_level = IsolationLevel.REPEATABLE_READ  # one snapshot for the whole transaction
            conn.read_only = True
            # Counting waits for locks as pg_dump does: boundedly (an ALTER TABLE would otherwise hang us forever).
            conn.execute(psql.SQL("SET lock_timeout = {}").format(psql.Literal(f"{int(lock_wait_seconds * 1000)}ms")))
            row = conn.execute("SELECT pg_export_snapshot()").fetchone()
        assert row is not None
        snapshot = str(row[0])
        tables = pg.main_tables(conn, cfg)
        large_objects = pg.large_object_count(conn)
        process = pg.start_client(tool, cfg, pg_dump_args(snapshot, pg.client_conninfo(cfg), lock_wait_seconds, list(cfg.exclude_schemas)),
                                  stdout=sink.take_write_fd())
        sink.close_write()  # pg_dump alone holds the write end now: its exit is our EOF
        with procs.cancellable(conn.cancel_safe):  # a stopped run must not wait out a lock here
            counts = pg.count_rows(conn, tables, cfg)  # runs on the server's other core while pg_dump streams
        rc = process.wait()
        _check_dump(process, rc, cfg)
    except BaseException as exc:
        if process is not None:
            process.kill()
        sink.fail(exc)  # the stages downstream must see a failure, never a clean EOF
        raise
    finally:
        if conn is not None:
            conn.close()
    sink.succeed()
    return {
        "server_version": info.version, "server_version_num": info.version_num, "system_identifier": system_id,
        "pg_dump": tool.path, "pg_dump_version": tool.version,
        "snapshot": snapshot, "row_counts": counts, "seconds": time.monotonic() - started,
        "tables": [{"schema": t.schema, "name": t.name, "kind": t.kind, "data_oids": list(t.data_oids)} for t in tables],
        "large_objects": large_objects,
    }


def _check_dump(process: pg.ClientProcess, rc: int, cfg: PostgresConnection) -> None:
    """pg_dump's exit: a lock it could not get in time becomes an error naming who holds it."""
    if rc != 0:
        text = "\n".join(process.stderr)
        m = _LOCK_QUERY_RE.search(text)
        if m and "lock timeout" in text:
            raise pg.lock_wait_error(cfg, m.group(1), "pg_dump waited to lock it")
    process.check(rc)


GLOBALS_LIMIT = 64 * 1024 * 1024  # roles and tablespaces only; far more means something is wrong


def dump_globals(cfg: PostgresConnection, server_major: int, bin_dir: Any = None) -> tuple[bytes | None, str | None]:
    """``pg_dumpall --globals-only`` output, or (None, warning) when the server refuses it.

    Managed servers (Supabase among them) deny reading pg_authid; then roles are dumped
    without their passwords, and if even that is refused, a warning is returned instead.
    """
    tool = pg.find_tool("pg_dumpall", server_major, bin_dir)
    attempts = [["--globals-only"], ["--globals-only", "--no-role-passwords"]]
    last = ""
    for args in attempts:
        with pg.client_env(cfg) as env:
            # --database (-l) is read as a connection string once it holds "=" (pg_dumpall ignores the database of
            # --dbname's): a name given bare could carry keywords; given as a connection string, it cannot.
            proc = procs.run([tool.path, "--no-password", f"--database={pg.client_conninfo(cfg)}", *args],
                             env=env, timeout=600)
        if proc.returncode == 0:
            if len(proc.stdout) > GLOBALS_LIMIT:
                return None, f"pg_dumpall output is over {GLOBALS_LIMIT} bytes; globals not kept"
            note = None if args == attempts[0] else "roles dumped without passwords (the server refused pg_authid)"
            return proc.stdout, note
        last = redact(proc.stderr.decode(errors="replace").strip()[-1000:])
        if pg.is_transient_text(last):
            raise ToolError(f"pg_dumpall failed: {last}", transient=True)
    return None, f"globals (roles) not dumped: {last}"


@task(name="dump", cache_policy=NO_CACHE, persist_result=False)
def dump(database: str, sink: Link) -> dict[str, Any]:
    """pg_dump one consistent snapshot of the database into the pipeline."""
    settings = runtime.settings()
    result = dump_database(settings.database(database), sink, settings.db_backup.pg_bin_dir,
                           settings.db_backup.lock_wait_timeout_seconds)
    get_run_logger().info(
        "dumped %s with pg_dump %s (server %s); %d tables counted",
        database, result["pg_dump_version"], result["server_version"], len(result["row_counts"]),
    )
    foreign = [f"{t['schema']}.{t['name']}" for t in result["tables"] if t["kind"] == "f"]
    if foreign:  # not an error: their data is another server's; the backup holds their definitions
        get_run_logger().warning("foreign tables, whose rows are not in the dump: %s", ", ".join(foreign))
    return result
