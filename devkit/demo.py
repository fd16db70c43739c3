"""The README's first command: everything, running, on embedded local defaults.

Starts on loopback a Prefect server (UI at http://127.0.0.1:4200 when the port is free), a
throwaway PostgreSQL with a sample Luxima database, an S3 server and a local key file; deploys
everything (bucket block, work pool, deployments, alert automations posting to a local
receiver that writes them to ``alerts.log``), starts a process worker, runs the database
backup deployment and then a restore into a scratch database with verification, then the
files backup of a sample user-files tree served over SSH (its own sshd) and its md5-checked
restore into a folder, then the config backup of a sample app server's configs (pushed to a
bare git repository over SSH, secrets redacted) and a config restore dry run, then the VM
backup of a guest on a simulated two-node Proxmox VE cluster (the API simulator of the tests,
run as its own process) and its restore beside the original on the second node with every
check, prints a summary and where to look in the UI, and stays up until Ctrl-C or `luxima-backup demo --stop`;
then stops everything it started and removes what it created.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

from luxima_backup.keys import new_master_key
from devkit.sandbox import (DockerDaemon, MotoS3Server, PostgresCluster, PrefectServer, SshServer, free_port, reap_orphans,
                            stop_group)

BUCKET = "luxima-backups"
UI_PORT = 4200
STATE_FILE = "demo.json"


def write_settings(path: Path, pg: PostgresCluster, s3: MotoS3Server, key_file: Path, work: Path, sshd: SshServer,
                   known_hosts: Path, user_files: Path, configs: Path, config_remote: Path, fingerprint_key: Path,
                   pve: dict[str, Any], docker: DockerDaemon) -> None:
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

[hosts.storage1]                           # the host holding the user files, reached over SSH
host = "127.0.0.1"
port = {sshd.port}
user = "{sshd.user}"
key = "file:{sshd.client_key}"
known_hosts = "{known_hosts}"

[files_backup.sources.userfiles]
kind = "ssh"
host = "storage1"
path = "{user_files}"

[hosts.app1]                               # the application server (here: the same sshd), for its configs
host = "127.0.0.1"
port = {sshd.port}
user = "{sshd.user}"
key = "file:{sshd.client_key}"
known_hosts = "{known_hosts}"

[configs]
fingerprint_key = "file:{fingerprint_key}"
restore_keep_dir = "{work}/config-restore-kept"

[configs.git]                              # a bare repository reached over SSH, as a git server would be
remote = "ssh://{sshd.user}@127.0.0.1:{sshd.port}{config_remote}"
key = "file:{sshd.client_key}"
known_hosts = "{known_hosts}"

[configs.hosts.app1]
paths = ["{configs}/etc/nginx/", "{configs}/data/coolify/source/.env", "{configs}/data/coolify/services/*/docker-compose.yml",
         "{configs}/etc/ssl/private/"]

[configs.hosts.app1.services.nginx]        # no nginx here: a stand-in check of the main config
paths = ["{configs}/etc/nginx/"]
validate_command = "grep -q '^worker_processes' {configs}/etc/nginx/nginx.conf"

[restore.app_check]
user = "luxima_app"
password = "env:LUXIMA_DEMO_APP_PASSWORD"
queries = [{{ sql = "SELECT id, email FROM public.profiles LIMIT 10", min_rows = 1 }}]

[proxmox.main]                             # a simulated two-node Proxmox VE cluster
address = "{pve['url']}"
nodes = ["proxmox-node1", "proxmox-node2"]
token_id = "{pve['token_id']}"
token_secret = "env:LUXIMA_DEMO_PVE_TOKEN"
ca_cert = "{pve['ca_path']}"

[vm_backup]
guests = ["web"]
storage = "backup"

[vm_restore]
storage = "local-lvm"

[vm_restore.checks.web]
tcp_ports = [{pve['service_port']}]

[images]                                   # the images app1's containers run (a private Docker engine here)
hosts = ["app1"]
command = "{docker.command}"

[databases.dr]                             # the DR site's PostgreSQL server (here: the same cluster)
host = "127.0.0.1"
port = {pg.port}
dbname = "postgres"
user = "postgres"
password = "env:LUXIMA_DEMO_DB_PASSWORD"
sslmode = "disable"

[hosts.node2]                              # the DR node (here: the same sshd), its copy of the backups over rsync
host = "127.0.0.1"
port = {sshd.port}
user = "{sshd.user}"
key = "file:{sshd.client_key}"
known_hosts = "{known_hosts}"

[dr.targets.node2]
kind = "ssh"
host = "node2"
path = "{work}/dr-node2"

[dr.targets.dr-bucket]                     # and a second bucket at the DR site
kind = "storage"
[dr.targets.dr-bucket.storage]
bucket = "{BUCKET}-dr"
endpoint_url = "{s3.url}"
access_key_id = "env:LUXIMA_DEMO_S3_ACCESS_KEY"
secret_access_key = "env:LUXIMA_DEMO_S3_SECRET_KEY"

[dr.drill]                                 # short: the guests' archives are on storage both nodes share here
target = "node2"
database = "dr"
components = ["db", "files", "configs"]

[[alerts.channels]]
kind = "webhook"
name = "demo-alerts"
url = "env:LUXIMA_DEMO_ALERT_URL"
""")


class AlertLog:
    """Stands in for the team chat: alert webhooks are appended to a file."""

    def __init__(self, path: Path):
        self.path = path
        log = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    msg = json.loads(raw)
                    text = f"== {msg.get('subject')}\n{msg.get('body')}\n\n"
                except ValueError:
                    text = raw.decode(errors="replace") + "\n"
                with open(log.path, "a") as f:
                    f.write(text)
                self.send_response(204)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _cli(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "luxima-backup"), *args]


def run_demo(workdir: Path, scale: float, wait: bool = True) -> None:
    from devkit import sample

    reap_orphans()
    if (workdir / STATE_FILE).exists():
        stop_demo(workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, mode=0o700)
    os.environ["LUXIMA_DEMO_DB_PASSWORD"] = password = secrets.token_urlsafe(18)
    os.environ["LUXIMA_DEMO_APP_PASSWORD"] = app_password = secrets.token_urlsafe(12)
    cleanup: list[Callable[[], Any]] = []
    try:
        print("demo: starting PostgreSQL, S3 (moto), sshd and Prefect servers on 127.0.0.1 ...", flush=True)
        pg = PostgresCluster(password).start()
        cleanup.append(pg.destroy)
        s3 = MotoS3Server().start()
        cleanup.append(s3.stop)
        prefect = PrefectServer(port=UI_PORT if _port_free(UI_PORT) else free_port()).start()
        cleanup.append(prefect.stop)
        sshd = SshServer().start()
        cleanup.append(sshd.stop)
        docker = DockerDaemon().start()
        cleanup.append(docker.stop)
        image = sample.populate_images(docker)
        print(f"demo: a Docker engine with the app's image {image} and two containers of compose project 'luxima'",
              flush=True)
        known_hosts = workdir / "known_hosts"
        known_hosts.write_text(sshd.known_hosts_line)  # the demo host's key, as an operator would add it
        user_files = workdir / "user-files"
        file_counts = sample.populate_files(user_files, scale)
        print(f"demo: sample user files ready in {user_files}: {file_counts}", flush=True)
        configs = workdir / "app1"
        config_counts = sample.populate_configs(configs)
        config_remote = workdir / "config-repo.git"
        subprocess.run(["git", "init", "--quiet", "--bare", "--initial-branch=main", str(config_remote)], check=True)
        fingerprint_key = workdir / "config-fingerprint.key"
        fingerprint_key.write_text(secrets.token_urlsafe(32) + "\n")
        fingerprint_key.chmod(0o600)
        print(f"demo: sample app server configs ready in {configs}: {config_counts}; config git remote {config_remote}",
              flush=True)
        alerts = AlertLog(workdir / "alerts.log")
        cleanup.append(alerts.stop)
        pve = _start_proxmox(workdir, cleanup)
        os.environ["LUXIMA_DEMO_PVE_TOKEN"] = pve["token_secret"]
        os.environ.update(prefect.env())
        os.environ["LUXIMA_DEMO_S3_ACCESS_KEY"], os.environ["LUXIMA_DEMO_S3_SECRET_KEY"] = s3.access_key, s3.secret_key
        s3.create_bucket(BUCKET, versioning=True)
        s3.create_bucket(f"{BUCKET}-dr", versioning=True)
        with pg.connect() as conn:
            conn.execute("CREATE DATABASE luxima")
            conn.execute(f"CREATE ROLE luxima_app LOGIN PASSWORD '{app_password}'")
        with pg.connect("luxima") as conn:
            counts = sample.populate(conn, scale)
            conn.execute("GRANT SELECT ON ALL TABLES IN SCHEMA public TO luxima_app")
        print(f"demo: sample database 'luxima' ready: {counts}", flush=True)
        key_file = workdir / "master.key"
        key_file.write_text(new_master_key() + "\n")
        key_file.chmod(0o600)
        settings_path = workdir / "luxima-backup.toml"
        os.environ["LUXIMA_DEMO_ALERT_URL"] = alerts.url
        write_settings(settings_path, pg, s3, key_file, workdir / "work", sshd, known_hosts, user_files, configs,
                       config_remote, fingerprint_key, pve, docker)
        os.environ["LUXIMA_BACKUP_CONFIG"] = str(settings_path)
        (workdir / STATE_FILE).write_text(json.dumps({"pid": os.getpid(), "ui": prefect.api_url[:-4]}))

        done = subprocess.run(_cli("deploy"), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"deploy failed:\n{done.stdout}{done.stderr}")
        print("demo: " + done.stdout.strip().replace("\n", "\ndemo: "), flush=True)
        with open(workdir / "worker.log", "wb") as log:
            worker = subprocess.Popen(_cli("worker"), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        cleanup.append(lambda: stop_group(worker, 20, signal.SIGINT))

        backup = _run_deployment("db-backup/db-backup", {})
        print(f"demo: backup complete: {backup['backup_id']} -> {backup['object_key']} "
              f"({backup['size_plain']} bytes dumped, {backup['size_encrypted']} stored)", flush=True)
        restore = _run_deployment("db-restore/db-restore", {"target_database": "luxima_restore_demo"})
        print(f"demo: restore verified: {restore['database']} from {restore['backup_id']}, "
              f"{restore['checks_passed']} checks passed, RTO {restore['rto_seconds']:.0f}s "
              f"(target {restore['rto_target_seconds'] / 60:.0f} min)", flush=True)
        files = _run_deployment("files-backup/files-backup", {})["userfiles"]
        print(f"demo: files backup complete: {files['backup_id']} ({files['type']}): {files['totals']['files']} files, "
              f"{files['transferred_files']} transferred over rsync/SSH, {files['size_encrypted']} bytes stored", flush=True)
        restored_files = workdir / "restored-files"
        files_restore = _run_deployment("files-restore/files-restore", {"destination": str(restored_files)})
        print(f"demo: files restore verified: {files_restore['files']} files in {restored_files}, "
              f"md5 of {files_restore['md5_checked']} checked", flush=True)
        cfg = _run_deployment("config-backup/config-backup", {})
        app1 = cfg["hosts"]["app1"]
        print(f"demo: config backup complete: {app1['backup_id']}: {app1['totals']['files']} files, "
              f"{app1['totals']['redactions']} secret values redacted in git; commit {cfg['git']['commit'][:12]} pushed to "
              f"{config_remote}", flush=True)
        nginx_conf = configs / "etc/nginx/nginx.conf"
        nginx_conf.write_text(nginx_conf.read_text().replace("worker_connections 1024", "worker_connections 4096"))
        cfg_plan = _run_deployment("config-restore/config-restore", {"host": "app1"})
        print(f"demo: config restore dry run (after editing nginx.conf on the host): {cfg_plan['counts']}; "
              "the diff is in the run's artifact", flush=True)
        vms = _run_deployment("vm-backup/vm-backup", {})["guests"]["web"]
        print(f"demo: VM backup complete: {vms['backup_id']}: vzdump of {vms['vmid']} on {vms['node']} -> {vms['volid']} "
              f"({vms['size']} bytes), its config read back from the archive", flush=True)
        vm_restored = _run_deployment("vm-restore/vm-restore", {"guest": "web", "target_node": "proxmox-node2",
                                                                 "isolated": False})
        print(f"demo: VM restore checked: {vm_restored['vmid']} on {vm_restored['node']} (beside the original, new MACs), "
              f"{vm_restored['checks']} checks passed, RTO {vm_restored['rto_seconds']:.0f}s", flush=True)
        images = _run_deployment("images-backup/images-backup", {})["hosts"]["app1"]
        print(f"demo: images backup complete: {images['backup_id']}: {images['containers']} containers, "
              f"{images['new']} image(s) stored once by ID ({images['bytes']} bytes), checked against their IDs", flush=True)
        dr = _run_deployment("dr-replicate/dr-replicate", {})
        print(f"demo: DR replication: {dr['copied']} backup(s) copied to {', '.join(dr['targets'])} "
              f"({dr['bytes']} bytes), each read back at the DR site", flush=True)
        drill = _run_deployment("dr-drill/dr-drill", {})
        print(f"demo: DR drill passed from {drill['dr_target']}: "
              + ", ".join(f"{r['component']}/{r['target']} verified in {r['rto_seconds']:.0f}s" for r in drill["restores"])
              + f"; total RTO {drill['rto_total_seconds']:.0f}s; RPO at the DR site "
              + f"{max(r['lag_hours'] for r in drill['rpo']):.2f} h at most; report {drill['evidence'][1]}", flush=True)
        ui = prefect.api_url[:-4]
        print(f"""demo: summary
  Prefect UI         {ui}  (Runs: the flow runs and their tasks; Artifacts: backup and restore reports;
                     Deployments: db-backup daily 03:00, files-backup daily 04:00, vm-backup Sundays 01:00,
                     config-backup Sundays 02:00, dr-replicate daily 07:00, dr-drill 1 Jan/1 Jul 02:00
                     Asia/Jakarta, restores by hand;
                     Automations: alerts)
  settings           {settings_path}
  alerts ("chat")    {workdir / 'alerts.log'}
  backup             {json.dumps({k: backup[k] for k in ('backup_id', 'object_key', 'row_counts')})}
  restore            {json.dumps({k: restore[k] for k in ('database', 'checks_passed', 'rto_seconds')})}
  files backup       {json.dumps({k: files[k] for k in ('backup_id', 'object_key', 'totals')})}
  files restore      {json.dumps({k: files_restore[k] for k in ('destination', 'files', 'md5_checked', 'rto_seconds')})}
  config backup      {json.dumps({'backup_id': app1['backup_id'], 'commit': cfg['git']['commit'], 'totals': app1['totals']})}
  config repository  git --git-dir {config_remote} log -p   (secrets are luxima-redacted:hmac-sha256 fingerprints)
  config restore     dry run: {json.dumps(cfg_plan['counts'])}
  VM backup          {json.dumps({k: vms[k] for k in ('backup_id', 'vmid', 'node', 'volid')})}
  VM restore         {json.dumps({k: vm_restored[k] for k in ('vmid', 'node', 'checks', 'rto_seconds')})}
  DR replication     {json.dumps({k: dr[k] for k in ('targets', 'copied', 'bytes')})}
  DR drill           {json.dumps({'ok': drill['ok'], 'rto_total_seconds': drill['rto_total_seconds'], 'report': drill['evidence']})}""", flush=True)
        if wait:
            print("demo: running; press Ctrl-C (or run `./run demo --stop`) to stop everything and clean up", flush=True)
            _wait_for_stop()
    finally:
        print("demo: stopping and removing everything it started", flush=True)
        _flush_prefect_logs()
        for stop in reversed(cleanup):
            try:
                stop()
            except Exception as exc:  # keep stopping the rest
                print(f"demo: while stopping: {exc}", file=sys.stderr)
        # Settings, the demo key, logs and spools: all throwaway, like the servers.
        shutil.rmtree(workdir, ignore_errors=True)


def _start_proxmox(workdir: Path, cleanup: list[Callable[[], Any]]) -> dict[str, Any]:
    """The tests' Proxmox VE API simulator as its own process (the demo's stand-in for a cluster); what it wrote
    about itself: address, CA, token, the guest's service port."""
    state = workdir / "proxmox.json"
    root = Path(__file__).resolve().parent.parent
    with open(workdir / "proxmox.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tests.simulators.proxmox", str(workdir / "proxmox"), str(state)],
                                cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    cleanup.append(lambda: stop_group(proc, 10))
    deadline = time.monotonic() + 60
    while not state.exists():  # renamed into place whole
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the Proxmox simulator did not start; see {workdir / 'proxmox.log'}")
        time.sleep(0.2)
    return dict(json.loads(state.read_text()))


def _run_deployment(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    from prefect.deployments import run_deployment

    run = run_deployment(name, parameters=parameters, timeout=1800, poll_interval=2)
    if not run.state or not run.state.is_completed():
        raise RuntimeError(f"{name} ended {run.state.name if run.state else 'unknown'}: {run.state.message if run.state else ''}")
    return run.state.result()


def _wait_for_stop() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1):
            pass
    except KeyboardInterrupt:
        pass


def stop_demo(workdir: Path) -> bool:
    """Stop a running demo (from another shell): it cleans up after itself. True if one was running."""
    state = workdir / STATE_FILE
    if not state.exists():
        return False
    pid = int(json.loads(state.read_text())["pid"])
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        state.unlink(missing_ok=True)
        reap_orphans()
        return False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and state.exists():
        time.sleep(0.5)
    return True


def _flush_prefect_logs() -> None:
    # Logs go to the API in batches; send the last batch before the server stops.
    try:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)
    except Exception:
        pass
