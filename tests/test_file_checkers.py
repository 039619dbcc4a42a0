"""
Tests for the file-backed checkers: C{--auth htpasswd:PATH} and
C{--auth tokens:PATH}, with reloading, the dummy-hash path and the plugins.
"""

from __future__ import annotations

import os

from twisted.cred import strcred
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from gateway import testing
from gateway.checkers import hashes
from gateway.checkers.files import StoreError, WatchedFile, atomic_write
from gateway.checkers.htpasswd import HtpasswdChecker, add_user, delete_user
from gateway.checkers.pipeline import IHashingChecker, InlinePool, Verifier
from gateway.checkers.tokens import TokenChecker, add_token, revoke
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
        if f is hashes.verify:
            self.stored.append(args[1])
        return defer.maybeDeferred(f, *args)


class WatchedFileTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.path = self.mktemp()
        atomic_write(self.path, "one\n")
        self.parsed = []

    def parse(self, text, path):
        self.parsed.append(text)
        return text.strip()

    def watched(self):
        return WatchedFile(self.path, self.parse, now=self.clock.seconds, interval=1.0)

    def test_reload_after_interval(self):
        watched = self.watched()
        atomic_write(self.path, "two\n")
        self.assertEqual(watched.current(), "one")  # not looked at yet
        self.clock.advance(1)
        self.assertEqual(watched.current(), "two")
        self.clock.advance(1)
        self.assertEqual(watched.current(), "two")
        self.assertEqual(len(self.parsed), 2)  # unchanged: not parsed again

    def test_same_size_in_place_change(self):
        """An in-place rewrite of the same size is seen through its mtime."""
        watched = self.watched()
        st = os.stat(self.path)
        with open(self.path, "w") as f:
            f.write("six\n")
        os.utime(self.path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        self.clock.advance(1)
        self.assertEqual(watched.current(), "six")

    def test_keeps_last_good(self):
        """A vanished or broken file keeps the last good value and is logged once."""
        watched = self.watched()
        os.unlink(self.path)
        with capturedLogs() as events:
            for _ in range(3):
                self.clock.advance(1)
                self.assertEqual(watched.current(), "one")
        self.assertEqual(len(events), 1)
        self.assertIn("cannot reload", formatEvent(events[0]))
        with open(self.path, "wb") as f:
            f.write(b"bad \xff\n")
        with capturedLogs() as events:
            self.clock.advance(1)
            self.assertEqual(watched.current(), "one")
        self.assertIn("not valid UTF-8", formatEvent(events[0]))
        atomic_write(self.path, "three\n")
        self.clock.advance(1)
        self.assertEqual(watched.current(), "three")

    def test_first_read_fails(self):
        e = self.assertRaises(StoreError, WatchedFile, self.mktemp(), self.parse)
        self.assertIn("No such file or directory", str(e))


class HtpasswdCheckerTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.path = self.mktemp()
        atomic_write(
            self.path,
            f"# staff\ndaniel:{DANIEL}:groups=staff,admins\nbob:{BOB}\nbroken line\n",
        )
        self.pool = RecordingPool()
        with capturedLogs() as self.load_events:
            self.checker = HtpasswdChecker(
                self.path, Verifier(hashes.verify, self.pool), now=self.clock.seconds
            )

    def login(self, user, password, creds=testing.http_basic):
        return testing.authenticate(self.checker, creds(user, password))

    def test_interfaces(self):
        verifyObject(ICredentialsChecker, self.checker)
        verifyObject(IHashingChecker, self.checker)
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
        """'authgateway user add/del' take effect in a running checker."""
        add_user(self.path, "carol", "pw", scheme="bcrypt", cost=4)
        delete_user(self.path, "bob")
        self.failureResultOf(self.login("carol", "pw"), UnauthorizedLogin)  # within the interval
        self.clock.advance(1)
        self.successResultOf(self.login("carol", "pw"))
        self.failureResultOf(self.login("bob", "secret"), UnauthorizedLogin)
        self.successResultOf(self.login("daniel", "tiger"))

    def test_password_change_misses_cache(self):
        self.successResultOf(self.login("daniel", "tiger"))
        delete_user(self.path, "daniel")
        add_user(self.path, "daniel", "lion", cost=4)
        self.clock.advance(1)
        self.failureResultOf(self.login("daniel", "tiger"), UnauthorizedLogin)
        self.successResultOf(self.login("daniel", "lion"))

    def test_legacy_warned_once(self):
        path = self.mktemp()
        atomic_write(path, "old:{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=\n")
        with capturedLogs() as events:
            checker = HtpasswdChecker(path, inline(), now=self.clock.seconds)
            atomic_write(path, "old:{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=\nnew:{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=\n")
            self.clock.advance(1)
            checker.file.current()
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



class ReloadInPoolTests(SynchronousTestCase):
    """In the running gateway, reloads and new dummy hashes are made in the pool."""

    def setUp(self):
        self.clock = task.Clock()
        self.path = self.mktemp()
        atomic_write(self.path, f"daniel:{DANIEL}\n")
        self.pool = ManualPool()
        self.checker = HtpasswdChecker(
            self.path, Verifier(hashes.verify, self.pool), now=self.clock.seconds
        )

    def reload(self):
        self.clock.advance(1)
        self.checker.file.current()

    def jobs(self):
        return [f for f, _, _ in self.pool.jobs]

    def test_reload_read_in_pool(self):
        atomic_write(self.path, f"carol:{BOB}\n")
        self.reload()
        self.assertEqual(len(self.pool.jobs), 1)  # the read and parse
        self.assertIn("daniel", self.checker.file.current().entries)  # old table meanwhile
        self.clock.advance(5)
        self.checker.file.current()
        self.assertEqual(len(self.pool.jobs), 1)  # one reload at a time
        self.pool.finish_all()
        self.assertEqual(set(self.checker.file.current().entries), {"carol"})

    def test_dummy_remade_in_pool_when_cost_changes(self):
        old_dummy = self.checker._dummy[1]
        atomic_write(self.path, f"carol:{hashes.make_hash('pw', 'bcrypt', cost=5)}\n")
        self.reload()
        self.pool.finish_all()  # the read; it queues the new dummy
        self.assertEqual(self.jobs(), [hashes.dummy_like])
        d = testing.authenticate(self.checker, testing.http_basic("mallory", "x"))
        self.assertEqual(self.pool.jobs[-1][1][1], old_dummy)  # the old one meanwhile
        self.pool.finish_all()
        self.failureResultOf(d, UnauthorizedLogin)
        d = testing.authenticate(self.checker, testing.http_basic("mallory", "x"))
        self.assertEqual(hashes.cost_of(self.pool.jobs[-1][1][1]), "bcrypt cost 5")
        self.pool.finish_all()
        self.failureResultOf(d, UnauthorizedLogin)

    def test_first_user_after_empty_file(self):
        """From an empty file to a first user, the dummy is not hashed inline."""
        atomic_write(self.path, "")
        self.reload()
        self.pool.finish_all()
        self.assertIsNone(self.checker._dummy)
        atomic_write(self.path, f"daniel:{DANIEL}\n")
        self.reload()
        self.pool.finish_all()  # the read
        self.assertEqual(self.jobs(), [hashes.dummy_like])
        self.pool.finish_all()
        self.assertEqual(hashes.cost_of(self.checker._dummy[1]), "bcrypt cost 4")

    def test_stale_dummy_discarded(self):
        """Two quick cost changes: the dummy of the older file never wins."""
        cost5 = hashes.make_hash("pw", "bcrypt", cost=5)
        atomic_write(self.path, f"a:{cost5}\n")
        self.reload()
        self.pool.finish_all()  # the read; queues the cost-5 dummy
        [(_, _, late)] = self.pool.jobs
        self.pool.jobs.clear()
        atomic_write(self.path, f"b:{hashes.make_hash('pw', 'bcrypt', cost=6)}\n")
        self.reload()
        self.pool.finish_all()  # the read; queues the cost-6 dummy
        self.pool.finish_all()
        late.callback(hashes.dummy_like(cost5))  # the older job finishes last
        self.assertEqual(hashes.cost_of(self.checker._dummy[1]), "bcrypt cost 6")

    def test_default_verifier_off_the_reactor(self):
        """Outside the gateway's service (another twistd plugin), hashing uses the reactor's pool."""
        from twisted.internet import reactor

        checker = HtpasswdChecker(self.path)
        self.assertIs(checker.verifier.pool.threadpool, reactor.getThreadPool())


class TokenCheckerTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.path = self.mktemp()
        self.token, _ = add_token(self.path, "ci-bot", groups=("deploy",))
        self.checker = TokenChecker(self.path, now=self.clock.seconds)

    def test_token(self):
        verifyObject(ICredentialsChecker, self.checker)
        info = self.successResultOf(testing.authenticate(self.checker, testing.bearer(self.token)))
        testing.assert_auth_info(self, info, [("ci-bot", "BearerToken")], groups=["deploy"])
        for bad in ("", self.token[:-1], self.token + "x", "agw_" + "A" * 43):
            self.failureResultOf(
                testing.authenticate(self.checker, testing.bearer(bad)), UnauthorizedLogin
            )

    def test_revoke_picked_up(self):
        revoke(self.path, "ci-bot")
        self.clock.advance(1)
        self.failureResultOf(
            testing.authenticate(self.checker, testing.bearer(self.token)), UnauthorizedLogin
        )

    def test_only_bearer(self):
        self.assertEqual(len(self.checker.credentialInterfaces), 1)


class PluginTests(SynchronousTestCase):
    def test_found_by_strcred(self):
        for name in ("htpasswd", "tokens"):
            factory = strcred.findCheckerFactory(name)
            self.assertEqual(factory.authType, name)
            self.assertRaises(StoreError, factory.generateChecker, "")
            self.assertRaises(StoreError, factory.generateChecker, self.mktemp())
