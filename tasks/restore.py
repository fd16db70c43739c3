"""Restore stage: pg_restore into a database created for it, and the swap that replaces a database.

One job: pg_restore with ``--exit-on-error`` and ``--single-transaction`` on the stream. More: the schema
from the dump's table of contents, the rows from the stream over several connections (``pg_rows``), then
indexes and constraints with ``pg_restore --jobs``; a dump whose rows cannot go that way (a selective
restore, rows compressed by pg_dump, data entries ``pg_rows`` does not know) has schema and rows in one
transaction from the stream. Either way a restore that hit any error fails instead of "succeeding" with
missing data, and the database it created is dropped. Only databases created by the restore are ever
dropped; a replaced database is renamed aside, never dropped.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import time
from typing import Any, Callable

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from psycopg import sql

from luxima_backup import pg, pg_archive, pg_rows, procs, runtime
from luxima_backup.errors import ConfigError, DatabaseError, ToolError
from luxima_backup.pipes import Link, drain
from luxima_backup.secrets import redact
from luxima_backup.settings import PostgresConnection


def on_database(cfg: PostgresConnection, dbname: str) -> PostgresConnection:
    """The same server and credentials, another database."""
    return cfg.model_copy(update={"dbname": dbname})


def _maintenance(cfg: PostgresConnection) -> Any:
    # Databases are created, renamed and dropped from another one: never from themselves, and
    # the configured database may be the one being replaced, or gone altogether.
    return pg.connect(on_database(cfg, cfg.maintenance_db))


def database_exists(cfg: PostgresConnection, dbname: str) -> bool:
    with _maintenance(cfg) as conn, pg.translate_errors(f"looking up database {dbname}"):
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone() is not None


def create_database(cfg: PostgresConnection, dbname: str) -> None:
    """Create an empty ``dbname`` from template0 (no local additions of template1 to collide with)."""
    with _maintenance(cfg) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone():
            raise ConfigError(f"database {dbname} already exists on {cfg.host}:{cfg.port}",
                              hint="choose another target_database, or mode='replace' with confirm naming it")
        with pg.translate_errors(f"creating database {dbname}"):
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(dbname)))


def drop_database(cfg: PostgresConnection, dbname: str) -> None:
    """Drop a database this restore created (never one it did not)."""
    with _maintenance(cfg) as conn, pg.translate_errors(f"dropping database {dbname}"):
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))


def swap_databases(cfg: PostgresConnection, restored: str, target: str, retired: str, properties: list[str]) -> None:
    """Put ``restored`` in the place of ``target``; the old ``target`` stays, renamed ``retired``.

    New connections to both are refused first, in a committed step, so pools that reconnect cannot get in
    between the end of their sessions and the renames. Both renames and the database's own properties
    (``properties``: owner, ACL, settings, comment, connection limit, as ``database_properties`` read them from
    the backup) commit together, and only then does the database named ``target`` accept connections again.
    The old database keeps its data and refuses connections, so applications cannot keep writing to it by
    mistake; drop it once the restore is accepted. On any failure the original is left as it was.
    """
    with _maintenance(cfg) as conn:
        with pg.translate_errors(f"reading database {target}"):
            row = conn.execute("SELECT datallowconn FROM pg_database WHERE datname = %s", (target,)).fetchone()
        allowed = bool(row and row[0])
        block = sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false")
        with pg.translate_errors(f"refusing new connections to {target}"):
            conn.execute(block.format(sql.Identifier(target)))  # autocommit: in force before any session ends
            conn.execute(block.format(sql.Identifier(restored)))
        try:
            for attempt in range(10):
                try:
                    with pg.translate_errors(f"replacing database {target}"):
                        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                     " WHERE datname = ANY(%s) AND pid <> pg_backend_pid()", ([target, restored],))
                        with conn.transaction():
                            conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(target), sql.Identifier(retired)))
                            conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(restored), sql.Identifier(target)))
                            for statement in properties:
                                conn.execute(statement.encode())
                            conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {}").format(
                                sql.Identifier(target), sql.SQL("true" if allowed else "false")))
                    return
                except DatabaseError as exc:
                    # A session still ending (terminate is asynchronous): try again shortly.
                    if "is being accessed by other users" not in str(exc) or attempt == 9:
                        raise
                    time.sleep(0.5)
        except BaseException:
            with contextlib.suppress(Exception):  # the original is still `target`: let its clients back in
                conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {}").format(
                    sql.Identifier(target), sql.SQL("true" if allowed else "false")))
            raise


# pg_restore -C -l lines of the database's own entries: "3380; 1262 16384 DATABASE - x owner",
# "3381; 0 0 DATABASE PROPERTIES - x owner", "3382; 0 0 COMMENT - DATABASE x owner", "3383; 0 0 ACL - DATABASE x owner".
_DB_ENTRY = re.compile(r"^\s*\d+;\s+\d+\s+\d+\s+(?:DATABASE|DATABASE PROPERTIES|(?:COMMENT|ACL|SECURITY LABEL) - DATABASE)\b")
_SKIP = ("--", "\\", "SET ", "SELECT pg_catalog.set_config", "CREATE DATABASE ")


def database_properties(tool: pg.Tool, read_dump: Callable[[], Any], work: str, source_db: str, target_db: str,
                        quote: Callable[[str], str], no_owner: bool) -> list[str]:
    """The statements that give ``target_db`` the properties the backed-up database had, from the dump itself.

    They are what ``pg_restore --create`` would run (owner, ACL, ``ALTER DATABASE … SET``, ``ALTER ROLE … IN
    DATABASE … SET``, comment, connection limit, security labels) minus the CREATE and \\connect, naming
    ``target_db`` instead of ``source_db``. Dumps made without --create carry none: the list is empty.
    ``read_dump`` opens the plaintext dump from its start; only its table of contents is read.
    """
    with contextlib.closing(read_dump()) as dump:
        listing = pg.pg_restore_output(tool, ["--create", "--list"], dump).decode(errors="replace")
    entries = [line for line in listing.splitlines() if _DB_ENTRY.match(line)]
    if not entries:
        return []
    list_file = f"{work}/database-entries.list"
    with open(list_file, "w") as f:
        f.write("\n".join(entries) + "\n")
    args = ["--create", f"--use-list={list_file}", "--file=-"] + (["--no-owner", "--no-privileges"] if no_owner else [])
    with contextlib.closing(read_dump()) as dump:
        script = pg.pg_restore_output(tool, args, dump).decode()
    old, new = f"DATABASE {quote(source_db)}", f"DATABASE {quote(target_db)}"
    statements: list[str] = []
    current: list[str] = []
    for line in script.splitlines():
        if not current and (not line.strip() or line.startswith(_SKIP)):
            continue
        current.append(line)
        if line.rstrip().endswith(";"):
            statement = "\n".join(current)
            if old not in statement:  # (its text is not shown: ALTER DATABASE … SET values can be secrets)
                raise ToolError(f"a statement among the database's properties does not name {old}",
                                hint="restore without replace mode and set the database's properties by hand")
            statements.append(statement.replace(old, new, 1))  # the first: a comment's text may say it too
            current = []
    return statements


def apply_statements(cfg: PostgresConnection, statements: list[str], dbname: str) -> None:
    """Run ``database_properties`` statements for ``dbname``, each committed (mode new; replace runs them in the swap)."""
    with _maintenance(cfg) as conn, pg.translate_errors(f"setting the properties of database {dbname}"):
        for statement in statements:
            conn.execute(statement.encode())


def quote_ident(cfg: PostgresConnection) -> Callable[[str], str]:
    """The server's quoting of a name, as pg_dump writes it (quoted only when it must be)."""
    def quote(name: str) -> str:
        with _maintenance(cfg) as conn, pg.translate_errors("quoting a name"):
            return str(conn.execute("SELECT quote_ident(%s)", (name,)).fetchone()[0])  # type: ignore[index]
    return quote


def pg_restore_args(conninfo: str, schemas: list[str], tables: list[str], no_owner: bool) -> list[str]:
    args = ["--exit-on-error", f"--dbname={conninfo}"]
    if no_owner:
        args += ["--no-owner", "--no-privileges"]
    selected_schemas = list(schemas)
    for name in tables:
        schema, _, table = name.rpartition(".")
        args.append(f"--table={table}")
        if schema and schema not in selected_schemas:
            selected_schemas.append(schema)
    args += [f"--schema={s}" for s in selected_schemas]
    return args


# A table of contents larger than this (hundreds of thousands of objects) is not kept aside: such a
# restore runs in one stream, without the parallel post-data step.
TOC_LIMIT = 32 << 20
SPLICE_SIZE = 1 << 20


class ArchiveHead:
    """The dump's first bytes, up to the end of its table of contents: DDL and no rows, held in memory.

    The restore stage fills it while the stream passes; the flow reads the database's own properties
    from it, and a parallel restore builds indexes and constraints from it (``pg_restore --jobs``
    needs a seekable archive: a memfd of these bytes, never a file on disk).
    """

    def __init__(self) -> None:
        self.data: bytes | None = None

    def open(self) -> io.BytesIO:
        if self.data is None:
            raise ToolError("the dump's table of contents was not read", hint="the restore stopped before the dump began")
        return io.BytesIO(self.data)


def read_archive_head(reader: Any, limit: int = TOC_LIMIT) -> tuple[bytes, pg_archive.Head | None]:
    """Read the stream until its table of contents is complete: the bytes read (possibly a little beyond the
    TOC) and the parsed head, or None when the archive is not one pg_archive knows, too big, or ends first."""
    buf = bytearray()
    want = 1 << 16
    while True:
        block = reader.read(want)
        buf += block
        try:
            return bytes(buf), pg_archive.read_head(buf)
        except pg_archive.UnsupportedArchive:
            return bytes(buf), None
        except pg_archive.NeedMore:
            if not block or len(buf) >= limit:
                return bytes(buf), None
        want = max(want, len(buf))  # doubling: the head is parsed O(log n) times, not once per block


def run_pg_restore(tool: pg.Tool, cfg: PostgresConnection, args: list[str], source: Link, first: bytes,
                   parsed: pg_archive.Head | None, split: bool) -> dict[str, Any]:
    """Run pg_restore in one transaction on the stream of ``source`` (``first``: its bytes read so far).

    ``split``: schema and data only, when the head could be read (``result["split"]`` says whether it was),
    for ``run_from_toc`` to finish. The stream passes through this stage (spliced, not copied through
    Python) so that pg_restore's stdin closes only once upstream has declared the stream whole: a
    stream cut short or failing authentication kills pg_restore before it sees an end of input.
    """
    started = time.monotonic()
    reader = source.reader()
    split = split and parsed is not None
    args = [*args, "--single-transaction", *(["--section=pre-data", "--section=data"] if split else [])]
    stdin = Link(f"{source.name} (pg_restore stdin)")
    process = None
    try:
        process = pg.start_client(tool, cfg, args, stdin=stdin.take_read_fd())
        stdin.close_read()
        rc = None
        try:
            src, dst = source.take_read_fd(), stdin.take_write_fd()
            view = memoryview(first)
            while view:
                view = view[os.write(dst, view):]
            while os.splice(src, dst, SPLICE_SIZE):
                pass
        except BrokenPipeError:
            # pg_restore stopped reading. Failed: upstream stops at once (no point reading the rest).
            # Done early (a selective restore needs only part of the archive): the rest must still
            # authenticate, so it is drained, and upstream's verdict taken below.
            rc = process.wait()
            if rc != 0 or process.errors():
                source.close_read()
                process.check(rc)
            drain(reader)
        source.wait_verdict()  # a stream cut short upstream is a failure, whatever pg_restore said
        stdin.close_write()
        rc = process.wait() if rc is None else rc
        process.check(rc)
    except ToolError as exc:
        if process is not None:
            process.kill()
        raise _explained(exc) from None
    except BaseException:
        if process is not None:
            process.kill()  # before its stdin closes: no end of input, so no COMMIT
        source.close_read()
        raise
    finally:
        stdin.close_all()
    warnings = [line for line in process.stderr if "warning" in line.lower()]
    return {"pg_restore": tool.path, "pg_restore_version": tool.version, "warnings": warnings[-20:],
            "seconds": round(time.monotonic() - started, 3), "split": split}


def run_from_toc(tool: pg.Tool, cfg: PostgresConnection, args: list[str], head: ArchiveHead, section: str,
                 jobs: int = 1) -> float:
    """One section without rows (pre-data: schema; post-data: indexes, constraints and triggers) by pg_restore
    from the table of contents alone, which names no data blocks for it: a memfd, so the DDL never lands on disk.
    Pre-data in one transaction; post-data with ``jobs`` parallel workers."""
    started = time.monotonic()
    assert head.data is not None
    how = ["--single-transaction"] if jobs == 1 else [f"--jobs={jobs}"]
    fd = os.memfd_create("luxima-restore-toc", os.MFD_CLOEXEC)
    try:
        with open(fd, "wb", closefd=False) as f:
            f.write(head.data)
        process = pg.start_client(tool, cfg, [*args, *how, f"--section={section}", f"/dev/fd/{fd}"], pass_fds=(fd,))
        try:
            process.check(process.wait())
        except BaseException:
            process.kill()
            raise
    finally:
        os.close(fd)
    return round(time.monotonic() - started, 3)


def restore_rows_in_parallel(tool: pg.Tool, cfg: PostgresConnection, args: list[str], source: Link, first: bytes,
                             parsed: pg_archive.Head, head: ArchiveHead, jobs: int) -> dict[str, Any]:
    """Schema from the table of contents, rows from the stream over ``jobs`` connections, then indexes and
    constraints with ``jobs`` pg_restore workers. Any failure leaves a database the flow drops."""
    started = time.monotonic()
    try:
        try:
            pre_data = run_from_toc(tool, cfg, args, head, "pre-data")
            rows = pg_rows.load_rows(cfg, parsed, first[parsed.toc_end:], source.reader(), jobs)
        finally:
            source.close_read()  # upstream stops at once if this stage failed
        seconds = round(time.monotonic() - started, 3)
        post_data = run_from_toc(tool, cfg, args, head, "post-data", jobs)
    except ToolError as exc:
        raise _explained(exc) from None
    return {"pg_restore": tool.path, "pg_restore_version": tool.version, "warnings": [], "seconds": seconds,
            "split": True, "pre_data_seconds": pre_data, "rows": rows, "post_data_seconds": post_data}


def _explained(exc: ToolError) -> ToolError:
    """pg_restore's failure, with what to do when it names a role the target does not have."""
    if re.search(r'role "[^"]+" does not exist', str(exc)):
        return ToolError(exc.message, hint="the backup's roles are missing on the target: restore with "
                         "restore_globals_first (roles from the backup) or no_owner (no ownership or grants)")
    return exc


@task(name="restore", cache_policy=NO_CACHE, persist_result=False)
def restore(target: str, dbname: str, dump_major: int, jobs: int, schemas: list[str], tables: list[str],
            no_owner: bool, source: Link, head: ArchiveHead) -> dict[str, Any]:
    """pg_restore the authenticated stream into the new database, stopping at the first error.

    One job: the whole archive in one transaction. More: the schema from the table of contents, the rows from
    the stream over ``jobs`` connections at once, then indexes, constraints and triggers built by ``jobs``
    parallel workers from the table of contents. A dump whose rows this cannot load (a selective restore, rows
    compressed by pg_dump, data entries it does not know): schema and rows in one transaction from the stream.
    """
    settings = runtime.settings()
    cfg = on_database(settings.database(target), dbname)
    with pg.connect(cfg) as conn:
        server = pg.server_info(conn)
        # pg_restore -n/-t restore the objects *in* a schema, never the schema itself.
        for schema in dict.fromkeys([*schemas, *(t.rpartition(".")[0] for t in tables if "." in t)]):
            with pg.translate_errors(f"creating schema {schema} in {dbname}"):
                conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    # pg_restore must read the archive (as new as the pg_dump that wrote it) and speak to the server.
    tool = pg.find_tool("pg_restore", max(server.major, dump_major), settings.db_backup.pg_bin_dir)
    args = pg_restore_args(pg.client_conninfo(cfg), schemas, tables, no_owner)
    log = get_run_logger()
    try:
        first, parsed = read_archive_head(source.reader())
    except BaseException:
        source.close_read()
        raise
    head.data = first[:parsed.toc_end] if parsed else first
    why_not = "one job" if jobs == 1 else pg_rows.rows_not_parallel(parsed, schemas, tables)
    if why_not is None:
        assert parsed is not None
        result = restore_rows_in_parallel(tool, cfg, args, source, first, parsed, head, jobs)
        log.info("pg_restore %s: schema into %s in %.1fs; rows of %d tables over %d connections in %.1fs; indexes and "
                 "constraints with %d jobs in %.1fs", tool.version, dbname, result["pre_data_seconds"],
                 result["rows"]["tables"], jobs, result["rows"]["seconds"], jobs, result["post_data_seconds"])
        return result
    if jobs > 1 and parsed is not None:
        log.info("rows in one stream: %s", why_not)
    result = run_pg_restore(tool, cfg, args, source, first, parsed, split=jobs > 1)
    if result["split"]:
        result["post_data_seconds"] = run_from_toc(tool, cfg, args, head, "post-data", jobs)
        log.info("pg_restore %s: schema and data into %s in %.1fs, then indexes and constraints with %d jobs in %.1fs",
                 tool.version, dbname, result["seconds"], jobs, result["post_data_seconds"])
        return result
    if jobs > 1:
        log.warning("the dump's table of contents could not be read ahead (larger than %d MiB or an archive version "
                    "this restore does not know): restored in one stream, without parallel jobs", TOC_LIMIT >> 20)
    log.info("pg_restore %s restored into %s in %.1fs", tool.version, dbname, result["seconds"])
    return result


def restore_globals_sql(tool: pg.Tool, cfg: PostgresConnection, text: bytes) -> list[str]:
    """Run pg_dumpall's globals script with psql; roles that already exist are expected, not errors."""
    with pg.client_env(cfg) as env:
        proc = procs.run([tool.path, "--no-password", "-X", "-q", "-v", "ON_ERROR_STOP=0", "-f", "-", f"--dbname={pg.client_conninfo(cfg)}"],
                         input=text, env=env, timeout=600)
    errors = [line for line in proc.stderr.decode(errors="replace").splitlines() if "ERROR:" in line]
    unexpected = [e for e in errors if "already exists" not in e]
    if proc.returncode != 0 or unexpected:
        raise ToolError(f"restoring globals failed: {redact(chr(10).join(unexpected or errors)[-2000:])}")
    return errors
