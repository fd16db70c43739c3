"""Retention stages: prune one target by its plan, and sweep what no backup owns.

A backup goes manifest first (the catalog stops offering it), then its objects, for good (every
version in a versioned bucket). A crash in between leaves objects without a manifest: the sweep
removes those once they are older than the grace period, which also covers what failed runs left
and multipart uploads never completed. Nothing under object lock is attempted before its date; a
refusal of one object is reported and the others go on.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from luxima_backup import catalog, events, manifest, retention, runtime
from luxima_backup.errors import ObjectNotFound
from luxima_backup.storage import ObjectStore

# The objects a backup writes are named <UTC time>.<what>…; nothing else under the prefix is swept.
_BACKUP_OBJECT = re.compile(r"/\d{8}T\d{6}Z\.[^/]+$")


def location(component: str, site: str | None = None) -> tuple[ObjectStore, str]:
    """Where a component's backups are, reached as the pruner (its own credentials when set); ``site``: a DR target's
    copies instead of the primary's (the same keys)."""
    settings = runtime.settings()
    prefix = runtime.location(component, settings)[1]
    if site is None:
        return runtime.pruner_store(component, settings), prefix
    from tasks.replicate import dr_store

    return dr_store(site, settings, pruner=True), prefix


def plan_of(settings: Any, component: str, target: str, backups: list[catalog.Backup], now: datetime, force: bool,
            site: str | None = None) -> retention.Plan:
    """The retention plan of one target's backups under its policy (the same at the primary and at a DR target)."""
    items = [retention.Item(b.backup_id, b.completed_at, b.verified, frozenset(b.entry.needs)) for b in backups]
    policy = settings.retention_policy(component, target)
    return retention.plan(f"{site}:{component}/{target}" if site else f"{component}/{target}", items,
                          retention.Policy(policy.keep_days, policy.keep_last, policy.keep_daily, policy.keep_weekly,
                                           policy.keep_monthly),
                          now, settings.alerts.rpo.get(component), settings.retention.timezone,
                          settings.retention.max_delete_percent, force)


def site_catalog(component: str, site: str | None, settings: Any) -> catalog.Catalog:
    """The catalog of the primary's backups, or of a DR target's copies (the same MAC key checks both)."""
    if site is None:
        return runtime.catalog(component, settings)
    from tasks.replicate import dr_store

    return runtime.catalog_at(dr_store(site, settings), runtime.location(component, settings)[1], settings)


def _age(now: datetime, then: datetime) -> str:
    days = (now - then).total_seconds() / 86400
    return f"{days:.1f} d"


@task(name="prune-target", cache_policy=NO_CACHE, persist_result=False)
def prune_target(component: str, target: str, dry_run: bool, force: bool, site: str | None = None) -> dict[str, Any]:
    """Decide every backup of one target and remove those the plan lets go (nothing when dry_run or held)."""
    settings = runtime.settings()
    logger = get_run_logger()
    store, prefix = location(component, site)
    now = datetime.now(timezone.utc)
    cat = site_catalog(component, site, settings)
    backups = {b.backup_id: b for b in cat.list_backups(component, target, catalog.legacy_folders(settings, component, target))}
    p = plan_of(settings, component, target, list(backups.values()), now, force, site)
    removing = {d.backup_id for d in p.remove}
    rows = []
    for d in p.decisions:  # newest first: a chain goes newest first
        row = {"target": p.target, "backup": d.backup_id, "age": _age(now, d.completed_at),
               "action": "keep" if d.keep else ("would remove" if dry_run else "remove"), "why": d.why}
        if not d.keep and p.held:
            row["action"], row["why"] = "keep (held)", f"{d.why}; {p.held}"
        elif d.backup_id in removing and not dry_run:
            row["action"], row["why"] = _remove(store, backups[d.backup_id], d.why)
        rows.append(row)
    if p.held:
        logger.warning("%s: %s", p.target, p.held)
        if "RPO" in p.held:
            events.retention_held(component, target, p.held)
    removed = sum(r["action"] == "removed" for r in rows)
    if removed:  # the catalog index stops listing them now (a reader would notice, but the next one need not look)
        for folder in {manifest.safe_name(target), *catalog.legacy_folders(settings, component, target)}:
            cat.refresh(component, folder)
    logger.info("%s: %d backup(s), %d kept, %d %s", p.target, len(rows), sum(r["action"].startswith("keep") for r in rows),
                removed if not dry_run else len(removing), "removed" if not dry_run else "would be removed")
    return {"target": p.target, "held": p.held, "rows": rows, "removed": removed,
            "failed": sum(r["action"] in ("removal failed", "locked") for r in rows)}


def _remove(store: ObjectStore, backup: catalog.Backup, why: str) -> tuple[str, str]:
    """Manifest first, then the backup's own objects; what is locked is not attempted."""
    # an images backup's objects are shared (stored once by image ID): they go only when no kept backup names them
    keys = [backup.manifest_key] if backup.component == "images" else [backup.manifest_key, *backup.entry.objects]
    try:
        locked = [(k, until) for k in keys for until in [_locked(store, k)] if until is not None]
        if locked:
            key, until = locked[0]
            return "locked", f"{why}; {key.rsplit('/', 1)[-1]} is under object lock until {until.isoformat()}"
        for key in keys:
            store.purge(key)
    except Exception as exc:  # reported; the others go on, and the next run (or the sweep) tries again
        return "removal failed", f"{why}; {type(exc).__name__}: {exc}"
    return "removed", why


def _locked(store: ObjectStore, key: str) -> datetime | None:
    try:
        return store.locked_until(key)
    except ObjectNotFound:
        return None


def _purge_unless_locked(store: ObjectStore, key: str, row: dict[str, Any]) -> bool:
    """Remove a leftover object for good, unless it is under object lock; ``row`` says what happened. Whether it went."""
    try:
        until = _locked(store, key)
        if until is not None:
            row["action"], row["why"] = "locked", f"{row['why']}; under object lock until {until.isoformat()}"
            return False
        store.purge(key)
        return True
    except Exception as exc:  # reported; the others go on, and the next run tries again
        row["action"], row["why"] = "removal failed", f"{type(exc).__name__}: {exc}"
        return False


@task(name="sweep", cache_policy=NO_CACHE, persist_result=False)
def sweep(component: str, dry_run: bool, site: str | None = None) -> list[dict[str, Any]]:
    """Objects no manifest names and uploads never completed, older than the grace period, removed (and listed)."""
    settings = runtime.settings()
    store, prefix = location(component, site)
    now = datetime.now(timezone.utc)
    cutoff = now - timedelta(hours=settings.retention.grace_hours)
    base = f"{prefix}/{component}/"
    objects = list(store.list(base))
    manifests = {o.key for o in objects if o.key.endswith(manifest.MANIFEST_SUFFIX)}
    rows = []
    for o in objects:
        if o.key in manifests or not _BACKUP_OBJECT.search(o.key) or manifest.manifest_key_for(o.key) in manifests:
            continue
        if o.last_modified is None or o.last_modified > cutoff:
            continue  # may belong to a backup running now
        row = {"target": component, "backup": o.key, "age": _age(now, o.last_modified),
               "action": "would remove" if dry_run else "removed", "why": "no manifest names it (a failed or interrupted run)"}
        if not dry_run:
            _purge_unless_locked(store, o.key, row)
        rows.append(row)
    for key, upload in store.stale_uploads(base, cutoff):
        row = {"target": component, "backup": key, "age": f"> {settings.retention.grace_hours:g} h",
               "action": "would abort" if dry_run else "aborted", "why": "an upload never completed"}
        if not dry_run:
            try:
                store.abort_upload(key, upload)
            except Exception as exc:
                row["action"], row["why"] = "abort failed", f"{type(exc).__name__}: {exc}"
        rows.append(row)
    get_run_logger().info("sweep of %s: %d leftover(s)", base, len(rows))
    return rows


_GC_STATE = "gc-state.json"


@task(name="image-objects-gc", cache_policy=NO_CACHE, persist_result=False)
def image_gc(dry_run: bool) -> list[dict[str, Any]]:
    """Image objects no kept images backup names, removed by reference counting.

    An object is removed only when it was already unreferenced at an earlier run more than the grace period ago and
    still is (the first sighting is recorded in ``image-objects/gc-state.json``): an images backup that decided to
    reuse it meanwhile (its manifest not yet written) names it again before that, as long as no backup runs longer
    than the grace period (the rule the sweep has too).
    """
    import json

    settings = runtime.settings()
    store, prefix = location("images")
    cat = runtime.catalog("images", settings)
    cat.refresh("images")
    referenced = {key for b in cat.list_backups("images") for key in b.entry.objects}
    if any(isinstance(u, catalog.Unreadable) for u in cat.iter_backups("images")):
        get_run_logger().warning("image objects are not collected: some images manifests cannot be read (what they name "
                                 "is unknown); see `luxima-backup list --component images`")
        return []
    base = f"{prefix}/{manifest.IMAGE_FOLDER}/"
    state_key = base + _GC_STATE
    try:
        with store.load(state_key) as body:
            seen: dict[str, str] = json.loads(body.read())
    except (ObjectNotFound, ValueError):
        seen = {}
    now = datetime.now(timezone.utc)
    grace = timedelta(hours=settings.retention.grace_hours)
    rows, still = [], {}
    for o in store.list(base):
        if o.key == state_key or o.key in referenced:
            continue
        first = datetime.fromisoformat(seen[o.key]) if o.key in seen else now
        young = o.last_modified is not None and now - o.last_modified < grace
        if now - first < grace or young:
            still[o.key] = first.isoformat()  # unreferenced since then: removed once it stays so past the grace period
            continue
        row = {"target": "images/(objects)", "backup": o.key, "age": _age(now, first),
               "action": "would remove" if dry_run else "removed", "why": "no kept images backup names it"}
        if not dry_run and not _purge_unless_locked(store, o.key, row):
            still[o.key] = first.isoformat()
        rows.append(row)
    if not dry_run:
        store.save_bytes(state_key, json.dumps(still, indent=1, sort_keys=True).encode(), "application/json")
    get_run_logger().info("image objects: %d referenced, %d unreferenced waiting out the grace period, %d %s",
                          len(referenced), len(still), len(rows), "would be removed" if dry_run else "removed")
    return rows
