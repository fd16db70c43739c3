"""A work-around for a Prefect 3.8.8 client call that the pinned server rejects.

``read_workers_for_work_pool`` sends ``"limit": null, "offset": null``; the server's endpoint
(with fastapi 0.154, the newest Prefect 3.8.8 starts with) validates them as integers and
answers 422. `prefect deploy`, ``Flow.deploy`` and workers' hints all call it, after the
deployment is created, so the first deployment registers and the command then fails.
``apply()`` fills in the server's own defaults; it is a no-op once the call passes them itself.
Drop this module when Prefect is upgraded past the bug.

``quick_heartbeat_exit()``: a second one, for speed. A sync flow run's heartbeat thread sleeps in
1 s steps, and the engine joins it when the run's function returns: every flow run (and every
subflow) waited 0.5 s on average, up to 1 s, after its work was done (measured: 1.5 s of a small
CLI backup's 2.3 s in the flow engine). Prefect's own async engine does not join that thread
(``join_on_exit=False``); nor do ours now. Safe because the thread checks the stop flag after each
1 s step and the run's state before each heartbeat, and the final state is set before the
heartbeat context ends: a stopped thread sends nothing more (a heartbeat after the end would
start the "stopped responding" alert's window).
"""

from __future__ import annotations

import functools
from typing import Any

DEFAULT_LIMIT = 200
_applied = False


def apply() -> None:
    global _applied
    if _applied:
        return
    from prefect.client.orchestration._work_pools.client import WorkPoolAsyncClient, WorkPoolClient

    sync_read = WorkPoolClient.read_workers_for_work_pool
    async_read = WorkPoolAsyncClient.read_workers_for_work_pool

    @functools.wraps(sync_read)
    def read_sync(self: Any, work_pool_name: str, worker_filter: Any = None, offset: int | None = None,
                  limit: int | None = None) -> Any:
        return sync_read(self, work_pool_name, worker_filter, offset or 0, limit or DEFAULT_LIMIT)

    @functools.wraps(async_read)
    async def read_async(self: Any, work_pool_name: str, worker_filter: Any = None, offset: int | None = None,
                         limit: int | None = None) -> Any:
        return await async_read(self, work_pool_name, worker_filter, offset or 0, limit or DEFAULT_LIMIT)

    WorkPoolClient.read_workers_for_work_pool = read_sync  # type: ignore[method-assign]
    WorkPoolAsyncClient.read_workers_for_work_pool = read_async  # type: ignore[method-assign]
    _applied = True


def run_prefect_cli(args: list[str]) -> int:
    """Run Prefect's own CLI in this process, with the work-around applied; returns its exit code."""
    import sys

    apply()
    from prefect.cli import app

    sys.argv = ["prefect", *args]  # Prefect's CLI entry point reads its arguments from argv
    try:
        app()
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0


def quick_heartbeat_exit() -> None:
    """Let a sync flow run end without waiting for its heartbeat thread's current 1 s sleep."""
    from prefect import flow_engine

    send = flow_engine._send_heartbeats
    if getattr(send, "_luxima_no_join", False):
        return

    @functools.wraps(send)
    def no_join(engine: Any, join_on_exit: bool = True) -> Any:
        return send(engine, join_on_exit=False)

    no_join._luxima_no_join = True  # type: ignore[attr-defined]
    flow_engine._send_heartbeats = no_join  # type: ignore[assignment]
