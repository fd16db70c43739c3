"""The config backup flow: fetch over SSH → commit & push the scrubbed copy → archive → encrypt → upload → verify, logged.

Per host (a ``config-backup-host`` subflow), the configured paths are fetched over SFTP; each file
goes as it is into a tar stream that is compressed, encrypted and uploaded as it is written
(``config-backup-stream``, retried whole on transient errors), and scrubbed of secrets into a
staging copy of the host's git folder. The archive is read back and checked, then its manifest
is written. Then the hosts that came through are committed in one commit that lists what changed
(none when nothing did) and pushed without force. Archives are kept ``configs.retention_days``.

A host that fails does not stop the others; its git folder keeps its last state and the run
fails at the end naming it. A push that fails fails the run too; the commit is kept and pushed
by the next run.

Before the commit, each host's staged files are checked once more for anything secret-looking
(the gate, ``tasks.commit``). A host that fails it is left out of the commit (nothing of it is
committed or pushed) while its encrypted archive and manifest stay: its log row says failed with
the files and lines (never a value), ``luxima.verification.failed`` (kind ``git-gate``) alerts,
the other hosts are committed, and the run fails naming it. Its archive is a good recovery
point, so the success event the RPO watchdog waits for is sent all the same.
"""

from __future__ import annotations

import shutil
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from luxima_backup import __version__, events, manifest, runtime
from luxima_backup.compression import SUFFIX
from luxima_backup.errors import BackupError, ConfigError, VerificationError
from luxima_backup.pipes import Link
from luxima_backup.secrets import install_log_redaction, redact
from luxima_backup.settings import Settings
from luxima_backup.stages import run_linked
from flows.common import backup_start, discard, flow, logged, outcome, save_manifest, sealed_with, stream_with_retries
from luxima_backup.workdir import private_dir
from tasks.commit import GATE_HINT, commit
from tasks.compress import compress
from tasks.encrypt import encrypt
from tasks.fetch import fetch, fingerprint_key, matches
from tasks.log import log_run
from tasks.push import push
from tasks.upload import upload
from tasks.verify.config_archive import verify_config_archive

# The archive stage is the compressor: the fetch stage already writes the tar.
archive = compress.with_options(name="archive")



_STAGE_SETTING = "configs.stage_timeout_seconds"


def _stage_limit(settings: Settings) -> float:
    """Read at run time, so a run started from the UI uses the settings the worker has now."""
    return settings.configs.stage_timeout_seconds

@flow(name="config-backup-stream", task_runner=ThreadPoolTaskRunner(max_workers=4), validate_parameters=False, persist_result=False)
def fetch_to_storage(host: str, object_key: str, stage_dir: str, binding: dict[str, str], attempt: int = 1) -> dict[str, Any]:
    """One attempt at streaming a host's configs to storage: fetch | archive | encrypt | upload."""
    settings = runtime.settings()
    cfg = settings.configs
    shutil.rmtree(stage_dir, ignore_errors=True)  # what a failed attempt staged
    Path(stage_dir).mkdir(parents=True, mode=0o700)
    links = fetched, packed, sealed = Link("fetch→archive"), Link("archive→encrypt"), Link("encrypt→upload")

    def submit(futures: list[Any]) -> None:
        futures.append(fetch.submit(host, fetched, stage_dir))
        futures.append(archive.submit(fetched, packed, cfg.compression, cfg.effective_level, 1))
        futures.append(encrypt.submit(packed, sealed, "config archive", binding))
        futures.append(upload.submit(sealed, object_key, True))

    f, a, e, u = run_linked(submit, list(links))
    return {"fetch": f, "archive": a, "encrypt": e, "upload": u}


@flow(name="config-backup-host", validate_parameters=False, persist_result=False)
def backup_host(host: str, stage_dir: str) -> dict[str, Any]:
    """Back up one host's configs: the archive stored, read back and checked, its manifest written; the git copy staged."""
    settings = runtime.settings()
    install_log_redaction()
    logger = get_run_logger()
    cfg = settings.configs
    started = backup_start(runtime.config_store(settings), runtime.config_prefix(settings), "configs", host, settings.work_dir)
    keys = manifest.config_keys(runtime.config_prefix(settings), host, started, SUFFIX[cfg.compression])
    uploaded: list[str] = []
    try:
        stream = stream_with_retries(fetch_to_storage, (host, keys.archive, stage_dir,
                                                        manifest.binding(keys.backup_id, "configs", host, keys.archive)), cfg.attempts, cfg.retry_delay_seconds,
                                     _stage_limit, _STAGE_SETTING)
        uploaded.append(keys.archive)
        f, a, e, u = stream["fetch"], stream["archive"], stream["encrypt"], stream["upload"]
        if e["encrypted_sha256"] != u["sha256"] or e["encrypted_bytes"] != u["bytes"]:
            raise BackupError("the bytes uploaded differ from the bytes encrypted")
        expected = {"encrypted_bytes": u["bytes"], "encrypted_sha256": u["sha256"], "proven_etag": u["proven_etag"],
                    "plain_sha256": a["plain_sha256"],
                    "host": host, "content_digest": f["content_digest"], "files": f["files"]}
        with runtime.time_limit(_stage_limit, f"verify of {host}", _STAGE_SETTING):
            verification = verify_config_archive(keys.archive, a["codec"], expected, cfg.deep_verify)
        finished = datetime.now(timezone.utc)
        host_cfg = settings.hosts[host]
        document = manifest.ConfigManifest(
            backup_id=keys.backup_id, status="verified", started_at=started, completed_at=finished,
            recovery_key_id=runtime.recovery_key_id(settings),
            source=manifest.ConfigSource(name=host, kind="ssh", host=host_cfg.host, paths=settings.config_host(host).paths),
            tool={"luxima_backup": __version__},
            archive=manifest.DataObject(
                key=keys.archive, format="tar-pax+index", compression=manifest.Compression(codec=a["codec"], level=a["level"]),
                encryption=sealed_with(e), size_plain=a["plain_bytes"], size_compressed=a["compressed_bytes"],
                size_encrypted=u["bytes"], sha256_plain=a["plain_sha256"], sha256_encrypted=u["sha256"], bound=e["bound"]),
            totals={k: f[k] for k in ("files", "symlinks", "bytes", "redactions")},
            missing=f["missing"], too_large=f["too_large"],
            content_digest=f["content_digest"],
            retention_days=cfg.retention_days,
            expires_at=finished + timedelta(days=cfg.retention_days),
            verification={**verification, "verified_at": finished.isoformat()},
            timings={"fetch": f["seconds"], "total": round((finished - started).total_seconds(), 3)},
            flow_run_id=str(flow_run.id) if flow_run.id else None,
        )
        save_manifest(keys.manifest, document)
    except BaseException as exc:
        if events.is_verification_failure(exc):
            events.verification_failed("backup", "configs", host, str(exc), backup_id=keys.backup_id)
        discard(uploaded, logger, runtime.config_store(), manifest_key=keys.manifest)
        raise
    logger.info("config backup %s of %s: %d files, %s (%d bytes encrypted)", keys.backup_id, host, f["files"],
                keys.archive, u["bytes"])
    return {"backup_id": keys.backup_id, "started_at": started.isoformat(), "manifest_key": keys.manifest,
            "object_key": keys.archive, "stage_dir": stage_dir, "totals": document.totals, "missing": f["missing"],
            "too_large": f["too_large"], "content_digest": f["content_digest"],
            "sizes": {"size_raw": a["plain_bytes"], "size_compressed": a["compressed_bytes"], "size_encrypted": u["bytes"],
                      "sha256_raw": a["plain_sha256"], "sha256_encrypted": u["sha256"], "key_id": e["key"]["key_id"]}}


@flow(name="config-backup", validate_parameters=True, persist_result=True)
def config_backup(hosts: list[str] | None = None) -> dict[str, Any]:
    """Back up the service configs of the configured hosts: git commit & push (secrets redacted), encrypted archive.

    Args:
        hosts: which [configs.hosts.NAME] to back up (default: all of them).
    """
    with runtime.time_limit(lambda s: s.configs.timeout_seconds, "config-backup"):  # read from the settings at run time
        settings = runtime.settings()
        install_log_redaction()
        names = list(hosts or settings.configs.hosts)
        if not names:
            raise ConfigError("no config hosts configured", hint="add [configs.hosts.NAME] sections (and [hosts.NAME]) to the settings")
        for n in names:
            settings.config_host(n)  # every name checked before any work starts
        fingerprint_key(settings)  # a missing key fails here, not once per host
        started = datetime.now(timezone.utc)
        t0 = time.monotonic()
        run_id = str(flow_run.id) if flow_run.id else None
        work = private_dir(settings.work_dir, "config-backup-")
        results: dict[str, Any] = {}
        failures: dict[str, BaseException] = {}
        gated: dict[str, BaseException] = {}  # archived, but kept out of git by the gate
        git: dict[str, Any] = {}
        push_error: BaseException | None = None
        try:
            for n in names:
                result, exc = outcome(backup_host(n, str(work / n), return_state=True))
                if exc is None:
                    results[n] = result
                else:
                    failures[n] = exc
            if results:
                state = commit({n: r["stage_dir"] for n, r in results.items()}, started.isoformat(), return_state=True)
                if state.is_completed():
                    git = state.result()
                    for n, found in git.get("blocked", {}).items():
                        gated[n] = VerificationError(found["error"], hint=GATE_HINT)
                        events.verification_failed("git-gate", "configs", n, found["error"],
                                                   backup_id=results[n]["backup_id"], left=found["left"][:50])
                    pushed = push(return_state=True)
                    if pushed.is_completed():
                        git["push"] = pushed.result()
                    else:
                        push_error = pushed.result(raise_on_failure=False)
                        git["push"] = {"pushed": False, "error": redact(str(push_error))}
                else:
                    push_error = state.result(raise_on_failure=False)
                    git = {"commit": None, "error": redact(str(push_error)), "hosts": {}}
        finally:
            shutil.rmtree(work, ignore_errors=True)

        for n in names:
            _record(n, results.get(n), failures.get(n) or gated.get(n), git, started, run_id)
        drift = _drift(settings, git, results)
        _publish(names, results, failures, gated, git, drift, time.monotonic() - t0)

        problems = [f"{n}: {redact(str(exc))}" for n, exc in [*failures.items(), *gated.items()]]
        if push_error is not None:
            problems.append(f"git: {redact(str(push_error))}")
        if problems:
            first: BaseException | None = next(iter([*failures.values(), *gated.values()]), push_error)
            cls = type(first) if isinstance(first, BackupError) else BackupError
            raise cls("config backup failed: " + "; ".join(problems))
        return {"hosts": results, "git": {k: v for k, v in git.items() if k != "hosts"}, "changes": git.get("hosts", {}),
                "drift": drift}


def _record(host: str, result: dict[str, Any] | None, failure: BaseException | None, git: dict[str, Any],
            started: datetime, run_id: str | None) -> None:
    """The host's row in internal.backup_logs, and the success event the RPO watchdog waits for.

    A host with both a result and a failure was archived but kept out of git by the gate: its row
    says failed, with the archive and what the gate found.
    """
    settings = runtime.settings()
    changes = git.get("hosts", {}).get(host)
    details: dict[str, Any] = {"git": {"commit": git.get("commit"), "pushed": git.get("push", {}).get("pushed"),
                                       "error": git.get("error") or git.get("push", {}).get("error"),
                                       "changes": {k: len(v) for k, v in (changes or {}).items() if k != "first"}}}
    if result is not None:
        details.update(totals=result["totals"], missing=result["missing"], too_large=result["too_large"])
        if failure is not None:
            details["git"]["blocked"] = git.get("blocked", {}).get(host, {}).get("left", [])
        if settings.log.enabled:
            logged(log_run, "finish", "backup", "configs", host, host, "failed" if failure else "success", started,
                   result["backup_id"], result["object_key"], run_id,
                   redact(f"{type(failure).__name__}: {failure}") if failure else None, details, result["sizes"])
        events.backup_succeeded("configs", host, result["backup_id"], object_key=result["object_key"],
                                size_encrypted=result["sizes"]["size_encrypted"])
    elif settings.log.enabled:
        logged(log_run, "finish", "backup", "configs", host, host, "failed", started, None, None, run_id,
               redact(f"{type(failure).__name__}: {failure}"), details, {})


def _drift(settings: Any, git: dict[str, Any], results: dict[str, Any]) -> dict[str, dict[str, list[str]]]:
    """Changes outside each host's drift_ignore since its last backup (not on its first); alerted when configured."""
    found: dict[str, dict[str, list[str]]] = {}
    for host, ch in git.get("hosts", {}).items():
        if ch.get("first") or host not in results:
            continue
        ignore = settings.config_host(host).drift_ignore
        kept = {k: [p for p in v if not matches(p, ignore)] for k, v in ch.items() if k != "first"}
        if any(kept.values()):
            found[host] = kept
            if settings.configs.drift_alert:
                events.config_drift(host, kept, git.get("commit"))
    return found


def _publish(names: list[str], results: dict[str, Any], failures: dict[str, BaseException],
             gated: dict[str, BaseException], git: dict[str, Any], drift: dict[str, Any], seconds: float) -> None:
    """The run's artifact: per host what was archived and what changed since the last backup."""
    push = git.get("push", {})
    if git.get("commit"):
        commit_line = f"Commit `{git['commit'][:12]}`"
    elif git.get("error"):
        commit_line = "NO COMMIT: the commit failed"
    elif "commit" in git:
        commit_line = "No commit (nothing changed)"
    else:
        commit_line = "No commit (no host came through)"
    push_line = ("pushed" if push.get("pushed") else f"NOT pushed: {push['error']}" if push.get("error")
                 else "nothing to push" if push else "not pushed")
    lines = [f"## Config backup of {len(names)} host(s) in {seconds:.1f}s", "",
             f"{commit_line}; {push_line}." + (f" Git error: {git['error']}" if git.get("error") else ""), "",
             "| host | result | files | redacted values | added | changed | removed | mode/owner | drift |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for n in names:
        ch = git.get("hosts", {}).get(n, {})
        if n in gated:
            t = results[n]["totals"]
            lines.append(f"| {n} | `{results[n]['backup_id']}` archived; NOT in git: {str(gated[n])[:300].replace('|', '/')} | "
                         f"{t['files']} | {t['redactions']} | | | | | |")
        elif n in results:
            t = results[n]["totals"]
            lines.append(f"| {n} | `{results[n]['backup_id']}` | {t['files']} | {t['redactions']} | "
                         + " | ".join(str(len(ch.get(k, []))) for k in ("added", "changed", "removed", "metadata"))
                         + f" | {'first backup' if ch.get('first') else 'yes' if n in drift else 'no'} |")
        else:
            lines.append(f"| {n} | FAILED: {str(failures.get(n, ''))[:300]} | | | | | | | |")
    for n in names:
        ch = git.get("hosts", {}).get(n, {})
        for kind in ("added", "changed", "removed", "metadata"):
            paths = ch.get(kind, [])
            if paths and not ch.get("first"):
                lines += ["", f"**{n}** {kind}: " + ", ".join(f"`{p}`" for p in paths[:50])
                          + (f" and {len(paths) - 50} more" if len(paths) > 50 else "")]
        if n in results:
            r = results[n]
            for what in ("missing", "too_large"):
                if r[what]:
                    lines += ["", f"**{n}** {what.replace('_', ' ')}: " + ", ".join(f"`{p}`" for p in r[what])]
    create_markdown_artifact(key="config-backup", markdown=redact("\n".join(lines)), description="Config backup")
