"""
Tests for L{gateway.checkers.htpasswd}: parsing htpasswd files, the
rewrites behind C{authgateway user}, and the C{--auth htpasswd:PATH}
checker (reloads, the same cost for every login).
"""

from __future__ import annotations

import fcntl
import os
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from gateway import testing
from gateway.checkers import hashes
from gateway.checkers.files import IReloadable, StoreError, atomic_write
from gateway.checkers.htpasswd import (
    HtpasswdChecker,
    PasswordEntry,
    add_user,
    delete_user,
    list_users,
    parse_htpasswd,
)
from gateway.checkers.hashing import IHashingChecker, InlinePool, Verifier
from tests.support import (
    CHEAP,
    PASSWORD,
    ManualPool,
    file_mode,
    read_file,
    store_path,
    write_file,
)

# Cheap hashes keep the module fast; bcrypt cost 4 is the minimum.
DANIEL = hashes.make_hash("tiger", "bcrypt", cost=4)
BOB = hashes.make_hash("secret", "bcrypt", cost=4)
#: {SHA} of "secret".
SHA1 = "{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ="

#: Valid hashes for the parser and the rewrites, whose passwords do not matter.
BCRYPT = DANIEL
APR1 = "$apr1$abcdefgh$" + "b" * 22


def inline():
    return Verifier(hashes.verify, InlinePool())


class RecordingPool:
    """Runs jobs inline and remembers which stored hash each verification used."""

    def __init__(self):
        self.stored = []

    def run(self, f, *args):
        self.stored.append(args[1])  # Verifier's job: (password, stored, decoys)
        return defer.maybeDeferred(f, *args)


class ParseHtpasswdTests(SynchronousTestCase):
    def test_entries(self) -> None:
        table = parse_htpasswd(
            "# users\n"
            "\n"
            "   # indented comment\n"
            f"alice:{BCRYPT}\r\n"
            f"bob:{APR1}:Bob Smith, room 12\n"
            f"carol:{SHA1}:groups= admins, ,dev,admins\n"
            f"  dave:{BCRYPT}:groups=\n",
            "pw",
        )
        self.assertEqual(table.problems, ())
        self.assertEqual(list(table.entries), ["alice", "bob", "carol", "dave"])
        self.assertEqual(table.entries["alice"], PasswordEntry("alice", BCRYPT, (), 4))
        self.assertEqual(table.entries["bob"].groups, ())
        self.assertEqual(table.entries["bob"].hash, APR1)
        self.assertEqual(table.entries["carol"].groups, ("admins", "dev"))
        self.assertEqual(table.entries["carol"].lineno, 6)
        self.assertEqual(table.entries["dave"].groups, ())
        self.assertEqual(table.entries["alice"].scheme, "bcrypt")
        self.assertEqual(table.legacy, frozenset({"apr1", "sha1"}))
        self.assertEqual(len(table), 4)

    def test_byte_order_mark(self) -> None:
        table = parse_htpasswd(f"\ufeffalice:{BCRYPT}\n")
        self.assertEqual(list(table.entries), ["alice"])
        self.assertEqual(table.legacy, frozenset())

    def test_repr_hides_hash(self) -> None:
        table = parse_htpasswd(f"alice:{BCRYPT}\n")
        self.assertNotIn(BCRYPT, repr(table))
        self.assertNotIn(BCRYPT, repr(table.entries["alice"]))
        self.assertIn("alice", repr(table.entries["alice"]))

    def test_problems(self) -> None:
        """Each bad line is skipped and reported with its number; the rest load."""
        long_line = "eve:" + "x" * 9000
        text = "\n".join(
            [
                "no colon here",  # 1
                f":{BCRYPT}",  # 2
                "frank:",  # 3
                "gina:plaintext-secret",  # 4
                "hank:$1$saltsalt$Wj2aoS9zVWm0Nk9NjGbJ3.",  # 5
                f"ivan:{BCRYPT}:groups=ok,not ok",  # 6
                f"alice:{BCRYPT}",  # 7
                f"alice:{APR1}",  # 8
                long_line,  # 9
                f"judy:{BCRYPT}",  # 10
            ]
        )
        table = parse_htpasswd(text, "/etc/pw")
        self.assertEqual(list(table.entries), ["alice", "judy"])
        self.assertEqual(table.entries["alice"].hash, BCRYPT)
        self.assertEqual(
            table.problems,
            (
                "/etc/pw:1: no ':' between user name and hash",
                "/etc/pw:2: empty user name",
                '/etc/pw:3: empty hash for user "frank"',
                '/etc/pw:4: user "gina": plaintext passwords are not supported',
                '/etc/pw:5: user "hank": plain MD5-crypt ($1$) is not supported',
                '/etc/pw:6: user "ivan": group name "not ok" contains \',\', \':\' or whitespace',
                '/etc/pw:8: duplicate user "alice" (line 7 wins)',
                "/etc/pw:9: line longer than 8192 characters",
            ),
        )
        joined = "\n".join(table.problems)
        self.assertNotIn("plaintext-secret", joined)
        self.assertNotIn("Wj2aoS9z", joined)
        self.assertNotIn(BCRYPT, joined)

    def test_first_line_wins_even_if_unusable(self) -> None:
        """As in Apache: a later line cannot stand in for a broken first one."""
        table = parse_htpasswd(f"alice:garbage\nalice:{BCRYPT}\n", "pw")
        self.assertEqual(dict(table.entries), {})
        self.assertEqual(len(table.problems), 2)
        self.assertEqual(table.problems[1], 'pw:2: duplicate user "alice" (line 1 wins)')

    @settings(max_examples=200, deadline=None)
    @given(st.text())
    def test_never_raises(self, text: str) -> None:
        table = parse_htpasswd(text)
        for problem in table.problems:
            self.assertTrue(problem.startswith("<htpasswd>:"))
            self.assertNotIn("\n", problem)


class HtpasswdStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = store_path(self, "users")
        self.directory = os.path.dirname(self.path)

    def test_add_creates_file(self) -> None:
        self.assertTrue(add_user(self.path, "alice", PASSWORD, groups=["admins", "dev"], **CHEAP))
        self.assertEqual(file_mode(self.path), 0o600)
        table = list_users(self.path)
        entry = table.entries["alice"]
        self.assertEqual(entry.groups, ("admins", "dev"))
        self.assertEqual(hashes.cost_of(entry.hash), "bcrypt cost 4")
        self.assertTrue(hashes.verify(PASSWORD, entry.hash))
        self.assertEqual(read_file(self.path), f"alice:{entry.hash}:groups=admins,dev\n".encode())
        self.assertNotIn(PASSWORD.encode(), read_file(self.path))
        self.assertEqual(os.listdir(self.directory), ["users"])

    def test_add_other_schemes(self) -> None:
        add_user(self.path, "alice", PASSWORD, scheme="sha512-crypt", cost=1000)
        add_user(self.path, "bob", PASSWORD, scheme="argon2id", cost=1)
        table = list_users(self.path)
        self.assertEqual(table.entries["alice"].scheme, "sha512-crypt")
        self.assertEqual(table.entries["bob"].scheme, "argon2id")
        self.assertTrue(hashes.verify(PASSWORD, table.entries["bob"].hash))

    def test_add_preserves_other_lines(self) -> None:
        """Comments, CRLF, nginx comments and broken lines survive byte for byte."""
        original = (
            "\ufeff# managed by hand\r\n"
            f"bob:{APR1}:Bob, room 12\r\n"
            "this line is broken\r\n"
            "\r\n"
            f"carol:{SHA1}"  # no final newline
        )
        write_file(self.path, original, mode=0o644)
        inode = os.stat(self.path).st_ino
        self.assertFalse(add_user(self.path, "alice", PASSWORD, **CHEAP))
        data = read_file(self.path).decode("utf-8")
        self.assertTrue(data.startswith(original + "\r\nalice:$2b$04$"), data)
        self.assertTrue(data.endswith("\r\n"))
        self.assertEqual(data.count("\n"), 6)
        self.assertEqual(file_mode(self.path), 0o600)
        self.assertNotEqual(os.stat(self.path).st_ino, inode)
        self.assertEqual(list(list_users(self.path).entries), ["bob", "carol", "alice"])

    def test_add_duplicate(self) -> None:
        add_user(self.path, "alice", PASSWORD, **CHEAP)
        before = read_file(self.path)
        e = self.assertRaises(StoreError, add_user, self.path, "alice", "other", **CHEAP)
        self.assertEqual(str(e), f'{self.path}: user "alice" already exists')
        self.assertEqual(read_file(self.path), before)

    def test_add_duplicate_of_broken_line(self) -> None:
        """A broken line still claims its user (it would win in Apache)."""
        write_file(self.path, "alice:garbage\n")
        self.assertRaises(StoreError, add_user, self.path, "alice", PASSWORD, **CHEAP)

    def test_duplicate_found_before_hashing(self) -> None:
        add_user(self.path, "alice", PASSWORD, **CHEAP)
        self.patch(hashes, "make_hash", lambda *a, **k: self.fail("hashed"))
        self.assertRaises(StoreError, add_user, self.path, "alice", PASSWORD)

    def test_hash_computed_outside_lock(self) -> None:
        real = hashes.make_hash
        held: list[bool] = []

        def make_hash(*args, **kwargs):
            fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append(False)
            except BlockingIOError:
                held.append(True)
            finally:
                os.close(fd)
            return real(*args, **kwargs)

        self.patch(hashes, "make_hash", make_hash)
        add_user(self.path, "alice", PASSWORD, **CHEAP)
        self.assertEqual(held, [False])

    def test_bad_user_names(self) -> None:
        for user, reason in [
            ("", "user name is empty"),
            ("a:b", "user name \"a:b\" contains ':'"),
            (" alice", "user name \" alice\" starts or ends with whitespace"),
            ("alice\t", "user name \"alice\\t\" starts or ends with whitespace"),
            ("al\nice", "user name \"al\\nice\" contains control characters"),
            ("al\x00ice", "user name \"al\\x00ice\" contains control characters"),
            ("#alice", "user name \"#alice\" starts with '#', which marks a comment"),
            ("\u00e9" * 128, "user name is longer than 255 bytes"),
        ]:
            e = self.assertRaises(StoreError, add_user, self.path, user, PASSWORD, **CHEAP)
            self.assertEqual(str(e), reason)
        add_user(self.path, "\u00e9" * 127 + "x", PASSWORD, **CHEAP)  # 255 bytes
        add_user(self.path, "first last", PASSWORD, **CHEAP)
        self.assertEqual(len(list_users(self.path)), 2)

    def test_bad_group_names(self) -> None:
        for group in ["", "a,b", "a:b", "a b", "tab\t"]:
            self.assertRaises(
                StoreError, add_user, self.path, "alice", PASSWORD, groups=[group], **CHEAP
            )
        self.assertRaises(TypeError, add_user, self.path, "alice", PASSWORD, groups="admins")
        self.assertFalse(os.path.exists(self.path))

    def test_bad_scheme_and_password(self) -> None:
        for kwargs in [
            {"scheme": "md5"},
            {"scheme": "bcrypt", "cost": 3},
            {"scheme": "bcrypt", "cost": 4, "password": "x" * 73},
            {"scheme": "bcrypt", "cost": 4, "password": ""},
            {"scheme": "bcrypt", "cost": 4, "password": "bad\udcffsurrogate"},
        ]:
            password = kwargs.pop("password", PASSWORD)
            e = self.assertRaises(StoreError, add_user, self.path, "alice", password, **kwargs)
            self.assertNotIn(password or "\0", str(e))
            self.assertNotIn(PASSWORD, str(e))
        self.assertFalse(os.path.exists(self.path))

    def test_missing_directory(self) -> None:
        path = os.path.join(self.directory, "nope", "users")
        e = self.assertRaises(StoreError, add_user, path, "alice", PASSWORD, **CHEAP)
        self.assertIn("nope", str(e))

    def test_delete(self) -> None:
        original = (
            "# comment\r\n"
            f"alice:{BCRYPT}\r\n"
            "junk line\r\n"
            f"bob:{APR1}:groups=x\r\n"
            f"alice:{APR1}\r\n"
            "\r\n"
        )
        write_file(self.path, original, mode=0o644)
        delete_user(self.path, "alice")
        # Every line of alice goes, so the duplicate cannot take over.
        self.assertEqual(
            read_file(self.path).decode(),
            f"# comment\r\njunk line\r\nbob:{APR1}:groups=x\r\n\r\n",
        )
        self.assertEqual(file_mode(self.path), 0o600)
        e = self.assertRaises(StoreError, delete_user, self.path, "alice")
        self.assertEqual(str(e), f'{self.path}: no user "alice"')
        delete_user(self.path, "bob")
        self.assertEqual(read_file(self.path), b"# comment\r\njunk line\r\n\r\n")

    def test_delete_missing_file(self) -> None:
        e = self.assertRaises(StoreError, delete_user, self.path, "alice")
        self.assertEqual(str(e), f"{self.path}: {os.strerror(2)}")

    def test_list_missing_file(self) -> None:
        e = self.assertRaises(StoreError, list_users, self.path)
        self.assertEqual(str(e), f"{self.path}: {os.strerror(2)}")

    def test_list_reports_problems(self) -> None:
        write_file(self.path, f"alice:{BCRYPT}\nbroken\n")
        table = list_users(self.path)
        self.assertEqual(table.path, self.path)
        self.assertEqual(table.problems, (f"{self.path}:2: no ':' between user name and hash",))


class HtpasswdCheckerTests(SynchronousTestCase):
    def setUp(self):
        self.path = self.mktemp()
        atomic_write(
            self.path,
            f"# staff\ndaniel:{DANIEL}:groups=staff,admins\nbob:{BOB}\nbroken line\n",
        )
        with capturedLogs() as self.load_events:
            self.checker = HtpasswdChecker(self.path, inline())

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
        atomic_write(path, f"old:{SHA1}\n")
        with capturedLogs() as events:
            checker = HtpasswdChecker(path, inline())
            atomic_write(path, f"old:{SHA1}\nnew:{SHA1}\n")
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
    "sha": (SHA1, "secret"),
    "crypt": (hashes.make_hash("six", "sha512-crypt", cost=1000), "six"),
}


class SameCostTests(SynchronousTestCase):
    """Every login verifies one hash of every cost class, whoever it names."""

    def setUp(self):
        self.path = self.mktemp()
        atomic_write(self.path, "".join(f"{u}:{h}\n" for u, (h, _) in MIXED.items()))
        self.verified = []

        def recording_verify(password, stored):
            self.verified.append(stored)
            return hashes.verify(password, stored)

        with capturedLogs() as self.events:
            self.checker = HtpasswdChecker(
                self.path, Verifier(recording_verify, InlinePool(), ttl=0)
            )

    def classes_for(self, user, password):
        self.verified.clear()
        d = testing.authenticate(self.checker, testing.http_basic(user, password))
        return Counter(hashes.cost_of(h) for h in self.verified), d

    def test_same_classes_for_everyone(self):
        """An unknown user's login verifies dummies of every class, never a user's hash."""
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
            self.assertFalse(set(self.verified) & {h for h, _ in MIXED.values()}, user)
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

    def test_default_verifier_inline(self):
        """
        On its own (no service gave it a Verifier), a checker verifies and
        reloads inline, never through the global reactor's thread pool.
        """
        checker = HtpasswdChecker(self.path)
        self.assertIsInstance(checker.verifier.pool, InlinePool)
        self.assertIsNone(checker.file.loader)  # reloads inline: successResultOf works
        self.successResultOf(testing.authenticate(checker, testing.http_basic("daniel", "tiger")))
