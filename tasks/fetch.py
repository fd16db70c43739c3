"""Fetch stage of the config backup: a host's configured paths over SFTP, into the archive and the git copy.

Paths are absolute, with shell-style globs in any segment (``/srv/apps/*/docker-compose.yml``);
a folder is fetched whole. Symlinks stay links (``sites-enabled`` is links into
``sites-available``). Modes, owners and mtimes are recorded for a restore to put back; git keeps
none of them. Files over ``max_file_bytes`` are left out and reported: configs are small, and a
large file there is usually a log or a dump that does not belong in git. ``.git`` folders are
never fetched (etckeeper keeps one in /etc): the copy in our repository would be a nested one.

Each file is read into memory (bounded by ``max_file_bytes``) and goes two ways: as it is into
the archive's tar stream (encrypted before it touches disk), and scrubbed of secrets
(``config_secrets.scrub``) into the host's folder of the git working copy. The real content never
sits on this machine's disk.
"""

from __future__ import annotations

import fnmatch
import json
import os
import posixpath
import socket
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import paramiko
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from luxima_backup import config_archive, config_secrets, procs, runtime
from luxima_backup.errors import ConfigError
from luxima_backup.pipes import Link, stage
from luxima_backup.settings import Settings
from luxima_backup.ssh import SshError

READ_SIZE = 1 << 20
_GLOB = set("*?[")
ALWAYS_EXCLUDED = [".git", config_archive.INDEX_NAME]
META_NAME = ".luxima-meta.json"  # in each host's git folder: what git cannot hold (modes, owners, what was redacted)


@dataclass
class Fetched:
    """What one host's fetch brought, and what it could not."""

    files: dict[str, dict[str, Any]] = field(default_factory=dict)   # absolute path -> size, mode, uid, gid, mtime, (link target)
    missing: list[str] = field(default_factory=list)                 # configured paths that matched nothing
    too_large: list[str] = field(default_factory=list)
    bytes: int = 0


@dataclass
class RemoteFile:
    """One fetched file (``data``) or symlink (``meta['symlink']``)."""

    path: str
    meta: dict[str, Any]
    data: bytes | None


def _excluded(path: str, exclude: list[str]) -> bool:
    name = posixpath.basename(path)
    return any(fnmatch.fnmatchcase(path, pat) or fnmatch.fnmatchcase(name, pat) for pat in [*ALWAYS_EXCLUDED, *exclude])


def matches(path: str, patterns: list[str]) -> bool:
    """Whether an absolute path is one of ``patterns`` (globs) or inside one of them."""
    for pat in patterns:
        pat = pat.rstrip("/") or "/"
        if fnmatch.fnmatchcase(path, pat) or fnmatch.fnmatchcase(path, pat.rstrip("/") + "/*"):
            return True
    return False


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


def walk_paths(sftp: paramiko.SFTPClient, patterns: list[str], exclude: list[str], max_file_bytes: int,
               out: Fetched, read: bool = True) -> Iterator[RemoteFile]:
    """Every file and symlink under the paths matching ``patterns``, read (``read``: else only listed, ``data`` None);
    ``out`` collects what was found and not."""
    for pattern in patterns:
        matched = False
        for path in expand(sftp, pattern):
            matched = True
            yield from _walk(sftp, path, exclude, max_file_bytes, out, read)
        if not matched:
            out.missing.append(pattern)


def _denied(path: str) -> SshError:
    return SshError(f"cannot read {path} on the host: permission denied",
                    hint="give the backup user read access (e.g. a group) to the configured paths")


def _walk(sftp: paramiko.SFTPClient, path: str, exclude: list[str], max_file_bytes: int,
          out: Fetched, read: bool = True) -> Iterator[RemoteFile]:
    if path in out.files or _excluded(path, exclude):
        return
    try:
        attr = sftp.lstat(path)
    except FileNotFoundError:
        return  # removed since it was listed
    except PermissionError as exc:
        raise _denied(path) from exc
    mode = attr.st_mode or 0
    if stat.S_ISDIR(mode):
        try:
            children = sorted(sftp.listdir_attr(path), key=lambda a: a.filename)
        except PermissionError as exc:
            raise _denied(path) from exc
        except UnicodeDecodeError:
            raise SshError(f"a file name in {path} on the host is not UTF-8",
                           hint="rename it, or add the folder (or the file) to the host's exclude") from None
        for child in children:
            yield from _walk(sftp, posixpath.join(path, child.filename), exclude, max_file_bytes, out, read)
        return
    meta: dict[str, Any] = {"mode": stat.S_IMODE(mode), "uid": attr.st_uid, "gid": attr.st_gid,
                            "mtime": int(attr.st_mtime or 0)}
    if stat.S_ISLNK(mode):
        meta.update(symlink=sftp.readlink(path), size=0)
        out.files[path] = meta
        yield RemoteFile(path, meta, None)
        return
    if not stat.S_ISREG(mode):
        return  # sockets, fifos, devices are not configuration
    size = attr.st_size or 0
    if size > max_file_bytes:
        out.too_large.append(path)
        return
    if not read:
        meta["size"] = size
        out.files[path] = meta
        yield RemoteFile(path, meta, None)
        return
    data = read_remote(sftp, path, size)
    meta["size"] = len(data)
    out.files[path] = meta
    out.bytes += len(data)
    yield RemoteFile(path, meta, data)


def read_remote(sftp: paramiko.SFTPClient, path: str, size: int) -> bytes:
    """A remote file's content; a file that changed size while being read is a transient error (try again)."""
    try:
        with sftp.open(path, "rb") as src:
            if size:
                src.prefetch(size)  # pipelined reads: one round trip per file, not per block
            data = src.read(size + 1)
    except PermissionError as exc:
        raise _denied(path) from exc
    except (socket.timeout, TimeoutError):
        raise  # the host went silent: said once, by fetch
    except (OSError, paramiko.SSHException) as exc:
        raise SshError(f"fetching {path} failed: {exc}", transient=True) from exc
    if len(data) != size:
        raise SshError(f"{path} changed while it was fetched ({len(data)} bytes, {size} expected)", transient=True)
    return data


# --- the git copy ----------------------------------------------------------------------


def write_scrubbed(stage_dir: Path, f: RemoteFile, key: bytes, rules: config_secrets.Rules) -> list[dict[str, Any]]:
    """Write the git copy of one file under ``stage_dir``; returns what was redacted (never values)."""
    local = stage_dir / f.path.lstrip("/")
    local.parent.mkdir(parents=True, exist_ok=True)
    # Overlapping paths can reach a file through a folder already fetched as a symlink
    # (/srv/app and /srv/app/current/app.yml, current -> releases/7): writing it would follow the link.
    if os.path.realpath(local.parent) != os.path.join(os.path.realpath(stage_dir), f.path.lstrip("/").rpartition("/")[0]).rstrip("/") \
            or os.path.lexists(local):
        raise ConfigError(f"{f.path} is reached twice or through a symlink that is itself backed up",
                          hint="make the configured paths of this host not overlap through symlinks")
    if f.data is None:
        os.symlink(f.meta["symlink"], local)
        return []
    clean, findings = config_secrets.scrub(f.path, f.data, key, rules)
    # git records only the executable bit; the real mode is in the meta file
    fd = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o755 if f.meta["mode"] & 0o111 else 0o644)
    with os.fdopen(fd, "wb") as out:
        out.write(clean)
    return [{"line": x.line, "kind": x.kind, "name": x.name} for x in findings]


def content_digest(files: dict[str, dict[str, Any]], key: bytes) -> str:
    """A keyed digest of a host's fetched set (each file's fingerprint, mode, owner, link target).

    The same value is in the git copy's meta file and in the archive's manifest: it is how a
    restore finds the archive holding the real content of a commit.
    """
    canon = {p: [m.get("fingerprint"), m["mode"], m["uid"], m["gid"], m.get("symlink")] for p, m in sorted(files.items())}
    return config_secrets.fingerprint(json.dumps(canon, sort_keys=True).encode(), key)


def fingerprint_key(settings: Settings) -> bytes:
    ref = settings.configs.fingerprint_key
    if ref is None:
        raise ConfigError("configs.fingerprint_key is not set",
                          hint="reference a random key of at least 16 bytes, e.g. 'vault:secret/luxima-backup/configs#fingerprint_key' "
                               "(openssl rand -base64 32); it must never be in the repository")
    key = runtime.secret(ref, settings).encode()
    if len(key) < config_secrets.MIN_KEY_BYTES:
        raise ConfigError(f"configs.fingerprint_key ({ref}) is shorter than 16 bytes", hint="use openssl rand -base64 32")
    return key


def secret_rules(settings: Settings) -> config_secrets.Rules:
    r = settings.configs.secrets
    return config_secrets.Rules.default(r.names, r.patterns, r.files, r.allow)


def fetch_host(sftp: paramiko.SFTPClient, host: str, settings: Settings, tar_sink: Any, stage_dir: Path,
               key: bytes) -> dict[str, Any]:
    """Fetch one host's configs: real files into the tar stream, scrubbed copies and the meta file into ``stage_dir``."""
    cfg = settings.config_host(host)
    rules = secret_rules(settings)
    out = Fetched()
    tar = config_archive.open_writer(tar_sink)
    index: dict[str, dict[str, Any]] = {}
    meta: dict[str, dict[str, Any]] = {}
    redactions = 0
    for f in walk_paths(sftp, cfg.paths, cfg.exclude, settings.configs.max_file_bytes, out):
        entry = config_archive.add_file(tar, f.path, f.meta, f.data)
        found = write_scrubbed(stage_dir, f, key, rules)
        redactions += len(found)
        fp = config_secrets.fingerprint(f.data, key) if f.data is not None else None
        entry.update(fingerprint=fp, redacted=len(found))
        index[f.path] = entry
        m: dict[str, Any] = {"mode": f"{f.meta['mode']:04o}", "uid": f.meta["uid"], "gid": f.meta["gid"]}
        if f.data is None:
            m["symlink"] = f.meta["symlink"]
        else:
            m.update(size=len(f.data), fingerprint=fp)
            if found:
                m["redacted"] = found
        meta[f.path] = m
    digest = content_digest(index, key)
    config_archive.add_index(tar, {"host": host, "files": index, "missing": out.missing, "too_large": out.too_large,
                                   "content_digest": digest})
    tar.close()
    # No timestamps in the meta file: an unchanged host must give a byte-identical git tree.
    doc = {"host": host, "files": meta, "missing": out.missing, "too_large": out.too_large, "content_digest": digest,
           "note": "secret values are replaced by luxima-redacted:hmac-sha256 fingerprints; the real files are only "
                   "in the encrypted archive (luxima-backup restore configs)"}
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / META_NAME).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    files = sum(1 for e in index.values() if "symlink" not in e)
    return {"files": files, "symlinks": len(index) - files, "bytes": out.bytes, "missing": out.missing,
            "too_large": out.too_large, "redactions": redactions, "content_digest": digest}


@task(name="fetch", cache_policy=NO_CACHE, persist_result=False)
def fetch(host: str, sink: Link, stage_dir: str) -> dict[str, Any]:
    """Fetch a host's configs over SFTP: real files into the archive stream, scrubbed copies for git."""
    settings = runtime.settings()
    logger = get_run_logger()
    key = fingerprint_key(settings)
    started = time.monotonic()
    silence = settings.hosts[host].io_timeout
    with stage(None, sink), runtime.connect_host(host, settings) as client:
        # Closing the connection is what ends a read blocked on a host that stopped answering: the run's
        # time limits do it through procs.stop_all, the channel's timeout after io_timeout of silence.
        with procs.cancellable(client.close), client.open_sftp() as sftp:
            sftp.get_channel().settimeout(silence)
            try:
                result = fetch_host(sftp, host, settings, sink.writer(), Path(stage_dir), key)
            except (socket.timeout, TimeoutError) as exc:
                raise SshError(f"{host} sent nothing for {silence:g} s while its configs were read; it may be down or "
                               "its network cut", transient=True,
                               hint=f"if the host is only slow, raise hosts.{host}.io_timeout") from exc
    result["seconds"] = round(time.monotonic() - started, 3)
    for path in result["missing"]:
        logger.warning("%s: configured path %s matches nothing on the host", host, path)
    for path in result["too_large"]:
        logger.warning("%s: %s is larger than configs.max_file_bytes and was left out", host, path)
    logger.info("fetched %d files and %d symlinks (%d bytes) from %s; %d secret values redacted in the git copy",
                result["files"], result["symlinks"], result["bytes"], host, result["redactions"])
    return result
