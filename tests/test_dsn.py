"""
Tests for L{gateway.smtp.dsn}: the RFC 3464 bounce, read back with the
standard library's L{email} parser as a mail client would.
"""

from __future__ import annotations

import email
import email.policy
import os
import re
from datetime import datetime, timezone
from email.message import Message

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from gateway.smtp.dsn import HEADERS_LIMIT, SUBJECT, bounce, read_headers
from tests.support import store_path, write_file

NOW = datetime(2026, 11, 26, 12, 0, 0, tzinfo=timezone.utc)

META = {
    "id": "20261126T100000Z-0123456789abcdef",
    "received_at": "2026-11-26T10:00:00Z",
    "protocol": "ESMTPSA",
    "mail_from": "sender@example.com",
    "rcpt_to": ["a@example.net", "b@example.org", "c@example.org"],
}

HEADERS = (
    b"Received: from client.example ([192.0.2.7])\r\n"
    b"\tby gateway.example (authgateway) with ESMTPSA id 20261126T100000Z-0123456789abcdef;\r\n"
    b"\tThu, 26 Nov 2026 10:00:00 +0000\r\n"
    b"From: Sender <sender@example.com>\r\n"
    b"To: b@example.org\r\n"
    b"Subject: hello\r\n"
)
MESSAGE = HEADERS + b"\r\nThe body, never returned.\r\n"

FAILURES = [
    ("b@example.org", "550 5.1.1 no such user", "smtp://relay.example:25"),
    ("c@example.org", "554 rejected without an enhanced code", "smtp://[2001:db8::1]:25"),
]


def parse(data: bytes) -> Message:
    return email.message_from_bytes(data, policy=email.policy.compat32)


def check_wire_form(test: SynchronousTestCase, data: bytes) -> None:
    """CRLF only, 7-bit, no line longer than 998 octets (RFC 5322 section 2.1.1)."""
    test.assertTrue(data.isascii())
    test.assertNotIn(b"\x00", data)
    test.assertTrue(data.endswith(b"\r\n"))
    lines = data.split(b"\r\n")
    for line in lines:
        test.assertNotIn(b"\r", line)
        test.assertNotIn(b"\n", line)
        test.assertLessEqual(len(line), 998)


def groups(report: Message) -> list[Message]:
    """The field groups of the message/delivery-status part: per message, then per recipient."""
    status = report.get_payload()[1]
    return status.get_payload()


def unfold(value: str) -> str:
    """RFC 5322 section 2.2.3: remove each CRLF followed by white space."""
    return re.sub(r"\r?\n(?=[ \t])", "", value)


class BounceTests(SynchronousTestCase):
    def bounce(self, failures=FAILURES, meta=META, headers=HEADERS):
        envelope, data = bounce(meta, headers, failures, "gateway.example", NOW)
        check_wire_form(self, data)
        return envelope, data, parse(data)

    def test_envelope(self) -> None:
        """From the null sender to the message's sender, marked as a DSN, with no identity."""
        envelope, _, _ = self.bounce()
        self.assertEqual(envelope.mail_from, "")
        self.assertEqual(envelope.rcpt_to, ("sender@example.com",))
        self.assertEqual(envelope.protocol, "DSN")
        self.assertIsNone(envelope.auth_info)
        self.assertIsNone(envelope.helo)
        self.assertIsNone(envelope.peer_address)
        self.assertIsNone(envelope.tls)
        self.assertIsNone(envelope.mail_auth)

    def test_top_level_headers(self) -> None:
        _, _, report = self.bounce()
        self.assertEqual(report["From"], "Mail Delivery System <MAILER-DAEMON@gateway.example>")
        self.assertEqual(report["To"], "<sender@example.com>")
        self.assertEqual(report["Subject"], SUBJECT)
        self.assertEqual(report["Auto-Submitted"], "auto-replied")
        self.assertEqual(report["MIME-Version"], "1.0")
        self.assertEqual(report["Date"], "Thu, 26 Nov 2026 12:00:00 +0000")
        self.assertRegex(report["Message-ID"], r"\A<[0-9a-f]{32}@gateway\.example>\Z")
        self.assertEqual(report.get_content_type(), "multipart/report")
        self.assertEqual(report.get_param("report-type"), "delivery-status")
        self.assertEqual(len(report.defects), 0)

    def test_message_ids_differ(self) -> None:
        _, _, one = self.bounce()
        _, _, two = self.bounce()
        self.assertNotEqual(one["Message-ID"], two["Message-ID"])
        self.assertNotEqual(one.get_boundary(), two.get_boundary())

    def test_parts(self) -> None:
        """Explanation, delivery-status, original headers: in that order (RFC 6522 section 3)."""
        _, _, report = self.bounce()
        parts = report.get_payload()
        self.assertEqual(
            [part.get_content_type() for part in parts],
            ["text/plain", "message/delivery-status", "text/rfc822-headers"],
        )
        for part in parts:
            self.assertEqual(part.defects, [])
        text = parts[0].get_payload(decode=True).decode("ascii")
        self.assertIn("b@example.org", text)
        self.assertIn("550 5.1.1 no such user", text)
        self.assertIn("gateway.example", text)

    def test_per_message_fields(self) -> None:
        _, _, report = self.bounce()
        per_message = groups(report)[0]
        self.assertEqual(per_message["Reporting-MTA"], "dns; gateway.example")
        self.assertEqual(per_message["Arrival-Date"], "Thu, 26 Nov 2026 10:00:00 +0000")

    def test_per_recipient_fields(self) -> None:
        """One group per failed recipient, with the status from the reply's enhanced code."""
        _, _, report = self.bounce()
        first, second = groups(report)[1:]
        self.assertEqual(first["Final-Recipient"], "rfc822; b@example.org")
        self.assertEqual(first["Action"], "failed")
        self.assertEqual(first["Status"], "5.1.1")
        self.assertEqual(first["Remote-MTA"], "dns; relay.example")
        self.assertEqual(first["Diagnostic-Code"], "smtp; 550 5.1.1 no such user")
        self.assertEqual(second["Final-Recipient"], "rfc822; c@example.org")
        self.assertEqual(second["Status"], "5.0.0")
        self.assertEqual(second["Remote-MTA"], "dns; [IPv6:2001:db8::1]")
        self.assertEqual(second["Diagnostic-Code"], "smtp; 554 rejected without an enhanced code")

    def test_status_codes(self) -> None:
        """The enhanced code is taken only when it is one, of the reply's class."""
        cases = {
            "550 5.7.1 relay denied": "5.7.1",
            "552-5.3.4 too big": "5.3.4",
            "550 5.123.456 long": "5.123.456",
            "550 4.1.1 wrong class": "5.0.0",
            "550 5.1.1.1 not a code": "5.0.0",
            "550 5.1": "5.0.0",
            "550": "5.0.0",
        }
        failures = [(f"r{i}@example.org", reply, None) for i, reply in enumerate(cases)]
        _, _, report = self.bounce(failures)
        self.assertEqual([g["Status"] for g in groups(report)[1:]], list(cases.values()))

    def test_expired(self) -> None:
        """
        A recipient the queue gave up on (its last reply a 4xx, or none) failed
        with 4.4.7, delivery time expired; a last reply is kept as the diagnostic.
        """
        failures = [
            ("a@example.net", "451 4.2.0 mailbox busy", "smtp://relay.example:25"),
            ("b@example.org", "delivery time expired", None),
        ]
        _, _, report = self.bounce(failures)
        first, second = groups(report)[1:]
        for group in first, second:
            self.assertEqual(group["Action"], "failed")
            self.assertEqual(group["Status"], "4.4.7")
        self.assertEqual(first["Diagnostic-Code"], "smtp; 451 4.2.0 mailbox busy")
        self.assertIsNone(second["Diagnostic-Code"])
        self.assertIsNone(second["Remote-MTA"])
        text = report.get_payload()[0].get_payload()
        self.assertIn("delivery time expired", text)

    def test_remote_mta(self) -> None:
        failures = [
            ("a@example.net", "550 5.1.1 x", "smtps://192.0.2.1:465"),
            ("b@example.net", "550 5.1.1 x", "lmtp:///run/dovecot/lmtp"),
            ("c@example.net", "550 5.1.1 x", "lmtp://Mail.Example:24"),
        ]
        _, _, report = self.bounce(failures)
        self.assertEqual(
            [g["Remote-MTA"] for g in groups(report)[1:]],
            ["dns; [192.0.2.1]", None, "dns; mail.example"],
        )

    def test_original_headers(self) -> None:
        """The header block goes back as it was, Received header included; never the body."""
        _, data, report = self.bounce(headers=MESSAGE)
        part = report.get_payload()[2]
        self.assertEqual(part["Content-Transfer-Encoding"], "7bit")
        returned = part.get_payload(decode=True)
        self.assertEqual(returned.replace(b"\r\n", b"\n"), HEADERS.replace(b"\r\n", b"\n"))
        original = parse(returned)
        self.assertIn("with ESMTPSA", original["Received"])
        self.assertEqual(original["Subject"], "hello")
        self.assertNotIn(b"never returned", data)

    def test_eight_bit_headers(self) -> None:
        """8-bit headers (8BITMIME, RFC 6532) are encoded: the report stays 7-bit."""
        headers = HEADERS + "Subject: caf\u00e9 \u2603\r\n".encode() + b"X-Raw: \xff\x00\r\n"
        _, _, report = self.bounce(headers=headers)
        part = report.get_payload()[2]
        self.assertEqual(part["Content-Transfer-Encoding"], "quoted-printable")
        self.assertEqual(part.get_param("charset"), "unknown-8bit")
        self.assertEqual(part.get_payload(decode=True), headers)

    def test_utf8_headers(self) -> None:
        headers = HEADERS + "Subject: caf\u00e9\r\n".encode()
        _, _, report = self.bounce(headers=headers)
        part = report.get_payload()[2]
        self.assertEqual(part.get_param("charset"), "utf-8")
        self.assertEqual(part.get_payload(decode=True), headers)

    def test_long_header_lines(self) -> None:
        """A header line over 998 octets is quoted-printable, with soft line breaks."""
        headers = b"X-Long: " + b"x" * 5000 + b"\r\n" + b"X-Bare: a\rb\nc\r\n"
        _, _, report = self.bounce(headers=headers)
        part = report.get_payload()[2]
        self.assertEqual(part["Content-Transfer-Encoding"], "quoted-printable")
        self.assertEqual(part.get_payload(decode=True), headers)
        for line in part.get_payload().split("\r\n"):
            self.assertLessEqual(len(line), 76)

    def test_quoted_printable_edges(self) -> None:
        """Trailing white space, "=" and a bare CR at a line end survive the encoding."""
        headers = b"X-A: a=b \r\nX-B: \xe9\t\r\nX-C: c\r\r\n"
        _, _, report = self.bounce(headers=headers)
        self.assertEqual(report.get_payload()[2].get_payload(decode=True), headers)

    def test_huge_header_block(self) -> None:
        """Original headers are cut after a whole line within the bound."""
        line = b"X-Filler: " + b"y" * 70 + b"\r\n"
        headers = b"Received: from a by b; date\r\n" + line * 2000
        self.assertGreater(len(headers), HEADERS_LIMIT)
        _, data, report = self.bounce(headers=headers)
        self.assertLess(len(data), HEADERS_LIMIT + 8192)
        returned = report.get_payload()[2].get_payload(decode=True)
        self.assertLessEqual(len(returned), HEADERS_LIMIT)
        self.assertTrue(returned.startswith(b"Received: from a by b; date\r\n"))
        self.assertTrue(headers.startswith(returned))
        self.assertTrue(returned.endswith(line))

    def test_no_headers(self) -> None:
        _, _, report = self.bounce(headers=b"\r\nbody only\r\n")
        self.assertEqual(report.get_payload()[2].get_payload(), "")

    def test_injection_in_recipient(self) -> None:
        """A CR or LF in a recipient or a reply cannot start a field or a header of its own."""
        failures = [
            ("x@example.org\r\nBcc: victim@example.net", "550 5.1.1 no\r\nX-Injected: 1", None),
            ("y@example.org\nAction: delivered", "550 5.1.1 ok\n\nFinal-Recipient: rfc822; z@z", None),
        ]
        _, data, report = self.bounce(failures)
        self.assertNotRegex(data, rb"(?m)^(Bcc|X-Injected):")
        self.assertIsNone(report["Bcc"])
        per_recipient = groups(report)[1:]
        self.assertEqual(len(per_recipient), 2)
        self.assertEqual(
            per_recipient[0]["Final-Recipient"], "rfc822; x@example.org\\r\\nBcc: victim@example.net"
        )
        self.assertEqual(per_recipient[1]["Action"], "failed")
        for group in per_recipient:
            self.assertEqual(group.keys(), ["Final-Recipient", "Action", "Status", "Diagnostic-Code"])

    def test_long_reply(self) -> None:
        """A long reply is folded, and cut to a bound, never a line over 998 octets."""
        reply = "550 5.7.1 " + " ".join(["word"] * 500) + " " + "z" * 3000
        _, data, report = self.bounce([("a@example.net", reply, None)])
        folded = [line for line in data.split(b"\r\n") if b"word" in line]
        self.assertGreater(len(folded), 5)
        for line in folded[:-1]:
            self.assertLessEqual(len(line), 76)
        diagnostic = unfold(groups(report)[1]["Diagnostic-Code"])
        self.assertTrue(diagnostic.startswith("smtp; 550 5.7.1 word word"))
        self.assertTrue(diagnostic.endswith("..."))
        self.assertLessEqual(len(diagnostic), 1000)

    def test_non_ascii_reply(self) -> None:
        _, _, report = self.bounce([("a@example.net", "550 5.1.1 unbekannt: M\u00fcller \u2603", None)])
        self.assertEqual(
            groups(report)[1]["Diagnostic-Code"], "smtp; 550 5.1.1 unbekannt: M\\xfcller \\u2603"
        )

    def test_null_sender_refused(self) -> None:
        """A bounce is never sent to the null sender (RFC 3464 / RFC 5321 section 4.5.5)."""
        for sender in ("", "<>", None):
            with self.assertRaises(ValueError):
                bounce(dict(META, mail_from=sender), HEADERS, FAILURES, "gateway.example", NOW)

    def test_unwritable_sender_refused(self) -> None:
        """A sender no client could give (corrupt metadata) is refused, not written out."""
        for sender in ("s@example.com\r\nBcc: victim@example.net", "caf\u00e9@example.com"):
            with self.assertRaises(ValueError):
                bounce(dict(META, mail_from=sender), HEADERS, FAILURES, "gateway.example", NOW)

    def test_bounce_of_bounce_refused(self) -> None:
        with self.assertRaises(ValueError):
            bounce(dict(META, protocol="DSN"), HEADERS, FAILURES, "gateway.example", NOW)

    def test_nothing_to_report_refused(self) -> None:
        with self.assertRaises(ValueError):
            bounce(META, HEADERS, [], "gateway.example", NOW)

    def test_unknown_arrival(self) -> None:
        meta = {k: v for k, v in META.items() if k != "received_at"}
        _, _, report = self.bounce(meta=meta)
        self.assertIsNone(groups(report)[0]["Arrival-Date"])

    @settings(max_examples=200, deadline=None)
    @given(
        recipients=st.lists(st.text(min_size=1, max_size=300), min_size=1, max_size=5),
        replies=st.lists(st.one_of(st.none(), st.text(max_size=2000)), min_size=5, max_size=5),
        relays=st.lists(st.one_of(st.none(), st.text(max_size=80)), min_size=5, max_size=5),
        sender=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=300)
        .filter(lambda s: s != "<>"),
        headers=st.binary(max_size=3000),
    )
    def test_always_well_formed(self, recipients, replies, relays, sender, headers) -> None:
        """Whatever goes in, the report is 7-bit, CRLF, bounded lines, with one group per recipient."""
        failures = list(zip(recipients, replies, relays))
        _, data = bounce(dict(META, mail_from=sender), headers, failures, "gateway.example", NOW)
        check_wire_form(self, data)
        report = parse(data)
        self.assertEqual(report.defects, [])
        parts = report.get_payload()
        self.assertEqual(len(parts), 3)
        per_recipient = groups(report)[1:]
        self.assertEqual(len(per_recipient), len(failures))
        for group in per_recipient:
            self.assertEqual(group["Action"], "failed")
            self.assertRegex(group["Status"], r"\A[45]\.[0-9]{1,3}\.[0-9]{1,3}\Z")
        self.assertEqual(report.get_all("To"), [report["To"]])
        self.assertEqual(unfold(report["To"]), f"<{sender}>")
        self.assertIsNone(report["Bcc"])
        returned = parts[2].get_payload(decode=True)
        self.assertTrue((headers + b"\r\n").startswith(returned))
        self.assertNotIn(b"\r\n\r\n", returned)


class ReadHeadersTests(SynchronousTestCase):
    def write(self, data: bytes) -> str:
        path = store_path(self, "message.eml")
        write_file(path, data)
        return path

    def test_header_block(self) -> None:
        """Up to the blank line, without it and without the body."""
        self.assertEqual(read_headers(self.write(MESSAGE)), HEADERS)

    def test_no_body(self) -> None:
        self.assertEqual(read_headers(self.write(HEADERS)), HEADERS)

    def test_no_headers(self) -> None:
        self.assertEqual(read_headers(self.write(b"\r\nbody\r\n")), b"")

    def test_empty(self) -> None:
        self.assertEqual(read_headers(self.write(b"")), b"")

    def test_bounded(self) -> None:
        """A header block longer than the limit is cut after its last whole line within it."""
        line = b"X-Filler: " + b"y" * 20 + b"\r\n"  # 32 octets
        path = self.write(line * 10 + b"\r\nbody\r\n")
        self.assertEqual(read_headers(path, limit=100), line * 3)

    def test_exactly_the_limit(self) -> None:
        line = b"X-Filler: " + b"y" * 20 + b"\r\n"
        path = self.write(line * 3 + b"\r\nbody\r\n")
        self.assertEqual(read_headers(path, limit=96), line * 3)
        self.assertEqual(read_headers(path, limit=95), line * 2)

    def test_truncated_block(self) -> None:
        """No blank line within the limit: what fits, in whole lines; a single huge line gives nothing."""
        path = self.write(b"Subject: x\r\nX-Huge: " + b"z" * 1000 + b"\r\n\r\nbody\r\n")
        self.assertEqual(read_headers(path, limit=200), b"Subject: x\r\n")
        self.assertEqual(read_headers(self.write(b"X: " + b"z" * 1000), limit=200), b"")

    def test_reads_a_bounded_amount(self) -> None:
        """Only about the limit is read, however large the message."""
        path = self.write(b"Subject: x\r\n" + b"X: y\r\n" * 200_000)
        self.assertGreater(os.path.getsize(path), 1_000_000)
        self.assertLessEqual(len(read_headers(path, limit=1024)), 1024)

    def test_missing_file(self) -> None:
        with self.assertRaises(OSError):
            read_headers(store_path(self, "gone.eml"))

    def test_round_trip(self) -> None:
        """What read_headers gives, bounce returns unchanged."""
        headers = read_headers(self.write(MESSAGE))
        _, data = bounce(META, headers, FAILURES, "gateway.example", NOW)
        part = parse(data).get_payload()[2]
        self.assertEqual(part.get_payload(decode=True).replace(b"\r\n", b"\n"),
                         HEADERS.replace(b"\r\n", b"\n"))
