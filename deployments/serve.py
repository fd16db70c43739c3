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


def serve_all(limit: int | None = None) -> None:
    """Register and serve all deployments; blocks until interrupted."""
    from prefect import serve

    serve(*runner_deployments(), limit=limit)
