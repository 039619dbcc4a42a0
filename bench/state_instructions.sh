#!/bin/sh
# Instructions per login (valgrind's I refs) of the gateway's process with
# the throttle's state local, in a redis-server over TCP loopback, and over
# a UNIX socket: the difference between 200 and 1,200 logins of
# bench/state_inprocess_bench.py, over 1,000 (redis-server itself is not
# traced). Right passwords, then wrong ones. Not changed by what else the
# machine does.
#
#   [CONCURRENCY=N] bench/state_instructions.sh [VARIANT...]     (default: local redis unix)
set -e
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$here/.venv/bin/python}
count() {
    valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null \
        "$python" "$here/bench/state_inprocess_bench.py" "$1" "$2" $3 2>&1 \
        | awk '/I *refs/ { gsub(",", "", $4); print $4 }'
}
[ $# -gt 0 ] || set -- local redis unix
for variant in "$@"; do
    for kind in right wrong; do
        few=$(count "$variant" 200 "$kind")
        many=$(count "$variant" 1200 "$kind")
        echo "$variant $kind: $(( (many - few) / 1000 )) instructions per login"
    done
done
