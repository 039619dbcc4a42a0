"""
Tests for L{gateway.checkers.throttle}: failure throttling in front of the checkers.
"""

from __future__ import annotations

from twisted.cred.checkers import (
    ICredentialsChecker,
    InMemoryUsernamePasswordDatabaseDontUse,
)
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from gateway import testing
from gateway.checkers.throttle import Throttle, ThrottlingChecker
from gateway.errors import TemporaryFailure, Throttled
from tests.support import FixedChecker


class ThrottleTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.throttle = Throttle(
            self.clock, max_failures=3, max_peer_failures=5, max_user_failures=6,
            window=60, delay=0.5, max_delay=3,
        )

    def test_defaults_are_the_class_attributes(self):
        throttle = Throttle(self.clock)
        for name in ("max_failures", "max_peer_failures", "max_user_failures", "window",
                     "delay", "max_delay", "max_keys"):
            self.assertEqual(getattr(throttle, name), getattr(Throttle, name))
        self.assertGreater(Throttle.max_user_failures, Throttle.max_peer_failures)
        self.assertGreater(Throttle.max_peer_failures, Throttle.max_failures)

    def test_pair_window(self):
        for _ in range(3):
            self.throttle.check("192.0.2.1", "daniel")
            self.clock.advance(10)
            self.throttle.failed("192.0.2.1", "daniel")
        e = self.assertRaises(Throttled, self.throttle.check, "192.0.2.1", "Daniel")
        self.assertEqual(e.retry_after, 40)  # first failure at t=10 leaves at t=70; now t=30
        self.assertIsInstance(e, TemporaryFailure)
        self.clock.advance(39.9)
        self.assertRaises(Throttled, self.throttle.check, "192.0.2.1", "daniel")
        self.clock.advance(0.1)
        self.assertEqual(self.throttle.check("192.0.2.1", "daniel"), 0)  # 2 left in the window

    def test_no_lockout_from_elsewhere(self):
        """A guesser locks out only itself: the user from another peer, the peer for others, pass."""
        for _ in range(3):
            self.throttle.failed("192.0.2.1", "daniel")
        self.assertRaises(Throttled, self.throttle.check, "192.0.2.1", "daniel")
        self.assertEqual(self.throttle.check("198.51.100.7", "daniel"), 0)
        self.assertEqual(self.throttle.check("2001:db8::1", "DANIEL"), 0)
        self.assertEqual(self.throttle.check("192.0.2.1", "bob"), 0)  # peer: 3 of 5

    def test_peer_window(self):
        """Spraying many users from one peer: the peer is refused for everyone and tokens."""
        for i in range(5):
            self.throttle.failed("192.0.2.1", f"user{i}")
        for user in ("someone-else", None):
            e = self.assertRaises(Throttled, self.throttle.check, "192.0.2.1", user)
            self.assertEqual(e.retry_after, 60)
        self.assertEqual(self.throttle.check("192.0.2.2", "user0"), 0)

    def test_ipv6_by_64(self):
        for i in range(5):
            self.throttle.failed(f"2001:db8::{i + 1}", None)
        self.assertRaises(Throttled, self.throttle.check, "2001:db8::ffff", None)
        self.throttle.check("2001:db8:0:1::1", None)
        for i in range(3):
            self.throttle.failed(f"2001:db8:0:2::{i + 1}", "daniel")
        self.assertRaises(Throttled, self.throttle.check, "2001:db8:0:2::ffff", "daniel")

    def test_user_ceiling_delays_never_refuses(self):
        """Distributed guessing of one user: past the ceiling every attempt waits, longer and longer."""
        waits = []
        for i in range(12):
            waits.append(self.throttle.check(f"10.0.0.{i}", "daniel"))
            self.throttle.failed(f"10.0.0.{i}", "daniel")
        self.assertEqual(waits, [0] * 6 + [0.5, 1, 2, 3, 3, 3])
        self.assertEqual(self.throttle.check("198.51.100.7", "daniel"), 3)  # a clean peer waits
        self.assertEqual(self.throttle.check("198.51.100.7", "bob"), 0)  # others do not
        self.clock.advance(60)
        self.assertEqual(self.throttle.check("198.51.100.7", "daniel"), 0)

    def test_known_device_not_delayed(self):
        self.throttle.succeeded("192.0.2.1", "daniel")
        for i in range(8):
            self.throttle.failed(f"10.0.0.{i}", "daniel")
        self.assertEqual(self.throttle.check("192.0.2.1", "Daniel"), 0)
        self.assertGreater(self.throttle.check("192.0.2.2", "daniel"), 0)  # not its device
        self.assertGreater(self.throttle.check("10.0.0.1", "daniel"), 0)
        self.clock.advance(Throttle.known_for - 30)  # still known; the failures are gone
        for i in range(8):
            self.throttle.failed(f"10.0.1.{i}", "daniel")
        self.assertEqual(self.throttle.check("192.0.2.1", "daniel"), 0)
        self.clock.advance(30)
        self.assertGreater(self.throttle.check("192.0.2.1", "daniel"), 0)  # forgotten

    def test_delay_follows_own_count(self):
        """The answer to a failure waits by the peer's or the pair's count, the larger."""
        self.assertEqual(self.throttle.failed("192.0.2.1", "daniel"), 0.5)
        self.assertEqual(self.throttle.failed("192.0.2.1", "bob"), 1)
        self.assertEqual(self.throttle.failed("192.0.2.1", "carol"), 2)
        self.assertEqual(self.throttle.failed("192.0.2.9", "daniel"), 0.5)

    def test_delays_double_and_cap(self):
        throttle = Throttle(self.clock, max_failures=10, delay=0.5, max_delay=15)
        delays = [throttle.failed("192.0.2.1", None) for _ in range(8)]
        self.assertEqual(delays, [0.5, 1, 2, 4, 8, 15, 15, 15])

    def test_success_forgives_own_pair_only(self):
        """
        A success forgives its own pair; the peer's count keeps every failure
        (core review 2 finding 1: forgiving it let wrong x4 + right cycle).
        """
        for _ in range(2):
            self.throttle.failed("192.0.2.1", "daniel")
            self.throttle.failed("192.0.2.1", "bob")
        self.throttle.failed("192.0.2.1", "bob")
        self.assertRaises(Throttled, self.throttle.check, "192.0.2.1", "carol")  # peer 5 of 5
        self.throttle.succeeded("192.0.2.1", "DANIEL")
        self.assertRaises(Throttled, self.throttle.check, "192.0.2.1", "carol")  # peer still 5
        self.clock.advance(61)
        self.throttle.check("192.0.2.1", "carol")
        self.throttle.check("192.0.2.1", "daniel")

    def test_success_keeps_peer_count(self):
        """wrong x4 + right from an account of one's own does not cycle: the peer is refused."""
        throttle = Throttle(self.clock, max_failures=5, max_peer_failures=10)
        refused = 0
        for _ in range(5):
            try:
                for _ in range(4):
                    throttle.check("192.0.2.1", "mallory")
                    throttle.failed("192.0.2.1", "mallory")
                throttle.check("192.0.2.1", "mallory")
                throttle.succeeded("192.0.2.1", "mallory")
            except Throttled:
                refused += 1
        self.assertEqual(refused, 3)

    def test_failure_ends_known_device(self):
        """A known device's first failure makes it a stranger until its next success."""
        self.throttle.succeeded("192.0.2.1", "daniel")
        self.assertTrue(self.throttle.is_known("192.0.2.1", "daniel"))
        self.assertIsNotNone(self.throttle.known_keys("192.0.2.1", "daniel"))
        self.throttle.failed("192.0.2.1", "daniel", across_peers=False)
        self.assertFalse(self.throttle.is_known("192.0.2.1", "daniel"))
        self.assertIsNone(self.throttle.known_keys("192.0.2.1", "daniel"))
        self.throttle.succeeded("192.0.2.1", "daniel")
        self.assertTrue(self.throttle.is_known("192.0.2.1", "daniel"))

    def test_success_keeps_user_count(self):
        """The real user logging in does not reset the ceiling for the guessers."""
        for i in range(7):
            self.throttle.failed(f"10.0.0.{i}", "daniel")
        self.throttle.succeeded("192.0.2.1", "daniel")
        self.assertEqual(self.throttle.check("10.0.0.99", "daniel"), 1)

    def test_others_in_flight_do_not_refuse(self):
        """Attempts in flight count against their own peer and pair, never the user."""
        for i in range(20):
            self.throttle.reserve(f"10.0.0.{i}", "daniel")
        self.assertEqual(self.throttle.check("198.51.100.7", "daniel"), 0)
        for _ in range(3):
            self.throttle.reserve("192.0.2.1", "daniel")
        e = self.assertRaises(Throttled, self.throttle.check, "192.0.2.1", "daniel")
        self.assertEqual(e.retry_after, 1)
        self.throttle.check("192.0.2.1", "bob")  # peer: 3 of 5 in flight
        for _ in range(2):
            self.throttle.reserve("192.0.2.1", "bob")
        self.assertRaises(Throttled, self.throttle.check, "192.0.2.1", "carol")
        for i in range(20):
            self.throttle.release(f"10.0.0.{i}", "daniel")
        for _ in range(3):
            self.throttle.release("192.0.2.1", "daniel")
        for _ in range(2):
            self.throttle.release("192.0.2.1", "bob")
        self.assertEqual(self.throttle._inflight, {})

    def test_bounded_keys(self):
        throttle = Throttle(self.clock, max_failures=1, max_peer_failures=1, max_keys=10)
        for i in range(100):
            throttle.failed(f"10.0.0.{i}", None)
            throttle.succeeded(f"10.0.0.{i}", "daniel")
        self.assertEqual(len(throttle._windows), 10)
        self.assertEqual(len(throttle._known), 10)
        throttle.check("10.0.0.0", None)  # forgotten
        self.assertRaises(Throttled, throttle.check, "10.0.0.99", None)

    def test_user_keys_are_digests(self):
        """User names are not kept: the keys are fixed-size keyed digests."""
        keys = Throttle.keys_for("192.0.2.1", "x" * 1000)
        self.assertEqual([kind for kind, _ in keys], ["peer", "pair", "user"])
        for _, key in keys[1:]:
            self.assertEqual(len(key), 16)
        self.throttle.failed("192.0.2.1", "secret-user-name")
        self.throttle.succeeded("192.0.2.1", "secret-user-name")
        self.assertNotIn("secret-user-name", repr(self.throttle.__dict__))

    def test_spellings_of_one_user_count_together(self):
        """Case, Unicode forms and spaces do not give a guesser more attempts."""
        spellings = ["Jürgen", "ju\u0308rgen", "JÜRGEN", "\uff2a\u00fcrgen", " jürgen "]
        keys = {Throttle.keys_for("192.0.2.1", name) for name in spellings}
        self.assertEqual(len(keys), 1)
        for name in spellings[:3]:
            self.throttle.failed("192.0.2.1", name)
        self.assertRaises(Throttled, self.throttle.check, "192.0.2.1", spellings[3])
        self.assertNotEqual(Throttle.keys_for("192.0.2.1", "jurgen"), keys.pop())

    def test_no_peer(self):
        """Without a peer address (a UNIX socket) all clients are one peer for a user."""
        for _ in range(3):
            self.throttle.failed(None, "daniel")
        self.assertRaises(Throttled, self.throttle.check, None, "daniel")
        self.assertEqual(self.throttle.check("192.0.2.1", "daniel"), 0)

    def test_zero_delay(self):
        throttle = Throttle(self.clock, delay=0, max_delay=0, max_user_failures=1)
        self.assertEqual(throttle.failed("192.0.2.1", "daniel"), 0)
        self.assertEqual(throttle.check("192.0.2.2", "daniel"), 0)

    def test_bad_limits(self):
        for kw in ({"max_failures": 0}, {"window": 0}, {"delay": -1}, {"delay": 2, "max_delay": 1},
                   {"max_peer_failures": 0}, {"max_user_failures": 0}, {"max_keys": 0}):
            self.assertRaises(ValueError, Throttle, self.clock, **kw)


class ThrottlingCheckerTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.throttle = Throttle(
            self.clock, max_failures=2, max_peer_failures=4, max_user_failures=3,
            window=60, delay=0.5, max_delay=15,
        )

    def checker(self, outcome):
        inner = FixedChecker(outcome)
        return inner, ThrottlingChecker(inner, self.throttle)

    def creds(self, user="daniel", peer="192.0.2.1", password="tiger"):
        return testing.sasl_plain(user, password, peer=peer)

    def passwords(self):
        db = InMemoryUsernamePasswordDatabaseDontUse()
        db.addUser("daniel", "tiger")  # str keys, as --auth memory: stores them
        db.addUser("bob", "cat")
        return ThrottlingChecker(db, self.throttle)

    def guessed(self, checker, n=3):
        """Wrong passwords for daniel from C{n} peers: the user reaches its ceiling."""
        for i in range(n):
            d = checker.requestAvatarId(self.creds(peer=f"10.0.0.{i}", password="lion"))
            self.clock.advance(15)
            self.failureResultOf(d, UnauthorizedLogin)

    def test_interface(self):
        _, checker = self.checker("daniel")
        verifyObject(ICredentialsChecker, checker)
        self.assertEqual(checker.credentialInterfaces, (IUsernamePassword,))

    def test_success_not_delayed(self):
        _, checker = self.checker("daniel")
        self.assertEqual(self.successResultOf(checker.requestAvatarId(self.creds())), "daniel")

    def test_failure_delayed_then_refused(self):
        inner, checker = self.checker(UnauthorizedLogin())
        d = checker.requestAvatarId(self.creds())
        self.assertNoResult(d)
        self.clock.advance(0.5)
        self.failureResultOf(d, UnauthorizedLogin)
        d = checker.requestAvatarId(self.creds())
        self.clock.advance(0.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.failureResultOf(d, UnauthorizedLogin)
        # Third attempt from that peer: refused before the checker (and any hashing) runs.
        f = self.failureResultOf(checker.requestAvatarId(self.creds()), Throttled)
        self.assertEqual(inner.calls, 2)
        self.assertGreater(f.value.retry_after, 58)

    def test_guesser_cannot_lock_out_the_user(self):
        """Wrong passwords for daniel from one peer; his right one from another gets in at once."""
        checker = self.passwords()
        for _ in range(2):
            d = checker.requestAvatarId(self.creds(password="lion"))
            self.clock.advance(15)
            self.failureResultOf(d, UnauthorizedLogin)
        self.failureResultOf(checker.requestAvatarId(self.creds()), Throttled)  # its own peer
        d = checker.requestAvatarId(self.creds(peer="198.51.100.7"))
        self.assertEqual(self.successResultOf(d), "daniel")

    def test_distributed_guessing_waits(self):
        """Past the user's ceiling every attempt waits before it is checked, right password too."""
        checker = self.passwords()
        self.guessed(checker)
        d = checker.requestAvatarId(self.creds(peer="10.0.0.99", password="lion"))
        self.clock.advance(0.4)
        self.assertNoResult(d)
        self.clock.advance(0.1)  # waited 0.5 s, then 0.5 s more for its failure
        self.assertNoResult(d)
        self.clock.advance(0.5)
        self.failureResultOf(d, UnauthorizedLogin)
        d = checker.requestAvatarId(self.creds(peer="198.51.100.7"))  # the right password, clean peer
        self.clock.advance(0.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertEqual(self.successResultOf(d), "daniel")
        # Now a known device: no wait from there; other users never wait.
        self.assertEqual(self.successResultOf(checker.requestAvatarId(self.creds(peer="198.51.100.7"))),
                         "daniel")
        self.assertEqual(self.successResultOf(
            checker.requestAvatarId(self.creds("bob", "10.0.0.99", "cat"))), "bob")
        self.assertEqual(self.throttle._inflight, {})

    def test_waiting_attempt_not_checked_until_its_time(self):
        inner, checker = self.checker(UnauthorizedLogin())
        self.guessed(checker)
        calls = inner.calls
        d = checker.requestAvatarId(self.creds(peer="10.0.0.99"))
        self.assertEqual(inner.calls, calls)  # no hashing while it waits
        self.clock.advance(1)
        self.assertEqual(inner.calls, calls + 1)
        self.clock.advance(15)
        self.failureResultOf(d, UnauthorizedLogin)

    def test_waiting_attempt_cancellable(self):
        _, checker = self.checker(UnauthorizedLogin())
        self.guessed(checker)
        d = checker.requestAvatarId(self.creds(peer="10.0.0.99"))
        self.assertNotEqual(self.throttle._inflight, {})
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.throttle._inflight, {})

    def test_cancelled_attempts_count_for_peer_and_pair(self):
        """
        An attempt its client abandons (during the ceiling's wait or during
        the check) is a failure for its peer and pair: hanging up is no free
        retry. It does not count for the user across peers.
        """
        pending = []

        class Slow(FixedChecker):
            def requestAvatarId(self, credentials):
                return defer.Deferred(canceller=pending.append)

        checker = ThrottlingChecker(Slow("daniel"), self.throttle)
        for peer in ("192.0.2.1", "192.0.2.2"):
            for _ in range(self.throttle.max_failures):
                d = checker.requestAvatarId(self.creds(peer=peer))
                d.cancel()
                self.failureResultOf(d, defer.CancelledError)
            self.failureResultOf(checker.requestAvatarId(self.creds(peer=peer)), Throttled)
        # Four abandoned attempts for daniel, above his ceiling of 3 if they
        # counted for him: a clean peer is neither refused nor held back.
        inner, checker = self.checker("daniel")
        self.assertEqual(self.successResultOf(checker.requestAvatarId(self.creds(peer="198.51.100.7"))),
                         "daniel")

    def test_cancelled_during_the_failure_delay_counts_once(self):
        """A failure already counted is not counted again when its client leaves during the delay."""
        _, checker = self.checker(UnauthorizedLogin())
        d = checker.requestAvatarId(self.creds())
        self.assertNoResult(d)  # counted, waiting out its delay
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        d = checker.requestAvatarId(self.creds())  # the pair's second failure: not refused yet
        self.clock.advance(15)
        self.failureResultOf(d, UnauthorizedLogin)
        self.failureResultOf(checker.requestAvatarId(self.creds()), Throttled)

    def test_cancelled_during_the_ceiling_wait_counts(self):
        _, checker = self.checker(UnauthorizedLogin())
        self.guessed(checker)
        for _ in range(self.throttle.max_failures):
            d = checker.requestAvatarId(self.creds(peer="10.0.0.99"))
            d.cancel()
            self.failureResultOf(d, defer.CancelledError)
        self.failureResultOf(checker.requestAvatarId(self.creds(peer="10.0.0.99")), Throttled)

    def test_waiting_attempts_count_against_their_peer(self):
        """A guesser cannot pile up waiting attempts: they are in flight for its peer and pair."""
        _, checker = self.checker(UnauthorizedLogin())
        self.guessed(checker)
        waiting = [checker.requestAvatarId(self.creds(peer="10.0.0.99")) for _ in range(2)]
        self.failureResultOf(checker.requestAvatarId(self.creds(peer="10.0.0.99")), Throttled)
        for d in waiting:
            self.assertNoResult(d)
            d.cancel()
            self.failureResultOf(d, defer.CancelledError)

    def test_concurrent_attempts_count(self):
        """Guesses in flight count against their peer: no racing past the throttle."""
        pending = []

        @implementer(ICredentialsChecker)
        class Slow:
            credentialInterfaces = (IUsernamePassword,)

            def requestAvatarId(self, credentials):
                pending.append(defer.Deferred())
                return pending[-1]

        checker = ThrottlingChecker(Slow(), self.throttle)
        attempts = [checker.requestAvatarId(self.creds(user=f"u{i}")) for i in range(6)]
        self.assertEqual(len(pending), 4)  # max_peer_failures=4: the rest refused at once
        for d in attempts[4:]:
            self.assertLessEqual(self.failureResultOf(d, Throttled).value.retry_after, 1)
        # Another peer is not held up by them.
        elsewhere = checker.requestAvatarId(self.creds(user="u0", peer="198.51.100.7"))
        self.assertEqual(len(pending), 5)
        for d in pending:
            d.errback(UnauthorizedLogin())
        self.clock.advance(15)
        for d in attempts[:4] + [elsewhere]:
            self.failureResultOf(d, UnauthorizedLogin)
        self.failureResultOf(checker.requestAvatarId(self.creds(user="other")), Throttled)
        self.assertEqual(self.throttle._inflight, {})

    def test_success_releases_slot(self):
        _, checker = self.checker("daniel")
        for _ in range(5):
            self.successResultOf(checker.requestAvatarId(self.creds()))
        self.assertEqual(self.throttle._inflight, {})

    def test_delayed_failure_cancellable(self):
        _, checker = self.checker(UnauthorizedLogin())
        d = checker.requestAvatarId(self.creds())
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_outage_not_counted(self):
        inner, checker = self.checker(ZeroDivisionError())
        for _ in range(3):
            self.failureResultOf(checker.requestAvatarId(self.creds()), ZeroDivisionError)
        self.assertEqual(inner.calls, 3)

    def test_tokens_throttled_by_peer(self):
        _, checker = self.checker(UnauthorizedLogin())
        for _ in range(4):
            d = checker.requestAvatarId(testing.bearer("nope", peer="192.0.2.1"))
            self.clock.advance(4)
            self.failureResultOf(d, UnauthorizedLogin)
        self.failureResultOf(
            checker.requestAvatarId(testing.bearer("nope", peer="192.0.2.1")), Throttled
        )
