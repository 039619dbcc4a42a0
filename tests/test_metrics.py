"""
The metrics and health listener (L{gateway.ops.metrics}): the collector's
output parsed with prometheus_client's own parser and checked by the real
C{promtool}, labels bounded whatever clients send, the components'
counters, and C{/healthz} / C{/readyz} answering 200 or 503.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet import defer, error, task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.python.failure import Failure
from twisted.web import resource
from twisted.web.test.requesthelper import DummyChannel

from gateway import tap
from gateway.checkers.hashing import HashPool
from gateway.checkers.throttle import Throttle
from gateway.connections import door_protocol
from gateway.credentials import HTTPBasicCredentials, RFC1929Credentials, SASLCredentials
from gateway.errors import PoolFull, ShuttingDown, Throttled
from gateway.meta import ConnectionMeta
from gateway.ops import metrics
from gateway.events import LoginEvent
from gateway.tally import Tally
from gateway.realm import login
from gateway.smtp.relay import RelayError
from gateway.smtp.spool import Envelope, Spool
from gateway.socks.server import SOCKSFactory, SOCKSSettings
from gateway.web.server import HTTP_CODES, GatewaySite, http_code_label
from gateway.web.settings import HTTPSettings
from tests.support import keep_signal_handlers, require_tool

#: What a hostile client might claim as its user name.
HOSTILE = 'evil"} authgateway_ready 1\n{x="'
PEER = "203.0.113.99"


def gateway(test: SynchronousTestCase, *extra: str) -> Any:
    """C{makeService} for C{--metrics tcp:0} and every front door, on a memory reactor."""
    options = tap.Options()
    options.parseOptions([
        "--data-dir", test.mktemp(), "--auth", "memory:daniel:tiger", "--metrics", "tcp:0",
        "--smtp", "tcp:0", "--http", "tcp:0", "--socks", "tcp:0", "--http-insecure-auth",
        "--failure-delay", "0", *extra,
    ])
    keep_signal_handlers(test)
    top = tap.makeService(options, reactor=MemoryReactorClock())
    top.options = options
    top.site = top.getServiceNamed("metrics").factory.wrappedFactory
    top.core = top.site.readiness.core
    return top


def listener(top: Any, name: str) -> Any:
    """The front-door listener service called C{name}."""
    return top.site.readiness.listeners[name][0]


def scrape(top: Any) -> dict[str, Any]:
    """The families of one scrape, by name, as prometheus_client's parser reads them."""
    text = generate_latest(top.site.registry).decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(families: dict[str, Any], sample: str, **labels: str) -> float | None:
    """The value of the sample called C{sample} with exactly C{labels}, or None."""
    for family in families.values():
        for s in family.samples:
            if s.name == sample and s.labels == labels:
                return s.value
    return None


def all_labels(families: dict[str, Any]) -> set[str]:
    return {v for family in families.values() for s in family.samples for v in s.labels.values()}


def event(**fields: Any) -> LoginEvent:
    base = dict(time=0.0, protocol="smtp", listener="smtp", mechanism="PLAIN", identity="daniel",
                outcome="success", reason="ok", peer_address=PEER, peer_port=1, tls=False,
                duration=0.002)
    return LoginEvent(**{**base, **fields})


class LoginLabelTests(SynchronousTestCase):
    """Login attempts through the real portal, labels from fixed sets only."""

    def setUp(self) -> None:
        self.top = gateway(self)
        self.portal = self.top.core.portal

    def login(self, credentials: Any) -> None:
        d = login(self.portal, credentials)
        d.addErrback(lambda _: None)
        self.top.core.reactor.advance(30)
        self.successResultOf(d)

    def test_hostile_names_never_labels(self) -> None:
        """
        Logins claiming hostile names, from an address, with an unknown
        listener and mechanism: counted under "other", no label holds the
        name or the address, and the text still parses.
        """
        meta = ConnectionMeta("http", listener="http", peer_address=PEER)
        self.login(HTTPBasicCredentials(HOSTILE, "guess", meta))
        self.login(HTTPBasicCredentials("daniel", "tiger", meta))
        odd = ConnectionMeta("smtp", listener="not-a-listener", peer_address=PEER)
        self.login(SASLCredentials(HOSTILE, "guess", odd, mechanism="X-" + HOSTILE))
        self.login(RFC1929Credentials("daniel", "tiger", ConnectionMeta("socks", listener="socks",
                                                                        peer_address=PEER)))
        families = scrape(self.top)
        self.assertEqual(value(families, "authgateway_login_attempts_total", protocol="http",
                               listener="http", mechanism="Basic", outcome="failure",
                               reason="invalid_credentials"), 1)
        self.assertEqual(value(families, "authgateway_login_attempts_total", protocol="http",
                               listener="http", mechanism="Basic", outcome="success",
                               reason="ok"), 1)
        self.assertEqual(value(families, "authgateway_login_attempts_total", protocol="smtp",
                               listener="other", mechanism="other", outcome="failure",
                               reason="invalid_credentials"), 1)
        self.assertEqual(value(families, "authgateway_login_attempts_total", protocol="socks",
                               listener="socks", mechanism="RFC1929", outcome="success",
                               reason="ok"), 1)
        self.assertEqual(value(families, "authgateway_login_duration_seconds_count",
                               protocol="http"), 2)
        labels = all_labels(families)
        self.assertFalse([v for v in labels if "evil" in v or PEER in v or "daniel" in v], labels)
        self.assertEqual(value(families, "authgateway_ready"), 0)  # nothing listens yet

    def test_event_fields_bounded(self) -> None:
        """Whatever an event says, each label is from its set or "other"."""
        sink = metrics.LoginMetrics(["smtp"], ["PLAIN"])
        sink.login(event(protocol=HOSTILE, listener=HOSTILE, mechanism=HOSTILE, outcome=HOSTILE,
                         reason=HOSTILE))
        self.assertEqual(list(sink.attempts), [("other",) * 5])
        self.assertEqual(sink.latency["other"].count, 1)
        for i in range(2 * sink.MAX_SHAPES):  # as many names as a client likes: bounded memory
            sink.login(event(listener=f"{HOSTILE}{i}"))
        self.assertEqual(len(sink._shapes), sink.MAX_SHAPES)
        self.assertEqual(sink.attempts[("smtp", "other", "PLAIN", "success", "ok")], 2 * sink.MAX_SHAPES)

    def test_no_metrics_no_sink(self) -> None:
        """Without --metrics: no listener, and no sink, so no event is ever built."""
        options = tap.Options()
        options.parseOptions(["--data-dir", self.mktemp(), "--auth", "memory:a:b"])
        keep_signal_handlers(self)
        top = tap.makeService(options, reactor=MemoryReactorClock())
        self.assertNotIn("metrics", [s.name for s in top])
        self.assertEqual(top.core.events.sinks, [])

    def test_bad_endpoint(self) -> None:
        options = tap.Options()
        with self.assertRaises(Exception) as caught:
            options.parseOptions(["--auth", "memory:a:b", "--metrics", "nonsense:1"])
        self.assertIn("--metrics 'nonsense:1': bad endpoint", str(caught.exception))


class ComponentCounterTests(SynchronousTestCase):
    """The counters each component keeps for the collector."""

    def test_tally(self) -> None:
        tally = Tally((0.1, 1.0))
        for seconds in (0.05, 0.1, 0.5, 7):
            tally.observe(seconds)
        self.assertEqual(tally.cumulative(), [("0.1", 2), ("1.0", 3), ("+Inf", 4)])
        self.assertEqual((tally.count, tally.sum), (4, 7.65))

    def test_hash_pool(self) -> None:
        """Jobs timed in their thread; refusals by reason."""

        class Threads:
            def __init__(self) -> None:
                self.jobs: list[Any] = []

            def callInThreadWithCallback(self, done: Any, f: Any) -> None:
                self.jobs.append((done, f))

        class Reactor(task.Clock):
            def callFromThread(self, f: Any, *args: Any) -> None:
                f(*args)

        threads = Threads()
        pool = HashPool(Reactor(), max_pending=1, threadpool=threads, known_reserve=0)
        first = pool.run(lambda: True)
        self.failureResultOf(pool.run(lambda: True), PoolFull)
        self.assertEqual(pool.refused["full"], 1)
        [(done, f)] = threads.jobs
        done(True, f())
        self.assertIs(self.successResultOf(first), True)
        self.assertEqual(pool.timings.count, 1)
        pool.stopService()
        self.failureResultOf(pool.run(lambda: True), ShuttingDown)
        self.assertEqual(pool.refused["stopping"], 1)

    def test_throttle(self) -> None:
        throttle = Throttle(task.Clock(), max_failures=2, delay=0)
        for _ in range(2):
            throttle.failed(PEER, "daniel")
        self.assertRaises(Throttled, throttle.check, PEER, "daniel")
        self.assertEqual(throttle.refused, {"pair": 1})

    def test_spool(self) -> None:
        spool = Spool(self.mktemp(), threadpool_runner=lambda f, *a: defer.maybeDeferred(f, *a))
        writer = spool.open()
        writer.write(b"Subject: x\r\n\r\nhi\r\n")
        envelope = Envelope(mail_from="a@example.com", rcpt_to=("b@example.net",), helo="c",
                            auth_info=None, peer_address=None, peer_port=None, local_address=None,
                            local_port=None, tls=None, protocol="ESMTPSA")
        self.successResultOf(writer.finish(envelope))
        self.assertEqual((spool.accepted, spool.accepted_bytes), ({"ESMTPSA": 1}, {"ESMTPSA": 18}))

    def test_socks_session_end(self) -> None:
        """A SOCKS session's bytes and reply reach its factory when it ends."""
        factory = SOCKSFactory(None, None, SOCKSSettings(), MemoryReactorClock())
        session = factory.buildProtocol(IPv4Address("TCP", PEER, 1))
        session.makeConnection(StringTransport())
        session.up, session.down, session.reply = 10, 20, 2
        session.connectionLost()
        self.assertEqual((factory.ended_up, factory.ended_down, factory.replies), (10, 20, {2: 1}))

    def test_http_code_labels(self) -> None:
        self.assertEqual([http_code_label(c) for c in (200, 401, 418, 599, 999)],
                         ["200", "401", "4xx", "5xx", "other"])

    def test_http_statuses_bounded(self) -> None:
        """
        Whatever codes the responses carry (a proxied upstream chose them), the
        site's count holds at most the fixed label set, not one key per code.
        """
        site = GatewaySite(resource.Resource(), HTTPSettings(), task.Clock())
        for code in (*range(-5, 1000), 999_999_999, 42, 0, 200, 200):
            site.log(_Coded(code))
        labels = {str(c) for c in HTTP_CODES} | {f"{n}xx" for n in range(1, 6)} | {"other"}
        self.assertLessEqual(set(site.statuses), labels)
        self.assertEqual(site.statuses["200"], 3)
        self.assertEqual(site.statuses["other"], 6 + 99 + 400 + 3)  # -5..99, 600..999, 1e9, 42, 0


class _Coded:
    """What GatewaySite.log reads of a request."""

    def __init__(self, code: int) -> None:
        self.code = code


class CollectorTests(SynchronousTestCase):
    """What one scrape shows of the front doors and the queue; promtool agrees with it."""

    def setUp(self) -> None:
        self.top = gateway(self, "--relay", "smtp://127.0.0.1:1?tls=none")
        self.core = self.top.core

    def http(self, request: bytes) -> bytes:
        """One request on the --http listener's real factory, in memory."""
        factory = listener(self.top, "http").factory
        proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 50000))
        proto.makeConnection(transport)
        proto.dataReceived(request)
        self.core.reactor.advance(1)
        return transport.value()

    def test_http_sessions_and_statuses(self) -> None:
        self.http(b"GET /whoami HTTP/1.1\r\nHost: x\r\nAuthorization: Basic ZGFuaWVsOnRpZ2Vy\r\n\r\n")
        self.http(b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
        families = scrape(self.top)
        self.assertEqual(value(families, "authgateway_http_responses_total", code="200"), 1)
        self.assertEqual(value(families, "authgateway_http_responses_total", code="401"), 1)
        self.assertEqual(value(families, "authgateway_sessions_total", door="http"), 2)
        self.assertEqual(value(families, "authgateway_sessions_open", door="http"), 2)
        self.assertEqual(value(families, "authgateway_sessions_open", door="smtp"), 0)

    def test_socks_bytes_live_and_ended(self) -> None:
        """Bytes of ended sessions plus those of open ones: a tunnel is seen while it runs."""
        limited = listener(self.top, "socks").factory
        sessions = []
        for port in (1, 2):
            session = limited.buildProtocol(IPv4Address("TCP", "127.0.0.1", port))
            session.makeConnection(StringTransport())
            sessions.append(session)
        first, second = (door_protocol(s) for s in sessions)
        first.up, first.down, first.reply = 100, 1000, 0
        second.up, second.down = 5, 7
        sessions[0].connectionLost(Failure(error.ConnectionDone()))
        families = scrape(self.top)
        self.assertEqual(value(families, "authgateway_socks_bytes_total", direction="up"), 105)
        self.assertEqual(value(families, "authgateway_socks_bytes_total", direction="down"), 1007)
        self.assertEqual(value(families, "authgateway_socks_replies_total", reply="0"), 1)
        self.assertEqual(value(families, "authgateway_sessions_open", door="socks"), 1)

    def test_delivery(self) -> None:
        """With --relay: the queue by state, recipients' outcomes, whether the relay answered."""
        delivery = self.top.site.readiness.delivery
        families = scrape(self.top)
        self.assertEqual(value(families, "authgateway_queue_messages", state="queued"), 0)
        self.assertNotIn("authgateway_relay_reachable", families)  # no attempt yet
        delivery._connect = lambda *args: defer.fail(RelayError("connection refused"))
        self.failureResultOf(defer.ensureDeferred(delivery._open()))
        delivery.outcomes.update({"delivered": 3, "deferred": 1})
        families = scrape(self.top)
        self.assertEqual(value(families, "authgateway_relay_reachable"), 0)
        self.assertEqual(value(families, "authgateway_relay_connections_total", outcome="failed"), 1)
        self.assertEqual(value(families, "authgateway_relay_recipients_total", outcome="delivered"), 3)
        self.flushLoggedErrors()

    def test_promtool(self) -> None:
        """The real promtool finds nothing to say about a scrape with every family in it."""
        promtool = require_tool("promtool", "prometheus")
        self.test_http_sessions_and_statuses()
        self.test_socks_bytes_live_and_ended()
        self.top.site.readiness.delivery.relay_reachable = True
        self.core.events.login(event())
        self.core.events.login(event(protocol="http", listener="http", mechanism="Bearer",
                                     outcome="throttled", reason="throttled", duration=3.0))
        text = generate_latest(self.top.site.registry)
        done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                              timeout=30, check=False)
        self.assertEqual((done.returncode, done.stdout, done.stderr), (0, b"", b""), text.decode())


class HealthTests(TestCase):
    """/healthz and /readyz through the listener's own resources (treq's StubTreq)."""

    def setUp(self) -> None:
        self.top = gateway(self, "--hash-threads", "1")
        self.readiness = self.top.site.readiness
        self.readiness.delivery = Relaying()  # as with --relay (whose scans need real threads)
        self.treq = StubTreq(self.top.site.resource)

    def start(self) -> None:
        self.top.privilegedStartService()
        self.top.startService()
        self.addCleanup(self.stop)

    def stop(self) -> defer.Deferred[None]:
        """Stop the gateway: its event sinks (this listener) a reactor turn after the rest."""
        stopping = self.top.stopService()
        self.top.core.reactor.advance(0)
        return stopping

    @defer.inlineCallbacks
    def get(self, path: str) -> Any:
        response = yield self.treq.get("http://metrics.test" + path)
        body = yield response.text()
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        return response.code, json.loads(body)

    @defer.inlineCallbacks
    def test_ready(self):
        self.start()
        code, body = yield self.get("/readyz")
        self.assertEqual((code, body["status"]), (200, "ready"), body)
        self.assertEqual(body["checks"]["listeners"]["states"],
                         {"smtp": "listening", "http": "listening", "socks": "listening"})
        self.assertEqual(body["checks"]["relay"], {"ok": True, "reachable": None})
        self.assertEqual((yield self.get("/healthz")), (200, {"status": "ok"}))

    @defer.inlineCallbacks
    def test_not_started(self):
        """Before the start: the hash pool is not running, nothing listens."""
        code, body = yield self.get("/readyz")
        self.assertEqual(code, 503)
        self.assertFalse(body["checks"]["hash_pool"]["ok"])
        self.assertEqual(set(body["checks"]["listeners"]["states"].values()), {"stopped"})
        self.assertEqual((yield self.get("/healthz"))[0], 200)

    @defer.inlineCallbacks
    def test_hash_pool_full(self):
        self.start()
        pool = self.top.core.hash_pool
        pool.pending = pool.max_pending
        self.addCleanup(setattr, pool, "pending", 0)
        code, body = yield self.get("/readyz")
        self.assertEqual((code, body["checks"]["hash_pool"]["ok"]), (503, False))

    @defer.inlineCallbacks
    def test_hash_pool_stopped(self):
        self.start()
        yield self.top.core.hash_pool.disownServiceParent()  # stops it, once
        code, body = yield self.get("/readyz")
        self.assertEqual((code, body["checks"]["hash_pool"]["running"]), (503, False))

    @defer.inlineCallbacks
    def test_listener_failed(self):
        """A listener that could not listen (its port taken) makes the gateway not ready."""
        watch = listener(self.top, "socks").endpoint
        watch.endpoint = Refusing()
        self.start()
        self.flushLoggedErrors(error.CannotListenError)
        code, body = yield self.get("/readyz")
        self.assertEqual(code, 503)
        self.assertEqual(body["checks"]["listeners"]["states"]["socks"], "failed")
        self.assertEqual(value(scrape(self.top), "authgateway_listener_up", listener="socks"), 0)

    @defer.inlineCallbacks
    def test_listener_stopped(self):
        self.start()
        yield listener(self.top, "http").stopService()
        code, body = yield self.get("/readyz")
        self.assertEqual((code, body["checks"]["listeners"]["states"]["http"]), (503, "stopped"))

    @defer.inlineCallbacks
    def test_relay_unreachable(self):
        self.start()
        self.readiness.delivery.relay_reachable = False
        code, body = yield self.get("/readyz")
        self.assertEqual((code, body["checks"]["relay"]), (503, {"ok": False, "reachable": False}))
        self.readiness.delivery.relay_reachable = True
        self.assertEqual((yield self.get("/readyz"))[0], 200)

    @defer.inlineCallbacks
    def test_not_ready_while_draining(self):
        """
        During the drain the front doors' listeners are stopped but the
        metrics listener still answers: 503 until the core stops.
        """
        self.top.privilegedStartService()
        self.top.startService()  # stopped by the test itself
        session = listener(self.top, "socks").factory.buildProtocol(
            IPv4Address("TCP", "127.0.0.1", 1))
        session.makeConnection(StringTransport())  # a SOCKS session drains until the deadline
        stopping = self.top.stopService()
        self.assertTrue(self.top.getServiceNamed("metrics").running)
        code, body = yield self.get("/readyz")
        self.assertEqual((code, body["checks"]["listeners"]["states"]["socks"]), (503, "stopped"))
        self.top.core.reactor.advance(self.top.options["drain-timeout"])
        session.connectionLost(Failure(error.ConnectionAborted()))  # what the abort does
        self.top.core.reactor.advance(1)
        yield stopping
        self.assertFalse(self.top.getServiceNamed("metrics").running)

    def test_body_dropped(self):
        """The listener reads no request body into memory."""
        request = metrics._Request(DummyChannel(), False)
        request.gotLength(10**9)
        request.handleContentChunk(b"x" * 1000)
        self.assertEqual(request.content.getvalue(), b"")


class _IdlePool:
    """A thread pool whose threads never run: the WSGI app never answers."""

    def callInThread(self, *args: Any, **kwargs: Any) -> None:
        pass


class ListenerTests(SynchronousTestCase):
    """
    The metrics listener's own bounds: a deadline for the request headers
    and for the connection however slowly a client trickles, a cap per
    address besides the total, one request per connection.
    """

    def setUp(self) -> None:
        self.top = gateway(self)
        self.reactor = self.top.core.reactor
        self.capped = self.top.getServiceNamed("metrics").factory

    def connect(self, host: str = "192.0.2.1", port: int = 40000) -> tuple[Any, StringTransport]:
        """A connection to the listener's factory, or (None, None) when it is refused."""
        address = (IPv6Address if ":" in host else IPv4Address)("TCP", host, port)
        proto = self.capped.buildProtocol(address)
        if proto is None:
            return None, None
        transport = StringTransport(peerAddress=address)
        proto.makeConnection(transport)
        self.addCleanup(self.lose, proto, transport)
        return proto, transport

    def lose(self, proto: Any, transport: StringTransport) -> None:
        """The connection's end, delivered once (StringTransport does not)."""
        if not getattr(transport, "lost", False):
            transport.lost = True  # type: ignore[attr-defined]
            proto.connectionLost(Failure(error.ConnectionDone()))

    def closed(self, proto: Any, transport: StringTransport) -> bool:
        """Whether the listener closed or aborted C{transport} (then its end is delivered)."""
        if transport.disconnecting or transport.disconnected:
            self.lose(proto, transport)
            return True
        return False

    def test_trickling_headers_cut_at_deadline(self) -> None:
        """A header line every 4 s keeps resetting the idle timeout, not the headers' deadline."""
        proto, transport = self.connect()
        proto.dataReceived(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        self.reactor.advance(4)
        proto.dataReceived(b"X-A: b\r\n")
        self.reactor.advance(metrics.HEADERS_DEADLINE - 4 - 0.01)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(0.01)
        self.assertTrue(transport.disconnected)  # aborted: nothing more is owed to it
        self.assertEqual(transport.value(), b"")
        self.assertTrue(self.closed(proto, transport))
        self.assertEqual((len(self.capped.protocols), self.capped.peers), (0, {}))
        self.assertFalse(any(c.active() for c in self.reactor.getDelayedCalls()))

    def test_whole_exchange_deadline(self) -> None:
        """Headers in time, an answer that never comes: the connection ends at L{DEADLINE}."""
        self.reactor.getThreadPool = _IdlePool  # type: ignore[attr-defined]
        proto, transport = self.connect()
        proto.dataReceived(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        self.reactor.advance(metrics.HEADERS_DEADLINE + 1)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(metrics.DEADLINE - metrics.HEADERS_DEADLINE - 1)
        self.assertTrue(transport.disconnected)
        self.assertTrue(self.closed(proto, transport))

    def test_one_request_per_connection(self) -> None:
        """C{Connection: close} on the answer; a pipelined second request is not answered."""
        proto, transport = self.connect()
        proto.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 50)
        answer = transport.value()
        self.assertEqual(answer.count(b"HTTP/1.1 "), 1)
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "))
        self.assertIn(b"\r\nConnection: close\r\n", answer)
        self.assertTrue(self.closed(proto, transport))
        self.assertFalse(any(c.active() for c in self.reactor.getDelayedCalls()))

    def test_cap_per_address(self) -> None:
        """A fifth connection from one address is refused while other addresses are served."""
        held = [self.connect("192.0.2.1", port) for port in range(1, metrics.MAX_PER_PEER + 1)]
        self.assertEqual(self.connect("192.0.2.1", 99), (None, None))
        self.assertEqual(self.connect("::ffff:192.0.2.1", 99), (None, None))  # the same address
        proto, transport = self.connect("192.0.2.2")
        proto.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))
        self.lose(*held[0])  # one of the four gone: room for one more
        self.assertIsNotNone(self.connect("192.0.2.1", 100)[0])
        self.assertEqual(self.connect("192.0.2.1", 101), (None, None))

    def test_cap_per_ipv6_64(self) -> None:
        """IPv6 addresses count by /64: one host owns a whole one."""
        for n in range(metrics.MAX_PER_PEER):
            self.assertIsNotNone(self.connect(f"2001:db8:1:2::{n + 1}")[0])
        self.assertEqual(self.connect("2001:db8:1:2::ff"), (None, None))
        self.assertIsNotNone(self.connect("2001:db8:1:3::1")[0])

    def test_total_cap(self) -> None:
        for n in range(metrics.MAX_CONNECTIONS):
            self.assertIsNotNone(self.connect(f"192.0.2.{n + 10}")[0])
        self.assertEqual(self.connect("192.0.2.200"), (None, None))

    def test_snapshot_reused_within_a_second(self) -> None:
        """
        However many scrapes arrive, the reactor reads the components at most
        once a second; a scrape after that sees the new counts.
        """
        collector = self.top.site.resource.children[b"metrics"].refresh.__self__
        readings = []
        families = collector.families
        collector.families = lambda: readings.append(1) or families()  # type: ignore[method-assign]
        for _ in range(1000):
            collector.refresh()
        self.assertEqual(len(readings), 1)
        self.top.core.events.login(event())
        self.reactor.advance(metrics.SNAPSHOT_AGE - 0.01)
        collector.refresh()
        self.assertEqual(len(readings), 1)
        self.reactor.advance(0.01)
        collector.refresh()
        self.assertEqual(len(readings), 2)
        attempts = next(f for f in collector.latest if f.name == "authgateway_login_attempts")
        self.assertEqual(sum(s.value for s in attempts.samples), 1)


class Relaying:
    """What readiness reads of the delivery service."""

    relay_reachable = None


class Refusing:
    def listen(self, factory: Any) -> defer.Deferred[Any]:
        return defer.fail(error.CannotListenError("127.0.0.1", 1, OSError("in use")))
