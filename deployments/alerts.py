"""Chat alerts as Prefect automations, built from ``[alerts]`` in the settings; idempotent.

Three kinds, each sending to every configured channel (a Prefect notification block):
  * a flow run tagged ``backup`` or ``restore`` ends Failed, Crashed or TimedOut;
  * (not an alert itself) such a run whose heartbeats stopped (its worker or machine died, or was
    killed) is marked Crashed after ``alerts.unresponsive_after``, which the first one reports;
  * a ``luxima.verification.failed`` event (a backup's read-back or a restore's checks);
  * a ``luxima.config.drift`` event: a host's configs changed since the last config backup;
  * the RPO watchdog, per scheduled backup component: no ``luxima.backup.succeeded`` event
    within its window (``alerts.rpo``; 26 h for the daily database backup); and per target (a
    database section, a file source, a config host, a guest) once it has been backed up: one
    failing guest among many that succeed alerts too.
Running setup again updates the blocks and automations in place and never duplicates them;
an automation that is already as wanted is left alone (an update would restart its window).
Messages carry the flow, deployment, state, error and a link to the run; the error text is
the flow's own, which the flows scrub of secrets before raising.
"""

from __future__ import annotations

import re

from datetime import timedelta
from typing import Any
from uuid import UUID

from luxima_backup import events
from luxima_backup.settings import AlertChannel, AlertSettings

from .specs import load_specs

FAILURE_SUBJECT = "[luxima-backup] {{ flow.name }} {{ flow_run.state.name }}: {{ deployment.name | default('no deployment', true) }}"
FAILURE_BODY = (
    "Flow: {{ flow.name }} / run {{ flow_run.name }}\n"
    "Deployment: {{ deployment.name | default('none (run by hand)', true) }}\n"
    "Tags: {{ flow_run.tags | join(', ') }}\n"
    "State: {{ flow_run.state.name }} at {{ flow_run.state.timestamp }}\n"
    "Error: {{ flow_run.state.message | default('n/a', true) | truncate(1500) }}\n"
    "Run: {{ flow_run|ui_url }}"
)
VERIFY_SUBJECT = "[luxima-backup] verification FAILED: {{ event.resource['luxima.component'] }} {{ event.resource['luxima.target'] }}"
VERIFY_BODY = (
    "A {{ event.payload.kind }} of {{ event.resource['luxima.component'] }} {{ event.resource['luxima.target'] }} "
    "failed its verification.\n"
    "Detail: {{ event.payload.detail | truncate(1500) }}\n"
    "Backup: {{ event.payload.backup_id }}\n"
    "Flow: {{ flow.name }} / run {{ flow_run.name }}\n"
    "Run: {{ flow_run|ui_url }}"
)
DRIFT_SUBJECT = "[luxima-backup] config drift on {{ event.resource['luxima.target'] }}"
DRIFT_BODY = (
    "The configs of {{ event.resource['luxima.target'] }} changed since the last config backup "
    "(added {{ event.payload.counts.added }}, changed {{ event.payload.counts.changed }}, "
    "removed {{ event.payload.counts.removed }}, mode/owner {{ event.payload.counts.metadata }}).\n"
    "Paths: {{ event.payload.changes | tojson | truncate(1500) }}\n"
    "Commit: {{ event.payload.commit | default('none', true) }}\n"
    "If nobody meant to change them, look at the commit's diff in the config repository.\n"
    "Run: {{ flow_run|ui_url }}"
)
DRILL_SUBJECT = "[luxima-backup] DR drill overdue"
DRILL_BODY = (
    "{{ event.payload.detail }}.\n"
    "Run the dr-drill deployment (or `luxima-backup dr drill`): the procedure wants one every 6 months; without it "
    "nothing shows that the DR site can bring the platform back within the RTO."
)
HEARTBEAT_EVENT = "prefect.flow-run.heartbeat"
# Runs send heartbeats when this is set in their process (the worker's and serve's environment):
# the Prefect engine's minimum interval, 30 s.
HEARTBEAT_ENV = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}
HELD_SUBJECT = ("[luxima-backup] retention held: {{ event.resource['luxima.component'] }} {{ event.resource['luxima.target'] }}"
                " is failing")
HELD_BODY = (
    "The prune kept every backup of {{ event.resource['luxima.component'] }} {{ event.resource['luxima.target'] }}: "
    "{{ event.payload.why }}.\n"
    "Nothing of it is removed until a backup of it succeeds again; look at its backup runs."
)
RPO_SUBJECT = "[luxima-backup] no successful {component} backup for {window}"
RPO_BODY = (
    "No successful {component} backup (event luxima.backup.succeeded) arrived within {window}, "
    "the RPO window of this component. Checked at {{{{ firing.triggered }}}}.\n"
    "Look at the {component} backup deployment's recent runs in the Prefect UI."
)

RPO_TARGET_SUBJECT = "[luxima-backup] a {component} backup target has had no successful backup for {window}"
RPO_TARGET_BODY = (
    "{{{{ firing.triggering_labels['prefect.resource.id'] }}}} was backed up before, but no successful backup of it "
    "arrived within {window}, the RPO window of {component} backups. Checked at {{{{ firing.triggered }}}}.\n"
    "Its backups are failing or it is no longer selected: look at the {component} backup deployment's recent runs."
)


RPO_ONE_SUBJECT = "[luxima-backup] no successful {component} backup of {target} for {window}"
RPO_ONE_BODY = (
    "No successful backup of {component} {target} (event luxima.backup.succeeded) arrived within {window}, its RPO "
    "window. Checked at {{{{ firing.triggered }}}}.\n"
    "Look at the {component} backup deployment's recent runs; a target that never succeeded alerts from the first window."
)


def notification_block(channel: AlertChannel) -> Any:
    """The Prefect notification block for one channel (not yet saved)."""
    from prefect.blocks.notifications import (
        CustomWebhookNotificationBlock, DiscordWebhook, MicrosoftTeamsWebhook, SlackWebhook,
    )

    url = channel.url.resolve()
    if channel.kind == "slack":
        return SlackWebhook(url=url, notify_type="failure")
    if channel.kind == "teams":
        return MicrosoftTeamsWebhook(url=url, notify_type="failure")
    if channel.kind == "discord":
        # https://discord.com/api/webhooks/<id>/<token>
        parts = url.rstrip("/").split("/")
        return DiscordWebhook(webhook_id=parts[-2], webhook_token=parts[-1], notify_type="failure")
    return CustomWebhookNotificationBlock(
        name=channel.name, url=url, method="POST", headers=channel.headers or None,
        json_data={"source": "luxima-backup", "subject": "{{subject}}", "body": "{{body}}"},
    )


def save_blocks(cfg: AlertSettings) -> dict[str, UUID]:
    """Create or update one notification block per channel; returns their ids by channel name."""
    return {c.name: notification_block(c).save(c.name, overwrite=True) for c in cfg.channels}


def watched_components() -> list[str]:
    """Backup components that run on a schedule (prefect.yaml): each gets an RPO watchdog."""
    found: list[str] = []
    for spec in load_specs():
        if spec.schedules and "backup" in spec.tags:
            found += [t for t in spec.tags if t != "backup" and t not in found]
    return found


def automations(cfg: AlertSettings, block_ids: list[UUID], components: list[str],
                targets: dict[str, list[str]] | None = None) -> list[Any]:
    """The automations wanted for these settings (not yet saved); ``targets``: the configured targets of each
    component, each watched on its own from the start (one that never succeeds is not hidden by another that does)."""
    from prefect.automations import Automation, EventTrigger, Posture, SendNotification

    def notify(subject: str, body: str) -> list[Any]:
        return [SendNotification(block_document_id=b, subject=subject, body=body) for b in block_ids]

    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState

    p = cfg.automation_prefix
    ours = {"prefect.resource.role": "tag",
            "prefect.resource.id": ["prefect.tag.backup", "prefect.tag.restore", "prefect.tag.prune", "prefect.tag.dr"]}
    wanted = [
        Automation(
            name=f"{p}: backup or restore run failed",
            description="A flow run tagged backup, restore, prune or dr ended Failed, Crashed or TimedOut.",
            trigger=EventTrigger(
                expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed", "prefect.flow-run.TimedOut"},
                match={"prefect.resource.id": "prefect.flow-run.*"},
                match_related=ours,
                for_each={"prefect.resource.id"}, posture=Posture.Reactive, threshold=1, within=timedelta(0),
            ),
            actions=notify(FAILURE_SUBJECT, FAILURE_BODY),
        ),
        Automation(
            name=f"{p}: run stopped responding",
            description=f"A backup or restore run sent no heartbeat for {cfg.unresponsive_after}: marked Crashed "
                        "(which alerts). Its process or machine died; nothing else would ever end it.",
            # After a heartbeat, another one (or the run's end) must follow within the window.
            trigger=EventTrigger(
                after={HEARTBEAT_EVENT},
                expect={HEARTBEAT_EVENT, "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                        "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed", "prefect.flow-run.TimedOut"},
                match={"prefect.resource.id": "prefect.flow-run.*"}, match_related=ours,
                for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1, within=cfg.unresponsive_after,
            ),
            actions=[ChangeFlowRunState(
                state=StateType.CRASHED, name="Crashed",
                message=f"no heartbeat for {cfg.unresponsive_after}: the process running it stopped (killed, out of "
                        "memory, or its machine went down); check what it left (luxima-backup list) and run it again",
            )],
        ),
        Automation(
            name=f"{p}: verification failed",
            description="A backup's read-back or a restore's checks failed.",
            trigger=EventTrigger(
                expect={events.VERIFICATION_FAILED}, match={"prefect.resource.id": "luxima.backup.*"},
                for_each={"prefect.resource.id"}, posture=Posture.Reactive, threshold=1, within=timedelta(0),
            ),
            actions=notify(VERIFY_SUBJECT, VERIFY_BODY),
        ),
        Automation(
            name=f"{p}: retention held",
            description="The prune kept every backup of a target whose newest verified backup is past its RPO window.",
            trigger=EventTrigger(
                expect={events.RETENTION_HELD}, match={"prefect.resource.id": "luxima.backup.*"},
                for_each={"prefect.resource.id"}, posture=Posture.Reactive, threshold=1, within=timedelta(0),
            ),
            actions=notify(HELD_SUBJECT, HELD_BODY),
        ),
        Automation(
            name=f"{p}: config drift",
            description="A host's configs changed since the last config backup (configs.drift_alert).",
            trigger=EventTrigger(
                expect={events.CONFIG_DRIFT}, match={"prefect.resource.id": "luxima.backup.configs.*"},
                for_each={"prefect.resource.id"}, posture=Posture.Reactive, threshold=1, within=timedelta(0),
            ),
            actions=notify(DRIFT_SUBJECT, DRIFT_BODY),
        ),
        Automation(
            name=f"{p}: DR drill overdue",
            description="No successful DR drill within dr.drill.overdue_days (6 months + 2 weeks); said once a day.",
            trigger=EventTrigger(
                expect={events.DRILL_OVERDUE}, match={"prefect.resource.id": "luxima.backup.dr.*"},
                posture=Posture.Reactive, threshold=1, within=timedelta(0),
            ),
            actions=notify(DRILL_SUBJECT, DRILL_BODY),
        ),
    ]
    for component in components:
        window = cfg.rpo.get(component)
        if window is None:
            continue
        wanted.append(Automation(
            name=f"{p}: RPO {component}",
            description=f"No successful {component} backup within {window}.",
            # No for_each and no `after`: fixed windows from when the automation is loaded, so a
            # component that never succeeded alerts too; it repeats every window until one does.
            trigger=EventTrigger(
                expect={events.SUCCEEDED}, match={"luxima.component": component},
                posture=Posture.Proactive, threshold=1, within=window,
            ),
            actions=notify(RPO_SUBJECT.format(component=component, window=window),
                           RPO_BODY.format(component=component, window=window)),
        ))
        wanted.append(Automation(
            name=f"{p}: RPO {component} per target",
            description=f"A {component} target (a database, a host, a guest) backed up before has had no successful "
                        f"backup within {window}, while others may have.",
            # After each target's success, another must follow within the window (one watch per target).
            trigger=EventTrigger(
                after={events.SUCCEEDED}, expect={events.SUCCEEDED},
                match={"prefect.resource.id": f"luxima.backup.{component}.*", "luxima.watch": "!own"},
                for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1, within=window,
            ),
            actions=notify(RPO_TARGET_SUBJECT.format(component=component, window=window),
                           RPO_TARGET_BODY.format(component=component, window=window)),
        ))
        for target in sorted((targets or {}).get(component, [])):
            wanted.append(Automation(
                name=f"{p}: RPO {component}/{target}",
                description=f"No successful {component} backup of {target} within {window}.",
                trigger=EventTrigger(
                    expect={events.SUCCEEDED}, match={"prefect.resource.id": f"luxima.backup.{component}.{target}"},
                    posture=Posture.Proactive, threshold=1, within=window,
                ),
                actions=notify(RPO_ONE_SUBJECT.format(component=component, target=target, window=window),
                               RPO_ONE_BODY.format(component=component, target=target, window=window)),
            ))
    return wanted


def upsert(desired: Any) -> tuple[Any, str]:
    """Create ``desired`` or update the automation of the same name; extra duplicates are removed."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(desired.name)  # newest first
        if not existing:
            return desired.create(), "created"
        current, *duplicates = existing
        for extra in duplicates:
            client.delete_automation(extra.id)
    keep = {"id", "owner_resource"}
    if current.model_dump(exclude=keep) == desired.model_dump(exclude=keep):
        return current, "unchanged"
    desired.id = current.id
    desired.update()
    return desired, "updated"


def setup_alerts(cfg: AlertSettings, components: list[str] | None = None,
                 targets: dict[str, list[str]] | None = None) -> dict[str, str]:
    """Save the channels' blocks and upsert the automations; the RPO watches of targets no longer configured are
    removed (a target taken out of the settings must not alert forever). Returns what happened to each."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import AutomationSort

    if not cfg.channels:
        return {}
    block_ids = list(save_blocks(cfg).values())
    result: dict[str, str] = {}
    wanted = automations(cfg, block_ids, watched_components() if components is None else components, targets)
    for automation in wanted:
        _, what = upsert(automation)
        result[automation.name] = what
    if targets is not None:
        names = {a.name for a in wanted}
        per_target = re.compile(rf"^{re.escape(cfg.automation_prefix)}: RPO [^/ ]+/.+$")
        with get_client(sync_client=True) as client:
            # (Prefect 3.8.8's client needs sort and limit spelt out: the server refuses nulls)
            for existing in client.read_automations(sort=AutomationSort.NAME_ASC, limit=200, offset=0):
                if per_target.match(existing.name) and existing.name not in names:
                    client.delete_automation(existing.id)
                    result[existing.name] = "removed"
    return result
