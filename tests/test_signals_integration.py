"""
Signals early in a real C{twistd -n authgateway}'s start-up: SIGHUP, SIGUSR1
or SIGTERM sent between C{makeService} (twistd logs "starting up" after it)
and the reactor running. SIGHUP and SIGUSR1 no longer end the process (their
default action): the gateway starts, and the SIGHUP's reload happens once it
runs; an early SIGTERM still stops it at once, gracefully (exit 0).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.support import read_log
from tests.test_delivery_integration import TWISTD

RELOADED = "[gateway.ops.reload#info] reload: "
STARTED = "authgateway started"


class EarlySignalTests(SynchronousTestCase):
    def setUp(self) -> None:
        if not os.path.exists(TWISTD):
            self.skipTest(f"no twistd next to {TWISTD}")
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.log = os.path.join(self.dir, "twistd.log")

    def read_log(self) -> str:
        return read_log(self.log)

    def wait(self, condition, what: str, timeout: float = 30.0, step: float = 0.05) -> None:
        end = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > end:
                self.fail(f"timed out waiting for {what}:\n{self.read_log()}")
            time.sleep(step)

    def start_and_signal(
        self, signum: int, *extra: str, repeat: bool = True
    ) -> tuple[subprocess.Popen, int]:
        """
        Start twistd; from its "starting up" line (makeService has run) until
        the gateway says it started (the reactor is about to run), send
        C{signum} every 2 ms (without C{repeat}: once). Returns the process
        and how many were sent.
        """
        with open(self.log, "wb") as log:  # as systemd runs it: no twistd SIGUSR1 rotation
            proc = subprocess.Popen(
                [TWISTD, "--pidfile=", "-n", "--logfile", "-", "authgateway",
                 "--data-dir", os.path.join(self.dir, "data"), "--auth", "memory:a:b",
                 "--smtp", "tcp:0:interface=127.0.0.1", "--http", "none", "--socks", "none",
                 *extra],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

        def reap() -> None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

        self.addCleanup(reap)
        self.wait(lambda: "starting up" in self.read_log() or proc.poll() is not None,
                  "twistd to start", step=0.0005)
        sent, end = 0, time.monotonic() + 30
        while proc.poll() is None and (sent == 0 or STARTED not in self.read_log()):
            self.assertLess(time.monotonic(), end, self.read_log())
            proc.send_signal(signum)
            sent += 1
            if not repeat:
                break
            time.sleep(0.002)
        return proc, sent

    def test_sighup(self) -> None:
        """The gateway survives, and reloads once running (one reload for the early ones)."""
        proc, sent = self.start_and_signal(signal.SIGHUP)
        self.assertGreaterEqual(sent, 1)
        self.wait(lambda: RELOADED in self.read_log() or proc.poll() is not None, "the reload")
        self.assertIsNone(proc.poll(), f"twistd exited {proc.returncode}:\n{self.read_log()}")
        log = self.read_log()
        self.assertLess(log.index(STARTED), log.index(RELOADED))
        self.assertIn(f"{RELOADED}TLS certificate unchanged", log)

    def test_sigusr1(self) -> None:
        audit = os.path.join(self.dir, "audit.log")
        proc, sent = self.start_and_signal(signal.SIGUSR1, "--audit-log", audit)
        self.assertGreaterEqual(sent, 1)
        reopened = f"audit log {audit} reopened"
        self.wait(lambda: reopened in self.read_log() or proc.poll() is not None, "the reopen")
        self.assertIsNone(proc.poll(), f"twistd exited {proc.returncode}:\n{self.read_log()}")

    def test_sigterm(self) -> None:
        """
        Stopped as soon as the reactor runs, through the drain: exit 0 (a
        second SIGTERM before it runs would end it at once: test_signals).
        One that lands while the reactor starts, between its own handler's
        installation and ours, is the reactor's: the same drain, then twistd
        ends the process by the signal (as in test_tap).
        """
        proc, sent = self.start_and_signal(signal.SIGTERM, repeat=False)
        self.assertEqual(sent, 1)
        self.assertIn(proc.wait(15), (0, -signal.SIGTERM), self.read_log())
        log = self.read_log()
        self.assertIn("draining 0 session(s)", log)
        self.assertIn("Server Shut Down.", log)
