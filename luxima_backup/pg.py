"""PostgreSQL plumbing shared by every flow: connections, errors, client-tool discovery."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from . import procs
from .errors import BackupError, ConfigError, DatabaseError, StageAborted, ToolError
from .secrets import redact
from .settings import PostgresConnection

# SQLSTATE classes that a later attempt can fix on its own.
_TRANSIENT_SQLSTATES = {"08000", "08001", "08003", "08004", "08006", "57P01", "57P02", "57P03", "53300", "40001", "40P01"}


def password_of(cfg: PostgresConnection) -> str | None:
    return cfg.password.resolve() if cfg.password is not None else None


@contextlib.contextmanager
def translate_errors(action: str) -> Iterator[None]:
    """psycopg failures as ``DatabaseError``s: lost or refused connections are transient."""
    try:
        yield
    except psycopg.Error as exc:
        raise database_error(exc, action) from None


def database_error(exc: psycopg.Error, action: str) -> DatabaseError:
    state = getattr(exc, "sqlstate", None)
    made = _database_error(exc, action, state)
    made.sqlstate = state
    return made


def _database_error(exc: psycopg.Error, action: str, state: str | None) -> DatabaseError:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if state in {"28P01", "28000"} or "authentication failed" in text or "no pg_hba.conf entry" in text:
        return DatabaseError(f"{action}: {text}", hint="check the user, its password reference and pg_hba.conf")
    if state == "3D000":
        return DatabaseError(f"{action}: {text}", hint="check dbname in the settings")
    if state == "42501":
        return DatabaseError(f"{action}: {text}", hint="the role lacks a privilege; see docs/operations.md for the grants")
    transient = state in _TRANSIENT_SQLSTATES or (
        state is None and isinstance(exc, psycopg.OperationalError)
    )
    return DatabaseError(f"{action}: {text}", transient=transient)


def connect(cfg: PostgresConnection, *, autocommit: bool = True, **extra: Any) -> psycopg.Connection:
    with translate_errors(f"connecting to {cfg.dbname} at {cfg.host}:{cfg.port} as {cfg.user}"):
        return psycopg.connect(**cfg.conninfo(), password=password_of(cfg), autocommit=autocommit, **extra)


def client_conninfo(cfg: PostgresConnection) -> str:
    """A client tool's ``--dbname``: ``cfg``'s database, quoted as libpq reads it (a name may hold spaces, quotes
    or "="), and the connection's liveness keywords, which libpq takes from no environment variable. Host, port,
    user and TLS come from :func:`libpq_env`."""
    return make_conninfo("", dbname=cfg.dbname, **cfg.liveness())


def libpq_env(cfg: PostgresConnection, passfile: str | None = None) -> dict[str, str]:
    """What a libpq client program gets on top of ``procs.minimal_env``: where to connect, and the password
    file; never the password itself (another process of the same user can read an environment)."""
    env = {
        "PGHOST": cfg.host, "PGPORT": str(cfg.port), "PGDATABASE": cfg.dbname, "PGUSER": cfg.user,
        "PGSSLMODE": cfg.sslmode, "PGCONNECT_TIMEOUT": str(cfg.connect_timeout),
        "PGAPPNAME": "luxima-backup",
        # No ~/.pgpass, service file or server-side settings of whoever runs this: only what is configured.
        "PGPASSFILE": passfile or os.devnull, "PGSERVICEFILE": os.devnull, "PGSYSCONFDIR": os.devnull,
    }
    if cfg.sslrootcert:
        env["PGSSLROOTCERT"] = str(cfg.sslrootcert)
    return env


def _pgpass_field(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def write_passfile(cfg: PostgresConnection) -> str | None:
    """A private (0600) password file for one client process, or None without a password; the caller removes it."""
    password = password_of(cfg)
    if password is None:
        return None
    fd, path = tempfile.mkstemp(prefix="luxima-pgpass-")  # O_EXCL, mode 0600, in a directory of our own choosing
    with os.fdopen(fd, "w") as f:
        f.write(f"*:*:*:{_pgpass_field(cfg.user)}:{_pgpass_field(password)}\n")
    return path


def remove_passfile(path: str | None) -> None:
    if path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@contextlib.contextmanager
def client_env(cfg: PostgresConnection) -> Iterator[dict[str, str]]:
    """The environment of one libpq client run, its password file removed afterwards."""
    passfile = write_passfile(cfg)
    try:
        yield libpq_env(cfg, passfile)
    finally:
        remove_passfile(passfile)


@dataclass(frozen=True)
class ServerInfo:
    version: str        # e.g. "15.18"
    version_num: int    # e.g. 150018
    is_superuser: bool

    @property
    def major(self) -> int:
        return self.version_num // 10000


def server_info(conn: psycopg.Connection) -> ServerInfo:
    with translate_errors("reading the server version"):
        row = conn.execute(
            "SELECT current_setting('server_version'), current_setting('server_version_num')::int,"
            " (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)"
        ).fetchone()
    assert row is not None
    return ServerInfo(str(row[0]).split()[0], int(row[1]), bool(row[2]))


def database_size(cfg: PostgresConnection) -> int | None:
    """pg_database_size of the configured database (an estimate of a dump's size), or None if it cannot be read."""
    try:
        with connect(cfg) as conn:
            row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    except BackupError:
        return None
    return int(row[0]) if row else None


def system_identifier(conn: psycopg.Connection) -> str | None:
    """The cluster's unique id (pg_control_system), or None where a managed server does not show it."""
    try:
        row = conn.execute("SELECT system_identifier::text FROM pg_control_system()").fetchone()
    except psycopg.Error:
        conn.rollback()
        return None
    return str(row[0]) if row else None


@dataclass(frozen=True)
class Tool:
    path: str
    version: str   # e.g. "15.18"
    major: int


_VERSION_RE = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")


def tool_version(path: str) -> Tool | None:
    try:
        out = procs.run([path, "--version"], text=True, timeout=30).stdout
    except OSError:
        return None
    m = _VERSION_RE.search(out)
    if not m:
        return None
    return Tool(path, f"{m.group(1)}.{m.group(2) or 0}", int(m.group(1)))


def find_tool(name: str, server_major: int, bin_dir: Path | None = None) -> Tool:
    """The ``name`` client (pg_dump, pg_restore, ...) to use against a server of ``server_major``.

    Same major as the server when installed, else the newest newer one: a client older than
    the server cannot read its catalogs, so none is used.
    """
    if bin_dir is not None:
        candidates = [str(Path(bin_dir) / name)]
    else:
        candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) + sorted(glob.glob(f"/usr/pgsql-*/bin/{name}"))
        on_path = shutil.which(name)
        if on_path:
            candidates.append(on_path)
    found = [t for t in (tool_version(c) for c in dict.fromkeys(candidates)) if t is not None]
    usable = [t for t in found if t.major >= server_major]
    if usable:
        same = [t for t in usable if t.major == server_major]
        return same[0] if same else max(usable, key=lambda t: t.major)
    seen = ", ".join(f"{t.version} at {t.path}" for t in found) or "none"
    where = f"in db_backup.pg_bin_dir ({bin_dir})" if bin_dir else "on this machine"
    raise ToolError(
        f"{name} must be version {server_major} or newer to dump a PostgreSQL {server_major} server; found {where}: {seen}",
        hint=f"install postgresql-client-{server_major} (or newer) or set db_backup.pg_bin_dir to its bin directory",
    )


def qualified(schema: str, table: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table))


@dataclass(frozen=True)
class TableRef:
    """A table counted at backup time, and where its rows are in a dump."""

    schema: str
    name: str
    oid: int
    kind: str                   # r: table, p: partitioned table, f: foreign table
    data_oids: tuple[int, ...]  # tables whose TABLE DATA entries hold its rows: itself, or a partitioned table's leaves

    @property
    def key(self) -> str:
        return f"{self.schema}.{self.name}"


_TABLES_SQL = """
SELECT n.nspname, c.relname, c.oid::int8, c.relkind::text,
       CASE c.relkind
           WHEN 'r' THEN ARRAY[c.oid::int8]
           -- a partitioned table holds no rows itself: pg_dump writes the data of its leaf partitions
           WHEN 'p' THEN ARRAY(SELECT l.oid::int8 FROM pg_partition_tree(c.oid) t JOIN pg_class l ON l.oid = t.relid
                               WHERE t.isleaf AND l.relkind = 'r' ORDER BY 1)
           ELSE '{}'::int8[] END
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'f') AND {where}
ORDER BY 1, 2
"""


def _tables(conn: psycopg.Connection, where: str, params: tuple[Any, ...]) -> list[TableRef]:
    with translate_errors("listing tables"):
        rows = conn.execute(_TABLES_SQL.replace("{where}", where), params).fetchall()  # type: ignore[arg-type]
    return [TableRef(str(s), str(t), int(o), str(k), tuple(int(x) for x in d)) for s, t, o, k, d in rows]


def main_tables(conn: psycopg.Connection, cfg: PostgresConnection) -> list[TableRef]:
    """The tables counted at backup time: the configured list, or every table (partitioned ones whole, not their
    partitions) in ``schemas``; foreign tables are listed too, with no data (a dump holds none of their rows)."""
    present = _tables(conn, "NOT c.relispartition AND n.nspname = ANY(%s)", (list(cfg.schemas),))
    if not cfg.tables:
        return present
    by_key = {t.key: t for t in present}
    wanted = []
    for name in cfg.tables:
        schema, _, table = name.rpartition(".")
        found = by_key.get(f"{schema or 'public'}.{table}") or next(
            iter(_tables(conn, "n.nspname = %s AND c.relname = %s", (schema or "public", table))), None)
        if found is None:
            raise ConfigError(f"main table {name} (databases.*.tables) does not exist in {cfg.dbname}", hint="fix the list of tables")
        wanted.append(found)
    return wanted


def large_object_count(conn: psycopg.Connection) -> int:
    with translate_errors("counting large objects"):
        row = conn.execute("SELECT count(*) FROM pg_largeobject_metadata").fetchone()
    return int(row[0]) if row else 0


def count_rows(conn: psycopg.Connection, tables: list[TableRef], cfg: PostgresConnection | None = None) -> dict[str, int]:
    """``count(*)`` of every counted table except foreign ones; a lock wait past ``lock_timeout`` names its holder."""
    counts: dict[str, int] = {}
    for t in tables:
        if t.kind == "f":
            continue
        try:
            with translate_errors(f"counting rows of {t.key}"):
                row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(qualified(t.schema, t.name))).fetchone()
        except DatabaseError as exc:
            if cfg is not None and exc.sqlstate == "55P03":  # lock_timeout
                raise lock_wait_error(cfg, qualified(t.schema, t.name).as_string(conn), "counting its rows") from None
            raise
        counts[t.key] = int(row[0]) if row else 0
    return counts


def lock_wait_error(cfg: PostgresConnection, relation: str, doing: str) -> DatabaseError:
    """A permanent error naming the sessions that hold ``relation`` locked, from pg_locks and pg_stat_activity."""
    holders: list[str] = []
    try:
        with connect(cfg) as conn:
            rows = conn.execute(
                "SELECT l.pid, l.mode, a.usename, a.application_name, a.state, a.xact_start, a.query"
                " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
                " WHERE l.locktype = 'relation' AND l.relation = to_regclass(%s) AND l.granted"
                " AND l.mode = 'AccessExclusiveLock' AND l.pid <> pg_backend_pid() ORDER BY a.xact_start",
                (relation,),
            ).fetchall()
        for pid, mode, user, app, state, since, query in rows:
            started = since.isoformat(timespec="seconds") if since else "?"
            text = " ".join(str(query or "").split())[:160]
            holders.append(f"pid {pid} ({mode}, user {user}, application {app or '-'!r}, {state}, transaction since "
                           f"{started}): {text}")
    except BackupError as exc:
        holders.append(f"(the holder could not be read: {exc.message})")
    held = "; ".join(holders) or "by a session that has since released it"
    return DatabaseError(
        redact(f"{relation} stayed locked past db_backup.lock_wait_timeout_seconds while {doing}: held {held}"),
        hint="let that session finish (a migration, VACUUM FULL, ALTER TABLE) or end it with pg_terminate_backend(pid), "
             "then back up again; raise db_backup.lock_wait_timeout_seconds if such locks are expected to last",
        transient=False,
    )


# Client-tool stderr lines that mean the server or network went away: worth another attempt.
_TRANSIENT_MARKERS = (
    "server closed the connection unexpectedly", "connection to server", "could not connect",
    "Connection refused", "terminating connection", "Connection reset", "could not receive data",
    "SSL SYSCALL error", "the database system is shutting down", "the database system is starting up",
    "no connection to the server", "canceling statement due to conflict",
)
STDERR_KEEP = 200  # lines kept for the error message; the tools can be chatty


def is_transient_text(text: str) -> bool:
    return any(marker in text for marker in _TRANSIENT_MARKERS)


@dataclass
class ClientProcess:
    """A running libpq client tool (pg_dump, pg_restore, psql) and a bounded tail of its stderr."""

    proc: subprocess.Popen[bytes]
    tool: Tool
    stderr: deque[str]
    _reader: threading.Thread
    passfile: str | None = None

    def wait(self) -> int:
        rc = self.proc.wait()
        self._reader.join()
        remove_passfile(self.passfile)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        remove_passfile(self.passfile)

    def errors(self) -> list[str]:
        return [line for line in self.stderr if ": error:" in line or line.startswith(("ERROR:", "FATAL:"))]

    def check(self, rc: int) -> None:
        """Raise unless the tool exited 0 with no error on stderr."""
        text = redact("\n".join(self.stderr))
        name = Path(self.tool.path).name
        if rc == -signal.SIGPIPE:
            raise StageAborted(f"{name} stopped because the next stage stopped reading")
        if rc != 0 or self.errors():
            raise ToolError(
                f"{name} {self.tool.version} failed (exit status {rc}): {text.strip()[-2000:] or 'no message'}",
                transient=is_transient_text(text),
            )


def start_client(tool: Tool, cfg: PostgresConnection, args: list[str], *, stdin: int = subprocess.DEVNULL,
                 stdout: int = subprocess.DEVNULL, pass_fds: tuple[int, ...] = ()) -> ClientProcess:
    """Start a libpq client tool on file descriptors ``stdin``/``stdout``; stderr is collected."""
    passfile = write_passfile(cfg)
    try:
        proc = procs.popen([tool.path, "--no-password", *args], stdout=stdout, stderr=subprocess.PIPE, stdin=stdin,
                           env=libpq_env(cfg, passfile), pass_fds=pass_fds)
    except BaseException:
        remove_passfile(passfile)
        raise
    tail: deque[str] = deque(maxlen=STDERR_KEEP)

    def drain() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            tail.append(raw.decode(errors="replace").rstrip())

    reader = threading.Thread(target=drain, name=f"{Path(tool.path).name}-stderr", daemon=True)
    reader.start()
    return ClientProcess(proc, tool, tail, reader, passfile)


def pg_restore_output(tool: Tool, args: list[str], dump: Any) -> bytes:
    """What ``pg_restore args`` prints for the dump fed to its stdin (``--list``, or a script of some entries).

    pg_restore stops reading once it has what it needs (the table of contents); the rest of ``dump``
    is left unread, for the caller to drain (a verify must still hash and authenticate it) or close.
    """
    proc = procs.popen([tool.path, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out: list[bytes] = []
    err: list[bytes] = []
    readers = [threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True),  # type: ignore[union-attr]
               threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)]  # type: ignore[union-attr]
    for t in readers:
        t.start()
    try:
        with contextlib.suppress(BrokenPipeError):
            while block := dump.read(1 << 20):
                proc.stdin.write(block)  # type: ignore[union-attr]
    finally:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()  # type: ignore[union-attr]
    rc = proc.wait()
    for t in readers:
        t.join()
    if rc != 0:
        raise ToolError(f"pg_restore {' '.join(args)} cannot read the dump (exit {rc}): "
                        f"{redact(b''.join(err).decode(errors='replace')).strip()[-1000:]}")
    return b"".join(out)
