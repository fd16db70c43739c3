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

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Head:
    version: str
    entries: int
    toc_end: int       # bytes from the start of the archive to the end of its table of contents


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
        c.byte()          # compression algorithm
    else:
        c.int()           # compression level
    for _ in range(7):    # creation time: sec, min, hour, mday, mon, year, isdst
        c.int()
    c.skip_str()          # database name
    c.skip_str()          # server version
    c.skip_str()          # pg_dump version
    count = c.int()
    if count < 0:
        raise UnsupportedArchive("negative TOC entry count")
    for _ in range(count):
        c.int()           # dump id
        c.int()           # had dumper
        c.skip_str()      # catalog id: tableoid
        c.skip_str()      # catalog id: oid
        c.skip_str()      # tag
        c.skip_str()      # desc
        c.int()           # section
        for _ in range(3):  # defn, drop statement, copy statement
            c.skip_str()
        c.skip_str()      # namespace
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
    return Head(f"{vmaj}.{vmin}.{vrev}", count, c.pos)
