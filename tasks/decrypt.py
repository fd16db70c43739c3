"""Decryption stage: the ciphertext (streamed from storage, or spooled) into a stream of (compressed) plaintext.

Each chunk is released only once it authenticates; a truncated, reordered or altered object
fails here, and the stages downstream see a failure, never a clean end of stream.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, BinaryIO

from prefect import task
from prefect.cache_policies import NO_CACHE

from luxima_backup import runtime
from luxima_backup.envelope import DecryptingReader, UnwrapFn
from luxima_backup.pipes import Link, Meter, copy, stage

READ_SIZE = 1 << 20


def decrypt_stream(src: BinaryIO, dst: Any, unwrap: UnwrapFn) -> tuple[Meter, dict[str, Any]]:
    """Decrypt ``src`` to EOF into ``dst``; returns a meter of the plaintext and the header's key."""
    reader = DecryptingReader(src, unwrap)
    return copy(reader, dst, Meter(), READ_SIZE), reader.header.key.to_json()


@task(name="decrypt", cache_policy=NO_CACHE, persist_result=False)
def decrypt(source: str | Link, sink: Link) -> dict[str, Any]:
    """Decrypt the backup (a spool file, or the stream of the download stage), authenticating every chunk,
    into the next stage."""
    streamed = source if isinstance(source, Link) else None
    with stage(streamed, sink):
        provider = runtime.key_provider()
        with (contextlib.nullcontext(streamed.reader()) if streamed else open(Path(str(source)), "rb")) as src:
            plain, key = decrypt_stream(src, sink.writer(), provider.unwrap)
    key.pop("wrapped", None)
    return {"compressed_bytes": plain.size, "key": key, "seconds": round(plain.seconds, 3)}
