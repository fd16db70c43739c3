"""Register the deployments of ``prefect.yaml`` on a Prefect server, and run workers for them.

`luxima-backup deploy` makes sure the process work pool exists, then runs `prefect deploy --all`
in the project root (non-interactively). Deployments are updated in place on every run.
`luxima-backup worker` starts a process worker on that pool with the environment the flow
runs need (the project's home for the pull step, the settings file).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from luxima_backup.errors import ConfigError

from .specs import PROJECT_ROOT, load_specs

HOME_ENV = "LUXIMA_BACKUP_HOME"


def work_pools() -> set[str]:
    return {s.work_pool for s in load_specs() if s.work_pool}


def ensure_work_pool(name: str) -> bool:
    """Create the process work pool ``name`` if missing; True when it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process",
                                                   description="Luxima Backup flow runs (process worker)"))
            return True
    if pool.type != "process":
        raise ConfigError(f"work pool {name!r} exists with type {pool.type!r}; the deployments need a process pool",
                          hint="delete it or point prefect.yaml at another pool")
    return False


def _prefect() -> str:
    return str(Path(sys.executable).parent / "prefect")


def deploy_all() -> list[str]:
    """Create missing work pools, then `prefect deploy --all`; returns the deployment names."""
    for pool in sorted(work_pools()):
        ensure_work_pool(pool)
    # Prefect's own `prefect deploy --all` (it reads prefect.yaml), run in a subprocess through
    # luxima_backup.prefect_compat, which carries a work-around for a Prefect 3.8.8 client bug.
    code = ("import sys; from luxima_backup.prefect_compat import run_prefect_cli; "
            "sys.exit(run_prefect_cli(['--no-prompt', 'deploy', '--all']))")
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=worker_env(),
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ConfigError(f"prefect deploy --all failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return [s.name for s in load_specs()]


def worker_command(pool: str, limit: int | None = None, name: str | None = None) -> list[str]:
    cmd = [_prefect(), "worker", "start", "--pool", pool, "--type", "process"]
    if limit:
        cmd += ["--limit", str(limit)]
    if name:
        cmd += ["--name", name]
    return cmd


def worker_env() -> dict[str, str]:
    """This process's environment, plus the Prefect API in use, the project's home, and heartbeats for the runs
    (the alerts mark a run whose heartbeats stop Crashed: a killed worker otherwise leaves it Running forever)."""
    from prefect.settings import PREFECT_API_URL

    from .alerts import HEARTBEAT_ENV

    env = {**HEARTBEAT_ENV, **os.environ}
    env.setdefault(HOME_ENV, str(PROJECT_ROOT))
    if PREFECT_API_URL.value():  # set in-process (profile, temporary settings) rather than in the environment
        env["PREFECT_API_URL"] = str(PREFECT_API_URL.value())
    return env
