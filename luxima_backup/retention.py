"""Which backups of one target to keep, and why: the plan a prune carries out (pure: no storage, no clock).

The rules, in order, each a reason recorded for every backup:

* only **verified** backups count: anything else never keeps or displaces a good one;
* ``keep_last`` / ``keep_daily`` / ``keep_weekly`` / ``keep_monthly`` as Proxmox Backup Server's prune
  options: newest first, each option only over backups no earlier option kept, one per period (a
  period without a backup does not count), in the given time zone;
* everything completed within ``keep_days`` (the procedure's 30 or 90 days) is kept;
* the **newest verified** backup is always kept, whatever its age;
* a **chain** (an incremental file backup reads the archives of the backups before it, back to the
  full one): a backup whose archive a kept backup still reads is kept too; so a chain goes whole;
* **interlocks**: a target whose newest verified backup is older than its RPO window is not pruned at
  all (its backups are failing: keep everything, and say so); a plan that would remove more than
  ``max_delete_percent`` of a target's backups is refused unless forced.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Callable, Sequence
from zoneinfo import ZoneInfo


@dataclass(frozen=True)
class Policy:
    keep_days: int | None = None
    keep_last: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0


@dataclass(frozen=True)
class Item:
    """One backup of a target, as the plan sees it."""

    backup_id: str
    completed_at: datetime
    verified: bool
    needs: frozenset[str] = frozenset()  # backup ids whose objects this one reads (its chain)


@dataclass
class Decision:
    backup_id: str
    completed_at: datetime
    keep: bool
    why: str


@dataclass
class Plan:
    target: str
    decisions: list[Decision] = field(default_factory=list)  # newest first
    held: str | None = None  # why nothing of this target is removed, when an interlock holds it

    @property
    def remove(self) -> list[Decision]:
        return [] if self.held else [d for d in self.decisions if not d.keep]


def plan(target: str, items: Sequence[Item], policy: Policy, now: datetime, rpo: timedelta | None,
         tz: str = "Asia/Jakarta", max_delete_percent: float = 50, force: bool = False) -> Plan:
    """Decide each backup of one target (``items`` in any order)."""
    ordered = sorted(items, key=lambda i: (i.completed_at, i.backup_id), reverse=True)
    why: dict[str, str] = {}
    verified = [i for i in ordered if i.verified]
    zone = ZoneInfo(tz)
    periods: list[tuple[int, str, Callable[[datetime], str]]] = [
        (policy.keep_last, "keep_last", lambda t: t.isoformat()),
        (policy.keep_daily, "keep_daily", lambda t: t.astimezone(zone).strftime("%Y-%m-%d")),
        (policy.keep_weekly, "keep_weekly", lambda t: "%d-W%02d" % t.astimezone(zone).isocalendar()[:2]),
        (policy.keep_monthly, "keep_monthly", lambda t: t.astimezone(zone).strftime("%Y-%m")),
    ]
    for keep, name, period in periods:
        if keep:
            _mark(verified, keep, name, period, why)
    if policy.keep_days is not None:
        cutoff = now - timedelta(days=policy.keep_days)
        for i in verified:
            if i.completed_at >= cutoff:
                why.setdefault(i.backup_id, f"within {policy.keep_days} days")
    if verified:
        why.setdefault(verified[0].backup_id, "the newest verified backup: always kept")
    # a kept backup keeps what it reads; repeated, since a kept chain member reads further back
    changed = True
    while changed:
        changed = False
        for i in ordered:
            if i.backup_id in why:
                for needed in i.needs - {i.backup_id}:
                    if needed not in why and any(o.backup_id == needed for o in ordered):
                        why[needed] = f"read by {i.backup_id} (its chain)"
                        changed = True
    result = Plan(target, [Decision(i.backup_id, i.completed_at, i.backup_id in why,
                                    why.get(i.backup_id) or ("not verified" if not i.verified else "outside the policy"))
                           for i in ordered])
    if rpo is not None and (not verified or now - verified[0].completed_at > rpo):
        age = "none verified" if not verified else f"the newest verified is {_age(now - verified[0].completed_at)} old"
        result.held = f"not pruned: {age}, beyond the RPO window of {_age(rpo)}; its backups are failing"
    elif ordered and not force:
        share = 100 * len(result.remove) / len(ordered)
        if share > max_delete_percent:
            result.held = (f"not pruned: it would remove {len(result.remove)} of {len(ordered)} backups ({share:.0f}%), "
                           f"more than max_delete_percent = {max_delete_percent:g}; run with force to allow it")
    return result


def _mark(verified: list[Item], keep: int, name: str, period: Callable[[datetime], str], why: dict[str, str]) -> None:
    """One PBS prune option: newest first, over the backups not kept yet, the newest of each period, ``keep`` periods."""
    already = {period(i.completed_at) for i in verified if i.backup_id in why}
    chosen: set[str] = set()
    for i in verified:
        if i.backup_id in why:
            continue
        p = period(i.completed_at)
        if p in already or p in chosen:
            continue
        if len(chosen) >= keep:
            break
        chosen.add(p)
        why[i.backup_id] = f"{name} ({p})"


def _age(delta: timedelta) -> str:
    hours = delta.total_seconds() / 3600
    return f"{hours / 24:.1f} days" if hours >= 48 else f"{hours:.1f} h"
