"""
Issue 13 item 7: C{POST /api/inject/v1}, KumoMTA's injection API, on the
HTTP front door. Unit tests drive the real L{GatewaySite} over a
C{StringTransport} (L{GuardTestCase}); L{parse} gets property tests; a
loopback test posts with C{curl} to the service C{makeService} builds and
finds the message in the spool.
"""

from __future__ import annotations

import json
import os
import re

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, threads
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from gateway.acl import parse_acl
from gateway.smtp.spool import Spool
from gateway.smtp.codec import MAX_DATA_LINE
from gateway.web import inject as inject_module
from gateway.web.inject import MAX_ADDRESS, BadInjection, _BoundedJSON, _has_long_line, parse
from gateway.web.settings import InjectSettings
from tests.smtp_support import sync_runner
from tests.support import ManualPool, require_tool
from tests import test_web_guard
from tests.test_web_guard import TOKEN, GuardTestCase, Policy, TokenTable, basic, users
from tests.test_web_integration import GatewayMixin, Response, curl

MAX_SIZE = 20000
SETTINGS = InjectSettings(hostname="gw.test", max_size=MAX_SIZE, max_recipients=3)
PATH = b"/api/inject/v1"
JSON = (b"Content-Type", b"application/json")


def body(sender="a@example.com", recipients=("b@example.net",), content="Subject: hi\r\n\r\nbody\r\n",
         **extra):
    value = {"envelope_sender": sender, "recipients": [{"email": r} for r in recipients],
             "content": content, **extra}
    return json.dumps(value).encode()


class InjectTestCase(GuardTestCase):
    def setUp(self):
        self.directory = self.mktemp()
        self.spool = Spool(self.directory, threadpool_runner=sync_runner)
        self.make()

    def make(self, inject=SETTINGS, **kwargs):
        kwargs.setdefault("spool", getattr(self, "spool", None))
        super().make(inject=inject, **kwargs)

    def post(self, data=None, path=PATH, headers=(JSON,), authorization=basic("daniel", "tiger"),
             **kwargs):
        return self.request(path, headers=headers, method=b"POST",
                            body=body() if data is None else data, authorization=authorization,
                            **kwargs)

    def stored(self):
        return [self.spool.load(id) for id in self.spool.ids()]

    def assertNothingLeft(self):
        self.assertEqual(os.listdir(self.directory), [])

    def assertRefused(self, response, code, field=None):
        self.assertEqual(response.code, code, response.raw[:300])
        self.assertEqual(response.one("Cache-Control"), "no-store")
        if field is not None:
            self.assertEqual(response.json()["field"], field, response.body)
        self.assertNothingLeft()


class InjectTests(InjectTestCase):
    def test_injected(self):
        r = self.post(body(content="Subject: hi\n\nline\n.\nend"))
        self.assertEqual(r.code, 200, r.raw)
        self.assertEqual(r.one("Content-Type"), "application/json")
        self.assertEqual(r.one("Cache-Control"), "no-store")
        answer = r.json()
        [(message, meta)] = self.stored()
        self.assertEqual(answer, {"id": meta["id"], "success_count": 1, "fail_count": 0,
                                  "failed_recipients": [], "errors": []})
        self.assertEqual(meta["protocol"], "HTTP")
        self.assertEqual(meta["mail_from"], "a@example.com")
        self.assertEqual(meta["rcpt_to"], ["b@example.net"])
        self.assertEqual((meta["authn_id"], meta["authz_id"]), ("daniel", "daniel"))
        self.assertEqual(meta["auth_info"]["identities"],
                         [{"identity": "daniel", "context": "HttpBasicAuth"}])
        self.assertEqual(meta["peer"], {"address": "127.0.0.1", "port": 40000})
        self.assertEqual(meta["local"], {"address": "127.0.0.1", "port": 8080})
        self.assertIsNone(meta["tls"])
        self.assertIsNone(meta["helo"])
        self.assertIsNone(meta["mail_auth"])
        self.assertEqual(meta["size"], len(message))
        received, rest = message.split(b"\r\n", 2)[:2], message.split(b"\r\n", 2)[2]
        self.assertEqual(received[0], b"Received: from [127.0.0.1]")
        self.assertRegex(received[1].decode(),
                         r"^\tby gw\.test \(authgateway\) with HTTP id " + meta["id"] + "$")
        self.assertTrue(rest.startswith(b"\tfor <b@example.net>; "), rest[:60])
        # LF made CRLF, a final CRLF added, a lone "." line kept as text (the
        # relay dot-stuffs it; it never ends anything in the spool).
        self.assertTrue(message.endswith(b"\r\nSubject: hi\r\n\r\nline\r\n.\r\nend\r\n"), message)

    def test_held_while_the_queue_falls_behind(self):
        """Like SMTP's MAIL, an injection waits for the delivery queue's admission (bounded there)."""
        waits = []
        self.spool.admission = lambda: waits.append(defer.Deferred()) or waits[-1]
        r = self.post()
        self.assertIsNone(r.code)  # no answer yet
        self.assertEqual(self.spool.ids(), [])
        waits[0].callback(None)
        r = test_web_guard.Response(self.transport.value())
        self.assertEqual(r.code, 200, r.raw)
        self.assertEqual(len(self.spool.ids()), 1)

    def test_bug_answered(self):
        """A bug while the injection is handled is a 500 that ends the request (and its body file)."""
        def broken(*args):
            raise RuntimeError("a bug")

        self.patch(inject_module, "parse", broken)
        r = self.post()
        self.assertEqual(r.code, 500, r.raw)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(self.transport.disconnecting or r.one("Content-Length"))

    def test_several_recipients_and_null_sender(self):
        r = self.post(body(sender="", recipients=("x@example.net", "y@example.org", "x@example.net")))
        self.assertEqual(r.code, 200, r.raw)
        self.assertEqual(r.json()["success_count"], 3)
        [(message, meta)] = self.stored()
        self.assertEqual(meta["mail_from"], "")
        self.assertEqual(meta["rcpt_to"], ["x@example.net", "y@example.org", "x@example.net"])
        self.assertNotIn(b"\tfor <", message.split(b"\r\n\r\n")[0])

    def test_bearer(self):
        self.make(checkers=[TokenTable({TOKEN: "ci-bot"})])
        r = self.post(authorization=b"Bearer " + TOKEN.encode())
        self.assertEqual(r.code, 200, r.raw)
        [(_, meta)] = self.stored()
        self.assertEqual((meta["authn_id"], meta["authz_id"]), ("ci-bot", "ci-bot"))
        self.assertEqual(meta["auth_info"]["identities"],
                         [{"identity": "ci-bot", "context": "BearerToken"}])

    def test_utf8_content(self):
        r = self.post(body(content="Subject: =?utf-8?q?x?=\r\n\r\nGrüße ✓\r\n"))
        self.assertEqual(r.code, 200, r.raw)
        [(message, _)] = self.stored()
        self.assertTrue(message.endswith("Grüße ✓\r\n".encode()))

    def test_tls(self):
        r = self.post(tls=True)
        self.assertEqual(r.code, 200, r.raw)
        [(message, meta)] = self.stored()
        self.assertEqual(meta["tls"], {})  # a StringTransport has no OpenSSL connection to ask
        self.assertTrue(message.startswith(b"Received: from [127.0.0.1]\r\n\t(using TLS)\r\n\tby "))

    def test_through_a_trusted_proxy(self):
        """The client as the proxy names it (never a header's text), as an address literal."""
        import ipaddress

        self.make(trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"),))
        r = self.post(peer="10.1.2.3", headers=(
            JSON, (b"X-Forwarded-For", b"2001:db8::7"), (b"X-Forwarded-Proto", b"https")))
        self.assertEqual(r.code, 200, r.raw)
        [(message, meta)] = self.stored()
        self.assertEqual(meta["peer"], {"address": "2001:db8::7", "port": None})
        self.assertEqual(meta["tls"], {})
        self.assertTrue(message.startswith(b"Received: from [IPv6:2001:db8::7]\r\n\t(using TLS)\r\n"))
        r = self.post(peer="10.1.2.3", headers=(JSON, (b"X-Forwarded-For", b"x\r\nBcc: y")))
        self.assertEqual(r.code, 400)

    def test_received_header_is_not_injected(self):
        """Nothing the client chose reaches the Received header but checked addresses."""
        for recipient in ("b@example.net\r\nBcc: x@evil", "b@example.net>\r\nX: y",
                          "b@example.net\nX: y", "b@ex\x00ample.net"):
            r = self.post(body(recipients=(recipient,)))
            self.assertRefused(r, 400, "recipients[0].email")


class RefusalTests(InjectTestCase):
    def test_unauthenticated(self):
        for authorization in (None, basic("daniel", "lion")):
            r = self.post(authorization=authorization)
            self.assertRefused(r, 401)
            self.assertEqual(r.all("WWW-Authenticate"),
                             ['Basic realm="authgateway", charset="UTF-8"'])

    def test_acl_denies(self):
        policy = Policy(("smtp/inject", "inject"))
        self.make(policy=policy)
        self.assertRefused(self.post(), 403)
        self.assertIn(("smtp/inject", "inject"), policy.queries)

    def test_acl_file(self):
        acl = parse_acl("""
            [[acl."smtp/inject"]]
            allow = true
            privileges = ["inject"]
            identity.Individual = "daniel"
        """)
        self.make(policy=acl, checkers=[users()])
        self.assertEqual(self.post().code, 200)
        self.assertEqual(self.post(authorization=basic("jürgen", "pässwörd")).code, 403)
        self.assertEqual(len(self.spool.ids()), 1)

    def test_not_without_the_api(self):
        """Without inject settings the path is like any other (404 without an upstream)."""
        self.make(inject=None)
        self.assertRefused(self.post(), 404)

    def test_methods(self):
        for method in (b"GET", b"PUT", b"HEAD", b"DELETE"):
            r = self.request(PATH, method=method, authorization=basic("daniel", "tiger"))
            self.assertRefused(r, 405)
            self.assertEqual(r.one("Allow"), "POST")

    def test_media_type(self):
        """text/plain is what a browser posts across sites without asking: never taken."""
        for headers in ((), ((b"Content-Type", b"text/plain"),),
                        ((b"Content-Type", b"application/x-www-form-urlencoded"),)):
            self.assertRefused(self.post(headers=headers), 415)
        r = self.post(headers=((b"Content-Type", b"Application/JSON; charset=utf-8"),))
        self.assertEqual(r.code, 200, r.raw)

    def test_bad_json(self):
        for data in (b"", b"{", b"[]", b'"x"', b"\xff{}", b"[" * 10000 + b"]" * 10000,
                     b'{"envelope_sender": 1e999999}', b"\xef\xbb\xbf{}", "{}".encode("utf-16")):
            r = self.post(data)
            self.assertRefused(r, 400)
            self.assertIn("error", r.json())

    def test_bad_fields(self):
        cases = [
            (body(extra=1), "extra"),
            (json.dumps({"recipients": [{"email": "b@example.net"}], "content": "x"}).encode(),
             "envelope_sender"),
            (body(sender=None), "envelope_sender"),
            (body(sender="a"), "envelope_sender"),
            (body(sender="<a@example.com>"), "envelope_sender"),
            (body(sender="a@example.com> AUTH=<x@y>"), "envelope_sender"),
            (body(sender="jürgen@example.com"), "envelope_sender"),
            (body(sender="a" * MAX_ADDRESS + "@x"), "envelope_sender"),
            (body(recipients=()), "recipients"),
            (body(recipients=("a@x", "b@x", "c@x", "d@x")), "recipients"),
            (body(recipients=("b@example.net", "not an address")), "recipients[1].email"),
            (body(recipients=("",)), "recipients[0].email"),
            (json.dumps({"envelope_sender": "", "recipients": ["b@example.net"],
                         "content": "x"}).encode(), "recipients[0]"),
            (json.dumps({"envelope_sender": "", "recipients": [{"email": "b@x", "name": "B"}],
                         "content": "x"}).encode(), "recipients[0].name"),
            (body(content=""), "content"),
            (body(content=["x"]), "content"),
            (body(content="a\rb"), "content"),
            (body(content="a\r"), "content"),
            (body(content="\ud800"), "content"),
            (body(content="x" * 999), "content"),
            (body(content="ok\r\n" + "x" * 999 + "\r\nok"), "content"),
        ]
        for data, field in cases:
            with self.subTest(field=field, data=data[:80]):
                self.assertRefused(self.post(data), 400, field)

    def test_duplicate_keys(self):
        data = (b'{"envelope_sender": "a@example.com", "envelope_sender": "ceo@example.com",'
                b' "recipients": [{"email": "b@example.net"}], "content": "x"}')
        r = self.post(data)
        self.assertRefused(r, 400)
        self.assertIn("duplicate", r.json()["error"])

    def test_folded_start_and_nul(self):
        """A first line that would continue our Received header, and NUL, are refused."""
        for content in ("\t(Authenticated sender: ceo@bank.example)\nSubject: x\n\nhi",
                        " x: y\n\nhi", "Subject: x\n\n\u0000.\n"):
            with self.subTest(content=content):
                self.assertRefused(self.post(body(content=content)), 400, "content")
        self.assertEqual(self.spool.ids(), [])

    def test_lines_at_the_limit(self):
        r = self.post(body(content="x" * 998 + "\n" + "y" * 998))
        self.assertEqual(r.code, 200, r.raw)

    def test_content_too_large(self):
        """Decoded, the message is bounded by --smtp-max-size (LF made CRLF counts)."""
        r = self.post(body(content="x\n" * (MAX_SIZE // 2)))
        self.assertRefused(r, 413, "content")
        self.assertEqual(self.post(body(content="x\n" * (MAX_SIZE // 3))).code, 200)

    def test_too_many_recipients_after_duplicates(self):
        self.assertRefused(self.post(body(recipients=("a@x",) * 4)), 400, "recipients")


class BodyBoundTests(InjectTestCase):
    """The JSON body: its own bound, decided before it is read when large or chunked."""

    def head(self, framing, auth=basic("daniel", "tiger"), extra=b"", path=PATH):
        channel, transport = self.connect()
        lines = [b"POST " + path + b" HTTP/1.1", b"Host: gw.test",
                 b"Content-Type: application/json", framing]
        if auth is not None:
            lines.append(b"Authorization: " + auth)
        channel.dataReceived(b"\r\n".join(lines) + b"\r\n\r\n" + extra)
        return channel, transport

    def test_declared_too_large(self):
        """Above the bound: 413 at once, before any login, and closed."""
        channel, transport = self.head(b"Content-Length: %d" % (SETTINGS.max_body + 1))
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "), transport.value()[:80])
        self.assertTrue(transport.disconnecting)
        self.assertNothingLeft()

    def test_chunked_too_large(self):
        channel, transport = self.head(b"Transfer-Encoding: chunked")
        chunk = b"x" * 60000
        for _ in range(SETTINGS.max_body // len(chunk) + 1):
            if transport.disconnecting:
                break
            channel.dataReceived(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "), transport.value()[:80])
        self.assertTrue(transport.disconnecting)
        self.assertNothingLeft()

    def test_refused_before_the_body(self):
        """Above --http-max-body (or chunked), a refusal comes before a byte of the body is read."""
        self.make(max_body=1000, policy=Policy(("smtp/inject", "inject")))
        for framing in (b"Content-Length: 5000", b"Transfer-Encoding: chunked"):
            for auth, status in ((None, b"401"), (basic("daniel", "lion"), b"401"),
                                 (basic("daniel", "tiger"), b"403")):
                channel, transport = self.head(framing, auth, extra=b"{" * 100)
                out = transport.value()
                self.assertTrue(out.startswith(b"HTTP/1.1 " + status), (framing, auth, out[:80]))
                self.assertTrue(transport.disconnecting)
                channel.dataReceived(b"y" * 10000)
                self.assertEqual(transport.value(), out)
        self.assertNothingLeft()

    def test_small_body_read_first(self):
        """Within --http-max-body the body is read, then decided (as for /whoami)."""
        data = body()
        channel, transport = self.head(b"Content-Length: %d" % len(data), auth=None)
        self.assertEqual(transport.value(), b"")
        channel.dataReceived(data)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 401 "))

    def test_large_body_streamed_in(self):
        """Let through before its body, the body lands in the request's body file."""
        self.make(max_body=1000)
        data = body(content="Subject: big\r\n\r\n" + "z" * 900 + "\r\n" * 4000)
        channel, transport = self.head(b"Content-Length: %d\r\nExpect: 100-continue" % len(data))
        self.assertEqual(transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        for i in range(0, len(data), 777):
            channel.dataReceived(data[i:i + 777])
        out = transport.value()
        self.assertIn(b"HTTP/1.1 200 ", out)
        [(message, _)] = self.stored()
        self.assertTrue(message.endswith(b"z" * 900 + b"\r\n" * 4000))

    def test_chunked_body(self):
        self.make(max_body=1000)
        data = body(content="Subject: chunked\r\n\r\n" + "q\r\n" * 1000)
        channel, transport = self.head(b"Transfer-Encoding: chunked")
        for i in range(0, len(data), 500):
            piece = data[i:i + 500]
            channel.dataReceived(b"%x\r\n" % len(piece) + piece + b"\r\n")
        channel.dataReceived(b"0\r\n\r\n")
        self.assertIn(b"HTTP/1.1 200 ", transport.value())
        self.assertEqual(len(self.stored()), 1)

    def test_refused_while_streaming(self):
        """A 400 for a body that was streamed in: answered once it is all in."""
        self.make(max_body=1000)
        data = body(content="a\rb" + "x" * 2000)
        channel, transport = self.head(b"Content-Length: %d" % len(data))
        channel.dataReceived(data)
        self.assertIn(b"HTTP/1.1 400 ", transport.value())
        self.assertNothingLeft()

    def test_client_gone_while_streaming(self):
        self.make(max_body=1000)
        data = body(content="x" * 3000)
        channel, transport = self.head(b"Content-Length: %d" % len(data))
        channel.dataReceived(data[:1500])
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertNothingLeft()
        self.assertEqual(self.flushLoggedErrors(), [])


class PathTests(InjectTestCase):
    """Only the exact path is the API; no other spelling reaches it, nor escapes its ACL."""

    def test_variants(self):
        self.make(policy=Policy(("smtp/inject", "inject")))
        for path in (b"/api/inject/v1/", b"/API/inject/v1", b"/api/Inject/v1", b"/api%2finject/v1",
                     b"/api/inject%2fv1", b"/%61pi/inject/v1", b"/api/./inject/v1",
                     b"/api/x/../inject/v1", b"//api/inject/v1", b"/api/inject/v1;x",
                     b"/api/inject/v1%00", b"/api/inject/v2", b"http://gw.test/api/inject/v1"):
            r = self.post(path=path)
            self.assertIn(r.code, (400, 404), (path, r.raw[:80]))
        self.assertNothingLeft()

    def test_query_ignored(self):
        self.assertEqual(self.post(path=PATH + b"?x=1").code, 200)


class FailingRunner:
    """A thread-pool runner whose jobs fail as a full disk would."""

    def __call__(self, f, *args):
        return defer.fail(OSError(28, "No space left on device"))


class SpoolFailureTests(InjectTestCase):
    def test_commit_fails(self):
        self.spool = Spool(self.directory, threadpool_runner=FailingRunner())
        self.make()
        r = self.post()
        self.assertRefused(r, 503)
        self.assertEqual(r.one("Retry-After"), "60")
        self.assertIn("error", r.json())

    def test_write_fails(self):
        """An error while writing (ENOSPC) is reported by the commit; nothing stays."""
        self.spool = Spool(self.directory, threadpool_runner=sync_runner)
        self.make()
        real_open = self.spool.open

        def broken_open():
            writer = real_open()

            def write(data):
                writer._error = OSError(28, "No space left on device")

            writer.write = write
            return writer

        self.spool.open = broken_open
        self.assertRefused(self.post(), 503)

    def test_open_fails(self):
        os.rmdir(self.directory)
        with open(self.directory, "w"):
            pass  # a file where the spool was: nothing can be created there
        r = self.post()
        self.assertEqual(r.code, 503)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_client_gone_during_commit(self):
        """The commit goes on (the message is queued); nothing is written to a closed request."""
        pool = ManualPool()
        self.spool = Spool(self.directory, threadpool_runner=pool.run)
        self.make()
        self.assertIsNone(self.post().code)  # waiting for the commit
        self.channel.connectionLost(Failure(ConnectionDone()))
        pool.finish_all()
        self.assertEqual(len(self.spool.ids()), 1)
        self.assertEqual(self.flushLoggedErrors(), [])


class BindingTests(InjectTestCase):
    ACL = """
        [[acl."smtp/sender/example.com/daniel"]]
        allow = true
        privileges = ["send"]
        identity.Individual = "daniel"

        [[acl."smtp"]]
        allow = true
        privileges = ["*"]
        identity.Authenticated = {}
    """

    def setUp(self):
        super().setUp()
        self.make(inject=InjectSettings(hostname="gw.test", max_size=MAX_SIZE, max_recipients=3,
                                        sender_binding=True),
                  policy=parse_acl(self.ACL))

    def test_granted(self):
        for sender in ("daniel@example.com", "Daniel@EXAMPLE.com", '"daniel"@example.com'):
            self.assertEqual(self.post(body(sender=sender)).code, 200, sender)

    def test_refused(self):
        """Another address, the null sender: 403 naming the field (the broad smtp rule grants nothing)."""
        for sender in ("ceo@example.com", "", "daniel@example.com.evil", "daniel@evil.example"):
            r = self.post(body(sender=sender))
            self.assertRefused(r, 403, "envelope_sender")


class ParseTests(SynchronousTestCase):
    """L{parse} refuses anything with L{BadInjection}, never another exception."""

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=300))
    def test_arbitrary_bytes(self, data):
        try:
            parse(data, SETTINGS)
        except BadInjection:
            pass

    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
        lambda children: st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(["envelope_sender", "recipients", "content", "email",
                                           "x"]), children, max_size=4),
        max_leaves=12,
    )

    @settings(max_examples=300, deadline=None)
    @given(json_values)
    def test_arbitrary_json(self, value):
        try:
            injection = parse(json.dumps(value).encode(), SETTINGS)
        except BadInjection:
            return
        self.assertTrue(injection.content.endswith(b"\r\n"))

    @settings(max_examples=300, deadline=None)
    @given(json_values, st.sampled_from([None, 1, 2]))
    def test_reads_json_as_json_does(self, value, indent):
        """The bounded reader reads any JSON document as json.loads does (NaN aside)."""
        text = json.dumps(value, indent=indent)
        if "NaN" in text or "Infinity" in text:
            return
        self.assertEqual(_BoundedJSON(text, 10**6).document(), json.loads(text))

    @settings(max_examples=300, deadline=None)
    @given(st.text(alphabet=st.sampled_from('{}[],:" 0-1.e\\tnrufalsx\n'), max_size=40))
    def test_refuses_what_json_refuses(self, text):
        """Text json.loads refuses is refused too (not JSON), never an exception of another kind."""
        try:
            expected = json.loads(text)
        except ValueError:
            with self.assertRaises(BadInjection):
                _BoundedJSON(text, 10**6).document()
            return
        try:
            self.assertEqual(_BoundedJSON(text, 10**6).document(), expected)
        except BadInjection as e:  # only for what json.loads lets through and we do not
            self.assertRegex(str(e), "duplicate key|NaN|Infinity")

    def test_value_bombs(self):
        """
        Millions of empty values are refused after a bounded number of steps,
        before any is built (json.loads spent seconds and a gigabyte on them).
        """
        for bomb in (b'{"n": ' + b"1" * 5000 + b"}", b'{"n": 1' + b"0" * 5000 + b".5e3}",
                     b"[" + b"{}," * 1_000_000 + b"{}]", b"[" + b"[]," * 1_000_000 + b"[]]",
                     b'{"recipients": [' + b"0," * 1_000_000 + b"0]}", b"[" + b'"",' * 1_000_000 + b'""]',
                     b"[" * 100_000):
            with self.assertRaises(BadInjection) as caught:
                parse(bomb, SETTINGS)
            self.assertRegex(str(caught.exception),
                             "too many JSON values|nested too deeply|a number too long")

    @settings(max_examples=300, deadline=None)
    @given(st.text(alphabet=st.sampled_from("ab.\r\n é"), min_size=1, max_size=200))
    def test_content(self, content):
        """Accepted content has CRLF line ends only: no bare CR or LF reaches the spool."""
        try:
            injection = parse(body(content=content), SETTINGS)
        except BadInjection as e:
            self.assertEqual(e.field, "content")
            self.assertRegex(content, re.compile(r"\r(?!\n)|^ "))
            return
        self.assertIsNone(re.search(rb"\r(?!\n)|(?<!\r)\n", injection.content))
        self.assertEqual(injection.content.replace(b"\r\n", b"\n").rstrip(b"\n"),
                         content.replace("\r\n", "\n").rstrip("\n").encode())


def final(response: Response) -> Response:
    """The final response after any C{100 Continue} curl printed first."""
    while response.status == 100:
        response = Response(response.body)
    return response


class LongLineTests(SynchronousTestCase):
    """The line-length check skips through the message; it must miss no line."""

    @settings(max_examples=500, deadline=None)
    @given(st.lists(st.integers(min_value=0, max_value=2100), min_size=1, max_size=12))
    def test_same_as_line_by_line(self, lengths):
        data = b"".join(b"x" * n + b"\r\n" for n in lengths)
        self.assertEqual(_has_long_line(data), max(lengths) > MAX_DATA_LINE, lengths)


class CurlTests(GatewayMixin, TestCase):
    """curl posts to the real HTTP door; the message is in the spool as the API said."""

    timeout = 60

    def setUp(self):
        require_tool("curl", "curl")
        self.data = os.path.abspath(self.mktemp())
        self.start("--auth", "memory:daniel:tiger", "--http-max-body", "4096",
                   "--smtp-hostname", "mx.gw.test")
        self.spool = Spool(os.path.join(self.data, "spool"), threadpool_runner=sync_runner)

    def post(self, data: bytes, *extra: str):
        path = os.path.join(self.data, "body.json")
        with open(path, "wb") as f:
            f.write(data)
        d = threads.deferToThread(
            curl, "-u", "daniel:tiger", "-H", "Content-Type: application/json",
            "--data-binary", "@" + path, *extra, self.url("/api/inject/v1"))
        return d.addCallback(final)

    @defer.inlineCallbacks
    def test_inject(self):
        response = yield self.post(body(content="Subject: hi\n\nhello\n"))
        self.assertEqual(response.status, 200, response)
        id = response.json()["id"]
        message, meta = self.spool.load(id)
        self.assertEqual(meta["protocol"], "HTTP")
        self.assertEqual(meta["authn_id"], "daniel")
        self.assertEqual(meta["rcpt_to"], ["b@example.net"])
        self.assertEqual(meta["peer"]["address"], "127.0.0.1")
        self.assertTrue(message.startswith(b"Received: from [127.0.0.1]\r\n\tby mx.gw.test "
                                           b"(authgateway) with HTTP id " + id.encode()))
        self.assertTrue(message.endswith(b"\r\nSubject: hi\r\n\r\nhello\r\n"))

    @defer.inlineCallbacks
    def test_large_message(self):
        """2 MiB: above --http-max-body, so curl's Expect: 100-continue meets the early decision."""
        content = "Subject: big\r\n\r\n" + ("y" * 76 + "\r\n") * 27000
        response = yield self.post(body(content=content))
        self.assertEqual(response.status, 200, response)
        message, _ = self.spool.load(response.json()["id"])
        self.assertTrue(message.endswith(content.encode()))

    @defer.inlineCallbacks
    def test_refusals(self):
        response = yield threads.deferToThread(
            curl, "-H", "Content-Type: application/json", "--data-binary", "{}",
            self.url("/api/inject/v1"))
        self.assertEqual(response.status, 401, response)
        response = yield self.post(b"{not json")
        self.assertEqual(response.status, 400, response)
        response = yield self.post(body(recipients=("bad",)))
        self.assertEqual(response.status, 400, response)
        self.assertEqual(response.json()["field"], "recipients[0].email")
        response = yield threads.deferToThread(
            curl, "-u", "daniel:tiger", self.url("/api/inject/v1"))
        self.assertEqual(response.status, 405, response)
        self.assertEqual(self.spool.ids(), [])
