"""Break-glass helpers: get plaintext back when everything else is down (no database, no Prefect).

``decrypt_object`` streams one stored object (or a local copy of it) through decryption, and
optionally decompression, into a file or stdout. A file is written under a temporary name and
renamed only once the last chunk has authenticated, so a cut-short or tampered object never
leaves a complete-looking file behind.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from .compression import DecompressingReader
from .envelope import DecryptingReader
from .errors import BackupError, ConfigError, IntegrityError, StorageError
from .keys import KeyFileProvider, KeyProvider

READ_SIZE = 1 << 20


_MAGIC = {b"\x28\xb5\x2f\xfd": "zstd", b"\x1f\x8b": "gzip"}


class _Prefixed:
    """A reader that gives back ``head`` first, then the rest of ``src``."""

    def __init__(self, head: bytes, src: Any):
        self._head, self._src = head, src

    def read(self, n: int = -1) -> bytes:
        if self._head:
            out, self._head = (self._head, b"") if n < 0 or n >= len(self._head) else (self._head[:n], self._head[n:])
            return out
        return self._src.read(n)


def _decompressing(reader: Any, name: str) -> Any:
    """Decompress by the stream's own magic bytes (names of local copies may say nothing)."""
    head = reader.read(4)
    for magic, codec in _MAGIC.items():
        if head.startswith(magic):
            return DecompressingReader(_Prefixed(head, reader), codec)
    raise ConfigError(f"{name} does not hold zstd or gzip data once decrypted", hint="decrypt without --decompress")


def _provider(key_files: list[Path]) -> KeyProvider:
    if key_files:
        return KeyFileProvider(key_files[0], key_files[1:])
    from . import runtime

    return runtime.key_provider()


@contextlib.contextmanager
def _source(object_key: str | None, input_file: Path | None) -> Iterator[BinaryIO]:
    if input_file is not None:
        try:
            with open(input_file, "rb") as f:
                yield f
        except FileNotFoundError:
            raise ConfigError(f"{input_file} does not exist") from None
        return
    assert object_key is not None
    with _store_of(object_key).load(object_key) as body:
        yield body


@contextlib.contextmanager
def _sink(output: str) -> Iterator[BinaryIO]:
    if output == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    final = Path(output)
    if final.exists():
        raise ConfigError(f"{final} already exists; refusing to overwrite it", hint="choose a new output file")
    partial = final.with_name(final.name + ".partial")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise StorageError(f"cannot create {partial}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, final)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def decrypt_object(object_key: str | None, input_file: Path | None, output: str, decompress: bool,
                   key_files: list[Path], recovery_key: Path | None = None, manifest_file: Path | None = None) -> int:
    """Decrypt (and optionally decompress) one object into ``output``; returns the bytes written. ``recovery_key``: with
    the offline recovery private key alone (Vault gone): the data key sealed in the object's header, or in its
    manifest (``manifest_file``, or the one beside a stored object) for backups sealed by ``keys rewrap``."""
    name = object_key or str(input_file)
    if recovery_key is not None:
        from .recovery import RecoveryUnwrap, load_private

        seals = _manifest_of(object_key, manifest_file).get("recovery_seals") or {}
        if object_key is None and input_file is not None:  # a local copy: the seal of the object it is named after
            named = [k for k in seals if k.rsplit("/", 1)[-1] == input_file.name]
            object_key = named[0] if named else (next(iter(seals)) if len(seals) == 1 else None)
        unwrap: Any = RecoveryUnwrap(load_private(recovery_key), seals, object_key)
    else:
        unwrap = _provider(key_files).unwrap
    written = 0
    with _source(object_key, input_file) as src, _sink(output) as out:
        reader: Any = DecryptingReader(src, unwrap)
        placed = reader.header.info.get("object")
        if object_key is not None and placed is not None and placed != object_key:
            # its authenticated header names the key it was written under: a moved or planted object
            raise IntegrityError(f"{object_key} was written as {placed}: it was moved or copied here, not backed up here",
                                 hint=f"decrypt {placed} itself, or pass the file with --input to read it anyway")
        if decompress:
            reader = _decompressing(reader, name)
        while True:
            block = reader.read(READ_SIZE)
            if not block:
                break
            out.write(block)
            written += len(block)
    return written


def _manifest_of(object_key: str | None, manifest_file: Path | None) -> dict[str, Any]:
    """The raw manifest of an object, for its recovery seals only (with Vault gone its MAC cannot be checked; a seal
    opens only with the recovery key and only for the object it names, and every chunk still authenticates)."""
    import json

    from .manifest import manifest_key_for

    try:
        if manifest_file is not None:
            doc = json.loads(Path(manifest_file).read_text())
        elif object_key is not None:
            with _store_of(object_key).load(manifest_key_for(object_key)) as f:
                doc = json.loads(f.read())
        else:
            return {}
    except (OSError, ValueError, BackupError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _store_of(object_key: str) -> Any:
    """Config archives may live in their own storage ([configs.storage]); everything else in [storage]."""
    from . import runtime  # imported when used: the break-glass path with --key-file needs no settings

    settings = runtime.settings()
    if settings.configs.storage is not None and object_key.startswith(f"{runtime.config_prefix(settings)}/configs/"):
        return runtime.config_store(settings)
    return runtime.store(settings)
