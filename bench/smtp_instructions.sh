#!/bin/sh
# Instructions per SMTP session (valgrind's I refs), which a shared or busy
# machine does not change as it changes wall and CPU time: the difference
# between 20 and 420 in-process sessions (bench/smtp_inprocess_bench.py's
# session: EHLO, AUTH PLAIN, MAIL, RCPT, 1 KB DATA, QUIT), over 400.
#
#   bench/smtp_instructions.sh [TREE...]     (default: this tree)
#
# Give two trees (e.g. a worktree of main and this one) to compare them in
# one run; each is put first on PYTHONPATH.
set -e
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$here/.venv/bin/python}
count() {
    PYTHONPATH=$1 valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null \
        "$python" -c "
import os, shutil, sys, tempfile
sys.path.insert(0, '$1/bench')
import smtp_inprocess_bench as b
tmp = tempfile.mkdtemp(dir='/dev/shm' if os.path.isdir('/dev/shm') else None)
f = b.factory(os.path.join(tmp, 'spool'))
for _ in range($2): b.session(f, b.BODY)
shutil.rmtree(tmp)
" 2>&1 | awk '/I *refs/ { gsub(",", "", $4); print $4 }'
}
[ $# -gt 0 ] || set -- "$here"
for tree in "$@"; do
    tree=$(cd "$tree" && pwd)
    few=$(count "$tree" 20)
    many=$(count "$tree" 420)
    echo "$tree: $(( (many - few) / 400 )) instructions per session"
done
