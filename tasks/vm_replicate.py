"""The VMs' vzdump archives copied from the primary node's backup storage to the DR node's.

Streamed from one node to the other through this machine's memory over SFTP (strict host keys): no
guest disk lands on this machine's disk (the archives are Proxmox's, not encrypted by us), and neither
node needs a key to the other. Resumable: a cut transfer leaves ``<archive>.luxima-partial`` on the
DR node and the next run goes on from its size. Checked by sha256 computed on both nodes
(``sha256sum``), and the archive's size against the backup's manifest; only then renamed into place,
with its ``.notes`` and ``.protected`` sidecars, so the DR node lists it as its own. Archives only the
DR node still has (pruned on the primary) stay.
"""

from __future__ import annotations

import posixpath
import shlex
import time
from typing import Any

import paramiko
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from luxima_backup import runtime, ssh
from luxima_backup.errors import IntegrityError, StorageError

SIDECARS = (".notes", ".protected")
PARTIAL = ".luxima-partial"
BLOCK = 1 << 20


def archive_file(volid: str) -> str:
    """The file name of a directory storage's archive: ``STORAGE:backup/<file>`` -> ``<file>``."""
    _, _, rest = volid.partition(":")
    name = rest.removeprefix("backup/")
    if not name or "/" in name or name.startswith("."):
        raise IntegrityError(f"archive {volid!r} is not a file of a directory storage; it cannot be copied to the DR node",
                             hint="the DR copy of archives on a Proxmox Backup Server is that server's sync job")
    return name


def remote_sha256(client: paramiko.SSHClient, path: str, timeout: float) -> str | None:
    status, out, err = ssh.run(client, f"sha256sum -- {shlex.quote(path)}", timeout=timeout)
    if status != 0:
        if b"No such file" in err:
            return None
        raise StorageError(f"sha256sum of {path} failed (exit {status}): {err.decode(errors='replace')[-300:]}", transient=True)
    return out.decode().split()[0]


def _size(sftp: paramiko.SFTPClient, path: str) -> int | None:
    try:
        return int(sftp.stat(path).st_size or 0)
    except FileNotFoundError:
        return None


def stream(src: paramiko.SFTPClient, dst: paramiko.SFTPClient, src_path: str, dst_path: str, size: int,
           limit_kib: int) -> int:
    """Copy ``src_path`` to ``dst_path + PARTIAL``, going on from what a cut run left; returns the bytes sent."""
    partial = dst_path + PARTIAL
    offset = _size(dst, partial) or 0
    if offset > size:
        dst.remove(partial)
        offset = 0
    sent, started = 0, time.monotonic()
    with src.open(src_path, "rb") as f, dst.open(partial, "ab" if offset else "wb") as out:
        f.seek(offset)
        if size > offset:
            f.prefetch(size - offset)
        out.set_pipelined(True)
        while True:
            block = f.read(BLOCK)
            if not block:
                break
            out.write(block)
            sent += len(block)
            if limit_kib:
                ahead = sent / (limit_kib * 1024) - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
    return sent


@task(name="replicate-vm-archives", cache_policy=NO_CACHE, persist_result=False, **runtime.TRANSIENT_RETRIES)
def replicate_vm_archives() -> dict[str, Any]:
    """Every verified VM backup's archive onto the DR node, checked on both; the ids of those present there."""
    settings = runtime.settings()
    cfg = settings.dr.vm
    assert cfg is not None
    logger = get_run_logger()
    src_host, dst_host = settings.hosts[cfg.source_host], settings.hosts[cfg.target_host]
    rows: list[dict[str, Any]] = []
    at_dr: list[str] = []
    hash_timeout = max(src_host.io_timeout, dst_host.io_timeout) * 60
    with ssh.connect(src_host, runtime.secret(src_host.key, settings)) as a, \
            ssh.connect(dst_host, runtime.secret(dst_host.key, settings)) as b:
        sa, sb = a.open_sftp(), b.open_sftp()
        for backup in runtime.catalog("vm", settings).list_backups("vm"):
            if not backup.verified or backup.entry.volid is None:
                continue
            row: dict[str, Any] = {"component": "vm", "source": backup.source_name, "backup": backup.backup_id,
                                   "archive": backup.entry.volid, "bytes": 0}
            try:
                name = archive_file(backup.entry.volid)
                src_path, dst_path = posixpath.join(cfg.source_path, name), posixpath.join(cfg.target_path, name)
                expected = backup.entry.size
                size = _size(sa, src_path)
                there = remote_sha256(b, dst_path, hash_timeout) if _size(sb, dst_path) is not None else None
                if size is None:
                    row["action"] = "present" if there else "gone"  # pruned on the primary: the DR copy stays
                    row["why"] = "no longer on the primary node" if not there else None
                else:
                    if expected is not None and size != expected:
                        raise IntegrityError(f"{name} on the primary node is {size} bytes; its backup's manifest says "
                                             f"{expected}: it was replaced after the backup, and is not copied")
                    original = remote_sha256(a, src_path, hash_timeout)
                    if there == original:
                        row["action"] = "present"
                    else:
                        row["bytes"] = stream(sa, sb, src_path, dst_path, size, cfg.bandwidth_limit_kib)
                        copied = remote_sha256(b, dst_path + PARTIAL, hash_timeout)
                        if copied != original:
                            sb.remove(dst_path + PARTIAL)
                            raise StorageError(f"the copy of {name} on the DR node has sha256 {copied}, the primary's "
                                               f"{original}; it was removed and is copied again next time", transient=True)
                        sb.posix_rename(dst_path + PARTIAL, dst_path)
                        row["action"] = "copied"
                    for ext in SIDECARS:  # notes and protection travel with the archive
                        if _size(sa, src_path + ext) is not None:
                            with sa.open(src_path + ext, "rb") as f:
                                data = f.read()
                            with sb.open(dst_path + ext, "wb") as out:
                                out.write(data)
                        elif _size(sb, dst_path + ext) is not None and ext == ".notes":
                            sb.remove(dst_path + ext)
                    row["sha256"] = original
                if row["action"] in ("present", "copied"):
                    at_dr.append(backup.backup_id)
            except (IntegrityError, StorageError) as exc:
                if getattr(exc, "transient", False) and not isinstance(exc, IntegrityError):
                    raise
                row.update(action="refused", why=str(exc))
                logger.error("the archive of %s was not copied to the DR node: %s", backup.backup_id, exc)
            except OSError as exc:
                raise StorageError(f"copying the archive of {backup.backup_id} to the DR node: {exc}", transient=True) from None
            rows.append({"target": cfg.target_host, **row})
    logger.info("VM archives to %s: %d copied, %d already there, %d refused", cfg.target_host,
                sum(r["action"] == "copied" for r in rows), sum(r["action"] == "present" for r in rows),
                sum(r["action"] == "refused" for r in rows))
    return {"rows": rows, "at_dr": at_dr}


@task(name="prune-dr-vm-archives", cache_policy=NO_CACHE, persist_result=False, **runtime.TRANSIENT_RETRIES)
def prune_dr_vm_archives(targets: list[str]) -> list[dict[str, Any]]:
    """The DR node's archives under the primary's rule (vm_backup.keep newest verified per guest; protected ones and the
    newest always kept), judged on the DR site's own catalog, never on what the primary still has: an archive pruned,
    deleted or replaced on the primary stays at the DR site until newer good ones there push it out.

    For each archive to remove, its manifest goes first from every DR target (the catalog stops offering it), then the
    archive and its sidecars from the DR node.
    """
    from tasks.replicate import dr_store
    from tasks.vm_prune import plan_prune

    settings = runtime.settings()
    cfg = settings.dr.vm
    assert cfg is not None
    logger = get_run_logger()
    prefix = settings.storage.prefix
    holders: dict[str, list[tuple[Any, str]]] = {}  # backup id -> (DR store, manifest key) of each DR target holding it
    by_guest: dict[str, dict[str, Any]] = {}
    stores = {name: dr_store(name, settings) for name in targets}
    rows: list[dict[str, Any]] = []
    try:
        for store in stores.values():
            found, _ = runtime.catalog_at(store, prefix, settings).by_target("vm")
            for guest, backups in found.items():
                for b in backups:
                    holders.setdefault(b.backup_id, []).append((store, b.manifest_key))
                    by_guest.setdefault(guest, {}).setdefault(b.backup_id, b)
        dst_host = settings.hosts[cfg.target_host]
        with ssh.connect(dst_host, runtime.secret(dst_host.key, settings)) as client:
            sftp = client.open_sftp()
            files = set(sftp.listdir(cfg.target_path))
            for guest, found_backups in sorted(by_guest.items()):
                backups = sorted(found_backups.values(), key=lambda b: (b.completed_at, b.backup_id))
                present = {}
                for b in backups:
                    name = archive_file(b.entry.volid) if b.entry.volid else None
                    if name in files:
                        present[b.entry.volid] = {"protected": f"{name}.protected" in files}
                for row in plan_prune(backups, present, settings.vm_backup.keep):
                    row = {"target": cfg.target_host, "component": "vm", "source": guest, **row}
                    if row["action"] == "remove":
                        name = archive_file(row["volid"])
                        try:
                            for store, key in holders.get(row["backup_id"], []):
                                store.remove(key)
                            for ext in ("", *SIDECARS):
                                if name + ext in files:
                                    sftp.remove(posixpath.join(cfg.target_path, name + ext))
                            row["action"] = "removed"
                            logger.info("removed %s from the DR node (%s)", row["volid"], row["why"])
                        except Exception as exc:  # reported; the next run tries again
                            row["action"], row["why"] = "removal failed", f"{type(exc).__name__}: {exc}"
                    row.pop("manifest_key", None)
                    rows.append(row)
        if any(r["action"] == "removed" for r in rows):
            for store in stores.values():
                runtime.catalog_at(store, prefix, settings).refresh("vm")
    finally:
        for store in stores.values():
            if hasattr(store, "close"):
                store.close()
    return rows
