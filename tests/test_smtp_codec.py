"""
Tests for L{gateway.smtp.codec}: the sans-I/O SMTP submission codec
(framing, commands, message text, the argument parsers, replies), with no
transport. The same input split anywhere gives the same events.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterable

from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.mail import smtp
from twisted.trial.unittest import SynchronousTestCase

from gateway.smtp import codec
from gateway.smtp.codec import (
    MAX_COMMAND_LINE,
    MAX_DATA_LINE,
    AuthResponse,
    Command,
    CommandError,
    DataRefused,
    EndOfData,
    LineTooLong,
    Malformed,
    MessageText,
    Mode,
    ServerCodec,
)

MAX_SIZE = 2000


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def converse(pieces: Iterable[bytes], max_size: int = MAX_SIZE) -> list[object]:
    """
    Feed C{pieces} to a codec the way the server drives it (DATA starts
    message text, AUTH without an initial response one SASL response, a
    line too long ends an exchange) and return the events, adjacent
    L{MessageText} joined and the text of a refused message dropped (how
    the text is cut into events, and how much of it is given before a
    refusal, depends on the reads; the text and the refusal do not).
    """
    c = ServerCodec()
    events: list[object] = []
    for piece in pieces:
        c.receive_data(piece)
        while (event := c.next_event()) is not None:
            if isinstance(event, MessageText) and events and isinstance(events[-1], MessageText):
                events[-1] = MessageText(events[-1].text + event.text)
            elif isinstance(event, DataRefused) and isinstance(events[-1], MessageText):
                events[-1] = event
            else:
                events.append(event)
            if isinstance(event, Command) and event.verb == "DATA":
                c.expect_data(max_size)
            elif isinstance(event, Command) and event.verb == "AUTH" and len(event.argument.split()) == 1:
                c.expect_auth()
            elif isinstance(event, (AuthResponse, LineTooLong)):
                c.expect_command()
    return events


def events_of(wire: bytes, max_size: int = MAX_SIZE) -> list[object]:
    return converse([wire], max_size)


#: Pieces of a session, valid and hostile: commands, AUTH exchanges, message
#: text with stuffed dots, end-marker lookalikes, bare CR and LF, lines at and
#: over every bound, partial CRLFs.
_PIECES = st.sampled_from(
    [
        b"EHLO client.example\r\n",
        b"helo x\r\n",
        b"MAIL FROM:<a@b.example> SIZE=10\r\n",
        b"RCPT TO:<c@d.example>\r\n",
        b"DATA\r\n",
        b"DATA\r\n" + b"line\r\n" * 3 + b".\r\n",
        b"AUTH PLAIN\r\n",
        b"AUTH PLAIN AGRhbmllbAB0aWdlcg==\r\n",
        b"AGRhbmllbAB0aWdlcg==\r\n",
        b"NOOP\r\n",
        b"\r\n",
        b"   \r\n",
        b".\r\n",
        b"..\r\n",
        b".x\r\n",
        b"\r\n.\r\n",
        b"a\nb\r\n",
        b"c\rd\r\n",
        b"\n.\r\n",
        b"\r",
        b"\n",
        b"\xff\xfe\r\n",
        b"x" * MAX_DATA_LINE + b"\r\n",
        b"." + b"x" * MAX_DATA_LINE + b"\r\n",
        b"y" * (MAX_DATA_LINE + 1) + b"\r\n",
        b"NOOP " + b"z" * (MAX_COMMAND_LINE - 5) + b"\r\n",
        b"NOOP " + b"z" * (MAX_COMMAND_LINE - 4) + b"\r\n",
        b"w" * 700,
    ]
)


class SplitAnywhereTests(SynchronousTestCase):
    """The events do not depend on how the input is cut into reads."""

    @settings(max_examples=300, deadline=None)
    @given(pieces=st.lists(_PIECES, max_size=25), cuts=st.lists(st.integers(0, 40000), max_size=12))
    @example(pieces=[b"DATA\r\n", b"a\r\n", b"\r\n.\r\n", b"NOOP\r\n"], cuts=[8, 9, 10])
    def test_any_session_any_split(self, pieces: list[bytes], cuts: list[int]) -> None:
        wire = b"".join(pieces)
        whole = events_of(wire)
        self.assertEqual(converse(split(wire, cuts)), whole)

    @settings(max_examples=60, deadline=None)
    @given(pieces=st.lists(_PIECES.filter(lambda p: len(p) < 100), max_size=12))
    def test_byte_by_byte(self, pieces: list[bytes]) -> None:
        wire = b"".join(pieces)
        self.assertEqual(converse(wire[i : i + 1] for i in range(len(wire))), events_of(wire))

    @settings(max_examples=200, deadline=None)
    @given(
        data=st.binary(max_size=3000), mode=st.sampled_from(list(Mode)), cuts=st.lists(st.integers(0, 3000))
    )
    def test_arbitrary_bytes_never_raise(self, data: bytes, mode: Mode, cuts: list[int]) -> None:
        """Any octets, in any mode: events only, and nothing held beyond a bound."""
        c = ServerCodec()
        {Mode.COMMAND: c.expect_command, Mode.AUTH: c.expect_auth}.get(mode, lambda: c.expect_data(100))()
        for piece in split(data, cuts):
            c.receive_data(piece)
            while c.next_event() is not None:
                pass
            # What is held and not taken is one partial line, at most a bound (and its CR).
            self.assertLessEqual(c.buffered, MAX_COMMAND_LINE + 1)


class SansIOTests(SynchronousTestCase):
    def test_no_twisted(self) -> None:
        """The codec imports nothing of Twisted: no transport, no reactor."""
        code = (
            "import sys, gateway.smtp.codec;"
            " print(sorted(m for m in sys.modules if m.startswith('twisted')))"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        self.assertEqual(out.stdout.strip(), "[]")


class CommandFramingTests(SynchronousTestCase):
    def test_commands(self) -> None:
        self.assertEqual(
            events_of(b"ehlo client.example\r\n  MAIL   FROM:<a@b>  \r\nQUIT\r\n"),
            [Command("EHLO", b"client.example"), Command("MAIL", b"FROM:<a@b>"), Command("QUIT", b"")],
        )

    def test_partial_line_waits(self) -> None:
        c = ServerCodec()
        c.receive_data(b"NOOP\r")
        self.assertIsNone(c.next_event())
        self.assertFalse(c.line_waiting())
        c.receive_data(b"\n")
        self.assertTrue(c.line_waiting())
        self.assertEqual(c.next_event(), Command("NOOP", b""))

    def test_empty_line_is_bad_syntax(self) -> None:
        self.assertEqual(events_of(b"\r\n \t\r\n"), [codec.BAD_SYNTAX] * 2)
        self.assertEqual(codec.BAD_SYNTAX, Malformed(500, "5.5.2", "Error: bad syntax"))

    def test_bare_cr_or_lf_in_a_command(self) -> None:
        """Only CRLF ends a line: a bare LF is inside the line, which is refused whole."""
        self.assertEqual(
            events_of(b"NOOP\nRSET\r\nNOOP\rx\r\n\n\r\n"), [codec.BARE_CR_LF] * 3
        )

    def test_non_ascii_verb_names_no_command(self) -> None:
        (event,) = events_of(b"M\xc3\xa0IL FROM:<a@b>\r\n")
        self.assertIsInstance(event, Command)
        self.assertNotIn(event.verb, ("MAIL", "MAIL FROM:<A@B>"))
        self.assertFalse(event.verb.isascii())

    def test_command_line_bound(self) -> None:
        exact = b"NOOP " + b"x" * (MAX_COMMAND_LINE - 5)
        self.assertEqual(events_of(exact + b"\r\n"), [Command("NOOP", b"x" * (MAX_COMMAND_LINE - 5))])
        self.assertEqual(events_of(exact + b"y\r\nNOOP\r\n"), [LineTooLong(), Command("NOOP", b"")])

    def test_overlong_line_reported_before_its_end_and_skipped(self) -> None:
        c = ServerCodec()
        c.receive_data(b"x" * (MAX_COMMAND_LINE + 1))
        self.assertEqual(c.next_event(), LineTooLong())
        self.assertIsNone(c.next_event())
        self.assertEqual(c.buffered, 0)
        c.receive_data(b"y" * 50000 + b"\r\nNOOP\r\n")
        self.assertEqual(c.next_event(), Command("NOOP", b""))
        self.assertIsNone(c.next_event())

    def test_cr_at_the_end_is_kept(self) -> None:
        """A partial line's CR may be half of its CRLF: it is not counted, not dropped."""
        c = ServerCodec()
        c.receive_data(b"x" * MAX_COMMAND_LINE + b"\r")
        self.assertIsNone(c.next_event())
        c.receive_data(b"\n")
        self.assertEqual(c.next_event(), Command("X" * MAX_COMMAND_LINE, b""))

    def test_auth_responses(self) -> None:
        c = ServerCodec()
        c.expect_auth()
        c.receive_data(b" dGVzdA== \r\n*\r\n")
        self.assertEqual(c.next_event(), AuthResponse(b"dGVzdA=="))
        c.expect_command()
        self.assertEqual(c.next_event(), Command("*", b""))

    def test_secrets_not_in_repr(self) -> None:
        for event in (Command("AUTH", b"PLAIN c2VjcmV0"), AuthResponse(b"c2VjcmV0"), MessageText(b"secret")):
            self.assertNotIn("c2VjcmV0", repr(event))
            self.assertNotIn("secret", repr(event))

    def test_discard_input(self) -> None:
        """What was pipelined after STARTTLS is gone, partial lines too."""
        c = ServerCodec()
        c.receive_data(b"STARTTLS\r\nAUTH PLAIN AGEAYg==\r\nMAIL FR")
        self.assertEqual(c.next_event(), Command("STARTTLS", b""))
        c.discard_input()
        self.assertEqual(c.buffered, 0)
        self.assertIsNone(c.next_event())
        c.receive_data(b"EHLO x\r\n")
        self.assertEqual(c.next_event(), Command("EHLO", b"x"))


class MessageTextTests(SynchronousTestCase):
    def data(self, text: bytes, max_size: int = MAX_SIZE) -> list[object]:
        return events_of(b"DATA\r\n" + text, max_size)[1:]

    def test_dot_unstuffing_and_end(self) -> None:
        self.assertEqual(
            self.data(b"a\r\n..\r\n.x\r\n...\r\n.\r\nNOOP\r\n"),
            [MessageText(b"a\r\n.\r\nx\r\n..\r\n"), EndOfData(None), Command("NOOP", b"")],
        )

    def test_empty_message(self) -> None:
        self.assertEqual(self.data(b".\r\n"), [EndOfData(None)])

    def test_back_to_commands_at_the_end(self) -> None:
        c = ServerCodec()
        c.expect_data(100)
        c.receive_data(b"a\r\n.\r\n")
        self.assertEqual(c.next_event(), MessageText(b"a\r\n"))
        self.assertEqual(c.next_event(), EndOfData(None))
        self.assertIs(c.mode, Mode.COMMAND)

    def test_bare_lf_does_not_end_data(self) -> None:
        self.assertEqual(
            self.data(b"a\n.\nb\r\n.\r\n"), [DataRefused(), EndOfData(codec.BARE_IN_TEXT)]
        )

    def test_data_line_bounds(self) -> None:
        x998, stuffed = b"x" * MAX_DATA_LINE, b"." + b"." * MAX_DATA_LINE
        self.assertEqual(self.data(x998 + b"\r\n.\r\n"), [MessageText(x998 + b"\r\n"), EndOfData(None)])
        self.assertEqual(
            self.data(stuffed + b"\r\n.\r\n", max_size=5000),
            [MessageText(stuffed[1:] + b"\r\n"), EndOfData(None)],
        )
        self.assertEqual(
            self.data(x998 + b"x\r\n.\r\n"), [DataRefused(), EndOfData(codec.LINE_TOO_LONG)]
        )

    def test_size_limit(self) -> None:
        self.assertEqual(
            self.data(b"x" * 98 + b"\r\n.\r\n", max_size=100),
            [MessageText(b"x" * 98 + b"\r\n"), EndOfData(None)],
        )
        self.assertEqual(
            self.data(b"x" * 99 + b"\r\n.\r\n", max_size=100), [DataRefused(), EndOfData(codec.TOO_BIG)]
        )

    def test_first_error_is_the_reply(self) -> None:
        wire = (b"y" * 98 + b"\r\n") * 12 + b"a\nb\r\n" + b"x" * 1500 + b"\r\n" + b".\r\n"
        for cuts in ([], [len(wire) - 500], range(len(wire))):
            events = converse(split(b"DATA\r\n" + wire, cuts), max_size=1000)
            self.assertEqual(events[-2:], [DataRefused(), EndOfData(codec.TOO_BIG)])
            self.assertEqual(events.count(DataRefused()), 1)


class ReplyTests(SynchronousTestCase):
    def test_reply(self) -> None:
        self.assertEqual(codec.reply(250, "2.1.0", "Sender OK"), b"250 2.1.0 Sender OK\r\n")

    def test_reply_lines(self) -> None:
        self.assertEqual(codec.reply_lines(250, [b"mx Hello", b"PIPELINING", b"SIZE 10"]),
                         b"250-mx Hello\r\n250-PIPELINING\r\n250 SIZE 10\r\n")
        self.assertEqual(codec.reply_lines(334, [b""]), b"334 \r\n")


# -- the argument parsers -------------------------------------------------------


def _twisted_address(path: bytes, default_domain: bytes) -> str:
    """The mailbox as the server read it when it was Twisted's ESMTP: smtp.Address, then RFC 5321."""
    if not codec._PRINTABLE_PATH.fullmatch(path):
        raise codec.AddressError()
    try:
        address = smtp.Address(path, default_domain)
    except smtp.AddressError:
        raise codec.AddressError() from None
    if not codec._LOCAL_PART.fullmatch(address.local) or not codec._DOMAIN.fullmatch(address.domain):
        raise codec.AddressError()
    return str(address)


_PATH = st.lists(
    st.sampled_from([b"<", b">", b"@", b":", b",", b".", b'"', b"\\", b"a", b"B", b"0", b"-", b"_", b" ",
                     b"+", b"!", b"\x00", b"\x7f", b"\xe9", b"(", b'"q s"', b"\\@"]),
    max_size=14,
).map(b"".join)


class AddressTests(SynchronousTestCase):
    """The path reader is Twisted's C{smtp.Address}, ported: the same mailbox or refusal."""

    @settings(max_examples=2000, deadline=None)
    @given(path=_PATH, default=st.sampled_from([b"", b"mx.test"]))
    @example(path=b"<@relay.example,@b.example:user@c.example>", default=b"mx.test")
    @example(path=b'<"a b"@c>', default=b"")
    def test_same_as_twisted(self, path: bytes, default: bytes) -> None:
        try:
            expected: object = _twisted_address(path, default)
        except codec.AddressError:
            expected = codec.AddressError
        try:
            got: object = codec.address(path, default)
        except codec.AddressError:
            got = codec.AddressError
        self.assertEqual(got, expected)

    def test_expressions_are_twisteds(self) -> None:
        """The MAIL and RCPT expressions are Twisted's (the syntax the server always had)."""
        for ours, twisted in ((codec._MAIL, smtp.SMTP.mail_re), (codec._RCPT, smtp.SMTP.rcpt_re)):
            self.assertEqual(re.sub(rb"\s+", b"", ours.pattern), re.sub(rb"\s+", b"", twisted.pattern))
            self.assertEqual(ours.flags, twisted.flags)

    @settings(max_examples=500, deadline=None)
    @given(argument=st.lists(st.sampled_from([b"FROM:", b"TO:", b"from:", b"<", b">", b"<>", b"a@b", b" ",
                                              b"\t", b'"x y"', b"SIZE=1", b"\\", b"=", b"@", b","]),
                             max_size=10).map(b"".join))
    def test_same_matches_as_twisted(self, argument: bytes) -> None:
        for ours, twisted in ((codec._MAIL, smtp.SMTP.mail_re), (codec._RCPT, smtp.SMTP.rcpt_re)):
            m, t = ours.match(argument), twisted.match(argument)
            self.assertEqual(m and m.groupdict(), t and t.groupdict())

    def test_default_domain(self) -> None:
        self.assertEqual(codec.address(b"<postmaster>", b"mx.test"), "postmaster@mx.test")
        self.assertRaises(codec.AddressError, codec.address, b"<postmaster>", b"")


class ArgumentTests(SynchronousTestCase):
    def test_parse_mail(self) -> None:
        mail = codec.parse_mail(b"FROM:<a@b.example> size=10 BODY=8bitmime AUTH=c+2Bd@e.example", b"mx", 100)
        self.assertEqual(mail.sender, "a@b.example")
        self.assertEqual(mail.parameters, {"SIZE": "10", "BODY": "8bitmime", "AUTH": "c+d@e.example"})
        self.assertEqual(codec.parse_mail(b"FROM:<>", b"mx", 100).sender, "")

    def test_parse_mail_refusals(self) -> None:
        for argument, code in [
            (b"TO:<a@b>", (501, "5.5.4")),
            (b"FROM:<a@b> SIZE=101", (552, "5.3.4")),
            (b"FROM:<a@b> SIZE=" + b"9" * 5000, (552, "5.3.4")),
            (b"FROM:<a@b> SIZE=x", (501, "5.5.4")),
            (b"FROM:<a@b> SIZE=1 SIZE=1", (503, "5.5.4")),
            (b"FROM:<a@b> X-Y=1", (555, "5.5.4")),
            (b"FROM:<a@b> =1", (501, "5.5.4")),
            (b"FROM:<a@b> AUTH=a+2b@b", (501, "5.5.4")),
            (b'FROM:<"a\x01"@b>', (553, "5.1.7")),
        ]:
            with self.subTest(argument=argument):
                e = self.assertRaises(CommandError, codec.parse_mail, argument, b"mx", 100)
                self.assertEqual((e.code, e.enhanced), code)

    def test_parse_rcpt(self) -> None:
        self.assertEqual(codec.parse_rcpt(b"TO:<a@b.example>", b"mx"), "a@b.example")
        for argument, code in [
            (b"FROM:<a@b>", (501, "5.5.4")),
            (b"TO:<a@b> NOTIFY=NEVER", (555, "5.5.4")),
            (b"TO:<a@b\x7f>", (501, "5.5.4")),
            (b'TO:<"a\x00"@b>', (553, "5.1.3")),
        ]:
            with self.subTest(argument=argument):
                e = self.assertRaises(CommandError, codec.parse_rcpt, argument, b"mx")
                self.assertEqual((e.code, e.enhanced), code)

    def test_helo_name(self) -> None:
        for argument, name in [
            (b"client.example", "client.example"),
            (b"client.example. extra words", "client.example."),
            (b"[192.0.2.1]", "[192.0.2.1]"),
            (b"[IPv6:2001:db8::1]", "[IPv6:2001:db8::1]"),
            (b"", None),
            (b"a" * 256, None),
            (b"[2001:db8::1]", None),
            (b"[IPv6:192.0.2.1]", None),
            (b"[IPv6:fe80::1%eth0]", None),
            (b"[x(y);z]", None),
            (b"cli\xe9nt", None),
        ]:
            with self.subTest(argument=argument):
                self.assertEqual(codec.helo_name(argument), name)

    def test_xtext(self) -> None:
        self.assertEqual(codec.xtext(b"a+2Bb+3D"), b"a+b=")
        for bad in (b"a+2b", b"a=b", b"a b", b"a+"):
            self.assertRaises(ValueError, codec.xtext, bad)

    def test_auth_mailbox(self) -> None:
        self.assertEqual(codec.auth_mailbox(b"<>"), "<>")
        self.assertEqual(codec.auth_mailbox(b"a+2Bb@c.example"), "a+b@c.example")
        for bad in (b"<a@b>", b"a", b"a+0A@b"):
            self.assertRaises(ValueError, codec.auth_mailbox, bad)
