"""Fetch stage of the config backup: configured paths of a host, over SFTP, into a local folder.

Paths are absolute, with shell-style globs in any segment (``/srv/apps/*/docker-compose.yml``);
a folder is fetched whole. Each file lands at ``dest/<its absolute path>`` (``dest/etc/nginx/...``),
written to a temporary name and renamed, so a cut connection never leaves half a file that
looks whole. Symlinks stay links (``sites-enabled`` is links into ``sites-available``). Modes
and owners are recorded in ``meta`` for a restore to put back; git keeps neither. Files over
``max_file_bytes`` are left out and reported: configs are small, and a large file there is
usually a log or a dump that does not belong in git.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import paramiko

from luxima_backup.errors import ConfigError
from luxima_backup.ssh import SshError

READ_SIZE = 1 << 20
_GLOB = set("*?[")


@dataclass
class Fetched:
    """What one host's fetch brought, and what it could not."""

    files: dict[str, dict[str, Any]] = field(default_factory=dict)   # absolute path -> size, mode, uid, gid, (link target)
    missing: list[str] = field(default_factory=list)                 # configured paths that matched nothing
    too_large: list[str] = field(default_factory=list)
    bytes: int = 0


def _excluded(path: str, exclude: list[str]) -> bool:
    name = posixpath.basename(path)
    return any(fnmatch.fnmatchcase(path, pat) or fnmatch.fnmatchcase(name, pat) for pat in exclude)


def expand(sftp: paramiko.SFTPClient, pattern: str) -> Iterator[str]:
    """Existing remote paths matching ``pattern`` (globs per segment), sorted, symlinks not followed."""
    if not pattern.startswith("/"):
        raise ConfigError(f"config path {pattern!r} is not absolute")
    parts = [p for p in pattern.strip("/").split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise ConfigError(f"config path {pattern!r} has '.' or '..' in it")

    def walk(base: str, rest: list[str]) -> Iterator[str]:
        if not rest:
            yield base
            return
        head, tail = rest[0], rest[1:]
        if not _GLOB & set(head):
            child = posixpath.join(base, head)
            try:
                sftp.lstat(child)
            except FileNotFoundError:
                return
            yield from walk(child, tail)
            return
        try:
            names = sorted(a.filename for a in sftp.listdir_attr(base))
        except (FileNotFoundError, PermissionError):
            return
        for name in names:
            if fnmatch.fnmatchcase(name, head) and not (name.startswith(".") and not head.startswith(".")):
                yield from walk(posixpath.join(base, name), tail)

    yield from walk("/", parts)


def fetch_paths(sftp: paramiko.SFTPClient, patterns: list[str], exclude: list[str], dest: Path,
                max_file_bytes: int) -> Fetched:
    """Copy every file under the paths matching ``patterns`` into ``dest``; returns what was fetched."""
    out = Fetched()
    for pattern in patterns:
        matched = False
        for path in expand(sftp, pattern):
            matched = True
            _fetch_tree(sftp, path, exclude, dest, max_file_bytes, out)
        if not matched:
            out.missing.append(pattern)
    return out


def _fetch_tree(sftp: paramiko.SFTPClient, path: str, exclude: list[str], dest: Path, max_file_bytes: int,
                out: Fetched) -> None:
    if path in out.files or _excluded(path, exclude):
        return
    try:
        attr = sftp.lstat(path)
    except FileNotFoundError:
        return  # removed since it was listed
    except PermissionError as exc:
        raise SshError(f"cannot read {path} on the host: permission denied",
                       hint="give the backup user read access (e.g. a group) to the configured paths") from exc
    mode = attr.st_mode or 0
    local = dest / path.lstrip("/")
    if stat.S_ISDIR(mode):
        for entry in sorted(sftp.listdir_attr(path), key=lambda a: a.filename):
            _fetch_tree(sftp, posixpath.join(path, entry.filename), exclude, dest, max_file_bytes, out)
        return
    meta: dict[str, Any] = {"mode": stat.S_IMODE(mode), "uid": attr.st_uid, "gid": attr.st_gid}
    local.parent.mkdir(parents=True, exist_ok=True)
    if stat.S_ISLNK(mode):
        target = sftp.readlink(path)
        if local.is_symlink() or local.exists():
            local.unlink()
        os.symlink(target, local)
        out.files[path] = {**meta, "symlink": target, "size": 0}
        return
    if not stat.S_ISREG(mode):
        return  # sockets, fifos, devices are not configuration
    size = attr.st_size or 0
    if size > max_file_bytes:
        out.too_large.append(path)
        return
    partial = local.with_name(f".{local.name}.luxima-partial")
    try:
        with sftp.open(path, "rb") as src, open(partial, "wb") as dst:
            if size:
                src.prefetch(size)  # pipelined reads: one round trip per file, not per block
            got = 0
            while block := src.read(READ_SIZE):
                dst.write(block)
                got += len(block)
        if got != size:
            raise SshError(f"{path} changed while it was fetched ({got} of {size} bytes)", transient=True)
        os.replace(partial, local)
    except PermissionError as exc:
        raise SshError(f"cannot read {path} on the host: permission denied",
                       hint="give the backup user read access (e.g. a group) to the configured paths") from exc
    except (OSError, paramiko.SSHException) as exc:
        if isinstance(exc, SshError):
            raise
        raise SshError(f"fetching {path} failed: {exc}", transient=True) from exc
    finally:
        partial.unlink(missing_ok=True)
    out.files[path] = {**meta, "size": size}
    out.bytes += size
