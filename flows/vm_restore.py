"""The VM restore flow, run by hand: restore → check the network configuration → start → test connectivity.

The procedure's "log in to Proxmox, pick the VM → Restore → select the snapshot, verify the network
configuration, start the VM again and test connectivity", with its checks written down. By default
the guest is restored **beside** the original, under a new id from ``/cluster/nextid`` with new MAC
addresses and every NIC's link cut (``isolated``): a test restore never fights the running original
for its addresses. Replacing the original needs ``replace`` and ``confirm`` naming the guest, and
takes a fresh backup of it first (unless ``skip_safety_backup``). ``rollback_snapshot`` rolls the
original back to one of its Proxmox snapshots instead (the fast path; same checks).
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from luxima_backup import catalog, events, runtime
from luxima_backup.errors import ConfigError, VerificationError
from luxima_backup.manifest import VmManifest
from luxima_backup.secrets import install_log_redaction, redact
from luxima_backup.settings import Settings
from flows.common import flow, logged
from flows.vm_backup import backup_guest
from tasks.log import log_run
from tasks.qmrestore import destroy_vm, isolated_line, restore_vm, rollback_vm, start_vm, stop_vm
from tasks.verify.restored_vm import verify_vm_connectivity, verify_vm_network
from tasks.vzdump import Guest, archives_of, list_guests


def find_backup(settings: Settings, guest: str, backup: str, as_of: datetime | None) -> catalog.Backup:
    """``latest`` (verified, optionally as of a time), a backup id, or an archive's volid."""
    cat = runtime.catalog("vm", settings)
    if ":" in backup and "/" in backup and not backup.endswith(".json"):  # a volid: STORAGE:backup/vzdump-…
        for b in reversed(cat.list_backups("vm", guest)):
            if b.entry.volid == backup:
                return b
        raise ConfigError(f"no verified backup of {guest} has the archive {backup}",
                          hint="archives made outside luxima-backup (by hand, by a Proxmox job) are restored from the Proxmox UI")
    return cat.resolve("vm", backup, source=guest, as_of=as_of)


def _guest_name(settings: Settings, spec: str) -> str:
    """A guest given by name or vmid, as its backups are filed (by name)."""
    if not spec.isdigit():
        return spec
    px = runtime.proxmox(settings.vm_backup.proxmox, settings)
    for g in list_guests(px):
        if g.vmid == int(spec):
            return g.name
    # a guest gone from the cluster (the disaster case): its backups still say which vmid they were of
    for b in runtime.catalog("vm", settings).list_backups("vm"):
        if b.entry.vmid == int(spec):
            return b.manifest.source.name  # type: ignore[union-attr]
    raise ConfigError(f"no guest and no backup of a guest with vmid {spec}", hint="name the guest as `luxima-backup list --component vm` shows")


@flow(name="vm-restore", validate_parameters=True, persist_result=True)
def vm_restore(guest: str, backup: str = "latest", as_of: datetime | None = None, target_node: str | None = None,
               target_vmid: int | None = None, isolated: bool = True, replace: bool = False, confirm: str | None = None,
               skip_safety_backup: bool = False, rollback_snapshot: str | None = None, start: bool = True,
               cleanup: bool = False) -> dict[str, Any]:
    """Restore a Proxmox guest from a vzdump backup, check its network configuration, start it and test connectivity.

    Args:
        guest: the guest's name (or vmid) as its backups are listed.
        backup: latest (newest verified), a backup id, or an archive's volid (STORAGE:backup/vzdump-...).
        as_of: with latest: the newest verified backup completed by this time.
        target_node: node to restore on (default: the original's; proxmox-node2 for DR: its storage must hold the archive).
        target_vmid: id of the restored guest (default: a new one from /cluster/nextid; restored beside the original).
        isolated: cut every NIC's link (link_down=1) so the restored guest cannot reach or disturb the network; the
            TCP and HTTP checks are then skipped. Set false for a real recovery.
        replace: overwrite the original guest (same id) instead of restoring beside it; needs confirm.
        confirm: the guest's name, repeated, to replace it or roll it back.
        skip_safety_backup: replace without first backing up the guest as it is now.
        rollback_snapshot: roll the original back to this Proxmox snapshot instead of restoring a backup.
        start: start the restored guest and test it (false: restore and check the configuration only).
        cleanup: remove the restored guest at the end (test restores; never the original).
    """
    with runtime.time_limit(lambda s: s.vm_restore.timeout_seconds, "vm-restore"):
        settings = runtime.settings()
        install_log_redaction()
        logger = get_run_logger()
        started = datetime.now(timezone.utc)
        t0 = time.monotonic()
        name = _guest_name(settings, guest)
        destructive = replace or rollback_snapshot is not None
        if destructive and confirm != name:
            raise ConfigError(f"{'rolling back' if rollback_snapshot else 'replacing'} guest {name} needs confirm = {name!r}",
                              hint="or restore it beside the original (the default) and compare first")
        if cleanup and destructive:
            raise ConfigError("cleanup removes a test restore; it cannot be combined with replace or rollback_snapshot")
        px = runtime.proxmox(settings.vm_backup.proxmox, settings)
        live = {g.vmid: g for g in list_guests(px)}
        checks: list[dict[str, Any]] = []
        timings: dict[str, float] = {}
        outcome: dict[str, Any] = {"guest": name}
        found: catalog.Backup | None = None
        try:
            if rollback_snapshot is not None:
                original = next((g for g in live.values() if g.name == name), None)
                if original is None:
                    raise ConfigError(f"guest {name} is not in the cluster: there is nothing to roll back")
                node, kind, vmid, unique = original.node, original.type, original.vmid, False
                expected = _networks_of(px, original)
                stop_vm(node, kind, vmid)
                timings["rollback"] = rollback_vm(node, kind, vmid, rollback_snapshot)["seconds"]
                outcome.update(rolled_back_to=rollback_snapshot, vmid=vmid, node=node)
                addresses: list[str] = []
            else:
                found = find_backup(settings, name, backup, as_of)
                doc = found.manifest
                assert isinstance(doc, VmManifest)
                kind, node = doc.source.type, target_node or doc.source.node
                _archive_reachable(px, doc, node)
                if replace:
                    vmid, unique = doc.source.vmid, False
                    original = live.get(vmid)
                    if original is not None:
                        if not skip_safety_backup:
                            logger.info("backing up %s as it is now before replacing it", name)
                            safety = backup_guest(original, prune=False)
                            outcome["safety_backup"] = safety["backup_id"]
                        stop_vm(original.node, original.type, vmid)
                        if original.node != node:
                            raise ConfigError(f"guest {vmid} lives on {original.node}; replacing it means restoring there",
                                              hint=f"leave target_node empty, or restore beside it on {node}")
                else:
                    vmid = target_vmid or int(px.get("cluster/nextid"))
                    unique = True
                    if vmid in live:
                        raise ConfigError(f"vmid {vmid} is taken by {live[vmid].label}",
                                          hint="leave target_vmid empty for a free id, or use replace to overwrite the original")
                overrides = {k: isolated_line(doc.config[k], unique) for k in doc.networks if k in doc.config} if isolated else {}
                outcome.update(backup_id=found.backup_id, volid=doc.archive.volid, vmid=vmid, node=node, isolated=isolated)
                logger.info("restoring %s (%s) as %s %d on %s%s", found.backup_id, doc.archive.volid, kind, vmid, node,
                            ", isolated" if isolated else "")
                timings["restore"] = restore_vm(node, kind, vmid, doc.archive.volid, unique, replace, overrides)["seconds"]
                expected = doc.networks
                addresses = doc.addresses
            net_rows = verify_vm_network(node, kind, vmid, expected, unique, isolated and rollback_snapshot is None)
            checks += net_rows
            bad = [r for r in net_rows if not r["ok"]]
            if bad:
                raise VerificationError(
                    f"the network configuration of {kind} {vmid} on {node} is wrong: "
                    + "; ".join(f"{r['check']}: expected {r['expected']}, got {r['actual']}" for r in bad[:5]),
                    hint="the guest was not started; add the bridge on the node or restore to another node")
            if start:
                timings["start"] = start_vm(node, kind, vmid)["seconds"]
                conn_rows = verify_vm_connectivity(node, kind, vmid, name, isolated and rollback_snapshot is None, addresses)
                checks += conn_rows
                bad = [r for r in conn_rows if not r["ok"]]
                if bad:
                    raise VerificationError(f"restored guest {vmid} is not reachable as expected: "
                                            + "; ".join(f"{r['check']}: {r['actual']}" for r in bad[:5]))
            rto = time.monotonic() - t0
            outcome.update(status="success", rto_seconds=round(rto, 3))
        except BaseException as exc:
            outcome.update(status="failed", error=redact(f"{type(exc).__name__}: {exc}"))
            if events.is_verification_failure(exc):
                events.verification_failed("restore", "vm", name, str(exc), backup_id=found.backup_id if found else None)
            raise
        finally:
            if cleanup and "vmid" in outcome and not destructive and outcome["vmid"] not in live:
                destroy_vm(outcome["node"], kind, outcome["vmid"])
                outcome["removed"] = True
            _publish(settings, outcome, checks, timings)
            _log(settings, name, started, outcome, checks, timings)
        events.restore_succeeded("vm", name, outcome.get("backup_id") or rollback_snapshot or "", vmid=outcome["vmid"],
                                 node=outcome["node"], rto_seconds=outcome["rto_seconds"])
        return {**outcome, "checks": len(checks), "timings": timings}


def _networks_of(px: Any, guest: Guest) -> dict[str, dict[str, str]]:
    from luxima_backup.proxmox import network_devices

    return network_devices({k: str(v) for k, v in px.get(f"{guest.path}/config").items()})


def _archive_reachable(px: Any, doc: VmManifest, node: str) -> None:
    """The archive must be on a storage of the target node: a directory storage is the node's own, so restoring
    on another node needs the archive copied there first (the DR replication does)."""
    present = {a["volid"] for a in archives_of(px, node, doc.archive.storage, doc.source.vmid)}
    if doc.archive.volid not in present:
        raise ConfigError(f"{doc.archive.volid} is not on {node}'s storage {doc.archive.storage}",
                          hint=f"restore on {doc.archive.node}, or copy the archive to {node} first (dr-replicate)")


def _publish(settings: Settings, outcome: dict[str, Any], checks: list[dict[str, Any]], timings: dict[str, float]) -> None:
    key = "".join(ch if ch.isalnum() else "-" for ch in f"vm-restore-{outcome['guest']}".lower())
    if checks:
        create_table_artifact(key=f"{key}-checks", table=checks, description=f"Checks of the restore of {outcome['guest']}")
    target = settings.restore.rto_target_minutes * 60
    rto = outcome.get("rto_seconds")
    lines = [
        f"## VM restore of `{outcome['guest']}`: {'all checks passed' if outcome.get('status') == 'success' else '**FAILED**'}",
        "",
        f"Backup `{outcome.get('backup_id') or outcome.get('rolled_back_to')}` → {outcome.get('vmid')} on "
        f"`{outcome.get('node')}`" + (" (isolated: links cut)" if outcome.get("isolated") else ""),
        "",
        f"RTO (start to checked): **{rto / 60:.1f} min** against the {target / 60:.0f} min target"
        if rto is not None else f"Error: {outcome.get('error')}",
        "",
        "| stage | seconds |", "|---|---:|", *[f"| {s} | {v:.1f} |" for s, v in timings.items()],
        "",
        "| check | expected | actual | ok |", "|---|---|---|---|",
        *[f"| {c['check']} | {c['expected']} | {c['actual']} | {'yes' if c['ok'] else '**NO**'} |" for c in checks],
    ]
    if outcome.get("removed"):
        lines += ["", "The restored guest was removed (cleanup)."]
    create_markdown_artifact(key=f"{key}-summary", markdown=redact("\n".join(lines)), description="VM restore report")


def _log(settings: Settings, name: str, started: datetime, outcome: dict[str, Any], checks: list[dict[str, Any]],
         timings: dict[str, float]) -> None:
    if not settings.log.enabled:
        return
    logged(log_run, "restore", "restore", "vm", f"{outcome.get('node')}/{outcome.get('vmid')}", name,
           outcome.get("status", "failed"), started, outcome.get("backup_id"), outcome.get("volid"),
           str(flow_run.id) if flow_run.id else None, outcome.get("error"),
           {"checks": checks, "timings": timings, **{k: v for k, v in outcome.items() if k not in ("error", "status")}}, {})
