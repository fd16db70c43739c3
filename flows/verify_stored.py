"""The verify-stored flow (weekly): a rotating share of the stored backups read back whole, so that over a cycle
of runs every kept backup has been read again (as `restic check --read-data-subset` does).

A backup's share is fixed by its id (a hash, modulo ``verify_stored.cycle``), and each run takes the
next share: with a cycle of 4 weekly runs, every backup is read within 4 weeks of being written.
Damage alerts (``luxima.verification.failed``), fails the run, and shows in `luxima-backup status`:
each target's last results are kept beside its backups (``<prefix>/_verify/<component>/<target>.json``).
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timezone
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from luxima_backup import events, runtime
from luxima_backup.errors import ObjectNotFound, VerificationError
from luxima_backup.secrets import install_log_redaction
from flows.common import flow, logged
from tasks.log import log_run
from tasks.verify.stored import verify_stored_backup

COMPONENTS = ("db", "files", "configs")


def share_of(backup_id: str, cycle: int) -> int:
    return int.from_bytes(hashlib.sha256(backup_id.encode()).digest()[:8], "big") % cycle


def record_key(prefix: str, component: str, target: str) -> str:
    return f"{prefix}/_verify/{component}/{target}.json"


def read_record(store: Any, key: str) -> dict[str, Any]:
    try:
        with store.load(key) as f:
            doc = json.loads(f.read())
        return doc if isinstance(doc, dict) else {}
    except (ObjectNotFound, ValueError):
        return {}


@flow(name="verify-stored", validate_parameters=True, persist_result=True)
def verify_stored(share: int | None = None, everything: bool = False) -> dict[str, Any]:
    """Read back this run's share of the stored backups (or all of them) and check every byte against the manifests.

    Args:
        share: which share of verify_stored.cycle to read (default: the next one, by the week).
        everything: read every kept backup now (a whole cycle in one run).
    """
    with runtime.time_limit(lambda s: s.verify_stored.timeout_seconds, "verify-stored"):
        settings = runtime.settings()
        install_log_redaction()
        logger = get_run_logger()
        cycle = settings.verify_stored.cycle
        now = datetime.now(timezone.utc)
        this = share if share is not None else int(now.timestamp() // (7 * 86400)) % cycle
        started, t0 = now, time.monotonic()
        rows: list[dict[str, Any]] = []
        damaged: list[str] = []
        for component in COMPONENTS:
            store, prefix = runtime.location(component, settings)
            for target, backups in sorted(runtime.catalog(component, settings).by_target(component)[0].items()):
                chosen = [b for b in backups if everything or share_of(b.backup_id, cycle) == this]
                if not chosen:
                    continue
                key = record_key(prefix, component, target)
                record = read_record(store, key)
                results = {bid: r for bid, r in record.get("results", {}).items() if any(b.backup_id == bid for b in backups)}
                for b in chosen:
                    result = verify_stored_backup(component, b.manifest_key)
                    results[b.backup_id] = {**result, "checked_at": datetime.now(timezone.utc).isoformat()}
                    rows.append({"component": component, "target": target, "backup": b.backup_id,
                                 "result": "ok" if result["ok"] else "DAMAGED", "MiB read": round(result["bytes"] / 2**20, 2),
                                 "detail": result["error"] or ""})
                    if not result["ok"]:
                        damaged.append(f"{component}/{target} {b.backup_id}")
                        events.verification_failed("verify", component, target, result["error"], backup_id=b.backup_id)
                store.save_bytes(key, json.dumps({"checked_at": datetime.now(timezone.utc).isoformat(), "results": results},
                                                 indent=2, sort_keys=True).encode(), "application/json")
                if settings.log.enabled:
                    bad = [r for r in results.values() if not r["ok"]]
                    logged(log_run, "verify", "verify", component, target, target, "failed" if bad else "success", started,
                           None, None, str(flow_run.id) if flow_run.id else None,
                           f"{len(bad)} damaged backup(s)" if bad else None,
                           {"checked": [b.backup_id for b in chosen], "damaged": [r["backup_id"] for r in bad]}, {})
        if rows:
            create_table_artifact(key="verify-stored", table=rows, description="Stored backups read back and checked")
        create_markdown_artifact(
            key="verify-stored-summary", description="Re-verification",
            markdown=f"## Stored backups read back (share {this} of {cycle}{', everything' if everything else ''})\n\n"
                     f"{len(rows)} backup(s), {sum(r['MiB read'] for r in rows):.1f} MiB read, {len(damaged)} damaged"
                     + ("".join(f"\n- **{d}**" for d in damaged)))
        logger.info("%d backup(s) read back, %d damaged, in %.0fs", len(rows), len(damaged), time.monotonic() - t0)
        if damaged:
            raise VerificationError(f"{len(damaged)} stored backup(s) damaged: {'; '.join(damaged[:5])}",
                                    hint="restore from another backup; the damaged ones are listed in the run's table")
        return {"share": this, "cycle": cycle, "checked": len(rows), "damaged": damaged}
