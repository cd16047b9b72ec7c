#!/usr/bin/env bash
# Installs the pipeline kept in ci/github/workflows into .github/workflows (GitHub only reads it there).
# Run from the repository root after changing a workflow, and commit both copies; the test suite checks
# that the installed copy matches.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .github/workflows
cp ci/github/workflows/*.yml .github/workflows/
echo "installed: $(ls ci/github/workflows/*.yml | xargs -n1 basename | tr '\n' ' ')into .github/workflows/"
