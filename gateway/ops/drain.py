# -*- test-case-name: tests.test_drain -*-
"""
Graceful drain: how the gateway stops (SIGTERM, or SIGINT: Ctrl-C).

The first signal begins the reactor's stop, so twistd's own shutdown path
runs the top service's C{stopService}, which hands its children to
L{Shutdown.stop}:

1. every listener stops at once: no new connection is accepted;
2. connections of trusted proxies still waiting for their PROXY header are
   aborted (they are no session yet; built now, one would never be asked to
   drain), and a header coming after that builds none;
   each front door's open sessions (L{Connections.sessions}) are asked to
   finish through their protocol's C{drain()} (SMTP: C{421 4.3.2} at the
   next command, after a message in DATA is spooled and acknowledged; HTTP:
   idle keep-alive connections close, requests in flight are answered with
   C{Connection: close}; SOCKS: negotiations and tunnels run on), for at
   most C{--drain-timeout} seconds; what is left then is aborted;
3. the core's services stop (delivery, the hash pool, the audit log...).

A second signal aborts every session at once and stops waiting for
anything: the shutdown goes on immediately. Either way the process exits 0.
Nothing accepted is lost: a message is acknowledged only once spooled, and
one cut off in DATA was never acknowledged.
"""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Iterable
from typing import Any

from twisted.application.service import IService
from twisted.internet import defer, error
from twisted.logger import Logger

from gateway.connections import Connections, door_protocol
from gateway.ops.signals import on_signal

log = Logger()

#: Seconds the shutdown waits for aborted connections to be gone (they end
#: on the reactor's next turn; a transport that cannot abort closes instead).
ABORT_GRACE = 1.0


class Shutdown:
    """
    The gateway's stop, in order: listeners, then the sessions' drain
    (bounded by C{timeout} seconds), then the core's services; L{abort}
    (a second signal) cuts it short.
    """

    def __init__(self, reactor: Any, connections: Connections, timeout: float = 30.0) -> None:
        self.reactor = reactor
        self.connections = connections
        self.timeout = timeout
        #: The stop has begun (a signal, or C{stopService}).
        self.stopping = False
        #: A second signal came: nothing is waited for any more.
        self.aborted = False
        #: Sessions ended by themselves and sessions aborted, per front door.
        self.drained: Counter[str] = Counter()
        self.cut: Counter[str] = Counter()
        self._waits: set[defer.Deferred[None]] = set()
        self._cut_sessions: set[Any] = set()

    def signalled(self) -> None:
        """SIGTERM or SIGINT: the first begins the reactor's stop, the next aborts."""
        if not self.stopping:
            self.stopping = True
            try:
                self.reactor.stop()
            except error.ReactorNotRunning:  # already on its way down: stopService drains
                pass
            return
        if not self.aborted:
            log.warn("signalled again: aborting every session, stopping now")
            self.abort()

    def abort(self) -> None:
        """Abort every open session and stop waiting (the drain or the services)."""
        self.aborted = True
        self._abort_sessions()
        for wait in list(self._waits):
            if not wait.called:
                wait.callback(None)

    def stop(self, listeners: Iterable[IService], services: Iterable[IService]) -> defer.Deferred[None]:
        """
        Stop C{listeners} (all at once), drain the sessions, then stop
        C{services} (the core's, in reverse order, as a C{MultiService}
        would); fires when done or abandoned by L{abort}.
        """
        self.stopping = True
        return defer.ensureDeferred(self._stop(list(listeners), list(services)))

    async def _stop(self, listeners: list[IService], services: list[IService]) -> None:
        await self._wait(_stop_all(listeners))
        await self._drain()
        await self._wait(_stop_all(reversed(services)))

    async def _drain(self) -> None:
        headers = self.connections.abort_headers()
        sessions = [
            (door, entry)
            for door, entries in self.connections.sessions.items()
            for entry in list(entries)
        ]
        per_door = Counter(door for door, _ in sessions)
        log.info(
            "draining {total} session(s) ({doors}) for up to {timeout:g} s"
            + ("; {headers} connection(s) waiting for a PROXY header aborted" if headers else ""),
            total=len(sessions), doors=_per_door(per_door), timeout=self.timeout, headers=headers,
        )
        started = self.reactor.seconds()
        closed = [self.connections.when_closed(entry) for _, entry in sessions]
        if not self.aborted:
            for door, entry in sessions:  # each waiter first: a drain may end its session at once
                ask = getattr(door_protocol(entry), "drain", None)
                if ask is not None:
                    try:
                        ask()
                    except Exception:  # noqa: BLE001 - one session's bug stops no drain
                        log.failure("{door} session failed to drain", door=door)
            await self._wait(defer.DeferredList(closed), self.timeout)
        self._abort_sessions()
        if not all(d.called for d in closed):  # aborted ones end on the next turn
            await self._wait(defer.DeferredList(closed), ABORT_GRACE, abortable=False)
        self.drained = per_door - self.cut
        log.info(
            "drain {how} after {seconds:.1f} s: {drained} session(s) finished, {aborted} aborted"
            " ({doors})",
            how="aborted" if self.aborted else "ended",
            seconds=self.reactor.seconds() - started,
            drained=sum(self.drained.values()),
            aborted=sum(self.cut.values()),
            doors=_per_door(self.cut),
        )

    def _abort_sessions(self) -> None:
        """Abort every session still open (once each), counted in L{cut}."""
        for door, entries in self.connections.sessions.items():
            for entry in list(entries):
                transport = getattr(entry, "transport", None)
                if transport is None or entry in self._cut_sessions:
                    continue
                self._cut_sessions.add(entry)
                self.cut[door] += 1
                abort = getattr(transport, "abortConnection", None)
                (abort or transport.loseConnection)()

    def _wait(
        self, d: defer.Deferred[Any], seconds: float | None = None, abortable: bool = True
    ) -> defer.Deferred[None]:
        """
        A Deferred firing when C{d} does, or after C{seconds}, or (if
        C{abortable}) on L{abort}; C{d}'s own result is dropped.
        """
        wait: defer.Deferred[None] = defer.Deferred()
        if abortable and self.aborted:
            wait.callback(None)
            return wait

        def done(_: Any = None) -> None:
            if not wait.called:
                wait.callback(None)

        d.addBoth(done)
        if seconds is not None and not wait.called:
            timer = self.reactor.callLater(seconds, done)
            wait.addBoth(lambda result: timer.cancel() if timer.active() else None)
        if abortable and not wait.called:
            self._waits.add(wait)
            wait.addBoth(lambda result: self._waits.discard(wait))
        return wait


def _stop_all(services: Iterable[IService]) -> defer.Deferred[Any]:
    """Stop C{services} at once; their failures are logged, not passed on."""

    def failed(reason: Any, child: IService) -> None:
        log.failure("stopping {service} failed", reason, service=child)

    stops = []
    for child in services:
        d = defer.maybeDeferred(child.stopService)
        d.addErrback(failed, child)
        stops.append(d)
    return defer.DeferredList(stops)


def _per_door(counts: Counter[str]) -> str:
    """C{smtp 2, http 1}: the non-zero counts, or C{none}."""
    return ", ".join(f"{door} {n}" for door, n in counts.items() if n) or "none"


def install(reactor: Any, shutdown: Shutdown) -> None:
    """
    SIGTERM and SIGINT go to C{shutdown} (the reactor's own handlers are
    replaced, not chained: a second C{reactor.stop()} would fail). Only when
    the reactor is not running yet (twistd): a test process running its
    reactor keeps its own handlers. One that comes before the reactor runs
    stops the gateway as soon as it runs (nothing was accepted yet); a
    second one before then ends the process at once (C{urgent}).
    """
    if getattr(reactor, "running", False):
        return
    for signum in (signal.SIGTERM, signal.SIGINT):
        on_signal(reactor, signum, shutdown.signalled, chain=False, urgent=True)


__all__ = ["ABORT_GRACE", "Shutdown", "install"]
