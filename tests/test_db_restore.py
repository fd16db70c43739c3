"""The db-restore flow end to end: real PostgreSQL, the S3 server, a Prefect server, backups made by db-backup."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from luxima_backup import catalog, runtime
from luxima_backup.errors import ConfigError
from devkit.sandbox import PostgresCluster
from luxima_backup.settings import load_settings
from luxima_backup.storage import store_from_settings
from tests.conftest import file_keys, kv_keys
from tests.helpers import log_rows, run_backup, s3_get, s3_keys, signed_manifest

pytestmark = pytest.mark.slow

TABLES = ("app.users", "app.documents", "public.events")


def run_restore(**params: Any) -> Any:
    from flows.db_restore import db_restore

    return db_restore(**params, return_state=True)


def digest(cluster: PostgresCluster, dbname: str) -> dict[str, str]:
    """A fingerprint of every row of the source tables, and of the large object's bytes."""
    out = {}
    with cluster.connect(dbname) as conn:
        for table in TABLES:
            row = conn.execute(f"SELECT md5(string_agg(t::text, '|' ORDER BY t::text)) FROM {table} t").fetchone()
            out[table] = row[0]
        out["large object"] = conn.execute("SELECT md5(lo_get(lo)) FROM app.documents LIMIT 1").fetchone()[0]
    return out


def databases(cluster: PostgresCluster, prefix: str) -> list[str]:
    with cluster.connect() as conn:
        return sorted(r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (prefix + "%",)))


def put_object(s3_server: Any, bucket: str, key: str, data: bytes) -> None:
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=data)


@pytest.fixture
def backed_up(prefect_server: Any, pg_cluster: PostgresCluster, s3_server: Any, database: str, bucket: str,
              key_file: Path, write_settings: Any, source: dict[str, int]) -> dict[str, Any]:
    """A database with the test schema, one verified backup of it, and its fingerprint at backup time."""
    write_settings(database, bucket, file_keys(key_file))
    state = run_backup(deep_verify=False)
    assert state.is_completed(), state.message
    summary = state.result()
    return {"summary": summary, "digest": digest(pg_cluster, database),
            "manifest": json.loads(s3_get(s3_server, bucket, summary["manifest_key"]))}


def test_round_trip_into_a_new_database(backed_up: dict[str, Any], pg_cluster: PostgresCluster, database: str) -> None:
    with pg_cluster.connect(database) as conn:  # life goes on after the backup
        conn.execute("DELETE FROM app.documents WHERE id > 10")
        conn.execute("UPDATE app.users SET email = 'changed@example.com' WHERE id < 50")
        conn.execute("INSERT INTO public.events (kind) VALUES ('after-backup')")

    started = time.monotonic()
    state = run_restore(target_database=f"{database}_rt")
    elapsed = time.monotonic() - started
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["database"] == f"{database}_rt" and summary["backup_id"] == backed_up["summary"]["backup_id"]
    # the measured RTO covers the streaming pass and the verify, and no more than the run itself; the
    # streaming stages run at once, within the pass
    timings = [r for r in log_rows(pg_cluster, database) if r["kind"] == "restore"][0]["details"]["timings"]
    assert timings["restore"] + timings["verify"] <= summary["rto_seconds"] <= elapsed
    assert max(timings["download"], timings["decrypt"], timings["decompress"]) <= timings["restore"]
    assert summary["rto_target_seconds"] == 120 * 60
    assert digest(pg_cluster, f"{database}_rt") == backed_up["digest"]  # the data as it was at backup time
    assert digest(pg_cluster, database) != backed_up["digest"]          # the source was not touched
    restored = [r for r in log_rows(pg_cluster, database) if r["kind"] == "restore"]
    assert len(restored) == 1 and restored[0]["status"] == "success"
    details = restored[0]["details"]
    assert set(details["timings"]) >= {"download", "decrypt", "decompress", "restore", "verify"}
    assert all(c["ok"] for c in details["checks"]) and len(details["checks"]) >= 3 + len(TABLES)


def test_selective_restore_of_one_table(backed_up: dict[str, Any], pg_cluster: PostgresCluster, database: str) -> None:
    with pg_cluster.connect(database) as conn:
        conn.execute("DELETE FROM app.users WHERE id > 100")  # someone deleted rows from one table
    state = run_restore(target_database=f"{database}_one", tables=["app.users"])
    assert state.is_completed(), state.message
    with pg_cluster.connect(f"{database}_one") as conn:
        assert conn.execute("SELECT count(*) FROM app.users").fetchone()[0] == 500
        present = {r[0] for r in conn.execute(
            "SELECT schemaname || '.' || tablename FROM pg_tables WHERE schemaname IN ('app', 'public')")}
    assert present == {"app.users"}


def test_selective_restore_of_one_schema(backed_up: dict[str, Any], pg_cluster: PostgresCluster, database: str) -> None:
    state = run_restore(target_database=f"{database}_app", schemas=["app"])
    assert state.is_completed(), state.message
    with pg_cluster.connect(f"{database}_app") as conn:
        present = {r[0] for r in conn.execute(
            "SELECT schemaname || '.' || tablename FROM pg_tables WHERE schemaname IN ('app', 'public')")}
    assert present == {"app.users", "app.documents"}  # public.events left out
    with pg_cluster.connect(f"{database}_app") as conn:
        for table in ("app.users", "app.documents"):
            row = conn.execute(f"SELECT md5(string_agg(t::text, '|' ORDER BY t::text)) FROM {table} t").fetchone()
            assert row[0] == backed_up["digest"][table], table


def schema_of(cluster: PostgresCluster, dbname: str) -> dict[str, list[Any]]:
    """What a restore's post-data step creates: indexes, constraints, triggers, materialized views and their rows,
    grants and comments on tables (of the application's schemas: the backup log's own table is not the data's)."""
    ours = "IN ('app', 'public')"
    with cluster.connect(dbname) as conn:
        def rows(query: str) -> list[Any]:
            return sorted(tuple(r) for r in conn.execute(query).fetchall())
        return {
            "indexes": rows(f"SELECT schemaname, indexname, indexdef FROM pg_indexes WHERE schemaname {ours}"),
            "constraints": rows("SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint "
                                f"WHERE connamespace::regnamespace::text {ours}"),
            "triggers": rows("SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid) FROM pg_trigger WHERE NOT tgisinternal"),
            "matviews": rows(f"SELECT schemaname, matviewname, ispopulated FROM pg_matviews WHERE schemaname {ours}"),
            "tables": rows("SELECT c.oid::regclass::text, coalesce(c.relacl::text, ''), coalesce(obj_description(c.oid), '') "
                           f"FROM pg_class c WHERE c.relnamespace::regnamespace::text {ours} AND c.relkind IN ('r', 'm', 'v')"),
        }


def test_parallel_restore(prefect_server: Any, pg_cluster: PostgresCluster, database: str, bucket: str, key_file: Path,
                          write_settings: Any, source: dict[str, int]) -> None:
    """Rows from the stream in one transaction, then indexes, constraints and triggers by two pg_restore workers
    from the dump's table of contents: the same database as a one-stream restore, and no dump on disk."""
    with pg_cluster.connect(database) as conn:
        conn.execute("""
            CREATE INDEX users_email ON app.users (lower(email));
            CREATE UNIQUE INDEX events_kind_id ON public.events (kind, id);
            ALTER TABLE public.events ADD CONSTRAINT events_kind_present CHECK (kind <> '');
            CREATE FUNCTION app.touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
            CREATE TRIGGER users_touch BEFORE UPDATE ON app.users FOR EACH ROW EXECUTE FUNCTION app.touch();
            CREATE MATERIALIZED VIEW app.user_count AS SELECT count(*) AS n FROM app.users;
            CREATE INDEX user_count_n ON app.user_count (n);
            COMMENT ON TABLE app.users IS 'the application''s users';
            GRANT SELECT ON app.users TO PUBLIC;
        """)
    write_settings(database, bucket, file_keys(key_file))
    backup = run_backup(deep_verify=False)
    assert backup.is_completed(), backup.message
    expected = digest(pg_cluster, database)

    state = run_restore(target_database=f"{database}_j2", jobs=2)
    assert state.is_completed(), state.message
    assert "post-data (parallel)" in state.result()["timings"]
    one = run_restore(target_database=f"{database}_j1", jobs=1)
    assert one.is_completed(), one.message
    assert "post-data (parallel)" not in one.result()["timings"]
    assert digest(pg_cluster, f"{database}_j2") == expected == digest(pg_cluster, f"{database}_j1")
    restored = schema_of(pg_cluster, f"{database}_j2")
    assert restored == schema_of(pg_cluster, f"{database}_j1") == schema_of(pg_cluster, database)
    assert ("app", "user_count_n") in {r[:2] for r in restored["indexes"]}
    assert any(r[1] == "users_touch" for r in restored["triggers"])
    with pg_cluster.connect(f"{database}_j2") as conn:  # the materialized view was refreshed, after the indexes
        assert conn.execute("SELECT n FROM app.user_count").fetchone()[0] == source["app.users"]
    work = Path(load_settings().work_dir)
    assert not list(work.glob("restore-*")), "the private spool directory must be removed"


def test_replace_needs_the_confirmation_and_keeps_the_old_database(
    backed_up: dict[str, Any], pg_cluster: PostgresCluster, database: str,
) -> None:
    with pg_cluster.connect(database) as conn:
        conn.execute("DELETE FROM app.documents")
    for confirm in (None, "yes", f"{database}x"):
        state = run_restore(mode="replace", confirm=confirm)
        assert state.is_failed()
        assert f"confirm = '{database}'" in state.message
    assert databases(pg_cluster, database) == [database]  # nothing created, nothing touched

    state = run_restore(mode="replace", confirm=database)
    assert state.is_completed(), state.message
    assert digest(pg_cluster, database) == backed_up["digest"]
    kept = [d for d in databases(pg_cluster, database) if "_pre_restore_" in d]
    assert len(kept) == 1 and state.result()["retired_database"] == kept[0]
    with pg_cluster.connect() as conn:
        allow = dict(conn.execute("SELECT datname, datallowconn FROM pg_database WHERE datname IN (%s, %s)",
                                  (database, kept[0])).fetchall())
        assert allow == {database: True, kept[0]: False}  # the old one kept with connections off
        conn.execute(f'ALTER DATABASE "{kept[0]}" WITH ALLOW_CONNECTIONS true')
    with pg_cluster.connect(kept[0]) as conn:
        assert conn.execute("SELECT count(*) FROM app.documents").fetchone()[0] == 0  # the old data, kept


def test_a_database_whose_name_needs_quoting_is_backed_up_and_replaced(
    prefect_server: Any, pg_cluster: PostgresCluster, s3_server: Any, bucket: str, key_file: Path, write_settings: Any,
) -> None:
    """pg_dump, pg_restore and psql get the database's name inside a connection string (beside the keepalives): a
    name with spaces, quotes and "=" must reach them as that name, never be read as connection keywords."""
    import uuid

    from psycopg import sql

    from tests.helpers import make_source

    name = f"odd name='{uuid.uuid4().hex[:6]}' host=nowhere"
    with pg_cluster.connect() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        with pg_cluster.connect(name) as conn:
            make_source(conn)
        before = digest(pg_cluster, name)
        write_settings(name, bucket, file_keys(key_file))
        state = run_backup()  # deep check on: pg_restore --list of the stream too
        assert state.is_completed(), state.message
        with pg_cluster.connect(name) as conn:
            conn.execute("DELETE FROM app.documents")
        state = run_restore(mode="replace", confirm=name)  # rows over two connections, then pg_restore -j2
        assert state.is_completed(), state.message
        assert digest(pg_cluster, name) == before
        assert len([d for d in databases(pg_cluster, "odd name=") if "_pre_restore_" in d]) == 1
    finally:
        with pg_cluster.connect() as conn:
            for db in databases(pg_cluster, "odd name="):
                conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(db)))


def db_properties(cluster: PostgresCluster, dbname: str) -> dict[str, Any]:
    """What pg_dump --create carries of a database: owner, ACL, connection limit, comment, per-database settings."""
    with cluster.connect() as conn:
        owner, acl, limit, comment = conn.execute(
            "SELECT pg_get_userbyid(datdba), datacl::text, datconnlimit, shobj_description(oid, 'pg_database')"
            " FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
        settings = conn.execute(
            "SELECT coalesce(r.rolname, '*'), s.setconfig::text FROM pg_db_role_setting s"
            " JOIN pg_database d ON d.oid = s.setdatabase LEFT JOIN pg_roles r ON r.oid = s.setrole"
            " WHERE d.datname = %s ORDER BY 1", (dbname,)).fetchall()
    return {"owner": owner, "acl": (acl or "").replace(dbname, "DB"), "connlimit": limit, "comment": comment,
            "settings": settings}


def test_replace_keeps_the_database_properties_while_clients_reconnect(
    prefect_server: Any, pg_cluster: PostgresCluster, database: str, bucket: str, key_file: Path,
    write_settings: Any, source: dict[str, int],
) -> None:
    import threading
    import time as _time

    import psycopg

    owner = f"{database}_owner"
    app = f"{database}_app"
    with pg_cluster.connect() as conn:
        for role in (owner, app):
            conn.execute(f'CREATE ROLE "{role}" LOGIN PASSWORD \'app-pw\'')
        conn.execute(f'ALTER DATABASE "{database}" OWNER TO "{owner}"')
        conn.execute(f'REVOKE CONNECT, TEMPORARY ON DATABASE "{database}" FROM PUBLIC')
        conn.execute(f'GRANT CONNECT ON DATABASE "{database}" TO "{app}"')
        conn.execute(f'ALTER DATABASE "{database}" SET "app.settings.jwt_exp" TO \'3600\'')
        conn.execute(f'ALTER DATABASE "{database}" SET statement_timeout TO \'42s\'')
        conn.execute(f'ALTER ROLE "{app}" IN DATABASE "{database}" SET search_path TO app, public')
        conn.execute(f'ALTER DATABASE "{database}" CONNECTION LIMIT 50')
        conn.execute(f"COMMENT ON DATABASE \"{database}\" IS 'the Luxima platform'")
    with pg_cluster.connect(database) as conn:
        conn.execute(f'GRANT USAGE ON SCHEMA app TO "{app}"')
        conn.execute(f'GRANT SELECT ON app.documents TO "{app}"')
    before = db_properties(pg_cluster, database)
    write_settings(database, bucket, file_keys(key_file))
    state = run_backup(deep_verify=False)
    assert state.is_completed(), state.message
    with pg_cluster.connect(database) as conn:
        conn.execute("DELETE FROM app.documents")

    # An application pool that reconnects as fast as it can throughout the swap.
    stop = threading.Event()
    seen: list[int] = []

    def pool() -> None:
        while not stop.is_set():
            try:
                with psycopg.connect(**pg_cluster.conninfo(database, user=app, password="app-pw"), connect_timeout=2) as c:
                    seen.append(c.execute("SELECT count(*) FROM app.documents").fetchone()[0])
            except psycopg.Error:
                _time.sleep(0.01)

    client = threading.Thread(target=pool, daemon=True)
    client.start()
    try:
        _time.sleep(0.5)
        assert seen and seen[-1] == 0, "the pool reads the damaged database before the restore"
        state = run_restore(mode="replace", confirm=database)
        deadline = _time.monotonic() + 15
        while seen[-1] != source["app.documents"] and _time.monotonic() < deadline:
            _time.sleep(0.1)
    finally:
        stop.set()
        client.join(10)
    assert state.is_completed(), state.message
    assert db_properties(pg_cluster, database) == before
    assert seen[-1] == source["app.documents"]  # the pool is back, on the restored data
    with pg_cluster.connect() as conn:
        assert conn.execute("SELECT datallowconn FROM pg_database WHERE datname = %s", (database,)).fetchone()[0]
        kept = state.result()["retired_database"]
        assert not conn.execute("SELECT datallowconn FROM pg_database WHERE datname = %s", (kept,)).fetchone()[0]
        for db in (kept, database):  # (the fixture would drop them too, but the roles must go after them)
            conn.execute(f'DROP DATABASE "{db}" WITH (FORCE)')
        for role in (owner, app):
            conn.execute(f'DROP ROLE "{role}"')


def test_tampered_object_is_refused_and_nothing_is_left_behind(
    backed_up: dict[str, Any], pg_cluster: PostgresCluster, s3_server: Any, bucket: str, database: str,
) -> None:
    doc = backed_up["manifest"]
    key = doc["dump"]["key"]
    blob = bytearray(s3_get(s3_server, bucket, key))
    blob[len(blob) // 2] ^= 0x40
    put_object(s3_server, bucket, key, bytes(blob))
    state = run_restore(target_database=f"{database}_t1")
    assert state.is_failed() and "sha256" in state.message and "manifest" in state.message

    # An attacker who also fixes the manifest's checksum is stopped by authentication.
    import hashlib

    doc["dump"]["sha256_encrypted"] = hashlib.sha256(blob).hexdigest()
    put_object(s3_server, bucket, backed_up["summary"]["manifest_key"], json.dumps(doc).encode())
    state = run_restore(target_database=f"{database}_t2")
    assert state.is_failed() and "authentic" in state.message.lower()
    assert databases(pg_cluster, database) == [database]


def test_an_older_backups_object_put_in_place_of_a_newer_one_is_refused(
    backed_up: dict[str, Any], pg_cluster: PostgresCluster, s3_server: Any, bucket: str, database: str,
) -> None:
    """A rollback attack: the old dump copied over the newest backup's (a new version of its key). The manifest is
    authentic and the object decrypts, but its header names the backup and key it was written for."""
    first = backed_up["manifest"]
    second = run_backup(deep_verify=False)
    assert second.is_completed(), second.message
    newest = json.loads(s3_get(s3_server, bucket, second.result()["manifest_key"]))
    put_object(s3_server, bucket, newest["dump"]["key"], s3_get(s3_server, bucket, first["dump"]["key"]))
    state = run_restore(target_database=f"{database}_rb")
    assert state.is_failed() and "is not the object its manifest names" in state.message, state.message
    assert first["backup_id"] in state.message and first["dump"]["key"] in state.message
    assert databases(pg_cluster, database) == [database]  # refused on its first bytes; the new database dropped


def test_a_stalled_download_is_stopped_at_the_stage_limit_and_nothing_is_left_behind(
    backed_up: dict[str, Any], pg_cluster: PostgresCluster, s3_server: Any, bucket: str, database: str,
    key_file: Path, write_settings: Any,
) -> None:
    """Storage that accepts the request and never answers holds the download: restore.stage_timeout_seconds
    ends the streaming pass (well before the storage client's own timeouts and retries would), the run fails
    naming the stage and the setting, and the database the pass had created is dropped."""
    from tests.fault_proxy import FaultProxy

    proxy = FaultProxy(s3_server.url).start()
    dump_key = backed_up["manifest"]["dump"]["key"]
    proxy.hold_when = lambda method, path: method == "GET" and dump_key in path
    proxy.hold.clear()
    try:
        write_settings(database, bucket, file_keys(key_file), """
            [restore]
            stage_timeout_seconds = 3
        """, endpoint=proxy.url)
        started = time.monotonic()
        state = run_restore(target_database=f"{database}_stall")
        # ended by the stage limit, not by the storage client's read timeout (60 s, per attempt)
        assert time.monotonic() - started < 60
        assert proxy.held.is_set()  # the download really was held at the storage
    finally:
        proxy.stop()
    assert state.is_failed()
    assert "restore attempt 1 ran past its limit of 3 s" in state.message and "restore.stage_timeout_seconds" in state.message
    assert databases(pg_cluster, database) == [database]
    rows = [r for r in log_rows(pg_cluster, database) if r["kind"] == "restore"]
    assert rows[-1]["status"] == "failed" and "stage_timeout_seconds" in rows[-1]["error"]


def test_a_backup_and_restore_with_the_master_key_in_vault_kv(
    prefect_server: Any, pg_cluster: PostgresCluster, s3_server: Any, database: str, bucket: str, vault: dict[str, Any],
    write_settings: Any, source: dict[str, int], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Vault KV provider through whole flows: the data key wrapped under the KV master key, a deep-verified
    backup, a restore whose data matches, and after the key is rotated in KV the old backup still restores."""
    import hvac

    from luxima_backup.keys import new_master_key

    monkeypatch.setenv("LUXIMA_TEST_VAULT_TOKEN", vault["token"])
    admin = hvac.Client(url=vault["url"], token=vault["token"])
    path = f"luxima-test/{os.urandom(4).hex()}/master"
    admin.secrets.kv.v2.create_or_update_secret(path=path, secret={"key": new_master_key()}, mount_point="secret")
    write_settings(database, bucket, kv_keys(vault, path))
    state = run_backup()
    assert state.is_completed(), state.message
    doc = json.loads(s3_get(s3_server, bucket, state.result()["manifest_key"]))
    assert (doc["dump"]["encryption"]["key_id"], doc["dump"]["encryption"]["key_version"]) == (f"secret/{path}#key", 1)
    assert doc["verification"]["data_entries_checked"] >= len(TABLES)  # read back, decrypted, listed
    before = digest(pg_cluster, database)

    admin.secrets.kv.v2.create_or_update_secret(path=path, secret={"key": new_master_key()}, mount_point="secret")
    restored = run_restore(target_database=f"{database}_kv")
    assert restored.is_completed(), restored.message
    assert digest(pg_cluster, f"{database}_kv") == before


def test_wrong_key_is_a_clear_error(backed_up: dict[str, Any], pg_cluster: PostgresCluster, database: str,
                                    bucket: str, write_settings: Any, tmp_path: Path) -> None:
    from luxima_backup.keys import new_master_key

    other = tmp_path / "other.key"
    other.write_text(new_master_key())
    write_settings(database, bucket, file_keys(other))
    state = run_restore(target_database=f"{database}_wk")
    assert state.is_failed()
    # found at the catalog: its manifests are signed under the backup's key
    assert "signed with key file" in state.message and "old_key_files" in state.message
    assert databases(pg_cluster, database) == [database]


def test_a_count_mismatch_fails_and_names_the_table(
    backed_up: dict[str, Any], pg_cluster: PostgresCluster, s3_server: Any, bucket: str, database: str,
    prefect_server: Any,
) -> None:
    doc = backed_up["manifest"]
    doc["row_counts"]["public.events"] += 1  # the backup claims a row the restore will not have
    key = backed_up["summary"]["manifest_key"]
    put_object(s3_server, bucket, key, signed_manifest(key, doc))
    state = run_restore(target_database=f"{database}_mm")
    assert state.is_failed() and "rows in public.events" in state.message
    run_id = str(state.state_details.flow_run_id)
    artifacts = httpx.post(f"{prefect_server.api_url}/artifacts/filter",
                           json={"artifacts": {"flow_run_id": {"any_": [run_id]}}, "limit": 10, "offset": 0}).json()
    table = next(a for a in artifacts if a["type"] == "table")
    rows = json.loads(table["data"]) if isinstance(table["data"], str) else table["data"]
    bad = [r for r in rows if not r["ok"]]
    assert [r["check"] for r in bad] == ["rows in public.events"]
    assert bad[0]["expected"] == "2001" and bad[0]["actual"] == "2000"


def test_latest_skips_unverified_and_honours_as_of(
    backed_up: dict[str, Any], s3_server: Any, bucket: str, database: str,
) -> None:
    settings = load_settings()
    store = store_from_settings(settings.storage)
    first = backed_up["manifest"]
    # A newer backup whose manifest is not 'verified' (e.g. verification failed half-way).
    newer = json.loads(json.dumps(first))
    newer.update(backup_id=first["backup_id"] + "-newer", status="unverified",
                 completed_at=(datetime.now(timezone.utc) + timedelta(minutes=5)).isoformat())
    key = backed_up["summary"]["manifest_key"].replace(".manifest.json", "9.manifest.json")
    put_object(s3_server, bucket, key, signed_manifest(key, newer))
    cat = catalog.Catalog(store, "backups", runtime.key_provider(settings))
    assert cat.resolve("db", "latest", source="main").backup_id == first["backup_id"]
    assert cat.resolve("db", first["backup_id"]).manifest_key == backed_up["summary"]["manifest_key"]
    assert cat.resolve("db", first["dump"]["key"]).backup_id == first["backup_id"]
    before = datetime.fromisoformat(first["completed_at"]) - timedelta(seconds=1)
    with pytest.raises(ConfigError, match="no verified db backup"):
        cat.resolve("db", "latest", source="main", as_of=before)
    with pytest.raises(ConfigError, match="no db backup with id"):
        cat.resolve("db", "db-nothing-20200101T000000Z")


def test_restore_from_manifests_alone_when_the_source_and_its_log_are_gone(
    backed_up: dict[str, Any], pg_cluster: PostgresCluster, s3_server: Any, bucket: str, database: str,
) -> None:
    with pg_cluster.connect() as conn:
        conn.execute(f'DROP DATABASE "{database}" WITH (FORCE)')  # the database, and its backup log with it
    state = run_restore(target_database=f"{database}_dr")
    assert state.is_completed(), state.message
    assert digest(pg_cluster, f"{database}_dr") == backed_up["digest"]
    assert backed_up["summary"]["manifest_key"] in s3_keys(s3_server, bucket)


def test_application_login_and_queries_are_checked(
    prefect_server: Any, pg_cluster: PostgresCluster, database: str, bucket: str, key_file: Path,
    write_settings: Any, source: dict[str, int], monkeypatch: pytest.MonkeyPatch,
) -> None:
    import secrets as pysecrets

    from tests.simulators.supabase_auth import SupabaseAuthSimulator

    role, password = f"app_{database}", pysecrets.token_urlsafe(12)
    with pg_cluster.connect(database) as conn:  # the application's role and grants travel in the dump
        conn.execute(f"DROP ROLE IF EXISTS {role}")
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        conn.execute(f"GRANT USAGE ON SCHEMA app TO {role}; GRANT SELECT ON app.users TO {role}")
    monkeypatch.setenv("LUXIMA_TEST_APP_PASSWORD", password)
    monkeypatch.setenv("LUXIMA_TEST_AUTH_PASSWORD", "user-password-1")
    monkeypatch.setenv("LUXIMA_TEST_ANON_KEY", "anon-key-123")

    def settings(min_rows: int, auth_url: str) -> None:
        write_settings(database, bucket, file_keys(key_file), f"""
            [restore.app_check]
            user = "{role}"
            password = "env:LUXIMA_TEST_APP_PASSWORD"
            queries = [{{ sql = "SELECT id, email FROM app.users ORDER BY id", min_rows = {min_rows} }}]
            [restore.app_check.http_login]
            url = "{auth_url}"
            email = "ops@luxima.id"
            password = "env:LUXIMA_TEST_AUTH_PASSWORD"
            apikey = "env:LUXIMA_TEST_ANON_KEY"
        """)

    try:
        with SupabaseAuthSimulator("anon-key-123", {"ops@luxima.id": "user-password-1"}) as auth:
            settings(500, auth.url)
            assert run_backup(deep_verify=False).is_completed()
            state = run_restore(target_database=f"{database}_app")
            assert state.is_completed(), state.message
            assert auth.logins == ["ops@luxima.id"]

            settings(501, auth.url)  # the application needs more rows than the restore has
            state = run_restore(target_database=f"{database}_app2")
            assert state.is_failed() and "query: SELECT id, email FROM app.users" in state.message
            assert password not in state.message

            auth.users["ops@luxima.id"] = "changed"  # the app's users cannot log in any more
            settings(1, auth.url)
            state = run_restore(target_database=f"{database}_app3")
            assert state.is_failed() and "HTTP login ops@luxima.id" in state.message
    finally:
        with pg_cluster.connect() as conn:
            for db in databases(pg_cluster, database):
                conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            conn.execute(f"DROP ROLE IF EXISTS {role}")


def test_missing_roles_need_the_globals(
    prefect_server: Any, pg_cluster: PostgresCluster, database: str, bucket: str, key_file: Path,
    write_settings: Any, source: dict[str, int],
) -> None:
    role = f"reader_{database}"
    with pg_cluster.connect(database) as conn:
        conn.execute(f"CREATE ROLE {role} NOLOGIN")
        conn.execute(f"GRANT USAGE ON SCHEMA app TO {role}; GRANT SELECT ON app.users TO {role}")
    write_settings(database, bucket, file_keys(key_file))
    try:
        assert run_backup(deep_verify=False).is_completed()
        with pg_cluster.connect(database) as conn:  # the role is lost (a new server, or dropped)
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")
        state = run_restore(target_database=f"{database}_ng")
        assert state.is_failed() and f'role "{role}" does not exist' in state.message
        assert "restore_globals_first" in state.message
        assert databases(pg_cluster, database) == [database]  # the failed restore's database is dropped

        state = run_restore(target_database=f"{database}_g", restore_globals_first=True)
        assert state.is_completed(), state.message
        with pg_cluster.connect(f"{database}_g") as conn:
            assert conn.execute("SELECT has_table_privilege(%s, 'app.users', 'SELECT')", (role,)).fetchone()[0]
        state = run_restore(target_database=f"{database}_no", no_owner=True)
        assert state.is_completed(), state.message
    finally:
        with pg_cluster.connect() as conn:
            for db in databases(pg_cluster, database):
                conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            conn.execute(f"DROP ROLE IF EXISTS {role}")
