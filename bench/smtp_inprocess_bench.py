"""
The SMTP server's own CPU, without sockets: a SubmissionServer driven over a
StringTransport (the spool writes synchronously to a tmpfs directory), so
the figures are what the gateway's Python costs, not the kernel's.

    .venv/bin/python bench/smtp_inprocess_bench.py [--sessions 4000]

Prints the cost of one authenticated session (EHLO, AUTH PLAIN, MAIL, RCPT,
1 KB DATA, QUIT) with the log events formatted as twistd formats them (to
/dev/null) and with no log observer at all, and the reactor time to take in
a 10 MB message of 80-octet lines fed in 64 KiB segments, and of one
pipelined read of 256 KiB of empty message lines ending in a line too long
(the input an authenticated client can pile up; quadratic before 2026-11,
minutes of a frozen reactor).
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import tempfile
import time

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogPublisher, globalLogBeginner, textFileLogObserver

from gateway.acl import AllowAuthenticated
from gateway.checkers.throttle import Throttle
from gateway.realm import Realm, make_portal
from gateway.smtp.server import SMTPSettings, SubmissionFactory
from gateway.smtp.spool import Spool

AUTH = base64.b64encode(b"\0daniel\0tiger")
BODY = ("Subject: bench\r\n\r\n" + ("x" * 76 + "\r\n") * 13).encode()  # ~1 KB
COMMANDS = [b"EHLO bench.test\r\n", b"AUTH PLAIN " + AUTH + b"\r\n",
            b"MAIL FROM:<daniel@example.com>\r\n", b"RCPT TO:<bob@example.org>\r\n", b"DATA\r\n"]
BIG = (("y" * 78 + "\r\n") * 130_000).encode()  # ~10 MB
#: With the ".\r\nQUIT\r\n" session() adds, just under 256 KiB: one read.
EMPTY_THEN_LONG = b"\r\n" * (128 * 1024 - 600) + b"x" * 1000 + b"\r\n"


def factory(spool_dir: str) -> SubmissionFactory:
    checker = InMemoryUsernamePasswordDatabaseDontUse()
    checker.addUser("daniel", "tiger")
    portal = make_portal(Realm(), [checker], Throttle(Clock()))
    spool = Spool(spool_dir, threadpool_runner=lambda f, *a: defer.execute(f, *a))
    settings = SMTPSettings(hostname="mx.test", insecure_auth=True)
    return SubmissionFactory(portal, AllowAuthenticated(), spool, settings, "smtp")


def session(smtp: SubmissionFactory, text: bytes, segment: int | None = None) -> float:
    """One session; the seconds spent taking in C{text} (DATA through QUIT)."""
    proto = smtp.buildProtocol(None)
    here = IPv4Address("TCP", "127.0.0.1", 25)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555), hostAddress=here)
    proto.makeConnection(transport)
    for command in COMMANDS:
        proto.dataReceived(command)
    data = text + b".\r\nQUIT\r\n"
    step = segment or len(data)
    started = time.perf_counter()
    for i in range(0, len(data), step):
        proto.dataReceived(data[i : i + step])
    elapsed = time.perf_counter() - started
    if b"221 " not in transport.value():
        raise SystemExit(f"session failed: {transport.value()[-300:]!r}")
    proto.connectionLost(None)
    return elapsed


def per_session(smtp: SubmissionFactory, count: int) -> float:
    for _ in range(200):  # warm up
        session(smtp, BODY)
    started = time.perf_counter()
    for _ in range(count):
        session(smtp, BODY)
    return (time.perf_counter() - started) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=4000)
    args = parser.parse_args()
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    tmp = tempfile.mkdtemp(prefix="authgateway-smtp-inprocess-", dir=shm)
    observer = textFileLogObserver(open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the run
    publisher = LogPublisher(observer)
    globalLogBeginner.beginLoggingTo([publisher], redirectStandardIO=False, discardBuffer=True)
    try:
        smtp = factory(os.path.join(tmp, "spool"))
        logged = per_session(smtp, args.sessions)
        publisher.removeObserver(observer)
        quiet = per_session(smtp, args.sessions)
        big = min(session(smtp, BIG, 65536) for _ in range(3))
        piled = min(session(smtp, EMPTY_THEN_LONG) for _ in range(3))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"one session, log events formatted: {logged * 1e6:6.0f} us")
    print(f"one session, no log observer:      {quiet * 1e6:6.0f} us")
    print(f"a {len(BIG) / 1e6:.0f} MB message in 64 KiB segments: {big * 1e3:6.0f} ms")
    print(f"256 KiB of empty lines, a long line: {piled * 1e3:6.0f} ms")


if __name__ == "__main__":
    main()
