"""
The spool and the queue with several writers and several consumers: real
separate processes (L{tests.spool_processes}) on one spool directory, as
C{--workers N} or instances on shared storage run them. Every message
committed is delivered once to each recipient, none is lost, none is torn,
and no process's clean-up removes another's file in progress; with the
gateway's own delivery service in each process, relaying to one relay that
defers a recipient now and then, each recipient gets each message once.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys

from twisted.internet import defer, reactor, task, threads
from twisted.trial.unittest import TestCase

from tests.relay_support import start_relay
from tests.spool_processes import intact

WRITERS, CLAIMERS, MESSAGES = 3, 3, 40


def _run(*args: str) -> subprocess.Popen:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.Popen(
        [sys.executable, "-m", "tests.spool_processes", *args], cwd=root,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


class ConcurrentProcessesTests(TestCase):
    timeout = 300

    def test_writers_and_claimers(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        stop = os.path.join(directory + "-stop")
        claimers = [
            _run("claimer", directory, f"{directory}-claimer{k}", stop) for k in range(CLAIMERS)
        ]
        writers = [
            _run("writer", directory, str(MESSAGES), f"{directory}-writer{k}")
            for k in range(WRITERS)
        ]
        for process in writers:
            output, _ = process.communicate(timeout=240)
            self.assertEqual(process.returncode, 0, output.decode(errors="replace"))
        open(stop, "w").close()
        for process in claimers:
            output, _ = process.communicate(timeout=240)
            self.assertEqual(process.returncode, 0, output.decode(errors="replace"))

        written = []
        for k in range(WRITERS):
            with open(f"{directory}-writer{k}") as f:
                written += f.read().split("\n")[:-1]
        self.assertEqual([line for line in written if line.startswith("FAILED")], [])
        self.assertEqual(len(set(written)), WRITERS * MESSAGES)  # unique ids

        deliveries = collections.Counter()
        processes_of = collections.defaultdict(set)
        for k in range(CLAIMERS):
            with open(f"{directory}-claimer{k}") as f:
                for line in f:
                    id, recipient, whole = line.split()
                    self.assertEqual(whole, "ok", line)
                    deliveries[id, int(recipient)] += 1
                    processes_of[id].add(k)
        expected = {(id, r): 1 for id in written for r in (0, 1)}
        self.assertEqual(dict(deliveries), expected)  # each recipient once, none lost
        self.assertEqual(os.listdir(directory), [])  # nothing left, not even a temporary file

    @defer.inlineCallbacks
    def test_delivery_services(self):
        """Three workers, each spooling and running its delivery service over one spool."""
        relay = start_relay(self)
        # Now and then a recipient is deferred: its retry may be any worker's.
        relay.handler.rcpt["b@example.org"] = ["250 OK", "451 4.3.0 later", "250 OK"] * 20 + ["250 OK"]
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        stop = directory + "-stop"
        workers = [
            _run("gateway", directory, str(MESSAGES), f"{directory}-worker{k}", stop, relay.url())
            for k in range(WRITERS)
        ]

        def spooled() -> int:
            total = 0
            for k in range(WRITERS):
                try:
                    with open(f"{directory}-worker{k}") as f:
                        total += f.read().count("\n")
                except FileNotFoundError:
                    pass
            return total

        while spooled() < WRITERS * MESSAGES and all(p.poll() is None for p in workers):
            yield task.deferLater(reactor, 0.1, lambda: None)
        open(stop, "w").close()
        outputs = yield threads.deferToThread(
            lambda: [p.communicate(timeout=240)[0] for p in workers]
        )
        for process, output in zip(workers, outputs):
            self.assertEqual(process.returncode, 0, output.decode(errors="replace"))

        self.assertEqual(spooled(), WRITERS * MESSAGES)
        received = collections.Counter()
        for message in relay.handler.messages:
            self.assertTrue(intact(message.content), message.content[:200])
            subject = message.content.split(b"\r\n", 1)[0].removeprefix(b"Subject: ").decode()
            for rcpt in message.rcpt_tos:
                received[subject, rcpt] += 1
        expected = {
            (f"{p.pid}-{n}", r): 1
            for p in workers for n in range(MESSAGES) for r in ("a@example.net", "b@example.org")
        }
        self.assertEqual(dict(received), expected)  # each recipient once, none lost
        self.assertIn(["b@example.org"], [m.rcpt_tos for m in relay.handler.messages])  # retried
        self.assertEqual(os.listdir(directory), [])
