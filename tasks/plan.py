"""Diff stage of a config restore: what restoring an archive would change on the host, shown without secrets.

Each file of the archive (those the restore selects) is compared with what the host has now,
read over SFTP: ``create`` (not on the host), ``update`` (content or link target differs),
``metadata`` (same content, other mode or owner), ``same``, or ``conflict`` (a folder or special
file where the backup has a file; a restore never replaces those). The diff shown is between
the *scrubbed* versions of both sides, so a changed secret appears as a changed fingerprint
and its value never reaches the artifact or the log. Files under the host's configured paths
that the backup does not have are listed as ``extra`` and left alone, or, when the operator asks
for it (a site enabled since the backup would otherwise stay enabled), planned as ``remove``.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import hmac
import stat
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import paramiko
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from luxima_backup import config_secrets, runtime
from luxima_backup.compression import DecompressingReader
from luxima_backup.config_archive import Member, read_members
from luxima_backup.envelope import DecryptingReader, UnwrapFn
from luxima_backup.errors import ConfigError
from tasks.fetch import Fetched, fingerprint_key, matches, read_remote, secret_rules, walk_paths

DIFF_LINES = 200          # per file
DIFF_TOTAL_LINES = 3000   # per restore, in the artifact


@dataclass
class Step:
    """What a restore does to one path."""

    path: str
    action: str                    # create | update | metadata | same | conflict | extra | remove
    kind: str                      # file | symlink
    mode: int
    uid: int
    gid: int
    size: int
    digest: str | None             # HMAC-SHA256 under the fingerprint key: an unkeyed digest of a short secret file could be brute-forced
    symlink: str | None
    before: dict[str, Any] | None  # the host's entry now: type, mode, uid, gid, size, (symlink)
    diff: str = ""
    note: str = ""


@contextlib.contextmanager
def archive_members(spool: str, codec: str, unwrap: UnwrapFn, index_out: dict[str, Any]) -> Iterator[Iterator[Member]]:
    """The members of a downloaded (encrypted) config archive, authenticated and checked as they are read."""
    with open(spool, "rb") as f:
        yield read_members(DecompressingReader(DecryptingReader(f, unwrap), codec), index_out)  # type: ignore[arg-type]


def selector(paths: list[str] | None) -> Callable[[str], bool]:
    if not paths:
        return lambda p: True
    bad = [p for p in paths if not p.startswith("/")]
    if bad:
        raise ConfigError(f"restore paths must be absolute (as on the host): {bad}")
    return lambda p: matches(p, paths)


def host_entry(sftp: paramiko.SFTPClient, path: str) -> dict[str, Any] | None:
    """The host's entry at ``path`` now (not following links), or None."""
    try:
        st = sftp.lstat(path)
    except FileNotFoundError:
        return None
    mode = st.st_mode or 0
    kind = "symlink" if stat.S_ISLNK(mode) else "file" if stat.S_ISREG(mode) else "dir" if stat.S_ISDIR(mode) else "other"
    entry: dict[str, Any] = {"type": kind, "mode": stat.S_IMODE(mode), "uid": st.st_uid, "gid": st.st_gid, "size": st.st_size or 0}
    if kind == "symlink":
        entry["symlink"] = sftp.readlink(path)
    return entry


def redacted_diff(path: str, old: bytes, new: bytes, key: bytes, rules: config_secrets.Rules) -> str:
    """A unified diff of the scrubbed host file and the scrubbed backup file (no secret value in it)."""
    if b"\0" in old or b"\0" in new:
        return f"binary content differs ({len(old)} bytes on the host, {len(new)} in the backup)\n"
    a = config_secrets.scrub(path, old, key, rules)[0].decode("utf-8", "replace").splitlines(keepends=True)
    b = config_secrets.scrub(path, new, key, rules)[0].decode("utf-8", "replace").splitlines(keepends=True)
    lines = list(difflib.unified_diff(a, b, f"host:{path}", f"backup:{path}", n=2))
    if not lines:
        return "only secret values differ (their fingerprints are equal only when the values are)\n"
    text = "".join(ln if ln.endswith("\n") else ln + "\n" for ln in lines[:DIFF_LINES])
    return text + (f"... {len(lines) - DIFF_LINES} more diff lines\n" if len(lines) > DIFF_LINES else "")


def keyed_digest(data: bytes, key: bytes) -> str:
    """The content digest a restore compares after writing: keyed, so it reveals nothing about secret files."""
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def plan_member(sftp: paramiko.SFTPClient, m: Member, key: bytes, rules: config_secrets.Rules, max_bytes: int) -> Step:
    kind = "symlink" if m.symlink is not None else "file"
    digest = keyed_digest(m.data, key) if m.data is not None else None
    step = Step(m.path, "same", kind, m.mode, m.uid, m.gid, len(m.data or b""), digest, m.symlink, host_entry(sftp, m.path))
    now = step.before
    if now is None:
        step.action = "create"
        if m.data is not None:
            step.diff = redacted_diff(m.path, b"", m.data, key, rules)
        return step
    if now["type"] in ("dir", "other"):
        step.action, step.note = "conflict", f"the host has a {'folder' if now['type'] == 'dir' else 'special file'} there"
        return step
    if kind == "symlink":
        if now["type"] != "symlink" or now["symlink"] != m.symlink:
            step.action = "update"
            step.note = f"link to {m.symlink!r} (host: {now.get('symlink') or 'a regular file'})"
    elif now["type"] == "symlink":
        step.action, step.note = "update", f"a file (host: a link to {now['symlink']!r})"
    else:
        assert m.data is not None
        if now["size"] > max_bytes:  # a restore keeps a copy of what it replaces, in memory on the way
            step.action = "conflict"
            step.note = f"the host's file is {now['size']} bytes, over configs.max_file_bytes; move it aside first"
        else:
            current = read_remote(sftp, m.path, now["size"])
            if current != m.data:
                step.action = "update"
                step.diff = redacted_diff(m.path, current, m.data, key, rules)
    if step.action == "same" and kind == "file" and (now["mode"], now["uid"], now["gid"]) != (m.mode, m.uid, m.gid):
        step.action = "metadata"
        step.note = f"mode/owner {now['mode']:04o} {now['uid']}:{now['gid']} -> {m.mode:04o} {m.uid}:{m.gid}"
    return step


def plan_restore(sftp: paramiko.SFTPClient, members: Iterator[Member], select: Callable[[str], bool], key: bytes,
                 rules: config_secrets.Rules, max_bytes: int) -> list[Step]:
    return [plan_member(sftp, m, key, rules, max_bytes) for m in members if select(m.path)]


def extra_steps(sftp: paramiko.SFTPClient, patterns: list[str], exclude: list[str], max_bytes: int,
                in_backup: dict[str, Any], select: Callable[[str], bool], remove: bool) -> list[Step]:
    """Files and links under the configured paths on the host that the backup does not have."""
    listed = Fetched()
    found = []
    for f in walk_paths(sftp, patterns, exclude, max_bytes, listed, read=False):
        if f.path in in_backup or not select(f.path):
            continue
        m = f.meta
        kind = "symlink" if "symlink" in m else "file"
        before = {"type": kind, "mode": m["mode"], "uid": m["uid"], "gid": m["gid"], "size": m["size"]}
        if kind == "symlink":
            before["symlink"] = m["symlink"]
        found.append(Step(f.path, "remove" if remove else "extra", kind, m["mode"], m["uid"], m["gid"], m["size"], None,
                          m.get("symlink"), before, note="not in the backup: " + ("removed (a copy is kept)" if remove
                                                                                   else "left alone")))
    return found


@task(name="diff", cache_policy=NO_CACHE, persist_result=False, **runtime.TRANSIENT_RETRIES)
def diff(host: str, spool: str, codec: str, paths: list[str] | None, remove_extra: bool = False) -> dict[str, Any]:
    """Compare the archive with the host, file by file (secrets shown only as fingerprints), and list the host's extra files."""
    settings = runtime.settings()
    key = fingerprint_key(settings)
    rules = secret_rules(settings)
    select = selector(paths)
    index: dict[str, Any] = {}
    with runtime.connect_host(host, settings) as client, client.open_sftp() as sftp, \
            archive_members(spool, codec, runtime.key_provider(settings).unwrap, index) as members:
        steps = plan_restore(sftp, members, select, key, rules, settings.configs.max_file_bytes)
        cfg = settings.config_host(host)
        steps += extra_steps(sftp, cfg.paths, cfg.exclude, settings.configs.max_file_bytes, index.get("files", {}), select,
                             remove_extra)
    if index.get("host") != host:
        raise ConfigError(f"the archive is of host {index.get('host')!r}, not {host!r}")
    if paths and not steps:
        raise ConfigError(f"none of {paths} is in the backup of {host}",
                          hint="give absolute paths as on the host (a folder restores everything under it)")
    counts: dict[str, int] = {}
    for s in steps:
        counts[s.action] = counts.get(s.action, 0) + 1
    get_run_logger().info("restore plan for %s: %s", host, ", ".join(f"{n} {a}" for a, n in sorted(counts.items())))
    return {"steps": [asdict(s) for s in steps], "counts": dict(sorted(counts.items()))}
