"""Verify a stored config archive: read back against its own index and what the fetch recorded."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from luxima_backup import runtime
from luxima_backup.compression import DecompressingReader
from luxima_backup.envelope import DecryptingReader
from luxima_backup.errors import IntegrityError, VerificationError
from luxima_backup.keys import KeyProvider
from luxima_backup.pipes import Meter, MeteredReader, drain
from luxima_backup.storage import ObjectStore
from tasks.verify.readback import compare, confirm_stored


def check_config_archive(store: ObjectStore, key: str, provider: KeyProvider, codec: str, expected: dict[str, Any]) -> dict[str, Any]:
    """Read a stored config archive back: ciphertext sha256, every chunk authenticated, every member against the
    archive's own index, and the index against what the fetch recorded (host, counts, content digest)."""
    from luxima_backup.config_archive import read_members

    info = store.stat(key)
    if info.size != expected["encrypted_bytes"]:
        raise VerificationError(f"{key}: stored size {info.size} != {expected['encrypted_bytes']} bytes uploaded")
    sealed, plain = Meter(), Meter()
    index: dict[str, Any] = {}
    files = 0
    with store.load(key) as body:
        tar_stream = MeteredReader(DecompressingReader(DecryptingReader(MeteredReader(body, sealed), provider.unwrap), codec), plain)  # type: ignore[arg-type]
        try:
            for member in read_members(tar_stream, index):  # type: ignore[arg-type]
                files += member.data is not None
        except IntegrityError as exc:
            raise VerificationError(f"{key}: {exc}") from None
        drain(tar_stream)
    compare(key, "sha256 of the stored object", sealed.hexdigest, expected["encrypted_sha256"])
    compare(key, "sha256 of the tar stream", plain.hexdigest, expected["plain_sha256"])
    compare(key, "host in the index", index.get("host"), expected["host"])
    compare(key, "content digest in the index", index.get("content_digest"), expected["content_digest"])
    if files != expected["files"]:
        raise VerificationError(f"{key}: {files} files in the archive, the fetch stored {expected['files']}")
    return {"size": info.size, "sha256": sealed.hexdigest, "tar_sha256": plain.hexdigest, "files_checked": files, "deep": True}


@task(name="verify-config-archive", cache_policy=NO_CACHE, persist_result=False, **runtime.TRANSIENT_RETRIES)
def verify_config_archive(object_key: str, codec: str, expected: dict[str, Any], deep: bool) -> dict[str, Any]:
    """Check the stored config archive: stored as sent (see ``confirm_stored``); deep: read back, decrypted,
    decompressed, every file's sha256."""
    settings = runtime.settings()
    store = runtime.config_store(settings)
    if deep:
        result = check_config_archive(store, object_key, runtime.key_provider(settings), codec, expected)
    else:
        result = confirm_stored(store, object_key, expected["encrypted_bytes"], expected["encrypted_sha256"],
                                expected.get("proven_etag"))
    get_run_logger().info("verified %s (%s)", object_key, "deep" if deep else "size and sha256")
    return result
