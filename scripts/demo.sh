#!/usr/bin/env bash
# End to end on this machine: broker, agent, a trained model deployed through edge-fleet, jobs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python -m scripts.demo "$@"
