#!/usr/bin/env bash
# Refresh uv.lock to the newest releases that pyproject.toml allows, then run the whole
# suite against them (scripts/test.sh re-syncs .venv from the new lock first). Commit the
# lock only when the suite passes.
#
#   scripts/lock.sh                          # everything as new as allowed
#   scripts/lock.sh --upgrade-package numpy  # one package (instead of --upgrade)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -eq 0 ]; then set -- --upgrade; fi
scripts/uv.sh lock "$@"
git --no-pager diff --stat -- uv.lock || true
exec scripts/test.sh
