"""Where a files restore puts what it restored: a folder here, a folder on a host, or a bucket.

One small interface beside ``storage``: each destination knows where the restore stages its
files, what a restore would overwrite, how to deliver the checked tree (keeping what it replaces),
and how to read every restored file back for the md5 check (the procedure's md5sum). ``parse``
turns what the operator typed (``/folder``, ``HOST:/folder``, ``s3://BUCKET/PREFIX``) into one.

Destinations are small dataclasses (names, never data or clients), so they can travel as task
parameters; each method opens what it needs from the settings it is given.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

from . import procs, ssh
from .errors import ConfigError, ToolError
from .filetree import DIR, FILE, Entry, apply_metadata, md5_check
from .secrets import redact
from .settings import Settings
from .workdir import private_dir

Entries = Callable[[], Iterator[Entry]]  # the restored entries, read again from the index at each call


class Destination:
    """What the files restore needs of a place to restore into."""

    kind: ClassVar[str]
    holds_links: ClassVar[bool] = True  # a bucket does not: its links are counted, not made
    consumes_staging: ClassVar[bool] = False  # delivery moves the staged tree itself (nothing to remove after)

    @property
    def label(self) -> str:
        raise NotImplementedError

    def staging(self, settings: Settings, stamp: str) -> Path:
        """A private folder to extract into before anything reaches the destination."""
        return Path(tempfile.mkdtemp(prefix="files-restore-staging-", dir=private_dir(settings.work_dir, "files-restore-")))

    def conflicts(self, settings: Settings) -> Callable[[Entry], str | None]:
        """Per entry: what it would overwrite here (a name to show), or None. Checked before extracting."""
        return lambda e: None

    def deliver(self, settings: Settings, staging: Path, entries: Entries, confirmed: bool, stamp: str) -> dict[str, Any]:
        """Put the checked tree in place; what it overwrites is kept aside. Returns ``kept`` and ``kept_in``."""
        raise NotImplementedError

    def md5_check(self, settings: Settings, entries: Iterator[Entry]) -> tuple[int, list[dict[str, Any]]]:
        """md5 of every restored file read back where it now lives: (files checked, mismatches)."""
        raise NotImplementedError


@dataclass(frozen=True)
class LocalFolder(Destination):
    path: str
    kind: ClassVar[str] = "local"
    consumes_staging: ClassVar[bool] = True

    @property
    def label(self) -> str:
        return self.path

    def staging(self, settings: Settings, stamp: str) -> Path:
        # beside the destination: the same file system, so delivering a new folder is one rename
        target = Path(self.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".{target.name}.restoring-{stamp}"
        staging.mkdir(mode=0o700)
        return staging

    def conflicts(self, settings: Settings) -> Callable[[Entry], str | None]:
        dest = os.fsencode(self.path)

        def check(e: Entry) -> str | None:
            there = os.path.join(dest, e.path)
            if not os.path.lexists(there):
                return None
            existing_dir = os.path.isdir(there) and not os.path.islink(there)
            return None if e.type == DIR and existing_dir else e.name  # folders merge

        return check

    def deliver(self, settings: Settings, staging: Path, entries: Entries, confirmed: bool, stamp: str) -> dict[str, Any]:
        dest = Path(self.path)
        keep_dir = dest.parent / f"{dest.name}.pre-restore-{stamp}"
        kept = _move_in(entries(), staging, dest, keep_dir)
        # folders' mtimes moved as entries arrived in them: set them again where they now live
        apply_metadata((e for e in entries() if e.type == DIR), dest, os.geteuid() == 0)
        return {"kept": kept, "kept_in": str(keep_dir) if kept else None}

    def md5_check(self, settings: Settings, entries: Iterator[Entry]) -> tuple[int, list[dict[str, Any]]]:
        return md5_check(entries, Path(self.path))


def _move_in(entries: Iterator[Entry], staging: Path, dest: Path, keep_dir: Path) -> int:
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


@dataclass(frozen=True)
class HostFolder(Destination):
    host: str  # [hosts.NAME]
    path: str
    kind: ClassVar[str] = "host"

    @property
    def label(self) -> str:
        return f"{self.host}:{self.path}"

    # conflicts: found by an rsync dry run just before delivery (the host is only reached then)

    def deliver(self, settings: Settings, staging: Path, entries: Entries, confirmed: bool, stamp: str) -> dict[str, Any]:
        """rsync the staged tree to the host; overwritten files go to rsync's backup folder there. Without
        ``confirmed``, a dry run first refuses if anything existing would change."""
        from . import runtime

        host = settings.hosts[self.host]
        remote = f"{host.host}:{self.path}/"
        with ssh.private_key_file(runtime.secret(host.key, settings), settings.work_dir) as key_file:
            base = ["rsync", "--archive", "--protect-args", "--numeric-ids", "-e", shlex.join(ssh.ssh_command(host, key_file))]
            if not confirmed:
                probe = _rsync([*base, "--dry-run", "--existing", "--itemize-changes", f"{staging}/", remote])
                # "<f" a file that would be sent over an existing one (itemize: "<" = to the remote)
                changed = [line for line in probe.splitlines()
                           if line[:2] in ("<f", "<L", "cL", "cd", "cf") or line.startswith("*deleting")]
                if changed:
                    raise ConfigError(f"restoring into {self.label} would overwrite {len(changed)} existing entries, e.g. {changed[:3]}",
                                      hint=f"set confirm = {self.label!r} to overwrite them (each is kept in a backup folder on the host)")
            backup_dir = f".luxima-pre-restore-{stamp}"
            _rsync([*base, "--backup", f"--backup-dir={backup_dir}", f"{staging}/", remote])
        return {"kept": None, "kept_in": f"{self.path}/{backup_dir}"}

    def md5_check(self, settings: Settings, entries: Iterator[Entry]) -> tuple[int, list[dict[str, Any]]]:
        """md5sum of every restored file on the host, against the backup's md5."""
        from . import runtime

        expected = {e.path: e.md5 for e in entries if e.type == FILE}
        with runtime.connect_host(self.host, settings) as client:
            out = ssh.run_with_input(client, f"cd {shlex.quote(self.path)} && xargs -0 md5sum --zero --",
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


def _rsync(args: list[str]) -> str:
    proc = procs.run(args)
    if proc.returncode != 0:
        raise ToolError(f"rsync to the host failed (exit {proc.returncode}): {redact(proc.stderr.decode(errors='replace'))[-1000:]}",
                        transient=proc.returncode in {5, 10, 12, 30, 35, 255})
    return proc.stdout.decode(errors="replace")


@dataclass(frozen=True)
class BucketPrefix(Destination):
    bucket: str
    prefix: str  # "" or ending in "/"
    via: str  # the [files_backup.sources.NAME] whose endpoint and credentials reach the bucket
    kind: ClassVar[str] = "bucket"
    holds_links: ClassVar[bool] = False

    @property
    def label(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def _client(self, settings: Settings) -> Any:
        from .bucket_mirror import source_client

        return source_client(settings, settings.file_source(self.via))

    def key(self, e: Entry) -> str:
        try:
            return self.prefix + e.path.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{e.name!r} is not a UTF-8 name and cannot be an object key",
                              hint="restore into a folder instead") from None

    def existing(self, settings: Settings) -> set[str]:
        """Keys under the prefix now (what a restore would overwrite)."""
        from .storage import translate_errors

        client = self._client(settings)
        keys: set[str] = set()
        with translate_errors(f"listing {self.label}"):
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
                keys.update(o["Key"] for o in page.get("Contents", []))
        return keys

    def conflicts(self, settings: Settings) -> Callable[[Entry], str | None]:
        existing = self.existing(settings)

        def check(e: Entry) -> str | None:
            if e.type != FILE:
                return None
            key = self.key(e)  # a name that cannot be a key is refused here, before anything is extracted
            return key if key in existing else None

        return check

    def deliver(self, settings: Settings, staging: Path, entries: Entries, confirmed: bool, stamp: str) -> dict[str, Any]:
        """Upload the checked files; with ``confirmed``, each object they replace is first copied aside in the bucket."""
        from .bucket_mirror import upload_tree
        from .storage import translate_errors

        files = [e.path.decode("utf-8") for e in entries() if e.type == FILE]
        client = self._client(settings)
        aside = f"{self.prefix}.luxima-pre-restore-{stamp}/"
        kept = 0
        if confirmed:
            existing = self.existing(settings)
            for rel in files:
                key = self.prefix + rel
                if key in existing:
                    with translate_errors(f"keeping {key} aside"):
                        client.copy_object(Bucket=self.bucket, Key=aside + rel, CopySource={"Bucket": self.bucket, "Key": key})
                    kept += 1
        upload_tree(client, self.bucket, self.prefix, staging, files, overwrite=confirmed)
        return {"kept": kept, "kept_in": f"s3://{self.bucket}/{aside}" if kept else None}

    def md5_check(self, settings: Settings, entries: Iterator[Entry]) -> tuple[int, list[dict[str, Any]]]:
        """Read every restored object back from the bucket and compare its md5 with the backup's."""
        from .storage import translate_errors

        client = self._client(settings)
        checked, mismatches = 0, []
        for e in entries:
            if e.type != FILE:
                continue
            key = self.key(e)
            md5 = hashlib.md5(usedforsecurity=False)
            try:
                with translate_errors(f"reading back {key}"):
                    body = client.get_object(Bucket=self.bucket, Key=key)["Body"]
                    while block := body.read(1 << 20):
                        md5.update(block)
            except Exception as exc:  # a missing or unreadable object is a failed check, listed
                mismatches.append({"path": e.name, "problem": f"cannot read back {key}: {exc}"})
                continue
            checked += 1
            if md5.hexdigest() != e.md5:
                mismatches.append({"path": e.name, "problem": f"md5 {md5.hexdigest()}, backup says {e.md5}"})
        return checked, mismatches


def parse(settings: Settings, text: str, source: str | None) -> Destination:
    """``/folder`` here, ``HOST:/folder`` on a [hosts.HOST], or ``s3://BUCKET/PREFIX`` of a configured bucket source."""
    text = text.strip()
    if text.startswith("/"):
        return LocalFolder(os.path.normpath(text))
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
        return BucketPrefix(bucket, prefix.strip("/") + "/" if prefix.strip("/") else "", via)
    host, sep, path = text.partition(":")
    if sep and host in settings.hosts and path.startswith("/"):
        return HostFolder(host, os.path.normpath(path))
    raise ConfigError(f"destination {text!r} is not an absolute folder, HOST:/folder with HOST one of {sorted(settings.hosts)}, "
                      "or s3://BUCKET/PREFIX", hint="e.g. /srv/restore/userfiles, files1:/srv/storage or s3://avatars/restored/")
