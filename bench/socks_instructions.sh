#!/bin/sh
# Instructions per in-process SOCKS session (valgrind's I refs), which a
# shared or busy machine does not change as it changes wall and CPU time:
# the difference between 200 and 2,200 sessions of
# bench/socks_inprocess_bench.py (greeting, cached RFC 1929 login, CONNECT,
# 64 bytes each way, close), over 2,000.
#
#   bench/socks_instructions.sh [TREE...]     (default: this tree)
#
# Give two trees (e.g. a worktree of main and this one) to compare them in
# one run; each is put first on PYTHONPATH.
set -e
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$here/.venv/bin/python}
count() {
    PYTHONPATH=$1 valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null \
        "$python" "$here/bench/socks_inprocess_bench.py" "$2" 2>&1 \
        | awk '/I *refs/ { gsub(",", "", $4); print $4 }'
}
[ $# -gt 0 ] || set -- "$here"
for tree in "$@"; do
    tree=$(cd "$tree" && pwd)
    few=$(count "$tree" 200)
    many=$(count "$tree" 2200)
    echo "$tree: $(( (many - few) / 2000 )) instructions per session"
done
