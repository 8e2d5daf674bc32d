#!/usr/bin/env bash
# Make this checkout ready to run: mosquitto (from the system's packages when missing),
# a virtual environment in .venv, and the project with its dev extras installed into it.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    echo "bootstrap: installing mosquitto from the system's packages" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    if command -v apt-get >/dev/null 2>&1; then
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
    elif command -v dnf >/dev/null 2>&1; then
        $SUDO dnf install -y mosquitto
    else
        echo "bootstrap: install mosquitto with your package manager, then run this again" >&2
        exit 1
    fi
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "bootstrap: creating .venv" >&2
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.edgeinfer-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "bootstrap: installing Python packages into .venv" >&2
    .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
    # silero-vad ships the VAD model inside its wheel; its dependencies (torch) are not needed
    # to read that file, so the wheel comes without them.
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps 'silero-vad>=5'
    echo "$want" > "$stamp"
fi
