"""
Tests for L{gateway.smtp.queue}: the queue's state files, locks, claims and
scan on a spool directory written by the real L{Spool}.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from gateway.smtp import queue as queue_module
from gateway.fileio import open_regular
from gateway.smtp.queue import (
    ORPHAN_AGE,
    Claim,
    Queue,
    QueueError,
    QueueState,
    RecipientState,
)
from gateway.smtp.spool import Spool
from tests.test_spool import MESSAGE, RECEIVED, envelope, synchronous

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
META = {"rcpt_to": ["a@example.net", "b@example.org", "a@example.net"]}

#: Holds the lock of the .json named by argv[1] (as an external consumer
#: would) until its stdin closes; says "locked" or "busy" first.
HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    print("busy", flush=True)
    sys.exit(0)
print("locked", flush=True)
sys.stdin.read()
"""


def spool_message(directory: str, received_at: datetime = RECEIVED, **changes: Any) -> str:
    """Spool one message with the real L{Spool}; its id."""
    writer = Spool(directory, threadpool_runner=synchronous).open()
    writer.write(MESSAGE)
    d = writer.finish(envelope(**changes), received_at)
    results: list[str] = []
    d.addCallback(results.append)
    return results[0]


class QueueStateTests(SynchronousTestCase):
    def test_fresh(self) -> None:
        """A message never attempted: every recipient pending (duplicates kept), due now."""
        state = QueueState.fresh(META)
        self.assertEqual([r.address for r in state.recipients], META["rcpt_to"])
        self.assertEqual(state.pending(), [0, 1, 2])
        self.assertEqual((state.attempts, state.next_attempt, state.held), (0, 0.0, False))
        self.assertFalse(state.done)

    def test_round_trip(self) -> None:
        state = QueueState.fresh(META)
        state.recipients[0] = RecipientState("a@example.net", "delivered", "smtp://relay.example:25",
                                             "250 2.0.0 Ok", "2026-11-26T10:05:00Z")
        state.recipients[1].status = "failed"
        state.attempts, state.next_attempt, state.held = 2, 1795000000.5, True
        state.last_error = "451 4.3.0 try later (smtp://relay.example:25)"
        state.bounce_id = "20261126T100000Z-0123456789abcdef"
        data = state.to_json()
        self.assertEqual(json.loads(data)["version"], 1)
        self.assertEqual(QueueState.from_json(data, META), state)
        self.assertEqual((state.pending(), state.failed()), ([2], [1]))
        state.recipients[2].status = "delivered"
        self.assertTrue(state.done)

    @settings(deadline=None)
    @given(st.lists(st.text(), min_size=1, max_size=4), st.text(), st.floats(0, 2e9))
    def test_round_trip_any_text(self, addresses: list[str], reply: str, when: float) -> None:
        """Any text (lone surrogates too) survives the file."""
        meta = {"rcpt_to": addresses}
        state = QueueState.fresh(meta)
        state.recipients[0].reply = reply
        state.last_error = reply
        state.next_attempt = when
        self.assertEqual(QueueState.from_json(state.to_json(), meta), state)

    def test_invalid(self) -> None:
        """Every malformed state is a one-line L{QueueError} naming the problem, not the content."""
        good = json.loads(QueueState.fresh(META).to_json())
        cases = {
            b"{not json": "not valid JSON",
            b"\xff\xfe": "not valid JSON",
            b"[]": "not a JSON object",
            json.dumps(dict(good, version=2)).encode(): "not version 1",
            json.dumps(dict(good, attempts=-1)).encode(): "attempts is not a count",
            json.dumps(dict(good, attempts=True)).encode(): "attempts is not a count",
            json.dumps(dict(good, held="no")).encode(): "held is not true or false",
            json.dumps(dict(good, next_attempt="soon")).encode(): "next_attempt is not a number",
            json.dumps(dict(good, next_attempt=-1)).encode(): "next_attempt is out of range",
            json.dumps(dict(good, next_attempt=1e300)).encode(): "next_attempt is out of range",
            json.dumps(dict(good, last_error=5)).encode(): "last_error is not a string",
            json.dumps(dict(good, recipients={})).encode(): "recipients is not a list",
            json.dumps(dict(good, recipients=good["recipients"][:2])).encode():
                "recipients do not match the message's rcpt_to",
            json.dumps(dict(good, recipients=[dict(r, status="sent") for r in good["recipients"]])).encode():
                "recipient 0: status is not one of pending, delivered, failed",
            json.dumps(dict(good, recipients=[5, 6, 7])).encode(): "recipient 0 is not an object",
        }
        for data, message in cases.items():
            e = self.assertRaises(QueueError, QueueState.from_json, data, META)
            self.assertEqual(str(e), message, data)
        self.assertRaises(QueueError, QueueState.fresh, {"rcpt_to": "a@example.net"})


class QueueTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.mkdir(self.directory)
        self.queue = Queue(self.directory)

    def spool(self, **changes: Any) -> str:
        return spool_message(self.directory, **changes)

    def path(self, id: str, extension: str) -> str:
        return os.path.join(self.directory, f"{id}.{extension}")

    def claim(self, id: str, queue: Queue | None = None) -> Claim:
        claim = (queue or self.queue).claim(id)
        assert claim is not None
        self.addCleanup(claim.release)
        return claim

    def holder(self, id: str) -> subprocess.Popen[str]:
        """A process holding (or failing to take) the lock of C{id}; it has printed its word."""
        process = subprocess.Popen(
            [sys.executable, "-c", HOLDER, self.path(id, "json")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self.addCleanup(process.wait, 60)
        self.addCleanup(process.stdin.close)
        self.addCleanup(process.stdout.close)
        return process


class ScanTests(QueueTestCase):
    def test_empty(self) -> None:
        self.assertEqual(self.queue.scan(), [])
        self.assertEqual(self.queue.counts(), {"queued": 0, "deferred": 0, "held": 0, "done": 0})

    def test_missing_directory(self) -> None:
        e = self.assertRaises(QueueError, Queue(os.path.join(self.directory, "nope")).scan)
        self.assertIn("cannot list the queue: No such file or directory", str(e))

    def test_oldest_first(self) -> None:
        """Complete messages by received_at; a message being written is not listed."""
        later = self.spool()
        earlier = spool_message(self.directory, RECEIVED - timedelta(hours=1))
        Spool(self.directory, threadpool_runner=synchronous).open().write(b"in progress")
        entries = self.queue.scan()
        self.assertEqual([e.id for e in entries], [earlier, later])
        self.assertEqual(entries[1].received_at, "2026-11-23T15:55:00Z")
        self.assertEqual((entries[1].next_attempt, entries[1].held, entries[1].state_mtime), (0.0, False, None))
        self.assertEqual(entries[1].status, "queued")

    def test_state(self) -> None:
        """The scan reports the saved state and its file's mtime; counts by status."""
        ids = [self.spool() for _ in range(4)]
        for id, change in zip(ids[1:], [{"attempts": 1, "next_attempt": 99.0}, {"held": True}, {}]):
            with self.queue.claim(id) as claim:
                for name, value in change.items():
                    setattr(claim.state, name, value)
                if not change:
                    for r in claim.state.recipients:
                        r.status = "failed"
                claim.save()
        entries = {e.id: e for e in self.queue.scan()}
        self.assertEqual([entries[id].status for id in ids], ["queued", "deferred", "held", "done"])
        self.assertEqual(entries[ids[1]].next_attempt, 99.0)
        self.assertEqual(entries[ids[1]].state_mtime, os.stat(self.path(ids[1], "state")).st_mtime)
        self.assertEqual(self.queue.counts(), {"queued": 1, "deferred": 1, "held": 1, "done": 1})
        self.assertEqual(self.queue.counts([entries[ids[0]]]),
                         {"queued": 1, "deferred": 0, "held": 0, "done": 0})

    def test_read(self) -> None:
        """A snapshot without the lock, even while someone holds it."""
        id = self.spool()
        claim = self.claim(id)
        meta, state, mtime = self.queue.read(id)
        self.assertEqual((meta["id"], state, mtime), (id, claim.state, None))
        self.assertIsNone(self.queue.read("20261126T100000Z-0123456789abcdef"))
        self.assertRaises(QueueError, self.queue.read, "../../etc/passwd")


class ClaimTests(QueueTestCase):
    def test_claim(self) -> None:
        id = self.spool()
        claim = self.claim(id)
        self.assertEqual((claim.id, claim.meta["rcpt_to"]), (id, ["a@example.net", "b@example.org"]))
        self.assertEqual(claim.state, QueueState.fresh(claim.meta))
        self.assertEqual(claim.message_path, self.path(id, "eml"))
        with open(claim.message_path, "rb") as f:
            self.assertEqual(f.read(), MESSAGE)

    def test_exclusive(self) -> None:
        """A second claim, from this or another Queue object, is refused until the first is released."""
        id = self.spool()
        other = Queue(self.directory)
        claim = self.claim(id)
        self.assertIsNone(self.queue.claim(id))
        self.assertIsNone(other.claim(id))
        claim.release()
        claim.release()
        self.claim(id, other)

    def test_exclusive_across_processes(self) -> None:
        """Another process holding the flock excludes us, and we exclude it."""
        id = self.spool()
        process = self.holder(id)
        self.assertEqual(process.stdout.readline(), "locked\n")
        self.assertIsNone(self.queue.claim(id))
        e = self.assertRaises(QueueError, self.queue.lock, id, 0.1)
        self.assertEqual(str(e), f"message {id} is being delivered; try again later")
        process.stdin.close()
        self.assertEqual(process.wait(60), 0)
        claim = self.claim(id)
        other = self.holder(id)
        self.assertEqual(other.stdout.readline(), "busy\n")
        claim.release()

    def test_context_manager(self) -> None:
        id = self.spool()
        with self.queue.lock(id, 1) as claim:
            self.assertTrue(claim.held)
        self.assertFalse(claim.held)
        self.assertRaises(QueueError, claim.save)
        self.claim(id)

    def test_unknown(self) -> None:
        unknown = "20261126T100000Z-0123456789abcdef"
        self.assertIsNone(self.queue.claim(unknown))
        e = self.assertRaises(QueueError, self.queue.lock, unknown, 0.1)
        self.assertEqual(str(e), f"no message {unknown} in {self.directory}")
        for bad in ("../x", f"{unknown}.json", ""):
            self.assertRaises(QueueError, self.queue.claim, bad)

    def test_gone_while_waiting(self) -> None:
        """A claim whose message was removed by the lock's previous holder is None."""
        id = self.spool()
        fd = os.open(self.path(id, "json"), os.O_RDONLY)
        self.addCleanup(os.close, fd)
        os.unlink(self.path(id, "json"))
        os.link(self.path(id, "eml"), self.path(id, "json"))  # another inode under the name
        real_open = os.open
        self.patch(queue_module.os, "open", lambda path, *a: fd if path.endswith(".json") else real_open(path, *a))
        self.patch(queue_module.os, "close", lambda f: None)
        self.assertIsNone(self.queue.claim(id))

    def test_save(self) -> None:
        """The state is replaced atomically: no temporary file left, mode 0600; re-read on the next claim."""
        id = self.spool()
        with self.queue.claim(id) as claim:
            claim.state.recipients[0].status = "delivered"
            claim.state.attempts = 1
            claim.save()
        self.assertEqual(sorted(os.listdir(self.directory)), sorted(f"{id}.{e}" for e in ("eml", "json", "state")))
        self.assertEqual(stat.S_IMODE(os.stat(self.path(id, "state")).st_mode), 0o600)
        claim = self.claim(id)
        self.assertEqual((claim.state.pending(), claim.state.attempts), ([1], 1))

    def test_save_enospc(self) -> None:
        """A full disk leaves the previous state, no temporary file, and the claim held."""
        id = self.spool()
        claim = self.claim(id)
        claim.state.attempts = 1
        claim.save()
        before = self._read(id)
        claim.state.attempts = 2

        def full(*args: Any) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        for name in ("write", "fsync"):
            real = getattr(os, name)
            setattr(queue_module.os, name, full)
            try:
                e = self.assertRaises(OSError, claim.save)
            finally:
                setattr(queue_module.os, name, real)
            self.assertEqual(e.errno, errno.ENOSPC)
            self.assertEqual(self._read(id), before)
            self.assertFalse(os.path.exists(os.path.join(self.directory, f".{id}.state.tmp")))
            self.assertTrue(claim.held)
            self.assertIsNone(Queue(self.directory).claim(id))
        claim.save()
        self.assertEqual(json.loads(self._read(id))["attempts"], 2)

    def _read(self, id: str) -> bytes:
        with open(self.path(id, "state"), "rb") as f:
            return f.read()

    def test_concurrent_reader(self) -> None:
        """A reader without the lock never sees a torn state while another thread saves."""
        id = self.spool(rcpt_to=[f"r{i}@example.net" for i in range(50)])
        claim = self.claim(id)
        stop = threading.Event()
        seen: list[int] = []
        errors: list[BaseException] = []

        def read() -> None:
            reader = Queue(self.directory)
            while not stop.is_set():
                try:
                    result = reader.read(id)
                    assert result is not None
                    seen.append(result[1].attempts)
                except BaseException as e:  # noqa: BLE001 - reported below
                    errors.append(e)
                    return

        def wait_for_reads(count: int) -> None:
            """Until the reader has finished C{count} more reads (so one started after the last save)."""
            target = len(seen) + count
            deadline = time.monotonic() + 30
            while len(seen) < target and not errors and time.monotonic() < deadline:
                time.sleep(0.001)

        thread = threading.Thread(target=read)
        thread.start()
        try:
            wait_for_reads(1)
            for attempt in range(1, 201):
                claim.state.attempts = attempt
                # Sizes vary, so a torn read would show as bad JSON or a wrong count.
                claim.state.last_error = "x" * (attempt * 37 % 3000)
                claim.save()
                if attempt % 20 == 0:
                    wait_for_reads(2)
        finally:
            stop.set()
            thread.join(60)
        self.assertEqual(errors, [])
        self.assertEqual(seen, sorted(seen))
        # The reader read between the saves: it saw (at least) every 20th state, not only the ends.
        during = {attempts for attempts in seen if 0 < attempts < 200}
        self.assertTrue({20, 40, 60, 80, 100, 120, 140, 160, 180} <= during, sorted(during))
        self.assertEqual(os.listdir(os.path.join(self.directory)).count(f"{id}.state"), 1)

    def test_finish(self) -> None:
        """The message's files are removed and the lock released."""
        id = self.spool()
        keep = self.spool()
        claim = self.claim(id)
        claim.save()
        claim.finish()
        self.assertFalse(claim.held)
        self.assertEqual(sorted(os.listdir(self.directory)), [f"{keep}.eml", f"{keep}.json"])
        self.assertIsNone(self.queue.claim(id))
        self.assertEqual([e.id for e in self.queue.scan()], [keep])

    def test_finish_failure(self) -> None:
        """When the .json cannot be removed, the claim stays held and the error propagates."""
        id = self.spool()
        claim = self.claim(id)

        def refuse(path: str) -> None:
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))

        self.patch(queue_module.os, "unlink", refuse)
        self.assertRaises(OSError, claim.finish)
        self.assertTrue(claim.held)
        self.assertTrue(os.path.exists(self.path(id, "json")))


class QuarantineTests(QueueTestCase):
    SECRET = "s3cr3t-content"

    def assertQuarantined(self, id: str, events: list[dict[str, Any]], file: str, why: str) -> None:
        self.assertFalse(any(name.startswith(id) for name in os.listdir(self.directory)))
        self.assertIn(f"{id}.json", os.listdir(os.path.join(self.directory, "quarantine")))
        lines = [formatEvent(e) for e in events]
        self.assertEqual(len(lines), 1, lines)
        self.assertEqual(
            lines[0],
            f"queue: quarantined message {id} in {os.path.join(self.directory, 'quarantine')}: "
            f"{os.path.join(self.directory, file)}: {why}",
        )
        self.assertNotIn(self.SECRET, lines[0])

    def test_corrupt_json(self) -> None:
        id = self.spool()
        good = self.spool()
        with open(self.path(id, "json"), "w") as f:
            f.write('{"rcpt_to": "' + self.SECRET)
        with capturedLogs() as events:
            self.assertEqual([e.id for e in self.queue.scan()], [good])
        self.assertQuarantined(id, events, f"{id}.json", "not valid JSON")
        self.assertEqual(sorted(os.listdir(os.path.join(self.directory, "quarantine"))),
                         [f"{id}.eml", f"{id}.json"])
        with capturedLogs() as events:
            self.assertEqual([e.id for e in self.queue.scan()], [good])
        self.assertEqual(events, [])

    def test_json_without_recipients(self) -> None:
        id = self.spool()
        with open(self.path(id, "json"), "w") as f:
            json.dump({"received_at": "x", "mail_from": self.SECRET, "rcpt_to": [1]}, f)
        with capturedLogs() as events:
            self.assertEqual(self.queue.scan(), [])
        self.assertQuarantined(id, events, f"{id}.json", "rcpt_to is not a list of addresses")

    def test_json_empty_recipients(self) -> None:
        """A message with no recipient is quarantined by the scan (the delivery could do nothing with it)."""
        id = self.spool()
        with open(self.path(id, "json")) as f:
            meta = json.load(f)
        with open(self.path(id, "json"), "w") as f:
            json.dump(dict(meta, rcpt_to=[]), f)
        with capturedLogs() as events:
            self.assertEqual(self.queue.scan(), [])
        self.assertQuarantined(id, events, f"{id}.json", "rcpt_to is empty")

    def test_quarantine_fails_midway(self) -> None:
        """
        A move that fails after the .eml went (a crash, EIO) leaves the body in
        quarantine/, the .json in the spool; the next scan moves the rest, and
        no orphan rule ever deletes the body.
        """
        id = self.spool()
        with self.queue.claim(id) as claim:
            claim.save()
        real_replace = os.replace

        def fail_json(source: str, target: str) -> None:
            if source.endswith(".json"):
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            real_replace(source, target)

        self.patch(queue_module.os, "replace", fail_json)
        with capturedLogs() as events:
            self.queue.quarantine(id, "bad")
        quarantine = os.path.join(self.directory, "quarantine")
        self.assertEqual(sorted(os.listdir(quarantine)), [f"{id}.eml", f"{id}.state"])
        self.assertEqual(sorted(os.listdir(self.directory)), [f"{id}.json", "quarantine"])
        self.assertEqual([formatEvent(e) for e in events],
                         [(f"queue: cannot quarantine message {id} ({self.path(id, 'json')}: bad): "
                           f"{os.strerror(errno.EIO)}")])
        self.assertIsNone(self.queue.claim(id))  # never delivered without its body
        self.patch(queue_module.os, "replace", real_replace)
        later = Queue(self.directory, clock=lambda: time.time() + 10 * ORPHAN_AGE)
        with capturedLogs() as events:
            self.assertEqual(later.scan(), [])
        self.assertEqual(sorted(os.listdir(quarantine)), [f"{id}.eml", f"{id}.json", f"{id}.state"])
        self.assertEqual(os.listdir(self.directory), ["quarantine"])

    def test_corrupt_state(self) -> None:
        id = self.spool()
        with open(self.path(id, "state"), "w") as f:
            f.write(self.SECRET)
        with capturedLogs() as events:
            self.assertEqual(self.queue.scan(), [])
        self.assertQuarantined(id, events, f"{id}.state", "not valid JSON")
        self.assertEqual(len(os.listdir(os.path.join(self.directory, "quarantine"))), 3)

    def test_claim_corrupt_state(self) -> None:
        """A claim of an unparsable message quarantines it and is None."""
        id = self.spool()
        with open(self.path(id, "state"), "w") as f:
            json.dump({"version": 1, "recipients": [], "last_error": self.SECRET}, f)
        with capturedLogs() as events:
            self.assertIsNone(self.queue.claim(id))
        self.assertQuarantined(id, events, f"{id}.state", "recipients do not match the message's rcpt_to")

    def test_missing_message_file(self) -> None:
        id = self.spool()
        os.unlink(self.path(id, "eml"))
        with capturedLogs() as events:
            self.assertEqual(self.queue.scan(), [])
        self.assertQuarantined(id, events, f"{id}.eml", "the message file is missing")

    def test_locked_corrupt_message_waits(self) -> None:
        """A corrupt message another process holds is left alone: the holder decides."""
        id = self.spool()
        with open(self.path(id, "state"), "w") as f:
            f.write("{")
        process = self.holder(id)
        self.assertEqual(process.stdout.readline(), "locked\n")
        with capturedLogs() as events:
            self.assertEqual(self.queue.scan(), [])
        self.assertEqual(events, [])
        self.assertTrue(os.path.exists(self.path(id, "json")))

    def test_quarantine_with_own_claim(self) -> None:
        """The delivery, holding a claim, quarantines through it; the claim is released."""
        id = self.spool()
        claim = self.claim(id)
        with capturedLogs() as events:
            self.queue.quarantine(id, "cannot read the message file")
        self.assertFalse(claim.held)
        self.assertQuarantined(id, events, f"{id}.json", "cannot read the message file")

    def test_quarantine_unclaimed(self) -> None:
        id = self.spool()
        with capturedLogs() as events:
            self.queue.quarantine(id, "bad")
        self.assertQuarantined(id, events, f"{id}.json", "bad")
        self.queue.quarantine(id, "again: nothing to do")


class OrphanTests(QueueTestCase):
    def age(self, name: str, seconds: float) -> None:
        path = os.path.join(self.directory, name)
        when = os.stat(path).st_mtime - seconds
        os.utime(path, (when, when))

    def test_orphans(self) -> None:
        """Old .eml/.state without .json and old temporary states go; young ones and messages stay."""
        id = self.spool()
        with self.queue.claim(id) as claim:
            claim.save()
        young = self.spool()
        for message in (id, young):
            os.unlink(self.path(message, "json"))
        old_eml = self.spool()
        os.unlink(self.path(old_eml, "json"))
        kept = self.spool()
        with open(os.path.join(self.directory, f".{kept}.state.tmp"), "w") as f:
            f.write("{")
        for name in (f"{id}.state", f"{id}.eml", f"{old_eml}.eml", f".{kept}.state.tmp", f"{kept}.eml",
                     f"{kept}.json"):
            self.age(name, ORPHAN_AGE + 60)
        with capturedLogs() as events:
            self.assertEqual([e.id for e in self.queue.scan()], [kept])
        self.assertEqual(sorted(os.listdir(self.directory)),
                         sorted([f"{young}.eml", f"{kept}.eml", f"{kept}.json"]))
        self.assertEqual(len(events), 4)
        self.assertIn(f"queue: removed leftover {self.path(old_eml, 'eml')}",
                      [formatEvent(e) for e in events])

    def test_spool_temporaries(self) -> None:
        """The spool's temporary files left by a kill -9 during a commit go after the orphan age."""
        writer = Spool(self.directory, threadpool_runner=synchronous).open()
        writer.write(MESSAGE)  # a message being received: young, kept
        old = "20261123T155500Z-00000000000000aa"
        names = [f".{old}.eml.tmp", f".{old}.json.tmp", f".{old}.state.tmp", ".not-an-id.eml.tmp"]
        for name in names:
            with open(os.path.join(self.directory, name), "w") as f:
                f.write("{")
            self.age(name, ORPHAN_AGE + 60)
        with capturedLogs() as events:
            self.assertEqual(self.queue.scan(), [])
        self.assertEqual(sorted(os.listdir(self.directory)), sorted([f".{writer.id}.eml.tmp", ".not-an-id.eml.tmp"]))
        self.assertEqual(sorted(formatEvent(e) for e in events),
                         sorted(f"queue: removed leftover {os.path.join(self.directory, n)}" for n in names[:3]))
        writer.abort()

    def test_writer_in_progress_kept_whatever_its_age(self) -> None:
        """
        A message still being received (its writer holds its lock) is never a
        leftover, however old: a scan in another process sharing the spool
        (here: a queue with orphan age 0) leaves it; once its writer is gone
        (no lock), it goes.
        """
        writer = Spool(self.directory, threadpool_runner=synchronous).open()
        writer.write(MESSAGE)
        name = f".{writer.id}.eml.tmp"
        self.age(name, ORPHAN_AGE + 60)
        eager = Queue(self.directory, orphan_age=0.0)
        self.assertEqual(eager.scan(), [])
        self.assertEqual(os.listdir(self.directory), [name])
        self.assertEqual(self.successResultOf(writer.finish(envelope())), writer.id)
        self.assertEqual([e.id for e in eager.scan()], [writer.id])
        # A writer killed in the middle: its file is there, its lock is not.
        dead = "20261123T155500Z-00000000000000ab"
        with open(os.path.join(self.directory, f".{dead}.eml.tmp"), "w") as f:
            f.write("partial")
        eager.scan()
        self.assertFalse(os.path.exists(os.path.join(self.directory, f".{dead}.eml.tmp")))

    def test_message_between_its_renames_kept(self) -> None:
        """An .eml whose writer still holds it (its .json on the way) is not a leftover."""
        id = "20261123T155500Z-00000000000000ac"
        path = self.path(id, "eml")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self.addCleanup(os.close, fd)
        fcntl.flock(fd, fcntl.LOCK_EX)
        Queue(self.directory, orphan_age=0.0).scan()
        self.assertTrue(os.path.exists(path))

    def test_state_temporary_of_a_claimed_message_kept(self) -> None:
        """A .state.tmp goes only when its message is not claimed (a save may be writing it)."""
        id = self.spool()
        temp = os.path.join(self.directory, f".{id}.state.tmp")
        with open(temp, "w") as f:
            f.write("{")
        eager = Queue(self.directory, orphan_age=0.0)
        with self.queue.claim(id):
            eager.scan()
            self.assertTrue(os.path.exists(temp))
        eager.scan()
        self.assertFalse(os.path.exists(temp))

    def test_create_locked_lost_to_a_clean_up(self) -> None:
        """A writer whose new file a clean-up holds gives the name up and takes another."""
        from gateway.smtp import spool as spool_module

        path = os.path.join(self.directory, ".x.eml.tmp")
        real_flock = fcntl.flock

        def busy(fd: int, operation: int) -> None:
            raise BlockingIOError(errno.EWOULDBLOCK, "locked")

        self.patch(spool_module.fcntl, "flock", busy)
        self.assertRaises(FileExistsError, spool_module._create_locked, path)
        self.assertFalse(os.path.exists(path))
        self.patch(spool_module.fcntl, "flock", real_flock)
        os.close(spool_module._create_locked(path))

    def test_clock(self) -> None:
        """The age is measured with the queue's clock."""
        id = self.spool()
        os.unlink(self.path(id, "json"))
        self.queue.scan()
        self.assertTrue(os.path.exists(self.path(id, "eml")))
        now = datetime.now(timezone.utc).timestamp()
        Queue(self.directory, clock=lambda: now + ORPHAN_AGE + 1).scan()
        self.assertFalse(os.path.exists(self.path(id, "eml")))


class ExternalConsumerTests(QueueTestCase):
    """The README's recipe for a consumer without --relay keeps to the lock protocol."""

    def take(self) -> Any:
        with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
            readme = f.read()
        start = readme.index("```python\nimport fcntl, os\n\ndef take(")
        code = readme[start + len("```python\n"): readme.index("```", start + 3)]
        namespace: dict[str, Any] = {}
        exec(code, namespace)  # noqa: S102 - our own README
        return namespace["take"]

    def test_recipe(self) -> None:
        take = self.take()
        id = self.spool()
        with self.queue.claim(id) as claim:
            claim.save()
            seen: list[tuple[str, str]] = []
            take(self.directory, id, lambda *paths: seen.append(paths))
            self.assertEqual(seen, [])  # the gateway has it
        take(self.directory, id, lambda *paths: seen.append(paths))
        self.assertEqual(seen, [(self.path(id, "json"), self.path(id, "eml"))])
        self.assertEqual(os.listdir(self.directory), [])
        self.assertIsNone(self.queue.claim(id))


class UnreadableTests(QueueTestCase):
    def test_logged_once(self) -> None:
        """A message that cannot be read (permissions) is skipped, logged once, not quarantined."""
        if os.geteuid() == 0:
            real_open = os.open

            def refuse(path: str, *args: Any) -> int:
                if path.endswith(".state"):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
                return real_open(path, *args)

            self.patch(queue_module.os, "open", refuse)
        id = self.spool()
        with open(self.path(id, "state"), "w") as f:
            f.write("{}")
        os.chmod(self.path(id, "state"), 0)
        with capturedLogs() as events:
            self.assertEqual(self.queue.scan(), [])
            self.assertEqual(self.queue.scan(), [])
        self.assertEqual([formatEvent(e) for e in events],
                         [f"queue: cannot read message {id} in {self.directory}: {os.strerror(errno.EACCES)}"])
        self.assertTrue(os.path.exists(self.path(id, "json")))


    def test_planted_fifo_never_blocks(self) -> None:
        """
        A FIFO planted as a message's .json or .state (by anyone who can write
        the spool) is refused at once: opening one for reading would block
        the scan, a claim or the command for ever.
        """
        fifo_json, fifo_state = self.spool(), self.spool()
        os.unlink(self.path(fifo_json, "json"))
        os.mkfifo(self.path(fifo_json, "json"))
        os.mkfifo(self.path(fifo_state, "state"))
        good = self.spool()
        signal.signal(signal.SIGALRM, lambda *_: self.fail("blocked on a FIFO"))
        self.addCleanup(signal.signal, signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(10)
        try:
            with capturedLogs():
                self.assertEqual([e.id for e in self.queue.scan()], [good])
                for id in (fifo_json, fifo_state):
                    try:
                        self.assertIsNone(self.queue.claim(id))
                    except QueueError as e:
                        self.assertIn("not a regular file", str(e))
        finally:
            signal.alarm(0)


    def test_planted_hard_link_not_read(self) -> None:
        """A message file hard-linked to a file elsewhere is refused, never read (nor relayed)."""
        secret = os.path.join(self.directory, "..", "secret")
        with open(secret, "w") as f:
            f.write("not yours")
        id = self.spool()  # no .state yet: the link plays one
        os.link(secret, self.path(id, "state"))
        with capturedLogs():
            self.assertEqual(self.queue.scan(), [])
        with self.assertRaises(OSError):
            open_regular(secret)


class OwnerTests(QueueTestCase):
    """What root writes into a spool owned by the gateway's user stays the gateway's (C{sudo authgateway queue})."""

    NOBODY = 65534

    def give_away(self) -> None:
        if os.geteuid() != 0:
            raise SkipTest("changing a file's owner needs root")
        for name in [".", *os.listdir(self.directory)]:
            os.chown(os.path.join(self.directory, name), self.NOBODY, self.NOBODY)

    def owner(self, path: str) -> tuple[int, int]:
        st = os.stat(path)
        return st.st_uid, st.st_gid

    def test_save_keeps_owner(self) -> None:
        id = self.spool()
        self.give_away()
        with self.queue.claim(id) as claim:
            claim.state.held = True
            claim.save()
        self.assertEqual(self.owner(self.path(id, "state")), (self.NOBODY, self.NOBODY))
        self.assertEqual(stat.S_IMODE(os.stat(self.path(id, "state")).st_mode), 0o600)

    def test_quarantine_keeps_owner(self) -> None:
        id = self.spool()
        self.give_away()
        with capturedLogs():
            self.queue.quarantine(id, "bad")
        self.assertEqual(self.owner(os.path.join(self.directory, "quarantine")), (self.NOBODY, self.NOBODY))

    def test_without_the_right(self) -> None:
        """A user who may not give a file away keeps it (and saves all the same)."""
        id = self.spool()
        json_stat = os.stat(self.path(id, "json"))
        calls: list[tuple[int, int]] = []

        def fchown(fd: int, uid: int, gid: int) -> None:
            calls.append((uid, gid))
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

        self.patch(os, "fchown", fchown)
        with self.queue.claim(id) as claim:
            claim.state.held = True
            claim.save()
        self.assertEqual(calls, [(json_stat.st_uid, json_stat.st_gid)])
        self.assertTrue(self.queue.scan()[0].held)


class ScanCacheTests(QueueTestCase):
    """A scan reads a message again only when its files changed."""

    def count_opens(self) -> list[str]:
        opened: list[str] = []
        real_open = os.open

        def counting(path: str, *args: Any, **kwargs: Any) -> int:
            opened.append(path)
            return real_open(path, *args, **kwargs)

        self.patch(queue_module.os, "open", counting)
        return opened

    def test_unchanged_not_read(self) -> None:
        ids = [self.spool() for _ in range(3)]
        with self.queue.claim(ids[1]) as claim:
            claim.state.attempts = 1
            claim.save()
        first = self.queue.scan()
        opened = self.count_opens()
        self.assertEqual(self.queue.scan(), first)
        self.assertEqual(opened, [])

    def test_changed_state_read(self) -> None:
        """A state changed by another process (the command) is seen by the next scan; only it is read."""
        id = self.spool()
        other = self.spool()
        self.assertEqual([e.status for e in self.queue.scan()], ["queued", "queued"])
        for held in (True, False, True):
            with Queue(self.directory).claim(id) as claim:
                claim.state.held = held
                claim.save()
            opened = self.count_opens()
            entries = {e.id: e for e in self.queue.scan()}
            self.assertEqual(entries[id].held, held)
            self.assertEqual(entries[other].held, False)
            self.assertEqual(sorted(opened), sorted([self.path(id, "json"), self.path(id, "state")]))
            self.patch(queue_module.os, "open", os.open)

    def test_entry(self) -> None:
        """An entry carries what the list shows; the queue keeps no metadata besides."""
        id = self.spool(mail_from="sales@example.com", rcpt_to=["a@example.net", "b@example.org"])
        with self.queue.claim(id) as claim:
            claim.state.attempts = 1
            claim.state.recipients[0].status = "delivered"
            claim.state.last_error = "451 4.3.0 later"
            claim.save()
        [entry] = self.queue.scan()
        self.assertEqual(
            (entry.mail_from, entry.recipients, entry.pending, entry.size, entry.last_error, entry.status),
            ("sales@example.com", 2, 1, os.path.getsize(self.path(id, "eml")), "451 4.3.0 later", "deferred"),
        )
        self.assertIsNotNone(entry.state_mtime)
        self.assertEqual(list(self.queue._cache), [id])
        with self.queue.claim(id) as claim:
            claim.finish()
        self.assertEqual(self.queue._cache, {})
