"""The encrypted object format: round trips, and every kind of damage refused with a clear error."""

from __future__ import annotations

import io
import os

import pytest

from luxima_backup import envelope
from luxima_backup.envelope import TAG_SIZE, DecryptingReader, Encryptor, WrappedKey, decrypt_bytes, encrypt_bytes
from luxima_backup.errors import FormatError, IntegrityError

KEY = os.urandom(32)
WRAPPED = WrappedKey("file", "file:test", "not-used-here")
CHUNK = 64


def unwrap(_: WrappedKey) -> bytes:
    return KEY


def seal(data: bytes, chunk: int = CHUNK) -> bytes:
    return encrypt_bytes(data, KEY, WRAPPED, chunk)


def split(blob: bytes) -> tuple[bytes, list[bytes]]:
    header, preamble = envelope.read_preamble(io.BytesIO(blob))
    body = blob[len(preamble):]
    size = header.chunk_size + TAG_SIZE
    return preamble, [body[i:i + size] for i in range(0, len(body), size)]


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 10 * CHUNK + 7])
def test_round_trip_at_chunk_boundaries(size: int) -> None:
    data = os.urandom(size)
    assert decrypt_bytes(seal(data), unwrap) == data


def test_streaming_with_odd_write_sizes_matches_one_shot() -> None:
    data = os.urandom(5000)
    enc = Encryptor(KEY, WRAPPED, CHUNK)
    out = [enc.header()]
    pos = 0
    for step in [1, 7, 64, 65, 300, 3, 1000]:
        out.append(enc.update(data[pos:pos + step]))
        pos += step
    out.append(enc.update(data[pos:]))
    out.append(enc.finalize())
    reader = DecryptingReader(io.BytesIO(b"".join(out)), unwrap, read_size=13)
    assert reader.read() == data


def test_ciphertext_of_repetitive_data_looks_random_and_never_repeats() -> None:
    """What a weak cipher (XOR, ECB, a reused nonce) fails: repetitive plaintext must give ciphertext that does
    not compress, and sealing the same data twice must give unrelated ciphertexts."""
    import zlib

    marker = b"luxima-secret-row-content-" * 4000
    first, second = seal(marker), seal(marker)
    assert marker[:26] not in first
    body = first[-len(marker):]
    assert len(zlib.compress(body, 9)) > 0.99 * len(body)  # the plaintext shrinks 99 %
    assert first[-len(marker):] != second[-len(marker):]
    same = sum(a == b for a, b in zip(first[-len(marker):], second[-len(marker):]))
    assert same < len(marker) / 128  # ~1/256 of bytes agree by chance


def test_bit_flip_in_a_chunk_is_refused() -> None:
    blob = bytearray(seal(os.urandom(500)))
    blob[-100] ^= 0x01
    with pytest.raises(IntegrityError, match="failed authentication at chunk"):
        decrypt_bytes(bytes(blob), unwrap)


def test_header_change_is_refused() -> None:
    blob = encrypt_bytes(os.urandom(500), KEY, WRAPPED, CHUNK, {"content": "dump"})
    # Any change to the header changes the AAD of every chunk.
    tampered = blob.replace(b'"content":"dump"', b'"content":"pump"', 1)
    assert tampered != blob
    with pytest.raises(IntegrityError, match="chunk 0"):
        decrypt_bytes(tampered, unwrap)


def test_truncation_at_a_chunk_boundary_is_refused() -> None:
    preamble, chunks = split(seal(os.urandom(5 * CHUNK + 10)))
    with pytest.raises(IntegrityError, match="authentication"):
        decrypt_bytes(preamble + b"".join(chunks[:3]), unwrap)


def test_truncation_inside_a_chunk_is_refused() -> None:
    blob = seal(os.urandom(5 * CHUNK + 10))
    with pytest.raises(IntegrityError):
        decrypt_bytes(blob[:-5], unwrap)
    preamble, _ = split(blob)
    with pytest.raises(IntegrityError, match="truncated"):
        decrypt_bytes(preamble + b"abc", unwrap)


def test_reordered_chunks_are_refused() -> None:
    preamble, chunks = split(seal(os.urandom(5 * CHUNK + 10)))
    chunks[1], chunks[2] = chunks[2], chunks[1]
    with pytest.raises(IntegrityError, match="chunk 1"):
        decrypt_bytes(preamble + b"".join(chunks), unwrap)


def test_appended_data_is_refused() -> None:
    blob = seal(os.urandom(3 * CHUNK))
    with pytest.raises(IntegrityError):
        decrypt_bytes(blob + os.urandom(CHUNK + TAG_SIZE), unwrap)


def test_wrong_data_key_is_refused() -> None:
    blob = seal(os.urandom(100))
    with pytest.raises(IntegrityError, match="not encrypted with this data key"):
        decrypt_bytes(blob, lambda _: os.urandom(32))


def test_not_a_backup_and_future_versions_have_clear_errors() -> None:
    with pytest.raises(FormatError, match="not a Luxima Backup encrypted object"):
        decrypt_bytes(b"PGDMP" + os.urandom(100), unwrap)
    blob = bytearray(seal(b"x"))
    blob[len(envelope.MAGIC)] = 9
    with pytest.raises(FormatError, match="version 9 is not supported"):
        decrypt_bytes(bytes(blob), unwrap)


def test_independent_decryptor_from_the_spec() -> None:
    """Decrypt with nothing but the spec in docs/encryption-format.md and the cryptography primitives."""
    import hashlib
    import json
    import struct

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    data = os.urandom(3 * CHUNK + 5)
    blob = seal(data)
    assert blob[:8] == b"\x89LXB\r\n\x1a\n"
    version, hlen = struct.unpack(">BI", blob[8:13])
    header = json.loads(blob[13:13 + hlen])
    aad = hashlib.sha256(blob[:13 + hlen]).digest()
    prefix = bytes.fromhex(header["nonce_prefix"])
    body, out, i, size = blob[13 + hlen:], [], 0, header["chunk_size"] + 16
    while body:
        piece, body = body[:size], body[size:]
        out.append(AESGCM(KEY).decrypt(prefix + struct.pack(">IB", i, 0 if body else 1), piece, aad))
        i += 1
    assert version == 1 and b"".join(out) == data
