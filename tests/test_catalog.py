"""The authenticated catalog: signed manifests, objects bound to their backup, and the index per target.

Against the S3 server (ETags, as a real bucket gives them) with the key-file provider; the Transit
HMAC path is covered by tests/test_key_providers.py, the restores refusing by tests/test_db_restore.py.
"""

from __future__ import annotations

import contextlib
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import pytest

from luxima_backup import catalog, envelope, manifest, runtime
from luxima_backup.errors import FormatError, IntegrityError
from luxima_backup.keys import KeyFileProvider, new_master_key
from tests.conftest import file_keys
from tests.test_prune import db_backup

pytestmark = pytest.mark.slow

NOW = datetime.now(timezone.utc)
DAY = timedelta(days=1)


class Counting:
    """A store that counts the reads of each kind of object: the index's promise is to read few manifests."""

    def __init__(self, store: Any):
        self.store, self.manifest_reads, self.index_reads = store, 0, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    @contextlib.contextmanager
    def load(self, key: str) -> Iterator[BinaryIO]:
        if key.endswith(manifest.MANIFEST_SUFFIX):
            self.manifest_reads += 1
        elif f"/{catalog.INDEX_FOLDER}/" in key:
            self.index_reads += 1
        with self.store.load(key) as body:
            yield body


@pytest.fixture
def env(write_settings: Any, database: str, bucket: str, key_file: Path, s3_server: Any) -> dict[str, Any]:
    config = write_settings(database, bucket, file_keys(key_file))
    settings = runtime.settings()
    return {"store": runtime.store(settings), "keys": runtime.key_provider(settings), "client": s3_server.client(),
            "bucket": bucket, "config": config}


def fresh(env: dict[str, Any]) -> tuple[catalog.Catalog, Counting]:
    """A catalog as a new process would have it (nothing cached), counting its reads."""
    counting = Counting(env["store"])
    return catalog.Catalog(counting, "backups", env["keys"]), counting  # type: ignore[arg-type]


def manifest_key(backup_id: str) -> str:
    when = datetime.strptime(backup_id.rsplit("-", 1)[1], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    return manifest.db_keys("backups", "main", when, "zst").manifest


def read(env: dict[str, Any], key: str) -> dict[str, Any]:
    return json.loads(env["client"].get_object(Bucket=env["bucket"], Key=key)["Body"].read())


def put(env: dict[str, Any], key: str, doc: dict[str, Any]) -> None:
    env["client"].put_object(Bucket=env["bucket"], Key=key, Body=json.dumps(doc).encode())


def test_the_index_is_built_once_then_only_new_or_changed_manifests_are_read(env: dict[str, Any]) -> None:
    ids = [db_backup(env["store"], NOW - d * DAY) for d in range(20, 0, -1)]  # each write brings the index up to date
    cat, counted = fresh(env)
    assert [b.backup_id for b in cat.list_backups("db", "main")] == ids
    assert counted.manifest_reads == 0 and counted.index_reads == 1  # one small object, not twenty manifests

    # A run that crashed after its manifest and before the index: the listing shows it, only it is read.
    index_key = cat.index_key("db", "main")
    before = read(env, index_key)
    newest = db_backup(env["store"], NOW)
    put(env, index_key, before)  # as if the index update never happened
    cat, counted = fresh(env)
    assert [b.backup_id for b in cat.list_backups("db", "main")][-1] == newest
    assert counted.manifest_reads == 1
    assert len(read(env, index_key)["entries"]) == 21  # and written back

    # The whole manifest is read when it is needed (a restore), and only then.
    cat, counted = fresh(env)
    listed = cat.list_backups("db", "main")
    assert counted.manifest_reads == 0
    assert listed[-1].manifest.dump.key.endswith(".dump.zst.enc") and counted.manifest_reads == 1  # type: ignore[union-attr]

    # Removed by hand: seen by the next full listing (the prune's after it removes, and one a day on any read),
    # without reading any manifest...
    env["store"].remove(manifest_key(ids[0]))
    cat, counted = fresh(env)
    cat.refresh("db", "main")
    assert [b.backup_id for b in cat.list_backups("db", "main")] == ids[1:] + [newest] and counted.manifest_reads == 0
    # ...and `latest` never offers a backup whose manifest is gone, even before that listing.
    env["store"].remove(manifest_key(newest))
    cat, counted = fresh(env)
    assert cat.resolve("db", "latest", source="main").backup_id == ids[-1]
    assert newest not in [b.backup_id for b in cat.list_backups("db", "main")]


def test_the_index_lists_everything_again_once_a_day(env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    ids = [db_backup(env["store"], NOW - d * DAY) for d in (3, 2, 1)]
    env["store"].remove(manifest_key(ids[0]))  # by hand, outside luxima-backup
    cat, _ = fresh(env)
    assert len(cat.list_backups("db", "main")) == 3  # the index says what it listed today
    monkeypatch.setattr(catalog, "RECONCILE", timedelta(0))  # a day later
    assert [b.backup_id for b in cat.list_backups("db", "main")] == ids[1:]


def test_an_index_that_fails_its_mac_or_is_missing_is_rebuilt_from_the_manifests(env: dict[str, Any]) -> None:
    good = db_backup(env["store"], NOW - 2 * DAY)
    bad = db_backup(env["store"], NOW - DAY, status="unverified")
    cat, _ = fresh(env)
    index_key = cat.index_key("db", "main")
    doc = read(env, index_key)
    # someone who can write to the bucket marks the unverified backup verified in the index
    for entry in doc["entries"]:
        entry["status"] = "verified"
    put(env, index_key, doc)
    cat, counted = fresh(env)
    assert cat.resolve("db", "latest", source="main").backup_id == good  # not `bad`
    assert counted.manifest_reads == 2
    assert {e["backup_id"]: e["status"] for e in read(env, index_key)["entries"]} == {good: "verified", bad: "unverified"}

    # an index signed with another key (another installation's, a planted one): rebuilt too
    other = tmp_key(env)
    catalog.Catalog(env["store"], "backups", other)._write_index("db", "main", [], {}, None, NOW)
    cat, counted = fresh(env)
    assert [b.backup_id for b in cat.list_backups("db", "main")] == [good, bad] and counted.manifest_reads == 2

    env["store"].remove(index_key)  # missing
    cat, counted = fresh(env)
    assert len(cat.list_backups("db", "main")) == 2 and counted.manifest_reads == 2
    assert read(env, index_key)["entries"]


def tmp_key(env: dict[str, Any]) -> KeyFileProvider:
    path = Path(runtime.settings().work_dir) / "other-installation.key"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new_master_key())
    return KeyFileProvider(path)


def test_an_altered_manifest_is_damaged_and_never_restored_from(env: dict[str, Any]) -> None:
    older = db_backup(env["store"], NOW - 2 * DAY)
    newer = db_backup(env["store"], NOW - DAY)
    key = manifest_key(newer)
    doc = read(env, key)
    doc["row_counts"] = {"public.events": 1}  # any change: the MAC covers every field
    put(env, key, doc)
    cat, _ = fresh(env)
    backups, damaged = cat.by_target("db")
    assert [b.backup_id for b in backups["main"]] == [older]
    assert [d.manifest_key for d in damaged] == [key] and "not authentic" in str(damaged[0])
    assert cat.resolve("db", "latest", source="main").backup_id == older
    with pytest.raises(FormatError, match="not authentic"):
        cat.resolve("db", key)


def test_a_manifest_copied_under_a_newer_name_is_refused(env: dict[str, Any]) -> None:
    """An attacker who cannot sign plants an old backup as the newest: its MAC covers its key, so it is damaged."""
    old = db_backup(env["store"], NOW - 3 * DAY)
    db_backup(env["store"], NOW - 2 * DAY)
    planted = manifest.db_keys("backups", "main", NOW + timedelta(minutes=5), "zst").manifest
    doc = read(env, manifest_key(old))
    doc["completed_at"] = (NOW + timedelta(minutes=5)).isoformat()
    put(env, planted, doc)
    put(env, planted.replace(".manifest.json", "1.manifest.json"), read(env, manifest_key(old)))  # even unchanged
    cat, _ = fresh(env)
    assert cat.resolve("db", "latest", source="main").backup_id != old
    damaged = [u for u in cat.iter_backups("db") if isinstance(u, catalog.Unreadable)]
    assert len(damaged) == 2 and all("does not match" in str(u) for u in damaged)


def test_unsigned_manifests_are_listed_as_damaged_until_adopted(env: dict[str, Any]) -> None:
    from typer.testing import CliRunner

    from app.cli import app

    ids = [db_backup(env["store"], NOW - d * DAY) for d in (3, 2, 1)]
    for backup_id in ids[:2]:  # written by a version that did not sign manifests
        doc = read(env, manifest_key(backup_id))
        del doc["mac"]
        put(env, manifest_key(backup_id), doc)
    env["store"].remove(manifest.db_keys("backups", "main", NOW - 3 * DAY, "zst").data)  # one lost its dump since
    cat, _ = fresh(env)
    env["store"].remove(cat.index_key("db", "main"))  # the version that wrote them kept no index either
    assert [b.backup_id for b in cat.list_backups("db")] == ids[2:]
    assert sum("not signed" in str(u) for u in cat.iter_backups("db") if isinstance(u, catalog.Unreadable)) == 2

    args = ["catalog", "sign", "--component", "db", "--config", str(env["config"])]
    dry = CliRunner().invoke(app, args)
    assert dry.exit_code == 1, dry.output  # one cannot be adopted: its dump is missing
    assert "would sign" in dry.stdout and "refused" in dry.stdout and "is missing" in dry.stdout
    cat, _ = fresh(env)
    assert len(cat.list_backups("db")) == 1  # a dry run signs nothing

    done = CliRunner().invoke(app, args + ["--confirm"])
    assert done.exit_code == 1 and "signed" in done.stdout
    cat, _ = fresh(env)
    assert [b.backup_id for b in cat.list_backups("db")] == ids[1:]


def test_an_object_is_bound_to_its_backup_target_and_key() -> None:
    """The header names backup, target and key; reading it as anything else is refused, and editing the header to
    pass the check fails authentication."""
    key = bytes(range(32))
    wrapped = envelope.WrappedKey("file", "file:test", "x")
    bound = manifest.binding("db-main-20261130T030000Z", "db", "main", "backups/db/main/2026/11/30/20261130T030000Z.dump.zst.enc")
    blob = envelope.encrypt_bytes(b"the dump", key, wrapped, 1024, {"content": "dump", **bound})
    assert envelope.decrypt_bytes(blob, lambda _: key, expect=bound) == b"the dump"
    for field, other in (("backup_id", "db-main-20261129T030000Z"), ("target", "db/staging"),
                         ("object", "backups/db/main/2026/11/30/20261130T040000Z.dump.zst.enc")):
        with pytest.raises(IntegrityError, match=f"{field} .* where .* was expected"):
            envelope.decrypt_bytes(blob, lambda _: key, expect={**bound, field: other})
    unbound = envelope.encrypt_bytes(b"old", key, wrapped, 1024, {"content": "dump"})
    assert envelope.decrypt_bytes(unbound, lambda _: key) == b"old"  # written before bindings: its manifest says so
    with pytest.raises(IntegrityError, match="does not name its backup"):
        envelope.decrypt_bytes(unbound, lambda _: key, expect=bound)
    # a header edited to claim another binding: the check passes, the first chunk does not
    forged = blob.replace(b"20261130T030000Z.dump", b"20261130T040000Z.dump")
    with pytest.raises(IntegrityError, match="failed authentication at chunk 0"):
        envelope.decrypt_bytes(forged, lambda _: key, expect={**bound, "object": bound["object"].replace("T03", "T04")})
