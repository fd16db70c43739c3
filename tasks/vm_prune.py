"""Keep the newest N good archives of a guest on the Proxmox storage; remove the older ones it made.

Only archives with a verified manifest count toward N, so failed or unverified backups never push a
good one out. An archive without a manifest (made by hand, by another job, or by a run whose checks
failed) is reported and left alone; a protected archive is never removed; the newest good archive is
always kept (N >= 1). The manifest goes first, so the catalog stops offering a backup before its
archive goes; a crash in between leaves an archive without a manifest, which is left alone.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from luxima_backup import catalog, runtime
from luxima_backup.manifest import safe_name
from luxima_backup.errors import ProxmoxError
from luxima_backup.proxmox import ProxmoxClient
from tasks.vzdump import Guest, archives_of


def plan_prune(manifests: list[catalog.Backup], present: dict[str, dict[str, Any]], keep: int) -> list[dict[str, Any]]:
    """One row per archive of the guest: what happens to it and why (oldest first)."""
    good = [b for b in manifests if b.verified and b.entry.volid in present]
    kept_ids = {b.backup_id for b in good[-keep:]}
    rows = []
    by_volid = {b.entry.volid: b for b in good}
    for volid, entry in present.items():
        b = by_volid.get(volid)
        if b is None:
            rows.append({"volid": volid, "backup_id": None, "action": "left alone",
                         "why": "no verified manifest: not counted, not removed"})
        elif b.backup_id in kept_ids:
            rows.append({"volid": volid, "backup_id": b.backup_id, "action": "kept", "why": f"one of the newest {keep} good"})
        elif entry.get("protected"):
            rows.append({"volid": volid, "backup_id": b.backup_id, "action": "kept", "why": "protected"})
        else:
            rows.append({"volid": volid, "backup_id": b.backup_id, "action": "remove", "why": f"older than the newest {keep} good",
                         "manifest_key": b.manifest_key})
    for b in manifests:
        if b.entry.volid is not None and b.entry.volid not in present:
            rows.append({"volid": b.entry.volid, "backup_id": b.backup_id, "action": "missing",
                         "why": "its archive is no longer on the storage (removed outside luxima-backup)"})
    return rows


def remove_archive(px: ProxmoxClient, node: str, storage: str, volid: str, timeout: float) -> None:
    """Delete one archive from the storage (newer Proxmox answers with a task to wait for)."""
    answer = px.delete(f"nodes/{node}/storage/{storage}/content/{volid}")
    if isinstance(answer, str) and answer.startswith("UPID:"):
        result = px.wait_task(node, answer, timeout)
        if not result.ok:
            raise ProxmoxError(f"removing {volid} ended {result.exitstatus!r}: " + " | ".join(result.log_tail[-3:]))


@task(name="prune-vm-archives", cache_policy=NO_CACHE, persist_result=False)
def prune_vm_archives(guest: Guest) -> list[dict[str, Any]]:
    """Apply the plan: for each archive to remove, its manifest and then the archive; one failure does not stop the rest."""
    settings = runtime.settings()
    cfg = settings.vm_backup
    px = runtime.proxmox(cfg.proxmox, settings)
    logger = get_run_logger()
    store = runtime.store(settings)
    cat = runtime.catalog("vm", settings)
    manifests = [b for b in cat.list_backups("vm", guest.name) if b.entry.vmid == guest.vmid]
    present = {a["volid"]: a for a in archives_of(px, guest.node, cfg.storage, guest.vmid)}
    rows = plan_prune(manifests, present, cfg.keep)
    for row in rows:
        if row["action"] != "remove":
            continue
        try:
            store.remove(row.pop("manifest_key"))
            remove_archive(px, guest.node, cfg.storage, row["volid"], cfg.task_timeout_seconds)
            row["action"] = "removed"
            logger.info("removed %s (%s)", row["volid"], row["why"])
        except Exception as exc:  # reported in the artifact and the log; the next run tries again
            row["action"], row["why"] = "removal failed", f"{type(exc).__name__}: {exc}"
            logger.warning("could not remove %s: %s", row["volid"], exc)
    if any(r["action"] == "removed" for r in rows):
        cat.refresh("vm", safe_name(guest.name))
    return rows
