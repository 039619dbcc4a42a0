# -*- test-case-name: tests.test_web_guard -*-
"""
What an authenticated HTTP request reaches: the avatar resource tree the
realm builds for a session's AuthInfo.

- C{/whoami}: the caller's AuthInfo as JSON, exactly the seed's shape.
- C{/auth}: forward-auth for nginx C{auth_request}, Traefik ForwardAuth and
  Caddy C{forward_auth}: 200 with C{Remote-User} / C{Remote-Groups}, or 403.
- anything else: the reverse proxy to C{--http-upstream}, or 404 without one.

Access to paths is the ACL's: resource C{http/HOST/SEGMENT/...}, privilege
the lower-case method (C{get}, C{post}, ...). The path is percent-decoded
and its dot segments resolved, and the proxy forwards exactly the segments
the ACL saw; a target the two could read differently (an encoded C{/} or
C{\\}, a C{;} path parameter, a fragment) is refused with 400. HOST is the
forwarded host for C{/auth}; for the reverse proxy it is the request's Host
when C{--http-host} lists it (another Host gets 421), else the upstream's
host name: with one upstream, a client-chosen Host must not pick the rules.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from typing import Any

import attrs
from twisted.web import resource, server

from gateway.aaa import IAccessPolicy
from gateway.authinfo import AuthInfo
from gateway.web.guard import HTTPSettings, header, quoted_string, refusal

#: The gateway's own paths; everything else goes to the upstream.
WHOAMI, AUTH = b"whoami", b"auth"

#: Forward-auth target headers of each convention.
_NGINX = (b"x-original-url", b"x-original-method")
_TRAEFIK = (b"x-forwarded-uri", b"x-forwarded-method", b"x-forwarded-host")

#: In a path: encoded separators, backslashes and path parameters, which
#: upstreams read in ways the ACL cannot follow.
_AMBIGUOUS = re.compile(rb"%2f|%5c|\\|;", re.IGNORECASE)


class BadTarget(ValueError):
    """A request target the gateway will not route (400)."""


@attrs.frozen
class Target:
    """A request target as the ACL sees it and as the upstream will get it."""

    segments: tuple[str, ...]
    #: Origin form (path and query) with the dot segments resolved.
    forwarded: bytes


def parse_target(target: bytes) -> Target:
    """
    An origin-form target (C{/path?query}), its dot segments resolved.

    @raise BadTarget: not origin form, a fragment, or an ambiguous path.
    """
    if not target.startswith(b"/") or target.startswith(b"//"):
        raise BadTarget("the request target must be a path")
    if b"#" in target:
        raise BadTarget("a fragment in the request target")
    path, question, query = target.partition(b"?")
    if _AMBIGUOUS.search(path):
        raise BadTarget("an encoded '/' or '\\', or a ';' in the path")
    raw: list[bytes] = []
    segments: list[str] = []
    for part in path.split(b"/")[1:]:
        decoded = urllib.parse.unquote_to_bytes(part).decode("utf-8", "replace")
        if decoded in ("", "."):
            continue
        if decoded == "..":
            if raw:
                raw.pop()
                segments.pop()
            continue
        raw.append(part)
        segments.append(decoded)
    trailing = b"/" if path.endswith((b"/", b"/.", b"/..")) and raw else b""
    forwarded = b"/" + b"/".join(raw) + trailing + (question + query)
    return Target(tuple(segments), forwarded)


def canonical_host(host: str | bytes | None) -> str | None:
    """A Host value in lower case without port or final dot, or None when unusable."""
    if isinstance(host, bytes):
        host = host.decode("latin-1")
    host = (host or "").strip().lower()
    if host.startswith("["):  # [v6]:port
        host = host[1 : host.find("]")] if "]" in host else ""
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    host = host.rstrip(".")
    if not host or "/" in host or not host.isprintable() or " " in host:
        return None
    return host


def resource_name(host: str | bytes | None, target: Target) -> str | None:
    """
    The ACL resource of C{target} on C{host}, or None when the host is
    unusable (which is a denial).
    """
    name = canonical_host(host)
    if name is None:
        return None
    return "/".join(["http", name, *target.segments])


def identity_name(info: AuthInfo, credentials: Any) -> str:
    """The name for C{Remote-User}: the identity proved by these credentials."""
    context = getattr(credentials, "context", None)
    name = info.identity_for(context) if context is not None else None
    return name or info.identities[0].identity


class WebApp:
    """The HTTP front door's shared parts; its L{avatar} is the realm's C{IResource}."""

    def __init__(self, policy: IAccessPolicy, settings: HTTPSettings, proxy: Any = None) -> None:
        self.policy = policy
        self.settings = settings
        self.proxy = proxy
        upstream = urllib.parse.urlsplit(settings.upstream) if settings.upstream else None
        self.upstream_host = canonical_host(upstream.hostname) if upstream else None

    def avatar(self, info: AuthInfo, credentials: Any) -> resource.IResource:
        return Session(self, info, credentials)

    def allowed(self, session: Session, host: Any, target: Target, method: bytes) -> bool:
        resource = resource_name(host, target)
        if resource is None:
            return False
        privilege = method.decode("latin-1").lower()
        return self.policy.query_resource_access(session.info, resource, privilege)


def forbid(request: server.Request, session: Session) -> bytes:
    """403; a Bearer caller is also told C{insufficient_scope} (RFC 6750 3.1)."""
    challenges = []
    if getattr(session.credentials, "mechanism", None) == "Bearer":
        realm = quoted_string(session.app.settings.realm)
        challenges.append(f'Bearer realm={realm}, error="insufficient_scope"')
    return refusal(request, 403, "Forbidden", challenges)


def too_large(request: server.Request, session: Session) -> bool:
    """Whether the body is above the limit for the gateway's own resources."""
    content = request.content
    if content is None:
        return False
    size = content.seek(0, 2)
    content.seek(0)
    return size > session.app.settings.max_body


class Session(resource.Resource):
    """The avatar: one authenticated request's view of the gateway."""

    def __init__(self, app: WebApp, info: AuthInfo, credentials: Any) -> None:
        super().__init__()
        self.app = app
        self.info = info
        self.credentials = credentials

    @property
    def auth_info(self) -> AuthInfo:  # what the realm's login event logs
        return self.info

    def getChild(self, name: bytes, request: server.Request) -> resource.IResource:
        if not request.postpath:
            if name == WHOAMI:
                return Whoami(self)
            if name == AUTH:
                return ForwardAuth(self)
        return Upstream(self)


class _Leaf(resource.Resource):
    isLeaf = True

    def __init__(self, session: Session) -> None:
        super().__init__()
        self.session = session


class Whoami(_Leaf):
    """C{GET /whoami}: the caller's AuthInfo."""

    def render(self, request: server.Request) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            return refusal(request, 405, "Method not allowed", headers=[(b"allow", b"GET, HEAD")])
        if too_large(request, self.session):
            return refusal(request, 413, "Request body too large")
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(self.session.info.to_json_dict()).encode() + b"\n"


class ForwardAuth(_Leaf):
    """
    C{/auth}: is the original request allowed? Its method, host and path
    come from C{X-Original-URL} / C{X-Original-Method} (nginx) or
    C{X-Forwarded-Method/Host/Uri} (Traefik, Caddy), believed only from a
    C{--http-trusted-proxy}. Both conventions at once is a 400 (a client can
    add the one its proxy does not set); either from another peer is a 403.
    Without them the request to C{/auth} itself is checked.
    """

    def render(self, request: server.Request) -> bytes:
        session = self.session
        if too_large(request, session):
            return refusal(request, 413, "Request body too large")
        try:
            method, host, target = self.target(request)
        except BadTarget as e:
            return refusal(request, 400, f"Bad forwarded request: {e}")
        except PermissionError:
            return refusal(request, 403, "Forwarded request from an untrusted peer")
        if not session.app.allowed(session, host, target, method):
            return forbid(request, session)
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"remote-user", identity_name(session.info, session.credentials).encode())
        request.setHeader(b"remote-groups", ",".join(session.info.groups).encode())
        return b""

    def target(self, request: server.Request) -> tuple[bytes, Any, Target]:
        """
        (method, host, target) of the request being authorised.

        @raise BadTarget: unusable or contradictory forwarded headers.
        @raise PermissionError: forwarded headers from an untrusted peer.
        """
        headers = request.requestHeaders
        nginx = any(headers.hasHeader(name) for name in _NGINX)
        traefik = any(headers.hasHeader(name) for name in _TRAEFIK)
        if not (nginx or traefik):
            return request.method, header(request, b"host"), parse_target(request.uri)
        if not request.gateway_via_proxy:
            raise PermissionError()
        if nginx and traefik:
            raise BadTarget("both X-Original-* and X-Forwarded-Method/Host/Uri")
        try:
            if nginx:
                return self._nginx(request)
            return self._traefik(request)
        except ValueError as e:  # also a header sent twice
            raise BadTarget(str(e)) from None

    @staticmethod
    def _nginx(request: server.Request) -> tuple[bytes, Any, Target]:
        url = header(request, b"x-original-url", once=True)
        if url is None:
            raise BadTarget("X-Original-Method without X-Original-URL")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() not in (b"http", b"https") or not parts.netloc or b"@" in parts.netloc:
            raise BadTarget("X-Original-URL is not an absolute http(s) URL")
        if parts.fragment or url.endswith(b"#"):
            raise BadTarget("a fragment in X-Original-URL")
        origin = (parts.path or b"/") + (b"?" + parts.query if parts.query else b"")
        method = header(request, b"x-original-method", once=True) or b"GET"
        return method, parts.netloc, parse_target(origin)

    @staticmethod
    def _traefik(request: server.Request) -> tuple[bytes, Any, Target]:
        method = header(request, b"x-forwarded-method", once=True) or b"GET"
        host = header(request, b"x-forwarded-host", once=True) or header(request, b"host")
        uri = header(request, b"x-forwarded-uri", once=True) or b"/"
        return method, host, parse_target(uri)


class Upstream(_Leaf):
    """Every other path: the ACL, then the reverse proxy (404 without one)."""

    def render(self, request: server.Request) -> Any:
        session = self.session
        app = session.app
        if app.proxy is None:
            return refusal(request, 404, "Not found")
        try:
            target = parse_target(request.uri)
        except BadTarget as e:
            return refusal(request, 400, f"Bad request: {e}")
        if app.settings.hosts:
            host = canonical_host(header(request, b"host"))
            if host not in app.settings.hosts:
                return refusal(request, 421, "Misdirected request: not a host served here")
        else:
            host = app.upstream_host
        if not app.allowed(session, host, target, request.method):
            return forbid(request, session)
        name = identity_name(session.info, session.credentials)
        upload = getattr(request, "gateway_upload", None)  # a body still arriving
        return app.proxy.render(request, name, session.info.groups, target.forwarded, upload)
