# -*- test-case-name: tests.test_signals -*-
"""
Signal handlers that run in the reactor thread: SIGTERM (drain), SIGHUP
(reload), SIGUSR1 (reopen the audit log).

The reactor installs its own SIGINT/SIGTERM handlers when it starts, so
ours are installed once it runs (C{callWhenRunning}); a handler already in
place for the signal (twistd's SIGUSR1 log rotation) is still called after
ours. The handler itself only schedules C{callback} with C{callFromThread}
(and calls an C{immediate} action that takes no lock): nothing else is safe
in a signal handler.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any


def on_signal(
    reactor: Any, signum: int, callback: Callable[[], Any], chain: bool = True,
    immediate: Callable[[], Any] | None = None,
) -> None:
    """
    Call C{callback()} in the reactor thread on every C{signum}, from when
    the reactor runs; with C{chain}, the handler that was in place is called
    too. C{immediate()}, if given, runs in the signal handler itself, first:
    for what must happen even when the reactor thread is blocked (it must
    take no lock the interrupted code may hold).
    """

    def install() -> None:
        previous = signal.getsignal(signum)

        def handler(number: int, frame: Any) -> None:
            if immediate is not None:
                immediate()
            reactor.callFromThread(callback)
            if chain and callable(previous) and previous not in (signal.SIG_IGN, signal.SIG_DFL):
                previous(number, frame)

        signal.signal(signum, handler)

    reactor.callWhenRunning(install)


__all__ = ["on_signal"]
