"""The config restore flow: download → diff → (confirmed) apply → validate (roll back on failure) → verify → reload, logged.

The real files come from the encrypted archive, never from the redacted git copy. A dry run
(the default) only shows, per file, what would change on the host, as a diff in which secrets
are fingerprints. Applying needs ``confirm`` to repeat the host's name; every replaced file is
kept on the host, the services whose files were written validate their config (``nginx -t``,
``docker compose config``), and a failed validation puts every file back as it was.
"""

from __future__ import annotations

import re
import shutil
import time
from datetime import datetime, time as dtime, timezone
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from luxima_backup import catalog, events, runtime
from luxima_backup.errors import BackupError, ConfigError, VerificationError
from luxima_backup.secrets import install_log_redaction, redact
from luxima_backup.settings import Settings
from flows.common import flow, logged
from luxima_backup.workdir import private_dir
from tasks.apply import apply, reload, rollback_host, validate
from tasks.download import download
from tasks.log import log_run
from tasks.plan import DIFF_TOTAL_LINES, diff
from tasks.verify.restored_configs import verify_restored_configs

_COMMIT = re.compile(r"^[0-9a-f]{7,40}$")


def find_backup(settings: Settings, host: str, version: str) -> tuple[catalog.Backup, str]:
    """The archive an operator means: ``latest``, a backup id, a git commit of the config repository, or a date/time.

    A date (``2026-11-22``) means the newest backup completed by the end of that day (UTC); a time
    with an offset (``2026-11-22T03:00+07:00``) the newest completed by then. A commit means the
    archive whose fetched set is the one that commit recorded (same keyed content digest).
    """
    cat = runtime.catalog("configs", settings)
    v = version.strip()
    if v == "latest" or v.startswith("configs-") or "/" in v:
        return cat.resolve("configs", v, source=host), v
    if _COMMIT.match(v):
        return _by_commit(settings, host, v), f"commit {v}"
    try:
        when = datetime.fromisoformat(v)
    except ValueError:
        raise ConfigError(f"version {version!r} is not 'latest', a backup id, a commit or a date",
                          hint="e.g. latest, configs-web1-20261122T190000Z, 3f2a9c1, 2026-11-22, 2026-11-22T03:00+07:00") from None
    if len(v) == 10:  # a date alone: the whole day
        when = datetime.combine(when.date(), dtime.max, tzinfo=timezone.utc)
    elif when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return cat.resolve("configs", "latest", source=host, as_of=when), f"as of {when.isoformat()}"


def _by_commit(settings: Settings, host: str, commit: str) -> catalog.Backup:
    import json

    from tasks.commit import open_repo
    from tasks.fetch import META_NAME

    with open_repo(settings) as repo:
        if not (repo.path / ".git").is_dir():
            raise ConfigError(f"there is no config working copy at {repo.path} to look commit {commit} up in",
                              hint="run a config backup first, or give a backup id or a date")
        if repo.git("cat-file", "-e", f"{commit}^{{commit}}", check=False).returncode != 0:
            repo.fetch()
        raw = repo.show(commit, f"{host}/{META_NAME}")
    if raw is None:
        raise ConfigError(f"commit {commit} has no configs of {host} (or is not in the config repository)")
    digest = json.loads(raw)["content_digest"]
    found = [b for b in runtime.catalog("configs", settings).list_backups("configs", host)
             if b.verified and b.entry.content_digest == digest]
    if not found:
        raise ConfigError(
            f"no kept archive holds the configs of {host} as commit {commit} recorded them",
            hint=f"archives are kept {settings.configs.retention_days} days; list them with "
                 "`luxima-backup list --component configs` and restore one by id or date")
    return found[-1]


@flow(name="config-restore", validate_parameters=True, persist_result=True)
def config_restore(host: str, version: str = "latest", paths: list[str] | None = None, dry_run: bool = True,
                   confirm: str | None = None, reload_services: bool = True, remove_extra: bool = False) -> dict[str, Any]:
    """Restore a host's service configs from an encrypted config archive; a dry run (default) shows the diff.

    Args:
        host: which [configs.hosts.NAME] to restore.
        version: latest, a backup id, a commit of the config repository, or a date (2026-11-22) / time with offset.
        paths: absolute paths (or globs) to restore; a folder restores everything under it; default: all.
        dry_run: only show what would change (the default). Set false to write.
        confirm: must repeat the host's name to write (dry_run false).
        reload_services: after a validated restore, run the reload command of the services whose files were written.
        remove_extra: also remove files under the host's configured paths that the backup does not have (each kept
            first, put back on rollback); by default they are listed and left alone.
    """
    with runtime.time_limit(lambda s: s.restore.timeout_seconds, "config-restore"):  # read from the settings at run time
        settings = runtime.settings()
        install_log_redaction()
        logger = get_run_logger()
        settings.config_host(host)
        if not dry_run and confirm != host:
            raise ConfigError(f"writing configs on {host} needs confirm = {host!r}",
                              hint="run a dry run first and read its diff; then repeat the host's name in confirm")
        started = datetime.now(timezone.utc)
        stamp = started.strftime("%Y%m%dT%H%M%SZ")
        t0 = time.monotonic()
        backup, how = find_backup(settings, host, version)
        a = backup.manifest.data
        logger.info("restoring %s from %s (%s)%s", host, backup.backup_id, how, " - DRY RUN" if dry_run else "")
        work = private_dir(settings.work_dir, "config-restore-")
        outcome: dict[str, Any] = {"backup_id": backup.backup_id, "object_key": a.key, "version": how, "dry_run": dry_run}
        error: BaseException | None = None
        plan: dict[str, Any] | None = None
        try:
            spool = str(work / "archive.enc")
            download(a.key, spool, a.size_encrypted, a.sha256_encrypted, True, backup.manifest.binding_of(a.key))
            plan = diff(host, spool, a.compression.codec, paths, remove_extra)
            outcome.update(counts=plan["counts"], steps=[_brief(s) for s in plan["steps"]])
            conflicts = [s for s in plan["steps"] if s["action"] == "conflict"]
            if conflicts and not dry_run:
                raise ConfigError(f"{len(conflicts)} path(s) cannot be restored: "
                                  + "; ".join(f"{s['path']}: {s['note']}" for s in conflicts[:5]),
                                  hint="move them aside on the host, or restore other paths")
            todo = [s for s in plan["steps"] if s["action"] in ("create", "update", "metadata", "remove")]
            if not dry_run and todo:
                outcome.update(_apply(host, spool, a.compression.codec, todo, stamp, reload_services))
            elif not dry_run:
                outcome["applied"] = 0
                logger.info("the host already has every file of the backup as it is: nothing to write")
        except BaseException as exc:
            error = exc
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
            outcome["seconds"] = round(time.monotonic() - t0, 3)
            _publish(host, backup.backup_id, how, outcome, plan, error)
            status = "failed" if error is not None else "success"
            if settings.log.enabled:
                logged(log_run, "restore", "restore", "configs", host, host, status, started, backup.backup_id, a.key,
                       str(flow_run.id) if flow_run.id else None,
                       redact(f"{type(error).__name__}: {error}") if error is not None else None,
                       {k: v for k, v in outcome.items() if k != "steps"}, {})
        if not dry_run:
            events.restore_succeeded("configs", host, backup.backup_id, applied=outcome.get("applied", 0))
        return outcome


def _apply(host: str, spool: str, codec: str, todo: list[dict[str, Any]], stamp: str, reload_services: bool) -> dict[str, Any]:
    """Write, validate and read back, rolling every file back when any of that fails; then reload."""
    logger = get_run_logger()
    done = apply(host, spool, codec, todo, stamp)  # undoes its own writes when one fails
    written = [x["path"] for x in done["applied"]]
    try:
        checks = validate(host, written)
        failed = [c for c in checks if c["exit"] != 0]
        if failed:
            c = failed[0]
            raise VerificationError(f"validation of {c['service']} failed on {host} (`{c['command']}` exit {c['exit']}): "
                                    f"{c['output'][-800:]}")
        verified = verify_restored_configs(host, todo)
        if verified["mismatches"]:
            raise VerificationError(f"{len(verified['mismatches'])} restored file(s) on {host} differ from the backup: "
                                    + "; ".join(f"{m['path']}: {m['problem']}" for m in verified["mismatches"][:10]))
    except BaseException as exc:
        state = rollback_host(host, done["applied"], stamp, return_state=True)
        if state.is_completed():
            problems = state.result()
        else:
            problems = [f"the rollback could not run: {state.result(raise_on_failure=False)}"]
        detail = (f"{exc}; " + ("every restored file was rolled back" if not problems
                                else f"rollback FAILED for: {'; '.join(problems)}"))
        events.verification_failed("restore", "configs", host, redact(detail))
        raise VerificationError(detail, hint=f"the files the restore replaced are also kept under {done['keep_dir']}") from exc
    reloaded = reload(host, written) if reload_services else []
    bad = [r for r in reloaded if r["exit"] != 0]
    if bad:
        raise BackupError(f"the configs of {host} were restored and validated, but `{bad[0]['command']}` failed "
                          f"(exit {bad[0]['exit']}): {bad[0]['output'][-800:]}",
                          hint="the files stay restored; fix the service and reload it by hand")
    logger.info("restored %d change(s) on %s; validated by %s; content of %d files checked", len(written), host,
                ", ".join(c["service"] for c in checks) or "nothing (no command configured)", verified["checked"])
    return {"applied": len(written), "keep_dir": done["keep_dir"], "validation": [_no_output(c) for c in checks],
            "files_checked": verified["checked"], "reloaded": [r["service"] for r in reloaded]}


def _no_output(check: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in check.items() if k != "output"}


def _brief(step: dict[str, Any]) -> dict[str, Any]:
    return {k: step[k] for k in ("path", "action", "kind", "note")}


def _publish(host: str, backup_id: str, how: str, outcome: dict[str, Any], plan: dict[str, Any] | None,
             error: BaseException | None) -> None:
    """The run's artifact: the plan per file with its (redacted) diff, and what was done."""
    head = "DRY RUN: nothing was written" if outcome["dry_run"] else (
        f"FAILED: {error}" if error is not None else f"applied {outcome.get('applied', 0)} change(s)")
    lines = [f"## Config restore of {host} from `{backup_id}` ({how})", "", f"**{head}**", ""]
    if outcome.get("keep_dir") and not outcome["dry_run"]:
        lines += [f"Replaced files are kept on the host under `{outcome['keep_dir']}`.", ""]
    for c in outcome.get("validation", []):
        lines += [f"- validation {c['service']}: `{c['command']}` exit {c['exit']}"]
    if plan:
        lines += ["", "| path | action | note |", "|---|---|---|"]
        lines += [f"| `{s['path']}` | {s['action']} | {s['note']} |" for s in plan["steps"] if s["action"] != "same"]
        same = sum(1 for s in plan["steps"] if s["action"] == "same")
        lines += ["", f"{same} file(s) already as in the backup.", "", "```diff"]
        total = 0
        for s in plan["steps"]:
            if s["diff"] and total < DIFF_TOTAL_LINES:
                chunk = s["diff"].splitlines()[: DIFF_TOTAL_LINES - total]
                total += len(chunk)
                lines += chunk
        lines.append("```")
    key = "".join(ch if ch.isalnum() else "-" for ch in f"config-restore-{host}".lower())
    create_markdown_artifact(key=key, markdown=redact("\n".join(lines)), description=f"Config restore of {host}")
