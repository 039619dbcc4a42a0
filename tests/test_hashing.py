"""
Tests for L{gateway.checkers.hashing}: the bounded hash pool and the
verification cache with coalescing.
"""

from __future__ import annotations

import threading

from twisted.internet import defer, reactor, task, threads
from twisted.internet.task import deferLater
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase

from gateway.checkers.hashing import Attempt, HashPool, Verifier, current_attempt
from gateway.errors import PoolFull, ShuttingDown, TemporaryFailure
from tests.support import ManualPool


def plain_verify(password, stored):
    return password == stored


class HashPoolTests(TestCase):
    def test_runs_off_the_reactor_thread(self):
        pool = HashPool(reactor, threads=2, max_pending=4)
        pool.startService()
        self.addCleanup(pool.stopService)
        d = pool.run(lambda: threading.current_thread() is threading.main_thread())
        d.addCallback(self.assertFalse)
        return d

    @defer.inlineCallbacks
    def test_full_is_a_temporary_failure(self):
        """Past max_pending, run() fails at once; queued jobs still finish."""
        pool = HashPool(reactor, threads=1, max_pending=2)
        first, second = pool.run(lambda: 1), pool.run(lambda: 2)  # not started: both wait
        self.assertEqual(pool.pending, 2)
        full = self.failureResultOf(pool.run(lambda: 3), PoolFull)
        self.assertIsInstance(full.value, TemporaryFailure)
        pool.startService()
        self.addCleanup(pool.stopService)
        self.assertEqual((yield first), 1)
        self.assertEqual((yield second), 2)
        self.assertEqual(pool.pending, 0)
        self.assertEqual((yield pool.run(lambda: 4)), 4)

    @defer.inlineCallbacks
    def test_errors_release_the_slot(self):
        pool = HashPool(reactor, threads=1, max_pending=1)
        pool.startService()
        self.addCleanup(pool.stopService)
        yield self.assertFailure(pool.run(lambda: 1 / 0), ZeroDivisionError)
        self.assertEqual(pool.pending, 0)

    def test_queueing_error_releases_everything(self):
        """
        A job the thread pool refused to take (an error raised while queueing
        it) fails its caller and gives back its place, its peer's and its
        network's: no count leaks.
        """

        class Broken(ThreadPool):
            def callInThreadWithCallback(self, *args, **kwargs):
                raise RecursionError("deep")

        pool = HashPool(reactor, threads=1, max_pending=1, threadpool=Broken())
        attempt = Attempt("192.0.2.1")
        token = current_attempt.set(attempt)
        try:
            d = pool.run(lambda: 1)
        finally:
            current_attempt.reset(token)
        self.failureResultOf(d, RecursionError)
        self.assertEqual(pool.pending, 0)
        self.assertEqual((dict(pool._by_peer), dict(pool._by_network)), ({}, {}))
        self.assertEqual(attempt.running, 0)

    @defer.inlineCallbacks
    def test_cancel_keeps_the_slot_until_done(self):
        """A caller that leaves gets CancelledError at once; the running hash keeps its slot."""
        pool = HashPool(reactor, threads=1, max_pending=2)
        pool.startService()
        self.addCleanup(pool.stopService)
        started, release = threading.Event(), threading.Event()
        ran = []

        def slow():
            started.set()
            release.wait(10)
            return "slow"

        running = pool.run(slow)
        queued = pool.run(ran.append, "queued")
        yield threads.deferToThread(started.wait, 10)
        running.cancel()
        queued.cancel()
        self.failureResultOf(running, defer.CancelledError)
        self.failureResultOf(queued, defer.CancelledError)
        self.assertEqual(pool.pending, 2)  # both still owned by the pool
        self.failureResultOf(pool.run(lambda: 3), PoolFull)
        release.set()
        while pool.pending:
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(ran, [])  # the queued job was dropped, never run

    @defer.inlineCallbacks
    def test_stop_drops_queued_jobs(self):
        """Stopping waits for the running hash only; queued ones fail, unrun."""
        pool = HashPool(reactor, threads=1, max_pending=10)
        pool.startService()
        started, release = threading.Event(), threading.Event()
        ran = []

        def slow():
            started.set()
            release.wait(10)
            return "first"

        first = pool.run(slow)
        queued = [pool.run(ran.append, i) for i in range(5)]
        self.assertTrue(started.wait(10))
        threading.Timer(0.05, release.set).start()
        pool.stopService()
        self.assertEqual((yield first), "first")
        for d in queued:
            yield self.assertFailure(d, ShuttingDown)
        self.assertEqual(ran, [])
        self.failureResultOf(pool.run(ran.append, 9), ShuttingDown)

    def test_given_pool(self):
        given = ThreadPool()
        pool = HashPool(reactor, max_pending=3, threadpool=given)
        self.assertIs(pool.threadpool, given)
        self.assertFalse(pool._own)  # never started or stopped by us
        self.assertIs(pool.loader, pool.threadpool)  # reloads run there too

    def test_stop_stops_threads(self):
        pool = HashPool(reactor, threads=1)
        pool.startService()
        self.assertTrue(pool.threadpool.started)
        pool.stopService()
        self.assertFalse(pool.threadpool.started)

    def test_bad_limits(self):
        self.assertRaises(ValueError, HashPool, reactor, threads=0)
        self.assertRaises(ValueError, HashPool, reactor, max_pending=0)

    @defer.inlineCallbacks
    def test_load_while_hash_queue_full(self):
        """L{HashPool.load}: the reload thread, outside the hash queue's bound."""
        pool = HashPool(reactor, threads=1, max_pending=1)
        pool.startService()
        self.addCleanup(pool.stopService)
        release = threading.Event()
        self.addCleanup(release.set)
        busy = pool.run(release.wait, 30)
        self.failureResultOf(pool.run(int), PoolFull)
        names = yield pool.load(lambda: threading.current_thread().name)
        self.assertIn("authgateway-load", names)
        self.assertEqual(pool.pending, 1)  # the load took no slot
        release.set()
        yield busy

    def test_stopped_pool_refuses_loads(self):
        pool = HashPool(task.Clock(), threads=1)
        pool.startService()
        self.assertTrue(pool.loader.started)
        pool.stopService()
        self.assertFalse(pool.loader.started)
        self.failureResultOf(pool.load(int), ShuttingDown)


class VerifierTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.pool = ManualPool()
        self.verifier = Verifier(plain_verify, self.pool, self.clock, ttl=300, max_entries=3)

    def verify(self, user="daniel", password="tiger", stored="tiger"):
        return self.verifier.verify(user, password, stored)

    def test_success_cached(self):
        d = self.verify()
        self.assertNoResult(d)
        self.pool.finish_all()
        self.assertIs(self.successResultOf(d), True)
        self.assertIs(self.successResultOf(self.verify()), True)
        self.assertEqual((self.verifier.misses, self.verifier.hits), (1, 1))
        self.assertEqual(self.pool.jobs, [])

    def test_failure_not_cached(self):
        for _ in range(2):
            d = self.verify(password="lion")
            self.pool.finish_all()
            self.assertIs(self.successResultOf(d), False)
        self.assertEqual((self.verifier.misses, self.verifier.hits), (2, 0))

    def test_errors_not_cached(self):
        d = self.verify()
        _, _, job = self.pool.jobs.pop()
        job.errback(PoolFull())
        self.failureResultOf(d, PoolFull)
        self.verify()
        self.assertEqual(len(self.pool.jobs), 1)

    def test_ttl(self):
        self.verify()
        self.pool.finish_all()
        self.clock.advance(299)
        self.successResultOf(self.verify())
        self.clock.advance(1)
        self.assertNoResult(self.verify())
        self.assertEqual(len(self.pool.jobs), 1)

    def test_new_hash_invalidates(self):
        """A password change stores a new hash: the old entry cannot match."""
        self.verify(stored="tiger")
        self.pool.finish_all()
        self.assertNoResult(self.verify(stored="tiger-rehashed"))

    def test_lru_bound(self):
        for user in "abcd":
            self.verify(user=user)
        self.pool.finish_all()
        self.successResultOf(self.verify(user="d"))
        self.assertNoResult(self.verify(user="a"))  # evicted: oldest of four in three slots

    def test_lru_refreshes_on_hit(self):
        for user in "abc":
            self.verify(user=user)
        self.pool.finish_all()
        self.successResultOf(self.verify(user="a"))
        self.verify(user="d")
        self.pool.finish_all()
        self.successResultOf(self.verify(user="a"))
        self.assertNoResult(self.verify(user="b"))

    def test_key_unambiguous(self):
        """Shifting characters between user, password and hash never hits another entry."""
        self.verifier.verify("ab", "c", "c")
        self.pool.finish_all()
        for user, password, stored in [("a", "bc", "c"), ("abc", "", "c"), ("ab", "cc", "")]:
            self.assertNoResult(self.verifier.verify(user, password, stored))
        self.assertEqual(self.verifier.hits, 0)

    def test_coalescing(self):
        """Identical concurrent checks share one job; different ones do not."""
        a, b = self.verify(), self.verify()
        other = self.verify(password="lion")
        self.assertEqual(len(self.pool.jobs), 2)
        self.assertEqual(self.verifier.coalesced, 1)
        self.pool.finish_all()
        self.assertEqual(
            [self.successResultOf(a), self.successResultOf(b), self.successResultOf(other)],
            [True, True, False],
        )

    def test_coalesced_failure_reaches_everyone(self):
        a, b = self.verify(), self.verify()
        _, _, job = self.pool.jobs.pop()
        job.errback(ZeroDivisionError())
        self.failureResultOf(a, ZeroDivisionError)
        self.failureResultOf(b, ZeroDivisionError)

    def test_cancel_one_waiter(self):
        """One caller going away does not cancel the shared verification."""
        a, b = self.verify(), self.verify()
        a.cancel()
        self.failureResultOf(a, defer.CancelledError)
        self.pool.finish_all()
        self.assertIs(self.successResultOf(b), True)
        self.successResultOf(self.verify())  # and the success was cached

    def test_repr_has_no_secret(self):
        self.verify()
        self.assertNotIn("tiger", repr(self.verifier))

    def test_inline_default(self):
        verifier = Verifier(plain_verify)
        self.assertIs(self.successResultOf(verifier.verify("u", "p", "p")), True)
        self.assertIs(self.successResultOf(verifier.verify("u", "p", "p")), True)
        self.assertEqual(verifier.hits, 1)
