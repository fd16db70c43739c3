"""A dump's rows loaded over several connections at once, straight from the restore's stream.

``pg_restore --jobs`` needs a seekable archive, and a restore streams its dump; so pg_restore alone
loads the rows one table after another, through one connection, and one server process parses them.
Here the stream's data blocks are read as they come (``pg_archive.DataBlocks``), cut into pieces at
row ends, and the pieces handed to ``jobs`` connections, each in its own ``COPY ... FROM stdin`` (the
statement pg_dump wrote for that table): one large table is loaded by all of them at once. Rows land
in another physical order than pg_dump read them; nothing depends on that order.

Each connection loads in one transaction, committed only after the whole stream has been read and
upstream declared it whole; any failure (a row the server refuses, a stream cut short or failing
authentication, a stage timeout) rolls every connection back, and the restore drops the database it
created. Session settings are pg_restore's own (``_doSetFixedOutputState`` in pg_backup_archiver.c).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import psycopg

from . import pg, pg_archive, procs
from .errors import FormatError, StageAborted
from .settings import PostgresConnection

# A piece handed to one connection: large enough that the queue costs nothing per row, small enough that
# all connections get work from a table of a few MiB.
PIECE_SIZE = 1 << 20


def rows_not_parallel(parsed: pg_archive.Head | None, schemas: list[str], tables: list[str]) -> str | None:
    """Why the dump's rows cannot be loaded over several connections; None when they can."""
    if parsed is None:
        return "the dump's table of contents could not be read ahead"
    if schemas or tables:
        return "a selective restore"
    if parsed.compressed or parsed.int_size != 4:
        return "the dump's rows were compressed by pg_dump"
    for entry in parsed.toc:
        if entry.section == pg_archive.SECTION_DATA and not (
                (entry.desc == "TABLE DATA" and entry.copy_stmt) or entry.desc in ("SEQUENCE SET", LARGE_OBJECTS)):
            return f"the dump holds {entry.desc} ({entry.tag})"
    return None


LARGE_OBJECTS = "BLOBS"  # the TOC entry of a block of large objects' data (their metadata is pre-data)
INV_WRITE = 0x20000


class _LargeObjects:
    """Large objects' data written over a connection of its own, in one transaction (as pg_restore does: each was
    made by ``lo_create`` in the schema; here it is opened, written and closed)."""

    def __init__(self, cfg: PostgresConnection, setup: str):
        self._cfg, self._setup = cfg, setup
        self._conn: psycopg.Connection | None = None
        self.count = 0

    def load(self, blocks: pg_archive.DataBlocks) -> int:
        if self._conn is None:
            self._conn = pg.connect(self._cfg, autocommit=False)
            with pg.translate_errors(f"setting up a session on {self._cfg.dbname}"):
                self._conn.execute(self._setup)
        conn, size = self._conn, 0
        while (oid := blocks.next_large_object()) is not None:
            with pg.translate_errors(f"writing large object {oid}"):
                fd = conn.execute("SELECT pg_catalog.lo_open(%s, %s)", (oid, INV_WRITE)).fetchone()[0]  # type: ignore[index]
                for data in blocks.data(PIECE_SIZE):
                    conn.execute("SELECT pg_catalog.lowrite(%s, %s)", (fd, data))
                    size += len(data)
                conn.execute("SELECT pg_catalog.lo_close(%s)", (fd,))
            self.count += 1
        return size

    def cancel(self) -> None:
        _cancel(self._conn)

    def finish(self, commit: bool) -> None:
        if self._conn is None:
            return
        try:
            with pg.translate_errors(f"committing the large objects written into {self._cfg.dbname}"):
                self._conn.commit() if commit else self._conn.rollback()
        finally:
            self._conn.close()
            self._conn = None


def _cancel(conn: psycopg.Connection | None) -> None:
    """Stop a statement the server is running for ``conn`` (safe from another thread; bounded if the server is gone)."""
    if conn is not None:
        try:
            conn.cancel_safe(timeout=5)
        except psycopg.Error:
            pass


def session_setup(parsed: pg_archive.Head) -> str:
    """What pg_restore sets in each session before loading: no timeouts, the dump's encoding, string syntax and
    search path, and row security off (a table's rows must all load, whatever its policies)."""
    from_dump = "".join(e.defn for e in parsed.toc if e.desc in ("ENCODING", "STDSTRINGS", "SEARCHPATH"))
    return ("SET statement_timeout = 0; SET lock_timeout = 0; SET idle_in_transaction_session_timeout = 0; "
            f"{from_dump} SET check_function_bodies = false; SET xmloption = content; "
            "SET client_min_messages = warning; SET row_security = off;")


_DONE = None


@dataclass
class _Piece:
    entry: pg_archive.TocEntry
    data: bytes


class _Loader(threading.Thread):
    """One connection: COPYs each piece it takes into its table, in one transaction committed when told."""

    def __init__(self, cfg: PostgresConnection, setup: str, pieces: "queue.Queue[_Piece | None]", index: int):
        super().__init__(name=f"restore-rows-{index}", daemon=True)
        self._cfg, self._setup, self._pieces = cfg, setup, pieces
        self.error: BaseException | None = None
        self.ready = threading.Event()   # all pieces taken and COPYs finished; waiting for commit or rollback
        self._verdict = threading.Event()
        self._verdict_lock = threading.Lock()
        self._commit = False
        self.committed = False
        self._conn: psycopg.Connection | None = None

    def finish(self, commit: bool) -> None:
        """Commit or roll back once all pieces are in; the first verdict stands (a stop is never undone)."""
        with self._verdict_lock:
            if not self._verdict.is_set():
                self._commit = commit
                self._verdict.set()

    def cancel(self) -> None:
        _cancel(self._conn)

    def run(self) -> None:
        copying: Any = None
        current: pg_archive.TocEntry | None = None
        try:
            self._conn = conn = pg.connect(self._cfg, autocommit=False)
            try:
                with pg.translate_errors(f"setting up a session on {self._cfg.dbname}"):
                    conn.execute(self._setup)
                cursor = conn.cursor()
                while (piece := self._pieces.get()) is not _DONE:
                    if piece.entry is not current:
                        if copying is not None:
                            with _loading(current):
                                copying.__exit__(None, None, None)
                        copying, current = None, piece.entry
                        with _loading(current):
                            copying = cursor.copy(current.copy_stmt)
                            copy = copying.__enter__()
                    with _loading(current):
                        copy.write(piece.data)
                if copying is not None:
                    done, copying = copying, None
                    with _loading(current):
                        done.__exit__(None, None, None)
                self.ready.set()
                self._verdict.wait()
                with pg.translate_errors(f"committing the rows loaded into {self._cfg.dbname}"):
                    if self._commit:
                        conn.commit()
                        self.committed = True
                    else:
                        conn.rollback()
            except BaseException as exc:
                if copying is not None:
                    try:
                        copying.__exit__(type(exc), exc, exc.__traceback__)  # COPY ends with an error: nothing kept
                    except Exception:
                        pass
                raise
            finally:
                conn.close()
        except BaseException as exc:
            self.error = exc
        finally:
            self.ready.set()


def _loading(entry: pg_archive.TocEntry | None) -> Any:
    name = f"{entry.namespace}.{entry.tag}" if entry is not None else "?"
    return pg.translate_errors(f"loading the rows of {name}")


def load_rows(cfg: PostgresConnection, parsed: pg_archive.Head, after_toc: bytes, reader: Any, jobs: int) -> dict[str, Any]:
    """Load every table's rows from ``reader`` (the stream after the TOC; ``after_toc``: its bytes already read)
    over ``jobs`` connections, then the sequences' values. Commits only once the stream has ended whole."""
    started = time.monotonic()
    setup = session_setup(parsed)
    by_id = {e.dump_id: e for e in parsed.toc}
    pieces: "queue.Queue[_Piece | None]" = queue.Queue(maxsize=2 * jobs)
    loaders = [_Loader(cfg, setup, pieces, i) for i in range(jobs)]
    for loader in loaders:
        loader.start()

    def failed() -> BaseException | None:
        return next((loader.error for loader in loaders if loader.error is not None), None)

    def hand(piece: _Piece | None) -> None:
        while True:
            error = failed()
            if error is not None:
                raise error
            try:
                pieces.put(piece, timeout=0.2)
                return
            except queue.Full:
                continue

    tables = size = 0
    large_objects = _LargeObjects(cfg, setup)

    def stop_now() -> None:  # a stage limit or a signal stopping the run: the connections must not hold it
        for loader in loaders:
            loader.finish(commit=False)
            loader.cancel()
        large_objects.cancel()
    with procs.cancellable(stop_now):
        try:
            blocks = pg_archive.DataBlocks(parsed, after_toc, reader)
            while (block := blocks.next_block()) is not None:
                kind, dump_id = block
                entry = by_id.get(dump_id)
                if kind == pg_archive.BLK_BLOBS and entry is not None and entry.desc == LARGE_OBJECTS:
                    size += large_objects.load(blocks)
                    continue
                if kind != pg_archive.BLK_DATA or entry is None or entry.desc != "TABLE DATA" or not entry.copy_stmt:
                    raise FormatError(f"a data block of the dump (dump id {dump_id}) is not what its table of contents "
                                      f"says", hint="the backup is damaged; restore another one")
                tables += 1
                for data in blocks.data(PIECE_SIZE, rows=True):
                    size += len(data)
                    hand(_Piece(entry, data))
            # Here the stream has ended and upstream declared it whole (a cut or unauthenticated one raised above).
            for _ in loaders:
                hand(_DONE)
            for loader in loaders:
                loader.ready.wait()
            error = failed()
            if error is not None:
                raise error
            large_objects.finish(commit=True)
            for loader in loaders:
                loader.finish(commit=True)
            for loader in loaders:
                loader.join()
            error = failed()
            if error is not None:
                raise error
            if not all(loader.committed for loader in loaders):
                raise StageAborted(f"loading the rows of {cfg.dbname} was stopped before they were committed")
        except BaseException as exc:
            _stop(loaders, pieces)
            try:
                large_objects.finish(commit=False)
            except Exception:
                pass  # the failure that brought us here matters more
            cause = failed()
            if cause is not None and cause is not exc:
                raise cause from None  # a row the server refused explains the rest
            raise
    with pg.connect(cfg) as conn, pg.translate_errors(f"setting the sequences of {cfg.dbname}"):
        conn.execute(setup)
        for entry in parsed.toc:
            if entry.desc == "SEQUENCE SET":
                conn.execute(entry.defn)
    return {"tables": tables, "large_objects": large_objects.count, "bytes": size, "jobs": jobs,
            "seconds": round(time.monotonic() - started, 3)}


def _stop(loaders: list[_Loader], pieces: "queue.Queue[_Piece | None]") -> None:
    """Roll every connection back: pieces not taken are dropped, running COPYs cancelled."""
    for loader in loaders:
        loader.finish(commit=False)
    while True:
        try:
            pieces.get_nowait()
        except queue.Empty:
            break
    for _ in loaders:
        try:
            pieces.put_nowait(_DONE)
        except queue.Full:
            break
    for loader in loaders:
        if not loader.ready.wait(timeout=5):
            loader.cancel()
    for loader in loaders:
        loader.join(timeout=30)
