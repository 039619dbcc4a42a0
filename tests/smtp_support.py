"""
What the SMTP server tests share: transports that stand in for TCP and TLS,
test mechanisms and checkers, a client that collects reply lines, and
L{ServerTestCase}, which connects a L{gateway.smtp.server.SubmissionServer}
with a real Portal, realm and spool.
"""

from __future__ import annotations

import base64
import ipaddress
import os
from typing import Any

from twisted.cred.checkers import ICredentialsChecker, InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, interfaces
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.mail.interfaces import IChallengeResponse
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import Interface, implementer

from gateway.acl import AllowAuthenticated
from gateway.credentials import ISASLCredentials
from gateway.realm import Realm, make_portal
from gateway.smtp.server import SMTPSettings, SubmissionFactory
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
