"""
Tests for L{gateway.checkers}: the checker chain, Twisted's strcred checkers
with str credentials, the gateway's own C{--auth} plugins, callable checkers
with the seed signatures, and C{--checker} name loading.
"""

from __future__ import annotations

from twisted.cred import strcred
from twisted.cred.checkers import (
    ICredentialsChecker,
    InMemoryUsernamePasswordDatabaseDontUse,
)
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet import defer
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from gateway import testing
from gateway.authinfo import IdentityContext
from gateway.checkers import (
    CallableChecker,
    CheckerChain,
    CheckerLoadError,
    http_server_validate_auth_basic,
    load_checker,
    proxy_server_auth_rfc1929,
    smtp_server_auth_plain,
)
from gateway.checkers.files import StoreError
from gateway.credentials import IRFC1929Credentials, ISASLCredentials
from tests.support import FixedChecker


class CheckerChainTests(SynchronousTestCase):
    def check(self, chain, creds=None):
        return chain.requestAvatarId(creds or testing.sasl_plain("daniel", "tiger"))

    def test_interface(self):
        chain = CheckerChain([FixedChecker("a"), FixedChecker("b", (IRFC1929Credentials,))])
        verifyObject(ICredentialsChecker, chain)
        self.assertEqual(chain.credentialInterfaces, (IUsernamePassword, IRFC1929Credentials))

    def test_first_acceptance_wins(self):
        first, second = FixedChecker("first"), FixedChecker("second")
        self.assertEqual(self.successResultOf(self.check(CheckerChain([first, second]))), "first")
        self.assertEqual((first.calls, second.calls), (1, 0))

    def test_rejection_passes_to_next(self):
        chain = CheckerChain([FixedChecker(UnauthorizedLogin()), FixedChecker("second")])
        self.assertEqual(self.successResultOf(self.check(chain)), "second")

    def test_none_and_false_are_rejections(self):
        chain = CheckerChain([FixedChecker(None), FixedChecker(False)])
        self.failureResultOf(self.check(chain), UnauthorizedLogin)

    def test_all_reject(self):
        chain = CheckerChain([FixedChecker(UnauthorizedLogin())] * 2)
        self.failureResultOf(self.check(chain), UnauthorizedLogin)

    def test_outage_beats_rejection(self):
        """A backend error is a temporary failure, not a wrong password."""
        chain = CheckerChain([FixedChecker(OSError("db down")), FixedChecker(UnauthorizedLogin())])
        self.failureResultOf(self.check(chain), OSError)

    def test_success_after_outage(self):
        """The next checker answers; the outage is still logged, without the password."""
        chain = CheckerChain([FixedChecker(OSError("db down for tiger")), FixedChecker("second")])
        with capturedLogs() as events:
            self.assertEqual(self.successResultOf(self.check(chain)), "second")
        [event] = events
        self.assertIn("failed: OSError: (message withheld", formatEvent(event))

    def test_only_matching_checkers_asked(self):
        socks_only = FixedChecker("socks", (IRFC1929Credentials,))
        sasl_only = FixedChecker("sasl", (ISASLCredentials,))
        chain = CheckerChain([socks_only, sasl_only])
        self.assertEqual(self.successResultOf(self.check(chain)), "sasl")
        self.assertEqual(socks_only.calls, 0)
        rfc = testing.rfc1929("u", "p")
        self.assertEqual(self.successResultOf(self.check(chain, rfc)), "socks")

    def test_unhandled(self):
        chain = CheckerChain([FixedChecker("x", (IRFC1929Credentials,))])
        self.failureResultOf(self.check(chain), UnhandledCredentials)

    def test_cancel(self):
        """Cancelling a pending login cancels the checker's Deferred."""
        cancelled = []
        pending = defer.Deferred(cancelled.append)

        @implementer(ICredentialsChecker)
        class Slow:
            credentialInterfaces = (IUsernamePassword,)

            def requestAvatarId(self, credentials):
                return pending

        d = self.check(CheckerChain([Slow()]))
        d.cancel()
        self.assertEqual(cancelled, [pending])
        self.failureResultOf(d, defer.CancelledError)


class StrcredCheckerTests(SynchronousTestCase):
    """Twisted's own --auth types authenticate the gateway's str credentials."""

    def login(self, description, user, password):
        checker = strcred.makeChecker(description)
        return testing.authenticate(checker, testing.sasl_plain(user, password))

    def test_memory(self):
        info = self.successResultOf(self.login("memory:daniel:tiger", "daniel", "tiger"))
        testing.assert_auth_info(self, info, ["daniel", "daniel"])
        self.failureResultOf(self.login("memory:daniel:tiger", "daniel", "lion"), UnauthorizedLogin)
        self.failureResultOf(self.login("memory:daniel:tiger", "bob", "tiger"), UnauthorizedLogin)

    def test_memory_utf8(self):
        info = self.successResultOf(self.login("memory:jürgen:pässwört", "jürgen", "pässwört"))
        self.assertEqual(info.names(), {"jürgen"})

    def write(self, text):
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def test_file(self):
        """FilePasswordDB keys users by bytes; str credentials still match."""
        path = self.write("daniel:tiger\njürgen:pässwört\n")
        info = self.successResultOf(self.login(f"file:{path}", "daniel", "tiger"))
        testing.assert_auth_info(
            self,
            info,
            [("daniel", "SmtpAuthPlainAuthorization"), ("daniel", "SmtpAuthPlainAuthentication")],
        )
        info = self.successResultOf(self.login(f"file:{path}", "jürgen", "pässwört"))
        self.assertEqual(info.names(), {"jürgen"})
        self.failureResultOf(self.login(f"file:{path}", "daniel", "lion"), UnauthorizedLogin)
        self.failureResultOf(self.login(f"file:{path}", "nobody", "tiger"), UnauthorizedLogin)

    def test_file_http_and_socks(self):
        path = self.write("daniel:tiger\n")
        checker = strcred.makeChecker(f"file:{path}")
        for creds, context in [
            (testing.http_basic("daniel", "tiger"), "HttpBasicAuth"),
            (testing.rfc1929("daniel", "tiger"), "ProxyAuthRfc1929"),
        ]:
            info = self.successResultOf(testing.authenticate(checker, creds))
            testing.assert_auth_info(self, info, [("daniel", context)])


class PluginTests(SynchronousTestCase):
    """The gateway's own --auth types (twisted/plugins/authgateway_checkers.py)."""

    def test_found_by_strcred(self):
        for name in ("htpasswd", "tokens"):
            factory = strcred.findCheckerFactory(name)
            self.assertEqual(factory.authType, name)
            self.assertRaises(StoreError, factory.generateChecker, "")
            self.assertRaises(StoreError, factory.generateChecker, self.mktemp())


# The seeds' Lua examples, in Python form.

def seed_auth_plain(authz, authc, password, conn_meta):
    password_database = {"daniel": "tiger"}
    if password == "":
        return False
    return password_database.get(authc) == password


PASSWORD_DATABASE = {"daniel": {"password": "tiger", "groups": ["group1", "group2"]}}


def seed_auth_plain_groups(authz, authc, password):
    entry = PASSWORD_DATABASE.get(authc)
    if not entry:
        return False
    if entry["password"] != password:
        return False
    return {
        "identities": [
            {"identity": authz, "context": "SmtpAuthPlainAuthorization"},
            {"identity": authc, "context": "SmtpAuthPlainAuthentication"},
        ],
        "groups": entry["groups"],
    }


def seed_auth_basic(user, password):
    entry = PASSWORD_DATABASE.get(user)
    if not entry or entry["password"] != password:
        return False
    return {"identities": [{"identity": user, "context": "HttpBasicAuth"}], "groups": entry["groups"]}


def five_arguments(a, b, c, d, e):
    return True


def seed_proxy_auth(username, password, conn_meta):
    password_database = {"proxyuser": "secretpassword"}
    if password == "":
        return False
    return password_database.get(username) == password


PROXY_DATABASE = {"proxyuser": {"password": "secretpassword", "groups": ["proxy-users", "premium-tier"]}}


def seed_proxy_auth_groups(username, password, conn_meta):
    entry = PROXY_DATABASE.get(username)
    if not entry:
        return False
    if entry["password"] != password:
        return False
    return {
        "identities": [{"identity": username, "context": "ProxyAuthRfc1929"}],
        "groups": entry["groups"],
    }


class CallableCheckerTests(SynchronousTestCase):
    def test_seed_auth_plain_bool(self):
        checker = smtp_server_auth_plain(seed_auth_plain)
        verifyObject(ICredentialsChecker, checker)
        info = self.successResultOf(testing.authenticate(checker, testing.sasl_plain("daniel", "tiger")))
        testing.assert_auth_info(
            self,
            info,
            [("daniel", "SmtpAuthPlainAuthorization"), ("daniel", "SmtpAuthPlainAuthentication")],
            groups=[],
            peer_address="192.0.2.10",
        )
        for user, password in [("daniel", "lion"), ("daniel", ""), ("bob", "tiger")]:
            self.failureResultOf(
                testing.authenticate(checker, testing.sasl_plain(user, password)), UnauthorizedLogin
            )

    def test_seed_auth_plain_groups(self):
        """The AuthInfo-returning variant (three parameters) keeps authz apart."""
        checker = CallableChecker(seed_auth_plain_groups)
        self.assertTrue(checker.sasl)
        creds = testing.sasl_plain("daniel", "tiger", authzid="sales@example.com")
        info = self.successResultOf(testing.authenticate(checker, creds))
        testing.assert_auth_info(
            self,
            info,
            [
                ("sales@example.com", "SmtpAuthPlainAuthorization"),
                ("daniel", "SmtpAuthPlainAuthentication"),
            ],
            groups=["group1", "group2"],
            peer_address="192.0.2.10",
        )

    def test_authzid_approval(self):
        """
        True approves the authentication identity only, even from a function
        that saw the authzid (issue 11: the seed's auth_plain never looks at
        it); a function grants an authzid by returning an AuthInfo naming it.
        """
        creds = testing.sasl_plain("daniel", "tiger", authzid="boss")
        for checker in (
            CallableChecker(lambda authz, authc, password, meta: authz == "boss"),
            smtp_server_auth_plain(seed_auth_plain),
            CallableChecker(seed_auth_plain),
            CallableChecker(lambda user, password, meta: True),
        ):
            self.failureResultOf(testing.authenticate(checker, creds), UnauthorizedLogin)

        def grants(authz, authc, password, meta):
            if authc != "daniel" or password != "tiger":
                return False
            if authz == "boss":
                return {"identities": [
                    {"identity": "boss", "context": "SmtpAuthPlainAuthorization"},
                    {"identity": "daniel", "context": "SmtpAuthPlainAuthentication"},
                ]}
            return True

        info = self.successResultOf(testing.authenticate(CallableChecker(grants), creds))
        self.assertEqual(info.identity_for(IdentityContext.SmtpAuthPlainAuthorization), "boss")
        self.assertEqual(info.identity_for(IdentityContext.SmtpAuthPlainAuthentication), "daniel")
        other = testing.sasl_plain("daniel", "tiger", authzid="sales")
        self.failureResultOf(testing.authenticate(CallableChecker(grants), other), UnauthorizedLogin)

    def test_true_for_other_protocols(self):
        """
        A SASL-style function asked about HTTP Basic or SOCKS (no authzid)
        gets the user name as authz, and True gives that protocol's identity.
        """
        seen = []

        def check(authz, authc, password, meta):
            seen.append(authz)
            return True

        for creds, context in [
            (testing.http_basic("daniel", "tiger"), "HttpBasicAuth"),
            (testing.rfc1929("daniel", "tiger"), "ProxyAuthRfc1929"),
        ]:
            info = self.successResultOf(testing.authenticate(CallableChecker(check), creds))
            testing.assert_auth_info(self, info, [("daniel", context)])
        self.assertEqual(seen, ["daniel", "daniel"])

    def test_sasl_detection_counts_required(self):
        """Optional trailing parameters do not make a function SASL-style."""
        self.assertFalse(CallableChecker(lambda user, password, meta=None, extra=None: True).sasl)
        self.assertTrue(CallableChecker(lambda a, b, c, d: True).sasl)
        self.assertTrue(CallableChecker(lambda authz, authc: True).sasl)

    def test_empty_authz_is_authc(self):
        seen = []
        checker = CallableChecker(lambda authz, authc, password, meta: seen.append(authz) or True)
        self.successResultOf(testing.authenticate(checker, testing.sasl_plain("daniel", "x")))
        self.assertEqual(seen, ["daniel"])

    def test_conn_meta_passed(self):
        seen = []

        def check(user, password, conn_meta):
            seen.append((conn_meta.protocol, conn_meta.peer_address, conn_meta.tls))
            conn_meta.state["checked"] = True
            return True

        creds = testing.rfc1929("proxyuser", "pw", peer="2001:db8::1")
        self.successResultOf(testing.authenticate(CallableChecker(check), creds))
        self.assertEqual(seen, [("socks", "2001:db8::1", False)])
        self.assertEqual(creds.conn_meta.state, {"checked": True})

    def test_seed_auth_basic(self):
        checker = http_server_validate_auth_basic(seed_auth_basic)
        info = self.successResultOf(testing.authenticate(checker, testing.http_basic("daniel", "tiger")))
        testing.assert_auth_info(self, info, [("daniel", "HttpBasicAuth")], groups=["group1", "group2"])
        self.failureResultOf(
            testing.authenticate(checker, testing.sasl_plain("daniel", "tiger")), UnhandledCredentials
        )

    def test_seed_proxy(self):
        for func in (seed_proxy_auth, seed_proxy_auth_groups):
            checker = proxy_server_auth_rfc1929(func)
            creds = testing.rfc1929("proxyuser", "secretpassword")
            info = self.successResultOf(testing.authenticate(checker, creds))
            testing.assert_auth_info(self, info, [("proxyuser", "ProxyAuthRfc1929")])
            self.failureResultOf(
                testing.authenticate(checker, testing.rfc1929("proxyuser", "")), UnauthorizedLogin
            )
        self.assertEqual(info.groups, ("proxy-users", "premium-tier"))

    def test_deferred_and_coroutine(self):
        async def coro(user, password, meta):
            return password == "ok"

        for func in (coro, lambda u, p: defer.succeed(p == "ok")):
            checker = CallableChecker(func)
            self.successResultOf(testing.authenticate(checker, testing.http_basic("u", "ok")))
            self.failureResultOf(
                testing.authenticate(checker, testing.http_basic("u", "no")), UnauthorizedLogin
            )

    def test_bad_return_is_an_error(self):
        """Something that is neither bool nor AuthInfo is a temporary failure."""
        checker = CallableChecker(lambda u, p: "yes")
        f = self.failureResultOf(testing.authenticate(checker, testing.http_basic("u", "p")), TypeError)
        self.assertIn("expected bool", str(f.value))

    def test_malformed_dict(self):
        """The realm validates a returned dict as for any checker: an error, not a login."""
        checker = CallableChecker(lambda u, p: {"identity": u})
        f = self.failureResultOf(testing.authenticate(checker, testing.http_basic("u", "p")), TypeError)
        self.assertIn("malformed AuthInfo", str(f.value))

    def test_signature_errors(self):
        self.assertRaises(TypeError, CallableChecker, lambda a, b, c, d, e: True)
        self.assertRaises(TypeError, CallableChecker, max)  # no readable signature
        self.assertRaises(TypeError, CallableChecker, lambda password: True)
        self.assertRaises(TypeError, CallableChecker, lambda u, p, *, realm: True)


@implementer(ICredentialsChecker)
class LoadableChecker:
    credentialInterfaces = (IUsernamePassword,)

    def requestAvatarId(self, credentials):
        return defer.succeed(credentials.username)


LOADABLE_INSTANCE = LoadableChecker()


def loadable_factory():
    return InMemoryUsernamePasswordDatabaseDontUse(daniel="tiger")


def not_a_checker_factory():
    return object()


def broken_factory():
    raise RuntimeError("config missing")


class LoadCheckerTests(SynchronousTestCase):
    def test_class_instance_factory(self):
        self.assertIsInstance(load_checker("tests.test_checkers.LoadableChecker"), LoadableChecker)
        self.assertIs(load_checker("tests.test_checkers.LOADABLE_INSTANCE"), LOADABLE_INSTANCE)
        checker = load_checker("tests.test_checkers.loadable_factory")
        self.assertIsInstance(checker, InMemoryUsernamePasswordDatabaseDontUse)

    def test_seed_function(self):
        checker = load_checker("tests.test_checkers.seed_auth_plain")
        self.assertIsInstance(checker, CallableChecker)
        self.successResultOf(testing.authenticate(checker, testing.sasl_plain("daniel", "tiger")))

    def test_errors(self):
        for name, words in [
            ("tests.test_checkers.NoSuchThing", "cannot import"),
            ("no_such_module_x.Checker", "cannot import"),
            ("tests.test_checkers.not_a_checker_factory", "not an ICredentialsChecker"),
            ("tests.test_checkers.broken_factory", "failed to start: config missing"),
            ("tests.test_checkers.PASSWORD_DATABASE", "neither a checker nor a callable"),
            ("builtins.max", "signature cannot be read"),
            ("tests.test_checkers.five_arguments", "requires 5 arguments"),
        ]:
            e = self.assertRaises(CheckerLoadError, load_checker, name)
            self.assertIn(words, str(e))
            self.assertNotIn("\n", str(e))
