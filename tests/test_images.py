"""images-backup and images-restore end to end: a real Docker engine (Debian's dockerd, private socket) reached over
the test sshd with strict host keys, images built here from small root filesystems, the S3 server, a Prefect server."""

from __future__ import annotations

import io
import json
import tarfile
import textwrap
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from devkit.sandbox import DockerDaemon, SshServer
from tests.conftest import file_keys
from tests.helpers import error_of, host_toml, log_rows, s3_keys

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dockerd() -> Iterator[DockerDaemon]:
    daemon = DockerDaemon().start()
    yield daemon
    daemon.stop()


def build_image(docker: DockerDaemon, ref: str, size: int = 200_000) -> str:
    """An image made from a small root filesystem of its own (unique content), tagged ``ref``; its image ID."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("etc/release", f"{ref} {uuid.uuid4()}\n".encode()), ("app/blob", uuid.uuid4().bytes * (size // 16))):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return docker.docker("import", "-", ref, input=buf.getvalue()).decode().strip()


def container(docker: DockerDaemon, name: str, ref: str, project: str | None = None) -> None:
    labels = ["-l", f"com.docker.compose.project={project}", "-l", f"com.docker.compose.service={name}"] if project else []
    docker.docker("create", "--name", name, *labels, ref, "/app/run")


@pytest.fixture
def env(prefect_server: Any, write_settings: Any, database: str, bucket: str, key_file: Path, sshd: SshServer,
        dockerd: DockerDaemon, tmp_path: Path, s3_server: Any, pg_cluster: Any) -> dict[str, Any]:
    for cid in dockerd.docker("ps", "-aq").split():  # each test starts from a host without containers or images
        dockerd.docker("rm", "-f", cid.decode())
    for iid in set(dockerd.docker("images", "-q").split()):
        dockerd.docker("rmi", "-f", iid.decode())
    known = tmp_path / "known_hosts"
    known.write_text(sshd.known_hosts_line)

    def settings(extra: str = "", images: str = "") -> Path:
        return write_settings(database, bucket, file_keys(key_file), host_toml("docker1", sshd, known) + textwrap.dedent(f"""
            [images]
            hosts = ["docker1"]
            command = "{dockerd.command}"
            attempts = 1
            """) + textwrap.dedent(images) + textwrap.dedent(extra))

    settings()
    return {"settings": settings, "docker": dockerd, "s3": s3_server, "bucket": bucket, "known": known, "tmp": tmp_path,
            "cluster": pg_cluster, "database": database, "sshd": sshd}


def backup(**params: Any) -> Any:
    from flows.images_backup import images_backup

    return images_backup(**params, return_state=True)


def restore(**params: Any) -> Any:
    from flows.images_restore import images_restore

    return images_restore(**params, return_state=True)


def image_objects(env: dict[str, Any]) -> list[str]:
    return [k for k in s3_keys(env["s3"], env["bucket"]) if "/image-objects/" in k]


def test_images_are_stored_once_by_id_reused_next_week_and_stored_again_when_a_tag_moves(env: dict[str, Any]) -> None:
    docker = env["docker"]
    api = build_image(docker, "luxima/api:1")
    web = build_image(docker, "luxima/web:latest")
    container(docker, "api-1", "luxima/api:1", "app")
    container(docker, "api-2", "luxima/api:1", "app")  # two containers, one image: stored once
    container(docker, "web", "luxima/web:latest", "app")

    state = backup()
    assert state.is_completed(), state.message
    host = state.result()["hosts"]["docker1"]
    assert (host["containers"], host["new"], host["reused"]) == (3, 2, 0)
    objects = image_objects(env)
    assert sorted(o.rsplit("/", 1)[1].split(".")[0] for o in objects) == sorted(i.split(":")[1] for i in (api, web))
    doc = json.loads(env["s3"].client().get_object(Bucket=env["bucket"], Key=host["manifest_key"])["Body"].read())
    by_name = {c["name"]: c for c in doc["containers"]}
    assert by_name["api-1"]["image_id"] == by_name["api-2"]["image_id"] == api
    assert by_name["web"]["image_ref"] == "luxima/web:latest" and by_name["web"]["compose_project"] == "app"
    stored = {i["image_id"]: i for i in doc["images"]}
    assert stored[api]["refs"] == ["luxima/api:1"] and stored[api]["new"] and doc["mac"]
    for obj in objects:  # encrypted: no tar header, no file content in the clear
        body = env["s3"].client().get_object(Bucket=env["bucket"], Key=obj)["Body"].read()
        assert body.startswith(b"\x89LXB") and b"luxima/api" not in body and b"manifest.json" not in body

    # the next week, nothing new: nothing uploaded, the images reused from the earlier manifest
    state = backup()
    assert state.is_completed(), state.message
    again = state.result()["hosts"]["docker1"]
    assert (again["new"], again["reused"], again["bytes"]) == (0, 2, 0)
    assert image_objects(env) == objects

    # a new image under the same tag (a moved :latest): stored again; the old one stays for the older backups
    web2 = build_image(docker, "luxima/web:latest")
    docker.docker("rm", "-f", "web")
    container(docker, "web", "luxima/web:latest", "app")
    state = backup()
    assert state.is_completed(), state.message
    third = state.result()["hosts"]["docker1"]
    assert (third["new"], third["reused"]) == (1, 1) and web2 != web
    assert len(image_objects(env)) == 3
    rows = [r for r in log_rows(env["cluster"], env["database"]) if r["component"] == "images"]
    assert [r["status"] for r in rows] == ["success"] * 3 and rows[-1]["details"]["new"] == 1

    from typer.testing import CliRunner

    from app.cli import app

    listed = CliRunner().invoke(app, ["list", "--component", "images", "--json"])
    assert listed.exit_code == 0, listed.output
    found = json.loads(listed.stdout)
    assert [b["backup_id"] for b in found] == [host["backup_id"], again["backup_id"], third["backup_id"]]
    assert found[-1]["type"] == "2 image(s)" and found[-1]["object_key"] == "3 container(s)"


def test_a_host_without_containers_is_reported_not_an_error(env: dict[str, Any]) -> None:
    state = backup()
    assert state.is_completed(), state.message
    host = state.result()["hosts"]["docker1"]
    assert host["no_containers"] and host["containers"] == 0 and image_objects(env) == []


def test_a_filtered_backup_and_an_unknown_host_key_refused(env: dict[str, Any]) -> None:
    docker = env["docker"]
    build_image(docker, "luxima/api:1")
    build_image(docker, "other/tool:3")
    container(docker, "api", "luxima/api:1", "app")
    container(docker, "tool", "other/tool:3")
    env["settings"](images='compose_projects = ["app"]\n')
    state = backup()
    assert state.is_completed(), state.message
    host = state.result()["hosts"]["docker1"]
    assert host["containers"] == 1 and host["skipped"] == [
        {"container": "tool", "image": "other/tool:3", "why": "not in compose projects ['app']"}]

    import subprocess

    other = env["tmp"] / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    env["known"].write_text(f"[127.0.0.1]:{env['sshd'].port} " + (other.parent / "other_host_key.pub").read_text())
    state = backup()
    assert state.is_failed()
    assert "host key" in str(error_of(state)).lower()


@pytest.fixture(scope="module")
def dockerd2() -> Iterator[DockerDaemon]:
    """A second, empty engine: the rebuilt host."""
    daemon = DockerDaemon().start()
    yield daemon
    daemon.stop()


def test_restore_onto_an_empty_host_loads_checked_images_with_their_tags_and_refuses_a_tampered_one(
    env: dict[str, Any], dockerd2: DockerDaemon,
) -> None:
    docker = env["docker"]
    api = build_image(docker, "luxima/api:1")
    web = build_image(docker, "luxima/web:latest")
    container(docker, "api", "luxima/api:1", "app")
    container(docker, "web", "luxima/web:latest", "site")
    state = backup()
    assert state.is_completed(), state.message
    for cid in dockerd2.docker("ps", "-aq").split():
        dockerd2.docker("rm", "-f", cid.decode())
    for iid in set(dockerd2.docker("images", "-q").split()):
        dockerd2.docker("rmi", "-f", iid.decode())
    # the new host: another [hosts.NAME] (the same sshd here), with its own engine (images.command names its socket)
    config = env["settings"](extra=host_toml("docker2", env["sshd"], env["known"]))
    config.write_text(config.read_text().replace(docker.command, dockerd2.command))

    # one compose project only
    state = restore(host="docker1", target_host="docker2", compose_projects=["app"])
    assert state.is_completed(), state.message
    result = state.result()
    assert [(r["image"], r["action"]) for r in result["images"]] == [(api, "loaded")]
    assert dockerd2.docker("image", "inspect", "--format", "{{.Id}}", "luxima/api:1").decode().strip() == api
    assert b"luxima/web" not in dockerd2.docker("images")

    # a stored image altered in storage (one byte): refused before docker load; nothing of it on the host
    client = env["s3"].client()
    [web_key] = [k for k in image_objects(env) if web.split(":")[1] in k]
    body = bytearray(client.get_object(Bucket=env["bucket"], Key=web_key)["Body"].read())
    body[len(body) // 2] ^= 1
    client.put_object(Bucket=env["bucket"], Key=web_key, Body=bytes(body))
    state = restore(host="docker1", target_host="docker2", refs=["luxima/web:latest"])
    assert state.is_failed()
    assert "sha256" in str(error_of(state)) or "authentic" in str(error_of(state)).lower()
    assert b"luxima/web" not in dockerd2.docker("images")

    # a tag that names another image on the target: moved only with confirm
    build_image(dockerd2, "luxima/api:1")  # someone rebuilt api:1 there
    state = restore(host="docker1", target_host="docker2", refs=["luxima/api:1"])
    exc = error_of(state)
    assert state.is_failed() and "name other images now" in str(exc) and "confirm = 'docker2'" in str(exc.hint)
    state = restore(host="docker1", target_host="docker2", refs=["luxima/api:1"], confirm="docker2")
    assert state.is_completed(), state.message
    assert dockerd2.docker("image", "inspect", "--format", "{{.Id}}", "luxima/api:1").decode().strip() == api


def test_the_prune_removes_an_image_object_only_when_no_kept_backup_names_it(env: dict[str, Any]) -> None:
    """keep_last = 1: the older backups go; the image only they named goes once it stayed unreferenced past the grace
    period (two prunes); the image the kept backup shares with them stays."""
    import time

    from flows.prune import prune

    docker = env["docker"]
    api = build_image(docker, "luxima/api:1")
    old_web = build_image(docker, "luxima/web:latest")
    container(docker, "api", "luxima/api:1", "app")
    container(docker, "web", "luxima/web:latest", "app")
    assert backup().is_completed()
    new_web = build_image(docker, "luxima/web:latest")  # the tag moved
    docker.docker("rm", "-f", "web")
    container(docker, "web", "luxima/web:latest", "app")
    time.sleep(1.1)  # backup ids are by the second
    assert backup().is_completed()
    env["settings"](extra="[retention]\ngrace_hours = 0.0005\n[retention.policies.images]\nkeep_last = 1\n")
    assert {k.rsplit("/", 1)[1].split(".")[0] for k in image_objects(env)} == {i.split(":")[1] for i in (api, old_web, new_web)}

    first = prune(components=["images"])
    assert first["targets"]["images/docker1"]["removed"] == 1
    assert len(image_objects(env)) == 4  # three images and the collector's record: old_web is only marked
    time.sleep(2.5)
    prune(components=["images"])
    left = {k.rsplit("/", 1)[1].split(".")[0] for k in image_objects(env) if not k.endswith("gc-state.json")}
    assert left == {api.split(":")[1], new_web.split(":")[1]}
    # what is kept still restores: its objects are all there
    from luxima_backup import runtime

    [kept] = runtime.catalog("images").list_backups("images", "docker1")
    assert {i.image_id for i in kept.manifest.images} == {api, new_web}  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def registry() -> Iterator[Any]:
    from devkit.sandbox import DockerRegistry

    reg = DockerRegistry(user="luxima", password="registry-" + uuid.uuid4().hex[:8]).start()
    yield reg
    reg.stop()


def test_registry_images_need_their_credentials_are_stored_by_id_and_load_onto_a_host(
    env: dict[str, Any], registry: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    docker = env["docker"]
    api = build_image(docker, "luxima/api:7")
    archive = env["tmp"] / "api.tar"
    archive.write_bytes(docker.docker("save", "luxima/api:7"))
    registry.push(archive, "apps/api:7")
    registry.push(archive, "apps/api:stable")  # the same image under two tags: stored once
    docker.docker("rmi", "-f", api)
    monkeypatch.setenv("LUXIMA_TEST_REGISTRY_USER", "luxima")
    monkeypatch.setenv("LUXIMA_TEST_REGISTRY_PASSWORD", "wrong")
    reg_toml = textwrap.dedent(f"""
        [images.registries.apps]
        address = "{registry.address}"
        repositories = ["apps/api:7", "apps/api:stable"]
        username = "env:LUXIMA_TEST_REGISTRY_USER"
        password = "env:LUXIMA_TEST_REGISTRY_PASSWORD"
        tls_verify = false
        """)
    env["settings"](extra=reg_toml)
    state = backup(registries=["apps"])
    assert state.is_failed() and "authentication required" in str(error_of(state)) and image_objects(env) == []
    assert "wrong" not in str(error_of(state))  # the password is never in an error

    monkeypatch.setenv("LUXIMA_TEST_REGISTRY_PASSWORD", registry.password)
    state = backup(registries=["apps"])
    assert state.is_completed(), state.message
    result = state.result()["hosts"]["registry-apps"]
    assert result["new"] == 1 and [r["image"] for r in result["images"]] == [api]
    assert [o.rsplit("/", 1)[1].split(".")[0] for o in image_objects(env)] == [api.split(":")[1]]

    state = restore(host="registry-apps", target_host="docker1")
    assert state.is_completed(), state.message
    for ref in (f"{registry.address}/apps/api:7", f"{registry.address}/apps/api:stable"):
        assert docker.docker("image", "inspect", "--format", "{{.Id}}", ref).decode().strip() == api

    # or into another registry (the rebuilt one): pushed under the same repository paths, then resolved by ID
    from devkit.sandbox import DockerRegistry

    mirror = DockerRegistry().start()
    try:
        env["settings"](extra=reg_toml + textwrap.dedent(f"""
            [images.registries.mirror]
            address = "{mirror.address}"
            repositories = ["apps/api:7"]
            tls_verify = false
            """))
        state = restore(host="registry-apps", to_registry="mirror")
        assert state.is_completed(), state.message
        assert [r["action"] for r in state.result()["images"]] == ["pushed"]
        import hashlib
        import subprocess

        for path in ("apps/api:7", "apps/api:stable"):
            config = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--config", "--raw",
                                     f"docker://{mirror.address}/{path}"], capture_output=True, check=True).stdout
            assert "sha256:" + hashlib.sha256(config).hexdigest() == api
        assert not list((env["tmp"] / "work").glob("registry-*"))  # the clear archive pushed from is gone
        state = restore(host="registry-apps", to_registry="mirror")  # there already: nothing pushed
        assert [r["action"] for r in state.result()["images"]] == ["present"]
    finally:
        mirror.stop()


def test_under_object_lock_a_reused_image_object_stays_locked_as_long_as_its_newest_backup(env: dict[str, Any]) -> None:
    """A lock set at the first upload would expire while later backups still use the object: each reuse extends it."""
    from datetime import datetime, timedelta, timezone

    from luxima_backup import runtime

    locked = "t-imglock-" + uuid.uuid4().hex[:8]
    env["s3"].create_bucket(locked, object_lock=True)
    docker = env["docker"]
    api = build_image(docker, "luxima/api:1")
    container(docker, "api", "luxima/api:1", "app")

    def with_lock(days: int) -> None:
        config = env["settings"](images=f"retention_days = {days}\n")
        config.write_text(config.read_text().replace(env["bucket"], locked)
                          .replace("multipart_chunk_mib = 5", 'multipart_chunk_mib = 5\nobject_lock = "governance"'))

    with_lock(10)
    assert backup().is_completed()
    store = runtime.store(runtime.settings())
    [key] = [o.key for o in store.list("backups/image-objects/")]
    first = store.locked_until(key)
    assert first is not None and timedelta(days=10) < first - datetime.now(timezone.utc) < timedelta(days=12)
    with_lock(20)  # a longer retention now: the next backup reuses the object and extends its lock
    state = backup()
    assert state.is_completed() and state.result()["hosts"]["docker1"]["reused"] == 1
    store = runtime.store(runtime.settings())
    second = store.locked_until(key)
    assert second is not None and timedelta(days=20) < second - datetime.now(timezone.utc) < timedelta(days=22)
    assert api.split(":")[1] in key


def test_a_registry_over_tls_is_trusted_through_its_ca_certificate_only(env: dict[str, Any]) -> None:
    from devkit.sandbox import DockerRegistry
    from tests.simulators.proxmox import _self_signed

    cert, key, _ = _self_signed(["127.0.0.1"])
    ca = env["tmp"] / "registry-ca.pem"
    ca.write_bytes(cert)
    docker = env["docker"]
    web = build_image(docker, "luxima/web:2")
    archive = env["tmp"] / "web.tar"
    archive.write_bytes(docker.docker("save", "luxima/web:2"))
    reg = DockerRegistry(tls=(cert, key)).start()
    try:
        reg.push(archive, "apps/web:2")
        section = textwrap.dedent(f"""
            [images.registries.secure]
            address = "{reg.address}"
            repositories = ["apps/web:2"]
            tls_verify = true
            """)
        env["settings"](extra=section)  # the certificate is not one this machine trusts: refused
        state = backup(registries=["secure"])
        assert state.is_failed() and "certificate" in str(error_of(state))
        env["settings"](extra=section + f'ca_cert = "{ca}"\n')
        state = backup(registries=["secure"])
        assert state.is_completed(), state.message
        assert [r["image"] for r in state.result()["hosts"]["registry-secure"]["images"]] == [web]
    finally:
        reg.stop()
