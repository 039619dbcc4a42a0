# -*- test-case-name: tests.test_metrics -*-
"""
L{Tally}: a histogram as plain numbers, for a component to keep on its hot
path without knowing about Prometheus (the metrics collector reads it at
scrape time). Used from one thread (the reactor's) only.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence


class Tally:
    """Counts of observations per bucket (upper bounds, inclusive), their number and sum."""

    __slots__ = ("bounds", "buckets", "count", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(sorted(bounds))
        #: Observations per bucket, not cumulative; the last one is +Inf.
        self.buckets = [0] * (len(self.bounds) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.buckets[bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus's buckets: (upper bound as text, observations at or below it), +Inf last."""
        out, total = [], 0
        for bound, n in zip((*(repr(float(b)) for b in self.bounds), "+Inf"), self.buckets):
            total += n
            out.append((bound, total))
        return out


#: Seconds: from cache hits and cheap hashes (sub-millisecond) to a throttled,
#: delayed failure (the failure delay reaches 15 s).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0, 30.0)

__all__ = ["LATENCY_BUCKETS", "Tally"]
