# -*- test-case-name: tests.test_proxyproto -*-
"""
The PROXY protocol (HAProxy's, v1 and v2) on every listener, for the
proxies of C{--proxy-protocol-from}.

From a peer in those networks a connection must start with a PROXY header,
whole within L{ListenSettings.proxy_header_timeout} seconds and at most
L{MAX_V1_HEADER} (v1) or L{V2_FIXED} + L{MAX_V2_PAYLOAD} (v2) bytes;
Twisted's parsers (L{twisted.protocols.haproxy}) read it. Only then is the
front door's protocol built (its connection cap and budget counting the
client the header names) and its transport's C{getPeer} and C{getHost}
answer the carried addresses, so every layer above (TLS, caps, throttle,
ACL C{Machine}, AuthInfo C{peer_address}, logs, the spool's C{Received})
sees the client. A LOCAL (v2), UNKNOWN (v1) or non-TCP header keeps the
proxy's own addresses (health checks). A bad, oversized or late header, or
one naming a loopback or unspecified client from a proxy not on loopback,
closes the connection with one log line (rate-limited per proxy). Until its
header comes a connection counts as one descriptor in L{Connections} (the
budget, its door's unauthenticated share, at most
L{gateway.connections.MAX_PENDING_HEADERS_PER_PROXY} per proxy address: more are refused at
accept), and the drain aborts it.

The gateway's own SOCKS relay is no proxy, even from those networks: a
connection whose peer is one of its outbound connections
(L{Connections.is_own_outbound}) is any other peer's. The relay usually
registers its side a reactor turn after the listener accepted it, so a
trusted connection is looked at again then (with a SOCKS door) and at its
first bytes, which the relay can only send once registered.

From any other peer the bytes pass straight through, but a connection whose
first bytes are a PROXY v1 or v2 signature is closed (rate-limited log
line): a client must not name its own address. The door is connected at
once (an SMTP greeting is not delayed); at most the first 11 bytes, while
they could still begin a signature, are held back until they cannot.

After the header (or the first bytes) nothing here runs per read: the
transport's C{dataReceived} calls go to the door's (limited) protocol
directly, and its writes never pass through here.

Listeners under Twisted's own C{haproxy:} endpoint prefix (a header from
every peer) are left as they are (with C{--proxy-protocol-from}, a usage error).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet import protocol
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import alsoProvides

from gateway.addresses import in_networks, ip_or_none, is_loopback, is_unspecified, peer_key
from gateway.connections import Connections, _log_prefix, _WrapperFactory
from gateway.ratelog import LogRateLimiter
from gateway.twistedinternals import ProxyHeaderParsers, proxy_header_parsers

if TYPE_CHECKING:
    from gateway.core import Core

log = Logger()

#: The longest v1 header, CRLF included (the specification's bound).
MAX_V1_HEADER = 107
#: The fixed part of a v2 header: signature, version/command, family, length.
V2_FIXED = 16
#: The longest v2 address block and TLVs accepted. Addresses take at most 216
#: bytes (UNIX); HAProxy's TLVs (ALPN, authority up to 255 bytes, unique ID
#: up to 128, the SSL sub-TLVs with a client certificate's CN, cloud link
#: IDs, CRC32C) stay well under 1 KiB. 4 KiB leaves room for other proxies'
#: TLVs and keeps what one connection may buffer small.
MAX_V2_PAYLOAD = 4096
#: A v1 header begins so.
V1_SIGNATURE = b"PROXY "
#: A v2 header begins so (the specification's 12 bytes).
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: A log line per kind and proxy (or client) at most this often.
LOG_INTERVAL = 60.0


class ProxyHeaderError(Exception):
    """Why a trusted proxy's connection does not start with a usable header."""


def signature_state(prefix: bytes) -> bool | None:
    """
    Whether C{prefix} (a connection's first bytes) starts with a PROXY v1
    or v2 signature: True, False, or None while it is a strict prefix of
    one (decided by 12 bytes at most).
    """
    undecided = False
    for signature in (V1_SIGNATURE, V2_SIGNATURE):
        if prefix[: len(signature)] == signature[: len(prefix)]:
            if len(prefix) >= len(signature):
                return True
            undecided = True
    return None if undecided else False


def read_header(
    buffer: bytes, parsers: ProxyHeaderParsers, local_proxy: bool = True
) -> tuple[Any, Any, int] | None:
    """
    The PROXY header at the start of C{buffer}: (source, destination, its
    length in bytes), the addresses None when it carries none (LOCAL,
    UNKNOWN, UNSPEC, a UNIX or UDP connection); None while more bytes are
    needed. Unless C{local_proxy} (the proxy's own address is loopback), a
    loopback or unspecified client is a bad header: a proxy elsewhere has no
    such client, and the gateway grants loopback peers more (plain-HTTP
    Basic, trusted networks).

    @raise ProxyHeaderError: not a header, one over its bound, or a bad one.
    """
    state = signature_state(buffer[:12])
    if state is None:
        return None
    if not state:
        raise ProxyHeaderError("the connection does not start with a PROXY header")
    try:
        if buffer.startswith(V1_SIGNATURE):
            end = buffer.find(b"\r\n", 0, MAX_V1_HEADER)
            if end < 0:
                if len(buffer) >= MAX_V1_HEADER:
                    raise ProxyHeaderError(f"PROXY v1 header over {MAX_V1_HEADER} bytes")
                return None
            # Twisted's V1Parser needs a space after UNKNOWN, which HAProxy
            # does not send; after a TCP header's last port it changes nothing.
            info, size = parsers.v1(buffer[:end] + b" "), end + 2
        else:
            if len(buffer) < V2_FIXED:
                return None
            payload = int.from_bytes(buffer[14:16], "big")
            if payload > MAX_V2_PAYLOAD:
                raise ProxyHeaderError(
                    f"PROXY v2 header over {V2_FIXED + MAX_V2_PAYLOAD} bytes"
                )
            size = V2_FIXED + payload
            if len(buffer) < size:
                return None
            info = parsers.v2(buffer[:size])
    except (parsers.error, ValueError, LookupError) as e:
        raise ProxyHeaderError(f"bad PROXY header ({type(e).__name__})") from None
    carried = _carried(info.source, info.destination, local_proxy)
    if carried is None:
        return None, None, size
    return carried[0], carried[1], size


def _carried(source: Any, destination: Any, local_proxy: bool = True) -> tuple[Any, Any] | None:
    """
    The TCP addresses a header carries, canonical; None for none (a LOCAL
    header...). A loopback or unspecified source only from a C{local_proxy}.
    """
    addresses = []
    for address in (source, destination):
        if not isinstance(address, (IPv4Address, IPv6Address)) or address.type != "TCP":
            return None
        host = ip_or_none(address.host)  # cached: a proxy's clients come again and again
        if host is None or (":" in host and type(address) is IPv4Address):
            raise ProxyHeaderError("bad PROXY header (an address of the wrong family)")
        if not 0 <= address.port <= 65535:
            raise ProxyHeaderError("bad PROXY header (a port out of range)")
        if not addresses and not local_proxy and _is_local_address(host):
            raise ProxyHeaderError(
                "bad PROXY header (a loopback or unspecified client from a proxy not on loopback)"
            )
        kind = IPv6Address if ":" in host else IPv4Address  # IPv4-mapped: IPv4
        if kind is not type(address) or host != address.host:
            address = kind("TCP", host, address.port)
        addresses.append(address)
    return addresses[0], addresses[1]


def _is_local_address(host: str | None) -> bool:
    """Whether C{host} is a loopback or the unspecified address."""
    return is_loopback(host) or is_unspecified(host)


def _carry(transport: Any, source: Any, destination: Any) -> None:
    """
    Make C{transport} answer the carried addresses. As Twisted's own
    C{startTLS} rebinds C{getHandle} on a TCP transport, the two methods are
    rebound on the instance: everything else (writes, producers, the TLS
    state) stays the real transport's, at no cost per byte.
    """
    transport.getPeer = lambda: source
    transport.getHost = lambda: destination


class _HeaderReader(protocol.Protocol):
    """
    A trusted proxy's connection until its header is read; then the front
    door's (limited) protocol is built for the client it names and takes
    over the connection. While it waits it is counted in L{Connections}
    (L{Connections.await_header}), and released exactly once: when the
    header comes, or the connection ends or is closed.
    """

    def __init__(self, factory: ProxyProtocolFactory, addr: Any) -> None:
        self.factory = factory
        self.addr = addr
        self.wrapped: Any = None
        self._buffer = b""
        self._timer: Any = None
        self._deadline = 0.0
        self._local = _is_local_address(ip_or_none(getattr(addr, "host", None)))

    def connectionMade(self) -> None:
        reactor, timeout = self.factory.reactor, self.factory.timeout
        if self.factory.connections.relaying:
            # A connection of the gateway's own relay is usually accepted on
            # the reactor turn before the relay's side sees it connected (and
            # registers it): look again then, so that its client gets the
            # door's greeting at once rather than at the deadline.
            self._deadline = reactor.seconds() + timeout
            self._timer = reactor.callLater(0, self._next_turn)
        else:
            self._timer = reactor.callLater(timeout, self._expired)

    def _next_turn(self) -> None:
        self._timer = None
        if self not in self.factory.connections.headers:
            return  # aborted by the drain: it ends on this turn
        if self.factory.connections.is_own_outbound(self.addr):
            self._as_peer()
            return
        reactor = self.factory.reactor
        self._timer = reactor.callLater(max(0.0, self._deadline - reactor.seconds()), self._expired)

    def dataReceived(self, data: bytes) -> None:
        if self.wrapped is not None:  # handed over as any peer's connection (L{_as_peer})
            self.wrapped.dataReceived(data)
            return
        self._buffer += data
        if self.factory.connections.is_own_outbound(self.addr):
            self._as_peer()
            return
        try:
            header = read_header(self._buffer, self.factory.parsers, self._local)
        except ProxyHeaderError as e:
            self._close("closing a connection from proxy {peer}: {why}", str(e))
            return
        if header is not None:
            self._start(*header)

    def _start(self, source: Any, destination: Any, size: int) -> None:
        self._stop()
        rest, self._buffer = self._buffer[size:], b""
        transport = self.transport
        if not self.factory.connections.header_done(self):
            transport.abortConnection()  # the drain began (and aborted it): no session now
            return
        if source is not None:
            _carry(transport, source, destination)
        inner = self.factory.wrappedFactory.buildProtocol(source or self.addr)
        if inner is not None:
            self.dataReceived = inner.dataReceived  # type: ignore[method-assign]
        self._hand_over(inner, rest)

    def _as_peer(self) -> None:
        """
        The connection comes from the gateway's own SOCKS relay after all
        (accepted before the relay's side knew it was connected): served as
        any other peer's, spoofed header refused, from now on.
        """
        self._stop()
        rest, self._buffer = self._buffer, b""
        if not self.factory.connections.header_done(self):
            self.transport.abortConnection()  # the drain began (and aborted it)
            return
        self._hand_over(self.factory.untrusted(self.addr), rest)

    def _hand_over(self, inner: Any, rest: bytes) -> None:
        """C{inner} takes over the connection, C{rest} its first bytes."""
        transport = self.transport
        if inner is None:
            transport.loseConnection()
            return
        self.wrapped = inner
        if IHalfCloseableProtocol.providedBy(inner):  # as the door does
            alsoProvides(self, IHalfCloseableProtocol)
        inner.makeConnection(transport)
        if rest and not getattr(transport, "disconnecting", False):
            inner.dataReceived(rest)

    def _expired(self) -> None:
        self._timer = None
        if self not in self.factory.connections.headers:
            return  # aborted by the drain: it ends on this turn
        if self.factory.connections.is_own_outbound(self.addr):
            self._as_peer()  # a client of the relay waiting for a greeting
            return
        self._close(
            "closing a connection from proxy {peer}: no PROXY header within {timeout} s",
            timeout=self.factory.timeout,
        )

    def _close(self, format: str, why: str = "", **fields: Any) -> None:
        self._stop()
        self._buffer = b""
        self.factory.connections.header_done(self)
        peer = ip_or_none(getattr(self.addr, "host", None))
        self.factory.refusal_log.warn(
            log, ("header", peer), "{listener}: " + format,
            listener=self.factory.listener, peer=peer, why=why, **fields,
        )
        self.transport.abortConnection()

    def _stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._stop()
        self.factory.connections.header_done(self)
        if self.wrapped is not None:
            self.wrapped.connectionLost(reason)

    def readConnectionLost(self) -> None:
        self.wrapped.readConnectionLost()

    def writeConnectionLost(self) -> None:
        self.wrapped.writeConnectionLost()

    def logPrefix(self) -> str:
        return _log_prefix(self.wrapped if self.wrapped is not None else self.factory)


def _guard(inner: Any, factory: ProxyProtocolFactory, addr: Any) -> Any:
    """
    Any other peer's connection: C{inner} (the front door's limited
    protocol) from the start, closed if its first bytes are a PROXY
    signature. The check is C{inner}'s own C{dataReceived} until it has
    decided (no wrapper object, no interface declarations per connection);
    then the instance attribute is removed and the class's method serves.
    """
    held = b""

    def first_bytes(data: bytes) -> None:
        nonlocal held
        first = held + data
        state = signature_state(first[:12])
        if state is None:  # could still be a signature: hold (at most 11 bytes)
            held = first
            return
        held = b""
        del inner.dataReceived
        if state:
            peer = ip_or_none(getattr(addr, "host", None))
            factory.refusal_log.warn(
                log, ("spoof", peer_key(peer)),
                "{listener}: refusing a PROXY header from {peer}, not a proxy of"
                " --proxy-protocol-from",
                listener=factory.listener, peer=peer,
            )
            inner.transport.abortConnection()
            return
        inner.dataReceived(first)

    inner.dataReceived = first_bytes
    return inner


class ProxyProtocolFactory(_WrapperFactory):
    """
    In front of a listener's (limited) factory: a PROXY header first from
    peers in C{networks}, none from anyone else.
    """

    noisy = False

    def __init__(
        self,
        wrapped: protocol.Factory,
        connections: Connections,
        networks: Sequence[Any],
        reactor: Any,
        timeout: float,
        parsers: ProxyHeaderParsers,
        listener: str | None = None,
    ) -> None:
        self.wrappedFactory = wrapped
        self.connections = connections
        self.networks = tuple(networks)
        self.reactor = reactor
        self.timeout = timeout
        self.parsers = parsers
        self.listener = listener
        self.refusal_log = LogRateLimiter(reactor, LOG_INTERVAL)

    @property
    def limit(self) -> Any:
        """The connection cap of the listener's front door (as L{LimitedFactory.limit})."""
        return self.wrappedFactory.limit  # type: ignore[attr-defined]

    def logPrefix(self) -> str:
        return _log_prefix(self.wrappedFactory)

    def buildProtocol(self, addr: Any) -> Any:
        peer = ip_or_none(getattr(addr, "host", None))
        connections = self.connections
        # The gateway's own SOCKS relay may come from an address of those
        # networks (a proxy on this host): its users are no proxy.
        if not in_networks(peer, self.networks) or connections.is_own_outbound(addr):
            return self.untrusted(addr)
        reader = _HeaderReader(self, addr)
        why = connections.await_header(reader, peer, self.limit.name)
        if why is None:
            return reader
        self.refusal_log.warn(
            log, ("room", peer), "{listener}: refusing a connection from proxy {peer}: {why}",
            listener=self.listener, peer=peer, why=why,
        )
        return None

    def untrusted(self, addr: Any) -> Any:
        """Any other peer's connection: the door's, checked for a spoofed header."""
        inner = self.wrappedFactory.buildProtocol(addr)
        return None if inner is None else _guard(inner, self, addr)


def proxy_protocol(core: Core, limited: Any) -> protocol.Factory:
    """
    C{limited} (a listener's L{LimitedFactory}) with the PROXY protocol in
    front when C{--proxy-protocol-from} names networks; as it is without,
    and on a listener under the C{haproxy:} endpoint prefix.
    """
    connections = core.connections
    settings = connections.settings
    if not settings.proxy_protocol_from or limited.listener in connections.behind_proxy:
        return limited
    parsers = proxy_header_parsers()
    if parsers is None:
        raise RuntimeError("this Twisted has no PROXY protocol parsers")
    return ProxyProtocolFactory(
        limited, connections, settings.proxy_protocol_from, core.reactor,
        settings.proxy_header_timeout, parsers, limited.listener,
    )


__all__ = [
    "MAX_V1_HEADER",
    "MAX_V2_PAYLOAD",
    "ProxyHeaderError",
    "ProxyProtocolFactory",
    "V1_SIGNATURE",
    "V2_SIGNATURE",
    "proxy_protocol",
    "read_header",
    "signature_state",
]
