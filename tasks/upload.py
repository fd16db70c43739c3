"""Upload stage: the ciphertext stream into object storage as one multipart upload."""

from __future__ import annotations

from typing import Any, BinaryIO

from prefect import task
from prefect.cache_policies import NO_CACHE

from luxima_backup import runtime
from luxima_backup.pipes import Link, Meter, MeteredReader
from luxima_backup.storage import ObjectInfo, ObjectStore


def upload_stream(store: ObjectStore, key: str, src: BinaryIO) -> tuple[Meter, ObjectInfo]:
    """Stream ``src`` to ``key``; returns the size and sha256 of what was sent, and what storage says it holds."""
    meter = Meter()
    info = store.save(key, MeteredReader(src, meter))  # type: ignore[arg-type]
    meter.finish()
    if info.size != meter.size:
        from luxima_backup.errors import VerificationError

        raise VerificationError(f"storage reports {info.size} bytes for {key}, but {meter.size} were sent")
    return meter, info


@task(name="upload", cache_policy=NO_CACHE, persist_result=False)
def upload(source: Link, object_key: str, configs: bool = False) -> dict[str, Any]:
    """Upload the encrypted stream; a failed or cut-short stream leaves no object behind.

    ``configs``: to the config archive storage ([configs.storage], by default the same as [storage]).
    """
    store = runtime.config_store() if configs else runtime.store()
    try:
        meter, info = upload_stream(store, object_key, source.reader())  # type: ignore[arg-type]
    finally:
        source.close_read()
    # proven_etag: storage's digest of what it received matched what was sent (the verify then needs no download)
    return {"key": object_key, "bytes": meter.size, "sha256": meter.hexdigest, "seconds": meter.seconds,
            "proven_etag": info.etag if info.proven else None}

