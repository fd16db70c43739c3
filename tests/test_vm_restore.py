"""VM restores through the flow against the Proxmox VE API simulator: beside the original (isolated or connected),
on the DR node, over the original with its safety backup, and the checks that stop a bad one."""

from __future__ import annotations

import json
import shutil
import socket
import threading
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from luxima_backup.errors import ConfigError, VerificationError
from tests.helpers import error_of, log_rows
from tests.simulators.proxmox import ProxmoxSimulator
from tests.vm_env import NODE, NODE2, TEST_ADDRESS, archives

pytestmark = pytest.mark.slow


def backed_up(**params: Any) -> dict[str, Any]:
    from flows.vm_backup import vm_backup

    return vm_backup(**params)


def restore(**params: Any) -> Any:
    from flows.vm_restore import vm_restore

    return vm_restore(**params, return_state=True)


def api(pve: ProxmoxSimulator) -> Any:
    from proxmoxer import ProxmoxAPI

    return ProxmoxAPI(pve.host, port=pve.port, user="root@pam", token_name="sim", token_value=pve.root_token.secret,
                      verify_ssl=str(pve.ca_path), backend="https")


@pytest.fixture
def listener() -> Iterator[int]:
    """A TCP service on the address the guests report: what the connectivity check connects to."""
    server = socket.create_server((TEST_ADDRESS, 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                conn.close()
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


@pytest.fixture
def health() -> Iterator[int]:
    """An HTTP health endpoint on the guests' address."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Ok(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/health" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((TEST_ADDRESS, 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def copy_to_node2(tmp_path: Path, volid: str) -> None:
    """What the DR replication does: the archive (and its notes) onto the DR node's own backup storage."""
    name = volid.split("/", 1)[1]
    for f in (tmp_path / "pve-backup-1" / "dump").glob(name.split(".")[0] + "*"):
        shutil.copy2(f, tmp_path / "pve-backup-2" / "dump" / f.name)


def checks_of(prefect_api: str, state: Any) -> list[dict[str, Any]]:
    run_id = str(state.state_details.flow_run_id)
    found = httpx.post(f"{prefect_api}/artifacts/filter",
                       json={"artifacts": {"flow_run_id": {"any_": [run_id]}}, "limit": 20, "offset": 0}).json()
    table = next(a for a in found if a["type"] == "table")
    return json.loads(table["data"]) if isinstance(table["data"], str) else table["data"]


def test_a_test_restore_beside_the_original_is_isolated_checked_and_removed(
    pve: ProxmoxSimulator, vm_settings: Any, prefect_server: Any, pg_cluster: Any, database: str,
) -> None:
    vm_settings()
    backed_up()
    state = restore(guest="web", cleanup=True)
    assert state.is_completed(), state
    result = state.result()
    assert result["vmid"] == 102 and result["node"] == NODE and result["isolated"] and result["removed"]
    rows = {r["check"]: r for r in checks_of(prefect_server.api_url, state)}
    assert rows["net0 bridge"]["ok"] and rows["net0 tag"]["actual"] == "10" and rows["net0 firewall"]["ok"]
    assert rows["net0 MAC is new"]["ok"] and rows["net0 MAC is new"]["actual"] != "BC:24:11:00:01:00"
    assert rows["net0 link cut (isolated)"]["actual"] == "1"
    assert rows["bridge vmbr0 on the target node"]["ok"] and rows["guest agent answers"]["ok"]
    assert rows[f"address {TEST_ADDRESS}"]["ok"]  # recorded at backup time from the running original's agent
    # removed at the end; the original was never touched
    guests = {g["vmid"]: g for g in api(pve).cluster.resources.get(type="vm")}
    assert 102 not in guests and guests[100]["status"] == "running"
    logged = [r for r in log_rows(pg_cluster, database) if r["kind"] == "restore" and r["component"] == "vm"]
    assert logged[-1]["status"] == "success" and logged[-1]["details"]["rto_seconds"] > 0


def test_a_dr_restore_on_the_second_node_waits_for_the_agent_and_reaches_the_guest(
    pve: ProxmoxSimulator, vm_settings: Any, tmp_path: Path, listener: int, health: int, prefect_server: Any,
) -> None:
    vm_settings(vm_restore=f'[vm_restore.checks.web]\ntcp_ports = [{listener}]\nhttp_url = "http://{{address}}:{health}/health"')
    volid = backed_up()["guests"]["web"]["volid"]
    # not yet on node2: a clear refusal, nothing made
    exc = error_of(restore(guest="web", target_node=NODE2, isolated=False))
    assert isinstance(exc, ConfigError) and "dr-replicate" in str(exc)
    copy_to_node2(tmp_path, volid)
    pve.agent_ready_after(102, 6)  # the agent errors for a while after boot
    state = restore(guest="web", target_node=NODE2, isolated=False)
    assert state.is_completed(), state
    rows = {r["check"]: r for r in checks_of(prefect_server.api_url, state)}
    assert rows[f"TCP {TEST_ADDRESS}:{listener}"]["actual"] == "open"
    assert rows[f"GET http://{TEST_ADDRESS}:{health}/health"]["actual"] == "200"
    assert "after" in rows["guest agent answers"]["actual"]
    assert rows["net0 link cut (isolated)"]["actual"] == "0"
    assert rows["net0 MAC is new"]["ok"]  # beside the original, on the DR node: never its MAC
    status = api(pve).nodes(NODE2).qemu(102).status.current.get()
    assert status["status"] == "running"


def test_a_missing_bridge_on_the_target_fails_before_the_guest_starts(
    pve: ProxmoxSimulator, vm_settings: Any, tmp_path: Path,
) -> None:
    vm_settings()
    volid = backed_up()["guests"]["web"]["volid"]
    copy_to_node2(tmp_path, volid)
    pve.set_bridges(NODE2, ["vmbr1"])
    exc = error_of(restore(guest="web", target_node=NODE2))
    assert isinstance(exc, VerificationError) and "bridge vmbr0 on the target node" in str(exc) and "missing" in str(exc)
    assert api(pve).nodes(NODE2).qemu(102).status.current.get()["status"] == "stopped"  # never started


def test_a_closed_port_fails_the_restore_and_the_report_says_which(
    pve: ProxmoxSimulator, vm_settings: Any, prefect_server: Any,
) -> None:
    with socket.socket() as s:
        s.bind((TEST_ADDRESS, 0))
        closed = s.getsockname()[1]
    vm_settings(vm_restore=f"[vm_restore.checks.web]\ntcp_ports = [{closed}]")
    backed_up()
    state = restore(guest="web", isolated=False, cleanup=True)
    exc = error_of(state)
    assert isinstance(exc, VerificationError) and f"TCP {TEST_ADDRESS}:{closed}" in str(exc)
    rows = {r["check"]: r for r in checks_of(prefect_server.api_url, state)}
    assert rows[f"TCP {TEST_ADDRESS}:{closed}"]["ok"] is False


def test_replacing_the_original_needs_confirm_and_backs_it_up_first(
    pve: ProxmoxSimulator, vm_settings: Any, s3_server: Any, bucket: str,
) -> None:
    vm_settings(vm_backup="guests = [100]")
    first = backed_up()["guests"]["web"]
    exc = error_of(restore(guest="web", replace=True))
    assert isinstance(exc, ConfigError) and "confirm = 'web'" in str(exc)
    assert len(archives(pve, 100)) == 1  # nothing happened
    pve.update_config(100, {"memory": "4096"})  # changed since the backup
    state = restore(guest="web", backup=first["backup_id"], replace=True, confirm="web")
    assert state.is_completed(), state
    result = state.result()
    assert result["vmid"] == 100 and result["safety_backup"] != first["backup_id"]
    assert len(archives(pve, 100)) == 2  # the safety backup of the guest as it was, kept (no prune)
    config = api(pve).nodes(NODE).qemu(100).config.get()
    assert str(config["memory"]) == "2048" and "BC:24:11:00:01:00" in config["net0"]  # the backup's, same MAC


def test_an_lxc_container_restores_beside_the_original(pve: ProxmoxSimulator, vm_settings: Any, prefect_server: Any) -> None:
    vm_settings(vm_backup='guests = ["cache"]')
    backed_up()
    state = restore(guest="cache", cleanup=True)
    assert state.is_completed(), state
    rows = {r["check"]: r for r in checks_of(prefect_server.api_url, state)}
    assert rows["net0 MAC is new"]["ok"] and rows["net0 link cut (isolated)"]["actual"] == "1"


def test_rolling_back_to_a_snapshot_needs_confirm_and_is_checked(
    pve: ProxmoxSimulator, vm_settings: Any, prefect_server: Any,
) -> None:
    vm_settings(vm_backup="guests = [100]\nsnapshots = true")
    snap = backed_up()["guests"]["web"]["snapshot"]
    assert snap.startswith("luxima_")
    pve.update_config(100, {"memory": "8192"})  # a bad change after the snapshot
    assert isinstance(error_of(restore(guest="web", rollback_snapshot=snap)), ConfigError)
    state = restore(guest="web", rollback_snapshot=snap, confirm="web")
    assert state.is_completed(), state
    assert str(api(pve).nodes(NODE).qemu(100).config.get()["memory"]) == "2048"
    rows = {r["check"]: r for r in checks_of(prefect_server.api_url, state)}
    assert rows["net0 MAC"]["ok"] and rows["guest agent answers"]["ok"]
