#!/usr/bin/env bash
# Make this checkout ready to run: mosquitto (from the system's packages when missing),
# a virtual environment in .venv, and the project with its dev extras installed into it.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages: mosquitto (the broker the demo and the tests start), mosquitto_passwd
# (password-file tests), espeak-ng (speech for the voice-activity tests), chromium and
# chromium-driver (the dashboard's browser tests; never a browser downloaded by a tool),
# fonts-dejavu-core and systemd (see below).
missing=""
{ command -v mosquitto || [ -x /usr/sbin/mosquitto ]; } >/dev/null 2>&1 || missing="$missing mosquitto"
command -v mosquitto_passwd >/dev/null 2>&1 || missing="$missing mosquitto-clients"
command -v espeak-ng >/dev/null 2>&1 || missing="$missing espeak-ng"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
{ command -v chromedriver || [ -x /usr/bin/chromedriver ]; } >/dev/null 2>&1 || missing="$missing chromium-driver"
# The OCR tests render text in DejaVu Sans; the unit-file tests run systemd-analyze verify.
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing="$missing fonts-dejavu-core"
command -v systemd-analyze >/dev/null 2>&1 || missing="$missing systemd"
if [ -n "$missing" ]; then
    echo "bootstrap: installing from the system's packages:$missing" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    if command -v apt-get >/dev/null 2>&1; then
        $SUDO apt-get update -qq
        # shellcheck disable=SC2086
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
    elif command -v dnf >/dev/null 2>&1; then
        # shellcheck disable=SC2086
        $SUDO dnf install -y $missing
    else
        echo "bootstrap: install$missing with your package manager, then run this again" >&2
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
    # rapidocr-onnxruntime ships PaddleOCR's det/rec/cls ONNX models (the ocr pipeline's and
    # its tests' reference); what it imports is in the dev extra, less opencv-python (the
    # headless build stands in for it), so it comes without its dependencies too.
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps 'rapidocr-onnxruntime>=1.4,<2'
    echo "$want" > "$stamp"
fi
