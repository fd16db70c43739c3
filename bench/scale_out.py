"""Benchmark of scheduled runs through Prefect's own engine: how many small backups per hour one worker and two
workers complete, and what the orchestration costs per run.

Runs what docs/scaling.md describes, on this machine: a Prefect server whose database is PostgreSQL, the
deployments of prefect.yaml registered by `luxima-backup deploy`, and process workers
(`luxima-backup worker --limit 1`: one backup at a time per worker, as a small backup host runs). The targets
are small: databases of ~1 MB of dump and folders of 2 MB of files, into a local-directory store, so what
is measured is the engine, not the data path (bench/db_backup.py and bench/files_backup.py measure that).

For each worker count, the same batch is submitted at once (half db-backup runs of different databases, half
files-backup runs of different folders) and timed from submission to the last run's end. Each deployment
allows one run at a time (its concurrency limit), so two workers can only overlap runs of different
deployments: that is the most a second worker can add here. Per run it reports, from the server's own
timestamps:

  pickup       scheduled time → Running (worker poll, process start, interpreter and imports)
  first byte   Running → the dump task's start (database runs: the flow's own work before pg_dump runs)
  run          Running → end

Workers poll every PREFECT_WORKER_QUERY_SECONDS (Prefect's default 10 s; set to 2 here, and reported).
Results go to bench/results/scale_out.json and a summary table to stdout.

    .venv/bin/python bench/scale_out.py --runs 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devkit import sample  # noqa: E402
from devkit.sandbox import PostgresCluster, PrefectServer, stop_group  # noqa: E402
from luxima_backup.keys import new_master_key  # noqa: E402

CLI = str(ROOT / ".venv" / "bin" / "luxima-backup")
RESULTS = ROOT / "bench" / "results"
QUERY_SECONDS = "2"


def _ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _post(api: str, path: str, body: dict[str, Any]) -> Any:
    got = httpx.post(f"{api}{path}", json=body, timeout=30)
    got.raise_for_status()
    return got.json()


def _wait(api: str, ids: list[str], timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        runs = [httpx.get(f"{api}/flow_runs/{i}", timeout=30).json() for i in ids]
        if all(r["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for r in runs):
            return runs
        if time.monotonic() > deadline:
            raise SystemExit(f"runs not finished after {timeout} s: {[(r['name'], r['state']['name']) for r in runs]}")
        time.sleep(1)


def _first_byte(api: str, run: dict[str, Any]) -> float | None:
    """Seconds from the run's Running to the start of its dump task (in the db-backup-stream subflow)."""
    subflows = _post(api, "/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [run["id"]]}}, "limit": 10})
    ids = [run["id"], *(s["id"] for s in subflows)]
    tasks = _post(api, "/task_runs/filter", {"task_runs": {"name": {"like_": "dump-%"}}, "flow_runs": {"id": {"any_": ids}},
                                              "limit": 10})
    starts = [_ts(t["start_time"]) for t in tasks if t.get("start_time")]
    return round((min(starts) - _ts(run["start_time"])).total_seconds(), 3) if starts else None


def measure(api: str, env: dict[str, str], work: Path, workers: int, dbs: list[str], folders: list[str]) -> dict[str, Any]:
    procs = []
    for i in range(workers):
        log = open(work / f"worker-{workers}-{i}.log", "wb")
        procs.append(subprocess.Popen([CLI, "worker", "--limit", "1", "--name", f"bench-{workers}-{i}"], env=env,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    try:
        time.sleep(8)  # the workers have registered and polled once
        from prefect.deployments import run_deployment

        t0 = time.time()
        ids = []
        for db, folder in zip(dbs, folders):
            ids.append(str(run_deployment("db-backup/db-backup", parameters={"database": db}, timeout=0).id))
            ids.append(str(run_deployment("files-backup/files-backup", parameters={"sources": [folder]}, timeout=0).id))
        runs = _wait(api, ids, 1800)
        bad = [(r["name"], r["state"]["name"], r["state"].get("message")) for r in runs if r["state"]["type"] != "COMPLETED"]
        if bad:
            raise SystemExit(f"runs failed: {bad}")
        elapsed = max(_ts(r["end_time"]) for r in runs).timestamp() - t0
        pickup = [(_ts(r["start_time"]) - _ts(r["expected_start_time"])).total_seconds() for r in runs]
        first = [x for x in (_first_byte(api, r) for r in runs if "database" in r["parameters"]) if x is not None]
        run_s = [(_ts(r["end_time"]) - _ts(r["start_time"])).total_seconds() for r in runs]
        return {
            "workers": workers, "runs": len(runs), "elapsed_seconds": round(elapsed, 1),
            "backups_per_hour": round(len(runs) * 3600 / elapsed),
            "pickup_seconds_median": round(statistics.median(pickup), 2),
            "first_byte_seconds_median": round(statistics.median(first), 2), "first_byte_seconds_max": round(max(first), 2),
            "run_seconds_median": round(statistics.median(run_s), 2),
        }
    finally:
        for p in procs:
            stop_group(p, 30, signal.SIGINT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=8, help="runs per batch (half database, half files)")
    args = parser.parse_args()
    pairs = max(1, args.runs // 2)
    password = secrets.token_urlsafe(16)
    work = Path(tempfile.mkdtemp(prefix="luxima-bench-scale-"))
    pg = PostgresCluster(password)
    prefect = None
    try:
        pg.start()
        with pg.connect() as conn:
            conn.execute("CREATE DATABASE prefect")
            for i in range(pairs):
                conn.execute(f"CREATE DATABASE app{i}")
        for i in range(pairs):
            with pg.connect(f"app{i}") as conn:
                sample.populate(conn, 0.1)
        prefect = PrefectServer(database_url=f"postgresql+asyncpg://postgres:{quote(password, safe='')}@127.0.0.1:{pg.port}/prefect")
        prefect.start()
        key_file = work / "master.key"
        key_file.write_text(new_master_key() + "\n")
        key_file.chmod(0o600)
        sections = ""
        for i in range(pairs):
            sections += (f'[databases.app{i}]\nhost = "127.0.0.1"\nport = {pg.port}\ndbname = "app{i}"\nuser = "postgres"\n'
                         f'password = "env:BENCH_PGPASSWORD"\nsslmode = "disable"\n')
            folder = work / f"files{i}"
            folder.mkdir()
            for j in range(100):
                (folder / f"f{j}.bin").write_bytes(os.urandom(20_000))
            sections += f'[files_backup.sources.files{i}]\nkind = "local"\npath = "{folder}"\n'
        config = work / "bench.toml"
        config.write_text(f'work_dir = "{work / "work"}"\n{sections}[storage]\nkind = "local"\npath = "{work / "store"}"\n'
                          f'[keys]\nprovider = "file"\nkey_file = "{key_file}"\nallow_key_file = true\n'
                          f'[db_backup]\ndatabase = "app0"\nglobals = false\n[log]\nenabled = false\n')
        env = dict(os.environ, **prefect.env(), BENCH_PGPASSWORD=password, LUXIMA_BACKUP_CONFIG=str(config),
                   PREFECT_WORKER_QUERY_SECONDS=QUERY_SECONDS, PREFECT_LOGGING_LEVEL="WARNING")
        os.environ.update(PREFECT_API_URL=prefect.api_url)
        subprocess.run([CLI, "deploy", "--no-alerts"], env=env, check=True, capture_output=True)
        dbs, folders = [f"app{i}" for i in range(pairs)], [f"files{i}" for i in range(pairs)]
        results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                   "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "worker_query_seconds": float(QUERY_SECONDS), "prefect_database": "postgresql", "batches": []}
        for workers in (1, 2):
            r = measure(prefect.api_url, env, work, workers, dbs, folders)
            results["batches"].append(r)
            print(f"bench: {workers} worker(s): {r}", flush=True)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "scale_out.json").write_text(json.dumps(results, indent=1) + "\n")
        print("\n| workers | runs | elapsed | backups/hour | pickup (median) | Running → pg_dump (median / max) | run (median) |")
        print("|---|---|---|---|---|---|---|")
        for r in results["batches"]:
            print(f"| {r['workers']} | {r['runs']} | {r['elapsed_seconds']}s | {r['backups_per_hour']} | {r['pickup_seconds_median']}s "
                  f"| {r['first_byte_seconds_median']}s / {r['first_byte_seconds_max']}s | {r['run_seconds_median']}s |")
    finally:
        if prefect is not None:
            prefect.stop()
        pg.destroy()
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
