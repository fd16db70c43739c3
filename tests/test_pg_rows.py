"""A dump's rows loaded over several connections from its stream: what is refused or cut short leaves nothing.

The round trip of every table shape through this path is in test_db_real_world; here, the failures, driven
by real dumps of a real cluster whose bytes are altered the way damage or a refusal would arrive.
"""

from __future__ import annotations

import io
import os
import subprocess
from typing import Any

import pytest

from devkit.sandbox import PostgresCluster
from luxima_backup import pg_archive, pg_rows
from luxima_backup.errors import DatabaseError, FormatError
from luxima_backup.settings import PostgresConnection
from tests.conftest import DB_PASSWORD

pytestmark = pytest.mark.slow


@pytest.fixture
def dumped(pg_cluster: PostgresCluster, database: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A database of two tables dumped as the backup dumps (custom format, uncompressed), and an empty target with
    its schema restored: the state of a restore just before its rows."""
    with pg_cluster.connect(database) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL)")
        conn.execute("INSERT INTO t SELECT g, repeat(md5(g::text), 2) FROM generate_series(1, 20000) g")
        conn.execute("CREATE TABLE u (n int)")
        conn.execute("INSERT INTO u SELECT generate_series(1, 1000)")
    env = {**os.environ, "PGPASSWORD": DB_PASSWORD}
    where = ["-h", "127.0.0.1", "-p", str(pg_cluster.port), "-U", "postgres"]
    dump = subprocess.run([str(pg_cluster.bin / "pg_dump"), *where, "-Fc", "-Z0", "-d", database], env=env,
                          capture_output=True, check=True).stdout
    target = f"{database}_rows"
    with pg_cluster.connect() as conn:
        conn.execute(f'CREATE DATABASE "{target}"')
    subprocess.run([str(pg_cluster.bin / "pg_restore"), *where, "--section=pre-data", "--exit-on-error", "-d", target],
                   input=dump, env=env, check=True, capture_output=True)
    monkeypatch.setenv("LUXIMA_TEST_DB_PASSWORD", DB_PASSWORD)
    monkeypatch.setattr(pg_rows, "PIECE_SIZE", 4096)  # many pieces: both connections load each table
    cfg = PostgresConnection(host="127.0.0.1", port=pg_cluster.port, dbname=target, user="postgres",
                             password="env:LUXIMA_TEST_DB_PASSWORD", sslmode="disable")
    return {"dump": dump, "cfg": cfg, "target": target}


def load(dumped: dict[str, Any], data: bytes) -> dict[str, Any]:
    head = pg_archive.read_head(data)
    assert pg_rows.rows_not_parallel(head, [], []) is None
    return pg_rows.load_rows(dumped["cfg"], head, data[head.toc_end:], io.BytesIO(b""), jobs=2)


def counts(cluster: PostgresCluster, dbname: str) -> tuple[int, int]:
    with cluster.connect(dbname) as conn:
        return conn.execute("SELECT (SELECT count(*) FROM t), (SELECT count(*) FROM u)").fetchone()  # type: ignore[return-value]


def test_the_rows_load_whole_over_two_connections(pg_cluster: PostgresCluster, database: str, dumped: dict[str, Any]) -> None:
    result = load(dumped, dumped["dump"])
    assert result["tables"] == 2 and result["jobs"] == 2
    assert counts(pg_cluster, dumped["target"]) == (20000, 1000)
    digest = "SELECT md5(string_agg(id || ':' || v, ',' ORDER BY id)) FROM t"
    with pg_cluster.connect(database) as a, pg_cluster.connect(dumped["target"]) as b:
        assert a.execute(digest).fetchone() == b.execute(digest).fetchone()


def test_a_row_the_server_refuses_stops_every_connection_and_nothing_is_kept(
        pg_cluster: PostgresCluster, dumped: dict[str, Any]) -> None:
    row = b"\x00\x00\x0015000\t"  # a row is its length (4 bytes, least significant first), then its text
    assert dumped["dump"].count(row) == 1
    refused = dumped["dump"].replace(row, b"\x00\x00\x0015O00\t")  # same length: the archive stays well formed
    with pytest.raises(DatabaseError) as caught:
        load(dumped, refused)
    assert "public.t" in str(caught.value) and "integer" in str(caught.value), str(caught.value)
    assert counts(pg_cluster, dumped["target"]) == (0, 0)


def test_a_stream_cut_inside_a_table_is_refused_and_nothing_is_kept(pg_cluster: PostgresCluster, dumped: dict[str, Any]) -> None:
    cut = dumped["dump"][: len(dumped["dump"]) * 2 // 3]
    with pytest.raises(FormatError, match="ends inside a data block"):
        load(dumped, cut)
    assert counts(pg_cluster, dumped["target"]) == (0, 0)


def test_dumps_it_cannot_load_say_why(dumped: dict[str, Any]) -> None:
    head = pg_archive.read_head(dumped["dump"])
    assert pg_rows.rows_not_parallel(head, ["public"], []) == "a selective restore"
    assert pg_rows.rows_not_parallel(None, [], []) is not None
    import dataclasses

    compressed = dataclasses.replace(head, compressed=True)
    assert "compressed" in (pg_rows.rows_not_parallel(compressed, [], []) or "")
    with pytest.raises(pg_archive.UnsupportedArchive):
        pg_archive.DataBlocks(compressed, b"", io.BytesIO(b""))


def test_a_stopped_run_cancels_the_connections_waiting_on_the_server_and_keeps_nothing(
        pg_cluster: PostgresCluster, dumped: dict[str, Any]) -> None:
    """A stage limit or SIGTERM stops child processes; the loading connections are no children, so they are
    cancelled with them (here each waits for a lock another session holds on its table)."""
    import threading
    import time

    from luxima_backup import procs

    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = load(dumped, dumped["dump"])
        except BaseException as exc:
            outcome["error"] = exc

    with pg_cluster.connect(dumped["target"]) as holder:
        holder.execute("BEGIN")
        holder.execute("LOCK TABLE t, u IN ACCESS EXCLUSIVE MODE")
        loading = threading.Thread(target=run, daemon=True)
        loading.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until the loaders wait for the lock
            with pg_cluster.connect(dumped["target"]) as watcher:
                waiting = watcher.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND "
                                          "wait_event_type = 'Lock'", (dumped["target"],)).fetchone()[0]
            if waiting:
                break
            time.sleep(0.1)
        assert waiting, "the loaders never waited for the lock"
        stopped = time.monotonic()
        procs.stop_all(grace=1)
        loading.join(30)
        assert not loading.is_alive() and time.monotonic() - stopped < 15
        holder.execute("ROLLBACK")
    assert isinstance(outcome.get("error"), DatabaseError) and "cancel" in str(outcome["error"]).lower()
    assert counts(pg_cluster, dumped["target"]) == (0, 0)
