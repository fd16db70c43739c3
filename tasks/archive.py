"""Archive stage: the staging mirror as a tar stream, with its file index written encrypted beside it.

Each file's md5 and sha256 are taken as its bytes go into the tar, so the index describes exactly
what was archived. A full archive holds every entry. An incremental one holds the files that are
new or changed since the previous backup (size or mtime differ: rsync's own test), plus
directories and symlinks; the index records, for every file, which backup's archive holds its
content. The index is compressed and encrypted as it is written: file names are user data too.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from luxima_backup import runtime
from luxima_backup.compression import DecompressingReader, compressor
from luxima_backup.envelope import DecryptingReader, Encryptor, UnwrapFn
from luxima_backup.filetree import (
    DIR, FILE, SYMLINK, Entry, add_file, entry_of, forget_members, index_line, open_tar_writer, read_index, tarinfo,
    walk,
)
from luxima_backup.keys import DataKey
from luxima_backup.pipes import Link, Meter, stage
from luxima_backup.recovery import header_seal
from tasks.sync import mirror_path



class IndexWriter:
    """Index lines → compressor → AES-256-GCM chunks → a private file (ciphertext only on disk)."""

    def __init__(self, path: str, codec: str, level: int, data_key: DataKey, chunk_size: int, binding: dict[str, str]):
        self._out = open(path, "xb", opener=lambda p, flags: os.open(p, flags, 0o600))
        self._comp = compressor(codec, level, 1)
        self._enc = Encryptor(data_key.plaintext, data_key.wrapped, chunk_size, {"content": "file index", **binding})
        self.codec, self.level, self.chunk_size = codec, level, chunk_size
        self.key = data_key.wrapped.to_json()
        self.plain, self.sealed = Meter(), Meter()
        self.entries = 0
        self._emit(self._enc.header())

    def _emit(self, data: bytes) -> None:
        if data:
            self.sealed.update(data)
            self._out.write(data)

    def add(self, entry: Entry) -> None:
        line = index_line(entry)
        self.plain.update(line)
        self.entries += 1
        packed = self._comp.compress(line)
        if packed:
            self._emit(self._enc.update(packed))

    def close(self) -> dict[str, Any]:
        self._emit(self._enc.update(self._comp.flush()))
        self._emit(self._enc.finalize())
        self._out.flush()
        os.fsync(self._out.fileno())
        self._out.close()
        return {"entries": self.entries, "size_plain": self.plain.size, "sha256_plain": self.plain.hexdigest,
                "size_encrypted": self.sealed.size, "sha256_encrypted": self.sealed.hexdigest,
                "compression": {"codec": self.codec, "level": self.level}, "bound": True,
                "encryption": {"format": "LXB1", "chunk_size": self.chunk_size,
                               **{k: v for k, v in self.key.items() if k != "wrapped"}}}

    def abort(self) -> None:
        self._out.close()


class _SmallReads:
    """Hands a decompressor at most ``size`` bytes per read: an index compresses 5-10x, and a
    1 MiB compressed block would come out as ~10 MiB of lines at once."""

    def __init__(self, src: Any, size: int = 64 * 1024):
        self._src, self._size = src, size

    def read(self, n: int = -1) -> bytes:
        return self._src.read(self._size if n < 0 else min(n, self._size))


def load_index(path: str, codec: str, unwrap: UnwrapFn) -> Iterator[Entry]:
    """Entries of an encrypted index file; every chunk authenticates before its entries are used."""
    with open(path, "rb") as f:
        yield from read_index(DecompressingReader(_SmallReads(DecryptingReader(f, unwrap)), codec))


@dataclass
class Changes:
    """What changed since the previous backup: counts and bytes of each kind.

    Never names: this goes into the manifest, stored unencrypted, and file names are user data
    (``invoice-<customer>.pdf``). Names live only in the encrypted index.
    """

    added: int = 0
    changed: int = 0
    removed: int = 0
    unchanged: int = 0
    added_bytes: int = 0
    changed_bytes: int = 0

    def note(self, kind: str, entry: Entry) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if kind in ("added", "changed"):
            setattr(self, f"{kind}_bytes", getattr(self, f"{kind}_bytes") + entry.size)

    def as_dict(self) -> dict[str, Any]:
        return {"added": self.added, "changed": self.changed, "removed": self.removed, "unchanged": self.unchanged,
                "added_bytes": self.added_bytes, "changed_bytes": self.changed_bytes}


class _Folders:
    """The folders of an incremental archive: only those above something it stores.

    A folder unchanged since the last backup is in an earlier archive of the chain already, and a restore makes
    folders from the index anyway; writing every folder's header again was a third of an unchanged run's time.
    But a folder that receives a stored file keeps its header in front of that file, so that extracting the chain
    with plain tar (the break-glass path) still ends with the folder's own mode and times.
    """

    def __init__(self, tar: Any):
        self._tar = tar
        self._skipped: list[Entry] = []  # unchanged folders above the walk's position, outermost first

    def leave_to(self, entry: Entry) -> None:
        """The walk moved on to ``entry`` (depth-first): forget skipped folders that are not above it."""
        while self._skipped and not entry.path.startswith(self._skipped[-1].path + b"/"):
            self._skipped.pop()

    def skip(self, folder: Entry) -> None:
        self._skipped.append(folder)

    def write(self, entry: Entry) -> None:
        """``entry`` is about to be stored: first the headers of the skipped folders above it."""
        for folder in self._skipped:
            self._tar.addfile(tarinfo(folder))
        if self._skipped:
            forget_members(self._tar)
            self._skipped.clear()


MAX_WARNINGS = 100  # files named in a backup's warnings (the count is always whole)


def archive_tree(root: Path, sink: Any, index: IndexWriter, backup_id: str, previous: Iterator[Entry] | None,
                 full: bool, live: bool = False) -> dict[str, Any]:
    """Write ``root`` as a tar stream into ``sink`` and every entry into ``index``; returns totals and changes.

    ``previous`` is the last backup's index (sorted as the walk is), merged with the walk to
    find what changed; without it every entry counts as added. ``live``: ``root`` is the source
    itself, in use (see ``filetree.add_file``); files that changed while read are listed.
    """
    started = time.monotonic()
    tar = open_tar_writer(sink)
    prev_iter = iter(previous or ())
    prev = next(prev_iter, None)
    changes = Changes()
    totals = {"files": 0, "dirs": 0, "symlinks": 0, "bytes": 0, "skipped_special": 0}
    stored = {"files": 0, "bytes": 0}
    changed_while_read: list[str] = []
    changed_count = 0
    folders = _Folders(tar)
    for rel, st in walk(root):
        entry = entry_of(rel, st, root)
        if entry is None:
            totals["skipped_special"] += 1  # sockets, fifos, devices: not user data
            continue
        folders.leave_to(entry)
        key = entry.key
        while prev is not None and prev.key < key:
            changes.note("removed", prev)
            prev = next(prev_iter, None)
        old = None
        if prev is not None and prev.key == key:
            old, prev = prev, next(prev_iter, None)
        quick_same = (old is not None and old.type == FILE == entry.type and old.size == entry.size
                      and old.mtime_ns == entry.mtime_ns and old.archive is not None)
        if entry.type == FILE:
            totals["files"] += 1
            totals["bytes"] += entry.size
            if quick_same and not full:
                assert old is not None
                entry.md5, entry.sha256, entry.archive = old.md5, old.sha256, old.archive
            else:
                folders.write(entry)
                try:
                    changed = add_file(tar, root, entry, live)
                except FileNotFoundError:
                    if not live:
                        raise
                    totals["files"] -= 1  # deleted between the walk and its read: not in this backup
                    totals["bytes"] -= entry.size
                    if old is not None:
                        changes.note("removed", old)
                    continue
                if changed:
                    changed_count += 1
                    if len(changed_while_read) < MAX_WARNINGS:
                        changed_while_read.append(f"{entry.name}: {changed}")
                entry.archive = backup_id
                stored["files"] += 1
                stored["bytes"] += entry.size
        else:
            totals["dirs" if entry.type == DIR else "symlinks"] += 1
            if full or old != entry:
                folders.write(entry)
                tar.addfile(tarinfo(entry))
                forget_members(tar)
            elif entry.type == DIR:
                folders.skip(entry)
        if old is None:
            changes.note("added", entry)
        elif old.type != entry.type or (entry.type == FILE and not quick_same) \
                or (entry.type == FILE and entry.sha256 != old.sha256) \
                or (entry.type == SYMLINK and entry.target != old.target) or old.mode != entry.mode:
            changes.note("changed", entry)
        else:
            changes.unchanged += 1
        index.add(entry)
    while prev is not None:
        changes.note("removed", prev)
        prev = next(prev_iter, None)
    tar.close()
    result = {"totals": totals, "stored": stored, "changes": changes.as_dict(), "seconds": time.monotonic() - started}
    if changed_count:
        result["changed_while_read"] = {"count": changed_count, "files": changed_while_read}
    return result


@task(name="archive", cache_policy=NO_CACHE, persist_result=False)
def archive(source: str, sink: Link, backup_id: str, index_spool: str, previous_index: dict[str, Any] | None,
            full: bool, index_binding: dict[str, str]) -> dict[str, Any]:
    """Tar the source's staging mirror (or, for a direct local source, the directory itself) into the pipeline,
    writing the encrypted file index beside it."""
    settings = runtime.settings()
    cfg = settings.files_backup
    spec = settings.file_source(source)
    root = Path(spec.path) if spec.direct else mirror_path(settings, source)
    provider = runtime.key_provider(settings)
    with stage(None, sink):
        # The index gets its own data key: it is a separate object, readable without the archive.
        data_key = provider.new_data_key()
        index = IndexWriter(index_spool, cfg.compression, cfg.effective_level, data_key, settings.keys.chunk_kib * 1024,
                            {**index_binding, **header_seal(settings.keys.recovery_public_key, data_key.plaintext,
                                                             index_binding["object"])})
        try:
            previous = None
            if previous_index is not None:
                previous = load_index(previous_index["spool"], previous_index["codec"], provider.unwrap)
            result = archive_tree(root, sink.writer(), index, backup_id, previous, full, live=spec.direct)
        except BaseException:
            index.abort()
            raise
        result["index"] = index.close()
    s = result["stored"]
    logger = get_run_logger()
    logger.info("archived %s (%s): %d of %d files stored (%d bytes), %d in the index", source,
                "full" if full else "incremental", s["files"], result["totals"]["files"], s["bytes"], result["index"]["entries"])
    if "changed_while_read" in result:
        c = result["changed_while_read"]
        logger.warning("%d file(s) of %s changed while they were read, stored as read (the next run stores them again): %s",
                       c["count"], source, "; ".join(c["files"][:10]))
    return result
