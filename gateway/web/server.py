# -*- test-case-name: tests.test_web_guard -*-
"""
The C{--http} and C{--https} listeners: a twisted.web Site around the
L{Guard}, with bounds on request lines, headers, bodies and idle time.

There is no access log: URIs may carry secrets (an C{access_token} query
parameter), and every authentication already logs one C{auth} event.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.application import internet
from twisted.internet import defer
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web import http, server
from twisted.web.http import parse_qs
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from gateway.web.guard import Guard, HTTPSettings, Refusal

#: The longest request line or header line.
MAX_LINE = 8192
#: Request headers per request.
MAX_HEADERS = 100
#: Request line plus all headers.
MAX_HEADER_BYTES = 32 * 1024

#: Request bodies above this size (and chunked ones of these methods) stream to the upstream.
STREAM_ABOVE = 64 * 1024
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})


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
    A request whose body may not exceed the site's limit (the upstream's,
    or the gateway's own without an upstream): above it the client gets 413
    at once and the connection is closed, so nothing beyond the limit is read
    or stored.

    With an upstream, a body above L{STREAM_ABOVE} (or a chunked POST, PUT
    or PATCH) is not received first: once the headers are in, the request
    is authenticated (reading pauses meanwhile) and, if it is let through,
    processed at once, its body following as an L{Upload}. A refused request
    takes the usual path: its body is read, within the limit, and the
    refusal answered.
    """

    _body_size = 0
    _refused = False
    _in_headers = False
    #: The body being streamed (the request is processed), or being held
    #: while the login runs.
    gateway_upload: Upload | None = None
    _waiting: Upload | None = None

    def _limit(self) -> int:
        settings = self.channel.site.settings
        return settings.max_upstream_body if settings.upstream else settings.max_body

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._limit():
            self._too_large()
        super().gotLength(length)
        if not self._refused and self.channel.site.settings.upstream and (
            (length is None and self.channel._command in _BODY_METHODS)
            or (length is not None and length > STREAM_ABOVE)
        ):
            self._decide_early(length)

    def _decide_early(self, length: int | None) -> None:
        channel = self.channel
        # What requestReceived sets, all known once the headers are in.
        self.method, self.uri, self.clientproto = channel._command, channel._path, channel._version
        self.path, _, query = self.uri.partition(b"?")
        self.args = parse_qs(query, 1)
        if unquote_to_bytes(self.path) in (b"/whoami", b"/auth"):  # the gateway's own: read first
            return
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
        if isinstance(decision, Refusal):  # the usual path, from what arrived so far
            for chunk in upload.take():
                super().handleContentChunk(chunk)
            if upload.done:
                self.content.seek(0)
                self.process()
            else:
                upload.release()
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
        if self._refused:
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
_HEADER_TOO_LONG = _refusal(b"431 Request Header Fields Too Large", b"Header line too long")


class GatewayChannel(http.HTTPChannel):
    """
    Twisted's channel with the gateway's header bounds, and a deadline for a
    request's line and headers (the site's timeout, from the moment the
    channel is ready for the request): the idle timer restarts with every
    byte, so a client trickling headers would otherwise hold the connection.
    """

    MAX_LENGTH = MAX_LINE
    maxHeaders = MAX_HEADERS
    totalHeadersSize = MAX_HEADER_BYTES
    _deadline: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._start_deadline()

    def _start_deadline(self) -> None:
        self._stop_deadline()
        if self.timeOut:
            self._deadline = self.callLater(self.timeOut, self._headers_too_slow)

    def _stop_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _headers_too_slow(self) -> None:
        self._deadline = None
        if self.transport.disconnecting:  # the idle timer was first
            return
        self.transport.write(_TOO_SLOW)
        self.loseConnection()

    def allHeadersReceived(self) -> None:
        self._stop_deadline()
        super().allHeadersReceived()

    def requestDone(self, request: Any) -> None:
        super().requestDone(request)
        if not self.requests and self.transport is not None and not self.transport.disconnecting:
            self._start_deadline()  # ready for the next request on this connection

    def connectionLost(self, reason: Any) -> None:
        self._stop_deadline()
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
        if self._handlingRequest:
            self._networkProducer.pauseProducing()

    def lineLengthExceeded(self, line: bytes) -> None:
        """An overlong request line (414) or header line (431), then close."""
        first = getattr(self, "_HTTPChannel__first_line", 1)
        self.transport.write(_URI_TOO_LONG if first else _HEADER_TOO_LONG)
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

    def log(self, request: server.Request) -> None:
        pass


def build_http(core: Any, endpoint: Any, listener: str) -> internet.StreamServerEndpointService:
    """The C{--http} (plain) and C{--https} (TLS with the gateway's certificate) listeners."""
    settings = core.web.settings
    factory: Any = GatewaySite(Guard(core.portal, settings, listener), settings, core.reactor)
    if listener == "https":
        factory = TLSMemoryBIOFactory(core.certificate.options(), False, factory)
    return internet.StreamServerEndpointService(endpoint, factory)


__all__ = ["GatewayRequest", "GatewaySite", "build_http"]
