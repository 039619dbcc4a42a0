# -*- test-case-name: tests.test_web_guard -*-
"""
What an authenticated HTTP request reaches: the avatar resource tree the
realm builds for a session's AuthInfo.

- C{/whoami}: the caller's AuthInfo as JSON, exactly the seed's shape.
- C{/auth}: forward-auth for nginx C{auth_request}, Traefik ForwardAuth and
  Caddy C{forward_auth}: 200 with C{Remote-User} / C{Remote-Groups}, or 403.
- anything else: the reverse proxy to C{--http-upstream}, or 404 without one.

Access to paths is the ACL's: resource C{http/HOST/SEGMENT/...} (the host in
lower case without port, the path percent-decoded with dot segments
resolved), privilege the lower-case method (C{get}, C{post}, ...).
"""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

from twisted.web import resource, server

from gateway.aaa import IAccessPolicy
from gateway.authinfo import AuthInfo
from gateway.web.guard import HTTPSettings, _in, quote, refuse

#: The gateway's own paths; everything else goes to the upstream.
WHOAMI, AUTH = b"whoami", b"auth"


def resource_name(host: str | bytes | None, path: bytes) -> str | None:
    """
    The ACL resource of a request for C{path} (no query) on C{host}, or
    None when the host is unusable (which is a denial).
    """
    if isinstance(host, bytes):
        host = host.decode("latin-1")
    host = (host or "").strip().lower()
    if host.startswith("["):  # [v6]:port
        host = host[1 : host.find("]")] if "]" in host else ""
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    host = host.rstrip(".")
    if not host or "/" in host or not host.isprintable():
        return None
    segments: list[str] = []
    decoded = urllib.parse.unquote_to_bytes(path).decode("utf-8", "replace")
    for segment in decoded.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    return "/".join(["http", host, *segments])


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

    def avatar(self, info: AuthInfo, credentials: Any) -> resource.IResource:
        return Session(self, info, credentials)

    def allowed(self, session: Session, host: Any, path: bytes, method: bytes) -> bool:
        name = resource_name(host, path)
        privilege = method.decode("latin-1").lower()
        return name is not None and self.policy.query_resource_access(session.info, name, privilege)


def forbid(request: server.Request, session: Session) -> bytes:
    """403; a Bearer caller is also told C{insufficient_scope} (RFC 6750 3.1)."""
    challenges = []
    if getattr(session.credentials, "mechanism", None) == "Bearer":
        realm = quote(session.app.settings.realm)
        challenges.append(f'Bearer realm={realm}, error="insufficient_scope"')
    refuse(request, 403, "Forbidden", challenges)
    return b"Forbidden\n"


def too_large(request: server.Request, session: Session) -> bool:
    """Answer 413 when the body is above the limit for the gateway's own resources."""
    content = request.content
    if content is None:
        return False
    size = content.seek(0, 2)
    content.seek(0)
    if size <= session.app.settings.max_body:
        return False
    refuse(request, 413, "Request body too large")
    request.write(b"Request body too large\n")
    request.finish()
    return True


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

    def render(self, request: server.Request) -> Any:
        return Upstream(self).render(request)


class Whoami(resource.Resource):
    """C{GET /whoami}: the caller's AuthInfo."""

    isLeaf = True

    def __init__(self, session: Session) -> None:
        super().__init__()
        self.session = session

    def render_GET(self, request: server.Request) -> Any:
        if too_large(request, self.session):
            return server.NOT_DONE_YET
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(self.session.info.to_json_dict()).encode() + b"\n"

    render_HEAD = render_GET


class ForwardAuth(resource.Resource):
    """
    C{/auth}: is the original request allowed? Its method, host and path
    come from C{X-Original-URL} / C{X-Original-Method} (nginx) or
    C{X-Forwarded-Method/Host/Uri} (Traefik, Caddy), believed only from a
    C{--http-trusted-proxy}; otherwise the request to C{/auth} itself is
    what gets checked.
    """

    isLeaf = True

    def __init__(self, session: Session) -> None:
        super().__init__()
        self.session = session

    def render(self, request: server.Request) -> Any:
        session = self.session
        if too_large(request, session):
            return server.NOT_DONE_YET
        try:
            method, host, path = self.target(request)
        except ValueError as e:
            refuse(request, 400, f"Bad forwarded request: {e}")
            return f"Bad forwarded request: {e}\n".encode()
        if not session.app.allowed(session, host, path, method):
            return forbid(request, session)
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"remote-user", identity_name(session.info, session.credentials).encode())
        request.setHeader(b"remote-groups", ",".join(session.info.groups).encode())
        return b""

    def target(self, request: server.Request) -> tuple[bytes, Any, bytes]:
        """
        (method, host, path) of the request being authorised.

        @raise ValueError: a trusted proxy sent an unusable URL.
        """
        peer = getattr(request.getClientAddress(), "host", None)
        own = (request.method, request.getHeader(b"host"), request.path)
        if not _in(peer, self.session.app.settings.trusted_proxies):
            return own
        headers = request.requestHeaders

        def one(name: bytes) -> bytes | None:
            values = headers.getRawHeaders(name)
            return values[-1].strip() if values else None

        method = one(b"x-original-method") or one(b"x-forwarded-method") or b"GET"
        url = one(b"x-original-url")
        if url is not None:
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in (b"http", b"https") or not parts.netloc:
                raise ValueError("X-Original-URL is not an absolute http(s) URL")
            return method, parts.netloc.rpartition(b"@")[2], parts.path or b"/"
        host = one(b"x-forwarded-host")
        uri = one(b"x-forwarded-uri")
        if host is None and uri is None:
            return own
        path = urllib.parse.urlsplit(uri or b"/").path or b"/"
        return method, host or request.getHeader(b"host"), path


class Upstream(resource.Resource):
    """Every other path: the ACL, then the reverse proxy (404 without one)."""

    isLeaf = True

    def __init__(self, session: Session) -> None:
        super().__init__()
        self.session = session

    def render(self, request: server.Request) -> Any:
        session = self.session
        proxy = session.app.proxy
        if proxy is None:
            refuse(request, 404, "Not found")
            return b"Not found\n"
        if not session.app.allowed(session, request.getHeader(b"host"), request.path, request.method):
            return forbid(request, session)
        name = identity_name(session.info, session.credentials)
        return proxy.render(request, name, session.info.groups)
