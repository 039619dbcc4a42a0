# -*- test-case-name: tests.test_web_guard -*-
"""
The C{--http} and C{--https} listeners: a twisted.web Site around the
L{Guard}, with bounds on request lines, headers, bodies and idle time.

There is no access log: URIs may carry secrets (an C{access_token} query
parameter), and every authentication already logs one C{auth} event.
"""

from __future__ import annotations

from typing import Any

from twisted.application import internet
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web import http, server

from gateway.web.guard import Guard, HTTPSettings

#: The longest request line or header line.
MAX_LINE = 8192
#: Request headers per request.
MAX_HEADERS = 100
#: Request line plus all headers.
MAX_HEADER_BYTES = 32 * 1024

class GatewayRequest(server.Request):
    """
    A request whose body may not exceed the site's limit (the upstream's,
    or the gateway's own without an upstream): above it the client gets 413
    at once and the connection is closed, so nothing beyond the limit is read
    or stored.
    """

    _body_size = 0
    _refused = False

    def _limit(self) -> int:
        settings = self.channel.site.settings
        return settings.max_upstream_body if settings.upstream else settings.max_body

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._limit():
            self._too_large()
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._body_size += len(data)
        if self._body_size > self._limit():
            self._too_large()
            return
        super().handleContentChunk(data)

    def _too_large(self) -> None:
        self._refused = True
        self.requestHeaders.removeHeader(b"expect")  # no "100 Continue" after the 413
        self.channel.transport.write(_TOO_LARGE)
        self.channel.loseConnection()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:  # already answered; the connection is closing
            return
        super().requestReceived(command, path, version)


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
