# -*- test-case-name: tests.test_socks_server -*-
"""
The SOCKS5 front door: a thin Twisted protocol around the sans-I/O
L{ServerCodec}, RFC 1929 logins through the Portal, destination rules, and
a relay that moves bytes with producer/consumer backpressure.

Method selection: username/password (02) whenever the client offers it,
no authentication (00) only with C{--socks-auth optional} and once the
peer's session place is taken, else FF and close.
A failed login, a checker error or throttling answer RFC 1929 status 1 and
close. CONNECT goes to IPv4, IPv6 or a name resolved once through the
reactor's resolver; every resolved address is checked, and the connection
goes to a checked address. BIND is KumoMTA's egress-source exchange (BIND
with the wanted local source address, then CONNECT on the same session);
UDP ASSOCIATE and any other command get 07.

Timers: negotiation (connect until the request arrives; suspended while a
login runs, which has its own login deadline instead), then connect
(resolution plus the outbound connect: reply 06 when it expires), then
idle in the relay. Each session ends with one C{socks session} log event:
peer, identity, command, destination, address, reply, bytes each way,
duration and the reason it ended (for sessions that never authenticated,
one a minute per peer). Never the password.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import re
import socket
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application import internet
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, endpoints, error, interfaces, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.acl import ask
from gateway.addresses import network_keys, normalize_ip, peer_key
from gateway.authinfo import AuthInfo, IAuthInfo, IdentityContext
from gateway.connections import Connections, authenticated, limit_connections, login_running
from gateway.credentials import RFC1929Credentials
from gateway.meta import ConnectionMeta
from gateway.ratelog import LogRateLimiter, suppressed_note
from gateway.realm import login
from gateway.state import ISessionLimits, Lease, LocalSessions, StateUnavailable
from gateway.socks import codec
from gateway.socks.codec import Reply
from gateway.socks.rules import (
    PRIVILEGED_PORTS,
    AllowRule,
    DestinationRules,
    IPAddress,
    libc_ipv4,
    source_port_named,
)
from gateway.twistedinternals import half_close_now, write_now

if TYPE_CHECKING:
    from gateway.core import Core

log = Logger()

_COMMANDS = {codec.CONNECT: "CONNECT", codec.BIND: "BIND", codec.UDP_ASSOCIATE: "UDP_ASSOCIATE"}
#: C{_abort} while C{loseConnection} runs, before the abort timer (if any) is set.
_CLOSING = object()
#: A host name: dot-separated labels of letters, digits, "-" and "_" (IDN as xn--).
_HOSTNAME = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*")


@attrs.frozen
class SOCKSSettings:
    """What the operator chose for the SOCKS listeners."""

    auth_required: bool = True
    allow: tuple[AllowRule, ...] = ()
    negotiation_timeout: float = 10.0
    #: Seconds one login may take in the gateway (throttle wait, checkers,
    #: failure delay); the negotiation timer is suspended meanwhile. Above
    #: Throttle.max_delay + Throttle.max_user_delay, so that the gateway never
    #: times out a login it is itself delaying.
    login_timeout: float = 30.0
    connect_timeout: float = 15.0
    #: Seconds without a byte either way before a relayed session is closed (0: never).
    idle_timeout: float = 600.0
    max_sessions_per_peer: int = 256
    max_sessions_per_user: int = 1024
    #: Logins in flight at once, all peers together: a memory bound only; the
    #: shares below keep a few peers from taking it.
    max_pending_logins: int = 1024
    #: Logins in flight per client address (IPv6 /64), waits in the throttle included.
    max_pending_logins_per_peer: int = 4
    #: Logins in flight per network (IPv4 /24, IPv6 /48).
    max_pending_logins_per_network: int = 16
    #: Seconds a closing side may take to flush before it is aborted.
    close_grace: float = 10.0


@implementer(interfaces.IResolutionReceiver)
class _Addresses:
    def __init__(self) -> None:
        self.found: list[str] = []
        self.done: defer.Deferred[list[str]] = defer.Deferred()

    def resolutionBegan(self, resolution: Any) -> None:
        pass

    def addressResolved(self, address: Any) -> None:
        self.found.append(address.host)

    def resolutionComplete(self) -> None:
        self.done.callback(self.found)


def resolve(reactor: Any, name: str, port: int) -> defer.Deferred[list[str]]:
    """The addresses of C{name} from the reactor's resolver (never on the reactor thread)."""
    receiver = _Addresses()
    reactor.nameResolver.resolveHostName(receiver, name, portNumber=port)
    return receiver.done


def connect_reply(reason: Failure) -> Reply:
    """The REP for a failed outbound connection."""
    if reason.check(error.ConnectionRefusedError):
        return Reply.CONNECTION_REFUSED
    if reason.check(error.TimeoutError, error.TCPTimedOutError, defer.TimeoutError):
        return Reply.TTL_EXPIRED
    if reason.check(error.NoRouteError):  # ENETUNREACH
        return Reply.NETWORK_UNREACHABLE
    if reason.check(error.DNSLookupError):
        return Reply.HOST_UNREACHABLE
    if reason.check(error.ConnectError) and reason.value.osError == errno.EHOSTUNREACH:
        return Reply.HOST_UNREACHABLE
    return Reply.GENERAL_FAILURE


def plain_address(text: str) -> IPAddress | None:
    """
    An IP address from a request (IPv4-mapped IPv6 as the IPv4 it is), or
    None when C{text} is not one. Scoped IPv6 addresses are not addresses
    here. A name that C{getaddrinfo} would take as an IPv4 literal
    (L{libc_ipv4}) is that address: checked, and connected to, as the
    address it is, never as a name.
    """
    if "%" in text:
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return libc_ipv4(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def canonical_name(text: str) -> str | None:
    """
    A host name in lower case without its final dot, or None when it is not
    one (an IP literal with a final dot, C{127.0.0.1.}, is neither).
    """
    name = text.lower().removesuffix(".")
    if len(name) > 253 or not _HOSTNAME.fullmatch(name) or plain_address(name) is not None:
        return None
    return name


#: Linux's IP_BIND_ADDRESS_NO_PORT (4.2+, IPv4 and IPv6 sockets alike; Python
#: names it from 3.12 on), None elsewhere: then L{is_local} binds plainly.
_BIND_ADDRESS_NO_PORT = (
    getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24) if sys.platform == "linux" else None
)


def is_local(address: IPAddress) -> bool:
    """Whether C{address} belongs to this host (it can be bound)."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            if _BIND_ADDRESS_NO_PORT is not None:
                # The address is checked, no port searched for: with tens of
                # thousands of TIME_WAIT sockets that search costs more than
                # the whole session (../shared/bench/README.md).
                with contextlib.suppress(OSError):  # an older kernel: a plain bind
                    probe.setsockopt(socket.IPPROTO_IP, _BIND_ADDRESS_NO_PORT, 1)
            probe.bind((str(address), 0))
    except OSError:
        return False
    return True


def _half_close(transport: Any) -> None:
    """Pass an end of input on: a TCP half-close, or a full close under TLS (no half-close)."""
    if interfaces.ISSLTransport.providedBy(transport) or not interfaces.ITCPTransport.providedBy(
        transport
    ):
        transport.loseConnection()
    else:
        half_close_now(transport)


class SessionsRefused(Exception):
    """No place for the session; the message is the session log's reason."""


def take_places(
    sessions: ISessionLimits, wanted: Sequence[tuple[str, str, int]]
) -> defer.Deferred[list[Lease]]:
    """
    One place in each C{(scope, key, limit)} of C{wanted}, all asked at once
    (one round trip to a shared state). Fires with the leases; fails with
    L{SessionsRefused} naming the full scope, or with the back end's failure
    (L{StateUnavailable}), every place taken given back. Cancelled (the client
    left, the login deadline passed), it gives back every place as its answer
    arrives: a place granted late is never kept.
    """
    if not wanted:
        return defer.succeed([])
    answers: dict[int, Any] = {}
    cancelled: list[bool] = []

    def cancel(_: Any) -> None:
        cancelled.append(True)
        for answer in answers.values():
            if isinstance(answer, Lease):
                answer.release()

    result: defer.Deferred[list[Lease]] = defer.Deferred(cancel)

    def answered(answer: Any, index: int) -> None:
        if cancelled:
            if isinstance(answer, Lease):
                answer.release()
            return
        answers[index] = answer
        if len(answers) < len(wanted):
            return
        leases = [answers[i] for i in range(len(wanted)) if isinstance(answers[i], Lease)]
        for i, (scope, _, _) in enumerate(wanted):
            if isinstance(answers[i], Failure) or answers[i] is None:
                for lease in leases:
                    lease.release()
                result.errback(answers[i] if answers[i] is not None else SessionsRefused(scope))
                return
        result.callback(leases)

    for index, (scope, key, limit) in enumerate(wanted):
        try:
            asked = sessions.acquire(scope, key, limit)
        except Exception:  # noqa: BLE001 - a back end's bug refuses this session only
            log.failure("session limits failed")
            asked = defer.fail()
        asked.addBoth(answered, index)
    return result


class SOCKSFactory(protocol.ServerFactory):
    """
    Shares the core between sessions and keeps the counts the bounds need:
    logins in flight, outbound connections. Connections per peer are capped
    by the L{gateway.connections.LimitedFactory} around it (this process's
    own bound); sessions per user and per peer are places in C{sessions}
    (L{gateway.state.State.sessions}: global across workers and instances
    with a shared C{--state}), taken at login (the peer's alone, before
    C{05 00}, for an anonymous session).

    @param acl: the C{--acl} policy, or None without one (then the
        destination rules alone decide, also for unauthenticated sessions
        under C{--socks-auth optional}, and BIND is refused).
    """

    def __init__(
        self,
        portal: Any,
        acl: Any,
        settings: SOCKSSettings,
        reactor: Any,
        listener: str = "socks",
        connections: Connections | None = None,
        sessions: ISessionLimits | None = None,
    ) -> None:
        self.portal = portal
        #: Where the sessions' places are counted (L{SOCKSServer._places}).
        self.sessions: ISessionLimits = sessions if sessions is not None else LocalSessions()
        #: Told of each outbound connection's local end while it is open, so
        #: that the gateway's listeners never take the relay for a trusted
        #: PROXY-protocol proxy (L{Connections.is_own_outbound}).
        self.connections = connections
        self.acl = acl
        self.settings = settings
        self.reactor = reactor
        self.listener = listener
        self.rules = DestinationRules(settings.allow)
        self.pending_logins = 0
        #: Logins in flight per peer key and per network key (see L{network_keys}).
        self.pending_by_peer: Counter[str] = Counter()
        self.pending_by_network: Counter[str] = Counter()
        #: Outbound connections open (a client's may outlive it while it drains).
        self.outbound_open = 0
        #: For the metrics: the bytes each way of the sessions that ended
        #: (open ones keep theirs in L{SOCKSServer.up}/C{down}), and the
        #: replies (REP codes) the ended sessions got.
        self.ended_up = self.ended_down = 0
        self.replies: Counter[int] = Counter()
        #: Sessions that never authenticated are logged once a minute per peer.
        self.unauthenticated_log = LogRateLimiter(reactor)

    def buildProtocol(self, addr: Any) -> SOCKSServer:
        # Sessions per peer are capped around this factory (gateway.connections).
        proto = SOCKSServer(self, peer_key(normalize_ip(getattr(addr, "host", None))) or "?")
        proto.factory = self
        return proto

    @staticmethod
    def release(counter: Counter[str], key: str) -> None:
        counter[key] -= 1
        if counter[key] <= 0:
            del counter[key]


@implementer(interfaces.IHalfCloseableProtocol)
class SOCKSServer(protocol.Protocol):
    """One SOCKS5 session: negotiation, then relay."""

    def __init__(self, factory: SOCKSFactory, peer_key: str = "?") -> None:
        self.factory = factory
        self.settings = factory.settings
        self.reactor = factory.reactor
        self.peer_key = peer_key
        self.codec = codec.ServerCodec()
        self.info: AuthInfo | None = None
        self.outbound: _Outbound | None = None
        self._pending: defer.Deferred[Any] | None = None
        self._timer: Any = None
        self._abort: Any = None
        self._expired = False  # the connect timer fired
        self._source: tuple[str, int] | None = None  # BIND's egress source
        self._gone = False
        self._leases: list[Lease] = []  # places held in factory.sessions
        self._active = False
        self._draining = False  # the gateway is stopping (L{drain})
        # What the session log says.
        self.command: str | None = None
        self.destination: str | None = None
        self.address: str | None = None
        self.reply: int | None = None
        self.up = self.down = 0
        self.reason = "client closed"

    # -- connection -------------------------------------------------------

    def connectionMade(self) -> None:
        self.meta = ConnectionMeta.from_transport("socks", self.transport, self.factory.listener)
        self.peer = self.meta.peer_address or "?"
        self.started = self.reactor.seconds()
        self._start_timer(self.settings.negotiation_timeout, self._negotiation_expired)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._gone = True
        if self._draining and reason.check(error.ConnectionAborted):
            self.reason = "aborted: the gateway stopped"
        self._cancel_timer()
        if self._abort is not None and self._abort is not _CLOSING and self._abort.active():
            self._abort.cancel()
        if self._pending is not None:
            self._pending.cancel()
        factory = self.factory
        self._release_places()
        if self.outbound is not None:
            self.outbound.close()
        factory.ended_up += self.up
        factory.ended_down += self.down
        if self.reply is not None:
            factory.replies[self.reply] += 1
        self._log_session()

    def _release_places(self) -> None:
        leases, self._leases = self._leases, []
        for lease in leases:
            lease.release()

    def drain(self) -> None:
        """
        The gateway is stopping. SOCKS5 has no way to tell a client to go: a
        session that has not asked for a CONNECT yet (still negotiating or
        logging in, or idle after its login) is closed now, as nobody should
        hold the drain for nothing; a CONNECT under way and a tunnel run on
        until they end or the drain's deadline aborts them
        (L{gateway.ops.drain}).
        """
        self._draining = True
        if self.outbound is None and self.command != "CONNECT" and not self._gone:
            self._close("closed: the gateway stopped")

    def _log_session(self) -> None:
        """
        One line per session; for sessions that neither authenticated nor
        opened a tunnel (connect-and-close loops cost an attacker nothing)
        one line a minute per peer, saying how many were left out.
        """
        identity = None
        if self.info is not None and self.info.identities:
            identity = self.info.identities[0].identity
        suppressed = 0
        if identity is None and self.reply != int(Reply.SUCCEEDED):
            suppressed = self.factory.unauthenticated_log.admit(self.peer_key)
            if suppressed is None:
                return
        log.info(
            "socks session: peer={peer} identity={identity!r} {command} {destination} "
            "({address}) reply={reply} up={up} down={down} {duration:.3f}s: {reason}"
            + suppressed_note(suppressed),
            suppressed=suppressed,
            peer=self.peer,
            identity=identity,
            command=self.command,
            destination=self.destination,
            address=self.address,
            reply=self.reply,
            up=self.up,
            down=self.down,
            duration=self.reactor.seconds() - self.started,
            reason=self.reason,
        )

    def _close(self, reason: str) -> None:
        self.reason = reason
        if self._abort is None and not self._gone:
            # Close once the buffer drains, abort if it does not (no timer
            # when losing the connection called connectionLost at once).
            self._abort = _CLOSING
            self.transport.loseConnection()
            if not self._gone:
                self._abort = self.reactor.callLater(
                    self.settings.close_grace, self.transport.abortConnection
                )

    # -- timers -----------------------------------------------------------

    def _start_timer(self, seconds: float, expired: Any) -> None:
        self._cancel_timer()
        self._timer = self.reactor.callLater(seconds, expired)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _suspend_timer(self) -> float:
        """Stop the running timer; return the seconds it had left."""
        timer = self._timer
        left = 0.0
        if timer is not None and timer.active():
            left = timer.getTime() - self.reactor.seconds()
        self._cancel_timer()
        return left

    def _login_expired(self) -> None:
        self._timer = None
        self.reason = "login timeout"
        if self._pending is not None:
            self._pending.cancel()
        if not self._gone:
            self.transport.abortConnection()

    def _negotiation_expired(self) -> None:
        self._timer = None
        self.reason = "negotiation timeout"
        if self._pending is not None:
            self._pending.cancel()
        self.transport.abortConnection()

    def _connect_expired(self) -> None:
        """Resolution and connect took too long: 06, whatever was still running."""
        self._timer = None
        self._expired = True
        if self._pending is not None:
            self._pending.cancel()

    def _idle_check(self) -> None:
        if self._active:
            self._active = False
            self._start_timer(self.settings.idle_timeout, self._idle_check)
            return
        self._timer = None
        self.reason = "idle timeout"
        self.transport.abortConnection()

    # -- input ------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        outbound = self.outbound
        if outbound is not None:
            self.up += len(data)
            self._active = True
            write_now(outbound.transport, data)
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        try:
            events = self.codec.receive_data(data)
        except codec.ProtocolError as e:
            if e.reply is not None:  # a malformed request still gets its REP
                self.reply = int(e.reply)
                self._send(codec.encode_reply(e.reply))
            self._close(f"protocol error: {e}")
            return
        for event in events:
            if self._gone or self.transport.disconnecting:
                return
            if isinstance(event, codec.Greeting):
                self._greeting(event)
            elif isinstance(event, codec.UserPass):
                self._login(event)
            elif isinstance(event, codec.Request):
                self._request(event)
            elif isinstance(event, codec.Data):  # early bytes, now that the tunnel is up
                self.dataReceived(event.data)

    def _wait(self, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        """
        Read nothing more until C{d} has fired (early data stays bounded);
        call it before adding the callbacks that act on the result.
        """
        self._pending = d
        paused = []

        def done(result: Any) -> Any:
            if self._pending is d:
                self._pending = None
            outbound = self.outbound  # a new tunnel may have paused us since: it decides
            blocked = outbound is not None and getattr(outbound.transport, "producerPaused", False)
            if paused and not blocked and not self._gone and not self.transport.disconnecting:
                self.transport.resumeProducing()
            return result

        d.addBoth(done)
        if self._pending is d:  # still running: stop reading meanwhile
            paused.append(True)
            self.transport.pauseProducing()
        return d

    def _send(self, data: bytes) -> None:
        """
        A negotiation answer that grants: sent at once when the socket takes
        it (L{write_now}), rather than in the next reactor pass at the cost of
        two epoll changes (every session has three of them). Refusals stay
        buffered, behind the audit record of the decision.
        """
        write_now(self.transport, data)

    def _bug(self, reason: Failure) -> None:
        log.failure("socks session failed", reason)
        if not self._gone:
            self.reason = "internal error"
            self.transport.abortConnection()

    # -- negotiation ------------------------------------------------------

    def _greeting(self, greeting: codec.Greeting) -> None:
        if codec.USERPASS in greeting.methods:
            self._send(self.codec.send_method(codec.USERPASS))
            self._feed(b"")
        elif codec.NO_AUTH in greeting.methods and not self.settings.auth_required:
            self._anonymous()
        elif greeting.methods == (codec.NO_AUTH,):
            self._no_method(
                "no acceptable method: the client offered only no-authentication (ssh -D style)"
            )
        else:
            self._no_method(f"no acceptable method among {list(greeting.methods)}")

    def _no_method(self, why: str) -> None:
        """C{05 FF}: RFC 1928's only refusal before a method is chosen; the client must close."""
        self._send(self.codec.send_method(codec.NO_ACCEPTABLE))
        self._close(why)

    def _anonymous(self) -> None:
        """
        No authentication (C{--socks-auth optional}): the session takes its
        peer's place, shared with logged-in sessions, before C{05 00}. A
        refusal can only be C{05 FF} (RFC 1928 has no other answer to a
        greeting). The negotiation timer keeps running: one state round trip,
        bounded by the state's own reply timeout, well below it.
        """
        d = self._wait(self._places(None))
        d.addCallbacks(
            lambda leases: self._admit(
                AuthInfo(peer_address=self.meta.peer_address),
                leases,
                lambda: self.codec.send_method(codec.NO_AUTH),
            ),
            self._anonymous_refused,
        )
        d.addErrback(self._bug)

    def _anonymous_refused(self, reason: Failure) -> None:
        if reason.check(defer.CancelledError):
            return
        if reason.check(SessionsRefused):
            self._no_method(str(reason.value))
            return
        self._no_method(f"session limits unavailable: {reason.type.__name__}")

    def _login(self, event: codec.UserPass) -> None:
        factory = self.factory
        settings = self.settings
        own, network = network_keys(self.meta.peer_address)
        if factory.pending_logins >= settings.max_pending_logins:
            self._auth_failed("too many logins in flight")
            return
        if factory.pending_by_peer[own] >= settings.max_pending_logins_per_peer:
            self._auth_failed("too many logins in flight from this address")
            return
        if factory.pending_by_network[network] >= settings.max_pending_logins_per_network:
            self._auth_failed(f"too many logins in flight from {network}")
            return
        try:
            credentials = RFC1929Credentials(event.username, event.password, conn_meta=self.meta)
        except ValueError:  # not UTF-8, or too long; the message holds no secret
            self._auth_failed("credentials not valid UTF-8")
            return
        factory.pending_logins += 1
        factory.pending_by_peer[own] += 1
        factory.pending_by_network[network] += 1
        negotiation_left: float | None = None  # set while the login deadline runs
        finished = False

        def settled(result: Any) -> Any:
            nonlocal finished
            finished = True
            factory.pending_logins -= 1
            factory.release(factory.pending_by_peer, own)
            factory.release(factory.pending_by_network, network)
            if negotiation_left is not None:
                self._cancel_timer()
                if not self._gone and not isinstance(result, Failure):
                    # Logged in: the client's own time runs again (a failure closes).
                    self._start_timer(max(negotiation_left, 0.0), self._negotiation_expired)
            return result

        # The places are taken within the login (its deadline, its share).
        attempt = login(factory.portal, credentials, IAuthInfo).addCallback(self._take_places)
        d = login_running(self.transport, attempt)
        d.addBoth(settled)
        if not finished:
            # The gateway's own time (throttle wait, hashing, failure delay) is
            # not the client's: the negotiation timer stops, a login deadline
            # runs. (A login answered at once, as a cached one is, needs neither.)
            negotiation_left = self._suspend_timer()
            self._start_timer(self.settings.login_timeout, self._login_expired)
        d = self._wait(d)
        d.addCallbacks(self._authenticated, self._login_failed)
        d.addErrback(self._bug)

    def _take_places(self, result: tuple[Any, Any, Any]) -> defer.Deferred[Any]:
        """
        Logged in: take the session's places (L{_places}) before the client
        hears of its success. Fires with C{(info, leases)}, or fails with
        L{SessionsRefused} saying why.
        """
        _, info, _ = result
        name = info.identity_for(IdentityContext.ProxyAuthRfc1929) or info.identities[0].identity
        return self._places(name).addCallback(lambda leases: (info, leases))

    def _places(self, user: str | None) -> defer.Deferred[list[Lease]]:
        """
        The places every session holds: one for its user (none for an
        anonymous session) and one for its peer (IPv6 by /64; none for a peer
        without an IP address), the peer's shared by logged-in and anonymous
        sessions. Fails with L{SessionsRefused} saying why, or with the back
        end's own failure (a bug).
        """
        settings = self.settings
        wanted = []
        if user is not None:
            wanted.append(("socks-user", user, settings.max_sessions_per_user))
        peer = peer_key(self.meta.peer_address)
        if peer is not None:
            wanted.append(("socks-peer", peer, settings.max_sessions_per_peer))

        def refused(reason: Failure) -> None:
            if reason.check(StateUnavailable):
                raise SessionsRefused("temporarily refused: the shared state is unavailable")
            reason.trap(SessionsRefused)
            if str(reason.value) == "socks-user":
                raise SessionsRefused(f"too many sessions for {user!r}")
            raise SessionsRefused("too many sessions from this address")

        return take_places(self.factory.sessions, wanted).addErrback(refused)

    def _authenticated(self, taken: tuple[Any, list[Lease]]) -> None:
        info, leases = taken
        self._admit(info, leases, lambda: self.codec.send_auth_result(True))

    def _admit(self, info: AuthInfo, leases: list[Lease], answer: Callable[[], bytes]) -> None:
        """
        The session has its places: it holds them until it ends (never one
        that has ended already), and the client hears C{answer()}.
        """
        self._leases = leases
        if self._gone:
            self._release_places()
            return
        self.info = info
        authenticated(self.transport)  # out of the budget's unauthenticated share
        self._send(answer())
        self._feed(b"")

    def _login_failed(self, reason: Failure) -> None:
        if reason.check(defer.CancelledError):
            return
        if reason.check(SessionsRefused):
            self._auth_failed(str(reason.value))
            return
        why = "authentication failed" if reason.check(UnauthorizedLogin) else (
            f"authentication unavailable: {reason.type.__name__}"
        )
        self._auth_failed(why)

    def _auth_failed(self, why: str) -> None:
        """RFC 1929 status 1, then close: fail closed on every path."""
        # Buffered: a refusal waits for the reactor's next pass, so that its
        # audit record (flushed at the start of that pass) is written first.
        self.transport.write(self.codec.send_auth_result(False))
        self._close(why)

    # -- requests ---------------------------------------------------------

    def _request(self, request: codec.Request) -> None:
        self.command = _COMMANDS.get(request.command, f"0x{request.command:02x}")
        self.destination = f"{request.host}:{request.port}"
        if request.command == codec.CONNECT:
            self._start_timer(self.settings.connect_timeout, self._connect_expired)
            d = self._wait(self._connect(request))
            d.addErrback(self._connect_failed)
            d.addErrback(self._bug)
        elif request.command == codec.BIND:
            self._bind(request)
        else:
            self._refuse(Reply.COMMAND_NOT_SUPPORTED, "command not supported")

    def _refuse(self, reply: Reply, why: str) -> None:
        self._cancel_timer()
        self.reply = int(reply)
        self.transport.write(self.codec.send_reply(reply))  # after its audit record, as above
        self._close(why)

    def _acl_allows(self, resource: str, privilege: str) -> bool:
        acl = self.factory.acl
        if acl is None:
            return self.info is not None
        return ask(acl, self.info, resource, privilege, self.meta)

    def _bind(self, request: codec.Request) -> None:
        """
        KumoMTA's egress source: BIND names the local address (and port, 0 for
        any) CONNECT will use. Needs C{bind} on C{socks/source/ADDRESS}; a port
        below 1024 also a rule naming it (L{source_port_named}).
        """
        if self._source is not None:
            self._refuse(Reply.GENERAL_FAILURE, "a second BIND")
            return
        source = plain_address(request.host)
        if source is None:
            self._refuse(Reply.ADDRESS_TYPE_NOT_SUPPORTED, "BIND needs an IP address")
            return
        acl = self.factory.acl  # only an ACL grant lets a client pick the source
        if (
            acl is None
            or self.info is None
            or not self.info.is_authenticated()
            or not ask(acl, self.info, f"socks/source/{source}", "bind", self.meta)
        ):
            self._refuse(Reply.NOT_ALLOWED, f"source {source} not allowed")
            return
        port = request.port
        if port in PRIVILEGED_PORTS and not source_port_named(
            acl, self.info, str(source), port, self.meta
        ):
            # A privileged source port (a service's own, or what a peer trusts as
            # such) needs a grant naming that port; 0 stays "any port".
            self._refuse(Reply.NOT_ALLOWED, f"source port {port} not allowed")
            return
        if not is_local(source):
            self._refuse(Reply.GENERAL_FAILURE, f"source {source} is not an address of this host")
            return
        self._source = (str(source), request.port)
        self.reply = int(Reply.SUCCEEDED)
        self._send(self.codec.send_reply(Reply.SUCCEEDED, str(source), request.port))
        self._feed(b"")

    def _connect(self, request: codec.Request) -> defer.Deferred[None]:
        """
        CONNECT: an address is checked and connected to with no coroutine
        and no endpoint in between (the common case, and every session of
        the benchmarks); a name is resolved first (L{_connect_name}).
        """
        address = plain_address(request.host)
        if address is None:
            return defer.ensureDeferred(self._connect_name(request))
        try:
            return self._connect_to(None, [address], request.port)
        except Exception:  # noqa: BLE001 - as a coroutine's would be: to _bug
            return defer.fail()

    async def _connect_name(self, request: codec.Request) -> None:
        name = canonical_name(request.host)
        if name is None:
            self._refuse(Reply.GENERAL_FAILURE, "not a host name")
            return
        if not self._destination_acl(name, request.port):
            self._refuse(Reply.NOT_ALLOWED, "destination not allowed by the ACL")
            return
        try:
            found = await resolve(self.reactor, name, request.port)
        except (defer.CancelledError, error.ConnectingCancelledError):
            raise
        except Exception:  # noqa: BLE001 - every resolver failure is "host unreachable"
            found = []
        addresses: list[IPAddress] = []
        for text in found:
            resolved = plain_address(text.split("%", 1)[0])
            if resolved is not None and resolved not in addresses:
                addresses.append(resolved)
        if not addresses:
            self._refuse(Reply.HOST_UNREACHABLE, f"cannot resolve {name}")
            return
        await self._connect_to(name, addresses, request.port)

    def _connect_to(
        self, name: str | None, addresses: list[IPAddress], port: int
    ) -> defer.Deferred[None]:
        """Check C{addresses} (what C{name} resolved to, if any), then open the first that answers."""
        if self._source is not None:  # the egress source decides the family
            family = ipaddress.ip_address(self._source[0]).version
            addresses = [a for a in addresses if a.version == family]
            if not addresses:
                self._refuse(Reply.ADDRESS_TYPE_NOT_SUPPORTED, "no address of the source's family")
                return defer.succeed(None)
        self.address = str(addresses[0])
        rules = self.factory.rules
        if not rules.permits(name, addresses, port) or not all(
            self._destination_acl(str(a), port) for a in addresses
        ):
            self._refuse(Reply.NOT_ALLOWED, "destination not allowed")
            return defer.succeed(None)
        if any(not rules.allows_local(a, port) and is_local(a) for a in addresses):
            self._refuse(Reply.NOT_ALLOWED, "destination is the gateway's own host")
            return defer.succeed(None)
        return self._open(addresses, port)

    def _destination_acl(self, host: str, port: int) -> bool:
        return self._acl_allows(f"socks/destination/{host}/{port}", "connect")

    def _open(self, addresses: list[IPAddress], port: int) -> defer.Deferred[None]:
        """
        Connect to each of C{addresses} in turn until one answers; the
        result fires once the tunnel is up or every attempt failed (and the
        client has its reply). Cancelling it stops the attempt under way.
        """
        # One black-holed address must not use the whole budget: share it.
        each = max(1.0, self.settings.connect_timeout / len(addresses))
        remaining = iter(addresses)
        attempt: defer.Deferred[_Outbound] | None = None
        reply: Reply = Reply.HOST_UNREACHABLE
        cancelled = False

        def cancel(_: defer.Deferred[None]) -> None:
            nonlocal cancelled
            cancelled = True
            if attempt is not None:
                attempt.cancel()  # done then errbacks with CancelledError

        done: defer.Deferred[None] = defer.Deferred(cancel)

        def connected(outbound: _Outbound) -> None:
            nonlocal attempt
            attempt = None
            if not (cancelled or done.called):
                settle(self._connected, outbound)

        def failed(reason: Failure) -> None:
            nonlocal reply
            if not (cancelled or done.called):
                reply = connect_reply(reason)
                settle(following)

        def settle(step: Any, *args: Any) -> None:
            """Run C{step}; a bug in it goes where a coroutine's would (L{_bug})."""
            try:
                step(*args)
            except Exception:  # noqa: BLE001
                if not done.called:
                    done.errback()
                return
            if attempt is None and not done.called:  # connected, or nothing left to try
                done.callback(None)

        def following() -> None:
            nonlocal attempt
            address = next(remaining, None)
            attempt = None
            if address is None:
                self._refuse(reply, f"connect failed: {reply.name.lower()}")
                return
            self.address = str(address)
            factory = _OutboundFactory(self)
            try:
                # Only for an egress source does the socket bind before connecting.
                factory.connector = self.reactor.connectTCP(
                    str(address), port, factory, timeout=each, bindAddress=self._source
                )
            except Exception:  # noqa: BLE001 - mapped to a reply code, as a failed connect
                failed(Failure())
                return
            attempt = factory.connected
            attempt.addCallbacks(connected, failed)

        settle(following)
        return done

    def _connect_failed(self, reason: Failure) -> None:
        reason.trap(defer.CancelledError, error.ConnectingCancelledError)
        if self._expired and not self._gone:
            self._refuse(Reply.TTL_EXPIRED, "connect timeout")

    def _connected(self, outbound: _Outbound) -> None:
        here, there = outbound.here, outbound.transport.getPeer()
        local = plain_address(there.host) if there.host == here.host else None
        if local is not None and not self.factory.rules.allows_local(local, there.port):
            # Reached this host after all (a second line behind the check before connecting).
            outbound.transport.abortConnection()
            self._refuse(Reply.NOT_ALLOWED, "destination is the gateway's own host")
            return
        self.outbound = outbound
        self._cancel_timer()
        self.reply = int(Reply.SUCCEEDED)
        self._send(self.codec.send_reply(Reply.SUCCEEDED, here.host, here.port))
        # Backpressure both ways: a full write buffer pauses the other side's reads.
        self.transport.registerProducer(outbound.transport, True)
        outbound.transport.registerProducer(self.transport, True)
        if self.settings.idle_timeout:
            self._start_timer(self.settings.idle_timeout, self._idle_check)
        self._feed(b"")  # bytes the client sent after its request

    # -- relay ------------------------------------------------------------

    def readConnectionLost(self) -> None:
        """The client finished sending: pass the half-close on."""
        outbound = self.outbound
        if outbound is None:
            self._close("client closed")
            return
        _half_close(outbound.transport)
        outbound.client_done = True
        if outbound.remote_done:
            self._close("both sides finished")

    def writeConnectionLost(self) -> None:
        pass


@implementer(interfaces.IHalfCloseableProtocol)
class _Outbound(protocol.Protocol):
    """The connection to the destination; its bytes go to the client."""

    def __init__(self, server: SOCKSServer, attempt: _OutboundFactory | None = None) -> None:
        self.server = server
        self._attempt = attempt
        self.client_done = False
        self.remote_done = False
        self.lost = False
        self._abort: Any = None
        self._local: Any = None  # the local end, as registered
        self.here: Any = None  # the local end

    def connectionMade(self) -> None:
        factory = self.server.factory
        factory.outbound_open += 1
        self.here = self.transport.getHost()
        if factory.connections is not None:
            self._local = self.here
            factory.connections.outbound_opened(self._local)
        attempt, self._attempt = self._attempt, None
        if attempt is not None:
            if attempt.connected.called:  # cancelled meanwhile: nobody wants it
                self.transport.abortConnection()
            else:
                attempt.connected.callback(self)

    def dataReceived(self, data: bytes) -> None:
        server = self.server
        server.down += len(data)
        server._active = True
        write_now(server.transport, data)

    def readConnectionLost(self) -> None:
        self.remote_done = True
        server = self.server
        if server.outbound is not self:
            return
        _half_close(server.transport)
        if self.client_done:
            server._close("both sides finished")

    def writeConnectionLost(self) -> None:
        pass

    def close(self) -> None:
        """As L{SOCKSServer._close}: drain, or abort after the grace period."""
        if self._abort is None and self.transport is not None and not self.lost:
            server = self.server
            self._abort = _CLOSING
            self.transport.loseConnection()
            if not self.lost:
                self._abort = server.reactor.callLater(
                    server.settings.close_grace, self.transport.abortConnection
                )

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost = True
        if self._abort is not None and self._abort is not _CLOSING and self._abort.active():
            self._abort.cancel()
        server = self.server
        server.factory.outbound_open -= 1
        if self._local is not None:
            server.factory.connections.outbound_closed(self._local)
            self._local = None
        if server.outbound is self and not server._gone:
            server._close("both sides finished" if self.client_done and self.remote_done
                          else "destination closed")


class _OutboundFactory(protocol.ClientFactory):
    """
    One outbound connection attempt, straight on the reactor (no endpoint and
    no wrapping protocol between the relay and the socket): C{connected}
    fires with the L{_Outbound} once it is connected, or fails as
    C{connectTCP} says (refused, timed out, ...); cancelling it stops the
    attempt.
    """

    noisy = False  # one per session: the session event says enough

    def __init__(self, server: SOCKSServer) -> None:
        self.server = server
        self.connector: Any = None
        self.connected: defer.Deferred[_Outbound] = defer.Deferred(self._cancel)

    def _cancel(self, _: defer.Deferred[_Outbound]) -> None:
        if self.connector is not None:
            self.connector.stopConnecting()  # its failure is dropped: we are cancelled

    def buildProtocol(self, addr: Any) -> _Outbound:
        return _Outbound(self.server, self)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if not self.connected.called:
            self.connected.errback(reason)


class SOCKSDoor:
    """
    The SOCKS front door: C{--socks} (plain) and C{--socks-tls} (TLS with the
    gateway's certificate) listeners; one session cap per peer for both, a
    peer over it is closed (before the handshake under TLS).
    """

    #: SOCKS has no ALPN name: the extension is ignored.
    alpn: tuple[bytes, ...] = ()

    def __init__(self, core: Core, settings: SOCKSSettings) -> None:
        self.core = core
        self.settings = settings
        #: One factory per listener (their counts: the budget, the metrics).
        self.factories: list[SOCKSFactory] = []
        # Outbound connections count against the descriptor budget too.
        core.connections.add_source(lambda: sum(f.outbound_open for f in self.factories))
        core.connections.relaying = True  # see Connections.is_own_outbound

    def listen(
        self, endpoint: Any, name: str, tls: Any | None
    ) -> internet.StreamServerEndpointService:
        core = self.core
        factory = SOCKSFactory(
            core.portal,
            core.acl,
            self.settings,
            core.reactor,
            name,
            core.connections,
            core.state.sessions if core.state is not None else None,
        )
        self.factories.append(factory)
        limited = limit_connections(
            core, factory, "socks", name, self.settings.max_sessions_per_peer, tls=tls
        )
        return internet.StreamServerEndpointService(endpoint, limited)


__all__ = [
    "SOCKSDoor",
    "SOCKSFactory",
    "SOCKSServer",
    "SOCKSSettings",
    "SessionsRefused",
    "resolve",
    "take_places",
]
