"""The DR drills' evidence: each drill's report, JSON and markdown, kept under ``<prefix>/_drills/<year>/``.

Outside every component's folder, so no retention or sweep ever removes them (an auditor asks for years of
drills). The newest successful one says whether the next drill is overdue (``dr.drill.overdue_days``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .errors import BackupError, ObjectNotFound
from .storage import ObjectStore

log = logging.getLogger(__name__)

FOLDER = "_drills"


def report_keys(prefix: str, started: datetime) -> tuple[str, str]:
    """Where a drill started at ``started`` keeps its report: (JSON, markdown)."""
    base = f"{prefix}/{FOLDER}/{started:%Y}/dr-drill-{started:%Y%m%dT%H%M%SZ}"
    return f"{base}.json", f"{base}.md"


def save_report(store: ObjectStore, prefix: str, started: datetime, report: dict[str, Any], markdown: str) -> list[str]:
    """Both forms of a drill's report; the JSON last (it is what ``last_success`` reads)."""
    json_key, md_key = report_keys(prefix, started)
    store.save_bytes(md_key, markdown.encode(), "text/markdown")
    store.save_bytes(json_key, json.dumps(report, indent=2, sort_keys=True, default=str).encode(), "application/json")
    return [json_key, md_key]


def reports(store: ObjectStore, prefix: str) -> list[dict[str, Any]]:
    """Every drill report kept (a few a year), oldest first; one that cannot be read is logged and left out."""
    out = []
    for info in store.list(f"{prefix}/{FOLDER}/"):
        if not info.key.endswith(".json"):
            continue
        try:
            with store.load(info.key) as body:
                doc = json.loads(body.read())
            doc["started_at"] = datetime.fromisoformat(str(doc["started_at"]))
        except ObjectNotFound:
            continue
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("drill report %s cannot be read: %s", info.key, exc)
            continue
        out.append({**doc, "key": info.key})
    return sorted(out, key=lambda d: d["started_at"])


@dataclass(frozen=True)
class DrillStatus:
    last_success: datetime | None
    last_run: datetime | None
    last_ok: bool | None
    overdue_days: float
    overdue: bool

    def as_json(self) -> dict[str, Any]:
        return {"last_success": self.last_success.isoformat() if self.last_success else None,
                "last_run": self.last_run.isoformat() if self.last_run else None, "last_ok": self.last_ok,
                "overdue_days": self.overdue_days, "overdue": self.overdue}


def status(store: ObjectStore, prefix: str, overdue_days: float, now: datetime) -> DrillStatus:
    """The last drill and the last successful one; overdue when none succeeded within ``overdue_days`` (none ever: overdue,
    there is no evidence the DR site works)."""
    try:
        found = reports(store, prefix)
    except BackupError as exc:
        log.warning("the drill reports cannot be listed: %s", exc)
        found = []
    good = [d for d in found if d.get("ok")]
    last_success = good[-1]["started_at"] if good else None
    overdue = last_success is None or (now - last_success).total_seconds() > overdue_days * 86400
    return DrillStatus(last_success, found[-1]["started_at"] if found else None, found[-1].get("ok") if found else None,
                       overdue_days, overdue)
