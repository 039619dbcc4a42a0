"""
Issue 11 item 3, over real loopback sockets: for every front door, a client
with a small receive buffer sends several MiB that make the server write
(EHLO lines, pipelined GET /whoami, a tunnel to a local server that writes a
lot) and never reads. The server must stop reading: what it has buffered for
that client stays under a bound, and it keeps serving another client.

The server side of a connection is found among the reactor's selectables by
the client's port; its buffered output is Twisted's write buffer plus, for
TLS, what the TLS layer holds back.
"""

from __future__ import annotations

import base64
import os
import smtplib
import socket
import ssl
import struct
import time
from typing import Any

from twisted.internet import defer, protocol, reactor, task, tcp, threads
from twisted.internet.interfaces import IPushProducer
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from gateway import tap
from gateway.twistedinternals import buffered
from tests.support import free_port, keep_signal_handlers

#: What the client tries to send, and what the server may hold for it.
FLOOD = 5 * 1024 * 1024
BOUND = 1024 * 1024
#: A send that makes no progress for this long means the server stopped reading.
STALL = 1.0
#: What the SOCKS test's local server tries to write.
TALK = 64 * 1024 * 1024


def _client_tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the gateway's self-signed certificate
    return context


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A blocking socket with a small receive buffer (set before connect)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def _read_reply(sock: Any) -> bytes:
    """One whole SMTP reply (blocking)."""
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            raise AssertionError(f"closed after {data!r}")
        data += chunk
        lines = data.split(b"\r\n")
        if any(len(line) > 3 and line[3:4] == b" " for line in lines[:-1]):
            return data


def _flood(sock: Any, chunk: bytes) -> int:
    """Send C{chunk} until L{FLOOD} bytes went out or the server stopped reading."""
    sock.settimeout(STALL)
    sent = 0
    try:
        while chunk and sent < FLOOD:
            sock.sendall(chunk)
            sent += len(chunk)
    except (socket.timeout, ssl.SSLError, BlockingIOError, ConnectionError):  # stalled, or closed
        pass
    return sent


def _innermost(transport: tcp.Server) -> Any:
    proto = transport.protocol
    while getattr(proto, "wrappedProtocol", None) is not None:
        proto = proto.wrappedProtocol
    return proto


@defer.inlineCallbacks
def _wait(predicate: Any, what: str, timeout: float = 10.0) -> Any:
    end = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        yield task.deferLater(reactor, 0.01, lambda: None)


def _server_side(client_port: int, kind: type = tcp.Server) -> Any:
    """The reactor's C{kind} connection whose peer has port C{client_port}."""
    for selectable in set(reactor.getReaders()) | set(reactor.getWriters()):
        if isinstance(selectable, kind) and selectable.getPeer().port == client_port:
            return selectable
    return None


@implementer(IPushProducer)
class _Talker(protocol.Protocol):
    """
    A local server that writes up to L{TALK} bytes on connect, honouring
    backpressure: more than the loopback's socket buffers can absorb (with
    autotuning, tens of MiB), so only a relay that pauses stops it.
    """

    def connectionMade(self) -> None:
        self.factory.connections.add(self)
        self.sent = 0
        self.paused = False
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.sent < TALK:
            self.transport.write(b"x" * 65536)
            self.sent += 65536

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.connections.discard(self)


class BackpressureTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.ports = {
            name: free_port() for name in ("smtp", "smtps", "http", "https", "socks", "socks-tls")
        }
        talker = protocol.ServerFactory()
        talker.protocol = _Talker
        talker.connections = set()
        self.talker = talker
        listening = reactor.listenTCP(0, talker, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.talker_port = listening.getHost().port
        options = tap.Options()
        options.parseOptions([
            "--data-dir", os.path.abspath(self.mktemp()), "--auth", "memory:daniel:tiger",
            *(arg for name, port in self.ports.items()
              for arg in (f"--{name}", f"tcp:{port}:interface=127.0.0.1")),
            "--smtp-hostname", "mx.test",
            # Repeated EHLO is junk before AUTH: flood from a trusted client,
            # which has no junk budget, to reach the write buffer; 127.0.0.2
            # is an untrusted one.
            "--smtp-trusted-network", "127.0.0.1/32",
            "--socks-allow", f"127.0.0.1:{self.talker_port}",
            "--failure-delay", "0", "--failure-delay-max", "0",
        ])
        keep_signal_handlers(self)
        self.service = tap.makeService(options, reactor=reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)

    @defer.inlineCallbacks
    def check_bounded(self, sock: Any, chunk: bytes, settled: Any = None) -> Any:
        """
        Flood through C{sock} without reading; the server side must stay
        bounded. C{settled(server)}: the server gave up producing for this
        client (default: it stopped reading from it).
        """
        client_port = sock.getsockname()[1]
        server = yield _wait(lambda: _server_side(client_port), "the server side")
        self.addCleanup(self.close, sock, server)
        sent = yield threads.deferToThread(_flood, sock, chunk)
        if settled is None:
            settled = lambda server: server not in reactor.getReaders()  # noqa: E731
        yield _wait(
            lambda: settled(server) or buffered(server) > BOUND,
            "the server to stop producing",
        )
        held = buffered(server)
        self.assertLess(held, BOUND, f"{held} bytes held for a client that does not read"
                                     f" ({sent} bytes sent)")
        return server

    @defer.inlineCallbacks
    def close(self, sock: Any, server: tcp.Server) -> Any:
        """Close the client; the server side must go away, with no dirty reactor."""
        sock.close()
        try:
            yield _wait(lambda: not server.connected, "the server side to close", timeout=5)
        finally:
            if server.connected:
                server.abortConnection()

    def smtp_served(self) -> Any:
        def session() -> int:
            with smtplib.SMTP("127.0.0.1", self.ports["smtp"], timeout=10) as client:
                client.ehlo("other.test")
                return client.noop()[0]

        return threads.deferToThread(session)

    # -- SMTP ------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_smtp_ehlo_flood(self) -> Any:
        def prelude() -> socket.socket:
            sock = _connect(self.ports["smtp"])
            _read_reply(sock)
            return sock

        sock = yield threads.deferToThread(prelude)
        server = yield self.check_bounded(sock, b"EHLO client.test\r\n" * 4096)
        self.assertLess(len(_innermost(server)._codec._buffer), BOUND)
        self.assertEqual((yield self.smtp_served()), 250)

    @defer.inlineCallbacks
    def test_smtp_unauthenticated_ehlo_flood(self) -> Any:
        """The reported case: an untrusted client meets the junk limit, and is closed."""

        def prelude() -> socket.socket:
            sock = _connect(self.ports["smtp"], source="127.0.0.2")
            _read_reply(sock)
            return sock

        sock = yield threads.deferToThread(prelude)
        server = yield self.check_bounded(
            sock, b"EHLO client.test\r\n" * 4096, settled=lambda server: server.disconnecting
        )
        self.assertTrue(server.disconnecting)  # aborted after CLOSE_GRACE if it never reads
        self.assertEqual((yield self.smtp_served()), 250)

    @defer.inlineCallbacks
    def test_smtp_ehlo_flood_after_starttls(self) -> Any:
        """The producer registration survives Twisted's startTLS."""

        def prelude() -> Any:
            sock = _connect(self.ports["smtp"])
            _read_reply(sock)
            sock.sendall(b"EHLO client.test\r\n")
            _read_reply(sock)
            sock.sendall(b"STARTTLS\r\n")
            assert _read_reply(sock).startswith(b"220 "), "no 220 to STARTTLS"
            return _client_tls().wrap_socket(sock)

        sock = yield threads.deferToThread(prelude)
        yield self.check_bounded(sock, b"EHLO client.test\r\n" * 4096)
        self.assertEqual((yield self.smtp_served()), 250)

    @defer.inlineCallbacks
    def test_smtps_ehlo_flood(self) -> Any:
        def prelude() -> Any:
            sock = _client_tls().wrap_socket(_connect(self.ports["smtps"]))
            _read_reply(sock)
            return sock

        sock = yield threads.deferToThread(prelude)
        yield self.check_bounded(sock, b"EHLO client.test\r\n" * 4096)
        self.assertEqual((yield self.smtp_served()), 250)

    # -- HTTP ------------------------------------------------------------------

    WHOAMI = (
        b"GET /whoami HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Basic "
        + base64.b64encode(b"daniel:tiger")
        + b"\r\n\r\n"
    )

    def http_served(self) -> Any:
        def other() -> bytes:
            with _connect(self.ports["http"]) as s:
                s.sendall(self.WHOAMI.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\nConnection: close\r\n"))
                return s.recv(12)

        return threads.deferToThread(other)

    @defer.inlineCallbacks
    def test_http_pipelined_whoami(self) -> Any:
        """
        Pipelined requests from a client that never reads: Twisted's channel
        alone kept reading and answering them (GatewayChannel.pauseProducing).
        """
        sock = yield threads.deferToThread(_connect, self.ports["http"])
        yield self.check_bounded(sock, self.WHOAMI * 512)
        self.assertEqual((yield self.http_served()), b"HTTP/1.1 200")

    @defer.inlineCallbacks
    def test_https_pipelined_whoami(self) -> Any:
        def prelude() -> Any:
            return _client_tls().wrap_socket(_connect(self.ports["https"]))

        sock = yield threads.deferToThread(prelude)
        yield self.check_bounded(sock, self.WHOAMI * 512)
        self.assertEqual((yield self.http_served()), b"HTTP/1.1 200")

    # -- SOCKS ---------------------------------------------------------------

    def test_socks_tunnel_to_a_talker(self) -> Any:
        """The relay pauses the outbound side while the client does not read."""
        return self.socks_tunnel("socks")

    def test_socks_tls_tunnel_to_a_talker(self) -> Any:
        """The same through the TLS layer (no fast path: Twisted's writes)."""
        return self.socks_tunnel("socks-tls")

    @defer.inlineCallbacks
    def socks_tunnel(self, door: str) -> Any:
        def handshake() -> Any:
            sock = _connect(self.ports[door])
            if door == "socks-tls":
                sock = _client_tls().wrap_socket(sock)
            sock.sendall(b"\x05\x01\x02")
            assert sock.recv(2) == b"\x05\x02"
            sock.sendall(b"\x01\x06daniel\x05tiger")
            assert sock.recv(2) == b"\x01\x00"
            sock.sendall(
                b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1")
                + struct.pack("!H", self.talker_port)
            )
            reply = sock.recv(10)
            assert reply[:2] == b"\x05\x00", reply
            return sock

        self.addCleanup(
            lambda: _wait(lambda: not self.talker.connections, "the talker to close", 5)
        )
        sock = yield threads.deferToThread(handshake)
        # Through the client's session: a paused outbound connection with
        # nothing to write is in neither of the reactor's lists.
        server = yield _wait(lambda: _server_side(sock.getsockname()[1]), "the client's session")
        outbound = yield _wait(
            lambda: getattr(_innermost(server).outbound, "transport", None),
            "the relay's outbound connection",
        )
        # The client sends nothing more: the talker writes, the client never
        # reads; settled once the relay stops reading the talker.
        yield self.check_bounded(sock, b"", settled=lambda _: outbound not in reactor.getReaders())
        [talker] = self.talker.connections
        self.assertLess(talker.sent, TALK)

        def other() -> bytes:
            with _connect(self.ports["socks"]) as s:
                s.sendall(b"\x05\x01\x02")
                return s.recv(2)

        self.assertEqual((yield threads.deferToThread(other)), b"\x05\x02")
