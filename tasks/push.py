"""Push stage of the config backup: our branch to the remote, rebased on others' commits when rejected, never forced."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from luxima_backup import runtime
from tasks.commit import open_repo


@task(name="push", cache_policy=NO_CACHE, persist_result=False, **runtime.TRANSIENT_RETRIES)
def push() -> dict[str, Any]:
    """Push the config commits to the remote (a no-op when there is nothing to push)."""
    settings = runtime.settings()
    logger = get_run_logger()
    with open_repo(settings) as repo:
        if not settings.configs.git.remote:
            logger.warning("configs.git.remote is not set: the config commits stay in %s", repo.path)
            return {"pushed": False, "attempts": 0, "rebased": 0, "commits": 0, "head": repo.head()}
        repo.fetch()
        waiting = repo.unpushed()
        if waiting == 0:
            return {"pushed": False, "attempts": 0, "rebased": 0, "commits": 0, "head": repo.head()}
        result = repo.push()
        logger.info("pushed %d commit(s) to %s %s%s", waiting, settings.configs.git.remote, settings.configs.git.branch,
                    f" after rebasing {result['rebased']} time(s) on others' commits" if result["rebased"] else "")
        return {**result, "commits": waiting, "head": repo.head()}
