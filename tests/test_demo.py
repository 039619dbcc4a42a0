"""
Tests for L{gateway.demo}: preparing a data directory for C{make run}.
"""

from __future__ import annotations

import io
import os
import re
import stat
import sys

from twisted.trial.unittest import SynchronousTestCase

from gateway import demo
from gateway.checkers import hashes
from gateway.checkers.htpasswd import parse_htpasswd


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class PrepareTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.data_dir = self.mktemp()
        self.users = os.path.join(self.data_dir, "users.htpasswd")
        self.cert = os.path.join(self.data_dir, "tls", "cert.pem")
        self.key = os.path.join(self.data_dir, "tls", "key.pem")

    def _password(self, out: str) -> str:
        match = re.search(r"shown only now: ([A-Za-z0-9_-]+)\n", out)
        self.assertIsNotNone(match, out)
        return match.group(1)

    def _check(self, password: str) -> None:
        """The htpasswd file holds a bcrypt hash of the password, never the password."""
        text = _read(self.users).decode("utf-8")
        self.assertNotIn(password, text)
        table = parse_htpasswd(text)
        self.assertEqual(table.entries["demo"].scheme, "bcrypt")
        self.assertEqual(table.entries["demo"].groups, ("demo",))
        self.assertTrue(hashes.verify(password, table.entries["demo"].hash))

    def test_firstRun(self) -> None:
        """The first run creates the certificate and a 0600 htpasswd file with a bcrypt demo user."""
        out = io.StringIO()
        self.assertEqual(demo.prepare(self.data_dir, out=out), self.users)
        self.assertEqual(_mode(self.data_dir), 0o700)
        self.assertTrue(os.path.isfile(self.cert))
        self.assertTrue(os.path.isfile(self.key))
        self.assertEqual(_mode(self.users), 0o600)
        password = self._password(out.getvalue())
        self.assertGreaterEqual(len(password), 24)
        self.assertEqual(out.getvalue().count(password), 1)
        self.assertIn(self.cert, out.getvalue())
        self._check(password)

    def test_passwordsDiffer(self) -> None:
        """Two fresh data directories get different generated passwords."""
        out = io.StringIO()
        demo.prepare(self.data_dir, out=out)
        out2 = io.StringIO()
        demo.prepare(self.mktemp(), out=out2)
        self.assertNotEqual(self._password(out2.getvalue()), self._password(out.getvalue()))

    def test_secondRun(self) -> None:
        """A second run neither prints the password nor changes the users file or certificate."""
        first = io.StringIO()
        demo.prepare(self.data_dir, out=first)
        password = self._password(first.getvalue())
        before = (_read(self.users), _read(self.cert), _read(self.key))

        out = io.StringIO()
        self.assertEqual(demo.prepare(self.data_dir, out=out), self.users)
        self.assertNotIn(password, out.getvalue())
        self.assertIn("unchanged", out.getvalue())
        self.assertEqual((_read(self.users), _read(self.cert), _read(self.key)), before)
        self.assertEqual(_mode(self.users), 0o600)

    def test_existingDirectory(self) -> None:
        """An existing empty data directory is filled in."""
        os.makedirs(self.data_dir)
        out = io.StringIO()
        demo.prepare(self.data_dir, out=out)
        self.assertTrue(os.path.isfile(self.cert))
        self._check(self._password(out.getvalue()))


class MainTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)

    def test_noArguments(self) -> None:
        """Without a data directory C{main} prints usage and returns 2."""
        self.assertEqual(demo.main([]), 2)
        self.assertEqual(self.stderr.getvalue(), "usage: python -m gateway.demo DATA_DIR\n")

    def test_tooManyArguments(self) -> None:
        """With two arguments C{main} returns 2 and creates nothing."""
        a, b = self.mktemp(), self.mktemp()
        self.assertEqual(demo.main([a, b]), 2)
        self.assertFalse(os.path.exists(a) or os.path.exists(b))

    def test_unusableDirectory(self) -> None:
        """A data directory beneath a regular file: one line on stderr, exit status 1."""
        parent = self.mktemp()
        with open(parent, "w") as f:
            f.write("a regular file\n")
        self.assertEqual(demo.main([os.path.join(parent, "data")]), 1)
        err = self.stderr.getvalue()
        self.assertEqual(err.count("\n"), 1)
        self.assertTrue(err.endswith("\n"))
        self.assertTrue(err.startswith("gateway.demo: "), err)

    def test_success(self) -> None:
        """
        A usable data directory: status 0, and the password goes to the
        current C{sys.stdout}.
        """
        stdout = io.StringIO()
        self.patch(sys, "stdout", stdout)
        data_dir = self.mktemp()
        self.assertEqual(demo.main([data_dir]), 0)
        self.assertEqual(self.stderr.getvalue(), "")
        password = re.search(r"shown only now: (\S+)", stdout.getvalue()).group(1)
        with open(os.path.join(data_dir, "users.htpasswd")) as f:
            entry = parse_htpasswd(f.read()).entries["demo"]
        self.assertTrue(hashes.verify(password, entry.hash))
