"""The config archive: one host's fetched files, real (unscrubbed), as a tar stream that ends with its index.

Members are named by the file's absolute path without the leading ``/`` (``etc/nginx/nginx.conf``);
symlinks are links; mode, owner and mtime are the host's. The last member, ``.luxima-index.json``,
lists every file with its metadata, size, md5, sha256 and keyed fingerprint; it lives inside the
encrypted archive because digests of short secret files could be brute-forced from a plaintext
manifest. Readers check every member against it: a member missing from the index, an index entry
with no member, or a digest that differs is an ``IntegrityError``.

Config files are small (``configs.max_file_bytes``), so a member is held in memory one at a time;
the archive as a whole is streamed.
"""

from __future__ import annotations

import hashlib
import io
import json
import stat
import tarfile
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator

from .errors import FormatError, IntegrityError

INDEX_NAME = ".luxima-index.json"
INDEX_VERSION = 1


def member_name(path: str) -> str:
    """``/etc/nginx/nginx.conf`` -> ``etc/nginx/nginx.conf``."""
    return path.lstrip("/")


def open_writer(sink: Any) -> tarfile.TarFile:
    return tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT)


def add_file(tar: tarfile.TarFile, path: str, meta: dict[str, Any], data: bytes | None) -> dict[str, Any]:
    """Add one fetched file (``data``) or symlink (``meta['symlink']``); returns its index entry."""
    info = tarfile.TarInfo(member_name(path))
    info.mode, info.uid, info.gid = meta["mode"], meta["uid"], meta["gid"]
    info.mtime = meta.get("mtime", 0)
    entry = {k: meta[k] for k in ("mode", "uid", "gid", "mtime", "size") if k in meta}
    if "symlink" in meta:
        info.type, info.linkname = tarfile.SYMTYPE, meta["symlink"]
        tar.addfile(info)
        entry["symlink"] = meta["symlink"]
    else:
        assert data is not None
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        entry.update(size=len(data), md5=hashlib.md5(data).hexdigest(), sha256=hashlib.sha256(data).hexdigest())
    tar.members.clear()  # a stream writer needs no memory of earlier members
    return entry


def add_index(tar: tarfile.TarFile, index: dict[str, Any]) -> None:
    """The index, last: a reader knows the archive is whole when it has read it."""
    raw = json.dumps({"index_version": INDEX_VERSION, **index}, sort_keys=True, indent=1).encode()
    info = tarfile.TarInfo(INDEX_NAME)
    info.size, info.mode = len(raw), 0o600
    tar.addfile(info, io.BytesIO(raw))


@dataclass
class Member:
    """One file or symlink read from an archive."""

    path: str                 # absolute, as on the host
    mode: int
    uid: int
    gid: int
    mtime: int
    data: bytes | None        # None for a symlink
    symlink: str | None = None


def read_members(stream: BinaryIO, index_out: dict[str, Any]) -> Iterator[Member]:
    """Every member of an archive stream, checked; ``index_out`` is filled with the index at the end.

    Raises ``IntegrityError`` when the archive is cut short (no index), a member does not match
    its index entry, or the index lists a file that is not there.
    """
    seen: dict[str, dict[str, Any]] = {}
    index: dict[str, Any] | None = None
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                if index is not None:
                    raise IntegrityError(f"config archive has member {info.name!r} after its index")
                f = tar.extractfile(info) if info.isreg() else None
                data = f.read() if f is not None else None
                if info.name == INDEX_NAME:
                    try:
                        index = json.loads(data or b"")
                    except ValueError as exc:
                        raise FormatError(f"config archive index is not JSON: {exc}") from None
                    continue
                if info.name.startswith("/") or ".." in info.name.split("/"):
                    raise IntegrityError(f"config archive member {info.name!r} is not a safe relative path")
                path = "/" + info.name
                if info.issym():
                    seen[path] = {"symlink": info.linkname}
                    yield Member(path, stat.S_IMODE(info.mode), info.uid, info.gid, int(info.mtime), None, info.linkname)
                elif info.isreg():
                    assert data is not None
                    seen[path] = {"size": len(data), "md5": hashlib.md5(data).hexdigest(),
                                  "sha256": hashlib.sha256(data).hexdigest()}
                    yield Member(path, stat.S_IMODE(info.mode), info.uid, info.gid, int(info.mtime), data)
                tar.members.clear()
    except tarfile.TarError as exc:
        raise IntegrityError(f"config archive is not a valid tar stream: {exc}") from None
    if index is None:
        raise IntegrityError("config archive ends before its index: it is truncated")
    if index.get("index_version") != INDEX_VERSION:
        raise FormatError(f"config archive index version {index.get('index_version')!r} is not supported")
    files = index.get("files", {})
    if set(files) != set(seen):
        extra, lost = sorted(set(seen) - set(files)), sorted(set(files) - set(seen))
        raise IntegrityError(f"config archive members and index differ: not indexed {extra[:5]}, missing {lost[:5]}")
    for path, got in seen.items():
        want = files[path]
        for k, v in got.items():
            if want.get(k) != v:  # values not shown: digests of a short secret file could be brute-forced
                raise IntegrityError(f"config archive: the {k} of {path} differs from its index")
    index_out.update(index)
