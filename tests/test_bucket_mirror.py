"""The bucket mirror against the moto S3 server over HTTP: incremental fetch, pruning, refusals, upload back."""

from __future__ import annotations

import hashlib
import http.client
import os
import threading
import uuid
from http.server import BaseHTTPRequestHandler

from tests.quiet_server import QuietHTTPServer
from pathlib import Path
from typing import Any, Iterator

import boto3
import pytest

from luxima_backup.bucket_mirror import MirrorStats, mirror_bucket, upload_tree
from luxima_backup.errors import ConfigError, IntegrityError, ObjectNotFound, StorageError, is_transient, should_retry
from devkit.sandbox import MotoS3Server

MIB = 1024 * 1024
UNICODE = "with space/ünïcødé 文件 (1).txt"


@pytest.fixture
def client(s3_server: MotoS3Server) -> Any:
    return s3_server.client()


def put(client: Any, bucket: str, key: str, data: bytes) -> None:
    client.put_object(Bucket=bucket, Key=key, Body=data)


def tree(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root`` as path -> content (symlinks are not expected)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def partials(root: Path) -> list[Path]:
    return list(root.rglob(".luxima-partial-*"))


@pytest.fixture
def filled(client: Any, bucket: str) -> dict[str, bytes]:
    """The bucket with files under "user-files/" (nested, odd names, 12 MiB, empty, a marker) and one elsewhere."""
    objects = {
        "a.txt": b"alpha",
        "nested/deep/b.bin": os.urandom(3000),
        UNICODE: "ünïcødé".encode(),
        "big.bin": os.urandom(12 * MIB + 17),
        "zero": b"",
    }
    for rel, data in objects.items():
        put(client, bucket, "user-files/" + rel, data)
    put(client, bucket, "user-files/empty folder/", b"")
    put(client, bucket, "other/not-mirrored.txt", b"elsewhere")
    return objects


def test_first_mirror_fetches_everything_and_second_fetches_nothing(client: Any, bucket: str, filled: dict[str, bytes],
                                                                    tmp_path: Path) -> None:
    dest = tmp_path / "mirror"
    total = sum(map(len, filled.values()))
    stats = mirror_bucket(client, bucket, "user-files", dest)  # no trailing slash: still a folder
    assert stats == MirrorStats(files=5, bytes=total, transferred_files=5, transferred_bytes=total, deleted_files=0)
    assert tree(dest) == filled
    assert hashlib.sha256((dest / "big.bin").read_bytes()).hexdigest() == hashlib.sha256(filled["big.bin"]).hexdigest()
    assert (dest / "empty folder").is_dir() and not any((dest / "empty folder").iterdir())
    assert partials(dest) == []
    head = client.head_object(Bucket=bucket, Key="user-files/" + UNICODE)
    assert (dest / UNICODE).stat().st_mtime == int(head["LastModified"].timestamp())

    again = mirror_bucket(client, bucket, "user-files/", dest)
    assert again == MirrorStats(files=5, bytes=total)
    assert tree(dest) == filled and (dest / "empty folder").is_dir()


def test_changes_transfer_only_what_changed(client: Any, bucket: str, filled: dict[str, bytes], tmp_path: Path) -> None:
    dest = tmp_path / "mirror"
    mirror_bucket(client, bucket, "user-files/", dest)
    put(client, bucket, "user-files/a.txt", b"alpha, edited")
    put(client, bucket, "user-files/new/c.txt", b"new")
    client.delete_object(Bucket=bucket, Key="user-files/nested/deep/b.bin")

    stats = mirror_bucket(client, bucket, "user-files/", dest)
    assert (stats.transferred_files, stats.transferred_bytes, stats.deleted_files) == (2, len(b"alpha, edited") + 3, 1)
    expected = {**filled, "a.txt": b"alpha, edited", "new/c.txt": b"new"}
    del expected["nested/deep/b.bin"]
    assert tree(dest) == expected
    assert not (dest / "nested").exists()  # emptied folders go too


def test_a_local_edit_or_stray_file_is_undone(client: Any, bucket: str, filled: dict[str, bytes], tmp_path: Path) -> None:
    dest = tmp_path / "mirror"
    mirror_bucket(client, bucket, "user-files/", dest)
    (dest / "a.txt").write_bytes(b"ALPHA")
    mtime = (dest / "zero").stat().st_mtime
    os.utime(dest / "a.txt", (mtime - 60, mtime - 60))  # same size, another time: refetched
    (dest / "stray" / "dir").mkdir(parents=True)
    (dest / "stray" / "dir" / "x").write_bytes(b"x")
    (dest / ".luxima-partial-0123").write_bytes(b"left by a killed run")
    stats = mirror_bucket(client, bucket, "user-files/", dest)
    assert (stats.transferred_files, stats.deleted_files) == (1, 2)
    assert tree(dest) == filled and not (dest / "stray").exists()


def test_excluded_objects_are_neither_fetched_nor_kept(client: Any, bucket: str, filled: dict[str, bytes],
                                                        tmp_path: Path) -> None:
    dest = tmp_path / "mirror"
    put(client, bucket, "user-files/cache/thumb.png", b"png")
    put(client, bucket, "user-files/nested/deep/scratch.tmp", b"tmp")
    mirror_bucket(client, bucket, "user-files/", dest)
    assert (dest / "cache" / "thumb.png").exists() and (dest / "nested/deep/scratch.tmp").exists()

    stats = mirror_bucket(client, bucket, "user-files/", dest, exclude=["cache/*", "*.tmp", "big.bin"])
    assert (stats.files, stats.transferred_files, stats.deleted_files) == (4, 0, 3)
    assert tree(dest) == {k: v for k, v in filled.items() if k != "big.bin"}

    fresh = mirror_bucket(client, bucket, "user-files/", tmp_path / "fresh", exclude=["cache/*", "*.tmp", "big.bin"])
    assert fresh.transferred_files == 4 and not (tmp_path / "fresh" / "big.bin").exists()


@pytest.mark.parametrize("key", ["user-files/a/../../evil", "user-files/a//b", "user-files/./c", "user-files//abs"])
def test_unsafe_key_is_refused_and_nothing_lands_outside(client: Any, bucket: str, tmp_path: Path, key: str) -> None:
    put(client, bucket, "user-files/fine.txt", b"fine")
    put(client, bucket, key, b"evil")
    dest = tmp_path / "sub" / "mirror"
    dest.mkdir(parents=True)
    with pytest.raises(IntegrityError, match="unsafe object key") as err:
        mirror_bucket(client, bucket, "user-files/", dest)
    assert repr(key) in str(err.value)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["sub", "sub/mirror"]
    assert not (tmp_path.parent / "evil").exists()

    # An operator can step around a malformed key by excluding it.
    rel = key[len("user-files/"):]
    stats = mirror_bucket(client, bucket, "user-files/", dest, exclude=[rel])
    assert stats.files == 1 and tree(dest) == {"fine.txt": b"fine"}


def test_object_and_folder_of_the_same_name_is_refused(client: Any, bucket: str, tmp_path: Path) -> None:
    put(client, bucket, "user-files/report", b"a file")
    put(client, bucket, "user-files/report/2024.pdf", b"and a folder")
    with pytest.raises(IntegrityError, match="both an object and a folder"):
        mirror_bucket(client, bucket, "user-files/", tmp_path / "mirror")


def test_symlink_in_the_mirror_is_refused_not_followed(client: Any, bucket: str, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "mirror"
    dest.mkdir()
    (dest / "docs").symlink_to(outside, target_is_directory=True)
    put(client, bucket, "user-files/docs/x.txt", b"would land outside")
    with pytest.raises(IntegrityError, match="symbolic link"):
        mirror_bucket(client, bucket, "user-files/", dest)
    assert list(outside.iterdir()) == [] and (dest / "docs").is_symlink()

    # A link to a file is refused too, rather than silently replaced or removed.
    (dest / "docs").unlink()
    (outside / "secret").write_bytes(b"secret")
    (dest / "stale").symlink_to(outside / "secret")
    with pytest.raises(IntegrityError, match="'stale'.*symbolic link"):
        mirror_bucket(client, bucket, "user-files/", dest)
    assert (outside / "secret").read_bytes() == b"secret"


def test_missing_bucket_is_object_not_found(client: Any, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound):
        mirror_bucket(client, "no-such-" + uuid.uuid4().hex[:8], "", tmp_path / "mirror")
    assert not (tmp_path / "mirror").exists()


class Truncating:
    """A proxy in front of S3 that cuts the body of GETs whose path contains ``cut`` in half."""

    def __init__(self, upstream: str, cut: str):
        host, port = upstream.removeprefix("http://").split(":")

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in {"host", "connection"}}
                conn.request(self.command, self.path, body=body, headers={**headers, "Host": f"{host}:{port}"})
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in {"transfer-encoding", "connection", "content-length"}:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if self.command == "GET" and cut in self.path:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = QuietHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def truncating(s3_server: MotoS3Server) -> Iterator[Truncating]:
    proxy = Truncating(s3_server.url, cut="big.bin")
    yield proxy
    proxy.stop()


def test_cut_download_leaves_no_partial_and_keeps_the_old_copy(client: Any, bucket: str, filled: dict[str, bytes],
                                                              tmp_path: Path, s3_server: MotoS3Server,
                                                              truncating: Truncating) -> None:
    dest = tmp_path / "mirror"
    mirror_bucket(client, bucket, "user-files/", dest)
    put(client, bucket, "user-files/big.bin", os.urandom(2 * MIB))
    via_proxy = boto3.client("s3", endpoint_url=truncating.url, region_name="us-east-1",
                             aws_access_key_id=s3_server.access_key, aws_secret_access_key=s3_server.secret_key)
    with pytest.raises(StorageError, match="big.bin") as err:
        mirror_bucket(via_proxy, bucket, "user-files/", dest)
    assert is_transient(err.value) and should_retry(err.value)  # cut mid-body: botocore cannot retry it, the task does
    assert partials(dest) == []
    assert (dest / "big.bin").read_bytes() == filled["big.bin"]


def test_upload_tree_round_trips(client: Any, bucket: str, tmp_path: Path) -> None:
    src = tmp_path / "restored"
    files = {"a.txt": b"alpha", "nested/deep/b.bin": os.urandom(3000), UNICODE: b"u", "big.bin": os.urandom(12 * MIB + 5),
             "photo.png": b"\x89PNG", "zero": b""}
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    (src / "not-listed.txt").write_bytes(b"left out")

    total = sum(map(len, files.values()))
    stats = upload_tree(client, bucket, "restored", src, iter(files), overwrite=False)
    assert stats == MirrorStats(files=6, bytes=total, transferred_files=6, transferred_bytes=total)
    assert client.head_object(Bucket=bucket, Key="restored/photo.png")["ContentType"] == "image/png"
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []

    back = tmp_path / "back"
    mirror_bucket(client, bucket, "restored/", back)
    assert tree(back) == files


def test_upload_tree_refuses_to_overwrite_before_uploading_anything(client: Any, bucket: str, tmp_path: Path) -> None:
    src = tmp_path / "restored"
    (src / "docs").mkdir(parents=True)
    for name in ("a.txt", "docs/b.txt", "docs/c.txt"):
        (src / name).write_bytes(b"restored " + name.encode())
    put(client, bucket, "live/docs/b.txt", b"current")

    with pytest.raises(ConfigError, match="live/docs/b.txt") as err:
        upload_tree(client, bucket, "live/", src, ["a.txt", "docs/b.txt", "docs/c.txt"], overwrite=False)
    assert "overwrite" in (err.value.hint or "")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="live/").get("Contents", [])]
    assert keys == ["live/docs/b.txt"]
    assert client.get_object(Bucket=bucket, Key="live/docs/b.txt")["Body"].read() == b"current"

    stats = upload_tree(client, bucket, "live/", src, ["a.txt", "docs/b.txt", "docs/c.txt"], overwrite=True)
    assert stats.transferred_files == 3
    assert client.get_object(Bucket=bucket, Key="live/docs/b.txt")["Body"].read() == b"restored docs/b.txt"


def test_upload_tree_names_at_most_five_existing_keys(client: Any, bucket: str, tmp_path: Path) -> None:
    src = tmp_path / "restored"
    src.mkdir()
    names = [f"f{i}" for i in range(8)]
    for name in names:
        (src / name).write_bytes(name.encode())
        put(client, bucket, "live/" + name, b"old")
    with pytest.raises(ConfigError, match="8 object.*live/f4 and 3 more") as err:
        upload_tree(client, bucket, "live/", src, names, overwrite=False)
    assert "live/f5" not in str(err.value)


def test_upload_tree_refuses_links_and_unsafe_paths(client: Any, bucket: str, tmp_path: Path) -> None:
    src = tmp_path / "restored"
    src.mkdir()
    (tmp_path / "secret").write_bytes(b"secret")
    (src / "ok.txt").write_bytes(b"ok")
    (src / "link.txt").symlink_to(tmp_path / "secret")
    (src / "dir-link").symlink_to(tmp_path, target_is_directory=True)
    for paths, match in ((["ok.txt", "link.txt"], "not a regular file"), (["ok.txt", "dir-link/secret"], "symbolic link"),
                         (["ok.txt", "../secret"], "unsafe"), (["ok.txt", "/etc/passwd"], "unsafe")):
        with pytest.raises(IntegrityError, match=match):
            upload_tree(client, bucket, "live/", src, paths, overwrite=True)
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount") == 0
