"""
The processes of L{tests.test_spool_processes}: run as
C{python -m tests.spool_processes writer DIR COUNT OUT} (spools COUNT
messages, each written in several chunks with pauses, and prints their ids
to OUT) or C{python -m tests.spool_processes claimer DIR OUT STOP} (scans,
claims and "delivers" until STOP exists and the spool is empty), several of
each at once on one spool directory, as several workers or instances do;
or C{python -m tests.spool_processes gateway DIR COUNT OUT STOP RELAY}: a
gateway worker's spool and delivery service (L{gateway.smtp.delivery}) on
the reactor, spooling COUNT messages while it relays the spool to RELAY.

A claimer delivers one recipient per claim and saves the state in between,
so a message with two recipients is claimed at least twice, often by two
processes; it scans with an orphan age of 0, so the clean-up runs against
every other process's files in progress. Each delivery is a line
C{<id> <recipient> <ok|torn>} in OUT, fsynced before the state is saved.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time

from twisted.internet import defer

from gateway.smtp.queue import Queue
from gateway.smtp.spool import Envelope, Spool

RECIPIENTS = ("a@example.net", "b@example.org")
CHUNK = b"x" * 76 + b"\r\n"


def body(seed: bytes) -> list[bytes]:
    """The chunks of a message whose last line is the SHA-256 of what comes before it."""
    chunks = [b"Subject: " + seed + b"\r\n\r\n"] + [CHUNK] * 20
    digest = hashlib.sha256(b"".join(chunks)).hexdigest().encode()
    return chunks + [digest + b"\r\n"]


def intact(message: bytes) -> bool:
    """Whether a message is whole: its last line is the digest of the rest."""
    rest, _, last = message.rstrip(b"\r\n").rpartition(b"\r\n")
    return hashlib.sha256(rest + b"\r\n").hexdigest().encode() == last


def envelope() -> Envelope:
    return Envelope(
        mail_from="sender@example.com", rcpt_to=RECIPIENTS, helo="client.example",
        auth_info=None, peer_address="192.0.2.7", peer_port=40000,
        local_address="127.0.0.1", local_port=587, tls=None, protocol="ESMTP",
    )


def writer(directory: str, count: int, out: str) -> None:
    spool = Spool(directory, threadpool_runner=lambda f, *a: defer.maybeDeferred(f, *a))
    with open(out, "w") as ids:
        for n in range(count):
            w = spool.open()
            for i, chunk in enumerate(body(f"{os.getpid()}-{n}".encode())):
                w.write(chunk)
                if i % 8 == 0:
                    time.sleep(0.001)  # in progress a while, as a DATA is
            results: list = []
            w.finish(envelope()).addBoth(results.append)
            [result] = results
            if not isinstance(result, str):
                ids.write(f"FAILED {result.getErrorMessage()}\n")
                continue
            ids.write(result + "\n")
            ids.flush()


def claimer(directory: str, out: str, stop: str) -> None:
    queue = Queue(directory, orphan_age=0.0)
    with open(out, "a") as log:
        while True:
            entries = queue.scan()
            if not entries and os.path.exists(stop):
                # One more look: a writer may have committed since the listing.
                if not queue.scan():
                    return
            for entry in entries:
                claim = queue.claim(entry.id)
                if claim is None:
                    continue
                with claim:
                    pending = claim.state.pending()
                    if not pending:
                        claim.finish()
                        continue
                    with open(claim.message_path, "rb") as f:
                        whole = intact(f.read())
                    index = pending[0]
                    log.write(f"{entry.id} {index} {'ok' if whole else 'torn'}\n")
                    log.flush()
                    os.fsync(log.fileno())
                    claim.state.recipients[index].status = "delivered"
                    if claim.state.pending():
                        claim.save()
                    else:
                        claim.finish()


def gateway(directory: str, count: int, out: str, stop: str, relay_url: str) -> None:
    from twisted.internet import reactor, task
    from twisted.internet.threads import deferToThreadPool

    from gateway.smtp.delivery import Delivery, DeliverySettings
    from gateway.smtp.relay import RelaySettings, parse_relay

    spool = Spool(directory, threadpool_runner=lambda f, *a: deferToThreadPool(
        reactor, reactor.getThreadPool(), f, *a))
    settings = DeliverySettings(
        relay=RelaySettings(targets=(parse_relay(relay_url),)),
        connections=2, retry=(0.2,), jitter=0.0, scan_interval=0.2,
    )
    delivery = Delivery(reactor, spool, Queue(directory), settings, "worker.test")
    ids = open(out, "w")

    async def submit() -> None:
        for n in range(count):
            w = spool.open()
            for chunk in body(f"{os.getpid()}-{n}".encode()):
                w.write(chunk)
            ids.write(await w.finish(envelope()) + "\n")
            ids.flush()
            await task.deferLater(reactor, 0.002, lambda: None)

    def done() -> bool:
        return os.path.exists(stop) and not spool.ids()

    async def main() -> None:
        delivery.startService()
        await submit()
        while not done():
            await task.deferLater(reactor, 0.1, lambda: None)
        await delivery.stopService()

    def finished(result: object) -> None:
        ids.close()
        if isinstance(result, Exception) or hasattr(result, "printTraceback"):
            result.printTraceback()  # type: ignore[union-attr]
        reactor.stop()

    reactor.callWhenRunning(lambda: defer.ensureDeferred(main()).addBoth(finished))
    reactor.run()


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    if role == "writer":
        writer(args[0], int(args[1]), args[2])
    elif role == "gateway":
        gateway(args[0], int(args[1]), *args[2:])
    else:
        claimer(*args)
