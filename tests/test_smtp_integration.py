"""
Loopback integration tests of the SMTP front door: the real service started
by C{makeService}, talked to by clients we did not write: Python's
C{smtplib} (STARTTLS + PLAIN, LOGIN, implicit TLS) and C{swaks}.
"""

from __future__ import annotations

import base64
import os
import smtplib
import socket
import ssl
import subprocess
import time

from twisted.internet import defer, reactor, threads
from twisted.trial.unittest import TestCase

from gateway import tap
from gateway.smtp.server import SMTPSettings
from tests.support import free_port, keep_signal_handlers, require_tool


def _client_tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the gateway's self-signed certificate
    return context


MESSAGE = "Subject: integration\r\n\r\nhello\r\n.starts with a dot\r\n"


class GatewayMixin:
    """Starts the gateway with --auth memory:daniel:tiger on free loopback ports."""

    def start(self, *extra: str):
        self.smtp_port, self.smtps_port = free_port(), free_port()
        self.data = os.path.abspath(self.mktemp())
        options = tap.Options()
        options.parseOptions([
            "--data-dir", self.data, "--auth", "memory:daniel:tiger",
            "--smtp", f"tcp:{self.smtp_port}:interface=127.0.0.1",
            "--smtps", f"tcp:{self.smtps_port}:interface=127.0.0.1",
            "--http", "none", "--socks", "none", "--smtp-hostname", "mx.test",
            "--failure-delay", "0", "--failure-delay-max", "0", *extra,
        ])
        self.options = options
        keep_signal_handlers(self)
        self.service = tap.makeService(options, reactor=reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.spool = self.service.core.spool

    def stored(self):
        return [self.spool.load(i) for i in self.spool.ids()]


class SmtplibTests(GatewayMixin, TestCase):
    timeout = 60

    def setUp(self):
        self.start()

    @defer.inlineCallbacks
    def test_starttls_plain(self):
        def session():
            with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=20) as client:
                client.ehlo("client.test")
                self.assertFalse(client.has_extn("auth"))  # no AUTH before TLS
                client.starttls(context=_client_tls())
                client.ehlo("client.test")
                self.assertEqual(client.esmtp_features["auth"].split(), ["PLAIN", "LOGIN"])
                self.assertNotIn("starttls", client.esmtp_features)
                client.login("daniel", "tiger")  # smtplib tries PLAIN first
                return client.sendmail("daniel@example.com", ["bob@example.org"], MESSAGE)

        refused = yield threads.deferToThread(session)
        self.assertEqual(refused, {})
        [(message, meta)] = self.stored()
        self.assertIn(b"with ESMTPSA", message)
        self.assertIn(b"\r\n.starts with a dot\r\n", message)
        self.assertEqual((meta["authz_id"], meta["authn_id"]), ("daniel", "daniel"))
        self.assertEqual(meta["mail_from"], "daniel@example.com")
        self.assertEqual(meta["rcpt_to"], ["bob@example.org"])
        self.assertEqual(meta["helo"], "client.test")
        self.assertEqual(meta["protocol"], "ESMTPSA")
        self.assertTrue(meta["tls"]["version"].startswith("TLS"))

    @defer.inlineCallbacks
    def test_login_mechanism(self):
        def session():
            with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=20) as client:
                client.starttls(context=_client_tls())
                client.ehlo("client.test")
                client.user, client.password = "daniel", "tiger"
                code, _ = client.auth("LOGIN", client.auth_login, initial_response_ok=False)
                return code

        self.assertEqual((yield threads.deferToThread(session)), 235)

    @defer.inlineCallbacks
    def test_implicit_tls(self):
        def session():
            with smtplib.SMTP_SSL("127.0.0.1", self.smtps_port, timeout=20,
                                  context=_client_tls()) as client:
                client.ehlo("client.test")
                features = dict(client.esmtp_features)
                client.login("daniel", "tiger")
                client.sendmail("daniel@example.com", ["carol@example.org"], MESSAGE)
                return features

        features = yield threads.deferToThread(session)
        self.assertIn("auth", features)  # at once on port 465 (aiosmtpd#281)
        self.assertNotIn("starttls", features)
        [(_, meta)] = self.stored()
        self.assertEqual(meta["protocol"], "ESMTPSA")

    @defer.inlineCallbacks
    def test_wrong_password_and_unauthenticated(self):
        def session():
            with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=20) as client:
                client.starttls(context=_client_tls())
                client.ehlo("client.test")
                try:
                    client.login("daniel", "lion")
                except smtplib.SMTPAuthenticationError as e:
                    failure = (e.smtp_code, e.smtp_error)
                mail = client.mail("daniel@example.com")
                return failure, mail

        failure, mail = yield threads.deferToThread(session)
        self.assertEqual(failure, (535, b"5.7.8 Authentication credentials invalid"))
        self.assertEqual(mail, (530, b"5.7.0 Authentication required"))
        self.assertEqual(self.stored(), [])


class SwaksTests(GatewayMixin, TestCase):
    timeout = 60

    def setUp(self):
        require_tool("swaks", "swaks")
        self.start()

    def swaks(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["swaks", "--server", "127.0.0.1", "--from", "daniel@example.com",
             "--to", "bob@example.org", "--helo", "swaks.test", "--timeout", "20", *args],
            capture_output=True, text=True, timeout=60,
        )

    @defer.inlineCallbacks
    def test_starttls_auth_plain(self):
        result = yield threads.deferToThread(
            self.swaks, "--port", str(self.smtp_port), "--tls", "--auth", "PLAIN",
            "--auth-user", "daniel", "--auth-password", "tiger",
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("235 2.7.0", result.stdout)
        [(message, meta)] = self.stored()
        self.assertEqual((meta["authn_id"], meta["helo"]), ("daniel", "swaks.test"))
        self.assertIn(b"with ESMTPSA", message)

    @defer.inlineCallbacks
    def test_implicit_tls_auth_login(self):
        result = yield threads.deferToThread(
            self.swaks, "--port", str(self.smtps_port), "--tls-on-connect", "--auth", "LOGIN",
            "--auth-user", "daniel", "--auth-password", "tiger",
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertEqual(len(self.stored()), 1)

    @defer.inlineCallbacks
    def test_plaintext_auth_refused(self):
        result = yield threads.deferToThread(
            self.swaks, "--port", str(self.smtp_port), "--auth", "PLAIN",
            "--auth-user", "daniel", "--auth-password", "tiger",
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual(self.stored(), [])


class UnauthenticatedLimitsTests(GatewayMixin, TestCase):
    """Issue 11 item 4 over a real socket: NOOP no longer keeps an unauthenticated session."""

    timeout = 60

    def setUp(self):
        self.start("--smtp-auth-deadline", "1", "--smtp-junk-commands", "3")

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.smtp_port), timeout=10)
        self.assertTrue(sock.recv(1024).startswith(b"220 "))
        return sock

    @staticmethod
    def read_to_close(sock: socket.socket) -> list[bytes]:
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        return data.split(b"\r\n")[:-1]

    @defer.inlineCallbacks
    def test_noop_loop_hits_junk_limit(self):
        def session():
            with self.connect() as sock:
                sock.sendall(b"EHLO client.test\r\n")
                sock.sendall(b"NOOP\r\n" * 10)
                return self.read_to_close(sock)

        lines = yield threads.deferToThread(session)
        finals = [line for line in lines if line[3:4] == b" "]
        self.assertEqual(finals[1:4], [b"250 2.0.0 OK"] * 3)
        self.assertEqual(
            finals[4:],
            [b"250 2.0.0 OK",
             b"421 4.7.0 mx.test Too many commands without authentication, closing connection"],
        )

    @defer.inlineCallbacks
    def test_noop_does_not_outlive_auth_deadline(self):
        def session():
            with self.connect() as sock:
                started = time.monotonic()
                for _ in range(2):  # activity resets the idle timer, not the deadline
                    sock.sendall(b"NOOP\r\n")
                    self.assertEqual(sock.recv(1024), b"250 2.0.0 OK\r\n")
                    time.sleep(0.3)
                lines = self.read_to_close(sock)
                return lines, time.monotonic() - started

        lines, elapsed = yield threads.deferToThread(session)
        self.assertEqual(
            lines, [b"421 4.7.0 mx.test Authentication took too long, closing connection"]
        )
        self.assertGreaterEqual(elapsed, 0.9)

    def test_option_defaults_from_settings(self):
        settings = self.options["smtpSettings"]
        self.assertEqual((settings.auth_deadline, settings.junk_commands), (1.0, 3))
        options = tap.Options()
        options.parseOptions(["--data-dir", os.path.abspath(self.mktemp()),
                              "--auth", "memory:daniel:tiger"])
        defaults = SMTPSettings()
        self.assertEqual(options["smtpSettings"].auth_deadline, defaults.auth_deadline)
        self.assertEqual(options["smtpSettings"].junk_commands, defaults.junk_commands)


class PipelinedAttackTests(GatewayMixin, TestCase):
    """The adversarial review's payloads over a real TLS socket, pipelined in one write."""

    timeout = 60

    def setUp(self):
        self.start()

    @defer.inlineCallbacks
    def test_pipelined_refusals(self):
        """
        Empty lines then a line too long (taken in linear time: 500 5.5.6),
        a message with a bare LF (554 5.6.11), a command with one (501 5.5.2), a
        HELO with a control character (501 5.5.4); then a good
        message is stored and the session ends normally.
        """
        auth = base64.b64encode(b"\0daniel\0tiger")
        envelope = b"MAIL FROM:<daniel@example.com>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
        payload = (
            b"EHLO client.test\r\nAUTH PLAIN " + auth + b"\r\n" + envelope
            + b"\r\n" * 16384 + b"x" * 1000 + b"\r\n.\r\n"
            + envelope + b"one\n.\nMAIL FROM:<evil@example.com>\r\n.\r\n"
            + b'MAIL FROM:<"x\nMAIL FROM:<ceo@example.com>"@example.com>\r\n'
            + b"EHLO evil\x00\x1b[31mhost(spoof\r\n"
            + envelope + b"good\r\n.\r\nQUIT\r\n"
        )

        def session() -> list[bytes]:
            with socket.create_connection(("127.0.0.1", self.smtps_port), timeout=20) as raw:
                with _client_tls().wrap_socket(raw) as tls:
                    tls.sendall(payload)
                    received = b""
                    while chunk := tls.recv(65536):
                        received += chunk
            return [line for line in received.split(b"\r\n") if line[3:4] == b" "]

        replies = yield threads.deferToThread(session)
        self.assertEqual(
            [line[:10].strip() for line in replies],
            [b"220 mx.tes", b"250 AUTH P", b"235 2.7.0", b"250 2.1.0", b"250 2.1.5", b"354 2.0.0",
             b"500 5.5.6", b"250 2.1.0", b"250 2.1.5", b"354 2.0.0", b"554 5.6.11", b"501 5.5.2",
             b"501 5.5.4", b"250 2.1.0", b"250 2.1.5", b"354 2.0.0", b"250 2.0.0", b"221 2.0.0"],
        )
        [(message, meta)] = self.stored()
        self.assertTrue(message.endswith(b"\r\ngood\r\n"), message)
        self.assertEqual(meta["helo"], "client.test")
