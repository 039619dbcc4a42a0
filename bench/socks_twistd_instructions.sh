#!/bin/sh
# Instructions per SOCKS session in a real twistd (valgrind's I refs of the
# whole process: the reactor, Twisted's TCP transports and the gateway; the
# kernel's work in the system calls is not counted). The gateway runs under
# valgrind as bench/socks_bench.py runs it (--auth memory:daniel:tiger,
# --socks-allow 127.0.0.1, a log file); the native load generator drives
# FEW, then MANY sessions through it, one client at a time (greeting,
# RFC 1929 login, CONNECT to its echo sink, 64 bytes echoed, close), and the
# difference of the two counts over MANY - FEW is printed: not changed by
# what else the machine does (the wall-clock figures of socks_bench.py are).
#
#   bench/socks_twistd_instructions.sh [TREE...]     (default: this tree)
#
# Each TREE is put first on PYTHONPATH (e.g. a worktree of main, then this
# one). Needs valgrind and the loadgen ($LOADGEN, or built as benchlib does).
# FEW and MANY: $FEW (default 100) and $MANY (default 600).
set -e
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$here/.venv/bin/python}
twistd=$(dirname "$python")/twistd
loadgen=${LOADGEN:-$("$python" -c "import sys; sys.path.insert(0, '$here/bench'); import benchlib; print(benchlib.build_loadgen())")}
few=${FEW:-100}
many=${MANY:-600}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/authgateway-socks-instructions-XXXXXX")
sink_pid=
gw_pid=
cleanup() {
    [ -z "$gw_pid" ] || kill "$gw_pid" 2>/dev/null || true
    [ -z "$sink_pid" ] || kill "$sink_pid" 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT INT TERM
port() { "$python" -c "import sys; sys.path.insert(0, '$here/bench'); import benchlib; print(benchlib.free_port())"; }
echo_port=$(port)
"$loadgen" sink --echo "127.0.0.1:$echo_port" --discard "127.0.0.1:$(port)" --lifetime 3600 \
    >/dev/null 2>&1 &
sink_pid=$!
count() {  # TREE SESSIONS -> instructions of the whole twistd
    gw_port=$(port)
    rm -rf "$tmp/data"
    PYTHONPATH=$1 valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null \
        --log-file="$tmp/valgrind.log" "$python" "$twistd" --pidfile= -n \
        --logfile "$tmp/gw.log" authgateway --data-dir "$tmp/data" \
        --auth memory:daniel:tiger --socks "tcp:$gw_port:interface=127.0.0.1" \
        --socks-allow 127.0.0.1 --smtp none --http none &
    gw_pid=$!
    tries=0
    until "$python" -c "import socket; socket.create_connection(('127.0.0.1', $gw_port), 1).close()" \
            2>/dev/null; do
        tries=$((tries + 1))
        [ $tries -lt 600 ] || { echo "the gateway did not start" >&2; exit 1; }
        sleep 0.5
    done
    "$loadgen" socks "127.0.0.1:$gw_port" --target "127.0.0.1:$echo_port" -c 1 -d 600 \
        --warmup 0 --max-sessions "$2" --user daniel --pass tiger \
        | grep -q "\"ok\":$2," || { echo "not $2 sessions" >&2; exit 1; }
    kill "$gw_pid"
    wait "$gw_pid" || true
    gw_pid=
    awk '/I *refs/ { gsub(",", "", $4); print $4 }' "$tmp/valgrind.log"
}
[ $# -gt 0 ] || set -- "$here"
for tree in "$@"; do
    tree=$(cd "$tree" && pwd)
    a=$(count "$tree" "$few")
    b=$(count "$tree" "$many")
    echo "$tree: $(( (b - a) / (many - few) )) instructions per session (twistd, user space)"
done
