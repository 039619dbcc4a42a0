"""
What metrics and the audit log add to one HTTP request, without sockets:
the gateway built by C{makeService} on a MemoryReactorClock, one keep-alive
connection over a StringTransport, C{GET /whoami} with Basic (a cached
login, so every request is one login event and one audit line), the audit
batch written every 8 requests as a busy reactor turn would.

    .venv/bin/python bench/ops_inprocess_bench.py VARIANT COUNT
    bench/ops_instructions.sh        # instructions per request of each variant

VARIANT is C{off}, C{metrics} (C{--metrics}), C{audit} (C{--audit-log} on
tmpfs) or C{both}. Run under valgrind by C{ops_instructions.sh}, the
difference between two counts is the instructions per request: the same
whatever else the machine is doing (the wall-clock figures of
C{ops_bench.py} vary by 10 % from run to run on a shared machine).
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
import tempfile

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from gateway import tap
from gateway.connections import LimitedFactory
from gateway.ops.audit import AuditLog

REQUEST = b"GET /whoami HTTP/1.1\r\nHost: x\r\nAuthorization: Basic ZGFuaWVsOnRpZ2Vy\r\n\r\n"


def main() -> None:
    variant, count = sys.argv[1], int(sys.argv[2])
    tmp = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        extra = {
            "off": [], "metrics": ["--metrics", "tcp:0"],
            "audit": ["--audit-log", os.path.join(tmp, "audit.log")],
            "both": ["--metrics", "tcp:0", "--audit-log", os.path.join(tmp, "audit.log")],
        }[variant]
        options = tap.Options()
        options.parseOptions(["--data-dir", os.path.join(tmp, "data"), "--auth", "memory:daniel:tiger",
                              "--smtp", "none", "--socks", "none", "--http", "tcp:0", *extra])
        top = tap.makeService(options, reactor=MemoryReactorClock())
        top.core.connections.budget = 100_000
        logs = [s for s in top.core.services if isinstance(s, AuditLog)]
        for log in logs:
            log.startService()
        [factory] = [s.factory for s in top if isinstance(getattr(s, "factory", None), LimitedFactory)]
        peer = IPv4Address("TCP", "127.0.0.1", 40000)
        proto = factory.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        proto.makeConnection(transport)
        gc.collect()
        for i in range(count):
            proto.dataReceived(REQUEST)
            if i == 0 and b" 200 " not in transport.value():
                raise SystemExit(f"not 200: {transport.value()[:200]!r}")
            transport.clear()
            if i % 8 == 7:
                for log in logs:
                    log.flush()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
