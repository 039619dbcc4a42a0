"""
Tests for L{gateway.ops.signals}: a signal that comes before the reactor runs
is recorded (the process survives it) and acted on once when it runs;
handlers in place are chained; an urgent signal's second arrival before the
reactor runs takes the default action.
"""

from __future__ import annotations

import os
import signal

from twisted.trial.unittest import SynchronousTestCase

from gateway.ops.signals import on_signal
from tests.support import keep_signal_handlers


class FakeReactor:
    """Runs its C{callWhenRunning} hooks when the test says; records C{callFromThread}."""

    def __init__(self) -> None:
        self.running = False
        self.hooks: list = []
        self.called: list = []

    def callWhenRunning(self, f, *args) -> None:
        if self.running:
            f(*args)
        else:
            self.hooks.append((f, args))

    def run(self) -> None:
        self.running = True
        hooks, self.hooks = self.hooks, []
        for f, args in hooks:
            f(*args)

    def callFromThread(self, f, *args) -> None:
        self.called.append(f)


def hangup() -> None:
    """Nothing: the callback the tests look for in C{called}."""


def other() -> None:
    """Another callback."""


class OnSignalTests(SynchronousTestCase):
    def setUp(self) -> None:
        keep_signal_handlers(self)
        self.addCleanup(signal.signal, signal.SIGWINCH, signal.getsignal(signal.SIGWINCH))
        self.reactor = FakeReactor()

    def kill(self, signum: int = signal.SIGHUP) -> None:
        os.kill(os.getpid(), signum)  # its handler has run when kill returns (main thread)

    def test_early_signal_recorded_then_once(self) -> None:
        """
        SIGHUPs before the reactor runs neither end the process (the default
        action would) nor call back yet; once it runs, one callback.
        """
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        on_signal(self.reactor, signal.SIGHUP, hangup)
        self.assertNotEqual(signal.getsignal(signal.SIGHUP), signal.SIG_DFL)
        self.kill()
        self.kill()
        self.assertEqual(self.reactor.called, [])
        self.reactor.run()
        self.assertEqual(self.reactor.called, [hangup])
        self.kill()
        self.assertEqual(self.reactor.called, [hangup, hangup])

    def test_no_early_signal(self) -> None:
        on_signal(self.reactor, signal.SIGHUP, hangup)
        self.reactor.run()
        self.assertEqual(self.reactor.called, [])
        self.kill()
        self.assertEqual(self.reactor.called, [hangup])

    def test_running(self) -> None:
        """In a running reactor the handler is the real one at once."""
        self.reactor.running = True
        on_signal(self.reactor, signal.SIGHUP, hangup)
        self.kill()
        self.assertEqual(self.reactor.called, [hangup])

    def test_chain_previous(self) -> None:
        """A handler in place before is called at each signal, early or not, once each."""
        calls: list = []
        signal.signal(signal.SIGUSR1, lambda n, f: calls.append(n))
        on_signal(self.reactor, signal.SIGUSR1, hangup)
        self.kill(signal.SIGUSR1)
        self.assertEqual(calls, [signal.SIGUSR1])
        self.reactor.run()
        self.kill(signal.SIGUSR1)
        self.assertEqual(calls, [signal.SIGUSR1] * 2)
        self.assertEqual(self.reactor.called, [hangup, hangup])

    def test_no_chain(self) -> None:
        calls: list = []
        signal.signal(signal.SIGUSR1, lambda n, f: calls.append(n))
        on_signal(self.reactor, signal.SIGUSR1, hangup, chain=False)
        self.kill(signal.SIGUSR1)
        self.reactor.run()
        self.kill(signal.SIGUSR1)
        self.assertEqual((calls, self.reactor.called), ([], [hangup, hangup]))

    def test_installed_over_default_only(self) -> None:
        """
        twistd installs its SIGUSR1 log rotation only over the default, after
        makeService: it still does, and our handler chains to it.
        """
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        on_signal(self.reactor, signal.SIGUSR1, hangup)
        rotations: list = []
        if not signal.getsignal(signal.SIGUSR1):  # twistd's UnixAppLogger._getLogObserver
            signal.signal(signal.SIGUSR1, lambda n, f: rotations.append(n))
        self.reactor.run()
        self.kill(signal.SIGUSR1)
        self.assertEqual(rotations, [signal.SIGUSR1])
        self.assertEqual(self.reactor.called, [hangup])

    def test_replaced_before_running(self) -> None:
        """
        The reactor puts its own SIGTERM handler over ours as it starts; ours
        replaces it, and an earlier signal is still acted on.
        """
        on_signal(self.reactor, signal.SIGTERM, hangup, chain=False, urgent=True)
        self.kill(signal.SIGTERM)
        reactors: list = []
        signal.signal(signal.SIGTERM, lambda n, f: reactors.append(n))
        self.reactor.run()
        self.assertEqual(self.reactor.called, [hangup])
        self.kill(signal.SIGTERM)
        self.assertEqual((reactors, self.reactor.called), ([], [hangup, hangup]))

    def test_two_on_one_signal(self) -> None:
        """Two callbacks for one signal: both run, early and later, each once."""
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        on_signal(self.reactor, signal.SIGUSR1, hangup)
        on_signal(self.reactor, signal.SIGUSR1, other)
        self.kill(signal.SIGUSR1)
        self.reactor.run()
        self.assertEqual(sorted(f.__name__ for f in self.reactor.called), ["hangup", "other"])
        self.reactor.called.clear()
        self.kill(signal.SIGUSR1)
        self.assertEqual(sorted(f.__name__ for f in self.reactor.called), ["hangup", "other"])

    def test_urgent_second_early_signal(self) -> None:
        """
        An urgent signal's second arrival before the reactor runs takes the
        default action at once (SIGWINCH's is to do nothing: the handler is
        the default again, and the process is still here to say so).
        """
        signal.signal(signal.SIGWINCH, signal.SIG_DFL)
        on_signal(self.reactor, signal.SIGWINCH, hangup, urgent=True)
        self.kill(signal.SIGWINCH)
        self.assertNotEqual(signal.getsignal(signal.SIGWINCH), signal.SIG_DFL)
        self.kill(signal.SIGWINCH)
        self.assertEqual(signal.getsignal(signal.SIGWINCH), signal.SIG_DFL)

    def test_not_urgent_repeats(self) -> None:
        signal.signal(signal.SIGWINCH, signal.SIG_DFL)
        on_signal(self.reactor, signal.SIGWINCH, hangup)
        for _ in range(3):
            self.kill(signal.SIGWINCH)
        self.assertNotEqual(signal.getsignal(signal.SIGWINCH), signal.SIG_DFL)
        self.reactor.run()
        self.assertEqual(self.reactor.called, [hangup])

    def test_immediate(self) -> None:
        """
        C{immediate} runs in the handler, first; for a signal recorded before
        the reactor runs, once, when it is acted on (a watchdog armed before
        the reactor runs would not count: see L{gateway.ops.drain.HardExit}).
        """
        order: list = []
        self.reactor.callFromThread = lambda f: order.append(f.__name__)
        on_signal(self.reactor, signal.SIGHUP, hangup, immediate=lambda: order.append("immediate"))
        self.kill()
        self.kill()
        self.assertEqual(order, [])
        self.reactor.run()
        self.assertEqual(order, ["immediate", "hangup"])
        self.kill()
        self.assertEqual(order, ["immediate", "hangup"] * 2)
