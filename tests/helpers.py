"""Helpers shared by the flow tests: a source schema with distinctive contents, S3 and log readers."""

from __future__ import annotations

import time
from typing import Any

from devkit.sandbox import PostgresCluster

MARKER_TEXT = "LUXIMA-PLAINTEXT-MARKER-7f3a91"
MARKER_JSON = "luxima-json-marker-c41d"
MARKER_BYTES = b"LUXIMA-BYTEA-MARKER-\x00\x01\x02-9e2b"


def make_source(conn: Any) -> dict[str, int]:
    """Several tables: large rows, bytea, jsonb, a large object; distinctive contents to search for."""
    conn.execute("""
        CREATE SCHEMA app;
        CREATE TABLE app.users (id serial PRIMARY KEY, email text NOT NULL, profile jsonb NOT NULL);
        CREATE TABLE app.documents (id serial PRIMARY KEY, owner int REFERENCES app.users(id), body text, blob bytea, lo oid);
        CREATE TABLE public.events (id bigserial PRIMARY KEY, kind text, at timestamptz DEFAULT now());
    """)
    conn.execute(
        "INSERT INTO app.users (email, profile) SELECT 'user' || g || '@luxima.id',"
        " jsonb_build_object('n', g, 'tag', %s::text, 'tags', jsonb_build_array('a', 'b')) FROM generate_series(1, 500) g",
        (MARKER_JSON,),
    )
    lo = conn.execute("SELECT lo_from_bytea(0, %s)", (MARKER_BYTES * 1000,)).fetchone()[0]
    conn.execute(
        "INSERT INTO app.documents (owner, body, blob, lo) SELECT 1 + g %% 500, %s::text || repeat(md5(g::text), 20000), %s::bytea, %s::oid"
        " FROM generate_series(1, 30) g",  # ~640 KB of text per row: TOASTed large rows
        (MARKER_TEXT, MARKER_BYTES, lo),
    )
    conn.execute("INSERT INTO public.events (kind) SELECT 'evt' || g FROM generate_series(1, 2000) g")
    return {"app.documents": 30, "app.users": 500, "public.events": 2000}


def s3_keys(s3_server: Any, bucket: str) -> list[str]:
    resp = s3_server.client().list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in resp.get("Contents", []))


def s3_get(s3_server: Any, bucket: str, key: str) -> bytes:
    return s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read()


def log_rows(cluster: PostgresCluster, dbname: str) -> list[dict[str, Any]]:
    with cluster.connect(dbname) as conn:
        cur = conn.execute("SELECT * FROM internal.backup_logs ORDER BY id")
        names = [d.name for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]


def run_backup(**params: Any) -> Any:
    from flows.db_backup import db_backup

    return db_backup(**params, return_state=True)


def subflow_runs(parent_state: Any) -> list[Any]:
    """The db-backup-stream attempts of a flow run, from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["db-backup-stream"])),
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_state.state_details.flow_run_id])),
            sort=FlowRunSort.START_TIME_ASC, limit=50,
        )


def error_of(state: Any) -> BaseException:
    """The exception a failed flow run ended with."""
    assert state.is_failed(), state
    exc = state.result(raise_on_failure=False)
    assert isinstance(exc, BaseException)
    return exc


def persisted_task_results(api_url: str, flow_run_ids: list[str]) -> dict[str, Any]:
    """Task runs of these flow runs whose final state points at a stored result (name -> the reference)."""
    import httpx

    runs = httpx.post(f"{api_url}/task_runs/filter", json={
        "flow_runs": {"id": {"any_": flow_run_ids}}, "limit": 200, "offset": 0, "sort": "EXPECTED_START_TIME_DESC"}).json()
    assert runs, "no task runs were read"
    return {r["name"]: r["state"]["data"] for r in runs if r["state"] and r["state"].get("data") is not None}


def backup_while_locked(pg_cluster: PostgresCluster, database: str) -> tuple[Any, float]:
    """A backup run while another session holds app.users in ACCESS EXCLUSIVE; its state and how long it took."""
    with pg_cluster.connect(database) as holder:
        holder.execute("BEGIN")
        holder.execute("LOCK TABLE app.users IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        state = run_backup()
        elapsed = time.monotonic() - started
        holder.execute("ROLLBACK")
    return state, elapsed


def cli_env(prefect_server: Any, config: Any) -> dict[str, str]:
    """The environment of a `luxima-backup` command (or worker) run by the tests against their Prefect server."""
    import os

    from tests.conftest import DB_PASSWORD

    return {**os.environ, "PREFECT_API_URL": prefect_server.api_url, "LUXIMA_BACKUP_CONFIG": str(config),
            "LUXIMA_TEST_DB_PASSWORD": DB_PASSWORD}


def background(cmd: list[str], env: dict[str, str], log: Any) -> Any:
    """A long-running command (worker, serve) in its own process group, its output in ``log``."""
    import subprocess

    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def signed_manifest(key: str, doc: Any) -> bytes:
    """A manifest (a dict or a model) as the backup flows write it, signed by the configured key provider: what a test
    that needs a changed manifest stores, so that only the change it makes is tested (not the MAC)."""
    import json

    from luxima_backup import manifest, runtime

    typed = manifest.parse(json.dumps(doc).encode()) if isinstance(doc, dict) else doc
    return runtime.catalog(typed.component).signed(key, typed)


def save_manifest(store: Any, key: str, doc: Any) -> None:
    """Write a signed manifest into ``store`` (a test store holding backups of the configured prefix)."""
    from luxima_backup import runtime

    settings = runtime.settings()
    runtime.catalog_at(store, runtime.location(doc.component, settings)[1], settings).save(key, doc)



def host_toml(name: str, sshd: Any, known: Any) -> str:
    """An [hosts.NAME] reaching the test sshd (every "host" here is this machine)."""
    import textwrap

    return textwrap.dedent(f"""
        [hosts.{name}]
        host = "127.0.0.1"
        port = {sshd.port}
        user = "{sshd.user}"
        key = "file:{sshd.client_key}"
        known_hosts = "{known}"
        connect_timeout = 5
        """)
