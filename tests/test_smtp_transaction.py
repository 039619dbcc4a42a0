"""
Tests for L{gateway.smtp.server}'s mail transaction: MAIL, RCPT and their
parameters, sender binding, the C{AUTH=} mailbox, and what the client says
that is recorded, held to RFC 5321.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from gateway.acl import Policy, parse_acl
from gateway.events import Events
from gateway.smtp import codec
from gateway.smtp.server import SMTPSettings
from tests.smtp_support import Client, ServerTestCase, plain


#: An ACL that lets daniel send as daniel@example.com only.
DANIEL_SENDS = (
    '[[acl."smtp/sender/example.com/daniel"]]\n'
    "allow = true\n"
    'privileges = ["send"]\n'
    'identity.Individual = "daniel"\n'
)


class TransactionTests(ServerTestCase):
    def test_auth_required(self) -> None:
        client = self.tls_session()
        self.assertReplies(
            client.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"),
            [b"530 5.7.0", b"530 5.7.0", b"530 5.7.0"],
        )

    def test_untrusted_peer_needs_auth(self) -> None:
        client = self.connect(
            "implicit", trusted_networks=(ipaddress.ip_network("203.0.113.0/24"),)
        )
        self.ehlo(client)
        self.assertReplies(client.send(b"MAIL FROM:<a@b.example>\r\n"), [b"530 5.7.0"])

    def test_trusted_network(self) -> None:
        client = self.trusted_session()
        self.assertReplies(
            client.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"),
            [b"250 2.1.0", b"250 2.1.5", b"354 2.0.0"],
        )
        self.assertReplies(client.send(b"hello\r\n.\r\n"), [b"250 2.0.0"])
        ((message, meta),) = self.stored()
        self.assertIn(b" with ESMTP id ", message)
        self.assertIsNone(meta["authz_id"])
        self.assertIsNone(meta["auth_info"])

    def test_mail_before_helo(self) -> None:
        client = self.connect(trusted_networks=(ipaddress.ip_network("192.0.2.0/24"),))
        self.assertReplies(client.send(b"MAIL FROM:<a@b.example>\r\n"), [b"503 5.5.1"])

    def test_nested_mail(self) -> None:
        client = self.authenticated()
        self.assertReplies(
            client.send(b"MAIL FROM:<a@b.example>\r\nMAIL FROM:<e@f.example>\r\n"),
            [b"250 2.1.0", b"503 5.5.1"],
        )

    def test_rset_ends_transaction(self) -> None:
        client = self.authenticated()
        self.assertReplies(
            client.send(b"MAIL FROM:<a@b.example>\r\nRSET\r\nRCPT TO:<c@d.example>\r\n"
                        b"MAIL FROM:<e@f.example>\r\n"),
            [b"250 2.1.0", b"250 2.0.0", b"503 5.5.1", b"250 2.1.0"],
        )

    def test_mail_held_for_the_queue(self) -> None:
        """
        While the delivery queue holds new transactions back, MAIL is answered
        once it lets this one go, and what was pipelined after it waits its turn.
        """
        waits: list[defer.Deferred[None]] = []
        self.spool.admission = lambda: waits.append(defer.Deferred()) or waits[-1]
        client = self.authenticated()
        self.assertEqual(client.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n"), [])
        waits.pop().callback(None)
        self.assertReplies(client.read(), [b"250 2.1.0", b"250 2.1.5"])

    def test_client_gone_while_held(self) -> None:
        """A client that leaves while its MAIL is held: the wait is cancelled, nothing logged."""
        waits: list[defer.Deferred[None]] = []
        self.spool.admission = lambda: waits.append(defer.Deferred()) or waits[-1]
        client = self.authenticated()
        client.send(b"MAIL FROM:<a@b.example>\r\n")
        client.proto.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(waits[0].called)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_null_sender(self) -> None:
        self.assertReplies(self.authenticated().send(b"MAIL FROM:<>\r\n"), [b"250 2.1.0"])

    def test_mail_syntax(self) -> None:
        self.assertReplies(self.authenticated().send(b"MAIL TO:<a@b.example>\r\n"), [b"501 5.5.4"])

    def test_size_parameter(self) -> None:
        client = self.authenticated(max_size=1000)
        self.assertReplies(
            client.send(b"MAIL FROM:<a@b.example> SIZE=1001\r\n"), [b"552 5.3.4"]
        )
        self.assertReplies(client.send(b"MAIL FROM:<a@b.example> SIZE=x\r\n"), [b"501 5.5.4"])
        # Third review: 5000 digits made int() raise (CPython's 4300-digit
        # limit), dropping the connection with a traceback in the log.
        self.assertReplies(
            client.send(b"MAIL FROM:<a@b.example> SIZE=" + b"9" * 5000 + b"\r\n"), [b"552 5.3.4"]
        )
        self.assertReplies(
            client.send(b"MAIL FROM:<a@b.example> SIZE=1000 BODY=8BITMIME\r\n"), [b"250 2.1.0"]
        )

    def test_bare_lf_in_a_command_never_reaches_the_expressions(self) -> None:
        """
        Third review: Twisted's MAIL/RCPT expressions backtrack quadratically on
        a bare LF after the parameters (a second of reactor time per 12 KB
        line). A command with a bare CR or LF is refused before any parsing.
        """
        client = self.authenticated()
        client.send(b"MAIL FROM:<a@b.example>\r\n")
        matched = []
        self.patch(codec, "_RCPT", _Recording(codec._RCPT, matched))
        self.patch(codec, "_MAIL", _Recording(codec._MAIL, matched))
        line = b"RCPT TO:<a@b.example>" + b" " * 12000 + b"x\ny\r\n"
        self.assertReplies(client.send(line * 3), [b"501 5.5.2"] * 3)
        self.assertReplies(client.send(b"MAIL FROM:<c@d.example>" + b" " * 12000 + b"x\ny\r\n"),
                           [b"501 5.5.2"])
        self.assertEqual(matched, [])
        self.assertReplies(client.send(b"RCPT TO:<ok@b.example>\r\n"), [b"250 2.1.5"])
        self.assertEqual(len(matched), 1)

    def test_duplicate_parameter(self) -> None:
        client = self.authenticated()
        self.assertReplies(
            client.send(b"MAIL FROM:<a@b.example> AUTH=<> auth=a@b.example\r\n"), [b"503 5.5.4"]
        )
        self.assertReplies(
            client.send(b"MAIL FROM:<a@b.example> SIZE=1 SIZE=2\r\n"), [b"503 5.5.4"]
        )

    def test_unknown_parameter(self) -> None:
        client = self.authenticated()
        self.assertReplies(client.send(b"MAIL FROM:<a@b.example> FROB=1\r\n"), [b"555 5.5.4"])
        self.assertReplies(client.send(b"MAIL FROM:<a@b.example>\r\n"), [b"250 2.1.0"])
        self.assertReplies(client.send(b"RCPT TO:<c@d.example> NOTIFY=NEVER\r\n"), [b"555 5.5.4"])

    def test_mail_auth_parameter(self) -> None:
        """C{AUTH=<xtext>} (RFC 4954 section 5) is decoded and kept in the metadata."""
        client = self.authenticated()
        self.assertReplies(
            client.send(b"MAIL FROM:<daniel@example.com> AUTH=daniel+2Bx@example.com\r\n"
                        b"RCPT TO:<a@example.net>\r\nDATA\r\n"),
            [b"250 2.1.0", b"250 2.1.5", b"354 2.0.0"],
        )
        self.assertReplies(client.send(b"hi\r\n.\r\n"), [b"250 2.0.0"])
        ((_, meta),) = self.stored()
        self.assertEqual(meta["mail_auth"], "daniel+x@example.com")

    def test_mail_auth_empty_and_malformed(self) -> None:
        client = self.authenticated()
        self.assertReplies(client.send(b"MAIL FROM:<a@b.example> AUTH=<>\r\n"), [b"250 2.1.0"])
        client.send(b"RSET\r\n")
        self.assertReplies(client.send(b"MAIL FROM:<a@b.example> AUTH=a+zz\r\n"), [b"501 5.5.4"])

    def test_rcpt_before_mail(self) -> None:
        self.assertReplies(self.authenticated().send(b"RCPT TO:<c@d.example>\r\n"), [b"503 5.5.1"])

    def test_too_many_recipients(self) -> None:
        client = self.authenticated(max_recipients=2)
        self.assertReplies(
            client.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c1@d.example>\r\n"
                        b"RCPT TO:<c2@d.example>\r\nRCPT TO:<c3@d.example>\r\n"),
            [b"250 2.1.0", b"250 2.1.5", b"250 2.1.5", b"452 4.5.3"],
        )

    def test_data_without_rcpt(self) -> None:
        client = self.authenticated()
        self.assertReplies(client.send(b"DATA\r\n"), [b"503 5.5.1"])
        self.assertReplies(
            client.send(b"MAIL FROM:<a@b.example>\r\nDATA\r\n"), [b"250 2.1.0", b"503 5.5.1"]
        )
        self.assertNothingStored()

    def test_sender_binding(self) -> None:
        acl = parse_acl(DANIEL_SENDS)
        client = self.authenticated(policy=acl, sender_binding=True)
        self.assertReplies(client.send(b"MAIL FROM:<boss@example.com>\r\n"), [b"553 5.7.1"])
        self.assertReplies(client.send(b"MAIL FROM:<daniel@other.example>\r\n"), [b"553 5.7.1"])
        self.assertReplies(client.send(b"MAIL FROM:<daniel@Example.COM>\r\n"), [b"250 2.1.0"])

    def test_sender_binding_needs_a_sender_grant(self) -> None:
        """
        "Authenticated users may use SMTP" (a broad rule with privileges "*") is
        no licence to send as anyone: only rules under C{smtp/sender/DOMAIN}
        naming C{send} bind senders; a domain-wide grant still works.
        """
        broad = parse_acl(
            '[[acl."smtp"]]\nallow = true\nprivileges = ["*"]\nidentity.Authenticated = {}\n'
            '[[acl."smtp/sender/*"]]\nallow = true\nprivileges = ["*"]\n'
            "identity.Authenticated = {}\n"
            '[[acl."smtp/sender/example.org"]]\nallow = true\nprivileges = ["send"]\n'
            'identity.Individual = "daniel"\n'
        )
        client = self.authenticated(policy=broad, sender_binding=True)
        self.assertReplies(client.send(b"MAIL FROM:<ceo@example.com>\r\n"), [b"553 5.7.1"])
        self.assertReplies(client.send(b"MAIL FROM:<anyone@example.org>\r\n"), [b"250 2.1.0"])

    def test_sender_binding_canonical_local_part(self) -> None:
        """
        Third review: a quoted, escaped or re-cased spelling of a denied mailbox
        is the same mailbox, and is denied too; a quoted form no key can name
        is refused under binding.
        """
        acl = parse_acl(
            '[[acl."smtp/sender/example.com/ceo"]]\nallow = false\nprivileges = ["send"]\n'
            "identity.Any = {}\n"
            '[[acl."smtp/sender/example.com"]]\nallow = true\nprivileges = ["send"]\n'
            "identity.Authenticated = {}\n"
        )
        client = self.authenticated(policy=acl, sender_binding=True)
        for sender in (b"ceo", b'"ceo"', b'"c\\eo"', b"CEO", b'"john doe"'):
            self.assertReplies(client.send(b"MAIL FROM:<" + sender + b"@example.com>\r\n"),
                               [b"553 5.7.1"])
        self.assertReplies(client.send(b"MAIL FROM:<Daniel.K@Example.COM>\r\n"), [b"250 2.1.0"])

    def test_sender_binding_off(self) -> None:
        acl = parse_acl("")
        client = self.authenticated(policy=acl)
        self.assertReplies(client.send(b"MAIL FROM:<boss@example.com>\r\n"), [b"250 2.1.0"])


class ClientTextTests(ServerTestCase):
    """
    What the client says that is recorded (the envelope, C{AUTH=}, the
    HELO name) or echoed is held to RFC 5321 without SMTPUTF8: no control
    character, NUL or 8-bit octet reaches the spool's JSON, the C{Received:}
    header, a log line or a reply.
    """

    def test_sender_with_control_characters_refused(self) -> None:
        client = self.authenticated()
        for path in (b'<"x\nMAIL FROM:<ceo@example.com>"@example.com>', b'<"a\rb"@example.com>'):
            # A bare CR or LF: no command at all (RFC 5321 2.3.8).
            self.assertReplies(client.send(b"MAIL FROM:" + path + b"\r\n"), [b"501 5.5.2"])
        for path in (b'<"a\x00b"@example.com>', b'<"a\tb"@example.com>', b'<"a\x7fb"@example.com>',
                     b'<"\xc3\xa9"@example.com>', b"<a\\\x00b@example.com>", b'<a@"b\x01c">',
                     b'<a@"b.example">', b"<a@b..example>"):
            self.assertReplies(client.send(b"MAIL FROM:" + path + b"\r\n"), [b"553 5.1.7"])
        self.assertReplies(client.send(b"MAIL FROM:<daniel@example.com>\r\n"), [b"250 2.1.0"])

    def test_recipient_with_control_characters_refused(self) -> None:
        client = self.authenticated()
        client.send(b"MAIL FROM:<daniel@example.com>\r\n")
        for path in (b'<"a\nDATA\n"@y.example>', b'<"a\rb"@y.example>'):
            self.assertReplies(client.send(b"RCPT TO:" + path + b"\r\n"), [b"501 5.5.2"])
        for path in (b'<"a\x00b"@y.example>', b'<"\x1b[31m"@y.example>', b"<\\\x80@y.example>"):
            self.assertReplies(client.send(b"RCPT TO:" + path + b"\r\n"), [b"553 5.1.3"])
        self.assertEqual(client.proto._to, [])

    def test_rfc5321_addresses_still_taken(self) -> None:
        """Quoted strings of printable text, quoted pairs, atoms and dots, a bare postmaster."""
        client = self.authenticated()
        self.assertReplies(
            client.send(b'MAIL FROM:<"john doe"@example.com>\r\n'
                        b"RCPT TO:<first.last+tag@sub.example.com>\r\n"
                        b'RCPT TO:<"a\\ b(c)"@example.org>\r\n'
                        b"RCPT TO:<postmaster>\r\nDATA\r\nhi\r\n.\r\n"),
            [b"250 2.1.0", b"250 2.1.5", b"250 2.1.5", b"250 2.1.5", b"354 2.0.0", b"250 2.0.0"],
        )
        ((_, meta),) = self.stored()
        self.assertEqual(meta["mail_from"], '"john doe"@example.com')
        self.assertEqual(
            meta["rcpt_to"],
            ["first.last+tag@sub.example.com", '"a\\ b(c)"@example.org', "postmaster@mx.test"],
        )

    def test_mail_auth_strict_xtext(self) -> None:
        """C{+} and two upper-case hex digits only; the decoded value is C{<>} or a mailbox."""
        client = self.authenticated()
        for value in (b"x+0D+0AX-Injected:+20yes+00++A", b"a+0a@example.com", b"a+-1@example.com",
                      b"a+2@example.com", b"a+@example.com", b"a=b@example.com", b"daniel",
                      b"a+00b@example.com", b"%22a+0Ab%22@example.com", b"<a@example.com>",
                      b"a\xc3\xa9@example.com", b"a@exa+20mple.com"):
            self.assertReplies(client.send(b"MAIL FROM:<daniel@example.com> AUTH=" + value + b"\r\n"),
                               [b"501 5.5.4"])
        self.assertReplies(client.send(b"MAIL FROM:<daniel@example.com> AUTH=a+2Bb@example.com\r\n"),
                           [b"250 2.1.0"])
        self.assertEqual(client.proto._mail_auth, "a+b@example.com")
        client.send(b"RSET\r\n")
        self.assertReplies(client.send(b"MAIL FROM:<daniel@example.com> AUTH=+3C+3E\r\n"), [b"250 2.1.0"])
        self.assertEqual(client.proto._mail_auth, "<>")

    def test_parameter_names_not_echoed_unless_keywords(self) -> None:
        client = self.authenticated()
        lines = client.send(b"MAIL FROM:<daniel@example.com> \x1b[31m\x00=1\r\n")
        self.assertReplies(lines, [b"501 5.5.4"])
        self.assertTrue(all(line.isascii() and line.decode().isprintable() for line in lines), lines)
        self.assertReplies(client.send(b"MAIL FROM:<daniel@example.com> \xff=1\r\n"), [b"501 5.5.4"])
        self.assertReplies(client.send(b"MAIL FROM:<daniel@example.com> X-FROB=1\r\n"), [b"555 5.5.4"])

    def test_helo_names(self) -> None:
        """A domain or an address literal of printable ASCII, at most 255 octets; else 501 5.5.4."""
        client = self.connect("implicit", junk_commands=100)
        for command in (b"EHLO", b"HELO"):
            for name in (b"evil\x00\x1b[31mhost(spoof", b"a(b)", b"host\x7f", b"h\xc3\xa9",
                         b"[1.2.3.4", b"[a]b]", b"a..b", b".a", b"x" * 256, b'"q"'):
                self.assertReplies(
                    client.send(command + b" " + name + b" [6.6.6.6]\r\n"), [b"501 5.5.4"]
                )
        self.assertIsNone(client.proto._helo_name)
        for name in (b"[IPv6:2001:db8::1]", b"[192.0.2.1]", b"host_name.example.", b"x" * 255):
            self.assertReplies(client.send(b"EHLO " + name + b"\r\n"), [b"250"])
            self.assertEqual(client.proto._helo_name, name.decode())

    def test_helo_address_literals_are_addresses(self) -> None:
        """Third review: a general literal's parentheses and ';' would break the Received: comment."""
        client = self.connect("implicit", junk_commands=100)
        for name in (b"[10.0.0.1)(by:mx.trusted.example;Mon,1(Jan]", b"[x]", b"[IPv6:1.2.3.4]",
                     b"[1.2.3.4.5]", b"[IPv6:fe80::1%eth0]", b"[2001:db8::1]"):
            self.assertReplies(client.send(b"EHLO " + name + b"\r\n"), [b"501 5.5.4"])
        for name in (b"[127.0.0.1]", b"[IPv6:::1]", b"[ipv6:2001:db8::1]"):
            self.assertReplies(client.send(b"EHLO " + name + b"\r\n"), [b"250"])

    def test_received_header_printable(self) -> None:
        client = self.connect("implicit")
        self.assertReplies(client.send(b"EHLO evil\x00\x1b[31mhost(spoof [6.6.6.6])\r\n"),
                           [b"501 5.5.4"])
        self.assertReplies(client.send(b"EHLO [IPv6:2001:db8::1]\r\n"), [b"250"])
        client.send(b"AUTH PLAIN " + plain() + b"\r\n")
        self.start_data(client)
        client.send(b"hi\r\n.\r\n")
        ((message, meta),) = self.stored()
        header = message.split(b"\r\n\t")[0]
        self.assertEqual(header, b"Received: from [IPv6:2001:db8::1] ([192.0.2.7])")
        self.assertEqual(meta["helo"], "[IPv6:2001:db8::1]")


class MailAuthParameterTests(ServerTestCase):
    """Issue 11 item 9: C{MAIL FROM AUTH=} is believed only from an authenticated client."""

    def send_one(self, client: Client, mail: bytes) -> dict[str, Any]:
        self.assertReplies(
            client.send(mail + b"\r\nRCPT TO:<a@example.net>\r\nDATA\r\n"),
            [b"250 2.1.0", b"250 2.1.5", b"354 2.0.0"],
        )
        self.assertReplies(client.send(b"hi\r\n.\r\n"), [b"250 2.0.0"])
        (id,) = self.spool.ids()
        _, meta = self.spool.load(id)
        return meta

    def test_trusted_network_is_null(self) -> None:
        meta = self.send_one(self.trusted_session(), b"MAIL FROM:<app@example.com> AUTH=ceo@example.com")
        self.assertEqual(meta["mail_auth"], "<>")
        self.assertIsNone(meta["auth_info"])

    def test_trusted_network_without_parameter(self) -> None:
        meta = self.send_one(self.trusted_session(), b"MAIL FROM:<app@example.com>")
        self.assertIsNone(meta["mail_auth"])

    def test_authenticated_kept(self) -> None:
        meta = self.send_one(self.authenticated(), b"MAIL FROM:<daniel@example.com> AUTH=list@example.com")
        self.assertEqual(meta["mail_auth"], "list@example.com")

    def test_sender_binding_applies_to_the_auth_mailbox(self) -> None:
        acl = parse_acl(DANIEL_SENDS)
        client = self.authenticated(policy=acl, sender_binding=True)
        meta = self.send_one(client, b"MAIL FROM:<daniel@example.com> AUTH=ceo@example.com")
        self.assertEqual(meta["mail_auth"], "<>")

    def test_sender_binding_own_mailbox_kept(self) -> None:
        acl = parse_acl(DANIEL_SENDS)
        client = self.authenticated(policy=acl, sender_binding=True)
        meta = self.send_one(client, b"MAIL FROM:<daniel@example.com> AUTH=daniel@example.com")
        self.assertEqual(meta["mail_auth"], "daniel@example.com")


class _Recording:
    """A compiled expression that records what it is asked to match."""

    def __init__(self, expression, seen):
        self.expression, self.seen = expression, seen

    def match(self, text):
        self.seen.append(text)
        return self.expression.match(text)


class ErrorLimitTests(ServerTestCase):
    """
    Audit finding 3: refused commands are limited per session, after AUTH as
    well as before (Postfix's smtpd_hard_error_limit): an authenticated
    client pipelining refused senders (an audit line each) cannot grow the
    audit log without bound.
    """

    def test_refused_senders_end_the_session(self) -> None:
        events = Events()
        asked: list[Any] = []
        events.add(type("Sink", (), {"login": lambda _, e: None,
                                     "authz": lambda _, e: asked.append(e)})())
        policy = Policy(parse_acl(DANIEL_SENDS), events)
        client = self.authenticated(policy=policy, sender_binding=True, max_errors=3)
        lines = client.send(b"MAIL FROM:<boss@example.com>\r\nRSET\r\n" * 100)
        self.assertReplies(lines, [b"553 5.7.1", b"250 2.0.0"] * 3 + [
            b"553 5.7.1", b"421 4.7.0 mx.test Too many errors, closing connection"])
        self.assertTrue(client.closed)
        self.assertEqual(len(asked), 4)  # the decisions (their audit lines) stopped there

    def test_counted_before_auth_and_for_trusted_networks(self) -> None:
        for client in (self.tls_session(max_errors=2, junk_commands=100),
                       self.trusted_session(max_errors=2)):
            self.assertReplies(client.send(b"FROB\r\n" * 2), [b"500 5.5.2"] * 2)
            self.assertReplies(client.send(b"NOOP\r\n"), [b"250 2.0.0"])  # not an error
            self.assertFalse(client.closed)
            self.assertReplies(client.send(b"FROB\r\nNOOP\r\n"), [b"500 5.5.2", b"421 4.7.0"])
            self.assertTrue(client.closed)

    def test_default_and_option(self) -> None:
        from gateway import tap

        self.assertEqual(SMTPSettings().max_errors, 20)
        options = tap.Options()
        options.parseOptions(["--auth", "memory:daniel:tiger", "--smtp-max-errors", "5"])
        self.assertEqual(options._smtp_settings().max_errors, 5)
