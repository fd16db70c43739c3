#!/usr/bin/env bash
# Set up a fresh machine for Luxima Backup: Debian packages it runs, then .venv from the lock file.
# Idempotent and quick when nothing changed. Needs root (or sudo) only to install missing packages.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
ls /usr/lib/postgresql/*/bin/pg_dump >/dev/null 2>&1 || missing+=(postgresql-client)
command -v zstd >/dev/null || missing+=(zstd)
command -v openssl >/dev/null || missing+=(openssl)
command -v runuser >/dev/null || missing+=(util-linux)
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)   # the tests' SSH server (files and configs backups)
command -v ssh-keygen >/dev/null || missing+=(openssh-client)
command -v rsync >/dev/null || missing+=(rsync)
command -v git >/dev/null || missing+=(git)
[ -x /usr/lib/chromium/chromium ] || missing+=(chromium)   # the browser tests of the Prefect UI (Playwright drives it)
[ -x /usr/sbin/dockerd ] || missing+=(docker.io)        # the tests' Docker host (images backups and restores)
command -v skopeo >/dev/null || missing+=(skopeo)          # registry images (an OCI archive each)
[ -x /usr/bin/docker-registry ] || missing+=(docker-registry)   # the tests' registry
command -v iptables >/dev/null || missing+=(iptables)    # the tests' vanished hosts (packets dropped, not refused)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "bootstrap: installing Debian packages: ${missing[*]}" >&2
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY="${PYTHON:-python3}"
want="$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.installed 2>/dev/null)" != "$want" ]; then
    echo "bootstrap: installing Python dependencies into .venv from requirements.lock" >&2
    "$PY" -m venv .venv
    # (this machine's pip config names local index folders that may be absent: hush those warnings)
    .venv/bin/pip install -q --disable-pip-version-check -r requirements.lock 2> >(grep -v "is ignored: it is neither" >&2)
    .venv/bin/pip install -q --disable-pip-version-check --no-deps -e . 2> >(grep -v "is ignored: it is neither" >&2)
    echo "$want" > .venv/.installed
fi
