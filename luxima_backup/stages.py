"""Running streaming stages as concurrent Prefect tasks joined by ``Link``s, and collecting their outcome."""

from __future__ import annotations

from typing import Any, Callable

from prefect.futures import PrefectFuture, wait

from .errors import BackupError, root_cause
from .pipes import Link


def run_linked(submit: Callable[[list[PrefectFuture[Any]]], None], links: list[Link]) -> list[Any]:
    """Submit the stages (``submit`` appends each future), wait for all, return their results in order.

    If any stage fails, the error that caused it is raised (not the ``StageAborted`` of the
    neighbours that stopped because of it). A stage that never started would leave its
    neighbours blocked on a pipe forever, so a failed submission fails every link first.
    """
    futures: list[PrefectFuture[Any]] = []
    try:
        submit(futures)
    except BaseException as exc:
        # Submitted stages may be running: their links are failed in place, not closed under them.
        for link in links:
            link.abort(exc)
        raise
    finally:
        wait(futures)
        for link in links:
            link.close_all()
    errors = []
    for fut in futures:
        if not fut.state.is_completed():
            exc = fut.state.result(raise_on_failure=False)
            errors.append(exc if isinstance(exc, BaseException) else BackupError(f"{fut.task_run_id}: {fut.state.message}"))
    if errors:
        raise root_cause(errors)
    return [f.result() for f in futures]
