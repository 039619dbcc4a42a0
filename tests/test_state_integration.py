"""
Two real C{twistd authgateway} processes sharing one real C{redis-server}
(C{--state redis://...}), driven by clients we did not write (smtplib,
curl): 5 wrong passwords spread over both refuse the 6th on either; Redis
stopped mid-test gives the chosen C{--state-failure} (closed: SMTP 454 and
HTTP 503; local: the right password gets in), one log line per transition;
Redis back: the limits are shared again.
"""

from __future__ import annotations

import os
import smtplib
import subprocess
import sys
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.redis_support import RedisServer
from tests.support import free_port, read_file, require_tool, stop_process

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
RIGHT = "Right-S3cret-tiger"
WRONG = "Wr0ng-S3cret-guess"
#: The guesser's address (a loopback alias): the pair (daniel, it) is throttled.
GUESSER = "127.0.0.2"


class Gateway:
    """One C{twistd authgateway} with SMTP and HTTP on loopback ports."""

    def __init__(self, test: SynchronousTestCase, state: str, failure: str) -> None:
        self.test = test
        self.data = os.path.abspath(test.mktemp())
        os.makedirs(self.data)
        self.log = os.path.join(self.data, "twistd.log")
        self.smtp_port, self.http_port = free_port(), free_port()
        self.process = subprocess.Popen(
            [require_tool(TWISTD, "Twisted"), "--pidfile=", "-n", "--logfile", self.log,
             "authgateway", "--data-dir", self.data, "--auth", f"memory:daniel:{RIGHT}",
             "--smtp", f"tcp:{self.smtp_port}:interface=127.0.0.1",
             "--http", f"tcp:{self.http_port}:interface=127.0.0.1", "--socks", "none",
             "--smtp-insecure-auth", "--smtp-hostname", "gw.test", "--http-insecure-auth",
             "--failure-delay", "0", "--failure-delay-max", "0", "--cache-ttl", "0",
             "--state", state, "--state-failure", failure],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        test.addCleanup(self.stop)
        self.wait_for("limits are shared")

    def stop(self) -> None:
        stop_process(self.process)

    def text(self) -> str:
        return read_file(self.log).decode("utf-8", "replace") if os.path.exists(self.log) else ""

    def state_lines(self) -> list[str]:
        return [line for line in self.text().splitlines() if "state: " in line]

    def wait_for(self, words: str, count: int = 1, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while sum(words in line for line in self.state_lines()) < count:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.test.fail(f"no {words!r} in the log:\n" + self.text())
            time.sleep(0.05)

    def smtp(self, password: str, source: str = GUESSER) -> int:
        """One AUTH PLAIN as daniel: the reply's code."""
        with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=20,
                          source_address=(source, 0)) as client:
            client.ehlo("client.test")
            client.user, client.password = "daniel", password
            try:
                code, _ = client.auth("PLAIN", client.auth_plain)
            except smtplib.SMTPResponseException as e:
                return e.smtp_code
            return code

    def http(self, password: str, source: str = GUESSER) -> int:
        done = subprocess.run(
            [require_tool("curl", "curl"), "-sS", "-o", "/dev/null", "-w", "%{http_code}",
             "--interface", source, "-u", f"daniel:{password}",
             f"http://127.0.0.1:{self.http_port}/whoami"],
            capture_output=True, text=True, timeout=30, check=False)
        self.test.assertEqual(done.returncode, 0, done.stderr)
        return int(done.stdout)


class SharedStateIntegrationTests(SynchronousTestCase):
    def start(self, failure: str = "closed") -> tuple[RedisServer, Gateway, Gateway]:
        redis = RedisServer(self)
        return redis, Gateway(self, redis.url, failure), Gateway(self, redis.url, failure)

    def guess_five(self, one: Gateway, two: Gateway) -> None:
        """5 wrong passwords spread over both gateways and both front doors."""
        self.assertEqual(
            [one.smtp(WRONG), two.http(WRONG), one.http(WRONG), two.smtp(WRONG), one.smtp(WRONG)],
            [535, 401, 401, 535, 535],
        )

    def assert_refused_on_either(self, one: Gateway, two: Gateway) -> None:
        """The 6th, even with the right password, is refused on either gateway."""
        self.assertEqual([one.smtp(RIGHT), two.smtp(RIGHT)], [454, 454])
        self.assertEqual([one.http(RIGHT), two.http(RIGHT)], [429, 429])
        # Another peer is not concerned.
        self.assertEqual([one.smtp(RIGHT, "127.0.0.1"), two.http(RIGHT, "127.0.0.1")], [235, 200])

    def test_limits_shared(self) -> None:
        _, one, two = self.start()
        self.guess_five(one, two)
        self.assert_refused_on_either(one, two)

    def test_outage_closed(self) -> None:
        """Redis stopped: logins fail temporarily; back: shared again; one line each."""
        redis, one, two = self.start("closed")
        self.assertEqual([one.smtp(RIGHT), two.http(RIGHT)], [235, 200])
        redis.stop()
        for gateway in (one, two):
            gateway.wait_for("unreachable")
        for _ in range(3):
            self.assertEqual([one.smtp(RIGHT), two.smtp(RIGHT)], [454, 454])
            self.assertEqual([one.http(RIGHT), two.http(RIGHT)], [503, 503])
        redis.start()
        for gateway in (one, two):
            gateway.wait_for("reachable again")
        self.assertEqual([one.smtp(RIGHT, "127.0.0.1"), two.http(RIGHT, "127.0.0.1")], [235, 200])
        self.guess_five(one, two)
        self.assert_refused_on_either(one, two)
        for gateway in (one, two):
            lines = gateway.state_lines()
            self.assertEqual(
                [("connected" in l, "unreachable" in l, "reachable again" in l) for l in lines],
                [(True, False, False), (False, True, False), (False, False, True)], lines,
            )
            self.assertIn("--state-failure closed", lines[1])

    def test_outage_local(self) -> None:
        """--state-failure local: with Redis stopped, the right password still gets in."""
        redis, one, two = self.start("local")
        redis.stop()
        for gateway in (one, two):
            gateway.wait_for("unreachable")
        self.assertEqual([one.smtp(RIGHT), two.smtp(RIGHT)], [235, 235])
        self.assertEqual([one.http(RIGHT), two.http(RIGHT)], [200, 200])
        # Each process's own limits hold meanwhile.
        self.assertEqual([one.smtp(WRONG) for _ in range(5)], [535] * 5)
        self.assertEqual(one.smtp(RIGHT), 454)
        redis.start()
        for gateway in (one, two):
            gateway.wait_for("reachable again")
        self.guess_five(one, two)
        self.assert_refused_on_either(one, two)
        for gateway in (one, two):
            self.assertEqual(len(gateway.state_lines()), 3, gateway.state_lines())
