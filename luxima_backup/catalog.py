"""The backup catalogue, read from the manifests in storage alone (no database, no Prefect).

This is what restores and the break-glass commands use to find a backup: when the database
and its log are gone, the manifests beside the backups are still there.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Iterator

from . import manifest
from .errors import ConfigError, FormatError, ObjectNotFound
from .manifest import Manifest
from .storage import ObjectStore

if TYPE_CHECKING:
    from .settings import Settings


@dataclass(frozen=True)
class Backup:
    """One backup as its manifest describes it."""

    manifest_key: str
    manifest: Manifest

    @property
    def backup_id(self) -> str:
        return self.manifest.backup_id

    @property
    def component(self) -> str:
        return self.manifest.component

    @property
    def status(self) -> str:
        return self.manifest.status

    @property
    def completed_at(self) -> datetime:
        return self.manifest.completed_at

    @property
    def data_key(self) -> str:
        return str(self.manifest.brief()["object_key"])

    @property
    def verified(self) -> bool:
        return self.manifest.verified

    @property
    def source_name(self) -> str | None:
        """The settings section it was taken of (``[databases.NAME]``, a file source, a config host)."""
        return self.manifest.source.name


def by_target(store: ObjectStore, prefix: str, component: str) -> tuple[dict[str, list[Backup]], list[Unreadable]]:
    """Every backup of ``component`` grouped by its target (oldest first), and the manifests that could not be read.

    A backup's target is the section its manifest names; manifests written before they named it are filed under it.
    """
    found: dict[str, list[Backup]] = {}
    unreadable: list[Unreadable] = []
    for b in iter_backups(store, prefix, component):
        if isinstance(b, Backup):
            name = b.source_name or b.manifest_key[len(prefix) + len(component) + 2:].split("/", 1)[0]
            found.setdefault(name, []).append(b)
        else:
            unreadable.append(b)
    return {k: sorted(v, key=lambda b: (b.completed_at, b.backup_id)) for k, v in found.items()}, unreadable


def list_backups(store: ObjectStore, prefix: str, component: str, source: str | None = None,
                 also_under: list[str] | tuple[str, ...] = ()) -> list[Backup]:
    """Every backup of ``component`` (optionally of one source), oldest first.

    Manifests that cannot be read are left out; ``iter_backups`` also yields their errors.
    """
    backups = [b for b in iter_backups(store, prefix, component, source, also_under) if isinstance(b, Backup)]
    return sorted(backups, key=lambda b: (b.completed_at, b.backup_id))


def legacy_folders(settings: Settings, component: str, source: str | None) -> list[str]:
    """The folders a source's backups were filed under before backups were filed by section (``also_under``):
    a database's, by its database name."""
    if component == "db" and source in settings.databases:
        return [settings.databases[source].dbname]
    return []


@dataclass(frozen=True)
class Unreadable:
    """A manifest that could not be read (damaged, foreign, misfiled): never offered as a backup; reported."""

    manifest_key: str
    folder: str  # the target folder it was found in
    error: FormatError

    def __str__(self) -> str:
        return str(self.error)


def iter_backups(store: ObjectStore, prefix: str, component: str, source: str | None = None,
                 also_under: list[str] | tuple[str, ...] = ()) -> Iterator[Backup | Unreadable]:
    """Each manifest under ``<prefix>/<component>/[<source>/]`` as a ``Backup``, or ``Unreadable`` with the reason.

    With a ``source``, only backups whose manifest names that source are yielded, also from the folders
    ``also_under``: database backups were once filed by database name (``db/postgres/``), which several
    ``[databases.NAME]`` can share, and their manifests say which section each was taken of.
    """
    folders = [f"{manifest.safe_name(d)}/" for d in dict.fromkeys([source, *also_under]) if d] if source else [""]
    for folder in folders:
        for key in manifest.iter_manifest_keys(store, f"{prefix}/{component}/{folder}"):
            where = key[len(prefix) + len(component) + 2:].split("/", 1)[0]
            try:
                backup = Backup(key, manifest.load(store, key))
            except FormatError as exc:
                yield Unreadable(key, where, exc)
                continue
            except ObjectNotFound:  # removed by retention while listing
                continue
            if backup.component != component:  # misfiled: never offered as a backup of this component
                yield Unreadable(key, where, FormatError(f"manifest {key} is of a {backup.component} backup, filed under {component}/"))
                continue
            if source is None or backup.source_name in (None, source):
                yield backup


def resolve(store: ObjectStore, prefix: str, component: str, spec: str, source: str | None = None,
            as_of: datetime | None = None, also_under: list[str] | tuple[str, ...] = ()) -> Backup:
    """The backup an operator means by ``spec``: ``latest``, a backup id, or an object key.

    ``latest`` is the newest *verified* backup completed at or before ``as_of`` (default now);
    backups whose manifest says anything but verified are never chosen by ``latest``. A backup named by id or
    key that was taken of another source than ``source`` is refused.
    """
    spec = spec.strip()
    if spec == "latest":
        cutoff = as_of.astimezone(timezone.utc) if as_of else datetime.now(timezone.utc)
        candidates = [b for b in list_backups(store, prefix, component, source, also_under)
                      if b.verified and b.completed_at <= cutoff]
        if not candidates:
            scope = f" of {source}" if source else ""
            when = f" completed by {cutoff.isoformat()}" if as_of else ""
            raise ConfigError(f"no verified {component} backup{scope}{when} under {prefix}/{component}/",
                              hint="check storage settings, the source name, or `luxima-backup list`")
        return candidates[-1]
    if as_of is not None:
        raise ConfigError("as_of applies only to backup = 'latest'", hint="leave as_of empty when naming a backup")
    if "/" in spec:  # an object key: the manifest itself, or one of the backup's objects
        key = spec if spec.endswith(manifest.MANIFEST_SUFFIX) else manifest.manifest_key_for(spec)
        try:
            found = Backup(key, manifest.load(store, key))
        except ObjectNotFound:
            raise ConfigError(f"no manifest {key} for {spec!r}",
                              hint="a backup without a manifest did not complete; choose another with `luxima-backup list`") from None
        if found.component != component:
            raise ConfigError(f"{spec} is a {found.component} backup, not a {component} one",
                              hint=f"use the {found.component} command, or name a {component} backup")
        return _of_source(found, source)
    for backup in list_backups(store, prefix, component, source, also_under):
        if backup.backup_id == spec:
            return backup
    for backup in list_backups(store, prefix, component):
        if backup.backup_id == spec:
            return _of_source(backup, source)
    raise ConfigError(f"no {component} backup with id {spec!r} under {prefix}/{component}/",
                      hint="use `latest`, an id shown by `luxima-backup list`, or an object key")


def _of_source(backup: Backup, source: str | None) -> Backup:
    """``backup``, unless it was taken of another source than the one asked for."""
    if source is not None and backup.source_name not in (None, source):
        raise ConfigError(f"backup {backup.backup_id} was taken of {backup.source_name!r}, not of {source!r}",
                          hint=f"to restore it, name its source ({backup.source_name!r}); to restore {source!r}, "
                               f"choose one of its backups with `luxima-backup list --source {source}`")
    return backup
