"""
Tests for L{gateway.smtp.spool}: the durable message spool the ESMTP server
writes each accepted message to before it answers 250.
"""

from __future__ import annotations

import functools

import json
import os
import re
import stat
from datetime import datetime, timedelta, timezone
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase

from gateway.authinfo import AuthInfo, Identity, IdentityContext
from gateway.smtp import spool as spool_module
from gateway.smtp.queue import Queue
from gateway.smtp.spool import Envelope, Spool, SpoolError, SpoolWriter

#: A message as the protocol hands it over: un-dot-stuffed, CRLF line ends.
CHUNKS = [
    b"Received: from client.example (client.example [192.0.2.7])\r\n",
    b"\tby gateway.example with ESMTPSA id 1; Mon, 23 Nov 2026 15:55:00 +0000\r\n",
    b"Subject: caf\xc3\xa9\r\n",
    b"\r\n",
    b".leading dot, once stuffed\r\n",
    b"\x00\xff 8-bit body\r\n",
]
MESSAGE = b"".join(CHUNKS)

SMTP_AUTH = AuthInfo(
    identities=[
        Identity("sales", IdentityContext.SmtpAuthPlainAuthorization),
        Identity("daniel", IdentityContext.SmtpAuthPlainAuthentication),
    ],
    groups=["group1", "group2"],
    peer_address="192.0.2.7",
)

TLS = {"version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384"}
RECEIVED = datetime(2026, 11, 23, 15, 55, 0, tzinfo=timezone.utc)
ID = re.compile(r"\A[0-9]{8}T[0-9]{6}Z-[0-9a-f]{16}\Z")


def envelope(**changes: Any) -> Envelope:
    base = Envelope(
        mail_from="sales@example.com",
        rcpt_to=("a@example.net", "b@example.org"),
        helo="client.example",
        auth_info=SMTP_AUTH,
        peer_address="192.0.2.7",
        peer_port=40000,
        local_address="198.51.100.1",
        local_port=587,
        tls=TLS,
        protocol="ESMTPSA",
        mail_auth="sales@example.com",
    )
    return attrs.evolve(base, **changes)


def synchronous(f: Any, *args: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(f, *args)


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class _FailingFile:
    """A message file whose writes fail as on a full disk."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def write(self, data: bytes) -> int:
        raise OSError(28, os.strerror(28))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class EnvelopeTests(SynchronousTestCase):
    def test_identities(self) -> None:
        """authz_id and authn_id are the identities of the two SMTP AUTH contexts."""
        env = envelope()
        self.assertEqual((env.authz_id, env.authn_id), ("sales", "daniel"))

    def test_unauthenticated(self) -> None:
        env = envelope(auth_info=None, protocol="ESMTP")
        self.assertEqual((env.authz_id, env.authn_id), (None, None))

    def test_other_contexts(self) -> None:
        """An AuthInfo without the SMTP contexts gives no authz_id or authn_id."""
        env = envelope(auth_info=AuthInfo(identities=[Identity("x", "BearerToken")]))
        self.assertEqual((env.authz_id, env.authn_id), (None, None))

    def test_protocol_checked(self) -> None:
        self.assertRaises(ValueError, envelope, protocol="SMTP")

    def test_recipients(self) -> None:
        """Recipients are kept as a tuple; one string is refused, not split into letters."""
        self.assertEqual(envelope(rcpt_to=["a@x"]).rcpt_to, ("a@x",))
        self.assertRaises(TypeError, envelope, rcpt_to="a@x")

    def test_tls_copied(self) -> None:
        """The TLS mapping is copied: the caller's later changes do not reach the spool."""
        tls = dict(TLS)
        env = envelope(tls=tls)
        tls["version"] = "SSLv3"
        self.assertEqual(dict(env.tls or {}), TLS)


class SpoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = os.path.join(os.path.abspath(self.mktemp()), "data", "spool")
        self.spool = Spool(self.directory, threadpool_runner=synchronous)

    def listing(self) -> list[str]:
        return sorted(os.listdir(self.directory))

    def finished(self, writer: SpoolWriter, env: Envelope | None = None) -> str:
        return self.successResultOf(writer.finish(env or envelope(), RECEIVED))

    def spooled(self, env: Envelope | None = None, chunks: list[bytes] = CHUNKS) -> str:
        writer = self.spool.open()
        for chunk in chunks:
            writer.write(chunk)
        return self.finished(writer, env)

    def test_round_trip(self) -> None:
        """The bytes come back exactly, with every metadata field."""
        id = self.spooled()
        self.assertEqual(self.spool.ids(), [id])
        message, meta = self.spool.load(id)
        self.assertEqual(message, MESSAGE)
        self.assertEqual(
            meta,
            {
                "id": id,
                "received_at": "2026-11-23T15:55:00Z",
                "protocol": "ESMTPSA",
                "helo": "client.example",
                "mail_from": "sales@example.com",
                "rcpt_to": ["a@example.net", "b@example.org"],
                "mail_auth": "sales@example.com",
                "authz_id": "sales",
                "authn_id": "daniel",
                "auth_info": {
                    "identities": [
                        {"identity": "sales", "context": "SmtpAuthPlainAuthorization"},
                        {"identity": "daniel", "context": "SmtpAuthPlainAuthentication"},
                    ],
                    "groups": ["group1", "group2"],
                    "peer_address": "192.0.2.7",
                },
                "peer": {"address": "192.0.2.7", "port": 40000},
                "local": {"address": "198.51.100.1", "port": 587},
                "tls": TLS,
                "size": len(MESSAGE),
            },
        )
        self.assertEqual(AuthInfo.from_json_dict(meta["auth_info"]), SMTP_AUTH)
        self.assertEqual(self.listing(), [f"{id}.eml", f"{id}.json"])

    def test_null_sender_unauthenticated(self) -> None:
        """The null sender is "", and an unauthenticated plaintext submission has nulls."""
        env = envelope(
            mail_from="", auth_info=None, tls=None, protocol="ESMTP", mail_auth=None, helo=None
        )
        _, meta = self.spool.load(self.spooled(env))
        self.assertEqual(meta["mail_from"], "")
        for key in ("auth_info", "authz_id", "authn_id", "tls", "mail_auth", "helo"):
            self.assertIsNone(meta[key], key)
        self.assertEqual(meta["protocol"], "ESMTP")

    def test_empty_message(self) -> None:
        id = self.spooled(chunks=[])
        self.assertEqual(self.spool.load(id)[0], b"")
        self.assertEqual(self.spool.load(id)[1]["size"], 0)

    def test_size(self) -> None:
        writer = self.spool.open()
        for chunk in CHUNKS:
            writer.write(chunk)
        self.assertEqual(writer.size, len(MESSAGE))
        writer.abort()

    def test_utf8_json(self) -> None:
        """The metadata is UTF-8 JSON; non-ASCII names are kept as they are."""
        auth = AuthInfo(identities=[Identity("jos\u00e9", "SmtpAuthPlainAuthentication")])
        id = self.spooled(envelope(auth_info=auth, mail_from="jos\u00e9@example.com"))
        with open(os.path.join(self.directory, f"{id}.json"), "rb") as f:
            raw = f.read()
        self.assertIn("jos\u00e9@example.com".encode(), raw)
        self.assertEqual(json.loads(raw.decode("utf-8"))["authn_id"], "jos\u00e9")

    def test_lone_surrogate(self) -> None:
        """A name that is not valid Unicode is still stored, escaped."""
        id = self.spooled(envelope(mail_from="x\udcff@example.com"))
        self.assertEqual(self.spool.load(id)[1]["mail_from"], "x\udcff@example.com")

    def test_received_at(self) -> None:
        """Other time zones are converted to UTC; a naive time is taken as UTC; default now."""
        writer = self.spool.open()
        east = datetime(2026, 11, 23, 17, 55, tzinfo=timezone(timedelta(hours=2)))
        _, meta = self.spool.load(self.successResultOf(writer.finish(envelope(), east)))
        self.assertEqual(meta["received_at"], "2026-11-23T15:55:00Z")
        writer = self.spool.open()
        naive = datetime(2026, 11, 23, 15, 55)
        _, meta = self.spool.load(self.successResultOf(writer.finish(envelope(), naive)))
        self.assertEqual(meta["received_at"], "2026-11-23T15:55:00Z")
        before = datetime.now(timezone.utc).replace(microsecond=0)
        writer = self.spool.open()
        _, meta = self.spool.load(self.successResultOf(writer.finish(envelope())))
        when = datetime.strptime(meta["received_at"], "%Y-%m-%dT%H:%M:%SZ")
        self.assertTrue(before <= when.replace(tzinfo=timezone.utc) <= before + timedelta(5))

    def test_ids_sorted_unique(self) -> None:
        """Ids are UTC time plus random hex, unique across many opens; ids() sorts them."""
        writers = [self.spool.open() for _ in range(200)]
        ids = [w.id for w in writers]
        self.assertEqual(len(set(ids)), len(ids))
        for id in ids:
            self.assertRegex(id, ID)
        self.assertEqual(self.spool.ids(), [])
        for writer in reversed(writers):
            self.finished(writer)
        self.assertEqual(self.spool.ids(), sorted(ids))
        now = datetime.now(timezone.utc)
        stamp = datetime.strptime(ids[0][:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
        self.assertLess(abs(now - stamp), timedelta(minutes=1))

    def test_modes(self) -> None:
        """The spool directory is 0700 (parents created too); every file is 0600."""
        self.assertEqual(_mode(self.directory), 0o700)
        writer = self.spool.open()
        self.assertEqual(_mode(os.path.join(self.directory, f".{writer.id}.eml.tmp")), 0o600)
        id = self.finished(writer)
        self.assertEqual(_mode(os.path.join(self.directory, f"{id}.eml")), 0o600)
        self.assertEqual(_mode(os.path.join(self.directory, f"{id}.json")), 0o600)

    def test_existing_directory(self) -> None:
        """A second Spool on the same directory sees the same messages."""
        id = self.spooled()
        self.assertEqual(Spool(self.directory, threadpool_runner=synchronous).ids(), [id])

    def test_directory_is_a_file(self) -> None:
        path = os.path.abspath(self.mktemp())
        with open(path, "wb"):
            pass
        e = self.assertRaises(SpoolError, Spool, path, threadpool_runner=synchronous)
        self.assertIn(path, str(e))

    def test_invisible_until_finished(self) -> None:
        """While DATA arrives there is only a hidden temporary file, and no id."""
        writer = self.spool.open()
        for chunk in CHUNKS:
            writer.write(chunk)
        self.assertEqual(self.listing(), [f".{writer.id}.eml.tmp"])
        self.assertEqual(self.spool.ids(), [])
        self.finished(writer)
        self.assertEqual(self.spool.ids(), [writer.id])

    def test_pending_finish(self) -> None:
        """Until the runner has done the work, nothing is visible and the Deferred waits."""
        jobs: list[tuple[Any, tuple[Any, ...]]] = []

        def later(f: Any, *args: Any) -> defer.Deferred[Any]:
            jobs.append((f, args))
            return defer.Deferred()

        spool = Spool(self.directory, threadpool_runner=later)
        writer = spool.open()
        writer.write(MESSAGE)
        d = writer.finish(envelope(), RECEIVED)
        self.assertNoResult(d)
        self.assertEqual(spool.ids(), [])
        writer.abort()  # a vanished client does not undo a finish under way
        writer.write(b"ignored")
        [(f, args)] = jobs
        self.assertEqual(f(*args), [writer.id])  # one batch of one
        self.assertEqual(spool.load(writer.id)[0], MESSAGE)

    def test_committed_subscribers(self) -> None:
        """Subscribers hear of each committed message before its writer's Deferred, never of a failed one; one that raises changes nothing."""
        heard: list[str] = []

        def broken(id: str) -> None:
            raise RuntimeError("subscriber bug")

        self.spool.committed.extend([broken, heard.append])
        writer = self.spool.open()
        writer.write(MESSAGE)
        d = writer.finish(envelope(), RECEIVED)
        self.assertEqual(heard, [writer.id])
        self.assertEqual(self.successResultOf(d), writer.id)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        failing = self.spool.open()
        failing._error = OSError(28, "No space left on device")
        self.failureResultOf(failing.finish(envelope(), RECEIVED), SpoolError)
        self.assertEqual(heard, [writer.id])

    def test_group_commit(self) -> None:
        """Messages finished while a batch is written go together: one trip, one directory fsync."""
        jobs: list[tuple[Any, tuple[Any, ...], defer.Deferred[Any]]] = []

        def later(f: Any, *args: Any) -> defer.Deferred[Any]:
            jobs.append((f, args, defer.Deferred()))
            return jobs[-1][2]

        spool = Spool(self.directory, threadpool_runner=later)
        writers = [spool.open() for _ in range(4)]
        for w in writers:
            w.write(MESSAGE)
        first = writers[0].finish(envelope(), RECEIVED)
        rest = [w.finish(envelope(), RECEIVED) for w in writers[1:]]
        self.assertEqual(len(jobs), 1)  # the others wait for the batch in flight
        f, args, d = jobs.pop()
        d.callback(f(*args))
        self.assertEqual(self.successResultOf(first), writers[0].id)
        [(f, args, d)] = jobs
        self.assertEqual(len(args[1]), 3)
        synced: list[int] = []
        real = os.fsync
        self.patch(os, "fsync", lambda fd: synced.append(fd) or real(fd))
        d.callback(f(*args))
        self.assertEqual(len(synced), 3 * 2 + 1)  # file + metadata each, one directory
        self.assertEqual([self.successResultOf(x) for x in rest], [w.id for w in writers[1:]])
        self.assertEqual(spool.ids(), sorted(w.id for w in writers))

    def test_fsync(self) -> None:
        """The message and metadata are fsynced, then the directory, after both renames."""
        events: list[tuple[str, Any]] = []
        real_fsync, real_replace = os.fsync, os.replace
        directory = os.stat(self.directory)

        def fsync(fd: int) -> None:
            st = os.fstat(fd)
            if os.path.samestat(st, directory):
                events.append(("fsync", "directory"))
            else:
                events.append(("fsync", st.st_ino))
            real_fsync(fd)

        def replace(source: str, target: str) -> None:
            real_replace(source, target)
            events.append(("replace", os.path.basename(target)))

        self.patch(os, "fsync", fsync)
        self.patch(os, "replace", replace)
        writer = self.spool.open()
        writer.write(MESSAGE)
        self.assertEqual(events, [])  # writes never fsync
        id = self.finished(writer)
        message_inode = os.stat(os.path.join(self.directory, f"{id}.eml")).st_ino
        meta_inode = os.stat(os.path.join(self.directory, f"{id}.json")).st_ino
        self.assertEqual(
            events,
            [
                ("fsync", message_inode),
                ("replace", f"{id}.eml"),
                ("fsync", meta_inode),
                ("replace", f"{id}.json"),
                ("fsync", "directory"),
            ],
        )

    def test_abort(self) -> None:
        """Abort removes the temporary file, is idempotent, and later calls do nothing."""
        writer = self.spool.open()
        writer.write(MESSAGE)
        writer.abort()
        self.assertEqual(self.listing(), [])
        writer.abort()
        writer.write(b"more")
        self.assertEqual(self.listing(), [])
        self.failureResultOf(writer.finish(envelope(), RECEIVED), SpoolError)
        self.assertEqual(self.listing(), [])

    def test_abort_after_finish(self) -> None:
        """A finished message stays; finishing twice fails without touching it."""
        id = self.spooled()
        writer = self.spool.open()
        writer.write(b"x")
        id2 = self.finished(writer)
        writer.abort()
        self.failureResultOf(writer.finish(envelope(), RECEIVED), SpoolError)
        self.assertEqual(self.spool.ids(), sorted([id, id2]))

    def assertClean(self, failure: Any, before: list[str]) -> None:
        """The failure is a one-line SpoolError naming the spool; nothing is left over."""
        message = str(failure.value)
        self.assertIn(self.directory, message)
        self.assertNotIn("\n", message)
        self.assertNotIn("Subject", message)
        self.assertEqual(self.spool.ids(), before)
        self.assertEqual(self.listing(), [f"{i}.{e}" for i in before for e in ("eml", "json")])

    def test_metadata_rename_fails(self) -> None:
        """When the metadata cannot be renamed, the renamed message goes too."""
        before = [self.spooled()]
        real_replace = os.replace

        def replace(source: str, target: str) -> None:
            if target.endswith(".json"):
                raise OSError(5, os.strerror(5))
            real_replace(source, target)

        self.patch(os, "replace", replace)
        writer = self.spool.open()
        writer.write(MESSAGE)
        failure = self.failureResultOf(writer.finish(envelope(), RECEIVED), SpoolError)
        self.assertIn(os.strerror(5), str(failure.value))
        self.assertClean(failure, before)

    def test_message_fsync_fails(self) -> None:
        def fsync(fd: int) -> None:
            raise OSError(28, os.strerror(28))

        self.patch(os, "fsync", fsync)
        writer = self.spool.open()
        writer.write(MESSAGE)
        failure = self.failureResultOf(writer.finish(envelope(), RECEIVED), SpoolError)
        self.assertIn(os.strerror(28), str(failure.value))
        self.assertClean(failure, [])

    def test_directory_fsync_fails(self) -> None:
        """Even a complete message is removed when the directory cannot be synced."""
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                raise OSError(5, os.strerror(5))
            real_fsync(fd)

        self.patch(os, "fsync", fsync)
        writer = self.spool.open()
        writer.write(MESSAGE)
        self.assertClean(self.failureResultOf(writer.finish(envelope(), RECEIVED), SpoolError), [])

    def claim_at_directory_fsync(self, fails: bool) -> tuple[SpoolWriter, list[Any]]:
        """
        Finish a message; when the batch syncs the directory, another
        descriptor (a delivery, in this process or another) tries to claim
        it, as L{Queue.claim} does; then the sync fails or succeeds.
        """
        real = spool_module.fsync_directory
        claims: list[Any] = []

        def fsync_directory(path: str) -> None:
            claims.append(Queue(self.directory).claim(writer.id))
            if fails:
                raise OSError(5, os.strerror(5))
            real(path)

        self.patch(spool_module, "fsync_directory", fsync_directory)
        writer = self.spool.open()
        writer.write(MESSAGE)
        return writer, claims

    def test_not_claimable_until_durable(self) -> None:
        """
        A failed group commit never removes a message someone is delivering:
        renamed into place, it stays locked by its writer until the directory
        is synced, so nobody can claim it, and the client's 451 and retry is
        no duplicate.
        """
        writer, claims = self.claim_at_directory_fsync(fails=True)
        failure = self.failureResultOf(writer.finish(envelope(), RECEIVED), SpoolError)
        self.assertEqual(claims, [None])
        self.assertClean(failure, [])

    def test_claimable_once_durable(self) -> None:
        writer, claims = self.claim_at_directory_fsync(fails=False)
        self.assertEqual(self.finished(writer), writer.id)
        self.assertEqual(claims, [None])
        claim = Queue(self.directory).claim(writer.id)
        self.assertIsNotNone(claim)
        claim.release()

    def test_write_error(self) -> None:
        """A failed write is remembered: later writes are ignored and finish fails."""
        writer = self.spool.open()
        writer.write(CHUNKS[0])
        self.patch(writer, "_file", _FailingFile(writer._file))
        writer.write(CHUNKS[1])
        writer.write(CHUNKS[2])
        self.assertEqual(writer.size, len(CHUNKS[0]))
        failure = self.failureResultOf(writer.finish(envelope(), RECEIVED), SpoolError)
        self.assertIn(os.strerror(28), str(failure.value))
        self.assertIn(writer.id, str(failure.value))
        self.assertClean(failure, [])

    def test_open_fails(self) -> None:
        """A spool that cannot create files refuses the message at once."""
        def denied(*args: Any, **kwargs: Any) -> int:
            raise OSError(13, os.strerror(13))

        self.patch(os, "open", denied)
        e = self.assertRaises(SpoolError, self.spool.open)
        self.assertIn(self.directory, str(e))

    def test_bad_envelope(self) -> None:
        """A programming error in finish() surfaces, and the temporary file is gone."""
        writer = self.spool.open()
        self.assertRaises(AttributeError, writer.finish, None)
        self.assertEqual(self.listing(), [])

    def test_load_errors(self) -> None:
        """load() accepts only ids; unknown ones and corrupt metadata are SpoolErrors."""
        self.assertRaises(SpoolError, self.spool.load, "../../etc/passwd")
        self.assertRaises(SpoolError, self.spool.load, "20261123T155500Z-0000000000000000")
        id = self.spooled()
        with open(os.path.join(self.directory, f"{id}.json"), "wb") as f:
            f.write(b"{")
        self.assertRaises(SpoolError, self.spool.load, id)

    def test_ids_ignores_strays(self) -> None:
        """Temporary files, other names and metadata without a message are not ids."""
        id = self.spooled()
        for name in ("notes.json", ".x.json", "20261123T155500Z-0000000000000000.json",
                     "20261123T155500Z-1111111111111111.eml"):
            with open(os.path.join(self.directory, name), "wb"):
                pass
        self.assertEqual(self.spool.ids(), [id])


class RealRunnerTests(TestCase):
    def test_thread_pool(self) -> defer.Deferred[None]:
        """With the gateway's runner, the work runs in the reactor's thread pool."""
        from twisted.internet import reactor

        runner = functools.partial(deferToThreadPool, reactor, reactor.getThreadPool())
        spool = Spool(os.path.abspath(self.mktemp()), threadpool_runner=runner)
        writer = spool.open()
        writer.write(MESSAGE)
        d = writer.finish(envelope(), RECEIVED)

        def check(id: str) -> None:
            self.assertEqual(id, writer.id)
            self.assertEqual(spool.load(id)[0], MESSAGE)
            self.assertEqual(spool.ids(), [id])

        return d.addCallback(check)

    def test_runner_required(self) -> None:
        """No hidden global reactor: a spool is always told where its work runs."""
        self.assertRaises(TypeError, Spool, os.path.abspath(self.mktemp()))
