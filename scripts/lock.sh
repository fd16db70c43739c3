#!/usr/bin/env bash
# Re-resolve the dependencies in a scratch venv and rewrite requirements.lock from it.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q --disable-pip-version-check -e ".[test]"
{ head -2 requirements.lock; "$tmp/venv/bin/pip" freeze --exclude-editable | grep -v '^luxima'; } > requirements.lock.new
mv requirements.lock.new requirements.lock
