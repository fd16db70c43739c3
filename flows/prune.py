"""The prune flow: retention per target, then the sweep of leftovers; a dry run shows the same table and deletes nothing.

Targets are found from the manifests in storage (a database section, a file source, a config
host), each pruned by its own policy (``[retention.policies]``, else its component's
``retention_days``) with the interlocks of ``luxima_backup/retention.py``. VM archives are pruned on
the Proxmox storage by the vm-backup flow itself, after each verified backup.
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
from luxima_backup.secrets import install_log_redaction
from flows.common import flow, logged
from tasks.log import log_run
from tasks.prune import image_gc, prune_target, sweep

COMPONENTS = ("db", "files", "configs", "images")


def targets(component: str) -> tuple[list[str], list[str]]:
    """The targets with backups of ``component`` in storage, and the manifests that could not be read."""
    cat = runtime.catalog(component)
    cat.refresh(component)  # a full listing first: what changed outside luxima-backup is pruned (or reported) too
    found, damaged = cat.by_target(component)
    return sorted(found), [str(u) for u in damaged]


@flow(name="prune", validate_parameters=True, persist_result=True)
def prune(dry_run: bool = False, force: bool = False, components: list[str] | None = None) -> dict[str, Any]:
    """Remove backups the retention policies no longer keep, and what failed runs left behind.

    Args:
        dry_run: only show what would be removed (the same table), remove nothing.
        force: allow removing more than retention.max_delete_percent of a target's backups in one run.
        components: db, files, configs, images (default: all).
    """
    with runtime.time_limit(lambda s: s.retention.timeout_seconds, "prune"):
        settings = runtime.settings()
        install_log_redaction()
        logger = get_run_logger()
        chosen = list(components or COMPONENTS)
        unknown = [c for c in chosen if c not in COMPONENTS]
        if unknown:
            raise ConfigError(f"cannot prune {unknown}", hint=f"components are {list(COMPONENTS)}; VM archives are pruned by vm-backup")
        started = datetime.now(timezone.utc)
        t0 = time.monotonic()
        rows: list[dict[str, Any]] = []
        results: dict[str, Any] = {}
        damaged: list[str] = []
        for component in chosen:
            names, bad = targets(component)
            damaged += bad
            for name in names:
                result = prune_target(component, name, dry_run, force)
                results[result["target"]] = result
                rows += result["rows"]
                if not dry_run:
                    _log(settings, "prune", component, name, started, result, t0)
            swept = sweep(component, dry_run)
            if component == "images":  # shared image objects: by reference counting
                swept += image_gc(dry_run)
            rows += swept
            results[f"{component}/(sweep)"] = {"rows": swept, "removed": sum(r["action"] in ("removed", "aborted") for r in swept)}
            if not dry_run and swept:
                _log(settings, "sweep", "storage", component, started, {"rows": swept, "held": None}, t0)
        for text in damaged:
            logger.warning("left alone, its manifest cannot be read: %s", text)
        _publish(rows, damaged, dry_run)
        failed = [r for r in rows if r["action"] in ("removal failed", "abort failed")]
        summary = {"dry_run": dry_run, "targets": {k: {"removed": v["removed"], "held": v.get("held")} for k, v in results.items()},
                   "removed": sum(v["removed"] for v in results.values()),
                   "would_remove": sum(r["action"].startswith("would") for r in rows),
                   "held": sorted(k for k, v in results.items() if v.get("held")), "locked": sum(r["action"] == "locked" for r in rows),
                   "damaged_manifests": len(damaged), "seconds": round(time.monotonic() - t0, 3)}
        if failed:
            raise BackupError(f"{len(failed)} removal(s) failed: "
                              + "; ".join(f"{r['backup']}: {r['why']}" for r in failed[:5]),
                              hint="they are tried again by the next prune; the run's table lists them all")
        return summary


def _log(settings: Any, kind: str, component: str, target: str, started: datetime, result: dict[str, Any], t0: float) -> None:
    if not settings.log.enabled:
        return
    changed = [r for r in result["rows"] if r["action"] not in ("keep",)]
    status = "failed" if any(r["action"] in ("removal failed", "abort failed") for r in changed) else "success"
    logged(log_run, kind, kind, component, target, target, status, started, None, None,
           str(flow_run.id) if flow_run.id else None, None,
           {"held": result.get("held"), "rows": changed[:500], "seconds": round(time.monotonic() - t0, 3)}, {})


def _publish(rows: list[dict[str, Any]], damaged: list[str], dry_run: bool) -> None:
    if rows:
        create_table_artifact(key="prune", table=rows, description="Retention: every backup considered, and why")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["action"]] = counts.get(r["action"], 0) + 1
    lines = [f"## Prune{' (dry run: nothing removed)' if dry_run else ''}", "",
             "| action | backups |", "|---|---:|", *[f"| {k} | {v} |" for k, v in sorted(counts.items())]]
    held = sorted({r["target"] for r in rows if r["action"] == "keep (held)"})
    if held:
        lines += ["", "**Held** (nothing removed): " + ", ".join(held)]
    if damaged:
        lines += ["", f"{len(damaged)} manifest(s) could not be read and were left alone:", "",
                  *[f"- {d}" for d in damaged[:20]]]
    create_markdown_artifact(key="prune-summary", markdown="\n".join(lines), description="Retention summary")
