"""PostgreSQL plumbing shared by every flow: connections, errors, client-tool discovery."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import signal
import subprocess
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import psycopg
from psycopg import sql

from .errors import ConfigError, DatabaseError, StageAborted, ToolError
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


def libpq_env(cfg: PostgresConnection) -> dict[str, str]:
    """Environment for a libpq client program; the password goes by environment, never argv."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update({
        "PGHOST": cfg.host, "PGPORT": str(cfg.port), "PGDATABASE": cfg.dbname, "PGUSER": cfg.user,
        "PGSSLMODE": cfg.sslmode, "PGCONNECT_TIMEOUT": str(cfg.connect_timeout),
        "PGAPPNAME": "luxima-backup",
    })
    if cfg.sslrootcert:
        env["PGSSLROOTCERT"] = str(cfg.sslrootcert)
    password = password_of(cfg)
    if password is not None:
        env["PGPASSWORD"] = password
    return env


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


@dataclass(frozen=True)
class Tool:
    path: str
    version: str   # e.g. "15.18"
    major: int


_VERSION_RE = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")


def tool_version(path: str) -> Tool | None:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
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


def main_tables(conn: psycopg.Connection, cfg: PostgresConnection) -> list[tuple[str, str]]:
    """The (schema, table) pairs counted at backup time: the configured list, or every user table."""
    with translate_errors("listing tables"):
        rows = conn.execute(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.relkind IN ('r', 'p') AND n.nspname = ANY(%s) AND NOT c.relispartition"
            " ORDER BY 1, 2",
            (list(cfg.schemas),),
        ).fetchall()
    present = [(str(s), str(t)) for s, t in rows]
    if not cfg.tables:
        return present
    wanted = []
    for name in cfg.tables:
        schema, _, table = name.rpartition(".")
        pair = (schema or "public", table)
        if pair not in present:
            with translate_errors(f"looking up table {name}"):
                exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f'"{pair[0]}"."{pair[1]}"',)).fetchone()
            if not exists or not exists[0]:
                raise ConfigError(f"main table {name} (databases.*.tables) does not exist in {cfg.dbname}", hint="fix the list of tables")
        wanted.append(pair)
    return wanted


def count_rows(conn: psycopg.Connection, tables: list[tuple[str, str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for schema, table in tables:
        with translate_errors(f"counting rows of {schema}.{table}"):
            row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(qualified(schema, table))).fetchone()
        counts[f"{schema}.{table}"] = int(row[0]) if row else 0
    return counts


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

    def wait(self) -> int:
        rc = self.proc.wait()
        self._reader.join()
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

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
                 stdout: int = subprocess.DEVNULL) -> ClientProcess:
    """Start a libpq client tool on file descriptors ``stdin``/``stdout``; stderr is collected."""
    proc = subprocess.Popen(
        [tool.path, "--no-password", *args], stdout=stdout, stderr=subprocess.PIPE, stdin=stdin,
        env=libpq_env(cfg),
    )
    tail: deque[str] = deque(maxlen=STDERR_KEEP)

    def drain() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            tail.append(raw.decode(errors="replace").rstrip())

    reader = threading.Thread(target=drain, name=f"{Path(tool.path).name}-stderr", daemon=True)
    reader.start()
    return ClientProcess(proc, tool, tail, reader)
