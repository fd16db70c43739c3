"""Links between stages: a failure from outside the stages stops them without closing descriptors under them."""

from __future__ import annotations

import os
import threading
from typing import Any, Callable

import pytest

from luxima_backup.errors import IntegrityError, StageAborted
from luxima_backup.pipes import Link


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except BaseException as exc:
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_a_link_aborted_from_outside_stops_a_blocked_reader_and_writer_and_keeps_their_numbers_until_closed() -> None:
    """What the flow does when its own download fails while the stages run: the stage blocked reading and the
    one blocked writing both stop with the failure, and neither descriptor number is freed under them."""
    waiting, full = Link("nothing written yet"), Link("nobody reading")
    reader, read = in_thread(lambda: waiting.reader().read(1 << 20))
    writer, wrote = in_thread(lambda: full.writer().write(b"x" * (8 << 20)))  # more than the pipe holds
    reader.join(0.3)
    writer.join(0.3)
    assert reader.is_alive() and writer.is_alive()  # both blocked
    numbers = [waiting.read_fd, waiting.write_fd, full.read_fd, full.write_fd]

    cause = IntegrityError("the object is not the one its manifest names")
    waiting.abort(cause)
    full.abort(cause)
    reader.join(10)
    writer.join(10)
    assert not reader.is_alive() and not writer.is_alive()
    assert isinstance(read.get("error"), StageAborted) and "IntegrityError" in str(read["error"])
    assert isinstance(wrote.get("error"), StageAborted)
    assert all(is_open(fd) for fd in numbers)  # still ours: no other descriptor can take these numbers yet
    with pytest.raises(StageAborted):
        full.wait_reader()

    for link in (waiting, full):
        link.close_all()
    assert not any(is_open(fd) for fd in numbers)


def test_each_end_is_closed_once_whichever_threads_close_it() -> None:
    """Stages and the flow may close the same end at once; a second close of a number could close a descriptor
    opened meanwhile under it (a database socket), so only one close may reach the system."""
    for _ in range(200):
        link = Link("closed by many")
        start = threading.Barrier(6)
        errors: list[BaseException] = []

        def close() -> None:
            start.wait()
            try:
                link.close_read()
                link.close_write()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=close) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert link.read_fd == link.write_fd == -1
    newcomer = os.open(os.devnull, os.O_RDONLY)  # takes the lowest free number: likely one just closed
    try:
        link.close_all()
        assert is_open(newcomer)
    finally:
        os.close(newcomer)
