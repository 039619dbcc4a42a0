# -*- test-case-name: tests.test_ratelog -*-
"""
The clock of an object built without one: C{time.monotonic} behind
C{IReactorTime.seconds}, so that a checker, verifier or log limiter used on
its own (in a unit test, under another twistd plugin) needs no reactor.
The gateway's service always passes its reactor; a test passes a
C{twisted.internet.task.Clock}.
"""

from __future__ import annotations

import time


class _Monotonic:
    """Only C{seconds()}: nothing built on it may schedule a call."""

    seconds = staticmethod(time.monotonic)

    def __repr__(self) -> str:
        return "MONOTONIC"


#: The default clock, read-only: C{MONOTONIC.seconds()}.
MONOTONIC = _Monotonic()

__all__ = ["MONOTONIC"]
