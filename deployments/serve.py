"""Serve every deployment from one long-running process, with no work pool or worker.

For small installations: `luxima-backup serve` registers the deployments of ``prefect.yaml``
(same names, schedules, tags and concurrency limits) and runs their flow runs itself until
stopped. Running it again updates the deployments in place; it never duplicates them.
"""

from __future__ import annotations

from typing import Any

from .specs import DeploymentSpec, load_specs


def runner_deployments(specs: list[DeploymentSpec] | None = None) -> list[Any]:
    from prefect.schedules import Cron

    out = []
    for spec in specs if specs is not None else load_specs():
        out.append(spec.load_flow().to_deployment(
            name=spec.name, description=spec.description or None, tags=list(spec.tags),
            concurrency_limit=spec.concurrency_limit, parameters=spec.parameters or None,
            schedules=[Cron(s.cron, timezone=s.timezone) for s in spec.schedules] or None,
        ))
    return out


def take_over_from_work_pools(specs: list[DeploymentSpec]) -> list[str]:
    """Delete deployments of these names that a work pool runs, so this process can serve them.

    A deployment registered by `luxima-backup deploy` keeps its work pool and pull steps when
    re-registered by `serve`, and its runs would be set up for a worker. Serving is a choice of
    how to run them, made by starting this command; the schedules come back with the served
    deployments. Returns the names replaced.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    replaced = []
    with get_client(sync_client=True) as client:
        for spec in specs:
            name = f"{spec.flow_name}/{spec.name}"
            try:
                existing = client.read_deployment_by_name(name)
            except ObjectNotFound:
                continue
            if existing.work_pool_name:
                client.delete_deployment(existing.id)
                replaced.append(f"{name} (was on work pool {existing.work_pool_name})")
    return replaced


def serve_all(limit: int | None = None) -> None:
    """Register and serve all deployments; blocks until interrupted."""
    import os

    from prefect import serve

    from .alerts import HEARTBEAT_ENV

    for name, value in HEARTBEAT_ENV.items():  # the runs' processes inherit it: see deploy.worker_env
        os.environ.setdefault(name, value)
    specs = load_specs()
    for name in take_over_from_work_pools(specs):
        print(f"serve: taking over deployment {name}", flush=True)
    serve(*runner_deployments(specs), limit=limit)
