"""Events the flows emit for automations: the RPO watchdog listens for successes, alerts for failed checks.

Resources are named ``luxima.backup.<component>.<target>`` and labelled with the component and
target, so one automation can watch every target of a component (``for_each`` the resource).
Emitted inside a flow run, each event is related to that run, its flow and deployment.
"""

from __future__ import annotations

import logging
from typing import Any

from .secrets import redact

SUCCEEDED = "luxima.backup.succeeded"
RESTORED = "luxima.restore.succeeded"
VERIFICATION_FAILED = "luxima.verification.failed"
CONFIG_DRIFT = "luxima.config.drift"
RETENTION_HELD = "luxima.retention.held"
DRILL_SUCCEEDED = "luxima.dr.drill.succeeded"
DRILL_FAILED = "luxima.dr.drill.failed"
DRILL_OVERDUE = "luxima.dr.drill.overdue"

log = logging.getLogger(__name__)


def resource(component: str, target: str) -> dict[str, str]:
    return {
        "prefect.resource.id": f"luxima.backup.{component}.{target}",
        "prefect.resource.name": f"{component} backup of {target}",
        "luxima.component": component,
        "luxima.target": target,
        # "own": the settings name this target, and it has an RPO watch of its own; the shared per-target watch
        # (targets found at run time: VMs of a pool) leaves it out, so one late target alerts once
        "luxima.watch": "own" if _configured(component, target) else "shared",
    }


def _configured(component: str, target: str) -> bool:
    try:
        from .runtime import settings
        from .status import configured

        return target in configured(settings()).get(component, set())
    except Exception:  # no settings here (a test, a bare emit): nothing is watched on its own
        return False


def redacted(value: Any) -> Any:
    """``value`` with every registered secret scrubbed from its strings, as logs are: events reach chat."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redacted(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redacted(v) for v in value]
    return value


def _logger() -> Any:
    """The run's logger inside a flow or task run (its messages reach the Prefect UI), else this module's."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return log


def _emit(event: str, component: str, target: str, payload: dict[str, Any]) -> None:
    """Send one event. One that cannot be sent never changes a backup's outcome, but is logged as an error
    where the operator looks (the run's log): the alerts and the RPO watchdog it feeds would stay silent."""
    from prefect.events import emit_event
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE

    if not PREFECT_API_URL.value() and not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value():
        # Prefect would queue it for a temporary server it may not start, and drop it later, unsaid
        _logger().error("could not emit %s for %s %s, so no alert or RPO check sees it: no Prefect API is set "
                        "(PREFECT_API_URL) and a temporary server is not allowed", event, component, target)
        return
    try:
        sent = emit_event(event=event, resource=resource(component, target), payload=redacted(payload))
    except Exception as exc:
        _logger().error("could not emit %s for %s %s, so no alert or RPO check sees it: %s", event, component, target,
                        redact(str(exc)))
        return
    if sent is None:
        _logger().error("could not emit %s for %s %s, so no alert or RPO check sees it: this process has no Prefect "
                        "events client (is PREFECT_API_URL set?)", event, component, target)


def backup_succeeded(component: str, target: str, backup_id: str, **payload: Any) -> None:
    _emit(SUCCEEDED, component, target, {"backup_id": backup_id, **payload})


def restore_succeeded(component: str, target: str, backup_id: str, **payload: Any) -> None:
    _emit(RESTORED, component, target, {"backup_id": backup_id, **payload})


def is_verification_failure(exc: BaseException) -> bool:
    """Whether ``exc`` means stored or restored data did not check out: a mismatch against the manifest, or data
    that failed authentication or its checksum when read (a damaged read-back is the verify failing too)."""
    from .errors import IntegrityError, VerificationError

    return isinstance(exc, (VerificationError, IntegrityError))


def verification_failed(kind: str, component: str, target: str, detail: str, **payload: Any) -> None:
    _emit(VERIFICATION_FAILED, component, target, {"kind": kind, "detail": detail, **payload})


def config_drift(host: str, changes: dict[str, list[str]], commit: str | None) -> None:
    """A host's configs changed since the last backup (paths only, never content)."""
    listed = {k: v[:50] for k, v in changes.items() if v}
    _emit(CONFIG_DRIFT, "configs", host, {"changes": listed, "counts": {k: len(v) for k, v in changes.items()},
                                           "commit": commit})


def retention_held(component: str, target: str, why: str) -> None:
    """A prune left a target alone because its backups are failing (its newest verified one is past the RPO)."""
    _emit(RETENTION_HELD, component, target, {"why": why})


def drill_finished(target: str, ok: bool, **payload: Any) -> None:
    """A DR drill's outcome, on the resource of the DR target it restored from."""
    _emit(DRILL_SUCCEEDED if ok else DRILL_FAILED, "dr", target, payload)


def drill_overdue(text: str, **payload: Any) -> None:
    """No successful DR drill within dr.drill.overdue_days (the status flow says so once a day)."""
    _emit(DRILL_OVERDUE, "dr", "drill", {"detail": text, **payload})
