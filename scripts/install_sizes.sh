#!/usr/bin/env bash
# The installed size of each install set, from uv.lock, in throwaway virtual environments:
# what a device, an operator or a gateway pays on disk. Prints a markdown table (README).
#
#   scripts/install_sizes.sh            # base, agent, agent-gpu, agent+media, agent+ocr, ...
set -euo pipefail
cd "$(dirname "$0")/.."
export UV_PYTHON_DOWNLOADS=never
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
interpreter="$("${PYTHON:-python3}" -c 'import sys; print(sys.executable)')"
base_kb=""
echo "| install | extras | installed size | beyond the base |"
echo "| --- | --- | --- | --- |"
for set in "" agent agent-gpu agent,media agent,ocr agent,media,ocr fleet postgres; do
    flags=""
    for extra in ${set//,/ }; do flags="$flags --extra $extra"; done
    env="$work/venv"
    rm -rf "$env"
    scripts/uv.sh venv --quiet --python "$interpreter" "$env"
    # shellcheck disable=SC2086
    scripts/uv.sh export --frozen --no-dev --no-emit-project --no-header --quiet $flags \
        -o "$work/requirements.txt" >/dev/null
    scripts/uv.sh pip sync --quiet --python "$env/bin/python" --require-hashes "$work/requirements.txt"
    scripts/uv.sh pip install --quiet --python "$env/bin/python" --no-deps .
    kb="$(du -sk "$env" | cut -f1)"
    [ -n "$base_kb" ] || base_kb="$kb"
    name="edgeinfer${set:+[$set]}"
    printf '| `pip install %s` | %s | %d MB | %s |\n' "'$name'" "${set:-none}" $((kb / 1024)) \
        "$([ "$kb" = "$base_kb" ] && echo - || echo "+$(((kb - base_kb) / 1024)) MB")"
done
