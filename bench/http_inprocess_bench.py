"""
The CPU of one authenticated HTTP request, without sockets: the gateway
built by C{makeService} (C{--auth htpasswd:} on a file with a C{{SHA}} user
and a bcrypt user, as C{bench/http_bench.py} has) on a MemoryReactorClock,
one keep-alive connection over a StringTransport, the same request again
and again with Basic auth: every request a verification-cache hit (the
cache is warmed by the first), one login and one C{auth} log line.

    .venv/bin/python bench/http_inprocess_bench.py PATH USER COUNT [--log] [--profile]
    bench/http_instructions.sh [TREE...]     # instructions per request, each variant

PATH is C{whoami} or C{auth} (forward-auth, as a client asking about its own
request), USER C{sha} or C{bcrypt}. C{--log} formats every log event as
twistd does (its text observer, to /dev/null): what a real twistd spends on
the C{auth} line. C{--profile} prints cProfile's top functions instead.
Under valgrind (C{http_instructions.sh}), the difference between two counts
is the instructions per request, whatever else the machine is doing.
"""

from __future__ import annotations

import base64
import gc
import hashlib
import os
import shutil
import sys
import tempfile

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from gateway import tap
from gateway.checkers import hashes
from gateway.checkers.hashing import InlinePool
from gateway.connections import LimitedFactory

USERS = {"sha": "sha-password", "bcrypt": "bcrypt-password"}


def write_htpasswd(path: str) -> None:
    """A {SHA} user and a bcrypt one (cost 4: a cache hit costs the same at any cost)."""
    digest = base64.b64encode(hashlib.sha1(USERS["sha"].encode()).digest()).decode()
    with open(path, "w") as f:
        f.write(f"sha:{{SHA}}{digest}\n")
        f.write(f"bcrypt:{hashes.make_hash(USERS['bcrypt'], 'bcrypt', cost=4)}\n")


def request(path: str, user: str) -> bytes:
    token = base64.b64encode(f"{user}:{USERS[user]}".encode())
    return (
        b"GET /" + path.encode() + b" HTTP/1.1\r\nHost: localhost\r\n"
        b"Authorization: Basic " + token + b"\r\n\r\n"
    )


def main() -> None:
    path, user, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    tmp = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        htpasswd = os.path.join(tmp, "users.htpasswd")
        write_htpasswd(htpasswd)
        if "--log" in sys.argv:
            from twisted.logger import globalLogBeginner, textFileLogObserver

            sink = open(os.devnull, "w")
            globalLogBeginner.beginLoggingTo([textFileLogObserver(sink)], redirectStandardIO=False)
        options = tap.Options()
        options.parseOptions(["--data-dir", os.path.join(tmp, "data"), "--auth",
                              f"htpasswd:{htpasswd}", "--smtp", "none", "--socks", "none",
                              "--http", "tcp:0"])
        top = tap.makeService(options, reactor=MemoryReactorClock())
        core = top.core
        core.connections.budget = 100_000
        [factory] = [s.factory for s in top if isinstance(getattr(s, "factory", None), LimitedFactory)]
        peer = IPv4Address("TCP", "127.0.0.1", 40000)
        proto = factory.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        proto.makeConnection(transport)
        data = request(path, user)
        # The first request verifies in this thread (no hash threads here) and fills the cache.
        pool, core.verifier.pool = core.verifier.pool, InlinePool()
        proto.dataReceived(data)
        core.verifier.pool = pool
        if b" 200 " not in transport.value():
            raise SystemExit(f"not 200: {transport.value()[:300]!r}")
        transport.clear()
        gc.collect()
        if "--profile" in sys.argv:
            import cProfile
            import pstats

            profile = cProfile.Profile()
            profile.enable()
        for _ in range(count):
            proto.dataReceived(data)
            transport.clear()
        if "--profile" in sys.argv:
            profile.disable()
            stats = pstats.Stats(profile).sort_stats(os.environ.get("SORT", "tottime"))
            stats.print_stats(int(os.environ.get("TOP", "45")))  # $SORT, $TOP: cProfile's
        if core.verifier.hits < count:
            raise SystemExit(f"cache hits {core.verifier.hits} < {count}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
