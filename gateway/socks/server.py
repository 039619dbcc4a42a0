# -*- test-case-name: tests.test_socks_server -*-
"""
The SOCKS5 front door: a thin Twisted protocol around the sans-I/O
L{ServerCodec}, RFC 1929 logins through the Portal, destination rules, and
a relay that moves bytes with producer/consumer backpressure.

Method selection: username/password (02) whenever the client offers it,
no authentication (00) only with C{--socks-auth optional}, else FF and close.
A failed login, a checker error or throttling answer RFC 1929 status 1 and
close. CONNECT goes to IPv4, IPv6 or a name resolved once through the
reactor's resolver; every resolved address is checked, and the connection
goes to a checked address. BIND is KumoMTA's egress-source exchange (BIND
with the wanted local source address, then CONNECT on the same session);
UDP ASSOCIATE and any other command get 07.

Each session ends with one C{socks session} log event: peer, identity,
command, destination, address, reply, bytes each way, duration and the
reason it ended. Never the password.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections import Counter
from typing import Any

import attrs
from twisted.application import internet
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, endpoints, error, interfaces, protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.authinfo import AuthInfo, IAuthInfo, IdentityContext
from gateway.credentials import RFC1929Credentials
from gateway.meta import ConnectionMeta
from gateway.realm import login
from gateway.socks import codec
from gateway.socks.codec import Reply
from gateway.socks.rules import AllowRule, DestinationRules

log = Logger()

_COMMANDS = {codec.CONNECT: "CONNECT", codec.BIND: "BIND", codec.UDP_ASSOCIATE: "UDP_ASSOCIATE"}


@attrs.frozen
class SOCKSSettings:
    """What the operator chose for the SOCKS listeners."""

    auth_required: bool = True
    allow: tuple[AllowRule, ...] = ()
    negotiation_timeout: float = 10.0
    connect_timeout: float = 15.0
    #: Seconds without a byte either way before a relayed session is closed (0: never).
    idle_timeout: float = 600.0
    max_sessions_per_peer: int = 64
    max_sessions_per_user: int = 256
    max_pending_logins: int = 256


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


class SOCKSFactory(protocol.ServerFactory):
    """
    Shares the core between sessions and keeps the counts the bounds need:
    sessions per peer address and per user, logins in flight.

    @param acl: the C{--acl} policy, or None without one (then the
        destination rules alone decide, also for unauthenticated sessions
        under C{--socks-auth optional}).
    """

    def __init__(
        self,
        portal: Any,
        acl: Any,
        settings: SOCKSSettings,
        reactor: Any,
        listener: str = "socks",
    ) -> None:
        self.portal = portal
        self.acl = acl
        self.settings = settings
        self.reactor = reactor
        self.listener = listener
        self.rules = DestinationRules(settings.allow)
        self.per_peer: Counter[str] = Counter()
        self.per_user: Counter[str] = Counter()
        self.pending_logins = 0

    def buildProtocol(self, addr: Any) -> SOCKSServer | None:
        peer = getattr(addr, "host", None) or "?"
        if self.per_peer[peer] >= self.settings.max_sessions_per_peer:
            log.warn("socks: refused a connection from {peer}: too many sessions", peer=peer)
            return None
        proto = SOCKSServer(self)
        proto.factory = self
        return proto


@implementer(interfaces.IHalfCloseableProtocol)
class SOCKSServer(protocol.Protocol):
    """One SOCKS5 session: negotiation, then relay."""

    def __init__(self, factory: SOCKSFactory) -> None:
        self.factory = factory
        self.settings = factory.settings
        self.reactor = factory.reactor
        self.codec = codec.ServerCodec()
        self.info: AuthInfo | None = None
        self.outbound: _Outbound | None = None
        self._pending: defer.Deferred[Any] | None = None
        self._timer: Any = None
        self._source: tuple[str, int] | None = None  # BIND's egress source
        self._gone = False
        self._counted_user: str | None = None
        # What the session log says.
        self.command: str | None = None
        self.destination: str | None = None
        self.address: str | None = None
        self.reply: int | None = None
        self.up = self.down = 0
        self.reason = "client closed"
        self._active = False

    # -- connection -------------------------------------------------------

    def connectionMade(self) -> None:
        self.meta = ConnectionMeta.from_transport("socks", self.transport, self.factory.listener)
        self.peer = self.meta.peer_address or "?"
        self.factory.per_peer[self.peer] += 1
        self.started = self.reactor.seconds()
        self._timer = self.reactor.callLater(self.settings.negotiation_timeout, self._timed_out)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._gone = True
        self._cancel_timer()
        if self._pending is not None:
            self._pending.cancel()
        factory = self.factory
        factory.per_peer[self.peer] -= 1
        if not factory.per_peer[self.peer]:
            del factory.per_peer[self.peer]
        if self._counted_user is not None:
            factory.per_user[self._counted_user] -= 1
            if not factory.per_user[self._counted_user]:
                del factory.per_user[self._counted_user]
        if self.outbound is not None and self.outbound.transport is not None:
            self.outbound.transport.loseConnection()
        self._log_session()

    def _log_session(self) -> None:
        identity = None
        if self.info is not None and self.info.identities:
            identity = self.info.identities[0].identity
        log.info(
            "socks session: peer={peer} identity={identity!r} {command} {destination} "
            "({address}) reply={reply} up={up} down={down} {duration:.3f}s: {reason}",
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
        self.transport.loseConnection()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self.outbound is not None and self.outbound.transport is not None:
            self.reason = "idle timeout"
            self.transport.abortConnection()
            return
        self.reason = "negotiation timeout"
        if self._pending is not None:
            self._pending.cancel()
        self.transport.abortConnection()

    # -- input ------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        outbound = self.outbound
        if outbound is not None and outbound.transport is not None:
            self.up += len(data)
            self._active = True
            outbound.transport.write(data)
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        try:
            events = self.codec.receive_data(data)
        except codec.ProtocolError as e:
            if e.reply is not None:  # a malformed request still gets its REP
                self.transport.write(self._reply_bytes(e.reply))
            self._close(f"protocol error: {e}")
            return
        for event in events:
            if self._gone or self.transport.disconnecting:
                return
            self._event(event)

    def _event(self, event: Any) -> None:
        if isinstance(event, codec.Greeting):
            self._greeting(event)
        elif isinstance(event, codec.UserPass):
            self._login(event)
        elif isinstance(event, codec.Request):
            self._request(event)
        elif isinstance(event, codec.Data):  # early bytes, now that the tunnel is up
            self.up += len(event.data)
            self.outbound.transport.write(event.data)  # type: ignore[union-attr]

    def _wait(self, d: defer.Deferred[Any]) -> None:
        """Read nothing more until C{d} has answered (early data stays bounded)."""
        self._pending = d
        paused = []

        def done(result: Any) -> Any:
            self._pending = None
            if paused and not self._gone and not self.transport.disconnecting:
                self.transport.resumeProducing()
            return result

        d.addBoth(done)
        d.addErrback(self._bug)
        if self._pending is d:  # still running: stop reading meanwhile
            paused.append(True)
            self.transport.pauseProducing()

    def _bug(self, reason: Failure) -> None:
        log.failure("socks session failed", reason)
        if not self._gone:
            self.reason = "internal error"
            self.transport.abortConnection()

    # -- negotiation ------------------------------------------------------

    def _greeting(self, greeting: codec.Greeting) -> None:
        if codec.USERPASS in greeting.methods:
            self.transport.write(self.codec.send_method(codec.USERPASS))
        elif codec.NO_AUTH in greeting.methods and not self.settings.auth_required:
            self.transport.write(self.codec.send_method(codec.NO_AUTH))
            self.info = AuthInfo(peer_address=self.meta.peer_address)
        else:
            self.transport.write(self.codec.send_method(codec.NO_ACCEPTABLE))
            if greeting.methods == (codec.NO_AUTH,):
                why = "no acceptable method: the client offered only no-authentication (ssh -D style)"
            else:
                why = f"no acceptable method among {list(greeting.methods)}"
            self._close(why)
            return
        self._feed(b"")

    def _login(self, event: codec.UserPass) -> None:
        factory = self.factory
        if factory.pending_logins >= self.settings.max_pending_logins:
            self._auth_failed("too many logins in flight")
            return
        try:
            credentials = RFC1929Credentials(event.username, event.password, conn_meta=self.meta)
        except ValueError:  # not UTF-8, or too long; the message holds no secret
            self._auth_failed("credentials not valid UTF-8")
            return
        factory.pending_logins += 1
        d = login(factory.portal, credentials, IAuthInfo)

        def settled(result: Any) -> Any:
            factory.pending_logins -= 1
            return result

        d.addBoth(settled)
        d.addCallbacks(self._authenticated, self._login_failed)
        self._wait(d)

    def _authenticated(self, result: tuple[Any, Any, Any]) -> None:
        _, info, _ = result
        name = info.identity_for(IdentityContext.ProxyAuthRfc1929) or info.identities[0].identity
        if self.factory.per_user[name] >= self.settings.max_sessions_per_user:
            self._auth_failed(f"too many sessions for {name!r}")
            return
        self.factory.per_user[name] += 1
        self._counted_user = name
        self.info = info
        self.transport.write(self.codec.send_auth_result(True))
        self._feed(b"")

    def _login_failed(self, reason: Failure) -> None:
        if reason.check(defer.CancelledError):
            return
        why = "authentication failed" if reason.check(UnauthorizedLogin) else (
            f"authentication unavailable: {reason.type.__name__}"
        )
        self._auth_failed(why)

    def _auth_failed(self, why: str) -> None:
        """RFC 1929 status 1, then close: fail closed on every path."""
        self.transport.write(self.codec.send_auth_result(False))
        self._close(why)

    # -- requests ---------------------------------------------------------

    def _request(self, request: codec.Request) -> None:
        self.command = _COMMANDS.get(request.command, f"0x{request.command:02x}")
        self.destination = f"{request.host}:{request.port}"
        if request.command == codec.CONNECT:
            self._wait(defer.ensureDeferred(self._connect(request)))
        elif request.command == codec.BIND:
            self._bind(request)
        else:
            self._refuse(Reply.COMMAND_NOT_SUPPORTED, "command not supported")

    def _refuse(self, reply: Reply, why: str) -> None:
        self.reply = int(reply)
        self.transport.write(self.codec.send_reply(reply))
        self._close(why)

    def _reply_bytes(self, reply: Reply) -> bytes:
        self.reply = int(reply)
        return codec.encode_reply(reply)

    def _acl_allows(self, resource: str, privilege: str) -> bool:
        acl = self.factory.acl
        if acl is None:
            return self.info is not None
        return acl.query_resource_access(self.info, resource, privilege)

    def _bind(self, request: codec.Request) -> None:
        """KumoMTA's egress source: BIND names the local address CONNECT will use."""
        if self._source is not None:
            self._refuse(Reply.GENERAL_FAILURE, "a second BIND")
            return
        try:
            source = ipaddress.ip_address(request.host)
        except ValueError:
            self._refuse(Reply.ADDRESS_TYPE_NOT_SUPPORTED, "BIND needs an IP address")
            return
        if not self.info or not self.info.is_authenticated() or not self._acl_allows(
            f"socks/source/{source}", "bind"
        ):
            self._refuse(Reply.NOT_ALLOWED, f"source {source} not allowed")
            return
        family = socket.AF_INET6 if source.version == 6 else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind((str(source), request.port))
                port = probe.getsockname()[1]
        except OSError as e:
            self._refuse(Reply.GENERAL_FAILURE, f"cannot bind {source}: {e.strerror}")
            return
        self._source = (str(source), port)
        self.reply = int(Reply.SUCCEEDED)
        self.transport.write(self.codec.send_reply(Reply.SUCCEEDED, str(source), port))
        self._feed(b"")

    async def _connect(self, request: codec.Request) -> None:
        name: str | None = None
        try:
            addresses = [ipaddress.ip_address(request.host)]
        except ValueError:
            name = request.host.lower()  # DNS names are case-insensitive
        if name is not None:
            if not self._destination_acl(name, request.port):
                self._refuse(Reply.NOT_ALLOWED, "destination not allowed by the ACL")
                return
            try:
                found = await self._with_timeout(resolve(self.reactor, name, request.port))
            except Exception:  # noqa: BLE001 - every resolver failure is "host unreachable"
                found = []
            if self._gone:
                return
            addresses = []
            for text in found:
                address = ipaddress.ip_address(text.split("%", 1)[0])
                if address not in addresses:
                    addresses.append(address)
            if not addresses:
                self._refuse(Reply.HOST_UNREACHABLE, f"cannot resolve {name}")
                return
        if self._source is not None:  # the egress source decides the family
            source_version = ipaddress.ip_address(self._source[0]).version
            addresses = [a for a in addresses if a.version == source_version]
            if not addresses:
                self._refuse(Reply.ADDRESS_TYPE_NOT_SUPPORTED, "no address of the source's family")
                return
        if not self.factory.rules.permits(name, addresses, request.port) or not all(
            self._destination_acl(str(a), request.port) for a in addresses
        ):
            self.address = str(addresses[0])
            self._refuse(Reply.NOT_ALLOWED, "destination not allowed")
            return
        await self._open(addresses, request.port)

    def _destination_acl(self, host: str, port: int) -> bool:
        return self._acl_allows(f"socks/destination/{host.lower()}/{port}", "connect")

    def _with_timeout(self, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        return d.addTimeout(self.settings.connect_timeout, self.reactor)

    async def _open(self, addresses: list[Any], port: int) -> None:
        reply: Reply = Reply.HOST_UNREACHABLE
        for address in addresses:
            self.address = str(address)
            endpoint_class = (
                endpoints.TCP6ClientEndpoint if address.version == 6 else endpoints.TCP4ClientEndpoint
            )
            endpoint = endpoint_class(
                self.reactor,
                str(address),
                port,
                timeout=self.settings.connect_timeout,
                bindAddress=self._source,
            )
            try:
                outbound = await endpoint.connect(_OutboundFactory(self))
            except defer.CancelledError:
                return
            except Exception:  # noqa: BLE001 - mapped to a reply code
                reply = connect_reply(Failure())
                if self._gone:
                    return
                continue
            if self._gone:
                outbound.transport.loseConnection()
                return
            self._connected(outbound)
            return
        self._refuse(reply, f"connect failed: {reply.name.lower()}")

    def _connected(self, outbound: _Outbound) -> None:
        here, there = outbound.transport.getHost(), outbound.transport.getPeer()
        if there.host == here.host and not self.factory.rules.allows_local(
            ipaddress.ip_address(there.host), there.port
        ):
            # An address of this very host (its listeners, its other services).
            outbound.transport.loseConnection()
            self._refuse(Reply.NOT_ALLOWED, "destination is the gateway's own host")
            return
        self.outbound = outbound
        self._cancel_timer()
        self.reply = int(Reply.SUCCEEDED)
        self.transport.write(self.codec.send_reply(Reply.SUCCEEDED, here.host, here.port))
        # Backpressure both ways: a full write buffer pauses the other side's reads.
        self.transport.registerProducer(outbound.transport, True)
        outbound.transport.registerProducer(self.transport, True)
        if self.settings.idle_timeout:
            self._timer = self.reactor.callLater(self.settings.idle_timeout, self._idle_check)
        self._feed(b"")  # bytes the client sent after its request

    def _idle_check(self) -> None:
        if self._active:
            self._active = False
            self._timer = self.reactor.callLater(self.settings.idle_timeout, self._idle_check)
        else:
            self._timed_out()

    # -- relay ------------------------------------------------------------

    def readConnectionLost(self) -> None:
        """The client finished sending: pass the half-close on."""
        outbound = self.outbound
        if outbound is None or outbound.transport is None:
            self.transport.loseConnection()
            return
        self._half_close(outbound.transport)
        outbound.client_done = True
        if outbound.remote_done:
            self._close("both sides finished")

    def writeConnectionLost(self) -> None:
        pass

    @staticmethod
    def _half_close(transport: Any) -> None:
        if hasattr(transport, "loseWriteConnection"):
            transport.loseWriteConnection()
        else:
            transport.loseConnection()


@implementer(interfaces.IHalfCloseableProtocol)
class _Outbound(protocol.Protocol):
    """The connection to the destination; its bytes go to the client."""

    def __init__(self, server: SOCKSServer) -> None:
        self.server = server
        self.client_done = False
        self.remote_done = False

    def dataReceived(self, data: bytes) -> None:
        server = self.server
        server.down += len(data)
        server._active = True
        server.transport.write(data)

    def readConnectionLost(self) -> None:
        self.remote_done = True
        server = self.server
        if server.outbound is not self:
            return
        SOCKSServer._half_close(server.transport)
        if self.client_done:
            server._close("both sides finished")

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        server = self.server
        if server.outbound is self and not server._gone:
            if not (self.client_done and self.remote_done):
                server.reason = "destination closed"
            server.transport.loseConnection()


class _OutboundFactory(protocol.Factory):
    noisy = False  # one per session: the session event says enough

    def __init__(self, server: SOCKSServer) -> None:
        self.server = server

    def buildProtocol(self, addr: Any) -> _Outbound:
        return _Outbound(self.server)


def build_socks(core: Any, endpoint: Any, listener: str) -> internet.StreamServerEndpointService:
    """The C{--socks} (plain) and C{--socks-tls} (TLS with the gateway's certificate) listeners."""
    factory: Any = SOCKSFactory(core.portal, core.acl, core.socks, core.reactor, listener)
    if listener == "socks-tls":
        factory = TLSMemoryBIOFactory(core.certificate.options(), False, factory)
    return internet.StreamServerEndpointService(endpoint, factory)


__all__ = ["SOCKSFactory", "SOCKSServer", "SOCKSSettings", "build_socks", "resolve"]
