"""The Proxmox VE API through proxmoxer, with an API token, TLS verified or the certificate pinned.

Everything the VM flows ask of Proxmox goes through ``ProxmoxClient``: its errors are the project's
(``ProxmoxError``, transient or not: a refused privilege names the privilege and never retries; an
unreachable node or a 5xx does), and long operations are tasks waited on by their UPID with a limit,
their log streamed as it grows.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit

from .errors import ProxmoxError
from .settings import ProxmoxEndpoint

# the task is still running / its exit status: only "OK" is success ("WARNINGS: n" is a success with warnings)
_WARNINGS = re.compile(r"^WARNINGS: (\d+)$")
_PRIVILEGE = re.compile(r"Permission check failed \(([^,]+), ([^)]+)\)")
# A task is polled soon after it starts (most are short), then less and less often (a vzdump takes hours).
TASK_POLL_FIRST, TASK_POLL_MAX = 0.25, 5.0
_TRANSIENT_500 = re.compile(r"timeout|timed out|no quorum|temporarily|try again|connection refused|unable to connect|"
                            r"cfs-lock|got lock request timeout", re.I)


@dataclass
class TaskResult:
    """How a Proxmox task ended: its exit status and the last lines of its log."""

    upid: str
    exitstatus: str
    log_tail: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.exitstatus == "OK" or self.warnings > 0

    @property
    def warnings(self) -> int:
        m = _WARNINGS.match(self.exitstatus)
        return int(m.group(1)) if m else 0


def parse_upid(upid: str) -> dict[str, str]:
    """``UPID:node:pid:pstart:starttime:type:id:user:`` as its fields (the node a task runs on is in its id)."""
    parts = upid.split(":")
    if len(parts) < 9 or parts[0] != "UPID":
        raise ProxmoxError(f"not a Proxmox task id: {upid!r}")
    return {"node": parts[1], "pid": parts[2], "pstart": parts[3], "starttime": parts[4], "type": parts[5],
            "id": parts[6], "user": parts[7]}


def parse_device(value: str) -> dict[str, str]:
    """A guest config's device line (``virtio=BC:24:11:00:00:01,bridge=vmbr0,tag=10``) as its options.

    A QEMU NIC's first option is ``MODEL=MAC``: it comes back as ``model`` and ``macaddr``.
    """
    out: dict[str, str] = {}
    for i, part in enumerate(value.split(",")):
        key, _, val = part.partition("=")
        if i == 0 and key in _QEMU_NIC_MODELS:
            out["model"], out["macaddr"] = key, val
        else:
            out[key] = val
    return out


_QEMU_NIC_MODELS = {"virtio", "e1000", "e1000e", "rtl8139", "vmxnet3", "i82551", "i82557b", "i82559er", "ne2k_isa",
                    "ne2k_pci", "pcnet", "e1000-82540em", "e1000-82544gc", "e1000-82545em"}


def network_devices(config: dict[str, Any]) -> dict[str, dict[str, str]]:
    """The ``net*`` devices of a guest config, each parsed; the MAC under ``macaddr`` for QEMU and LXC alike."""
    out: dict[str, dict[str, str]] = {}
    for key, value in config.items():
        if re.fullmatch(r"net\d+", key):
            dev = parse_device(str(value))
            if "hwaddr" in dev:  # LXC names the MAC hwaddr
                dev["macaddr"] = dev.pop("hwaddr")
            out[key] = dev
    return dict(sorted(out.items()))


def interface_addresses(interfaces: list[dict[str, Any]]) -> list[str]:
    """The addresses a guest reports (agent ``network-get-interfaces``, or a container's ``interfaces``): the loopback
    interface and link-local addresses say nothing about how the guest is reached."""
    return [a["ip-address"] for i in interfaces if i.get("name") != "lo" for a in i.get("ip-addresses", [])
            if not str(a.get("ip-address", "")).lower().startswith("fe80")]


def parse_config_text(text: str) -> dict[str, str]:
    """A guest config file as ``extractconfig`` prints it: ``key: value`` lines up to the first ``[section]``
    (snapshots and pending changes follow in sections; the current config comes first)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("["):
            break
        if not line.strip() or line.startswith("#"):
            continue
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


class ProxmoxClient:
    """One Proxmox VE API endpoint."""

    def __init__(self, name: str, cfg: ProxmoxEndpoint, token_secret: str):
        from proxmoxer import ProxmoxAPI

        self.name = name
        self.cfg = cfg
        parts = urlsplit(cfg.address)
        user, _, token_name = cfg.token_id.partition("!")
        if cfg.ca_cert is not None:
            verify: bool | str = str(cfg.ca_cert)
        else:  # pinned: the chain is not checked, the certificate itself is (below)
            verify = cfg.verify_tls and cfg.fingerprint is None
        self.api = ProxmoxAPI(parts.hostname, port=parts.port or 8006, user=user, token_name=token_name,
                              token_value=token_secret, verify_ssl=verify, timeout=cfg.timeout, backend="https")
        if cfg.fingerprint is not None:
            _pin(self.api, cfg.fingerprint)

    # -- requests --

    def get(self, path: str, **params: Any) -> Any:
        return self._call("GET", path, params)

    def post(self, path: str, **params: Any) -> Any:
        return self._call("POST", path, params)

    def put(self, path: str, **params: Any) -> Any:
        return self._call("PUT", path, params)

    def delete(self, path: str, **params: Any) -> Any:
        return self._call("DELETE", path, params)

    def _call(self, method: str, path: str, params: dict[str, Any]) -> Any:
        import requests
        from proxmoxer.core import ResourceException

        resource = self.api(path.strip("/"))
        action = f"{method} {path}"
        try:
            if method == "GET":
                return resource.get(**params)
            if method == "POST":
                return resource.post(**params)
            if method == "PUT":
                return resource.put(**params)
            return resource.delete(**params)
        except ResourceException as exc:
            raise _from_resource(exc, action, self.name) from None
        except requests.exceptions.SSLError as exc:
            raise ProxmoxError(f"the TLS certificate of {self.cfg.address} was not accepted ({action}): {_short(exc)}",
                               hint=f"check [proxmox.{self.name}] ca_cert or fingerprint against the node's certificate") from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            raise ProxmoxError(f"cannot reach Proxmox at {self.cfg.address} ({action}): {_short(exc)}", transient=True) from None

    # -- tasks --

    def wait_task(self, node: str, upid: str, timeout: float, on_log: Callable[[str], None] | None = None) -> TaskResult:
        """Wait for a task until it stops or ``timeout`` seconds pass, handing each new log line to ``on_log``.

        A task still running at the limit raises a ``ProxmoxError`` with its log's tail (the task itself goes on in
        Proxmox: stopping it is the operator's call, and a vzdump stopped midway leaves a partial archive).
        """
        started = time.monotonic()
        seen = 0
        tail: list[str] = []
        poll = TASK_POLL_FIRST

        def drain() -> None:
            nonlocal seen
            while True:
                lines = self.get(f"nodes/{node}/tasks/{upid}/log", start=seen, limit=500) or []
                for entry in lines:
                    text = str(entry.get("t", ""))
                    if text == "no content":
                        continue
                    tail.append(text)
                    del tail[:-40]
                    if on_log is not None:
                        on_log(text)
                seen += len(lines)
                if len(lines) < 500:
                    return

        unreachable: ProxmoxError | None = None
        while True:
            try:
                status = self.get(f"nodes/{node}/tasks/{upid}/status")
                drain()
                unreachable = None
            except ProxmoxError as exc:
                # The task runs on in Proxmox whatever happens to this connection: a blip while following it is
                # waited out (up to the task's limit), never a failed backup or a second task.
                if not exc.transient:
                    raise
                unreachable, status = exc, {}
            if status.get("status") == "stopped":
                drain()
                return TaskResult(upid, str(status.get("exitstatus", "unknown")), list(tail), time.monotonic() - started)
            if time.monotonic() - started > timeout:
                why = f"Proxmox unreachable: {unreachable}" if unreachable else "last log lines: " + " | ".join(tail[-5:])
                raise ProxmoxError(f"task {upid} still running after {timeout:.0f}s; {why}",
                                   hint="raise the task_timeout_seconds setting, or look at the task in the Proxmox UI")
            time.sleep(min(poll, max(0.0, timeout - (time.monotonic() - started)) + 0.05))
            poll = min(poll * 1.5, TASK_POLL_MAX)


def _from_resource(exc: Any, action: str, name: str) -> ProxmoxError:
    status = int(getattr(exc, "status_code", 0) or 0)
    message = str(getattr(exc, "status_message", "") or "").strip()
    content = str(getattr(exc, "content", "") or "").strip()
    errors = getattr(exc, "errors", None)
    detail = "; ".join(f"{k}: {v}" for k, v in errors.items()) if isinstance(errors, dict) and errors else (content or message)
    if status == 401:
        return ProxmoxError(f"Proxmox refused the API token ({action})",
                            hint=f"check [proxmox.{name}] token_id and token_secret, and that the token has not expired")
    if status == 403:
        m = _PRIVILEGE.search(f"{content} {message}")
        what = f"the privilege {m.group(2)} on {m.group(1)}" if m else "a privilege"
        return ProxmoxError(f"the Proxmox token lacks {what} ({action}): {detail}",
                            hint="grant it to the token's role; docs/proxmox.md lists what each flow needs")
    # A handler that dies answers 500 with its message, whatever the cause: mostly permanent (a missing guest, a
    # damaged archive). Transient are the proxy's own answers (a node it cannot reach: 595/596, busy: 502-504)
    # and a 500 whose message says so.
    transient = status == 0 or status in (502, 503, 504, 595, 596, 599) or (
        status == 500 and bool(_TRANSIENT_500.search(f"{message} {content}")))
    return ProxmoxError(f"Proxmox answered {status} {message} to {action}: {detail}", transient=transient)


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) < 300 else text[:300] + "..."


def _pin(api: Any, fingerprint: str) -> None:
    """Accept only the certificate with this SHA-256 fingerprint (urllib3 checks it on every connection).

    proxmoxer keeps its requests session in the API object's store; the adapter mounted there is
    what every request of this client goes through.
    """
    from requests.adapters import HTTPAdapter

    digest = fingerprint.replace(":", "").lower()

    class Pinned(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            kwargs["assert_fingerprint"] = digest
            super().init_poolmanager(*args, **kwargs)

    api._store["session"].mount("https://", Pinned())
