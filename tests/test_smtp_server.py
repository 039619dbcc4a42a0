"""
Tests for L{gateway.smtp.server}: the submission server driven line by line
through a L{StringTransport}, with a real Portal, realm and spool. One test
per row of the reply-code table and per STARTTLS rule of
shared/reference/smtp-auth.md.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import os
from hashlib import md5
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.cred.checkers import (
    ICredentialsChecker,
    InMemoryUsernamePasswordDatabaseDontUse,
)
from twisted.cred.credentials import CramMD5Credentials
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, interfaces
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.mail.interfaces import IChallengeResponse
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import Interface, implementer

from gateway.acl import AllowAuthenticated, parse_acl
from gateway.checkers import smtp_server_auth_plain
from gateway.credentials import ISASLCredentials
from gateway.errors import PoolFull, Reject, Throttled
from gateway.realm import Realm, make_portal
from gateway.smtp import sasl
from gateway.smtp import spool as spool_module
from gateway.smtp.server import (
    CLOSE_GRACE,
    MAX_BUFFERED_INPUT,
    MAX_COMMAND_LINE,
    MAX_PENDING_INPUT,
    SMTPSettings,
    SubmissionFactory,
)
from gateway.smtp.spool import Spool

PEER = IPv4Address("TCP", "192.0.2.7", 40000)
HOST = IPv4Address("TCP", "198.51.100.1", 587)
CONTEXT = object()  # stands in for the certificate's TLS context factory
TLS_VERSION, TLS_CIPHER = "TLSv1.3", "TLS_AES_256_GCM_SHA384"


def b64(data: bytes | str) -> bytes:
    return base64.b64encode(data.encode() if isinstance(data, str) else data)


def plain(authcid: str = "daniel", password: str = "tiger", authzid: str = "") -> bytes:
    return b64(f"{authzid}\0{authcid}\0{password}")


def memory_db(user: str, password: str) -> InMemoryUsernamePasswordDatabaseDontUse:
    """Users keyed by C{str}, as C{--auth memory:USER:PASSWORD} (Twisted's strcred) stores them."""
    db = InMemoryUsernamePasswordDatabaseDontUse()
    db.addUser(user, password)
    return db


def sync_runner(f: Any, *args: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(f, *args)


class _FakeTLSConnection:
    def get_protocol_version_name(self) -> str:
        return TLS_VERSION

    def get_cipher_name(self) -> str:
        return TLS_CIPHER


@implementer(interfaces.ITLSTransport)
class StartTLSTransport(StringTransport):
    """A cleartext connection that can switch to TLS: records the context."""

    def __init__(self) -> None:
        super().__init__(hostAddress=HOST, peerAddress=PEER)
        self.tls_context: Any = None
        self.tls_started = False

    def startTLS(self, ctx: Any, normal: bool = True) -> None:
        self.tls_context = ctx
        self.tls_started = True

    def getHandle(self) -> _FakeTLSConnection:
        return _FakeTLSConnection()


@implementer(interfaces.ISSLTransport)
class ImplicitTLSTransport(StringTransport):
    """A connection that is TLS from the first byte (the C{--smtps} listener)."""

    def __init__(self) -> None:
        super().__init__(hostAddress=IPv4Address("TCP", "198.51.100.1", 465), peerAddress=PEER)

    def getHandle(self) -> _FakeTLSConnection:
        return _FakeTLSConnection()

    def getPeerCertificate(self) -> None:
        return None


class PlainTransport(StringTransport):
    """A cleartext connection that cannot do TLS at all."""

    def __init__(self) -> None:
        super().__init__(hostAddress=HOST, peerAddress=PEER)


class ITokenCredentials(Interface):
    """What the test mechanism TOKEN hands to the Portal."""


@implementer(IChallengeResponse, ITokenCredentials)
class TokenMechanism:
    """A client-first plug-in mechanism that sends no password (offered without TLS)."""

    plaintext = False

    def __init__(self) -> None:
        self.response: bytes | None = None

    def getChallenge(self) -> bytes:
        return b""

    def setResponse(self, response: bytes) -> None:
        self.response = response

    def moreChallenges(self) -> bool:
        return self.response is None


@implementer(ICredentialsChecker)
class TokenChecker:
    """Accepts the empty token as C{guest}; records what it was asked."""

    credentialInterfaces = (ITokenCredentials,)

    def __init__(self) -> None:
        self.seen: list[bytes | None] = []

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[Any]:
        self.seen.append(credentials.response)
        if credentials.response == b"":
            return defer.succeed("guest")
        return defer.fail(UnauthorizedLogin())


@implementer(ICredentialsChecker)
class PendingChecker:
    """Answers with Deferreds the test fires; records cancellations."""

    credentialInterfaces = (ISASLCredentials,)

    def __init__(self) -> None:
        self.calls: list[tuple[Any, defer.Deferred[Any]]] = []
        self.cancelled: list[Any] = []

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred(lambda _: self.cancelled.append(credentials))
        self.calls.append((credentials, d))
        return d


@implementer(ICredentialsChecker)
class FailingChecker:
    """Fails every SASL login with the given exception."""

    credentialInterfaces = (ISASLCredentials,)

    def __init__(self, error: Exception) -> None:
        self.error = error

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[Any]:
        return defer.fail(self.error)


class Client:
    """Feeds bytes to the server and collects its reply lines."""

    def __init__(self, proto: Any, transport: StringTransport) -> None:
        self.proto = proto
        self.transport = transport

    def send(self, data: bytes) -> list[bytes]:
        self.proto.dataReceived(data)
        return self.read()

    def read(self) -> list[bytes]:
        out = self.transport.value()
        self.transport.clear()
        lines = out.split(b"\r\n")
        assert lines[-1] == b"", f"reply not CRLF-terminated: {out!r}"
        return lines[:-1]

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


def finals(lines: list[bytes]) -> list[bytes]:
    """The last line of each reply (C{NNN text}, not C{NNN-text})."""
    return [line for line in lines if line[3:4] != b"-"]


class ServerTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.directory = self.mktemp()
        self.spool = Spool(self.directory, threadpool_runner=sync_runner)
        self.db = memory_db("daniel", "tiger")

    def connect(
        self,
        kind: str = "starttls",
        checkers: list[Any] | None = None,
        realm: Realm | None = None,
        policy: Any = None,
        tls: Any = CONTEXT,
        **settings: Any,
    ) -> Client:
        """A session on a new connection, past the 220 greeting."""
        settings.setdefault("hostname", "mx.test")
        portal = make_portal(realm or Realm(), [self.db] if checkers is None else checkers)
        implicit = kind == "implicit"
        self.factory = SubmissionFactory(
            portal,
            policy or AllowAuthenticated(),
            self.spool,
            SMTPSettings(**settings),
            "smtps" if implicit else "smtp",
            tls=None if implicit else tls,
            implicit_tls=implicit,
        )
        transport = {
            "starttls": StartTLSTransport,
            "implicit": ImplicitTLSTransport,
            "plain": PlainTransport,
        }[kind]()
        proto = self.factory.buildProtocol(PEER)
        proto.callLater = self.clock.callLater
        proto.makeConnection(transport)
        client = Client(proto, transport)
        self.assertEqual(client.read(), [b"220 mx.test ESMTP authgateway"])
        return client

    def assertReplies(self, lines: list[bytes], expected: list[bytes]) -> None:
        """One reply per expected prefix, in order (e.g. C{b"250 2.1.0"})."""
        got = finals(lines)
        self.assertEqual(len(got), len(expected), lines)
        for line, prefix in zip(got, expected):
            self.assertTrue(line.startswith(prefix), f"{line!r} does not start with {prefix!r}")

    def ehlo(self, client: Client) -> list[bytes]:
        lines = client.send(b"EHLO client.example\r\n")
        self.assertTrue(lines[-1].startswith(b"250 "), lines)
        return lines

    def tls_session(self, **kwargs: Any) -> Client:
        """Implicit TLS, EHLO done, not authenticated."""
        client = self.connect("implicit", **kwargs)
        self.ehlo(client)
        return client

    def authenticated(self, **kwargs: Any) -> Client:
        """Implicit TLS, EHLO done, authenticated as daniel."""
        client = self.tls_session(**kwargs)
        self.assertReplies(client.send(b"AUTH PLAIN " + plain() + b"\r\n"), [b"235 2.7.0"])
        return client

    def trusted_session(self, kind: str = "starttls", **kwargs: Any) -> Client:
        """A peer in trusted_networks, EHLO done, not authenticated."""
        client = self.connect(
            kind, trusted_networks=(ipaddress.ip_network("192.0.2.0/24"),), **kwargs
        )
        self.ehlo(client)
        return client

    def extensions(self, lines: list[bytes]) -> list[bytes]:
        return [line[4:] for line in lines[1:]]

    def stored(self) -> list[tuple[bytes, dict[str, Any]]]:
        return [self.spool.load(id) for id in self.spool.ids()]

    def assertNothingStored(self) -> None:
        self.assertEqual(self.spool.ids(), [])
        self.assertEqual(os.listdir(self.directory), [])

    def start_data(self, client: Client) -> None:
        self.assertReplies(
            client.send(b"MAIL FROM:<daniel@example.com>\r\nRCPT TO:<a@example.net>\r\nDATA\r\n"),
            [b"250 2.1.0", b"250 2.1.5", b"354 2.0.0"],
        )


class GreetingAndBasicsTests(ServerTestCase):
    def test_ehlo_extensions_starttls_listener(self) -> None:
        """Before TLS: STARTTLS, ENHANCEDSTATUSCODES, PIPELINING, 8BITMIME, SIZE; no AUTH."""
        client = self.connect(max_size=1000)
        lines = self.ehlo(client)
        self.assertEqual(lines[0], b"250-mx.test Hello 192.0.2.7")
        ext = self.extensions(lines)
        for name in (b"STARTTLS", b"ENHANCEDSTATUSCODES", b"PIPELINING", b"8BITMIME", b"SIZE 1000"):
            self.assertIn(name, ext)
        self.assertFalse([e for e in ext if e.startswith(b"AUTH")])

    def test_ehlo_implicit_tls_advertises_auth_at_once(self) -> None:
        """On the C{--smtps} listener AUTH is offered in the first EHLO, STARTTLS never."""
        ext = self.extensions(self.ehlo(self.connect("implicit")))
        self.assertIn(b"AUTH PLAIN LOGIN", ext)
        self.assertNotIn(b"STARTTLS", ext)

    def test_ehlo_insecure_auth_advertises_before_tls(self) -> None:
        ext = self.extensions(self.ehlo(self.connect(insecure_auth=True)))
        self.assertIn(b"AUTH PLAIN LOGIN", ext)

    def test_ehlo_non_plaintext_mechanism_before_tls(self) -> None:
        """A mechanism that sends no password may be offered in cleartext; PLAIN may not."""
        mechanisms = dict(sasl.BUILTIN, TOKEN=TokenMechanism)
        ext = self.extensions(self.ehlo(self.connect(mechanisms=mechanisms)))
        self.assertIn(b"AUTH TOKEN", ext)

    def test_ehlo_without_name(self) -> None:
        self.assertReplies(self.connect().send(b"EHLO\r\n"), [b"501 5.5.4"])

    def test_helo(self) -> None:
        client = self.connect()
        self.assertEqual(client.send(b"HELO client.example\r\n"), [b"250 mx.test"])
        self.assertReplies(client.send(b"HELO\r\n"), [b"501 5.5.4"])

    def test_noop_rset_help_quit(self) -> None:
        client = self.connect()
        self.assertReplies(
            client.send(b"NOOP\r\nRSET\r\nHELP\r\n"), [b"250 2.0.0", b"250 2.0.0", b"214 2.0.0"]
        )
        self.assertFalse(client.closed)
        self.assertReplies(client.send(b"QUIT\r\nNOOP\r\n"), [b"221 2.0.0"])
        self.assertTrue(client.closed)

    def test_commands_case_insensitive(self) -> None:
        client = self.connect("implicit")
        self.assertReplies(client.send(b"ehlo client.example\r\n"), [b"250 "])
        self.assertReplies(client.send(b"noop\r\n"), [b"250 2.0.0"])

    def test_unknown_command(self) -> None:
        client = self.connect()
        self.assertReplies(client.send(b"FROB x\r\n"), [b"500 5.5.2"])
        self.assertReplies(client.send(b"   \r\n"), [b"500 5.5.2"])
        self.assertFalse(client.closed)

    def test_unknown_non_ascii_command(self) -> None:
        """Bytes that are not ASCII in the verb are an unknown command, not a crash."""
        client = self.connect()
        self.assertReplies(client.send(b"\xff\xfe x\r\nNOOP\r\n"), [b"500 5.5.2", b"250 2.0.0"])

    def test_vrfy_requires_auth(self) -> None:
        self.assertReplies(self.tls_session().send(b"VRFY daniel\r\n"), [b"530 5.7.0"])
        self.assertReplies(self.authenticated().send(b"VRFY daniel\r\n"), [b"252 2.5.0"])

    def test_overlong_command(self) -> None:
        """A command line over the limit: 500 5.5.6, and the session goes on."""
        client = self.connect()
        self.assertReplies(
            client.send(b"NOOP " + b"x" * MAX_COMMAND_LINE + b"\r\nNOOP\r\n"),
            [b"500 5.5.6", b"250 2.0.0"],
        )

    def test_overlong_command_streamed(self) -> None:
        """An overlong line arriving in several large segments gets exactly one reply."""
        client = self.connect()
        replies = client.send(b"NOOP " + b"x" * (MAX_COMMAND_LINE + 10))
        replies += client.send(b"x" * (MAX_COMMAND_LINE + 10))
        replies += client.send(b"x" * 10 + b"\r\nNOOP\r\n")
        self.assertReplies(replies, [b"500 5.5.6", b"250 2.0.0"])

    def test_idle_timeout(self) -> None:
        client = self.connect(timeout=30)
        self.clock.advance(29)
        self.assertReplies(client.send(b"NOOP\r\n"), [b"250 2.0.0"])
        self.clock.advance(29)
        self.assertFalse(client.closed)
        self.clock.advance(1)
        self.assertReplies(client.read(), [b"421 4.4.2"])
        self.assertTrue(client.closed)


class StartTLSTests(ServerTestCase):
    def test_starttls(self) -> None:
        client = self.connect()
        self.ehlo(client)
        self.assertReplies(client.send(b"STARTTLS\r\n"), [b"220 2.0.0"])
        self.assertTrue(client.transport.tls_started)
        self.assertIs(client.transport.tls_context, CONTEXT)

    def test_starttls_with_parameters(self) -> None:
        client = self.connect()
        self.ehlo(client)
        self.assertReplies(client.send(b"STARTTLS now\r\n"), [b"501 5.5.4"])
        self.assertFalse(client.transport.tls_started)

    def test_starttls_when_tls_active(self) -> None:
        self.assertReplies(self.tls_session().send(b"STARTTLS\r\n"), [b"503 5.5.1"])

    def test_starttls_twice(self) -> None:
        client = self.connect()
        self.ehlo(client)
        client.send(b"STARTTLS\r\n")
        self.ehlo(client)
        self.assertReplies(client.send(b"STARTTLS\r\n"), [b"503 5.5.1"])

    def test_starttls_without_context(self) -> None:
        client = self.connect(tls=None)
        self.assertNotIn(b"STARTTLS", self.extensions(self.ehlo(client)))
        self.assertReplies(client.send(b"STARTTLS\r\n"), [b"454 4.7.0"])

    def test_starttls_transport_cannot(self) -> None:
        client = self.connect("plain")
        self.assertNotIn(b"STARTTLS", self.extensions(self.ehlo(client)))
        self.assertReplies(client.send(b"STARTTLS\r\n"), [b"454 4.7.0"])

    def test_not_readvertised_auth_advertised_after_tls(self) -> None:
        client = self.connect()
        self.ehlo(client)
        client.send(b"STARTTLS\r\n")
        ext = self.extensions(self.ehlo(client))
        self.assertNotIn(b"STARTTLS", ext)
        self.assertIn(b"AUTH PLAIN LOGIN", ext)

    def test_pipelined_plaintext_discarded(self) -> None:
        """C{STARTTLS\\r\\nRSET\\r\\n} in one segment: RSET never runs (CVE-2011-0411)."""
        client = self.connect()
        self.ehlo(client)
        self.assertReplies(client.send(b"STARTTLS\r\nRSET\r\n"), [b"220 2.0.0"])
        self.assertEqual(client.read(), [])
        self.assertReplies(client.send(b"NOOP\r\n"), [b"250 2.0.0"])

    def test_pipelined_ehlo_discarded(self) -> None:
        """An EHLO injected after STARTTLS does not count: AUTH still needs a new EHLO."""
        client = self.connect()
        self.ehlo(client)
        lines = client.send(b"STARTTLS\r\nEHLO injected\r\nAUTH PLAIN " + plain() + b"\r\n")
        self.assertReplies(lines, [b"220 2.0.0"])
        self.assertReplies(client.send(b"AUTH PLAIN " + plain() + b"\r\n"), [b"503 5.5.1"])

    def test_ehlo_required_after_starttls(self) -> None:
        client = self.connect()
        self.ehlo(client)
        client.send(b"STARTTLS\r\n")
        self.assertReplies(client.send(b"AUTH PLAIN " + plain() + b"\r\n"), [b"503 5.5.1"])
        self.ehlo(client)
        self.assertReplies(client.send(b"AUTH PLAIN " + plain() + b"\r\n"), [b"235 2.7.0"])

    def test_authentication_forgotten(self) -> None:
        """A cleartext login (insecure_auth) does not survive STARTTLS."""
        client = self.connect(insecure_auth=True)
        self.ehlo(client)
        self.assertReplies(client.send(b"AUTH PLAIN " + plain() + b"\r\n"), [b"235 2.7.0"])
        client.send(b"STARTTLS\r\n")
        self.assertIn(b"AUTH PLAIN LOGIN", self.extensions(self.ehlo(client)))
        self.assertReplies(client.send(b"MAIL FROM:<a@b.example>\r\n"), [b"530 5.7.0"])

    def test_transaction_forgotten(self) -> None:
        client = self.trusted_session()
        self.assertReplies(client.send(b"MAIL FROM:<a@b.example>\r\n"), [b"250 2.1.0"])
        client.send(b"STARTTLS\r\n")
        self.assertReplies(client.send(b"MAIL FROM:<a@b.example>\r\n"), [b"503 5.5.1"])
        self.ehlo(client)
        self.assertReplies(client.send(b"RCPT TO:<c@d.example>\r\n"), [b"503 5.5.1"])
        self.assertReplies(client.send(b"MAIL FROM:<a@b.example>\r\n"), [b"250 2.1.0"])

    def test_plaintext_mechanism_before_tls(self) -> None:
        client = self.connect()
        self.ehlo(client)
        self.assertReplies(client.send(b"AUTH PLAIN " + plain() + b"\r\n"), [b"538 5.7.11"])
        self.assertReplies(client.send(b"AUTH LOGIN\r\n"), [b"538 5.7.11"])
        self.assertFalse(client.closed)

    def test_insecure_auth_accepts_plain_before_tls(self) -> None:
        client = self.connect(insecure_auth=True)
        self.ehlo(client)
        self.assertReplies(client.send(b"AUTH PLAIN " + plain() + b"\r\n"), [b"235 2.7.0"])


class AuthExchangeTests(ServerTestCase):
    def test_plain_initial_response(self) -> None:
        client = self.tls_session()
        self.assertEqual(
            client.send(b"AUTH PLAIN " + plain() + b"\r\n"),
            [b"235 2.7.0 Authentication successful"],
        )
        self.assertNotIn(b"AUTH PLAIN", b"\n".join(self.ehlo(client)))

    def test_plain_empty_challenge(self) -> None:
        """Without an initial response PLAIN sends C{334 } with its trailing space."""
        client = self.tls_session()
        self.assertEqual(client.send(b"AUTH PLAIN\r\n"), [b"334 "])
        self.assertReplies(client.send(plain() + b"\r\n"), [b"235 2.7.0"])

    def test_login_challenges(self) -> None:
        client = self.tls_session()
        self.assertEqual(client.send(b"AUTH LOGIN\r\n"), [b"334 " + b64("Username:")])
        self.assertEqual(client.send(b64("daniel") + b"\r\n"), [b"334 " + b64("Password:")])
        self.assertReplies(client.send(b64("tiger") + b"\r\n"), [b"235 2.7.0"])

    def test_login_initial_response(self) -> None:
        client = self.tls_session()
        self.assertEqual(
            client.send(b"AUTH LOGIN " + b64("daniel") + b"\r\n"), [b"334 " + b64("Password:")]
        )
        self.assertReplies(client.send(b64("tiger") + b"\r\n"), [b"235 2.7.0"])

    def test_mechanism_case_insensitive(self) -> None:
        client = self.tls_session()
        self.assertReplies(client.send(b"auth plain " + plain() + b"\r\n"), [b"235 2.7.0"])

    def test_mixed_case_login(self) -> None:
        client = self.tls_session()
        self.assertEqual(client.send(b"AUTH LoGiN\r\n"), [b"334 " + b64("Username:")])

    def test_cancel(self) -> None:
        client = self.tls_session()
        client.send(b"AUTH PLAIN\r\n")
        self.assertReplies(client.send(b"*\r\n"), [b"501 5.7.0"])
        client.send(b"AUTH LOGIN\r\n")
        client.send(b64("daniel") + b"\r\n")
        self.assertReplies(client.send(b"*\r\n"), [b"501 5.7.0"])
        self.assertReplies(client.send(b"NOOP\r\n"), [b"250 2.0.0"])
        self.assertReplies(client.send(b"AUTH PLAIN " + plain() + b"\r\n"), [b"235 2.7.0"])

    def test_cancel_initial_response(self) -> None:
        self.assertReplies(self.tls_session().send(b"AUTH PLAIN *\r\n"), [b"501 5.7.0"])

    def test_bad_base64(self) -> None:
        client = self.tls_session()
        for bad in (b"!!" + plain() + b"!!", b"ZGFu\x00", b"ZGFuaWVs=", b"ZGF=uaWVs", b"Zm9v Zg=="):
            self.assertReplies(client.send(b"AUTH PLAIN " + bad + b"\r\n"), [b"501 5.5.2"])
        client.send(b"AUTH PLAIN\r\n")
        self.assertReplies(client.send(b"!!" + plain() + b"!!\r\n"), [b"501 5.5.2"])
        self.assertIsNone(client.proto.auth_info)
        self.assertReplies(client.send(b"AUTH PLAIN " + plain() + b"\r\n"), [b"235 2.7.0"])

    def test_bare_auth(self) -> None:
        """C{AUTH} alone: 501 5.5.4 and the connection stays usable (twisted#7753)."""
        client = self.tls_session()
        self.assertReplies(client.send(b"AUTH\r\n"), [b"501 5.5.4"])
        self.assertReplies(client.send(b"AUTH  \r\n"), [b"501 5.5.4"])
        self.assertFalse(client.closed)
        self.assertReplies(client.send(b"AUTH PLAIN " + plain() + b"\r\n"), [b"235 2.7.0"])

    def test_unknown_mechanism(self) -> None:
        client = self.tls_session()
        self.assertReplies(client.send(b"AUTH GSSAPI\r\n"), [b"504 5.5.4"])
        self.assertReplies(client.send(b"AUTH \xff\r\n"), [b"504 5.5.4"])

    def test_excluded_mechanism(self) -> None:
        client = self.connect("implicit", mechanisms={"PLAIN": sasl.Plain})
        ext = self.extensions(self.ehlo(client))
        self.assertIn(b"AUTH PLAIN", ext)
        self.assertReplies(client.send(b"AUTH LOGIN\r\n"), [b"504 5.5.4"])

    def test_already_authenticated(self) -> None:
        client = self.authenticated()
        self.assertReplies(client.send(b"AUTH PLAIN " + plain() + b"\r\n"), [b"503 5.5.1"])

    def test_auth_inside_transaction(self) -> None:
        client = self.trusted_session("implicit")
        self.assertReplies(client.send(b"MAIL FROM:<a@b.example>\r\n"), [b"250 2.1.0"])
        self.assertReplies(client.send(b"AUTH PLAIN " + plain() + b"\r\n"), [b"503 5.5.1"])
        self.assertIsNone(client.proto.auth_info)

    def test_auth_before_ehlo(self) -> None:
        client = self.connect("implicit")
        self.assertReplies(client.send(b"AUTH PLAIN " + plain() + b"\r\n"), [b"503 5.5.1"])
        client.send(b"HELO client.example\r\n")
        self.assertReplies(client.send(b"AUTH PLAIN " + plain() + b"\r\n"), [b"503 5.5.1"])

    def test_bad_credentials(self) -> None:
        client = self.tls_session()
        self.assertReplies(
            client.send(b"AUTH PLAIN " + plain(password="lion") + b"\r\n"), [b"535 5.7.8"]
        )
        self.assertReplies(
            client.send(b"AUTH PLAIN " + plain(authcid="nobody") + b"\r\n"), [b"535 5.7.8"]
        )
        self.assertFalse(client.closed)
        self.assertReplies(client.send(b"MAIL FROM:<a@b.example>\r\n"), [b"530 5.7.0"])

    def test_three_failures_close(self) -> None:
        client = self.tls_session()
        bad = b"AUTH PLAIN " + plain(password="lion") + b"\r\n"
        self.assertReplies(client.send(bad + bad), [b"535 5.7.8", b"535 5.7.8"])
        self.assertFalse(client.closed)
        self.assertReplies(client.send(bad + b"NOOP\r\n"), [b"535 5.7.8", b"421 4.7.0"])
        self.assertTrue(client.closed)

    def test_empty_initial_response(self) -> None:
        """C{=} is a zero-length initial response, handed to the mechanism as such."""
        checker = TokenChecker()
        mechanisms = dict(sasl.BUILTIN, TOKEN=TokenMechanism)
        client = self.connect(mechanisms=mechanisms, checkers=[self.db, checker])
        self.ehlo(client)
        self.assertReplies(client.send(b"AUTH TOKEN =\r\n"), [b"235 2.7.0"])
        self.assertEqual(checker.seen, [b""])
        self.assertEqual(client.proto.auth_info.identities[0].identity, "guest")

    def test_empty_response_after_challenge(self) -> None:
        """An empty line answering C{334 } is a zero-length response."""
        checker = TokenChecker()
        mechanisms = dict(sasl.BUILTIN, TOKEN=TokenMechanism)
        client = self.connect(mechanisms=mechanisms, checkers=[self.db, checker])
        self.ehlo(client)
        self.assertEqual(client.send(b"AUTH TOKEN\r\n"), [b"334 "])
        self.assertReplies(client.send(b"\r\n"), [b"235 2.7.0"])
        self.assertEqual(checker.seen, [b""])

    def test_empty_initial_response_plain(self) -> None:
        """For PLAIN, an empty response is malformed."""
        self.assertReplies(self.tls_session().send(b"AUTH PLAIN =\r\n"), [b"501 5.5.2"])

    def test_plain_field_limits(self) -> None:
        client = self.tls_session()
        long = "d" * 256
        for response in (
            plain(authcid=long),
            plain(password=long),
            plain(authzid=long),
            b64(b"\0dani\xffel\0tiger"),
            b64(b"\0daniel\0ti\xc3ger"),
            b64(b"daniel\0tiger"),
            b64(b"\0\0tiger"),
        ):
            self.assertReplies(client.send(b"AUTH PLAIN " + response + b"\r\n"), [b"501 5.5.2"])
        self.assertFalse(client.closed)

    def test_plain_field_255_octets(self) -> None:
        """255 octets of UTF-8 (multi-byte characters) are within the limit."""
        password = "\u00e9" * 127 + "x"  # 255 octets
        self.db = memory_db("daniel", password)
        client = self.tls_session()
        self.assertReplies(
            client.send(b"AUTH PLAIN " + plain(password=password) + b"\r\n"), [b"235 2.7.0"]
        )

    def test_auth_line_limit(self) -> None:
        """An AUTH line of 12288 octets is read (and judged); a longer one is 500 5.5.6."""
        client = self.tls_session()
        prefix = b"AUTH PLAIN "
        fits = prefix + b"QUJD" * ((MAX_COMMAND_LINE - len(prefix)) // 4)
        fits += b"A" * (MAX_COMMAND_LINE - len(fits))
        self.assertEqual(len(fits), MAX_COMMAND_LINE)
        self.assertReplies(client.send(fits + b"\r\n"), [b"501 5.5.2"])
        self.assertReplies(client.send(fits + b"AAAA\r\nNOOP\r\n"), [b"500 5.5.6", b"250 2.0.0"])

    def test_overlong_response(self) -> None:
        """A challenge response over 12288 octets ends the exchange with 500 5.5.6."""
        client = self.tls_session()
        self.assertEqual(client.send(b"AUTH PLAIN\r\n"), [b"334 "])
        self.assertReplies(
            client.send(b"QUJD" * (MAX_COMMAND_LINE // 4 + 1) + b"\r\nNOOP\r\n"),
            [b"500 5.5.6", b"250 2.0.0"],
        )
        self.assertReplies(client.send(b"AUTH PLAIN " + plain() + b"\r\n"), [b"235 2.7.0"])

    def test_initial_response_server_first(self) -> None:
        """A server-first plug-in mechanism (CRAM-MD5) refuses an initial response."""
        mechanisms = dict(sasl.BUILTIN, **{"CRAM-MD5": CramMD5Credentials})
        client = self.connect("implicit", mechanisms=mechanisms)
        self.assertIn(b"AUTH PLAIN LOGIN CRAM-MD5", self.extensions(self.ehlo(client)))
        self.assertReplies(
            client.send(b"AUTH CRAM-MD5 " + b64("daniel x") + b"\r\n"), [b"501 5.7.0"]
        )
        self.assertReplies(client.send(b"NOOP\r\n"), [b"250 2.0.0"])

    def test_plugin_mechanism_exchange(self) -> None:
        """CRAM-MD5 registered by name: challenge, response, 235."""
        self.db.addUser(b"daniel", b"tiger")  # CramMD5Credentials carries a bytes username
        client = self.connect("implicit", mechanisms={"CRAM-MD5": CramMD5Credentials})
        self.ehlo(client)
        (line,) = client.send(b"AUTH cram-md5\r\n")
        self.assertTrue(line.startswith(b"334 "), line)
        challenge = base64.b64decode(line[4:])
        digest = hmac.HMAC(b"tiger", challenge, digestmod=md5).hexdigest()
        self.assertReplies(client.send(b64("daniel " + digest) + b"\r\n"), [b"235 2.7.0"])
        self.assertEqual(client.proto.auth_info.identities[0].identity, "daniel")

    def test_mechanism_that_cannot_start(self) -> None:
        def broken() -> None:
            raise RuntimeError("no")

        broken.plaintext = False  # type: ignore[attr-defined]
        client = self.connect("implicit", mechanisms={"BROKEN": broken})
        self.ehlo(client)
        self.assertReplies(client.send(b"AUTH BROKEN\r\n"), [b"454 4.7.0"])
        self.flushLoggedErrors(RuntimeError)


class CheckerOutcomeTests(ServerTestCase):
    def outcome(self, error: Exception) -> Client:
        client = self.tls_session(checkers=[FailingChecker(error)])
        self.result = client.send(b"AUTH PLAIN " + plain() + b"\r\n")
        return client

    def test_backend_error(self) -> None:
        """Any exception but UnauthorizedLogin is a temporary failure: 454, not 451."""
        client = self.outcome(RuntimeError("database down"))
        self.assertReplies(self.result, [b"454 4.7.0"])
        self.assertNotIn(b"database", b"".join(self.result))
        self.assertFalse(client.closed)

    def test_throttled(self) -> None:
        self.outcome(Throttled(30))
        self.assertReplies(self.result, [b"454 4.7.0"])

    def test_pool_full(self) -> None:
        self.outcome(PoolFull())
        self.assertReplies(self.result, [b"454 4.7.0"])

    def test_temporary_failures_do_not_count(self) -> None:
        client = self.outcome(PoolFull())
        for _ in range(3):
            self.assertReplies(client.send(b"AUTH PLAIN " + plain() + b"\r\n"), [b"454 4.7.0"])
        self.assertFalse(client.closed)

    def test_unhandled_credentials(self) -> None:
        """No checker for the credentials: 454."""
        client = self.tls_session(checkers=[TokenChecker()])
        self.assertReplies(client.send(b"AUTH PLAIN " + plain() + b"\r\n"), [b"454 4.7.0"])

    def test_reject_own_code(self) -> None:
        client = self.outcome(Reject(432, "4.7.12", "A password transition is needed"))
        self.assertEqual(self.result, [b"432 4.7.12 A password transition is needed"])
        self.assertFalse(client.closed)

    def test_reject_disconnect(self) -> None:
        client = self.outcome(
            Reject(534, "5.7.9", "Authentication mechanism is too weak", disconnect=True)
        )
        self.assertEqual(self.result, [b"534 5.7.9 Authentication mechanism is too weak"])
        self.assertTrue(client.closed)

    def test_reject_counts_as_failure(self) -> None:
        client = self.outcome(Reject(535, "5.7.8", "No such mailbox"))
        client.send(b"AUTH PLAIN " + plain() + b"\r\n")
        self.assertReplies(
            client.send(b"AUTH PLAIN " + plain() + b"\r\n"), [b"535 5.7.8", b"421 4.7.0"]
        )
        self.assertTrue(client.closed)

    def test_reject_text_with_password_withheld(self) -> None:
        """A rejection whose text holds the password is answered as a plain 535."""
        self.outcome(Reject(550, "5.7.1", "password tiger is wrong"))
        self.assertReplies(self.result, [b"535 5.7.8"])
        self.assertNotIn(b"tiger", b"".join(self.result))


class AuthorizationIdentityTests(ServerTestCase):
    def identities(self, client: Client) -> list[tuple[str, str]]:
        return [(i.identity, i.context.value) for i in client.proto.auth_info.identities]

    def test_empty_authzid_is_authcid(self) -> None:
        client = self.authenticated()
        self.assertEqual(
            self.identities(client),
            [("daniel", "SmtpAuthPlainAuthorization"), ("daniel", "SmtpAuthPlainAuthentication")],
        )

    def test_authzid_equal_to_authcid(self) -> None:
        client = self.tls_session()
        self.assertReplies(
            client.send(b"AUTH PLAIN " + plain(authzid="daniel") + b"\r\n"), [b"235 2.7.0"]
        )

    def test_foreign_authzid_refused(self) -> None:
        client = self.tls_session()
        self.assertReplies(
            client.send(b"AUTH PLAIN " + plain(authzid="sales") + b"\r\n"), [b"535 5.7.8"]
        )
        self.assertIsNone(client.proto.auth_info)

    def test_seed_function_sees_both_and_approves(self) -> None:
        calls = []

        def auth_plain(authz: str, authc: str, password: str, conn_meta: Any) -> Any:
            calls.append((authz, authc, password, conn_meta.tls, conn_meta.peer_address,
                          conn_meta.helo))
            if authc != "daniel" or password != "tiger":
                return False
            if authz == "sales":  # True would approve daniel only (issue 11 item 7)
                return {"identities": [
                    {"identity": "sales", "context": "SmtpAuthPlainAuthorization"},
                    {"identity": "daniel", "context": "SmtpAuthPlainAuthentication"},
                ]}
            return authz == "daniel"

        client = self.tls_session(checkers=[smtp_server_auth_plain(auth_plain)])
        self.assertReplies(
            client.send(b"AUTH PLAIN " + plain(authzid="sales") + b"\r\n"), [b"235 2.7.0"]
        )
        self.assertEqual(calls, [("sales", "daniel", "tiger", True, "192.0.2.7", "client.example")])
        self.assertEqual(
            self.identities(client),
            [("sales", "SmtpAuthPlainAuthorization"), ("daniel", "SmtpAuthPlainAuthentication")],
        )

    def test_seed_function_empty_authzid(self) -> None:
        calls = []

        def auth_plain(authz: str, authc: str, password: str, conn_meta: Any) -> bool:
            calls.append((authz, authc))
            return password == "tiger"

        client = self.tls_session(checkers=[smtp_server_auth_plain(auth_plain)])
        self.assertReplies(client.send(b"AUTH PLAIN " + plain() + b"\r\n"), [b"235 2.7.0"])
        self.assertEqual(calls, [("daniel", "daniel")])

    def test_seed_function_refuses_authzid(self) -> None:
        def auth_plain(authz: str, authc: str, password: str, conn_meta: Any) -> bool:
            return authz == authc and password == "tiger"

        client = self.tls_session(checkers=[smtp_server_auth_plain(auth_plain)])
        self.assertReplies(
            client.send(b"AUTH PLAIN " + plain(authzid="sales") + b"\r\n"), [b"535 5.7.8"]
        )

    def test_realm_authorize_grants(self) -> None:
        asked = []

        def authorize(info: Any, authzid: str) -> bool:
            asked.append((sorted(info.names()), authzid))
            return authzid == "sales"

        client = self.tls_session(realm=Realm(authorize=authorize))
        self.assertReplies(
            client.send(b"AUTH PLAIN " + plain(authzid="sales") + b"\r\n"), [b"235 2.7.0"]
        )
        self.assertEqual(asked, [(["daniel"], "sales")])
        self.assertEqual(
            self.identities(client),
            [("sales", "SmtpAuthPlainAuthorization"), ("daniel", "SmtpAuthPlainAuthentication")],
        )
        self.assertReplies(
            self.tls_session(realm=Realm(authorize=authorize)).send(
                b"AUTH PLAIN " + plain(authzid="boss") + b"\r\n"
            ),
            [b"535 5.7.8"],
        )

    def test_metadata_records_both(self) -> None:
        client = self.tls_session(realm=Realm(authorize=lambda info, authzid: True))
        client.send(b"AUTH PLAIN " + plain(authzid="sales") + b"\r\n")
        self.start_data(client)
        self.assertReplies(client.send(b"hi\r\n.\r\n"), [b"250 2.0.0"])
        ((_, meta),) = self.stored()
        self.assertEqual((meta["authz_id"], meta["authn_id"]), ("sales", "daniel"))


class PipeliningTests(ServerTestCase):
    def test_replies_wait_for_login(self) -> None:
        checker = PendingChecker()
        client = self.tls_session(checkers=[checker])
        lines = client.send(
            b"AUTH PLAIN " + plain() + b"\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n"
        )
        self.assertEqual(lines, [])
        self.assertEqual(client.send(b"NOOP\r\n"), [])
        ((credentials, d),) = checker.calls
        self.assertEqual((credentials.username, credentials.authzid), ("daniel", ""))
        d.callback("daniel")
        self.assertReplies(
            client.read(), [b"235 2.7.0", b"250 2.1.0", b"250 2.1.5", b"250 2.0.0"]
        )

    def test_failed_login_then_pipelined(self) -> None:
        checker = PendingChecker()
        client = self.tls_session(checkers=[checker])
        self.assertEqual(
            client.send(b"AUTH PLAIN " + plain() + b"\r\nMAIL FROM:<a@b.example>\r\n"), []
        )
        checker.calls[0][1].errback(UnauthorizedLogin())
        self.assertReplies(client.read(), [b"535 5.7.8", b"530 5.7.0"])

    def test_pending_input_bounded(self) -> None:
        """While a login is pending and much input is queued, the server stops reading."""
        checker = PendingChecker()
        client = self.tls_session(checkers=[checker])
        client.send(b"AUTH PLAIN " + plain() + b"\r\n" + b"NOOP\r\n" * 20000)
        self.assertEqual(client.transport.producerState, "paused")
        checker.calls[0][1].callback("daniel")
        self.assertEqual(client.transport.producerState, "producing")
        self.assertEqual(len(finals(client.read())), 20001)

    def test_disconnect_during_pending_login(self) -> None:
        """The client leaving cancels the login; nothing more is written or run."""
        checker = PendingChecker()
        client = self.tls_session(checkers=[checker])
        client.send(b"AUTH PLAIN " + plain() + b"\r\nMAIL FROM:<a@b.example>\r\n")
        ((credentials, d),) = checker.calls
        client.proto.connectionLost(Exception("gone"))
        self.assertEqual(checker.cancelled, [credentials])
        if not d.called:
            d.callback("daniel")
        self.assertEqual(client.read(), [])
        self.assertIsNone(client.proto.auth_info)


class TransactionTests(ServerTestCase):
    def test_auth_required(self) -> None:
        client = self.tls_session()
        self.assertReplies(
            client.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"),
            [b"530 5.7.0", b"530 5.7.0", b"530 5.7.0"],
        )

    def test_untrusted_peer_needs_auth(self) -> None:
        client = self.connect(
            "implicit", trusted_networks=(ipaddress.ip_network("203.0.113.0/24"),)
        )
        self.ehlo(client)
        self.assertReplies(client.send(b"MAIL FROM:<a@b.example>\r\n"), [b"530 5.7.0"])

    def test_trusted_network(self) -> None:
        client = self.trusted_session()
        self.assertReplies(
            client.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"),
            [b"250 2.1.0", b"250 2.1.5", b"354 2.0.0"],
        )
        self.assertReplies(client.send(b"hello\r\n.\r\n"), [b"250 2.0.0"])
        ((message, meta),) = self.stored()
        self.assertIn(b" with ESMTP id ", message)
        self.assertIsNone(meta["authz_id"])
        self.assertIsNone(meta["auth_info"])

    def test_mail_before_helo(self) -> None:
        client = self.connect(trusted_networks=(ipaddress.ip_network("192.0.2.0/24"),))
        self.assertReplies(client.send(b"MAIL FROM:<a@b.example>\r\n"), [b"503 5.5.1"])

    def test_nested_mail(self) -> None:
        client = self.authenticated()
        self.assertReplies(
            client.send(b"MAIL FROM:<a@b.example>\r\nMAIL FROM:<e@f.example>\r\n"),
            [b"250 2.1.0", b"503 5.5.1"],
        )

    def test_rset_ends_transaction(self) -> None:
        client = self.authenticated()
        self.assertReplies(
            client.send(b"MAIL FROM:<a@b.example>\r\nRSET\r\nRCPT TO:<c@d.example>\r\n"
                        b"MAIL FROM:<e@f.example>\r\n"),
            [b"250 2.1.0", b"250 2.0.0", b"503 5.5.1", b"250 2.1.0"],
        )

    def test_null_sender(self) -> None:
        self.assertReplies(self.authenticated().send(b"MAIL FROM:<>\r\n"), [b"250 2.1.0"])

    def test_mail_syntax(self) -> None:
        self.assertReplies(self.authenticated().send(b"MAIL TO:<a@b.example>\r\n"), [b"501 5.5.4"])

    def test_size_parameter(self) -> None:
        client = self.authenticated(max_size=1000)
        self.assertReplies(
            client.send(b"MAIL FROM:<a@b.example> SIZE=1001\r\n"), [b"552 5.3.4"]
        )
        self.assertReplies(client.send(b"MAIL FROM:<a@b.example> SIZE=x\r\n"), [b"501 5.5.4"])
        # Third review: 5000 digits made int() raise (CPython's 4300-digit
        # limit), dropping the connection with a traceback in the log.
        self.assertReplies(
            client.send(b"MAIL FROM:<a@b.example> SIZE=" + b"9" * 5000 + b"\r\n"), [b"552 5.3.4"]
        )
        self.assertReplies(
            client.send(b"MAIL FROM:<a@b.example> SIZE=1000 BODY=8BITMIME\r\n"), [b"250 2.1.0"]
        )

    def test_bare_lf_in_a_command_never_reaches_the_expressions(self) -> None:
        """
        Third review: Twisted's MAIL/RCPT expressions backtrack quadratically on
        a bare LF after the parameters (a second of reactor time per 12 KB
        line). A command with a bare CR or LF is refused before any parsing.
        """
        client = self.authenticated()
        client.send(b"MAIL FROM:<a@b.example>\r\n")
        matched = []
        rcpt_re = client.proto.rcpt_re
        self.patch(type(client.proto), "rcpt_re", _Recording(rcpt_re, matched))
        self.patch(type(client.proto), "mail_re", _Recording(client.proto.mail_re, matched))
        line = b"RCPT TO:<a@b.example>" + b" " * 12000 + b"x\ny\r\n"
        self.assertReplies(client.send(line * 3), [b"501 5.5.2"] * 3)
        self.assertReplies(client.send(b"MAIL FROM:<c@d.example>" + b" " * 12000 + b"x\ny\r\n"),
                           [b"501 5.5.2"])
        self.assertEqual(matched, [])
        self.assertReplies(client.send(b"RCPT TO:<ok@b.example>\r\n"), [b"250 2.1.5"])
        self.assertEqual(len(matched), 1)

    def test_duplicate_parameter(self) -> None:
        client = self.authenticated()
        self.assertReplies(
            client.send(b"MAIL FROM:<a@b.example> AUTH=<> auth=a@b.example\r\n"), [b"503 5.5.4"]
        )
        self.assertReplies(
            client.send(b"MAIL FROM:<a@b.example> SIZE=1 SIZE=2\r\n"), [b"503 5.5.4"]
        )

    def test_unknown_parameter(self) -> None:
        client = self.authenticated()
        self.assertReplies(client.send(b"MAIL FROM:<a@b.example> FROB=1\r\n"), [b"555 5.5.4"])
        self.assertReplies(client.send(b"MAIL FROM:<a@b.example>\r\n"), [b"250 2.1.0"])
        self.assertReplies(client.send(b"RCPT TO:<c@d.example> NOTIFY=NEVER\r\n"), [b"555 5.5.4"])

    def test_mail_auth_parameter(self) -> None:
        """C{AUTH=<xtext>} (RFC 4954 section 5) is decoded and kept in the metadata."""
        client = self.authenticated()
        self.assertReplies(
            client.send(b"MAIL FROM:<daniel@example.com> AUTH=daniel+2Bx@example.com\r\n"
                        b"RCPT TO:<a@example.net>\r\nDATA\r\n"),
            [b"250 2.1.0", b"250 2.1.5", b"354 2.0.0"],
        )
        self.assertReplies(client.send(b"hi\r\n.\r\n"), [b"250 2.0.0"])
        ((_, meta),) = self.stored()
        self.assertEqual(meta["mail_auth"], "daniel+x@example.com")

    def test_mail_auth_empty_and_malformed(self) -> None:
        client = self.authenticated()
        self.assertReplies(client.send(b"MAIL FROM:<a@b.example> AUTH=<>\r\n"), [b"250 2.1.0"])
        client.send(b"RSET\r\n")
        self.assertReplies(client.send(b"MAIL FROM:<a@b.example> AUTH=a+zz\r\n"), [b"501 5.5.4"])

    def test_rcpt_before_mail(self) -> None:
        self.assertReplies(self.authenticated().send(b"RCPT TO:<c@d.example>\r\n"), [b"503 5.5.1"])

    def test_too_many_recipients(self) -> None:
        client = self.authenticated(max_recipients=2)
        self.assertReplies(
            client.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c1@d.example>\r\n"
                        b"RCPT TO:<c2@d.example>\r\nRCPT TO:<c3@d.example>\r\n"),
            [b"250 2.1.0", b"250 2.1.5", b"250 2.1.5", b"452 4.5.3"],
        )

    def test_data_without_rcpt(self) -> None:
        client = self.authenticated()
        self.assertReplies(client.send(b"DATA\r\n"), [b"503 5.5.1"])
        self.assertReplies(
            client.send(b"MAIL FROM:<a@b.example>\r\nDATA\r\n"), [b"250 2.1.0", b"503 5.5.1"]
        )
        self.assertNothingStored()

    def test_sender_binding(self) -> None:
        acl = parse_acl(
            '[[acl."smtp/sender/example.com/daniel"]]\n'
            "allow = true\n"
            'privileges = ["send"]\n'
            'identity.Individual = "daniel"\n'
        )
        client = self.authenticated(policy=acl, sender_binding=True)
        self.assertReplies(client.send(b"MAIL FROM:<boss@example.com>\r\n"), [b"553 5.7.1"])
        self.assertReplies(client.send(b"MAIL FROM:<daniel@other.example>\r\n"), [b"553 5.7.1"])
        self.assertReplies(client.send(b"MAIL FROM:<daniel@Example.COM>\r\n"), [b"250 2.1.0"])

    def test_sender_binding_needs_a_sender_grant(self) -> None:
        """
        "Authenticated users may use SMTP" (a broad rule with privileges "*") is
        no licence to send as anyone: only rules under C{smtp/sender/DOMAIN}
        naming C{send} bind senders; a domain-wide grant still works.
        """
        broad = parse_acl(
            '[[acl."smtp"]]\nallow = true\nprivileges = ["*"]\nidentity.Authenticated = {}\n'
            '[[acl."smtp/sender/*"]]\nallow = true\nprivileges = ["*"]\n'
            "identity.Authenticated = {}\n"
            '[[acl."smtp/sender/example.org"]]\nallow = true\nprivileges = ["send"]\n'
            'identity.Individual = "daniel"\n'
        )
        client = self.authenticated(policy=broad, sender_binding=True)
        self.assertReplies(client.send(b"MAIL FROM:<ceo@example.com>\r\n"), [b"553 5.7.1"])
        self.assertReplies(client.send(b"MAIL FROM:<anyone@example.org>\r\n"), [b"250 2.1.0"])

    def test_sender_binding_canonical_local_part(self) -> None:
        """
        Third review: a quoted, escaped or re-cased spelling of a denied mailbox
        is the same mailbox, and is denied too; a quoted form no key can name
        is refused under binding.
        """
        acl = parse_acl(
            '[[acl."smtp/sender/example.com/ceo"]]\nallow = false\nprivileges = ["send"]\n'
            "identity.Any = {}\n"
            '[[acl."smtp/sender/example.com"]]\nallow = true\nprivileges = ["send"]\n'
            "identity.Authenticated = {}\n"
        )
        client = self.authenticated(policy=acl, sender_binding=True)
        for sender in (b"ceo", b'"ceo"', b'"c\\eo"', b"CEO", b'"john doe"'):
            self.assertReplies(client.send(b"MAIL FROM:<" + sender + b"@example.com>\r\n"),
                               [b"553 5.7.1"])
        self.assertReplies(client.send(b"MAIL FROM:<Daniel.K@Example.COM>\r\n"), [b"250 2.1.0"])

    def test_sender_binding_off(self) -> None:
        acl = parse_acl("")
        client = self.authenticated(policy=acl)
        self.assertReplies(client.send(b"MAIL FROM:<boss@example.com>\r\n"), [b"250 2.1.0"])


class DataTests(ServerTestCase):
    def test_message_stored(self) -> None:
        client = self.authenticated()
        self.assertReplies(
            client.send(b"MAIL FROM:<daniel@example.com>\r\nRCPT TO:<a@example.net>\r\n"
                        b"RCPT TO:<b@example.org>\r\nDATA\r\n"),
            [b"250 2.1.0", b"250 2.1.5", b"250 2.1.5", b"354 2.0.0"],
        )
        (line,) = client.send(b"Subject: hi\r\n\r\n..leading dot\r\n..\r\nend\r\n.\r\n")
        self.assertTrue(line.startswith(b"250 2.0.0 "), line)
        (id,) = self.spool.ids()
        self.assertIn(id.encode(), line)
        message, meta = self.spool.load(id)
        header, _, body = message.partition(b"Subject: hi\r\n")
        self.assertTrue(header.startswith(b"Received: from client.example ([192.0.2.7])"), header)
        self.assertIn(f"by mx.test (authgateway) with ESMTPSA id {id}".encode(), header)
        self.assertIn(TLS_VERSION.encode(), header)
        self.assertEqual(body, b"\r\n.leading dot\r\n.\r\nend\r\n")
        self.assertEqual(meta["id"], id)
        self.assertEqual(meta["authz_id"], "daniel")
        self.assertEqual(meta["authn_id"], "daniel")
        self.assertEqual(meta["mail_from"], "daniel@example.com")
        self.assertEqual(meta["rcpt_to"], ["a@example.net", "b@example.org"])
        self.assertEqual(meta["helo"], "client.example")
        self.assertEqual(meta["peer"], {"address": "192.0.2.7", "port": 40000})
        self.assertEqual(meta["local"], {"address": "198.51.100.1", "port": 465})
        self.assertEqual(meta["protocol"], "ESMTPSA")
        self.assertEqual(meta["tls"], {"version": TLS_VERSION, "cipher": TLS_CIPHER})
        self.assertIsNone(meta["mail_auth"])
        self.assertEqual(
            meta["auth_info"]["identities"],
            [
                {"identity": "daniel", "context": "SmtpAuthPlainAuthorization"},
                {"identity": "daniel", "context": "SmtpAuthPlainAuthentication"},
            ],
        )
        self.assertReplies(client.send(b"NOOP\r\n"), [b"250 2.0.0"])

    def test_two_messages_one_session(self) -> None:
        client = self.authenticated()
        for _ in range(2):
            self.start_data(client)
            self.assertReplies(client.send(b"hi\r\n.\r\n"), [b"250 2.0.0"])
        self.assertEqual(len(self.spool.ids()), 2)

    def test_pipelined_data(self) -> None:
        client = self.tls_session()
        lines = client.send(
            b"AUTH PLAIN " + plain() + b"\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n"
            b"DATA\r\nhello\r\n.\r\nQUIT\r\n"
        )
        self.assertReplies(
            lines, [b"235 2.7.0", b"250 2.1.0", b"250 2.1.5", b"354 2.0.0", b"250 2.0.0", b"221"]
        )
        self.assertEqual(len(self.spool.ids()), 1)

    def test_no_header_injection_through_rcpt(self) -> None:
        """A recipient with a bare LF is refused: it never reaches the headers or the JSON."""
        client = self.authenticated()
        self.assertReplies(
            client.send(b'MAIL FROM:<daniel@example.com>\r\nRCPT TO:<"x\nX-Injected: 1"@example.net>\r\n'
                        b"RCPT TO:<ok@example.net>\r\nDATA\r\n"),
            [b"250 2.1.0", b"501 5.5.2", b"250 2.1.5", b"354 2.0.0"],
        )
        client.send(b"hi\r\n.\r\n")
        ((message, meta),) = self.stored()
        self.assertNotIn(b"X-Injected", message)
        self.assertEqual(meta["rcpt_to"], ["ok@example.net"])

    def test_received_esmtpa(self) -> None:
        """Authenticated in cleartext (insecure_auth): C{with ESMTPA}, no TLS in the metadata."""
        client = self.connect(insecure_auth=True)
        self.ehlo(client)
        client.send(b"AUTH PLAIN " + plain() + b"\r\n")
        self.start_data(client)
        client.send(b"hi\r\n.\r\n")
        ((message, meta),) = self.stored()
        self.assertIn(b" with ESMTPA id ", message)
        self.assertEqual(meta["protocol"], "ESMTPA")
        self.assertIsNone(meta["tls"])

    def test_received_esmtps(self) -> None:
        """TLS without authentication (a trusted peer): C{with ESMTPS}."""
        client = self.trusted_session("implicit")
        self.start_data(client)
        client.send(b"hi\r\n.\r\n")
        ((message, meta),) = self.stored()
        self.assertIn(b" with ESMTPS id ", message)
        self.assertEqual(meta["protocol"], "ESMTPS")

    def test_received_esmtpsa_after_starttls(self) -> None:
        client = self.connect()
        self.ehlo(client)
        client.send(b"STARTTLS\r\n")
        client.send(b"EHLO after.example\r\n")
        client.send(b"AUTH PLAIN " + plain() + b"\r\n")
        self.start_data(client)
        self.assertReplies(client.send(b"hi\r\n.\r\n"), [b"250 2.0.0"])
        ((message, meta),) = self.stored()
        self.assertIn(b" with ESMTPSA id ", message)
        self.assertEqual(meta["helo"], "after.example")
        self.assertEqual(meta["tls"], {"version": TLS_VERSION, "cipher": TLS_CIPHER})

    def test_message_too_big(self) -> None:
        client = self.authenticated(max_size=1000)
        self.start_data(client)
        self.assertReplies(
            client.send(b"x" * 98 + b"\r\n") + client.send((b"y" * 98 + b"\r\n") * 20),
            [],
        )
        self.assertReplies(client.send(b".\r\n"), [b"552 5.3.4"])
        self.assertNothingStored()
        self.assertReplies(client.send(b"NOOP\r\n"), [b"250 2.0.0"])

    def test_message_of_exactly_max_size(self) -> None:
        """RFC 1870: the message the client sends is measured, not our Received header."""
        client = self.authenticated(max_size=1000)
        self.start_data(client)
        self.assertReplies(client.send((b"z" * 98 + b"\r\n") * 10 + b".\r\n"), [b"250 2.0.0"])

    def test_data_line_too_long(self) -> None:
        client = self.authenticated()
        self.start_data(client)
        self.assertReplies(
            client.send(b"ok\r\n" + b"x" * 999 + b"\r\nmore\r\n.\r\n"), [b"500 5.5.6"]
        )
        self.assertNothingStored()
        self.assertReplies(client.send(b"NOOP\r\n"), [b"250 2.0.0"])

    def test_data_line_too_long_streamed(self) -> None:
        client = self.authenticated()
        self.start_data(client)
        replies = client.send(b"x" * 2000) + client.send(b"x" * 2000 + b"\r\n.\r\n")
        self.assertReplies(replies, [b"500 5.5.6"])
        self.assertNothingStored()

    def test_data_line_998_octets(self) -> None:
        client = self.authenticated()
        self.start_data(client)
        self.assertReplies(client.send(b"x" * 998 + b"\r\n.\r\n"), [b"250 2.0.0"])

    def test_data_line_998_octets_split_before_lf(self) -> None:
        """A line of 998 octets whose CR and LF arrive in different segments is fine."""
        client = self.authenticated()
        self.start_data(client)
        self.assertEqual(client.send(b"x" * 998 + b"\r"), [])
        self.assertReplies(client.send(b"\n.\r\n"), [b"250 2.0.0"])
        ((message, _),) = self.stored()
        self.assertTrue(message.endswith(b"\r\n" + b"x" * 998 + b"\r\n"))

    def test_data_line_998_octets_dot_stuffed(self) -> None:
        """The duplicated leading dot is not counted in the 1000 octets (RFC 5321 4.5.3.1.6)."""
        client = self.authenticated()
        self.start_data(client)
        self.assertReplies(client.send(b".." + b"x" * 997 + b"\r\n.\r\n"), [b"250 2.0.0"])
        ((message, _),) = self.stored()
        self.assertTrue(message.endswith(b"\r\n." + b"x" * 997 + b"\r\n"))

    def test_bare_lf_does_not_end_data(self) -> None:
        """
        C{\\n.\\n} (and C{\\r\\n.\\n}) inside DATA neither ends the text nor
        is stored for a next hop to misread: the message is refused with
        C{554 5.6.11} at the real end of data, and nothing smuggled runs.
        """
        client = self.authenticated()
        self.start_data(client)
        smuggled = (
            b"one\n.\nMAIL FROM:<evil@x.example>\nRCPT TO:<v@y.example>\nDATA\nevil\r\n"
            b".\nMAIL FROM:<evil@x.example>\r\n"
        )
        self.assertEqual(client.send(smuggled), [])
        self.assertReplies(client.send(b".\r\n"), [b"554 5.6.11"])
        self.assertNothingStored()
        self.assertReplies(client.send(b"RCPT TO:<a@example.net>\r\n"), [b"503 5.5.1"])

    def test_bare_cr_or_lf_refused(self) -> None:
        """A bare CR or LF anywhere in a line, in a block or line by line: 554 5.6.11."""
        for text in (b"Subject: x\rBcc: evil@x\r\n\r\nhi\r\n", b"a\r\nb\nc\r\n", b"\n\r\n",
                     b"a\r\r\n", b"x" * 997 + b"\n\r\n", b"." + b"y" * 998 + b"\r\n\r\r\n"):
            for pieces in ([text + b".\r\n"], [bytes((c,)) for c in text + b".\r\n"]):
                client = self.authenticated()
                self.start_data(client)
                replies = [line for piece in pieces for line in client.send(piece)]
                self.assertReplies(replies, [b"554 5.6.11"])
                self.assertNothingStored()
                self.assertReplies(client.send(b"NOOP\r\n"), [b"250 2.0.0"])

    def test_spool_commit_fails(self) -> None:
        """The fsync fails: 451 4.3.0 and no file left, complete or partial."""

        def broken(directory: str) -> None:
            raise OSError(5, "Input/output error")

        self.patch(spool_module, "fsync_directory", broken)
        client = self.authenticated()
        self.start_data(client)
        self.assertReplies(client.send(b"hi\r\n.\r\n"), [b"451 4.3.0"])
        self.assertNothingStored()
        self.assertReplies(client.send(b"NOOP\r\n"), [b"250 2.0.0"])

    def test_spool_runner_raises(self) -> None:
        """
        The runner itself raises: 451 4.3.0, nothing visible, and the session
        and the spool go on (the next message is stored).
        """
        calls = []

        def runner(f: Any, *args: Any) -> defer.Deferred[Any]:
            calls.append(f)
            if len(calls) == 1:
                raise RuntimeError("thread pool is gone")
            return defer.maybeDeferred(f, *args)

        self.spool = Spool(self.directory, threadpool_runner=runner)
        client = self.authenticated()
        self.start_data(client)
        self.assertReplies(client.send(b"hi\r\n.\r\nNOOP\r\n"), [b"451 4.3.0", b"250 2.0.0"])
        self.assertEqual(self.spool.ids(), [])
        self.flushLoggedErrors(RuntimeError)
        self.start_data(client)
        self.assertReplies(client.send(b"again\r\n.\r\n"), [b"250 2.0.0"])
        self.assertEqual(len(self.spool.ids()), 1)

    def test_spool_runner_fails(self) -> None:
        """The runner fails without running the commit: 451 4.3.0 and no file left behind."""

        def runner(f: Any, *args: Any) -> defer.Deferred[Any]:
            return defer.fail(RuntimeError("thread pool is gone"))

        self.spool = Spool(self.directory, threadpool_runner=runner)
        client = self.authenticated()
        self.start_data(client)
        self.assertReplies(client.send(b"hi\r\n.\r\nNOOP\r\n"), [b"451 4.3.0", b"250 2.0.0"])
        self.assertNothingStored()

    def test_spool_cannot_open(self) -> None:
        def refuse(path: str) -> int:
            raise OSError(28, "No space left on device")

        self.patch(spool_module, "_create", refuse)
        client = self.authenticated()
        self.assertReplies(
            client.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"),
            [b"250 2.1.0", b"250 2.1.5", b"451 4.3.0"],
        )
        self.assertReplies(client.send(b"NOOP\r\n"), [b"250 2.0.0"])

    def test_disconnect_during_data(self) -> None:
        client = self.authenticated()
        self.start_data(client)
        client.send(b"partial message\r\n")
        client.proto.connectionLost(Exception("gone"))
        self.assertNothingStored()

    def test_spool_commit_pending_keeps_order(self) -> None:
        """While the spool commits, pipelined commands wait for the 250."""
        jobs: list[tuple[Any, tuple[Any, ...], defer.Deferred[Any]]] = []

        def runner(f: Any, *args: Any) -> defer.Deferred[Any]:
            d: defer.Deferred[Any] = defer.Deferred()
            jobs.append((f, args, d))
            return d

        self.spool = Spool(self.directory, threadpool_runner=runner)
        client = self.authenticated()
        self.start_data(client)
        self.assertEqual(client.send(b"hi\r\n.\r\nNOOP\r\n"), [])
        ((f, args, d),) = jobs
        d.callback(f(*args))
        self.assertReplies(client.read(), [b"250 2.0.0 Ok", b"250 2.0.0"])


_TEXT_LINE = st.lists(st.sampled_from([b".", b"x", b"\n", b"\r", b" ", b"\xc3\xa9"]), max_size=12).map(
    b"".join
).filter(lambda line: b"\r\n" not in line and not line.endswith(b"\r"))


class DataBlockTests(ServerTestCase):
    """
    Message text is taken a block at a time when it can be: the stored
    message is the same however the text arrives (one segment, byte by
    byte, any split), dot-unstuffed line by line.
    """

    def deliver(self, wire: bytes, cuts: list[int]) -> tuple[list[bytes], bytes | None]:
        before = set(self.spool.ids())
        client = self.authenticated()
        self.start_data(client)
        replies: list[bytes] = []
        for piece in _pieces(wire, cuts):
            replies += client.send(piece)
        new = [id for id in self.spool.ids() if id not in before]
        return finals(replies), (self.spool.load(new[0])[0] if new else None)

    @settings(max_examples=150, deadline=None)
    @given(lines=st.lists(_TEXT_LINE, max_size=20), cuts=st.lists(st.integers(0, 400), max_size=8))
    def test_any_split_same_message(self, lines, cuts):
        """Stored the same way however split; refused alike when a line has a bare CR or LF."""
        wire = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
        wire += b".\r\n"
        replies, message = self.deliver(wire, cuts)
        bare = any(b"\r" in line or b"\n" in line for line in lines)
        self.assertEqual([r[:10] for r in replies], [b"554 5.6.11" if bare else b"250 2.0.0 "])
        body = b"".join(line + b"\r\n" for line in lines)
        one_by_one_replies, one_by_one = self.deliver(wire, list(range(len(wire))))
        self.assertEqual([r[:10] for r in one_by_one_replies], [r[:10] for r in replies])
        if bare:
            self.assertIsNone(message)
            self.assertIsNone(one_by_one)
            return
        for stored in (message, one_by_one):
            self.assertTrue(stored.endswith(body), (stored, body))
            header = stored[: len(stored) - len(body)].split(b"\r\n")  # nothing but the header
            self.assertEqual(header[-1], b"")
            self.assertTrue(header[0].startswith(b"Received: "))
            self.assertTrue(all(line.startswith(b"\t") for line in header[1:-1]), header)

    @settings(max_examples=100, deadline=None)
    @given(
        lines=st.lists(
            st.lists(st.sampled_from([b".", b"x", b"\n", b"\r", b"y" * 400]), max_size=4)
            .map(b"".join)
            .filter(lambda line: b"\r\n" not in line and not line.endswith(b"\r")),
            max_size=10,
        ),
        cuts=st.lists(st.integers(0, 5000), max_size=8),
        max_size=st.integers(100, 4000),
    )
    @example(lines=[b"y" * 400] * 3 + [b"x\nx"], cuts=[], max_size=1000)
    def test_any_split_same_outcome(self, lines, cuts, max_size):
        """Lines too long, bare CR/LF, the size limit, in any order: the split changes nothing."""
        wire = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
        wire += b".\r\n"
        outcomes = []
        for pieces in (_pieces(wire, cuts), [wire], _pieces(wire, list(range(0, len(wire), 3)))):
            client = self.authenticated(max_size=max_size)
            self.start_data(client)
            before = set(self.spool.ids())
            replies = [line for piece in pieces for line in client.send(piece)]
            stored = [self.spool.load(id)[0] for id in self.spool.ids() if id not in before]
            outcomes.append(
                ([r[:10] for r in finals(replies)], [_without_received(m) for m in stored])
            )
        self.assertEqual(outcomes[0], outcomes[1])
        self.assertEqual(outcomes[0], outcomes[2])

    def test_long_line_in_a_block(self):
        """A block with a line too long goes line by line: 500 5.5.6, nothing stored."""
        replies, message = self.deliver(b"a\r\n" * 50 + b"x" * 1000 + b"\r\n" + b"b\r\n" * 50
                                        + b".\r\n", [])
        self.assertEqual([r[:9] for r in replies], [b"500 5.5.6"])
        self.assertIsNone(message)

    def test_size_limit_in_a_block(self):
        client = self.authenticated(max_size=1000)
        self.start_data(client)
        self.assertReplies(client.send(b"z" * 98 + b"\r\n" * 1 + (b"y" * 98 + b"\r\n") * 20 + b".\r\n"),
                           [b"552 5.3.4"])
        self.assertNothingStored()

    def test_first_error_is_the_reply_however_split(self):
        """Over the size, then a bare LF and a line too long: 552 5.3.4, in one read or streamed."""
        wire = (b"y" * 98 + b"\r\n") * 12 + b"a\nb\r\n" + b"x" * 1500 + b"\r\n" + b".\r\n"
        for cuts in ([], [len(wire) - 500], list(range(len(wire)))):
            client = self.authenticated(max_size=1000)
            self.start_data(client)
            replies = [line for piece in _pieces(wire, cuts) for line in client.send(piece)]
            self.assertReplies(replies, [b"552 5.3.4"])
        self.assertNothingStored()

    def test_end_marker_lookalikes(self):
        """C{..} is a stuffed dot, C{\\r\\n.x} a stuffed line; only C{\\r\\n.\\r\\n} ends the text."""
        replies, message = self.deliver(b"a\r\n..\r\n.x\r\n...\r\n.\r\nNOOP\r\n", [])
        self.assertEqual([r[:9] for r in replies], [b"250 2.0.0", b"250 2.0.0"])
        self.assertTrue(message.endswith(b"\r\na\r\n.\r\nx\r\n..\r\n"), message)


class ClientTextTests(ServerTestCase):
    """
    What the client says that is recorded (the envelope, C{AUTH=}, the
    HELO name) or echoed is held to RFC 5321 without SMTPUTF8: no control
    character, NUL or 8-bit octet reaches the spool's JSON, the C{Received:}
    header, a log line or a reply.
    """

    def test_sender_with_control_characters_refused(self) -> None:
        client = self.authenticated()
        for path in (b'<"x\nMAIL FROM:<ceo@example.com>"@example.com>', b'<"a\rb"@example.com>'):
            # A bare CR or LF: no command at all (RFC 5321 2.3.8).
            self.assertReplies(client.send(b"MAIL FROM:" + path + b"\r\n"), [b"501 5.5.2"])
        for path in (b'<"a\x00b"@example.com>', b'<"a\tb"@example.com>', b'<"a\x7fb"@example.com>',
                     b'<"\xc3\xa9"@example.com>', b"<a\\\x00b@example.com>", b'<a@"b\x01c">',
                     b'<a@"b.example">', b"<a@b..example>"):
            self.assertReplies(client.send(b"MAIL FROM:" + path + b"\r\n"), [b"553 5.1.7"])
        self.assertReplies(client.send(b"MAIL FROM:<daniel@example.com>\r\n"), [b"250 2.1.0"])

    def test_recipient_with_control_characters_refused(self) -> None:
        client = self.authenticated()
        client.send(b"MAIL FROM:<daniel@example.com>\r\n")
        for path in (b'<"a\nDATA\n"@y.example>', b'<"a\rb"@y.example>'):
            self.assertReplies(client.send(b"RCPT TO:" + path + b"\r\n"), [b"501 5.5.2"])
        for path in (b'<"a\x00b"@y.example>', b'<"\x1b[31m"@y.example>', b"<\\\x80@y.example>"):
            self.assertReplies(client.send(b"RCPT TO:" + path + b"\r\n"), [b"553 5.1.3"])
        self.assertEqual(client.proto._to, [])

    def test_rfc5321_addresses_still_taken(self) -> None:
        """Quoted strings of printable text, quoted pairs, atoms and dots, a bare postmaster."""
        client = self.authenticated()
        self.assertReplies(
            client.send(b'MAIL FROM:<"john doe"@example.com>\r\n'
                        b"RCPT TO:<first.last+tag@sub.example.com>\r\n"
                        b'RCPT TO:<"a\\ b(c)"@example.org>\r\n'
                        b"RCPT TO:<postmaster>\r\nDATA\r\nhi\r\n.\r\n"),
            [b"250 2.1.0", b"250 2.1.5", b"250 2.1.5", b"250 2.1.5", b"354 2.0.0", b"250 2.0.0"],
        )
        ((_, meta),) = self.stored()
        self.assertEqual(meta["mail_from"], '"john doe"@example.com')
        self.assertEqual(
            meta["rcpt_to"],
            ["first.last+tag@sub.example.com", '"a\\ b(c)"@example.org', "postmaster@mx.test"],
        )

    def test_mail_auth_strict_xtext(self) -> None:
        """C{+} and two upper-case hex digits only; the decoded value is C{<>} or a mailbox."""
        client = self.authenticated()
        for value in (b"x+0D+0AX-Injected:+20yes+00++A", b"a+0a@example.com", b"a+-1@example.com",
                      b"a+2@example.com", b"a+@example.com", b"a=b@example.com", b"daniel",
                      b"a+00b@example.com", b"%22a+0Ab%22@example.com", b"<a@example.com>",
                      b"a\xc3\xa9@example.com", b"a@exa+20mple.com"):
            self.assertReplies(client.send(b"MAIL FROM:<daniel@example.com> AUTH=" + value + b"\r\n"),
                               [b"501 5.5.4"])
        self.assertReplies(client.send(b"MAIL FROM:<daniel@example.com> AUTH=a+2Bb@example.com\r\n"),
                           [b"250 2.1.0"])
        self.assertEqual(client.proto._mail_auth, "a+b@example.com")
        client.send(b"RSET\r\n")
        self.assertReplies(client.send(b"MAIL FROM:<daniel@example.com> AUTH=+3C+3E\r\n"), [b"250 2.1.0"])
        self.assertEqual(client.proto._mail_auth, "<>")

    def test_parameter_names_not_echoed_unless_keywords(self) -> None:
        client = self.authenticated()
        lines = client.send(b"MAIL FROM:<daniel@example.com> \x1b[31m\x00=1\r\n")
        self.assertReplies(lines, [b"501 5.5.4"])
        self.assertTrue(all(line.isascii() and line.decode().isprintable() for line in lines), lines)
        self.assertReplies(client.send(b"MAIL FROM:<daniel@example.com> \xff=1\r\n"), [b"501 5.5.4"])
        self.assertReplies(client.send(b"MAIL FROM:<daniel@example.com> X-FROB=1\r\n"), [b"555 5.5.4"])

    def test_helo_names(self) -> None:
        """A domain or an address literal of printable ASCII, at most 255 octets; else 501 5.5.4."""
        client = self.connect("implicit", junk_commands=100)
        for command in (b"EHLO", b"HELO"):
            for name in (b"evil\x00\x1b[31mhost(spoof", b"a(b)", b"host\x7f", b"h\xc3\xa9",
                         b"[1.2.3.4", b"[a]b]", b"a..b", b".a", b"x" * 256, b'"q"'):
                self.assertReplies(
                    client.send(command + b" " + name + b" [6.6.6.6]\r\n"), [b"501 5.5.4"]
                )
        self.assertIsNone(client.proto._helo_name)
        for name in (b"[IPv6:2001:db8::1]", b"[192.0.2.1]", b"host_name.example.", b"x" * 255):
            self.assertReplies(client.send(b"EHLO " + name + b"\r\n"), [b"250"])
            self.assertEqual(client.proto._helo_name, name.decode())

    def test_helo_address_literals_are_addresses(self) -> None:
        """Third review: a general literal's parentheses and ';' would break the Received: comment."""
        client = self.connect("implicit", junk_commands=100)
        for name in (b"[10.0.0.1)(by:mx.trusted.example;Mon,1(Jan]", b"[x]", b"[IPv6:1.2.3.4]",
                     b"[1.2.3.4.5]", b"[IPv6:fe80::1%eth0]", b"[2001:db8::1]"):
            self.assertReplies(client.send(b"EHLO " + name + b"\r\n"), [b"501 5.5.4"])
        for name in (b"[127.0.0.1]", b"[IPv6:::1]", b"[ipv6:2001:db8::1]"):
            self.assertReplies(client.send(b"EHLO " + name + b"\r\n"), [b"250"])

    def test_received_header_printable(self) -> None:
        client = self.connect("implicit")
        self.assertReplies(client.send(b"EHLO evil\x00\x1b[31mhost(spoof [6.6.6.6])\r\n"),
                           [b"501 5.5.4"])
        self.assertReplies(client.send(b"EHLO [IPv6:2001:db8::1]\r\n"), [b"250"])
        client.send(b"AUTH PLAIN " + plain() + b"\r\n")
        self.start_data(client)
        client.send(b"hi\r\n.\r\n")
        ((message, meta),) = self.stored()
        header = message.split(b"\r\n\t")[0]
        self.assertEqual(header, b"Received: from [IPv6:2001:db8::1] ([192.0.2.7])")
        self.assertEqual(meta["helo"], "[IPv6:2001:db8::1]")


class LinearInputTests(ServerTestCase):
    """
    Taking lines is linear in the input, whatever the input is made of: a
    line never costs a copy or a scan of everything after it (one pipelined
    message of empty lines and one line too long held the reactor minutes).
    The work is counted, not timed.
    """

    def unread(self, proto: Any) -> int:
        return len(proto._buffer) - getattr(proto, "_pos", 0)

    def count_block_scans(self, client: Client, budget: int) -> list[int]:
        """Sum the input each C{_data_block} call may scan; fail once over C{budget}."""
        proto, scanned = client.proto, [0]
        original = proto._data_block

        def counting() -> bool:
            scanned[0] += self.unread(proto)
            if scanned[0] > budget:
                self.fail(f"scanned {scanned[0]} octets for {budget // 4} of input")
            return original()

        proto._data_block = counting
        return scanned

    def count_data_lines(self, client: Client) -> list[bytes]:
        """The lines of message text that went line by line."""
        proto, seen = client.proto, []
        original = proto._data_line

        def counting(line: bytes) -> None:
            seen.append(line)
            original(line)

        proto._data_line = counting
        return seen

    def test_empty_lines_then_a_long_line_is_linear(self) -> None:
        """256 KiB of empty lines, a 1000-octet line, C{.}: a few scans, not one per line."""
        client = self.authenticated()
        self.start_data(client)
        wire = b"\r\n" * (128 * 1024 - 600) + b"x" * 1000 + b"\r\n.\r\n"
        scanned = self.count_block_scans(client, 4 * len(wire))
        by_line = self.count_data_lines(client)
        self.assertReplies(client.send(wire), [b"500 5.5.6"])
        self.assertLessEqual(scanned[0], 4 * len(wire))
        self.assertEqual(by_line, [])
        self.assertNothingStored()
        self.assertReplies(client.send(b"NOOP\r\n"), [b"250 2.0.0"])

    def test_many_long_lines_are_linear(self) -> None:
        """Short and long lines alternating: still a bounded number of scans."""
        client = self.authenticated()
        self.start_data(client)
        wire = (b"a\r\n" * 50 + b"y" * 1200 + b"\r\n") * 150 + b".\r\n"
        self.count_block_scans(client, 4 * len(wire))
        self.assertReplies(client.send(wire), [b"500 5.5.6"])
        self.assertNothingStored()

    def test_stuffed_999_octet_line_and_short_lines_in_one_block(self) -> None:
        """A dot-stuffed line of 999 octets is not too long: taken in a block with the rest."""
        client = self.authenticated()
        self.start_data(client)
        by_line = self.count_data_lines(client)
        stuffed = b"." + b"." + b"x" * 997
        wire = b"a\r\n" * 200 + stuffed + b"\r\n" + b"b\r\n" * 200 + b".\r\n"
        self.assertReplies(client.send(wire), [b"250 2.0.0"])
        self.assertEqual(by_line, [])
        ((message, _),) = self.stored()
        self.assertTrue(message.endswith(b"a\r\n" * 200 + stuffed[1:] + b"\r\n" + b"b\r\n" * 200))

    def test_pipelined_commands_do_not_copy_the_buffer(self) -> None:
        """Each command line is taken without copying the lines after it."""
        client = self.authenticated()
        proto, copied, last = client.proto, [0], [None]
        original = proto._line

        def counting(line: bytes) -> None:
            if proto._buffer is not last[0]:  # a new buffer object: a copy was made
                last[0] = proto._buffer
                copied[0] += len(proto._buffer)
            original(line)

        proto._line = counting
        wire = b"NOOP\r\n" * 2000
        replies = client.send(wire)
        self.assertEqual(len(replies), 2000)
        self.assertLessEqual(copied[0], 2 * len(wire))

    def test_line_an_octet_at_a_time_is_linear(self) -> None:
        """
        A 12000-octet command line arriving an octet per read: the buffer
        is neither copied nor searched from the line's start at every read.
        """
        client = self.authenticated()
        proto, scanned, copied = client.proto, [0], [0]

        class Counting(bytearray):
            def find(self, sub: Any, start: int = 0, *end: int) -> int:
                scanned[0] += len(self) - start
                return super().find(sub, start, *end)

        if isinstance(proto._buffer, bytearray):  # searches counted where they can be
            proto._buffer = Counting(proto._buffer)
        last = proto._buffer
        line = b"NOOP " + b"x" * 12000 + b"\r\n"
        for i in range(len(line)):
            proto.dataReceived(line[i : i + 1])
            if proto._buffer is not last:  # a new buffer object: a copy was made
                last = proto._buffer
                copied[0] += len(last)
        self.assertReplies(client.read(), [b"250 2.0.0"])
        self.assertLessEqual(copied[0] + scanned[0], 4 * len(line))


def _without_received(message: bytes) -> bytes:
    """The message as the client sent it: our C{Received:} header (and its id) left out."""
    lines = message.split(b"\r\n")
    rest = 1
    while lines[rest].startswith(b"\t"):
        rest += 1
    return b"\r\n".join(lines[rest:])


def _pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


class BufferingTransport(StartTLSTransport):
    """
    Like Twisted's FileDescriptor: a write that takes the buffer above
    C{buffer_size} pauses the registered streaming producer; L{drain} empties
    the buffer and resumes it.
    """

    def __init__(self, buffer_size: int) -> None:
        super().__init__()
        self.buffer_size = buffer_size
        self.producer_paused = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None and len(self.value()) > self.buffer_size:
            self.producer_paused = True
            self.producer.pauseProducing()

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def drain(self) -> bytes:
        data = self.value()
        self.clear()
        if self.producer is not None and self.producer_paused:
            self.producer_paused = False
            self.producer.resumeProducing()
        return data


class BackpressureTests(ServerTestCase):
    """Issue 11 item 3: a client that sends and never reads cannot grow the write buffer."""

    def test_registered_as_streaming_producer(self) -> None:
        client = self.connect()
        self.assertIs(client.transport.producer, client.proto)
        self.assertTrue(client.transport.streaming)
        self.assertTrue(interfaces.IPushProducer.providedBy(client.proto))

    def test_write_pause_stops_answering_and_reading(self) -> None:
        """
        pauseProducing from the transport: lines wait unanswered, reading stops
        once MAX_PENDING_INPUT waits; resume answers them and reads again.
        """
        client = self.trusted_session()
        client.proto.pauseProducing()
        self.assertEqual(client.send(b"NOOP\r\nHELP\r\n"), [])
        self.assertEqual(client.transport.producerState, "producing")
        count = MAX_PENDING_INPUT // 6
        self.assertEqual(client.send(b"NOOP\r\n" * count), [])
        self.assertEqual(client.transport.producerState, "paused")
        client.proto.resumeProducing()
        self.assertEqual(client.transport.producerState, "producing")
        self.assertReplies(client.read(), [b"250 2.0.0", b"214 2.0.0"] + [b"250 2.0.0"] * count)

    def buffering(self, buffer_size: int) -> Client:
        """A new session of C{self.factory} over a L{BufferingTransport}, past the greeting."""
        transport = BufferingTransport(buffer_size)
        proto = self.factory.buildProtocol(PEER)
        proto.callLater = self.clock.callLater
        proto.makeConnection(transport)
        self.assertTrue(transport.drain().startswith(b"220 "))
        return Client(proto, transport)

    def test_ehlo_flood_bounded(self) -> None:
        """Many EHLO lines at once: answering stops at the buffer bound, and goes on when drained."""
        self.connect(trusted_networks=(ipaddress.ip_network("192.0.2.0/24"),))  # EHLO is no junk
        client = self.buffering(4096)
        count = MAX_PENDING_INPUT // 21 + 1000  # more than MAX_PENDING_INPUT unanswered
        client.proto.dataReceived(b"EHLO client.example\r\n" * count)
        self.assertEqual(client.transport.producerState, "paused")
        self.assertLess(len(client.transport.value()), 4096 + 1024)
        total = 0
        while client.transport.producer_paused:
            total += client.transport.drain().count(b"\r\n250 ")
        total += client.transport.value().count(b"\r\n250 ")
        self.assertEqual(total, count)
        self.assertEqual(client.transport.producerState, "producing")

    def test_pending_reply_and_write_pause_are_separate_reasons(self) -> None:
        """A drained write buffer does not resume reading while a reply is pending, nor the reverse."""
        checker = PendingChecker()
        client = self.tls_session(checkers=[checker])
        client.send(b"AUTH PLAIN " + plain() + b"\r\n" + b"NOOP\r\n" * (MAX_PENDING_INPUT // 6 + 1))
        self.assertEqual(client.transport.producerState, "paused")
        client.proto.pauseProducing()
        client.proto.resumeProducing()  # the write buffer drained: the login is still pending
        self.assertEqual(client.transport.producerState, "paused")
        self.assertEqual(client.read(), [])
        client.proto.pauseProducing()  # full again
        checker.calls[0][1].callback("daniel")  # the login ends: the write buffer is still full
        self.assertEqual(client.transport.producerState, "paused")
        self.assertReplies(client.read(), [b"235 2.7.0"])
        client.proto.resumeProducing()
        self.assertEqual(client.transport.producerState, "producing")
        self.assertEqual(len(finals(client.read())), MAX_PENDING_INPUT // 6 + 1)

    def test_input_bounded_when_transport_ignores_pause(self) -> None:
        client = self.trusted_session()
        client.proto.pauseProducing()
        client.proto.dataReceived(b"NOOP\r\n" * (MAX_BUFFERED_INPUT // 6 + 1))
        self.assertReplies(client.read(), [b"421 4.7.0"])
        self.assertTrue(client.closed)
        self.assertEqual(client.proto._buffer, b"")

    def test_close_unregisters_then_aborts_a_client_that_does_not_read(self) -> None:
        """A registered producer would keep TCP and TLS transports from closing."""
        client = self.connect()
        client.proto.pauseProducing()
        client.proto.resumeProducing()
        self.assertReplies(client.send(b"QUIT\r\n"), [b"221 2.0.0"])
        self.assertIsNone(client.transport.producer)
        self.assertTrue(client.closed)
        self.assertFalse(client.transport.disconnected)
        self.clock.advance(CLOSE_GRACE)
        self.assertTrue(client.transport.disconnected)  # abortConnection

    def test_close_grace_cancelled_when_lost(self) -> None:
        client = self.connect()
        client.send(b"QUIT\r\n")
        client.proto.connectionLost(Exception("closed"))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_idle_timeout_aborts_a_client_that_does_not_read(self) -> None:
        client = self.connect(timeout=30)
        client.proto.pauseProducing()
        self.clock.advance(30)
        self.assertReplies(client.read(), [b"421 4.4.2"])
        self.clock.advance(CLOSE_GRACE)
        self.assertTrue(client.transport.disconnected)

    def test_lines_unanswered_do_not_reset_idle_timer(self) -> None:
        """A client that sends a line now and then but never reads is idle all the same."""
        client = self.trusted_session(timeout=30)
        client.proto.pauseProducing()
        for _ in range(2):
            self.clock.advance(14)
            client.proto.dataReceived(b"NOOP\r\n")
        self.clock.advance(2)
        self.assertReplies(client.read(), [b"421 4.4.2"])
        self.assertTrue(client.closed)

    def test_starttls_starts_unpaused(self) -> None:
        """
        Twisted's startTLS re-registers the producer with a fresh TLS layer
        that will not resume a pause from before: the session must not stay
        paused for ever when the 220 filled the buffer.
        """
        self.connect()
        client = self.buffering(0)
        client.proto.dataReceived(b"EHLO client.example\r\n")
        client.transport.drain()
        client.proto.dataReceived(b"STARTTLS\r\n")
        self.assertTrue(client.transport.tls_started)
        self.assertReplies(client.read(), [b"220 2.0.0"])
        self.assertTrue(client.transport.producer_paused)
        client.transport.producer_paused = False  # what the new TLS layer knows
        client.proto.dataReceived(b"EHLO client.example\r\n")
        self.assertTrue(finals(client.read())[-1].startswith(b"250 "))


class AuthDeadlineTests(ServerTestCase):
    """Issue 11 item 4: NOOP no longer keeps an unauthenticated session for ever."""

    def test_deadline_despite_activity(self) -> None:
        client = self.connect(auth_deadline=10, timeout=300)
        for _ in range(3):
            self.clock.advance(3)
            self.assertReplies(client.send(b"NOOP\r\n"), [b"250 2.0.0"])
        self.clock.advance(1)
        self.assertEqual(client.read(), [b"421 4.7.0 mx.test Authentication took too long, closing connection"])
        self.assertTrue(client.closed)
        self.assertEqual(client.send(b"NOOP\r\n"), [])

    def test_deadline_during_auth_exchange(self) -> None:
        client = self.tls_session(auth_deadline=10)
        self.assertReplies(client.send(b"AUTH LOGIN\r\n"), [b"334 "])
        self.clock.advance(10)
        self.assertReplies(client.read(), [b"421 4.7.0"])
        self.assertTrue(client.closed)

    def test_deadline_ends_with_auth(self) -> None:
        client = self.authenticated(auth_deadline=10, timeout=300)
        self.clock.advance(100)
        self.assertEqual(client.read(), [])
        self.assertFalse(client.closed)

    def test_trusted_network_has_no_deadline(self) -> None:
        client = self.trusted_session(auth_deadline=10, timeout=300)
        self.clock.advance(100)
        self.assertFalse(client.closed)

    def test_deadline_again_after_starttls_forgets_auth(self) -> None:
        client = self.connect(auth_deadline=10, timeout=300, insecure_auth=True)
        self.ehlo(client)
        self.assertReplies(client.send(b"AUTH PLAIN " + plain() + b"\r\n"), [b"235 2.7.0"])
        self.assertReplies(client.send(b"STARTTLS\r\n"), [b"220 2.0.0"])
        self.clock.advance(10)
        self.assertReplies(client.read(), [b"421 4.7.0"])

    def test_deadline_then_silent_client_aborted(self) -> None:
        client = self.connect(auth_deadline=10)
        client.proto.pauseProducing()
        self.clock.advance(10)
        self.clock.advance(CLOSE_GRACE)
        self.assertTrue(client.transport.disconnected)


class JunkCommandTests(ServerTestCase):
    """Issue 11 item 4: commands that lead nowhere before AUTH are limited (smtpd_junk_command_limit)."""

    JUNK = [
        b"NOOP", b"RSET", b"HELP", b"VRFY daniel", b"EXPN staff", b"FROB", b"", b"EHLO again.example",
        b"HELO again.example", b"STARTTLS x", b"AUTH", b"AUTH FROB", b"MAIL FROM:<a@b.example>",
        b"RCPT TO:<a@b.example>", b"DATA", b"AUTH LOGIN\r\n*", b"AUTH PLAIN\r\n%%%",
    ]

    def test_each_kind_counts(self) -> None:
        for junk in self.JUNK:
            client = self.tls_session(junk_commands=2)
            for _ in range(2):
                client.send(junk + b"\r\n")
            self.assertFalse(client.closed, junk)
            lines = client.send(junk + b"\r\n")
            self.assertEqual(
                lines[-1],
                b"421 4.7.0 mx.test Too many commands without authentication, closing connection",
                junk,
            )
            self.assertTrue(client.closed, junk)

    def test_overlong_lines_count(self) -> None:
        client = self.tls_session(junk_commands=1)
        client.send(b"NOOP " + b"x" * MAX_COMMAND_LINE + b"\r\n")
        lines = client.send(b"NOOP " + b"x" * MAX_COMMAND_LINE + b"\r\n")
        self.assertReplies(lines, [b"500 5.5.6", b"421 4.7.0"])

    def test_the_way_to_auth_is_not_junk(self) -> None:
        """EHLO, STARTTLS, EHLO again, AUTH, and failed logins (counted apart) cost nothing."""
        client = self.connect(junk_commands=1)
        self.ehlo(client)
        self.assertReplies(client.send(b"STARTTLS\r\n"), [b"220 2.0.0"])
        self.ehlo(client)
        self.assertReplies(client.send(b"NOOP\r\n"), [b"250 2.0.0"])
        self.assertReplies(client.send(b"AUTH PLAIN " + plain(password="x") + b"\r\n"), [b"535 5.7.8"])
        self.assertReplies(client.send(b"AUTH LOGIN\r\n"), [b"334 "])
        self.assertReplies(client.send(b64("daniel") + b"\r\n"), [b"334 "])
        self.assertReplies(client.send(b64("tiger") + b"\r\n"), [b"235 2.7.0"])
        self.assertReplies(client.send(b"NOOP\r\n" * 30), [b"250 2.0.0"] * 30)
        self.assertFalse(client.closed)

    def test_not_reset_by_starttls(self) -> None:
        client = self.connect(junk_commands=2)
        self.ehlo(client)
        client.send(b"NOOP\r\nNOOP\r\n")
        self.assertReplies(client.send(b"STARTTLS\r\n"), [b"220 2.0.0"])
        self.ehlo(client)
        self.assertReplies(client.send(b"NOOP\r\n"), [b"250 2.0.0", b"421 4.7.0"])

    def test_trusted_network_not_limited(self) -> None:
        client = self.trusted_session(junk_commands=1)
        self.assertReplies(client.send(b"NOOP\r\n" * 5), [b"250 2.0.0"] * 5)
        self.assertFalse(client.closed)


class MailAuthParameterTests(ServerTestCase):
    """Issue 11 item 9: C{MAIL FROM AUTH=} is believed only from an authenticated client."""

    def send_one(self, client: Client, mail: bytes) -> dict[str, Any]:
        self.assertReplies(
            client.send(mail + b"\r\nRCPT TO:<a@example.net>\r\nDATA\r\n"),
            [b"250 2.1.0", b"250 2.1.5", b"354 2.0.0"],
        )
        self.assertReplies(client.send(b"hi\r\n.\r\n"), [b"250 2.0.0"])
        (id,) = self.spool.ids()
        _, meta = self.spool.load(id)
        return meta

    def test_trusted_network_is_null(self) -> None:
        meta = self.send_one(self.trusted_session(), b"MAIL FROM:<app@example.com> AUTH=ceo@example.com")
        self.assertEqual(meta["mail_auth"], "<>")
        self.assertIsNone(meta["auth_info"])

    def test_trusted_network_without_parameter(self) -> None:
        meta = self.send_one(self.trusted_session(), b"MAIL FROM:<app@example.com>")
        self.assertIsNone(meta["mail_auth"])

    def test_authenticated_kept(self) -> None:
        meta = self.send_one(self.authenticated(), b"MAIL FROM:<daniel@example.com> AUTH=list@example.com")
        self.assertEqual(meta["mail_auth"], "list@example.com")

    def test_sender_binding_applies_to_the_auth_mailbox(self) -> None:
        acl = parse_acl(
            '[[acl."smtp/sender/example.com/daniel"]]\n'
            "allow = true\n"
            'privileges = ["send"]\n'
            'identity.Individual = "daniel"\n'
        )
        client = self.authenticated(policy=acl, sender_binding=True)
        meta = self.send_one(client, b"MAIL FROM:<daniel@example.com> AUTH=ceo@example.com")
        self.assertEqual(meta["mail_auth"], "<>")

    def test_sender_binding_own_mailbox_kept(self) -> None:
        acl = parse_acl(
            '[[acl."smtp/sender/example.com/daniel"]]\n'
            "allow = true\n"
            'privileges = ["send"]\n'
            'identity.Individual = "daniel"\n'
        )
        client = self.authenticated(policy=acl, sender_binding=True)
        meta = self.send_one(client, b"MAIL FROM:<daniel@example.com> AUTH=daniel@example.com")
        self.assertEqual(meta["mail_auth"], "daniel@example.com")


class _Recording:
    """A compiled expression that records what it is asked to match."""

    def __init__(self, expression, seen):
        self.expression, self.seen = expression, seen

    def match(self, text):
        self.seen.append(text)
        return self.expression.match(text)
