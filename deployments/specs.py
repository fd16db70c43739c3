"""The deployments, read from ``prefect.yaml``: one list for `prefect deploy` and for `serve` alike.

``prefect.yaml`` stays the single place where names, schedules, tags and concurrency are set;
``serve`` builds the same deployments from it, so the two ways of running never drift apart.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from luxima_backup.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PREFECT_YAML = PROJECT_ROOT / "prefect.yaml"


@dataclass(frozen=True)
class Schedule:
    cron: str
    timezone: str = "UTC"


@dataclass(frozen=True)
class DeploymentSpec:
    name: str
    entrypoint: str                      # "flows/db_backup.py:db_backup"
    description: str = ""
    tags: tuple[str, ...] = ()
    concurrency_limit: int | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    schedules: tuple[Schedule, ...] = ()
    work_pool: str | None = None

    @property
    def flow_name(self) -> str:
        return self.load_flow().name

    def load_flow(self) -> Any:
        """The flow object the entrypoint names (``flows/x.py:fn`` -> module ``flows.x``)."""
        path, _, attr = self.entrypoint.partition(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        return getattr(module, attr)


def load_specs(path: Path = PREFECT_YAML) -> list[DeploymentSpec]:
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    specs = []
    for d in doc.get("deployments") or []:
        specs.append(DeploymentSpec(
            name=d["name"], entrypoint=d["entrypoint"], description=str(d.get("description") or "").strip(),
            tags=tuple(d.get("tags") or ()), concurrency_limit=d.get("concurrency_limit"),
            parameters=dict(d.get("parameters") or {}),
            schedules=tuple(Schedule(s["cron"], s.get("timezone", "UTC")) for s in d.get("schedules") or [] if "cron" in s),
            work_pool=(d.get("work_pool") or {}).get("name"),
        ))
    return specs
