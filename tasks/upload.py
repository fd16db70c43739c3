"""Upload stage: the ciphertext stream into object storage as one multipart upload."""

from __future__ import annotations

import json
from typing import Any, BinaryIO

from prefect import task
from prefect.cache_policies import NO_CACHE

from luxima_backup import runtime
from luxima_backup.pipes import Link, Meter
from luxima_backup.storage import ObjectStore


class _MeteredReader:
    """Counts and hashes exactly the bytes handed to the uploader."""

    def __init__(self, src: Any, meter: Meter):
        self._src = src
        self.meter = meter

    def read(self, n: int = -1) -> bytes:
        data = self._src.read(n)
        self.meter.update(data)
        return data

    def readable(self) -> bool:
        return True


def upload_stream(store: ObjectStore, key: str, src: BinaryIO) -> Meter:
    """Stream ``src`` to ``key``; returns the size and sha256 of what was sent."""
    meter = Meter()
    info = store.save(key, _MeteredReader(src, meter))  # type: ignore[arg-type]
    meter.finish()
    if info.size != meter.size:
        from luxima_backup.errors import VerificationError

        raise VerificationError(f"storage reports {info.size} bytes for {key}, but {meter.size} were sent")
    return meter


@task(name="upload", cache_policy=NO_CACHE)
def upload(source: Link, object_key: str) -> dict[str, Any]:
    """Upload the encrypted stream; a failed or cut-short stream leaves no object behind."""
    try:
        meter = upload_stream(runtime.store(), object_key, source.reader())  # type: ignore[arg-type]
    finally:
        source.close_read()
    return {"key": object_key, "bytes": meter.size, "sha256": meter.hexdigest, "seconds": meter.seconds}


def save_json(store: ObjectStore, key: str, document: dict[str, Any]) -> None:
    store.save_bytes(key, json.dumps(document, indent=2, sort_keys=True).encode(), "application/json")
