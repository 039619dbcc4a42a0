"""
Benchmark of the verification pipeline with bcrypt users (issue 3).

    .venv/bin/python bench/pipeline_bench.py [--users 50] [--cost 10]

Measures, in one run on this machine:

1. verifications/s through the Portal with a cold cache (every login hashes
   in the service's thread pool) and with a warm cache;
2. whether the reactor stays responsive while C{--users} uncached bcrypt
   checks are in flight: a separate probe process sends a cheap request
   over loopback TCP every 5 ms (the gateway answers it after a cached
   login) and reports the latency percentiles during the load; the same is
   measured with hashing on the reactor thread, for contrast.

Everything listens on 127.0.0.1 only, and the run stops by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from twisted.internet import defer, protocol, task
from twisted.protocols.basic import LineReceiver

from gateway import testing
from gateway.checkers import hashes
from gateway.checkers.files import atomic_write
from gateway.checkers.hashing import HashPool, InlinePool, Verifier
from gateway.checkers.htpasswd import HtpasswdChecker
from gateway.realm import Realm, make_portal


def probe(port: int, seconds: float, interval: float) -> None:
    """The probe process: one request per interval, latency of each, as JSON."""
    import socket

    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    samples = []
    end = time.time() + seconds
    next_send = time.time()
    while time.time() < end:
        sent = time.time()
        sock.sendall(b"ping\r\n")
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(64)
            if not chunk:
                raise SystemExit("probe: connection closed")
            reply += chunk
        samples.append((sent, time.time() - sent))
        next_send += interval
        time.sleep(max(0.0, next_send - time.time()))
    sock.close()
    json.dump(samples, sys.stdout)


class Cheap(LineReceiver):
    """Answers each line after a login that the cache answers."""

    def lineReceived(self, line: bytes) -> None:
        if not self.factory.first_probe.called:
            self.factory.first_probe.callback(None)
        d = self.factory.portal.login(self.factory.probe_creds, None, *self.factory.ifaces)
        d.addCallback(lambda _: self.sendLine(b"ok"))


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def make_users(path: str, count: int, cost: int) -> list[tuple[str, str]]:
    users = [(f"user{i}", f"password-{i}") for i in range(count)] + [("probe", "probe-pw")]
    with ThreadPoolExecutor(os.cpu_count() or 2) as ex:
        hashed = list(ex.map(lambda u: hashes.make_hash(u[1], "bcrypt", cost=cost), users))
    atomic_write(path, "".join(f"{u}:{h}\n" for (u, _), h in zip(users, hashed)))
    return users[:-1]


@defer.inlineCallbacks
def login_all(portal, users):
    from gateway.authinfo import IAuthInfo

    results = yield defer.gatherResults(
        [portal.login(testing.http_basic(u, p), None, IAuthInfo) for u, p in users],
        consumeErrors=True,
    )
    return results


@defer.inlineCallbacks
def responsiveness(reactor, portal, verifier, users, label, seconds):
    from gateway.authinfo import IAuthInfo

    factory = protocol.Factory.forProtocol(Cheap)
    factory.portal = portal
    factory.probe_creds = testing.http_basic("probe", "probe-pw")
    factory.ifaces = (IAuthInfo,)
    factory.first_probe = defer.Deferred()
    verifier.clear()  # the load below is uncached ...
    yield portal.login(factory.probe_creds, None, IAuthInfo)  # ... the probe's login cached
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    proc = _spawn_probe(reactor, port.getHost().port, seconds)
    yield factory.first_probe
    yield task.deferLater(reactor, 0.5, lambda: None)  # an idle baseline
    start = time.time()
    yield login_all(portal, users)
    end = time.time()
    samples = yield proc
    port.stopListening()
    # Every probe in flight at some point of the load (a blocked reactor
    # holds the one sent just before it started).
    during = [rtt for sent, rtt in samples if sent <= end and sent + rtt >= start]
    before = [rtt for sent, rtt in samples if sent < start]
    ms = lambda v: f"{v * 1000:.1f}"  # noqa: E731
    print(
        f"{label:<34} load {end - start:5.2f}s  probes during load {len(during):4d}  "
        f"p50 {ms(statistics.median(during))} ms  p99 {ms(percentile(during, 99))} ms  "
        f"max {ms(max(during))} ms   (idle p99 {ms(percentile(before, 99))} ms)"
    )
    return percentile(during, 99)


def _spawn_probe(reactor, port, seconds):
    from twisted.internet import threads

    def run():
        out = subprocess.run(
            [sys.executable, __file__, "--probe", str(port), str(seconds)],
            capture_output=True, check=True, text=True, timeout=seconds + 30,
        )
        return json.loads(out.stdout)

    return threads.deferToThread(run)


@defer.inlineCallbacks
def main(reactor, args):
    tmp = tempfile.mkdtemp(prefix="authgateway-bench-")
    path = os.path.join(tmp, "users.htpasswd")
    t = time.perf_counter()
    users = make_users(path, args.users, args.cost)
    print(f"{args.users} bcrypt cost {args.cost} users written in {time.perf_counter() - t:.1f}s; "
          f"{os.cpu_count()} CPUs, hash threads {args.threads}")

    pool = HashPool(reactor, threads=args.threads, max_pending=max(64, args.users + 8))
    pool.startService()
    try:
        yield run(reactor, args, path, users, pool)
    finally:
        pool.stopService()


@defer.inlineCallbacks
def run(reactor, args, path, users, pool):
    verifier = Verifier(hashes.verify, pool, reactor, ttl=300, max_entries=10000)
    checker = HtpasswdChecker(path, verifier)
    portal = make_portal(Realm(), [checker])

    # 1. Cold and warm verifications/s.
    cold_times = []
    for _ in range(args.cold_rounds):
        verifier.clear()
        t = time.perf_counter()
        yield login_all(portal, users)
        cold_times.append(time.perf_counter() - t)
    cold = args.users * len(cold_times) / sum(cold_times)
    t = time.perf_counter()
    done = 0
    while done < args.warm:
        yield login_all(portal, users)
        done += len(users)
    warm = done / (time.perf_counter() - t)
    print(f"cold cache: {cold:10.1f} verifications/s  ({args.cold_rounds} x {args.users} logins)")
    print(f"warm cache: {warm:10.1f} verifications/s  ({done} logins)  ratio {warm / cold:.0f}x")

    # 2. Reactor responsiveness with the load in flight.
    # Long enough for the load even with hashing on the reactor (~75 ms a hash).
    seconds = 2.0 + 0.12 * args.users
    yield responsiveness(reactor, portal, verifier, users,
                         f"hash pool ({args.threads} threads)", seconds)
    inline = Verifier(hashes.verify, InlinePool(), reactor)
    inline_checker = HtpasswdChecker(path, inline)
    yield responsiveness(reactor, make_portal(Realm(), [inline_checker]), inline, users,
                         "contrast: hashing on the reactor", seconds)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--probe":
        probe(int(sys.argv[2]), float(sys.argv[3]), 0.005)
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--cost", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--cold-rounds", type=int, default=2)
    parser.add_argument("--warm", type=int, default=20000)
    args = parser.parse_args()
    task.react(main, [args])
