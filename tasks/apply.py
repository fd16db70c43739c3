"""Apply stage of a config restore: files written atomically over SFTP, what they replace kept, all undone on failure.

Each file is written to a hidden temporary name in its own folder, given its mode and owner,
then renamed over the target (``posix-rename``): a service reading its config never sees half a
file. Before that, the host's current file is copied to ``configs.restore_keep_dir/<stamp>/``
on the host (same mode: a kept secret stays private). Every step is recorded, so ``rollback``
can put back each replaced file (atomically, from its kept copy), remove each created file and
folder, and restore modes and owners. The validation and reload commands run on the host.
"""

from __future__ import annotations

import posixpath
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import paramiko
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from luxima_backup import config_secrets, runtime, ssh
from luxima_backup.config_archive import Member
from luxima_backup.errors import BackupError
from luxima_backup.secrets import redact
from luxima_backup.settings import Settings
from luxima_backup.ssh import SshError
from tasks.fetch import fingerprint_key, matches, read_remote, secret_rules
from tasks.plan import archive_members

OUTPUT_CHARS = 2000  # of a command's output kept for the artifact and the error


@dataclass
class Applied:
    """One change made on the host, with what undoing it needs."""

    path: str
    action: str                       # create | update | metadata | remove
    before: dict[str, Any] | None     # the host's entry before (type, mode, uid, gid, symlink)
    kept: str | None = None           # where its previous content was kept on the host
    created_dirs: list[str] = field(default_factory=list)


def _tmp_name(path: str, stamp: str) -> str:
    folder, name = posixpath.split(path)
    return posixpath.join(folder, f".{name}.luxima-restore-{stamp}")


def _set_owner(sftp: paramiko.SFTPClient, path: str, uid: int, gid: int) -> None:
    st = sftp.lstat(path)
    if (st.st_uid, st.st_gid) != (uid, gid):
        try:
            sftp.chown(path, uid, gid)
        except (PermissionError, OSError) as exc:
            raise SshError(f"cannot give {path} its owner {uid}:{gid}: {exc}",
                           hint="restore as a user allowed to chown (root), or fix the owner by hand") from None


def write_atomic(sftp: paramiko.SFTPClient, path: str, data: bytes | None, symlink: str | None, mode: int, uid: int,
                 gid: int, stamp: str) -> None:
    """Put a file (``data``) or symlink at ``path`` in one rename; the temporary name never outlives a failure."""
    tmp = _tmp_name(path, stamp)
    try:
        if symlink is not None:
            sftp.symlink(symlink, tmp)
        else:
            assert data is not None
            with sftp.open(tmp, "wbx") as f:  # x: never through something already there
                f.chmod(0o600)  # private before any byte of a secret is in it; the real mode comes after
                f.write(data)
            sftp.chmod(tmp, mode)
            _set_owner(sftp, tmp, uid, gid)
        sftp.posix_rename(tmp, path)
    except BaseException:
        try:
            sftp.remove(tmp)
        except Exception:  # the connection may be gone; rollback sweeps temporary names again
            pass
        raise


def _mkdirs(sftp: paramiko.SFTPClient, folder: str, mode: int = 0o755, created: list[str] | None = None) -> list[str]:
    """Create ``folder`` and missing parents, outermost first, each appended to ``created`` as soon as it exists."""
    created = [] if created is None else created
    missing: list[str] = []
    while folder not in ("/", ""):
        try:
            sftp.lstat(folder)
            break
        except FileNotFoundError:
            missing.append(folder)
            folder = posixpath.dirname(folder)
    for d in reversed(missing):
        sftp.mkdir(d, mode)
        created.append(d)
    return created


def copy_entry(sftp: paramiko.SFTPClient, src: str, dst: str, entry: dict[str, Any], stamp: str, size: int) -> None:
    """Put at ``dst``, atomically, the file at ``src`` (``size`` bytes, else a transient error) with ``entry``'s
    mode and owner, or ``entry``'s symlink."""
    if entry["type"] == "symlink":
        write_atomic(sftp, dst, None, entry["symlink"], 0, 0, 0, stamp)
    else:
        data = read_remote(sftp, src, size)
        write_atomic(sftp, dst, data, None, entry["mode"], entry["uid"], entry["gid"], stamp)


def keep_copy(sftp: paramiko.SFTPClient, path: str, before: dict[str, Any], keep_root: str, stamp: str) -> str:
    """Copy the host's current file or link at ``path`` under ``keep_root`` (same mode and owner)."""
    kept = posixpath.join(keep_root, path.lstrip("/"))
    _mkdirs(sftp, posixpath.dirname(kept), 0o700)
    copy_entry(sftp, path, kept, before, stamp, before["size"])  # as the diff saw it: a file changed since fails
    return kept


def apply_members(sftp: paramiko.SFTPClient, members: Iterator[Member], steps: dict[str, dict[str, Any]],
                  keep_root: str, stamp: str, applied: list[Applied]) -> None:
    """Make the planned changes, appending each to ``applied`` as soon as it is made (for a rollback)."""
    for step in steps.values():  # extra files the operator asked to remove: kept first, like a replaced file
        if step["action"] == "remove":
            record = Applied(step["path"], "remove", step["before"])
            record.kept = keep_copy(sftp, step["path"], step["before"], keep_root, stamp)
            applied.append(record)
            sftp.remove(step["path"])
    for m in members:
        step = steps.get(m.path)
        if step is None or step["action"] not in ("create", "update", "metadata"):
            continue
        before = step["before"]
        if step["action"] == "metadata":
            applied.append(Applied(m.path, "metadata", before))
            sftp.chmod(m.path, m.mode)
            _set_owner(sftp, m.path, m.uid, m.gid)
            continue
        record = Applied(m.path, step["action"], before)
        if before is not None:
            record.kept = keep_copy(sftp, m.path, before, keep_root, stamp)
        applied.append(record)  # before the write: a rollback also sweeps its temporary name
        if before is None:
            _mkdirs(sftp, posixpath.dirname(m.path), created=record.created_dirs)
        write_atomic(sftp, m.path, m.data, m.symlink, m.mode, m.uid, m.gid, stamp)


def rollback(sftp: paramiko.SFTPClient, applied: list[Applied], stamp: str) -> list[str]:
    """Undo ``applied``, newest first; returns what could not be undone (empty when all was)."""
    problems: list[str] = []
    for a in reversed(applied):
        try:
            sftp.remove(_tmp_name(a.path, stamp))  # left by a write cut short
        except Exception:
            pass
        try:
            b = a.before
            if a.action == "metadata":
                assert b is not None
                sftp.chmod(a.path, b["mode"])
                _set_owner(sftp, a.path, b["uid"], b["gid"])
            elif b is None:
                try:
                    sftp.remove(a.path)
                except FileNotFoundError:
                    pass  # the write never happened
                for d in reversed(a.created_dirs):
                    sftp.rmdir(d)
            else:
                assert a.kept is not None
                copy_entry(sftp, a.kept, a.path, b, stamp, sftp.lstat(a.kept).st_size or 0)
        except Exception as exc:  # go on with the others: leave as little as possible half-done
            problems.append(f"{a.path}: {exc}")
    return problems


def run_commands(client: paramiko.SSHClient, commands: list[tuple[str, str]], key: bytes,
                 rules: config_secrets.Rules) -> list[dict[str, Any]]:
    """Run (service, command) pairs on the host in order; stops at the first failure.

    The output of a command that succeeded is dropped; a failure's last lines are kept, scrubbed
    like the git copy (``docker compose config`` prints interpolated passwords), for the error.
    """
    results = []
    for service, command in commands:
        status, out, err = ssh.run(client, command, timeout=600)
        text = ""
        if status != 0:
            tail = (out + err)[-OUTPUT_CHARS * 2:]
            text = redact(config_secrets.scrub("command-output", tail, key, rules)[0].decode(errors="replace").strip())
        results.append({"service": service, "command": command, "exit": status, "output": text[-OUTPUT_CHARS:]})
        if status != 0:
            break
    return results


def service_commands(settings: Settings, host: str, written: list[str], which: str) -> list[tuple[str, str]]:
    """The ``validate_command`` or ``reload_command`` of each service with a path among ``written``."""
    found = []
    for name, svc in sorted(settings.config_host(host).services.items()):
        command = svc.validate_command if which == "validate" else svc.reload_command
        if command and any(matches(p, svc.paths) for p in written):
            found.append((name, command))
    return found


@task(name="apply", cache_policy=NO_CACHE, persist_result=False)
def apply(host: str, spool: str, codec: str, steps: list[dict[str, Any]], stamp: str) -> dict[str, Any]:
    """Write the planned files on the host (atomically, keeping what they replace); undone at once if a write fails."""
    settings = runtime.settings()
    keep_root = posixpath.join(settings.configs.restore_keep_dir, f"{host}-{stamp}")
    applied: list[Applied] = []
    by_path = {s["path"]: s for s in steps}
    index: dict[str, Any] = {}
    try:
        with runtime.connect_host(host, settings) as client, client.open_sftp() as sftp, \
                archive_members(spool, codec, runtime.key_provider(settings).unwrap, index) as members:
            apply_members(sftp, members, by_path, keep_root, stamp, applied)
    except BaseException as exc:
        problems: list[str] = []
        if applied:
            try:  # on a new connection: the failure may have been the connection itself
                with runtime.connect_host(host, settings) as client, client.open_sftp() as sftp:
                    problems = rollback(sftp, applied, stamp)
            except Exception as again:
                problems = [f"could not reconnect to roll back: {again}"]
        raise BackupError(
            f"writing the configs of {host} failed after {len(applied)} change(s) ({exc}); "
            + ("every change was rolled back" if not problems else f"rollback FAILED for: {'; '.join(problems)}"),
            hint=f"the replaced files are kept on the host under {keep_root}",
            transient=False,
        ) from exc
    get_run_logger().info("applied %d change(s) on %s; replaced files kept under %s", len(applied), host, keep_root)
    return {"applied": [asdict(a) for a in applied], "keep_dir": keep_root}


@task(name="validate", cache_policy=NO_CACHE, persist_result=False)
def validate(host: str, written: list[str]) -> list[dict[str, Any]]:
    """Run the validation command of every service whose files were written (e.g. nginx -t)."""
    settings = runtime.settings()
    commands = service_commands(settings, host, written, "validate")
    if not commands:
        get_run_logger().warning("no validation command configured for what was restored on %s", host)
        return []
    with runtime.connect_host(host, settings) as client:
        return run_commands(client, commands, fingerprint_key(settings), secret_rules(settings))


@task(name="rollback", cache_policy=NO_CACHE, persist_result=False, **runtime.TRANSIENT_RETRIES)
def rollback_host(host: str, applied: list[dict[str, Any]], stamp: str) -> list[str]:
    """Put back every file the restore replaced, remove every file it created."""
    settings = runtime.settings()
    with runtime.connect_host(host, settings) as client, client.open_sftp() as sftp:
        problems = rollback(sftp, [Applied(**a) for a in applied], stamp)
    get_run_logger().warning("rolled back %d change(s) on %s%s", len(applied), host,
                             f"; FAILED for {problems}" if problems else "")
    return problems


@task(name="reload", cache_policy=NO_CACHE, persist_result=False)
def reload(host: str, written: list[str]) -> list[dict[str, Any]]:
    """Run the reload command of every service whose files were written (e.g. systemctl reload nginx)."""
    settings = runtime.settings()
    commands = service_commands(settings, host, written, "reload")
    if not commands:
        return []
    with runtime.connect_host(host, settings) as client:
        return run_commands(client, commands, fingerprint_key(settings), secret_rules(settings))
