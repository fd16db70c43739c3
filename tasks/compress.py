"""Compression stage: zstd (default, multi-threaded) or gzip, streamed with bounded memory."""

from __future__ import annotations

from typing import Any, BinaryIO

from prefect import task
from prefect.cache_policies import NO_CACHE

from luxima_backup.compression import READ_SIZE, DecompressingReader, compressor
from luxima_backup.pipes import TRIM_EVERY, Link, Meter, copy, release_free_memory, stage


def compress_stream(src: BinaryIO, dst: Any, codec: str, level: int, threads: int = 0,
                    progress: Any = None) -> tuple[Meter, Meter]:
    """Compress ``src`` to EOF into ``dst``; returns meters of the plain input and compressed output."""
    plain, packed = Meter(progress=progress), Meter()
    comp = compressor(codec, level, threads)
    trim_at = TRIM_EVERY
    while True:
        block = src.read(READ_SIZE)
        if not block:
            break
        plain.update(block)
        if plain.size >= trim_at:
            release_free_memory()
            trim_at += TRIM_EVERY
        out = comp.compress(block)
        if out:
            packed.update(out)
            dst.write(out)
    out = comp.flush()
    packed.update(out)
    dst.write(out)
    return plain.finish(), packed.finish()


@task(name="compress", cache_policy=NO_CACHE, persist_result=False)
def compress(source: Link, sink: Link, codec: str, level: int, threads: int, progress: Any = None) -> dict[str, Any]:
    """Compress the dump stream on its way to encryption."""
    with stage(source, sink):
        plain, packed = compress_stream(source.reader(), sink.writer(), codec, level, threads, progress)
    return {
        "codec": codec, "level": level,
        "plain_bytes": plain.size, "plain_sha256": plain.hexdigest,
        "compressed_bytes": packed.size, "seconds": plain.seconds,
    }


def decompress_stream(src: Any, dst: Any | None, codec: str, progress: Any = None) -> Meter:
    """Decompress ``src`` to EOF into ``dst`` (or nowhere, only metering); returns the plaintext meter."""
    return copy(DecompressingReader(src, codec), dst, Meter(progress=progress), READ_SIZE)


@task(name="decompress", cache_policy=NO_CACHE, persist_result=False)
def decompress(source: Link, codec: str, sink: Link | None = None, progress: Any = None) -> dict[str, Any]:
    """Decompress the decrypted stream: into the next stage, or only to check it."""
    with stage(source, sink):
        plain = decompress_stream(source.reader(), sink.writer() if sink else None, codec, progress)
    return {"plain_bytes": plain.size, "plain_sha256": plain.hexdigest, "seconds": round(plain.seconds, 3)}
