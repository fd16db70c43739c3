"""VM restore stages on Proxmox: restore an archive into a guest, power it, roll back to a snapshot, remove it.

Like the backup stages, these ask the node to do the work (``qmrestore``/``vzrestore`` run there,
reading the archive from the node's storage) and follow its task to the end.
"""

from __future__ import annotations

import re
import secrets
import time
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from luxima_backup import runtime
from luxima_backup.errors import ProxmoxError
from luxima_backup.proxmox import ProxmoxClient, TaskResult

# Proxmox's own prefix for the MACs it makes (its default mac_prefix)
MAC_PREFIX = "BC:24:11"
_MAC = re.compile(r"(?i)([0-9a-f]{2}:){5}[0-9a-f]{2}")


def new_mac() -> str:
    return MAC_PREFIX + "".join(f":{b:02X}" for b in secrets.token_bytes(3))


def isolated_line(line: str, unique: bool) -> str:
    """A NIC's config line with its link cut (``link_down=1``), and a new MAC when the restore is side by side."""
    parts = [p for p in line.split(",") if not p.startswith("link_down=")]
    out = ",".join(parts) + ",link_down=1"
    return _MAC.sub(new_mac(), out, count=1) if unique else out


def _ok(result: TaskResult, what: str) -> TaskResult:
    if not result.ok:
        raise ProxmoxError(f"{what} ended {result.exitstatus!r}; its log ends: " + " | ".join(result.log_tail[-8:]),
                           hint="read the whole task log in the Proxmox UI (Tasks)")
    return result


def restore_guest(px: ProxmoxClient, node: str, kind: str, vmid: int, volid: str, *, unique: bool, force: bool,
                  storage: str | None, overrides: dict[str, str], timeout: float, on_log: Any) -> TaskResult:
    """``qmrestore`` (QEMU: ``archive``) or ``vzrestore`` (LXC: ``ostemplate`` + ``restore``) on ``node``."""
    params: dict[str, Any] = {"vmid": vmid, **overrides}
    if unique:
        params["unique"] = 1
    if force:
        params["force"] = 1
    if storage:
        params["storage"] = storage
    if kind == "qemu":
        upid = px.post(f"nodes/{node}/qemu", archive=volid, **params)
    else:
        upid = px.post(f"nodes/{node}/lxc", ostemplate=volid, restore=1, **params)
    return _ok(px.wait_task(node, str(upid), timeout, on_log), f"restore of {volid} into {vmid} on {node}")


@task(name="restore-vm", cache_policy=NO_CACHE, persist_result=False)  # never retried: a half-made guest needs a look first
def restore_vm(node: str, kind: str, vmid: int, volid: str, unique: bool, force: bool,
               overrides: dict[str, str]) -> dict[str, Any]:
    """Restore the archive into guest ``vmid`` on ``node``, its task log in the run's log."""
    settings = runtime.settings()
    px = runtime.proxmox(settings.vm_backup.proxmox, settings)
    logger = get_run_logger()
    result = restore_guest(px, node, kind, vmid, volid, unique=unique, force=force, storage=settings.vm_restore.storage,
                           overrides=overrides, timeout=settings.vm_restore.task_timeout_seconds,
                           on_log=lambda line: logger.info("restore %s: %s", vmid, line))
    return {"upid": result.upid, "exitstatus": result.exitstatus, "seconds": round(result.seconds, 3)}


def wait_running(px: ProxmoxClient, path: str, timeout: float) -> dict[str, Any]:
    started = time.monotonic()
    while True:
        status = px.get(f"{path}/status/current")
        if status.get("status") == "running":
            return status
        if time.monotonic() - started > timeout:
            raise ProxmoxError(f"{path} is {status.get('status')!r}, not running, {timeout:.0f}s after its start")
        time.sleep(1)


@task(name="start-vm", cache_policy=NO_CACHE, persist_result=False)
def start_vm(node: str, kind: str, vmid: int) -> dict[str, Any]:
    """Start the guest and wait until Proxmox reports it running."""
    settings = runtime.settings()
    cfg = settings.vm_restore
    px = runtime.proxmox(settings.vm_backup.proxmox, settings)
    path = f"nodes/{node}/{kind}/{vmid}"
    t = time.monotonic()
    _ok(px.wait_task(node, str(px.post(f"{path}/status/start")), cfg.task_timeout_seconds), f"start of {vmid}")
    wait_running(px, path, cfg.start_timeout_seconds)
    return {"seconds": round(time.monotonic() - t, 3)}


@task(name="stop-vm", cache_policy=NO_CACHE, persist_result=False)
def stop_vm(node: str, kind: str, vmid: int) -> None:
    """Stop the guest (an immediate stop: it is being replaced by a restore, after a fresh backup of it)."""
    settings = runtime.settings()
    px = runtime.proxmox(settings.vm_backup.proxmox, settings)
    path = f"nodes/{node}/{kind}/{vmid}"
    if px.get(f"{path}/status/current").get("status") == "stopped":
        return
    _ok(px.wait_task(node, str(px.post(f"{path}/status/stop")), settings.vm_restore.task_timeout_seconds), f"stop of {vmid}")


@task(name="rollback-vm", cache_policy=NO_CACHE, persist_result=False)
def rollback_vm(node: str, kind: str, vmid: int, snapshot: str) -> dict[str, Any]:
    """Roll the guest back to one of its Proxmox snapshots (the fast path; the snapshot is on its own disks)."""
    settings = runtime.settings()
    px = runtime.proxmox(settings.vm_backup.proxmox, settings)
    path = f"nodes/{node}/{kind}/{vmid}"
    known = [s.get("name") for s in px.get(f"{path}/snapshot") or [] if s.get("name") != "current"]
    if snapshot not in known:
        raise ProxmoxError(f"guest {vmid} has no snapshot {snapshot!r}; it has {known}")
    result = _ok(px.wait_task(node, str(px.post(f"{path}/snapshot/{snapshot}/rollback")),
                              settings.vm_restore.task_timeout_seconds), f"rollback of {vmid} to {snapshot}")
    return {"upid": result.upid, "seconds": round(result.seconds, 3)}


@task(name="destroy-vm", cache_policy=NO_CACHE, persist_result=False)
def destroy_vm(node: str, kind: str, vmid: int) -> None:
    """Remove a test restore: stopped, then destroyed with its disks."""
    settings = runtime.settings()
    px = runtime.proxmox(settings.vm_backup.proxmox, settings)
    path = f"nodes/{node}/{kind}/{vmid}"
    timeout = settings.vm_restore.task_timeout_seconds
    if px.get(f"{path}/status/current").get("status") != "stopped":
        _ok(px.wait_task(node, str(px.post(f"{path}/status/stop")), timeout), f"stop of {vmid}")
    _ok(px.wait_task(node, str(px.delete(path, purge=1, **{"destroy-unreferenced-disks": 1})), timeout), f"removal of {vmid}")
    get_run_logger().info("test restore %s on %s removed", vmid, node)
