"""VM backups through the flow, with the real proxmoxer client against the Proxmox VE API simulator.

The simulator (tests/simulators/proxmox.py) runs vzdump as a task that writes a real archive file
carrying the guest config; the flow's manifests go to the moto S3 server and its log rows to the
test PostgreSQL, as in production.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from luxima_backup import manifest, runtime
from luxima_backup.errors import ProxmoxError, VerificationError
from tests.helpers import error_of, log_rows, s3_get, s3_keys
from tests.simulators.proxmox import ProxmoxSimulator
from tests.vm_env import BACKUP_PRIVS, NODE, NODE2, WEEK, archives

pytestmark = pytest.mark.slow

def vm_manifests(env_s3: Any, bucket: str) -> list[dict[str, Any]]:
    keys = [k for k in s3_keys(env_s3, bucket) if k.startswith("backups/vm/") and k.endswith(".manifest.json")]
    return [json.loads(s3_get(env_s3, bucket, k)) for k in sorted(keys)]


def run(**params: Any) -> Any:
    from flows.vm_backup import vm_backup

    return vm_backup(**params, return_state=True)


def test_qemu_and_lxc_backups_are_verified_recorded_and_kept_two_cycles(
    pve: ProxmoxSimulator, vm_settings: Any, s3_server: Any, bucket: str, pg_cluster: Any, database: str,
) -> None:
    vm_settings()
    volids: list[str] = []
    for week in range(3):
        state = run()
        assert state.is_completed(), state
        result = state.result()
        assert set(result["guests"]) == {"web", "cache"}
        volids.append(result["guests"]["web"]["volid"])
        pve.advance_clock(WEEK)

    # Two cycles per guest: the first week's archives are gone from the storage, and their manifests too.
    web, cache = archives(pve, 100), archives(pve, 101)
    assert [a["volid"] for a in web] == volids[1:]
    assert len(cache) == 2 and all(a["volid"].startswith("backup:backup/vzdump-lxc-101-") for a in cache)
    docs = vm_manifests(s3_server, bucket)
    assert sorted(d["archive"]["volid"] for d in docs) == sorted(a["volid"] for a in web + cache)
    doc = next(d for d in docs if d["archive"]["volid"] == volids[-1])
    typed = manifest.parse(json.dumps(doc).encode())
    assert isinstance(typed, manifest.VmManifest) and typed.verified
    assert (typed.source.vmid, typed.source.type, typed.source.node, typed.archive.storage) == (100, "qemu", NODE, "backup")
    assert typed.archive.size == web[-1]["size"] and typed.archive.ctime == web[-1]["ctime"]
    assert typed.task["exitstatus"] == "OK" and typed.task["upid"].startswith(f"UPID:{NODE}:")
    # the config came out of the archive itself; its network devices parsed; the password hash never stored
    assert typed.config["scsi0"] == "local-lvm:vm-100-disk-0,size=8G" and "cipassword" not in typed.config
    assert typed.networks["net0"] == {"model": "virtio", "macaddr": "BC:24:11:00:01:00", "bridge": "vmbr0", "tag": "10",
                                      "firewall": "1"}
    assert "$5$" not in json.dumps(docs)

    # the catalogue lists them, newest verified first for restores
    store_backups = runtime.catalog("vm").list_backups("vm", "web")
    assert [b.manifest.archive.volid for b in store_backups] == volids[1:]  # type: ignore[union-attr]

    rows = [r for r in log_rows(pg_cluster, database) if r["component"] == "vm"]
    assert len(rows) == 6 and {r["status"] for r in rows} == {"success"}
    removed = [p for r in rows for p in r["details"].get("pruned", []) if p["action"] == "removed"]
    assert sorted(p["volid"] for p in removed if "qemu" in p["volid"]) == [volids[0]]


def _store() -> Any:
    return runtime.store(runtime.settings())


def test_failed_backups_never_push_out_good_archives_and_one_guest_failing_does_not_stop_the_other(
    pve: ProxmoxSimulator, vm_settings: Any, s3_server: Any, bucket: str, pg_cluster: Any, database: str,
) -> None:
    vm_settings()
    good = []
    for _ in range(2):
        state = run()
        assert state.is_completed(), state
        good.append(state.result()["guests"]["web"]["volid"])
        pve.advance_clock(WEEK)
    for _ in range(3):  # three failed weeks of web; cache goes on being backed up
        pve.fail_next_vzdump(100, "vma_queue_write: write error - No space left on device")
        state = run()
        exc = error_of(state)
        assert "web" in str(exc) and "job errors" in str(exc) and "No space left" in str(exc)
        pve.advance_clock(WEEK)
    assert [a["volid"] for a in archives(pve, 100)] == good  # the two good ones, untouched
    assert len(archives(pve, 101)) == 2  # cache: five good runs, two kept
    web_docs = [d for d in vm_manifests(s3_server, bucket) if d["source"]["vmid"] == 100]
    assert sorted(d["archive"]["volid"] for d in web_docs) == sorted(good)
    statuses = [r["status"] for r in log_rows(pg_cluster, database) if r["component"] == "vm" and r["target"] == "web"]
    assert statuses == ["success", "success", "failed", "failed", "failed"]


def test_a_protected_archive_and_one_made_by_hand_are_left_alone(pve: ProxmoxSimulator, vm_settings: Any) -> None:
    from proxmoxer import ProxmoxAPI

    vm_settings(vm_backup='guests = [100]')
    api = ProxmoxAPI(pve.host, port=pve.port, user="root@pam", token_name="sim", token_value=pve.root_token.secret,
                     verify_ssl=str(pve.ca_path), backend="https")
    first = run().result()["guests"]["web"]["volid"]
    api.nodes(NODE).storage("backup").content(first).put(protected=1)
    pve.advance_clock(WEEK)
    by_hand = api.nodes(NODE).vzdump.post(vmid=100, storage="backup", mode="snapshot", compress="zstd")
    _wait(api, by_hand)
    pve.advance_clock(WEEK)
    for _ in range(3):
        assert run().is_completed()
        pve.advance_clock(WEEK)
    left = [a for a in archives(pve, 100)]
    assert first in [a["volid"] for a in left]  # protected: kept though older than the newest two
    assert len(left) == 1 + 1 + 2  # protected, the one made by hand, the newest two good


def _wait(api: Any, upid: str) -> None:
    from proxmoxer.tools import Tasks

    status = Tasks.blocking_status(api, upid, timeout=30, polling_interval=0.1)
    assert status["exitstatus"] == "OK", status


def test_a_token_without_vm_backup_is_refused_naming_the_privilege(
    pve: ProxmoxSimulator, vm_settings: Any, s3_server: Any, bucket: str,
) -> None:
    vm_settings(privileges={"/vms": BACKUP_PRIVS - {"VM.Backup"}, "/storage/backup": BACKUP_PRIVS})
    exc = error_of(run(guests=["web"]))
    assert "VM.Backup" in str(exc) and "/vms/100" in str(exc)
    assert archives(pve, 100) == [] and vm_manifests(s3_server, bucket) == []


def test_a_task_past_its_limit_fails_with_the_tail_of_its_log(pve: ProxmoxSimulator, vm_settings: Any) -> None:
    vm_settings(vm_backup="task_timeout_seconds = 1")
    pve.slow_tasks(6)
    exc = error_of(run(guests=["web"]))
    assert "still running after 1s" in str(exc) and "creating vzdump archive" in str(exc)


def test_a_locked_guest_is_refused_before_vzdump(pve: ProxmoxSimulator, vm_settings: Any) -> None:
    vm_settings()
    pve.lock(100, "backup")
    state = run()
    exc = error_of(state)
    assert "web" in str(exc) and "locked (backup)" in str(exc) and "cache" not in str(exc)
    assert archives(pve, 100) == [] and len(archives(pve, 101)) == 1


def test_the_verify_reads_the_config_back_from_the_archive(pve: ProxmoxSimulator, vm_settings: Any, tmp_path: Path) -> None:
    """A damaged archive, or one whose config is not the live guest's, fails the verify (the check itself)."""
    from prefect import flow

    from tasks.verify.vm_archive import verify_vm_archive
    from tasks.vzdump import Guest

    vm_settings(vm_backup="guests = [100]")
    result = run().result()["guests"]["web"]
    doc = next(b for b in runtime.catalog("vm").list_backups("vm", "web"))
    archive = doc.manifest.archive.model_dump()  # type: ignore[union-attr]
    guest = Guest(100, "web", NODE, "qemu")

    @flow(name="verify-vm-probe")
    def verify() -> Any:
        return verify_vm_archive(guest, archive)

    assert verify()["read_back"] is True
    pve.update_config(100, {"net0": "virtio=BC:24:11:00:01:00,bridge=vmbr1,tag=10,firewall=1"})  # moved to another bridge
    exc = error_of(verify(return_state=True))
    assert isinstance(exc, VerificationError) and "net0" in str(exc) and "vmbr1" in str(exc)
    pve.update_config(100, {"net0": "virtio=BC:24:11:00:01:00,bridge=vmbr0,tag=10,firewall=1"})
    path = tmp_path / "pve-backup-1" / "dump" / result["volid"].split("/", 1)[1]
    blob = bytearray(path.read_bytes())
    blob[64] ^= 0xFF  # in the header: extractconfig reads only the start of an archive, as Proxmox does
    path.write_bytes(bytes(blob))
    exc = error_of(verify(return_state=True))
    assert isinstance(exc, VerificationError) and "cannot be read" in str(exc)


def test_tls_is_verified_or_pinned_never_skipped(pve: ProxmoxSimulator, monkeypatch: pytest.MonkeyPatch) -> None:
    from luxima_backup.proxmox import ProxmoxClient
    from luxima_backup.settings import ProxmoxEndpoint

    base = {"address": pve.url, "nodes": [NODE], "token_id": "root@pam!sim", "token_secret": "env:X"}
    pinned = ProxmoxClient("main", ProxmoxEndpoint.model_validate({**base, "fingerprint": pve.fingerprint, "verify_tls": False}),
                           pve.root_token.secret)
    assert pinned.get("version")["version"]
    wrong = pve.fingerprint[:-2] + ("00" if not pve.fingerprint.endswith("00") else "11")
    other = ProxmoxClient("main", ProxmoxEndpoint.model_validate({**base, "fingerprint": wrong, "verify_tls": False}), pve.root_token.secret)
    with pytest.raises(ProxmoxError) as err:
        other.get("version")
    assert not err.value.transient and "fingerprint" in str(err.value)
    unverified = ProxmoxClient("main", ProxmoxEndpoint.model_validate(base), pve.root_token.secret)  # system CAs: self-signed refused
    with pytest.raises(ProxmoxError, match="certificate"):
        unverified.get("version")
    with pytest.raises(ValueError, match="needs a fingerprint"):
        ProxmoxEndpoint.model_validate({**base, "verify_tls": False})


def test_an_unreachable_node_is_transient_and_a_refusal_is_not(pve: ProxmoxSimulator) -> None:
    """What the retry layers see: a node the proxy cannot reach may come back; a handler's refusal will not."""
    from luxima_backup.proxmox import ProxmoxClient
    from luxima_backup.settings import ProxmoxEndpoint

    px = ProxmoxClient("main", ProxmoxEndpoint.model_validate({
        "address": pve.url, "nodes": [NODE], "token_id": "root@pam!sim", "token_secret": "env:X", "ca_cert": str(pve.ca_path)}),
        pve.root_token.secret)
    pve.set_node_offline(NODE2)
    with pytest.raises(ProxmoxError) as err:
        px.get(f"nodes/{NODE2}/storage")
    assert err.value.transient and "595" in str(err.value)
    with pytest.raises(ProxmoxError) as err:
        px.get(f"nodes/{NODE}/qemu/999/config")  # no such guest: Proxmox dies with a 500
    assert not err.value.transient
    with socket.socket() as s:  # a port nothing listens on: the host is down
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = ProxmoxClient("main", ProxmoxEndpoint.model_validate({
        "address": f"https://127.0.0.1:{port}", "nodes": [NODE], "token_id": "root@pam!sim", "token_secret": "env:X",
        "ca_cert": str(pve.ca_path)}), pve.root_token.secret)
    with pytest.raises(ProxmoxError) as err:
        down.get("version")
    assert err.value.transient and "cannot reach" in str(err.value)


def test_warnings_and_uncovered_guests_are_reported_and_the_command_lists_the_backups(
    pve: ProxmoxSimulator, vm_settings: Any, prefect_server: Any,
) -> None:
    import httpx
    from typer.testing import CliRunner

    from app.cli import app

    pve.add_guest(NODE2, 150, "qemu", name="forgotten")  # no job and not selected: reported
    pve.add_backup_job([101])  # a Proxmox job covers the container
    config = vm_settings()
    pve.warn_next_vzdump(100, "unable to add notes - injected warning")
    state = run()
    assert state.is_completed(), state  # WARNINGS: n is a success
    result = state.result()
    assert result["guests"]["web"]["warnings"] == 1 and result["not_covered"] == [150]
    run_id = str(state.state_details.flow_run_id)
    found = httpx.post(f"{prefect_server.api_url}/artifacts/filter",
                       json={"artifacts": {"flow_run_id": {"any_": [run_id]}}, "limit": 20, "offset": 0}).json()
    summary = next(a["data"] for a in found if a["key"] == "vm-backup-summary")
    assert "**web** ended with 1 warning(s)" in summary and "injected warning" in summary
    assert "forgotten (150)" in summary

    listed = CliRunner().invoke(app, ["list", "--component", "vm", "--source", "web", "--json", "--config", str(config)])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)
    assert [r["object_key"] for r in rows] == [result["guests"]["web"]["volid"]] and rows[0]["type"] == "vzdump-qemu"
    shown = CliRunner().invoke(app, ["show", "latest", "--component", "vm", "--source", "web", "--config", str(config)])
    assert shown.exit_code == 0, shown.output
    doc = json.loads(shown.stdout)
    assert doc["archive"]["volid"] == rows[0]["object_key"] and doc["task"]["exitstatus"] == "WARNINGS: 1"


def test_a_blip_while_following_a_task_is_waited_out(pve: ProxmoxSimulator) -> None:
    """The task runs on in Proxmox: losing the node for a moment while polling it must not fail (or repeat) it."""
    from luxima_backup.proxmox import ProxmoxClient
    from luxima_backup.settings import ProxmoxEndpoint

    px = ProxmoxClient("main", ProxmoxEndpoint.model_validate({
        "address": pve.url, "nodes": [NODE], "token_id": "root@pam!sim", "token_secret": "env:X", "ca_cert": str(pve.ca_path)}),
        pve.root_token.secret)
    pve.slow_tasks(1.5)
    upid = px.post(f"nodes/{NODE}/vzdump", vmid=100, storage="backup", mode="snapshot", compress="zstd")
    pve.fail_next(3, 595)  # the next polls: the proxy cannot reach the node
    result = px.wait_task(NODE, upid, timeout=60)
    assert result.ok and any("Finished Backup of VM 100" in line for line in result.log_tail)
    assert len(archives(pve, 100)) == 1  # one task, one archive
