"""The config git repository: a private working copy, one folder per host, committed and pushed without force.

The working copy belongs to the backup: uncommitted changes in it are leftovers of an interrupted
run and are discarded at the start of the next one (the host folders are rewritten every run).
Commits that were made but not pushed (the remote was down) are kept and pushed by the next run.

Someone else's commits on the remote are never overwritten: before committing and whenever a
push is rejected, our unpushed commits are rebased on the remote branch. When that rebase
conflicts (someone edited the same files), it is aborted and the run fails saying so; nothing is
ever force-pushed.

git runs with no system or user configuration, never prompts, and reaches an SSH remote with
only the configured key and known_hosts file (unknown or changed server keys are refused).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from . import procs
from .errors import ConfigError, GitError
from .secrets import redact
from .settings import ConfigGit
from .ssh import ssh_options

# stderr of a push or fetch that failed on the way to the server, not because of what was sent
_NETWORK = ("Could not resolve hostname", "Connection refused", "Connection timed out", "Connection reset",
            "Network is unreachable", "No route to host", "Connection closed by", "unable to access",
            "Could not read from remote repository", "early EOF", "the remote end hung up")
_HOST_KEY = ("Host key verification failed", "REMOTE HOST IDENTIFICATION HAS CHANGED", "No ED25519 host key",
             "No RSA host key", "No ECDSA host key", "host key for")


@dataclass
class Change:
    """One file of a host folder that a commit adds (A), modifies (M), deletes (D) or changes the type of (T)."""

    status: str
    path: str  # absolute path on the host


@dataclass
class HostChanges:
    host: str
    changes: list[Change] = field(default_factory=list)
    metadata_changed: list[str] = field(default_factory=list)  # mode or owner changed, content did not

    def of(self, status: str) -> list[str]:
        return [c.path for c in self.changes if c.status == status]

    @property
    def empty(self) -> bool:
        return not self.changes and not self.metadata_changed


class Repo:
    """``git`` on one working copy; ``key_file`` is the SSH key for the remote (in a 0600 file) or None."""

    def __init__(self, path: Path, cfg: ConfigGit, key_file: str | None = None):
        self.path, self.cfg = path, cfg
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(path), "LC_ALL": "C",
            "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_TERMINAL_PROMPT": "0",
            "GIT_AUTHOR_NAME": cfg.author_name, "GIT_AUTHOR_EMAIL": cfg.author_email,
            "GIT_COMMITTER_NAME": cfg.author_name, "GIT_COMMITTER_EMAIL": cfg.author_email,
        }
        if cfg.over_ssh:
            assert cfg.known_hosts is not None  # checked by the settings
            self.env["GIT_SSH_COMMAND"] = shlex.join(ssh_options(key_file, cfg.known_hosts, cfg.connect_timeout))

    # -- plumbing --

    def git(self, *args: str, check: bool = True, what: str | None = None, stdin: str | bytes | None = None,
            text: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[Any]:
        """Run git in the working copy; with ``check``, a non-zero exit is a ``GitError`` (``text=False``: bytes out)."""
        try:
            proc = procs.run(["git", "-C", str(self.path), *args], env=self.env, input=stdin,  # type: ignore[arg-type]
                             text=text, errors="surrogateescape" if text else None, timeout=timeout)
        except FileNotFoundError:
            raise ConfigError("git is not installed", hint="apt-get install git") from None
        except subprocess.TimeoutExpired:
            raise GitError(f"git {args[0]} did not finish within {timeout:g} s", transient=True) from None
        if check and proc.returncode != 0:
            raise self._error(proc, what or f"git {args[0]}")
        return proc

    def _error(self, proc: subprocess.CompletedProcess[str], what: str) -> GitError:
        err = redact((proc.stderr or proc.stdout or "").strip())[-1500:]
        if any(s in err for s in _HOST_KEY):
            return GitError(f"{what} failed: the git server's host key is unknown or CHANGED: {err}",
                            hint=f"verify the server's key out of band and put it in {self.cfg.known_hosts}")
        if "Permission denied" in err:
            return GitError(f"{what} failed: the git server refused the key: {err}",
                            hint="add the public key of configs.git.key as a deploy key with write access")
        return GitError(f"{what} failed (exit {proc.returncode}): {err}", transient=any(s in err for s in _NETWORK))

    @property
    def remote_ref(self) -> str:
        return f"refs/remotes/origin/{self.cfg.branch}"

    def _has(self, ref: str) -> bool:
        return self.git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False).returncode == 0

    def head(self) -> str | None:
        proc = self.git("rev-parse", "--verify", "--quiet", "HEAD^{commit}", check=False)
        return proc.stdout.strip() or None

    # -- the working copy --

    def prepare(self) -> None:
        """Make the working copy exist on the configured branch and remote, with no leftovers of an interrupted run."""
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not (self.path / ".git").is_dir():
            self.git("init", "--quiet", f"--initial-branch={self.cfg.branch}")
        git_dir = self.path / ".git"
        if (git_dir / "rebase-merge").exists() or (git_dir / "rebase-apply").exists():
            self.git("rebase", "--abort", check=False)
        self.git("config", "core.quotePath", "false")
        self.git("config", "commit.gpgSign", "false")
        remotes = self.git("remote").stdout.split()
        if self.cfg.remote:
            self.git("remote", "set-url" if "origin" in remotes else "add", "origin", self.cfg.remote)
        elif "origin" in remotes:
            self.git("remote", "remove", "origin")
        current = self.git("symbolic-ref", "--short", "HEAD", check=False).stdout.strip()
        if current != self.cfg.branch:
            self.git("checkout", "--quiet", "-B", self.cfg.branch) if self.head() else \
                self.git("symbolic-ref", "HEAD", f"refs/heads/{self.cfg.branch}")
        if self.head():
            self.git("reset", "--quiet", "--hard", "HEAD")
        self.git("clean", "--quiet", "-fdx")

    def fetch(self) -> bool:
        """Bring the remote branch; False when the remote has no such branch yet (a new repository)."""
        if not self.cfg.remote:
            return False
        ls = self.git("ls-remote", "--heads", "origin", self.cfg.branch, what="reaching the config git remote")
        if not ls.stdout.strip():
            return False
        self.git("fetch", "--quiet", "origin", f"+refs/heads/{self.cfg.branch}:{self.remote_ref}",
                 what="fetching the config git remote")
        return True

    def catch_up(self) -> None:
        """Put our unpushed commits (if any) on top of the remote branch; fail clearly on a conflict."""
        if not self.fetch():
            return
        if self.head() is None:
            self.git("reset", "--quiet", "--hard", self.remote_ref)
            return
        self.rebase()

    def rebase(self) -> None:
        proc = self.git("rebase", "--quiet", self.remote_ref, check=False)
        if proc.returncode == 0:
            return
        conflicts = self.git("diff", "--name-only", "--diff-filter=U", check=False).stdout.split()
        self.git("rebase", "--abort", check=False)
        raise GitError(
            f"someone else's commits on {self.cfg.remote} ({self.cfg.branch}) change the same files as this machine's "
            f"unpushed commit(s): {', '.join(conflicts[:10]) or redact(proc.stderr.strip()[-500:])}; nothing was pushed "
            "and nothing was forced",
            hint=f"resolve it by hand in {self.path}: git rebase origin/{self.cfg.branch}, fix the files, git push; "
                 "the next backup then goes on from there",
        )

    def replace_folder(self, host: str, staged: Path) -> None:
        """Make ``<repo>/<host>`` exactly the staged tree (files no longer fetched disappear from it)."""
        target = self.path / host
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.exists():
            shutil.rmtree(target)
        shutil.move(str(staged), str(target))

    def staged_changes(self, host: str, meta_name: str) -> HostChanges:
        """``git add`` the host folder and say what changed in it since the last commit."""
        self.git("add", "--all", "--force", "--", host)  # a .gitignore fetched from the host must not hide its files
        base = "HEAD" if self.head() else self._empty_tree()  # the first commit: everything is added
        fields = self.git("diff", "--cached", "--name-status", "-z", "--no-renames", base, "--", host).stdout.split("\0")
        out = HostChanges(host)
        for status, rel in zip(fields[0::2], fields[1::2]):
            name = rel[len(host) + 1:]
            if name == meta_name:
                continue
            out.changes.append(Change(status[0], "/" + name))
        return out

    def staged_files(self, folder: str) -> Iterator[tuple[str, bytes]]:
        """Each file staged under ``folder``: its path in the repository and the bytes the next commit will hold.

        Read from the index, not the working tree: attributes of a fetched ``.gitattributes``
        (``text``, ``ident``) may change bytes on ``git add``, and what is checked must be what
        is committed. Symlinks (a target path, not content) and submodules are left out.
        """
        listing = self.git("ls-files", "--stage", "-z", "--", folder).stdout
        entries = []
        for record in filter(None, listing.split("\0")):
            info, path = record.split("\t", 1)
            mode, sha, _ = info.split()
            if mode in ("100644", "100755"):
                entries.append((path, sha))
        if not entries:
            return
        out = self.git("cat-file", "--batch", text=False, stdin="".join(f"{sha}\n" for _, sha in entries).encode(),
                       timeout=300).stdout
        pos = 0
        for path, _ in entries:
            header_end = out.index(b"\n", pos)
            size = int(out[pos:header_end].split()[2])
            yield path, out[header_end + 1:header_end + 1 + size]
            pos = header_end + 1 + size + 1  # the blob, then a newline

    def restore_folder(self, host: str) -> None:
        """Put ``<repo>/<host>``, in the index and on disk, back as the last commit has it (or remove it)."""
        head = self.head()
        if head:
            self.git("reset", "--quiet", "HEAD", "--", host)
        else:
            self.git("rm", "-r", "--cached", "--quiet", "--ignore-unmatch", "--", host)
        target = self.path / host
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.exists():
            shutil.rmtree(target)
        if head and self.git("cat-file", "-e", f"HEAD:{host}", check=False).returncode == 0:
            self.git("checkout", "--quiet", "HEAD", "--", host)

    def _empty_tree(self) -> str:
        return self.git("hash-object", "-t", "tree", os.devnull).stdout.strip()

    def show(self, rev: str, path: str) -> bytes | None:
        """A file's content at ``rev``, or None when it is not there."""
        proc = self.git("show", f"{rev}:{path}", check=False, text=False, timeout=120)
        return proc.stdout if proc.returncode == 0 else None

    def commit(self, message: str) -> str:
        self.git("commit", "--quiet", "--no-verify", "-F", "-", stdin=message, timeout=120)
        head = self.head()
        assert head is not None
        return head

    def unpushed(self) -> int:
        """Commits on our branch that the remote branch does not have (all of them when it has none)."""
        if not self.head():
            return 0
        ref = self.remote_ref if self._has(self.remote_ref) else None
        rng = f"{ref}..HEAD" if ref else "HEAD"
        return int(self.git("rev-list", "--count", rng).stdout.strip() or 0)

    def push(self) -> dict[str, int | bool]:
        """Push our branch, rebasing on the remote after each rejection; never forced."""
        if not self.cfg.remote:
            return {"pushed": False, "attempts": 0, "rebased": 0}
        rebased = 0
        for attempt in range(1, self.cfg.push_attempts + 1):
            proc = self.git("push", "--porcelain", "origin", f"HEAD:refs/heads/{self.cfg.branch}", check=False)
            if proc.returncode == 0:
                self.git("update-ref", self.remote_ref, "HEAD")
                return {"pushed": True, "attempts": attempt, "rebased": rebased}
            text = proc.stdout + proc.stderr
            if "[rejected]" not in text and "[remote rejected]" not in text:
                raise self._error(proc, "git push")
            if "[remote rejected]" in text:  # a hook or a protected branch said no: rebasing does not help
                raise GitError(f"the config git remote refused the push: {redact(text.strip()[-800:])}",
                               hint=f"allow the backup's deploy key to push to {self.cfg.branch} (no force is ever needed)")
            self.fetch()
            self.rebase()  # raises on a conflict
            rebased += 1
        raise GitError(f"the push to {self.cfg.remote} was rejected {self.cfg.push_attempts} times: others keep pushing",
                       transient=True, hint="the commit stays in the working copy and the next run pushes it")
