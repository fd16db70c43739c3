"""Commit stage of the config backup: each host's scrubbed tree into its folder of the git working copy, one commit.

The commit message says what changed per host (added, changed, removed files, and files whose
mode or owner alone changed). A run that changed nothing makes no commit. The working copy is
first brought up to date with the remote (our unpushed commits rebased on it), so a commit is
made on top of what others pushed; when the remote cannot be reached the commit is made
anyway and pushed by a later run.

The gate, fail-closed: once a host's tree is staged, every staged file of that host is read
back from the index and checked with the scrubber's own detectors (``config_secrets.check``).
Anything secret-looking left and the host is taken out of the commit: its folder and index
entries go back to the last commit, so nothing of it is committed or pushed, and the result
names each file and line (never a value) under ``blocked``. The other hosts are committed.
"""

from __future__ import annotations

import contextlib
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator
from zoneinfo import ZoneInfo

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from luxima_backup import config_secrets, runtime
from luxima_backup.errors import BackupError, GitError
from luxima_backup.gitrepo import HostChanges, Repo
from luxima_backup.settings import Settings
from luxima_backup.ssh import private_key_file
from luxima_backup.workdir import ensure_private
from tasks.fetch import META_NAME, fingerprint_key, secret_rules

LISTED = 100  # paths listed per host and kind of change in a commit message
GATE_LISTED = 20  # findings named in a gate's error
README = """# Service configs backed up by Luxima Backup

One folder per host, holding the configured paths at their absolute location
(`web1/etc/nginx/nginx.conf` is `/etc/nginx/nginx.conf` on `web1`). Each commit is one
backup run that found changes; its message lists them per host.

Secrets are not here. Every secret value (passwords, tokens, keys in `.env` files, compose
files, nginx configs, URLs with credentials, private keys; well-known token formats and
random-looking values whatever their name) is replaced by
`luxima-redacted:hmac-sha256:<16 hex digits>`, a keyed fingerprint: equal values have equal
fingerprints, and a changed secret shows up as a changed fingerprint, without revealing it.
Whole secret files (private keys, htpasswd, acme.json, ...) are a short placeholder. Before
each commit, every host's files are checked once more; a host with anything secret-looking
left is not committed at all.

`<host>/.luxima-meta.json` keeps what git cannot: each file's mode and owner, which values
were redacted (line, name, kind: never the value), and the fingerprint of the real content.

The real files are only in the encrypted archives on backup storage. Restore with
`luxima-backup restore configs HOST` (or the `config-restore` deployment), never by copying
files out of this repository.
"""


@contextlib.contextmanager
def open_repo(settings: Settings) -> Iterator[Repo]:
    """The working copy, held by this run alone, with the remote's SSH key in a private file while git needs it."""
    import fcntl

    cfg = settings.configs.git
    path = settings.config_repo
    if cfg.working_copy is None:
        ensure_private(settings.work_dir)  # the default copy lives in the work dir: it must be ours alone
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BackupError(f"another run is using the config working copy {path}",
                              hint="wait for it to finish (config backups are limited to one at a time)") from None
        if cfg.over_ssh and cfg.key is not None:
            with private_key_file(runtime.secret(cfg.key, settings), settings.work_dir) as key_file:
                yield Repo(path, cfg, key_file)
        else:
            yield Repo(path, cfg)


def metadata_changes(old_meta: bytes | None, new_meta: Path, changes: HostChanges) -> list[str]:
    """Files whose content is the same but whose mode, owner or link target changed."""
    if old_meta is None:
        return []
    try:
        old = json.loads(old_meta)["files"]
    except (ValueError, KeyError):
        return []
    new = json.loads(new_meta.read_text())["files"]
    touched = {c.path for c in changes.changes}
    return sorted(p for p, m in new.items() if p in old and p not in touched
                  and any(old[p].get(k) != m.get(k) for k in ("mode", "uid", "gid", "symlink")))


def summary(h: HostChanges) -> dict[str, list[str]]:
    return {"added": h.of("A"), "changed": sorted(h.of("M") + h.of("T")), "removed": h.of("D"),
            "metadata": h.metadata_changed}


def message(changed: list[HostChanges], when: datetime) -> str:
    """``Config backup <date>: <hosts>`` and, per host, the counts and paths of each kind of change."""
    local = when.astimezone(ZoneInfo("Asia/Jakarta"))

    def counts(h: HostChanges) -> str:
        s = summary(h)
        return " ".join(f"{sign}{len(s[kind])}" for sign, kind in (("+", "added"), ("~", "changed"), ("-", "removed"),
                                                                     ("mode/owner ", "metadata")) if s[kind])

    lines = [f"Config backup {local:%Y-%m-%d %H:%M} WIB: " + "; ".join(f"{h.host} {counts(h)}" for h in changed), ""]
    for h in changed:
        s = summary(h)
        lines.append(f"{h.host}: {len(s['added'])} added, {len(s['changed'])} changed, {len(s['removed'])} removed"
                     + (f", {len(s['metadata'])} with new mode/owner" if s["metadata"] else ""))
        for kind, sign in (("added", "A"), ("changed", "M"), ("removed", "D"), ("metadata", "P")):
            paths = s[kind]
            lines += [f"  {sign} {p}" for p in paths[:LISTED]]
            if len(paths) > LISTED:
                lines.append(f"  ... and {len(paths) - LISTED} more {kind}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def gate(repo: Repo, host: str, key: bytes, rules: config_secrets.Rules) -> list[dict[str, Any]]:
    """What is still secret-looking in the host's staged files: path on the host, line, kind, name; never a value."""
    left = []
    for path, data in repo.staged_files(host):
        host_path = "/" + path[len(host) + 1:]
        left += [{"path": host_path, "line": f.line, "kind": f.kind, "name": f.name}
                 for f in config_secrets.check(host_path, data, key, rules)]
    return left


def gate_error(host: str, left: list[dict[str, Any]]) -> str:
    """The gate's error for a host: each file and line, what was found there, never the value."""
    named = "; ".join(f"{x['path']} {'line ' + str(x['line']) if x['line'] else '(whole file)'}: {x['kind']} ({x['name']})"
                      for x in left[:GATE_LISTED])
    more = f"; and {len(left) - GATE_LISTED} more" if len(left) > GATE_LISTED else ""
    return (f"the scrubbed copy of {host} still holds {len(left)} secret-looking value(s), so nothing of {host} was "
            f"committed: {named}{more}")


GATE_HINT = ("the encrypted archive has the files. Have these values replaced (configs.secrets.names or patterns), or "
             "if they are safe, keep them readable (configs.secrets.allow); lines are those of the scrubbed copy")


def commit_hosts(repo: Repo, staged: dict[str, str], when: datetime, key: bytes,
                 rules: config_secrets.Rules) -> dict[str, Any]:
    """Replace each host's folder by its staged tree, gate it and commit what changed; returns the commit (or None),
    the summary and the hosts the gate kept out."""
    logger = get_run_logger()
    repo.prepare()
    try:
        repo.catch_up()
    except GitError as exc:
        # A first commit made without the remote's history would start an unrelated one that
        # can never be rebased onto it: with no local history yet, wait for the remote.
        if not exc.transient or repo.head() is None:
            raise
        logger.warning("the config git remote cannot be reached (%s); committing locally, a later run pushes", exc)
    readme = repo.path / "README.md"
    if not readme.exists():
        readme.write_text(README)
        repo.git("add", "README.md")
    hosts: dict[str, dict[str, list[str]]] = {}
    changed: list[HostChanges] = []
    blocked: dict[str, dict[str, Any]] = {}
    for host, stage_dir in sorted(staged.items()):
        old_meta = repo.show("HEAD", f"{host}/{META_NAME}") if repo.head() else None
        repo.replace_folder(host, Path(stage_dir))
        ch = repo.staged_changes(host, META_NAME)
        if left := gate(repo, host, key, rules):
            repo.restore_folder(host)  # before anything else: the secret-looking copy leaves the disk too
            blocked[host] = {"error": gate_error(host, left), "left": left}
            logger.error("%s (%s)", blocked[host]["error"], GATE_HINT)
            continue
        ch.metadata_changed = metadata_changes(old_meta, repo.path / host / META_NAME, ch)
        hosts[host] = summary(ch)
        hosts[host]["first"] = [] if old_meta is not None else ["yes"]
        if not ch.empty:
            changed.append(ch)
    sha = None
    if changed or repo.head() is None:  # the first commit carries the README even if no host came through
        sha = repo.commit(message(changed, when) if changed else "Luxima Backup config repository\n")
        logger.info("committed %s: %s", sha[:12], ", ".join(h.host for h in changed) or "README")
    else:
        logger.info("no config changed since the last backup: no commit")
    return {"commit": sha, "head": repo.head(), "hosts": hosts, "changed_hosts": [h.host for h in changed],
            "unpushed": repo.unpushed(), "blocked": blocked}


@task(name="commit", cache_policy=NO_CACHE, persist_result=False)
def commit(staged: dict[str, str], when: str) -> dict[str, Any]:
    """Commit the hosts' scrubbed configs into the git working copy (no commit when nothing changed), gated."""
    settings = runtime.settings()
    with open_repo(settings) as repo:
        return commit_hosts(repo, staged, datetime.fromisoformat(when), fingerprint_key(settings), secret_rules(settings))
