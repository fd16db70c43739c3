"""Key providers: where the key-encryption key lives, and how a backup's data key is wrapped.

Contract, for every provider:
  ``new_data_key()``  a fresh random 256-bit data key and its wrapped form for the header;
  ``unwrap(wrapped)`` the data key back, or ``WrongKeyError`` when this provider's key is not
                      the one that wrapped it (never garbage), ``KeyProviderError`` otherwise,
                      transient when the provider is unavailable.
  ``sign(message)``  a MAC (HMAC-SHA256) of a catalog document, as a small dict naming the key
                      it was made with;
  ``verify(items)``   for each (message, mac): ``None`` when it is authentic, else why not; raises
                      ``KeyProviderError`` (transient) only when the provider cannot answer.
Rotation: the header records which key (and version) wrapped the data key, so new backups use
the current key and old ones stay readable as long as the old key (version) is kept; a MAC names
its key the same way.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import vault
from .envelope import KEY_SIZE, WrappedKey
from .errors import ConfigError, KeyProviderError, WrongKeyError
from .settings import KeySettings, VaultSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataKey:
    plaintext: bytes
    wrapped: WrappedKey

    def __repr__(self) -> str:  # never print key material
        return f"DataKey(wrapped={self.wrapped.key_id!r})"


class KeyProvider(Protocol):
    name: str
    # which field of a catalog document holds the MAC this provider checks ("mac"; the recovery key: "mac_recovery")
    mac_field: str

    def new_data_key(self) -> DataKey: ...

    def unwrap(self, wrapped: WrappedKey) -> bytes: ...

    def sign(self, message: bytes) -> dict[str, Any]: ...

    def verify(self, items: Sequence[tuple[bytes, dict[str, Any]]]) -> list[str | None]: ...


MAC_ALG = "hmac-sha256"
_VERIFY_BATCH = 256  # Transit verify items per request: one round trip per batch when a catalog is rebuilt


def _mac_problem(provider: str, mac: Any) -> str | None:
    """Why ``mac`` cannot be checked by ``provider`` at all, before any key is touched."""
    if not isinstance(mac, dict) or not isinstance(mac.get("value"), str) or not isinstance(mac.get("key_id"), str):
        return "its MAC is malformed"
    if mac.get("alg") != MAC_ALG:
        return f"its MAC algorithm {mac.get('alg')!r} is not {MAC_ALG}"
    if mac.get("provider") != provider:
        return (f"it was signed by the {mac.get('provider')!r} key provider ({mac.get('key_id')}), "
                f"but the configured provider is {provider!r}")
    return None


class VaultTransitProvider:
    """Data keys generated and wrapped by Vault Transit; the key-encryption key never leaves Vault."""

    name = "vault-transit"
    mac_field = "mac"

    def __init__(self, cfg: VaultSettings):
        self.cfg = cfg
        self.key_id = f"{cfg.transit_mount}/keys/{cfg.transit_key}"

    def new_data_key(self) -> DataKey:
        with vault.translate_errors(f"generating a data key with Transit key {self.key_id}"):
            resp = vault.client(self.cfg).secrets.transit.generate_data_key(
                name=self.cfg.transit_key, key_type="plaintext", bits=256, mount_point=self.cfg.transit_mount
            )
        data = resp["data"]
        plaintext = base64.b64decode(data["plaintext"])
        if len(plaintext) != KEY_SIZE:
            raise KeyProviderError("Vault returned a data key of the wrong size")
        version = data.get("key_version") or _version_of(data["ciphertext"])
        return DataKey(plaintext, WrappedKey(self.name, self.key_id, data["ciphertext"], version))

    def unwrap(self, wrapped: WrappedKey) -> bytes:
        _check_provider(self.name, wrapped)
        mount, _, key = wrapped.key_id.partition("/keys/")
        version = wrapped.key_version or _version_of(wrapped.wrapped)
        if version is not None:
            version = max(version, 1)  # Vault reads a "vault:v0:" ciphertext as version 1
        which = f"version {version}" if version else "the version"
        refusals = {
            # The header names a version the key does not have: not the key that wrapped it.
            "version is too new": lambda text: WrongKeyError(
                f"Vault's Transit key {wrapped.key_id} has no {which}, which wrapped this backup's data key ({text})",
                hint="the key was deleted and created again, or keys.vault.address is not the Vault (or is an older "
                     "snapshot of the Vault) that made this backup: restore the key from a Transit backup, or point "
                     "keys.vault at that Vault",
            ),
            "disallowed by policy (too old)": lambda text: KeyProviderError(
                f"{which} of Transit key {wrapped.key_id}, which wrapped this backup's data key, is retired: "
                f"it is below the key's min_decryption_version ({text})",
                hint=f"to read this backup, lower it: vault write {mount}/keys/{key}/config "
                     f"min_decryption_version={version or '<the backup key version>'}",
            ),
        }
        with vault.translate_errors(f"unwrapping the data key with Transit key {wrapped.key_id}", refusals):
            resp = vault.client(self.cfg).secrets.transit.decrypt_data(
                name=key, ciphertext=wrapped.wrapped, mount_point=mount
            )
        return _checked(base64.b64decode(resp["data"]["plaintext"]))

    def sign(self, message: bytes) -> dict[str, Any]:
        """Transit's HMAC of ``message`` under the key's latest version (``vault:vN:...``): the key never leaves Vault."""
        with vault.translate_errors(f"making an HMAC with Transit key {self.key_id}"):
            resp = vault.client(self.cfg).secrets.transit.generate_hmac(
                name=self.cfg.transit_key, hash_input=base64.b64encode(message).decode(), algorithm="sha2-256",
                mount_point=self.cfg.transit_mount)
        return {"alg": MAC_ALG, "provider": self.name, "key_id": self.key_id, "value": resp["data"]["hmac"]}

    def verify(self, items: Sequence[tuple[bytes, dict[str, Any]]]) -> list[str | None]:
        out: list[str | None] = [_mac_problem(self.name, mac) for _, mac in items]
        todo: dict[str, list[int]] = {}  # by the key each MAC names (a rotated-away mount or key still verifies)
        for i, (_, mac) in enumerate(items):
            if out[i] is None:
                todo.setdefault(mac["key_id"], []).append(i)
        for key_id, indexes in todo.items():
            mount, sep, key = key_id.partition("/keys/")
            if not sep:
                for i in indexes:
                    out[i] = f"its MAC names {key_id!r}, not a Transit key (MOUNT/keys/NAME)"
                continue
            for start in range(0, len(indexes), _VERIFY_BATCH):
                part = indexes[start:start + _VERIFY_BATCH]
                batch = [{"input": base64.b64encode(items[i][0]).decode(), "hmac": items[i][1]["value"]} for i in part]
                with vault.translate_errors(f"verifying HMACs with Transit key {key_id}"):
                    resp = vault.client(self.cfg).adapter.post(
                        f"/v1/{mount}/verify/{key}", json={"batch_input": batch, "hash_algorithm": "sha2-256"})
                results = (resp.get("data") or {}).get("batch_results") or [] if isinstance(resp, dict) else []
                if len(results) != len(part):
                    raise KeyProviderError(f"Vault answered {len(results)} results for {len(part)} HMACs to verify")
                for i, result in zip(part, results):
                    if result.get("error"):
                        out[i] = f"Vault could not verify its MAC with {key_id}: {result['error']}"
                    elif not result.get("valid"):
                        out[i] = f"its MAC does not match (Transit key {key_id}): it was altered after it was written"
        return out


def _version_of(ciphertext: str) -> int | None:
    # Transit ciphertext is "vault:v<N>:<base64>".
    parts = ciphertext.split(":")
    return int(parts[1][1:]) if len(parts) == 3 and parts[1].startswith("v") and parts[1][1:].isdigit() else None


class _LocalWrap:
    """Wraps data keys locally with AES-256-GCM under a master key; the key id goes in the AAD."""

    name: str

    def _wrap(self, master: bytes, key_id: str, version: int | None) -> DataKey:
        dek = os.urandom(KEY_SIZE)
        nonce = os.urandom(12)
        sealed = AESGCM(master).encrypt(nonce, dek, _wrap_aad(key_id))
        return DataKey(dek, WrappedKey(self.name, key_id, base64.b64encode(nonce + sealed).decode(), version))

    def _mac(self, master: bytes, key_id: str, version: int | None, message: bytes) -> dict[str, Any]:
        mac = {"alg": MAC_ALG, "provider": self.name, "key_id": key_id,
               "value": hmac.new(_mac_key(master), message, hashlib.sha256).hexdigest()}
        if version is not None:
            mac["key_version"] = version
        return mac

    def _master_for(self, mac: dict[str, Any]) -> bytes:
        """The master key a MAC names; ``WrongKeyError`` when it is not at hand."""
        raise NotImplementedError

    def verify(self, items: Sequence[tuple[bytes, dict[str, Any]]]) -> list[str | None]:
        out: list[str | None] = []
        for message, mac in items:
            problem = _mac_problem(self.name, mac)
            if problem is None:
                try:
                    master = self._master_for(mac)
                except KeyProviderError as exc:  # WrongKeyError too; a Vault that cannot answer is not a verdict
                    if exc.transient:
                        raise
                    problem = f"{exc} ({exc.hint})" if exc.hint else str(exc)
                else:
                    expected = hmac.new(_mac_key(master), message, hashlib.sha256).hexdigest()
                    if not hmac.compare_digest(expected, str(mac["value"])):
                        problem = f"its MAC does not match (key {mac['key_id']}): it was altered after it was written"
            out.append(problem)
        return out

    @staticmethod
    def _unwrap_with(master: bytes, wrapped: WrappedKey) -> bytes:
        try:
            raw = base64.b64decode(wrapped.wrapped, validate=True)
            return _checked(AESGCM(master).decrypt(raw[:12], raw[12:], _wrap_aad(wrapped.key_id)))
        except (InvalidTag, binascii.Error, ValueError):
            raise WrongKeyError(
                f"the data key does not unwrap with key {wrapped.key_id}",
                hint="this backup was encrypted under another master key, or its header is corrupt",
            ) from None


def _wrap_aad(key_id: str) -> bytes:
    return b"luxima-backup/data-key/v1|" + key_id.encode()


def _mac_key(master: bytes) -> bytes:
    # A key of its own for MACs, derived from the master key: the master key itself only ever wraps data keys.
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"luxima-backup/catalog-mac/v1").derive(master)


class VaultKVProvider(_LocalWrap):
    """Master key stored in a Vault KV v2 secret; each backup records the secret's version."""

    name = "vault-kv"
    mac_field = "mac"

    def __init__(self, cfg: VaultSettings):
        self.cfg = cfg
        self.path = f"{cfg.kv_mount}/{cfg.kv_path}"
        self._masters: dict[tuple[str, str, Any], bytes] = {}

    def _master(self, version: int | None) -> tuple[bytes, int]:
        text, got = vault.read_kv(self.cfg, self.path, self.cfg.kv_field, version)
        return _decode_master(text, f"vault:{self.path}#{self.cfg.kv_field}"), got

    def new_data_key(self) -> DataKey:
        master, version = self._master(None)
        return self._wrap(master, f"{self.path}#{self.cfg.kv_field}", version)

    def unwrap(self, wrapped: WrappedKey) -> bytes:
        _check_provider(self.name, wrapped)
        # The secret (and version) recorded in the header, as Transit uses the recorded key:
        # moving the master key to a new path leaves older backups readable.
        path, sep, field = wrapped.key_id.rpartition("#")
        if not sep or not path:
            raise WrongKeyError(f"this backup's key id {wrapped.key_id!r} is not a KV reference (MOUNT/PATH#FIELD)")
        text, _ = vault.read_kv(self.cfg, path, field, wrapped.key_version)
        return self._unwrap_with(_decode_master(text, f"vault:{wrapped.key_id}"), wrapped)

    def sign(self, message: bytes) -> dict[str, Any]:
        master, version = self._master(None)
        return self._mac(master, f"{self.path}#{self.cfg.kv_field}", version, message)

    def _master_for(self, mac: dict[str, Any]) -> bytes:
        path, sep, field = str(mac["key_id"]).rpartition("#")
        if not sep or not path:
            raise WrongKeyError(f"its MAC's key id {mac['key_id']!r} is not a KV reference (MOUNT/PATH#FIELD)")
        version = mac.get("key_version")
        cached = self._masters.get((path, field, version))
        if cached is None:  # one read per secret version however many MACs a catalog rebuild checks
            text, _ = vault.read_kv(self.cfg, path, field, version if isinstance(version, int) else None)
            cached = self._masters[(path, field, version)] = _decode_master(text, f"vault:{mac['key_id']}")
        return cached


class KeyFileProvider(_LocalWrap):
    """Master key in a local file: development and demos only (it sits on this machine's disk)."""

    name = "file"
    mac_field = "mac"

    def __init__(self, path: Path, old_paths: list[Path] | None = None):
        self.master = load_key_file(path)
        self.key_id = fingerprint(self.master)
        self._known = {self.key_id: self.master}
        for old in old_paths or []:
            key = load_key_file(old)
            self._known[fingerprint(key)] = key
        log.warning("using the local key file %s (key %s): for development only; production keys belong in Vault", path, self.key_id)

    def new_data_key(self) -> DataKey:
        return self._wrap(self.master, self.key_id, None)

    def unwrap(self, wrapped: WrappedKey) -> bytes:
        _check_provider(self.name, wrapped)
        master = self._known.get(wrapped.key_id)
        if master is None:
            raise WrongKeyError(
                f"this backup was encrypted with key file {wrapped.key_id}, but the key file(s) given are {sorted(self._known)}",
                hint="pass the key file that was in use when the backup was made (keys.key_file or keys.old_key_files)",
            )
        return self._unwrap_with(master, wrapped)

    def sign(self, message: bytes) -> dict[str, Any]:
        return self._mac(self.master, self.key_id, None, message)

    def _master_for(self, mac: dict[str, Any]) -> bytes:
        master = self._known.get(str(mac["key_id"]))
        if master is None:
            raise WrongKeyError(f"it was signed with key file {mac['key_id']}, but the key file(s) given are {sorted(self._known)}",
                                hint="add the key file in use when it was written to keys.old_key_files")
        return master


def fingerprint(master: bytes) -> str:
    """A public identifier of a master key (reveals nothing about it)."""
    return "file:" + hashlib.sha256(b"luxima-backup/key-fingerprint/v1|" + master).hexdigest()[:16]


def load_key_file(path: Path) -> bytes:
    try:
        text = Path(path).expanduser().read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read key file {path}: {exc.strerror}", hint="create one with `luxima-backup keys generate PATH`") from None
    return _decode_master(text, str(path))


def _decode_master(text: str, where: str) -> bytes:
    try:
        key = base64.b64decode(text, validate=True)
    except binascii.Error:
        key = b""
    if len(key) != KEY_SIZE:
        raise ConfigError(f"master key at {where} is not 32 bytes of base64", hint="generate one with `luxima-backup keys generate`")
    return key


def new_master_key() -> str:
    """A fresh master key as base64 text, the form key files and KV secrets hold."""
    return base64.b64encode(os.urandom(KEY_SIZE)).decode()


def _checked(dek: bytes) -> bytes:
    if len(dek) != KEY_SIZE:
        raise WrongKeyError("unwrapped data key has the wrong size; the wrapped key is corrupt")
    return dek


def _check_provider(expected: str, wrapped: WrappedKey) -> None:
    if wrapped.provider != expected:
        raise WrongKeyError(
            f"this backup's data key was wrapped by the {wrapped.provider!r} provider ({wrapped.key_id}), "
            f"but the configured provider is {expected!r}",
            hint=f"configure keys.provider = {wrapped.provider!r} (with its key) to read it",
        )


def provider_from_settings(cfg: KeySettings) -> KeyProvider:
    """The configured key provider. Imports and logins happen here, not at module import."""
    if cfg.recovery_private_key is not None:  # break-glass: the offline key alone, whatever else is configured
        from .recovery import RecoveryProvider

        return RecoveryProvider(cfg.recovery_private_key)
    if cfg.provider == "vault-transit":
        assert cfg.vault is not None
        return VaultTransitProvider(cfg.vault)
    if cfg.provider == "vault-kv":
        assert cfg.vault is not None
        return VaultKVProvider(cfg.vault)
    assert cfg.key_file is not None
    return KeyFileProvider(cfg.key_file, cfg.old_key_files)
