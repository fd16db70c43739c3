"""Seal the data keys of backups made before the recovery key was configured, without re-encrypting anything.

An object's header is part of every chunk's authenticated data, so it cannot gain a seal afterwards; the
seals go into the backup's manifest instead (``recovery_seals``, by object key, each bound to its object),
which is signed again. The data keys are unwrapped with the key provider, so this runs while it is there.
"""

from __future__ import annotations

import json
from typing import Any

from luxima_backup import catalog, recovery
from luxima_backup.envelope import read_preamble
from luxima_backup.keys import KeyProvider
from tasks.verify.stored import objects_of


def rewrap_backup(cat: catalog.Catalog, provider: KeyProvider, backup: catalog.Backup,
                  public_text: str, key_id: str, confirm: bool) -> dict[str, Any]:
    """Seal every object of one backup that is not yet sealed to ``key_id``, and sign its manifest with the recovery
    catalog key; the manifest rewritten when ``confirm``."""
    m = backup.manifest
    with cat.store.load(backup.manifest_key) as body:
        recovery_signed = catalog.MAC_FIELDS[1] in json.loads(body.read())
    if m.recovery_key_id == key_id and recovery_signed:
        return {"backup": backup.backup_id, "action": "sealed already", "objects": 0}
    seals = dict(m.recovery_seals)
    for obj in objects_of(backup):
        if m.recovery_key_id == key_id:  # sealed in its headers when written; only the recovery MAC is missing
            break
        with cat.store.load(obj["key"]) as body:
            header, _ = read_preamble(body)  # the header only: the object is not read
        if (header.info.get("recovery") or {}).get("key_id") == key_id or (seals.get(obj["key"]) or {}).get("key_id") == key_id:
            continue
        seals[obj["key"]] = recovery.seal_for(public_text, provider.unwrap(header.key), obj["key"])
    if confirm:
        cat.save(backup.manifest_key, m.model_copy(update={"recovery_key_id": key_id, "recovery_seals": seals}))
    return {"backup": backup.backup_id, "action": "sealed" if confirm else "would seal",
            "objects": len(seals) - len(m.recovery_seals)}
