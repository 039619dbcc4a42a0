#!/bin/sh
# Instructions per in-process HTTP request (valgrind's I refs): the
# difference between 200 and 2,200 requests of bench/http_inprocess_bench.py
# (keep-alive, Basic, a verification-cache hit each, the auth line formatted
# as twistd formats it), over 2,000. Not changed by what else the machine does.
#
#   bench/http_instructions.sh [TREE...]     (default: this tree)
#
# Give two trees (e.g. a worktree of main and this one) to compare them in
# one run: each is put first on PYTHONPATH; the bench script is this tree's.
# VARIANTS (default "whoami:sha whoami:bcrypt auth:sha auth:bcrypt") picks
# the PATH:USER pairs.
set -e
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$here/.venv/bin/python}
count() {
    PYTHONPATH=$1 valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null \
        "$python" "$here/bench/http_inprocess_bench.py" "$2" "$3" "$4" --log 2>&1 \
        | awk '/I *refs/ { gsub(",", "", $4); print $4 }'
}
[ $# -gt 0 ] || set -- "$here"
for tree in "$@"; do
    tree=$(cd "$tree" && pwd)
    for variant in ${VARIANTS:-whoami:sha whoami:bcrypt auth:sha auth:bcrypt}; do
        path=${variant%%:*} user=${variant#*:}
        few=$(count "$tree" "$path" "$user" 200)
        many=$(count "$tree" "$path" "$user" 2200)
        echo "$tree $path $user: $(( (many - few) / 2000 )) instructions per request"
    done
done
