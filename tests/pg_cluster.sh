#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for tests (used by .ci/run and tests/ledger_fixtures.py).
#
#   tests/pg_cluster.sh start DIR PORT   # initdb + start on 127.0.0.1:PORT; prints the admin URL
#   tests/pg_cluster.sh stop DIR         # stop it (immediately) and remove DIR
#
# Trust auth, loopback only, no fsync: a scratch server, never a real one. PostgreSQL
# refuses to run as root, so as root the server runs as the `postgres` OS user.
# The server binaries are found in $PG_BINDIR, /usr/lib/postgresql/<newest>/bin or PATH.
set -euo pipefail

usage() {
    echo "usage: $0 start DIR PORT | stop DIR" >&2
    exit 2
}

bindir() {
    if [[ -n "${PG_BINDIR:-}" ]]; then
        echo "$PG_BINDIR"
        return
    fi
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -n "$d" && -x "$d/initdb" ]]; then
        echo "$d"
    elif command -v initdb >/dev/null 2>&1; then
        dirname "$(command -v initdb)"
    else
        echo "pg_cluster.sh: no PostgreSQL server binaries (initdb) found" >&2
        exit 1
    fi
}

as_pg() {
    if [[ "$(id -u)" == 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

[[ $# -ge 2 ]] || usage
cmd=$1
dir=$2

case "$cmd" in
start)
    [[ $# -eq 3 ]] || usage
    port=$3
    bin=$(bindir)
    mkdir -p "$dir"
    chmod 700 "$dir"
    if [[ "$(id -u)" == 0 ]]; then
        chown postgres: "$dir"
    fi
    if ! as_pg "$bin/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --locale=C --no-sync \
        >"$dir/initdb.log" 2>&1; then
        cat "$dir/initdb.log" >&2
        exit 1
    fi
    opts="-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=$dir"
    opts="$opts -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
    if ! as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -o "$opts" -w -t 30 start >/dev/null; then
        cat "$dir/server.log" >&2 || true
        exit 1
    fi
    "$bin/pg_isready" -q -h 127.0.0.1 -p "$port" -t 30
    echo "postgresql://postgres@127.0.0.1:$port/postgres"
    ;;
stop)
    if [[ -f "$dir/data/postmaster.pid" ]]; then
        as_pg "$(bindir)/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$dir"
    ;;
*)
    usage
    ;;
esac
