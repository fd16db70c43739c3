"""Verify stage: read the stored object back and prove it is the backup that was sent.

Always: the stored size and the sha256 of the bytes read back equal what was uploaded.
Deep (default): the same read also decrypts (so the wrapped key still unwraps and every chunk
authenticates), decompresses (the sha256 of the dump equals the one taken while dumping) and
feeds the dump to ``pg_restore --list``, which must parse its table of contents and list the
data of every counted table.
"""

from __future__ import annotations

import re
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from psycopg import sql as psql

from luxima_backup import pg, runtime
from luxima_backup.envelope import DecryptingReader
from luxima_backup.errors import DatabaseError, IntegrityError, ObjectNotFound, ToolError, VerificationError
from luxima_backup.keys import KeyProvider
from luxima_backup.pipes import Meter, MeteredReader, drain
from luxima_backup.secrets import redact
from luxima_backup.settings import AppCheck, HttpLogin, PostgresConnection
from luxima_backup.storage import ObjectStore
from luxima_backup.compression import DecompressingReader


def read_back(store: ObjectStore, key: str, expected_size: int, expected_sha256: str) -> dict[str, Any]:
    """Size and sha256 of the stored object against what was sent."""
    info = store.stat(key)
    if info.size != expected_size:
        raise VerificationError(f"{key}: stored size {info.size} != {expected_size} bytes uploaded")
    meter = Meter()
    with store.load(key) as body:
        drain(MeteredReader(body, meter))
    _compare(key, "sha256 of the stored object", meter.hexdigest, expected_sha256)
    return {"size": info.size, "sha256": meter.hexdigest}


def deep_check(store: ObjectStore, key: str, provider: KeyProvider, codec: str, expected: dict[str, Any],
               pg_restore: pg.Tool | None, tables: list[dict[str, Any]], large_objects: int = 0) -> dict[str, Any]:
    """One streaming pass: ciphertext sha256, decryption, decompression, dump sha256, TOC parse."""
    info = store.stat(key)
    if info.size != expected["encrypted_bytes"]:
        raise VerificationError(f"{key}: stored size {info.size} != {expected['encrypted_bytes']} bytes uploaded")
    sealed, plain = Meter(), Meter()
    with store.load(key) as body:
        dump = MeteredReader(DecompressingReader(DecryptingReader(MeteredReader(body, sealed), provider.unwrap), codec), plain)  # type: ignore[arg-type]
        toc = _restore_list(dump, pg_restore) if pg_restore else None
        drain(dump)  # pg_restore stops after the TOC; the rest must still hash and authenticate
    _compare(key, "sha256 of the stored object", sealed.hexdigest, expected["encrypted_sha256"])
    _compare(key, "sha256 of the dump", plain.hexdigest, expected["plain_sha256"])
    if plain.size != expected["plain_bytes"]:
        raise VerificationError(f"{key}: dump is {plain.size} bytes after decryption, {expected['plain_bytes']} were dumped")
    result: dict[str, Any] = {"size": info.size, "sha256": sealed.hexdigest, "dump_sha256": plain.hexdigest, "deep": True}
    if toc is not None:
        result.update(check_data_entries(key, toc, tables, large_objects))
    return result


def check_data_entries(key: str, toc: dict[str, Any], tables: list[dict[str, Any]], large_objects: int) -> dict[str, Any]:
    """Every counted table's rows have their data entries in the dump, matched by table oid (names can hold
    anything): a table its own, a partitioned table its leaf partitions'; foreign tables have none to check."""
    missing = []
    for t in tables:
        absent = [oid for oid in t["data_oids"] if oid not in toc["table_data"]]
        if absent:
            name = f"{t['schema']}.{t['name']}"
            missing.append(name if t["kind"] != "p" else f"{name} ({len(absent)} of its {len(t['data_oids'])} partitions)")
    if missing:
        raise VerificationError(f"{key}: the dump has no data entry for {', '.join(missing)}")
    if large_objects and not toc["blobs"]:
        raise VerificationError(f"{key}: the database had {large_objects} large objects and the dump has no entry for them")
    return {"toc_entries": toc["entries"], "data_entries_checked": sum(len(t["data_oids"]) for t in tables)}


def _restore_list(dump: Any, tool: pg.Tool) -> dict[str, Any]:
    """Feed the dump to ``pg_restore --list`` and parse its table of contents."""
    try:
        listing = pg.pg_restore_output(tool, ["--list"], dump).decode(errors="replace")
    except ToolError as exc:
        raise VerificationError(exc.message) from None
    out: dict[str, Any] = {"entries": 0, "table_data": set(), "blobs": False}
    for text in listing.splitlines():
        if text.startswith(";") or not text.strip():
            continue
        out["entries"] += 1
        m = _TOC_LINE.match(text)  # "1234; 0 16385 TABLE DATA public users postgres": the table's oid, then names
        if m and m.group(2) == "TABLE DATA":
            out["table_data"].add(int(m.group(1)))
        elif m and m.group(2) in ("BLOBS", "BLOB DATA", "LARGE OBJECTS"):
            out["blobs"] = True
    return out


_TOC_LINE = re.compile(r"^\s*\d+;\s+\d+\s+(\d+)\s+(TABLE DATA|BLOBS|BLOB DATA|LARGE OBJECTS)\b")


def _compare(key: str, what: str, actual: str, expected: str) -> None:
    if actual != expected:
        raise VerificationError(f"{key}: {what} is {actual}, expected {expected}")


@task(name="verify", cache_policy=NO_CACHE, persist_result=False, **runtime.TRANSIENT_RETRIES)
def verify(object_key: str, codec: str, expected: dict[str, Any], deep: bool, server_major: int,
           tables: list[dict[str, Any]], large_objects: int = 0) -> dict[str, Any]:
    """Read the uploaded backup back and check it against what was sent."""
    settings = runtime.settings()
    store = runtime.store(settings)
    if not deep:
        result = read_back(store, object_key, expected["encrypted_bytes"], expected["encrypted_sha256"])
    else:
        tool = pg.find_tool("pg_restore", server_major, settings.db_backup.pg_bin_dir)
        result = deep_check(store, object_key, runtime.key_provider(settings), codec, expected, tool, tables, large_objects)
    get_run_logger().info("verified %s (%s)", object_key, "deep" if deep else "size and sha256")
    return result


def read_small(store: ObjectStore, key: str, provider: KeyProvider) -> bytes:
    """Download and decrypt a small object (such as the globals dump) completely."""
    with store.load(key) as body:
        return DecryptingReader(body, provider.unwrap).read()  # type: ignore[arg-type]



# -- after a restore --

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


def check_row(check: str, expected: Any, actual: Any) -> dict[str, Any]:
    return {"check": check, "expected": str(expected), "actual": str(actual), "ok": expected == actual}


@task(name="verify", cache_policy=NO_CACHE, persist_result=False, **runtime.TRANSIENT_RETRIES)
def verify_restore(target: str, dbname: str, expected_counts: dict[str, int],
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


# -- file archives --

def check_archive(store: ObjectStore, key: str, provider: KeyProvider, codec: str, expected: dict[str, Any],
                  stored: Any, backup_id: str) -> dict[str, Any]:
    """One streaming pass over a stored file archive: ciphertext sha256, every chunk authenticated, the tar
    parsed, and each file this backup stored compared with its index entry (size, md5, sha256)."""
    from luxima_backup.filetree import FILE, content_mismatch, copy_member, members_for, open_tar_reader

    info = store.stat(key)
    if info.size != expected["encrypted_bytes"]:
        raise VerificationError(f"{key}: stored size {info.size} != {expected['encrypted_bytes']} bytes uploaded")
    sealed, plain = Meter(), Meter()
    files = 0
    with store.load(key) as body:
        tar_stream = MeteredReader(DecompressingReader(DecryptingReader(MeteredReader(body, sealed), provider.unwrap), codec), plain)  # type: ignore[arg-type]
        tar = open_tar_reader(tar_stream)
        wanted = (e for e in stored if e.type == FILE and e.archive == backup_id)
        for member, entry in members_for(tar, wanted, "/nonexistent-verify-root"):
            why = content_mismatch(entry, copy_member(tar, member, None))
            if why:
                raise VerificationError(f"{key}: {entry.name!r} in the archive: {why}")
            files += 1
        drain(tar_stream)  # the end of the archive must authenticate too
    _compare(key, "sha256 of the stored object", sealed.hexdigest, expected["encrypted_sha256"])
    _compare(key, "sha256 of the tar stream", plain.hexdigest, expected["plain_sha256"])
    return {"size": info.size, "sha256": sealed.hexdigest, "tar_sha256": plain.hexdigest, "files_checked": files,
            "deep": True}


@task(name="verify", cache_policy=NO_CACHE, persist_result=False, **runtime.TRANSIENT_RETRIES)
def verify_files(backup_id: str, archive: dict[str, Any], index: dict[str, Any], index_spool: str,
                 older_archives: dict[str, dict[str, Any]], deep: bool) -> dict[str, Any]:
    """Read the stored archive and index back and check them; the older archives this backup relies on must still be there."""
    from tasks.archive import load_index

    settings = runtime.settings()
    store = runtime.store(settings)
    provider = runtime.key_provider(settings)
    read_back(store, index["key"], index["size_encrypted"], index["sha256_encrypted"])
    for older_id, older in older_archives.items():
        try:
            got = store.stat(older["key"]).size
        except ObjectNotFound:
            raise VerificationError(
                f"{older['key']} (the archive of {older_id}, which this incremental backup still needs) is missing "
                "from storage: the chain is broken",
                hint="run a full backup (full = true); a restore of this backup would lack the files only that archive holds",
            ) from None
        if got != older["size_encrypted"]:
            raise VerificationError(f"{older['key']} (archive of {older_id}, still needed) is {got} bytes, expected {older['size_encrypted']}")
    expected = {"encrypted_bytes": archive["size_encrypted"], "encrypted_sha256": archive["sha256_encrypted"],
                "plain_sha256": archive["sha256_plain"]}
    if deep:
        entries = load_index(index_spool, index["compression"]["codec"], provider.unwrap)
        result = check_archive(store, archive["key"], provider, archive["compression"]["codec"], expected, entries, backup_id)
    else:
        result = read_back(store, archive["key"], expected["encrypted_bytes"], expected["encrypted_sha256"])
    result["older_archives_present"] = len(older_archives)
    get_run_logger().info("verified %s (%s)", archive["key"], "deep" if deep else "size and sha256")
    return result


# -- config archives --

def check_config_archive(store: ObjectStore, key: str, provider: KeyProvider, codec: str, expected: dict[str, Any]) -> dict[str, Any]:
    """Read a stored config archive back: ciphertext sha256, every chunk authenticated, every member against the
    archive's own index, and the index against what the fetch recorded (host, counts, content digest)."""
    from luxima_backup.config_archive import read_members

    info = store.stat(key)
    if info.size != expected["encrypted_bytes"]:
        raise VerificationError(f"{key}: stored size {info.size} != {expected['encrypted_bytes']} bytes uploaded")
    sealed, plain = Meter(), Meter()
    index: dict[str, Any] = {}
    files = 0
    with store.load(key) as body:
        tar_stream = MeteredReader(DecompressingReader(DecryptingReader(MeteredReader(body, sealed), provider.unwrap), codec), plain)  # type: ignore[arg-type]
        try:
            for member in read_members(tar_stream, index):  # type: ignore[arg-type]
                files += member.data is not None
        except IntegrityError as exc:
            raise VerificationError(f"{key}: {exc}") from None
        drain(tar_stream)
    _compare(key, "sha256 of the stored object", sealed.hexdigest, expected["encrypted_sha256"])
    _compare(key, "sha256 of the tar stream", plain.hexdigest, expected["plain_sha256"])
    _compare(key, "host in the index", index.get("host"), expected["host"])
    _compare(key, "content digest in the index", index.get("content_digest"), expected["content_digest"])
    if files != expected["files"]:
        raise VerificationError(f"{key}: {files} files in the archive, the fetch stored {expected['files']}")
    return {"size": info.size, "sha256": sealed.hexdigest, "tar_sha256": plain.hexdigest, "files_checked": files, "deep": True}


@task(name="verify", cache_policy=NO_CACHE, persist_result=False, **runtime.TRANSIENT_RETRIES)
def verify_configs(object_key: str, codec: str, expected: dict[str, Any], deep: bool) -> dict[str, Any]:
    """Read the stored config archive back and check it (deep: decrypt, decompress, every file's sha256)."""
    settings = runtime.settings()
    store = runtime.config_store(settings)
    if deep:
        result = check_config_archive(store, object_key, runtime.key_provider(settings), codec, expected)
    else:
        result = read_back(store, object_key, expected["encrypted_bytes"], expected["encrypted_sha256"])
    get_run_logger().info("verified %s (%s)", object_key, "deep" if deep else "size and sha256")
    return result


@task(name="verify", cache_policy=NO_CACHE, persist_result=False, **runtime.TRANSIENT_RETRIES)
def verify_configs_restored(host: str, steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Read every restored file back from the host: content digest, mode and link targets against the backup."""
    from tasks.fetch import fingerprint_key, read_remote
    from tasks.plan import host_entry, keyed_digest

    key = fingerprint_key(runtime.settings())
    mismatches: list[dict[str, Any]] = []
    checked = 0
    with runtime.connect_host(host) as client, client.open_sftp() as sftp:
        for s in steps:
            if s["action"] == "conflict":
                continue
            now = host_entry(sftp, s["path"])
            checked += 1
            if s["action"] == "remove":
                if now is not None:
                    mismatches.append({"path": s["path"], "problem": "still on the host after its removal"})
            elif now is None:
                mismatches.append({"path": s["path"], "problem": "missing on the host"})
            elif s["kind"] == "symlink":
                if now.get("symlink") != s["symlink"]:
                    mismatches.append({"path": s["path"], "problem": f"links to {now.get('symlink')!r}, not {s['symlink']!r}"})
            elif now["type"] != "file":
                mismatches.append({"path": s["path"], "problem": f"is a {now['type']} on the host"})
            else:
                if keyed_digest(read_remote(sftp, s["path"], now["size"]), key) != s["digest"]:
                    mismatches.append({"path": s["path"], "problem": "content differs from the backup's"})
                elif now["mode"] != s["mode"]:
                    mismatches.append({"path": s["path"], "problem": f"mode {now['mode']:04o}, the backup has {s['mode']:04o}"})
    get_run_logger().info("checked %d restored files on %s: %d mismatch(es)", checked, host, len(mismatches))
    return {"checked": checked, "mismatches": mismatches}
