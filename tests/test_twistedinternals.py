"""
The private Twisted attributes L{gateway.twistedinternals} relies on, checked
against real Twisted objects: a TCP connection over loopback, an
C{HTTPChannel} fed over a C{StringTransport}. A Twisted upgrade that renames
one or changes what it means fails here, by name, before it degrades the
gateway. Nothing here skips.
"""

from __future__ import annotations

import configparser
import os
import shutil
import tempfile
import socket
import struct
from pathlib import Path
from typing import Any

import twisted
from packaging.requirements import Requirement
from twisted.internet import defer, endpoints, error, protocol, reactor, tcp, unix
from twisted.internet.interfaces import IHalfCloseableProtocol, ITLSTransport
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import http, server
from twisted.web.resource import Resource
from zope.interface import implementer

from gateway.tls import ensure_certificate
from gateway.twistedinternals import (
    accept_one_per_wakeup,
    keep_unix_socket_file,
    ssl_server_context,
    buffered,
    first_line_pending,
    half_close_now,
    pause_reading_while_answering,
    proxy_header_parsers,
    request_line,
    write_now,
)

#: More than a loopback socket's send and receive buffers take.
BIG = bytes(range(256)) * 40000


def _tls_options(case: SynchronousTestCase) -> Any:
    """A server TLS context (the gateway's self-signed certificate), for C{startTLS}."""
    return ensure_certificate(case.mktemp())[2].options()


class LoopbackTCPMixin:
    """A real TCP connection over loopback, its server side a L{tcp.Server} on a fake reactor."""

    def connect(self: Any) -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        self.theirs = socket.create_connection(listener.getsockname())
        self.addCleanup(self.theirs.close)
        ours, peer = listener.accept()
        ours.setblocking(False)
        self.addCleanup(ours.close)
        self.reactor = MemoryReactorClock()
        self.transport = tcp.Server(ours, protocol.Protocol(), peer, None, 1, self.reactor)

    def read_all(self: Any) -> bytes:
        self.theirs.setblocking(False)
        out = b""
        while True:
            try:
                chunk = self.theirs.recv(1 << 20)
            except BlockingIOError:
                return out
            if not chunk:
                return out
            out += chunk

    def drain(self: Any) -> bytes:
        """Run the reactor's writes until the buffer is empty; what the peer got meanwhile."""
        received = self.read_all()
        while buffered(self.transport):
            self.transport.doWrite()
            received += self.read_all()
        return received


class WriteBufferTests(LoopbackTCPMixin, SynchronousTestCase):
    """What L{write_now} and L{buffered} read on a TCP transport means what they assume."""

    def setUp(self) -> None:
        self.connect()

    def test_fresh_connection(self) -> None:
        t = self.transport
        self.assertIs(t.TLS, False)
        self.assertEqual((t.dataBuffer, t.offset, t._tempDataLen), (b"", 0, 0))
        self.assertIs(t._writeDisconnecting, False)
        self.assertTrue(t.connected)
        self.assertFalse(t.disconnecting)
        self.assertEqual(buffered(t), 0)

    def test_write_is_counted_until_the_reactor_writes(self) -> None:
        """C{write} only queues: C{_tempDataLen} counts it, the reactor is asked to write."""
        self.transport.write(b"hello")
        self.assertEqual(self.transport._tempDataLen, 5)
        self.assertEqual(buffered(self.transport), 5)
        self.assertEqual(self.read_all(), b"")
        self.assertIn(self.transport, self.reactor.getWriters())
        self.transport.doWrite()
        self.assertEqual(self.read_all(), b"hello")
        self.assertEqual((self.transport.dataBuffer, self.transport._tempDataLen), (b"", 0))

    def test_what_does_not_fit_moves_to_dataBuffer(self) -> None:
        """After a partial C{doWrite}, the rest is C{dataBuffer} past C{offset}."""
        self.transport.write(BIG)
        self.transport.doWrite()
        t = self.transport
        self.assertEqual(t._tempDataLen, 0)
        self.assertGreater(len(t.dataBuffer) - t.offset, 0)
        self.assertEqual(buffered(t), len(t.dataBuffer) - t.offset)
        self.assertEqual(self.drain(), BIG)
        self.assertEqual(buffered(t), 0)

    def test_writeSomeData_sends_at_once(self) -> None:
        self.assertEqual(self.transport.writeSomeData(b"hello"), 5)
        self.assertEqual(self.read_all(), b"hello")
        self.assertEqual(buffered(self.transport), 0)
        self.assertNotIn(self.transport, self.reactor.getWriters())

    def test_writeSomeData_sends_what_fits(self) -> None:
        sent = self.transport.writeSomeData(BIG)
        self.assertIsInstance(sent, int)
        self.assertGreater(sent, 0)
        self.assertLess(sent, len(BIG))
        self.assertEqual(buffered(self.transport), 0)  # the rest is the caller's
        received = self.read_all()
        self.assertEqual(received, BIG[: len(received)])

    def test_writeSomeData_returns_an_exception_when_lost(self) -> None:
        """A reset connection: an exception returned, not raised (not an int)."""
        self.theirs.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.theirs.close()
        result = self.transport.writeSomeData(b"x")
        for _ in range(10):  # the first send may still go out before the reset is seen
            if not isinstance(result, int):
                break
            result = self.transport.writeSomeData(b"x")
        self.assertIsInstance(result, error.ConnectionLost)

    def test_loseWriteConnection_sets_writeDisconnecting(self) -> None:
        self.transport.loseWriteConnection()
        self.assertIs(self.transport._writeDisconnecting, True)
        self.assertFalse(self.transport.disconnecting)

    def test_loseConnection_sets_disconnecting(self) -> None:
        self.transport.loseConnection()
        self.assertTrue(self.transport.disconnecting)

    def test_tls_layer_keeps_early_writes(self) -> None:
        """Written before the handshake, under a TLSMemoryBIOProtocol: its C{_appSendBuffer}."""
        factory = TLSMemoryBIOFactory(_tls_options(self), False, protocol.Factory.forProtocol(
            protocol.Protocol
        ))
        layer = factory.buildProtocol(None)
        self.transport.protocol = layer
        layer.makeConnection(self.transport)
        early = b"early" * 20000  # above what TLS aggregates for the next reactor pass
        layer.wrappedProtocol.transport.write(early)
        self.assertEqual(layer._appSendBuffer, [early])
        self.assertEqual(buffered(self.transport), len(early))

    def test_startTLS_sets_TLS(self) -> None:
        self.assertTrue(ITLSTransport.providedBy(self.transport))
        self.transport.startTLS(_tls_options(self))
        self.assertIs(self.transport.TLS, True)


class WriteNowTests(LoopbackTCPMixin, SynchronousTestCase):
    """L{write_now}: at once when nothing is queued, through C{write} otherwise."""

    def setUp(self) -> None:
        self.connect()

    def test_sent_at_once(self) -> None:
        self.assertTrue(write_now(self.transport, b"hello"))
        self.assertEqual(self.read_all(), b"hello")
        self.assertNotIn(self.transport, self.reactor.getWriters())

    def test_order_kept_behind_a_queue(self) -> None:
        self.assertFalse(write_now(self.transport, BIG))
        self.assertTrue(buffered(self.transport))
        self.assertFalse(write_now(self.transport, b"tail"))  # queued behind, not ahead
        self.assertEqual(self.drain(), BIG + b"tail")

    def test_behind_a_write(self) -> None:
        self.transport.write(b"first ")
        self.assertFalse(write_now(self.transport, b"second"))
        self.assertEqual(self.read_all(), b"")
        self.assertEqual(self.drain(), b"first second")

    def test_not_after_loseWriteConnection(self) -> None:
        self.transport.loseWriteConnection()
        self.assertFalse(write_now(self.transport, b"late"))
        self.assertEqual(self.read_all(), b"")

    def test_not_after_loseConnection(self) -> None:
        self.transport.loseConnection()
        self.assertFalse(write_now(self.transport, b"late"))
        self.assertEqual(self.read_all(), b"")

    def test_not_under_startTLS(self) -> None:
        """Under TLS the bytes must go through the TLS layer: never raw on the socket."""
        self.transport.startTLS(_tls_options(self))
        self.assertFalse(write_now(self.transport, b"secret"))
        self.assertNotIn(b"secret", self.drain())

    def test_reset_connection(self) -> None:
        """C{writeSomeData}'s returned exception goes to C{write}, which drops the bytes."""
        self.theirs.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.theirs.close()
        results = [write_now(self.transport, b"x") for _ in range(10)]
        self.assertIs(results[-1], False)

    def test_other_transports_use_write(self) -> None:
        transport = StringTransport()
        self.assertFalse(write_now(transport, b"hello"))
        self.assertEqual(transport.value(), b"hello")


@implementer(IHalfCloseableProtocol)
class _HalfCloseable(protocol.Protocol):
    write_lost = 0

    def readConnectionLost(self) -> None:
        pass

    def writeConnectionLost(self) -> None:
        self.write_lost += 1


class HalfCloseNowTests(LoopbackTCPMixin, SynchronousTestCase):
    """L{half_close_now}: a FIN at once when nothing is queued, C{loseWriteConnection} otherwise."""

    def setUp(self) -> None:
        self.connect()
        self.proto = self.transport.protocol = _HalfCloseable()

    def test_at_once(self) -> None:
        self.assertTrue(write_now(self.transport, b"last"))
        self.assertTrue(half_close_now(self.transport))
        self.theirs.settimeout(5)
        self.assertEqual(self.theirs.recv(100), b"last")
        self.assertEqual(self.theirs.recv(100), b"")  # the FIN, with no reactor pass
        self.assertEqual(self.proto.write_lost, 1)
        self.assertTrue(self.transport._writeDisconnected)
        self.assertNotIn(self.transport, self.reactor.getWriters())
        self.assertFalse(write_now(self.transport, b"late"))  # nothing after the FIN
        self.assertFalse(half_close_now(self.transport))
        self.assertEqual(self.proto.write_lost, 1)

    def test_behind_a_queue(self) -> None:
        """Queued bytes go first: the half-close waits for them, as Twisted's does."""
        self.transport.write(BIG)
        self.assertFalse(half_close_now(self.transport))
        self.assertTrue(self.transport._writeDisconnecting)
        received = self.read_all()
        while not self.transport._writeDisconnected:
            self.transport.doWrite()
            received += self.read_all()
        self.assertEqual(received, BIG)
        self.assertEqual(self.read_all(), b"")
        self.assertEqual(self.proto.write_lost, 1)

    def test_not_twice(self) -> None:
        self.transport.loseWriteConnection()
        self.assertFalse(half_close_now(self.transport))
        self.assertEqual(self.proto.write_lost, 0)

    def test_not_when_disconnecting(self) -> None:
        self.transport.loseConnection()
        self.assertFalse(half_close_now(self.transport))

    def test_paused_producer_resumed_first(self) -> None:
        """With a paused streaming producer C{doWrite} resumes it first: so do we, later."""
        class Producer:
            resumed = 0

            def resumeProducing(self) -> None:
                self.resumed += 1

            def pauseProducing(self) -> None:
                pass

            def stopProducing(self) -> None:
                pass

        producer = Producer()
        self.transport.registerProducer(producer, True)
        self.transport.producerPaused = True
        self.assertFalse(half_close_now(self.transport))
        self.transport.producerPaused = False
        self.transport.unregisterProducer()

    def test_other_transports(self) -> None:
        transport = StringTransport()
        transport.loseWriteConnection = lambda: setattr(transport, "half_closed", True)
        self.assertFalse(half_close_now(transport))
        self.assertTrue(transport.half_closed)


class Collect(protocol.Protocol):
    def connectionMade(self) -> None:
        self.data = b""
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.factory.made.callback(self)

    def connectionLost(self, reason: Any) -> None:
        self.lost.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.data.endswith(b"\n"):
            self.factory.got.callback(self.data)


class ReactorTransportTests(TestCase):
    """The reactor's own TCP transports are the classes L{write_now} accelerates."""

    @defer.inlineCallbacks
    def connected(self, listen: Any, connect: Any) -> Any:
        """
        A client and the server side of one real connection: C{listen(factory)}
        gives the port, C{connect(port, factory)} connects; closed at clean-up.
        """
        server_factory = protocol.Factory.forProtocol(Collect)
        server_factory.made, server_factory.got = defer.Deferred(), defer.Deferred()
        port = listen(server_factory)
        self.addCleanup(port.stopListening)
        client_factory = protocol.ClientFactory.forProtocol(Collect)
        client_factory.made, client_factory.got = defer.Deferred(), defer.Deferred()
        connect(port, client_factory)
        client = yield client_factory.made
        server_side = yield server_factory.made

        def close() -> defer.Deferred[Any]:
            client.transport.loseConnection()
            server_side.transport.loseConnection()
            return defer.gatherResults([client.lost, server_side.lost])

        self.addCleanup(close)
        return client, server_side

    @defer.inlineCallbacks
    def test_client_and_server(self) -> Any:
        client, server_side = yield self.connected(
            lambda factory: reactor.listenTCP(0, factory, interface="127.0.0.1"),
            lambda port, factory: reactor.connectTCP("127.0.0.1", port.getHost().port, factory),
        )
        self.assertIs(type(client.transport), tcp.Client)
        self.assertIs(type(server_side.transport), tcp.Server)
        self.assertTrue(write_now(client.transport, b"up\n"))
        self.assertTrue(write_now(server_side.transport, b"down\n"))
        self.assertEqual((yield server_side.factory.got), b"up\n")
        self.assertEqual((yield client.factory.got), b"down\n")

    @defer.inlineCallbacks
    def test_unix_client(self) -> Any:
        """The client side of a UNIX socket (the Redis link's) is sent at once too."""
        path = os.path.join(tempfile.mkdtemp(dir="/tmp"), "s")
        self.addCleanup(shutil.rmtree, os.path.dirname(path))
        client, server_side = yield self.connected(
            lambda factory: reactor.listenUNIX(path, factory),
            lambda port, factory: reactor.connectUNIX(path, factory),
        )
        self.assertIs(type(client.transport), unix.Client)
        self.assertTrue(write_now(client.transport, b"up\n"))
        self.assertEqual((yield server_side.factory.got), b"up\n")


class _Recording(server.Request):
    """Notes what L{request_line} says when the body's length is known."""

    seen: list[Any] = []

    def gotLength(self, length: int | None) -> None:
        self.seen.append(request_line(self.channel))
        super().gotLength(length)


class _Pending(Resource):
    isLeaf = True

    def render(self, request: server.Request) -> Any:
        self.request = request
        return server.NOT_DONE_YET


class HTTPChannelTests(SynchronousTestCase):
    """The C{HTTPChannel} attributes L{gateway.web.server} reads, fed over a C{StringTransport}."""

    def setUp(self) -> None:
        _Recording.seen = []
        self.resource = _Pending()
        self.site = server.Site(self.resource, reactor=MemoryReactorClock())
        self.site.requestFactory = _Recording
        self.site.protocol = http.HTTPChannel  # as GatewaySite: no _GenericHTTPChannelProtocol
        self.channel = self.site.buildProtocol(None)
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)

    def test_first_line_flag_is_name_mangled_here(self) -> None:
        self.assertIn("_HTTPChannel__first_line", vars(http.HTTPChannel))
        self.assertEqual(self.channel._HTTPChannel__first_line, 1)

    def test_request_line_and_flag_through_a_request(self) -> None:
        self.assertIsNone(request_line(self.channel))
        self.assertTrue(first_line_pending(self.channel))
        self.channel.dataReceived(b"POST /p?q=1 HTTP/1.1\r\n")
        self.assertEqual(request_line(self.channel), (b"POST", b"/p?q=1", b"HTTP/1.1"))
        self.assertEqual(self.channel._command, b"POST")
        self.assertFalse(first_line_pending(self.channel))
        self.assertEqual(self.channel._HTTPChannel__first_line, 0)
        self.channel.dataReceived(b"Host: a\r\nContent-Length: 2\r\n\r\n")
        # gotLength, where GatewayRequest reads it, sees the line.
        self.assertEqual(_Recording.seen, [(b"POST", b"/p?q=1", b"HTTP/1.1")])
        self.assertFalse(first_line_pending(self.channel))
        self.channel.dataReceived(b"ok")
        # Handed to the request, and gone from the channel.
        self.assertEqual(self.resource.request.method, b"POST")
        self.assertIsNone(request_line(self.channel))
        self.assertFalse(hasattr(self.channel, "_command"))
        self.assertTrue(first_line_pending(self.channel))

    def test_empty_line_before_a_request(self) -> None:
        self.channel.dataReceived(b"\r\n")
        self.assertEqual(self.channel._HTTPChannel__first_line, 2)
        self.assertTrue(first_line_pending(self.channel))

    def test_overlong_lines(self) -> None:
        """lineLengthExceeded comes with the flag set for a request line, clear for a header."""
        seen = []
        self.channel.lineLengthExceeded = lambda line: seen.append(first_line_pending(self.channel))
        self.channel.dataReceived(b"G" * self.channel.MAX_LENGTH + b" / HTTP/1.1\r\n")
        self.channel.dataReceived(b"GET / HTTP/1.1\r\n")
        self.channel.dataReceived(b"X: " + b"x" * self.channel.MAX_LENGTH + b"\r\n")
        self.assertEqual(seen, [True, False])

    def test_network_producer_while_answering(self) -> None:
        self.assertIs(self.channel._networkProducer, self.transport)
        self.assertIs(self.channel._handlingRequest, False)
        self.channel.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertIs(self.channel._handlingRequest, True)
        # The premise: Twisted's own pauseProducing does not pause reading now.
        self.channel.pauseProducing()
        self.assertEqual(self.transport.producerState, "producing")
        pause_reading_while_answering(self.channel)
        self.assertEqual(self.transport.producerState, "paused")
        # The request's end leaves it to resumeProducing (the transport drained).
        self.resource.request.finish()
        self.assertIs(self.channel._handlingRequest, False)
        self.assertEqual(self.transport.producerState, "paused")
        self.channel.resumeProducing()
        self.assertEqual(self.transport.producerState, "producing")

    def test_answered_without_waiting(self) -> None:
        """Not waiting for the transport: the request's end resumes reading."""
        self.channel.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        pause_reading_while_answering(self.channel)
        self.assertEqual(self.transport.producerState, "paused")
        self.resource.request.finish()
        self.assertEqual(self.transport.producerState, "producing")

    def test_not_answering(self) -> None:
        pause_reading_while_answering(self.channel)
        self.assertEqual(self.transport.producerState, "producing")


class FallbackTests(SynchronousTestCase):
    """Without the attributes (a Twisted that changed): Twisted's public behaviour."""

    def test_request_line(self) -> None:
        self.assertIsNone(request_line(object()))

    def test_first_line_pending(self) -> None:
        self.assertTrue(first_line_pending(object()))

    def test_pause_reading_while_answering(self) -> None:
        pause_reading_while_answering(object())


class PinTests(SynchronousTestCase):
    """setup.cfg admits the Twisted these tests run on."""

    def test_installed_twisted_within_the_pin(self) -> None:
        config = configparser.ConfigParser()
        config.read(Path(__file__).parent.parent / "setup.cfg")
        lines = config["options"]["install_requires"].splitlines()
        (pin,) = [Requirement(r) for r in lines if r.strip().lower().startswith("twisted")]
        self.assertIn(
            twisted.__version__, pin.specifier,
            f"Twisted {twisted.__version__} is outside {pin}: run tests.test_twistedinternals"
            " on it, then move the pin",
        )


class ProxyHeaderParserTests(SynchronousTestCase):
    """C{twisted.protocols.haproxy}'s private parsers, as L{gateway.proxyproto} calls them."""

    def test_present(self) -> None:
        parsers = proxy_header_parsers()
        assert parsers is not None
        self.assertEqual(parsers.v2_signature, b"\r\n\r\n\x00\r\nQUIT\n")
        self.assertTrue(issubclass(parsers.error, Exception))

    def test_v1(self) -> None:
        parsers = proxy_header_parsers()
        info = parsers.v1(b"PROXY TCP4 192.0.2.7 198.51.100.1 4242 25 ")
        self.assertEqual((info.source.host, info.source.port), ("192.0.2.7", 4242))
        self.assertEqual((info.destination.host, info.destination.port), ("198.51.100.1", 25))
        self.assertIsNone(parsers.v1(b"PROXY UNKNOWN ").source)
        # Twisted wants the space after UNKNOWN that HAProxy does not send.
        self.assertRaises(parsers.error, parsers.v1, b"PROXY UNKNOWN")
        self.assertRaises(parsers.error, parsers.v1, b"PROXY TCP4 192.0.2.7")

    def test_v2(self) -> None:
        parsers = proxy_header_parsers()
        addresses = socket.inet_aton("192.0.2.7") + socket.inet_aton("198.51.100.1")
        payload = addresses + struct.pack("!HH", 4242, 25) + b"\x04\x00\x01x"  # a TLV after
        header = parsers.v2_signature + b"\x21\x11" + struct.pack("!H", len(payload)) + payload
        info = parsers.v2(header)
        self.assertEqual((info.source.host, info.source.port), ("192.0.2.7", 4242))
        local = parsers.v2_signature + b"\x20\x00\x00\x00"
        self.assertIsNone(parsers.v2(local).source)
        self.assertRaises(parsers.error, parsers.v2, header[:16] + addresses)

    def test_gone(self) -> None:
        """Without them: None, and --proxy-protocol-from says why at start."""
        import sys
        from unittest import mock

        from twisted.python import usage

        from gateway import tap

        with mock.patch.dict(sys.modules, {"twisted.protocols.haproxy._v2parser": None}):
            self.assertIsNone(proxy_header_parsers())
            with self.assertRaises(usage.UsageError) as e:
                tap.Options().parseOptions(
                    ["--auth", "memory:a:b", "--proxy-protocol-from", "::1"]
                )
        self.assertIn("no PROXY protocol parsers", str(e.exception))


class KeepUnixSocketFileTests(TestCase):
    """
    An adopted UNIX port: Twisted removes the socket's file when it stops
    listening (what L{keep_unix_socket_file} undoes for a port other
    processes share); with it, the file stays.
    """

    def adopt(self) -> tuple[Any, str]:
        directory = tempfile.mkdtemp(prefix="ag-")  # AF_UNIX paths are short
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "s.sock")
        listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(listening.close)
        listening.bind(path)
        listening.listen(1)
        listening.setblocking(False)
        port = reactor.adoptStreamPort(listening.fileno(), socket.AF_UNIX, protocol.Factory())
        return port, path

    @defer.inlineCallbacks
    def test_twisted_removes_the_file(self):
        port, path = self.adopt()
        yield port.stopListening()
        self.assertFalse(os.path.exists(path))

    @defer.inlineCallbacks
    def test_kept(self):
        port, path = self.adopt()
        keep_unix_socket_file(port)
        yield port.stopListening()
        self.assertTrue(os.path.exists(path))
        self.assertFalse(port.connected)


class AcceptOnePerWakeupTests(TestCase):
    """
    A listening port with connections queued: Twisted's C{doRead} accepts
    them all at once (C{numberAccepts}); after L{accept_one_per_wakeup},
    one per call, every time.
    """

    def queued(self, count: int) -> tuple[Any, list[Any]]:
        listening = socket.create_server(("127.0.0.1", 0))
        listening.setblocking(False)
        self.addCleanup(listening.close)
        built: list[Any] = []

        class Counting(protocol.Factory):
            def buildProtocol(self, addr: Any) -> Any:
                built.append(addr)
                return protocol.Protocol()

        port = reactor.adoptStreamPort(listening.fileno(), socket.AF_INET, Counting())
        port.stopReading()  # only the test's doRead accepts
        self.addCleanup(port.stopListening)
        for _ in range(count):
            client = socket.create_connection(listening.getsockname()[:2], timeout=5)
            self.addCleanup(client.close)
        self.assertIsInstance(port, tcp.Port)
        self.assertEqual(port.numberAccepts, 100)
        return port, built

    def tearDown(self) -> Any:
        for transport in list(reactor.getReaders()) + list(reactor.getWriters()):
            if isinstance(transport, tcp.Server):
                transport.abortConnection()

    def test_twisted_accepts_many(self):
        port, built = self.queued(3)
        port.doRead()
        self.assertEqual(len(built), 3)

    def test_one(self):
        port, built = self.queued(3)
        accept_one_per_wakeup(port)
        for n in (1, 2, 3):
            port.doRead()
            self.assertEqual(len(built), n)

    def test_not_a_port(self):
        accept_one_per_wakeup(object())  # nothing to do, nothing raised


class SSLServerContextTests(SynchronousTestCase):
    def test_context(self):
        """An ssl: endpoint's TLS context factory, as Twisted keeps it."""
        cert, key, _ = ensure_certificate(self.mktemp())
        endpoint = endpoints.serverFromString(reactor, f"ssl:0:privateKey={key}:certKey={cert}")
        context = ssl_server_context(endpoint)
        self.assertIsNotNone(context)
        self.assertTrue(context.getContext())

    def test_not_ssl(self):
        self.assertIsNone(ssl_server_context(endpoints.serverFromString(reactor, "tcp:0")))
