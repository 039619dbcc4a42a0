"""
Tests for L{gateway.realm}: every checker result becomes one AuthInfo, with
the identity context of the credentials, the peer address and merged groups;
protocol avatars come from that AuthInfo; login events carry no secret.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.cred.portal import IRealm
from twisted.internet import defer, task
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import Interface, implementer
from zope.interface.verify import verifyObject

from gateway import testing
from gateway.authinfo import AuthInfo, IAuthInfo, IdentityContext
from gateway.checkers import CallableChecker
from gateway.checkers.throttle import Throttle
from gateway.credentials import IBearerToken
from gateway.errors import AuthBackendError, PoolFull, TemporaryFailure, Throttled
from gateway.groups import parse_groups
from gateway.realm import Realm, login, make_portal

GROUPS = parse_groups("staff: daniel\nadmins: boss\nsales: daniel proxyuser\n")


class AuthInfoForTests(SynchronousTestCase):
    def setUp(self):
        self.realm = Realm(groups=GROUPS)

    def pairs(self, info):
        return [(i.identity, i.context.value) for i in info.identities]

    def test_interface(self):
        verifyObject(IRealm, self.realm)

    def test_avatar_id_per_protocol(self):
        """A str or bytes avatar id gets the context of the credentials."""
        cases = [
            (testing.sasl_plain("daniel", "pw"), [
                ("daniel", "SmtpAuthPlainAuthorization"),
                ("daniel", "SmtpAuthPlainAuthentication"),
            ]),
            (testing.http_basic("daniel", "pw"), [("daniel", "HttpBasicAuth")]),
            (testing.bearer("tok"), [("daniel", "BearerToken")]),
            (testing.rfc1929("daniel", "pw"), [("daniel", "ProxyAuthRfc1929")]),
        ]
        for creds, expected in cases:
            for avatar_id in ("daniel", b"daniel"):
                info = self.realm.auth_info_for(avatar_id, creds)
                self.assertEqual(self.pairs(info), expected)
                self.assertEqual(info.peer_address, "192.0.2.10")
                self.assertEqual(info.groups, ("staff", "sales"))

    def test_unapproved_authzid_refused(self):
        """A bare avatar id does not approve acting as another authzid (RFC 4616)."""
        creds = testing.sasl_plain("daniel", "pw", authzid="boss")
        self.assertRaises(UnauthorizedLogin, self.realm.auth_info_for, "daniel", creds)
        same = testing.sasl_plain("daniel", "pw", authzid="daniel")
        self.assertEqual(self.realm.auth_info_for("daniel", same).names(), {"daniel"})

    def test_authzid_granted_by_policy(self):
        """Without the checker's approval, the realm's authorize hook may grant an authzid."""
        asked = []

        def authorize(info, authzid):
            asked.append((sorted(info.names()), authzid))
            return authzid == "sales@example.com"

        realm = Realm(authorize=authorize)
        creds = testing.sasl_plain("daniel", "pw", authzid="sales@example.com")
        info = realm.auth_info_for("daniel", creds)
        self.assertEqual(
            self.pairs(info),
            [("sales@example.com", "SmtpAuthPlainAuthorization"),
             ("daniel", "SmtpAuthPlainAuthentication")],
        )
        self.assertEqual(asked, [(["daniel"], "sales@example.com")])
        boss = testing.sasl_plain("daniel", "pw", authzid="boss")
        self.assertRaises(UnauthorizedLogin, realm.auth_info_for, "daniel", boss)

    def test_authzid_kept_without_its_groups(self):
        """An approved authorization identity is recorded but earns no group membership."""
        creds = testing.sasl_plain("daniel", "pw", authzid="boss")
        value = {
            "identities": [
                {"identity": "boss", "context": "SmtpAuthPlainAuthorization"},
                {"identity": "daniel", "context": "SmtpAuthPlainAuthentication"},
            ]
        }
        info = self.realm.auth_info_for(value, creds)
        self.assertEqual(
            self.pairs(info),
            [("boss", "SmtpAuthPlainAuthorization"), ("daniel", "SmtpAuthPlainAuthentication")],
        )
        self.assertNotIn("admins", info.groups)

    def test_checker_cannot_replace_the_authzid(self):
        """
        A checker's authorization identity is its approval of exactly the
        authzid requested (with none, of an identity that proved itself);
        any other one fails the login instead of replacing the request.
        """

        def names(authz):
            return {"identities": [
                {"identity": authz, "context": "SmtpAuthPlainAuthorization"},
                {"identity": "daniel", "context": "SmtpAuthPlainAuthentication"},
            ]}

        granting = Realm(authorize=lambda info, authzid: True)
        for realm in (self.realm, granting):
            for requested, listed in [("sales", "boss"), ("", "boss"), ("daniel", "boss"),
                                      ("sales", "daniel")]:
                creds = testing.sasl_plain("daniel", "pw", authzid=requested)
                self.assertRaises(UnauthorizedLogin, realm.auth_info_for, names(listed), creds)
            creds = testing.sasl_plain("daniel", "pw", authzid="sales")
            self.assertEqual(
                self.pairs(realm.auth_info_for(names("sales"), creds)),
                [("sales", "SmtpAuthPlainAuthorization"), ("daniel", "SmtpAuthPlainAuthentication")],
            )
            for requested in ("", "daniel"):
                creds = testing.sasl_plain("daniel", "pw", authzid=requested)
                self.assertEqual(realm.auth_info_for(names("daniel"), creds).names(), {"daniel"})

    def test_authorization_identity_without_sasl(self):
        """
        HTTP, SOCKS and Bearer logins have no authzid: an authorization
        identity from their checker must be one of the proved identities.
        """
        value = {"identities": [
            {"identity": "ceo", "context": "SmtpAuthPlainAuthorization"},
            {"identity": "daniel", "context": "HttpBasicAuth"},
        ]}
        for creds in (testing.http_basic("daniel", "pw"), testing.rfc1929("daniel", "pw"),
                      testing.bearer("tok"), None):
            self.assertRaises(UnauthorizedLogin, self.realm.auth_info_for, value, creds)
        same = {"identities": [
            {"identity": "daniel", "context": "SmtpAuthPlainAuthorization"},
            {"identity": "daniel", "context": "HttpBasicAuth"},
        ]}
        self.assertEqual(self.realm.auth_info_for(same, testing.http_basic("daniel", "pw")).names(),
                         {"daniel"})

    def test_only_authorization_identities(self):
        """An AuthInfo naming whom to act as but nobody who proved it is no login."""
        value = {"identities": [{"identity": "sales", "context": "SmtpAuthPlainAuthorization"}]}
        for authzid in ("sales", ""):
            creds = testing.sasl_plain("daniel", "pw", authzid=authzid)
            self.assertRaises(UnauthorizedLogin, self.realm.auth_info_for, value, creds)

    def test_authorize_sees_groups_and_peer(self):
        """The authorize hook sees the C{--groups} groups and the connection's peer."""
        asked = []

        def authorize(info, authzid):
            asked.append((info.groups, info.peer_address, self.pairs(info)))
            return "staff" in info.groups

        realm = Realm(groups=GROUPS, authorize=authorize)
        creds = testing.sasl_plain("daniel", "pw", authzid="sales", peer="192.0.2.99")
        info = realm.auth_info_for("daniel", creds)
        self.assertEqual(asked, [(("staff", "sales"), "192.0.2.99",
                                  [("daniel", "SmtpAuthPlainAuthentication")])])
        self.assertEqual(
            self.pairs(info),
            [("sales", "SmtpAuthPlainAuthorization"), ("daniel", "SmtpAuthPlainAuthentication")],
        )
        self.assertEqual(info.groups, ("staff", "sales"))
        self.assertRaises(UnauthorizedLogin, realm.auth_info_for, "proxyuser",
                          testing.sasl_plain("proxyuser", "pw", authzid="daniel"))

    def test_authzid_never_an_identity(self):
        """An authzid with control characters is a failed login, not a checker error."""
        realm = Realm(authorize=lambda info, authzid: True)
        for authzid in ("a\x01b", "ceo\r\nX-Injected: 1", "\x7f"):
            creds = testing.sasl_plain("daniel", "pw", authzid=authzid)
            self.assertRaises(UnauthorizedLogin, realm.auth_info_for, "daniel", creds)

    def test_no_mind(self):
        info = self.realm.auth_info_for("daniel", None)
        self.assertEqual(self.pairs(info), [("daniel", "GenericAuth")])
        self.assertIsNone(info.peer_address)

    def test_auth_info_and_dict(self):
        returned = {
            "identities": [{"identity": "proxyuser", "context": "ProxyAuthRfc1929"}],
            "groups": ["premium-tier", "sales"],
        }
        creds = testing.rfc1929("proxyuser", "pw", peer="::ffff:198.51.100.7")
        for value in (returned, AuthInfo.from_json_dict(returned)):
            info = self.realm.auth_info_for(value, creds)
            self.assertEqual(self.pairs(info), [("proxyuser", "ProxyAuthRfc1929")])
            self.assertEqual(info.groups, ("premium-tier", "sales"))
            self.assertEqual(info.peer_address, "198.51.100.7")

    def test_connection_peer_wins(self):
        """The connection's peer replaces a checker's peer_address; without one it is kept."""
        value = {"identities": [{"identity": "x"}], "peer_address": "203.0.113.9"}
        info = self.realm.auth_info_for(value, testing.http_basic("x", "pw"))
        self.assertEqual(info.peer_address, "192.0.2.10")
        info = self.realm.auth_info_for(value, testing.http_basic("x", "pw", peer="/run/sock"))
        self.assertEqual(info.peer_address, "203.0.113.9")
        self.assertEqual(self.realm.auth_info_for(value).peer_address, "203.0.113.9")

    def test_fail_closed(self):
        """No identity means no login, whatever shape the checker chose."""
        creds = testing.rfc1929("u", "p")
        for value in ("", b"", {}, {"identities": []}, AuthInfo(groups=["g"])):
            self.assertRaises(UnauthorizedLogin, self.realm.auth_info_for, value, creds)

    def test_unusable_results(self):
        creds = testing.http_basic("u", "p")
        for value, words in [
            (42, "expected an avatar id"),
            (True, "expected an avatar id"),
            (b"\xff", "not UTF-8"),
            ({"identities": "daniel"}, "malformed AuthInfo"),
            ({"user": "daniel"}, "malformed AuthInfo"),
        ]:
            e = self.assertRaises(TypeError, self.realm.auth_info_for, value, creds)
            self.assertIn(words, str(e))


class IMessageDelivery(Interface):
    """Stands in for a front door's avatar interface."""


class RequestAvatarTests(SynchronousTestCase):
    def test_auth_info(self):
        iface, avatar, logout = Realm().requestAvatar("daniel", testing.http_basic("daniel", "p"), IAuthInfo)
        self.assertIs(iface, IAuthInfo)
        verifyObject(IAuthInfo, avatar)
        self.assertIsNone(logout())

    def test_registered_factory(self):
        made = []

        class Delivery:
            def __init__(self, info, mind):
                made.append((info, mind))
                self.logged_out = False

            def logout(self):
                self.logged_out = True

        realm = Realm()
        realm.register_avatar(IMessageDelivery, Delivery)
        creds = testing.sasl_plain("daniel", "p")
        iface, avatar, logout = realm.requestAvatar("daniel", creds, IMessageDelivery, IAuthInfo)
        self.assertIs(iface, IMessageDelivery)
        self.assertEqual(made[0][0].names(), {"daniel"})
        self.assertIs(made[0][1], creds)
        logout()
        self.assertTrue(avatar.logged_out)

    def test_unknown_interface(self):
        self.assertRaises(
            NotImplementedError, Realm().requestAvatar, "daniel", None, IMessageDelivery
        )


SECRET = "s3cr3t-Pa55"


@implementer(ICredentialsChecker)
class SecretLeakingChecker:
    """A careless checker whose exception message contains the password."""

    credentialInterfaces = (IUsernamePassword,)

    def requestAvatarId(self, credentials):
        raise ValueError(f"backend refused {credentials.username}/{credentials.password}")


@implementer(ICredentialsChecker)
class PendingChecker:
    credentialInterfaces = (IUsernamePassword,)

    def __init__(self):
        self.pending = defer.Deferred()

    def requestAvatarId(self, credentials):
        return self.pending


class LoginTests(SynchronousTestCase):
    def setUp(self):
        self.events = []
        self.log = Logger(observer=self.events.append)

    def portal(self, *checkers):
        return make_portal(Realm(groups=GROUPS), checkers)

    def assertNoSecret(self):
        for event in self.events:
            self.assertNotIn(SECRET, formatEvent(event))
            self.assertNotIn(SECRET, repr(event))

    def test_success_event(self):
        portal = self.portal(CallableChecker(lambda u, p: p == SECRET))
        creds = testing.sasl_plain("daniel", SECRET, mechanism="LOGIN", peer="198.51.100.1")
        iface, info, _ = self.successResultOf(login(portal, creds, log=self.log))
        self.assertIs(iface, IAuthInfo)
        [event] = self.events
        self.assertEqual(
            {k: event[k] for k in ("outcome", "protocol", "mechanism", "identity", "peer_address", "tls")},
            {
                "outcome": "success",
                "protocol": "smtp",
                "mechanism": "LOGIN",
                "identity": "daniel",
                "peer_address": "198.51.100.1",
                "tls": True,
            },
        )
        self.assertEqual(event["groups"], ["staff", "sales"])
        self.assertEqual(
            formatEvent(event), "auth success: smtp LOGIN identity='daniel' peer=198.51.100.1"
        )
        self.assertNoSecret()

    def test_failure_event(self):
        portal = self.portal(CallableChecker(lambda u, p: False))
        self.failureResultOf(login(portal, testing.http_basic("bob", SECRET), log=self.log), UnauthorizedLogin)
        [event] = self.events
        self.assertEqual((event["outcome"], event["identity"], event["mechanism"]), ("failure", "bob", "Basic"))
        self.assertNoSecret()

    def test_error_event_withheld(self):
        """A checker error naming the password: the event says where, never what."""
        portal = self.portal(SecretLeakingChecker())
        f = self.failureResultOf(login(portal, testing.rfc1929("bob", SECRET), log=self.log), AuthBackendError)
        self.assertIsInstance(f.value, TemporaryFailure)
        self.assertNotIn(SECRET, f.getTraceback())  # what the front door gets is clean too
        [event] = self.events
        self.assertEqual((event["outcome"], event["error_type"]), ("error", "ValueError"))
        self.assertIn("message withheld", event["error"])
        self.assertIn("requestAvatarId", event["traceback"])
        self.assertNoSecret()

    def test_error_message_kept_when_clean(self):
        @implementer(ICredentialsChecker)
        class Down:
            credentialInterfaces = (IUsernamePassword,)

            def requestAvatarId(self, credentials):
                raise ConnectionError("ldap.example: connection refused")

        self.failureResultOf(login(self.portal(Down()), testing.rfc1929("bob", SECRET), log=self.log), AuthBackendError)
        self.assertEqual(self.events[0]["error"], "ldap.example: connection refused")

    def test_no_partial_redaction(self):
        """A password that is a common word does not turn file names into hints."""
        @implementer(ICredentialsChecker)
        class Down:
            credentialInterfaces = (IUsernamePassword,)

            def requestAvatarId(self, credentials):
                raise ConnectionError("see twisted/internet/defer.py")

        self.failureResultOf(login(self.portal(Down()), testing.rfc1929("bob", "defer"), log=self.log), AuthBackendError)
        self.assertIn("message withheld", self.events[0]["error"])
        self.assertNotIn("[REDACTED]", formatEvent(self.events[0]))

    def test_escaped_secret_withheld(self):
        """The bytes repr of a non-ASCII password is caught too."""
        password = "p\u00e4ssw\u00f6rt\tx"

        @implementer(ICredentialsChecker)
        class Leaky:
            credentialInterfaces = (IUsernamePassword,)

            def requestAvatarId(self, credentials):
                raise ValueError(credentials.password.encode("utf-8"))

        self.failureResultOf(login(self.portal(Leaky()), testing.rfc1929("bob", password), log=self.log), AuthBackendError)
        self.assertIn("message withheld", self.events[0]["error"])

    def test_checker_failure_message_dropped(self):
        """UnauthorizedLogin reaches the front door without the checker's text."""
        @implementer(ICredentialsChecker)
        class Chatty:
            credentialInterfaces = (IUsernamePassword,)

            def requestAvatarId(self, credentials):
                raise UnauthorizedLogin(f"wrong password {credentials.password}")

        f = self.failureResultOf(login(self.portal(Chatty()), testing.rfc1929("bob", SECRET), log=self.log), UnauthorizedLogin)
        self.assertNotIn(SECRET, f.getTraceback())

    def test_token_withheld(self):
        @implementer(ICredentialsChecker)
        class TokenLeaker:
            credentialInterfaces = (IBearerToken,)

            def requestAvatarId(self, credentials):
                raise KeyError(credentials.token)

        portal = self.portal(TokenLeaker())
        self.failureResultOf(login(portal, testing.bearer(SECRET), log=self.log), AuthBackendError)
        self.assertEqual(self.events[0]["identity"], None)
        self.assertNoSecret()

    def test_unsupported_event(self):
        f = self.failureResultOf(
            login(self.portal(CallableChecker(lambda u, p: True)), testing.bearer(SECRET), log=self.log),
            UnhandledCredentials,
        )
        self.assertEqual(self.events[0]["outcome"], "unsupported")
        self.assertNotIn("Traceback", formatEvent(self.events[0]))
        self.assertNotIn(SECRET, f.getTraceback())

    def test_front_door_avatar_event_has_identities(self):
        """A protocol avatar exposing auth_info still gets its identities logged."""
        class IWidget(Interface):
            pass

        realm = Realm()
        realm.register_avatar(IWidget, lambda info, mind: type("Avatar", (), {"auth_info": info})())
        portal = make_portal(realm, [CallableChecker(lambda u, p: True)])
        self.successResultOf(login(portal, testing.http_basic("bob", SECRET), IWidget, log=self.log))
        self.assertEqual(self.events[0]["identities"], [{"identity": "bob", "context": "HttpBasicAuth"}])

    def test_cancelled_event(self):
        checker = PendingChecker()
        d = login(self.portal(checker), testing.rfc1929("bob", SECRET), log=self.log)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(self.events[0]["outcome"], "cancelled")

    def test_cancelled_events_rate_limited(self):
        """
        Abandoned attempts from one peer (connect, send credentials, hang up)
        get one line a minute, the next saying how many were left out.
        """
        clock = task.Clock()
        throttle = Throttle(clock, max_failures=100, max_peer_failures=100)
        @implementer(ICredentialsChecker)
        class Stuck:
            credentialInterfaces = (IUsernamePassword,)

            def requestAvatarId(self, credentials):
                return defer.Deferred()

        portal = make_portal(Realm(), [Stuck()], throttle=throttle)
        for i in range(50):
            d = login(portal, testing.rfc1929(f"user{i}", SECRET, peer="198.51.100.1"), log=self.log)
            d.cancel()
            self.failureResultOf(d, defer.CancelledError)
        self.assertEqual([e["outcome"] for e in self.events], ["cancelled"])
        clock.advance(60)
        d = login(portal, testing.rfc1929("bob", SECRET, peer="198.51.100.1"), log=self.log)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(len(self.events), 2)
        self.assertIn("(49 more like it not logged)", formatEvent(self.events[1]))
        # Another peer has its own line.
        d = login(portal, testing.rfc1929("bob", SECRET, peer="198.51.100.2"), log=self.log)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(len(self.events), 3)
        self.assertNoSecret()

    def test_unsupported_and_error_events_rate_limited(self):
        """
        Credentials no checker handles (a Bearer token without a token store)
        and input that makes a checker fail cost no throttle: their lines are
        limited to one a minute per peer and kind.
        """
        clock = task.Clock()

        @implementer(ICredentialsChecker)
        class Broken:
            credentialInterfaces = (IUsernamePassword,)

            def requestAvatarId(self, credentials):
                raise ValueError("backend down")

        portal = make_portal(Realm(), [Broken()], throttle=Throttle(clock))
        for _ in range(100):
            self.failureResultOf(login(portal, testing.bearer(SECRET, peer="198.51.100.1"),
                                       log=self.log), UnhandledCredentials)
            self.failureResultOf(login(portal, testing.rfc1929("bob", SECRET, peer="198.51.100.1"),
                                       log=self.log), AuthBackendError)
        self.assertEqual([e["outcome"] for e in self.events], ["unsupported", "error"])
        clock.advance(60)
        self.failureResultOf(login(portal, testing.bearer(SECRET, peer="198.51.100.1"),
                                   log=self.log), UnhandledCredentials)
        self.assertIn("(99 more like it not logged)", formatEvent(self.events[-1]))
        self.assertNoSecret()

    def test_throttled_event(self):
        """With a throttle, the Nth failure is refused; the event says so without a traceback."""
        clock = task.Clock()
        throttle = Throttle(clock, max_failures=1, delay=0, max_delay=0)
        portal = make_portal(Realm(), [CallableChecker(lambda u, p: False)], throttle=throttle)
        creds = testing.http_basic("bob", SECRET, peer="198.51.100.1")
        self.failureResultOf(login(portal, creds, log=self.log), UnauthorizedLogin)
        self.failureResultOf(login(portal, creds, log=self.log), Throttled)
        self.assertEqual([e["outcome"] for e in self.events], ["failure", "throttled"])
        self.assertNotIn("Traceback", formatEvent(self.events[1]))
        self.assertIn("too many failed logins", formatEvent(self.events[1]))
        self.assertNoSecret()

    def test_temporary_event(self):
        @implementer(ICredentialsChecker)
        class Busy:
            credentialInterfaces = (IUsernamePassword,)

            def requestAvatarId(self, credentials):
                raise PoolFull()

        self.failureResultOf(login(self.portal(Busy()), testing.rfc1929("bob", SECRET), log=self.log), PoolFull)
        self.assertEqual(self.events[0]["outcome"], "temporary")
        self.assertEqual(formatEvent(self.events[0]),
                         "auth deferred: socks RFC1929 identity='bob' peer=192.0.2.10: "
                         "password verification queue is full")


NAMES = st.sampled_from(["", "daniel", "ceo", "sales", "a/b"])
CONTEXTS = st.sampled_from(list(IdentityContext))


class AuthorizationPropertyTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(
        authzid=NAMES,
        authcid=NAMES.filter(bool),
        result=st.one_of(
            NAMES.filter(bool),
            st.lists(st.tuples(NAMES.filter(bool), CONTEXTS), max_size=3).map(
                lambda ids: {"identities": [{"identity": n, "context": c.value} for n, c in ids]}
            ),
        ),
        grants=st.frozensets(NAMES.filter(bool)),
        protocol=st.sampled_from(["smtp", "http", "socks"]),
    )
    def test_no_unapproved_authorization(self, authzid, authcid, result, grants, protocol):
        """
        Whatever a checker returns, a session acts only as an identity that
        proved itself, as the authzid the checker named, or as one the hook
        granted; never as an authzid the client merely asked for.
        """
        asked = []

        def authorize(info, name):
            asked.append(name)
            return name in grants

        if protocol == "smtp":
            creds = testing.sasl_plain(authcid, "pw", authzid)
        elif protocol == "http":
            creds = testing.http_basic(authcid, "pw")
        else:
            creds = testing.rfc1929(authcid, "pw")
        try:
            info = Realm(authorize=authorize).auth_info_for(result, creds)
        except UnauthorizedLogin:
            return
        authz = {i.identity for i in info.identities
                 if i.context is IdentityContext.SmtpAuthPlainAuthorization}
        proven = {i.identity for i in info.identities
                  if i.context is not IdentityContext.SmtpAuthPlainAuthorization}
        self.assertTrue(proven)
        listed = isinstance(result, dict) and any(
            i["identity"] == authzid and i["context"] == "SmtpAuthPlainAuthorization"
            for i in result["identities"]
        )
        for name in authz:
            requested = authzid if protocol == "smtp" else ""
            if requested:
                self.assertEqual(name, requested)
                self.assertTrue(name in proven or listed or name in asked and name in grants)
            else:
                self.assertIn(name, proven)
        if protocol != "smtp":
            self.assertEqual(asked, [])
