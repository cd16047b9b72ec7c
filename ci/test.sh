#!/usr/bin/env bash
# The whole test suite, from nothing: sets up .venv from the project's own files (ci/bootstrap.sh), lints (ruff),
# type-checks (mypy --strict), then runs every test. The tests start their own PostgreSQL clusters (one per region)
# and services, on the machine's PostgreSQL when it has one. Then, once, the end-to-end tests (tests/e2e: the
# stack as `txroute up` starts it, the router and the regions) again on the PostgreSQL binaries of the `pgserver`
# wheel (TXROUTE_PG_BIN), the path a machine without PostgreSQL takes. Arguments go to the first pytest run, and
# skip the second: `bash ci/test.sh tests/unit` runs only those.
# Exit code is pytest's: 5 (no tests collected) is a failure like any other.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/bootstrap.sh
.venv/bin/ruff check app tests infra benchmarks ci
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
if [ "$#" -eq 0 ]; then
  embedded_pg_bin=$(.venv/bin/python -c 'import importlib.util, pathlib
spec = importlib.util.find_spec("pgserver")
print(pathlib.Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin")')
  echo "== the end-to-end tests again, on the embedded PostgreSQL: $embedded_pg_bin"
  TXROUTE_PG_BIN="$embedded_pg_bin" .venv/bin/python -m pytest tests/e2e
fi
