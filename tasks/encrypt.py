"""Encryption stage: AES-256-GCM chunks under a fresh data key wrapped by the key provider."""

from __future__ import annotations

from typing import Any, BinaryIO

from prefect import task
from prefect.cache_policies import NO_CACHE

from luxima_backup import procs, runtime
from luxima_backup.envelope import Encryptor
from luxima_backup.errors import StageAborted
from luxima_backup.keys import DataKey
from luxima_backup.pipes import Link, Meter, stage
from luxima_backup.recovery import header_seal

READ_SIZE = 1 << 20


def encrypt_stream(src: BinaryIO, dst: Any, data_key: DataKey, chunk_size: int, info: dict[str, Any] | None = None) -> tuple[Meter, Meter]:
    """Encrypt ``src`` to EOF into ``dst``; returns meters of the input and the ciphertext."""
    enc = Encryptor(data_key.plaintext, data_key.wrapped, chunk_size, info)
    plain, sealed = Meter(), Meter()

    def emit(data: bytes) -> None:
        if data:
            sealed.update(data)
            dst.write(data)

    emit(enc.header())
    while True:
        block = src.read(READ_SIZE)
        if not block:
            break
        plain.update(block)
        emit(enc.update(block))
    emit(enc.finalize())
    return plain.finish(), sealed.finish()


class _Both:
    """Writes each block to two links in turn: the upload and a check reading the same ciphertext beside it."""

    def __init__(self, first: Any, second: Any):
        self.first, self.second = first, second

    def write(self, data: bytes) -> int:
        self.first.write(data)
        return self.second.write(data)


@task(name="encrypt", cache_policy=NO_CACHE, persist_result=False)
def encrypt(source: Link, sink: Link, content: str, binding: dict[str, str], copy: Link | None = None) -> dict[str, Any]:
    """Encrypt the compressed stream with a new data key before it leaves the machine; its header names the backup,
    target and key it is written for (``binding``), so it is refused anywhere else.

    ``copy``: the ciphertext goes to that link too, for a check of it while it uploads. The upload's stream is
    declared complete only once that check has passed: an upload whose check fails is aborted, never an object.
    """
    with stage(source, sink, copy):
        settings = runtime.settings()
        # A new data key per object: one leaked key exposes one backup, never the history.
        data_key = runtime.key_provider(settings).new_data_key()
        out = sink.writer() if copy is None else _Both(sink.writer(), copy.writer())
        plain, sealed = encrypt_stream(
            source.reader(), out, data_key, settings.keys.chunk_kib * 1024,
            {"content": content, **binding, **header_seal(settings.keys.recovery_public_key, data_key.plaintext, binding["object"])}
        )
        if copy is not None:
            copy.succeed()
            copy.close_write()
            with procs.cancellable(lambda: copy.reader_done(StageAborted(f"{copy.name} was stopped"))):
                copy.wait_reader()
    return {
        "format": "LXB1", "chunk_size": settings.keys.chunk_kib * 1024,
        "key": data_key.wrapped.to_json(), "plain_bytes": plain.size,
        "encrypted_bytes": sealed.size, "encrypted_sha256": sealed.hexdigest, "seconds": plain.seconds, "bound": True,
        "recovery_key_id": _recovery_id(settings.keys.recovery_public_key),
    }


def _recovery_id(public_text: str | None) -> str | None:
    from luxima_backup.recovery import fingerprint, load_public

    return fingerprint(load_public(public_text)) if public_text else None

