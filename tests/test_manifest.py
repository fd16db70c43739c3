"""The typed manifest: every manifest written so far still reads, and a bad one is refused saying why.

The files under tests/data/manifests/ were written by the flows before the model existed (a database
backup, an incremental file backup, a config archive), unchanged: restores must keep finding those.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from luxima_backup import catalog, manifest
from luxima_backup.errors import ConfigError, FormatError
from luxima_backup.keys import KeyFileProvider, new_master_key
from luxima_backup.storage import LocalStore

DATA = Path(__file__).parent / "data" / "manifests"


def _raw(name: str) -> bytes:
    return (DATA / name).read_bytes()


def _contains(whole: Any, part: Any, path: str = "") -> None:
    """Every field of ``part`` is in ``whole`` with the same value (``whole`` may add defaults)."""
    if isinstance(part, dict):
        assert isinstance(whole, dict), path
        for k, v in part.items():
            assert k in whole, f"{path}.{k} was dropped"
            _contains(whole[k], v, f"{path}.{k}")
    else:
        assert whole == part, f"{path}: {part!r} became {whole!r}"


@pytest.mark.parametrize("name, model, objects", [
    ("v1-db.json", manifest.DbManifest, 2),
    ("v1-files-incremental.json", manifest.FilesManifest, 2),
    ("v1-configs.json", manifest.ConfigManifest, 1),
])
def test_manifests_written_before_the_model_read_and_write_back_unchanged(name: str, model: type, objects: int) -> None:
    doc = manifest.parse(_raw(name))
    assert isinstance(doc, model)
    original = json.loads(_raw(name))
    assert doc.backup_id == original["backup_id"] and doc.verified
    assert doc.completed_at.tzinfo is not None and doc.source_name == original["source"]["name"]
    assert doc.data.key.endswith(".enc") and doc.data.sha256_encrypted == original[
        "dump" if model is manifest.DbManifest else "archive"]["sha256_encrypted"]
    owned = doc.objects()
    assert len(owned) == objects and doc.data.key in owned
    stem = doc.data.key.split(".", 1)[0]  # <prefix>/<component>/<source>/<date>/<time>: one backup's objects
    assert all(k.split(".", 1)[0] == stem for k in owned)
    # written again (a future rewrap or retention mark), nothing recorded is lost or changed
    _contains(json.loads(manifest.dump_json(doc)), original)


def test_an_incremental_manifest_names_its_chain_and_owns_only_its_own_objects() -> None:
    doc = manifest.parse(_raw("v1-files-incremental.json"))
    assert isinstance(doc, manifest.FilesManifest)
    assert doc.type == "incremental" and doc.previous in doc.archives and doc.backup_id in doc.archives
    older = doc.archives[doc.previous]
    assert older.key not in doc.objects()  # it belongs to the backup that wrote it
    assert doc.full_completed_at < doc.completed_at


def test_unknown_fields_survive_a_rewrite() -> None:
    original = json.loads(_raw("v1-db.json"))
    original["added_by_a_newer_writer"] = {"x": 1}
    original["dump"]["also_new"] = "kept"
    doc = manifest.parse(json.dumps(original).encode())
    back = json.loads(manifest.dump_json(doc))
    assert back["added_by_a_newer_writer"] == {"x": 1} and back["dump"]["also_new"] == "kept"


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(manifest_version=2), "upgrade luxima-backup"),
    (lambda d: d.pop("manifest_version"), "not written by luxima-backup"),
    (lambda d: d["dump"].pop("sha256_encrypted"), "dump.sha256_encrypted"),
    (lambda d: d["dump"].update(size_encrypted="lots"), "dump.size_encrypted"),
    (lambda d: d.update(component="tape"), "component"),
    (lambda d: d.update(completed_at="yesterday"), "completed_at"),
])
def test_a_damaged_manifest_is_refused_naming_what_is_wrong(change: Any, message: str) -> None:
    doc = json.loads(_raw("v1-db.json"))
    change(doc)
    with pytest.raises(FormatError) as err:
        manifest.parse(json.dumps(doc).encode(), "manifest x")
    assert message in f"{err.value} {err.value.hint}"


def test_not_json_is_a_format_error() -> None:
    with pytest.raises(FormatError, match="not valid JSON"):
        manifest.parse(b"{truncated", "manifest x")


def test_the_catalog_lists_by_component_and_never_offers_a_misfiled_manifest(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    key_file = tmp_path / "key"
    key_file.write_text(new_master_key())
    cat = catalog.Catalog(store, "backups", KeyFileProvider(key_file))
    db = json.loads(_raw("v1-db.json"))
    db_key = "backups/db/main/2026/11/29/20261129T203309Z.manifest.json"
    store.save_bytes(db_key, cat.signed(db_key, manifest.parse(_raw("v1-db.json"))))
    # a config manifest copied under db/ by mistake: listed as an error, never restorable as a database
    misfiled = "backups/db/main/2026/11/30/20261130T014301Z.manifest.json"
    store.save_bytes(misfiled, cat.signed(misfiled, manifest.parse(_raw("v1-configs.json"))))
    found = list(cat.iter_backups("db", "main"))
    assert [b.backup_id for b in found if isinstance(b, catalog.Backup)] == [db["backup_id"]]
    assert any(isinstance(e, catalog.Unreadable) and e.manifest_key == misfiled and misfiled in str(e) for e in found)
    assert cat.resolve("db", "latest", source="main").backup_id == db["backup_id"]
    with pytest.raises(ConfigError, match="is a configs backup"):
        cat.resolve("db", misfiled)


def test_a_backup_started_in_the_second_another_one_is_named_by_takes_the_next_second(tmp_path: Path) -> None:
    """Backup ids and keys carry their start to the second; a run of under a second can follow another of the same
    target within it, and would overwrite that backup's objects. The second one is named by the next second."""
    from datetime import datetime, timezone

    from flows.common import backup_start

    store = LocalStore(tmp_path)
    now = datetime.now(timezone.utc)
    # a backup of db/main holds this second and the next (a clock at a second's end must not make this pass)
    for second in (0, 1):
        taken = now.replace(microsecond=0).timestamp() + second
        stem = manifest.stem("backups", "db", "main", datetime.fromtimestamp(taken, timezone.utc))
        store.save_bytes(f"{stem}.manifest.json", b"{}")
    started = backup_start(store, "backups", "db", "main")
    assert int(started.timestamp()) >= int(now.timestamp()) + 2
    assert not any(store.list(manifest.stem("backups", "db", "main", started)))
    # another target is not held up by it
    other = backup_start(store, "backups", "db", "crm")
    assert int(other.timestamp()) - int(datetime.now(timezone.utc).timestamp()) <= 0


def test_two_runs_starting_at_once_take_different_seconds(tmp_path: Path) -> None:
    """A run from the shell beside a scheduled one, same target, same instant: both find the name free in storage,
    and only the claim on this host keeps them from sharing one id (and one run's objects overwriting the other's)."""
    import threading

    from flows.common import backup_start

    store = LocalStore(tmp_path / "store")
    work = tmp_path / "work"
    ready = threading.Barrier(4)
    starts: list[Any] = []

    def start() -> None:
        ready.wait()
        starts.append(backup_start(store, "backups", "db", "main", work))

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({int(s.timestamp()) for s in starts}) == 4
    assert oct((work / "claims").stat().st_mode & 0o777) == oct(0o700)
