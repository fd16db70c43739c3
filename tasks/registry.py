"""Registry images with skopeo: an image's ID read from its config, and the image streamed out as a docker-archive.

skopeo writes archives only to a path, so it writes into a FIFO in a private folder and this process reads the
other end into the next stage: the image never lands on this machine's disk. (An ``oci-archive`` is first laid
out in a temporary directory by skopeo, plaintext on disk; a ``docker-archive`` is written as a stream, and it is
what ``docker load`` takes.) Credentials go to skopeo in an auth file (0600, in the same private folder,
removed after), never on its command line, where any local user could read them.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import select
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from prefect import task
from prefect.cache_policies import NO_CACHE

from luxima_backup import procs, runtime
from luxima_backup.errors import BackupError, ConfigError, IntegrityError
from luxima_backup.pipes import Link, Meter, copy, stage
from luxima_backup.secrets import redact
from luxima_backup.settings import ImageRegistry
from luxima_backup.workdir import private_dir

READ_SIZE = 1 << 20


def skopeo() -> str:
    found = shutil.which("skopeo")
    if found is None:
        raise ConfigError("skopeo is not installed here", hint="apt-get install skopeo (scripts/bootstrap.sh does)")
    return found


@contextlib.contextmanager
def access(name: str, reg: ImageRegistry, side: str = "src") -> Iterator[tuple[list[str], Path]]:
    """skopeo's options for reaching registry ``name`` (``side``: src or dest), and a private folder for the run."""
    settings = runtime.settings()
    work = private_dir(settings.work_dir, "registry-")
    try:
        args = [f"--{side}-tls-verify={'true' if reg.tls_verify else 'false'}"]
        if reg.ca_cert is not None:
            certs = work / "certs"
            certs.mkdir(mode=0o700)
            shutil.copyfile(reg.ca_cert, certs / "ca.crt")
            args.append(f"--{side}-cert-dir={certs}")
        if reg.username is not None and reg.password is not None:
            user, password = runtime.secret(reg.username, settings), runtime.secret(reg.password, settings)
            auth = work / "auth.json"
            fd = os.open(auth, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"auths": {reg.address: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}}}, f)
            args.append(f"--{side}-authfile={auth}")
        yield args, work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _inspect_args(args: list[str]) -> list[str]:
    # skopeo inspect spells the options without the src-/dest- side
    return [a.replace("--src-", "--", 1) for a in args]


def _run(cmd: list[str], what: str) -> bytes:
    done = procs.run(cmd, timeout=600)
    if done.returncode != 0:
        text = redact(done.stderr.decode(errors="replace").strip())[-800:]
        transient = any(w in text.lower() for w in ("connection refused", "timeout", "i/o timeout", "503", "502"))
        raise BackupError(f"{what} failed (exit {done.returncode}): {text}", transient=transient,
                          hint="check the registry's address, credentials and TLS settings ([images.registries.NAME])")
    return done.stdout


def resolve(name: str, ref: str) -> dict[str, Any]:
    """The image ``ref`` (repository:tag or @digest) of registry ``name``: its ID (the sha256 of its config, what it is
    stored by) and its manifest digest."""
    reg = runtime.settings().images.registries[name]
    with access(name, reg) as (args, _):
        config = _run([skopeo(), "inspect", *_inspect_args(args), "--config", "--raw", f"docker://{reg.address}/{ref}"],
                      f"reading the config of {reg.address}/{ref}")
        raw_manifest = _run([skopeo(), "inspect", *_inspect_args(args), "--raw", f"docker://{reg.address}/{ref}"],
                            f"reading the manifest of {reg.address}/{ref}")
    repo = ref.split("@", 1)[0].rsplit(":", 1)[0] if "@" in ref or ":" in ref.rsplit("/", 1)[-1] else ref
    return {"image_id": "sha256:" + hashlib.sha256(config).hexdigest(), "ref": f"{reg.address}/{ref}",
            "repo_digest": f"{reg.address}/{repo}@sha256:{hashlib.sha256(raw_manifest).hexdigest()}"}


@task(name="copy-from-registry", cache_policy=NO_CACHE, persist_result=False)
def copy_from_registry(name: str, ref: str, sink: Link) -> dict[str, Any]:
    """``skopeo copy docker://… docker-archive:FIFO`` with the FIFO read into the next stage as skopeo writes it."""
    reg = runtime.settings().images.registries[name]
    meter = Meter()
    with stage(None, sink), access(name, reg) as (args, work):
        fifo = work / "image.fifo"
        os.mkfifo(fifo, 0o600)
        proc = procs.popen([skopeo(), "copy", "--quiet", *args, f"docker://{reg.address}/{ref}",
                            f"docker-archive:{fifo}:{reg.address}/{ref}"], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        errors: list[bytes] = []
        reader = threading.Thread(target=lambda: errors.append(proc.stderr.read() if proc.stderr else b""), daemon=True)
        reader.start()
        out = sink.writer()
        # opening the FIFO waits for skopeo to open its end; if skopeo fails first, nothing ever opens it
        opened = _open_fifo(fifo, proc)
        if opened is not None:
            with opened as f:
                copy(f, out, meter, READ_SIZE)
        status = proc.wait()
        reader.join(timeout=30)
        if status != 0:
            text = redact(b"".join(errors).decode(errors="replace").strip())[-800:]
            raise BackupError(f"skopeo copy of {reg.address}/{ref} failed (exit {status}): {text}",
                              hint="check the registry's address, credentials and TLS settings")
        if meter.size == 0:
            raise IntegrityError(f"skopeo copy of {reg.address}/{ref} wrote nothing")
    return {"bytes": meter.size, "sha256": meter.hexdigest, "seconds": round(meter.seconds, 3)}


def _open_fifo(fifo: Path, proc: Any) -> Any:
    """Open the FIFO for reading without blocking forever on a writer that already died."""
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:  # data (or the writer's close) arrived: from now on blocking reads
                os.set_blocking(fd, True)
                return os.fdopen(fd, "rb")
            if proc.poll() is not None:
                os.close(fd)
                return None
            time.sleep(0.01)
    except BaseException:
        os.close(fd)
        raise


def repository_path(ref: str) -> str:
    """A reference without its registry host (``127.0.0.1:5000/apps/api:7`` → ``apps/api:7``; ``luxima/api:1`` stays):
    the Docker reference grammar's rule, a first component with a dot or a colon, or ``localhost``."""
    first, sep, rest = ref.partition("/")
    return rest if sep and ("." in first or ":" in first or first == "localhost") else ref


@task(name="push-to-registry", cache_policy=NO_CACHE, persist_result=False)
def push_to_registry(name: str, spool: str, codec: str, image_id: str, binding: dict[str, str] | None,
                     refs: list[str]) -> dict[str, Any]:
    """The (already checked) image into registry ``name`` under each of ``refs`` (their repository paths), with skopeo;
    each reference must then resolve to ``image_id``.

    skopeo reads a docker-archive only from a regular file (a FIFO fails: it seeks), so the decrypted archive is
    written to a private folder (0700, the file 0600) for the copy and removed right after: the one place an image is
    in the clear on this machine's disk, for as long as the push takes.
    """
    from luxima_backup.compression import DecompressingReader
    from luxima_backup.envelope import DecryptingReader

    reg = runtime.settings().images.registries[name]
    paths = [repository_path(r) for r in refs] or [f"luxima-restored/{image_id.split(':', 1)[1][:12]}:latest"]
    with access(name, reg, side="dest") as (args, work):
        archive = work / "image.tar"
        with open(spool, "rb") as f, open(archive, "wb", opener=lambda p, fl: os.open(p, fl | os.O_EXCL, 0o600)) as out:
            copy(DecompressingReader(DecryptingReader(f, runtime.key_provider().unwrap, expect=binding,  # type: ignore[arg-type]
                                                             where=spool), codec), out, Meter())
        first = f"docker://{reg.address}/{paths[0]}"
        _run([skopeo(), "copy", "--quiet", *args, f"docker-archive:{archive}", first], f"pushing {image_id[:19]} to {first}")
        archive.unlink()
        for path in paths[1:]:  # the other tags: copied inside the registry
            src_args = [a.replace("--dest-", "--src-", 1) for a in args]
            _run([skopeo(), "copy", "--quiet", *src_args, *args, first, f"docker://{reg.address}/{path}"],
                 f"tagging {first} as {path}")
    found = {p: resolve(name, p)["image_id"] for p in paths}
    wrong = [p for p, iid in found.items() if iid != image_id]
    if wrong:
        raise IntegrityError(f"after the push, {wrong} in {reg.address} are not the image {image_id}")
    return {"registry": reg.address, "refs": [f"{reg.address}/{p}" for p in paths]}


def registry_image_ids(name: str, paths: list[str]) -> dict[str, str | None]:
    """For each repository path, the image ID it names in registry ``name`` now (None: not there)."""
    found: dict[str, str | None] = {}
    for path in paths:
        try:
            found[path] = resolve(name, path)["image_id"]
        except BackupError as exc:
            if "manifest unknown" not in str(exc) and "name unknown" not in str(exc) and "not found" not in str(exc).lower():
                raise
            found[path] = None
    return found
