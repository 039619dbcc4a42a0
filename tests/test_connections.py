"""
Tests for L{gateway.connections}: connection caps per peer on every front
door, the descriptor budget, the TLS handshake deadline and the listen
backlog; units with in-memory transports, then real loopback sockets.
"""

from __future__ import annotations

import os
import socket
import ssl
import types

from twisted.internet import defer, interfaces, protocol, reactor, task, threads
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from gateway import tap
from gateway.connections import (
    NOFILE_UNLIMITED,
    Connections,
    HandshakeDeadlineFactory,
    LimitedFactory,
    ListenSettings,
    Refused,
    budget_for,
    limit_connections,
    raise_nofile_limit,
    with_backlog,
)
from gateway.socks.server import SOCKSServer
from tests.support import free_port, require_tool

SMTP_REFUSAL = b"421 4.7.0 Too many connections from your address\r\n"
REFUSALS = {Refused.PEER: b"peer\r\n", Refused.BUSY: b"busy\r\n"}


class HalfCloseTransport(StringTransport):
    write_closed = False
    aborted = False

    def loseWriteConnection(self):
        self.write_closed = True

    def abortConnection(self):
        self.aborted = True
        super().abortConnection()


class Recorder(protocol.Protocol):
    """A front door's protocol: remembers what happened to it."""

    made = lost = False

    def connectionMade(self):
        self.made = True

    def connectionLost(self, reason=protocol.connectionDone):
        self.lost = True


class Factory(protocol.Factory):
    protocol = Recorder


def peer(host="192.0.2.10"):
    kind = IPv6Address if ":" in host else IPv4Address
    return kind("TCP", host, 50000)


class PeerCapTests(SynchronousTestCase):
    def setUp(self):
        self.clock = MemoryReactorClock()
        self.connections = Connections(ListenSettings(refusal_linger=2.0))
        self.limit = self.connections.door("smtp", 2, weight=2)
        self.factory = LimitedFactory(Factory(), self.limit, self.clock, REFUSALS, "smtp")
        self.held = []

    def connect(self, host="192.0.2.10", factory=None):
        proto = (factory or self.factory).buildProtocol(peer(host))
        transport = HalfCloseTransport(peerAddress=peer(host))
        proto.makeConnection(transport)
        if hasattr(proto, "wrapped"):
            self.held.append(proto)
        return proto, transport

    def test_cap_then_refusal(self):
        """The peer's third connection is refused with the door's answer; another peer is served."""
        first, _ = self.connect()
        self.connect()
        refused, transport = self.connect()
        self.assertEqual(transport.value(), b"peer\r\n")
        self.assertTrue(transport.write_closed)
        self.assertNotIsInstance(refused, Recorder)
        other, other_transport = self.connect("192.0.2.11")
        self.assertTrue(other.wrapped.made)
        self.assertEqual(other_transport.value(), b"")
        self.assertEqual(self.limit.counts, {"192.0.2.10": 2, "192.0.2.11": 1})
        first.connectionLost(Failure(protocol.connectionDone))
        self.assertTrue(first.wrapped.lost)
        again, _ = self.connect()
        self.assertTrue(again.wrapped.made)

    def test_refused_never_counted(self):
        """A refusal holds no slot of the peer's, and its end releases none."""
        self.connect()
        self.connect()
        refused, transport = self.connect()
        self.assertEqual(self.limit.counts["192.0.2.10"], 2)
        self.assertEqual(self.connections.open, 2 * 2 + 1)  # the lingering refusal
        refused.connectionLost(Failure(protocol.connectionDone))
        self.assertEqual(self.limit.counts["192.0.2.10"], 2)
        self.assertEqual(self.connections.open, 2 * 2)

    def test_refusal_lingers_a_bounded_time(self):
        """The refusal reads and drops a bounded amount, then closes (timer or client EOF)."""
        self.connect()
        self.connect()
        refused, transport = self.connect()
        refused.dataReceived(b"x" * 1000)
        self.assertFalse(transport.aborted)
        self.clock.advance(2)
        self.assertTrue(transport.aborted)
        refused2 = self.factory.buildProtocol(peer())
        t2 = HalfCloseTransport()
        refused2.makeConnection(t2)
        refused2.dataReceived(b"x" * (64 * 1024 + 1))
        self.assertTrue(t2.aborted)
        refused3 = self.factory.buildProtocol(peer())
        t3 = HalfCloseTransport()
        refused3.makeConnection(t3)
        refused3.readConnectionLost()
        self.assertTrue(t3.disconnecting)

    def test_lingering_refusals_per_peer(self):
        """A peer at its cap connecting again and again holds at most a few lingering refusals."""
        self.connect()
        self.connect()
        refusals = [self.connect() for _ in range(10)]
        lingering = [t for _, t in refusals if not t.disconnecting]
        self.assertEqual(len(lingering), 4)
        self.assertTrue(all(t.value() == b"peer\r\n" for _, t in refusals))
        self.assertEqual(self.connections.open, 2 * 2 + 4)
        for proto, _ in refusals:
            proto.connectionLost(Failure(protocol.connectionDone))
        self.assertEqual(self.connections.open, 2 * 2)
        self.assertEqual(self.limit.lingering, {})

    def test_ipv6_by_prefix(self):
        """IPv6 peers count per /64; an IPv4-mapped peer counts as its IPv4 address."""
        self.connect("2001:db8::1")
        self.connect("2001:db8::2")
        _, transport = self.connect("2001:db8::ffff:3")
        self.assertEqual(transport.value(), b"peer\r\n")
        served, _ = self.connect("2001:db8:0:1::1")
        self.assertTrue(served.wrapped.made)
        self.connect("192.0.2.20")
        self.connect("::ffff:192.0.2.20")
        _, transport = self.connect("192.0.2.20")
        self.assertEqual(transport.value(), b"peer\r\n")

    def test_exempt_networks(self):
        """Trusted networks (a proxy, a trusted SMTP network) have no cap."""
        import ipaddress

        limit = Connections().door("http", 1, exempt=[ipaddress.ip_network("10.0.0.0/8")])
        factory = LimitedFactory(Factory(), limit, self.clock, REFUSALS, "http")
        for _ in range(5):
            proto, _ = self.connect("10.1.2.3", factory)
            self.assertTrue(proto.wrapped.made)
        self.connect("192.0.2.1", factory)
        _, transport = self.connect("192.0.2.1", factory)
        self.assertEqual(transport.value(), b"peer\r\n")

    def test_listeners_of_one_door_share_the_cap(self):
        """smtp and smtps: one cap per peer for the front door, not one per listener."""
        core = types.SimpleNamespace(connections=self.connections, reactor=self.clock)
        smtps = limit_connections(core, Factory(), "smtp", "smtps", 2, weight=2)
        self.connect()
        self.connect()
        self.assertIsNone(smtps.buildProtocol(peer()))

    def test_behind_proxy_budget_only(self):
        """Under haproxy: the peer at accept is the proxy: no per-peer cap there."""
        self.connections.behind_proxy.add("smtp")
        for _ in range(4):
            proto, _ = self.connect()
            self.assertTrue(proto.wrapped.made)

    def test_unix_peers(self):
        """A UNIX socket has no IP peer: no per-peer cap, the budget still counts."""
        for _ in range(3):
            proto = self.factory.buildProtocol(UNIXAddress(b"/tmp/x"))
            proto.makeConnection(StringTransport())
        self.assertEqual(self.limit.counts, {})
        self.assertEqual(self.connections.open, 6)

    def test_released_once_on_every_path(self):
        """Release even when the protocol's connectionLost raises; never twice."""
        proto, _ = self.connect()

        def boom(reason):
            raise RuntimeError("boom")

        proto.wrapped.connectionLost = boom
        self.assertRaises(RuntimeError, proto.connectionLost, Failure(protocol.connectionDone))
        self.assertEqual(self.limit.counts, {})
        self.assertEqual(self.connections.open, 0)
        proto.wrapped.connectionLost = lambda reason: None
        proto.connectionLost(Failure(protocol.connectionDone))
        self.assertEqual(self.connections.open, 0)

    def test_front_door_refuses(self):
        """A wrapped factory that builds no protocol: nothing counted."""
        none = protocol.Factory()
        none.buildProtocol = lambda addr: None
        factory = LimitedFactory(none, self.limit, self.clock, REFUSALS, "smtp")
        self.assertIsNone(factory.buildProtocol(peer()))
        self.assertEqual((self.limit.counts, self.connections.open), ({}, 0))

    def test_protocol_keeps_its_transport(self):
        """The front door's protocol writes to the real transport and keeps its interfaces."""
        socks = SOCKSServer.__new__(SOCKSServer)
        factory = protocol.Factory()
        factory.buildProtocol = lambda addr: socks
        socks.makeConnection = lambda transport: setattr(socks, "transport", transport)
        wrapper = LimitedFactory(factory, self.limit, self.clock, REFUSALS, "socks")
        proto = wrapper.buildProtocol(peer())
        transport = StringTransport()
        proto.makeConnection(transport)
        self.assertIs(socks.transport, transport)
        self.assertTrue(interfaces.IHalfCloseableProtocol.providedBy(proto))
        self.assertFalse(interfaces.IHalfCloseableProtocol.providedBy(
            LimitedFactory(Factory(), self.limit, self.clock).buildProtocol(peer("192.0.2.99"))
        ))

    def test_refusal_logged_once_per_peer(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        first, _ = self.connect()
        self.connect()
        for _ in range(5):
            self.connect()
        first.connectionLost(Failure(protocol.connectionDone))  # cycling at the cap
        self.connect()
        self.connect()
        refusals = [e for e in events if "refusing connections" in e.get("log_format", "")]
        self.assertEqual(len(refusals), 1)
        for proto in list(self.held):
            proto.connectionLost(Failure(protocol.connectionDone))
        for _ in range(3):
            self.connect()
        refusals = [e for e in events if "refusing connections" in e.get("log_format", "")]
        self.assertEqual(len(refusals), 2)


class BudgetTests(SynchronousTestCase):
    def setUp(self):
        self.clock = MemoryReactorClock()
        # The whole budget open to unauthenticated connections: the budget alone is tested.
        self.connections = Connections(
            ListenSettings(refusal_linger=0, unauthenticated_share=1.0), budget=5
        )
        self.outbound = 0
        self.connections.add_source(lambda: self.outbound)
        self.smtp = LimitedFactory(
            Factory(), self.connections.door("smtp", 100, weight=2), self.clock, REFUSALS, "smtp"
        )
        self.socks = LimitedFactory(Factory(), self.connections.door("socks", 100), self.clock,
                                    None, "socks")

    def connect(self, factory, host):
        proto = factory.buildProtocol(peer(host))
        if proto is None:
            return None, None
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def test_tiny_budget(self):
        """Weighted inbound connections plus outbound ones reach the budget: refused as busy."""
        first, _ = self.connect(self.smtp, "192.0.2.1")
        self.connect(self.smtp, "192.0.2.2")
        self.assertEqual(self.connections.in_use(), 4)
        _, transport = self.connect(self.smtp, "192.0.2.3")
        self.assertEqual(transport.value(), b"busy\r\n")  # weight 2 does not fit in 1
        self.assertTrue(transport.disconnecting)
        socks, _ = self.connect(self.socks, "192.0.2.3")  # weight 1 does
        self.assertIsNotNone(socks)
        self.assertEqual(self.connect(self.socks, "192.0.2.4"), (None, None))  # closed
        first.connectionLost(Failure(protocol.connectionDone))
        self.outbound = 2  # a SOCKS tunnel's outbound side counts too
        _, transport = self.connect(self.smtp, "192.0.2.3")
        self.assertEqual(transport.value(), b"busy\r\n")
        self.outbound = 0
        served, transport = self.connect(self.smtp, "192.0.2.3")
        self.assertTrue(served.wrapped.made)

    def test_busy_logged_once_per_episode(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.connections.budget = 20
        held = [self.connect(self.smtp, f"192.0.2.{i}")[0] for i in range(10)]
        for _ in range(3):  # full; one leaves, one comes in, full again
            self.connect(self.smtp, "192.0.2.99")
            held.pop().connectionLost(Failure(protocol.connectionDone))
            held.append(self.connect(self.smtp, "192.0.2.98")[0])
        busy = [e for e in events if "refusing new" in e.get("log_format", "")]
        self.assertEqual(len(busy), 1)
        for proto in held[:2]:
            proto.connectionLost(Failure(protocol.connectionDone))
        self.connect(self.smtp, "192.0.2.97")
        again = [e for e in events if "again" in e.get("log_format", "")]
        self.assertEqual(len(again), 1)

    def test_budget_for(self):
        self.assertEqual(budget_for(1024, 64), 1024 - 102)
        self.assertEqual(budget_for(256, 64), 192)
        self.assertEqual(budget_for(10, 64), 1)


class FakeResource:
    RLIMIT_NOFILE = 7
    RLIM_INFINITY = -1

    def __init__(self, soft, hard, fail=False):
        self.limits = (soft, hard)
        self.fail = fail

    def getrlimit(self, which):
        assert which == self.RLIMIT_NOFILE
        return self.limits

    def setrlimit(self, which, limits):
        if self.fail:
            raise ValueError("not allowed")
        self.limits = limits


class NofileTests(SynchronousTestCase):
    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def test_soft_raised_to_hard(self):
        fake = FakeResource(1024, 524288)
        self.assertEqual(raise_nofile_limit(fake), (524288, 524288))
        [event] = [e for e in self.events if "file descriptors" in e.get("log_format", "")]
        self.assertEqual((event["old"], event["new"], event["hard"]), (1024, 524288, 524288))

    def test_unlimited_hard(self):
        fake = FakeResource(1024, FakeResource.RLIM_INFINITY)
        self.assertEqual(raise_nofile_limit(fake)[0], NOFILE_UNLIMITED)

    def test_cannot_raise(self):
        fake = FakeResource(1024, 4096, fail=True)
        self.assertEqual(raise_nofile_limit(fake), (1024, 4096))
        self.assertTrue([e for e in self.events if "cannot raise" in e.get("log_format", "")])

    def test_start_derives_budget(self):
        connections = Connections(ListenSettings(fd_reserve=100))
        connections.start(FakeResource(256, 2048))
        self.assertEqual(connections.budget, 2048 - 204)
        connections.start(FakeResource(256, 4096))  # once: twistd's privileged start, then start
        self.assertEqual(connections.budget, 2048 - 204)
        injected = Connections(budget=3)
        injected.start(FakeResource(256, 2048))
        self.assertEqual(injected.budget, 3)


class HandshakeDeadlineTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.factory = HandshakeDeadlineFactory(Factory(), self.clock, 10)
        self.tcp = StringTransport()
        self.tls = types.SimpleNamespace(transport=self.tcp)

    def test_expires(self):
        proto = self.factory.buildProtocol(peer())
        self.assertTrue(interfaces.IHandshakeListener.providedBy(proto))
        proto.makeConnection(self.tls)
        self.assertIs(proto.wrapped.transport, self.tls)
        self.clock.advance(9.9)
        self.assertFalse(self.tcp.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(self.tcp.disconnecting)

    def test_completed_in_time(self):
        proto = self.factory.buildProtocol(peer())
        proto.makeConnection(self.tls)
        proto.handshakeCompleted()
        self.clock.advance(60)
        self.assertFalse(self.tcp.disconnecting)
        proto.connectionLost(Failure(protocol.connectionDone))
        self.assertTrue(proto.wrapped.lost)

    def test_lost_during_handshake(self):
        proto = self.factory.buildProtocol(peer())
        proto.makeConnection(self.tls)
        proto.connectionLost(Failure(protocol.connectionDone))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class BacklogTests(SynchronousTestCase):
    def test_added_unless_set(self):
        for description, expected in [
            ("tcp:2525", "tcp:2525:backlog=1024"),
            ("tcp:2525:interface=127.0.0.1", "tcp:2525:interface=127.0.0.1:backlog=1024"),
            ("tcp:2525:backlog=10", "tcp:2525:backlog=10"),
            ("tcp:2525:127.0.0.1:10", "tcp:2525:127.0.0.1:10"),  # positional backlog
            ("tcp6:2525", "tcp6:2525:backlog=1024"),
            ("tcp6:2525:10", "tcp6:2525:10"),
            ("ssl:465:privateKey=k.pem", "ssl:465:privateKey=k.pem:backlog=1024"),
            ("unix:/run/a\\:b", "unix:/run/a\\:b:backlog=1024"),
            ("unix:/run/a:666:5", "unix:/run/a:666:5"),
            ("haproxy:tcp:25", "haproxy:tcp:25:backlog=1024"),
            ("haproxy:tcp:25:backlog=3", "haproxy:tcp:25:backlog=3"),
            ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
            ("stdio:", "stdio:"),
        ]:
            self.assertEqual(with_backlog(description, 1024), expected, description)

    def test_endpoints_get_it(self):
        """The endpoint built from tcp:2525 listens with the backlog; backlog=10 keeps 10."""
        memory = MemoryReactorClock()
        for description, backlog in [("tcp:2525", 1024), ("tcp:2526:backlog=10", 10),
                                     ("tcp6:2527", 1024)]:
            endpoint = serverFromString(memory, with_backlog(description, 1024))
            endpoint.listen(protocol.Factory())
        self.assertEqual([(port, backlog) for port, _, backlog, _ in memory.tcpServers],
                         [(2525, 1024), (2526, 10), (2527, 1024)])

    def test_make_service(self):
        """twistd authgateway: every listener gets --listen-backlog unless its string sets one."""
        options = tap.Options()
        options.parseOptions([
            "--data-dir", self.mktemp(), "--auth", "memory:a:b",
            "--smtp", "tcp:2525:interface=127.0.0.1:backlog=10", "--listen-backlog", "300",
        ])
        memory = MemoryReactorClock()
        svc = tap.makeService(options, reactor=memory)
        svc.core.connections.budget = 1000  # the test process's limit stays as it is
        svc.startService()
        self.addCleanup(svc.stopService)
        self.assertEqual(sorted((port, backlog) for port, _, backlog, _ in memory.tcpServers),
                         [(1080, 300), (2525, 10), (8080, 300)])

    def test_default(self):
        options = tap.Options()
        options.parseOptions(["--data-dir", self.mktemp(), "--auth", "memory:a:b"])
        self.assertEqual(options["listen-backlog"], ListenSettings().backlog)
        self.assertEqual(options["listenSettings"].backlog, 1024)


class OptionTests(SynchronousTestCase):
    def test_defaults_from_settings(self):
        from gateway.smtp.server import SMTPSettings
        from gateway.socks.server import SOCKSSettings
        from gateway.web.guard import HTTPSettings

        options = tap.Options()
        options.parseOptions(["--data-dir", self.mktemp(), "--auth", "memory:a:b"])
        self.assertEqual(options["smtpSettings"].max_connections_per_peer,
                         SMTPSettings().max_connections_per_peer)
        self.assertEqual(options["httpSettings"].max_connections_per_peer,
                         HTTPSettings().max_connections_per_peer)
        self.assertEqual(options["socksSettings"].max_sessions_per_peer,
                         SOCKSSettings().max_sessions_per_peer)
        self.assertEqual(options["listenSettings"], ListenSettings())

    def test_values(self):
        options = tap.Options()
        options.parseOptions([
            "--data-dir", self.mktemp(), "--auth", "memory:a:b",
            "--smtp-max-connections-per-peer", "3", "--http-max-connections-per-peer", "4",
            "--socks-max-sessions-per-peer", "5", "--tls-handshake-timeout", "2.5",
        ])
        self.assertEqual(
            (options["smtpSettings"].max_connections_per_peer,
             options["httpSettings"].max_connections_per_peer,
             options["socksSettings"].max_sessions_per_peer,
             options["listenSettings"].handshake_timeout),
            (3, 4, 5, 2.5),
        )
        for bad in (["--smtp-max-connections-per-peer", "0"], ["--listen-backlog", "x"],
                    ["--tls-handshake-timeout", "0"]):
            self.assertRaises(Exception, tap.Options().parseOptions,
                              ["--data-dir", self.mktemp(), "--auth", "memory:a:b", *bad])


def _client_tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the gateway's self-signed certificate
    return context


def _open(port, source="127.0.0.1"):
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    return s


def _read_until_closed(s, limit=65536):
    data = b""
    try:
        while len(data) < limit:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        pass
    return data


def _read_line(s):
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(1)
        if not chunk:
            break
        data += chunk
    return data


class RealSocketTests(TestCase):
    """The service from makeService, on loopback; 127.0.0.2 is the other peer."""

    timeout = 60

    def start(self, *extra):
        self.smtp, self.smtps = free_port(), free_port()
        self.http, self.https, self.socks = free_port(), free_port(), free_port()
        options = tap.Options()
        options.parseOptions([
            "--data-dir", os.path.abspath(self.mktemp()), "--auth", "memory:daniel:tiger",
            "--smtp", f"tcp:{self.smtp}:interface=127.0.0.1",
            "--smtps", f"tcp:{self.smtps}:interface=127.0.0.1",
            "--http", f"tcp:{self.http}:interface=127.0.0.1",
            "--https", f"tcp:{self.https}:interface=127.0.0.1",
            "--socks", f"tcp:{self.socks}:interface=127.0.0.1",
            "--smtp-max-connections-per-peer", "2", "--http-max-connections-per-peer", "2",
            "--socks-max-sessions-per-peer", "2", *extra,
        ])
        self.service = tap.makeService(options, reactor=reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.connections = self.service.core.connections

    def run_client(self, f):
        return threads.deferToThread(f)

    @defer.inlineCallbacks
    def released(self):
        """Wait until every inbound connection has been released."""
        for _ in range(500):
            if self.connections.open == 0:
                return
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.fail(f"still counted: {self.connections.open}")

    @defer.inlineCallbacks
    def test_smtp_http_socks(self):
        """A peer over its cap is refused on each front door while another peer is served."""
        self.start()

        def client():
            held, out = [], {}
            try:
                for _ in range(2):
                    s = _open(self.smtp)
                    held.append(s)
                    assert _read_line(s).startswith(b"220 "), "greeting"
                extra = _open(self.smtp)
                out["smtp"] = _read_until_closed(extra)
                extra.close()
                other = _open(self.smtp, "127.0.0.2")
                out["smtp_other"] = _read_line(other)
                other.close()
                # smtps is the same front door: this peer is at its cap there too.
                extra = _open(self.smtps)
                out["smtps"] = _read_until_closed(extra)
                extra.close()

                for _ in range(2):
                    held.append(_open(self.http))
                extra = _open(self.http)
                extra.sendall(b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
                out["http"] = _read_until_closed(extra)
                extra.close()
                other = _open(self.http, "127.0.0.2")
                other.sendall(b"GET /whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                out["http_other"] = _read_until_closed(other)
                other.close()

                for _ in range(2):
                    held.append(_open(self.socks))
                extra = _open(self.socks)
                extra.sendall(b"\x05\x01\x02")
                out["socks"] = _read_until_closed(extra)
                extra.close()
                other = _open(self.socks, "127.0.0.2")
                other.sendall(b"\x05\x01\x02")
                out["socks_other"] = other.recv(2)
                other.close()
            finally:
                for s in held:
                    s.close()
            return out

        out = yield self.run_client(client)
        self.assertEqual(out["smtp"], SMTP_REFUSAL)
        self.assertTrue(out["smtp_other"].startswith(b"220 "))
        self.assertEqual(out["smtps"], b"")  # closed before the handshake
        head = out["http"].split(b"\r\n\r\n")[0].lower()
        self.assertTrue(head.startswith(b"http/1.1 503 "), out["http"])
        self.assertIn(b"\r\nconnection: close", head)
        self.assertIn(b"\r\nretry-after: ", head)
        self.assertTrue(out["http"].endswith(b"Too many connections from your address\n"))
        self.assertTrue(out["http_other"].startswith(b"HTTP/1.1 401 "), out["http_other"])
        self.assertEqual(out["socks"], b"")
        self.assertEqual(out["socks_other"], b"\x05\x02")
        yield self.released()

    @defer.inlineCallbacks
    def test_implicit_tls_cap_released(self):
        """smtps: counted from accept, released after TLS, refused peers closed before TLS."""
        self.start("--smtp-max-connections-per-peer", "1")

        def client():
            out = {}
            tls = _client_tls().wrap_socket(_open(self.smtps))
            out["first"] = _read_line(tls)
            extra = _open(self.smtps)
            out["extra"] = _read_until_closed(extra)
            extra.close()
            tls.sendall(b"QUIT\r\n")
            out["quit"] = _read_line(tls)
            tls.close()
            return out

        out = yield self.run_client(client)
        self.assertTrue(out["first"].startswith(b"220 "))
        self.assertEqual(out["extra"], b"")
        self.assertTrue(out["quit"].startswith(b"221 "))
        yield self.released()

        def again():
            with _client_tls().wrap_socket(_open(self.smtps)) as tls:
                return _read_line(tls)

        line = yield self.run_client(again)
        self.assertTrue(line.startswith(b"220 "))

    @defer.inlineCallbacks
    def test_handshake_deadline(self):
        """An implicit-TLS client that never finishes the handshake is closed, its slot freed."""
        self.start("--tls-handshake-timeout", "0.3")

        def client():
            out = {}
            for port in (self.smtps, self.https):
                s = _open(port)
                s.settimeout(10)
                out[port] = _read_until_closed(s)
                s.close()
            return out

        out = yield self.run_client(client)
        self.assertEqual(out, {self.smtps: b"", self.https: b""})
        yield self.released()

    @defer.inlineCallbacks
    def test_budget(self):
        """With the budget used up, another peer gets the busy refusal; room again once one closes."""
        self.start("--unauthenticated-share", "1")
        self.connections.budget = 4  # two SMTP connections (two descriptors each)

        def client():
            out = {}
            first = _open(self.smtp)
            _read_line(first)
            second = _open(self.smtp, "127.0.0.2")
            _read_line(second)
            busy = _open(self.smtp, "127.0.0.3")
            out["busy"] = _read_until_closed(busy)
            busy.close()
            first.close()
            return out, second

        out, second = yield self.run_client(client)
        self.addCleanup(second.close)
        self.assertEqual(out["busy"], b"421 4.3.2 Too many connections, try again later\r\n")
        for _ in range(500):
            if self.connections.open <= 2:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)

        def later():
            with _open(self.smtp, "127.0.0.3") as s:
                return _read_line(s)

        line = yield self.run_client(later)
        self.assertTrue(line.startswith(b"220 "))


class BacklogSocketTests(TestCase):
    """The listening sockets themselves, as the kernel reports them (ss, iproute2)."""

    def test_listening_backlog(self):
        import subprocess

        ss = require_tool("ss", "iproute2")
        smtp, http = free_port(), free_port()
        options = tap.Options()
        options.parseOptions([
            "--data-dir", os.path.abspath(self.mktemp()), "--auth", "memory:a:b",
            "--smtp", f"tcp:{smtp}:interface=127.0.0.1",
            "--http", f"tcp:{http}:interface=127.0.0.1:backlog=10", "--socks", "none",
        ])
        service = tap.makeService(options, reactor=reactor)
        service.startService()
        self.addCleanup(service.stopService)
        with open("/proc/sys/net/core/somaxconn") as f:
            somaxconn = int(f.read())
        backlogs = {}
        for port in (smtp, http):
            out = subprocess.run([ss, "-ltnH", f"sport = :{port}"], capture_output=True,
                                 text=True, check=True).stdout.split()
            backlogs[port] = int(out[2])  # Send-Q of a listening socket: its backlog
        self.assertEqual(backlogs, {smtp: min(1024, somaxconn), http: 10})
