"""A database server that vanishes mid-run (powered off, its link cut: packets dropped, no reset sent) is given up
within ``databases.NAME.lost_after_seconds``, by pg_dump and by this program's own connections, instead of
after the operating system's defaults (15 minutes for data sent, never for a connection waiting on an answer).

The server is reached through a relay on a port of its own, whose packets the kernel then drops (iptables):
nothing answers a keepalive probe or acknowledges data, as with a host that is gone."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from devkit.sandbox import PostgresCluster
from luxima_backup import pg, procs
from luxima_backup.errors import DatabaseError
from luxima_backup.settings import PostgresConnection
from tests.conftest import DB_PASSWORD, file_keys, log_elsewhere
from tests.fault_proxy import Blackhole, StallProxy
from tests.helpers import error_of, log_rows, run_backup, s3_keys, subflow_runs
from tests.test_db_backup import incompressible_table

LOST_AFTER = 6  # keepalive probes after 2 s idle, then every 1 s, four unanswered: ~6 s


def cut_when(event: threading.Event, hole: Blackhole) -> threading.Thread:
    """Drop the relay's packets as soon as ``event`` is set (in a thread: the run goes on meanwhile)."""
    def cut() -> None:
        if event.wait(120):
            hole.__enter__()

    thread = threading.Thread(target=cut, daemon=True)
    thread.start()
    return thread


def test_a_database_host_that_vanishes_mid_dump_fails_the_backup_within_lost_after_seconds(
    prefect_server: Any, pg_cluster: PostgresCluster, s3_server: Any, database: str, bucket: str, key_file: Path,
    write_settings: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pg_cluster.connect(database) as conn:
        incompressible_table(conn, "big", 20_000)  # 20 MiB: the relay goes dark 2 MiB into pg_dump's stream
    proxy = StallProxy(pg_cluster.port, stall_after=2 * 1024 * 1024)
    hole = Blackhole(proxy.port)
    # The stage limit is far off: only noticing the lost server can end the run in time.
    monkeypatch.setenv("LUXIMA_BACKUP__DB_BACKUP__STAGE_TIMEOUT_SECONDS", "150")
    settings = write_settings(database, bucket, file_keys(key_file), log_elsewhere(pg_cluster, database), port=proxy.port)
    settings.write_text(settings.read_text().replace(
        'schemas = ["public", "app"]', f'schemas = ["public", "app"]\nlost_after_seconds = {LOST_AFTER}\nconnect_timeout = 2', 1))
    cutter = cut_when(proxy.stalled, hole)
    try:
        started = time.monotonic()
        state = run_backup()
        elapsed = time.monotonic() - started
    finally:
        cutter.join(5)
        hole.__exit__()
        proxy.close()
    assert proxy.stalled.is_set()  # the host went dark in the middle of the dump
    exc = error_of(state)
    assert "pg_dump" in str(exc) or "connect" in str(exc), str(exc)
    # Both attempts (the second cannot even connect) ended on their own, long before the stage limit.
    assert len(subflow_runs(state)) == 2
    assert elapsed < 60, f"took {elapsed:.0f} s"
    assert procs.live() == []
    assert s3_keys(s3_server, bucket) == []
    assert s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert [r["status"] for r in log_rows(pg_cluster, database)] == ["failed"]


@pytest.fixture
def lost_server(pg_cluster: PostgresCluster, database: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A connection's settings through a relay, and the relay's Blackhole (used by the test)."""
    monkeypatch.setenv("LUXIMA_TEST_DB_PASSWORD", DB_PASSWORD)
    proxy = StallProxy(pg_cluster.port, stall_after=1 << 40)  # a plain relay: the Blackhole cuts it
    hole = Blackhole(proxy.port)
    cfg = PostgresConnection(host="127.0.0.1", port=proxy.port, dbname=database, user="postgres",
                             password="env:LUXIMA_TEST_DB_PASSWORD", sslmode="disable", lost_after_seconds=LOST_AFTER)
    yield cfg, hole
    hole.__exit__()
    proxy.close()


def _fails_within(seconds: float, work: Callable[[], None]) -> BaseException:
    """Run ``work`` in a thread; the exception it ended with, or a test failure if it is still waiting."""
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting on a vanished server after {seconds} s"
    assert outcome, "the work ended without an error"
    return outcome[0]


def test_a_connection_waiting_on_a_vanished_server_gives_up(lost_server: Any) -> None:
    """Waiting for an answer (a query, the restore's count checks, the log): keepalive probes go unanswered."""
    cfg, hole = lost_server
    conn = pg.connect(cfg)
    try:
        def query() -> None:
            with pg.translate_errors("waiting on the server"):
                conn.execute("SELECT pg_sleep(60)")

        def cut_then_query() -> None:
            hole.__enter__()
            query()

        started = time.monotonic()
        exc = _fails_within(30, cut_then_query)
        assert isinstance(exc, DatabaseError) and exc.transient, repr(exc)  # the run's retries may try again
        assert time.monotonic() - started < 20
    finally:
        conn.close()


def test_a_connection_sending_to_a_vanished_server_gives_up(lost_server: Any) -> None:
    """Sending (the restore's rows over COPY): data left unacknowledged is given up on (tcp_user_timeout); without
    it, the kernel retransmits for about 15 minutes."""
    cfg, hole = lost_server
    conn = pg.connect(cfg, autocommit=False)
    try:
        conn.execute("CREATE TABLE landing (b text)")
        row = b"x" * 1023 + b"\n"

        def copy() -> None:
            with pg.translate_errors("loading rows"), conn.cursor().copy("COPY landing FROM STDIN") as copier:
                for n in range(1 << 20):  # up to 1 GiB: far more than the sockets' buffers hold
                    if n == 1024:
                        hole.__enter__()
                    copier.write(row)

        started = time.monotonic()
        exc = _fails_within(40, copy)
        assert isinstance(exc, DatabaseError) and exc.transient, repr(exc)
        assert time.monotonic() - started < 30
    finally:
        conn.close()
