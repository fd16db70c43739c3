"""Deployments as operators run them: `prefect deploy --all` + a process worker, and `serve`."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from deployments.specs import load_specs
from devkit.sandbox import stop_group
from tests.conftest import DB_PASSWORD, file_keys
from tests.helpers import background, cli_env, s3_keys

pytestmark = pytest.mark.slow
CLI = str(Path(sys.executable).parent / "luxima-backup")


def _deployment(name: str) -> Any:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)


def _run(deployment: str, timeout: float = 240) -> Any:
    from prefect.deployments import run_deployment

    return run_deployment(deployment, timeout=timeout, poll_interval=2)


@pytest.fixture
def configured(write_settings: Any, database: str, bucket: str, key_file: Path, source: dict[str, int]) -> Path:
    return write_settings(database, bucket, file_keys(key_file))


def test_deploy_all_and_a_process_worker_run_a_backup(
    prefect_server: Any, configured: Path, s3_server: Any, bucket: str, tmp_path: Path,
) -> None:
    env = cli_env(prefect_server, configured)
    for _ in range(2):  # idempotent: the second run updates, never duplicates
        done = subprocess.run([CLI, "deploy"], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    specs = {s.name: s for s in load_specs()}
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import DeploymentSort

    with get_client(sync_client=True) as client:  # (Prefect 3.8.8's client needs limit and sort spelt out)
        deployed = client.read_deployments(limit=100, offset=0, sort=DeploymentSort.NAME_ASC)
    assert sorted(d.name for d in deployed if d.name in specs) == sorted(specs)
    backup = _deployment("db-backup/db-backup")
    assert backup.work_pool_name == "luxima-backup" and set(backup.tags) == {"backup", "db"}
    assert backup.global_concurrency_limit is not None and backup.global_concurrency_limit.limit == 1
    cron = backup.schedules[0].schedule
    assert (cron.cron, cron.timezone) == ("0 3 * * *", "Asia/Jakarta")
    assert not _deployment("db-restore/db-restore").schedules  # restores are manual
    files = _deployment("files-backup/files-backup")
    assert set(files.tags) == {"backup", "files"} and files.global_concurrency_limit.limit == 1
    assert (files.schedules[0].schedule.cron, files.schedules[0].schedule.timezone) == ("0 4 * * *", "Asia/Jakarta")
    assert not _deployment("files-restore/files-restore").schedules
    configs = _deployment("config-backup/config-backup")
    assert set(configs.tags) == {"backup", "configs"} and configs.global_concurrency_limit.limit == 1
    assert (configs.schedules[0].schedule.cron, configs.schedules[0].schedule.timezone) == ("0 2 * * 0", "Asia/Jakarta")
    assert not _deployment("config-restore/config-restore").schedules
    vms = _deployment("vm-backup/vm-backup")
    assert set(vms.tags) == {"backup", "vm"} and vms.global_concurrency_limit.limit == 1
    assert (vms.schedules[0].schedule.cron, vms.schedules[0].schedule.timezone) == ("0 1 * * 0", "Asia/Jakarta")
    assert not _deployment("vm-restore/vm-restore").schedules
    drill = _deployment("dr-drill/dr-drill")  # the 6-monthly DR test: 1 January and 1 July, 02:00 WIB
    assert set(drill.tags) == {"dr", "drill"} and drill.global_concurrency_limit.limit == 1
    assert (drill.schedules[0].schedule.cron, drill.schedules[0].schedule.timezone) == ("0 2 1 1,7 *", "Asia/Jakarta")

    # The bucket block registered from the settings works as storage on its own.
    from luxima_backup.secrets import SecretRef
    from luxima_backup.settings import StorageSettings
    from luxima_backup.storage import store_from_settings

    store = store_from_settings(StorageSettings(s3_bucket_block="luxima-backups"))
    store.save_bytes("blocks/probe", b"probe")
    with store.load("blocks/probe") as body:
        assert body.read() == b"probe"
    import io

    saved = store.save("blocks/streamed", io.BytesIO(b"streamed" * 1000))  # as a backup's stream is stored
    assert saved.size == 8000 and saved.proven
    # A block whose uploads would land under a bucket folder, while reads name the key alone, is refused.
    from prefect_aws import S3Bucket

    from luxima_backup.errors import ConfigError

    foldered = S3Bucket.load("luxima-backups")
    foldered.bucket_folder = "tenant-a"
    foldered.save("luxima-foldered", overwrite=True)
    with pytest.raises(ConfigError) as refused:
        store_from_settings(StorageSettings(s3_bucket_block="luxima-foldered"))
    assert "bucket folder" in str(refused.value) and "tenant-a/" in refused.value.hint
    done = subprocess.run([CLI, "secret", "test-db-password", "env:LUXIMA_TEST_DB_PASSWORD"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and DB_PASSWORD not in done.stdout + done.stderr
    assert SecretRef.parse("prefect-secret:test-db-password").resolve() == DB_PASSWORD

    worker = background([CLI, "worker"], env, tmp_path / "worker.log")
    try:
        run = _run("db-backup/db-backup")
        assert run.state.is_completed(), (tmp_path / "worker.log").read_text()[-4000:]
        assert any(k.endswith(".manifest.json") for k in s3_keys(s3_server, bucket))
    finally:
        stop_group(worker, 30, signal.SIGINT)


def test_serve_runs_deployments_without_a_worker(prefect_server: Any, configured: Path, tmp_path: Path) -> None:
    server = background([CLI, "serve"], cli_env(prefect_server, configured), tmp_path / "serve.log")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if "being served" in (tmp_path / "serve.log").read_text(errors="replace"):
                break
            time.sleep(1)
        else:
            pytest.fail("serve did not register its deployments:\n" + (tmp_path / "serve.log").read_text()[-3000:])
        run = _run("db-backup/db-backup")
        assert run.state.is_completed(), (tmp_path / "serve.log").read_text()[-4000:]
    finally:
        stop_group(server, 30, signal.SIGINT)
