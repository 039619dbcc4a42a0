# -*- test-case-name: tests.test_metrics,tests.test_metrics_workers -*-
"""
The metrics and health listener (C{--metrics ENDPOINT}): a plain
twisted.web Site, apart from the front doors and their connection budget,
serving C{/metrics} (Prometheus text, from the gateway's own
C{CollectorRegistry}), C{/healthz} and C{/readyz} (JSON, 200 or 503).

The metrics are pulled: the components keep plain counters (the hash pool,
the verifier's cache, the throttle, the spool, the delivery queue, each
SOCKS factory and HTTP site, the connection counts), and the
L{GatewayCollector} reads them at scrape time, in the reactor thread. The
only thing pushed is the login event of the L{Events} hub, which
L{LoginMetrics} (a sink) turns into two counter increments and a histogram
bucket. Every label comes from a fixed set (protocols, the configured
listeners and mechanisms, outcomes, reason codes, states, status and reply
codes): never a user name, an address or a path.

With C{--workers N} each worker serves this listener on a private UNIX
socket, and the parent serves C{--metrics} itself (L{serve_parent}): the
workers' families merged, each sample labelled with its C{worker}, plus the
parent's own, and health and readiness over every worker.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import make_wsgi_app
from prometheus_client.parser import text_string_to_metric_families
from twisted.application import internet, service
from twisted.internet import defer, endpoints, protocol, task, threads
from twisted.internet.address import UNIXAddress
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.protocols import policies
from twisted.python import threadable
from twisted.python.failure import Failure
from twisted.web import client, http, resource, server
from twisted.web.client import ResponseDone
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.wsgi import WSGIResource
from zope.interface import implementer

from gateway.addresses import peer_key
from gateway.checkers.files import IReloadable
from gateway.events import REASONS, AuthzEvent, LoginEvent
from gateway.tally import LATENCY_BUCKETS, Tally
from gateway.smtp.queue import STATUSES

if TYPE_CHECKING:
    from gateway.core import Core

#: The front doors (ConnectionMeta.protocol, Connections' door names).
DOORS = ("smtp", "http", "socks")

#: L{LoginEvent.outcome} values.
OUTCOMES = ("success", "failure", "throttled", "temporary", "unsupported", "error", "cancelled")

#: SOCKS5 reply codes (RFC 1928 REP 0-8).
SOCKS_REPLIES = frozenset(range(9))

#: The mechanisms of the HTTP and SOCKS front doors (SMTP's come from its settings).
FIXED_MECHANISMS = ("Basic", "Bearer", "RFC1929")

#: Connections the metrics listener holds at once, from one address (IPv6
#: by /64) of them, and their idle seconds.
MAX_CONNECTIONS = 16
MAX_PER_PEER = 4
TIMEOUT = 10.0
#: Seconds from the accept to the end of the request headers, and to the end
#: of the connection (one request each): however slowly a client trickles.
HEADERS_DEADLINE = 5.0
DEADLINE = 30.0
#: A scrape this soon (seconds) after the last snapshot is served that one.
SNAPSHOT_AGE = 1.0

log = Logger()


def _bounded(value: Any, allowed: Iterable[Any]) -> str:
    return value if value in allowed else "other"


class LoginMetrics:
    """
    A sink of the core's L{Events}: each login counted by protocol,
    listener, mechanism, outcome and reason (each bounded to a fixed set,
    so no client can grow the table), and its duration observed per
    protocol; authorization decisions counted by protocol and verdict.

    What an event's fields map to is remembered with its count (at most
    L{MAX_SHAPES} combinations; the rest are counted by their bounded
    labels): a login costs a tuple, a dict lookup, an increment and a
    histogram bucket.
    """

    #: Distinct raw (protocol, listener, mechanism, outcome, reason) remembered.
    MAX_SHAPES = 1024

    def __init__(self, listeners: Iterable[str], mechanisms: Iterable[str]) -> None:
        self.listeners = frozenset(listeners)
        self.mechanisms = frozenset(mechanisms)
        self.latency: dict[str, Tally] = {door: Tally(LATENCY_BUCKETS) for door in DOORS}
        self.decisions: Counter[tuple[str, str]] = Counter()
        #: raw fields -> [labels, latency tally, count].
        self._shapes: dict[tuple[Any, ...], list[Any]] = {}
        #: labels -> [labels, latency tally, count], for raw fields past L{MAX_SHAPES}.
        self._others: dict[tuple[str, ...], list[Any]] = {}

    @property
    def attempts(self) -> Counter[tuple[str, str, str, str, str]]:
        """Logins counted by their labels (read at scrape time)."""
        counts: Counter[tuple[str, str, str, str, str]] = Counter()
        for key, _, count in (*self._shapes.values(), *self._others.values()):
            counts[key] += count
        return counts

    def _shape(self, raw: tuple[Any, ...]) -> list[Any]:
        protocol, listener, mechanism, outcome, reason = raw
        protocol = _bounded(protocol, DOORS)
        key = (protocol, _bounded(listener, self.listeners), _bounded(mechanism, self.mechanisms),
               _bounded(outcome, OUTCOMES), _bounded(reason, REASONS))
        tally = self.latency.get(protocol)
        if tally is None:
            tally = self.latency[protocol] = Tally(LATENCY_BUCKETS)
        if len(self._shapes) < self.MAX_SHAPES:
            shape = self._shapes[raw] = [key, tally, 0]
            return shape
        return self._others.setdefault(key, [key, tally, 0])

    def login(self, event: LoginEvent) -> None:
        raw = (event.protocol, event.listener, event.mechanism, event.outcome, event.reason)
        shape = self._shapes.get(raw) or self._shape(raw)
        shape[2] += 1
        shape[1].observe(event.duration)

    def authz(self, event: AuthzEvent) -> None:
        protocol = event.protocol if event.protocol in DOORS else "other"
        self.decisions[(protocol, "allowed" if event.allowed else "denied")] += 1


@implementer(IStreamServerEndpoint)
class WatchedEndpoint:
    """An endpoint that remembers whether its listener is listening, for readiness."""

    def __init__(self, endpoint: IStreamServerEndpoint) -> None:
        self.endpoint = endpoint
        self.port: Any = None
        #: Why the last listen failed (one line), or None.
        self.failure: str | None = None

    def listen(self, factory: Any) -> Any:
        def listening(port: Any) -> Any:
            self.port, self.failure = port, None
            return port

        def failed(reason: Failure) -> Failure:
            self.port, self.failure = None, reason.getErrorMessage()
            return reason

        return self.endpoint.listen(factory).addCallbacks(listening, failed)


def _listener_name(factory: Any) -> str | None:
    """The listener a front door's (wrapped) factory serves (L{LimitedFactory.listener})."""
    for _ in range(8):
        name = getattr(factory, "listener", None)
        if isinstance(name, str):
            return name
        factory = getattr(factory, "wrappedFactory", None)
        if factory is None:
            return None
    return None


def watch_listeners(top: service.IServiceCollection) -> dict[str, tuple[Any, WatchedEndpoint]]:
    """
    Every front-door listener among C{top}'s services, by name, with its
    endpoint wrapped in a L{WatchedEndpoint} (before it starts listening).
    """
    watched = {}
    for child in top:
        if not isinstance(child, internet.StreamServerEndpointService):
            continue
        name = _listener_name(child.factory)
        if name is None:
            continue
        if not isinstance(child.endpoint, WatchedEndpoint):
            child.endpoint = WatchedEndpoint(child.endpoint)
        watched[name] = (child, child.endpoint)
    return watched


def listener_state(listening: Any, watch: WatchedEndpoint) -> str:
    """C{listening}, C{failed}, C{stopped} or C{starting}."""
    if watch.failure is not None:
        return "failed"
    if not listening.running:
        return "stopped"
    return "listening" if watch.port is not None else "starting"


class Readiness:
    """
    What C{/readyz} checks: the password and token stores loaded (a failed
    reload keeps the last good version: ready, but said), the hash pool
    started and not full, every listener listening, and with C{--relay} the
    relay reached at the last attempt (none yet: ready).
    """

    def __init__(
        self,
        core: Core,
        checkers: Iterable[Any],
        listeners: Mapping[str, tuple[Any, WatchedEndpoint]],
        delivery: Any = None,
    ) -> None:
        self.core = core
        self.stores = [c.file for c in checkers if IReloadable.providedBy(c) and hasattr(c, "file")]
        self.listeners = listeners
        self.delivery = delivery

    def checks(self) -> dict[str, dict[str, Any]]:
        """Each check's C{ok} and what it looked at (no path, no address)."""
        pool = self.core.hash_pool
        states = {name: listener_state(*pair) for name, pair in self.listeners.items()}
        checks: dict[str, dict[str, Any]] = {
            "stores": {
                "ok": all(store.value is not None for store in self.stores),
                "loaded": sum(store.value is not None for store in self.stores),
                "reload_failing": sum(store.failing for store in self.stores),
            },
            "hash_pool": {
                "ok": bool(pool.running) and pool.pending < pool.max_pending,
                "running": bool(pool.running),
                "pending": pool.pending,
                "limit": pool.max_pending,
            },
            "listeners": {"ok": all(s == "listening" for s in states.values()), "states": states},
        }
        if self.delivery is not None:
            reachable = self.delivery.relay_reachable
            checks["relay"] = {"ok": reachable is not False, "reachable": reachable}
        return checks

    def ready(self) -> tuple[bool, dict[str, dict[str, Any]]]:
        checks = self.checks()
        return all(check["ok"] for check in checks.values()), checks


def _family(kind: type[Metric], name: str, doc: str, labels: Iterable[str] = (),
            samples: Iterable[tuple[Iterable[str], float]] = ()) -> Metric:
    family = kind(name, doc, labels=list(labels))
    for values, value in samples:
        family.add_metric(list(values), value)
    return family


def _histogram(name: str, doc: str, label: str | None, tallies: Mapping[str, Tally]) -> Metric:
    family = HistogramMetricFamily(name, doc, labels=[label] if label else [])
    for value, tally in tallies.items():
        family.add_metric([value] if label else [], tally.cumulative(), sum_value=tally.sum)
    return family


class GatewayCollector:
    """
    Reads the components' counters at scrape time, in the reactor thread
    only: L{MetricsResource} takes a L{refresh}ed snapshot there before the
    WSGI thread formats it, so no thread ever reads what the reactor is
    changing (nor waits for the reactor: a scrape during shutdown cannot
    hang the thread pool's stop).
    """

    def __init__(
        self,
        core: Core,
        logins: LoginMetrics,
        readiness: Readiness,
        doors: Mapping[str, Any],
        delivery: Any = None,
    ) -> None:
        self.core = core
        self.logins = logins
        self.readiness = readiness
        self.doors = doors
        self.delivery = delivery
        #: The families as of the last L{refresh}, for a collection from another thread.
        self.latest: list[Metric] = []
        #: When (reactor seconds) L{latest} was taken; None: never.
        self.taken: float | None = None

    def describe(self) -> list[Metric]:
        return []  # nothing to check at registration: the names are ours alone

    def refresh(self) -> None:
        """
        Take the snapshot a scrape from the WSGI thread will see (reactor
        thread), unless the last one is younger than L{SNAPSHOT_AGE}: at most
        one a second costs the reactor a reading, however many scrapes come.
        """
        now = self.core.reactor.seconds()
        if self.taken is not None and 0 <= now - self.taken < SNAPSHOT_AGE:
            return
        self.latest, self.taken = self.families(), now

    def collect(self) -> Iterable[Metric]:
        if threadable.ioThread in (None, threadable.getThreadID()):  # no reactor thread yet, or it
            return self.families()
        return self.latest

    def families(self) -> list[Metric]:
        """Every metric family, read now (reactor thread)."""
        core, logins = self.core, self.logins
        out = [
            _family(CounterMetricFamily, "authgateway_login_attempts",
                    "Login attempts by protocol, listener, mechanism, outcome and reason.",
                    ("protocol", "listener", "mechanism", "outcome", "reason"),
                    sorted(logins.attempts.items())),
            _histogram("authgateway_login_duration_seconds",
                       "Seconds from a login attempt to its outcome (throttle waits and failure"
                       " delays included).", "protocol", logins.latency),
            _family(CounterMetricFamily, "authgateway_authz_decisions",
                    "Authorization decisions of the access policy.", ("protocol", "decision"),
                    sorted(logins.decisions.items())),
        ]
        pool = core.hash_pool
        out += [
            _family(GaugeMetricFamily, "authgateway_hash_queue_depth",
                    "Hash verifications queued or running.", (), [((), pool.pending)]),
            _family(GaugeMetricFamily, "authgateway_hash_queue_limit",
                    "Hash verifications queued or running before new ones fail (--hash-queue).",
                    (), [((), pool.max_pending)]),
            _histogram("authgateway_hash_verification_seconds",
                       "Seconds a hash verification ran in its thread (decoys included).",
                       None, {"": pool.timings}),
            _family(CounterMetricFamily, "authgateway_hash_refusals",
                    "Hash verifications refused: queue full, a peer's or network's share used,"
                    " or stopping.", ("reason",),
                    [((r,), pool.refused[r]) for r in ("full", "peer_share", "network_share",
                                                       "stopping")]),
        ]
        verifier = core.verifier
        out += [
            _family(CounterMetricFamily, "authgateway_cache_hits",
                    "Password verifications answered from the cache.", (), [((), verifier.hits)]),
            _family(CounterMetricFamily, "authgateway_cache_misses",
                    "Password verifications that needed a hash.", (), [((), verifier.misses)]),
            _family(CounterMetricFamily, "authgateway_cache_coalesced",
                    "Password verifications that joined an identical one in flight.",
                    (), [((), verifier.coalesced)]),
            _family(GaugeMetricFamily, "authgateway_cache_entries",
                    "Verified passwords cached now.", (), [((), verifier.cached)]),
        ]
        throttle = core.throttle
        out += [
            _family(CounterMetricFamily, "authgateway_throttle_refusals",
                    "Login attempts refused by the throttle, by the limit reached.", ("limit",),
                    [((k,), throttle.refused[k]) for k in ("peer", "pair")]),
            _family(CounterMetricFamily, "authgateway_throttle_delays",
                    "Login attempts held back by a user's failure ceiling.", (),
                    [((), throttle.delayed)]),
        ]
        connections = core.connections
        doors = [d for d in DOORS if d in self.doors]
        out += [
            _family(GaugeMetricFamily, "authgateway_sessions_open",
                    "Connections open now per front door.", ("door",),
                    [((d,), len(connections.sessions.get(d, ()))) for d in doors]),
            _family(CounterMetricFamily, "authgateway_sessions",
                    "Connections admitted since the start per front door.", ("door",),
                    [((d,), connections.opened[d]) for d in doors]),
            _family(GaugeMetricFamily, "authgateway_descriptors_in_use",
                    "Descriptors held by connections (weighted), against the budget.", (),
                    [((), connections.in_use())]),
        ]
        if connections.budget is not None:
            out.append(_family(GaugeMetricFamily, "authgateway_descriptor_budget",
                               "Descriptors connections may hold.", (),
                               [((), connections.budget)]))
        spool = core.spool
        protocols = sorted(set(spool.accepted))
        out += [
            _family(CounterMetricFamily, "authgateway_spool_messages",
                    "Messages committed to the spool, by protocol word (ESMTPSA, HTTP, DSN...).",
                    ("protocol",), [((p,), spool.accepted[p]) for p in protocols]),
            _family(CounterMetricFamily, "authgateway_spool_bytes",
                    "Bytes of the messages committed to the spool.", ("protocol",),
                    [((p,), spool.accepted_bytes[p]) for p in protocols]),
        ]
        out += self._delivery()
        out += self._socks()
        out += self._http()
        ready, checks = self.readiness.ready()
        out += [
            _family(GaugeMetricFamily, "authgateway_listener_up",
                    "1 while the listener is listening.", ("listener",),
                    [((name,), int(state == "listening"))
                     for name, state in sorted(checks["listeners"]["states"].items())]),
            _family(GaugeMetricFamily, "authgateway_ready",
                    "1 when /readyz answers 200.", (), [((), int(ready))]),
        ]
        return out

    def _delivery(self) -> list[Metric]:
        delivery = self.delivery
        if delivery is None:
            return []
        out = [
            _family(GaugeMetricFamily, "authgateway_queue_messages",
                    "Queued messages by status, at the last scan of the spool.", ("state",),
                    [((s,), delivery.states.get(s, 0)) for s in STATUSES]),
            _family(CounterMetricFamily, "authgateway_relay_recipients",
                    "Recipients' outcomes of relay attempts.", ("outcome",),
                    [((o,), delivery.outcomes[o]) for o in ("delivered", "deferred", "failed")]),
            _family(CounterMetricFamily, "authgateway_relay_connections",
                    "Relay connections opened, or attempts on which every relay failed.",
                    ("outcome",), [((o,), delivery.connects[o]) for o in ("ok", "failed")]),
            _family(CounterMetricFamily, "authgateway_relay_bounces",
                    "Bounces (DSN) sent for failed recipients.", (), [((), delivery.bounces)]),
        ]
        if delivery.relay_reachable is not None:
            out.append(_family(GaugeMetricFamily, "authgateway_relay_reachable",
                               "1 when the last attempt to reach a relay succeeded.", (),
                               [((), int(delivery.relay_reachable))]))
        return out

    def _socks(self) -> list[Metric]:
        door = self.doors.get("socks")
        if door is None:
            return []
        from gateway.connections import door_protocol

        up = sum(f.ended_up for f in door.factories)
        down = sum(f.ended_down for f in door.factories)
        for session in self.core.connections.sessions.get("socks", ()):
            proto = door_protocol(session)
            up += getattr(proto, "up", 0)
            down += getattr(proto, "down", 0)
        replies: Counter[str] = Counter()
        for factory in door.factories:
            for code, n in factory.replies.items():
                replies[str(code) if code in SOCKS_REPLIES else "other"] += n
        return [
            _family(CounterMetricFamily, "authgateway_socks_bytes",
                    "Bytes relayed by SOCKS tunnels: up (client to destination) and down.",
                    ("direction",), [(("up",), up), (("down",), down)]),
            _family(CounterMetricFamily, "authgateway_socks_replies",
                    "SOCKS sessions ended, by the reply code (REP) they got.", ("reply",),
                    sorted(((k,), v) for k, v in replies.items())),
        ]

    def _http(self) -> list[Metric]:
        door = self.doors.get("http")
        if door is None:
            return []
        codes: Counter[str] = Counter()
        for site in door.sites:
            codes.update(site.statuses)  # counted by label (http_code_label) already
        return [_family(CounterMetricFamily, "authgateway_http_responses",
                        "HTTP responses by status code (uncommon codes by class, 4xx).", ("code",),
                        sorted(((k,), v) for k, v in codes.items()))]


class _Status(resource.Resource):
    """C{/healthz} or C{/readyz}: JSON, 200 or 503, never cached."""

    isLeaf = True

    def __init__(self, answer: Any) -> None:
        super().__init__()
        self.answer = answer

    def render_GET(self, request: server.Request) -> Any:
        answer = self.answer()
        if isinstance(answer, defer.Deferred):  # the parent's, asked of its workers
            return _answer_later(request, answer, lambda result: self._json(request, *result))
        return self._json(request, *answer)

    @staticmethod
    def _json(request: server.Request, ok: bool, body: Any) -> bytes:
        request.setResponseCode(200 if ok else 503)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body, sort_keys=True).encode() + b"\n"


def _answer_later(request: server.Request, pending: defer.Deferred[Any],
                  render: Callable[[Any], bytes | None]) -> Any:
    """
    Answer C{request} once C{pending} fires, with what C{render} makes of its
    result (None: C{render} answered itself), unless the client left first;
    a failure (a bug: the answers are built not to fail) is a 500, logged.
    """
    gone: list[bool] = []
    request.notifyFinish().addErrback(lambda _: gone.append(True))

    def done(result: Any) -> None:
        if gone:
            return
        body = render(result)
        if body is not None:
            request.write(body)
            request.finish()

    def failed(reason: Failure) -> None:
        log.failure("metrics listener: answering {path}", reason, path=request.path.decode("latin-1"))
        if not gone:
            request.setResponseCode(500)
            request.finish()

    pending.addCallback(done).addErrback(failed)
    return server.NOT_DONE_YET


@attrs.frozen
class _SocketEnd:
    """A UNIX socket's end as Twisted's WSGI container reads it (a C{host} and a C{port})."""

    host: str = ""
    port: int = 0


class _Request(server.Request):
    """
    A request whose body, if any, is read and dropped: nothing here takes
    one. On a UNIX socket (C{--metrics unix:PATH}, each worker's with
    C{--workers}) both ends get an empty host and port 0: Twisted's WSGI
    container reads C{host} and C{port} of each, which UNIX addresses lack.
    """

    def gotLength(self, length: int | None) -> None:
        super().gotLength(0)

    def handleContentChunk(self, data: bytes) -> None:
        pass

    def getClientAddress(self) -> Any:
        return _addressed(super().getClientAddress())

    def getHost(self) -> Any:
        return _addressed(super().getHost())


def _addressed(address: Any) -> Any:
    return _SocketEnd() if isinstance(address, UNIXAddress) else address


class _Channel(http.HTTPChannel):
    """
    One request per connection (C{Connection: close}: no keep-alive, no
    pipelined requests queued), its headers in within L{HEADERS_DEADLINE}
    of the accept and the connection over within L{DEADLINE}: the idle
    timeout starts again at every byte, so a client sending one header line
    every few seconds would otherwise hold its connection for hours.
    """

    _headers_due: Any = None
    _over_due: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._headers_due = self.callLater(HEADERS_DEADLINE, self._expired)
        self._over_due = self.callLater(DEADLINE, self._expired)

    def allHeadersReceived(self) -> None:
        _cancel(self._headers_due)
        super().allHeadersReceived()

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        request.responseHeaders.setRawHeaders(b"connection", [b"close"])
        return False

    def _expired(self) -> None:
        self.transport.abortConnection()  # a reader too slow for the answer too

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        _cancel(self._headers_due)
        _cancel(self._over_due)
        super().connectionLost(reason)


def _cancel(call: Any) -> None:
    if call is not None and call.active():
        call.cancel()


class MetricsSite(server.Site):
    """The listener's Site: no access log (a scrape every few seconds), no factory chatter."""

    noisy = False
    protocol = _Channel
    requestFactory = _Request
    registry: CollectorRegistry
    readiness: Readiness

    def log(self, request: server.Request) -> None:
        pass


class _Capped(policies.WrappingFactory):
    """
    At most C{limit} connections at once, C{per_peer} of them from one
    address (IPv6 by /64: L{peer_key}), so a few slow clients of one address
    cannot hold them all; more are closed at accept. Not Twisted's
    C{LimitTotalConnectionsFactory}: it builds C{protocol()} itself instead
    of wrapping a factory (the site's C{buildProtocol}, which gives each
    channel its C{site}, request factory and timeout, would never run), and
    it has no per-address cap.
    """

    noisy = False

    def __init__(self, wrapped: Any, limit: int, per_peer: int) -> None:
        super().__init__(wrapped)
        self.limit = limit
        self.per_peer = per_peer
        #: Open connections per peer key.
        self.peers: Counter[str] = Counter()
        self._keys: dict[Any, str] = {}

    def buildProtocol(self, addr: Any) -> Any:
        key = peer_key(getattr(addr, "host", None))  # None: a UNIX socket, only the total
        if len(self.protocols) >= self.limit or (key is not None and self.peers[key] >= self.per_peer):
            return None
        proto = super().buildProtocol(addr)
        if proto is not None and key is not None:
            self.peers[key] += 1
            self._keys[proto] = key
        return proto

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        key = self._keys.pop(p, None)
        if key is not None:
            self.peers[key] -= 1
            if self.peers[key] <= 0:
                del self.peers[key]


class MetricsResource(resource.Resource):
    """
    C{prometheus_client.twisted.MetricsResource(registry)} on the core's
    reactor: that module's one line takes the global reactor (imported when
    it is imported) and its thread pool; this is the same WSGI app, in the
    given reactor's pool, asked for at the first scrape. C{refresh} runs
    before each scrape, in the reactor thread.
    """

    isLeaf = True

    def __init__(self, reactor: Any, registry: CollectorRegistry,
                 refresh: Callable[[], defer.Deferred[None] | None] = lambda: None) -> None:
        super().__init__()
        self.reactor = reactor
        self.registry = registry
        self.refresh = refresh
        self._wsgi: WSGIResource | None = None

    def render(self, request: server.Request) -> Any:
        refreshed = self.refresh()  # in the reactor thread, before the WSGI thread collects
        if isinstance(refreshed, defer.Deferred):  # the parent's, asked of its workers

            def collect(_: None) -> None:
                self._collect(request)  # it answers itself

            return _answer_later(request, refreshed, collect)
        return self._collect(request)

    def _collect(self, request: server.Request) -> Any:
        """The WSGI app's answer (it finishes the request itself: NOT_DONE_YET)."""
        if self._wsgi is None:
            self._wsgi = WSGIResource(
                self.reactor, self.reactor.getThreadPool(), make_wsgi_app(self.registry)
            )
        return self._wsgi.render(request)


def build_site(reactor: Any, registry: CollectorRegistry, readiness: Readiness,
               refresh: Callable[[], None] = lambda: None) -> MetricsSite:
    """C{/metrics} (C{refresh} runs before each scrape), C{/healthz} and C{/readyz}."""
    root = resource.Resource()
    root.putChild(b"metrics", MetricsResource(reactor, registry, refresh))
    root.putChild(b"healthz", _Status(lambda: (True, {"status": "ok"})))

    def ready() -> tuple[bool, dict[str, Any]]:
        ok, checks = readiness.ready()
        return ok, {"status": "ready" if ok else "not ready", "checks": checks}

    root.putChild(b"readyz", _Status(ready))
    site = MetricsSite(root, timeout=TIMEOUT, reactor=reactor)
    site.registry, site.readiness = registry, readiness
    return site


def _listening(reactor: Any, description: str, site: MetricsSite,
               make: Callable[..., internet.StreamServerEndpointService]
               = internet.StreamServerEndpointService) -> internet.StreamServerEndpointService:
    """The listener's service on C{description}: C{site} behind the connection caps."""
    endpoint = endpoints.serverFromString(reactor, description)
    listening = make(endpoint, _Capped(site, MAX_CONNECTIONS, MAX_PER_PEER))
    listening.setName("metrics")
    return listening


def check_endpoint(description: str) -> str:
    """The C{--metrics} value: C{none} or a server endpoint string (ValueError otherwise)."""
    description = description.strip()
    if description.lower() == "none":
        return "none"
    try:
        endpoints.serverFromString(None, description)
    except Exception as e:
        raise ValueError(f"--metrics {description!r}: bad endpoint: {e}") from None
    return description


check_endpoint.coerceDoc = "An endpoint string, or 'none'."  # type: ignore[attr-defined]


def serve(options: Mapping[str, Any], core: Core, top: service.MultiService,
          doors: Mapping[str, Any]) -> CollectorRegistry | None:
    """
    With C{--metrics}, wire the metrics: the login sink on C{core.events},
    the collector on a registry of the gateway's own, the listeners watched
    for readiness, and the metrics listener added to C{top} as one of the
    core's services (it stops after the drain). Returns the registry (None
    without C{--metrics}).
    """
    description = options["metrics"]
    if description == "none":
        return None
    from gateway.smtp.delivery import Delivery

    delivery = next((s for s in core.services if isinstance(s, Delivery)), None)
    smtp = options.get("smtpSettings")
    mechanisms = (*FIXED_MECHANISMS, *(smtp.mechanisms if smtp is not None else ()))
    logins = LoginMetrics(options["endpoints"], mechanisms)
    core.events.add(logins)
    readiness = Readiness(core, options["coreSettings"].checkers, watch_listeners(top), delivery)
    registry = CollectorRegistry()
    collector = GatewayCollector(core, logins, readiness, doors, delivery)
    registry.register(collector)
    site = build_site(core.reactor, registry, readiness, collector.refresh)
    listening = _listening(core.reactor, description, site)
    # A core service stopped last (after the drain and the other core
    # services), so /readyz answers 503 (listeners stopped) until the end.
    listening.stops_last = True  # type: ignore[attr-defined]
    core.attach(listening)
    listening.setServiceParent(top)
    return registry


# The parent of --workers N: its listener answers for every worker.

#: What the parent reads of a worker's answer: bytes of C{/metrics} and of
#: C{/readyz}, and seconds for either (connect included).
WORKER_METRICS_LIMIT = 8 * 1024 * 1024
WORKER_READYZ_LIMIT = 64 * 1024
WORKER_TIMEOUT = 5.0
#: The types whose C{NAME_created} samples prometheus_client's text parser
#: gives a gauge family of their own.
_CREATED_OWNERS = frozenset({"counter", "histogram", "summary"})


class WorkerAnswerError(Exception):
    """A worker's metrics listener answered nothing usable (one line: why)."""


@implementer(IAgentEndpointFactory)
@attrs.frozen
class _WorkerSocket:
    """Every request of an Agent goes to one worker's metrics socket."""

    reactor: Any
    path: str
    timeout: float

    def endpointForURI(self, uri: Any) -> endpoints.UNIXClientEndpoint:
        return endpoints.UNIXClientEndpoint(self.reactor, self.path, timeout=self.timeout)


class _Bounded(protocol.Protocol):
    """
    A response body, at most C{limit} bytes: past it the connection is
    closed (C{stopProducing}: all a body's transport offers).
    """

    transport: Any  # the response's TransportProxyProducer

    def __init__(self, limit: int, done: defer.Deferred[bytes]) -> None:
        self.limit = limit
        self.done = done
        self.size = 0
        self.parts: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.done.errback(WorkerAnswerError(f"answer over {self.limit} bytes"))
            self.transport.stopProducing()
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self.done.called:
            return
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(WorkerAnswerError(f"answer cut short: {reason.getErrorMessage()}"))


def fetch_worker(reactor: Any, socket_path: str, path: bytes, limit: int,
                 timeout: float = WORKER_TIMEOUT) -> defer.Deferred[tuple[int, bytes]]:
    """
    C{GET path} of the worker metrics listener on the UNIX socket
    C{socket_path}: its status code and body, or a L{WorkerAnswerError}
    (no connection, no answer within C{timeout} seconds, a body over
    C{limit} bytes, a broken answer).
    """
    agent = client.Agent.usingEndpointFactory(reactor, _WorkerSocket(reactor, socket_path, timeout))

    async def get() -> tuple[int, bytes]:
        response = await agent.request(b"GET", b"http://worker" + path)
        done: defer.Deferred[bytes] = defer.Deferred(lambda _: reading.transport.stopProducing())
        reading = _Bounded(limit, done)
        response.deliverBody(reading)
        return response.code, await done

    def why(reason: Failure) -> Failure:
        if reason.check(WorkerAnswerError):
            return reason
        if reason.check(client.ResponseFailed) and reason.value.reasons:  # a list of failures
            reason = reason.value.reasons[0]
        said = reason.getErrorMessage().strip().splitlines()
        return Failure(WorkerAnswerError((said[0] if said else reason.type.__name__)[:200]))

    def late(result: Any, _: float) -> Failure:
        return Failure(WorkerAnswerError(f"no answer within {timeout:g} s"))

    fetching = defer.ensureDeferred(get())
    return fetching.addTimeout(timeout, reactor, onTimeoutCancel=late).addErrback(why)


def worker_families(text: str, worker: str) -> list[Metric]:
    """
    A worker's C{/metrics} text as families whose samples all carry
    C{worker="K"}; each C{NAME_created} gauge the text parser split off a
    counter, histogram or summary goes back into it (OpenMetrics writes it
    there). ValueError (and what the parser raises) on text that is not
    Prometheus text.
    """
    families = list(text_string_to_metric_families(text))
    owners = {family.name: family for family in families if family.type in _CREATED_OWNERS}
    out = []
    for family in families:
        owner = owners.get(family.name[:-len("_created")]) if family.name.endswith("_created") else None
        if owner is not None and family.type == "gauge":
            owner.samples += family.samples
            continue
        out.append(family)
    for family in out:
        family.samples = [s._replace(labels={**s.labels, "worker": worker}) for s in family.samples]
    return out


def merge_families(per_worker: Iterable[list[Metric]], reserved: Iterable[Metric] = ()) -> list[Metric]:
    """
    One family per name (its first help and type), holding every worker's
    samples in worker order. Left out: a family under the name of one of
    C{reserved} (the parent's own), of another type than the first under
    its name, or with a sample name another family has (junk the parser
    let through): the output stays one that promtool accepts.
    """
    merged: dict[str, Metric] = {}
    owner: dict[str, str] = {}  # sample name -> its family's name
    for family in reserved:
        merged[family.name] = family
        owner.update(dict.fromkeys((sample.name for sample in family.samples), family.name))
    taken = set(merged)
    for families in per_worker:
        for family in families:
            names = {sample.name for sample in family.samples}
            into = merged.get(family.name)
            if (family.name in taken or (into is not None and into.type != family.type)
                    or any(owner.get(n, family.name) != family.name for n in names)):
                continue
            owner.update(dict.fromkeys(names, family.name))
            if into is None:
                into = merged[family.name] = Metric(family.name, family.documentation, family.type,
                                                    family.unit)
            into.samples += family.samples
    return [family for name, family in merged.items() if name not in taken]


def _parse_all(texts: list[tuple[str, bytes]], reserved: list[Metric]) -> tuple[list[Metric], dict[str, str]]:
    """Every worker's families merged (run in a thread), and why a worker's text was refused."""
    parsed, refused = [], {}
    for worker, body in texts:
        try:
            parsed.append(worker_families(body.decode("utf-8"), worker))
        except Exception as e:  # the parser raises ValueError, and worse on some junk
            refused[worker] = f"not Prometheus text: {type(e).__name__}"
    return merge_families(parsed, reserved), refused


class WorkerMetrics:
    """
    What the parent of C{--workers N} serves on C{--metrics}: its workers'
    metrics (each asked over its own UNIX socket, all at once, the answers
    bounded in size and time) with a C{worker} label, its own families, and
    health and readiness from the supervisor's slots and the workers' own
    C{/readyz}. A worker that does not answer is left out of the scrape and
    counted; it never fails the whole scrape.
    """

    def __init__(self, reactor: Any, supervisor: Any) -> None:
        self.reactor = reactor
        self.supervisor = supervisor
        self.timeout = WORKER_TIMEOUT
        self.metrics_limit = WORKER_METRICS_LIMIT
        self.readyz_limit = WORKER_READYZ_LIMIT
        #: Scrapes of each worker (by slot index) that failed.
        self.errors: Counter[int] = Counter()
        #: Workers whose last scrape failed (logged at each change).
        self.failing: set[int] = set()
        #: The families of the last scrape, for the WSGI thread to format.
        self.latest: list[Metric] = []
        #: When (reactor seconds) L{latest} was taken; None: never.
        self.taken: float | None = None
        self._waiting: list[defer.Deferred[None]] = []

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> list[Metric]:
        return self.latest

    def refresh(self) -> defer.Deferred[None]:
        """
        Fires once L{latest} is at most L{SNAPSHOT_AGE} old: a scrape while
        another is under way waits for that one, so the workers are asked at
        most once at a time and once a second, however many scrapes come.
        """
        now = self.reactor.seconds()
        if self.taken is not None and 0 <= now - self.taken < SNAPSHOT_AGE and not self._waiting:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._waiting.append(waiter)
        if len(self._waiting) == 1:
            defer.ensureDeferred(self._scrape()).addErrback(
                lambda f: log.failure("metrics listener: scraping the workers", f)
            ).addBoth(lambda _: self._wake())
        return waiter

    def _wake(self) -> None:
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.callback(None)

    async def _ask(self, path: bytes, limit: int) -> list[tuple[Any, bool, Any]]:
        """Every running slot's answer to C{GET path}, asked at once: (slot, ok, answer or Failure)."""
        running = [slot for slot in self.supervisor.slots if slot.running]
        answers = await defer.DeferredList(
            [fetch_worker(self.reactor, slot.metrics_socket, path, limit, self.timeout)
             for slot in running], consumeErrors=True)
        return [(slot, ok, answer) for slot, (ok, answer) in zip(running, answers)]

    async def _scrape(self) -> None:
        answers = await self._ask(b"/metrics", self.metrics_limit)
        texts, refused = [], {}
        for slot, ok, answer in answers:
            if not ok:
                refused[str(slot.index)] = answer.getErrorMessage()
            elif answer[0] != 200:
                refused[str(slot.index)] = f"answered {answer[0]}"
            else:
                texts.append((str(slot.index), answer[1]))
        families, junk = await threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), _parse_all, texts, self.families())
        refused.update(junk)
        for slot, _, _ in answers:
            self._scraped(slot, refused.get(str(slot.index)))
        self.latest, self.taken = families + self.families(), self.reactor.seconds()

    def _scraped(self, slot: Any, why: str | None) -> None:
        """Count a failed scrape; log a worker's scrapes starting to fail, and working again."""
        if why is not None:
            self.errors[slot.index] += 1
            if slot.index not in self.failing:
                self.failing.add(slot.index)
                log.warn("metrics listener: worker {worker} (pid {pid}) left out of the scrape: {why}",
                         worker=slot.index, pid=slot.pid, why=why)
        elif slot.index in self.failing:
            self.failing.discard(slot.index)
            log.info("metrics listener: worker {worker} (pid {pid}) scraped again",
                     worker=slot.index, pid=slot.pid)

    def families(self) -> list[Metric]:
        """The parent's own families, read now."""
        slots = list(self.supervisor.slots)
        running = sum(bool(slot.running) for slot in slots)
        return [
            _family(GaugeMetricFamily, "authgateway_workers",
                    "Worker processes by state (--workers).", ("state",),
                    [(("running",), running), (("down",), len(slots) - running)]),
            _family(CounterMetricFamily, "authgateway_worker_restarts",
                    "Times the worker in each slot was started again after it ended.", ("worker",),
                    [((str(slot.index),), slot.restarts) for slot in slots]),
            _family(CounterMetricFamily, "authgateway_worker_scrape_errors",
                    "Scrapes that left out a running worker: no answer in time, an error, an"
                    " answer too large or not Prometheus text.", ("worker",),
                    [((str(slot.index),), self.errors[slot.index]) for slot in slots]),
        ]

    def healthy(self) -> tuple[bool, dict[str, Any]]:
        """C{/healthz}: this process answers, and serves while a worker runs."""
        slots = list(self.supervisor.slots)
        running = sum(bool(slot.running) for slot in slots)
        return running > 0, {"status": "ok" if running else "no worker running",
                             "workers": {"running": running, "down": len(slots) - running}}

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        """
        C{/readyz}: every slot's worker running and answering its own
        C{/readyz} with 200 (its checks shown), and the parent not draining.
        """
        draining = bool(self.supervisor.draining)
        answers = {slot.index: (ok, answer) for slot, ok, answer in
                   await self._ask(b"/readyz", self.readyz_limit)}
        checks: dict[str, dict[str, Any]] = {"draining": {"ok": not draining, "draining": draining}}
        for slot in self.supervisor.slots:
            check = {"ok": False, "pid": slot.pid, "restarts": slot.restarts}
            if slot.index not in answers:
                check["state"] = "down"
            else:
                ok, answer = answers[slot.index]
                check["state"] = "running"
                if not ok:
                    check["error"] = answer.getErrorMessage()
                else:
                    check["ok"] = answer[0] == 200
                    check["code"] = answer[0]
                    try:
                        body = json.loads(answer[1])
                        check["checks"] = body["checks"]
                    except (ValueError, TypeError, KeyError):
                        check["ok"], check["error"] = False, "not the answer of a /readyz"
            checks[f"worker-{slot.index}"] = check
        ok = all(check["ok"] for check in checks.values())
        return ok, {"status": "draining" if draining else "ready" if ok else "not ready",
                    "checks": checks}


class _OutlivesWorkers(internet.StreamServerEndpointService):
    """
    The parent's listener stops once no worker runs (or after C{bound}
    seconds): while the workers drain it answers C{/readyz} with 503.
    """

    #: How often (seconds) the slots are looked at while stopping.
    POLL = 0.1

    def __init__(self, endpoint: IStreamServerEndpoint, factory: Any, *, reactor: Any,
                 supervisor: Any, bound: float) -> None:
        super().__init__(endpoint, factory)
        self.reactor = reactor
        self.supervisor = supervisor
        self.bound = bound

    def stopService(self) -> Any:
        deadline = self.reactor.seconds() + self.bound
        stopping = super().stopService

        def look() -> Any:
            if any(slot.running for slot in self.supervisor.slots) and self.reactor.seconds() < deadline:
                return task.deferLater(self.reactor, self.POLL, look)
            return stopping()

        return defer.maybeDeferred(look)


def serve_parent(options: Mapping[str, Any], supervisor: Any, parent_service: service.MultiService,
                 reactor: Any = None) -> WorkerMetrics | None:
    """
    With C{--metrics} and C{--workers N}: the parent's listener, added to
    C{parent_service}, answering for every worker of C{supervisor} (its
    C{slots} and C{draining}) with the caps and deadlines of the
    single-process listener. C{reactor}: the supervisor's (its C{reactor})
    when not given.
    Returns what it serves (None without C{--metrics}).
    """
    description = options["metrics"]
    if description == "none":
        return None
    if reactor is None:
        reactor = supervisor.reactor
    workers = WorkerMetrics(reactor, supervisor)
    registry = CollectorRegistry()
    registry.register(workers)
    root = resource.Resource()
    root.putChild(b"metrics", MetricsResource(reactor, registry, workers.refresh))
    root.putChild(b"healthz", _Status(workers.healthy))
    root.putChild(b"readyz", _Status(lambda: defer.ensureDeferred(workers.ready())))
    site = MetricsSite(root, timeout=TIMEOUT, reactor=reactor)
    site.registry = registry
    site.workers = workers  # type: ignore[attr-defined]
    bound = float(options.get("drain-timeout") or 0) + 20  # the supervisor's wait, and some
    listening = _listening(reactor, description, site, functools.partial(
        _OutlivesWorkers, reactor=reactor, supervisor=supervisor, bound=bound))
    listening.setServiceParent(parent_service)
    return workers


__all__ = [
    "GatewayCollector", "LoginMetrics", "MetricsResource", "Readiness", "WatchedEndpoint", "build_site",
    "WorkerAnswerError", "WorkerMetrics", "check_endpoint", "fetch_worker", "merge_families", "serve",
    "serve_parent", "watch_listeners", "worker_families",
]
