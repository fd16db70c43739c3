"""The DR drill (1 January and 1 July, 02:00 WIB; also by hand): prove the DR site can bring the platform back.

From the DR copies only (``runtime.site``: the DR target is the only storage read; optionally the offline
recovery key is the only key), every component is restored at the DR site and checked as a real recovery
would be: each database into a scratch database on the DR PostgreSQL server (the db-restore flow: row
counts against the manifest, the application's login and queries), each file source into a scratch folder
(files-restore: md5 of every file), each host's configs into a scratch folder (checksums), each guest on
the DR node under a new id, isolated, with new MACs (vm-restore: network configuration, start, guest agent).
Each is timed from its start to verified (its RTO); the total is the drill's start to the last verified.
The achieved RPO of every DR target is the drill's start minus its newest verified backup.

One component failing never stops the others. The drill fails (and alerts) when any check failed, a target
misses the RPO or a component the RTO. Its report (markdown artifact; JSON and markdown under
``<prefix>/_drills/`` as evidence) lists every check, time and target. Everything it created is removed at
the end, also when it fails (unless ``keep``).
"""

from __future__ import annotations

import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from luxima_backup import drills, events, manifest, runtime
from luxima_backup.errors import BackupError, ConfigError, VerificationError
from luxima_backup.secrets import install_log_redaction, redact
from luxima_backup.settings import Settings
from luxima_backup.status import configured
from luxima_backup.workdir import private_dir
from flows.common import flow, logged
from flows.db_restore import db_restore
from flows.dr_replicate import dr_lag
from flows.files_restore import files_restore
from flows.vm_restore import vm_restore
from tasks.drill import drop_scratch_database, restore_configs_into, site_settings
from tasks.log import log_run
from tasks.replicate import dr_store


def _timed(component: str, target: str, run: Callable[[], Any], detail: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """One component restore of the drill, as a row of the report; its failure is the row's, never the drill's end."""
    t = time.monotonic()
    state = run()
    row: dict[str, Any] = {"component": component, "target": target, "rto_seconds": round(time.monotonic() - t, 3)}
    if state.is_completed():
        row.update(ok=True, **detail(state.result()))
    else:
        row.update(ok=False, error=redact(str(state.result(raise_on_failure=False)))[:1000])
    return row


def _failed(component: str, target: str, error: str) -> dict[str, Any]:
    return {"component": component, "target": target, "ok": False, "rto_seconds": 0.0, "error": error}


def _restore_all(settings: Settings, chosen: list[str], stamp: str, scratch: Path, keep: bool,
                 created_dbs: list[str]) -> list[dict[str, Any]]:
    """Every component's restores at the DR site (inside ``runtime.site``), each checked and timed."""
    drill = settings.dr.drill
    assert drill is not None
    targets = configured(settings)
    rows: list[dict[str, Any]] = []
    if "db" in chosen:
        for source in sorted(targets["db"]):
            if drill.database is None:
                rows.append(_failed("db", source, "dr.drill.database is not set: no DR PostgreSQL server to restore into"))
                continue
            dbname = f"luxima_drill_{stamp}_{manifest.safe_name(source)}"[:63]
            created_dbs.append(dbname)
            rows.append(_timed("db", source, lambda: db_restore(
                source=source, target=drill.database, target_database=dbname, mode="new", return_state=True,
                restore_globals_first=drill.roles == "from-backup", no_owner=drill.roles == "skip"),
                lambda r: {"backup_id": r["backup_id"], "checks": f"{r['checks_passed']} passed", "restored_into": dbname}))
    if "files" in chosen:
        for source in sorted(targets["files"]):
            dest = scratch / "files" / manifest.safe_name(source)
            rows.append(_timed("files", source, lambda: files_restore(destination=str(dest), source=source, return_state=True),
                               lambda r: {"backup_id": r["backup_id"], "checks": f"md5 of {r['md5_checked']} file(s)",
                                          "restored_into": str(dest)}))
    if "configs" in chosen:
        for host in sorted(targets["configs"]):
            dest = scratch / "configs" / manifest.safe_name(host)
            rows.append(_timed("configs", host, lambda: restore_configs_into(host, str(dest), return_state=True),
                               lambda r: {"backup_id": r["backup_id"], "checks": f"md5 of {r['files']} file(s)", "restored_into": str(dest)}))
    if "vm" in chosen:
        guests, _ = runtime.catalog("vm", settings).by_target("vm")
        for guest in sorted(set(guests) | targets["vm"]):
            if drill.node is None:
                rows.append(_failed("vm", guest, "dr.drill.node is not set: no DR node to restore guests on"))
                continue
            rows.append(_timed("vm", guest, lambda: vm_restore(guest=guest, target_node=drill.node, isolated=True,
                                                                 cleanup=not keep, return_state=True),
                               lambda r: {"backup_id": r.get("backup_id"), "checks": f"{r.get('checks')} passed",
                                          "restored_into": f"{r.get('node')}/{r.get('vmid')}",
                                          "removed": bool(r.get("removed"))}))
    return rows


@flow(name="dr-drill", validate_parameters=True, persist_result=True)
def dr_drill(target: str | None = None, components: list[str] | None = None, recovery_key: str | None = None,
             keep: bool = False) -> dict[str, Any]:
    """Restore every component at the DR site from the DR copies, check and time it, measure the RPO of every DR
    target, report, and remove what was restored.

    Args:
        target: the [dr.targets.NAME] to restore from (default: dr.drill.target, else the first by name).
        components: db, files, configs, vm (default: dr.drill.components).
        recovery_key: path (on the worker) of the offline recovery private key: restore with it alone, as if Vault were
            gone (the break-glass path); default: the configured key provider.
        keep: leave the scratch databases, folders and guests in place for inspection (remove them by hand).
    """
    with runtime.time_limit(lambda s: s.dr.drill.timeout_seconds if s.dr.drill else 6 * 3600, "dr-drill"):
        settings = runtime.settings()
        install_log_redaction()
        logger = get_run_logger()
        drill = settings.dr.drill
        if drill is None:
            raise ConfigError("no [dr.drill] section in the settings", hint="see docs/dr.md: the DR database server, "
                                                                             "the DR node and what to restore")
        if not settings.dr.targets:
            raise ConfigError("no DR target is configured", hint="add a [dr.targets.NAME]; the drill restores from it")
        name = target or drill.target or sorted(settings.dr.targets)[0]
        if name not in settings.dr.targets:
            raise ConfigError(f"no DR target {name!r}", hint=f"configured: {sorted(settings.dr.targets)}")
        chosen = list(components or drill.components)
        started, t0 = datetime.now(timezone.utc), time.monotonic()
        stamp = started.strftime("%Y%m%d%H%M%S")
        scratch = private_dir(drill.scratch_dir or settings.work_dir, "dr-drill-")
        derived, store = site_settings(settings, name, recovery_key)
        logger.info("DR drill from %s%s: %s", name, " with the recovery key alone" if recovery_key else "", ", ".join(chosen))
        rows: list[dict[str, Any]] = []
        rpo: list[dict[str, Any]] = []
        created_dbs: list[str] = []
        cleanup: list[str] = []
        total = 0.0
        try:
            with runtime.site(derived, store):
                rows = _restore_all(derived, chosen, stamp, scratch, keep, created_dbs)
                total = round(time.monotonic() - t0, 3)
                for dr_target in sorted(settings.dr.targets):  # the achieved RPO of every DR target, at the drill's start
                    try:
                        rpo += dr_lag(dr_target, [c for c in chosen if c != "vm" or settings.dr.vm is not None], started)
                    except BackupError as exc:
                        rpo.append({"target": dr_target, "component": "*", "source": "*", "newest_at_dr": "unreadable",
                                    "lag_hours": None, "within_rpo": False, "error": redact(str(exc))})
        finally:
            close = getattr(store, "close", None)
            if close is not None:
                close()
            if not keep:
                cleanup = _clean(settings, drill.database, created_dbs, scratch)
        rto_limit = drill.rto_minutes * 60
        for r in rows:
            r["within_rto"] = r["rto_seconds"] <= rto_limit
        problems = [f"{r['component']}/{r['target']}: {r.get('error') or 'failed'}" for r in rows if not r["ok"]]
        problems += [f"{r['component']}/{r['target']}: verified in {r['rto_seconds'] / 60:.1f} min, over the RTO of "
                     f"{drill.rto_minutes:g} min" for r in rows if r["ok"] and not r["within_rto"]]
        problems += [f"DR target {r['target']}: {r['component']}/{r['source']} newest verified backup "
                     + (f"{r['lag_hours']} h old" if r.get("lag_hours") is not None else "missing")
                     + f" at the drill's start (RPO {settings.dr.rpo_hours:g} h)" for r in rpo if not r["within_rpo"]]
        if total > rto_limit:
            problems.append(f"the whole drill took {total / 60:.1f} min, over the RTO of {drill.rto_minutes:g} min")
        problems += [f"clean-up: {c}" for c in cleanup]
        if not rows:
            problems.append("nothing was restored: no configured target of the chosen components")
        ok = not problems
        report = {
            "started_at": started.isoformat(), "finished_at": datetime.now(timezone.utc).isoformat(), "ok": ok,
            "dr_target": name, "recovery_key": bool(recovery_key), "components": chosen, "kept": keep,
            "rto_target_minutes": drill.rto_minutes, "rpo_target_hours": settings.dr.rpo_hours,
            "rto_total_seconds": total, "restores": rows, "rpo": rpo, "problems": problems,
            "flow_run_id": str(flow_run.id) if flow_run.id else None,
        }
        markdown = _markdown(report)
        report["evidence"] = _keep_evidence(settings, name, started, report, markdown)
        create_markdown_artifact(key="dr-drill-report", markdown=redact(markdown), description="DR drill report")
        if rows:
            create_table_artifact(key="dr-drill-restores", table=[{k: r.get(k) for k in (
                "component", "target", "ok", "rto_seconds", "within_rto", "backup_id", "checks", "error")} for r in rows],
                description="The DR drill's restores, each timed from its start to verified")
        _log(settings, name, started, report)
        events.drill_finished(name, ok, rto_total_seconds=total, problems=problems[:20],
                              failed=sorted(f"{r['component']}/{r['target']}" for r in rows if not r["ok"]))
        logger.info("DR drill %s: %d restore(s), %d problem(s), %.0f s in total",
                    "passed" if ok else "FAILED", len(rows), len(problems), total)
        if not ok:
            raise VerificationError(f"DR drill from {name}: {len(problems)} problem(s): " + "; ".join(problems[:5]),
                                    hint="the drill's report (artifact dr-drill-report, and under _drills/ in the backup "
                                         "storage) lists every check")
        return {k: report[k] for k in ("ok", "dr_target", "rto_total_seconds", "restores", "rpo", "evidence")}


def _clean(settings: Settings, server: str | None, created_dbs: list[str], scratch: Path) -> list[str]:
    """Remove what the drill restored (guests are removed by their restore's own clean-up); what could not be is said."""
    problems = []
    for dbname in created_dbs:
        try:
            assert server is not None
            drop_scratch_database(settings, server, dbname)
        except Exception as exc:  # noqa: BLE001 - each leftover is reported, the others still removed
            problems.append(f"scratch database {dbname} not dropped: {redact(str(exc))}")
    shutil.rmtree(scratch, ignore_errors=True)
    if scratch.exists():
        problems.append(f"scratch folder {scratch} not removed")
    return problems


def _keep_evidence(settings: Settings, target: str, started: datetime, report: dict[str, Any], markdown: str) -> list[str]:
    """The report under the backup prefix of the primary storage; at the DR target when the primary cannot take it
    (the disaster the drill rehearses may be real)."""
    for where in ("primary", target):
        store = runtime.store(settings) if where == "primary" else dr_store(target, settings)
        try:
            return drills.save_report(store, settings.storage.prefix, started, report, markdown)
        except BackupError as exc:
            get_run_logger().warning("the drill report could not be kept in the %s storage: %s", where, exc)
        finally:
            if where != "primary" and hasattr(store, "close"):
                store.close()
    return []


def _log(settings: Settings, target: str, started: datetime, report: dict[str, Any]) -> None:
    if not settings.log.enabled:
        return
    logged(log_run, "drill", "drill", "storage", target, target, "success" if report["ok"] else "failed", started,
           None, (report.get("evidence") or [None])[0], report["flow_run_id"],
           "; ".join(report["problems"])[:2000] or None,
           {k: report[k] for k in ("restores", "rpo", "rto_total_seconds", "recovery_key", "components")}, {})


def _markdown(report: dict[str, Any]) -> str:
    rto_limit = report["rto_target_minutes"]
    lines = [
        f"## DR drill {report['started_at'][:16]} from `{report['dr_target']}`: "
        + ("**passed**" if report["ok"] else "**FAILED**"),
        "",
        f"Keys: {'the offline recovery key alone (Vault not used)' if report['recovery_key'] else 'the key provider'}. "
        f"Total RTO (drill start to the last component verified): **{report['rto_total_seconds'] / 60:.1f} min** "
        f"against {rto_limit:g} min.",
        "",
        "| component | target | result | RTO (min) | within RTO | backup | checks | error |",
        "|---|---|---|---:|---|---|---|---|",
        *[f"| {r['component']} | {r['target']} | {'ok' if r['ok'] else '**FAILED**'} | {r['rto_seconds'] / 60:.2f} | "
          f"{'yes' if r.get('within_rto') else '**no**'} | {r.get('backup_id') or ''} | {r.get('checks') or ''} | "
          f"{(r.get('error') or '').replace('|', '/')[:200]} |" for r in report["restores"]],
        "",
        f"Achieved RPO at the drill's start (target {report['rpo_target_hours']:g} h):",
        "",
        "| DR target | component | target | newest verified at DR | age (h) | within RPO |",
        "|---|---|---|---|---:|---|",
        *[f"| {r['target']} | {r['component']} | {r['source']} | {r['newest_at_dr']} | {r['lag_hours']} | "
          f"{'yes' if r['within_rpo'] else '**no**'} |" for r in report["rpo"]],
    ]
    if report["problems"]:
        lines += ["", "**Problems**", "", *[f"- {p}" for p in report["problems"][:50]]]
    lines += ["", "Everything the drill restored was kept (keep)." if report["kept"] else
              "Everything the drill restored was removed."]
    return "\n".join(lines)
