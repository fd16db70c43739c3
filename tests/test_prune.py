"""The prune flow against real storage: the moto S3 server (versioned bucket) and a local directory.

Forty days of backups cannot be waited for: their manifests and objects are written as the flows
write them (the typed model, the same keys), dated in the past; the prune, the catalog and the
storage are the real ones.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from luxima_backup import manifest
from luxima_backup.manifest import Compression, DataObject, DbGlobals, DbManifest, DbSource, Encryption
from tests.conftest import file_keys
from tests.helpers import error_of, log_rows, save_manifest

pytestmark = pytest.mark.slow

NOW = datetime.now(timezone.utc)
DAY = timedelta(days=1)


@pytest.fixture(params=["s3", "local"])
def env(request: pytest.FixtureRequest, write_settings: Any, database: str, bucket: str, key_file: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, prefect_server: Any) -> dict[str, Any]:
    from luxima_backup import runtime

    if request.param == "local":
        monkeypatch.setenv("LUXIMA_BACKUP__STORAGE__KIND", "local")
        monkeypatch.setenv("LUXIMA_BACKUP__STORAGE__PATH", str(tmp_path / "nas"))
    write_settings(database, bucket, file_keys(key_file), """
        [retention]
        grace_hours = 0.0005
    """)
    return {"store": runtime.store(runtime.settings()), "kind": request.param, "bucket": bucket}


def _object(key: str, size: int = 64) -> DataObject:
    return DataObject(key=key, format="pg_dump-custom", compression=Compression(codec="zstd", level=3),
                      encryption=Encryption(chunk_size=1 << 20, provider="file", key_id="file:test"), size_plain=size,
                      size_compressed=size, size_encrypted=size, sha256_plain="0" * 64, sha256_encrypted="0" * 64)


def db_backup(store: Any, when: datetime, target: str = "main", status: str = "verified", manifest_too: bool = True) -> str:
    """A database backup as the flow leaves it: the dump and globals objects, then the manifest (when it got that far)."""
    keys = manifest.db_keys("backups", target, when, "zst")
    store.save_bytes(keys.data, os.urandom(64))
    store.save_bytes(keys.globals, os.urandom(16))
    if manifest_too:
        save_manifest(store, keys.manifest, DbManifest(
            backup_id=keys.backup_id, status=status, started_at=when, completed_at=when,
            source=DbSource(name=target, database="luxima"), dump=_object(keys.data), globals=DbGlobals(key=keys.globals)))
    return keys.backup_id


def files_backup(store: Any, when: datetime, chain: dict[str, Any], source: str = "userfiles") -> str:
    """A file backup: archive and index; ``chain`` (backup id → archive) is every archive it reads, itself included."""
    keys = manifest.files_keys("backups", source, when, "gz")
    store.save_bytes(keys.archive, os.urandom(64))
    store.save_bytes(keys.index, os.urandom(16))
    archive = manifest.FileArchive(**_object(keys.archive).model_dump(), files=1, bytes=64)
    chain[keys.backup_id] = manifest.StoredObject(key=keys.archive, compression=archive.compression, size_encrypted=64,
                                                  sha256_encrypted="0" * 64)
    full_at = min((when_of(b) for b in chain), default=when)
    save_manifest(store, keys.manifest, manifest.FilesManifest(
        backup_id=keys.backup_id, status="verified", started_at=when, completed_at=when,
        source=manifest.FilesSource(name=source, kind="local", path="/srv"), type="full" if len(chain) == 1 else "incremental",
        full_completed_at=full_at, archive=archive,
        index=manifest.FileIndex(key=keys.index, compression=archive.compression, encryption=archive.encryption, entries=1,
                                 size_plain=16, sha256_plain="0" * 64, size_encrypted=16, sha256_encrypted="0" * 64),
        archives=dict(chain), totals={"files": 1, "dirs": 0, "symlinks": 0, "bytes": 64}))
    return keys.backup_id


def when_of(backup_id: str) -> datetime:
    return datetime.strptime(backup_id.rsplit("-", 1)[1], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)


def keys_of(store: Any, backup_id: str) -> list[str]:
    stamp = backup_id.rsplit("-", 1)[1]
    return [o.key for o in store.list("backups/") if f"/{stamp}." in o.key]


def all_versions(env: dict[str, Any], key: str) -> list[Any]:
    if env["kind"] != "s3":
        return [key] if any(o.key == key for o in env["store"].list(key)) else []
    client = env["store"]._client
    resp = client.list_object_versions(Bucket=env["bucket"], Prefix=key)
    return [v for v in resp.get("Versions", []) + resp.get("DeleteMarkers", []) if v["Key"] == key]


def prune(**params: Any) -> Any:
    from flows.prune import prune as flow_fn

    return flow_fn(**params, return_state=True)


def test_forty_days_keep_thirty_the_failures_never_count_and_leftovers_are_swept(
    env: dict[str, Any], pg_cluster: Any, database: str,
) -> None:
    store = env["store"]
    failed = {3, 4, 17}  # runs that failed after their objects landed: no manifest
    ids = {}
    for ago in range(40, 0, -1):
        ids[ago] = db_backup(store, NOW - ago * DAY + timedelta(hours=1), manifest_too=ago not in failed)
    unverified = db_backup(store, NOW - 2 * DAY)  # replaced below by a manifest that is not verified
    save_manifest(store, manifest.db_keys("backups", "main", NOW - 2 * DAY, "zst").manifest, DbManifest(
        **{**manifest.parse(_manifest_bytes(store, unverified)).model_dump(by_alias=True), "status": "unverified"}))
    time.sleep(2.5)  # past the grace period of this test's settings

    dry = prune(dry_run=True, force=True)
    assert dry.is_completed(), dry
    assert dry.result()["removed"] == 0 and dry.result()["would_remove"] > 0
    assert all(keys_of(store, i) for i in ids.values())  # a dry run removes nothing

    state = prune(force=True)
    assert state.is_completed(), state
    left = {ago for ago, bid in ids.items() if any(k.endswith(manifest.MANIFEST_SUFFIX) for k in keys_of(store, bid))}
    # 30 days of verified backups (minus the failed ones), nothing older; the unverified one went
    assert left == set(range(1, 31)) - failed
    assert not keys_of(store, unverified)
    for ago in (35, 40):  # removed for good: manifest, dump, globals, every version
        assert keys_of(store, ids[ago]) == []
        assert all_versions(env, manifest.db_keys("backups", "main", when_of(ids[ago]), "zst").data) == []
    for ago in failed:  # the failed runs' objects, no manifest: swept
        assert keys_of(store, ids[ago]) == []
    rows = [r for r in log_rows(pg_cluster, database) if r["kind"] in ("prune", "sweep")]
    assert {(r["kind"], r["status"]) for r in rows} == {("prune", "success"), ("sweep", "success")}


def _manifest_bytes(store: Any, backup_id: str) -> bytes:
    key = manifest.db_keys("backups", "main", when_of(backup_id), "zst").manifest
    with store.load(key) as f:
        return f.read()


def test_a_target_failing_for_a_week_is_not_pruned(env: dict[str, Any]) -> None:
    store = env["store"]
    ids = [db_backup(store, NOW - ago * DAY) for ago in range(60, 7, -1)]  # nothing for the last week
    state = prune(force=True)
    assert state.is_completed(), state
    result = state.result()
    assert result["held"] == ["db/main"] and result["removed"] == 0
    assert all(keys_of(store, i) for i in ids)


def test_a_prune_removing_most_of_a_target_is_refused_without_force(env: dict[str, Any]) -> None:
    store = env["store"]
    ids = [db_backup(store, NOW - ago * DAY + timedelta(hours=1)) for ago in range(90, 0, -1)]
    result = prune().result()
    assert result["held"] == ["db/main"] and result["removed"] == 0
    assert all(keys_of(store, i) for i in ids)
    assert prune(force=True).result()["removed"] == 60


def test_a_file_chain_is_kept_whole_while_needed_and_removed_whole(env: dict[str, Any]) -> None:
    store = env["store"]
    chains: list[list[str]] = []
    for start in (50, 40, 30, 20, 10):  # a full every 10 days, incrementals on it
        chain: dict[str, Any] = {}
        chains.append([files_backup(store, NOW - (start - i) * DAY, chain) for i in range(10)])
    result = prune(force=True).result()
    present = {bid for chain in chains for bid in chain if keys_of(store, bid)}
    # keep 30 days: the chain starting 30 days ago is within it; the one starting 40 days ago is read by
    # nothing kept: it goes whole, like the one before it
    assert present == set(chains[2] + chains[3] + chains[4])
    assert result["removed"] == 20


def test_a_crash_between_manifest_and_objects_and_an_abandoned_upload_are_swept(env: dict[str, Any]) -> None:
    store = env["store"]
    keep = db_backup(store, NOW - DAY)
    orphan = db_backup(store, NOW - 40 * DAY, manifest_too=False)  # as if the prune crashed after the manifest
    if env["kind"] == "s3":
        client = store._client
        upload = client.create_multipart_upload(Bucket=env["bucket"], Key="backups/db/main/2026/11/01/20261101T000000Z.dump.zst.enc")
    else:
        partial = env["store"].root / "backups/db/main/x.partial-abc"
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(b"half")
    time.sleep(2.5)
    state = prune()
    assert state.is_completed(), state
    assert keys_of(store, keep) and not keys_of(store, orphan)
    if env["kind"] == "s3":
        assert client.list_multipart_uploads(Bucket=env["bucket"]).get("Uploads", []) == []
        assert upload["UploadId"]
    else:
        assert not partial.exists()


def test_a_damaged_manifest_is_left_alone_and_reported(env: dict[str, Any]) -> None:
    store = env["store"]
    good = db_backup(store, NOW - DAY)
    bad = db_backup(store, NOW - 3 * DAY)
    key = manifest.db_keys("backups", "main", when_of(bad), "zst").manifest
    store.save_bytes(key, b'{"manifest_version": 1, "backup_id": "x"}')
    state = prune()
    assert state.is_completed(), state
    assert state.result()["damaged_manifests"] == 1
    assert keys_of(store, good) and len(keys_of(store, bad)) == 3  # its objects are not orphans: left for a person


def test_unknown_components_are_refused(env: dict[str, Any]) -> None:
    exc = error_of(prune(components=["vm"]))
    assert "vm-backup" in str(exc)
