"""What operators of real databases depend on, end to end against real servers (no mocks).

Every table shape round-trips through a deep-verified backup and a restore; two [databases.*] sections whose
databases share a name stay apart (also in the old db/<dbname>/ layout); a table held in ACCESS EXCLUSIVE fails
the backup quickly, naming the session; pg_dump sees no secret of ours in its environment; a manifest whose
write landed though the client saw an error is removed with the data; a work dir others could tamper with is
refused.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

from luxima_backup import catalog, runtime
from luxima_backup import pg as pgmod
from luxima_backup import settings as settings_mod
from luxima_backup.errors import ConfigError, DatabaseError
from devkit.sandbox import PostgresCluster
from luxima_backup.settings import load_settings
from luxima_backup.storage import store_from_settings
from luxima_backup.workdir import private_dir
from tests.conftest import DB_PASSWORD, file_keys
from tests.fault_proxy import FaultProxy
from tests.helpers import error_of, log_rows, run_backup, s3_get, s3_keys, signed_manifest
from tests.pg_shapes import (
    LEAF_PARTITIONS, ODD_SCHEMA, ODD_TABLE, PARTITIONED_PARENTS, UBER_TABLE, fingerprint, make_shapes,
)


# -- helpers --

def _toml(value: Any) -> str:
    """A TOML value: strings as basic strings (JSON escapes are valid TOML ones in the BMP), lists, numbers, bools."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


def db_section(cluster: PostgresCluster, dbname: str, **extra: Any) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": cluster.port, "dbname": dbname, "user": "postgres",
            "password": "env:LUXIMA_TEST_DB_PASSWORD", "sslmode": "disable", "schemas": ["public"], **extra}


def write_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, databases: dict[str, dict[str, Any]], bucket: str,
                 endpoint: str, key_file: Path, work_dir: Path | None = None, default: str | None = None,
                 storage: dict[str, Any] | None = None, db_backup: dict[str, Any] | None = None) -> Path:
    """A whole settings file (as conftest's write_settings, with our own [databases.*] and sections), made active."""
    monkeypatch.setenv("LUXIMA_TEST_DB_PASSWORD", DB_PASSWORD)
    lines = [f"work_dir = {_toml(work_dir or tmp_path / 'work')}", ""]
    for name, fields in databases.items():
        lines.append(f"[databases.{name}]")
        lines += [f"{k} = {_toml(v)}" for k, v in fields.items()]
        lines.append("")
    store = {"bucket": bucket, "endpoint_url": endpoint, "access_key_id": "env:LUXIMA_TEST_S3_ACCESS_KEY",
             "secret_access_key": "env:LUXIMA_TEST_S3_SECRET_KEY", "max_attempts": 2, "multipart_chunk_mib": 5,
             **(storage or {})}
    lines.append("[storage]")
    lines += [f"{k} = {_toml(v)}" for k, v in store.items()]
    backup = {"database": default or next(iter(databases)), "attempts": 2, "retry_delay_seconds": [0.5], **(db_backup or {})}
    lines += ["", "[db_backup]"] + [f"{k} = {_toml(v)}" for k, v in backup.items()]
    path = tmp_path / f"settings-{uuid.uuid4().hex[:6]}.toml"
    path.write_text("\n".join(lines) + "\n" + textwrap.dedent(file_keys(key_file)))
    monkeypatch.setenv(settings_mod.CONFIG_ENV, str(path))
    return path


def run_restore(**params: Any) -> Any:
    from flows.db_restore import db_restore

    return db_restore(**params, return_state=True)


def datnames(cluster: PostgresCluster, prefix: str) -> list[str]:
    with cluster.connect() as conn:
        return sorted(r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (prefix + "%",)))


def manifest_of(s3_server: Any, bucket: str, state: Any) -> dict[str, Any]:
    return json.loads(s3_get(s3_server, bucket, state.result()["manifest_key"]))


# -- 1. every table shape --

@pytest.mark.slow
def test_every_table_shape_round_trips_through_a_deep_verified_backup(
    prefect_server: Any, pg_cluster: PostgresCluster, s3_server: Any, database: str, bucket: str, key_file: Path,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pg_cluster.connect(database) as conn:
        make_shapes(conn)
        source = fingerprint(conn, exclude_schemas=["internal"])  # internal: the backup log, written by the runs
    write_config(tmp_path, monkeypatch, bucket=bucket, endpoint=s3_server.url, key_file=key_file,
                 databases={"main": db_section(pg_cluster, database, schemas=["public", "audit", ODD_SCHEMA])})

    state = run_backup()  # deep verify is the default
    assert state.is_completed(), state.message
    doc = manifest_of(s3_server, bucket, state)
    assert doc["verification"]["deep"] is True
    assert doc["verification"]["data_entries_checked"] >= len(LEAF_PARTITIONS)
    assert doc["large_objects"] == len(source["large_objects"]) == 2

    counts = doc["row_counts"]
    for schema, name in PARTITIONED_PARENTS:
        whole = source["relations"][f'"{schema}"."{name}"']["rows"]
        if (schema, name) == ("public", "events_2024"):  # a partition itself: counted within public.events
            assert f"{schema}.{name}" not in counts
        else:
            assert counts[f"{schema}.{name}"] == whole and whole > 0
            assert doc["tables"][f"{schema}.{name}"]["kind"] == "p"
    for schema, name in LEAF_PARTITIONS:
        assert f"{schema}.{name}" not in counts, f"leaf partition {schema}.{name} counted on its own"
    assert counts["public.events"] == 300 and counts["audit.log"] == 120
    assert counts[f"{ODD_SCHEMA}.{ODD_TABLE}"] == 25 and counts[f"{ODD_SCHEMA}.{UBER_TABLE}"] == 30
    assert doc["tables"][f"{ODD_SCHEMA}.{ODD_TABLE}"]["schema"] == ODD_SCHEMA
    assert "public.host_name" not in counts  # a foreign table has no rows in a dump

    # The rows load over two connections at once from the stream, each table cut into pieces at row ends: small
    # pieces here, so that every table of more than a few rows is loaded by both, awkward values included.
    from luxima_backup import pg_rows

    monkeypatch.setattr(pg_rows, "PIECE_SIZE", 2048)
    restored_db = f"{database}_rt"
    restored = run_restore(target_database=restored_db)
    assert restored.is_completed(), restored.message
    assert "rows (parallel)" in restored.result()["timings"]
    with pg_cluster.connect(restored_db) as conn:
        copy = fingerprint(conn, exclude_schemas=["internal"])
    assert copy == source  # rows and digest of every relation, large objects, sequences

    rows = [r for r in log_rows(pg_cluster, database) if r["kind"] == "restore"]
    assert [r["status"] for r in rows] == ["success"]
    checks = rows[0]["details"]["checks"]
    assert checks and all(c["ok"] for c in checks), [c for c in checks if not c["ok"]]
    assert {f"rows in {t}" for t in counts} <= {c["check"] for c in checks}
    assert restored.result()["checks_passed"] == len(checks)


# -- 2. two sections, one database name --

def _make_marked(cluster: PostgresCluster, dbname: str, marker: str) -> None:
    with cluster.connect() as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone():
            conn.execute(f'CREATE DATABASE "{dbname}"')
    with cluster.connect(dbname) as conn:
        conn.execute("CREATE TABLE public.whoami (env text NOT NULL)")
        conn.execute("INSERT INTO public.whoami VALUES (%s)", (marker,))


def _marker(cluster: PostgresCluster, dbname: str) -> list[str]:
    with cluster.connect(dbname) as conn:
        return [r[0] for r in conn.execute("SELECT env FROM public.whoami")]


@pytest.mark.slow
def test_two_sections_with_the_same_database_name_on_two_clusters_stay_apart(
    prefect_server: Any, pg_cluster: PostgresCluster, s3_server: Any, database: str, bucket: str, key_file: Path,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    staging_cluster = PostgresCluster(DB_PASSWORD).start()
    try:
        _make_marked(pg_cluster, database, "prod")
        _make_marked(staging_cluster, database, "staging")  # the same database name on the other cluster
        write_config(tmp_path, monkeypatch, bucket=bucket, endpoint=s3_server.url, key_file=key_file, default="prod",
                     databases={"prod": db_section(pg_cluster, database), "staging": db_section(staging_cluster, database)})
        prefix = load_settings().storage.prefix

        prod = run_backup(database="prod")
        assert prod.is_completed(), prod.message
        # The old layout, simulated below, filed both under one folder by the second they started: backups then took
        # seconds; now they can start within one, which that layout could not tell apart.
        time.sleep(1.1)
        staging = run_backup(database="staging")
        assert staging.is_completed(), staging.message
        prod_doc, staging_doc = manifest_of(s3_server, bucket, prod), manifest_of(s3_server, bucket, staging)
        for state, doc, name, cluster in ((prod, prod_doc, "prod", pg_cluster), (staging, staging_doc, "staging", staging_cluster)):
            summary = state.result()
            assert summary["backup_id"].startswith(f"db-{name}-")
            assert summary["object_key"].startswith(f"{prefix}/db/{name}/")
            assert summary["manifest_key"].startswith(f"{prefix}/db/{name}/")
            assert doc["source"]["name"] == name and doc["source"]["database"] == database
            assert doc["source"]["port"] == cluster.port
        assert prod_doc["source"]["system_identifier"] != staging_doc["source"]["system_identifier"]
        keys = [k for k in s3_keys(s3_server, bucket) if "/_catalog/" not in k]  # the catalog's index per target aside
        assert all(k.startswith((f"{prefix}/db/prod/", f"{prefix}/db/staging/")) for k in keys), keys

        # Latest of each section restores that section's data.
        ok = run_restore(source="prod", target="prod", target_database=f"{database}_rp")
        assert ok.is_completed(), ok.message
        assert ok.result()["backup_id"] == prod_doc["backup_id"]
        assert _marker(pg_cluster, f"{database}_rp") == ["prod"]
        ok = run_restore(source="staging", target="staging", target_database=f"{database}_rs")
        assert ok.is_completed(), ok.message
        assert ok.result()["backup_id"] == staging_doc["backup_id"]
        assert _marker(staging_cluster, f"{database}_rs") == ["staging"]

        # Staging's backup named as prod's is refused, by id and by key, in the catalogue and by the flow.
        settings = load_settings()
        cat = catalog.Catalog(store_from_settings(settings.storage), prefix, runtime.key_provider(settings))
        with pytest.raises(ConfigError, match="was taken of 'staging'"):
            cat.resolve("db", staging_doc["backup_id"], source="prod", also_under=[database])
        with pytest.raises(ConfigError, match="was taken of 'staging'"):
            cat.resolve("db", staging_doc["dump"]["key"], source="prod", also_under=[database])
        refused = run_restore(backup=staging_doc["backup_id"], source="prod", target="prod", target_database=f"{database}_x")
        assert refused.is_failed() and "was taken of" in refused.message
        assert f"{database}_x" not in datnames(pg_cluster, database)

        # The old layout: both sections' backups filed under db/<dbname>/, their manifests naming their section.
        client = s3_server.client()
        for name, doc in (("prod", prod_doc), ("staging", staging_doc)):
            new, old = f"{prefix}/db/{name}/", f"{prefix}/db/{database}/"
            moved = [k for k in keys if k.startswith(new)]
            assert len(moved) == 3  # dump, globals, manifest
            for key in moved:
                target = old + key[len(new):]
                assert target not in s3_keys(s3_server, bucket), "legacy keys of prod and staging collide"
                if key.endswith(".manifest.json"):
                    # an old backup's manifest pointed at its objects where they were: under db/<dbname>/
                    moved_doc = json.loads(s3_get(s3_server, bucket, key).decode().replace(new, old))
                    assert moved_doc["source"]["name"] == name
                    # written before headers named their backup and key (else the moved objects are refused, rightly),
                    # and adopted (signed) since, as `luxima-backup catalog sign` does
                    moved_doc["dump"]["bound"] = moved_doc["globals"]["bound"] = False
                    client.put_object(Bucket=bucket, Key=target, Body=signed_manifest(target, moved_doc))
                else:
                    client.copy_object(Bucket=bucket, Key=target, CopySource={"Bucket": bucket, "Key": key})
                client.delete_object(Bucket=bucket, Key=key)
        assert all(k.startswith(f"{prefix}/db/{database}/") for k in s3_keys(s3_server, bucket) if "/_catalog/" not in k)

        found = cat.resolve("db", "latest", source="prod", also_under=[database])
        assert found.backup_id == prod_doc["backup_id"]  # not staging's, though newer and in the same folder
        assert found.manifest_key.startswith(f"{prefix}/db/{database}/")
        assert cat.resolve("db", "latest", source="staging",
                           also_under=[database]).backup_id == staging_doc["backup_id"]
        with pytest.raises(ConfigError, match="was taken of 'staging'"):
            cat.resolve("db", staging_doc["backup_id"], source="prod", also_under=[database])

        legacy = run_restore(source="prod", target="prod", target_database=f"{database}_legacy")
        assert legacy.is_completed(), legacy.message
        assert legacy.result()["backup_id"] == prod_doc["backup_id"]
        assert legacy.result()["object_key"].startswith(f"{prefix}/db/{database}/")
        assert _marker(pg_cluster, f"{database}_legacy") == ["prod"]
    finally:
        staging_cluster.destroy()


# -- 3. a table held in ACCESS EXCLUSIVE --

@pytest.mark.slow
def test_a_table_held_in_access_exclusive_fails_the_backup_quickly_naming_the_session(
    prefect_server: Any, pg_cluster: PostgresCluster, s3_server: Any, database: str, bucket: str, key_file: Path,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pg_cluster.connect(database) as conn:
        conn.execute("CREATE TABLE public.orders (id int PRIMARY KEY, note text)")
        conn.execute("INSERT INTO public.orders SELECT g, 'order ' || g FROM generate_series(1, 100) g")
        conn.execute("CREATE TABLE public.customers (id int PRIMARY KEY)")
    write_config(tmp_path, monkeypatch, bucket=bucket, endpoint=s3_server.url, key_file=key_file,
                 databases={"main": db_section(pg_cluster, database)}, db_backup={"lock_wait_timeout_seconds": 2})

    locker = psycopg.connect(**pg_cluster.conninfo(database), application_name="schema-migration")  # not autocommit
    try:
        locker.execute("LOCK TABLE public.orders IN ACCESS EXCLUSIVE MODE")  # a migration, open transaction
        pid = locker.info.backend_pid
        started = time.monotonic()
        state = run_backup()
        elapsed = time.monotonic() - started
        assert state.is_failed(), state
        assert elapsed < 60, f"the backup waited {elapsed:.0f}s for the lock"
        exc = error_of(state)
        text = str(exc)
        assert isinstance(exc, DatabaseError), repr(exc)
        assert "stayed locked past db_backup.lock_wait_timeout_seconds" in text, text
        assert "orders" in text
        assert f"pid {pid} (AccessExclusiveLock, user postgres, application 'schema-migration'" in text, text
        assert "LOCK TABLE public.orders IN ACCESS EXCLUSIVE MODE" in text, text
        assert locker.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS  # the holder was left alone
    finally:
        locker.rollback()
        locker.close()

    assert s3_keys(s3_server, bucket) == []
    assert s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    rows = log_rows(pg_cluster, database)
    assert [r["status"] for r in rows] == ["failed"]
    assert "stayed locked" in rows[0]["error"] and f"pid {pid}" in rows[0]["error"]


# -- 4. the environment the PostgreSQL tools see --

_WRAPPER = """#!/bin/sh
out="{capture}/{name}.$$"
printf '%s\\n' "$@" > "$out.args"
env -0 > "$out.env"
if [ -n "${{PGPASSWORD+set}}" ]; then echo set > "$out.pgpassword"; else echo unset > "$out.pgpassword"; fi
if [ -n "$PGPASSFILE" ] && [ -f "$PGPASSFILE" ]; then stat -c '%a %u' "$PGPASSFILE" > "$out.passfile"; fi
exec {real}/{name} "$@"
"""

_ALLOWED_ENV = {"PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TZ", "TMPDIR",
                "PWD", "OLDPWD", "SHLVL", "_"}


@pytest.mark.slow
def test_postgres_tools_get_a_minimal_environment_and_a_private_password_file(
    prefect_server: Any, pg_cluster: PostgresCluster, s3_server: Any, database: str, bucket: str, key_file: Path,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pg_cluster.connect(database) as conn:
        conn.execute("CREATE TABLE public.items AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 500) g")
    real = Path(pgmod.find_tool("pg_dump", 15).path).parent
    bin_dir, capture = tmp_path / "bin", tmp_path / "capture"
    bin_dir.mkdir()
    capture.mkdir()
    for name in ("pg_dump", "pg_dumpall", "pg_restore", "psql"):
        wrapper = bin_dir / name
        wrapper.write_text(_WRAPPER.format(capture=capture, name=name, real=real))
        wrapper.chmod(0o755)

    markers = {name: f"{name.lower()}-marker-{secrets.token_hex(8)}"
               for name in ("AWS_SECRET_ACCESS_KEY", "VAULT_TOKEN", "LUXIMA_TEST_VAULT_SECRET_ID", "PGPASSWORD")}
    for name, value in markers.items():
        monkeypatch.setenv(name, value)
    write_config(tmp_path, monkeypatch, bucket=bucket, endpoint=s3_server.url, key_file=key_file,
                 databases={"main": db_section(pg_cluster, database)}, db_backup={"pg_bin_dir": str(bin_dir)})

    state = run_backup()
    assert state.is_completed(), state.message
    doc = manifest_of(s3_server, bucket, state)
    assert doc["verification"]["deep"] is True and "key" in doc["globals"]

    runs: dict[str, list[dict[str, Any]]] = {}
    for args_file in sorted(capture.glob("*.args")):
        stem = str(args_file)[: -len(".args")]
        env = dict(item.split("=", 1) for item in Path(stem + ".env").read_bytes().decode().split("\0") if item)
        runs.setdefault(args_file.name.split(".")[0], []).append({
            "args": args_file.read_text().splitlines(), "env": env,
            "pgpassword": Path(stem + ".pgpassword").read_text().strip(),
            "passfile": Path(stem + ".passfile").read_text().split() if Path(stem + ".passfile").exists() else None,
        })
    dumps = [r for r in runs.get("pg_dump", []) if "--version" not in r["args"]]
    assert len(dumps) == 1, runs.keys()
    assert [r for r in runs.get("pg_dumpall", []) if "--version" not in r["args"]], "pg_dumpall was not taken from pg_bin_dir"
    assert [r for r in runs.get("pg_restore", []) if "--list" in r["args"]], "pg_restore was not taken from pg_bin_dir"

    secret_values = [*markers.values(), DB_PASSWORD, s3_server.secret_key, s3_server.access_key]
    for tool, invocations in runs.items():
        for run in invocations:
            env = run["env"]
            assert run["pgpassword"] == "unset", f"{tool} got PGPASSWORD"
            extra = {k for k in env if k not in _ALLOWED_ENV and not k.startswith("PG")}
            assert not extra, f"{tool} got {sorted(extra)}"
            blob = "\n".join(f"{k}={v}" for k, v in env.items())
            for value in secret_values:
                assert value not in blob, f"{tool} got a secret in its environment"

    pg_dump = dumps[0]["env"]
    assert pg_dump["PGHOST"] == "127.0.0.1" and pg_dump["PGPORT"] == str(pg_cluster.port)
    assert pg_dump["PGDATABASE"] == database and pg_dump["PGUSER"] == "postgres"
    passfile = pg_dump["PGPASSFILE"]
    assert passfile != os.devnull and dumps[0]["passfile"] == ["600", str(os.geteuid())]
    assert not Path(passfile).exists(), "the password file outlived pg_dump"
    for run in runs["pg_dumpall"]:
        if "--version" not in run["args"]:
            assert run["env"]["PGPASSFILE"] != passfile and not Path(run["env"]["PGPASSFILE"]).exists()


# -- 5. the manifest of a failed run --

@pytest.mark.slow
def test_a_manifest_that_landed_though_its_write_failed_is_removed_before_the_data(
    prefect_server: Any, pg_cluster: PostgresCluster, s3_server: Any, database: str, bucket: str, key_file: Path,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pg_cluster.connect(database) as conn:
        conn.execute("CREATE TABLE public.items AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 500) g")
    proxy = FaultProxy(s3_server.url).start()
    proxy.fail("PUT", ".manifest.json", 500, "InternalError", after_upstream=True)  # the write lands, the client sees 500
    try:
        write_config(tmp_path, monkeypatch, bucket=bucket, endpoint=proxy.url, key_file=key_file,
                     databases={"main": db_section(pg_cluster, database)}, storage={"max_attempts": 1})
        state = run_backup()
        assert state.is_failed(), state
        assert "manifest" in state.message or "500" in state.message or "InternalError" in state.message, state.message
    finally:
        proxy.stop()

    seen = proxy.seen
    manifest_puts = [s for s in seen if s[0] == "PUT" and urlsplit(s[1]).path.endswith(".manifest.json")]
    assert manifest_puts and all(up == 200 and answered == 500 for _, _, up, answered in manifest_puts)
    assert len(manifest_puts) == 1  # max_attempts = 1, and the manifest task does not retry what botocore gave up on
    manifest_key = urlsplit(manifest_puts[0][1]).path.split(f"/{bucket}/", 1)[1]
    client = s3_server.client()
    versions = client.list_object_versions(Bucket=bucket, Prefix=manifest_key)
    assert versions.get("Versions"), "the manifest write never landed: the fault did not happen"
    assert s3_keys(s3_server, bucket) == [], "a failed run left objects behind"
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []

    deletes = [(i, urlsplit(s[1]).path) for i, s in enumerate(seen) if s[0] == "DELETE" and "uploadId=" not in s[1]]
    order = [path.rsplit("/", 1)[1] for _, path in deletes]
    assert order and order[0].endswith(".manifest.json"), order  # the manifest goes first
    assert any(".dump." in name for name in order[1:]), order
    assert [r["status"] for r in log_rows(pg_cluster, database)] == ["failed"]


# -- 6. a work dir others could tamper with --

def _hostile_dirs(tmp_path: Path) -> list[tuple[str, Path, Path, str]]:
    """(case, work_dir setting, folder to watch, expected message) for each way a work dir can be unsafe."""
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, 65534, 65534)
    return [("symlink", link, real, "is a symbolic link"),
            ("world-writable", shared, shared, "is writable by group or others"),
            ("other owner", foreign, foreign, "belongs to uid 65534")]


def test_private_dir_refuses_a_symlink_a_shared_folder_and_one_of_another_user(tmp_path: Path) -> None:
    for case, work_dir, watched, message in _hostile_dirs(tmp_path):
        mode = stat.S_IMODE(os.lstat(watched).st_mode)
        with pytest.raises(ConfigError, match=message):
            private_dir(work_dir, "restore-")
        assert list(watched.iterdir()) == [], f"{case}: something was created in {watched}"
        assert stat.S_IMODE(os.lstat(watched).st_mode) == mode, f"{case}: the folder's mode was changed"
    # a private one is accepted, and what it makes is private
    ok = tmp_path / "private"
    made = private_dir(ok, "restore-")
    assert made.parent == ok and stat.S_IMODE(ok.stat().st_mode) == 0o700 and stat.S_IMODE(made.stat().st_mode) == 0o700


@pytest.mark.slow
def test_db_restore_refuses_a_hostile_work_dir_before_touching_anything(
    prefect_server: Any, pg_cluster: PostgresCluster, s3_server: Any, database: str, bucket: str, key_file: Path,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pg_cluster.connect(database) as conn:
        conn.execute("CREATE TABLE public.items AS SELECT g AS id FROM generate_series(1, 50) g")
    databases = {"main": db_section(pg_cluster, database)}
    write_config(tmp_path, monkeypatch, bucket=bucket, endpoint=s3_server.url, key_file=key_file, databases=databases)
    backed_up = run_backup(deep_verify=False)
    assert backed_up.is_completed(), backed_up.message

    for case, work_dir, watched, message in _hostile_dirs(tmp_path):
        write_config(tmp_path, monkeypatch, bucket=bucket, endpoint=s3_server.url, key_file=key_file,
                     databases=databases, work_dir=work_dir)
        state = run_restore(target_database=f"{database}_wd")
        assert state.is_failed(), f"{case}: {state}"
        exc = error_of(state)
        assert isinstance(exc, ConfigError), f"{case}: {exc!r}"
        assert message in str(exc) and str(work_dir) in str(exc), f"{case}: {exc}"
        assert list(watched.iterdir()) == [], f"{case}: the restore wrote into {watched}"
        assert f"{database}_wd" not in datnames(pg_cluster, database), f"{case}: a database was created"
