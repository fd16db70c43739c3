"""Compression codecs (zstd, gzip): a streaming compressor, and a reader that decompresses and detects truncation."""

from __future__ import annotations

import threading
from typing import Any, Protocol

import zstandard
# zlib-ng: the same deflate format (any gzip reads it), about twice zlib's speed at the same level and ratio
# (measured here: 64 vs 35 MB/s at level 6); gzip is the files' default codec, and its compression sets
# the pace of a first file backup.
from zlib_ng import gzip_ng_threaded, zlib_ng

from .errors import IntegrityError

READ_SIZE = 1 << 20
SUFFIX = {"zstd": "zst", "gzip": "gz"}


class _Compressor(Protocol):
    def compress(self, data: bytes) -> bytes: ...
    def flush(self) -> bytes: ...


def compressor(codec: str, level: int, threads: int = 0) -> _Compressor:
    """A streaming compressor. ``threads``: 0 one per core (zstd; gzip stays on one), 1 none besides the caller's,
    2 or more that many."""
    if codec == "zstd":
        # write_checksum: the frame carries its own xxhash, a second line of defence on restore.
        # job_size: each worker holds about two jobs of input and output. Measured on a 300 MB dump, two
        # workers: 1 MiB jobs 11 MiB of memory, 2 MiB 18 MiB (the level's default ~70), same speed and size;
        # 512 KiB (zstd's least) 8 MiB but 30 % slower.
        # zstd's own "threads = 1" is one worker thread beside the caller, with its job buffers: 1 here means
        # none (zstd's 0), for the small streams (a file index, the globals) that gain nothing from one.
        workers = -1 if threads == 0 else (0 if threads == 1 else threads)
        params = zstandard.ZstdCompressionParameters.from_level(
            level, threads=workers, job_size=1 << 20, write_checksum=1
        )
        return zstandard.ZstdCompressor(compression_params=params).compressobj()
    if codec == "gzip":
        # Threads only when asked for (threads > 1): they pay off with cores to spare. On 2 cores, where a
        # file backup's other stages keep the second one busy, a 1 GB first backup ran no faster (29.3 s
        # against 29.9 s) and peaked 37 MiB higher.
        if threads > 1:
            return _ThreadedGzip(level, threads)
        return zlib_ng.compressobj(level, zlib_ng.DEFLATED, 31)  # wbits 31: gzip container
    raise ValueError(f"unknown compression {codec!r}")


class _ThreadedGzip:
    """One gzip stream whose 1 MiB blocks are compressed by several threads (zlib-ng's pigz-like writer, each block
    primed with the previous one's last 32 KiB), behind the compressobj interface. Measured here on a 1 GB tree's
    tar: 8.2 s with two threads against 15.7 s with one, the same size within 0.001 %; memory +15 MiB."""

    class _Sink:
        """The file the writer's output thread writes the compressed stream to."""

        def __init__(self) -> None:
            self.lock = threading.Lock()
            self.parts: list[bytes] = []

        def write(self, data: bytes) -> int:
            with self.lock:
                self.parts.append(bytes(data))
            return len(data)

        def flush(self) -> None:
            pass

        def close(self) -> None:
            pass

        def take(self) -> bytes:
            with self.lock:
                out, self.parts = b"".join(self.parts), []
            return out

    def __init__(self, level: int, threads: int):
        self._sink = self._Sink()
        self._gz = gzip_ng_threaded.open(self._sink, "wb", compresslevel=level, threads=threads, block_size=1 << 20)

    def compress(self, data: bytes) -> bytes:
        self._gz.write(data)  # a compressing thread's error is raised here, or at flush
        return self._sink.take()

    def flush(self) -> bytes:
        self._gz.close()
        return self._sink.take()


class DecompressingReader:
    """Readable plaintext from a readable compressed stream, in pieces of at most ``READ_SIZE``; a cut-short stream
    raises at EOF.

    Memory stays bounded whatever the ratio: 512 MiB of zeros is 18 KiB of zstd, and a decompressor handed that
    at once returns all 512 MiB (measured: +1 GiB of RSS). zstd is read through a streaming reader that fills
    at most the buffer asked for, beside a walk of the frame's block headers that tells a whole stream from a
    cut one (the reader itself does not); gzip through ``max_length``.
    """

    def __init__(self, src: Any, codec: str):
        self._src = src
        self._codec = codec
        if codec == "zstd":
            self._frames = _ZstdFrames()
            self._zstd = zstandard.ZstdDecompressor().stream_reader(
                _Watched(src, self._frames), read_size=READ_SIZE, read_across_frames=False, closefd=False)
        elif codec == "gzip":
            self._obj = zlib_ng.decompressobj(wbits=31)
            self._tail = b""
        else:
            raise ValueError(f"unknown compression {codec!r}")
        self._eof = False

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (at most ``READ_SIZE`` at once); with no ``n``, the rest of the stream, as a file reads
        (for small objects only: a globals dump, an index in a test)."""
        if n is None or n < 0:
            return b"".join(iter(lambda: self.read(READ_SIZE), b""))
        if self._eof or n == 0:
            return b""
        size = min(n, READ_SIZE)
        try:
            out = self._read_zstd(size) if self._codec == "zstd" else self._read_gzip(size)
        except (zstandard.ZstdError, zlib_ng.error) as exc:
            raise IntegrityError(f"{self._codec} data is corrupt: {exc}") from None
        if not out:
            self._eof = True
        return out

    def _read_zstd(self, size: int) -> bytes:
        out = self._zstd.read(size)
        if not out:
            if not self._frames.whole():
                raise IntegrityError("zstd stream ends before its end marker: the backup is truncated")
            if self._frames.extra or self._src.read(1):
                raise IntegrityError("unexpected data after the end of the zstd stream")
        return out

    def _read_gzip(self, size: int) -> bytes:
        while True:
            if self._obj.eof:
                if self._obj.unused_data or self._tail or self._src.read(1):
                    raise IntegrityError("unexpected data after the end of the gzip stream")
                return b""
            data = self._tail or self._src.read(READ_SIZE)
            if not data:
                raise IntegrityError("gzip stream ends before its end marker: the backup is truncated")
            out = self._obj.decompress(data, size)
            self._tail = self._obj.unconsumed_tail
            if out:
                return out

    def readable(self) -> bool:
        return True


class _Watched:
    """Passes a compressed stream to the zstd reader while the frame walk sees every byte of it."""

    def __init__(self, src: Any, frames: "_ZstdFrames"):
        self._src, self._frames = src, frames

    def read(self, n: int = -1) -> bytes:
        data = self._src.read(n)
        self._frames.feed(data)
        return data


class _ZstdFrames:
    """Walks zstd frames by their headers (RFC 8878 §3.1), without decompressing: knows whether the stream read so
    far ends exactly after a whole frame, its last block and checksum included."""

    _MAGIC = 0xFD2FB528

    def __init__(self) -> None:
        self._buf = bytearray()
        self._skip = 0          # bytes of the current block (or checksum, or skippable frame) still to pass
        self._state = "magic"   # magic | header | block | checksum
        self._checksum = False
        self._last = False
        self.frames = 0
        self.extra = False      # bytes after the first whole frame

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._skip:
                step = min(self._skip, len(view))
                self._skip -= step
                view = view[step:]
                if not self._skip:
                    self._after_skip()
                continue
            if self.frames and self._state == "magic":
                self.extra = True  # one frame per stream: anything after it is not ours
                return
            self._buf += view[:1]
            view = view[1:]
            self._parse()

    def _after_skip(self) -> None:
        if self._state == "block" and self._last:
            self._state = "checksum" if self._checksum else "magic"
            if self._state == "checksum":
                self._skip = 4
            else:
                self.frames += 1
        elif self._state == "checksum":
            self._state = "magic"
            self.frames += 1

    def _parse(self) -> None:
        b = self._buf
        if self._state == "magic" and len(b) == 4:
            if int.from_bytes(b, "little") != self._MAGIC:
                raise IntegrityError("zstd data is corrupt: not a zstd frame")
            self._state, self._buf = "header", bytearray()
        elif self._state == "header" and b:
            fhd = b[0]
            fcs_flag, single, did_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
            need = 1 + (0 if single else 1) + (0, 1, 2, 4)[did_flag] + ((1 if single else 0), 2, 4, 8)[fcs_flag]
            if len(b) == need:
                self._checksum = bool((fhd >> 2) & 1)
                self._state, self._buf = "block", bytearray()
        elif self._state == "block" and len(b) == 3:
            header = int.from_bytes(b, "little")
            self._last, kind, size = bool(header & 1), (header >> 1) & 3, header >> 3
            if kind == 3:
                raise IntegrityError("zstd data is corrupt: reserved block type")
            self._buf = bytearray()
            self._skip = 1 if kind == 1 else size
            if not self._skip:
                self._after_skip()

    def whole(self) -> bool:
        return self.frames >= 1 and self._state == "magic" and not self._buf and not self._skip
