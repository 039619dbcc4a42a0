# -*- test-case-name: tests.test_drain -*-
"""
Graceful drain: how the gateway stops (SIGTERM, or SIGINT: Ctrl-C).

The first signal begins the reactor's stop, so twistd's own shutdown path
runs the top service's C{stopService}, which hands its children to
L{Shutdown.stop}:

1. every listener stops at once: no new connection is accepted; the
   core's services that can (L{Delivery.drain<gateway.smtp.delivery.Delivery.drain>})
   take no new work from now on and learn the stop's deadline;
2. connections of trusted proxies still waiting for their PROXY header are
   aborted (they are no session yet; built now, one would never be asked to
   drain), and a header coming after that builds none;
   each front door's open sessions (L{Connections.sessions}) are asked to
   finish through their protocol's C{drain()} (SMTP: C{421 4.3.2} at the
   next command, after a message in DATA is spooled and acknowledged; HTTP:
   idle keep-alive connections and requests whose headers are still
   arriving close, requests in flight are answered with C{Connection:
   close}; SOCKS: negotiations close, tunnels run on), for at most
   C{--drain-timeout} seconds; what is left then is aborted. A session the
   gateway has closed and that has nothing left to send is finished: after
   L{CLOSED_GRACE} it is aborted rather than waiting for the peer's TLS
   C{close_notify} or FIN;
3. the core's services stop (delivery, the hash pool...); delivery waits
   for its relay sessions only until the drain's deadline plus
   L{SERVICES_GRACE};
4. a reactor turn later, the event sinks (L{stops_last}: the audit log, the
   metrics listener) stop, having received the others' last events.

A second signal aborts every session at once and stops waiting for
anything: the shutdown goes on immediately. Either way the process exits 0.
The signal handler itself also arms L{HardExit}, which ends the process with
C{os._exit(0)} if it is still there L{EXIT_GRACE} seconds after the drain's
deadline, or L{ABORT_EXIT_GRACE} seconds after a second signal: a thread
that never returns (a checker hung on its backend) cannot keep the process
alive, even while the reactor thread is blocked joining it.
Nothing accepted is lost, a hard exit included: a message is acknowledged
only once spooled (written, fsync'ed, renamed into place), a queue state is
saved the same way, one cut off in DATA was never acknowledged; only the
audit log's events of the turn the exit cut short can be missing.
"""

from __future__ import annotations

import os
import select
import signal
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

from twisted.application.service import IService
from twisted.internet import defer, error, task
from twisted.logger import Logger

from gateway.connections import Connections, door_protocol
from gateway.ops.signals import on_signal
from gateway.twistedinternals import closing_flushed

log = Logger()

#: Seconds the shutdown waits for aborted connections to be gone (they end
#: on the reactor's next turn; a transport that cannot abort closes instead).
ABORT_GRACE = 1.0

#: Seconds a session the gateway has closed, with nothing left to send, may
#: wait for its peer to close too (a TLS C{close_notify}, a FIN) during the
#: drain before it is aborted; it counts as finished.
CLOSED_GRACE = 1.0

#: How often the drain looks for such sessions.
CLOSED_POLL = 0.25

#: Seconds past the drain's deadline the core's services (delivery's relay
#: sessions) may take to stop.
SERVICES_GRACE = 2.0

#: Seconds past the drain's deadline after which L{HardExit} ends the process:
#: the aborted sessions' end (L{ABORT_GRACE}), the services (L{SERVICES_GRACE})
#: and the thread pools' joins, with room to spare. The service manager's
#: stop timeout must be above C{--drain-timeout} plus this.
EXIT_GRACE = 10.0

#: Seconds after a second signal after which L{HardExit} ends the process.
ABORT_EXIT_GRACE = 2.0


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
        #: The core's services (known once L{stop} is called).
        self._services: list[IService] = []
        #: Sessions closed by the gateway with nothing left to send: since when.
        self._closed_since: dict[Any, float] = {}

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
        self._abandon_services()
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
        self._services = list(services)
        return defer.ensureDeferred(self._stop(list(listeners), self._services))

    async def _stop(self, listeners: list[IService], services: list[IService]) -> None:
        deadline = self.reactor.seconds() + self.timeout
        for child in services:  # no new work (delivery) from now on
            begin = getattr(child, "drain", None)
            if begin is not None:
                begin(deadline + SERVICES_GRACE)
        await self._wait(_stop_all(listeners))
        await self._drain(deadline)
        sinks = [child for child in services if stops_last(child)]
        await self._wait(_stop_all(reversed([c for c in services if c not in sinks])))
        if sinks:
            # The event sinks last, a reactor turn later: what the stopped
            # services handed back from their threads (a hash pool's last
            # verdicts, by callFromThread) is published, and written, first.
            await self._wait(defer.Deferred(), 0)
            await self._wait(_stop_all(reversed(sinks)))

    def _abandon_services(self) -> None:
        """Services that can stop without waiting for their threads (the hash pool) will."""
        for child in self._services:
            abandon = getattr(child, "abandon", None)
            if abandon is not None:
                abandon()

    async def _drain(self, deadline: float) -> None:
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
            poll = task.LoopingCall(self._finish_closed)
            poll.clock = self.reactor
            poll.start(CLOSED_POLL, now=False)
            try:
                await self._wait(defer.DeferredList(closed), max(0.0, deadline - started))
            finally:
                poll.stop()
        if self._abort_sessions():
            self._abandon_services()  # the deadline cut sessions: their threads are not waited for
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

    def _finish_closed(self) -> None:
        """
        Abort the sessions the gateway has closed, with nothing left to send,
        that have waited L{CLOSED_GRACE} for their peer: they are finished
        (a TLS one waits for the peer's C{close_notify}, which a client that
        went idle may never send).
        """
        now = self.reactor.seconds()
        seen = {}
        for entries in self.connections.sessions.values():
            for entry in list(entries):
                if entry in self._cut_sessions or not closing_flushed(entry):
                    continue
                since = seen[entry] = self._closed_since.get(entry, now)
                if now - since >= CLOSED_GRACE:
                    self._cut_sessions.add(entry)  # not counted in cut: it had finished
                    entry.transport.abortConnection()
        self._closed_since = seen

    def _abort_sessions(self) -> int:
        """Abort every session still open (once each), counted in L{cut}; how many."""
        aborted = 0
        for door, entries in self.connections.sessions.items():
            for entry in list(entries):
                transport = getattr(entry, "transport", None)
                if transport is None or entry in self._cut_sessions:
                    continue
                self._cut_sessions.add(entry)
                self.cut[door] += 1
                aborted += 1
                abort = getattr(transport, "abortConnection", None)
                (abort or transport.loseConnection)()
        return aborted

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


def stops_last(child: IService) -> bool:
    """
    Whether C{child} is an event sink (the audit log, the metrics listener:
    C{stops_last = True}), stopped only once the other core services have
    stopped, so that their last events are kept and C{/readyz} answers until
    the end.
    """
    return bool(getattr(child, "stops_last", False))


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


class HardExit:
    """
    Bounds the process's exit: a daemon thread that calls C{exit(0)}
    (C{os._exit}) at the earliest deadline it was given unless the process
    ended first. L{arm} only writes 8 bytes to a pipe, so it is safe in a
    signal handler (no lock) and works while the reactor thread is blocked.
    Started once the reactor runs (after twistd's fork); armed before, it
    does nothing.
    """

    #: The one line written to standard error when the exit is forced.
    LINE = (b"authgateway: the stop did not end in time (a thread still busy?): exiting now;"
            b" everything accepted is on disk\n")

    def __init__(
        self, exit: Any = os._exit, clock: Any = time.monotonic, write: Any = os.write
    ) -> None:
        self._exit = exit
        self._clock = clock
        self._say = write
        self._read = self._write = -1
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the watchdog thread (once)."""
        if self._thread is None:
            self._read, self._write = os.pipe()
            os.set_blocking(self._write, False)
            self._thread = threading.Thread(target=self._run, name="authgateway-hard-exit",
                                            daemon=True)
            self._thread.start()

    def arm(self, seconds: float) -> None:
        """Exit within C{seconds} from now (or earlier, if armed so before)."""
        if self._write < 0:
            return
        try:
            os.write(self._write, struct.pack("d", seconds))
        except OSError:  # the pipe is full: it was armed many times already
            pass

    def _run(self) -> None:
        deadline: float | None = None
        while True:
            left = None if deadline is None else max(0.0, deadline - self._clock())
            ready, _, _ = select.select([self._read], [], [], left)
            if not ready:
                break
            data = os.read(self._read, 8 * 64)
            now = self._clock()
            for (seconds,) in struct.iter_unpack("d", data[: len(data) // 8 * 8]):
                deadline = min(deadline if deadline is not None else now + seconds, now + seconds)
        self._expire()

    def _expire(self) -> None:
        # Not through twisted.logger: this is the watchdog's thread, and log
        # observers are not thread-safe (the reactor thread may be in one).
        try:
            self._say(2, self.LINE)
        except OSError:  # no standard error: exiting anyway
            pass
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - best effort: exiting anyway
                pass
        self._exit(0)


def install(reactor: Any, shutdown: Shutdown, hard_exit: HardExit | None = None) -> None:
    """
    SIGTERM and SIGINT go to C{shutdown} (the reactor's own handlers are
    replaced, not chained: a second C{reactor.stop()} would fail), and arm
    C{hard_exit} from the handler itself: the first signal at the drain's
    deadline plus L{EXIT_GRACE}, the next ones L{ABORT_EXIT_GRACE} from
    then. Only when the reactor is not running yet (twistd): a test process
    running its reactor keeps its own handlers. One that comes before the
    reactor runs stops the gateway as soon as it runs (nothing was accepted
    yet); a second one before then ends the process at once (C{urgent}).
    """
    if getattr(reactor, "running", False):
        return
    watchdog = hard_exit if hard_exit is not None else HardExit()
    signals = [0]

    def arm() -> None:
        signals[0] += 1
        watchdog.arm(shutdown.timeout + EXIT_GRACE if signals[0] == 1 else ABORT_EXIT_GRACE)

    reactor.callWhenRunning(watchdog.start)
    for signum in (signal.SIGTERM, signal.SIGINT):
        on_signal(reactor, signum, shutdown.signalled, chain=False, urgent=True, immediate=arm)


__all__ = [
    "ABORT_EXIT_GRACE", "ABORT_GRACE", "CLOSED_GRACE", "EXIT_GRACE", "SERVICES_GRACE",
    "HardExit", "Shutdown", "install", "stops_last",
]
