# -*- test-case-name: tests.test_ratelog -*-
"""
Log lines for refusals that an attacker can repeat at will (throttled logins,
a full hash queue, connections over a per-peer limit): at most one line per
key and interval, the next one saying how many were left out, so that 2,000
refused attempts do not become 2,000 log lines.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from gateway.clock import MONOTONIC


class LogRateLimiter:
    """
    Decides which of a flood of similar events gets a log line.

    @param interval: seconds between two lines for one key.
    @param max_keys: keys remembered at most; the least recently logged go
        first (their suppressed count is lost, never the bound).
    """

    def __init__(
        self, clock: IReactorTime | None = None, interval: float = 60.0, max_keys: int = 10_000
    ) -> None:
        if interval < 0 or max_keys < 1:
            raise ValueError("a log rate limit needs an interval >= 0 and at least one key")
        self.clock = clock if clock is not None else MONOTONIC
        self.interval = interval
        self.max_keys = max_keys
        #: key -> [time of its last line, events suppressed since]
        self._keys: OrderedDict[Hashable, list[Any]] = OrderedDict()

    def __repr__(self) -> str:
        return f"<LogRateLimiter keys={len(self._keys)} interval={self.interval}>"

    def admit(self, key: Hashable) -> int | None:
        """
        Whether this event for C{key} gets a line.

        @return: C{None} to leave it out (it is counted), or how many events
            for C{key} were left out since its last line.
        """
        now = self.clock.seconds()
        entry = self._keys.get(key)
        if entry is not None and now - entry[0] < self.interval:
            entry[1] += 1
            return None
        suppressed = entry[1] if entry is not None else 0
        self._keys[key] = [now, 0]
        self._keys.move_to_end(key)
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)
        return suppressed

    def warn(self, log: Logger, key: Hashable, format: str, **fields: Any) -> None:
        """C{log.warn(format, ...)} when L{admit} lets it through, with C{suppressed}."""
        suppressed = self.admit(key)
        if suppressed is not None:
            log.warn(format + suppressed_note(suppressed), suppressed=suppressed, **fields)


def suppressed_note(suppressed: int) -> str:
    """What to add to a line after which C{suppressed} similar ones were left out."""
    return " ({suppressed} more like it not logged)" if suppressed else ""


__all__ = ["LogRateLimiter", "suppressed_note"]
