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


def read_small(store: ObjectStore, key: str, provider: KeyProvider) -> bytes:
    """Download and decrypt a small object (such as the globals dump) completely."""
    with store.load(key) as body:
        return DecryptingReader(body, provider.unwrap).read()  # type: ignore[arg-type]


def compare(key: str, what: str, actual: str, expected: str) -> None:
    if actual != expected:
        raise VerificationError(f"{key}: {what} is {actual}, expected {expected}")


def check_row(check: str, expected: Any, actual: Any) -> dict[str, Any]:
    return {"check": check, "expected": str(expected), "actual": str(actual), "ok": expected == actual}
