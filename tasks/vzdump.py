"""VM stages on Proxmox: choose the guests, check one is ready, run vzdump and find its archive, snapshot.

The archive is written by the node onto its own backup storage and never passes through this
machine: these stages ask Proxmox to do the work and check what it reports.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from luxima_backup import runtime
from luxima_backup.errors import ConfigError, ProxmoxError, SourceError
from luxima_backup.proxmox import ProxmoxClient, TaskResult, interface_addresses, parse_upid
from luxima_backup.settings import VmBackupSettings

SNAPSHOT_PREFIX = "luxima_"
_ARCHIVE_IN_LOG = re.compile(r"creating (?:vzdump|Proxmox Backup Server) archive '([^']+)'")


@dataclass(frozen=True)
class Guest:
    vmid: int
    name: str
    node: str
    type: str  # qemu or lxc
    status: str = ""
    pool: str | None = None
    template: bool = False

    @property
    def path(self) -> str:
        return f"nodes/{self.node}/{self.type}/{self.vmid}"

    @property
    def label(self) -> str:
        return f"{self.name} ({self.type} {self.vmid} on {self.node})"


def list_guests(px: ProxmoxClient) -> list[Guest]:
    """Every QEMU VM and LXC container of the cluster, with the node it runs on."""
    out = []
    for r in px.get("cluster/resources", type="vm") or []:
        if r.get("type") not in ("qemu", "lxc"):
            continue
        vmid = int(r["vmid"])
        out.append(Guest(vmid, str(r.get("name") or vmid), str(r["node"]), str(r["type"]), str(r.get("status", "")),
                         r.get("pool"), bool(r.get("template"))))
    return sorted(out, key=lambda g: g.vmid)


def _matches(g: Guest, spec: int | str) -> bool:
    return str(spec) == str(g.vmid) or str(spec) == g.name


def select_guests(guests: list[Guest], cfg: VmBackupSettings, only: list[str] | None = None) -> list[Guest]:
    """The guests a run backs up: ``only`` (vmids or names), else the settings' guests, pools or all; minus exclusions.

    A guest named that does not exist is a ``ConfigError``: a VM renamed or removed must be noticed, not skipped.
    """
    wanted = list(only) if only else list(cfg.guests)
    missing = [str(w) for w in wanted if not any(_matches(g, w) for g in guests)]
    if missing:
        raise ConfigError(f"no Proxmox guest named or numbered {', '.join(missing)}",
                          hint="check vm_backup.guests (vmids or names) against the cluster's guests")
    chosen = [g for g in guests if any(_matches(g, w) for w in wanted)]
    if not only:
        chosen += [g for g in guests if g.pool and g.pool in cfg.pools and g not in chosen]
        if cfg.all:
            chosen += [g for g in guests if g not in chosen and (cfg.include_templates or not g.template)]
    chosen = [g for g in chosen if not any(_matches(g, x) for x in cfg.exclude)]
    return sorted(chosen, key=lambda g: g.vmid)


@task(name="select-guests", cache_policy=NO_CACHE, persist_result=False, **runtime.TRANSIENT_RETRIES)
def choose_guests(only: list[str] | None) -> dict[str, Any]:
    """The guests to back up, and the cluster's guests that no backup job covers (reported, not an error)."""
    settings = runtime.settings()
    px = runtime.proxmox(settings.vm_backup.proxmox, settings)
    guests = list_guests(px)
    chosen = select_guests(guests, settings.vm_backup, only)
    try:
        uncovered = [int(r["vmid"]) for r in px.get("cluster/backup-info/not-backed-up") or []]
    except ProxmoxError as exc:  # needs Sys.Audit on /: a report, never a reason to skip the backups
        get_run_logger().warning("cannot list the guests no Proxmox backup job covers: %s", exc)
        uncovered = []
    ours = {g.vmid for g in chosen}
    not_covered = [asdict(g) for g in guests if g.vmid in uncovered and g.vmid not in ours]
    get_run_logger().info("backing up %d guest(s): %s", len(chosen), ", ".join(g.label for g in chosen) or "none")
    return {"guests": [asdict(g) for g in chosen], "not_covered": not_covered}


def archives_of(px: ProxmoxClient, node: str, storage: str, vmid: int) -> list[dict[str, Any]]:
    """The backup archives of ``vmid`` on a node's storage, oldest first."""
    content = px.get(f"nodes/{node}/storage/{storage}/content", content="backup", vmid=vmid) or []
    return sorted((c for c in content if int(c.get("vmid", -1)) == vmid), key=lambda c: (int(c.get("ctime", 0)), c["volid"]))


@task(name="check-guest", cache_policy=NO_CACHE, persist_result=False, **runtime.TRANSIENT_RETRIES)
def check_guest(guest: Guest) -> dict[str, Any]:
    """Before vzdump: the guest exists and is not locked; the backup storage is online with room for the last archive."""
    settings = runtime.settings()
    cfg = settings.vm_backup
    px = runtime.proxmox(cfg.proxmox, settings)
    status = px.get(f"{guest.path}/status/current")
    if status.get("lock"):
        raise ProxmoxError(f"{guest.label} is locked ({status['lock']}): another backup, a migration or a snapshot is running",
                           hint="wait for it to finish; a lock left by a crash is removed with `qm unlock` / `pct unlock`")
    store = px.get(f"nodes/{guest.node}/storage/{cfg.storage}/status")
    if not int(store.get("active", 0)) or not int(store.get("enabled", 1)):
        raise ProxmoxError(f"backup storage {cfg.storage} on {guest.node} is not online", hint="check the storage in Proxmox")
    previous = archives_of(px, guest.node, cfg.storage, guest.vmid)
    last_size = int(previous[-1].get("size", 0)) if previous else 0
    avail = int(store.get("avail", 0))
    if avail < last_size:
        raise SourceError(f"backup storage {cfg.storage} on {guest.node} has {avail} bytes free; the last archive of "
                          f"{guest.label} took {last_size}",
                          hint="free space on the storage (older archives, other content) or lower vm_backup.keep")
    return {"status": status.get("status"), "avail": avail, "last_size": last_size,
            "addresses": guest_addresses(px, guest) if status.get("status") == "running" else []}


def guest_addresses(px: ProxmoxClient, guest: Guest) -> list[str]:
    """The addresses the running guest reports (its agent; a container's interfaces), recorded so a restore can
    check the restored guest comes up with them. Best effort: no agent, or no VM.Monitor, is no address."""
    try:
        if guest.type == "qemu":
            interfaces = (px.get(f"{guest.path}/agent/network-get-interfaces") or {}).get("result", [])
        else:
            interfaces = px.get(f"{guest.path}/interfaces") or []
    except ProxmoxError as exc:
        get_run_logger().info("addresses of %s not recorded: %s", guest.label, exc)
        return []
    return interface_addresses(interfaces)


def run_vzdump(px: ProxmoxClient, guest: Guest, cfg: VmBackupSettings, on_log: Any) -> tuple[TaskResult, str | None]:
    """Start vzdump for one guest and wait for it; the task's result and the archive path its log names."""
    params: dict[str, Any] = {"vmid": guest.vmid, "storage": cfg.storage, "mode": cfg.mode, "compress": cfg.compress,
                              "notes-template": cfg.notes_template}
    if cfg.bwlimit_kib:
        params["bwlimit"] = cfg.bwlimit_kib
    upid = str(px.post(f"nodes/{guest.node}/vzdump", **params))
    named: list[str] = []

    def log_line(line: str) -> None:
        m = _ARCHIVE_IN_LOG.search(line)
        if m:
            named.append(m.group(1))
        on_log(line)

    result = px.wait_task(guest.node, upid, cfg.task_timeout_seconds, log_line)
    return result, (named[-1] if named else None)


@task(name="vzdump", cache_policy=NO_CACHE, persist_result=False)  # never retried: a second vzdump would find the guest locked
def vzdump(guest: Guest) -> dict[str, Any]:
    """Back the guest up with vzdump on its node; only an OK (or WARNINGS) exit status is success; the new archive found."""
    settings = runtime.settings()
    cfg = settings.vm_backup
    px = runtime.proxmox(cfg.proxmox, settings)
    logger = get_run_logger()
    warned: list[str] = []  # Proxmox's warn() lines: what "WARNINGS: n" counts

    def log_line(line: str) -> None:
        if line.startswith(("WARN:", "WARNING:")):
            warned.append(line)
            logger.warning("vzdump %s: %s", guest.vmid, line)
        else:
            logger.info("vzdump %s: %s", guest.vmid, line)

    result, path = run_vzdump(px, guest, cfg, log_line)
    if not result.ok:
        # Proxmox checks VM.Backup inside the task: a missing privilege is its exit status, not a 403
        denied = "Permission check failed" in result.exitstatus
        raise ProxmoxError(f"vzdump of {guest.label} ended {result.exitstatus!r}; its log ends: " + " | ".join(result.log_tail[-8:]),
                           hint="grant the privilege to the token's role (docs/proxmox.md)" if denied
                           else "read the whole task log in the Proxmox UI (Tasks)")
    if result.warnings:
        logger.warning("vzdump of %s ended with %d warning(s)", guest.label, result.warnings)
    archive = _new_archive(px, guest, cfg.storage, int(parse_upid(result.upid)["starttime"], 16), path)
    logger.info("archive %s: %d bytes", archive["volid"], archive["size"])
    return {"upid": result.upid, "exitstatus": result.exitstatus, "warnings": result.warnings, "warning_lines": warned[-20:],
            "log_tail": result.log_tail[-20:], "seconds": round(result.seconds, 3), "archive": archive}


def _new_archive(px: ProxmoxClient, guest: Guest, storage: str, task_started: int, path: str | None) -> dict[str, Any]:
    """The archive this run's task wrote: in the storage's content for the guest, made since the task started
    (by Proxmox's clock, from the task id), the one the log names when it names one; empty is a failure."""
    fresh = [a for a in archives_of(px, guest.node, storage, guest.vmid) if int(a.get("ctime", 0)) >= task_started]
    if path:
        name = path.rsplit("/", 1)[-1]
        fresh = [a for a in fresh if a["volid"].endswith(name) or name in a["volid"]] or fresh
    if not fresh:
        raise ProxmoxError(f"vzdump of {guest.label} reported success but no new archive is in {storage}'s content",
                           hint="check the storage's content in the Proxmox UI")
    archive = fresh[-1]
    if int(archive.get("size", 0)) <= 0:
        raise ProxmoxError(f"the new archive {archive['volid']} of {guest.label} is empty")
    return {"volid": archive["volid"], "node": guest.node, "storage": storage, "format": archive.get("format"),
            "size": int(archive["size"]), "ctime": int(archive["ctime"]), "notes": archive.get("notes"),
            "protected": bool(archive.get("protected")), "verification": archive.get("verification")}


@task(name="snapshot", cache_policy=NO_CACHE, persist_result=False)
def snapshot(guest: Guest, started: datetime) -> dict[str, Any]:
    """A Proxmox snapshot for the fast roll-back path (on the guest's own disks: not a backup), older ones of ours
    beyond snapshot_keep removed."""
    settings = runtime.settings()
    cfg = settings.vm_backup
    px = runtime.proxmox(cfg.proxmox, settings)
    name = f"{SNAPSHOT_PREFIX}{started.astimezone(timezone.utc):%Y%m%d_%H%M%S}"
    result = px.wait_task(guest.node, str(px.post(f"{guest.path}/snapshot", snapname=name,
                                                  description="taken with the weekly backup by luxima-backup")),
                          cfg.task_timeout_seconds)
    if not result.ok:
        raise ProxmoxError(f"snapshot {name} of {guest.label} ended {result.exitstatus!r}: " + " | ".join(result.log_tail[-5:]))
    ours = sorted(s["name"] for s in px.get(f"{guest.path}/snapshot") or [] if str(s.get("name", "")).startswith(SNAPSHOT_PREFIX))
    removed = []
    for old in ours[:-cfg.snapshot_keep]:
        done = px.wait_task(guest.node, str(px.delete(f"{guest.path}/snapshot/{old}")), cfg.task_timeout_seconds)
        if done.ok:
            removed.append(old)
        else:
            get_run_logger().warning("snapshot %s of %s could not be removed: %s", old, guest.label, done.exitstatus)
    return {"name": name, "removed": removed}
