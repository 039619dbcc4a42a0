"""
Unit tests of L{gateway.smtp.relay}: relay URLs, the relay password, the
reply parser, dot-stuffing, and the client protocol on a StringTransport
with a Clock (every timeout, lost connections, garbage, the 555 fallback,
LMTP).
"""

from __future__ import annotations

import base64
import os
import re

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, error, ssl
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from gateway.smtp import codec
from gateway.smtp.relay import (
    LOST,
    MAX_REPLY_LINE,
    MAX_REPLY_LINES,
    MAX_REPLY_TEXT,
    QUIT_TIMEOUT,
    DotStuffer,
    ProtocolError,
    RelayAuth,
    RelayConnection,
    RelayError,
    RelaySettings,
    Reply,
    ReplyParser,
    connect,
    parse_relay,
    xtext_encode,
)
from tests.relay_support import make_ca
from tests.smtp_support import StartTLSTransport
from tests.support import write_file

EHLO_PLAIN = b"250-relay.test\r\n250-PIPELINING\r\n250 SIZE 1000000\r\n"
EHLO_TLS = b"250-relay.test\r\n250-SIZE 1000000\r\n250 STARTTLS\r\n"
EHLO_AUTH = b"250-relay.test\r\n250-SIZE 1000000\r\n250 AUTH PLAIN LOGIN\r\n"
EHLO_NO_PIPELINING = b"250-relay.test\r\n250 SIZE 1000000\r\n"


class ParseRelayTests(SynchronousTestCase):
    def test_valid(self):
        cases = {
            "smtp://relay.example": ("smtp://relay.example:25", "relay.example", 25, None, "starttls"),
            "SMTP://Relay.Example:587/": ("smtp://relay.example:587", "relay.example", 587, None, "starttls"),
            "smtp://relay.example?tls=none": ("smtp://relay.example:25?tls=none", "relay.example", 25, None, "none"),
            "smtp://127.0.0.1:2525?tls=insecure": (
                "smtp://127.0.0.1:2525?tls=insecure", "127.0.0.1", 2525, None, "insecure"),
            "smtps://[2001:DB8::1]": ("smtps://[2001:db8::1]:465", "2001:db8::1", 465, None, "implicit"),
            "smtps://relay.example?tls=insecure": (
                "smtps://relay.example:465?tls=insecure", "relay.example", 465, None, "insecure"),
            "lmtp://mda.example": ("lmtp://mda.example:24", "mda.example", 24, None, "none"),
            "lmtp://mda.example?tls=none": ("lmtp://mda.example:24", "mda.example", 24, None, "none"),
            "lmtp:///run/dovecot/lmtp": ("lmtp:///run/dovecot/lmtp", None, None, "/run/dovecot/lmtp", "none"),
        }
        for url, (shown, host, port, path, tls) in cases.items():
            target = parse_relay(url)
            self.assertEqual(
                (target.url, target.host, target.port, target.path, target.tls),
                (shown, host, port, path, tls), url,
            )

    def test_invalid(self):
        cases = {
            "http://relay.example": "scheme",
            "relay.example:25": "scheme",
            "smtp://user:secret@relay.example": "no user or password",
            "smtp://relay.example?tls=maybe": "tls must be",
            "smtp://relay.example?tls=none&x=1": "only parameter",
            "smtp://relay.example?auth=x": "only parameter",
            "smtps://relay.example?tls=none": "cannot be used",
            "lmtp://mda.example?tls=insecure": "cannot be used",
            "smtp://relay.example:0": "port 0",
            "smtp://relay.example:70000": "port",
            "smtp://relay.example:": "port",
            "smtp://relay.example/x": "no path",
            "smtp://relay.example#x": "fragment",
            "smtp://": "host",
            "smtp://rel ay.example": "printable",
            "smtp://[fe80::1%25eth0]": "percent",
            "lmtp://relative": None,
            "lmtp:///": "absolute",
        }
        for url, words in cases.items():
            if url == "lmtp://relative":
                self.assertEqual(parse_relay(url).host, "relative")
                continue
            with self.assertRaises(ValueError, msg=url) as e:
                parse_relay(url)
            self.assertIn(words, str(e.exception), url)
            self.assertNotIn("secret", str(e.exception))


class RelayAuthTests(SynchronousTestCase):
    def setUp(self):
        self.path = self.mktemp()

    def test_first_line(self):
        write_file(self.path, "s3cret pass\r\nsecond line\n")
        auth = RelayAuth.from_option(f"gw@example.com:{self.path}")
        self.assertEqual((auth.user, auth.password), ("gw@example.com", "s3cret pass"))
        for text in (repr(auth), str(auth)):
            self.assertNotIn("s3cret", text)
            self.assertIn("gw@example.com", text)

    def test_problems(self):
        write_file(self.path, "\nlater\n")
        for value, words in (
            ("nouser", "USER:FILE"),
            (":" + self.path, "USER:FILE"),
            ("user:", "USER:FILE"),
            ("user:/nonexistent/file", "cannot read /nonexistent/file"),
            ("user:" + self.path, "no password"),
        ):
            with self.assertRaises(ValueError, msg=value) as e:
                RelayAuth.from_option(value)
            self.assertIn(words, str(e.exception))

    def test_not_utf8(self):
        write_file(self.path, b"\xff\xfe\n")
        self.assertRaises(ValueError, RelayAuth.from_option, "u:" + self.path)


class ReplyParserTests(SynchronousTestCase):
    def test_replies(self):
        parser = ReplyParser()
        replies = parser.feed(b"220 relay.test ESMTP\r\n250-a\r\n250-SIZE 10\r\n250 OK\r\n354\n")
        self.assertEqual(
            [(r.code, r.text) for r in replies],
            [(220, "relay.test ESMTP"), (250, "a SIZE 10 OK"), (354, "")],
        )
        self.assertEqual(replies[1].lines, ("a", "SIZE 10", "OK"))
        self.assertEqual(str(replies[0]), "220 relay.test ESMTP")
        self.assertEqual(str(replies[2]), "354")
        self.assertFalse(parser.pending)

    def test_partial(self):
        parser = ReplyParser()
        self.assertEqual(parser.feed(b"250-first\r\n25"), [])
        self.assertTrue(parser.pending)
        self.assertEqual(parser.feed(b"0 second\r\n"), [Reply(250, "first second")])

    def test_unprintable_text(self):
        reply = ReplyParser().feed(b"550 5.1.1 \x1b[31mno\xff\tuser\r\n")[0]
        self.assertEqual(reply.text, "5.1.1 ?[31mno??user")

    def test_garbage(self):
        for data in (
            b"hello\r\n", b"25 short\r\n", b"2500 long\r\n", b"650 bad class\r\n", b"250_x\r\n",
            b"250-a\r\n251 b\r\n", b"\r\n",
        ):
            self.assertRaises(ProtocolError, ReplyParser().feed, data)

    def test_bounds(self):
        self.assertRaises(ProtocolError, ReplyParser().feed, b"250 " + b"x" * MAX_REPLY_LINE + b"\r\n")
        # A line too long is refused before its end arrives: nothing unbounded is held.
        parser = ReplyParser()
        parser.feed(b"250 " + b"x" * (MAX_REPLY_LINE - 10))
        self.assertRaises(ProtocolError, parser.feed, b"x" * 100)
        self.assertRaises(ProtocolError, ReplyParser().feed, b"250-x\r\n" * MAX_REPLY_LINES)
        many = b"250-" + b"y" * 1000 + b"\r\n"
        reply = ReplyParser().feed(many * 5 + b"250 end\r\n")[0]
        self.assertEqual(len(reply.text), MAX_REPLY_TEXT)
        self.assertTrue(reply.text.endswith("..."))

    @given(
        st.lists(
            st.tuples(
                st.integers(200, 599),
                st.lists(st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
                         min_size=1, max_size=4),
            ),
            min_size=1, max_size=6,
        ),
        st.lists(st.integers(0, 2000), max_size=10),
        st.booleans(),
    )
    def test_any_split(self, replies, cuts, lf_only):
        """Replies read alike however the octets are split."""
        end = b"\n" if lf_only else b"\r\n"
        data = b"".join(
            b"".join(
                b"%d%s%s%s" % (code, b" " if i == len(lines) - 1 else b"-", line.encode(), end)
                for i, line in enumerate(lines)
            )
            for code, lines in replies
        )
        parser, got = ReplyParser(), []
        last = 0
        for cut in sorted(c % (len(data) + 1) for c in cuts) + [len(data)]:
            got += parser.feed(data[last:cut])
            last = cut
        expected = [(code, " ".join(t for t in lines if t)) for code, lines in replies]
        self.assertEqual([(r.code, r.text) for r in got], expected)

    @given(st.binary(max_size=300), st.integers(0, 300))
    def test_arbitrary_bytes(self, data, cut):
        """Anything at all gives replies or a ProtocolError, nothing else."""
        parser = ReplyParser()
        try:
            parser.feed(data[:cut])
            parser.feed(data[cut:])
        except ProtocolError:
            pass


def stuff_reference(text: bytes) -> bytes:
    return re.sub(rb"(^|\n)\.", rb"\1..", text)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in points + [len(data)]:
        pieces.append(data[last:point])
        last = point
    return pieces


LINES = st.lists(
    st.sampled_from([b".", b"..", b".x", b"x.", b"", b"text", b" .", b"\r", b"\n.", b"a\rb"]),
    max_size=12,
)


class DotStufferTests(SynchronousTestCase):
    def test_examples(self):
        stuffer = DotStuffer()
        self.assertEqual(stuffer.feed(b".a\r\n..b\r\nc.\r\n.\r\n"), b"..a\r\n...b\r\nc.\r\n..\r\n")
        self.assertEqual(stuffer.end(), b".\r\n")
        stuffer = DotStuffer()
        self.assertEqual(stuffer.feed(b"no final line end"), b"no final line end")
        self.assertEqual(stuffer.end(), b"\r\n.\r\n")
        self.assertEqual(DotStuffer().end(), b".\r\n")  # an empty file: an empty message
        stuffer = DotStuffer()
        stuffer.feed(b"a\r")
        stuffer.feed(b"\n")
        self.assertEqual(stuffer.end(), b".\r\n")
        stuffer = DotStuffer()
        stuffer.feed(b"a\n")  # a bare LF is no line end for the relay
        self.assertEqual(stuffer.end(), b"\r\n.\r\n")

    @given(LINES, st.lists(st.integers(0, 200), max_size=8), st.booleans())
    def test_any_chunks(self, parts, cuts, final_crlf):
        """However the file is read, the wire form is the same, and every line start's dot doubled."""
        text = b"\r\n".join(parts) + (b"\r\n" if final_crlf else b"")
        stuffer = DotStuffer()
        wire = b"".join(stuffer.feed(chunk) for chunk in chunked(text, cuts)) + stuffer.end()
        self.assertEqual(wire[: len(wire) - len(stuffer.end())], stuff_reference(text))
        body = wire[: -len(b".\r\n")]
        self.assertTrue(body == b"" or body.endswith(b"\r\n"))
        self.assertNotIn(b"\n.\r\n", body[:-2] + b"x")  # no early end of data, even after a bare LF

    @given(
        # No NUL, no blank first octet: what our server refuses (a next hop may drop a NUL, a
        # blank would continue our Received header).
        st.lists(st.binary(max_size=30).map(
            lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"").lstrip(b" \t")),
                 max_size=10),
        st.lists(st.integers(0, 300), max_size=8),
    )
    def test_server_reads_it_back(self, lines, cuts):
        """Our own SMTP server's codec takes the wire form back to the original text."""
        text = b"".join(line + b"\r\n" for line in lines)
        stuffer = DotStuffer()
        wire = b"".join(stuffer.feed(chunk) for chunk in chunked(text, cuts)) + stuffer.end()
        server = codec.ServerCodec()
        server.expect_data(10**6)
        server.receive_data(wire)
        received = b""
        while (event := server.next_event()) is not None:
            if isinstance(event, codec.MessageText):
                received += event.text
            else:
                self.assertEqual(event, codec.EndOfData(None))
        self.assertEqual(received, text)


def lost(why: str) -> Reply:
    """What a recipient without a reply gets when the connection broke for C{why}."""
    return Reply(451, f"4.4.2 {why}")


class XtextTests(SynchronousTestCase):
    def test_encode(self):
        self.assertEqual(xtext_encode("a+b=c@example.com"), "a+2Bb+3Dc@example.com")
        self.assertEqual(xtext_encode("x y\r\n\u00e9"), "x+20y+0D+0A+C3+A9")
        self.assertEqual(codec.xtext(xtext_encode("a+b=c d").encode()), b"a+b=c d")


class BrokenFile:
    def read(self, size):
        raise OSError(5, "Input/output error")

    def close(self):
        pass


def target(url="smtp://relay.test?tls=none"):
    return parse_relay(url)


class Session:
    """A RelayConnection on a StringTransport, and the relay's side of the talk."""

    def __init__(self, case, url="smtp://relay.test?tls=none", auth=None, ca=None):
        self.case = case
        self.clock = Clock()
        self.settings = RelaySettings(
            targets=(target(url),), ca=ca, auth=auth, helo="gw.test",
            connect_timeout=5, command_timeout=60, data_timeout=120,
        )
        self.conn = RelayConnection(self.settings, self.settings.targets[0], self.clock)
        self.transport = StartTLSTransport()
        self.conn.makeConnection(self.transport)

    def sent(self) -> bytes:
        out = self.transport.value()
        self.transport.clear()
        return out

    def answer(self, data: bytes, bytewise: bool = False) -> bytes:
        """The relay answers C{data}; what the client sent next."""
        for piece in [data[i:i + 1] for i in range(len(data))] if bytewise else [data]:
            self.conn.dataReceived(piece)
        return self.sent()

    def handshake(self, ehlo=EHLO_PLAIN):
        d = defer.ensureDeferred(self.conn.handshake())
        verb = b"LHLO" if self.conn.target.lmtp else b"EHLO"
        self.case.assertEqual(self.answer(b"220 relay.test ESMTP\r\n"), verb + b" gw.test\r\n")
        self.answer(ehlo)
        self.case.assertIs(self.case.successResultOf(d), self.conn)
        return self.conn

    def stream(self) -> bytes:
        """Let the transport pull the whole message, as a real one does."""
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()
        return self.sent()


class HandshakeTests(SynchronousTestCase):
    def test_plain(self):
        session = Session(self)
        conn = session.handshake()
        self.assertEqual(conn.extensions, {"PIPELINING": "", "SIZE": "1000000"})
        self.assertFalse(conn.tls)

    def test_lhlo(self):
        session = Session(self, "lmtp://mda.test")
        d = defer.ensureDeferred(session.conn.handshake())
        self.assertEqual(session.answer(b"220 mda LMTP\r\n"), b"LHLO gw.test\r\n")
        session.answer(b"250 mda\r\n")
        self.successResultOf(d)

    def test_starttls(self):
        session = Session(self, "smtp://relay.test", ca=(make_ca().certificate,))
        d = defer.ensureDeferred(session.conn.handshake())
        session.answer(b"220 relay.test ESMTP\r\n")
        self.assertEqual(session.answer(EHLO_TLS), b"STARTTLS\r\n")
        self.assertFalse(session.transport.tls_started)
        self.assertEqual(session.answer(b"220 2.0.0 go ahead\r\n"), b"EHLO gw.test\r\n")
        self.assertTrue(session.transport.tls_started)
        # verified with service-identity for the relay's name
        self.assertEqual(session.transport.tls_context._hostnameASCII, "relay.test")
        session.answer(b"250-relay.test\r\n250 AUTH PLAIN\r\n")
        self.assertTrue(self.successResultOf(d).tls)

    def test_starttls_ip_literal(self):
        options = RelaySettings(targets=()).client_tls(target("smtp://127.0.0.1"))
        self.assertTrue(options._hostnameIsDnsName is False)

    def test_starttls_insecure(self):
        options = RelaySettings(targets=()).client_tls(target("smtp://relay.test?tls=insecure"))
        self.assertIsInstance(options, ssl.CertificateOptions)
        self.assertFalse(options.verify)

    def test_starttls_not_offered(self):
        session = Session(self, "smtp://relay.test")
        d = defer.ensureDeferred(session.conn.handshake())
        session.answer(b"220 relay.test ESMTP\r\n")
        session.answer(EHLO_PLAIN)
        e = self.failureResultOf(d, RelayError).value
        self.assertIn("STARTTLS is required", str(e))
        self.assertTrue(e.temporary)
        self.assertTrue(session.transport.disconnecting)

    def test_starttls_refused(self):
        session = Session(self, "smtp://relay.test")
        d = defer.ensureDeferred(session.conn.handshake())
        session.answer(b"220 relay.test ESMTP\r\n")
        session.answer(EHLO_TLS)
        session.answer(b"454 4.7.0 TLS not available\r\n")
        self.assertIn("STARTTLS refused: 454", str(self.failureResultOf(d, RelayError).value))

    def test_text_after_starttls_reply(self):
        """What comes with the 220 before TLS is never read as if it came after (CVE-2011-0411)."""
        for injected in (b"250-relay.test\r\n", b"250 AUTH PLAIN\r\n"):
            session = Session(self, "smtp://relay.test")
            d = defer.ensureDeferred(session.conn.handshake())
            session.answer(b"220 relay.test ESMTP\r\n")
            session.answer(EHLO_TLS)
            session.answer(b"220 go ahead\r\n" + injected)
            self.failureResultOf(d, RelayError)

    def test_greeting_refused(self):
        for greeting, temporary in ((b"554 5.7.1 go away\r\n", False), (b"421 4.3.2 busy\r\n", True)):
            session = Session(self)
            d = defer.ensureDeferred(session.conn.handshake())
            session.answer(greeting)
            e = self.failureResultOf(d, RelayError).value
            self.assertEqual(e.temporary, temporary)
            self.assertIn(greeting[:3].decode(), str(e))

    def test_ehlo_refused(self):
        session = Session(self)
        d = defer.ensureDeferred(session.conn.handshake())
        session.answer(b"220 hi\r\n")
        session.answer(b"502 5.5.1 no EHLO\r\n")
        e = self.failureResultOf(d, RelayError).value
        self.assertIn("EHLO refused", str(e))
        self.assertFalse(e.temporary)

    def test_greeting_timeout(self):
        session = Session(self)
        d = defer.ensureDeferred(session.conn.handshake())
        session.clock.advance(59)
        self.assertNoResult(d)
        session.clock.advance(1)
        self.assertIn("timed out", str(self.failureResultOf(d, RelayError).value))
        self.assertTrue(session.transport.disconnecting)

    def test_garbage_greeting(self):
        session = Session(self)
        d = defer.ensureDeferred(session.conn.handshake())
        session.answer(b"HTTP/1.1 400 Bad Request\r\n")
        self.assertIn("not NNN", str(self.failureResultOf(d, RelayError).value))
        self.assertTrue(session.transport.disconnecting)
        self.assertEqual(session.clock.getDelayedCalls(), [])

    def test_lost(self):
        session = Session(self)
        d = defer.ensureDeferred(session.conn.handshake())
        session.conn.connectionLost(Failure(error.ConnectionDone()))
        self.assertIn("closed by the relay", str(self.failureResultOf(d, RelayError).value))


class LoginTests(SynchronousTestCase):
    def setUp(self):
        self.auth = RelayAuth("gw", "pa55word")

    def start(self, ehlo=EHLO_AUTH):
        session = Session(self, auth=self.auth)
        d = defer.ensureDeferred(session.conn.handshake())
        session.answer(b"220 relay.test ESMTP\r\n")
        return session, d, session.answer(ehlo)

    def test_plain(self):
        session, d, sent = self.start()
        self.assertEqual(sent, b"AUTH PLAIN " + base64.b64encode(b"\0gw\0pa55word") + b"\r\n")
        session.answer(b"235 2.7.0 ok\r\n")
        self.successResultOf(d)

    def test_login(self):
        session, d, sent = self.start(b"250-relay.test\r\n250 AUTH=LOGIN\r\n")
        self.assertEqual(sent, b"AUTH LOGIN\r\n")
        self.assertEqual(session.answer(b"334 VXNlcm5hbWU6\r\n"), base64.b64encode(b"gw") + b"\r\n")
        self.assertEqual(session.answer(b"334 UGFzc3dvcmQ6\r\n"), base64.b64encode(b"pa55word") + b"\r\n")
        session.answer(b"235 ok\r\n")
        self.successResultOf(d)

    def test_refused(self):
        for answer, temporary in ((b"535 5.7.8 bad credentials\r\n", False), (b"454 4.7.0 later\r\n", True)):
            session, d, _ = self.start()
            session.answer(answer)
            e = self.failureResultOf(d, RelayError).value
            self.assertEqual(e.temporary, temporary)
            self.assertIn("AUTH refused", str(e))
            self.assertNotIn("pa55word", str(e))
            self.assertNotIn(base64.b64encode(b"\0gw\0pa55word").decode(), str(e))

    def test_not_offered(self):
        session, d, _ = self.start(EHLO_PLAIN)
        e = self.failureResultOf(d, RelayError).value
        self.assertIn("neither AUTH PLAIN nor LOGIN", str(e))
        self.assertFalse(e.temporary)

    def test_unexpected_challenge(self):
        session, d, _ = self.start()
        self.assertEqual(session.answer(b"334 \r\n"), b"*\r\n")
        session.answer(b"501 5.7.0 cancelled\r\n")
        self.failureResultOf(d, RelayError)


class SendTestCase(SynchronousTestCase):
    """A relay that takes one command at a time (no PIPELINING: each reply, then the next command)."""

    url = "smtp://relay.test?tls=none"
    ehlo = EHLO_NO_PIPELINING

    def setUp(self):
        self.session = Session(self, self.url)
        self.conn = self.session.handshake(self.ehlo)
        self.message = self.mktemp()
        write_file(self.message, b"Subject: hi\r\n\r\n.leading dot\r\nbody\r\n")

    def send(self, recipients=("a@example.net",), mail_from="s@example.com", auth=None):
        """Start sending; C{self.first} is what the client sent at once."""
        d = self.conn.send(mail_from, list(recipients), self.message, 42, auth)
        self.first = self.session.sent()
        return d


class SendTests(SendTestCase):
    def test_message(self):
        d = self.send(["a@example.net", "b@example.net"])
        s = self.session
        self.assertEqual(self.first, b"MAIL FROM:<s@example.com> SIZE=42\r\n")
        self.assertEqual(s.answer(b"250 ok\r\n"), b"RCPT TO:<a@example.net>\r\n")
        self.assertEqual(s.answer(b"250 ok\r\n"), b"RCPT TO:<b@example.net>\r\n")
        self.assertEqual(s.answer(b"250 ok\r\n"), b"DATA\r\n")
        self.assertEqual(s.answer(b"354 go\r\n"), b"")
        self.assertEqual(s.stream(), b"Subject: hi\r\n\r\n..leading dot\r\nbody\r\n.\r\n")
        s.answer(b"250 2.0.0 Ok: queued as X\r\n")
        result = self.successResultOf(d)
        self.assertEqual([str(r) for r in result.replies], ["250 2.0.0 Ok: queued as X"] * 2)
        self.assertTrue(result.usable)
        self.assertEqual(s.clock.getDelayedCalls(), [])

    def test_replies_bytewise(self):
        """Replies arriving an octet at a time, multi-line ones too."""
        d = self.send()
        s = self.session
        s.sent()
        self.assertEqual(s.answer(b"250-sender\r\n250 ok\r\n", bytewise=True), b"RCPT TO:<a@example.net>\r\n")
        self.assertEqual(s.answer(b"250 ok\r\n", bytewise=True), b"DATA\r\n")
        s.answer(b"354 go\r\n", bytewise=True)
        s.stream()
        s.answer(b"250-2.0.0 one\r\n250 2.0.0 two\r\n", bytewise=True)
        self.assertEqual(str(self.successResultOf(d).replies[0]), "250 2.0.0 one 2.0.0 two")

    def test_rset_between_messages(self):
        s = self.session
        for n in range(3):
            d = self.send()
            expected = (b"RSET\r\n" if n else b"") + b"MAIL FROM:<s@example.com> SIZE=42\r\n"
            first = self.first
            if n:
                self.assertEqual(first, b"RSET\r\n")
                first += s.answer(b"250 2.0.0 reset\r\n")
            self.assertEqual(first, expected)
            s.answer(b"250 ok\r\n")
            s.answer(b"250 ok\r\n")
            s.answer(b"354 go\r\n")
            s.stream()
            s.answer(b"250 queued\r\n")
            self.assertTrue(self.successResultOf(d).usable)

    def test_rset_refused(self):
        s = self.session
        d = self.send()
        s.answer(b"550 no\r\n")
        self.successResultOf(d)
        d = self.send()
        s.answer(b"500 what\r\n")
        result = self.successResultOf(d)
        self.assertEqual(result.replies, (lost("RSET refused: 500 what"),))
        self.assertFalse(result.usable)

    def test_recipient_refusals(self):
        d = self.send(["a@example.net", "b@example.net", "c@example.net"])
        s = self.session
        s.answer(b"250 ok\r\n")
        s.answer(b"550 5.1.1 no such user\r\n")
        s.answer(b"250 ok\r\n")
        self.assertEqual(s.answer(b"451 4.2.0 busy\r\n"), b"DATA\r\n")
        s.answer(b"354 go\r\n")
        s.stream()
        s.answer(b"250 queued\r\n")
        result = self.successResultOf(d)
        self.assertEqual([r.code for r in result.replies], [550, 250, 451])

    def test_no_recipient_accepted(self):
        d = self.send(["a@example.net", "b@example.net"])
        s = self.session
        s.answer(b"250 ok\r\n")
        s.answer(b"550 no\r\n")
        self.assertEqual(s.answer(b"450 later\r\n"), b"")  # no DATA
        result = self.successResultOf(d)
        self.assertEqual([r.code for r in result.replies], [550, 450])
        self.assertTrue(result.usable)

    def test_sender_refused(self):
        d = self.send(["a@example.net", "b@example.net"])
        self.assertEqual(self.session.answer(b"553 5.7.1 not yours\r\n"), b"")
        self.assertEqual([str(r) for r in self.successResultOf(d).replies], ["553 5.7.1 not yours"] * 2)

    def test_data_refused(self):
        d = self.send()
        s = self.session
        s.answer(b"250 ok\r\n")
        s.answer(b"250 ok\r\n")
        self.assertEqual(s.answer(b"554 5.5.1 no valid recipients\r\n"), b"")
        self.assertEqual(self.successResultOf(d).replies[0].code, 554)

    def test_421_closes(self):
        d = self.send(["a@example.net", "b@example.net"])
        s = self.session
        s.answer(b"250 ok\r\n")
        s.answer(b"421 4.3.0 shutting down\r\n")
        result = self.successResultOf(d)
        self.assertEqual([r.code for r in result.replies], [421, 451])
        self.assertFalse(result.usable)
        self.assertTrue(s.transport.disconnecting)

    def test_null_sender(self):
        self.send(mail_from="")
        self.assertEqual(self.first, b"MAIL FROM:<> SIZE=42\r\n")

    def test_unsendable_addresses(self):
        """Addresses that could break the command line are never sent."""
        d = self.send(mail_from="a@b\r\nRCPT TO:<x@y>")
        self.assertEqual(self.first, b"")
        self.assertEqual(self.successResultOf(d).replies[0].code, 553)
        d = self.send(["bad>\r\nDATA", "ok@example.net"])
        s = self.session
        s.sent()
        self.assertEqual(s.answer(b"250 ok\r\n"), b"RCPT TO:<ok@example.net>\r\n")
        s.answer(b"550 no\r\n")
        self.assertEqual([r.code for r in self.successResultOf(d).replies], [553, 550])

    def test_out_of_step_replies_deliver_nothing(self):
        """
        A 2xx or 3xx a command cannot have (252 to MAIL or RCPT, 250 to DATA:
        a relay out of step, answering twice) ends the connection: no
        recipient counts as delivered for a reply that was not about its text.
        """
        for step, bad in (("MAIL", b"252 2.1.0 ok\r\n"), ("RCPT", b"252 2.1.5 cannot verify\r\n"),
                          ("DATA", b"250 2.0.0 DATA ok?\r\n"), ("MAIL", b"354 go\r\n")):
            with self.subTest(step=step, bad=bad):
                self.setUp()
                s = self.session
                d = self.send(["a@example.net", "b@example.net"])
                s.sent()
                answers = {"MAIL": [], "RCPT": [b"250 ok\r\n"], "DATA": [b"250 ok\r\n"] * 3}
                for answer in answers[step]:
                    s.answer(answer)
                s.answer(bad)
                result = self.successResultOf(d)
                self.assertEqual([r.code for r in result.replies], [451, 451])
                self.assertIn(f"an unexpected reply to {step}", result.replies[0].text)
                self.assertFalse(result.usable)

    def test_good_reply_then_junk(self):
        """A 250 followed by junk in the same segment still delivers; the junk ends the session."""
        s = self.session
        d = self.send(["a@example.net"])
        s.sent()
        for answer in (b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"):
            s.answer(answer)
        s.stream()
        s.answer(b"250 2.0.0 queued as X\r\n\x00junk\r\n")
        result = self.successResultOf(d)
        self.assertEqual([str(r) for r in result.replies], ["250 2.0.0 queued as X"])
        self.assertFalse(self.conn.alive)  # the next message takes a fresh connection

    def test_end_of_data_only_250_delivers(self):
        """
        The reply to the end of data delivers only as a 250: a 221, 252 or
        stray 354 is a relay out of step, so the recipients stay pending.
        """
        for bad in (b"221 2.0.0 bye\r\n", b"252 2.0.0 maybe\r\n", b"354 go\r\n"):
            with self.subTest(bad=bad):
                self.setUp()
                s = self.session
                d = self.send(["a@example.net", "b@example.net"])
                s.sent()
                for answer in (b"250 ok\r\n", b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"):
                    s.answer(answer)
                s.stream()
                s.answer(bad)
                result = self.successResultOf(d)
                self.assertEqual([r.code for r in result.replies], [451, 451])
                self.assertIn("an unexpected reply to the end of data", result.replies[0].text)
                self.assertFalse(result.usable)

    def test_quoted_local_part_sent(self):
        """A quoted local part the front doors accept (a space, a >) is sent as it is, not refused locally."""
        self.send(['"a b>c"@example.net'], mail_from='"x y"@example.com')
        s = self.session
        self.assertEqual(self.first, b'MAIL FROM:<"x y"@example.com> SIZE=42\r\n')
        self.assertEqual(s.answer(b"250 ok\r\n"), b'RCPT TO:<"a b>c"@example.net>\r\n')

    def test_message_file_must_be_regular(self):
        """A symbolic link or FIFO planted as the message is never read (a confused deputy, or a hang)."""
        secret = self.mktemp()
        write_file(secret, b"Subject: not yours\r\n\r\nsecret\r\n")
        link, fifo = self.mktemp(), self.mktemp()
        os.symlink(os.path.abspath(secret), link)
        os.mkfifo(fifo)
        for path in (link, fifo):
            d = self.conn.send("s@example.com", ["a@example.net"], path, 1, None)
            self.failureResultOf(d, OSError)
            self.assertEqual(self.session.sent(), b"")

    def test_missing_message_file(self):
        d = self.conn.send("s@example.com", ["a@example.net"], self.mktemp(), 1, None)
        self.failureResultOf(d, FileNotFoundError)
        self.assertEqual(self.session.sent(), b"")
        self.send()
        self.assertEqual(self.first, b"MAIL FROM:<s@example.com> SIZE=42\r\n")

    def test_one_at_a_time(self):
        self.send()
        self.failureResultOf(self.send(), RuntimeError)

    def test_command_timeout(self):
        d = self.send(["a@example.net", "b@example.net"])
        s = self.session
        s.answer(b"250 ok\r\n")
        s.answer(b"250 ok\r\n")
        s.clock.advance(60)
        result = self.successResultOf(d)
        self.assertEqual(result.replies, (lost("timed out waiting for the relay"), lost("timed out waiting for the relay")))
        self.assertEqual(str(LOST), "451 4.4.2 connection to the relay lost")
        self.assertFalse(result.usable)
        self.assertTrue(s.transport.disconnecting)
        # a broken connection answers at once
        result = self.successResultOf(self.send())
        self.assertEqual((result.replies, result.usable), ((lost("timed out waiting for the relay"),), False))

    def test_final_reply_timeout(self):
        d = self.send()
        s = self.session
        s.answer(b"250 ok\r\n")
        s.answer(b"250 ok\r\n")
        s.answer(b"354 go\r\n")
        s.stream()
        s.clock.advance(119)
        self.assertNoResult(d)
        s.clock.advance(1)
        self.assertEqual(self.successResultOf(d).replies, (lost("timed out waiting for the relay"),))

    def test_stream_stall(self):
        """A relay that stops reading the message text: the stream times out."""
        d = self.send()
        s = self.session
        s.answer(b"250 ok\r\n")
        s.answer(b"250 ok\r\n")
        s.answer(b"354 go\r\n")
        self.assertIsNotNone(s.transport.producer)  # nothing pulled: the relay reads nothing
        s.clock.advance(60)
        result = self.successResultOf(d)
        self.assertEqual((result.replies, result.usable), ((lost("timed out waiting for the relay"),), False))
        self.assertEqual(s.clock.getDelayedCalls(), [])

    def test_lost_mid_data(self):
        self.message_big()
        d = self.send(["a@example.net", "b@example.net"])
        s = self.session
        for answer in (b"250 ok\r\n", b"250 ok\r\n", b"550 no\r\n", b"354 go\r\n"):
            s.answer(answer)
        s.transport.producer.resumeProducing()
        s.conn.connectionLost(Failure(error.ConnectionLost()))
        result = self.successResultOf(d)
        self.assertEqual([r.code for r in result.replies], [451, 550])
        self.assertFalse(result.usable)

    def message_big(self):
        write_file(self.message, (b"." + b"x" * 77 + b"\r\n") * 5000)

    def test_streams_in_chunks(self):
        """The file is read a chunk at a time as the transport asks, never whole."""
        self.message_big()
        d = self.send()
        s = self.session
        s.answer(b"250 ok\r\n")
        s.answer(b"250 ok\r\n")
        s.answer(b"354 go\r\n")
        sizes = []
        while s.transport.producer is not None:
            s.transport.producer.resumeProducing()
            sizes.append(len(s.sent()))
        self.assertGreater(len(sizes), 5)
        self.assertEqual(sum(sizes), 5000 * 81 + 3)
        s.answer(b"250 ok\r\n")
        self.successResultOf(d)

    def test_read_error_mid_data(self):
        """A message file that cannot be read mid-way: the connection ends, never a partial message."""
        self.message_big()
        d = self.send()
        s = self.session
        for answer in (b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"):
            s.answer(answer)
        s.transport.producer.resumeProducing()
        s.transport.producer._file = BrokenFile()
        s.transport.producer.resumeProducing()
        result = self.successResultOf(d)
        self.assertEqual((result.replies, result.usable), ((lost("cannot read the message file: Input/output error"),), False))
        self.assertNotIn(b".\r\n", s.sent()[-3:])
        self.assertTrue(s.transport.disconnecting)

    def test_unexpected_reply(self):
        s = self.session
        s.answer(b"421 4.4.2 idle timeout\r\n")
        self.assertTrue(s.transport.disconnecting)
        result = self.successResultOf(self.send())
        self.assertFalse(result.usable)

    def test_garbage_mid_transaction(self):
        d = self.send()
        s = self.session
        s.answer(b"250 ok\r\n")
        s.answer(b"\x00\x01garbage\r\n")
        self.assertEqual(self.successResultOf(d).replies, (lost("a reply line that is not NNN text"),))


class MailAuthTests(SendTestCase):
    ehlo = b"250-relay.test\r\n250-SIZE\r\n250 AUTH PLAIN\r\n"

    def test_auth_parameter(self):
        self.send(auth="daniel+x@example.com")
        self.assertEqual(self.first, b"MAIL FROM:<s@example.com> SIZE=42 AUTH=daniel+2Bx@example.com\r\n")

    def test_no_identity(self):
        self.send(auth=None)
        self.assertEqual(self.first, b"MAIL FROM:<s@example.com> SIZE=42 AUTH=<>\r\n")

    def fallback(self, refusal: bytes) -> bytes:
        """MAIL with AUTH= gets C{refusal}: RSET, the message again without it; then what the next MAIL says."""
        s = self.session
        d = self.send(auth="daniel@example.com")
        s.sent()
        self.assertEqual(s.answer(refusal), b"RSET\r\n")
        self.assertEqual(s.answer(b"250 OK\r\n"), b"MAIL FROM:<s@example.com> SIZE=42\r\n")
        s.answer(b"250 ok\r\n")
        s.answer(b"250 ok\r\n")
        s.answer(b"354 go\r\n")
        s.stream()
        s.answer(b"250 queued\r\n")
        self.assertEqual(self.successResultOf(d).replies[0].code, 250)
        self.send(auth="alice@example.com")
        self.assertEqual(self.first, b"RSET\r\n")
        return s.answer(b"250 OK\r\n")

    def test_555_fallback(self):
        """A relay refusing AUTH= (aiosmtpd 1.4.6 answers 555) gets MAIL again without it, from then on."""
        self.assertEqual(self.fallback(b"555 MAIL FROM parameters not recognized or not implemented\r\n"),
                         b"MAIL FROM:<s@example.com> SIZE=42\r\n")

    def test_501_naming_parameters(self):
        """A 501/504 naming parameters may be about this value: this message only goes without AUTH=."""
        self.assertEqual(self.fallback(b"501 5.5.4 Unrecognized parameter AUTH\r\n"),
                         b"MAIL FROM:<s@example.com> SIZE=42 AUTH=alice@example.com\r\n")

    def test_other_refusal_kept(self):
        s = self.session
        d = self.send(auth="daniel@example.com")
        s.sent()
        self.assertEqual(s.answer(b"501 5.1.7 bad sender address\r\n"), b"")
        self.assertEqual(self.successResultOf(d).replies[0].code, 501)
        self.assertTrue(self.conn._mail_auth)

    def test_555_without_auth_parameter(self):
        """A 555 to a MAIL that did not carry AUTH= is the answer, not a reason to retry."""
        self.session.conn.extensions.pop("AUTH")
        d = self.send(auth="daniel@example.com")
        self.assertEqual(self.first, b"MAIL FROM:<s@example.com> SIZE=42\r\n")
        self.session.answer(b"555 5.5.4 no\r\n")
        self.assertEqual(self.successResultOf(d).replies[0].code, 555)


class LMTPTests(SendTestCase):
    url = "lmtp:///run/lmtp.sock"
    ehlo = b"250 mda\r\n"

    def test_per_recipient_replies(self):
        d = self.send(["a@example.net", "b@example.net", "c@example.net"])
        s = self.session
        self.assertEqual(self.first, b"MAIL FROM:<s@example.com>\r\n")
        s.answer(b"250 ok\r\n")
        s.answer(b"250 ok\r\n")
        s.answer(b"550 5.1.1 unknown\r\n")
        s.answer(b"250 ok\r\n")
        s.answer(b"354 go\r\n")
        s.stream()
        s.answer(b"250 2.0.0 a saved\r\n452 4.2.2 c over quota\r\n")
        result = self.successResultOf(d)
        self.assertEqual([str(r) for r in result.replies],
                         ["250 2.0.0 a saved", "550 5.1.1 unknown", "452 4.2.2 c over quota"])
        self.assertTrue(result.usable)

    def test_lost_after_some_replies(self):
        d = self.send(["a@example.net", "b@example.net"])
        s = self.session
        for answer in (b"250 ok\r\n", b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"):
            s.answer(answer)
        s.stream()
        s.answer(b"250 2.0.0 a saved\r\n")
        s.conn.connectionLost(Failure(error.ConnectionLost()))
        result = self.successResultOf(d)
        self.assertEqual([r.code for r in result.replies], [250, 451])
        self.assertFalse(result.usable)


PIPELINED_MAIL = b"MAIL FROM:<s@example.com> SIZE=42\r\n"
TEXT_WIRE = b"Subject: hi\r\n\r\n..leading dot\r\nbody\r\n.\r\n"


def rcpt_lines(*addresses: str) -> bytes:
    return b"".join(b"RCPT TO:<%s>\r\n" % a.encode() for a in addresses)


class PipeliningTests(SendTestCase):
    """A relay offering PIPELINING (RFC 2920): the commands up to DATA in one write, the replies read in order."""

    ehlo = EHLO_PLAIN

    def test_one_write(self):
        s = self.session
        for n, bytewise in enumerate((False, True)):
            d = self.send(["a@example.net", "b@example.net"])
            self.assertEqual(self.first, b"RSET\r\n" * n + PIPELINED_MAIL
                             + rcpt_lines("a@example.net", "b@example.net") + b"DATA\r\n")
            self.assertEqual(s.transport.io.getvalue(), b"")
            replies = b"250 reset\r\n" * n + b"250 ok\r\n250-a\r\n250 ok\r\n251 forwarded\r\n354 go\r\n"
            self.assertEqual(s.answer(replies, bytewise=bytewise), b"")
            self.assertEqual(s.stream(), TEXT_WIRE)
            s.answer(b"250 2.0.0 queued\r\n", bytewise=bytewise)
            result = self.successResultOf(d)
            self.assertEqual([str(r) for r in result.replies], ["250 2.0.0 queued"] * 2)
            self.assertTrue(result.usable)
            self.assertEqual(s.clock.getDelayedCalls(), [])

    @given(
        st.sampled_from([250, 451, 550, 553]),
        st.lists(st.sampled_from([250, 251, 450, 503, 550]), min_size=1, max_size=4),
        st.sampled_from([354, 451, 503, 554]),
        st.sampled_from([250, 452, 554]),
        st.lists(st.integers(0, 400), max_size=8),
    )
    def test_any_outcome_any_split(self, mail, rcpts, data, final, cuts):
        """
        Whatever the relay answers, however its replies are cut: a refused
        MAIL is every recipient's outcome (not the RCPTs' replies), DATA's
        reply is nobody's when no RCPT was accepted (a 354 then gets the end
        of data alone and ends the session), a refused DATA is the accepted
        recipients' outcome.
        """
        self.setUp()
        s = self.session
        recipients = [f"r{i}@example.net" for i in range(len(rcpts))]
        d = self.send(recipients)
        self.assertEqual(self.first, PIPELINED_MAIL + rcpt_lines(*recipients) + b"DATA\r\n")
        wire = b"".join(b"%d x\r\n" % code for code in [mail, *rcpts, data])
        sent = b"".join(s.answer(piece) for piece in chunked(wire, cuts) if piece)
        accepted = [code in (250, 251) for code in rcpts]
        if mail != 250:
            expected, text = [mail] * len(rcpts), False
        elif not any(accepted):
            expected, text = list(rcpts), False
        else:
            expected = [(250 if data == 354 else data) if ok else code for ok, code in zip(accepted, rcpts)]
            expected = [final if code == 250 and data == 354 else code for code in expected]
            text = data == 354
        out_of_step = data == 354 and not text
        if text:
            self.assertEqual(sent, b"")
            self.assertEqual(s.stream(), TEXT_WIRE)
            s.answer(b"%d done\r\n" % final)
        else:
            self.assertEqual(sent, b".\r\n" if out_of_step else b"")  # never the text
            if out_of_step:
                s.answer(b"%d done\r\n" % final)
        result = self.successResultOf(d)
        self.assertEqual([r.code for r in result.replies], expected)
        self.assertEqual(result.usable, not out_of_step)
        self.assertEqual(s.transport.disconnecting, out_of_step)

    def test_sender_refused(self):
        """The RCPTs' replies after a refused MAIL (503: no transaction) are not the recipients' outcome."""
        d = self.send(["a@example.net", "b@example.net"])
        s = self.session
        sent = s.answer(b"553 5.7.1 not yours\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need RCPT\r\n")
        self.assertEqual(sent, b"")
        result = self.successResultOf(d)
        self.assertEqual([str(r) for r in result.replies], ["553 5.7.1 not yours"] * 2)
        self.assertTrue(result.usable)
        self.send()
        self.assertEqual(self.first, b"RSET\r\n" + PIPELINED_MAIL + rcpt_lines("a@example.net") + b"DATA\r\n")

    def test_no_recipient_accepted(self):
        d = self.send(["a@example.net", "b@example.net"])
        s = self.session
        self.assertEqual(s.answer(b"250 ok\r\n550 no\r\n450 later\r\n554 5.5.1 no valid recipients\r\n"), b"")
        result = self.successResultOf(d)
        self.assertEqual([str(r) for r in result.replies], ["550 no", "450 later"])
        self.assertTrue(result.usable)

    def test_354_without_recipients(self):
        """A broken relay answering 354 with no recipient accepted gets "." alone, and the session ends."""
        d = self.send(["a@example.net"])
        s = self.session
        self.assertEqual(s.answer(b"250 ok\r\n550 no\r\n354 go\r\n"), b".\r\n")
        self.assertNoResult(d)
        s.answer(b"250 2.0.0 empty message\r\n")
        result = self.successResultOf(d)
        self.assertEqual([str(r) for r in result.replies], ["550 no"])
        self.assertFalse(result.usable)
        self.assertTrue(s.transport.disconnecting)
        self.assertEqual(s.clock.getDelayedCalls(), [])

    def test_data_refused(self):
        d = self.send(["a@example.net", "b@example.net"])
        s = self.session
        s.answer(b"250 ok\r\n250 ok\r\n550 no\r\n451 4.3.0 not now\r\n")
        self.assertEqual([str(r) for r in self.successResultOf(d).replies], ["451 4.3.0 not now", "550 no"])

    def test_unsendable_recipient_not_sent(self):
        d = self.send(["bad>\r\nDATA", "ok@example.net"])
        self.assertEqual(self.first, PIPELINED_MAIL + rcpt_lines("ok@example.net") + b"DATA\r\n")
        s = self.session
        s.answer(b"250 ok\r\n250 ok\r\n354 go\r\n")
        s.stream()
        s.answer(b"250 queued\r\n")
        self.assertEqual([r.code for r in self.successResultOf(d).replies], [553, 250])

    def test_no_sendable_recipient(self):
        """No RCPT: no DATA either."""
        d = self.send(["bad>\r\nDATA"])
        self.assertEqual(self.first, PIPELINED_MAIL)
        self.session.answer(b"250 ok\r\n")
        self.assertEqual([r.code for r in self.successResultOf(d).replies], [553])

    def test_rset_refused(self):
        s = self.session
        d = self.send()
        s.answer(b"550 no\r\n503 no\r\n503 no\r\n")
        self.successResultOf(d)
        d = self.send()
        s.answer(b"500 what\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        result = self.successResultOf(d)
        self.assertEqual(result.replies, (lost("RSET refused: 500 what"),))
        self.assertFalse(result.usable)
        self.assertIsNone(s.transport.producer)  # no text after a broken RSET

    def test_out_of_step_replies_deliver_nothing(self):
        for step, wire in (
            ("MAIL", b"252 2.1.0 ok\r\n250 ok\r\n354 go\r\n"),
            ("RCPT", b"250 ok\r\n252 2.1.5 cannot verify\r\n354 go\r\n"),
            ("DATA", b"250 ok\r\n250 ok\r\n250 2.0.0 DATA ok?\r\n"),
            ("DATA", b"553 no\r\n503 no\r\n250 ok\r\n"),
        ):
            with self.subTest(step=step, wire=wire):
                self.setUp()
                s = self.session
                d = self.send()
                self.assertEqual(s.answer(wire), b"")
                result = self.successResultOf(d)
                if wire.startswith(b"553"):  # MAIL's refusal stands; the session does not
                    self.assertEqual([r.code for r in result.replies], [553])
                else:
                    self.assertEqual([r.code for r in result.replies], [451])
                    self.assertIn(f"an unexpected reply to {step}", result.replies[0].text)
                self.assertFalse(result.usable)
                self.assertIsNone(s.transport.producer)

    def test_421_anywhere(self):
        for wire, codes in (
            (b"421 4.3.0 bye\r\n", [421, 421]),
            (b"250 ok\r\n421 4.3.0 bye\r\n", [421, 451]),
            (b"250 ok\r\n250 ok\r\n250 ok\r\n421 4.3.0 bye\r\n", [421, 421]),
        ):
            with self.subTest(wire=wire):
                self.setUp()
                s = self.session
                d = self.send(["a@example.net", "b@example.net"])
                s.answer(wire)
                result = self.successResultOf(d)
                self.assertEqual([r.code for r in result.replies], codes)
                self.assertFalse(result.usable)
                self.assertTrue(s.transport.disconnecting)
                self.assertEqual(s.clock.getDelayedCalls(), [])

    def test_stall_after_some_replies(self):
        """A relay that answers part of the group, then nothing: the next reply's wait times out."""
        d = self.send(["a@example.net", "b@example.net"])
        s = self.session
        s.answer(b"250 ok\r\n250 ok\r\n")
        s.clock.advance(59)
        self.assertNoResult(d)
        s.clock.advance(1)
        result = self.successResultOf(d)
        self.assertEqual(result.replies, (lost("timed out waiting for the relay"),) * 2)
        self.assertTrue(s.transport.disconnecting)
        self.assertEqual(s.clock.getDelayedCalls(), [])

    def test_each_reply_timed_from_the_one_before(self):
        """A relay working through the group slowly is not cut short: each reply has its whole timeout."""
        d = self.send(["a@example.net", "b@example.net"])
        s = self.session
        for reply in (b"250 ok\r\n", b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"):
            s.clock.advance(50)
            s.answer(reply)
        s.stream()
        s.answer(b"250 queued\r\n")
        self.assertEqual([r.code for r in self.successResultOf(d).replies], [250, 250])

    def test_lost_mid_group(self):
        d = self.send(["a@example.net", "b@example.net"])
        s = self.session
        s.answer(b"250 ok\r\n250 ok\r\n")
        s.conn.connectionLost(Failure(error.ConnectionLost()))
        result = self.successResultOf(d)
        self.assertEqual([r.code for r in result.replies], [451, 451])
        self.assertFalse(result.usable)


class PipelinedMailAuthTests(SendTestCase):
    ehlo = b"250-relay.test\r\n250-PIPELINING\r\n250-SIZE\r\n250 AUTH PLAIN\r\n"

    def fallback(self, refusal):
        s = self.session
        d = self.send(auth="daniel@example.com")
        self.assertEqual(self.first, b"MAIL FROM:<s@example.com> SIZE=42 AUTH=daniel@example.com\r\n"
                         + rcpt_lines("a@example.net") + b"DATA\r\n")
        sent = s.answer(refusal + b"503 5.5.1 need MAIL\r\n503 5.5.1 need RCPT\r\n")
        self.assertEqual(sent, b"RSET\r\n" + PIPELINED_MAIL + rcpt_lines("a@example.net") + b"DATA\r\n")
        self.assertEqual(s.answer(b"250 OK\r\n250 ok\r\n250 ok\r\n354 go\r\n"), b"")
        s.stream()
        s.answer(b"250 queued\r\n")
        self.assertEqual(self.successResultOf(d).replies[0].code, 250)
        self.send(auth="alice@example.com")
        return self.first

    def test_555_fallback(self):
        """555 to MAIL ... AUTH=: the group's other replies are drained, the message goes again without it."""
        self.assertEqual(self.fallback(b"555 MAIL FROM parameters not recognized or not implemented\r\n"),
                         b"RSET\r\n" + PIPELINED_MAIL + rcpt_lines("a@example.net") + b"DATA\r\n")

    def test_501_naming_parameters(self):
        self.assertEqual(self.fallback(b"501 5.5.4 Unrecognized parameter AUTH\r\n"),
                         b"RSET\r\nMAIL FROM:<s@example.com> SIZE=42 AUTH=alice@example.com\r\n"
                         + rcpt_lines("a@example.net") + b"DATA\r\n")

    def test_555_and_354_without_recipients(self):
        """A relay that refuses MAIL and still says 354: "." alone, the session ends, the message is retried."""
        s = self.session
        d = self.send(auth="daniel@example.com")
        self.assertEqual(s.answer(b"555 no\r\n503 need MAIL\r\n354 go\r\n"), b".\r\n")
        s.answer(b"503 need MAIL\r\n")
        result = self.successResultOf(d)
        self.assertEqual([r.code for r in result.replies], [451])
        self.assertFalse(result.usable)


    def test_replies_before_their_commands(self):
        """
        The answers to the fallback's group sent with the 555, before the relay
        could read that group: it answers what it has not read (a 354 among
        them), so the session ends and no text goes out.
        """
        s = self.session
        d = self.send(auth="daniel@example.com")
        sent = s.answer(b"555 no\r\n503 need MAIL\r\n503 need RCPT\r\n"
                        b"250 reset\r\n250 mail\r\n250 rcpt\r\n354 go ahead\r\n")
        self.assertEqual(sent, b"")
        result = self.successResultOf(d)
        self.assertEqual([r.code for r in result.replies], [451])
        self.assertIn("a reply before its command", result.replies[0].text)
        self.assertFalse(result.usable)


class PipelinedLMTPTests(SendTestCase):
    url = "lmtp:///run/lmtp.sock"
    ehlo = b"250-mda\r\n250 PIPELINING\r\n"

    def test_per_recipient_replies(self):
        d = self.send(["a@example.net", "b@example.net", "c@example.net"])
        s = self.session
        self.assertEqual(self.first, b"MAIL FROM:<s@example.com>\r\n"
                         + rcpt_lines("a@example.net", "b@example.net", "c@example.net") + b"DATA\r\n")
        self.assertEqual(s.answer(b"250 ok\r\n250 ok\r\n550 5.1.1 unknown\r\n250 ok\r\n354 go\r\n"), b"")
        s.stream()
        s.answer(b"250 2.0.0 a saved\r\n")
        self.assertNoResult(d)
        s.clock.advance(119)
        s.answer(b"452 4.2.2 c over quota\r\n")  # each reply after the end of data has its own timeout
        result = self.successResultOf(d)
        self.assertEqual([str(r) for r in result.replies],
                         ["250 2.0.0 a saved", "550 5.1.1 unknown", "452 4.2.2 c over quota"])
        self.assertTrue(result.usable)

    def test_421_after_data(self):
        d = self.send(["a@example.net", "b@example.net"])
        s = self.session
        s.answer(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        s.stream()
        s.answer(b"421 4.3.0 bye\r\n")
        result = self.successResultOf(d)
        self.assertEqual([r.code for r in result.replies], [421, 451])
        self.assertFalse(result.usable)


class HandshakeNotPipelinedTests(SynchronousTestCase):
    """STARTTLS and AUTH are never pipelined, even when the relay offers PIPELINING."""

    def test_starttls_alone(self):
        ehlo = b"250-relay.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n"
        session = Session(self, "smtp://relay.test", ca=(make_ca().certificate,))
        d = defer.ensureDeferred(session.conn.handshake())
        session.answer(b"220 relay.test ESMTP\r\n")
        self.assertEqual(session.answer(ehlo), b"STARTTLS\r\n")
        self.assertEqual(session.answer(b"220 go ahead\r\n"), b"EHLO gw.test\r\n")
        session.answer(b"250-relay.test\r\n250 PIPELINING\r\n")
        self.successResultOf(d)
        for injected in (b"250-relay.test\r\n", b"250 PIPELINING\r\n"):
            session = Session(self, "smtp://relay.test")
            d = defer.ensureDeferred(session.conn.handshake())
            session.answer(b"220 relay.test ESMTP\r\n")
            session.answer(ehlo)
            session.answer(b"220 go ahead\r\n" + injected)
            self.assertIn("text after the STARTTLS reply", str(self.failureResultOf(d, RelayError).value))
            self.assertFalse(session.transport.tls_started)

    def test_auth_alone(self):
        session = Session(self, auth=RelayAuth("gw", "pa55word"))
        d = defer.ensureDeferred(session.conn.handshake())
        session.answer(b"220 relay.test ESMTP\r\n")
        sent = session.answer(b"250-relay.test\r\n250-PIPELINING\r\n250 AUTH LOGIN\r\n")
        self.assertEqual(sent, b"AUTH LOGIN\r\n")
        self.assertEqual(session.answer(b"334 VXNlcm5hbWU6\r\n"), base64.b64encode(b"gw") + b"\r\n")
        self.assertEqual(session.answer(b"334 UGFzc3dvcmQ6\r\n"), base64.b64encode(b"pa55word") + b"\r\n")
        session.answer(b"235 ok\r\n")
        self.successResultOf(d)


class QuitTests(SendTestCase):
    def test_quit(self):
        s = self.session
        d = self.conn.quit()
        self.assertEqual(s.sent(), b"QUIT\r\n")
        s.answer(b"221 bye\r\n")
        self.assertTrue(s.transport.disconnecting)
        self.assertNoResult(d)
        self.conn.connectionLost(Failure(error.ConnectionDone()))
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(s.clock.getDelayedCalls(), [])
        self.assertFalse(self.successResultOf(self.send()).usable)

    def test_no_answer(self):
        s = self.session
        d = self.conn.quit()
        s.clock.advance(QUIT_TIMEOUT)
        self.assertTrue(s.transport.disconnecting)
        self.conn.connectionLost(Failure(error.ConnectionAborted()))
        self.successResultOf(d)

    def test_never_closes(self):
        s = self.session
        d = self.conn.quit()
        s.answer(b"221 bye\r\n")
        s.clock.advance(2 * QUIT_TIMEOUT)
        self.assertTrue(s.transport.disconnecting)
        self.assertNoResult(d)  # fires when the transport says it is closed
        self.conn.connectionLost(Failure(error.ConnectionAborted()))
        self.successResultOf(d)

    def test_broken(self):
        s = self.session
        s.answer(b"garbage\r\n")
        d = self.conn.quit()
        self.assertEqual(s.sent(), b"")
        self.conn.connectionLost(Failure(error.ConnectionAborted()))
        self.successResultOf(d)


class ConnectTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.settings = RelaySettings(targets=(target(),), helo="gw.test", connect_timeout=5)

    def test_connect(self):
        d = connect(self.reactor, self.settings, self.settings.targets[0])
        host, port, factory, timeout, _ = self.reactor.tcpClients[0]
        self.assertEqual((port, timeout), (25, 5))
        self.assertNoResult(d)

    def test_connect_timeout(self):
        d = connect(self.reactor, self.settings, target("smtp://192.0.2.1?tls=none"))
        self.reactor.advance(5)
        e = self.failureResultOf(d, RelayError).value
        self.assertEqual(str(e), "smtp://192.0.2.1:25?tls=none: timed out")
        self.assertTrue(e.temporary)

    def test_refused(self):
        d = connect(self.reactor, self.settings, target("smtp://127.0.0.1:2525?tls=none"))
        connector = self.reactor.connectors[0]
        self.reactor.tcpClients[0][2].clientConnectionFailed(connector, Failure(error.ConnectionRefusedError()))
        self.reactor.advance(1)
        self.assertIn("connection refused", str(self.failureResultOf(d, RelayError).value))

    def test_unix(self):
        connect(self.reactor, self.settings, target("lmtp:///run/lmtp.sock"))
        self.assertEqual(self.reactor.unixClients[0][0], "/run/lmtp.sock")

    def test_handshake_through_connect(self):
        d = connect(self.reactor, self.settings, target("smtp://127.0.0.1?tls=none"))
        factory = self.reactor.tcpClients[0][2]
        proto = factory.buildProtocol(None)
        transport = StartTLSTransport()
        proto.makeConnection(transport)
        proto.dataReceived(b"554 no\r\n")
        self.assertIn("greeting 554 no", str(self.failureResultOf(d, RelayError).value))
        self.assertTrue(transport.disconnecting)

