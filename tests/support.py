"""Test doubles and helpers shared by several test modules."""

from __future__ import annotations

import importlib
import os
import shutil
import socket

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.internet import defer
from twisted.trial.unittest import SkipTest
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


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _missing(what: str) -> None:
    """A skip on a laptop; under CI (CI=true) a missing tool is a failure."""
    if os.environ.get("CI") == "true":
        raise AssertionError(f"{what} is missing")
    raise SkipTest(f"{what} is not installed")


def require_tool(tool: str, package: str) -> str:
    """The path of the program C{tool} (from Debian package C{package})."""
    path = shutil.which(tool)
    if path is None:
        _missing(f"{tool} (Debian package {package})")
    return path


def require_module(module: str, package: str):
    """The Python module C{module} (from PyPI package C{package})."""
    try:
        return importlib.import_module(module)
    except ImportError:
        _missing(f"Python module {module} (PyPI package {package})")
