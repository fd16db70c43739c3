"""Proxmox fixtures shared by the VM tests: the API simulator with two nodes and two guests, and settings for it."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import file_keys
from tests.simulators.proxmox import ProxmoxSimulator

NODE, NODE2 = "proxmox-node1", "proxmox-node2"
WEEK = 7 * 24 * 3600
BACKUP_PRIVS = {"VM.Audit", "VM.Backup", "VM.Snapshot", "Datastore.Audit", "Datastore.AllocateSpace", "Datastore.Allocate"}
# what docs/proxmox.md asks for restores, besides the backup privileges
RESTORE_PRIVS = {"VM.Allocate", "VM.PowerMgmt", "VM.Monitor", "VM.Config.Network", "VM.Config.Disk", "VM.Config.CPU",
                 "VM.Config.Memory", "VM.Config.Options", "VM.Snapshot.Rollback"}
TEST_ADDRESS = "127.0.0.2"  # what the guests' agents report: local, so the restore's TCP checks reach this machine


@pytest.fixture
def pve(tmp_path: Path) -> Iterator[ProxmoxSimulator]:
    sim = ProxmoxSimulator(nodes=(NODE, NODE2), task_seconds=0.2).start()
    sim.add_storage(NODE, "backup", tmp_path / "pve-backup-1")
    sim.add_storage(NODE2, "backup", tmp_path / "pve-backup-2")
    sim.add_guest(NODE, 100, "qemu", name="web", agent_ip=[f"{TEST_ADDRESS}/8"],
                  config={"name": "web", "memory": "2048", "cores": "2", "agent": "1", "ostype": "l26",
                          "scsi0": "local-lvm:vm-100-disk-0,size=8G", "boot": "order=scsi0",
                          "net0": "virtio=BC:24:11:00:01:00,bridge=vmbr0,tag=10,firewall=1",
                          "cipassword": "$5$not-a-real-hash"})
    sim.add_guest(NODE, 101, "lxc", name="cache")
    yield sim
    assert sim.internal_errors == []
    sim.stop()


@pytest.fixture
def vm_settings(pve: ProxmoxSimulator, write_settings: Any, database: str, bucket: str, key_file: Path,
                monkeypatch: pytest.MonkeyPatch) -> Any:
    """Settings for VM backups with a token holding exactly the documented privileges (docs/proxmox.md)."""
    counter = itertools.count()

    def write(privileges: dict[str, set[str]] | None = None, vm_backup: str = "", proxmox_extra: str = "",
              vm_restore: str = "") -> Path:
        name = f"luxima{next(counter)}"
        secret = pve.add_token("backup@pve", name, privileges or {
            "/vms": BACKUP_PRIVS | RESTORE_PRIVS, "/storage/backup": BACKUP_PRIVS, "/storage/local-lvm": {"Datastore.AllocateSpace"},
            "/sdn/zones/localnetwork": {"SDN.Audit"}, "/": {"Sys.Audit"}})
        token = f"backup@pve!{name}"
        monkeypatch.setenv("LUXIMA_TEST_PVE_TOKEN", secret)
        return write_settings(database, bucket, file_keys(key_file), f"""
            [proxmox.main]
            address = "{pve.url}"
            nodes = ["{NODE}", "{NODE2}"]
            token_id = "{token}"
            token_secret = "env:LUXIMA_TEST_PVE_TOKEN"
            ca_cert = "{pve.ca_path}"
            {proxmox_extra}

            [vm_backup]
            storage = "backup"
            {vm_backup if "guests" in vm_backup else 'guests = [100, "cache"]' + chr(10) + vm_backup}

            [vm_restore]
            storage = "local-lvm"
            agent_timeout_seconds = 30
            {vm_restore}
        """)

    return write


def archives(pve: ProxmoxSimulator, vmid: int, node: str = NODE) -> list[dict[str, Any]]:
    from proxmoxer import ProxmoxAPI

    api = ProxmoxAPI(pve.host, port=pve.port, user="root@pam", token_name="sim", token_value=pve.root_token.secret,
                     verify_ssl=str(pve.ca_path), backend="https")
    return sorted((a for a in api.nodes(node).storage("backup").content.get(content="backup", vmid=vmid)),
                  key=lambda a: a["ctime"])
