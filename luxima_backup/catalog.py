"""The backup catalogue: authenticated manifests in storage, and a small index per target to read them fast.

This is what restores, the prune, ``list`` and ``status`` use to find a backup: when the database and its
log are gone, the manifests beside the backups are still there. Two properties hold:

* **Authentic.** Every manifest carries a MAC (HMAC-SHA256 under a key of the key provider: Vault Transit's
  HMAC, or one derived from the master key) over its content and its key (relative to the prefix), checked
  on every read. A manifest that fails (altered, unsigned, copied under another name) is ``Unreadable``:
  listed as damaged, never restored from, never counted by the retention.
* **Fast.** An index per target folder (``<prefix>/_catalog/<component>/<folder>.json``, signed too) holds a
  summary of each manifest and the tag (ETag) it had. A read lists the folder's manifest keys (one LIST, no
  GETs), reuses every entry whose tag is unchanged, reads and checks only the new or changed manifests, and
  writes the index back when anything changed. So the index is only ever a cache: missing, stale or failing
  its MAC, it is rebuilt from the manifests, and a writer that crashed before updating it loses nothing.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import manifest
from .errors import BackupError, ConfigError, FormatError, ObjectNotFound
from .manifest import ConfigManifest, DbManifest, FilesManifest, ImagesManifest, Manifest, Timestamp, VmManifest
from .storage import ObjectInfo, ObjectStore

if TYPE_CHECKING:
    from .keys import KeyProvider
    from .settings import Settings

log = logging.getLogger(__name__)

INDEX_FOLDER = "_catalog"
INDEX_VERSION = 1
_MANIFEST_CONTEXT = b"luxima-backup/manifest/v1\n"
_INDEX_CONTEXT = b"luxima-backup/catalog-index/v1\n"
_READERS = 8  # manifests fetched at once when an index is (re)built: GETs are latency-bound
RECONCILE = timedelta(hours=24)  # the longest a removal made outside luxima-backup goes unseen by the index


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


MAC_FIELDS = ("mac", "mac_recovery")  # the key provider's MAC, and the recovery key's (see recovery.RecoveryMac)


def mac_message(context: bytes, rel_key: str, doc: dict[str, Any]) -> bytes:
    """What a MAC covers: the kind of document, its key relative to the prefix, and its content without the MACs."""
    return context + rel_key.encode() + b"\n" + _canonical({k: v for k, v in doc.items() if k not in MAC_FIELDS})


class Entry(BaseModel):
    """One manifest as the index keeps it: what listing, status, retention and restores choose by."""

    model_config = ConfigDict(extra="ignore")

    key: str
    tag: str
    backup_id: str
    component: str
    status: str
    started_at: Timestamp
    completed_at: Timestamp
    source_name: str | None = None
    type: str = "full"
    size: int | None = None
    key_id: str | None = None
    object_key: str
    objects: list[str] = Field(default_factory=list)
    needs: list[str] = Field(default_factory=list)  # backup ids whose archives this one reads (a files chain)
    chain_length: int | None = None
    bytes_stored: int = 0
    verified_at: Timestamp | None = None
    volid: str | None = None
    vmid: int | None = None
    content_digest: str | None = None
    recovery_key_id: str | None = None

    @classmethod
    def of(cls, key: str, tag: str, m: Manifest) -> "Entry":
        brief = m.brief()
        extra: dict[str, Any] = {}
        if isinstance(m, DbManifest):
            extra["bytes_stored"] = m.dump.size_encrypted + (m.globals.encrypted_bytes or 0)
        elif isinstance(m, FilesManifest):
            extra.update(bytes_stored=m.archive.size_encrypted + m.index.size_encrypted,
                         needs=sorted(set(m.archives) - {m.backup_id}), chain_length=len(m.archives))
        elif isinstance(m, ConfigManifest):
            extra.update(bytes_stored=m.archive.size_encrypted, content_digest=m.content_digest)
        elif isinstance(m, VmManifest):
            extra.update(bytes_stored=m.archive.size, volid=m.archive.volid, vmid=m.source.vmid)
        elif isinstance(m, ImagesManifest):
            extra["bytes_stored"] = sum(i.size_encrypted for i in m.images if i.new)
        verified_at = m.verification.get("verified_at")
        return cls(key=key, tag=tag, backup_id=m.backup_id, component=m.component, status=m.status,
                   started_at=m.started_at, completed_at=m.completed_at, source_name=m.source_name,
                   type=str(brief["type"]), size=brief["size"], key_id=brief["key_id"], object_key=str(brief["object_key"]),
                   objects=m.objects(), verified_at=datetime.fromisoformat(str(verified_at)) if verified_at else None,
                   recovery_key_id=m.recovery_key_id, **extra)


@dataclass(eq=False)
class Backup:
    """One backup: its index entry, and its whole manifest, read (and authenticated) when first asked for."""

    manifest_key: str
    entry: Entry
    _load: Callable[[], Manifest] | None = field(default=None, repr=False)
    _manifest: Manifest | None = field(default=None, repr=False)

    @classmethod
    def of(cls, key: str, m: Manifest, tag: str = "") -> "Backup":
        return cls(key, Entry.of(key, tag, m), None, m)

    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            assert self._load is not None
            m = self._load()
            if m.backup_id != self.entry.backup_id:  # replaced since the listing: never mix two backups
                raise FormatError(f"manifest {self.manifest_key} changed while it was being read; run again")
            self._manifest = m
        return self._manifest

    backup_id = property(lambda self: self.entry.backup_id)
    component = property(lambda self: self.entry.component)
    status = property(lambda self: self.entry.status)
    completed_at = property(lambda self: self.entry.completed_at)
    source_name = property(lambda self: self.entry.source_name, doc="the section it was taken of (older manifests did not say)")
    data_key = property(lambda self: self.entry.object_key)
    verified = property(lambda self: self.entry.status == "verified")

    def brief(self) -> dict[str, Any]:
        """One line of a listing: type, size, key id and where the backup's data is."""
        e = self.entry
        return {"type": e.type, "size": e.size, "key_id": e.key_id, "object_key": e.object_key}


@dataclass(frozen=True)
class Unreadable:
    """A manifest that cannot be used (damaged, unsigned, failing its MAC, foreign, misfiled): never offered as a
    backup; reported."""

    manifest_key: str
    folder: str  # the target folder it was found in
    error: FormatError

    def __str__(self) -> str:
        return str(self.error)


def _tag(info: ObjectInfo) -> str:
    """What changes when an object is replaced: its ETag, or (a directory) size and modification time."""
    if info.etag:
        return info.etag.strip('"')
    stamp = info.last_modified.timestamp() if info.last_modified else 0
    return f"{info.size}:{stamp!r}"


class Catalog:
    """The manifests of one storage location (``store`` and ``prefix``), authenticated with ``keys``.

    ``recovery_mac``: also sign what is written with the recovery catalog key (``mac_recovery``). With the break-glass
    provider (the recovery key alone) documents are checked by their ``mac_recovery`` and nothing is written.
    """

    def __init__(self, store: ObjectStore, prefix: str, keys: "KeyProvider", recovery_mac: Any = None):
        self.store, self.prefix, self.keys, self.recovery_mac = store, prefix, keys, recovery_mac
        self.field = getattr(keys, "mac_field", "mac")
        self.read_only = self.field != "mac"

    def _sign(self, body: dict[str, Any], message: bytes) -> dict[str, Any]:
        body["mac"] = self.keys.sign(message)
        if self.recovery_mac is not None:
            body["mac_recovery"] = self.recovery_mac.sign(message)
        return body

    # --- manifests -------------------------------------------------------------------------------------

    def rel(self, key: str) -> str:
        return key[len(self.prefix) + 1:] if key.startswith(self.prefix + "/") else key

    def signed(self, key: str, document: Manifest) -> bytes:
        """The manifest's bytes, with its MAC: over its content and its key, so it cannot be copied elsewhere either."""
        body = {k: v for k, v in document.model_dump(mode="json", by_alias=True).items() if k not in MAC_FIELDS}
        self._sign(body, mac_message(_MANIFEST_CONTEXT, self.rel(key), body))
        return json.dumps(body, indent=2, sort_keys=True).encode()

    def save(self, key: str, document: Manifest) -> None:
        """Write a manifest (from now on the backup exists), then bring its target's index up to date (best effort:
        the next read does it otherwise)."""
        self.store.save_bytes(key, self.signed(key, document), "application/json")
        try:
            self._folder(document.component, self._folder_of(document.component, key), also=[key])
        except BackupError as exc:
            log.warning("the catalog index of %s was not updated (%s); the next read updates it", key, exc)

    def load(self, key: str) -> Manifest:
        """One manifest, authenticated; ``FormatError`` when it is not authentic or not a manifest."""
        with self.store.load(key) as body:
            raw = body.read()
        return self.authentic(key, raw)

    def authentic(self, key: str, raw: bytes) -> Manifest:
        """``raw`` as the manifest at ``key``, if its MAC says so; ``FormatError`` otherwise."""
        result = self._authenticate([(key, raw)])[0]
        if isinstance(result, FormatError):
            raise result
        return result

    def _authenticate(self, items: list[tuple[str, bytes]]) -> list[Manifest | FormatError]:
        """Check the MACs of many manifests at once (one Transit request per batch), then parse them."""
        docs: list[dict[str, Any] | FormatError] = []
        for key, raw in items:
            try:
                doc = json.loads(raw)
                docs.append(doc if isinstance(doc, dict) else FormatError(f"manifest {key} is not a JSON object"))
            except ValueError as exc:
                docs.append(FormatError(f"manifest {key} is not valid JSON: {exc}"))
        field = self.field
        signed = [(i, d) for i, d in enumerate(docs) if isinstance(d, dict) and field in d]
        verdicts = self.keys.verify([(mac_message(_MANIFEST_CONTEXT, self.rel(items[i][0]), d), d[field]) for i, d in signed])
        why = {i: v for (i, _), v in zip(signed, verdicts)}
        out: list[Manifest | FormatError] = []
        for i, ((key, _), doc) in enumerate(zip(items, docs)):
            if isinstance(doc, FormatError):
                out.append(doc)
            elif field not in doc and self.read_only:
                out.append(FormatError(f"manifest {key} has no recovery MAC: written before keys.recovery_catalog_key "
                                       "was set, or planted",
                                       hint="while the key provider is there, `luxima-backup keys rewrap --confirm` adds "
                                            "it; without it, check the backup by hand and decrypt its objects with "
                                            "`luxima-backup decrypt --recovery-key`"))
            elif field not in doc:
                out.append(FormatError(f"manifest {key} is not signed: written before manifests carried a MAC, or "
                                       "planted", hint="check it, then adopt it with `luxima-backup catalog sign`"))
            elif why[i] is not None:
                out.append(FormatError(f"manifest {key} is not authentic: {why[i]}",
                                       hint="do not restore from it; choose another backup and find out who can write "
                                            "to the backup storage"))
            else:
                try:
                    found = manifest.from_document({k: v for k, v in doc.items() if k not in MAC_FIELDS}, f"manifest {key}")
                except FormatError as exc:
                    out.append(exc)
                    continue
                remember = getattr(self.keys, "remember", None)
                if remember is not None:  # the break-glass provider opens older objects with their manifest's seals
                    remember(found.recovery_seals)
                out.append(found)
        return out

    # --- the index ---------------------------------------------------------------------------------------

    def _folder_of(self, component: str, key: str) -> str:
        return key[len(self.prefix) + len(component) + 2:].split("/", 1)[0]

    def index_key(self, component: str, folder: str) -> str:
        return f"{self.prefix}/{INDEX_FOLDER}/{component}/{folder}.json"

    def _listing(self, component: str, folder: str, start_after: str | None = None) -> dict[str, str]:
        """The folder's manifest keys and tags (``start_after``: only those after that key)."""
        return {info.key: _tag(info) for info in self.store.list(f"{self.prefix}/{component}/{folder}/", start_after)
                if info.key.endswith(manifest.MANIFEST_SUFFIX)}

    def folders(self, component: str) -> list[str]:
        return self.store.folders(f"{self.prefix}/{component}/")

    def _read_index(self, component: str, folder: str) -> dict[str, Any] | None:
        """The folder's index (its document, entries parsed), or None (and why, in the log) when it is missing or
        cannot be trusted."""
        key = self.index_key(component, folder)
        try:
            with self.store.load(key) as body:
                doc = json.loads(body.read())
        except ObjectNotFound:
            return None
        except ValueError:
            log.warning("catalog index %s is not JSON: rebuilding it from the manifests", key)
            return None
        problem = None
        if not isinstance(doc, dict) or doc.get("index_version") != INDEX_VERSION:
            problem = "not an index this version reads"
        elif self.field not in doc:
            problem = "it has no recovery MAC" if self.read_only else "it is not signed"
        elif doc.get("component") != component or doc.get("folder") != folder:
            problem = f"it is the index of {doc.get('component')}/{doc.get('folder')}"
        else:
            problem = self.keys.verify([(mac_message(_INDEX_CONTEXT, self.rel(key), doc), doc[self.field])])[0]
        if problem is None:
            try:
                doc["entries"] = {e.key: e for e in (Entry.model_validate(x) for x in doc.get("entries", []))}
                doc["reconciled_at"] = datetime.fromisoformat(str(doc["reconciled_at"]))
                return doc
            except (ValidationError, KeyError, ValueError) as exc:
                problem = f"it is malformed ({exc})"
        log.warning("catalog index %s cannot be used (%s): rebuilding it from the manifests", key, problem)
        return None

    def _write_index(self, component: str, folder: str, entries: Iterable[Entry], damaged: dict[str, str],
                     newest_day: str | None, reconciled_at: datetime) -> None:
        if self.read_only:  # break-glass: the backup storage is only read
            return
        key = self.index_key(component, folder)
        doc: dict[str, Any] = {
            "index_version": INDEX_VERSION, "component": component, "folder": folder,
            "updated_at": datetime.now(timezone.utc).isoformat(), "reconciled_at": reconciled_at.isoformat(),
            "newest_day": newest_day, "damaged": damaged,
            "entries": [e.model_dump(mode="json") for e in sorted(entries, key=lambda e: (e.completed_at, e.backup_id))],
        }
        self._sign(doc, mac_message(_INDEX_CONTEXT, self.rel(key), doc))
        try:
            self.store.save_bytes(key, _canonical(doc), "application/json")
        except BackupError as exc:  # a reader without write access still reads right; the next writer saves it
            log.warning("catalog index %s not saved (%s)", key, exc)

    def _folder(self, component: str, folder: str, full: bool = False,
                also: Iterable[str] = ()) -> tuple[list[Backup], list[Unreadable]]:
        """Every manifest of one target folder: from the index, plus what was written since.

        Keys sort by the backup's start within a folder (``<YYYY>/<MM>/<DD>/<time>``), so a backup written since the
        index is listed from the day before the index's newest day on (a run that started before a newer one and
        ended after it is still found): one LIST of a few keys however many backups are kept; ``also``: keys to
        read in any case (the manifest a writer just saved). Once a day (``RECONCILE``), when the index is missing or
        fails its MAC, and when asked (``full``: the prune, ``catalog rebuild``), the whole folder is listed and
        compared by ETag instead, so removals and replacements made outside luxima-backup are seen too.
        """
        now = datetime.now(timezone.utc)
        index = self._read_index(component, folder)
        full = full or index is None or now - index["reconciled_at"] > RECONCILE
        known: dict[str, Entry] = index["entries"] if index else {}
        if full:
            listed = self._listing(component, folder)
            entries = {k: e for k, e in known.items() if listed.get(k) == e.tag}
            changed = index is None or len(entries) != len(known)
            reconciled = now
        else:
            assert index is not None
            listed = self._listing(component, folder, self._day_before(component, folder, index.get("newest_day")))
            for key in also:  # the writer's own key, however it sorts
                if key not in listed:
                    listed[key] = _tag(self.store.stat(key))
            # a damaged manifest stays listed as damaged: it is read (and judged) again each time
            listed.update({k: t for k, t in (index.get("damaged") or {}).items() if k not in listed})
            entries = dict(known)
            changed = False
            reconciled = index["reconciled_at"]
        todo = [k for k in listed if k not in entries or entries[k].tag != listed[k]]
        loaded: dict[str, Manifest] = {}
        unreadable: list[Unreadable] = []
        raws = self._fetch(todo)
        present = [k for k in todo if k in raws]
        for key, result in zip(present, self._authenticate([(k, raws[k]) for k in present])):
            entries.pop(key, None)
            if isinstance(result, FormatError):
                unreadable.append(Unreadable(key, folder, result))
            elif result.component != component:  # misfiled: never offered as a backup of this component
                unreadable.append(Unreadable(key, folder, FormatError(
                    f"manifest {key} is of a {result.component} backup, filed under {component}/")))
            else:
                entries[key] = Entry.of(key, listed[key], result)
                loaded[key] = result
        damaged = {u.manifest_key: listed[u.manifest_key] for u in unreadable}
        changed = changed or full or any(k in loaded for k in todo) or damaged != (index or {}).get("damaged", {})
        base = len(f"{self.prefix}/{component}/{folder}/")
        days = [k[base:base + 10] for k in [*entries, *damaged]] + [(index or {}).get("newest_day") or ""]
        newest_day = max(days) or None
        if changed and (entries or damaged or index is not None):
            self._write_index(component, folder, entries.values(), damaged, newest_day, reconciled)
        backups = [Backup(k, e, self._loader(k), loaded.get(k)) for k, e in entries.items()]
        return backups, unreadable

    def _day_before(self, component: str, folder: str, day: str | None) -> str | None:
        """Where an incremental listing starts: just before the folder of the day before ``day`` (``YYYY/MM/DD``)."""
        try:
            before = datetime.strptime(str(day), "%Y/%m/%d") - timedelta(days=1)
        except ValueError:
            return None  # no day recorded: list it all
        return f"{self.prefix}/{component}/{folder}/{before:%Y/%m/%d}/"

    def _loader(self, key: str) -> Callable[[], Manifest]:
        return lambda: self.load(key)

    def _fetch(self, keys: list[str]) -> dict[str, bytes]:
        """The bytes of many manifests, read a few at a time; one removed meanwhile (a prune) is left out."""
        def one(key: str) -> tuple[str, bytes | None]:
            try:
                with self.store.load(key) as body:
                    return key, body.read()
            except ObjectNotFound:
                return key, None

        if len(keys) <= 1:
            pairs = [one(k) for k in keys]
        else:
            with ThreadPoolExecutor(max_workers=min(_READERS, len(keys))) as pool:
                pairs = list(pool.map(one, keys))
        return {k: raw for k, raw in pairs if raw is not None}

    def refresh(self, component: str, folder: str | None = None, full: bool = True) -> None:
        """Bring the index of one folder (or every folder of ``component``) up to date; ``full``: compare every manifest
        key and ETag in storage (after removals, and to see changes made outside luxima-backup)."""
        for name in [folder] if folder else self.folders(component):
            self._folder(component, name, full)

    # --- what the commands and flows ask --------------------------------------------------------------------

    def iter_backups(self, component: str, source: str | None = None,
                     also_under: list[str] | tuple[str, ...] = ()) -> Iterator[Backup | Unreadable]:
        """Each backup of ``component`` (of one ``source``, also from its ``also_under`` folders), or why not.

        With a ``source``, only backups whose manifest names that source are yielded: database backups were once
        filed by database name (``db/postgres/``), which several ``[databases.NAME]`` can share.
        """
        folders = [manifest.safe_name(d) for d in dict.fromkeys([source, *also_under]) if d] if source else self.folders(component)
        for folder in folders:
            backups, unreadable = self._folder(component, folder)
            yield from unreadable
            for b in backups:
                if source is None or b.source_name in (None, source):
                    yield b

    def list_backups(self, component: str, source: str | None = None,
                     also_under: list[str] | tuple[str, ...] = ()) -> list[Backup]:
        """Every readable backup of ``component`` (optionally of one source), oldest first."""
        backups = [b for b in self.iter_backups(component, source, also_under) if isinstance(b, Backup)]
        return sorted(backups, key=lambda b: (b.completed_at, b.backup_id))

    def by_target(self, component: str) -> tuple[dict[str, list[Backup]], list[Unreadable]]:
        """Every backup of ``component`` grouped by target (oldest first), and the manifests that cannot be used.

        A backup's target is the section its manifest names; manifests written before they named it are filed under it.
        """
        found: dict[str, list[Backup]] = {}
        unreadable: list[Unreadable] = []
        for b in self.iter_backups(component):
            if isinstance(b, Backup):
                found.setdefault(b.source_name or self._folder_of(component, b.manifest_key), []).append(b)
            else:
                unreadable.append(b)
        return {k: sorted(v, key=lambda b: (b.completed_at, b.backup_id)) for k, v in found.items()}, unreadable

    def resolve(self, component: str, spec: str, source: str | None = None, as_of: datetime | None = None,
                also_under: list[str] | tuple[str, ...] = (), retried: bool = False) -> Backup:
        """The backup an operator means by ``spec``: ``latest``, a backup id, or an object key.

        ``latest`` is the newest *verified* backup completed at or before ``as_of`` (default now); backups whose
        manifest says anything but verified, or that are not authentic, are never chosen. A backup named by id or key
        that was taken of another source than ``source`` is refused.
        """
        spec = spec.strip()
        if spec == "latest":
            cutoff = as_of.astimezone(timezone.utc) if as_of else datetime.now(timezone.utc)
            found = list(self.iter_backups(component, source, also_under))
            candidates = sorted((b for b in found if isinstance(b, Backup) and b.verified and b.completed_at <= cutoff),
                                key=lambda b: (b.completed_at, b.backup_id))
            if not candidates:
                scope = f" of {source}" if source else ""
                when = f" completed by {cutoff.isoformat()}" if as_of else ""
                bad = [u for u in found if isinstance(u, Unreadable)]
                also = f"; {len(bad)} manifest(s) there cannot be used, e.g. {bad[0]}" if bad else ""
                raise ConfigError(f"no verified {component} backup{scope}{when} under {self.prefix}/{component}/{also}",
                                  hint="check storage settings, the source name, or `luxima-backup list`")
            try:
                candidates[-1].manifest  # read and authenticated now: the restore needs it whole
            except ObjectNotFound:  # removed outside luxima-backup since the index last listed everything
                if retried:
                    raise
                log.warning("manifest %s is gone from storage; listing %s/%s/ again", candidates[-1].manifest_key,
                            self.prefix, component)
                for folder in dict.fromkeys(self._folder_of(component, b.manifest_key) for b in candidates):
                    self.refresh(component, folder)
                return self.resolve(component, spec, source, as_of, also_under, retried=True)
            return candidates[-1]
        if as_of is not None:
            raise ConfigError("as_of applies only to backup = 'latest'", hint="leave as_of empty when naming a backup")
        if "/" in spec:  # an object key: the manifest itself, or one of the backup's objects
            key = spec if spec.endswith(manifest.MANIFEST_SUFFIX) else manifest.manifest_key_for(spec)
            try:
                found = Backup.of(key, self.load(key))
            except ObjectNotFound:
                raise ConfigError(f"no manifest {key} for {spec!r}",
                                  hint="a backup without a manifest did not complete; choose another with `luxima-backup list`") from None
            if found.component != component:
                raise ConfigError(f"{spec} is a {found.component} backup, not a {component} one",
                                  hint=f"use the {found.component} command, or name a {component} backup")
            return _of_source(found, source)
        for backup in self.list_backups(component, source, also_under):
            if backup.backup_id == spec:
                return backup
        for backup in self.list_backups(component):
            if backup.backup_id == spec:
                return _of_source(backup, source)
        raise ConfigError(f"no {component} backup with id {spec!r} under {self.prefix}/{component}/",
                          hint="use `latest`, an id shown by `luxima-backup list`, or an object key")

    def unsigned(self, component: str) -> Iterator[tuple[str, Manifest]]:
        """The manifests written before manifests were signed (readable, but without a MAC): what ``adopt`` signs."""
        for folder in self.folders(component):
            raws = self._fetch(list(self._listing(component, folder)))
            for key, raw in raws.items():
                try:
                    doc = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(doc, dict) and "mac" not in doc:
                    try:
                        yield key, manifest.parse(raw, f"manifest {key}")
                    except FormatError as exc:
                        log.warning("%s", exc)

    def adopt(self, key: str, document: Manifest) -> None:
        """Sign a manifest written before manifests were signed (after its objects were checked), in place; then
        ``refresh`` the component (an older key: the index finds it only by a full listing)."""
        self.store.save_bytes(key, self.signed(key, document), "application/json")


def legacy_folders(settings: Settings, component: str, source: str | None) -> list[str]:
    """The folders a source's backups were filed under before backups were filed by section (``also_under``):
    a database's, by its database name."""
    if component == "db" and source in settings.databases:
        return [settings.databases[source].dbname]
    return []


def _of_source(backup: Backup, source: str | None) -> Backup:
    """``backup``, unless it was taken of another source than the one asked for."""
    if source is not None and backup.source_name not in (None, source):
        raise ConfigError(f"backup {backup.backup_id} was taken of {backup.source_name!r}, not of {source!r}",
                          hint=f"to restore it, name its source ({backup.source_name!r}); to restore {source!r}, "
                               f"choose one of its backups with `luxima-backup list --source {source}`")
    return backup
