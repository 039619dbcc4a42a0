"""
Tests for L{gateway.ops.drain}: each front door's C{drain()} (SMTP over a
C{StringTransport}, HTTP over a L{GatewaySite} channel, SOCKS), and the
L{Shutdown} that stops listeners, drains sessions within the deadline and
stops the core's services, on a C{MemoryReactorClock}; a second signal.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

from twisted.application import service
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.internet import defer, protocol
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionAborted
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import resource, server
from zope.interface import implementer

from gateway import tap
from gateway.connections import Connections, LimitedFactory, ListenSettings, door_protocol
from gateway.ops import drain as drain_module
from gateway.ops.drain import (
    ABORT_EXIT_GRACE,
    ABORT_GRACE,
    CLOSED_GRACE,
    EXIT_GRACE,
    SERVICES_GRACE,
    HardExit,
    Shutdown,
    install,
)
from gateway.smtp.spool import Spool
from gateway.web.server import GatewaySite
from gateway.web.settings import HTTPSettings
from tests.smtp_support import PendingChecker, ServerTestCase, finals, plain
from tests.test_socks_server import PUBLIC, SOCKSTestCase, greeting, request
from tests.support import keep_signal_handlers

SHUTTING_DOWN = b"421 4.3.2 mx.test Service shutting down"


class SMTPDrainTests(ServerTestCase):
    """A submission session told to drain (L{SubmissionServer.drain})."""

    def test_idle_session(self) -> None:
        """A session waiting for a command gets 421 4.3.2 and is closed."""
        client = self.authenticated()
        client.proto.drain()
        self.assertEqual(client.read(), [SHUTTING_DOWN])
        self.assertTrue(client.closed)

    def test_new_session_and_transaction(self) -> None:
        """Before EHLO, and between MAIL and DATA, the session waits for a command too."""
        fresh = self.connect("implicit")
        fresh.proto.drain()
        self.assertEqual(fresh.read(), [SHUTTING_DOWN])
        client = self.authenticated()
        self.assertReplies(client.send(b"MAIL FROM:<daniel@example.com>\r\n"), [b"250 2.1.0"])
        client.proto.drain()
        self.assertEqual(client.read(), [SHUTTING_DOWN])
        self.assertTrue(client.closed)
        self.assertNothingStored()

    def test_data_finishes(self) -> None:
        """In DATA: the message is read to its end, spooled, acknowledged, then 421."""
        client = self.authenticated()
        self.start_data(client)
        client.send(b"Subject: hi\r\n\r\nfirst half\r\n")
        client.proto.drain()
        self.assertEqual(client.read(), [])
        self.assertFalse(client.closed)
        lines = client.send(b"second half\r\n.\r\nQUIT\r\n")
        self.assertEqual(len(lines), 2, lines)
        self.assertTrue(lines[0].startswith(b"250 2.0.0 Ok: queued as "), lines)
        self.assertEqual(lines[1], SHUTTING_DOWN)  # the pipelined QUIT is not answered
        self.assertTrue(client.closed)
        [(message, meta)] = self.stored()
        self.assertTrue(message.endswith(b"first half\r\nsecond half\r\n"))
        self.assertEqual(meta["rcpt_to"], ["a@example.net"])

    def test_250_only_once_spooled(self) -> None:
        """A spool commit still running holds the 250 and the 421 until it is durable."""
        commits: list[tuple[Any, tuple[Any, ...], defer.Deferred[Any]]] = []

        def later(f: Any, *args: Any) -> defer.Deferred[Any]:
            d: defer.Deferred[Any] = defer.Deferred()
            commits.append((f, args, d))
            return d

        self.spool = Spool(self.directory, threadpool_runner=later)
        client = self.authenticated()
        self.start_data(client)
        self.assertEqual(client.send(b"Subject: hi\r\n\r\nbody\r\n.\r\n"), [])
        client.proto.drain()
        self.assertEqual(client.read(), [])  # not spooled yet: neither 250 nor 421
        self.assertFalse(client.closed)
        while commits:
            f, args, d = commits.pop(0)
            d.callback(f(*args))
        lines = client.read()
        self.assertEqual(finals(lines)[-1], SHUTTING_DOWN)
        self.assertTrue(lines[0].startswith(b"250 2.0.0"), lines)
        self.assertEqual(len(self.spool.ids()), 1)

    def test_cut_off_in_data_never_accepted(self) -> None:
        """A client lost mid-DATA (or aborted at the deadline) leaves nothing in the spool."""
        client = self.authenticated()
        self.start_data(client)
        client.send(b"Subject: hi\r\n\r\nhalf\r\n")
        client.proto.drain()
        client.proto.connectionLost(Failure(protocol.connectionDone))
        self.assertNothingStored()

    def test_login_in_flight(self) -> None:
        """A login running at the drain gets its answer, then the 421."""
        pending = PendingChecker()
        client = self.tls_session(checkers=[pending])
        self.assertEqual(client.send(b"AUTH PLAIN " + plain() + b"\r\n"), [])
        client.proto.drain()
        self.assertEqual(client.read(), [])
        pending.calls[0][1].callback(b"daniel")
        self.assertEqual(finals(client.read()), [b"235 2.7.0 Authentication successful", SHUTTING_DOWN])
        self.assertTrue(client.closed)

    def test_twice(self) -> None:
        """A second drain changes nothing: one 421."""
        client = self.authenticated()
        client.proto.drain()
        client.proto.drain()
        self.assertEqual(client.read(), [SHUTTING_DOWN])


class Pending(resource.Resource):
    """Holds every request until the test finishes it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[server.Request] = []

    def render(self, request: server.Request) -> Any:
        self.requests.append(request)
        return server.NOT_DONE_YET


class HTTPDrainTests(SynchronousTestCase):
    """An HTTP connection told to drain (L{GatewayChannel.drain})."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.resource = Pending()
        self.site = GatewaySite(self.resource, HTTPSettings(), self.clock)
        address = IPv4Address("TCP", "127.0.0.1", 40000)
        self.channel = self.site.buildProtocol(address)
        self.transport = StringTransport(peerAddress=address)
        self.channel.makeConnection(self.transport)
        self.addCleanup(self.channel.connectionLost, Failure(protocol.connectionDone))

    def respond(self, body: bytes = b"ok") -> bytes:
        request = self.resource.requests.pop(0)
        request.write(body)
        request.finish()
        out = self.transport.value()
        self.transport.clear()
        return out

    def test_idle_keep_alive_closed(self) -> None:
        """A keep-alive connection between requests is closed at once."""
        self.channel.dataReceived(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
        response = self.respond()
        self.assertNotIn(b"connection: close", response.lower())
        self.assertFalse(self.transport.disconnecting)
        self.channel.drain()
        self.assertTrue(self.transport.disconnecting)

    def test_new_connection_closed(self) -> None:
        self.channel.drain()
        self.assertTrue(self.transport.disconnecting)

    def test_request_in_flight(self) -> None:
        """A request being answered completes, with Connection: close, then the connection closes."""
        self.channel.dataReceived(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
        self.channel.drain()
        self.assertFalse(self.transport.disconnecting)
        response = self.respond()
        self.assertTrue(response.startswith(b"HTTP/1.1 200 "), response)
        self.assertIn(b"\r\nconnection: close\r\n", response.lower())
        self.assertTrue(response.endswith(b"ok\r\n0\r\n\r\n") or response.endswith(b"ok"), response)
        self.assertTrue(self.transport.disconnecting)

    def test_headers_arriving(self) -> None:
        """
        A request whose headers are still arriving is not in flight: closed at
        once, so a client sending half a request cannot hold the drain
        (formerly it was waited for, to the deadline).
        """
        self.channel.dataReceived(b"GET / HTTP/1.1\r\nHost: gw\r\n")
        self.channel.drain()
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.resource.requests, [])

    def test_body_arriving(self) -> None:
        """A request with all its headers is in flight while its body arrives: it completes."""
        self.channel.dataReceived(b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 4\r\n\r\nab")
        self.channel.drain()
        self.assertFalse(self.transport.disconnecting)
        self.channel.dataReceived(b"cd")
        response = self.respond()
        self.assertIn(b"\r\nconnection: close\r\n", response.lower())
        self.assertTrue(self.transport.disconnecting)

    def test_pipelined_after_drain(self) -> None:
        """A request in flight completes; one pipelined behind it is never read."""
        self.channel.dataReceived(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\nGET /b HTTP/1.1\r\n")
        self.channel.drain()
        self.assertFalse(self.transport.disconnecting)
        self.respond()
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.resource.requests, [])

    def test_response_started(self) -> None:
        """A response already under way finishes as it began; the connection closes after it."""
        self.channel.dataReceived(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
        request = self.resource.requests[0]
        request.write(b"first")
        self.channel.drain()
        self.assertFalse(self.transport.disconnecting)
        request.finish()
        self.assertTrue(self.transport.disconnecting)


class SOCKSDrainTests(SOCKSTestCase):
    def test_tunnel_runs_on(self) -> None:
        """SOCKS has no goodbye: a tunnel told to drain runs on (until the deadline aborts it)."""
        self.make()
        self.login()
        self.send(request(PUBLIC, 443))
        remote_proto, remote = self.outbound()
        self.proto.drain()
        self.assertFalse(self.closed())
        self.send(b"more")
        self.assertEqual(remote.value(), b"more")

    def test_aborted_logged(self) -> None:
        """The session log says when the drain cut a tunnel."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.make()
        self.login()
        self.send(request(PUBLIC, 443))
        self.outbound()
        self.proto.drain()
        self.proto.connectionLost(Failure(ConnectionAborted()))
        [event] = [e for e in events if e.get("log_format", "").startswith("socks session")]
        self.assertEqual(event["reason"], "aborted: the gateway stopped")

    def test_negotiation_closed(self) -> None:
        """
        A session still negotiating is closed at the drain's start (it held
        the drain until its negotiation timeout before).
        """
        self.make()
        self.connect()
        self.send(b"\x05")  # half a greeting
        self.proto.drain()
        self.assertTrue(self.closed())

    def test_login_in_flight_closed(self) -> None:
        """A login still running is cancelled and the session closed: nothing was relayed yet."""
        checker = PendingSOCKSChecker()
        self.make(checkers=[checker])
        self.connect()
        self.send(greeting(2))
        self.send(b"\x01\x05alice\x02pw")
        self.assertEqual(len(checker.calls), 1)
        self.proto.drain()
        self.assertTrue(self.closed())
        self.proto.connectionLost(Failure(ConnectionAborted()))
        self.assertEqual(checker.cancelled, 1)

    def test_logged_in_idle_closed(self) -> None:
        self.make()
        self.login()
        self.proto.drain()
        self.assertTrue(self.closed())

    def test_connect_under_way_runs_on(self) -> None:
        """A CONNECT being made goes on: its tunnel gets the drain's deadline."""
        self.make()
        self.login()
        self.send(request(PUBLIC, 443))
        self.proto.drain()
        self.assertFalse(self.closed())
        self.outbound()
        self.assertFalse(self.closed())


@implementer(ICredentialsChecker)
class PendingSOCKSChecker:
    """Never answers; counts cancellations."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self) -> None:
        self.calls: list[defer.Deferred[Any]] = []
        self.cancelled = 0

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred(lambda _: setattr(self, "cancelled", self.cancelled + 1))
        self.calls.append(d)
        return d


class FakeSession(protocol.Protocol):
    """A front door's protocol: counts its drains; ends when the test says."""

    def __init__(self, ends: bool = False, fails: bool = False) -> None:
        self.drains = 0
        self.ends = ends
        self.fails = fails

    def drain(self) -> None:
        self.drains += 1
        if self.fails:
            raise RuntimeError("a bug")
        if self.ends:
            self.transport.loseConnection()


class AbortTransport(StringTransport):
    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class FakeService(service.Service):
    """Records when it is stopped; its stop takes as long as the test says."""

    def __init__(self, name: str, log: list[str], hang: bool = False) -> None:
        self.setName(name)
        self.log = log
        self.hang = hang
        self.stopping: defer.Deferred[None] | None = None

    def stopService(self) -> Any:
        super().stopService()
        self.log.append(self.name)
        if self.hang:
            self.stopping = defer.Deferred()
            return self.stopping
        return None


class ShutdownTests(SynchronousTestCase):
    """L{Shutdown}: listeners, then the drain within its deadline, then the services."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.connections = Connections(ListenSettings())
        self.shutdown = Shutdown(self.reactor, self.connections, timeout=30.0)
        self.stopped: list[str] = []
        self.listener = FakeService("listener", self.stopped)
        self.core = FakeService("core", self.stopped)
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def session(self, door: str, **kwargs: Any) -> tuple[FakeSession, Any, AbortTransport]:
        """A session admitted through the door's L{LimitedFactory}, as the listeners count them."""
        proto = FakeSession(**kwargs)
        factory = protocol.Factory.forProtocol(lambda: proto)
        limited = LimitedFactory(factory, self.connections.door(door, 100, 1), self.reactor)
        address = IPv4Address("TCP", "192.0.2.7", 40000)
        entry = limited.buildProtocol(address)
        transport = AbortTransport(peerAddress=address)
        entry.makeConnection(transport)
        return proto, entry, transport

    def lose(self, entry: Any) -> None:
        entry.connectionLost(Failure(protocol.connectionDone))

    def lines(self) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events if e.get("log_namespace") == "gateway.ops.drain"]

    def test_no_sessions(self) -> None:
        """Nothing open: listeners, then services, at once."""
        d = self.shutdown.stop([self.listener], [self.core])
        self.successResultOf(d)
        self.assertEqual(self.stopped, ["listener", "core"])

    def test_order(self) -> None:
        """Every listener first; the services once the sessions have ended."""
        smtp, smtp_entry, _ = self.session("smtp")
        http, http_entry, _ = self.session("http")
        d = self.shutdown.stop([self.listener], [self.core])
        self.assertEqual(self.stopped, ["listener"])
        self.assertEqual((smtp.drains, http.drains), (1, 1))
        self.lose(smtp_entry)
        self.assertNoResult(d)
        self.lose(http_entry)
        self.successResultOf(d)
        self.assertEqual(self.stopped, ["listener", "core"])
        self.assertEqual(self.shutdown.drained, {"smtp": 1, "http": 1})
        self.assertEqual(sum(self.shutdown.cut.values()), 0)
        start, end = self.lines()
        self.assertEqual(start, "draining 2 session(s) (smtp 1, http 1) for up to 30 s")
        self.assertEqual(end, "drain ended after 0.0 s: 2 session(s) finished, 0 aborted (none)")

    def test_listeners_stop_first(self) -> None:
        """The drain waits for the listeners to have stopped."""
        listener = FakeService("listener", self.stopped, hang=True)
        proto, _, _ = self.session("smtp")
        d = self.shutdown.stop([listener], [self.core])
        self.assertEqual(proto.drains, 0)
        listener.stopping.callback(None)
        self.assertEqual(proto.drains, 1)
        self.assertNoResult(d)

    def test_deadline(self) -> None:
        """What is still open at the deadline is aborted; then the services stop."""
        _, socks_entry, socks_transport = self.session("socks")
        _, smtp_entry, smtp_transport = self.session("smtp", ends=True)
        d = self.shutdown.stop([self.listener], [self.core])
        self.assertTrue(smtp_transport.disconnecting)
        self.lose(smtp_entry)
        self.reactor.advance(29.9)
        self.assertNoResult(d)
        self.assertFalse(socks_transport.aborted)
        self.reactor.advance(0.1)
        self.assertTrue(socks_transport.aborted)
        self.assertEqual(self.stopped, ["listener"])  # the aborted one ends on the next turn
        self.lose(socks_entry)
        self.successResultOf(d)
        self.assertEqual(self.stopped, ["listener", "core"])
        self.assertEqual(self.shutdown.cut, {"socks": 1})
        self.assertEqual(self.lines()[-1],
                         "drain ended after 30.0 s: 1 session(s) finished, 1 aborted (socks 1)")

    def test_pending_proxy_headers_aborted(self) -> None:
        """
        A trusted proxy's connection still waiting for its header is aborted
        when the drain starts (counted in its line); a header arriving after
        that builds no session, and no new one is awaited.
        """
        import ipaddress
        import types

        from gateway.connections import limit_connections

        self.connections = Connections(
            ListenSettings(proxy_protocol_from=(ipaddress.ip_network("10.0.0.0/8"),))
        )
        self.shutdown = Shutdown(self.reactor, self.connections, timeout=30.0)
        built: list[FakeSession] = []
        factory = limit_connections(
            types.SimpleNamespace(connections=self.connections, reactor=self.reactor),
            protocol.Factory.forProtocol(lambda: built.append(FakeSession()) or built[-1]),
            "smtp", "smtp", 10,
        )
        proxy = IPv4Address("TCP", "10.1.1.1", 40000)
        readers = []
        for _ in range(2):
            reader = factory.buildProtocol(proxy)
            transport = AbortTransport(peerAddress=proxy)
            reader.makeConnection(transport)
            readers.append((reader, transport))
        d = self.shutdown.stop([self.listener], [self.core])
        self.assertTrue(all(transport.aborted for _, transport in readers))
        self.assertEqual(self.connections.open, 0)
        readers[0][0].dataReceived(b"PROXY TCP4 192.0.2.7 198.51.100.1 4242 25\r\n")
        self.assertEqual(built, [])
        self.assertIsNone(factory.buildProtocol(proxy))
        for reader, _ in readers:
            reader.connectionLost(Failure(ConnectionAborted()))
        self.assertEqual(self.connections.open, 0)
        self.successResultOf(d)
        self.assertEqual(
            self.lines()[0],
            "draining 0 session(s) (none) for up to 30 s; 2 connection(s) waiting for a PROXY"
            " header aborted",
        )

    def test_abort_not_finished(self) -> None:
        """A transport whose abort never ends the connection holds the stop ABORT_GRACE at most."""
        self.session("socks")
        d = self.shutdown.stop([self.listener], [self.core])
        self.reactor.advance(30)
        self.assertNoResult(d)
        self.reactor.advance(ABORT_GRACE)
        self.successResultOf(d)

    def test_zero_timeout(self) -> None:
        """--drain-timeout 0: asked, then aborted on the next turn."""
        self.shutdown.timeout = 0
        proto, entry, transport = self.session("http")
        d = self.shutdown.stop([self.listener], [self.core])
        self.assertEqual(proto.drains, 1)
        self.reactor.advance(0)
        self.assertTrue(transport.aborted)
        self.lose(entry)
        self.successResultOf(d)

    def test_drain_failure(self) -> None:
        """A session whose drain raises is logged; the others drain, the deadline covers it."""
        bad, _, _ = self.session("smtp", fails=True)
        good, good_entry, _ = self.session("smtp", ends=True)
        d = self.shutdown.stop([self.listener], [self.core])
        self.assertEqual((bad.drains, good.drains), (1, 1))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.lose(good_entry)
        self.assertNoResult(d)
        self.reactor.advance(30)
        self.reactor.advance(ABORT_GRACE)
        self.successResultOf(d)

    def test_first_signal_stops_the_reactor(self) -> None:
        self.reactor.running = True
        self.shutdown.signalled()
        self.assertTrue(self.reactor.hasStopped)
        self.assertTrue(self.shutdown.stopping)
        self.assertFalse(self.shutdown.aborted)

    def test_second_signal(self) -> None:
        """A second signal aborts every session at once and waits for nothing more."""
        core = FakeService("core", self.stopped, hang=True)
        _, entry, transport = self.session("socks")
        self.shutdown.signalled()
        d = self.shutdown.stop([self.listener], [core])
        self.shutdown.signalled()
        self.assertTrue(transport.aborted)
        self.lose(entry)
        self.successResultOf(d)  # the hanging service is not waited for
        self.assertEqual(self.stopped, ["listener", "core"])
        self.assertEqual(self.lines()[-1],
                         "drain aborted after 0.0 s: 0 session(s) finished, 1 aborted (socks 1)")
        self.assertIn("signalled again", self.lines()[-2])

    def test_second_signal_during_services(self) -> None:
        """A service slow to stop (delivery waiting for the relay) is not waited for after a second signal."""
        core = FakeService("core", self.stopped, hang=True)
        self.shutdown.signalled()
        d = self.shutdown.stop([self.listener], [core])
        self.assertNoResult(d)
        self.shutdown.signalled()
        self.successResultOf(d)

    def test_sinks_stop_last(self) -> None:
        """
        The event sinks (the audit log) stop after the other core services,
        a reactor turn later: an abandoned login's verdict that a stopping
        hash pool hands back by C{callFromThread} is still written.
        """
        from gateway.ops.audit import AuditLog
        from tests.test_audit import login_event

        written: list[bytes] = []
        audit = AuditLog("-", write=lambda fd, data: written.append(bytes(data)) or len(data),
                         reactor=self.reactor)
        audit.startService()

        class Pool(FakeService):
            def stopService(inner) -> Any:
                # Its thread's last result, delivered on the reactor's next turn.
                self.reactor.callLater(0, audit.login, login_event(client_left=True))
                return super().stopService()

        pool = Pool("pool", self.stopped)
        d = self.shutdown.stop([self.listener], [audit, pool])
        self.assertEqual(self.stopped, ["listener", "pool"])
        self.assertTrue(audit.running)
        self.assertNoResult(d)
        self.reactor.advance(0)
        self.successResultOf(d)
        self.assertFalse(audit.running)
        self.assertEqual((audit.written, audit.lost), (1, 0))
        self.assertEqual(len(written), 1)

    def test_abort_stops_sinks_at_once(self) -> None:
        """After a second signal the sinks do not wait for the turn either."""
        sink = FakeService("sink", self.stopped)
        sink.stops_last = True  # type: ignore[attr-defined]
        self.shutdown.abort()
        self.successResultOf(self.shutdown.stop([self.listener], [sink, self.core]))
        self.assertEqual(self.stopped, ["listener", "core", "sink"])

    def test_service_failure_logged(self) -> None:
        core = FakeService("core", self.stopped, hang=True)
        d = self.shutdown.stop([self.listener], [core])
        core.stopping.errback(RuntimeError("disk"))
        self.successResultOf(d)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


    def test_closed_and_flushed_finished(self) -> None:
        """
        A session the gateway has closed, with nothing left to send, is
        aborted after CLOSED_GRACE and counted as finished: an idle TLS
        client that never sends its close_notify does not hold the drain.
        """
        flushed: set[Any] = set()
        self.patch(drain_module, "closing_flushed", lambda entry: entry in flushed)
        _, entry, transport = self.session("smtp")
        _, other, other_transport = self.session("smtp")
        d = self.shutdown.stop([self.listener], [self.core])
        flushed.add(entry)
        self.reactor.advance(drain_module.CLOSED_POLL)
        self.assertFalse(transport.aborted)
        self.reactor.advance(CLOSED_GRACE)
        self.assertTrue(transport.aborted)
        self.assertFalse(other_transport.aborted)  # still sending (or not closed): waited for
        self.lose(entry)
        self.lose(other)
        self.successResultOf(d)
        self.assertEqual(self.shutdown.drained, {"smtp": 2})
        self.assertEqual(sum(self.shutdown.cut.values()), 0)

    def test_flushed_must_last(self) -> None:
        """A session seen flushed, then sending again, starts its grace over."""
        flushed: set[Any] = set()
        self.patch(drain_module, "closing_flushed", lambda entry: entry in flushed)
        _, entry, transport = self.session("smtp")
        self.shutdown.stop([self.listener], [self.core])
        flushed.add(entry)
        self.reactor.advance(drain_module.CLOSED_POLL)
        flushed.clear()
        self.reactor.advance(drain_module.CLOSED_POLL)
        flushed.add(entry)
        polls = round(CLOSED_GRACE / drain_module.CLOSED_POLL)
        self.reactor.pump([drain_module.CLOSED_POLL] * polls)
        self.assertFalse(transport.aborted)
        self.reactor.advance(drain_module.CLOSED_POLL)
        self.assertTrue(transport.aborted)

    def test_services_told_the_deadline(self) -> None:
        """
        Services that can (delivery) take no new work from the drain's start
        and learn its deadline plus SERVICES_GRACE, so the whole stop stays
        within --drain-timeout and a fixed grace.
        """
        core = DrainableService("core", self.stopped)
        self.session("socks")
        self.reactor.advance(100)
        self.shutdown.stop([self.listener], [core])
        self.assertEqual(core.deadlines, [100 + 30 + SERVICES_GRACE])
        self.assertEqual(core.abandoned, 0)

    def test_abandoned_on_abort_and_deadline(self) -> None:
        """A second signal, or a deadline that had to cut sessions, tells services not to join threads."""
        core = DrainableService("core", self.stopped)
        self.shutdown.stop([self.listener], [core])
        self.shutdown.signalled()
        self.shutdown.signalled()
        self.assertEqual(core.abandoned, 1)
        self.setUp()
        core = DrainableService("core", self.stopped)
        self.session("socks")
        self.shutdown.stop([self.listener], [core])
        self.reactor.advance(30)
        self.assertEqual(core.abandoned, 1)


class DrainableService(FakeService):
    def __init__(self, name: str, log: list[str]) -> None:
        super().__init__(name, log)
        self.deadlines: list[float] = []
        self.abandoned = 0

    def drain(self, deadline: float) -> None:
        self.deadlines.append(deadline)

    def abandon(self) -> None:
        self.abandoned += 1


class HardExitTests(SynchronousTestCase):
    """L{HardExit}: the watchdog that bounds the process's exit."""

    def watchdog(self) -> tuple[HardExit, threading.Event, list[int]]:
        codes: list[int] = []
        done = threading.Event()

        def exit(code: int) -> None:
            codes.append(code)
            done.set()

        watchdog = HardExit(exit=exit)
        return watchdog, done, codes

    def test_exits_at_the_earliest_deadline(self) -> None:
        watchdog, done, codes = self.watchdog()
        watchdog.arm(0.01)  # before start: nothing (no thread, no pipe yet)
        watchdog.start()
        self.assertFalse(done.wait(0.2))
        started = time.monotonic()
        watchdog.arm(60)
        watchdog.arm(0.2)
        watchdog.arm(30)
        self.assertTrue(done.wait(10))
        self.assertGreaterEqual(time.monotonic() - started, 0.19)
        self.assertEqual(codes, [0])

    def test_line_written_to_stderr_not_logged(self) -> None:
        """
        The forced exit's line goes straight to descriptor 2 with one
        C{write}: the watchdog's thread never enters a log observer.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        written: list[tuple[int, bytes]] = []
        codes: list[int] = []
        watchdog = HardExit(exit=codes.append, write=lambda fd, data: written.append((fd, data)))
        watchdog._expire()
        self.assertEqual(codes, [0])
        self.assertEqual(written, [(2, HardExit.LINE)])
        self.assertIn(b"did not end in time", HardExit.LINE)
        self.assertEqual([e for e in events if e.get("log_namespace") == "gateway.ops.drain"], [])

    def test_not_armed(self) -> None:
        watchdog, done, codes = self.watchdog()
        watchdog.start()
        self.assertFalse(done.wait(0.3))
        self.assertEqual(codes, [])

    def test_signal_handler_arms(self) -> None:
        """
        The signal handler itself (not the reactor) arms it: the first signal
        at --drain-timeout + EXIT_GRACE, the next ones at ABORT_EXIT_GRACE.
        """

        class Recording(HardExit):
            def __init__(self) -> None:
                super().__init__()
                self.armed: list[float] = []
                self.started = False

            def start(self) -> None:
                self.started = True

            def arm(self, seconds: float) -> None:
                self.armed.append(seconds)

        reactor = MemoryReactorClock()
        reactor.callFromThread = lambda f, *args: None  # type: ignore[attr-defined]
        watchdog = Recording()
        install(reactor, Shutdown(reactor, Connections(), timeout=7.0), watchdog)
        for s in (signal.SIGTERM, signal.SIGINT):
            self.addCleanup(signal.signal, s, signal.getsignal(s))
        for f, args, kwargs in reactor.whenRunningHooks:
            f(*args, **kwargs)
        self.assertTrue(watchdog.started)
        handler = signal.getsignal(signal.SIGTERM)
        handler(signal.SIGTERM, None)
        self.assertEqual(watchdog.armed, [7.0 + EXIT_GRACE])
        signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
        self.assertEqual(watchdog.armed, [7.0 + EXIT_GRACE, ABORT_EXIT_GRACE])


class WiringTests(SynchronousTestCase):
    def service(self, *args: str) -> Any:
        options = tap.Options()
        options.parseOptions(["--data-dir", self.mktemp(), "--auth", "memory:a:b", *args])
        self.reactor = MemoryReactorClock()
        keep_signal_handlers(self)
        svc = tap.makeService(options, reactor=self.reactor)
        svc.core.connections.budget = 1000
        return svc

    def test_option(self) -> None:
        self.assertEqual(self.service().shutdown.timeout, 30.0)
        self.assertEqual(self.service("--drain-timeout", "2.5").shutdown.timeout, 2.5)
        self.assertEqual(self.service("--drain-timeout", "0").shutdown.timeout, 0)
        with self.assertRaises(usage.UsageError):
            self.service("--drain-timeout", "-1")

    def test_signals_once_running(self) -> None:
        """
        SIGTERM and SIGINT handlers are installed when the reactor runs; until
        then, handlers that record the signal (L{gateway.ops.signals}).
        """
        self.service()
        installed = list(self.reactor.whenRunningHooks)
        self.assertTrue(installed)
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for f, args, kwargs in installed:
            f(*args, **kwargs)
        self.assertIsNot(signal.getsignal(signal.SIGTERM), previous[signal.SIGTERM])
        self.assertIsNot(signal.getsignal(signal.SIGINT), previous[signal.SIGINT])

    def test_not_in_a_running_reactor(self) -> None:
        """A test process running its reactor keeps its own handlers."""
        reactor = MemoryReactorClock()
        reactor.running = True
        install(reactor, Shutdown(reactor, Connections()))
        self.assertEqual(reactor.whenRunningHooks, [])

    def test_sinks_marked(self) -> None:
        """The audit log and the metrics listener are the core services stopped last."""
        svc = self.service("--audit-log", os.path.join(self.mktemp()), "--metrics", "tcp:0")
        last = [child.name for child in svc.core.services if drain_module.stops_last(child)]
        self.assertEqual(sorted(last), ["audit-log", "metrics"])

    def test_stop_order(self) -> None:
        """The listeners stop before the drain; the core's services once the sessions have ended."""
        svc = self.service("--socks", "none", "--http", "none", "--smtp-hostname", "gw.test")
        svc.startService()
        [(_, factory, _, _)] = self.reactor.tcpServers
        address = IPv4Address("TCP", "127.0.0.1", 40000)
        entry = factory.buildProtocol(address)
        door_protocol(entry).callLater = self.reactor.callLater
        transport = AbortTransport(peerAddress=address)
        entry.makeConnection(transport)
        transport.clear()
        d = svc.stopService()
        self.assertEqual(transport.value(), b"421 4.3.2 gw.test Service shutting down\r\n")
        self.assertTrue(svc.core.hash_pool.running)  # the core's services wait for the session
        entry.connectionLost(Failure(protocol.connectionDone))
        self.successResultOf(d)
        self.assertFalse(svc.core.hash_pool.running)
        self.assertFalse(svc.running)
