# -*- test-case-name: tests.test_connections -*-
"""
Connection bounds shared by every front door.

- A cap on the connections one peer (IPv6 by /64) holds open on a front door
  at once (C{--smtp-max-connections-per-peer}, ...). The C{smtp} and C{smtps}
  listeners are one front door for a peer's cap (likewise C{http}/C{https},
  C{socks}/C{socks-tls}): a second listener must not double the cap.
- A process-wide budget of file descriptors below C{RLIMIT_NOFILE} (whose
  soft limit is raised to the hard limit at start): once the descriptors
  the open connections may hold reach it, new connections are refused the
  same clear way, before C{accept} fails with C{EMFILE} (Twisted's port would
  log that and retry on every reactor pass).
- A deadline for the TLS handshake on implicit-TLS listeners: a client that
  opens the connection and never finishes the handshake would otherwise
  keep it (and its descriptor) until the front door's idle timer, or forever
  where closing waits for the handshake.
- The listen backlog added to endpoint strings that do not set one.

The cap and the budget are enforced by L{LimitedFactory}, wrapped around
a front door's factory (outside TLS): the front door's protocol keeps its
real transport; only the end of the connection passes through the wrapper
to release the count, so every path (lost before or during the handshake,
after it, refused by the front door's own factory) releases exactly once,
and a refused connection is never counted.
"""

from __future__ import annotations

import resource as _resource
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from typing import Any

import attrs
from twisted.internet import interfaces, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import alsoProvides, directlyProvides, implementer, providedBy

from gateway.checkers.pipeline import peer_key
from gateway.meta import in_networks, ip_or_none

log = Logger()

#: Bytes a lingering refusal reads (and drops) before it closes at once.
MAX_LINGER_INPUT = 64 * 1024
#: Refusals one peer may have lingering at once; more are closed at once,
#: so a peer at its cap cannot hold descriptors by connecting again and again.
MAX_LINGER_PER_PEER = 4
#: A hard limit of "unlimited" is raised to this many descriptors at most.
NOFILE_UNLIMITED = 1 << 20


@attrs.frozen
class ListenSettings:
    """What the operator chose for every listener."""

    #: Accept queue of listeners whose endpoint string sets no C{backlog=}.
    backlog: int = 1024
    #: Seconds an implicit-TLS client has to finish the TLS handshake.
    handshake_timeout: float = 10.0
    #: Descriptors kept out of the connection budget (listeners, logs, the
    #: resolver, files being read, idle upstream connections, refusals being
    #: written): this many, or a tenth of the limit when that is more.
    fd_reserve: int = 64
    #: Seconds a refusal waits for the client to read it and close.
    refusal_linger: float = 2.0


class Refused(Enum):
    """Why a connection was refused."""

    PEER = "too many connections from this peer"
    BUSY = "the connection budget is used up"


def raise_nofile_limit(resource: Any = _resource) -> tuple[int, int]:
    """
    Raise the soft C{RLIMIT_NOFILE} to the hard limit and log both; the
    (soft, hard) pair in force afterwards.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = NOFILE_UNLIMITED if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as e:
            log.warn("cannot raise the file descriptor limit to {wanted}: {error}",
                     wanted=wanted, error=e)
    new_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    log.info(
        "file descriptors: soft limit {new} (was {old}), hard limit {hard}",
        new=new_soft, old=soft, hard="unlimited" if hard == resource.RLIM_INFINITY else hard,
    )
    return new_soft, hard


def budget_for(limit: int, reserve: int) -> int:
    """The descriptors connections may hold under a limit of C{limit}."""
    return max(1, limit - max(reserve, limit // 10))


class Connections:
    """
    The process-wide count of descriptors held by connections, against a
    budget (None: not yet known; L{start} derives it from the raised limit).

    Each front door counts its inbound connections with a weight: the
    descriptors one connection may hold (SMTP: the socket and a spool file;
    HTTP: the socket, a request body file and, with an upstream, the upstream
    connection). Outbound connections that outlive their client (SOCKS) are
    added through L{add_source}.
    """

    def __init__(self, settings: ListenSettings = ListenSettings(), budget: int | None = None):
        self.settings = settings
        self.budget = budget
        #: Weighted descriptors held by inbound connections and lingering refusals.
        self.open = 0
        self._sources: list[Callable[[], int]] = []
        self._doors: dict[str, PeerLimit] = {}
        #: Listeners behind a PROXY-protocol endpoint: the peer at accept is the proxy.
        self.behind_proxy: set[str] = set()
        self._warned_busy = False
        self._started = False

    def start(self, resource: Any = _resource) -> None:
        """Raise the descriptor limit and derive the budget (unless one was given); once."""
        if self._started:
            return
        self._started = True
        soft, _ = raise_nofile_limit(resource)
        if self.budget is None and soft != resource.RLIM_INFINITY:
            self.budget = budget_for(soft, self.settings.fd_reserve)
            log.info("connection budget: {budget} descriptors", budget=self.budget)

    def add_source(self, count: Callable[[], int]) -> None:
        """Count more descriptors: C{count()} is asked at every new connection."""
        self._sources.append(count)

    def in_use(self) -> int:
        return self.open + sum(count() for count in self._sources)

    def has_room(self, weight: int) -> bool:
        """
        Whether C{weight} more descriptors fit in the budget. Logs once when
        the budget is used up, and once when a tenth of it is free again.
        """
        if self.budget is None:
            return True
        in_use = self.in_use()
        if self._warned_busy and in_use < self.budget * 0.9:
            self._warned_busy = False
            log.info("accepting new connections again: {in_use} of {budget} descriptors in use",
                     in_use=in_use, budget=self.budget)
        if in_use + weight <= self.budget:
            return True
        if not self._warned_busy:
            self._warned_busy = True
            log.warn(
                "refusing new connections: the connection budget ({budget} descriptors) "
                "is used up",
                budget=self.budget,
            )
        return False

    def door(
        self,
        name: str,
        max_per_peer: int,
        weight: int = 1,
        exempt: Sequence[Any] = (),
    ) -> PeerLimit:
        """The one L{PeerLimit} of front door C{name}, shared by its listeners."""
        limit = self._doors.get(name)
        if limit is None:
            limit = self._doors[name] = PeerLimit(self, name, max_per_peer, weight, tuple(exempt))
        return limit


class PeerLimit:
    """Connections per peer (IPv6 by /64) on one front door."""

    def __init__(
        self,
        connections: Connections,
        name: str,
        max_per_peer: int,
        weight: int = 1,
        exempt: tuple[Any, ...] = (),
    ) -> None:
        self.connections = connections
        self.name = name
        self.max_per_peer = max_per_peer
        self.weight = weight
        #: Networks without a cap (trusted proxies, trusted SMTP networks).
        self.exempt = exempt
        self.counts: Counter[str] = Counter()
        #: Refusals still lingering, per peer key.
        self.lingering: Counter[str | None] = Counter()
        self._warned: set[str] = set()

    def check(self, peer: str | None, key: str | None, capped: bool = True) -> Refused | None:
        """
        Why a new connection from C{peer} (an IP address, or None), counted
        under C{key}, is refused; or None: it may come in.
        """
        if (
            capped
            and key is not None
            and self.counts[key] >= self.max_per_peer
            and not in_networks(peer, self.exempt)
        ):
            if key not in self._warned:  # once until all its connections are gone
                self._warned.add(key)
                log.warn(
                    "{door}: refusing connections from {peer}: {count} open, its limit",
                    door=self.name, peer=key, count=self.counts[key],
                )
            return Refused.PEER
        if not self.connections.has_room(self.weight):
            return Refused.BUSY
        return None

    def may_linger(self, key: str | None) -> bool:
        """Whether a refusal for C{key} may linger (then it is counted until it ends)."""
        if self.lingering[key] >= MAX_LINGER_PER_PEER or not self.connections.has_room(1):
            return False
        self.lingering[key] += 1
        self.connections.open += 1
        return True

    def done_lingering(self, key: str | None) -> None:
        self.connections.open -= 1
        self.lingering[key] -= 1
        if self.lingering[key] <= 0:
            del self.lingering[key]

    def take(self, key: str | None) -> None:
        if key is not None:
            self.counts[key] += 1
        self.connections.open += self.weight

    def release(self, key: str | None) -> None:
        self.connections.open -= self.weight
        if key is not None:
            self.counts[key] -= 1
            if self.counts[key] <= 0:
                del self.counts[key]
                self._warned.discard(key)  # logged again only once it has left


class _Forwarding:
    """
    Stands between a transport and a protocol: the protocol gets the real
    transport (its writes and producers go straight there), and the events
    pass through here. Provides what the wrapped protocol provides.
    """

    def __init__(self, wrapped: Any) -> None:
        self.wrapped = wrapped
        self.transport: Any = None
        directlyProvides(self, providedBy(wrapped))

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        self.wrapped.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self.wrapped.dataReceived(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.wrapped.connectionLost(reason)

    def readConnectionLost(self) -> None:
        self.wrapped.readConnectionLost()

    def writeConnectionLost(self) -> None:
        self.wrapped.writeConnectionLost()

    def logPrefix(self) -> str:
        wrapped = interfaces.ILoggingContext(self.wrapped, None)
        return wrapped.logPrefix() if wrapped is not None else type(self.wrapped).__name__

    def __getattr__(self, name: str) -> Any:
        if name == "wrapped":  # not set yet: no recursion
            raise AttributeError(name)
        return getattr(self.wrapped, name)


class _Counted(_Forwarding):
    """A counted connection: releases its count once, when it ends."""

    def __init__(self, wrapped: Any, release: Callable[[], None]) -> None:
        super().__init__(wrapped)
        self._release: Callable[[], None] | None = release

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        release, self._release = self._release, None
        try:
            self.wrapped.connectionLost(reason)
        finally:
            if release is not None:
                release()


class _HandshakeDeadline(_Forwarding):
    """
    Inside TLS: aborts the connection when the handshake has not finished
    in time. C{TLSMemoryBIOProtocol} tells its wrapped protocol when it has.
    """

    def __init__(self, wrapped: Any, reactor: Any, timeout: float) -> None:
        super().__init__(wrapped)
        alsoProvides(self, interfaces.IHandshakeListener)
        self._reactor = reactor
        self._timeout = timeout
        self._timer: Any = None

    def makeConnection(self, transport: Any) -> None:
        self._timer = self._reactor.callLater(self._timeout, self._expired, transport)
        super().makeConnection(transport)

    def _stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def handshakeCompleted(self) -> None:
        self._stop()
        if interfaces.IHandshakeListener.providedBy(self.wrapped):
            self.wrapped.handshakeCompleted()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._stop()
        self.wrapped.connectionLost(reason)

    def _expired(self, tls: Any) -> None:
        self._timer = None
        log.info("TLS handshake not finished within {timeout} s: closing", timeout=self._timeout)
        # The TCP connection under the TLS protocol: closing TLS itself would
        # wait for a handshake that does not come.
        underlying = getattr(tls, "transport", None) or tls
        underlying.abortConnection()


class HandshakeDeadlineFactory(protocol.Factory):
    """Wraps each protocol of C{wrapped} in a handshake deadline (put it inside TLS)."""

    def __init__(self, wrapped: protocol.Factory, reactor: Any, timeout: float) -> None:
        self.wrappedFactory = wrapped
        self.reactor = reactor
        self.timeout = timeout

    def doStart(self) -> None:
        self.wrappedFactory.doStart()

    def doStop(self) -> None:
        self.wrappedFactory.doStop()

    def buildProtocol(self, addr: Any) -> Any:
        proto = self.wrappedFactory.buildProtocol(addr)
        if proto is None:
            return None
        return _HandshakeDeadline(proto, self.reactor, self.timeout)


@implementer(interfaces.IHalfCloseableProtocol)
class _Refuser(protocol.Protocol):
    """
    Writes a refusal and closes. Where the budget allows (and the peer has
    few refusals lingering), it half-closes and lingers, reading and dropping
    at most L{MAX_LINGER_INPUT} bytes, for a moment: a client which already
    sent its request then reads the answer instead of a reset.
    """

    def __init__(self, message: bytes, limit: PeerLimit, key: str | None, reactor: Any) -> None:
        self.message = message
        self.limit = limit
        self.key = key
        self.reactor = reactor
        self._timer: Any = None
        self._lingering = False
        self._dropped = 0

    def connectionMade(self) -> None:
        self.transport.write(self.message)
        linger = self.limit.connections.settings.refusal_linger
        half_close = getattr(self.transport, "loseWriteConnection", None)
        if linger > 0 and half_close is not None and self.limit.may_linger(self.key):
            self._lingering = True
            self._timer = self.reactor.callLater(linger, self.transport.abortConnection)
            half_close()
        else:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self._dropped += len(data)
        if self._dropped > MAX_LINGER_INPUT:
            self.transport.abortConnection()

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._lingering:
            self._lingering = False
            self.limit.done_lingering(self.key)


class LimitedFactory(protocol.Factory):
    """
    Admits a connection to C{wrapped} when its peer is under the front
    door's cap and the budget has room; otherwise answers with
    C{refusals[reason]} (or, without refusals, closes at once: on an
    implicit-TLS listener the refusal would cost a whole handshake).
    """

    noisy = False

    def __init__(
        self,
        wrapped: protocol.Factory,
        limit: PeerLimit,
        reactor: Any,
        refusals: Mapping[Refused, bytes] | None = None,
        listener: str | None = None,
    ) -> None:
        self.wrappedFactory = wrapped
        self.limit = limit
        self.reactor = reactor
        self.refusals = refusals
        self.listener = listener

    def doStart(self) -> None:
        self.wrappedFactory.doStart()

    def doStop(self) -> None:
        self.wrappedFactory.doStop()

    def logPrefix(self) -> str:
        wrapped = interfaces.ILoggingContext(self.wrappedFactory, None)
        return wrapped.logPrefix() if wrapped is not None else type(self.wrappedFactory).__name__

    def buildProtocol(self, addr: Any) -> Any:
        limit = self.limit
        peer = ip_or_none(getattr(addr, "host", None))
        key = peer_key(peer)
        capped = self.listener not in limit.connections.behind_proxy
        refused = limit.check(peer, key, capped)
        if refused is not None:
            if self.refusals is None:
                return None
            return _Refuser(self.refusals[refused], limit, key, self.reactor)
        proto = self.wrappedFactory.buildProtocol(addr)
        if proto is None:
            return None
        limit.take(key)
        return _Counted(proto, lambda: limit.release(key))


def limit_connections(
    core: Any,
    factory: protocol.Factory,
    door: str,
    listener: str,
    max_per_peer: int,
    *,
    weight: int = 1,
    exempt: Sequence[Any] = (),
    refusals: Mapping[Refused, bytes] | None = None,
    tls: Any = None,
) -> LimitedFactory:
    """
    A front door's factory as it listens: with implicit TLS when C{tls} (a
    context factory) is given, with a handshake deadline inside it, and the
    cap and budget outside it (a refused client costs no handshake).
    """
    from twisted.protocols.tls import TLSMemoryBIOFactory

    connections: Connections = core.connections
    if tls is not None:
        factory = TLSMemoryBIOFactory(
            tls,
            False,
            HandshakeDeadlineFactory(
                factory, core.reactor, connections.settings.handshake_timeout
            ),
        )
        refusals = None
    limit = connections.door(door, max_per_peer, weight, exempt)
    return LimitedFactory(factory, limit, core.reactor, refusals, listener)


#: Where each endpoint type takes C{backlog} as a positional argument.
_BACKLOG_POSITION = {"tcp": 2, "tcp6": 1, "ssl": 5, "unix": 2}


def _split(description: str) -> list[str]:
    """An endpoint string's fields: split at C{:} not escaped by a backslash."""
    fields, current, escaped = [], [], False
    for char in description:
        if escaped:
            current.append("\\" + char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            fields.append("".join(current))
            current = []
        else:
            current.append(char)
    fields.append("".join(current))
    return fields


def _keyword(field: str) -> str | None:
    """The keyword of a C{key=value} field, or None for a positional one."""
    i = 0
    while i < len(field):
        if field[i] == "\\":
            i += 2
            continue
        if field[i] == "=":
            return field[:i]
        i += 1
    return None


def with_backlog(description: str, backlog: int) -> str:
    """
    C{description} with C{:backlog=N} added when it is a C{tcp:}, C{tcp6:},
    C{ssl:} or C{unix:} endpoint (also under C{haproxy:}) that sets none itself.
    """
    fields = _split(description)
    at = 1 if fields[0].strip().lower() == "haproxy" else 0
    if len(fields) <= at + 1:
        return description
    kind = fields[at].strip().lower()
    position = _BACKLOG_POSITION.get(kind)
    if position is None:
        return description
    arguments = fields[at + 1 :]
    keywords = [_keyword(f) for f in arguments]
    if "backlog" in keywords or sum(k is None for k in keywords) > position:
        return description
    return f"{description}:backlog={backlog}"


__all__ = [
    "Connections",
    "HandshakeDeadlineFactory",
    "LimitedFactory",
    "ListenSettings",
    "PeerLimit",
    "Refused",
    "budget_for",
    "limit_connections",
    "raise_nofile_limit",
    "with_backlog",
]
