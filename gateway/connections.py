# -*- test-case-name: tests.test_connections -*-
"""
Connection bounds shared by every front door.

- A cap on the connections one peer (IPv6 by /64) holds open on a front door
  at once (C{--smtp-max-connections-per-peer}, ...). The C{smtp} and C{smtps}
  listeners are one front door for a peer's cap (likewise C{http}/C{https},
  C{socks}/C{socks-tls}): a second listener must not double the cap.
- A cap on the connections one network prefix (IPv4 /24, IPv6 /48 by
  default) holds on all front doors together: one customer's network is one
  client, whichever addresses and front doors it spreads over. A network at
  its cap does not lock its other addresses out: a new connection from a
  peer under its own cap first closes the network's oldest unauthenticated
  connection of the peer holding the most (L{Connections.evictee}), so a few
  addresses holding idle connections cannot refuse their neighbours, and
  only authenticated sessions can hold a network's cap against newcomers.
- A share of the budget for connections that have not authenticated yet
  (and refusals lingering): half by default, and of that half, an equal part
  reserved for each front door. Unauthenticated clients cannot take the room
  of authenticated sessions, nor of new clients of another front door. A
  front door says when a connection has authenticated with L{authenticated}.
  Within a door's part, one peer may hold C{peer_fair_share} and one
  network C{prefix_fair_share} (L{Connections.fair_share}). Past
  L{STRESS_LEVEL} of it, a front door's unauthenticated connections idle
  for C{--stress-timeout} are closed, greediest networks first (Postfix's
  stress mode), and a newcomer finding it full closes one of the network
  holding the most (L{Connections.door_evictee}). Connections with a login
  running (L{login_running}, a front door's call-in) are never closed so.
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
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

import attrs
from twisted.internet import defer, interfaces, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import alsoProvides, directlyProvides, implementer, providedBy

from gateway.addresses import in_networks, ip_or_none, network_of, peer_key

if TYPE_CHECKING:
    from gateway.core import Core

log = Logger()

#: Bytes a lingering refusal reads (and drops) before it closes at once.
MAX_LINGER_INPUT = 64 * 1024
#: Refusals one peer may have lingering at once; more are closed at once,
#: so a peer at its cap cannot hold descriptors by connecting again and again.
MAX_LINGER_PER_PEER = 4
#: Refusals one network prefix may have lingering at once.
MAX_LINGER_PER_PREFIX = 16
#: The part of what a front door's unauthenticated connections may hold past
#: which the oldest of them get L{ListenSettings.stress_timeout}.
STRESS_LEVEL = 0.75
#: PROXY headers one proxy address may have outstanding at once (connections
#: accepted from it whose header has not come yet). A proxy that sends the
#: header with its connect, as HAProxy's C{send-proxy} does, keeps one
#: outstanding for a round trip: 256 at once is 256 new connections per
#: round trip (256,000 a second at 1 ms), beyond any gateway's rate. Only a
#: proxy that waits for its client to speak first (unsupported) comes near,
#: and then its silent clients hold at most this many descriptors for
#: C{proxy_header_timeout} seconds, within its door's unauthenticated share.
MAX_PENDING_HEADERS_PER_PROXY = 256
#: A hard limit of "unlimited" is raised to this many descriptors at most.
NOFILE_UNLIMITED = 1 << 20
#: A door refusing for its unauthenticated share (or under stress) logs
#: that it is not once its unauthenticated connections, a newcomer
#: included, are at most this part of its limit (of its stress level):
#: one connection coming and going does not log a line each time.
REARM_LEVEL = 0.9


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
    #: Connections one network prefix may hold on all front doors together:
    #: several addresses at every front door's per-peer cap (SMTP 50 + HTTP
    #: 128 + SOCKS 256 = 434 per address; 2048 is more than four of them,
    #: sixteen at the HTTP cap), so that a busy NAT'd network is not refused
    #: while one network still cannot take a large budget alone.
    max_per_prefix: int = 2048
    #: The prefix lengths of a network for L{max_per_prefix}.
    ipv4_prefix: int = 24
    ipv6_prefix: int = 48
    #: The part of the budget connections may hold before they authenticate.
    unauthenticated_share: float = 0.5
    #: Under stress (a front door's unauthenticated connections past
    #: L{STRESS_LEVEL} of what it may hold), its unauthenticated connections
    #: older than this many seconds are closed to make room (Postfix's stress mode).
    stress_timeout: float = 10.0
    #: The most of a front door's unauthenticated room one peer (IPv6 /64)
    #: may hold (at least one connection); more are refused.
    peer_fair_share: float = 1 / 8
    #: The most of it one network prefix may hold (at least one connection).
    prefix_fair_share: float = 1 / 4
    #: Networks of the proxies whose connections start with a PROXY protocol
    #: header (v1 or v2) carrying the client's address (see L{gateway.proxyproto}).
    proxy_protocol_from: tuple[Any, ...] = ()
    #: Seconds such a proxy has to send the whole header.
    proxy_header_timeout: float = 3.0


class Refused(Enum):
    """Why a connection was refused."""

    PEER = "too many connections from this peer"
    BUSY = "the connection budget is used up"
    PREFIX = "too many connections from this peer's network"
    UNAUTHENTICATED = "the budget's share for unauthenticated connections is used up"


#: The answer a front door gives for a reason it has no answer of its own for.
_SAME_ANSWER = {Refused.PREFIX: Refused.PEER, Refused.UNAUTHENTICATED: Refused.BUSY}


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

    Connections are also counted per network prefix (all front doors
    together) and, until they authenticate, per front door against the
    unauthenticated share of the budget (see L{unauthenticated_room}).
    """

    def __init__(self, settings: ListenSettings = ListenSettings(), budget: int | None = None):
        self.settings = settings
        self.budget = budget
        #: Weighted descriptors held by inbound connections and lingering refusals.
        self.open = 0
        #: Weighted descriptors of unauthenticated connections and lingering refusals, per door.
        self.unauthenticated: Counter[str] = Counter()
        #: Connections per network prefix, all front doors together.
        self.prefixes: Counter[str] = Counter()
        #: Refusals lingering per network prefix.
        self.lingering_prefixes: Counter[str | None] = Counter()
        #: Unauthenticated admissions per network prefix and peer key, oldest
        #: first (the ones a newcomer of a full network may close).
        self.pending: dict[str, dict[str | None, dict[Admission, None]]] = {}
        #: Networks in an episode of evictions: the number closed so far.
        self._evicting: dict[str, int] = {}
        self._sources: list[Callable[[], int]] = []
        self._doors: dict[str, PeerLimit] = {}
        #: Listeners behind a PROXY-protocol endpoint: the peer at accept is the proxy.
        self.behind_proxy: set[str] = set()
        #: The connections open now, per front door (admitted ones, in the
        #: order they came): for drain and metrics. See L{door_protocol}.
        self.sessions: dict[str, dict[Any, None]] = {}
        #: Connections admitted since the start, per front door.
        self.opened: Counter[str] = Counter()
        #: Who waits for an entry of L{sessions} to end (L{when_closed}).
        self._closing: dict[Any, list[defer.Deferred[None]]] = {}
        self._warned_busy = False
        #: Doors refusing for their unauthenticated share: refusals since logged.
        self._warned_unauthenticated: dict[str, int] = {}
        #: Unauthenticated connections per door and peer key, and per door and
        #: network prefix (connections, not descriptors), for the fair shares.
        self.unauthenticated_peers: dict[str, Counter[str | None]] = {}
        self.unauthenticated_prefixes: dict[str, Counter[str]] = {}
        self._warned_fair: set[tuple[str, str | None]] = set()
        self._warned_prefixes: set[str] = set()
        #: Unauthenticated admissions per door, oldest first (for stress mode).
        self.waiting: dict[str, dict[Admission, None]] = {}
        self._stressed: set[str] = set()
        self._started = False
        #: Trusted proxies' connections waiting for their PROXY header
        #: (L{gateway.proxyproto}), each with its proxy and door: each holds a
        #: descriptor, counted as one in L{open} and in its door's
        #: unauthenticated share until its header comes (L{await_header}).
        self.headers: dict[Any, tuple[str | None, str]] = {}
        self.headers_per_proxy: Counter[str | None] = Counter()
        #: The drain has begun: no header is awaited any more (L{abort_headers}).
        self.headers_closed = False
        #: The local ends (address, port) of the gateway's own outbound
        #: connections open now (the SOCKS relay's; a Counter: two connections
        #: to different destinations may share one): a connection coming from
        #: one of them is the gateway itself, never a trusted proxy.
        self.own_outbound: Counter[tuple[str | None, int]] = Counter()
        #: The gateway opens such connections (it has a SOCKS door).
        self.relaying = False

    def start(self, resource: Any = _resource) -> None:
        """Raise the descriptor limit and derive the budget (unless one was given); once."""
        if self._started:
            return
        self._started = True
        soft, _ = raise_nofile_limit(resource)
        if self.budget is None and soft != resource.RLIM_INFINITY:
            self.budget = budget_for(soft, self.settings.fd_reserve)
            log.info("connection budget: {budget} descriptors", budget=self.budget)

    def when_closed(self, session: Any) -> defer.Deferred[None]:
        """A Deferred firing once C{session}, an entry of L{sessions}, has ended (now if it has)."""
        if not any(session in open_ for open_ in self.sessions.values()):
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._closing.setdefault(session, []).append(d)
        return d

    def session_ended(self, door: str, session: Any) -> None:
        """C{session} of front door C{door} has ended: out of L{sessions}, its waiters told."""
        self.sessions.get(door, {}).pop(session, None)
        for d in self._closing.pop(session, ()):
            if not d.called:  # a waiter may have given up (cancelled)
                d.callback(None)

    def await_header(self, reader: Any, proxy: str | None, door: str) -> str | None:
        """
        Count C{reader}, a connection of proxy C{proxy} (its address) on
        C{door} waiting for its PROXY header, as one descriptor (the budget
        and the door's unauthenticated share) until L{header_done}: None, or
        why there is no room for it (then it is refused).
        """
        if self.headers_closed:
            return "the gateway is stopping"
        if self.headers_per_proxy[proxy] >= MAX_PENDING_HEADERS_PER_PROXY:
            return f"{MAX_PENDING_HEADERS_PER_PROXY} of its headers are awaited already"
        if not self.has_room(1) or not self.unauthenticated_room(door, 1):
            return "the connection budget is used up"
        self.open += 1
        self.unauthenticated[door] += 1
        self.headers[reader] = (proxy, door)
        self.headers_per_proxy[proxy] += 1
        return None

    def header_done(self, reader: Any) -> bool:
        """
        C{reader}'s header came, or its connection ends: its count is
        released (once). Whether it was still awaited (not aborted by the drain).
        """
        entry = self.headers.pop(reader, None)
        if entry is None:
            return False
        proxy, door = entry
        self.open -= 1
        _decrement(self.unauthenticated, door, 1)
        _decrement(self.headers_per_proxy, proxy, 1)
        return True

    def abort_headers(self) -> int:
        """
        The drain begins: abort every connection still waiting for its
        PROXY header (no session of it would be asked to drain) and await
        none from now on. How many were aborted.
        """
        self.headers_closed = True
        readers = list(self.headers)
        for reader in readers:
            self.header_done(reader)
            transport = reader.transport
            abort = getattr(transport, "abortConnection", None)
            (abort or transport.loseConnection)()
        return len(readers)

    def outbound_opened(self, local: Any) -> None:
        """The gateway opened an outbound connection from C{local} (its getHost())."""
        key = _address_key(local)
        if key[0] is not None:
            self.own_outbound[key] += 1

    def outbound_closed(self, local: Any) -> None:
        """That outbound connection (L{outbound_opened}) has ended."""
        key = _address_key(local)
        if key in self.own_outbound:
            _decrement(self.own_outbound, key, 1)

    def is_own_outbound(self, peer: Any) -> bool:
        """Whether C{peer} (an accepted connection's getPeer()) is an outbound connection of ours."""
        return bool(self.own_outbound) and _address_key(peer) in self.own_outbound

    def add_source(self, count: Callable[[], int]) -> None:
        """Count more descriptors: C{count()} is asked at every new connection."""
        self._sources.append(count)

    def in_use(self) -> int:
        return self.open + sum(count() for count in self._sources)

    def prefix_of(self, peer: str | None) -> str | None:
        """The network prefix C{peer} counts under (None: no IP address)."""
        return network_of(peer, self.settings.ipv4_prefix, self.settings.ipv6_prefix)

    def prefix_full(self, prefix: str | None) -> bool:
        """Whether network C{prefix} holds its cap (logged once until it is empty)."""
        if prefix is None or self.prefixes[prefix] < self.settings.max_per_prefix:
            return False
        if prefix not in self._warned_prefixes:
            self._warned_prefixes.add(prefix)
            log.warn(
                "refusing connections from network {prefix}: {count} open, its limit",
                prefix=prefix, count=self.prefixes[prefix],
            )
        return True

    def take_prefix(self, prefix: str | None) -> None:
        if prefix is not None:
            self.prefixes[prefix] += 1

    def release_prefix(self, prefix: str | None) -> None:
        if prefix is not None:
            self.prefixes[prefix] -= 1
            if self.prefixes[prefix] <= 0:
                del self.prefixes[prefix]
                self._warned_prefixes.discard(prefix)
            below_half = self.prefixes[prefix] < self.settings.max_per_prefix / 2
            if prefix in self._evicting and below_half:
                log.info(
                    "network {prefix} is below its limit again: {closed} unauthenticated "
                    "connections were closed to admit others",
                    prefix=prefix, closed=self._evicting.pop(prefix),
                )

    def evictee(self, prefix: str | None, key: str | None) -> Admission | None:
        """
        The connection a newcomer from peer C{key} of the full network
        C{prefix} may close to come in: the oldest unauthenticated connection
        of the network's peer holding the most unauthenticated connections
        (ties: the one holding the oldest), on any front door; None when that
        peer holds no more of them than C{key} itself (the newcomer is the
        greediest: it is refused) or the network holds only authenticated ones.
        """
        peers = self.pending.get(prefix) if prefix is not None else None
        if not peers:
            return None
        greediest, held = None, 0
        for candidate, waiting in peers.items():
            # Never one whose login is running: closing it would cancel a
            # password check the client is waiting for.
            oldest = next((a for a in waiting if not a.logins), None)
            if oldest is None:
                continue
            if greediest is None or (len(waiting), -oldest.since) > (held, -greediest.since):
                greediest, held = oldest, len(waiting)
        if greediest is None or held <= len(peers.get(key, ())):
            return None
        return greediest

    def evict(self, admission: Admission) -> None:
        """
        Close C{admission} (unauthenticated) to make room in its full network:
        its place in the network's count is given up at once (its descriptors
        when it ends). Logged once per network and episode (until the network
        falls below half its cap).
        """
        prefix = admission.prefix
        if prefix is None:
            return
        if prefix not in self._evicting:
            self._evicting[prefix] = 0
            log.warn(
                "network {prefix} holds its limit of {limit} connections: closing its "
                "oldest unauthenticated connections (of the address holding the most) "
                "to admit new clients",
                prefix=prefix, limit=self.settings.max_per_prefix,
            )
        self._evicting[prefix] += 1
        admission.shed()
        if not admission.released:  # released when it ends, but without its network
            admission.prefix = None
            self.release_prefix(prefix)

    def unauthenticated_room(self, door: str, weight: int, say: bool = True) -> bool:
        """
        Whether C{weight} more unauthenticated descriptors fit for front door
        C{door}. Unauthenticated connections hold at most
        C{unauthenticated_share} of the budget; half of that is split evenly
        among the front doors, each one's own reserve, and the other half is
        shared: a flood on one front door leaves the other doors' reserves.
        Logs (when C{say}) once when refusing, and once when there is room again.
        """
        if self.budget is None:
            return True
        limit = self._unauthenticated_limit(door)
        fits = self.unauthenticated[door] + weight <= limit
        if not say:
            return fits
        warned = door in self._warned_unauthenticated
        if fits and warned and self.unauthenticated[door] + weight <= REARM_LEVEL * limit:
            log.info(
                "{door}: accepting unauthenticated connections again ({refused} refused "
                "meanwhile)",
                door=door, refused=self._warned_unauthenticated.pop(door),
            )
        elif not fits and not warned:
            self._warned_unauthenticated[door] = 1
            log.warn(
                "refusing new connections on {door}: unauthenticated connections hold "
                "their share of the budget ({share} of {budget} descriptors)",
                door=door, share=int(self.budget * self.settings.unauthenticated_share),
                budget=self.budget,
            )
        elif not fits:
            self._warned_unauthenticated[door] += 1
        return fits

    def fair_share(
        self, door: str, weight: int, key: str | None, prefix: str | None
    ) -> Refused | None:
        """
        Whether one more unauthenticated connection of peer C{key} in network
        C{prefix} stays within its fair part of C{door}'s unauthenticated
        room (a peer C{peer_fair_share} of it, a network C{prefix_fair_share},
        at least one connection each): None, or why not. Without it one
        address, or a few networks, reconnecting as fast as they are closed
        hold a door's whole room. Logged once per peer or network until it
        holds none.
        """
        if self.budget is None or prefix is None:
            return None
        room = self._unauthenticated_limit(door) // max(1, weight)
        peers = self.unauthenticated_peers.get(door, Counter())
        prefixes = self.unauthenticated_prefixes.get(door, Counter())
        peer_share, prefix_share = self.settings.peer_fair_share, self.settings.prefix_fair_share
        if key is not None and peer_share < 1 and peers[key] >= max(1, int(room * peer_share)):
            why, who, count = Refused.PEER, key, peers[key]
        elif prefix_share < 1 and prefixes[prefix] >= max(1, int(room * prefix_share)):
            why, who, count = Refused.PREFIX, prefix, prefixes[prefix]
        else:
            return None
        if (door, who) not in self._warned_fair:
            self._warned_fair.add((door, who))
            log.warn(
                "{door}: refusing connections from {who}: {count} unauthenticated "
                "connections open, its fair share",
                door=door, who=who, count=count,
            )
        return why

    def _count_unauthenticated(self, admission: Admission, step: int) -> None:
        """Count C{admission} in or out of its door's fair shares."""
        door = admission.limit.name
        peers = self.unauthenticated_peers.setdefault(door, Counter())
        prefixes = self.unauthenticated_prefixes.setdefault(door, Counter())
        for counter, who in ((peers, admission.key), (prefixes, admission.prefix)):
            counter[who] += step
            if counter[who] <= 0:
                del counter[who]
                self._warned_fair.discard((door, who))

    def door_evictee(self, door: str, prefix: str | None) -> Admission | None:
        """
        Under stress, the connection a newcomer of network C{prefix} that
        finds C{door}'s unauthenticated room full may close: the oldest
        unauthenticated connection, with no login running, of the network
        holding the most of them on C{door}, when that network holds at
        least two more than the newcomer's (so equals do not close each other
        in turn); else None. A reconnecting flood cannot keep a clean network out.
        """
        if prefix is None:
            return None
        prefixes = self.unauthenticated_prefixes.get(door)
        if not prefixes:
            return None
        own = prefixes[prefix]
        for greediest, held in prefixes.most_common(4):  # a bounded search
            if held <= own + 1:
                return None
            candidates = [
                admission
                for waiting in self.pending.get(greediest, {}).values()
                for admission in waiting
                if admission.limit.name == door and not admission.logins
            ]
            if candidates:
                return min(candidates, key=lambda a: a.since)
        return None

    def _unauthenticated_limit(self, door: str) -> int:
        """
        What C{door}'s unauthenticated connections may hold now: its reserve
        and what the other doors left of the shared pool.
        """
        assert self.budget is not None
        share = int(self.budget * self.settings.unauthenticated_share)
        doors = set(self._doors) | {door}
        reserve = share // (2 * len(doors))
        pool = share - reserve * len(doors)
        others = sum(max(0, self.unauthenticated[d] - reserve) for d in doors if d != door)
        return reserve + max(0, pool - others)

    def relieve(self, door: str, now: float) -> int:
        """
        Stress mode: when C{door}'s unauthenticated connections hold more than
        L{STRESS_LEVEL} of what they may, close those of them that have
        been open for C{stress_timeout} without logging in and have no login
        running (their age, not their silence: a byte now and then must not
        keep a connection that never logs in),
        those of the networks holding the most first (then the oldest), until
        the door is below the level again, so that a flood of idle connections
        cannot hold the front door for a whole authentication deadline. The
        number closed; logged once per episode.
        """
        if self.budget is None:
            return 0
        level = STRESS_LEVEL * self._unauthenticated_limit(door)
        stressed = self.unauthenticated[door] > level
        if not stressed:
            door_limit = self._doors.get(door)
            weight = door_limit.weight if door_limit is not None else 1
            calm = self.unauthenticated[door] + weight <= REARM_LEVEL * level
            if door in self._stressed and calm:
                self._stressed.discard(door)
                log.info("{door}: stress mode off, unauthenticated connections below its level",
                         door=door)
            return 0
        if door not in self._stressed:
            self._stressed.add(door)
            log.warn(
                "{door}: under stress, closing unauthenticated connections older than "
                "{timeout} s",
                door=door, timeout=self.settings.stress_timeout,
            )
        deadline = now - self.settings.stress_timeout
        prefixes = self.unauthenticated_prefixes.get(door, Counter())
        idle = [
            admission for admission in self.waiting.get(door, {})
            if admission.since <= deadline and not admission.logins
        ]
        idle.sort(key=lambda a: (-prefixes[a.prefix] if a.prefix is not None else 0, a.since))
        closed = 0
        limit = self._unauthenticated_limit(door)
        for admission in idle:
            if self.unauthenticated[door] <= STRESS_LEVEL * limit:
                break
            admission.shed()
            closed += 1
        return closed

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

    def check(
        self,
        peer: str | None,
        key: str | None,
        capped: bool = True,
        prefix: str | None = None,
        trusted: bool | None = None,
    ) -> Refused | None:
        """
        Why a new connection from C{peer} (an IP address, or None), counted
        under C{key} and network C{prefix}, is refused; or None: it may come
        in. A C{trusted} connection (an exempt network: None, look it up)
        counts as authenticated from the start. When the network is at its
        cap, an admitted connection first closes the one L{Connections.evictee}
        names; with none to close it is refused.
        """
        if trusted is None:
            trusted = in_networks(peer, self.exempt)
        if capped and not trusted and key is not None and self.counts[key] >= self.max_per_peer:
            if key not in self._warned:  # once until all its connections are gone
                self._warned.add(key)
                log.warn(
                    "{door}: refusing connections from {peer}: {count} open, its limit",
                    door=self.name, peer=key, count=self.counts[key],
                )
            return Refused.PEER
        evictee = None
        if capped and not trusted and prefix is not None:
            if self.connections.prefixes[prefix] >= self.connections.settings.max_per_prefix:
                evictee = self.connections.evictee(prefix, key)
                if evictee is None and self.connections.prefix_full(prefix):
                    return Refused.PREFIX
        connections = self.connections
        if capped and not trusted:
            unfair = connections.fair_share(self.name, self.weight, key, prefix)
            if unfair is not None:
                return unfair
        if not connections.has_room(self.weight):
            return Refused.BUSY
        if not trusted and not connections.unauthenticated_room(self.name, self.weight, say=False):
            # Under stress: a newcomer of a network holding less makes room.
            crowding = connections.door_evictee(self.name, prefix) if capped else None
            if crowding is not None and crowding is not evictee:
                crowding.shed()
        if not trusted and not connections.unauthenticated_room(self.name, self.weight):
            return Refused.UNAUTHENTICATED
        if evictee is not None:
            connections.evict(evictee)
        return None

    def may_linger(self, key: str | None, prefix: str | None = None) -> bool:
        """Whether a refusal for C{key} may linger (then it is counted until it ends)."""
        connections = self.connections
        if (
            self.lingering[key] >= MAX_LINGER_PER_PEER
            or (prefix is not None
                and connections.lingering_prefixes[prefix] >= MAX_LINGER_PER_PREFIX)
            or not connections.has_room(1)
            or not connections.unauthenticated_room(self.name, 1, say=False)
        ):
            return False
        self.lingering[key] += 1
        if prefix is not None:
            connections.lingering_prefixes[prefix] += 1
        connections.open += 1
        connections.unauthenticated[self.name] += 1
        return True

    def done_lingering(self, key: str | None, prefix: str | None = None) -> None:
        connections = self.connections
        connections.open -= 1
        _decrement(connections.unauthenticated, self.name, 1)
        _decrement(self.lingering, key, 1)
        if prefix is not None:
            _decrement(connections.lingering_prefixes, prefix, 1)

    def take(
        self, key: str | None, prefix: str | None = None, trusted: bool = False, now: float = 0.0
    ) -> Admission:
        """Count a connection in (admitted at C{now}); the L{Admission} that releases it."""
        if key is not None:
            self.counts[key] += 1
        self.connections.open += self.weight
        self.connections.take_prefix(prefix)
        admission = Admission(self, key, prefix, since=now)
        if trusted:
            admission.authenticated = True
        else:
            self.connections.unauthenticated[self.name] += self.weight
            self.connections.waiting.setdefault(self.name, {})[admission] = None
            if prefix is not None:
                peers = self.connections.pending.setdefault(prefix, {})
                peers.setdefault(key, {})[admission] = None
                admission.fair = True
                self.connections._count_unauthenticated(admission, 1)
        return admission

    def release(
        self, key: str | None, prefix: str | None = None, authenticated: bool = True
    ) -> None:
        self.connections.open -= self.weight
        if not authenticated:
            _decrement(self.connections.unauthenticated, self.name, self.weight)
        self.connections.release_prefix(prefix)
        if key is not None:
            self.counts[key] -= 1
            if self.counts[key] <= 0:
                del self.counts[key]
                self._warned.discard(key)  # logged again only once it has left


def _address_key(address: Any) -> tuple[str | None, int]:
    """An IP address and port's key: the canonical address (IPv4-mapped folded) and the port."""
    return ip_or_none(getattr(address, "host", None)), getattr(address, "port", 0)


def _decrement(counter: Counter[Any], key: Any, amount: int) -> None:
    counter[key] -= amount
    if counter[key] <= 0:
        del counter[key]


@attrs.define(eq=False)
class Admission:
    """One counted connection: authenticated or not, released once."""

    limit: PeerLimit
    key: str | None
    prefix: str | None
    authenticated: bool = False
    released: bool = False
    #: When it was admitted (the reactor's clock).
    since: float = 0.0
    #: Its transport, once connected (closed by L{shed}).
    transport: Any = None
    #: When it last received bytes (the reactor's clock; admission at first).
    #: Logins running on it (L{login_running}): not closed under stress meanwhile.
    logins: int = 0
    #: Counted in its door's fair shares (unauthenticated, with a network).
    fair: bool = False

    def _stop_waiting(self) -> None:
        """It is no longer a candidate for stress mode nor for a network's eviction."""
        connections = self.limit.connections
        if self.fair:
            self.fair = False
            connections._count_unauthenticated(self, -1)
        connections.waiting.get(self.limit.name, {}).pop(self, None)
        peers = connections.pending.get(self.prefix) if self.prefix is not None else None
        if peers is not None:
            waiting = peers.get(self.key)
            if waiting is not None:
                waiting.pop(self, None)
                if not waiting:
                    del peers[self.key]
                    if not peers:
                        del connections.pending[self.prefix]

    def authenticate(self) -> None:
        """The connection has authenticated: it leaves the unauthenticated share."""
        if self.authenticated or self.released:
            return
        self.authenticated = True
        self._stop_waiting()
        _decrement(self.limit.connections.unauthenticated, self.limit.name, self.limit.weight)

    def shed(self) -> None:
        """
        Close the connection, unauthenticated, under stress or for a newcomer.
        Its count is released at once (not when the abort ends it, on a later
        reactor turn), so the newcomer it makes room for finds that room.
        """
        self._stop_waiting()
        transport = self.transport
        if transport is not None and not self.released:
            self.release()
            abort = getattr(transport, "abortConnection", None)
            (abort or transport.loseConnection)()

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self._stop_waiting()
        self.transport = None
        self.limit.release(self.key, self.prefix, self.authenticated)


#: The admission of each counted connection, by the transport it was made with.
_ADMISSIONS: WeakKeyDictionary[Any, Admission] = WeakKeyDictionary()


def authenticated(transport: Any) -> None:
    """
    A front door's call-in: the connection on C{transport} (a protocol's
    own transport, TLS and PROXY-protocol layers included) has authenticated,
    so it no longer counts against the unauthenticated share of the budget.
    Safe to call more than once, and for connections that are not counted.
    """
    admission = _admission_of(transport)
    if admission is not None:
        admission.authenticate()


def _admission_of(transport: Any) -> Admission | None:
    """The admission of the counted connection under C{transport}, if any."""
    seen = 0
    while transport is not None and seen < 8:
        try:
            admission = _ADMISSIONS.get(transport)
        except TypeError:  # not weakly referenceable: not one of ours
            admission = None
        if admission is not None:
            return admission
        transport = getattr(transport, "transport", None)
        seen += 1
    return None


def login_running(transport: Any, attempt: Any) -> Any:
    """
    A front door's call-in: a login (the Deferred C{attempt}) is running
    on the connection on C{transport}; until it fires, stress mode and a
    crowded door do not close that connection (closing would cancel the
    attempt, which may count as a failure for its address and user).
    C{attempt} is returned, with its result untouched.
    """
    admission = _admission_of(transport)
    if admission is None or admission.released:
        return attempt
    admission.logins += 1

    def done(result: Any) -> Any:
        admission.logins -= 1
        return result

    attempt.addBoth(done)
    return attempt


def _log_prefix(wrapped: Any) -> str:
    """What a wrapper's log lines are prefixed with: the wrapped object's own prefix."""
    context = interfaces.ILoggingContext(wrapped, None)
    return context.logPrefix() if context is not None else type(wrapped).__name__


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
        return _log_prefix(self.wrapped)

    def __getattr__(self, name: str) -> Any:
        if name == "wrapped":  # not set yet: no recursion
            raise AttributeError(name)
        return getattr(self.wrapped, name)


class _Counted(_Forwarding):
    """
    A counted connection: registers its transport for L{authenticated}, and
    releases its count once, when it ends.
    """

    def __init__(self, wrapped: Any, admission: Admission) -> None:
        super().__init__(wrapped)
        self.admission = admission

    def makeConnection(self, transport: Any) -> None:
        if not self.admission.released:
            self.admission.transport = transport
        try:
            _ADMISSIONS[transport] = self.admission
        except TypeError:  # a transport without weak references: never "authenticated"
            pass
        limit = self.admission.limit
        limit.connections.sessions.setdefault(limit.name, {})[self] = None
        limit.connections.opened[limit.name] += 1
        super().makeConnection(transport)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        try:
            self.wrapped.connectionLost(reason)
        finally:
            limit = self.admission.limit
            self.admission.release()
            limit.connections.session_ended(limit.name, self)


def door_protocol(session: Any) -> Any:
    """
    The front door's own protocol of an entry of L{Connections.sessions}
    (under the TLS layer and handshake deadline of an implicit-TLS listener).
    """
    proto = session
    for _ in range(8):
        if isinstance(proto, _Forwarding):
            proto = proto.wrapped
        elif getattr(proto, "wrappedProtocol", None) is not None:
            proto = proto.wrappedProtocol
        else:
            break
    return proto


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


class _WrapperFactory(protocol.Factory):
    """A factory in front of C{wrappedFactory}: its start and stop are the wrapped one's."""

    wrappedFactory: protocol.Factory

    def doStart(self) -> None:
        self.wrappedFactory.doStart()

    def doStop(self) -> None:
        self.wrappedFactory.doStop()


class HandshakeDeadlineFactory(_WrapperFactory):
    """Wraps each protocol of C{wrapped} in a handshake deadline (put it inside TLS)."""

    def __init__(self, wrapped: protocol.Factory, reactor: Any, timeout: float) -> None:
        self.wrappedFactory = wrapped
        self.reactor = reactor
        self.timeout = timeout

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

    def __init__(
        self, message: bytes, limit: PeerLimit, key: str | None, reactor: Any,
        prefix: str | None = None,
    ) -> None:
        self.message = message
        self.limit = limit
        self.key = key
        self.prefix = prefix
        self.reactor = reactor
        self._timer: Any = None
        self._lingering = False
        self._dropped = 0

    def connectionMade(self) -> None:
        self.transport.write(self.message)
        linger = self.limit.connections.settings.refusal_linger
        half_close = getattr(self.transport, "loseWriteConnection", None)
        if linger > 0 and half_close is not None and self.limit.may_linger(self.key, self.prefix):
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
            self.limit.done_lingering(self.key, self.prefix)


class LimitedFactory(_WrapperFactory):
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

    def logPrefix(self) -> str:
        return _log_prefix(self.wrappedFactory)

    def buildProtocol(self, addr: Any) -> Any:
        limit = self.limit
        peer = ip_or_none(getattr(addr, "host", None))
        key = peer_key(peer)
        prefix = limit.connections.prefix_of(peer)
        capped = self.listener not in limit.connections.behind_proxy
        trusted = capped and in_networks(peer, limit.exempt)
        if not trusted:
            limit.connections.relieve(limit.name, self.reactor.seconds())
        refused = limit.check(peer, key, capped, prefix, trusted)
        if refused is not None:
            if self.refusals is None:
                return None
            message = self.refusals.get(refused) or self.refusals[_SAME_ANSWER[refused]]
            return _Refuser(message, limit, key, self.reactor, prefix)
        proto = self.wrappedFactory.buildProtocol(addr)
        if proto is None:
            return None
        # Trusted peers and the proxy of a PROXY-protocol listener fill no network's cap.
        return _Counted(
            proto,
            limit.take(
                key, prefix if capped and not trusted else None, trusted, self.reactor.seconds()
            ),
        )


def limit_connections(
    core: Core,
    factory: protocol.Factory,
    door: str,
    listener: str,
    max_per_peer: int,
    *,
    weight: int = 1,
    exempt: Sequence[Any] = (),
    refusals: Mapping[Refused, bytes] | None = None,
    tls: Any = None,
) -> protocol.Factory:
    """
    A front door's factory as it listens: with implicit TLS when C{tls} (a
    context factory) is given, with a handshake deadline inside it, the
    cap and budget outside it (a refused client costs no handshake), and,
    with C{--proxy-protocol-from}, the PROXY header reader outermost (the
    cap, the budget and everything inside see the client it names).
    """
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from gateway.proxyproto import proxy_protocol

    connections = core.connections
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
    return proxy_protocol(core, LimitedFactory(factory, limit, core.reactor, refusals, listener))


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
    "Admission",
    "Connections",
    "HandshakeDeadlineFactory",
    "LimitedFactory",
    "MAX_PENDING_HEADERS_PER_PROXY",
    "ListenSettings",
    "PeerLimit",
    "Refused",
    "authenticated",
    "budget_for",
    "door_protocol",
    "limit_connections",
    "login_running",
    "raise_nofile_limit",
    "with_backlog",
]
