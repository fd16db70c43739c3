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

from luxima_backup.sandbox import PostgresCluster
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

    # A wrong password: exit code 1, a message, nothing new stored.
    done = cli("backup", "db", "--config", str(config), env={**env, "LUXIMA_TEST_DB_PASSWORD": "wrong"})
    assert done.returncode == 1
    assert "password authentication failed" in done.stderr
    assert len(s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]) == len(listed)


@pytest.mark.slow
def test_demo_runs_end_to_end_and_cleans_up(tmp_path: Path) -> None:
    """The README's first command, on a small sample: servers up, a verified backup, all stopped."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "LUXIMA_BACKUP"))}
    work = tmp_path / "demo"
    done = subprocess.run([CLI, "demo", "--scale", "0.2", "--workdir", str(work)], capture_output=True, text=True,
                          env=env, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "backup complete" in done.stdout
    summary = json.loads(done.stdout.split("backup complete:", 1)[1].split("\ndemo:", 1)[0])
    assert summary["row_counts"]["public.audit_log"] == 5000
    assert summary["size_encrypted"] > 0
    leftovers = subprocess.run(["pgrep", "-f", str(work)], capture_output=True, text=True).stdout.split()
    assert leftovers == []
