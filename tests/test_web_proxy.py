"""
Tests for L{gateway.web.proxy}.

Unit tests drive a real twisted.web L{Site} over a L{StringTransport} (so
framing, HEAD and chunking are twisted.web's real behaviour) with a fake
L{IAgent} standing in for the upstream.  Loopback tests run a real upstream
Site, the proxy behind a real Site, and a real client.
"""

from __future__ import annotations

import hashlib
import json
import os

import attrs
import treq
from twisted.internet import defer, error, reactor, ssl, task
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web import http
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import directlyProvides, implementer

from gateway.meta import ConnectionMeta
from gateway.twistedinternals import buffered
from gateway.web.proxy import (
    IDENTITY_HEADERS,
    METHOD_OVERRIDE_HEADERS,
    UpstreamProxy,
    _origin_form,
    normalise_header_name,
)

SECRET = b"Basic ZGFuaWVsOnRpZ2Vy"


# --- doubles ---------------------------------------------------------------------------


class FakeProducer:
    """The upstream connection as the body protocol sees it: records pause/resume/stop."""

    def __init__(self):
        self.paused = False
        self.stopped = False

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False

    def stopProducing(self):
        self.stopped = True


@implementer(IResponse)
class FakeResponse:
    """A response head the test builds, whose body the test delivers piece by piece."""

    version = (b"HTTP", 1, 1)
    request = None
    previousResponse = None

    def __init__(self, code=200, phrase=b"OK", headers=None, length=UNKNOWN_LENGTH):
        self.code = code
        self.phrase = phrase
        self.headers = Headers(headers or {})
        self.length = length
        self.transport = FakeProducer()
        self.protocol = None

    def deliverBody(self, protocol):
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def setPreviousResponse(self, response):
        self.previousResponse = response

    def send(self, data):
        self.protocol.dataReceived(data)

    def finish(self):
        self.protocol.connectionLost(Failure(ResponseDone()))

    def fail(self, exception):
        self.protocol.connectionLost(Failure(exception))


@attrs.define
class UpstreamCall:
    method: bytes
    uri: bytes
    headers: Headers
    body: object
    deferred: defer.Deferred = None
    cancelled: bool = False

    def header(self, name):
        return self.headers.getRawHeaders(name)


@implementer(IAgent)
class FakeAgent:
    """Records each request; the test fires the returned Deferred."""

    def __init__(self):
        self.calls = []

    def request(self, method, uri, headers=None, bodyProducer=None):
        call = UpstreamCall(method, uri, headers, bodyProducer)

        def cancel(d):
            call.cancelled = True

        call.deferred = defer.Deferred(cancel)
        self.calls.append(call)
        return call.deferred


class ProxyResource(Resource):
    """What the front door does once a request is authorised: hand it to the proxy."""

    isLeaf = True

    def __init__(self, proxy, identity="daniel", groups=("staff",), meta=None, host=None):
        super().__init__()
        self.proxy = proxy
        self.identity = identity
        self.groups = list(groups)
        self.meta = meta  # as the guard sets it: the client seen through a trusted proxy
        self.host = host  # as the guard sets it: a --http-host name the ACL used

    def render(self, request):
        # What the guard and the Upstream resource note on a GatewayRequest
        # (this plain Site's requests have none of its declared defaults).
        request.gateway_meta, request.gateway_via_proxy = self.meta, self.meta is not None
        request.gateway_host = self.host
        return self.proxy.render(request, self.identity, self.groups)


def raw_request(method=b"GET", target=b"/", headers=(), body=b"", version=b"HTTP/1.1"):
    lines = [method + b" " + target + b" " + version, b"Host: gateway.test"]
    lines += [name + b": " + value for name, value in headers]
    if body:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@attrs.frozen
class ParsedResponse:
    status: bytes
    headers: Headers
    body: bytes
    complete: bool

    @property
    def code(self):
        return int(self.status.split(b" ")[1])

    def header(self, name):
        return self.headers.getRawHeaders(name)


def parse_response(raw):
    """Split one HTTP/1.x response into status line, headers and (de-chunked) body."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = Headers()
    for line in lines:
        name, _, value = line.partition(b":")
        headers.addRawHeader(name, value.strip())
    if headers.getRawHeaders(b"transfer-encoding") != [b"chunked"]:
        return ParsedResponse(status, headers, rest, True)
    body = b""
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return ParsedResponse(status, headers, body, rest == b"\r\n")
        body, rest = body + rest[:size], rest[size + 2:]
    return ParsedResponse(status, headers, body, False)


def consume(producer, clock):
    """Everything a body producer writes, running its cooperator on C{clock}."""
    consumer = StringTransport()
    done = producer.startProducing(consumer)
    while not done.called:
        clock.advance(0)
    return consumer.value()


class ProxyMixin:
    """A proxy with a fake agent, served by a real Site over a StringTransport."""

    upstream = "http://upstream.test:8080/app"

    def serve(self, identity="daniel", groups=("staff",), secure=False, meta=None, host=None,
              **kwargs):
        self.clock = MemoryReactorClock()
        self.agent = FakeAgent()
        kwargs.setdefault("timeout", 10)
        self.proxy = UpstreamProxy(self.upstream, self.clock, agent=self.agent, **kwargs)
        self.site = Site(ProxyResource(self.proxy, identity, groups, meta, host), reactor=self.clock)
        self.transport = StringTransport(
            hostAddress=IPv4Address("TCP", "192.0.2.1", 443 if secure else 80),
            peerAddress=IPv4Address("TCP", "198.51.100.7", 50123),
        )
        if secure:
            directlyProvides(self.transport, ISSLTransport)
            self.transport.setTcpNoDelay = lambda enabled: None
        self.channel = self.site.buildProtocol(None)
        self.channel.makeConnection(self.transport)

    def send(self, *args, **kwargs):
        """Send one request and return what the fake agent was asked (if anything)."""
        if not hasattr(self, "channel"):
            self.serve()
        self.channel.dataReceived(raw_request(*args, **kwargs))
        return self.agent.calls[-1] if self.agent.calls else None

    def respond(self, call, *args, **kwargs):
        response = FakeResponse(*args, **kwargs)
        call.deferred.callback(response)
        return response

    def response(self):
        return parse_response(self.transport.value())


# --- names and construction ------------------------------------------------------------


class NameTests(TestCase):
    def test_normalise(self):
        self.assertEqual(normalise_header_name(b"REMOTE_user"), b"remote-user")
        self.assertEqual(normalise_header_name(b"Remote.User"), b"remote-user")
        self.assertEqual(normalise_header_name(b"x_Forwarded.USER"), b"x-forwarded-user")
        self.assertEqual(normalise_header_name(b"Accept"), b"accept")

    def test_identity_headers(self):
        required = {
            "remote-user", "remote-groups", "remote-email", "remote-name",
            "x-remote-user", "x-remote-groups", "x-forwarded-user", "x-forwarded-groups",
            "x-forwarded-email", "x-auth-request-user", "x-auth-request-email",
            "x-auth-request-groups", "x-authenticated-user", "x-user", "x-email",
        }
        self.assertLessEqual(required, IDENTITY_HEADERS)
        for name in IDENTITY_HEADERS:
            self.assertEqual(normalise_header_name(name.encode()).decode(), name)

    def test_origin_form(self):
        self.assertEqual(_origin_form(b"/a?b=c"), b"/a?b=c")
        self.assertEqual(_origin_form(b"http://gateway.test/a?b"), b"/a?b")
        self.assertEqual(_origin_form(b"HTTPS://gateway.test"), b"/")
        self.assertEqual(_origin_form(b"http://gateway.test?x"), b"/?x")
        self.assertIsNone(_origin_form(b"*"))
        self.assertIsNone(_origin_form(b"gateway.test:443"))


class ConstructionTests(TestCase):
    def test_bad_upstreams(self):
        for url in ["ftp://host/", "host:8080", "http://", "http://host:99999",
                    "http://host/?q=1", "http://host/#top", "http://host /", "http://[::1",
                    "http://host\n/", "", "https://user:hunter2@host/"]:
            with self.assertRaises(ValueError, msg=url) as caught:
                UpstreamProxy(url, task.Clock(), agent=FakeAgent())
            message = str(caught.exception)
            self.assertNotIn("\n", message)
            self.assertNotIn("hunter2", message)

    def test_good_upstreams(self):
        for url in ["http://127.0.0.1:8080", "https://example.com/app/", "http://[::1]:99/x"]:
            UpstreamProxy(url, task.Clock(), agent=FakeAgent())

    def test_bad_options(self):
        with self.assertRaises(ValueError):
            UpstreamProxy("http://host", task.Clock(), timeout=0, agent=FakeAgent())
        with self.assertRaises(ValueError):
            UpstreamProxy("http://host", task.Clock(), ca_file="ca.pem")
        with self.assertRaises(ValueError) as caught:
            UpstreamProxy("https://host", task.Clock(), ca_file=self.mktemp())
        self.assertIn("CA file", str(caught.exception))

    def test_default_agent_pool(self):
        proxy = UpstreamProxy("https://host", MemoryReactorClock())
        self.assertTrue(proxy.pool.persistent)
        self.assertIsNone(UpstreamProxy("http://host", task.Clock(), agent=FakeAgent()).pool)
        return proxy.close()


# --- the request sent upstream ---------------------------------------------------------


class UpstreamRequestTests(ProxyMixin, TestCase):
    def test_target_url(self):
        call = self.send(b"GET", b"/some%20path/x?q=1&r=%2F#")
        self.assertEqual(call.method, b"GET")
        self.assertEqual(call.uri, b"http://upstream.test:8080/app/some%20path/x?q=1&r=%2F#")

    def test_absolute_form_target(self):
        call = self.send(b"GET", b"http://gateway.test/x?y")
        self.assertEqual(call.uri, b"http://upstream.test:8080/app/x?y")

    def test_upstream_without_prefix(self):
        self.upstream = "https://upstream.test/"
        call = self.send(b"GET", b"/x")
        self.assertEqual(call.uri, b"https://upstream.test/x")

    def test_get_without_body(self):
        call = self.send(b"GET", b"/")
        self.assertIsNone(call.body)

    def test_body_forwarded(self):
        self.serve()
        call = self.send(b"PUT", b"/doc", body=b"hello upstream")
        self.assertEqual(call.method, b"PUT")
        self.assertEqual(call.body.length, 14)
        self.assertEqual(consume(call.body, self.clock), b"hello upstream")
        self.assertIsNone(call.header(b"content-length"))  # the Agent frames the body

    def test_empty_post_with_length(self):
        self.serve()
        call = self.send(b"POST", b"/", headers=[(b"Content-Length", b"0")])
        self.assertEqual(call.body.length, 0)

    def test_empty_delete_without_framing(self):
        call = self.send(b"DELETE", b"/x")
        self.assertIsNone(call.body)

    def test_identity_headers_stripped(self):
        spoofed = [
            b"Remote-User", b"REMOTE_USER", b"remote.user", b"Remote_User", b"X-Remote-User",
            b"x_forwarded_user", b"X-Forwarded-Groups", b"X-Auth-Request-Email", b"x.user",
            b"X-Authenticated-User", b"Remote-Groups", b"remote_groups", b"X-Email",
            b"X-WEBAUTH-USER", b"Remote-Group", b"X-Remote-Group", b"X-Auth-Username",
            b"X-Forwarded-Client-Cert", b"X-SSL-Client-S-DN", b"SSL_Client_Cert",
        ]
        call = self.send(headers=[(name, b"mallory") for name in spoofed])
        sent = dict(call.headers.getAllRawHeaders())
        self.assertEqual(sent[b"Remote-User"], [b"daniel"])
        self.assertEqual(sent[b"Remote-Groups"], [b"staff"])
        for name, values in sent.items():
            self.assertNotIn(b"mallory", values, name)
            if name not in (b"Remote-User", b"Remote-Groups"):
                self.assertNotIn(normalise_header_name(name).decode(), IDENTITY_HEADERS)

    def test_authorization_dropped_by_default(self):
        call = self.send(headers=[(b"Authorization", SECRET), (b"Proxy-Authorization", SECRET)])
        self.assertIsNone(call.header(b"authorization"))
        self.assertIsNone(call.header(b"proxy-authorization"))

    def test_authorization_forwarded_when_asked(self):
        self.serve(forward_authorization=True)
        call = self.send(headers=[(b"Authorization", SECRET), (b"Proxy-Authorization", SECRET)])
        self.assertEqual(call.header(b"authorization"), [SECRET])
        self.assertIsNone(call.header(b"proxy-authorization"))  # hop-by-hop all the same

    def test_identity_and_groups(self):
        self.serve(identity="dänïel", groups=["staff", "Domain Users"])
        call = self.send()
        self.assertEqual(call.header(b"remote-user"), ["dänïel".encode()])
        self.assertEqual(call.header(b"remote-groups"), [b"staff,Domain Users"])

    def test_no_groups_sends_empty_header(self):
        self.serve(groups=[])
        call = self.send(headers=[(b"Remote-Groups", b"admin")])
        self.assertEqual(call.header(b"remote-groups"), [b""])

    def test_unsafe_identity_refused(self):
        proxy = UpstreamProxy("http://host", task.Clock(), agent=FakeAgent())
        request = DummyRequest([])
        for identity, groups in [("", []), ("adm\r\nin", []), ("adm\x00in", []),
                                 ("daniel", ["staff\nadmin"]), ("daniel", ["staff,admin"])]:
            self.assertRaises(ValueError, proxy.upstream_headers, request, identity, groups)

    def test_unsafe_identity_not_proxied(self):
        self.serve(identity="adm\nin")
        self.assertIsNone(self.send())
        self.assertEqual(self.response().code, 500)
        self.flushLoggedErrors(ValueError)

    def test_forwarded_headers(self):
        call = self.send(headers=[(b"X-Forwarded-For", b"203.0.113.9, 10.0.0.1"),
                                  (b"X-Forwarded-Proto", b"https"),
                                  (b"X-Forwarded-Host", b"evil.test"),
                                  (b"X_Forwarded_Host", b"evil.test"),
                                  (b"X-Real-IP", b"203.0.113.9")])
        # From a client (not a trusted proxy): its X-Forwarded-* are not believed.
        self.assertEqual(call.header(b"x-forwarded-for"), [b"198.51.100.7"])
        self.assertEqual(call.header(b"x-forwarded-proto"), [b"http"])
        self.assertEqual(call.header(b"x-real-ip"), [b"198.51.100.7"])
        # No host was checked (no --http-host): none is vouched for.
        self.assertIsNone(call.header(b"x-forwarded-host"))
        self.assertIsNone(call.header(b"x_forwarded_host"))

    def test_forwarded_host_is_the_checked_host(self):
        """
        Issue 11 item 9: the upstream builds links (password resets) from
        X-Forwarded-Host, so it gets the canonical host the ACL used, never
        the client's Host or X-Forwarded-Host.
        """
        self.serve(host="app.example.com")
        call = self.send(headers=[(b"X-Forwarded-Host", b"evil.example/reset?"),
                                  (b"x.forwarded.host", b"evil.example"),
                                  (b"X-Forwarded-Host", b"app.example.com, evil.example")])
        self.assertEqual(call.header(b"x-forwarded-host"), [b"app.example.com"])
        names = [normalise_header_name(n) for n, _ in call.headers.getAllRawHeaders()]
        self.assertEqual(names.count(b"x-forwarded-host"), 1)

    def test_method_override_stripped(self):
        """Issue 11 item 2: the upstream must not act on a method the ACL did not check."""
        spellings = [b"X-HTTP-Method-Override", b"x_http_method_override", b"X-HTTP-Method",
                     b"X-Method-Override", b"x.method.override", b"X_HTTP_METHOD"]
        call = self.send(b"POST", b"/x", body=b"a",
                         headers=[(name, b"DELETE") for name in spellings])
        self.assertEqual(call.method, b"POST")
        for name, values in call.headers.getAllRawHeaders():
            self.assertNotIn(normalise_header_name(name), METHOD_OVERRIDE_HEADERS, name)
            self.assertNotIn(b"DELETE", values, name)

    def test_method_override_kept_when_asked(self):
        self.serve(keep_method_override=True)
        call = self.send(b"POST", b"/x", body=b"a",
                         headers=[(b"X-HTTP-Method-Override", b"DELETE")])
        self.assertEqual(call.header(b"x-http-method-override"), [b"DELETE"])

    def test_forwarded_headers_via_trusted_proxy(self):
        """Behind a trusted proxy: its chain is kept, the client and scheme come from the guard."""
        self.serve(meta=ConnectionMeta("http", peer_address="203.0.113.9", tls=True))
        call = self.send(headers=[(b"X-Forwarded-For", b"203.0.113.9"),
                                  (b"X-Forwarded-Proto", b"https")])
        self.assertEqual(call.header(b"x-forwarded-for"), [b"203.0.113.9, 198.51.100.7"])
        self.assertEqual(call.header(b"x-forwarded-proto"), [b"https"])
        self.assertEqual(call.header(b"x-real-ip"), [b"203.0.113.9"])

    def test_other_conventions_dropped(self):
        names = [b"Forwarded", b"X-Forwarded-Port", b"X-Forwarded-Prefix", b"X-Original-URL",
                 b"X-Original-Method", b"X-Rewrite-URL", b"X-Forwarded-Uri", b"x_original_url"]
        call = self.send(headers=[(name, b"/admin") for name in names])
        for name in names:
            self.assertIsNone(call.header(name), name)
        values = [v for _, vs in call.headers.getAllRawHeaders() for v in vs]
        self.assertNotIn(b"evil.test", b"".join(values))

    def test_client_address_conventions_dropped(self):
        """CDNs' client-address headers from a client never reach the upstream."""
        names = [b"CF-Connecting-IP", b"Fastly-Client-IP", b"X-Cluster-Client-IP",
                 b"X-Original-Forwarded-For", b"X-Remote-Addr", b"True-Client-IP", b"X-Client-IP"]
        call = self.send(headers=[(name, b"10.0.0.1") for name in names])
        for name in names:
            self.assertIsNone(call.header(name), name)
        self.assertEqual(call.header(b"x-forwarded-for"), [b"198.51.100.7"])

    def test_target_lookalikes_dropped(self):
        """Every header /auth refuses as a look-alike target is not passed upstream either."""
        names = [b"X-Forwarded-Path", b"X-Envoy-Original-Path", b"X-Original-Path",
                 b"X-Forwarded-Url", b"X-Request-URI", b"X.Original.Request.URI"]
        call = self.send(headers=[(name, b"/admin") for name in names])
        for name in names:
            self.assertIsNone(call.header(name), name)

    def test_forwarded_proto_https(self):
        self.serve(secure=True)
        call = self.send()
        self.assertEqual(call.header(b"x-forwarded-proto"), [b"https"])
        self.assertEqual(call.header(b"x-forwarded-for"), [b"198.51.100.7"])

    def test_hop_by_hop_removed(self):
        call = self.send(headers=[
            (b"Connection", b"keep-alive, X-Private, x_other"), (b"Keep-Alive", b"timeout=5"),
            (b"X-Private", b"p"), (b"X-Other", b"o"), (b"TE", b"trailers"),
            (b"Trailer", b"X-T"), (b"Upgrade", b"websocket"), (b"Proxy-Connection", b"close"),
            (b"Transfer_Encoding", b"chunked"), (b"Expect", b"100-continue"),
            (b"Accept", b"text/html"), (b"Cookie", b"a=1"), (b"X-Custom", b"kept"),
        ])
        names = {normalise_header_name(n) for n, _ in call.headers.getAllRawHeaders()}
        for dropped in [b"connection", b"keep-alive", b"x-private", b"x-other", b"te", b"trailer",
                        b"upgrade", b"proxy-connection", b"transfer-encoding", b"expect",
                        b"host", b"content-length"]:
            self.assertNotIn(dropped, names)
        self.assertEqual(call.header(b"accept"), [b"text/html"])
        self.assertEqual(call.header(b"cookie"), [b"a=1"])
        self.assertEqual(call.header(b"x-custom"), [b"kept"])

    def test_repeated_headers_kept(self):
        call = self.send(headers=[(b"X-Multi", b"1"), (b"X-Multi", b"2")])
        self.assertEqual(call.header(b"x-multi"), [b"1", b"2"])


# --- the response relayed to the client ------------------------------------------------


class ResponseTests(ProxyMixin, TestCase):
    def test_status_and_headers_copied(self):
        call = self.send()
        response = self.respond(call, 201, b"Made It", {
            b"Content-Type": [b"application/json"], b"Set-Cookie": [b"a=1", b"b=2"],
            b"X-Upstream": [b"yes"], b"Keep-Alive": [b"timeout=5"], b"Upgrade": [b"h2c"],
            b"Server": [b"upstream/1.0"],
        })
        response.send(b"{}")
        response.finish()
        got = self.response()
        self.assertEqual(got.status, b"HTTP/1.1 201 Made It")
        self.assertEqual(got.header(b"content-type"), [b"application/json"])
        self.assertEqual(got.header(b"set-cookie"), [b"a=1", b"b=2"])
        self.assertEqual(got.header(b"x-upstream"), [b"yes"])
        self.assertEqual(got.header(b"server"), [b"upstream/1.0"])
        self.assertIsNone(got.header(b"keep-alive"))
        self.assertIsNone(got.header(b"upgrade"))
        self.assertEqual(got.body, b"{}")
        self.assertTrue(got.complete)

    def test_invalid_status_is_bad_gateway(self):
        """
        An upstream status outside 100-599 (999999999, 0, 42, 600) is not
        passed on: the client gets 502, the upstream's body is dropped, and
        one line a minute is logged however many there are.
        """
        self.serve()
        with capturedLogs() as events:
            for code in (999_999_999, 0, 42, 600):
                self.transport.clear()
                call = self.send()
                response = self.respond(call, code, b"X", {b"X-Upstream": [b"yes"]})
                got = self.response()
                self.assertEqual(got.code, 502, code)
                self.assertIsNone(got.header(b"x-upstream"))
                self.assertTrue(response.transport.stopped)
        lines = [formatEvent(e) for e in events if "not 100-599" in formatEvent(e)]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("status 999999999", lines[0])
        self.clock.advance(61)  # the Site's idle timeout closes this connection: a new one
        self.transport = StringTransport()
        self.channel = self.site.buildProtocol(None)
        self.channel.makeConnection(self.transport)
        with capturedLogs() as events:
            self.respond(self.send(), 1000, b"X")
        lines = [formatEvent(e) for e in events if "not 100-599" in formatEvent(e)]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("3 more like it not logged", lines[0])

    def test_no_invented_content_type(self):
        call = self.send()
        response = self.respond(call, 200, length=2)
        response.send(b"ok")
        response.finish()
        self.assertIsNone(self.response().header(b"content-type"))

    def test_known_length_not_chunked(self):
        call = self.send()
        response = self.respond(call, 200, length=5)
        response.send(b"hel")
        response.send(b"lo")
        response.finish()
        got = self.response()
        self.assertEqual(got.header(b"content-length"), [b"5"])
        self.assertIsNone(got.header(b"transfer-encoding"))
        self.assertEqual(got.body, b"hello")

    def test_unknown_length_chunked(self):
        call = self.send()
        response = self.respond(call, 200)
        response.send(b"hel")
        self.assertFalse(self.response().complete)
        response.send(b"lo")
        response.finish()
        got = self.response()
        self.assertEqual(got.header(b"transfer-encoding"), [b"chunked"])
        self.assertIsNone(got.header(b"content-length"))
        self.assertEqual(got.body, b"hello")
        self.assertTrue(got.complete)

    def test_potential_data_loss_is_normal_end(self):
        call = self.send()
        response = self.respond(call, 200)
        response.send(b"until close")
        response.fail(http.PotentialDataLoss())
        got = self.response()
        self.assertEqual(got.body, b"until close")
        self.assertTrue(got.complete)
        self.assertFalse(self.transport.disconnected)

    def test_http10_client(self):
        call = self.send(version=b"HTTP/1.0")
        response = self.respond(call, 200)
        response.send(b"old")
        response.finish()
        got = self.response()
        self.assertIsNone(got.header(b"transfer-encoding"))
        self.assertEqual(got.body, b"old")
        self.assertTrue(self.transport.disconnecting)

    def test_head_keeps_upstream_length(self):
        call = self.send(b"HEAD", b"/big")
        self.assertEqual(call.method, b"HEAD")
        self.respond(call, 200, headers={b"Content-Length": [b"1234"]}, length=0).finish()
        got = self.response()
        self.assertEqual(got.header(b"content-length"), [b"1234"])
        self.assertIsNone(got.header(b"transfer-encoding"))
        self.assertEqual(got.body, b"")

    def test_not_modified(self):
        call = self.send()
        self.respond(call, 304, b"Not Modified", {b"ETag": [b'"x"']}, length=0).finish()
        got = self.response()
        self.assertEqual(got.code, 304)
        self.assertEqual(got.header(b"etag"), [b'"x"'])
        self.assertIsNone(got.header(b"transfer-encoding"))
        self.assertEqual(got.body, b"")

    def test_head_sent_before_body(self):
        call = self.send()
        self.respond(call, 200)
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 200 OK\r\n"))

    def test_backpressure(self):
        call = self.send()
        response = self.respond(call, 200)
        upstream, channel = response.transport, self.transport.producer
        channel.pauseProducing()  # what the transport does when its buffer is full
        self.assertTrue(upstream.paused)
        channel.resumeProducing()
        self.assertFalse(upstream.paused)
        response.finish()
        channel.pauseProducing()  # unregistered once the body is done
        self.assertFalse(upstream.paused)

    def test_body_failure_aborts_client(self):
        call = self.send()
        response = self.respond(call, 200, length=10)
        response.send(b"half")
        response.fail(ResponseFailed([Failure(error.ConnectionLost())]))
        self.assertTrue(self.transport.disconnected)  # aborted, not finished
        self.assertEqual(self.response().body, b"half")

    def test_body_failure_aborts_chunked_without_last_chunk(self):
        call = self.send()
        response = self.respond(call, 200)
        response.send(b"half")
        response.fail(ResponseFailed([Failure(error.ConnectionLost())]))
        self.assertTrue(self.transport.disconnected)
        self.assertFalse(self.response().complete)


class FailureTests(ProxyMixin, TestCase):
    def assertGatewayError(self, code):
        got = self.response()
        self.assertEqual(got.code, code)
        self.assertEqual(got.header(b"cache-control"), [b"no-store"])
        self.assertEqual(got.header(b"content-type"), [b"text/plain; charset=utf-8"])
        self.assertEqual(got.header(b"content-length"), [b"%d" % len(got.body)])
        self.assertLess(len(got.body), 200)
        return got

    def test_connection_refused(self):
        call = self.send()
        with capturedLogs() as events:
            call.deferred.errback(error.ConnectionRefusedError("127.0.0.1:8080"))
        self.assertGatewayError(502)
        self.assertTrue(any("ConnectionRefusedError" in formatEvent(e) for e in events))

    def test_dns_failure(self):
        call = self.send()
        call.deferred.errback(error.DNSLookupError("upstream.test"))
        self.assertGatewayError(502)

    def test_failure_after_sending(self):
        call = self.send()
        call.deferred.errback(ResponseNeverReceived([Failure(error.ConnectionLost())]))
        self.assertGatewayError(502)

    def test_agent_raises(self):
        class Raising(FakeAgent):
            def request(self, *args):
                raise ValueError("no")
        self.serve()
        self.proxy._agent = Raising()
        self.send()
        self.assertGatewayError(502)

    def test_no_secrets_in_logs(self):
        self.serve()
        with capturedLogs() as events:
            call = self.send(b"POST", b"/login?token=sekrit", body=b"password=hunter2",
                             headers=[(b"Authorization", SECRET), (b"Cookie", b"session=s3cr3t")])
            call.deferred.errback(error.ConnectionRefusedError("upstream"))
        text = " ".join(formatEvent(e) + repr(e) for e in events)
        for secret in ["ZGFuaWVsOnRpZ2Vy", "s3cr3t", "hunter2", "sekrit"]:
            self.assertNotIn(secret, text)
        self.assertNotIn(b"ZGFu", self.transport.value())

    def test_absolute_target_credentials_not_logged(self):
        with capturedLogs() as events:
            call = self.send(b"GET", b"http://user:hunter2@gateway.test/x?k=sekrit")
            call.deferred.errback(error.ConnectionRefusedError("upstream"))
        text = " ".join(formatEvent(e) for e in events)
        self.assertIn("GET /x", text)
        self.assertNotIn("hunter2", text)
        self.assertNotIn("sekrit", text)

    def test_fault_while_relaying_head(self):
        call = self.send()
        response = FakeResponse(200)
        response.headers = None  # breaks the head copy
        call.deferred.callback(response)
        self.assertGatewayError(502)
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)

    def test_timeout(self):
        call = self.send()
        self.clock.advance(9.9)
        self.assertFalse(call.cancelled)
        self.assertEqual(self.transport.value(), b"")
        self.clock.advance(0.1)
        self.assertTrue(call.cancelled)
        self.assertGatewayError(504)

    def test_timeout_counts_from_the_body_sent(self):
        """A slow upload is not a slow upstream: the clock starts once the body is out."""
        call = self.send(method=b"POST", body=b"x" * 1000)
        self.clock.advance(30)  # the body is still being written (the Agent has not started it)
        self.assertFalse(call.cancelled)
        consumed = []
        sent = call.body.startProducing(type("C", (), {"write": lambda self, d: consumed.append(d)})())
        self.clock.advance(0)  # the cooperator's turn
        self.clock.advance(0)
        self.successResultOf(sent)
        self.assertEqual(b"".join(consumed), b"x" * 1000)
        self.clock.advance(9.9)
        self.assertFalse(call.cancelled)
        self.clock.advance(0.1)
        self.assertTrue(call.cancelled)
        self.assertGatewayError(504)

    def test_timeout_only_for_response_head(self):
        call = self.send()
        self.clock.advance(5)
        response = self.respond(call, 200)
        self.clock.advance(60)
        self.assertFalse(call.cancelled)
        response.send(b"slow")
        response.finish()
        self.assertEqual(self.response().body, b"slow")

    def test_client_gone_cancels_upstream(self):
        call = self.send()
        self.channel.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(call.cancelled)
        self.assertEqual(self.transport.value(), b"")
        self.clock.advance(60)  # no timer left to write a 504 to nobody
        self.assertEqual(self.transport.value(), b"")

    def test_client_gone_during_body_stops_upstream(self):
        call = self.send()
        response = self.respond(call, 200)
        response.send(b"first")
        written = self.transport.value()
        self.channel.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(response.transport.stopped)
        response.send(b"late")  # already in flight: dropped, not written
        response.fail(ResponseFailed([Failure(error.ConnectionLost())]))
        self.assertEqual(self.transport.value(), written)

    def test_bad_request_target(self):
        self.serve()
        self.channel.dataReceived(b"GET gateway.test:80 HTTP/1.1\r\nHost: gateway.test\r\n\r\n")
        self.assertEqual(self.agent.calls, [])
        self.assertEqual(self.response().code, 400)


# --- loopback integration --------------------------------------------------------------


BIG = os.urandom(3 * 1024 * 1024 + 17)


class EchoResource(Resource):
    """Answers with the method, target, headers and body sha256 it received, as JSON."""

    isLeaf = True

    def render(self, request):
        body = request.content.read()
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({
            "method": request.method.decode(),
            "uri": request.uri.decode(),
            "headers": [[k.decode(), v.decode()]
                        for k, vs in request.requestHeaders.getAllRawHeaders() for v in vs],
            "body": hashlib.sha256(body).hexdigest(),
        }).encode()


class BigResource(Resource):
    """C{/big}: C{data} with a Content-Length; C{/big-chunked}: written piece by piece."""

    isLeaf = True

    def __init__(self, data=BIG):
        super().__init__()
        self.data = data

    def render(self, request):
        request.setHeader(b"Content-Type", b"application/octet-stream")
        if request.path == b"/big":
            return self.data
        gone = []
        request.notifyFinish().addErrback(gone.append)

        def pieces():
            for start in range(0, len(self.data), 65536):
                if gone:
                    return
                request.write(self.data[start:start + 65536])
                yield
            request.finish()

        task.cooperate(pieces())
        return NOT_DONE_YET


class TrackingFactory(WrappingFactory):
    """Wraps a Site to close its server-side connections at the end of a test."""

    def __init__(self, factory):
        super().__init__(factory)
        self.lost = {}

    def registerProtocol(self, protocol):
        super().registerProtocol(protocol)
        self.lost[protocol] = defer.Deferred()

    def unregisterProtocol(self, protocol):
        super().unregisterProtocol(protocol)
        self.lost.pop(protocol).callback(None)

    def close_all(self):
        """Abort every open connection; fires once all are gone."""
        waiting = list(self.lost.values())
        for protocol in list(self.lost):
            protocol.transport.abortConnection()
        return defer.gatherResults(waiting)


class LoopbackTests(TestCase):
    """A real upstream, the proxy behind a real Site, and treq as the client."""

    def listen(self, resource, tls=None):
        site = self.factory = TrackingFactory(Site(resource))
        if tls is None:
            port = reactor.listenTCP(0, site, interface="127.0.0.1")
        else:
            port = reactor.listenSSL(0, site, tls, interface="127.0.0.1")
        self.addCleanup(site.close_all)
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def start_proxy(self, upstream, **kwargs):
        proxy = UpstreamProxy(upstream, reactor, timeout=5, **kwargs)
        self.addCleanup(proxy.close)
        port = self.listen(ProxyResource(proxy, "daniel", ["staff"]))
        self.proxy_url = f"http://127.0.0.1:{port}"
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.client = treq.client.HTTPClient(Agent(reactor, pool=pool))
        return proxy

    def start(self, resource=None):
        upstream_port = self.listen(resource or EchoResource())
        return self.start_proxy(f"http://127.0.0.1:{upstream_port}/base")

    @defer.inlineCallbacks
    def get_json(self, method, path, **kwargs):
        response = yield self.client.request(method, self.proxy_url + path, **kwargs)
        self.assertEqual(response.code, 200)
        return json.loads((yield response.content()))

    @defer.inlineCallbacks
    def test_spoofed_identity_stripped(self):
        self.start()
        seen = yield self.get_json("GET", "/who?x=1", headers={
            b"Remote-User": [b"mallory"], b"REMOTE_USER": [b"mallory"],
            b"Remote_User": [b"mallory"], b"remote.user": [b"mallory"],
            b"X-Forwarded-User": [b"mallory"], b"Remote-Groups": [b"admin"],
            b"Authorization": [SECRET],
        })
        headers = [(normalise_header_name(k.encode()).decode(), v) for k, v in seen["headers"]]
        identity = [(k, v) for k, v in headers if k in IDENTITY_HEADERS]
        self.assertEqual(sorted(identity), [("remote-groups", "staff"), ("remote-user", "daniel")])
        self.assertNotIn("authorization", dict(headers))
        self.assertEqual(dict(headers)["x-forwarded-for"], "127.0.0.1")
        self.assertNotIn("x-forwarded-host", dict(headers))  # no checked host to vouch for
        self.assertEqual(seen["uri"], "/base/who?x=1")

    @defer.inlineCallbacks
    def test_post_body(self):
        self.start()
        body = os.urandom(200_000)  # big enough for twisted.web to spool it to a file
        seen = yield self.get_json("POST", "/upload", data=body)
        self.assertEqual(seen["method"], "POST")
        self.assertEqual(seen["body"], hashlib.sha256(body).hexdigest())

    @defer.inlineCallbacks
    def test_connection_reuse(self):
        self.start()
        for _ in range(3):
            yield self.get_json("GET", "/again")
            yield self.get_json("PUT", "/again", data=b"x")

    @defer.inlineCallbacks
    def check_big(self, path):
        response = yield self.client.get(self.proxy_url + path)
        self.assertEqual(response.code, 200)
        body = yield response.content()
        self.assertEqual(len(body), len(BIG))
        self.assertEqual(hashlib.sha256(body).hexdigest(), hashlib.sha256(BIG).hexdigest())
        return response

    @defer.inlineCallbacks
    def test_large_body_with_length(self):
        upstream_port = self.listen(BigResource())
        self.start_proxy(f"http://127.0.0.1:{upstream_port}")
        response = yield self.check_big("/big")
        self.assertEqual(response.length, len(BIG))

    @defer.inlineCallbacks
    def test_large_body_chunked(self):
        upstream_port = self.listen(BigResource())
        self.start_proxy(f"http://127.0.0.1:{upstream_port}")
        response = yield self.check_big("/big-chunked")
        self.assertEqual(response.length, UNKNOWN_LENGTH)

    @defer.inlineCallbacks
    def test_head(self):
        upstream_port = self.listen(BigResource())
        self.start_proxy(f"http://127.0.0.1:{upstream_port}")
        response = yield self.client.head(self.proxy_url + "/big")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-length"), [b"%d" % len(BIG)])
        self.assertEqual((yield response.content()), b"")

    @defer.inlineCallbacks
    def test_connection_refused(self):
        port = reactor.listenTCP(0, Site(Resource()), interface="127.0.0.1")
        number = port.getHost().port
        yield port.stopListening()
        self.start_proxy(f"http://127.0.0.1:{number}")
        response = yield self.client.get(self.proxy_url + "/")
        self.assertEqual(response.code, 502)
        self.assertEqual(response.headers.getRawHeaders(b"cache-control"), [b"no-store"])
        yield response.content()

    @defer.inlineCallbacks
    def test_client_gone_closes_upstream_connection(self):
        """An upstream that accepted but never answers: a departed client frees its connection."""
        upstream = ServerFactory()
        lost = defer.Deferred()

        class Silent(Protocol):
            def connectionLost(self, reason):
                lost.callback(None)

        upstream.protocol = Silent
        port = reactor.listenTCP(0, upstream, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.start_proxy(f"http://127.0.0.1:{port.getHost().port}")
        answered = self.client.get(self.proxy_url + "/")
        yield deferLater(reactor, 0.3, lambda: None)  # the proxy has connected upstream
        answered.cancel()
        answered.addErrback(lambda f: f.trap(defer.CancelledError, ResponseNeverReceived))
        yield answered
        yield lost.addTimeout(3, reactor)

    def tls_upstream(self):
        from gateway.tls import generate_self_signed

        cert, key = os.path.abspath(self.mktemp()), os.path.abspath(self.mktemp())
        generate_self_signed(cert, key, "localhost")
        with open(cert, "rb") as c, open(key, "rb") as k:
            options = ssl.PrivateCertificate.loadPEM(c.read() + k.read()).options()
        return cert, self.listen(EchoResource(), tls=options)

    @defer.inlineCallbacks
    def test_https_upstream_with_ca_file(self):
        cert, port = self.tls_upstream()
        self.start_proxy(f"https://127.0.0.1:{port}", ca_file=cert)
        seen = yield self.get_json("GET", "/tls")
        self.assertEqual(dict(seen["headers"])["Remote-User"], "daniel")

    @defer.inlineCallbacks
    def test_https_upstream_unverified_is_502(self):
        _, port = self.tls_upstream()
        self.start_proxy(f"https://127.0.0.1:{port}")
        response = yield self.client.get(self.proxy_url + "/tls")
        self.assertEqual(response.code, 502)
        yield response.content()

    @defer.inlineCallbacks
    def test_slow_client_pauses_upstream(self):
        """
        A client that stops reading makes the proxy stop reading from the
        upstream: the proxy's own send buffer stays small while a body much
        larger than the kernel's socket buffers waits upstream.
        """
        huge = os.urandom(32 * 1024 * 1024)
        upstream_port = self.listen(BigResource(huge))
        self.start_proxy(f"http://127.0.0.1:{upstream_port}")
        proxy_side = self.factory
        response = yield self.client.get(self.proxy_url + "/big-chunked", unbuffered=True)
        reader = SlowReader()
        response.deliverBody(reader)
        reader.transport.pauseProducing()  # deliverBody resumes; pause after it
        yield task.deferLater(reactor, 0.5, lambda: None)

        self.assertLess(reader.length, len(huge) // 2)
        self.assertLess(sum(buffered(p.transport) for p in proxy_side.lost), 1024 * 1024)
        reader.transport.resumeProducing()
        ended = yield reader.done
        self.assertIsInstance(ended, ResponseDone)
        self.assertEqual(reader.length, len(huge))
        self.assertEqual(reader.digest.hexdigest(), hashlib.sha256(huge).hexdigest())


class SlowReader(Protocol):
    """Hashes a response body; the test pauses and resumes its transport."""

    def __init__(self):
        self.digest = hashlib.sha256()
        self.length = 0
        self.done = defer.Deferred()

    def dataReceived(self, data):
        self.digest.update(data)
        self.length += len(data)

    def connectionLost(self, reason):
        self.done.callback(reason.value)
