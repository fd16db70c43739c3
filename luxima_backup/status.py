"""Where every backup target stands, from the manifests in storage alone: the last good backup against the RPO.

A target is a database section, a file source, a config host or a Proxmox guest: those configured
(even if never backed up: that is the worst status of all) and those with backups in storage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from . import runtime
from .settings import Settings

COMPONENTS = ("db", "files", "configs", "vm")


@dataclass
class TargetStatus:
    component: str
    target: str
    last_success: datetime | None
    age_hours: float | None
    rpo_hours: float | None
    beyond_rpo: bool
    last_verified: datetime | None
    kept: int
    bytes_stored: int
    chain_length: int | None
    oldest_kept: datetime | None
    locked_until: datetime | None
    unreadable: int
    reverified_at: datetime | None = None  # the last verify-stored read of any of its backups
    damaged: int = 0  # kept backups the last reads found damaged
    without_recovery: int = 0  # kept backups not sealed to the configured recovery key (`keys rewrap` seals them)

    def as_json(self) -> dict[str, Any]:
        return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in asdict(self).items()}


def configured(settings: Settings) -> dict[str, set[str]]:
    """The targets the settings back up (VMs by name when named: vmids and pools resolve only on the cluster)."""
    return {"db": {settings.db_backup.database}, "files": set(settings.files_backup.sources),
            "configs": set(settings.configs.hosts),
            "vm": {str(g) for g in settings.vm_backup.guests if not str(g).isdigit()}}


def collect(settings: Settings, now: datetime) -> list[TargetStatus]:
    out = []
    recovery_id = runtime.recovery_key_id(settings)
    for component in COMPONENTS:
        store, prefix = runtime.location(component, settings)
        backups, bad = runtime.catalog(component, settings).by_target(component)
        unreadable: dict[str, int] = {}
        for u in bad:
            unreadable[u.folder] = unreadable.get(u.folder, 0) + 1
        window = settings.alerts.rpo.get(component)
        for name in sorted(set(backups) | configured(settings)[component] | set(unreadable)):
            found = backups.get(name, [])
            good = [b for b in found if b.verified]
            last = good[-1] if good else None
            age = (now - last.completed_at) if last else None
            verified_at = last.entry.verified_at if last is not None else None
            locked = None
            if last is not None and component != "vm":
                try:
                    locked = store.locked_until(last.data_key)
                except Exception:  # a report: an unreadable lock state is no lock state
                    locked = None
            record = _reverified(store, prefix, component, name)
            results = {k: v for k, v in record.get("results", {}).items() if any(b.backup_id == k for b in found)}
            out.append(TargetStatus(
                component=component, target=name,
                last_success=last.completed_at if last else None,
                age_hours=round(age.total_seconds() / 3600, 2) if age is not None else None,
                rpo_hours=round(window.total_seconds() / 3600, 2) if window else None,
                beyond_rpo=window is not None and (age is None or age > window),
                last_verified=verified_at,
                kept=len(found), bytes_stored=sum(b.entry.bytes_stored for b in found),
                chain_length=last.entry.chain_length if last is not None else None,
                oldest_kept=found[0].completed_at if found else None,
                locked_until=locked, unreadable=unreadable.get(name, 0),
                reverified_at=datetime.fromisoformat(record["checked_at"]) if record.get("checked_at") else None,
                damaged=sum(1 for r in results.values() if not r.get("ok", True)),
                without_recovery=sum(1 for b in found if b.entry.recovery_key_id != recovery_id) if recovery_id and component != "vm" else 0))
    return out


def _reverified(store: Any, prefix: str, component: str, target: str) -> dict[str, Any]:
    """What the last verify-stored runs found for this target (``<prefix>/_verify/<component>/<target>.json``)."""
    import json

    from .errors import ObjectNotFound

    try:
        with store.load(f"{prefix}/_verify/{component}/{target}.json") as f:
            doc = json.loads(f.read())
        return doc if isinstance(doc, dict) else {}
    except (ObjectNotFound, ValueError):
        return {}


def age_text(hours: float | None) -> str:
    if hours is None:
        return "never"
    return f"{hours / 24:.1f} d" if hours >= 48 else f"{hours:.1f} h"


def window_text(window: timedelta | None) -> str:
    return age_text(window.total_seconds() / 3600) if window else "-"


def drill_status(settings: Settings, now: datetime) -> Any:
    """The DR drills' status (last success, overdue) when a drill is configured ([dr.drill]), else None."""
    if settings.dr.drill is None:
        return None
    from .drills import status

    return status(runtime.store(settings), settings.storage.prefix, settings.dr.drill.overdue_days, now)


def drill_text(d: Any, now: datetime) -> str:
    last = d.last_success.strftime("%Y-%m-%d %H:%M") if d.last_success else "never"
    age = f" ({(now - d.last_success).days} days ago)" if d.last_success else ""
    return (f"DR drill: last successful {last}{age}; " + (f"OVERDUE (more than {d.overdue_days:g} days)" if d.overdue
                                                           else f"next due within {d.overdue_days:g} days of it")
            + ("; the last drill FAILED" if d.last_ok is False else ""))
