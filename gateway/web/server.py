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
    A request whose body may not exceed the site's upstream limit: above it
    the client gets 413 at once and the connection is closed, so nothing
    beyond the limit is read or stored. (The gateway's own resources have a
    smaller limit, checked when they render.)
    """

    _body_size = 0
    _refused = False

    def _limit(self) -> int:
        return self.channel.site.settings.max_upstream_body  # type: ignore[no-any-return]

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
_HEADER_TOO_LONG = _refusal(b"431 Request Header Fields Too Large", b"Header line too long")


class GatewayChannel(http.HTTPChannel):
    MAX_LENGTH = MAX_LINE
    maxHeaders = MAX_HEADERS
    totalHeadersSize = MAX_HEADER_BYTES

    def lineLengthExceeded(self, line: bytes) -> None:
        """An overlong request line (414) or header line (431), then close."""
        first = getattr(self, "_HTTPChannel__first_line", 1)
        self.transport.write(_URI_TOO_LONG if first else _HEADER_TOO_LONG)
        self.loseConnection()


class GatewaySite(server.Site):
    """A Site with the gateway's bounds and without an access log."""

    protocol = GatewayChannel
    requestFactory = GatewayRequest
    displayTracebacks = False

    def __init__(self, resource: Any, settings: HTTPSettings, reactor: Any = None) -> None:
        super().__init__(resource, timeout=settings.timeout, reactor=reactor)
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
