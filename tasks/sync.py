"""Sync stage: bring a file source into its persistent staging mirror, transferring only what changed.

Local and SSH sources go through rsync (over OpenSSH with the configured known_hosts only, after a
paramiko check that gives clear errors for unknown or changed host keys); buckets through
``bucket_mirror``. A source that vanished is refused before anything is touched, and rsync's
``--max-delete`` keeps a source that lost most of its files from emptying the mirror.
"""

from __future__ import annotations

import re
import shlex
import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from luxima_backup import procs, runtime, ssh
from luxima_backup.bucket_mirror import source_client
from luxima_backup.workdir import ensure_private
from luxima_backup.errors import ConfigError, SourceError, ToolError
from luxima_backup.manifest import safe_name
from luxima_backup.secrets import redact
from luxima_backup.settings import FileSource, Settings

# rsync exit codes (rsync(1) "EXIT VALUES") that a later attempt may not hit.
_TRANSIENT_RC = {5, 10, 11, 12, 14, 20, 30, 35, 255}
VANISHED_RC = 24   # files vanished while transferring: the source changed under us, not an error
MAX_DELETE_RC = 25  # --max-delete stopped deletions

_STATS = {
    "files": r"Number of files: (\d+)",
    "regular_files": r"Number of files: \d+ \(reg: (\d+)",
    "created_files": r"Number of created files: (\d+)",
    "deleted_files": r"Number of deleted files: (\d+)",
    "transferred_files": r"Number of regular files transferred: (\d+)",
    "total_bytes": r"Total file size: (\d+)",
    "transferred_bytes": r"Total transferred file size: (\d+)",
}


def mirror_path(settings: Settings, source: str) -> Path:
    """The source's folder in the staging mirror; the mirror's root is private (0700)."""
    return ensure_private(settings.mirror_dir, "files_backup.mirror_dir") / safe_name(source)


def parse_stats(text: str) -> dict[str, int]:
    out = {}
    for name, pattern in _STATS.items():
        m = re.search(pattern, text)
        out[name] = int(m.group(1)) if m else 0
    return out


def rsync(src: str, mirror: Path, exclude: list[str], max_delete: int | None, timeout: int,
          ssh_cmd: list[str] | None = None) -> dict[str, Any]:
    """``rsync -a --delete src/ mirror/``; returns its statistics. Errors say whether a retry may help."""
    args = ["rsync", "--archive", "--delete", "--delete-excluded", "--numeric-ids", "--protect-args", "--stats",
            "--no-human-readable", f"--timeout={timeout}",
            # compare mtimes to the nanosecond (the default is whole seconds): a folder or file changed
            # within the second of the last sync would otherwise keep a stale mtime in the mirror
            "--modify-window=-1"]
    if max_delete is not None:
        args.append(f"--max-delete={max_delete}")
    args += [f"--exclude={pattern}" for pattern in exclude]
    if ssh_cmd is not None:
        args += ["-e", shlex.join(ssh_cmd)]
    mirror.mkdir(exist_ok=True, mode=0o700)
    started = time.monotonic()
    proc = procs.run([*args, src.rstrip("/") + "/", f"{mirror}/"])
    out, err = proc.stdout.decode(errors="replace"), redact(proc.stderr.decode(errors="replace").strip())
    stats = parse_stats(out)
    stats.update(seconds=round(time.monotonic() - started, 3), tool="rsync")
    if proc.returncode == MAX_DELETE_RC:
        raise SourceError(
            f"the source {src} lost more files than allowed: rsync stopped after {max_delete} deletions; the mirror keeps the rest",
            hint="if the files were removed on purpose, run once with allow_shrink = true",
        )
    if proc.returncode == VANISHED_RC:
        # a count, never the names rsync prints: this goes into the manifest, stored unencrypted
        vanished = sum(1 for line in err.splitlines() if "vanished" in line)
        stats["warning"] = (f"{vanished} file(s) vanished while they were copied (removed or renamed on the source "
                            "during the run); the next backup has the source as it is then")
    elif proc.returncode != 0:
        raise ToolError(f"rsync from {src} failed (exit {proc.returncode}): {err[-1000:]}",
                        transient=proc.returncode in _TRANSIENT_RC)
    return stats


def sync_source(settings: Settings, name: str, source: FileSource, previous_entries: int | None,
                allow_shrink: bool) -> dict[str, Any]:
    """Bring ``source`` into its mirror; returns statistics (files, transferred, deleted, seconds).

    ``previous_entries`` (files, folders and links of the last backup) bounds rsync's deletions
    by the source's ``max_shrink_percent``, so a source that lost most of its tree cannot empty
    the mirror before the count check fails the run.
    """
    mirror = mirror_path(settings, name)
    max_delete = None
    if previous_entries and not allow_shrink and source.max_shrink_percent < 100:
        # at least 1: rsync takes --max-delete=0 as "no deletions at all" only in newer versions
        max_delete = max(1, int(previous_entries * source.max_shrink_percent / 100))
    timeout = settings.files_backup.rsync_timeout
    if source.kind == "local":
        if not Path(source.path).is_dir():
            raise SourceError(f"source {name}: {source.path} does not exist or is not a directory",
                              hint="the source vanished (an unmounted volume?); the mirror and the backups are untouched")
        return rsync(source.path, mirror, source.exclude, max_delete, timeout)
    if source.kind == "ssh":
        assert source.host is not None
        host = settings.hosts[source.host]
        key_text = runtime.secret(host.key, settings)
        with ssh.connect(host, key_text) as client:
            status, _, err = ssh.run(client, f"test -d {shlex.quote(source.path)} && command -v rsync >/dev/null", timeout=60)
            if status != 0:
                status_dir, _, _ = ssh.run(client, f"test -d {shlex.quote(source.path)}", timeout=60)
                if status_dir != 0:
                    raise SourceError(f"source {name}: {source.path} does not exist on {source.host}",
                                      hint="the source vanished (an unmounted volume?); the mirror and the backups are untouched")
                raise ConfigError(f"rsync is not installed on {source.host}", hint="install rsync on the host")
        with ssh.private_key_file(key_text, settings.work_dir) as key_file:
            return rsync(f"{host.host}:{source.path}", mirror, source.exclude, max_delete, timeout,
                         ssh.ssh_command(host, key_file))
    return _sync_bucket(settings, name, source, mirror)


def _sync_bucket(settings: Settings, name: str, source: FileSource, mirror: Path) -> dict[str, Any]:
    from luxima_backup.bucket_mirror import mirror_bucket
    from luxima_backup.storage import translate_errors

    started = time.monotonic()
    mirror.mkdir(exist_ok=True, mode=0o700)
    with translate_errors(f"opening bucket {source.bucket}"):
        client = source_client(settings, source)
    assert source.bucket is not None
    stats = mirror_bucket(client, source.bucket, source.path, mirror, exclude=source.exclude)
    return {"files": stats.files, "regular_files": stats.files, "transferred_files": stats.transferred_files,
            "transferred_bytes": stats.transferred_bytes, "deleted_files": stats.deleted_files,
            "total_bytes": stats.bytes, "seconds": round(time.monotonic() - started, 3), "tool": "s3"}


@task(name="sync", cache_policy=NO_CACHE, persist_result=False, **runtime.TRANSIENT_RETRIES)
def sync(source: str, previous_entries: int | None, allow_shrink: bool) -> dict[str, Any]:
    """Bring the source into its staging mirror (rsync or bucket sync): only what changed moves."""
    settings = runtime.settings()
    result = sync_source(settings, source, settings.file_source(source), previous_entries, allow_shrink)
    logger = get_run_logger()
    logger.info("synced %s: %d files transferred (%d bytes), %d deleted, in %.1fs", source,
                result["transferred_files"], result["transferred_bytes"], result["deleted_files"], result["seconds"])
    if result.get("warning"):
        logger.warning("%s", result["warning"])
    return result
