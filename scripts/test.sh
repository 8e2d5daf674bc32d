#!/usr/bin/env bash
# The whole check: lint, types, and the test suite (which starts its own brokers, and a
# throwaway PostgreSQL when none answers: scripts/with-postgres.sh). Arguments go to pytest,
# e.g. `scripts/test.sh -m unit` (see tests/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
.venv/bin/ruff check .
.venv/bin/mypy
scripts/with-postgres.sh .venv/bin/pytest -q -p no:cacheprovider "$@"
