"""One contract suite for every ObjectStore: S3 (the moto server over HTTP) and a local directory."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pytest

from luxima_backup.errors import ObjectNotFound, StorageError, is_transient, should_retry
from luxima_backup.settings import StorageSettings
from luxima_backup.storage import LocalStore, ObjectStore, S3Store, store_from_settings
from tests.fault_proxy import FaultProxy

MIB = 1024 * 1024


def s3_settings(endpoint: str, bucket: str, **extra: Any) -> StorageSettings:
    return StorageSettings.model_validate({
        "bucket": bucket, "endpoint_url": endpoint, "access_key_id": "env:LUXIMA_TEST_S3_ACCESS_KEY",
        "secret_access_key": "env:LUXIMA_TEST_S3_SECRET_KEY", "multipart_chunk_mib": 5, "max_attempts": 2, **extra,
    })


@pytest.fixture(params=["s3", "local"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return store_from_settings(StorageSettings(kind="local", path=tmp_path / "backups"))
    s3 = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("bucket")
    return store_from_settings(s3_settings(s3.url, bucket))


class Failing(io.RawIOBase):
    """A source that yields ``good`` bytes and then fails, as a dying dump would."""

    def __init__(self, good: int):
        self.left = good

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            raise StorageError("the stage feeding this upload failed")
        n = min(self.left, n if n > 0 else MIB)
        self.left -= n
        return os.urandom(n)


def leftovers(store: ObjectStore) -> list[str]:
    if isinstance(store, S3Store):
        return store.incomplete_uploads("")
    assert isinstance(store, LocalStore)
    return [str(p) for p in store.root.rglob("*.partial-*")]


def test_streamed_save_round_trips(store: ObjectStore) -> None:
    data = os.urandom(12 * MIB + 123)  # several parts, and a short last one
    info = store.save("backups/db/x/1.enc", io.BytesIO(data))
    assert info.size == len(data) and store.stat("backups/db/x/1.enc").size == len(data)
    with store.load("backups/db/x/1.enc") as body:
        assert body.read() == data


def test_failed_save_leaves_nothing(store: ObjectStore) -> None:
    with pytest.raises(StorageError):
        store.save("backups/db/x/broken.enc", Failing(11 * MIB))
    with pytest.raises(ObjectNotFound):
        store.stat("backups/db/x/broken.enc")
    assert list(store.list("backups/")) == []
    assert leftovers(store) == []


def test_small_objects_list_and_remove(store: ObjectStore) -> None:
    for key in ("backups/db/b/2.json", "backups/db/a/1.json", "backups/files/c.json", "other/d.json"):
        store.save_bytes(key, key.encode(), "application/json")
    store.save_bytes("backups/db/a/1.json", b"replaced")
    assert [o.key for o in store.list("backups/db/")] == ["backups/db/a/1.json", "backups/db/b/2.json"]
    assert [o.key for o in store.list("backups/db/a")] == ["backups/db/a/1.json"]
    with store.load("backups/db/a/1.json") as body:
        assert body.read() == b"replaced"
    store.remove("backups/db/a/1.json")
    store.remove("backups/db/a/1.json")  # absent: not an error
    assert [o.key for o in store.list("backups/")] == ["backups/db/b/2.json", "backups/files/c.json"]


def test_absent_objects_are_not_found(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound):
        store.stat("backups/none")
    with pytest.raises(ObjectNotFound):
        with store.load("backups/none"):
            pass
    assert not is_transient(ObjectNotFound("x"))


def test_local_store_refuses_keys_that_escape(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    for key in ("../etc/passwd", "/abs", "a//b", "a/./b", ""):
        with pytest.raises(StorageError, match="invalid object key"):
            store.save_bytes(key, b"x")
    assert not (tmp_path / "etc").exists()


def test_s3_unavailable_is_transient_and_denied_is_not(s3_server: Any, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = FaultProxy(s3_server.url).start()
    try:
        proxy.fail("HEAD", "", 503, "SlowDown", times=-1)
        store = store_from_settings(s3_settings(proxy.url, bucket))
        with pytest.raises(StorageError) as err:
            store.stat("backups/x")
        assert is_transient(err.value)
        # botocore tried it max_attempts (2) times; that was its one retry layer, so none above tries again
        assert proxy.count("HEAD", "", 503) == 2 and err.value.retried and not should_retry(err.value)
    finally:
        proxy.stop()
    proxy = FaultProxy(s3_server.url).start()
    try:
        proxy.fail("PUT", "", 403, "AccessDenied", times=-1)
        store = store_from_settings(s3_settings(proxy.url, bucket))
        with pytest.raises(StorageError, match="denied access") as err:
            store.save_bytes("backups/x", b"x")
        assert not is_transient(err.value) and "credentials" in (err.value.hint or "")
    finally:
        proxy.stop()
