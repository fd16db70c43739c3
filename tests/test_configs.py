"""The config backup and restore flows end to end: a real sshd, git with a bare remote reached over SSH, the S3
server, PostgreSQL for the log, Prefect."""

from __future__ import annotations

import json
import os
import re
import subprocess
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

from devkit.sandbox import PostgresCluster, SshServer
from tests import secret_corpus as corpus
from tests.conftest import file_keys
from tests.helpers import error_of, host_toml, log_rows, s3_get, s3_keys

pytestmark = pytest.mark.slow

DB_SECRET = "Pg-s3cret-Value-7731"
APP_KEY = "base64:Qm9ndXNBcHBLZXkxMjM0NTY3ODkwYWJjZGVm"
TOKEN = "ghp_TokenValue0987654321zyxw"
PRIVATE_KEY = ("-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7PrivateKeyBody\n"
               "-----END PRIVATE KEY-----\n")
SECRETS = [DB_SECRET, APP_KEY, TOKEN, "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7PrivateKeyBody"]


@pytest.fixture(scope="module")
def sshd() -> Iterator[SshServer]:
    server = SshServer().start()
    yield server
    server.stop()


def make_host(root: Path) -> None:
    """A host's configs: nginx with a sites-enabled link, Coolify's .env, two compose files, a TLS private key."""
    (root / "etc/nginx/sites-available").mkdir(parents=True)
    (root / "etc/nginx/sites-enabled").mkdir()
    (root / "etc/nginx/nginx.conf").write_text("worker_processes auto;\nevents {}\n")
    (root / "etc/nginx/sites-available/luxima.conf").write_text(
        "server {\n  listen 443 ssl;\n  proxy_set_header Authorization \"Bearer " + TOKEN + "\";\n}\n")
    os.symlink("../sites-available/luxima.conf", root / "etc/nginx/sites-enabled/luxima.conf")
    (root / "etc/nginx/error.log").write_text("noise\n")
    (root / "data/coolify/source").mkdir(parents=True)
    env = root / "data/coolify/source/.env"
    env.write_text(f"APP_NAME=Coolify\nAPP_KEY={APP_KEY}\nDB_PASSWORD={DB_SECRET}\nDB_HOST=postgres\n")
    os.chmod(env, 0o600)
    for app in ("api", "web"):
        (root / f"srv/apps/{app}").mkdir(parents=True)
        (root / f"srv/apps/{app}/docker-compose.yml").write_text(
            f"services:\n  {app}:\n    image: luxima/{app}:1\n    environment:\n      - POSTGRES_PASSWORD={DB_SECRET}\n")
    (root / "data/coolify/source/.gitignore").write_text(".env\n")  # an app checkout's: must not hide .env from git
    (root / "etc/nginx/GeoIP.dat").write_bytes(b"GEO\x00\x01" + DB_SECRET.encode() + b"\x00" * 20)  # binary
    (root / "etc/ssl/private").mkdir(parents=True)
    (root / "etc/ssl/private/luxima.key").write_text(PRIVATE_KEY)
    os.chmod(root / "etc/ssl/private/luxima.key", 0o600)


def git(*args: str, cwd: Path | None = None) -> str:
    env = {"PATH": os.environ["PATH"], "HOME": str(cwd or "/"), "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
           "GIT_AUTHOR_NAME": "Someone Else", "GIT_AUTHOR_EMAIL": "else@example.org",
           "GIT_COMMITTER_NAME": "Someone Else", "GIT_COMMITTER_EMAIL": "else@example.org"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def cfg_env(prefect_server: Any, pg_cluster: PostgresCluster, s3_server: Any, database: str, bucket: str, key_file: Path,
            write_settings: Callable[..., Path], sshd: SshServer, tmp_path: Path) -> dict[str, Any]:
    """A host served over SSH, a bare git remote reached over the same sshd, and settings naming both."""
    root = tmp_path / "web1"
    make_host(root)
    remote = tmp_path / "remote.git"
    git("init", "--quiet", "--bare", "--initial-branch=main", str(remote))
    known = tmp_path / "known_hosts"
    known.write_text(sshd.known_hosts_line)
    fp_key = tmp_path / "fingerprint.key"
    fp_key.write_text("a-fingerprint-key-of-32-bytes-xyz")

    def settings(host_opts: str = "", extra: str = "", git_known: Path = known, fingerprint: bool = True,
                 configs_opts: str = "attempts = 1") -> Path:
        r = root
        fp_line = f'fingerprint_key = "file:{fp_key}"' if fingerprint else ""
        return write_settings(database, bucket, file_keys(key_file), host_toml("web1", sshd, known) + textwrap.dedent(f"""
            [configs]
            {fp_line}
            {configs_opts}
            restore_keep_dir = "{tmp_path / 'kept'}"

            [configs.git]
            remote = "ssh://{sshd.user}@127.0.0.1:{sshd.port}{remote}"
            key = "file:{sshd.client_key}"
            known_hosts = "{git_known}"

            [configs.hosts.web1]
            paths = ["{r}/etc/nginx/", "{r}/data/coolify/source/.env", "{r}/data/coolify/source/.gitignore",
             "{r}/srv/apps/*/docker-compose.yml", "{r}/etc/ssl/private/"]
            exclude = ["*.log"]
            """) + textwrap.dedent(host_opts) + textwrap.dedent(extra))

    settings()
    return {"root": root, "remote": remote, "settings": settings, "s3": s3_server, "bucket": bucket, "db": database,
            "cluster": pg_cluster, "tmp": tmp_path, "known": known, "sshd": sshd, "fp_key": fp_key, "prefect": prefect_server}


def backup(**params: Any) -> Any:
    from flows.config_backup import config_backup

    return config_backup(**params, return_state=True)


def backed_up(**params: Any) -> dict[str, Any]:
    state = backup(**params)
    assert state.is_completed(), state.message
    return state.result()


def remote_log(remote: Path) -> list[str]:
    return git("--git-dir", str(remote), "log", "--format=%H %an %s", "main").splitlines()


def remote_everything(remote: Path) -> str:
    """Every object ever stored in the remote (all commits, trees, blobs), as text."""
    out = subprocess.run(["git", "--git-dir", str(remote), "cat-file", "--batch-all-objects", "--batch"], check=True,
                         capture_output=True).stdout
    assert len(out) > 1000
    return out.decode("latin-1")  # trees hold binary ids


def host_rel(env: dict[str, Any], path: str) -> str:
    return f"{env['root']}/{path}"


# -- backup --

def test_first_backup_commits_everything_pushes_and_archives(cfg_env: dict[str, Any]) -> None:
    result = backed_up()
    web1 = result["hosts"]["web1"]
    assert web1["totals"]["files"] == 8 and web1["totals"]["symlinks"] == 1
    assert web1["totals"]["redactions"] >= 5
    assert result["git"]["commit"] and result["git"]["push"]["pushed"] is True
    log = remote_log(cfg_env["remote"])
    assert len(log) == 1 and log[0].split()[0] == result["git"]["commit"]
    tree = git("--git-dir", str(cfg_env["remote"]), "ls-tree", "-r", "--name-only", "main").split()
    root = str(cfg_env["root"]).lstrip("/")
    assert f"web1/{root}/etc/nginx/nginx.conf" in tree and f"web1/{root}/srv/apps/web/docker-compose.yml" in tree
    assert f"web1/{root}/etc/nginx/error.log" not in tree  # excluded
    assert "web1/.luxima-meta.json" in tree and "README.md" in tree
    env_copy = git("--git-dir", str(cfg_env["remote"]), "show", f"main:web1/{root}/data/coolify/source/.env")
    assert "APP_NAME=Coolify\n" in env_copy and "DB_HOST=postgres\n" in env_copy
    assert "DB_PASSWORD=luxima-redacted:hmac-sha256:" in env_copy  # and there despite the host's .gitignore
    geoip = git("--git-dir", str(cfg_env["remote"]), "show", f"main:web1/{root}/etc/nginx/GeoIP.dat")
    assert geoip.startswith("# luxima-backup: secret file kept only in the encrypted archive")  # binary: kept out whole
    meta = json.loads(git("--git-dir", str(cfg_env["remote"]), "show", "main:web1/.luxima-meta.json"))
    assert meta["files"][host_rel(cfg_env, "data/coolify/source/.env")]["mode"] == "0600"
    assert meta["files"][host_rel(cfg_env, "etc/nginx/sites-enabled/luxima.conf")]["symlink"] == "../sites-available/luxima.conf"
    # the archive and its manifest are in storage, and nothing there is in clear
    keys = s3_keys(cfg_env["s3"], cfg_env["bucket"])
    assert [k for k in keys if k.startswith("backups/configs/web1/") and k.endswith(".tar.gz.enc")]
    manifest_key = next(k for k in keys if k.startswith("backups/configs/web1/") and k.endswith(".manifest.json"))
    doc = json.loads(s3_get(cfg_env["s3"], cfg_env["bucket"], manifest_key))
    assert doc["status"] == "verified" and doc["verification"]["files_checked"] == 8
    assert doc["content_digest"] == meta["content_digest"] and doc["retention_days"] == 90
    for key in keys:
        blob = s3_get(cfg_env["s3"], cfg_env["bucket"], key)
        assert not any(s.encode() in blob for s in SECRETS), key
        assert b"worker_processes" not in blob, key
    rows = [r for r in log_rows(cfg_env["cluster"], cfg_env["db"]) if r["component"] == "configs"]
    assert [(r["kind"], r["target"], r["status"]) for r in rows] == [("backup", "web1", "success")]
    assert rows[0]["details"]["git"]["commit"] == result["git"]["commit"] and rows[0]["details"]["git"]["pushed"]


def test_no_change_no_commit_then_one_commit_with_an_accurate_summary(cfg_env: dict[str, Any]) -> None:
    first = backed_up()
    second = backed_up()
    assert second["git"]["commit"] is None and len(remote_log(cfg_env["remote"])) == 1
    assert second["drift"] == {}
    root = cfg_env["root"]
    (root / "etc/nginx/nginx.conf").write_text("worker_processes 4;\nevents {}\n")
    (root / "etc/nginx/sites-available/new.conf").write_text("server { listen 80; }\n")
    (root / "srv/apps/api/docker-compose.yml").unlink()
    os.chmod(root / "etc/nginx/sites-available/luxima.conf", 0o640)
    third = backed_up()
    log = remote_log(cfg_env["remote"])
    assert len(log) == 2 and log[0].split()[0] == third["git"]["commit"] != first["git"]["commit"]
    changes = third["changes"]["web1"]
    assert changes["added"] == [host_rel(cfg_env, "etc/nginx/sites-available/new.conf")]
    assert changes["changed"] == [host_rel(cfg_env, "etc/nginx/nginx.conf")]
    assert changes["removed"] == [host_rel(cfg_env, "srv/apps/api/docker-compose.yml")]
    assert changes["metadata"] == [host_rel(cfg_env, "etc/nginx/sites-available/luxima.conf")]
    message = git("--git-dir", str(cfg_env["remote"]), "log", "-1", "--format=%B", "main")
    assert "web1: 1 added, 1 changed, 1 removed, 1 with new mode/owner" in message
    assert f"  A {host_rel(cfg_env, 'etc/nginx/sites-available/new.conf')}" in message
    assert f"  M {host_rel(cfg_env, 'etc/nginx/nginx.conf')}" in message
    assert f"  D {host_rel(cfg_env, 'srv/apps/api/docker-compose.yml')}" in message
    assert third["drift"]["web1"]["changed"] == [host_rel(cfg_env, "etc/nginx/nginx.conf")]
    # a secret that changes shows as a changed fingerprint, and stays out of git
    env_file = root / "data/coolify/source/.env"
    env_file.write_text(env_file.read_text().replace(DB_SECRET, "Another-Secret-4242"))
    fourth = backed_up()
    assert fourth["changes"]["web1"]["changed"] == [host_rel(cfg_env, "data/coolify/source/.env")]
    diff = git("--git-dir", str(cfg_env["remote"]), "show", "main")
    assert "-DB_PASSWORD=luxima-redacted:hmac-sha256:" in diff and "+DB_PASSWORD=luxima-redacted:hmac-sha256:" in diff
    history = remote_everything(cfg_env["remote"])
    for secret in [*SECRETS, "Another-Secret-4242"]:
        assert secret not in history
    assert "BEGIN PRIVATE KEY" not in history


def test_a_real_config_change_alerts_drift_and_drift_ignore_keeps_expected_ones_quiet(
    cfg_env: dict[str, Any], receiver: Any, prefix: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from deployments.alerts import setup_alerts
    from tests.alerting import alert_settings, wait_until_live

    setup_alerts(alert_settings(receiver, monkeypatch, prefix), components=[])
    wait_until_live(receiver)
    cfg_env["settings"](host_opts=f'drift_ignore = ["{cfg_env["root"]}/srv/apps/*"]\n')
    backed_up()  # the first backup of a host is no drift
    (cfg_env["root"] / "srv/apps/web/docker-compose.yml").write_text("services: {}\n")
    quiet = backed_up()
    assert quiet["git"]["commit"] and quiet["drift"] == {}
    (cfg_env["root"] / "etc/nginx/nginx.conf").write_text("worker_processes 1;\n")
    state = backup()
    assert state.is_completed() and list(state.result()["drift"]) == ["web1"]
    run_id = str(state.state_details.flow_run_id)
    message = receiver.wait_for(lambda m: "config drift on web1" in m.get("subject", "") and run_id in m.get("body", ""),
                                timeout=90)
    assert message is not None, f"no drift alert for run {run_id}; received: {receiver.messages}"
    assert host_rel(cfg_env, "etc/nginx/nginx.conf") in message["body"] and "changed 1" in message["body"]
    assert state.result()["git"]["commit"] in message["body"]
    drift_alerts = [m for m in receiver.messages if "config drift" in m.get("subject", "")]
    assert len(drift_alerts) == 1 and "docker-compose" not in drift_alerts[0]["body"]  # the ignored change said nothing


def test_rejected_push_is_rebased_never_forced(cfg_env: dict[str, Any]) -> None:
    backed_up()
    # someone else pushes to the remote (a README edit) between two backups
    other = cfg_env["tmp"] / "other-clone"
    git("clone", "--quiet", str(cfg_env["remote"]), str(other))
    (other / "NOTES.md").write_text("ops notes\n")
    git("add", "NOTES.md", cwd=other)
    git("commit", "--quiet", "-m", "ops notes", cwd=other)
    git("push", "--quiet", "origin", "main", cwd=other)
    theirs = git("rev-parse", "HEAD", cwd=other).strip()
    # and again after our working copy fetched, so that our push itself is rejected once
    from luxima_backup import gitrepo

    real_push = gitrepo.Repo.push
    pushed_meanwhile: list[str] = []

    def push_after_another(self: Any) -> Any:
        if not pushed_meanwhile:
            (other / "MORE.md").write_text("more\n")
            git("add", "MORE.md", cwd=other)
            git("commit", "--quiet", "-m", "more notes", cwd=other)
            git("push", "--quiet", "origin", "main", cwd=other)
            pushed_meanwhile.append(git("rev-parse", "HEAD", cwd=other).strip())
        return real_push(self)

    gitrepo.Repo.push = push_after_another  # type: ignore[method-assign]
    try:
        (cfg_env["root"] / "etc/nginx/nginx.conf").write_text("worker_processes 2;\n")
        result = backed_up()
    finally:
        gitrepo.Repo.push = real_push  # type: ignore[method-assign]
    assert result["git"]["push"]["pushed"] and result["git"]["push"]["rebased"] == 1
    log = [line.split()[0] for line in remote_log(cfg_env["remote"])]
    assert len(log) == 4 and log[0] == result["git"]["push"]["head"]
    assert theirs in log and pushed_meanwhile[0] in log  # their commits are kept, ours is on top
    assert git("--git-dir", str(cfg_env["remote"]), "rev-list", "--merges", "--count", "main").strip() == "0"


def test_conflicting_remote_change_fails_clearly_and_keeps_both(cfg_env: dict[str, Any]) -> None:
    backed_up()
    root_rel = str(cfg_env["root"]).lstrip("/")
    other = cfg_env["tmp"] / "other-clone"
    git("clone", "--quiet", str(cfg_env["remote"]), str(other))
    (other / f"web1/{root_rel}/etc/nginx/nginx.conf").write_text("edited by hand in git\n")
    git("commit", "--quiet", "-am", "hand edit", cwd=other)
    theirs = git("rev-parse", "HEAD", cwd=other).strip()
    from luxima_backup import gitrepo

    real_catch_up = gitrepo.Repo.catch_up
    gitrepo.Repo.catch_up = lambda self: None  # type: ignore[method-assign]  # our working copy has not seen it yet
    try:
        (cfg_env["root"] / "etc/nginx/nginx.conf").write_text("worker_processes 3;\n")
        git("push", "--quiet", "origin", "main", cwd=other)
        exc = error_of(backup())
    finally:
        gitrepo.Repo.catch_up = real_catch_up  # type: ignore[method-assign]
    assert "change the same files" in str(exc) and "nothing was forced" in str(exc)
    assert "nginx.conf" in str(exc)
    assert remote_log(cfg_env["remote"])[0].split()[0] == theirs  # the remote is as they left it
    # the archive of that run is still stored and verified: the backup itself is not lost
    manifests = [k for k in s3_keys(cfg_env["s3"], cfg_env["bucket"]) if k.startswith("backups/configs/") and k.endswith(".manifest.json")]
    assert len(manifests) == 2


# -- restore --

def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under ``root``: type, mode, owner, and content or link target."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                out[rel] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                out[rel] = ("dir", st.st_mode & 0o7777)
            else:
                out[rel] = ("file", st.st_mode & 0o7777, st.st_uid, st.st_gid, Path(path).read_bytes())
    return out


def restore(**params: Any) -> Any:
    from flows.config_restore import config_restore

    return config_restore(**params, return_state=True)


def artifact_markdown(env: dict[str, Any], state: Any) -> str:
    from prefect.client.orchestration import get_client

    run_id = str(state.state_details.flow_run_id)
    with get_client(sync_client=True) as client:
        r = client._client.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]}}, "limit": 10})
    return "\n".join(str(a["data"]) for a in r.json() if a["type"] == "markdown")


SERVICES = """
[configs.hosts.web1.services.nginx]
paths = ["{root}/etc/nginx/"]
validate_command = "grep -q '^worker_processes' {root}/etc/nginx/nginx.conf"
reload_command = "touch {root}/nginx-reloaded"
[configs.hosts.web1.services.coolify]
paths = ["{root}/data/coolify/"]
validate_command = "grep -q '^APP_KEY=' {root}/data/coolify/source/.env"
"""


def drift_host(root: Path) -> None:
    """Changes on the host after the backup: an edit, a changed secret, a removed file, a new mode, a new file."""
    (root / "etc/nginx/nginx.conf").write_text("worker_processes 4;\nevents {}\n")
    env = root / "data/coolify/source/.env"
    env.write_text(env.read_text().replace(DB_SECRET, "Drifted-Secret-5555"))
    (root / "srv/apps/web/docker-compose.yml").unlink()
    os.chmod(root / "etc/nginx/sites-available/luxima.conf", 0o600)
    (root / "etc/nginx/conf.d").mkdir()
    (root / "etc/nginx/conf.d/extra.conf").write_text("# added by hand\n")


def test_dry_run_shows_a_redacted_diff_and_writes_nothing(cfg_env: dict[str, Any]) -> None:
    backed_up()
    root = cfg_env["root"]
    drift_host(root)
    before = snapshot(root)
    state = restore(host="web1")
    assert state.is_completed(), state.message
    result = state.result()
    assert result["dry_run"] and result["counts"] == {"update": 2, "create": 1, "metadata": 1, "same": 5, "extra": 1}
    actions = {s["path"]: s["action"] for s in result["steps"]}
    assert actions[host_rel(cfg_env, "etc/nginx/nginx.conf")] == "update"
    assert actions[host_rel(cfg_env, "srv/apps/web/docker-compose.yml")] == "create"
    assert actions[host_rel(cfg_env, "etc/nginx/sites-available/luxima.conf")] == "metadata"
    assert actions[host_rel(cfg_env, "etc/nginx/conf.d/extra.conf")] == "extra"  # listed, left alone
    assert snapshot(root) == before  # nothing written
    md = artifact_markdown(cfg_env, state)
    assert "DRY RUN" in md and "-worker_processes 4;" in md and "+worker_processes auto;" in md
    assert "-DB_PASSWORD=luxima-redacted:hmac-sha256:" in md and "+DB_PASSWORD=luxima-redacted:hmac-sha256:" in md
    assert DB_SECRET not in md and "Drifted-Secret-5555" not in md and APP_KEY not in md
    rows = [r for r in log_rows(cfg_env["cluster"], cfg_env["db"]) if r["kind"] == "restore"]
    assert rows[-1]["component"] == "configs" and rows[-1]["status"] == "success" and rows[-1]["details"]["dry_run"]
    # The diff task's result (every file's keyed digest) lives in memory only: no task result is stored.
    from tests.helpers import persisted_task_results

    assert persisted_task_results(cfg_env["prefect"].api_url, [str(state.state_details.flow_run_id)]) == {}


def test_apply_needs_confirm_restores_real_secrets_keeps_copies_validates_and_reloads(cfg_env: dict[str, Any]) -> None:
    cfg_env["settings"](host_opts=SERVICES.format(root=cfg_env["root"]))
    backed_up()
    root = cfg_env["root"]
    original = snapshot(root)
    drift_host(root)
    drifted = snapshot(root)
    exc = error_of(restore(host="web1", dry_run=False, confirm="web2"))
    assert "confirm = 'web1'" in str(exc) and snapshot(root) == drifted
    state = restore(host="web1", dry_run=False, confirm="web1")
    assert state.is_completed(), state.message
    result = state.result()
    assert result["applied"] == 4 and result["files_checked"] == 4
    assert [c["service"] for c in result["validation"]] == ["coolify", "nginx"] and result["reloaded"] == ["nginx"]
    assert (root / "nginx-reloaded").exists()
    now = snapshot(root)
    extra = "etc/nginx/conf.d/extra.conf"
    assert now[extra] == drifted[extra]  # a restore never deletes what the backup does not have
    del now[extra], now["etc/nginx/conf.d"], now["nginx-reloaded"]
    assert now == original  # real secrets back, from the archive, with modes
    assert f"DB_PASSWORD={DB_SECRET}" in (root / "data/coolify/source/.env").read_text()
    assert not list(root.rglob(".*.luxima-restore-*"))
    kept = Path(result["keep_dir"])
    assert (kept / str(root).lstrip("/") / "etc/nginx/nginx.conf").read_text() == "worker_processes 4;\nevents {}\n"
    assert "Drifted-Secret-5555" in (kept / str(root).lstrip("/") / "data/coolify/source/.env").read_text()
    assert (kept / str(root).lstrip("/") / "data/coolify/source/.env").stat().st_mode & 0o777 == 0o600
    rows = [r for r in log_rows(cfg_env["cluster"], cfg_env["db"]) if r["kind"] == "restore"]
    assert rows[-1]["status"] == "success" and rows[-1]["details"]["applied"] == 4
    # asked to, it also removes what the backup does not have, keeping a copy
    state = restore(host="web1", dry_run=False, confirm="web1", remove_extra=True)
    assert state.is_completed(), state.message
    again = state.result()
    assert again["applied"] == 1 and not (root / extra).exists()
    assert (Path(again["keep_dir"]) / str(root).lstrip("/") / extra).read_text() == "# added by hand\n"
    assert restore(host="web1").result()["counts"] == {"same": 9}


def test_failing_validation_rolls_every_file_back(cfg_env: dict[str, Any]) -> None:
    root = cfg_env["root"]
    # the failing command prints the restored .env: its secrets must not reach the error, log or artifact
    services = SERVICES.format(root=root).replace("grep -q '^APP_KEY=' {root}".format(root=root),
                                                  "cat {root}/data/coolify/source/.env && grep -q '^NOT_THERE=' {root}".format(root=root))
    cfg_env["settings"](host_opts=services)
    backed_up()
    drift_host(root)
    drifted = snapshot(root)
    state = restore(host="web1", dry_run=False, confirm="web1", remove_extra=True)
    exc = error_of(state)
    assert "validation of coolify failed" in str(exc) and "every restored file was rolled back" in str(exc)
    assert snapshot(root) == drifted  # byte for byte, modes too; the created compose file gone, the removed extra back
    assert not (root / "nginx-reloaded").exists()
    assert not list(root.rglob(".*.luxima-restore-*"))
    rows = [r for r in log_rows(cfg_env["cluster"], cfg_env["db"]) if r["kind"] == "restore"]
    assert rows[-1]["status"] == "failed" and "validation of coolify failed" in rows[-1]["error"]
    assert "DB_PASSWORD=luxima-redacted:hmac-sha256:" in str(exc)  # the output is there, scrubbed
    shown = str(exc) + json.dumps(rows[-1], default=str) + artifact_markdown(cfg_env, state)
    assert DB_SECRET not in shown and APP_KEY not in shown and "Drifted-Secret-5555" not in shown


def test_restore_by_commit_date_and_paths(cfg_env: dict[str, Any]) -> None:
    root = cfg_env["root"]
    first = backed_up()
    (root / "etc/nginx/nginx.conf").write_text("worker_processes 8;\n")
    (root / "data/coolify/source/.env").write_text("APP_KEY=second\n")
    second = backed_up()
    # by commit: the archive holding what the first commit recorded
    plan = restore(host="web1", version=first["git"]["commit"][:10]).result()
    assert plan["backup_id"] == first["hosts"]["web1"]["backup_id"]
    assert {s["path"]: s["action"] for s in plan["steps"]}[host_rel(cfg_env, "etc/nginx/nginx.conf")] == "update"
    # by date: that day's newest (the day the second backup started, not "today": a run may cross midnight)
    day = datetime.fromisoformat(second["hosts"]["web1"]["started_at"]).astimezone(timezone.utc).date().isoformat()
    assert restore(host="web1", version=day).result()["counts"] == {"same": 9}
    exc = error_of(restore(host="web1", version="2001-01-01"))
    assert "no verified configs backup" in str(exc)
    # one folder of the first backup only
    state = restore(host="web1", version=first["hosts"]["web1"]["backup_id"], paths=[f"{root}/etc/nginx/"],
                    dry_run=False, confirm="web1")
    assert state.is_completed(), state.message
    assert (root / "etc/nginx/nginx.conf").read_text() == "worker_processes auto;\nevents {}\n"
    assert (root / "data/coolify/source/.env").read_text() == "APP_KEY=second\n"  # outside the paths: untouched
    exc = error_of(restore(host="web1", paths=[f"{root}/nowhere/"]))
    assert "none of" in str(exc)


# -- secrets found by their value, and the gate before each commit --

def corpus_host(env: dict[str, Any], samples: list[corpus.Sample]) -> tuple[Path, str]:
    """A second host, app2, on the same sshd, holding ``samples`` at their paths; its settings section."""
    root = env["tmp"] / "app2"
    for sample in samples:
        path = root / sample.path.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(sample.data)
    sshd = env["sshd"]
    return root, f"""
    [hosts.app2]
    host = "127.0.0.1"
    port = {sshd.port}
    user = "{sshd.user}"
    key = "file:{sshd.client_key}"
    known_hosts = "{env['known']}"
    connect_timeout = 5
    [configs.hosts.app2]
    paths = ["{root}/etc/", "{root}/data/coolify/source/.env", "{root}/srv/"]
    """


def test_no_planted_secret_of_the_corpus_reaches_any_object_of_the_remote(cfg_env: dict[str, Any]) -> None:
    root, app2 = corpus_host(cfg_env, corpus.CORPUS)
    cfg_env["settings"](extra=app2)
    result = backed_up()
    assert result["git"]["push"]["pushed"] and sorted(result["changes"]) == ["app2", "web1"]
    history = remote_everything(cfg_env["remote"])
    for secret in corpus.SECRETS:
        assert secret not in history, secret[:12]
    for look_alike in corpus.LOOK_ALIKES:  # readable in git, as they were
        assert look_alike in history, look_alike
    meta = json.loads(git("--git-dir", str(cfg_env["remote"]), "show", "main:app2/.luxima-meta.json"))
    for sample in corpus.CORPUS:
        assert [r["kind"] for r in meta["files"][f"{root}{sample.path}"]["redacted"]] == sample.kinds
    # and the archive has the real files: a dry-run restore of app2 finds them the same as on the host
    plan = restore(host="app2").result()
    assert plan["counts"] == {"same": len(corpus.CORPUS)}


def verification_events(api_url: str, resource: str, timeout: float = 30) -> list[dict[str, Any]]:
    """The luxima.verification.failed events the server holds about ``resource`` (they arrive asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        found = httpx.post(f"{api_url}/events/filter", json={"filter": {
            "event": {"name": ["luxima.verification.failed"]}, "resource": {"id": [resource]}}, "limit": 50})
        found.raise_for_status()
        events = found.json()["events"]
        if events or time.monotonic() > deadline:
            return events
        time.sleep(1)


def test_the_gate_keeps_a_host_out_of_git_names_file_and_line_keeps_its_archive_and_alerts(
    cfg_env: dict[str, Any],
) -> None:
    # A random signing seed under a name that says nothing, in an INI file: scrubbing judges randomness only in
    # environments (.env, compose environment:), so it stays in the scrubbed copy; the gate finds it.
    root, app2 = corpus_host(cfg_env, [*corpus.CORPUS, corpus.GATE_ONLY])
    cfg_env["settings"](extra=app2)
    state = backup()
    exc = error_of(state)
    relay = f"{root}{corpus.GATE_ONLY.path}"
    assert f"app2: the scrubbed copy of app2 still holds 1 secret-looking value(s), so nothing of app2 was committed: " \
           f"{relay} line 3: high-entropy (signing)" in str(exc)
    assert "web1:" not in str(exc) and corpus.GATE_ONLY_SECRET not in str(exc)
    # nothing of app2 in git, web1 committed and pushed all the same
    tree = git("--git-dir", str(cfg_env["remote"]), "ls-tree", "--name-only", "main").split()
    assert "web1" in tree and "app2" not in tree and len(remote_log(cfg_env["remote"])) == 1
    history = remote_everything(cfg_env["remote"])
    objects = git("--git-dir", str(cfg_env["remote"]), "rev-list", "--objects", "--all").splitlines()
    assert corpus.GATE_ONLY_SECRET not in history and not [o for o in objects if " app2" in o]
    assert not any(secret in history for secret in corpus.SECRETS)
    working_copy = cfg_env["tmp"] / "work" / "config-repo"
    assert (working_copy / "web1").is_dir() and not (working_copy / "app2").exists()  # not left on disk either
    # its archive and manifest are stored, its log row says failed with file and line, and an alert event went out
    keys = [k for k in s3_keys(cfg_env["s3"], cfg_env["bucket"]) if k.startswith("backups/configs/app2/")]
    assert [k for k in keys if k.endswith(".tar.gz.enc")] and [k for k in keys if k.endswith(".manifest.json")]
    rows = {r["target"]: r for r in log_rows(cfg_env["cluster"], cfg_env["db"]) if r["component"] == "configs"}
    assert rows["web1"]["status"] == "success" and rows["app2"]["status"] == "failed"
    assert f"{relay} line 3" in rows["app2"]["error"] and rows["app2"]["backup_id"] and rows["app2"]["object_key"]
    assert rows["app2"]["details"]["git"]["blocked"] == [
        {"path": relay, "line": 3, "kind": "high-entropy", "name": "signing"}]
    assert corpus.GATE_ONLY_SECRET not in json.dumps(rows["app2"], default=str)
    events = verification_events(cfg_env["prefect"].api_url, "luxima.backup.configs.app2")
    assert [e["payload"]["kind"] for e in events] == ["git-gate"]
    assert f"{relay} line 3" in events[0]["payload"]["detail"] and corpus.GATE_ONLY_SECRET not in json.dumps(events)
    # the operator tells the scrubber about it: the next run commits app2, the seed replaced
    cfg_env["settings"](extra=app2 + """
    [configs.secrets]
    patterns = ['(?m)^signing = (\\S+)']
    """)
    result = backed_up()
    assert result["changes"]["app2"]["first"] == ["yes"]
    assert corpus.GATE_ONLY_SECRET not in remote_everything(cfg_env["remote"])
    relay_copy = git("--git-dir", str(cfg_env["remote"]), "show", f"main:app2{relay}")
    assert re.search(r"^signing = luxima-redacted:hmac-sha256:[0-9a-f]{16}$", relay_copy, re.MULTILINE)


# -- failures --

def test_an_unreachable_host_fails_the_run_but_not_the_others(cfg_env: dict[str, Any]) -> None:
    from devkit.sandbox import free_port

    web2 = f"""
    [hosts.web2]
    host = "127.0.0.1"
    port = {free_port()}
    user = "nobody"
    key = "file:{cfg_env['sshd'].client_key}"
    known_hosts = "{cfg_env['known']}"
    connect_timeout = 2
    [configs.hosts.web2]
    paths = ["/etc/nginx/"]
    """
    cfg_env["settings"](extra=web2)
    state = backup()
    exc = error_of(state)
    assert "web2:" in str(exc) and "web1:" not in str(exc)
    tree = git("--git-dir", str(cfg_env["remote"]), "ls-tree", "--name-only", "main").split()
    assert "web1" in tree and "web2" not in tree  # web1 committed and pushed all the same
    rows = {r["target"]: r for r in log_rows(cfg_env["cluster"], cfg_env["db"]) if r["component"] == "configs"}
    assert rows["web1"]["status"] == "success" and rows["web2"]["status"] == "failed"
    assert [k for k in s3_keys(cfg_env["s3"], cfg_env["bucket"]) if k.startswith("backups/configs/web2/")] == []


def test_a_host_that_goes_silent_mid_read_is_stopped_and_tried_again_never_held(cfg_env: dict[str, Any]) -> None:
    """A host that vanishes mid-fetch (no reset: a cut link, a dead VM behind a firewall) sends nothing more.
    Its silence ends the read after hosts.io_timeout; with a long io_timeout, the stage limit stops the attempt.
    Either way each attempt is stopped, tried again, and the run fails for that host alone, leaving nothing stored."""
    from tests.fault_proxy import StallProxy

    big = cfg_env["tmp"] / "web3/etc/app"
    big.mkdir(parents=True)
    (big / "bundle.conf").write_bytes(os.urandom(3 * 1024 * 1024))  # far more than the proxy lets through
    proxy = StallProxy(cfg_env["sshd"].port, stall_after=256 * 1024)

    def web3(io_timeout: float, stage_timeout: float) -> tuple[str, str]:
        return f"""
        [hosts.web3]
        host = "127.0.0.1"
        port = {proxy.port}
        user = "{cfg_env['sshd'].user}"
        key = "file:{cfg_env['sshd'].client_key}"
        known_hosts = "{cfg_env['tmp'] / 'web3_known'}"
        connect_timeout = 5
        io_timeout = {io_timeout}
        [configs.hosts.web3]
        paths = ["{big}/"]
        """, f"attempts = 2\n            retry_delay_seconds = [0]\n            stage_timeout_seconds = {stage_timeout}"

    (cfg_env["tmp"] / "web3_known").write_text(cfg_env["sshd"].known_hosts_line.replace(
        f"[127.0.0.1]:{cfg_env['sshd'].port}", f"[127.0.0.1]:{proxy.port}"))
    try:
        for io_timeout, stage_timeout, said in [(2, 600, "web3 sent nothing for 2 s"),
                                                (600, 4, "ran past configs.stage_timeout_seconds")]:
            extra, configs_opts = web3(io_timeout, stage_timeout)
            cfg_env["settings"](configs_opts=configs_opts, extra=extra)
            proxy.stalled.clear()
            state = backup(hosts=["web1", "web3"])
            exc = error_of(state)
            assert proxy.stalled.is_set()  # the host really went silent mid-read
            assert "web3:" in str(exc) and said in str(exc) and "web1:" not in str(exc), str(exc)
            assert [k for k in s3_keys(cfg_env["s3"], cfg_env["bucket"]) if k.startswith("backups/configs/web3/")] == []
            rows = [r for r in log_rows(cfg_env["cluster"], cfg_env["db"]) if r["component"] == "configs"]
            assert rows[-1]["target"] in ("web1", "web3")
            assert {r["target"]: r["status"] for r in rows[-2:]} == {"web1": "success", "web3": "failed"}
    finally:
        proxy.close()


def test_unknown_git_server_key_and_missing_fingerprint_key_are_clear_errors(cfg_env: dict[str, Any]) -> None:
    other = cfg_env["tmp"] / "other_known_hosts"
    other.write_text("[127.0.0.1]:1 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx1eGltYS10ZXN0LW5vdC10aGUtcmVhbC1rZXk=\n")
    cfg_env["settings"](git_known=other)
    exc = error_of(backup())
    assert "host key is unknown or CHANGED" in str(exc)
    assert remote_log_or_empty(cfg_env["remote"]) == []  # nothing reached the remote
    impostor = cfg_env["tmp"] / "impostor"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(impostor)], check=True)
    changed = cfg_env["tmp"] / "changed_known_hosts"  # the same host and port, another key
    changed.write_text(f"[127.0.0.1]:{cfg_env['sshd'].port} " + " ".join(impostor.with_suffix(".pub").read_text().split()[:2]) + "\n")
    cfg_env["settings"](git_known=changed)
    exc = error_of(backup())
    assert "host key is unknown or CHANGED" in str(exc) and remote_log_or_empty(cfg_env["remote"]) == []
    cfg_env["settings"](fingerprint=False)
    exc = error_of(backup())
    assert "configs.fingerprint_key is not set" in str(exc)


def remote_log_or_empty(remote: Path) -> list[str]:
    """The remote's log, or [] when its main branch has no commit yet; any other git failure (a wrong
    path, a broken repository) fails the test rather than passing for "nothing reached the remote"."""
    assert (remote / "HEAD").is_file(), f"{remote} is not a bare git repository"
    exists = subprocess.run(["git", "--git-dir", str(remote), "rev-parse", "--verify", "-q", "refs/heads/main"],
                            capture_output=True)
    assert exists.returncode in (0, 1), exists.stderr
    return remote_log(remote) if exists.returncode == 0 else []


def test_cli_backs_up_lists_and_dry_runs_a_restore(cfg_env: dict[str, Any]) -> None:
    import sys

    cli = str(Path(sys.executable).parent / "luxima-backup")
    env = {**os.environ}
    done = subprocess.run([cli, "backup", "configs"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    backup_id = json.loads(done.stdout)["hosts"]["web1"]["backup_id"]
    listed = subprocess.run([cli, "list", "--component", "configs"], env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and backup_id in listed.stdout  # from the manifests alone
    (cfg_env["root"] / "etc/nginx/nginx.conf").write_text("worker_processes 9;\n")
    done = subprocess.run([cli, "restore", "configs", "web1"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    plan = json.loads(done.stdout)
    assert plan["dry_run"] and plan["counts"]["update"] == 1
    assert (cfg_env["root"] / "etc/nginx/nginx.conf").read_text() == "worker_processes 9;\n"
    refused = subprocess.run([cli, "restore", "configs", "web1", "--apply"], env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "confirm = 'web1'" in refused.stderr


def test_archive_round_trips_break_glass_with_only_the_key_file(cfg_env: dict[str, Any], key_file: Path) -> None:
    import sys
    import tarfile

    result = backed_up()
    key = result["hosts"]["web1"]["object_key"]
    copy = cfg_env["tmp"] / "copy.tar.gz.enc"
    copy.write_bytes(s3_get(cfg_env["s3"], cfg_env["bucket"], key))
    out = cfg_env["tmp"] / "configs.tar"
    cli = str(Path(sys.executable).parent / "luxima-backup")
    env = {k: v for k, v in os.environ.items() if k != "LUXIMA_BACKUP_CONFIG"}  # no settings at all
    done = subprocess.run([cli, "decrypt", "--input", str(copy), "--key-file", str(key_file), "--decompress", "-o", str(out)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    root = cfg_env["root"]
    with tarfile.open(out) as tar:
        names = tar.getnames()
        env_member = tar.getmember(f"{str(root).lstrip('/')}/data/coolify/source/.env")
        assert env_member.mode == 0o600
        assert tar.extractfile(env_member).read() == (root / "data/coolify/source/.env").read_bytes()  # type: ignore[union-attr]
        link = tar.getmember(f"{str(root).lstrip('/')}/etc/nginx/sites-enabled/luxima.conf")
        assert link.issym() and link.linkname == "../sites-available/luxima.conf"
        index = json.loads(tar.extractfile(".luxima-index.json").read())  # type: ignore[union-attr]
    assert names[-1] == ".luxima-index.json" and len(index["files"]) == 9
    assert PRIVATE_KEY.encode() in out.read_bytes()  # the real files, secrets and all, only in here


def test_archives_to_a_separate_local_target_with_extended_secret_rules(cfg_env: dict[str, Any]) -> None:
    target = cfg_env["tmp"] / "pbs-datastore"
    (cfg_env["root"] / "data/coolify/source/.env").write_text("APP_NAME=x\nLUXIMA_SEAL=sealvalue-0123456789\n")
    cfg_env["settings"](extra=f"""
    [configs.storage]
    kind = "local"
    path = "{target}"
    [configs.secrets]
    names = ["_SEAL$"]
    """)
    result = backed_up()
    key = result["hosts"]["web1"]["object_key"]
    assert (target / key).is_file() and (target / key.replace(".tar.gz.enc", ".manifest.json")).is_file()
    assert not [k for k in s3_keys(cfg_env["s3"], cfg_env["bucket"]) if "/configs/" in k]  # not in [storage]
    history = remote_everything(cfg_env["remote"])
    assert "sealvalue-0123456789" not in history and "LUXIMA_SEAL=luxima-redacted:hmac-sha256:" in history
    (cfg_env["root"] / "etc/nginx/nginx.conf").write_text("worker_processes 5;\n")
    plan = restore(host="web1").result()
    assert plan["object_key"] == key and plan["counts"]["update"] == 1
