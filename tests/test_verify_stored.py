"""The weekly re-verification: stored backups read back whole, a rotating share per run, damage found and shown."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import file_keys
from tests.helpers import error_of, run_backup, s3_get

pytestmark = pytest.mark.slow


def status_json(config: Path) -> dict[tuple[str, str], Any]:
    from typer.testing import CliRunner

    from app.cli import app

    done = CliRunner().invoke(app, ["status", "--json", "--config", str(config)])
    return {"exit": done.exit_code, **{(t["component"], t["target"]): t for t in json.loads(done.stdout)}}


def test_every_backup_is_read_once_per_cycle_and_a_flipped_byte_is_found(
    prefect_server: Any, s3_server: Any, bucket: str, write_settings: Any, database: str, key_file: Path, source: Any,
) -> None:
    from flows.verify_stored import verify_stored

    config = write_settings(database, bucket, file_keys(key_file), "[verify_stored]\ncycle = 2\n")
    made = []
    for _ in range(3):
        state = run_backup(deep_verify=False)
        assert state.is_completed(), state
        made.append(state.result())
    # over one cycle (two runs), every backup is read exactly once
    seen: list[str] = []
    for share in (0, 1):
        state = verify_stored(share=share, return_state=True)
        assert state.is_completed(), state
        seen += [r for r in _checked(prefect_server, state)]
    assert sorted(seen) == sorted(m["backup_id"] for m in made)
    report = status_json(config)
    assert report["exit"] == 0 and report[("db", "main")]["reverified_at"] and report[("db", "main")]["damaged"] == 0

    # one bit flipped in the oldest dump, in storage (rot, an overwrite): found, alerted, shown
    victim = made[0]
    blob = bytearray(s3_get(s3_server, bucket, victim["object_key"]))
    blob[len(blob) // 2] ^= 0x01
    s3_server.client().put_object(Bucket=bucket, Key=victim["object_key"], Body=bytes(blob))
    state = verify_stored(everything=True, return_state=True)
    exc = error_of(state)
    assert "1 stored backup(s) damaged" in str(exc) and victim["backup_id"] in str(exc)
    report = status_json(config)
    assert report["exit"] == 1 and report[("db", "main")]["damaged"] == 1


def _checked(prefect_server: Any, state: Any) -> list[str]:
    import httpx

    run_id = str(state.state_details.flow_run_id)
    found = httpx.post(f"{prefect_server.api_url}/artifacts/filter",
                       json={"artifacts": {"flow_run_id": {"any_": [run_id]}}, "limit": 10, "offset": 0}).json()
    tables = [a for a in found if a["key"] == "verify-stored"]
    if not tables:
        return []
    rows = json.loads(tables[0]["data"]) if isinstance(tables[0]["data"], str) else tables[0]["data"]
    assert all(r["result"] == "ok" for r in rows)
    return [r["backup"] for r in rows]
