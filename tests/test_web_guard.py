"""
The HTTP guard, whoami, forward-auth and the site's bounds: every row of the
status table in shared/reference/http-auth.md, driven through the real
L{GatewaySite} over a C{StringTransport}, one raw HTTP request at a time.
"""

from __future__ import annotations

import base64
import ipaddress
import json

from twisted.cred.checkers import (
    ICredentialsChecker,
    InMemoryUsernamePasswordDatabaseDontUse,
)
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import server
from twisted.web.resource import IResource
from zope.interface import directlyProvides, implementer

from gateway.acl import AllowAuthenticated
from gateway.checkers.throttle import Throttle
from gateway.credentials import IBearerToken
from gateway.groups import parse_groups
from gateway.realm import Realm, make_portal
from gateway.web.guard import Guard
from gateway.web.inject import InjectAPI
from gateway.web.resources import BadTarget, WebApp, forwarded_host, parse_target
from gateway.web.resources import resource_name as resource_of
from gateway.web.server import GatewaySite
from gateway.web.settings import HTTPSettings
from tests.support import FixedChecker

TOKEN = "tok-3f9a.Zz_~+/="


@implementer(ICredentialsChecker)
class TokenTable:
    credentialInterfaces = (IBearerToken,)

    def __init__(self, tokens):
        self.tokens = tokens

    def requestAvatarId(self, credentials):
        for token, user in self.tokens.items():
            if credentials.checkToken(token):
                return defer.succeed(user)
        return defer.fail(UnauthorizedLogin())


class Policy:
    """Allows everything except the listed (resource, privilege) pairs; records queries."""

    def __init__(self, *denied):
        self.denied = set(denied)
        self.queries = []

    def query_resource_access(self, auth_info, resource, privilege):
        self.queries.append((resource, privilege))
        return (resource, privilege) not in self.denied


class FakeUpstream:
    def __init__(self):
        self.calls = []

    def render(self, request, identity, groups, target, body=None):
        self.calls.append((target, identity, tuple(groups)))
        return b"proxied"


def users():
    checker = InMemoryUsernamePasswordDatabaseDontUse()
    checker.addUser("daniel", "tiger")  # str keys, as --auth memory: stores them
    checker.addUser("jürgen", "pässwörd")
    return checker


def basic(user, password):
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


class Response:
    def __init__(self, raw):
        self.raw = raw
        if not raw:
            self.code = None
            return
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.code = int(lines[0].split()[1])
        self.headers = [tuple(x.strip() for x in line.split(b":", 1)) for line in lines[1:]]

    def all(self, name):
        return [v.decode() for n, v in self.headers if n.lower() == name.lower().encode()]

    def one(self, name):
        values = self.all(name)
        return values[0] if values else None

    def json(self):
        return json.loads(self.body)


class GuardTestCase(SynchronousTestCase):
    def make(self, checkers=None, policy=None, proxy=None, groups=None, throttle=None, spool=None,
             **settings):
        self.clock = task.Clock()
        self.settings = HTTPSettings(**settings)
        self.realm = Realm(groups=groups) if groups is not None else Realm()
        self.policy = policy or AllowAuthenticated()
        inject = None
        if self.settings.inject is not None:  # the injection API, into this spool
            inject = InjectAPI(self.policy, spool, self.settings.inject)
        app = WebApp(self.policy, self.settings, proxy, inject)
        self.realm.register_avatar(IResource, app.avatar)
        if checkers is None:
            checkers = [users()]
        self.portal = make_portal(self.realm, checkers, throttle)
        self.site = GatewaySite(Guard(self.portal, self.settings, "http"), self.settings, self.clock)

    def connect(self, peer="127.0.0.1", tls=False):
        address = (IPv6Address if ":" in peer else IPv4Address)("TCP", peer, 40000)
        channel = self.site.buildProtocol(address)
        transport = StringTransport(peerAddress=address, hostAddress=IPv4Address("TCP", "127.0.0.1", 8080))
        if tls:
            directlyProvides(transport, ISSLTransport)  # a TCP transport too
            transport.setTcpNoDelay = lambda enabled: None
        channel.makeConnection(transport)
        self.addCleanup(lambda: channel.connectionLost(Failure(ConnectionDone())))
        return channel, transport

    def request(self, path=b"/whoami", headers=(), method=b"GET", body=b"", peer="127.0.0.1",
                tls=False, authorization=None):
        channel, transport = self.connect(peer, tls)
        lines = [method + b" " + path + b" HTTP/1.1"]
        if not any(name.lower() == b"host" for name, _ in headers):
            lines.append(b"Host: gw.test")
        if authorization is not None:
            lines.append(b"Authorization: " + authorization)
        lines += [name + b": " + value for name, value in headers]
        if body:
            lines.append(b"Content-Length: " + str(len(body)).encode())
        channel.dataReceived(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        self.channel, self.transport = channel, transport
        return Response(transport.value())


class ChallengeTests(GuardTestCase):
    def test_no_credentials(self):
        self.make()
        r = self.request()
        self.assertEqual(r.code, 401)
        self.assertEqual(r.all("WWW-Authenticate"), ['Basic realm="authgateway", charset="UTF-8"'])
        self.assertEqual(r.one("Cache-Control"), "no-store")

    def test_one_challenge_per_scheme(self):
        self.make(checkers=[users(),
                            TokenTable({TOKEN: "ci-bot"})], realm='we "quote"')
        r = self.request()
        self.assertEqual(r.code, 401)
        self.assertEqual(r.all("WWW-Authenticate"), [
            'Basic realm="we \\"quote\\"", charset="UTF-8"', 'Bearer realm="we \\"quote\\""',
        ])

    def test_bearer_only(self):
        self.make(checkers=[TokenTable({TOKEN: "ci-bot"})])
        r = self.request(authorization=basic("daniel", "tiger"))  # a scheme not on offer
        self.assertEqual(r.code, 401)
        self.assertEqual(r.all("WWW-Authenticate"), ['Bearer realm="authgateway"'])


class BasicTests(GuardTestCase):
    def setUp(self):
        self.make()

    def test_whoami(self):
        r = self.request(authorization=basic("daniel", "tiger"))
        self.assertEqual(r.code, 200)
        self.assertEqual(r.one("Content-Type"), "application/json")
        self.assertEqual(r.one("Cache-Control"), "no-store")
        self.assertEqual(r.json(), {
            "identities": [{"identity": "daniel", "context": "HttpBasicAuth"}],
            "groups": [],
            "peer_address": "127.0.0.1",
        })

    def test_utf8_user(self):
        r = self.request(authorization=basic("jürgen", "pässwörd"))
        self.assertEqual(r.code, 200)
        self.assertEqual(r.json()["identities"][0]["identity"], "jürgen")

    def test_nfc(self):
        """A decomposed user name is the same user (RFC 7617 charset=UTF-8: NFC)."""
        r = self.request(authorization=basic("ju\u0308rgen", "pässwörd"))
        self.assertEqual(r.code, 200)

    def test_scheme_case_insensitive(self):
        for scheme in (b"basic", b"BASIC", b"bAsIc"):
            auth = scheme + basic("daniel", "tiger")[5:]
            self.assertEqual(self.request(authorization=auth).code, 200)

    def test_wrong_password(self):
        r = self.request(authorization=basic("daniel", "lion"))
        self.assertEqual(r.code, 401)
        self.assertEqual(r.all("WWW-Authenticate"), ['Basic realm="authgateway", charset="UTF-8"'])
        self.assertEqual(r.one("Cache-Control"), "no-store")
        self.assertEqual(self.request(authorization=basic("nobody", "tiger")).code, 401)

    def test_undecodable(self):
        """Bad base64, no colon, not UTF-8, empty: a failed login, never a 500."""
        for value in (b"Basic !!!", b"Basic " + base64.b64encode(b"daniel"),
                      b"Basic " + base64.b64encode(b"\xff\xfe:x"), b"Basic", b"Basic ZGFu aWVs",
                      b"Basic " + base64.b64encode(b":tiger")):
            r = self.request(authorization=value)
            self.assertEqual(r.code, 401, value)
            self.assertEqual(r.one("Cache-Control"), "no-store")

    def test_no_secret_logged(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.request(authorization=basic("daniel", "s3cret-pw"))
        self.request(authorization=basic("daniel", "tiger"))
        self.assertTrue(events)
        text = repr(events)
        self.assertNotIn("s3cret-pw", text)
        self.assertNotIn("tiger", text)

    def test_method_not_allowed(self):
        r = self.request(method=b"POST", authorization=basic("daniel", "tiger"))
        self.assertEqual(r.code, 405)
        self.assertEqual(set(r.one("Allow").split(", ")), {"GET", "HEAD"})
        self.assertEqual(r.one("Cache-Control"), "no-store")

    def test_non_canonical_base64(self):
        encoded = base64.b64encode(b"daniel:tiger")
        for value in (encoded + b"====", encoded[:-1] + b"h"):
            self.assertEqual(self.request(authorization=b"Basic " + value).code, 401, value)

    def test_name_longer_after_nfc(self):
        """NFC can lengthen a name past the limit: a failed login, not a 500."""
        r = self.request(authorization=basic("\u0958" * 1000, "x"))
        self.assertEqual(r.code, 401)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_head_refusal(self):
        r = self.request(method=b"HEAD")
        self.assertEqual(r.code, 401)
        self.assertEqual(r.one("Content-Length"), "24")
        self.assertEqual(r.body, b"")

    def test_form_body_not_parsed(self):
        """A form field named access_token is not a token (only the query is read)."""
        self.make(max_body=10 ** 6)
        body = b"access_token=x&" + b"a&" * 1000
        r = self.request(path=b"/auth", method=b"POST", body=body, authorization=basic("daniel", "tiger"),
                         headers=[(b"Content-Type", b"application/x-www-form-urlencoded")])
        self.assertEqual(r.code, 200)


class KeepAliveTests(GuardTestCase):
    """
    What one connection's requests share: a success line is not repeated
    while each login still publishes its event; anything new gets its line.
    """

    def setUp(self):
        self.make()
        self.lines = []
        observer = lambda e: e.get("log_namespace") == "gateway.auth" and self.lines.append(e)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.events = []

        class Sink:
            login = self.events.append

            def authz(self, event):
                pass

        self.portal.events.add(Sink())
        self.channel, self.transport = self.connect()

    def send(self, authorization):
        self.transport.clear()
        self.channel.dataReceived(
            b"GET /whoami HTTP/1.1\r\nHost: gw.test\r\nAuthorization: " + authorization
            + b"\r\n\r\n"
        )
        return Response(self.transport.value())

    def outcomes(self):
        return [(e["outcome"], e["identity"]) for e in self.lines]

    def test_repeated_success_one_line(self):
        for _ in range(3):
            self.assertEqual(self.send(basic("daniel", "tiger")).code, 200)
        self.assertEqual(self.outcomes(), [("success", "daniel")])
        self.assertEqual([e.outcome for e in self.events], ["success"] * 3)

    def test_new_line_after_a_change(self):
        """Another user, a failure in between, other groups: each success says so again."""
        self.assertEqual(self.send(basic("daniel", "tiger")).code, 200)
        self.assertEqual(self.send(basic("daniel", "lion")).code, 401)
        self.assertEqual(self.send(basic("daniel", "tiger")).code, 200)
        self.assertEqual(self.send(basic("jürgen", "pässwörd")).code, 200)
        self.assertEqual(self.send(basic("daniel", "tiger")).code, 200)
        self.realm.groups = parse_groups("staff: daniel\n")  # a reload
        r = self.send(basic("daniel", "tiger"))
        self.assertEqual(r.json()["groups"], ["staff"])
        self.assertEqual(self.outcomes(), [
            ("success", "daniel"), ("failure", "daniel"), ("success", "daniel"),
            ("success", "jürgen"), ("success", "daniel"), ("success", "daniel"),
        ])
        self.assertEqual(len(self.events), 6)

    def test_each_connection_logs(self):
        self.send(basic("daniel", "tiger"))
        self.assertEqual(self.request(authorization=basic("daniel", "tiger")).code, 200)
        self.assertEqual(self.outcomes(), [("success", "daniel")] * 2)

    def test_token_decoded_again_when_it_changes(self):
        """The connection's last Basic token is reused only for the very same bytes."""
        self.assertEqual(self.send(basic("daniel", "tiger")).code, 200)
        self.assertEqual(self.send(basic("daniel", "tiger") + b"=").code, 401)  # not canonical
        self.assertEqual(self.send(basic("daniel", "tigers")).code, 401)
        self.assertEqual(self.send(basic("daniel", "tiger")).code, 200)


class PlainHTTPTests(GuardTestCase):
    """Basic over plain HTTP: loopback only, unless allowed."""

    def test_remote_plain_refused_unchecked(self):
        checker = FixedChecker("daniel")
        self.make(checkers=[checker])
        r = self.request(peer="203.0.113.9", authorization=basic("daniel", "tiger"))
        self.assertEqual(r.code, 403)
        self.assertEqual(checker.calls, 0)
        self.assertEqual(self.request(peer="203.0.113.9").code, 403)  # no challenge to offer

    def test_remote_plain_bearer_refused_too(self):
        """RFC 6750 5.3: a bearer token is a password too."""
        checker = TokenTable({TOKEN: "ci-bot"})
        self.make(checkers=[users(), checker])
        r = self.request(peer="203.0.113.9", authorization=b"Bearer " + TOKEN.encode())
        self.assertEqual(r.code, 403)
        self.assertEqual(self.request(peer="203.0.113.9").code, 403)

    def test_remote_tls(self):
        self.make()
        r = self.request(peer="203.0.113.9", tls=True, authorization=basic("daniel", "tiger"))
        self.assertEqual(r.code, 200)
        self.assertEqual(r.json()["peer_address"], "203.0.113.9")

    def test_ipv6_loopback(self):
        self.make()
        self.assertEqual(self.request(peer="::1", authorization=basic("daniel", "tiger")).code, 200)

    def test_insecure_allowed(self):
        self.make(insecure_auth=True)
        r = self.request(peer="203.0.113.9", authorization=basic("daniel", "tiger"))
        self.assertEqual(r.code, 200)

    def test_trusted_proxy_forwarded_https(self):
        self.make(trusted_proxies=(_net("192.0.2.1/32"),))
        headers = [(b"X-Forwarded-For", b"198.51.100.7"), (b"X-Forwarded-Proto", b"https")]
        r = self.request(peer="192.0.2.1", headers=headers, authorization=basic("daniel", "tiger"))
        self.assertEqual(r.code, 200)
        self.assertEqual(r.json()["peer_address"], "198.51.100.7")
        headers[1] = (b"X-Forwarded-Proto", b"http")
        r = self.request(peer="192.0.2.1", headers=headers, authorization=basic("daniel", "tiger"))
        self.assertEqual(r.code, 403)

    def test_forwarded_headers_ignored_from_others(self):
        self.make(insecure_auth=True)
        headers = [(b"X-Forwarded-For", b"198.51.100.7"), (b"X-Forwarded-Proto", b"https")]
        r = self.request(peer="203.0.113.9", headers=headers, authorization=basic("daniel", "tiger"))
        self.assertEqual(r.json()["peer_address"], "203.0.113.9")

    def test_forwarded_for_rightmost_untrusted(self):
        """A client cannot pick its address: the rightmost hop not a trusted proxy wins."""
        self.make(trusted_proxies=(_net("192.0.2.0/24"),))
        headers = [(b"X-Forwarded-For", b"10.9.9.9, 198.51.100.7, 192.0.2.5"),
                   (b"X-Forwarded-Proto", b"https")]
        r = self.request(peer="192.0.2.1", headers=headers, authorization=basic("daniel", "tiger"))
        self.assertEqual(r.json()["peer_address"], "198.51.100.7")


class BearerTests(GuardTestCase):
    def setUp(self):
        self.make(checkers=[users(),
                            TokenTable({TOKEN: "ci-bot"})])

    def test_valid(self):
        r = self.request(authorization=b"Bearer " + TOKEN.encode())
        self.assertEqual(r.code, 200)
        self.assertEqual(r.json()["identities"], [{"identity": "ci-bot", "context": "BearerToken"}])
        self.assertEqual(self.request(authorization=b"bearer " + TOKEN.encode()).code, 200)

    def test_invalid_token(self):
        r = self.request(authorization=b"Bearer wrong-token")
        self.assertEqual(r.code, 401)
        self.assertIn('Bearer realm="authgateway", error="invalid_token"', r.all("WWW-Authenticate"))
        self.assertEqual(r.one("Cache-Control"), "no-store")

    def test_malformed(self):
        for value in (b"Bearer a b", b"Bearer", b"Bearer =abc", b"Bearer t\xc3\xa9"):
            r = self.request(authorization=value)
            self.assertEqual(r.code, 400, value)
            self.assertEqual(r.all("WWW-Authenticate"),
                             ['Bearer realm="authgateway", error="invalid_request"'])
            self.assertEqual(r.one("Cache-Control"), "no-store")

    def test_two_methods(self):
        """A token in the query as well as (or instead of) the header: 400."""
        r = self.request(path=b"/whoami?access_token=" + TOKEN.encode(),
                         authorization=b"Bearer " + TOKEN.encode())
        self.assertEqual(r.code, 400)
        r = self.request(path=b"/whoami?access_token=x")
        self.assertEqual(r.code, 400)

    def test_two_headers(self):
        r = self.request(headers=[(b"Authorization", b"Bearer " + TOKEN.encode())],
                         authorization=b"Bearer " + TOKEN.encode())
        self.assertEqual(r.code, 400)


class OutcomeTests(GuardTestCase):
    def test_throttled(self):
        throttle = Throttle(task.Clock(), max_failures=1, window=60, delay=0, max_delay=0)
        self.make(throttle=throttle)
        self.assertEqual(self.request(authorization=basic("daniel", "lion")).code, 401)
        r = self.request(authorization=basic("daniel", "tiger"))
        self.assertEqual(r.code, 429)
        self.assertEqual(r.one("Retry-After"), "60")
        self.assertEqual(r.one("Cache-Control"), "no-store")

    def test_backend_failure(self):
        self.make(checkers=[FixedChecker(RuntimeError("database down"))])
        r = self.request(authorization=basic("daniel", "tiger"))
        self.assertEqual(r.code, 503)
        self.assertEqual(r.one("Cache-Control"), "no-store")
        self.assertNotIn(b"database", r.raw)
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_client_leaves_during_login(self):
        cancelled = []
        pending = defer.Deferred(canceller=cancelled.append)

        @implementer(ICredentialsChecker)
        class Slow:
            credentialInterfaces = FixedChecker("x").credentialInterfaces

            def requestAvatarId(self, credentials):
                return pending

        self.make(checkers=[Slow()])
        r = self.request(authorization=basic("daniel", "tiger"))
        self.assertEqual(r.raw, b"")
        self.channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(cancelled, [pending])
        self.assertEqual(self.transport.value(), b"")


    def test_client_leaves_during_the_failure_delay(self):
        """A wrong password answered after the delay: hanging up meanwhile is still a failure."""
        clock = task.Clock()
        self.make(throttle=Throttle(clock, delay=5, max_delay=5))
        events = []

        class Sink:
            login = events.append

            def authz(self, event):
                pass

        self.portal.events.add(Sink())
        r = self.request(authorization=basic("daniel", "lion"))
        self.assertEqual(r.raw, b"")  # held for the delay
        self.channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual([(e.outcome, e.client_left) for e in events], [("failure", True)])
        self.assertFalse([c for c in clock.getDelayedCalls() if c.active()])


#: What every trusted proxy must send: who the client is, and that it used TLS.
CLIENT = [(b"X-Forwarded-For", b"198.51.100.7"), (b"X-Forwarded-Proto", b"https")]


class ForwardAuthTests(GuardTestCase):
    def setUp(self):
        self.make(policy=Policy(("http/app.test/admin", "post"), ("http/gw.test/auth", "get")),
                  groups=parse_groups("staff: daniel\nops: daniel\n"),
                  trusted_proxies=(_net("127.0.0.0/8"),))

    def test_allowed(self):
        r = self.request(path=b"/auth", authorization=basic("daniel", "tiger"), headers=[
            (b"X-Original-URL", b"https://App.Test:8443/admin/x?y=1"),
            (b"X-Original-Method", b"GET"), *CLIENT])
        self.assertEqual(r.code, 200)
        self.assertEqual(r.one("Remote-User"), "daniel")
        self.assertEqual(r.one("Remote-Groups"), "staff,ops")
        self.assertEqual(r.one("Cache-Control"), "no-store")
        self.assertEqual(self.policy.queries[-1], ("http/app.test/admin/x", "get"))

    def test_denied(self):
        r = self.request(path=b"/auth", authorization=basic("daniel", "tiger"), headers=[
            (b"X-Forwarded-Method", b"POST"), (b"X-Forwarded-Proto", b"https"),
            (b"X-Forwarded-Host", b"app.test"), (b"X-Forwarded-Uri", b"/admin/?q"),
            *CLIENT])
        self.assertEqual(r.code, 403)
        self.assertEqual(r.one("Cache-Control"), "no-store")
        self.assertIsNone(r.one("Remote-User"))
        self.assertEqual(self.policy.queries[-1], ("http/app.test/admin", "post"))

    def test_unauthenticated(self):
        r = self.request(path=b"/auth", headers=[
            (b"X-Original-URL", b"https://app.test/"), (b"X-Original-Method", b"GET"), *CLIENT])
        self.assertEqual(r.code, 401)
        self.assertEqual(r.all("WWW-Authenticate"), ['Basic realm="authgateway", charset="UTF-8"'])

    def test_bad_original_url(self):
        r = self.request(path=b"/auth", authorization=basic("daniel", "tiger"),
                         headers=[(b"X-Original-URL", b"/relative")])
        self.assertEqual(r.code, 400)

    def test_untrusted_peer_with_forwarded_target(self):
        """Forwarded target headers from a peer that is not a trusted proxy: 403, unchecked."""
        for header in (b"X-Original-URL", b"X-Forwarded-Uri"):
            r = self.request(path=b"/auth", peer="203.0.113.9", tls=True,
                             authorization=basic("daniel", "tiger"),
                             headers=[(header, b"https://app.test/")])
            self.assertEqual(r.code, 403)
        self.assertEqual(self.policy.queries, [])

    def test_untrusted_peer_checks_itself(self):
        r = self.request(path=b"/auth", peer="203.0.113.9", tls=True,
                         authorization=basic("daniel", "tiger"))
        self.assertEqual(r.code, 403)  # http/gw.test/auth get is denied
        self.assertEqual(self.policy.queries[-1], ("http/gw.test/auth", "get"))

    def test_mapped_trusted_proxy(self):
        """A dual-stack listener sees the proxy as ::ffff:127.0.0.1: still trusted."""
        r = self.request(path=b"/auth", peer="::ffff:127.0.0.1", authorization=basic("daniel", "tiger"),
                         headers=[(b"X-Original-URL", b"https://app.test/admin"),
                                  (b"X-Original-Method", b"GET"), *CLIENT])
        self.assertEqual(r.code, 200)
        self.assertEqual(self.policy.queries[-1], ("http/app.test/admin", "get"))

    def test_both_conventions(self):
        """A client adds the convention its proxy does not set: refused, never mixed."""
        r = self.request(path=b"/auth", authorization=basic("daniel", "tiger"), headers=[
            (b"X-Forwarded-Uri", b"/admin"), (b"X-Forwarded-Method", b"POST"),
            (b"X-Forwarded-Host", b"app.test"), (b"X-Original-URL", b"http://app.test/hello")])
        self.assertEqual(r.code, 400)

    def test_network_path_uri(self):
        r = self.request(path=b"/auth", authorization=basic("daniel", "tiger"), headers=[
            (b"X-Forwarded-Host", b"app.test"), (b"X-Forwarded-Uri", b"//admin/secret")])
        self.assertEqual(r.code, 400)

    def test_repeated_forwarded_header(self):
        r = self.request(path=b"/auth", authorization=basic("daniel", "tiger"), headers=[
            (b"X-Original-URL", b"http://app.test/hello"), (b"X-Original-URL", b"http://app.test/admin")])
        self.assertEqual(r.code, 400)

    def test_bearer_insufficient_scope(self):
        self.make(checkers=[TokenTable({TOKEN: "ci-bot"})], policy=Policy(("http/gw.test/auth", "get")))
        r = self.request(path=b"/auth", authorization=b"Bearer " + TOKEN.encode())
        self.assertEqual(r.code, 403)
        self.assertEqual(r.all("WWW-Authenticate"),
                         ['Bearer realm="authgateway", error="insufficient_scope"'])


class UpstreamTests(GuardTestCase):
    def proxied(self, **kwargs):
        self.upstream = FakeUpstream()
        kwargs.setdefault("upstream", "http://app.internal:3000")
        self.make(proxy=self.upstream, **kwargs)

    def get(self, path, **kwargs):
        return self.request(path=path, authorization=basic("daniel", "tiger"), **kwargs)

    def test_no_upstream(self):
        self.make()
        self.assertEqual(self.get(b"/app").code, 404)

    def test_proxied_with_identity(self):
        self.proxied(groups=parse_groups("staff: daniel\n"))
        r = self.get(b"/app/x?y=1")
        self.assertEqual((r.code, r.body), (200, b"proxied"))
        self.assertEqual(self.upstream.calls, [(b"/app/x?y=1", "daniel", ("staff",))])
        self.get(b"/")
        self.assertEqual(self.upstream.calls[-1][0], b"/")

    def test_upstream_gets_what_the_acl_saw(self):
        self.proxied()
        self.get(b"/admin/../hello/./x?q=..")
        self.assertEqual(self.upstream.calls[-1][0], b"/hello/x?q=..")

    def test_denied_not_proxied(self):
        self.proxied(policy=Policy(("http/app.internal/private", "get")))
        for path in (b"/private", b"/private/../private/%2e%2e/private", b"/x/../private"):
            self.assertEqual(self.get(path).code, 403, path)
        self.assertEqual(self.upstream.calls, [])

    def test_ambiguous_target_refused(self):
        self.proxied(policy=Policy(("http/app.internal/admin", "get")))
        for path in (b"/admin%2fx", b"/admin;x", b"/admin#x", b"http://other/admin", b"//admin"):
            r = self.get(path)
            self.assertEqual(r.code, 400, path)
            self.assertEqual(r.one("Cache-Control"), "no-store")
        self.assertEqual(self.upstream.calls, [])

    def test_host_cannot_pick_the_rules(self):
        """With one upstream and no --http-host, the Host header is not the ACL's host."""
        self.proxied(policy=Policy(("http/app.internal/admin", "get")))
        for host in (b"whatever", b"127.0.0.01", b"app.internal."):
            r = self.get(b"/admin", headers=[(b"Host", host)])
            self.assertEqual(r.code, 403, host)
        self.assertEqual(self.policy.queries[-1], ("http/app.internal/admin", "get"))

    def test_served_hosts(self):
        self.proxied(hosts=("app.example.com",), policy=Policy(("http/app.example.com/admin", "get")))
        self.assertEqual(self.get(b"/x", headers=[(b"Host", b"other.test")]).code, 421)
        self.assertEqual(self.get(b"/admin", headers=[(b"Host", b"APP.example.com:443")]).code, 403)
        self.assertEqual(self.get(b"/x", headers=[(b"Host", b"app.example.com")]).code, 200)

    def test_unauthenticated_not_proxied(self):
        self.proxied()
        self.assertEqual(self.request(path=b"/app").code, 401)
        self.assertEqual(self.upstream.calls, [])


class BoundsTests(GuardTestCase):
    def test_body_limit_own_resources(self):
        self.make(max_body=10)
        r = self.request(method=b"GET", body=b"x" * 11, authorization=basic("daniel", "tiger"))
        self.assertEqual(r.code, 413)
        r = self.request(path=b"/auth", body=b"x" * 10, authorization=basic("daniel", "tiger"))
        self.assertEqual(r.code, 200)

    def test_body_limit_without_upstream(self):
        """Without an upstream, the small limit applies before anything is read."""
        self.make(max_body=10)
        channel, transport = self.connect()
        channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 11\r\n"
                             b"Expect: 100-continue\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "))
        self.assertNotIn(b"100 Continue", transport.value())

    def test_body_limit_declared(self):
        """A Content-Length above the limit: 413 at once, connection closed, body unread."""
        self.make(proxy=FakeUpstream(), upstream="http://up.test", max_upstream_body=100)
        channel, transport = self.connect()
        channel.dataReceived(b"POST /app HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 101\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "))
        self.assertTrue(transport.disconnecting)

    def test_body_limit_chunked(self):
        self.make(proxy=CapturingUpstream(), upstream="http://up.test", max_upstream_body=100)
        channel, transport = self.connect()
        channel.dataReceived(b"POST /app HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n"
                             b"Authorization: " + basic("daniel", "tiger") + b"\r\n\r\n")
        channel.dataReceived(b"64\r\n" + b"x" * 100 + b"\r\n")
        self.assertEqual(transport.value(), b"")
        channel.dataReceived(b"1\r\nx\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "))
        self.assertTrue(transport.disconnecting)

    def test_too_many_headers(self):
        self.make()
        r = self.request(headers=[(b"X-H%d" % i, b"v") for i in range(101)])
        self.assertEqual(r.code, 400)

    def test_long_header_line(self):
        self.make()
        r = self.request(headers=[(b"X-Long", b"v" * 9000)])
        self.assertEqual(r.code, 431)
        self.assertTrue(self.transport.disconnecting)

    def test_long_request_line(self):
        self.make()
        r = self.request(path=b"/" + b"x" * 9000)
        self.assertEqual(r.code, 414)

    def test_idle_timeout(self):
        self.make(timeout=30)
        channel, transport = self.connect()
        channel.dataReceived(b"GET /whoami HTTP/1.1\r\n")
        self.clock.advance(31)
        self.assertTrue(transport.disconnecting or not transport.connected)


def resource_name(host, path, case_sensitive=False):
    """The ACL resource of a request target, None when it is refused (400) or the host unusable."""
    try:
        return resource_of(forwarded_host(host), parse_target(path), case_sensitive)
    except BadTarget:
        return None


class ResourceNameTests(SynchronousTestCase):
    def test_names(self):
        cases = {
            (b"gw.test", b"/"): "http/gw.test",
            (b"GW.Test:8080", b"/a/b"): "http/gw.test/a/b",
            (b"gw.test.", b"/a//./b/"): "http/gw.test/a/b",
            (b"gw.test", b"/a/../../b"): "http/gw.test/b",
            (b"gw.test", b"/%61dmin/%2e%2e/x"): "http/gw.test/x",
            (b"gw.test", b"/a%20b/c"): "http/gw.test/a b/c",
            (b"[::1]:8080", b"/x"): "http/[::1]/x",
            (b"[0:0::1]", b"/x"): "http/[::1]/x",
            (b"XN--BCHER-KVA.test", b"/"): "http/xn--bcher-kva.test",
            (b"gw.test", b"/ADMIN"): "http/gw.test/admin",
            (b"gw.test", b"/Admin/Users"): "http/gw.test/admin/users",
            (b"gw.test", b"/%41dmin"): "http/gw.test/admin",
        }
        for (host, path), expected in cases.items():
            self.assertEqual(resource_name(host, path), expected, (host, path))

    def test_unusable_host(self):
        for host in (None, b"", b"a/b", b"[::1", b"x\x00y", b"a b", b"::1", b"127.1",
                     b"0x7f.0.0.1", b"0177.0.0.1", b"a_b.test", b"x:1:2", b"x:", b"x:99999",
                     b"a%2eb", b"u@x", b"x\\y", b"[fe80::1%25eth0]", b"a..b", b".", b"-a.test",
                     "bücher.test".encode()):  # a Host is ASCII (RFC 9110 uri-host)
            self.assertIsNone(resource_name(host, b"/"), host)

    def test_case_sensitive(self):
        self.assertEqual(resource_name(b"GW.test", b"/Admin", case_sensitive=True),
                         "http/gw.test/Admin")

    def test_ambiguous_paths(self):
        for path in (b"/a%2Fb", b"/a%2fb", b"/a%5Cb", b"/a\\b", b"/admin;x", b"/a#b", b"//admin/x",
                     b"admin", b"http://x/admin", b"/%ff", b"/adm%c3in"):
            self.assertIsNone(resource_name(b"gw.test", path), path)

    def test_forwarded_target(self):
        cases = {
            b"/": b"/",
            b"/a/./b/../c?x=/../y": b"/a/c?x=/../y",
            b"/admin/../hello": b"/hello",
            b"/%2e%2e/%2E/a/": b"/a/",
            b"/a/b/..": b"/a/",
            b"/a%20b": b"/a%20b",
        }
        for target, forwarded in cases.items():
            self.assertEqual(parse_target(target).forwarded, forwarded, target)


def _net(text):
    return ipaddress.ip_network(text)


class HeaderDeadlineTests(GuardTestCase):
    def test_trickled_headers(self):
        """A byte every few seconds keeps the idle timer alive, not the header deadline."""
        self.make(timeout=30)
        channel, transport = self.connect()
        channel.dataReceived(b"GET /whoami HTTP/1.1\r\n")
        for _ in range(8):
            self.clock.advance(4)
            channel.dataReceived(b"X-A: b\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 "))
        self.assertTrue(transport.disconnecting)

    def test_keep_alive_request_gets_a_new_deadline(self):
        self.make(timeout=30)
        channel, transport = self.connect()
        request = b"GET /whoami HTTP/1.1\r\nHost: gw.test\r\nAuthorization: " + basic("daniel", "tiger")
        channel.dataReceived(request + b"\r\n\r\n")
        self.clock.advance(20)
        channel.dataReceived(request + b"\r\n\r\n")
        self.clock.advance(20)
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 "), 2)
        self.assertFalse(transport.disconnecting)


class ListConsumer:
    def __init__(self):
        self.chunks = []

    def write(self, data):
        self.chunks.append(data)


class CapturingUpstream:
    """Takes the body producer the way the Agent would, when the test says so."""

    def __init__(self):
        self.calls = []

    def render(self, request, identity, groups, target, body=None):
        self.calls.append((request, body))
        return server.NOT_DONE_YET


class StreamingTests(GuardTestCase):
    def setUp(self):
        self.upstream = CapturingUpstream()
        self.make(proxy=self.upstream, upstream="http://up.test")

    def head(self, length=b"200000", auth=None):
        auth = auth or basic("daniel", "tiger")
        channel, transport = self.connect()
        framing = (b"Content-Length: " + length) if length else b"Transfer-Encoding: chunked"
        channel.dataReceived(b"PUT /f HTTP/1.1\r\nHost: up.test\r\nAuthorization: " + auth
                             + b"\r\n" + framing + b"\r\n\r\n")
        return channel, transport

    def test_processed_before_the_body(self):
        channel, transport = self.head()
        [(request, body)] = self.upstream.calls
        self.assertEqual(body.length, 200000)
        consumer = ListConsumer()
        finished = body.startProducing(consumer)
        channel.dataReceived(b"a" * 100000)
        self.assertEqual(b"".join(consumer.chunks), b"a" * 100000)
        body.pauseProducing()  # the upstream is slow
        self.assertEqual(transport.producerState, "paused")
        channel.dataReceived(b"b" * 50000)  # already read: kept, and reading stays paused
        self.assertEqual(len(b"".join(consumer.chunks)), 100000)
        body.resumeProducing()
        self.assertEqual(transport.producerState, "producing")
        channel.dataReceived(b"c" * 50000)
        self.assertEqual(b"".join(consumer.chunks), b"a" * 100000 + b"b" * 50000 + b"c" * 50000)
        self.assertIsNone(self.successResultOf(finished))
        request.content.seek(0)
        self.assertEqual(request.content.read(), b"")  # nothing spooled

    def test_chunked(self):
        channel, _ = self.head(length=b"")
        [(_, body)] = self.upstream.calls
        consumer = ListConsumer()
        finished = body.startProducing(consumer)
        channel.dataReceived(b"5\r\nhello\r\n0\r\n\r\n")
        self.assertEqual(b"".join(consumer.chunks), b"hello")
        self.successResultOf(finished)

    def test_login_pending_holds_reading(self):
        pending = defer.Deferred()

        @implementer(ICredentialsChecker)
        class Slow:
            credentialInterfaces = FixedChecker("x").credentialInterfaces

            def requestAvatarId(self, credentials):
                return pending

        self.make(checkers=[Slow()], proxy=self.upstream, upstream="http://up.test")
        channel, transport = self.head()
        self.assertEqual(transport.producerState, "paused")
        channel.dataReceived(b"x" * 1000)  # in flight already
        self.assertEqual(self.upstream.calls, [])
        pending.callback("daniel")
        [(_, body)] = self.upstream.calls
        consumer = ListConsumer()
        body.startProducing(consumer)
        self.assertEqual(b"".join(consumer.chunks), b"x" * 1000)
        self.assertEqual(transport.producerState, "producing")

    def test_refused_before_the_body(self):
        """Issue 11 item 5: a refused upload is answered at once, its body never read."""
        channel, transport = self.head(auth=basic("daniel", "lion"))
        self.assertEqual(self.upstream.calls, [])
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 401 "), transport.value())
        self.assertTrue(transport.disconnecting)  # a real transport stops reading now
        channel.dataReceived(b"z" * 200000)  # already in flight: dropped
        self.assertEqual(transport.value().count(b"HTTP/1.1 "), 1)

    def test_answer_before_the_body_closes(self):
        """An answer before the whole body: the rest must never be read as a request."""
        channel, transport = self.head()
        [(request, body)] = self.upstream.calls
        channel.dataReceived(b"a" * 1000)
        request.setResponseCode(413)
        request.finish()
        self.assertTrue(transport.disconnecting)

    def test_small_bodies_not_streamed(self):
        channel, transport = self.head(length=b"10")
        self.assertEqual(self.upstream.calls, [])
        channel.dataReceived(b"0123456789")
        [(request, body)] = self.upstream.calls
        self.assertIsNone(body)
        self.assertEqual(request.content.read(), b"0123456789")

    def test_expect_continue_before_an_early_answer(self):
        """A decision made while the headers are handled: 100 Continue first, and once."""
        channel, transport = self.connect()
        channel.dataReceived(b"PUT /a#b HTTP/1.1\r\nHost: up.test\r\nAuthorization: "
                             + basic("daniel", "tiger") + b"\r\nExpect: 100-continue\r\n"
                             b"Content-Length: 100000\r\n\r\n")
        out = transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 400 "), out[:80])
        self.assertEqual(out.count(b"100 Continue"), 1)
        self.assertTrue(transport.disconnecting)  # the body never came: not a next request

    def test_chunked_get_decided_early(self):
        """Any chunked body is decided before it is read, whatever the method."""
        channel, transport = self.connect()
        channel.dataReceived(b"GET /f HTTP/1.1\r\nHost: up.test\r\nAuthorization: "
                             + basic("daniel", "tiger") + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
        [(request, body)] = self.upstream.calls
        consumer = ListConsumer()
        finished = body.startProducing(consumer)
        channel.dataReceived(b"0\r\n\r\n")
        self.successResultOf(finished)
        self.assertEqual(consumer.chunks, [])

    def test_decision_error_closes(self):
        """A failure before the body is in answers 500 and never reads the rest as a request."""
        def broken(request):
            raise RuntimeError("boom")

        self.site.resource.decide = broken
        channel, transport = self.head()
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 500 "))
        self.assertTrue(transport.disconnecting)
        self.flushLoggedErrors(RuntimeError)
