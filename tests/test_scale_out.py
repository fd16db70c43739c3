"""Scale-out on Prefect's own engine, as docs/scaling.md describes it: a Prefect server whose database is PostgreSQL,
and two process workers (`luxima-backup worker`) polling one work pool.

Backups of several targets spread over both workers; each deployment's limit of one run at a time holds across
workers; a worker that dies in the middle of an upload (its host gone: the worker and its flow process SIGKILLed)
leaves that run Crashed, said in chat, and the next run succeeds; nothing is uploaded twice or left half-written
where a restore could take it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote

import httpx
import pytest

from deployments.alerts import setup_alerts
from devkit.sandbox import PostgresCluster, PrefectServer, stop_group
from tests.alerting import Receiver, alert_settings, wait_until_live
from tests.conftest import DB_PASSWORD, file_keys
from tests.fault_proxy import FaultProxy
from tests.helpers import background, cli_env, make_source

pytestmark = pytest.mark.slow
CLI = str(Path(sys.executable).parent / "luxima-backup")
WORKERS = ("backup-host-1", "backup-host-2")


@pytest.fixture(scope="module")
def prefect_on_postgres(pg_cluster: PostgresCluster) -> Iterator[PrefectServer]:
    """A Prefect server with its database on the PostgreSQL cluster (its own database there), not SQLite."""
    name = "prefect_" + uuid.uuid4().hex[:8]
    with pg_cluster.connect() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+asyncpg://postgres:{quote(DB_PASSWORD, safe='')}@127.0.0.1:{pg_cluster.port}/{name}"
    server = PrefectServer(database_url=url)
    server.dbname = name  # type: ignore[attr-defined]
    try:
        yield server.start()
    finally:
        server.stop()
        with pg_cluster.connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _api(server: PrefectServer, path: str, body: dict[str, Any] | None = None) -> Any:
    got = httpx.post(f"{server.api_url}{path}", json=body) if body is not None else httpx.get(f"{server.api_url}{path}")
    got.raise_for_status()
    return got.json()


def _run(server: PrefectServer, flow_run_id: str) -> dict[str, Any]:
    return _api(server, f"/flow_runs/{flow_run_id}")


def _wait_final(server: PrefectServer, ids: list[str], timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        runs = [_run(server, i) for i in ids]
        if all(r["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for r in runs):
            return runs
        assert time.monotonic() < deadline, [(r["name"], r["state"]["name"]) for r in runs]
        time.sleep(2)


def _worker_of(server: PrefectServer, flow_run_id: str) -> str | None:
    """The worker that took the run last (a worker that met the deployment's limit hands it back for later)."""
    logs = _api(server, "/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC",
                                         "limit": 200})
    named = [w for log in logs for w in WORKERS if f"Worker '{w}' submitting flow run" in log["message"]]
    return named[-1] if named else None


def _ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return _ts(a["start_time"]) < _ts(b["end_time"]) and _ts(b["start_time"]) < _ts(a["end_time"])


def test_two_workers_share_the_pool_hold_each_limit_and_survive_a_dead_worker(
    prefect_on_postgres: PrefectServer, pg_cluster: PostgresCluster, s3_server: Any, database: str, bucket: str,
    key_file: Path, write_settings: Any, source: dict[str, int], receiver: Receiver, monkeypatch: pytest.MonkeyPatch,
    prefix: str, tmp_path: Path,
) -> None:
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = prefect_on_postgres
    # Targets: three databases and two folders of files.
    sections = ""
    for name in ("billing", "crm"):
        with pg_cluster.connect() as conn:
            conn.execute(f'CREATE DATABASE "{database}_{name}"')
        with pg_cluster.connect(f"{database}_{name}") as conn:
            make_source(conn)
            if name == "crm":  # big enough that its upload has several parts: the one killed mid-upload
                conn.execute("CREATE TABLE app.blobs AS SELECT g AS id, string_agg(md5(random()::text), '') AS body "
                             "FROM generate_series(1, 200) g, generate_series(1, 3000) h GROUP BY g")
        sections += f"""
            [databases.{name}]
            host = "127.0.0.1"
            port = {pg_cluster.port}
            dbname = "{database}_{name}"
            user = "postgres"
            password = "env:LUXIMA_TEST_DB_PASSWORD"
            sslmode = "disable"
            schemas = ["public", "app"]
        """
    for name in ("docs", "photos"):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(20):
            (folder / f"{name}-{i}.bin").write_bytes(os.urandom(20_000))
        sections += f"""
            [files_backup.sources.{name}]
            kind = "local"
            path = "{folder}"
        """
    proxy = FaultProxy(s3_server.url).start()
    config = write_settings(database, bucket, file_keys(key_file), sections, endpoint=proxy.url)
    env = cli_env(server, config)
    workers: list[subprocess.Popen[bytes]] = []
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            done = subprocess.run([CLI, "deploy", "--no-alerts"], env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stdout + done.stderr
            setup_alerts(alert_settings(receiver, monkeypatch, prefix, unresponsive_after=45), components=[])
            wait_until_live(receiver)
            workers = [background([CLI, "worker", "--limit", "1", "--name", w], env, tmp_path / f"{w}.log") for w in WORKERS]

            # Five backups of five targets, all due at once.
            ids = [str(run_deployment("db-backup/db-backup", parameters={"database": db}, timeout=0).id)
                   for db in ("main", "billing", "crm")]
            ids += [str(run_deployment("files-backup/files-backup", parameters={"sources": [s]}, timeout=0).id)
                    for s in ("docs", "photos")]
            runs = _wait_final(server, ids, timeout=600)
            logs = "\n".join((tmp_path / f"{w}.log").read_text()[-3000:] for w in WORKERS)
            assert all(r["state"]["type"] == "COMPLETED" for r in runs), ([(r["name"], r["state"]) for r in runs], logs)

            # Spread over both workers, each running one at a time (--limit 1).
            by_worker = {i: _worker_of(server, i) for i in ids}
            assert set(by_worker.values()) == set(WORKERS), by_worker
            db_runs, files_runs = runs[:3], runs[3:]
            # One db-backup at a time, and one files-backup at a time, whichever worker ran them.
            for group in (db_runs, files_runs):
                assert not any(_overlap(a, b) for a in group for b in group if a is not b), \
                    [(r["name"], r["start_time"], r["end_time"]) for r in group]

            # A worker dies in the middle of an upload: its host is gone, nothing gets to report.
            proxy.hold_when = lambda method, path: method == "PUT" and "partNumber" in path and "/db/crm/" in path
            proxy.hold.clear()
            victim = str(run_deployment("db-backup/db-backup", parameters={"database": "crm"}, timeout=0).id)
            assert proxy.held.wait(240), "the crm backup never reached its upload"
            running = _run(server, victim)
            assert running["state"]["type"] == "RUNNING"
            host = _worker_of(server, victim)
            assert host in WORKERS
            dead = workers[WORKERS.index(host)]
            os.killpg(dead.pid, signal.SIGKILL)
            flow_pid = int(str(running["infrastructure_pid"]).rsplit(":", 1)[-1])
            try:
                os.killpg(flow_pid, signal.SIGKILL)  # the flow process runs in its own session
            except ProcessLookupError:
                pass
            dead.wait()
            proxy.hold.set()  # storage answers again; nobody is left to finish that upload

            message = receiver.about_run(victim, timeout=240)
            assert "Crashed" in message["subject"], message
            assert _run(server, victim)["state"]["name"] == "Crashed"

            # The next run of the same deployment and target succeeds, on the surviving worker.
            again = str(run_deployment("db-backup/db-backup", parameters={"database": "crm"}, timeout=0).id)
            final = _wait_final(server, [again], timeout=400)[0]
            assert final["state"]["type"] == "COMPLETED", (final["state"], (tmp_path / f"{WORKERS[1 - WORKERS.index(host)]}.log").read_text()[-3000:])
            assert _worker_of(server, again) != host
    finally:
        for w in workers:
            stop_group(w, 30, signal.SIGINT)
        proxy.stop()

    # Nothing uploaded twice, nothing half-written where a restore would look: every stored object has exactly one
    # version and belongs to a backup whose manifest was written; the dead run's upload never became an object.
    client = s3_server.client()
    versions = client.list_object_versions(Bucket=bucket).get("Versions", [])
    keys = [v["Key"] for v in versions if not v["Key"].startswith("backups/_catalog/")]  # (indexes are rewritten)
    assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)
    manifests = [k for k in keys if k.endswith(".manifest.json")]
    crm = sorted(k for k in manifests if "/db/crm/" in k)
    assert len(crm) == 2  # the first crm backup and the one after the crash; none for the crashed run
    from luxima_backup.manifest import manifest_key_for

    backup_objects = [k for k in keys if re.search(r"/\d{8}T\d{6}Z\.[^/]+$", k) and k not in manifests]
    assert len(backup_objects) >= 6  # the dumps and file archives (and their indexes, globals) of six backups
    orphans = [k for k in backup_objects if manifest_key_for(k) not in manifests]
    assert not orphans, orphans
    open_uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert [u["Key"] for u in open_uploads if "/db/crm/" in u["Key"]], "the dead run's upload stays open, not an object"
    assert all(u["Key"] not in keys for u in open_uploads)

    # The server kept all of this in PostgreSQL.
    with pg_cluster.connect(server.dbname) as conn:  # type: ignore[attr-defined]
        stored = conn.execute("SELECT count(*) FROM flow_run WHERE id = ANY(%s::uuid[])", (ids + [victim, again],)).fetchone()[0]
    assert stored == len(ids) + 2
