"""The README's first command: the main job on embedded local defaults, from nothing to a verified backup.

Starts a throwaway PostgreSQL with a sample Luxima database, an S3 server and a Prefect
server on loopback, writes a settings file and a demo key file, runs the ``db-backup``
flow through Prefect, prints what it did, and stops and removes everything it started.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

from .keys import new_master_key
from .sandbox import MotoS3Server, PostgresCluster, PrefectServer, reap_orphans

BUCKET = "luxima-backups"


def write_settings(path: Path, pg: PostgresCluster, s3: MotoS3Server, key_file: Path, work: Path) -> None:
    path.write_text(f"""# Written by `luxima-backup demo`: local servers, a development key file.
work_dir = "{work}"

[databases.main]
host = "127.0.0.1"
port = {pg.port}
dbname = "luxima"
user = "postgres"
password = "env:LUXIMA_DEMO_DB_PASSWORD"
sslmode = "disable"

[storage]
bucket = "{BUCKET}"
endpoint_url = "{s3.url}"
access_key_id = "env:LUXIMA_DEMO_S3_ACCESS_KEY"
secret_access_key = "env:LUXIMA_DEMO_S3_SECRET_KEY"

[keys]
provider = "file"
key_file = "{key_file}"
allow_key_file = true

[db_backup]
attempts = 2
retry_delay_seconds = [2]
""")


def run_demo(workdir: Path, scale: float) -> None:
    from . import sample

    reap_orphans()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, mode=0o700)
    password = secrets.token_urlsafe(18)
    os.environ["LUXIMA_DEMO_DB_PASSWORD"] = password
    servers: list = []
    try:
        print("demo: starting PostgreSQL, S3 (moto) and Prefect servers on 127.0.0.1 ...", flush=True)
        pg = PostgresCluster(password).start()
        servers.append(pg.destroy)
        s3 = MotoS3Server().start()
        servers.append(s3.stop)
        prefect = PrefectServer().start()
        servers.append(prefect.stop)
        os.environ.update(prefect.env())
        os.environ["LUXIMA_DEMO_S3_ACCESS_KEY"], os.environ["LUXIMA_DEMO_S3_SECRET_KEY"] = s3.access_key, s3.secret_key
        s3.create_bucket(BUCKET, versioning=True)
        with pg.connect() as conn:
            conn.execute("CREATE DATABASE luxima")
        with pg.connect("luxima") as conn:
            counts = sample.populate(conn, scale)
        print(f"demo: sample database 'luxima' ready: {counts}", flush=True)
        key_file = workdir / "master.key"
        key_file.write_text(new_master_key() + "\n")
        key_file.chmod(0o600)
        settings_path = workdir / "luxima-backup.toml"
        write_settings(settings_path, pg, s3, key_file, workdir / "work")
        os.environ["LUXIMA_BACKUP_CONFIG"] = str(settings_path)

        from flows.db_backup import db_backup

        summary = db_backup()
        print("demo: backup complete:")
        print(json.dumps(summary, indent=2))
        print(f"demo: settings were {settings_path}; the Prefect UI ran at {prefect.api_url[:-4]} for this run")
    finally:
        _flush_prefect_logs()
        for stop in reversed(servers):
            stop()


def _flush_prefect_logs() -> None:
    # Logs go to the API in batches; send the last batch before the server stops.
    try:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)
    except Exception:
        pass
