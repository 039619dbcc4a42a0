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
from twisted.internet.defer import CancelledError
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from gateway import testing
from gateway.checkers.hashing import HashPool, Verifier
from gateway.checkers.throttle import Throttle, ThrottlingChecker
from gateway.errors import NetworkShareFull, PoolFull, Throttled

PASSWORDS = {"alice": "wonderland", "mallory": "mallorypw", "carol": "carolpw"}


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


class SecondReviewTests(SynchronousTestCase):
    """
    The second adversarial review of the core: one ordinary account used from
    many addresses held the whole queue through the known-device lane
    (finding 1), and a neighbour in the same /24 locked a user out because
    refusals caused by the network's share were charged to her pair
    (finding 2). Scaled-down versions of the reviewer's fill_known.py and
    fill_net.py.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.threads = HeldThreads()
        self.pool = HashPool(self.clock, max_pending=64, threadpool=self.threads)
        # The reviewer ran with a short --cache-ttl: the right password is re-hashed.
        self.verifier = Verifier(
            lambda password, stored: password == stored, self.pool, self.clock, ttl=0
        )
        self.throttle = Throttle(self.clock)
        self.checker = ThrottlingChecker(HashingChecker(self.verifier), self.throttle)
        self.serial = 0

    def attempt(self, peer: str, user: str, password: str = "") -> Any:
        self.serial += 1
        return self.checker.requestAvatarId(
            testing.http_basic(user, password or f"wrong-{self.serial}", peer=peer)
        )

    def login(self, peer: str, user: str) -> Any:
        d = self.attempt(peer, user, PASSWORDS[user])
        self.threads.release_all()
        return self.successResultOf(d)

    def guess(self, peers: list[str], n: int = 4) -> list[Any]:
        """Each peer sends C{n} concurrent wrong passwords for mallory (its own account)."""
        out = []
        for peer in peers:
            for _ in range(n):
                d = self.attempt(peer, "mallory")
                d.addErrback(lambda f: f.trap(UnauthorizedLogin, PoolFull, Throttled))
                out.append(d)
        return out

    def settle(self) -> None:
        """The attack stops: the queue drains and every failure delay ends."""
        self.threads.release_all()
        self.clock.advance(Throttle.max_delay)

    def test_one_account_does_not_hold_the_queue(self):
        """
        fill_known.py: mallory's account from 64 addresses (2 networks), each
        a known device, 4 concurrent wrong passwords each, then the right
        one, over and over. A new device (carol) and a returning user (alice)
        still get a place, every round; mallory holds at most a quarter of
        the reserve.
        """
        self.login("198.51.100.7", "alice")
        peers = [f"10.0.{1 + i // 40}.{10 + i % 40}" for i in range(64)]
        for peer in peers:
            self.login(peer, "mallory")
        for _ in range(3):
            self.guess(peers)
            new = self.attempt("203.0.113.5", "carol", "carolpw")
            known = self.attempt("198.51.100.7", "alice", "wonderland")
            self.assertNoResult(new)  # not refused: it has a place
            # mallory: 4 known-lane places (a quarter of the reserve), 8 strangers' per network
            self.assertLessEqual(self.pool.pending, 4 + 2 * 8 + 2)
            self.assertLessEqual(max(self.pool._known_by_account.values()), 4)
            self.threads.release_all()
            self.assertEqual(self.successResultOf(new), "carol")
            self.assertEqual(self.successResultOf(known), "alice")
            self.clock.advance(Throttle.max_delay)
            for peer in peers:  # the right password: known again, but the peer keeps its count
                d = self.attempt(peer, "mallory", "mallorypw")
                d.addErrback(lambda f: f.trap(Throttled))
            self.threads.release_all()

    def test_known_device_loses_the_reserve_at_its_first_failure(self):
        """A known device's wrong password makes it a stranger: held to the shares again."""
        self.login("192.0.2.1", "mallory")
        first = self.attempt("192.0.2.1", "mallory")
        self.threads.release_all()
        self.clock.advance(Throttle.max_delay)
        self.failureResultOf(first, UnauthorizedLogin)
        self.assertFalse(self.throttle.is_known("192.0.2.1", "mallory"))
        attempts = [self.attempt("192.0.2.1", "mallory") for _ in range(3)]
        self.assertEqual(self.pool._by_peer["192.0.2.1"], 2)  # --hash-queue-per-peer 2
        self.failureResultOf(attempts[2], PoolFull)

    def test_one_known_lane_place_per_pair(self):
        """
        Concurrent guesses from one known device: one takes the known lane,
        the rest are a stranger's.
        """
        self.login("192.0.2.1", "mallory")
        self.guess(["192.0.2.1"], n=4)
        self.assertEqual(self.pool.pending, 3)
        self.assertEqual(self.pool._by_peer["192.0.2.1"], 2)
        self.assertEqual(list(self.pool._known_by_pair.values()), [1])

    def test_known_lane_not_in_the_network_share(self):
        """A known device's verification is not counted against strangers of its network."""
        for i in range(1, 5):
            self.login(f"192.0.2.{i}", "mallory")
        for i in range(1, 5):
            self.attempt(f"192.0.2.{i}", "mallory")
        self.assertEqual(self.pool.pending, 4)
        self.assertEqual(dict(self.pool._by_network), {})

    def test_neighbour_does_not_lock_carol_out(self):
        """
        fill_net.py: known devices of mallory and strangers in 192.0.2.0/24
        keep the network's share full. carol, from a clean address of the
        same /24, is refused for now (the network's load, not hers), but
        nothing is counted against her: no 429 while it lasts, and the right
        password gets in once the attack stops.
        """
        peers = [f"192.0.2.{10 + i}" for i in range(12)]
        for peer in peers:
            self.login(peer, "mallory")
        self.guess(peers)
        for _ in range(2 * Throttle.max_failures):
            self.failureResultOf(self.attempt("192.0.2.250", "carol", "carolpw"), NetworkShareFull)
        self.assertEqual(self.throttle.check("192.0.2.250", "carol"), 0)
        self.assertEqual(self.pool._by_network["192.0.2.0/24"], 8)  # strangers' jobs only
        self.settle()
        self.assertEqual(self.login("192.0.2.250", "carol"), "carol")

    def test_network_share_refusals_are_not_charged(self):
        """
        Strangers only: the network's share refuses a neighbour without
        counting against her pair or peer.
        """
        for i in range(1, 30):
            for _ in range(Throttle.max_peer_failures):
                d = self.attempt(f"192.0.2.{i}", f"user{i}")
                d.addErrback(lambda f: f.trap(UnauthorizedLogin, PoolFull, Throttled))
        self.assertEqual(self.pool._by_network["192.0.2.0/24"], 8)
        for _ in range(Throttle.max_peer_failures + 1):
            self.failureResultOf(self.attempt("192.0.2.250", "carol", "carolpw"), NetworkShareFull)
        self.settle()
        self.assertEqual(self.login("192.0.2.250", "carol"), "carol")

    def test_own_share_still_charged(self):
        """A peer over its own share still pays, to its peer and pair (no free retries)."""
        attempts = [self.attempt("192.0.2.1", "carol") for _ in range(Throttle.max_failures)]
        for d in attempts[2:]:  # 2 in flight + 3 refusals counted: the pair's 5
            self.assertIsNone(self.failureResultOf(d, PoolFull).check(NetworkShareFull))
        self.failureResultOf(self.attempt("192.0.2.1", "carol"), Throttled)

    def test_abandoned_in_a_slow_queue_judged_by_its_verdict(self):
        """
        Neighbour of finding 2: carol's client gives up while her
        verification waits behind others' jobs. Her right password is not
        counted against her (no lockout, she stays a known device); a wrong
        password abandoned the same way is counted once its hash says so.
        """
        self.login("198.51.100.7", "carol")
        self.flood_strangers()
        for _ in range(2 * Throttle.max_failures):
            d = self.attempt("198.51.100.7", "carol", "carolpw")
            d.cancel()
            self.failureResultOf(d, CancelledError)
            self.threads.release_all()
        self.assertEqual(self.throttle.check("198.51.100.7", "carol"), 0)
        self.assertTrue(self.throttle.is_known("198.51.100.7", "carol"))
        guesses = [self.attempt("198.51.100.8", "carol") for _ in range(2)]
        for d in guesses:
            d.cancel()
            self.failureResultOf(d, CancelledError)
        self.assertEqual(self.throttle.failed("198.51.100.8", "carol", across_peers=False), 0.5)
        self.threads.release_all()  # the hashes say "wrong": both counted now
        self.assertEqual(self.throttle.failed("198.51.100.8", "carol", across_peers=False), 4)

    def flood_strangers(self) -> None:
        for n in range(20):
            for i in range(1, 5):
                for _ in range(2):
                    d = self.attempt(f"10.{n}.0.{i}", f"user{n}-{i}")
                    d.addErrback(lambda f: f.trap(UnauthorizedLogin, PoolFull, Throttled))


class AbandonedVerdictTests(SynchronousTestCase):
    """
    Audit finding 1: a client that hangs up once it knows its guess was
    wrong (no answer within hash time: the failure delay runs) or while the
    hash runs still leaves a C{failure} event, the checkers' verdict, for
    fail2ban; and a line in the text auth log.
    """

    def setUp(self) -> None:
        from gateway.events import Events
        from gateway.realm import Realm, make_portal

        self.clock = Clock()
        self.threads = HeldThreads()
        pool = HashPool(self.clock, max_pending=64, threadpool=self.threads)
        verifier = Verifier(lambda password, stored: password == stored, pool, self.clock)
        self.throttle = Throttle(self.clock)
        events = Events()
        self.logins: list[Any] = []
        events.add(type("Sink", (), {"login": lambda _, e: self.logins.append(e),
                                     "authz": lambda _, e: None})())
        self.portal = make_portal(Realm(), [HashingChecker(verifier)], self.throttle, events)
        self.lines: list[Any] = []
        self.log = Logger(observer=self.lines.append)

    def login(self, password: str) -> Any:
        from gateway.realm import login

        return login(self.portal, testing.http_basic("carol", password, peer="192.0.2.9"),
                     log=self.log)

    def outcomes(self) -> list[tuple[str, str, bool]]:
        return [(e.outcome, e.reason, e.client_left) for e in self.logins]

    def test_hang_up_during_the_failure_delay(self) -> None:
        d = self.login("guess")
        self.threads.release_all()
        self.assertNoResult(d)  # judged wrong, waiting out the failure delay
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.outcomes(), [("failure", "invalid_credentials", True)])
        [line] = self.lines
        self.assertEqual((line["outcome"], line["client_left"]), ("failure", True))
        self.assertIn("auth failure", formatEvent(line))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_hang_up_during_the_hash(self) -> None:
        """The event waits for the verdict: a failure once the hash says wrong."""
        d = self.login("guess")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.logins, [])
        self.threads.release_all()
        self.assertEqual(self.outcomes(), [("failure", "invalid_credentials", True)])
        self.assertEqual([line["outcome"] for line in self.lines], ["failure"])
        # Charged once, to the peer and pair.
        self.assertEqual(self.throttle.failed("192.0.2.9", "carol", across_peers=False), 1.0)

    def test_right_password_abandoned_is_cancelled(self) -> None:
        d = self.login("carolpw")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.threads.release_all()
        self.assertEqual(self.outcomes(), [("cancelled", "cancelled", True)])

    def test_answered_failure_not_left(self) -> None:
        d = self.login("guess")
        self.threads.release_all()
        self.clock.advance(1)
        self.failureResultOf(d, UnauthorizedLogin)
        self.assertEqual(self.outcomes(), [("failure", "invalid_credentials", False)])
