"""Extract stage of a files restore: archives into a private staging folder, safely, each file checked as it lands.

Only regular files come out of the tar streams, each written with ``O_EXCL|O_NOFOLLOW`` under
a folder this run created, its size, md5 and sha256 compared with the index as it is written.
Directories and symlinks are made from the (authenticated) index; a symlink pointing outside
the destination is never made unless the operator allowed it. Modes and mtimes come from the
index last, deepest first, so making an entry never disturbs a folder's recorded mtime.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from luxima_backup import runtime
from luxima_backup.compression import DecompressingReader
from luxima_backup.progress import Progress
from luxima_backup.envelope import DecryptingReader
from luxima_backup.errors import IntegrityError
from luxima_backup.filetree import (
    DIR, FILE, SYMLINK, Entry, check_relative, content_mismatch, copy_member, members_for, open_tar_reader,
)
from luxima_backup.keys import KeyProvider
from luxima_backup.manifest import StoredObject
from luxima_backup.pipes import Meter, MeteredReader, drain
from luxima_backup.storage import ObjectStore
from tasks.archive import load_index



def selector(path: str | None) -> Callable[[Entry], bool]:
    """Which entries a path filter keeps: the path itself and everything under it (None keeps all)."""
    if not path or path.strip("/") in ("", "."):
        return lambda e: True
    want = check_relative(os.fsencode(path.strip("/")))
    below = want + b"/"
    return lambda e: e.path == want or e.path.startswith(below)


def link_escapes(entry: Entry) -> bool:
    """Whether a symlink would point outside the destination once restored (absolute, or too many '..')."""
    assert entry.target is not None
    if entry.target.startswith(b"/"):
        return True
    depth = entry.path.count(b"/")  # folders between the destination and the link
    for part in entry.target.split(b"/"):
        if part == b"..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in (b"", b"."):
            depth += 1
    return False


def _open_parent(root: int, rel: bytes) -> int:
    """A descriptor of ``rel``'s parent folder below ``root``, made as needed, never through a symlink."""
    fd = os.dup(root)
    for part in rel.split(b"/")[:-1]:
        try:
            os.mkdir(part, 0o700, dir_fd=fd)
        except FileExistsError:
            pass
        try:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        finally:
            os.close(fd)
        fd = nxt
    return fd


def extract_archive(store: ObjectStore, key: str, codec: str, provider: KeyProvider, expected_sha256: str,
                    wanted: Iterator[Entry], staging: Path, progress: Any = None,
                    expect: dict[str, str] | None = None) -> tuple[int, list[dict[str, Any]]]:
    """Write the wanted files of one archive under ``staging``; returns (files written, content mismatches).

    The whole object is read and authenticated, even past the last wanted member, and its
    ciphertext sha256 must equal the manifest's.
    """
    sealed = Meter(progress=progress)
    mismatches: list[dict[str, Any]] = []
    written = 0
    root = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        with store.load(key) as body:
            stream = DecompressingReader(DecryptingReader(MeteredReader(body, sealed), provider.unwrap,  # type: ignore[arg-type]
                                                          expect=expect, where=key), codec)
            tar = open_tar_reader(stream)
            for member, entry in members_for(tar, wanted, str(staging)):
                parent = _open_parent(root, entry.path)
                try:
                    name = entry.path.rsplit(b"/", 1)[-1]
                    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=parent)
                finally:
                    os.close(parent)
                with os.fdopen(fd, "wb") as out:
                    got = copy_member(tar, member, out)
                why = content_mismatch(entry, got)
                if why:
                    mismatches.append({"path": entry.name, "problem": f"in the archive: {why}"})
                written += 1
            drain(stream)  # the end of the object must authenticate too
        sealed.finish()
    finally:
        os.close(root)
    if sealed.hexdigest != expected_sha256:
        raise IntegrityError(f"{key} has sha256 {sealed.hexdigest}; its manifest says {expected_sha256}",
                             hint="the object was altered after the backup; nothing was restored")
    return written, mismatches


def make_links_and_dirs(entries: Iterable[Entry], staging: Path, allow_escaping_links: bool) -> dict[str, int]:
    """Create the index's directories and symlinks under ``staging`` (files are already there)."""
    root = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    counts = {"dirs": 0, "symlinks": 0, "links_skipped": 0}
    try:
        for e in entries:
            if e.type == FILE:
                continue
            if e.type == SYMLINK and link_escapes(e) and not allow_escaping_links:
                counts["links_skipped"] += 1
                continue
            parent = _open_parent(root, e.path)
            name = e.path.rsplit(b"/", 1)[-1]
            try:
                if e.type == DIR:
                    try:
                        os.mkdir(name, 0o700, dir_fd=parent)
                    except FileExistsError:
                        if not stat.S_ISDIR(os.lstat(name, dir_fd=parent).st_mode):
                            raise IntegrityError(f"{e.name!r} is both a folder and a file in the backup") from None
                    counts["dirs"] += 1
                else:
                    assert e.target is not None
                    os.symlink(e.target, name, dir_fd=parent)
                    counts["symlinks"] += 1
            finally:
                os.close(parent)
    finally:
        os.close(root)
    return counts


@task(name="extract", cache_policy=NO_CACHE, persist_result=False)
def extract(archive_id: str, info: StoredObject, index_spool: str, index_codec: str, path_filter: str | None,
            staging: str, expect: dict[str, str] | None) -> dict[str, Any]:
    """Stream one archive from storage, authenticating every chunk, and write the selected files it holds."""
    settings = runtime.settings()
    provider = runtime.key_provider(settings)
    keep = selector(path_filter)
    wanted = (e for e in load_index(index_spool, index_codec, provider.unwrap)
              if e.type == FILE and e.archive == archive_id and keep(e))
    progress = Progress(f"extracting {info.key.rsplit('/', 1)[-1]}", info.size_encrypted)
    written, mismatches = extract_archive(runtime.store(settings), info.key, info.compression.codec, provider,
                                          info.sha256_encrypted, wanted, Path(staging), progress, expect)
    get_run_logger().info("extracted %d files from %s", written, info.key)
    return {"archive": archive_id, "files": written, "mismatches": mismatches}
