"""Child processes (pg_dump, pg_restore, rsync, git, ssh): a minimal environment, and one registry of the live ones.

A child gets only what it needs: never the Vault secret_id, S3 keys or database passwords this
process holds in its environment. Every child started here is registered, so a run that is
interrupted, killed by SIGTERM or past its time limit can stop them all (``stop_all``) instead
of leaving a pg_dump holding locks on the production database.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import weakref
import contextlib
from typing import Any, Callable, Iterator

# Variables a client tool may legitimately need; nothing that can carry a credential.
_PASSED = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TZ", "TMPDIR")

_lock = threading.Lock()
_live: "weakref.WeakSet[subprocess.Popen[Any]]" = weakref.WeakSet()
_cancels: dict[int, Callable[[], None]] = {}


def minimal_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's locale, PATH and HOME, plus ``extra``: the whole environment a child gets."""
    env = {k: os.environ[k] for k in _PASSED if k in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.update(extra or {})
    return env


def popen(args: list[str], *, env: dict[str, str] | None = None, **kw: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen`` with a minimal environment (``env`` is added to it), registered for ``stop_all``."""
    proc: subprocess.Popen[Any] = subprocess.Popen(args, env=minimal_env(env), **kw)
    with _lock:
        _live.add(proc)
    return proc


def run(args: list[str], *, input: bytes | None = None, timeout: float | None = None, env: dict[str, str] | None = None,
        stdin: Any = None, capture_output: bool = True, **kw: Any) -> subprocess.CompletedProcess[bytes]:
    """``subprocess.run`` (never ``check``) through ``popen``: minimal environment, registered, killed on timeout."""
    if input is not None:
        stdin = subprocess.PIPE
    elif stdin is None:
        stdin = subprocess.DEVNULL
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE} if capture_output else {}
    with popen(args, env=env, stdin=stdin, **pipes, **kw) as proc:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


@contextlib.contextmanager
def cancellable(cancel: Callable[[], None]) -> Iterator[None]:
    """Within this block ``stop_all`` also calls ``cancel`` (e.g. a database connection's cancel of a query that
    waits on a lock): work that is not a child process must stop too, or the run cannot end."""
    token = id(cancel)
    with _lock:
        _cancels[token] = cancel
    try:
        yield
    finally:
        with _lock:
            _cancels.pop(token, None)


def live() -> list[subprocess.Popen[Any]]:
    with _lock:
        return [p for p in _live if p.poll() is None]


def stop_all(grace: float = 5.0) -> int:
    """Cancel the registered work, SIGTERM every live child, SIGKILL those still there after ``grace`` seconds;
    how many children were running."""
    running = live()
    with _lock:
        cancels = list(_cancels.values())
    for cancel in cancels:
        with contextlib.suppress(Exception):
            cancel()
    for proc in running:
        _signal(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in running:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal(proc, signal.SIGKILL)
            proc.wait()
    return len(running)


def _signal(proc: subprocess.Popen[Any], sig: int) -> None:
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        pass
