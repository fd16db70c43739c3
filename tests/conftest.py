"""Test fixtures: real servers started by the tests on loopback (PostgreSQL, S3, Prefect, Vault simulator).

Nothing is skipped for a missing component: a server that cannot start fails the tests, in
CI and locally alike. Set VAULT_ADDR and VAULT_TOKEN to run the Vault tests against a real
Vault instead of the simulator.
"""

from __future__ import annotations

import os
import secrets
import textwrap
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")

from luxima_backup import settings as settings_mod  # noqa: E402
from luxima_backup.keys import new_master_key  # noqa: E402
from devkit.sandbox import MotoS3Server, PostgresCluster, PrefectServer, reap_orphans  # noqa: E402

DB_PASSWORD = "pg-" + secrets.token_urlsafe(16)

pytest_plugins = ["tests.alerting", "tests.browser", "tests.vm_env"]  # chat receiver and automations; a real Chromium


def pytest_sessionstart(session: pytest.Session) -> None:
    # Servers of an earlier run that was killed (timeout, Ctrl-C twice) would hold ports and memory.
    for root in reap_orphans():
        print(f"removed the leftover test server in {root}")


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[PrefectServer]:
    """A real ``prefect server start``; every flow run of the tests goes to it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = PrefectServer().start()
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield server
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)
    server.stop()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster(DB_PASSWORD).start()
    yield cluster
    cluster.destroy()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoS3Server]:
    server = MotoS3Server().start()
    os.environ["LUXIMA_TEST_S3_ACCESS_KEY"] = server.access_key
    os.environ["LUXIMA_TEST_S3_SECRET_KEY"] = server.secret_key
    yield server
    server.stop()


@pytest.fixture(scope="session")
def vault() -> Iterator[dict[str, str]]:
    """A Vault: the real one in VAULT_ADDR/VAULT_TOKEN if given, else the simulator."""
    if os.environ.get("VAULT_ADDR") and os.environ.get("VAULT_TOKEN"):
        info = {"url": os.environ["VAULT_ADDR"], "token": os.environ["VAULT_TOKEN"], "simulator": None}
        _enable_engines(info)
        yield info  # type: ignore[misc]
        return
    from tests.simulators.vault import VaultSimulator

    sim = VaultSimulator().start()
    info = {"url": sim.url, "token": sim.root_token, "simulator": sim}
    _enable_engines(info)
    yield info  # type: ignore[misc]
    sim.stop()
    # It answered those as Vault's 500 (which the project takes for an outage and retries): fail loudly instead.
    assert not sim.internal_errors, "the Vault simulator failed inside:\n" + "\n".join(sim.internal_errors)


def _enable_engines(info: dict[str, Any]) -> None:
    """Transit at transit/ and AppRole at approle/, enabled through the API as an operator would."""
    import hvac

    client = hvac.Client(url=info["url"], token=info["token"])
    if "transit/" not in client.sys.list_mounted_secrets_engines()["data"]:
        client.sys.enable_secrets_engine("transit", path="transit")
    if "approle/" not in client.sys.list_auth_methods()["data"]:
        client.sys.enable_auth_method("approle", path="approle")


@pytest.fixture
def database(pg_cluster: PostgresCluster) -> Iterator[str]:
    """A fresh, empty database in the session cluster."""
    name = "t_" + uuid.uuid4().hex[:10]
    with pg_cluster.connect() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield name
    with pg_cluster.connect() as conn:
        # and whatever restores made beside it (<name>_restore_..., <name>_pre_restore_..., ...)
        made = [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (name + "%",))]
        for db in made:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


@pytest.fixture
def source(pg_cluster: PostgresCluster, database: str) -> dict[str, int]:
    """The test database filled with tables, large rows, bytea, jsonb and a large object."""
    from tests.helpers import make_source

    with pg_cluster.connect(database) as conn:
        return make_source(conn)


@pytest.fixture
def bucket(s3_server: MotoS3Server) -> str:
    name = "t-" + uuid.uuid4().hex[:12]
    s3_server.create_bucket(name, versioning=True)
    return name


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "master.key"
    path.write_text(new_master_key() + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def write_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pg_cluster: PostgresCluster,
                   s3_server: MotoS3Server) -> Callable[..., Path]:
    """Write a settings file for this test and make it the active one (LUXIMA_BACKUP_CONFIG)."""
    monkeypatch.setenv("LUXIMA_TEST_DB_PASSWORD", DB_PASSWORD)

    def write(database: str, bucket: str, keys: str, extra: str = "", *, port: int | None = None,
              endpoint: str | None = None, password_env: str = "LUXIMA_TEST_DB_PASSWORD") -> Path:
        path = tmp_path / f"settings-{uuid.uuid4().hex[:6]}.toml"
        path.write_text(textwrap.dedent(f"""
            work_dir = "{tmp_path / 'work'}"

            [databases.main]
            host = "127.0.0.1"
            port = {port or pg_cluster.port}
            dbname = "{database}"
            user = "postgres"
            password = "env:{password_env}"
            sslmode = "disable"
            schemas = ["public", "app"]

            [storage]
            bucket = "{bucket}"
            endpoint_url = "{endpoint or s3_server.url}"
            access_key_id = "env:LUXIMA_TEST_S3_ACCESS_KEY"
            secret_access_key = "env:LUXIMA_TEST_S3_SECRET_KEY"
            max_attempts = 2
            multipart_chunk_mib = 5

            [db_backup]
            attempts = 2
            retry_delay_seconds = [0.5]
        """) + textwrap.dedent(keys) + textwrap.dedent(extra))
        monkeypatch.setenv(settings_mod.CONFIG_ENV, str(path))
        return path

    return write


def file_keys(key_file: Path) -> str:
    return f"""
        [keys]
        provider = "file"
        key_file = "{key_file}"
        allow_key_file = true
    """


def transit_keys(vault: dict[str, Any], key: str, mount: str = "transit") -> str:
    return f"""
        [keys]
        provider = "vault-transit"
        [keys.vault]
        address = "{vault['url']}"
        token = "env:LUXIMA_TEST_VAULT_TOKEN"
        transit_mount = "{mount}"
        transit_key = "{key}"
    """


def kv_keys(vault: dict[str, Any], path: str, mount: str = "secret") -> str:
    return f"""
        [keys]
        provider = "vault-kv"
        [keys.vault]
        address = "{vault['url']}"
        token = "env:LUXIMA_TEST_VAULT_TOKEN"
        kv_mount = "{mount}"
        kv_path = "{path}"
    """


def log_elsewhere(cluster: PostgresCluster, dbname: str) -> str:
    """Settings that keep the backup log in ``dbname`` with the right password, whatever the target's."""
    return f"""
        [databases.logdb]
        host = "127.0.0.1"
        port = {cluster.port}
        dbname = "{dbname}"
        user = "postgres"
        password = "env:LUXIMA_TEST_DB_PASSWORD"
        sslmode = "disable"
        [log]
        database = "logdb"
    """


def transit_with_recovery_key(vault: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[str, Path, str]:
    """[keys] for a fresh Vault Transit key with an offline recovery key (and its catalog key) configured: the TOML, the
    recovery private key file, and its fingerprint."""
    import hvac

    from luxima_backup import recovery

    monkeypatch.setenv("LUXIMA_TEST_VAULT_TOKEN", vault["token"])
    name = f"luxima-test-{uuid.uuid4().hex[:8]}"
    hvac.Client(url=vault["url"], token=vault["token"]).secrets.transit.create_key(name=name)
    key_path = tmp_path / "recovery.pem"
    public, fp = recovery.generate(key_path)
    catalog_key = tmp_path / "recovery.catalog-key"
    recovery.write_catalog_key(recovery.load_private(key_path), catalog_key)
    keys = transit_keys(vault, name).replace("[keys.vault]", f'recovery_public_key = "{public}"\n        '
                                             f'recovery_catalog_key = "file:{catalog_key}"\n        [keys.vault]')
    return keys, key_path, fp


@pytest.fixture(scope="module")
def sshd() -> Iterator[Any]:
    """OpenSSH's sshd with its own host key, for the tests of one module."""
    from devkit.sandbox import SshServer

    server = SshServer().start()
    yield server
    server.stop()
