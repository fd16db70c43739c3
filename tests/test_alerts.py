"""Chat alerts through a real Prefect server: real runs fail, time out, die or fail their verification,
automations fire, and a local webhook receiver gets the message. (Config drift from a real change:
tests/test_configs.py.)"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from deployments.alerts import setup_alerts
from luxima_backup.settings import AlertSettings
from tests.alerting import Receiver, alert_settings, wait_until_live
from tests.conftest import DB_PASSWORD, file_keys
from tests.helpers import backup_while_locked, run_backup

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def events_named(api_url: str, name: str, resource_id: str | None = None) -> list[dict[str, Any]]:
    """Events the server stored under ``name`` in the last hour (optionally about one resource)."""
    flt: dict[str, Any] = {"event": {"name": [name]}}
    if resource_id:
        flt["resource"] = {"id": [resource_id]}
    found = httpx.post(f"{api_url}/events/filter", json={"filter": flt, "limit": 50})
    found.raise_for_status()
    return found.json()["events"]


def test_failed_backup_alerts_with_flow_state_error_and_link(
    prefect_server: Any, receiver: Receiver, monkeypatch: pytest.MonkeyPatch, write_settings: Any, prefix: str,
    database: str, bucket: str, key_file: Path, source: Any,
) -> None:
    from prefect import tags

    from flows.db_backup import db_backup

    cfg = alert_settings(receiver, monkeypatch, prefix)
    assert set(setup_alerts(cfg, components=[]).values()) == {"created"}
    assert set(setup_alerts(cfg, components=[]).values()) == {"unchanged"}  # idempotent
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        assert len(client.read_automations_by_name(f"{prefix}: backup or restore run failed")) == 1
    wait_until_live(receiver)

    monkeypatch.setenv("LUXIMA_TEST_WRONG_PASSWORD", "wrong-" + DB_PASSWORD)
    write_settings(database, bucket, file_keys(key_file), password_env="LUXIMA_TEST_WRONG_PASSWORD")
    with tags("backup", "db"):
        state = db_backup(return_state=True)
    assert state.is_failed()
    run_id = str(state.state_details.flow_run_id)
    try:
        message = receiver.about_run(run_id)
    except AssertionError as exc:
        # Seen once under the full suite: tell a missing event from an automation service too slow under load.
        stored = events_named(prefect_server.api_url, "prefect.flow-run.Failed", f"prefect.flow-run.{run_id}")
        raise AssertionError(f"{exc}; the server {'has' if stored else 'has NO'} Failed event for the run") from None
    assert "db-backup" in message["subject"] and "Failed" in message["subject"]
    body = message["body"]
    assert "State: Failed" in body and "password authentication failed" in body
    assert f"/runs/flow-run/{run_id}" in body and body.count("http://127.0.0.1:") >= 1
    assert DB_PASSWORD not in json.dumps(message)


def test_a_backup_past_its_time_limit_alerts_timed_out(
    prefect_server: Any, receiver: Receiver, monkeypatch: pytest.MonkeyPatch, write_settings: Any, prefix: str,
    pg_cluster: Any, database: str, bucket: str, key_file: Path, source: Any,
) -> None:
    from prefect import tags

    setup_alerts(alert_settings(receiver, monkeypatch, prefix), components=[])
    wait_until_live(receiver)
    monkeypatch.setenv("LUXIMA_BACKUP__DB_BACKUP__TIMEOUT_SECONDS", "5")
    monkeypatch.setenv("LUXIMA_BACKUP__DB_BACKUP__LOCK_WAIT_TIMEOUT_SECONDS", "600")  # the run's limit ends it
    write_settings(database, bucket, file_keys(key_file))
    with tags("backup", "db"):
        state, _ = backup_while_locked(pg_cluster, database)
    assert state.name == "TimedOut", state
    message = receiver.about_run(str(state.state_details.flow_run_id))
    assert "TimedOut" in message["subject"] and "limit of 5 s" in message["body"]


def test_a_backup_damaged_on_its_way_to_storage_alerts_verification_failed(
    prefect_server: Any, receiver: Receiver, monkeypatch: pytest.MonkeyPatch, write_settings: Any, prefix: str,
    s3_server: Any, database: str, bucket: str, key_file: Path, source: Any,
) -> None:
    """One bit flipped in the upload, between the backup host and storage: storage's ETag no longer matches what
    was sent, the read-back's sha256 differs, the real flow's verify fails and its own event reaches chat."""
    from tests.fault_proxy import FaultProxy

    setup_alerts(alert_settings(receiver, monkeypatch, prefix), components=[])
    wait_until_live(receiver)
    proxy = FaultProxy(s3_server.url).start()
    proxy.corrupt_request_when = lambda method, path: method == "PUT" and ".dump." in path
    try:
        write_settings(database, bucket, file_keys(key_file), endpoint=proxy.url)
        state = run_backup()
    finally:
        proxy.stop()
    assert proxy.corrupted_request.is_set() and state.is_failed()
    run_id = str(state.state_details.flow_run_id)
    message = receiver.wait_for(lambda m: "verification FAILED" in m.get("subject", "") and run_id in m.get("body", ""),
                                timeout=90)
    assert message is not None, f"no verification alert for run {run_id}; received: {receiver.messages}"
    assert "db main" in message["subject"]
    assert "A backup of db main failed its verification" in message["body"]
    assert "db-main-" in message["body"]  # the backup id


def test_a_run_whose_process_is_killed_is_marked_crashed_and_alerts(
    prefect_server: Any, receiver: Receiver, monkeypatch: pytest.MonkeyPatch, write_settings: Any, prefix: str,
    pg_cluster: Any, database: str, bucket: str, key_file: Path, source: Any, tmp_path: Path,
) -> None:
    """The machine running a backup dies (its process group is SIGKILLed: nothing gets to say so). Its
    heartbeats stop; after alerts.unresponsive_after the run is marked Crashed, and that alerts."""
    setup_alerts(alert_settings(receiver, monkeypatch, prefix, unresponsive_after=45), components=[])
    wait_until_live(receiver)
    monkeypatch.setenv("LUXIMA_BACKUP__DB_BACKUP__LOCK_WAIT_TIMEOUT_SECONDS", "600")  # it waits: killed mid-run
    write_settings(database, bucket, file_keys(key_file))
    marker = f"victim-{uuid.uuid4().hex[:6]}"
    script = ("from prefect import tags\nfrom flows.db_backup import db_backup\n"
              f"with tags('backup', 'db', '{marker}'):\n    db_backup()\n")
    env = {**os.environ, "PREFECT_API_URL": prefect_server.api_url, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}
    with pg_cluster.connect(database) as holder:
        holder.execute("BEGIN")
        holder.execute("LOCK TABLE app.users IN ACCESS EXCLUSIVE MODE")
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=(tmp_path / "victim.log").open("wb"))
        try:
            run_id = _running_run(prefect_server.api_url, marker, proc, timeout=90)
            deadline = time.monotonic() + 60
            while not events_named(prefect_server.api_url, "prefect.flow-run.heartbeat", f"prefect.flow-run.{run_id}"):
                assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "victim.log").read_text()[-3000:]
                time.sleep(1)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        holder.execute("ROLLBACK")
    message = receiver.about_run(run_id, timeout=150)
    assert "Crashed" in message["subject"] and "no heartbeat" in message["body"]
    run = httpx.get(f"{prefect_server.api_url}/flow_runs/{run_id}").json()
    assert run["state"]["name"] == "Crashed"


def _running_run(api_url: str, tag: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the backup process ended before it could be killed"
        runs = httpx.post(f"{api_url}/flow_runs/filter", json={
            "flow_runs": {"tags": {"all_": [tag]}, "state": {"type": {"any_": ["RUNNING"]}}}, "limit": 5}).json()
        if runs:
            return str(runs[0]["id"])
        time.sleep(1)
    raise AssertionError(f"no running flow run tagged {tag} within {timeout} s")


def test_an_overdue_dr_drill_is_said_in_chat_by_the_status_flow(
    prefect_server: Any, receiver: Receiver, monkeypatch: pytest.MonkeyPatch, write_settings: Any, prefix: str,
    database: str, bucket: str, key_file: Path,
) -> None:
    """The last successful drill is 200 days old (6 months + 2 weeks is the limit): the hourly status flow says so in
    chat at the reminder hour (set here to this hour: the clock is the only thing not real)."""
    from datetime import datetime, timedelta, timezone
    from zoneinfo import ZoneInfo

    import flows.status as status_flow
    from luxima_backup import drills, runtime

    setup_alerts(alert_settings(receiver, monkeypatch, prefix), components=[])
    wait_until_live(receiver)
    write_settings(database, bucket, file_keys(key_file), "[dr.drill]\noverdue_days = 197\n")
    old = datetime.now(timezone.utc) - timedelta(days=200)
    drills.save_report(runtime.store(runtime.settings()), "backups", old, {"started_at": old.isoformat(), "ok": True}, "#")
    monkeypatch.setattr(status_flow, "REMINDER_HOUR", datetime.now(ZoneInfo("Asia/Jakarta")).hour)
    result = status_flow.status()
    assert result["drill"]["overdue"] and result["drill"]["last_success"] == old.isoformat()
    message = receiver.wait_for(lambda m: m.get("subject") == "[luxima-backup] DR drill overdue", timeout=90)
    assert message is not None, f"no drill-overdue alert; received: {receiver.messages}"
    assert f"last successful {old:%Y-%m-%d}" in message["body"] and "(200 days ago)" in message["body"]
    assert "OVERDUE" in message["body"] and "dr-drill" in message["body"]


def test_rpo_watchdog_watches_the_scheduled_components_and_their_targets_and_fires_without_success(
    prefect_server: Any, receiver: Receiver, monkeypatch: pytest.MonkeyPatch, prefix: str, write_settings: Any,
    database: str, bucket: str, key_file: Path, source: Any,
) -> None:
    from luxima_backup import events

    # The watched components come from the scheduled deployments in prefect.yaml, windows from the settings.
    defaults = AlertSettings().rpo  # db, files, configs and vm
    done = setup_alerts(alert_settings(receiver, monkeypatch, prefix).model_copy(update={"rpo": defaults}))
    rpo = sorted(name.split(": RPO ")[1] for name in done if ": RPO " in name)
    assert rpo == [f"{c}{each}" for c in ("configs", "db", "files", "vm") for each in ("", " per target")]

    # What keeps a watchdog quiet is the real flows' own success event.
    write_settings(database, bucket, file_keys(key_file))
    state = run_backup(deep_verify=False)
    assert state.is_completed(), state.message
    run_id = str(state.state_details.flow_run_id)

    def from_this_run() -> bool:  # events are stored a moment after they are sent
        found = events_named(prefect_server.api_url, events.SUCCEEDED, "luxima.backup.db.main")
        return any(r["prefect.resource.id"] == f"prefect.flow-run.{run_id}" for e in found for r in e["related"])

    deadline = time.monotonic() + 30
    while not from_this_run():
        assert time.monotonic() < deadline, f"no {events.SUCCEEDED} event from run {run_id}"
        time.sleep(1)

    silent, healthy = f"silent{uuid.uuid4().hex[:6]}", f"healthy{uuid.uuid4().hex[:6]}"
    cfg = alert_settings(receiver, monkeypatch, prefix, **{silent: 10, healthy: 20})
    setup_alerts(cfg, components=[silent, healthy], targets={healthy: ["never"]})  # a configured target
    # Per target: among a component's targets that keep succeeding, one backed up once and then never again
    # (a guest whose backups fail while the others' succeed) is named, though its component never goes quiet.
    deadline = time.monotonic() + 25  # past the healthy window once, with margin
    for i in itertools.count():  # the healthy component succeeds every 2 s, a tenth of its window
        if time.monotonic() >= deadline:
            break
        events.backup_succeeded(healthy, "main", "db-test")
        if i < 3:  # (more than once: the server loads new automations a few seconds after they are saved)
            events.backup_succeeded(healthy, "db-server", "db-test")
        time.sleep(2)
    fired = receiver.wait_for(lambda m: f"no successful {silent} backup" in m.get("subject", ""), timeout=30)
    assert fired is not None, f"the RPO watchdog did not fire; received: {receiver.messages}"
    assert "0:00:10" in fired["body"]
    target = receiver.wait_for(lambda m: f"luxima.backup.{healthy}.db-server" in m.get("body", ""), timeout=30)
    assert target is not None, f"the per-target watchdog did not fire; received: {receiver.messages}"
    assert f"a {healthy} backup target" in target["subject"] and "0:00:20" in target["body"]
    # a configured target that never succeeded has its own watch from the start
    never = receiver.wait_for(lambda m: f"no successful {healthy} backup of never" in m.get("subject", ""), timeout=30)
    assert never is not None, f"the configured target's watchdog did not fire; received: {receiver.messages}"
    assert not [m for m in receiver.messages if f"no successful {healthy} backup for" in m.get("subject", "")]
    assert not [m for m in receiver.messages if f"luxima.backup.{healthy}.main" in m.get("body", "")]
    # taken out of the settings, its watch goes
    assert setup_alerts(cfg, components=[silent, healthy], targets={healthy: []})[f"{prefix}: RPO {healthy}/never"] == "removed"


def test_an_event_that_cannot_be_sent_is_logged_as_an_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path), PREFECT_SERVER_ALLOW_EPHEMERAL_MODE="false",
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    script = ("import logging\nlogging.basicConfig()\nfrom luxima_backup import events\n"
              "events.verification_failed('backup', 'db', 'main', 'sha256 mismatch', backup_id='db-main-1')\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ERROR:luxima_backup.events:could not emit luxima.verification.failed for db main" in done.stderr
