#!/bin/sh
# Instructions per in-process HTTP request (valgrind's I refs) with metrics
# and the audit log off and on: the difference between 200 and 2,200
# requests of bench/ops_inprocess_bench.py, over 2,000. Not changed by what
# else the machine does.
#
#   bench/ops_instructions.sh [VARIANT...]     (default: off metrics audit both)
set -e
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$here/.venv/bin/python}
count() {
    valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null \
        "$python" "$here/bench/ops_inprocess_bench.py" "$1" "$2" 2>&1 \
        | awk '/I *refs/ { gsub(",", "", $4); print $4 }'
}
[ $# -gt 0 ] || set -- off metrics audit both
for variant in "$@"; do
    few=$(count "$variant" 200)
    many=$(count "$variant" 2200)
    echo "$variant: $(( (many - few) / 2000 )) instructions per request"
done
