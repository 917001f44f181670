#!/usr/bin/env bash
# A throwaway PostgreSQL server on loopback, for the `postgres`-marked tests (CI and laptops).
#
#   eval "$(.ci/postgres.sh start)"   # starts it; prints `export VIDU_TEST_POSTGRES_URL=…` and
#                                     # `export VIDU_TEST_POSTGRES_DIR=…` (the cluster folder)
#   .ci/postgres.sh stop "$VIDU_TEST_POSTGRES_DIR"
#
# Installs Debian's `postgresql` package when no pg_ctl is found (needs root and apt-get). The
# cluster lives in a fresh mktemp folder, listens on 127.0.0.1 only, on a free port, and is run
# by the `postgres` user when this script runs as root (PostgreSQL refuses to run as root).
# Everything but the final `export` lines goes to stderr.
set -euo pipefail

find_bin() {
    if command -v pg_ctl >/dev/null 2>&1; then
        dirname "$(readlink -f "$(command -v pg_ctl)")"
        return
    fi
    local found
    found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -z "$found" ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "postgres.sh: installing Debian's postgresql package" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q postgresql >&2 || { apt-get update -q >&2 && apt-get install -y -q postgresql >&2; }
        found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    fi
    [ -n "$found" ] || { echo "postgres.sh: no pg_ctl found; install PostgreSQL (apt-get install postgresql)" >&2; exit 1; }
    echo "$found"
}

# Run a command as the cluster's owner: `postgres` when we are root, else ourselves.
as_owner() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
    local bin dir port
    bin=$(find_bin)
    dir=$(mktemp -d "${TMPDIR:-/tmp}/vidu-postgres.XXXXXX")
    chmod 755 "$dir"
    [ "$(id -u)" = 0 ] && chown postgres: "$dir"
    port=$(free_port)
    as_owner "$bin/initdb" -D "$dir/data" -U postgres -A trust --no-sync -E UTF8 >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; exit 1; }
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-h 127.0.0.1 -p $port -k $dir -c fsync=off -c max_connections=200" start >&2 \
        || { cat "$dir/server.log" >&2; exit 1; }
    as_owner "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres vidu_test >&2
    echo "$bin" >"$dir/bin"
    echo "postgres.sh: PostgreSQL on 127.0.0.1:$port (cluster $dir)" >&2
    echo "export VIDU_TEST_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1:$port/vidu_test"
    echo "export VIDU_TEST_POSTGRES_DIR=$dir"
}

stop() {
    local dir=${1:?usage: postgres.sh stop CLUSTER_DIR}
    [ -f "$dir/bin" ] || { echo "postgres.sh: $dir is not a cluster this script started" >&2; exit 1; }
    as_owner "$(cat "$dir/bin")/pg_ctl" -D "$dir/data" -m fast -w stop >&2 || true
    rm -rf "$dir"
}

case "${1:-}" in
    start) start ;;
    stop) stop "${2:-}" ;;
    *) echo "usage: $0 start | stop CLUSTER_DIR" >&2; exit 2 ;;
esac
