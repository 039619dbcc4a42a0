# -*- test-case-name: tests.test_signals -*-
"""
Signal handlers that run in the reactor thread: SIGTERM (drain), SIGHUP
(reload), SIGUSR1 (reopen the audit log).

Until the reactor runs, a signal's default action would end the process
(SIGHUP, SIGUSR1: terminate, and systemd counts a death by SIGHUP as a clean
exit, so it never restarts the gateway): L{on_signal} puts an L{_Early}
handler in place at once, which only records that the signal came. Once the
reactor runs (it installs its own SIGINT/SIGTERM handlers as it starts) the
real handler replaces it, and a signal that came before is handled then,
once. A handler already in place for the signal (twistd's SIGUSR1 log
rotation) is still called after ours. The handler itself only schedules
C{callback} with C{callFromThread} (and calls an C{immediate} action that
takes no lock): nothing else is safe in a signal handler.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType
from typing import Any, Union

#: What C{signal.getsignal} returns.
Handler = Union[Callable[[int, Union[FrameType, None]], Any], int, signal.Handlers, None]


def _callable(handler: Handler) -> bool:
    """A Python handler (not C{SIG_DFL}, C{SIG_IGN} or None) that can be chained."""
    return callable(handler) and handler not in (signal.SIG_IGN, signal.SIG_DFL)


class _Early:
    """
    The handler of C{signum} from L{on_signal} until the reactor runs: it
    records the signal instead of the default action (and calls the handler
    it replaced, with C{chain}). With C{urgent} (SIGTERM, SIGINT), a second
    signal before the reactor runs takes the default action at once: a
    start-up that hangs can still be stopped.

    False as a truth value, as C{SIG_DFL} is: code that installs its handler
    only over the default (twistd's SIGUSR1 log rotation, C{if not
    signal.getsignal(...)}) still does, and the real handler chains to it.
    """

    def __init__(self, signum: int, original: Handler, chain: bool, urgent: bool) -> None:
        self.signum = signum
        #: The handler in place before this one.
        self.original = original
        self.chain = chain
        self.urgent = urgent
        #: The signal came: the real handler acts on it once the reactor runs.
        self.pending = False

    def __call__(self, number: int, frame: FrameType | None) -> None:
        if self.pending and self.urgent:
            signal.signal(number, signal.SIG_DFL)
            signal.raise_signal(number)
            return
        self.pending = True
        if self.chain and _callable(self.original):
            self.original(number, frame)  # type: ignore[operator]

    def __bool__(self) -> bool:
        return False


def on_signal(
    reactor: Any,
    signum: int,
    callback: Callable[[], Any],
    chain: bool = True,
    urgent: bool = False,
    immediate: Callable[[], Any] | None = None,
) -> None:
    """
    Call C{callback()} in the reactor thread on every C{signum}; one that
    comes before the reactor runs is recorded at once (no default action)
    and acted on once when it runs. With C{chain}, the handler that was in
    place is called too; with C{urgent}, a second signal before the reactor
    runs takes the default action (L{_Early}). C{immediate()}, if given,
    runs in the signal handler itself, first (for a recorded signal: when
    it is acted on): for what must happen even when the reactor thread is
    blocked (it must take no lock the interrupted code may hold).
    """
    early = _Early(signum, signal.getsignal(signum), chain, urgent)
    signal.signal(signum, early)

    def install() -> None:
        previous = signal.getsignal(signum)
        while isinstance(previous, _Early):  # ours, or another on_signal's: chain past them
            previous = previous.original

        def handler(number: int, frame: FrameType | None) -> None:
            if immediate is not None:
                immediate()
            reactor.callFromThread(callback)
            if chain and _callable(previous):
                previous(number, frame)  # type: ignore[operator]

        signal.signal(signum, handler)
        if early.pending:
            if immediate is not None:
                immediate()
            reactor.callFromThread(callback)

    reactor.callWhenRunning(install)


__all__ = ["on_signal"]
