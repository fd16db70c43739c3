"""The offline recovery key: every data key also wrapped for an X25519 public key whose private key is kept offline.

With Vault Transit (the default provider) no key exists outside Vault; if Vault is lost with the primary
site, every backup would be unreadable. So each data key is also sealed to a *recovery public key* from
the settings (ECIES: an ephemeral X25519 key, HKDF-SHA256 of the shared secret, AES-256-GCM), and the
private key, made once by ``luxima-backup keys recovery-generate``, is written to a file meant for a safe
and never stored by the project. Holding that file alone opens every backup so sealed, Vault or not.

A sealed key (``RecoveryWrap``, JSON) names the recovery key by fingerprint and carries its ephemeral public
key; the associated data binds it to that fingerprint and to what it is for (``context``: the object's key),
so a sealed key copied onto another object does not open it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import ConfigError, WrongKeyError

ALG = "X25519-HKDF-SHA256-AES256GCM"
PUBLIC_PREFIX = "x25519:"
_INFO = b"luxima-backup/recovery-wrap/v1"


def fingerprint(public: X25519PublicKey) -> str:
    """A public identifier of a recovery key, for the record and for the sealed keys to name."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "recovery:" + hashlib.sha256(b"luxima-backup/recovery-fingerprint/v1|" + raw).hexdigest()[:16]


def public_text(public: X25519PublicKey) -> str:
    """The public key as the settings hold it: ``x25519:<base64 of the 32 raw bytes>``."""
    return PUBLIC_PREFIX + base64.b64encode(public.public_bytes(serialization.Encoding.Raw,
                                                                serialization.PublicFormat.Raw)).decode()


def load_public(text: str) -> X25519PublicKey:
    text = text.strip()
    try:
        raw = base64.b64decode(text.removeprefix(PUBLIC_PREFIX), validate=True) if text.startswith(PUBLIC_PREFIX) else b""
    except binascii.Error:
        raw = b""
    if len(raw) != 32:
        raise ConfigError("keys.recovery_public_key is not an X25519 public key (x25519:<base64 of 32 bytes>)",
                          hint="copy the line `luxima-backup keys recovery-generate` printed")
    return X25519PublicKey.from_public_bytes(raw)


def generate(path: Path) -> tuple[str, str]:
    """Write a new recovery private key to ``path`` (0600, never over an existing file); its public key and fingerprint."""
    private = X25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; refusing to overwrite a recovery key",
                          hint="choose a new file; a recovery key in use must never be replaced by accident") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return public_text(private.public_key()), fingerprint(private.public_key())


def load_private(path: Path) -> X25519PrivateKey:
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the recovery key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"{path} is not a recovery key (an unencrypted PKCS#8 PEM X25519 private key)",
                          hint="give the file `luxima-backup keys recovery-generate` wrote") from None
    if not isinstance(key, X25519PrivateKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}, not an X25519 recovery key")
    return key


@dataclass(frozen=True)
class RecoveryWrap:
    """A data key sealed to a recovery public key."""

    key_id: str     # the recovery key's fingerprint
    ephemeral: str  # base64 of the ephemeral X25519 public key
    sealed: str     # base64 of nonce (12) || AES-256-GCM(data key)

    def to_json(self) -> dict[str, Any]:
        return {"alg": ALG, "key_id": self.key_id, "ephemeral": self.ephemeral, "sealed": self.sealed}

    @classmethod
    def from_json(cls, data: Any) -> "RecoveryWrap":
        if not isinstance(data, dict) or data.get("alg") != ALG:
            raise WrongKeyError(f"not a recovery-sealed key of this program ({ALG})")
        try:
            return cls(str(data["key_id"]), str(data["ephemeral"]), str(data["sealed"]))
        except KeyError as exc:
            raise WrongKeyError(f"the recovery-sealed key is incomplete: missing {exc}") from None


def _kek(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=ephemeral + recipient, info=_INFO).derive(shared)


def _aad(key_id: str, context: str) -> bytes:
    return _INFO + b"|" + key_id.encode() + b"|" + context.encode()


def seal(data_key: bytes, public: X25519PublicKey, context: str) -> RecoveryWrap:
    """``data_key`` sealed to the recovery public key, for the object ``context`` names."""
    eph = X25519PrivateKey.generate()
    eph_raw = eph.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    recipient = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    key_id = fingerprint(public)
    nonce = os.urandom(12)
    sealed = AESGCM(_kek(eph.exchange(public), eph_raw, recipient)).encrypt(nonce, data_key, _aad(key_id, context))
    return RecoveryWrap(key_id, base64.b64encode(eph_raw).decode(), base64.b64encode(nonce + sealed).decode())


def open_sealed(wrap: RecoveryWrap, private: X25519PrivateKey, context: str) -> bytes:
    """The data key, with the recovery private key; ``WrongKeyError`` for another key or another object's seal."""
    public = private.public_key()
    if wrap.key_id != fingerprint(public):
        raise WrongKeyError(f"this data key is sealed to recovery key {wrap.key_id}, not to {fingerprint(public)}",
                            hint="give the recovery key file whose fingerprint the record of the backups names")
    try:
        eph_raw = base64.b64decode(wrap.ephemeral, validate=True)
        blob = base64.b64decode(wrap.sealed, validate=True)
        kek = _kek(private.exchange(X25519PublicKey.from_public_bytes(eph_raw)), eph_raw,
                   public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
        key = AESGCM(kek).decrypt(blob[:12], blob[12:], _aad(wrap.key_id, context))
    except (binascii.Error, ValueError, InvalidTag):
        raise WrongKeyError(f"the recovery-sealed key of {context} does not open with recovery key {wrap.key_id}",
                            hint="it was sealed for another object, or it is damaged") from None
    if len(key) != 32:
        raise WrongKeyError("the recovery-sealed data key has the wrong size")
    return key


def header_seal(public_text: str | None, data_key: bytes, object_key: str) -> dict[str, Any]:
    """What an object's header carries for the recovery key (``info.recovery``), when one is configured."""
    if not public_text:
        return {}
    return {"recovery": seal(data_key, load_public(public_text), object_key).to_json()}


class RecoveryUnwrap:
    """Opens objects with the offline recovery private key alone (no Vault, no key file): the data key sealed in each
    object's header. Passed where a provider's ``unwrap`` goes; it needs the whole header (``needs_header``)."""

    needs_header = True

    def __init__(self, private: X25519PrivateKey, seals: dict[str, dict[str, Any]] | None = None,
                 object_key: str | None = None):
        """``seals``: a manifest's ``recovery_seals`` (objects older than the recovery key, sealed by ``keys rewrap``);
        ``object_key``: the key of the object read, for an object whose header does not name it."""
        self.private, self.seals, self.object_key = private, seals or {}, object_key
        self.key_id = fingerprint(private.public_key())

    def __call__(self, header: Any) -> bytes:
        key = str(header.info.get("object") or self.object_key or "")
        sealed = header.info.get("recovery") or self.seals.get(key)
        if sealed is None:
            raise WrongKeyError(
                "this object carries no data key sealed to a recovery key, and its manifest none: it was written "
                "before keys.recovery_public_key was set",
                hint="`luxima-backup keys rewrap --confirm` seals older backups while their key provider is available; "
                     "for a local copy, give its manifest with --manifest")
        return open_sealed(RecoveryWrap.from_json(sealed), self.private, key)


def seal_for(public_text: str, data_key: bytes, object_key: str) -> dict[str, Any]:
    """A seal of an existing object's data key, for its manifest (``keys rewrap``)."""
    return seal(data_key, load_public(public_text), object_key).to_json()


# --- the catalog's recovery MAC ------------------------------------------------------------------------------
# Manifests are authenticated with a MAC under the key provider (Vault Transit's HMAC): with Vault gone, the
# catalog could not tell a planted manifest from a real one. So each manifest also carries ``mac_recovery``,
# an HMAC under a key derived from the recovery private key: the backups' writers get that derived key as a
# secret (keys.recovery_catalog_key), and at break-glass time it is derived again from the offline file.
# (A signature the writers make with the public key alone cannot authenticate anything: anyone has it.)

_CATALOG_INFO = b"luxima-backup/recovery-catalog-mac/v1"
MAC_FIELD = "mac_recovery"


def catalog_key(private: X25519PrivateKey) -> bytes:
    raw = private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_CATALOG_INFO).derive(raw)


def write_catalog_key(private: X25519PrivateKey, path: Path) -> None:
    """The catalog MAC key for the writers' settings, base64, to ``path`` (0600, never over an existing file)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; refusing to overwrite it", hint="choose a new file") from None
    with os.fdopen(fd, "w") as f:
        f.write(base64.b64encode(catalog_key(private)).decode() + "\n")


class RecoveryMac:
    """HMAC-SHA256 of catalog documents under the recovery catalog key (``mac_recovery``)."""

    def __init__(self, key: bytes, key_id: str):
        if len(key) != 32:
            raise ConfigError("keys.recovery_catalog_key is not 32 bytes of base64",
                              hint="give the file `luxima-backup keys recovery-generate` wrote beside the private key")
        self._key, self.key_id = key, key_id

    @classmethod
    def from_text(cls, text: str, public_text: str) -> "RecoveryMac":
        try:
            key = base64.b64decode(text.strip(), validate=True)
        except binascii.Error:
            key = b""
        return cls(key, fingerprint(load_public(public_text)))

    def sign(self, message: bytes) -> dict[str, Any]:
        return {"alg": "hmac-sha256", "provider": "recovery", "key_id": self.key_id,
                "value": hmac.new(self._key, message, hashlib.sha256).hexdigest()}

    def verify(self, items: Any) -> list[str | None]:
        out: list[str | None] = []
        for message, mac in items:
            if not isinstance(mac, dict) or mac.get("alg") != "hmac-sha256" or not isinstance(mac.get("value"), str):
                out.append("its recovery MAC is malformed")
            elif mac.get("key_id") != self.key_id:
                out.append(f"its recovery MAC is under recovery key {mac.get('key_id')}, not {self.key_id}")
            elif not hmac.compare_digest(hmac.new(self._key, message, hashlib.sha256).hexdigest(), mac["value"]):
                out.append(f"its recovery MAC does not match (recovery key {self.key_id}): it was altered after it was "
                           "written, or keys.recovery_catalog_key is not this recovery key's")
            else:
                out.append(None)
        return out


class RecoveryProvider:
    """Break-glass key provider: the offline recovery private key alone, Vault and the usual provider not used.

    Data keys come from the seal in each object's header (or, for objects older than the recovery key, from the
    ``recovery_seals`` of their manifest, which the catalog hands over once the manifest is authenticated); the
    catalog checks manifests by their ``mac_recovery``. It reads only: nothing is encrypted or signed with it.
    """

    name = "recovery"
    mac_field = MAC_FIELD

    def __init__(self, path: Path):
        self.private = load_private(path)
        self.key_id = fingerprint(self.private.public_key())
        self._mac = RecoveryMac(catalog_key(self.private), self.key_id)
        self._seals: dict[str, dict[str, Any]] = {}

    def remember(self, seals: dict[str, dict[str, Any]]) -> None:
        """The seals of an authenticated manifest (by object key)."""
        self._seals.update(seals)

    def unwrap(self, header: Any) -> bytes:
        return RecoveryUnwrap(self.private, self._seals)(header)

    unwrap.needs_header = True  # type: ignore[attr-defined]

    def new_data_key(self) -> Any:
        raise ConfigError("a recovery key was given: this run may only read backups (break-glass mode)",
                          hint="back up with the normal key provider (keys.provider), without --recovery-key")

    def sign(self, message: bytes) -> dict[str, Any]:
        raise ConfigError("a recovery key was given: this run may only read backups (break-glass mode)")

    def verify(self, items: Any) -> list[str | None]:
        return self._mac.verify(items)
