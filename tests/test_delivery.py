"""
Tests for L{gateway.smtp.delivery}: the schedule and state machine of the
relay queue, on a real L{Queue} in a temporary spool, a L{MemoryReactorClock}
and scripted relay connections.
"""

from __future__ import annotations

import errno
import json
import os
from datetime import datetime, timezone
from typing import Any

from twisted.internet import defer, task
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.internet.threads import deferToThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase

from gateway.smtp.delivery import Delivery, DeliverySettings, retry_delay
from gateway.smtp.queue import Queue
from gateway.smtp.relay import (
    RelayAuth,
    RelayError,
    RelaySettings,
    RelayTarget,
    Reply,
    SendResult,
    parse_relay,
)
from gateway.smtp.spool import Envelope, Spool

from .relay_support import make_ca, start_relay
from .test_spool import envelope, synchronous

#: Unix time the tests start at (2026-11-26T10:00:00Z).
START = 1795687200.0
BODY = b"Received: from client.example\r\n\tby gw.example with ESMTPSA id x; date\r\nSubject: hi\r\n\r\nbody\r\n"


def replies(*codes: int, usable: bool = True) -> SendResult:
    texts = {250: "2.0.0 Ok: queued", 451: "4.3.0 try later", 550: "5.1.1 no such user",
             452: "4.4.2 connection lost"}
    return SendResult(tuple(Reply(code, texts[code]) for code in codes), usable)


class FakeConnection:
    """A relay connection whose answers the test scripts (a Result, or a Deferred of one)."""

    def __init__(self, target: RelayTarget, script: list[Any]) -> None:
        self.target = target
        self.script = script
        self.sent: list[tuple[Any, ...]] = []
        self.bodies: list[bytes] = []
        self.quits = 0
        self.alive = True

    def send(self, mail_from, recipients, message_path, size, auth):
        self.sent.append((mail_from, tuple(recipients), message_path, size, auth))
        with open(message_path, "rb") as f:
            self.bodies.append(f.read())
        outcome = self.script.pop(0)
        if isinstance(outcome, defer.Deferred):
            return outcome
        return defer.succeed(outcome)

    def quit(self):
        self.quits += 1
        self.alive = False
        return defer.succeed(None)


class FakeRelays:
    """C{connect}: per target URL, a list of outcomes (a script of replies, or an exception)."""

    def __init__(self) -> None:
        self.outcomes: dict[str, list[Any]] = {}
        self.connections: list[FakeConnection] = []
        self.attempts: list[str] = []

    def __call__(self, reactor, settings, target):
        self.attempts.append(target.url)
        outcomes = self.outcomes.get(target.url) or [RelayError("connection refused")]
        outcome = outcomes.pop(0) if len(outcomes) > 1 else outcomes[0]
        if isinstance(outcome, Exception):
            return defer.fail(outcome)
        if isinstance(outcome, defer.Deferred):
            return outcome
        connection = FakeConnection(target, outcome)
        self.connections.append(connection)
        return defer.succeed(connection)

    def sends(self) -> list[tuple[Any, ...]]:
        return [s for c in self.connections for s in c.sent]

    def bodies(self) -> list[bytes]:
        return [b for c in self.connections for b in c.bodies]


def fake_bounce(meta, message_path, failures, reporting_mta, now):
    """Stands for L{gateway.smtp.delivery.dsn_bounce}: what it was asked, as the message."""
    with open(message_path, "rb") as f:
        headers = f.read().split(b"\r\n\r\n")[0]
    report = json.dumps({"failures": failures, "mta": reporting_mta, "id": meta["id"]})
    envelope = Envelope(mail_from="", rcpt_to=(meta["mail_from"],), helo=None, auth_info=None,
                        peer_address=None, peer_port=None, local_address=None, local_port=None,
                        tls=None, protocol="DSN")
    return envelope, report.encode() + b"\r\n" + headers + b"\r\n"


A = parse_relay("smtp://a.example")
B = parse_relay("smtp://b.example")


class DeliveryTestsMixin:
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(START)
        self.directory = self.mktemp()
        self.spool = Spool(self.directory, threadpool_runner=synchronous)
        self.queue = Queue(self.directory, clock=self.reactor.seconds)
        self.relays = FakeRelays()

    def start(self, targets=(A,), auth=None, make_bounce=fake_bounce, **changes: Any) -> Delivery:
        settings = DeliverySettings(relay=RelaySettings(tuple(targets), auth=auth), **changes)
        self.delivery = Delivery(self.reactor, self.spool, self.queue, settings, "gw.example",
                                 connect=self.relays, make_bounce=make_bounce)
        self.delivery.startService()
        self.addCleanup(self.stop)
        return self.delivery

    def stop(self) -> None:
        if self.delivery.running:
            self.delivery.stopService()

    def submit(self, received_at: datetime | None = None, **changes: Any) -> str:
        writer = self.spool.open()
        writer.write(BODY)
        when = received_at or datetime.fromtimestamp(self.reactor.seconds(), timezone.utc)
        return self.successResultOf(writer.finish(envelope(**changes), when))

    def path(self, id: str, extension: str) -> str:
        return os.path.join(self.directory, f"{id}.{extension}")

    def state(self, id: str) -> dict[str, Any]:
        with open(self.path(id, "state"), "rb") as f:
            return json.loads(f.read())

    def gone(self, id: str) -> bool:
        return not any(os.path.exists(self.path(id, e)) for e in ("json", "eml", "state"))


class DeliveryTests(DeliveryTestsMixin, SynchronousTestCase):
    def test_delivered(self):
        """Every recipient accepted: the message leaves the queue; the relay is told who sent it."""
        self.relays.outcomes[A.url] = [[replies(250, 250)]]
        self.start()
        id = self.submit()
        [(mail_from, rcpt, path, size, auth)] = self.relays.sends()
        self.assertEqual((mail_from, rcpt, size), ("sales@example.com",
                                                   ("a@example.net", "b@example.org"), len(BODY)))
        self.assertEqual(path, self.path(id, "eml"))
        self.assertEqual(auth, "sales@example.com")  # the AUTH= the client gave
        self.assertTrue(self.gone(id))
        self.assertEqual(self.relays.connections[0].quits, 1)  # nothing else due

    def test_auth_parameter(self):
        """Without a believed AUTH= from the client, the identity that submitted it is passed on."""
        self.relays.outcomes[A.url] = [[replies(250, 250), replies(250, 250)]]
        self.start(connections=1)
        self.submit(mail_auth="<>")
        self.submit(mail_auth=None, auth_info=None, protocol="ESMTP")
        self.assertEqual([s[4] for s in self.relays.sends()], ["sales", None])

    def test_existing_messages_at_start(self):
        """Messages spooled while the gateway was down are delivered by the first scan."""
        first, second = self.submit(), self.submit()
        self.relays.outcomes[A.url] = [[replies(250, 250), replies(250, 250)]]
        self.start(connections=1)
        self.assertTrue(self.gone(first) and self.gone(second))
        self.assertEqual(len(self.relays.connections), 1)  # one connection carried both

    def test_partial(self):
        """2xx delivered, 5xx failed, 4xx pending with a retry; only the pending one is sent again."""
        self.relays.outcomes[A.url] = [[replies(250, 451)], [replies(250)]]
        self.start()
        id = self.submit(rcpt_to=("a@example.net", "b@example.org"), mail_from="")
        state = self.state(id)
        self.assertEqual([r["status"] for r in state["recipients"]], ["delivered", "pending"])
        self.assertEqual(state["recipients"][0]["relay"], A.url)
        self.assertEqual(state["recipients"][0]["reply"], "250 2.0.0 Ok: queued")
        self.assertEqual(state["recipients"][1]["reply"], "451 4.3.0 try later")
        self.assertEqual(state["attempts"], 1)
        self.assertEqual(state["last_error"], f"451 4.3.0 try later ({A.url})")
        self.assertEqual(state["first_attempt"], "2026-11-26T10:00:00Z")
        self.assertTrue(START + 54 <= state["next_attempt"] <= START + 66)
        self.reactor.advance(state["next_attempt"] - START - 1)
        self.assertEqual(len(self.relays.sends()), 1)
        self.reactor.advance(1)
        self.assertEqual(self.relays.sends()[1][1], ("b@example.org",))
        self.assertTrue(self.gone(id))

    def test_retry_schedule(self):
        """Each delay is the schedule's entry for the attempts made (the last repeating), +-jitter."""
        retry = (60, 300, 900, 3600)
        self.assertEqual([retry_delay(retry, n, 0.1, 0.5) for n in range(1, 7)],
                         [60, 300, 900, 3600, 3600, 3600])
        self.assertAlmostEqual(retry_delay(retry, 2, 0.1, 0.0), 270)
        self.assertAlmostEqual(retry_delay(retry, 2, 0.1, 0.999999), 330, places=3)

    def test_backoff(self):
        """A relay answering 451 again and again: attempts are spaced by the schedule."""
        self.relays.outcomes[A.url] = [[replies(451)] for _ in range(5)]
        self.start(retry=(10.0, 100.0), jitter=0.0)
        id = self.submit(rcpt_to=("a@example.net",))
        times = []
        for expected in (1, 2, 3):
            state = self.state(id)
            self.assertEqual(state["attempts"], expected)
            times.append(state["next_attempt"] - self.reactor.seconds())
            self.reactor.advance(times[-1])
        self.assertEqual(times, [10.0, 100.0, 100.0])

    def test_max_age(self):
        """Still pending past the age limit: failed for good, bounced with the last reply."""
        self.relays.outcomes[A.url] = [[replies(250, 451), replies(250)]]
        self.start(max_age=3600.0)
        old = datetime.fromtimestamp(START - 3600, timezone.utc)
        id = self.submit(received_at=old)
        self.assertFalse(os.path.exists(self.path(id, "json")))
        [(sender, (bounced,), *_)] = self.relays.sends()[1:]  # the bounce
        self.assertEqual((sender, bounced), ("", "sales@example.com"))

    def test_bounce(self):
        """A 5xx: the message is finished and a DSN to the sender is queued and relayed."""
        self.relays.outcomes[A.url] = [[replies(250, 550), replies(250)]]
        self.start(make_bounce=None)  # the real one
        id = self.submit()
        self.assertTrue(self.gone(id))
        sends = self.relays.sends()
        self.assertEqual(sends[1][:2], ("", ("sales@example.com",)))
        self.assertIsNone(sends[1][4])  # a bounce has no submitter
        self.assertEqual(self.spool.ids(), [])
        dsn = self.relays.bodies()[1]
        self.assertIn(b"report-type=delivery-status", dsn)
        self.assertIn(b"Final-Recipient: rfc822; b@example.org", dsn)
        self.assertIn(b"Status: 5.1.1", dsn)
        self.assertIn(b"Diagnostic-Code: smtp; 550 5.1.1 no such user", dsn)
        self.assertIn(b"Remote-MTA: dns; a.example", dsn)
        self.assertIn(b"Subject: hi", dsn)  # the original headers
        self.assertNotIn(b"a@example.net", dsn.split(b"text/rfc822-headers")[0])

    def test_bounce_expired(self):
        """Recipients out of time are reported as expired (4.4.7) with the relay's last reply."""
        self.relays.outcomes[A.url] = [[replies(451), replies(250)]]
        self.start(make_bounce=None, max_age=60.0)
        self.submit(rcpt_to=("a@example.net",),
                    received_at=datetime.fromtimestamp(START - 60, timezone.utc))
        dsn = self.relays.bodies()[1]
        self.assertIn(b"Status: 4.4.7", dsn)
        self.assertIn(b"Diagnostic-Code: smtp; 451 4.3.0 try later", dsn)

    def test_no_bounce(self):
        """No bounce for the null sender, nor for a bounce."""
        self.relays.outcomes[A.url] = [[replies(550), replies(550)]]
        self.start()
        first = self.submit(mail_from="", rcpt_to=("a@example.net",))
        second = self.submit(protocol="DSN", mail_from="", auth_info=None,
                             rcpt_to=("a@example.net",))
        self.assertTrue(self.gone(first) and self.gone(second))
        self.assertEqual(len(self.relays.sends()), 2)

    def test_failover(self):
        """The first target refuses: the second takes the connection and is recorded."""
        self.relays.outcomes[A.url] = [RelayError("connection refused")]
        self.relays.outcomes[B.url] = [[replies(250, 451)]]
        self.start(targets=(A, B))
        id = self.submit()
        self.assertEqual(self.relays.attempts, [A.url, B.url])
        self.assertEqual(self.state(id)["recipients"][0]["relay"], B.url)

    def test_failover_mid_session(self):
        """
        A relay that breaks the session before any recipient's outcome (421,
        lost): the next target gets the same attempt; one that answered a
        recipient, or the last target, keeps it.
        """
        self.relays.outcomes[A.url] = [[replies(452, 452, usable=False)],
                                       [replies(250, 452, usable=False)],
                                       [replies(452, usable=False)]]
        self.relays.outcomes[B.url] = [[replies(250, 250)], [replies(452, usable=False)]]
        self.start(targets=(A, B), connections=1)
        moved = self.submit()
        self.assertEqual(self.relays.attempts, [A.url, B.url])
        self.assertTrue(self.gone(moved))
        partly = self.submit()  # a answered: no failover, b waits for its retry
        self.assertEqual(self.relays.attempts[2:], [A.url])
        self.assertEqual([r["status"] for r in self.state(partly)["recipients"]],
                         ["delivered", "pending"])
        last = self.submit(rcpt_to=("a@example.net",))  # both break: recorded as the last one's
        self.assertEqual(self.relays.attempts[3:], [A.url, B.url])
        self.assertEqual(self.state(last)["recipients"][0]["relay"], B.url)
        self.assertEqual(self.delivery._paused_until, 0.0)  # both took a connection

    def test_no_relay(self):
        """Every target fails: the message is deferred with their errors; no new connection for a while."""
        self.start(targets=(A, B), retry=(60.0,), jitter=0.0)
        id = self.submit()
        state = self.state(id)
        self.assertEqual(state["attempts"], 1)
        self.assertEqual(state["last_error"],
                         f"connection refused ({A.url}); connection refused ({B.url})")
        self.assertEqual([r["status"] for r in state["recipients"]], ["pending", "pending"])
        self.assertEqual(state["next_attempt"], START + 60)
        other = self.submit()
        self.reactor.advance(30)
        self.assertEqual(self.relays.attempts, [A.url, B.url])  # paused
        self.assertFalse(os.path.exists(self.path(other, "state")))
        self.relays.outcomes[A.url] = [[replies(250, 250), replies(250, 250)]]
        self.reactor.advance(30)
        self.assertTrue(self.gone(id) and self.gone(other))

    def test_connections_bounded(self):
        """At most --relay-connections connections; each carries the next due message."""
        pending = [defer.Deferred() for _ in range(5)]
        self.relays.outcomes[A.url] = [pending[0:1] + pending[2:4], pending[1:2] + pending[4:]]
        self.start(connections=2)
        ids = [self.submit(rcpt_to=("a@example.net",)) for _ in range(5)]
        self.assertEqual(len(self.relays.connections), 2)
        self.assertEqual(len(self.relays.sends()), 2)
        for d in pending:
            d.callback(replies(250))
        self.assertEqual(len(self.relays.connections), 2)
        self.assertTrue(all(self.gone(id) for id in ids))
        self.assertEqual([c.quits for c in self.relays.connections], [1, 1])

    def test_saved_before_next_message(self):
        """The outcome is durable before the connection carries the next message."""
        first = defer.Deferred()
        self.relays.outcomes[A.url] = [[first, replies(250)]]
        self.start(connections=1)
        a = self.submit(rcpt_to=("a@example.net", "b@example.org"))
        b = self.submit(rcpt_to=("c@example.org",))
        seen = []
        connection = self.relays.connections[0]
        send = connection.send

        def spy(*args):
            seen.append(self.state(a)["recipients"][0]["status"])
            return send(*args)

        connection.send = spy
        first.callback(replies(250, 451))
        self.assertEqual(seen, ["delivered"])
        self.assertTrue(self.gone(b))

    def test_lost_connection(self):
        """A connection that cannot go on is closed; the next message opens a new one."""
        self.relays.outcomes[A.url] = [[replies(452, usable=False)], [replies(250)]]
        self.start(connections=1)
        first = self.submit(rcpt_to=("a@example.net",))
        second = self.submit(rcpt_to=("a@example.net",))
        self.assertEqual(self.state(first)["recipients"][0]["status"], "pending")
        self.assertTrue(self.gone(second))
        self.assertEqual(len(self.relays.connections), 2)
        self.assertEqual(self.relays.connections[0].quits, 1)

    def test_full_disk(self):
        """A save the disk refuses keeps the claim and is tried again; nothing is lost or re-sent."""
        self.relays.outcomes[A.url] = [[replies(250, 451)]]
        saves = []
        claim = self.queue.claim

        def claiming(id):
            c = claim(id)
            if c is not None:
                save = c.save

                def full():
                    saves.append(id)
                    if len(saves) < 3:
                        raise OSError(errno.ENOSPC, "No space left on device")
                    save()

                c.save = full
            return c

        self.queue.claim = claiming
        self.start()
        id = self.submit()
        self.assertEqual(len(saves), 1)
        self.assertFalse(os.path.exists(self.path(id, "state")))
        self.assertIsNone(claim(id))  # still ours
        self.reactor.advance(1)
        self.reactor.advance(5)
        self.assertEqual(len(saves), 3)
        self.assertEqual(self.state(id)["recipients"][0]["status"], "delivered")
        self.assertEqual(len(self.relays.sends()), 1)
        released = claim(id)
        self.assertIsNotNone(released)
        released.release()

    def test_held_and_locked(self):
        """A held message waits; a message locked by someone else is looked at again later."""
        self.relays.outcomes[A.url] = [[replies(250, 250), replies(250, 250)]]
        held = self.submit()
        with self.queue.claim(held) as c:
            c.state.held = True
            c.save()
        locked = self.submit()
        other = Queue(self.directory)
        lock = other.claim(locked)
        self.start(scan_interval=15.0)
        self.assertEqual(self.relays.sends(), [])
        lock.release()
        self.reactor.advance(15)
        self.assertTrue(self.gone(locked))
        with other.claim(held) as c:
            c.state.held = False
            c.save()
        self.reactor.advance(15)
        self.assertTrue(self.gone(held))

    def test_quarantine(self):
        """A message whose state cannot be parsed is quarantined; the others go on."""
        self.relays.outcomes[A.url] = [[replies(250, 250)]]
        bad = self.submit()
        with open(self.path(bad, "state"), "wb") as f:
            f.write(b"{not json")
        good = self.submit()
        self.start()
        self.assertTrue(self.gone(bad) and self.gone(good))
        self.assertTrue(os.path.exists(os.path.join(self.directory, "quarantine", f"{bad}.json")))
        self.assertEqual(len(self.relays.sends()), 1)

    def test_outcome_saved_before_the_bounce(self):
        """
        The recipients' outcome is durable before the bounce is made: a crash
        while bouncing never sends to the accepted recipient again.
        """
        self.relays.outcomes[A.url] = [[replies(250, 550), replies(250)]]  # then the bounce
        seen: list[list[str]] = []

        def bounce(meta, *args):
            seen.append([r["status"] for r in self.state(meta["id"])["recipients"]])
            return fake_bounce(meta, *args)

        self.start(make_bounce=bounce)
        self.submit(rcpt_to=("a@example.net", "b@example.org"))
        self.assertEqual(seen, [["delivered", "failed"]])

    def test_bounce_cannot_be_made(self):
        """A bounce that cannot be made (the message unreadable) quarantines the message; the queue goes on."""
        self.relays.outcomes[A.url] = [[replies(550), replies(250)]]

        def unreadable(*args):
            raise PermissionError(errno.EACCES, "Permission denied")

        self.start(connections=1, make_bounce=unreadable)
        bad = self.submit(rcpt_to=("a@example.net",))
        good = self.submit(rcpt_to=("a@example.net",))
        self.assertTrue(self.gone(bad) and self.gone(good))
        quarantined = os.path.join(self.directory, "quarantine", f"{bad}.state")
        with open(quarantined, "rb") as f:
            self.assertEqual(json.loads(f.read())["recipients"][0]["status"], "failed")
        self.assertEqual(len(self.flushLoggedErrors(PermissionError)), 1)

    def test_unreadable_message(self):
        """A message file the relay client cannot open: quarantined, the connection carries the next one."""
        self.relays.outcomes[A.url] = [[replies(250)]]
        self.start(connections=1)
        real_send = FakeConnection.send

        def send(connection, mail_from, recipients, message_path, *rest):
            if message_path.endswith(f"{bad}.eml"):
                return defer.fail(PermissionError(errno.EACCES, "Permission denied"))
            return real_send(connection, mail_from, recipients, message_path, *rest)

        self.patch(FakeConnection, "send", send)
        bad = "not yet"
        first = defer.Deferred()
        self.relays.outcomes[A.url] = [[first, replies(250)]]
        busy = self.submit(rcpt_to=("a@example.net",))
        bad = self.submit(rcpt_to=("a@example.net",))
        good = self.submit(rcpt_to=("a@example.net",))
        first.callback(replies(250))
        self.assertTrue(self.gone(busy) and self.gone(bad) and self.gone(good))
        self.assertTrue(os.path.exists(os.path.join(self.directory, "quarantine", f"{bad}.eml")))
        self.assertEqual(len(self.relays.connections), 1)

    def test_unlocked_while_connecting(self):
        """The message is not locked while the relays are tried: the queue command can take it."""
        connecting = defer.Deferred()
        self.relays.outcomes[A.url] = [connecting]
        self.start()
        id = self.submit(rcpt_to=("a@example.net",))
        claim = Queue(self.directory).claim(id)
        self.assertIsNotNone(claim)
        claim.release()

    def test_retries_before_new_mail(self):
        """A retry already due goes before a message that arrived after it was due."""
        busy = defer.Deferred()
        self.relays.outcomes[A.url] = [[replies(451), busy, replies(250), replies(250)]]
        self.start(connections=1, retry=(60.0,), jitter=0.0)
        retried = self.submit(rcpt_to=("a@example.net",))  # 451: due again at +60
        self.reactor.advance(59)
        self.submit(rcpt_to=("b@example.org",))  # the connection waits on it until +62
        self.reactor.advance(2)
        self.submit(rcpt_to=("c@example.org",))  # new at +61, after the retry came due
        self.reactor.advance(1)
        busy.callback(replies(250))
        self.assertEqual([s[1] for s in self.relays.sends()],
                         [("a@example.net",), ("b@example.org",), ("a@example.net",),
                          ("c@example.org",)])
        self.assertTrue(self.gone(retried))

    def test_relay_closed_between_messages(self):
        """
        A relay that closed the connection after a message: the next message
        goes on a fresh connection, as no attempt (nothing of it was sent).
        """
        first = defer.Deferred()
        self.relays.outcomes[A.url] = [[first], [replies(250)]]
        self.start(connections=1)
        self.submit(rcpt_to=("a@example.net",))
        second = self.submit(rcpt_to=("b@example.org",))
        connection = self.relays.connections[0]
        connection.alive = False  # closed by the relay after its 250
        first.callback(replies(250))
        self.assertEqual(len(self.relays.connections), 2)
        self.assertEqual([len(c.sent) for c in self.relays.connections], [1, 1])
        self.assertTrue(self.gone(second))

    def test_crash_after_last_save(self):
        """A state with nothing pending (the process died before removing it): finished, not re-sent."""
        id = self.submit(mail_from="")
        with self.queue.claim(id) as c:
            for r in c.state.recipients:
                r.status = "delivered"
            c.save()
        self.start()
        self.assertTrue(self.gone(id))
        self.assertEqual(self.relays.sends(), [])  # (a connection is opened before the claim)

    def test_stop_waits(self):
        """Stopping takes no new message and waits (bounded) for the one in flight."""
        first = defer.Deferred()
        self.relays.outcomes[A.url] = [[first]]
        self.start(connections=1, stop_timeout=30.0)
        a = self.submit(rcpt_to=("a@example.net",))
        b = self.submit(rcpt_to=("a@example.net",))
        stopped = self.delivery.stopService()
        self.assertNoResult(stopped)
        first.callback(replies(250))
        self.successResultOf(stopped)
        self.assertTrue(self.gone(a))
        self.assertFalse(self.gone(b))
        self.assertEqual(len(self.relays.sends()), 1)

    def test_stop_bounded(self):
        """A relay that never answers does not hold the stop beyond its bound."""
        self.relays.outcomes[A.url] = [[defer.Deferred()]]
        self.start(stop_timeout=30.0)
        id = self.submit(rcpt_to=("a@example.net",))
        stopped = self.delivery.stopService()
        self.reactor.advance(29)
        self.assertNoResult(stopped)
        self.reactor.advance(1)
        self.successResultOf(stopped)
        self.assertIsNotNone(self.queue.claim(id))  # released: retried at the next start

    def test_stop_counts_what_it_cancels(self):
        """The stop's warning counts the messages still in flight, before cancelling them."""
        self.relays.outcomes[A.url] = [[defer.Deferred()]]
        self.start(stop_timeout=5.0)
        self.submit(rcpt_to=("a@example.net",))
        stopped = self.delivery.stopService()
        with capturedLogs() as logged:
            self.reactor.advance(5)
        self.successResultOf(stopped)
        [warning] = [e for e in logged if "still in flight" in e.get("log_format", "")]
        self.assertEqual(warning["n"], 1)

    def test_drain_deadline(self):
        """
        The drain's start takes no new message (the one in flight goes on),
        and the stop waits only until the drain's deadline, not stop_timeout.
        """
        first = defer.Deferred()
        self.relays.outcomes[A.url] = [[first]]
        self.start(connections=1, stop_timeout=30.0)
        a = self.submit(rcpt_to=("a@example.net",))
        self.delivery.drain(self.reactor.seconds() + 8)
        b = self.submit(rcpt_to=("a@example.net",))
        self.reactor.advance(3)
        self.assertEqual(len(self.relays.sends()), 1)  # b is not taken
        stopped = self.delivery.stopService()
        self.reactor.advance(4.9)
        self.assertNoResult(stopped)
        self.reactor.advance(0.1)
        self.successResultOf(stopped)
        self.assertIsNotNone(self.queue.claim(a))  # released: retried at the next start
        self.assertFalse(self.gone(b))
        self.assertEqual(len(self.relays.sends()), 1)

    def test_inflow(self):
        """
        Past inflow_limit new messages waiting for a connection, a submission
        waits until a connection takes one, or inflow_delay at most; a relay
        that is down holds nobody; a stop lets everyone go.
        """
        first, second = defer.Deferred(), defer.Deferred()
        self.relays.outcomes[A.url] = [[first, second, replies(250)]]
        self.start(connections=1, inflow_limit=2, inflow_delay=1.0)
        self.assertIsNone(self.spool.admit())
        self.submit(rcpt_to=("a@example.net",))  # taken at once: the connection waits on it
        self.submit(rcpt_to=("a@example.net",))
        self.assertIsNone(self.spool.admit())
        self.submit(rcpt_to=("a@example.net",))
        held, timed = self.spool.admit(), self.spool.admit()
        self.reactor.advance(0.5)
        self.assertNoResult(held)
        first.callback(replies(250))  # the connection takes the next one: one submission may go
        self.assertIsNone(self.successResultOf(held))
        self.assertNoResult(timed)
        self.reactor.advance(0.5)
        self.assertIsNone(self.successResultOf(timed))  # inflow_delay is the longest wait
        second.callback(replies(250))
        self.assertEqual(len(self.relays.sends()), 3)
        late = [self.spool.admit() for _ in range(2)]
        self.assertEqual(late, [None, None])  # nothing waits for a connection now
        self.delivery.stopService()
        self.assertIsNone(self.spool.admission)

    def test_inflow_forgets_held_and_deleted(self):
        """New messages held or deleted before a connection took them stop counting at the next scan."""
        busy = defer.Deferred()
        self.relays.outcomes[A.url] = [[busy]]
        self.start(connections=1, inflow_limit=2)
        self.submit(rcpt_to=("a@example.net",))  # the only connection waits on it
        held, deleted = self.submit(rcpt_to=("a@example.net",)), self.submit(rcpt_to=("a@example.net",))
        self.assertIsNotNone(self.spool.admit())
        with self.queue.claim(held) as c:
            c.state.held = True
            c.save()
        with self.queue.claim(deleted) as c:
            c.finish()
        self.reactor.advance(15)
        self.assertIsNone(self.spool.admit())
        self.reactor.advance(1)  # the held admission above timed out

    def test_inflow_relay_down(self):
        """While every relay has failed, submissions are not held (nothing takes messages)."""
        self.start(connections=1, inflow_limit=1, retry=(60.0,))
        self.submit(rcpt_to=("a@example.net",))  # deferred: no relay; the pause begins
        self.submit(rcpt_to=("a@example.net",))
        self.assertIsNone(self.spool.admit())

    def test_committed_during_scan(self):
        """A message committed while a scan lists the spool is not forgotten by that scan."""
        first = defer.Deferred()
        self.relays.outcomes[A.url] = [[first, replies(250)]]
        self.start(connections=1)
        one = self.submit(rcpt_to=("a@example.net",))  # the only connection waits on it
        real_scan = self.queue.scan
        late: list[str] = []

        def scan():
            entries = real_scan()
            late.append(self.submit(rcpt_to=("b@example.org",)))  # after the listing
            return entries

        self.queue.scan = scan
        self.reactor.advance(15)
        self.queue.scan = real_scan
        first.callback(replies(250))
        self.assertEqual([s[1] for s in self.relays.sends()], [("a@example.net",), ("b@example.org",)])
        self.assertTrue(self.gone(one) and self.gone(late[0]))

    def test_deleted_while_scheduled(self):
        """A message removed by the command between scans is forgotten."""
        self.start(targets=(A,), retry=(60.0,), jitter=0.0)
        id = self.submit(rcpt_to=("a@example.net",))  # deferred: no relay
        with self.queue.claim(id) as c:
            c.finish()
        self.reactor.advance(15)
        self.assertEqual(self.delivery._scheduled, {})

    def test_unbounceable(self):
        """A sender no bounce can go to: the message is finished without one, not retried."""
        self.relays.outcomes[A.url] = [[replies(550)]]

        def refuse(*args):
            raise ValueError("no bounce for that sender")

        self.start(make_bounce=refuse)
        id = self.submit(rcpt_to=("a@example.net",))
        self.assertTrue(self.gone(id))
        self.assertEqual(self.spool.ids(), [])

    def test_start_log(self):
        """The start names the relays, and warns about what weakens them; never a password."""
        with capturedLogs() as events:
            self.start(targets=(A, parse_relay("smtp://c.example?tls=insecure"),
                                parse_relay("lmtp://d.example")), auth=RelayAuth("gw", "tiger"))
        lines = [formatEvent(e) for e in events]
        self.assertIn("smtp://a.example:25, smtp://c.example:25?tls=insecure, lmtp://d.example:24",
                      lines[0])
        self.assertIn("not verified", lines[1])
        self.assertIn("without TLS", lines[2])
        self.assertNotIn("tiger", " ".join(lines))


class LoopbackTests(TestCase):
    """
    The real relay client and a real SMTP server we did not write (aiosmtpd):
    STARTTLS verified against a test CA, AUTH to the relay, the submitter passed on.
    """

    timeout = 60

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.directory = self.mktemp()
        self.spool = Spool(self.directory, threadpool_runner=lambda f, *a: deferToThreadPool(
            reactor, reactor.getThreadPool(), f, *a))
        self.queue = Queue(self.directory)

    def start(self, **relay_options: Any) -> Any:
        ca = make_ca()
        relay = start_relay(self, ca=ca, users={"gw": "pw"}, **relay_options)
        settings = DeliverySettings(relay=RelaySettings(
            (parse_relay(relay.url()),), ca=(ca.certificate,), auth=RelayAuth("gw", "pw"),
            helo="gw.example", connect_timeout=10, command_timeout=10, data_timeout=10,
        ))
        delivery = Delivery(self.reactor, self.spool, self.queue, settings, "gw.example")
        delivery.startService()
        self.addCleanup(delivery.stopService)
        return relay

    async def submit(self, **changes: Any) -> str:
        writer = self.spool.open()
        writer.write(BODY)
        return await writer.finish(envelope(**changes))

    async def wait_gone(self, id: str) -> None:
        for _ in range(400):
            if not os.path.exists(os.path.join(self.directory, f"{id}.json")):
                return
            await task.deferLater(self.reactor, 0.05, lambda: None)
        self.fail(f"{id} is still queued")

    @defer.inlineCallbacks
    def test_relayed(self):
        """The message reaches the relay over verified TLS with its Received header and AUTH=."""
        relay = self.start(mail_auth=True)
        id = yield defer.ensureDeferred(self.submit())
        yield relay.handler.wait_messages(1, self.reactor)
        [got] = relay.handler.messages
        self.assertEqual((got.mail_from, got.rcpt_tos), ("sales@example.com",
                                                         ["a@example.net", "b@example.org"]))
        self.assertIn("AUTH=sales@example.com", got.mail_params)
        self.assertEqual((got.login, got.tls), ("gw", True))
        self.assertTrue(got.content.startswith(b"Received: from client.example"))
        yield defer.ensureDeferred(self.wait_gone(id))

    @defer.inlineCallbacks
    def test_refused_and_bounced(self):
        """A relay refusing AUTH= (555, stock aiosmtpd) still gets it; a 550 bounces to the sender."""
        relay = self.start()
        relay.handler.rcpt["b@example.org"] = "550 5.1.1 no such user"
        id = yield defer.ensureDeferred(self.submit())
        yield relay.handler.wait_messages(2, self.reactor)
        message, dsn = relay.handler.messages
        self.assertEqual(message.rcpt_tos, ["a@example.net"])
        self.assertEqual((dsn.mail_from, dsn.rcpt_tos), ("<>", ["sales@example.com"]))
        self.assertIn(b"Diagnostic-Code: smtp; 550 5.1.1 no such user", dsn.content)
        yield defer.ensureDeferred(self.wait_gone(id))
