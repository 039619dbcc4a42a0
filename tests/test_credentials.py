"""
Tests for L{gateway.meta} (connection metadata) and L{gateway.credentials}.
"""

from __future__ import annotations

import attrs
from twisted.cred.credentials import IUsernamePassword
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import directlyProvides
from zope.interface.verify import verifyObject

from gateway.addresses import normalize_ip
from gateway.authinfo import Identity, IdentityContext
from gateway.credentials import (
    BearerToken,
    HTTPBasicCredentials,
    IBearerToken,
    IConnectionCredentials,
    IHTTPBasicCredentials,
    IRFC1929Credentials,
    ISASLCredentials,
    RFC1929Credentials,
    SASLCredentials,
    UsernamePassword,
    constant_time_equal,
    identities_of,
)
from gateway.meta import ConnectionMeta

SECRET = "s3cr3t-Pa55"


class NormalizeIPTests(SynchronousTestCase):
    def test_ipv4(self) -> None:
        """An IPv4 address is unchanged."""
        self.assertEqual(normalize_ip("192.0.2.7"), "192.0.2.7")

    def test_ipv4Mapped(self) -> None:
        """An IPv4-mapped IPv6 address is folded to IPv4."""
        self.assertEqual(normalize_ip("::ffff:192.0.2.7"), "192.0.2.7")
        self.assertEqual(normalize_ip("::FFFF:c000:0207"), "192.0.2.7")

    def test_ipv6Canonical(self) -> None:
        """An IPv6 address is written in canonical (compressed, lower case) form."""
        self.assertEqual(normalize_ip("2001:DB8:0:0:0:0:0:0001"), "2001:db8::1")

    def test_scopeDropped(self) -> None:
        """A scope id is dropped."""
        self.assertEqual(normalize_ip("fe80::1%eth0"), "fe80::1")

    def test_notAnIP(self) -> None:
        """A host that is not an IP address is returned unchanged."""
        self.assertEqual(normalize_ip("mail.example.com"), "mail.example.com")
        self.assertEqual(normalize_ip("/run/gw.sock"), "/run/gw.sock")

    def test_none(self) -> None:
        """None stays None."""
        self.assertIsNone(normalize_ip(None))


def _fields(meta: ConnectionMeta) -> tuple[object, ...]:
    return attrs.astuple(meta, recurse=False)


class ConnectionMetaTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """Only the protocol is required; the rest defaults to None/False/{}."""
        meta = ConnectionMeta("smtp")
        self.assertEqual(
            _fields(meta),
            ("smtp", None, None, None, None, None, False, None, {}),
        )

    def test_statePerInstance(self) -> None:
        """Each ConnectionMeta has its own mutable C{state} dict."""
        a, b = ConnectionMeta("smtp"), ConnectionMeta("smtp")
        a.state["tries"] = 1
        self.assertEqual(b.state, {})
        self.assertIsNot(a.state, b.state)

    def test_addressesNormalized(self) -> None:
        """Addresses given to the constructor are normalised."""
        meta = ConnectionMeta(
            "http", peer_address="::ffff:198.51.100.4", local_address="fe80::2%lo"
        )
        self.assertEqual((meta.peer_address, meta.local_address), ("198.51.100.4", "fe80::2"))

    def test_fromTransportIPv4(self) -> None:
        """Peer and host IPv4 addresses and ports are taken from the transport; no TLS."""
        transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 587),
            peerAddress=IPv4Address("TCP", "192.0.2.9", 40000),
        )
        meta = ConnectionMeta.from_transport("smtp", transport, listener="submission")
        self.assertEqual(
            _fields(meta),
            ("smtp", "submission", "192.0.2.9", 40000, "127.0.0.1", 587, False, None, {}),
        )

    def test_fromTransportIPv6(self) -> None:
        """IPv6 addresses are taken and normalised (mapped IPv4 folded)."""
        transport = StringTransport(
            hostAddress=IPv6Address("TCP", "::1", 8443),
            peerAddress=IPv6Address("TCP", "::ffff:203.0.113.5", 51000),
        )
        meta = ConnectionMeta.from_transport("http", transport)
        self.assertEqual(
            (meta.peer_address, meta.peer_port, meta.local_address, meta.local_port, meta.tls),
            ("203.0.113.5", 51000, "::1", 8443, False),
        )
        self.assertIsNone(meta.listener)

    def test_fromTransportUNIX(self) -> None:
        """A UNIX socket gives its path and no port."""
        transport = StringTransport(
            hostAddress=UNIXAddress(b"/run/gw.sock"), peerAddress=UNIXAddress(None)
        )
        meta = ConnectionMeta.from_transport("http", transport)
        self.assertEqual(
            (meta.peer_address, meta.peer_port, meta.local_address, meta.local_port),
            (None, None, "/run/gw.sock", None),
        )

    def test_fromTransportTLS(self) -> None:
        """A transport providing ISSLTransport gives C{tls=True}."""
        transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 465),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 50001),
        )
        directlyProvides(transport, ISSLTransport)
        meta = ConnectionMeta.from_transport("smtp", transport, listener="smtps")
        self.assertIs(meta.tls, True)
        self.assertEqual((meta.local_port, meta.listener), (465, "smtps"))

    def test_toJsonDictExcludesState(self) -> None:
        """C{to_json_dict} has every connection fact but not C{state}."""
        meta = ConnectionMeta(
            "socks",
            listener="socks",
            peer_address="192.0.2.1",
            peer_port=1234,
            local_address="127.0.0.1",
            local_port=1080,
            tls=False,
            helo=None,
            state={"password": SECRET},
        )
        self.assertEqual(
            meta.to_json_dict(),
            {
                "protocol": "socks",
                "listener": "socks",
                "peer_address": "192.0.2.1",
                "peer_port": 1234,
                "local_address": "127.0.0.1",
                "local_port": 1080,
                "tls": False,
                "helo": None,
            },
        )

    def test_reprHidesState(self) -> None:
        """Neither C{repr} nor C{str} shows C{state}, which may hold secrets."""
        meta = ConnectionMeta("smtp", peer_address="192.0.2.1", state={"pw": SECRET})
        self.assertNotIn(SECRET, repr(meta))
        self.assertNotIn(SECRET, str(meta))
        self.assertIn("192.0.2.1", repr(meta))


def _meta() -> ConnectionMeta:
    return ConnectionMeta("smtp", peer_address="192.0.2.1", state={"last": SECRET})


class InterfaceTests(SynchronousTestCase):
    def test_usernamePassword(self) -> None:
        """L{UsernamePassword} provides IUsernamePassword and IConnectionCredentials."""
        creds = UsernamePassword("alice", "pw")
        self.assertTrue(verifyObject(IUsernamePassword, creds))
        self.assertTrue(verifyObject(IConnectionCredentials, creds))

    def test_sasl(self) -> None:
        """L{SASLCredentials} provides ISASLCredentials and its bases."""
        creds = SASLCredentials("alice", "pw", authzid="bob")
        for iface in (ISASLCredentials, IConnectionCredentials, IUsernamePassword):
            self.assertTrue(verifyObject(iface, creds))

    def test_httpBasic(self) -> None:
        """L{HTTPBasicCredentials} provides IHTTPBasicCredentials and its bases."""
        creds = HTTPBasicCredentials("alice", "pw")
        for iface in (IHTTPBasicCredentials, IConnectionCredentials, IUsernamePassword):
            self.assertTrue(verifyObject(iface, creds))

    def test_rfc1929(self) -> None:
        """L{RFC1929Credentials} provides IRFC1929Credentials and its bases."""
        creds = RFC1929Credentials("alice", "pw")
        for iface in (IRFC1929Credentials, IConnectionCredentials, IUsernamePassword):
            self.assertTrue(verifyObject(iface, creds))

    def test_bearer(self) -> None:
        """L{BearerToken} provides IBearerToken and IConnectionCredentials, not IUsernamePassword."""
        creds = BearerToken("tok")
        self.assertTrue(verifyObject(IBearerToken, creds))
        self.assertTrue(verifyObject(IConnectionCredentials, creds))
        self.assertFalse(IUsernamePassword.providedBy(creds))

    def test_noCrossProvision(self) -> None:
        """Each front door's credentials provide only their own specific interface."""
        self.assertFalse(ISASLCredentials.providedBy(HTTPBasicCredentials("a", "b")))
        self.assertFalse(IHTTPBasicCredentials.providedBy(RFC1929Credentials("a", "b")))
        self.assertFalse(IRFC1929Credentials.providedBy(SASLCredentials("a", "b")))
        self.assertFalse(ISASLCredentials.providedBy(UsernamePassword("a", "b")))


class PasswordTests(SynchronousTestCase):
    def test_checkPasswordStr(self) -> None:
        """C{checkPassword} matches a stored str password and rejects others."""
        for cls in (UsernamePassword, SASLCredentials, HTTPBasicCredentials, RFC1929Credentials):
            creds = cls("alice", "p\u00e4ss")
            self.assertTrue(creds.checkPassword("p\u00e4ss"), cls)
            self.assertFalse(creds.checkPassword("pass"), cls)
            self.assertFalse(creds.checkPassword("p\u00e4ss "), cls)
            self.assertFalse(creds.checkPassword(""), cls)

    def test_checkPasswordBytes(self) -> None:
        """C{checkPassword} matches a stored bytes password (UTF-8) and rejects others."""
        creds = HTTPBasicCredentials("alice", "p\u00e4ss")
        self.assertTrue(creds.checkPassword("p\u00e4ss".encode()))
        self.assertFalse(creds.checkPassword("p\u00e4ss".encode("latin-1")))
        self.assertFalse(creds.checkPassword(b"pass"))

    def test_checkToken(self) -> None:
        """C{checkToken} matches a stored str or bytes token and rejects others."""
        creds = BearerToken(SECRET)
        self.assertTrue(creds.checkToken(SECRET))
        self.assertTrue(creds.checkToken(SECRET.encode("ascii")))
        self.assertFalse(creds.checkToken(SECRET + "x"))
        self.assertFalse(creds.checkToken(b"s3cr3t"))
        self.assertFalse(creds.checkToken(""))

    def test_constantTimeEqual(self) -> None:
        """C{constant_time_equal} compares str and bytes by their UTF-8 bytes."""
        self.assertTrue(constant_time_equal("\u00e9", b"\xc3\xa9"))
        self.assertTrue(constant_time_equal(b"\xc3\xa9", "\u00e9"))
        self.assertFalse(constant_time_equal("\u00e9", b"\xe9"))

    def test_bytesDecoded(self) -> None:
        """Bytes username, password, authzid and token are decoded as UTF-8."""
        creds = SASLCredentials(
            "j\u00fcrgen".encode(), "p\u00e4ss".encode(), authzid="b\u00f6b".encode()
        )
        self.assertEqual(
            (creds.username, creds.password, creds.authzid), ("j\u00fcrgen", "p\u00e4ss", "b\u00f6b")
        )
        self.assertEqual(BearerToken(b"tok\xc3\xa9").token, "tok\u00e9")

    def test_invalidUTF8(self) -> None:
        """Invalid UTF-8 is a ValueError naming the field but not showing the bytes."""
        bad = b"\xff" + SECRET.encode("ascii")
        cases = [
            (lambda: UsernamePassword(bad, "pw"), "username"),
            (lambda: HTTPBasicCredentials("alice", bad), "password"),
            (lambda: SASLCredentials("alice", "pw", authzid=bad), "authzid"),
            (lambda: BearerToken(bad), "token"),
        ]
        for make, field in cases:
            e = self.assertRaises(ValueError, make)
            self.assertEqual(str(e), f"{field} is not valid UTF-8")
            for text in (str(e), repr(e)):
                self.assertNotIn(SECRET, text)
                self.assertNotIn("\\xff", text)
            # The decode error holds the raw bytes: it must not travel along.
            self.assertIsNone(e.__cause__)
            self.assertIsNone(e.__context__)

    def test_nonText(self) -> None:
        """A username that is neither str nor bytes is a TypeError."""
        self.assertRaises(TypeError, UsernamePassword, 5, "pw")


class IdentityTests(SynchronousTestCase):
    def test_contexts(self) -> None:
        """Each class's identities carry its own context."""
        self.assertEqual(
            UsernamePassword("x", "p").identities_for("alice"),
            (Identity("alice", IdentityContext.GenericAuth),),
        )
        self.assertEqual(
            HTTPBasicCredentials("x", "p").identities_for("alice"),
            (Identity("alice", IdentityContext.HttpBasicAuth),),
        )
        self.assertEqual(
            RFC1929Credentials("x", "p").identities_for("alice"),
            (Identity("alice", IdentityContext.ProxyAuthRfc1929),),
        )
        self.assertEqual(
            BearerToken("t").identities_for("alice"),
            (Identity("alice", IdentityContext.BearerToken),),
        )

    def test_contextAttribute(self) -> None:
        """The C{context} attribute names the identity context of each class."""
        self.assertEqual(
            [
                UsernamePassword("a", "p").context,
                SASLCredentials("a", "p").context,
                HTTPBasicCredentials("a", "p").context,
                RFC1929Credentials("a", "p").context,
                BearerToken("t").context,
            ],
            [
                IdentityContext.GenericAuth,
                IdentityContext.SmtpAuthPlainAuthentication,
                IdentityContext.HttpBasicAuth,
                IdentityContext.ProxyAuthRfc1929,
                IdentityContext.BearerToken,
            ],
        )

    def test_saslEmptyAuthzid(self) -> None:
        """Without an authzid both SASL identities are the avatar id, authz first."""
        creds = SASLCredentials("Alice@Example.COM", "pw")
        self.assertEqual(
            creds.identities_for("alice"),
            (
                Identity("alice", IdentityContext.SmtpAuthPlainAuthorization),
                Identity("alice", IdentityContext.SmtpAuthPlainAuthentication),
            ),
        )

    def test_saslExplicitAuthzid(self) -> None:
        """
        A foreign authzid is not an identity of the avatar: C{identities_for}
        gives the authentication identity only; an authzid equal to the avatar
        id gives both.
        """
        creds = SASLCredentials("alice", "pw", authzid="sales")
        self.assertEqual(
            creds.identities_for("alice"),
            (Identity("alice", IdentityContext.SmtpAuthPlainAuthentication),),
        )
        self.assertEqual(
            SASLCredentials("alice", "pw", authzid="alice").identities_for("alice"),
            (
                Identity("alice", IdentityContext.SmtpAuthPlainAuthorization),
                Identity("alice", IdentityContext.SmtpAuthPlainAuthentication),
            ),
        )

    def test_identitiesOfApproval(self) -> None:
        """
        L{identities_of} adds a foreign authzid only when the caller approved
        it; credentials of other protocols have no authzid to approve.
        """
        creds = SASLCredentials("alice", "pw", authzid="sales")
        self.assertEqual(
            identities_of(creds, "alice"),
            (Identity("alice", IdentityContext.SmtpAuthPlainAuthentication),),
        )
        self.assertEqual(
            identities_of(creds, "alice", authzid_approved=True),
            (
                Identity("sales", IdentityContext.SmtpAuthPlainAuthorization),
                Identity("alice", IdentityContext.SmtpAuthPlainAuthentication),
            ),
        )
        for other in (HTTPBasicCredentials("alice", "pw"), RFC1929Credentials("alice", "pw")):
            self.assertEqual(
                identities_of(other, "alice", authzid_approved=True),
                (Identity("alice", other.context),),
            )
        self.assertEqual(
            identities_of(BearerToken("t"), "alice", authzid_approved=True),
            (Identity("alice", IdentityContext.BearerToken),),
        )

        class NotOurs:
            authzid = "sales"

        self.assertEqual(
            identities_of(NotOurs(), "alice", authzid_approved=True),
            (Identity("alice", IdentityContext.GenericAuth),),
        )

    def test_effectiveAuthzid(self) -> None:
        """C{effective_authzid} is the authzid, or the authcid when none was given."""
        self.assertEqual(SASLCredentials("alice", "pw").effective_authzid, "alice")
        self.assertEqual(SASLCredentials("alice", "pw", authzid="").effective_authzid, "alice")
        self.assertEqual(
            SASLCredentials("alice", "pw", authzid="sales").effective_authzid, "sales"
        )
        self.assertEqual(SASLCredentials("alice", "pw").authzid, "")
        self.assertEqual(SASLCredentials("alice", "pw").authcid, "alice")

    def test_mechanismDefaults(self) -> None:
        """Each class has its wire mechanism by default; an explicit one is kept."""
        self.assertEqual(
            [
                UsernamePassword("a", "p").mechanism,
                SASLCredentials("a", "p").mechanism,
                HTTPBasicCredentials("a", "p").mechanism,
                RFC1929Credentials("a", "p").mechanism,
                BearerToken("t").mechanism,
            ],
            ["PLAIN", "PLAIN", "Basic", "RFC1929", "Bearer"],
        )
        self.assertEqual(SASLCredentials("a", "p", mechanism="LOGIN").mechanism, "LOGIN")
        self.assertEqual(BearerToken("t", mechanism="XOAUTH2").mechanism, "XOAUTH2")

    def test_claimedIdentity(self) -> None:
        """C{claimed_identity} is the username, or None for tokens."""
        self.assertEqual(UsernamePassword("alice", "p").claimed_identity, "alice")
        self.assertEqual(SASLCredentials("alice", "p", authzid="x").claimed_identity, "alice")
        self.assertEqual(HTTPBasicCredentials("bob", "p").claimed_identity, "bob")
        self.assertEqual(RFC1929Credentials("carol", "p").claimed_identity, "carol")
        self.assertIsNone(BearerToken("t").claimed_identity)

    def test_connMeta(self) -> None:
        """Credentials carry the given ConnectionMeta, or a fresh generic one."""
        meta = _meta()
        self.assertIs(HTTPBasicCredentials("a", "p", meta).conn_meta, meta)
        self.assertIs(BearerToken("t", conn_meta=meta).conn_meta, meta)
        default = UsernamePassword("a", "p").conn_meta
        self.assertEqual(default.protocol, "generic")
        self.assertIsNot(default, UsernamePassword("a", "p").conn_meta)


class SecretHygieneTests(SynchronousTestCase):
    def _all(self):
        meta = _meta()
        return [
            UsernamePassword("alice", SECRET, meta),
            UsernamePassword(b"alice", SECRET.encode("ascii"), meta),
            SASLCredentials("alice", SECRET, meta, authzid="sales"),
            SASLCredentials("alice", SECRET, meta, mechanism="LOGIN"),
            HTTPBasicCredentials("alice", SECRET, meta),
            RFC1929Credentials("alice", SECRET, meta),
            BearerToken(SECRET, meta),
            BearerToken(SECRET.encode("ascii")),
            meta,
        ]

    def test_reprAndStr(self) -> None:
        """No credential class, nor a ConnectionMeta with state, shows the secret."""
        for obj in self._all():
            self.assertNotIn(SECRET, repr(obj), type(obj).__name__)
            self.assertNotIn(SECRET, str(obj), type(obj).__name__)
            self.assertNotIn("s3cr3t", repr(obj), type(obj).__name__)

    def test_reprShowsUsername(self) -> None:
        """The repr still shows the (non-secret) username, so it is useful in logs."""
        self.assertIn("'alice'", repr(HTTPBasicCredentials("alice", SECRET)))
        self.assertIn("'sales'", repr(SASLCredentials("alice", SECRET, authzid="sales")))
