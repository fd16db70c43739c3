"""The status flow (hourly): every target's last good backup against its RPO, as a table in the Prefect UI.

The same report as `luxima-backup status`, which needs no Prefect server; this one also says when
each target's backup deployment runs next (its earliest scheduled run on the server).
"""

from __future__ import annotations

from datetime import datetime, timezone
from zoneinfo import ZoneInfo
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from luxima_backup import events, runtime
from luxima_backup.errors import VerificationError
from luxima_backup.status import TargetStatus, age_text, collect, drill_status, drill_text
from flows.common import flow

REMINDER_HOUR = 9  # local time (retention.timezone) of the daily reminder that the DR drill is overdue
# the backup deployment of each component (prefect.yaml)
DEPLOYMENT = {"db": "db-backup", "files": "files-backup", "configs": "config-backup", "vm": "vm-backup"}


def next_runs() -> dict[str, str]:
    """When each component's backup deployment runs next: its earliest scheduled flow run on the Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter, DeploymentFilterName, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    out = {}
    with get_client(sync_client=True) as client:
        for component, name in DEPLOYMENT.items():
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=1, offset=0)
            if runs and runs[0].expected_start_time:
                out[component] = runs[0].expected_start_time.isoformat(timespec="minutes")
    return out


def rows(statuses: list[TargetStatus], nexts: dict[str, str]) -> list[dict[str, Any]]:
    return [{"component": s.component, "target": s.target,
             "state": "BEYOND RPO" if s.beyond_rpo else "ok",
             "last success": s.last_success.isoformat(timespec="minutes") if s.last_success else "never",
             "age": age_text(s.age_hours), "RPO": age_text(s.rpo_hours) if s.rpo_hours else "-",
             "kept": s.kept, "MiB stored": round(s.bytes_stored / 2**20, 1),
             "chain": s.chain_length if s.chain_length is not None else "",
             "oldest kept": s.oldest_kept.isoformat(timespec="minutes") if s.oldest_kept else "",
             "locked until": s.locked_until.isoformat(timespec="minutes") if s.locked_until else "",
             "unreadable manifests": s.unreadable or "", "next run": nexts.get(s.component, "")}
            for s in statuses]


@flow(name="status", validate_parameters=True, persist_result=True)
def status(fail_beyond_rpo: bool = False) -> dict[str, Any]:
    """Report every backup target's last good backup, its age against the RPO, what is kept, and the next run.

    Args:
        fail_beyond_rpo: end the run Failed (which alerts) when a target is beyond its RPO.
    """
    settings = runtime.settings()
    now = datetime.now(timezone.utc)
    statuses = collect(settings, now)
    table = rows(statuses, next_runs())
    create_table_artifact(key="backup-status", table=table, description="Every backup target against its RPO")
    late = [f"{s.component}/{s.target}" for s in statuses if s.beyond_rpo]
    drill = drill_status(settings, now)
    create_markdown_artifact(
        key="backup-status-summary", description="Backup status",
        markdown=f"## Backup status at {now.isoformat(timespec='minutes')}\n\n"
                 + (f"**Beyond the RPO:** {', '.join(late)}" if late else "Every target is within its RPO.")
                 + (f"\n\n{drill_text(drill, now)}" if drill is not None else ""))
    get_run_logger().info("%d target(s), %d beyond the RPO%s", len(statuses), len(late), f": {', '.join(late)}" if late else "")
    overdue = drill is not None and drill.overdue
    if overdue:
        get_run_logger().warning("%s", drill_text(drill, now))
        # the status runs hourly: the reminder goes out once a day, in the morning where the operators are
        if now.astimezone(ZoneInfo(settings.retention.timezone)).hour == REMINDER_HOUR:
            events.drill_overdue(drill_text(drill, now), **drill.as_json())
    if (late or overdue) and fail_beyond_rpo:
        raise VerificationError("; ".join(([f"beyond the RPO: {', '.join(late)}"] if late else [])
                                          + ([f"the DR drill is overdue: {drill_text(drill, now)}"] if overdue else [])))
    return {"targets": [s.as_json() for s in statuses], "beyond_rpo": late,
            "drill": drill.as_json() if drill is not None else None}
