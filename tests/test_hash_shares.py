# -*- test-case-name: tests.test_hash_shares -*-
"""
The hash queue shared out per peer (issue 11, DoS review item 3): a few
peers guessing random passwords (no cache, no coalescing) used to fill the
whole queue, and every uncached login of every front door then failed
temporarily. Each peer (IPv6 /64) and network (IPv4 /24, IPv6 /48) now has a
share, an attempt over it counts against its peer, and known devices keep
places of their own.

The pool's threads are replaced by a queue the test releases by hand, so
that verifications stay "running" as long as the test wants.
"""

from __future__ import annotations

from typing import Any

from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from gateway import testing
from gateway.checkers.pipeline import (
    HashPool,
    PoolFull,
    Throttle,
    Throttled,
    ThrottlingChecker,
    Verifier,
)

PASSWORDS = {"alice": "wonderland"}


class HeldThreads:
    """A thread pool whose jobs run only when the test says so."""

    def __init__(self) -> None:
        self.jobs: list[Any] = []

    def callInThreadWithCallback(self, on_result: Any, f: Any, *args: Any, **kw: Any) -> None:
        self.jobs.append((on_result, f, args, kw))

    def release_all(self) -> None:
        jobs, self.jobs = self.jobs, []
        for on_result, f, args, kw in jobs:
            try:
                on_result(True, f(*args, **kw))
            except Exception as e:  # noqa: BLE001
                on_result(False, e)


class Clock(task.Clock):
    def callFromThread(self, f: Any, *args: Any, **kw: Any) -> None:
        f(*args, **kw)




class HashingChecker:
    """A checker that verifies every password through the Verifier (as htpasswd does)."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, verifier: Verifier) -> None:
        self.verifier = verifier

    def requestAvatarId(self, credentials: Any) -> Any:
        user = credentials.username
        stored = PASSWORDS.get(user, "*")

        def verified(ok: bool) -> str:
            if not ok:
                raise UnauthorizedLogin()
            return user

        return self.verifier.verify(user, credentials.password, stored).addCallback(verified)


class HashShareTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.threads = HeldThreads()
        self.pool = HashPool(self.clock, max_pending=64, threadpool=self.threads)
        verifier = Verifier(lambda password, stored: password == stored, self.pool, self.clock)
        self.throttle = Throttle(self.clock)
        self.checker = ThrottlingChecker(HashingChecker(verifier), self.throttle)
        self.serial = 0

    def attempt(self, peer: str, user: str = "", password: str = "") -> Any:
        self.serial += 1
        return self.checker.requestAvatarId(testing.http_basic(
            user or f"user{self.serial}", password or f"random-{self.serial}", peer=peer
        ))

    def flood(self, peers: list[str]) -> list[Any]:
        """Each peer sends as many uncached attempts as the throttle lets it (random passwords)."""
        out = []
        for peer in peers:
            for _ in range(Throttle.max_peer_failures):
                d = self.attempt(peer)
                d.addErrback(lambda f: f.trap(UnauthorizedLogin, PoolFull, Throttled))
                out.append(d)
        return out

    def test_seven_peers_do_not_fill_the_queue(self):
        """Seven peers at their throttle limit: a clean peer's uncached login still gets a place."""
        self.flood([f"192.0.2.{i}" for i in range(1, 8)])
        self.assertLessEqual(self.pool.pending, 7 * 2)  # --hash-queue-per-peer 2
        d = self.attempt("198.51.100.7", "alice", "wonderland")
        self.threads.release_all()
        self.assertEqual(self.successResultOf(d), "alice")

    def test_over_the_share_counts_against_the_peer(self):
        """A peer over its share is answered at once; that counts, and the throttle refuses it."""
        attempts = [self.attempt("192.0.2.1") for _ in range(Throttle.max_peer_failures)]
        over = [d for d in attempts if d.called]
        self.assertEqual(len(over), Throttle.max_peer_failures - 2)
        for d in over:
            self.failureResultOf(d, PoolFull)
        self.failureResultOf(self.attempt("192.0.2.1"), Throttled)

    def test_network_share(self):
        """Many addresses of one IPv4 /24 (or IPv6 /48) share one network share."""
        self.flood([f"192.0.2.{i}" for i in range(1, 30)])
        self.assertEqual(self.pool.pending, 8)  # --hash-queue-per-network 8
        self.flood([f"2001:db8:1:{i:x}::1" for i in range(1, 30)])
        self.assertEqual(self.pool.pending, 16)

    def test_known_devices_keep_places(self):
        """
        Strangers from many networks fill their part of the queue: a new
        peer is refused for now, a returning user (a known device) is served.
        """
        d = self.attempt("198.51.100.7", "alice", "wonderland")
        self.threads.release_all()
        self.assertEqual(self.successResultOf(d), "alice")
        self.flood([f"10.{n}.0.{i}" for n in range(20) for i in range(1, 5)])
        self.assertEqual(self.pool.pending, 64 - 16)  # --hash-queue-known 16
        self.failureResultOf(self.attempt("203.0.113.5"), PoolFull)
        self.clock.advance(301)  # alice's cached success has expired: she hashes too
        d = self.attempt("198.51.100.7", "alice", "wonderland")
        self.assertNoResult(d)
        self.threads.release_all()
        self.assertEqual(self.successResultOf(d), "alice")
        self.assertEqual(self.pool.pending, 0)
        self.assertEqual((dict(self.pool._by_peer), dict(self.pool._by_network)), ({}, {}))

    def test_without_an_attempt_only_the_global_bound(self):
        """
        A verification no ThrottlingChecker started (a checker under another
        plugin) has no share to keep to, but is a stranger's: the known
        devices' places stay free.
        """
        results = [self.pool.run(lambda: True) for _ in range(48)]
        self.assertEqual(self.pool.pending, 48)
        self.failureResultOf(self.pool.run(lambda: True), PoolFull)
        self.threads.release_all()
        self.assertEqual([self.successResultOf(d) for d in results], [True] * 48)
