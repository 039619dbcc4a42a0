"""
What C{--proxy-protocol-from} costs per connection, without sockets: the
SMTP listener's factory as C{makeService} builds it, driven over a
StringTransport (EHLO, NOOP, QUIT), in four modes measured interleaved:

- "off": no C{--proxy-protocol-from};
- "guard": a client outside the proxy networks (its first bytes checked);
- "header v1", "header v2": a trusted proxy sending a v1 or v2 header
  (parsed by Twisted's parsers) before the session.

    .venv/bin/python bench/proxyproto_inprocess_bench.py [--sessions 1000] [--reps 9]

Prints CPU microseconds per connection (best and median of the
repetitions) and Python function calls per connection (deterministic).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import socket
import statistics
import struct
import sys
import tempfile
import time

from twisted.internet import protocol
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gateway import tap  # noqa: E402
from gateway.proxyproto import V2_SIGNATURE  # noqa: E402

CLIENT = IPv4Address("TCP", "192.0.2.7", 4242)
PROXY = IPv4Address("TCP", "10.1.1.1", 40000)
HOST = IPv4Address("TCP", "127.0.0.1", 25)
V1 = b"PROXY TCP4 192.0.2.7 198.51.100.1 4242 25\r\n"
ADDRESSES = (socket.inet_aton("192.0.2.7") + socket.inet_aton("198.51.100.1")
             + struct.pack("!HH", 4242, 25))
V2 = V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(ADDRESSES)) + ADDRESSES
TRUSTED = ["--proxy-protocol-from", "10.0.0.0/8"]
MODES = [("off", [], CLIENT, b""), ("guard", TRUSTED, CLIENT, b""),
         ("header v1", TRUSTED, PROXY, V1), ("header v2", TRUSTED, PROXY, V2)]


def listener(data: str, extra: list[str]) -> protocol.Factory:
    options = tap.Options()
    options.parseOptions(["--auth", "memory:a:b", "--data-dir", data, "--http", "none",
                          "--socks", "none", "--smtp-insecure-auth", *extra])
    service = tap.makeService(options, reactor=MemoryReactorClock())
    [factory] = [s.factory for s in service if hasattr(s, "factory")]
    return factory


def session(factory: protocol.Factory, addr: IPv4Address, first: bytes) -> None:
    proto = factory.buildProtocol(addr)
    proto.makeConnection(StringTransport(peerAddress=addr, hostAddress=HOST))
    proto.dataReceived(first + b"EHLO x\r\n")
    proto.dataReceived(b"NOOP\r\n")
    proto.dataReceived(b"QUIT\r\n")
    proto.connectionLost(protocol.connectionDone)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=9)
    args = parser.parse_args()
    data = tempfile.mkdtemp(prefix="authgateway-proxyproto-")
    try:
        factories = {name: listener(data, extra) for name, extra, _, _ in MODES}
        times: dict[str, list[float]] = {name: [] for name, *_ in MODES}
        for _ in range(args.reps):
            for name, _, addr, first in MODES:
                factory = factories[name]
                start = time.process_time()
                for _ in range(args.sessions):
                    session(factory, addr, first)
                times[name].append((time.process_time() - start) / args.sessions * 1e6)
        print("| mode | us per connection, best | median | calls per connection |")
        print("|---|---:|---:|---:|")
        for name, _, addr, first in MODES:
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(100):
                session(factories[name], addr, first)
            profile.disable()
            calls = pstats.Stats(profile).total_calls / 100
            print(f"| {name} | {min(times[name]):.1f} | {statistics.median(times[name]):.1f}"
                  f" | {calls:.0f} |")
    finally:
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
