"""Test doubles and helpers shared by several test modules."""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import socket
import stat
import subprocess
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.internet import defer
from twisted.trial.unittest import SkipTest, SynchronousTestCase
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


#: bcrypt's cheapest cost, for tests that write users with L{add_user}.
CHEAP = {"scheme": "bcrypt", "cost": 4}

#: The password of users the store tests add.
PASSWORD = "Tr0ub4dor&3-in-tests"


def store_path(test: SynchronousTestCase, name: str = "store") -> str:
    """A path named C{name} (not created) in a new, empty directory of its own."""
    directory = test.mktemp()
    os.mkdir(directory)
    return os.path.join(directory, name)


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def stop_process(process: Any, timeout: float = 30.0) -> None:
    """Stop a process a test started: SIGTERM, SIGKILL after C{timeout} s; nothing if it has ended."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


def read_log(path: str) -> str:
    """A process's log file as text so far; empty while it does not exist."""
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def pump_handshake(client: Any, server: Any, rounds: int = 20) -> None:
    """
    Move a TLS handshake between two in-memory pyOpenSSL connections
    (client in connect state, server in accept state) for C{rounds} rounds:
    each side steps its handshake and hands its output to the other.
    """
    from OpenSSL import SSL

    for _ in range(rounds):
        for one, other in ((client, server), (server, client)):
            try:
                one.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                other.bio_write(one.bio_read(65536))
            except SSL.WantReadError:
                pass


def write_file(path: str, data: str | bytes, mode: int = 0o600) -> None:
    """Write C{data} (text as UTF-8) to C{path} by hand, in place, with C{mode}."""
    with open(path, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    os.chmod(path, mode)


def file_mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def victim_file(test: SynchronousTestCase, link: str | None = None) -> str:
    """
    A file elsewhere that a store must never be written through to (think
    /etc/shadow): C{root:x}, mode 0640, in a directory of its own; with a
    symbolic link to it at C{link}, if given.
    """
    directory = os.path.abspath(test.mktemp())
    os.makedirs(directory)
    target = os.path.join(directory, "shadow")
    write_file(target, "root:x\n", mode=0o640)
    if link is not None:
        os.symlink(target, link)
    return target


def planted_directory_link(test: SynchronousTestCase) -> tuple[str, str]:
    """
    A directory holding a C{users} file (C{keep:me}, mode 0644) and a
    symbolic link to it owned by uid 4242: what the owner of a data directory
    could plant to point a rewrite by root elsewhere. Giving a link to
    another owner needs root: the test is skipped for anyone else.

    @return: the real directory and the link.
    """
    if os.geteuid() != 0:
        raise SkipTest("giving a link to another owner needs root")
    base = os.path.abspath(test.mktemp())
    victim = os.path.join(base, "victim")
    os.makedirs(victim)
    write_file(os.path.join(victim, "users"), "keep:me\n", mode=0o644)
    link = os.path.join(base, "linkdir")
    os.symlink(victim, link)
    os.lchown(link, 4242, 4242)
    return victim, link


#: The signals the gateway handles (L{gateway.ops.signals.on_signal}).
GATEWAY_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


def keep_signal_handlers(test: SynchronousTestCase) -> None:
    """
    Restore this process's handlers of the gateway's signals after C{test}:
    C{makeService} puts its own in place at once (they record a signal until
    the reactor runs), and a test's reactor never runs them.
    """
    for signum in GATEWAY_SIGNALS:
        test.addCleanup(signal.signal, signum, signal.getsignal(signum))
