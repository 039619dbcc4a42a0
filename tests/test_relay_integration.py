"""
Loopback integration tests of the relay client against a real SMTP server
we did not write: aiosmtpd 1.4.6 (see L{tests.relay_support}), plain,
with STARTTLS verified against a CA of the test's own, with AUTH, with its
C{555} to C{MAIL FROM ... AUTH=}, and as an LMTP server on a UNIX socket.
"""

from __future__ import annotations

import os

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from gateway.smtp.relay import RelayAuth, RelayError, RelaySettings, connect, parse_relay
from tests.relay_support import make_ca, start_relay
from tests.support import free_port, write_file

MESSAGE = (
    b"Received: from [192.0.2.7] by gw.test (authgateway) with ESMTPSA id X\r\n"
    b"Subject: relayed\r\n\r\nhello\r\n.starts with a dot\r\n..two dots\r\n"
)


class RelayIntegrationTests(TestCase):
    timeout = 60

    def setUp(self):
        self.message = os.path.abspath(self.mktemp())
        write_file(self.message, MESSAGE)

    def settings(self, url, **kwargs):
        kwargs.setdefault("helo", "gw.test")
        kwargs.setdefault("connect_timeout", 10)
        kwargs.setdefault("command_timeout", 20)
        kwargs.setdefault("data_timeout", 20)
        return RelaySettings(targets=(parse_relay(url),), **kwargs)

    async def open(self, url, **kwargs):
        settings = self.settings(url, **kwargs)
        connection = await connect(reactor, settings, settings.targets[0])
        self.addCleanup(connection.quit)
        return connection

    async def send(self, connection, recipients=("a@example.net",), auth=None, mail_from="s@example.com"):
        return await connection.send(mail_from, list(recipients), self.message, len(MESSAGE), auth)

    @defer.inlineCallbacks
    def test_plain(self):
        relay = start_relay(self)
        connection = yield defer.ensureDeferred(self.open(relay.url()))
        self.assertFalse(connection.tls)
        self.assertTrue(connection.transport.getTcpNoDelay())  # no Nagle delay behind each command
        result = yield defer.ensureDeferred(self.send(connection, ["a@example.net", "b@example.net"]))
        self.assertEqual([r.code for r in result.replies], [250, 250])
        self.assertTrue(result.usable)
        [received] = relay.handler.messages
        self.assertEqual(received.content, MESSAGE)  # dot-stuffed on the wire, unstuffed there
        self.assertEqual((received.mail_from, received.rcpt_tos), ("s@example.com", ["a@example.net", "b@example.net"]))
        self.assertEqual(received.mail_params, [f"SIZE={len(MESSAGE)}", "BODY=8BITMIME"])
        yield connection.quit()

    @defer.inlineCallbacks
    def test_several_messages_one_connection(self):
        relay = start_relay(self)
        relay.handler.rcpt["busy@example.net"] = "451 4.2.0 mailbox busy"
        relay.handler.rcpt["gone@example.net"] = "550 5.1.1 no such user"
        relay.handler.data = ["250 2.0.0 first", "451 4.3.0 try later", "250 2.0.0 third"]
        connection = yield defer.ensureDeferred(self.open(relay.url()))
        codes = []
        for recipients in (["a@example.net", "busy@example.net"], ["b@example.net"], ["c@example.net", "gone@example.net"]):
            result = yield defer.ensureDeferred(self.send(connection, recipients))
            self.assertTrue(result.usable)
            codes.append([str(r) for r in result.replies])
        self.assertEqual(codes, [
            ["250 2.0.0 first", "451 4.2.0 mailbox busy"],
            ["451 4.3.0 try later"],
            ["250 2.0.0 third", "550 5.1.1 no such user"],
        ])
        self.assertEqual([m.rcpt_tos for m in relay.handler.messages], [["a@example.net"], ["c@example.net"]])
        self.assertEqual(relay.handler.connections, 1)
        yield connection.quit()

    @defer.inlineCallbacks
    def test_pipelined_refusals(self):
        """
        aiosmtpd offers PIPELINING: the commands go in one write; with no
        recipient accepted its 503 to DATA is nobody's outcome, and the
        connection carries the next message.
        """
        relay = start_relay(self)
        relay.handler.rcpt["gone@example.net"] = "550 5.1.1 no such user"
        connection = yield defer.ensureDeferred(self.open(relay.url()))
        self.assertIn("PIPELINING", connection.extensions)
        writes = []
        write = connection.transport.write
        connection.transport.write = lambda data: (writes.append(data), write(data))[1]
        result = yield defer.ensureDeferred(self.send(connection, ["gone@example.net", "gone@example.net"]))
        self.assertEqual([str(r) for r in result.replies], ["550 5.1.1 no such user"] * 2)
        self.assertTrue(result.usable)
        self.assertEqual(writes, [b"MAIL FROM:<s@example.com> SIZE=%d BODY=8BITMIME\r\n" % len(MESSAGE)
                                  + b"RCPT TO:<gone@example.net>\r\n" * 2 + b"DATA\r\n"])
        result = yield defer.ensureDeferred(self.send(connection, ["a@example.net", "gone@example.net"]))
        self.assertEqual([r.code for r in result.replies], [250, 550])
        self.assertEqual([m.rcpt_tos for m in relay.handler.messages], [["a@example.net"]])

    @defer.inlineCallbacks
    def test_one_command_at_a_time(self):
        """A relay without PIPELINING gets each command after the reply to the one before."""
        relay = start_relay(self)
        relay.handler.pipelining = False
        relay.handler.rcpt["gone@example.net"] = "550 5.1.1 no such user"
        connection = yield defer.ensureDeferred(self.open(relay.url()))
        self.assertNotIn("PIPELINING", connection.extensions)
        writes = []
        write = connection.transport.write
        connection.transport.write = lambda data: (writes.append(data), write(data))[1]
        for recipients, codes in ((["gone@example.net"], [550]), (["a@example.net", "gone@example.net"], [250, 550])):
            result = yield defer.ensureDeferred(self.send(connection, recipients))
            self.assertEqual([r.code for r in result.replies], codes)
            self.assertTrue(result.usable)
        self.assertEqual([w.split(b" ")[0].split(b":")[0] for w in writes if not w.startswith(b"Received")],
                         [b"MAIL", b"RCPT", b"RSET\r\n", b"MAIL", b"RCPT", b"RCPT", b"DATA\r\n", b".\r\n"])
        self.assertEqual(len(relay.handler.messages), 1)

    @defer.inlineCallbacks
    def test_pipelined_stall(self):
        """A relay that answers part of the group and then nothing: the wait for the next reply times out."""
        relay = start_relay(self)
        relay.handler.rcpt["slow@example.net"] = "stall"
        connection = yield defer.ensureDeferred(self.open(relay.url(), command_timeout=0.5))
        result = yield defer.ensureDeferred(self.send(connection, ["a@example.net", "slow@example.net"]))
        self.assertEqual([str(r) for r in result.replies], ["451 4.4.2 timed out waiting for the relay"] * 2)
        self.assertFalse(result.usable)
        self.assertEqual(relay.handler.messages, [])

    @defer.inlineCallbacks
    def test_null_sender_and_empty_message(self):
        relay = start_relay(self)
        write_file(self.message, b"")
        connection = yield defer.ensureDeferred(self.open(relay.url()))
        result = yield defer.ensureDeferred(self.send(connection, mail_from=""))
        self.assertEqual(result.replies[0].code, 250)
        self.assertEqual((relay.handler.messages[0].mail_from, relay.handler.messages[0].content), ("<>", b""))

    @defer.inlineCallbacks
    def test_starttls_verified(self):
        ca = make_ca()
        relay = start_relay(self, ca=ca)
        self.assertEqual(relay.url(), f"smtp://127.0.0.1:{relay.port}")
        connection = yield defer.ensureDeferred(self.open(relay.url(), ca=(ca.certificate,)))
        self.assertTrue(connection.tls)
        result = yield defer.ensureDeferred(self.send(connection))
        self.assertEqual(result.replies[0].code, 250)
        self.assertTrue(relay.handler.messages[0].tls)
        self.assertEqual(relay.handler.messages[0].content, MESSAGE)

    @defer.inlineCallbacks
    def test_large_message_through_tls(self):
        """Several MiB streamed through the TLS layer a chunk at a time arrive whole."""
        ca = make_ca()
        relay = start_relay(self, ca=ca)
        body = b"".join(b"%s line %d\r\n" % (b"." if n % 3 == 0 else b"x", n) for n in range(300000))
        write_file(self.message, b"Subject: big\r\n\r\n" + body)
        connection = yield defer.ensureDeferred(self.open(relay.url(), ca=(ca.certificate,)))
        result = yield defer.ensureDeferred(self.send(connection))
        self.assertEqual(result.replies[0].code, 250)
        self.assertEqual(relay.handler.messages[0].content, b"Subject: big\r\n\r\n" + body)

    @defer.inlineCallbacks
    def test_implicit_tls(self):
        ca = make_ca()
        relay = start_relay(self, ca=ca, implicit=True)
        connection = yield defer.ensureDeferred(self.open(relay.url(), ca=(ca.certificate,)))
        self.assertTrue(connection.tls)
        result = yield defer.ensureDeferred(self.send(connection))
        self.assertEqual(result.replies[0].code, 250)
        self.assertTrue(relay.handler.messages[0].tls)
        settings = self.settings(relay.url(), ca=(make_ca().certificate,))
        e = yield self.assertFailure(connect(reactor, settings, settings.targets[0]), RelayError)
        self.assertIn("TLS failure", str(e))

    @defer.inlineCallbacks
    def test_wrong_ca(self):
        relay = start_relay(self, ca=make_ca())
        other = make_ca("another CA")
        settings = self.settings(relay.url(), ca=(other.certificate,))
        e = yield self.assertFailure(connect(reactor, settings, settings.targets[0]), RelayError)
        self.assertIn("TLS failure", str(e))
        self.assertIn("certificate verify failed", str(e))
        self.assertTrue(e.temporary)
        self.assertEqual(relay.handler.attempts, [])

    @defer.inlineCallbacks
    def test_wrong_name(self):
        """A certificate the CA issued for another name is refused (service-identity)."""
        ca = make_ca()
        relay = start_relay(self, ca=ca, names=["relay.example", "127.0.0.2"])
        settings = self.settings(relay.url(), ca=(ca.certificate,))
        e = yield self.assertFailure(connect(reactor, settings, settings.targets[0]), RelayError)
        self.assertIn("TLS failure: the certificate is not for 127.0.0.1", str(e))
        self.assertEqual(relay.handler.attempts, [])

    @defer.inlineCallbacks
    def test_insecure(self):
        relay = start_relay(self, ca=make_ca())
        connection = yield defer.ensureDeferred(self.open(relay.url() + "?tls=insecure"))
        self.assertTrue(connection.tls)

    @defer.inlineCallbacks
    def test_auth_and_mail_auth_fallback(self):
        """AUTH to the relay; aiosmtpd's 555 to AUTH= gets the MAIL again without it, once per connection."""
        ca = make_ca()
        relay = start_relay(self, ca=ca, users={"gw": "relay-pa55"})
        auth = RelayAuth("gw", "relay-pa55")
        connection = yield defer.ensureDeferred(self.open(relay.url(), ca=(ca.certificate,), auth=auth))
        for n in range(2):
            result = yield defer.ensureDeferred(self.send(connection, auth="daniel@example.com"))
            self.assertEqual(result.replies[0].code, 250)
        self.assertEqual([m.login for m in relay.handler.messages], ["gw", "gw"])
        size = f"SIZE={len(MESSAGE)}"
        self.assertEqual(relay.handler.mail_params, [
            [size, "BODY=8BITMIME", "AUTH=daniel@example.com"], [size, "BODY=8BITMIME"],
            [size, "BODY=8BITMIME"],
        ])

    @defer.inlineCallbacks
    def test_mail_auth_accepted(self):
        relay = start_relay(self, users={"gw": "pw"}, mail_auth=True)
        connection = yield defer.ensureDeferred(self.open(relay.url(), auth=RelayAuth("gw", "pw")))
        yield defer.ensureDeferred(self.send(connection, auth="daniel+x@example.com"))
        yield defer.ensureDeferred(self.send(connection, auth=None))
        self.assertEqual([m.mail_params[1:] for m in relay.handler.messages],
                         [["BODY=8BITMIME", "AUTH=daniel+2Bx@example.com"],
                          ["BODY=8BITMIME", "AUTH=<>"]])

    @defer.inlineCallbacks
    def test_auth_refused(self):
        relay = start_relay(self, users={"gw": "right"})
        settings = self.settings(relay.url(), auth=RelayAuth("gw", "wrong-pa55"))
        e = yield self.assertFailure(connect(reactor, settings, settings.targets[0]), RelayError)
        self.assertFalse(e.temporary)
        self.assertIn("535", str(e))
        self.assertNotIn("wrong-pa55", str(e))

    @defer.inlineCallbacks
    def test_lmtp_unix_socket(self):
        relay = start_relay(self, lmtp=True)
        relay.handler.rcpt["gone@example.net"] = "550 5.1.1 unknown"
        relay.handler.data_for["full@example.net"] = "452 4.2.2 over quota"
        connection = yield defer.ensureDeferred(self.open(relay.url()))
        recipients = ["a@example.net", "gone@example.net", "full@example.net", "b@example.net"]
        result = yield defer.ensureDeferred(self.send(connection, recipients))
        self.assertEqual([r.code for r in result.replies], [250, 550, 452, 250])
        self.assertTrue(result.usable)
        result = yield defer.ensureDeferred(self.send(connection, ["c@example.net"]))
        self.assertEqual([r.code for r in result.replies], [250])
        self.assertEqual(relay.handler.messages[0].content, MESSAGE)

    @defer.inlineCallbacks
    def test_drop_mid_data(self):
        relay = start_relay(self)
        relay.handler.data = "drop"
        connection = yield defer.ensureDeferred(self.open(relay.url()))
        result = yield defer.ensureDeferred(self.send(connection, ["a@example.net", "b@example.net"]))
        self.assertEqual([str(r) for r in result.replies], ["451 4.4.2 connection closed by the relay"] * 2)
        self.assertFalse(result.usable)
        self.assertEqual(relay.handler.messages, [])

    @defer.inlineCallbacks
    def test_stall(self):
        relay = start_relay(self)
        relay.handler.data = "stall"
        connection = yield defer.ensureDeferred(self.open(relay.url(), data_timeout=0.5))
        result = yield defer.ensureDeferred(self.send(connection))
        self.assertEqual((result.replies[0].code, result.usable), (451, False))

    @defer.inlineCallbacks
    def test_nothing_listening(self):
        settings = self.settings(f"smtp://127.0.0.1:{free_port()}?tls=none")
        e = yield self.assertFailure(connect(reactor, settings, settings.targets[0]), RelayError)
        self.assertIn("connection refused", str(e))
