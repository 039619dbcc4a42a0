# -*- test-case-name: tests.test_web_guard -*-
"""
The C{--http} and C{--https} listeners: a twisted.web Site around the
L{Guard}, with bounds on request lines, headers, bodies and idle time.

There is no access log: URIs may carry secrets (an C{access_token} query
parameter), and every authentication already logs one C{auth} event.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

from twisted.application import internet
from twisted.internet import defer
from twisted.web import http, server
from twisted.web.http import parse_qs
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from twisted.web.resource import IResource
from zope.interface import implementer

from gateway.connections import Refused, limit_connections
from gateway.core import OnStop
from gateway.meta import ConnectionMeta
from gateway.twistedinternals import (
    first_line_pending,
    pause_reading_while_answering,
    request_line,
)
from gateway.web.guard import Guard
from gateway.web.inject import PATH as INJECT_PATH
from gateway.web.inject import InjectAPI
from gateway.web.messages import Refusal
from gateway.web.proxy import UpstreamProxy
from gateway.web.resources import WebApp
from gateway.web.settings import HTTPSettings

if TYPE_CHECKING:
    from gateway.core import Core

#: The longest request line or header line.
MAX_LINE = 8192
#: Request headers per request.
MAX_HEADERS = 100
#: Request line plus all headers.
MAX_HEADER_BYTES = 32 * 1024

#: HTTP status codes counted under their own label; others by class (C{4xx}).
HTTP_CODES = frozenset({
    200, 201, 202, 204, 206, 301, 302, 303, 304, 307, 308, 400, 401, 403, 404, 405, 408,
    409, 411, 413, 414, 415, 421, 422, 429, 431, 500, 501, 502, 503, 504,
})


def http_code_label(code: int) -> str:
    """A status code's label: itself when in L{HTTP_CODES}, else its class (C{5xx}) or C{other}."""
    if code in HTTP_CODES:
        return str(code)
    return f"{code // 100}xx" if 100 <= code < 600 else "other"


#: Proxied request bodies above this size or --http-max-body (and chunked ones)
#: are decided before they are read, and streamed to the upstream.
STREAM_ABOVE = 64 * 1024
#: The gateway's own resources: their bodies are read first, within --http-max-body.
_OWN_PATHS = frozenset({b"/whoami", b"/auth"})


@implementer(IBodyProducer)
class Upload:
    """
    A request body streamed to the upstream as it arrives, with
    backpressure: while the upstream takes no more, the client's connection
    is not read (at most one read's worth waits here).
    """

    def __init__(self, request: GatewayRequest, length: int | None) -> None:
        self.length: Any = UNKNOWN_LENGTH if length is None else length
        self.request = request
        self.done = False  # the whole body has arrived
        self._queue: list[bytes] = []
        self._consumer: Any = None
        self._paused = False
        self._stopped = False
        self._finished: defer.Deferred[None] = defer.Deferred()

    def hold(self) -> None:
        """Stop reading the client."""
        transport = self.request.channel.transport
        if transport is not None:
            transport.pauseProducing()

    def release(self) -> None:
        """Read the client again."""
        transport = self.request.channel.transport
        if transport is not None:
            transport.resumeProducing()

    def take(self) -> list[bytes]:
        """What waits here, now the caller's."""
        queue, self._queue = self._queue, []
        return queue

    def data(self, chunk: bytes) -> None:
        if self._stopped:
            return
        if self._consumer is None or self._paused:
            self._queue.append(chunk)
            self.hold()  # the transport may have resumed itself meanwhile
        else:
            self._consumer.write(chunk)

    def received(self) -> None:
        self.done = True
        self._flush()

    def _flush(self) -> None:
        if self._consumer is None or self._stopped:
            return
        while self._queue and not self._paused:  # a write may pause us
            self._consumer.write(self._queue.pop(0))
        if self._paused or self._queue:
            return
        if not self.done:
            self.release()
        elif not self._finished.called:
            self._finished.callback(None)

    # IBodyProducer, for the upstream request

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        self._consumer = consumer
        self._flush()
        return self._finished

    def pauseProducing(self) -> None:
        self._paused = True
        self.hold()

    def resumeProducing(self) -> None:
        self._paused = False
        self._flush()

    def stopProducing(self) -> None:
        """The upstream request is over: drop the rest (its Deferred never fires)."""
        self._stopped = True
        self._queue = []


class GatewayRequest(server.Request):
    """
    A request whose body may not exceed its limit (the upstream's for a
    proxied path, else the gateway's own C{--http-max-body}): above it the
    client gets 413 at once and the connection is closed, so nothing beyond
    the limit is read or stored.

    With an upstream, a proxied request whose body is above
    C{--http-max-body} (or L{STREAM_ABOVE}), or chunked, is decided before
    any of its body is read: once the headers are in, the request is
    authenticated (reading pauses meanwhile). A refusal (401, 403, 429, ...)
    is answered at once and the connection closed, its body never read; a
    request let through is processed at once, its body following as an
    L{Upload}. An unauthenticated client can thus make the gateway read at
    most C{--http-max-body} octets of body. The injection API
    (L{gateway.web.inject.PATH}, exactly) is decided the same way, with or
    without an upstream, within its own bound (L{InjectSettings.max_body}).
    """

    # What the gateway's resources note on a request, for each other (one
    # place, with defaults, rather than attributes added on the fly).

    #: The connection as the front door sees it (through a trusted proxy,
    #: the client the proxy names), for the checkers and the proxy's
    #: C{X-Forwarded-*}: set by L{Guard.decide}, None before.
    gateway_meta: ConnectionMeta | None = None
    #: The request came from a C{--http-trusted-proxy} (L{Guard.decide}).
    gateway_via_proxy: bool = False
    #: What L{Guard.decide} decided for this request when it did so before
    #: the body (a L{Refusal} or the realm's avatar): kept, so that a
    #: request is decided once.
    gateway_decision: Any = None
    #: The C{--http-host} name the request was checked against, canonical:
    #: the upstream's C{X-Forwarded-Host} (set by the C{Upstream} resource).
    gateway_host: str | None = None
    #: The body being streamed (the request is processed), or being held
    #: while the login runs.
    gateway_upload: Upload | None = None

    #: All its headers have arrived: the request is in flight (the drain waits for it).
    gateway_headers = False

    _body_size = 0
    _refused = False
    _in_headers = False
    #: The target is one of the gateway's own resources (read first, small limit).
    _own = False
    #: The target is the injection API (its own limit; decided before a large body).
    _inject = False
    _waiting: Upload | None = None

    def _limit(self) -> int:
        settings = self.channel.site.settings
        if self._inject:
            return settings.inject.max_body
        if settings.upstream and not self._own:
            return settings.max_upstream_body
        return settings.max_body

    def gotLength(self, length: int | None) -> None:
        channel = self.channel
        settings = channel.site.settings
        # What requestReceived sets, all known once the headers are in.
        line = request_line(channel)
        if line is not None:
            self.method, self.uri, self.clientproto = line
            self.path = self.uri.partition(b"?")[0]
        # Without the line (a Twisted that no longer says): read first, the small limit.
        self._own = line is None or unquote_to_bytes(self.path) in _OWN_PATHS
        # The injection API: its own bound, and decided early like a proxied
        # request (exactly the path the resources route to it).
        self._inject = line is not None and settings.inject is not None and self.path == INJECT_PATH
        if length is not None and length > self._limit():
            self._too_large()
        super().gotLength(length)
        if self._refused or self._own or not (settings.upstream or self._inject):
            return
        if length is None or length > min(settings.max_body, STREAM_ABOVE):
            self.args = parse_qs(self.uri.partition(b"?")[2], 1)
            self._decide_early(length)

    def reads_body_first(self) -> bool:
        """Whether the body is read before the request is decided (not streamed or refused)."""
        return not (
            self._refused or self.finished or self.gateway_upload is not None
            or self._waiting is not None
        )

    def _decide_early(self, length: int | None) -> None:
        channel = self.channel
        upload = self._waiting = Upload(self, length)
        upload.hold()
        self._in_headers = True  # a decision made now comes before Twisted's "100 Continue"
        d = defer.maybeDeferred(channel.site.resource.decide, self)
        d.addCallback(self._decided, upload)
        d.addErrback(self._failed_early)
        self._in_headers = False

    def _failed_early(self, reason: Any) -> None:
        self.channel.persistent = False  # the body may still come: never as a next request
        self.site = self.channel.site  # what process() would have set
        self.processingFailed(reason)

    def _decided(self, decision: Any, upload: Upload) -> None:
        self._waiting = None
        self.gateway_decision = decision
        if self._refused or self.channel is None:
            return
        if isinstance(decision, Refusal):
            # Refused before its body: answered now, the connection closed
            # after the answer, and not one more octet of the body read.
            upload.stopProducing()
            self.requestHeaders.removeHeader(b"expect")  # nothing to continue
            self.gateway_upload = upload
            self.channel.persistent = False
            self.process()
            return
        self.gateway_upload = upload
        if self.requestHeaders.hasHeader(b"expect"):
            # Twisted answers Expect only after gotLength, which may be too
            # late (after a final response): answer it here, once.
            expect = self.requestHeaders.getRawHeaders(b"expect")[0].lower()
            self.requestHeaders.removeHeader(b"expect")
            if self._in_headers and expect == b"100-continue" and self.clientproto == b"HTTP/1.1":
                self.channel.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.process()

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused or self.finished:  # answered: the rest is not read
            return
        self._body_size += len(data)
        if self._body_size > self._limit():
            self._too_large()
            return
        upload = self.gateway_upload or self._waiting
        if upload is not None:
            upload.data(data)
        else:
            super().handleContentChunk(data)

    def _too_large(self) -> None:
        self._refused = True
        self.requestHeaders.removeHeader(b"expect")  # no "100 Continue" after the 413
        self.channel.transport.write(_TOO_LARGE)
        self.channel.loseConnection()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:  # already answered; the connection is closing
            return
        upload = self.gateway_upload or self._waiting
        if upload is not None:  # being processed, or decided any moment
            upload.received()
            return
        super().requestReceived(command, path, version)

    def finish(self) -> None:
        upload = self.gateway_upload or self._waiting
        if upload is not None and not upload.done:
            # Answered before the body was in: the rest of it must never be
            # read as a next request.
            self.channel.persistent = False
        super().finish()


def _refusal(status: bytes, text: bytes) -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Cache-Control: no-store\r\n"
        b"Connection: close\r\n"
        b"Content-Length: " + str(len(text) + 1).encode() + b"\r\n\r\n" + text + b"\n"
    )


_TOO_LARGE = _refusal(b"413 Content Too Large", b"Request body too large")
_URI_TOO_LONG = _refusal(b"414 URI Too Long", b"Request line too long")
_TOO_SLOW = _refusal(b"408 Request Timeout", b"Request headers not received in time")
_BODY_TOO_SLOW = _refusal(b"408 Request Timeout", b"Request body not received in time")
_HEADER_TOO_LONG = _refusal(b"431 Request Header Fields Too Large", b"Header line too long")


class GatewayChannel(http.HTTPChannel):
    """
    Twisted's channel with the gateway's header bounds, and deadlines (the
    site's timeout each): for a request's line and headers, from the moment
    the channel is ready for the request, and for a body the gateway reads
    before deciding (at most C{--http-max-body}), from the end of the
    headers. The idle timer restarts with every byte, so a client trickling
    headers or a body would otherwise hold the connection. A body streamed
    to the upstream once the request is let through is bounded by the idle
    timeout only: it may be large, and it is authenticated.
    """

    MAX_LENGTH = MAX_LINE
    maxHeaders = MAX_HEADERS
    totalHeadersSize = MAX_HEADER_BYTES
    _deadline: Any = None
    #: What the connection is answered when the deadline passes; None: disarmed.
    _deadline_answer: bytes | None = None
    #: The gateway is stopping (L{drain}): no request after the one in flight.
    _draining = False

    # What the guard keeps for a connection's next requests (L{Guard.decide}):
    #: Peer address and port, local address and port, TLS: the same for every request.
    gateway_connection: tuple[Any, ...] | None = None
    #: The last Basic token decoded on this connection: (token, user, password).
    gateway_basic: tuple[bytes, str, str] | None = None
    #: What the last success line logged on this connection said: (the
    #: Authorization values, the client's address, the AuthInfo); a login
    #: that would log the same line again logs none (its event still goes out).
    gateway_logged: tuple[Any, ...] | None = None

    def drain(self) -> None:
        """
        The gateway is stopping: an idle connection (keep-alive, no request
        yet, or a request whose headers are still arriving: only one with
        all its headers is in flight, anyone could hold the drain with the
        rest) is closed now; a request in flight is answered with
        C{Connection: close} (when its response has not started yet) and the
        connection closed after the response.
        """
        self._draining = True
        if not any(getattr(request, "gateway_headers", False) for request in self.requests):
            if self.transport is not None and not self.transport.disconnecting:
                self.loseConnection()
            return
        self.persistent = False
        for request in self.requests:
            if not request.startedWriting:
                request.responseHeaders.setRawHeaders(b"connection", [b"close"])

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        if self._draining:  # a request whose headers were still arriving at the drain
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
            return False
        return bool(super().checkPersistence(request, version))

    def connectionMade(self) -> None:
        super().connectionMade()
        self._start_deadline()

    def dataReceived(self, data: bytes) -> None:
        if self.transport.disconnecting and not self.requests:
            # Answered and closing (a request refused before its body): what
            # was already in flight is neither a body nor a next request.
            return
        super().dataReceived(data)

    def _start_deadline(self, answer: bytes = _TOO_SLOW) -> None:
        if not self.timeOut:
            return
        self._deadline_answer = answer
        if self._deadline is not None and self._deadline.active():
            # One timer per connection, moved on for each request rather
            # than made anew (moving it later costs the reactor nothing).
            self._deadline.reset(self.timeOut)
        else:
            self._deadline = self.callLater(self.timeOut, self._too_slow)

    def _stop_deadline(self) -> None:
        """Disarm the deadline; its timer stays, for the next L{_start_deadline}."""
        self._deadline_answer = None

    def _too_slow(self) -> None:
        self._deadline = None
        answer, self._deadline_answer = self._deadline_answer, None
        if answer is None or self.transport.disconnecting:  # disarmed, or the idle timer was first
            return
        self.transport.write(answer)
        self.loseConnection()

    def allHeadersReceived(self) -> None:
        self._stop_deadline()
        request = self.requests[-1] if self.requests else None
        if request is not None:
            request.gateway_headers = True  # in flight, for the drain
        super().allHeadersReceived()
        if (
            self.length != 0
            and isinstance(request, GatewayRequest)
            and request.reads_body_first()
            and not self.transport.disconnecting
        ):
            self._start_deadline(_BODY_TOO_SLOW)

    def allContentReceived(self) -> None:
        self._stop_deadline()
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        super().requestDone(request)
        if not self.requests and self.transport is not None and not self.transport.disconnecting:
            self._start_deadline()  # ready for the next request on this connection

    def connectionLost(self, reason: Any) -> None:
        self._stop_deadline()
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        super().connectionLost(reason)

    def pauseProducing(self) -> None:
        """
        The write buffer is full: stop reading, also while a request is being
        answered. Twisted's channel does not then, and while it waits for the
        transport it stops pausing for pipelined input either: a client that
        pipelines requests and never reads had every one read and answered
        into the buffer (issue 11 item 3). requestDone, or resumeProducing
        between requests, resumes reading.
        """
        super().pauseProducing()
        pause_reading_while_answering(self)

    def lineLengthExceeded(self, line: bytes) -> None:
        """An overlong request line (414) or header line (431), then close."""
        self.transport.write(_URI_TOO_LONG if first_line_pending(self) else _HEADER_TOO_LONG)
        self.loseConnection()


class GatewaySite(server.Site):
    """
    A Site with the gateway's bounds and without an access log. Form bodies
    are never parsed into C{request.args}: nothing here reads them, and the
    parsing would be unauthenticated work (only the query is parsed).
    """

    protocol = GatewayChannel
    requestFactory = GatewayRequest
    displayTracebacks = False

    def __init__(self, resource: Any, settings: HTTPSettings, reactor: Any = None) -> None:
        super().__init__(
            resource, timeout=settings.timeout, reactor=reactor, parsePOSTFormSubmission=False
        )
        self.settings = settings
        #: For the metrics: responses per status label (L{http_code_label}: a fixed set).
        self.statuses: Counter[str] = Counter()

    def log(self, request: server.Request) -> None:
        """No access log; the response's status is counted by its label."""
        self.statuses[http_code_label(request.code)] += 1


#: Retry-After of a refused connection (seconds).
RETRY_AFTER = 5


def _busy(text: bytes) -> bytes:
    """A 503 refusal with C{Retry-After}."""
    response = _refusal(b"503 Service Unavailable", text)
    retry = b"Retry-After: %d\r\n" % RETRY_AFTER
    return response.replace(b"Connection: close\r\n", b"Connection: close\r\n" + retry)


#: The refusals of a connection over a bound (gateway.connections).
_REFUSALS = {
    Refused.PEER: _busy(b"Too many connections from your address"),
    Refused.BUSY: _busy(b"Too many connections, try again later"),
}


class HTTPDoor:
    """
    The HTTP front door: C{--http} (plain) and C{--https} (TLS with the
    gateway's certificate) listeners, one connection cap per peer for both
    (trusted proxies exempt); a peer over it gets 503 on a plain listener,
    and is closed before the handshake on a TLS one. The realm's
    C{IResource} avatar is this door's L{WebApp}; the upstream's connection
    pool closes when the gateway stops.
    """

    #: The Site speaks HTTP/1.1 (and 1.0, which has no ALPN name).
    alpn: tuple[bytes, ...] = (b"http/1.1",)

    def __init__(self, core: Core, settings: HTTPSettings) -> None:
        self.core = core
        self.settings = settings
        proxy = None
        if settings.upstream is not None:
            proxy = UpstreamProxy(
                settings.upstream,
                core.reactor,
                timeout=settings.upstream_timeout,
                forward_authorization=settings.forward_authorization,
                ca_file=settings.upstream_ca,
                keep_method_override=settings.keep_method_override,
            )
            core.attach(OnStop(proxy.close))
        inject = None
        if settings.inject is not None:
            inject = InjectAPI(core.policy, core.spool, settings.inject)
        self.app = WebApp(core.policy, settings, proxy, inject)
        core.realm.register_avatar(IResource, self.app.avatar)
        #: One site per listener (their counts: the metrics).
        self.sites: list[GatewaySite] = []

    def listen(
        self, endpoint: Any, name: str, tls: Any | None
    ) -> internet.StreamServerEndpointService:
        core, settings = self.core, self.settings
        site = GatewaySite(Guard(core.portal, settings, name), settings, core.reactor)
        self.sites.append(site)
        limited = limit_connections(
            core,
            site,
            "http",
            name,
            settings.max_connections_per_peer,
            # The socket, a request body file and, with an upstream, its connection.
            weight=3 if settings.upstream else 2,
            exempt=settings.trusted_proxies,
            refusals=_REFUSALS,
            tls=tls,
        )
        return internet.StreamServerEndpointService(endpoint, limited)


__all__ = ["HTTP_CODES", "GatewayRequest", "GatewaySite", "HTTPDoor", "http_code_label"]
