"""Object storage behind one small interface: S3 (through prefect-aws blocks) or a local directory.

Contract of ``ObjectStore``:
  ``save(key, src)``        streams ``src`` to EOF into ``key`` (multipart); on any error, the
                            partial upload is aborted and nothing is left under ``key``.
                            ``src.read`` raising aborts the upload the same way. The info it
                            returns is ``proven`` when the storage's own digest of what it
                            received matched the bytes sent (S3: the ETag against the MD5 of
                            every part as it was read); otherwise only a read-back proves it.
  ``save_bytes(key, data)`` one atomic PUT of a small object (manifests).
  ``load(key)``             a readable stream of the object.
  ``stat(key)``             size and metadata; ``ObjectNotFound`` if absent.
  ``list(prefix)``          every object under ``prefix``, in key order.
  ``remove(key)``           delete (absent is not an error).
Retries: each HTTP request is retried inside the client (botocore's standard mode, with
backoff) on throttling, 5xx and connection errors; what still fails surfaces as a
``StorageError`` whose ``transient`` flag says whether a later whole-step retry may help.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import tempfile
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterator, Protocol

from .errors import ConfigError, ObjectNotFound, StorageError
from .settings import StorageSettings

if TYPE_CHECKING:
    from prefect_aws import S3Bucket


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    last_modified: datetime | None = None
    etag: str | None = None
    # Set by save() alone: the storage's digest of the bytes it received matched the bytes sent.
    proven: bool = False


class ObjectStore(Protocol):
    def save(self, key: str, src: BinaryIO) -> ObjectInfo: ...
    def save_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> ObjectInfo: ...
    def load(self, key: str) -> contextlib.AbstractContextManager[BinaryIO]: ...
    def stat(self, key: str) -> ObjectInfo: ...
    def list(self, prefix: str, start_after: str | None = None) -> Iterator[ObjectInfo]: ...
    def folders(self, prefix: str) -> list[str]: ...
    def remove(self, key: str) -> None: ...
    def purge(self, key: str) -> None: ...
    def locked_until(self, key: str) -> datetime | None: ...
    def stale_uploads(self, prefix: str, older_than: datetime) -> list[tuple[str, str]]: ...
    def abort_upload(self, key: str, upload_id: str) -> None: ...


_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
    "InternalError", "ServiceUnavailable", "503", "500", "502", "504",
}
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound", "NoSuchBucket", "NoSuchUpload"}
_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "AllAccessDisabled"}


@contextlib.contextmanager
def translate_errors(action: str, mid_body: bool = False) -> Iterator[None]:
    """botocore/s3transfer failures as ``StorageError``s, transient or not.

    A request's failure reaches here after botocore's own retries (``storage.max_attempts``): it is marked
    ``retried`` so no layer above repeats them. A body cut while it is read (``mid_body``) botocore cannot
    retry: the step reading it is retried whole instead.
    """
    retried = not mid_body
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import (
        BotoCoreError, ClientError, ConnectionError as BotoConnectionError, IncompleteReadError, ReadTimeoutError,
        ResponseStreamingError,
    )

    try:
        yield
    except ClientError as exc:
        raise _from_client_error(exc, action, retried) from None
    except S3UploadFailedError as exc:
        # s3transfer wraps the last ClientError in text only; classify by that text.
        text = str(exc)
        transient = any(code in text for code in _TRANSIENT_CODES) or "reached max retries" in text
        raise StorageError(f"upload failed while {action}: {text}", transient=transient, retried=transient) from None
    except (BotoConnectionError, ReadTimeoutError) as exc:
        raise StorageError(f"cannot reach object storage while {action}: {exc}", transient=True, retried=retried) from None
    except (IncompleteReadError, ResponseStreamingError) as exc:  # a connection cut mid-body
        raise StorageError(f"connection lost while {action}: {exc}", transient=True) from None
    except BotoCoreError as exc:
        raise StorageError(f"object storage error while {action}: {exc}") from None


def _from_client_error(exc: Any, action: str, retried: bool = True) -> StorageError:
    err = exc.response.get("Error", {})
    code = str(err.get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    msg = f"{code or status}: {err.get('Message', '')}".strip(": ")
    if code in _NOT_FOUND_CODES:
        return ObjectNotFound(f"not found while {action} ({msg})")
    if code in _AUTH_CODES:
        return StorageError(f"object storage denied access while {action} ({msg})", hint="check the storage credentials and bucket policy")
    transient = code in _TRANSIENT_CODES or (isinstance(status, int) and status >= 500)
    return StorageError(f"object storage failed while {action} ({msg})", transient=transient, retried=transient and retried)


@dataclass(frozen=True)
class LockPolicy:
    """S3 Object Lock for what a store writes: each object retained for its component's retention (the component is
    the key's segment after the prefix: ``<prefix>/<component>/...``) plus a margin. Keys of other components are
    written unlocked."""

    mode: str  # GOVERNANCE or COMPLIANCE
    days: dict[str, int]
    margin_days: int
    prefix: str

    def args(self, key: str) -> dict[str, Any]:
        component = key[len(self.prefix) + 1:].split("/", 1)[0] if key.startswith(self.prefix + "/") else ""
        days = self.days.get(component)
        if days is None:
            return {}
        until = datetime.now(timezone.utc) + timedelta(days=days + self.margin_days)
        # S3 takes a retention period only with a checksum of the body (Content-MD5 or a CRC)
        return {"ObjectLockMode": self.mode, "ObjectLockRetainUntilDate": until, "ChecksumAlgorithm": "CRC32"}


class S3Store:
    """``ObjectStore`` on an S3-compatible bucket: ``client`` gives the boto3 S3 client (a prefect-aws ``S3Bucket``
    block's, or one made from the settings)."""

    def __init__(self, client: Callable[[], Any], bucket_name: str, cfg: StorageSettings, lock: LockPolicy | None = None):
        self._make_client = client
        self.cfg = cfg
        self.name = bucket_name
        self.lock = lock

    def _lock_args(self, key: str) -> dict[str, Any]:
        return self.lock.args(key) if self.lock is not None else {}

    @property
    def _client(self) -> Any:
        return self._make_client()

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        part = self.cfg.multipart_chunk_mib * 1024 * 1024
        config = TransferConfig(
            multipart_threshold=part, multipart_chunksize=part, max_concurrency=self.cfg.max_concurrency,
            max_io_queue=self.cfg.max_concurrency, use_threads=True,
        )
        # A stream is read into whole parts in memory, and s3transfer buffers up to 10 of them by
        # default; bounding the buffer to the parts in flight keeps memory at
        # part size x (concurrency + 1) whatever the object size or the storage's speed.
        config.max_in_memory_upload_chunks = self.cfg.max_concurrency
        return config

    def save(self, key: str, src: BinaryIO) -> ObjectInfo:
        extra = self._lock_args(key)
        config = self._transfer_config()
        parts = PartDigests(src, config.multipart_chunksize)
        with translate_errors(f"uploading {key}"):
            self._client.upload_fileobj(parts, self.name, key, Config=config, ExtraArgs=extra or None)
        info = self.stat(key)
        return dataclasses.replace(info, proven=parts.matches(info.etag))

    def save_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> ObjectInfo:
        with translate_errors(f"writing {key}"):
            resp = self._client.put_object(Bucket=self.name, Key=key, Body=data, ContentType=content_type, **self._lock_args(key))
        etag = resp.get("ETag")
        return ObjectInfo(key, len(data), etag=etag, proven=etag_matches(etag, [hashlib.md5(data, usedforsecurity=False).digest()]))

    @contextlib.contextmanager
    def load(self, key: str) -> Iterator[BinaryIO]:
        with translate_errors(f"reading {key}"):
            body = self._client.get_object(Bucket=self.name, Key=key)["Body"]
        try:
            yield _TranslatingReader(body, key)
        finally:
            body.close()

    def stat(self, key: str) -> ObjectInfo:
        with translate_errors(f"checking {key}"):
            head = self._client.head_object(Bucket=self.name, Key=key)
        return ObjectInfo(key, int(head["ContentLength"]), head.get("LastModified"), head.get("ETag"))

    def list(self, prefix: str, start_after: str | None = None) -> Iterator[ObjectInfo]:
        """Objects under ``prefix`` in key order (``start_after``: only keys after it, as S3 lists them)."""
        paginator = self._client.get_paginator("list_objects_v2")
        extra = {"StartAfter": start_after} if start_after else {}
        with translate_errors(f"listing {prefix}"):
            for page in paginator.paginate(Bucket=self.name, Prefix=prefix, **extra):
                for obj in page.get("Contents", []):
                    yield ObjectInfo(obj["Key"], int(obj["Size"]), obj.get("LastModified"), obj.get("ETag"))

    def folders(self, prefix: str) -> list[str]:
        """The names of the folders directly under ``prefix`` (``prefix`` ends with ``/``)."""
        paginator = self._client.get_paginator("list_objects_v2")
        out = []
        with translate_errors(f"listing the folders of {prefix}"):
            for page in paginator.paginate(Bucket=self.name, Prefix=prefix, Delimiter="/"):
                out += [p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", [])]
        return out

    def remove(self, key: str) -> None:
        with translate_errors(f"removing {key}"):
            self._client.delete_object(Bucket=self.name, Key=key)

    def purge(self, key: str) -> None:
        """Remove the object for good: in a versioned bucket, every version of it (a plain delete would only hide it
        behind a delete marker and keep its bytes). A version under object lock is refused by the storage."""
        with translate_errors(f"listing the versions of {key}"):
            resp = self._client.list_object_versions(Bucket=self.name, Prefix=key)
        versions = [v for v in resp.get("Versions", []) + resp.get("DeleteMarkers", []) if v["Key"] == key]
        if not versions:
            return
        for v in versions:
            with translate_errors(f"removing {key} (version {v['VersionId']})"):
                self._client.delete_object(Bucket=self.name, Key=key, VersionId=v["VersionId"])

    def extend_lock(self, key: str) -> datetime | None:
        """Lock ``key`` (its current version) for its component's retention from now, when that is later than its lock
        (object lock can be extended, never shortened): an object a new backup reuses stays locked as long as that
        backup is kept. The new date, or None without object lock for that component."""
        args = self._lock_args(key)
        if not args:
            return None
        until = args["ObjectLockRetainUntilDate"]
        current = self.locked_until(key)
        if current is not None and current >= until:
            return current
        with translate_errors(f"extending the object lock of {key}"):
            self._client.put_object_retention(Bucket=self.name, Key=key, Retention={
                "Mode": args["ObjectLockMode"], "RetainUntilDate": until})
        return until

    def locked_until(self, key: str) -> datetime | None:
        """The object-lock retain-until date of the current version, if it has one still ahead."""
        with translate_errors(f"checking {key}"):
            head = self._client.head_object(Bucket=self.name, Key=key)
        until = head.get("ObjectLockRetainUntilDate")
        return until if until is not None and until > datetime.now(timezone.utc) else None

    def stale_uploads(self, prefix: str, older_than: datetime) -> list[tuple[str, str]]:
        """(key, upload id) of multipart uploads started before ``older_than`` and never completed or aborted."""
        with translate_errors(f"listing incomplete uploads under {prefix}"):
            resp = self._client.list_multipart_uploads(Bucket=self.name, Prefix=prefix)
        return [(u["Key"], u["UploadId"]) for u in resp.get("Uploads", []) if u["Initiated"] < older_than]

    def abort_upload(self, key: str, upload_id: str) -> None:
        with translate_errors(f"aborting the upload of {key}"):
            self._client.abort_multipart_upload(Bucket=self.name, Key=key, UploadId=upload_id)

    def incomplete_uploads(self, prefix: str) -> list[str]:
        """Keys of multipart uploads started and never completed or aborted under ``prefix``."""
        with translate_errors(f"listing incomplete uploads under {prefix}"):
            resp = self._client.list_multipart_uploads(Bucket=self.name, Prefix=prefix)
        return [u["Key"] for u in resp.get("Uploads", [])]


class PartDigests:
    """Reads through ``src``, keeping the MD5 of every ``part_size`` bytes: what S3 computes an ETag from.

    S3 and the S3-compatible stores derive an object's ETag from what they received: the MD5 of
    the object when it came in one PUT, ``md5(md5(part 1) + md5(part 2) + ...)-N`` when it came in N
    parts. Matching it against the MD5s of the bytes as they were sent proves, without a second
    download, that storage holds exactly them. Where the ETag means something else (SSE-KMS or SSE-C
    on AWS, some other stores) it does not match, and the caller reads the object back instead.
    """

    def __init__(self, src: Any, part_size: int):
        self._src = src
        self._part_size = part_size
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._filled = 0
        self.digests: list[bytes] = []

    def read(self, n: int = -1) -> bytes:
        data = self._src.read(n)
        view = memoryview(data)
        while view:
            take = min(len(view), self._part_size - self._filled)
            self._md5.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == self._part_size:
                self._close_part()
        return data

    def readable(self) -> bool:
        return True

    def _close_part(self) -> None:
        self.digests.append(self._md5.digest())
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._filled = 0

    def matches(self, etag: str | None) -> bool:
        """Whether ``etag`` is the one these bytes give, in one PUT or in parts."""
        if self._filled or not self.digests:
            self._close_part()  # the last, short part (or the empty object's only one)
        return etag_matches(etag, self.digests)


def etag_matches(etag: str | None, part_md5s: list[bytes]) -> bool:
    """Whether ``etag`` (as storage reports it, quoted) is what S3 derives from parts with these MD5s: the MD5 itself
    for an object that came in one PUT, ``md5(md5(part 1) + ...)-N`` for one that came in N parts."""
    if not etag:
        return False
    whole, _, count = etag.strip('"').lower().partition("-")
    if not count:
        return len(part_md5s) == 1 and whole == part_md5s[0].hex()
    return count == str(len(part_md5s)) and whole == hashlib.md5(b"".join(part_md5s), usedforsecurity=False).hexdigest()


class _TranslatingReader:
    """A streaming body whose mid-stream network errors surface as transient ``StorageError``s."""

    def __init__(self, body: Any, key: str):
        self._body = body
        self._key = key

    def read(self, n: int = -1) -> bytes:
        with translate_errors(f"reading {self._key}", mid_body=True):
            try:
                return self._body.read(n if n >= 0 else None)
            except (ConnectionError, OSError) as exc:
                raise StorageError(f"connection lost while reading {self._key}: {exc}", transient=True) from None

    def readable(self) -> bool:
        return True


def client_options(cfg: StorageSettings) -> dict[str, Any]:
    """How the storage's S3 client connects: one description for the client made from the settings and for the
    prefect-aws block registered from them (``AwsClientParameters`` takes the same fields)."""
    return {
        "endpoint_url": cfg.endpoint_url,
        "use_ssl": bool(cfg.endpoint_url is None or cfg.endpoint_url.startswith("https")),
        "verify": str(cfg.ca_bundle) if cfg.ca_bundle else cfg.verify_tls,
        "config": {
            "s3": {"addressing_style": cfg.addressing_style},
            # total_max_attempts counts the first try; botocore's max_attempts would count retries only (one more request)
            "retries": {"mode": "standard", "total_max_attempts": cfg.max_attempts},
            "connect_timeout": cfg.connect_timeout,
            "read_timeout": cfg.read_timeout,
            # Checksums only when the operation needs them: many S3-compatible servers reject
            # the newer default trailing CRC checksums on streamed uploads.
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
        },
    }


def _credentials(cfg: StorageSettings) -> dict[str, Any]:
    if cfg.access_key_id is not None and cfg.secret_access_key is not None:
        return {"aws_access_key_id": cfg.access_key_id.resolve(), "aws_secret_access_key": cfg.secret_access_key.resolve()}
    return {}  # boto3's own chain: environment, instance role


def make_bucket(cfg: StorageSettings) -> "S3Bucket":
    """The prefect-aws ``S3Bucket`` block: loaded by name, or built from the settings (to register it)."""
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    if cfg.s3_bucket_block:
        try:
            bucket = S3Bucket.load(cfg.s3_bucket_block)
        except ValueError as exc:
            raise StorageError(f"S3Bucket block {cfg.s3_bucket_block!r} not found", hint="register it with `luxima-backup deploy` or in the UI") from exc
        if bucket.bucket_folder:
            # Its uploads would go under the folder while every other request names the key alone.
            raise ConfigError(f"S3Bucket block {cfg.s3_bucket_block!r} has a bucket folder ({bucket.bucket_folder!r})",
                              hint=f"clear the block's bucket folder and set storage.prefix = \"{bucket.bucket_folder.strip('/')}/"
                                   f"{cfg.prefix}\" instead (objects are keyed under storage.prefix)")
        return bucket
    creds: dict[str, Any] = {"region_name": cfg.region, "aws_client_parameters": AwsClientParameters(**client_options(cfg)),
                             **_credentials(cfg)}
    assert cfg.bucket is not None
    return S3Bucket(bucket_name=cfg.bucket, credentials=AwsCredentials(**creds))


def _client_from_settings(cfg: StorageSettings) -> Callable[[], Any]:
    """The storage's S3 client made from the settings, once: the client a block registered from them gives, without
    importing prefect-aws (its ECS worker and aiohttp: 0.35 s and 15 MiB of every command that reaches storage)."""
    made: list[Any] = []
    lock = threading.Lock()

    def client() -> Any:
        with lock:  # boto3 sessions are not safe to make clients from in several threads at once
            if not made:
                import boto3
                from botocore.config import Config

                options = client_options(cfg)
                session = boto3.session.Session(region_name=cfg.region, **_credentials(cfg))
                made.append(session.client("s3", endpoint_url=options["endpoint_url"], use_ssl=options["use_ssl"],
                                           verify=options["verify"], config=Config(**options["config"])))
        return made[0]

    return client


class LocalStore:
    """``ObjectStore`` in a directory: a mounted NAS or backup volume (e.g. Proxmox backup storage).

    Objects are files under ``root``; a save writes ``<name>.partial-<random>`` beside the final
    name, fsyncs it and renames it into place, so a reader sees a whole object or none, and a
    failed save leaves nothing under the key. Directories are created private (0700).
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.name = str(self.root)

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or key.startswith("/") or any(p in {"", ".", ".."} for p in parts) or ".partial-" in key:
            raise StorageError(f"invalid object key {key!r}")
        return self.root.joinpath(*parts)

    def _write(self, key: str, fill: Any) -> ObjectInfo:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(prefix=path.name + ".partial-", dir=path.parent)
        except OSError as exc:
            raise StorageError(f"cannot write {key} under {self.root}: {exc.strerror}", transient=False) from None
        try:
            with os.fdopen(fd, "wb") as out:
                fill(out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(exc, OSError):
                raise StorageError(f"cannot write {key} under {self.root}: {exc.strerror}") from None
            raise
        return self.stat(key)

    def save(self, key: str, src: BinaryIO) -> ObjectInfo:
        def fill(out: BinaryIO) -> None:
            while True:
                block = src.read(1 << 20)
                if not block:
                    break
                out.write(block)

        return self._write(key, fill)

    def save_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> ObjectInfo:
        return self._write(key, lambda out: out.write(data))

    @contextlib.contextmanager
    def load(self, key: str) -> Iterator[BinaryIO]:
        try:
            f = open(self._path(key), "rb")
        except FileNotFoundError:
            raise ObjectNotFound(f"{key} not found under {self.root}") from None
        except OSError as exc:
            raise StorageError(f"cannot read {key} under {self.root}: {exc.strerror}") from None
        with f:
            yield f

    def stat(self, key: str) -> ObjectInfo:
        try:
            st = self._path(key).stat()
        except FileNotFoundError:
            raise ObjectNotFound(f"{key} not found under {self.root}") from None
        return ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, timezone.utc))

    def folders(self, prefix: str) -> list[str]:
        start = self.root.joinpath(*prefix.rstrip("/").split("/")) if prefix.rstrip("/") else self.root
        try:
            return sorted(e.name for e in os.scandir(start) if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return []

    def list(self, prefix: str, start_after: str | None = None) -> Iterator[ObjectInfo]:
        # Keys are compared as strings, as S3 does: "backups/db/x" lists "backups/db/x1/..." too.
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root.joinpath(*base.split("/")) if base else self.root
        found = []
        for dirpath, _, files in os.walk(start):
            for name in files:
                if ".partial-" in name:
                    continue
                key = Path(dirpath, name).relative_to(self.root).as_posix()
                if key.startswith(prefix) and (start_after is None or key > start_after):
                    found.append(key)
        for key in sorted(found):
            with contextlib.suppress(ObjectNotFound):  # removed while listing
                yield self.stat(key)

    def remove(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def purge(self, key: str) -> None:
        self.remove(key)

    def locked_until(self, key: str) -> datetime | None:
        return None  # a directory has no object lock (an immutable NAS snapshot is outside our view)

    def extend_lock(self, key: str) -> datetime | None:
        return None

    def stale_uploads(self, prefix: str, older_than: datetime) -> list[tuple[str, str]]:
        """Partial files of saves that never finished (a killed process leaves them), as (key, file name)."""
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root.joinpath(*base.split("/")) if base else self.root
        found = []
        for dirpath, _, files in os.walk(start):
            for name in files:
                if ".partial-" not in name:
                    continue
                path = Path(dirpath, name)
                key = path.relative_to(self.root).as_posix().split(".partial-", 1)[0]
                with contextlib.suppress(FileNotFoundError):
                    if key.startswith(prefix) and datetime.fromtimestamp(path.stat().st_mtime, timezone.utc) < older_than:
                        found.append((key, name))
        return sorted(found)

    def abort_upload(self, key: str, upload_id: str) -> None:
        if "/" in upload_id or not upload_id.startswith(self._path(key).name + ".partial-"):
            raise StorageError(f"{upload_id!r} is not a partial file of {key}")
        with contextlib.suppress(FileNotFoundError):
            (self._path(key).parent / upload_id).unlink()


def _fsync_dir(path: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def store_from_settings(cfg: StorageSettings, lock_days: dict[str, int] | None = None) -> ObjectStore:
    """The store of these settings; with object lock on, objects of the components in ``lock_days`` are retained
    that many days (+ the margin)."""
    if cfg.kind == "local":
        assert cfg.path is not None
        return LocalStore(cfg.path)
    lock = None
    if cfg.object_lock != "off":
        lock = LockPolicy(cfg.object_lock.upper(), dict(lock_days or {}), cfg.lock_margin_days, cfg.prefix)
    if cfg.s3_bucket_block:
        bucket = make_bucket(cfg)
        return S3Store(bucket.credentials.get_s3_client, bucket.bucket_name, cfg, lock)
    assert cfg.bucket is not None
    return S3Store(_client_from_settings(cfg), cfg.bucket, cfg, lock)


def protection(store: ObjectStore) -> dict[str, Any]:
    """What the storage itself does to keep backups: versioning, object lock and its default retention."""
    if not isinstance(store, S3Store):
        return {"kind": "local", "versioning": None, "object_lock": None, "default_retention": None}
    client = store._client
    with translate_errors(f"reading the versioning of bucket {store.name}"):
        versioning = client.get_bucket_versioning(Bucket=store.name).get("Status", "Disabled")
    try:
        with translate_errors(f"reading the object lock configuration of bucket {store.name}"):
            conf = client.get_object_lock_configuration(Bucket=store.name).get("ObjectLockConfiguration", {})
    except StorageError as exc:
        if "ObjectLockConfigurationNotFound" not in str(exc):
            raise
        conf = {}
    rule = conf.get("Rule", {}).get("DefaultRetention") or None
    return {"kind": "s3", "bucket": store.name, "versioning": versioning,
            "object_lock": conf.get("ObjectLockEnabled") == "Enabled", "default_retention": rule}


def protection_problems(cfg: StorageSettings, found: dict[str, Any]) -> list[str]:
    """How the storage's protection falls short of the settings (empty: as configured)."""
    if found["kind"] != "s3":
        return []
    problems = []
    if found["versioning"] != "Enabled":
        problems.append(f"bucket {found['bucket']} has versioning {found['versioning']}: an overwritten or deleted backup "
                        "is gone at once (enable versioning)")
    if cfg.object_lock != "off" and not found["object_lock"]:
        problems.append(f"storage.object_lock = {cfg.object_lock!r} but bucket {found['bucket']} has no object lock: "
                        "it can only be enabled on a versioned bucket (create one with object lock, or ask the provider)")
    if cfg.object_lock == "off" and found["object_lock"]:
        problems.append(f"bucket {found['bucket']} has object lock but storage.object_lock = 'off': backups are "
                        "written without their own retain-until dates")
    rule = found.get("default_retention")
    if rule and cfg.object_lock != "off" and rule.get("Mode", "").lower() != cfg.object_lock:
        problems.append(f"the bucket's default retention mode is {rule.get('Mode')}, the settings say {cfg.object_lock.upper()}")
    return problems
