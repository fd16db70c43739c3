"""The VM backup flow: per Proxmox guest, check → vzdump → verify → manifest → log → prune (and a snapshot).

vzdump runs on the guest's node and writes the archive onto the node's backup storage; this flow
starts it, waits for its task, checks the archive it made (its config read back from the archive
itself), records it in a manifest in the backup storage beside the other components' manifests, and
keeps the newest ``vm_backup.keep`` good archives per guest. One guest failing does not stop the
others; the run fails if any failed.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from luxima_backup import __version__, events, manifest, runtime
from luxima_backup.errors import BackupError, ConfigError
from luxima_backup.secrets import install_log_redaction, redact
from flows.common import backup_start, flow, logged, outcome, save_manifest
from tasks.log import log_finish, log_start
from tasks.verify.vm_archive import verify_vm_archive
from tasks.vm_prune import prune_vm_archives
from tasks.vzdump import Guest, check_guest, choose_guests, snapshot, vzdump


@flow(name="vm-backup-guest", validate_parameters=False, persist_result=False)
def backup_guest(guest: Guest, prune: bool = True) -> dict[str, Any]:
    """Back up one guest: check, vzdump, verify, manifest, log, prune; a Proxmox snapshot too when configured.

    ``prune`` false: the safety backup a replacing restore takes first, which must not remove the very archive
    about to be restored.
    """
    settings = runtime.settings()
    install_log_redaction()
    logger = get_run_logger()
    cfg = settings.vm_backup
    started = backup_start(runtime.store(settings), settings.storage.prefix, "vm", guest.name, settings.work_dir)
    t0 = time.monotonic()
    backup_id, manifest_key = manifest.vm_keys(settings.storage.prefix, guest.name, started)
    run_id = str(flow_run.id) if flow_run.id else None
    entry = logged(log_start, "start", "backup", "vm", guest.name, backup_id, None, run_id) if settings.log.enabled else None
    try:
        checked_guest = check_guest(guest)
        dumped = vzdump(guest)
        archive = dumped["archive"]
        checked = verify_vm_archive(guest, archive)
        snap = snapshot(guest, started) if cfg.snapshots else None
        finished = datetime.now(timezone.utc)
        document = manifest.VmManifest(
            backup_id=backup_id, status="verified", started_at=started, completed_at=finished,
            source=manifest.VmSource(name=guest.name, vmid=guest.vmid, type=guest.type, node=guest.node, proxmox=cfg.proxmox),
            archive=manifest.VmArchive(**archive), mode=cfg.mode,
            task={k: dumped[k] for k in ("upid", "exitstatus", "warnings")},
            config=checked["config"], networks=checked["networks"], addresses=checked_guest["addresses"],
            snapshot=snap["name"] if snap else None,
            tool={"luxima_backup": __version__},
            verification={"read_back": True, "pbs_verification": checked["pbs_verification"], "verified_at": finished.isoformat()},
            timings={"vzdump": dumped["seconds"], "total": round((finished - started).total_seconds(), 3)},
            flow_run_id=run_id,
        )
        save_manifest(manifest_key, document)
    except BaseException as exc:
        if events.is_verification_failure(exc):
            events.verification_failed("backup", "vm", guest.name, str(exc), backup_id=backup_id)
        logged(log_finish, "finish", entry, guest.name, "failed", redact(f"{type(exc).__name__}: {exc}"),
               {"vmid": guest.vmid, "node": guest.node, "elapsed_seconds": round(time.monotonic() - t0, 3)}, {}, "vm",
               skip=entry is None)
        raise
    # Only after this backup is verified and recorded: a run that failed never removes an older archive.
    pruned = prune_vm_archives(guest) if prune else []
    logged(log_finish, "finish", entry, guest.name, "success", None,
           {"vmid": guest.vmid, "node": guest.node, "volid": archive["volid"], "warnings": dumped["warnings"],
            "pruned": [r for r in pruned if r["action"] != "kept"], "timings": document.timings},
           {"object_key": archive["volid"], "size_compressed": archive["size"]}, "vm", skip=entry is None)
    events.backup_succeeded("vm", guest.name, backup_id, volid=archive["volid"], size=archive["size"])
    logger.info("backup %s of %s complete: %s (%d bytes)", backup_id, guest.label, archive["volid"], archive["size"])
    return {"backup_id": backup_id, "manifest_key": manifest_key, "guest": guest.name, "vmid": guest.vmid,
            "node": guest.node, "volid": archive["volid"], "size": archive["size"], "warnings": dumped["warnings"],
            "log_tail": (dumped["warning_lines"] or dumped["log_tail"][-5:]) if dumped["warnings"] else [],
            "snapshot": document.snapshot,
            "pruned": pruned, "seconds": round(time.monotonic() - t0, 3)}


@flow(name="vm-backup", validate_parameters=True, persist_result=True)
def vm_backup(guests: list[str] | None = None) -> dict[str, Any]:
    """Back up Proxmox guests (QEMU VMs and LXC containers) with vzdump onto the node's backup storage, verified.

    Args:
        guests: vmids or names to back up now (default: vm_backup.guests, pools or all, from the settings).
    """
    with runtime.time_limit(lambda s: s.vm_backup.timeout_seconds, "vm-backup"):
        settings = runtime.settings()
        install_log_redaction()
        if not guests and not settings.vm_backup.configured:
            raise ConfigError("no guests to back up", hint="set vm_backup.guests, vm_backup.pools or vm_backup.all = true")
        chosen = choose_guests(list(guests) if guests else None)
        results: dict[str, Any] = {}
        failures: dict[str, BaseException] = {}
        for g in chosen["guests"]:
            guest = Guest(**g)
            result, exc = outcome(backup_guest(guest, return_state=True))
            if exc is None:
                results[guest.name] = result
            else:
                failures[guest.name] = exc
        _publish(results, failures, chosen["not_covered"])
        if failures:
            detail = "; ".join(f"{n}: {redact(str(exc))}" for n, exc in failures.items())
            raise BackupError(f"VM backup failed for {', '.join(failures)}: {detail}")
        return {"guests": results, "not_covered": [g["vmid"] for g in chosen["not_covered"]]}


def _publish(results: dict[str, Any], failures: dict[str, BaseException], not_covered: list[dict[str, Any]]) -> None:
    """The run's artifacts: one row per guest, and what retention did to each guest's archives."""
    rows = [{"guest": n, "vmid": r["vmid"], "node": r["node"], "status": "OK" if not r["warnings"] else f"{r['warnings']} warning(s)",
             "archive": r["volid"], "MiB": round(r["size"] / 2**20, 1), "seconds": r["seconds"]} for n, r in results.items()]
    rows += [{"guest": n, "vmid": "", "node": "", "status": "FAILED", "archive": redact(str(exc))[:300], "MiB": "", "seconds": ""}
             for n, exc in failures.items()]
    create_table_artifact(key="vm-backup", table=rows, description="VM backups of this run")
    lines = ["## VM backup", "", f"{len(results)} guest(s) backed up, {len(failures)} failed."]
    warned = {n: r for n, r in results.items() if r["warnings"]}
    for n, r in warned.items():
        lines += ["", f"**{n}** ended with {r['warnings']} warning(s):", "", *[f"    {line}" for line in r["log_tail"]]]
    lines += ["", "### Retention", "", "| guest | archive | action | why |", "|---|---|---|---|"]
    lines += [f"| {n} | `{p['volid']}` | {p['action']} | {p['why']} |" for n, r in results.items() for p in r["pruned"]]
    if not_covered:
        lines += ["", "### Guests no backup covers", "",
                  ", ".join(f"{g['name']} ({g['vmid']})" for g in not_covered)]
    create_markdown_artifact(key="vm-backup-summary", markdown=redact("\n".join(lines)), description="VM backup summary")
