"""
The HTTP front door's review findings (forward-auth that failed open on a
missing header, path spellings other servers read as another path, a
trusted proxy that does not say who the client is), at unit level through
the real L{GatewaySite} over a C{StringTransport}. The ACL is the README's
deny-list: C{/admin} for admins, GET/HEAD/POST for everyone elsewhere, so
every bypass below was a 200 before.
"""

from __future__ import annotations

import ipaddress
import unicodedata

from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from gateway import tap
from gateway.acl import parse_acl
from gateway.addresses import BadHost, parse_host
from gateway.groups import parse_groups
from gateway.web.resources import BadTarget, check_acl_keys, parse_target, resource_name
from tests.test_web_guard import FakeUpstream, GuardTestCase, basic
from tests.test_web_hosts import ACL

PROXY = (ipaddress.ip_network("127.0.0.0/8"),)
#: What a trusted proxy must send about the client.
CLIENT = [(b"X-Forwarded-For", b"198.51.100.7"), (b"X-Forwarded-Proto", b"https")]
NGINX = [(b"X-Original-URL", b"http://app.example.com/admin"), (b"X-Original-Method", b"GET")]
TRAEFIK = [(b"X-Forwarded-Method", b"GET"), (b"X-Forwarded-Host", b"app.example.com"),
           (b"X-Forwarded-Uri", b"/admin")]


class ForwardAuthTargetTests(GuardTestCase):
    """Findings 1 and 2: /auth checks the whole original request, or answers 400."""

    def setUp(self):
        self.make(policy=parse_acl(ACL), groups=parse_groups("admins: jürgen\n"),
                  trusted_proxies=PROXY)

    def auth(self, headers, peer="127.0.0.1", user=("daniel", "tiger")):
        return self.request(path=b"/auth", authorization=basic(*user), peer=peer, tls=True,
                            headers=[(b"Host", b"app.example.com"), *headers])

    def test_complete_targets(self):
        """The baseline: both conventions, complete, are checked (403 for /admin)."""
        for convention in (NGINX, TRAEFIK):
            self.assertEqual(self.auth([*convention, *CLIENT]).code, 403)
            r = self.auth([*convention, *CLIENT], user=("jürgen", "pässwörd"))
            self.assertEqual(r.code, 200)

    def test_trusted_proxy_without_target(self):
        """Finding 1: the request to /auth itself (allowed by the catch-all) is never checked."""
        r = self.auth(CLIENT)
        self.assertEqual(r.code, 400)
        self.assertIn(b"X-Original-URL", r.body)
        self.assertIsNone(r.one("Remote-User"))

    def test_lookalike_headers(self):
        """
        Finding 1: other proxies' target headers are refused, naming them,
        from the trusted proxy and from anyone else, with or without a
        target the gateway reads, under any spelling of the name.
        """
        for name in (b"X-Original-URI", b"X-Forwarded-Prefix", b"X-Rewrite-URL",
                     b"x_original_uri", b"X.Forwarded.Path", b"X-Original-Host",
                     b"X-Envoy-Original-Path", b"X-Forwarded-Url"):
            for peer, extra in (("127.0.0.1", CLIENT), ("127.0.0.1", [*NGINX, *CLIENT]),
                                ("203.0.113.9", [])):
                r = self.auth([(name, b"/admin"), *extra], peer=peer)
                self.assertEqual(r.code, 400, (name, peer))
                self.assertIsNone(r.one("Remote-User"))
        r = self.auth([(b"X-Original-URI", b"/admin"), (b"X-Forwarded-Prefix", b"/x"), *CLIENT])
        self.assertIn(b"x-forwarded-prefix, x-original-uri not read here", r.body)

    def test_missing_header(self):
        """Finding 2: each header of a convention missing (or empty) is a 400, never a default."""
        for convention in (NGINX, TRAEFIK):
            for i, (name, _) in enumerate(convention):
                rest = convention[:i] + convention[i + 1:]
                for headers in (rest, [*rest, (name, b"")]):
                    r = self.auth([*headers, *CLIENT])
                    self.assertEqual(r.code, 400, headers)
                    self.assertIsNone(r.one("Remote-User"))

    def test_missing_method_is_not_get(self):
        """Finding 2 as the reviewer saw it: PUT on an allowed path, the method not sent."""
        for headers in ([(b"X-Original-URL", b"http://app.example.com/public")],
                        [(b"X-Forwarded-Uri", b"/public"),
                         (b"X-Forwarded-Host", b"app.example.com")]):
            self.assertEqual(self.auth([*headers, *CLIENT]).code, 400, headers)

    def test_client_asks_about_itself(self):
        """A peer that is not a trusted proxy still gets its own request to /auth checked."""
        self.assertEqual(self.auth([], peer="203.0.113.9").code, 200)


class ForwardedForTests(GuardTestCase):
    """Finding 5: a trusted proxy must say who the client is."""

    def setUp(self):
        self.make(trusted_proxies=PROXY)

    def whoami(self, headers, peer="127.0.0.1"):
        return self.request(authorization=basic("daniel", "tiger"), peer=peer, tls=True,
                            headers=headers)

    def test_missing(self):
        r = self.whoami([(b"X-Forwarded-Proto", b"https")])
        self.assertEqual(r.code, 400)
        self.assertIn(b"X-Forwarded-For", r.body)

    def test_unusable(self):
        """The proxy's own entry must be an address: garbage would leave the proxy as client."""
        for value in (b"", b"unknown", b"198.51.100.7, unknown", b"unknown, 127.0.0.2"):
            r = self.whoami([(b"X-Forwarded-For", value), (b"X-Forwarded-Proto", b"https")])
            self.assertEqual(r.code, 400, value)

    def test_client_seen(self):
        r = self.whoami([(b"X-Forwarded-For", b"unknown, 198.51.100.7, 127.0.0.2"),
                         (b"X-Forwarded-Proto", b"https")])
        self.assertEqual(r.code, 200)
        self.assertEqual(r.json()["peer_address"], "198.51.100.7")

    def test_proto_over_tls(self):
        """Over TLS, the proxy must say whether its client used TLS; over plain HTTP it may not."""
        r = self.whoami([(b"X-Forwarded-For", b"127.0.0.9")])
        self.assertEqual(r.code, 400)
        self.assertIn(b"X-Forwarded-Proto", r.body)
        r = self.request(authorization=basic("daniel", "tiger"),
                         headers=[(b"X-Forwarded-For", b"127.0.0.9")])
        self.assertEqual(r.code, 200)

    def test_others_need_none(self):
        self.assertEqual(self.whoami([], peer="203.0.113.9").code, 200)


#: Finding 3: non-ASCII letters other servers' case-insensitive comparisons
#: read as ASCII; finding 4: control, invisible, trailing-dot/blank segments.
#: Neighbours: NFKC compatibility forms (fullwidth, a fullwidth '/').
REFUSED_PATHS = [
    "/adm\u0131n", "/ADM\u0130N", "/\u017fecret", "/admin/\u212aey", "/\ufb00",
    "/stra\u00dfe", "/\uff41dmin", "/admin\uff0fx", "/admin\u2024json", "/admin\u00b2",
]
REFUSED_TARGETS = [
    b"/admin%00", b"/admin%00.json", b"/admin%0a", b"/admin%0d%0ax", b"/admin%09",
    b"/admin%7f", b"/admin%c2%85", b"/admin%c2%a0", b"/%e2%80%8badmin", b"/admin%e2%80%ae",
    b"/admin%ef%bb%bf", b"/admin.", b"/admin%2e", b"/admin...", b"/admin%20", b"/admin./x",
    b"/admin::$DATA", b"/admin::%24DATA", b"/admin:$i30:$INDEX_ALLOCATION/x",
    b"/adm%cd%8fin", b"/admin%e3%85%a4", b"/admin%ef%b8%8f", b"/admin%f3%a0%84%80",
]


def encode_path(path: str) -> bytes:
    return "".join(
        c if c.isascii() else "".join(f"%{b:02X}" for b in c.encode()) for c in path
    ).encode()


class PathSpellingTests(GuardTestCase):
    """Findings 3 and 4 through the reverse proxy and /auth."""

    def proxied(self, **kwargs):
        self.upstream = FakeUpstream()
        self.make(proxy=self.upstream, policy=parse_acl(ACL),
                  upstream="http://app.example.com:3000", groups=parse_groups("admins: jürgen\n"),
                  trusted_proxies=PROXY, **kwargs)

    def get(self, target, headers=()):
        return self.request(path=target, authorization=basic("daniel", "tiger"), peer="203.0.113.9",
                            tls=True, headers=headers)

    def test_refused_through_the_proxy(self):
        self.proxied()
        for target in [*map(encode_path, REFUSED_PATHS), *REFUSED_TARGETS]:
            r = self.get(target)
            self.assertEqual(r.code, 400, target)
            self.assertEqual(r.one("Cache-Control"), "no-store")
        self.assertEqual(self.upstream.calls, [])

    def test_refused_through_auth(self):
        self.proxied()
        for target in [*map(encode_path, REFUSED_PATHS), *REFUSED_TARGETS]:
            for headers in ([(b"X-Original-URL", b"http://app.example.com" + target),
                             (b"X-Original-Method", b"GET")],
                            [(b"X-Forwarded-Uri", target), (b"X-Forwarded-Method", b"GET"),
                             (b"X-Forwarded-Host", b"app.example.com")]):
                r = self.request(path=b"/auth", authorization=basic("daniel", "tiger"),
                                 headers=[*headers, *CLIENT])
                self.assertEqual(r.code, 400, (target, headers[0][0]))

    def test_other_non_ascii_paths(self):
        """Turkish and other letters without an ASCII case mapping still work."""
        self.proxied()
        for path in ("/\u015fi\u015f", "/\u00c7ALI\u015eMA/\u00f6\u011fe", "/caf\u00e9",
                     "/\u0431\u0443\u043a\u0432\u044b", "/\u65e5\u672c", "/admin.json", "/a.b/c"):
            self.assertEqual(self.get(encode_path(path)).code, 200, path)

    def test_composed_and_decomposed(self):
        """A rule for NFC 'café' covers 'cafe' + U+0301, which macOS file systems store."""
        self.upstream = FakeUpstream()
        acl = ACL.replace("http/app.example.com/admin", "http/app.example.com/caf\u00e9")
        self.make(proxy=self.upstream, policy=parse_acl(acl),
                  upstream="http://app.example.com:3000")
        for path in (b"/caf%C3%A9", b"/cafe%CC%81", b"/CAFE%CC%81"):
            self.assertEqual(self.get(path).code, 403, path)
        self.assertEqual(self.upstream.calls, [])

    def test_case_sensitive_lifts_case_rule_only(self):
        self.proxied(case_sensitive_paths=True)
        self.assertEqual(self.get(encode_path("/adm\u0131n")).code, 200)
        self.assertEqual(self.get(encode_path("/\uff41dmin")).code, 400)
        self.assertEqual(self.get(b"/admin%00").code, 400)
        self.assertEqual(self.get(b"/admin.").code, 400)


class HostSpellingTests(SynchronousTestCase):
    """Finding 3 for the host: a name a case mapping (or transitional IDNA) reads as another."""

    def test_refused(self):
        for host in ("adm\u0131n.example", "xn--admn-nza.example", "stra\u00dfe.example",
                     "xn--strae-oqa.example"):
            self.assertRaises(BadHost, parse_host, host)
        self.assertRaises(usage.UsageError, tap.Options().parseOptions,
                          ["--http-host", "adm\u0131n.example"])

    def test_other_idn(self):
        self.assertEqual(parse_host("b\u00fccher.test"), "xn--bcher-kva.test")
        self.assertEqual(parse_host("\u015eeker.test"), parse_host("\u015feker.test"))


def _simple(mapped: str, char: str) -> str:
    return mapped if len(mapped) == 1 else char


def java_key(char: str) -> str:
    """
    Java's C{regionMatches(ignoreCase)} per character: equal, or equal upper
    case, or equal lower case of the upper case, with Unicode's simple
    (one-character) mappings.
    """
    upper = _simple(char.upper(), char)
    lower = "i" if upper == "\u0130" else _simple(upper.lower(), upper)
    return lower


def _java_classes() -> dict[str, list[str]]:
    classes: dict[str, list[str]] = {}
    for code in range(0x20, 0x10000):
        char = chr(code)
        if 0xD800 <= code < 0xE000 or char in "/\\%;#?" or not char.isprintable():
            continue
        classes.setdefault(java_key(char), []).append(char)
    return {key: chars for key, chars in classes.items() if len(chars) > 1}


JAVA_CLASSES = _java_classes()
_FOLDABLE = sorted(c for chars in JAVA_CLASSES.values() for c in chars)


class JavaCaseTests(SynchronousTestCase):
    """
    Finding 3, as a property: two paths equal to Java's C{equalsIgnoreCase}
    (segment by segment) name the same ACL resource, or one is refused.
    """

    def test_known(self):
        self.assertEqual(java_key("\u0131"), java_key("i"))
        self.assertEqual(java_key("\u0130"), java_key("I"))
        self.assertEqual(java_key("\u212a"), java_key("k"))
        self.assertEqual(java_key("\u017f"), java_key("s"))

    @settings(max_examples=300, deadline=None)
    @given(st.data())
    @example(None)
    def test_same_resource_or_refused(self, data):
        if data is None:  # the reviewer's case
            first, second = "/admin", "/adm\u0131n"
        else:
            segments = data.draw(st.lists(
                st.text(st.sampled_from(_FOLDABLE), min_size=1, max_size=6), min_size=1, max_size=3
            ))
            first = "/" + "/".join(segments)
            second = "".join(
                c if c == "/" else data.draw(st.sampled_from(JAVA_CLASSES[java_key(c)]))
                for c in first
            )
        names = []
        for path in (first, second):
            try:
                target = parse_target(encode_path(path))
            except BadTarget:
                return
            names.append(resource_name("app.example.com", target))
        self.assertEqual(names[0], names[1], (first, second))


class ACLKeySegmentTests(SynchronousTestCase):
    """A key no request can reach any more (its segment is refused) stops the start."""

    def test_refused(self):
        for path in ("admin.", "adm\u0131n", "\uff41dmin", "admin\u00a0", "x::$DATA"):
            acl = parse_acl(f'[[acl."http/app.example.com/{path}"]]\nallow = false\n'
                            'privileges = ["*"]\nidentity.Any = {}\n')
            e = self.assertRaises(ValueError, check_acl_keys, acl)
            self.assertIn("no request reaches it", str(e))

    def test_not_nfc(self):
        acl = parse_acl('[[acl."http/app.example.com/cafe\u0301"]]\nallow = false\n'
                        'privileges = ["*"]\nidentity.Any = {}\n')
        e = self.assertRaises(ValueError, check_acl_keys, acl, case_sensitive=True)
        self.assertIn("NFC", str(e))

    def test_case_sensitive(self):
        acl = parse_acl('[[acl."http/app.example.com/adm\u0131n"]]\nallow = false\n'
                        'privileges = ["*"]\nidentity.Any = {}\n')
        check_acl_keys(acl, case_sensitive=True)


class ParseTargetPropertyTests(SynchronousTestCase):
    """parse_target on any bytes: BadTarget, or segments with no character another server folds."""

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.one_of(st.sampled_from(["/", ".", "%00", "%2e", " ", "%20", ":$"]),
                              st.text(min_size=1, max_size=3)), max_size=8),
           st.booleans())
    def test_any_target(self, parts, case_sensitive):
        raw = "/" + "".join(parts)
        try:
            target = parse_target(raw.encode("utf-8", "surrogatepass"), case_sensitive)
        except BadTarget:
            return
        for segment in target.segments:
            self.assertTrue(segment.isprintable(), segment)
            self.assertFalse(segment.endswith((".", " ")), segment)
            self.assertTrue(all(
                c.isascii() or not any(x.isascii() for x in unicodedata.normalize("NFKC", c))
                for c in segment
            ), segment)
            if not case_sensitive:
                self.assertTrue(all(c.isascii() or not any(
                    x.isascii() for x in c.upper() + c.lower() + c.casefold()) for c in segment))
