"""The Proxmox VE simulator answers as PVE 8 does, seen through proxmoxer; the same tests run against a real PVE.

With PROXMOX_HOST set, every server test here runs against that Proxmox VE instead of the
simulator, so what the simulator claims is checked against the real thing. It then also needs:
PROXMOX_TOKEN_USER (e.g. root@pam), PROXMOX_TOKEN_NAME, PROXMOX_TOKEN_VALUE (a token allowed to
back up, restore, snapshot and destroy), PROXMOX_PORT (8006), PROXMOX_CA (the cluster's CA file)
or PROXMOX_VERIFY=false, PROXMOX_NODE, PROXMOX_STORAGE (a directory storage with 'backup'
content, on PROXMOX_NODE), PROXMOX_TEST_VMID (a QEMU VM on PROXMOX_NODE the tests may back up,
snapshot and roll back; its disks on a storage that takes snapshots). Optional: PROXMOX_TEST_CTID
(a container to back up too) and PROXMOX_LIMITED_TOKEN_NAME / PROXMOX_LIMITED_TOKEN_VALUE (a
privilege-separated token of the same user with only VM.Audit on /vms/<PROXMOX_TEST_VMID> and
Datastore.AllocateSpace on /storage/<PROXMOX_STORAGE>). The tests remove what they create
(archives, restored VMs, snapshots).

Tests that need the simulator's controls (fault injection, the clock, tokens it makes, files on
its storages, offline nodes, the guest agent's timing) are skipped against a real server, with
the reason; with the simulator nothing here is skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import ssl
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import requests
from proxmoxer import ProxmoxAPI
from proxmoxer.core import ResourceException
from proxmoxer.tools import Tasks

from tests.simulators.proxmox import ProxmoxSimulator

REAL_PVE = bool(os.environ.get("PROXMOX_HOST"))
NODE1, NODE2 = "proxmox-node1", "proxmox-node2"


@dataclasses.dataclass
class Server:
    host: str
    port: int
    user: str
    token_name: str
    token_value: str
    verify: str | bool  # the CA file, or False
    node: str
    storage: str
    vmid: int  # a QEMU VM
    ctid: int | None  # a container, if there is one to test with
    limited: tuple[str, str] | None  # (token name, secret) with VM.Audit and Datastore.AllocateSpace only
    sim: ProxmoxSimulator | None
    cleanups: list[Callable[[], None]] = dataclasses.field(default_factory=list)

    def api(self, token: tuple[str, str] | None = None, verify: str | bool | None = None) -> ProxmoxAPI:
        name, value = token or (self.token_name, self.token_value)
        return ProxmoxAPI(self.host, port=self.port, user=self.user, token_name=name, token_value=value,
                          verify_ssl=self.verify if verify is None else verify, backend="https", timeout=30)

    def simulator(self, why: str) -> ProxmoxSimulator:
        """The simulator, for what only it can do; against a real PVE the test is skipped, saying why."""
        if self.sim is None:
            pytest.skip(f"needs the simulator: {why}")
        return self.sim

    def wait(self, px: ProxmoxAPI, upid: str) -> dict[str, Any]:
        status = Tasks.blocking_status(px, upid, timeout=300, polling_interval=0.05 if self.sim else 1)
        assert status is not None, f"task {upid} did not end"
        return status

    def log(self, px: ProxmoxAPI, upid: str) -> list[str]:
        node = Tasks.decode_upid(upid)["node"]
        return [line["t"] for line in px.nodes(node).tasks(upid).log.get(limit=0)]

    def backups(self, px: ProxmoxAPI, vmid: int | None = None, node: str | None = None) -> dict[str, dict[str, Any]]:
        content = px.nodes(node or self.node).storage(self.storage).content.get(content="backup", vmid=vmid)
        return {entry["volid"]: entry for entry in content}

    def backup(self, px: ProxmoxAPI, vmid: int | str, **options: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """vzdump of these guests to the test storage: (the task's status, the archives it made, removed after the test)."""
        before = self.backups(px)
        upid = px.nodes(self.node).vzdump.post(vmid=str(vmid), storage=self.storage, **options)
        status = self.wait(px, upid)
        made = [entry for volid, entry in self.backups(px).items() if volid not in before]
        for entry in made:
            self.cleanups.append(lambda volid=entry["volid"]: self.remove_backup(volid))
        return {**status, "upid": upid}, made

    def remove_backup(self, volid: str) -> None:
        px = self.api()
        content = px.nodes(self.node).storage(self.storage).content
        if volid in self.backups(px):
            content(volid).put(protected=0)
            self.wait(px, content(volid).delete())

    def destroy_later(self, vmid: int, node: str | None = None) -> None:
        def destroy() -> None:
            px = self.api()
            guests = {g["vmid"]: g for g in px.cluster.resources.get(type="vm")}
            if vmid in guests:
                guest = px.nodes(guests[vmid]["node"]).qemu(vmid) if guests[vmid]["type"] == "qemu" else \
                    px.nodes(guests[vmid]["node"]).lxc(vmid)
                if guests[vmid]["status"] == "running":
                    self.wait(px, guest.status.stop.post())
                self.wait(px, guest.delete(purge=1, **{"destroy-unreferenced-disks": 1}))
        self.cleanups.append(destroy)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    if REAL_PVE:
        env = os.environ
        verify: str | bool = env.get("PROXMOX_CA") or env.get("PROXMOX_VERIFY", "true").lower() != "false"
        limited = (env["PROXMOX_LIMITED_TOKEN_NAME"], env["PROXMOX_LIMITED_TOKEN_VALUE"]) \
            if env.get("PROXMOX_LIMITED_TOKEN_NAME") else None
        real = Server(env["PROXMOX_HOST"], int(env.get("PROXMOX_PORT", "8006")), env["PROXMOX_TOKEN_USER"],
                      env["PROXMOX_TOKEN_NAME"], env["PROXMOX_TOKEN_VALUE"], verify, env["PROXMOX_NODE"],
                      env["PROXMOX_STORAGE"], int(env["PROXMOX_TEST_VMID"]),
                      int(env["PROXMOX_TEST_CTID"]) if env.get("PROXMOX_TEST_CTID") else None, limited, None)
        yield real
        for cleanup in reversed(real.cleanups):
            cleanup()
        return
    with ProxmoxSimulator(task_seconds=0.1) as sim:
        sim.add_storage(NODE1, "local", tmp_path / "node1-local")
        sim.add_storage(NODE2, "local", tmp_path / "node2-local")
        sim.add_guest(NODE1, 100, name="web", pool="prod", agent_ip=["10.0.10.5/24"],
                      config={"name": "web", "memory": "2048", "cores": 2, "agent": "1", "ostype": "l26",
                              "scsi0": "local-lvm:vm-100-disk-0,size=8G", "scsihw": "virtio-scsi-single",
                              "net0": "virtio=BC:24:11:00:00:01,bridge=vmbr0,tag=10,firewall=1",
                              "description": "web front end"})
        sim.add_guest(NODE1, 101, kind="lxc", name="db", agent_ip=["10.0.10.6/24"])
        limited = sim.add_token("backup@pve", "limited", {"/vms/100": {"VM.Audit"},
                                                          "/storage/local": {"Datastore.AllocateSpace"}})
        root = sim.root_token
        simulated = Server(sim.host, sim.port, root.user, root.name, root.secret, str(sim.ca_path), NODE1, "local",
                           100, 101, ("limited", limited), sim)
        yield simulated
        for cleanup in reversed(simulated.cleanups):  # (it exercises destroy and content deletion)
            cleanup()
    assert not sim.internal_errors, "the simulator failed inside:\n" + "\n".join(sim.internal_errors)


def _limited_api(server: Server) -> ProxmoxAPI:
    if server.limited is None:
        pytest.skip("needs PROXMOX_LIMITED_TOKEN_NAME/VALUE: a token with VM.Audit and Datastore.AllocateSpace only")
    user = "backup@pve" if server.sim else server.user
    name, value = server.limited
    return ProxmoxAPI(server.host, port=server.port, user=user, token_name=name, token_value=value,
                      verify_ssl=server.verify, backend="https", timeout=30)


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _archive_path(sim_root: Path, volid: str) -> Path:
    return sim_root / "dump" / volid.split("/", 1)[1]


# -- TLS, authentication, privileges --

def test_tls_is_verified_against_the_ca_file_and_the_fingerprint_is_proxmox_style(server: Server) -> None:
    if server.verify is False:
        pytest.skip("PROXMOX_VERIFY=false: no CA file to pin")
    assert server.api().version.get()["release"].startswith("8")
    with pytest.raises(requests.exceptions.SSLError):  # the system's CAs do not know the node's certificate
        server.api(verify=True).version.get()
    pem = ssl.get_server_certificate((server.host, server.port))
    served = ":".join(f"{b:02X}" for b in hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).digest())
    assert served in {node.get("ssl_fingerprint") for node in server.api().nodes.get()}
    if server.sim:
        assert served == server.sim.fingerprint and re.fullmatch(r"([0-9A-F]{2}:){31}[0-9A-F]{2}", served)


def test_a_missing_or_wrong_token_is_401(server: Server) -> None:
    anonymous = requests.get(f"https://{server.host}:{server.port}/api2/json/version", verify=server.verify, timeout=30)
    assert (anonymous.status_code, anonymous.reason) == (401, "No ticket")
    with pytest.raises(ResourceException) as err:
        server.api(token=(server.token_name, "00000000-0000-0000-0000-000000000000")).version.get()
    assert err.value.status_code == 401 and "Authentication failed" in str(err.value)


def test_a_token_without_the_privilege_is_refused_naming_it(server: Server) -> None:
    px = _limited_api(server)
    vmid, storage = server.vmid, server.storage
    with pytest.raises(ResourceException) as err:  # checked by the API call itself
        px.nodes(server.node).qemu(vmid).snapshot.post(snapname="denied")
    assert err.value.status_code == 403 and err.value.errors is None
    assert f"Permission check failed (/vms/{vmid}, VM.Snapshot)" in str(err.value)
    with pytest.raises(ResourceException, match=rf"Permission check failed \(/vms/{vmid}, VM.PowerMgmt\)"):
        px.nodes(server.node).qemu(vmid).status.start.post()
    # vzdump checks Datastore.AllocateSpace before it starts, VM.Backup inside its task
    upid = px.nodes(server.node).vzdump.post(vmid=str(vmid), storage=storage)
    status = server.wait(server.api(), upid)
    assert status["exitstatus"] == f"Permission check failed (/vms/{vmid}, VM.Backup)"
    assert server.log(server.api(), upid)[-1] == f"TASK ERROR: Permission check failed (/vms/{vmid}, VM.Backup)"
    # the token sees its own task; VM.Audit lets it list snapshots
    assert px.nodes(server.node).tasks(upid).status.get()["exitstatus"] == status["exitstatus"]
    assert any(e["name"] == "current" for e in px.nodes(server.node).qemu(vmid).snapshot.get())


def test_acls_propagate_are_replaced_by_deeper_ones_and_come_with_pools(server: Server) -> None:
    sim = server.simulator("makes tokens with chosen privileges")

    def token(name: str, privileges: dict[str, set[str]]) -> ProxmoxAPI:
        secret = sim.add_token("ops@pve", name, privileges)
        return ProxmoxAPI(server.host, port=server.port, user="ops@pve", token_name=name, token_value=secret,
                          verify_ssl=server.verify)

    px = token("nostore", {"/vms": {"VM.Backup", "VM.Audit"}})
    with pytest.raises(ResourceException) as err:  # vzdump checks the storage before it starts
        px.nodes(NODE1).vzdump.post(vmid="100", storage="local")
    assert err.value.status_code == 403
    assert err.value.content == "Permission check failed (/storage/local, Datastore.AllocateSpace)"
    status, _ = server.backup(server.api(), 101)
    with pytest.raises(ResourceException, match=r"\(/nodes/proxmox-node1, Sys.Audit\)"):  # another token's task
        px.nodes(NODE1).tasks(status["upid"]).status.get()
    assert [g["vmid"] for g in px.cluster.resources.get(type="vm")] == [100, 101]  # /vms propagates
    deeper = token("deeper", {"/vms": {"VM.Audit"}, "/vms/101": {"VM.PowerMgmt"}})
    assert [g["vmid"] for g in deeper.cluster.resources.get(type="vm")] == [100]
    pooled = token("pool", {"/pool/prod": {"VM.Audit", "Pool.Audit"}})
    assert [(g["vmid"], g["pool"]) for g in pooled.cluster.resources.get(type="vm")] == [(100, "prod")]
    with pytest.raises(ValueError, match="invalid privilege"):
        sim.add_token("ops@pve", "typo", {"/": {"VM.Bakup"}})


# -- backups --

def test_vzdump_of_a_vm_and_a_container_makes_listed_archives(server: Server, tmp_path: Path) -> None:
    px = server.api()
    guests = [server.vmid] + ([server.ctid] if server.ctid else [])
    started = int(server.sim.now() if server.sim else time.time())
    status, made = server.backup(px, ",".join(map(str, guests)), mode="snapshot", compress="zstd",
                                 **{"notes-template": "{{guestname}} ({{vmid}}) on {{node}}"})
    assert status["exitstatus"] == "OK" and status["status"] == "stopped" and status["type"] == "vzdump"
    assert sorted(entry["vmid"] for entry in made) == sorted(guests)
    resources = {g["vmid"]: g for g in px.cluster.resources.get(type="vm")}
    for entry in made:
        kind = resources[entry["vmid"]]["type"]
        name = re.escape(f"{server.storage}:backup/vzdump-{kind}-{entry['vmid']}-")
        assert re.fullmatch(name + r"\d{4}_\d{2}_\d{2}-\d{2}_\d{2}_\d{2}\.(vma|tar)\.zst", entry["volid"])
        assert entry["format"] == ("vma.zst" if kind == "qemu" else "tar.zst") and entry["subtype"] == kind
        assert entry["content"] == "backup" and entry["size"] > 0 and "protected" not in entry
        assert started - 5 <= entry["ctime"] <= started + 120
        assert entry["notes"] == f"{resources[entry['vmid']]['name']} ({entry['vmid']}) on {server.node}"
    log = server.log(px, status["upid"])
    assert log[0].startswith(f"INFO: starting new backup job: vzdump {' '.join(map(str, guests))}")
    for vmid in guests:
        kind = resources[vmid]["type"]
        assert f"INFO: Starting Backup of VM {vmid} ({kind})" in log
        assert any(re.fullmatch(rf"INFO: Finished Backup of VM {vmid} \(\d\d:\d\d:\d\d\)", line) for line in log)
        assert any(line.startswith("INFO: creating vzdump archive '") for line in log)
    assert log[-2:] == ["INFO: Backup job finished successfully", "TASK OK"]
    if server.sim:  # real files, named and sized as listed, with the sidecars a directory storage keeps
        for entry in made:
            path = _archive_path(tmp_path / "node1-local", entry["volid"])
            assert path.stat().st_size == entry["size"] > 1 << 20  # the guest's 1 MiB of disk data, and more
            assert path.with_name(path.name + ".notes").read_text() == entry["notes"]
            assert path.with_name(re.sub(r"\.(vma|tar)\.zst$", ".log", path.name)).read_text().count(" INFO: ") > 3


def test_task_status_log_and_list_follow_proxmox(server: Server) -> None:
    px = server.api()
    status, made = server.backup(px, server.vmid)
    upid = status["upid"]
    decoded = Tasks.decode_upid(upid)
    assert re.fullmatch(r"UPID:[\w-]+:[0-9A-F]{8}:[0-9A-F]{8,9}:[0-9A-F]{8}:vzdump:\d+:[^:]+:", upid)
    assert decoded["node"] == server.node and decoded["type"] == "vzdump" and decoded["id"] == str(server.vmid)
    assert decoded["user"] == server.user and upid.split(":")[7] == f"{server.user}!{server.token_name}"
    for key in ("node", "pid", "pstart", "starttime", "type", "id", "user", "upid"):
        assert status[key] == decoded[key], key
    full = px.nodes(server.node).tasks(upid).log.get(limit=0)
    assert [line["n"] for line in full] == list(range(1, len(full) + 1))
    page = px.nodes(server.node).tasks(upid).log.get(start=2, limit=3)
    assert page == full[2:5]
    tasks = px.nodes(server.node).tasks.get(typefilter="vzdump", limit=10)
    mine = next(t for t in tasks if t["upid"] == upid)
    assert mine["status"] == "OK" and mine["endtime"] >= mine["starttime"]
    with pytest.raises(ResourceException) as err:
        px.nodes(server.node).tasks("UPID:not-a-upid").status.get()
    assert err.value.status_code == 400 and err.value.errors == {"upid": "unable to parse worker upid"}


def test_extractconfig_prints_the_guest_config(server: Server) -> None:
    px = server.api()
    _, [archive] = server.backup(px, server.vmid, compress="zstd")
    text = px.nodes(server.node).vzdump.extractconfig.get(volume=archive["volid"])
    lines = text.splitlines()
    config = px.nodes(server.node).qemu(server.vmid).config.get()
    for key, value in config.items():
        if key not in {"digest", "lock", "description", "parent"} and not key.startswith("unused"):
            assert f"{key}: {value}" in lines, key
    assert any(line.startswith("#qmdump#map:") for line in lines)
    if server.sim:
        assert text.startswith("#web front end\nagent: 1\ncores: 2\nmemory: 2048\nname: web\n")
        assert "#qmdump#map:scsi0:drive-scsi0:local-lvm:raw:" in lines


def test_a_corrupted_archive_fails_extractconfig_and_restore(server: Server, tmp_path: Path) -> None:
    server.simulator("damages the archive file on the storage")
    px = server.api()
    _, [vm] = server.backup(px, 100, compress="zstd")
    _, [ct] = server.backup(px, 101)  # an uncompressed tar
    vm_path, ct_path = _archive_path(tmp_path / "node1-local", vm["volid"]), _archive_path(tmp_path / "node1-local", ct["volid"])
    intact = vm_path.read_bytes()
    # a flip in the data: the header still reads (Proxmox reads only that for extractconfig), the restore fails
    _flip_byte(vm_path, len(intact) // 2)
    assert "name: web" in px.nodes(NODE1).vzdump.extractconfig.get(volume=vm["volid"])
    status = server.wait(px, px.nodes(NODE1).qemu.post(vmid=300, archive=vm["volid"], storage="local-lvm"))
    assert status["exitstatus"].startswith("command 'zstd -q -d -c ") and "vma extract" in status["exitstatus"]
    assert "error before or during data restore" in " ".join(server.log(px, status["upid"]))
    assert px.nodes(NODE1).qemu(300).config.get()["memory"] == "128"  # left as qmrestore leaves it
    # a flip at the start: extractconfig fails too
    vm_path.write_bytes(intact)
    _flip_byte(vm_path, 1)
    with pytest.raises(ResourceException) as err:
        px.nodes(NODE1).vzdump.extractconfig.get(volume=vm["volid"])
    assert err.value.status_code == 500 and err.value.content.startswith("Failed to extract config from VMA archive: ")
    status = server.wait(px, px.nodes(NODE1).qemu.post(vmid=301, archive=vm["volid"], storage="local-lvm"))
    assert status["exitstatus"] != "OK"
    # a damaged tar header: "archive contains no configuration file" or a tar error, and no container is left
    _flip_byte(ct_path, 150)
    with pytest.raises(ResourceException, match="500"):
        px.nodes(NODE1).vzdump.extractconfig.get(volume=ct["volid"])
    status = server.wait(px, px.nodes(NODE1).lxc.post(vmid=302, ostemplate=ct["volid"], restore=1, storage="local-lvm"))
    assert status["exitstatus"] != "OK"
    assert 302 not in {g["vmid"] for g in px.cluster.resources.get(type="vm")}


# -- restore --

def test_restore_to_the_next_free_id_with_unique_macs(server: Server) -> None:
    px = server.api()
    _, [archive] = server.backup(px, server.vmid, compress="zstd")
    vmid = int(px.cluster.nextid.get())
    assert vmid >= 100 and int(px.cluster.nextid.get(vmid=vmid)) == vmid
    with pytest.raises(ResourceException) as err:
        px.cluster.nextid.get(vmid=server.vmid)
    assert err.value.status_code == 400 and err.value.errors == {"vmid": f"VM {server.vmid} already exists"}
    source = px.nodes(server.node).qemu(server.vmid).config.get()
    upid = px.nodes(server.node).qemu.post(vmid=vmid, archive=archive["volid"], unique=1)
    server.destroy_later(vmid)
    status = server.wait(px, upid)
    assert status["exitstatus"] == "OK" and status["type"] == "qmrestore" and status["id"] == str(vmid)
    restored = px.nodes(server.node).qemu(vmid).config.get()
    nets = [key for key in source if re.fullmatch(r"net\d+", key)]
    assert nets
    for key in nets:
        old, new = (re.search(r"=([0-9A-F:]{17})", c[key], re.I).group(1) for c in (source, restored))  # type: ignore[union-attr]
        assert old.upper() != new.upper() and new.upper().startswith("BC:24:11:")
        assert restored[key].replace(new, old) == source[key]  # only the MAC changed
    assert restored["name"] == source.get("name") and restored["memory"] == source["memory"]
    assert px.nodes(server.node).qemu(vmid).status.current.get()["status"] == "stopped"
    assert int(px.cluster.nextid.get()) != vmid
    if server.sim:
        assert restored["scsi0"] == f"local-lvm:vm-{vmid}-disk-0,size=8G"
        assert f"new volume ID is 'local-lvm:vm-{vmid}-disk-0'" in server.log(px, upid)


def test_restore_onto_an_existing_id_needs_force(server: Server) -> None:
    px = server.api()
    _, [archive] = server.backup(px, server.vmid)
    with pytest.raises(ResourceException) as err:
        px.nodes(server.node).qemu.post(vmid=server.vmid, archive=archive["volid"])
    assert err.value.status_code == 500
    assert err.value.content == f"unable to restore VM {server.vmid} - VM {server.vmid} already exists on node '{server.node}'"
    with pytest.raises(ResourceException) as err:  # 'force' without 'archive' is a parameter error
        px.nodes(server.node).qemu.post(vmid=server.vmid, force=1)
    assert err.value.status_code == 400 and err.value.errors == {"archive": "missing property - 'force' requires this property"}


def test_restore_over_an_existing_vm_with_force(server: Server) -> None:
    sim = server.simulator("changes the VM's config, then restores over it")
    px = server.api()
    _, [archive] = server.backup(px, 100)
    sim.update_config(100, {"memory": "4096", "tags": "changed"})
    status = server.wait(px, px.nodes(NODE1).qemu.post(vmid=100, archive=archive["volid"], force=1))
    assert status["exitstatus"] == "unable to restore VM 100 - vm is running"
    assert "lock" not in px.nodes(NODE1).qemu(100).config.get()
    server.wait(px, px.nodes(NODE1).qemu(100).status.stop.post())
    status = server.wait(px, px.nodes(NODE1).qemu.post(vmid=100, archive=archive["volid"], force=1, start=1))
    assert status["exitstatus"] == "OK"
    config = px.nodes(NODE1).qemu(100).config.get()
    assert config["memory"] == "2048" and "tags" not in config and "lock" not in config
    assert px.nodes(NODE1).qemu(100).status.current.get()["status"] == "running"


def test_restore_on_another_node_needs_the_archive_there(server: Server, tmp_path: Path) -> None:
    server.simulator("copies the archive between the nodes' directory storages")
    px = server.api()
    _, [archive] = server.backup(px, 101, compress="zstd")
    with pytest.raises(ResourceException) as err:
        px.nodes(NODE2).lxc.post(vmid=400, ostemplate=archive["volid"], restore=1, storage="local-lvm")
    assert err.value.content == f"can't find file '{archive['volid']}'"
    name = archive["volid"].split("/", 1)[1]
    shutil.copy(tmp_path / "node1-local" / "dump" / name, tmp_path / "node2-local" / "dump" / name)
    assert archive["volid"] in server.backups(px, node=NODE2)
    status = server.wait(px, px.nodes(NODE2).lxc.post(vmid=400, ostemplate=archive["volid"], restore=1,
                                                      storage="local-lvm", unique=1, start=1))
    assert status["exitstatus"] == "OK" and status["type"] == "vzrestore"
    config = px.nodes(NODE2).lxc(400).config.get()
    assert config["hostname"] == "db" and config["rootfs"] == "local-lvm:vm-400-disk-0,size=8G"
    assert "hwaddr=BC:24:11:00:00:65" not in config["net0"]
    interfaces = {i["name"]: i for i in px.nodes(NODE2).lxc(400).interfaces.get()}
    assert interfaces["eth0"]["inet"] == "10.0.10.6/24"
    assert interfaces["eth0"]["hwaddr"].upper() in config["net0"]
    with pytest.raises(ResourceException) as err:  # restoring a container needs a storage for container directories
        px.nodes(NODE2).lxc.post(vmid=401, ostemplate=archive["volid"], restore=1, storage="local")
    assert err.value.errors == {"storage": "storage 'local' does not support container directories"}


# -- protection, faults, locks --

def test_a_protected_archive_refuses_deletion(server: Server, tmp_path: Path) -> None:
    px = server.api()
    _, [archive] = server.backup(px, server.vmid, protected=1, **{"notes-template": "keep me"})
    assert archive["protected"] == 1 and archive["notes"] == "keep me"
    content = px.nodes(server.node).storage(server.storage).content
    with pytest.raises(ResourceException) as err:  # with 'delay' the call waits for the task, and fails with it
        content(archive["volid"]).delete(delay=5)
    assert err.value.status_code == 500 and err.value.content.startswith("cannot remove protected volume")
    status = server.wait(px, content(archive["volid"]).delete())
    assert status["type"] == "imgdel"
    assert status["exitstatus"] == f"cannot remove protected volume 'backup/{archive['volid'].split('/', 1)[1]}' on '{server.storage}'"
    assert archive["volid"] in server.backups(px)
    content(archive["volid"]).put(protected=0, notes="")
    entry = server.backups(px)[archive["volid"]]
    assert "protected" not in entry and "notes" not in entry
    assert server.wait(px, content(archive["volid"]).delete())["exitstatus"] == "OK"
    assert archive["volid"] not in server.backups(px)
    if server.sim:  # the .log and .notes went with it
        assert list((tmp_path / "node1-local" / "dump").iterdir()) == []


def test_a_full_storage_fails_the_backup_in_its_task(server: Server) -> None:
    sim = server.simulator("shrinks the storage")
    px = server.api()
    sim.set_storage_free(NODE1, "local", 4096)
    assert px.nodes(NODE1).storage("local").status.get()["avail"] == 4096
    status, made = server.backup(px, 100, compress="zstd")
    assert status["exitstatus"] == "job errors" and made == []
    log = server.log(px, status["upid"])
    assert "INFO: zstd: write error: No space left on device" in log
    assert "ERROR: Backup of VM 100 failed - vma_queue_write: write error - Broken pipe" in log
    assert log[-2:] == ["INFO: Backup job finished with errors", "TASK ERROR: job errors"]


def test_one_failed_guest_makes_job_errors_and_warnings_are_counted(server: Server) -> None:
    sim = server.simulator("injects a backup failure and a warning")
    px = server.api()
    sim.fail_next_vzdump(101, "unable to open file '/dev/zero' - Input/output error")
    status, made = server.backup(px, "100,101")
    assert status["exitstatus"] == "job errors" and [m["vmid"] for m in made] == [100]
    assert "ERROR: Backup of VM 101 failed - unable to open file '/dev/zero' - Input/output error" in server.log(px, status["upid"])
    sim.advance_clock(60)
    sim.warn_next_vzdump(101)
    status, made = server.backup(px, "101")
    assert status["exitstatus"] == "WARNINGS: 1" and len(made) == 1
    assert "WARN: unable to add notes - injected warning" in server.log(px, status["upid"])
    sim.fail_next(2, status=503)
    for _ in range(2):
        with pytest.raises(ResourceException, match="503"):
            px.version.get()
    assert px.version.get()["release"] == "8.4"


def test_a_locked_guest_is_refused(server: Server) -> None:
    sim = server.simulator("locks the guest")
    px = server.api()
    sim.lock(100, "backup")
    assert px.nodes(NODE1).qemu(100).status.current.get()["lock"] == "backup"
    status, made = server.backup(px, 100)
    assert status["exitstatus"] == "job errors" and made == []
    assert "ERROR: Backup of VM 100 failed - VM is locked (backup)" in server.log(px, status["upid"])
    assert server.wait(px, px.nodes(NODE1).qemu(100).snapshot.post(snapname="s1"))["exitstatus"] == "VM is locked (backup)"
    server.wait(px, px.nodes(NODE1).qemu(100).status.stop.post())  # stop checks the lock too
    assert px.nodes(NODE1).qemu(100).status.current.get()["status"] == "running"
    sim.lock(101, "snapshot")
    assert server.wait(px, px.nodes(NODE1).lxc(101).status.stop.post())["exitstatus"] == "CT is locked (snapshot)"
    sim.lock(100, None)
    assert server.wait(px, px.nodes(NODE1).qemu(100).status.stop.post())["exitstatus"] == "OK"
    assert server.wait(px, px.nodes(NODE1).qemu(100).status.start.post())["exitstatus"] == "OK"
    with pytest.raises(ResourceException, match="CT 101 already running"):
        px.nodes(NODE1).lxc(101).status.start.post()


def test_an_offline_node_answers_595(server: Server) -> None:
    sim = server.simulator("takes a node offline")
    px = server.api()
    sim.set_node_offline(NODE2)
    assert {n["node"]: n["status"] for n in px.nodes.get()} == {NODE1: "online", NODE2: "offline"}
    with pytest.raises(ResourceException) as err:
        px.nodes(NODE2).storage.get()
    assert err.value.status_code == 595 and err.value.status_message.startswith("Errors during connection")
    assert err.value.content == "No route to host"
    with pytest.raises(ResourceException) as err:
        px.nodes("nosuchnode").qemu.get()
    assert err.value.status_code == 500 and "hostname lookup 'nosuchnode' failed" in err.value.content
    sim.set_node_offline(NODE2, False)
    assert px.nodes(NODE2).storage.get()


# -- the guest agent, snapshots, the cluster --

def test_the_agent_answers_only_once_it_runs(server: Server) -> None:
    sim = server.simulator("times the guest agent")
    px = server.api()
    vm = px.nodes(NODE1).qemu(100)
    server.wait(px, vm.status.stop.post())
    sim.agent_ready_after(100, 30)
    with pytest.raises(ResourceException) as err:
        vm.agent.ping.post()
    assert (err.value.status_code, err.value.content) == (500, "VM 100 is not running")
    server.wait(px, vm.status.start.post())
    with pytest.raises(ResourceException) as err:
        vm.agent.ping.post()
    assert (err.value.status_code, err.value.content) == (500, "QEMU guest agent is not running")
    sim.advance_clock(31)
    assert vm.agent.ping.post() == {"result": {}}
    interfaces = {i["name"]: i for i in vm.agent("network-get-interfaces").get()["result"]}
    assert interfaces["eth0"]["hardware-address"] == "bc:24:11:00:00:01"
    assert interfaces["eth0"]["ip-addresses"] == [{"ip-address": "10.0.10.5", "ip-address-type": "ipv4", "prefix": 24}]
    assert interfaces["lo"]["ip-addresses"][0]["ip-address"] == "127.0.0.1"
    sim.update_config(100, {"agent": None})
    with pytest.raises(ResourceException, match="No QEMU guest agent configured"):
        vm.agent.ping.post()
    # a restored VM keeps its source's addresses and reports its new MAC
    sim.update_config(100, {"agent": "1"})
    _, [archive] = server.backup(px, 100)
    server.wait(px, px.nodes(NODE1).qemu.post(vmid=500, archive=archive["volid"], unique=1, start=1))
    sim.advance_clock(60)
    mac = re.search(r"virtio=([0-9A-F:]{17})", px.nodes(NODE1).qemu(500).config.get()["net0"]).group(1)  # type: ignore[union-attr]
    eth0 = next(i for i in px.nodes(NODE1).qemu(500).agent("network-get-interfaces").get()["result"] if i["name"] == "eth0")
    assert eth0["hardware-address"] == mac.lower() and eth0["ip-addresses"][0]["ip-address"] == "10.0.10.5"


def test_snapshots_are_listed_rolled_back_and_deleted(server: Server) -> None:
    px = server.api()
    vm = px.nodes(server.node).qemu(server.vmid)
    name = f"simtest{int(time.time()) % 100000}"
    status = server.wait(px, vm.snapshot.post(snapname=name, description="before the change"))
    assert status["exitstatus"] == "OK" and status["type"] == "qmsnapshot"

    def remove() -> None:
        if name in {s["name"] for s in vm.snapshot.get()}:
            server.wait(px, vm.snapshot(name).delete())
    server.cleanups.append(remove)
    snapshots = {s["name"]: s for s in vm.snapshot.get()}
    assert snapshots[name]["description"] == "before the change" and snapshots[name]["snaptime"] > 0
    assert snapshots["current"]["parent"] == name and snapshots["current"]["description"] == "You are here!"
    with pytest.raises(ResourceException, match="reserved name"):
        vm.snapshot.post(snapname="current")
    assert server.wait(px, vm.snapshot.post(snapname=name))["exitstatus"] == f"snapshot name '{name}' already used"
    if server.sim:
        server.sim.update_config(server.vmid, {"memory": "8192", "cores": 8})
    status = server.wait(px, vm.snapshot(name).rollback.post())
    assert status["exitstatus"] == "OK" and status["type"] == "qmrollback"
    if server.sim:
        config = vm.config.get()
        assert (config["memory"], config["cores"], config["parent"]) == ("2048", 2, name)
        assert vm.config.get(snapshot=name)["memory"] == "2048"
    status = server.wait(px, vm.snapshot(name).delete())
    assert status["exitstatus"] == "OK" and status["type"] == "qmdelsnapshot"
    assert [s["name"] for s in vm.snapshot.get()].count(name) == 0
    assert server.wait(px, vm.snapshot("nosuch").delete())["exitstatus"] == "snapshot 'nosuch' does not exist"


def test_guests_without_a_backup_job_are_listed(server: Server) -> None:
    px = server.api()
    listed = px.cluster("backup-info")("not-backed-up").get()
    for entry in listed:
        assert isinstance(entry["vmid"], int) and entry["type"] in {"qemu", "lxc"}
    if server.sim:
        assert sorted((e["vmid"], e["name"], e["type"]) for e in listed) == [(100, "web", "qemu"), (101, "db", "lxc")]
        server.sim.add_backup_job([100])
        assert [e["vmid"] for e in px.cluster("backup-info")("not-backed-up").get()] == [101]
        server.sim.add_backup_job(None, exclude=[100])
        assert px.cluster("backup-info")("not-backed-up").get() == []
        with pytest.raises(ResourceException, match=r"Permission check failed \(/, Sys.Audit\)"):
            _limited_api(server).cluster("backup-info")("not-backed-up").get()


def test_nodes_storages_guests_and_bridges_are_described(server: Server, tmp_path: Path) -> None:
    px = server.api()
    vm = next(g for g in px.cluster.resources.get(type="vm") if g["vmid"] == server.vmid)
    assert vm["type"] == "qemu" and vm["node"] == server.node and vm["id"] == f"qemu/{server.vmid}" and vm["template"] == 0
    current = px.nodes(server.node).qemu(server.vmid).status.current.get()
    assert current["vmid"] == server.vmid and current["status"] in {"running", "stopped"} and "qmpstatus" in current
    assert server.vmid in {g["vmid"] for g in px.nodes(server.node).qemu.get()}
    status = px.nodes(server.node).storage(server.storage).status.get()
    assert {"total", "used", "avail", "active", "enabled", "content", "type"} <= set(status)
    assert "backup" in status["content"].split(",") and status["total"] >= status["used"]
    assert server.storage in {s["storage"] for s in px.nodes(server.node).storage.get(content="backup")}
    bridges = {i["iface"]: i for i in px.nodes(server.node).network.get(type="bridge")}
    assert "vmbr0" in bridges and bridges["vmbr0"]["type"] == "bridge" and bridges["vmbr0"]["active"] == 1
    if server.sim:
        assert vm["pool"] == "prod" and vm["name"] == "web"
        assert sorted(bridges) == ["vmbr0", "vmbr1"]
        assert [i["iface"] for i in px.nodes(NODE2).network.get(type="bridge")] == ["vmbr0"]
        server.sim.set_bridges(NODE2, ["vmbr0", "vmbr9"])
        assert [i["iface"] for i in px.nodes(NODE2).network.get(type="bridge")] == ["vmbr0", "vmbr9"]
        _, [archive] = server.backup(px, 100)
        used = px.nodes(NODE1).storage("local").status.get()["used"]
        assert used >= archive["size"] and used == sum(
            p.stat().st_size for p in (tmp_path / "node1-local" / "dump").iterdir())


def test_prune_keeps_the_newest_over_weeks_of_nightly_backups(server: Server) -> None:
    sim = server.simulator("advances the clock between nightly backups")
    px = server.api()
    nightly = []
    for night in range(6):
        status, [made] = server.backup(px, 100, compress="zstd", **{"prune-backups": "keep-last=3"})
        assert status["exitstatus"] == "OK"
        nightly.append(made["volid"])
        if night == 0:  # the first one is protected: kept, and not counted
            px.nodes(NODE1).storage("local").content(made["volid"]).put(protected=1)
        sim.advance_clock(7 * 86400)
    kept = sorted(server.backups(px, vmid=100).values(), key=lambda e: e["ctime"])
    assert [e["volid"] for e in kept] == [nightly[0], *nightly[-3:]] and kept[0]["protected"] == 1
    assert kept[-1]["ctime"] - kept[1]["ctime"] >= 14 * 86400
    assert "INFO: pruned 1 backup(s) not covered by keep-retention policy" in server.log(px, status["upid"])
    preview = px.nodes(NODE1).storage("local").prunebackups.get(**{"prune-backups": "keep-last=1", "vmid": 100})
    assert sorted(e["mark"] for e in preview) == ["keep", "protected", "remove", "remove"]


# -- errors --

def test_an_unknown_path_is_501_and_a_bad_parameter_400_with_the_errors_map(server: Server) -> None:
    px = server.api()
    with pytest.raises(ResourceException) as err:
        px.nodes(server.node).foo.get()
    assert err.value.status_code == 501 and err.value.content == f"Method 'GET /nodes/{server.node}/foo' not implemented"
    with pytest.raises(ResourceException) as err:
        px.nodes(server.node).qemu("abc").config.get()
    assert err.value.status_code == 400 and err.value.content == "Parameter verification failed."
    assert err.value.errors == {"vmid": "type check ('integer') failed - got 'abc'"}
    with pytest.raises(ResourceException) as err:
        px.nodes(server.node).vzdump.post(vmid=str(server.vmid), storage=server.storage, mode="fast", protected="True",
                                          bogus=1)
    assert err.value.errors == {
        "mode": "value 'fast' does not have a value in the enumeration 'snapshot, suspend, stop'",
        "protected": "type check ('boolean') failed - got 'True'",
        "bogus": "property is not defined in schema and the schema does not allow additional properties",
    }
    with pytest.raises(ResourceException) as err:
        px.nodes(server.node).qemu.post(vmid=5, archive="x:backup/y")
    assert err.value.errors == {"vmid": "invalid format - value does not look like a valid VM ID\n"}
