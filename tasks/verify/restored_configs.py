"""Verify restored config files: each read back from the host against the backup (keyed digest, mode, link target)."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from luxima_backup import runtime


@task(name="verify-restored-configs", cache_policy=NO_CACHE, persist_result=False, **runtime.TRANSIENT_RETRIES)
def verify_restored_configs(host: str, steps: list[dict[str, Any]]) -> dict[str, Any]:
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
