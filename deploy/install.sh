#!/usr/bin/env bash
# Install the edgeinfer agent on a Debian/Ubuntu gateway as a systemd service.
#
#   sudo deploy/install.sh [--wheel FILE | --source DIR] [--extras media,ocr] [--gpu]
#                          [--device-id ID] [--broker URL] [--password-file FILE] [--no-start]
#   deploy/install.sh --root /tmp/gw --dry-run        # print every step, change nothing
#
# What it does, each step only when needed (run it again: it changes nothing, and never
# touches an existing /etc/edge-agent/agent.yaml):
#   1. the system user and group edge-agent (systemd-sysusers with
#      systemd/edge-agent.sysusers, else useradd);
#   2. a virtual environment in /opt/edgeinfer/.venv with the package, from a wheel
#      (--wheel) or a source tree (--source, default: this checkout), and its dependencies
#      at the versions and hashes of this checkout's uv.lock: the agent extra (ONNX Runtime
#      and OpenVINO), or agent-gpu with --gpu (ONNX Runtime's CUDA build instead), plus the
#      extras named by --extras (media: image, audio and text pipelines; ocr);
#   3. /etc/edge-agent/agent.yaml (0640 root:edge-agent) from deploy/agent.example.yaml,
#      with --device-id (default: the host name) and --broker filled in;
#   4. the broker password (--password-file) as /etc/credstore/mqtt-password (0600 root),
#      which the unit hands to the agent with LoadCredential=mqtt-password;
#   5. systemd/edge-agent.service in /etc/systemd/system, then daemon-reload and
#      `systemctl enable --now edge-agent` (--no-start: enable only).
#
# --root DIR installs into DIR (every path prefixed) and does not touch the system: no
# user is created, nothing is chowned, systemctl is not run; those commands are printed.
# --dry-run prints every action and changes nothing. --no-venv skips step 2;
# --venv-from DIR makes /opt/edgeinfer/.venv a symlink to an existing environment.
set -euo pipefail

SRC_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROOT=""
DRY=0
WHEEL=""
SOURCE=""
VENV_MODE="create"   # create | none | link
VENV_FROM=""
EXTRAS=""
GPU=0
DEVICE_ID=""
BROKER=""
PASSWORD_FILE=""
START=1
PYTHON="${PYTHON:-python3}"

PREFIX_DIR=/opt/edgeinfer
CONF_DIR=/etc/edge-agent
CREDSTORE=/etc/credstore
UNIT_DIR=/etc/systemd/system
SYSUSERS_DIR=/usr/lib/sysusers.d
USER_NAME=edge-agent

usage() {
    sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

die() { echo "install.sh: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT="${2:?--root needs a directory}"; shift 2 ;;
        --root=*) ROOT="${1#*=}"; shift ;;
        --dry-run) DRY=1; shift ;;
        --wheel) WHEEL="${2:?--wheel needs a file}"; shift 2 ;;
        --source) SOURCE="${2:?--source needs a directory}"; shift 2 ;;
        --no-venv) VENV_MODE="none"; shift ;;
        --venv-from) VENV_MODE="link"; VENV_FROM="${2:?--venv-from needs a directory}"; shift 2 ;;
        --extras) EXTRAS="${2?--extras needs a list, e.g. media,ocr}"; shift 2 ;;
        --extras=*) EXTRAS="${1#*=}"; shift ;;
        --gpu) GPU=1; shift ;;
        --device-id) DEVICE_ID="${2:?--device-id needs a value}"; shift 2 ;;
        --broker) BROKER="${2:?--broker needs a URL}"; shift 2 ;;
        --password-file) PASSWORD_FILE="${2:?--password-file needs a file}"; shift 2 ;;
        --no-start) START=0; shift ;;
        -h|--help) usage 0 ;;
        *) echo "install.sh: unknown option $1" >&2; usage 2 ;;
    esac
done

[ -n "$WHEEL" ] && [ -n "$SOURCE" ] && die "give --wheel or --source, not both"
[ -n "$WHEEL" ] && [ ! -f "$WHEEL" ] && die "no such wheel: $WHEEL"
SOURCE="${SOURCE:-$SRC_DIR}"
[ "$VENV_MODE" = create ] && [ -z "$WHEEL" ] && [ ! -f "$SOURCE/pyproject.toml" ] \
    && die "$SOURCE is not a source tree (no pyproject.toml): give --source or --wheel"
[ "$VENV_MODE" = link ] && [ ! -x "$VENV_FROM/bin/python" ] && die "$VENV_FROM is not a virtual environment"
[ -n "$PASSWORD_FILE" ] && [ ! -f "$PASSWORD_FILE" ] && die "no such file: $PASSWORD_FILE"
# The extras installed: the agent's runtimes, then what --extras adds (pyproject.toml).
AGENT_EXTRA=agent
[ "$GPU" = 1 ] && AGENT_EXTRA=agent-gpu
EXTRA_LIST="$AGENT_EXTRA"
for extra in ${EXTRAS//,/ }; do
    case "$extra" in
        media|ocr|fleet|postgres) case ",$EXTRA_LIST," in *",$extra,"*) ;; *) EXTRA_LIST="$EXTRA_LIST,$extra" ;; esac ;;
        agent|agent-gpu) die "--extras $extra: the agent's runtimes are always installed (--gpu picks agent-gpu)" ;;
        *) die "--extras: unknown extra '$extra' (known: media, ocr, fleet, postgres)" ;;
    esac
done
[ "$VENV_MODE" = create ] && [ ! -f "$SRC_DIR/uv.lock" ] && die "no uv.lock in $SRC_DIR: run install.sh from a checkout"
if [ -n "$ROOT" ]; then
    if [ "$DRY" = 0 ]; then mkdir -p "$ROOT" || die "cannot create $ROOT"; fi
    ROOT="$(cd "$ROOT" 2>/dev/null && pwd || echo "$ROOT")"
elif [ "$DRY" = 0 ] && [ "$(id -u)" -ne 0 ]; then
    die "run as root (sudo), or with --root DIR or --dry-run"
fi
if [ -z "$ROOT" ] && [ -r /etc/os-release ] && ! grep -qiE '^(ID|ID_LIKE)=.*(debian|ubuntu)' /etc/os-release; then
    echo "install.sh: warning: this is not Debian or Ubuntu; going on" >&2
fi
DEVICE_ID="${DEVICE_ID:-$(hostname -s 2>/dev/null || hostname)}"
if [ -n "$BROKER" ] && ! [[ "$BROKER" =~ ^mqtts?://[][A-Za-z0-9.:_-]+$ ]]; then
    die "--broker '$BROKER' must look like mqtt://host:port or mqtts://host:port"
fi
[[ "$DEVICE_ID" =~ ^[A-Za-z0-9_-]{1,64}$ ]] || die "device id '$DEVICE_ID' must match [A-Za-z0-9_-]{1,64} (give --device-id)"

CHANGES=0
say() { echo "$*"; }
# An action that changes files under ROOT: printed, and done unless --dry-run.
act() {
    CHANGES=$((CHANGES + 1))
    if [ "$DRY" = 1 ]; then say "would: $*"; else say "+ $*"; "$@"; fi
}
# An action on the running system (users, ownership, systemd): with --root only printed
# (and not counted: it is not a change under ROOT).
sys() {
    if [ -n "$ROOT" ] && [ "$DRY" = 0 ]; then say "skipped (--root): $*"; return 0; fi
    CHANGES=$((CHANGES + 1))
    if [ "$DRY" = 1 ]; then say "would: $*"; else say "+ $*"; "$@"; fi
}
ok() { say "ok: $*"; }

# mode_of PATH -> octal mode, e.g. 640
mode_of() { stat -c '%a' "$1"; }

# ensure_dir PATH MODE [GROUP]
ensure_dir() {
    local path="$ROOT$1" mode="$2" group="${3:-}"
    if [ ! -d "$path" ]; then
        act mkdir -p -m "$mode" "$path"
    elif [ "$(mode_of "$path")" != "${mode#0}" ]; then
        act chmod "$mode" "$path"
    else
        ok "$path"
    fi
    if [ -n "$group" ] && { [ ! -d "$path" ] || [ "$(stat -c %G "$path")" != "$group" ]; }; then
        sys chgrp "$group" "$path"
    fi
}

# put SRC DEST MODE [GROUP]: install SRC as DEST unless DEST already has that content and mode.
put() {
    local src="$1" dest="$ROOT$2" mode="$3" group="${4:-}"
    if [ -f "$dest" ] && cmp -s "$src" "$dest"; then
        if [ "$(mode_of "$dest")" != "${mode#0}" ]; then act chmod "$mode" "$dest"; else ok "$dest"; fi
    else
        act install -D -m "$mode" "$src" "$dest"
    fi
    if [ -n "$group" ] && { [ ! -f "$dest" ] || [ "$(stat -c %G "$dest")" != "$group" ]; }; then
        sys chgrp "$group" "$dest"
    fi
}

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# -- 1. user ------------------------------------------------------------------------------
say "== user $USER_NAME"
put "$SRC_DIR/systemd/edge-agent.sysusers" "$SYSUSERS_DIR/edge-agent.conf" 0644
if [ -n "$ROOT" ] || ! id "$USER_NAME" >/dev/null 2>&1; then
    if [ -n "$ROOT" ] && grep -q "^$USER_NAME:" "$ROOT/etc/passwd" 2>/dev/null; then
        ok "user $USER_NAME"
    elif command -v systemd-sysusers >/dev/null 2>&1; then
        sys systemd-sysusers "$SYSUSERS_DIR/edge-agent.conf"
    else
        sys useradd --system --user-group --home-dir /var/lib/edge-agent --no-create-home \
            --shell /usr/sbin/nologin --comment "edgeinfer edge agent" "$USER_NAME"
    fi
else
    ok "user $USER_NAME"
fi

# -- 2. virtual environment -----------------------------------------------------------------
say "== $PREFIX_DIR"
ensure_dir "$PREFIX_DIR" 0755
VENV="$ROOT$PREFIX_DIR/.venv"
case "$VENV_MODE" in
    none) say "skipped (--no-venv): $VENV" ;;
    link)
        if [ -L "$VENV" ] && [ "$(readlink "$VENV")" = "$VENV_FROM" ]; then ok "$VENV -> $VENV_FROM"
        else
            if [ -e "$VENV" ] || [ -L "$VENV" ]; then act rm -rf "$VENV"; fi
            act ln -s "$VENV_FROM" "$VENV"
        fi ;;
    create)
        if [ -x "$VENV/bin/python" ]; then ok "$VENV"
        else
            "$PYTHON" -m venv --help >/dev/null 2>&1 \
                || die "$PYTHON cannot make virtual environments: apt-get install python3-venv"
            act "$PYTHON" -m venv "$VENV"
        fi
        # What is installed is remembered by its hash, the lock's and the extras': the same
        # wheel or tree again is a no-op.
        lock_hash="$(sha256sum "$SRC_DIR/uv.lock" | cut -d' ' -f1)"
        if [ -n "$WHEEL" ]; then
            want="wheel $(sha256sum "$WHEEL" | cut -d' ' -f1)"
            what="$WHEEL"
        else
            want="source $( (cd "$SOURCE" && find pyproject.toml agent fleet runtimes -type f \
                \( -name '*.py' -o -name '*.toml' -o -name '*.json' -o -name '*.txt' \) \
                -not -path '*/__pycache__/*' 2>/dev/null | LC_ALL=C sort | xargs sha256sum) \
                | sha256sum | cut -d' ' -f1)"
            what="$SOURCE"
        fi
        want="$want lock $lock_hash extras $EXTRA_LIST"
        stamp="$ROOT$PREFIX_DIR/.installed"
        if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then ok "edgeinfer[$EXTRA_LIST] from $what"
        else
            # The dependencies exactly as locked, hashes checked (uv pip sync also takes away
            # what the lock no longer lists, e.g. onnxruntime when --gpu brings onnxruntime-gpu);
            # then the package itself, without resolving anything anew. uv is the lock's
            # release (scripts/uv.sh), fetched into a temporary folder when not at hand.
            export_flags="--frozen --no-dev --no-emit-project --no-header --quiet"
            for extra in ${EXTRA_LIST//,/ }; do export_flags="$export_flags --extra $extra"; done
            UV=(env "EDGEINFER_UV_DIR=$TMP/uv" "PYTHON=$VENV/bin/python" "$SRC_DIR/scripts/uv.sh")
            if [ "$DRY" = 1 ]; then
                say "would: uv export $export_flags (from $SRC_DIR/uv.lock) > requirements.txt"
            else
                [ -x "$VENV/bin/python" ] || die "no $VENV/bin/python"
                # shellcheck disable=SC2086
                "${UV[@]}" export $export_flags --project "$SRC_DIR" -o "$TMP/requirements.txt" >/dev/null
            fi
            act "${UV[@]}" pip sync --quiet --python "$VENV/bin/python" --require-hashes "$TMP/requirements.txt"
            act "${UV[@]}" pip install --quiet --python "$VENV/bin/python" --no-deps "$what"
            if [ "$DRY" = 0 ]; then echo "$want" > "$stamp"; fi
        fi ;;
esac
[ -f "$SOURCE/README.md" ] && put "$SOURCE/README.md" "$PREFIX_DIR/README.md" 0644

# -- 3. config ------------------------------------------------------------------------------
say "== $CONF_DIR"
ensure_dir "$CONF_DIR" 0750 "$USER_NAME"
CONF="$CONF_DIR/agent.yaml"
if [ -f "$ROOT$CONF" ]; then
    ok "$ROOT$CONF (exists: kept as it is)"
    if [ "$(mode_of "$ROOT$CONF")" != 640 ]; then say "note: $ROOT$CONF has mode $(mode_of "$ROOT$CONF"), not 640"; fi
else
    sed -e "s|^device_id: .*|device_id: $DEVICE_ID|" \
        ${BROKER:+-e "s|^  url: mqtt://127.0.0.1:1883 |  url: $BROKER |"} \
        "$SRC_DIR/deploy/agent.example.yaml" > "$TMP/agent.yaml"
    put "$TMP/agent.yaml" "$CONF" 0640 "$USER_NAME"
fi

# The config as the agent reads it (an unknown or ill-typed key is named).
if [ "$DRY" = 0 ] && [ -x "$VENV/bin/edge-agent" ]; then
    "$VENV/bin/edge-agent" run --config "$ROOT$CONF" --validate-config \
        || die "$ROOT$CONF does not validate (above): fix it and run install.sh again"
fi
UNIT_CHANGED=$CHANGES
# -- 4. credentials -------------------------------------------------------------------------
say "== credentials"
if [ -n "$PASSWORD_FILE" ]; then
    ensure_dir "$CREDSTORE" 0700
    # Only the password, without a trailing newline (edgeinfer/contract/credentials.py strips it anyway).
    printf '%s' "$(head -n1 "$PASSWORD_FILE")" > "$TMP/mqtt-password"
    put "$TMP/mqtt-password" "$CREDSTORE/mqtt-password" 0600
    # systemd before 250 does not look into /etc/credstore for a credential named without
    # a path: name the file in a drop-in there.
    sd_version="$(systemctl --version 2>/dev/null | awk 'NR==1 {print $2}')"
    if [ -z "$ROOT" ] && [ -n "$sd_version" ] && [ "${sd_version%%.*}" -lt 250 ] 2>/dev/null; then
        ensure_dir "$UNIT_DIR/edge-agent.service.d" 0755
        printf '[Service]\nLoadCredential=mqtt-password:%s/mqtt-password\n' "$CREDSTORE" > "$TMP/credstore.conf"
        put "$TMP/credstore.conf" "$UNIT_DIR/edge-agent.service.d/credstore.conf" 0644
    fi
elif [ -f "$ROOT$CREDSTORE/mqtt-password" ]; then
    ok "$ROOT$CREDSTORE/mqtt-password"
else
    say "no broker password (--password-file FILE puts one into $CREDSTORE/mqtt-password)"
fi

# -- 5. systemd -----------------------------------------------------------------------------
say "== systemd"
put "$SRC_DIR/systemd/edge-agent.service" "$UNIT_DIR/edge-agent.service" 0644
if [ "$CHANGES" != "$UNIT_CHANGED" ]; then sys systemctl daemon-reload; fi
if [ -n "$ROOT" ] || ! systemctl is-enabled --quiet edge-agent 2>/dev/null \
        || { [ "$START" = 1 ] && ! systemctl is-active --quiet edge-agent 2>/dev/null; }; then
    if [ "$START" = 1 ]; then sys systemctl enable --now edge-agent
    else sys systemctl enable edge-agent; fi
else
    ok "edge-agent enabled$([ "$START" = 1 ] && echo " and running")"
fi

if [ "$DRY" = 1 ]; then
    say "dry run: $CHANGES actions listed, nothing changed"
elif [ -n "$ROOT" ]; then
    say "done: $CHANGES changes under $ROOT (system actions printed, not run)"
else
    say "done: $CHANGES changes; logs: journalctl -u edge-agent -f"
fi
