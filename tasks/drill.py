"""Steps of the DR drill that no restore flow has: the site the drill works on, a host's config archive restored
into a scratch folder and checked there, and the scratch databases removed at the end.

Everything here runs against the DR site's settings (``site_settings``, entered with ``runtime.site``): the DR
copies are the only backups it reads.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from luxima_backup import runtime
from luxima_backup.compression import DecompressingReader
from luxima_backup.config_archive import read_members
from luxima_backup.envelope import DecryptingReader
from luxima_backup.errors import ConfigError, IntegrityError, VerificationError
from luxima_backup.manifest import ConfigManifest

from luxima_backup.pipes import Meter, MeteredReader, drain
from luxima_backup.settings import Settings
from tasks.replicate import dr_store
from tasks.restore import drop_database


def site_settings(settings: Settings, target: str, recovery_key: str | None) -> tuple[Settings, Any]:
    """The settings of the DR site as seen from the DR target ``target``, and its object store.

    Its [storage] is the DR copy (a bucket, or a directory on the DR node over SSH), config archives included; restores
    go to the drill's DR database server and DR node; with ``recovery_key`` the offline recovery key alone opens the
    backups (Vault not used). The restores' own log rows are left out: the drill records one row with all of it.
    """
    drill = settings.dr.drill
    assert drill is not None
    cfg = settings.dr.targets[target]
    keys = settings.keys
    if recovery_key:
        keys = keys.model_copy(update={"recovery_private_key": Path(recovery_key)})
    update: dict[str, Any] = {
        "keys": keys,
        "log": settings.log.model_copy(update={"enabled": False}),
        "restore": settings.restore.model_copy(update={"target": drill.database or settings.restore.target}),
        "vm_backup": settings.vm_backup.model_copy(update={"proxmox": drill.proxmox or settings.vm_backup.proxmox}),
    }
    if cfg.kind == "storage":
        assert cfg.storage is not None
        update["storage"] = cfg.storage
    derived = settings.model_copy(update=update)
    return derived, dr_store(target, settings)


def drop_scratch_database(settings: Settings, server: str, dbname: str) -> None:
    """Remove a scratch database the drill restored (never one it did not create: names carry the drill's stamp)."""
    if "drill" not in dbname:
        raise ConfigError(f"refusing to drop {dbname}: not a drill's scratch database")
    drop_database(settings.database(server), dbname)


def _write(folder: Path, path: str, data: bytes | None, symlink: str | None, mode: int) -> Path:
    """One archive member under ``folder`` (its absolute path kept below it), never outside it: the folder it goes
    into is checked after resolving links (an archive's own symlink cannot lead a later member elsewhere)."""
    dest = folder / path.lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    base = folder.resolve()
    if dest.parent.resolve() != base and base not in dest.parent.resolve().parents:
        raise IntegrityError(f"config archive member {path} would land outside the scratch folder")
    if symlink is not None:
        os.symlink(symlink, dest)  # kept as a link, never followed
        return dest
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data or b"")
    os.chmod(dest, stat.S_IMODE(mode) & 0o700)  # a scratch copy: readable by this user only, whatever it was
    return dest


@task(name="drill-configs", cache_policy=NO_CACHE, persist_result=False, **runtime.TRANSIENT_RETRIES)
def restore_configs_into(host: str, folder: str) -> dict[str, Any]:
    """The host's latest verified config archive, restored into ``folder`` and checked: the stored object's sha256
    against its manifest, every chunk authenticated, every member against the archive's index, then the md5 of every
    written file read back from disk."""
    settings = runtime.settings()
    store = runtime.config_store(settings)
    backup = runtime.catalog("configs", settings).resolve("configs", "latest", source=host)
    doc = backup.manifest
    assert isinstance(doc, ConfigManifest)
    archive = doc.archive
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    sealed, index = Meter(), {}
    written: dict[str, Path] = {}
    with store.load(archive.key) as body:
        reader = DecryptingReader(MeteredReader(body, sealed), runtime.key_provider(settings).unwrap,  # type: ignore[arg-type]
                                  expect=doc.binding_of(archive.key), where=archive.key)
        tar = DecompressingReader(reader, archive.compression.codec)
        for member in read_members(tar, index):  # type: ignore[arg-type]
            written[member.path] = _write(root, member.path, member.data, member.symlink, member.mode)
        drain(tar)
    checks = [{"check": "sha256 of the stored archive", "expected": archive.sha256_encrypted, "actual": sealed.hexdigest,
               "ok": sealed.hexdigest == archive.sha256_encrypted}]
    files = index.get("files", {})
    bad = []
    for path, entry in files.items():
        if "md5" not in entry:
            continue
        with open(written[path], "rb") as f:
            if hashlib.file_digest(f, "md5").hexdigest() != entry["md5"]:
                bad.append(path)
    checked = sum("md5" in e for e in files.values())
    checks.append({"check": "md5 of every restored file", "expected": checked, "actual": checked - len(bad), "ok": not bad})
    checks.append({"check": "files against the backup's count", "expected": doc.totals.get("files"),
                   "actual": checked, "ok": doc.totals.get("files") in (None, checked)})
    get_run_logger().info("configs of %s: %d file(s) restored into %s and checked", host, checked, folder)
    if not all(c["ok"] for c in checks):
        raise VerificationError(f"the configs of {host} restored from {backup.backup_id} failed: "
                                + ", ".join(c["check"] for c in checks if not c["ok"]) + (f" ({bad[:5]})" if bad else ""))
    return {"backup_id": backup.backup_id, "completed_at": backup.completed_at.isoformat(), "files": checked,
            "checks": checks}
