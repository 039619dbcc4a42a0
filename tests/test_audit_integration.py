"""
The audit log of a real C{twistd authgateway --audit-log FILE}, fed by
clients we did not write (smtplib, curl, PySocks) failing and succeeding to
log in on the three front doors, then read by the real C{fail2ban-regex}
with C{contrib/fail2ban/filter.d/authgateway.conf}: every failure and
throttled refusal is matched with its client's address, no success is, and
no password reaches the file. SIGUSR1 reopens the file and still rotates
twistd's own log.
"""

from __future__ import annotations

import base64
import collections
import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.support import free_port, read_file, require_module, require_tool, stop_process, write_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILTER = os.path.join(ROOT, "contrib", "fail2ban", "filter.d", "authgateway.conf")
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")

#: The right password, and a wrong one per front door: none may reach a log.
RIGHT = "Right-S3cret-tiger"
WRONG = {"smtp": "Wr0ng-S3cret-smtp", "http": "Wr0ng-S3cret-http", "socks": "Wr0ng-S3cret-socks"}
#: The address each front door's guesser connects from (loopback aliases).
GUESSER = {"smtp": "127.0.0.2", "http": "127.0.0.3", "socks": "127.0.0.4"}
#: Failures before a peer is refused (--max-failures): each guesser tries once more.
LIMIT = 3

ACL = """
[[acl."smtp/sender/example.com/daniel"]]
allow = true
privileges = ["send"]
identity.Individual = "daniel"

[[acl."http"]]
allow = true
privileges = ["get"]
identity.Authenticated = {}
"""


class GatewayRun(SynchronousTestCase):
    """A real gateway writing an audit log, with real clients and fail2ban-regex."""

    #: --failure-delay: none by default (the tests answer every failure at once).
    failure_delay = "0"

    def setUp(self) -> None:
        self.twistd = require_tool(TWISTD, "Twisted (pip, next to the test's Python)")
        self.fail2ban = require_tool("fail2ban-regex", "fail2ban")
        self.curl = require_tool("curl", "curl")
        self.socks = require_module("socks", "PySocks")
        self.data = os.path.abspath(self.mktemp())
        os.makedirs(self.data)
        self.audit = os.path.join(self.data, "audit.log")
        self.twistd_log = os.path.join(self.data, "twistd.log")
        acl = os.path.join(self.data, "acl.toml")
        write_file(acl, ACL)
        self.ports = {door: free_port() for door in ("smtp", "http", "socks")}
        self.process = subprocess.Popen(
            [self.twistd, "--pidfile=", "-n", "--logfile", self.twistd_log, "authgateway",
             "--data-dir", self.data, "--auth", f"memory:daniel:{RIGHT}",
             *(arg for door, port in self.ports.items()
               for arg in (f"--{door}", f"tcp:{port}:interface=127.0.0.1")),
             "--smtp-insecure-auth", "--smtp-hostname", "gw.test", "--smtp-sender-binding",
             "--http-upstream", f"http://127.0.0.1:{free_port()}",  # nobody there: 502
             "--acl", acl, "--max-failures", str(LIMIT), "--max-peer-failures", str(LIMIT),
             "--failure-delay", self.failure_delay, "--failure-delay-max", self.failure_delay,
             "--audit-log", self.audit],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.addCleanup(self.stop)
        deadline = time.monotonic() + 30
        while not all(self.listening(port) for port in self.ports.values()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.fail("twistd authgateway did not start:\n" + self.log_text())
            time.sleep(0.1)

    def stop(self) -> None:
        stop_process(self.process)

    def listening(self, port: int) -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    def log_text(self) -> str:
        return read_file(self.twistd_log).decode("utf-8", "replace") if os.path.exists(
            self.twistd_log) else ""

    # -- the clients -------------------------------------------------------

    def smtp(self, source: str, password: str, sender: str | None = None) -> int:
        """AUTH PLAIN from C{source}; with C{sender}, a MAIL FROM after it: that reply's code."""
        with smtplib.SMTP("127.0.0.1", self.ports["smtp"], timeout=20,
                          source_address=(source, 0)) as client:
            client.ehlo("client.test")
            client.user, client.password = "daniel", password
            try:  # one attempt (login() would try LOGIN after a failed PLAIN)
                code, _ = client.auth("PLAIN", client.auth_plain)
            except smtplib.SMTPResponseException as e:
                return e.smtp_code
            if sender is not None:
                code, _ = client.mail(sender)
            return code

    def http(self, source: str, password: str, path: str = "/whoami") -> int:
        done = subprocess.run(
            [self.curl, "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--interface", source,
             "-u", f"daniel:{password}", f"http://127.0.0.1:{self.ports['http']}{path}"],
            capture_output=True, text=True, timeout=30, check=False)
        self.assertEqual(done.returncode, 0, done.stderr)
        return int(done.stdout)

    def socks_login(self, source: str, password: str) -> str:
        """RFC 1929 from C{source}, then CONNECT to a name the ACL does not grant."""
        client = self.socks.socksocket()
        client.settimeout(20)
        client.bind((source, 0))
        client.set_proxy(self.socks.SOCKS5, "127.0.0.1", self.ports["socks"], rdns=True,
                         username="daniel", password=password)
        try:
            client.connect(("blocked.example", 443))
            return "connected"
        except self.socks.ProxyError as e:
            if isinstance(getattr(e, "socket_err", None), self.socks.SOCKS5AuthError):
                return "auth failed"
            return f"refused: {e}"
        finally:
            client.close()

    # -- the reader --------------------------------------------------------

    def records(self, path: str | None = None) -> list[dict]:
        lines = read_file(path or self.audit).decode("ascii").splitlines()
        return [json.loads(line) for line in lines]

    def fail2ban_regex(self, path: str) -> tuple[collections.Counter, str]:
        """The addresses fail2ban-regex finds (one per matched line), and its summary."""
        found = subprocess.run([self.fail2ban, "-o", "ip", path, FILTER],
                               capture_output=True, text=True, timeout=60, check=False)
        self.assertEqual(found.returncode, 0, found.stdout + found.stderr)
        summary = subprocess.run([self.fail2ban, path, FILTER],
                                 capture_output=True, text=True, timeout=60, check=False)
        self.assertEqual(summary.returncode, 0, summary.stdout + summary.stderr)
        return collections.Counter(found.stdout.split()), summary.stdout


class AuditLogIntegrationTests(GatewayRun):
    def test_failures_match_successes_do_not(self) -> None:
        for _ in range(LIMIT):
            self.assertEqual(self.smtp(GUESSER["smtp"], WRONG["smtp"]), 535)
            self.assertEqual(self.http(GUESSER["http"], WRONG["http"]), 401)
            self.assertEqual(self.socks_login(GUESSER["socks"], WRONG["socks"]), "auth failed")
        # One more each: refused by the throttle before any check.
        self.assertEqual(self.smtp(GUESSER["smtp"], RIGHT), 454)
        self.assertEqual(self.http(GUESSER["http"], RIGHT), 429)
        self.assertEqual(self.socks_login(GUESSER["socks"], RIGHT), "auth failed")
        # And one success each from 127.0.0.1.
        self.assertEqual(self.smtp("127.0.0.1", RIGHT, sender="daniel@example.com"), 250)
        self.assertEqual(self.smtp("127.0.0.1", RIGHT, sender="ceo@example.com"), 553)
        self.assertEqual(self.http("127.0.0.1", RIGHT), 200)
        self.assertEqual(self.http("127.0.0.1", RIGHT, "/app/page"), 502)  # allowed, proxied
        self.assertIn("refused", self.socks_login("127.0.0.1", RIGHT))

        records = self.records()
        logins = [r for r in records if r["event"] == "login"]
        self.assertEqual(
            collections.Counter((r["protocol"], r["peer_address"], r["outcome"]) for r in logins),
            collections.Counter({
                **{(door, GUESSER[door], "failure"): LIMIT for door in GUESSER},
                **{(door, GUESSER[door], "throttled"): 1 for door in GUESSER},
                ("smtp", "127.0.0.1", "success"): 2,
                ("http", "127.0.0.1", "success"): 2,
                ("socks", "127.0.0.1", "success"): 1,
            }),
        )
        for record in logins:
            self.assertEqual(record["identity"], "daniel")
            self.assertEqual(record["listener"], record["protocol"])
            self.assertIsInstance(record["peer_port"], int)
            self.assertIs(record["tls"], False)
        self.assertEqual({(r["protocol"], r["mechanism"]) for r in logins},
                         {("smtp", "PLAIN"), ("http", "Basic"), ("socks", "RFC1929")})
        # The front doors' decisions carry where they were asked.
        decisions = {(r["protocol"], r["resource"], r["outcome"], r["peer_address"])
                     for r in records if r["event"] == "authz"}
        self.assertLessEqual({
            ("smtp", "smtp/sender/example.com/daniel", "allowed", "127.0.0.1"),
            ("smtp", "smtp/sender/example.com/ceo", "denied", "127.0.0.1"),
            ("socks", "socks/destination/blocked.example/443", "denied", "127.0.0.1"),
            ("http", "http/127.0.0.1/app/page", "allowed", "127.0.0.1"),
        }, decisions)

        matched, summary = self.fail2ban_regex(self.audit)
        per_door = LIMIT + 1
        self.assertEqual(matched, collections.Counter({a: per_door for a in GUESSER.values()}),
                         summary)
        self.assertRegex(summary, rf"Lines: {len(records)} lines, 0 ignored, "
                                  rf"{3 * per_door} matched, {len(records) - 3 * per_door} missed")

        # No password, in clear or in the Basic header's base64, in either log.
        for path in (self.audit, self.twistd_log):
            data = read_file(path)
            for password in (RIGHT, *WRONG.values()):
                self.assertNotIn(password.encode(), data, path)
                self.assertNotIn(base64.b64encode(f"daniel:{password}".encode()), data, path)
            self.assertNotIn(b"S3cret", data, path)

    def test_sigusr1_reopens(self) -> None:
        """After logrotate's move and SIGUSR1, new lines go to a new file; twistd's log rotates too."""
        self.assertEqual(self.http(GUESSER["http"], WRONG["http"]), 401)
        os.rename(self.audit, self.audit + ".1")
        os.kill(self.process.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.audit):
            self.assertLess(time.monotonic(), deadline, "the audit log was not reopened")
            time.sleep(0.05)
        self.assertEqual(self.smtp(GUESSER["smtp"], WRONG["smtp"]), 535)
        self.assertEqual([r["protocol"] for r in self.records(self.audit + ".1")], ["http"])
        self.assertEqual([r["protocol"] for r in self.records()], ["smtp"])
        self.assertTrue(os.path.exists(self.twistd_log + ".1"), "twistd's handler was not chained")
        self.assertEqual(self.fail2ban_regex(self.audit)[0], collections.Counter({GUESSER["smtp"]: 1}))
        # Stopped (drained, the audit log closed with the core): exit 0, the log whole.
        self.process.terminate()
        self.assertEqual(self.process.wait(60), 0)
        self.assertIn("Server Shut Down.", self.log_text())
        self.assertTrue(read_file(self.audit).endswith(b"\n"))
        # Our handler ran first, then twistd's rotated its log.
        self.assertIn(f"audit log {self.audit} reopened",
                      read_file(self.twistd_log + ".1").decode("utf-8", "replace"))


class HangUpIntegrationTests(GatewayRun):
    """
    Audit finding 1: a success is answered as soon as it is checked, a
    failure only after the failure delay; a guesser that hangs up when no
    answer came within the check's time knows its guess was wrong. Its
    attempts are still failures in the audit log, and fail2ban matches them.
    """

    failure_delay = "5"
    #: Seconds the guesser waits for an answer: far more than a check takes here.
    PATIENCE = 1.0

    def smtp_hang_up(self, source: str, password: str) -> bytes:
        """AUTH PLAIN, then hang up unless answered within PATIENCE: the reply, or b''."""
        with socket.create_connection(("127.0.0.1", self.ports["smtp"]), timeout=20,
                                      source_address=(source, 0)) as client:
            reader = client.makefile("rb")
            reader.readline()
            client.sendall(b"EHLO client.test\r\n")
            while reader.readline()[3:4] != b" ":
                pass
            token = base64.b64encode(f"\0daniel\0{password}".encode())
            client.sendall(b"AUTH PLAIN " + token + b"\r\n")
            client.settimeout(self.PATIENCE)
            try:
                return reader.readline()
            except TimeoutError:
                return b""

    def http_hang_up(self, source: str, password: str) -> int:
        """curl giving up after PATIENCE: its exit status (28: timed out)."""
        return subprocess.run(
            [self.curl, "-sS", "-o", "/dev/null", "--max-time", str(self.PATIENCE),
             "--interface", source, "-u", f"daniel:{password}",
             f"http://127.0.0.1:{self.ports['http']}/whoami"],
            capture_output=True, timeout=30, check=False).returncode

    def test_hanging_up_during_the_delay_still_matched(self) -> None:
        self.assertEqual(self.smtp_hang_up("127.0.0.1", RIGHT)[:3], b"235")  # at once
        for _ in range(2):
            self.assertEqual(self.smtp_hang_up(GUESSER["smtp"], WRONG["smtp"]), b"")
            self.assertEqual(self.http_hang_up(GUESSER["http"], WRONG["http"]), 28)
        deadline = time.monotonic() + 30
        while len(self.records()) < 5:  # each written when the gateway sees the hang-up
            self.assertLess(time.monotonic(), deadline, self.records())
            time.sleep(0.05)
        failures = [(r["protocol"], r["outcome"], r["reason"], r["client_left"])
                    for r in self.records() if r["outcome"] != "success"]
        self.assertEqual(collections.Counter(failures), collections.Counter({
            ("smtp", "failure", "invalid_credentials", True): 2,
            ("http", "failure", "invalid_credentials", True): 2,
        }))
        matched, summary = self.fail2ban_regex(self.audit)
        self.assertEqual(matched, collections.Counter({GUESSER["smtp"]: 2, GUESSER["http"]: 2}),
                         summary)
        self.assertIn("(the client left)", self.log_text())


#: The jail's C{maxretry} and the IPv6 /64 a guesser rotates its address in.
JAIL = os.path.join(ROOT, "contrib", "fail2ban", "jail.d", "authgateway.local")
ROTATING = "2001:db8:1:2"

#: Fed the "<ip> <time>" lines fail2ban-regex prints, fail2ban's own failure
#: manager (as a jail's) with the jail's maxretry prints what it bans.
BANS = """
import sys
from fail2ban.server.failmanager import FailManager, FailManagerEmpty
from fail2ban.server.ipdns import IPAddr
from fail2ban.server.ticket import FailTicket
manager = FailManager()
manager.setMaxRetry(int(sys.argv[1]))
for line in sys.stdin:
    ip, when = line.split()
    manager.addFailure(FailTicket(IPAddr(ip), float(when)))
try:
    while True:
        print(manager.toBan().getID())
except FailManagerEmpty:
    pass
"""


class SubnetBanTests(SynchronousTestCase):
    """
    An IPv6 guesser rotating its address inside its /64 is banned as one
    subnet: the filter matches C{peer_network}, fail2ban counts the /64.
    """

    def test_rotating_ipv6_guesser_banned(self) -> None:
        from gateway.ops.audit import login_line
        from gateway.events import LoginEvent

        fail2ban = require_tool("fail2ban-regex", "fail2ban")
        with open(fail2ban) as script:
            interpreter = script.readline()[2:].strip()  # fail2ban's own Python
        maxretry = int(next(line.split("=")[1] for line in read_file(JAIL).decode().splitlines()
                            if line.startswith("maxretry")))
        start = 1795693201.0

        def failure(n: int, address: str) -> bytes:
            return login_line(LoginEvent(
                time=start + n, protocol="smtp", listener="smtps", mechanism="PLAIN",
                identity="daniel", outcome="failure", reason="invalid_credentials",
                peer_address=address, peer_port=40000 + n, tls=True, duration=0.5))

        path = os.path.abspath(self.mktemp())
        lines = [failure(n, f"{ROTATING}:{n:x}::{n + 1:x}") for n in range(maxretry + 2)]
        # Below the limit: a neighbour /64, and one IPv4 address.
        lines += [failure(100 + n, f"2001:db8:1:3::{n + 1:x}") for n in range(maxretry - 1)]
        lines += [failure(200 + n, "192.0.2.7") for n in range(maxretry - 1)]
        write_file(path, b"".join(lines))
        found = subprocess.run([fail2ban, "-o", "<ip> <time>", path, FILTER],
                               capture_output=True, text=True, timeout=60, check=False)
        self.assertEqual(found.returncode, 0, found.stdout + found.stderr)
        self.assertEqual(
            collections.Counter(line.split()[0] for line in found.stdout.splitlines()),
            collections.Counter({f"{ROTATING}::/64": maxretry + 2,
                                 "2001:db8:1:3::/64": maxretry - 1, "192.0.2.7": maxretry - 1}))
        banned = subprocess.run([interpreter, "-c", BANS, str(maxretry)], input=found.stdout,
                                capture_output=True, text=True, timeout=60, check=False)
        self.assertEqual(banned.returncode, 0, banned.stderr)
        self.assertEqual(banned.stdout.split(), [f"{ROTATING}::/64"])
