"""Dump stage: pg_dump (custom format, uncompressed) of one consistent snapshot, plus its row counts.

The snapshot is exported from a REPEATABLE READ transaction that stays open for the whole dump;
pg_dump imports it (``--snapshot``) and the row counts are taken in that same transaction, so a
restore can be compared with the counts exactly.
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

from prefect import get_run_logger, task
from psycopg import IsolationLevel
from prefect.cache_policies import NO_CACHE

from luxima_backup import pg, runtime
from luxima_backup.errors import ToolError
from luxima_backup.pipes import Link
from luxima_backup.secrets import redact
from luxima_backup.settings import PostgresConnection

def pg_dump_args(snapshot: str, dbname: str) -> list[str]:
    # Custom format: restorable selectively and in parallel. -Z0: we compress, better and faster.
    return ["--format=custom", "--compress=0", f"--snapshot={snapshot}", f"--dbname={dbname}"]


def dump_database(cfg: PostgresConnection, sink: Link, bin_dir: Any = None) -> dict[str, Any]:
    """Dump ``cfg``'s database into ``sink`` and count its main tables in the same snapshot."""
    started = time.monotonic()
    conn = None
    process: pg.ClientProcess | None = None
    try:
        conn = pg.connect(cfg, autocommit=False)
        info = pg.server_info(conn)
        tool = pg.find_tool("pg_dump", info.major, bin_dir)
        with pg.translate_errors("exporting a snapshot"):
            conn.rollback()  # end the transaction the version query opened
            conn.isolation_level = IsolationLevel.REPEATABLE_READ  # one snapshot for the whole transaction
            conn.read_only = True
            row = conn.execute("SELECT pg_export_snapshot()").fetchone()
        assert row is not None
        snapshot = str(row[0])
        tables = pg.main_tables(conn, cfg)
        process = pg.start_client(tool, cfg, pg_dump_args(snapshot, cfg.dbname), stdout=sink.take_write_fd())
        sink.close_write()  # pg_dump alone holds the write end now: its exit is our EOF
        counts = pg.count_rows(conn, tables)  # runs on the server's other core while pg_dump streams
        rc = process.wait()
        process.check(rc)
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
        "server_version": info.version, "server_version_num": info.version_num,
        "pg_dump": tool.path, "pg_dump_version": tool.version,
        "snapshot": snapshot, "row_counts": counts, "seconds": time.monotonic() - started,
    }


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
        proc = subprocess.run(
            [tool.path, "--no-password", f"--database={cfg.dbname}", *args],
            capture_output=True, env=pg.libpq_env(cfg), stdin=subprocess.DEVNULL, timeout=600, check=False,
        )
        if proc.returncode == 0:
            if len(proc.stdout) > GLOBALS_LIMIT:
                return None, f"pg_dumpall output is over {GLOBALS_LIMIT} bytes; globals not kept"
            note = None if args == attempts[0] else "roles dumped without passwords (the server refused pg_authid)"
            return proc.stdout, note
        last = redact(proc.stderr.decode(errors="replace").strip()[-1000:])
        if pg.is_transient_text(last):
            raise ToolError(f"pg_dumpall failed: {last}", transient=True)
    return None, f"globals (roles) not dumped: {last}"


@task(name="dump", cache_policy=NO_CACHE)
def dump(database: str, sink: Link) -> dict[str, Any]:
    """pg_dump one consistent snapshot of the database into the pipeline."""
    settings = runtime.settings()
    result = dump_database(settings.database(database), sink, settings.db_backup.pg_bin_dir)
    get_run_logger().info(
        "dumped %s with pg_dump %s (server %s); %d tables counted",
        database, result["pg_dump_version"], result["server_version"], len(result["row_counts"]),
    )
    return result
