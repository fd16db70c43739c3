"""Links between concurrent streaming stages: an OS pipe plus the writer's verdict.

A reader that hits end-of-stream cannot tell a finished writer from a crashed one; a backup
must never take a cut-short stream as complete. So every link carries the writer's verdict,
and its reader, at EOF, waits for that verdict and raises ``StageAborted`` unless the writer
declared success. A failed reader closes its end, so the writer's next write fails with
EPIPE and the failure travels upstream too (pg_dump gets SIGPIPE).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from .errors import StageAborted

PIPE_SIZE = 1 << 20  # fewer context switches than the 64 KiB default
# Bytes through a stage between two returns of freed heap memory to the system: every 16 MiB took the
# peak of a 1 GB deep-verified backup from 207 to 195 MiB (128 MiB: no effect on the peak), at no measurable cost.
TRIM_EVERY = 16 << 20
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class Link:
    """One-way pipe from a writer stage to a reader stage, within one process."""

    def __init__(self, name: str):
        self.name = name
        self.read_fd, self.write_fd = os.pipe()
        try:
            fcntl.fcntl(self.write_fd, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # the system limit may be lower; the default size still works
        self._verdict = threading.Event()
        self._error: BaseException | None = None
        # Each end is closed exactly once, whichever threads ask: a second close of the same number could close
        # a descriptor another thread has opened since under that number (a database socket, another pipe).
        self._ends = threading.Lock()
        # The reader's outcome, for a writer that must not call its own output good before its reader has judged
        # the stream (a check running beside an upload): see ``reader_done`` and ``wait_reader``.
        self._reader_verdict = threading.Event()
        self._reader_error: BaseException | None = None

    def __repr__(self) -> str:
        return f"Link({self.name!r})"

    # -- writer side --
    def writer(self) -> "LinkWriter":
        return LinkWriter(self)

    def take_write_fd(self) -> int:
        """Hand the write end to a child process's stdout; this process keeps no copy after ``close_write``."""
        return self._fd(self.write_fd)

    def _fd(self, fd: int) -> int:
        # A closed end must never reach a syscall or Popen (where -1 would mean "make a new pipe").
        if fd < 0:
            raise StageAborted(f"{self.name} was closed: a neighbouring stage failed")
        return fd

    def _release(self, end: str) -> None:
        with self._ends:
            fd = getattr(self, end)
            setattr(self, end, -1)
        if fd >= 0:
            os.close(fd)

    def close_write(self) -> None:
        self._release("write_fd")

    def succeed(self) -> None:
        self._verdict.set()

    def fail(self, exc: BaseException) -> None:
        if not self._verdict.is_set():
            self._error = exc
            self._verdict.set()
        self.close_write()
        self.reader_done(exc)  # a reader that never started (or will not finish) must not be waited for

    def wait_reader(self) -> None:
        """Block until the reader has judged the whole stream; raise if it failed."""
        self._reader_verdict.wait()
        if self._reader_error is not None:
            raise StageAborted(f"the stage reading {self.name} failed: {type(self._reader_error).__name__}")

    # -- reader side --
    def reader(self) -> "LinkReader":
        return LinkReader(self)

    def take_read_fd(self) -> int:
        """Hand the read end to a child process's stdin; close ours with ``close_read`` after."""
        return self._fd(self.read_fd)

    def close_read(self) -> None:
        self._release("read_fd")

    def abort(self, exc: BaseException) -> None:
        """Fail the link from outside its stages, while they may still be using its ends.

        Closing an end here would free its number while a stage may be about to read or write (or splice)
        through it, and the number may meanwhile name a new descriptor. So each end is replaced in place: the
        read end by one that reads an end of stream (the reader then finds the failure as its verdict), the
        write end by a broken pipe (the writer's next write fails). Their numbers are closed once, later.
        """
        if not self._verdict.is_set():
            self._error = exc
            self._verdict.set()
        self.reader_done(exc)
        with self._ends:
            if self.read_fd >= 0:
                null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
                os.dup2(null, self.read_fd, inheritable=False)
                os.close(null)
            if self.write_fd >= 0:
                r, w = os.pipe()
                os.close(r)
                os.dup2(w, self.write_fd, inheritable=False)
                os.close(w)

    def reader_done(self, exc: BaseException | None = None) -> None:
        """The reader's verdict on the stream (the first one counts)."""
        if not self._reader_verdict.is_set():
            self._reader_error = exc
            self._reader_verdict.set()

    def wait_verdict(self) -> None:
        """Block until the writer has declared its outcome; raise if it failed."""
        self._verdict.wait()
        if self._error is not None:
            raise StageAborted(f"upstream of {self.name} failed: {type(self._error).__name__}")

    def close_all(self) -> None:
        self.close_read()
        self.close_write()


class LinkWriter:
    """File-like writer into a link; a closed reader surfaces as ``StageAborted``."""

    def __init__(self, link: Link):
        self.link = link

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data)
        total = len(view)
        try:
            while view:
                n = os.write(self.link._fd(self.link.write_fd), view)
                view = view[n:]
        except BrokenPipeError:
            raise StageAborted(f"the stage reading {self.link.name} stopped") from None
        return total

    def flush(self) -> None:
        pass


class LinkReader:
    """File-like reader of a link; EOF counts only once the writer has declared success."""

    def __init__(self, link: Link):
        self.link = link

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes, fewer only at the end of the stream (as a buffered file would).

        Consumers such as s3transfer take a short read as a short part, and S3 rejects parts
        under 5 MiB, so partial pipe reads are joined here.
        """
        if n is None or n < 0:
            return b"".join(iter(lambda: self.read(PIPE_SIZE), b""))
        # Read straight into the one bytes object returned: a BufferedReader whose buffer is a single byte fills
        # the result of read(n) by repeated reads of the pipe, stopping at n or at EOF, and reads nothing ahead.
        # (Joining pieces held an upload part twice for a moment: 8 MiB more at the peak of an S3 backup.)
        with io.FileIO(self.link._fd(self.link.read_fd), "rb", closefd=False) as raw:
            data = io.BufferedReader(raw, buffer_size=1).read(n)
        if len(data) < n:
            self.link.wait_verdict()
        return data

    def readinto(self, buf: bytearray | memoryview) -> int:
        n = os.readv(self.link._fd(self.link.read_fd), [buf])
        if n == 0:
            self.link.wait_verdict()
        return n

    def readable(self) -> bool:
        return True


@dataclass
class Meter:
    """Counts and hashes bytes as they pass; a pgBackRest-style filter that reports at the end."""

    hash_name: str = "sha256"
    size: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    progress: Any = None  # a luxima_backup.progress.Progress told of the bytes as they pass

    def __post_init__(self) -> None:
        self._hash = hashlib.new(self.hash_name)

    def update(self, data: bytes | memoryview) -> None:
        self.size += len(data)
        self._hash.update(data)
        if self.progress is not None:
            self.progress.tick(self.size)

    def finish(self) -> "Meter":
        self.finished = time.monotonic()
        if self.progress is not None:
            self.progress.finish(self.size)
        return self

    @property
    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    @property
    def seconds(self) -> float:
        return (self.finished or time.monotonic()) - self.started


class MeteredReader:
    """A reader that passes bytes through unchanged and meters exactly what was read."""

    def __init__(self, src: Any, meter: Meter):
        self._src = src
        self.meter = meter

    def read(self, n: int = -1) -> bytes:
        data = self._src.read(n)
        self.meter.update(data)
        return data

    def readable(self) -> bool:
        return True


@contextlib.contextmanager
def stage(source: Link | None, *sinks: Link | None) -> Iterator[None]:
    """Run the body as a stage between links (one source, one sink or more).

    On failure each sink carries the error downstream (its reader never sees a clean end); on
    success they are declared complete and closed. The source's read end is closed either way,
    so a writer upstream of a failed stage stops with EPIPE instead of blocking.
    """
    outputs = [s for s in sinks if s is not None]
    try:
        yield
    except BaseException as exc:
        for sink in outputs:
            sink.fail(exc)
        raise
    finally:
        if source is not None:
            source.close_read()
    for sink in outputs:
        sink.succeed()
        sink.close_write()


@contextlib.contextmanager
def judged(source: Link) -> Iterator["LinkReader"]:
    """Read ``source`` as a check whose writer waits for its verdict (``Link.wait_reader``): the verdict is given
    when the body ends, a failure as a failure, and the read end is closed either way."""
    try:
        yield source.reader()
    except BaseException as exc:
        source.reader_done(exc)
        raise
    finally:
        source.reader_done(None)  # the first verdict counts: a failure given above stays
        source.close_read()


def drain(src: Any, block_size: int = 1 << 20) -> None:
    """Read ``src`` to its end, discarding it: what follows the part a consumer needed must still
    authenticate (and hash, when ``src`` meters)."""
    while src.read(block_size):
        pass


def copy(src: Any, dst: Any | None, meter: Meter, block_size: int = 1 << 20) -> Meter:
    """Copy ``src`` to EOF into ``dst`` (or nowhere), metering every byte; returns the finished meter."""
    while True:
        block = src.read(block_size)
        if not block:
            break
        meter.update(block)
        if dst is not None:
            dst.write(block)
    return meter.finish()


_libc: Any = None


def release_free_memory() -> None:
    """Hand freed heap pages back to the system (glibc ``malloc_trim``); a no-op elsewhere.

    Streaming stages in several threads allocate and free 1 MiB blocks by the thousand; glibc
    serves them from per-thread arenas, and the holes left between live blocks make the
    process grow with the amount of data streamed (measured: +80 MiB per GB with zstd),
    though nothing is held. Trimming every ``TRIM_EVERY`` bytes keeps it flat at a cost of
    well under a millisecond per call.
    """
    global _libc
    if _libc is None:
        try:
            import ctypes
            import ctypes.util

            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc = lib if hasattr(lib, "malloc_trim") else False
        except OSError:
            _libc = False
    if _libc:
        _libc.malloc_trim(0)
