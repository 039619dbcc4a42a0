"""
Tests for L{gateway.testing}, and the README's example checker run with its
own trial test, exactly as the README shows them.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet import task
from twisted.trial import reporter, runner
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from gateway import testing
from gateway.acl import AccessControlMap, parse_acl
from gateway.authinfo import AuthInfo
from gateway.checkers import CallableChecker, hashes, load_checker
from gateway.checkers.hashing import IHashingChecker, InlinePool, Verifier
from gateway.checkers.htpasswd import HtpasswdChecker, add_user
from gateway.credentials import (
    BearerToken,
    HTTPBasicCredentials,
    RFC1929Credentials,
    SASLCredentials,
)
from gateway.groups import ConfigError
from tests.support import ManualPool

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


class HashingCheckerTests(SynchronousTestCase):
    """A hashing checker in a unit test: no reactor, no thread, results at once."""

    def setUp(self):
        self.path = self.mktemp()
        add_user(self.path, "daniel", "tiger", groups=["staff"], scheme="bcrypt", cost=4)

    def test_htpasswd_checker_on_its_own(self):
        """Built without a verifier (as a user's test would), it answers synchronously."""
        checker = HtpasswdChecker(self.path)
        info = self.successResultOf(
            testing.authenticate(checker, testing.http_basic("daniel", "tiger"))
        )
        testing.assert_auth_info(self, info, [("daniel", "HttpBasicAuth")], groups=["staff"])
        for user, password in [("daniel", "lion"), ("mallory", "tiger")]:
            self.failureResultOf(
                testing.authenticate(checker, testing.http_basic(user, password)), UnauthorizedLogin
            )

    def test_inline_verifier(self):
        clock = task.Clock()
        verifier = testing.inline_verifier(clock, ttl=60)
        self.assertIsInstance(verifier.pool, InlinePool)
        self.assertIs(verifier.clock, clock)
        self.assertEqual(verifier.ttl, 60)
        self.assertTrue(self.successResultOf(verifier.verify("u", "tiger", hashes.make_hash(
            "tiger", "sha512-crypt", cost=1000))))
        self.assertIsNot(testing.inline_verifier(), verifier)  # each test its own cache

    def test_inline_verifier_cache(self):
        """With a task.Clock, a test sees successes cached for ttl seconds, failures never."""
        clock = task.Clock()
        checker = HtpasswdChecker(self.path, verifier=testing.inline_verifier(clock, ttl=60))
        right, wrong = testing.http_basic("daniel", "tiger"), testing.http_basic("daniel", "lion")
        for _ in range(2):
            self.successResultOf(testing.authenticate(checker, right))
            self.failureResultOf(testing.authenticate(checker, wrong), UnauthorizedLogin)
        self.assertEqual((checker.verifier.hits, checker.verifier.misses), (1, 3))
        clock.advance(61)
        self.successResultOf(testing.authenticate(checker, right))
        self.assertEqual((checker.verifier.hits, checker.verifier.misses), (1, 4))


class AuthorizeHookTests(SynchronousTestCase):
    def setUp(self):
        self.checker = CallableChecker(lambda authz, authc, password, meta: password == "tiger")
        self.asked = []

    def grant(self, info, authzid):
        self.asked.append((sorted(info.names()), info.groups, authzid))
        return authzid == "sales" and "staff" in info.groups

    def test_grants_a_foreign_authzid(self):
        creds = testing.sasl_plain("daniel", "tiger", "sales")
        info = self.successResultOf(testing.authenticate(
            self.checker, creds, groups={"staff": ["daniel"]}, authorize=self.grant
        ))
        testing.assert_auth_info(
            self, info,
            [("sales", "SmtpAuthPlainAuthorization"), ("daniel", "SmtpAuthPlainAuthentication")],
            groups=["staff"],
        )
        # Asked about the session that proved itself: its groups, not the authzid yet.
        self.assertEqual(self.asked, [(["daniel"], ("staff",), "sales")])

    def test_refusal(self):
        for authzid, groups in [("ceo", {"staff": ["daniel"]}), ("sales", {})]:
            creds = testing.sasl_plain("daniel", "tiger", authzid)
            self.failureResultOf(
                testing.authenticate(self.checker, creds, groups=groups, authorize=self.grant),
                UnauthorizedLogin,
            )

    def test_not_asked_without_a_foreign_authzid(self):
        for authzid in ("", "daniel"):
            creds = testing.sasl_plain("daniel", "tiger", authzid)
            info = self.successResultOf(
                testing.authenticate(self.checker, creds, authorize=self.grant)
            )
            self.assertEqual(info.names(), {"daniel"})
        self.assertEqual(self.asked, [])

    def test_acl_and_authorize(self):
        creds = testing.sasl_plain("daniel", "tiger", "sales")
        self.assertRaises(
            TypeError, testing.authenticate, self.checker, creds,
            acl=AccessControlMap({}), authorize=self.grant,
        )


class PolicyTests(SynchronousTestCase):
    ACL = """
        [[acl."socks/destination"]]
        allow = true
        privileges = ["connect"]
        identity.Group = "premium-tier"

        [[acl."smtp/authz/sales"]]
        allow = true
        privileges = ["authorize"]
        identity.Individual = "daniel"
    """

    def test_query(self):
        """Indented TOML, as in a test's triple-quoted string, parses as --acl would."""
        policy = testing.policy(self.ACL)
        self.assertEqual(policy, parse_acl(self.ACL.replace("\n        ", "\n")))
        premium = AuthInfo.from_json_dict(
            {"identities": [{"identity": "p", "context": "ProxyAuthRfc1929"}],
             "groups": ["premium-tier"]}
        )
        basic = AuthInfo.from_json_dict(
            {"identities": [{"identity": "b", "context": "ProxyAuthRfc1929"}]}
        )
        self.assertTrue(policy.query_resource_access(premium, "socks/destination", "connect"))
        self.assertFalse(policy.query_resource_access(premium, "socks/destination", "bind"))
        self.assertFalse(policy.query_resource_access(basic, "socks/destination", "connect"))

    def test_as_acl(self):
        checker = CallableChecker(lambda authz, authc, password, meta: password == "tiger")
        acl = testing.policy(self.ACL)
        info = self.successResultOf(
            testing.authenticate(checker, testing.sasl_plain("daniel", "tiger", "sales"), acl=acl)
        )
        self.assertEqual(info.names(), {"sales", "daniel"})
        self.failureResultOf(
            testing.authenticate(checker, testing.sasl_plain("alice", "tiger", "sales"), acl=acl),
            UnauthorizedLogin,
        )

    def test_malformed(self):
        e = self.assertRaises(ConfigError, testing.policy, '[[acl."x"]]\nallow = true\n')
        self.assertIn("<testing.policy>", str(e))
        self.assertIn("privileges", str(e))


GATEWAY = os.path.join(os.path.dirname(README), "gateway")

#: Modules that may import the global reactor: twistd's entry point only.
REACTOR_ALLOWED = {"tap.py"}


def imports_global_reactor(source: str) -> bool:
    """Whether Python source imports C{twisted.internet.reactor}, at any depth."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module == "twisted.internet":
            if any(alias.name == "reactor" for alias in node.names):
                return True
        if isinstance(node, ast.ImportFrom) and node.module == "twisted.internet.reactor":
            return True
        if isinstance(node, ast.Import):
            if any(alias.name == "twisted.internet.reactor" for alias in node.names):
                return True
    return False


class NoHiddenReactorTests(SynchronousTestCase):
    """Everything but twistd's entry point gets its reactor and thread pools passed in."""

    def test_scanner(self):
        for source in (
            "from twisted.internet import defer, reactor",
            "import twisted.internet.reactor",
            "def f():\n    from twisted.internet import reactor\n",
        ):
            self.assertTrue(imports_global_reactor(source), source)
        for source in ("from twisted.internet import defer", "reactor = None", "import twisted"):
            self.assertFalse(imports_global_reactor(source), source)

    def test_no_module_imports_the_global_reactor(self):
        found = []
        for directory, _, names in os.walk(GATEWAY):
            for name in names:
                path = os.path.join(directory, name)
                relative = os.path.relpath(path, GATEWAY)
                if name.endswith(".py") and relative not in REACTOR_ALLOWED:
                    with open(path, encoding="utf-8") as f:
                        if imports_global_reactor(f.read()):
                            found.append(relative)
        self.assertEqual(found, [])

    def test_checker_test_installs_no_reactor(self):
        """
        A user's checker test (gateway.testing, the stores and strcred's
        plugins, a login through each) never installs the global reactor,
        nor does importing the gateway's front doors (gateway.tap).
        """
        code = (
            "import sys\n"
            "from gateway import testing\n"
            "from gateway.checkers import load_checker\n"
            "from gateway.checkers.htpasswd import HtpasswdChecker, add_user\n"
            "from gateway.checkers.plainfile import PlainFileChecker\n"
            "from gateway.checkers.tokens import TokenChecker, add_token\n"
            "import twisted.plugins.authgateway_checkers\n"
            "import gateway.tap\n"
            "path = sys.argv[1]\n"
            "add_user(path + '.htpasswd', 'daniel', 'tiger', scheme='bcrypt', cost=4)\n"
            "token, _ = add_token(path + '.tokens', 'bot')\n"
            "open(path + '.plain', 'w').write('daniel:tiger\\n')\n"
            "results = []\n"
            "for checker, creds in [\n"
            "    (HtpasswdChecker(path + '.htpasswd'), testing.http_basic('daniel', 'tiger')),\n"
            "    (TokenChecker(path + '.tokens'), testing.bearer(token)),\n"
            "    (PlainFileChecker(path + '.plain'), testing.rfc1929('daniel', 'tiger')),\n"
            "]:\n"
            "    testing.authenticate(checker, creds).addBoth(results.append)\n"
            "print(sorted(min(i.names()) for i in results),\n"
            "      'twisted.internet.reactor' in sys.modules)\n"
        )
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        env = dict(os.environ, PYTHONPATH=os.path.dirname(README))
        done = subprocess.run(
            [sys.executable, "-c", code, os.path.join(directory, "store")],
            capture_output=True, text=True, timeout=60, env=env,
        )
        self.assertEqual((done.returncode, done.stderr), (0, ""))
        self.assertEqual(done.stdout.strip(), "['bot', 'daniel', 'daniel'] False")


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
        self.assertEqual(result.testsRun, 8)
        self.assertTrue(result.wasSuccessful())

    def test_loadable_with_checker_option(self):
        checker = load_checker("mychecker.OfficeChecker")
        creds = testing.sasl_plain("daniel", "tiger", peer="192.0.2.1")
        self.assertEqual(self.successResultOf(testing.authenticate(checker, creds)).groups, ("staff",))

    def test_hashing_example_takes_the_services_verifier(self):
        """
        The README's DirectoryChecker verifies inline on its own, and takes
        the Verifier the gateway's service hands it.
        """
        from mychecker import DirectoryChecker

        checker = DirectoryChecker({"daniel": hashes.make_hash("tiger", "bcrypt", cost=4)})
        verifyObject(IHashingChecker, checker)
        self.assertIsInstance(checker.verifier.pool, InlinePool)
        self.successResultOf(testing.authenticate(checker, testing.http_basic("daniel", "tiger")))
        pool = ManualPool()
        checker.use_verifier(Verifier(hashes.verify, pool))
        d = testing.authenticate(checker, testing.http_basic("daniel", "tiger"))
        self.assertNoResult(d)
        self.assertEqual(len(pool.jobs), 1)
        pool.finish_all()
        self.successResultOf(d)

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
