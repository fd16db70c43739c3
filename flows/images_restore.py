"""The images restore flow (by hand, from the UI): a host's images from a backup onto a host (the original or a new one).

For each image chosen (all, or by container, compose project or reference): its stored object is downloaded
and checked whole first — sha256 against the manifest, every chunk authenticated, its header naming this
object, the archive's config hashing to the image ID — so a tampered or damaged image never reaches
``docker load``. Then it is streamed decrypted into ``docker load`` over SSH, the ID the engine reports is
checked, and the original tags are put back. A tag that names another image on the target now is not
moved without ``confirm`` (the host's name); nothing is loaded before that is settled.
"""

from __future__ import annotations

import shutil
import time
from datetime import datetime, timezone
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from luxima_backup import events, manifest, runtime
from luxima_backup.errors import ConfigError
from luxima_backup.secrets import install_log_redaction, redact
from luxima_backup.workdir import private_dir
from flows.common import flow, logged
from tasks.download import download
from tasks.images import check_image_object, host_image_ids, load_image, tag
from tasks.log import log_run
from tasks.registry import push_to_registry, registry_image_ids, repository_path


def choose(doc: manifest.ImagesManifest, containers: list[str], projects: list[str], refs: list[str]) -> list[manifest.StoredImage]:
    """The images of the backup an operator means: all, or those of some containers, compose projects or references."""
    if not (containers or projects or refs):
        return list(doc.images)
    wanted: set[str] = set()
    unknown = [c for c in containers if c not in {x.name for x in doc.containers}]
    unknown += [p for p in projects if p not in {x.compose_project for x in doc.containers}]
    unknown += [r for r in refs if r not in {ref for img in doc.images for ref in img.refs} | {x.image_ref for x in doc.containers}]
    if unknown:
        raise ConfigError(f"backup {doc.backup_id} has no container, compose project or image reference {unknown}",
                          hint="see the backup's manifest: `luxima-backup show BACKUP --component images`")
    for c in doc.containers:
        if c.name in containers or c.compose_project in projects or c.image_ref in refs:
            wanted.add(c.image_id)
    wanted |= {img.image_id for img in doc.images if set(img.refs) & set(refs)}
    return [img for img in doc.images if img.image_id in wanted]


def tags_of(doc: manifest.ImagesManifest, img: manifest.StoredImage) -> list[str]:
    """The references to put back: the image's tags, and the references its containers were created with."""
    refs = set(img.refs) | {c.image_ref for c in doc.containers if c.image_id == img.image_id and ":" in c.image_ref
                            and not c.image_ref.startswith("sha256:")}
    return sorted(refs)


@flow(name="images-restore", validate_parameters=True, persist_result=True)
def images_restore(host: str, backup: str = "latest", as_of: datetime | None = None, target_host: str | None = None,
                   containers: list[str] | None = None, compose_projects: list[str] | None = None,
                   refs: list[str] | None = None, confirm: str | None = None,
                   to_registry: str | None = None) -> dict[str, Any]:
    """Load a host's backed-up images onto a host, checked, with their original tags.

    Args:
        host: the host whose images backup to restore (as images.hosts names it).
        backup: latest (newest verified), a backup id, or a manifest key.
        as_of: with latest: the newest verified backup completed by this time.
        target_host: the [hosts.NAME] to load them on (default: host itself; a rebuilt or new one).
        containers: only the images of these containers.
        compose_projects: only the images of these compose projects' containers.
        refs: only these image references (repo:tag).
        confirm: the target host's (or registry's) name, to move tags that name other images there now.
        to_registry: push them into this [images.registries.NAME] instead of loading them on a host (their tags'
            repository paths, under the registry's address).
    """
    with runtime.time_limit(lambda s: s.images.timeout_seconds, "images-restore"):
        settings = runtime.settings()
        install_log_redaction()
        logger = get_run_logger()
        target = to_registry or target_host or host
        if to_registry is not None:
            if to_registry not in settings.images.registries:
                raise ConfigError(f"no [images.registries.{to_registry}] in the settings",
                                  hint=f"configured: {sorted(settings.images.registries)}")
        elif target not in settings.hosts:
            raise ConfigError(f"no [hosts.{target}] in the settings", hint=f"configured: {sorted(settings.hosts)}")
        started, t0 = datetime.now(timezone.utc), time.monotonic()
        found = runtime.catalog("images", settings).resolve("images", backup, source=host, as_of=as_of)
        doc = found.manifest
        assert isinstance(doc, manifest.ImagesManifest)
        chosen = choose(doc, list(containers or []), list(compose_projects or []), list(refs or []))
        if not chosen:
            raise ConfigError(f"backup {doc.backup_id} of {host} holds no images", hint="its host had no containers")
        # what every tag names on the target now: a tag that names another image moves only with confirm
        wanted = {img.image_id: tags_of(doc, img) for img in chosen}
        if to_registry is not None:  # in the registry the tags are the references' repository paths
            wanted = {iid: sorted({repository_path(r) for r in rs}) for iid, rs in wanted.items()}
            now = registry_image_ids(to_registry, sorted({r for rs in wanted.values() for r in rs}))
        else:
            now = host_image_ids(target, sorted({r for rs in wanted.values() for r in rs}))
        moved = {r: iid for iid, rs in wanted.items() for r in rs if now.get(r) not in (None, iid)}
        if moved and confirm != target:
            raise ConfigError(f"on {target}, {len(moved)} tag(s) name other images now: "
                              + ", ".join(f"{r} ({now[r][:19]})" for r in sorted(moved)[:10]),  # type: ignore[index]
                              hint=f"nothing was loaded; to move them to the backed-up images, confirm = {target!r}")
        rows: list[dict[str, Any]] = []
        work = private_dir(settings.work_dir, "images-restore-")
        outcome: dict[str, Any] = {}
        try:
            for img in chosen:
                present = [r for r in wanted[img.image_id] if now.get(r) == img.image_id]
                row: dict[str, Any] = {"image": img.image_id, "refs": ", ".join(wanted[img.image_id]), "object": img.key}
                if present and len(present) == len(wanted[img.image_id]):
                    rows.append({**row, "action": "present", "seconds": 0.0})
                    continue
                t = time.monotonic()
                spool = str(work / "image.enc")
                binding = doc.binding_of(img.key)
                download(img.key, spool, img.size_encrypted, img.sha256_encrypted, expect=binding)
                # the whole copy authenticated and the image ID proven before the engine sees a byte of it
                with open(spool, "rb") as f:
                    check_image_object(f, img.key, img.image_id, img.compression.codec, binding,
                                       {"encrypted_bytes": img.size_encrypted, "encrypted_sha256": img.sha256_encrypted,
                                        "plain_sha256": img.sha256_plain})
                if to_registry is not None:
                    push_to_registry(to_registry, spool, img.compression.codec, img.image_id, binding, wanted[img.image_id])
                    rows.append({**row, "action": "pushed", "seconds": round(time.monotonic() - t, 3)})
                    continue
                load_image(target, spool, img.compression.codec, img.image_id, binding)
                tag(target, img.image_id, wanted[img.image_id])
                after = host_image_ids(target, wanted[img.image_id])
                bad = [r for r, iid in after.items() if iid != img.image_id]
                if bad:
                    raise ConfigError(f"after loading, {bad} do not name {img.image_id} on {target}")
                rows.append({**row, "action": "loaded", "seconds": round(time.monotonic() - t, 3)})
                logger.info("loaded %s on %s as %s", img.image_id[:19], target, row["refs"] or "(untagged)")
                (work / "image.enc").unlink(missing_ok=True)
            outcome = {"status": "success"}
        except BaseException as exc:
            outcome = {"status": "failed", "error": redact(f"{type(exc).__name__}: {exc}")}
            if events.is_verification_failure(exc):
                events.verification_failed("restore", "images", host, str(exc), backup_id=doc.backup_id)
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
            _report(doc, host, target, rows, outcome, started, time.monotonic() - t0)
        events.restore_succeeded("images", host, doc.backup_id, onto=target,
                                 loaded=sum(r["action"] in ("loaded", "pushed") for r in rows))
        return {"backup_id": doc.backup_id, "target": target, "images": rows,
                "loaded": sum(r["action"] in ("loaded", "pushed") for r in rows), "present": sum(r["action"] == "present" for r in rows),
                "seconds": round(time.monotonic() - t0, 3)}


def _report(doc: manifest.ImagesManifest, host: str, target: str, rows: list[dict[str, Any]], outcome: dict[str, Any],
            started: datetime, seconds: float) -> None:
    settings = runtime.settings()
    lines = [f"## Images restore of `{doc.backup_id}` onto `{target}`: "
             + ("all loaded and checked" if outcome.get("status") == "success" else f"**FAILED**: {outcome.get('error')}"),
             "", "| image | tags | result | seconds |", "|---|---|---|---:|",
             *[f"| `{r['image'][:19]}` | {r['refs']} | {r['action']} | {r['seconds']} |" for r in rows]]
    create_markdown_artifact(key="images-restore", markdown=redact("\n".join(lines)), description="Images restore report")
    if settings.log.enabled:
        logged(log_run, "restore", "restore", "images", target, host, outcome.get("status", "failed"), started, doc.backup_id,
               None, str(flow_run.id) if flow_run.id else None, outcome.get("error"),
               {"images": rows, "seconds": round(seconds, 3)}, {})
