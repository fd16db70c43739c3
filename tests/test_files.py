"""The files backup and restore flows end to end: a real sshd, rsync, the S3 server, PostgreSQL for the log, Prefect."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
import textwrap
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

from luxima_backup import manifest
from luxima_backup.envelope import DecryptingReader, encrypt_bytes
from luxima_backup.errors import ConfigError, IntegrityError, SourceError, VerificationError
from luxima_backup.keys import KeyFileProvider
from devkit.sandbox import PostgresCluster, SshServer
from tests.conftest import file_keys
from tests.helpers import error_of, log_rows, s3_get, s3_keys, signed_manifest

pytestmark = pytest.mark.slow

MARKER = b"LUXIMA-FILE-PLAINTEXT-MARKER-51c0"
ODD_NAMES = [b"with space.txt", b"new\nline.txt", b"latin1-caf\xe9.bin", "unicode-ファイル.txt".encode(), b"-starts-with-dash",
             b"back\\slash", b"quote'and\"double"]


@pytest.fixture(scope="module")
def sshd() -> Iterator[SshServer]:
    server = SshServer().start()
    yield server
    server.stop()


def make_tree(root: Path) -> None:
    """Odd names, nested folders, an empty folder and file, a 3 MB file, symlinks, several modes and exact mtimes."""
    root.mkdir(parents=True, exist_ok=True)
    base = os.fsencode(root)
    for i, name in enumerate(ODD_NAMES):
        with open(os.path.join(base, name), "wb") as f:
            f.write(MARKER + b" odd %d" % i)
    (root / "dir with spaces" / "sub").mkdir(parents=True)
    (root / "dir with spaces" / "sub" / "deep.txt").write_bytes(MARKER + b" deep")
    (root / "dir with spaces" / "a.txt").write_bytes(b"a" * 100)
    (root / "photos" / "2026").mkdir(parents=True)
    (root / "photos" / "2026" / "big.bin").write_bytes(os.urandom(3 << 20) + MARKER)
    (root / "photos" / "2026" / "small.jpg").write_bytes(b"\xff\xd8" + MARKER)
    (root / "empty-dir").mkdir()
    (root / "empty.txt").write_bytes(b"")
    (root / "script.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(root / "script.sh", 0o750)
    (root / "secret.txt").write_bytes(MARKER + b" private")
    os.chmod(root / "secret.txt", 0o600)
    os.chmod(root / "photos", 0o711)
    os.symlink("photos/2026/small.jpg", root / "link-relative")
    os.symlink("missing-target", root / "link-dangling")
    for i, (dirpath, dirnames, filenames) in enumerate(sorted(os.walk(base))):
        for j, name in enumerate(sorted(filenames)):
            path = os.path.join(dirpath, name)
            os.utime(path, ns=(1_600_000_000_123_456_789 + i * 1000 + j,) * 2, follow_symlinks=False)
    os.utime(root / "link-relative", ns=(1_500_000_000_000_000_001, 1_500_000_000_000_000_001), follow_symlinks=False)
    for dirpath, _, _ in sorted(os.walk(base), reverse=True):
        os.utime(dirpath, ns=(1_650_000_000_987_654_321, 1_650_000_000_987_654_321))


def snapshot(root: Path) -> dict[bytes, tuple[Any, ...]]:
    """Every entry under ``root``: type, mode, mtime_ns, and content or link target."""
    out: dict[bytes, tuple[Any, ...]] = {}
    base = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, base)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path), st.st_mtime_ns)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_mtime_ns)
            else:
                with open(path, "rb") as f:
                    out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_mtime_ns, f.read())
    return out


@pytest.fixture
def files_env(prefect_server: Any, pg_cluster: PostgresCluster, s3_server: Any, database: str, bucket: str, key_file: Path,
              write_settings: Callable[..., Path], sshd: SshServer, tmp_path: Path) -> dict[str, Any]:
    """A source tree served over SSH, settings naming it, and a way to rewrite the settings."""
    src = tmp_path / "source"
    make_tree(src)
    known = tmp_path / "known_hosts"
    known.write_text(sshd.known_hosts_line)

    def settings(kind: str = "ssh", extra: str = "", path: Path = src, files_opts: str = "",
                 host_key: str = f"file:{sshd.client_key}", keys: str = file_keys(key_file)) -> Path:
        source = f'kind = "ssh"\nhost = "files1"\npath = "{path}"' if kind == "ssh" else f'kind = "local"\npath = "{path}"'
        return write_settings(database, bucket, keys, textwrap.dedent(f"""
            [hosts.files1]
            host = "127.0.0.1"
            port = {sshd.port}
            user = "{sshd.user}"
            key = "{host_key}"
            known_hosts = "{known}"
            connect_timeout = 5

            [files_backup]
            attempts = 1
            """) + files_opts + "\n[files_backup.sources.userfiles]\n" + source + "\n" + textwrap.dedent(extra))

    settings()
    return {"src": src, "known": known, "settings": settings, "bucket": bucket, "s3": s3_server, "db": database,
            "cluster": pg_cluster, "key_file": key_file, "tmp": tmp_path, "prefect": prefect_server, "sshd": sshd}


def backup(**params: Any) -> Any:
    from flows.files_backup import files_backup

    state = files_backup(**params, return_state=True)
    return state


def backed_up(**params: Any) -> dict[str, Any]:
    state = backup(**params)
    assert state.is_completed(), state.message
    return state.result()["userfiles"]


def restore(**params: Any) -> Any:
    from flows.files_restore import files_restore

    return files_restore(**params, return_state=True)


def restored(**params: Any) -> dict[str, Any]:
    state = restore(**params)
    assert state.is_completed(), state.message
    return state.result()


def manifest_doc(env: dict[str, Any], backup_id: str) -> tuple[str, dict[str, Any]]:
    key = next(k for k in s3_keys(env["s3"], env["bucket"]) if k.endswith(".manifest.json")
               and json.loads(s3_get(env["s3"], env["bucket"], k))["backup_id"] == backup_id)
    return key, json.loads(s3_get(env["s3"], env["bucket"], key))


# -- backup and restore round trips --

def test_round_trip_over_ssh_keeps_names_links_modes_and_mtimes(files_env: dict[str, Any]) -> None:
    src = files_env["src"]
    before = snapshot(src)
    summary = backed_up()
    assert summary["type"] == "full"
    assert summary["totals"]["files"] == len(ODD_NAMES) + 7 and summary["totals"]["symlinks"] == 2
    assert summary["transferred_files"] == summary["totals"]["files"]
    # nothing stored in clear: not the contents, not the file names (test_no_file_or_folder_name_is_stored_in_clear)
    for key in s3_keys(files_env["s3"], files_env["bucket"]):
        blob = s3_get(files_env["s3"], files_env["bucket"], key)
        assert MARKER not in blob and b"with space" not in blob and "ファイル".encode() not in blob, key

    out = files_env["tmp"] / "restored"
    result = restored(destination=str(out))
    assert result["md5_checked"] == summary["totals"]["files"]
    assert snapshot(out) == before

    rows = [r for r in log_rows(files_env["cluster"], files_env["db"]) if r["component"] == "files"]
    assert [(r["kind"], r["status"]) for r in rows] == [("backup", "success"), ("restore", "success")]
    assert rows[0]["target"] == "userfiles" and rows[0]["size_encrypted"] == summary["size_encrypted"]
    # Both long stages kept a progress gauge in the UI, ending at 100.
    import httpx

    gauges = httpx.post(f"{files_env['prefect'].api_url}/artifacts/filter", json={
        "artifacts": {"type": {"any_": ["progress"]}}, "limit": 50, "offset": 0, "sort": "CREATED_DESC"}).json()
    shown = {a["description"].split(":")[0]: a["data"] for a in gauges}
    assert shown.get("full archive of userfiles") == 100.0, shown
    extracting = [v for k, v in shown.items() if k.startswith("extracting ")]
    assert extracting and set(extracting) == {100.0}, shown


PLANTED = [b"customer-zeta-holdings", b"invoice-acme-corp-4471.pdf", b"payroll-march-ofelia.xlsx",
           b"contract-borealis-88.docx"]


def test_no_file_or_folder_name_is_stored_in_clear(files_env: dict[str, Any]) -> None:
    """File names are user data: across a full and an incremental backup (names added, changed, removed), no
    stored byte outside the encrypted objects (every object version in the bucket, read raw), no log row and
    no artifact holds one. A restore proves the names were there to leak."""
    import httpx

    src = files_env["src"]
    folder = src / "customer-zeta-holdings"
    folder.mkdir()
    (folder / "invoice-acme-corp-4471.pdf").write_bytes(b"%PDF invoice")
    (folder / "payroll-march-ofelia.xlsx").write_bytes(b"payroll")
    backed_up()
    (folder / "invoice-acme-corp-4471.pdf").write_bytes(b"%PDF invoice, corrected")
    (folder / "contract-borealis-88.docx").write_bytes(b"contract")
    (folder / "payroll-march-ofelia.xlsx").unlink()
    second = backed_up()
    assert (second["changes"]["added"], second["changes"]["changed"], second["changes"]["removed"]) == (1, 1, 1)

    client = files_env["s3"].client()
    versions = client.list_object_versions(Bucket=files_env["bucket"]).get("Versions", [])
    assert len(versions) >= 6  # two backups: archive, index and manifest each
    for v in versions:
        blob = client.get_object(Bucket=files_env["bucket"], Key=v["Key"], VersionId=v["VersionId"])["Body"].read()
        leaked = [name for name in PLANTED if name in blob]
        assert not leaked, f"{v['Key']} holds {leaked} in clear"
    rows = "".join(json.dumps(r, default=str) for r in log_rows(files_env["cluster"], files_env["db"]))
    artifacts = httpx.post(f"{files_env['prefect'].api_url}/artifacts/filter", json={"limit": 200}).json()
    assert any(a.get("key", "") and a["key"].startswith("files-backup-") for a in artifacts)
    shown = json.dumps(artifacts)
    for name in PLANTED:
        assert name.decode() not in rows and name.decode() not in shown, name

    out = files_env["tmp"] / "restored"
    restored(destination=str(out))
    assert sorted(p.name for p in (out / "customer-zeta-holdings").iterdir()) == [
        "contract-borealis-88.docx", "invoice-acme-corp-4471.pdf"]


def test_incremental_run_transfers_only_changes_and_both_backups_restore(files_env: dict[str, Any]) -> None:
    src = files_env["src"]
    first = backed_up()
    first_tree = snapshot(src)
    (src / "dir with spaces" / "a.txt").write_bytes(b"changed content")
    (src / "photos" / "2026" / "new.jpg").write_bytes(b"new photo")
    (src / "empty.txt").unlink()
    second = backed_up()
    assert second["type"] == "incremental"
    assert second["transferred_files"] == 2
    assert second["stored"]["files"] == 2  # the archive holds only what changed
    assert (second["changes"]["added"], second["changes"]["changed"], second["changes"]["removed"]) == (1, 1, 1)
    third = backed_up()
    assert third["transferred_files"] == 0 and third["stored"]["files"] == 0
    # The manifest says where the run's time went, step by step, within its total.
    timings = json.loads(s3_get(files_env["s3"], files_env["bucket"], second["manifest_key"]))["timings"]
    steps = ("start", "sync", "previous", "stream", "verify")
    assert all(timings[k] >= 0 for k in steps) and sum(timings[k] for k in steps) <= timings["total"] + 0.05, timings

    latest = files_env["tmp"] / "latest"
    assert restored(destination=str(latest))["archives_read"] >= 2
    assert snapshot(latest) == {k: v for k, v in snapshot(src).items() if k != b"."}
    old = files_env["tmp"] / "old"
    restored(destination=str(old), backup=first["backup_id"])
    assert snapshot(old) == first_tree


def test_full_archives_when_asked_or_when_due(files_env: dict[str, Any]) -> None:
    backed_up()
    assert backed_up()["type"] == "incremental"
    forced = backed_up(full=True)
    assert forced["type"] == "full" and forced["stored"]["files"] == len(ODD_NAMES) + 7
    files_env["settings"](files_opts="full_every_days = 0")
    assert backed_up()["type"] == "full"


def test_a_broken_chain_makes_the_next_backup_full_and_fails_the_verify_of_one_that_needs_it(
    files_env: dict[str, Any],
) -> None:
    from prefect import flow

    from tasks.verify.file_archive import verify_file_archive

    full = backed_up()
    incremental = backed_up()
    assert incremental["type"] == "incremental"
    _, doc = manifest_doc(files_env, incremental["backup_id"])
    gone = doc["archives"][full["backup_id"]]["key"]
    files_env["s3"].client().delete_object(Bucket=files_env["bucket"], Key=gone)  # a lifecycle rule, a hand

    # The verify of a backup whose chain lost an archive fails, naming it (the check itself, on real storage).
    typed = manifest.parse(json.dumps(doc).encode())
    assert isinstance(typed, manifest.FilesManifest)

    @flow(name="verify-probe")
    def verify_again() -> Any:
        older = {k: v for k, v in typed.archives.items() if k != typed.backup_id}
        return verify_file_archive(typed.backup_id, typed.archive, typed.index, "", older, False)

    exc = error_of(verify_again(return_state=True))
    assert isinstance(exc, VerificationError) and gone in str(exc) and "chain is broken" in str(exc)

    # The next backup does not build on the broken chain: a full archive, verified, that restores alone.
    after = backed_up()
    assert after["type"] == "full" and after["stored"]["files"] == len(ODD_NAMES) + 7
    _, after_doc = manifest_doc(files_env, after["backup_id"])
    assert f"{full['backup_id']} (missing)" in after_doc["reason"] and list(after_doc["archives"]) == [after["backup_id"]]
    out = files_env["tmp"] / "after-break"
    restored(destination=str(out))
    assert snapshot(out) == {k: v for k, v in snapshot(files_env["src"]).items() if k != b"."}


def test_allow_shrink_accepts_an_intended_deletion_once(files_env: dict[str, Any]) -> None:
    src = files_env["src"]
    archive_dir = src / "archive-2019"
    archive_dir.mkdir()
    for i in range(40):
        (archive_dir / f"old-{i}.txt").write_bytes(b"old %d" % i)
    first = backed_up()
    import shutil

    shutil.rmtree(archive_dir)  # most of the files, removed on purpose
    exc = error_of(backup())
    assert isinstance(exc, SourceError) and "allow_shrink" in str(exc)
    accepted = backed_up(allow_shrink=True)
    assert accepted["totals"]["files"] == first["totals"]["files"] - 40 and accepted["changes"]["removed"] >= 40
    again = backed_up()  # the smaller tree is the new normal: no flag needed any more
    assert again["totals"]["files"] == accepted["totals"]["files"]
    (src / "script.sh").unlink()  # and a further small deletion passes as usual
    assert backed_up()["changes"]["removed"] == 1
    out = files_env["tmp"] / "after-shrink"
    restored(destination=str(out))
    assert not (out / "archive-2019").exists() and (out / "photos/2026/small.jpg").is_file()


def test_zstd_archives_round_trip(files_env: dict[str, Any]) -> None:
    files_env["settings"](files_opts='compression = "zstd"\n')
    before = snapshot(files_env["src"])
    summary = backed_up()
    _, doc = manifest_doc(files_env, summary["backup_id"])
    assert doc["archive"]["compression"]["codec"] == "zstd" and doc["archive"]["key"].endswith(".tar.zst.enc")
    assert doc["archive"]["size_compressed"] < doc["archive"]["size_plain"]
    out = files_env["tmp"] / "zstd"
    assert restored(destination=str(out))["md5_checked"] == summary["totals"]["files"]
    assert snapshot(out) == before


def test_restore_of_one_folder(files_env: dict[str, Any]) -> None:
    backed_up()
    out = files_env["tmp"] / "one-folder"
    result = restored(destination=str(out), path="dir with spaces/sub")
    assert result["files"] == 1
    assert snapshot(out) == {
        b"dir with spaces": snapshot(out)[b"dir with spaces"],  # made to hold the folder
        b"dir with spaces/sub": snapshot(files_env["src"])[b"dir with spaces/sub"],
        b"dir with spaces/sub/deep.txt": snapshot(files_env["src"])[b"dir with spaces/sub/deep.txt"],
    }
    one = files_env["tmp"] / "one-file"
    assert restored(destination=str(one), path="script.sh")["files"] == 1
    assert (one / "script.sh").read_bytes() == (files_env["src"] / "script.sh").read_bytes()
    assert isinstance(error_of(restore(destination=str(files_env["tmp"] / "x"), path="no/such")), ConfigError)


def test_existing_files_are_not_overwritten_without_confirm_and_are_kept(files_env: dict[str, Any]) -> None:
    backed_up()
    out = files_env["tmp"] / "busy"
    out.mkdir()
    (out / "script.sh").write_text("the operator's newer script\n")
    (out / "unrelated.txt").write_text("stays\n")
    exc = error_of(restore(destination=str(out)))
    assert isinstance(exc, ConfigError) and "overwrite 1 existing" in str(exc)
    assert (out / "script.sh").read_text() == "the operator's newer script\n"
    assert sorted(p.name for p in out.iterdir()) == ["script.sh", "unrelated.txt"]
    assert isinstance(error_of(restore(destination=str(out), confirm="/somewhere/else")), ConfigError)

    result = restored(destination=str(out), confirm=str(out))
    assert (out / "script.sh").read_bytes() == (files_env["src"] / "script.sh").read_bytes()
    assert (out / "unrelated.txt").read_text() == "stays\n"
    assert result["kept"] == 1 and Path(result["kept_in"], "script.sh").read_text() == "the operator's newer script\n"


def test_restore_to_a_host_over_ssh_checks_md5_there(files_env: dict[str, Any]) -> None:
    backed_up()
    remote = files_env["tmp"] / "on-host"
    remote.mkdir()
    result = restored(destination=f"files1:{remote}")
    assert result["md5_checked"] == len(ODD_NAMES) + 7
    assert snapshot(remote) == snapshot(files_env["src"])
    (remote / "script.sh").write_text("changed on the host\n")
    exc = error_of(restore(destination=f"files1:{remote}"))
    assert isinstance(exc, ConfigError) and "overwrite" in str(exc)
    restored(destination=f"files1:{remote}", confirm=f"files1:{remote}")
    assert (remote / "script.sh").read_bytes() == (files_env["src"] / "script.sh").read_bytes()
    kept = list(remote.glob(".luxima-pre-restore-*/script.sh"))
    assert [p.read_text() for p in kept] == ["changed on the host\n"]


def test_links_pointing_outside_are_refused_unless_allowed(files_env: dict[str, Any]) -> None:
    os.symlink("/etc/hostname", files_env["src"] / "link-absolute")
    os.symlink("../../outside", files_env["src"] / "photos" / "link-up")
    backed_up()
    out = files_env["tmp"] / "links"
    exc = error_of(restore(destination=str(out)))
    assert isinstance(exc, ConfigError) and "2 symlinks point outside" in str(exc)
    assert not out.exists()
    restored(destination=str(out), allow_escaping_links=True)
    assert os.readlink(out / "link-absolute") == "/etc/hostname"
    assert os.readlink(out / "photos" / "link-up") == "../../outside"


def test_the_ssh_key_can_come_from_vault(files_env: dict[str, Any], vault: dict[str, Any],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import uuid

    import hvac

    path = f"luxima-test/ssh-{uuid.uuid4().hex[:8]}"
    admin = hvac.Client(url=vault["url"], token=vault["token"])
    admin.secrets.kv.v2.create_or_update_secret(path=path, mount_point="secret",
                                                secret={"private_key": files_env["sshd"].client_key.read_text()})
    monkeypatch.setenv("LUXIMA_TEST_VAULT_TOKEN", vault["token"])
    files_env["settings"](host_key=f"vault:secret/{path}#private_key", keys=file_keys(files_env["key_file"]) + f"""
        [keys.vault]
        address = "{vault['url']}"
        token = "env:LUXIMA_TEST_VAULT_TOKEN"
    """)
    assert backed_up()["totals"]["files"] == len(ODD_NAMES) + 7
    assert [p for p in (files_env["tmp"] / "work").iterdir() if p.name.startswith("ssh-")] == []  # the key file is gone


# -- refusals --

def test_unknown_host_key_is_refused_and_nothing_is_stored(files_env: dict[str, Any]) -> None:
    files_env["known"].write_text("")
    exc = error_of(backup())
    assert isinstance(exc, ConfigError) and "never accepted" in str(exc)
    assert s3_keys(files_env["s3"], files_env["bucket"]) == []
    assert files_env["known"].read_text() == ""
    rows = [r for r in log_rows(files_env["cluster"], files_env["db"]) if r["component"] == "files"]
    assert [r["status"] for r in rows] == ["failed"]


def test_vanished_or_emptied_source_fails_and_the_mirror_keeps_its_files(files_env: dict[str, Any]) -> None:
    src = files_env["src"]
    first = backed_up()
    keys = s3_keys(files_env["s3"], files_env["bucket"])
    hidden = files_env["tmp"] / "hidden"
    src.rename(hidden)
    exc = error_of(backup())
    assert isinstance(exc, SourceError) and "does not exist" in str(exc)

    hidden.rename(src)
    for path in sorted(src.rglob("*"), reverse=True):
        if path.is_file() or path.is_symlink():
            path.unlink()
    exc = error_of(backup())
    assert isinstance(exc, SourceError) and "lost more files than allowed" in str(exc)
    assert s3_keys(files_env["s3"], files_env["bucket"]) == keys  # no new backup, nothing removed
    mirror = files_env["tmp"] / "work" / "files-mirror" / "userfiles"
    entries = sum(first["totals"][k] for k in ("files", "dirs", "symlinks"))
    assert len(list(mirror.rglob("*"))) >= entries - entries // 2  # rsync stopped at max_shrink_percent (50)

    exc = error_of(backup(allow_shrink=True))  # still: an empty source is below min_files
    assert isinstance(exc, SourceError) and "fewer than its min_files" in str(exc)


def test_a_source_host_that_goes_silent_mid_transfer_is_stopped_at_the_stage_limit(files_env: dict[str, Any]) -> None:
    """rsync over SSH to a host that stops answering (no reset: a cut link) would wait on ssh's keepalives; the
    mirror stage is stopped at files_backup.stage_timeout_seconds, its rsync and ssh killed, nothing stored."""
    from luxima_backup import procs
    from tests.fault_proxy import StallProxy

    (files_env["src"] / "media").mkdir(exist_ok=True)
    (files_env["src"] / "media/video.bin").write_bytes(os.urandom(4 * 1024 * 1024))
    proxy = StallProxy(files_env["sshd"].port, stall_after=512 * 1024)
    sshd_port = files_env["sshd"].port
    files_env["known"].write_text(files_env["sshd"].known_hosts_line.replace(f"]:{sshd_port} ", f"]:{proxy.port} "))
    settings = files_env["settings"](files_opts="stage_timeout_seconds = 4\n")
    settings.write_text(settings.read_text().replace(f"port = {sshd_port}", f"port = {proxy.port}"))
    try:
        state = backup()
        assert proxy.stalled.is_set()  # the host went silent mid-transfer
    finally:
        proxy.close()
    exc = error_of(state)
    assert "mirror of userfiles ran past its limit of 4 s" in str(exc), str(exc)
    assert "files_backup.stage_timeout_seconds" in str(exc)
    assert procs.live() == []  # rsync and its ssh were stopped, not left waiting
    assert s3_keys(files_env["s3"], files_env["bucket"]) == []
    rows = [r for r in log_rows(files_env["cluster"], files_env["db"]) if r["component"] == "files"]
    assert [r["status"] for r in rows] == ["failed"] and "stage_timeout_seconds" in rows[0]["error"]


def _rewrite_encrypted(env: dict[str, Any], key: str, plain: bytes, info: str, doc: dict[str, Any]) -> tuple[int, str]:
    """Replace a stored object of backup ``doc`` by ``plain`` compressed and encrypted under the backup's own key file,
    as the backup would have written it (bound to it): what a faulty writer holding the keys could leave."""
    import hashlib

    provider = KeyFileProvider(env["key_file"])
    dk = provider.new_data_key()
    bound = manifest.binding(doc["backup_id"], "files", doc["source"]["name"], key)
    blob = encrypt_bytes(gzip.compress(plain), dk.plaintext, dk.wrapped, 1 << 20, {"content": info, **bound})
    env["s3"].client().put_object(Bucket=env["bucket"], Key=key, Body=blob)
    return len(blob), hashlib.sha256(blob).hexdigest()


def _read_encrypted(env: dict[str, Any], key: str) -> bytes:
    blob = s3_get(env["s3"], env["bucket"], key)
    return gzip.decompress(DecryptingReader(io.BytesIO(blob), KeyFileProvider(env["key_file"]).unwrap).read())  # type: ignore[arg-type]


def _save_manifest(env: dict[str, Any], key: str, doc: dict[str, Any]) -> None:
    env["s3"].client().put_object(Bucket=env["bucket"], Key=key, Body=signed_manifest(key, doc))


def test_tampered_archive_is_refused_and_nothing_is_restored(files_env: dict[str, Any]) -> None:
    summary = backed_up()
    blob = bytearray(s3_get(files_env["s3"], files_env["bucket"], summary["object_key"]))
    blob[len(blob) // 2] ^= 0x01
    files_env["s3"].client().put_object(Bucket=files_env["bucket"], Key=summary["object_key"], Body=bytes(blob))
    out = files_env["tmp"] / "tampered"
    exc = error_of(restore(destination=str(out)))
    assert isinstance(exc, IntegrityError)
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if ".restoring-" in p.name] == []


def test_an_archive_of_an_older_backup_put_in_place_of_the_newest_is_refused(files_env: dict[str, Any]) -> None:
    """The archive is streamed from storage (no spool, no sha256 first): its header's binding refuses it at once."""
    older = backed_up()
    newer = backed_up(full=True)
    client = files_env["s3"].client()
    client.put_object(Bucket=files_env["bucket"], Key=newer["object_key"],
                      Body=s3_get(files_env["s3"], files_env["bucket"], older["object_key"]))
    out = files_env["tmp"] / "swapped"
    exc = error_of(restore(destination=str(out)))
    assert isinstance(exc, IntegrityError) and "is not the object its manifest names" in str(exc), exc
    assert older["backup_id"] in str(exc) and not out.exists()


def test_path_traversal_archive_is_refused(files_env: dict[str, Any]) -> None:
    summary = backed_up()
    key, doc = manifest_doc(files_env, summary["backup_id"])
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("../../evil.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    size, digest = _rewrite_encrypted(files_env, summary["object_key"], evil.getvalue(), "tar archive of files", doc)
    doc["archives"][summary["backup_id"]].update(size_encrypted=size, sha256_encrypted=digest)
    _save_manifest(files_env, key, doc)
    out = files_env["tmp"] / "a" / "b" / "traversal"
    exc = error_of(restore(destination=str(out)))
    assert isinstance(exc, IntegrityError) and "refused" in str(exc)
    assert not (files_env["tmp"] / "evil.txt").exists() and not (files_env["tmp"] / "a" / "evil.txt").exists()
    assert not out.exists()

    # an index naming a path outside the destination is refused as well
    index = _read_encrypted(files_env, doc["index"]["key"]).replace(b'"path":"script.sh"', b'"path":"../script.sh"')
    size, digest = _rewrite_encrypted(files_env, doc["index"]["key"], index, "file index", doc)
    doc["index"].update(size_encrypted=size, sha256_encrypted=digest)
    _save_manifest(files_env, key, doc)
    exc = error_of(restore(destination=str(out)))
    assert isinstance(exc, IntegrityError) and "unsafe path" in str(exc)


def test_md5_mismatch_fails_the_restore_and_is_listed(files_env: dict[str, Any]) -> None:
    summary = backed_up()
    key, doc = manifest_doc(files_env, summary["backup_id"])
    lines = _read_encrypted(files_env, doc["index"]["key"]).split(b"\n")
    wrong = []
    for i, line in enumerate(lines):
        if b'"path":"script.sh"' in line:
            rec = json.loads(line)
            rec["md5"] = "0" * 32
            lines[i] = json.dumps(rec, separators=(",", ":"), sort_keys=True).encode()
            wrong.append(rec["path"])
    size, digest = _rewrite_encrypted(files_env, doc["index"]["key"], b"\n".join(lines), "file index", doc)
    doc["index"].update(size_encrypted=size, sha256_encrypted=digest)
    _save_manifest(files_env, key, doc)
    out = files_env["tmp"] / "mismatch"
    state = restore(destination=str(out))
    exc = error_of(state)
    assert isinstance(exc, VerificationError) and "1 files" in str(exc)
    assert not out.exists()
    run_id = str(state.state_details.flow_run_id)
    artifacts = httpx.post(f"{files_env['prefect'].api_url}/artifacts/filter",
                           json={"artifacts": {"flow_run_id": {"any_": [run_id]}}, "limit": 10, "offset": 0}).json()
    table = next(a for a in artifacts if a["type"] == "table")
    rows = json.loads(table["data"]) if isinstance(table["data"], str) else table["data"]
    assert [r["path"] for r in rows] == wrong == ["script.sh"]
    logged = [r for r in log_rows(files_env["cluster"], files_env["db"]) if r["kind"] == "restore"]
    assert logged[-1]["status"] == "failed" and logged[-1]["details"]["mismatches"][0]["path"] == "script.sh"


def test_a_direct_local_source_is_archived_in_place_without_a_staging_copy(files_env: dict[str, Any]) -> None:
    """direct = true: the local directory is archived as it is (no mirror is filled), incrementals store only what
    changed, both backups restore exactly, and a source gone or emptied fails before any manifest is written."""
    src = files_env["src"]
    files_env["settings"](kind="local", extra="direct = true\n")
    first = backed_up()
    assert first["totals"]["files"] == len(ODD_NAMES) + 7 and first["stored"]["files"] == first["totals"]["files"]
    from luxima_backup import runtime
    from tasks.sync import mirror_path

    assert not mirror_path(runtime.settings(), "userfiles").exists()  # nothing was copied
    first_tree = snapshot(src)
    (src / "dir with spaces" / "a.txt").write_bytes(b"changed content")
    (src / "photos" / "2026" / "new.jpg").write_bytes(b"new photo")
    (src / "empty.txt").unlink()
    second = backed_up()
    assert second["type"] == "incremental" and second["stored"]["files"] == 2 and second["transferred_files"] == 2
    assert (second["changes"]["added"], second["changes"]["changed"], second["changes"]["removed"]) == (1, 1, 1)
    latest = files_env["tmp"] / "latest"
    restored(destination=str(latest))
    assert snapshot(latest) == {k: v for k, v in snapshot(src).items() if k != b"."}
    old = files_env["tmp"] / "old"
    restored(destination=str(old), backup=first["backup_id"])
    assert snapshot(old) == first_tree

    manifests = [k for k in s3_keys(files_env["s3"], files_env["bucket"]) if k.endswith(".manifest.json")]
    files_env["settings"](kind="local", extra="direct = true\n", path=files_env["tmp"] / "unmounted")
    assert isinstance(error_of(backup()), SourceError)
    emptied = files_env["tmp"] / "emptied"
    emptied.mkdir()
    (emptied / "left.txt").write_bytes(b"one file left")
    files_env["settings"](kind="local", extra="direct = true\n", path=emptied)
    exc = error_of(backup())
    assert isinstance(exc, SourceError) and "are gone" in str(exc)
    assert [k for k in s3_keys(files_env["s3"], files_env["bucket"]) if k.endswith(".manifest.json")] == manifests


def test_direct_needs_a_local_source_without_exclude_patterns() -> None:
    from luxima_backup.settings import FileSource

    with pytest.raises(ValueError, match="exclude needs the staging mirror"):
        FileSource(kind="local", path="/srv/files", direct=True, exclude=["*.tmp"])
    with pytest.raises(ValueError, match="local sources only"):
        FileSource(kind="ssh", host="h", path="/srv/files", direct=True)


def test_a_file_that_shrinks_or_grows_while_it_is_read_is_stored_as_read_and_flagged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A source in use: another writer cuts one file short and extends another after their reads began (the hook
    below is that writer, acting on the real files at the first read of each). The archive stays a valid tar
    whose index describes exactly what it holds, both files are named, and neither can look unchanged to the
    next run."""
    from luxima_backup import filetree
    from tasks.archive import archive_tree

    root = tmp_path / "in-use"
    root.mkdir()
    (root / "a-log.txt").write_bytes(b"x" * 300_000)
    (root / "b-growing.txt").write_bytes(b"y" * 1000)
    (root / "c-steady.txt").write_bytes(b"z" * 1000)
    acted: set[str] = set()
    original = filetree._PaddedReader.read

    def read(self: Any, n: int = -1) -> bytes:
        path = os.readlink(f"/proc/self/fd/{self._src.fileno()}")
        name = os.path.basename(path)
        if name not in acted:
            acted.add(name)
            if name == "a-log.txt":
                os.truncate(path, 1000)
            elif name == "b-growing.txt":
                with open(path, "ab") as f:
                    f.write(b"more")
        return original(self, n)

    monkeypatch.setattr(filetree._PaddedReader, "read", read)

    class Index:
        def __init__(self) -> None:
            self.lines: list[bytes] = []

        def add(self, entry: Any) -> None:
            self.lines.append(filetree.index_line(entry))

    sink, index = io.BytesIO(), Index()
    result = archive_tree(root, sink, index, "files-x-1", None, full=True, live=True)
    assert result["changed_while_read"]["count"] == 2
    assert result["changed_while_read"]["files"] == ["a-log.txt: shrank while it was read: padded with 299000 zero bytes",
                                                      "b-growing.txt: changed while it was read"]
    entries = {e.name: e for e in filetree.read_index(io.BytesIO(b"".join(index.lines)))}
    with tarfile.open(fileobj=io.BytesIO(sink.getvalue()), mode="r|") as tar:
        for member in tar:
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            e = entries[member.name]
            assert len(data) == e.size and hashlib.sha256(data).hexdigest() == e.sha256
    assert entries["a-log.txt"].size == 300_000 and entries["a-log.txt"].mtime_ns == 0
    assert entries["b-growing.txt"].size == 1000 and entries["b-growing.txt"].mtime_ns == 0
    assert entries["c-steady.txt"].mtime_ns == (root / "c-steady.txt").stat().st_mtime_ns


def test_md5_check_reads_restored_files_back(tmp_path: Path) -> None:
    """The after-restore check itself: a file altered on disk after it was written is reported."""
    from luxima_backup.filetree import FILE, Entry
    from luxima_backup.filetree import md5_check

    (tmp_path / "a").write_bytes(b"right")
    (tmp_path / "b").write_bytes(b"right")
    import hashlib

    good = hashlib.md5(b"right").hexdigest()
    entries = [Entry(path=b"a", type=FILE, mode=0o644, mtime_ns=0, size=5, md5=good),
               Entry(path=b"b", type=FILE, mode=0o644, mtime_ns=0, size=5, md5=good),
               Entry(path=b"c", type=FILE, mode=0o644, mtime_ns=0, size=5, md5=good)]
    (tmp_path / "b").write_bytes(b"wrong")
    checked, bad = md5_check(entries, tmp_path)
    assert checked == 2 and [m["path"] for m in bad] == ["b", "c"]


# -- other sources --

def test_local_and_bucket_sources(files_env: dict[str, Any], s3_server: Any) -> None:
    files_env["settings"](kind="local")
    assert backed_up()["totals"]["files"] == len(ODD_NAMES) + 7

    source_bucket = files_env["bucket"] + "-src"
    s3_server.create_bucket(source_bucket)
    client = s3_server.client()
    client.put_object(Bucket=source_bucket, Key="avatars/u1/me.png", Body=MARKER + b" avatar")
    client.put_object(Bucket=source_bucket, Key="avatars/u2/with space.png", Body=b"x" * 1000)
    client.put_object(Bucket=source_bucket, Key="other/ignored.txt", Body=b"not under the prefix")
    files_env["settings"](kind="local", extra=f"""
        [files_backup.sources.storage]
        kind = "s3"
        bucket = "{source_bucket}"
        path = "avatars/"
        endpoint_url = "{s3_server.url}"
        access_key_id = "env:LUXIMA_TEST_S3_ACCESS_KEY"
        secret_access_key = "env:LUXIMA_TEST_S3_SECRET_KEY"
    """)
    from flows.files_backup import files_backup

    result = files_backup(sources=["storage"])["storage"]
    assert result["totals"]["files"] == 2 and result["transferred_files"] == 2
    out = files_env["tmp"] / "bucket-restore"
    restored(destination=str(out), source="storage")
    assert (out / "u1" / "me.png").read_bytes() == MARKER + b" avatar"
    assert (out / "u2" / "with space.png").read_bytes() == b"x" * 1000
    again = files_backup(sources=["storage"])["storage"]
    assert again["transferred_files"] == 0 and again["type"] == "incremental"

    # back into the bucket, under another prefix; existing objects only with confirm, and kept aside
    into = f"s3://{source_bucket}/restored/"
    assert restored(destination=into, source="storage")["md5_checked"] == 2
    assert s3_get(s3_server, source_bucket, "restored/u1/me.png") == MARKER + b" avatar"
    client.put_object(Bucket=source_bucket, Key="restored/u1/me.png", Body=b"edited since")
    exc = error_of(restore(destination=into, source="storage"))
    assert isinstance(exc, ConfigError) and "overwrite 2 existing" in str(exc)
    assert s3_get(s3_server, source_bucket, "restored/u1/me.png") == b"edited since"
    result = restored(destination=into, source="storage", confirm=into)
    assert s3_get(s3_server, source_bucket, "restored/u1/me.png") == MARKER + b" avatar"
    assert result["kept"] == 2
    assert s3_get(s3_server, source_bucket, result["kept_in"][len(f"s3://{source_bucket}/"):] + "u1/me.png") == b"edited since"
    assert isinstance(error_of(restore(destination="s3://unknown-bucket/x/", source="storage")), ConfigError)


def test_break_glass_from_the_shell_without_a_prefect_server(files_env: dict[str, Any]) -> None:
    """backup files from the shell, then list, restore files, and decrypt + tar with the key file alone."""
    from tests.conftest import DB_PASSWORD

    root = Path(__file__).resolve().parent.parent
    cli = str(root / ".venv" / "bin" / "luxima-backup")
    config = files_env["settings"](kind="local")
    env = {**os.environ, "PREFECT_API_URL": files_env["prefect"].api_url, "LUXIMA_TEST_DB_PASSWORD": DB_PASSWORD}
    done = subprocess.run([cli, "backup", "files", "--config", str(config)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    backup_id = json.loads(done.stdout)["userfiles"]["backup_id"]

    alone = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "LUXIMA_BACKUP"))}
    alone.update(PREFECT_HOME=str(files_env["tmp"] / "prefect-home"), LUXIMA_BACKUP__LOG__ENABLED="false")
    run = lambda *a: subprocess.run([cli, *a, "--config", str(config)], capture_output=True, text=True, env=alone,  # noqa: E731
                                    timeout=300, cwd=root)
    done = run("list", "--component", "files")
    assert done.returncode == 0 and backup_id in done.stdout and "full" in done.stdout, done.stderr
    out = files_env["tmp"] / "break-glass"
    done = run("restore", "files", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["md5_checked"] == len(ODD_NAMES) + 7
    assert snapshot(out) == snapshot(files_env["src"])
    done = run("restore", "files", str(out))
    assert done.returncode == 2 and "would overwrite" in done.stderr

    # no settings at all: the archive object and the key file, then plain tar
    _, doc = manifest_doc(files_env, backup_id)
    copy = files_env["tmp"] / "copy.tar.gz.enc"
    copy.write_bytes(s3_get(files_env["s3"], files_env["bucket"], doc["archive"]["key"]))
    tar_file = files_env["tmp"] / "copy.tar"
    done = subprocess.run([cli, "decrypt", "--input", str(copy), "--key-file", str(files_env["key_file"]), "--decompress",
                           "-o", str(tar_file)], capture_output=True, text=True, env=alone, timeout=300)
    assert done.returncode == 0, done.stderr
    by_tar = files_env["tmp"] / "by-tar"
    by_tar.mkdir()
    subprocess.run(["tar", "-xpf", str(tar_file), "-C", str(by_tar)], check=True)
    assert (by_tar / "photos" / "2026" / "big.bin").read_bytes() == (files_env["src"] / "photos" / "2026" / "big.bin").read_bytes()
    assert os.readlink(by_tar / "link-relative") == "photos/2026/small.jpg"


def test_an_unreadable_previous_index_makes_a_full_backup_and_runs_do_not_overlap(files_env: dict[str, Any]) -> None:
    first = backed_up()
    _, doc = manifest_doc(files_env, first["backup_id"])
    files_env["s3"].client().delete_object(Bucket=files_env["bucket"], Key=doc["index"]["key"])
    second = backed_up()
    assert second["type"] == "full" and second["stored"]["files"] == first["totals"]["files"]

    import fcntl

    lock = files_env["tmp"] / "work" / "files-mirror" / "userfiles.lock"
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        exc = error_of(backup())
    assert "another backup of userfiles is running" in str(exc)
    assert backed_up()["type"] == "incremental"


def test_the_check_beside_the_upload_compares_the_archive_with_its_index_through_one_digest(tmp_path: Path) -> None:
    """The deep check reads the archive as it uploads and the index only after: one running digest of each, in archive
    order, must agree. It does for a full archive and for an incremental one (which holds only changed files, while
    its index lists every file), with odd names, empty files, folders and links; one altered index entry breaks it."""
    import dataclasses

    from luxima_backup import filetree
    from tasks.archive import archive_tree
    from tasks.verify.file_archive import listing_of_archive, listing_of_index

    root = tmp_path / "src"
    (root / "sub dir" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"alpha" * 1000)
    (root / "empty").write_bytes(b"")
    (root / "sub dir" / "naïve – ünïcode.bin").write_bytes(os.urandom(70_000))
    (root / "sub dir" / "deeper" / "z").write_bytes(b"zed")
    (root / "link").symlink_to("a.txt")

    class Index:
        def __init__(self) -> None:
            self.lines: list[bytes] = []

        def add(self, entry: Any) -> None:
            self.lines.append(filetree.index_line(entry))

        def entries(self) -> list[Any]:
            return list(filetree.read_index(io.BytesIO(b"".join(self.lines))))

    def archived(backup_id: str, previous: list[Any] | None, full: bool) -> tuple[Any, list[Any]]:
        sink, index = io.BytesIO(), Index()
        archive_tree(root, sink, index, backup_id, iter(previous) if previous else None, full=full)
        return listing_of_archive(io.BytesIO(sink.getvalue())), index.entries()

    tarred, entries = archived("files-x-1", None, True)
    indexed = listing_of_index(entries, "files-x-1")
    assert (tarred.files, tarred.hexdigest) == (indexed.files, indexed.hexdigest) and tarred.files == 4

    (root / "sub dir" / "deeper" / "z").write_bytes(b"zed, changed")
    later, entries2 = archived("files-x-2", entries, False)
    assert later.files == 1  # only the changed file is in the incremental archive
    assert (later.files, later.hexdigest) == (listing_of_index(entries2, "files-x-2").files,
                                              listing_of_index(entries2, "files-x-2").hexdigest)

    altered = [dataclasses.replace(e, sha256="0" * 64) if e.name == "a.txt" else e for e in entries]
    assert listing_of_index(altered, "files-x-1").hexdigest != tarred.hexdigest


def test_an_incremental_archive_holds_the_folders_above_what_it_stores_and_the_chain_extracts_with_plain_tar(
        tmp_path: Path) -> None:
    """An unchanged run does not write every folder's header again (a third of its time at 50,000 files): an
    incremental archive holds what changed and the folders above it, and the full archive then the incremental one,
    extracted with plain tar (the break-glass path), give the tree back, folders' modes and times included."""
    from luxima_backup import filetree
    from tasks.archive import archive_tree

    root = tmp_path / "src"
    make_tree(root)
    (root / "untouched" / "deeper").mkdir(parents=True)
    (root / "untouched" / "deeper" / "old.txt").write_bytes(b"old")
    os.chmod(root / "untouched" / "deeper", 0o750)

    def age(*paths: Path, when: int) -> None:  # whole seconds: tar's times keep them exactly
        for path in paths:
            os.utime(path, ns=(when * 10**9, when * 10**9), follow_symlinks=False)

    everything = sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True)  # children before their folder
    age(*everything, when=1_600_000_000)

    def archived(backup_id: str, previous: bytes | None) -> tuple[bytes, bytes]:
        sink, lines = io.BytesIO(), []

        class Index:
            def add(self, entry: Any) -> None:
                lines.append(filetree.index_line(entry))

        archive_tree(root, sink, Index(), backup_id, filetree.read_index(io.BytesIO(previous)) if previous else None,
                     full=previous is None)
        return sink.getvalue(), b"".join(lines)

    full, index = archived("files-x-1", None)
    with open(root / "dir with spaces" / "sub" / "deep.txt", "r+b") as f:  # changed in place: its folder's times stay
        f.write(b"CHANGED")
    (root / "photos" / "new-empty").mkdir()
    (root / "link-new").symlink_to("photos")
    age(root / "dir with spaces" / "sub" / "deep.txt", root / "photos" / "new-empty", root / "link-new", when=1_700_000_000)
    age(root / "photos", when=1_700_000_100)
    incremental, _ = archived("files-x-2", index)

    with tarfile.open(fileobj=io.BytesIO(incremental), mode="r|") as tar:
        names = [m.name for m in tar]
    assert names == ["dir with spaces", "dir with spaces/sub", "dir with spaces/sub/deep.txt", "link-new", "photos",
                     "photos/new-empty"]

    out = tmp_path / "by-tar"
    out.mkdir()
    for archive in (full, incremental):
        subprocess.run(["tar", "-xpf", "-", "-C", str(out)], input=archive, check=True)
    assert snapshot(out) == snapshot(root)
