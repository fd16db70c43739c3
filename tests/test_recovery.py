"""The offline recovery key's sealing of data keys (X25519 + HKDF-SHA256 + AES-256-GCM)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

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
