"""SSH connections (paramiko) with strict host-key checking against a configured known_hosts file.

An unknown host is never accepted (no trust on first use): the operator adds its key to the
configured known_hosts after checking its fingerprint. A host whose key changed is refused
as a possible impersonation. Unreachable hosts and dropped connections are transient.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import os
import socket
import tempfile
from pathlib import Path
from typing import Iterator

import paramiko

from .errors import ConfigError, IntegrityError, StorageError
from .secrets import register
from .settings import SshHost
from .workdir import ensure_private


class SshError(StorageError):
    """An SSH connection or command failed."""


def ssh_command(cfg: SshHost, key_file: str) -> list[str]:
    """The OpenSSH client command (for rsync -e) with the same strictness as ``connect``.

    Only the configured known_hosts file is consulted and unknown or changed host keys are
    refused; no user or system ssh_config, agent or other identity takes part.
    """
    return [*ssh_options(key_file, cfg.known_hosts, cfg.connect_timeout), "-p", str(cfg.port), "-l", cfg.user]


def ssh_options(key_file: str | None, known_hosts: Path, connect_timeout: float) -> list[str]:
    """``ssh`` with one identity and one known_hosts file, unknown or changed host keys refused, never a prompt."""
    identity = ["-i", key_file, "-o", "IdentitiesOnly=yes"] if key_file else []
    return [
        "ssh", "-F", "/dev/null", *identity, "-o", "IdentityAgent=none", "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known_hosts}",
        "-o", "GlobalKnownHostsFile=/dev/null", "-o", "UpdateHostKeys=no",
        "-o", f"ConnectTimeout={int(connect_timeout)}", "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4",
    ]


@contextlib.contextmanager
def private_key_file(text: str, work_dir: Path) -> Iterator[str]:
    """An SSH private key in a 0600 file for OpenSSH (rsync, git), for as long as it runs; removed in all cases."""
    folder = tempfile.mkdtemp(prefix="ssh-", dir=ensure_private(work_dir))
    path = os.path.join(folder, "id")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text.strip() + "\n")  # OpenSSH wants the final newline
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.rmdir(folder)


def _fingerprint(key: paramiko.PKey) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _private_key(text: str, where: str) -> paramiko.PKey:
    register(text)
    for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return cls.from_private_key(io.StringIO(text))
        except (paramiko.SSHException, ValueError):
            continue
    raise ConfigError(f"the SSH key at {where} is not an unencrypted OpenSSH/PEM private key (ed25519, ecdsa or rsa)")


def _host_label(cfg: SshHost) -> str:
    return cfg.host if cfg.port == 22 else f"[{cfg.host}]:{cfg.port}"


def connect(cfg: SshHost, key_text: str | None = None) -> paramiko.SSHClient:
    """A connected, authenticated client for ``cfg``; the caller closes it.

    ``key_text`` is the private key already resolved (``runtime.secret``, which reaches Vault);
    without it the key reference is resolved here (env: and file: references only).
    """
    client = paramiko.SSHClient()
    try:
        client.load_host_keys(str(cfg.known_hosts))  # this file only: never ~/.ssh or system keys
    except FileNotFoundError:
        raise ConfigError(f"known_hosts file {cfg.known_hosts} does not exist",
                          hint=f"create it with the host's verified key: ssh-keyscan -p {cfg.port} {cfg.host}") from None
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    pkey = _private_key(key_text if key_text is not None else cfg.key.resolve(), str(cfg.key))
    label = f"{cfg.user}@{_host_label(cfg)}"
    try:
        client.connect(cfg.host, port=cfg.port, username=cfg.user, pkey=pkey, allow_agent=False,
                       look_for_keys=False, timeout=cfg.connect_timeout, banner_timeout=cfg.connect_timeout,
                       auth_timeout=cfg.connect_timeout)
    except paramiko.BadHostKeyException as exc:
        client.close()
        raise IntegrityError(
            f"the host key of {_host_label(cfg)} has CHANGED: it offers {_fingerprint(exc.key)}, "
            f"{cfg.known_hosts} expects {_fingerprint(exc.expected_key)}",
            hint="someone may be impersonating the host; if it was reinstalled, verify and replace its known_hosts line",
        ) from None
    except paramiko.SSHException as exc:
        client.close()
        text = str(exc)
        if "not found in known_hosts" in text:
            raise ConfigError(
                f"{_host_label(cfg)} is not in {cfg.known_hosts}; unknown hosts are never accepted",
                hint=f"verify the host's key fingerprint out of band, then add its line (ssh-keyscan -p {cfg.port} {cfg.host})",
            ) from None
        if isinstance(exc, paramiko.AuthenticationException):
            raise SshError(f"{label} refused the key {_fingerprint(pkey)}: {text}",
                           hint="add the public key to the user's authorized_keys on the host") from None
        raise SshError(f"SSH to {label} failed: {text}", transient=True) from None
    except (socket.timeout, TimeoutError, OSError) as exc:
        client.close()
        raise SshError(f"cannot reach {label}: {exc}", transient=True) from None
    transport = client.get_transport()
    if transport is not None:
        transport.set_keepalive(15)  # like ServerAliveInterval: NAT and firewalls keep an idle session open
    return client


def run(client: paramiko.SSHClient, command: str, timeout: float = 600) -> tuple[int, bytes, bytes]:
    """Run ``command`` on the host; returns (exit status, stdout, stderr). For small outputs."""
    try:
        _, out, err = client.exec_command(command, timeout=timeout)
        stdout, stderr = out.read(), err.read()
        return out.channel.recv_exit_status(), stdout, stderr
    except (paramiko.SSHException, socket.timeout, OSError) as exc:
        raise SshError(f"running a command over SSH failed: {exc}", transient=True) from None


def run_with_input(client: paramiko.SSHClient, command: str, data: bytes, timeout: float = 600) -> bytes:
    """Run ``command`` with ``data`` on its stdin; returns its stdout. A non-zero exit is an ``SshError``."""
    import threading

    try:
        stdin, out, err = client.exec_command(command, timeout=timeout)

        def feed() -> None:  # in a thread: a full stdout window would otherwise block our writes forever
            try:
                stdin.write(data)
            finally:
                stdin.channel.shutdown_write()

        writer = threading.Thread(target=feed, daemon=True)
        writer.start()
        stdout, stderr = out.read(), err.read()
        writer.join()
        status = out.channel.recv_exit_status()
    except (paramiko.SSHException, socket.timeout, OSError) as exc:
        raise SshError(f"running a command over SSH failed: {exc}", transient=True) from None
    if status != 0:
        raise SshError(f"command on the host failed (exit {status}): {stderr.decode(errors='replace').strip()[-500:]}")
    return stdout
