"""What the verifications share: a stored object's size and sha256 read back, and the rows of a checks table."""

from __future__ import annotations

from typing import Any

from luxima_backup.envelope import DecryptingReader
from luxima_backup.errors import VerificationError
from luxima_backup.keys import KeyProvider
from luxima_backup.pipes import Meter, MeteredReader, drain
from luxima_backup.storage import ObjectStore


def read_back(store: ObjectStore, key: str, expected_size: int, expected_sha256: str) -> dict[str, Any]:
    """Size and sha256 of the stored object against what was sent."""
    info = store.stat(key)
    if info.size != expected_size:
        raise VerificationError(f"{key}: stored size {info.size} != {expected_size} bytes uploaded")
    meter = Meter()
    with store.load(key) as body:
        drain(MeteredReader(body, meter))
    compare(key, "sha256 of the stored object", meter.hexdigest, expected_sha256)
    return {"size": info.size, "sha256": meter.hexdigest}


def confirm_stored(store: ObjectStore, key: str, expected_size: int, expected_sha256: str,
                   proven_etag: str | None) -> dict[str, Any]:
    """The stored object is the one sent: without a download when storage proved it at upload.

    ``proven_etag``: the ETag that storage computed from what it received and that matched the
    MD5s of the parts as they were sent (``ObjectInfo.proven``). If the object still has that ETag
    and size, it holds those bytes. Otherwise (no proof: a local store, an ETag that is no MD5, or
    the object changed since) it is read back whole and its sha256 compared.
    """
    if proven_etag:
        info = store.stat(key)
        if info.size == expected_size and info.etag == proven_etag:
            return {"size": info.size, "sha256": expected_sha256, "stored": "etag matched the parts sent"}
    return {**read_back(store, key, expected_size, expected_sha256), "stored": "read back"}


def read_small(store: ObjectStore, key: str, provider: KeyProvider) -> bytes:
    """Download and decrypt a small object (such as the globals dump) completely."""
    with store.load(key) as body:
        return DecryptingReader(body, provider.unwrap).read()  # type: ignore[arg-type]


def compare(key: str, what: str, actual: str, expected: str) -> None:
    if actual != expected:
        raise VerificationError(f"{key}: {what} is {actual}, expected {expected}")


def check_row(check: str, expected: Any, actual: Any) -> dict[str, Any]:
    return {"check": check, "expected": str(expected), "actual": str(actual), "ok": expected == actual}
