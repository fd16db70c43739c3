"""Container image stages: a Docker host's inventory, ``docker save`` streamed out over SSH, a stored image read back
and checked, and ``docker load`` fed over SSH from the decrypted stream.

The engine is whatever ``images.command`` calls on the host (``docker``, ``sudo docker``, ``podman``); every
command's exit status is checked, and its error output is part of the error.
"""

from __future__ import annotations

import shlex
import socket
import threading
from typing import Any

import paramiko
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from luxima_backup import runtime, ssh
from luxima_backup.compression import DecompressingReader
from luxima_backup.envelope import DecryptingReader
from luxima_backup.errors import BackupError, IntegrityError, VerificationError
from luxima_backup.images import Container, ImageInfo, check_image_archive, parse_containers, parse_images
from luxima_backup.pipes import Link, Meter, MeteredReader, copy, drain, stage
from luxima_backup.secrets import redact

READ_SIZE = 1 << 20


def engine(settings: Any, *args: str) -> str:
    """A command line for the host's container engine (``images.command`` and the quoted arguments)."""
    return " ".join([settings.images.command, *(shlex.quote(a) for a in args)])


def _run(client: paramiko.SSHClient, command: str, what: str, timeout: float = 600) -> bytes:
    status, out, err = ssh.run(client, command, timeout=timeout)
    if status != 0:
        text = redact(err.decode(errors="replace").strip())[-800:]
        transient = "Cannot connect to the Docker daemon" in text or "connection refused" in text.lower()
        raise BackupError(f"{what} failed (exit {status}): {text or 'no error output'}", transient=transient,
                          hint="check images.command and that the engine runs on the host")
    return out


def read_inventory(host: str) -> tuple[list[Container], dict[str, ImageInfo]]:
    """Every container of the host (running and stopped) and the images they run."""
    settings = runtime.settings()
    with runtime.connect_host(host, settings) as client:
        ids = _run(client, engine(settings, "ps", "-a", "--no-trunc", "-q"), f"listing the containers of {host}").split()
        if not ids:
            return [], {}
        containers = parse_containers(_run(client, engine(settings, "container", "inspect", *[i.decode() for i in ids]),
                                           f"inspecting the containers of {host}"))
        image_ids = sorted({c.image_id for c in containers})
        images = parse_images(_run(client, engine(settings, "image", "inspect", *image_ids), f"inspecting the images of {host}"))
    return containers, images


@task(name="inventory", cache_policy=NO_CACHE, persist_result=False, **runtime.TRANSIENT_RETRIES)
def inventory(host: str) -> dict[str, Any]:
    """The host's containers and their images (ids, tags, digests, compose project and service)."""
    containers, images = read_inventory(host)
    get_run_logger().info("%s: %d container(s), %d image(s)", host, len(containers), len(images))
    return {"containers": [c.__dict__ for c in containers], "images": {k: v.__dict__ for k, v in images.items()}}


@task(name="save", cache_policy=NO_CACHE, persist_result=False)
def save_image(host: str, image_id: str, sink: Link) -> dict[str, Any]:
    """``docker save <image id>`` on the host, its output streamed into the next stage as it arrives."""
    settings = runtime.settings()
    meter = Meter()
    with stage(None, sink), runtime.connect_host(host, settings) as client:
        out = sink.writer()
        try:
            channel = client.get_transport().open_session()  # type: ignore[union-attr]
            channel.settimeout(settings.hosts[host].io_timeout)
            channel.exec_command(engine(settings, "save", image_id))
            errors: list[bytes] = []
            reader = threading.Thread(target=lambda: errors.append(_read_all(channel.makefile_stderr("rb"))), daemon=True)
            reader.start()  # the error stream read beside: a full window there would stall the archive
            copy(channel.makefile("rb"), out, meter, READ_SIZE)
            status = channel.recv_exit_status()
            reader.join(timeout=30)
        except (paramiko.SSHException, socket.timeout, OSError) as exc:
            raise ssh.SshError(f"docker save of {image_id} on {host} was cut: {exc}", transient=True) from None
        if status != 0:
            text = redact(b"".join(errors).decode(errors="replace").strip())[-800:]
            raise BackupError(f"docker save of {image_id} on {host} failed (exit {status}): {text}")
        if meter.size == 0:
            raise IntegrityError(f"docker save of {image_id} on {host} wrote nothing")
    return {"bytes": meter.size, "sha256": meter.hexdigest, "seconds": round(meter.seconds, 3)}


def _read_all(f: Any) -> bytes:
    try:
        return bytes(f.read())
    except Exception:  # noqa: BLE001 - only the error text is lost
        return b""


def check_stored_image(key: str, image_id: str, codec: str, binding: dict[str, str] | None,
                       expected: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a stored image back whole from storage and check it (``check_image_object``)."""
    with runtime.store().load(key) as body:
        return check_image_object(body, key, image_id, codec, binding, expected)


def check_image_object(body: Any, key: str, image_id: str, codec: str, binding: dict[str, str] | None,
                       expected: dict[str, Any] | None = None) -> dict[str, Any]:
    """An image object read whole (from storage, or a downloaded copy): every chunk authenticated, its header naming
    this object, the archive's config hashing to ``image_id``; with ``expected`` (what the upload measured, or the
    manifest) the sizes and sha256s too."""
    sealed, plain = Meter(), Meter()
    reader = DecryptingReader(MeteredReader(body, sealed), runtime.key_provider().unwrap,  # type: ignore[arg-type]
                              expect=binding, where=key)
    archive = MeteredReader(DecompressingReader(reader, codec), plain)
    try:
        result = check_image_archive(archive, image_id)  # type: ignore[arg-type]
    except IntegrityError as exc:
        raise VerificationError(f"{key}: {exc}") from None
    drain(archive)
    result.update(size=sealed.size, sha256=sealed.hexdigest, plain_bytes=plain.size, plain_sha256=plain.hexdigest)
    if expected is not None:
        for what, got, want in (("stored size", sealed.size, expected["encrypted_bytes"]),
                                ("sha256 of the stored object", sealed.hexdigest, expected["encrypted_sha256"]),
                                ("sha256 of the archive", plain.hexdigest, expected["plain_sha256"])):
            if got != want:
                raise VerificationError(f"{key}: {what} is {got}, the upload measured {want}")
    return result


@task(name="verify-image", cache_policy=NO_CACHE, persist_result=False, **runtime.TRANSIENT_RETRIES)
def verify_image(key: str, image_id: str, codec: str, binding: dict[str, str], expected: dict[str, Any]) -> dict[str, Any]:
    """The stored image read back and checked against the image ID and what was uploaded."""
    result = check_stored_image(key, image_id, codec, binding, expected)
    get_run_logger().info("verified %s: %s, %d layer(s)", key, image_id[:19], result["layers"])
    return result


@task(name="load", cache_policy=NO_CACHE, persist_result=False)
def load_image(host: str, spool: str, codec: str, image_id: str, binding: dict[str, str] | None) -> dict[str, Any]:
    """``docker load`` on the host, fed from the (already checked) ciphertext spool decrypted on the way; the image ID
    it reports must be the one recorded."""
    settings = runtime.settings()
    with runtime.connect_host(host, settings) as client, open(spool, "rb") as f:
        plain = DecompressingReader(DecryptingReader(f, runtime.key_provider(settings).unwrap, expect=binding,  # type: ignore[arg-type]
                                                     where=spool), codec)
        try:
            stdin, out, err = client.exec_command(engine(settings, "load"), timeout=settings.hosts[host].io_timeout)
            copy(plain, stdin, Meter(), READ_SIZE)
            stdin.channel.shutdown_write()
            stdout, stderr = out.read(), err.read()
            status = out.channel.recv_exit_status()
        except (paramiko.SSHException, socket.timeout, OSError) as exc:
            raise ssh.SshError(f"docker load on {host} was cut: {exc}", transient=True) from None
    text = stdout.decode(errors="replace")
    if status != 0:
        raise BackupError(f"docker load on {host} failed (exit {status}): "
                          f"{redact(stderr.decode(errors='replace').strip())[-800:]}")
    # the engine reports "Loaded image ID: sha256:…" or, for an archive that carries a tag, "Loaded image: repo:tag":
    # either way the image must now exist under the recorded ID
    if host_image_ids(host, [image_id]).get(image_id) != image_id:
        raise VerificationError(f"after docker load on {host} ({text.strip()[-300:]!r}) there is no image {image_id}")
    return {"image_id": image_id, "output": text.strip()[-300:]}


def host_image_ids(host: str, refs: list[str]) -> dict[str, str | None]:
    """For each reference, the image ID it names on the host now (None: not there)."""
    settings = runtime.settings()
    found: dict[str, str | None] = {}
    with runtime.connect_host(host, settings) as client:
        for ref in refs:
            status, out, _ = ssh.run(client, engine(settings, "image", "inspect", "--format", "{{.Id}}", ref))
            found[ref] = out.decode().strip().splitlines()[0] if status == 0 and out.strip() else None
    return {k: (v if v is None or v.startswith("sha256:") else f"sha256:{v}") for k, v in found.items()}


def tag(host: str, image_id: str, refs: list[str]) -> None:
    settings = runtime.settings()
    with runtime.connect_host(host, settings) as client:
        for ref in refs:
            _run(client, engine(settings, "tag", image_id, ref), f"tagging {image_id[:19]} as {ref} on {host}")
