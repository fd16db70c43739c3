"""The ``luxima-backup`` command as an operator runs it: a subprocess, exit codes, what it prints."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from devkit.sandbox import PostgresCluster
from tests.conftest import DB_PASSWORD, file_keys

ROOT = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).parent / "luxima-backup")


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, env={**os.environ, **(env or {})},
                          timeout=timeout, cwd=ROOT)


def test_config_check_validates_and_never_prints_secrets(tmp_path: Path) -> None:
    example = ROOT / "config" / "luxima-backup.example.toml"
    done = cli("config", "check", "--config", str(example), env={"LUXIMA_DB_PASSWORD": "s3cret-value-123"})
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["databases"]["main"]["password"] == "env:LUXIMA_DB_PASSWORD"
    assert "s3cret-value-123" not in done.stdout + done.stderr

    bad = tmp_path / "bad.toml"
    bad.write_text(example.read_text().replace('compression = "zstd"', 'compression = "lz4"')
                   .replace('password = "env:LUXIMA_DB_PASSWORD"', 'password = "hunter2-inline"'))
    done = cli("config", "check", "--config", str(bad))
    assert done.returncode == 2
    assert "db_backup.compression" in done.stderr and "databases.main.password" in done.stderr
    assert "hunter2-inline" not in done.stderr

    done = cli("config", "check", "--config", str(tmp_path / "absent.toml"))
    assert done.returncode == 2 and "absent.toml" in done.stderr


def test_keys_generate_writes_a_private_key_and_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    done = cli("keys", "generate", str(path))
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = path.read_text()
    assert "file:" in done.stdout and key.strip() not in done.stdout
    done = cli("keys", "generate", str(path))
    assert done.returncode == 2 and "refusing to overwrite" in done.stderr
    assert path.read_text() == key


@pytest.mark.slow
def test_migrate_then_backup_db_from_the_shell(
    prefect_server: Any, pg_cluster: PostgresCluster, s3_server: Any, database: str, bucket: str,
    write_settings: Any, key_file: Path,
) -> None:
    with pg_cluster.connect(database) as conn:
        conn.execute("CREATE TABLE public.notes (id int PRIMARY KEY, body text)")
        conn.execute("INSERT INTO public.notes SELECT g, 'note ' || g FROM generate_series(1, 100) g")
    config = write_settings(database, bucket, file_keys(key_file))
    env = {"PREFECT_API_URL": prefect_server.api_url, "LUXIMA_TEST_DB_PASSWORD": DB_PASSWORD}

    done = cli("migrate", "--config", str(config), env=env)
    assert done.returncode == 0, done.stderr
    assert "0001" in done.stdout
    done = cli("migrate", "--config", str(config), env=env)
    assert done.returncode == 0 and "up to date" in done.stdout

    done = cli("backup", "db", "--config", str(config), "--no-deep-verify", env=env)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["row_counts"] == {"public.notes": 100}
    listed = s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]
    assert summary["manifest_key"] in {o["Key"] for o in listed}
    assert DB_PASSWORD not in done.stdout + done.stderr
    # The run carries its component's tags, as a deployment's run does (the alerts match on them); its task runs
    # do not inherit them (a tagged task asks the server for concurrency slots at its start).
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentTaskRunId
    from prefect.client.schemas.sorting import FlowRunSort, TaskRunSort

    with get_client(sync_client=True) as client:
        top = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_task_run_id=FlowRunFilterParentTaskRunId(is_null_=True)),
                                    sort=FlowRunSort.START_TIME_DESC, limit=50)  # both sent: the pinned server refuses nulls
        run = next(r for r in top if r.name and r.parameters == {"database": None, "deep_verify": False})
        assert set(run.tags) == {"backup", "db"} and run.state and run.state.is_completed()
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [run.id]}), sort=TaskRunSort.EXPECTED_START_TIME_DESC,
                                      limit=200)
        assert tasks and all(not t.tags for t in tasks), [(t.name, t.tags) for t in tasks]

    # A wrong password: exit code 1, a message, nothing new stored.
    done = cli("backup", "db", "--config", str(config), env={**env, "LUXIMA_TEST_DB_PASSWORD": "wrong"})
    assert done.returncode == 1
    assert "password authentication failed" in done.stderr
    assert len(s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]) == len(listed)


@pytest.mark.slow
@pytest.mark.timeout(1000)  # above the command's own 900 s, so a hang shows the demo's output, not pytest's kill
def test_demo_runs_end_to_end_and_cleans_up(tmp_path: Path) -> None:
    """The README's first command, on a small sample: servers up, deployed, a backup and a verified
    restore run by a worker, then everything stopped and removed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "LUXIMA_BACKUP"))}
    work = tmp_path / "demo"
    done = subprocess.run([CLI, "demo", "--scale", "0.2", "--workdir", str(work), "--no-wait"], capture_output=True,
                          text=True, env=env, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert ("deployed: db-backup, db-restore, files-backup, files-restore, config-backup, config-restore, vm-backup, "
            "vm-restore") in out
    assert "demo: backup complete: db-main-" in out  # filed by the [databases.main] section
    assert "demo: restore verified: luxima_restore_demo" in out and "checks passed" in out
    assert "demo: files backup complete: files-userfiles-" in out and "transferred over rsync/SSH" in out
    assert "demo: files restore verified: 40 files" in out and "md5 of 40 checked" in out  # 200 x scale 0.2
    assert "demo: config backup complete: configs-app1-" in out and "6 files" in out and "pushed to" in out
    assert "demo: config restore dry run (after editing nginx.conf on the host): {'same': 6, 'update': 1}" in out
    assert "demo: VM backup complete: vm-web-" in out and "its config read back from the archive" in out
    assert "demo: VM restore checked: 101 on proxmox-node2" in out and "checks passed" in out
    assert "demo: images backup complete: images-app1-" in out and "2 containers, 1 image(s) stored once by ID" in out
    assert "demo: DR replication: 6 backup(s) copied to dr-bucket, node2" in out  # db, files, configs to each
    assert "demo: DR drill passed from node2: db/main verified in" in out and "files/userfiles verified" in out
    assert "configs/app1 verified" in out and "report backups/_drills/" in out
    assert "Prefect UI         http://127.0.0.1:" in out
    assert "stopping and removing everything" in out
    assert not work.exists()  # settings, key file and logs removed with the servers
    leftovers = subprocess.run(["pgrep", "-f", str(work)], capture_output=True, text=True).stdout.split()
    assert leftovers == []


@pytest.mark.slow
def test_break_glass_without_a_prefect_server(
    prefect_server: Any, pg_cluster: PostgresCluster, s3_server: Any, database: str, bucket: str,
    write_settings: Any, key_file: Path, source: dict[str, int], tmp_path: Path,
) -> None:
    """list, show, decrypt and restore db from the manifests alone, with Prefect in ephemeral mode."""
    import hashlib

    config = write_settings(database, bucket, file_keys(key_file))
    env = {"PREFECT_API_URL": prefect_server.api_url, "LUXIMA_TEST_DB_PASSWORD": DB_PASSWORD}
    done = cli("backup", "db", "--config", str(config), "--no-deep-verify", env=env)
    assert done.returncode == 0, done.stderr
    backup_id = json.loads(done.stdout)["backup_id"]

    # Everything is down but storage and the key: no Prefect server, no log database.
    alone = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "LUXIMA_BACKUP"))}
    alone.update(PREFECT_HOME=str(tmp_path / "prefect-home"), LUXIMA_TEST_DB_PASSWORD=DB_PASSWORD,
                 LUXIMA_BACKUP__LOG__ENABLED="false")
    run = lambda *a: subprocess.run([CLI, *a], capture_output=True, text=True, env=alone, timeout=300, cwd=ROOT)  # noqa: E731

    done = run("list", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert backup_id in done.stdout and "verified" in done.stdout
    done = run("show", "latest", "--config", str(config))
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["backup_id"] == backup_id and doc["row_counts"] == source

    out = tmp_path / "db.dump"
    done = run("decrypt", doc["dump"]["key"], "--decompress", "-o", str(out), "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert hashlib.sha256(out.read_bytes()).hexdigest() == doc["dump"]["sha256_plain"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o600

    # A local copy and the key file alone, no settings at all; a wrong key file is refused.
    copy = tmp_path / "copy.enc"
    copy.write_bytes(s3_server.client().get_object(Bucket=bucket, Key=doc["dump"]["key"])["Body"].read())
    raw = subprocess.run([CLI, "decrypt", "--input", str(copy), "--key-file", str(key_file), "--decompress", "-o", "-"],
                         capture_output=True, env=alone, timeout=300, cwd=ROOT)
    assert raw.returncode == 0 and hashlib.sha256(raw.stdout).hexdigest() == doc["dump"]["sha256_plain"]
    other = tmp_path / "other.key"
    assert cli("keys", "generate", str(other)).returncode == 0
    done = run("decrypt", "--input", str(copy), "--key-file", str(other), "-o", str(tmp_path / "x"))
    assert done.returncode == 1 and "encrypted with key file" in done.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()

    done = run("restore", "db", "--target-database", f"{database}_bg", "--config", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["database"] == f"{database}_bg" and summary["backup_id"] == backup_id
    with pg_cluster.connect(f"{database}_bg") as conn:
        assert conn.execute("SELECT count(*) FROM app.users").fetchone()[0] == source["app.users"]


def _session_members(sid: int) -> dict[int, str]:
    """pid -> command name of every process in session ``sid`` (the CLI started with a session of its own)."""
    members = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_line = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat_line[stat_line.index("(") + 1:stat_line.rindex(")")]
        fields = stat_line[stat_line.rindex(")") + 2:].split()
        if int(fields[3]) == sid:  # state, ppid, pgrp, session
            members[int(entry.name)] = name
    return members


@pytest.mark.slow
def test_sigterm_stops_the_backup_its_children_and_its_temporary_server_none_holding_secrets(
    pg_cluster: PostgresCluster, s3_server: Any, database: str, bucket: str, key_file: Path, write_settings: Any,
    source: dict[str, int], tmp_path: Path,
) -> None:
    import time

    path = write_settings(database, bucket, file_keys(key_file))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # no server: the CLI starts its own
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               LUXIMA_BACKUP_CONFIG=str(path), LUXIMA_BACKUP__DB_BACKUP__LOCK_WAIT_TIMEOUT_SECONDS="600",
               LUXIMA_TEST_DB_PASSWORD=DB_PASSWORD)
    with pg_cluster.connect(database) as holder:
        holder.execute("BEGIN")
        holder.execute("LOCK TABLE public.events IN ACCESS EXCLUSIVE MODE")  # pg_dump waits on it: a run in progress
        # Output to files: children that outlived the CLI would keep pipes open and hide its exit.
        out = open(tmp_path / "cli.out", "wb")
        proc = subprocess.Popen([CLI, "backup", "db"], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while True:  # until pg_dump waits for the lock
                assert proc.poll() is None, (tmp_path / "cli.out").read_text()[-2000:]
                assert time.monotonic() < deadline, "pg_dump never started"
                with pg_cluster.connect() as watcher:
                    if watcher.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'"
                                       " AND application_name = 'luxima-backup'", (database,)).fetchone()[0]:
                        break
                time.sleep(0.2)
            running = _session_members(proc.pid)
            assert len(running) >= 3, running  # the CLI, its temporary Prefect server, pg_dump
            # None of the CLI's children holds the secrets the settings read from its environment.
            secrets_held = {DB_PASSWORD, os.environ["LUXIMA_TEST_S3_SECRET_KEY"]}
            for pid, name in running.items():
                if pid != proc.pid:
                    environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
                    assert not [v for v in secrets_held if v in environ], f"{name} ({pid}) holds a secret"
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"still running 60 s after SIGTERM: {_session_members(proc.pid)}; "
                                     f"{(tmp_path / 'cli.out').read_text()[-3000:]}") from None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
            out.close()
        holder.execute("ROLLBACK")
    assert proc.returncode != 0
    deadline = time.monotonic() + 15
    while _session_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _session_members(proc.pid) == {}, f"left running: {_session_members(proc.pid)}"
    listing = s3_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])
    assert not [o["Key"] for o in listing if o["Key"].endswith(".manifest.json")]
