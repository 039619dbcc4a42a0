# -*- test-case-name: tests.test_web_guard -*-
"""
What an authenticated HTTP request reaches: the avatar resource tree the
realm builds for a session's AuthInfo.

- C{/whoami}: the caller's AuthInfo as JSON, exactly the seed's shape.
- C{/auth}: forward-auth for nginx C{auth_request}, Traefik ForwardAuth and
  Caddy C{forward_auth}: 200 with C{Remote-User} / C{Remote-Groups}, or 403.
- C{POST /api/inject/v1}: the injection API (L{gateway.web.inject}).
- anything else: the reverse proxy to C{--http-upstream}, or 404 without one.

Access to paths is the ACL's: resource C{http/HOST/SEGMENT/...}, privilege
the lower-case method (C{get}, C{post}, ...) and any method override. The
path is percent-decoded, its dot segments resolved and (unless
C{--http-case-sensitive-paths}) lower-cased, and the proxy forwards exactly
the segments the ACL saw; a target the two could read differently (an
encoded C{/} or C{\\}, a C{;} path parameter, a fragment, a segment
L{check_segment} refuses: a control, a final dot, a letter another server
folds to ASCII) is refused with 400. HOST is canonical
(L{gateway.meta.parse_host}), read strictly from C{X-Original-URL},
C{X-Forwarded-Host} or Host (anything ambiguous: 400).
For C{/auth} it is the forwarded host, which must be one C{--http-host}
lists when any is (else 403); for the reverse proxy it is the request's
Host when C{--http-host} lists it (another Host gets 421), else the
upstream's host name: with one upstream, a client-chosen Host must not pick
the rules.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
import urllib.parse
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.logger import Logger
from twisted.web import resource, server

from gateway.acl import IAccessPolicy, ask
from gateway.addresses import (
    BadHost,
    canonical_host,
    compatible_with_ascii,
    folds_to_ascii,
    split_authority,
)
from gateway.authinfo import AuthInfo
from gateway.web.messages import header, quoted_string, refusal
from gateway.web.proxy import (
    LOOKALIKE_TARGET_HEADERS,
    METHOD_OVERRIDE_HEADERS,
    normalise_header_name,
)
from gateway.web.settings import HTTPSettings

if TYPE_CHECKING:
    from gateway.web.server import GatewayRequest

log = Logger()

#: The gateway's own paths; everything else goes to the upstream.
WHOAMI, AUTH = b"whoami", b"auth"

#: Forward-auth target headers of each convention.
_NGINX = (b"x-original-url", b"x-original-method")
_TRAEFIK = (b"x-forwarded-uri", b"x-forwarded-method", b"x-forwarded-host")

#: In a path: encoded separators, backslashes and path parameters, which
#: upstreams read in ways the ACL cannot follow.
_AMBIGUOUS = re.compile(rb"%2f|%5c|\\|;", re.IGNORECASE)
#: Default-ignorable characters that C{str.isprintable} lets through (a
#: combining grapheme joiner, Hangul fillers, variation selectors): invisible,
#: and dropped by NFKC_Casefold.
_INVISIBLE = re.compile(
    "[\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180f\u3164\ufe00-\ufe0f\uffa0"
    "\U000e0100-\U000e01ef]"
)
#: An HTTP method (RFC 9110 token).
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,32}")


class BadTarget(ValueError):
    """A request target the gateway will not route (400)."""


@attrs.frozen
class Target:
    """A request target as the ACL sees it and as the upstream will get it."""

    segments: tuple[str, ...]
    #: Origin form (path and query) with the dot segments resolved.
    forwarded: bytes


def check_segment(segment: str, case_sensitive: bool = False) -> None:
    """
    Refuse a decoded path segment that some upstream reads as another one:
    a control or invisible character (C{/admin%00}, C{%0a}, U+00A0, U+200B:
    not C{str.isprintable}), a final C{.} or blank (IIS and Windows drop
    them: C{/admin.} is C{/admin}), an NTFS stream (C{::$DATA}), a
    character whose compatibility form holds ASCII (fullwidth letters,
    U+FF0F), and, unless C{case_sensitive}, a character that a case mapping
    turns into an ASCII letter (L{gateway.meta.folds_to_ascii}: C{admın} is
    C{ADMIN} to Java).

    @raise BadTarget: naming the rule, not the segment.
    """
    if not segment.isprintable() or _INVISIBLE.search(segment):
        raise BadTarget("a control or invisible character in the path")
    if segment.endswith((".", " ")):
        raise BadTarget("a path segment ending in '.' or a blank")
    if ":$" in segment:  # NTFS streams: IIS serves admin.aspx::$DATA as admin.aspx's source
        raise BadTarget("an NTFS stream name (':$') in the path")
    if segment.isascii():
        return
    if any(compatible_with_ascii(c) for c in segment):
        raise BadTarget("a character in the path that normalisation (NFKC) makes ASCII")
    if not case_sensitive and any(folds_to_ascii(c) for c in segment):
        raise BadTarget("a character in the path that a case mapping makes an ASCII letter")


#: Targets and hosts read recently: the reading depends on nothing else, and
#: a client's requests repeat theirs (what a refusal raises is not kept).
_RECENT = 256


@functools.lru_cache(maxsize=_RECENT)
def parse_target(target: bytes, case_sensitive: bool = False, literal: bool = False) -> Target:
    """
    An origin-form target (C{/path?query}), its dot segments resolved, each
    segment acceptable to L{check_segment}.

    @param literal: the path is forwarded by someone else exactly as written
        (forward-auth: nginx's C{proxy_pass} sends C{$request_uri} as the
        client wrote it), so nothing may be resolved: a C{.} or C{..} segment,
        plain or percent-encoded, or an empty one inside the path is refused
        (C{/admin/../app} would be checked as C{/app} and reach C{/admin}).
    @raise BadTarget: not origin form, a fragment, or an ambiguous path
        (an encoded separator, a path parameter, bytes that are not UTF-8,
        a segment L{check_segment} refuses).
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
    parts = path.split(b"/")[1:]
    for index, part in enumerate(parts):
        try:
            decoded = urllib.parse.unquote_to_bytes(part).decode("utf-8")
        except UnicodeDecodeError:  # "%ff" and "%fe" would both read as U+FFFD
            raise BadTarget("a path that is not UTF-8 once percent-decoded") from None
        if literal and (decoded in (".", "..") or (not decoded and index < len(parts) - 1)):
            raise BadTarget("a '.', '..' or empty segment in a path forwarded as written")
        if decoded in ("", "."):
            continue
        if decoded == "..":
            if raw:
                raw.pop()
                segments.pop()
            continue
        check_segment(decoded, case_sensitive)
        raw.append(part)
        segments.append(decoded)
    trailing = b"/" if path.endswith((b"/", b"/.", b"/..")) and raw else b""
    forwarded = b"/" + b"/".join(raw) + trailing + (question + query)
    return Target(tuple(segments), forwarded)


def parse_original_url(url: bytes, case_sensitive: bool = False) -> tuple[str, Target]:
    """
    The host and target of an absolute C{http(s)://} URL (RFC 3986), read
    strictly: printable ASCII only, no backslash, no userinfo, a canonical
    host (L{gateway.meta.parse_host}), a port of digits only, and a path
    right after the authority. C{http://host?/admin} is a URL whose path is
    empty and whose query is C{/admin}; parsers disagree on such URLs, so it
    is refused like every other ambiguity.

    @raise BadTarget: anything else.
    """
    if not all(0x21 <= b < 0x7F for b in url):
        raise BadTarget("a blank, control or non-ASCII byte in the URL")
    if b"\\" in url:
        raise BadTarget("a backslash in the URL")
    if b"#" in url:
        raise BadTarget("a fragment in the URL")
    scheme, sep, rest = url.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        raise BadTarget("not an absolute http(s) URL")
    cut = len(rest)
    for delimiter in (b"/", b"?"):
        found = rest.find(delimiter)
        if found >= 0:
            cut = min(cut, found)
    authority, origin = rest[:cut], rest[cut:]
    if not origin.startswith(b"/"):
        raise BadTarget("no path after the URL's authority")
    try:
        host, _ = split_authority(authority)
    except BadHost as e:
        raise BadTarget(f"URL host: {e}") from None
    return host, parse_target(origin, case_sensitive, literal=True)


@functools.lru_cache(maxsize=_RECENT)
def forwarded_host(value: bytes | None) -> str:
    """
    The canonical host of a C{Host} or C{X-Forwarded-Host} value (port dropped).

    @raise BadTarget: missing, a list, or not a host.
    """
    if value is None:
        raise BadTarget("no host")
    try:
        return split_authority(value)[0]
    except BadHost as e:
        raise BadTarget(f"host: {e}") from None


def resource_name(host: str | None, target: Target, case_sensitive: bool = False) -> str | None:
    """
    The ACL resource of C{target} on the canonical C{host}, or None when
    there is no host (which is a denial). Unless C{case_sensitive}, the path
    is folded (L{fold_case}): upstreams that route without regard to case
    (Express by default, IIS) must not reach C{/ADMIN} where C{/admin} is
    denied.
    """
    if host is None:
        return None
    fold = compose if case_sensitive else fold_case
    segments = [fold(s) for s in target.segments]
    return "/".join(["http", host, *segments])


def fold_case(text: str) -> str:
    """
    C{text} in lower case the way per-character case-insensitive comparisons
    see it (Java's C{equalsIgnoreCase} compares upper case, then lower case):
    C{ς}, C{σ} and C{Σ} are one letter, as are C{ϐ} and C{β}; then NFC
    (L{compose}).
    """
    return compose(text.upper().lower())


def compose(text: str) -> str:
    """
    C{text} in NFC: C{café} written with a combining accent (as macOS file
    systems store it) names what C{café} names, so a rule for one covers both.
    """
    return unicodedata.normalize("NFC", text)


def check_acl_keys(policy: Any, case_sensitive: bool = False) -> None:
    """
    Refuse C{http/...} ACL keys that could never match: a host that is not
    in canonical form (C{App.Test}, C{bücher.test} for C{xn--bcher-kva.test},
    C{::1} for C{[::1]}), a path segment L{check_segment} refuses in
    requests (C{admin.}, C{admın}), or, with paths matched in lower case
    (the default), a path with upper case in it.

    @raise ValueError: naming the first such key.
    """
    for key in getattr(policy, "acl", {}):
        if key != "http" and not key.startswith("http/"):
            continue
        host = key.split("/")[1] if "/" in key else "*"
        if host != "*" and canonical_host(host) != host:
            canonical = canonical_host(host)
            hint = f"write {canonical!r}" if canonical else "not a host name or IP literal"
            raise ValueError(f"{key!r}: the host is not in canonical form ({hint})")
        for segment in key.split("/")[2:]:
            try:
                check_segment(segment, case_sensitive)
            except BadTarget as e:
                raise ValueError(f"{key!r}: no request reaches it ({e})") from None
        if key != compose(key):
            raise ValueError(f"{key!r}: HTTP paths are matched in NFC; write the key in NFC")
        if not case_sensitive and key != fold_case(key):
            raise ValueError(
                f"{key!r}: HTTP paths are matched in lower case; write the key in lower case"
                " (or give --http-case-sensitive-paths)"
            )


def method_overrides(request: server.Request) -> list[bytes]:
    """
    The methods a request asks its upstream to use instead of its own
    (C{X-HTTP-Method-Override} and kin, under any spelling).

    @raise BadTarget: a value that is not a method token.
    """
    methods = []
    for name, values in request.requestHeaders.getAllRawHeaders():
        if normalise_header_name(name) in METHOD_OVERRIDE_HEADERS:
            for value in values:
                for method in value.split(b","):
                    method = method.strip()
                    if not _TOKEN.fullmatch(method):
                        raise BadTarget("a method override that is not a method")
                    methods.append(method)
    return methods


def upstream_host(url: str) -> str | None:
    """The canonical host of an upstream URL, None when it has none (C{my_app})."""
    name = urllib.parse.urlsplit(url).hostname or ""
    return canonical_host(f"[{name}]" if ":" in name else name)


def identity_name(info: AuthInfo, credentials: Any) -> str:
    """The name for C{Remote-User}: the identity proved by these credentials."""
    context = getattr(credentials, "context", None)
    name = info.identity_for(context) if context is not None else None
    return name or info.identities[0].identity


class WebApp:
    """The HTTP front door's shared parts; its L{avatar} is the realm's C{IResource}."""

    def __init__(
        self, policy: IAccessPolicy, settings: HTTPSettings, proxy: Any = None, inject: Any = None
    ) -> None:
        self.policy = policy
        self.settings = settings
        self.proxy = proxy
        #: The injection API (L{gateway.web.inject.InjectAPI}), or None.
        self.inject = inject
        self.upstream_host = upstream_host(settings.upstream) if settings.upstream else None
        if settings.trusted_proxies and not settings.hosts:
            log.warn(
                "HTTP: --http-trusted-proxy without --http-host: /auth checks whatever host"
                " the proxy forwards; list the hosts it serves with --http-host"
            )

    def avatar(self, info: AuthInfo, credentials: Any) -> resource.IResource:
        return Session(self, info, credentials)

    def served(self, host: str) -> bool:
        """Whether C{host} (canonical) is one C{--http-host} lists, or none is listed."""
        return not self.settings.hosts or host in self.settings.hosts

    def allowed(
        self, session: Session, host: str | None, target: Target, methods: Iterable[bytes]
    ) -> bool:
        """Whether the ACL grants every one of C{methods} on C{target} at C{host}."""
        resource = resource_name(host, target, self.settings.case_sensitive_paths)
        if resource is None:
            return False
        return all(
            ask(self.policy, session.info, resource, m.decode("latin-1").lower(), session.meta)
            for m in methods
        )


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

    @property
    def meta(self) -> Any:
        """The request's ConnectionMeta (its credentials'), for the policy's events."""
        return getattr(self.credentials, "conn_meta", None)

    def getChild(self, name: bytes, request: server.Request) -> resource.IResource:
        inject = self.app.inject
        if inject is not None and request.path == inject.path:  # exactly, as written
            return inject.resource(self)
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
    C{--http-trusted-proxy}, which must send every header of one convention
    (else 400: a missing method is not a GET, a missing URI not C{/}). Both
    conventions at once is a 400 (a client can add the one its proxy does
    not set); either from another peer is a 403. Only a peer that is not a
    trusted proxy may ask about its own request to C{/auth}. Another
    proxy's target headers (L{LOOKALIKE_TARGET_HEADERS}) are a 400 from
    anyone: the gateway would check something else than they say.
    """

    def render(self, request: server.Request) -> bytes:
        session = self.session
        if too_large(request, session):
            return refusal(request, 413, "Request body too large")
        try:
            method, host, target = self.target(request)
            # nginx and Traefik pass the client's headers to /auth, and the
            # upstream may obey an override: the ACL must grant it as well.
            methods = [method, *method_overrides(request)]
        except BadTarget as e:
            return refusal(request, 400, f"Bad forwarded request: {e}")
        except PermissionError:
            return refusal(request, 403, "Forwarded request from an untrusted peer")
        if not session.app.served(host):
            return refusal(request, 403, "Forwarded host not served here")
        if not session.app.allowed(session, host, target, methods):
            return forbid(request, session)
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"remote-user", identity_name(session.info, session.credentials).encode())
        request.setHeader(b"remote-groups", ",".join(session.info.groups).encode())
        return b""

    def target(self, request: GatewayRequest) -> tuple[bytes, str, Target]:
        """
        (method, canonical host, target) of the request being authorised.

        @raise BadTarget: unusable or contradictory forwarded headers.
        @raise PermissionError: forwarded headers from an untrusted peer.
        """
        headers = request.requestHeaders
        lookalikes = sorted({
            normalised.decode("ascii") for normalised in map(
                normalise_header_name, (name for name, _ in headers.getAllRawHeaders())
            ) if normalised in LOOKALIKE_TARGET_HEADERS
        })
        if lookalikes:
            raise BadTarget(
                f"{', '.join(lookalikes)} not read here: send X-Original-URL and"
                " X-Original-Method, or X-Forwarded-Method, -Host and -Uri"
            )
        nginx = any(headers.hasHeader(name) for name in _NGINX)
        traefik = any(headers.hasHeader(name) for name in _TRAEFIK)
        case_sensitive = self.session.app.settings.case_sensitive_paths
        try:
            if not (nginx or traefik):
                if request.gateway_via_proxy:  # never the request to /auth itself
                    raise BadTarget(
                        "no X-Original-URL and X-Original-Method, nor X-Forwarded-Method,"
                        " -Host and -Uri from the proxy"
                    )
                host = forwarded_host(header(request, b"host", once=True))
                return request.method, host, parse_target(request.uri, case_sensitive)
            if not request.gateway_via_proxy:
                raise PermissionError()
            if nginx and traefik:
                raise BadTarget("both X-Original-* and X-Forwarded-Method/Host/Uri")
            if nginx:
                return self._nginx(request, case_sensitive)
            return self._traefik(request, case_sensitive)
        except BadTarget:
            raise
        except ValueError as e:  # a header sent twice
            raise BadTarget(str(e)) from None

    @staticmethod
    def _required(request: server.Request, name: bytes) -> bytes:
        """The one value of a forwarded header the convention requires."""
        value = header(request, name, once=True)
        if not value:  # missing or empty: never a default (GET, /, the Host)
            raise BadTarget(f"no {name.decode()} from the proxy")
        return value

    @classmethod
    def _method(cls, request: server.Request, name: bytes) -> bytes:
        method = cls._required(request, name)
        if not _TOKEN.fullmatch(method):
            raise BadTarget(f"{name.decode()} is not a method")
        return method

    @classmethod
    def _nginx(cls, request: server.Request, case_sensitive: bool) -> tuple[bytes, str, Target]:
        host, target = parse_original_url(cls._required(request, b"x-original-url"), case_sensitive)
        return cls._method(request, b"x-original-method"), host, target

    @classmethod
    def _traefik(cls, request: server.Request, case_sensitive: bool) -> tuple[bytes, str, Target]:
        method = cls._method(request, b"x-forwarded-method")
        host = forwarded_host(cls._required(request, b"x-forwarded-host"))
        uri = cls._required(request, b"x-forwarded-uri")
        return method, host, parse_target(uri, case_sensitive, literal=True)


class Upstream(_Leaf):
    """Every other path: the ACL, then the reverse proxy (404 without one)."""

    def render(self, request: GatewayRequest) -> Any:
        session = self.session
        app = session.app
        if app.proxy is None:
            return refusal(request, 404, "Not found")
        try:
            target = parse_target(request.uri, app.settings.case_sensitive_paths)
        except BadTarget as e:
            return refusal(request, 400, f"Bad request: {e}")
        if app.settings.hosts:
            try:
                host = forwarded_host(header(request, b"host", once=True))
            except ValueError as e:  # BadTarget too
                return refusal(request, 400, f"Bad request: {e}")
            if not app.served(host):
                return refusal(request, 421, "Misdirected request: not a host served here")
            request.gateway_host = host  # the upstream's X-Forwarded-Host
        else:
            host = app.upstream_host
        methods = [request.method]
        if app.settings.keep_method_override:
            try:
                methods += method_overrides(request)
            except BadTarget as e:
                return refusal(request, 400, f"Bad request: {e}")
        if not app.allowed(session, host, target, methods):
            return forbid(request, session)
        name = identity_name(session.info, session.credentials)
        upload = request.gateway_upload  # a body still arriving
        return app.proxy.render(request, name, session.info.groups, target.forwarded, upload)
