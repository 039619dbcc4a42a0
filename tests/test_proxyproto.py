"""
Tests for L{gateway.proxyproto}: PROXY protocol v1/v2 headers from trusted
proxies (in-memory transports, a fake clock, Hypothesis over splits), and
the refusal of a header from anyone else.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import types
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import protocol
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.ssl import CertificateOptions
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from gateway import tap
from gateway.connections import (
    MAX_PENDING_HEADERS_PER_PROXY,
    Connections,
    LimitedFactory,
    ListenSettings,
    limit_connections,
)
from gateway.proxyproto import (
    MAX_V1_HEADER,
    MAX_V2_PAYLOAD,
    V2_SIGNATURE,
    ProxyHeaderError,
    ProxyProtocolFactory,
    read_header,
    signature_state,
)
from gateway.twistedinternals import proxy_header_parsers
from tests.support import keep_signal_handlers

PROXY_NET = ipaddress.ip_network("10.0.0.0/8")
PROXY = IPv4Address("TCP", "10.1.1.1", 40000)
CLIENT = IPv4Address("TCP", "192.0.2.7", 4242)
GREETING = b"220 hello\r\n"
V1 = b"PROXY TCP4 192.0.2.7 198.51.100.1 4242 25\r\n"


def v2(command: int = 1, family: int = 0x11, addresses: bytes | None = None,
       tlvs: bytes = b"", length: int | None = None) -> bytes:
    """A v2 header: PROXY (1) or LOCAL (0), TCP over IPv4 (0x11) or IPv6 (0x21)."""
    if addresses is None:
        if family == 0x21:
            addresses = (socket.inet_pton(socket.AF_INET6, "2001:db8::7")
                         + socket.inet_pton(socket.AF_INET6, "2001:db8::1")
                         + struct.pack("!HH", 4242, 25))
        else:
            addresses = (socket.inet_aton("192.0.2.7") + socket.inet_aton("198.51.100.1")
                         + struct.pack("!HH", 4242, 25))
    payload = addresses + tlvs
    size = len(payload) if length is None else length
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", size) + payload


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


class Door(protocol.Protocol):
    """A front door's protocol: greets, records its peer and host, and what it reads."""

    def __init__(self):
        self.data = b""
        self.peer = self.host = None
        self.lost = False

    def connectionMade(self):
        self.peer, self.host = self.transport.getPeer(), self.transport.getHost()
        self.transport.write(GREETING)

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason=protocol.connectionDone):
        self.lost = True


class DoorFactory(protocol.Factory):
    def __init__(self):
        self.built = []

    def buildProtocol(self, addr):
        proto = Door()
        self.built.append(proto)
        return proto


class Transport(StringTransport):
    aborted = False

    def abortConnection(self):
        self.aborted = True
        super().abortConnection()


class Harness(SynchronousTestCase):
    """A listener through L{limit_connections} with C{--proxy-protocol-from 10.0.0.0/8}."""

    max_per_peer = 10
    networks = (PROXY_NET,)
    budget = None

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.connections = Connections(
            ListenSettings(proxy_protocol_from=self.networks, proxy_header_timeout=3.0),
            budget=self.budget,
        )
        self.core = types.SimpleNamespace(connections=self.connections, reactor=self.clock)
        self.doors = DoorFactory()
        self.factory = limit_connections(self.core, self.doors, "smtp", "smtp", self.max_per_peer)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def connect(self, addr=PROXY, *chunks: bytes):
        proto = self.factory.buildProtocol(addr)
        transport = Transport(hostAddress=IPv4Address("TCP", "10.9.9.9", 25), peerAddress=addr)
        proto.makeConnection(transport)
        for chunk in chunks:
            proto.dataReceived(chunk)
        return proto, transport

    def door(self) -> Door:
        [door] = self.doors.built
        return door

    def lines(self) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events
                if e.get("log_namespace") == "gateway.proxyproto"]


class TrustedTests(Harness):
    def test_v1_tcp4(self):
        """The client the header names is the peer everywhere; bytes after it reach the door."""
        _, transport = self.connect(PROXY, V1 + b"EHLO x\r\n")
        door = self.door()
        self.assertEqual(door.peer, CLIENT)
        self.assertEqual(door.host, IPv4Address("TCP", "198.51.100.1", 25))
        self.assertEqual(transport.getPeer(), CLIENT)
        self.assertEqual(door.data, b"EHLO x\r\n")
        self.assertEqual(transport.value(), GREETING)
        limit = self.connections.door("smtp", 10)
        self.assertEqual(dict(limit.counts), {"192.0.2.7": 1})

    def test_v1_tcp6(self):
        self.connect(PROXY, b"PROXY TCP6 2001:DB8:0:0::7 2001:db8::1 4242 25\r\n")
        self.assertEqual(self.door().peer, IPv6Address("TCP", "2001:db8::7", 4242))

    def test_v1_ipv4_mapped(self):
        """An IPv4-mapped client is the IPv4 client, as everywhere in the gateway."""
        self.connect(PROXY, b"PROXY TCP6 ::ffff:192.0.2.7 ::1 4242 25\r\n")
        self.assertEqual(self.door().peer, CLIENT)

    def test_v1_unknown_keeps_the_proxy(self):
        """HAProxy sends a bare C{PROXY UNKNOWN} (which Twisted's parser alone refuses)."""
        for header in (b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ::1 ::2 1 2\r\n"):
            self.doors.built.clear()
            _, transport = self.connect(PROXY, header + b"x")
            self.assertEqual(self.door().peer, PROXY)
            self.assertEqual(self.door().data, b"x")
            self.assertFalse(transport.aborted)

    def test_v2_tcp4_with_tlvs(self):
        tlvs = tlv(0x01, b"h2") + tlv(0x02, b"mail.example") + tlv(0x05, b"id-1") + tlv(0x04, b"")
        self.connect(PROXY, v2(tlvs=tlvs) + b"data")
        self.assertEqual(self.door().peer, CLIENT)
        self.assertEqual(self.door().data, b"data")

    def test_v2_tcp6(self):
        self.connect(PROXY, v2(family=0x21))
        self.assertEqual(self.door().peer, IPv6Address("TCP", "2001:db8::7", 4242))
        self.assertEqual(self.door().host, IPv6Address("TCP", "2001:db8::1", 25))

    def test_v2_local_keeps_the_proxy(self):
        self.connect(PROXY, v2(command=0, family=0, addresses=b"", tlvs=tlv(0x04, b"x")))
        self.assertEqual(self.door().peer, PROXY)
        self.assertEqual(self.door().host, IPv4Address("TCP", "10.9.9.9", 25))

    def test_v2_unix_keeps_the_proxy(self):
        self.connect(PROXY, v2(family=0x31, addresses=b"/a".ljust(108, b"\0") * 2))
        self.assertEqual(self.door().peer, PROXY)

    def test_one_byte_pieces(self):
        for header in (V1, v2(tlvs=tlv(0x01, b"smtp"))):
            self.doors.built.clear()
            proto, _ = self.connect(PROXY)
            for i in range(len(header)):
                self.assertEqual(self.doors.built, [])
                proto.dataReceived(header[i:i + 1])
            proto.dataReceived(b"Q")
            self.assertEqual(self.door().peer, CLIENT)
            self.assertEqual(self.door().data, b"Q")

    def test_nothing_of_ours_after_the_header(self):
        """The transport's reads go to the limited door protocol itself."""
        proto, _ = self.connect(PROXY, V1)
        inner = proto.wrapped
        self.assertEqual(proto.dataReceived, inner.dataReceived)

    def test_each_client_counted_and_capped(self):
        """The cap is per client behind the proxy, not per proxy."""
        self.factory = limit_connections(self.core, self.doors, "http", "http", 1)
        self.connect(PROXY, V1)
        _, refused = self.connect(PROXY, V1)
        self.assertTrue(refused.disconnecting)
        self.connect(PROXY, V1.replace(b"192.0.2.7", b"192.0.2.8"))
        self.assertEqual(len(self.doors.built), 2)
        self.assertEqual(dict(self.connections.door("http", 1).counts),
                         {"192.0.2.7": 1, "192.0.2.8": 1})

    def test_released_when_lost(self):
        proto, _ = self.connect(PROXY, V1)
        proto.connectionLost(Failure(protocol.connectionDone))
        self.assertTrue(self.door().lost)
        self.assertEqual(dict(self.connections.door("smtp", 10).counts), {})

    def assertClosed(self, transport):
        self.assertTrue(transport.aborted)
        self.assertEqual(self.doors.built, [])
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.connections.open, 0)

    def test_junk(self):
        """A trusted peer without a header: closed, one line for many such connections."""
        for junk in (b"EHLO x\r\n", b"PROXY TCP4 nonsense\r\n", b"PROXY TCP4 ::1 ::1 1 2\r\n",
                     b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n", b"PROXY TCP4 \xff.2.3.4 x 1 1\r\n",
                     b"PROXY tcp4 1.2.3.4 5.6.7.8 1 1\r\n", v2(command=2),
                     v2(addresses=b"\x01\x02")):
            _, transport = self.connect(PROXY, junk)
            self.assertClosed(transport)
        [line] = self.lines()
        self.assertIn("closing a connection from proxy 10.1.1.1", line)

    def test_oversize(self):
        _, transport = self.connect(PROXY, b"PROXY TCP4 " + b"1" * (MAX_V1_HEADER - 11))
        self.assertClosed(transport)
        self.assertIn("PROXY v1 header over 107 bytes", self.lines()[0])
        # A v2 header announcing more is refused at its 16th byte.
        proxy = IPv4Address("TCP", "10.1.1.2", 40000)
        _, transport = self.connect(proxy, v2(length=MAX_V2_PAYLOAD + 1)[:16])
        self.assertClosed(transport)
        self.assertIn("PROXY v2 header over 4112 bytes", self.lines()[1])

    def test_largest_headers(self):
        v1 = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff " \
             b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe 65535 65535\r\n"
        self.assertEqual(len(v1), 104)
        padding = MAX_V1_HEADER - len(v1)
        self.connect(PROXY, v1[:-2] + b" " * padding + b"\r\n")
        self.connect(PROXY, v2(tlvs=tlv(0x04, b"\0" * (MAX_V2_PAYLOAD - 12 - 3))))
        self.assertEqual(len(self.doors.built), 2)

    def test_timeout(self):
        _, transport = self.connect(PROXY, b"PROXY TCP4 192.0.2.7")
        self.clock.advance(2.9)
        self.assertFalse(transport.aborted)
        self.clock.advance(0.2)
        self.assertClosed(transport)
        self.assertIn("no PROXY header within 3.0 s", self.lines()[0])

    def test_timer_stopped(self):
        """Neither a header read in time nor a proxy closing leaves the timer."""
        self.connect(PROXY, V1)
        proto, _ = self.connect(PROXY, b"PRO")
        proto.connectionLost(Failure(protocol.connectionDone))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_implicit_tls(self):
        """On an implicit-TLS listener the header comes first, then TLS sees the client."""
        factory = limit_connections(self.core, self.doors, "smtp", "smtps", 10,
                                    tls=CertificateOptions())
        proto = factory.buildProtocol(PROXY)
        transport = Transport(peerAddress=PROXY)
        proto.makeConnection(transport)
        proto.dataReceived(V1)
        self.assertEqual(self.door().peer, CLIENT)


class SplitTests(Harness):
    @settings(max_examples=60, deadline=None)
    @given(
        header=st.sampled_from([V1, v2(tlvs=tlv(1, b"h2")), v2(family=0x21)]),
        payload=st.binary(max_size=40),
        cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8),
    )
    def test_any_split(self, header, payload, cuts):
        """However the header and what follows are cut up, the door gets the same."""
        self.doors.built.clear()
        data = header + payload
        bounds = sorted({c for c in cuts if c < len(data)} | {0, len(data)})
        proto, transport = self.connect(PROXY)
        for a, b in zip(bounds, bounds[1:]):
            proto.dataReceived(data[a:b])
        self.assertEqual(self.door().data, payload)
        self.assertEqual(self.door().peer.host, ("192.0.2.7" if b"TCP4" in header or
                                                 header[13] == 0x11 else "2001:db8::7"))
        proto.connectionLost(Failure(protocol.connectionDone))

    @settings(max_examples=200, deadline=None)
    @given(
        data=st.one_of(
            st.binary(min_size=1, max_size=40),
            st.sampled_from([V1, v2(), b"\r\n\r\nEHLO x\r\n", b"PROXIMA\r\n"]),
        ),
        cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=8),
    )
    def test_any_split_untrusted(self, data, cuts):
        """
        From an untrusted peer, however the bytes are cut: closed when they
        start with a signature, else all of them reach the door in order.
        """
        self.doors.built.clear()
        bounds = sorted({c for c in cuts if c < len(data)} | {0, len(data)})
        proto, transport = self.connect(CLIENT)
        for a, b in zip(bounds, bounds[1:]):
            if not transport.aborted:
                proto.dataReceived(data[a:b])
        spoof = signature_state(data[:12])
        if spoof:
            self.assertTrue(transport.aborted)
            self.assertEqual(self.door().data, b"")
        elif spoof is None:  # still a prefix of a signature: held, nothing refused yet
            self.assertFalse(transport.aborted)
            self.assertEqual(self.door().data, b"")
        else:
            self.assertFalse(transport.aborted)
            self.assertEqual(self.door().data, data)
        proto.connectionLost(Failure(protocol.connectionDone))

    @settings(max_examples=300, deadline=None)
    @given(st.one_of(
        st.binary(max_size=200),
        st.binary(max_size=120).map(lambda b: b"PROXY " + b),
        st.binary(max_size=120).map(lambda b: V2_SIGNATURE + b),
    ))
    def test_arbitrary_bytes(self, data):
        """Any bytes: a header, more needed, or ProxyHeaderError; nothing else."""
        try:
            read_header(data, proxy_header_parsers())
        except ProxyHeaderError:
            pass


class UntrustedTests(Harness):
    def test_passes_straight_through(self):
        proto, transport = self.connect(CLIENT, b"EHLO x\r\n", b"MAIL")
        door = self.door()
        self.assertEqual(door.peer, CLIENT)
        self.assertEqual(transport.value(), GREETING)  # at once, before any byte
        self.assertEqual(door.data, b"EHLO x\r\nMAIL")
        # Once decided, the limited protocol's own method: nothing of ours runs.
        self.assertNotIn("dataReceived", vars(proto))
        self.assertEqual(self.factory.wrappedFactory.buildProtocol(CLIENT).dataReceived.__func__,
                         proto.dataReceived.__func__)

    def test_greeting_not_delayed(self):
        _, transport = self.connect(CLIENT)
        self.assertEqual(transport.value(), GREETING)

    def test_spoofed_headers_refused(self):
        for header in (V1, v2(), b"PROXY UNKNOWN\r\n"):
            self.doors.built.clear()
            _, transport = self.connect(CLIENT, header)
            self.assertTrue(transport.aborted)
            self.assertEqual(self.door().data, b"")
        [line] = self.lines()  # rate-limited
        self.assertIn("refusing a PROXY header from 192.0.2.7", line)

    def test_spoof_split(self):
        proto, transport = self.connect(CLIENT)
        for byte in V2_SIGNATURE:
            self.assertFalse(transport.aborted)
            proto.dataReceived(bytes([byte]))
        self.assertTrue(transport.aborted)
        self.assertEqual(self.door().data, b"")

    def test_prefix_held_until_decided(self):
        """Bytes that could begin a signature wait, then go on in order."""
        proto, _ = self.connect(CLIENT, b"\r\n", b"\r\n")
        self.assertEqual(self.door().data, b"")
        proto.dataReceived(b"GET / HTTP/1.1\r\n")
        self.assertEqual(self.door().data, b"\r\n\r\nGET / HTTP/1.1\r\n")
        proto, _ = self.connect(CLIENT, b"PROX", b"IMA")
        self.assertEqual(self.doors.built[-1].data, b"PROXIMA")

    def test_no_door_no_guard(self):
        """A refused connection (no refusal text: TLS listeners) is refused as before."""
        self.factory = limit_connections(self.core, self.doors, "socks", "socks", 1)
        self.connect(CLIENT)
        self.assertIsNone(self.factory.buildProtocol(CLIENT))


class PendingHeaderTests(Harness):
    """Connections waiting for their header hold a descriptor: counted, bounded."""

    budget = 4096

    def test_counted_until_the_header(self):
        proto, transport = self.connect(PROXY)
        self.assertEqual(self.connections.open, 1)
        self.assertEqual(self.connections.unauthenticated["smtp"], 1)
        self.assertEqual(dict(self.connections.headers_per_proxy), {"10.1.1.1": 1})
        proto.dataReceived(V1)
        self.assertEqual(self.connections.open, 1)  # now the client's own admission
        self.assertEqual(self.connections.headers, {})
        self.assertEqual(dict(self.connections.headers_per_proxy), {})
        proto.connectionLost(Failure(protocol.connectionDone))
        self.assertEqual(self.connections.open, 0)
        self.assertEqual(+self.connections.unauthenticated, Counter())

    def test_released_once(self):
        """Closed for a bad or late header, lost without one: released exactly once."""
        for chunks, late in (((b"EHLO x\r\n",), False), ((), True), ((), False)):
            proto, transport = self.connect(PROXY, *chunks)
            if late:
                self.clock.advance(3.1)
                self.assertTrue(transport.aborted)
            proto.connectionLost(Failure(protocol.connectionDone))
            self.assertEqual(self.connections.open, 0)
            self.assertEqual(self.connections.headers, {})
            self.assertEqual(+self.connections.unauthenticated, Counter())

    def test_bounded_per_proxy(self):
        readers = [self.connect(PROXY)[0] for _ in range(MAX_PENDING_HEADERS_PER_PROXY)]
        self.assertIsNone(self.factory.buildProtocol(PROXY))
        self.assertIsNone(self.factory.buildProtocol(PROXY))
        [line] = self.lines()
        self.assertIn(f"refusing a connection from proxy 10.1.1.1: {MAX_PENDING_HEADERS_PER_PROXY}",
                      line)
        other = IPv4Address("TCP", "10.1.1.2", 40000)
        self.assertIsNotNone(self.factory.buildProtocol(other))
        readers[0].connectionLost(Failure(protocol.connectionDone))
        self.assertIsNotNone(self.factory.buildProtocol(PROXY))

    def test_budget(self):
        """No room in the budget: refused at accept (the socket closed at once)."""
        self.connections.open = self.budget
        self.assertIsNone(self.factory.buildProtocol(PROXY))
        self.connections.open = 0
        self.assertIsNotNone(self.factory.buildProtocol(PROXY))

    def test_unauthenticated_share(self):
        """They are unauthenticated: they cannot take the room of authenticated sessions."""
        room = 0
        while room <= self.budget and self.factory.buildProtocol(
            IPv4Address("TCP", f"10.2.{room // 256}.{room % 256}", 1)
        ) is not None:
            room += 1
        self.assertEqual(room, self.budget // 2)  # the one door's unauthenticated share
        self.assertEqual(self.connections.open, room)


class OwnRelayTests(Harness):
    """The gateway's own SOCKS relay is never a trusted proxy, even from a proxy network."""

    def test_relay_is_any_peer(self):
        self.connections.outbound_opened(PROXY)
        proto, transport = self.connect(PROXY)
        self.assertEqual(transport.value(), GREETING)  # at once: no header awaited
        self.assertEqual(self.connections.headers, {})
        proto.dataReceived(V1 + b"EHLO x\r\n")
        self.assertTrue(transport.aborted)
        self.assertEqual(self.door().data, b"")
        self.assertIn("refusing a PROXY header from 10.1.1.1", self.lines()[0])
        self.connections.outbound_closed(PROXY)
        self.doors.built.clear()
        self.connect(PROXY)
        self.assertEqual(self.doors.built, [])  # a proxy again: a header is awaited

    def test_relay_known_late(self):
        """Accepted before the relay registered its side: found out at its first bytes."""
        proto, transport = self.connect(PROXY)
        self.connections.outbound_opened(PROXY)
        proto.dataReceived(b"EHLO x\r\n")
        door = self.door()
        self.assertEqual((door.peer, door.data), (PROXY, b"EHLO x\r\n"))
        self.assertEqual(self.connections.headers, {})
        self.assertEqual(self.connections.open, 1)
        proto.dataReceived(b"NOOP\r\n")
        self.assertEqual(door.data, b"EHLO x\r\nNOOP\r\n")
        proto.connectionLost(Failure(protocol.connectionDone))
        self.assertTrue(door.lost)
        self.assertEqual(self.connections.open, 0)

    def test_relay_known_late_spoofing(self):
        proto, transport = self.connect(PROXY)
        self.connections.outbound_opened(PROXY)
        proto.dataReceived(V1)
        self.assertTrue(transport.aborted)
        self.assertEqual(self.door().data, b"")

    def test_relay_known_late_silent(self):
        """A relay client waiting for a greeting gets it at the header deadline, not a close."""
        proto, transport = self.connect(PROXY)
        self.connections.outbound_opened(PROXY)
        self.clock.advance(3.1)
        self.assertFalse(transport.aborted)
        self.assertEqual(transport.value(), GREETING)

    def test_relay_known_next_turn(self):
        """
        With a SOCKS door, a proxy's connection is looked at again on the next
        reactor turn (when the relay has seen its side connected): the relay's
        client gets the greeting then, not at the deadline.
        """
        self.connections.relaying = True
        _, transport = self.connect(PROXY)
        self.connections.outbound_opened(PROXY)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0)
        self.assertEqual(transport.value(), GREETING)
        self.assertEqual(self.connections.headers, {})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_relaying_keeps_the_deadline(self):
        self.connections.relaying = True
        _, transport = self.connect(PROXY)
        self.clock.advance(0)
        self.clock.advance(2.9)
        self.assertFalse(transport.aborted)
        self.clock.advance(0.2)
        self.assertTrue(transport.aborted)
        proto, _ = self.connect(PROXY, V1)
        self.assertEqual(self.door().peer, CLIENT)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_mapped_peer(self):
        """A dual-stack listener sees the relay's IPv4 side IPv4-mapped."""
        self.connections.outbound_opened(IPv4Address("TCP", "10.1.1.1", 40000))
        self.assertTrue(self.connections.is_own_outbound(
            IPv6Address("TCP", "::ffff:10.1.1.1", 40000)))
        self.assertFalse(self.connections.is_own_outbound(
            IPv6Address("TCP", "::ffff:10.1.1.1", 40001)))


class LocalClientTests(Harness):
    """A loopback or unspecified client only from a proxy on loopback."""

    networks = (PROXY_NET, ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))

    HEADERS = (
        b"PROXY TCP4 127.0.0.1 10.9.9.9 4242 25\r\n",
        b"PROXY TCP4 127.8.0.1 10.9.9.9 4242 25\r\n",
        b"PROXY TCP4 0.0.0.0 10.9.9.9 4242 25\r\n",
        b"PROXY TCP6 ::1 2001:db8::1 4242 25\r\n",
        b"PROXY TCP6 :: 2001:db8::1 4242 25\r\n",
        b"PROXY TCP6 ::ffff:127.0.0.1 2001:db8::1 4242 25\r\n",
        v2(addresses=socket.inet_aton("127.0.0.1") + socket.inet_aton("10.9.9.9")
           + struct.pack("!HH", 4242, 25)),
    )

    def test_refused_from_a_remote_proxy(self):
        for header in self.HEADERS:
            _, transport = self.connect(PROXY, header)
            self.assertTrue(transport.aborted, header)
        self.assertEqual(self.doors.built, [])
        self.assertEqual(self.connections.open, 0)
        [line] = self.lines()  # rate-limited
        self.assertIn("a loopback or unspecified client from a proxy not on loopback", line)

    def test_accepted_from_a_local_proxy(self):
        for proxy in (IPv4Address("TCP", "127.0.0.1", 40000), IPv6Address("TCP", "::1", 40000),
                      IPv6Address("TCP", "::ffff:127.0.0.1", 40000)):
            for header in self.HEADERS:
                self.doors.built.clear()
                _, transport = self.connect(proxy, header)
                self.assertFalse(transport.aborted, header)
                self.assertEqual(len(self.doors.built), 1)

    def test_destination_may_be_loopback(self):
        """Only the client grants privileges: a loopback destination is fine."""
        self.connect(PROXY, b"PROXY TCP4 192.0.2.7 127.0.0.1 4242 25\r\n")
        self.assertEqual(self.door().peer, CLIENT)


class SignatureTests(SynchronousTestCase):
    def test_states(self):
        self.assertIsNone(signature_state(b"PROX"))
        self.assertIsNone(signature_state(V2_SIGNATURE[:11]))
        self.assertTrue(signature_state(b"PROXY "))
        self.assertTrue(signature_state(V2_SIGNATURE))
        self.assertFalse(signature_state(b"PROXI"))
        self.assertFalse(signature_state(b"\x16\x03\x01"))  # a TLS ClientHello
        self.assertFalse(signature_state(b"\x05\x01\x00"))  # a SOCKS5 greeting
        self.assertFalse(signature_state(V2_SIGNATURE[:11] + b"x"))

    def test_twisted_signature(self):
        self.assertEqual(proxy_header_parsers().v2_signature, V2_SIGNATURE)


class WiringTests(SynchronousTestCase):
    def core(self, **settings):
        return types.SimpleNamespace(connections=Connections(ListenSettings(**settings)),
                                     reactor=MemoryReactorClock())

    def test_off_by_default(self):
        factory = limit_connections(self.core(), DoorFactory(), "smtp", "smtp", 1)
        self.assertIsInstance(factory, LimitedFactory)

    def test_haproxy_endpoint_unchanged(self):
        core = self.core(proxy_protocol_from=(PROXY_NET,))
        core.connections.behind_proxy.add("smtp")
        self.assertIsInstance(limit_connections(core, DoorFactory(), "smtp", "smtp", 1),
                              LimitedFactory)
        factory = limit_connections(core, DoorFactory(), "smtp", "smtps", 1)
        self.assertIsInstance(factory, ProxyProtocolFactory)
        self.assertIs(factory.limit, factory.wrappedFactory.limit)

    def test_option(self):
        options = tap.Options()
        options.parseOptions(["--auth", "memory:a:b", "--data-dir", self.mktemp(),
                              "--proxy-protocol-from", "10.0.0.0/8",
                              "--proxy-protocol-from", "2001:db8::/32"])
        self.assertEqual(options["listenSettings"].proxy_protocol_from,
                         (PROXY_NET, ipaddress.ip_network("2001:db8::/32")))
        keep_signal_handlers(self)
        service = tap.makeService(options, reactor=MemoryReactorClock())
        factories = [s.factory for s in service if hasattr(s, "factory")]
        self.assertTrue(factories)
        for factory in factories:
            self.assertIsInstance(factory, ProxyProtocolFactory)

    def options(self, *args):
        options = tap.Options()
        options.parseOptions(["--auth", "memory:a:b", "--data-dir", self.mktemp(), *args])
        return options

    def test_haproxy_listener_refused(self):
        """A haproxy: listener would take a header from anyone: a usage error naming it."""
        from twisted.python import usage

        with self.assertRaises(usage.UsageError) as e:
            self.options("--proxy-protocol-from", "10.0.0.0/8", "--socks", "haproxy:tcp:1080")
        self.assertIn("--socks 'haproxy:tcp:1080': a haproxy: listener", str(e.exception))
        self.options("--socks", "haproxy:tcp:1080")  # alone, as before

    #: The CIDR options that trust their peers, and where each one's networks land.
    TRUSTING = {
        "--proxy-protocol-from": lambda o: o["listenSettings"].proxy_protocol_from,
        "--http-trusted-proxy": lambda o: o["httpSettings"].trusted_proxies,
        "--smtp-trusted-network": lambda o: o["smtpSettings"].trusted_networks,
    }

    def test_networks_checked(self):
        """
        One parser for every trusting CIDR option: everyone (C{/0}), host
        bits and partly IPv4-mapped networks are usage errors naming the
        option (C{/0} and host bits used to pass for the two trusted-proxy
        and trusted-network options).
        """
        from twisted.python import usage

        for option in self.TRUSTING:
            for cidr, why in (("0.0.0.0/0", "every address"), ("::/0", "every address"),
                              ("10.0.0.1/8", "has host bits set"),
                              ("::/64", "IPv4-mapped"), ("::fffe:0:0/95", "IPv4-mapped")):
                with self.assertRaises(usage.UsageError) as e:
                    self.options(option, cidr)
                self.assertIn(f"{option} {cidr!r}", str(e.exception))
                self.assertIn(why, str(e.exception))

    def test_mapped_network_folded(self):
        """Peers are matched as IPv4 (IPv4-mapped folded): so is an IPv4-mapped network."""
        for option, networks in self.TRUSTING.items():
            options = self.options(option, "::ffff:10.0.0.0/104", option, "::ffff:127.0.0.1/128")
            self.assertEqual(networks(options), (PROXY_NET, ipaddress.ip_network("127.0.0.1/32")))

    def test_bad_network(self):
        from twisted.python import usage

        with self.assertRaises(usage.UsageError) as e:
            tap.Options().parseOptions(["--auth", "memory:a:b", "--proxy-protocol-from", "x"])
        self.assertIn("--proxy-protocol-from 'x'", str(e.exception))
