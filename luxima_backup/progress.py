"""Progress of a long stage: bytes and rate in the run's log every few seconds, and a Prefect progress artifact.

A two-hour dump must look alive in the UI. A stage's ``Meter`` calls ``tick`` as bytes pass (from the
stage's thread); at most every ``every`` seconds that becomes a log line and an update of the
progress artifact. A failure to update the artifact never touches the backup: it is logged once.
"""

from __future__ import annotations

import threading
import time
from typing import Any

MIB = 1024 * 1024


class Progress:
    """Reports ``label``'s bytes against ``total`` (an estimate when ``estimated``) while a stream runs."""

    def __init__(self, label: str, total: int | None, *, estimated: bool = False, every: float = 10.0,
                 artifact: bool = True):
        from prefect import get_run_logger

        self.label, self.total, self.estimated, self.every = label, total, estimated, every
        self.logger = get_run_logger()
        self._reporting: threading.Thread | None = None
        self._started = self._last = time.monotonic()
        self._artifact_id: Any = None
        self._artifact_failed = False
        if artifact:
            try:
                from prefect.artifacts import create_progress_artifact

                self._artifact_id = create_progress_artifact(0.0, description=self._description(0))
            except Exception as exc:  # the UI's gauge is a convenience; the backup does not depend on it
                self._artifact_failed = True
                self.logger.warning("progress artifact of %s not created: %s", label, exc)

    def _description(self, done: int) -> str:
        about = "about " if self.estimated else ""
        of = f" of {about}{self.total / MIB:,.0f} MiB" if self.total else ""
        return f"{self.label}: {done / MIB:,.0f} MiB{of}"

    def _percent(self, done: int) -> float:
        if not self.total:
            return 0.0
        return min(99.0, 100.0 * done / self.total)  # 100 only once finished: an estimate can be short

    def tick(self, done: int) -> None:
        """Called by the stage for every block: cheap; the report itself runs off the data path."""
        now = time.monotonic()
        if now - self._last < self.every or self._reporting is not None:
            return
        self._last = now
        # An HTTP call to the API must not stall the stream it reports on: report from another thread.
        self._reporting = threading.Thread(target=self._report, args=(done, now), name=f"progress-{self.label}", daemon=True)
        self._reporting.start()

    def _report(self, done: int, now: float) -> None:
        try:
            rate = done / MIB / max(now - self._started, 1e-6)
            self.logger.info("%s, %.1f MiB/s", self._description(done), rate)
            self._update(self._percent(done), done)
        finally:
            self._reporting = None

    def finish(self, done: int) -> None:
        reporting = self._reporting
        if reporting is not None:
            reporting.join()
        self._update(100.0, done)

    def _update(self, percent: float, done: int) -> None:
        if self._artifact_id is None or self._artifact_failed:
            return
        try:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self._artifact_id, percent, description=self._description(done))
        except Exception as exc:
            self._artifact_failed = True
            self.logger.warning("progress artifact of %s not updated any more: %s", self.label, exc)
