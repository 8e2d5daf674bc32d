#!/usr/bin/env bash
# Run the uv release that uv.lock is made with (pyproject.toml, [tool.uv] required-version):
# the one on PATH when it is that release, else one kept in .uv/ of this checkout (or in
# $EDGEINFER_UV_DIR), installed there from PyPI with pip on first use.
#
#   scripts/uv.sh lock --upgrade      # any uv command, run against this checkout's lock
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
want="$(sed -n 's/^required-version = "==\(.*\)"$/\1/p' "$root/pyproject.toml")"
[ -n "$want" ] || { echo "uv.sh: no [tool.uv] required-version in $root/pyproject.toml" >&2; exit 2; }

release() { "$1" --version 2>/dev/null | awk '{print $2}'; }

if command -v uv >/dev/null 2>&1 && [ "$(release uv)" = "$want" ]; then
    exec uv "$@"
fi
for dir in "$root/.uv" "${EDGEINFER_UV_DIR:-}"; do
    if [ -n "$dir" ] && [ -x "$dir/bin/uv" ] && [ "$(release "$dir/bin/uv")" = "$want" ]; then
        exec "$dir/bin/uv" "$@"
    fi
done
dir="${EDGEINFER_UV_DIR:-$root/.uv}"
echo "uv.sh: installing uv $want into $dir" >&2
rm -rf "$dir.partial"
"${PYTHON:-python3}" -m pip install -q --disable-pip-version-check --root-user-action=ignore --target "$dir.partial" "uv==$want" >&2
rm -rf "$dir"
mv "$dir.partial" "$dir"
exec "$dir/bin/uv" "$@"
