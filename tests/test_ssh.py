"""SSH with strict host-key checking, against a real OpenSSH sshd on loopback."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from luxima_backup import ssh
from luxima_backup.errors import ConfigError, IntegrityError, is_transient
from devkit.sandbox import SshServer, free_port
from luxima_backup.settings import SshHost


@pytest.fixture(scope="module")
def sshd() -> Iterator[SshServer]:
    server = SshServer().start()
    yield server
    server.stop()


def host(sshd: SshServer, known_hosts: Path, key: Path | None = None, port: int | None = None) -> SshHost:
    return SshHost(host="127.0.0.1", port=port or sshd.port, user=sshd.user, key=f"file:{key or sshd.client_key}",
                   known_hosts=known_hosts, connect_timeout=5)


def test_known_host_connects_and_runs_a_command(sshd: SshServer, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text(sshd.known_hosts_line)
    with ssh.connect(host(sshd, known)) as client:
        status, out, _ = ssh.run(client, "echo luxima; exit 3")
    assert (status, out) == (3, b"luxima\n")


def test_unknown_host_is_refused_and_not_remembered(sshd: SshServer, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("")
    with pytest.raises(ConfigError, match="not in .*known_hosts.*never accepted") as err:
        ssh.connect(host(sshd, known))
    assert "ssh-keyscan" in (err.value.hint or "")
    assert known.read_text() == ""


def test_changed_host_key_is_refused_as_impersonation(sshd: SshServer, tmp_path: Path, monkeypatch: Any) -> None:
    other = SshServer()  # only for a second, different host key
    other.root.mkdir(exist_ok=True)
    import subprocess

    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other.host_key)], check=True)
    kind, key = other.host_key.with_suffix(".pub").read_text().split()[:2]
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {kind} {key}\n")
    try:
        with pytest.raises(IntegrityError, match="CHANGED") as err:
            ssh.connect(host(sshd, known))
        assert not is_transient(err.value)
    finally:
        other.stop()


def test_wrong_client_key_and_closed_port(sshd: SshServer, tmp_path: Path) -> None:
    import subprocess

    known = tmp_path / "known_hosts"
    known.write_text(sshd.known_hosts_line)
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    with pytest.raises(ssh.SshError, match="refused the key") as err:
        ssh.connect(host(sshd, known, key=stranger))
    assert not is_transient(err.value)
    with pytest.raises(ssh.SshError, match="cannot reach") as err:
        ssh.connect(host(sshd, known, port=free_port()))
    assert is_transient(err.value)
