#!/usr/bin/env bash
# Make this checkout ready to run: mosquitto (from the system's packages when missing),
# a virtual environment in .venv with the project, its extras and the dev group, all at the
# versions in uv.lock;
# and, where torch's CPU wheel lies on disk, the test-only .venv-ref (see below).
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages: mosquitto (the broker the demo and the tests start), mosquitto_passwd
# (password-file tests), espeak-ng (speech for the voice-activity tests), chromium and
# chromium-driver (the dashboard's browser tests; never a browser downloaded by a tool),
# fonts-dejavu-core and systemd (see below), postgresql (scripts/with-postgres.sh starts a
# throwaway server from its programs for the registry tests when none answers).
missing=""
{ command -v mosquitto || [ -x /usr/sbin/mosquitto ]; } >/dev/null 2>&1 || missing="$missing mosquitto"
command -v mosquitto_passwd >/dev/null 2>&1 || missing="$missing mosquitto-clients"
command -v espeak-ng >/dev/null 2>&1 || missing="$missing espeak-ng"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
{ command -v chromedriver || [ -x /usr/bin/chromedriver ]; } >/dev/null 2>&1 || missing="$missing chromium-driver"
# The OCR tests render text in DejaVu Sans; the unit-file tests run systemd-analyze verify.
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing="$missing fonts-dejavu-core"
command -v systemd-analyze >/dev/null 2>&1 || missing="$missing systemd"
{ command -v initdb || ls /usr/lib/postgresql/*/bin/initdb; } >/dev/null 2>&1 \
    || missing="$missing postgresql"
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
# Every Python package comes from uv.lock at the version and hashes it records (pyproject.toml
# says what is allowed, the lock what is installed): scripts/uv.sh runs the uv release the
# lock is made with. --locked refuses a lock that no longer matches pyproject.toml instead of
# quietly resolving anew; `scripts/lock.sh` refreshes it. uv never downloads a Python here.
# The dev group comes with the sync (silero-vad and rapidocr-onnxruntime without their torch
# and opencv-python, as the lock's overrides say: only their model files are used).
export UV_PYTHON_DOWNLOADS=never
interpreter="$("$PYTHON" -c 'import sys; print(sys.executable)')"
scripts/uv.sh sync --locked --quiet --python "$interpreter" \
    --extra agent --extra media --extra ocr --extra fleet --extra postgres

# .venv-ref: a test-only environment for tests/test_vad_reference.py, which checks the
# voice-activity pipeline against silero-vad's own get_speech_timestamps. That needs torch,
# which the agent never does, so it stays out of .venv. torch is installed from its CPU
# wheel on this disk, by file name: never from an index, where a plain or loose `torch`
# resolves to a CUDA build of several GB. Without that wheel, no .venv-ref and the test
# skips. numpy, onnxruntime, soundfile and silero-vad (without its dependencies, so without
# torchaudio) are pinned to the releases in .venv: the same model file, the same runtime.
torch_wheel="${EDGEINFER_TORCH_WHEEL:-}"
if [ -z "$torch_wheel" ]; then
    pytag="$("$PYTHON" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')"
    for f in /opt/wheels/torch-2.13.0+cpu-"$pytag"-"$pytag"-manylinux*_"$(uname -m)".whl; do
        [ -f "$f" ] && torch_wheel="$f"
    done
fi
if [ -z "$torch_wheel" ] || [ ! -f "$torch_wheel" ]; then
    echo "bootstrap: no torch 2.13.0 CPU wheel for this Python and machine in /opt/wheels" \
        "(or \$EDGEINFER_TORCH_WHEEL): skipping .venv-ref; tests/test_vad_reference.py will skip" >&2
else
    ref_pins="$(.venv/bin/python -c 'from importlib.metadata import version as v
print(" ".join(n + "==" + v(n) for n in ("numpy", "onnxruntime", "soundfile", "silero-vad")))')"
    ref_stamp=.venv-ref/.edgeinfer-ref-installed
    ref_want="$(basename "$torch_wheel") $ref_pins"
    if [ ! -f "$ref_stamp" ] || [ "$(cat "$ref_stamp")" != "$ref_want" ]; then
        echo "bootstrap: installing the VAD reference (torch CPU, silero-vad) into .venv-ref" >&2
        [ -x .venv-ref/bin/python ] || "$PYTHON" -m venv .venv-ref
        # shellcheck disable=SC2086
        .venv-ref/bin/python -m pip install -q --disable-pip-version-check \
            "$torch_wheel" ${ref_pins% silero-vad==*}
        .venv-ref/bin/python -m pip install -q --disable-pip-version-check --no-deps "${ref_pins##* }"
        # Only the wheel's torch, and no CUDA libraries pulled in beside it.
        .venv-ref/bin/python -c 'import importlib.metadata as m, sys
names = [d.metadata["Name"] or "" for d in m.distributions()]
cuda = [n for n in names if n.lower().startswith("nvidia")]
tv = m.version("torch")
sys.exit(0 if "+cpu" in tv and not cuda else "bootstrap: .venv-ref got torch %s %s" % (tv, cuda))'
        echo "$ref_want" > "$ref_stamp"
    fi
fi
