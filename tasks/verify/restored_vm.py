"""A restored guest checked: its network configuration before it starts, then that it is reachable.

Before start: every NIC as the backup recorded it (model, bridge, VLAN tag, firewall; the MAC unless
the restore made new ones; the link cut when isolated), and every bridge present on the target node:
a guest started on a missing bridge has no network, and one started with the original's MAC beside
the original fights it for its address. After start: the guest agent answers (it errors while the
guest boots: polled until a limit), the guest reports the expected addresses, and the configured TCP
ports and health URL answer from this machine (skipped, and shown skipped, for an isolated restore).
"""

from __future__ import annotations

import socket
import time
from typing import Any

import httpx
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from luxima_backup import runtime
from luxima_backup.errors import ProxmoxError, VerificationError
from luxima_backup.proxmox import interface_addresses, network_devices
from tasks.verify.readback import check_row

_COMPARED = ("model", "bridge", "tag", "firewall")


def network_rows(expected: dict[str, dict[str, str]], restored: dict[str, dict[str, str]], bridges: set[str],
                 unique: bool, isolated: bool) -> list[dict[str, Any]]:
    """One check row per NIC property, and one per bridge the NICs need on the target node."""
    rows = []
    for key in sorted(set(expected) | set(restored)):
        want, got = expected.get(key, {}), restored.get(key, {})
        if not want or not got:
            rows.append(check_row(f"{key} present", bool(want), bool(got)))
            continue
        for prop in _COMPARED:
            if prop in want or prop in got:
                rows.append(check_row(f"{key} {prop}", want.get(prop), got.get(prop)))
        mac_want, mac_got = want.get("macaddr", "").upper(), got.get("macaddr", "").upper()
        if unique:
            rows.append({"check": f"{key} MAC is new", "expected": f"not {mac_want}", "actual": mac_got,
                         "ok": bool(mac_got) and mac_got != mac_want})
        else:
            rows.append(check_row(f"{key} MAC", mac_want, mac_got))
        rows.append(check_row(f"{key} link cut (isolated)", "1" if isolated else "0", got.get("link_down", "0")))
        bridge = got.get("bridge")
        if bridge:
            rows.append({"check": f"bridge {bridge} on the target node", "expected": "present",
                         "actual": "present" if bridge in bridges else "missing", "ok": bridge in bridges})
    return rows


@task(name="verify-vm-network", cache_policy=NO_CACHE, persist_result=False, **runtime.TRANSIENT_RETRIES)
def verify_vm_network(node: str, kind: str, vmid: int, expected: dict[str, dict[str, str]], unique: bool,
                      isolated: bool) -> list[dict[str, Any]]:
    """The restored guest's NICs against the manifest and the target node's bridges (rows; the flow fails on a bad one,
    before the guest starts)."""
    settings = runtime.settings()
    px = runtime.proxmox(settings.vm_backup.proxmox, settings)
    config = {k: str(v) for k, v in px.get(f"nodes/{node}/{kind}/{vmid}/config").items()}
    bridges = {str(i["iface"]) for i in px.get(f"nodes/{node}/network") or []
               if str(i.get("type", "")).endswith("bridge") or str(i.get("type", "")) == "OVSBridge"}
    rows = network_rows(expected, network_devices(config), bridges, unique, isolated)
    get_run_logger().info("network configuration of %s: %d check(s), %d failed", vmid, len(rows),
                          sum(not r["ok"] for r in rows))
    return rows


def _agent_addresses(px: Any, node: str, kind: str, vmid: int, timeout: float) -> tuple[list[str], float]:
    """The guest's own addresses (IPv4 and IPv6, loopback left out), once its agent answers; and how long that took."""
    path = f"nodes/{node}/{kind}/{vmid}"
    started = time.monotonic()
    last = ""
    while True:
        try:
            if kind == "qemu":
                px.post(f"{path}/agent/ping")
                interfaces = (px.get(f"{path}/agent/network-get-interfaces") or {}).get("result", [])
            else:
                interfaces = px.get(f"{path}/interfaces") or []
            if interfaces:
                return interface_addresses(interfaces), time.monotonic() - started
        except ProxmoxError as exc:  # "QEMU guest agent is not running" while it boots
            last = str(exc)
        if time.monotonic() - started > timeout:
            raise VerificationError(f"the guest agent of {vmid} did not answer within {timeout:.0f}s ({last or 'no interfaces'})",
                                    hint="check that qemu-guest-agent runs in the guest; raise vm_restore.agent_timeout_seconds")
        time.sleep(2)


def _tcp(address: str, port: int, timeout: float) -> str | None:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__


@task(name="verify-vm-connectivity", cache_policy=NO_CACHE, persist_result=False)
def verify_vm_connectivity(node: str, kind: str, vmid: int, guest: str, isolated: bool,
                           expected_addresses: list[str]) -> list[dict[str, Any]]:
    """Agent, addresses, then TCP ports and the health URL from this machine; one row per check (the flow fails on a
    bad one, after the report is written)."""
    settings = runtime.settings()
    cfg = settings.vm_restore
    check = cfg.checks.get(guest) or cfg.checks.get(str(vmid))
    px = runtime.proxmox(settings.vm_backup.proxmox, settings)
    try:
        addresses, waited = _agent_addresses(px, node, kind, vmid, cfg.agent_timeout_seconds)
    except VerificationError as exc:
        return [{"check": "guest agent answers", "expected": f"within {cfg.agent_timeout_seconds:.0f}s", "actual": str(exc),
                 "ok": False}]
    rows = [{"check": "guest agent answers", "expected": "yes", "actual": f"yes, after {waited:.0f}s", "ok": True}]
    wanted = (check.addresses if check and check.addresses else expected_addresses)
    for addr in wanted:
        rows.append({"check": f"address {addr}", "expected": "reported", "actual": "reported" if addr in addresses else
                     f"not among {addresses}", "ok": addr in addresses})
    if not wanted:
        rows.append({"check": "addresses", "expected": "(none recorded)", "actual": ", ".join(addresses) or "none",
                     "ok": True})
    target = (wanted or addresses or [None])[0]
    ports = check.tcp_ports if check else []
    for port in ports:
        if isolated:
            rows.append({"check": f"TCP {port}", "expected": "open", "actual": "skipped: isolated restore", "ok": True})
            continue
        error = _tcp(target, port, cfg.connect_timeout_seconds) if target else "no address"
        rows.append({"check": f"TCP {target}:{port}", "expected": "open", "actual": error or "open", "ok": error is None})
    if check and check.http_url:
        url = check.http_url.replace("{address}", target or "")
        if isolated:
            rows.append({"check": f"GET {url}", "expected": "2xx", "actual": "skipped: isolated restore", "ok": True})
        else:
            try:
                status = httpx.get(url, timeout=cfg.connect_timeout_seconds).status_code
                rows.append({"check": f"GET {url}", "expected": "2xx", "actual": str(status), "ok": 200 <= status < 300})
            except httpx.HTTPError as exc:
                rows.append({"check": f"GET {url}", "expected": "2xx", "actual": type(exc).__name__, "ok": False})
    return rows
