"""The head of a pg_dump custom-format archive: where its table of contents ends.

A restore streams the dump straight into ``pg_restore``, which cannot run in parallel from a pipe.
What a parallel restore needs after the data is loaded (indexes, constraints, triggers: the
post-data section) is in the archive's table of contents alone, which pg_dump writes at the start
of the archive, before any row. Knowing exactly where the TOC ends lets the restore keep those
bytes (DDL, no rows) aside while the stream passes on, and give them to ``pg_restore --jobs`` as a
small seekable archive that holds no data blocks.

The layout is pg_dump's (``ReadHead`` and ``ReadToc`` in ``src/bin/pg_dump/pg_backup_archiver.c``,
``_ReadExtraToc`` in ``pg_backup_custom.c``): integers are a sign byte then ``intSize`` bytes, least
significant first; strings are such an integer length (negative: NULL) then the bytes; each TOC
entry of a custom archive ends with a data-offset flag byte and ``offSize`` bytes. Only the archive
versions written by pg_dump 12 to 17 are read; anything else is refused, and the caller restores in
one stream instead.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Iterator

from .errors import FormatError

MAGIC = b"PGDMP"
FORMAT_CUSTOM = 1


def _version(major: int, minor: int, rev: int = 0) -> int:
    return (major << 16) | (minor << 8) | rev


K_VERS_1_14 = _version(1, 14)  # pg_dump 12-15
K_VERS_1_15 = _version(1, 15)  # pg_dump 16: the compression algorithm is a byte
K_VERS_1_16 = _version(1, 16)  # pg_dump 17: relkind in each TOC entry
SUPPORTED = (K_VERS_1_14, K_VERS_1_15, K_VERS_1_16)


class NeedMore(Exception):
    """The bytes so far end inside the head: read more of the stream and try again."""


class UnsupportedArchive(Exception):
    """Not a custom-format archive of a version this reader knows."""


# Sections of a TOC entry (pg_backup.h's teSection).
SECTION_PRE_DATA, SECTION_DATA, SECTION_POST_DATA = 2, 3, 4
# Block types after the TOC (pg_backup_custom.c): a table's COPY rows, or large objects.
BLK_DATA, BLK_BLOBS = 1, 3


@dataclass(frozen=True)
class TocEntry:
    dump_id: int
    desc: str            # "TABLE DATA", "SEQUENCE SET", "INDEX", ...
    tag: str             # the object's name
    namespace: str
    section: int
    defn: str            # the statement(s) that make the object (DDL, a setval, a SET)
    copy_stmt: str       # TABLE DATA: the COPY ... FROM stdin its rows go through


@dataclass(frozen=True)
class Head:
    version: str
    entries: int
    toc_end: int       # bytes from the start of the archive to the end of its table of contents
    int_size: int = 4
    compressed: bool = False  # pg_dump compressed the data blocks itself (not with --compress=0)
    toc: tuple[TocEntry, ...] = ()


class _Cursor:
    def __init__(self, data: bytes | memoryview):
        self.data = memoryview(data)
        self.pos = 0
        self.int_size = 4
        self.off_size = 8

    def take(self, n: int) -> memoryview:
        if n < 0:
            raise UnsupportedArchive("negative length in the archive's head")
        end = self.pos + n
        if end > len(self.data):
            raise NeedMore()
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def byte(self) -> int:
        return self.take(1)[0]

    def int(self) -> int:
        sign = self.byte()
        raw = self.take(self.int_size)
        value = int.from_bytes(raw, "little")
        return -value if sign else value

    def skip_str(self) -> bool:
        """Skip one string; False when it is NULL."""
        n = self.int()
        if n < 0:
            return False
        self.take(n)
        return True

    def str(self) -> str:
        """One string (NULL as empty), decoded as pg_dump wrote it (the dump's own encoding is ASCII-compatible)."""
        n = self.int()
        return "" if n < 0 else bytes(self.take(n)).decode("utf-8", "replace")


def read_head(data: bytes | memoryview) -> Head:
    """Parse the archive's header and table of contents from its first bytes.

    Raises ``NeedMore`` when ``data`` ends before the TOC does, ``UnsupportedArchive`` when the
    bytes are not a custom-format archive of a known version.
    """
    c = _Cursor(data)
    if bytes(c.take(5)) != MAGIC:
        raise UnsupportedArchive("not a pg_dump custom-format archive (no PGDMP magic)")
    vmaj, vmin, vrev = c.byte(), c.byte(), c.byte()
    version = _version(vmaj, vmin, vrev)
    if version not in SUPPORTED:
        raise UnsupportedArchive(f"archive version {vmaj}.{vmin}.{vrev} is not one this reader knows")
    c.int_size, c.off_size = c.byte(), c.byte()
    if not (1 <= c.int_size <= 8 and 1 <= c.off_size <= 8):
        raise UnsupportedArchive("implausible integer sizes in the archive's header")
    if c.byte() != FORMAT_CUSTOM:
        raise UnsupportedArchive("not a custom-format archive")
    if version >= K_VERS_1_15:
        compressed = c.byte() != 0   # compression algorithm: 0 is none
    else:
        compressed = c.int() != 0    # compression level: 0 is none (-1 is zlib's default)
    for _ in range(7):    # creation time: sec, min, hour, mday, mon, year, isdst
        c.int()
    c.skip_str()          # database name
    c.skip_str()          # server version
    c.skip_str()          # pg_dump version
    count = c.int()
    if count < 0:
        raise UnsupportedArchive("negative TOC entry count")
    toc = []
    for _ in range(count):
        dump_id = c.int()
        c.int()           # had dumper
        c.skip_str()      # catalog id: tableoid
        c.skip_str()      # catalog id: oid
        tag = c.str()
        desc = c.str()
        section = c.int()
        defn = c.str()
        c.skip_str()      # drop statement
        copy_stmt = c.str()
        namespace = c.str()
        c.skip_str()      # tablespace
        c.skip_str()      # table access method
        if version >= K_VERS_1_16:
            c.int()       # relkind
        c.skip_str()      # owner
        c.skip_str()      # "with oids" (always false since pg 12)
        while c.skip_str():  # dependencies, ended by NULL
            pass
        c.byte()          # data offset state
        c.take(c.off_size)
        toc.append(TocEntry(dump_id, desc, tag, namespace, section, defn, copy_stmt))
    return Head(f"{vmaj}.{vmin}.{vrev}", count, c.pos, c.int_size, compressed, tuple(toc))


# -- the data blocks after the TOC --

_INT = struct.Struct("<BI")  # an archive integer of 4 bytes: sign byte, then least significant byte first
READ_SIZE = 1 << 20


class DataBlocks:
    """The data blocks that follow the table of contents of an archive pg_dump wrote to a pipe, read from a stream.

    Each block is its type, the dump id of its TOC entry, then the data in pieces (a length, then that many bytes)
    ended by a length of 0 (``_StartData``, ``_CustomWriteFunc`` and ``_EndData`` in ``pg_backup_custom.c``). An
    uncompressed archive holds a table's COPY rows as they are, usually one row per piece; ``data`` joins them
    into large pieces cut at row ends (COPY's text format escapes newlines in values, so a newline ends a row).
    A large objects' block is, for each one, its oid then its data as above, ended by an oid of 0 (``_LoadLOs``).
    Only archives whose integers have 4 bytes and whose data pg_dump did not compress are read here.
    """

    def __init__(self, head: Head, after_toc: bytes, reader: Any):
        if head.int_size != 4 or head.compressed:
            raise UnsupportedArchive("only uncompressed archives with 4-byte integers are read block by block")
        self._buf = after_toc
        self._pos = 0
        self._reader = reader

    def _refill(self, buf: bytes, pos: int, need: int, at_block_start: bool = False) -> tuple[bytes, int]:
        rest = buf[pos:]
        while len(rest) < need:
            block = self._reader.read(max(READ_SIZE, need - len(rest)))
            if not block:
                if at_block_start and not rest:
                    return b"", 0
                raise FormatError("the dump ends inside a data block", hint="the backup is incomplete; restore another one")
            rest += block
        return rest, 0

    def next_block(self) -> tuple[int, int] | None:
        """The next block's (type, dump id); None at the end of the archive."""
        buf, pos = self._buf, self._pos
        if len(buf) - pos < 6:
            buf, pos = self._refill(buf, pos, 6, at_block_start=True)
            if not buf:
                self._buf, self._pos = buf, pos
                return None
        kind = buf[pos]
        sign, dump_id = _INT.unpack_from(buf, pos + 1)
        self._buf, self._pos = buf, pos + 6
        if kind not in (BLK_DATA, BLK_BLOBS) or sign:
            raise FormatError(f"unknown data block (type {kind}) in the dump", hint="the backup is damaged; restore another one")
        return kind, dump_id

    def next_large_object(self) -> int | None:
        """In a large objects' block: the next one's oid, None after the last (then read its data with ``data``)."""
        buf, pos = self._buf, self._pos
        if len(buf) - pos < 5:
            buf, pos = self._refill(buf, pos, 5)
        sign, oid = _INT.unpack_from(buf, pos)
        self._buf, self._pos = buf, pos + 5
        if sign:
            raise FormatError("a negative large object oid in the dump", hint="the backup is damaged; restore another one")
        return oid or None

    def data(self, piece: int = READ_SIZE, rows: bool = False) -> Iterator[bytes]:
        """The current data's pieces joined to about ``piece`` bytes; ``rows``: each piece ends at the end of a row."""
        buf, pos = self._buf, self._pos
        parts: list[bytes] = []
        size = 0
        unpack = _INT.unpack_from
        while True:
            if len(buf) - pos < 5:
                buf, pos = self._refill(buf, pos, 5)
            sign, n = unpack(buf, pos)
            pos += 5
            if sign:
                raise FormatError("a negative length in a data block of the dump", hint="the backup is damaged; restore another one")
            if n == 0:
                break
            if len(buf) - pos < n:
                buf, pos = self._refill(buf, pos, n)
            parts.append(buf[pos:pos + n])
            pos += n
            size += n
            if size >= piece:
                data = b"".join(parts)
                cut = data.rfind(b"\n") + 1 if rows else len(data)
                if cut:  # else one row longer than a piece so far: keep reading
                    self._buf, self._pos = buf, pos
                    yield data[:cut]
                    parts, size = ([data[cut:]], len(data) - cut) if cut < len(data) else ([], 0)
                else:
                    parts = [data]
        self._buf, self._pos = buf, pos
        if size:
            yield b"".join(parts)
