"""
Tests for L{gateway.connections}: connection caps per peer on every front
door, the descriptor budget, the TLS handshake deadline and the listen
backlog; units with in-memory transports, then real loopback sockets.
"""

from __future__ import annotations

import ipaddress
import os
import select
import smtplib
import socket
import ssl
import types

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, interfaces, protocol, reactor, task, threads
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from gateway import tap
from gateway.addresses import network_of
from gateway.connections import (
    NOFILE_UNLIMITED,
    Connections,
    HandshakeDeadlineFactory,
    LimitedFactory,
    ListenSettings,
    Refused,
    authenticated,
    budget_for,
    limit_connections,
    login_running,
    raise_nofile_limit,
    with_backlog,
)
from gateway.socks.server import SOCKSServer
from tests.support import free_port, keep_signal_handlers, require_tool

SMTP_REFUSAL = b"421 4.7.0 Too many connections from your address\r\n"
REFUSALS = {Refused.PEER: b"peer\r\n", Refused.BUSY: b"busy\r\n"}
#: No fair shares of a door's unauthenticated room: other bounds tested alone.
WHOLE_ROOM = {"peer_fair_share": 1.0, "prefix_fair_share": 1.0}


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
            ListenSettings(refusal_linger=0, unauthenticated_share=1.0, **WHOLE_ROOM), budget=5
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


class PrefixCapTests(SynchronousTestCase):
    """One network's connections on all front doors together are capped."""

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.connections = Connections(ListenSettings(refusal_linger=0, max_per_prefix=3))
        self.smtp = LimitedFactory(
            Factory(), self.connections.door("smtp", 2, weight=2), self.clock, REFUSALS, "smtp"
        )
        self.http = LimitedFactory(
            Factory(),
            self.connections.door(
                "http", 2, weight=2, exempt=[ipaddress.ip_network("192.0.2.200/32")]
            ),
            self.clock, REFUSALS, "http",
        )

    def connect(self, factory, host):
        proto = factory.buildProtocol(peer(host))
        transport = HalfCloseTransport()
        proto.makeConnection(transport)
        return proto, transport

    def authenticate_all(self):
        for peers in list(self.connections.pending.values()):
            for waiting in list(peers.values()):
                for admission in list(waiting):
                    admission.authenticate()

    def test_network_of(self):
        self.assertEqual(network_of("192.0.2.77"), "192.0.2.0/24")
        self.assertEqual(network_of("2001:db8:1:2:3::1"), "2001:db8:1::/48")
        self.assertEqual(network_of("2001:db8:1:2ff:3::1", ipv6=56), "2001:db8:1:200::/56")
        self.assertEqual(network_of("10.1.2.3", ipv4=16), "10.1.0.0/16")
        self.assertIsNone(network_of(None))
        self.assertIsNone(network_of("not an address"))

    def test_one_network_on_all_doors(self):
        """
        Addresses of one /24, each under its own cap, share the network's cap
        across doors: once authenticated sessions hold it, newcomers are refused.
        """
        first, _ = self.connect(self.smtp, "192.0.2.1")
        self.connect(self.smtp, "192.0.2.1")
        self.connect(self.http, "192.0.2.2")
        self.authenticate_all()
        self.assertEqual(self.connections.prefixes, {"192.0.2.0/24": 3})
        for factory, host in ((self.smtp, "192.0.2.3"), (self.http, "192.0.2.4")):
            proto, transport = self.connect(factory, host)
            self.assertEqual(transport.value(), b"peer\r\n")  # the door's answer for its peers
            self.assertNotIsInstance(proto, type(first))
        other, transport = self.connect(self.smtp, "198.51.100.1")  # another network
        self.assertTrue(other.wrapped.made)
        first.connectionLost(Failure(protocol.connectionDone))
        again, _ = self.connect(self.http, "192.0.2.4")
        self.assertTrue(again.wrapped.made)

    def test_ipv6_by_48(self):
        """/64s of one /48 share its cap; another /48 does not."""
        for host in ("2001:db8:0:1::1", "2001:db8:0:2::1", "2001:db8:0:3::1"):
            self.connect(self.smtp, host)
        self.authenticate_all()
        _, transport = self.connect(self.smtp, "2001:db8:0:4::1")
        self.assertEqual(transport.value(), b"peer\r\n")
        _, transport = self.connect(self.smtp, "::ffff:192.0.2.9")  # IPv4-mapped: its /24
        other, transport = self.connect(self.smtp, "2001:db8:1::1")
        self.assertTrue(other.wrapped.made)
        self.assertEqual(self.connections.prefixes,
                         {"2001:db8::/48": 3, "192.0.2.0/24": 1, "2001:db8:1::/48": 1})

    def test_trusted_and_proxied_not_counted(self):
        """Trusted networks and PROXY-protocol listeners neither fill nor hit a network's cap."""
        for _ in range(5):
            proto, _ = self.connect(self.http, "192.0.2.200")
            self.assertTrue(proto.wrapped.made)
        self.connections.behind_proxy.add("smtp")
        for _ in range(2):
            self.connect(self.smtp, "192.0.2.201")
        self.assertEqual(self.connections.prefixes, {})

    def test_logged_once_per_network(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for host in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
            self.connect(self.smtp, host)
        self.authenticate_all()
        for host in ("192.0.2.4", "192.0.2.5"):
            self.connect(self.smtp, host)
        said = [e for e in events if "network" in e.get("log_format", "")]
        self.assertEqual(len(said), 1)
        self.assertEqual(said[0]["prefix"], "192.0.2.0/24")


class NetworkEvictionTests(SynchronousTestCase):
    """
    A network at its cap (8 here) does not lock its other addresses out: a
    newcomer under its own cap closes the oldest unauthenticated connection
    of the peer holding the most. The budget (18,000, as in the review) is far
    above one network's cap, so stress mode never helps.
    """

    def setUp(self):
        self.build()
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def build(self):
        self.clock = MemoryReactorClock()
        self.connections = Connections(
            ListenSettings(refusal_linger=0, max_per_prefix=8), budget=18000
        )
        self.smtp = LimitedFactory(
            Factory(), self.connections.door("smtp", 2, weight=2), self.clock, REFUSALS, "smtp"
        )
        self.http = LimitedFactory(
            Factory(), self.connections.door("http", 2, weight=3), self.clock, REFUSALS, "http"
        )
        self.socks = LimitedFactory(Factory(), self.connections.door("socks", 4), self.clock,
                                    None, "socks")

    def connect(self, factory, host):
        self.clock.advance(1)  # each connection younger than the one before
        proto = factory.buildProtocol(peer(host))
        if proto is None:
            return None, None
        transport = HalfCloseTransport()
        proto.makeConnection(transport)
        return proto, transport

    def fill(self):
        """Four addresses at their HTTP cap, idle: the /24's cap of 8."""
        held = [self.connect(self.http, f"192.0.2.{10 + i}") for i in range(4) for _ in range(2)]
        self.assertTrue(all(proto.wrapped.made for proto, _ in held))
        self.assertEqual(self.connections.prefixes["192.0.2.0/24"], 8)
        return held

    def end(self, connections):
        for proto, transport in connections:
            if transport.aborted and not proto.admission.released:
                proto.connectionLost(Failure(protocol.connectionDone))

    def test_login_running_not_evicted(self):
        """
        Third review: the network cap's eviction closed a connection whose login
        was running (cancelling a right password while the user's ceiling made it
        wait), which counted against that user's pair. It now passes over it.
        """
        held = self.fill()
        attempts = [defer.Deferred() for _ in held]
        for (_, transport), d in zip(held, attempts):
            login_running(transport, d)
        proto, _ = self.connect(self.smtp, "192.0.2.250")
        # Nobody to close: refused, and every login goes on.
        self.assertFalse(getattr(getattr(proto, "wrapped", None), "made", False))
        self.assertFalse(any(t.aborted for _, t in held))
        attempts[0].callback(None)  # that login answered: its connection may go now
        proto, _ = self.connect(self.smtp, "192.0.2.250")
        self.assertTrue(proto.wrapped.made)
        self.assertEqual([t.aborted for _, t in held], [True] + [False] * 7)

    def test_idle_addresses_cannot_refuse_their_network(self):
        """
        The review's case: clean addresses of the /24 get in on every door
        (one holding as many as each attacker, 2, is then at its fair share).
        """
        held = self.fill()
        mine = [self.connect(self.smtp, "192.0.2.250"), self.connect(self.http, "192.0.2.250"),
                self.connect(self.socks, "192.0.2.251")]
        for proto, transport in mine:
            self.assertTrue(proto.wrapped.made)
            self.assertFalse(transport.aborted)
        # the oldest of the first three attackers (ties: the one holding the oldest)
        self.assertEqual([t.aborted for _, t in held], [True, False, True, False, True, False,
                                                        False, False])
        self.assertEqual(self.connections.prefixes, {"192.0.2.0/24": 8})
        self.end(held)
        self.assertEqual(self.connections.prefixes, {"192.0.2.0/24": 8})  # not released twice
        self.assertEqual(self.connections.open, 5 * 3 + 3 + 2 + 1)
        self.assertEqual(sum(len(w) for w in self.connections.pending["192.0.2.0/24"].values()),
                         8)

    def test_peer_at_its_cap_evicts_nothing(self):
        """A peer at its own cap is refused as before; it cannot close its neighbours'."""
        held = self.fill()
        _, transport = self.connect(self.http, "192.0.2.10")
        self.assertEqual(transport.value(), b"peer\r\n")
        self.assertFalse(any(t.aborted for _, t in held))

    def test_greediest_peer_first(self):
        """The oldest connection of the peer holding the most goes, not an older one of another."""
        small = self.connect(self.smtp, "192.0.2.1")
        big = [self.connect(door, "192.0.2.2") for door in (self.smtp, self.smtp, self.http,
                                                             self.http, self.socks)]
        rest = [self.connect(self.socks, "192.0.2.3") for _ in range(2)]
        self.assertEqual(self.connections.prefixes, {"192.0.2.0/24": 8})
        fresh, transport = self.connect(self.socks, "192.0.2.4")
        self.assertTrue(fresh.wrapped.made)
        self.assertEqual([t.aborted for _, t in [small] + big + rest],
                         [False, True] + [False] * 6)

    def test_greediest_newcomer_refused(self):
        """A newcomer holding as many as anyone in the full network is refused: no churn."""
        held = [self.connect(self.socks, f"192.0.2.{1 + i // 2}") for i in range(8)]
        proto, transport = self.connect(self.smtp, "192.0.2.1")  # holds 2 already, others 2
        self.assertEqual(transport.value(), b"peer\r\n")  # the door's answer for a full network
        self.assertFalse(any(t.aborted for _, t in held))

    def test_authenticated_sessions_are_never_closed(self):
        """Only unauthenticated connections make room; authenticated sessions keep the cap."""
        held = self.fill()
        for _, transport in held[1:]:
            authenticated(transport)
        first, transport = self.connect(self.smtp, "192.0.2.250")
        self.assertTrue(first.wrapped.made)
        self.assertEqual([t.aborted for _, t in held], [True] + [False] * 7)
        self.end(held)
        authenticated(transport)
        _, refused = self.connect(self.smtp, "192.0.2.251")
        self.assertEqual(refused.value(), b"peer\r\n")
        self.assertFalse(any(t.aborted for _, t in held[1:]))

    def test_trusted_and_other_networks_untouched(self):
        """Another network's idle connections are never closed for this one."""
        others = [self.connect(self.http, f"198.51.100.{i}") for i in range(1, 5)]
        self.fill()
        self.connect(self.smtp, "192.0.2.250")
        self.assertFalse(any(t.aborted for _, t in others))

    def test_eviction_not_wasted_on_a_refusal(self):
        """A newcomer refused for the budget closes nothing."""
        held = self.fill()
        self.connections.budget = self.connections.open
        _, transport = self.connect(self.smtp, "192.0.2.250")
        self.assertEqual(transport.value(), b"busy\r\n")
        self.assertFalse(any(t.aborted for _, t in held))

    def test_logged_once_per_episode(self):
        """One line when a network starts evicting, one when it is below half its cap again."""
        held = self.fill()
        mine = [self.connect(self.socks, f"192.0.2.{200 + i}") for i in range(6)]
        said = [e for e in self.events if "network" in e.get("log_format", "")]
        self.assertEqual(len(said), 1)
        self.assertEqual((said[0]["prefix"], said[0]["limit"]), ("192.0.2.0/24", 8))
        for proto, _ in held + mine:
            if not proto.admission.released:
                proto.connectionLost(Failure(protocol.connectionDone))
        said = [e for e in self.events if "network" in e.get("log_format", "")]
        self.assertEqual(len(said), 2)
        self.assertEqual(said[1]["closed"], 6)
        self.assertEqual((self.connections.prefixes, self.connections.pending), ({}, {}))
        self.fill()
        self.connect(self.smtp, "192.0.2.250")
        said = [e for e in self.events if "network" in e.get("log_format", "")]
        self.assertEqual(len(said), 3)  # a new episode

    def test_ipv6_peers_of_one_48(self):
        """IPv6: /64s are the peers, the /48 the network; another /48 is untouched."""
        other = self.connect(self.smtp, "2001:db8:1::1")
        held = [self.connect(self.http, f"2001:db8:0:{i}::1") for i in range(4) for _ in range(2)]
        fresh, _ = self.connect(self.http, "2001:db8:0:99::1")
        self.assertTrue(fresh.wrapped.made)
        self.assertEqual([t.aborted for _, t in held].count(True), 1)
        self.assertFalse(other[1].aborted)

    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.tuples(st.sampled_from("cal"), st.integers(0, 5), st.integers(0, 2)),
                    max_size=60))
    def test_counts_stay_consistent(self, steps):
        """
        Any mix of connects (c), authentications (a) and ends (l): the network
        never holds more than its cap, and everything is released exactly once.
        """
        self.build()
        doors = (self.smtp, self.http, self.socks)
        live = []
        for op, who, door in steps:
            if op == "c":
                proto, transport = self.connect(doors[door], f"192.0.2.{who}")
                if proto is not None and hasattr(proto, "admission"):
                    live.append((proto, transport))
            elif live:
                proto, transport = live[(who * 7 + door) % len(live)]
                if op == "a":
                    authenticated(transport)
                else:
                    live.remove((proto, transport))
                    proto.connectionLost(Failure(protocol.connectionDone))
            self.assertLessEqual(self.connections.prefixes.get("192.0.2.0/24", 0), 8)
            for proto, transport in list(live):
                if transport.aborted:  # evicted: it ends
                    live.remove((proto, transport))
                    proto.connectionLost(Failure(protocol.connectionDone))
        for proto, _ in live:
            proto.connectionLost(Failure(protocol.connectionDone))
        self.assertEqual((self.connections.open, self.connections.unauthenticated,
                          self.connections.prefixes, self.connections.pending),
                         (0, {}, {}, {}))

    def test_defaults_leave_room_for_several_peers(self):
        """The default network cap is several times what one address may hold on all doors."""
        from gateway.smtp.server import SMTPSettings
        from gateway.socks.server import SOCKSSettings
        from gateway.web.settings import HTTPSettings

        one_address = (tap.default_of(SMTPSettings, "max_connections_per_peer")
                       + tap.default_of(HTTPSettings, "max_connections_per_peer")
                       + tap.default_of(SOCKSSettings, "max_sessions_per_peer"))
        self.assertGreaterEqual(ListenSettings().max_per_prefix, 4 * one_address)


class UnauthenticatedShareTests(SynchronousTestCase):
    """
    Budget 40, share 0.5: 20 descriptors for unauthenticated connections; three
    doors, a reserve of 20 // 6 = 3 each, 11 shared.
    """

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.connections = Connections(ListenSettings(refusal_linger=2.0), budget=40)
        self.smtp = LimitedFactory(
            Factory(), self.connections.door("smtp", 100, weight=2), self.clock, REFUSALS, "smtp"
        )
        self.http = LimitedFactory(
            Factory(), self.connections.door("http", 100, weight=2), self.clock, REFUSALS, "http"
        )
        self.socks = LimitedFactory(Factory(), self.connections.door("socks", 100), self.clock,
                                    None, "socks")
        self.net = 0

    def connect(self, factory, host=None):
        if host is None:  # every attacker from its own network: no other cap applies
            self.net += 1
            host = f"10.{self.net}.0.1"
        proto = factory.buildProtocol(peer(host))
        if proto is None:
            return None, None
        transport = HalfCloseTransport()
        proto.makeConnection(transport)
        return proto, transport

    def test_flood_on_one_door_leaves_the_others(self):
        """Unauthenticated SMTP connections of many networks stop at the share; others get in."""
        held = [self.connect(self.smtp) for _ in range(7)]  # 3 reserved + 11 shared = 7 x 2
        self.assertTrue(all(p.wrapped.made for p, _ in held))
        _, transport = self.connect(self.smtp)
        self.assertEqual(transport.value(), b"busy\r\n")
        self.assertTrue(transport.disconnecting)  # no room in the share to linger either
        self.assertEqual(self.connections.in_use(), 14)
        web, transport = self.connect(self.http, "192.0.2.50")
        self.assertTrue(web.wrapped.made)
        socks, _ = self.connect(self.socks, "192.0.2.51")
        self.assertTrue(socks.wrapped.made)
        self.assertLessEqual(sum(self.connections.unauthenticated.values()), 20)

    def test_authenticated_leave_the_share(self):
        """An authenticated connection's descriptors leave the share: room for new clients."""
        held = [self.connect(self.smtp) for _ in range(7)]
        for proto, transport in held:
            authenticated(transport)
            authenticated(transport)  # once only
        self.assertEqual(self.connections.unauthenticated, {})
        self.assertEqual(self.connections.open, 14)
        fresh, _ = self.connect(self.smtp)
        self.assertTrue(fresh.wrapped.made)
        held[0][0].connectionLost(Failure(protocol.connectionDone))
        authenticated(held[0][1])  # after the end: nothing to move
        self.assertEqual(self.connections.unauthenticated, {"smtp": 2})
        self.assertEqual(self.connections.open, 14)

    def test_found_under_tls_and_proxy_layers(self):
        """The call-in finds the connection from the protocol's transport (a TLS layer above)."""
        proto, transport = self.connect(self.smtp)
        tls_layer = types.SimpleNamespace(transport=types.SimpleNamespace(transport=transport))
        authenticated(tls_layer)
        self.assertEqual(self.connections.unauthenticated, {})
        authenticated(None)
        authenticated(object())  # not ours: ignored
        proto.connectionLost(Failure(protocol.connectionDone))
        self.assertEqual((self.connections.open, self.connections.unauthenticated), (0, {}))

    def test_unauthenticated_released(self):
        """An unauthenticated connection that ends gives its share back."""
        proto, _ = self.connect(self.http)
        self.assertEqual(self.connections.unauthenticated, {"http": 2})
        proto.connectionLost(Failure(protocol.connectionDone))
        self.assertEqual(self.connections.unauthenticated, {})

    def test_trusted_start_authenticated(self):
        limit = self.connections.door("trusted", 100, exempt=[ipaddress.ip_network("192.0.2.0/24")])
        factory = LimitedFactory(Factory(), limit, self.clock, REFUSALS, "trusted")
        for _ in range(30):
            proto, _ = self.connect(factory, "192.0.2.9")
            self.assertTrue(proto.wrapped.made)
        self.assertEqual(self.connections.unauthenticated, {})

    def test_stress_closes_old_unauthenticated(self):
        """
        Past three quarters of what the door's unauthenticated connections may hold
        (10.5 of 14), a new connection first closes the door's unauthenticated
        connections open for the stress timeout, oldest first (all networks
        hold one), until the door is below the level; it then comes in at once.
        """
        old = [self.connect(self.smtp) for _ in range(4)]
        logged_in = self.connect(self.smtp)
        authenticated(logged_in[1])
        self.clock.advance(11)
        young = [self.connect(self.smtp) for _ in range(2)]  # 12: past the level
        web, web_transport = self.connect(self.http, "192.0.2.50")  # another door: not stressed
        self.assertFalse(any(t.aborted for _, t in old + young + [logged_in]))
        young.append(self.connect(self.smtp))  # closes one (10), then comes in: 12
        self.assertTrue(young[-1][0].wrapped.made)
        self.assertEqual([t.aborted for _, t in old + young + [logged_in]],
                         [True] + [False] * 7)
        young.append(self.connect(self.smtp))  # the next oldest, while the first still closes
        self.assertTrue(young[-1][0].wrapped.made)
        self.assertEqual([t.aborted for _, t in old], [True, True, False, False])
        self.assertFalse(web_transport.aborted)
        for proto, _ in old[:2]:
            proto.connectionLost(Failure(protocol.connectionDone))  # released once only
        self.assertEqual(self.connections.unauthenticated, {"smtp": 12, "http": 2})
        self.clock.advance(11)
        for proto, _ in young:
            # A byte now and then keeps nothing (the third review's trickle):
            # what counts is how long a connection has gone without logging in.
            proto.dataReceived(b"EHLO x\r\n")
        self.connect(self.smtp)  # 12: the oldest goes (10), the newcomer comes in
        self.assertEqual([t.aborted for _, t in old], [True, True, True, False])
        self.connect(self.smtp)
        self.connect(self.smtp)  # the talkative young ones go too, oldest first
        self.assertEqual([t.aborted for _, t in old], [True] * 4)
        self.assertTrue(young[0][1].aborted)
        self.assertFalse(logged_in[1].aborted)

    def test_newcomer_that_sheds_is_admitted(self):
        """
        Under stress with the door full, the new connection whose arrival closes
        an idle old one comes in itself (on main it was refused: the closed
        one's count was released only on the next reactor turn).
        """
        old = [self.connect(self.smtp) for _ in range(7)]  # 14: full
        self.clock.advance(11)
        proto, transport = self.connect(self.smtp)
        self.assertEqual(transport.value(), b"")
        self.assertTrue(proto.wrapped.made)
        self.assertEqual(sum(t.aborted for _, t in old), 2)  # 10: below the level
        self.assertEqual(self.connections.unauthenticated["smtp"], 12)
        for proto, _ in old:
            proto.connectionLost(Failure(protocol.connectionDone))
        self.assertEqual(self.connections.unauthenticated["smtp"], 2)

    def test_login_running_never_shed(self):
        """
        A connection whose login is running is not closed under stress, nor by
        a crowded door's newcomer (closing it cancels the attempt); once the
        login has answered (a 401 on a kept-alive connection), it is again.
        """
        old = [self.connect(self.smtp) for _ in range(7)]
        attempts = [defer.Deferred() for _ in old]
        for (_, transport), d in zip(old, attempts):
            self.assertIs(login_running(transport, d), d)
        self.clock.advance(11)
        _, transport = self.connect(self.smtp)
        self.assertEqual(transport.value(), b"busy\r\n")
        self.assertFalse(any(t.aborted for _, t in old))
        results = []
        attempts[3].addCallback(results.append)
        attempts[3].callback("refused")  # the result is passed on untouched
        self.assertEqual(results, ["refused"])
        proto, _ = self.connect(self.smtp)
        self.assertTrue(proto.wrapped.made)
        self.assertEqual([t.aborted for _, t in old], [False] * 3 + [True] + [False] * 3)
        login_running(None, defer.Deferred())  # not ours: nothing happens
        login_running(old[3][1], defer.Deferred())  # ended: nothing happens

    def test_one_peer_holds_its_fair_share(self):
        """
        One address may hold 1/8 of a door's unauthenticated room and one
        network 1/4: beyond, refused like a peer over its cap (on main, one
        address at a cap of 100 filled the door's whole room).
        """
        self.connections.budget = 400  # share 200: reserve 33 per door, 101 shared
        room = self.connections._unauthenticated_limit("smtp") // 2
        self.assertEqual(room, 67)
        held = [self.connect(self.smtp, "192.0.2.1") for _ in range(20)]
        self.assertEqual(sum(p.wrapped.made for p, _ in held if hasattr(p, "wrapped")), 8)
        self.assertEqual(held[-1][1].value(), b"peer\r\n")
        neighbours = [self.connect(self.smtp, f"192.0.2.{i}") for i in range(2, 20)]
        self.assertEqual(sum(hasattr(p, "wrapped") for p, _ in neighbours), 8)  # 16 for the /24
        self.assertEqual(self.connections.unauthenticated_prefixes["smtp"], {"192.0.2.0/24": 16})
        self.assertEqual(self.connections.prefixes["192.0.2.0/24"], 16)
        other, _ = self.connect(self.smtp, "198.51.100.1")
        self.assertTrue(other.wrapped.made)
        web, _ = self.connect(self.http, "192.0.2.1")  # another door: its own shares
        self.assertTrue(web.wrapped.made)
        for proto, transport in held[:8]:
            authenticated(transport)  # out of the share: room for the peer again
        again, _ = self.connect(self.smtp, "192.0.2.1")
        self.assertTrue(again.wrapped.made)

    def test_reconnecting_flood_leaves_clean_clients_room(self):
        """
        Five networks reconnecting as fast as they are refused (young
        connections: stress timeout never reached) fill the door; a clean
        client of another network still comes in, closing one of the network
        holding the most, and keeps its connections through more rounds (on
        main: refused as busy).
        """
        self.connections.budget = 400  # the door's room: 67 connections

        def flood():
            for net in range(5):
                for host in range(1, 12):
                    self.connect(self.smtp, f"10.{net}.0.{host}")

        flood()
        flood()
        clean = [self.connect(self.smtp, "198.51.100.1") for _ in range(4)]
        self.assertTrue(all(hasattr(p, "wrapped") for p, _ in clean), clean[0][1].value())
        held = self.connections.unauthenticated_prefixes["smtp"]
        self.assertLessEqual(max(held.values()), 16)  # a quarter of the room
        self.assertEqual(held["198.51.100.0/24"], 4)
        others = [self.connect(self.smtp, f"203.0.113.{i}") for i in range(1, 5)]
        self.assertTrue(all(p.wrapped.made for p, _ in others))  # another clean network
        flood()
        self.clock.advance(5)  # still young
        flood()
        self.assertFalse(any(t.aborted for _, t in clean + others))
        self.assertLessEqual(self.connections.unauthenticated["smtp"], 134)

    def test_refusals_logged_per_door_with_hysteresis(self):
        """
        A door at its unauthenticated share logs one refusal line, and "again"
        once it is below 90 % of it (with the refusals counted), however often
        a connection leaves and another is refused; the other doors log their
        own (on main: a line on every close and refusal, one flag for all doors).
        """
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        held = [self.connect(self.smtp) for _ in range(7)]
        for _ in range(20):
            self.connect(self.smtp)  # refused
            held.pop(0)[0].connectionLost(Failure(protocol.connectionDone))
            held.append(self.connect(self.smtp))  # in
        web = [self.connect(self.http) for _ in range(5)]
        self.assertEqual(web[-1][1].value(), b"busy\r\n")  # what smtp left: 3 + 4 shared

        def lines(text):
            return [e for e in events if text in e.get("log_format", "")]

        self.assertEqual([e["door"] for e in lines("refusing new connections on")],
                         ["smtp", "http"])
        self.assertEqual(lines("again"), [])
        for proto, _ in held[:2]:
            proto.connectionLost(Failure(protocol.connectionDone))
        self.connect(self.smtp)  # 10 of 14: below 90 %
        self.assertEqual([(e["door"], e["refused"]) for e in lines("again")], [("smtp", 20)])

    def test_lingering_refusals_in_the_share(self):
        """Refusals lingering count in the share, and per network: a /24 cannot hold many."""
        limit = self.connections.door("smtp", 100)
        limit.max_per_peer = 0  # every connection refused: only refusals
        self.connections.budget = 200  # room: only the network's bound applies
        refusals = [self.connect(self.smtp, f"192.0.2.{i + 1}") for i in range(40)]
        self.assertEqual(self.connections.lingering_prefixes, {"192.0.2.0/24": 16})
        self.assertEqual(self.connections.unauthenticated, {"smtp": 16})
        self.end_lingering(refusals)
        self.connections.budget = 40
        refusals = [self.connect(self.smtp) for i in range(40)]
        # 3 + 11 in the share at most, whatever the number of networks
        self.assertEqual(self.connections.unauthenticated, {"smtp": 14})
        self.end_lingering(refusals)

    def end_lingering(self, refusals):
        self.clock.advance(2.0)
        for proto, transport in refusals:
            if transport.aborted:
                proto.connectionLost(Failure(protocol.connectionDone))
        self.assertEqual((self.connections.open, self.connections.unauthenticated), (0, {}))
        self.assertEqual(self.connections.lingering_prefixes, {})


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
        keep_signal_handlers(self)
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
        from gateway.web.settings import HTTPSettings

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
        options = tap.Options()
        options.parseOptions([
            "--data-dir", self.mktemp(), "--auth", "memory:a:b",
            "--max-connections-per-prefix", "7", "--ipv4-prefix", "16", "--ipv6-prefix", "56",
            "--unauthenticated-share", "0.25", "--stress-timeout", "3",
        ])
        settings = options["listenSettings"]
        self.assertEqual(
            (settings.max_per_prefix, settings.ipv4_prefix, settings.ipv6_prefix,
             settings.unauthenticated_share, settings.stress_timeout),
            (7, 16, 56, 0.25, 3.0),
        )
        for bad in (["--smtp-max-connections-per-peer", "0"], ["--listen-backlog", "x"],
                    ["--tls-handshake-timeout", "0"], ["--max-connections-per-prefix", "0"],
                    ["--ipv4-prefix", "33"], ["--ipv6-prefix", "65"], ["--ipv6-prefix", "0"],
                    ["--unauthenticated-share", "0"], ["--unauthenticated-share", "1.5"]):
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
        keep_signal_handlers(self)
        self.service = tap.makeService(options, reactor=reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.connections = self.service.core.connections

    def whole_room(self):
        """No fair shares of a door's unauthenticated room: other bounds tested alone."""
        self.connections.settings = attrs.evolve(self.connections.settings, **WHOLE_ROOM)

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
        self.whole_room()

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


    @defer.inlineCallbacks
    def test_one_network_cannot_crowd_out_another(self):
        """
        Peers of one /24, each at its own cap, stop at the network's cap
        (newcomers close the network's own oldest idle connections): a clean
        peer of another network is served (without the network cap, they held
        the whole budget and it got 503).
        """
        self.start("--max-connections-per-prefix", "6", "--unauthenticated-share", "1")
        self.connections.budget = 30  # 15 SMTP connections would fill it
        self.whole_room()

        held, out = [], {"smtp": [], "http": b""}
        self.addCleanup(lambda: [s.close() for s in held])

        def attackers():
            for i in range(2, 10):  # 8 attackers x 2 connections
                for _ in range(2):
                    s = _open(self.smtp, f"127.0.0.{i}")
                    line = _read_line(s)
                    out["smtp"].append(line)
                    if line.startswith(b"220 "):
                        held.append(s)
                    else:
                        s.close()  # ends the refusal's linger

        def clean():
            web = _open(self.http, "127.0.1.1")
            web.sendall(b"GET /whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            out["http"] = _read_until_closed(web)
            web.close()
            with _open(self.smtp, "127.0.1.1") as other:
                out["smtp_other"] = _read_line(other)

        yield self.run_client(attackers)
        for _ in range(500):
            if not self.connections.lingering_prefixes:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertLessEqual(self.connections.prefixes["127.0.0.0/24"], 6)
        self.assertLessEqual(self.connections.open, 6 * 2 + 6)  # closing ones included
        yield self.run_client(clean)
        for s in held:
            s.close()
        served = [line for line in out["smtp"] if line.startswith(b"220 ")]
        refused = [line for line in out["smtp"] if line not in served]
        self.assertGreaterEqual(len(served), 6)
        self.assertLessEqual(set(refused), {SMTP_REFUSAL})
        self.assertTrue(out["http"].startswith(b"HTTP/1.1 401 "), out["http"][:80])
        self.assertTrue(out["smtp_other"].startswith(b"220 "))
        yield self.released()

    @defer.inlineCallbacks
    def test_idle_addresses_cannot_refuse_their_network(self):
        """
        The review's case: four addresses at their HTTP cap, idle, fill their
        /24's cap; a clean address of the same /24 still gets its SMTP 220 and
        its HTTP answer (on main: 421 4.7.0 and 503), and the attackers' oldest
        connections are closed to make room.
        """
        self.start("--max-connections-per-prefix", "8")
        held, out = [], {}
        self.addCleanup(lambda: [s.close() for s in held])

        def attackers():
            for i in range(10, 14):
                for _ in range(2):
                    held.append(_open(self.http, f"127.0.0.{i}"))

        yield self.run_client(attackers)
        for _ in range(500):
            if self.connections.prefixes.get("127.0.0.0/24") == 8:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(self.connections.prefixes["127.0.0.0/24"], 8)

        def clean():
            with _open(self.smtp, "127.0.0.250") as mail:
                out["smtp"] = _read_line(mail)
                web = _open(self.http, "127.0.0.250")
                web.sendall(b"GET /whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                out["http"] = _read_until_closed(web)
                web.close()
            # an attacker at its cap still gets nothing more
            extra = _open(self.http, "127.0.0.13")
            extra.sendall(b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
            out["extra"] = _read_until_closed(extra)
            extra.close()
            readable = []
            for _ in range(100):  # the evicted ones: EOF or reset
                readable, _, _ = select.select(held, [], [], 0.05)
                if len(readable) >= 2:
                    break
            out["closed"] = 0
            for s in readable:
                try:
                    out["closed"] += s.recv(1) == b""
                except ConnectionResetError:
                    out["closed"] += 1

        yield self.run_client(clean)
        self.assertTrue(out["smtp"].startswith(b"220 "), out["smtp"])
        self.assertTrue(out["http"].startswith(b"HTTP/1.1 401 "), out["http"][:80])
        self.assertTrue(out["extra"].startswith(b"HTTP/1.1 503 "), out["extra"][:80])
        self.assertEqual(out["closed"], 2)
        for s in held:
            s.close()
        yield self.released()

    @defer.inlineCallbacks
    def test_unauthenticated_cannot_crowd_out(self):
        """
        Unauthenticated SMTP connections from many networks stop at their share
        of the budget: a new HTTP client still gets in; SMTP, HTTP and SOCKS
        sessions that authenticated leave the share (without the share, the
        flood held the whole budget and HTTP answered 503).
        """
        self.start("--smtp-insecure-auth")
        self.connections.budget = 48  # share 24; reserve 4 per door, 12 shared
        self.whole_room()

        def client():
            held, out = [], {"flood": []}
            smtp = smtplib.SMTP("127.0.0.1", self.smtp, source_address=("127.0.5.1", 0), timeout=10)
            smtp.login("daniel", "tiger")
            held.append(smtp.sock)
            out["smtp_unauthenticated"] = dict(self.connections.unauthenticated)
            for i in range(10, 22):  # 24 connections x 2 descriptors, 12 networks
                for _ in range(2):
                    s = _open(self.smtp, f"127.0.{i}.1")
                    held.append(s)
                    out["flood"].append(_read_line(s))
            web = _open(self.http, "127.0.30.1")
            held.append(web)
            web.sendall(b"GET /whoami HTTP/1.1\r\nHost: x\r\n"
                        b"Authorization: Basic ZGFuaWVsOnRpZ2Vy\r\n\r\n")
            out["http"] = web.recv(65536)
            socks = _open(self.socks, "127.0.31.1")
            held.append(socks)
            socks.sendall(b"\x05\x01\x02")
            out["socks_method"] = socks.recv(2)
            socks.sendall(b"\x01\x06daniel\x05tiger")
            out["socks_auth"] = socks.recv(2)
            out["unauthenticated"] = dict(self.connections.unauthenticated)
            return out, held

        out, held = yield self.run_client(client)
        for s in held:
            self.addCleanup(s.close)
        self.assertEqual(out["smtp_unauthenticated"], {})
        served = [line for line in out["flood"] if line.startswith(b"220 ")]
        # (4 + 12) / 2 at once; more in turn: under stress a newcomer of a
        # network holding none closes one of a network holding two
        self.assertGreaterEqual(len(served), 8)
        self.assertEqual(set(out["flood"]) - set(served),
                         {b"421 4.3.2 Too many connections, try again later\r\n"})
        self.assertTrue(out["http"].startswith(b"HTTP/1.1 200 "), out["http"][:80])
        self.assertEqual((out["socks_method"], out["socks_auth"]), (b"\x05\x02", b"\x01\x00"))
        self.assertEqual(out["unauthenticated"], {"smtp": 16})  # the flood only

    @defer.inlineCallbacks
    def test_reconnecting_flood_leaves_a_clean_client_in(self):
        """
        The review's case over loopback: five networks reconnect to SMTP as
        soon as they are refused; each holds at most its fair share of the
        door's unauthenticated room, and a clean client of another network
        gets its 220 and its login (on main: 421 4.3.2).
        """
        self.start("--smtp-insecure-auth", "--smtp-max-connections-per-peer", "50")
        self.connections.budget = 48  # SMTP may hold 8 unauthenticated; a network 2
        held = []
        self.addCleanup(lambda: [s.close() for s in held])

        def flood():
            for _ in range(2):
                for net in range(5):
                    for host in range(1, 4):
                        s = _open(self.smtp, f"127.0.{40 + net}.{host}")
                        if _read_line(s).startswith(b"220 "):
                            held.append(s)
                        else:
                            s.close()

        def clean():
            smtp = smtplib.SMTP("127.0.0.1", self.smtp, source_address=("127.0.60.1", 0),
                                timeout=10)
            try:
                return smtp.login("daniel", "tiger")[0]
            finally:
                smtp.quit()

        yield self.run_client(flood)
        self.assertLessEqual(self.connections.unauthenticated["smtp"], 16)  # full
        code = yield self.run_client(clean)
        self.assertEqual(code, 235)
        prefixes = self.connections.unauthenticated_prefixes["smtp"]
        self.assertLessEqual(max(prefixes.values()), 2)

    @defer.inlineCallbacks
    def test_authenticated_under_tls(self):
        """SMTP sessions over implicit TLS and after STARTTLS leave the share once they log in."""
        self.start()

        def client():
            out = {}
            implicit = smtplib.SMTP_SSL("127.0.0.1", self.smtps, context=_client_tls(), timeout=10)
            starttls = smtplib.SMTP("127.0.0.1", self.smtp, timeout=10)
            starttls.starttls(context=_client_tls())
            out["before"] = dict(self.connections.unauthenticated)
            implicit.login("daniel", "tiger")
            starttls.login("daniel", "tiger")
            out["after"] = dict(self.connections.unauthenticated)
            implicit.quit()
            starttls.quit()
            return out

        out = yield self.run_client(client)
        self.assertEqual(out, {"before": {"smtp": 4}, "after": {}})
        yield self.released()


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
        keep_signal_handlers(self)
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
