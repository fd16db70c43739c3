"""File trees as backups: a sorted walk, the file index (one JSON line per entry), tar streams written and read.

Order: every tree is walked depth-first with siblings sorted by their bytes, which is the
order of paths compared as tuples of components. The index, each archive's members and the
walk of the mirror share that order, so they are compared by merging, in bounded memory,
whatever the number of files.

Names are bytes throughout (Linux file names need not be UTF-8); the index stores a name as
``path`` when it is UTF-8 and as ``path_b64`` otherwise. Tar members use PAX headers, which
keep long names, non-UTF-8 names, symlink targets and sub-second mtimes.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

import orjson

from .errors import FormatError, IntegrityError

READ_SIZE = 1 << 20
# tarfile's stream buffer: it copies the whole buffer on every small read or write (a header, a small file),
# so 1 MiB made those copies the archive's and the check's main cost (50,000 files: 8.5 and 11.6 s of CPU
# with 1 MiB, 6.0 and 6.7 s with 64 KiB; smaller buys nothing more). Content is still copied in READ_SIZE blocks.
TAR_BUFSIZE = 64 * 1024
INDEX_READ = 64 * 1024  # index lines are short: small reads keep the lines in flight few
FILE, DIR, SYMLINK = "file", "dir", "symlink"
_TAR_KW: dict[str, Any] = {"format": tarfile.PAX_FORMAT, "encoding": "utf-8", "errors": "surrogateescape"}


def path_key(path: bytes) -> tuple[bytes, ...]:
    return tuple(path.split(b"/"))


def _text(raw: bytes, field: str) -> dict[str, str]:
    try:
        return {field: raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {f"{field}_b64": base64.b64encode(raw).decode()}


def _raw(doc: dict[str, Any], field: str) -> bytes | None:
    if field in doc:
        return str(doc[field]).encode("utf-8")
    if f"{field}_b64" in doc:
        return base64.b64decode(doc[f"{field}_b64"])
    return None


def check_relative(path: bytes) -> bytes:
    """``path`` if it is a plain relative path (no root, no ``.``/``..``, no empty parts); else ``IntegrityError``."""
    parts = path.split(b"/")
    if not path or path.startswith(b"/") or b"\0" in path or any(p in (b"", b".", b"..") for p in parts):
        raise IntegrityError(f"unsafe path {os.fsdecode(path)!r} in a backup: absolute, or with '..' or empty parts",
                             hint="the backup was not written by this program or was tampered with; nothing was restored")
    return path


@dataclass
class Entry:
    """One index record: a file, directory or symlink of the tree, relative to its root."""

    path: bytes
    type: str
    mode: int
    mtime_ns: int
    size: int = 0
    md5: str | None = None
    sha256: str | None = None
    target: bytes | None = None    # symlinks: what the link points to, as stored
    archive: str | None = None     # files: id of the backup whose archive holds this content
    uid: int = 0
    gid: int = 0

    # The merge with the previous index compares keys several times per entry: made once, with the entry (a
    # functools.cached_property takes a lock on every read in Python 3.11: a tenth of an unchanged run's time).
    key: tuple[bytes, ...] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.key = path_key(self.path)

    @property
    def name(self) -> str:
        """The path for people (logs, artifacts, errors): undecodable bytes shown as \\xNN."""
        return self.path.decode("utf-8", "backslashreplace")

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {**_text(self.path, "path"), "type": self.type, "mode": self.mode,
                               "mtime_ns": self.mtime_ns, "uid": self.uid, "gid": self.gid}
        if self.type == FILE:
            doc.update(size=self.size, md5=self.md5, sha256=self.sha256, archive=self.archive)
        elif self.type == SYMLINK:
            assert self.target is not None
            doc.update(_text(self.target, "target"))
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "Entry":
        try:
            path = _raw(doc, "path")
            kind = doc["type"]
            if path is None or kind not in (FILE, DIR, SYMLINK):
                raise KeyError("path or type")
            return cls(path=check_relative(path), type=kind, mode=int(doc["mode"]), mtime_ns=int(doc["mtime_ns"]),
                       size=int(doc.get("size", 0)), md5=doc.get("md5"), sha256=doc.get("sha256"),
                       target=_raw(doc, "target"), archive=doc.get("archive"), uid=int(doc.get("uid", 0)),
                       gid=int(doc.get("gid", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"file index record is malformed ({exc})") from None


# -- walking a tree --

def walk(root: Path) -> Iterator[tuple[bytes, os.stat_result]]:
    """Every entry under ``root`` (not ``root`` itself), depth-first, siblings sorted; symlinks not followed."""
    base = os.fsencode(root)

    def visit(rel: bytes) -> Iterator[tuple[bytes, os.stat_result]]:
        try:
            with os.scandir(os.path.join(base, rel) if rel else base) as it:
                names = sorted(e.name for e in it)
        except FileNotFoundError:
            if not rel:
                raise
            return  # a folder removed during the walk (a tree in use): it is not in this backup
        for name in names:
            child = rel + b"/" + name if rel else name
            try:
                st = os.lstat(os.path.join(base, child))
            except FileNotFoundError:
                continue
            yield child, st
            if stat.S_ISDIR(st.st_mode):
                yield from visit(child)

    yield from visit(b"")


def entry_of(rel: bytes, st: os.stat_result, root: Path) -> Entry | None:
    """The index entry for a walked path, without content hashes; None for sockets, fifos and devices."""
    common = {"path": rel, "mode": stat.S_IMODE(st.st_mode), "mtime_ns": st.st_mtime_ns, "uid": st.st_uid, "gid": st.st_gid}
    if stat.S_ISREG(st.st_mode):
        return Entry(type=FILE, size=st.st_size, **common)
    if stat.S_ISDIR(st.st_mode):
        return Entry(type=DIR, **common)
    if stat.S_ISLNK(st.st_mode):
        return Entry(type=SYMLINK, target=os.readlink(os.path.join(os.fsencode(root), rel)), **common)
    return None


# -- the index as JSON lines --

# orjson: an incremental run reads the previous index and writes a new one, a line per file; with the json
# module those two were half of its fixed cost per unchanged file. (Non-ASCII names are now written as UTF-8
# rather than \u escapes: the same JSON to every reader.)
def index_line(entry: Entry) -> bytes:
    return orjson.dumps(entry.to_json(), option=orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE)


def read_index(src: Any) -> Iterator[Entry]:
    """Entries from a readable stream of index lines (already decrypted and decompressed), checking their order."""
    pending = b""
    last: tuple[bytes, ...] | None = None
    while True:
        block = src.read(INDEX_READ)
        if not block:
            break
        pending += block
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if not line:
                continue
            try:
                entry = Entry.from_json(orjson.loads(line))
            except ValueError:
                raise FormatError("file index holds a line that is not JSON") from None
            if last is not None and entry.key <= last:
                raise FormatError(f"file index is out of order at {entry.name!r}")
            last = entry.key
            yield entry
    if pending.strip():
        raise FormatError("file index ends in the middle of a line: it is truncated")


# -- tar streams --

class HashingReader:
    """Passes a file's bytes through while taking their md5 and sha256."""

    def __init__(self, src: BinaryIO):
        self._src = src
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.sha256 = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._src.read(n)
        self.md5.update(data)
        self.sha256.update(data)
        self.size += len(data)
        return data


def tarinfo(entry: Entry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(os.fsdecode(entry.path))
    info.mode, info.uid, info.gid = entry.mode, entry.uid, entry.gid
    info.mtime = entry.mtime_ns / 1e9  # a float: PAX keeps the fraction
    if entry.type == FILE:
        info.type, info.size = tarfile.REGTYPE, entry.size
    elif entry.type == DIR:
        info.type = tarfile.DIRTYPE
    else:
        assert entry.target is not None
        info.type, info.linkname = tarfile.SYMTYPE, os.fsdecode(entry.target)
    return info


def open_tar_writer(sink: Any) -> tarfile.TarFile:
    tar = tarfile.open(fileobj=sink, mode="w|", bufsize=TAR_BUFSIZE, **_TAR_KW)
    tar.copybufsize = READ_SIZE
    return tar


def add_file(tar: tarfile.TarFile, root: Path, entry: Entry, live: bool = False) -> str | None:
    """Add a regular file's content and take its md5 and sha256 on the way (into ``entry``).

    ``live``: the tree is in use (a source archived in place, not a staging copy). The entry is taken
    from the open file (it may have changed since the walk), and a file that changed while it was
    read is still stored as read, as GNU tar does: a file that shrank is padded with zeros to the
    size its header promised. The return says what happened (None: read whole and unchanged);
    the entry then keeps an mtime of 0, so the next run stores the file again.
    """
    fd = os.open(os.path.join(os.fsencode(root), entry.path), os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        before = os.fstat(fd) if live else None
        if before is not None:
            if not stat.S_ISREG(before.st_mode):
                raise IntegrityError(f"{entry.name} was replaced by something else than a file while it was archived")
            entry.size, entry.mtime_ns, entry.mode = before.st_size, before.st_mtime_ns, stat.S_IMODE(before.st_mode)
        reader = HashingReader(_PaddedReader(f, entry.size) if live else f)
        try:
            tar.addfile(tarinfo(entry), reader)  # type: ignore[arg-type]
            forget_members(tar)
        except OSError as exc:
            if "unexpected end of data" in str(exc):
                raise IntegrityError(f"{entry.name} shrank while it was archived") from None
            raise
        changed = None
        if before is not None:
            after = os.fstat(fd)
            if isinstance(reader._src, _PaddedReader) and reader._src.padded:
                changed = f"shrank while it was read: padded with {reader._src.padded} zero bytes"
            elif (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != (before.st_size, before.st_mtime_ns, before.st_ctime_ns):
                changed = "changed while it was read"
            if changed:
                entry.mtime_ns = 0  # never "unchanged" to the next run's comparison
    entry.md5, entry.sha256 = reader.md5.hexdigest(), reader.sha256.hexdigest()
    return changed


class _PaddedReader:
    """Exactly ``size`` bytes of a file in use: what is there, then zeros if it shrank meanwhile."""

    def __init__(self, src: BinaryIO, size: int):
        self._src, self._left, self.padded = src, size, 0

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        data = self._src.read(n) if n else b""
        if len(data) < n:
            self.padded += n - len(data)
            data += bytes(n - len(data))
        self._left -= len(data)
        return data


def forget_members(tar: tarfile.TarFile) -> None:
    """Drop tarfile's record of the members seen so far.

    ``TarFile`` keeps every member it writes or reads in ``members`` (~0.5 KiB each), which in a
    stream of 100,000 files is memory growing with the file count for nothing: our streams
    never look back.
    """
    tar.members.clear()


def iter_members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The members of a stream-mode archive, one at a time, without tarfile keeping them all."""
    while True:
        member = tar.next()
        if member is None:
            return
        forget_members(tar)
        yield member


def open_tar_reader(src: Any) -> tarfile.TarFile:
    return tarfile.open(fileobj=src, mode="r|", bufsize=TAR_BUFSIZE, **_TAR_KW)


def member_path(member: tarfile.TarInfo, dest: str) -> bytes:
    """The member's relative path as bytes, refused when it would escape ``dest`` (tarfile's data filter).

    Symlink members are never extracted (restores make links from the index, under their own
    rule for targets outside the destination), so only their names are checked here.
    """
    if not member.issym():
        try:
            tarfile.data_filter(member, dest)
        except tarfile.FilterError as exc:
            raise IntegrityError(f"archive member refused: {exc}",
                                 hint="the archive was not written by this program or was tampered with; nothing was restored") from None
        if not (member.isreg() or member.isdir()):
            raise IntegrityError(f"archive member {member.name!r} is a hard link or device; this program never writes those")
    return check_relative(os.fsencode(member.name))


def copy_member(tar: tarfile.TarFile, member: tarfile.TarInfo, out: BinaryIO | None) -> HashingReader:
    """Read a regular member's content (into ``out``, or only hashing it)."""
    src = tar.extractfile(member)
    assert src is not None
    reader = HashingReader(src)  # type: ignore[arg-type]
    while True:
        block = reader.read(READ_SIZE)
        if not block:
            break
        if out is not None:
            out.write(block)
    if reader.size != member.size:
        raise IntegrityError(f"archive member {member.name!r} ends after {reader.size} of {member.size} bytes")
    return reader


def content_mismatch(entry: Entry, got: HashingReader) -> str | None:
    """Why the content read for ``entry`` is not the content indexed, or None when it is."""
    if got.size != entry.size:
        return f"size {got.size}, index says {entry.size}"
    if got.sha256.hexdigest() != entry.sha256:
        return "sha256 differs from the index"
    if got.md5.hexdigest() != entry.md5:
        return "md5 differs from the index"
    return None


def members_for(tar: tarfile.TarFile, wanted: Iterator[Entry], dest: str) -> Iterator[tuple[tarfile.TarInfo, Entry]]:
    """Each wanted file entry paired with its member, in order; other members are checked and skipped.

    Every member's name is checked against escaping ``dest``, wanted or not. A wanted entry
    the archive does not hold is an ``IntegrityError``: a restore never completes without it.
    """
    want = next(wanted, None)
    for member in iter_members(tar):
        rel = member_path(member, dest)
        if want is None or not member.isreg():
            continue
        key = path_key(rel)
        if key < want.key:
            continue
        if key > want.key:
            break
        yield member, want
        want = next(wanted, None)
    if want is not None:
        raise IntegrityError(f"{want.name!r} is missing from the archive that should hold it",
                             hint="the archive does not match its index; restore from another backup")


# -- restored trees --

def apply_metadata(entries: Iterable[Entry], root: Path, set_owner: bool) -> None:
    """Modes, mtimes (and, as root, owners) from the index; folders last and deepest first."""
    base = os.fsencode(root)
    dirs: list[Entry] = []
    for e in entries:
        path = os.path.join(base, e.path)
        if not os.path.lexists(path):
            continue  # a skipped link
        if e.type == DIR:
            dirs.append(e)
            continue
        _apply(e, path, set_owner)
    for e in sorted(dirs, key=lambda d: d.path.count(b"/"), reverse=True):
        _apply(e, os.path.join(base, e.path), set_owner)


def _apply(e: Entry, path: bytes, set_owner: bool) -> None:
    link = e.type == SYMLINK
    if set_owner:
        os.chown(path, e.uid, e.gid, follow_symlinks=False)
    if not link:
        # setuid/setgid bits are not restored: user files never need them, and they would be a risk
        os.chmod(path, e.mode & 0o1777)
    os.utime(path, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)


def md5_check(entries: Iterable[Entry], root: Path) -> tuple[int, list[dict[str, Any]]]:
    """md5 of every restored file read back from disk against the index (the procedure's md5sum check)."""
    base = os.fsencode(root)
    checked, mismatches = 0, []
    for e in entries:
        if e.type != FILE:
            continue
        path = os.path.join(base, e.path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            mismatches.append({"path": e.name, "problem": f"not restored: {exc.strerror}"})
            continue
        md5 = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "rb") as f:
            while block := f.read(READ_SIZE):
                md5.update(block)
        checked += 1
        if md5.hexdigest() != e.md5:
            mismatches.append({"path": e.name, "problem": f"md5 {md5.hexdigest()}, backup says {e.md5}"})
    return checked, mismatches
