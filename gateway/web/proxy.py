# -*- test-case-name: tests.test_web_proxy -*-
"""
Reverse proxy to one upstream HTTP(S) service, for requests the front door
has already authenticated and authorised.

The upstream trusts the identity headers set here (C{Remote-User},
C{Remote-Groups}), so every inbound header that could carry an identity is
removed first, under any spelling a server might treat as the same name
(C{Remote_User}, C{remote.user}, ...): WSGI and CGI servers map C{-} and C{_}
to the same variable, so a client-sent C{Remote_User} would otherwise reach
the application as the gateway's word.

Responses are streamed: the upstream connection is registered as the
client request's producer, so a slow client pauses the read from the upstream
instead of the gateway buffering the body.  Failures are answered with
C{502 Bad Gateway} (no connection, TLS verification, protocol errors) or
C{504 Gateway Timeout} (no response head within the timeout).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import IO, Any
from urllib.parse import urlsplit

import attrs
from twisted.internet import ssl, task
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    FileBodyProducer,
    HTTPConnectionPool,
    ResponseDone,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from gateway.ratelog import LogRateLimiter
from gateway.text import quote
from gateway.tls import load_ca_file
from gateway.web.messages import refusal

_log = Logger()


def normalise_header_name(name: bytes) -> bytes:
    """
    C{name} lower-cased with C{_} and C{.} turned into C{-} (and surrounding
    blanks dropped), so that spellings a server may treat alike compare equal:
    C{b"REMOTE_user"} -> C{b"remote-user"}.
    """
    return name.strip(b" \t").lower().replace(b"_", b"-").replace(b".", b"-")


#: Header names (normalised: lower case, "_" and "." turned into "-") that carry identity
#: and are removed from every inbound request before proxying, under any spelling.
IDENTITY_HEADERS: frozenset[str] = frozenset({
    # The names this proxy sets, and the usual Remote-* family.
    "remote-user", "remote-groups", "remote-email", "remote-name",
    "remote-user-id", "remote-preferred-username",
    "x-remote-user", "x-remote-groups", "x-remote-email", "x-remote-name",
    # oauth2-proxy, vouch, and other forward-auth gateways.
    "x-forwarded-user", "x-forwarded-groups", "x-forwarded-email",
    "x-forwarded-preferred-username", "x-forwarded-access-token",
    "x-auth-request-user", "x-auth-request-email", "x-auth-request-groups",
    "x-auth-request-preferred-username", "x-auth-request-access-token",
    "x-vouch-user",
    # Generic names applications are commonly configured to trust.
    "x-authenticated-user", "x-authenticated-groups", "x-authenticated-email",
    "x-user", "x-username", "x-email", "x-groups", "x-auth-user", "x-proxy-user",
    "x-webauth-user",  # Grafana's auth.proxy default
    # Cloud front ends an upstream might also sit behind.
    "x-goog-authenticated-user-email", "x-goog-authenticated-user-id",
    "x-amzn-oidc-identity", "x-amzn-oidc-data", "x-amzn-oidc-accesstoken",
    "x-ms-client-principal", "x-ms-client-principal-name", "x-ms-client-principal-id",
    "cf-access-authenticated-user-email",
    "tailscale-user-login", "tailscale-user-name",
    # Singular and other spellings of the same (outside review, issue 12).
    "remote-group", "x-remote-group", "x-auth-username", "x-forwarded-username",
    # A TLS client identity a front end passes on (Envoy, nginx/HAProxy
    # conventions): the gateway's clients never prove one to the upstream.
    "x-forwarded-client-cert", "x-ssl-client-cert", "x-ssl-client-s-dn", "x-ssl-client-dn",
    "x-ssl-client-verify", "x-client-cert", "x-client-verify", "ssl-client-cert",
    "ssl-client-verify", "x-client-dn",
})

_IDENTITY_HEADER_BYTES = frozenset(name.encode("ascii") for name in IDENTITY_HEADERS)

#: Header names (normalised) with which a client asks frameworks (Express's
#: method-override, Spring's HiddenHttpMethodFilter kin, Rails, ...) to act
#: on another method than the one the ACL checked: removed before proxying
#: unless the operator keeps them (the ACL then checks their methods too).
METHOD_OVERRIDE_HEADERS: frozenset[bytes] = frozenset({
    b"x-http-method-override", b"x-http-method", b"x-method-override",
})

#: Other proxies' ways of passing the original target (normalised names,
#: L{normalise_header_name}), which the gateway does not read. nginx's own
#: documentation sends C{X-Original-URI}: were it ignored, C{/auth} would
#: check the request to C{/auth} and let every path through (/auth refuses
#: them); an upstream may route by them (the reverse proxy drops them).
LOOKALIKE_TARGET_HEADERS = frozenset({
    b"x-original-uri", b"x-original-path", b"x-original-host", b"x-original-request-uri",
    b"x-forwarded-prefix", b"x-forwarded-path", b"x-forwarded-url", b"x-forwarded-request-uri",
    b"x-rewrite-url", b"x-envoy-original-path", b"x-envoy-original-url", b"x-request-uri",
})

#: Hop-by-hop headers (RFC 9110 section 7.6.1, plus the historical
#: Proxy-Connection and "Trailers"), lower case.  Never forwarded either way.
HOP_BY_HOP_HEADERS: frozenset[bytes] = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
    b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade",
    b"proxy-connection",
})

#: Inbound headers replaced by this proxy's own values (or framing it computes).
#: Expect is dropped because the body has already been read in full: there is
#: nothing left to "continue".
_REPLACED_REQUEST_HEADERS = frozenset({
    b"host", b"content-length", b"expect",
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-real-ip",
    # What a client could use to tell the upstream another story about the
    # request: other proxies' conventions, never believed from a client.
    b"forwarded", b"x-forwarded-port", b"x-forwarded-prefix", b"x-forwarded-server",
    b"x-forwarded-uri", b"x-forwarded-method", b"x-forwarded-scheme", b"x-forwarded-ssl",
    b"x-original-url", b"x-original-uri", b"x-original-method", b"x-original-host",
    b"x-rewrite-url", b"x-client-ip", b"true-client-ip", b"x-scheme", b"front-end-https",
    # Client-address headers of CDNs and other front ends.
    b"cf-connecting-ip", b"fastly-client-ip", b"x-cluster-client-ip",
    b"x-original-forwarded-for", b"x-remote-addr", b"x-remote-ip", b"x-originating-ip",
})

_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_BODYLESS_METHODS = frozenset({b"GET", b"HEAD"})
_NO_BODY_CODES = frozenset({http.NO_CONTENT, http.NOT_MODIFIED})


@attrs.frozen
class _Upstream:
    """A parsed, validated upstream base URL."""

    scheme: str
    host: str
    port: int
    #: The path prefix without a trailing slash, as bytes ("" for none).
    prefix: bytes

    @classmethod
    def parse(cls, url: str) -> _Upstream:
        """Parse C{url}; L{ValueError} with a one-line message when it is unusable."""
        if not isinstance(url, str) or _CONTROL_CHARACTER.search(url) or " " in url:
            raise ValueError(
                "upstream must be an http:// or https:// URL without spaces or control characters"
            )
        try:
            parts = urlsplit(url)
        except ValueError:  # e.g. an unclosed "[" around an IPv6 address
            raise ValueError(f"upstream {quote(url)} is not a valid URL") from None
        if parts.scheme not in ("http", "https"):
            raise ValueError(
                f"upstream must start with http:// or https://, got scheme {quote(parts.scheme)}"
            )
        if "@" in parts.netloc:
            # Not echoed: it may hold a password.
            raise ValueError("upstream must not contain a user name or password")
        if not parts.hostname:
            raise ValueError(f"upstream {quote(url)} has no host")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"upstream {quote(url)} has an invalid port") from None
        if parts.query or parts.fragment or url.endswith(("?", "#")):
            raise ValueError(f"upstream {quote(url)} must not have a query or fragment")
        if port is None:
            port = 443 if parts.scheme == "https" else 80
        try:
            parts.hostname.encode("idna")
        except UnicodeError:
            raise ValueError(f"upstream {quote(url)} has an invalid host name") from None
        try:
            prefix = parts.path.rstrip("/").encode("ascii")
        except UnicodeEncodeError:
            raise ValueError(f"upstream {quote(url)} path must be ASCII (percent-encoded)") \
                from None
        return cls(parts.scheme, parts.hostname, port, prefix)

    def base(self) -> bytes:
        """Scheme, authority and prefix, ready for a request target to be appended."""
        host = self.host.encode("idna")  # ASCII names pass through unchanged
        if b":" in host:
            host = b"[" + host + b"]"
        default = 443 if self.scheme == "https" else 80
        authority = host if self.port == default else b"%s:%d" % (host, self.port)
        return self.scheme.encode("ascii") + b"://" + authority + self.prefix


def check_upstream(url: str) -> None:
    """L{ValueError} with a one-line message when C{url} is not a usable upstream."""
    _Upstream.parse(url)


def _trust_root(ca_file: str) -> Any:
    """The certificates in PEM file C{ca_file} as a Twisted trust root."""
    return ssl.trustRootFromCertificates(list(load_ca_file(ca_file)))


def _check_header_text(what: str, value: str) -> None:
    """
    Refuse an identity or group that would not survive as a header value.

    These are validated where they are created; this is a last line of
    defence.  Stripping instead would be worse: C{"adm\\nin"} would become
    C{"admin"}, someone else's identity.
    """
    if _CONTROL_CHARACTER.search(value):
        raise ValueError(f"{what} contains a control character; refusing to proxy")


def _origin_form(uri: bytes) -> bytes | None:
    """
    The path-and-query part of a request target: unchanged for the usual
    origin form (C{/path?q}), the path of an absolute-form target
    (C{http://host/path?q}), L{None} for anything else (C{*}, authority form).
    """
    if uri.startswith(b"/"):
        return uri
    lower = uri[:8].lower()
    for scheme in (b"http://", b"https://"):
        if lower.startswith(scheme):
            rest = uri[len(scheme):]
            cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=-1)
            if cut < 0:
                return b"/"
            target = rest[cut:]
            return target if target.startswith(b"/") else b"/" + target
    return None


def _describe(reason: Failure) -> str:
    """A one-line account of why the upstream exchange failed (no header values in it)."""
    inner = getattr(reason.value, "reasons", None)  # ResponseFailed / ResponseNeverReceived
    if inner:
        return "; ".join(_describe(f) for f in inner)
    return f"{reason.type.__name__}: {reason.getErrorMessage()}"


class UpstreamProxy:
    """
    Forwards authenticated requests to one upstream, adding the identity.

    One instance serves any number of requests; with the default agent it
    keeps a persistent connection pool, closed by L{close}.

    Identity headers sent: C{Remote-User} (the identity, UTF-8) and
    C{Remote-Groups} (the groups joined by C{","}), always both, with
    C{Remote-Groups} empty when there are no groups, so the upstream never has
    to guess whether an absent header means "none" or "not told".
    """

    def __init__(
        self,
        upstream: str,
        reactor: Any,
        *,
        timeout: float = 60.0,
        forward_authorization: bool = False,
        agent: IAgent | None = None,
        ca_file: str | None = None,
        keep_method_override: bool = False,
    ) -> None:
        """
        upstream: 'http://host:port[/prefix]' or 'https://...'.  ValueError
        (one clear line) for anything else, or for a non-positive timeout,
        an unreadable CA file, or a CA file with an http upstream.

        timeout: seconds to wait for the upstream's response head (connect
        included); the body may then take as long as it takes.

        forward_authorization: send the client's Authorization header on;
        by default it is dropped, since it holds the gateway credential.

        keep_method_override: send X-HTTP-Method-Override and kin on (the
        caller's ACL must then have checked their methods); dropped by default.

        agent: injectable IAgent for tests; default an Agent with a persistent
        HTTPConnectionPool, and for https a BrowserLikePolicyForHTTPS
        (service-identity hostname verification), trusting ca_file (PEM, one
        or more certificates) when given, the system store otherwise.
        """
        self._upstream = _Upstream.parse(upstream)
        if not timeout > 0:
            raise ValueError(f"upstream timeout must be positive, got {timeout!r}")
        if ca_file is not None and self._upstream.scheme != "https":
            raise ValueError("a CA file only applies to an https:// upstream")
        self._base = self._upstream.base()
        self._reactor = reactor
        self._timeout = timeout
        self._forward_authorization = forward_authorization
        self._keep_method_override = keep_method_override
        self._cooperator = task.Cooperator(scheduler=lambda work: reactor.callLater(0, work))
        #: One line a minute about upstream responses with an impossible status.
        self._bad_status_log = LogRateLimiter(reactor, interval=60.0, max_keys=1)
        #: The connection pool of the default agent; L{None} when one was injected.
        self.pool: HTTPConnectionPool | None = None
        if agent is None:
            self.pool = HTTPConnectionPool(reactor, persistent=True)
            policy = BrowserLikePolicyForHTTPS(
                trustRoot=_trust_root(ca_file) if ca_file is not None else None
            )
            agent = Agent(reactor, contextFactory=policy, connectTimeout=timeout, pool=self.pool)
        self._agent = agent

    def __repr__(self) -> str:
        return f"<UpstreamProxy {self._base.decode('ascii', 'replace')}>"

    def close(self) -> Deferred[None]:
        """Close the idle upstream connections kept by the default agent's pool."""
        if self.pool is None:
            return succeed(None)
        return self.pool.closeCachedConnections()

    def render(
        self,
        request: Any,
        identity: str,
        groups: Sequence[str],
        target: bytes | None = None,
        body: IBodyProducer | None = None,
    ) -> int:
        """
        Proxy C{request} to the upstream and return C{NOT_DONE_YET}.

        @param target: the origin-form target to request (path and query), as
            the front door checked it; by default the request's own.
        @param body: the request body as it arrives; by default the body
            twisted.web has received in full (C{request.content}).
        @raise ValueError: if C{identity} is empty or holds a control
            character, or a group holds a control character or a comma.
        """
        headers = self.upstream_headers(request, identity, groups)
        exchange = _Exchange(request, self._reactor, self._timeout, self._bad_status_log)
        if target is None:
            target = _origin_form(request.uri)
        if target is None:
            exchange.fail(http.BAD_REQUEST, "the request target is not a path")
            return NOT_DONE_YET
        if body is None:
            body = self._body(request)
        exchange.start(self._agent, request.method, self._base + target, headers, body)
        return NOT_DONE_YET

    def upstream_headers(self, request: Any, identity: str, groups: Sequence[str]) -> Headers:
        """
        The headers to send upstream for C{request}: its own, less hop-by-hop,
        identity, framing and (unless configured) C{Authorization} headers,
        plus the identity and the C{X-Forwarded-*} set. Method-override
        headers are dropped unless kept; C{X-Forwarded-Host} is the host the
        front door checked (C{request.gateway_host}), never the client's.
        """
        if not identity:
            raise ValueError("empty identity; refusing to proxy")
        _check_header_text("identity", identity)
        for group in groups:
            _check_header_text("group name", group)
            if "," in group:
                raise ValueError("group name contains a comma; refusing to proxy")

        inbound: Headers = request.requestHeaders
        dropped = set(
            HOP_BY_HOP_HEADERS | _REPLACED_REQUEST_HEADERS | _IDENTITY_HEADER_BYTES
            | LOOKALIKE_TARGET_HEADERS
        )
        if not self._forward_authorization:
            dropped.add(b"authorization")
        if not self._keep_method_override:
            dropped.update(METHOD_OVERRIDE_HEADERS)
        for value in inbound.getRawHeaders(b"connection", []):
            dropped.update(normalise_header_name(n) for n in value.split(b",") if n.strip())

        out = Headers()
        for name, values in inbound.getAllRawHeaders():
            if normalise_header_name(name) not in dropped:
                out.setRawHeaders(name, list(values))

        out.setRawHeaders(b"Remote-User", [identity.encode("utf-8")])
        out.setRawHeaders(b"Remote-Groups", [",".join(groups).encode("utf-8")])

        # The client as the front door saw it (through a trusted proxy: the
        # proxy's X-Forwarded-For and -Proto, which are then kept).
        meta = request.gateway_meta
        via_proxy = request.gateway_via_proxy
        forwarded_for = [
            hop.strip()
            for value in (inbound.getRawHeaders(b"x-forwarded-for", []) if via_proxy else [])
            for hop in value.split(b",")
            if hop.strip()
        ]
        peer = getattr(request.getClientAddress(), "host", None)
        client = meta.peer_address if meta is not None else peer
        if peer:
            forwarded_for.append(peer.encode("ascii"))
        if client:
            out.setRawHeaders(b"X-Real-IP", [client.encode("ascii")])
        if forwarded_for:
            out.setRawHeaders(b"X-Forwarded-For", [b", ".join(forwarded_for)])
        secure = meta.tls if meta is not None else request.isSecure()
        out.setRawHeaders(b"X-Forwarded-Proto", [b"https" if secure else b"http"])
        # Only a host the front door checked (a --http-host name, canonical):
        # applications build absolute links (password resets) from it.
        host = request.gateway_host
        if host:
            out.setRawHeaders(b"X-Forwarded-Host", [host.encode("ascii")])
        return out

    def _body(self, request: Any) -> IBodyProducer | None:
        """
        A producer for the request body, or L{None} when there is none to
        send: an empty GET or HEAD, or an empty request that declared no body.
        """
        content: IO[bytes] | None = request.content
        length = 0
        if content is not None:
            content.seek(0, 2)
            length = content.tell()
            content.seek(0)
        if length == 0:
            framed = request.requestHeaders.hasHeader(b"content-length") or \
                request.requestHeaders.hasHeader(b"transfer-encoding")
            if request.method in _BODYLESS_METHODS or not framed or content is None:
                return None
        return FileBodyProducer(content, cooperator=self._cooperator)


@implementer(IBodyProducer)
class _Sent:
    """
    A request body that says when it has all been sent: the response
    timeout counts from then, not while a slow client is still uploading.
    """

    def __init__(self, body: IBodyProducer, sent: Any) -> None:
        self._body = body
        self._sent = sent
        self.length = body.length

    def startProducing(self, consumer: Any) -> Deferred[None]:
        return self._body.startProducing(consumer).addCallback(self._done)

    def _done(self, result: Any) -> Any:
        self._sent()
        return result

    def pauseProducing(self) -> None:
        self._body.pauseProducing()

    def resumeProducing(self) -> None:
        self._body.resumeProducing()

    def stopProducing(self) -> None:
        self._body.stopProducing()


class _Exchange:
    """
    One proxied request: waits (up to the timeout, from when the request
    has been sent) for the upstream's response head, copies it to the
    client, then streams the body.

    C{_closed} becomes true once the client response is finished or aborted,
    or the client has gone: nothing is written after that.
    """

    def __init__(self, request: Any, reactor: Any, timeout: float,
                 bad_status_log: LogRateLimiter) -> None:
        self._request = request
        self._reactor = reactor
        self._timeout = timeout
        self._bad_status_log = bad_status_log
        self._closed = False
        self._client_gone = False
        self._timed_out = False
        self._timer: IDelayedCall | None = None
        self._upstream_request: Deferred[IResponse] | None = None
        self._body_producer: IPushProducer | None = None
        # For log messages: the path only, since a query string may carry a token.
        path = (_origin_form(request.uri) or b"-").split(b"?", 1)[0]
        self._what = {"method": _text(request.method), "path": _text(path)}
        request.notifyFinish().addErrback(self._client_lost)

    def start(self, agent: IAgent, method: bytes, url: bytes, headers: Headers,
              body: IBodyProducer | None) -> None:
        """Send the request upstream and arrange for the response or the failure to be relayed."""
        if body is None:
            self._start_timer()
        else:  # the connect has its own timeout (the Agent's); the upload takes its time
            body = _Sent(body, self._start_timer)
        d = self._upstream_request = maybeDeferred(agent.request, method, url, headers, body)
        d.addCallbacks(self._got_response, self._no_response)
        d.addErrback(self._bug)

    def fail(self, code: int, message: str) -> None:
        """Answer the client with a short plain-text error, unless it is too late to."""
        self._stop_timer()
        if self._closed:
            return
        self._closed = True
        request = self._request
        status = http.RESPONSES.get(code, b"Error").decode("ascii")
        body = refusal(request, code, f"{status}: {message}")
        request.setHeader(b"Content-Length", b"%d" % len(body))
        request.write(body)
        request.finish()

    def _start_timer(self) -> None:
        if not self._closed:
            self._timer = self._reactor.callLater(self._timeout, self._time_out)

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _time_out(self) -> None:
        self._timer = None
        self._timed_out = True
        if self._upstream_request is not None:
            self._upstream_request.cancel()

    def _client_lost(self, reason: Failure) -> None:
        """The client went away before the response was finished: stop all upstream work."""
        if self._closed:
            return
        self._closed = self._client_gone = True
        self._stop_timer()
        _log.info("proxy: client went away during {method} {path}", **self._what)
        if self._upstream_request is not None:
            # Even when it has "fired" with a chained Deferred (connected, no
            # response yet): cancelling it is what closes that connection.
            self._upstream_request.cancel()
        if self._body_producer is not None:
            self._body_producer.stopProducing()

    def _no_response(self, reason: Failure) -> None:
        self._stop_timer()
        if self._client_gone:
            return
        if self._timed_out:
            _log.warn("proxy: upstream gave no response within {timeout}s to {method} {path}",
                      timeout=self._timeout, **self._what)
            self.fail(http.GATEWAY_TIMEOUT, "the upstream did not answer in time")
        else:
            _log.warn("proxy: upstream failed for {method} {path}: {reason}",
                      reason=_describe(reason), **self._what)
            self.fail(http.BAD_GATEWAY, "the upstream could not be reached")

    def _got_response(self, response: IResponse) -> None:
        self._stop_timer()
        if self._closed:
            response.deliverBody(_Discard())
            return
        if not 100 <= response.code <= 599:  # not HTTP: passed on, it would be the client's problem
            response.deliverBody(_Discard())
            self._bad_status_log.warn(
                _log, "bad-status", "proxy: upstream answered {method} {path} with status {code},"
                " not 100-599: 502 instead", code=response.code, **self._what)
            self.fail(http.BAD_GATEWAY, "the upstream sent an invalid response")
            return
        request = self._request
        request.setResponseCode(response.code, response.phrase)
        for name, values in response.headers.getAllRawHeaders():
            if name.lower() not in HOP_BY_HOP_HEADERS:
                request.responseHeaders.setRawHeaders(name, list(values))
        # The Agent keeps Content-Length out of response.headers (except for
        # HEAD, where it is copied above): restore it when known, so the
        # client gets the same framing and twisted.web does not chunk.
        if (response.length is not UNKNOWN_LENGTH and request.method != b"HEAD"
                and response.code not in _NO_BODY_CODES):
            request.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % response.length])
        # No invented Content-Type for a response the upstream sent without one.
        request.defaultContentType = None
        request.write(b"")  # the head goes out now, whatever the body does
        response.deliverBody(_BodyRelay(self))

    def _body_started(self, producer: IPushProducer) -> None:
        if self._closed:
            producer.stopProducing()
            return
        self._body_producer = producer
        self._request.registerProducer(producer, True)

    def _body_data(self, data: bytes) -> None:
        if not self._closed:
            self._request.write(data)

    def _body_ended(self, reason: Failure) -> None:
        self._body_producer = None
        if self._closed:
            return
        self._closed = True
        request = self._request
        request.unregisterProducer()
        if reason.check(ResponseDone, http.PotentialDataLoss):
            request.finish()
            return
        _log.warn("proxy: upstream response body failed for {method} {path}: {reason}",
                  reason=_describe(reason), **self._what)
        # Finishing would tell the client a truncated body is complete.
        _abort(request)

    def _bug(self, reason: Failure) -> None:
        """A fault in this module: log it, and do not leave the client hanging."""
        _log.failure("proxy: unexpected error relaying {method} {path}", reason,
                     method=self._what["method"], path=self._what["path"])
        if self._closed:
            return
        if not getattr(self._request, "startedWriting", False):
            self.fail(http.BAD_GATEWAY, "the upstream response could not be relayed")
        else:
            self._closed = True
            _abort(self._request)


class _BodyRelay(Protocol):
    """Receives the upstream response body and hands it to its L{_Exchange}."""

    def __init__(self, exchange: _Exchange) -> None:
        self._exchange = exchange

    def connectionMade(self) -> None:
        self._exchange._body_started(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self._exchange._body_data(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._exchange._body_ended(reason)


class _Discard(Protocol):
    """Takes the body of a response nobody is waiting for and drops the connection."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()


def _abort(request: Any) -> None:
    """
    Cut the client off mid-response: close the TCP connection (HTTP/1.x) or
    reset just this stream (HTTP/2), never end the response cleanly.
    """
    channel = request.channel
    if isinstance(channel, http.HTTPChannel):
        channel.transport.abortConnection()
    elif hasattr(channel, "abortConnection"):  # H2Stream: RST_STREAM
        channel.abortConnection()
    else:
        request.loseConnection()


def _text(value: bytes) -> str:
    """Bytes from the request line as text for a log message."""
    return value.decode("ascii", "backslashreplace")
