"""
The spool and the queue with several writers and several consumers: real
separate processes (L{tests.spool_processes}) on one spool directory, as
C{--workers N} or instances on shared storage run them. Every message
committed is delivered once to each recipient, none is lost, none is torn,
and no process's clean-up removes another's file in progress.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys

from twisted.trial.unittest import TestCase

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
