"""Backup manifests: the JSON object written beside each backup, last, that makes it a backup.

A backup exists when its manifest exists. Everything needed to list, check and restore it
from storage alone (when the database and its log are gone) is in the manifest; no secret is.
Manifests are written and read through the catalog (luxima_backup/catalog.py), which signs them
and checks their MAC: this module is their model only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainSerializer, TypeAdapter, ValidationError, field_validator

from .errors import FormatError

MANIFEST_VERSION = 1
READABLE_VERSIONS = frozenset({1})
MANIFEST_SUFFIX = ".manifest.json"


def safe_name(name: str) -> str:
    """``name`` as one key segment."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def stem(prefix: str, component: str, name: str, started: datetime) -> str:
    """The key every object of the backup of ``name`` started at ``started`` starts with (its id's second)."""
    return _stem(prefix, component, name, started)[1]


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


def binding(backup_id: str, component: str, target: str, key: str) -> dict[str, str]:
    """What an object's encryption header says it is (authenticated with every chunk): moved under another key, put in
    another target's place or planted under a newer backup's name, it is refused by the reader that expects otherwise."""
    return {"backup_id": backup_id, "target": f"{component}/{target}", "object": key}


def manifest_key_for(object_key: str) -> str:
    """The manifest beside one of a backup's objects (``<base>.<anything>`` -> ``<base>.manifest.json``)."""
    directory, _, name = object_key.rpartition("/")
    base = name.split(".", 1)[0]
    return f"{directory}/{base}{MANIFEST_SUFFIX}" if directory else f"{base}{MANIFEST_SUFFIX}"


# ---------------------------------------------------------------------------------------------------
# The manifest documents. One model per component, written by its backup flow and read by the catalog,
# the restores and the retention; ``component`` tells them apart. Version 1 is every manifest written
# so far: fields added since its first release have defaults, so older manifests still read.


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


# An aware time, written as Python's isoformat ("+00:00"), as every manifest so far was.
Timestamp = Annotated[datetime, AfterValidator(_aware), PlainSerializer(lambda v: v.isoformat(), return_type=str)]


class _Part(BaseModel):
    # A field a newer writer of the same version added survives being read and written again
    # (a key rewrap, a retention mark) instead of being dropped.
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class Compression(_Part):
    codec: str
    level: int | None = None


class Encryption(_Part):
    """How an object is encrypted: the envelope format and which key wraps its data key (never a key)."""

    format: str = "LXB1"
    version: int = 1
    chunk_size: int
    provider: str
    key_id: str
    key_version: int | None = None
    recovery_key_id: str | None = None  # the recovery key its data key is also sealed to (in the object's header)


class StoredObject(_Part):
    """An encrypted object as a reader needs it: where it is, how to decompress it, and what to check it against."""

    key: str
    compression: Compression
    size_encrypted: int
    sha256_encrypted: str
    # its encryption header names its backup, target and key (``binding``): readers refuse it under any other
    bound: bool = False


class DataObject(StoredObject):
    """The object a backup exists for (a dump, an archive), described in full."""

    format: str
    encryption: Encryption
    size_plain: int
    size_compressed: int
    sha256_plain: str


class _Manifest(_Part):
    manifest_version: Literal[1] = MANIFEST_VERSION
    backup_id: str
    status: str
    started_at: Timestamp
    completed_at: Timestamp
    tool: dict[str, Any] = Field(default_factory=dict)
    verification: dict[str, Any] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    flow_run_id: str | None = None
    # the offline recovery key every object of this backup is sealed to: in the objects' headers (backups made with
    # keys.recovery_public_key set), or here, by object key (older backups, by `keys rewrap`)
    recovery_key_id: str | None = None
    recovery_seals: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @property
    def verified(self) -> bool:
        return self.status == "verified"

    @property
    def source_name(self) -> str | None:
        return getattr(self.source, "name", None)  # type: ignore[attr-defined]

    @property
    def data(self) -> DataObject:
        """The object this backup exists for."""
        raise NotImplementedError

    def objects(self) -> list[str]:
        """Every object key this backup wrote besides its manifest (what deleting it removes)."""
        raise NotImplementedError

    def binding_of(self, key: str) -> dict[str, str] | None:
        """What the encryption header of this backup's object ``key`` must say (``binding``); None for an object
        written before headers named their backup. ``ValueError`` when the backup has no such object."""
        owner, bound = self._object_owner(key)
        return binding(owner, self.component, self.source_name or "", key) if bound else None  # type: ignore[attr-defined]

    def _object_owner(self, key: str) -> tuple[str, bool]:
        """The backup id that wrote ``key`` (an incremental backup reads archives of earlier ones) and whether it is bound."""
        for obj in (getattr(self, name, None) for name in ("dump", "archive", "index", "globals")):
            if obj is not None and getattr(obj, "key", None) == key:
                return self.backup_id, bool(obj.bound)
        for owner, obj in (getattr(self, "archives", None) or {}).items():
            if obj.key == key:
                return owner, obj.bound
        raise ValueError(f"backup {self.backup_id} has no object {key}")

    def brief(self) -> dict[str, Any]:
        """One line of a listing: type, size, key id and where the backup's data is."""
        d = self.data
        return {"type": getattr(self, "type", "full"), "size": d.size_encrypted, "key_id": d.encryption.key_id,
                "object_key": d.key}


class DbSource(_Part):
    name: str | None = None  # the [databases.NAME] section; older manifests did not say
    database: str
    host: str | None = None
    port: int | None = None
    system_identifier: str | None = None
    server_version: str | None = None
    server_version_num: int | None = None
    snapshot: str | None = None
    exclude_schemas: list[str] = Field(default_factory=list)

    @field_validator("system_identifier", mode="before")
    @classmethod
    def _as_text(cls, value: Any) -> Any:  # a 64-bit number, kept as text (JSON readers lose precision past 2**53)
        return str(value) if isinstance(value, int) else value


class Table(_Part):
    schema_name: str = Field(alias="schema")
    name: str
    kind: str
    partitions: int | None = None


class DbGlobals(_Part):
    """Roles and tablespaces (``pg_dumpall --globals-only``), when the role could read them."""

    key: str | None = None
    plain_bytes: int | None = None
    encrypted_bytes: int | None = None
    encrypted_sha256: str | None = None
    plain_sha256: str | None = None
    warning: str | None = None
    bound: bool = False


class DbManifest(_Manifest):
    component: Literal["db"] = "db"
    source: DbSource
    dump: DataObject
    globals: DbGlobals = Field(default_factory=DbGlobals)
    row_counts: dict[str, int] = Field(default_factory=dict)
    # (schema, name) of each counted table: a key such as "a.b.c" alone cannot say where the schema ends
    tables: dict[str, Table] = Field(default_factory=dict)
    large_objects: int | None = None

    @property
    def data(self) -> DataObject:
        return self.dump

    def objects(self) -> list[str]:
        return [self.dump.key] + ([self.globals.key] if self.globals.key else [])


class FilesSource(_Part):
    name: str
    kind: str
    host: str | None = None
    path: str | None = None
    bucket: str | None = None


class FileArchive(DataObject):
    files: int  # stored in this archive (an incremental one holds the new and changed files only)
    bytes: int


class FileIndex(StoredObject):
    """Every entry of the source at backup time, with its md5: what a restore lays out and checks."""

    entries: int
    encryption: Encryption
    size_plain: int
    sha256_plain: str


class FilesManifest(_Manifest):
    component: Literal["files"] = "files"
    source: FilesSource
    type: Literal["full", "incremental"] = "full"
    reason: str | None = None
    previous: str | None = None  # the backup an incremental one was taken on
    full_completed_at: Timestamp  # when the full archive its chain starts with was completed
    archive: FileArchive
    index: FileIndex
    # every archive a restore of this backup reads, by backup id, oldest first: the chain back to the full one
    archives: dict[str, StoredObject]
    totals: dict[str, int]
    changes: dict[str, int] = Field(default_factory=dict)
    sync: dict[str, Any] = Field(default_factory=dict)

    @property
    def data(self) -> DataObject:
        return self.archive

    def objects(self) -> list[str]:
        # the older archives of its chain belong to the backups that wrote them
        return [self.archive.key, self.index.key]


class ConfigSource(_Part):
    name: str
    kind: str = "ssh"
    host: str | None = None
    paths: list[str] = Field(default_factory=list)


class ConfigManifest(_Manifest):
    component: Literal["configs"] = "configs"
    source: ConfigSource
    archive: DataObject
    totals: dict[str, int]
    missing: list[str] = Field(default_factory=list)
    too_large: list[str] = Field(default_factory=list)
    # the keyed digest of the fetched set, also in the git copy's meta file: commit → archive
    content_digest: str
    retention_days: int | None = None
    expires_at: Timestamp | None = None

    @property
    def data(self) -> DataObject:
        return self.archive

    def objects(self) -> list[str]:
        return [self.archive.key]


class VmSource(_Part):
    name: str  # the guest's name (or its vmid when it has none): the folder its manifests are filed under
    vmid: int
    type: Literal["qemu", "lxc"]
    node: str
    proxmox: str  # the [proxmox.NAME] it was reached through


class VmArchive(_Part):
    """A vzdump archive on the Proxmox backup storage (it never passes through this machine)."""

    volid: str
    node: str
    storage: str
    format: str | None = None
    size: int
    ctime: int
    notes: str | None = None
    protected: bool = False
    verification: dict[str, Any] | None = None  # a Proxmox Backup Server storage's own verification state


class VmManifest(_Manifest):
    component: Literal["vm"] = "vm"
    source: VmSource
    archive: VmArchive
    mode: str
    task: dict[str, Any] = Field(default_factory=dict)  # upid, exitstatus, warnings
    # the guest config read back from the archive (extractconfig), secret-bearing keys left out
    config: dict[str, str] = Field(default_factory=dict)
    networks: dict[str, dict[str, str]] = Field(default_factory=dict)  # net* devices: model, MAC, bridge, tag, firewall
    addresses: list[str] = Field(default_factory=list)  # what the running guest reported (agent), for restore checks
    snapshot: str | None = None  # the Proxmox snapshot taken with it, if any

    @property
    def data(self) -> DataObject:
        raise AttributeError("a VM backup's data is a vzdump archive on Proxmox storage: see archive")

    def objects(self) -> list[str]:
        return []  # the archive lives on the Proxmox storage, pruned there

    def brief(self) -> dict[str, Any]:
        return {"type": f"vzdump-{self.source.type}", "size": self.archive.size, "key_id": None,
                "object_key": self.archive.volid}


class ImagesSource(_Part):
    name: str  # the [hosts.NAME] the images were saved on, or registries/NAME for a registry's
    kind: Literal["docker", "registry"]
    address: str | None = None  # the host's address, or the registry's


class StoredImage(StoredObject):
    """One image, stored once under its image ID (content-addressed: many containers, hosts and weeks share it)."""

    image_id: str                      # sha256:<64 hex>: the digest of the image's config
    format: Literal["docker-save", "oci-archive"] = "docker-save"
    encryption: Encryption
    size_plain: int
    sha256_plain: str
    refs: list[str] = Field(default_factory=list)          # its tags on the host (repo:tag)
    repo_digests: list[str] = Field(default_factory=list)  # repo@sha256:... (what registries know it by)
    stored_by: str                     # the backup that uploaded it (its header names that backup)
    new: bool = False                  # uploaded by this backup (else reused from an earlier one)


class ContainerImage(_Part):
    """A container of the host and the image it runs: what a restore re-creates the tags for."""

    name: str
    id: str
    state: str | None = None
    image_ref: str                     # as the container was created with (repo:tag, or an id)
    image_id: str
    compose_project: str | None = None
    compose_service: str | None = None


class ImagesManifest(_Manifest):
    component: Literal["images"] = "images"
    source: ImagesSource
    images: list[StoredImage] = Field(default_factory=list)
    containers: list[ContainerImage] = Field(default_factory=list)
    skipped: list[dict[str, str]] = Field(default_factory=list)  # containers left out by the filters, and why
    retention_days: int | None = None

    def image(self, image_id: str) -> StoredImage:
        for img in self.images:
            if img.image_id == image_id:
                return img
        raise ValueError(f"backup {self.backup_id} has no image {image_id}")

    @property
    def data(self) -> DataObject:
        raise AttributeError("an images backup has one object per image: see images")

    def objects(self) -> list[str]:
        return [img.key for img in self.images]  # shared with other backups: removed only when none keeps them

    def _object_owner(self, key: str) -> tuple[str, bool]:
        for img in self.images:
            if img.key == key:
                return img.stored_by, img.bound
        raise ValueError(f"backup {self.backup_id} has no object {key}")

    def binding_of(self, key: str) -> dict[str, str] | None:
        # an image object names the image it holds, not a host: another host's backup may reuse it
        for img in self.images:
            if img.key == key:
                return image_binding(img.stored_by, img.image_id, key) if img.bound else None
        raise ValueError(f"backup {self.backup_id} has no object {key}")

    def brief(self) -> dict[str, Any]:
        return {"type": f"{len(self.images)} image(s)", "size": sum(i.size_encrypted for i in self.images),
                "key_id": self.images[0].encryption.key_id if self.images else None,
                "object_key": f"{len(self.containers)} container(s)"}


IMAGE_FOLDER = "image-objects"  # beside the component folders: objects shared by every images backup


def image_key(prefix: str, image_id: str, codec_suffix: str) -> str:
    """Where an image is stored, by its ID: ``<prefix>/image-objects/sha256/<hex>.tar.<zst|gz>.enc``."""
    algo, _, hexdigest = image_id.partition(":")
    if algo != "sha256" or len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest):
        raise FormatError(f"{image_id!r} is not an image ID (sha256:<64 hex>)")
    return f"{prefix}/{IMAGE_FOLDER}/sha256/{hexdigest}.tar.{codec_suffix}.enc"


def image_binding(stored_by: str, image_id: str, key: str) -> dict[str, str]:
    return binding(stored_by, "images", image_id, key)


def images_keys(prefix: str, source: str, started: datetime) -> tuple[str, str]:
    """An images backup's id and manifest key: ``<prefix>/images/<source>/<YYYY>/<MM>/<DD>/<UTC time>.manifest.json``."""
    backup_id, base = _stem(prefix, "images", source, started)
    return backup_id, f"{base}{MANIFEST_SUFFIX}"


Manifest = Annotated[Union[DbManifest, FilesManifest, ConfigManifest, VmManifest, ImagesManifest],
                     Field(discriminator="component")]
_ADAPTER: TypeAdapter[Manifest] = TypeAdapter(Manifest)


def dump_json(document: Manifest) -> bytes:
    return json.dumps(document.model_dump(mode="json", by_alias=True), indent=2, sort_keys=True).encode()


def parse(raw: bytes, key: str = "manifest") -> Manifest:
    """A manifest's bytes as its typed model; anything else is a ``FormatError`` that says what is wrong."""
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise FormatError(f"{key} is not valid JSON: {exc}") from None
    return from_document(doc, key)


def from_document(doc: Any, key: str = "manifest") -> Manifest:
    """A manifest's parsed JSON as its typed model (what ``parse`` does after the JSON)."""
    if not isinstance(doc, dict):
        raise FormatError(f"{key} is not a manifest (a JSON object was expected)")
    version = doc.get("manifest_version")
    if version not in READABLE_VERSIONS:
        newer = isinstance(version, int) and version > MANIFEST_VERSION
        raise FormatError(f"{key} has manifest version {version!r}; this luxima-backup reads {sorted(READABLE_VERSIONS)}",
                          hint="upgrade luxima-backup to read it" if newer else "it was not written by luxima-backup")
    try:
        return _ADAPTER.validate_python(doc)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in exc.errors()[:5])
        raise FormatError(f"{key} is not a valid backup manifest: {problems}",
                          hint="it was altered or written by something else; choose another backup") from None


def vm_keys(prefix: str, guest: str, started: datetime) -> tuple[str, str]:
    """A VM backup's id and its manifest's key: ``<prefix>/vm/<guest>/<YYYY>/<MM>/<DD>/<UTC time>.manifest.json``."""
    backup_id, base = _stem(prefix, "vm", guest, started)
    return backup_id, f"{base}{MANIFEST_SUFFIX}"
