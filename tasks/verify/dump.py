"""Verify a database backup: the stored object is the one sent, and what was sent is a whole, readable dump.

Always: storage holds exactly the bytes uploaded — proven by its ETag against the MD5 of every
part as it was sent, or, where storage cannot prove it, by reading the object back (size and
sha256).
Deep (default): a copy of the ciphertext, checked while it uploads (``verify_stream``), decrypts
(the wrapped key unwraps and every chunk authenticates), decompresses (the sha256 of the dump
equals the one taken while dumping) and feeds ``pg_restore --list``, which must parse the table
of contents and list the data of every counted table. The upload completes only after that check
passed, so the backup needs no second pass over its data.
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
from luxima_backup.pipes import Link, Meter, MeteredReader, drain, judged
from tasks.verify.readback import compare, confirm_stored


def check_dump_stream(src: Any, unwrap: Any, codec: str, binding: dict[str, str] | None, pg_restore: pg.Tool | None,
                      where: str) -> dict[str, Any]:
    """One pass over a ciphertext stream: its sha256, every chunk authenticated, decompressed, the dump's sha256
    and table of contents (None without ``pg_restore``)."""
    sealed, plain = Meter(), Meter()
    dump = MeteredReader(DecompressingReader(DecryptingReader(MeteredReader(src, sealed), unwrap, expect=binding, where=where), codec), plain)
    toc = _restore_list(dump, pg_restore) if pg_restore else None
    drain(dump)  # pg_restore stops after the TOC; the rest must still hash and authenticate
    return {"encrypted_bytes": sealed.size, "encrypted_sha256": sealed.hexdigest, "plain_bytes": plain.size,
            "plain_sha256": plain.hexdigest, "toc": toc}


@task(name="verify-stream", cache_policy=NO_CACHE, persist_result=False)
def verify_stream(source: Link, codec: str, binding: dict[str, str]) -> dict[str, Any]:
    """The deep check of the ciphertext as it uploads, from a copy of the stream; its verdict gates the upload."""
    settings = runtime.settings()
    with judged(source) as ciphertext:
        # The newest pg_restore installed reads every archive an older or equal pg_dump wrote.
        tool = pg.find_tool("pg_restore", 0, settings.db_backup.pg_bin_dir)
        return check_dump_stream(ciphertext, runtime.key_provider(settings).unwrap, codec, binding, tool,
                                 binding.get("object", "the backup"))


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
def verify_dump(object_key: str, expected: dict[str, Any], sent: dict[str, Any] | None, tables: list[dict[str, Any]],
                large_objects: int = 0) -> dict[str, Any]:
    """Check the uploaded backup: stored as sent and, with ``sent`` (the deep check of the stream), a whole dump."""
    store = runtime.store()
    result = confirm_stored(store, object_key, expected["encrypted_bytes"], expected["encrypted_sha256"],
                            expected.get("proven_etag"))
    if sent is not None:
        # The check read the same ciphertext the upload did, from the encrypt stage's copy of it.
        compare(object_key, "sha256 of the ciphertext checked", sent["encrypted_sha256"], expected["encrypted_sha256"])
        compare(object_key, "sha256 of the dump", sent["plain_sha256"], expected["plain_sha256"])
        if sent["plain_bytes"] != expected["plain_bytes"]:
            raise VerificationError(f"{object_key}: dump is {sent['plain_bytes']} bytes after decryption, "
                                    f"{expected['plain_bytes']} were dumped")
        result.update({"dump_sha256": sent["plain_sha256"], "deep": True})
        if sent["toc"] is not None:
            result.update(check_data_entries(object_key, sent["toc"], tables, large_objects))
    get_run_logger().info("verified %s (%s; %s)", object_key, "deep" if sent is not None else "size and sha256",
                          result["stored"])
    return result
