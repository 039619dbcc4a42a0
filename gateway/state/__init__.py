# -*- test-case-name: tests.test_state -*-
"""
Where the gateway's limits live: in this process (the default), or in Redis
shared by every worker and every instance (C{--state redis://...}).

Two kinds of state are shared:

  - the throttle's counters (failures and attempts in flight per peer, per
    (user, peer) pair and per user, and known devices): L{State.throttle};
  - counted sessions (SOCKS sessions per user and per peer, and any future
    per-user quota): L{State.sessions}, leases taken with a limit and
    released when the session ends.

The verification cache is not state in this sense: it stays in each process,
because its HMAC key never leaves the process that made it.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import attrs
from twisted.internet import defer
from zope.interface import Interface, implementer

from gateway.errors import StateUnavailable

__all__ = ["ISessionLimits", "Lease", "LocalSessions", "State", "StateUnavailable", "open_state"]


class ISessionLimits(Interface):
    """Counted sessions: at most C{limit} at once per (scope, key)."""

    def acquire(scope: str, key: str, limit: int) -> defer.Deferred[Lease | None]:
        """
        Take one of C{limit} places of C{key} in C{scope} (C{"socks-user"},
        C{"socks-peer"}, ...).

        @return: a Deferred firing with a L{Lease}, or with None when all
            C{limit} places are taken; failing with L{StateUnavailable} when
            the shared state cannot be reached and the operator chose
            C{--state-failure closed}.
        """


class Lease:
    """One place taken by L{ISessionLimits.acquire}; L{release} gives it back (once)."""

    def __init__(self, release: Any) -> None:
        self._release = release

    def release(self) -> None:
        """Give the place back; later calls do nothing. Never raises, never waits."""
        release, self._release = self._release, None
        if release is not None:
            release()


@implementer(ISessionLimits)
class LocalSessions:
    """Session places counted in this process."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()

    def acquire(self, scope: str, key: str, limit: int) -> defer.Deferred[Lease | None]:
        name = (scope, key)
        if self.counts[name] >= limit:
            return defer.succeed(None)
        self.counts[name] += 1
        return defer.succeed(Lease(lambda: self._release(name)))

    def _release(self, name: tuple[str, str]) -> None:
        left = self.counts.pop(name, 1) - 1
        if left > 0:
            self.counts[name] = left


@attrs.define
class State:
    """The limits every front door shares (L{gateway.core.Core.state})."""

    #: The throttle the verification pipeline asks first.
    throttle: Any
    sessions: ISessionLimits = attrs.field(factory=LocalSessions)
    #: What the operator chose, for the start-up line and the metrics
    #: (C{local}, or the Redis URL without its password).
    name: str = "local"
    #: The service to run while the gateway runs (connects at start, closes
    #: at stop; L{gateway.core.Core.attach}), None for the in-process state.
    service: Any = None
    #: The connection to a shared back end (C{up}, C{errors}, C{fallback}),
    #: None for the in-process state.
    link: Any = None

    @property
    def up(self) -> bool:
        """Whether the limits are where the operator put them (always, for local)."""
        return self.link is None or self.link.up

    @property
    def errors(self) -> int:
        """Operations the shared back end did not do (unreachable, overdue, error replies)."""
        return 0 if self.link is None else self.link.errors

    @property
    def fallback(self) -> bool:
        """Whether this process's own limits stand in for the shared ones now."""
        return self.link is not None and self.link.fallback


def open_state(
    url: str, failure: str, throttle: Any, reactor: Any, password: str | None = None
) -> State:
    """
    The L{State} of C{--state URL} and C{--state-failure}: the in-process
    one for C{local}, else Redis (L{gateway.state.redis}) with C{throttle}
    (an in-process L{gateway.checkers.throttle.Throttle}) giving the limits
    and standing in under C{--state-failure local}; C{password}
    (C{--state-password-file}) is the Redis password when the URL has none.

    @raise ValueError: a bad URL or policy (the message never holds the password).
    """
    from gateway.state import redis  # hiredis only when asked for

    parsed = redis.parse_state_url(url)
    if failure not in redis.FAILURE_POLICIES:
        raise ValueError(f"--state-failure must be one of {', '.join(redis.FAILURE_POLICIES)}")
    if parsed is None:
        return State(throttle)
    if password is not None:
        parsed = attrs.evolve(parsed, password=password)
    link = redis.Link(parsed, reactor, failure)
    sessions = redis.RedisSessions(link, LocalSessions(), parsed.prefix)
    return State(
        redis.RedisThrottle(link, throttle, parsed.prefix), sessions, link.name,
        redis.StateService(link, sessions), link,
    )
