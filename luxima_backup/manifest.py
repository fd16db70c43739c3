"""Backup manifests: the JSON object written beside each backup, last, that makes it a backup.

A backup exists when its manifest exists. Everything needed to list, check and restore it
from storage alone (when the database and its log are gone) is in the manifest; no secret is.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterator

from .errors import FormatError
from .storage import ObjectStore

MANIFEST_VERSION = 1
MANIFEST_SUFFIX = ".manifest.json"


def safe_name(name: str) -> str:
    """``name`` as one key segment."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _stem(prefix: str, component: str, name: str, started: datetime) -> tuple[str, str]:
    """A backup's id and the key every one of its objects starts with: ``<prefix>/<component>/<name>/<YYYY>/<MM>/<DD>/<UTC time>``."""
    ts = started.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{component}-{safe_name(name)}-{ts}", f"{prefix}/{component}/{safe_name(name)}/{started:%Y/%m/%d}/{ts}"


@dataclass(frozen=True)
class BackupKeys:
    """Where one backup's objects go."""

    backup_id: str
    data: str
    globals: str
    manifest: str


def db_keys(prefix: str, dbname: str, started: datetime, codec_suffix: str) -> BackupKeys:
    """``<prefix>/db/<database>/<YYYY>/<MM>/<DD>/<UTC timestamp>.dump.<zst|gz>.enc`` and siblings."""
    backup_id, base = _stem(prefix, "db", dbname, started)
    return BackupKeys(
        backup_id=backup_id,
        data=f"{base}.dump.{codec_suffix}.enc",
        globals=f"{base}.globals.sql.{codec_suffix}.enc",
        manifest=f"{base}{MANIFEST_SUFFIX}",
    )


@dataclass(frozen=True)
class FilesKeys:
    """Where one file backup's objects go."""

    backup_id: str
    archive: str
    index: str
    manifest: str


def files_keys(prefix: str, source: str, started: datetime, codec_suffix: str) -> FilesKeys:
    """``<prefix>/files/<source>/<YYYY>/<MM>/<DD>/<UTC timestamp>.tar.<gz|zst>.enc`` and siblings."""
    backup_id, base = _stem(prefix, "files", source, started)
    return FilesKeys(
        backup_id=backup_id,
        archive=f"{base}.tar.{codec_suffix}.enc",
        index=f"{base}.index.jsonl.{codec_suffix}.enc",
        manifest=f"{base}{MANIFEST_SUFFIX}",
    )


@dataclass(frozen=True)
class ConfigKeys:
    """Where one host's config backup goes."""

    backup_id: str
    archive: str
    manifest: str


def config_keys(prefix: str, host: str, started: datetime, codec_suffix: str) -> ConfigKeys:
    """``<prefix>/configs/<host>/<YYYY>/<MM>/<DD>/<UTC timestamp>.tar.<gz|zst>.enc`` and its manifest."""
    backup_id, base = _stem(prefix, "configs", host, started)
    return ConfigKeys(backup_id=backup_id, archive=f"{base}.tar.{codec_suffix}.enc", manifest=f"{base}{MANIFEST_SUFFIX}")


def manifest_key_for(object_key: str) -> str:
    """The manifest beside one of a backup's objects (``<base>.<anything>`` -> ``<base>.manifest.json``)."""
    directory, _, name = object_key.rpartition("/")
    base = name.split(".", 1)[0]
    return f"{directory}/{base}{MANIFEST_SUFFIX}" if directory else f"{base}{MANIFEST_SUFFIX}"


def save(store: ObjectStore, key: str, manifest: dict[str, Any]) -> None:
    store.save_bytes(key, json.dumps(manifest, indent=2, sort_keys=True, default=str).encode(), "application/json")


def load(store: ObjectStore, key: str) -> dict[str, Any]:
    with store.load(key) as body:
        raw = body.read()
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise FormatError(f"manifest {key} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("manifest_version") != MANIFEST_VERSION:
        raise FormatError(f"manifest {key} has unsupported version {doc.get('manifest_version') if isinstance(doc, dict) else '?'}")
    return doc


def iter_manifest_keys(store: ObjectStore, prefix: str) -> Iterator[str]:
    for info in store.list(prefix):
        if info.key.endswith(MANIFEST_SUFFIX):
            yield info.key
