"""``ObjectStore`` in a directory on a host over SSH: the DR node's copy of the backups.

Small objects and reads go over SFTP (paramiko, strict host keys); large objects go with rsync over
OpenSSH (``put_file``: the procedure's way, resumable with ``--partial-dir``, ``--bwlimit``), and a
stored object's sha256 is computed on the host itself (``sha256``), so a copy is checked where it
lies, not assumed. Keys map to paths under ``root`` exactly as in ``LocalStore``: a save lands under
a temporary name and is renamed into place, so a reader sees a whole object or none.
"""

from __future__ import annotations

import contextlib
import posixpath
import secrets
import shlex
import stat as stat_mod
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import paramiko

from . import procs, ssh
from .errors import ObjectNotFound, StorageError
from .secrets import redact
from .settings import SshHost
from .storage import ObjectInfo

_PARTIAL_DIR = ".rsync-partial"  # rsync keeps a cut transfer here, beside its object, for the next run to resume


class SshStore:
    def __init__(self, host: SshHost, key_text: str, root: str, work_dir: Path, name: str = ""):
        self.host, self._key_text, self.root, self.work_dir = host, key_text, root.rstrip("/"), work_dir
        self.name = name or f"{host.user}@{host.host}:{self.root}"
        # One SFTP session, used by one thread at a time: paramiko's SFTP client is not safe for concurrent reads (the
        # catalog reads manifests from several threads). Held for as long as a file read through ``load`` is open.
        self._lock = threading.RLock()
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None

    # --- the connection ------------------------------------------------------------------------------

    def _session(self) -> paramiko.SFTPClient:
        if self._sftp is None or self._client is None or not self._client.get_transport() or \
                not self._client.get_transport().is_active():  # type: ignore[union-attr]
            self.close()
            self._client = ssh.connect(self.host, self._key_text)
            self._sftp = self._client.open_sftp()
            self._sftp.get_channel().settimeout(self.host.io_timeout)  # type: ignore[union-attr]
        return self._sftp

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self._client is not None:
                self._client.close()
        self._client = self._sftp = None

    @contextlib.contextmanager
    def _op(self, action: str) -> Iterator[paramiko.SFTPClient]:
        with self._lock:
            try:
                yield self._session()
            except FileNotFoundError:
                raise
            except (OSError, EOFError, paramiko.SSHException) as exc:
                self.close()
                raise StorageError(f"{self.name}: {action} failed: {type(exc).__name__}: {exc}", transient=True) from None

    def _path(self, key: str) -> str:
        parts = key.split("/")
        if not key or key.startswith("/") or any(p in {"", ".", ".."} for p in parts) or ".partial-" in key:
            raise StorageError(f"invalid object key {key!r}")
        return posixpath.join(self.root, key)

    def _makedirs(self, sftp: paramiko.SFTPClient, folder: str) -> None:
        missing = []
        while folder and folder != "/":
            try:
                sftp.stat(folder)
                break
            except FileNotFoundError:
                missing.append(folder)
                folder = posixpath.dirname(folder)
        for f in reversed(missing):
            with contextlib.suppress(OSError):  # made meanwhile by another writer
                sftp.mkdir(f, 0o700)

    # --- ObjectStore ------------------------------------------------------------------------------

    def save(self, key: str, src: BinaryIO) -> ObjectInfo:
        path = self._path(key)
        partial = f"{path}.partial-{secrets.token_hex(4)}"
        with self._op(f"writing {key}") as sftp:
            self._makedirs(sftp, posixpath.dirname(path))
            try:
                with sftp.open(partial, "wb") as out:
                    out.set_pipelined(True)
                    while True:
                        block = src.read(1 << 20)
                        if not block:
                            break
                        out.write(block)
                sftp.posix_rename(partial, path)
            except BaseException:
                with contextlib.suppress(Exception):
                    sftp.remove(partial)
                raise
            st = sftp.stat(path)
        return ObjectInfo(key, int(st.st_size or 0), _mtime(st))

    def save_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> ObjectInfo:
        import io

        return self.save(key, io.BytesIO(data))

    @contextlib.contextmanager
    def load(self, key: str) -> Iterator[BinaryIO]:
        path = self._path(key)
        with self._lock:
            try:
                with self._op(f"reading {key}") as sftp:
                    f = sftp.open(path, "rb")
            except FileNotFoundError:
                raise ObjectNotFound(f"{key} not found on {self.name}") from None
            try:
                f.prefetch()
                yield _Reading(f, self, key)  # type: ignore[misc]
            finally:
                with contextlib.suppress(Exception):
                    f.close()

    def stat(self, key: str) -> ObjectInfo:
        try:
            with self._op(f"checking {key}") as sftp:
                st = sftp.stat(self._path(key))
        except FileNotFoundError:
            raise ObjectNotFound(f"{key} not found on {self.name}") from None
        return ObjectInfo(key, int(st.st_size or 0), _mtime(st))

    def list(self, prefix: str, start_after: str | None = None) -> Iterator[ObjectInfo]:
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        found: list[ObjectInfo] = []
        with self._op(f"listing {prefix}") as sftp:
            stack = [base]
            while stack:
                rel = stack.pop()
                try:
                    entries = sftp.listdir_attr(posixpath.join(self.root, rel) if rel else self.root)
                except FileNotFoundError:
                    continue
                for e in entries:
                    key = f"{rel}/{e.filename}" if rel else e.filename
                    if stat_mod.S_ISDIR(e.st_mode or 0):
                        if e.filename != _PARTIAL_DIR and (key.startswith(prefix) or prefix.startswith(key + "/")):
                            stack.append(key)
                    elif ".partial-" not in e.filename and key.startswith(prefix) and (start_after is None or key > start_after):
                        found.append(ObjectInfo(key, int(e.st_size or 0), _mtime(e)))
        return iter(sorted(found, key=lambda i: i.key))

    def folders(self, prefix: str) -> list[str]:
        with self._op(f"listing {prefix}") as sftp:
            try:
                entries = sftp.listdir_attr(posixpath.join(self.root, prefix.rstrip("/")))
            except FileNotFoundError:
                return []
        return sorted(e.filename for e in entries if stat_mod.S_ISDIR(e.st_mode or 0) and e.filename != _PARTIAL_DIR)

    def remove(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError), self._op(f"removing {key}") as sftp:
            sftp.remove(self._path(key))

    def purge(self, key: str) -> None:
        self.remove(key)

    def locked_until(self, key: str) -> datetime | None:
        return None  # a directory has no object lock (an immutable snapshot of it is outside our view)

    def stale_uploads(self, prefix: str, older_than: datetime) -> list[tuple[str, str]]:
        return []

    def abort_upload(self, key: str, upload_id: str) -> None:
        return None

    # --- what only a host can do -----------------------------------------------------------------------

    def sha256(self, key: str) -> str:
        """The sha256 of a stored object, computed on the host (the copy is read where it lies)."""
        path = self._path(key)
        with self._op(f"hashing {key}"):
            assert self._client is not None
            status, out, err = ssh.run(self._client, f"sha256sum -- {shlex.quote(path)}", timeout=self.host.io_timeout * 30)
        if status != 0:
            text = err.decode(errors="replace").strip()
            if "No such file" in text:
                raise ObjectNotFound(f"{key} not found on {self.name}")
            raise StorageError(f"sha256sum of {key} on {self.name} failed (exit {status}): {text[-300:]}")
        return out.decode().split()[0]

    def put_file(self, local: Path, key: str, bandwidth_limit_kib: int = 0, timeout: int = 600) -> ObjectInfo:
        """Copy a local file to ``key`` with rsync: atomic on arrival (a temporary name, then renamed), and a cut
        transfer resumes from what reached the host (``--partial-dir``) on the next call."""
        path = self._path(key)
        with self._op(f"preparing {key}") as sftp:
            self._makedirs(sftp, posixpath.dirname(path))
        args = ["rsync", "--times", "--protect-args", f"--partial-dir={_PARTIAL_DIR}", f"--timeout={timeout}",
                "--chmod=F600"]
        if bandwidth_limit_kib:
            args.append(f"--bwlimit={bandwidth_limit_kib}")
        with ssh.private_key_file(self._key_text, self.work_dir) as key_file:
            args += ["-e", shlex.join(ssh.ssh_command(self.host, key_file))]
            proc = procs.run([*args, str(local), f"{self.host.host}:{path}"])
        if proc.returncode != 0:
            err = redact(proc.stderr.decode(errors="replace").strip())
            # 10-12 (socket, protocol, data stream), 23/30/35 (partial, timeouts), 255 (ssh): a later attempt may pass
            raise StorageError(f"rsync of {key} to {self.name} failed (exit {proc.returncode}): {err[-800:]}",
                               transient=proc.returncode in {10, 11, 12, 23, 30, 35, 255})
        return self.stat(key)


class _Reading:
    """An open remote file whose failures are the project's (a host gone mid-read is transient, as for S3)."""

    def __init__(self, f: Any, store: SshStore, key: str):
        self._f, self._store, self._key = f, store, key

    def read(self, n: int = -1) -> bytes:
        try:
            return self._f.read(n if n is not None and n >= 0 else None)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            self._store.close()
            raise StorageError(f"{self._store.name}: reading {self._key} failed: {type(exc).__name__}: {exc}",
                               transient=True) from None

    def readable(self) -> bool:
        return True


def _mtime(st: Any) -> datetime | None:
    return datetime.fromtimestamp(st.st_mtime, timezone.utc) if st.st_mtime is not None else None
