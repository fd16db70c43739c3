"""Throwaway local servers for the demo and the tests: PostgreSQL, an S3 server, a Prefect server.

Each binds to loopback on a free port, lives in its own directory, and is stopped and removed
by ``stop()``. Nothing here is used by the production flows.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

DB_OS_USER = "postgres"  # initdb refuses to run as root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Any, timeout: float, what: str, proc: subprocess.Popen[Any] | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} while starting{_tail(log)}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not start within {timeout:.0f}s{_tail(log)}")


def _tail(log: Path | None) -> str:
    if log is None or not log.exists():
        return ""
    return ":\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:])


OWNER_FILE = "owner.json"


def _claim(root: Path, kind: str, server_pid: int | None = None) -> None:
    """Record who started the server in ``root``, so a later run can clean up after a killed one."""
    (root / OWNER_FILE).write_text(json.dumps({"kind": kind, "owner": os.getpid(), "server": server_pid}))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def reap_orphans(tmp: Path | None = None) -> list[str]:
    """Stop and remove sandbox servers whose owning process is gone (a killed test run or demo).

    Servers run in their own sessions so that Ctrl-C reaches only their owner; this is how they
    are found again when the owner died without stopping them. Returns the directories removed.
    """
    removed = []
    for owner_file in sorted(Path(tmp or tempfile.gettempdir()).glob(f"luxima-*/{OWNER_FILE}")):
        root = owner_file.parent
        try:
            info = json.loads(owner_file.read_text())
        except (OSError, ValueError):
            continue
        if _alive(int(info.get("owner", 0)) or 1):
            continue
        if info.get("kind") == "postgres":
            pidfile = root / "data" / "postmaster.pid"
            if pidfile.exists():
                pid = int(pidfile.read_text().split()[0])
                if "postgres" in _cmdline(pid):
                    os.kill(pid, signal.SIGQUIT)  # immediate shutdown: the data is throwaway
                    _wait_gone(pid)
        elif info.get("server") and any(m in _cmdline(int(info["server"])) for m in ("moto.server", "prefect", "sshd",
                                                                                       "dockerd", "docker-registry")):
            try:
                os.killpg(int(info["server"]), signal.SIGKILL)
            except ProcessLookupError:
                pass
            _wait_gone(int(info["server"]))
        _unmount_under(root)
        shutil.rmtree(root, ignore_errors=True)
        removed.append(str(root))
    return removed


def _unmount_under(root: Path) -> None:
    """Unmount what a killed container engine left mounted under ``root`` (its overlay layers), deepest first."""
    try:
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return
    for point in sorted((m for m in mounts if m.startswith(str(root) + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


def _wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)


def _spawn(cmd: list[str], log_path: Path, root: Path, kind: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a server in its own session (Ctrl-C reaches only its owner), logging to ``log_path``."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    _claim(root, kind, proc.pid)
    return proc


def stop_group(proc: subprocess.Popen[Any] | None, grace: float, sig: int = signal.SIGTERM) -> None:
    """Signal a process started in its own session (its whole group), then kill it after ``grace`` seconds."""
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _terminate(proc: subprocess.Popen[bytes] | None, root: Path, grace: float) -> None:
    """Stop a server started by ``_spawn`` and remove its directory."""
    stop_group(proc, grace)
    shutil.rmtree(root, ignore_errors=True)


def pg_bin_dir() -> Path:
    """The newest installed PostgreSQL server's bin directory."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found; run scripts/bootstrap.sh")


class PostgresCluster:
    """A private PostgreSQL cluster: password (scram) auth over TCP on 127.0.0.1, trust on its socket."""

    def __init__(self, superuser_password: str, port: int | None = None, root: Path | None = None):
        self.password = superuser_password
        self.port = port or free_port()
        self.root = root or Path(tempfile.mkdtemp(prefix="luxima-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.bin = pg_bin_dir()
        self.superuser = "postgres"
        self.host = "127.0.0.1"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", DB_OS_USER, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=check, cwd="/")

    def start(self) -> "PostgresCluster":
        if os.geteuid() == 0:
            pw = pwd.getpwnam(DB_OS_USER)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        os.chmod(self.root, 0o700)
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:
            os.chown(pwfile, pw.pw_uid, pw.pw_gid)
        try:
            self._run("initdb", "-D", str(self.data), "-U", self.superuser, "--auth-local=trust",
                      "--auth-host=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C.UTF-8")
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"initdb failed: {exc.stderr}") from None
        finally:
            pwfile.unlink(missing_ok=True)
        with open(self.data / "postgresql.conf", "a") as conf:
            # Throwaway cluster: durability off for speed; small memory; loopback only.
            conf.write(
                f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\nunix_socket_directories = '{self.root}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nshared_buffers = 128MB\n"
                "max_connections = 50\nlog_min_messages = warning\n"
            )
        _claim(self.root, "postgres")
        result = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start", check=False)
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {result.stderr}{_tail(self.log)}")
        return self

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def conninfo(self, dbname: str = "postgres", user: str | None = None, password: str | None = None) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "dbname": dbname, "user": user or self.superuser,
                "password": password if password is not None else self.password}

    def connect(self, dbname: str = "postgres", **kw: Any) -> Any:
        import psycopg

        return psycopg.connect(**self.conninfo(dbname), autocommit=True, **kw)


class MotoS3Server:
    """moto in server mode: a real S3 HTTP endpoint (versioning, multipart, object lock) on loopback."""

    access_key = "luxima-test-access"
    secret_key = "luxima-test-secret-key"

    def __init__(self, port: int | None = None, root: Path | None = None, auth_after: int | None = None):
        """``auth_after``: moto answers that many requests unchecked (to set up users and policies), then checks every
        request against IAM as AWS does (unknown keys refused, each action needing a policy that allows it)."""
        self.port = port or free_port()
        self.root = root or Path(tempfile.mkdtemp(prefix="luxima-s3-"))
        self.log = self.root / "moto.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.auth_after = auth_after

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "MotoS3Server":
        env = dict(os.environ, AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key)
        if self.auth_after is not None:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(self.auth_after)
        self.proc = _spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                           self.log, self.root, "s3", env)
        wait_for(lambda: urllib.request.urlopen(f"{self.url}/moto-api/", timeout=2).status == 200, 60,
                 "moto S3 server", self.proc, self.log)
        return self

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key)

    def create_bucket(self, name: str, versioning: bool = False, object_lock: bool = False) -> None:
        """A bucket; ``object_lock`` makes it one with S3 Object Lock (which turns versioning on, as S3 does)."""
        c = self.client()
        c.create_bucket(Bucket=name, **({"ObjectLockEnabledForBucket": True} if object_lock else {}))
        if versioning and not object_lock:
            c.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})

    def stop(self) -> None:
        _terminate(self.proc, self.root, 10)


class PrefectServer:
    """``prefect server start`` with its own home, on loopback; its database is SQLite in that home, or
    ``database_url`` (``postgresql+asyncpg://…``, as a production server runs)."""

    def __init__(self, port: int | None = None, root: Path | None = None, database_url: str | None = None):
        self.port = port or free_port()
        self.root = root or Path(tempfile.mkdtemp(prefix="luxima-prefect-"))
        self.database_url = database_url
        self.log = self.root / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def env(self) -> dict[str, str]:
        return {
            "PREFECT_HOME": str(self.root), "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }

    def start(self) -> "PrefectServer":
        env = dict(os.environ, **self.env())
        env.pop("PREFECT_API_URL")
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = self.database_url or f"sqlite+aiosqlite:///{self.root}/prefect.db"
        env["PREFECT_UI_ENABLED"] = env.get("PREFECT_UI_ENABLED", "true")
        env["PREFECT_UI_URL"] = self.api_url[: -len("/api")]  # links in alert messages
        env["PREFECT_UI_API_URL"] = self.api_url  # the UI's own calls (its default is port 4200)
        # Proactive automations (the RPO watchdog) are evaluated at this granularity.
        env.setdefault("PREFECT_SERVER_EVENTS_PROACTIVE_GRANULARITY", "PT1S")
        prefect = Path(sys.executable).parent / "prefect"
        self.proc = _spawn([str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                           self.log, self.root, "prefect", env)
        wait_for(lambda: urllib.request.urlopen(f"{self.api_url}/health", timeout=2).status == 200, 180,
                 "Prefect server", self.proc, self.log)
        return self

    def stop(self) -> None:
        _terminate(self.proc, self.root, 20)


class SshServer:
    """OpenSSH's sshd on loopback with its own host key and one authorized client key (no passwords).

    Logins are as the user running the tests; ``known_hosts_line`` is what a client must trust.
    """

    def __init__(self, port: int | None = None, root: Path | None = None):
        self.port = port or free_port()
        self.root = root or Path(tempfile.mkdtemp(prefix="luxima-sshd-"))
        self.host_key = self.root / "host_ed25519"
        self.client_key = self.root / "client_ed25519"
        self.log = self.root / "sshd.log"
        self.user = pwd.getpwuid(os.geteuid()).pw_name
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "SshServer":
        os.chmod(self.root, 0o700)
        for key in (self.host_key, self.client_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", key.name, "-f", str(key)], check=True)
        (self.root / "authorized_keys").write_text(self.client_key.with_suffix(".pub").read_text())
        config = self.root / "sshd_config"
        config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.host_key}\nPidFile {self.root}/sshd.pid\n"
            f"AuthorizedKeysFile {self.root}/authorized_keys\nStrictModes no\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin prohibit-password\n"
            "UsePAM no\nSubsystem sftp internal-sftp\nLogLevel VERBOSE\n"
        )
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        self.proc = _spawn([sshd, "-D", "-e", "-f", str(config)], self.log, self.root, "sshd")

        def listening() -> bool:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                return s.recv(4).startswith(b"SSH-")

        wait_for(listening, 30, "sshd", self.proc, self.log)
        return self

    @property
    def known_hosts_line(self) -> str:
        kind, key = self.host_key.with_suffix(".pub").read_text().split()[:2]
        return f"[127.0.0.1]:{self.port} {kind} {key}\n"

    def stop(self) -> None:
        _terminate(self.proc, self.root, 10)


class DockerDaemon:
    """A private Docker engine (Debian's dockerd): its own data root, runtime directory and socket; no bridge, no
    iptables (nothing here runs containers that need a network: images are saved, loaded and tagged)."""

    def __init__(self, root: Path | None = None):
        self.root = root or Path(tempfile.mkdtemp(prefix="luxima-docker-"))
        self.socket = self.root / "docker.sock"
        self.log = self.root / "dockerd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    @property
    def command(self) -> str:
        """The engine command line for this daemon (what images.command is set to)."""
        return f"docker -H {self.host}"

    def docker(self, *args: str, input: bytes | None = None) -> bytes:
        done = subprocess.run(["docker", "-H", self.host, *args], input=input, capture_output=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} failed: {done.stderr.decode(errors='replace')[-1000:]}")
        return done.stdout

    def start(self) -> "DockerDaemon":
        dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
        cmd = [dockerd, "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "exec"),
               "--pidfile", str(self.root / "dockerd.pid"), "-H", self.host, "--iptables=false", "--ip6tables=false",
               "--bridge=none", "--containerd-namespace", f"luxima-{self.root.name}",
               "--containerd-plugins-namespace", f"luxima-{self.root.name}-plugins"]
        self.proc = _spawn(cmd, self.log, self.root, "dockerd")

        def ready() -> bool:
            return subprocess.run(["docker", "-H", self.host, "info"], capture_output=True, timeout=30).returncode == 0

        wait_for(ready, 60, "dockerd", self.proc, self.log)
        return self

    def stop(self) -> None:
        stop_group(self.proc, 20)
        _unmount_under(self.root)
        shutil.rmtree(self.root, ignore_errors=True)


class DockerRegistry:
    """Debian's docker-registry (the CNCF distribution registry) on 127.0.0.1, over plain HTTP; with ``user`` and
    ``password`` it requires a login (htpasswd, bcrypt)."""

    def __init__(self, user: str | None = None, password: str | None = None, port: int | None = None,
                 tls: tuple[bytes, bytes] | None = None):
        """``tls``: (certificate PEM, key PEM) to serve HTTPS with."""
        self.user, self.password, self.tls = user, password, tls
        self.port = port or free_port()
        self.root = Path(tempfile.mkdtemp(prefix="luxima-registry-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "DockerRegistry":
        auth = ""
        if self.user is not None and self.password is not None:
            import bcrypt

            (self.root / "htpasswd").write_text(f"{self.user}:{bcrypt.hashpw(self.password.encode(), bcrypt.gensalt()).decode()}\n")
            auth = f"auth:\n  htpasswd:\n    realm: luxima-test\n    path: {self.root / 'htpasswd'}\n"
        tls = ""
        if self.tls is not None:
            (self.root / "cert.pem").write_bytes(self.tls[0])
            (self.root / "key.pem").write_bytes(self.tls[1])
            tls = f"  tls:\n    certificate: {self.root / 'cert.pem'}\n    key: {self.root / 'key.pem'}\n"
        (self.root / "config.yml").write_text(
            f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {self.root / 'data'}\n"
            f"http:\n  addr: {self.address}\n{tls}{auth}")
        registry = shutil.which("docker-registry") or "/usr/bin/docker-registry"
        self.proc = _spawn([registry, "serve", str(self.root / "config.yml")], self.root / "registry.log", self.root,
                           "docker-registry")

        def ready() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(ready, 30, "docker-registry", self.proc, self.root / "registry.log")
        return self

    def push(self, archive: Path, ref: str) -> None:
        """Put a ``docker save`` archive into the registry as ``ref`` (repository:tag), with skopeo."""
        creds = [f"--dest-creds={self.user}:{self.password}"] if self.user else []
        done = subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", *creds, f"docker-archive:{archive}",
                               f"docker://{self.address}/{ref}"], capture_output=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"pushing {ref} failed: {done.stderr.decode(errors='replace')[-1000:]}")

    def stop(self) -> None:
        _terminate(self.proc, self.root, 10)
