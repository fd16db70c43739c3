"""dr-drill end to end: real backups of every component, replicated to the DR site (a directory on a DR host over
SSH, a second bucket), then restored at the DR site from those copies alone: a second PostgreSQL cluster as the
DR database server, scratch folders, the Proxmox simulator's second node; with the primary's backups gone, with
one component broken, and with Vault unreachable and only the offline recovery key.
"""

from __future__ import annotations

import json
import textwrap
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from devkit.sandbox import PostgresCluster, SshServer
from tests.conftest import DB_PASSWORD
from tests.helpers import cli_env, error_of, host_toml, log_rows, run_backup
from tests.test_configs import git, make_host
from tests.test_dr_replicate import dr_bucket_toml

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dr_pg() -> Iterator[PostgresCluster]:
    """The DR site's PostgreSQL server: a cluster of its own."""
    cluster = PostgresCluster(DB_PASSWORD).start()
    yield cluster
    cluster.destroy()


def drill_databases(cluster: PostgresCluster) -> list[str]:
    with cluster.connect() as conn:
        return [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'luxima_drill_%'")]


def dr_pg_toml(cluster: PostgresCluster) -> str:
    return textwrap.dedent(f"""
        [databases.drpg]
        host = "127.0.0.1"
        port = {cluster.port}
        dbname = "postgres"
        user = "postgres"
        password = "env:LUXIMA_TEST_DB_PASSWORD"
        sslmode = "disable"
        """)


def drill(**params: Any) -> Any:
    from flows.dr_drill import dr_drill

    return dr_drill(**params, return_state=True)


def reports(s3_server: Any, bucket: str) -> list[dict[str, Any]]:
    client = s3_server.client()
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="backups/_drills/").get("Contents", []))
    assert all(k.endswith((".json", ".md")) for k in keys) and len(keys) % 2 == 0
    return [json.loads(client.get_object(Bucket=bucket, Key=k)["Body"].read()) for k in keys if k.endswith(".json")]


def test_a_drill_restores_every_component_from_the_dr_copies_alone_and_a_broken_one_does_not_stop_the_others(
    pve: Any, vm_settings: Any, sshd: SshServer, s3_server: Any, dr_pg: PostgresCluster, pg_cluster: PostgresCluster,
    database: str, source: dict[str, int], bucket: str, tmp_path: Path, prefect_server: Any,
) -> None:
    from flows.config_backup import config_backup
    from flows.dr_replicate import dr_replicate
    from flows.files_backup import files_backup
    from flows.vm_backup import vm_backup
    from tests.vm_env import NODE2

    known = tmp_path / "known_hosts"
    known.write_text(sshd.known_hosts_line)
    _, bucket_toml = dr_bucket_toml(s3_server)
    files = tmp_path / "userfiles"
    (files / "avatars").mkdir(parents=True)
    for i in range(20):
        (files / "avatars" / f"u{i}.png").write_bytes(uuid.uuid4().bytes * (i + 1))
    host = tmp_path / "web1"
    make_host(host)
    remote = tmp_path / "remote.git"
    git("init", "--quiet", "--bare", "--initial-branch=main", str(remote))
    dr_dir = tmp_path / "dr-node"
    dr_dir.mkdir()
    fp_key = tmp_path / "fingerprint.key"
    fp_key.write_text("a-fingerprint-key-of-32-bytes-xyz")
    primary_dump, dr_dump = tmp_path / "pve-backup-1" / "dump", tmp_path / "pve-backup-2" / "dump"
    hosts = "".join(host_toml(n, sshd, known) for n in ("node1", "node2", "web1"))
    vm_settings(vm_backup="guests = [100]", vm_restore=hosts + bucket_toml + dr_pg_toml(dr_pg) + textwrap.dedent(f"""
        [files_backup]
        attempts = 1
        [files_backup.sources.userfiles]
        kind = "local"
        path = "{files}"

        [configs]
        attempts = 1
        fingerprint_key = "file:{fp_key}"
        [configs.git]
        remote = "ssh://{sshd.user}@127.0.0.1:{sshd.port}{remote}"
        key = "file:{sshd.client_key}"
        known_hosts = "{known}"
        [configs.hosts.web1]
        paths = ["{host}/etc/nginx/", "{host}/srv/apps/*/docker-compose.yml"]
        exclude = ["*.log"]

        [dr.targets.node2]
        kind = "ssh"
        host = "node2"
        path = "{dr_dir}"
        [dr.vm]
        source_host = "node1"
        source_path = "{primary_dump}"
        target_host = "node2"
        target_path = "{dr_dump}"
        [dr.drill]
        target = "node2"
        database = "drpg"
        node = "{NODE2}"
        """))
    assert run_backup(deep_verify=False).is_completed()
    assert files_backup(return_state=True).is_completed()
    assert config_backup(return_state=True).is_completed()
    assert vm_backup(return_state=True).is_completed()
    replicated = dr_replicate(return_state=True)
    assert replicated.is_completed(), replicated.message

    # The primary site's backups are gone: the drill has only the DR copies.
    client = s3_server.client()
    for o in client.list_objects_v2(Bucket=bucket, Prefix="backups/").get("Contents", []):
        client.delete_object(Bucket=bucket, Key=o["Key"])
    guests_before = {g["vmid"] for g in pve_guests(pve, NODE2)}

    state = drill()
    assert state.is_completed(), state.message
    result = state.result()
    rows = {(r["component"], r["target"]): r for r in result["restores"]}
    assert set(rows) == {("db", "main"), ("files", "userfiles"), ("configs", "web1"), ("vm", "web")}
    assert all(r["ok"] and r["within_rto"] and r["rto_seconds"] > 0 for r in rows.values()), rows
    assert rows["db", "main"]["checks"].endswith("passed") and "md5 of 20 file(s)" == rows["files", "userfiles"]["checks"]
    assert rows["vm", "web"]["restored_into"].startswith(NODE2) and rows["vm", "web"]["removed"]
    rpo = {(r["target"], r["component"], r["source"]): r for r in result["rpo"]}
    assert {t for t, _, _ in rpo} == {"node2", "bucket2"} and all(r["within_rpo"] for r in rpo.values())
    assert 0 < result["rto_total_seconds"] < 7200
    # evidence kept under the prefix (JSON and markdown), a log row; everything restored removed
    [report] = reports(s3_server, bucket)
    assert report["ok"] and report["dr_target"] == "node2" and not report["recovery_key"]
    md = client.get_object(Bucket=bucket, Key=result["evidence"][1])["Body"].read().decode()
    assert "**passed**" in md and "| vm | web | ok |" in md and "| bucket2 | db | main |" in md
    [logged] = [r for r in log_rows(pg_cluster, database) if r["kind"] == "drill"]
    assert logged["status"] == "success" and logged["target"] == "node2" and len(logged["details"]["restores"]) == 4
    assert drill_databases(dr_pg) == [] and not list((tmp_path / "work").glob("dr-drill-*"))
    assert {g["vmid"] for g in pve_guests(pve, NODE2)} == guests_before

    # One component broken at the DR site (its files archive damaged): the others are still restored and checked.
    [archive] = [p for p in (dr_dir / "backups" / "files").rglob("*.tar.*.enc")]
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    state = drill()
    assert state.is_failed()
    assert "files/userfiles" in str(error_of(state))
    latest = reports(s3_server, bucket)[-1]
    by = {(r["component"], r["target"]): r for r in latest["restores"]}
    assert not latest["ok"] and not by["files", "userfiles"]["ok"] and by["files", "userfiles"]["error"]
    assert all(by[k]["ok"] for k in (("db", "main"), ("configs", "web1"), ("vm", "web")))
    assert any("files/userfiles" in p for p in latest["problems"])
    assert drill_databases(dr_pg) == [] and not list((tmp_path / "work").glob("dr-drill-*"))  # cleaned up on failure too
    assert {g["vmid"] for g in pve_guests(pve, NODE2)} == guests_before
    assert [r["status"] for r in log_rows(pg_cluster, database) if r["kind"] == "drill"] == ["success", "failed"]


def pve_guests(pve: Any, node: str) -> list[dict[str, Any]]:
    from proxmoxer import ProxmoxAPI

    api = ProxmoxAPI(pve.host, port=pve.port, user="root@pam", token_name="sim", token_value=pve.root_token.secret,
                     verify_ssl=str(pve.ca_path), backend="https")
    return list(api.nodes(node).qemu.get()) + list(api.nodes(node).lxc.get())


def test_a_drill_with_vault_unreachable_restores_with_the_recovery_key_alone_and_says_when_one_is_overdue(
    prefect_server: Any, pg_cluster: PostgresCluster, s3_server: Any, dr_pg: PostgresCluster, database: str,
    bucket: str, write_settings: Any, vault: dict[str, Any], monkeypatch: pytest.MonkeyPatch, source: dict[str, int],
    tmp_path: Path,
) -> None:
    import subprocess
    import sys

    from flows.dr_replicate import dr_replicate
    from tests.conftest import transit_with_recovery_key

    keys, key_path, _ = transit_with_recovery_key(vault, monkeypatch, tmp_path)
    _, bucket_toml = dr_bucket_toml(s3_server)
    extra = bucket_toml + dr_pg_toml(dr_pg) + textwrap.dedent("""
        [dr]
        components = ["db"]
        [dr.drill]
        database = "drpg"
        components = ["db"]
        """)
    config = write_settings(database, bucket, keys, extra)
    cli = str(Path(sys.executable).parent / "luxima-backup")
    status = subprocess.run([cli, "status"], capture_output=True, text=True, env=cli_env(prefect_server, config), timeout=300)
    assert status.returncode == 1 and "DR drill: last successful never" in status.stdout and "OVERDUE" in status.stdout
    assert run_backup(deep_verify=False).is_completed()
    assert dr_replicate(return_state=True).is_completed()

    # Vault is gone (its address answers nothing): the drill restores with the offline key alone.
    write_settings(database, bucket, keys.replace(vault["url"], "http://127.0.0.1:9"), extra)
    state = drill(recovery_key=str(key_path), keep=True)
    assert state.is_completed(), state.message
    [row] = state.result()["restores"]
    assert row["ok"] and row["component"] == "db"
    [kept] = drill_databases(dr_pg)  # keep: left for inspection, on the DR server
    assert kept == row["restored_into"]
    with dr_pg.connect(kept) as conn:
        assert conn.execute("SELECT count(*) FROM app.users").fetchone()[0] == source["app.users"]
    with dr_pg.connect() as conn:
        conn.execute(f'DROP DATABASE "{kept}" WITH (FORCE)')
    [report] = reports(s3_server, bucket)
    assert report["ok"] and report["recovery_key"] and report["kept"]

    # without the recovery key the same drill cannot read a thing, and says why
    state = drill()
    assert state.is_failed() and "cannot reach Vault" in str(error_of(state))
    assert drill_databases(dr_pg) == []

    status = subprocess.run([cli, "status"], capture_output=True, text=True, env=cli_env(prefect_server, config), timeout=300)
    assert "DR drill: last successful" in status.stdout and "OVERDUE" not in status.stdout, status.stdout
