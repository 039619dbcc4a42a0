"""
Tests for L{gateway.checkers.plainfile}: C{--auth file:PATH} without
Twisted's C{FilePasswordDB} reading the file at every login.
"""

from __future__ import annotations

import os

from twisted.cred.credentials import CramMD5Credentials
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from gateway import tap, testing
from gateway.checkers import plainfile
from gateway.checkers.plainfile import PlainFileChecker, parse_plain
from gateway.realm import login


class ParseTests(SynchronousTestCase):
    def test_format(self) -> None:
        table = parse_plain("# users\nalice:wonder:extra\n\nbob:\nalice:second\nnocolon\n", "f")
        self.assertEqual(dict(table.passwords), {"alice": "wonder", "bob": ""})
        self.assertEqual(table.problems, (
            'f:5: duplicate user "alice" (the first wins)', "f:6: expected USER:PASSWORD",
        ))

    def test_repr_hides_passwords(self) -> None:
        self.assertNotIn("wonder", repr(parse_plain("alice:wonder\n")))


class CheckerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()
        self.write("alice:wonder\n")
        self.checker = PlainFileChecker(self.path)

    def write(self, text: str) -> None:
        with open(self.path + ".new", "w") as f:
            f.write(text)
        os.replace(self.path + ".new", self.path)

    def check(self, creds: object) -> object:
        return self.checker.requestAvatarId(creds)

    def test_right_and_wrong(self) -> None:
        self.assertEqual(self.successResultOf(self.check(testing.http_basic("alice", "wonder"))),
                         "alice")
        for user, password in [("alice", "wonderland"), ("alice", ""), ("bob", "wonder")]:
            self.failureResultOf(self.check(testing.http_basic(user, password)), UnauthorizedLogin)

    def test_hashed_credentials(self) -> None:
        """CRAM-MD5 needs the clear text: it is checked against it."""
        creds = CramMD5Credentials()
        challenge = creds.getChallenge()
        import hmac

        digest = hmac.new(b"wonder", challenge, "md5").hexdigest()
        creds.setResponse(b"alice " + digest.encode())
        self.assertEqual(self.successResultOf(self.check(creds)), "alice")

    def test_unknown_user_compared_too(self) -> None:
        """An unknown user's password is compared (with a random value), as a known one's."""
        compared = []

        class Creds:
            username, password = "nobody", "x"

            def checkPassword(self, stored: str) -> bool:
                compared.append(stored)
                return True  # even a "match" with the random value is no login

        self.failureResultOf(self.check(Creds()), UnauthorizedLogin)
        self.assertEqual(len(compared), 1)
        self.assertGreaterEqual(len(compared[0]), 32)

    def test_file_read_once_not_per_login(self) -> None:
        reads = []
        original = plainfile.parse_plain
        self.patch(self.checker.file, "_parse", lambda *a: reads.append(a) or original(*a))
        for _ in range(5):
            self.successResultOf(self.check(testing.http_basic("alice", "wonder")))
        self.assertEqual(reads, [])

    def test_change_seen_at_the_next_login(self) -> None:
        self.write("alice:wonderland\nbob:builder\n")
        self.failureResultOf(self.check(testing.http_basic("alice", "wonder")), UnauthorizedLogin)
        self.successResultOf(self.check(testing.http_basic("bob", "builder")))


class OptionTests(SynchronousTestCase):
    def test_auth_file_uses_it_with_the_reload_thread(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("daniel:tiger\n")
        options = tap.Options()
        options.parseOptions(["--data-dir", self.mktemp(), "--auth", f"file:{path}"])
        [checker] = options["credCheckers"]
        self.assertIsInstance(checker, PlainFileChecker)
        core = tap.build_core(options["coreSettings"], reactor=task.Clock())
        self.assertEqual(checker.file.loader, core.hash_pool.load)
        _, info, _ = self.successResultOf(login(core.portal, testing.rfc1929("daniel", "tiger")))
        self.assertEqual(info.names(), {"daniel"})
