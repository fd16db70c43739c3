"""The offline recovery key's sealing of data keys (X25519 + HKDF-SHA256 + AES-256-GCM)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from luxima_backup import recovery
from luxima_backup.errors import ConfigError, WrongKeyError


def test_a_generated_key_opens_what_was_sealed_to_its_public_key_and_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "recovery.pem"
    public_text, fp = recovery.generate(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and public_text.startswith("x25519:") and fp.startswith("recovery:")
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        recovery.generate(path)
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")

    data_key = os.urandom(32)
    public = recovery.load_public(public_text)
    wrap = recovery.seal(data_key, public, "backups/db/main/2026/11/30/20261130T030000Z.dump.zst.enc")
    assert wrap.key_id == fp and data_key.hex() not in str(wrap.to_json())
    private = recovery.load_private(path)
    again = recovery.RecoveryWrap.from_json(wrap.to_json())
    assert recovery.open_sealed(again, private, "backups/db/main/2026/11/30/20261130T030000Z.dump.zst.enc") == data_key
    assert recovery.seal(data_key, public, "x").ephemeral != recovery.seal(data_key, public, "x").ephemeral  # fresh each time

    # sealed for another object: refused (a seal copied beside another object does not open it)
    with pytest.raises(WrongKeyError, match="does not open"):
        recovery.open_sealed(wrap, private, "backups/db/main/2026/11/30/20261130T040000Z.dump.zst.enc")
    # another recovery key: named by fingerprint
    other = tmp_path / "other.pem"
    recovery.generate(other)
    with pytest.raises(WrongKeyError, match=f"sealed to recovery key {fp}"):
        recovery.open_sealed(wrap, recovery.load_private(other), "x")
    # damaged
    blob = bytearray(recovery.base64.b64decode(wrap.sealed))
    blob[-1] ^= 1
    damaged = recovery.RecoveryWrap(wrap.key_id, wrap.ephemeral, recovery.base64.b64encode(bytes(blob)).decode())
    with pytest.raises(WrongKeyError):
        recovery.open_sealed(damaged, private, "backups/db/main/2026/11/30/20261130T030000Z.dump.zst.enc")


def test_bad_recovery_keys_are_config_errors(tmp_path: Path) -> None:
    for text in ("", "x25519:", "x25519:abc", "ssh-ed25519 AAAA", "x25519:" + "A" * 44):
        with pytest.raises(ConfigError, match="not an X25519 public key"):
            recovery.load_public(text)
    (tmp_path / "k").write_text("not a key")
    with pytest.raises(ConfigError, match="not a recovery key"):
        recovery.load_private(tmp_path / "k")
    with pytest.raises(ConfigError, match="cannot read"):
        recovery.load_private(tmp_path / "missing")


def test_with_the_recovery_key_alone_the_catalog_trusts_only_manifests_signed_for_it(tmp_path: Path) -> None:
    """Break-glass reads check each manifest's recovery MAC (derived from the offline key), never write the index, and
    refuse manifests altered, planted without it, or signed for another recovery key."""
    from luxima_backup import catalog, manifest
    from luxima_backup.keys import KeyFileProvider, new_master_key
    from luxima_backup.storage import LocalStore

    data = Path(__file__).parent / "data" / "manifests"
    store = LocalStore(tmp_path / "store")
    key_file = tmp_path / "key"
    key_file.write_text(new_master_key())
    key_path = tmp_path / "recovery.pem"
    public, fp = recovery.generate(key_path)
    catalog_key = tmp_path / "catalog-key"
    recovery.write_catalog_key(recovery.load_private(key_path), catalog_key)
    assert stat.S_IMODE(catalog_key.stat().st_mode) == 0o600
    writer = catalog.Catalog(store, "backups", KeyFileProvider(key_file),
                             recovery.RecoveryMac.from_text(catalog_key.read_text(), public))
    good = "backups/db/main/2026/11/29/20261129T203309Z.manifest.json"
    doc = manifest.parse((data / "v1-db.json").read_bytes())
    writer.save(good, doc)
    written = json.loads((tmp_path / 'store' / good).read_bytes())
    assert written["mac"]["provider"] == "file" and written["mac_recovery"]["key_id"] == fp
    assert writer.list_backups("db", "main")[0].backup_id == doc.backup_id  # the usual provider still checks "mac"

    # with the usual provider gone: the recovery key file alone
    index = writer.index_key("db", "main")
    index_before = (tmp_path / 'store' / index).read_bytes()
    glass = catalog.Catalog(store, "backups", recovery.RecoveryProvider(key_path))
    assert glass.resolve("db", "latest", source="main").manifest.backup_id == doc.backup_id

    # planted by someone who can write to the storage and sign "mac" (a stolen Vault token), but not for recovery
    planted = "backups/db/main/2026/11/30/20261130T010000Z.manifest.json"
    later = doc.model_copy(update={"backup_id": "20261130T010000Z-planted"})
    store.save_bytes(planted, catalog.Catalog(store, "backups", KeyFileProvider(key_file)).signed(planted, later))
    # altered after it was written (a field changed, both MACs kept)
    altered = json.loads((tmp_path / 'store' / good).read_bytes())
    altered["dump"]["size_plain"] += 1
    moved = "backups/db/main/2026/11/30/20261130T020000Z.manifest.json"
    store.save_bytes(moved, json.dumps(altered).encode())
    # signed for another recovery key
    other_path = tmp_path / "other.pem"
    other_public, _ = recovery.generate(other_path)
    other = catalog.Catalog(store, "backups", KeyFileProvider(key_file),
                            recovery.RecoveryMac(recovery.catalog_key(recovery.load_private(other_path)),
                                                 recovery.fingerprint(recovery.load_public(other_public))))
    foreign = "backups/db/main/2026/11/30/20261130T030000Z.manifest.json"
    store.save_bytes(foreign, other.signed(foreign, doc.model_copy(update={"backup_id": "20261130T030000Z-foreign"})))

    glass = catalog.Catalog(store, "backups", recovery.RecoveryProvider(key_path))
    glass.refresh("db", "main")
    found = {getattr(b, "manifest_key", None): b for b in glass.iter_backups("db", "main")}
    assert isinstance(found[good], catalog.Backup)
    assert "has no recovery MAC" in str(found[planted]) and "not authentic" in str(found[moved])
    assert "under recovery key" in str(found[foreign])
    assert glass.resolve("db", "latest", source="main").backup_id == doc.backup_id  # never the planted ones
    assert (tmp_path / 'store' / index).read_bytes() == index_before  # nothing written in break-glass mode
    with pytest.raises(ConfigError, match="only read"):
        glass.save(planted, later)


@pytest.mark.slow
def test_a_backup_under_vault_transit_is_opened_by_the_recovery_key_alone(
    prefect_server: Any, pg_cluster: Any, s3_server: Any, database: str, bucket: str, write_settings: Any,
    vault: dict[str, Any], monkeypatch: pytest.MonkeyPatch, source: dict[str, int], tmp_path: Path,
) -> None:
    """Vault gone entirely: a copy of the object and the offline key file, no settings, no Vault address."""
    import hashlib
    import subprocess
    import sys

    from tests.conftest import transit_with_recovery_key
    from tests.helpers import run_backup, s3_get

    keys_toml, key_path, fp = transit_with_recovery_key(vault, monkeypatch, tmp_path)
    write_settings(database, bucket, keys_toml)
    state = run_backup(deep_verify=False)
    assert state.is_completed(), state.message
    doc = json.loads(s3_get(s3_server, bucket, state.result()["manifest_key"]))
    assert doc["dump"]["encryption"]["provider"] == "vault-transit" and doc["dump"]["encryption"]["recovery_key_id"] == fp

    copy = tmp_path / "dump.enc"
    copy.write_bytes(s3_get(s3_server, bucket, doc["dump"]["key"]))
    cli = str(Path(sys.executable).parent / "luxima-backup")
    alone = {k: v for k, v in os.environ.items() if not k.startswith(("LUXIMA", "VAULT", "PREFECT_API"))}
    alone["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    out = subprocess.run([cli, "decrypt", "--input", str(copy), "--recovery-key", str(key_path), "--decompress", "-o", "-"],
                         capture_output=True, env=alone, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert hashlib.sha256(out.stdout).hexdigest() == doc["dump"]["sha256_plain"] and out.stdout.startswith(b"PGDMP")

    # the globals too (sealed the same way), and another recovery key is refused by name
    globals_copy = tmp_path / "globals.enc"
    globals_copy.write_bytes(s3_get(s3_server, bucket, doc["globals"]["key"]))
    out = subprocess.run([cli, "decrypt", "--input", str(globals_copy), "--recovery-key", str(key_path), "--decompress",
                          "-o", "-"], capture_output=True, env=alone, timeout=300)
    assert out.returncode == 0 and b"CREATE ROLE" in out.stdout
    other = tmp_path / "other.pem"
    recovery.generate(other)
    out = subprocess.run([cli, "decrypt", "--input", str(copy), "--recovery-key", str(other), "-o", str(tmp_path / "x")],
                         capture_output=True, text=True, env=alone, timeout=300)
    assert out.returncode == 1 and f"sealed to recovery key {fp}" in out.stderr and not (tmp_path / "x").exists()

    # the whole restore, Vault gone: its address answers nothing; the catalog is checked with the recovery key
    from tests.helpers import cli_env

    dead = write_settings(database, bucket, keys_toml.replace(vault["url"], "http://127.0.0.1:9"))
    env = cli_env(prefect_server, dead)
    restored = f"{database}_glass"
    done = subprocess.run([cli, "restore", "db", "--target-database", restored, "--recovery-key", str(key_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["backup_id"] == doc["backup_id"]
    with pg_cluster.connect(restored) as conn:
        assert conn.execute("SELECT count(*) FROM app.users").fetchone()[0] == source["app.users"]
    # without the recovery key the same settings cannot read a thing: that is what the key is for
    done = subprocess.run([cli, "restore", "db", "--target-database", f"{restored}2"], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode != 0 and "cannot reach Vault" in done.stderr


@pytest.mark.slow
def test_older_backups_get_seals_in_their_manifests_and_status_counts_those_without(
    prefect_server: Any, pg_cluster: Any, s3_server: Any, database: str, bucket: str, write_settings: Any,
    key_file: Path, source: dict[str, int], tmp_path: Path,
) -> None:
    import hashlib

    from typer.testing import CliRunner

    from app.cli import app
    from tests.conftest import file_keys
    from tests.helpers import run_backup, s3_get

    write_settings(database, bucket, file_keys(key_file))
    state = run_backup(deep_verify=False)  # made before any recovery key existed
    assert state.is_completed(), state.message
    manifest_key = state.result()["manifest_key"]
    doc = json.loads(s3_get(s3_server, bucket, manifest_key))
    assert doc["recovery_key_id"] is None

    key_path = tmp_path / "recovery.pem"
    public, fp = recovery.generate(key_path)
    catalog_key = tmp_path / "recovery.catalog-key"
    recovery.write_catalog_key(recovery.load_private(key_path), catalog_key)
    config = write_settings(database, bucket, file_keys(key_file).replace(
        "allow_key_file = true", f'allow_key_file = true\nrecovery_public_key = "{public}"\n'
                                 f'recovery_catalog_key = "file:{catalog_key}"'))
    cli = CliRunner()
    report = json.loads(cli.invoke(app, ["status", "--json", "--config", str(config)]).stdout)
    assert next(t for t in report if t["component"] == "db")["without_recovery"] == 1
    copy = tmp_path / doc["dump"]["key"].rsplit("/", 1)[-1]
    copy.write_bytes(s3_get(s3_server, bucket, doc["dump"]["key"]))
    refused = cli.invoke(app, ["decrypt", doc["dump"]["key"], "--recovery-key", str(key_path), "-o", str(tmp_path / "x"),
                               "--config", str(config)])
    assert refused.exit_code == 1 and "keys rewrap" in refused.output

    dry = cli.invoke(app, ["keys", "rewrap", "--config", str(config)])
    assert dry.exit_code == 0 and "would seal" in dry.stdout and "2 object(s)" in dry.stdout  # the dump and the globals
    assert json.loads(s3_get(s3_server, bucket, manifest_key))["recovery_seals"] == {}
    done = cli.invoke(app, ["keys", "rewrap", "--confirm", "--config", str(config)])
    assert done.exit_code == 0 and "sealed" in done.stdout
    sealed = json.loads(s3_get(s3_server, bucket, manifest_key))
    assert sealed["recovery_key_id"] == fp and set(sealed["recovery_seals"]) == {doc["dump"]["key"], doc["globals"]["key"]}
    assert sealed["dump"]["sha256_encrypted"] == doc["dump"]["sha256_encrypted"]  # nothing re-encrypted
    report = json.loads(cli.invoke(app, ["status", "--json", "--config", str(config)]).stdout)
    assert next(t for t in report if t["component"] == "db")["without_recovery"] == 0
    again = cli.invoke(app, ["keys", "rewrap", "--confirm", "--config", str(config)])
    assert "sealed already" in again.stdout

    # opened with the recovery key alone: the stored object (its manifest beside it), or a copy with its manifest
    out = tmp_path / "dump"
    done = cli.invoke(app, ["decrypt", doc["dump"]["key"], "--recovery-key", str(key_path), "--decompress", "-o", str(out),
                            "--config", str(config)])
    assert done.exit_code == 0, done.output
    assert hashlib.sha256(out.read_bytes()).hexdigest() == doc["dump"]["sha256_plain"]
    manifest_copy = tmp_path / "manifest.json"
    manifest_copy.write_bytes(s3_get(s3_server, bucket, manifest_key))
    out2 = tmp_path / "dump2"
    done = cli.invoke(app, ["decrypt", "--input", str(copy), "--manifest", str(manifest_copy), "--recovery-key",
                            str(key_path), "--decompress", "-o", str(out2)])
    assert done.exit_code == 0, done.output
    assert out2.read_bytes() == out.read_bytes()
