"""
Tests for L{gateway.smtp.server}: the session driven line by line through
a L{StringTransport}: the greeting and basic commands, STARTTLS (which
forgets everything said before it), and replies in order under pipelining.
One test per row of the reply-code table and per STARTTLS rule of
shared/reference/smtp-auth.md.
"""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.cred.error import UnauthorizedLogin

from gateway.smtp import sasl
from gateway.smtp.server import MAX_COMMAND_LINE
from tests.smtp_support import (
    CONTEXT,
    PendingChecker,
    ServerTestCase,
    TokenMechanism,
    b64,
    finals,
    memory_db,
    plain,
)


class GreetingAndBasicsTests(ServerTestCase):
    def test_ehlo_extensions_starttls_listener(self) -> None:
        """Before TLS: STARTTLS, ENHANCEDSTATUSCODES, PIPELINING, 8BITMIME, SIZE; no AUTH."""
        client = self.connect(max_size=1000)
        lines = self.ehlo(client)
        self.assertEqual(lines[0], b"250-mx.test Hello 192.0.2.7")
        ext = self.extensions(lines)
        for name in (b"STARTTLS", b"ENHANCEDSTATUSCODES", b"PIPELINING", b"8BITMIME", b"SIZE 1000"):
            self.assertIn(name, ext)
        self.assertFalse([e for e in ext if e.startswith(b"AUTH")])

    def test_ehlo_implicit_tls_advertises_auth_at_once(self) -> None:
        """On the C{--smtps} listener AUTH is offered in the first EHLO, STARTTLS never."""
        ext = self.extensions(self.ehlo(self.connect("implicit")))
        self.assertIn(b"AUTH PLAIN LOGIN", ext)
        self.assertNotIn(b"STARTTLS", ext)

    def test_ehlo_insecure_auth_advertises_before_tls(self) -> None:
        ext = self.extensions(self.ehlo(self.connect(insecure_auth=True)))
        self.assertIn(b"AUTH PLAIN LOGIN", ext)

    def test_ehlo_non_plaintext_mechanism_before_tls(self) -> None:
        """A mechanism that sends no password may be offered in cleartext; PLAIN may not."""
        mechanisms = dict(sasl.BUILTIN, TOKEN=TokenMechanism)
        ext = self.extensions(self.ehlo(self.connect(mechanisms=mechanisms)))
        self.assertIn(b"AUTH TOKEN", ext)

    def test_ehlo_without_name(self) -> None:
        self.assertReplies(self.connect().send(b"EHLO\r\n"), [b"501 5.5.4"])

    def test_helo(self) -> None:
        client = self.connect()
        self.assertEqual(client.send(b"HELO client.example\r\n"), [b"250 mx.test"])
        self.assertReplies(client.send(b"HELO\r\n"), [b"501 5.5.4"])

    def test_noop_rset_help_quit(self) -> None:
        client = self.connect()
        self.assertReplies(
            client.send(b"NOOP\r\nRSET\r\nHELP\r\n"), [b"250 2.0.0", b"250 2.0.0", b"214 2.0.0"]
        )
        self.assertFalse(client.closed)
        self.assertReplies(client.send(b"QUIT\r\nNOOP\r\n"), [b"221 2.0.0"])
        self.assertTrue(client.closed)

    def test_commands_case_insensitive(self) -> None:
        client = self.connect("implicit")
        self.assertReplies(client.send(b"ehlo client.example\r\n"), [b"250 "])
        self.assertReplies(client.send(b"noop\r\n"), [b"250 2.0.0"])

    def test_unknown_command(self) -> None:
        client = self.connect()
        self.assertReplies(client.send(b"FROB x\r\n"), [b"500 5.5.2"])
        self.assertReplies(client.send(b"   \r\n"), [b"500 5.5.2"])
        self.assertFalse(client.closed)

    def test_unknown_non_ascii_command(self) -> None:
        """Bytes that are not ASCII in the verb are an unknown command, not a crash."""
        client = self.connect()
        self.assertReplies(client.send(b"\xff\xfe x\r\nNOOP\r\n"), [b"500 5.5.2", b"250 2.0.0"])

    def test_vrfy_requires_auth(self) -> None:
        self.assertReplies(self.tls_session().send(b"VRFY daniel\r\n"), [b"530 5.7.0"])
        self.assertReplies(self.authenticated().send(b"VRFY daniel\r\n"), [b"252 2.5.0"])

    def test_overlong_command(self) -> None:
        """A command line over the limit: 500 5.5.6, and the session goes on."""
        client = self.connect()
        self.assertReplies(
            client.send(b"NOOP " + b"x" * MAX_COMMAND_LINE + b"\r\nNOOP\r\n"),
            [b"500 5.5.6", b"250 2.0.0"],
        )

    def test_overlong_command_streamed(self) -> None:
        """An overlong line arriving in several large segments gets exactly one reply."""
        client = self.connect()
        replies = client.send(b"NOOP " + b"x" * (MAX_COMMAND_LINE + 10))
        replies += client.send(b"x" * (MAX_COMMAND_LINE + 10))
        replies += client.send(b"x" * 10 + b"\r\nNOOP\r\n")
        self.assertReplies(replies, [b"500 5.5.6", b"250 2.0.0"])

    def test_idle_timeout(self) -> None:
        client = self.connect(timeout=30)
        self.clock.advance(29)
        self.assertReplies(client.send(b"NOOP\r\n"), [b"250 2.0.0"])
        self.clock.advance(29)
        self.assertFalse(client.closed)
        self.clock.advance(1)
        self.assertReplies(client.read(), [b"421 4.4.2"])
        self.assertTrue(client.closed)


class StartTLSTests(ServerTestCase):
    def test_starttls(self) -> None:
        client = self.connect()
        self.ehlo(client)
        self.assertReplies(client.send(b"STARTTLS\r\n"), [b"220 2.0.0"])
        self.assertTrue(client.transport.tls_started)
        self.assertIs(client.transport.tls_context, CONTEXT)

    def test_starttls_with_parameters(self) -> None:
        client = self.connect()
        self.ehlo(client)
        self.assertReplies(client.send(b"STARTTLS now\r\n"), [b"501 5.5.4"])
        self.assertFalse(client.transport.tls_started)

    def test_starttls_when_tls_active(self) -> None:
        self.assertReplies(self.tls_session().send(b"STARTTLS\r\n"), [b"503 5.5.1"])

    def test_starttls_twice(self) -> None:
        client = self.connect()
        self.ehlo(client)
        client.send(b"STARTTLS\r\n")
        self.ehlo(client)
        self.assertReplies(client.send(b"STARTTLS\r\n"), [b"503 5.5.1"])

    def test_starttls_without_context(self) -> None:
        client = self.connect(tls=None)
        self.assertNotIn(b"STARTTLS", self.extensions(self.ehlo(client)))
        self.assertReplies(client.send(b"STARTTLS\r\n"), [b"454 4.7.0"])

    def test_starttls_transport_cannot(self) -> None:
        client = self.connect("plain")
        self.assertNotIn(b"STARTTLS", self.extensions(self.ehlo(client)))
        self.assertReplies(client.send(b"STARTTLS\r\n"), [b"454 4.7.0"])

    def test_not_readvertised_auth_advertised_after_tls(self) -> None:
        client = self.connect()
        self.ehlo(client)
        client.send(b"STARTTLS\r\n")
        ext = self.extensions(self.ehlo(client))
        self.assertNotIn(b"STARTTLS", ext)
        self.assertIn(b"AUTH PLAIN LOGIN", ext)

    def test_pipelined_plaintext_discarded(self) -> None:
        """C{STARTTLS\\r\\nRSET\\r\\n} in one segment: RSET never runs (CVE-2011-0411)."""
        client = self.connect()
        self.ehlo(client)
        self.assertReplies(client.send(b"STARTTLS\r\nRSET\r\n"), [b"220 2.0.0"])
        self.assertEqual(client.read(), [])
        self.assertReplies(client.send(b"NOOP\r\n"), [b"250 2.0.0"])

    def test_pipelined_ehlo_discarded(self) -> None:
        """An EHLO injected after STARTTLS does not count: AUTH still needs a new EHLO."""
        client = self.connect()
        self.ehlo(client)
        lines = client.send(b"STARTTLS\r\nEHLO injected\r\nAUTH PLAIN " + plain() + b"\r\n")
        self.assertReplies(lines, [b"220 2.0.0"])
        self.assertReplies(client.send(b"AUTH PLAIN " + plain() + b"\r\n"), [b"503 5.5.1"])

    def test_ehlo_required_after_starttls(self) -> None:
        client = self.connect()
        self.ehlo(client)
        client.send(b"STARTTLS\r\n")
        self.assertReplies(client.send(b"AUTH PLAIN " + plain() + b"\r\n"), [b"503 5.5.1"])
        self.ehlo(client)
        self.assertReplies(client.send(b"AUTH PLAIN " + plain() + b"\r\n"), [b"235 2.7.0"])

    def test_authentication_forgotten(self) -> None:
        """A cleartext login (insecure_auth) does not survive STARTTLS."""
        client = self.connect(insecure_auth=True)
        self.ehlo(client)
        self.assertReplies(client.send(b"AUTH PLAIN " + plain() + b"\r\n"), [b"235 2.7.0"])
        client.send(b"STARTTLS\r\n")
        self.assertIn(b"AUTH PLAIN LOGIN", self.extensions(self.ehlo(client)))
        self.assertReplies(client.send(b"MAIL FROM:<a@b.example>\r\n"), [b"530 5.7.0"])

    def test_transaction_forgotten(self) -> None:
        client = self.trusted_session()
        self.assertReplies(client.send(b"MAIL FROM:<a@b.example>\r\n"), [b"250 2.1.0"])
        client.send(b"STARTTLS\r\n")
        self.assertReplies(client.send(b"MAIL FROM:<a@b.example>\r\n"), [b"503 5.5.1"])
        self.ehlo(client)
        self.assertReplies(client.send(b"RCPT TO:<c@d.example>\r\n"), [b"503 5.5.1"])
        self.assertReplies(client.send(b"MAIL FROM:<a@b.example>\r\n"), [b"250 2.1.0"])

    def test_plaintext_mechanism_before_tls(self) -> None:
        client = self.connect()
        self.ehlo(client)
        self.assertReplies(client.send(b"AUTH PLAIN " + plain() + b"\r\n"), [b"538 5.7.11"])
        self.assertReplies(client.send(b"AUTH LOGIN\r\n"), [b"538 5.7.11"])
        self.assertFalse(client.closed)

    def test_insecure_auth_accepts_plain_before_tls(self) -> None:
        client = self.connect(insecure_auth=True)
        self.ehlo(client)
        self.assertReplies(client.send(b"AUTH PLAIN " + plain() + b"\r\n"), [b"235 2.7.0"])


class PipeliningTests(ServerTestCase):
    def test_replies_wait_for_login(self) -> None:
        checker = PendingChecker()
        client = self.tls_session(checkers=[checker])
        lines = client.send(
            b"AUTH PLAIN " + plain() + b"\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n"
        )
        self.assertEqual(lines, [])
        self.assertEqual(client.send(b"NOOP\r\n"), [])
        ((credentials, d),) = checker.calls
        self.assertEqual((credentials.username, credentials.authzid), ("daniel", ""))
        d.callback("daniel")
        self.assertReplies(
            client.read(), [b"235 2.7.0", b"250 2.1.0", b"250 2.1.5", b"250 2.0.0"]
        )

    def test_failed_login_then_pipelined(self) -> None:
        checker = PendingChecker()
        client = self.tls_session(checkers=[checker])
        self.assertEqual(
            client.send(b"AUTH PLAIN " + plain() + b"\r\nMAIL FROM:<a@b.example>\r\n"), []
        )
        checker.calls[0][1].errback(UnauthorizedLogin())
        self.assertReplies(client.read(), [b"535 5.7.8", b"530 5.7.0"])

    def test_pending_input_bounded(self) -> None:
        """While a login is pending and much input is queued, the server stops reading."""
        checker = PendingChecker()
        client = self.tls_session(checkers=[checker])
        client.send(b"AUTH PLAIN " + plain() + b"\r\n" + b"NOOP\r\n" * 20000)
        self.assertEqual(client.transport.producerState, "paused")
        checker.calls[0][1].callback("daniel")
        self.assertEqual(client.transport.producerState, "producing")
        self.assertEqual(len(finals(client.read())), 20001)

    def test_disconnect_during_pending_login(self) -> None:
        """The client leaving cancels the login; nothing more is written or run."""
        checker = PendingChecker()
        client = self.tls_session(checkers=[checker])
        client.send(b"AUTH PLAIN " + plain() + b"\r\nMAIL FROM:<a@b.example>\r\n")
        ((credentials, d),) = checker.calls
        client.proto.connectionLost(Exception("gone"))
        self.assertEqual(checker.cancelled, [credentials])
        if not d.called:
            d.callback("daniel")
        self.assertEqual(client.read(), [])
        self.assertIsNone(client.proto.auth_info)


#: Pieces of a pipelined session that switch the codec between commands, SASL
#: responses and message text, some of them wrong.
_SESSION_PIECES = st.sampled_from(
    [
        b"AUTH LOGIN\r\n" + b64("daniel") + b"\r\n" + b64("tiger") + b"\r\n",
        b"AUTH LOGIN\r\n*\r\n",
        b"AUTH PLAIN\r\n" + plain() + b"\r\n",
        b"AUTH PLAIN " + plain(password="wrong") + b"\r\n",
        b"MAIL FROM:<daniel@example.com>\r\n",
        b"RCPT TO:<a@example.net>\r\n",
        b"DATA\r\n",
        b"Subject: x\r\n\r\n..dot\r\n.\r\n",
        b"x" * 1200 + b"\r\n",
        b"a\nb\r\n",
        b"RSET\r\n",
        b"NOOP\r\n",
        b"\r\n",
    ]
)


_SESSION = [
    b"AUTH PLAIN\r\n" + plain() + b"\r\n",
    b"MAIL FROM:<daniel@example.com>\r\n",
    b"RCPT TO:<a@example.net>\r\n",
    b"DATA\r\n",
    b"Subject: x\r\n\r\n..dot\r\n.\r\n",
    b"NOOP\r\n",
]


class SplitSessionTests(ServerTestCase):
    """The codec's mode follows the server's replies however the input is cut into reads."""

    def run_session(self, pieces: list[bytes]) -> tuple[list[bytes], list[bytes]]:
        before = set(self.spool.ids())
        client = self.tls_session(checkers=[memory_db("daniel", "tiger")], max_auth_failures=100)
        replies = [line for piece in pieces for line in client.send(piece)]
        new = [id for id in self.spool.ids() if id not in before]
        stored = [self.spool.load(id)[0].partition(b"Subject")[2] for id in new]
        return [line[:10] for line in finals(replies)], stored

    @settings(max_examples=100, deadline=None)
    @given(pieces=st.lists(_SESSION_PIECES, max_size=10), cuts=st.lists(st.integers(0, 3000), max_size=10))
    @example(pieces=_SESSION, cuts=[5, 14, 40])
    def test_any_split_same_replies(self, pieces: list[bytes], cuts: list[int]) -> None:
        wire = b"".join(pieces)
        points = sorted({c for c in cuts if 0 < c < len(wire)})
        split = [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True)]
        whole = self.run_session([wire])
        self.assertEqual(self.run_session(split), whole)
        self.assertEqual(self.run_session([wire[i : i + 1] for i in range(len(wire))]), whole)

    def test_pipelined_session(self) -> None:
        """The example above, in one read: a SASL response, then commands, then text, then commands."""
        replies, stored = self.run_session([b"".join(_SESSION)])
        self.assertEqual(
            replies,
            [b"334 ", b"235 2.7.0 ", b"250 2.1.0 ", b"250 2.1.5 ", b"354 2.0.0 ", b"250 2.0.0 ",
             b"250 2.0.0 "],
        )
        self.assertEqual(stored, [b": x\r\n\r\n.dot\r\n"])
