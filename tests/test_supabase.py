"""A Supabase-shaped database (managed schemas and their owners, event triggers, RLS, a partitioned
realtime.messages, app.settings in the database) backed up with the supabase preset and restored into
a fresh cluster prepared as Supabase's is (its roles created first), with pg_restore --exit-on-error."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any, Iterator

import pytest

from luxima_backup import settings as settings_mod
from devkit.sandbox import PostgresCluster
from tests.conftest import DB_PASSWORD, file_keys
from tests.helpers import run_backup, s3_get
from tests.pg_shapes import fingerprint
from tests.supabase_shape import JWT_SECRET, create_supabase_roles, make_supabase_db

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fresh_cluster() -> Iterator[PostgresCluster]:
    """A second cluster, as a new Supabase host would be: nothing but its roles."""
    cluster = PostgresCluster(DB_PASSWORD).start()
    with cluster.connect() as conn:
        create_supabase_roles(conn)
    yield cluster
    cluster.destroy()


def _counts(conn: Any) -> dict[str, int]:
    return {
        "event triggers": conn.execute("SELECT count(*) FROM pg_event_trigger").fetchone()[0],
        "policies": conn.execute("SELECT count(*) FROM pg_policies").fetchone()[0],
        "rls tables": conn.execute("SELECT count(*) FROM pg_class WHERE relrowsecurity").fetchone()[0],
        "publications": conn.execute("SELECT count(*) FROM pg_publication").fetchone()[0],
    }


def test_supabase_database_restores_into_a_fresh_cluster_with_its_owners_policies_and_settings(
    prefect_server: Any, pg_cluster: PostgresCluster, fresh_cluster: PostgresCluster, s3_server: Any, database: str,
    bucket: str, key_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pg_cluster.connect() as conn:
        create_supabase_roles(conn)
    with pg_cluster.connect(database) as conn:
        make_supabase_db(conn, database)
        before = fingerprint(conn)
        shape = _counts(conn)
    assert shape["event triggers"] > 0 and shape["policies"] > 0

    monkeypatch.setenv("LUXIMA_TEST_DB_PASSWORD", DB_PASSWORD)
    path = tmp_path / "settings.toml"
    path.write_text(textwrap.dedent(f"""
        work_dir = "{tmp_path / 'work'}"
        [databases.main]
        preset = "supabase"
        host = "127.0.0.1"
        port = {pg_cluster.port}
        dbname = "{database}"
        user = "postgres"
        password = "env:LUXIMA_TEST_DB_PASSWORD"
        sslmode = "disable"
        [databases.fresh]
        host = "127.0.0.1"
        port = {fresh_cluster.port}
        dbname = "postgres"
        user = "postgres"
        password = "env:LUXIMA_TEST_DB_PASSWORD"
        sslmode = "disable"
        [storage]
        bucket = "{bucket}"
        endpoint_url = "{s3_server.url}"
        access_key_id = "env:LUXIMA_TEST_S3_ACCESS_KEY"
        secret_access_key = "env:LUXIMA_TEST_S3_SECRET_KEY"
        [log]
        enabled = false
    """) + textwrap.dedent(file_keys(key_file)))
    monkeypatch.setenv(settings_mod.CONFIG_ENV, str(path))

    state = run_backup()
    assert state.is_completed(), state.message  # deep verify: realtime.messages by its partitions
    manifest = json.loads(s3_get(s3_server, bucket, state.result()["manifest_key"]))
    assert {"auth.users", "storage.objects", "public.profiles"} <= set(manifest["row_counts"])
    assert manifest["row_counts"]["auth.users"] == before["relations"]['"auth"."users"']["rows"] > 0
    assert manifest["source"]["system_identifier"]

    from flows.db_restore import db_restore

    restored = db_restore(source="main", target="fresh", target_database="restored", return_state=True)
    assert restored.is_completed(), restored.message  # pg_restore --exit-on-error: not one error
    with fresh_cluster.connect("restored") as conn:
        assert fingerprint(conn) == before
        assert _counts(conn) == shape
        owners = dict(conn.execute("SELECT nspname, pg_get_userbyid(nspowner) FROM pg_namespace"
                                   " WHERE nspname IN ('auth', 'storage', 'realtime', 'extensions')").fetchall())
        assert conn.execute("SHOW app.settings.jwt_secret").fetchone()[0] == JWT_SECRET  # ALTER DATABASE ... SET
    with pg_cluster.connect(database) as conn:
        assert owners == dict(conn.execute("SELECT nspname, pg_get_userbyid(nspowner) FROM pg_namespace"
                                           " WHERE nspname IN ('auth', 'storage', 'realtime', 'extensions')").fetchall())
