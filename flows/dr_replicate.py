"""The DR replication flow: the backups copied daily to the DR site, checked there, and the DR lag reported.

Per DR target (``[dr.targets.NAME]``: a second bucket or directory, or a directory on the DR node over
SSH with rsync) and component: every verified backup the target lacks (tasks/replicate.py), then the
target's own catalog index brought up to date. Deletions on the primary are never carried over: a
backup removed (or encrypted) there stays at the DR site, whose copies have their own retention. The
DR lag of every target is the age of its newest verified backup present at the DR site; past
``dr.rpo_hours`` (24 h, the procedure's RPO) the run fails, which alerts.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from luxima_backup import runtime
from luxima_backup.errors import BackupError, ConfigError
from luxima_backup.secrets import install_log_redaction, redact
from luxima_backup.status import configured
from flows.common import flow, logged
from tasks.log import log_run
from tasks.prune import prune_target, site_catalog, sweep
from tasks.replicate import dr_store, replicate
from tasks.vm_replicate import prune_dr_vm_archives, replicate_vm_archives


def dr_lag(target: str, components: list[str], now: datetime) -> list[dict[str, Any]]:
    """Per backup target, the newest verified backup present at the DR target and its age (the DR lag)."""
    settings = runtime.settings()
    store = dr_store(target, settings)
    rows = []
    try:
        for component in components:
            cat = runtime.catalog_at(store, runtime.location(component, settings)[1], settings)
            found, _ = cat.by_target(component)
            for name in sorted(set(found) | configured(settings)[component]):
                good = [b for b in found.get(name, []) if b.verified]
                newest = good[-1].completed_at if good else None
                lag = (now - newest).total_seconds() / 3600 if newest else None
                rows.append({"target": target, "component": component, "source": name,
                             "newest_at_dr": newest.isoformat(timespec="seconds") if newest else "none",
                             "lag_hours": round(lag, 2) if lag is not None else None, "copies": len(found.get(name, [])),
                             "within_rpo": lag is not None and lag <= settings.dr.rpo_hours})
    finally:
        close = getattr(store, "close", None)
        if close is not None:
            close()
    return rows


@flow(name="dr-replicate", validate_parameters=True, persist_result=True)
def dr_replicate(targets: list[str] | None = None, components: list[str] | None = None) -> dict[str, Any]:
    """Copy the backups to the DR site ([dr.targets.*]) and the VMs' archives to the DR node ([dr.vm]), checked at
    both ends; report the DR lag of every target.

    Args:
        targets: which [dr.targets.NAME] (default: all).
        components: db, files, configs, vm (default: dr.components, and vm when [dr.vm] is set).
    """
    with runtime.time_limit(lambda s: s.dr.timeout_seconds, "dr-replicate"):
        settings = runtime.settings()
        install_log_redaction()
        logger = get_run_logger()
        names = list(targets or sorted(settings.dr.targets))
        if not names:
            raise ConfigError("no DR target is configured", hint="add a [dr.targets.NAME] (kind = 'storage' or 'ssh')")
        unknown = [n for n in names if n not in settings.dr.targets]
        if unknown:
            raise ConfigError(f"no DR target {unknown}", hint=f"configured: {sorted(settings.dr.targets)}")
        chosen = list(components or settings.dr.components)
        started, t0 = datetime.now(timezone.utc), time.monotonic()
        rows: list[dict[str, Any]] = []
        errors: list[str] = []
        lags: list[dict[str, Any]] = []
        at_dr: list[str] | None = None
        if settings.dr.vm is not None and (components is None or "vm" in components):
            vm = replicate_vm_archives(return_state=True)  # the archives first: a VM manifest goes only where its archive is
            if vm.is_completed():
                rows += vm.result()["rows"]
                at_dr = vm.result()["at_dr"]
                errors += [f"{r['target']}: vm {r['backup']} refused: {r['why']}" for r in vm.result()["rows"]
                           if r["action"] == "refused"]
            else:
                errors.append(f"VM archives to {settings.dr.vm.target_host}: {redact(str(vm.result(raise_on_failure=False)))}")
            chosen = [c for c in chosen if c != "vm"] + ["vm"]
        for name in names:
            target_rows: list[dict[str, Any]] = []
            target_errors: list[str] = []
            for component in chosen:
                if component == "vm" and at_dr is None:
                    continue
                # one target or component failing: the others go on
                state = replicate(name, component, at_dr if component == "vm" else None, return_state=True)
                if state.is_completed():
                    target_rows += state.result()["rows"]
                else:
                    target_errors.append(f"{name}/{component}: {redact(str(state.result(raise_on_failure=False)))}")
            target_errors += [f"{name}: {r['component']} {r['backup']} refused: {r['why']}" for r in target_rows
                              if r["action"] == "refused"]
            pruned, prune_errors = _prune_dr(name, [c for c in chosen if c != "vm"])
            target_rows += pruned
            target_errors += prune_errors
            try:
                target_lags = dr_lag(name, chosen, datetime.now(timezone.utc))
            except BackupError as exc:
                target_lags = []
                target_errors.append(f"{name}: the DR lag could not be read: {exc}")
            late = [r for r in target_lags if not r["within_rpo"]]
            target_errors += [f"{name}: {r['component']}/{r['source']} is {r['lag_hours'] if r['lag_hours'] is not None else 'never'}"
                              f"{' h' if r['lag_hours'] is not None else ''} behind at the DR site (RPO {settings.dr.rpo_hours:g} h)"
                              for r in late]
            rows += target_rows
            lags += target_lags
            errors += target_errors
            _log(settings, name, started, target_rows, target_lags, target_errors, t0)
        if at_dr is not None:  # the DR node's archives: the primary's rule, on the DR site's own catalog
            pruned = prune_dr_vm_archives(names, return_state=True)
            if pruned.is_completed():
                rows += [{"target": r["target"], "component": "vm", "source": r["source"], "backup": r["backup_id"] or r["volid"],
                          "action": f"prune: {r['action']}", "bytes": 0, "why": r["why"]}
                         for r in pruned.result() if r["action"] != "kept"]
                errors += [f"{r['target']}: vm {r['volid']}: {r['why']}" for r in pruned.result() if r["action"] == "removal failed"]
            else:
                errors.append(f"retention of the VM archives on the DR node: {redact(str(pruned.result(raise_on_failure=False)))}")
        _publish(rows, lags, errors)
        copied = [r for r in rows if r["action"] == "copied"]
        summary = {"targets": names, "copied": len(copied), "bytes": sum(r["bytes"] for r in copied),
                   "present": sum(r["action"] == "present" for r in rows),
                   "refused": sum(r["action"] == "refused" for r in rows), "lag": lags,
                   "rows": [{k: r.get(k) for k in ("target", "component", "source", "backup", "action", "bytes")} for r in rows],
                   "seconds": round(time.monotonic() - t0, 3)}
        logger.info("DR replication: %d backup(s) copied (%d bytes), %d already there, %d refused",
                    summary["copied"], summary["bytes"], summary["present"], summary["refused"])
        if errors:
            raise BackupError(f"DR replication: {len(errors)} problem(s): " + "; ".join(errors[:5]),
                              hint="the run's artifacts list every backup and target; what was copied and checked stays")
        return summary


def _prune_dr(site: str, components: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """The DR copies' retention, on the DR target's own catalog: the primary's rules and interlocks (only verified
    backups count, the newest is kept, a target past its RPO is held), then the sweep of what cut runs left there."""
    settings = runtime.settings()
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    for component in components:
        cat = site_catalog(component, site, settings)
        cat.refresh(component)
        found, _ = cat.by_target(component)
        for target in sorted(found):
            state = prune_target(component, target, False, False, site, return_state=True)
            if not state.is_completed():
                errors.append(f"{site}: prune of {component}/{target}: {redact(str(state.result(raise_on_failure=False)))}")
                continue
            result = state.result()
            rows += [{"target": site, "component": component, "source": target, "backup": r["backup"],
                      "action": f"prune: {r['action']}", "bytes": 0, "why": r["why"]}
                     for r in result["rows"] if r["action"] != "keep"]
            errors += [f"{site}: {r['backup']}: {r['why']}" for r in result["rows"] if r["action"] == "removal failed"]
        swept = sweep(component, False, site, return_state=True)
        if swept.is_completed():
            rows += [{"target": site, "component": component, "source": None, "backup": r["backup"],
                      "action": f"sweep: {r['action']}", "bytes": 0, "why": r["why"]} for r in swept.result()]
    return rows, errors


def _log(settings: Any, target: str, started: datetime, rows: list[dict[str, Any]], lags: list[dict[str, Any]],
         errors: list[str], t0: float) -> None:
    if not settings.log.enabled:
        return
    moved = [r for r in rows if r["action"] != "present"]
    logged(log_run, "replicate", "replicate", "storage", target, target, "failed" if errors else "success", started,
           None, None, str(flow_run.id) if flow_run.id else None, "; ".join(errors)[:2000] or None,
           {"copied": moved[:500], "lag": lags, "seconds": round(time.monotonic() - t0, 3)}, {})


def _publish(rows: list[dict[str, Any]], lags: list[dict[str, Any]], errors: list[str]) -> None:
    if lags:
        create_table_artifact(key="dr-lag", table=lags, description="DR lag: the newest verified backup at each DR target")
    moved = [{k: r.get(k) for k in ("target", "component", "source", "backup", "action", "bytes", "why")}
             for r in rows if r["action"] != "present"]
    if moved:
        create_table_artifact(key="dr-replicate", table=moved, description="Backups copied to (or refused for) the DR site")
    lines = ["## DR replication", "", f"{sum(r['action'] == 'copied' for r in rows)} backup(s) copied, "
             f"{sum(r['action'] == 'present' for r in rows)} already at the DR site, "
             f"{sum(r['action'] == 'refused' for r in rows)} refused", "",
             "| DR target | component | target | newest at DR | lag (h) | within RPO |", "|---|---|---|---|---:|---|",
             *[f"| {r['target']} | {r['component']} | {r['source']} | {r['newest_at_dr']} | {r['lag_hours']} | "
               f"{'yes' if r['within_rpo'] else '**no**'} |" for r in lags]]
    if errors:
        lines += ["", "**Problems**", "", *[f"- {e}" for e in errors[:30]]]
    create_markdown_artifact(key="dr-replicate-summary", markdown=redact("\n".join(lines)), description="DR replication")
