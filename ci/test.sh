#!/usr/bin/env bash
# The whole test suite, from nothing: sets up .venv from the project's own files (ci/bootstrap.sh), lints (ruff),
# type-checks (mypy --strict), then runs every test. The tests start their own PostgreSQL clusters (one per region) and services.
# Exit code is pytest's: 5 (no tests collected) is a failure like any other.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/bootstrap.sh
.venv/bin/ruff check app tests infra benchmarks ci
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
