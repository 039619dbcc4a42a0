"""Test doubles shared by several test modules."""

from __future__ import annotations

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.internet import defer
from zope.interface import implementer


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


@implementer(ICredentialsChecker)
class FixedChecker:
    """Answers every credential with a fixed outcome and counts the calls."""

    def __init__(self, outcome, interfaces=(IUsernamePassword,)):
        self.outcome = outcome
        self.credentialInterfaces = interfaces
        self.calls = 0

    def requestAvatarId(self, credentials):
        self.calls += 1
        if isinstance(self.outcome, Exception):
            return defer.fail(self.outcome)
        return defer.succeed(self.outcome)
