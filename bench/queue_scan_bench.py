"""
What a scan of the delivery queue costs as the queue grows: the time of the
first scan (nothing cached), of the next scans (what the gateway does every
15 s), the memory the L{Queue} keeps between scans, and the time of
C{authgateway queue list}.

    .venv/bin/python bench/queue_scan_bench.py [--messages 20000] [--deferred 0.5] [--scans 3]

It writes C{--messages} messages (a 1 KB C{.eml} and the C{.json} the spool
writes for an authenticated submission over TLS with three recipients; a
C{--deferred} share of them with a C{.state} as after one failed attempt)
into a temporary directory (C{--dir} to choose where), then measures in this
process. Memory is what C{tracemalloc} counts as still allocated after a
scan, with its result dropped: the queue's cache. The queue list runs in a
child process (its wall time and peak RSS). Only the public
interfaces are used, so the same script measures an older checkout
(C{PYTHONPATH=/path/to/checkout}).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from datetime import datetime, timedelta, timezone

from gateway.authinfo import AuthInfo, Identity, IdentityContext
from gateway.smtp.queue import Queue, QueueState
from gateway.smtp.spool import Envelope, metadata

MESSAGE = b"Subject: bench\r\nFrom: sales@example.com\r\n\r\n" + b"x" * 1000 + b"\r\n"


def envelope(i: int) -> Envelope:
    auth = AuthInfo(
        identities=(Identity("sales@example.com", IdentityContext.SmtpAuthPlainAuthentication),),
        groups=("staff", "senders"),
        peer_address="192.0.2.7",
    )
    return Envelope(
        mail_from="sales@example.com",
        rcpt_to=(f"a{i}@example.net", f"b{i}@example.org", f"c{i}@example.com"),
        helo="client.example",
        auth_info=auth,
        peer_address="192.0.2.7",
        peer_port=40000 + i % 20000,
        local_address="198.51.100.1",
        local_port=587,
        tls={"version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384"},
        protocol="ESMTPSA",
        mail_auth="sales@example.com",
    )


def fill(directory: str, count: int, deferred: float) -> None:
    start = datetime(2026, 11, 26, 8, 0, 0, tzinfo=timezone.utc)
    every = int(1 / deferred) if deferred else 0
    for i in range(count):
        received = start + timedelta(seconds=i // 10)
        id = f"{received:%Y%m%dT%H%M%SZ}-{i:016x}"
        env = envelope(i)
        base = os.path.join(directory, id)
        with open(base + ".eml", "wb") as f:
            f.write(MESSAGE)
        meta = metadata(id, env, len(MESSAGE), received)
        with open(base + ".json", "w", encoding="utf-8") as f:
            json.dump(meta, f)
        if every and i % every == 0:
            state = QueueState.fresh(meta)
            state.attempts = 1
            state.next_attempt = time.time() + 3600
            state.last_error = "451 4.4.2 connection to the relay lost"
            state.first_attempt = state.last_attempt = "2026-11-26T08:01:00Z"
            with open(base + ".state", "wb") as f:
                f.write(state.to_json())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--deferred", type=float, default=0.5, help="share of messages with a .state")
    parser.add_argument("--scans", type=int, default=3, help="warm scans measured after the first")
    parser.add_argument("--dir", default=None, help="where the temporary spool goes (default: $TMPDIR)")
    args = parser.parse_args()

    directory = tempfile.mkdtemp(prefix="queue-scan-bench-", dir=args.dir)
    try:
        t = time.perf_counter()
        fill(directory, args.messages, args.deferred)
        print(f"{args.messages} messages ({args.deferred:.0%} with a .state) written in "
              f"{time.perf_counter() - t:.1f}s to {directory}")
        import gateway.smtp.queue as queue_module
        print(f"code: {os.path.dirname(os.path.dirname(os.path.dirname(queue_module.__file__)))}")

        queue = Queue(directory)
        t = time.perf_counter()
        entries = queue.scan()
        first = time.perf_counter() - t
        assert len(entries) == args.messages, len(entries)
        warm = []
        for _ in range(args.scans):
            t = time.perf_counter()
            entries = queue.scan()
            warm.append(time.perf_counter() - t)
        print(f"first scan: {first * 1000:.0f} ms")
        print(f"next scans: {', '.join(f'{w * 1000:.0f}' for w in warm)} ms")
        del entries, queue

        # Memory in a second pass: tracemalloc slows the scans down.
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        queue = Queue(directory)
        queue.scan()
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        print(f"kept by the queue between scans: {kept / 1e6:.1f} MB "
              f"({kept / args.messages:.0f} bytes per message)")
        del queue

        # The child reports its own peak RSS: a forked child's ru_maxrss
        # would count the parent's pages copied before the exec.
        code = (
            "import resource, sys\n"
            "from gateway.cli import main\n"
            "status = main(sys.argv[1:])\n"
            "sys.stderr.write(f'{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}\\n')\n"
            "sys.exit(status)\n"
        )
        t = time.perf_counter()
        child = subprocess.run(
            [sys.executable, "-c", code, "queue", "--spool", directory, "list"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=True,
        )
        listed = time.perf_counter() - t
        rss = int(child.stderr.split()[-1])
        print(f"queue list: {listed:.2f} s wall, peak RSS {rss / 1024:.0f} MB")
    finally:
        shutil.rmtree(directory)


if __name__ == "__main__":
    main()
