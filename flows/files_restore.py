"""The files restore flow: index → extract (every archive of the chain) → deliver → md5 check, logged.

The backup is found from the manifests in storage alone. Its index says which files to restore
(all, or one folder or file) and which archive holds each; every archive is streamed from
storage, authenticated chunk by chunk, and its files written into a private staging folder,
each checked against the index as it lands. Only when everything has been extracted and
checked does anything reach the destination: a local folder, a folder on a host (rsync over
SSH), or a bucket. Then the md5 of every restored file, read back where it now lives, is
compared with the backup's (the procedure's md5sum check); any mismatch fails the run and is
listed in an artifact.

Nothing existing is overwritten without ``confirm`` naming the destination; then each
overwritten file is kept beside it (``<destination>.pre-restore-<time>`` locally, rsync's
backup folder on a host).
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from luxima_backup import catalog, events, procs, runtime, ssh
from luxima_backup.catalog import Backup
from luxima_backup.errors import ConfigError, ToolError, VerificationError
from luxima_backup.filetree import DIR, FILE, Entry
from luxima_backup.secrets import install_log_redaction, redact
from luxima_backup.settings import Settings
from luxima_backup.workdir import private_dir
from tasks.archive import load_index
from tasks.download import download
from tasks.extract import apply_metadata, extract, link_escapes, make_links_and_dirs, md5_check, selector
from tasks.log import log_run

EXAMPLES = 10


@dataclass
class Destination:
    kind: str                   # local | host | bucket
    path: str                   # the folder (local, or on the host), or the key prefix in the bucket
    host: str | None = None     # [hosts.NAME]
    bucket: str | None = None
    via: str | None = None      # bucket: the [files_backup.sources.NAME] whose endpoint and credentials reach it

    @property
    def label(self) -> str:
        if self.kind == "bucket":
            return f"s3://{self.bucket}/{self.path}"
        return f"{self.host}:{self.path}" if self.host else self.path


def parse_destination(settings: Settings, text: str, source: str | None) -> Destination:
    """``/folder`` here, ``HOST:/folder`` on a [hosts.HOST], or ``s3://BUCKET/PREFIX`` of a configured bucket source."""
    text = text.strip()
    if text.startswith("/"):
        return Destination("local", os.path.normpath(text))
    if text.startswith("s3://"):
        bucket, _, prefix = text[5:].partition("/")
        sources = settings.files_backup.sources
        # the endpoint and credentials of the source being restored if it is that bucket's, else of any source of it
        names = sorted(sources, key=lambda n: n != source)
        via = next((n for n in names if sources[n].kind == "s3" and sources[n].bucket == bucket), None)
        if via is None:
            raise ConfigError(f"no s3 file source in the settings uses bucket {bucket!r}, so there is no endpoint or credentials for it",
                              hint="restore into the bucket of a [files_backup.sources.NAME] with kind = 's3'")
        if prefix and (prefix.startswith("/") or ".." in prefix.split("/")):
            raise ConfigError(f"invalid prefix {prefix!r} in {text!r}")
        return Destination("bucket", prefix.strip("/") + "/" if prefix.strip("/") else "", bucket=bucket, via=via)
    host, sep, path = text.partition(":")
    if sep and host in settings.hosts and path.startswith("/"):
        return Destination("host", os.path.normpath(path), host)
    raise ConfigError(f"destination {text!r} is not an absolute folder, HOST:/folder with HOST one of {sorted(settings.hosts)}, "
                      "or s3://BUCKET/PREFIX", hint="e.g. /srv/restore/userfiles, files1:/srv/storage or s3://avatars/restored/")


@dataclass
class Plan:
    backup: Backup
    destination: Destination
    path_filter: str | None
    files: int = 0
    bytes: int = 0
    dirs: int = 0
    symlinks: int = 0
    archives: dict[str, dict[str, Any]] = field(default_factory=dict)  # needed ones, in chain order
    conflicts: list[str] = field(default_factory=list)
    conflict_count: int = 0
    escaping_links: list[str] = field(default_factory=list)
    escaping_count: int = 0


def scan(plan: Plan, entries: Iterator[Entry], allow_escaping_links: bool,
         existing_keys: set[str] | None = None) -> Plan:
    """One pass over the index: what will be restored, from which archives, and what it would overwrite.

    Conflicts are found here for a local folder and (from ``existing_keys``) a bucket; on a host
    an rsync dry run finds them just before delivery.
    """
    keep = selector(plan.path_filter)
    needed: set[str] = set()
    dest = os.fsencode(plan.destination.path) if plan.destination.kind == "local" else None
    for e in entries:
        if not keep(e):
            continue
        if e.type == FILE:
            plan.files += 1
            plan.bytes += e.size
            assert e.archive is not None
            needed.add(e.archive)
        elif e.type == DIR:
            plan.dirs += 1
        else:
            plan.symlinks += 1
            if link_escapes(e):
                plan.escaping_count += 1
                if len(plan.escaping_links) < EXAMPLES:
                    plan.escaping_links.append(f"{e.name} -> {os.fsdecode(e.target or b'')}")
        if plan.destination.kind == "bucket" and e.type == FILE:
            try:
                key = plan.destination.path + e.path.decode("utf-8")
            except UnicodeDecodeError:
                raise ConfigError(f"{e.name!r} is not a UTF-8 name and cannot be an object key",
                                  hint="restore into a folder instead") from None
            if existing_keys is not None and key in existing_keys:
                plan.conflict_count += 1
                if len(plan.conflicts) < EXAMPLES:
                    plan.conflicts.append(key)
        if dest is not None and os.path.lexists(os.path.join(dest, e.path)):
            existing_dir = os.path.isdir(os.path.join(dest, e.path)) and not os.path.islink(os.path.join(dest, e.path))
            if not (e.type == DIR and existing_dir):
                plan.conflict_count += 1
                if len(plan.conflicts) < EXAMPLES:
                    plan.conflicts.append(e.name)
    missing = needed - set(plan.backup.doc["archives"])
    if missing:
        raise ConfigError(f"the manifest of {plan.backup.backup_id} does not name archives {sorted(missing)}")
    plan.archives = {k: v for k, v in plan.backup.doc["archives"].items() if k in needed}
    if plan.escaping_count and not allow_escaping_links:
        raise ConfigError(
            f"{plan.escaping_count} symlinks point outside the destination, e.g. {plan.escaping_links[:3]}",
            hint="set allow_escaping_links = true to make them anyway (they are links, not files), "
                 "or restore a path that leaves them out; nothing was restored",
        )
    return plan


def deliver_local(entries: Iterator[Entry], staging: Path, dest: Path, keep_dir: Path) -> int:
    """Move the staged tree into ``dest``: by one rename when ``dest`` is new, else entry by entry,
    moving each existing entry it replaces into ``keep_dir`` first. Returns how many were kept."""
    if not dest.exists():
        os.rename(staging, dest)
        return 0
    kept = 0
    sbase, dbase, kbase = os.fsencode(staging), os.fsencode(dest), os.fsencode(keep_dir)
    for e in entries:
        src, tgt = os.path.join(sbase, e.path), os.path.join(dbase, e.path)
        if not os.path.lexists(src):
            continue  # a link that was not made, or a folder moved with its parent
        if os.path.lexists(tgt):
            if e.type == DIR and os.path.isdir(tgt) and not os.path.islink(tgt):
                continue  # merge into the existing folder
            aside = os.path.join(kbase, e.path)
            os.makedirs(os.path.dirname(aside), mode=0o700, exist_ok=True)
            os.rename(tgt, aside)
            kept += 1
        os.makedirs(os.path.dirname(tgt), mode=0o755, exist_ok=True)
        os.rename(src, tgt)
    shutil.rmtree(staging)
    return kept


def deliver_host(settings: Settings, dest: Destination, staging: Path, confirmed: bool, stamp: str) -> dict[str, Any]:
    """rsync the staged tree to the host; overwritten files go to rsync's backup folder there. Without
    ``confirmed``, a dry run first refuses if anything existing would change."""
    from luxima_backup.ssh import private_key_file

    assert dest.host is not None
    host = settings.hosts[dest.host]
    key_text = runtime.secret(host.key, settings)
    remote = f"{host.host}:{dest.path}/"
    with private_key_file(key_text, settings.work_dir) as key_file:
        base = ["rsync", "--archive", "--protect-args", "--numeric-ids", "-e", shlex.join(ssh.ssh_command(host, key_file))]
        if not confirmed:
            probe = _rsync([*base, "--dry-run", "--existing", "--itemize-changes", f"{staging}/", remote])
            # "<f" a file that would be sent over an existing one (itemize: "<" = to the remote)
            changed = [line for line in probe.splitlines() if line[:2] in ("<f", "<L", "cL", "cd", "cf") or line.startswith("*deleting")]
            if changed:
                raise ConfigError(f"restoring into {dest.label} would overwrite {len(changed)} existing entries, e.g. {changed[:3]}",
                                  hint=f"set confirm = {dest.label!r} to overwrite them (each is kept in a backup folder on the host)")
        backup_dir = f".luxima-pre-restore-{stamp}"
        _rsync([*base, "--backup", f"--backup-dir={backup_dir}", f"{staging}/", remote])
    return {"kept_in": f"{dest.path}/{backup_dir}"}


def _rsync(args: list[str]) -> str:
    proc = procs.run(args)
    if proc.returncode != 0:
        raise ToolError(f"rsync to the host failed (exit {proc.returncode}): {redact(proc.stderr.decode(errors='replace'))[-1000:]}",
                        transient=proc.returncode in {5, 10, 12, 30, 35, 255})
    return proc.stdout.decode(errors="replace")


def md5_check_host(settings: Settings, dest: Destination, entries: Iterator[Entry]) -> tuple[int, list[dict[str, Any]]]:
    """md5sum of every restored file on the host, against the backup's md5."""
    assert dest.host is not None
    expected = {e.path: e.md5 for e in entries if e.type == FILE}
    with runtime.connect_host(dest.host, settings) as client:
        out = ssh.run_with_input(client, f"cd {shlex.quote(dest.path)} && xargs -0 md5sum --zero --",
                                 b"".join(p + b"\0" for p in expected))
    got: dict[bytes, str] = {}
    for record in out.split(b"\0"):
        if record:
            digest, _, name = record.partition(b"  ")
            got[name] = digest.decode()
    mismatches = []
    for path, md5 in expected.items():
        if got.get(path) != md5:
            mismatches.append({"path": os.fsdecode(path),
                               "problem": f"md5 {got[path]}, backup says {md5}" if path in got else "missing on the host"})
    return len(got), mismatches


@task(name="deliver", cache_policy=NO_CACHE, persist_result=False)
def deliver(plan_dest: Destination, staging: str, index_spool: str, index_codec: str, path_filter: str | None,
            confirmed: bool, stamp: str) -> dict[str, Any]:
    """Put the checked files in place: local folder or host; what they overwrite is kept aside."""
    settings = runtime.settings()
    unwrap = runtime.key_provider(settings).unwrap
    keep = selector(path_filter)
    if plan_dest.kind == "local":
        dest = Path(plan_dest.path)
        keep_dir = dest.parent / f"{dest.name}.pre-restore-{stamp}"
        kept = deliver_local((e for e in load_index(index_spool, index_codec, unwrap) if keep(e)), Path(staging), dest, keep_dir)
        # folders' mtimes moved as entries arrived in them: set them again where they now live
        if kept or dest.exists():
            apply_metadata((e for e in load_index(index_spool, index_codec, unwrap) if keep(e) and e.type == DIR),
                           dest, os.geteuid() == 0)
        return {"kept": kept, "kept_in": str(keep_dir) if kept else None}
    if plan_dest.kind == "bucket":
        files = [e.path.decode("utf-8") for e in load_index(index_spool, index_codec, unwrap) if keep(e) and e.type == FILE]
        return deliver_bucket(settings, plan_dest, Path(staging), files, confirmed, stamp)
    return deliver_host(settings, plan_dest, Path(staging), confirmed, stamp)


def _bucket_client(settings: Settings, dest: Destination) -> Any:
    from tasks.sync import source_client

    assert dest.via is not None
    return source_client(settings, settings.file_source(dest.via))


def existing_objects(settings: Settings, dest: Destination) -> set[str]:
    """Keys under the destination prefix now (what a restore would overwrite)."""
    from luxima_backup.storage import translate_errors

    client = _bucket_client(settings, dest)
    keys: set[str] = set()
    with translate_errors(f"listing {dest.label}"):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=dest.bucket, Prefix=dest.path):
            keys.update(o["Key"] for o in page.get("Contents", []))
    return keys


def deliver_bucket(settings: Settings, dest: Destination, staging: Path, files: list[str], confirmed: bool,
                   stamp: str) -> dict[str, Any]:
    """Upload the checked files; with ``confirmed``, each object they replace is first copied aside in the bucket."""
    from luxima_backup.bucket_mirror import upload_tree
    from luxima_backup.storage import translate_errors

    client = _bucket_client(settings, dest)
    aside = f"{dest.path}.luxima-pre-restore-{stamp}/"
    kept = 0
    if confirmed:
        existing = existing_objects(settings, dest)
        for rel in files:
            key = dest.path + rel
            if key in existing:
                with translate_errors(f"keeping {key} aside"):
                    client.copy_object(Bucket=dest.bucket, Key=aside + rel, CopySource={"Bucket": dest.bucket, "Key": key})
                kept += 1
    assert dest.bucket is not None
    upload_tree(client, dest.bucket, dest.path, staging, files, overwrite=confirmed)
    return {"kept": kept, "kept_in": f"s3://{dest.bucket}/{aside}" if kept else None}


def md5_check_bucket(settings: Settings, dest: Destination, entries: Iterator[Entry]) -> tuple[int, list[dict[str, Any]]]:
    """Read every restored object back from the bucket and compare its md5 with the backup's."""
    import hashlib

    from luxima_backup.storage import translate_errors

    client = _bucket_client(settings, dest)
    checked, mismatches = 0, []
    for e in entries:
        if e.type != FILE:
            continue
        key = dest.path + e.path.decode("utf-8")
        md5 = hashlib.md5(usedforsecurity=False)
        try:
            with translate_errors(f"reading back {key}"):
                body = client.get_object(Bucket=dest.bucket, Key=key)["Body"]
                while block := body.read(1 << 20):
                    md5.update(block)
        except Exception as exc:  # a missing or unreadable object is a failed check, listed
            mismatches.append({"path": e.name, "problem": f"cannot read back {key}: {exc}"})
            continue
        checked += 1
        if md5.hexdigest() != e.md5:
            mismatches.append({"path": e.name, "problem": f"md5 {md5.hexdigest()}, backup says {e.md5}"})
    return checked, mismatches


@task(name="verify-restored-files", cache_policy=NO_CACHE, persist_result=False)
def verify_restored(plan_dest: Destination, index_spool: str, index_codec: str, path_filter: str | None) -> dict[str, Any]:
    """md5 of every restored file where it now lives, against the backup (the procedure's md5sum check)."""
    settings = runtime.settings()
    keep = selector(path_filter)
    entries = (e for e in load_index(index_spool, index_codec, runtime.key_provider(settings).unwrap) if keep(e))
    if plan_dest.kind == "local":
        checked, mismatches = md5_check(entries, Path(plan_dest.path))
    elif plan_dest.kind == "bucket":
        checked, mismatches = md5_check_bucket(settings, plan_dest, entries)
    else:
        checked, mismatches = md5_check_host(settings, plan_dest, entries)
    return {"checked": checked, "mismatches": mismatches}


@flow(name="files-restore", validate_parameters=True, persist_result=True)
def files_restore(
    destination: str,
    backup: str = "latest",
    source: str | None = None,
    as_of: datetime | None = None,
    path: str | None = None,
    confirm: str | None = None,
    allow_escaping_links: bool = False,
) -> dict[str, Any]:
    """Restore a file backup into a folder (here or on a host), then check the md5 of every restored file.

    Args:
        destination: an absolute folder here (created if missing), HOST:/folder for a [hosts.HOST], or
            s3://BUCKET/PREFIX of a bucket a [files_backup.sources.NAME] reads (its endpoint and credentials).
        backup: "latest" (newest verified backup of the source), a backup id, or an object key.
        source: which [files_backup.sources.NAME] the backup was taken of (default: the only one).
        as_of: with "latest": the newest verified backup completed at or before this time.
        path: restore only this folder or file (relative to the source's root), e.g. "avatars/2026".
        confirm: needed when existing files would be overwritten: the destination exactly as given.
            Each overwritten file is kept (beside the destination, in a backup folder on the host, or
            copied under PREFIX.luxima-pre-restore-TIME/ in the bucket).
        allow_escaping_links: make symlinks that point outside the destination (refused by default).
    """
    with runtime.time_limit(lambda s: s.restore.timeout_seconds, "files-restore"):  # read from the settings at run time
        t0 = time.monotonic()
        started = datetime.now(timezone.utc)
        settings = runtime.settings()
        install_log_redaction()
        logger = get_run_logger()
        dest = parse_destination(settings, destination, source)
        names = list(settings.files_backup.sources)
        if source is None and backup == "latest":
            if len(names) != 1:
                raise ConfigError(f"say which source to restore: one of {names}", hint="set source")
            source = names[0]
        found = catalog.resolve(runtime.store(settings), settings.storage.prefix, "files", backup, source=source, as_of=as_of)
        if found.component != "files" or "index" not in found.doc:
            raise ConfigError(f"{found.manifest_key} is not a file backup")
        source_name = found.doc["source"]["name"]
        confirmed = confirm is not None and confirm.strip() == destination.strip()
        if confirm is not None and not confirmed:
            raise ConfigError(f"confirm = {confirm!r} does not match destination {destination!r}",
                              hint="confirm must repeat the destination exactly")
        stamp = started.strftime("%Y%m%dT%H%M%SZ")
        plan = Plan(found, dest, path)
        idx = found.doc["index"]
        codec = idx["compression"]["codec"]
        timings: dict[str, float] = {}
        checks: list[dict[str, Any]] = []
        mismatches: list[dict[str, Any]] = []
        outcome: dict[str, Any] = {}
        work = private_dir(settings.work_dir, "files-restore-")
        staging: Path | None = None
        try:
            index_spool = str(work / "index.enc")
            dl = download(idx["key"], index_spool, idx["size_encrypted"], idx["sha256_encrypted"])
            timings["index"] = dl["seconds"]
            unwrap = runtime.key_provider(settings).unwrap
            existing = existing_objects(settings, dest) if dest.kind == "bucket" else None
            # a bucket holds no links: they are counted, not refused
            scan(plan, load_index(index_spool, codec, unwrap), allow_escaping_links or dest.kind == "bucket", existing)
            if plan.files + plan.dirs + plan.symlinks == 0:
                raise ConfigError(f"nothing in {found.backup_id} matches path {path!r}", hint="paths are relative to the source's root")
            if plan.conflict_count and not confirmed:
                raise ConfigError(f"restoring into {dest.label} would overwrite {plan.conflict_count} existing entries, e.g. {plan.conflicts[:3]}",
                                  hint=f"choose a new folder, or set confirm = {destination!r} to overwrite (each is kept aside)")
            logger.info("restoring %d files (%d bytes) of %s from %d archive(s) into %s", plan.files, plan.bytes,
                        found.backup_id, len(plan.archives), dest.label)
            staging = _staging(settings, dest, stamp)

            t = time.monotonic()
            for archive_id, info in plan.archives.items():
                result = extract(archive_id, info, index_spool, codec, path, str(staging))
                mismatches += result["mismatches"]
            links = make_links_and_dirs((e for e in load_index(index_spool, codec, unwrap) if selector(path)(e)),
                                        staging, allow_escaping_links)
            apply_metadata((e for e in load_index(index_spool, codec, unwrap) if selector(path)(e)), staging, os.geteuid() == 0)
            timings["extract"] = round(time.monotonic() - t, 3)
            if mismatches:
                raise VerificationError(f"{len(mismatches)} files of {found.backup_id} do not match the index; nothing was restored")

            t = time.monotonic()
            delivered = deliver(dest, str(staging), index_spool, codec, path, confirmed, stamp)
            if dest.kind == "local":
                staging = None  # it is the destination now, or emptied and removed
            timings["deliver"] = round(time.monotonic() - t, 3)

            t = time.monotonic()
            verified = verify_restored(dest, index_spool, codec, path)
            timings["verify"] = round(time.monotonic() - t, 3)
            mismatches += verified["mismatches"]
            checks = [
                _check("files restored", plan.files, verified["checked"]),
                _check("md5 mismatches", 0, len(verified["mismatches"])),
                _check("symlinks made", plan.symlinks if dest.kind != "bucket" else links["symlinks"], links["symlinks"]),
            ]
            rto = time.monotonic() - t0
            _publish(plan, checks, mismatches, rto, settings.restore.rto_target_minutes * 60, timings, delivered)
            if mismatches or not all(c["ok"] for c in checks):
                raise VerificationError(f"restored files in {dest.label} failed the md5 check: {len(mismatches)} mismatches",
                                        hint="see the restore artifact for the list")
            outcome = {"status": "success", "rto_seconds": round(rto, 3)}
        except BaseException as exc:
            if events.is_verification_failure(exc):
                if not checks:
                    _publish(plan, checks, mismatches, time.monotonic() - t0, settings.restore.rto_target_minutes * 60, timings, {})
                events.verification_failed("restore", "files", source_name, str(exc), backup_id=found.backup_id,
                                           destination=dest.label)
            outcome = {"status": "failed", "error": redact(f"{type(exc).__name__}: {exc}")}
            raise
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
            _log(settings, plan, source_name, started, outcome, timings, checks, mismatches)
        events.restore_succeeded("files", source_name, found.backup_id, destination=dest.label, rto_seconds=outcome["rto_seconds"])
        logger.info("restore of %s into %s complete: %d files, md5 checked, in %.0fs", found.backup_id, dest.label,
                    plan.files, outcome["rto_seconds"])
        return {"backup_id": found.backup_id, "destination": dest.label, "path": path, "files": plan.files,
                "bytes": plan.bytes, "dirs": plan.dirs, "symlinks": links["symlinks"], "archives_read": len(plan.archives),
                "md5_checked": verified["checked"], "kept": delivered.get("kept"), "kept_in": delivered.get("kept_in"),
                "timings": timings, "rto_seconds": outcome["rto_seconds"]}


def _staging(settings: Settings, dest: Destination, stamp: str) -> Path:
    """Local: a hidden folder beside the destination (same file system, so delivery is a rename); host: private work space."""
    if dest.kind == "local":
        target = Path(dest.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".{target.name}.restoring-{stamp}"
        staging.mkdir(mode=0o700)
        return staging
    return Path(tempfile.mkdtemp(prefix="files-restore-staging-", dir=private_dir(settings.work_dir, "files-restore-")))


def _check(name: str, expected: Any, actual: Any) -> dict[str, Any]:
    return {"check": name, "expected": str(expected), "actual": str(actual), "ok": expected == actual}


def _publish(plan: Plan, checks: list[dict[str, Any]], mismatches: list[dict[str, Any]], rto: float, rto_target: float,
             timings: dict[str, float], delivered: dict[str, Any]) -> None:
    key = "".join(ch if ch.isalnum() else "-" for ch in f"files-restore-{plan.backup.doc['source']['name']}".lower())
    if mismatches:
        create_table_artifact(key=f"{key}-mismatches", table=mismatches[:1000],
                              description=f"Files of {plan.backup.backup_id} that do not match the backup ({len(mismatches)})")
    ok = not mismatches and all(c["ok"] for c in checks)
    lines = [
        f"## Restore of `{plan.backup.backup_id}` into `{plan.destination.label}`" + (f" (path `{plan.path_filter}`)" if plan.path_filter else ""),
        "",
        f"**{'All checks passed' if ok else 'CHECKS FAILED'}** — {plan.files} files ({plan.bytes} bytes), {plan.dirs} folders, "
        f"{plan.symlinks} symlinks, from {len(plan.archives)} archive(s)",
        "",
        f"RTO (start to verified): **{rto / 60:.1f} min** against the {rto_target / 60:.0f} min target",
        "",
        "| stage | seconds |", "|---|---:|", *[f"| {s} | {v:.1f} |" for s, v in timings.items()],
        "",
        "| check | expected | actual | ok |", "|---|---|---|---|",
        *[f"| {c['check']} | {c['expected']} | {c['actual']} | {'yes' if c['ok'] else '**NO**'} |" for c in checks],
    ]
    if delivered.get("kept_in"):
        lines += ["", f"Overwritten entries were kept in `{delivered['kept_in']}`."]
    if mismatches:
        lines += ["", f"### {len(mismatches)} mismatches", "", "| file | problem |", "|---|---|",
                  *[f"| `{m['path']}` | {m['problem']} |" for m in mismatches[:50]]]
    create_markdown_artifact(key=f"{key}-summary", markdown=redact("\n".join(lines)), description="Files restore summary")


def _log(settings: Settings, plan: Plan, source: str, started: datetime, outcome: dict[str, Any], timings: dict[str, float],
         checks: list[dict[str, Any]], mismatches: list[dict[str, Any]]) -> None:
    if not settings.log.enabled or not outcome:
        return
    a = plan.backup.doc["archive"]
    state = log_run(
        "restore", "files", plan.destination.label, source, outcome["status"], started, plan.backup.backup_id, a["key"],
        str(flow_run.id) if flow_run.id else None, outcome.get("error"),
        {"timings": timings, "checks": checks, "mismatches": mismatches[:100], "path": plan.path_filter,
         "files": plan.files, "bytes": plan.bytes, "archives": list(plan.archives), "rto_seconds": outcome.get("rto_seconds")},
        {"size_encrypted": a["size_encrypted"], "sha256_encrypted": a["sha256_encrypted"], "key_id": a["encryption"].get("key_id")},
        return_state=True,
    )
    if not state.is_completed():
        get_run_logger().warning("restore log not written: %s", redact(str(state.result(raise_on_failure=False))))
