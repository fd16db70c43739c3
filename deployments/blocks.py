"""Prefect blocks from the settings: the S3 bucket with its credentials, and Secret blocks.

Saved with ``overwrite=True``: running registration again updates the same block documents
(their ids stay the same), never duplicates them. Once the bucket block exists, workers can
use ``storage.s3_bucket_block`` instead of carrying the S3 credentials in their settings.
"""

from __future__ import annotations

from typing import Any

from luxima_backup.errors import ConfigError
from luxima_backup.settings import Settings
from luxima_backup.storage import make_bucket

DEFAULT_BUCKET_BLOCK = "luxima-backups"


def register_storage(settings: Settings, name: str | None = None) -> dict[str, Any]:
    """Save the AwsCredentials and S3Bucket blocks the storage settings describe."""
    cfg = settings.storage
    if cfg.kind != "s3":
        return {}
    if cfg.s3_bucket_block:
        return {"s3_bucket": cfg.s3_bucket_block, "status": "already a block; nothing to register"}
    block_name = name or DEFAULT_BUCKET_BLOCK
    bucket = make_bucket(cfg)
    creds_id = bucket.credentials.save(f"{block_name}-credentials", overwrite=True)
    bucket_id = bucket.save(block_name, overwrite=True)
    return {"s3_bucket": block_name, "s3_bucket_id": str(bucket_id), "aws_credentials_id": str(creds_id)}


def register_secret(name: str, reference: str) -> str:
    """Save the value behind a secret reference (env:, file:, vault:) as a Prefect Secret block.

    Workers can then refer to it as ``prefect-secret:<name>`` without the value in their
    environment. The value is read here, on the operator's machine, and never printed.
    """
    from prefect.blocks.system import Secret

    from luxima_backup.secrets import SecretRef

    ref = SecretRef.parse(reference)
    if ref.scheme == "prefect-secret":
        raise ConfigError(f"{reference} is already a Prefect Secret block")
    Secret(value=ref.resolve()).save(name, overwrite=True)
    return f"prefect-secret:{name}"
