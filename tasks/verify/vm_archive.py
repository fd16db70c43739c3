"""A new vzdump archive checked: still in the storage as reported, and the guest config inside it read back.

``extractconfig`` makes the node open the archive and read the config stored in it: an archive that
cannot be opened fails here, not on the day of a restore. Its disks and network devices must be the
live guest's; a Proxmox Backup Server storage's own verification, when it has run, must not have failed.
"""

from __future__ import annotations

import re
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from luxima_backup import runtime
from luxima_backup.errors import ProxmoxError, VerificationError
from luxima_backup.proxmox import network_devices, parse_config_text
from tasks.vzdump import Guest, archives_of

_DISK = re.compile(r"^(ide|sata|scsi|virtio|efidisk|tpmstate|mp)\d+$|^rootfs$")
# config keys never written to a manifest (stored unencrypted): cloud-init's password hash
_SECRET_KEYS = {"cipassword"}


def disks(config: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in sorted(config.items()) if _DISK.match(k)}


def manifest_config(config: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in sorted(config.items()) if k not in _SECRET_KEYS}


def compare_configs(stored: dict[str, str], live: dict[str, str]) -> list[str]:
    """What differs between the config inside the archive and the live one, in disks and network devices."""
    problems = []
    for what, a, b in (("disks", disks(stored), disks(live)), ("network devices", network_devices(stored), network_devices(live))):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                problems.append(f"{what} {key}: archive {a.get(key)!r}, live {b.get(key)!r}")
    return problems


@task(name="verify-vm-archive", cache_policy=NO_CACHE, persist_result=False, **runtime.TRANSIENT_RETRIES)
def verify_vm_archive(guest: Guest, archive: dict[str, Any]) -> dict[str, Any]:
    """Check the archive vzdump reported: listed with its size, readable, its config the live guest's."""
    settings = runtime.settings()
    px = runtime.proxmox(settings.vm_backup.proxmox, settings)
    listed = {a["volid"]: a for a in archives_of(px, guest.node, archive["storage"], guest.vmid)}
    entry = listed.get(archive["volid"])
    if entry is None:
        raise VerificationError(f"{archive['volid']} is no longer in {archive['storage']}'s content")
    if int(entry.get("size", 0)) != archive["size"]:
        raise VerificationError(f"{archive['volid']} is {entry.get('size')} bytes now, {archive['size']} when it was made")
    state = (entry.get("verification") or {}).get("state")
    if state == "failed":
        raise VerificationError(f"Proxmox Backup Server's verification of {archive['volid']} failed")
    try:
        text = px.get(f"nodes/{guest.node}/vzdump/extractconfig", volume=archive["volid"])
    except ProxmoxError as exc:
        if exc.transient:
            raise
        raise VerificationError(f"the config inside {archive['volid']} cannot be read: {exc}",
                                hint="the archive is damaged or incomplete; run the backup again") from None
    stored = parse_config_text(str(text))
    if not stored:
        raise VerificationError(f"{archive['volid']} holds no guest config")
    live = px.get(f"{guest.path}/config")
    problems = compare_configs(stored, {k: str(v) for k, v in live.items()})
    if problems:
        raise VerificationError(f"the config inside {archive['volid']} is not {guest.label}'s: " + "; ".join(problems[:5]),
                                hint="the guest changed during the backup, or the archive is another guest's; run it again")
    get_run_logger().info("verified %s: config read back, %d disk(s) and %d network device(s) match", archive["volid"],
                          len(disks(stored)), len(network_devices(stored)))
    return {"config": manifest_config(stored), "networks": network_devices(stored),
            "pbs_verification": state, "read_back": True}
