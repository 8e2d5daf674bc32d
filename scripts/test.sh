#!/usr/bin/env bash
# The whole check: lint, types, and the test suite (which starts its own brokers).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/pytest -q -p no:cacheprovider "$@"
