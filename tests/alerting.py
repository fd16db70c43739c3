"""What the alert tests share: a webhook receiver standing in for chat, automations named per test, and a
way to know the server has loaded them before a real run is judged by what reaches the receiver."""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import timedelta
from http.server import BaseHTTPRequestHandler
from typing import Any, Iterator
from uuid import UUID

import pytest

from luxima_backup.settings import AlertSettings
from tests.quiet_server import QuietHTTPServer


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

    def about_run(self, run_id: str, timeout: float = 90) -> dict[str, Any]:
        """The message about flow run ``run_id`` (its link names it), or a failure listing what came instead."""
        found = self.wait_for(lambda m: run_id in m.get("body", ""), timeout)
        assert found is not None, f"no alert for run {run_id}; received: {self.messages}"
        return found


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


def alert_settings(receiver: Receiver, monkeypatch: pytest.MonkeyPatch, prefix: str,
                   unresponsive_after: float = 120, **rpo: float) -> AlertSettings:
    monkeypatch.setenv("LUXIMA_TEST_WEBHOOK_URL", receiver.url)
    return AlertSettings.model_validate({
        "channels": [{"kind": "webhook", "name": f"{prefix}-hook", "url": "env:LUXIMA_TEST_WEBHOOK_URL"}],
        "rpo": {k: timedelta(seconds=v) for k, v in rpo.items()}, "automation_prefix": prefix,
        "unresponsive_after": timedelta(seconds=unresponsive_after),
    })


def wait_until_live(receiver: Receiver, timeout: float = 90) -> None:
    """Block until the server acts on the automations just saved: a throwaway run tagged backup fails until
    its alert arrives. (Only readiness: what a test asserts comes from the real runs after this.)"""
    from prefect import flow, tags

    @flow(name="alerts-readiness-probe")
    def probe() -> None:
        raise RuntimeError("readiness probe")

    runs: list[str] = []

    def fire() -> None:
        with tags("backup", "probe"):
            runs.append(str(probe(return_state=True).state_details.flow_run_id))

    found = receiver.fire_until(fire, lambda m: any(r in m.get("body", "") for r in runs), timeout)
    assert found is not None, f"the alert automations never acted; received: {receiver.messages}"
