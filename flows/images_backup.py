"""The images backup flow (weekly, after the config backup): the exact images the platform's containers run.

Per Docker host (``[images] hosts``, over SSH with strict host keys; an ``images-backup-host`` subflow):
the containers (running and stopped) and the image each runs, by image ID, with its tags, repo digests and
compose project/service. Every image ID not already stored is streamed ``docker save`` over SSH →
compress → encrypt → upload (``images-backup-stream``, retried whole on transient errors), stored once by
its ID under ``<prefix>/image-objects/`` (an image kept by many containers, hosts and weeks is one object),
then read back and checked: decrypted, decompressed, its config hashing to the image ID. An image already
stored is reused only when an authentic earlier manifest records it. The host's manifest, written last,
maps containers → image ref, image ID → stored object. A host without containers is reported, not an error.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from luxima_backup import __version__, events, manifest, runtime
from luxima_backup.compression import SUFFIX
from luxima_backup.errors import BackupError, ConfigError, ObjectNotFound
from luxima_backup.images import Container, chosen
from luxima_backup.pipes import Link
from luxima_backup.secrets import install_log_redaction, redact
from luxima_backup.stages import run_linked
from flows.common import backup_start, discard, flow, logged, outcome, save_manifest, sealed_with, stream_with_retries
from tasks.compress import compress
from tasks.encrypt import encrypt
from tasks.images import inventory, save_image, verify_image
from tasks.log import log_run
from tasks.registry import copy_from_registry, resolve
from tasks.upload import upload


@flow(name="images-backup-stream", task_runner=ThreadPoolTaskRunner(max_workers=4), validate_parameters=False,
      persist_result=False)
def save_to_storage(kind: str, source: str, item: str, object_key: str, binding: dict[str, str],
                    attempt: int = 1) -> dict[str, Any]:
    """One attempt at streaming an image to storage: docker save on a host (``item``: the image ID), or skopeo copy from
    a registry (``item``: the reference) | compress | encrypt | upload."""
    cfg = runtime.settings().images
    links = saved, packed, sealed = Link("save→compress"), Link("compress→encrypt"), Link("encrypt→upload")

    def submit(futures: list[Any]) -> None:
        futures.append(save_image.submit(source, item, saved) if kind == "docker" else
                       copy_from_registry.submit(source, item, saved))
        futures.append(compress.submit(saved, packed, cfg.compression, cfg.effective_level, 0))
        futures.append(encrypt.submit(packed, sealed, "container image", binding))
        futures.append(upload.submit(sealed, object_key))

    s, c, e, u = run_linked(submit, list(links))
    return {"save": s, "compress": c, "encrypt": e, "upload": u}


def known_images() -> dict[str, manifest.StoredImage]:
    """The images earlier authentic manifests record as stored (any host's): what may be reused without uploading."""
    found: dict[str, manifest.StoredImage] = {}
    cat = runtime.catalog("images")
    for backup in cat.list_backups("images"):
        if not backup.verified:
            continue
        doc = backup.manifest
        assert isinstance(doc, manifest.ImagesManifest)
        for img in doc.images:
            found[img.image_id] = img
    return found


def store_images(kind: str, source: str, backup_id: str, wanted: list[tuple[str, list[str], list[str], str]],
                 uploaded: list[str]) -> tuple[list[manifest.StoredImage], list[dict[str, Any]]]:
    """Each image of ``wanted`` (image ID, tags, repo digests, what to save it by): reused when an earlier authentic
    manifest records it and its object is whole, else streamed to storage and read back (keys added to ``uploaded``)."""
    settings = runtime.settings()
    cfg = settings.images
    logger = get_run_logger()
    store = runtime.store(settings)
    known = known_images()
    stored: list[manifest.StoredImage] = []
    rows: list[dict[str, Any]] = []
    for iid, refs, digests, item in wanted:
        key = manifest.image_key(settings.storage.prefix, iid, SUFFIX[cfg.compression])
        previous = known.get(iid)
        if previous is not None and previous.key == key and _present(store, key, previous.size_encrypted):
            extend = getattr(store, "extend_lock", None)
            if extend is not None:  # under object lock: kept locked as long as this backup is kept
                extend(key)
            stored.append(previous.model_copy(update={"refs": refs, "repo_digests": digests, "new": False}))
            rows.append({"image": iid, "refs": ", ".join(refs), "action": "reused", "bytes": 0})
            continue
        bind = manifest.image_binding(backup_id, iid, key)
        stream = stream_with_retries(save_to_storage, (kind, source, item, key, bind), cfg.attempts, cfg.retry_delay_seconds)
        uploaded.append(key)
        sv, c, e, u = stream["save"], stream["compress"], stream["encrypt"], stream["upload"]
        if e["encrypted_sha256"] != u["sha256"] or e["encrypted_bytes"] != u["bytes"] or sv["sha256"] != c["plain_sha256"]:
            raise BackupError(f"the bytes of {iid} differ between the stages (saved, compressed, encrypted, uploaded)")
        checked = verify_image(key, iid, c["codec"], bind, {"encrypted_bytes": u["bytes"], "encrypted_sha256": u["sha256"],
                                                            "plain_sha256": c["plain_sha256"]})
        stored.append(manifest.StoredImage(
            key=key, compression=manifest.Compression(codec=c["codec"], level=c["level"]), size_encrypted=u["bytes"],
            sha256_encrypted=u["sha256"], bound=e["bound"], image_id=iid, encryption=sealed_with(e),
            size_plain=c["plain_bytes"], sha256_plain=c["plain_sha256"], refs=refs, repo_digests=digests,
            stored_by=backup_id, new=True))
        rows.append({"image": iid, "refs": ", ".join(refs), "action": "stored", "bytes": u["bytes"], "layers": checked["layers"]})
        logger.info("%s: stored %s (%s) as %s, %d bytes", source, iid[:19], ", ".join(refs) or "untagged", key, u["bytes"])
    return stored, rows


@flow(name="images-backup-registry", validate_parameters=False, persist_result=False)
def backup_registry(name: str) -> dict[str, Any]:
    """Back up the repositories listed for one registry ([images.registries.NAME]) with skopeo, stored like a host's."""
    settings = runtime.settings()
    install_log_redaction()
    logger = get_run_logger()
    reg = settings.images.registries[name]
    source = f"registry-{name}"
    started = backup_start(runtime.store(settings), settings.storage.prefix, "images", source, settings.work_dir)
    backup_id, manifest_key = manifest.images_keys(settings.storage.prefix, source, started)
    uploaded: list[str] = []
    store = runtime.store(settings)
    try:
        found = [resolve(name, ref) for ref in reg.repositories]
        by_id: dict[str, tuple[list[str], list[str], str]] = {}
        for ref, f in zip(reg.repositories, found):
            refs, digests, item = by_id.setdefault(f["image_id"], ([], [], ref))
            refs.append(f["ref"])
            digests.append(f["repo_digest"])
        wanted = [(iid, sorted(r), sorted(set(d)), item) for iid, (r, d, item) in sorted(by_id.items())]
        stored, rows = store_images("registry", name, backup_id, wanted, uploaded)
        finished = datetime.now(timezone.utc)
        save_manifest(manifest_key, manifest.ImagesManifest(
            backup_id=backup_id, status="verified", started_at=started, completed_at=finished,
            recovery_key_id=runtime.recovery_key_id(settings),
            source=manifest.ImagesSource(name=source, kind="registry", address=reg.address),
            tool={"luxima_backup": __version__, "copier": "skopeo"}, images=stored,
            retention_days=settings.images.retention_days,
            verification={"verified_at": finished.isoformat(), "images_checked": sum(r["action"] == "stored" for r in rows)},
            timings={"total": round((finished - started).total_seconds(), 3)},
            flow_run_id=str(flow_run.id) if flow_run.id else None))
    except BaseException as exc:
        if events.is_verification_failure(exc):
            events.verification_failed("backup", "images", source, str(exc), backup_id=backup_id)
        discard(uploaded, logger, store, manifest_key=manifest_key)
        raise
    return {"backup_id": backup_id, "manifest_key": manifest_key, "containers": 0, "skipped": [], "images": rows,
            "new": sum(r["action"] == "stored" for r in rows), "reused": sum(r["action"] == "reused" for r in rows),
            "bytes": sum(r["bytes"] for r in rows), "no_containers": False}


@flow(name="images-backup-host", validate_parameters=False, persist_result=False)
def backup_host(host: str) -> dict[str, Any]:
    """Back up the images one host's containers run: new ones stored and checked, known ones reused; the manifest last."""
    settings = runtime.settings()
    install_log_redaction()
    logger = get_run_logger()
    cfg = settings.images
    prefix = settings.storage.prefix
    started = backup_start(runtime.store(settings), prefix, "images", host, settings.work_dir)
    backup_id, manifest_key = manifest.images_keys(prefix, host, started)
    found = inventory(host)
    containers, images = found["containers"], found["images"]
    kept, skipped = [], []
    for c in containers:
        why = chosen(Container(**c), cfg.compose_projects, cfg.labels, cfg.names, cfg.exclude)
        (skipped.append({"container": c["name"], "image": c["image_ref"], "why": why}) if why else kept.append(c))
    wanted = [(iid, (images.get(iid) or {}).get("refs", []), (images.get(iid) or {}).get("repo_digests", []), iid)
              for iid in sorted({c["image_id"] for c in kept})]
    store = runtime.store(settings)
    uploaded: list[str] = []
    try:
        stored, rows = store_images("docker", host, backup_id, wanted, uploaded)
        finished = datetime.now(timezone.utc)
        document = manifest.ImagesManifest(
            backup_id=backup_id, status="verified", started_at=started, completed_at=finished,
            recovery_key_id=runtime.recovery_key_id(settings),
            source=manifest.ImagesSource(name=host, kind="docker", address=settings.hosts[host].host),
            tool={"luxima_backup": __version__, "engine": cfg.command}, images=stored,
            containers=[manifest.ContainerImage(name=c["name"], id=c["id"], state=c["state"], image_ref=c["image_ref"],
                                                image_id=c["image_id"], compose_project=c["labels"].get("com.docker.compose.project"),
                                                compose_service=c["labels"].get("com.docker.compose.service")) for c in kept],
            skipped=skipped, retention_days=cfg.retention_days,
            verification={"verified_at": finished.isoformat(), "images_checked": sum(r["action"] == "stored" for r in rows)},
            timings={"total": round((finished - started).total_seconds(), 3)},
            flow_run_id=str(flow_run.id) if flow_run.id else None,
        )
        save_manifest(manifest_key, document)
    except BaseException as exc:
        if events.is_verification_failure(exc):
            events.verification_failed("backup", "images", host, str(exc), backup_id=backup_id)
        discard(uploaded, logger, store, manifest_key=manifest_key)
        raise
    if not containers:
        logger.warning("%s has no containers: nothing to back up (recorded as an empty backup)", host)
    return {"backup_id": backup_id, "manifest_key": manifest_key, "containers": len(kept), "skipped": skipped,
            "images": rows, "new": sum(r["action"] == "stored" for r in rows),
            "reused": sum(r["action"] == "reused" for r in rows),
            "bytes": sum(r["bytes"] for r in rows), "no_containers": not containers}


def _present(store: Any, key: str, size: int) -> bool:
    """An earlier manifest's image object is still there, whole (its recorded size)."""
    try:
        return store.stat(key).size == size
    except ObjectNotFound:
        return False


@flow(name="images-backup", validate_parameters=True, persist_result=True)
def images_backup(hosts: list[str] | None = None, registries: list[str] | None = None) -> dict[str, Any]:
    """Back up the images the containers of the Docker hosts run (images.hosts) and the repositories listed for the
    registries (images.registries), each image stored once by its ID.

    Args:
        hosts: which of images.hosts (default: all of them; none when only registries are named).
        registries: which of images.registries (default: all of them; none when only hosts are named).
    """
    with runtime.time_limit(lambda s: s.images.timeout_seconds, "images-backup"):
        settings = runtime.settings()
        install_log_redaction()
        cfg = settings.images
        names = list(hosts) if hosts is not None else ([] if registries is not None else list(cfg.hosts))
        regs = list(registries) if registries is not None else ([] if hosts is not None else sorted(cfg.registries))
        if not names and not regs:
            raise ConfigError("no Docker hosts or registries configured for images",
                              hint="add images.hosts = ['NAME'] naming [hosts.NAME] sections, or [images.registries.NAME]")
        unknown = [n for n in names if n not in cfg.hosts] + [r for r in regs if r not in cfg.registries]
        if unknown:
            raise ConfigError(f"{unknown} not configured", hint=f"images.hosts: {cfg.hosts}; registries: {sorted(cfg.registries)}")
        started, t0 = datetime.now(timezone.utc), time.monotonic()
        results: dict[str, Any] = {}
        failures: dict[str, BaseException] = {}
        sources = [(n, lambda n=n: backup_host(n, return_state=True)) for n in names]
        sources += [(f"registry-{r}", lambda r=r: backup_registry(r, return_state=True)) for r in regs]
        for label, run in sources:  # one failing does not stop the others
            result, exc = outcome(run())
            if exc is None:
                results[label] = result
            else:
                failures[label] = exc
            _record(settings, label, result, exc, started)
        _publish([label for label, _ in sources], results, failures, time.monotonic() - t0)
        if failures:
            first = next(iter(failures.values()))
            cls = type(first) if isinstance(first, BackupError) else BackupError
            raise cls("images backup failed: " + "; ".join(f"{n}: {redact(str(e))}" for n, e in failures.items()))
        return {"hosts": results}


def _record(settings: Any, host: str, result: dict[str, Any] | None, failure: BaseException | None, started: datetime) -> None:
    run_id = str(flow_run.id) if flow_run.id else None
    if settings.log.enabled:
        details = {k: result[k] for k in ("images", "skipped", "new", "reused", "containers")} if result else {}
        logged(log_run, "finish", "backup", "images", host, host, "failed" if failure else "success", started,
               result["backup_id"] if result else None, result["manifest_key"] if result else None, run_id,
               redact(f"{type(failure).__name__}: {failure}") if failure else None, details,
               {"size_encrypted": result["bytes"]} if result else {})
    if result is not None:
        events.backup_succeeded("images", host, result["backup_id"], new=result["new"], reused=result["reused"])


def _publish(names: list[str], results: dict[str, Any], failures: dict[str, BaseException], seconds: float) -> None:
    table = []
    for n in names:
        r = results.get(n)
        if r is None:
            table.append({"host": n, "image": "", "refs": "", "action": f"FAILED: {redact(str(failures.get(n)))[:300]}", "bytes": 0})
            continue
        if r["no_containers"]:
            table.append({"host": n, "image": "", "refs": "", "action": "no containers on this host", "bytes": 0})
        table += [{"host": n, **{k: row.get(k) for k in ("image", "refs", "action", "bytes")}} for row in r["images"]]
        table += [{"host": n, "image": "", "refs": s["image"], "action": f"skipped {s['container']}: {s['why']}", "bytes": 0}
                  for s in r["skipped"]]
    create_table_artifact(key="images-backup", table=table, description="Images stored, reused and skipped")
    lines = [f"## Images backup of {len(names)} host(s) in {seconds:.1f}s", "",
             "| host | result | containers | new | reused | bytes stored |", "|---|---|---:|---:|---:|---:|"]
    for n in names:
        r = results.get(n)
        lines.append(f"| {n} | FAILED: {redact(str(failures.get(n)))[:200]} | | | | |" if r is None else
                     f"| {n} | `{r['backup_id']}`{' (no containers)' if r['no_containers'] else ''} | {r['containers']} | "
                     f"{r['new']} | {r['reused']} | {r['bytes']} |")
    create_markdown_artifact(key="images-backup-summary", markdown="\n".join(lines), description="Images backup")
