"""Test doubles shared by several test modules."""

from __future__ import annotations

from twisted.internet import defer


class ManualPool:
    """A hash pool whose jobs run when the test says so."""

    def __init__(self):
        self.jobs = []

    def run(self, f, *args):
        d = defer.Deferred()
        self.jobs.append((f, args, d))
        return d

    def finish_all(self):
        jobs, self.jobs = self.jobs, []
        for f, args, d in jobs:
            d.callback(f(*args))
