# -*- test-case-name: tests.test_web_guard -*-
"""
The HTTP guard: Basic (RFC 7617) and Bearer (RFC 6750) authentication in
front of a resource tree, through the gateway's Portal.

C{twisted.web.guard} answers 401 for everything, has no charset, no Bearer
and gives checkers no peer address. L{Guard} answers the exact status of
shared/reference/http-auth.md instead: 401 with one challenge per scheme on
offer, C{error="invalid_token"} for a bad Bearer token, 400
C{error="invalid_request"} for a malformed one, 429 with C{Retry-After} when
throttled, 503 when the backend fails, and C{Cache-Control: no-store} on all
of them. The avatar is the resource tree the realm builds for the session's
AuthInfo (L{gateway.web.resources}).
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import unicodedata
from typing import TYPE_CHECKING, Any

from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server, util
from twisted.web.iweb import ICredentialFactory
from zope.interface import implementer

from gateway.addresses import in_networks, ip_or_none, is_loopback
from gateway.connections import authenticated, login_running
from gateway.credentials import MAX_FIELD, MAX_TOKEN, BearerToken, HTTPBasicCredentials
from gateway.errors import TemporaryFailure, Throttled
from gateway.meta import ConnectionMeta
from gateway.realm import NO_LOGOUT, login
from gateway.web.messages import Refusal, header, quoted_string
from gateway.web.settings import HTTPSettings

if TYPE_CHECKING:
    from gateway.web.server import GatewayRequest

log = Logger()

#: RFC 6750 section 2.1 b64token (RFC 7235 token68).
_TOKEN68 = re.compile(rb"[A-Za-z0-9\-._~+/]+=*")
#: The longest Authorization header value read at all.
MAX_AUTHORIZATION = 4 * MAX_TOKEN


class BadForwarding(ValueError):
    """A trusted proxy's request that does not say who the client is (400)."""


class MalformedCredentials(Exception):
    """An Authorization header that breaks the scheme's syntax (400)."""


def via_trusted_proxy(request: server.Request, settings: HTTPSettings) -> bool:
    """Whether the request comes from a C{--http-trusted-proxy} address."""
    return in_networks(getattr(request.getClientAddress(), "host", None), settings.trusted_proxies)


def client_of(
    request: server.Request, settings: HTTPSettings, via_proxy: bool
) -> tuple[str | None, bool]:
    """
    The client's address and whether it used TLS. From a trusted proxy
    (C{via_proxy}: L{via_trusted_proxy}) these come from X-Forwarded-For (the
    rightmost address that is not a trusted proxy) and X-Forwarded-Proto;
    from anyone else, from the connection.

    @raise BadForwarding: a trusted proxy sent no X-Forwarded-For, or one
        whose hops end in something that is not an address before reaching
        one that is not a trusted proxy: the client would be the proxy, and
        every client would share its throttling and per-peer accounting. Or
        it came over TLS without X-Forwarded-Proto: its client would count
        as having used TLS.
    """
    peer, _, _, _, secure = connection_of(request)
    if not via_proxy:
        return peer, secure
    values = request.requestHeaders.getRawHeaders(b"x-forwarded-for")
    if not values:
        raise BadForwarding("no X-Forwarded-For from the trusted proxy")
    for hop in reversed(b",".join(values).split(b",")):
        address = ip_or_none(hop.strip().decode("latin-1"))
        if address is None:  # garbage where the proxy's own entry should be
            raise BadForwarding("an X-Forwarded-For without the client's address")
        peer = address
        if not in_networks(address, settings.trusted_proxies):
            break
    proto = header(request, b"x-forwarded-proto")
    if proto is not None:
        secure = proto.lower() == b"https"
    elif secure:  # the proxy's own TLS says nothing about its client's
        raise BadForwarding("no X-Forwarded-Proto from the trusted proxy")
    return peer, secure


def meta_of(
    request: server.Request, settings: HTTPSettings, listener: str | None, via_proxy: bool
) -> ConnectionMeta:
    """The L{ConnectionMeta} of one request (HTTP has one per request)."""
    peer, secure = client_of(request, settings, via_proxy)
    _, peer_port, local, local_port, _ = connection_of(request)
    return ConnectionMeta(
        protocol="http",
        listener=listener,
        peer_address=peer,
        # X-Forwarded-For carries no port: only the connection's own peer has one.
        peer_port=None if via_proxy else peer_port,
        local_address=local,
        local_port=local_port,
        tls=secure,
    )


#: A connection's peer address and port, local address and port, and TLS.
ConnectionFacts = tuple[str | None, int | None, str | None, int | None, bool]


def connection_of(request: server.Request) -> ConnectionFacts:
    """
    The facts of the request's connection: peer address (normalised) and
    port, local address and port, TLS. Worked out on the connection's first
    request and kept on its channel (L{gateway.web.server.GatewayChannel}):
    they hold for every request it carries.
    """
    channel = getattr(request, "channel", None)
    known = getattr(channel, "gateway_connection", None)
    if known is not None:
        return known
    client, host = request.getClientAddress(), request.getHost()
    peer = getattr(client, "host", None)
    facts = (
        ip_or_none(peer) or peer,
        getattr(client, "port", None),
        getattr(host, "host", None),
        getattr(host, "port", None),
        request.isSecure(),
    )
    if _keeps(channel):
        channel.gateway_connection = facts
    return facts


def _keeps(channel: Any) -> bool:
    """
    Whether C{channel} keeps what a connection's requests share (the
    gateway's own channel declares where: L{gateway.web.server.GatewayChannel}).
    """
    return hasattr(channel, "gateway_connection")


def credentials_allowed(meta: ConnectionMeta, settings: HTTPSettings) -> bool:
    """
    Passwords and tokens travel in clear over plain HTTP: accepted only over
    TLS (or from a trusted proxy that says the client used it) or from
    loopback, unless the operator allows it (RFC 7617 4, RFC 6750 5.3).
    """
    if meta.tls or settings.insecure_auth:
        return True
    return is_loopback(meta.peer_address)


@implementer(ICredentialFactory)
class BasicCredentialFactory:
    """RFC 7617 Basic with C{charset="UTF-8"}; decoding is strict."""

    scheme = b"basic"

    def __init__(self, realm: str) -> None:
        self.realm = realm

    def challenge(self, error: str | None = None) -> str:
        return f"Basic realm={quoted_string(self.realm)}, charset=\"UTF-8\""

    def getChallenge(self, request: Any) -> dict[str, str]:
        return {"realm": self.realm, "charset": "UTF-8"}

    def decode(self, response: bytes, request: Any) -> HTTPBasicCredentials:
        """
        @raise UnauthorizedLogin: bad base64, no colon, not UTF-8 or too
            long: a failed login (401), never an error page.
        """
        encoded = response.strip()
        channel = getattr(request, "channel", None)
        last = getattr(channel, "gateway_basic", None)
        if last is not None and last[0] == encoded:  # keep-alive: the same header again
            _, user, password = last
        else:
            user, password = self._decoded(encoded)
            if _keeps(channel):
                channel.gateway_basic = (encoded, user, password)
        try:
            return HTTPBasicCredentials(user, password, conn_meta=request.gateway_meta)
        except (TypeError, ValueError):
            raise UnauthorizedLogin("unusable Basic credentials") from None

    @staticmethod
    def _decoded(encoded: bytes) -> tuple[str, str]:
        """The user (NFC) and password of a Basic token, checked (L{decode})."""
        try:
            raw = base64.b64decode(encoded, validate=True)
            user, colon, password = raw.decode("utf-8").partition(":")
        except (binascii.Error, ValueError):
            raise UnauthorizedLogin("undecodable Basic credentials") from None
        if base64.b64encode(raw) != encoded:  # extra padding, non-canonical bits
            raise UnauthorizedLogin("non-canonical base64 in Basic credentials")
        user = unicodedata.normalize("NFC", user)
        if not colon or not user or len(user) > MAX_FIELD or len(password) > MAX_FIELD:
            raise UnauthorizedLogin("malformed Basic credentials")
        return user, password


@implementer(ICredentialFactory)
class BearerCredentialFactory:
    """RFC 6750 Bearer tokens from the Authorization header."""

    scheme = b"bearer"

    def __init__(self, realm: str) -> None:
        self.realm = realm

    def challenge(self, error: str | None = None) -> str:
        text = f"Bearer realm={quoted_string(self.realm)}"
        return text + (f', error="{error}"' if error else "")

    def getChallenge(self, request: Any) -> dict[str, str]:
        return {"realm": self.realm}

    def decode(self, response: bytes, request: Any) -> BearerToken:
        """@raise MalformedCredentials: not a b64token, or too long (400)."""
        token = response.strip()
        if len(token) > MAX_TOKEN or not _TOKEN68.fullmatch(token):
            raise MalformedCredentials("malformed Bearer token")
        return BearerToken(token.decode("ascii"), conn_meta=request.gateway_meta)


def schemes_for(portal: Any, realm: str) -> list[Any]:
    """The credential factories whose credentials some checker can check."""
    interfaces = portal.listCredentialsInterfaces()
    factories: list[Any] = []
    if any(i.implementedBy(HTTPBasicCredentials) for i in interfaces):
        factories.append(BasicCredentialFactory(realm))
    if any(i.implementedBy(BearerToken) for i in interfaces):
        factories.append(BearerCredentialFactory(realm))
    return factories


class Guard(resource.Resource):
    """
    Authenticates every request and renders the avatar resource the realm
    builds for it (an C{IResource} avatar; see L{gateway.web.resources}).

    A login still running when the client goes away is cancelled.
    """

    isLeaf = False

    def __init__(self, portal: Any, settings: HTTPSettings, listener: str | None = None) -> None:
        super().__init__()
        self.portal = portal
        self.settings = settings
        self.listener = listener
        self.factories = schemes_for(portal, settings.realm)

    def getChildWithDefault(self, path: bytes, request: server.Request) -> resource.IResource:
        request.postpath.insert(0, request.prepath.pop())  # transparent: consume nothing
        return self._resource_for(request)

    def challenges(self, error: str | None = None) -> list[str]:
        """One challenge per scheme on offer; C{error} goes to Bearer's."""
        return [f.challenge(error if f.scheme == b"bearer" else None) for f in self.factories]

    def _unauthorized(self, meta: ConnectionMeta, error: str | None = None) -> resource.IResource:
        if not credentials_allowed(meta, self.settings):  # nothing may be sent here
            return Refusal(403, "HTTPS is required for authentication")
        return Refusal(401, "Authentication required", self.challenges(error))

    def _resource_for(self, request: server.Request) -> resource.IResource:
        decided = self.decide(request)
        if isinstance(decided, defer.Deferred):
            # A login answered at once (a cached verification): its resource
            # now, without a DeferredResource's second render.
            now = _result_now(decided)
            if now and not isinstance(now[0], Failure):
                return now[0]
            return util.DeferredResource(decided)
        return decided

    def decide(self, request: GatewayRequest) -> Any:
        """
        What the request gets: a L{Refusal}, or (through a Deferred, since
        logging in takes time) the realm's avatar or a refusal. Decided once
        per request: a request whose upload started streaming before its
        body arrived (L{gateway.web.server.GatewayRequest}) keeps its answer.
        """
        decided = request.gateway_decision
        if decided is not None:
            return decided
        via = request.gateway_via_proxy = via_trusted_proxy(request, self.settings)
        try:
            meta = request.gateway_meta = meta_of(request, self.settings, self.listener, via)
        except BadForwarding as e:
            return Refusal(400, f"Bad request: {e}")
        try:
            credentials = self._credentials(request, meta)
        except MalformedCredentials as e:
            challenges = [
                f.challenge("invalid_request") for f in self.factories if f.scheme == b"bearer"
            ]
            return Refusal(400, f"Bad request: {e}", challenges)
        except UnauthorizedLogin:
            return self._unauthorized(meta)
        if credentials is None:
            return self._unauthorized(meta)
        if isinstance(credentials, Refusal):
            return credentials
        channel = request.channel
        key = (request.requestHeaders.getRawHeaders(b"authorization"), meta.peer_address)
        logged = getattr(channel, "gateway_logged", None)
        d = login(
            self.portal,
            credentials,
            resource.IResource,
            repeated=lambda info: logged == (*key, info),
        )
        if not _result_now(d):  # a login still running (not a cached verification)
            login_running(getattr(channel, "transport", None), d)  # not shed meanwhile
            request.notifyFinish().addErrback(lambda _: d.cancel())
        d.addCallbacks(
            self._succeeded,
            self._failed,
            callbackArgs=(request, key),
            errbackArgs=(meta, credentials, channel),
        )
        return d

    def _credentials(self, request: server.Request, meta: ConnectionMeta) -> Any:
        if b"access_token" in request.args:  # the query only: RFC 6750 2.3 is not accepted
            raise MalformedCredentials("send the token in the Authorization header")
        try:
            value = header(request, b"authorization", once=True)
        except ValueError as e:
            raise MalformedCredentials(str(e)) from None
        if value is None:
            return None
        if len(value) > MAX_AUTHORIZATION:
            raise MalformedCredentials("Authorization header too long")
        scheme, _, rest = value.partition(b" ")
        scheme = scheme.lower()
        for factory in self.factories:
            if factory.scheme == scheme:
                break
        else:
            return None  # a scheme we do not offer: the challenges say which we do
        if not credentials_allowed(meta, self.settings):
            return Refusal(403, "HTTPS is required for authentication")  # not checked
        return factory.decode(rest, request)

    def _succeeded(
        self, result: tuple[Any, Any, Any], request: server.Request, key: tuple[Any, ...]
    ) -> Any:
        _, avatar, logout = result
        channel = request.channel
        # The connection has carried an authenticated request: out of the
        # budget's unauthenticated share.
        authenticated(getattr(channel, "transport", None))
        if _keeps(channel):  # this success is logged on it now
            channel.gateway_logged = (*key, getattr(avatar, "auth_info", None))
        if logout is not NO_LOGOUT:
            request.notifyFinish().addBoth(lambda _: logout())
        return avatar

    def _failed(
        self, reason: Failure, meta: ConnectionMeta, credentials: Any, channel: Any = None
    ) -> Any:
        if _keeps(channel):  # the next success gets its line again
            channel.gateway_logged = None
        if reason.check(defer.CancelledError):
            return _Gone()  # the client left while its login ran: nothing to send
        if reason.check(UnauthorizedLogin, UnhandledCredentials):
            bearer = not IUsernamePassword.providedBy(credentials)
            return self._unauthorized(meta, "invalid_token" if bearer else None)
        if reason.check(Throttled):
            retry = str(max(1, math.ceil(reason.value.retry_after))).encode()
            return Refusal(429, "Too many failed logins", headers=[(b"retry-after", retry)])
        if not reason.check(TemporaryFailure):
            log.failure("HTTP login failed", reason)
        return Refusal(503, "Authentication temporarily unavailable", headers=[(b"retry-after", b"1")])


def _result_now(d: defer.Deferred[Any]) -> list[Any]:
    """
    C{[result]} when C{d} has its result now (not C{d.called}, which is
    also true while it waits for a Deferred it was given), else C{[]}.
    """
    now: list[Any] = []
    d.addBoth(lambda result: now.append(result) or result)
    return now


class _Gone(resource.Resource):
    isLeaf = True

    def render(self, request: server.Request) -> Any:
        return server.NOT_DONE_YET
