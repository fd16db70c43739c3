"""Container images: what a Docker host runs, and proof that a stored image is the image it claims to be.

Plain functions (no Prefect): reading a host's inventory from ``docker ps`` / ``inspect`` output (Docker's,
and Podman's, whose field spellings differ a little), choosing containers by the settings' filters, and
checking a ``docker save`` archive as it streams: the sha256 of its config is the image ID, by definition,
so an archive whose config does not hash to the ID recorded is not that image.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import tarfile
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from .errors import FormatError, IntegrityError

IMAGE_ID = re.compile(r"^sha256:[0-9a-f]{64}$")
COMPOSE_PROJECT = "com.docker.compose.project"
COMPOSE_SERVICE = "com.docker.compose.service"


def image_id(value: str) -> str:
    """An image ID as ``sha256:<hex>`` (Podman prints the hex alone)."""
    value = value.strip()
    if re.fullmatch(r"[0-9a-f]{64}", value):
        value = "sha256:" + value
    if not IMAGE_ID.match(value):
        raise FormatError(f"{value!r} is not an image ID (sha256:<64 hex>)")
    return value


@dataclass(frozen=True)
class Container:
    name: str
    id: str
    state: str | None
    image_ref: str
    image_id: str
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def compose_project(self) -> str | None:
        return self.labels.get(COMPOSE_PROJECT)

    @property
    def compose_service(self) -> str | None:
        return self.labels.get(COMPOSE_SERVICE)


def parse_containers(inspect_json: bytes) -> list[Container]:
    """``docker container inspect`` output (a JSON list) as containers."""
    try:
        docs = json.loads(inspect_json or b"[]")
    except ValueError as exc:
        raise FormatError(f"container inspect output is not JSON: {exc}") from None
    out = []
    for d in docs:
        config = d.get("Config") or {}
        state = d.get("State")
        out.append(Container(
            name=str(d.get("Name") or "").lstrip("/"), id=str(d["Id"]),
            state=state.get("Status") if isinstance(state, dict) else state,
            image_ref=str(config.get("Image") or d.get("ImageName") or ""), image_id=image_id(str(d["Image"])),
            labels={str(k): str(v) for k, v in (config.get("Labels") or {}).items()}))
    return sorted(out, key=lambda c: c.name)


@dataclass(frozen=True)
class ImageInfo:
    image_id: str
    refs: list[str]
    repo_digests: list[str]
    size: int | None


def parse_images(inspect_json: bytes) -> dict[str, ImageInfo]:
    """``docker image inspect`` output by image ID."""
    try:
        docs = json.loads(inspect_json or b"[]")
    except ValueError as exc:
        raise FormatError(f"image inspect output is not JSON: {exc}") from None
    out = {}
    for d in docs:
        iid = image_id(str(d["Id"]))
        out[iid] = ImageInfo(iid, sorted(t for t in (d.get("RepoTags") or []) if t and "<none>" not in t),
                             sorted(d.get("RepoDigests") or []), d.get("Size"))
    return out


def chosen(container: Container, compose_projects: list[str], labels: list[str], names: list[str],
           exclude: list[str]) -> str | None:
    """Why a container is left out by the settings' filters, or None when it is backed up."""
    for pattern in exclude:
        if fnmatch.fnmatchcase(container.name, pattern) or fnmatch.fnmatchcase(container.image_ref, pattern):
            return f"excluded by {pattern!r}"
    if compose_projects and container.compose_project not in compose_projects:
        return f"not in compose projects {compose_projects}"
    if labels and not any(_has_label(container.labels, want) for want in labels):
        return f"has none of the labels {labels}"
    if names and not any(fnmatch.fnmatchcase(container.name, p) for p in names):
        return f"name matches none of {names}"
    return None


def _has_label(labels: dict[str, str], want: str) -> bool:
    key, sep, value = want.partition("=")
    return key in labels and (not sep or labels[key] == value)


class _Hashing:
    """Reads a tar member to its end, hashing it; keeps nothing else."""

    @staticmethod
    def digest(f: BinaryIO) -> tuple[str, int]:
        h, n = hashlib.sha256(), 0
        while True:
            block = f.read(1 << 20)
            if not block:
                return h.hexdigest(), n
            h.update(block)
            n += len(block)


def check_image_archive(stream: BinaryIO, expected_id: str) -> dict[str, Any]:
    """Read a ``docker save`` archive (Docker's legacy layout or the OCI layout of Docker 25+) to its end and check it is
    the image ``expected_id``: one image in its manifest.json, whose config hashes to that ID, and every layer it lists
    present (in the OCI layout every blob's content must hash to its name too). ``IntegrityError`` otherwise."""
    digests: dict[str, str] = {}
    manifest_doc: Any = None
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                if info.isreg():
                    f = tar.extractfile(info)
                    assert f is not None
                    if info.name == "manifest.json":
                        manifest_doc = json.loads(f.read(1 << 24))
                        continue
                    digests[info.name], _ = _Hashing.digest(f)
                tar.members.clear()
    except (tarfile.TarError, ValueError) as exc:
        raise IntegrityError(f"the image archive is not a valid docker save archive: {exc}") from None
    if not isinstance(manifest_doc, list) or len(manifest_doc) != 1 or not isinstance(manifest_doc[0], dict):
        raise IntegrityError("the image archive's manifest.json is missing or does not describe exactly one image")
    entry = manifest_doc[0]
    config = str(entry.get("Config") or "")
    if config not in digests:
        raise IntegrityError(f"the image archive lacks its config {config!r}")
    got = "sha256:" + digests[config]
    if got != expected_id:
        raise IntegrityError(f"the image archive's config hashes to {got}, not to the image ID {expected_id}: "
                             "it is another image, or damaged")
    layers = [str(x) for x in entry.get("Layers") or []]
    missing = [x for x in layers if x not in digests]
    if missing:
        raise IntegrityError(f"the image archive lacks {len(missing)} of its layers, e.g. {missing[0]}")
    wrong = [name for name, hexd in digests.items() if name.startswith("blobs/sha256/") and name.rsplit("/", 1)[1] != hexd]
    if wrong:
        raise IntegrityError(f"blob {wrong[0]} of the image archive does not hash to its name: damaged")
    return {"image_id": got, "layers": len(layers), "members": len(digests)}
