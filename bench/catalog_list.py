"""Benchmark of the catalog: `list` with 10,000 backups of one target, from the index against from the manifests.

Fills an S3 bucket (moto in server mode: real HTTP, on loopback) with N signed database backups of
one target (a dump, a globals object and a manifest each: 3N keys, as production has), then times:

  manifests   a catalog with no index: the listing, then every manifest read and its MAC checked (what
              every `list`, `latest` and `status` did before the index), and the index written
  index       a fresh catalog (a new process's): the listing, one index object read and its MAC checked
  one_new     the same after one more backup whose run crashed before updating the index: the listing,
              the index, the one new manifest, the index written back
  latest      `latest` as a restore resolves it: the index, then the chosen manifest read whole and checked
  reconcile   the full listing the prune (and one read a day) makes: every key of the folder and its ETag
              compared with the index (3N keys listed; no manifest read)
  cli_list    the whole `luxima-backup list --component db` command (interpreter start included), warm index

The key provider is the key file (local HMAC). With Vault Transit, checking N manifests costs N/256
Transit requests more (batched); the index costs one. Results go to bench/results/catalog_list.json.

    .venv/bin/python bench/catalog_list.py --backups 10000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devkit.sandbox import MotoS3Server  # noqa: E402
from luxima_backup import catalog, manifest, runtime  # noqa: E402
from luxima_backup.keys import new_master_key  # noqa: E402
from luxima_backup.manifest import Compression, DataObject, DbGlobals, DbManifest, DbSource, Encryption  # noqa: E402
from luxima_backup.settings import CONFIG_ENV  # noqa: E402

RESULTS = ROOT / "bench" / "results"
CLI = str(Path(sys.executable).parent / "luxima-backup")
BUCKET = "bench-catalog"


def settings_file(work: Path, s3: MotoS3Server) -> Path:
    key = work / "master.key"
    key.write_text(new_master_key())
    path = work / "settings.toml"
    path.write_text(textwrap.dedent(f"""
        work_dir = "{work / 'work'}"
        [databases.main]
        host = "127.0.0.1"
        dbname = "luxima"
        user = "postgres"
        [storage]
        bucket = "{BUCKET}"
        endpoint_url = "{s3.url}"
        access_key_id = "env:BENCH_S3_ACCESS_KEY"
        secret_access_key = "env:BENCH_S3_SECRET_KEY"
        [keys]
        provider = "file"
        key_file = "{key}"
        allow_key_file = true
    """))
    return path


def a_backup(when: datetime) -> tuple[manifest.BackupKeys, DbManifest]:
    keys = manifest.db_keys("backups", "main", when, "zst")
    size = 900_000_000 + when.minute
    dump = DataObject(key=keys.data, format="pg_dump-custom", compression=Compression(codec="zstd", level=3),
                      encryption=Encryption(chunk_size=1 << 20, provider="file", key_id="file:bench"), size_plain=size * 4,
                      size_compressed=size, size_encrypted=size + 4096, sha256_plain="a" * 64, sha256_encrypted="b" * 64,
                      bound=True)
    tables = {f"public.t{i}": i * 1000 for i in range(40)}  # a production database's main tables
    return keys, DbManifest(backup_id=keys.backup_id, status="verified", started_at=when, completed_at=when,
                            source=DbSource(name="main", database="luxima"), dump=dump,
                            globals=DbGlobals(key=keys.globals, encrypted_bytes=2048, bound=True),
                            row_counts=tables, verification={"verified_at": when.isoformat()}, timings={"total": 12.5})


def fill(cat: catalog.Catalog, client: Any, n: int) -> datetime:
    start = datetime(2020, 1, 1, 3, tzinfo=timezone.utc)

    def put(i: int) -> None:
        keys, doc = a_backup(start + timedelta(hours=i))
        client.put_object(Bucket=BUCKET, Key=keys.data, Body=b"d")
        client.put_object(Bucket=BUCKET, Key=keys.globals, Body=b"g")
        client.put_object(Bucket=BUCKET, Key=keys.manifest, Body=cat.signed(keys.manifest, doc))

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(put, range(n)))
    return start + timedelta(hours=n)


def timed(fn: Any) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return round(time.perf_counter() - t, 3), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backups", type=int, default=10_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="luxima-bench-catalog-"))
    (work / "s3").mkdir()
    s3 = MotoS3Server(root=work / "s3").start()
    try:
        os.environ.update(BENCH_S3_ACCESS_KEY=s3.access_key, BENCH_S3_SECRET_KEY=s3.secret_key)
        os.environ[CONFIG_ENV] = str(settings_file(work, s3))
        client = s3.client()
        client.create_bucket(Bucket=BUCKET)
        settings = runtime.settings()
        store, keys = runtime.store(settings), runtime.key_provider(settings)
        cat = catalog.Catalog(store, "backups", keys)
        fill_s, after = timed(lambda: fill(cat, client, args.backups))
        print(f"filled {args.backups} backups ({3 * args.backups} objects) in {fill_s} s", file=sys.stderr)

        results: dict[str, Any] = {}
        results["manifests"], found = timed(lambda: catalog.Catalog(store, "backups", keys).list_backups("db", "main"))
        assert len(found) == args.backups
        results["index"], found = timed(lambda: catalog.Catalog(store, "backups", keys).list_backups("db", "main"))
        assert len(found) == args.backups
        keys_new, doc = a_backup(after)
        client.put_object(Bucket=BUCKET, Key=keys_new.manifest, Body=cat.signed(keys_new.manifest, doc))
        results["one_new"], found = timed(lambda: catalog.Catalog(store, "backups", keys).list_backups("db", "main"))
        assert len(found) == args.backups + 1 and found[-1].backup_id == keys_new.backup_id
        results["latest"], chosen = timed(lambda: catalog.Catalog(store, "backups", keys).resolve("db", "latest", source="main"))
        assert chosen.backup_id == keys_new.backup_id
        results["reconcile"], _ = timed(lambda: catalog.Catalog(store, "backups", keys).refresh("db", "main"))
        t = time.perf_counter()
        done = subprocess.run([CLI, "list", "--component", "db", "--json"], capture_output=True, text=True, env=os.environ)
        results["cli_list"] = round(time.perf_counter() - t, 3)
        assert done.returncode == 0, done.stderr[-2000:]
        assert len(json.loads(done.stdout)) == args.backups + 1
        index_bytes = store.stat(cat.index_key("db", "main")).size
        report = {"backups": args.backups, "objects": 3 * args.backups + 1, "seconds": results,
                  "index_bytes": index_bytes, "speedup": round(results["manifests"] / results["index"], 1),
                  "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                  "when": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "catalog_list.json").write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
    finally:
        s3.stop()


if __name__ == "__main__":
    main()
