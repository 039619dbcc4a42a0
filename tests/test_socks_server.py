"""
The SOCKS5 protocol: method selection, RFC 1929 logins, every reply code,
destination rules, KumoMTA's BIND-then-CONNECT, timeouts, bounds and the
relay, driven through C{StringTransport} and C{MemoryReactorClock}.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet import defer, error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    ISSLTransport,
    ITCPTransport,
)
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import directlyProvides, implementer
from zope.interface.verify import verifyObject

from gateway.checkers.functions import CallableChecker
from gateway.connections import Connections, LimitedFactory
from gateway.realm import Realm, make_portal
from gateway.socks.rules import AllowRule
from gateway.socks import server
from gateway.socks.server import SOCKSFactory, SOCKSSettings, is_local, take_places
from gateway.state import ISessionLimits, Lease, LocalSessions, StateUnavailable
from tests.support import FixedChecker

PUBLIC = "93.184.216.34"


@implementer(IHostnameResolver)
class FakeResolver:
    def __init__(self, names):
        self.names = names
        self.asked = []

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None,
                        transportSemantics="TCP"):
        self.asked.append(hostName)

        @implementer(IHostResolution)
        class Resolution:
            name = hostName

        receiver.resolutionBegan(Resolution())
        for address in self.names.get(hostName, ()):
            kind = IPv6Address if ":" in address else IPv4Address
            receiver.addressResolved(kind("TCP", address, portNumber))
        receiver.resolutionComplete()


class Policy:
    def __init__(self, *denied):
        self.denied = set(denied)
        self.queries = []

    def query_resource_access(self, info, resource, privilege):
        self.queries.append((resource, privilege))
        return (resource, privilege) not in self.denied


@implementer(ITCPTransport)
class HalfCloseTransport(StringTransport):
    write_closed = False

    def loseWriteConnection(self):
        self.write_closed = True


def users():
    checker = InMemoryUsernamePasswordDatabaseDontUse()
    checker.addUser("daniel", "tiger")
    return checker


def greeting(*methods):
    return bytes([5, len(methods), *methods])


def userpass(user=b"daniel", password=b"tiger"):
    return bytes([1, len(user)]) + user + bytes([len(password)]) + password


def request(host, port, command=1):
    if isinstance(host, bytes):
        addr = b"\x03" + bytes([len(host)]) + host
    elif ":" in host:
        addr = b"\x04" + socket.inet_pton(socket.AF_INET6, host)
    else:
        addr = b"\x01" + socket.inet_aton(host)
    return bytes([5, command, 0]) + addr + struct.pack("!H", port)


def reply(code, host="0.0.0.0", port=0):
    if ":" in host:
        return bytes([5, code, 0, 4]) + socket.inet_pton(socket.AF_INET6, host) + struct.pack("!H", port)
    return bytes([5, code, 0, 1]) + socket.inet_aton(host) + struct.pack("!H", port)


class SOCKSTestCase(SynchronousTestCase):
    def make(self, checkers=None, acl=None, names=None, groups=None, sessions=None, **settings):
        self.reactor = MemoryReactorClock()
        self.reactor.nameResolver = FakeResolver(names or {})
        realm = Realm(groups=groups) if groups is not None else Realm()
        portal = make_portal(realm, checkers if checkers is not None else [users()])
        self.factory = SOCKSFactory(
            portal, acl, SOCKSSettings(**settings), self.reactor, sessions=sessions
        )

    def limited(self, max_per_peer):
        """The factory as build_socks listens with it: sessions per peer capped."""
        self.factory = LimitedFactory(
            self.factory, Connections().door("socks", max_per_peer), self.reactor
        )

    def connect(self, peer="192.0.2.10"):
        proto = self.factory.buildProtocol(IPv4Address("TCP", peer, 50000))
        transport = HalfCloseTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 1080),
            peerAddress=IPv4Address("TCP", peer, 50000),
        )
        proto.makeConnection(transport)
        self.proto, self.transport = proto, transport
        return proto, transport

    def send(self, data):
        self.transport.clear()
        self.proto.dataReceived(data)
        return self.transport.value()

    def login(self, peer="192.0.2.10"):
        self.connect(peer)
        self.assertEqual(self.send(greeting(0, 2)), b"\x05\x02")
        self.assertEqual(self.send(userpass()), b"\x01\x00")

    def outbound(self, local=("198.51.100.1", 40000)):
        """Complete the last outbound connect; returns (protocol, transport)."""
        host, port, factory, _timeout, _bind = self.reactor.tcpClients[-1]
        kind = IPv6Address if ":" in host else IPv4Address
        proto = factory.buildProtocol(kind("TCP", host, port))
        transport = HalfCloseTransport(
            hostAddress=kind("TCP", *local) if ":" not in host else IPv6Address("TCP", "2001:db8::5", 40000),
            peerAddress=kind("TCP", host, port),
        )
        proto.makeConnection(transport)
        return proto, transport

    def fail_outbound(self, exception):
        _, _, factory, _, _ = self.reactor.tcpClients[-1]
        factory.clientConnectionFailed(self.reactor.connectors[-1], Failure(exception))

    def closed(self):
        return self.transport.disconnecting or not self.transport.connected


class NegotiationTests(SOCKSTestCase):
    def test_userpass_preferred(self):
        self.make(auth_required=False)
        self.connect()
        self.assertEqual(self.send(greeting(0, 2)), b"\x05\x02")

    def test_only_no_auth_refused(self):
        """ssh -D style clients: 05 FF, close, and a reason that says so."""
        self.make()
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.connect()
        self.assertEqual(self.send(greeting(0)), b"\x05\xff")
        self.assertTrue(self.closed())
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertIn("ssh -D", "".join(str(e.get("reason")) for e in events))

    def test_no_methods(self):
        self.make()
        self.connect()
        self.assertEqual(self.send(b"\x05\x00"), b"\x05\xff")
        self.assertTrue(self.closed())

    def test_optional_no_auth(self):
        self.make(auth_required=False)
        self.connect()
        self.assertEqual(self.send(greeting(0)), b"\x05\x00")
        self.send(request(PUBLIC, 443))
        self.assertEqual(self.reactor.tcpClients[-1][:2], (PUBLIC, 443))

    def test_bad_version(self):
        self.make()
        self.connect()
        self.assertEqual(self.send(b"\x04\x01\x00\x50"), b"")
        self.assertTrue(self.closed())

    def test_wrong_password(self):
        self.make()
        self.connect()
        self.send(greeting(2))
        self.assertEqual(self.send(userpass(password=b"lion")), b"\x01\x01")
        self.assertTrue(self.closed())

    def test_empty_password_refused_by_checker(self):
        """proxychains sends PLEN=0: parsed, and the checker says no."""
        self.make()
        self.connect()
        self.send(greeting(2))
        self.assertEqual(self.send(userpass(password=b"")), b"\x01\x01")

    def test_not_utf8(self):
        self.make()
        self.connect()
        self.send(greeting(2))
        self.assertEqual(self.send(userpass(user=b"\xff\xfe")), b"\x01\x01")

    def test_checker_error_fails_closed(self):
        self.make(checkers=[FixedChecker(RuntimeError("db down tiger"))])
        self.connect()
        self.send(greeting(2))
        self.assertEqual(self.send(userpass()), b"\x01\x01")
        self.assertTrue(self.closed())
        self.flushLoggedErrors()

    def test_no_identities_fails_closed(self):
        self.make(checkers=[FixedChecker({"identities": [], "groups": ["g"]})])
        self.connect()
        self.send(greeting(2))
        self.assertEqual(self.send(userpass()), b"\x01\x01")

    def test_merged_handshake(self):
        """Greeting, login, request and early data in one segment (microsocks#105)."""
        self.make()
        self.connect()
        out = self.send(greeting(2) + userpass() + request(PUBLIC, 80) + b"GET / HTTP/1.0\r\n\r\n")
        self.assertEqual(out, b"\x05\x02\x01\x00")
        _proto, transport = self.outbound()
        self.assertEqual(transport.value(), b"GET / HTTP/1.0\r\n\r\n")
        self.assertEqual(self.transport.value()[4:], reply(0, "198.51.100.1", 40000))

    def test_split_handshake(self):
        self.make()
        self.connect()
        data = greeting(2) + userpass() + request(b"example.com", 443)
        self.factory.reactor.nameResolver.names["example.com"] = [PUBLIC]
        out = b""
        for i in range(len(data)):
            self.proto.dataReceived(data[i:i + 1])
        out = self.transport.value()
        self.assertEqual(out, b"\x05\x02\x01\x00")
        self.assertEqual(self.reactor.tcpClients[-1][:2], (PUBLIC, 443))

    def test_negotiation_timeout(self):
        self.make(negotiation_timeout=10)
        self.connect()
        self.send(greeting(2)[:1])
        self.reactor.advance(10)
        self.assertTrue(self.transport.disconnecting or self.transport.connected is False)

    def slow_checker(self, seconds):
        """A checker answering "daniel" after C{seconds} on the test's clock (a throttle wait)."""
        test = self

        class Slow(FixedChecker):
            def requestAvatarId(self, credentials):
                from twisted.internet import task
                return task.deferLater(test.reactor, seconds, lambda: "daniel")

        return Slow("daniel")

    def test_login_does_not_spend_the_negotiation_time(self):
        """
        A login the gateway holds for 12 s (a throttle wait) is not aborted by
        the 10 s negotiation timer: the timer stops while the login runs and
        resumes, with what was left of it, once it is answered.
        """
        self.make(checkers=[self.slow_checker(12)], negotiation_timeout=10)
        self.reactor.advance(0)
        self.connect()
        self.reactor.advance(4)  # the client's own time counts
        self.send(greeting(2) + userpass())
        self.transport.clear()
        self.reactor.advance(12)
        self.assertEqual(self.transport.value(), b"\x01\x00")
        self.assertFalse(self.closed())
        self.reactor.advance(5.9)
        self.assertFalse(self.closed())
        self.reactor.advance(0.1)  # 4 + 6: the negotiation's 10 s are used up
        self.assertTrue(self.closed())
        self.assertEqual(self.proto.reason, "negotiation timeout")

    def test_login_answered_at_once_keeps_the_negotiation_timer(self):
        """A login answered at once (a cached one) leaves the negotiation deadline as it was."""
        self.make(negotiation_timeout=10)
        self.reactor.advance(0)
        self.connect()
        self.reactor.advance(4)
        self.send(greeting(2) + userpass())
        self.assertEqual(self.transport.value(), b"\x05\x02\x01\x00")
        self.reactor.advance(5.9)
        self.assertFalse(self.closed())
        self.reactor.advance(0.1)
        self.assertTrue(self.closed())
        self.assertEqual(self.proto.reason, "negotiation timeout")

    def test_login_timeout(self):
        """A login still running after --socks-login-timeout is cancelled and the session closed."""
        pending = []

        class Stuck(FixedChecker):
            def requestAvatarId(self, credentials):
                return defer.Deferred(canceller=pending.append)

        self.make(checkers=[Stuck("x")], negotiation_timeout=10, login_timeout=30)
        self.connect()
        self.send(greeting(2) + userpass())
        self.reactor.advance(29.9)
        self.assertFalse(self.closed())
        self.reactor.advance(0.1)
        self.assertTrue(self.closed())
        self.assertEqual(len(pending), 1)
        self.assertEqual(self.proto.reason, "login timeout")
        self.assertEqual(self.factory.pending_logins, 0)

    def test_pending_login_cancelled(self):
        pending = []

        class Slow(FixedChecker):
            def requestAvatarId(self, credentials):
                d = defer.Deferred(canceller=pending.append)
                return d

        self.make(checkers=[Slow("x")])
        self.connect()
        self.send(greeting(2) + userpass())
        self.assertEqual(self.factory.pending_logins, 1)
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(len(pending), 1)
        self.assertEqual(self.factory.pending_logins, 0)

    def test_pending_logins_capped(self):
        class Slow(FixedChecker):
            def requestAvatarId(self, credentials):
                return defer.Deferred()

        self.make(checkers=[Slow("x")], max_pending_logins=1)
        self.connect()
        self.send(greeting(2) + userpass())
        first = self.proto
        self.connect()
        self.assertEqual(self.send(greeting(2) + userpass()), b"\x05\x02\x01\x01")
        self.assertTrue(self.closed())
        first.connectionLost(Failure(error.ConnectionDone()))


class PendingLoginShareTests(SOCKSTestCase):
    """Logins in flight per peer and per network: many peers at their share, a clean peer still logs in."""

    def stuck(self):
        class Stuck(FixedChecker):
            def requestAvatarId(self, credentials):
                if credentials.password == b"tiger" or credentials.password == "tiger":
                    return defer.succeed("daniel")
                return defer.Deferred()  # a login parked in the throttle

        return Stuck("x")

    def park(self, peer, n):
        """C{n} logins from C{peer} that stay in flight; return the answers."""
        answers = []
        for _ in range(n):
            self.connect(peer)
            answers.append(self.send(greeting(2) + userpass(password=b"guess")))
        return answers

    def test_peer_share(self):
        self.make(checkers=[self.stuck()])
        self.assertEqual(self.park("192.0.2.1", 5), [b"\x05\x02"] * 4 + [b"\x05\x02\x01\x01"])
        self.assertTrue(self.closed())

    def test_ipv6_peer_is_its_64(self):
        self.make(checkers=[self.stuck()])
        answers = [self.park(f"2001:db8::{i}", 1)[0] for i in range(1, 6)]
        self.assertEqual(answers, [b"\x05\x02"] * 4 + [b"\x05\x02\x01\x01"])

    def test_network_share(self):
        self.make(checkers=[self.stuck()])
        answers = [a for i in range(1, 6) for a in self.park(f"192.0.2.{i}", 4)]
        self.assertEqual(answers, [b"\x05\x02"] * 16 + [b"\x05\x02\x01\x01"] * 4)

    def test_many_peers_at_their_share_a_clean_peer_logs_in(self):
        """
        80 peers in 20 networks, each at its share (320 logins in flight):
        before, 256 logins in flight from ~52 peers refused everyone.
        """
        self.make(checkers=[self.stuck()])
        for n in range(20):
            for i in range(1, 5):
                self.park(f"10.{n}.0.{i}", 4)
        self.assertEqual(self.factory.pending_logins, 20 * 16)
        self.connect("198.51.100.7")
        self.assertEqual(self.send(greeting(2) + userpass()), b"\x05\x02\x01\x00")

    def test_share_released(self):
        self.make(checkers=[self.stuck()])
        self.park("192.0.2.1", 4)
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.park("192.0.2.1", 1), [b"\x05\x02"])
        self.assertTrue(self.factory.pending_by_peer)


class SessionLogFloodTests(SOCKSTestCase):
    """
    Sessions that never authenticated are logged once a minute per peer: 2000
    connect, C{05 01 00}, close loops from one peer used to add ~1300 lines.
    Authenticated sessions keep one line each.
    """

    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def sessions(self):
        return [e for e in self.events if e.get("log_format", "").startswith("socks session")]

    def test_unauthenticated_sessions_rate_limited(self):
        self.make()
        for _ in range(2000):
            self.connect("192.0.2.1")
            self.send(b"\x05\x01\x00")
            self.proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(len(self.sessions()), 1)
        self.connect("2001:db8::1")  # another peer: its own line
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(len(self.sessions()), 2)
        self.reactor.advance(60)
        self.connect("192.0.2.1")
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        [*_, last] = self.sessions()
        self.assertEqual(last["suppressed"], 1999)
        self.assertIn("(1999 more like it not logged)", formatEvent(last))

    def test_failed_logins_rate_limited(self):
        self.make()
        for _ in range(20):
            self.connect("192.0.2.1")
            self.send(greeting(2) + userpass(password=b"wrong"))
            self.proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(len(self.sessions()), 1)

    def test_authenticated_sessions_one_line_each(self):
        self.make()
        for _ in range(20):
            self.login("192.0.2.1")
            self.proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(len(self.sessions()), 20)
        self.assertEqual({e["identity"] for e in self.sessions()}, {"daniel"})


class SeedCheckerTests(SOCKSTestCase):
    """The seed's Lua examples as Python checkers."""

    def test_inline_password_table(self):
        def auth(username, password, conn_meta):
            password_database = {"proxyuser": "secretpassword"}
            if password == "":
                return False
            return password_database.get(username) == password

        self.make(checkers=[CallableChecker(auth)])
        self.connect()
        self.send(greeting(2))
        self.assertEqual(self.send(userpass(b"proxyuser", b"secretpassword")), b"\x01\x00")
        self.assertEqual(self.proto.info.identities[0].context.value, "ProxyAuthRfc1929")
        self.connect()
        self.send(greeting(2))
        self.assertEqual(self.send(userpass(b"proxyuser", b"")), b"\x01\x01")

    def test_auth_info_with_groups(self):
        database = {"proxyuser": {"password": "secretpassword",
                                  "groups": ["proxy-users", "premium-tier"]}}

        def auth(username, password, conn_meta):
            entry = database.get(username)
            if not entry or entry["password"] != password:
                return False
            return {"identities": [{"identity": username, "context": "ProxyAuthRfc1929"}],
                    "groups": entry["groups"]}

        self.make(checkers=[CallableChecker(auth)])
        self.connect()
        self.send(greeting(2))
        self.assertEqual(self.send(userpass(b"proxyuser", b"secretpassword")), b"\x01\x00")
        self.assertEqual(self.proto.info.groups, ("proxy-users", "premium-tier"))
        self.assertEqual(self.proto.info.peer_address, "192.0.2.10")


class ReplyTests(SOCKSTestCase):
    def setUp(self):
        self.make(names={"example.com": [PUBLIC], "v6.example": ["2606:4700::1111"],
                         "rebind.example": [PUBLIC, "127.0.0.1"]})

    def test_connect_ipv4(self):
        self.login()
        self.assertEqual(self.send(request(PUBLIC, 443)), b"")
        host, port, _, timeout, bind = self.reactor.tcpClients[-1]
        self.assertEqual((host, port, timeout, bind), (PUBLIC, 443, 15.0, None))
        proto, remote = self.outbound()
        self.assertEqual(self.transport.value(), reply(0, "198.51.100.1", 40000))
        self.send(b"ping")
        self.assertEqual(remote.value(), b"ping")
        proto.dataReceived(b"pong")
        self.assertEqual(self.transport.value(), b"pong")
        self.assertIs(self.transport.producer, remote)
        self.assertIs(remote.producer, self.transport)

    def test_connect_ipv6(self):
        self.login()
        self.send(request("2606:4700::1111", 443))
        self.assertEqual(self.reactor.tcpClients[-1][:2], ("2606:4700::1111", 443))
        self.outbound()
        self.assertEqual(self.transport.value(), reply(0, "2001:db8::5", 40000))

    def test_connect_name(self):
        self.login()
        self.send(request(b"example.com", 443))
        self.assertEqual(self.reactor.tcpClients[-1][:2], (PUBLIC, 443))

    def test_not_allowed_private(self):
        for host in ("127.0.0.1", "10.1.2.3", "169.254.169.254", "::1", "::ffff:192.168.0.1"):
            self.login()
            self.assertEqual(self.send(request(host, 80)), reply(2), host)
            self.assertTrue(self.closed())
        self.assertEqual(self.reactor.tcpClients, [])

    def test_not_allowed_port_25(self):
        self.login()
        self.assertEqual(self.send(request(PUBLIC, 25)), reply(2))

    def test_not_allowed_rebinding(self):
        self.login()
        self.assertEqual(self.send(request(b"rebind.example", 80)), reply(2))
        self.assertEqual(self.reactor.tcpClients, [])

    def test_name_as_address_checked(self):
        self.login()
        self.assertEqual(self.send(request(b"127.0.0.1", 80)), reply(2))

    def test_dns_failure(self):
        self.login()
        self.assertEqual(self.send(request(b"nowhere.example", 80)), reply(4))

    def test_connect_errors(self):
        cases = [
            (error.NoRouteError(), 3),
            (error.ConnectError(osError=113, string="no route to host"), 4),
            (error.ConnectionRefusedError(), 5),
            (error.TimeoutError(), 6),
            (error.ConnectError(string="other"), 1),
        ]
        for exception, code in cases:
            self.login()
            self.send(request(PUBLIC, 443))
            self.fail_outbound(exception)
            self.assertEqual(self.transport.value(), reply(code), exception)
            self.assertTrue(self.closed())

    def test_udp_associate(self):
        self.login()
        self.assertEqual(self.send(request(PUBLIC, 53, command=3)), reply(7))
        self.assertTrue(self.closed())

    def test_unknown_command(self):
        self.login()
        self.assertEqual(self.send(request(PUBLIC, 53, command=9)), reply(7))

    def test_address_type(self):
        self.login()
        self.assertEqual(self.send(b"\x05\x01\x00\x05"), reply(8))
        self.assertTrue(self.closed())

    def test_malformed_request(self):
        self.login()
        self.assertEqual(self.send(b"\x05\x01\x07\x01\x01\x02\x03\x04\x00\x50"), reply(1))

    def test_own_host(self):
        """An address of the gateway's host (seen after connecting) is refused."""
        self.login()
        self.send(request(PUBLIC, 8080))
        _, remote = self.outbound(local=(PUBLIC, 40000))
        self.assertEqual(self.transport.value(), reply(2))
        self.assertTrue(remote.disconnecting)

    def test_client_leaves_while_connecting(self):
        self.login()
        self.send(request(PUBLIC, 443))
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(self.reactor.connectors[-1].stoppedConnecting)


class OwnOutboundTests(SOCKSTestCase):
    """The relay's outbound connections are known to the core while they are open."""

    def test_registered_while_open(self):
        self.make()
        connections = Connections()
        self.factory.connections = connections
        self.login()
        self.send(request(PUBLIC, 443))
        proto, remote = self.outbound(local=("127.0.0.1", 40001))
        accepted = IPv6Address("TCP", "::ffff:127.0.0.1", 40001)  # a dual-stack listener's view
        self.assertTrue(connections.is_own_outbound(accepted))
        self.assertFalse(connections.is_own_outbound(IPv4Address("TCP", "127.0.0.1", 40002)))
        proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertFalse(connections.is_own_outbound(accepted))
        self.assertEqual(dict(connections.own_outbound), {})


class AllowAndACLTests(SOCKSTestCase):
    def test_socks_allow(self):
        self.make(allow=(AllowRule.parse("10.0.0.0/8:443"),))
        self.login()
        self.send(request("10.1.2.3", 443))
        self.assertEqual(self.reactor.tcpClients[-1][:2], ("10.1.2.3", 443))

    def test_acl_denies(self):
        acl = Policy((f"socks/destination/{PUBLIC}/443", "connect"))
        self.make(acl=acl, names={"example.com": [PUBLIC]})
        self.login()
        self.assertEqual(self.send(request(b"Example.COM", 443)), reply(2))
        self.assertEqual(acl.queries, [("socks/destination/example.com/443", "connect"),
                                       (f"socks/destination/{PUBLIC}/443", "connect")])

    def test_acl_by_name(self):
        acl = Policy(("socks/destination/example.com/443", "connect"))
        self.make(acl=acl, names={"example.com": [PUBLIC]})
        self.login()
        self.assertEqual(self.send(request(b"example.com", 443)), reply(2))
        self.assertEqual(self.reactor.nameResolver.asked, [])  # refused before resolving

    def test_unauthenticated_with_acl(self):
        """--socks-auth optional with an ACL: the ACL decides for anonymous sessions too."""
        acl = Policy((f"socks/destination/{PUBLIC}/443", "connect"))
        self.make(acl=acl, auth_required=False)
        self.connect()
        self.send(greeting(0))
        self.assertEqual(self.send(request(PUBLIC, 443)), reply(2))


class BindTests(SOCKSTestCase):
    """KumoMTA's egress source: BIND with the source address, then CONNECT."""

    def test_bind_then_connect(self):
        self.make(acl=Policy())
        self.login()
        self.assertEqual(self.send(request("127.0.0.1", 0, command=2)), reply(0, "127.0.0.1", 0))
        self.send(request(PUBLIC, 443))
        self.assertEqual(self.reactor.tcpClients[-1][4], ("127.0.0.1", 0))
        self.outbound()
        self.assertEqual(self.transport.value()[-10:], reply(0, "198.51.100.1", 40000))

    def test_bind_without_acl(self):
        """Only an ACL grant lets a client choose the source address."""
        self.make()
        self.login()
        self.assertEqual(self.send(request("127.0.0.1", 0, command=2)), reply(2))

    def test_bind_twice(self):
        self.make(acl=Policy())
        self.login()
        self.send(request("127.0.0.1", 0, command=2))
        self.assertEqual(self.send(request("127.0.0.1", 0, command=2)), reply(1))

    def test_bind_name(self):
        self.make(acl=Policy())
        self.login()
        self.assertEqual(self.send(request(b"localhost", 0, command=2)), reply(8))

    def test_bind_not_local(self):
        self.make(acl=Policy())
        self.login()
        self.assertEqual(self.send(request("192.0.2.200", 0, command=2)), reply(1))

    def test_bind_acl(self):
        acl = Policy(("socks/source/127.0.0.1", "bind"))
        self.make(acl=acl)
        self.login()
        self.assertEqual(self.send(request("127.0.0.1", 0, command=2)), reply(2))

    def test_bind_unauthenticated(self):
        self.make(auth_required=False, acl=Policy())
        self.connect()
        self.send(greeting(0))
        self.assertEqual(self.send(request("127.0.0.1", 0, command=2)), reply(2))

    def test_bind_family(self):
        self.make(acl=Policy())
        self.login()
        self.send(request("127.0.0.1", 0, command=2))
        self.assertEqual(self.send(request("2606:4700::1111", 443)), reply(8))


class RelayTests(SOCKSTestCase):
    def setUp(self):
        self.make(idle_timeout=30)
        self.login()
        self.send(request(PUBLIC, 443))
        self.remote_proto, self.remote = self.outbound()

    def test_half_close_client(self):
        self.proto.readConnectionLost()
        self.assertTrue(self.remote.write_closed)
        self.assertFalse(self.closed())
        self.remote_proto.dataReceived(b"late answer")
        self.assertIn(b"late answer", self.transport.value())
        self.remote_proto.readConnectionLost()
        self.assertTrue(self.closed())

    def test_half_close_remote(self):
        self.remote_proto.readConnectionLost()
        self.assertTrue(self.transport.write_closed)
        self.send(b"more")
        self.assertEqual(self.remote.value(), b"more")

    def test_remote_closes(self):
        self.remote_proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(self.closed())

    def test_client_closes(self):
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(self.remote.disconnecting)

    def test_idle_timeout(self):
        self.reactor.advance(20)
        self.send(b"x")
        self.reactor.advance(20)
        self.assertFalse(self.closed())
        self.reactor.advance(31)
        self.assertTrue(self.closed())

    def test_session_event(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.send(b"12345")
        self.remote_proto.dataReceived(b"123")
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        [event] = [e for e in events if e.get("log_format", "").startswith("socks session")]
        self.assertEqual((event["up"], event["down"], event["reply"], event["command"]),
                         (5, 3, 0, "CONNECT"))
        self.assertEqual(event["destination"], f"{PUBLIC}:443")
        self.assertNotIn("tiger", repr(events))


class BoundsTests(SOCKSTestCase):
    def test_sessions_per_peer(self):
        self.make()
        self.limited(2)
        self.connect()
        self.connect()
        self.assertIsNone(self.factory.buildProtocol(IPv4Address("TCP", "192.0.2.10", 1)))
        self.assertIsNotNone(self.factory.buildProtocol(IPv4Address("TCP", "192.0.2.11", 1)))
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertIsNotNone(self.factory.buildProtocol(IPv4Address("TCP", "192.0.2.10", 1)))

    def test_sessions_per_user(self):
        self.make(max_sessions_per_user=1)
        self.login(peer="192.0.2.10")
        first = self.proto
        self.connect(peer="192.0.2.11")
        self.send(greeting(2))
        self.assertEqual(self.send(userpass()), b"\x01\x01")
        first.connectionLost(Failure(error.ConnectionDone()))
        self.login(peer="192.0.2.12")

    def test_garbage(self):
        self.make()
        self.connect()
        self.send(b"\x05\x02\x02\x00")
        self.assertEqual(self.send(b"\x02" * 600), b"")
        self.assertTrue(self.closed())





@implementer(ISessionLimits)
class FakeSessions:
    """An ISessionLimits whose answers the test gives: each acquire waits."""

    def __init__(self):
        self.asked = []  # (scope, key, limit, Deferred)
        self.held = []  # (scope, key) of leases not released

    def acquire(self, scope, key, limit):
        d = defer.Deferred()
        self.asked.append((scope, key, limit, d))
        return d

    def grant(self, index):
        scope, key, _, d = self.asked[index]
        name = (scope, key)
        self.held.append(name)
        d.callback(Lease(lambda: self.held.remove(name)))

    def grant_all(self):
        for index, (_, _, _, d) in enumerate(self.asked):
            if not d.called:
                self.grant(index)


class SessionPlacesTests(SOCKSTestCase):
    """Sessions per user and per peer as places in an ISessionLimits (core.state.sessions)."""

    def setUp(self):
        self.sessions = FakeSessions()
        self.make(sessions=self.sessions, max_sessions_per_user=3, max_sessions_per_peer=2)

    def start(self, peer="192.0.2.10"):
        self.connect(peer)
        self.send(greeting(2))
        return self.send(userpass())

    def test_both_places_asked_before_the_reply(self):
        self.assertEqual(self.start(), b"")
        self.assertEqual([a[:3] for a in self.sessions.asked],
                         [("socks-user", "daniel", 3), ("socks-peer", "192.0.2.10", 2)])
        self.sessions.grant(0)
        self.assertEqual(self.transport.value(), b"")
        self.sessions.grant(1)
        self.assertEqual(self.transport.value(), b"\x01\x00")
        self.assertFalse(self.closed())
        self.assertEqual(self.factory.pending_logins, 0)

    def test_ipv6_peer_by_64(self):
        proto = self.factory.buildProtocol(IPv6Address("TCP", "2001:db8:1:2::7", 50000))
        transport = HalfCloseTransport(
            hostAddress=IPv6Address("TCP", "::1", 1080),
            peerAddress=IPv6Address("TCP", "2001:db8:1:2::7", 50000),
        )
        proto.makeConnection(transport)
        proto.dataReceived(greeting(2) + userpass())
        self.assertEqual(self.sessions.asked[1][:2], ("socks-peer", "2001:db8:1:2::/64"))

    def test_released_when_the_session_ends(self):
        self.start()
        self.sessions.grant_all()
        self.send(request(PUBLIC, 443))
        self.outbound()
        self.assertEqual(len(self.sessions.held), 2)
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.sessions.held, [])

    def test_released_on_connect_failure(self):
        self.start()
        self.sessions.grant_all()
        self.send(request(PUBLIC, 443))
        self.fail_outbound(error.ConnectionRefusedError())
        self.assertTrue(self.closed())
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.sessions.held, [])

    def test_released_on_negotiation_timeout_after_login(self):
        self.start()
        self.sessions.grant_all()
        self.reactor.advance(SOCKSSettings().negotiation_timeout)
        self.assertEqual(self.proto.reason, "negotiation timeout")
        self.proto.connectionLost(Failure(error.ConnectionLost()))
        self.assertEqual(self.sessions.held, [])

    def test_released_on_drain(self):
        self.start()
        self.sessions.grant_all()
        self.proto.drain()
        self.assertTrue(self.closed())
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.sessions.held, [])

    def test_client_leaves_while_pending(self):
        """A place granted after the client left is given back at once; no reply, no log of success."""
        self.start()
        self.sessions.grant(0)
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.sessions.held, [])  # the user's place came back already
        self.sessions.grant(1)
        self.assertEqual(self.sessions.held, [])
        self.assertEqual(self.transport.value(), b"")
        self.assertIsNone(self.proto.info)
        self.assertEqual(self.factory.pending_logins, 0)

    def test_login_timeout_while_pending(self):
        self.start()
        self.reactor.advance(SOCKSSettings().login_timeout)
        self.assertEqual(self.proto.reason, "login timeout")
        self.assertTrue(self.closed())
        self.proto.connectionLost(Failure(error.ConnectionAborted()))
        self.sessions.grant_all()
        self.assertEqual(self.sessions.held, [])

    def refused_reason(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        return [e["reason"] for e in events if e.get("log_format", "").startswith("socks session")]

    def test_user_full(self):
        self.start()
        self.sessions.asked[0][3].callback(None)
        self.sessions.grant(1)
        self.assertEqual(self.transport.value(), b"\x01\x01")
        self.assertTrue(self.closed())
        self.assertEqual(self.sessions.held, [])  # the peer's place given back
        self.assertEqual(self.refused_reason(), ["too many sessions for 'daniel'"])

    def test_peer_full(self):
        self.start()
        self.sessions.grant(0)
        self.sessions.asked[1][3].callback(None)
        self.assertEqual(self.transport.value(), b"\x01\x01")
        self.assertEqual(self.sessions.held, [])
        self.assertEqual(self.refused_reason(), ["too many sessions from this address"])

    def test_state_unavailable(self):
        """--state-failure closed and Redis unreachable: RFC 1929 failure, close, a temporary refusal."""
        self.start()
        self.sessions.grant(0)
        self.sessions.asked[1][3].errback(StateUnavailable())
        self.assertEqual(self.transport.value(), b"\x01\x01")
        self.assertTrue(self.closed())
        self.assertEqual(self.sessions.held, [])
        [reason] = self.refused_reason()
        self.assertIn("temporarily refused", reason)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_refusals_logged_once_a_minute_per_peer(self):
        """Refused sessions never authenticated: their log lines are rate-limited like other floods."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for _ in range(3):
            self.start()
            self.sessions.grant(len(self.sessions.asked) - 2)
            self.sessions.asked[-1][3].errback(StateUnavailable())
            self.proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(len([e for e in events if e.get("log_format", "").startswith("socks session")]), 1)

    def test_backend_bug_refuses_this_session(self):
        class Broken(FakeSessions):
            def acquire(self, scope, key, limit):
                raise RuntimeError("bug")

        self.make(sessions=Broken())
        self.start()
        self.assertEqual(self.transport.value(), b"\x01\x01")
        self.assertTrue(self.closed())
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)


class AnonymousPlacesTests(SOCKSTestCase):
    """
    --socks-auth optional: an anonymous session takes its peer's place (no
    user's) before 05 00, in the same count as logged-in sessions.
    """

    def setUp(self):
        self.sessions = FakeSessions()
        self.make(sessions=self.sessions, auth_required=False, max_sessions_per_peer=2)

    def start(self, peer="192.0.2.10", then=b""):
        self.connect(peer)
        return self.send(greeting(0) + then)

    def session_reasons(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        return [e["reason"] for e in events if e.get("log_format", "").startswith("socks session")]

    def test_peer_place_before_the_method(self):
        self.assertEqual(self.start(then=request(PUBLIC, 443)), b"")
        self.assertEqual([a[:3] for a in self.sessions.asked], [("socks-peer", "192.0.2.10", 2)])
        self.assertTrue(self.transport.producerState == "paused")
        self.assertEqual(self.reactor.tcpClients, [])
        self.sessions.grant(0)
        self.assertEqual(self.transport.value(), b"\x05\x00")
        self.assertEqual(self.reactor.tcpClients[-1][:2], (PUBLIC, 443))  # the early request
        self.assertFalse(self.proto.info.is_authenticated())
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.sessions.held, [])

    def test_peer_full(self):
        """RFC 1928 has one refusal for a greeting: 05 FF, and the client must close."""
        self.start()
        self.sessions.asked[0][3].callback(None)
        self.assertEqual(self.transport.value(), b"\x05\xff")
        self.assertTrue(self.closed())
        self.assertIsNone(self.proto.info)
        self.assertEqual(self.session_reasons(), ["too many sessions from this address"])

    def test_state_unavailable(self):
        self.start()
        self.sessions.asked[0][3].errback(StateUnavailable())
        self.assertEqual(self.transport.value(), b"\x05\xff")
        self.assertTrue(self.closed())
        [reason] = self.session_reasons()
        self.assertIn("temporarily refused", reason)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_backend_bug_refuses_this_session(self):
        class Broken(FakeSessions):
            def acquire(self, scope, key, limit):
                raise RuntimeError("bug")

        self.make(sessions=Broken(), auth_required=False)
        self.assertEqual(self.start(), b"\x05\xff")
        self.assertTrue(self.closed())
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_client_leaves_while_pending(self):
        self.start()
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        self.sessions.grant(0)
        self.assertEqual(self.sessions.held, [])
        self.assertEqual(self.transport.value(), b"")

    def test_negotiation_timeout_while_pending(self):
        self.start()
        self.reactor.advance(SOCKSSettings().negotiation_timeout)
        self.assertEqual(self.proto.reason, "negotiation timeout")
        self.proto.connectionLost(Failure(error.ConnectionAborted()))
        self.sessions.grant_all()
        self.assertEqual(self.sessions.held, [])

    def test_released_on_drain(self):
        self.start()
        self.sessions.grant(0)
        self.proto.drain()
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.sessions.held, [])

    def test_shared_with_logins(self):
        """One count per peer: anonymous and logged-in sessions together (LocalSessions)."""
        self.make(sessions=LocalSessions(), auth_required=False, max_sessions_per_peer=2)
        self.login()
        first = self.proto
        self.assertEqual(self.start(), b"\x05\x00")
        self.assertEqual(self.start(), b"\x05\xff")
        self.connect()
        self.send(greeting(2))
        self.assertEqual(self.send(userpass()), b"\x01\x01")
        self.assertEqual(self.start(peer="192.0.2.11"), b"\x05\x00")  # another address
        first.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.start(), b"\x05\x00")


class TakePlacesTests(SynchronousTestCase):
    wanted = [("socks-user", "u", 1), ("socks-peer", "p", 1)]

    def test_local_sessions(self):
        sessions = LocalSessions()
        verifyObject(ISessionLimits, sessions)
        leases = self.successResultOf(take_places(sessions, self.wanted))
        self.assertEqual(len(leases), 2)
        self.failureResultOf(take_places(sessions, self.wanted))
        self.assertEqual(sum(sessions.counts.values()), 2)  # the refusal kept nothing
        for lease in leases:
            lease.release()
            lease.release()
        self.assertEqual(sessions.counts, {})
        self.successResultOf(take_places(sessions, self.wanted))

    def test_cancel_gives_back_what_was_granted(self):
        sessions = FakeSessions()
        d = take_places(sessions, self.wanted)
        sessions.grant(0)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(sessions.held, [])
        sessions.grant(1)
        self.assertEqual(sessions.held, [])

    def test_nothing_wanted(self):
        self.assertEqual(self.successResultOf(take_places(FakeSessions(), [])), [])


class LocalSessionLimitTests(SOCKSTestCase):
    """Today's behaviour through LocalSessions: also per peer at login, one count per factory's sessions."""

    def test_peer_limit_at_login(self):
        self.make(max_sessions_per_peer=1)
        self.login()
        first = self.proto
        self.connect()
        self.send(greeting(2))
        self.assertEqual(self.send(userpass()), b"\x01\x01")
        self.assertEqual(self.proto.reason, "too many sessions from this address")
        first.connectionLost(Failure(error.ConnectionDone()))
        self.login()

    def test_door_counts_in_the_core_state(self):
        from gateway import tap
        from gateway.socks.server import SOCKSDoor

        options = tap.Options()
        options.parseOptions(["--data-dir", self.mktemp(), "--auth", "memory:a:b"])
        core = tap.build_core(options["coreSettings"], MemoryReactorClock())
        door = SOCKSDoor(core, options["socksSettings"])
        door.listen(None, "socks", None)
        door.listen(None, "socks-tls", None)
        self.assertEqual([f.sessions for f in door.factories], [core.state.sessions] * 2)

    def test_shared_between_factories(self):
        """Both SOCKS listeners (plain and TLS) count in the one State's sessions."""
        sessions = LocalSessions()
        self.make(sessions=sessions, max_sessions_per_user=1)
        self.login()
        self.make(sessions=sessions, max_sessions_per_user=1)
        self.connect(peer="192.0.2.11")
        self.send(greeting(2))
        self.assertEqual(self.send(userpass()), b"\x01\x01")


class ReviewFixTests(SOCKSTestCase):
    """Paths an independent review found open."""

    def test_pipelined_connect_cancellable(self):
        """Greeting, login and CONNECT in one segment, then the client leaves: the connect stops."""
        self.make()
        self.connect()
        self.send(greeting(2) + userpass() + request(PUBLIC, 443))
        self.assertIsNotNone(self.proto._pending)
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(self.reactor.connectors[-1].stoppedConnecting)

    def test_connect_timeout_is_06(self):
        """The negotiation timer stops at the request; the connect timer answers 06."""
        self.make(negotiation_timeout=10, connect_timeout=15)
        self.login()
        self.send(request(PUBLIC, 443))
        self.reactor.advance(12)
        self.assertEqual(self.transport.value(), b"")
        self.assertFalse(self.closed())
        self.reactor.advance(4)
        self.assertEqual(self.transport.value(), reply(6))
        self.assertTrue(self.reactor.connectors[-1].stoppedConnecting)
        self.assertEqual(len(self.reactor.tcpClients), 1)  # no second attempt

    def test_resolution_timeout_is_06(self):
        class Silent:
            def resolveHostName(self, receiver, *args, **kwargs):
                pass  # never answers

        self.make(connect_timeout=15)
        self.reactor.nameResolver = Silent()
        self.login()
        self.send(request(b"slow.example", 443))
        self.reactor.advance(15)
        self.assertEqual(self.transport.value(), reply(6))
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual([e["reason"] for e in events if "reason" in e], ["connect timeout"])

    def test_names_made_canonical(self):
        acl = Policy(("socks/destination/example.com/443", "connect"))
        self.make(acl=acl, names={"example.com": [PUBLIC]})
        self.login()
        self.assertEqual(self.send(request(b"EXAMPLE.com.", 443)), reply(2))
        self.assertEqual(acl.queries[-1], ("socks/destination/example.com/443", "connect"))
        for name in (b"x/443", b"a b", b"fe80::1%lo", b"*.example.com", b"a..b"):
            self.login()
            self.assertEqual(self.send(request(name, 22)), reply(1), name)

    def test_ipv4_mapped_is_ipv4(self):
        acl = Policy((f"socks/destination/{PUBLIC}/443", "connect"))
        self.make(acl=acl)
        self.login()
        self.assertEqual(self.send(request(f"::ffff:{PUBLIC}", 443)), reply(2))
        self.make()
        self.login()
        self.send(request(f"::ffff:{PUBLIC}", 443))
        self.assertEqual(self.reactor.tcpClients[-1][:2], (PUBLIC, 443))

    def test_tls_half_close_is_a_close(self):
        """TLS has no half-close: the end of the client's input closes the tunnel's other side."""
        self.make()
        self.login()
        self.send(request(PUBLIC, 443))
        _remote_proto, remote = self.outbound()
        directlyProvides(remote, ISSLTransport)
        self.proto.readConnectionLost()
        self.assertTrue(remote.disconnecting)
        self.assertFalse(remote.write_closed)

    def test_outbound_aborted_after_grace(self):
        """A destination that never reads cannot hold the tunnel after the client left."""
        self.make(close_grace=10)
        self.login()
        self.send(request(PUBLIC, 443))
        _, remote = self.outbound()
        remote.abortConnection = lambda: setattr(remote, "aborted", True)
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(remote.disconnecting)
        self.reactor.advance(10)
        self.assertTrue(getattr(remote, "aborted", False))

    def test_peers_counted_by_prefix(self):
        """IPv6 peers count per /64, and a mapped IPv4 peer as itself."""
        self.make()
        self.limited(1)
        first = self.factory.buildProtocol(IPv6Address("TCP", "2001:db8::1", 1))
        first.makeConnection(HalfCloseTransport(peerAddress=IPv6Address("TCP", "2001:db8::1", 1)))
        self.assertIsNone(self.factory.buildProtocol(IPv6Address("TCP", "2001:db8::2", 1)))
        self.connect(peer="192.0.2.10")
        self.assertIsNone(self.factory.buildProtocol(IPv6Address("TCP", "::ffff:192.0.2.10", 1)))


class SpecialDestinationTests(SOCKSTestCase):
    """Issue 11 item 9: special-purpose addresses and names libc reads as addresses."""

    def test_name_rule_never_opens_special_addresses(self):
        """A DNS answer under an allowed name cannot reach metadata or loopback in disguise."""
        names = {
            "imds.corp.example": ["fd00:ec2::254"],
            "ali.corp.example": ["100.100.100.200"],
            "azure.corp.example": ["168.63.129.16"],
            "oracle.corp.example": ["192.0.0.192"],
            "compat.corp.example": ["::7f00:1"],
            "teredo.corp.example": ["2001:0:5db8:d822::5601:ff00"],  # client 169.254.0.255
            "nat64.corp.example": ["64:ff9b:1::a9fe:a9fe"],
            "siit.corp.example": ["::ffff:0:7f00:1"],
            "scoped.corp.example": ["fe80::1%eth0"],
        }
        self.make(allow=(AllowRule.parse(".corp.example"),), names=names)
        for name in names:
            self.login()
            self.assertEqual(self.send(request(name.encode(), 80)), reply(2), name)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_cidr_rule_opens_metadata(self):
        """An operator who really wants one names it with a CIDR."""
        self.make(allow=(AllowRule.parse("[fd00:ec2::254]:80"), AllowRule.parse(".corp.example")),
                  names={"imds.corp.example": ["fd00:ec2::254"]})
        self.login()
        self.send(request(b"imds.corp.example", 80))
        self.assertEqual(self.reactor.tcpClients[-1][:2], ("fd00:ec2::254", 80))

    def test_azure_wire_server_refused_by_default(self):
        self.make()
        self.login()
        self.assertEqual(self.send(request("168.63.129.16", 80)), reply(2))
        self.assertEqual(self.reactor.tcpClients, [])

    def test_libc_literal_names_are_addresses(self):
        """getaddrinfo reads 127.1, 2130706433, 0x7f.1, 0177.0.0.1 and 0 as IPv4: so do we."""
        self.make(names={})
        for name in (b"127.1", b"2130706433", b"0x7f.1", b"0X7F000001", b"0177.0.0.1", b"0",
                     b"0.0"):
            self.login()
            self.assertEqual(self.send(request(name, 80)), reply(2), name)
        self.assertEqual(self.reactor.nameResolver.asked, [])
        self.assertEqual(self.reactor.tcpClients, [])

    def test_libc_literal_checked_as_that_address(self):
        """The ACL sees the address, and the connection goes to it without a lookup."""
        acl = Policy()
        self.make(acl=acl, allow=(AllowRule.parse("10.0.0.0/8:443"),))
        self.login()
        self.send(request(b"167772165", 443))  # 10.0.0.5
        self.assertEqual(self.reactor.tcpClients[-1][:2], ("10.0.0.5", 443))
        self.assertEqual(acl.queries, [("socks/destination/10.0.0.5/443", "connect")])
        self.assertEqual(self.reactor.nameResolver.asked, [])

    def test_literal_with_final_dot_or_zone(self):
        """Neither a host name nor an address: 01, never resolved."""
        self.make(names={"127.0.0.1": ["127.0.0.1"]})
        for name in (b"127.0.0.1.", b"2130706433.", b"fe80::1%eth0", b"::1%lo", b"[::1]"):
            self.login()
            self.assertEqual(self.send(request(name, 80)), reply(1), name)
        self.assertEqual(self.reactor.nameResolver.asked, [])


PORT_ACL = """
[[acl."socks/destination"]]
allow = true
privileges = ["connect"]
identity.Authenticated = {}

[[acl."socks/source/127.0.0.1"]]
allow = true
privileges = ["*"]
identity.Authenticated = {}

[[acl."socks/source/127.0.0.1/*"]]
allow = true
privileges = ["bind"]
identity.Authenticated = {}

[[acl."socks/source/*/25"]]
allow = true
privileges = ["bind"]
identity.Authenticated = {}

[[acl."socks/source/127.0.0.1/587"]]
allow = true
privileges = ["bind"]
identity.Group = "nobody"

[[acl."socks/source/127.0.0.1/465"]]
allow = false
privileges = ["bind"]
identity.Authenticated = {}

[[acl."socks/source/*/465"]]
allow = true
privileges = ["bind"]
identity.Authenticated = {}
"""


class BindPortTests(SOCKSTestCase):
    """Issue 11 item 9: BIND does not hand out privileged source ports."""

    def bind(self, port, host="127.0.0.1"):
        self.login()
        return self.send(request(host, port, command=2))

    def test_privileged_refused_with_an_address_grant(self):
        self.make(acl=Policy())  # allows every resource, names no port
        for port in (1, 22, 25, 80, 1023):
            self.assertEqual(self.bind(port), reply(2), port)
        self.assertEqual(self.bind(0), reply(0, "127.0.0.1", 0))
        self.assertEqual(self.bind(1024), reply(0, "127.0.0.1", 1024))

    def test_privileged_needs_a_rule_naming_the_port(self):
        from gateway.acl import parse_acl

        self.make(acl=parse_acl(PORT_ACL))
        self.assertEqual(self.bind(25), reply(0, "127.0.0.1", 25))  # socks/source/*/25
        self.assertEqual(self.bind(80), reply(2))  # the address grant and a "*" port do not count
        self.assertEqual(self.bind(587), reply(2))  # named, but for someone else
        self.assertEqual(self.bind(465), reply(2))  # the exact key denies first
        self.assertEqual(self.bind(2525), reply(0, "127.0.0.1", 2525))
        self.send(request(PUBLIC, 443))
        self.assertEqual(self.reactor.tcpClients[-1][4], ("127.0.0.1", 2525))

    def test_privileged_port_without_address_grant(self):
        """Naming the port is not enough: the address grant is still needed."""
        from gateway.acl import parse_acl

        acl = parse_acl('[[acl."socks/source/*/25"]]\nallow = true\nprivileges = ["bind"]\n'
                        "identity.Authenticated = {}\n")
        self.make(acl=acl)
        self.assertEqual(self.bind(25), reply(2))


class LibcAgreementTests(SynchronousTestCase):
    """What getaddrinfo reads as an IP literal never passes as a host name."""

    @staticmethod
    def numeric(text):
        try:
            found = socket.getaddrinfo(text, 80, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
        except (socket.gaierror, UnicodeError, ValueError):
            return None
        return found[0][4][0]

    def check(self, text):
        from gateway.socks.server import canonical_name, plain_address

        literal = self.numeric(text)
        if literal is not None and "%" not in text:
            address = plain_address(text)
            self.assertIsNotNone(address, text)
            self.assertEqual(str(address), str(plain_address(literal)), text)
        name = canonical_name(text)
        if name is not None:
            self.assertIsNone(self.numeric(name), text)
            self.assertIsNone(self.numeric(name + "."), text)

    def test_examples(self):
        for text in ("127.1", "2130706433", "0x7f.1", "0177.0.0.1", "0", "0x", "1.2.3", "1..2",
                     "0xffffffff", "00000000000000000001", "127.0.0.1.", "example.com", "0e1"):
            self.check(text)

    @given(st.text(alphabet="0123456789abcdefxX.", max_size=24))
    @settings(max_examples=500, deadline=None)
    def test_numeric_alphabet(self, text):
        self.check(text)


class IsLocalTests(SynchronousTestCase):
    """is_local: an address of this host can be bound, whatever the probe's options."""

    def test_loopback_is_local(self):
        self.assertTrue(is_local(ipaddress.ip_address("127.0.0.1")))
        self.assertTrue(is_local(ipaddress.ip_address("127.0.0.2")))  # all of 127/8
        if socket.has_ipv6:
            try:
                loopback6 = is_local(ipaddress.ip_address("::1"))
            except OSError:  # pragma: no cover - no IPv6 at all
                loopback6 = True
            self.assertTrue(loopback6)

    def test_others_are_not(self):
        self.assertFalse(is_local(ipaddress.ip_address("192.0.2.1")))
        self.assertFalse(is_local(ipaddress.ip_address(PUBLIC)))

    def test_option_refused_plain_bind(self):
        """A kernel that refuses the no-port option still gets the right answer."""
        self.patch(server, "_BIND_ADDRESS_NO_PORT", 0x7FFF)
        self.assertTrue(is_local(ipaddress.ip_address("127.0.0.1")))
        self.assertFalse(is_local(ipaddress.ip_address("192.0.2.1")))


class ConnectAttemptTests(SOCKSTestCase):
    """The outbound connect: each resolved address in turn, cancellation, bugs."""

    SECOND = "93.184.216.35"

    def setUp(self):
        self.make(names={"example.com": [PUBLIC, self.SECOND]}, connect_timeout=15)
        self.login()
        self.send(request(b"example.com", 443))

    def test_next_address_after_a_failure(self):
        self.assertEqual(self.reactor.tcpClients[-1][:4][::3], (PUBLIC, 7.5))
        self.fail_outbound(error.ConnectionRefusedError())
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.assertEqual(self.reactor.tcpClients[-1][:2], (self.SECOND, 443))
        self.assertEqual(self.transport.value(), b"")
        self.outbound()
        self.assertEqual(self.transport.value(), reply(0, "198.51.100.1", 40000))
        self.assertIsNone(self.proto._pending)
        self.assertEqual(self.proto.address, self.SECOND)

    def test_every_address_failed(self):
        """The reply is the last failure's."""
        self.fail_outbound(error.TimeoutError())
        self.fail_outbound(error.ConnectionRefusedError())
        self.assertEqual(self.transport.value(), reply(5))
        self.assertTrue(self.closed())
        self.assertIsNone(self.proto._pending)

    def test_client_leaves_during_the_second_attempt(self):
        self.fail_outbound(error.ConnectionRefusedError())
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(self.reactor.connectors[-1].stoppedConnecting)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.assertEqual(self.transport.value(), b"")

    def test_connected_after_cancel_is_aborted(self):
        """A connection that completes after its attempt was cancelled is closed."""
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        _, remote = self.outbound()
        self.assertTrue(remote.disconnected)  # StringTransport.abortConnection

    def test_bug_aborts_the_session(self):
        def broken(outbound):
            raise RuntimeError("bug")

        self.patch(self.proto, "_connected", broken)
        self.outbound()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(self.transport.disconnected)  # aborted
        self.assertEqual(self.proto.reason, "internal error")
