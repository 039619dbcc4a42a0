"""
End-to-end delivery on loopback: messages submitted with clients we did not
write (swaks, smtplib, curl) to the gateway, queued, and relayed to a real
SMTP server we did not write either (aiosmtpd 1.4.6, L{tests.relay_support});
a C{kill -9} of a running C{twistd authgateway} in the middle of a delivery.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, reactor, task, threads
from twisted.trial.unittest import TestCase

from gateway import tap
from tests.relay_support import Relay, make_ca, start_relay
from tests.support import free_port, keep_signal_handlers, require_tool, write_file

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
MESSAGE = "From: daniel@example.com\r\nSubject: relayed\r\n\r\nhello\r\n.starts with a dot\r\n"


def until(condition: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> defer.Deferred:
    """Fires with C{condition()}'s first true value; fails after C{timeout} seconds."""
    end = time.monotonic() + timeout

    @defer.inlineCallbacks
    def poll():
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > end:
                raise AssertionError(f"timed out waiting for {what}")
            yield task.deferLater(reactor, 0.05, lambda: None)

    return poll()


def submit(port: int, recipients: list[str], message: str = MESSAGE, sender: str = "daniel@example.com"):
    """One authenticated submission with smtplib (plaintext AUTH: the gateway allows it on loopback here)."""

    def session():
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
            client.login("daniel", "tiger")
            return client.sendmail(sender, recipients, message)

    return threads.deferToThread(session)


def queue_files(spool: str) -> list[str]:
    return sorted(name for name in os.listdir(spool) if not name.startswith(".") and name != "quarantine")


class InProcessTests(TestCase):
    """The gateway as C{makeService} builds it, in this process, relaying to aiosmtpd."""

    timeout = 60

    def start(self, relay: Relay, *extra: str) -> None:
        self.smtp_port, self.http_port = free_port(), free_port()
        self.data = os.path.abspath(self.mktemp())
        options = tap.Options()
        options.parseOptions([
            "--data-dir", self.data, "--auth", "memory:daniel:tiger",
            "--smtp", f"tcp:{self.smtp_port}:interface=127.0.0.1", "--smtp-insecure-auth",
            "--http", f"tcp:{self.http_port}:interface=127.0.0.1", "--socks", "none",
            "--smtp-hostname", "mx.test", "--relay", relay.url(), *extra,
        ])
        keep_signal_handlers(self)
        self.service = tap.makeService(options, reactor=reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.spool = options["spoolDir"]

    def tls_relay(self, **kwargs: Any) -> tuple[Relay, list[str]]:
        """A relay requiring STARTTLS with a test CA's certificate, and the options that trust it."""
        ca = make_ca()
        ca_file = os.path.abspath(self.mktemp())
        write_file(ca_file, ca.pem)
        return start_relay(self, ca=ca, **kwargs), ["--relay-ca", ca_file]

    def empty(self) -> bool:
        return not queue_files(self.spool)

    @defer.inlineCallbacks
    def test_swaks_through_the_queue(self):
        """
        swaks submits with STARTTLS and AUTH; the message reaches the relay over
        verified TLS, logged in to it, with the spool's Received header and
        AUTH=<authz_id>, and leaves the queue.
        """
        swaks = require_tool("swaks", "swaks")
        relay, trust = self.tls_relay(users={"gw": "relay-secret"}, mail_auth=True)
        password_file = os.path.abspath(self.mktemp())
        write_file(password_file, "relay-secret\n")
        self.start(relay, *trust, "--relay-auth", f"gw:{password_file}")
        done = yield threads.deferToThread(
            subprocess.run,
            [swaks, "--server", f"127.0.0.1:{self.smtp_port}", "--tls", "--auth", "PLAIN",
             "--auth-user", "daniel", "--auth-password", "tiger", "--from", "daniel@example.com",
             "--to", "bob@example.org", "--header", "Subject: via swaks", "--timeout", "20"],
            capture_output=True, text=True, timeout=40, check=False)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        yield relay.handler.wait_messages(1, reactor)
        [received] = relay.handler.messages
        self.assertEqual((received.mail_from, received.rcpt_tos), ("daniel@example.com", ["bob@example.org"]))
        self.assertIn("AUTH=daniel", received.mail_params)
        self.assertEqual(received.login, "gw")
        self.assertTrue(received.tls)
        parsed = email.message_from_bytes(received.content, policy=email.policy.default)
        self.assertIn("with ESMTPSA", parsed["Received"])
        self.assertEqual(parsed["Subject"], "via swaks")
        yield until(self.empty, what="the queue to empty")

    @defer.inlineCallbacks
    def test_relay_refusing_auth_parameter(self):
        """A relay that advertises AUTH but answers 555 to AUTH= gets the transaction again without it."""
        relay, trust = self.tls_relay(users={"gw": "pw"}, mail_auth=False)
        password_file = os.path.abspath(self.mktemp())
        write_file(password_file, "pw")
        self.start(relay, *trust, "--relay-auth", f"gw:{password_file}")
        yield submit(self.smtp_port, ["bob@example.org"])
        yield relay.handler.wait_messages(1, reactor)
        first, *_, last = relay.handler.mail_params
        self.assertIn("AUTH=daniel", first)  # refused with 555 ...
        self.assertFalse(any(x.startswith("AUTH=") for x in last))  # ... and sent again without it
        yield until(self.empty, what="the queue to empty")

    @defer.inlineCallbacks
    def test_retried_after_4xx(self):
        """A 451 to one recipient keeps it queued; the retry delivers it, the other one only once."""
        relay = start_relay(self)
        relay.handler.rcpt["busy@example.net"] = ["451 4.2.0 mailbox busy", "250 OK"]
        self.start(relay, "--relay-retry", "1s")
        yield submit(self.smtp_port, ["bob@example.org", "busy@example.net"])
        yield relay.handler.wait_messages(2, reactor)
        self.assertEqual([m.rcpt_tos for m in relay.handler.messages],
                         [["bob@example.org"], ["busy@example.net"]])
        yield until(self.empty, what="the queue to empty")

    @defer.inlineCallbacks
    def test_bounced_after_5xx(self):
        """
        A 550 is a permanent failure: an RFC 3464 report goes to the sender
        through the relay, from the null sender; the delivered recipient is not
        sent again and the bounce itself leaves the queue.
        """
        relay = start_relay(self)
        relay.handler.rcpt["gone@example.net"] = "550 5.1.1 no such user"
        self.start(relay)
        yield submit(self.smtp_port, ["bob@example.org", "gone@example.net"])
        yield relay.handler.wait_messages(2, reactor)
        original, bounce = relay.handler.messages
        self.assertEqual(original.rcpt_tos, ["bob@example.org"])
        self.assertEqual((bounce.mail_from, bounce.rcpt_tos), ("<>", ["daniel@example.com"]))  # as aiosmtpd keeps it
        report = email.message_from_bytes(bounce.content, policy=email.policy.default)
        self.assertEqual(report.get_content_type(), "multipart/report")
        self.assertEqual(report.get_param("report-type"), "delivery-status")
        status = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
        self.assertIn("gone@example.net", status.as_string())
        self.assertIn("5.1.1", status.as_string())
        yield until(self.empty, what="the queue to empty")
        self.assertEqual(len(relay.handler.attempts), 2)  # nothing bounced the bounce

    @defer.inlineCallbacks
    def test_unverifiable_certificate_keeps_the_message(self):
        """A relay whose certificate the gateway cannot verify gets nothing; the message stays queued."""
        relay, _ = self.tls_relay()
        other = os.path.abspath(self.mktemp())
        write_file(other, make_ca().pem)
        self.start(relay, "--relay-ca", other, "--relay-retry", "1h")
        yield submit(self.smtp_port, ["bob@example.org"])

        def state():
            states = [n for n in queue_files(self.spool) if n.endswith(".state")]
            return states and json.load(open(os.path.join(self.spool, states[0])))

        saved = yield until(state, what="a saved queue state")
        self.assertIn("TLS", saved["last_error"] or "")
        self.assertEqual([r["status"] for r in saved["recipients"]], ["pending"])
        self.assertEqual(relay.handler.attempts, [])

    @defer.inlineCallbacks
    def test_http_injection_relayed(self):
        """A message injected with curl over POST /api/inject/v1 is relayed like a submitted one."""
        curl = require_tool("curl", "curl")
        relay, trust = self.tls_relay(users={"gw": "pw"}, mail_auth=True)
        password_file = os.path.abspath(self.mktemp())
        write_file(password_file, "pw")
        self.start(relay, *trust, "--relay-auth", f"gw:{password_file}")
        body = json.dumps({"envelope_sender": "daniel@example.com",
                           "recipients": [{"email": "carol@example.org"}],
                           "content": "Subject: injected\n\nhello\n"})
        done = yield threads.deferToThread(
            subprocess.run,
            [curl, "-sS", "-u", "daniel:tiger", "-H", "Content-Type: application/json",
             "--data-binary", body, f"http://127.0.0.1:{self.http_port}/api/inject/v1"],
            capture_output=True, text=True, timeout=30, check=False)
        self.assertEqual(done.returncode, 0, done.stderr)
        answer = json.loads(done.stdout)
        yield relay.handler.wait_messages(1, reactor)
        [received] = relay.handler.messages
        self.assertEqual(received.rcpt_tos, ["carol@example.org"])
        self.assertIn(f"with HTTP id {answer['id']}".encode(), received.content)
        self.assertIn("AUTH=daniel", received.mail_params)  # the HTTP login's identity


class KillTests(TestCase):
    """C{twistd authgateway} killed with SIGKILL during a delivery, then started again."""

    timeout = 90

    def twistd(self, *extra: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [TWISTD, "--pidfile=", "-n", "--logfile", os.path.join(self.data, "twistd.log"),
             "authgateway", "--data-dir", self.data, "--auth", "memory:daniel:tiger",
             "--smtp", f"tcp:{self.port}:interface=127.0.0.1", "--smtp-insecure-auth",
             "--http", "none", "--socks", "none", "--relay", self.relay.url(),
             "--relay-connections", "1", *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def reap():
            if proc.poll() is None:
                proc.kill()
            proc.wait()

        self.addCleanup(reap)
        return proc

    def listening(self) -> bool:
        import socket

        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def log(self) -> str:
        with open(os.path.join(self.data, "twistd.log"), errors="replace") as f:
            return f.read()

    @defer.inlineCallbacks
    def test_kill_during_delivery(self):
        """
        Message A: a1 accepted, a2 answered 451 (retry in an hour). Message B
        stalls in DATA, and the gateway is killed with SIGKILL there. After a
        restart and `authgateway queue retry`, every recipient has arrived
        exactly once: a1 was recorded before B was sent, B is sent again, a2
        once it is retried.
        """
        if not os.path.exists(TWISTD):
            self.skipTest(f"no twistd next to {sys.executable}")
        self.relay = relay = start_relay(self)
        relay.handler.rcpt["a2@example.net"] = ["451 4.2.0 busy", "250 OK"]
        relay.handler.data = ["250 2.0.0 Ok: A", "stall", "250 2.0.0 Ok: B"]
        self.data = os.path.abspath(self.mktemp())
        os.makedirs(self.data)
        self.port = free_port()
        proc = self.twistd("--relay-retry", "1h")
        yield until(self.listening, what="twistd to listen")
        yield submit(self.port, ["a1@example.net", "a2@example.net"], MESSAGE.replace("relayed", "A"))
        yield relay.handler.wait_messages(1, reactor)
        yield submit(self.port, ["b1@example.net"], MESSAGE.replace("relayed", "B"))
        # B's MAIL (after A's and its RSET) means A's outcome was saved.
        yield until(lambda: len(relay.handler.mail_params) >= 2, what="the MAIL of B")
        yield task.deferLater(reactor, 0.3, lambda: None)  # B's text on its way
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

        self.twistd("--relay-retry", "1h")
        yield until(self.listening, what="twistd to listen again")
        yield relay.handler.wait_messages(2, reactor)  # B, sent again
        spool = os.path.join(self.data, "spool")
        out = yield threads.deferToThread(
            subprocess.run, [os.path.join(os.path.dirname(sys.executable), "authgateway"),
                             "queue", "--spool", spool, "retry"],
            capture_output=True, text=True, timeout=30, check=False)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        yield relay.handler.wait_messages(3, reactor, timeout=40)
        yield until(lambda: not queue_files(spool), what="the queue to empty")
        delivered = sorted(r for m in relay.handler.messages for r in m.rcpt_tos)
        self.assertEqual(delivered, ["a1@example.net", "a2@example.net", "b1@example.net"])
        subjects = [email.message_from_bytes(m.content)["Subject"] for m in relay.handler.messages]
        self.assertEqual(subjects, ["A", "B", "A"])

