"""The db-backup flow end to end, against a real PostgreSQL, S3 server, Prefect server and Vault simulator."""

from __future__ import annotations

import io
import json
import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from luxima_backup import pg as pgmod
from luxima_backup.envelope import DecryptingReader
from luxima_backup.errors import ToolError, WrongKeyError
from luxima_backup.keys import KeyFileProvider
from devkit.sandbox import PostgresCluster
from luxima_backup.compression import DecompressingReader
from tests.conftest import DB_PASSWORD, file_keys, log_elsewhere, transit_keys
from tests.helpers import (
    MARKER_BYTES, MARKER_JSON, MARKER_TEXT, backup_while_locked, log_rows, run_backup, s3_get, s3_keys, subflow_runs,
)
from tests.fault_proxy import FaultProxy

def incompressible_table(conn: Any, name: str, rows: int) -> None:
    """A table of ``rows`` random KiB: its dump stays about that size through compression."""
    conn.execute("CREATE EXTENSION IF NOT EXISTS pgcrypto")
    conn.execute(f"CREATE TABLE {name} AS SELECT g, gen_random_bytes(1024) AS b FROM generate_series(1, {rows}) g")


@pytest.mark.slow
def test_backup_stores_encrypted_verified_dump_with_manifest_and_log(
    prefect_server: Any, pg_cluster: PostgresCluster, s3_server: Any, database: str, bucket: str,
    key_file: Path, write_settings: Any, source: dict[str, int], tmp_path: Path,
) -> None:
    write_settings(database, bucket, file_keys(key_file))
    state = run_backup()
    assert state.is_completed(), state.message
    summary = state.result()

    keys = s3_keys(s3_server, bucket)
    assert summary["object_key"] in keys and summary["manifest_key"] in keys
    assert summary["object_key"].startswith("backups/db/main/")
    assert summary["object_key"].endswith(".dump.zst.enc")

    manifest = json.loads(s3_get(s3_server, bucket, summary["manifest_key"]))
    assert manifest["row_counts"] == {**source}
    assert manifest["status"] == "verified" and manifest["verification"]["deep"] is True
    assert manifest["dump"]["size_encrypted"] == len(s3_get(s3_server, bucket, summary["object_key"]))
    assert manifest["source"]["server_version"].startswith("15")
    assert manifest["globals"]["key"] in keys

    # The stored object decrypts and decompresses to a pg_dump archive that restores exactly.
    blob = s3_get(s3_server, bucket, summary["object_key"])
    provider = KeyFileProvider(key_file)
    dump = DecompressingReader(DecryptingReader(io.BytesIO(blob), provider.unwrap), "zstd").read()
    import hashlib

    assert hashlib.sha256(dump).hexdigest() == manifest["dump"]["sha256_plain"]
    path = tmp_path / "db.dump"
    path.write_bytes(dump)
    with pg_cluster.connect() as conn:
        conn.execute(f'CREATE DATABASE "{database}_r"')
    try:
        tool = pgmod.find_tool("pg_restore", 15)
        env = dict(os.environ, PGPASSWORD=DB_PASSWORD)
        subprocess.run([tool.path, "-h", "127.0.0.1", "-p", str(pg_cluster.port), "-U", "postgres", "-d", f"{database}_r",
                        "--exit-on-error", str(path)], check=True, env=env, capture_output=True)
        with pg_cluster.connect(f"{database}_r") as conn:
            counts = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in source}
            assert counts == source
            row = conn.execute("SELECT blob, lo_get(lo), profile->>'tag' FROM app.documents d JOIN app.users u ON u.id = d.owner LIMIT 1").fetchone()
            assert bytes(row[0]) == MARKER_BYTES and bytes(row[1]) == MARKER_BYTES * 1000 and row[2] == MARKER_JSON
    finally:
        with pg_cluster.connect() as conn:
            conn.execute(f'DROP DATABASE "{database}_r" WITH (FORCE)')

    rows = log_rows(pg_cluster, database)
    assert len(rows) == 1
    log = rows[0]
    assert log["status"] == "success" and log["kind"] == "backup" and log["component"] == "db"
    assert log["object_key"] == summary["object_key"] and log["sha256_encrypted"] == manifest["dump"]["sha256_encrypted"]
    assert log["size_raw"] == manifest["dump"]["size_plain"] and log["duration_ms"] is not None
    assert str(log["flow_run_id"]) == str(state.state_details.flow_run_id)
    # The stream's run shows its parameters in the UI as they were (flows.common.Flow encodes them).
    [attempt] = subflow_runs(state)
    bound = {"backup_id": manifest["backup_id"], "target": "db/main", "object": summary["object_key"]}
    assert attempt.parameters == {"database": "main", "object_key": summary["object_key"], "binding": bound,
                                  "deep": True, "attempt": 1}

    # No plaintext in storage: neither row contents nor the globals' role names appear in any object.
    for key in keys:
        data = s3_get(s3_server, bucket, key)
        if key.endswith(".manifest.json"):
            continue
        for marker in (MARKER_TEXT.encode(), MARKER_JSON.encode(), MARKER_BYTES, b"user1@luxima.id", b"CREATE ROLE"):
            assert marker not in data, f"{marker!r} found in {key}"


@pytest.mark.slow
def test_log_table_is_reachable_only_by_backup_admin(
    prefect_server: Any, pg_cluster: PostgresCluster, database: str, bucket: str, key_file: Path, write_settings: Any, source: Any,
) -> None:
    write_settings(database, bucket, file_keys(key_file))
    assert run_backup().is_completed()
    with pg_cluster.connect(database) as conn:
        conn.execute("CREATE ROLE app_user LOGIN PASSWORD 'app-user-pw'") if not conn.execute(
            "SELECT 1 FROM pg_roles WHERE rolname = 'app_user'").fetchone() else None
        conn.execute(f'GRANT CONNECT ON DATABASE "{database}" TO app_user')
        owner = conn.execute("SELECT tableowner FROM pg_tables WHERE schemaname = 'internal' AND tablename = 'backup_logs'").fetchone()[0]
        assert owner == "backup_admin"
    import psycopg

    with psycopg.connect(**pg_cluster.conninfo(database, user="app_user", password="app-user-pw"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM internal.backup_logs")
    # Applying the migration again changes nothing.
    from tasks.log import migrate

    with pg_cluster.connect(database) as conn:
        assert migrate(conn) == []


@pytest.mark.slow
def test_bad_credentials_fail_without_retry_and_leave_nothing(
    prefect_server: Any, pg_cluster: PostgresCluster, s3_server: Any, database: str, bucket: str, key_file: Path,
    write_settings: Any, source: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The dump connects with a wrong password; the log goes to a second profile with the right one.
    monkeypatch.setenv("LUXIMA_TEST_WRONG_PASSWORD", "not-the-password")
    write_settings(database, bucket, file_keys(key_file), log_elsewhere(pg_cluster, database), password_env="LUXIMA_TEST_WRONG_PASSWORD")
    state = run_backup()
    assert state.is_failed()
    assert "password authentication failed" in state.message
    assert len(subflow_runs(state)) == 1  # authentication is permanent: not retried
    assert s3_keys(s3_server, bucket) == []
    rows = log_rows(pg_cluster, database)
    assert [r["status"] for r in rows] == ["failed"]
    assert "password authentication failed" in rows[0]["error"]


@pytest.mark.slow
def test_server_stopped_mid_dump_is_retried_then_fails_cleanly(
    prefect_server: Any, pg_cluster: PostgresCluster, s3_server: Any, bucket: str, key_file: Path, write_settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    victim = PostgresCluster(DB_PASSWORD).start()
    proxy = FaultProxy(s3_server.url).start()
    try:
        with victim.connect() as conn:
            conn.execute("CREATE DATABASE luxima")
        with victim.connect("luxima") as conn:
            incompressible_table(conn, "big", 120_000)  # larger than every buffer between pg_dump and the proxy
        with pg_cluster.connect() as conn:
            conn.execute("CREATE DATABASE logs_for_victim")
        write_settings("luxima", bucket, file_keys(key_file), log_elsewhere(pg_cluster, "logs_for_victim"), port=victim.port, endpoint=proxy.url)
        proxy.hold.clear()  # hold the first part upload: the pipeline backs up into pg_dump

        def stop_server_mid_dump() -> None:
            proxy.held.wait(120)
            victim.stop("immediate")
            proxy.hold.set()

        stopper = threading.Thread(target=stop_server_mid_dump)
        stopper.start()
        state = run_backup()
        stopper.join()
        assert state.is_failed()
        assert "pg_dump" in state.message or "connect" in state.message
        assert len(subflow_runs(state)) == 2  # transient: retried up to db_backup.attempts
        assert s3_keys(s3_server, bucket) == []
        assert s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
        assert [r["status"] for r in log_rows(pg_cluster, "logs_for_victim")] == ["failed"]
    finally:
        proxy.stop()
        victim.destroy()


@pytest.mark.slow
def test_s3_failure_is_retried_by_botocore_alone_then_fails_with_multipart_upload_aborted(
    prefect_server: Any, pg_cluster: PostgresCluster, s3_server: Any, database: str, bucket: str, key_file: Path,
    write_settings: Any,
) -> None:
    with pg_cluster.connect(database) as conn:
        incompressible_table(conn, "big", 15_000)
    proxy = FaultProxy(s3_server.url).start()
    try:
        write_settings(database, bucket, file_keys(key_file), endpoint=proxy.url)
        proxy.fail("PUT", "partNumber=2", 503, "SlowDown")  # the second part always fails
        state = run_backup()
        assert state.is_failed()
        # One retry layer per kind of failure: the request is tried max_attempts (2) times by botocore, and
        # neither a task retry nor a new stream attempt (db_backup.attempts = 2) tries it again.
        assert len(subflow_runs(state)) == 1
        assert proxy.count("PUT", "partNumber=2", 503) == 2
        assert proxy.count("DELETE", "uploadId=") == 1  # the attempt aborted its multipart upload
        assert s3_keys(s3_server, bucket) == []
        assert s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
        assert [r["status"] for r in log_rows(pg_cluster, database)] == ["failed"]
    finally:
        proxy.stop()


@pytest.mark.slow
def test_storage_proves_the_stored_object_by_its_etag_and_a_part_damaged_on_the_way_fails_the_backup(
    prefect_server: Any, pg_cluster: PostgresCluster, s3_server: Any, database: str, bucket: str, key_file: Path,
    write_settings: Any,
) -> None:
    """Storage's ETag of what it received, matched against the MD5 of each part as it was sent, proves the stored
    object without downloading it again. One bit flipped in a part on its way to storage: the ETag no longer
    matches, the object is read back, its sha256 differs, the backup fails and leaves nothing."""
    with pg_cluster.connect(database) as conn:
        incompressible_table(conn, "noise", 12_000)
    proxy = FaultProxy(s3_server.url).start()
    try:
        write_settings(database, bucket, file_keys(key_file), endpoint=proxy.url)
        state = run_backup()
        assert state.is_completed(), state.message
        summary = state.result()
        manifest = json.loads(s3_get(s3_server, bucket, summary["manifest_key"]))
        assert manifest["verification"]["stored"] == "etag matched the parts sent"
        assert manifest["verification"]["deep"] is True and manifest["verification"]["data_entries_checked"] >= 1
        head = s3_server.client().head_object(Bucket=bucket, Key=summary["object_key"])
        assert head["ETag"].strip('"').endswith("-3")  # 12 MB of random rows: three 5 MiB parts
        assert proxy.count("GET", ".dump.") == 0  # not downloaded again

        proxy.corrupt_request_when = lambda method, path: method == "PUT" and ".dump." in path and "partNumber=2" in path
        before = s3_keys(s3_server, bucket)
        state = run_backup()
        assert proxy.corrupted_request.is_set() and state.is_failed()
        assert "sha256 of the stored object" in state.message
        assert proxy.count("GET", ".dump.") == 1  # read back once the ETag did not match
        assert s3_keys(s3_server, bucket) == before
        assert [r["status"] for r in log_rows(pg_cluster, database)] == ["success", "failed"]
    finally:
        proxy.stop()


@pytest.mark.slow
def test_a_deep_check_that_fails_beside_the_upload_stops_it_before_it_completes(
    prefect_server: Any, pg_cluster: PostgresCluster, s3_server: Any, database: str, bucket: str,
    vault: dict[str, Any], write_settings: Any, source: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The deep check reads a copy of the ciphertext as it uploads, and the upload completes only once that check
    passed. A backup host whose Vault policy lets it make data keys but not unwrap them cannot prove its backup
    restorable: the run fails saying so, and no object was ever completed in storage."""
    import hvac

    root = hvac.Client(url=vault["url"], token=vault["token"])
    key = "luxima-" + os.urandom(4).hex()
    root.secrets.transit.create_key(name=key)
    root.sys.create_or_update_acl_policy(name=f"{key}-seal-only", policy=f'path "transit/datakey/wrapped/{key}" {{ capabilities = ["update"] }}\n'
                                                                   f'path "transit/datakey/plaintext/{key}" {{ capabilities = ["update"] }}\n'
                                                                   f'path "transit/keys/{key}" {{ capabilities = ["read"] }}')
    token = root.auth.token.create(policies=[f"{key}-seal-only"], ttl="1h")["auth"]["client_token"]
    monkeypatch.setenv("LUXIMA_TEST_VAULT_TOKEN", token)
    write_settings(database, bucket, transit_keys(vault, key))
    state = run_backup()
    assert state.is_failed()
    assert "permission denied" in state.message.lower(), state.message
    assert s3_keys(s3_server, bucket) == []
    assert s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert len(subflow_runs(state)) == 1  # refused, not retried


@pytest.mark.slow
def test_transit_backup_with_vault_and_unknown_key_uploads_nothing(
    prefect_server: Any, pg_cluster: PostgresCluster, s3_server: Any, database: str, bucket: str,
    vault: dict[str, Any], write_settings: Any, source: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import hvac

    monkeypatch.setenv("LUXIMA_TEST_VAULT_TOKEN", vault["token"])
    client = hvac.Client(url=vault["url"], token=vault["token"])
    key = "luxima-" + os.urandom(4).hex()
    client.secrets.transit.create_key(name=key)

    write_settings(database, bucket, transit_keys(vault, key))
    state = run_backup()
    assert state.is_completed(), state.message
    manifest = json.loads(s3_get(s3_server, bucket, state.result()["manifest_key"]))
    assert manifest["dump"]["encryption"]["key_id"] == f"transit/keys/{key}"
    assert manifest["dump"]["encryption"]["key_version"] == 1

    # A key that does not exist in Vault: clear error, nothing uploaded, no retry.
    write_settings(database, bucket, transit_keys(vault, "no-such-key"))
    before = s3_keys(s3_server, bucket)
    state = run_backup()
    assert state.is_failed()
    assert "no-such-key" in state.message
    assert s3_keys(s3_server, bucket) == before
    assert len(subflow_runs(state)) == 1


@pytest.mark.slow
def test_transit_rotation_and_a_vault_outage_through_the_flow(
    prefect_server: Any, s3_server: Any, database: str, bucket: str,
    vault: dict[str, Any], write_settings: Any, source: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import hashlib

    import hvac

    from luxima_backup.keys import VaultTransitProvider
    from luxima_backup.settings import load_settings

    monkeypatch.setenv("LUXIMA_TEST_VAULT_TOKEN", vault["token"])
    client = hvac.Client(url=vault["url"], token=vault["token"])
    key = "luxima-" + os.urandom(4).hex()
    client.secrets.transit.create_key(name=key)
    write_settings(database, bucket, transit_keys(vault, key))

    first = run_backup()
    assert first.is_completed(), first.message
    sim = vault["simulator"]
    if sim is not None:
        # Vault answers 503 once (sealed standby, overload): the attempt fails as transient and
        # the next attempt succeeds; the run ends Completed.
        sim.fail_next(1, 503)
        blip = run_backup()
        assert blip.is_completed(), blip.message
        assert [r.state.type.value for r in subflow_runs(blip)] == ["FAILED", "COMPLETED"]
    client.secrets.transit.rotate_key(name=key)
    second = run_backup()
    assert second.is_completed(), second.message

    provider = VaultTransitProvider(load_settings().keys.vault)  # a fresh provider, as a restore would use
    for state, version in ((first, 1), (second, 2)):
        doc = json.loads(s3_get(s3_server, bucket, state.result()["manifest_key"]))
        assert doc["dump"]["encryption"]["key_version"] == version
        blob = s3_get(s3_server, bucket, doc["dump"]["key"])
        dump = DecompressingReader(DecryptingReader(io.BytesIO(blob), provider.unwrap), "zstd").read()
        assert hashlib.sha256(dump).hexdigest() == doc["dump"]["sha256_plain"]


def test_missing_key_file_stops_at_start(write_settings: Any, database: str, bucket: str, tmp_path: Path) -> None:
    from luxima_backup.errors import ConfigError
    from luxima_backup.keys import provider_from_settings
    from luxima_backup.settings import load_settings

    write_settings(database, bucket, file_keys(tmp_path / "absent.key"))
    with pytest.raises(ConfigError, match="cannot read key file"):
        provider_from_settings(load_settings().keys)


def test_wrong_key_file_is_named_in_the_error(tmp_path: Path, key_file: Path) -> None:
    from luxima_backup.envelope import encrypt_bytes
    from luxima_backup.keys import new_master_key

    provider = KeyFileProvider(key_file)
    dk = provider.new_data_key()
    blob = encrypt_bytes(b"data", dk.plaintext, dk.wrapped, 1024)
    other = tmp_path / "other.key"
    other.write_text(new_master_key())
    with pytest.raises(WrongKeyError, match=f"encrypted with key file {provider.key_id}"):
        DecryptingReader(io.BytesIO(blob), KeyFileProvider(other).unwrap)
    # with the old key listed as retired, it reads
    assert DecryptingReader(io.BytesIO(blob), KeyFileProvider(other, [key_file]).unwrap).read() == b"data"


def test_pg_dump_older_than_the_server_is_refused_with_the_version_to_install(tmp_path: Path) -> None:
    # A stand-in pg_dump that reports an old version: the check must refuse it before running it.
    fake = tmp_path / "pg_dump"
    fake.write_text("#!/bin/sh\necho 'pg_dump (PostgreSQL) 14.9'\n")
    fake.chmod(0o755)
    with pytest.raises(ToolError) as err:
        pgmod.find_tool("pg_dump", 15, tmp_path)
    text = str(err.value)
    assert "14.9" in text and "install postgresql-client-15" in text


@pytest.mark.slow
def test_secrets_never_reach_logs_artifacts_or_the_log_table(
    prefect_server: Any, pg_cluster: PostgresCluster, s3_server: Any, database: str, bucket: str,
    vault: dict[str, Any], write_settings: Any, source: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import hvac
    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogWorker

    monkeypatch.setenv("LUXIMA_TEST_VAULT_TOKEN", vault["token"])
    key = "luxima-" + os.urandom(4).hex()
    hvac.Client(url=vault["url"], token=vault["token"]).secrets.transit.create_key(name=key)
    write_settings(database, bucket, transit_keys(vault, key))
    ok = run_backup()
    assert ok.is_completed()
    # and a failing run (wrong database password), whose error text travels into logs and the log table
    monkeypatch.setenv("LUXIMA_TEST_WRONG_PASSWORD", "wrong-" + DB_PASSWORD)
    write_settings(database, bucket, transit_keys(vault, key), log_elsewhere(pg_cluster, database), password_env="LUXIMA_TEST_WRONG_PASSWORD")
    bad = run_backup()
    assert bad.is_failed()
    APILogWorker.drain_all(timeout=5)

    import httpx

    secrets = [DB_PASSWORD, s3_server.secret_key, vault["token"], "wrong-" + DB_PASSWORD]
    # These two runs' own logs and artifacts, their stream attempts' included (by run id, not "the newest").
    ids = [str(s.state_details.flow_run_id) for s in (ok, bad)] + [str(r.id) for s in (ok, bad) for r in subflow_runs(s)]
    api = prefect_server.api_url
    logs = httpx.post(f"{api}/logs/filter", json={"logs": {"flow_run_id": {"any_": ids}}, "limit": 200}).json()
    texts = [entry["message"] for entry in logs]
    assert any("backup db-" in t for t in texts)  # the good run's logs were read
    assert any("password authentication failed" in t for t in texts)  # and the failed run's, with its error
    artifacts = httpx.post(f"{api}/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": ids}},
                                                             "limit": 200}).json()
    assert artifacts, "no artifacts were read"
    texts += [json.dumps(a, default=str) for a in artifacts]
    with get_client(sync_client=True) as client:
        runs = [client.read_flow_run(s.state_details.flow_run_id) for s in (ok, bad)]
        texts += [json.dumps(r.parameters, default=str) + str(r.state.message) for r in runs]
    texts += [str(r) for r in log_rows(pg_cluster, database)]
    for text in texts:
        for secret in secrets:
            assert secret not in text


@pytest.mark.slow
def test_a_backup_past_its_time_limit_ends_timed_out_and_leaves_nothing_behind(
    prefect_server: Any, pg_cluster: PostgresCluster, s3_server: Any, database: str, bucket: str, key_file: Path,
    write_settings: Any, source: dict[str, int], monkeypatch: pytest.MonkeyPatch,
) -> None:
    from luxima_backup import procs

    monkeypatch.setenv("LUXIMA_BACKUP__DB_BACKUP__TIMEOUT_SECONDS", "6")
    monkeypatch.setenv("LUXIMA_BACKUP__DB_BACKUP__LOCK_WAIT_TIMEOUT_SECONDS", "600")  # so the limit is what ends it
    write_settings(database, bucket, file_keys(key_file))
    state, elapsed = backup_while_locked(pg_cluster, database)
    assert state.name == "TimedOut", (state.name, state.message)
    assert "limit of 6 s" in str(state.result(raise_on_failure=False))
    assert elapsed < 60  # not the 600 s lock wait
    assert procs.live() == []  # pg_dump was stopped, not left waiting on the lock
    assert not [k for k in s3_keys(s3_server, bucket) if k.endswith(".manifest.json")]
    assert [r["status"] for r in log_rows(pg_cluster, database)] == ["failed"]


@pytest.mark.slow
def test_a_running_backup_shows_its_progress_in_the_ui(
    prefect_server: Any, database: str, bucket: str, key_file: Path, write_settings: Any, source: dict[str, int],
) -> None:
    import httpx

    write_settings(database, bucket, file_keys(key_file))
    state = run_backup(deep_verify=False)
    assert state.is_completed(), state.message
    runs = [str(r.id) for r in subflow_runs(state)]
    found = httpx.post(f"{prefect_server.api_url}/artifacts/filter", json={
        "artifacts": {"type": {"any_": ["progress"]}, "flow_run_id": {"any_": runs}},
        "limit": 10, "offset": 0, "sort": "CREATED_DESC"}).json()
    assert len(found) == 1
    assert found[0]["data"] == 100.0 and "dump of main" in (found[0]["description"] or "")
    # Only the flow's summary is stored as a result; the tasks' (digests, sizes, paths) stay in memory.
    from tests.helpers import persisted_task_results

    assert persisted_task_results(prefect_server.api_url, [str(state.state_details.flow_run_id), *runs]) == {}


@pytest.mark.slow
def test_an_attempt_past_its_stage_limit_is_stopped_and_tried_again(
    prefect_server: Any, pg_cluster: PostgresCluster, s3_server: Any, database: str, bucket: str, key_file: Path,
    write_settings: Any, source: dict[str, int], monkeypatch: pytest.MonkeyPatch,
) -> None:
    from luxima_backup import procs

    monkeypatch.setenv("LUXIMA_BACKUP__DB_BACKUP__STAGE_TIMEOUT_SECONDS", "3")
    monkeypatch.setenv("LUXIMA_BACKUP__DB_BACKUP__LOCK_WAIT_TIMEOUT_SECONDS", "600")  # so the stage limit is what ends it
    write_settings(database, bucket, file_keys(key_file))  # attempts = 2
    state, elapsed = backup_while_locked(pg_cluster, database)  # pg_dump waits: its attempt never ends alone
    assert state.is_failed()
    assert "ran past db_backup.stage_timeout_seconds" in str(state.result(raise_on_failure=False))
    assert elapsed < 60
    attempts = subflow_runs(state)
    assert len(attempts) == 2 and all(not a.state.is_completed() for a in attempts)  # stopped, tried again, stopped
    assert procs.live() == []
    assert not [k for k in s3_keys(s3_server, bucket) if k.endswith(".manifest.json")]


@pytest.mark.slow
def test_plaintext_never_touches_the_disk_during_a_database_backup(
    prefect_server: Any, pg_cluster: PostgresCluster, s3_server: Any, database: str, bucket: str, key_file: Path,
    write_settings: Any, source: dict[str, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While a deep-verified backup runs, and after it, no file under the work dir or the temp dir holds the
    source's rows: none contains a planted canary, and none larger than a few KiB is anything but an
    encrypted object (a compressed plaintext spool would hide the canary, not its format)."""
    import tempfile
    import time

    from luxima_backup.envelope import MAGIC
    from luxima_backup.settings import load_settings

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    write_settings(database, bucket, file_keys(key_file))
    work = Path(load_settings().work_dir)
    canaries = [MARKER_TEXT.encode(), MARKER_JSON.encode(), MARKER_BYTES]
    found: dict[str, str] = {}
    stop = threading.Event()

    def scan() -> int:
        files = 0
        for root in (work, temp):
            for dirpath, _, names in os.walk(root):
                for name in names:
                    path = os.path.join(dirpath, name)
                    try:
                        with open(path, "rb") as f:
                            data = f.read()
                    except OSError:  # removed between listing and reading
                        continue
                    files += 1
                    if any(c in data for c in canaries):
                        found[path] = "holds the canary"
                    elif len(data) > 4096 and not data.startswith(MAGIC):
                        found[path] = f"{len(data)} bytes that are not an encrypted object"
        return files

    def watch() -> None:
        while not stop.is_set():
            scan()
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        state = run_backup()
    finally:
        stop.set()
        watcher.join()
    assert state.is_completed(), state.message
    scan()
    assert found == {}
    # the canary is in what was backed up: the scan looked for something real
    doc = json.loads(s3_get(s3_server, bucket, state.result()["manifest_key"]))
    blob = s3_get(s3_server, bucket, doc["dump"]["key"])
    dump = DecompressingReader(DecryptingReader(io.BytesIO(blob), KeyFileProvider(key_file).unwrap), "zstd").read()
    assert all(c in dump for c in canaries[:2]) and doc["verification"]["data_entries_checked"] >= 3
