"""A real Chromium driven by Playwright, for the tests of the Prefect UI.

Playwright's own browser download is not possible here: it drives Debian's ``chromium``
(apt; installed by scripts/bootstrap.sh), or the browser named by ``LUXIMA_CHROMIUM``. When a
test fails, the page it was on is saved under ``test-artifacts/ui/`` (``LUXIMA_TEST_ARTIFACTS``)
as a screenshot and its text, for CI to keep.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent


def chromium_path() -> str:
    """Debian's Chromium binary (the ``/usr/bin/chromium`` wrapper script execs it)."""
    named = os.environ.get("LUXIMA_CHROMIUM")
    for candidate in ([named] if named else []) + ["/usr/lib/chromium/chromium", shutil.which("chromium") or ""]:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError("no Chromium found: install Debian's chromium (scripts/bootstrap.sh does) or set LUXIMA_CHROMIUM")


def artifacts_dir() -> Path:
    return Path(os.environ.get("LUXIMA_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "ui"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture(scope="module")  # stopped after the module: Playwright's event loop would make later flows async
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # --no-sandbox: the tests run as root in CI containers, where Chromium's sandbox cannot start
        b = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A page in a fresh context whose clock is UTC (times shown in Asia/Jakarta are then the schedules' own)."""
    context = browser.new_context(viewport={"width": 1600, "height": 1200}, timezone_id="UTC")
    context.set_default_timeout(30_000)
    pg = context.new_page()
    yield pg
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        out = artifacts_dir()
        out.mkdir(parents=True, exist_ok=True)
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)
        pg.screenshot(path=str(out / f"{stem}.png"), full_page=True)
        (out / f"{stem}.txt").write_text(f"{pg.url}\n\n{pg.inner_text('body')}")
        print(f"the page at failure: {out / stem}.png")
    context.close()
