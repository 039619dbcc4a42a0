# -*- test-case-name: tests.test_delivery -*-
"""
Delivery: the spool as a queue relayed to a smarthost (C{--relay}).

The service keeps an in-memory schedule of the queued messages (a heap of
C{(next_attempt, id)}), filled by the spool's commits (due at once) and by a
scan of the spool every C{scan_interval} (which also picks up what
C{authgateway queue} or another writer changed). At most C{connections}
relay connections carry the due messages, one after another on each. For
each message the service takes the message's lock (L{Queue.claim}), sends
its pending recipients, records each reply and saves the state durably
before the next message on that connection: a crash after the save never
re-sends to a recipient the relay accepted. What is still pending is tried
again with backoff and jitter until C{max_age}; a permanent failure bounces
to the sender (never for a null sender or a bounce); a finished message is
removed. The blocking file operations (claims, saves, removals, scans,
bounces) run in the spool's thread pool; the relay client reads the message
in 64 KiB chunks on the reactor thread as the connection takes them, as
Twisted's C{FileSender} does (the spool was just written: the page cache).
"""

from __future__ import annotations

import collections
import heapq
import random
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timezone
from typing import Any

import attrs
from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.fileio import reason
from gateway.smtp import relay
from gateway.smtp.queue import Claim, Queue, QueueError, QueueState
from gateway.smtp.relay import (
    RelayConnection,
    RelayError,
    RelaySettings,
    RelayTarget,
    SendResult,
)
from gateway.smtp.spool import Envelope, Spool, SpoolError
from gateway.text import parse_utc_timestamp, utc_timestamp

log = Logger()

#: Seconds between attempts to save a state (or remove a message) the disk
#: refused (ENOSPC, EIO), the last repeating: the message is never dropped.
SAVE_RETRY = (1.0, 5.0, 15.0, 60.0)

#: Longest C{last_error} kept in the state (several relays' failures).
MAX_ERROR = 512

#: The C{last_error} of a message whose pending recipients failed at C{max_age}.
EXPIRED = "delivery time expired"



@attrs.frozen
class DeliverySettings:
    """What the operator chose for relaying (C{--relay*} options)."""

    relay: RelaySettings
    #: Relay connections open at once.
    connections: int = 4
    #: Seconds before attempt 2, 3, ...; the last repeats.
    retry: tuple[float, ...] = (60.0, 300.0, 900.0, 3600.0)
    #: Seconds after its arrival a message's pending recipients fail.
    max_age: float = 5 * 86400.0
    #: Seconds between scans of the spool.
    scan_interval: float = 15.0
    #: Each retry delay is scaled by a random factor in [1 - jitter, 1 + jitter].
    jitter: float = 0.1
    #: Seconds a stop waits for the messages in flight (at most; a drain's
    #: deadline may leave less, L{Delivery.drain}).
    stop_timeout: float = 30.0
    #: New messages waiting for a connection before submissions are slowed
    #: to the relay's pace (None: four per connection, enough to keep each
    #: busy; more only adds queueing latency), and the longest one waits
    #: (L{Delivery.admit}; 0: never).
    inflow_limit: int | None = None
    inflow_delay: float = 1.0


def retry_delay(retry: Sequence[float], attempts: int, jitter: float, draw: float) -> float:
    """
    Seconds until attempt C{attempts + 1}: the schedule's entry for the
    attempts made (the last repeating), scaled by C{1 + jitter * (2 * draw - 1)}
    (C{draw} uniform in [0, 1)), so messages deferred together spread out.
    """
    base = retry[min(max(attempts, 1), len(retry)) - 1]
    return base * (1 + jitter * (2 * draw - 1))


def _unix_time(stamp: str) -> float:
    """A C{utc_timestamp} as a Unix time; ValueError when it is not one."""
    return parse_utc_timestamp(stamp).timestamp()


@attrs.frozen
class _Envelope:
    """What a delivery needs from a message's metadata, checked."""

    mail_from: str
    rcpt_to: tuple[str, ...]
    size: int
    auth: str | None
    protocol: str
    received_at: float

    @classmethod
    def of(cls, meta: dict[str, Any]) -> _Envelope:
        """The envelope of C{meta}; L{QueueError} naming the first bad field."""

        def field(name: str, kind: type | tuple[type, ...]) -> Any:
            value = meta.get(name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise QueueError(f"metadata field {name} is missing or malformed")
            return value

        rcpt_to = field("rcpt_to", list)
        if not rcpt_to or not all(isinstance(r, str) for r in rcpt_to):
            raise QueueError("metadata field rcpt_to is missing or malformed")
        try:
            received_at = _unix_time(field("received_at", str))
        except ValueError:
            raise QueueError("metadata field received_at is malformed") from None
        mail_auth = meta.get("mail_auth")
        authz_id = meta.get("authz_id")
        # RFC 4954 section 5: pass on the submitter the client named and we
        # believed, else the identity that submitted it; "<>" when neither.
        auth = mail_auth if isinstance(mail_auth, str) and mail_auth != "<>" else authz_id
        return cls(
            mail_from=field("mail_from", str),
            rcpt_to=tuple(rcpt_to),
            size=field("size", int),
            auth=auth if isinstance(auth, str) else None,
            protocol=field("protocol", str),
            received_at=received_at,
        )


def dsn_bounce(
    meta: dict[str, Any], message_path: str, failures: Sequence[tuple[str, str | None, str | None]],
    reporting_mta: str, now: datetime,
) -> tuple[Envelope, bytes]:
    """The envelope and bytes of a bounce of the message at C{message_path} (blocking)."""
    from gateway.smtp.dsn import bounce, read_headers

    return bounce(meta, read_headers(message_path), failures, reporting_mta, now)


class _RelaysFailed(Exception):
    """No relay target took a connection; the text names each one's error."""


class Delivery(service.Service):
    """
    Relays the queued messages of C{spool} to the targets of C{settings}.

    @param queue: the queue store on the spool's directory; its blocking
        calls run through C{spool.run}.
    @param hostname: the reporting MTA of bounces.
    @param connect: L{gateway.smtp.relay.connect}, or a test's double.
    @param wall_clock: the Unix time of the states' C{next_attempt}
        (default: the reactor's, which is C{time.time} outside tests).
    @param make_bounce: L{dsn_bounce}, or a test's double.
    """

    def __init__(
        self,
        reactor: Any,
        spool: Spool,
        queue: Queue,
        settings: DeliverySettings,
        hostname: str,
        connect: Callable[..., defer.Deferred[RelayConnection]] = relay.connect,
        wall_clock: Callable[[], float] | None = None,
        make_bounce: Callable[..., tuple[Envelope, bytes]] | None = None,
    ) -> None:
        self._make_bounce = make_bounce if make_bounce is not None else dsn_bounce
        self.reactor = reactor
        self.spool = spool
        self.queue = queue
        self.settings = settings
        self.hostname = hostname
        self._connect = connect
        self._now = wall_clock if wall_clock is not None else reactor.seconds
        self._random = random.Random()
        #: The schedule: a heap of (due, sequence, id); an entry counts only
        #: while _scheduled[id] is its due time (others are stale).
        self._heap: list[tuple[float, int, str]] = []
        self._scheduled: dict[str, float] = {}
        self._sequence = 0
        #: Messages taken by a connection (claimed or about to be), and when
        #: each is due again once that connection is done with it (None: when
        #: the scan says).
        self._active: dict[str, float | None] = {}
        self._workers: set[defer.Deferred[None]] = set()
        #: No new connection before this wall-clock time (every relay failed).
        self._paused_until = 0.0
        self._timer: Any = None
        self._scan_loop: task.LoopingCall | None = None
        self._stopping = False
        #: The reactor time by which a stop must be done (L{drain}), or None.
        self._deadline: float | None = None
        self._committed_during_scan: set[str] = set()
        #: New messages not taken by a connection yet, and the submissions
        #: waiting for that backlog to shrink (see L{admit}).
        self._fresh: set[str] = set()
        self._admission: collections.deque[defer.Deferred[None]] = collections.deque()
        #: For the metrics and readiness: messages per queue status at the
        #: last scan, recipients' outcomes (C{delivered}, C{failed},
        #: C{deferred}), connections opened (C{ok}) or failed on every
        #: target (C{failed}), bounces sent, and whether the last attempt to
        #: reach a relay succeeded (None: none made yet).
        self.states: dict[str, int] = {}
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.connects: collections.Counter[str] = collections.Counter()
        self.bounces = 0
        self.relay_reachable: bool | None = None

    def __repr__(self) -> str:
        return f"<Delivery {len(self._scheduled)} scheduled, {len(self._active)} in flight>"

    # The service.

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._deadline = None
        settings = self.settings.relay
        log.info(
            "delivery: relaying through {relays} ({connections} connections)",
            relays=", ".join(target.url for target in settings.targets),
            connections=self.settings.connections,
        )
        for target in settings.targets:
            if target.tls == "insecure":
                log.warn("delivery: {url}: TLS certificate not verified (tls=insecure)",
                         url=target.url)
            elif target.tls == "none" and settings.auth is not None:
                log.warn("delivery: {url}: relay password sent without TLS (tls=none)",
                         url=target.url)
        self.spool.committed.append(self._committed)
        self.spool.admission = self.admit
        self._scan_loop = task.LoopingCall(self._scan)
        self._scan_loop.clock = self.reactor
        self._scan_loop.start(self.settings.scan_interval, now=True)

    def drain(self, deadline: float) -> None:
        """
        The gateway began to stop (L{gateway.ops.drain}): no new message or
        connection from now on; the messages in flight may finish until
        C{deadline} (the reactor's time), which bounds L{stopService} too.
        """
        self._deadline = deadline
        self._quiesce()

    def _quiesce(self) -> None:
        """Take no new message and open no new connection; submissions wait for nothing."""
        self._stopping = True
        if self._committed in self.spool.committed:
            self.spool.committed.remove(self._committed)
        if self.spool.admission == self.admit:
            self.spool.admission = None
        while self._admission:
            self._admit_next()
        if self._scan_loop is not None and self._scan_loop.running:
            self._scan_loop.stop()
        self._disarm()

    def stopService(self) -> defer.Deferred[None]:
        """
        No new message or connection; waits for those in flight, for
        C{stop_timeout} seconds at most or until the drain's deadline
        (L{drain}), whichever comes first. Those still in flight then are
        cancelled: their claims are released, they are tried again later.
        """
        super().stopService()
        self._quiesce()
        if not self._workers:
            return defer.succeed(None)
        timeout = self.settings.stop_timeout
        if self._deadline is not None:
            timeout = max(0.0, min(timeout, self._deadline - self.reactor.seconds()))
        done = defer.DeferredList(list(self._workers), consumeErrors=True)
        late = self.reactor.callLater(timeout, self._late, done)
        done.addBoth(lambda result: late.cancel() if late.active() else None)
        return done

    def _late(self, done: defer.Deferred[Any]) -> None:
        """The stop's time is up: say how many messages were in flight, then cancel them."""
        log.warn("delivery: {n} message(s) still in flight at stop; they will be retried",
                 n=len(self._active))
        done.cancel()

    # The schedule.

    def _committed(self, id: str) -> None:
        """A new message in the spool: due at once."""
        self._committed_during_scan.add(id)
        self._fresh.add(id)
        self._schedule(id, self._now())  # after the retries already due, not before them
        self._pump()

    # In-flow control (Postfix's in_flow_delay).

    def admit(self) -> defer.Deferred[None] | None:
        """
        Whether a submission may start a new message now (None), or a
        Deferred firing when it may: once the connections have taken one of
        the new messages waiting for them, or after C{inflow_delay} seconds
        whatever happens. While C{inflow_limit} new messages wait,
        clients are thus held to the rate the relay takes them, and the
        queue stays bounded instead of growing with the submission rate; a
        relay that is down (every target failed) or a stop holds nobody.
        """
        settings = self.settings
        limit = settings.inflow_limit or 4 * settings.connections
        if (len(self._fresh) < limit or settings.inflow_delay <= 0
                or self._stopping or self._now() < self._paused_until):
            return None
        d: defer.Deferred[None] = defer.Deferred(lambda d: self._admission.remove(d))
        self._admission.append(d)
        d.addTimeout(settings.inflow_delay, self.reactor, onTimeoutCancel=lambda *_: None)
        return d

    def _admit_next(self) -> None:
        """The longest-waiting submission may go on."""
        while self._admission:
            d = self._admission.popleft()
            if not d.called:
                d.callback(None)
                return

    def _schedule(self, id: str, due: float) -> None:
        if id in self._active or self._scheduled.get(id) == due:
            return
        self._scheduled[id] = due
        self._sequence += 1
        heapq.heappush(self._heap, (due, self._sequence, id))

    def _forget(self, id: str) -> None:
        self._scheduled.pop(id, None)

    def _scan(self) -> defer.Deferred[None]:
        self._committed_during_scan = set()
        d = self.spool.run(self.queue.scan)
        d.addCallbacks(self._scanned, self._scan_failed)
        return d

    def _scanned(self, entries: Sequence[Any]) -> None:
        if self._stopping:
            return
        self.states = self.queue.counts(entries)
        present = set()
        for entry in entries:
            present.add(entry.id)
            if entry.held:
                self._forget(entry.id)
            else:
                self._schedule(entry.id, entry.next_attempt)
        # Messages committed while the scan ran may be missing from its listing.
        present |= self._committed_during_scan
        for id in list(self._scheduled):
            if id not in present:  # deleted, or finished by another consumer
                self._forget(id)
        # A new message held or deleted before a connection took it no
        # longer waits for one (else the in-flow gate would count it for ever).
        self._fresh.intersection_update(self._scheduled)
        if len(self._heap) > 2 * len(self._scheduled) + 64:
            self._heap = [e for e in self._heap if self._scheduled.get(e[2]) == e[0]]
            heapq.heapify(self._heap)
        self._pump()

    def _scan_failed(self, failure: Any) -> None:
        log.warn("delivery: cannot scan the spool: {error}", error=_why(failure.value))

    def _due(self) -> float | None:
        """The due time of the first live entry of the schedule."""
        while self._heap:
            due, _, id = self._heap[0]
            if self._scheduled.get(id) == due:
                return due
            heapq.heappop(self._heap)
        return None

    def _take(self) -> str | None:
        """The next due message, now taken by a connection; None if none is due."""
        if self._stopping:
            return None
        due = self._due()
        if due is None or due > self._now():
            return None
        _, _, id = heapq.heappop(self._heap)
        self._forget(id)
        self._active[id] = None
        if id in self._fresh:
            self._fresh.discard(id)
            self._admit_next()
        return id

    def _pump(self) -> None:
        """Open connections for the due messages, then wait for the next one."""
        self._disarm()
        if self._stopping:
            return
        now = self._now()
        while len(self._workers) < self.settings.connections and now >= self._paused_until:
            id = self._take()
            if id is None:
                break
            worker = defer.ensureDeferred(self._work(id))
            self._workers.add(worker)
            worker.addBoth(self._worker_done, worker)
        due = self._due()
        if due is None or len(self._workers) >= self.settings.connections:
            return  # a worker's end pumps again
        self._disarm()  # a worker that ended at once pumped (and armed) already
        self._timer = self.reactor.callLater(max(due, self._paused_until) - now, self._pump)

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _worker_done(self, result: Any, worker: defer.Deferred[None]) -> None:
        self._workers.discard(worker)
        if isinstance(result, Failure) and not result.check(defer.CancelledError):
            log.failure("delivery: a relay connection failed", result)
        self._pump()

    # One relay connection and the messages it carries.

    async def _work(self, id: str | None) -> None:
        """Carry due messages over one connection (opened when one needs it)."""
        connection: RelayConnection | None = None
        try:
            while id is not None:
                try:
                    connection = await self._deliver(id, connection)
                except defer.CancelledError:
                    raise  # a stop that could not wait longer
                except Exception:  # noqa: BLE001 - a bug: the next scan finds the message again
                    log.failure("delivery: attempt of {id} failed", id=id)
                    if connection is not None:
                        await self._quit(connection)
                        connection = None
                finally:
                    due = self._active.pop(id, None)
                    if due is not None:
                        self._schedule(id, due)
                if connection is None and self._now() < self._paused_until:
                    break  # every relay failed: the schedule waits for the pause
                id = self._take()
        finally:
            if connection is not None:
                await self._quit(connection)

    async def _deliver(
        self, id: str, connection: RelayConnection | None
    ) -> RelayConnection | None:
        """
        One attempt of message C{id}; returns the connection if it can carry
        another message.
        """
        # The connection first: the message stays unlocked (for the queue
        # command) while the relays are tried, which may take minutes.
        relays_failed: _RelaysFailed | None = None
        if connection is None:
            try:
                connection = await self._open()
            except _RelaysFailed as e:
                relays_failed = e
        try:
            claim = await self.spool.run(self.queue.claim, id)
        except (QueueError, OSError) as e:
            log.warn("delivery: cannot claim {id}: {error}", id=id, error=_why(e))
            return connection  # the next scan schedules it again
        if claim is None:  # locked elsewhere, gone, or quarantined: the scan looks again
            return connection
        keep_claim = False
        try:
            state = claim.state
            if state.held:
                return connection
            if state.next_attempt > self._now():  # a scan listed it before an attempt saved it
                self._active[id] = state.next_attempt
                return connection
            try:
                envelope = _Envelope.of(claim.meta)
            except QueueError as e:
                keep_claim = True  # the queue moves the files under this claim, then releases it
                await self._quarantine(id, str(e))
                return connection
            if not state.pending():  # a crash after the last save: finish the work
                keep_claim = True
                await self._conclude(claim, envelope)
                return connection
            if connection is not None and not connection.alive:
                # The relay closed it between messages: nothing of this one
                # was sent, so this is no attempt yet; a fresh connection.
                await self._quit(connection)
                connection = None
                try:
                    connection = await self._open()
                except _RelaysFailed as e:
                    relays_failed = e
            if connection is None:
                assert relays_failed is not None
                keep_claim = True
                self._defer_all(claim, str(relays_failed))
                await self._conclude(claim, envelope)
                return None
            while True:
                try:
                    result = await connection.send(
                        envelope.mail_from,
                        [envelope.rcpt_to[i] for i in state.pending()],
                        claim.message_path,
                        envelope.size,
                        envelope.auth,
                    )
                except OSError as e:  # the message file cannot be read: nothing was sent
                    keep_claim = True
                    await self._quarantine(id, f"cannot read the message: {reason(e)}")
                    return connection
                if result.usable or any(not reply.temporary for reply in result.replies):
                    break
                # The relay broke the session (421, lost, stalled) before any
                # recipient's outcome: the next target gets this attempt.
                try:
                    following = await self._open(after=connection.target)
                except _RelaysFailed:
                    break  # recorded below as this target's answer
                log.info("delivery: {id}: {url} broke the session ({reply}); trying {next}",
                         id=id, url=connection.target.url, reply=str(result.replies[0]),
                         next=following.target.url)
                await self._quit(connection)
                connection = following
            keep_claim = True
            self._apply(claim, connection.target.url, result)
            if not result.usable:
                await self._quit(connection)
                connection = None
            if not await self._conclude(claim, envelope) and connection is not None:
                await self._quit(connection)  # the disk is full: let the relay go
                connection = None
            return connection
        finally:
            if not keep_claim:
                await self._release(claim)

    async def _open(self, after: RelayTarget | None = None) -> RelayConnection:
        """
        A connection to the first target that takes one (failover in order),
        or to the first after C{after} that does (then a failure of them all
        pauses nothing: the targets before it took a connection).
        """
        targets = self.settings.relay.targets
        if after is not None:
            targets = targets[targets.index(after) + 1:]
            if not targets:
                raise _RelaysFailed("no further relay")
        errors = []
        for target in targets:
            try:
                connection = await self._connect(self.reactor, self.settings.relay, target)
                self.connects["ok"] += 1
                self.relay_reachable = True
                return connection
            except defer.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - RelayError, or a bug: try the next
                if not isinstance(e, RelayError):
                    log.failure("delivery: connecting to {url} failed", url=target.url)
                errors.append(f"{_why(e)} ({target.url})")
        message = "; ".join(errors)[:MAX_ERROR]
        if after is None:
            self.connects["failed"] += 1
            self.relay_reachable = False
            self._paused_until = self._now() + self.settings.retry[0]
            log.warn("delivery: no relay available, pausing {seconds:.0f} s: {errors}",
                     seconds=self.settings.retry[0], errors=message)
        raise _RelaysFailed(message)

    async def _quit(self, connection: RelayConnection) -> None:
        try:
            await connection.quit()
        except Exception:  # noqa: BLE001 - the connection is gone either way
            log.failure("delivery: QUIT to {url} failed", url=connection.target.url)

    # Applying the outcome.

    def _apply(self, claim: Claim, url: str, result: SendResult) -> None:
        """Record each pending recipient's reply: 2xx delivered, 5xx failed, else pending."""
        state = claim.state
        at = self._timestamp()
        errors = []
        for index, reply in zip(state.pending(), result.replies):
            recipient = state.recipients[index]
            recipient.relay = url
            recipient.reply = str(reply)
            recipient.at = at
            if 200 <= reply.code < 300:
                recipient.status = "delivered"
            else:
                if 500 <= reply.code < 600:
                    recipient.status = "failed"
                errors.append(str(reply))
            self.outcomes["deferred" if recipient.status == "pending" else recipient.status] += 1
        self._attempted(state, at, f"{errors[0]} ({url})" if errors else None)
        delivered = sum(r.status == "delivered" for r in state.recipients)
        log.info(
            "delivery: {id} via {url}: {delivered}/{total} delivered, {pending} pending, "
            "{failed} failed{error}",
            id=claim.id, url=url, delivered=delivered, total=len(state.recipients),
            pending=len(state.pending()), failed=len(state.failed()),
            error=f" ({errors[0]})" if errors else "",
        )

    def _defer_all(self, claim: Claim, error: str) -> None:
        """No relay took the message: everything pending stays so, with C{error}."""
        self._attempted(claim.state, self._timestamp(), error)
        self.outcomes["deferred"] += len(claim.state.pending())
        log.info("delivery: {id} deferred: {error}", id=claim.id, error=error)

    def _attempted(self, state: QueueState, at: str, error: str | None) -> None:
        state.first_attempt = state.first_attempt or at
        state.last_attempt = at
        if error is not None:
            state.last_error = error[:MAX_ERROR]

    def _reschedule(self, claim: Claim, envelope: _Envelope) -> None:
        """After an attempt with recipients still pending: retry later, or expire them."""
        state = claim.state
        state.attempts += 1
        now = self._now()
        if now >= envelope.received_at + self.settings.max_age:
            # Each keeps its last reply (a 4xx, or None): the bounce reports
            # an expiry (4.4.7) with what the relay said last.
            for index in state.pending():
                state.recipients[index].status = "failed"
            state.last_error = (EXPIRED + (f"; last: {state.last_error}"
                                           if state.last_error else ""))[:MAX_ERROR]
            log.info("delivery: {id}: delivery time expired", id=claim.id)
            return
        delay = retry_delay(self.settings.retry, state.attempts, self.settings.jitter,
                            self._random.random())
        state.next_attempt = now + delay

    async def _conclude(self, claim: Claim, envelope: _Envelope) -> bool:
        """
        Save the outcome (then release), or bounce and remove the finished
        message. Returns whether the disk took it at the first try.
        """
        state = claim.state
        if state.pending():
            self._reschedule(claim, envelope)
        first_try = True
        if state.pending():
            first_try = await self._persist(claim, self._save, "save the state of")
            await self._release(claim)
            if not state.held:
                self._active[claim.id] = state.next_attempt
            return first_try
        if (state.failed() and state.bounce_id is None and envelope.mail_from != ""
                and envelope.protocol != "DSN"):
            # The outcome first: a crash while the bounce is made never sends
            # to an accepted recipient again (at worst the bounce goes twice).
            first_try = await self._persist(claim, self._save, "save the state of")
            try:
                bounce = await self._make(claim)
            except ValueError as e:  # a sender no bounce can go to: trying again would not help
                log.warn("delivery: {id}: no bounce: {why}", id=claim.id, why=str(e))
            except Exception as e:  # noqa: BLE001 - the message cannot be read: keep it for a person
                log.failure("delivery: {id}: cannot make the bounce", id=claim.id)
                await self._quarantine(claim.id, f"cannot make the bounce: {_why(e)}")
                return first_try
            else:
                first_try = await self._persist(claim, lambda c: self._spool_bounce(c, *bounce),
                                                "bounce") and first_try
                first_try = await self._persist(claim, self._save, "save the state of") and first_try
        return await self._persist(claim, self._finish, "remove") and first_try

    async def _persist(
        self, claim: Claim, step: Callable[[Claim], Awaitable[Any]], what: str
    ) -> bool:
        """
        Run C{step(claim)} until the disk takes it: a full disk delays the
        queue, it never drops a message. Returns whether the first try worked.
        """
        failures = 0
        while True:
            try:
                await step(claim)
                return failures == 0
            except defer.CancelledError:
                raise  # a stop that could not wait longer: the claim is released, retried later
            except Exception as e:  # noqa: BLE001 - OSError, SpoolError: the disk refused
                delay = SAVE_RETRY[min(failures, len(SAVE_RETRY) - 1)]
                failures += 1
                log.warn("delivery: cannot {what} {id} (try {n}), again in {delay:.0f} s: "
                         "{error}", what=what, id=claim.id, n=failures, delay=delay,
                         error=_why(e))
                await task.deferLater(self.reactor, delay, lambda: None)

    def _save(self, claim: Claim) -> defer.Deferred[None]:
        return self.spool.run(claim.save)

    def _finish(self, claim: Claim) -> defer.Deferred[None]:
        return self.spool.run(claim.finish)

    def _make(self, claim: Claim) -> defer.Deferred[tuple[Envelope, bytes]]:
        """The bounce of the failed recipients (made in the thread pool: it reads the message)."""
        state = claim.state
        # A recipient without a reply (no relay ever answered) expired.
        failures = [
            (claim.meta["rcpt_to"][i], state.recipients[i].reply, state.recipients[i].relay)
            for i in state.failed()
        ]
        return self.spool.run(self._make_bounce, claim.meta, claim.message_path, failures,
                              self.hostname, self._datetime())

    async def _spool_bounce(self, claim: Claim, envelope: Envelope, message: bytes) -> None:
        """Commit the bounce to the spool (queued like any message), once."""
        state = claim.state
        if state.bounce_id is not None:  # spooled before a failed save
            return
        writer = self.spool.open()
        writer.write(message)
        state.bounce_id = await writer.finish(envelope, self._datetime())
        self.bounces += 1
        log.info("delivery: {id}: {n} recipient(s) failed, bounce {bounce} to the sender",
                 id=claim.id, n=len(state.failed()), bounce=state.bounce_id)

    async def _release(self, claim: Claim) -> None:
        try:
            await self.spool.run(claim.release)
        except Exception as e:  # noqa: BLE001 - closing a descriptor; the lock goes with it
            log.warn("delivery: releasing {id}: {error}", id=claim.id, error=_why(e))

    async def _quarantine(self, id: str, why: str) -> None:
        try:
            await self.spool.run(self.queue.quarantine, id, why)
        except Exception as e:  # noqa: BLE001 - logged; the scan will find it again
            log.warn("delivery: cannot quarantine {id} ({why}): {error}", id=id, why=why,
                     error=_why(e))

    def _datetime(self) -> datetime:
        return datetime.fromtimestamp(self._now(), timezone.utc)

    def _timestamp(self) -> str:
        return utc_timestamp(self._datetime())


def _why(e: BaseException) -> str:
    """One line on a failure: the exception's own text for ours, else the OS's reason."""
    if isinstance(e, (RelayError, QueueError, SpoolError, _RelaysFailed)):
        return str(e)
    return reason(e)
