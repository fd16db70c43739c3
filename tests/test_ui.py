"""The Prefect UI in a real browser, as operators use it: the deployments and their schedules, a backup
run's task runs and artifact, and a manual restore started from the deployment's run form.

Against the tests' Prefect server with the deployments registered by `luxima-backup deploy` and a
process worker running them (`luxima-backup worker`), as in production. On failure the page is
saved under test-artifacts/ui/ (tests/browser.py).
"""

from __future__ import annotations

import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from deployments.specs import load_specs
from devkit.sandbox import PostgresCluster, stop_group
from tests.conftest import file_keys
from tests.helpers import background, cli_env

pytestmark = pytest.mark.slow
CLI = str(Path(sys.executable).parent / "luxima-backup")


@pytest.fixture
def deployed(prefect_server: Any, write_settings: Any, database: str, bucket: str, key_file: Path,
             source: dict[str, int], tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The deployments registered and a worker running them, like an installation."""
    import subprocess

    config = write_settings(database, bucket, file_keys(key_file))
    env = cli_env(prefect_server, config)
    done = subprocess.run([CLI, "deploy"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    log = tmp_path / "worker.log"
    worker = background([CLI, "worker"], env, log)
    try:
        yield {"ui": prefect_server.api_url[: -len("/api")], "api": prefect_server.api_url, "worker_log": log}
    finally:
        stop_group(worker, 30, signal.SIGINT)


def deployment_id(api: str, name: str) -> str:
    found = httpx.post(f"{api}/deployments/filter", json={"deployments": {"name": {"any_": [name]}}, "limit": 5}).json()
    assert len(found) == 1, found
    return str(found[0]["id"])


def finished_run(api: str, run_id: str, log: Path, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = httpx.get(f"{api}/flow_runs/{run_id}").json()
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            assert run["state"]["type"] == "COMPLETED", (run["state"], log.read_text()[-4000:])
            return run
        time.sleep(2)
    raise AssertionError(f"run {run_id} did not finish in {timeout} s:\n{log.read_text()[-4000:]}")


def open_tab(page: Any, name: str) -> None:
    page.locator("[role=tablist] li.p-tab", has_text=name).first.click()


def test_deployments_page_lists_every_deployment_with_its_schedule_in_jakarta_time(
    deployed: dict[str, Any], page: Any,
) -> None:
    page.goto(f"{deployed['ui']}/deployments")
    rows = page.locator("tbody tr")
    specs = load_specs()
    page.get_by_text(f"{len(specs)} Deployments").wait_for()  # the count, whatever fits on one page
    search = page.get_by_placeholder("Search deployments...")
    for spec in specs:
        search.fill(spec.name)  # one page holds 10: each is looked up by name
        row = rows.filter(has=page.get_by_text(spec.name, exact=True))
        row.first.wait_for()  # listed (times out otherwise); a count taken now could catch the list re-rendering
        for schedule in spec.schedules:
            wanted = {"0 3 * * *": "At 03:00 AM every day", "0 4 * * *": "At 04:00 AM every day",
                      "0 6 * * *": "At 06:00 AM every day", "0 2 * * 0": "At 02:00 AM, only on Sunday",
                      "0 1 * * 0": "At 01:00 AM, only on Sunday", "0 * * * *": "Every hour every day",
                      "0 5 * * 6": "At 05:00 AM, only on Saturday", "0 7 * * *": "At 07:00 AM every day", "0 3 * * 0": "At 03:00 AM, only on Sunday",
                      "0 2 1 1,7 *": "At 02:00 AM on day 1 of the month, only in January and July"}[schedule.cron]
            badge = row.first.get_by_text(wanted)
            if not badge.is_visible():  # too long for the column: the UI shows "+1" and lists it in a tooltip, without
                row.first.get_by_text("+1").hover()  # its timezone (test_deployments checks that through the API)
                page.get_by_role("tooltip").filter(has_text=wanted[:40]).first.wait_for()
                continue
            badge.hover()  # the timezone is in the schedule's tooltip
            tip = page.get_by_text(f"{wanted} ({schedule.timezone})").first
            tip.wait_for()
            assert schedule.timezone == "Asia/Jakarta"
        if not spec.schedules:
            assert "At " not in row.first.inner_text(), f"{spec.name} is run by hand but shows a schedule"


def test_a_backup_run_shows_its_task_runs_and_artifact_and_a_restore_runs_from_the_form(
    deployed: dict[str, Any], page: Any, pg_cluster: PostgresCluster, database: str,
) -> None:
    ui, api, log = deployed["ui"], deployed["api"], deployed["worker_log"]

    # A db-backup run, created as the scheduler creates it (through the API: Prefect's own client turns
    # async inside Playwright's event loop), run by the worker.
    created = httpx.post(f"{api}/deployments/{deployment_id(api, 'db-backup')}/create_flow_run", json={})
    created.raise_for_status()
    run_id = created.json()["id"]
    finished_run(api, run_id, log)
    page.goto(f"{ui}/runs/flow-run/{run_id}")
    page.get_by_text("Completed").first.wait_for()
    open_tab(page, "Task Runs")
    for name in ("log", "verify-dump", "manifest", "dump-globals"):  # as listed: name-<short id>
        page.get_by_role("link", name=re.compile(rf"^{name}-[0-9a-f]{{3}}$")).first.wait_for()
    # The stream (dump → compress → encrypt → upload) is a subflow: one run per attempt.
    stream = httpx.post(f"{api}/flow_runs/filter", json={
        "flow_runs": {"parent_flow_run_id": {"any_": [run_id]}}, "limit": 5}).json()
    assert len(stream) == 1, stream
    open_tab(page, "Subflow Runs")
    page.get_by_role("link", name=stream[0]["name"]).first.click()
    page.wait_for_url(f"**/runs/flow-run/{stream[0]['id']}")
    open_tab(page, "Task Runs")
    for name in ("dump", "compress", "encrypt", "upload"):
        page.get_by_role("link", name=re.compile(rf"^{name}-[0-9a-f]{{3}}$")).first.wait_for()
    page.goto(f"{ui}/runs/flow-run/{run_id}")
    open_tab(page, "Artifacts")
    page.get_by_text("db-backup-main").first.wait_for()

    # A manual restore: the deployment's run form, parameters typed in as an operator does.
    target = f"{database}_ui"
    page.goto(f"{ui}/deployments/deployment/{deployment_id(api, 'db-restore')}/run")
    backup_field = page.locator(".schema-form-property").filter(
        has=page.locator(".schema-form-property__label", has_text="backup"))
    backup_field.first.wait_for()
    assert "newest verified backup" in backup_field.first.inner_text()  # the docstring's description, rendered
    backup_field.first.locator("textarea").fill("latest")
    field = page.locator(".schema-form-property").filter(
        has=page.locator(".schema-form-property__label", has_text="target_database"))
    assert "name of the database to create" in field.inner_text()
    field.get_by_role("button", name="str").click()
    field.locator("textarea").fill(target)
    restore_deployment = deployment_id(api, "db-restore")
    page.get_by_role("button", name="Submit").click()
    # submitted once the UI leaves the form for the deployment's page
    page.wait_for_url(lambda url: restore_deployment in url and not url.split("?")[0].endswith("/run"))
    deadline = time.monotonic() + 30
    while not (runs := httpx.post(f"{api}/flow_runs/filter", json={
            "flow_runs": {"deployment_id": {"any_": [restore_deployment]}}, "limit": 5}).json()):
        assert time.monotonic() < deadline, "the form created no run"
        time.sleep(1)
    assert len(runs) == 1, runs  # the one the form created
    restored = finished_run(api, runs[0]["id"], log)
    typed = {k: v for k, v in restored["parameters"].items() if v not in (None, False, "new")}  # the form's defaults
    assert typed == {"backup": "latest", "target_database": target}, restored["parameters"]
    with pg_cluster.connect(target) as conn:
        assert conn.execute("SELECT count(*) FROM app.users").fetchone()[0] > 0
    page.goto(f"{ui}/runs/flow-run/{restored['id']}")
    open_tab(page, "Artifacts")
    page.get_by_text(f"Checks of {target}").first.wait_for()
    page.get_by_text(f"Checks of {target}").first.click()
    table = page.locator("table").first
    table.wait_for()
    text = table.inner_text()
    assert "rows in app.users" in text and "sha256 of the dump" in text, text[:2000]
