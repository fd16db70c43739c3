"""Benchmark of the database backup pipeline against hand-written shell pipelines.

Builds a realistic sample database (bench sizes in GB of uncompressed dump), then measures in
one run, on the same data and machine:

  floor      pg_dump -Fc -Z0 > /dev/null                       (reading the data at all)
  by-hand    pg_dump -Fc | openssl enc -aes-256-cbc             (what many teams run)
  shell-zstd pg_dump -Fc -Z0 | zstd -T0 | openssl enc -aes-256-cbc
  pipeline   `luxima-backup backup db --no-deep-verify`: the whole db-backup flow through a
             Prefect server, into a local-directory store (an encrypted spool on disk), with
             read-back verify (a second pass over the stored object) and manifest
  pipeline_deep_verify  the same with the deep verify (the read-back pass also decrypts,
             decompresses and feeds pg_restore --list)
  pipeline_s3  the first, into the moto S3 server over HTTP. moto is a Python test double,
             not a production S3: its own CPU use on this small machine bounds this figure.
  pipeline_s3_deep_verify  into S3 with the deep verify: the default settings, what production runs

The floor, the shell pipes, `pipeline` and the default restore with its floor are run --repeat times
(3), in turn, and their medians reported (single runs vary by 5-15 % on a 2-core machine); the
peak RSS is the highest of the runs.

and, for restores, `createdb + pg_restore -j2` from a local uncompressed dump (the floor)
against `luxima-backup restore db --jobs 2` (download, decrypt, decompress, pg_restore -j2,
verify) and its streamed form (`--jobs 1`, no plaintext file), with the measured RTO.

It reports ratios, sizes and the peak RSS of the largest process of the backup command. The
flow's own stage timings are kept too: the streaming stages alone show the data path's speed,
without the fixed cost of starting the interpreter and the flow run (~4 s here).
Results go to bench/results/db_backup-<size>gb.json and a summary table to stdout.

    .venv/bin/python bench/db_backup.py --sizes 1,4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devkit import sample  # noqa: E402
from luxima_backup.keys import new_master_key  # noqa: E402
from devkit.sandbox import MotoS3Server, PostgresCluster, PrefectServer  # noqa: E402

RESULTS = ROOT / "bench" / "results"
BUCKET = "bench-backups"
# sample.populate scale 1 gives ~10.6 MB of uncompressed custom-format dump (measured).
MB_PER_SCALE = 10.6


def run_timed(cmd: list[str] | str, env: dict[str, str], shell: bool = False) -> dict[str, float]:
    """Run a command to completion; wall time and the peak RSS of its largest process."""
    t0 = time.monotonic()
    proc = subprocess.Popen(["bash", "-o", "pipefail", "-c", cmd] if shell else cmd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate()
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"bench: command failed ({proc.returncode}): {cmd}\n{err.decode()[-3000:]}")
    # Children's rusage: ru_maxrss is the largest single descendant process (KiB on Linux).
    return {"seconds": round(seconds, 2), "stdout": out.decode(), "maxrss_mib_children": _children_maxrss()}


def _children_maxrss() -> float:
    return round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)


def measure_pipeline(env: dict[str, str], deep: bool) -> dict[str, float]:
    # A fresh interpreter per run so ru_maxrss (a high-water mark) belongs to this run alone.
    probe = ROOT / "bench" / "_rss_probe.py"
    cmd = [sys.executable, str(probe), str(ROOT / ".venv" / "bin" / "luxima-backup"), "backup", "db",
           "--deep-verify" if deep else "--no-deep-verify"]
    r = run_timed(cmd, env)
    lines = r["stdout"].strip().splitlines()
    probe_out = json.loads(lines[-1])
    summary = json.loads("\n".join(lines[:-1]))
    return {"seconds": r["seconds"], "peak_rss_mib": probe_out["maxrss_mib"], "summary": summary}


def bench_size(gb: float, keep: bool, repeat: int) -> dict:
    password = secrets.token_urlsafe(16)
    work = Path(tempfile.mkdtemp(prefix="luxima-bench-"))
    pg = PostgresCluster(password)
    s3 = MotoS3Server()
    prefect = PrefectServer()
    try:
        pg.start()
        s3.start()
        prefect.start()
        s3.create_bucket(BUCKET)
        scale = gb * 1000 / MB_PER_SCALE
        t0 = time.monotonic()
        with pg.connect() as conn:
            conn.execute("CREATE DATABASE bench")
        with pg.connect("bench") as conn:
            counts = sample.populate(conn, scale)
            db_size = conn.execute("SELECT pg_database_size('bench')").fetchone()[0]
        with pg.connect("bench") as conn:
            # Settle the new data first (visibility map, statistics, dirty buffers written) so autovacuum and the
            # checkpointer do not run during the first measurements only.
            conn.autocommit = True
            conn.execute("VACUUM (ANALYZE)")
            conn.execute("CHECKPOINT")
        populate_s = time.monotonic() - t0
        print(f"bench: {gb} GB target: populated scale {scale:.0f} in {populate_s:.0f}s, "
              f"database {db_size / 1e9:.2f} GB", flush=True)

        key_file = work / "master.key"
        key_file.write_text(new_master_key() + "\n")
        key_file.chmod(0o600)
        config = work / "bench.toml"
        config.write_text(f"""work_dir = "{work / 'work'}"
[databases.bench]
host = "127.0.0.1"
port = {pg.port}
dbname = "bench"
user = "postgres"
password = "env:BENCH_PGPASSWORD"
sslmode = "disable"
[storage]
bucket = "{BUCKET}"
endpoint_url = "{s3.url}"
access_key_id = "env:BENCH_S3_KEY"
secret_access_key = "env:BENCH_S3_SECRET"
[keys]
provider = "file"
key_file = "{key_file}"
allow_key_file = true
[db_backup]
database = "bench"
globals = false
[log]
enabled = false
""")
        env = dict(os.environ, **prefect.env(), BENCH_PGPASSWORD=password, PGPASSWORD=password,
                   BENCH_S3_KEY=s3.access_key, BENCH_S3_SECRET=s3.secret_key, LUXIMA_BACKUP_CONFIG=str(config),
                   PREFECT_LOGGING_LEVEL="WARNING")
        bindir = pg.bin
        dump = f"{bindir}/pg_dump -h 127.0.0.1 -p {pg.port} -U postgres -d bench -Fc"
        enc = "openssl enc -aes-256-cbc -pbkdf2 -pass env:BENCH_PGPASSWORD"
        spool = work / "spool"
        shell = {
            "floor": f"{dump} -Z0 > /dev/null",
            "by_hand": f"{dump} | {enc} > {spool}.a",
            "shell_zstd": f"{dump} -Z0 | zstd -q -T0 | {enc} > {spool}.b",
        }
        results: dict = {"target_gb": gb, "scale": round(scale), "database_bytes": db_size, "row_counts": counts}
        # Warm the cache the same way for everyone: one untimed floor run first.
        run_timed(shell["floor"], env, shell=True)
        # The figures compared by ratios (the floor, the best shell pipe, the command) are taken `repeat` times,
        # in turn, and their medians reported: on a small machine single runs vary by 5-15 %.
        store_env = dict(env, LUXIMA_BACKUP__STORAGE__KIND="local", LUXIMA_BACKUP__STORAGE__PATH=str(work / "store"))
        pipeline_runs: list[dict] = []
        for name, cmd in shell.items():
            results[name] = {"samples": [], "command": cmd.replace(str(work), "$WORK")}
        for round_ in range(repeat):
            for name, cmd in shell.items():
                if name == "by_hand" and round_ > 0:
                    continue  # 6x slower than the rest, compared with nothing that needs precision
                results[name]["samples"].append(run_timed(cmd, env, shell=True)["seconds"])
            pipeline_runs.append(measure_pipeline(store_env, False))
            print(f"bench: round {round_ + 1}: " + ", ".join(f"{n} {results[n]['samples'][-1]:.1f}s" for n in shell)
                  + f", pipeline {pipeline_runs[-1]['seconds']:.1f}s", flush=True)
        for name in shell:
            results[name]["seconds"] = statistics.median(results[name]["samples"])
        results["by_hand"]["bytes"] = (work / "spool.a").stat().st_size
        results["shell_zstd"]["bytes"] = (work / "spool.b").stat().st_size
        (work / "spool.a").unlink()
        (work / "spool.b").unlink()
        raw = subprocess.run(f"{dump} -Z0 | wc -c", shell=True, env=env, capture_output=True, text=True, check=True)
        gz = subprocess.run(f"{dump} | wc -c", shell=True, env=env, capture_output=True, text=True, check=True)
        results["pg_dump_uncompressed_bytes"] = int(raw.stdout)
        results["pg_dump_gzip_bytes"] = int(gz.stdout)

        for name, deep, run_env in (("pipeline", False, store_env), ("pipeline_deep_verify", True, store_env),
                                    ("pipeline_s3", False, env), ("pipeline_s3_deep_verify", True, env)):
            if name == "pipeline":  # the median run (its stage timings with it); the highest peak RSS of all
                r = sorted(pipeline_runs, key=lambda x: x["seconds"])[len(pipeline_runs) // 2]
                r = dict(r, samples=[x["seconds"] for x in pipeline_runs],
                         peak_rss_mib=max(x["peak_rss_mib"] for x in pipeline_runs))
            else:
                r = measure_pipeline(run_env, deep)
            s = r.pop("summary")
            r["encrypted_bytes"] = s["size_encrypted"]
            r["dump_bytes"] = s["size_plain"]
            r["flow_seconds"] = s["seconds"]
            r["stage_seconds"] = s["timings"]
            results[name] = r
            print(f"bench: {name}: {r['seconds']:.1f}s, peak RSS {r['peak_rss_mib']} MiB", flush=True)

        # Restore: the floor is pg_restore -j2 from a local uncompressed dump (into a new database).
        plain_dump = work / "plain.dump"
        subprocess.run(f"{dump} -Z0 -f {plain_dump}", shell=True, env=env, check=True)
        psql = f"{bindir}/psql -h 127.0.0.1 -p {pg.port} -U postgres -d postgres -q -c"
        floors: list[float] = []
        restores: list[dict] = []

        def restore_run(name: str, jobs: int) -> dict:
            cmd = [sys.executable, str(ROOT / "bench" / "_rss_probe.py"), str(ROOT / ".venv" / "bin" / "luxima-backup"),
                   "restore", "db", "--jobs", str(jobs), "--target-database", name]
            r = run_timed(cmd, store_env)
            lines = r["stdout"].strip().splitlines()
            out = json.loads("\n".join(lines[:-1]))
            return {"seconds": r["seconds"], "rto_seconds": out["rto_seconds"], "stage_seconds": out["timings"],
                    "peak_rss_mib": json.loads(lines[-1])["maxrss_mib"], "jobs": jobs}

        for round_ in range(repeat):  # the floor and the default restore in turn, as above
            r = run_timed(f"{psql} 'CREATE DATABASE restore_floor_{round_} TEMPLATE template0' && "
                          f"{bindir}/pg_restore -h 127.0.0.1 -p {pg.port} -U postgres -j2 --exit-on-error "
                          f"-d restore_floor_{round_} {plain_dump}", env, shell=True)
            floors.append(r["seconds"])
            restores.append(restore_run(f"restore_pipeline_{round_}", 2))
            print(f"bench: restore round {round_ + 1}: floor {floors[-1]:.1f}s, restore {restores[-1]['seconds']:.1f}s "
                  f"(RTO {restores[-1]['rto_seconds']:.1f}s)", flush=True)
            for db in (f"restore_floor_{round_}", f"restore_pipeline_{round_}"):  # room on disk for the next round
                subprocess.run(f"{psql} 'DROP DATABASE {db}'", shell=True, env=env, check=True)
        plain_dump.unlink()
        results["restore_floor"] = {"seconds": statistics.median(floors), "samples": floors,
                                    "command": "createdb + pg_restore -j2 (local uncompressed dump)"}
        median = sorted(restores, key=lambda x: x["seconds"])[len(restores) // 2]
        results["restore_pipeline"] = dict(median, samples=[x["seconds"] for x in restores],
                                           peak_rss_mib=max(x["peak_rss_mib"] for x in restores))
        results["restore_pipeline_stream"] = restore_run("restore_pipeline_stream", 1)
        print(f"bench: restore_pipeline_stream: {results['restore_pipeline_stream']['seconds']:.1f}s", flush=True)

        floor = results["floor"]["seconds"]
        p = results["pipeline"]
        results["ratios"] = {
            "pipeline_over_floor": round(p["seconds"] / floor, 2),
            "by_hand_over_pipeline": round(results["by_hand"]["seconds"] / p["seconds"], 2),
            "shell_zstd_over_pipeline": round(results["shell_zstd"]["seconds"] / p["seconds"], 2),
            "pipeline_size_over_pg_dump_gzip": round(p["encrypted_bytes"] / results["pg_dump_gzip_bytes"], 3),
            "compression_ratio": round(p["dump_bytes"] / p["encrypted_bytes"], 2),
            "restore_over_floor": round(results["restore_pipeline"]["seconds"] / results["restore_floor"]["seconds"], 2),
        }
        return results
    finally:
        prefect.stop()
        s3.stop()
        if keep:
            print(f"bench: kept {pg.root} and {work}")
        else:
            pg.destroy()
            subprocess.run(["rm", "-rf", str(work)], check=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,4", help="comma-separated sizes in GB of uncompressed dump (default 1,4)")
    ap.add_argument("--keep", action="store_true", help="keep the database cluster and work files")
    ap.add_argument("--repeat", type=int, default=3, help="runs of the floors, the shell pipe, the backup command and the "
                    "default restore, taken in turn; medians reported (default 3)")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
               "openssl": subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout.strip()}
    rows = []
    for size in (float(s) for s in args.sizes.split(",")):
        res = bench_size(size, args.keep, args.repeat)
        res["machine"] = machine
        res["when"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        name = f"db_backup-{size:g}gb.json"
        (RESULTS / name).write_text(json.dumps(res, indent=2) + "\n")
        rows.append(res)
    print()
    print("| dump size | restore floor (pg_restore -j2) | restore pipeline -j2 | streamed (-j1) | ratio |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pg_dump_uncompressed_bytes'] / 1e9:.2f} GB | {r['restore_floor']['seconds']}s "
              f"| {r['restore_pipeline']['seconds']}s (RTO {r['restore_pipeline']['rto_seconds']}s) "
              f"| {r['restore_pipeline_stream']['seconds']}s | {r['ratios']['restore_over_floor']}x |")
    print()
    print("| dump size | floor | by hand | shell zstd | pipeline | + deep verify | to moto S3 | pipeline/floor "
          "| by-hand/pipeline | size vs pg_dump gzip | peak RSS | peak RSS, S3 + deep verify |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        q = r["ratios"]
        print(f"| {r['pg_dump_uncompressed_bytes'] / 1e9:.2f} GB | {r['floor']['seconds']}s | {r['by_hand']['seconds']}s "
              f"| {r['shell_zstd']['seconds']}s | {r['pipeline']['seconds']}s | {r['pipeline_deep_verify']['seconds']}s "
              f"| {r['pipeline_s3']['seconds']}s "
              f"| {q['pipeline_over_floor']}x | {q['by_hand_over_pipeline']}x | {q['pipeline_size_over_pg_dump_gzip']}x "
              f"| {r['pipeline']['peak_rss_mib']} MiB | {r['pipeline_s3_deep_verify']['peak_rss_mib']} MiB |")


if __name__ == "__main__":
    main()
