"""`luxima-backup status` and the status flow: every target against its RPO, from the manifests in storage."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import file_keys
from tests.test_prune import db_backup, files_backup

pytestmark = pytest.mark.slow

NOW = datetime.now(timezone.utc)


def since(then: datetime) -> float:
    """Hours since ``then`` (NOW is set when the module is imported: in a full run, minutes before the test runs)."""
    return (datetime.now(timezone.utc) - then).total_seconds() / 3600


def status_cmd(config: Path, *extra: str) -> Any:
    from typer.testing import CliRunner

    from app.cli import app

    return CliRunner().invoke(app, ["status", "--config", str(config), *extra])


@pytest.fixture
def config(write_settings: Any, database: str, bucket: str, key_file: Path) -> Path:
    return write_settings(database, bucket, file_keys(key_file), """
        [files_backup.sources.userfiles]
        kind = "local"
        path = "/srv/user-files"

        [files_backup.sources.avatars]
        kind = "local"
        path = "/srv/avatars"
    """)


def test_status_exits_non_zero_when_a_target_is_beyond_its_rpo(config: Path, s3_server: Any) -> None:
    from luxima_backup import runtime

    store = runtime.store(runtime.settings())
    for ago in (3, 2, 1):
        db_backup(store, NOW - timedelta(hours=ago * 12))
    chain: dict[str, Any] = {}
    for ago in (3, 2):
        files_backup(store, NOW - timedelta(days=ago), chain)  # the newest is 2 days old: past 26 h
    done = status_cmd(config, "--json")
    assert done.exit_code == 1, done.output
    report = {(t["component"], t["target"]): t for t in json.loads(done.stdout)}
    db = report[("db", "main")]
    assert db["beyond_rpo"] is False and db["kept"] == 3 and db["age_hours"] == pytest.approx(12 + since(NOW), abs=0.1)
    assert db["rpo_hours"] == 26 and db["bytes_stored"] == 3 * (64 + 0)  # synthetic dumps of 64 bytes
    files = report[("files", "userfiles")]
    assert files["beyond_rpo"] is True and files["chain_length"] == 2 and files["kept"] == 2
    never = report[("files", "avatars")]  # configured, never backed up: the worst of all
    assert never["beyond_rpo"] is True and never["last_success"] is None and never["kept"] == 0
    text = status_cmd(config)
    assert text.exit_code == 1 and "BEYOND RPO" in text.output and "files/avatars" in text.output


def test_status_is_zero_when_every_target_is_within_its_rpo(write_settings: Any, database: str, bucket: str,
                                                             key_file: Path) -> None:
    from luxima_backup import runtime

    config = write_settings(database, bucket, file_keys(key_file))
    db_backup(runtime.store(runtime.settings()), NOW - timedelta(hours=1))
    done = status_cmd(config)
    assert done.exit_code == 0, done.output
    assert "db/main" in done.output and "ok" in done.output


def test_the_status_flow_publishes_the_table(config: Path, prefect_server: Any) -> None:
    import httpx

    from flows.status import status
    from luxima_backup import runtime

    db_backup(runtime.store(runtime.settings()), NOW - timedelta(hours=1))
    state = status(return_state=True)
    assert state.is_completed(), state
    assert sorted(state.result()["beyond_rpo"]) == ["files/avatars", "files/userfiles"]
    run_id = str(state.state_details.flow_run_id)
    found = httpx.post(f"{prefect_server.api_url}/artifacts/filter",
                       json={"artifacts": {"flow_run_id": {"any_": [run_id]}}, "limit": 10, "offset": 0}).json()
    table = next(a for a in found if a["key"] == "backup-status")
    rows = json.loads(table["data"]) if isinstance(table["data"], str) else table["data"]
    assert {(r["component"], r["target"], r["state"]) for r in rows} >= {("db", "main", "ok"), ("files", "avatars", "BEYOND RPO")}
    failed = status(fail_beyond_rpo=True, return_state=True)
    assert failed.is_failed() and "files/avatars" in failed.message
