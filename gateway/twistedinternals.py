# -*- test-case-name: tests.test_twistedinternals -*-
"""
Every private Twisted attribute the gateway reads or calls, in one place.

Each function names the Twisted internals it relies on and what it does when
they are gone, so that a Twisted upgrade degrades to Twisted's public
behaviour rather than to a crash or a wrong answer. C{setup.cfg} pins Twisted
to the releases C{tests.test_twistedinternals} passed on; those tests check
every attribute read here against real Twisted objects and fail loudly when
one changes meaning. Raise the pin only after they pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import tcp, unix

#: Transports whose write buffer L{write_now} knows (not TLS, not a test
#: double): TCP, and the client side of a UNIX socket (the Redis link's;
#: its C{writeSomeData} sends file descriptors first, and it never has any).
_PLAIN_TCP = (tcp.Server, tcp.Client, unix.Client)


def write_now(transport: Any, data: bytes) -> bool:
    """
    Write C{data} on C{transport}, sending at once what the socket takes
    when nothing is queued. Twisted's C{write} always buffers until the next
    reactor pass, which costs two epoll changes and a wakeup per chunk; the
    SOCKS relay does little else (measured: 30-40% more MiB/s, see
    C{bench/socks_bench.py}). Whatever is not sent at once, and everything
    on any other transport or behind a non-empty buffer, goes through
    C{transport.write}, so the bytes keep their order.

    Relies on L{twisted.internet.abstract.FileDescriptor} as
    L{twisted.internet.tcp.Connection} uses it: C{dataBuffer} (from
    C{offset}) and C{_tempDataLen} (bytes written since the last C{doWrite})
    are the user-space write buffer, both empty when nothing is queued;
    C{_writeDisconnecting} is set by C{loseWriteConnection} (a half-close:
    no writes after it, as C{disconnecting} after C{loseConnection});
    C{TLS} is set by C{startTLS}; C{writeSomeData(data)} sends what the
    socket takes and returns the count, or an exception for a lost
    connection. A missing attribute makes the fast path's condition false:
    then C{transport.write}, never a wrong write.

    @return: whether all of C{data} was sent at once.
    """
    if (
        type(transport) in _PLAIN_TCP
        and not getattr(transport, "TLS", True)  # not after a startTLS
        and not getattr(transport, "dataBuffer", True)
        and not getattr(transport, "_tempDataLen", True)
        and transport.connected
        and not transport.disconnecting
        and not getattr(transport, "_writeDisconnecting", True)
    ):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int) and sent > 0:  # else: write() meets the error
            if sent == len(data):
                return True
            data = data[sent:]
    transport.write(data)
    return False


def half_close_now(transport: Any) -> bool:
    """
    Half-close C{transport} (a TCP FIN after everything written): at once
    when nothing is queued, rather than as C{loseWriteConnection} does, in
    the next reactor pass after two epoll changes and an empty C{send}
    (the SOCKS relay passes an end of input on in every session). Anything
    else goes through C{loseWriteConnection}.

    Does what L{twisted.internet.abstract.FileDescriptor.doWrite} does for a
    half-close once the buffer is empty: C{stopWriting}, then sets
    C{_writeDisconnecting} and C{_writeDisconnected} and calls
    L{twisted.internet.tcp.Connection._closeWriteConnection} (C{shutdown(1)},
    then the protocol's C{writeConnectionLost}). Only with the buffer empty
    (as L{write_now} reads it), not disconnecting, no half-close under way,
    and no producer that C{doWrite} would resume first (a non-streaming
    one, or a paused streaming one); a missing attribute means
    C{loseWriteConnection}.

    @return: whether the half-close happened at once.
    """
    if (
        type(transport) in _PLAIN_TCP
        and not getattr(transport, "TLS", True)
        and not getattr(transport, "dataBuffer", True)
        and not getattr(transport, "_tempDataLen", True)
        and transport.connected
        and not transport.disconnecting
        and getattr(transport, "_writeDisconnecting", True) is False
        and getattr(transport, "_writeDisconnected", True) is False
        and callable(getattr(transport, "_closeWriteConnection", None))
        and (
            transport.producer is None
            or (transport.streamingProducer and not transport.producerPaused)
        )
    ):
        transport.stopWriting()
        transport._writeDisconnecting = True
        transport._writeDisconnected = True
        transport._closeWriteConnection()
        return True
    transport.loseWriteConnection()
    return False


def buffered(transport: Any) -> int:
    """
    Bytes a TCP transport holds in user space for its peer: the
    C{FileDescriptor} write buffer (C{dataBuffer} past C{offset}, plus
    C{_tempDataLen}) and, under TLS, what each C{TLSMemoryBIOProtocol}
    layer above it keeps before its handshake (C{_appSendBuffer}); not the
    small writes a C{BufferingTLSTransport} gathers for the next reactor
    pass (under 64 kB). For tests, diagnostics and the drain
    (L{closing_flushed}, which looks again over L{gateway.ops.drain.CLOSED_GRACE}).
    """
    size = len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    proto = getattr(transport, "protocol", None)  # gone once the connection is lost
    while proto is not None:
        size += sum(map(len, getattr(proto, "_appSendBuffer", [])))
        proto = getattr(proto, "wrappedProtocol", None)
    return size


def closing_flushed(session: Any) -> bool:
    """
    Whether the gateway has closed C{session}'s connection (some layer's
    C{loseConnection}: the front door's, or its TLS layer's) and its TCP
    transport holds nothing more for the peer (L{buffered} is 0): what is
    left is the peer's part, a TLS C{close_notify}, which
    C{TLSMemoryBIOProtocol} waits for before it closes the socket.

    C{session} is an entry of L{gateway.connections.Connections.sessions}:
    the protocol on the TCP transport (the TLS layer under an implicit-TLS
    listener; after C{startTLS} the transport's C{protocol} is the TLS
    layer above it). The layers are followed through C{wrappedProtocol}
    and the gateway's own wrappers' C{wrapped}; each one's C{disconnecting}
    (a transport's, and C{TLSMemoryBIOProtocol}'s own) says it is closing.
    On a transport without L{buffered}'s attributes (a test double, a
    changed Twisted), C{False}: the session is waited for as before.
    """
    tcp = getattr(session, "transport", None)
    if type(tcp) not in _PLAIN_TCP:
        return False
    try:
        if buffered(tcp):
            return False
    except (AttributeError, TypeError):
        return False
    layer = getattr(tcp, "protocol", None) or session
    for _ in range(8):
        if layer is None:
            break
        if getattr(layer, "disconnecting", False) is True:
            return True
        if getattr(getattr(layer, "transport", None), "disconnecting", False) is True:
            return True
        layer = getattr(layer, "wrappedProtocol", None) or getattr(layer, "wrapped", None)
    return False


def request_line(channel: Any) -> tuple[bytes, bytes, bytes] | None:
    """
    The method, target and version of the request whose headers (or body)
    C{channel} is reading, or L{None} when Twisted no longer says.

    L{twisted.web.http.HTTPChannel.lineReceived} keeps them in C{_command},
    C{_path} and C{_version} from the request line until
    C{allContentReceived} hands them to C{Request.requestReceived} (and
    deletes them). The gateway needs them earlier, in C{gotLength}, to
    choose a body limit and to decide a request before its body. When they
    are gone the caller takes the safe side: the body is read first, within
    C{--http-max-body}.
    """
    try:
        return channel._command, channel._path, channel._version
    except AttributeError:
        return None


def first_line_pending(channel: Any) -> bool:
    """
    Whether C{channel} is waiting for a request line (rather than reading
    a request's headers).

    Reads L{twisted.web.http.HTTPChannel}'s name-mangled C{__first_line}
    (C{_HTTPChannel__first_line}): 1, or 2 once it skipped an empty line,
    while waiting for a request line; 0 while reading headers. When it is
    gone the answer is C{True}: an overlong header line then gets 414
    rather than 431, a refusal and a close all the same.
    """
    return bool(getattr(channel, "_HTTPChannel__first_line", 1))


def pause_reading_while_answering(channel: Any) -> None:
    """
    Called from C{pauseProducing} (the write buffer is full): stop reading
    C{channel}'s transport also while a request is being answered.

    L{twisted.web.http.HTTPChannel.pauseProducing} pauses its
    C{_networkProducer} (the transport as an C{IPushProducer}) only when
    C{_handlingRequest} is false; C{resumeProducing}, and C{requestDone}
    unless the transport is still full, resume it. When either attribute is
    gone this does nothing: Twisted's own behaviour, reading on while it
    answers.
    """
    producer = getattr(channel, "_networkProducer", None)
    if getattr(channel, "_handlingRequest", False) and producer is not None:
        producer.pauseProducing()


@attrs.frozen
class ProxyHeaderParsers:
    """
    The PROXY protocol header parsers of L{twisted.protocols.haproxy}: each
    takes one whole header (v1: the line without its CRLF; v2: the 16 bytes
    and the length they announce) and returns a C{ProxyInfo} (C{source},
    C{destination}: addresses, or None for LOCAL/UNKNOWN/UNSPEC).
    """

    v1: Callable[[bytes], Any]
    v2: Callable[[bytes], Any]
    #: What a bad header raises (besides the C{ValueError} of a bad number or text).
    error: type[Exception]
    #: The 12 bytes a v2 header starts with.
    v2_signature: bytes


def proxy_header_parsers() -> ProxyHeaderParsers | None:
    """
    Twisted's PROXY protocol parsers, or None when they are gone.

    L{twisted.protocols.haproxy} makes public only C{proxyEndpoint}, a
    wrapper that reads a header from every peer; the gateway reads one only
    from trusted proxies (C{--proxy-protocol-from}), with its own bounds, so
    it calls the parsers under it: C{_v1parser.V1Parser.parse} and
    C{_v2parser.V2Parser.parse} (class methods parsing one complete header),
    C{V2Parser.PREFIX} and C{_exceptions.InvalidProxyHeader}. When any is
    gone, C{--proxy-protocol-from} is refused at start with a line saying
    so (the C{haproxy:} endpoint prefix keeps working).
    """
    try:
        from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
        from twisted.protocols.haproxy._v1parser import V1Parser
        from twisted.protocols.haproxy._v2parser import V2Parser

        return ProxyHeaderParsers(
            v1=V1Parser.parse, v2=V2Parser.parse, error=InvalidProxyHeader,
            v2_signature=V2Parser.PREFIX,
        )
    except (ImportError, AttributeError):
        return None


def keep_unix_socket_file(port: Any) -> None:
    """
    A UNIX listening port adopted from another process (a worker of
    C{--workers}, which shares the parent's socket with the other workers):
    stopping it must leave the socket's file in place. Twisted's
    C{unix.Port.connectionLost} removes the file it finds in C{_bindPath}
    (adopted ports too) before C{tcp.Port.connectionLost}; this port's
    C{connectionLost} becomes the latter. When C{unix.Port} no longer has
    that shape, nothing changes: a worker's stop then removes the file (and
    the next one logs that it is gone), as Twisted does.
    """
    from twisted.internet import unix

    if isinstance(port, unix.Port) and hasattr(port, "_bindPath"):
        port.connectionLost = functools.partial(tcp.Port.connectionLost, port)


def accept_one_per_wakeup(port: Any) -> None:
    """
    A listening port other processes accept on too (the workers of
    C{--workers} share one socket): accept at most one connection each time
    the socket is readable, so a burst of new connections is spread over
    the workers instead of taken whole by the first awake. Twisted's
    C{tcp.Port.doRead} (C{unix.Port}'s too) accepts up to C{numberAccepts}
    (100 at first, raised by 20 after a full round) and sets it again after
    each round; this port's C{doRead} sets it to 1 before each round. When
    C{tcp.Port} no longer has C{numberAccepts}, nothing changes: the port
    accepts as Twisted does (all workers still serve, less evenly).
    """
    if not isinstance(port, tcp.Port) or not isinstance(getattr(port, "numberAccepts", None), int):
        return
    read = port.doRead

    def doRead() -> Any:
        port.numberAccepts = 1
        return read()

    port.numberAccepts = 1
    port.doRead = doRead


def ssl_server_context(endpoint: Any) -> Any | None:
    """
    The TLS context factory of an C{ssl:} server endpoint (what
    C{endpoints.serverFromString} built from C{privateKey=}, C{certKey=}...),
    so that a worker of C{--workers} serves TLS the same way on the socket
    it adopted from its parent. Twisted keeps it in
    C{SSL4ServerEndpoint._sslContextFactory}; when that is gone, None (the
    worker then refuses the listener with a line saying so).
    """
    context = getattr(endpoint, "_sslContextFactory", None)
    return context if callable(getattr(context, "getContext", None)) else None


__all__ = [
    "ProxyHeaderParsers",
    "accept_one_per_wakeup",
    "ssl_server_context",
    "keep_unix_socket_file",
    "buffered",
    "first_line_pending",
    "half_close_now",
    "pause_reading_while_answering",
    "proxy_header_parsers",
    "request_line",
    "write_now",
]
