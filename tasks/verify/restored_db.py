"""Verify a restored database: every table counted at backup time has its rows, and the application can log in and query."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from psycopg import sql as psql

from luxima_backup import pg, runtime
from luxima_backup.errors import DatabaseError
from luxima_backup.secrets import redact
from luxima_backup.settings import AppCheck, HttpLogin, PostgresConnection
from tasks.verify.readback import check_row


def check_row_counts(cfg: PostgresConnection, expected: dict[str, int],
                     names: dict[str, tuple[str, str]] | None = None) -> list[dict[str, Any]]:
    """``count(*)`` of every table counted at backup time, against the manifest's count.

    ``names`` gives each key's (schema, table) where the manifest recorded them: a key such as "a.b.c" cannot
    say where the schema ends (older manifests: split at the first dot).
    """
    rows = []
    with pg.connect(cfg) as conn:
        for key, want in sorted(expected.items()):
            schema, table = (names or {}).get(key) or key.split(".", 1)
            with pg.translate_errors(f"counting rows of {key}"):
                exists = conn.execute("SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                                      " WHERE n.nspname = %s AND c.relname = %s", (schema, table)).fetchone()
                got: Any = "table missing"
                if exists:
                    got = int(conn.execute(psql.SQL("SELECT count(*) FROM {}").format(pg.qualified(schema, table))).fetchone()[0])  # type: ignore[index]
            rows.append(check_row(f"rows in {key}", want, got))
    return rows


def check_app(cfg: PostgresConnection, app: AppCheck) -> list[dict[str, Any]]:
    """Log in as the application would and run its queries; each must succeed and return rows."""
    rows: list[dict[str, Any]] = []
    if app.user is not None:
        login = cfg.model_copy(update={"user": app.user, "password": app.password})
        try:
            conn = pg.connect(login)
        except DatabaseError as exc:
            return [check_row(f"login as {app.user}", "connected", f"refused: {exc.message}")]
        with conn:
            rows.append(check_row(f"login as {app.user}", "connected", "connected"))
            conn.read_only = True  # the check never changes the restored data
            for q in app.queries:
                label = f"query: {q.sql[:60]}"
                try:
                    with conn.transaction(), conn.cursor() as cur:
                        cur.execute(q.sql)  # type: ignore[arg-type]  # operator-configured query
                        got: Any = len(cur.fetchmany(max(q.min_rows, 1)))
                except Exception as exc:  # any failure of the app's query is a failed check, with its reason
                    got = f"error: {redact(str(exc).splitlines()[0])}"
                ok = isinstance(got, int) and got >= q.min_rows
                rows.append({"check": label, "expected": f">= {q.min_rows} rows", "actual": str(got), "ok": ok})
    if app.http_login is not None:
        rows.append(_http_login(app.http_login))
    return rows


def _http_login(h: HttpLogin) -> dict[str, Any]:
    import httpx

    headers = {"apikey": h.apikey.resolve()} if h.apikey else {}
    label = f"HTTP login {h.email} at {h.url}"
    try:
        resp = httpx.post(f"{h.url.rstrip('/')}/auth/v1/token", params={"grant_type": "password"}, headers=headers,
                          json={"email": h.email, "password": h.password.resolve()}, timeout=h.timeout)
        token = resp.json().get("access_token") if resp.headers.get("content-type", "").startswith("application/json") else None
        actual = f"HTTP {resp.status_code}" + (" with a token" if token else "")
    except httpx.HTTPError as exc:
        actual = f"error: {type(exc).__name__}"
    return check_row(label, "HTTP 200 with a token", actual)


@task(name="verify-restored-db", cache_policy=NO_CACHE, persist_result=False, **runtime.TRANSIENT_RETRIES)
def verify_restored_db(target: str, dbname: str, expected_counts: dict[str, int],
                   names: dict[str, tuple[str, str]] | None = None) -> list[dict[str, Any]]:
    """Check the restored database: row counts against the manifest, then the application's login and queries."""
    settings = runtime.settings()
    cfg = settings.database(target).model_copy(update={"dbname": dbname})
    rows = check_row_counts(cfg, expected_counts, names)
    rows += check_app(cfg, settings.restore.app_check)
    bad = [r["check"] for r in rows if not r["ok"]]
    get_run_logger().log(40 if bad else 20, "restore checks: %d passed, %d failed%s",
                         len(rows) - len(bad), len(bad), f" ({', '.join(bad)})" if bad else "")
    return rows
