"""Compression codecs: what the stages write is what standard tools read, and a cut-short stream is refused."""

from __future__ import annotations

import io
import os
import subprocess

import pytest

from luxima_backup.compression import DecompressingReader, compressor
from luxima_backup.errors import IntegrityError


def _packed(codec: str, threads: int, data: bytes) -> bytes:
    comp = compressor(codec, 6 if codec == "gzip" else 3, threads)
    out = [comp.compress(data[i:i + 700_001]) for i in range(0, len(data), 700_001)]  # blocks across its 1 MiB ones
    return b"".join(out) + comp.flush()


@pytest.mark.parametrize("codec,threads,tool", [("gzip", 0, "gzip"), ("gzip", 2, "gzip"), ("zstd", 0, "zstd")])
def test_a_stream_written_by_the_stage_is_read_by_the_standard_tool_and_by_the_restore(codec: str, threads: int,
                                                                                          tool: str) -> None:
    """Several threads compress gzip blocks, yet the stream is one gzip member any gzip reads: backups restore by
    hand (``luxima-backup decrypt`` then ``tar xz``)."""
    data = os.urandom(3 << 20) + b"user uploads, json and text " * 200_000 + os.urandom(1000)
    packed = _packed(codec, threads, data)
    assert subprocess.run([tool, "-dc"], input=packed, capture_output=True, check=True).stdout == data
    reader = DecompressingReader(io.BytesIO(packed), codec)
    assert b"".join(iter(lambda: reader.read(1 << 20), b"")) == data
    assert DecompressingReader(io.BytesIO(packed), codec).read() == data  # read(): the whole rest, as a file's
    cut = DecompressingReader(io.BytesIO(packed[:-20]), codec)
    with pytest.raises(IntegrityError, match="truncated"):
        while cut.read(1 << 20):
            pass


@pytest.mark.parametrize("codec", ["zstd", "gzip"])
def test_a_stream_of_any_ratio_comes_out_in_bounded_pieces_and_a_cut_anywhere_is_refused(codec: str) -> None:
    """256 MiB of zeros (a sparse file, an empty column) is a few KiB of zstd: it comes out in pieces of at most what
    was asked for, never all at once (memory stays flat whatever the data). Cut at any point, or with bytes after
    its end, the stream is refused."""
    comp = compressor(codec, 3 if codec == "zstd" else 6, 1)
    zeros = bytes(1 << 20)
    packed = b"".join([*(comp.compress(zeros) for _ in range(256)), comp.flush()])
    assert len(packed) < 2 << 20
    reader = DecompressingReader(io.BytesIO(packed), codec)
    total, largest = 0, 0
    while True:
        piece = reader.read(1 << 20)
        if not piece:
            break
        total, largest = total + len(piece), max(largest, len(piece))
    assert total == 256 << 20 and largest <= 1 << 20
    for cut in sorted({1, 3, 4, 9, len(packed) // 2, len(packed) - 1}):
        damaged = DecompressingReader(io.BytesIO(packed[:cut]), codec)
        with pytest.raises(IntegrityError):
            while damaged.read(1 << 20):
                pass
    extra = DecompressingReader(io.BytesIO(packed + b"\0"), codec)
    with pytest.raises(IntegrityError):
        while extra.read(1 << 20):
            pass
