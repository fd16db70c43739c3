"""dr-replicate end to end: a second bucket and a directory on a DR host over SSH (rsync), a Prefect server.

Backups here are made as the flows leave them (encrypted objects of real bytes, signed manifests that
record their sizes and sha256): replication copies bytes and checks them against the manifests; it
never decrypts, so the objects' content does not matter to it.
"""

from __future__ import annotations

import hashlib
import os
import textwrap
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from devkit.sandbox import SshServer
from luxima_backup import catalog, manifest, runtime
from luxima_backup.manifest import Compression, DataObject, DbGlobals, DbManifest, DbSource, Encryption
from tests.conftest import file_keys
from tests.helpers import error_of, host_toml, log_rows, save_manifest

pytestmark = pytest.mark.slow

NOW = datetime.now(timezone.utc)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)


def dr_bucket_toml(s3_server: Any, target: str = "bucket2", object_lock: bool = False) -> tuple[str, str]:
    """A second bucket as the DR target ``target`` (with S3 Object Lock, written in governance mode): its name, and its
    settings."""
    name = "t-dr-" + uuid.uuid4().hex[:10]
    s3_server.create_bucket(name, versioning=True, object_lock=object_lock)
    return name, textwrap.dedent(f"""
        [dr.targets.{target}]
        kind = "storage"
        [dr.targets.{target}.storage]
        bucket = "{name}"
        endpoint_url = "{s3_server.url}"
        access_key_id = "env:LUXIMA_TEST_S3_ACCESS_KEY"
        secret_access_key = "env:LUXIMA_TEST_S3_SECRET_KEY"
        max_attempts = 2
        """) + ('object_lock = "governance"\n' if object_lock else "")


@pytest.fixture
def env(prefect_server: Any, write_settings: Any, database: str, bucket: str, key_file: Path, s3_server: Any,
        sshd: SshServer, tmp_path: Path, pg_cluster: Any) -> dict[str, Any]:
    dr_bucket, bucket_toml = dr_bucket_toml(s3_server)
    known = tmp_path / "known_hosts"
    known.write_text(sshd.known_hosts_line)
    dr_dir = tmp_path / "dr-node"
    dr_dir.mkdir()

    def settings(extra: str = "") -> Path:
        return write_settings(database, bucket, file_keys(key_file), host_toml("node2", sshd, known) + bucket_toml
                              + textwrap.dedent(f"""
            [dr.targets.node2]
            kind = "ssh"
            host = "node2"
            path = "{dr_dir}"
            bandwidth_limit_kib = 50000
            """) + textwrap.dedent(extra))

    settings()
    return {"settings": settings, "store": runtime.store(runtime.settings()), "dr_bucket": dr_bucket, "dr_dir": dr_dir,
            "s3": s3_server, "database": database, "cluster": pg_cluster}


def a_backup(store: Any, when: datetime, size: int = 300_000) -> manifest.BackupKeys:
    """A database backup as the flow leaves it: the dump and globals objects, then the signed manifest."""
    keys = manifest.db_keys("backups", "main", when, "zst")
    dump, globs = os.urandom(size), os.urandom(2000)
    store.save_bytes(keys.data, dump)
    store.save_bytes(keys.globals, globs)
    save_manifest(store, keys.manifest, DbManifest(
        backup_id=keys.backup_id, status="verified", started_at=when, completed_at=when,
        source=DbSource(name="main", database="luxima"),
        dump=DataObject(key=keys.data, format="pg_dump-custom", compression=Compression(codec="zstd", level=3),
                        encryption=Encryption(chunk_size=1 << 20, provider="file", key_id="file:test"), size_plain=size,
                        size_compressed=size, size_encrypted=size, sha256_plain="0" * 64,
                        sha256_encrypted=hashlib.sha256(dump).hexdigest(), bound=True),
        globals=DbGlobals(key=keys.globals, encrypted_bytes=len(globs), encrypted_sha256=hashlib.sha256(globs).hexdigest(),
                          bound=True)))
    return keys


def run(**params: Any) -> Any:
    from flows.dr_replicate import dr_replicate

    return dr_replicate(**params, return_state=True)


def dr_keys(env: dict[str, Any]) -> tuple[set[str], set[str]]:
    """What each DR target holds: the bucket's keys, and the files under the DR host's directory (as keys)."""
    client = env["s3"].client()
    in_bucket = {o["Key"] for o in client.list_objects_v2(Bucket=env["dr_bucket"]).get("Contents", [])}
    on_host = {p.relative_to(env["dr_dir"]).as_posix() for p in env["dr_dir"].rglob("*")
               if p.is_file() and ".rsync-partial" not in p.parts}
    return ({k for k in in_bucket if "/_catalog/" not in k}, {k for k in on_host if "/_catalog/" not in k})


def test_backups_reach_both_dr_targets_checked_and_a_second_run_copies_nothing(env: dict[str, Any]) -> None:
    made = [a_backup(env["store"], NOW - h * HOUR) for h in (30, 20, 10)]
    state = run()
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["copied"] == 6 and summary["refused"] == 0  # three backups to each of two targets
    wanted = {k for m in made for k in (m.data, m.globals, m.manifest)}
    in_bucket, on_host = dr_keys(env)
    assert in_bucket == wanted and on_host == wanted
    for m in made:  # the bytes at the DR site are the primary's, and the host's files are private
        with env["store"].load(m.data) as f:
            original = f.read()
        assert (env["dr_dir"] / m.data).read_bytes() == original
        assert (env["dr_dir"] / m.data).stat().st_mode & 0o077 == 0
    lag = {(r["target"], r["source"]): r for r in summary["lag"]}
    assert lag[("node2", "main")]["within_rpo"] and lag[("node2", "main")]["lag_hours"] == pytest.approx(
        10 + (datetime.now(timezone.utc) - NOW).total_seconds() / 3600, abs=0.1)  # NOW is the module's import time
    assert lag[("bucket2", "main")]["copies"] == 3

    # The DR site's own catalog lists them (signed by the primary: the same MAC key checks them).
    settings = runtime.settings()
    from tasks.replicate import dr_store
    dr_cat = catalog.Catalog(dr_store("node2", settings), "backups", runtime.key_provider(settings))
    assert [b.backup_id for b in dr_cat.list_backups("db")] == [m.backup_id for m in made]

    again = run()
    assert again.is_completed(), again.message
    assert again.result()["copied"] == 0 and again.result()["present"] == 6
    rows = [r for r in log_rows(env["cluster"], env["database"]) if r["kind"] == "replicate"]
    assert {r["target"] for r in rows} == {"bucket2", "node2"} and all(r["status"] == "success" for r in rows)


def test_a_deletion_or_a_tampered_object_on_the_primary_is_not_carried_over(env: dict[str, Any]) -> None:
    first = a_backup(env["store"], NOW - 30 * HOUR)
    second = a_backup(env["store"], NOW - 20 * HOUR)
    assert run().is_completed()

    # An attacker (or a wrong rule) deletes the first backup and overwrites the second's dump on the primary,
    # and a new backup's dump is replaced before it is copied.
    for key in (first.manifest, first.data, first.globals):
        env["store"].remove(key)
    env["store"].save_bytes(second.data, b"encrypted by ransomware")
    third = a_backup(env["store"], NOW - 10 * HOUR)
    fourth = a_backup(env["store"], NOW - 5 * HOUR)
    env["store"].save_bytes(fourth.data, os.urandom(300_000))

    state = run()
    assert state.is_failed() and "refused" in state.message and fourth.backup_id in state.message
    in_bucket, on_host = dr_keys(env)
    for held in (in_bucket, on_host):
        assert {first.manifest, first.data, second.manifest, third.manifest} <= held  # kept; the new good one copied
        assert fourth.manifest not in held and fourth.data not in held  # refused: never at the DR site as a backup
    with env["store"].load(second.data) as f:
        assert f.read() == b"encrypted by ransomware"
    assert (env["dr_dir"] / second.data).read_bytes() != b"encrypted by ransomware"


def test_a_cut_replication_resumes_with_what_is_missing(env: dict[str, Any]) -> None:
    done = a_backup(env["store"], NOW - 20 * HOUR)
    cut = a_backup(env["store"], NOW - 10 * HOUR, size=2_000_000)
    assert run().is_completed()
    # as a link cut mid-backup leaves it: one object whole, one truncated, no manifest (written last)
    (env["dr_dir"] / cut.manifest).unlink()
    data = env["dr_dir"] / cut.data
    data.write_bytes(data.read_bytes()[:700_000])
    client = env["s3"].client()
    client.delete_object(Bucket=env["dr_bucket"], Key=cut.manifest)
    client.delete_object(Bucket=env["dr_bucket"], Key=cut.globals)

    state = run()
    assert state.is_completed(), state.message
    rows = {(r["target"], r["backup"]): r for r in state.result()["rows"]}
    assert rows[("node2", done.backup_id)]["action"] == "present" and rows[("bucket2", done.backup_id)]["action"] == "present"
    assert rows[("node2", cut.backup_id)]["bytes"] == 2_000_000  # the truncated dump again; the globals were whole
    assert rows[("bucket2", cut.backup_id)]["bytes"] == 2000  # only the missing globals
    with env["store"].load(cut.data) as f:
        assert data.read_bytes() == f.read()


def test_the_dr_copies_have_their_own_retention_and_are_not_sent_again(env: dict[str, Any]) -> None:
    env["settings"]("[retention]\nmax_delete_percent = 100\n")
    kept = a_backup(env["store"], NOW - 20 * DAY)
    assert "behind at the DR site" in run().message  # copied; the lag (20 days) fails the run, as it should
    # 15 days later, as the DR site sees it: a new backup, and the first one now 35 days old (past 30 days)
    old = a_backup(env["store"], NOW - 35 * DAY)  # (made now with an old date: the same for the rules)
    new = a_backup(env["store"], NOW - 10 * HOUR)
    state = run()
    assert state.is_completed(), state.message
    for held in dr_keys(env):
        assert new.manifest in held and kept.manifest in held
        assert old.manifest not in held and old.data not in held  # past the DR retention: never sent
    assert env["store"].stat(old.manifest)  # the primary's own prune decides there
    # what the DR site already holds is pruned there by the same rules (a shorter policy now: 15 days)
    env["settings"]("[retention]\nmax_delete_percent = 100\n[retention.policies.db]\nkeep_days = 15\n")
    state = run()
    assert state.is_completed(), state.message
    pruned = [r for r in state.result()["rows"] if r["action"] == "prune: removed"]
    assert {r["backup"] for r in pruned} == {kept.backup_id} and {r["target"] for r in pruned} == {"bucket2", "node2"}
    for held in dr_keys(env):
        assert kept.manifest not in held and kept.data not in held and new.manifest in held


def test_a_target_past_the_rpo_fails_the_run_and_says_which(env: dict[str, Any]) -> None:
    a_backup(env["store"], NOW - 40 * HOUR)  # the newest backup is 40 h old: the DR site cannot be within 24 h
    state = run(targets=["bucket2"])
    exc = error_of(state)
    assert state.is_failed() and "bucket2: db/main is" in str(exc) and "behind at the DR site (RPO 24 h)" in str(exc)


# -- the VMs' archives, node to node --

def vm_dr_settings(vm_settings: Any, sshd: SshServer, s3_server: Any, tmp_path: Path) -> tuple[str, Path, Path]:
    """Settings for guest 100's backups, its archives copied from node1's backup storage to node2's (both this sshd) and
    its manifests to a DR bucket: the bucket's name, and the two nodes' dump directories."""
    known = tmp_path / "known_hosts"
    known.write_text(sshd.known_hosts_line)
    dr_bucket, bucket_toml = dr_bucket_toml(s3_server)
    primary, dr = tmp_path / "pve-backup-1" / "dump", tmp_path / "pve-backup-2" / "dump"
    hosts = host_toml("node1", sshd, known) + host_toml("node2", sshd, known)
    vm_settings(vm_backup="guests = [100]", vm_restore=hosts + bucket_toml + textwrap.dedent(f"""
        [dr]
        components = []
        [dr.vm]
        source_host = "node1"
        source_path = "{primary}"
        target_host = "node2"
        target_path = "{dr}"
        """))
    return dr_bucket, primary, dr


def test_vm_archives_reach_the_dr_node_checked_resume_after_a_cut_and_a_replaced_one_is_refused(
    pve: Any, vm_settings: Any, sshd: SshServer, s3_server: Any, tmp_path: Path, prefect_server: Any,
) -> None:
    from flows.vm_backup import vm_backup
    from tests.vm_env import NODE2, archives

    dr_bucket, primary, dr = vm_dr_settings(vm_settings, sshd, s3_server, tmp_path)
    assert vm_backup(return_state=True).is_completed()
    [archive] = [p for p in primary.iterdir() if p.name.startswith("vzdump-qemu-100-") and not p.name.endswith((".log", ".notes"))]

    state = run()
    assert state.is_completed(), state.message
    copy = dr / archive.name
    assert copy.read_bytes() == archive.read_bytes()
    assert (dr / (archive.name + ".notes")).read_text() == (archive.parent / (archive.name + ".notes")).read_text()
    assert [a["volid"] for a in archives(pve, 100, NODE2)] == [f"backup:backup/{archive.name}"]  # node2 lists it as its own
    vm_manifests = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=dr_bucket, Prefix="backups/vm/").get("Contents", [])]
    assert len(vm_manifests) == 1 and vm_manifests[0].endswith(".manifest.json")  # the DR catalog knows the guest
    lag = {(r["target"], r["component"], r["source"]): r for r in state.result()["lag"]}
    assert lag[("bucket2", "vm", "web")]["within_rpo"]

    # A link cut half-way: the next run sends the rest only.
    half = archive.stat().st_size // 2
    (dr / (archive.name + ".luxima-partial")).write_bytes(archive.read_bytes()[:half])
    copy.unlink()
    state = run()
    assert state.is_completed(), state.message
    [row] = [r for r in state.result()["rows"] if r["component"] == "vm" and r["target"] == "node2"]
    assert row["action"] == "copied" and row["bytes"] == archive.stat().st_size - half
    assert copy.read_bytes() == archive.read_bytes() and not (dr / (archive.name + ".luxima-partial")).exists()

    # The primary's archive replaced after the backup (its size no longer the manifest's): refused, the DR copy kept.
    good = copy.read_bytes()
    archive.write_bytes(archive.read_bytes() + b"tampered")
    copy.unlink()
    state = run()
    assert state.is_failed() and "refused" in state.message and "replaced after the backup" in state.message
    assert not copy.exists()
    copy.write_bytes(good)  # as it was at the DR node: a deletion or replacement on the primary never touches it
    archive.unlink()
    state = run()
    assert state.is_completed(), state.message
    assert copy.read_bytes() == good


def test_the_dr_node_keeps_its_own_newest_vm_archives_after_the_primary_pruned_them(
    pve: Any, vm_settings: Any, sshd: SshServer, s3_server: Any, tmp_path: Path, prefect_server: Any,
) -> None:
    """vm_backup.keep (2 cycles) at the DR node too, judged on the DR catalog: an archive the primary pruned stays at
    the DR site until newer good ones arrive there; a protected one stays whatever its age."""
    from flows.vm_backup import vm_backup
    from tests.vm_env import NODE2, WEEK, archives

    dr_bucket, primary, dr = vm_dr_settings(vm_settings, sshd, s3_server, tmp_path)
    volids = []
    for week in range(2):
        state = vm_backup(return_state=True)
        assert state.is_completed()
        volids.append(state.result()["guests"]["web"]["volid"])
        assert run().is_completed()
        pve.advance_clock(WEEK)
    first = volids[0].split("/", 1)[1]
    (dr / f"{first}.protected").write_text("")  # protected at the DR node: never pruned there
    pruned = []
    for week in range(2):
        state = vm_backup(return_state=True)
        assert state.is_completed()
        volids.append(state.result()["guests"]["web"]["volid"])
        state = run()
        assert state.is_completed(), state.message
        pruned += [r for r in state.result()["rows"] if r["action"].startswith("prune")]
        pve.advance_clock(WEEK)
    assert [a["volid"] for a in archives(pve, 100)] == volids[2:]  # the primary keeps 2
    # the DR node: the newest 2, and the protected first one; the second is pruned (after two newer good ones), with
    # its manifest at the DR target
    assert [a["volid"] for a in archives(pve, 100, NODE2)] == [volids[0], *volids[2:]]
    in_bucket = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=dr_bucket, Prefix="backups/vm/").get("Contents", [])}
    from tasks.replicate import dr_store

    dr_cat = runtime.catalog_at(dr_store("bucket2", runtime.settings()), "backups")
    assert sorted(b.entry.volid for b in dr_cat.list_backups("vm", "web")) == sorted([volids[0], *volids[2:]])
    assert len([k for k in in_bucket if k.endswith(".manifest.json")]) == 3
    assert [(r["target"], r["source"], r["action"]) for r in pruned] == [("node2", "web", "prune: removed")]


def test_copies_in_a_dr_bucket_with_object_lock_are_locked_for_their_retention(env: dict[str, Any]) -> None:
    """A stolen DR credential cannot destroy the copies: written under the bucket's object lock (the retention of their
    component), so neither a delete of the version nor the DR prune removes them early."""
    from tasks.replicate import dr_store

    locked, locked_toml = dr_bucket_toml(env["s3"], "locked", object_lock=True)
    env["settings"](locked_toml)
    made = a_backup(env["store"], NOW - HOUR)
    state = run(targets=["locked"])
    assert state.is_completed(), state.message
    store = dr_store("locked", runtime.settings())
    until = store.locked_until(made.data)
    margin = runtime.settings().dr.targets["locked"].storage.lock_margin_days  # type: ignore[union-attr]
    assert until is not None and timedelta(days=29 + margin) < until - datetime.now(timezone.utc) <= timedelta(days=30 + margin)
    assert store.locked_until(made.manifest) is not None
    client = env["s3"].client()
    version = client.head_object(Bucket=locked, Key=made.data)["VersionId"]
    with pytest.raises(Exception, match="AccessDenied|locked|WORM|retention"):
        client.delete_object(Bucket=locked, Key=made.data, VersionId=version)
    assert client.head_object(Bucket=locked, Key=made.data)["ContentLength"] == 300_000
