"""Verify a stored database dump: read the stored object back and prove it is the backup that was sent.

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

from luxima_backup import pg, runtime
from luxima_backup.compression import DecompressingReader
from luxima_backup.envelope import DecryptingReader
from luxima_backup.errors import ToolError, VerificationError
from luxima_backup.keys import KeyProvider
from luxima_backup.pipes import Meter, MeteredReader, drain
from luxima_backup.storage import ObjectStore
from tasks.verify.readback import compare, read_back


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
    compare(key, "sha256 of the stored object", sealed.hexdigest, expected["encrypted_sha256"])
    compare(key, "sha256 of the dump", plain.hexdigest, expected["plain_sha256"])
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


@task(name="verify-dump", cache_policy=NO_CACHE, persist_result=False, **runtime.TRANSIENT_RETRIES)
def verify_dump(object_key: str, codec: str, expected: dict[str, Any], deep: bool, server_major: int,
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
