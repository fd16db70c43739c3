"""Verify a file backup: archive and index stored as sent, every file the archive holds against the index, its chain present.

Deep (default): a copy of the ciphertext is checked while it uploads (``verify_archive_stream``):
every chunk authenticates, the tar parses, every regular member's size, md5 and sha256 are
taken. Those, in archive order, must be exactly the index's entries for this archive: compared
through one running digest of both, so memory stays flat however many files. The upload completes
only after the check passed. Only when they differ is the stored archive read back to name the file.
"""

from __future__ import annotations

import hashlib
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from luxima_backup import runtime
from luxima_backup.compression import DecompressingReader
from luxima_backup.envelope import DecryptingReader
from luxima_backup.errors import ObjectNotFound, VerificationError
from luxima_backup.keys import KeyProvider
from luxima_backup.manifest import FileArchive, FileIndex, StoredObject
from luxima_backup.pipes import Link, Meter, MeteredReader, drain, judged
from luxima_backup.storage import ObjectStore
from tasks.verify.readback import compare, confirm_stored


def check_archive(store: ObjectStore, key: str, provider: KeyProvider, codec: str, expected: dict[str, Any],
                  stored: Any, backup_id: str) -> dict[str, Any]:
    """One streaming pass over a stored file archive: ciphertext sha256, every chunk authenticated, the tar
    parsed, and each file this backup stored compared with its index entry (size, md5, sha256)."""
    from luxima_backup.filetree import FILE, content_mismatch, copy_member, members_for, open_tar_reader

    info = store.stat(key)
    if info.size != expected["encrypted_bytes"]:
        raise VerificationError(f"{key}: stored size {info.size} != {expected['encrypted_bytes']} bytes uploaded")
    sealed, plain = Meter(), Meter()
    files = 0
    with store.load(key) as body:
        tar_stream = MeteredReader(DecompressingReader(DecryptingReader(MeteredReader(body, sealed), provider.unwrap), codec), plain)  # type: ignore[arg-type]
        tar = open_tar_reader(tar_stream)
        wanted = (e for e in stored if e.type == FILE and e.archive == backup_id)
        for member, entry in members_for(tar, wanted, "/nonexistent-verify-root"):
            why = content_mismatch(entry, copy_member(tar, member, None))
            if why:
                raise VerificationError(f"{key}: {entry.name!r} in the archive: {why}")
            files += 1
        drain(tar_stream)  # the end of the archive must authenticate too
    compare(key, "sha256 of the stored object", sealed.hexdigest, expected["encrypted_sha256"])
    compare(key, "sha256 of the tar stream", plain.hexdigest, expected["plain_sha256"])
    return {"size": info.size, "sha256": sealed.hexdigest, "tar_sha256": plain.hexdigest, "files_checked": files,
            "deep": True}


class Listing:
    """A running digest of (path, size, sha256, md5) of files in order: an archive's content, or its index's entries."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self.files = 0
        self.bytes = 0

    def add(self, key: tuple[bytes, ...], size: int, sha256: str, md5: str) -> None:
        self._digest.update(b"/".join(key) + b"\0" + f"{size}\0{sha256}\0{md5}\n".encode())
        self.files += 1
        self.bytes += size

    @property
    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def listing_of_archive(src: Any) -> Listing:
    """Parse a tar stream to its end: every member's name checked (never escaping), every regular file hashed."""
    from luxima_backup.filetree import copy_member, iter_members, member_path, open_tar_reader, path_key

    listing = Listing()
    tar = open_tar_reader(src)
    for member in iter_members(tar):
        rel = member_path(member, "/nonexistent-verify-root")
        if member.isreg():
            got = copy_member(tar, member, None)
            listing.add(path_key(rel), got.size, got.sha256.hexdigest(), got.md5.hexdigest())
    return listing


def listing_of_index(entries: Any, backup_id: str) -> Listing:
    """The index's entries for the files stored in ``backup_id``'s own archive, in the archive's order."""
    from luxima_backup.filetree import FILE

    listing = Listing()
    for e in entries:
        if e.type == FILE and e.archive == backup_id:
            listing.add(e.key, e.size, e.sha256, e.md5)
    return listing


@task(name="verify-stream", cache_policy=NO_CACHE, persist_result=False)
def verify_archive_stream(source: Link, codec: str, binding: dict[str, str]) -> dict[str, Any]:
    """The deep check of a file archive's ciphertext as it uploads, from a copy of the stream; its verdict gates the upload."""
    settings = runtime.settings()
    with judged(source) as ciphertext:
        sealed, plain = Meter(), Meter()
        tar_stream = MeteredReader(DecompressingReader(DecryptingReader(
            MeteredReader(ciphertext, sealed), runtime.key_provider(settings).unwrap, expect=binding,
            where=binding.get("object", "the archive")), codec), plain)
        listing = listing_of_archive(tar_stream)
        drain(tar_stream)  # the end of the archive must authenticate too
        return {"encrypted_bytes": sealed.size, "encrypted_sha256": sealed.hexdigest, "plain_bytes": plain.size,
                "plain_sha256": plain.hexdigest, "files": listing.files, "bytes": listing.bytes,
                "listing_sha256": listing.hexdigest}


def chain_gaps(store: ObjectStore, archives: dict[str, StoredObject]) -> dict[str, tuple[str, int | None]]:
    """The archives of a chain not in storage as recorded: backup id → (key, stored size, None when missing)."""
    gaps: dict[str, tuple[str, int | None]] = {}
    for backup_id, stored in archives.items():
        try:
            size: int | None = store.stat(stored.key).size
        except ObjectNotFound:
            size = None
        if size != stored.size_encrypted:
            gaps[backup_id] = (stored.key, size)
    return gaps


@task(name="verify-file-archive", cache_policy=NO_CACHE, persist_result=False, **runtime.TRANSIENT_RETRIES)
def verify_file_archive(backup_id: str, archive: FileArchive, index: FileIndex, index_spool: str,
                        older_archives: dict[str, StoredObject], deep: bool,
                        proven_etags: dict[str, str | None] | None = None,
                        sent: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check the stored archive and index: stored as sent (``confirm_stored``; ``proven_etags`` by key, from the
    uploads); deep: every file in the archive against the index (``sent``: the check made beside the upload; without
    it, the archive is read back). The older archives this backup relies on must still be there."""
    from tasks.archive import load_index

    settings = runtime.settings()
    store = runtime.store(settings)
    provider = runtime.key_provider(settings)
    proven = proven_etags or {}
    confirm_stored(store, index.key, index.size_encrypted, index.sha256_encrypted, proven.get(index.key))
    for older_id, (key, got) in chain_gaps(store, older_archives).items():
        if got is None:
            raise VerificationError(
                f"{key} (the archive of {older_id}, which this incremental backup still needs) is missing "
                "from storage: the chain is broken",
                hint="run a full backup (full = true); a restore of this backup would lack the files only that archive holds",
            )
        raise VerificationError(f"{key} (archive of {older_id}, still needed) is {got} bytes, expected "
                                f"{older_archives[older_id].size_encrypted}")
    expected = {"encrypted_bytes": archive.size_encrypted, "encrypted_sha256": archive.sha256_encrypted,
                "plain_sha256": archive.sha256_plain}
    if deep and sent is not None:
        result = confirm_stored(store, archive.key, archive.size_encrypted, archive.sha256_encrypted, proven.get(archive.key))
        compare(archive.key, "sha256 of the ciphertext checked", sent["encrypted_sha256"], archive.sha256_encrypted)
        compare(archive.key, "sha256 of the tar stream", sent["plain_sha256"], archive.sha256_plain)
        indexed = listing_of_index(load_index(index_spool, index.compression.codec, provider.unwrap), backup_id)
        if (indexed.hexdigest, indexed.files) != (sent["listing_sha256"], sent["files"]):
            # Which file: the stored archive read back against the index names it.
            entries = load_index(index_spool, index.compression.codec, provider.unwrap)
            check_archive(store, archive.key, provider, archive.compression.codec, expected, entries, backup_id)
            raise VerificationError(f"{archive.key}: its {sent['files']} files differ from the index's {indexed.files} "
                                    f"for this archive")
        result.update({"tar_sha256": sent["plain_sha256"], "files_checked": sent["files"], "deep": True})
    elif deep:
        entries = load_index(index_spool, index.compression.codec, provider.unwrap)
        result = check_archive(store, archive.key, provider, archive.compression.codec, expected, entries, backup_id)
    else:
        result = confirm_stored(store, archive.key, archive.size_encrypted, archive.sha256_encrypted, proven.get(archive.key))
    result["older_archives_present"] = len(older_archives)
    get_run_logger().info("verified %s (%s)", archive.key, "deep" if deep else "size and sha256")
    return result
