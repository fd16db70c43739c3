"""Fetching config paths over SFTP from a real sshd: globs, folders, links, exclusions, limits, missing paths."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from luxima_backup import ssh
from luxima_backup.errors import ConfigError
from devkit.sandbox import SshServer
from luxima_backup.settings import SshHost
from tasks.fetch import Fetched, walk_paths


@pytest.fixture(scope="module")
def sshd() -> Iterator[SshServer]:
    server = SshServer().start()
    yield server
    server.stop()


@pytest.fixture
def host_tree(tmp_path: Path) -> Path:
    """A host's configs: nginx with sites-enabled links, a Coolify .env, compose files of two services."""
    root = tmp_path / "host"
    (root / "etc/nginx/sites-available").mkdir(parents=True)
    (root / "etc/nginx/sites-enabled").mkdir()
    (root / "etc/nginx/nginx.conf").write_text("worker_processes auto;\n")
    (root / "etc/nginx/sites-available/luxima.conf").write_text("server { listen 443 ssl; }\n")
    os.symlink("../sites-available/luxima.conf", root / "etc/nginx/sites-enabled/luxima.conf")
    (root / "etc/nginx/access.log").write_text("x" * 5000)
    (root / "data/coolify/source").mkdir(parents=True)
    (root / "data/coolify/source/.env").write_text("APP_KEY=base64:abc\n")
    os.chmod(root / "data/coolify/source/.env", 0o600)
    for app in ("api", "web"):
        (root / f"srv/apps/{app}").mkdir(parents=True)
        (root / f"srv/apps/{app}/docker-compose.yml").write_text(f"services:\n  {app}: {{}}\n")
        (root / f"srv/apps/{app}/big.sql").write_bytes(b"0" * 3_000_000)
    return root


def connect(sshd: SshServer, tmp_path: Path) -> ssh.paramiko.SSHClient:
    known = tmp_path / "known_hosts"
    known.write_text(sshd.known_hosts_line)
    return ssh.connect(SshHost(host="127.0.0.1", port=sshd.port, user=sshd.user, key=f"file:{sshd.client_key}",
                               known_hosts=known, connect_timeout=5))


def test_fetch_globs_folders_links_and_limits(sshd: SshServer, tmp_path: Path, host_tree: Path) -> None:
    r = str(host_tree)
    (host_tree / "etc/nginx/.git").mkdir()
    (host_tree / "etc/nginx/.git/config").write_text("[core]\n")  # etckeeper's repository: never fetched
    got = Fetched()
    with connect(sshd, tmp_path) as client, client.open_sftp() as sftp:
        files = {f.path: f for f in walk_paths(sftp, [f"{r}/etc/nginx/", f"{r}/data/coolify/source/.env",
                                                       f"{r}/srv/apps/*/*", f"{r}/etc/missing.conf"],
                                                ["*.log"], 1_000_000, got)}
    assert files[f"{r}/etc/nginx/nginx.conf"].data == b"worker_processes auto;\n"
    link = files[f"{r}/etc/nginx/sites-enabled/luxima.conf"]
    assert link.data is None and link.meta["symlink"] == "../sites-available/luxima.conf"
    assert f"{r}/etc/nginx/access.log" not in files  # excluded
    assert not any("/.git/" in p for p in files)
    assert f"{r}/srv/apps/web/docker-compose.yml" in files and f"{r}/srv/apps/api/docker-compose.yml" in files
    assert sorted(got.too_large) == [f"{r}/srv/apps/api/big.sql", f"{r}/srv/apps/web/big.sql"]
    assert got.missing == [f"{r}/etc/missing.conf"]
    assert got.files[f"{r}/data/coolify/source/.env"]["mode"] == 0o600
    assert got.bytes == sum(len(f.data) for f in files.values() if f.data is not None)
    assert set(got.files) == set(files)


def test_relative_or_dotted_paths_are_refused(sshd: SshServer, tmp_path: Path) -> None:
    with connect(sshd, tmp_path) as client, client.open_sftp() as sftp:
        for bad in ("etc/nginx", "/etc/../root"):
            with pytest.raises(ConfigError):
                list(walk_paths(sftp, [bad], [], 1000, Fetched()))
