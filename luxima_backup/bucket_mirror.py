"""Keep a local directory an exact mirror of the objects under a bucket prefix, and put restored files back."""

from __future__ import annotations

import contextlib
import fnmatch
import mimetypes
import os
import secrets
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import ConfigError, IntegrityError, ObjectNotFound, StorageError
from .settings import FileSource, Settings
from .storage import _TranslatingReader, translate_errors

BLOCK = 1 << 20
PARTIAL_PREFIX = ".luxima-partial-"
UPLOAD_PART = 8 * BLOCK
UPLOAD_CONCURRENCY = 4


@dataclass
class MirrorStats:
    files: int = 0            # objects mirrored (in the bucket under the prefix, excluding directory markers)
    bytes: int = 0            # their total size
    transferred_files: int = 0
    transferred_bytes: int = 0
    deleted_files: int = 0    # local files removed because their object is gone


def mirror_bucket(client: Any, bucket: str, prefix: str, dest: Path, *, exclude: Sequence[str] = ()) -> MirrorStats:
    """Make ``dest`` hold exactly the objects under ``prefix`` in ``bucket``, fetching only what changed.

    The part of a key after ``prefix`` (a folder: "" or ending in "/") is its path under ``dest``;
    keys ending in "/" are folder markers and become (possibly empty) directories. A local file
    is up to date when its size and its mtime in whole seconds equal the object's Size and
    LastModified; anything else is downloaded to a ``.luxima-partial-*`` file beside it, checked
    against ContentLength, fsynced and renamed into place with the object's mtime.

    ``exclude`` holds ``fnmatch`` patterns (case-sensitive; ``*`` also matches "/") on that
    path. An excluded object counts as absent: it is not downloaded and a local copy is
    removed, so the mirror, and every backup taken of it, never holds it. An excluded key is
    not checked for safety either, which lets an operator step around a malformed key.

    Local files and directories the listing does not account for are removed, partial files of
    an interrupted run included. The whole listing is read before anything local changes, so a
    failed listing deletes nothing.

    Raises ``IntegrityError`` for a key that would land outside ``dest`` (absolute, ".", "..",
    empty segments, NUL), for a path that is both an object and a folder, and for any symbolic
    link found below ``dest`` (``dest`` itself is the caller's choice and may be one). Every
    path below ``dest`` is opened relative to its parent's descriptor with ``O_NOFOLLOW``, so a
    link swapped in during the run is refused too, never followed. Storage failures surface as
    ``StorageError`` (``ObjectNotFound`` for a missing bucket); local disk failures as ``OSError``.
    """
    prefix = _folder(prefix)
    files, markers = _list(client, bucket, prefix, exclude)
    dirs = _folders_of(files, markers, prefix)
    stats = MirrorStats(files=len(files), bytes=sum(size for size, _ in files.values()))

    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        # Pruning first frees space before fetching, and clears a stale file where a folder is
        # now needed (or the reverse) so that no download meets the wrong kind of entry.
        stats.deleted_files = _prune(root, "", files, dirs)
        for marker in markers:
            os.close(_open_dir(root, marker.split("/"), create=True))
        with _DirCache(root) as parents:
            for rel, (size, mtime) in files.items():
                parent, _, name = rel.rpartition("/")
                dir_fd = parents.open(parent)
                if _up_to_date(dir_fd, name, size, mtime):
                    continue
                stats.transferred_bytes += _download(client, bucket, prefix + rel, dir_fd, name)
                stats.transferred_files += 1
    finally:
        os.close(root)
    return stats


def upload_tree(client: Any, bucket: str, prefix: str, src: Path, paths: Iterable[str], *, overwrite: bool) -> MirrorStats:
    """Upload each ``src/<path>`` to ``prefix + path``; refuse before uploading anything if one exists and not ``overwrite``.

    Paths must be safe relative paths of regular files under ``src``; symbolic links are
    refused, never followed, so nothing outside ``src`` can reach the bucket. Uploads stream
    through ``upload_fileobj`` in parts, holding at most ``UPLOAD_CONCURRENCY`` parts of
    ``UPLOAD_PART`` bytes in memory. Content-Type is guessed from the name (Supabase Storage
    serves it), as the original is not kept in the mirror. Objects get the upload time as
    LastModified, so a later ``mirror_bucket`` fetches them again.
    """
    from boto3.s3.transfer import TransferConfig

    prefix = _folder(prefix)
    wanted = list(dict.fromkeys(paths))
    for rel in wanted:
        _check_path(rel, rel, "file to upload")
    src_fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for rel in wanted:
            _check_regular(src_fd, rel)
        if not overwrite:
            existing = [prefix + rel for rel in wanted if _exists(client, bucket, prefix + rel)]
            if existing:
                more = f" and {len(existing) - 5} more" if len(existing) > 5 else ""
                raise ConfigError(f"{len(existing)} object(s) already exist in bucket {bucket}: {', '.join(existing[:5])}{more}",
                                  hint="restore with overwrite, or to another prefix")
        config = TransferConfig(multipart_threshold=UPLOAD_PART, multipart_chunksize=UPLOAD_PART,
                                max_concurrency=UPLOAD_CONCURRENCY, max_io_queue=UPLOAD_CONCURRENCY)
        # s3transfer reads a file object's parts into memory and queues up to 10 by default.
        config.max_in_memory_upload_chunks = UPLOAD_CONCURRENCY
        stats = MirrorStats()
        for rel in wanted:
            parts = rel.split("/")
            dir_fd = _open_dir(src_fd, parts[:-1], create=False)
            try:
                fd = _open_nofollow(dir_fd, parts[-1], os.O_RDONLY, rel)
            finally:
                os.close(dir_fd)
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode):  # swapped since the check above
                    raise IntegrityError(f"{rel!r} to upload is not a regular file")
                size = st.st_size
                content_type = mimetypes.guess_type(parts[-1])[0] or "application/octet-stream"
                with translate_errors(f"uploading {prefix + rel}"):
                    client.upload_fileobj(f, bucket, prefix + rel, ExtraArgs={"ContentType": content_type}, Config=config)
            stats.files += 1
            stats.bytes += size
            stats.transferred_files += 1
            stats.transferred_bytes += size
        return stats
    finally:
        os.close(src_fd)


def _folder(prefix: str) -> str:
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


def _check_path(rel: str, key: str, what: str) -> None:
    if not rel or rel.startswith("/") or "\0" in rel or any(p in {"", ".", ".."} for p in rel.split("/")):
        raise IntegrityError(f"unsafe {what} {key!r}: not a plain relative path",
                             hint="rename or remove it, or exclude it from the files backup")


def _list(client: Any, bucket: str, prefix: str, exclude: Sequence[str]) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """Files as path -> (size, mtime in whole seconds), and folder-marker paths, in key order."""
    files: dict[str, tuple[int, int]] = {}
    markers: list[str] = []
    paginator = client.get_paginator("list_objects_v2")
    with translate_errors(f"listing {bucket}/{prefix}"):
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                rel = key[len(prefix):]
                is_marker = rel.endswith("/")
                if is_marker:
                    rel = rel[:-1]
                    if not rel:  # the prefix's own marker
                        continue
                if any(fnmatch.fnmatchcase(rel, pattern) for pattern in exclude):
                    continue
                _check_path(rel, key, "object key")
                if is_marker:
                    markers.append(rel)
                else:
                    files[rel] = (int(obj["Size"]), _seconds(obj["LastModified"]))
    return files, markers


def _folders_of(files: dict[str, tuple[int, int]], markers: list[str], prefix: str) -> set[str]:
    """Every directory the mirror needs; refuses a path that is both an object and a folder."""
    dirs: set[str] = set()
    for path in [*markers, *(f.rpartition("/")[0] for f in files)]:
        while path and path not in dirs:
            dirs.add(path)
            path = path.rpartition("/")[0]
    clash = next((d for d in dirs if d in files), None)
    if clash is not None:
        raise IntegrityError(f"{prefix + clash!r} is both an object and a folder in the bucket; a directory cannot mirror both",
                             hint="rename one of them, or exclude it from the files backup")
    return dirs


def _seconds(when: Any) -> int:
    # Listings give milliseconds and GET headers whole seconds; both floor to the same second.
    return int(when.timestamp() // 1)


def _prune(dir_fd: int, rel: str, files: dict[str, tuple[int, int]], dirs: set[str]) -> int:
    """Remove what the listing does not account for below ``dir_fd``; the number of files removed."""
    removed = 0
    with os.scandir(dir_fd) as it:
        entries = list(it)
    for entry in entries:
        path = rel + entry.name
        if entry.is_symlink():
            raise IntegrityError(f"{path!r} in the mirror is a symbolic link; refusing to follow or replace it",
                                 hint="remove it: nothing but mirrored files belongs in the staging mirror")
        if entry.is_dir(follow_symlinks=False):
            sub = _open_nofollow(dir_fd, entry.name, os.O_RDONLY | os.O_DIRECTORY, path)
            try:
                removed += _prune(sub, path + "/", files, dirs)
            finally:
                os.close(sub)
            if path not in dirs:
                os.rmdir(entry.name, dir_fd=dir_fd)
        elif path not in files or not entry.is_file(follow_symlinks=False):
            os.unlink(entry.name, dir_fd=dir_fd)
            removed += 1
    return removed


def _open_nofollow(dir_fd: int, name: str, flags: int, rel: str) -> int:
    try:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        with contextlib.suppress(OSError):
            if stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                raise IntegrityError(f"{rel!r} is a symbolic link; refusing to follow it",
                                     hint="remove the link; only plain files and folders are mirrored") from None
        raise


def _open_dir(root_fd: int, parts: list[str], *, create: bool) -> int:
    """A descriptor of the directory ``parts`` below ``root_fd``, never through a symbolic link."""
    fd = os.dup(root_fd)
    try:
        for i, part in enumerate(parts):
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, dir_fd=fd)
            sub = _open_nofollow(fd, part, os.O_RDONLY | os.O_DIRECTORY, "/".join(parts[: i + 1]))
            os.close(fd)
            fd = sub
    except BaseException:
        os.close(fd)
        raise
    return fd


class _DirCache:
    """The last parent directory opened: keys come sorted, so neighbours mostly share it."""

    def __init__(self, root_fd: int):
        self.root_fd = root_fd
        self.rel: str | None = None
        self.fd = -1

    def open(self, rel: str) -> int:
        if rel != self.rel:
            self.close()
            self.fd = _open_dir(self.root_fd, rel.split("/") if rel else [], create=True)
            self.rel = rel
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.fd, self.rel = -1, None

    def __enter__(self) -> "_DirCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _up_to_date(dir_fd: int, name: str, size: int, mtime: int) -> bool:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == size and st.st_mtime_ns // 10**9 == mtime


def _download(client: Any, bucket: str, key: str, dir_fd: int, name: str) -> int:
    """Fetch ``key`` into ``name`` in ``dir_fd`` atomically; the number of bytes written."""
    with translate_errors(f"reading {key}"):
        resp = client.get_object(Bucket=bucket, Key=key)
    body = resp["Body"]
    expected = int(resp["ContentLength"])
    tmp = PARTIAL_PREFIX + secrets.token_hex(8)
    placed = False
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=dir_fd)
        with os.fdopen(fd, "wb") as out:
            reader = _TranslatingReader(body, key)
            written = 0
            while block := reader.read(BLOCK):
                out.write(block)
                written += len(block)
            if written != expected:
                raise StorageError(f"download of {key} ended after {written} of {expected} bytes", transient=True)
            out.flush()
            # The time of the version actually fetched, which may be newer than the listing's.
            mtime = _seconds(resp["LastModified"])
            os.utime(out.fileno(), ns=(mtime * 10**9, mtime * 10**9))
            os.fsync(out.fileno())
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        # No directory fsync per file: after a crash the next run compares again and refetches.
        placed = True
        return written
    finally:
        body.close()
        if not placed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)


def _check_regular(dir_fd: int, rel: str) -> None:
    parts = rel.split("/")
    parent = _open_dir(dir_fd, parts[:-1], create=False)
    try:
        st = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
    finally:
        os.close(parent)
    if not stat.S_ISREG(st.st_mode):
        raise IntegrityError(f"{rel!r} to upload is not a regular file", hint="only regular files are restored to a bucket")


def _exists(client: Any, bucket: str, key: str) -> bool:
    try:
        with translate_errors(f"checking {key}"):
            client.head_object(Bucket=bucket, Key=key)
    except ObjectNotFound:
        return False
    return True


_clients_lock = threading.Lock()


def source_client(settings: Settings, source: FileSource) -> Any:
    """A boto3 S3 client for a bucket source (its own endpoint and credentials, not the backup storage's)."""
    import boto3
    from botocore.config import Config

    from . import runtime

    creds: dict[str, Any] = {}
    if source.access_key_id is not None and source.secret_access_key is not None:
        creds = {"aws_access_key_id": runtime.secret(source.access_key_id, settings),
                 "aws_secret_access_key": runtime.secret(source.secret_access_key, settings)}
    config = Config(retries={"mode": "standard", "total_max_attempts": settings.storage.max_attempts},  # the first try included
                    s3={"addressing_style": "path"}, connect_timeout=settings.storage.connect_timeout,
                    read_timeout=settings.storage.read_timeout, request_checksum_calculation="when_required",
                    response_checksum_validation="when_required")
    with _clients_lock:  # boto3's default session is not thread-safe to create clients from
        return boto3.session.Session().client("s3", endpoint_url=source.endpoint_url, region_name=source.region,
                                              config=config, **creds)
