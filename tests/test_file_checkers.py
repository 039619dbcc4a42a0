"""
Tests for the file-backed checkers: C{--auth htpasswd:PATH} and
C{--auth tokens:PATH}, with reloading, the dummy-hash path and the plugins.
"""

from __future__ import annotations

import os
import threading
from collections import Counter

from twisted.cred import strcred
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from gateway import testing
from gateway.checkers import files, hashes
from gateway.checkers.files import IReloadable, StoreError, WatchedFile, atomic_write
from gateway.checkers.hashing import HashPool, IHashingChecker, InlinePool, Verifier
from gateway.checkers.htpasswd import HtpasswdChecker, add_user, delete_user
from gateway.checkers.tokens import TokenChecker, add_token, revoke
from gateway.errors import PoolFull, ShuttingDown
from tests.support import ManualPool

# Cheap hashes keep the module fast; bcrypt cost 4 is the minimum.
DANIEL = hashes.make_hash("tiger", "bcrypt", cost=4)
BOB = hashes.make_hash("secret", "bcrypt", cost=4)


def inline():
    return Verifier(hashes.verify, InlinePool())


class RecordingPool:
    """Runs jobs inline and remembers which stored hash each verification used."""

    def __init__(self):
        self.stored = []

    def run(self, f, *args):
        self.stored.append(args[1])  # Verifier's job: (password, stored, decoys)
        return defer.maybeDeferred(f, *args)


class LateLoader:
    """A loader that reads at once but answers when the test says so."""

    def __init__(self):
        self.jobs = []

    def __call__(self, f, *args):
        d = defer.Deferred()
        try:
            result = f(*args)
        except Exception:
            result = Failure()
        self.jobs.append((result, d))
        return d

    def finish_all(self):
        jobs, self.jobs = self.jobs, []
        for result, d in jobs:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)


class WatchedFileTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.path = self.mktemp()
        atomic_write(self.path, "one\n")
        self.parsed = []

    def parse(self, text, path):
        self.parsed.append(text)
        return text.strip()

    def watched(self, loader=None):
        return WatchedFile(self.path, self.parse, loader=loader,
                           clock=self.clock if loader else None)

    def test_change_seen_by_the_next_call(self):
        """No interval: the very next call after a rewrite answers from the new file."""
        watched = self.watched()
        atomic_write(self.path, "two\n")
        self.assertEqual(self.successResultOf(watched.current()), "two")
        self.assertEqual(self.successResultOf(watched.current()), "two")
        self.assertEqual(len(self.parsed), 2)  # unchanged: not parsed again

    def test_same_size_in_place_change(self):
        """An in-place rewrite of the same size is seen through its mtime."""
        watched = self.watched()
        st = os.stat(self.path)
        with open(self.path, "w") as f:
            f.write("six\n")
        os.utime(self.path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        self.assertEqual(self.successResultOf(watched.current()), "six")

    def test_keeps_last_good(self):
        """A vanished or broken file keeps the last good value and is logged once."""
        watched = self.watched()
        os.unlink(self.path)
        with capturedLogs() as events:
            for _ in range(3):
                self.assertEqual(self.successResultOf(watched.current()), "one")
        self.assertEqual(len(events), 1)
        self.assertIn("cannot reload", formatEvent(events[0]))
        with open(self.path, "wb") as f:
            f.write(b"bad \xff\n")
        with capturedLogs() as events:
            self.assertEqual(self.successResultOf(watched.current()), "one")
        self.assertIn("not valid UTF-8", formatEvent(events[0]))
        atomic_write(self.path, "three\n")
        self.assertEqual(self.successResultOf(watched.current()), "three")

    def test_broken_file_not_read_on_every_call(self):
        """A file that failed to load is read again only once it changes or after a while."""
        watched = self.watched()
        reads = []
        real = files._read_bytes
        self.patch(files, "_read_bytes", lambda name: reads.append(name) or real(name))
        with open(self.path, "wb") as f:
            f.write(b"bad \xff\n")
        with capturedLogs():
            for _ in range(5):
                self.assertEqual(self.successResultOf(watched.current()), "one")
        self.assertEqual(len(reads), 1)

    def test_waits_for_the_reload(self):
        """Once a change is noticed, callers wait for the reload, and share it."""
        pool = ManualPool()
        watched = self.watched(pool.run)
        atomic_write(self.path, "two\n")
        first, second = watched.current(), watched.current()
        self.assertNoResult(first)
        self.assertNoResult(second)
        self.assertEqual(len(pool.jobs), 1)
        pool.finish_all()
        self.assertEqual(self.successResultOf(first), "two")
        self.assertEqual(self.successResultOf(second), "two")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.successResultOf(watched.current()), "two")

    def test_wait_is_bounded(self):
        """A reload slower than C{wait} answers from the old value, with one warning."""
        pool = ManualPool()
        watched = self.watched(pool.run)
        atomic_write(self.path, "two\n")
        with capturedLogs() as events:
            first, second = watched.current(), watched.current()
            self.clock.advance(watched.wait)
        self.assertEqual(self.successResultOf(first), "one")
        self.assertEqual(self.successResultOf(second), "one")
        self.assertEqual(len(events), 1)
        self.assertIn("takes longer than", formatEvent(events[0]))
        late = watched.current()
        pool.finish_all()
        self.assertEqual(self.successResultOf(late), "two")

    def test_changed_again_while_loading(self):
        """A waiter gets the file as it was when it asked, not an older read."""
        loader = LateLoader()
        watched = self.watched(loader)
        atomic_write(self.path, "two\n")
        d = watched.current()
        atomic_write(self.path, "three\n")
        loader.finish_all()  # "two", read before the second change
        self.assertNoResult(d)
        loader.finish_all()
        self.assertEqual(self.successResultOf(d), "three")

    def test_cancelled_waiter(self):
        pool = ManualPool()
        watched = self.watched(pool.run)
        atomic_write(self.path, "two\n")
        d = watched.current()
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        pool.finish_all()
        self.assertEqual(watched.value, "two")

    def test_failed_reload_answers_waiters(self):
        pool = LateLoader()
        watched = self.watched(pool)
        with open(self.path, "wb") as f:
            f.write(b"bad \xff\n")
        d = watched.current()
        with capturedLogs() as events:
            pool.finish_all()
        self.assertEqual(self.successResultOf(d), "one")
        self.assertIn("not valid UTF-8", formatEvent(events[0]))

    def test_parser_error_not_quoted(self):
        """An unexpected exception in the parser is logged by type only."""
        watched = WatchedFile(self.path, lambda text, path: text)

        def parse(text, path):
            raise ValueError(f"cannot use {text!r}")

        watched._parse = parse
        atomic_write(self.path, "secret-line\n")
        with capturedLogs() as events:
            self.assertEqual(self.successResultOf(watched.current()), "one\n")
        text = " ".join(formatEvent(e) for e in events)
        self.assertIn("unexpected ValueError", text)
        self.assertNotIn("secret-line", text)

    def test_loader_needs_clock(self):
        self.assertRaises(ValueError, WatchedFile, self.path, self.parse, loader=ManualPool().run)

    def test_first_read_fails(self):
        e = self.assertRaises(StoreError, WatchedFile, self.mktemp(), self.parse)
        self.assertIn("No such file or directory", str(e))


class HtpasswdCheckerTests(SynchronousTestCase):
    def setUp(self):
        self.path = self.mktemp()
        atomic_write(
            self.path,
            f"# staff\ndaniel:{DANIEL}:groups=staff,admins\nbob:{BOB}\nbroken line\n",
        )
        self.pool = RecordingPool()
        with capturedLogs() as self.load_events:
            self.checker = HtpasswdChecker(self.path, Verifier(hashes.verify, self.pool))

    def login(self, user, password, creds=testing.http_basic):
        return testing.authenticate(self.checker, creds(user, password))

    def test_interfaces(self):
        verifyObject(ICredentialsChecker, self.checker)
        verifyObject(IHashingChecker, self.checker)
        verifyObject(IReloadable, self.checker)
        self.assertNotIn(DANIEL, repr(self.checker))

    def test_success_with_groups(self):
        info = self.successResultOf(self.login("daniel", "tiger"))
        testing.assert_auth_info(self, info, [("daniel", "HttpBasicAuth")], groups=["staff", "admins"])
        info = self.successResultOf(self.login("bob", "secret", testing.rfc1929))
        testing.assert_auth_info(self, info, [("bob", "ProxyAuthRfc1929")], groups=[])

    def test_wrong_password(self):
        self.failureResultOf(self.login("daniel", "lion"), UnauthorizedLogin)

    def test_unknown_user_costs_a_hash(self):
        """An unknown user is verified against a dummy of the same scheme and cost."""
        self.failureResultOf(self.login("mallory", "tiger"), UnauthorizedLogin)
        [dummy] = self.pool.stored
        self.assertNotIn(dummy, (DANIEL, BOB))
        self.assertEqual(hashes.cost_of(dummy), hashes.cost_of(DANIEL))

    def test_problem_lines_logged(self):
        [event] = self.load_events
        self.assertIn(f"{self.path}:4: no ':'", formatEvent(event))
        self.assertIn("line skipped", formatEvent(event))

    def test_sasl_authzid(self):
        """Only the SASL authcid is checked; a foreign authzid is refused."""
        info = self.successResultOf(self.login("daniel", "tiger", testing.sasl_plain))
        self.assertEqual(info.names(), {"daniel"})
        creds = testing.sasl_plain("daniel", "tiger", authzid="bob")
        self.failureResultOf(testing.authenticate(self.checker, creds), UnauthorizedLogin)

    def test_reload_add_and_delete(self):
        """'authgateway user add/del' take effect at the very next login."""
        self.successResultOf(self.login("bob", "secret"))  # cached
        add_user(self.path, "carol", "pw", scheme="bcrypt", cost=4)
        self.successResultOf(self.login("carol", "pw"))
        delete_user(self.path, "bob")
        self.failureResultOf(self.login("bob", "secret"), UnauthorizedLogin)
        self.successResultOf(self.login("daniel", "tiger"))

    def test_password_change_misses_cache(self):
        self.successResultOf(self.login("daniel", "tiger"))
        delete_user(self.path, "daniel")
        add_user(self.path, "daniel", "lion", cost=4)
        self.failureResultOf(self.login("daniel", "tiger"), UnauthorizedLogin)
        self.successResultOf(self.login("daniel", "lion"))

    def test_legacy_warned_once(self):
        path = self.mktemp()
        atomic_write(path, "old:{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=\n")
        with capturedLogs() as events:
            checker = HtpasswdChecker(path, inline())
            atomic_write(path, "old:{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=\nnew:{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=\n")
            self.successResultOf(checker.file.current())
        warnings = [e for e in events if "weak legacy" in formatEvent(e)]
        self.assertEqual(len(warnings), 1)
        self.assertIn("sha1", formatEvent(warnings[0]))
        self.successResultOf(testing.authenticate(checker, testing.http_basic("new", "secret")))

    def test_empty_file(self):
        path = self.mktemp()
        atomic_write(path, "# nobody yet\n")
        checker = HtpasswdChecker(path, inline())
        self.failureResultOf(
            testing.authenticate(checker, testing.http_basic("a", "b")), UnauthorizedLogin
        )


#: One user per cost class: two bcrypt costs, {SHA} and sha512-crypt.
MIXED = {
    "b4": (DANIEL, "tiger"),
    "b5": (hashes.make_hash("five", "bcrypt", cost=5), "five"),
    "sha": ("{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=", "secret"),
    "crypt": (hashes.make_hash("six", "sha512-crypt", cost=1000), "six"),
}


class SameCostTests(SynchronousTestCase):
    """Every login verifies one hash of every cost class, whoever it names."""

    def setUp(self):
        self.path = self.mktemp()
        atomic_write(self.path, "".join(f"{u}:{h}\n" for u, (h, _) in MIXED.items()))
        self.verified = []

        def recording_verify(password, stored):
            self.verified.append(hashes.cost_of(stored))
            return hashes.verify(password, stored)

        with capturedLogs() as self.events:
            self.checker = HtpasswdChecker(
                self.path, Verifier(recording_verify, InlinePool(), ttl=0)
            )

    def classes_for(self, user, password):
        self.verified.clear()
        d = testing.authenticate(self.checker, testing.http_basic(user, password))
        return Counter(self.verified), d

    def test_same_classes_for_everyone(self):
        expected = Counter(hashes.cost_of(h) for h, _ in MIXED.values())
        self.assertEqual(len(expected), 4)
        for user, (_, password) in MIXED.items():
            classes, d = self.classes_for(user, password)
            self.assertEqual(classes, expected, user)
            self.successResultOf(d)
            classes, d = self.classes_for(user, password + "x")
            self.assertEqual(classes, expected, user)
            self.failureResultOf(d, UnauthorizedLogin)
        for user in ("mallory", "B4", ""):
            classes, d = self.classes_for(user, "tiger")
            self.assertEqual(classes, expected, user)
            self.failureResultOf(d, UnauthorizedLogin)

    def test_one_pool_job_per_login(self):
        pool = ManualPool()
        self.checker.use_verifier(Verifier(hashes.verify, pool, ttl=0))
        testing.authenticate(self.checker, testing.http_basic("mallory", "x"))
        self.assertEqual(len(pool.jobs), 1)

    def test_own_verdict_only(self):
        """A password matching another class's dummy, or another user, proves nothing."""
        self.failureResultOf(self.classes_for("b4", "five")[1], UnauthorizedLogin)
        self.failureResultOf(self.classes_for("sha", "tiger")[1], UnauthorizedLogin)

    def test_successes_still_cached(self):
        checker = HtpasswdChecker(self.path, Verifier(hashes.verify, RecordingPool()))
        pool = checker.verifier.pool
        for _ in range(2):
            self.successResultOf(testing.authenticate(checker, testing.http_basic("b4", "tiger")))
        self.assertEqual(len(pool.stored), 1)

    def test_many_classes_warned_once(self):
        warnings = [e for e in self.events if "different hash costs" in formatEvent(e)]
        self.assertEqual(len(warnings), 1)
        self.assertIn("4 different hash costs", formatEvent(warnings[0]))
        with capturedLogs() as events:
            add_user(self.path, "more", "pw", scheme="bcrypt", cost=6)
            self.successResultOf(self.checker.file.current())
        self.assertFalse([e for e in events if "different hash costs" in formatEvent(e)])

    def test_few_classes_not_warned(self):
        path = self.mktemp()
        atomic_write(path, f"a:{DANIEL}\nb:{MIXED['sha'][0]}\n")
        with capturedLogs() as events:
            HtpasswdChecker(path, inline())
        self.assertFalse([e for e in events if "different hash costs" in formatEvent(e)])

    def test_dummies_kept_across_reloads(self):
        """A reload makes dummies only for new cost classes."""
        before = dict(self.checker.file.value.dummies)
        made = []
        real = hashes.dummy_like
        self.patch(hashes, "dummy_like", lambda h: made.append(hashes.cost_of(h)) or real(h))
        add_user(self.path, "seven", "pw", scheme="bcrypt", cost=7)
        delete_user(self.path, "sha")
        served = self.successResultOf(self.checker.file.current())
        self.assertEqual(made, ["bcrypt cost 7"])
        self.assertNotIn("sha1", served.dummies)
        for cost in ("bcrypt cost 4", "bcrypt cost 5"):
            self.assertEqual(served.dummies[cost], before[cost])


class ReloadThreadTests(SynchronousTestCase):
    """In the running gateway, reloads (and new dummies) go to the reload thread, never the hash queue."""

    def setUp(self):
        self.clock = task.Clock()
        self.path = self.mktemp()
        atomic_write(self.path, f"daniel:{DANIEL}\n")
        self.hash_pool = ManualPool()
        self.loads = ManualPool()
        self.checker = HtpasswdChecker(self.path, Verifier(hashes.verify, self.hash_pool))
        self.checker.use_loader(self.loads.run, self.clock)

    def test_login_waits_for_reload(self):
        add_user(self.path, "carol", "pw", scheme="bcrypt", cost=5)
        d = testing.authenticate(self.checker, testing.http_basic("carol", "pw"))
        self.assertNoResult(d)
        self.assertEqual(self.hash_pool.jobs, [])
        self.assertEqual(len(self.loads.jobs), 1)
        self.loads.finish_all()  # the read, the parse and the new cost-5 dummy
        self.assertEqual(len(self.hash_pool.jobs), 1)
        self.hash_pool.finish_all()
        self.successResultOf(d)
        self.assertEqual(set(self.checker.file.value.dummies), {"bcrypt cost 4", "bcrypt cost 5"})

    def test_default_verifier_off_the_reactor(self):
        """Outside the gateway's service (another twistd plugin), hashing uses the reactor's pool."""
        from twisted.internet import reactor

        checker = HtpasswdChecker(self.path)
        self.assertIs(checker.verifier.pool.threadpool, reactor.getThreadPool())
        self.assertIsNone(checker.file.loader)  # reloads inline: successResultOf works


class TokenCheckerTests(SynchronousTestCase):
    def setUp(self):
        self.path = self.mktemp()
        self.token, _ = add_token(self.path, "ci-bot", groups=("deploy",))
        self.checker = TokenChecker(self.path)

    def test_token(self):
        verifyObject(ICredentialsChecker, self.checker)
        verifyObject(IReloadable, self.checker)
        info = self.successResultOf(testing.authenticate(self.checker, testing.bearer(self.token)))
        testing.assert_auth_info(self, info, [("ci-bot", "BearerToken")], groups=["deploy"])
        for bad in ("", self.token[:-1], self.token + "x", "agw_" + "A" * 43):
            self.failureResultOf(
                testing.authenticate(self.checker, testing.bearer(bad)), UnauthorizedLogin
            )

    def test_add_and_revoke_picked_up_at_once(self):
        new, _ = add_token(self.path, "other")
        self.successResultOf(testing.authenticate(self.checker, testing.bearer(new)))
        revoke(self.path, "ci-bot")
        self.failureResultOf(
            testing.authenticate(self.checker, testing.bearer(self.token)), UnauthorizedLogin
        )

    def test_reload_off_the_reactor_thread(self):
        """With the service's loader, the token file is read there, not inline."""
        loads, clock = ManualPool(), task.Clock()
        self.checker.use_loader(loads.run, clock)
        new, _ = add_token(self.path, "other")
        d = testing.authenticate(self.checker, testing.bearer(new))
        self.assertNoResult(d)
        [(f, _, _)] = loads.jobs
        self.assertEqual(f, self.checker.file._read)
        loads.finish_all()
        self.successResultOf(d)

    def test_only_bearer(self):
        self.assertEqual(len(self.checker.credentialInterfaces), 1)


class PluginTests(SynchronousTestCase):
    def test_found_by_strcred(self):
        for name in ("htpasswd", "tokens"):
            factory = strcred.findCheckerFactory(name)
            self.assertEqual(factory.authType, name)
            self.assertRaises(StoreError, factory.generateChecker, "")
            self.assertRaises(StoreError, factory.generateChecker, self.mktemp())


class HashPoolLoadTests(TestCase):
    """L{HashPool.load}: the reload thread, outside the hash queue's bound."""

    @defer.inlineCallbacks
    def test_load_while_hash_queue_full(self):
        from twisted.internet import reactor

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

    def test_shared_pool_loads_in_the_given_pool(self):
        pool = HashPool.shared()
        self.assertIs(pool.loader, pool.threadpool)
