"""
Tests for L{gateway.testing}, and the README's example checker run with its
own trial test, exactly as the README shows them.
"""

from __future__ import annotations

import os
import re
import sys

from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.trial import reporter, runner
from twisted.trial.unittest import SynchronousTestCase

from gateway import testing
from gateway.acl import parse_acl
from gateway.checkers import CallableChecker, load_checker
from gateway.credentials import (
    BearerToken,
    HTTPBasicCredentials,
    RFC1929Credentials,
    SASLCredentials,
)

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def readme_examples() -> dict[str, str]:
    """The code blocks of the README introduced by C{<!-- example: NAME -->}."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    return dict(re.findall(r"<!-- example: (\S+) -->\n```python\n(.*?)```", text, re.S))


class HelperTests(SynchronousTestCase):
    def test_credentials(self):
        plain = testing.sasl_plain("daniel", "tiger", "boss", peer="2001:db8::5", tls=False)
        self.assertIsInstance(plain, SASLCredentials)
        self.assertEqual((plain.authzid, plain.username, plain.password), ("boss", "daniel", "tiger"))
        meta = plain.conn_meta
        self.assertEqual(
            (meta.protocol, meta.listener, meta.peer_address, meta.tls, meta.helo),
            ("smtp", "smtp", "2001:db8::5", False, "client.example"),
        )
        self.assertEqual(testing.sasl_plain("a", "b", mechanism="LOGIN").mechanism, "LOGIN")
        basic = testing.http_basic("u", "p")
        self.assertIsInstance(basic, HTTPBasicCredentials)
        self.assertEqual((basic.conn_meta.protocol, basic.conn_meta.tls), ("http", True))
        token = testing.bearer("t0k", state={"k": 1})
        self.assertIsInstance(token, BearerToken)
        self.assertEqual(token.conn_meta.state, {"k": 1})
        socks = testing.rfc1929("u", "p")
        self.assertIsInstance(socks, RFC1929Credentials)
        self.assertEqual((socks.conn_meta.protocol, socks.conn_meta.tls, socks.conn_meta.local_port),
                         ("socks", False, 1080))

    def test_authenticate_several_checkers(self):
        checkers = [CallableChecker(lambda u, p: p == "one"), CallableChecker(lambda u, p: p == "two")]
        for password in ("one", "two"):
            self.successResultOf(testing.authenticate(checkers, testing.http_basic("u", password)))
        self.failureResultOf(testing.authenticate(checkers, testing.http_basic("u", "x")), UnauthorizedLogin)

    def test_authenticate_with_acl(self):
        """The ACL's C{smtp/authz} grant, as the gateway's C{--acl} applies it."""
        acl = parse_acl(
            '[[acl."smtp/authz/sales"]]\nallow = true\nprivileges = ["authorize"]\n'
            'identity.Group = "staff"\n'
        )
        checker = CallableChecker(lambda authz, authc, password, meta: password == "tiger")
        creds = testing.sasl_plain("daniel", "tiger", "sales")
        self.failureResultOf(testing.authenticate(checker, creds), UnauthorizedLogin)
        self.failureResultOf(testing.authenticate(checker, creds, acl=acl), UnauthorizedLogin)
        info = self.successResultOf(
            testing.authenticate(checker, creds, groups={"staff": ["daniel"]}, acl=acl)
        )
        testing.assert_auth_info(
            self, info,
            [("sales", "SmtpAuthPlainAuthorization"), ("daniel", "SmtpAuthPlainAuthentication")],
            groups=["staff"],
        )

    def test_assert_auth_info_fails(self):
        """The assertion helper really fails on a mismatch."""
        info = self.successResultOf(
            testing.authenticate(CallableChecker(lambda u, p: True), testing.http_basic("u", "p"))
        )
        testing.assert_auth_info(self, info, ["u"], groups=[], peer_address="192.0.2.10")
        for args, kwargs in [
            ((["v"],), {}),
            (([("u", "GenericAuth")],), {}),
            ((["u"],), {"groups": ["g"]}),
            ((["u"],), {"peer_address": "192.0.2.11"}),
        ]:
            self.assertRaises(self.failureException, testing.assert_auth_info, self, info, *args, **kwargs)


class ReadmeExampleTests(SynchronousTestCase):
    def setUp(self):
        self.examples = readme_examples()
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        for name, code in self.examples.items():
            with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
                f.write(code)
        sys.path.insert(0, directory)
        self.addCleanup(sys.path.remove, directory)
        for module in ("mychecker", "test_mychecker", "seedcheckers"):
            self.addCleanup(sys.modules.pop, module, None)

    def test_example_tests_pass(self):
        """The README's checker passes the README's trial test."""
        self.assertEqual(set(self.examples), {"mychecker.py", "test_mychecker.py", "seedcheckers.py"})
        suite = runner.TestLoader().loadByName("test_mychecker")
        result = reporter.TestResult()
        suite.run(result)
        self.assertEqual(result.errors + result.failures, [])
        self.assertEqual(result.testsRun, 4)
        self.assertTrue(result.wasSuccessful())

    def test_loadable_with_checker_option(self):
        checker = load_checker("mychecker.OfficeChecker")
        creds = testing.sasl_plain("daniel", "tiger", peer="192.0.2.1")
        self.assertEqual(self.successResultOf(testing.authenticate(checker, creds)).groups, ("staff",))

    def test_seed_functions(self):
        """The README's decorated seed callbacks authenticate their own protocol only."""
        plain = load_checker("seedcheckers.auth_plain")
        socks = load_checker("seedcheckers.auth_socks")
        info = self.successResultOf(testing.authenticate(plain, testing.sasl_plain("daniel", "tiger")))
        self.assertEqual(info.names(), {"daniel"})
        for authcid, password in [("daniel", "lion"), ("daniel", ""), ("bob", ""), ("", "")]:
            self.failureResultOf(
                testing.authenticate(plain, testing.sasl_plain(authcid, password)), UnauthorizedLogin
            )
        self.failureResultOf(
            testing.authenticate(plain, testing.http_basic("daniel", "tiger")), UnhandledCredentials
        )

    def test_seed_function_authzid(self):
        """
        The README's auth_plain cannot be talked into acting as anyone
        (issue 11: C{ceo NUL daniel NUL tiger}); its explicit grant works.
        """
        plain = load_checker("seedcheckers.auth_plain")
        for authzid, authcid, password in [
            ("ceo", "daniel", "tiger"), ("alice", "daniel", "tiger"), ("ceo", "alice", "lion"),
        ]:
            creds = testing.sasl_plain(authcid, password, authzid)
            self.failureResultOf(testing.authenticate(plain, creds), UnauthorizedLogin)
        info = self.successResultOf(
            testing.authenticate(plain, testing.sasl_plain("alice", "lion", "daniel"))
        )
        testing.assert_auth_info(
            self, info,
            [("daniel", "SmtpAuthPlainAuthorization"), ("alice", "SmtpAuthPlainAuthentication")],
        )
        info = self.successResultOf(
            testing.authenticate(plain, testing.sasl_plain("alice", "lion", "alice"))
        )
        self.assertEqual(info.names(), {"alice"})

    def test_seed_socks(self):
        plain = load_checker("seedcheckers.auth_plain")
        socks = load_checker("seedcheckers.auth_socks")
        info = self.successResultOf(
            testing.authenticate([plain, socks], testing.rfc1929("proxyuser", "secretpassword"))
        )
        self.assertEqual(info.groups, ("proxy-users", "premium-tier"))
        self.failureResultOf(
            testing.authenticate([plain, socks], testing.rfc1929("daniel", "tiger")), UnauthorizedLogin
        )

    def test_readme_commands(self):
        with open(README, encoding="utf-8") as f:
            text = f.read()
        self.assertIn("make run", text)
        self.assertIn("make test", text)
