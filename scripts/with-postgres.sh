#!/usr/bin/env bash
# Run a command with a PostgreSQL for the registry tests (tests/pgtest.py):
#   scripts/with-postgres.sh .venv/bin/pytest tests/test_controller_registry.py
# When a server answers at $EDGE_TEST_POSTGRES_URL (default postgresql://127.0.0.1:5432/test,
# trust auth), the command runs against it. Otherwise a throwaway one is started from the
# system's PostgreSQL (Debian's `postgresql` package, which scripts/bootstrap.sh installs):
# initdb into a temporary folder, trust auth, a free loopback port, database `test`;
# $EDGE_TEST_POSTGRES_URL points the command at it, and it is stopped and its folder removed
# when the command ends. Without PostgreSQL's programs the command runs as it is and the
# PostgreSQL tests skip, saying why. Needs .venv (scripts/bootstrap.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$#" -eq 0 ]; then
    echo "usage: scripts/with-postgres.sh COMMAND [ARG...]" >&2
    exit 2
fi

say() { echo "with-postgres: $*" >&2; }

# tests/pgtest.py says whether a server answers, and why not.
if reason="$(.venv/bin/python -m tests.pgtest 2>&1)"; then
    exec "$@"
fi
say "$reason"

# The newest PostgreSQL's programs: Debian keeps them out of PATH.
pgbin=""
for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/initdb" ] && pgbin="$d"
done
if [ -z "$pgbin" ] && command -v initdb >/dev/null 2>&1; then
    pgbin="$(dirname "$(command -v initdb)")"
fi
if [ -z "$pgbin" ]; then
    say "no initdb (install Debian's postgresql package: scripts/bootstrap.sh does):" \
        "the PostgreSQL tests will skip"
    exec "$@"
fi

# initdb refuses to run as root: the server then runs as the postgres system user (the
# package makes it), or as nobody.
as_pg=()
dir="$(mktemp -d "${TMPDIR:-/tmp}/edgeinfer-pg.XXXXXX")"
if [ "$(id -u)" -eq 0 ]; then
    pguser=postgres
    id -u "$pguser" >/dev/null 2>&1 || pguser=nobody
    chown "$pguser" "$dir"
    as_pg=(runuser -u "$pguser" --)
fi
stop() {
    if [ -f "$dir/data/postmaster.pid" ]; then
        "${as_pg[@]}" "$pgbin/pg_ctl" -D "$dir/data" -m immediate -s stop >/dev/null 2>&1 || true
    fi
    rm -rf "$dir"
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port="$(.venv/bin/python -c 'import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
say "starting a throwaway PostgreSQL ($pgbin) on 127.0.0.1:$port in $dir"
"${as_pg[@]}" "$pgbin/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --no-sync \
    >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; exit 1; }
# fsync off: the data is thrown away anyway.
"${as_pg[@]}" "$pgbin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -s \
    -o "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=$dir -c fsync=off" \
    start || { cat "$dir/server.log" >&2; exit 1; }
"$pgbin/createdb" -h 127.0.0.1 -p "$port" -U postgres test

export EDGE_TEST_POSTGRES_URL="postgresql://postgres@127.0.0.1:$port/test"
# Not exec: the trap stops the server when the command ends.
"$@"
