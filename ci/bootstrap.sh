#!/usr/bin/env bash
# Sets up the project from its own files on a fresh Debian/Ubuntu machine with Python >= 3.11:
# creates .venv at the repo root and installs the project with its dev extras and the `embedded-pg` extra,
# whose wheel ships PostgreSQL server binaries: a machine without PostgreSQL (>= 14) uses them, and the test
# command (ci/test.sh) runs the end-to-end tests on them as well, so that path stays tested where the
# machine has its own PostgreSQL. Safe to re-run: it skips the install when pyproject.toml has not changed
# since the last successful one.
set -euo pipefail
cd "$(dirname "$0")/.."

python_bin="${PYTHON:-python3}"
if ! "$python_bin" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
  echo "txroute needs Python >= 3.11 (tried '$python_bin'); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  if ! "$python_bin" -m venv .venv 2>/dev/null; then
    # Debian and Ubuntu ship venv separately (python3-venv); install it when we are allowed to.
    rm -rf .venv
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      ver=$("$python_bin" -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')
      apt-get update -qq && (apt-get install -y -qq "python${ver}-venv" || apt-get install -y -qq python3-venv)
      "$python_bin" -m venv .venv
    else
      echo "cannot create .venv: install python3-venv (sudo apt-get install python3-venv) and re-run" >&2
      exit 1
    fi
  fi
fi

extras="dev,embedded-pg"

stamp=".venv/.txroute-installed"
want="$(sha256sum pyproject.toml | cut -c1-16)-$extras"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[$extras]"
  echo "$want" > "$stamp"
fi
