"""The ``luxima-backup`` command: run flows and operator tasks from a shell; every run goes through Prefect."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import BackupError, ConfigError
from .settings import CONFIG_ENV, load_settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Backup, restore and disaster recovery of the Luxima Core Platform.")
backup_app = typer.Typer(no_args_is_help=True, help="Run a backup now.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect the settings.")
keys_app = typer.Typer(no_args_is_help=True, help="Key management helpers.")
app.add_typer(backup_app, name="backup")
app.add_typer(config_app, name="config")
app.add_typer(keys_app, name="keys")

ConfigOpt = typer.Option(None, "--config", "-c", help=f"settings file (default: ${CONFIG_ENV})", envvar=CONFIG_ENV)


def _use_config(path: Optional[Path]) -> None:
    if path is not None:
        os.environ[CONFIG_ENV] = str(path.expanduser().resolve())


def _fail(exc: BaseException) -> None:
    from .secrets import redact

    typer.echo(f"error: {redact(str(exc))}", err=True)
    raise typer.Exit(2 if isinstance(exc, ConfigError) else 1)


@backup_app.command("db")
def backup_db(
    database: Optional[str] = typer.Option(None, help="which [databases.NAME] to back up (default: db_backup.database)"),
    deep_verify: Optional[bool] = typer.Option(None, "--deep-verify/--no-deep-verify", help="override db_backup.deep_verify"),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Back up a PostgreSQL database now (the db-backup flow)."""
    _use_config(config)
    try:
        load_settings()  # stop here, before any flow run, if the settings are wrong
        from flows.db_backup import db_backup

        summary = db_backup(database=database, deep_verify=deep_verify)
    except BackupError as exc:
        _fail(exc)
    typer.echo(json.dumps(summary, indent=2))


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

    from . import pg

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
    from .keys import fingerprint, load_key_file, new_master_key

    if path.exists():
        _fail(ConfigError(f"{path} already exists; refusing to overwrite a key (old backups may need it)"))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(new_master_key() + "\n")
    typer.echo(f"wrote {path} ({fingerprint(load_key_file(path))}); keep a copy offline: backups cannot be read without it")


@app.command("demo")
def demo(workdir: Path = typer.Option(Path(".local/demo"), help="where the demo keeps its servers and files"),
         scale: float = typer.Option(1.0, help="sample data size (1 = ~10 MB dump)")) -> None:
    """Start local servers (PostgreSQL, S3, Prefect), fill a sample database, back it up, and clean up."""
    from .demo import run_demo

    try:
        run_demo(workdir.resolve(), scale)
    except BackupError as exc:
        _fail(exc)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)

