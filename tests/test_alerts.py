"""Chat alerts through a real Prefect server: automations fire, a local webhook receiver gets the message."""

from __future__ import annotations

import json
import threading
import time
import uuid
from uuid import UUID
from datetime import timedelta
from http.server import BaseHTTPRequestHandler

from tests.quiet_server import QuietHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

from deployments.alerts import setup_alerts
from luxima_backup.settings import AlertSettings
from tests.conftest import DB_PASSWORD, file_keys

pytestmark = pytest.mark.slow


class Receiver:
    """An HTTP endpoint standing in for a chat webhook; keeps every JSON body it is sent."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.messages.append(json.loads(raw or b"{}"))
                self.send_response(204)
                self.end_headers()

        self.server = QuietHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def fire_until(self, fire: Any, predicate: Any, timeout: float) -> dict[str, Any] | None:
        """Call ``fire`` (which emits an event) until a matching message arrives: the server loads a new
        automation a moment after it is created, and an event that comes before it is not matched."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fire()
            found = self.wait_for(predicate, min(15, max(1, deadline - time.monotonic())))
            if found is not None:
                return found
        return None

    def wait_for(self, predicate: Any, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in list(self.messages):
                if predicate(m):
                    return m
            time.sleep(0.5)
        return None


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.fixture
def prefix(prefect_server: Any) -> Iterator[str]:
    """A name prefix for this test's automations, which are deleted after it: left behind, they would
    go on firing at a receiver that is gone (the RPO watchdog every window) and slow the server's
    actions for the tests after."""
    name = f"t{uuid.uuid4().hex[:6]}"
    yield name
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:  # (3.8.8's read_automations sends no limit; the API wants one)
        found = client._client.post("/automations/filter", json={"sort": "NAME_ASC", "limit": 200, "offset": 0}).json()
        for automation in found:
            if automation["name"].startswith(f"{name}:"):
                client.delete_automation(UUID(automation["id"]))


def alert_settings(receiver: Receiver, monkeypatch: pytest.MonkeyPatch, prefix: str, **rpo: float) -> AlertSettings:
    monkeypatch.setenv("LUXIMA_TEST_WEBHOOK_URL", receiver.url)
    return AlertSettings.model_validate({
        "channels": [{"kind": "webhook", "name": f"{prefix}-hook", "url": "env:LUXIMA_TEST_WEBHOOK_URL"}],
        "rpo": {k: timedelta(seconds=v) for k, v in rpo.items()}, "automation_prefix": prefix,
    })


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

    monkeypatch.setenv("LUXIMA_TEST_WRONG_PASSWORD", "wrong-" + DB_PASSWORD)
    write_settings(database, bucket, file_keys(key_file), password_env="LUXIMA_TEST_WRONG_PASSWORD")
    with tags("backup", "db"):
        state = db_backup(return_state=True)
    assert state.is_failed()
    run_id = str(state.state_details.flow_run_id)
    message = receiver.wait_for(lambda m: run_id in m.get("body", ""), timeout=90)
    assert message is not None, f"no alert for run {run_id}; received: {receiver.messages}"
    assert "db-backup" in message["subject"] and "Failed" in message["subject"]
    body = message["body"]
    assert "State: Failed" in body and "password authentication failed" in body
    assert f"/runs/flow-run/{run_id}" in body and body.count("http://127.0.0.1:") >= 1
    assert DB_PASSWORD not in json.dumps(message)


def test_rpo_watchdog_fires_without_success_and_stays_quiet_with_it(
    prefect_server: Any, receiver: Receiver, monkeypatch: pytest.MonkeyPatch, prefix: str,
) -> None:
    from luxima_backup import events

    silent, healthy = f"silent{uuid.uuid4().hex[:6]}", f"healthy{uuid.uuid4().hex[:6]}"
    cfg = alert_settings(receiver, monkeypatch, prefix, **{silent: 10, healthy: 10})
    setup_alerts(cfg, components=[silent, healthy])
    deadline = time.monotonic() + 35
    while time.monotonic() < deadline:  # the healthy component succeeds every few seconds
        events.backup_succeeded(healthy, "main", "db-test")
        time.sleep(2)
    fired = receiver.wait_for(lambda m: f"no successful {silent} backup" in m.get("subject", ""), timeout=30)
    assert fired is not None, f"the RPO watchdog did not fire; received: {receiver.messages}"
    assert "0:00:10" in fired["body"]
    assert not [m for m in receiver.messages if healthy in m.get("subject", "")]


def test_failed_verification_alerts_with_its_detail(prefect_server: Any, receiver: Receiver,
                                                    monkeypatch: pytest.MonkeyPatch, prefix: str) -> None:
    from prefect import flow

    from luxima_backup import events

    setup_alerts(alert_settings(receiver, monkeypatch, prefix), components=[])
    target = f"db{uuid.uuid4().hex[:6]}"

    @flow(name="verification-probe")
    def probe() -> None:  # the event as db-restore emits it when a check fails
        events.verification_failed("restore", "db", target, "failed checks: rows in public.events", backup_id="db-x-1")

    runs: list[Any] = []
    message = receiver.fire_until(lambda: runs.append(probe(return_state=True)), lambda m: target in m.get("subject", ""),
                                  timeout=90)
    assert message is not None, f"no verification alert; received: {receiver.messages}"
    assert "verification FAILED" in message["subject"]
    assert "rows in public.events" in message["body"] and "db-x-1" in message["body"]
    assert any(f"/runs/flow-run/{run.state_details.flow_run_id}" in message["body"] for run in runs)


def test_config_drift_alerts_with_the_changed_paths(prefect_server: Any, receiver: Receiver,
                                                    monkeypatch: pytest.MonkeyPatch, prefix: str) -> None:
    from prefect import flow

    from luxima_backup import events

    setup_alerts(alert_settings(receiver, monkeypatch, prefix), components=[])
    host = f"web{uuid.uuid4().hex[:6]}"

    @flow(name="drift-probe")
    def probe() -> None:  # the event as config-backup emits it for a host whose configs changed
        events.config_drift(host, {"added": [], "changed": ["/etc/nginx/nginx.conf"], "removed": [], "metadata": []}, "c0ffee1")

    message = receiver.fire_until(probe, lambda m: host in m.get("subject", ""), timeout=90)
    assert message is not None, f"no drift alert; received: {receiver.messages}"
    assert "config drift" in message["subject"]
    assert "/etc/nginx/nginx.conf" in message["body"] and "changed 1" in message["body"] and "c0ffee1" in message["body"]
