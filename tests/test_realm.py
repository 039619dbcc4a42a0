"""
Tests for L{gateway.realm}: every checker result becomes one AuthInfo, with
the identity context of the credentials, the peer address and merged groups;
protocol avatars come from that AuthInfo; login events carry no secret.
"""

from __future__ import annotations

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.internet import defer
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import Interface, implementer
from zope.interface.verify import verifyObject

from gateway import testing
from gateway.aaa import parse_groups
from gateway.authinfo import AuthInfo, IAuthInfo
from gateway.checkers import CallableChecker
from gateway.credentials import IBearerToken
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

    def test_authzid_kept_without_its_groups(self):
        """An authorization identity is recorded but earns no group membership."""
        creds = testing.sasl_plain("daniel", "pw", authzid="boss")
        info = self.realm.auth_info_for("daniel", creds)
        self.assertEqual(
            self.pairs(info),
            [("boss", "SmtpAuthPlainAuthorization"), ("daniel", "SmtpAuthPlainAuthentication")],
        )
        self.assertNotIn("admins", info.groups)

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

    def test_checker_peer_address_kept(self):
        value = {"identities": [{"identity": "x"}], "peer_address": "203.0.113.9"}
        info = self.realm.auth_info_for(value, testing.http_basic("x", "pw"))
        self.assertEqual(info.peer_address, "203.0.113.9")

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
            {k: event[k] for k in ("outcome", "protocol", "mechanism", "identity", "peer", "tls")},
            {
                "outcome": "success",
                "protocol": "smtp",
                "mechanism": "LOGIN",
                "identity": "daniel",
                "peer": "198.51.100.1",
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

    def test_error_event_redacted(self):
        portal = self.portal(SecretLeakingChecker())
        self.failureResultOf(login(portal, testing.rfc1929("bob", SECRET), log=self.log), ValueError)
        [event] = self.events
        self.assertEqual((event["outcome"], event["error_type"]), ("error", "ValueError"))
        self.assertIn("backend refused bob/[REDACTED]", event["error"])
        self.assertNoSecret()

    def test_token_redacted(self):
        @implementer(ICredentialsChecker)
        class TokenLeaker:
            credentialInterfaces = (IBearerToken,)

            def requestAvatarId(self, credentials):
                raise KeyError(credentials.token)

        portal = self.portal(TokenLeaker())
        self.failureResultOf(login(portal, testing.bearer(SECRET), log=self.log), KeyError)
        self.assertEqual(self.events[0]["identity"], None)
        self.assertNoSecret()

    def test_cancelled_event(self):
        checker = PendingChecker()
        d = login(self.portal(checker), testing.rfc1929("bob", SECRET), log=self.log)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(self.events[0]["outcome"], "cancelled")
