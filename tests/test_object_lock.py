"""Immutability against the moto S3 server, which enforces object lock: backups written with retain-until dates,
the storage refusing their deletion, the prune never trying it, and `storage check` saying what the bucket does."""

from __future__ import annotations

import json
import os
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from luxima_backup import manifest
from luxima_backup.errors import StorageError
from tests.conftest import file_keys
from tests.helpers import run_backup, signed_manifest

pytestmark = pytest.mark.slow


@pytest.fixture
def locked_bucket(s3_server: Any) -> str:
    name = "lock-" + uuid.uuid4().hex[:12]
    s3_server.create_bucket(name, object_lock=True)
    return name


def locked_settings(config: Path, mode: str) -> Path:
    """The fixture's settings with storage.object_lock set (in the [storage] section it writes)."""
    from luxima_backup.settings import load_settings

    config.write_text(config.read_text().replace("multipart_chunk_mib = 5", f'multipart_chunk_mib = 5\nobject_lock = "{mode}"'))
    load_settings(config, reload=True)
    return config


def check(config: Path) -> Any:
    from typer.testing import CliRunner

    from app.cli import app

    return CliRunner().invoke(app, ["storage", "check", "--config", str(config)])


def test_backups_are_written_under_object_lock_for_their_retention_and_cannot_be_deleted(
    prefect_server: Any, s3_server: Any, locked_bucket: str, write_settings: Any, database: str, key_file: Path,
    source: Any,
) -> None:
    config = locked_settings(write_settings(database, locked_bucket, file_keys(key_file)), "governance")
    state = run_backup(deep_verify=False)
    assert state.is_completed(), state
    summary = state.result()
    client = s3_server.client()
    now = datetime.now(timezone.utc)
    for key in (summary["object_key"], summary["manifest_key"]):
        head = client.head_object(Bucket=locked_bucket, Key=key)
        assert head["ObjectLockMode"] == "GOVERNANCE"
        until = head["ObjectLockRetainUntilDate"]
        assert timedelta(days=30.9) < until - now < timedelta(days=31.1)  # 30 days' retention + 1 day's margin

    # the storage itself refuses: a stolen credential cannot destroy the backup before its date
    from luxima_backup import runtime

    store = runtime.store(runtime.settings())
    with pytest.raises(StorageError) as err:
        store.purge(summary["object_key"])
    assert "denied" in str(err.value).lower() or "AccessDenied" in str(err.value)
    assert client.head_object(Bucket=locked_bucket, Key=summary["object_key"])["ContentLength"] > 0

    done = check(config)
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)[0]
    assert report["versioning"] == "Enabled" and report["object_lock"] is True and report["problems"] == []


def test_storage_check_warns_when_the_bucket_does_not_protect_as_the_settings_say(
    s3_server: Any, bucket: str, write_settings: Any, database: str, key_file: Path,
) -> None:
    done = check(locked_settings(write_settings(database, bucket, file_keys(key_file)), "compliance"))
    assert done.exit_code == 1
    assert "has no object lock" in done.output


def test_the_prune_never_tries_a_locked_backup_and_reports_it(
    prefect_server: Any, s3_server: Any, locked_bucket: str, write_settings: Any, database: str, key_file: Path,
) -> None:
    from flows.prune import prune
    from luxima_backup import runtime
    from luxima_backup.settings import load_settings
    from tests.test_prune import db_backup, keys_of

    settings = load_settings(locked_settings(write_settings(database, locked_bucket, file_keys(key_file)), "governance"))
    store = runtime.store(settings)
    now = datetime.now(timezone.utc)
    recent = [db_backup(store, now - timedelta(days=d)) for d in range(1, 4)]
    old_locked = db_backup(store, now - timedelta(days=45))  # written now: locked for 31 days from now
    unlocked = manifest.db_keys("backups", "main", now - timedelta(days=50), "zst")  # written before the lock was on
    plain = s3_server.client()
    for key in (unlocked.data, unlocked.globals):
        plain.put_object(Bucket=locked_bucket, Key=key, Body=os.urandom(32))
    doc = manifest.parse(_bytes(store, manifest.db_keys("backups", "main", now - timedelta(days=45), "zst").manifest))
    plain.put_object(Bucket=locked_bucket, Key=unlocked.manifest, Body=signed_manifest(unlocked.manifest, doc.model_copy(update={
        "backup_id": unlocked.backup_id, "completed_at": now - timedelta(days=50), "started_at": now - timedelta(days=50),
        "dump": doc.data.model_copy(update={"key": unlocked.data}),
        "globals": doc.globals.model_copy(update={"key": unlocked.globals})})))  # type: ignore[attr-defined]

    state = prune(force=True, return_state=True)
    assert state.is_completed(), state
    result = state.result()
    assert result["locked"] == 1 and result["removed"] == 1
    assert keys_of(store, old_locked) and not keys_of(store, unlocked.backup_id)
    assert all(keys_of(store, r) for r in recent)


def _bytes(store: Any, key: str) -> bytes:
    with store.load(key) as f:
        return f.read()


WRITER_POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Resource": "*", "Action": [
    "s3:PutObject", "s3:GetObject", "s3:ListBucket", "s3:ListBucketVersions", "s3:ListBucketMultipartUploads",
    "s3:GetObjectVersion", "s3:GetObjectRetention", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"]}]}
PRUNER_POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Resource": "*", "Action": [
    *WRITER_POLICY["Statement"][0]["Action"], "s3:DeleteObject", "s3:DeleteObjectVersion"]}]}


def test_a_writer_credential_cannot_delete_and_the_pruner_can(tmp_path: Path) -> None:
    """Two keys on a server that checks IAM: the backups' key puts and reads but cannot delete; the prune's can."""
    import boto3

    from devkit.sandbox import MotoS3Server
    from luxima_backup.settings import StorageSettings
    from luxima_backup.storage import store_from_settings

    setup_requests = 7  # the bucket, then per user: create it, its policy, its key
    server = MotoS3Server(auth_after=setup_requests).start()
    try:
        server.create_bucket("two-keys", versioning=False)
        iam = boto3.client("iam", endpoint_url=server.url, region_name="us-east-1",
                           aws_access_key_id=server.access_key, aws_secret_access_key=server.secret_key)
        keys = {}
        for user, policy in (("writer", WRITER_POLICY), ("pruner", PRUNER_POLICY)):
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName=f"{user}-s3", PolicyDocument=json.dumps(policy))
            keys[user] = iam.create_access_key(UserName=user)["AccessKey"]
        for user in keys:
            os.environ[f"LUXIMA_TEST_{user.upper()}_ID"] = keys[user]["AccessKeyId"]
            os.environ[f"LUXIMA_TEST_{user.upper()}_SECRET"] = keys[user]["SecretAccessKey"]
        cfg = StorageSettings.model_validate({
            "bucket": "two-keys", "endpoint_url": server.url, "max_attempts": 1,
            "access_key_id": "env:LUXIMA_TEST_WRITER_ID", "secret_access_key": "env:LUXIMA_TEST_WRITER_SECRET",
            "pruner_access_key_id": "env:LUXIMA_TEST_PRUNER_ID", "pruner_secret_access_key": "env:LUXIMA_TEST_PRUNER_SECRET"})
        writer, pruner = store_from_settings(cfg), store_from_settings(cfg.for_pruner())
        writer.save_bytes("backups/db/main/2026/11/30/20261130T000000Z.dump.zst.enc", b"backup")
        assert [o.key for o in writer.list("backups/")] == ["backups/db/main/2026/11/30/20261130T000000Z.dump.zst.enc"]
        with pytest.raises(StorageError, match="denied access"):
            writer.purge("backups/db/main/2026/11/30/20261130T000000Z.dump.zst.enc")
        assert [o.key for o in pruner.list("backups/")]  # still there
        pruner.purge("backups/db/main/2026/11/30/20261130T000000Z.dump.zst.enc")
        assert list(pruner.list("backups/")) == []
    finally:
        for user in ("WRITER", "PRUNER"):
            os.environ.pop(f"LUXIMA_TEST_{user}_ID", None)
            os.environ.pop(f"LUXIMA_TEST_{user}_SECRET", None)
        server.stop()
