"""
Tests for L{gateway.ratelog}: floods of refusals (throttled logins, a full
hash queue, SOCKS connections over the per-peer limit) get a log line now and
then, with a count of those left out, instead of one line each.
"""

from __future__ import annotations

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import task
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from gateway import testing
from gateway.checkers.hashing import HashPool
from gateway.checkers.throttle import Throttle
from gateway.errors import PoolFull, Throttled
from gateway.ratelog import LogRateLimiter
from gateway.realm import Realm, login, make_portal
from tests.support import FixedChecker


class LogRateLimiterTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.limiter = LogRateLimiter(self.clock, interval=60, max_keys=3)

    def test_one_line_per_interval_with_count(self):
        self.assertEqual(self.limiter.admit("a"), 0)
        for _ in range(5):
            self.clock.advance(10)
            self.assertIsNone(self.limiter.admit("a"))
        self.assertEqual(self.limiter.admit("b"), 0)  # keys are independent
        self.clock.advance(10)
        self.assertEqual(self.limiter.admit("a"), 5)
        self.assertIsNone(self.limiter.admit("a"))

    def test_bounded(self):
        for i in range(100):
            self.limiter.admit(i)
        self.assertEqual(len(self.limiter._keys), 3)
        self.assertEqual(self.limiter.admit(0), 0)  # forgotten: logged again

    def test_warn(self):
        events = []
        log = Logger(observer=events.append)
        for _ in range(4):
            self.limiter.warn(log, "k", "refused {who}", who="x")
        self.clock.advance(60)
        self.limiter.warn(log, "k", "refused {who}", who="x")
        self.assertEqual([formatEvent(e) for e in events],
                         ["refused x", "refused x (3 more like it not logged)"])
        self.assertEqual([e["suppressed"] for e in events], [0, 3])

    def test_bad_limits(self):
        self.assertRaises(ValueError, LogRateLimiter, self.clock, interval=-1)
        self.assertRaises(ValueError, LogRateLimiter, self.clock, max_keys=0)


class LoginFloodTests(SynchronousTestCase):
    """C{login()}: one event per attempt, except for a flood of refusals."""

    def setUp(self):
        self.events = []
        self.log = Logger(observer=self.events.append)
        self.clock = task.Clock()

    def test_throttled_flood_logs_a_handful(self):
        """2,000 throttled attempts from one peer over 250 s: a few lines that count the rest."""
        throttle = Throttle(self.clock, max_failures=1, window=600, delay=0, max_delay=0)
        portal = make_portal(Realm(), [FixedChecker(UnauthorizedLogin())], throttle)
        creds = testing.sasl_plain("daniel", "lion", peer="192.0.2.1")
        self.failureResultOf(login(portal, creds, log=self.log), UnauthorizedLogin)
        for _ in range(2000):
            self.failureResultOf(login(portal, creds, log=self.log), Throttled)
            self.clock.advance(0.125)
        throttled = [e for e in self.events if e["outcome"] == "throttled"]
        self.assertEqual(len(throttled), 5)  # t=0, 60, 120, 180, 240
        self.assertEqual([e["suppressed"] for e in throttled], [0] + [479] * 4)
        self.assertIn("479 more like it not logged", formatEvent(throttled[1]))
        self.assertEqual([e["outcome"] for e in self.events].count("failure"), 1)
        # Another peer's refusals are logged on their own.
        before = len(self.events)
        for _ in range(3):
            self.failureResultOf(login(portal, testing.sasl_plain(
                "bob", "x", peer="198.51.100.7"), log=self.log), Throttled, UnauthorizedLogin)
        self.assertEqual([(e["peer_address"], e["outcome"]) for e in self.events[before:]],
                         [("198.51.100.7", "failure"), ("198.51.100.7", "throttled")])

    def test_failures_still_logged_each(self):
        portal = make_portal(Realm(), [FixedChecker(UnauthorizedLogin())])
        for _ in range(50):
            creds = testing.sasl_plain("daniel", "lion", peer="192.0.2.1")
            self.failureResultOf(login(portal, creds, log=self.log), UnauthorizedLogin)
        self.assertEqual(len(self.events), 50)

    def test_pool_full_flood(self):
        """A full hash queue under a flood: one line a minute, counting the rest."""
        pool = HashPool(self.clock, threads=1, max_pending=1)
        pool.run(lambda: None)  # never started: the one slot stays taken
        marks = [self.failureResultOf(pool.run(lambda: None), PoolFull).value.log_suppressed
                 for _ in range(101)]
        self.assertEqual(marks, [0] + [None] * 100)
        self.clock.advance(60)
        self.assertEqual(self.failureResultOf(pool.run(lambda: None)).value.log_suppressed, 100)

    def test_pool_full_event(self):
        """login() leaves out the refusals the pool marked, and counts them in the next line."""

        class Full:
            credentialInterfaces = FixedChecker(None).credentialInterfaces

            def __init__(self, pool):
                self.pool = pool

            def requestAvatarId(self, credentials):
                return self.pool.run(lambda: "daniel")

        pool = HashPool(self.clock, threads=1, max_pending=1)
        pool.run(lambda: None)
        portal = make_portal(Realm(), [Full(pool)])
        for i in range(30):
            creds = testing.sasl_plain("daniel", "tiger", peer=f"10.0.0.{i}")
            self.failureResultOf(login(portal, creds, log=self.log), PoolFull)
        self.clock.advance(60)
        self.failureResultOf(login(portal, creds, log=self.log), PoolFull)
        self.assertEqual([(e["outcome"], e["suppressed"]) for e in self.events],
                         [("temporary", 0), ("temporary", 29)])

