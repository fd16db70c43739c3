"""Download stage: a stored backup object, checked against its manifest as it comes.

A database restore streams it straight into the decryption stage (``download_stream``). Restores
that read an object twice fetch it once into a private spool file (``download``), which holds
ciphertext only and lives in a private temporary directory removed in all cases.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Mapping

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from luxima_backup import runtime
from luxima_backup.envelope import check_binding, read_preamble
from luxima_backup.errors import IntegrityError
from luxima_backup.pipes import Link, Meter, copy, stage
from luxima_backup.storage import ObjectStore

READ_SIZE = 1 << 20


def download_to_file(store: ObjectStore, key: str, path: Path, expected_size: int, expected_sha256: str,
                     expect: Mapping[str, str] | None = None) -> Meter:
    """Copy ``key`` to ``path`` (created 0600), checked as ``fetch_checked`` checks it."""
    with open(path, "wb", opener=_private) as out:
        return fetch_checked(store, key, out, expected_size, expected_sha256, expect)


def fetch_checked(store: ObjectStore, key: str, out: Any, expected_size: int, expected_sha256: str,
                  expect: Mapping[str, str] | None = None) -> Meter:
    """Copy ``key`` into ``out``; its size and sha256 must equal the manifest's, and its encryption header must
    name the backup the manifest expects (``expect``): checked on the first bytes, before the rest comes."""
    with store.load(key) as body:
        meter = Meter()
        if expect is not None:
            first = body.read(READ_SIZE)  # the header is at most 64 KiB: within the first read
            check_binding(read_preamble(io.BytesIO(first))[0], expect, key)
            meter.update(first)
            out.write(first)
        meter = copy(body, out, meter, READ_SIZE)
    if meter.size != expected_size:
        raise IntegrityError(f"{key} is {meter.size} bytes in storage; its manifest says {expected_size}",
                             hint="the object was truncated or replaced after the backup; restore another backup")
    if meter.hexdigest != expected_sha256:
        raise IntegrityError(f"{key} has sha256 {meter.hexdigest}; its manifest says {expected_sha256}",
                             hint="the object was altered after the backup; restore another backup")
    return meter


def _private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


@task(name="download", cache_policy=NO_CACHE, persist_result=False, **runtime.TRANSIENT_RETRIES)
def download(object_key: str, spool: str, expected_size: int, expected_sha256: str, configs: bool = False,
             expect: dict[str, str] | None = None) -> dict[str, Any]:
    """Fetch the encrypted backup into the private spool and check its size, sha256 and header's binding (``configs``:
    from the config archive storage)."""
    store = runtime.config_store() if configs else runtime.store()
    meter = download_to_file(store, object_key, Path(spool), expected_size, expected_sha256, expect)
    get_run_logger().info("downloaded %s (%d bytes, sha256 matches the manifest)", object_key, meter.size)
    return {"key": object_key, "bytes": meter.size, "sha256": meter.hexdigest, "seconds": round(meter.seconds, 3)}


@task(name="download-stream", cache_policy=NO_CACHE, persist_result=False)
def download_stream(object_key: str, sink: Link, expected_size: int, expected_sha256: str,
                    expect: dict[str, str] | None = None) -> dict[str, Any]:
    """Stream the encrypted backup from storage into the next stage, checked as it passes (no spool).

    Not retried on its own: a stream cannot resume halfway into stages that already consumed it; the
    caller starts the whole pass over instead.
    """
    with stage(None, sink):
        meter = fetch_checked(runtime.store(), object_key, sink.writer(), expected_size, expected_sha256, expect)
    return {"key": object_key, "bytes": meter.size, "sha256": meter.hexdigest, "seconds": round(meter.seconds, 3)}
