"""
Issue 11 items 1 and 2 at unit level: the one host canonicaliser
(L{gateway.addresses.parse_host}), the strict C{X-Original-URL} parser, C{/auth}
and the reverse proxy with C{--http-host}, case-folded ACL paths and
method overrides, through the real L{GatewaySite} over a C{StringTransport}.
"""

from __future__ import annotations

import ipaddress

from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from gateway import tap
from gateway.acl import parse_acl
from gateway.addresses import BadHost, canonical_host, parse_host, split_authority
from gateway.groups import parse_groups
from gateway.web.resources import BadTarget, check_acl_keys, parse_original_url
from tests.test_web_guard import FakeUpstream, GuardTestCase, basic

#: The README's example: /admin for admins only, GET/HEAD/POST elsewhere.
ACL = """\
[[acl."http/app.example.com/admin"]]
allow = true
privileges = ["*"]
identity.Group = "admins"

[[acl."http/app.example.com/admin"]]
allow = false
privileges = ["*"]
identity.Any = {}

[[acl."http"]]
allow = true
privileges = ["get", "head", "post"]
identity.Authenticated = {}
"""

#: X-Original-URL values of the issue and their neighbours: never 200.
REFUSED_URLS = {
    # The reproductions.
    b"http://app.example.com?/admin": 400,
    b"http://x/admin": 403,  # not a --http-host
    b"http://app.example.com:1:2/admin": 400,
    b"http://app.example.com\\/admin": 400,
    # The same classes, other spellings.
    b"http://app.example.com/admin": 403,
    b"HTTP://APP.Example.COM./admin": 403,
    b"https://app.example.com:8443/admin/users": 403,
    b"http://app.example.com/ADMIN": 403,
    b"http://app.example.com/Admin/users": 403,
    b"http://app.example.com/%41dmin": 403,
    b"http://app.example.com/x/../admin": 400,  # nginx forwards it as written: nothing resolved
    b"http://app.example.com/admin/../app": 400,
    b"http://app.example.com/admin/%2e%2e/app": 400,
    b"http://app.example.com/./admin": 400,
    b"http://app.example.com/app//admin": 400,
    b"http://app.example.com#/admin": 400,
    b"http://app.example.com/x#/../admin": 400,
    b"http://app.example.com?x=1/admin": 400,
    b"http://app.example.com": 400,
    b"http://app.example.com:/admin": 400,
    b"http://app.example.com:99999/admin": 400,
    b"http://app.example.com:8o/admin": 400,
    b"http://app.example.com:-1/admin": 400,
    b"http://u:p@app.example.com/admin": 400,
    b"http://@app.example.com/admin": 400,
    b"http://x@app.example.com/admin": 400,
    b"http://app.example.com@x/admin": 400,
    b"http://app%2eexample.com/admin": 400,
    b"http://app.example.com%2f/admin": 400,
    b"http:\\\\app.example.com/admin": 400,
    b"http://app.example.com\\admin": 400,
    b"http:/app.example.com/admin": 400,
    b"http:///admin": 400,
    b"//app.example.com/admin": 400,
    b"/admin": 400,
    b"ftp://app.example.com/admin": 400,
    b"javascript://app.example.com/admin": 400,
    b"http://app.example.com /admin": 400,
    b"http://app.example.com\t/admin": 400,
    b"http://app.example.com/ad min": 400,
    b"http://app.example.com/adm\xc3\xafn": 400,
    b"http://app_example.com/admin": 400,
    b"http://app..example.com/admin": 400,
    b"http://.app.example.com/admin": 400,
    b"http://127.1/admin": 400,
    b"http://0x7f.0.0.1/admin": 400,
    b"http://0177.0.0.1/admin": 400,
    b"http://[::1/admin": 400,
    b"http://[::1]x/admin": 400,
    b"http://[fe80::1%25eth0]/admin": 400,
    b"http://::1/admin": 400,
    b"http://app.example.com/admin%2f": 400,
    b"http://app.example.com/admin;x": 400,
    b"http://app.example.com//admin": 400,
}


class ForwardAuthHostTests(GuardTestCase):
    """Issue 11 item 1: /auth takes a host only from a strict URL, and only a served one."""

    def setUp(self):
        self.make(policy=parse_acl(ACL), hosts=("app.example.com",),
                  groups=parse_groups("admins: jürgen\n"),
                  trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),))

    def auth(self, headers, user=("daniel", "tiger"), **kwargs):
        headers = [*headers, (b"X-Forwarded-For", b"198.51.100.7"), (b"X-Forwarded-Proto", b"https")]
        return self.request(path=b"/auth", authorization=basic(*user), headers=headers, **kwargs)

    def test_baseline(self):
        url = [(b"X-Original-URL", b"http://app.example.com/hello"), (b"X-Original-Method", b"GET")]
        self.assertEqual(self.auth(url).code, 200)
        admin = [(b"X-Original-URL", b"http://app.example.com/admin"),
                 (b"X-Original-Method", b"GET")]
        self.assertEqual(self.auth(admin, ("jürgen", "pässwörd")).code, 200)

    def test_original_urls(self):
        for url, code in REFUSED_URLS.items():
            r = self.auth([(b"X-Original-URL", url), (b"X-Original-Method", b"GET")])
            self.assertEqual(r.code, code, url)
            self.assertIsNone(r.one("Remote-User"), url)

    def test_forwarded_host(self):
        """The Traefik/Caddy convention: X-Forwarded-Host, equally strict."""
        cases = {
            b"app.example.com": 403, b"APP.example.com.:443": 403, b"x": 403,
            b"app.example.com:1:2": 400, b"app.example.com, x": 400, b"evil.example/reset?": 400,
            b"app.example.com\\": 400, b"u@app.example.com": 400, b"127.1": 400, b"": 400,
        }
        for host, code in cases.items():
            r = self.auth([(b"X-Forwarded-Host", host), (b"X-Forwarded-Uri", b"/admin"),
                           (b"X-Forwarded-Method", b"GET")])
            self.assertEqual(r.code, code, host)
        r = self.auth([(b"X-Forwarded-Host", b"app.example.com"), (b"X-Forwarded-Uri", b"/x"),
                       (b"X-Forwarded-Method", b"GET")])
        self.assertEqual(r.code, 200)

    def test_bad_forwarded_method(self):
        for method in (b"GET POST", b"G\x00T", b"GET,DELETE"):
            r = self.auth([(b"X-Original-URL", b"http://app.example.com/x"),
                           (b"X-Original-Method", method)])
            self.assertEqual(r.code, 400, method)

    def test_own_host_checked(self):
        """/auth asked by a client about itself: the request's Host must be served too."""
        client = {"peer": "203.0.113.9", "tls": True}
        self.assertEqual(self.auth([(b"Host", b"other.test")], **client).code, 403)
        self.assertEqual(self.auth([(b"Host", b"app.example.com")], **client).code, 200)

    def test_method_override(self):
        """
        nginx and Traefik hand the client's headers to /auth: an override
        the ACL does not grant is a 403, whatever the original method.
        """
        for name in (b"X-HTTP-Method-Override", b"X-HTTP-Method", b"X-Method-Override",
                     b"x_http_method_override", b"X.Method.Override"):
            r = self.auth([(b"X-Original-URL", b"http://app.example.com/x"),
                           (b"X-Original-Method", b"POST"), (name, b"DELETE")])
            self.assertEqual(r.code, 403, name)
        r = self.auth([(b"X-Original-URL", b"http://app.example.com/x"),
                       (b"X-Original-Method", b"GET"), (b"X-HTTP-Method-Override", b"HEAD")])
        self.assertEqual(r.code, 200)
        r = self.auth([(b"X-Original-URL", b"http://app.example.com/x"),
                       (b"X-Original-Method", b"GET"), (b"X-HTTP-Method-Override", b"DEL ETE")])
        self.assertEqual(r.code, 400)


class UpstreamPathTests(GuardTestCase):
    """Issue 11 item 2: the reverse proxy's ACL is not case-sensitive, unlike Express's router."""

    def proxied(self, **kwargs):
        self.upstream = FakeUpstream()
        self.make(proxy=self.upstream, policy=parse_acl(ACL), upstream="http://app.example.com:3000",
                  **kwargs)

    def get(self, path, method=b"GET", headers=()):
        return self.request(path=path, method=method, authorization=basic("daniel", "tiger"),
                            headers=headers)

    def test_case_variants_denied(self):
        self.proxied()
        for path in (b"/admin", b"/ADMIN", b"/Admin/users", b"/aDmIn/", b"/%41DMIN", b"/x/../ADMIN"):
            self.assertEqual(self.get(path).code, 403, path)
        self.assertEqual(self.upstream.calls, [])
        self.assertEqual(self.get(b"/Hello").code, 200)
        self.assertEqual(self.upstream.calls, [(b"/Hello", "daniel", ())])  # sent as written

    def test_case_sensitive_option(self):
        self.proxied(case_sensitive_paths=True)
        self.assertEqual(self.get(b"/admin").code, 403)
        self.assertEqual(self.get(b"/ADMIN").code, 200)

    def test_kept_override_checked(self):
        """With --http-keep-method-override, the ACL must grant the override too."""
        self.proxied(keep_method_override=True)
        headers = [(b"X-HTTP-Method-Override", b"DELETE")]
        self.assertEqual(self.get(b"/x", b"POST", headers).code, 403)
        self.assertEqual(self.get(b"/x", b"POST", [(b"x_method_override", b"HEAD")]).code, 200)
        self.assertEqual(len(self.upstream.calls), 1)

    def test_bad_host_with_served_hosts(self):
        self.proxied(hosts=("app.example.com",))
        for host in (b"app.example.com:1:2", b"127.1", b"app.example.com/x", b"u@app.example.com"):
            self.assertEqual(self.get(b"/x", headers=[(b"Host", host)]).code, 400, host)
        self.assertEqual(self.get(b"/x", headers=[(b"Host", b"APP.example.com.:443")]).code, 200)
        self.assertEqual(self.upstream.calls, [(b"/x", "daniel", ())])


class ACLKeyTests(SynchronousTestCase):
    """ACL keys that could never match are refused at start, naming the key."""

    def test_upper_case_key(self):
        acl = parse_acl('[[acl."http/app.example.com/Admin"]]\nallow = false\n'
                        'privileges = ["*"]\nidentity.Any = {}\n')
        e = self.assertRaises(ValueError, check_acl_keys, acl)
        self.assertIn("'http/app.example.com/Admin'", str(e))
        self.assertNotIn("\n", str(e))
        check_acl_keys(acl, case_sensitive=True)

    def test_host_not_canonical(self):
        for key in ("http/App.example.com", "http/bücher.test/x", "http/::1/x", "http/127.1"):
            acl = parse_acl(f'[[acl."{key}"]]\nallow = true\nprivileges = ["*"]\nidentity.Any = {{}}\n')
            e = self.assertRaises(ValueError, check_acl_keys, acl, True)
            self.assertIn(repr(key), str(e))
        for key in ("http", "http/*/admin", "http/[::1]/x", "http/xn--bcher-kva.test", "smtp/Relay"):
            acl = parse_acl(f'[[acl."{key}"]]\nallow = true\nprivileges = ["*"]\nidentity.Any = {{}}\n')
            check_acl_keys(acl)

    def test_refused_at_start(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('[[acl."http/app.example.com/Admin"]]\nallow = false\n'
                    'privileges = ["*"]\nidentity.Any = {}\n')
        options = tap.Options()
        e = self.assertRaises(usage.UsageError, options.parseOptions, [
            "--auth", "memory:daniel:tiger", "--acl", path, "--data-dir", self.mktemp()])
        self.assertIn("http/app.example.com/Admin", str(e))
        self.assertIn("--http-case-sensitive-paths", str(e))


class HostParserTests(SynchronousTestCase):
    def test_canonical(self):
        cases = {
            "App.Example.COM.": "app.example.com", "bücher.test": "xn--bcher-kva.test",
            "XN--BCHER-KVA.TEST": "xn--bcher-kva.test", "127.0.0.1": "127.0.0.1",
            "[::1]": "[::1]", "[0:0:0:0:0:0:0:1]": "[::1]", "[2001:DB8::1]": "[2001:db8::1]",
            "localhost": "localhost", "a-b.c": "a-b.c", "0.0.0.0": "0.0.0.0",
        }
        for host, canonical in cases.items():
            self.assertEqual(parse_host(host), canonical, host)

    def test_refused(self):
        for host in ("", ".", "..", "a..b", "-a", "a-", "a_b", "a b", "a/b", "a\\b", "a%41",
                     "127.1", "127.0.1", "0x7f.0.0.1", "0177.0.0.1", "127.0.0.01", "1.2.3.256",
                     "1.2.3.4.5", "a.123", "a.0x1", "::1", "[::1", "[::1]]", "[fe80::1%eth0]",
                     "[v1.x]", "[1.2.3.4]", "a" * 64 + ".test", ("a" * 63 + ".") * 4 + "test",
                     "xn--zz.test", "\u200b.test", "a\x00b", "[::1]:80"):
            self.assertRaises(BadHost, parse_host, host)
            self.assertIsNone(canonical_host(host))

    def test_authority(self):
        self.assertEqual(split_authority(b"App.Test:8080"), ("app.test", 8080))
        self.assertEqual(split_authority(b"[::1]:443"), ("[::1]", 443))
        self.assertEqual(split_authority(b"app.test"), ("app.test", None))
        for value in (b"a:", b"a:1:2", b"a:65536", b"a: 1", b"a:+1", b"a:0x1", b"[::1]:",
                      b"[::1]x", b"u@a", b"a%3a1", b"a\\", b"a b", b"a,b"):
            self.assertRaises(BadHost, split_authority, value)

    @given(st.text(max_size=80))
    @example("Ⅻ.com")
    @example("ＡＰＰ.example.com")
    @settings(max_examples=500, deadline=None)
    def test_round_trip(self, text):
        """Any input is refused or gives a canonical form that is its own canonical form."""
        try:
            canonical = parse_host(text)
        except BadHost:
            return
        self.assertEqual(parse_host(canonical), canonical)
        self.assertTrue(canonical.isascii() and canonical == canonical.lower(), canonical)
        self.assertLessEqual(len(canonical), 253 + 2)

    @given(st.from_regex(r"\A(\[[0-9a-fA-F:.%]{0,40}\]|[0-9a-zA-Z.x\-_]{0,30})\Z"))
    @settings(max_examples=500, deadline=None)
    def test_round_trip_near_misses(self, text):
        """The same, over strings close to IP literals and names."""
        try:
            canonical = parse_host(text)
        except BadHost:
            return
        self.assertEqual(parse_host(canonical), canonical)
        if canonical.startswith("["):
            self.assertEqual(canonical, f"[{ipaddress.IPv6Address(canonical[1:-1])}]")


class OriginalURLTests(SynchronousTestCase):
    def test_parsed(self):
        host, target = parse_original_url(b"HTTPS://App.Example.com.:8443/a/b/c/?q=/../x")
        self.assertEqual((host, target.segments, target.forwarded),
                         ("app.example.com", ("a", "b", "c"), b"/a/b/c/?q=/../x"))
        for dotted in (b"/a/./b", b"/a/../b", b"/a/%2E%2e/b", b"/a//b"):
            # Forwarded as written by the proxy: the ACL must not see a resolved path.
            self.assertRaises(BadTarget, parse_original_url, b"http://a.example" + dotted)

    @given(st.binary(max_size=60))
    @example(b"HTTP://A/@")
    @settings(max_examples=500, deadline=None)
    def test_any_bytes(self, url):
        self._round_trip(url)

    @given(st.from_regex(
        rb"\A[hH][tT][tT][pP][sS]?://[a-zA-Z0-9.:@\[\]%\\?#/_-]{0,25}[/?#]?[a-zA-Z0-9./?#%;\\]{0,15}\Z"))
    @settings(max_examples=500, deadline=None)
    def test_near_misses(self, url):
        self._round_trip(url)

    def _round_trip(self, url):
        """Refused, or its host and target, rebuilt into a URL, parse to themselves."""
        try:
            host, target = parse_original_url(url)
        except BadTarget:
            return
        self.assertEqual(canonical_host(host), host)
        again = parse_original_url(b"http://" + host.encode() + target.forwarded)
        self.assertEqual(again, (host, target))
        authority = url.partition(b"://")[2].partition(b"/")[0]
        self.assertNotIn(b"@", authority)  # "@" is fine in a path, never userinfo
        for c in (b"\\", b"#", b" "):
            self.assertNotIn(c, url)


class OptionTests(SynchronousTestCase):
    def parse(self, *argv):
        options = tap.Options()
        options.parseOptions(["--auth", "memory:daniel:tiger", "--data-dir", self.mktemp(), *argv])
        return options

    def test_http_host_canonical(self):
        options = self.parse("--http-host", "App.Example.com.", "--http-host", "[0::1]")
        self.assertEqual(options["httpSettings"].hosts, ("app.example.com", "[::1]"))
        for bad in ("::1", "127.1", "a_b", "x:80", "u@x"):
            e = self.assertRaises(usage.UsageError, self.parse, "--http-host", bad)
            self.assertIn("not a host name", str(e))

    def test_upstream_host_names_resources(self):
        from gateway.web.resources import WebApp, upstream_host

        self.assertEqual(upstream_host("http://[::1]:3000/x"), "[::1]")
        self.assertEqual(upstream_host("http://App.Internal:3000"), "app.internal")
        settings = self.parse("--http-upstream", "http://[::1]:3000")["httpSettings"]
        self.assertEqual(WebApp(None, settings).upstream_host, "[::1]")

    def test_upstream_without_canonical_host(self):
        """my_app (a Docker name) cannot name resources: say so, instead of 403 for everything."""
        e = self.assertRaises(usage.UsageError, self.parse, "--http-upstream", "http://my_app:3000")
        self.assertIn("--http-host", str(e))
        self.parse("--http-upstream", "http://my_app:3000", "--http-host", "app.example.com")

    def test_flags(self):
        settings = self.parse()["httpSettings"]
        self.assertFalse(settings.case_sensitive_paths or settings.keep_method_override)
        settings = self.parse("--http-case-sensitive-paths", "--http-keep-method-override")[
            "httpSettings"]
        self.assertTrue(settings.case_sensitive_paths and settings.keep_method_override)


class WarningTests(SynchronousTestCase):
    def test_trusted_proxy_without_hosts_warns(self):
        from twisted.logger import globalLogPublisher

        from gateway.web.resources import WebApp
        from gateway.web.settings import HTTPSettings

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        proxies = (ipaddress.ip_network("127.0.0.1/32"),)
        WebApp(None, HTTPSettings(trusted_proxies=proxies, hosts=("app.example.com",)))
        self.assertEqual(events, [])
        WebApp(None, HTTPSettings(trusted_proxies=proxies))
        [event] = events
        self.assertIn("--http-host", event["log_format"])
