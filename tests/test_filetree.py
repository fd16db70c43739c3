"""The file index and tar plumbing on their own: order, names that are not UTF-8, unsafe paths, links."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from luxima_backup.errors import FormatError, IntegrityError
from luxima_backup.filetree import DIR, FILE, SYMLINK, Entry, check_relative, index_line, read_index, walk
from tasks.extract import link_escapes, selector


def test_walk_order_is_the_order_of_paths_as_component_tuples(tmp_path: Path) -> None:
    for name in ["a", "a-c", "a/b", "a/b/z", "b"]:
        p = tmp_path / name
        if name in ("a", "a/b"):
            p.mkdir()
    (tmp_path / "a-c").write_text("")
    (tmp_path / "a" / "b" / "z").write_text("")
    (tmp_path / "b").write_text("")
    (tmp_path / "a" / "é").write_text("")
    paths = [rel for rel, _ in walk(tmp_path)]
    assert paths == [b"a", b"a/b", b"a/b/z", "a/é".encode(), b"a-c", b"b"]
    keys = [tuple(p.split(b"/")) for p in paths]
    assert keys == sorted(keys)  # what the merges in backup, verify and restore rely on


def test_index_lines_round_trip_names_that_are_not_utf8() -> None:
    entries = [Entry(path=b"caf\xe9/x\ny", type=FILE, mode=0o640, mtime_ns=1_600_000_000_123_456_789, size=3,
                     md5="m", sha256="s", archive="files-a-1"),
               Entry(path=b"link", type=SYMLINK, mode=0o777, mtime_ns=5, target=b"t\xff")]
    entries.sort(key=lambda e: e.key)
    raw = b"".join(index_line(e) for e in entries)
    assert b"path_b64" in raw and b"target_b64" in raw
    assert list(read_index(io.BytesIO(raw))) == entries
    assert entries[0].name == "caf\\xe9/x\ny"  # shown, never a surrogate that breaks JSON or logs


@pytest.mark.parametrize("bad", [b"/etc/passwd", b"../x", b"a/../../x", b"a//b", b".", b"", b"a/./b", b"nul\0byte"])
def test_unsafe_paths_are_refused(bad: bytes) -> None:
    with pytest.raises(IntegrityError):
        check_relative(bad)
    line = json.dumps({"path": bad.decode("latin-1"), "type": "file", "mode": 420, "mtime_ns": 0}).encode() + b"\n"
    with pytest.raises(IntegrityError):
        list(read_index(io.BytesIO(line)))


def test_a_truncated_or_reordered_index_is_refused() -> None:
    a = index_line(Entry(path=b"a", type=DIR, mode=0o755, mtime_ns=0))
    b = index_line(Entry(path=b"b", type=DIR, mode=0o755, mtime_ns=0))
    with pytest.raises(FormatError, match="truncated"):
        list(read_index(io.BytesIO(a + b[:-5])))
    with pytest.raises(FormatError, match="out of order"):
        list(read_index(io.BytesIO(b + a)))


@pytest.mark.parametrize("path,target,escapes", [
    (b"l", b"/etc/hostname", True), (b"l", b"x", False), (b"d/l", b"../x", False), (b"d/l", b"../../x", True),
    (b"l", b"../x", True), (b"d/e/l", b"./../../f/../g", False), (b"d/l", b"e/../../../x", True),
])
def test_link_escapes(path: bytes, target: bytes, escapes: bool) -> None:
    assert link_escapes(Entry(path=path, type=SYMLINK, mode=0o777, mtime_ns=0, target=target)) is escapes


def test_path_filter_keeps_the_path_and_what_is_under_it() -> None:
    keep = selector("photos/2026/")
    names = [b"photos", b"photos/2026", b"photos/2026/a.jpg", b"photos/20261", b"photos/2026-x/b"]
    assert [n for n in names if keep(Entry(path=n, type=FILE, mode=0, mtime_ns=0))] == [b"photos/2026", b"photos/2026/a.jpg"]
    with pytest.raises(IntegrityError):
        selector("../etc")
