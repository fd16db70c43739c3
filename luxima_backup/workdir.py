"""Private folders on the backup machine: the work dir, the files mirror, the config working copy.

They hold plaintext (the user-files mirror, restore staging, SSH key files for the length of a
command), so each must belong to this user alone. A missing one is created 0700; an existing one
that is a symlink, belongs to someone else, or that others may write into is refused: another
local user could swap its contents or read what lands there.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from .errors import ConfigError


def ensure_private(path: Path, what: str = "work_dir") -> Path:
    """``path`` as a folder only this user can use: created 0700, or checked when it exists."""
    try:
        path.mkdir(parents=True, mode=0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(f"{what} {path} is a symbolic link",
                          hint=f"point {what} at the real folder (a link can be re-pointed by whoever owns its parent)")
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{what} {path} exists and is not a folder", hint=f"set {what} to a folder")
    if st.st_uid != os.geteuid():
        raise ConfigError(f"{what} {path} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()})",
                          hint="use a folder of this user's, e.g. create it with mode 0700, or chown it")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"{what} {path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})",
                          hint=f"chmod 700 {path}")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)  # ours, only readable by others: tighten rather than refuse
    return path


def private_dir(work_dir: Path, prefix: str) -> Path:
    """A new folder only this user can read, under the (checked) work dir, for spools and staging."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=ensure_private(work_dir)))
