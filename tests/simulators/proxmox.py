"""A Proxmox VE 8 HTTP API simulator for tests, answering as pveproxy does: paths, parameters, privileges, shapes, errors.

It implements what the project's backup and disaster-recovery flows use, following the PVE 8
API viewer and the code it is generated from (pve-manager, qemu-server, pve-container,
pve-storage, pve-access-control, pve-common and pve-http-server, their PVE 8 branches):

  /version, /nodes, /cluster/resources, /cluster/nextid, /cluster/backup-info/not-backed-up
  /nodes/{node}/network, /nodes/{node}/storage, .../storage/{storage}/status|prunebackups,
      .../storage/{storage}/content[/{volume}] (list backups; GET, PUT notes/protected, DELETE)
  /nodes/{node}/vzdump, /nodes/{node}/vzdump/extractconfig
  /nodes/{node}/tasks, .../tasks/{upid}/status|log
  /nodes/{node}/qemu|lxc: list, POST = restore from a vzdump archive; .../{vmid} DELETE,
      .../{vmid}/config, status/current|start|stop|shutdown, snapshot[/{snapname}[/rollback]]
  /nodes/{node}/qemu/{vmid}/agent/ping|network-get-interfaces, /nodes/{node}/lxc/{vmid}/interfaces

What it holds to, as Proxmox VE does:
- HTTPS only, with a self-signed certificate made at start (``ca_path`` to trust it,
  ``fingerprint`` as /nodes and the GUI show it). Answers are ``{"data": ...}`` (plus ``total``
  where Proxmox sets it). An error's text is the HTTP reason phrase (its first line) and, as
  since pve-http-server 5.2 (PVE 8.3), ``"message"`` in the body; a parameter error is 400
  "Parameter verification failed." with the ``errors`` map of pve-common's JSONSchema ("type
  check ('integer') failed - got 'x'", "property is missing and it is not optional", "invalid
  format - ...", booleans only as 0/1). A missing or wrong token is 401 "No ticket" /
  "Authentication failed!" with no body; a path no handler serves is 501 "Method 'GET /x' not
  implemented"; a ``die`` in a handler is a 500 with its text; a request for an offline node
  is 595 "No route to host" with no body (pveproxy's failed proxy connection), after the
  permission check as in pveproxy; an unknown node fails its host name lookup (500).
- API tokens (``Authorization: PVEAPIToken=USER@REALM!TOKENID=SECRET``) and ACLs: a privilege
  on a path holds below it, the most specific ACL path replaces what is inherited (as
  PVE::AccessControl::roles), and a guest in a pool also has the pool's privileges. Each
  endpoint checks what its code checks, where it checks it: vzdump needs
  Datastore.AllocateSpace on the storage before it starts, but VM.Backup is checked in its
  task ("Permission check failed (/vms/100, VM.Backup)" as the task's exit status); backups
  are listed only to who may access them (Datastore.Allocate, or AllocateSpace plus VM.Backup
  on the guest), and deleting one needs AllocateSpace plus VM.Backup; a restore needs
  VM.Allocate (or, with ``force`` over the same guest, VM.Backup), AllocateSpace on the target
  storage and access to the archive (as above, unless restoring into the archive's own VMID);
  network bridges are listed to who has SDN.Audit or SDN.Use on them. Tokens are never
  ``root@pam``, so root-only options are refused even to ``root_token``.
- Long operations are tasks with real UPIDs, running in a thread for ``task_seconds``, with
  Proxmox's log lines, final "TASK OK" / "TASK WARNINGS: n" / "TASK ERROR: ...", and exit
  status; a token sees its own tasks, others need Sys.Audit on /nodes/{node}. What Proxmox
  checks inside a task fails the task, not the call: locks ("VM is locked (backup)"), a full or
  unusable storage, a protected archive's deletion, a guest of a vzdump job ("job errors").
- vzdump writes real files in ``<path>/dump``, named from the clock: the archive (a tar for
  containers, ``./etc/vzdump/pct.conf`` first; for VMs a "VMA-like" container of our own, not
  Proxmox's VMA layout: magic, a header with its MD5 holding the config, then one extent of
  disk data with its MD5), compressed with zstd, gzip or lzop (stored blocks, not compressed),
  and the ``.log``, ``.notes`` and ``.protected`` files a directory storage keeps. The config
  in it is as qemu-server and pve-container write it (``key: value`` sorted, the description
  as ``#`` lines, VM disks mapped by ``#qmdump#map`` lines), so ``extractconfig`` prints it;
  the guest's ``disk_bytes`` of deterministic pseudo-random data make sizes real and damage
  visible: in the header to extractconfig and restore, in the data to restore only (Proxmox
  reads only the header for extractconfig; an uncompressed tar has no data checksum, so there
  it goes unseen, as it would). Prune (keep-last/hourly/daily/weekly/monthly/yearly) exempts
  protected backups; a user without Datastore.Allocate may protect 5 per guest.
- Restore (``POST qemu`` with ``archive``, ``POST lxc`` with ``ostemplate`` and ``restore=1``)
  rebuilds the guest from the config in the archive: volumes allocated on ``storage``,
  ``unique`` draws new MACs (BC:24:11:xx:xx:xx), an existing VMID needs ``force``; a failed VM
  restore leaves the VM as qmrestore does, a failed container restore removes a new one. A
  directory storage is per node: an archive on node1's ``local`` is "can't find file" on
  node2 until it is copied there (or the storage was added with ``shared=True``).
- Snapshots with parents and the ``current`` pseudo-entry; the guest agent (500 "No QEMU
  guest agent configured" / "VM 100 is not running" / "QEMU guest agent is not running" until
  the guest has run ``agent_ready_after`` seconds), reporting the MACs of the config and the
  ``agent_ip`` addresses (which a restored guest takes from its archive).

Time is the simulator's clock, ``now()``: archive names and ctimes, task times, uptimes and the
agent's readiness follow it, and ``advance_clock`` moves it (weeks of nightly backups in one
test). Archive names are in UTC where a node would use its local time zone. An error inside the
simulator is a 500 and is recorded in ``internal_errors`` so that the tests can fail on it.

Not simulated: tickets and CSRF (tokens only), users' ACLs apart from their tokens (a token is
given its effective privileges; ``privsep`` only matters for ``root@pam``), roles and NoAccess,
pools other than those guests are in, creating guests other than by restore, config updates
through the API, migration, HA, replication, PBS, templates, cloud-init, vzdump's global lock,
mail, hook scripts, fleecing and bandwidth limits (accepted, logged), the 3-second delay of 401
answers, disk images (a guest's disks are sizes in its config, its data one ``disk_bytes``
stream), and storage content other than backups. Texts of archive-reading and out-of-space
errors are the simulator's own. The same tests run against a real Proxmox VE when PROXMOX_HOST
and a token are set (tests/test_proxmox_simulator.py), so it cannot certify itself.
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import io
import ipaddress
import json
import random
import os
import re
import secrets
import shlex
import ssl
import struct
import sys
import tarfile
import tempfile
import threading
import time
import traceback
import uuid
import zlib
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable
from urllib.parse import parse_qsl, unquote, urlsplit

import zstandard
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.quiet_server import QuietHTTPServer

BASE_PATH = "/api2/json"
VERSION = {"version": "8.4.1", "release": "8.4", "repoid": "2a5fa54a8503f96d"}
MAC_PREFIX = "BC:24:11"  # datacenter.cfg's default mac_prefix
MAX_PROTECTED = 5  # backups per guest a user without Datastore.Allocate may protect

# PVE::AccessControl's privilege list (PVE 8)
PRIVILEGES = frozenset("""
    VM.Config.Disk VM.Config.CPU VM.Config.Memory VM.Config.Network VM.Config.HWType VM.Config.Options
    VM.Allocate VM.Clone VM.Migrate VM.Monitor VM.Snapshot VM.Snapshot.Rollback VM.Config.CDROM
    VM.Config.Cloudinit VM.Console VM.Backup VM.PowerMgmt VM.Audit
    Sys.PowerMgmt Sys.Modify Sys.Incoming Sys.AccessNetwork Sys.Console Sys.Syslog Sys.Audit
    Datastore.Allocate Datastore.AllocateTemplate Datastore.AllocateSpace Datastore.Audit
    SDN.Allocate SDN.Audit SDN.Use Realm.Allocate User.Modify Group.Allocate Realm.AllocateUser
    Pool.Allocate Pool.Audit Mapping.Modify Mapping.Use Mapping.Audit Permissions.Modify
""".split())

_ARCHIVE = re.compile(r"vzdump-(qemu|lxc)-([1-9][0-9]{2,8})-(\d{4}_\d{2}_\d{2}-\d{2}_\d{2}_\d{2})\.((?:vma|tar)(?:\.(zst|gz|lzo))?)")
_DISK_KEY = re.compile(r"(ide|sata|scsi|virtio)\d+|efidisk0|tpmstate0")
_SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
# config keys Proxmox returns as numbers (integers and 0/1 booleans); the rest are strings
_NUMERIC_KEYS = {
    "qemu": {"cores", "sockets", "vcpus", "balloon", "cpuunits", "onboot", "template", "protection",
             "numa", "acpi", "kvm", "tablet", "reboot", "snaptime", "vmstate"},
    "lxc": {"memory", "swap", "cores", "cpuunits", "onboot", "template", "unprivileged", "protection",
            "tty", "snaptime"},
}
_PRUNE_KEYS = ("keep-all", "keep-last", "keep-hourly", "keep-daily", "keep-weekly", "keep-monthly", "keep-yearly")
_PERIODS: dict[str, Callable[[dt.datetime], object]] = {  # PVE::Storage::prune_mark_backup_group, in its order
    "keep-last": lambda t: t,
    "keep-hourly": lambda t: (t.year, t.month, t.day, t.hour),
    "keep-daily": lambda t: (t.year, t.month, t.day),
    "keep-weekly": lambda t: t.isocalendar()[:2],
    "keep-monthly": lambda t: (t.year, t.month),
    "keep-yearly": lambda t: t.year,
}
_VMA_MAGIC = b"VMA\0"
_VMA_HEAD = struct.Struct(">4sI16sQ16sI")  # magic, version, uuid, ctime, md5 of the header, header size
_EXTENT_HEAD = struct.Struct(">Q16s")  # data length, md5 of the data
_LZOP_MAGIC = b"\x89LZO\x00\r\n\x1a\n"


class ApiError(Exception):
    """An answer other than success, as pveproxy sends it: the first line of ``message`` is the reason phrase."""

    def __init__(self, status: int, message: str, errors: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.errors = status, message, errors


def _param_error(errors: dict[str, str]) -> ApiError:
    return ApiError(400, "Parameter verification failed.\n", errors)


def _perm_error(what: str = "") -> ApiError:
    return ApiError(403, f"Permission check failed ({what})\n" if what else "Permission check failed\n")


def _die(message: str) -> ApiError:
    """A Perl ``die`` in an API handler: HTTP 500 with the text (or, in a task, its TASK ERROR)."""
    return ApiError(500, message + "\n")


# -- parameters, checked as PVE::JSONSchema does --
@dataclass(frozen=True)
class Prop:
    type: str = "string"
    optional: bool = True
    check: Callable[[str], None] | None = None  # a registered format: raises ValueError with its text
    enum: tuple[str, ...] = ()
    minimum: int | None = None
    maximum: int | None = None
    max_length: int | None = None
    requires: str | None = None


def _format(pattern: str, message: str) -> Callable[[str], None]:
    def check(value: str) -> None:
        if not re.fullmatch(pattern, value):
            raise ValueError(message.format(value=value))
    return check


def split_list(text: str) -> list[str]:
    """PVE::Tools::split_list."""
    return [item for item in re.split(r"[\0\s,;]+", text.strip()) if item]


_vmid_format = _format(r"[1-9][0-9]{2,8}", "value does not look like a valid VM ID")


def _vmid_list_format(value: str) -> None:
    for item in split_list(value):
        _vmid_format(item)


NODE = Prop(optional=False, check=_format(r"[a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?", "value does not look like a valid node name"))
VMID = Prop("integer", optional=False, check=_vmid_format, minimum=100, maximum=999_999_999)
OPT_VMID = replace(VMID, optional=True)
STORAGE = Prop(optional=False, check=_format(r"[a-zA-Z][a-zA-Z0-9\-_.]*[a-zA-Z0-9]", "storage ID '{value}' contains illegal characters"))
OPT_STORAGE = replace(STORAGE, optional=True)
SNAPNAME = Prop(optional=False, check=_format(r"[a-zA-Z][a-zA-Z0-9_-]+", "invalid configuration ID '{value}'"), max_length=40)
BOOL = Prop("boolean")
TEXT = Prop()


def _int(minimum: int | None = None, maximum: int | None = None) -> Prop:
    return Prop("integer", minimum=minimum, maximum=maximum)


def _is_number(text: str) -> bool:
    return re.fullmatch(r"[+-]?(\d+\.\d+|\d+\.|\.\d+|\d+)([eE][+-]?\d+)?", text) is not None


def _check_value(prop: Prop, value: Any) -> Any:
    """One value through check_type and check_prop; the converted value, or ValueError with PVE's text."""
    if isinstance(value, (list, dict)):
        raise ValueError(f"type check ('{prop.type}') failed - got {'ARRAY' if isinstance(value, list) else 'HASH'}")
    if isinstance(value, bool):  # a JSON true/false
        if prop.type == "boolean":
            return value
        raise ValueError(f"type check ('{prop.type}') failed - got JSON::PP::Boolean")
    text = str(value)
    if prop.type == "boolean" and text not in {"0", "1"} or \
            prop.type == "integer" and not re.fullmatch(r"[+-]?\d+", text) or \
            prop.type == "number" and not _is_number(text):
        raise ValueError(f"type check ('{prop.type}') failed - got '{text}'")
    if prop.check is not None:
        try:
            prop.check(text)
        except ValueError as exc:
            raise ValueError(f"invalid format - {exc}\n") from None
    if prop.max_length is not None and len(text) > prop.max_length:
        raise ValueError(f"value may only be {prop.max_length} characters long")
    if _is_number(text):
        if prop.maximum is not None and float(text) > prop.maximum:
            raise ValueError(f"value must have a maximum value of {prop.maximum}")
        if prop.minimum is not None and float(text) < prop.minimum:
            raise ValueError(f"value must have a minimum value of {prop.minimum}")
    if prop.enum and text not in prop.enum:
        raise ValueError(f"value '{text}' does not have a value in the enumeration '{', '.join(prop.enum)}'")
    return {"boolean": lambda: text == "1", "integer": lambda: int(text), "number": lambda: float(text)}.get(prop.type, lambda: text)()


def validate(params: dict[str, Any], schema: dict[str, Prop]) -> dict[str, Any]:
    """The parameters as the handler sees them, or 400 with every error, keyed by parameter."""
    errors: dict[str, str] = {}
    out: dict[str, Any] = {}
    for name, prop in schema.items():
        if params.get(name) is None:
            if not prop.optional:
                errors[name] = "property is missing and it is not optional"
            continue
        try:
            out[name] = _check_value(prop, params[name])
        except ValueError as exc:
            errors[name] = str(exc)
    for name in params:
        prop = schema.get(name)
        if prop is None:
            errors[name] = "property is not defined in schema and the schema does not allow additional properties"
        elif prop.requires and params.get(prop.requires) is None:
            errors[prop.requires] = f"missing property - '{name}' requires this property"
    if errors:
        raise _param_error(errors)
    return out


def _parse_prune(text: str) -> dict[str, int]:
    """A ``prune-backups`` property string (keep-last=3,keep-daily=7)."""
    keep: dict[str, int] = {}
    for item in split_list(text):
        key, _, value = item.partition("=")
        if key not in _PRUNE_KEYS or not value.isdigit():
            raise ValueError("format error\n")
        keep[key] = int(value)
    return keep


# -- guest configs, as qemu-server and pve-container write them --
def config_text(config: dict[str, str], snapshots: dict[str, dict[str, str]] | None = None) -> str:
    """The ``.conf`` file: the description as ``#`` lines, then ``key: value`` sorted, then a section per snapshot."""
    def section(conf: dict[str, str]) -> str:
        lines = [f"#{line}" for line in conf.get("description", "").split("\n") if conf.get("description")]
        lines += [f"{key}: {conf[key]}" for key in sorted(conf) if key != "description"]
        return "".join(line + "\n" for line in lines)
    snapshots = snapshots or {}
    return section(config) + "".join(f"\n[{name}]\n" + section(snapshots[name]) for name in sorted(snapshots))


def parse_config(text: str) -> dict[str, str]:
    """The main section of a ``.conf`` (or of the config inside a backup): ``#`` lines are the description."""
    config: dict[str, str] = {}
    description: list[str] = []
    for line in text.splitlines():
        if line.startswith("["):
            break
        if line.startswith("#"):
            if not line.startswith(("#qmdump#", "#vzdump#")):
                description.append(line[1:])
        elif ":" in line:
            key, _, value = line.partition(":")
            config[key.strip()] = value.strip()
    if description:
        config["description"] = "\n".join(description)
    return config


def _typed(kind: str, config: dict[str, str]) -> dict[str, Any]:
    return {key: int(value) if key in _NUMERIC_KEYS[kind] and re.fullmatch(r"-?\d+", value) else value
            for key, value in config.items()}


def _size_bytes(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)", text)
    return int(float(m.group(1)) * _SIZE_UNITS.get(m.group(2), 1)) if m else 0


def _disks(kind: str, config: dict[str, str]) -> dict[str, str]:
    """The guest's volumes by config key (VM disks other than CD-ROMs; container rootfs and mount points)."""
    if kind == "lxc":
        return {k: v for k, v in config.items() if k == "rootfs" or re.fullmatch(r"mp\d+", k)}
    return {k: v for k, v in config.items() if _DISK_KEY.fullmatch(k) and "media=cdrom" not in v and v != "none"}


def _option(value: str, name: str) -> str | None:
    """One ``name=value`` option of a property string (``size`` of a disk, ``bridge`` of a NIC)."""
    m = re.search(rf"(?:^|,){re.escape(name)}=([^,]*)", value)
    return m.group(1) if m else None


def _mac_of(kind: str, net: str) -> str | None:
    m = re.search(r"(?:^|,)hwaddr=([0-9A-Fa-f:]{17})" if kind == "lxc" else r"^[a-z0-9]+=([0-9A-Fa-f:]{17})", net)
    return m.group(1) if m else None


def _random_mac() -> str:
    return MAC_PREFIX + "".join(f":{b:02X}" for b in secrets.token_bytes(3))


def _format_size(size: int) -> str:
    """PVE::VZDump::format_size."""
    if size < 1 << 20:
        return f"{size // 1024}KB"
    if size < 1 << 30:
        return f"{size >> 20}MB"
    return f"{size / (1 << 30):.2f}GB"


def _format_duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


def _utc(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc)


# -- archives --
class ArchiveError(Exception):
    """An archive that cannot be read (corrupt, truncated, not a backup)."""


@dataclass(frozen=True)
class ArchiveName:
    """What PVE::Storage::archive_info reads from a standard vzdump file name."""

    filename: str
    kind: str  # qemu | lxc
    vmid: int
    ctime: int
    format: str  # vma.zst, tar, ...
    comp: str | None  # zst | gz | lzo

    @classmethod
    def parse(cls, filename: str) -> "ArchiveName | None":
        m = _ARCHIVE.fullmatch(filename)
        if m is None:
            return None
        when = dt.datetime.strptime(m.group(3), "%Y_%m_%d-%H_%M_%S").replace(tzinfo=dt.timezone.utc)
        return cls(filename, m.group(1), int(m.group(2)), int(when.timestamp()), m.group(4), m.group(5))

    @property
    def stem(self) -> str:
        return self.filename[:-len(self.format) - 1]


def _compress(data: bytes, comp: str | None) -> bytes:
    if comp == "zst":
        return zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data)
    if comp == "gz":
        return gzip.compress(data, mtime=0)
    if comp == "lzo":
        return _lzop_stored(data)
    return data


def _lzop_stored(data: bytes) -> bytes:
    """An lzop file whose blocks are stored (a block is stored when its compressed length equals its length),
    each with the Adler-32 of its data (lzop's default F_ADLER32_D)."""
    header = struct.pack(">HHHBBIIIIB", 0x1030, 0x2080, 0x0940, 1, 5, 0x1, 0o100644, 0, 0, 0)
    out = [_LZOP_MAGIC, header, struct.pack(">I", zlib.adler32(header))]
    for i in range(0, len(data), 256 << 10):
        block = data[i:i + (256 << 10)]
        out += [struct.pack(">III", len(block), len(block), zlib.adler32(block)), block]
    return b"".join(out + [b"\0\0\0\0"])


class _LzopReader(io.RawIOBase):
    """Reads the stored-block lzop files ``_lzop_stored`` writes."""

    def __init__(self, raw: BinaryIO):
        super().__init__()
        self.raw, self.pending, self.done = raw, b"", False
        head = raw.read(len(_LZOP_MAGIC) + 25 + 4)
        if head[:len(_LZOP_MAGIC)] != _LZOP_MAGIC:
            raw.close()
            raise ArchiveError("lzop: not a lzop file")

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.raw.close()
        super().close()

    def readinto(self, buffer: Any) -> int:
        while not self.pending and not self.done:
            sizes = self.raw.read(4)
            if len(sizes) < 4:
                raise ArchiveError("lzop: unexpected end of file")
            length = struct.unpack(">I", sizes)[0]
            if length == 0:
                self.done = True
                break
            stored, checksum = struct.unpack(">II", _read_exact(self.raw, 8))
            if stored != length:
                raise ArchiveError("lzop: compressed block (not simulated) or corrupted block header")
            self.pending = _read_exact(self.raw, length)
            if zlib.adler32(self.pending) != checksum:
                raise ArchiveError("lzop: checksum error")
        n = min(len(buffer), len(self.pending))
        buffer[:n], self.pending = self.pending[:n], self.pending[n:]
        return n


def _open_archive(path: Path, comp: str | None) -> BinaryIO:
    if comp == "gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    raw = path.open("rb")
    if comp == "zst":
        return zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)  # type: ignore[return-value]
    if comp == "lzo":
        return io.BufferedReader(_LzopReader(raw))  # type: ignore[return-value]
    return raw


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            raise ArchiveError("unexpected end of archive")
        data += chunk
    return data


def _disk_data(seed: int, size: int) -> bytes:
    """A guest's disk: deterministic and incompressible, so archive sizes are real."""
    return random.Random(seed).randbytes(size)


def build_archive(kind: str, config: str, guest_info: dict[str, Any], data: bytes, ctime: int) -> bytes:
    """The uncompressed archive: a tar (``./etc/vzdump/pct.conf`` first) or our VMA-like container."""
    info = json.dumps(guest_info).encode()
    if kind == "lxc":
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for name, payload in (("./etc/vzdump/pct.conf", config.encode()), ("./etc/vzdump/sim-guest.json", info),
                                  ("./var/lib/sim/disk.img", data)):
                member = tarfile.TarInfo(name)
                member.size, member.mtime = len(payload), ctime
                tar.addfile(member, io.BytesIO(payload))
        return buffer.getvalue()
    blobs = b"".join(struct.pack(">H", len(n)) + n + struct.pack(">I", len(v)) + v
                     for n, v in ((b"qemu-server.conf", config.encode()), (b"sim-guest.json", info)))
    ident = secrets.token_bytes(16)
    head = _VMA_HEAD.pack(_VMA_MAGIC, 1, ident, ctime, b"\0" * 16, _VMA_HEAD.size + len(blobs)) + blobs
    md5 = hashlib.md5(head).digest()  # over the header with its own checksum field zeroed, as VMA does
    head = _VMA_HEAD.pack(_VMA_MAGIC, 1, ident, ctime, md5, _VMA_HEAD.size + len(blobs)) + blobs
    return head + _EXTENT_HEAD.pack(len(data), hashlib.md5(data).digest()) + data


@dataclass
class ArchiveContents:
    """What reading an archive found: the guest config text, the simulator's guest record, the disk data's size."""

    config: str
    guest_info: dict[str, Any]
    data_size: int


def read_archive(path: Path, kind: str, comp: str | None, whole: bool) -> ArchiveContents:
    """The config (and, with ``whole``, the checked disk data) of an archive; ArchiveError when it is damaged."""
    try:
        with _open_archive(path, comp) as stream:
            return _read_tar(stream, whole) if kind == "lxc" else _read_vma(stream, whole)
    except tarfile.TarError as exc:
        raise ArchiveError(f"tar: {exc}") from None
    except (zstandard.ZstdError, zlib.error, OSError, EOFError, struct.error, UnicodeDecodeError, ValueError) as exc:
        tool = {"zst": "zstd", "gz": "gzip", "lzo": "lzop"}.get(comp or "", "vma" if kind == "qemu" else "tar")
        raise ArchiveError(f"{tool}: {exc}") from None


def _read_vma(stream: BinaryIO, whole: bool) -> ArchiveContents:
    first = _read_exact(stream, _VMA_HEAD.size)
    magic, version, ident, ctime, md5, size = _VMA_HEAD.unpack(first)
    if magic != _VMA_MAGIC or version != 1:
        raise ArchiveError("not a VMA archive (wrong magic or version)")
    if size < _VMA_HEAD.size or size > 1 << 24:
        raise ArchiveError("VMA header size out of range")
    blobs = _read_exact(stream, size - _VMA_HEAD.size)
    if hashlib.md5(_VMA_HEAD.pack(magic, version, ident, ctime, b"\0" * 16, size) + blobs).digest() != md5:
        raise ArchiveError("VMA header checksum mismatch")
    found: dict[bytes, bytes] = {}
    view = io.BytesIO(blobs)
    while view.tell() < len(blobs):
        name = view.read(struct.unpack(">H", view.read(2))[0])
        found[name] = view.read(struct.unpack(">I", view.read(4))[0])
    if b"qemu-server.conf" not in found:
        raise ArchiveError("VMA archive contains no configuration file")
    config, info = found[b"qemu-server.conf"].decode(), json.loads(found.get(b"sim-guest.json", b"{}"))
    if not whole:
        return ArchiveContents(config, info, 0)
    length, digest = _EXTENT_HEAD.unpack(_read_exact(stream, _EXTENT_HEAD.size))
    data = _read_exact(stream, length)
    if hashlib.md5(data).digest() != digest:
        raise ArchiveError("VMA extent checksum mismatch")
    if stream.read(1):
        raise ArchiveError("trailing data after the last VMA extent")
    return ArchiveContents(config, info, length)


def _read_tar(stream: BinaryIO, whole: bool) -> ArchiveContents:
    config, info, size = None, {}, 0
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            payload = tar.extractfile(member)
            content = payload.read() if payload else b""
            if member.name == "./etc/vzdump/pct.conf":
                config = content.decode()
                if not whole:
                    break
            elif member.name == "./etc/vzdump/sim-guest.json":
                info = json.loads(content)
            else:
                size += len(content)
    if config is None:
        raise ArchiveError("ERROR: archive contains no configuration file")
    if whole:
        while stream.read(1 << 16):  # to the end, where the compressors check their checksums
            pass
    return ArchiveContents(config, info, size)


# -- the simulated cluster --
@dataclass
class Token:
    user: str
    name: str
    secret: str
    acl: dict[str, frozenset[str]]
    privsep: bool

    @property
    def tokenid(self) -> str:
        return f"{self.user}!{self.name}"


@dataclass
class _Storage:
    node: str
    name: str
    type: str
    content: frozenset[str]
    total: int
    path: Path | None = None  # a directory storage's root; None for block storages
    shared: bool = False
    prune_backups: str | None = None

    @property
    def dump(self) -> Path:
        assert self.path is not None
        return self.path / "dump"


@dataclass
class _Guest:
    vmid: int
    kind: str  # qemu | lxc
    node: str
    config: dict[str, str]
    status: str = "stopped"
    pool: str | None = None
    agent_ip: list[str] = field(default_factory=list)
    disk_bytes: int = 1 << 20
    started: float = 0.0  # simulator clock at start
    snapshots: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def type_name(self) -> str:  # PVE::AbstractConfig::guest_type
        return "VM" if self.kind == "qemu" else "CT"

    @property
    def name(self) -> str | None:
        return self.config.get("name" if self.kind == "qemu" else "hostname")


@dataclass
class _Task:
    upid: str
    node: str
    type: str
    id: str
    user: str  # user@realm!tokenid
    pid: int
    pstart: int
    starttime: int
    lines: list[str] = field(default_factory=list)
    warnings: int = 0
    exitstatus: str | None = None
    endtime: int | None = None

    def log(self, line: str) -> None:
        self.lines.extend(line.split("\n"))

    def warn(self, message: str) -> None:  # PVE::RESTEnvironment::warn: counted for "TASK WARNINGS: n"
        self.log(f"WARN: {message}")
        self.warnings += 1

    def describe(self) -> dict[str, Any]:
        user, _, tokenid = self.user.partition("!")
        info = {"upid": self.upid, "node": self.node, "pid": self.pid, "pstart": self.pstart,
                "starttime": self.starttime, "type": self.type, "id": self.id, "user": user}
        if tokenid:
            info["tokenid"] = tokenid
        return info


@dataclass
class _BackupJob:
    vmids: frozenset[int] | None  # None: all guests
    exclude: frozenset[int]
    node: str | None


@dataclass
class _Call:
    """One API request: who asks, with which (validated) parameters."""

    token: Token
    params: dict[str, Any]
    total: int | None = None  # Proxmox's 'total' result attribute, for lists that have one

    def __getitem__(self, name: str) -> Any:
        return self.params[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.params.get(name, default)


@dataclass(frozen=True)
class _Route:
    method: str
    pattern: re.Pattern[str]
    handler: Callable[[_Call], Any]
    schema: dict[str, Prop]
    check: tuple[str, tuple[str, ...], bool] | None  # ACL path template, privileges, any-of


class _AwaitTask(Exception):
    """Raised by a handler that answers only after its task ends (or ``seconds`` pass): DELETE content with ``delay``."""

    def __init__(self, upid: str, seconds: float):
        super().__init__(upid)
        self.upid, self.seconds = upid, seconds


def _self_signed(hosts: Iterable[str]) -> tuple[bytes, bytes, str]:
    """A certificate for 127.0.0.1 and localhost: (cert PEM, key PEM, SHA-256 fingerprint as Proxmox prints it)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "PVE Cluster Node (simulator)")])
    now = dt.datetime.now(dt.timezone.utc)
    sans = [x509.IPAddress(ipaddress.ip_address(h)) if h[0].isdigit() else x509.DNSName(h) for h in hosts]
    # CA:TRUE so that the file can be the trust anchor itself (the client's verify_ssl=<file>)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=False,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    fingerprint = ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem, fingerprint


class _TLSServer(QuietHTTPServer):
    """HTTPS, with each TLS handshake in its request's thread (a slow or refusing client holds up no one)."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], context: ssl.SSLContext):
        super().__init__(("127.0.0.1", 0), handler)
        self.socket = context.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(30)
        try:
            request.do_handshake()
        except (ssl.SSLError, OSError):
            return  # a client that does not trust the certificate hangs up here, as it should
        super().finish_request(request, client_address)

    def handle_error(self, request: object, client_address: object) -> None:
        if isinstance(sys.exc_info()[1], ssl.SSLError):  # a client cutting a TLS connection short
            return
        super().handle_error(request, client_address)


class ProxmoxSimulator:
    """A cluster of ``nodes`` behind one HTTPS endpoint: ``url`` (``host``, ``port``), trusted through
    ``ca_path``; ``root_token`` (root@pam!sim) may do anything. Each node starts with a ``local-lvm``
    block storage for guest disks; directory storages for backups come from ``add_storage``."""

    def __init__(self, nodes: Iterable[str] = ("proxmox-node1", "proxmox-node2"),
                 bridges: dict[str, list[str]] | None = None, cluster_name: str = "sim-cluster",
                 task_seconds: float = 0.3):
        self.nodes = list(nodes)
        self.cluster_name = cluster_name
        self.task_seconds = task_seconds
        self.internal_errors: list[str] = []
        self._lock = threading.RLock()
        self._clock_offset = 0.0
        self._offline: set[str] = set()
        self._bridges = bridges or {node: ["vmbr0", "vmbr1"] if i == 0 else ["vmbr0"] for i, node in enumerate(self.nodes)}
        self._storages: dict[tuple[str, str], _Storage] = {
            (node, "local-lvm"): _Storage(node, "local-lvm", "lvmthin", frozenset({"images", "rootdir"}), 100 << 30)
            for node in self.nodes}
        self._guests: dict[int, _Guest] = {}
        self._tokens: dict[str, Token] = {}
        self._tasks: dict[str, _Task] = {}
        self._jobs: list[_BackupJob] = []
        self._fail: list[int] = []
        self._vzdump_faults: dict[int, tuple[str, str]] = {}  # vmid -> ("fail" | "warn", message)
        self._agent_delay: dict[int, float] = {}
        self._threads: list[threading.Thread] = []
        self._pid = 10_000 + secrets.randbelow(50_000)
        self._pstart = 3_000_000 + secrets.randbelow(1_000_000)
        self._routes = self._build_routes()
        self.root_token = self._new_token("root@pam", "sim", {"/": PRIVILEGES}, privsep=False)

        self._tmp = tempfile.TemporaryDirectory(prefix="pve-sim-")
        cert, key, self.fingerprint = _self_signed(["127.0.0.1", "localhost"])
        self.ca_path = Path(self._tmp.name) / "pve-ssl.pem"
        self.ca_path.write_bytes(cert)
        key_path = Path(self._tmp.name) / "pve-ssl.key"
        key_path.write_bytes(key)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.ca_path, key_path)
        sim = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def version_string(self) -> str:
                return "pve-api-daemon/3.0"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                status, reason, payload = sim.handle(self.command, self.path, dict(self.headers.items()), raw)
                self.send_response(status, reason)
                if payload:
                    self.send_header("Content-Type", "application/json;charset=UTF-8")
                self.send_header("Content-Length", str(len(payload)))
                if status >= 400:  # pveproxy does not keep a connection after an error
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

        self.server = _TLSServer(Handler, context)
        self.host = "127.0.0.1"
        self.port = self.server.server_address[1]
        self.url = f"https://{self.host}:{self.port}"
        # A short poll so that stop() returns at once: each test starts and stops its own simulator.
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def start(self) -> "ProxmoxSimulator":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._tmp.cleanup()

    def __enter__(self) -> "ProxmoxSimulator":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- test controls (what an operator, an outage or the passing of time would do to a real cluster) --
    def now(self) -> float:
        """The simulator's clock: wall time plus whatever ``advance_clock`` added."""
        return time.time() + self._clock_offset

    def advance_clock(self, seconds: float) -> None:
        with self._lock:
            self._clock_offset += seconds

    def add_token(self, user: str, token_id: str, privileges: dict[str, set[str]], privsep: bool = True) -> str:
        """A token with these privileges by ACL path (``/``, ``/vms/100``, ``/storage/local``, ``/pool/x``,
        ``/nodes/n``, ``/sdn/zones/localnetwork/vmbr0``); returns its secret. A ``root@pam`` token
        without privilege separation has every privilege whatever is given."""
        return self._new_token(user, token_id, privileges, privsep).secret

    def add_storage(self, node: str, storage: str, path: Path, type: str = "dir", content: str = "backup,iso",
                    total_bytes: int = 64 << 30, shared: bool = False, prune_backups: str | None = None) -> None:
        """A directory storage at ``path`` (backups in ``path/dump``); ``shared`` makes it one storage every node sees."""
        with self._lock:
            if node not in self.nodes:
                raise ValueError(f"no node {node!r}")
            (Path(path) / "dump").mkdir(parents=True, exist_ok=True)
            self._storages[(node, storage)] = _Storage(node, storage, type, frozenset(split_list(content)), total_bytes,
                                                       Path(path), shared, prune_backups)

    def set_storage_free(self, node: str, storage: str, free_bytes: int) -> None:
        """Leave ``free_bytes`` free on the storage (its size shrinks to what is used plus that)."""
        with self._lock:
            store = self._storages[(node, storage)]
            store.total = self._storage_used(store) + free_bytes

    def add_guest(self, node: str, vmid: int, kind: str = "qemu", name: str | None = None,
                  config: dict[str, Any] | None = None, status: str = "running", pool: str | None = None,
                  agent_ip: Iterable[str] = (), disk_bytes: int = 1 << 20) -> None:
        """A VM or container; without ``config`` a typical one (disk on local-lvm, a NIC on vmbr0, agent on)."""
        with self._lock:
            if vmid in self._guests:
                raise ValueError(f"VMID {vmid} exists")
            conf = {k: str(v) for k, v in (config if config is not None else self._default_config(kind, vmid)).items()}
            if name is not None:
                conf["name" if kind == "qemu" else "hostname"] = name
            guest = _Guest(vmid, kind, node, conf, "stopped", pool, list(agent_ip), disk_bytes)
            if status == "running":
                guest.status, guest.started = "running", self.now()
            self._guests[vmid] = guest

    def lock(self, vmid: int, lock: str | None) -> None:
        """Set (or with None clear) the guest's config lock, as a running backup or migration would."""
        with self._lock:
            config = self._guests[vmid].config
            config.pop("lock", None)
            if lock:
                config["lock"] = lock

    def set_node_offline(self, node: str, offline: bool = True) -> None:
        with self._lock:
            (self._offline.add if offline else self._offline.discard)(node)

    def set_bridges(self, node: str, bridges: list[str]) -> None:
        with self._lock:
            self._bridges[node] = list(bridges)

    def agent_ready_after(self, vmid: int, seconds: float) -> None:
        """The guest agent of VMID (now, or of a guest restored later under it) answers once it has run ``seconds``."""
        with self._lock:
            self._agent_delay[vmid] = seconds

    def add_backup_job(self, vmids: Iterable[int] | None = None, exclude: Iterable[int] = (), node: str | None = None) -> None:
        """A scheduled backup job (for ``not-backed-up``): these VMIDs, or all but ``exclude``; only on ``node`` if given."""
        with self._lock:
            self._jobs.append(_BackupJob(None if vmids is None else frozenset(vmids), frozenset(exclude), node))

    def fail_next(self, n: int, status: int = 500) -> None:
        """The next ``n`` requests of any kind fail with ``status``."""
        with self._lock:
            self._fail.extend([status] * n)

    def fail_next_vzdump(self, vmid: int, message: str = "vma_queue_write: write error - Broken pipe") -> None:
        """The next backup of VMID fails with ``message`` (the job ends with "job errors", no archive is left)."""
        with self._lock:
            self._vzdump_faults[vmid] = ("fail", message)

    def warn_next_vzdump(self, vmid: int, message: str = "unable to add notes - injected warning") -> None:
        """The next backup of VMID logs a warning: the task ends "WARNINGS: 1" (if nothing else fails)."""
        with self._lock:
            self._vzdump_faults[vmid] = ("warn", message)

    def slow_tasks(self, seconds: float) -> None:
        """Every task from now on runs ``seconds`` (same as setting ``task_seconds``)."""
        self.task_seconds = seconds

    def update_config(self, vmid: int, changes: dict[str, Any]) -> None:
        """Change a guest's config as an operator would (a None value deletes the key)."""
        with self._lock:
            config = self._guests[vmid].config
            for key, value in changes.items():
                if value is None:
                    config.pop(key, None)
                else:
                    config[key] = str(value)

    # -- request handling --
    def handle(self, method: str, target: str, headers: dict[str, str], raw: bytes) -> tuple[int, str, bytes]:
        """One HTTP request: (status, reason phrase, body)."""
        with self._lock:
            injected = self._fail.pop(0) if self._fail else None
        if injected is not None:
            return self._error_answer(ApiError(injected, "injected failure\n"))
        try:
            try:
                with self._lock:
                    data, total = self._handle(method, target, headers, raw)
            except _AwaitTask as wait:
                data, total = self._await_task(wait), None
        except ApiError as err:
            return self._error_answer(err)
        except Exception:  # a bug in the simulator: answer as pveproxy does, and keep it for the tests
            self.internal_errors.append(f"{method} {target}\n{traceback.format_exc()}")
            return self._error_answer(ApiError(500, "internal error in the simulator\n"))
        body: dict[str, Any] = {"data": data}
        if total:
            body["total"] = total
        return 200, "OK", json.dumps(body).encode()

    @staticmethod
    def _error_answer(err: ApiError) -> tuple[int, str, bytes]:
        reason = err.message.split("\n", 1)[0]
        if err.status in {401, 595}:  # the auth handler and a failed proxy connection send no body
            return err.status, reason, b""
        body: dict[str, Any] = {"data": None, "message": err.message}
        if err.errors:
            body["errors"] = err.errors
        return err.status, reason, json.dumps(body).encode()

    def _handle(self, method: str, target: str, headers: dict[str, str], raw: bytes) -> tuple[Any, int | None]:
        parts = urlsplit(target)
        path = unquote(parts.path)
        if path != BASE_PATH and not path.startswith(BASE_PATH + "/"):
            raise ApiError(501, "no such uri")
        rel = "/" + "/".join(p for p in path[len(BASE_PATH):].split("/") if p)
        token = self._authenticate(headers)
        params = self._params(method, parts.query, headers, raw)
        route, uri_params = self._find_route(method, rel)
        for name, value in params.items():
            if name in uri_params and uri_params[name] != str(value):
                raise _param_error({name: "duplicate parameter (already defined in URI) with conflicting values!"})
        params.update(uri_params)
        if route.check is not None:
            template, privs, any_of = route.check
            acl_path = re.sub(r"\{(\w+)\}", lambda m: str(params.get(m.group(1), "")), template)
            (self._check_any if any_of else self._check)(token, acl_path, privs)
        if "node" in uri_params:
            self._reach(uri_params["node"])
        call = _Call(token, validate(params, route.schema))
        data = route.handler(call)
        return data, call.total

    def _authenticate(self, headers: dict[str, str]) -> Token:
        auth = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
        m = re.search(r"(?:^|\s)PVEAPIToken[= ]([^;]*)", auth)
        if not m:
            raise ApiError(401, "No ticket\n")
        tokenid, _, secret = m.group(1).rpartition("=")
        token = self._tokens.get(tokenid)
        if token is None or not secrets.compare_digest(token.secret, secret):
            raise ApiError(401, "Authentication failed!\n")
        return token

    @staticmethod
    def _params(method: str, query: str, headers: dict[str, str], raw: bytes) -> dict[str, Any]:
        """Form or JSON body (POST/PUT) and then the query string, as pve-http-server's extract_params merges them."""
        def decode(text: str) -> dict[str, Any]:  # decode_urlencoded: a repeated key becomes a list
            found: dict[str, Any] = {}
            for key, value in parse_qsl(text, keep_blank_values=True):
                found[key] = [*found[key], value] if isinstance(found.get(key), list) else \
                    [found[key], value] if key in found else value
            return found

        params: dict[str, Any] = {}
        if method in {"POST", "PUT"} and raw:
            ctype = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
            if ctype.split(";")[0].strip() == "application/json":
                try:
                    body = json.loads(raw)
                except ValueError as exc:
                    raise _die(f"malformed JSON string: {exc}") from None
                params.update(body if isinstance(body, dict) else {})
            else:
                params.update(decode(raw.decode("utf-8", "replace")))
        params.update(decode(query))
        params.pop("_dc", None)  # the GUI's disable-cache parameter
        return params

    def _find_route(self, method: str, rel: str) -> tuple[_Route, dict[str, str]]:
        for route in self._routes:
            m = route.pattern.fullmatch(rel)
            if m and route.method == method:
                return route, m.groupdict()
        raise ApiError(501, f"Method '{method} {rel}' not implemented")

    def _reach(self, node: str) -> None:
        """pveproxy proxies a node's requests to that node: unknown names fail to resolve, offline nodes to connect."""
        if node not in self.nodes:
            raise _die(f"hostname lookup '{node}' failed - failed to get address info for: {node}: Name or service not known")
        if node in self._offline:
            raise ApiError(595, "No route to host")

    def _await_task(self, wait: _AwaitTask) -> str | None:
        """None when the task ended well within the delay, its error as a 500, else (still running) the UPID."""
        deadline = time.monotonic() + wait.seconds
        while time.monotonic() < deadline:
            with self._lock:
                status = self._tasks[wait.upid].exitstatus
            if status is not None:
                if status == "OK" or status.startswith("WARNINGS"):
                    return None
                raise _die(status)
            time.sleep(0.02)
        return wait.upid

    # -- tokens and ACLs --
    def _new_token(self, user: str, name: str, privileges: dict[str, Any], privsep: bool) -> Token:
        if not re.fullmatch(r"[^\s:/!@]+@[A-Za-z][A-Za-z0-9.\-_]+", user) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9.\-_]+", name):
            raise ValueError(f"invalid token ID {user}!{name}")
        acl = {}
        for path, privs in privileges.items():
            unknown = set(privs) - PRIVILEGES
            if unknown:
                raise ValueError(f"invalid privilege(s) {sorted(unknown)}")
            acl["/" + "/".join(p for p in path.split("/") if p)] = frozenset(privs)
        if user == "root@pam" and not privsep:
            acl = {"/": PRIVILEGES}
        token = Token(user, name, str(uuid.uuid4()), acl, privsep)  # Proxmox's token secrets are UUIDs
        with self._lock:
            self._tokens[token.tokenid] = token
        return token

    @staticmethod
    def _acl_privileges(token: Token, path: str) -> frozenset[str]:
        """The privileges of the most specific ACL path at or above ``path`` (a deeper ACL replaces inherited ones)."""
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):
            privs = token.acl.get("/" + "/".join(parts[:depth]))
            if privs is not None:
                return privs
        return frozenset()

    def _privileges(self, token: Token, path: str) -> frozenset[str]:
        privs = self._acl_privileges(token, path)
        m = re.fullmatch(r"/vms/(\d+)", path)
        guest = self._guests.get(int(m.group(1))) if m else None
        if guest is not None and guest.pool:
            privs |= self._acl_privileges(token, f"/pool/{guest.pool}")
        return privs

    def _has(self, token: Token, path: str, *privs: str) -> bool:
        return set(privs) <= self._privileges(token, path)

    def _check(self, token: Token, path: str, privs: Iterable[str]) -> None:
        have = self._privileges(token, path)
        for priv in privs:
            if priv not in have:
                raise _perm_error(f"{path}, {priv}")

    def _check_any(self, token: Token, path: str, privs: Iterable[str]) -> None:
        privs = tuple(privs)
        if not self._privileges(token, path) & set(privs):
            raise _perm_error(f"{path}, {'|'.join(privs)}")

    # -- storages and volumes --
    def _storage(self, node: str, name: str) -> _Storage:
        """A storage as seen from ``node``, with PVE::Storage's errors for one that is not there."""
        store = self._storages.get((node, name)) or next(
            (s for s in self._storages.values() if s.name == name and s.shared), None)
        if store is not None:
            return store
        if any(s.name == name for s in self._storages.values()):
            raise _die(f"storage '{name}' is not available on node '{node}'")
        raise _die(f"storage '{name}' does not exist")

    def _storage_used(self, store: _Storage) -> int:
        if store.path is not None:
            return sum(f.stat().st_size for f in store.path.rglob("*") if f.is_file())
        return sum(_size_bytes(_option(volume, "size") or "0")
                   for guest in self._guests.values() if guest.node == store.node
                   for volume in _disks(guest.kind, guest.config).values() if volume.startswith(store.name + ":"))

    def _storage_status(self, store: _Storage) -> dict[str, Any]:
        used = self._storage_used(store)
        total = max(store.total, used)
        return {"storage": store.name, "type": store.type, "content": ",".join(sorted(store.content)),
                "shared": int(store.shared), "active": 1, "enabled": 1, "total": total, "used": used,
                "avail": total - used, "used_fraction": used / total if total else 0}

    def _backup_volume(self, node: str, volid: str, token: Token, vmid: int | None = None) -> tuple[_Storage, Path, ArchiveName]:
        """An archive as check_volume_access and abs_filesystem_path see it: access checked, the file present."""
        m = re.fullmatch(r"([a-z][a-z0-9\-_.]*[a-z0-9]):(.+)", volid, re.I)
        if not m:
            raise _die(f"unable to parse volume ID '{volid}'")
        storage, volname = m.groups()
        store = self._storage(node, storage)
        archive = ArchiveName.parse(volname[len("backup/"):]) if volname.startswith("backup/") else None
        if archive is None:
            raise _die(f"unable to use volume {volid} - content type needs to be 'backup'")
        if not self._has(token, f"/storage/{storage}", "Datastore.Allocate") and archive.vmid != vmid:
            self._check(token, f"/storage/{storage}", ["Datastore.AllocateSpace"])
            self._check(token, f"/vms/{archive.vmid}", ["VM.Backup"])
        path = store.dump / archive.filename if store.path is not None else None
        if path is None or not path.is_file():
            raise _die(f"can't find file '{volid}'")
        return store, path, archive

    def _backups(self, store: _Storage, vmid: int | None = None) -> list[dict[str, Any]]:
        """The storage's backups as list_volumes reports them, oldest name first."""
        if store.path is None or "backup" not in store.content:
            return []
        entries = []
        for path in sorted(store.dump.iterdir(), key=lambda p: p.name.lower()):
            archive = ArchiveName.parse(path.name)
            if archive is None or not path.is_file() or vmid is not None and archive.vmid != vmid:
                continue
            entry = {"volid": f"{store.name}:backup/{path.name}", "format": archive.format, "size": path.stat().st_size,
                     "ctime": archive.ctime, "vmid": archive.vmid, "content": "backup", "subtype": archive.kind}
            notes = path.with_name(path.name + ".notes")
            if notes.is_file():
                entry["notes"] = notes.read_text().split("\n", 1)[0]
            if path.with_name(path.name + ".protected").exists():
                entry["protected"] = 1
            entries.append(entry)
        return entries

    @staticmethod
    def _prune_marks(backups: list[dict[str, Any]], keep: dict[str, int]) -> list[dict[str, Any]]:
        """PVE::Storage::prune_mark_backup_group per guest: each entry with ``mark`` keep|remove|protected."""
        marked = [{"volid": b["volid"], "ctime": b["ctime"], "type": b["subtype"], "vmid": b["vmid"],
                   "mark": "protected" if b.get("protected") else None} for b in backups]
        groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for entry in sorted(marked, key=lambda e: -e["ctime"]):
            groups.setdefault((entry["type"], entry["vmid"]), []).append(entry)
        positive = [k for k in _PERIODS if keep.get(k, 0) > 0]
        for group in groups.values():
            if keep.get("keep-all") or not positive:
                for entry in group:
                    entry["mark"] = entry["mark"] or "keep"
                continue
            for key, period in _PERIODS.items():
                count = keep.get(key, 0)
                if not count:
                    continue
                kept = {period(_utc(e["ctime"])) for e in group if e["mark"] == "keep"}
                new: set[object] = set()
                for entry in group:
                    pid = period(_utc(entry["ctime"]))
                    if entry["mark"] is not None or pid in kept:
                        continue
                    if pid not in new:
                        if len(new) >= count:
                            break
                        new.add(pid)
                        entry["mark"] = "keep"
                    else:
                        entry["mark"] = "remove"
            for entry in group:
                entry["mark"] = entry["mark"] or "remove"
        return marked

    def _remove_archive(self, path: Path) -> None:
        """PVE::Storage::archive_remove: refused when protected; the .log and .notes go with it."""
        if path.with_name(path.name + ".protected").exists():
            raise _die(f"cannot remove protected archive '{path}'")
        path.unlink(missing_ok=True)
        self._remove_auxiliaries(path)

    @staticmethod
    def _remove_auxiliaries(path: Path) -> None:
        archive = ArchiveName.parse(path.name)
        if archive is not None:
            path.with_name(archive.stem + ".log").unlink(missing_ok=True)
        path.with_name(path.name + ".notes").unlink(missing_ok=True)

    # -- guests --
    @staticmethod
    def _default_config(kind: str, vmid: int) -> dict[str, Any]:
        mac = f"{MAC_PREFIX}:{vmid >> 16 & 255:02X}:{vmid >> 8 & 255:02X}:{vmid & 255:02X}"
        if kind == "lxc":
            return {"arch": "amd64", "cores": 1, "hostname": f"ct{vmid}", "memory": 512, "swap": 512, "ostype": "debian",
                    "net0": f"name=eth0,bridge=vmbr0,hwaddr={mac},ip=dhcp,type=veth",
                    "rootfs": f"local-lvm:vm-{vmid}-disk-0,size=8G", "unprivileged": 1}
        return {"agent": "1", "boot": "order=scsi0", "cores": 2, "memory": "2048", "name": f"vm{vmid}", "ostype": "l26",
                "net0": f"virtio={mac},bridge=vmbr0", "scsi0": f"local-lvm:vm-{vmid}-disk-0,size=8G",
                "scsihw": "virtio-scsi-single"}

    def _guest(self, node: str, kind: str, vmid: int) -> _Guest:
        """PVE::QemuConfig/LXC::Config->load_config on ``node``: the guest, or Proxmox's missing-file error."""
        guest = self._guests.get(vmid)
        if guest is None or guest.node != node or guest.kind != kind:
            folder = "qemu-server" if kind == "qemu" else "lxc"
            raise _die(f"Configuration file 'nodes/{node}/{folder}/{vmid}.conf' does not exist")
        return guest

    @staticmethod
    def _check_lock(guest: _Guest) -> None:
        if guest.config.get("lock"):
            raise _die(f"{guest.type_name} is locked ({guest.config['lock']})")

    def _set_lock(self, guest: _Guest, lock: str) -> None:
        self._check_lock(guest)
        guest.config["lock"] = lock

    def _check_vmid_unused(self, vmid: int) -> None:
        existing = self._guests.get(vmid)
        if existing is not None:
            raise _die(f"{existing.type_name} {vmid} already exists on node '{existing.node}'")

    def _guest_status(self, guest: _Guest) -> dict[str, Any]:
        running = guest.status == "running"
        disk = sum(_size_bytes(_option(v, "size") or "0") for v in _disks(guest.kind, guest.config).values())
        memory = _size_bytes(re.sub(r"^(current=)?(\d+).*", r"\2", guest.config.get("memory", "512")) + "M")
        info: dict[str, Any] = {"vmid": guest.vmid, "name": guest.name or (f"VM {guest.vmid}" if guest.kind == "qemu" else f"CT{guest.vmid}"),
                                "status": guest.status, "uptime": int(self.now() - guest.started) if running else 0,
                                "cpus": int(guest.config.get("cores", "1")) * int(guest.config.get("sockets", "1")),
                                "maxmem": memory, "mem": memory // 2 if running else 0, "maxdisk": disk, "disk": 0,
                                "cpu": 0.01 if running else 0, "netin": 0, "netout": 0, "diskread": 0, "diskwrite": 0}
        if guest.kind == "lxc":
            info["type"] = "lxc"
        if running:
            info["pid"] = 100_000 + guest.vmid
        if guest.config.get("lock"):
            info["lock"] = guest.config["lock"]
        if guest.config.get("template") == "1":
            info["template"] = 1
        return info

    def _agent_ready(self, guest: _Guest) -> bool:
        return guest.status == "running" and self.now() - guest.started >= self._agent_delay.get(guest.vmid, 0.0)

    def _start_guest(self, guest: _Guest) -> None:
        guest.status, guest.started = "running", self.now()

    # -- tasks --
    def _start_task(self, call: _Call, node: str, kind: str, id: str, work: Callable[[_Task], None]) -> str:
        """fork_worker: a UPID now, ``work`` in a thread; its exception text becomes the task's exit status."""
        self._pid += 1 + secrets.randbelow(40)
        pstart = self._pstart + self._pid % 100_000  # the worker's start in jiffies since boot
        starttime = int(self.now())
        upid = f"UPID:{node}:{self._pid:08X}:{pstart:08X}:{starttime:08X}:{kind}:{id}:{call.token.tokenid}:"
        task = _Task(upid, node, kind, id, call.token.tokenid, self._pid, pstart, starttime)
        self._tasks[upid] = task
        thread = threading.Thread(target=self._run_task, args=(task, work), name=f"pve-task-{kind}", daemon=True)
        self._threads.append(thread)
        thread.start()
        return upid

    def _run_task(self, task: _Task, work: Callable[[_Task], None]) -> None:
        try:
            work(task)
            status = f"WARNINGS: {task.warnings}" if task.warnings else "OK"
        except ApiError as err:
            status = err.message.strip().replace("\n", " ")
        except Exception:
            self.internal_errors.append(f"task {task.upid}\n{traceback.format_exc()}")
            status = "internal error in the simulator"
        with self._lock:
            if status == "OK" or status.startswith("WARNINGS: "):
                task.log(f"TASK {status}")
            else:
                task.log(f"TASK ERROR: {status}")
            task.exitstatus, task.endtime = status, int(self.now())

    def _pause(self, share: float = 1.0) -> None:
        """Let a task take its time (outside the lock, so the API answers meanwhile)."""
        time.sleep(max(self.task_seconds * share, 0))

    def _task_for(self, call: _Call) -> _Task:
        """The task a /tasks/{upid} request names, with Proxmox's checks: parseable, on this node, visible."""
        upid, node = call["upid"], call["node"]
        m = re.fullmatch(r"UPID:([a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?):([0-9A-Fa-f]{8}):([0-9A-Fa-f]{8,9}):"
                         r"([0-9A-Fa-f]{8}):([^:\s/]+):([^:\s/]*):([^:\s/]+):", upid)
        if not m:
            raise _param_error({"upid": "unable to parse worker upid"})
        task = self._tasks.get(upid)
        if task is None or task.node != node:
            raise _param_error({"upid": "no such task"})
        if not self._task_visible(call.token, task):
            self._check(call.token, f"/nodes/{node}", ["Sys.Audit"])
        return task

    @staticmethod
    def _task_visible(token: Token, task: _Task) -> bool:
        # a token sees its own tasks; the user sees theirs and their tokens' (the simulator's callers are all tokens)
        return task.user == token.tokenid

    # -- routes --
    def _build_routes(self) -> list[_Route]:
        routes: list[_Route] = []

        def add(method: str, template: str, handler: Callable[[_Call], Any], schema: dict[str, Prop] | None = None,
                check: tuple[str, tuple[str, ...], bool] | None = None) -> None:
            uri = re.findall(r"\{(\w+)\}", template)
            pattern = re.sub(r"\{(\w+)\}", lambda m: f"(?P<{m.group(1)}>{'.+' if m.group(1) == 'volume' else '[^/]+'})",
                             template)
            full = {name: {"node": NODE, "vmid": VMID, "storage": STORAGE, "snapname": SNAPNAME}.get(name, replace(TEXT, optional=False))
                    for name in uri}
            routes.append(_Route(method, re.compile(pattern), handler, {**full, **(schema or {})}, check))

        def perm(path: str, *privs: str, any_of: bool = False) -> tuple[str, tuple[str, ...], bool]:
            return path, privs, any_of

        add("GET", "/version", lambda c: dict(VERSION))
        add("GET", "/nodes", self._nodes_index)
        add("GET", "/cluster/resources", self._cluster_resources,
            {"type": Prop(enum=("vm", "storage", "node", "sdn"))})
        add("GET", "/cluster/nextid", self._nextid, {"vmid": OPT_VMID})
        add("GET", "/cluster/backup-info/not-backed-up", self._not_backed_up, check=perm("/", "Sys.Audit"))
        add("GET", "/nodes/{node}/network", self._network,
            {"type": Prop(enum=("bridge", "bond", "eth", "alias", "vlan", "OVSBridge", "OVSBond", "OVSPort",
                                "OVSIntPort", "any_bridge", "any_local_bridge"))})
        add("GET", "/nodes/{node}/storage", self._storage_index,
            {"storage": OPT_STORAGE, "content": TEXT, "enabled": BOOL, "target": replace(NODE, optional=True), "format": BOOL})
        store_read = perm("/storage/{storage}", "Datastore.Audit", "Datastore.AllocateSpace", any_of=True)
        add("GET", "/nodes/{node}/storage/{storage}/status", self._storage_read_status, check=store_read)
        add("GET", "/nodes/{node}/storage/{storage}/prunebackups", self._prune_preview,
            {"prune-backups": TEXT, "type": Prop(enum=("qemu", "lxc")), "vmid": OPT_VMID}, check=store_read)
        add("GET", "/nodes/{node}/storage/{storage}/content", self._content_index,
            {"content": TEXT, "vmid": OPT_VMID}, check=store_read)
        add("GET", "/nodes/{node}/storage/{storage}/content/{volume}", self._content_info)
        add("PUT", "/nodes/{node}/storage/{storage}/content/{volume}", self._content_update,
            {"notes": TEXT, "protected": BOOL})
        add("DELETE", "/nodes/{node}/storage/{storage}/content/{volume}", self._content_delete,
            {"delay": _int(1, 30)})
        add("POST", "/nodes/{node}/vzdump", self._vzdump, self._vzdump_schema())
        add("GET", "/nodes/{node}/vzdump/extractconfig", self._extractconfig, {"volume": replace(TEXT, optional=False)})
        add("GET", "/nodes/{node}/tasks", self._tasks_index,
            {"start": _int(0), "limit": _int(0), "userfilter": TEXT, "typefilter": TEXT, "vmid": OPT_VMID,
             "errors": BOOL, "source": Prop(enum=("archive", "active", "all")), "since": _int(), "until": _int(),
             "statusfilter": TEXT})
        add("GET", "/nodes/{node}/tasks/{upid}/status", lambda c: self._task_status(c))
        add("GET", "/nodes/{node}/tasks/{upid}/log", self._task_log,
            {"start": _int(0), "limit": _int(0), "download": BOOL})
        restore_common = {"vmid": VMID, "storage": OPT_STORAGE, "force": BOOL, "unique": BOOL, "start": BOOL,
                          "pool": TEXT, "bwlimit": _int(0)}
        add("POST", "/nodes/{node}/qemu", self._restore_qemu,
            {**restore_common, "archive": Prop(max_length=255), "force": replace(BOOL, requires="archive"),
             "unique": replace(BOOL, requires="archive"), "live-restore": BOOL,
             **{key: TEXT for key in ("name", "memory", "description", "tags", "onboot")},
             "cores": _int(1, 8192), **{f"net{i}": TEXT for i in range(32)}})
        add("POST", "/nodes/{node}/lxc", self._restore_lxc,
            {**restore_common, "ostemplate": Prop(optional=False, max_length=255), "restore": BOOL,
             "ignore-unpack-errors": BOOL, **{key: TEXT for key in ("hostname", "description", "tags", "onboot")},
             "memory": _int(16), "cores": _int(1, 8192), **{f"net{i}": TEXT for i in range(32)}})
        for kind in ("qemu", "lxc"):
            base = f"/nodes/{{node}}/{kind}"
            audit = perm("/vms/{vmid}", "VM.Audit")
            add("GET", base, lambda c, k=kind: self._guest_index(c, k))
            add("GET", base + "/{vmid}/config", lambda c, k=kind: self._guest_config(c, k),
                {"current": BOOL, "snapshot": replace(SNAPNAME, optional=True)}, check=audit)
            add("GET", base + "/{vmid}/status/current", lambda c, k=kind: self._status_current(c, k), check=audit)
            for action in ("start", "stop", "shutdown"):
                add("POST", base + f"/{{vmid}}/status/{action}", lambda c, k=kind, a=action: self._power(c, k, a),
                    {"skiplock": BOOL, "timeout": _int(0), "forceStop": BOOL, "keepActive": BOOL},
                    check=perm("/vms/{vmid}", "VM.PowerMgmt"))
            add("DELETE", base + "/{vmid}", lambda c, k=kind: self._destroy(c, k),
                {"purge": BOOL, "destroy-unreferenced-disks": BOOL, "skiplock": BOOL, **({"force": BOOL} if kind == "lxc" else {})},
                check=perm("/vms/{vmid}", "VM.Allocate"))
            add("GET", base + "/{vmid}/snapshot", lambda c, k=kind: self._snapshot_list(c, k), check=audit)
            add("POST", base + "/{vmid}/snapshot", lambda c, k=kind: self._snapshot(c, k),
                {"snapname": SNAPNAME, "description": TEXT, **({"vmstate": BOOL} if kind == "qemu" else {})},
                check=perm("/vms/{vmid}", "VM.Snapshot"))
            add("DELETE", base + "/{vmid}/snapshot/{snapname}", lambda c, k=kind: self._delsnapshot(c, k),
                {"force": BOOL}, check=perm("/vms/{vmid}", "VM.Snapshot"))
            add("POST", base + "/{vmid}/snapshot/{snapname}/rollback", lambda c, k=kind: self._rollback(c, k),
                {"start": BOOL}, check=perm("/vms/{vmid}", "VM.Snapshot", "VM.Snapshot.Rollback", any_of=True))
        monitor = perm("/vms/{vmid}", "VM.Monitor")
        add("POST", "/nodes/{node}/qemu/{vmid}/agent/ping", lambda c: self._agent(c, "ping"), check=monitor)
        add("GET", "/nodes/{node}/qemu/{vmid}/agent/network-get-interfaces",
            lambda c: self._agent(c, "network-get-interfaces"), check=monitor)
        add("GET", "/nodes/{node}/lxc/{vmid}/interfaces", self._lxc_interfaces, check=perm("/vms/{vmid}", "VM.Audit"))
        return routes

    @staticmethod
    def _vzdump_schema() -> dict[str, Prop]:
        accepted = ("mailto", "mailnotification", "notification-mode", "exclude-path", "tmpdir", "dumpdir", "script",
                    "job-id", "fleecing", "performance", "pbs-change-detection-mode", "notes-template")
        return {"vmid": Prop(check=_vmid_list_format), "all": BOOL, "exclude": Prop(check=_vmid_list_format),
                "pool": TEXT, "storage": OPT_STORAGE, "mode": Prop(enum=("snapshot", "suspend", "stop")),
                "compress": Prop(enum=("0", "1", "gzip", "lzo", "zstd")), "protected": replace(BOOL, requires="storage"),
                "bwlimit": _int(0), "ionice": _int(0, 8), "zstd": _int(0), "pigz": _int(0), "lockwait": _int(0),
                "stopwait": _int(0), "prune-backups": TEXT, "maxfiles": _int(1), "remove": BOOL, "quiet": BOOL,
                "stdexcludes": BOOL, "stop": BOOL, "stdout": BOOL,
                **{key: TEXT for key in accepted},
                "notes-template": Prop(max_length=1024, requires="storage")}

    # -- cluster and nodes --
    def _nodes_index(self, call: _Call) -> list[dict[str, Any]]:
        nodes = []
        for node in self.nodes:
            entry: dict[str, Any] = {"node": node, "id": f"node/{node}", "type": "node",
                                     "status": "offline" if node in self._offline else "online",
                                     "ssl_fingerprint": self.fingerprint}
            if self._has(call.token, f"/nodes/{node}", "Sys.Audit"):
                entry.update({"maxcpu": 8, "maxmem": 64 << 30, "maxdisk": 100 << 30, "level": ""})
                if node not in self._offline:
                    entry.update({"cpu": 0.02, "mem": 8 << 30, "disk": 10 << 30, "uptime": 86_400})
            nodes.append(entry)
        return nodes

    def _cluster_resources(self, call: _Call) -> list[dict[str, Any]]:
        kind = call.get("type")
        result: list[dict[str, Any]] = []
        if kind is None:
            result += [{"id": f"/pool/{pool}", "pool": pool, "type": "pool"}
                       for pool in sorted({g.pool for g in self._guests.values() if g.pool})
                       if self._has(call.token, f"/pool/{pool}", "Pool.Audit")]
        if kind in (None, "vm"):
            for vmid, guest in sorted(self._guests.items()):
                if not self._has(call.token, f"/vms/{vmid}", "VM.Audit"):
                    continue
                entry = {**self._guest_status(guest), "id": f"{guest.kind}/{vmid}", "type": guest.kind,
                         "node": guest.node, "template": int(guest.config.get("template") == "1")}
                entry.pop("pid", None)
                if guest.node in self._offline:
                    entry["status"] = "unknown"
                if guest.pool and self._has(call.token, f"/pool/{guest.pool}", "Pool.Audit"):
                    entry["pool"] = guest.pool
                result.append(entry)
        if kind in (None, "node"):
            result += [{k: v for k, v in n.items() if k != "ssl_fingerprint"} for n in self._nodes_index(call)]
        if kind in (None, "storage"):
            for (node, name), store in sorted(self._storages.items()):
                if self._has(call.token, f"/storage/{name}", "Datastore.Audit"):
                    status = self._storage_status(store)
                    result.append({"id": f"storage/{node}/{name}", "storage": name, "node": node, "type": "storage",
                                   "status": "unknown" if node in self._offline else "available",
                                   "plugintype": store.type, "content": status["content"], "shared": status["shared"],
                                   "disk": status["used"], "maxdisk": status["total"]})
        return result

    def _nextid(self, call: _Call) -> str:
        vmid = call.get("vmid")
        if vmid is not None:
            if vmid in self._guests:
                raise _param_error({"vmid": f"VM {vmid} already exists"})
            return str(vmid)
        return str(next(i for i in range(100, 1_000_000) if i not in self._guests))  # a string, as Perl sends it

    def _included_vmids(self) -> set[int]:
        """PVE::VZDump::get_included_guests over every job."""
        included: set[int] = set()
        for job in self._jobs:
            ids = job.vmids if job.vmids is not None else set(self._guests) - job.exclude
            included |= {v for v in ids if job.node is None or (v in self._guests and self._guests[v].node == job.node)}
        return included

    def _not_backed_up(self, call: _Call) -> list[dict[str, Any]]:
        included = self._included_vmids()
        result = []
        for vmid, guest in self._guests.items():
            if vmid in included or not self._has(call.token, f"/vms/{vmid}", "VM.Audit"):
                continue
            entry: dict[str, Any] = {"vmid": vmid, "type": guest.kind}
            if guest.name is not None:
                entry["name"] = guest.name
            result.append(entry)
        return result

    def _network(self, call: _Call) -> list[dict[str, Any]]:
        node = call["node"]
        ifaces = [{"iface": "eno1", "type": "eth", "active": 1, "autostart": 1, "method": "manual",
                   "families": ["inet"], "exists": 1, "priority": 3}]
        for i, bridge in enumerate(self._bridges.get(node, [])):
            entry: dict[str, Any] = {"iface": bridge, "type": "bridge", "active": 1, "autostart": 1,
                                     "method": "static" if i == 0 else "manual", "families": ["inet"],
                                     "bridge_ports": "eno1" if i == 0 else "", "bridge_stp": "off", "bridge_fd": "0",
                                     "priority": 4 + i}
            if i == 0:
                entry.update({"cidr": f"192.168.100.{10 + self.nodes.index(node)}/24",
                              "address": f"192.168.100.{10 + self.nodes.index(node)}", "netmask": "24",
                              "gateway": "192.168.100.1"})
            # bridges are listed only to whom may audit or use them (SDN's localnetwork zone)
            if self._privileges(call.token, f"/sdn/zones/localnetwork/{bridge}") & {"SDN.Audit", "SDN.Use"}:
                ifaces.append(entry)
        wanted = call.get("type")
        if wanted:
            ifaces = [i for i in ifaces if i["type"] == wanted or wanted.startswith("any") and i["type"] == "bridge"]
        return ifaces

    # -- storage --
    def _storage_index(self, call: _Call) -> list[dict[str, Any]]:
        node = call["node"]
        stores = [s for s in self._storages.values() if s.node == node or s.shared]
        if call.get("storage") and not any(s.name == call["storage"] for s in stores):
            raise _param_error({"storage": "No such storage."})
        wanted = set(split_list(call.get("content", "")))
        return [self._storage_status(s) for s in sorted(stores, key=lambda s: s.name)
                if self._privileges(call.token, f"/storage/{s.name}") & {"Datastore.Audit", "Datastore.AllocateSpace"}
                and (not call.get("storage") or s.name == call["storage"]) and (not wanted or wanted & s.content)]

    def _storage_read_status(self, call: _Call) -> dict[str, Any]:
        store = self._storages.get((call["node"], call["storage"])) or next(
            (s for s in self._storages.values() if s.name == call["storage"] and s.shared), None)
        if store is None:
            raise _param_error({"storage": "No such storage."})
        status = self._storage_status(store)
        del status["storage"], status["used_fraction"]
        return status

    def _content_index(self, call: _Call) -> list[dict[str, Any]]:
        store = self._storage(call["node"], call["storage"])
        if call.get("content") not in (None, "backup"):
            return []
        visible = []
        for entry in self._backups(store, call.get("vmid")):
            # check_volume_access per volume: an entry the token may not access is left out
            if self._has(call.token, f"/storage/{store.name}", "Datastore.Allocate") or (
                    self._has(call.token, f"/storage/{store.name}", "Datastore.AllocateSpace")
                    and self._has(call.token, f"/vms/{entry['vmid']}", "VM.Backup")):
                visible.append(entry)
        return visible

    def _content_volume(self, call: _Call) -> tuple[_Storage, Path, ArchiveName]:
        """real_volume_id: the volume of a /content/{volume} path (a full volid, or a name on the path's storage)."""
        volid = call["volume"] if ":" in call["volume"] else f"{call['storage']}:{call['volume']}"
        storage = volid.split(":", 1)[0]
        if storage != call["storage"]:
            raise _die(f"storage ID mismatch ({storage} != {call['storage']})")
        return self._backup_volume(call["node"], volid, call.token)

    def _content_info(self, call: _Call) -> dict[str, Any]:
        store, path, archive = self._content_volume(call)
        info: dict[str, Any] = {"path": str(path), "size": path.stat().st_size, "used": path.stat().st_size,
                                "format": archive.format}
        notes = path.with_name(path.name + ".notes")
        if notes.is_file():
            info["notes"] = notes.read_text()
        info["protected"] = int(path.with_name(path.name + ".protected").exists())
        return info

    def _content_update(self, call: _Call) -> None:
        store, path, archive = self._content_volume(call)
        if "notes" in call.params:
            notes = path.with_name(path.name + ".notes")
            if call["notes"]:
                notes.write_text(call["notes"])
            else:
                notes.unlink(missing_ok=True)
        if "protected" in call.params:
            self._set_protected(call.token, store, path, archive.vmid, archive.kind, call["protected"])

    def _set_protected(self, token: Token, store: _Storage, path: Path, vmid: int, kind: str, protect: bool) -> None:
        marker = path.with_name(path.name + ".protected")
        if not protect:
            marker.unlink(missing_ok=True)
            return
        if not marker.exists() and not self._has(token, f"/storage/{store.name}", "Datastore.Allocate"):
            count = sum(1 for b in self._backups(store, vmid) if b.get("protected") and b["subtype"] == kind)
            if count >= MAX_PROTECTED:
                raise _die(f"The number of protected backups per guest is limited to {MAX_PROTECTED} on storage '{store.name}'")
        marker.touch()

    def _content_delete(self, call: _Call) -> str:
        store, path, archive = self._content_volume(call)
        # a backup volume needs AllocateSpace and VM.Backup on its guest, even with Datastore.Allocate
        self._check(call.token, f"/storage/{store.name}", ["Datastore.AllocateSpace"])
        self._check(call.token, f"/vms/{archive.vmid}", ["VM.Backup"])
        volname = f"backup/{archive.filename}"

        def work(task: _Task) -> None:
            self._pause()
            with self._lock:
                if path.with_name(path.name + ".protected").exists():
                    raise _die(f"cannot remove protected volume '{volname}' on '{store.name}'")
                path.unlink(missing_ok=True)
                task.log(f"Removed volume '{store.name}:{volname}'")
                self._remove_auxiliaries(path)

        upid = self._start_task(call, call["node"], "imgdel", f"{archive.vmid}@{store.name}", work)
        if call.get("delay"):
            raise _AwaitTask(upid, call["delay"])
        return upid

    def _prune_preview(self, call: _Call) -> list[dict[str, Any]]:
        store = self._storage(call["node"], call["storage"])
        keep = self._prune_options(store, call.get("prune-backups"))
        backups = [b for b in self._backups(store, call.get("vmid")) if call.get("type") in (None, b["subtype"])]
        return self._prune_marks(backups, keep)

    @staticmethod
    def _prune_options(store: _Storage | None, text: str | None) -> dict[str, int]:
        """The given retention options, else the storage's; 400 for a malformed one."""
        if text is None and (store is None or store.prune_backups is None):
            raise _die(f"no prune-backups options configured for storage '{store.name if store else ''}'")
        try:
            return _parse_prune(text if text is not None else store.prune_backups or "")  # type: ignore[union-attr]
        except ValueError as exc:
            raise _param_error({"prune-backups": f"invalid format - {exc}"}) from None

    # -- vzdump --
    def _vzdump(self, call: _Call) -> str:
        node = call["node"]
        token = call.token
        for key in ("tmpdir", "dumpdir", "script", "job-id"):
            if key in call.params:
                raise _param_error({key: "Only root may set this option."})
        if any(key in call.params for key in ("bwlimit", "ionice", "performance")):
            self._check(token, "/", ["Sys.Modify"])
        storage = call.get("storage", "local")
        if "prune-backups" in call.params or "maxfiles" in call.params:
            self._check(token, f"/storage/{storage}", ["Datastore.Allocate"])
        for other in ("all", "exclude", "pool"):
            if call.get(other) and call.get("vmid"):
                raise _param_error({other: "option conflicts with option 'vmid'"})
        if not (call.get("vmid") or call.get("all") or call.get("pool")):
            raise _param_error({"vmid": "property is missing"})
        template = call.get("notes-template")
        if template is not None:
            try:
                self._notes({"guestname": "", "vmid": "", "node": "", "cluster": ""}, template)
            except ValueError as exc:
                raise _param_error({"notes-template": str(exc)}) from None
        if "prune-backups" in call.params:
            self._prune_options(None, call["prune-backups"])
        if call.get("pool"):
            wanted = [v for v, g in self._guests.items() if g.pool == call["pool"]]
        elif call.get("vmid"):
            wanted = [int(v) for v in split_list(call["vmid"])]
        else:
            excluded = {int(v) for v in split_list(call.get("exclude", ""))}
            wanted = [v for v in self._guests if v not in excluded]
        local = sorted(v for v in wanted if v not in self._guests or self._guests[v].node == node)
        skipped = sorted(v for v in wanted if v not in local)
        if call.get("stop"):
            self._check(token, f"/nodes/{node}", ["Sys.Modify"])
        if not local and not call.get("all"):
            return "OK"  # vzdump exits silently when the guests run on other nodes
        self._check(token, f"/storage/{storage}", ["Datastore.AllocateSpace"])
        options = {k: v for k, v in call.params.items() if k != "vmid"}
        cmdline = "vzdump " + " ".join([*map(str, split_list(call.get("vmid", "")))] + [
            f"--{k} {shlex.quote(str(int(v) if isinstance(v, bool) else v))}" for k, v in sorted(options.items())])

        def work(task: _Task) -> None:
            with self._lock:
                store = self._backup_storage(node, storage)
                keep = self._prune_options(store, call.get("prune-backups")) if call.get("prune-backups") or store.prune_backups else {}
            task.log(f"INFO: starting new backup job: {cmdline}")
            if skipped:
                task.log(f"INFO: skip external VMs: {', '.join(map(str, skipped))}")
            with self._lock:
                for vmid in local:
                    if vmid in self._guests and not call.get("all"):
                        self._check(token, f"/vms/{vmid}", ["VM.Backup"])
                guests = [v for v in local if v not in self._guests or self._has(token, f"/vms/{v}", "VM.Backup")]
            errors = 0
            for vmid in guests:
                errors += not self._backup_guest(task, call, store, vmid, keep, len(guests))
            task.log("INFO: Backup job finished with errors" if errors else "INFO: Backup job finished successfully")
            if errors:
                raise _die("job errors")

        return self._start_task(call, node, "vzdump", str(local[0]) if len(local) == 1 else "", work)

    def _backup_storage(self, node: str, storage: str) -> _Storage:
        """PVE::VZDump->new's storage checks, which fail the task (not the API call)."""
        try:
            store = self._storage(node, storage)
        except ApiError as err:
            reason = err.message.strip()
            raise _die(f"could not activate storage '{storage}': {reason}\n"
                       f"could not get storage information for '{storage}': {reason}") from None
        if "backup" not in store.content or store.path is None:
            raise _die(f"could not get storage information for '{storage}': "
                       f"can't use storage '{storage}' for backups - wrong content type")
        return store

    @staticmethod
    def _notes(info: dict[str, str], template: str) -> str:
        """vzdump's notes-template: checked as verify_notes_template does, then ``\\n``, ``\\\\`` and ``{{vmid}}`` etc."""
        if "\n" in template:
            raise ValueError("contains a line feed\n")
        problems = [f"escape sequence '\\{m.group(1)}' at char {m.start()}"
                    for m in re.finditer(r"\\(.)", template) if m.group(1) not in "n\\"]
        problems += [f"variable '{m.group(1)}' at char {m.end() - len(m.group(1))}"
                     for m in re.finditer(r"\{\{([^\s{}]+)\}\}", template) if m.group(1) not in info]
        if problems:
            raise ValueError(f"found unknown: {', '.join(problems)}\n")
        text = re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else "\\", template)
        return re.sub(r"\{\{(cluster|guestname|node|vmid)\}\}", lambda m: info[m.group(1)], text)

    def _backup_guest(self, task: _Task, call: _Call, store: _Storage, vmid: int, keep: dict[str, int], count: int) -> bool:
        """exec_backup_task for one guest: True when it succeeded (its errors are logged, not raised)."""
        started = self.now()
        guest_log: list[str] = []  # the archive's .log: the same lines, with time stamps

        def log(level: str, message: str) -> None:
            prefix = {"info": "INFO:", "err": "ERROR:", "warn": "WARN:"}[level]
            with self._lock:
                if level == "warn":
                    task.warn(message)
                else:
                    task.log(f"{prefix} {message}")
            guest_log.append(f"{_utc(self.now()):%Y-%m-%d %H:%M:%S} {prefix} {message}")

        locked: _Guest | None = None
        log_path: Path | None = None
        try:
            with self._lock:
                guest = self._guests.get(vmid)
                if guest is None:
                    raise _die(f"unable to find VM '{vmid}'")
                kind = guest.kind
                comp = {"1": "lzo", "lzo": "lzo", "gzip": "gz", "zstd": "zst"}.get(call.get("compress", "0"))
                stem = f"vzdump-{kind}-{vmid}-{_utc(started):%Y_%m_%d-%H_%M_%S}"
                target = store.dump / f"{stem}.{'vma' if kind == 'qemu' else 'tar'}{'.' + comp if comp else ''}"
                log_path = store.dump / f"{stem}.log"
                log("info", f"Starting Backup of VM {vmid} ({kind})")
                log("info", f"Backup started at {_utc(started):%Y-%m-%d %H:%M:%S}")
                log("info", f"status = {guest.status}")
                self._set_lock(guest, "backup")
                locked = guest
                mode = call.get("mode", "snapshot") if guest.status == "running" else "stop"
                if kind == "qemu":
                    log("info", f"VM Name: {guest.name}")
                    for key, volume in sorted(_disks(kind, guest.config).items()):
                        log("info", f"include disk '{key}' '{volume.split(',')[0]}' {_option(volume, 'size') or ''}".rstrip())
                log("info", f"backup mode: {mode}")
                if call.get("bwlimit"):
                    log("info", f"bandwidth limit: {call['bwlimit']} KiB/s")
                log("info", f"ionice priority: {call.get('ionice', 7)}")
                if kind == "lxc" and mode == "snapshot":
                    log("info", "create storage snapshot 'vzdump'")
                log("info", f"creating vzdump archive '{target}'")
                fault = self._vzdump_faults.pop(vmid, None)
                config = self._archive_config(kind, guest.config)
                guest_info, disk_bytes, name = {"agent_ip": guest.agent_ip}, guest.disk_bytes, guest.name
            self._pause(1 / count)
            if fault and fault[0] == "fail":
                raise _die(fault[1])
            if fault:
                log("warn", fault[1])
            payload = _compress(build_archive(kind, config, guest_info, _disk_data(vmid, disk_bytes), int(started)), comp)
            with self._lock:
                if len(payload) > self._storage_status(store)["avail"]:
                    if comp:
                        log("info", f"{dict(zst='zstd', gz='gzip', lzo='lzop')[comp]}: write error: No space left on device")
                    raise _die("vma_queue_write: write error - Broken pipe" if kind == "qemu" else
                               "command 'tar' failed: write error: No space left on device")
                tmp = target.with_name(stem + ".dat")
                tmp.write_bytes(payload)
                tmp.replace(target)
                log("info", f"archive file size: {_format_size(len(payload))}")
                if call.get("notes-template"):
                    log("info", "adding notes to backup")
                    info = {"cluster": self.cluster_name, "guestname": name or f"VM {vmid}", "node": call["node"],
                            "vmid": str(vmid)}
                    target.with_name(target.name + ".notes").write_text(self._notes(info, call["notes-template"]))
                if call.get("protected"):
                    log("info", "marking backup as protected")
                    try:
                        self._set_protected(call.token, store, target, vmid, kind, True)
                    except ApiError as err:
                        raise _die(f"unable to set protected flag - {err.message.strip()}") from None
                if keep and call.get("remove", True):
                    log("info", "prune older backups with retention: " + ", ".join(f"{k}={v}" for k, v in sorted(keep.items())))
                    marks = self._prune_marks([b for b in self._backups(store, vmid) if b["subtype"] == kind], keep)
                    pruned = [m["volid"] for m in marks if m["mark"] == "remove"]
                    for volid in pruned:
                        log("info", f"removing backup '{volid}'")
                        self._remove_archive(store.dump / volid.split("/", 1)[1])
                    log("info", f"pruned {len(pruned)} backup(s)" + (" not covered by keep-retention policy" if pruned else ""))
            ok = True
        except ApiError as err:
            log("err", f"Backup of VM {vmid} failed - {err.message.strip()}")
            ok = False
        finally:
            with self._lock:
                if locked is not None and locked.config.get("lock") == "backup":
                    del locked.config["lock"]
        if ok:
            log("info", f"Finished Backup of VM {vmid} ({_format_duration(self.now() - started)})")
            log("info", f"Backup finished at {_utc(self.now()):%Y-%m-%d %H:%M:%S}")
        else:
            log("info", f"Failed at {_utc(self.now()):%Y-%m-%d %H:%M:%S}")
        if log_path is not None:
            log_path.write_text("".join(line + "\n" for line in guest_log))
        return ok

    @staticmethod
    def _archive_config(kind: str, config: dict[str, str]) -> str:
        """The config vzdump stores: no lock, parent or snapshots; a VM's disks mapped for qmrestore."""
        kept = {k: v for k, v in config.items() if k not in {"lock", "parent"} and not k.startswith("unused")}
        text = config_text(kept)
        if kind == "qemu":
            for key, volume in sorted(_disks(kind, kept).items()):
                storage = volume.split(":", 1)[0] if ":" in volume else ""
                fmt = "qcow2" if ".qcow2" in volume.split(",")[0] else "raw"
                text += f"#qmdump#map:{key}:drive-{key}:{storage}:{fmt}:\n"
        return text

    def _extractconfig(self, call: _Call) -> str:
        store, path, archive = self._backup_volume(call["node"], call["volume"], call.token)
        self._check(call.token, f"/vms/{archive.vmid}", ["VM.Backup"])
        try:
            return read_archive(path, archive.kind, archive.comp, whole=False).config
        except ArchiveError as exc:
            raise _die(f"Failed to extract config from VMA archive: {exc}" if archive.kind == "qemu" else str(exc)) from None

    # -- tasks --
    def _tasks_index(self, call: _Call) -> list[dict[str, Any]]:
        node, token = call["node"], call.token
        auditor = self._has(token, f"/nodes/{node}", "Sys.Audit")
        source = call.get("source", "archive")
        start, limit = call.get("start", 0), call.get("limit", 50)
        statuses = {s.lower() for s in split_list(call.get("statusfilter", ""))} or {"ok", "warning", "error", "unknown"}
        if call.get("errors"):
            statuses.discard("ok")
        result, count = [], 0
        for task in sorted(self._tasks.values(), key=lambda t: (-t.starttime, t.upid)):
            running = task.exitstatus is None
            if task.node != node or running and source == "archive" or not running and source == "active":
                continue
            if call.get("userfilter") and call["userfilter"].lower() not in task.user.lower():
                continue
            if not (auditor or self._task_visible(token, task)):
                continue
            if call.get("typefilter") and task.type != call["typefilter"] or call.get("vmid") and task.id != str(call["vmid"]):
                continue
            if call.get("since") and task.starttime < call["since"] or call.get("until") and task.starttime > call["until"]:
                continue
            status = task.exitstatus or "RUNNING"
            kind = "ok" if status == "OK" else "warning" if status.startswith("WARNINGS") else "unknown" if running else "error"
            if not running and kind not in statuses:
                continue
            count += 1
            if count <= start or len(result) >= limit:
                continue
            entry = {**task.describe(), "status": status}
            if task.endtime is not None:
                entry["endtime"] = task.endtime
            result.append(entry)
        call.total = count
        return result

    def _task_status(self, call: _Call) -> dict[str, Any]:
        task = self._task_for(call)
        info = {**task.describe(), "status": "running" if task.exitstatus is None else "stopped"}
        if task.exitstatus is not None:
            info["exitstatus"] = task.exitstatus
        return info

    def _task_log(self, call: _Call) -> list[dict[str, Any]]:
        task = self._task_for(call)
        start, limit = call.get("start", 0), call.get("limit", 50)
        lines = list(task.lines) or ["no content"]
        call.total = len(lines)
        chosen = lines[start:] if limit == 0 else lines[start:start + limit]
        return [{"n": start + i + 1, "t": text} for i, text in enumerate(chosen)]

    # -- guests --
    def _guest_index(self, call: _Call, kind: str) -> list[dict[str, Any]]:
        return [self._guest_status(g) for v, g in sorted(self._guests.items())
                if g.node == call["node"] and g.kind == kind and self._has(call.token, f"/vms/{v}", "VM.Audit")]

    def _guest_config(self, call: _Call, kind: str) -> dict[str, Any]:
        guest = self._guest(call["node"], kind, call["vmid"])
        config = dict(guest.config)
        if call.get("snapshot"):
            if call["snapshot"] not in guest.snapshots:
                raise _die(f"snapshot '{call['snapshot']}' does not exist")
            config = dict(guest.snapshots[call["snapshot"]])
        config["digest"] = hashlib.sha1(config_text(guest.config, guest.snapshots).encode()).hexdigest()
        return _typed(kind, config)

    def _status_current(self, call: _Call, kind: str) -> dict[str, Any]:
        guest = self._guest(call["node"], kind, call["vmid"])
        status = self._guest_status(guest)
        status["ha"] = {"managed": 0}
        if kind == "qemu":
            status["qmpstatus"] = guest.status
            if re.match(r"(enabled=)?1", guest.config.get("agent", "0")):
                status["agent"] = 1
            if guest.status == "running":
                status.update({"running-qemu": "9.2.0", "running-machine": "pc-i440fx-9.2+pve1"})
        return status

    def _power(self, call: _Call, kind: str, action: str) -> str:
        node, vmid = call["node"], call["vmid"]
        guest = self._guest(node, kind, vmid)
        for option in ("skiplock", "keepActive"):
            if call.get(option):
                raise _param_error({option: "Only root may use this option."})
        if kind == "lxc" and action == "start" and guest.status == "running":
            raise _die(f"CT {vmid} already running")
        if kind == "lxc" and action != "start" and guest.status != "running":
            raise _die(f"CT {vmid} not running")
        prefix = "qm" if kind == "qemu" else "vz"

        def work(task: _Task) -> None:
            self._pause()
            with self._lock:
                if action == "start":
                    self._check_lock(guest)
                    if guest.status == "running":
                        raise _die(f"VM {vmid} already running")
                    self._start_guest(guest)
                elif guest.status == "running":
                    self._check_lock(guest)
                    guest.status = "stopped"

        return self._start_task(call, node, prefix + action, str(vmid), work)

    def _destroy(self, call: _Call, kind: str) -> str:
        node, vmid = call["node"], call["vmid"]
        guest = self._guest(node, kind, vmid)
        if call.get("skiplock"):
            raise _param_error({"skiplock": "Only root may use this option."})
        if guest.config.get("protection") == "1":
            raise _die(f"can't remove {guest.type_name} {vmid} - protection mode enabled")
        if guest.status == "running" and not (kind == "lxc" and call.get("force")):
            raise _die(f"VM {vmid} is running - destroy failed" if kind == "qemu" else
                       f"unable to destroy CT {vmid} - container is running")

        def work(task: _Task) -> None:
            self._pause()
            with self._lock:
                self._check_lock(guest)
                for volume in _disks(kind, guest.config).values():
                    task.log(f'  Logical volume "{volume.split(",")[0].split(":")[-1]}" successfully removed.')
                if call.get("purge"):
                    task.log(f"purging {'VM' if kind == 'qemu' else 'CT'} {vmid} from related configurations..")
                    for job in self._jobs:
                        if job.vmids is not None:
                            job.vmids = job.vmids - {vmid}
                del self._guests[vmid]

        return self._start_task(call, node, f"{'qm' if kind == 'qemu' else 'vz'}destroy", str(vmid), work)

    def _lxc_interfaces(self, call: _Call) -> list[dict[str, Any]] | None:
        guest = self._guest(call["node"], "lxc", call["vmid"])
        if guest.status != "running":
            return None
        result = [{"name": "lo", "hwaddr": "00:00:00:00:00:00", "hardware-address": "00:00:00:00:00:00",
                   "inet": "127.0.0.1/8", "inet6": "::1/128",
                   "ip-addresses": [{"ip-address": "127.0.0.1", "ip-address-type": "inet", "prefix": 8},
                                    {"ip-address": "::1", "ip-address-type": "inet6", "prefix": 128}]}]
        for i, (key, net) in enumerate(sorted((k, v) for k, v in guest.config.items() if re.fullmatch(r"net\d+", k))):
            mac = (_mac_of("lxc", net) or "").lower()
            addresses = self._addresses(guest.agent_ip if i == 0 else [], v4="inet", v6="inet6")
            entry: dict[str, Any] = {"name": _option(net, "name") or f"eth{i}", "hwaddr": mac, "hardware-address": mac,
                                     "ip-addresses": addresses}
            for addr in addresses:
                entry[addr["ip-address-type"]] = f"{addr['ip-address']}/{addr['prefix']}"
            result.append(entry)
        return result

    @staticmethod
    def _addresses(cidrs: Iterable[str], v4: str, v6: str) -> list[dict[str, Any]]:
        result = []
        for cidr in cidrs:
            ip, _, prefix = cidr.partition("/")
            is_v6 = ":" in ip
            result.append({"ip-address": ip, "ip-address-type": v6 if is_v6 else v4,
                           "prefix": int(prefix or (128 if is_v6 else 32))})
        return result

    def _agent(self, call: _Call, command: str) -> dict[str, Any]:
        guest = self._guest(call["node"], "qemu", call["vmid"])
        if "agent" not in guest.config:
            raise _die("No QEMU guest agent configured")
        if guest.status != "running":
            raise _die(f"VM {guest.vmid} is not running")
        if not re.match(r"(enabled=)?1", guest.config["agent"]) or not self._agent_ready(guest):
            raise _die("QEMU guest agent is not running")
        if command == "ping":
            return {"result": {}}
        stats = {"rx-bytes": 0, "rx-dropped": 0, "rx-errs": 0, "rx-packets": 0,
                 "tx-bytes": 0, "tx-dropped": 0, "tx-errs": 0, "tx-packets": 0}
        interfaces = [{"name": "lo", "hardware-address": "00:00:00:00:00:00", "statistics": stats,
                       "ip-addresses": self._addresses(["127.0.0.1/8", "::1/128"], v4="ipv4", v6="ipv6")}]
        nets = sorted(((int(k[3:]), v) for k, v in guest.config.items() if re.fullmatch(r"net\d+", k)))
        for i, (_, net) in enumerate(nets):
            interfaces.append({"name": f"eth{i}", "hardware-address": (_mac_of("qemu", net) or "").lower(),
                               "statistics": stats,
                               "ip-addresses": self._addresses(guest.agent_ip if i == 0 else [], v4="ipv4", v6="ipv6")})
        return {"result": interfaces}

    # -- snapshots --
    def _snapshot_list(self, call: _Call, kind: str) -> list[dict[str, Any]]:
        guest = self._guest(call["node"], kind, call["vmid"])
        result = []
        for name, snap in guest.snapshots.items():
            entry: dict[str, Any] = {"name": name, "snaptime": int(snap.get("snaptime", "0")),
                                     "description": snap.get("description", "")}
            if kind == "qemu":
                entry["vmstate"] = int(snap.get("vmstate", "0"))
            if snap.get("parent"):
                entry["parent"] = snap["parent"]
            result.append(entry)
        current: dict[str, Any] = {"name": "current", "description": "You are here!",
                                   "digest": hashlib.sha1(config_text(guest.config, guest.snapshots).encode()).hexdigest()}
        if kind == "qemu":
            current["running"] = int(guest.status == "running")
        if guest.config.get("parent"):
            current["parent"] = guest.config["parent"]
        return result + [current]

    def _snapshot(self, call: _Call, kind: str) -> str:
        node, vmid, name = call["node"], call["vmid"], call["snapname"]
        guest = self._guest(node, kind, vmid)
        if name in {"current", "pending"}:
            raise _die(f"unable to use snapshot name '{name}' (reserved name)")

        def work(task: _Task) -> None:
            with self._lock:
                if guest.config.get("template") == "1":
                    raise _die("you can't take a snapshot if it's a template")
                self._check_lock(guest)
                if name in guest.snapshots:
                    raise _die(f"snapshot name '{name}' already used")
                guest.config["lock"] = "snapshot"
                if kind == "qemu" and call.get("vmstate") and guest.status == "running":
                    task.log("saving VM state and RAM using storage 'local-lvm'")
            self._pause()
            with self._lock:
                del guest.config["lock"]
                snap = {k: v for k, v in guest.config.items() if k != "description"}
                snap["snaptime"] = str(int(self.now()))
                if call.get("description"):
                    snap["description"] = call["description"]
                if kind == "qemu" and call.get("vmstate") and guest.status == "running":
                    snap["vmstate"] = "1"
                guest.snapshots[name] = snap
                guest.config["parent"] = name

        return self._start_task(call, node, f"{'qm' if kind == 'qemu' else 'vz'}snapshot", str(vmid), work)

    def _delsnapshot(self, call: _Call, kind: str) -> str:
        node, vmid, name = call["node"], call["vmid"], call["snapname"]
        guest = self._guest(node, kind, vmid)

        def work(task: _Task) -> None:
            self._pause()
            with self._lock:
                if name not in guest.snapshots:
                    raise _die(f"snapshot '{name}' does not exist")
                self._check_lock(guest)
                parent = guest.snapshots.pop(name).get("parent")
                for conf in [guest.config, *guest.snapshots.values()]:
                    if conf.get("parent") == name:
                        conf.pop("parent")
                        if parent:
                            conf["parent"] = parent

        return self._start_task(call, node, f"{'qm' if kind == 'qemu' else 'vz'}delsnapshot", str(vmid), work)

    def _rollback(self, call: _Call, kind: str) -> str:
        node, vmid, name = call["node"], call["vmid"], call["snapname"]
        guest = self._guest(node, kind, vmid)

        def work(task: _Task) -> None:
            with self._lock:
                if name not in guest.snapshots:
                    raise _die(f"snapshot '{name}' does not exist")
                self._check_lock(guest)
                guest.config["lock"] = "rollback"
                guest.status = "stopped"
            self._pause()
            with self._lock:
                snap = guest.snapshots[name]
                description = guest.config.get("description")  # the guest's notes are not part of a snapshot
                guest.config = {k: v for k, v in snap.items() if k not in {"snaptime", "vmstate", "description"}}
                if description is not None:
                    guest.config["description"] = description
                guest.config["parent"] = name
                if snap.get("vmstate") == "1" or call.get("start"):
                    self._start_guest(guest)

        return self._start_task(call, node, f"{'qm' if kind == 'qemu' else 'vz'}rollback", str(vmid), work)

    # -- restore --
    def _restore_access(self, call: _Call, vmid: int, force: bool, storage_first: bool) -> None:
        """create_vm's checks before anything is read: the pool, (for VMs first) the target storage, and
        VM.Allocate on the VMID or the pool, or, to overwrite with ``force``, VM.Backup on the VMID."""
        token, pool = call.token, call.get("pool")
        if pool is not None and not any(g.pool == pool for g in self._guests.values()):
            raise _perm_error(f"pool '{pool}' does not exist")
        if storage_first and call.get("storage") is not None:
            self._check(token, f"/storage/{call['storage']}", ["Datastore.AllocateSpace"])
        existing = self._guests.get(vmid)
        if not (self._has(token, f"/vms/{vmid}", "VM.Allocate")
                or pool and self._has(token, f"/pool/{pool}", "VM.Allocate")
                or force and existing is not None and existing.node == call["node"]
                and self._has(token, f"/vms/{vmid}", "VM.Backup")):
            raise _perm_error()

    def _archive_for_restore(self, call: _Call, volid: str, vmid: int) -> tuple[Path, ArchiveName]:
        if not re.fullmatch(r"[^:/]+:.+", volid):
            raise _die("Only root can pass arbitrary filesystem paths.")
        _, path, archive = self._backup_volume(call["node"], volid, call.token, vmid)
        return path, archive

    def _lock_for_restore(self, call: _Call, kind: str, vmid: int, emsg: str) -> tuple[_Guest, bool]:
        """create_and_lock_config: the guest to restore into, locked 'create' (a new, empty one for a free VMID)."""
        existing = self._guests.get(vmid)
        try:
            if existing is not None and not (call.get("force") and existing.node == call["node"] and existing.kind == kind):
                self._check_vmid_unused(vmid)
            if existing is not None:
                self._set_lock(existing, "create")
                return existing, False
        except ApiError as err:
            raise _die(f"{emsg} {err.message.strip()}") from None
        placeholder = _Guest(vmid, kind, call["node"], {"lock": "create"})
        self._guests[vmid] = placeholder
        return placeholder, True

    @staticmethod
    def _overrides(call: _Call, keys: set[str]) -> dict[str, str]:
        """Config options given with the restore, which replace the archive's."""
        return {k: str(int(v) if isinstance(v, bool) else v) for k, v in call.params.items()
                if k in keys or re.fullmatch(r"net\d+", k)}

    def _restore_qemu(self, call: _Call) -> str:
        node, vmid, volid = call["node"], call["vmid"], call.get("archive")
        if volid is None:
            raise _die("the simulator creates VMs only by restoring an archive (parameter 'archive')")
        self._restore_access(call, vmid, bool(call.get("force")), storage_first=True)
        path, archive = self._archive_for_restore(call, volid, vmid)
        emsg = f"unable to restore VM {vmid} -"
        guest, _ = self._lock_for_restore(call, "qemu", vmid, emsg)
        overrides = self._overrides(call, {"name", "memory", "description", "tags", "onboot", "cores"})

        def work(task: _Task) -> None:
            try:
                with self._lock:
                    if guest.status == "running":
                        raise _die(f"{emsg} vm is running")
                if archive.kind != "qemu":
                    raise _die(f"ERROR: file '{path}' does not look like a QemuServer vzdump backup")
                tmp = f"/var/tmp/vzdumptmp{task.pid}"
                decompress = dict(zst="zstd -q -d -c", gz="zcat", lzo="lzop -d -c").get(archive.comp or "")
                command = f"{decompress} {path} | vma extract -v -r {tmp}.fifo - {tmp}" if decompress else \
                    f"vma extract -v -r {tmp}.fifo {path} {tmp}"
                task.log(f"restore vma archive: {command}")
                try:
                    header = read_archive(path, "qemu", archive.comp, whole=False)
                except ArchiveError as exc:
                    raise _die(f"command '{command}' failed: {exc}") from None
                disks = _disks("qemu", parse_config(header.config))
                task.log(f"CFG: size: {len(header.config)} name: qemu-server.conf")
                for n, key in enumerate(sorted(disks), 1):
                    task.log(f"DEV: dev_id={n} size: {_size_bytes(_option(disks[key], 'size') or '0')} devname: drive-{key}")
                task.log(f"CTIME: {time.asctime(time.gmtime(archive.ctime))}")
                with self._lock:
                    config = self._restored_config("qemu", vmid, header.config, call, overrides, task)
                    guest.config = {"memory": "128", "lock": "create"}  # qmrestore's interim config, old disks gone
                self._pause()
                try:
                    contents = read_archive(path, "qemu", archive.comp, whole=True)
                except ArchiveError as exc:
                    raise _die(f"command '{command}' failed: {exc}") from None
                task.log(f"progress 100% (read {contents.data_size} bytes, duration 1 sec)")
                task.log(f"total bytes read {contents.data_size}, sparse bytes 0 (0%)")
                task.log("space reduction due to 4K zero blocks 0%")
                task.log("rescan volumes...")
                with self._lock:
                    self._become(guest, config, contents, call)
                    if call.get("start"):
                        task.log("Execute autostart")
                        self._start_guest(guest)
            except ApiError:
                with self._lock:
                    guest.config.pop("lock", None)
                    task.log(f"error before or during data restore, some or all disks were not completely "
                             f"restored. VM {vmid} state is NOT cleaned up.")
                raise

        return self._start_task(call, node, "qmrestore", str(vmid), work)

    def _become(self, guest: _Guest, config: dict[str, str], contents: ArchiveContents, call: _Call) -> None:
        """The restored guest: the archive's config and data (and the agent's addresses its source had)."""
        guest.config, guest.snapshots, guest.status = config, {}, "stopped"
        guest.agent_ip, guest.disk_bytes = list(contents.guest_info.get("agent_ip", [])), contents.data_size
        guest.pool = call.get("pool", guest.pool)

    def _restored_config(self, kind: str, vmid: int, text: str, call: _Call, overrides: dict[str, str],
                         task: _Task) -> dict[str, str]:
        """restore_update_config_line / LXC's restore_configuration: volumes allocated on the target storage
        (checked as parse_backup_hints does), new MACs with ``unique``, then the given options on top."""
        config = {k: v for k, v in parse_config(text).items()
                  if k not in {"lock", "parent"} and not k.startswith("unused")}
        for n, (key, volume) in enumerate(sorted(_disks(kind, config).items())):
            storage = call.get("storage") or volume.split(":", 1)[0]
            if kind == "qemu":
                if "images" not in self._storage(call["node"], storage).content:
                    raise _die(f"Content type 'images' is not available on storage '{storage}'")
                self._check(call.token, f"/storage/{storage}", ["Datastore.AllocateSpace"])
            new = f"{storage}:vm-{vmid}-disk-{n}"
            options = [o for o in volume.split(",")[1:] if not o.startswith("format=")]
            config[key] = ",".join([new, *options])
            if kind == "qemu":
                task.log(f"new volume ID is '{new}'")
        if call.get("unique"):
            for key, net in list(config.items()):
                old = _mac_of(kind, net) if re.fullmatch(r"net\d+", key) else None
                if old:
                    config[key] = net.replace(old, _random_mac())
        if config.get("vmgenid", "0") != "0":  # qmrestore always draws a new VM generation ID
            config["vmgenid"] = str(uuid.uuid4())
        config.update(overrides)
        return config

    def _restore_lxc(self, call: _Call) -> str:
        node, vmid, volid = call["node"], call["vmid"], call["ostemplate"]
        if not call.get("restore"):
            raise _die("the simulator creates containers only by restoring a backup (parameters 'ostemplate', 'restore')")
        existing = self._guests.get(vmid)
        if not (existing is not None and existing.node == node and existing.kind == "lxc" and call.get("force")):
            self._check_vmid_unused(vmid)
        elif existing.status == "running":
            raise _die("can't overwrite running container")
        self._restore_access(call, vmid, bool(call.get("force")), storage_first=False)
        path, archive = self._archive_for_restore(call, volid, vmid)
        storage = call.params.setdefault("storage", "local")
        if "rootdir" not in self._storage(node, storage).content:
            raise _param_error({"storage": f"storage '{storage}' does not support container directories"})
        self._check(call.token, f"/storage/{storage}", ["Datastore.AllocateSpace"])
        guest, new = self._lock_for_restore(call, "lxc", vmid, f"unable to restore CT {vmid} -")
        overrides = self._overrides(call, {"hostname", "memory", "description", "tags", "onboot", "cores"})

        def work(task: _Task) -> None:
            try:
                task.log(f"recovering backed-up configuration from '{volid}'")
                try:
                    if archive.kind != "lxc":
                        raise ArchiveError("ERROR: archive contains no configuration file")
                    header = read_archive(path, "lxc", archive.comp, whole=False)
                except ArchiveError as exc:
                    raise _die(str(exc)) from None
                with self._lock:
                    config = self._restored_config("lxc", vmid, header.config, call, overrides, task)
                task.log(f"restoring '{volid}' now..")
                task.log(f"extracting archive '{path}'")
                self._pause()
                try:
                    contents = read_archive(path, "lxc", archive.comp, whole=True)
                except ArchiveError as exc:
                    raise _die(f"command 'tar xpf - --totals --one-file-system -p --sparse --numeric-owner --acls "
                               f"--xattrs -C /var/lib/lxc/{vmid}/rootfs --skip-old-files --anchored' failed: {exc}") from None
                task.log(f"Total bytes read: {contents.data_size} ({contents.data_size / (1 << 20):.1f}MiB)")
                task.log("Detected container architecture: amd64")
                task.log("merging backed-up and given configuration..")
                with self._lock:
                    self._become(guest, config, contents, call)
                    if call.get("start"):
                        self._start_guest(guest)
            except ApiError:
                with self._lock:
                    if new:  # a failed restore into a new VMID removes its config again
                        self._guests.pop(vmid, None)
                    else:
                        guest.config.pop("lock", None)
                raise

        return self._start_task(call, node, "vzrestore", str(vmid), work)


def serve_demo(workdir: Path, state_file: Path) -> None:
    """``python -m tests.simulators.proxmox DIR STATE``: the demo's Proxmox cluster, until SIGTERM or SIGINT.

    Two nodes sharing a backup storage under DIR (as an NFS or Proxmox Backup Server storage would be
    shared), a VM "web" whose agent reports 127.0.0.2 with a TCP service there, and a token with the
    privileges docs/proxmox.md lists; the address, CA, token and the service's port go to STATE (0600).
    """
    import signal
    import socket as socket_mod

    sim = ProxmoxSimulator(task_seconds=0.5).start()
    try:
        sim.add_storage("proxmox-node1", "backup", workdir / "backup", shared=True)
        sim.add_guest("proxmox-node1", 100, "qemu", name="web", agent_ip=["127.0.0.2/8"],
                      config={"name": "web", "memory": "2048", "cores": "2", "agent": "1", "ostype": "l26",
                              "scsi0": "local-lvm:vm-100-disk-0,size=8G", "boot": "order=scsi0",
                              "net0": "virtio=BC:24:11:00:01:00,bridge=vmbr0,firewall=1"})
        privileges = {"VM.Audit", "VM.Backup", "VM.Snapshot", "VM.Allocate", "VM.PowerMgmt", "VM.Monitor", "VM.Config.Network",
                      "VM.Config.Disk", "VM.Config.CPU", "VM.Config.Memory", "VM.Config.Options"}
        secret = sim.add_token("backup@pve", "luxima", {
            "/vms": privileges, "/storage/backup": {"Datastore.Audit", "Datastore.AllocateSpace", "Datastore.Allocate"},
            "/storage/local-lvm": {"Datastore.AllocateSpace"}, "/sdn/zones/localnetwork": {"SDN.Audit"}, "/": {"Sys.Audit"}})
        service = socket_mod.create_server(("127.0.0.2", 0))  # the guest's web port, for the connectivity check
        service.settimeout(0.5)
        partial = state_file.with_suffix(".partial")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump({"url": sim.url, "ca_path": str(sim.ca_path), "token_id": "backup@pve!luxima", "token_secret": secret,
                       "service_port": service.getsockname()[1]}, out)
        os.replace(partial, state_file)  # whole, or not there
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        while not stop.is_set():
            try:
                conn, _ = service.accept()
                conn.close()
            except OSError:
                pass
        service.close()
    finally:
        sim.stop()


if __name__ == "__main__":
    serve_demo(Path(sys.argv[1]), Path(sys.argv[2]))
