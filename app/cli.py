"""The ``luxima-backup`` command: run flows and operator tasks from a shell; every run goes through Prefect."""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import typer

from luxima_backup.errors import BackupError, ConfigError
from luxima_backup.settings import CONFIG_ENV, Settings, load_settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Backup, restore and disaster recovery of the Luxima Core Platform.")
backup_app = typer.Typer(no_args_is_help=True, help="Run a backup now.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect the settings.")
keys_app = typer.Typer(no_args_is_help=True, help="Key management helpers.")
app.add_typer(backup_app, name="backup")
app.add_typer(config_app, name="config")
app.add_typer(keys_app, name="keys")
dr_app = typer.Typer(no_args_is_help=True, help="Disaster recovery: copies of the backups at the DR site.")
app.add_typer(dr_app, name="dr")
catalog_app = typer.Typer(no_args_is_help=True, help="The authenticated backup catalog (signed manifests and their index).")
app.add_typer(catalog_app, name="catalog")
alerts_app = typer.Typer(no_args_is_help=True, help="Chat alerts (Prefect automations).")
app.add_typer(alerts_app, name="alerts")
restore_app = typer.Typer(no_args_is_help=True, help="Restore a backup (runs with or without a Prefect server).")
app.add_typer(restore_app, name="restore")
storage_app = typer.Typer(no_args_is_help=True, help="The backup storage.")
app.add_typer(storage_app, name="storage")

ConfigOpt = typer.Option(None, "--config", "-c", help=f"settings file (default: ${CONFIG_ENV})", envvar=CONFIG_ENV)


def _use_config(path: Optional[Path]) -> None:
    if path is not None:
        os.environ[CONFIG_ENV] = str(path.expanduser().resolve())


RecoveryKeyOpt = typer.Option(None, "--recovery-key", help="break-glass: read the backups with this offline recovery "
                              "private key alone (Vault gone); the catalog is checked with it too, nothing is written")


def _break_glass(recovery_key: Optional[Path]) -> None:
    """Restores with the offline recovery key alone: the key provider (Vault) is not used at all."""
    if recovery_key is not None:
        from luxima_backup.settings import ENV_PREFIX

        os.environ[f"{ENV_PREFIX}KEYS__RECOVERY_PRIVATE_KEY"] = str(recovery_key.expanduser().resolve())


# Well-known variables that hold credentials whatever the settings say.
_SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "VAULT_TOKEN", "PGPASSWORD")


def _secret_variables(value: Any) -> set[str]:
    """The environment variables the settings read secrets from (``env:NAME`` references), at any depth."""
    from pydantic import BaseModel

    from luxima_backup.secrets import SecretRef

    if isinstance(value, SecretRef):
        return {value.target} if value.scheme == "env" else set()
    if isinstance(value, BaseModel):
        return set().union(*(_secret_variables(getattr(value, f)) for f in type(value).model_fields))
    if isinstance(value, dict):
        return set().union(*(_secret_variables(v) for v in value.values()))
    if isinstance(value, (list, tuple)):
        return set().union(*(_secret_variables(v) for v in value))
    return set()


def _ready_to_run(settings: Settings) -> None:
    """Without a Prefect server configured, start the temporary one now, without this process's secrets.

    Prefect starts it on first use with a copy of the whole environment: the database password, S3
    keys and Vault credentials that the settings read from ``env:`` would sit in a server process that
    needs none of them. Started here with those variables left out, it is the one Prefect then uses.
    """
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return
    from prefect.server.api.server import SubprocessASGIServer

    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    names = _secret_variables(settings) | set(_SECRET_VARIABLES)
    hidden = {name: os.environ.pop(name) for name in names if name in os.environ}
    # A first start creates the server's database: Prefect's 20 s are too few on a busy machine, which is
    # when a break-glass restore runs. An operator's own setting wins.
    wait = {} if "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in os.environ else {
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: max(120, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())}
    try:
        with temporary_settings(updates=wait):
            SubprocessASGIServer().start()
    finally:
        os.environ.update(hidden)


def _targets(settings: Settings) -> dict[str, list[str]]:
    """The configured backup targets, each watched by its own RPO alert."""
    from luxima_backup.status import configured

    return {component: sorted(names) for component, names in configured(settings).items()}


def _fail(exc: BaseException) -> None:
    from luxima_backup.secrets import redact

    typer.echo(f"error: {redact(str(exc))}", err=True)
    raise typer.Exit(2 if isinstance(exc, ConfigError) else 1)


def _run_flow(module: str, name: str, tags: tuple[str, str], **parameters: Any) -> None:
    """Run a flow here, now, as its deployment would (same tags: alerts match on them); print its summary as JSON.

    The settings are checked first, so wrong settings stop the command before any flow run exists.
    """
    import importlib

    try:
        _ready_to_run(load_settings())
        summary = _run_tagged(getattr(importlib.import_module(module), name), tags, parameters)
    except BackupError as exc:
        _fail(exc)
    typer.echo(json.dumps(summary, indent=2, default=str))


def _run_tagged(flow_fn: Any, tags: tuple[str, ...], parameters: dict[str, Any]) -> Any:
    """Run the flow with ``tags`` on its flow run alone, as a deployment's run carries them.

    Called under ``prefect.tags(...)`` instead, every task run would inherit the tags, and a tagged task asks
    the server for its tags' concurrency slots as it starts: the four stages of a stream starting at once
    collide in a SQLite-backed server ("database is locked", answered 503), and the client backs off 1-2 s
    per backup (measured: most CLI backups lost that).
    """
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow
    from prefect.states import Pending

    with get_client(sync_client=True) as client:
        run = client.create_flow_run(flow_fn, parameters=flow_fn.serialize_parameters(parameters), state=Pending(), tags=list(tags))
    return run_flow(flow_fn, flow_run=run, parameters=parameters)


@backup_app.command("db")
def backup_db(
    database: Optional[str] = typer.Option(None, help="which [databases.NAME] to back up (default: db_backup.database)"),
    deep_verify: Optional[bool] = typer.Option(None, "--deep-verify/--no-deep-verify", help="override db_backup.deep_verify"),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Back up a PostgreSQL database now (the db-backup flow)."""
    _use_config(config)
    _run_flow("flows.db_backup", "db_backup", ("backup", "db"), database=database, deep_verify=deep_verify)


@backup_app.command("files")
def backup_files(
    source: list[str] = typer.Option([], help="which [files_backup.sources.NAME] (repeatable; default: all)"),
    full: bool = typer.Option(False, "--full", help="write a full archive even when an incremental one is due"),
    allow_shrink: bool = typer.Option(False, "--allow-shrink", help="accept a source that lost more files than its threshold"),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Back up file sources now (the files-backup flow)."""
    _use_config(config)
    _run_flow("flows.files_backup", "files_backup", ("backup", "files"), sources=source or None, full=full,
              allow_shrink=allow_shrink)


@backup_app.command("configs")
def backup_configs(
    host: list[str] = typer.Option([], help="which [configs.hosts.NAME] (repeatable; default: all)"),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Back up service configs now: git commit & push (secrets redacted), encrypted archive (the config-backup flow)."""
    _use_config(config)
    _run_flow("flows.config_backup", "config_backup", ("backup", "configs"), hosts=host or None)


@backup_app.command("vms")
def backup_vms(
    guest: list[str] = typer.Option([], help="vmid or name of a guest (repeatable; default: vm_backup.guests, pools or all)"),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Back up Proxmox guests now with vzdump, verified, the newest good archives kept (the vm-backup flow)."""
    _use_config(config)
    _run_flow("flows.vm_backup", "vm_backup", ("backup", "vm"), guests=guest or None)


@backup_app.command("images")
def backup_images(
    host: list[str] = typer.Option([], help="one of images.hosts (repeatable; default: all)"),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Back up the images the containers of the Docker hosts run, each stored once by image ID (the images-backup flow)."""
    _use_config(config)
    _run_flow("flows.images_backup", "images_backup", ("backup", "images"), hosts=host or None)


@restore_app.command("images")
def restore_images(
    host: str = typer.Argument(..., help="the host whose images backup to restore"),
    backup: str = typer.Option("latest", help="latest (newest verified), a backup id, or a manifest key"),
    as_of: Optional[datetime] = typer.Option(None, help="with latest: newest verified backup completed by this time (ISO 8601)"),
    target_host: Optional[str] = typer.Option(None, help="the [hosts.NAME] to load them on (default: HOST)"),
    container: list[str] = typer.Option([], help="only the image of this container (repeatable)"),
    compose_project: list[str] = typer.Option([], help="only the images of this compose project (repeatable)"),
    ref: list[str] = typer.Option([], help="only this image reference, repo:tag (repeatable)"),
    confirm: Optional[str] = typer.Option(None, help="the target host's (or registry's) name: move tags that name other images there"),
    to_registry: Optional[str] = typer.Option(None, help="push into this [images.registries.NAME] instead of a host"),
    recovery_key: Optional[Path] = RecoveryKeyOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Load a host's backed-up images onto it or a new host, each checked against its ID first, tags put back."""
    _use_config(config)
    _break_glass(recovery_key)
    _run_flow("flows.images_restore", "images_restore", ("restore", "images"), host=host, backup=backup, as_of=as_of,
              target_host=target_host, containers=container or None, compose_projects=compose_project or None,
              refs=ref or None, confirm=confirm, to_registry=to_registry)


@restore_app.command("configs")
def restore_configs(
    host: str = typer.Argument(..., help="the [configs.hosts.NAME] to restore"),
    version: str = typer.Option("latest", help="latest, a backup id, a config-repository commit, or a date (2026-11-22) / ISO time"),
    path: list[str] = typer.Option([], help="restore only this absolute path or glob (repeatable; a folder restores what is under it)"),
    apply: bool = typer.Option(False, "--apply", help="write the files (default: a dry run that shows the diff)"),
    confirm: Optional[str] = typer.Option(None, help="with --apply: the host's name, repeated"),
    no_reload: bool = typer.Option(False, "--no-reload", help="do not run the services' reload commands"),
    remove_extra: bool = typer.Option(False, "--remove-extra", help="also remove files the backup does not have (kept first)"),
    recovery_key: Optional[Path] = RecoveryKeyOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Restore a host's configs from an encrypted archive: a redacted diff, or (--apply) atomic writes, validation, rollback."""
    _use_config(config)
    _break_glass(recovery_key)
    if apply and confirm != host:  # the flow refuses too; saying so here spares a failed run for a missing option
        _fail(ConfigError(f"writing configs on {host} needs confirm = {host!r}",
                          hint=f"run without --apply first and read the diff; then add --confirm {host}"))
    _run_flow("flows.config_restore", "config_restore", ("restore", "configs"), host=host, version=version,
              paths=path or None, dry_run=not apply, confirm=confirm, reload_services=not no_reload,
              remove_extra=remove_extra)


@restore_app.command("files")
def restore_files(
    destination: str = typer.Argument(..., help="an absolute folder here, or HOST:/folder for a [hosts.HOST]"),
    backup: str = typer.Option("latest", help="latest (newest verified), a backup id, or an object key"),
    source: Optional[str] = typer.Option(None, help="[files_backup.sources.NAME] the backup was taken of"),
    as_of: Optional[datetime] = typer.Option(None, help="with latest: newest verified backup completed by this time (ISO 8601)"),
    path: Optional[str] = typer.Option(None, help="restore only this folder or file, relative to the source's root"),
    confirm: Optional[str] = typer.Option(None, help="to overwrite existing files: the destination, repeated exactly"),
    allow_escaping_links: bool = typer.Option(False, "--allow-escaping-links", help="make symlinks that point outside the destination"),
    recovery_key: Optional[Path] = RecoveryKeyOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Restore a file backup and check the md5 of every restored file (the files-restore flow; no Prefect server needed)."""
    _use_config(config)
    _break_glass(recovery_key)
    _run_flow("flows.files_restore", "files_restore", ("restore", "files"), destination=destination, backup=backup,
              source=source, as_of=as_of, path=path, confirm=confirm, allow_escaping_links=allow_escaping_links)


@app.command("status")
def status_cmd(
    as_json: bool = typer.Option(False, "--json", help="print every target's status as JSON"),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Every backup target's last good backup against its RPO, what is kept and stored (from storage alone).

    Exits 1 when any target is beyond its RPO (or was never backed up) or has a backup the last read-back found
    damaged, or the DR drill is overdue ([dr.drill]): usable by monitoring.
    """
    _use_config(config)
    from datetime import timezone

    from luxima_backup.status import age_text, collect, drill_status, drill_text

    now = datetime.now(timezone.utc)
    try:
        settings = load_settings()
        statuses = collect(settings, now)
        drill = drill_status(settings, now)
    except BackupError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps([s.as_json() for s in statuses], indent=2))
    else:
        typer.echo(f"{'target':<28} {'state':<11} {'last success':<17} {'age':>8} {'RPO':>7} {'kept':>5} {'MiB':>9}")
        for s in statuses:
            last = s.last_success.strftime("%Y-%m-%d %H:%M") if s.last_success else "never"
            typer.echo(f"{s.component + '/' + s.target:<28} {'BEYOND RPO' if s.beyond_rpo else 'ok':<11} {last:<17} "
                       f"{age_text(s.age_hours):>8} {age_text(s.rpo_hours) if s.rpo_hours else '-':>7} {s.kept:>5} "
                       f"{s.bytes_stored / 2**20:>9.1f}" + (f"  ({s.unreadable} unreadable manifest(s))" if s.unreadable else "")
                       + (f"  ({s.damaged} DAMAGED when read back)" if s.damaged else "")
                       + (f"  ({s.without_recovery} without a recovery seal)" if s.without_recovery else ""))
    if drill is not None:
        typer.echo(drill_text(drill, now), err=as_json)
    raise typer.Exit(1 if any(s.beyond_rpo or s.damaged for s in statuses) or (drill is not None and drill.overdue) else 0)


@storage_app.command("check")
def storage_check(config: Optional[Path] = ConfigOpt) -> None:
    """Report the storage's protection (versioning, object lock, default retention) against the settings; exit 1 on a gap."""
    _use_config(config)
    from luxima_backup import runtime
    from luxima_backup.storage import protection, protection_problems

    try:
        settings = load_settings()
        places = [("storage", settings.storage, runtime.store(settings))]
        if settings.configs.storage is not None:
            places.append(("configs.storage", settings.configs.storage, runtime.config_store(settings)))
        report = []
        for name, cfg, store in places:
            found = protection(store)
            report.append({"section": name, **found, "object_lock_setting": cfg.object_lock,
                           "problems": protection_problems(cfg, found)})
    except BackupError as exc:
        _fail(exc)
    typer.echo(json.dumps(report, indent=2, default=str))
    problems = [p for r in report for p in r["problems"]]
    for p in problems:
        typer.echo(f"warning: {p}", err=True)
    raise typer.Exit(1 if problems else 0)


@catalog_app.command("sign")
def catalog_sign(
    component: list[str] = typer.Option([], help="db, files, configs or vm (repeatable; default: all)"),
    confirm: bool = typer.Option(False, "--confirm", help="sign them (without it: only list what would be signed)"),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Adopt manifests written before manifests were signed: each one's objects are checked (present, the sizes it
    records), then it is signed in place with the configured key. Until then they are listed as damaged."""
    _use_config(config)
    from luxima_backup import runtime

    rows, problems = [], 0
    try:
        settings = load_settings()
        for comp in component or ["db", "files", "configs", "vm"]:
            cat = runtime.catalog(comp, settings)
            for key, document in cat.unsigned(comp):
                missing = _missing_objects(cat.store, document)
                rows.append({"manifest": key, "backup_id": document.backup_id,
                             "action": f"refused: {missing}" if missing else ("signed" if confirm else "would sign")})
                problems += bool(missing)
                if confirm and not missing:
                    cat.adopt(key, document)
            if confirm:
                cat.refresh(comp)  # the index sees the signed ones (older keys: a full listing)
    except BackupError as exc:
        _fail(exc)
    for r in rows:
        typer.echo(f"{r['action']:<12} {r['backup_id']:<40} {r['manifest']}")
    typer.echo(f"{len(rows)} unsigned manifest(s)" + ("" if confirm else "; run again with --confirm to sign them"), err=True)
    raise typer.Exit(1 if problems else 0)


@catalog_app.command("refresh")
def catalog_refresh(
    component: list[str] = typer.Option([], help="db, files, configs or vm (repeatable; default: all)"),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """List every manifest in storage again and bring each target's index up to date (the prune does it daily; reads do
    it once a day): after backups were removed or copied in by hand. Exit 1 when manifests cannot be used."""
    _use_config(config)
    from luxima_backup import catalog, runtime

    damaged = 0
    try:
        settings = load_settings()
        for comp in component or ["db", "files", "configs", "vm"]:
            cat = runtime.catalog(comp, settings)
            cat.refresh(comp)
            found = list(cat.iter_backups(comp))
            bad = [u for u in found if isinstance(u, catalog.Unreadable)]
            damaged += len(bad)
            typer.echo(f"{comp}: {len(found) - len(bad)} backup(s), {len(bad)} manifest(s) that cannot be used")
            for u in bad:
                typer.echo(f"warning: {u}", err=True)
    except BackupError as exc:
        _fail(exc)
    raise typer.Exit(1 if damaged else 0)


def _missing_objects(store: Any, document: Any) -> str:
    """What a manifest names that storage does not hold as recorded (empty when all is there)."""
    from luxima_backup.errors import ObjectNotFound

    sizes = {document.data.key: document.data.size_encrypted} if document.component != "vm" else {}
    for name in ("index", "globals"):
        obj = getattr(document, name, None)
        if obj is not None and getattr(obj, "key", None):
            sizes[obj.key] = getattr(obj, "size_encrypted", None) or getattr(obj, "encrypted_bytes", None)
    for key, size in sizes.items():
        try:
            found = store.stat(key).size
        except ObjectNotFound:
            return f"{key} is missing"
        if size is not None and found != size:
            return f"{key} is {found} bytes, the manifest says {size}"
    return ""


@dr_app.command("replicate")
def dr_replicate_cmd(
    target: list[str] = typer.Option([], help="a [dr.targets.NAME] (repeatable; default: all)"),
    component: list[str] = typer.Option([], help="db, files or configs (repeatable; default: dr.components)"),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Copy the backups the DR site lacks, checked at both ends, and report the DR lag (the dr-replicate flow)."""
    _use_config(config)
    _run_flow("flows.dr_replicate", "dr_replicate", ("dr", "replicate"), targets=target or None, components=component or None)


@dr_app.command("drill")
def dr_drill_cmd(
    target: Optional[str] = typer.Option(None, help="the [dr.targets.NAME] to restore from (default: dr.drill.target)"),
    component: list[str] = typer.Option([], help="db, files, configs, vm (repeatable; default: dr.drill.components)"),
    recovery_key: Optional[Path] = typer.Option(None, "--recovery-key", help="restore with the offline recovery key alone "
                                                "(proves the break-glass path: Vault not used)"),
    keep: bool = typer.Option(False, "--keep", help="leave what was restored in place for inspection"),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Run the DR drill now: every component restored at the DR site from the DR copies, checked, timed against the
    RTO, the RPO of every DR target measured; a report kept as evidence; everything restored removed."""
    _use_config(config)
    _run_flow("flows.dr_drill", "dr_drill", ("dr", "drill"), target=target, components=component or None,
              recovery_key=str(recovery_key.expanduser().resolve()) if recovery_key else None, keep=keep)


@app.command("prune")
def prune_cmd(
    dry_run: bool = typer.Option(False, "--dry-run", help="show what would be removed (the same table), remove nothing"),
    force: bool = typer.Option(False, "--force", help="allow removing more than retention.max_delete_percent of a target"),
    component: list[str] = typer.Option([], help="db, files or configs (repeatable; default: all)"),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Apply the retention policies: remove backups no longer kept and what failed runs left (the prune flow)."""
    _use_config(config)
    _run_flow("flows.prune", "prune", ("prune", "retention"), dry_run=dry_run, force=force, components=component or None)


@restore_app.command("vm")
def restore_vm_cmd(
    guest: str = typer.Argument(..., help="the guest's name (or vmid) as `list --component vm` shows"),
    backup: str = typer.Option("latest", help="latest (newest verified), a backup id, or an archive's volid"),
    as_of: Optional[datetime] = typer.Option(None, help="with latest: newest verified backup completed by this time (ISO 8601)"),
    target_node: Optional[str] = typer.Option(None, help="node to restore on (default: the original's)"),
    target_vmid: Optional[int] = typer.Option(None, help="id of the restored guest (default: a free one, beside the original)"),
    connected: bool = typer.Option(False, "--connected", help="keep the NICs' links up (default: cut, for a test restore)"),
    replace: bool = typer.Option(False, "--replace", help="overwrite the original guest (needs --confirm; backs it up first)"),
    confirm: Optional[str] = typer.Option(None, help="with --replace or --rollback-snapshot: the guest's name, repeated"),
    skip_safety_backup: bool = typer.Option(False, "--skip-safety-backup", help="replace without backing the guest up first"),
    rollback_snapshot: Optional[str] = typer.Option(None, help="roll the original back to this Proxmox snapshot instead"),
    no_start: bool = typer.Option(False, "--no-start", help="restore and check the configuration only"),
    cleanup: bool = typer.Option(False, "--cleanup", help="remove the restored guest at the end (test restores)"),
    recovery_key: Optional[Path] = RecoveryKeyOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Restore a Proxmox guest, check its network configuration, start it and test connectivity (the vm-restore flow)."""
    _use_config(config)
    _break_glass(recovery_key)
    if (replace or rollback_snapshot) and confirm != guest:
        _fail(ConfigError(f"replacing or rolling back {guest} needs --confirm {guest}",
                          hint="or restore it beside the original first (the default)"))
    _run_flow("flows.vm_restore", "vm_restore", ("restore", "vm"), guest=guest, backup=backup, as_of=as_of,
              target_node=target_node, target_vmid=target_vmid, isolated=not connected, replace=replace, confirm=confirm,
              skip_safety_backup=skip_safety_backup, rollback_snapshot=rollback_snapshot, start=not no_start,
              cleanup=cleanup)


@restore_app.command("db")
def restore_db(
    backup: str = typer.Option("latest", help="latest (newest verified), a backup id, or an object key"),
    as_of: Optional[datetime] = typer.Option(None, help="with latest: newest verified backup completed by this time (ISO 8601)"),
    source: Optional[str] = typer.Option(None, help="[databases.NAME] the backup was taken of (default: db_backup.database)"),
    target: Optional[str] = typer.Option(None, help="[databases.NAME] server to restore into (default: restore.target)"),
    target_database: Optional[str] = typer.Option(None, help="database to create (mode new) or to replace (mode replace)"),
    mode: str = typer.Option("new", help="new: into a new database; replace: swap in place of target_database"),
    confirm: Optional[str] = typer.Option(None, help="mode replace: the exact name of the database being replaced"),
    schema: list[str] = typer.Option([], help="restore only this schema (repeatable)"),
    table: list[str] = typer.Option([], help="restore only this table, schema.table (repeatable)"),
    jobs: Optional[int] = typer.Option(None, min=1, help="parallel pg_restore jobs (default: restore.jobs)"),
    restore_globals: bool = typer.Option(False, "--restore-globals", help="create the backed-up roles first"),
    no_owner: bool = typer.Option(False, "--no-owner", help="restore without ownership and privileges"),
    recovery_key: Optional[Path] = RecoveryKeyOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Restore a database backup and verify it (the db-restore flow; no Prefect server needed)."""
    _use_config(config)
    _break_glass(recovery_key)
    if mode not in {"new", "replace"}:
        _fail(ConfigError(f"--mode must be new or replace, not {mode!r}"))
    _run_flow("flows.db_restore", "db_restore", ("restore", "db"), backup=backup, as_of=as_of, source=source,
              target=target, target_database=target_database, mode=mode, confirm=confirm, schemas=schema,
              tables=table, jobs=jobs, restore_globals_first=restore_globals, no_owner=no_owner)


@app.command("list")
def list_cmd(
    component: str = typer.Option("db", help="db, files, configs, vm or images"),
    source: Optional[str] = typer.Option(None, help="only backups of this source (for db: the NAME of a [databases.NAME] section)"),
    as_json: bool = typer.Option(False, "--json", help="print the manifests' summaries as JSON"),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """List backups from the manifests in storage alone (no database, no Prefect server)."""
    _use_config(config)
    from luxima_backup import catalog, runtime

    try:
        settings = load_settings()
        found = list(runtime.catalog(component, settings).iter_backups(component, source,
                                                                      catalog.legacy_folders(settings, component, source)))
    except BackupError as exc:
        _fail(exc)
    backups = sorted((b for b in found if isinstance(b, catalog.Backup)), key=lambda b: (b.completed_at, b.backup_id))
    rows = [{"backup_id": b.backup_id, "completed_at": b.completed_at.isoformat(timespec="seconds"), "status": b.status,
             **b.brief()} for b in backups]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    else:
        for r in rows:
            typer.echo(f"{r['backup_id']:<40} {r['completed_at']:<26} {r['status']:<9} {r['type']:<11} {r['size'] or '':>14}  {r['object_key']}")
        typer.echo(f"{len(rows)} backup(s)", err=True)
    for err in (e for e in found if not isinstance(e, catalog.Backup)):
        typer.echo(f"warning: {err}", err=True)


@app.command("show")
def show_cmd(
    backup: str = typer.Argument(..., help="a backup id, an object key, or latest"),
    component: str = typer.Option("db", help="db, files, configs, vm or images"),
    source: Optional[str] = typer.Option(None, help="with latest: which source"),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Print a backup's manifest (sizes, checksums, row counts, key id; no secrets)."""
    _use_config(config)
    from luxima_backup import catalog, runtime

    try:
        settings = load_settings()
        found = runtime.catalog(component, settings).resolve(component, backup, source=source,
                                                             also_under=catalog.legacy_folders(settings, component, source))
    except BackupError as exc:
        _fail(exc)
    typer.echo(json.dumps({"manifest_key": found.manifest_key, **found.manifest.model_dump(mode="json", by_alias=True)}, indent=2))


@app.command("decrypt")
def decrypt_cmd(
    object_key: Optional[str] = typer.Argument(None, help="the stored object to decrypt (or use --input)"),
    output: str = typer.Option(..., "--output", "-o", help="file to write (created 0600, must not exist), or - for stdout"),
    input_file: Optional[Path] = typer.Option(None, "--input", "-i", help="decrypt this local copy instead of a stored object"),
    decompress: bool = typer.Option(False, "--decompress", help="also decompress (codec from the object name)"),
    key_file: list[Path] = typer.Option([], help="decrypt with these key files instead of the configured provider"),
    recovery_key: Optional[Path] = typer.Option(None, help="decrypt with the offline recovery private key alone (Vault gone)"),
    manifest_file: Optional[Path] = typer.Option(None, "--manifest", help="with --input and --recovery-key: the backup's "
                                                 "manifest (older backups keep their recovery seals there)"),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Stream-decrypt one backup object, authenticating every chunk (break-glass; no database needed)."""
    from luxima_backup.breakglass import decrypt_object

    if (object_key is None) == (input_file is None):
        _fail(ConfigError("give either an OBJECT_KEY or --input FILE"))
    if object_key is not None or not (key_file or recovery_key):
        _use_config(config)
    try:
        written = decrypt_object(object_key, input_file, output, decompress, key_file, recovery_key, manifest_file)
    except BackupError as exc:
        _fail(exc)
    if output != "-":
        typer.echo(f"wrote {output} ({written} bytes, every chunk authenticated)", err=True)


@app.command("deploy")
def deploy_cmd(alerts: bool = typer.Option(True, "--alerts/--no-alerts", help="also set up the chat alerts"),
               config: Optional[Path] = ConfigOpt) -> None:
    """Register everything on the Prefect server (idempotent): the S3 bucket block, the work pool,
    every deployment of prefect.yaml, and the alert automations."""
    _use_config(config)
    from deployments.alerts import setup_alerts
    from deployments.blocks import register_storage
    from deployments.deploy import deploy_all

    try:
        settings = load_settings()
        storage = register_storage(settings)
        names = deploy_all()
        result = setup_alerts(settings.alerts, targets=_targets(settings)) if alerts else {}
    except BackupError as exc:
        _fail(exc)
    if storage.get("s3_bucket"):
        typer.echo(f"block: S3Bucket {storage['s3_bucket']}")
    typer.echo(f"deployed: {', '.join(names)}")
    for name, what in result.items():
        typer.echo(f"automation {what}: {name}")
    if alerts and not result:
        typer.echo("warning: no [[alerts.channels]] configured; failures will not reach chat", err=True)


@app.command("secret")
def secret_cmd(name: str = typer.Argument(..., help="Prefect Secret block name (lowercase, digits, dashes)"),
               reference: str = typer.Argument(..., help="where the value is now: env:NAME, file:/path or vault:MOUNT/PATH#FIELD"),
               config: Optional[Path] = ConfigOpt) -> None:
    """Copy a secret into a Prefect Secret block, so workers can use prefect-secret:NAME."""
    _use_config(config)
    from deployments.blocks import register_secret

    try:
        ref = register_secret(name, reference)
    except BackupError as exc:
        _fail(exc)
    typer.echo(f"saved; refer to it as {ref!r}")


@app.command("worker")
def worker_cmd(pool: str = typer.Option("luxima-backup", help="the process work pool to poll"),
               limit: Optional[int] = typer.Option(None, help="flow runs at once"),
               name: Optional[str] = typer.Option(None, help="the worker's name in the UI and in its runs' logs "
                                                  "(e.g. the host's; default: Prefect's generated one)"),
               config: Optional[Path] = ConfigOpt) -> None:
    """Run a process worker for the deployments (flow runs get this settings file and project home)."""
    _use_config(config)
    from deployments.deploy import worker_command, worker_env

    try:
        load_settings()
    except BackupError as exc:
        _fail(exc)
    command = worker_command(pool, limit, name)
    os.execve(command[0], command, worker_env())


@app.command("serve")
def serve_cmd(limit: Optional[int] = typer.Option(None, help="flow runs at once"),
              config: Optional[Path] = ConfigOpt) -> None:
    """Serve every deployment from this process, with no work pool or worker (small installations)."""
    _use_config(config)
    from deployments.serve import serve_all

    try:
        load_settings()
        serve_all(limit)
    except BackupError as exc:
        _fail(exc)


@alerts_app.command("setup")
def alerts_setup(config: Optional[Path] = ConfigOpt) -> None:
    """Save the [alerts] channels as notification blocks and create/update the alert automations."""
    _use_config(config)
    from deployments.alerts import setup_alerts

    try:
        settings = load_settings()
        result = setup_alerts(settings.alerts, targets=_targets(settings))
    except BackupError as exc:
        _fail(exc)
    if not result:
        typer.echo("no [[alerts.channels]] configured: nothing to send alerts to", err=True)
        raise typer.Exit(2)
    for name, what in result.items():
        typer.echo(f"{what:>9}  {name}")


@config_app.command("check")
def config_check(config: Optional[Path] = ConfigOpt) -> None:
    """Validate the settings and print them (secret references only, never values)."""
    _use_config(config)
    try:
        settings = load_settings()
    except BackupError as exc:
        _fail(exc)
    typer.echo(json.dumps(settings.model_dump(mode="json"), indent=2))


@app.command("migrate")
def migrate_cmd(database: Optional[str] = typer.Option(None, help="[databases.NAME] holding the log (default: log.database)"),
                config: Optional[Path] = ConfigOpt) -> None:
    """Create or upgrade internal.backup_logs and the backup_admin role."""
    _use_config(config)
    from tasks.log import log_database, migrate

    from luxima_backup import pg

    try:
        settings = load_settings()
        cfg = settings.database(database) if database else log_database(settings, settings.db_backup.database)
        with pg.connect(cfg) as conn:
            applied = migrate(conn)
    except BackupError as exc:
        _fail(exc)
    typer.echo(f"applied: {', '.join(applied)}" if applied else "up to date")


@keys_app.command("generate")
def keys_generate(path: Path = typer.Argument(..., help="where to write the new key file (must not exist)")) -> None:
    """Write a new random 256-bit master key file (mode 0600), for the 'file' key provider."""
    from luxima_backup.keys import fingerprint, load_key_file, new_master_key

    if path.exists():
        _fail(ConfigError(f"{path} already exists; refusing to overwrite a key (old backups may need it)"))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(new_master_key() + "\n")
    typer.echo(f"wrote {path} ({fingerprint(load_key_file(path))}); keep a copy offline: backups cannot be read without it")


@keys_app.command("recovery-generate")
def keys_recovery_generate(path: Path = typer.Argument(..., help="where to write the recovery private key (must not exist); "
                                                                   "move it offline afterwards")) -> None:
    """Make the offline recovery key (X25519): the private key to PATH (0600), once; prints the public key for
    [keys] recovery_public_key and the fingerprint to record. The project never stores the private key."""
    from luxima_backup import recovery

    catalog_file = Path(f"{path}.catalog-key")
    try:
        if catalog_file.exists():
            raise ConfigError(f"{catalog_file} already exists; refusing to overwrite it", hint="choose a new PATH")
        public, fp = recovery.generate(path)
        recovery.write_catalog_key(recovery.load_private(path), catalog_file)
    except BackupError as exc:
        _fail(exc)
    typer.echo(f"wrote the recovery private key to {path} ({fp}), and its catalog key to {catalog_file}")
    typer.echo("1. put the catalog key in Vault (or another secret store), set [keys] recovery_catalog_key to its reference "
               f"(e.g. vault:secret/luxima-backup/recovery#catalog_key), then delete {catalog_file}")
    typer.echo(f"2. move {path} offline (a safe, two copies); record the fingerprint {fp}")
    typer.echo("3. put this in the settings ([keys] recovery_public_key):")
    typer.echo(public)


@keys_app.command("recovery-catalog-key")
def keys_recovery_catalog_key(
    recovery_key: Path = typer.Argument(..., help="the recovery private key file"),
    out: Path = typer.Argument(..., help="where to write its catalog key (must not exist)"),
) -> None:
    """Write the catalog key of an existing recovery key again (for [keys] recovery_catalog_key)."""
    from luxima_backup import recovery

    try:
        private = recovery.load_private(recovery_key)
        recovery.write_catalog_key(private, out)
    except BackupError as exc:
        _fail(exc)
    typer.echo(f"wrote the catalog key of {recovery.fingerprint(private.public_key())} to {out}")


@keys_app.command("rewrap")
def keys_rewrap(
    component: list[str] = typer.Option([], help="db, files or configs (repeatable; default: all)"),
    confirm: bool = typer.Option(False, "--confirm", help="write the seals (without it: only list what would be sealed)"),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Seal the data keys of backups made before keys.recovery_public_key was set to it (into their manifests, signed
    again, also with the recovery catalog key; nothing is re-encrypted). Needs the key provider (Vault) while it runs."""
    _use_config(config)
    from luxima_backup import runtime
    from tasks.rewrap import rewrap_backup

    rows = []
    try:
        settings = load_settings()
        key_id = runtime.recovery_key_id(settings)
        if key_id is None or settings.keys.recovery_public_key is None:
            raise ConfigError("keys.recovery_public_key is not set", hint="make one with `luxima-backup keys recovery-generate`")
        provider = runtime.key_provider(settings)
        for comp in component or ["db", "files", "configs"]:
            cat = runtime.catalog(comp, settings)
            for backup in cat.list_backups(comp):
                rows.append(rewrap_backup(cat, provider, backup, settings.keys.recovery_public_key, key_id, confirm))
    except BackupError as exc:
        _fail(exc)
    for r in rows:
        typer.echo(f"{r['action']:<15} {r['backup']:<40} {r['objects']} object(s)")
    typer.echo(f"{sum(r['action'] != 'sealed already' for r in rows)} backup(s) " + ("sealed" if confirm else
               "to seal; run again with --confirm"), err=True)


@app.command("demo")
def demo(workdir: Path = typer.Option(Path(".local/demo"), help="where the demo keeps its servers and files"),
         scale: float = typer.Option(1.0, help="sample data size (1 = ~10 MB dump)"),
         wait: bool = typer.Option(True, "--wait/--no-wait", help="stay up until Ctrl-C (default) or clean up at once"),
         stop: bool = typer.Option(False, "--stop", help="stop a demo running in another shell, and clean up")) -> None:
    """Everything on local defaults: servers, sample data, deployments, a backup and a verified restore."""
    from devkit.demo import run_demo, stop_demo

    if stop:
        typer.echo("stopped the running demo" if stop_demo(workdir.resolve()) else "no demo was running")
        return
    try:
        run_demo(workdir.resolve(), scale, wait)
    except BackupError as exc:
        _fail(exc)


def _stop_on_signal() -> None:
    """SIGTERM and SIGHUP end a command as Ctrl-C does, after stopping its child processes.

    Python's default for SIGTERM ends the process on the spot: no flow clean-up (a half-written backup
    kept, its log row left 'running'), no atexit (the temporary Prefect server of a command run without
    one left running as an orphan) and pg_dump, pg_restore or rsync carrying on alone. Stopping the
    children first also ends the stage threads reading from them, so the process can exit.
    """
    import atexit
    import signal
    import threading

    from luxima_backup import procs

    def interrupt(signum: int, frame: Any) -> None:
        procs.stop_all(grace=5)
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    atexit.register(procs.stop_all)

    # Python runs signal handlers in the main thread only, between bytecodes; a main thread blocked on a lock
    # while a stage thread took the signal never gets there, and a flow run swaps in Prefect's own SIGTERM
    # handler anyway. The wake-up fd is written at C level whatever the threads do: a watcher stops the
    # children at once, which ends the stages, wakes the main thread and lets the handlers run.
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    stopping = {int(signal.SIGTERM), int(signal.SIGHUP), int(signal.SIGINT)}

    def watch() -> None:
        while data := os.read(r, 64):
            if stopping.intersection(data):
                procs.stop_all(grace=5)

    threading.Thread(target=watch, name="signal-watch", daemon=True).start()


def main() -> None:
    import atexit

    atexit.register(_exit_without_teardown)  # the first registered runs last: after every other exit handler
    _stop_on_signal()
    try:
        try:
            app()
        except KeyboardInterrupt:
            from luxima_backup import procs

            procs.stop_all(grace=5)
            sys.exit(130)
    except SystemExit as exc:
        _exit_status[0] = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        raise


_exit_status = [1]  # a command that did not end by sys.exit (an uncaught exception) failed


def _exit_without_teardown() -> None:
    """End the process once the command and every exit handler are done (Prefect's own drain its logs and events
    first), without the interpreter's teardown of every module and object: 0.4 s of each command, for nothing
    (measured on a restore; a command's whole fixed cost is about 2 s). Output is flushed first."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(_exit_status[0])

