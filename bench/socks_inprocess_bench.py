"""
The SOCKS front door's own CPU per session, without sockets: the gateway
built by C{makeService} as twistd runs it in C{bench/socks_bench.py}
(C{--auth memory:daniel:tiger}, C{--socks-allow 127.0.0.1}, the session log
line formatted as twistd formats it, to /dev/null) on a
MemoryReactorClock; each session over StringTransports: greeting, RFC 1929
login (cached after the first), CONNECT to 127.0.0.1 (the outbound
connection completed by hand), 64 bytes each way, the destination's
end of input, the client's, close.

    .venv/bin/python bench/socks_inprocess_bench.py COUNT     # COUNT sessions
    bench/socks_instructions.sh [TREE...]                      # instructions per session

Under valgrind (C{socks_instructions.sh}) the difference between two counts
is the instructions per session: the same whatever else the machine is
doing. The system calls the real front door makes (accept, connect, send,
epoll) are not in it: see C{strace -c} on the twistd of C{socks_bench.py}.
"""

from __future__ import annotations

import gc
import os
import shutil
import socket
import struct
import sys
import tempfile

from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogPublisher, globalLogBeginner, textFileLogObserver
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway import tap
from gateway.connections import LimitedFactory

TARGET = ("127.0.0.1", 19001)
HELLO = b"\x05\x02\x00\x02"
LOGIN = b"\x01\x06daniel\x05tiger"
CONNECT = b"\x05\x01\x00\x01" + socket.inet_aton(TARGET[0]) + struct.pack("!H", TARGET[1])
PAYLOAD = b"x" * 64
DONE = Failure(error.ConnectionDone())


@implementer(ITCPTransport)
class Transport(StringTransport):
    """A StringTransport with TCP's half-close."""

    def loseWriteConnection(self) -> None:
        self.write_closed = True


def build(tmp: str) -> tuple[LimitedFactory, MemoryReactorClock]:
    options = tap.Options()
    options.parseOptions([
        "--data-dir", os.path.join(tmp, "data"), "--auth", "memory:daniel:tiger",
        "--smtp", "none", "--http", "none", "--socks", "tcp:0", "--socks-allow", "127.0.0.1",
        "--socks-max-sessions-per-peer", "100000", "--socks-max-sessions-per-user", "100000",
    ])
    reactor = MemoryReactorClock()
    top = tap.makeService(options, reactor=reactor)
    top.core.connections.budget = 100_000
    [factory] = [s.factory for s in top if isinstance(getattr(s, "factory", None), LimitedFactory)]
    return factory, reactor


def session(factory: LimitedFactory, reactor: MemoryReactorClock, n: int) -> None:
    peer = IPv4Address("TCP", "127.0.0.1", 30000 + n % 30000)
    client = factory.buildProtocol(peer)
    transport = Transport(peerAddress=peer, hostAddress=IPv4Address("TCP", "127.0.0.1", 1080))
    client.makeConnection(transport)
    client.dataReceived(HELLO)
    client.dataReceived(LOGIN)
    client.dataReceived(CONNECT)
    host, port, outbound_factory, _, _ = reactor.tcpClients.pop()
    del reactor.connectors[:]
    there = IPv4Address("TCP", host, port)
    outbound = outbound_factory.buildProtocol(there)
    outbound_transport = Transport(
        peerAddress=there, hostAddress=IPv4Address("TCP", "127.0.0.1", 40000 + n % 20000)
    )
    outbound.makeConnection(outbound_transport)
    client.dataReceived(PAYLOAD)
    outbound.dataReceived(PAYLOAD)
    if n == 0 and not transport.value().endswith(PAYLOAD):
        raise SystemExit(f"no tunnel: {transport.value()!r}")
    outbound.readConnectionLost()
    client.readConnectionLost()
    outbound.connectionLost(DONE)
    client.connectionLost(DONE)
    reactor.advance(0)  # the cancelled timers leave the queue


def main() -> None:
    count = int(sys.argv[1])
    tmp = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    observer = textFileLogObserver(open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the run
    globalLogBeginner.beginLoggingTo([LogPublisher(observer)], redirectStandardIO=False,
                                     discardBuffer=True)
    try:
        factory, reactor = build(tmp)
        gc.collect()
        for n in range(count):
            session(factory, reactor, n)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
