"""
C{twistd authgateway --workers 2} as a real process tree with a real
redis-server (C{--state unix://...}): SMTP (smtplib), HTTP (curl) and SOCKS
(PySocks) served by both workers; a worker killed comes back with a new pid
while the service keeps answering; SIGTERM to the parent ends every process
with status 0; SIGHUP reaches every worker; the parent killed, the workers
end by themselves.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import struct
import subprocess
import time
from collections import defaultdict

from twisted.trial.unittest import SynchronousTestCase

from gateway import tap
from tests.redis_support import RedisServer
from tests.support import free_port, read_log, require_module, require_tool
from tests.test_delivery_integration import TWISTD

STARTED = re.compile(r"authgateway started: 2 workers \(pids (\d+), (\d+)\)")
SUCCESS = re.compile(r"\[gateway\.auth#info worker=(\d)\] auth success: (\w+) ")


def gone(pid: int) -> bool:
    """No such process (or only its zombie, its parent gone and not reaped)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def receive(sock: socket.socket, size: int) -> bytes:
    """Up to C{size} bytes: fewer only when the other side closed (or reset)."""
    data = b""
    while len(data) < size:
        try:
            chunk = sock.recv(size - len(data))
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


class WorkersIntegrationTests(SynchronousTestCase):
    def setUp(self) -> None:
        if not os.path.exists(TWISTD):
            self.skipTest(f"no twistd next to {TWISTD}")
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.log = os.path.join(self.dir, "twistd.log")
        self.curl = require_tool("curl", "curl")
        self.ports = {name: free_port() for name in ("smtp", "http", "socks")}

    def read_log(self) -> str:
        """The log, with what a SIGUSR1 (twistd's --logfile rotation) moved to C{.1} first."""
        rotated = self.log + ".1"
        return (read_log(rotated) if os.path.exists(rotated) else "") + read_log(self.log)

    def wait(self, condition, what: str, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > end:
                self.fail(f"timed out waiting for {what}:\n{self.read_log()[-6000:]}")
            time.sleep(0.05)

    def start(self, *extra: str, workers: str = "2", state: bool = True) -> subprocess.Popen:
        argv = [
            TWISTD, "--pidfile=", "-n", "--logfile", self.log, "authgateway",
            "--data-dir", os.path.join(self.dir, "data"), "--auth", "memory:alice:wonder",
            "--smtp", f"tcp:{self.ports['smtp']}:interface=127.0.0.1", "--smtp-insecure-auth",
            "--http", f"tcp:{self.ports['http']}:interface=127.0.0.1",
            "--socks", f"tcp:{self.ports['socks']}:interface=127.0.0.1",
            "--socks-allow", f"127.0.0.1:{self.ports['smtp']}",
            "--workers", workers, *extra,
        ]
        if state:
            if "state" not in tap.Options().defaults:
                self.skipTest("--state is not an option of this build yet (the state part):"
                              " --workers 2 needs a shared --state")
            redis = RedisServer(self)
            argv += ["--state", redis.unix_url]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        self.addCleanup(self.reap, proc)
        return proc

    def reap(self, proc: subprocess.Popen) -> None:
        for pid in getattr(self, "pids", ()):
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()

    def start_workers(self, *extra: str) -> subprocess.Popen:
        proc = self.start(*extra)
        self.wait(lambda: STARTED.search(self.read_log()) or proc.poll() is not None, "the start")
        self.assertIsNone(proc.poll(), self.read_log())
        self.pids = [int(p) for p in STARTED.search(self.read_log()).groups()]
        for k in (0, 1):
            self.wait(lambda: f"authgateway started: worker {k}," in self.read_log(), f"worker {k}")
        return proc

    def served(self) -> dict[str, set[int]]:
        found: dict[str, set[int]] = defaultdict(set)
        for worker, door in SUCCESS.findall(self.read_log()):
            found[door].add(int(worker))
        return found

    def http(self) -> bytes:
        return subprocess.run(
            [self.curl, "-sS", "--max-time", "20", "-u", "alice:wonder",
             f"http://127.0.0.1:{self.ports['http']}/whoami"],
            check=True, capture_output=True, timeout=30,
        ).stdout

    def smtp(self) -> None:
        with smtplib.SMTP("127.0.0.1", self.ports["smtp"], timeout=20) as client:
            client.login("alice", "wonder")

    def socks(self) -> bytes:
        module = require_module("socks", "PySocks")
        sock = module.socksocket()
        sock.set_proxy(module.SOCKS5, "127.0.0.1", self.ports["socks"],
                       username="alice", password="wonder")
        sock.settimeout(20)
        with sock:
            sock.connect(("127.0.0.1", self.ports["smtp"]))
            return sock.recv(3)

    def test_all_doors_on_both_workers(self) -> None:
        """Connections spread over both workers, on every front door."""
        self.start_workers()
        for _ in range(16):
            self.assertIn(b'"alice"', self.http())
            self.smtp()
            self.assertEqual(self.socks(), b"220")
        self.wait(lambda: self.served().keys() >= {"http", "smtp", "socks"}, "the logins' lines")
        self.assertEqual(dict(self.served()), {"http": {0, 1}, "smtp": {0, 1}, "socks": {0, 1}})

    def test_anonymous_socks_places_shared(self) -> None:
        """
        --socks-auth optional: an anonymous session takes its address's place
        in the shared state before 05 00, so one address holds
        --socks-max-sessions-per-peer sessions on all workers together, not
        that many on each.
        """
        self.start_workers("--socks-auth", "optional", "--socks-max-sessions-per-peer", "3")
        connect = b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack(
            "!H", self.ports["smtp"])
        answers = []
        for _ in range(10):
            sock = socket.create_connection(("127.0.0.1", self.ports["socks"]), timeout=20)
            self.addCleanup(sock.close)
            sock.sendall(b"\x05\x01\x00")
            method = receive(sock, 2)
            if method == b"\x05\x00":
                sock.sendall(connect)
                method += receive(sock, 10)[:2]
            answers.append(method)
        self.assertEqual(answers.count(b"\x05\x00\x05\x00"), 3, answers)

    def test_killed_worker_returns(self) -> None:
        """SIGKILL one worker: the service keeps answering; the slot returns with a new pid."""
        self.start_workers()
        victim = self.pids[1]
        os.kill(victim, signal.SIGKILL)
        for _ in range(10):
            self.assertIn(b'"alice"', self.http())
        exited = f"worker 1 (pid {victim}) exited unexpectedly (killed by SIGKILL)"
        self.wait(lambda: exited in self.read_log(), "the exit's line")
        restarted = re.compile(r"worker 1 restarted: pid (\d+)")
        self.wait(lambda: restarted.search(self.read_log()), "the restart")
        new = int(restarted.search(self.read_log()).group(1))
        self.pids.append(new)
        self.assertNotEqual(new, victim)
        self.assertFalse(gone(new))
        self.wait(lambda: self.read_log().count("authgateway started: worker 1,") == 2, "worker 1 again")
        before = self.read_log().count("worker=1] auth success")
        self.wait(lambda: (self.http(), self.read_log().count("worker=1] auth success") > before)[1],
                  "the new worker 1 to serve")

    def test_sigterm_stops_every_process(self) -> None:
        proc = self.start_workers()
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(60), 0, self.read_log()[-4000:])
        for pid in self.pids:
            self.wait(lambda: gone(pid), f"worker pid {pid} to end", timeout=10)
        log = self.read_log()
        for k, pid in enumerate(self.pids):
            self.assertIn(f"worker {k} (pid {pid}) stopped: exit code 0", log)
            self.assertIn(f"[gateway.ops.drain#info worker={k}] draining", log)

    def test_sighup_reaches_every_worker(self) -> None:
        proc = self.start_workers()
        proc.send_signal(signal.SIGHUP)
        for k in (0, 1):
            self.wait(lambda: f"[gateway.ops.reload#info worker={k}] reload: " in self.read_log(),
                      f"worker {k}'s reload")
        self.assertIsNone(proc.poll())

    def test_sigusr1_without_audit_log(self) -> None:
        """
        SIGUSR1 to the parent (twistd's --logfile rotation) is forwarded to
        workers with no --audit-log: they handle it (nothing to reopen),
        none dies of it.
        """
        proc = self.start_workers()
        proc.send_signal(signal.SIGUSR1)
        time.sleep(1.5)
        self.assertIsNone(proc.poll())
        self.assertNotIn("exited unexpectedly", self.read_log())
        self.assertFalse(any(gone(pid) for pid in self.pids), self.read_log()[-4000:])
        self.assertIn(b'"alice"', self.http())

    def test_signals_while_a_worker_starts(self) -> None:
        """
        SIGHUP and SIGUSR1 sent while a restarted worker is still starting
        (no handlers yet) are held for it, then delivered: it reloads, and
        is not killed by them.
        """
        proc = self.start_workers()
        os.kill(self.pids[0], signal.SIGKILL)
        restarted = re.compile(r"worker 0 restarted: pid (\d+)")
        self.wait(lambda: restarted.search(self.read_log()), "the restart", timeout=30)
        proc.send_signal(signal.SIGHUP)
        proc.send_signal(signal.SIGUSR1)
        self.pids.append(int(restarted.search(self.read_log()).group(1)))
        self.wait(lambda: self.read_log().count("authgateway started: worker 0,") == 2, "worker 0 again")
        self.wait(lambda: "[gateway.ops.reload#info worker=0] reload: " in self.read_log(),
                  "worker 0's held reload")
        time.sleep(0.5)
        log = self.read_log()
        self.assertNotIn("killed by SIGHUP", log)
        self.assertNotIn("killed by SIGUSR1", log)
        self.assertEqual(log.count("exited unexpectedly"), 1)
        self.assertEqual(log.count("[gateway.ops.reload#info worker=0] reload: "), 1)
        self.assertIsNone(proc.poll())

    def test_no_option_in_the_environment(self) -> None:
        """A worker's options (a password among them) are not in /proc/PID/environ."""
        self.start_workers()
        for pid in self.pids:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read()
            self.assertNotIn(b"wonder", environ)
            self.assertNotIn(b"memory:alice", environ)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                self.assertNotIn(b"wonder", f.read())

    def test_parent_killed(self) -> None:
        """The parent killed outright: its workers end by themselves."""
        proc = self.start_workers()
        proc.kill()
        proc.wait()
        for pid in self.pids:
            self.wait(lambda: gone(pid), f"worker pid {pid} to end", timeout=60)

    def test_workers_need_state(self) -> None:
        """--workers 2 without --state: refused at start, saying why."""
        proc = self.start(state=False)
        self.assertEqual(proc.wait(60), 1)
        error = proc.stderr.read().decode()
        self.assertIn("--workers 2 needs a shared --state", error)
