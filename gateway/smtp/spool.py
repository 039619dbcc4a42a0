# -*- test-case-name: tests.test_spool -*-
"""
The durable spool of accepted messages: each message is a file C{<id>.eml}
next to its metadata C{<id>.json} (who sent it, from where, over what).

A message is streamed to a hidden temporary file while DATA arrives; on
L{SpoolWriter.finish} it is fsynced and renamed, then the metadata is
written the same way and renamed last, and the directory is fsynced, all
before the server answers 250. A message is complete exactly when its
C{.json} exists; a failure removes everything the writer created.

Several processes may write to one spool at once (C{--workers}, instances
on shared storage): ids carry 64 random bits and every file is created with
C{O_EXCL}, so no two writers share a name; and each writer holds a C{flock}
on its files in progress (the message from L{Spool.open} until its
C{.json} is in place), so the queue's clean-up of leftovers, in any
process, never removes a file a live writer is still working on. The lock
on the C{.json} is the message's own (L{gateway.smtp.queue}): the writer
holds it from the C{.json}'s creation until the batch's directory fsync
is done, so no process claims (delivers) a message before it is durable,
and a failed commit removes the message under that lock, knowing that no
one is delivering it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from types import MappingProxyType
from typing import IO, Any

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.authinfo import AuthInfo, IdentityContext
from gateway.fileio import fsync_directory, reason, remove
from gateway.text import message_date, utc_timestamp

#: How a message came in: the protocol words of RFC 3848, as written in
#: C{Received: ... with}; C{HTTP} for the injection API; C{DSN} for a
#: delivery status notification the queue made itself (null sender).
PROTOCOLS = frozenset({"ESMTPSA", "ESMTPA", "ESMTPS", "ESMTP", "HTTP", "DSN"})

_log = Logger()

#: Buffer of the message file: few system calls, bounded memory.
WRITE_BUFFER = 64 * 1024

#: UTC time to the second, then 64 random bits: sortable and unique.
MESSAGE_ID = re.compile(r"\A[0-9]{8}T[0-9]{6}Z-[0-9a-f]{16}\Z")

#: How often L{Spool.open} draws a new id when the temporary name is taken.
_OPEN_ATTEMPTS = 5


class SpoolError(Exception):
    """A message cannot be spooled or read; one line, never any message content."""


def _addresses(value: Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)):
        raise TypeError("rcpt_to must be a collection of addresses, not one string")
    return tuple(value)


def _read_only(value: Mapping[str, str] | None) -> Mapping[str, str] | None:
    return None if value is None else MappingProxyType(dict(value))


@attrs.frozen
class Envelope:
    """Everything known about a message besides its bytes, as the protocol saw it."""

    mail_from: str
    rcpt_to: tuple[str, ...] = attrs.field(converter=_addresses)
    helo: str | None
    auth_info: AuthInfo | None
    peer_address: str | None
    peer_port: int | None
    local_address: str | None
    local_port: int | None
    tls: Mapping[str, str] | None = attrs.field(converter=_read_only)
    protocol: str = attrs.field(validator=attrs.validators.in_(PROTOCOLS))
    mail_auth: str | None = None

    @property
    def authz_id(self) -> str | None:
        """
        The identity the client acts as (AUTH PLAIN's authzid, or its
        authcid); over HTTP, which has no authzid, the one that logged in.
        """
        if self.auth_info is None:
            return None
        authz = self.auth_info.identity_for(IdentityContext.SmtpAuthPlainAuthorization)
        return authz if authz is not None or self.protocol != "HTTP" else self.authn_id

    @property
    def authn_id(self) -> str | None:
        """The identity whose password (or, over HTTP, token) was checked."""
        if self.auth_info is None:
            return None
        contexts = _HTTP_LOGINS if self.protocol == "HTTP" else _SMTP_LOGINS
        for context in contexts:
            name = self.auth_info.identity_for(context)
            if name is not None:
                return name
        return None


_SMTP_LOGINS = (IdentityContext.SmtpAuthPlainAuthentication,)
#: What an injection's login proved (L{gateway.web.inject}).
_HTTP_LOGINS = (IdentityContext.HttpBasicAuth, IdentityContext.BearerToken)


def received_header(envelope: Envelope, hostname: str, id: str, date: str | None = None) -> bytes:
    """
    The C{Received:} header (RFC 5321 4.4) the spool writes on top of a
    message: from the client's HELO name and address (or, without a HELO,
    as over HTTP, its address literal), the TLS in use, by C{hostname} with
    the envelope's protocol word, the message id, the recipient when there
    is one, and the date. Only checked values reach it: a HELO name and
    addresses as the SMTP codec takes them, an IP address, OpenSSL's names.
    """
    peer = envelope.peer_address or "unknown"
    if envelope.helo is not None:
        origin = f"{envelope.helo} ([{peer}])"
    elif envelope.peer_address is None:
        origin = "unknown"
    else:
        origin = f"[IPv6:{peer}]" if ":" in peer else f"[{peer}]"
    tls = envelope.tls
    if tls and "version" in tls and "cipher" in tls:
        using = f"\r\n\t(using {tls['version']} with cipher {tls['cipher']})"
    elif tls is not None and envelope.helo is None:
        using = "\r\n\t(using TLS)"  # a trusted proxy's, or a transport that does not say
    else:
        using = ""
    to = envelope.rcpt_to
    single = len(to) == 1 and to[0].isprintable()  # no header injection
    for_ = f"\r\n\tfor <{to[0]}>" if single else ""
    return (
        f"Received: from {origin}{using}\r\n"
        f"\tby {hostname} (authgateway) with {envelope.protocol}"
        f" id {id}{for_}; {date or message_date()}\r\n"
    ).encode("utf-8", "replace")


def metadata(id: str, envelope: Envelope, size: int, received_at: datetime) -> dict[str, Any]:
    """The JSON object stored next to message C{id}."""
    return {
        "id": id,
        "received_at": utc_timestamp(received_at),
        "protocol": envelope.protocol,
        "helo": envelope.helo,
        "mail_from": envelope.mail_from,
        "rcpt_to": list(envelope.rcpt_to),
        "mail_auth": envelope.mail_auth,
        "authz_id": envelope.authz_id,
        "authn_id": envelope.authn_id,
        "auth_info": None if envelope.auth_info is None else envelope.auth_info.to_json_dict(),
        "peer": {"address": envelope.peer_address, "port": envelope.peer_port},
        "local": {"address": envelope.local_address, "port": envelope.local_port},
        "tls": None if envelope.tls is None else dict(envelope.tls),
        "size": size,
    }


def encode_json(data: dict[str, Any], indent: int | None = None) -> bytes:
    """
    UTF-8 JSON (a C{.json} or C{.state} file); strings that are not valid
    Unicode (lone surrogates) are escaped.
    """
    try:
        return json.dumps(data, ensure_ascii=False, indent=indent).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(data, indent=indent).encode("ascii")


def _new_id() -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return f"{stamp}-{secrets.token_hex(8)}"


def _create(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)


def _create_locked(path: str) -> int:
    """
    A new file at C{path} (never an existing one), locked (C{flock}) for as
    long as the descriptor is open: the queue's clean-up, in this process or
    another, removes a leftover only once it holds its lock
    (L{gateway.smtp.queue.Queue.scan}).

    @raise FileExistsError: the name is taken, or a clean-up got the file
        before its lock (the file is then removed: try again).
    """
    fd = _create(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        ours = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
    except (BlockingIOError, FileNotFoundError):
        ours = False
    except BaseException:
        os.close(fd)
        raise
    if not ours:  # a clean-up is removing it (or did): the name was ours, free it
        os.close(fd)
        try:
            remove(path)
        except OSError:
            pass
        raise FileExistsError(errno.EEXIST, "taken by a clean-up", path)
    return fd


class Spool:
    """
    A directory of accepted messages.

    @param directory: created (mode 0700, parents too) when missing.
    @param threadpool_runner: C{runner(f, *args) -> Deferred} running the
        fsyncs and renames off the reactor thread (the gateway passes
        C{deferToThreadPool} on its reactor's pool); tests pass a synchronous one.
    @raise SpoolError: when the directory cannot be created.
    """

    def __init__(
        self,
        directory: str,
        *,
        threadpool_runner: Callable[..., Deferred[Any]],
    ) -> None:
        self.directory = os.fspath(directory)
        self._runner = threadpool_runner
        self._queue: list[tuple[SpoolWriter, bytes, Deferred[str]]] = []
        self._committing = False
        #: Called with each message id once it is committed, in the reactor
        #: thread, before the writer's Deferred fires (the delivery queue
        #: subscribes); an exception is logged, never the writer's failure.
        self.committed: list[Callable[[str], None]] = []
        #: Asked before a new message is started (L{admit}); the delivery
        #: queue sets it to slow submissions down to the relay's pace.
        self.admission: Callable[[], Deferred[None] | None] | None = None
        #: For the metrics: messages committed and their bytes, by the
        #: envelope's protocol word (L{PROTOCOLS}).
        self.accepted: Counter[str] = Counter()
        self.accepted_bytes: Counter[str] = Counter()
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
        except OSError as e:
            raise SpoolError(f"{self.directory}: cannot create the spool: {reason(e)}") from None

    def __repr__(self) -> str:
        return f"<Spool {self.directory!r}>"

    def run(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """C{f(*args)} in the runner (off the reactor thread in the gateway)."""
        return self._runner(f, *args)

    def _commit(self, writer: SpoolWriter, meta: bytes) -> Deferred[str]:
        """
        Queue a finished message for the committer. Messages finished while
        a batch is being written form the next batch: one trip to the thread
        and one directory fsync for all of them (group commit).
        """
        d: Deferred[str] = Deferred()
        self._queue.append((writer, meta, d))
        if not self._committing:
            self._next_batch()
        return d

    def _next_batch(self) -> None:
        batch, self._queue = self._queue, []
        if not batch:
            self._committing = False
            return
        self._committing = True
        jobs = [(writer, meta) for writer, meta, _ in batch]
        d = defer.maybeDeferred(self.run, _commit_batch, self.directory, jobs)
        d.addBoth(self._batch_done, batch)

    def _batch_done(self, results: Any, batch: list[tuple[Any, bytes, Deferred[str]]]) -> None:
        if isinstance(results, Failure):  # the runner itself failed: nothing was committed
            results = [writer._failed(results.value) for writer, _, _ in batch]
        for (writer, _, d), result in zip(batch, results):
            if isinstance(result, BaseException):
                d.errback(Failure(result))
            else:
                self.accepted[writer.protocol] += 1
                self.accepted_bytes[writer.protocol] += writer.size
                self._announce(result)
                d.callback(result)
        self._next_batch()

    def admit(self) -> Deferred[None] | None:
        """None when a new message may start now, else a Deferred firing when it may."""
        return None if self.admission is None else self.admission()

    def _announce(self, id: str) -> None:
        for subscriber in self.committed:
            try:
                subscriber(id)
            except Exception:  # noqa: BLE001 - the message is committed whatever a subscriber does
                _log.failure("spool subscriber {subscriber!r} failed on {id}", subscriber=subscriber, id=id)

    def open(self) -> SpoolWriter:
        """
        Start a new message: its hidden temporary file is created at once.

        @raise SpoolError: when the file cannot be created (answer 451).
        """
        for _ in range(_OPEN_ATTEMPTS):
            id = _new_id()
            temp = os.path.join(self.directory, f".{id}.eml.tmp")
            try:
                fd = _create_locked(temp)
            except FileExistsError:
                continue
            except OSError as e:
                raise SpoolError(f"{self.directory}: cannot spool a message: {reason(e)}") from None
            return SpoolWriter(self, id, os.fdopen(fd, "wb", buffering=WRITE_BUFFER))
        raise SpoolError(f"{self.directory}: cannot spool a message: no free name")

    def ids(self) -> list[str]:
        """The ids of the complete messages, oldest first."""
        try:
            names = os.listdir(self.directory)
        except OSError as e:
            raise SpoolError(f"{self.directory}: cannot list the spool: {reason(e)}") from None
        present = set(names)
        found = []
        for name in names:
            id, dot, extension = name.partition(".")
            if dot and extension == "json" and MESSAGE_ID.match(id) and f"{id}.eml" in present:
                found.append(id)
        return sorted(found)

    def load(self, id: str) -> tuple[bytes, dict[str, Any]]:
        """
        The bytes and metadata of message C{id}, for tests and tools; the whole
        message is read into memory.

        @raise SpoolError: unknown or malformed id, or unreadable files.
        """
        if not isinstance(id, str) or not MESSAGE_ID.match(id):
            raise SpoolError(f"{self.directory}: not a message id: {str(id)[:64]!r}")
        base = os.path.join(self.directory, id)
        try:
            with open(base + ".json", "rb") as f:
                meta = json.loads(f.read())
            with open(base + ".eml", "rb") as f:
                message = f.read()
        except OSError as e:
            raise SpoolError(f"{self.directory}: cannot read message {id}: {reason(e)}") from None
        except ValueError:
            raise SpoolError(f"{self.directory}: metadata of {id} is not valid JSON") from None
        return message, meta


def _commit_batch(directory: str, jobs: list[tuple[SpoolWriter, bytes]]) -> list[Any]:
    """
    Write each message and its metadata (fsynced, renamed), then fsync the
    directory once for all. Returns, per job, its id or the L{SpoolError};
    if the directory cannot be synced, every message of the batch is removed
    and its client told to try again (451). Each message's lock (on its
    C{.json}) is held until then: renamed into place, a message is visible
    but no one can claim it, so none of the batch is being delivered when
    it is removed, and the client's retry is never a duplicate.
    """
    results: list[Any] = []
    try:
        for writer, meta in jobs:
            try:
                writer._write_files(meta)
            except Exception as e:  # noqa: BLE001 - reported per message
                results.append(writer._failed(e))
            else:
                results.append(writer.id)
        if any(isinstance(r, str) for r in results):
            try:
                fsync_directory(directory)
            except Exception as e:  # noqa: BLE001
                results = [
                    writer._failed(e) if isinstance(r, str) else r
                    for (writer, _), r in zip(jobs, results)
                ]
    finally:
        for writer, _ in jobs:  # durable (or removed): the queue may claim them now
            writer._unlock()
    return results


class SpoolWriter:
    """
    One message on its way into the spool: L{write} each chunk, then
    L{finish} or L{abort}. Use it from the reactor thread only.

    @ivar id: the message's id, chosen by L{Spool.open}.
    @ivar size: the bytes written so far.
    """

    def __init__(self, spool: Spool, id: str, file: IO[bytes]) -> None:
        self.id = id
        self.size = 0
        #: The envelope's protocol word, once L{finish} has it.
        self.protocol = "ESMTP"
        self._spool = spool
        self._file = file
        #: The C{.json} (first as its temporary file), open and locked from
        #: its creation until the commit is durable or has failed.
        self._meta_file: IO[bytes] | None = None
        self._error: BaseException | None = None
        self._closed = False
        base = os.path.join(spool.directory, id)
        self._temp = os.path.join(spool.directory, f".{id}.eml.tmp")
        self._message = base + ".eml"
        self._meta_temp = os.path.join(spool.directory, f".{id}.json.tmp")
        self._meta = base + ".json"

    def __repr__(self) -> str:
        return f"<SpoolWriter {self.id} size={self.size}>"

    def write(self, data: bytes) -> None:
        """
        Append C{data} (un-dot-stuffed, CRLF line ends) to the message. An
        error is kept for L{finish} to report; writes after it, or after
        L{finish} or L{abort}, are ignored.
        """
        if self._closed or self._error is not None:
            return
        try:
            self._file.write(data)
        except OSError as e:
            self._error = e
            return
        self.size += len(data)

    def finish(self, envelope: Envelope, received_at: datetime | None = None) -> Deferred[str]:
        """
        Make the message durable and visible with its metadata.

        @param received_at: when the message was received; now if None.
        @return: fires with L{id} once the message, its metadata and the
            directory are fsynced, or fails with L{SpoolError} after removing
            every file this writer created.
        """
        if self._closed:
            return defer.fail(SpoolError(f"{self._spool.directory}: message {self.id} "
                                         "was already finished or aborted"))
        self._closed = True
        if received_at is None:
            received_at = datetime.now(timezone.utc)
        try:
            meta = encode_json(metadata(self.id, envelope, self.size, received_at))
            self.protocol = envelope.protocol
        except BaseException:
            self._clean_up()
            raise
        return self._spool._commit(self, meta)

    def _write_files(self, meta: bytes) -> None:
        """
        The blocking part of L{finish}, in the committer's thread. The
        message file stays open (locked) until its C{.json} is in place: a
        C{.eml} without a C{.json} is a leftover only when nobody holds it.
        The C{.json} stays open (locked: the message's lock) until
        L{_unlock}, once the directory is synced (L{_commit_batch}).
        """
        if self._error is not None:
            raise self._error
        self._file.flush()
        os.fsync(self._file.fileno())
        os.replace(self._temp, self._message)
        f = self._meta_file = os.fdopen(self._create_meta_temp(), "wb")
        f.write(meta)
        f.flush()
        os.fsync(f.fileno())
        os.replace(self._meta_temp, self._meta)
        self._file.close()

    def _unlock(self) -> None:
        """Close the C{.json}, releasing the message's lock; idempotent, best effort."""
        f, self._meta_file = self._meta_file, None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass

    def _create_meta_temp(self) -> int:
        for _ in range(_OPEN_ATTEMPTS):
            try:
                return _create_locked(self._meta_temp)
            except FileExistsError:
                continue
        return _create_locked(self._meta_temp)

    def _failed(self, e: BaseException) -> SpoolError:
        self._clean_up()
        return SpoolError(f"{self._spool.directory}: cannot spool message {self.id}: {reason(e)}")

    def abort(self) -> None:
        """
        Drop the message (client gone, too big, RSET). Idempotent; after
        L{finish}, a no-op: the message is then committed or cleaned up by it.
        """
        if self._closed:
            return
        self._closed = True
        self._clean_up()

    def _clean_up(self) -> None:
        """
        Close the file and remove everything this writer created; best
        effort. The message's lock is released only once its files are gone.
        """
        try:
            self._file.close()
        except OSError:
            pass
        # The metadata first: while it exists, the message counts as complete.
        for path in (self._meta, self._meta_temp, self._message, self._temp):
            try:
                remove(path)
            except OSError:
                pass
        self._unlock()
