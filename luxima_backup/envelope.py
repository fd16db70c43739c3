"""The encrypted object format (LXB1): a header naming the wrapped data key, then AES-256-GCM chunks.

The normative specification is docs/encryption-format.md; this module is its reference
implementation. In short, the STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár 2015):

    preamble = MAGIC || version (u8) || header_len (u32 BE) || header (UTF-8 JSON)
    chunk_i  = AES-256-GCM(key = data key,
                           nonce = nonce_prefix (7 bytes) || i (u32 BE) || final (u8: 0 or 1),
                           aad = SHA-256(preamble),
                           plaintext = bytes [i*C, (i+1)*C) of the input)   ->  ciphertext || 16-byte tag

Every chunk but the last carries exactly C plaintext bytes; the last carries 0..C and is the
only one with final = 1 (it is empty only when the whole input is). So a reordered chunk fails
(wrong index), a stream cut at a chunk boundary fails (its last chunk was not sealed as final),
bytes appended after the final chunk fail, and any change to the header fails every chunk.
Memory is bounded by one chunk whatever the object's size.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import FormatError, IntegrityError

MAGIC = b"\x89LXB\r\n\x1a\n"  # PNG-style: catches text-mode mangling and non-backups at once
VERSION = 1
TAG_SIZE = 16
KEY_SIZE = 32
NONCE_PREFIX_SIZE = 7
MAX_HEADER = 64 * 1024
MAX_CHUNK = 16 * 1024 * 1024
_FIXED = struct.Struct(">BI")  # version, header length
PREAMBLE_FIXED_SIZE = len(MAGIC) + _FIXED.size


@dataclass(frozen=True)
class WrappedKey:
    """A data key as stored in the header: wrapped by a key-encryption key that a provider holds."""

    provider: str          # "vault-transit", "vault-kv", "file"
    key_id: str            # which key-encryption key (Vault key/path, or key-file fingerprint)
    wrapped: str           # the wrapped data key, in the provider's own text form
    key_version: int | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"provider": self.provider, "key_id": self.key_id, "wrapped": self.wrapped}
        if self.key_version is not None:
            out["key_version"] = self.key_version
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "WrappedKey":
        try:
            return cls(str(data["provider"]), str(data["key_id"]), str(data["wrapped"]), data.get("key_version"))
        except (KeyError, TypeError) as exc:
            raise FormatError(f"header's key entry is incomplete: missing {exc}") from None


@dataclass(frozen=True)
class Header:
    """The parsed header of an encrypted object."""

    key: WrappedKey
    chunk_size: int
    nonce_prefix: bytes
    cipher: str = "AES-256-GCM"
    info: dict[str, Any] = field(default_factory=dict)  # free-form, e.g. content type; authenticated too

    def encode(self) -> bytes:
        """The preamble (magic, version, length, JSON header) exactly as written."""
        body = {
            "cipher": self.cipher,
            "chunk_size": self.chunk_size,
            "nonce_prefix": self.nonce_prefix.hex(),
            "key": self.key.to_json(),
            "info": self.info,
        }
        raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        if len(raw) > MAX_HEADER:
            raise FormatError("header too large")
        return MAGIC + _FIXED.pack(VERSION, len(raw)) + raw

    @classmethod
    def decode(cls, raw: bytes) -> "Header":
        try:
            body = json.loads(raw)
            header = cls(
                key=WrappedKey.from_json(body["key"]),
                chunk_size=int(body["chunk_size"]),
                nonce_prefix=bytes.fromhex(body["nonce_prefix"]),
                cipher=str(body["cipher"]),
                info=dict(body.get("info") or {}),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise FormatError(f"encrypted object's header is malformed: {exc}") from None
        if header.cipher != "AES-256-GCM":
            raise FormatError(f"unsupported cipher {header.cipher!r} (this program knows AES-256-GCM)")
        if not 1 <= header.chunk_size <= MAX_CHUNK or len(header.nonce_prefix) != NONCE_PREFIX_SIZE:
            raise FormatError("encrypted object's header has an invalid chunk size or nonce prefix")
        return header


def read_preamble(src: BinaryIO) -> tuple[Header, bytes]:
    """Read and parse the preamble from ``src``; returns the header and the raw preamble bytes."""
    fixed = _read_exact(src, PREAMBLE_FIXED_SIZE)
    if len(fixed) < len(MAGIC) or fixed[: len(MAGIC)] != MAGIC:
        raise FormatError("not a Luxima Backup encrypted object (bad magic bytes)", hint="is this the right object, and was it downloaded in binary mode?")
    if len(fixed) < PREAMBLE_FIXED_SIZE:
        raise IntegrityError("encrypted object is truncated inside its header")
    version, length = _FIXED.unpack(fixed[len(MAGIC):])
    if version != VERSION:
        raise FormatError(f"encrypted object format version {version} is not supported (this program reads version {VERSION})", hint="use a newer luxima-backup")
    if length > MAX_HEADER:
        raise FormatError("encrypted object's header length is implausible")
    raw = _read_exact(src, length)
    if len(raw) != length:
        raise IntegrityError("encrypted object is truncated inside its header")
    return Header.decode(raw), fixed + raw


def _read_exact(src: BinaryIO, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        block = src.read(n - got)
        if not block:
            break
        parts.append(block)
        got += len(block)
    return b"".join(parts)


def _nonce(prefix: bytes, index: int, final: bool) -> bytes:
    if index >= 2**32:
        raise FormatError("object too large for the format (2^32 chunks)")
    return prefix + struct.pack(">IB", index, 1 if final else 0)


class Encryptor:
    """Push-style encryption: ``header()``, then ``update()`` any number of times, then ``finalize()``."""

    def __init__(self, data_key: bytes, key: WrappedKey, chunk_size: int, info: dict[str, Any] | None = None):
        if len(data_key) != KEY_SIZE:
            raise ValueError("data key must be 32 bytes")
        self._aead = AESGCM(data_key)
        self._header = Header(key=key, chunk_size=chunk_size, nonce_prefix=os.urandom(NONCE_PREFIX_SIZE), info=info or {})
        self._preamble = self._header.encode()
        self._aad = hashlib.sha256(self._preamble).digest()
        self._buf = bytearray()
        self._index = 0
        self._done = False

    def header(self) -> bytes:
        return self._preamble

    def update(self, data: bytes) -> bytes:
        self._buf += data
        size = self._header.chunk_size
        # Hold back at least one byte so the last chunk is always sealed by finalize() as final.
        if len(self._buf) <= size:
            return b""
        out = []
        view = memoryview(self._buf)
        pos = 0
        while len(self._buf) - pos > size:
            out.append(self._seal(view[pos:pos + size], final=False))
            pos += size
        view.release()
        del self._buf[:pos]
        return b"".join(out)

    def finalize(self) -> bytes:
        if self._done:
            raise RuntimeError("finalize() called twice")
        self._done = True
        last = self._seal(bytes(self._buf), final=True)
        self._buf.clear()
        return last

    def _seal(self, chunk: bytes | memoryview, final: bool) -> bytes:
        sealed = self._aead.encrypt(_nonce(self._header.nonce_prefix, self._index, final), bytes(chunk), self._aad)
        self._index += 1
        return sealed


class Decryptor:
    """Push-style decryption of the bytes that follow the preamble; raises ``IntegrityError``."""

    def __init__(self, data_key: bytes, header: Header, preamble: bytes):
        self._aead = AESGCM(data_key)
        self._header = header
        self._aad = hashlib.sha256(preamble).digest()
        self._sealed = header.chunk_size + TAG_SIZE
        self._buf = bytearray()
        self._index = 0
        self._done = False

    def update(self, data: bytes) -> bytes:
        self._buf += data
        if len(self._buf) <= self._sealed:
            return b""
        out = []
        pos = 0
        while len(self._buf) - pos > self._sealed:
            out.append(self._open(bytes(self._buf[pos:pos + self._sealed]), final=False))
            pos += self._sealed
        del self._buf[:pos]
        return b"".join(out)

    def finalize(self) -> bytes:
        if self._done:
            raise RuntimeError("finalize() called twice")
        self._done = True
        if len(self._buf) < TAG_SIZE:
            raise IntegrityError(
                f"encrypted object is truncated (ends inside chunk {self._index})",
                hint="the object is incomplete; use another backup",
            )
        return self._open(bytes(self._buf), final=True)

    def _open(self, sealed: bytes, final: bool) -> bytes:
        try:
            plain = self._aead.decrypt(_nonce(self._header.nonce_prefix, self._index, final), sealed, self._aad)
        except InvalidTag:
            raise IntegrityError(
                f"encrypted object failed authentication at chunk {self._index} "
                f"(byte ~{self._index * self._sealed} after the header): it is truncated, reordered, "
                "tampered with, or was not encrypted with this data key",
                hint="do not use this object; restore from another backup",
            ) from None
        self._index += 1
        return plain

    @property
    def chunks(self) -> int:
        return self._index


UnwrapFn = Callable[[WrappedKey], bytes]
BOUND_FIELDS = ("backup_id", "target", "object")


def check_binding(header: Header, expect: Mapping[str, str] | None, where: str) -> None:
    """Refuse an object whose header does not name the backup, target and key its manifest expects (``info``).

    The header is part of every chunk's associated data, so an object whose header was edited to pass this check fails
    authentication at its first chunk: what is read is either the object its manifest names, or refused.
    ``expect`` None: an object written before headers named their backup (its authenticated manifest says so).
    """
    if expect is None:
        return
    got = {k: header.info.get(k) for k in BOUND_FIELDS}
    if all(v is None for v in got.values()):
        raise IntegrityError(
            f"{where} does not name its backup in its encryption header, though its manifest says it was written so: "
            "an older or foreign object was put in its place",
            hint="do not use it: restore another backup, and check who can write to the backup storage")
    wrong = [f"{k} {got[k]!r} where {expect[k]!r} was expected" for k in BOUND_FIELDS if got[k] != expect.get(k)]
    if wrong:
        raise IntegrityError(
            f"{where} is not the object its manifest names: its encryption header says " + "; ".join(wrong)
            + " (it was moved, copied from another backup or target, or planted)",
            hint="do not use it: restore another backup, and check who can write to the backup storage")


class DecryptingReader(io.RawIOBase):
    """A readable stream of plaintext from a readable stream of an encrypted object.

    Plaintext is released chunk by chunk as each authenticates; the last chunk's check (and so
    the proof that nothing was cut off) comes only at EOF. Callers that must not act on
    unproven data read to the end first.
    """

    def __init__(self, src: BinaryIO, unwrap: UnwrapFn, read_size: int = 1 << 20,
                 expect: Mapping[str, str] | None = None, where: str = "the encrypted object"):
        super().__init__()
        self.header, preamble = read_preamble(src)
        check_binding(self.header, expect, where)  # before the key is unwrapped: a planted object costs no Vault call
        self._src = src
        # the recovery key opens the seal in the header (info.recovery), not the provider's wrapped key
        key = unwrap(self.header) if getattr(unwrap, "needs_header", False) else unwrap(self.header.key)  # type: ignore[arg-type]
        self._dec = Decryptor(key, self.header, preamble)
        self._read_size = read_size
        self._pending = bytearray()
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._pending and not self._eof:
            block = self._src.read(self._read_size)
            if block:
                self._pending += self._dec.update(block)
            else:
                self._pending += self._dec.finalize()
                self._eof = True
        n = min(len(b), len(self._pending))
        b[:n] = self._pending[:n]
        del self._pending[:n]
        return n


def encrypt_bytes(data: bytes, data_key: bytes, key: WrappedKey, chunk_size: int, info: dict[str, Any] | None = None) -> bytes:
    """Encrypt a small in-memory payload into a complete object."""
    enc = Encryptor(data_key, key, chunk_size, info)
    return enc.header() + enc.update(data) + enc.finalize()


def decrypt_bytes(blob: bytes, unwrap: UnwrapFn, expect: Mapping[str, str] | None = None) -> bytes:
    """Decrypt a small in-memory object completely."""
    return DecryptingReader(io.BytesIO(blob), unwrap, expect=expect).read()
