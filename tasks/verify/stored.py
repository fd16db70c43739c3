"""A stored backup read back whole, long after it was written: is it still what its manifest says?

Storage rots, gets overwritten, or loses objects; a backup is only known good when it was last read.
Every object of the backup is streamed from storage: its size and sha256 against the manifest,
every chunk decrypted (each one authenticated), decompressed to the end, and the plaintext's
sha256 against the manifest. Memory stays bounded: nothing is kept but the digests.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from luxima_backup import catalog, runtime
from luxima_backup.compression import DecompressingReader
from luxima_backup.envelope import DecryptingReader
from luxima_backup.errors import BackupError, ObjectNotFound, VerificationError, is_transient
from luxima_backup.keys import KeyProvider
from luxima_backup.manifest import ConfigManifest, DbManifest, FilesManifest
from luxima_backup.pipes import Meter, MeteredReader, drain
from luxima_backup.storage import ObjectStore


def objects_of(backup: catalog.Backup) -> list[dict[str, Any]]:
    """What to read of one backup: each object's key, sizes and digests as its manifest recorded them."""
    m = backup.manifest
    out = []
    if isinstance(m, DbManifest):
        out.append({"key": m.dump.key, "size": m.dump.size_encrypted, "sha256": m.dump.sha256_encrypted,
                    "codec": m.dump.compression.codec, "plain_sha256": m.dump.sha256_plain, "expect": m.binding_of(m.dump.key)})
        g = m.globals
        if g.key and g.encrypted_bytes is not None and g.encrypted_sha256:
            # the globals are compressed like the dump; their recorded plain digest is of the SQL text
            out.append({"key": g.key, "size": g.encrypted_bytes, "sha256": g.encrypted_sha256,
                        "codec": m.dump.compression.codec, "plain_sha256": g.plain_sha256, "expect": m.binding_of(g.key)})
    elif isinstance(m, FilesManifest):
        for o, plain in ((m.archive, m.archive.sha256_plain), (m.index, m.index.sha256_plain)):
            out.append({"key": o.key, "size": o.size_encrypted, "sha256": o.sha256_encrypted,
                        "codec": o.compression.codec, "plain_sha256": plain, "expect": m.binding_of(o.key)})
    elif isinstance(m, ConfigManifest):
        a = m.archive
        out.append({"key": a.key, "size": a.size_encrypted, "sha256": a.sha256_encrypted, "codec": a.compression.codec,
                    "plain_sha256": a.sha256_plain, "expect": m.binding_of(a.key)})
    return out


def check_object(store: ObjectStore, provider: KeyProvider, obj: dict[str, Any]) -> int:
    """Read one object whole and check it; the bytes read. A mismatch is a ``VerificationError``, a chunk that
    fails to authenticate an ``IntegrityError``; a missing object says so."""
    key = obj["key"]
    sealed, plain = Meter(), Meter()
    try:
        with store.load(key) as body:
            decrypted = DecryptingReader(MeteredReader(body, sealed), provider.unwrap,  # type: ignore[arg-type]
                                         expect=obj.get("expect"), where=key)
            drain(MeteredReader(DecompressingReader(decrypted, obj["codec"]), plain))
    except ObjectNotFound:
        raise VerificationError(f"{key} is missing from storage") from None
    if sealed.size != obj["size"]:
        raise VerificationError(f"{key} is {sealed.size} bytes in storage; its manifest says {obj['size']}")
    if sealed.hexdigest != obj["sha256"]:
        raise VerificationError(f"{key} has sha256 {sealed.hexdigest}; its manifest says {obj['sha256']}")
    if obj.get("plain_sha256") and plain.hexdigest != obj["plain_sha256"]:
        raise VerificationError(f"{key} decrypts to data with sha256 {plain.hexdigest}; its manifest says {obj['plain_sha256']}")
    return sealed.size


@task(name="verify-stored-backup", cache_policy=NO_CACHE, persist_result=False, **runtime.TRANSIENT_RETRIES)
def verify_stored_backup(component: str, manifest_key: str) -> dict[str, Any]:
    """Read every object of one stored backup back and check it; damage is a result (reported), not an exception."""
    settings = runtime.settings()
    store = runtime.location(component, settings)[0]
    provider = runtime.key_provider(settings)
    backup = catalog.Backup.of(manifest_key, runtime.catalog(component, settings).load(manifest_key))
    read = 0
    try:
        for obj in objects_of(backup):
            read += check_object(store, provider, obj)
    except BackupError as exc:
        if is_transient(exc):
            raise  # storage or Vault unavailable: the task's retries, then the run fails; nothing is judged
        # a mismatch, a chunk that fails to authenticate, a key that no longer opens it: unrestorable as it is
        get_run_logger().error("%s is damaged: %s", backup.backup_id, exc)
        return {"backup_id": backup.backup_id, "ok": False, "error": str(exc), "bytes": read}
    return {"backup_id": backup.backup_id, "ok": True, "error": None, "bytes": read}
