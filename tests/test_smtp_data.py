"""
Tests for L{gateway.smtp.server}'s DATA: the stored message and its
C{Received:} header, the size and line limits, bare CR and LF, spool
failures, and the same message however the text is split.
"""

from __future__ import annotations

from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet import defer

from gateway.smtp import spool as spool_module
from gateway.smtp.spool import Spool
from tests.smtp_support import TLS_CIPHER, TLS_VERSION, ServerTestCase, finals, plain


class DataTests(ServerTestCase):
    def test_message_stored(self) -> None:
        client = self.authenticated()
        self.assertReplies(
            client.send(b"MAIL FROM:<daniel@example.com>\r\nRCPT TO:<a@example.net>\r\n"
                        b"RCPT TO:<b@example.org>\r\nDATA\r\n"),
            [b"250 2.1.0", b"250 2.1.5", b"250 2.1.5", b"354 2.0.0"],
        )
        (line,) = client.send(b"Subject: hi\r\n\r\n..leading dot\r\n..\r\nend\r\n.\r\n")
        self.assertTrue(line.startswith(b"250 2.0.0 "), line)
        (id,) = self.spool.ids()
        self.assertIn(id.encode(), line)
        message, meta = self.spool.load(id)
        header, _, body = message.partition(b"Subject: hi\r\n")
        self.assertTrue(header.startswith(b"Received: from client.example ([192.0.2.7])"), header)
        self.assertIn(f"by mx.test (authgateway) with ESMTPSA id {id}".encode(), header)
        self.assertIn(TLS_VERSION.encode(), header)
        self.assertEqual(body, b"\r\n.leading dot\r\n.\r\nend\r\n")
        self.assertEqual(meta["id"], id)
        self.assertEqual(meta["authz_id"], "daniel")
        self.assertEqual(meta["authn_id"], "daniel")
        self.assertEqual(meta["mail_from"], "daniel@example.com")
        self.assertEqual(meta["rcpt_to"], ["a@example.net", "b@example.org"])
        self.assertEqual(meta["helo"], "client.example")
        self.assertEqual(meta["peer"], {"address": "192.0.2.7", "port": 40000})
        self.assertEqual(meta["local"], {"address": "198.51.100.1", "port": 465})
        self.assertEqual(meta["protocol"], "ESMTPSA")
        self.assertEqual(meta["tls"], {"version": TLS_VERSION, "cipher": TLS_CIPHER})
        self.assertIsNone(meta["mail_auth"])
        self.assertEqual(
            meta["auth_info"]["identities"],
            [
                {"identity": "daniel", "context": "SmtpAuthPlainAuthorization"},
                {"identity": "daniel", "context": "SmtpAuthPlainAuthentication"},
            ],
        )
        self.assertReplies(client.send(b"NOOP\r\n"), [b"250 2.0.0"])

    def test_two_messages_one_session(self) -> None:
        client = self.authenticated()
        for _ in range(2):
            self.start_data(client)
            self.assertReplies(client.send(b"hi\r\n.\r\n"), [b"250 2.0.0"])
        self.assertEqual(len(self.spool.ids()), 2)

    def test_pipelined_data(self) -> None:
        client = self.tls_session()
        lines = client.send(
            b"AUTH PLAIN " + plain() + b"\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n"
            b"DATA\r\nhello\r\n.\r\nQUIT\r\n"
        )
        self.assertReplies(
            lines, [b"235 2.7.0", b"250 2.1.0", b"250 2.1.5", b"354 2.0.0", b"250 2.0.0", b"221"]
        )
        self.assertEqual(len(self.spool.ids()), 1)

    def test_no_header_injection_through_rcpt(self) -> None:
        """A recipient with a bare LF is refused: it never reaches the headers or the JSON."""
        client = self.authenticated()
        self.assertReplies(
            client.send(b'MAIL FROM:<daniel@example.com>\r\nRCPT TO:<"x\nX-Injected: 1"@example.net>\r\n'
                        b"RCPT TO:<ok@example.net>\r\nDATA\r\n"),
            [b"250 2.1.0", b"501 5.5.2", b"250 2.1.5", b"354 2.0.0"],
        )
        client.send(b"hi\r\n.\r\n")
        ((message, meta),) = self.stored()
        self.assertNotIn(b"X-Injected", message)
        self.assertEqual(meta["rcpt_to"], ["ok@example.net"])

    def test_received_esmtpa(self) -> None:
        """Authenticated in cleartext (insecure_auth): C{with ESMTPA}, no TLS in the metadata."""
        client = self.connect(insecure_auth=True)
        self.ehlo(client)
        client.send(b"AUTH PLAIN " + plain() + b"\r\n")
        self.start_data(client)
        client.send(b"hi\r\n.\r\n")
        ((message, meta),) = self.stored()
        self.assertIn(b" with ESMTPA id ", message)
        self.assertEqual(meta["protocol"], "ESMTPA")
        self.assertIsNone(meta["tls"])

    def test_received_esmtps(self) -> None:
        """TLS without authentication (a trusted peer): C{with ESMTPS}."""
        client = self.trusted_session("implicit")
        self.start_data(client)
        client.send(b"hi\r\n.\r\n")
        ((message, meta),) = self.stored()
        self.assertIn(b" with ESMTPS id ", message)
        self.assertEqual(meta["protocol"], "ESMTPS")

    def test_received_esmtpsa_after_starttls(self) -> None:
        client = self.connect()
        self.ehlo(client)
        client.send(b"STARTTLS\r\n")
        client.send(b"EHLO after.example\r\n")
        client.send(b"AUTH PLAIN " + plain() + b"\r\n")
        self.start_data(client)
        self.assertReplies(client.send(b"hi\r\n.\r\n"), [b"250 2.0.0"])
        ((message, meta),) = self.stored()
        self.assertIn(b" with ESMTPSA id ", message)
        self.assertEqual(meta["helo"], "after.example")
        self.assertEqual(meta["tls"], {"version": TLS_VERSION, "cipher": TLS_CIPHER})

    def test_message_too_big(self) -> None:
        client = self.authenticated(max_size=1000)
        self.start_data(client)
        self.assertReplies(
            client.send(b"x" * 98 + b"\r\n") + client.send((b"y" * 98 + b"\r\n") * 20),
            [],
        )
        self.assertReplies(client.send(b".\r\n"), [b"552 5.3.4"])
        self.assertNothingStored()
        self.assertReplies(client.send(b"NOOP\r\n"), [b"250 2.0.0"])

    def test_message_of_exactly_max_size(self) -> None:
        """RFC 1870: the message the client sends is measured, not our Received header."""
        client = self.authenticated(max_size=1000)
        self.start_data(client)
        self.assertReplies(client.send((b"z" * 98 + b"\r\n") * 10 + b".\r\n"), [b"250 2.0.0"])

    def test_data_line_too_long(self) -> None:
        client = self.authenticated()
        self.start_data(client)
        self.assertReplies(
            client.send(b"ok\r\n" + b"x" * 999 + b"\r\nmore\r\n.\r\n"), [b"500 5.5.6"]
        )
        self.assertNothingStored()
        self.assertReplies(client.send(b"NOOP\r\n"), [b"250 2.0.0"])

    def test_data_line_too_long_streamed(self) -> None:
        client = self.authenticated()
        self.start_data(client)
        replies = client.send(b"x" * 2000) + client.send(b"x" * 2000 + b"\r\n.\r\n")
        self.assertReplies(replies, [b"500 5.5.6"])
        self.assertNothingStored()

    def test_data_line_998_octets(self) -> None:
        client = self.authenticated()
        self.start_data(client)
        self.assertReplies(client.send(b"x" * 998 + b"\r\n.\r\n"), [b"250 2.0.0"])

    def test_data_line_998_octets_split_before_lf(self) -> None:
        """A line of 998 octets whose CR and LF arrive in different segments is fine."""
        client = self.authenticated()
        self.start_data(client)
        self.assertEqual(client.send(b"x" * 998 + b"\r"), [])
        self.assertReplies(client.send(b"\n.\r\n"), [b"250 2.0.0"])
        ((message, _),) = self.stored()
        self.assertTrue(message.endswith(b"\r\n" + b"x" * 998 + b"\r\n"))

    def test_data_line_998_octets_dot_stuffed(self) -> None:
        """The duplicated leading dot is not counted in the 1000 octets (RFC 5321 4.5.3.1.6)."""
        client = self.authenticated()
        self.start_data(client)
        self.assertReplies(client.send(b".." + b"x" * 997 + b"\r\n.\r\n"), [b"250 2.0.0"])
        ((message, _),) = self.stored()
        self.assertTrue(message.endswith(b"\r\n." + b"x" * 997 + b"\r\n"))

    def test_bare_lf_does_not_end_data(self) -> None:
        """
        C{\\n.\\n} (and C{\\r\\n.\\n}) inside DATA neither ends the text nor
        is stored for a next hop to misread: the message is refused with
        C{554 5.6.11} at the real end of data, and nothing smuggled runs.
        """
        client = self.authenticated()
        self.start_data(client)
        smuggled = (
            b"one\n.\nMAIL FROM:<evil@x.example>\nRCPT TO:<v@y.example>\nDATA\nevil\r\n"
            b".\nMAIL FROM:<evil@x.example>\r\n"
        )
        self.assertEqual(client.send(smuggled), [])
        self.assertReplies(client.send(b".\r\n"), [b"554 5.6.11"])
        self.assertNothingStored()
        self.assertReplies(client.send(b"RCPT TO:<a@example.net>\r\n"), [b"503 5.5.1"])

    def test_bare_cr_or_lf_refused(self) -> None:
        """A bare CR or LF anywhere in a line, in a block or line by line: 554 5.6.11."""
        for text in (b"Subject: x\rBcc: evil@x\r\n\r\nhi\r\n", b"a\r\nb\nc\r\n", b"\n\r\n",
                     b"a\r\r\n", b"x" * 997 + b"\n\r\n", b"." + b"y" * 998 + b"\r\n\r\r\n"):
            for pieces in ([text + b".\r\n"], [bytes((c,)) for c in text + b".\r\n"]):
                client = self.authenticated()
                self.start_data(client)
                replies = [line for piece in pieces for line in client.send(piece)]
                self.assertReplies(replies, [b"554 5.6.11"])
                self.assertNothingStored()
                self.assertReplies(client.send(b"NOOP\r\n"), [b"250 2.0.0"])

    def test_folded_start_and_nul_refused(self) -> None:
        """
        Text starting with a blank would continue our Received header: 554
        5.6.0, as is a NUL anywhere; the first error of the text is the reply.
        """
        for text, reply in ((b"\t(Authenticated sender: ceo@bank.example)\r\nSubject: x\r\n", b"554 5.6.0"),
                            (b" x\r\n", b"554 5.6.0"),
                            (b"Subject: x\r\n\r\n\x00.\r\n", b"554 5.6.0"),
                            (b"a\nb\r\n\x00\r\n", b"554 5.6.11"),
                            (b"Subject: x\r\n\r\n \tfine later\r\n", b"250 2.0.0")):
            for pieces in ([text + b".\r\n"], [bytes((c,)) for c in text + b".\r\n"]):
                client = self.authenticated()
                self.start_data(client)
                replies = [line for piece in pieces for line in client.send(piece)]
                self.assertReplies(replies, [reply])

    def test_spool_commit_fails(self) -> None:
        """The fsync fails: 451 4.3.0 and no file left, complete or partial."""

        def broken(directory: str) -> None:
            raise OSError(5, "Input/output error")

        self.patch(spool_module, "fsync_directory", broken)
        client = self.authenticated()
        self.start_data(client)
        self.assertReplies(client.send(b"hi\r\n.\r\n"), [b"451 4.3.0"])
        self.assertNothingStored()
        self.assertReplies(client.send(b"NOOP\r\n"), [b"250 2.0.0"])

    def test_spool_runner_raises(self) -> None:
        """
        The runner itself raises: 451 4.3.0, nothing visible, and the session
        and the spool go on (the next message is stored).
        """
        calls = []

        def runner(f: Any, *args: Any) -> defer.Deferred[Any]:
            calls.append(f)
            if len(calls) == 1:
                raise RuntimeError("thread pool is gone")
            return defer.maybeDeferred(f, *args)

        self.spool = Spool(self.directory, threadpool_runner=runner)
        client = self.authenticated()
        self.start_data(client)
        self.assertReplies(client.send(b"hi\r\n.\r\nNOOP\r\n"), [b"451 4.3.0", b"250 2.0.0"])
        self.assertEqual(self.spool.ids(), [])
        self.flushLoggedErrors(RuntimeError)
        self.start_data(client)
        self.assertReplies(client.send(b"again\r\n.\r\n"), [b"250 2.0.0"])
        self.assertEqual(len(self.spool.ids()), 1)

    def test_spool_runner_fails(self) -> None:
        """The runner fails without running the commit: 451 4.3.0 and no file left behind."""

        def runner(f: Any, *args: Any) -> defer.Deferred[Any]:
            return defer.fail(RuntimeError("thread pool is gone"))

        self.spool = Spool(self.directory, threadpool_runner=runner)
        client = self.authenticated()
        self.start_data(client)
        self.assertReplies(client.send(b"hi\r\n.\r\nNOOP\r\n"), [b"451 4.3.0", b"250 2.0.0"])
        self.assertNothingStored()

    def test_spool_cannot_open(self) -> None:
        def refuse(path: str) -> int:
            raise OSError(28, "No space left on device")

        self.patch(spool_module, "_create", refuse)
        client = self.authenticated()
        self.assertReplies(
            client.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"),
            [b"250 2.1.0", b"250 2.1.5", b"451 4.3.0"],
        )
        self.assertReplies(client.send(b"NOOP\r\n"), [b"250 2.0.0"])

    def test_disconnect_during_data(self) -> None:
        client = self.authenticated()
        self.start_data(client)
        client.send(b"partial message\r\n")
        client.proto.connectionLost(Exception("gone"))
        self.assertNothingStored()

    def test_spool_commit_pending_keeps_order(self) -> None:
        """While the spool commits, pipelined commands wait for the 250."""
        jobs: list[tuple[Any, tuple[Any, ...], defer.Deferred[Any]]] = []

        def runner(f: Any, *args: Any) -> defer.Deferred[Any]:
            d: defer.Deferred[Any] = defer.Deferred()
            jobs.append((f, args, d))
            return d

        self.spool = Spool(self.directory, threadpool_runner=runner)
        client = self.authenticated()
        self.start_data(client)
        self.assertEqual(client.send(b"hi\r\n.\r\nNOOP\r\n"), [])
        ((f, args, d),) = jobs
        d.callback(f(*args))
        self.assertReplies(client.read(), [b"250 2.0.0 Ok", b"250 2.0.0"])


_TEXT_LINE = st.lists(st.sampled_from([b".", b"x", b"\n", b"\r", b" ", b"\xc3\xa9"]), max_size=12).map(
    b"".join
).filter(lambda line: b"\r\n" not in line and not line.endswith(b"\r"))


def _without_received(message: bytes) -> bytes:
    """The message as the client sent it: our C{Received:} header (and its id) left out."""
    lines = message.split(b"\r\n")
    rest = 1
    while lines[rest].startswith(b"\t"):
        rest += 1
    return b"\r\n".join(lines[rest:])


def _pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


class DataBlockTests(ServerTestCase):
    """
    Message text is taken a block at a time when it can be: the stored
    message is the same however the text arrives (one segment, byte by
    byte, any split), dot-unstuffed line by line.
    """

    def deliver(self, wire: bytes, cuts: list[int]) -> tuple[list[bytes], bytes | None]:
        before = set(self.spool.ids())
        client = self.authenticated()
        self.start_data(client)
        replies: list[bytes] = []
        for piece in _pieces(wire, cuts):
            replies += client.send(piece)
        new = [id for id in self.spool.ids() if id not in before]
        return finals(replies), (self.spool.load(new[0])[0] if new else None)

    @settings(max_examples=150, deadline=None)
    @given(lines=st.lists(_TEXT_LINE, max_size=20), cuts=st.lists(st.integers(0, 400), max_size=8))
    def test_any_split_same_message(self, lines, cuts):
        """Stored the same way however split; refused alike when a line has a bare CR or LF."""
        wire = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
        wire += b".\r\n"
        replies, message = self.deliver(wire, cuts)
        folded = bool(lines) and lines[0][:1] in (b" ", b"\t")
        bare = folded or any(b"\r" in line or b"\n" in line for line in lines)
        expected = b"554 5.6.0 " if folded else b"554 5.6.11" if bare else b"250 2.0.0 "
        self.assertEqual([r[:10] for r in replies], [expected])
        body = b"".join(line + b"\r\n" for line in lines)
        one_by_one_replies, one_by_one = self.deliver(wire, list(range(len(wire))))
        self.assertEqual([r[:10] for r in one_by_one_replies], [r[:10] for r in replies])
        if bare:
            self.assertIsNone(message)
            self.assertIsNone(one_by_one)
            return
        for stored in (message, one_by_one):
            self.assertTrue(stored.endswith(body), (stored, body))
            header = stored[: len(stored) - len(body)].split(b"\r\n")  # nothing but the header
            self.assertEqual(header[-1], b"")
            self.assertTrue(header[0].startswith(b"Received: "))
            self.assertTrue(all(line.startswith(b"\t") for line in header[1:-1]), header)

    @settings(max_examples=100, deadline=None)
    @given(
        lines=st.lists(
            st.lists(st.sampled_from([b".", b"x", b"\n", b"\r", b"y" * 400]), max_size=4)
            .map(b"".join)
            .filter(lambda line: b"\r\n" not in line and not line.endswith(b"\r")),
            max_size=10,
        ),
        cuts=st.lists(st.integers(0, 5000), max_size=8),
        max_size=st.integers(100, 4000),
    )
    @example(lines=[b"y" * 400] * 3 + [b"x\nx"], cuts=[], max_size=1000)
    def test_any_split_same_outcome(self, lines, cuts, max_size):
        """Lines too long, bare CR/LF, the size limit, in any order: the split changes nothing."""
        wire = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
        wire += b".\r\n"
        outcomes = []
        for pieces in (_pieces(wire, cuts), [wire], _pieces(wire, list(range(0, len(wire), 3)))):
            client = self.authenticated(max_size=max_size)
            self.start_data(client)
            before = set(self.spool.ids())
            replies = [line for piece in pieces for line in client.send(piece)]
            stored = [self.spool.load(id)[0] for id in self.spool.ids() if id not in before]
            outcomes.append(
                ([r[:10] for r in finals(replies)], [_without_received(m) for m in stored])
            )
        self.assertEqual(outcomes[0], outcomes[1])
        self.assertEqual(outcomes[0], outcomes[2])

    def test_long_line_in_a_block(self):
        """A block with a line too long goes line by line: 500 5.5.6, nothing stored."""
        replies, message = self.deliver(b"a\r\n" * 50 + b"x" * 1000 + b"\r\n" + b"b\r\n" * 50
                                        + b".\r\n", [])
        self.assertEqual([r[:9] for r in replies], [b"500 5.5.6"])
        self.assertIsNone(message)

    def test_size_limit_in_a_block(self):
        client = self.authenticated(max_size=1000)
        self.start_data(client)
        self.assertReplies(client.send(b"z" * 98 + b"\r\n" * 1 + (b"y" * 98 + b"\r\n") * 20 + b".\r\n"),
                           [b"552 5.3.4"])
        self.assertNothingStored()

    def test_first_error_is_the_reply_however_split(self):
        """Over the size, then a bare LF and a line too long: 552 5.3.4, in one read or streamed."""
        wire = (b"y" * 98 + b"\r\n") * 12 + b"a\nb\r\n" + b"x" * 1500 + b"\r\n" + b".\r\n"
        for cuts in ([], [len(wire) - 500], list(range(len(wire)))):
            client = self.authenticated(max_size=1000)
            self.start_data(client)
            replies = [line for piece in _pieces(wire, cuts) for line in client.send(piece)]
            self.assertReplies(replies, [b"552 5.3.4"])
        self.assertNothingStored()

    def test_end_marker_lookalikes(self):
        """C{..} is a stuffed dot, C{\\r\\n.x} a stuffed line; only C{\\r\\n.\\r\\n} ends the text."""
        replies, message = self.deliver(b"a\r\n..\r\n.x\r\n...\r\n.\r\nNOOP\r\n", [])
        self.assertEqual([r[:9] for r in replies], [b"250 2.0.0", b"250 2.0.0"])
        self.assertTrue(message.endswith(b"\r\na\r\n.\r\nx\r\n..\r\n"), message)
