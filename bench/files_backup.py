"""Benchmark of the files backup against `tar czf - | openssl enc` by hand.

Builds a seeded tree of user uploads (50,000 files per GB: ~88% small 1-20 KB json/txt/md/csv
documents that compress well, ~10% 5-40 KB avatars and a few hundred 100 KB-2 MB photos of
random bytes, three 20-50 MB files per GB, half videos of random bytes, half CSV exports),
cached under bench/work/ by size and seed. Then measures in one run, on the same tree and
machine, with the page cache warmed by one untimed `tar cf - | wc -c` first:

  floor        tar cf - TREE | wc -c                          (reading the data at all; piped,
               because GNU tar skips reading file data when its output is /dev/null)
  by_hand      tar czf - TREE | openssl enc -aes-256-cbc -pbkdf2 | wc -c   (what many teams run)
  by_hand_zstd tar cf - TREE | zstd -q -T0 | openssl enc -aes-256-cbc -pbkdf2 | wc -c
  first        `luxima-backup backup files` (the files-backup flow) through a Prefect server, into a
               local-directory store, gzip, with deep verify (the default): rsync of the tree
               into an empty staging mirror (a full copy), tar with per-file md5 and sha256,
               gzip, encrypt, write, the encrypted index, a read-back pass that decrypts,
               decompresses and parses every member, and the manifest. Wall time of the whole
               command, interpreter start included.
  incremental  the same command again after 1% of the files (a seeded sample) got new content
               and a new mtime: rsync moves only those, the archive holds only those (plus
               folders), the rest come from the previous index. Reported as seconds and as a
               fraction of `first`, with the transferred and stored counts from the summary.
  first_zstd   `first` with files_backup.compression = "zstd", into its own empty mirror and
               store (so it is a first run too).
  first_direct `first` with the source's direct = true: archived in place, no staging copy (each
               file checked unchanged across its read), into its own empty store.
  unchanged_direct  the same again with nothing changed: its archive stage (the walk, and the
               merge with the previous index) is an incremental run's fixed cost, also given per
               50,000 files.

Sizes: `tar_bytes` is GNU tar's stream of the tree; `by_hand_bytes` what the by-hand pipeline
writes; the flow's `tar_bytes`, `compressed_bytes` and `encrypted_bytes` come from its manifest
(its tar is Python's, PAX headers, so a little larger than GNU tar's). Peak RSS is the largest
single process of the backup command's tree (via bench/_rss_probe.py: the Python process, or
the rsync it runs), measured at every size to show that memory does not grow with the tree.
The manifest's stage timings (sync, and the concurrent archive/compress/encrypt/upload stream)
are kept too. The changed files are put back as they were after the run, so the cached tree
stays the seeded one. Results go to bench/results/files_backup-<size>gb.json and a summary
table to stdout.

    .venv/bin/python bench/files_backup.py --sizes 0.25,1
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from luxima_backup.keys import new_master_key  # noqa: E402
from devkit.sandbox import PrefectServer  # noqa: E402

RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "bench" / "work"
FILES_PER_GB = 50_000
TREE_VERSION = 1  # bump when the tree's shape changes, so cached trees are rebuilt
SOURCE = "uploads"
CHANGE_FRACTION = 0.01
PASSWORD = "bench-not-a-secret"
CLI = str(Path(sys.executable).parent / "luxima-backup")

KB, MB = 1000, 1000 * 1000


# --- the tree -------------------------------------------------------------------------------

def _log_uniform(rng: random.Random, lo: float, hi: float) -> int:
    """Sizes spread like real uploads: many near ``lo``, few near ``hi``."""
    return int(lo * (hi / lo) ** rng.random())


def _mean_log_uniform(lo: float, hi: float) -> float:
    return (hi - lo) / math.log(hi / lo)


def _time_between(rng: random.Random, year: int, month: int) -> int:
    start = datetime(year, month, 1, tzinfo=timezone.utc).timestamp()
    return int((start + rng.random() * 27 * 86400) * 1e9)


def plan_tree(gb: float, seed: int) -> list[dict[str, Any]]:
    """Every file of the tree (path, kind, size, mtime); the counts scale with ``gb``, the byte total ~ gb x 1e9."""
    rng = random.Random(f"plan:{seed}:{gb}")
    total, n = gb * 1e9, round(FILES_PER_GB * gb)
    plan: list[dict[str, Any]] = []

    def add(rel: str, kind: str, size: int, year: int, month: int) -> None:
        plan.append({"path": rel, "kind": kind, "size": max(1, size), "mtime_ns": _time_between(rng, year, month)})

    def some_month() -> tuple[int, int]:
        return rng.randint(2021, 2025), rng.randint(1, 12)

    for i in range(round(3 * gb)):
        y, m = some_month()
        if i % 2 == 0:
            add(f"media/videos/{y}/clip-{i:04d}.mp4", "video", int(rng.uniform(20 * MB, 50 * MB)), y, m)
        else:
            add(f"exports/{y}-{m:02d}/orders-{i:04d}.csv", "export", int(rng.uniform(20 * MB, 50 * MB)), y, m)
    n_avatars = n // 10
    for i in range(n_avatars):
        uid = rng.getrandbits(64)
        add(f"avatars/{uid >> 56:02x}/{uid:016x}.jpg", "avatar", _log_uniform(rng, 5 * KB, 40 * KB), *some_month())
    # Photos take what the documents leave of the byte budget.
    doc_mean, photo_mean = _mean_log_uniform(1 * KB, 20 * KB), _mean_log_uniform(100 * KB, 2 * MB)
    left = total - sum(f["size"] for f in plan)
    n_left = n - len(plan)
    n_photos = max(1, round((left - n_left * doc_mean) / (photo_mean - doc_mean)))
    photos = [_log_uniform(rng, 100 * KB, 2 * MB) for _ in range(n_photos)]
    n_docs = max(0, n_left - n_photos)
    docs = [_log_uniform(rng, 1 * KB, 20 * KB) for _ in range(n_docs)]
    scale = max(0.2, (left - sum(docs)) / sum(photos))  # hit the byte total, sizes stay near their range
    for i, size in enumerate(photos):
        y, m = some_month()
        add(f"photos/{y}/{m:02d}/IMG_{i:06d}.jpg", "photo", int(size * scale), y, m)
    users = max(1, n_docs // 40)
    for i, size in enumerate(docs):
        kind = rng.choices(("json", "text", "csv"), (5, 4, 1))[0]
        folder = rng.choice(("invoices", "notes", "forms", "reports"))
        ext = {"json": "json", "text": rng.choice(("txt", "md")), "csv": "csv"}[kind]
        add(f"documents/user-{rng.randrange(users):05d}/{folder}/doc-{i:06d}.{ext}", kind, size, *some_month())
    plan.sort(key=lambda f: f["path"])
    return plan


class Words:
    """A seeded pseudo-language with Zipf-like word frequencies: text that gzip shrinks ~2.5x, as real text."""

    def __init__(self, seed: int):
        rng = random.Random(f"words:{seed}")
        syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in ("a", "e", "i", "o", "u", "ai", "ou")]
        self.vocab = sorted({"".join(rng.choices(syllables, k=rng.choice((1, 2, 2, 3, 3, 4)))) for _ in range(6000)})
        rng.shuffle(self.vocab)
        weights = [1 / (r + 1) for r in range(len(self.vocab))]
        self.cum = list(itertools.accumulate(weights))

    def text(self, rng: random.Random, n_bytes: int) -> str:
        words = rng.choices(self.vocab, cum_weights=self.cum, k=n_bytes // 5 + 8)
        return "\n".join(" ".join(words[i:i + 11]) for i in range(0, len(words), 11))


def content(kind: str, size: int, rng: random.Random, words: Words) -> bytes:
    """A file's bytes: random for media (incompressible, like JPEG and MP4), generated text for documents."""
    if kind in ("avatar", "photo", "video"):
        head = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" if kind != "video" else b"\x00\x00\x00\x20ftypisom"
        return head + rng.randbytes(max(0, size - len(head)))
    if kind == "text":
        return words.text(rng, size).encode()[:size]
    if kind == "json":
        records, length = [], 2
        while length < size:
            rec = json.dumps({"id": rng.getrandbits(40), "user": words.text(rng, 12).split()[0],
                              "email": f"{words.text(rng, 8).split()[0]}@example.com",
                              "created_at": f"{rng.randint(2021, 2025)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
                                            f"T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:00Z",
                              "amount": round(rng.uniform(1, 900), 2), "status": rng.choice(("paid", "open", "void")),
                              "note": words.text(rng, rng.randint(20, 200)).replace("\n", " ")})
            records.append(rec)
            length += len(rec) + 2
        return ("[\n" + ",\n".join(records) + "\n]\n").encode()
    # csv and export: rows of orders
    rows, length = ["order_id,customer,email,created_at,amount,currency,status,item"], 0
    while length < size:
        name = words.text(rng, 10).split()[0]
        row = (f"{rng.getrandbits(32)},{name},{name}@example.com,{rng.randint(2021, 2025)}-{rng.randint(1, 12):02d}-"
               f"{rng.randint(1, 28):02d},{rng.uniform(1, 900):.2f},{rng.choice(('EUR', 'USD', 'CHF'))},"
               f"{rng.choice(('paid', 'open', 'void', 'refunded'))},{words.text(rng, 14).split()[0]}")
        rows.append(row)
        length += len(row) + 1
    return ("\n".join(rows) + "\n").encode()[:size]


def write_file(root: Path, f: dict[str, Any], data: bytes, mtime_ns: int) -> None:
    path = root / f["path"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def tree(gb: float, seed: int) -> tuple[Path, Path, list[dict[str, Any]], dict[str, Any]]:
    """The cached tree for (gb, seed), built when missing or left changed by an interrupted run."""
    base = WORK / f"files-{gb:g}gb-seed{seed}-v{TREE_VERSION}"
    root, done, dirty = base / "tree", base / "tree.json", base / "changed"
    plan = plan_tree(gb, seed)
    if done.exists() and not dirty.exists():
        return root, base, plan, json.loads(done.read_text())
    shutil.rmtree(base, ignore_errors=True)
    root.mkdir(parents=True)
    words = Words(seed)
    t0 = time.monotonic()
    for i, f in enumerate(plan):
        write_file(root, f, content(f["kind"], f["size"], random.Random(f"{seed}:{f['path']}"), words), f["mtime_ns"])
        if i and i % 10_000 == 0:
            print(f"bench: tree {gb:g} GB: {i} of {len(plan)} files written", flush=True)
    stats = describe(root, plan)
    stats["build_seconds"] = round(time.monotonic() - t0, 1)
    done.write_text(json.dumps(stats, indent=2) + "\n")
    print(f"bench: built {root}: {stats['files']} files, {stats['bytes'] / 1e9:.3f} GB in {stats['build_seconds']}s", flush=True)
    return root, base, plan, stats


def describe(root: Path, plan: list[dict[str, Any]]) -> dict[str, Any]:
    kinds: dict[str, dict[str, int]] = {}
    total = 0
    for f in plan:
        size = (root / f["path"]).stat().st_size
        k = kinds.setdefault(f["kind"], {"files": 0, "bytes": 0})
        k["files"] += 1
        k["bytes"] += size
        total += size
    dirs = sum(len(d) for _, d, _ in os.walk(root))
    return {"files": len(plan), "dirs": dirs, "bytes": total, "by_kind": kinds}


class Changed:
    """1% of the files rewritten with new content and mtime; ``restore()`` puts the originals back."""

    def __init__(self, root: Path, base: Path, plan: list[dict[str, Any]], seed: int):
        self.root, self.marker, self.saved = root, base / "changed", base / "originals"
        rng = random.Random(f"change:{seed}")
        self.files = rng.sample(plan, max(1, round(len(plan) * CHANGE_FRACTION)))
        self.words = Words(seed)
        self.seed = seed

    def apply(self) -> dict[str, int]:
        self.marker.write_text("the tree holds changed files; it is rebuilt on the next run unless restored\n")
        shutil.rmtree(self.saved, ignore_errors=True)
        now = time.time_ns()
        old_bytes = new_bytes = 0
        for i, f in enumerate(self.files):
            path = self.root / f["path"]
            keep = self.saved / f"{i:06d}"
            keep.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, keep)  # keeps the mtime too
            old_bytes += path.stat().st_size
            data = content(f["kind"], f["size"], random.Random(f"{self.seed}:changed:{f['path']}"), self.words)
            write_file(self.root, f, data, now)
            new_bytes += len(data)
        return {"files": len(self.files), "bytes_before": old_bytes, "bytes_after": new_bytes}

    def restore(self) -> None:
        for i, f in enumerate(self.files):
            keep = self.saved / f"{i:06d}"
            if keep.exists():
                shutil.copy2(keep, self.root / f["path"])
        shutil.rmtree(self.saved, ignore_errors=True)
        self.marker.unlink(missing_ok=True)


# --- measuring ------------------------------------------------------------------------------

def run_timed(cmd: list[str] | str, env: dict[str, str], shell: bool = False) -> dict[str, Any]:
    """Run a command to completion from the project root; its wall time and output."""
    t0 = time.monotonic()
    proc = subprocess.Popen(["bash", "-o", "pipefail", "-c", cmd] if shell else cmd, env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate()
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"bench: command failed ({proc.returncode}): {cmd}\n{err.decode()[-6000:]}")
    return {"seconds": round(seconds, 2), "stdout": out.decode()}


def backup_run(env: dict[str, str], store: Path) -> dict[str, Any]:
    """One files backup in a fresh interpreter (so its peak RSS is its own) under the RSS probe."""
    r = run_timed([sys.executable, str(ROOT / "bench" / "_rss_probe.py"), CLI, "backup", "files"], env)
    lines = r["stdout"].strip().splitlines()
    probe = json.loads(lines[-1])  # the probe's line comes last; the command's JSON summary before it
    summary = json.loads("\n".join(lines[:-1]))[SOURCE]
    doc = json.loads((store / summary["manifest_key"]).read_text())
    a = doc["archive"]
    return {
        "seconds": r["seconds"], "flow_seconds": summary["seconds"], "type": summary["type"],
        "peak_rss_mib": probe["maxrss_mib"], "python_peak_rss_mib": probe["process_peak_mib"],
        "transferred_files": summary["transferred_files"], "transferred_bytes": summary["transferred_bytes"],
        "stored_files": summary["stored"]["files"], "stored_bytes": summary["stored"]["bytes"],
        "changes": summary["changes"], "totals": summary["totals"],
        "tar_bytes": a["size_plain"], "compressed_bytes": a["size_compressed"], "encrypted_bytes": a["size_encrypted"],
        "index_encrypted_bytes": doc["index"]["size_encrypted"], "compression": a["compression"],
        "stage_seconds": doc["timings"],
        # The flow's time outside sync and the stream: listing earlier backups, fetching the previous
        # index, the index upload, the read-back verify, the manifest, and Prefect's task runs.
        "other_seconds": round(doc["timings"]["total"] - doc["timings"]["sync"] - doc["timings"]["upload"], 3),
        "sync": {k: v for k, v in doc["sync"].items() if k != "tool"},
        "verification": {k: v for k, v in doc["verification"].items() if k != "verified_at"},
    }


def settings_file(run: Path, tree_root: Path, compression: str, direct: bool = False) -> tuple[Path, Path]:
    """A settings file for a fresh run folder: local store, key file, no backup log, the tree as a local source."""
    run.mkdir(parents=True)
    key_file = run / "master.key"
    key_file.write_text(new_master_key() + "\n")
    key_file.chmod(0o600)
    store = run / "store"
    config = run / "bench.toml"
    # [databases] is required by the settings model; the files flow never connects with log.enabled = false.
    config.write_text(f"""work_dir = "{run / 'work'}"
[databases.main]
dbname = "unused"
user = "unused"
[storage]
kind = "local"
path = "{store}"
[keys]
provider = "file"
key_file = "{key_file}"
allow_key_file = true
[log]
enabled = false
[files_backup]
compression = "{compression}"
[files_backup.sources.{SOURCE}]
kind = "local"
path = "{tree_root}"
direct = {"true" if direct else "false"}
""")
    return config, store


def bench_size(gb: float, seed: int, prefect: PrefectServer, zstd: bool, keep: bool) -> dict[str, Any]:
    t0 = time.monotonic()
    root, base, plan, stats = tree(gb, seed)
    print(f"bench: {gb:g} GB: tree of {stats['files']} files, {stats['bytes'] / 1e9:.3f} GB "
          f"(ready in {time.monotonic() - t0:.0f}s)", flush=True)
    results: dict[str, Any] = {"target_gb": gb, "seed": seed, "tree": stats}
    env = dict(os.environ, **prefect.env(), PREFECT_LOGGING_LEVEL="WARNING", BENCH_PASS=PASSWORD)
    enc = "openssl enc -aes-256-cbc -pbkdf2 -pass env:BENCH_PASS"
    rel = f"-C {base} tree"
    shell = {
        "floor": f"tar cf - {rel} | wc -c",
        "by_hand": f"tar czf - {rel} | {enc} | wc -c",
        "by_hand_zstd": f"tar cf - {rel} | zstd -q -T0 | {enc} | wc -c",
    }
    run_timed(shell["floor"], env, shell=True)  # warm the page cache the same way for everyone
    for name, cmd in shell.items():
        r = run_timed(cmd, env, shell=True)
        results[name] = {"seconds": r["seconds"], "bytes": int(r["stdout"].split()[0]),
                         "command": cmd.replace(str(base), "$TREE_DIR")}
        print(f"bench: {name}: {r['seconds']:.1f}s, {results[name]['bytes']} bytes", flush=True)

    runs = Path(tempfile.mkdtemp(prefix="run-", dir=WORK))
    try:
        config, store = settings_file(runs / "gzip", root, "gzip")
        run_env = dict(env, LUXIMA_BACKUP_CONFIG=str(config))
        results["first"] = backup_run(run_env, store)
        print(f"bench: first: {results['first']['seconds']:.1f}s, peak RSS {results['first']['peak_rss_mib']} MiB", flush=True)
        time.sleep(1.1)  # backup ids are per second
        changed = Changed(root, base, plan, seed)
        try:
            results["changed"] = changed.apply()
            results["incremental"] = backup_run(run_env, store)
        finally:
            changed.restore()
        inc = results["incremental"]
        print(f"bench: incremental ({inc['type']}): {inc['seconds']:.1f}s, {inc['transferred_files']} files transferred, "
              f"{inc['stored_files']} stored", flush=True)
        # The same source archived in place (direct = true): no staging copy. Then a run with nothing changed:
        # its archive stage is the walk and the merge with the previous index, the fixed cost of an incremental.
        config_d, store_d = settings_file(runs / "direct", root, "gzip", direct=True)
        direct_env = dict(env, LUXIMA_BACKUP_CONFIG=str(config_d))
        results["first_direct"] = backup_run(direct_env, store_d)
        print(f"bench: first_direct: {results['first_direct']['seconds']:.1f}s, peak RSS "
              f"{results['first_direct']['peak_rss_mib']} MiB", flush=True)
        time.sleep(1.1)
        results["unchanged_direct"] = backup_run(direct_env, store_d)
        u = results["unchanged_direct"]
        u["archive_seconds_per_50k_files"] = round(u["stage_seconds"]["archive"] * 50_000 / max(1, u["totals"]["files"]), 3)
        print(f"bench: unchanged_direct: {u['seconds']:.1f}s, archive stage {u['stage_seconds']['archive']:.2f}s "
              f"({u['archive_seconds_per_50k_files']}s per 50,000 files)", flush=True)
        if zstd:
            config_z, store_z = settings_file(runs / "zstd", root, "zstd")
            results["first_zstd"] = backup_run(dict(env, LUXIMA_BACKUP_CONFIG=str(config_z)), store_z)
            print(f"bench: first_zstd: {results['first_zstd']['seconds']:.1f}s", flush=True)
    finally:
        if keep:
            print(f"bench: kept {runs}")
        else:
            shutil.rmtree(runs, ignore_errors=True)

    first, floor, by_hand = results["first"], results["floor"], results["by_hand"]
    results["ratios"] = {
        "by_hand_over_first": round(by_hand["seconds"] / first["seconds"], 2),
        "by_hand_over_first_direct": round(by_hand["seconds"] / results["first_direct"]["seconds"], 2),
        "first_over_floor": round(first["seconds"] / floor["seconds"], 2),
        "incremental_over_first": round(results["incremental"]["seconds"] / first["seconds"], 3),
        "encrypted_over_by_hand_bytes": round(first["encrypted_bytes"] / by_hand["bytes"], 3),
        "compression_ratio": round(first["tar_bytes"] / first["compressed_bytes"], 3),
    }
    if zstd:
        results["ratios"]["by_hand_zstd_over_first_zstd"] = round(results["by_hand_zstd"]["seconds"] / results["first_zstd"]["seconds"], 2)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.25,1", help="comma-separated tree sizes in GB, 50,000 files per GB (default 0.25,1)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the tree (default 1)")
    ap.add_argument("--no-zstd", action="store_true", help="skip the run with files_backup.compression = zstd")
    ap.add_argument("--keep", action="store_true", help="keep the run folders (mirror, store, settings)")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
               "openssl": subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout.strip(),
               "tar": subprocess.run(["tar", "--version"], capture_output=True, text=True).stdout.splitlines()[0]}
    prefect = PrefectServer()
    rows = []
    try:
        prefect.start()
        for size in (float(s) for s in args.sizes.split(",")):
            res = bench_size(size, args.seed, prefect, not args.no_zstd, args.keep)
            res["machine"] = machine
            res["when"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            (RESULTS / f"files_backup-{size:g}gb.json").write_text(json.dumps(res, indent=2) + "\n")
            rows.append(res)
    finally:
        prefect.stop()
    print()
    print("| tree | floor | by hand | first | by hand/first | incremental | incr/first | transferred / stored "
          "| first zstd (by hand zstd) | peak RSS | tar → by hand / flow gzip / flow zstd bytes |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f, i, q = r["first"], r["incremental"], r["ratios"]
        z = r.get("first_zstd")
        zs = f"{z['seconds']}s ({r['by_hand_zstd']['seconds']}s)" if z else "-"
        rss = f"{f['peak_rss_mib']} / {i['peak_rss_mib']}" + (f" / {z['peak_rss_mib']}" if z else "")
        print(f"| {r['tree']['files']} files, {r['tree']['bytes'] / 1e9:.2f} GB | {r['floor']['seconds']}s "
              f"| {r['by_hand']['seconds']}s | {f['seconds']}s | {q['by_hand_over_first']}x | {i['seconds']}s "
              f"| {q['incremental_over_first']} | {i['transferred_files']} / {i['stored_files']} files | {zs} | {rss} MiB "
              f"| {r['floor']['bytes']} → {r['by_hand']['bytes']} / {f['encrypted_bytes']}"
              + (f" / {z['encrypted_bytes']}" if z else "") + " |")
    print()
    print("| tree | by hand | first (staging copy) | first, direct | by hand/direct | unchanged run, direct | archive stage per 50,000 unchanged files |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        d, u = r["first_direct"], r["unchanged_direct"]
        print(f"| {r['tree']['files']} files | {r['by_hand']['seconds']}s | {r['first']['seconds']}s | {d['seconds']}s "
              f"| {r['ratios']['by_hand_over_first_direct']}x | {u['seconds']}s | {u['archive_seconds_per_50k_files']}s |")
    print()
    print("| tree | run | sync | archive/compress/encrypt/upload stream | other (verify, index, manifest) | flow total | command |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        for name in ("first", "incremental", "first_zstd", "first_direct", "unchanged_direct"):
            if name in r:
                s = r[name]["stage_seconds"]
                print(f"| {r['target_gb']:g} GB | {name} | {s['sync']}s | {s['archive']}/{s['compress']}/{s['encrypt']}/"
                      f"{s['upload']}s | {r[name]['other_seconds']}s | {s['total']}s | {r[name]['seconds']}s |")


if __name__ == "__main__":
    main()
