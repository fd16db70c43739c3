"""The one typed settings object: loaded once from a TOML file, overridable from the environment.

The file comes from ``--config`` or ``LUXIMA_BACKUP_CONFIG``; any value can be overridden by
``LUXIMA_BACKUP__<SECTION>__<KEY>`` (e.g. ``LUXIMA_BACKUP__STORAGE__BUCKET``). Secrets are
never written inline: fields typed ``SecretRef`` take ``env:``, ``file:``, ``prefect-secret:``
or ``vault:`` references. Every problem is reported at load, with the setting's path and
what to put there. The annotated example is ``config/luxima-backup.example.toml``.
"""

from __future__ import annotations

import os
import re
import threading
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from .errors import ConfigError
from .secrets import SecretRef

CONFIG_ENV = "LUXIMA_BACKUP_CONFIG"
ENV_PREFIX = "LUXIMA_BACKUP__"


def _parse_ref(value: Any) -> Any:
    return SecretRef.parse(value) if isinstance(value, str) else value


Secret = Annotated[SecretRef, BeforeValidator(_parse_ref), PlainSerializer(str, return_type=str)]


class _Section(BaseModel):
    # A misspelt key is an error, not a silently ignored line.
    model_config = ConfigDict(extra="forbid", frozen=True)


SUPABASE_COUNTED_SCHEMAS = ["public", "auth", "storage"]


class PostgresConnection(_Section):
    """How to reach one PostgreSQL database, and which of its tables matter most."""

    preset: Literal["postgres", "supabase"] = Field(
        "postgres",
        description="supabase: a Supabase project's database; counts and checks public, auth and storage unless "
        "`schemas` says otherwise (docs/supabase.md). Either way the whole database is dumped",
    )

    host: str = Field("127.0.0.1", description="host name, IP address, or socket directory")
    port: int = Field(5432, ge=1, le=65535)
    dbname: str = Field(min_length=1)
    user: str = Field(min_length=1)
    password: Secret | None = Field(None, description="reference to the password; none for peer/cert auth")
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] = "prefer"
    sslrootcert: Path | None = None
    connect_timeout: int = Field(10, ge=1, le=600, description="seconds")
    lost_after_seconds: int = Field(
        120, ge=0, le=3600,
        description="a server that stops answering mid-run (host down, link cut, no reset sent) is given up after "
        "about this long: TCP keepalives while waiting on it, and a bound on data it leaves unacknowledged "
        "(libpq's tcp_user_timeout), for this program's connections and pg_dump/pg_restore/psql; 0 leaves the "
        "operating system's defaults (a vanished host is noticed after 15 minutes to hours)",
    )
    maintenance_db: str = Field("postgres", min_length=1, description="database to connect to when creating, renaming or dropping databases (restores)")
    schemas: list[str] = Field(default_factory=lambda: ["public"], min_length=1, description="schemas whose tables are counted")
    tables: list[str] = Field(
        default_factory=list,
        description="main tables (schema.table) counted at backup and checked after restore; empty = every user table in `schemas`",
    )
    exclude_schemas: list[str] = Field(
        default_factory=list,
        description="schemas left out of the dump (pg_dump --exclude-schema patterns); the rest of the database is dumped whole",
    )

    @model_validator(mode="before")
    @classmethod
    def _preset_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") == "supabase" and "schemas" not in data:
            data = {**data, "schemas": list(SUPABASE_COUNTED_SCHEMAS)}  # the users' data: app tables, accounts, files
        return data

    def conninfo(self) -> dict[str, Any]:
        """libpq keywords for this connection, without the password."""
        info: dict[str, Any] = {
            "host": self.host, "port": self.port, "dbname": self.dbname, "user": self.user,
            "sslmode": self.sslmode, "connect_timeout": self.connect_timeout,
            "application_name": "luxima-backup", **self.liveness(),
        }
        if self.sslrootcert:
            info["sslrootcert"] = str(self.sslrootcert)
        return info

    def liveness(self) -> dict[str, int]:
        """libpq keywords that notice a vanished server within ``lost_after_seconds``: an idle connection is
        probed after a third of it, then every sixth, given up after four probes unanswered; data sent is given up
        on once unacknowledged that long. (A server that is alive but slow still answers probes.)"""
        lost = self.lost_after_seconds
        if lost == 0:
            return {}
        return {"keepalives": 1, "keepalives_idle": max(1, lost // 3), "keepalives_interval": max(1, lost // 6),
                "keepalives_count": 4, "tcp_user_timeout": lost * 1000}


class SshHost(_Section):
    """A host reached over SSH (files and config backups), with strict host-key checking."""

    host: str = Field(min_length=1)
    port: int = Field(22, ge=1, le=65535)
    user: str = Field(min_length=1)
    key: Secret = Field(description="reference to the private key (e.g. 'file:/etc/luxima-backup/id_ed25519' or a vault: path)")
    known_hosts: Path = Field(description="known_hosts file holding this host's key; unknown hosts are never accepted")
    connect_timeout: float = Field(15, gt=0)
    io_timeout: float = Field(
        120, gt=0,
        description="seconds a connected host may send nothing while it is read before it counts as gone (a transient "
        "error: the stream is tried again); a host that vanished mid-run cannot hold the run",
    )


class StorageSettings(_Section):
    """Where backups are stored: S3-compatible object storage (AWS S3, MinIO, Ceph, ...) or a directory."""

    kind: Literal["s3", "local"] = Field("s3", description="s3, or local: a directory such as a mounted NAS or backup volume")
    path: Path | None = Field(None, description="for kind = local: the directory that holds the backups")
    s3_bucket_block: str | None = Field(
        None, description="name of a saved prefect-aws S3Bucket block; when set, the connection fields below are not used"
    )
    bucket: str | None = Field(None, min_length=3, max_length=63)
    endpoint_url: str | None = Field(None, pattern=r"^https?://", description="S3 endpoint; none for AWS")
    region: str = "us-east-1"
    access_key_id: Secret | None = None
    secret_access_key: Secret | None = None
    addressing_style: Literal["path", "virtual", "auto"] = "path"
    verify_tls: bool = True
    ca_bundle: Path | None = None
    prefix: str = Field("backups", pattern=r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$", description="key prefix for every object")
    multipart_chunk_mib: int = Field(
        8, ge=5, le=1024,
        description="part size; S3 allows 5 MiB to 5 GiB and 10,000 parts, so the largest object is 10,000 x this "
        "(78 GiB at 8 MiB); raise it for larger databases, at the cost of memory",
    )
    max_concurrency: int = Field(2, ge=1, le=32, description="parts in flight; memory ~ part size x (this + 1)")
    max_attempts: int = Field(
        10, ge=1, le=20,
        description="attempts per HTTP request, the only retry of a failed S3 request (botocore standard mode: "
        "backoff doubling up to 20 s, so 10 attempts ride out about 2 minutes of unavailable storage)")
    connect_timeout: float = Field(10, gt=0)
    read_timeout: float = Field(60, gt=0)
    object_lock: Literal["off", "governance", "compliance"] = Field(
        "off",
        description="write every object under S3 Object Lock until its retention (+ lock_margin_days) has passed; the "
        "bucket needs versioning and object lock enabled (`luxima-backup storage check`). governance: removable early "
        "only with s3:BypassGovernanceRetention; compliance: by nobody",
    )
    lock_margin_days: int = Field(1, ge=0, le=365, description="added to each component's retention for its lock")
    pruner_access_key_id: Secret | None = Field(
        None, description="credentials the prune uses to delete (the backup credentials then need no delete right)")
    pruner_secret_access_key: Secret | None = None

    @model_validator(mode="after")
    def _bucket_given(self) -> "StorageSettings":
        if self.kind == "local":
            if self.path is None or not self.path.is_absolute():
                raise ValueError("storage.kind = 'local' needs storage.path, an absolute directory")
            if self.object_lock != "off":
                raise ValueError("storage.object_lock needs S3 object storage; a directory has no object lock")
            return self
        if not self.s3_bucket_block and not self.bucket:
            raise ValueError("set storage.bucket (with endpoint_url and credentials) or storage.s3_bucket_block")
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("set both storage.access_key_id and storage.secret_access_key, or neither (AWS default chain)")
        if (self.pruner_access_key_id is None) != (self.pruner_secret_access_key is None):
            raise ValueError("set both storage.pruner_access_key_id and storage.pruner_secret_access_key, or neither")
        return self

    def for_pruner(self) -> "StorageSettings":
        """The same storage reached with the pruner's credentials (those with the right to delete), when set."""
        if self.pruner_access_key_id is None:
            return self
        return self.model_copy(update={"access_key_id": self.pruner_access_key_id,
                                       "secret_access_key": self.pruner_secret_access_key, "s3_bucket_block": None})


class VaultSettings(_Section):
    """HashiCorp Vault: where backup keys are held."""

    address: str = Field(pattern=r"^https?://")
    namespace: str | None = None
    auth: Literal["token", "approle"] = "token"
    token: Secret | None = None
    role_id: Secret | None = None
    secret_id: Secret | None = None
    approle_mount: str = "approle"
    verify_tls: bool = True
    ca_cert: Path | None = None
    timeout: float = Field(10, gt=0)
    transit_mount: str = "transit"
    transit_key: str = "luxima-backup"
    kv_mount: str = "secret"
    kv_path: str = "luxima-backup/master-key"
    kv_field: str = "key"

    @field_validator("transit_key")
    @classmethod
    def _transit_key_name(cls, value: str) -> str:
        # Vault's Transit routes take only such names: any other (one with a "/", say) matches no
        # route, and would fail at the first backup as a "path not found".
        if not re.fullmatch(r"[0-9A-Za-z_](?:[0-9A-Za-z_.-]*[0-9A-Za-z_])?", value):
            raise ValueError(f"{value!r} is not a Transit key name: use letters, digits, '_', '-' and '.', "
                             "starting and ending with a letter, digit or '_' (no '/')")
        return value

    @model_validator(mode="after")
    def _auth_complete(self) -> "VaultSettings":
        if self.auth == "token" and self.token is None:
            raise ValueError("keys.vault.auth = 'token' needs keys.vault.token (e.g. 'env:VAULT_TOKEN')")
        if self.auth == "approle" and (self.role_id is None or self.secret_id is None):
            raise ValueError("keys.vault.auth = 'approle' needs keys.vault.role_id and keys.vault.secret_id")
        return self


class KeySettings(_Section):
    """Which key wraps each backup's data key."""

    provider: Literal["vault-transit", "vault-kv", "file"] = "vault-transit"
    vault: VaultSettings | None = None
    key_file: Path | None = Field(None, description="32-byte key, base64; development and demos only")
    allow_key_file: bool = Field(False, description="must be true to use provider = 'file' (it keeps the key on this disk)")
    old_key_files: list[Path] = Field(default_factory=list, description="retired key files, still tried when reading old backups")
    chunk_kib: int = Field(1024, ge=16, le=16384, description="encryption chunk size; bounds memory, one tag per chunk")
    recovery_public_key: str | None = Field(
        None, description="x25519:... from `luxima-backup keys recovery-generate`: every data key is also sealed to it, so "
        "the offline private key alone opens the backups when Vault is gone")
    recovery_catalog_key: Secret | None = Field(
        None, description="reference to the catalog key `keys recovery-generate` wrote beside the private key (e.g. "
        "vault:secret/luxima-backup/recovery#catalog_key): manifests are also signed with it, so the catalog can be "
        "trusted with the recovery key alone")
    recovery_private_key: Path | None = Field(
        None, description="break-glass only (restore --recovery-key): read backups with this offline recovery private "
        "key alone; Vault and keys.provider are not used, nothing is written")

    @field_validator("recovery_public_key")
    @classmethod
    def _recovery_key(cls, value: str | None) -> str | None:
        if value is not None:
            from .recovery import load_public

            try:
                load_public(value)
            except Exception as exc:
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _provider_complete(self) -> "KeySettings":
        if self.recovery_public_key is not None and self.recovery_catalog_key is None:
            raise ValueError("keys.recovery_public_key needs keys.recovery_catalog_key (the catalog key file "
                             "`luxima-backup keys recovery-generate` wrote): without it, restores with the recovery key "
                             "could not tell real manifests from planted ones")
        if self.provider.startswith("vault") and self.vault is None:
            raise ValueError(f"keys.provider = '{self.provider}' needs a [keys.vault] section")
        if self.provider == "file":
            if self.key_file is None:
                raise ValueError("keys.provider = 'file' needs keys.key_file")
            if not self.allow_key_file:
                raise ValueError(
                    "keys.provider = 'file' keeps the master key on local disk; it is for development and demos. "
                    "Set keys.allow_key_file = true to use it anyway"
                )
        return self


class DbBackupSettings(_Section):
    """The PostgreSQL backup: what, how compressed, how verified, how retried."""

    database: str = Field("main", description="which [databases.NAME] to back up by default")
    compression: Literal["zstd", "gzip"] = "zstd"
    level: int | None = Field(None, ge=1, le=22, description="zstd 1-22 (default 3), gzip 1-9 (default 6)")
    threads: int = Field(0, ge=0, le=64, description="compression threads: 0 = one per core for zstd (gzip stays on one), 1 = "
                         "no extra thread, 2+ = that many (gzip's pay off only with cores to spare)")
    globals: bool = Field(True, description="also dump roles with pg_dumpall --globals-only (a warning when refused)")
    deep_verify: bool = Field(True, description="after upload, stream back, decrypt, decompress and pg_restore --list")
    pg_bin_dir: Path | None = Field(None, description="directory of pg_dump/pg_restore; default: newest found")
    attempts: int = Field(3, ge=1, le=10, description="attempts of the dump-to-storage stream on transient failures")
    retry_delay_seconds: list[float] = Field(default_factory=lambda: [30.0, 120.0], description="backoff between attempts")
    retention_days: int = Field(30, ge=1)
    lock_wait_timeout_seconds: float = Field(
        120, gt=0, le=86400,
        description="how long pg_dump (and the row counts) wait for a table another session holds locked (ALTER TABLE, "
        "VACUUM FULL, a migration) before the backup fails, naming that session",
    )
    timeout_seconds: float = Field(6 * 3600, gt=0, description="the whole db-backup run, retries included, ends TimedOut after this")
    stage_timeout_seconds: float = Field(
        4 * 3600, gt=0,
        description="one attempt of the stream (dump, compress, encrypt, upload) is stopped after this and tried again "
        "(attempts); the verify fails after this",
    )

    @model_validator(mode="after")
    def _level_in_range(self) -> "DbBackupSettings":
        if self.compression == "gzip" and self.level is not None and self.level > 9:
            raise ValueError("db_backup.level for gzip must be 1-9")
        return self

    @property
    def effective_level(self) -> int:
        return self.level if self.level is not None else (3 if self.compression == "zstd" else 6)


class FileSource(_Section):
    """One tree of user files to back up: a directory here, a directory on a host (rsync over SSH), or a bucket."""

    kind: Literal["local", "ssh", "s3"] = Field(description="local directory, directory on an [hosts.NAME] over SSH, or an S3 bucket")
    path: str = Field("", description="local or remote directory (absolute); for s3: the key prefix (a folder, may be empty)")
    host: str | None = Field(None, description="kind = ssh: which [hosts.NAME] to reach")
    bucket: str | None = Field(None, min_length=3, max_length=63, description="kind = s3: the bucket (e.g. a Supabase Storage bucket)")
    endpoint_url: str | None = Field(None, pattern=r"^https?://", description="kind = s3: the S3 endpoint (e.g. https://PROJECT.supabase.co/storage/v1/s3)")
    region: str = "us-east-1"
    access_key_id: Secret | None = None
    secret_access_key: Secret | None = None
    exclude: list[str] = Field(default_factory=list, description="patterns left out (rsync --exclude syntax; fnmatch on the key for s3)")
    direct: bool = Field(
        False,
        description="kind = local: archive straight from the directory, without the staging copy (each file is "
        "checked unchanged across its read; one that changed is stored as read, named in the backup's warnings, "
        "and stored again by the next run)",
    )
    min_files: int = Field(1, ge=0, description="fewer files than this fails the backup (0 allows an empty source)")
    max_shrink_percent: float = Field(
        50, ge=0, le=100,
        description="fail, keeping the mirror as it was, when the source lost more than this share of the last backup's files",
    )

    @model_validator(mode="after")
    def _complete(self) -> "FileSource":
        if self.kind in ("local", "ssh") and not self.path.startswith("/"):
            raise ValueError(f"a {self.kind} file source needs path, an absolute directory")
        if self.kind == "ssh" and not self.host:
            raise ValueError("a ssh file source needs host, the name of a [hosts.NAME] section")
        if self.direct and self.kind != "local":
            raise ValueError("direct applies to local sources only (others are copied into the staging mirror)")
        if self.direct and self.exclude:
            raise ValueError("exclude needs the staging mirror (rsync applies the patterns): remove direct, or the patterns")
        if self.kind == "s3":
            if not self.bucket:
                raise ValueError("a s3 file source needs bucket")
            if (self.access_key_id is None) != (self.secret_access_key is None):
                raise ValueError("set both access_key_id and secret_access_key, or neither (AWS default chain)")
        return self


class FilesBackupSettings(_Section):
    """The file-storage backup: which trees, how archived and compressed, how often a full archive."""

    sources: dict[str, FileSource] = Field(default_factory=dict, description="one backup per source per run; the name is used in object keys")
    mirror_dir: Path | None = Field(None, description="persistent staging mirror, one folder per source (default: work_dir/files-mirror)")
    compression: Literal["gzip", "zstd"] = Field("gzip", description="gzip (tar.gz, as the procedure says) or zstd (faster)")
    level: int | None = Field(None, ge=1, le=22, description="zstd 1-22 (default 3), gzip 1-9 (default 6)")
    threads: int = Field(0, ge=0, le=64, description="compression threads: 0 = one per core for zstd (gzip stays on one), 1 = "
                         "no extra thread, 2+ = that many (gzip's pay off only with cores to spare)")
    full_every_days: int = Field(
        7, ge=0,
        description="a full archive when the last full one is this old (0: every backup is full); in between, "
        "archives hold only new and changed files and restores read the chain back to the full one",
    )
    deep_verify: bool = Field(True, description="after upload, read the archive back, decrypt and parse every member")
    attempts: int = Field(3, ge=1, le=10, description="attempts of the archive-to-storage stream on transient failures")
    retry_delay_seconds: list[float] = Field(default_factory=lambda: [30.0, 120.0])
    rsync_timeout: int = Field(600, ge=10, description="rsync --timeout: seconds of no I/O before it gives up")
    retention_days: int = Field(30, ge=1)
    timeout_seconds: float = Field(8 * 3600, gt=0, description="the whole files-backup run ends TimedOut after this")
    stage_timeout_seconds: float = Field(
        6 * 3600, gt=0,
        description="one attempt of a source's stream (mirror, archive, encrypt, upload) is stopped after this and tried "
        "again (attempts); that source's verify fails after this",
    )

    @model_validator(mode="after")
    def _level_in_range(self) -> "FilesBackupSettings":
        if self.compression == "gzip" and self.level is not None and self.level > 9:
            raise ValueError("files_backup.level for gzip must be 1-9")
        return self

    @property
    def effective_level(self) -> int:
        return self.level if self.level is not None else (3 if self.compression == "zstd" else 6)


_HOST_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


def _absolute(paths: list[str], what: str) -> list[str]:
    bad = [p for p in paths if not p.startswith("/") or any(part in (".", "..") for part in p.split("/"))]
    if bad:
        raise ValueError(f"{what} must be absolute paths without '.' or '..': {bad}")
    return paths


class ConfigService(_Section):
    """A service on a config host whose files a restore checks (and may reload) after writing them."""

    paths: list[str] = Field(min_length=1, description="absolute paths or globs; restoring a file under one of them runs this service's commands")
    validate_command: str | None = Field(None, description="run on the host after a restore, e.g. 'nginx -t'; a failure rolls every file back")
    reload_command: str | None = Field(None, description="run on the host after a validated restore, e.g. 'systemctl reload nginx'")

    @model_validator(mode="after")
    def _paths(self) -> "ConfigService":
        _absolute(self.paths, "services paths")
        return self


class ConfigHost(_Section):
    """What the config backup fetches from one [hosts.NAME] (the same name)."""

    paths: list[str] = Field(min_length=1, description="absolute paths, globs in any segment (/srv/apps/*/docker-compose.yml); a folder is fetched whole")
    exclude: list[str] = Field(default_factory=list, description="globs matched against a file's name or its whole path (*.log, /etc/nginx/modules-available/*)")
    services: dict[str, ConfigService] = Field(default_factory=dict, description="validation and reload commands for restores")
    drift_ignore: list[str] = Field(default_factory=list, description="globs of paths whose changes are expected: no drift alert for them")


class ConfigGit(_Section):
    """The git repository the scrubbed configs are committed and pushed to."""

    remote: str | None = Field(None, description="URL pushed to (ssh://git@host/ops/configs.git, git@host:ops/configs.git, or a local path); none: commit locally only")
    branch: str = Field("main", pattern=r"^[A-Za-z0-9._/-]+$")
    key: Secret | None = Field(None, description="SSH private key for an SSH remote (file: or vault: reference)")
    known_hosts: Path | None = Field(None, description="known_hosts holding the git server's key (SSH remotes); unknown servers are refused")
    working_copy: Path | None = Field(None, description="the local clone (default: work_dir/config-repo)")
    author_name: str = "Luxima Backup"
    author_email: str = "luxima-backup@localhost"
    push_attempts: int = Field(3, ge=1, le=10, description="pushes tried, each after rebasing on what someone else pushed")
    connect_timeout: int = Field(15, ge=1, le=600)

    @model_validator(mode="after")
    def _remote(self) -> "ConfigGit":
        import re as _re

        r = self.remote
        if not r:
            return self
        scheme = _re.match(r"^([a-z][a-z0-9+.-]*)://", r)
        if scheme and scheme.group(1) not in _SSH_SCHEMES + ("https", "file"):
            raise ValueError(f"configs.git.remote: the {scheme.group(1)}:// transport is not supported; use ssh://, "
                             "user@host:path, https:// or a local path")
        if scheme and scheme.group(1) in ("https", "file") and "@" in r.split("/", 3)[2]:
            raise ValueError("configs.git.remote must not hold a user, password or token: use an SSH remote and configs.git.key")
        return self

    @property
    def over_ssh(self) -> bool:
        r = self.remote or ""
        scheme = r.split("://", 1)[0] if "://" in r else None
        if scheme is not None:
            return scheme in _SSH_SCHEMES
        return not r.startswith(("/", ".")) and ":" in r.split("/", 1)[0]  # scp-like user@host:path


_SSH_SCHEMES = ("ssh", "git+ssh", "ssh+git")


class ConfigSecretRules(_Section):
    """Extensions of the built-in secret rules (luxima_backup/config_secrets.py)."""

    names: list[str] = Field(default_factory=list, description="regexes searched in setting names; a match makes the value secret")
    patterns: list[str] = Field(default_factory=list, description="regexes searched in the data; group 1 (or the match) is replaced")
    files: list[str] = Field(default_factory=list, description="globs of files that are secret as a whole")
    allow: list[str] = Field(
        default_factory=list,
        description="regexes of known-safe values: a value found only by its format (a token) or by looking random, "
        "by the scrubber or by the gate before each commit, stays readable when one of them matches all of it "
        "(e.g. 'sha384-[A-Za-z0-9+/]{64}' for subresource integrity hashes, or one known value, escaped); values under "
        "secret names are replaced all the same",
    )

    @model_validator(mode="after")
    def _compiles(self) -> "ConfigSecretRules":
        for what, patterns in (("names", self.names), ("patterns", self.patterns), ("allow", self.allow)):
            for pattern in patterns:
                try:
                    compile_secret_rule(what, pattern)
                except (re.error, TypeError, AttributeError) as exc:
                    raise ValueError(f"configs.secrets.{what}: {pattern!r} is not a valid regular expression: "
                                     f"{exc}") from None
        return self


def compile_secret_rule(what: str, pattern: str) -> re.Pattern[Any]:
    """A ``[configs.secrets]`` regex compiled as the scrubber uses it (names are matched case-insensitively in
    text, patterns and allowed values in bytes). Here, below both, so the settings' check and the scrubber
    (config_secrets.Rules) compile alike and the settings import nothing of the scrubber."""
    if what == "names":
        return re.compile(pattern, re.IGNORECASE)
    return re.compile(pattern.encode())


class ConfigsSettings(_Section):
    """Weekly config backup: fetched over SSH, scrubbed into git and pushed, archived encrypted for restores."""

    hosts: dict[str, ConfigHost] = Field(default_factory=dict, description="one per [hosts.NAME] to back up, same name")
    git: ConfigGit = Field(default_factory=ConfigGit)
    fingerprint_key: Secret | None = Field(None, description="key (>= 16 bytes) of the HMAC fingerprints that replace secrets in git; never in the repository")
    secrets: ConfigSecretRules = Field(default_factory=ConfigSecretRules)
    storage: StorageSettings | None = Field(None, description="where the archives go (e.g. a local path on the Proxmox backup server); default: [storage]")
    compression: Literal["gzip", "zstd"] = "gzip"
    level: int | None = Field(None, ge=1, le=22)
    max_file_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="larger files are left out and reported (logs and dumps do not belong here)")
    deep_verify: bool = Field(True, description="after upload, read the archive back and check every file's sha256")
    drift_alert: bool = Field(True, description="emit luxima.config.drift (an alert) when a host's configs changed since the last backup")
    attempts: int = Field(3, ge=1, le=10, description="attempts of a host's fetch-to-storage stream on transient failures")
    retry_delay_seconds: list[float] = Field(default_factory=lambda: [30.0, 120.0])
    retention_days: int = Field(90, ge=1)
    timeout_seconds: float = Field(3600, gt=0, description="the whole config-backup run ends TimedOut after this")
    stage_timeout_seconds: float = Field(
        1200, gt=0,
        description="one attempt of a host's fetch (SSH, archive, encrypt, upload) is stopped after this and tried again "
        "(attempts); that host's verify fails after this",
    )
    restore_keep_dir: str = Field("/var/backups/luxima-config-restore", description="folder on the host where a restore keeps the files it overwrote")

    @model_validator(mode="after")
    def _paths(self) -> "ConfigsSettings":
        import re as _re

        for name, host in self.hosts.items():
            if not _re.match(_HOST_NAME, name):
                raise ValueError(f"configs.hosts.{name}: host names are letters, digits, '.', '_' and '-'")
            _absolute(host.paths, f"configs.hosts.{name}.paths")
        _absolute([self.restore_keep_dir], "configs.restore_keep_dir")
        if self.git.over_ssh and self.git.known_hosts is None:
            raise ValueError("configs.git.known_hosts is needed for an SSH remote (its server key is checked strictly)")
        return self

    @property
    def effective_level(self) -> int:
        return self.level or (3 if self.compression == "zstd" else 6)


class AppQuery(_Section):
    """A query the application depends on; after a restore it must succeed and return rows."""

    sql: str = Field(min_length=1, description="run read-only as the application role")
    min_rows: int = Field(1, ge=0, description="the query must return at least this many rows")


class HttpLogin(_Section):
    """A password login against a Supabase Auth (GoTrue) endpoint, as the application's users do."""

    url: str = Field(pattern=r"^https?://", description="the project's base URL; POSTs to /auth/v1/token?grant_type=password")
    email: str = Field(min_length=3)
    password: Secret
    apikey: Secret | None = Field(None, description="the project's anon key, sent as the apikey header")
    timeout: float = Field(10, gt=0)


class AppCheck(_Section):
    """How the application logs in and what it must be able to read, checked after every restore."""

    user: str | None = Field(None, description="log in to the restored database as this role (e.g. the app's role)")
    password: Secret | None = None
    queries: list[AppQuery] = Field(default_factory=list)
    http_login: HttpLogin | None = None

    @model_validator(mode="after")
    def _login_complete(self) -> "AppCheck":
        if self.queries and self.user is None:
            raise ValueError("restore.app_check.queries need restore.app_check.user (the application's role)")
        return self


class RestoreSettings(_Section):
    """Restores: where to by default, how, and what proves they worked."""

    target: str | None = Field(None, description="[databases.NAME] whose server receives restores; default: db_backup.database")
    jobs: int = Field(
        2, ge=1, le=64,
        description="connections loading the rows from the stream at once, then pg_restore -j for indexes and "
        "constraints (the restore's own new database is dropped if any fails); 1: pg_restore alone, everything in "
        "one transaction")
    attempts: int = Field(2, ge=1, le=5, description="attempts of the pg_restore pass on transient failures (each on an empty database)")
    rto_target_minutes: float = Field(120, gt=0, description="recovery time objective the measured RTO is shown against")
    timeout_seconds: float = Field(4 * 3600, gt=0, description="a db, files or config restore run ends TimedOut after this")
    stage_timeout_seconds: float = Field(
        3 * 3600, gt=0,
        description="each stage of a database restore (download, the check pass, one pg_restore attempt, verify) fails "
        "after this",
    )
    app_check: AppCheck = Field(default_factory=AppCheck)


class ProxmoxEndpoint(_Section):
    """A Proxmox VE API (one node, or any node of a cluster), reached with an API token."""

    address: str = Field(pattern=r"^https://[^/]+$", description="https://HOST:8006 (no path)")
    nodes: list[str] = Field(min_length=1, description="the node names this API serves, e.g. ['proxmox-node1', 'proxmox-node2']")
    token_id: str = Field(pattern=r"^[^@!\s]+@[^@!\s]+![A-Za-z][A-Za-z0-9._-]*$", description="USER@REALM!TOKENID")
    token_secret: Secret = Field(description="reference to the token's secret (vault: or env:)")
    ca_cert: Path | None = Field(None, description="PEM file of the CA (or the self-signed certificate) the API's certificate must chain to")
    fingerprint: str | None = Field(
        None, pattern=r"^([0-9A-Fa-f]{2}:){31}[0-9A-Fa-f]{2}$",
        description="SHA-256 fingerprint of the API's certificate (as the node's Certificates page shows it): pins "
        "that certificate instead of checking a CA",
    )
    verify_tls: bool = Field(True, description="false only with a fingerprint (pinning replaces the CA check)")
    timeout: float = Field(30, gt=0, description="seconds per HTTP request")

    @model_validator(mode="after")
    def _tls(self) -> "ProxmoxEndpoint":
        if not self.verify_tls and self.fingerprint is None:
            raise ValueError("verify_tls = false needs a fingerprint: an unverified Proxmox API would receive the "
                             "token from anyone in the middle (pin the certificate's SHA-256 fingerprint, or set ca_cert)")
        if self.ca_cert is not None and self.fingerprint is not None:
            raise ValueError("set ca_cert or fingerprint, not both")
        return self


class VmBackupSettings(_Section):
    """Weekly vzdump backups of Proxmox guests, kept a number of cycles on the node's backup storage."""

    proxmox: str = Field("main", description="which [proxmox.NAME] to use")
    guests: list[int | str] = Field(default_factory=list, description="vmids or guest names to back up")
    pools: list[str] = Field(default_factory=list, description="back up every guest in these pools")
    all: bool = Field(False, description="back up every guest (QEMU VMs and LXC containers) but those excluded")
    exclude: list[int | str] = Field(default_factory=list, description="vmids or names never backed up")
    include_templates: bool = False
    storage: str = Field("backup", description="the backup storage on the nodes (a directory or Proxmox Backup Server storage)")
    mode: Literal["snapshot", "suspend", "stop"] = Field("snapshot", description="vzdump mode: snapshot keeps the guest running")
    compress: Literal["zstd", "gzip", "lzo", "0"] = "zstd"
    keep: int = Field(2, ge=1, le=100, description="successful, verified archives kept per guest (the procedure: 2 weekly cycles)")
    notes_template: str = Field("{{guestname}} (luxima-backup)", description="vzdump notes: {{guestname}}, {{vmid}}, {{node}}, {{cluster}}")
    bwlimit_kib: int | None = Field(None, ge=1, description="vzdump bandwidth limit, KiB/s")
    snapshots: bool = Field(False, description="also take a Proxmox snapshot (fast rollback; lives on the VM's own disks, not a backup)")
    snapshot_keep: int = Field(2, ge=1, le=20)
    task_timeout_seconds: float = Field(4 * 3600, gt=0, description="one guest's vzdump task fails after this")
    timeout_seconds: float = Field(12 * 3600, gt=0, description="the whole vm-backup run ends TimedOut after this")

    @property
    def configured(self) -> bool:
        return bool(self.guests or self.pools or self.all)


class VmCheck(_Section):
    """What proves a restored guest is reachable: TCP ports and an HTTP health URL, from the worker."""

    tcp_ports: list[int] = Field(default_factory=list, description="ports that must accept a connection on the guest's address")
    http_url: str | None = Field(None, pattern=r"^https?://", description="a health URL; {address} is replaced by the guest's address")
    addresses: list[str] = Field(default_factory=list, description="addresses the guest must report (default: those in the manifest)")


class VmRestoreSettings(_Section):
    """Restores of Proxmox guests and the checks that follow them."""

    storage: str | None = Field(None, description="target storage for the restored disks (default: as in the archive)")
    start_timeout_seconds: float = Field(300, gt=0, description="from start until the guest reports running")
    agent_timeout_seconds: float = Field(600, gt=0, description="from start until the guest agent answers (it errors while the guest boots)")
    connect_timeout_seconds: float = Field(10, gt=0, description="per TCP or HTTP check")
    task_timeout_seconds: float = Field(4 * 3600, gt=0, description="the restore task fails after this")
    timeout_seconds: float = Field(4 * 3600, gt=0, description="the whole vm-restore run ends TimedOut after this")
    checks: dict[str, VmCheck] = Field(default_factory=dict, description="per guest name (or vmid): its connectivity checks")


class AlertChannel(_Section):
    """One chat or webhook destination, saved as a Prefect notification block."""

    kind: Literal["slack", "teams", "discord", "webhook"]
    name: str = Field(pattern=r"^[a-z0-9-]+$", description="name of the Prefect block (lowercase, digits, dashes)")
    url: Secret = Field(description="the webhook URL (Slack, Teams Workflows, Discord, or any HTTP endpoint)")
    headers: dict[str, str] = Field(default_factory=dict, description="kind = webhook: extra HTTP headers")


def _default_rpo() -> dict[str, timedelta]:
    # The RPO is 24 h; each window adds a margin over the schedule (daily, or weekly).
    return {"db": timedelta(hours=26), "files": timedelta(hours=26), "configs": timedelta(days=7, hours=2),
            "vm": timedelta(days=7, hours=2)}


class AlertSettings(_Section):
    """Chat alerts: failed runs, failed verifications, and backups missing for longer than their RPO window."""

    channels: list[AlertChannel] = Field(default_factory=list)
    rpo: dict[str, timedelta] = Field(
        default_factory=_default_rpo,
        description="per component: alert when no successful backup arrived within this window (ISO 8601, e.g. 'PT26H')",
    )
    automation_prefix: str = Field("luxima", pattern=r"^[a-z0-9-]+$", description="prefix of the automations' names")
    unresponsive_after: timedelta = Field(
        timedelta(seconds=120),
        description="a backup or restore run whose heartbeats (every 30 s, PREFECT_FLOWS_HEARTBEAT_FREQUENCY) stop "
        "for this long is marked Crashed, which alerts: its process or machine died without saying so",
    )

    @model_validator(mode="after")
    def _windows(self) -> "AlertSettings":
        if self.unresponsive_after < timedelta(seconds=45):
            raise ValueError("alerts.unresponsive_after must be at least 45 seconds: runs send a heartbeat every 30 s")
        short = [k for k, v in self.rpo.items() if v < timedelta(seconds=10)]
        if short:
            raise ValueError(f"alerts.rpo windows must be at least 10 seconds (Prefect's minimum): {short}")
        names = [c.name for c in self.channels]
        if len(set(names)) != len(names):
            raise ValueError("alerts.channels names must be unique")
        return self


class RetentionPolicy(_Section):
    """Which verified backups of a target are kept (besides its newest, always); Proxmox Backup Server's options."""

    keep_days: int | None = Field(None, ge=1, description="keep everything completed within this many days "
                                  "(default: the component's retention_days)")
    keep_last: int = Field(0, ge=0)
    keep_daily: int = Field(0, ge=0)
    keep_weekly: int = Field(0, ge=0)
    keep_monthly: int = Field(0, ge=0)


class RetentionSettings(_Section):
    """The prune: what is removed from storage, and the interlocks that keep the last good backups safe."""

    timezone: str = Field("Asia/Jakarta", description="days, weeks and months of the keep_* options are counted here")
    max_delete_percent: float = Field(50, gt=0, le=100, description="a run removing more of one target's backups "
                                      "than this is refused for that target unless forced")
    grace_hours: float = Field(24, gt=0, description="objects no manifest names, and uploads left open, older than this "
                               "are removed by the sweep (younger ones may belong to a running backup: keep it above "
                               "the longest backup's duration)")
    policies: dict[str, RetentionPolicy] = Field(
        default_factory=dict,
        description="by component (db, files, configs) or by target (db/main, files/userfiles, configs/app1)",
    )
    timeout_seconds: float = Field(2 * 3600, gt=0, description="the whole prune run ends TimedOut after this")

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (use an IANA name such as Asia/Jakarta)") from None
        return value


class VerifyStoredSettings(_Section):
    """The weekly re-verification: stored backups read back whole, a rotating share each run."""

    cycle: int = Field(4, ge=1, le=365, description="runs over which every kept backup is read once (weekly: 4 weeks)")
    timeout_seconds: float = Field(12 * 3600, gt=0, description="the whole verify-stored run ends TimedOut after this")


class ImageRegistry(_Section):
    """A registry whose images are copied with skopeo (an OCI archive each), e.g. the one Coolify pushes to."""

    address: str = Field(pattern=r"^[A-Za-z0-9.-]+(:[0-9]+)?$", description="host[:port] of the registry")
    repositories: list[str] = Field(min_length=1, description="what to copy: repository:tag (or @sha256:digest)")
    username: Secret | None = Field(None, description="reference to the user name (registries that require a login)")
    password: Secret | None = Field(None, description="reference to the password or token")
    tls_verify: bool = Field(True, description="verify the registry's certificate (false only for a plain-HTTP registry)")
    ca_cert: Path | None = Field(None, description="PEM file of the CA the registry's certificate chains to")

    @model_validator(mode="after")
    def _login_complete(self) -> "ImageRegistry":
        if (self.username is None) != (self.password is None):
            raise ValueError("an images registry needs both username and password, or neither")
        return self


class ImagesSettings(_Section):
    """Container images: the exact images the platform's containers run, stored once each by image ID."""

    hosts: list[str] = Field(default_factory=list, description="[hosts.NAME] running Docker, reached over SSH")
    command: str = Field("docker", description="how the engine is called on the hosts (e.g. 'sudo docker', "
                                               "'docker -H unix:///run/docker.sock', or 'podman')")
    compose_projects: list[str] = Field(default_factory=list, description="only containers of these compose projects")
    labels: list[str] = Field(default_factory=list, description="only containers with one of these labels "
                                                                "('coolify.managed=true', or a key alone)")
    names: list[str] = Field(default_factory=list, description="only containers whose name matches one of these globs")
    exclude: list[str] = Field(default_factory=list, description="leave out containers whose name or image reference "
                                                                 "matches one of these globs")
    registries: dict[str, ImageRegistry] = Field(default_factory=dict)
    compression: Literal["gzip", "zstd"] = "zstd"
    level: int | None = Field(None, ge=1, le=22)
    attempts: int = Field(3, ge=1, le=10, description="attempts of one image's save-to-storage stream on transient failures")
    retry_delay_seconds: list[float] = Field(default_factory=lambda: [30.0, 120.0])
    retention_days: int = Field(90, ge=1, description="images backups are kept this long (like the configs they go with)")
    timeout_seconds: float = Field(4 * 3600, gt=0, description="the whole images-backup run ends TimedOut after this")

    @property
    def effective_level(self) -> int:
        return self.level or (3 if self.compression == "zstd" else 6)


class DrTarget(_Section):
    """A copy of the backups at the DR site: a second bucket (or a directory), or a directory on a host over SSH."""

    kind: Literal["storage", "ssh"] = Field(description="storage: an S3 bucket or directory ([dr.targets.NAME.storage]); "
                                                        "ssh: a directory on an [hosts.NAME], written with rsync")
    storage: StorageSettings | None = Field(None, description="kind = storage: where (its own endpoint, bucket, credentials, "
                                                              "object lock)")
    host: str | None = Field(None, description="kind = ssh: the [hosts.NAME] of the DR node")
    path: str | None = Field(None, pattern=r"^/", description="kind = ssh: the directory on it that holds the copies")
    bandwidth_limit_kib: int = Field(0, ge=0, description="KiB/s for this target's transfers (0: unlimited)")

    @model_validator(mode="after")
    def _complete(self) -> "DrTarget":
        if self.kind == "storage" and self.storage is None:
            raise ValueError("a dr target of kind 'storage' needs [dr.targets.NAME.storage]")
        if self.kind == "ssh" and (self.host is None or self.path is None):
            raise ValueError("a dr target of kind 'ssh' needs host (an [hosts.NAME]) and path (an absolute directory)")
        return self


class DrVmSettings(_Section):
    """The VMs' vzdump archives copied from the primary node's backup storage to the DR node's, over SSH."""

    source_host: str = Field(description="the [hosts.NAME] of the primary node (reads its backup storage)")
    source_path: str = Field(pattern=r"^/", description="the primary backup storage's dump directory, e.g. /mnt/backup/dump")
    target_host: str = Field(description="the [hosts.NAME] of the DR node (proxmox-node2)")
    target_path: str = Field(pattern=r"^/", description="the dump directory of the DR node's storage of the same name "
                                                       "(vm_backup.storage), so the DR node lists the archives as its own")
    bandwidth_limit_kib: int = Field(0, ge=0, description="KiB/s for the archives' transfer (0: unlimited)")


class DrDrillSettings(_Section):
    """The DR drill (every 6 months): the DR copies restored at the DR site, checked, timed, then removed."""

    target: str | None = Field(None, description="the [dr.targets.NAME] restored from (default: the first by name)")
    database: str | None = Field(None, description="the [databases.NAME] server at the DR site that receives the scratch "
                                                   "databases (its connection; the database itself is not touched)")
    roles: Literal["from-backup", "existing", "skip"] = Field(
        "from-backup", description="the database roles on the DR server: from-backup: the backup's roles (pg_dumpall "
        "--globals-only) are applied first, as a real recovery must (missing ones created, existing ones given the "
        "backup's attributes); existing: they are there already; skip: restore without ownership and grants")
    scratch_dir: Path | None = Field(None, description="where files and configs are restored for the checks "
                                                       "(default: work_dir/dr-drill; emptied at the end)")
    components: list[Literal["db", "files", "configs", "vm"]] = Field(
        ["db", "files", "configs", "vm"], description="what is restored (those without backups configured are skipped)")
    proxmox: str | None = Field(None, description="the [proxmox.NAME] API that serves the DR node (default: vm_backup.proxmox)")
    node: str | None = Field(None, description="the DR node the guests are restored on (proxmox-node2)")
    rto_minutes: float = Field(120, gt=0, description="RTO target per component and for the whole drill")
    overdue_days: float = Field(197, gt=0, description="no successful drill for this long (6 months + 2 weeks): "
                                                       "`status` reports the drill overdue, and the status flow alerts")
    timeout_seconds: float = Field(6 * 3600, gt=0, description="the whole dr-drill run ends TimedOut after this")


class DrSettings(_Section):
    """Disaster recovery: the backups copied daily to the DR site, never deleted there by a deletion on the primary."""

    targets: dict[str, DrTarget] = Field(default_factory=dict)
    components: list[Literal["db", "files", "configs"]] = Field(["db", "files", "configs"],
                                                                 description="which backups are copied")
    vm: DrVmSettings | None = Field(None, description="the VMs' archives to the DR node (their manifests then go to "
                                                      "every DR target, beside the other backups')")
    rpo_hours: float = Field(24, gt=0, description="the DR lag (age of the newest verified backup at the DR site) alerted past this")
    timeout_seconds: float = Field(12 * 3600, gt=0, description="the whole dr-replicate run ends TimedOut after this")
    drill: DrDrillSettings | None = Field(None, description="the 6-monthly DR drill (flows/dr_drill.py)")


class LogSettings(_Section):
    """Where runs are recorded (``internal.backup_logs``)."""

    enabled: bool = True
    database: str | None = Field(None, description="[databases.NAME] holding the log; default: the database being backed up")
    apply_migrations: bool = Field(True, description="create/upgrade internal.backup_logs and the backup_admin role at start")


class Settings(BaseSettings):
    """Everything Luxima Backup needs to run; build with ``load_settings``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True, case_sensitive=False,
    )

    databases: dict[str, PostgresConnection] = Field(min_length=1)
    storage: StorageSettings
    keys: KeySettings
    db_backup: DbBackupSettings = Field(default_factory=DbBackupSettings)
    hosts: dict[str, SshHost] = Field(default_factory=dict, description="hosts reached over SSH (files sources, configs)")
    files_backup: FilesBackupSettings = Field(default_factory=FilesBackupSettings)
    configs: ConfigsSettings = Field(default_factory=ConfigsSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    restore: RestoreSettings = Field(default_factory=RestoreSettings)
    alerts: AlertSettings = Field(default_factory=AlertSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    verify_stored: VerifyStoredSettings = Field(default_factory=VerifyStoredSettings)
    proxmox: dict[str, ProxmoxEndpoint] = Field(default_factory=dict, description="Proxmox VE APIs (VM backups and restores)")
    vm_backup: VmBackupSettings = Field(default_factory=VmBackupSettings)
    vm_restore: VmRestoreSettings = Field(default_factory=VmRestoreSettings)
    dr: DrSettings = Field(default_factory=DrSettings)
    images: ImagesSettings = Field(default_factory=ImagesSettings)
    work_dir: Path = Field(
        Path("/var/lib/luxima-backup"),
        description="private scratch space: spools, the files mirror, restore staging (created 0700; one that is a "
        "symlink, belongs to another user or is group/world-writable is refused)",
    )

    @model_validator(mode="after")
    def _references_exist(self) -> "Settings":
        names = sorted(self.databases)
        if self.db_backup.database not in self.databases:
            raise ValueError(f"db_backup.database = {self.db_backup.database!r} is not one of [databases.*]: {names}")
        if self.log.database is not None and self.log.database not in self.databases:
            raise ValueError(f"log.database = {self.log.database!r} is not one of [databases.*]: {names}")
        if self.restore.target is not None and self.restore.target not in self.databases:
            raise ValueError(f"restore.target = {self.restore.target!r} is not one of [databases.*]: {names}")
        for name, src in self.files_backup.sources.items():
            if src.host is not None and src.host not in self.hosts:
                raise ValueError(f"files_backup.sources.{name}.host = {src.host!r} is not one of [hosts.*]: {sorted(self.hosts)}")
        if self.vm_backup.configured and self.vm_backup.proxmox not in self.proxmox:
            raise ValueError(f"vm_backup.proxmox = {self.vm_backup.proxmox!r} is not one of [proxmox.*]: {sorted(self.proxmox)}")
        for name, target in self.dr.targets.items():
            if target.host is not None and target.host not in self.hosts:
                raise ValueError(f"dr.targets.{name}.host = {target.host!r} is not one of [hosts.*]: {sorted(self.hosts)}")
            if target.storage is not None and target.storage.prefix != self.storage.prefix:
                raise ValueError(f"dr.targets.{name}.storage.prefix = {target.storage.prefix!r} must be storage.prefix "
                                 f"({self.storage.prefix!r}): the copies keep the keys their manifests name")
        drill = self.dr.drill
        if drill is not None:
            if drill.target is not None and drill.target not in self.dr.targets:
                raise ValueError(f"dr.drill.target = {drill.target!r} is not one of [dr.targets.*]: {sorted(self.dr.targets)}")
            if drill.database is not None and drill.database not in self.databases:
                raise ValueError(f"dr.drill.database = {drill.database!r} is not one of [databases.*]: {names}")
            if drill.proxmox is not None and drill.proxmox not in self.proxmox:
                raise ValueError(f"dr.drill.proxmox = {drill.proxmox!r} is not one of [proxmox.*]: {sorted(self.proxmox)}")
        if self.dr.vm is not None:
            for field in ("source_host", "target_host"):
                if getattr(self.dr.vm, field) not in self.hosts:
                    raise ValueError(f"dr.vm.{field} = {getattr(self.dr.vm, field)!r} is not one of [hosts.*]: {sorted(self.hosts)}")
        for name in self.images.hosts:
            if name not in self.hosts:
                raise ValueError(f"images.hosts names {name!r}, which has no [hosts.{name}]: {sorted(self.hosts)}")
        for name in self.configs.hosts:
            if name not in self.hosts:
                raise ValueError(f"configs.hosts.{name} has no [hosts.{name}] saying how to reach it: {sorted(self.hosts)}")
        return self

    def file_source(self, name: str) -> FileSource:
        try:
            return self.files_backup.sources[name]
        except KeyError:
            raise ConfigError(f"no file source named {name!r} in the settings",
                              hint=f"use one of {sorted(self.files_backup.sources)} ([files_backup.sources.NAME])") from None

    def config_host(self, name: str) -> ConfigHost:
        try:
            return self.configs.hosts[name]
        except KeyError:
            raise ConfigError(f"no config host named {name!r} in the settings",
                              hint=f"use one of {sorted(self.configs.hosts)} ([configs.hosts.NAME])") from None

    def proxmox_endpoint(self, name: str | None = None) -> ProxmoxEndpoint:
        name = name or self.vm_backup.proxmox
        try:
            return self.proxmox[name]
        except KeyError:
            raise ConfigError(f"no Proxmox API named {name!r} in the settings",
                              hint=f"add [proxmox.{name}] (address, nodes, token_id, token_secret) or use one of {sorted(self.proxmox)}") from None

    def retention_policy(self, component: str, target: str) -> RetentionPolicy:
        """The policy of one target: its own, its component's, or the component's retention_days."""
        days = {"db": self.db_backup.retention_days, "files": self.files_backup.retention_days,
                "configs": self.configs.retention_days, "images": self.images.retention_days}.get(component)
        policy = self.retention.policies.get(f"{component}/{target}") or self.retention.policies.get(component)
        if policy is None:
            return RetentionPolicy(keep_days=days)
        return policy if policy.keep_days is not None or any(
            (policy.keep_last, policy.keep_daily, policy.keep_weekly, policy.keep_monthly)) else policy.model_copy(
            update={"keep_days": days})

    @property
    def config_repo(self) -> Path:
        return self.configs.git.working_copy or self.work_dir / "config-repo"

    @property
    def mirror_dir(self) -> Path:
        return self.files_backup.mirror_dir or self.work_dir / "files-mirror"

    def database(self, name: str | None = None) -> PostgresConnection:
        name = name or self.db_backup.database
        try:
            return self.databases[name]
        except KeyError:
            raise ConfigError(f"no database named {name!r} in the settings", hint=f"use one of {sorted(self.databases)}") from None

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if _toml_path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=_toml_path))
        return tuple(sources)


# The TOML path is handed to the sources hook through this module-level slot, set under a lock,
# because pydantic-settings builds sources from the class, not the instance.
_toml_path: Path | None = None
_load_lock = threading.Lock()
_cache: dict[Path | None, Settings] = {}


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    value = explicit or os.environ.get(CONFIG_ENV)
    return Path(value).expanduser().resolve() if value else None


def load_settings(path: str | os.PathLike[str] | None = None, *, reload: bool = False) -> Settings:
    """The settings, loaded and validated once per file; ``ConfigError`` says what to fix."""
    global _toml_path
    resolved = config_path(path)
    with _load_lock:
        if not reload and resolved in _cache:
            return _cache[resolved]
        if resolved is not None and not resolved.is_file():
            raise ConfigError(f"settings file {resolved} does not exist", hint=f"pass --config PATH or set {CONFIG_ENV}")
        if resolved is None and not any(k.upper().startswith(ENV_PREFIX) for k in os.environ):
            raise ConfigError(
                "no settings file given",
                hint=f"pass --config PATH or set {CONFIG_ENV}; see config/luxima-backup.example.toml",
            )
        _toml_path = resolved
        try:
            settings = Settings()
        except ValidationError as exc:
            raise ConfigError(_describe(exc, resolved)) from None
        except (OSError, ValueError) as exc:  # unreadable file or TOML syntax error
            raise ConfigError(f"cannot read settings file {resolved}: {exc}") from None
        finally:
            _toml_path = None
        _cache[resolved] = settings
        return settings


def _describe(exc: ValidationError, path: Path | None) -> str:
    where = f" in {path}" if path else ""
    lines = [f"invalid settings{where}:"]
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)
