# -*- test-case-name: tests.test_queue -*-
"""
The delivery queue's store, on the spool directory: per message a state file
C{<id>.state} next to the spool's C{<id>.eml} and C{<id>.json}, a lock on the
C{.json}, and a scan that lists what is queued.

Whoever changes a message's state or removes it holds its lock,
C{flock(LOCK_EX)} on a read-only descriptor of C{<id>.json}: the gateway
while it delivers the message, the C{authgateway queue} command for a change,
an external consumer while it processes one. Every write is an atomic rename,
so readers need no lock and never see a torn file. A message whose C{.json}
or C{.state} cannot be parsed is moved to C{quarantine/} with one log line,
never retried in a loop.

Everything here blocks on the file system: the gateway calls it through
C{Spool.run} (its thread pool), the command directly.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.logger import Logger

from gateway.fileio import fsync_directory, keep_owner, open_regular, reason, remove
from gateway.smtp.spool import MESSAGE_ID, encode_json

_log = Logger()

#: The version of the C{.state} format this module reads and writes.
STATE_VERSION = 1

#: A recipient's outcome: still to be tried, accepted by a relay, refused for good.
RECIPIENT_STATUSES = frozenset({"pending", "delivered", "failed"})

#: What L{Entry.status} may be, the keys of L{Queue.counts}.
STATUSES = ("queued", "deferred", "held", "done")

#: Leftover C{.eml}/C{.state} files without a C{.json}, and stale temporary
#: files (the spool's C{.<id>.eml.tmp} and C{.<id>.json.tmp} left by a crash
#: during a commit, the queue's C{.<id>.state.tmp}), older than this
#: (seconds) are removed by L{Queue.scan}: a commit or a save in progress is
#: far younger.
ORPHAN_AGE = 3600.0

#: The sub-directory of the spool unreadable messages are moved to.
QUARANTINE = "quarantine"

#: Bound on the size of a C{.json} or C{.state} file read (the metadata of a
#: message with many recipients and long replies stays far below it).
MAX_FILE = 16 * 1024 * 1024

#: How often L{Queue.lock} tries the lock while it waits (seconds).
LOCK_POLL = 0.05

#: The hidden temporary files of a message: C{.<id><suffix>}.
_TEMPORARY = (".eml.tmp", ".json.tmp", ".state.tmp")


class QueueError(Exception):
    """A queue operation failed; one line, never any message content."""


def _optional_str(value: Any, what: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise QueueError(f"{what} is not a string")
    return value


#: The last Unix time a date can show (9999-12-31T23:59:59Z).
_LAST_TIME = 253402300799.0


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise QueueError(f"{what} is not a number")
    if not math.isfinite(value) or not 0 <= value <= _LAST_TIME:
        raise QueueError(f"{what} is out of range")
    return float(value)


@attrs.define
class RecipientState:
    """Where one recipient of a message stands."""

    address: str
    status: str = "pending"
    relay: str | None = None
    reply: str | None = None
    at: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> RecipientState:
        if not isinstance(data, dict):
            raise QueueError(f"{where} is not an object")
        address = data.get("address")
        if not isinstance(address, str):
            raise QueueError(f"{where}: address is not a string")
        status = data.get("status")
        if status not in RECIPIENT_STATUSES:
            raise QueueError(f"{where}: status is not one of pending, delivered, failed")
        return cls(
            address=address,
            status=status,
            relay=_optional_str(data.get("relay"), f"{where}: relay"),
            reply=_optional_str(data.get("reply"), f"{where}: reply"),
            at=_optional_str(data.get("at"), f"{where}: at"),
        )


def recipients_of(meta: dict[str, Any]) -> list[str]:
    """The envelope recipients of a message's metadata; L{QueueError} if malformed or empty."""
    rcpt_to = meta.get("rcpt_to") if isinstance(meta, dict) else None
    if not isinstance(rcpt_to, list) or not all(isinstance(a, str) for a in rcpt_to):
        raise QueueError("rcpt_to is not a list of addresses")
    if not rcpt_to:
        raise QueueError("rcpt_to is empty")
    return rcpt_to


@attrs.define
class QueueState:
    """
    The queue's record of one message (the C{.state} file): per recipient
    its status, aligned by index with the metadata's C{rcpt_to}; attempts and
    when the next is due (Unix time, 0 = now); whether an operator holds it.
    """

    recipients: list[RecipientState]
    attempts: int = 0
    next_attempt: float = 0.0
    held: bool = False
    first_attempt: str | None = None
    last_attempt: str | None = None
    last_error: str | None = None
    bounce_id: str | None = None

    @classmethod
    def fresh(cls, meta: dict[str, Any]) -> QueueState:
        """A message never attempted: every recipient pending, due now."""
        return cls(recipients=[RecipientState(address) for address in recipients_of(meta)])

    @classmethod
    def from_json(cls, data: bytes, meta: dict[str, Any]) -> QueueState:
        """
        Parse a C{.state} file written for C{meta}.

        @raise QueueError: not JSON, not version 1, a field of the wrong type,
            or recipients that do not match C{meta["rcpt_to"]}.
        """
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            raise QueueError("not valid JSON") from None
        if not isinstance(obj, dict):
            raise QueueError("not a JSON object")
        if obj.get("version") != STATE_VERSION:
            raise QueueError(f"not version {STATE_VERSION}")
        attempts = obj.get("attempts", 0)
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 0:
            raise QueueError("attempts is not a count")
        held = obj.get("held", False)
        if not isinstance(held, bool):
            raise QueueError("held is not true or false")
        raw = obj.get("recipients")
        if not isinstance(raw, list):
            raise QueueError("recipients is not a list")
        recipients = [RecipientState.from_dict(r, f"recipient {i}") for i, r in enumerate(raw)]
        if [r.address for r in recipients] != recipients_of(meta):
            raise QueueError("recipients do not match the message's rcpt_to")
        return cls(
            recipients=recipients,
            attempts=attempts,
            next_attempt=_number(obj.get("next_attempt", 0.0), "next_attempt"),
            held=held,
            first_attempt=_optional_str(obj.get("first_attempt"), "first_attempt"),
            last_attempt=_optional_str(obj.get("last_attempt"), "last_attempt"),
            last_error=_optional_str(obj.get("last_error"), "last_error"),
            bounce_id=_optional_str(obj.get("bounce_id"), "bounce_id"),
        )

    def to_json(self) -> bytes:
        """The C{.state} file's bytes (UTF-8; lone surrogates escaped)."""
        data = {
            "version": STATE_VERSION,
            "attempts": self.attempts,
            "next_attempt": float(self.next_attempt),
            "held": self.held,
            "first_attempt": self.first_attempt,
            "last_attempt": self.last_attempt,
            "last_error": self.last_error,
            "bounce_id": self.bounce_id,
            "recipients": [r.to_dict() for r in self.recipients],
        }
        return encode_json(data, indent=1)

    def _indices(self, status: str) -> list[int]:
        return [i for i, r in enumerate(self.recipients) if r.status == status]

    def pending(self) -> list[int]:
        """Indices of the recipients still to be tried."""
        return self._indices("pending")

    def failed(self) -> list[int]:
        """Indices of the recipients refused for good."""
        return self._indices("failed")

    @property
    def done(self) -> bool:
        """Nothing is pending: the message can be bounced (if need be) and removed."""
        return not self.pending()

    @property
    def status(self) -> str:
        """One of L{STATUSES} (see L{Queue.counts})."""
        return _status(self.held, self.done, self.attempts)


def _status(held: bool, done: bool, attempts: int) -> str:
    if held:
        return "held"
    if done:
        return "done"
    return "deferred" if attempts else "queued"


@attrs.frozen
class Entry:
    """
    One complete message as L{Queue.scan} found it: what the delivery's
    schedule and C{authgateway queue list} need, no more (the scan keeps one
    per queued message between scans).
    """

    id: str
    next_attempt: float
    held: bool
    received_at: str
    #: The C{.state} file's modification time (Unix time), None when absent:
    #: a change means someone else (the command) changed the state.
    state_mtime: float | None
    attempts: int = 0
    done: bool = False
    mail_from: str = ""
    #: How many recipients the message has, and how many are still pending.
    recipients: int = 0
    pending: int = 0
    #: The message's size in bytes, as its metadata says (None: not a count).
    size: int | None = None
    last_error: str | None = None

    @property
    def status(self) -> str:
        """C{held}, C{done} (removal or bounce pending), C{deferred} (tried before), C{queued}."""
        return _status(self.held, self.done, self.attempts)


def _intern(text: str | None) -> str | None:
    """One copy of the strings many messages share (a sender, a second, a relay's outage)."""
    return None if text is None else sys.intern(text)


#: What identifies one version of a C{.state} file: a save renames a new
#: file over it, so its inode, change time, modification time or size differ.
_StateKey = tuple[int, int, int, int]


def _state_key(st: os.stat_result) -> _StateKey:
    return (st.st_ino, st.st_ctime_ns, st.st_mtime_ns, st.st_size)


@attrs.define(slots=True)
class _Cached:
    """What a scan keeps of a message: its C{.json}'s inode, its C{.state}'s version, its L{Entry}."""

    json_ino: int
    state_key: _StateKey | None
    entry: Entry


def _check_id(id: str) -> str:
    if not isinstance(id, str) or not MESSAGE_ID.match(id):
        raise QueueError(f"not a message id: {str(id)[:64]!r}")
    return id


def _read_bounded(fd: int, what: str) -> bytes:
    """The whole file behind C{fd} from its start, at most L{MAX_FILE} bytes."""
    chunks = []
    size = 0
    offset = 0
    while True:
        chunk = os.pread(fd, 65536, offset)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        offset += len(chunk)
        if size > MAX_FILE:
            raise QueueError(f"{what} is larger than {MAX_FILE} bytes")
        chunks.append(chunk)


def _read_file(path: str, what: str) -> bytes | None:
    """C{path}'s bytes, or None when it does not exist."""
    try:
        fd = open_regular(path)
    except FileNotFoundError:
        return None
    try:
        return _read_bounded(fd, what)
    finally:
        os.close(fd)


def parse_meta(data: bytes) -> dict[str, Any]:
    """A message's C{.json} metadata; L{QueueError} when it is not usable by the queue."""
    try:
        meta = json.loads(data)
    except (ValueError, RecursionError):
        raise QueueError("not valid JSON") from None
    if not isinstance(meta, dict):
        raise QueueError("not a JSON object")
    recipients_of(meta)
    if not isinstance(meta.get("mail_from"), str):
        raise QueueError("mail_from is not a string")
    if not isinstance(meta.get("received_at"), str):
        raise QueueError("received_at is not a string")
    return meta


class _Corrupt(Exception):
    """A message file that cannot be parsed: which file and why."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(path, why)
        self.path = path
        self.why = why


class _Busy(Exception):
    """The lock is held by someone else."""


class Queue:
    """
    The queue on spool directory C{directory}.

    @param clock: the wall clock (Unix time), for the age of orphans.
    @param log: where quarantines and clean-ups are logged (the command
        passes one that prints warnings).

    Safe to use from several threads at once (the gateway's pool): the
    locks are the files' own; the scan's cache pairs each L{Entry} with the
    versions of the files it was read from, so a stale one is only re-read.
    """

    def __init__(
        self,
        directory: str,
        clock: Callable[[], float] = time.time,
        *,
        log: Logger | None = None,
        orphan_age: float = ORPHAN_AGE,
    ) -> None:
        self.directory = os.fspath(directory)
        self._clock = clock
        self._log = _log if log is None else log
        self._orphan_age = orphan_age
        #: What the last scan found of each message (a C{.json} never changes
        #: after commit; a C{.state} is re-read when its version changed).
        self._cache: dict[str, _Cached] = {}
        #: Claims this object holds, so L{quarantine} can use them.
        self._claims: dict[str, Claim] = {}
        #: Messages whose files could not be read, logged once each.
        self._unreadable: set[str] = set()

    def __repr__(self) -> str:
        return f"<Queue {self.directory!r}>"

    def _path(self, id: str, extension: str) -> str:
        return os.path.join(self.directory, f"{id}.{extension}")

    # --- reading ---------------------------------------------------------------

    def _load_meta(self, id: str, fd: int | None = None) -> dict[str, Any] | None:
        """The metadata of C{id} (from C{fd} if given), None when gone; L{_Corrupt}."""
        path = self._path(id, "json")
        try:
            data = _read_bounded(fd, path) if fd is not None else _read_file(path, path)
            if data is None:
                return None
            return parse_meta(data)
        except QueueError as e:
            raise _Corrupt(path, str(e)) from None

    def _load_state(self, id: str, meta: dict[str, Any]) -> tuple[QueueState, os.stat_result | None]:
        """The state of C{id} (fresh when absent) and its file's stat; L{_Corrupt}."""
        path = self._path(id, "state")
        try:
            fd = open_regular(path)
        except FileNotFoundError:
            return QueueState.fresh(meta), None
        try:
            st = os.fstat(fd)
            data = _read_bounded(fd, path)
        except QueueError as e:
            raise _Corrupt(path, str(e)) from None
        finally:
            os.close(fd)
        try:
            return QueueState.from_json(data, meta), st
        except QueueError as e:
            raise _Corrupt(path, str(e)) from None

    def read(self, id: str) -> tuple[dict[str, Any], QueueState, float | None] | None:
        """
        The metadata, state and state mtime of message C{id} without taking
        its lock (a snapshot, for display); None when there is no such
        message. An unparsable message is quarantined and counts as gone.

        @raise QueueError: a malformed id, or an unreadable file.
        """
        _check_id(id)
        try:
            meta = self._load_meta(id)
            if meta is None:
                return None
            state, st = self._load_state(id, meta)
        except _Corrupt as e:
            self._quarantine_corrupt(id, e)
            return None
        except OSError as e:
            raise QueueError(f"{self.directory}: cannot read message {id}: {reason(e)}") from None
        return meta, state, None if st is None else st.st_mtime

    def scan(self) -> list[Entry]:
        """
        Every complete message, oldest first. A message whose C{.json} or
        C{.state} cannot be parsed is quarantined; C{.eml}/C{.state} files
        without a C{.json} and stale temporary files older than
        L{ORPHAN_AGE} are removed. A file that cannot be read (permissions)
        is logged and skipped.

        What an earlier scan read is kept (an L{Entry} per message): a
        message is read again only when its C{.json} was replaced or its
        C{.state} changed, so a scan of an unchanged queue costs a directory
        listing and a C{stat} per state file.

        @raise QueueError: the directory cannot be listed.
        """
        complete: list[tuple[str, int]] = []
        leftovers: list[tuple[str, str]] = []
        names: set[str] = set()
        inodes: dict[str, int] = {}
        try:
            with os.scandir(self.directory) as listing:
                for item in listing:
                    names.add(item.name)
                    if item.name.endswith(".json"):
                        inodes[item.name] = item.inode()
        except OSError as e:
            raise QueueError(f"{self.directory}: cannot list the queue: {reason(e)}") from None
        for name in names:
            id, dot, extension = name.partition(".")
            if not dot:
                continue
            if extension == "json" and MESSAGE_ID.match(id):
                complete.append((id, inodes[name]))
            elif extension in ("eml", "state") and MESSAGE_ID.match(id):
                if f"{id}.json" not in names:
                    leftovers.append((id, name))
            elif not id:
                for suffix in _TEMPORARY:
                    if extension.endswith(suffix) and MESSAGE_ID.match(extension[: -len(suffix)]):
                        leftovers.append((extension[: -len(suffix)], name))
                        break
        entries = []
        for id, json_ino in complete:
            entry = self._entry(id, json_ino, f"{id}.eml" in names, f"{id}.state" in names)
            if entry is not None:
                entries.append(entry)
        for id, name in leftovers:
            self._remove_orphan(id, name)
        known = {id for id, _ in complete}
        for id in list(self._cache):
            if id not in known:
                self._cache.pop(id, None)
        self._unreadable &= known
        entries.sort(key=lambda e: (e.received_at, e.id))
        return entries

    def _entry(self, id: str, json_ino: int, listed_eml: bool, listed_state: bool) -> Entry | None:
        """
        The entry of message C{id}: the cached one while its files are
        unchanged (as the listing and a C{stat} of its C{.state} see them).
        """
        try:
            if not listed_eml:
                self._check_message_file(id)
            state_key: _StateKey | None = None
            if listed_state:
                try:
                    state_key = _state_key(os.stat(self._path(id, "state"), follow_symlinks=False))
                except FileNotFoundError:
                    pass
            cached = self._cache.get(id)
            if cached is not None and cached.json_ino == json_ino and cached.state_key == state_key:
                return cached.entry
            meta = self._load_meta(id)
            if meta is None:
                return None
            state, st = self._load_state(id, meta)
        except _Corrupt as e:
            self._quarantine_corrupt(id, e)
            return None
        except OSError as e:
            if id not in self._unreadable:
                self._unreadable.add(id)
                self._log.warn("queue: cannot read message {id} in {directory}: {reason}",
                               id=id, directory=self.directory, reason=reason(e))
            return None
        self._unreadable.discard(id)
        size = meta.get("size")
        entry = Entry(
            id=id,
            next_attempt=state.next_attempt,
            held=state.held,
            received_at=sys.intern(meta["received_at"]),
            state_mtime=None if st is None else st.st_mtime,
            attempts=state.attempts,
            done=state.done,
            mail_from=sys.intern(meta["mail_from"]),
            recipients=len(state.recipients),
            pending=len(state.pending()),
            size=size if isinstance(size, int) and not isinstance(size, bool) else None,
            last_error=_intern(state.last_error),
        )
        self._cache[id] = _Cached(json_ino, None if st is None else _state_key(st), entry)
        return entry

    def _forget(self, id: str) -> None:
        """Drop what the scan keeps of C{id} (removed, quarantined)."""
        self._cache.pop(id, None)

    def _check_message_file(self, id: str) -> None:
        """L{_Corrupt} when the C{.json} of C{id} has no C{.eml} next to it."""
        path = self._path(id, "eml")
        if not os.path.lexists(path) and os.path.lexists(self._path(id, "json")):
            raise _Corrupt(path, "the message file is missing")

    def _remove_orphan(self, id: str, name: str) -> None:
        """
        Remove a leftover C{.eml}/C{.state} of a message without a C{.json},
        or a temporary file, once older than the orphan age and only when no
        one is writing it, in this process or another sharing the spool: the
        spool's writers hold a lock on their files in progress (the C{.eml}
        until its C{.json} is in place), a save of the state holds the
        message's lock.
        """
        path = os.path.join(self.directory, name)
        try:
            st = os.stat(path, follow_symlinks=False)
            if self._clock() - st.st_mtime < self._orphan_age:
                return
            if name.endswith(".state.tmp"):
                removed = self._remove_state_temp(id, path)
            else:
                removed = self._remove_unlocked(id, path, committed=not name.startswith("."))
            if removed:
                self._log.info("queue: removed leftover {file}", file=path)
        except (OSError, QueueError) as e:
            self._log.warn("queue: cannot remove leftover {file}: {reason}",
                           file=path, reason=e if isinstance(e, QueueError) else reason(e))

    def _remove_unlocked(self, id: str, path: str, committed: bool) -> bool:
        """
        Remove C{path} if it is still the file found and nobody holds its
        lock (its writer died or gave up); with C{committed}, not if the
        message's C{.json} appeared meanwhile. Whether it was removed.
        """
        try:
            fd = open_regular(path)
        except FileNotFoundError:
            return False
        except OSError:  # a link or a special file: never a writer's, nobody locks it
            return not (committed and os.path.lexists(self._path(id, "json"))) and remove(path)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # its writer is at work
            try:
                same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                return False
            if not same or (committed and os.path.lexists(self._path(id, "json"))):
                return False
            return remove(path)
        finally:
            os.close(fd)

    def _remove_state_temp(self, id: str, path: str) -> bool:
        """Remove a C{.<id>.state.tmp} unless its message is claimed (a save may be writing it)."""
        try:
            fd = self._open_locked(id, None)
        except _Busy:
            return False
        try:
            return remove(path)
        finally:
            if fd is not None:
                os.close(fd)

    def counts(self, entries: Iterable[Entry] | None = None) -> dict[str, int]:
        """
        How many messages are in each of L{STATUSES}: C{queued} (never tried),
        C{deferred} (tried, a retry is scheduled), C{held} (by an operator),
        C{done} (every recipient has its outcome; bounce or removal pending).
        Counts C{entries}, or a fresh L{scan}.
        """
        counts = dict.fromkeys(STATUSES, 0)
        for entry in self.scan() if entries is None else entries:
            counts[entry.status] += 1
        return counts

    # --- locking ---------------------------------------------------------------

    def _open_locked(self, id: str, blocking_until: float | None) -> int | None:
        """
        A read-only descriptor of C{<id>.json} holding its lock; None when
        the message is gone or (C{blocking_until} None or passed) locked.
        """
        path = self._path(id, "json")
        while True:
            try:
                fd = open_regular(path)
            except FileNotFoundError:
                return None
            except OSError as e:
                raise QueueError(f"{self.directory}: cannot open message {id}: {reason(e)}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if blocking_until is None or time.monotonic() >= blocking_until:
                    raise _Busy() from None
                time.sleep(LOCK_POLL)
                continue
            except OSError as e:
                os.close(fd)
                raise QueueError(f"{self.directory}: cannot lock message {id}: {reason(e)}") from None
            # Whoever held the lock may have removed the message (or
            # quarantined it) before releasing it: ours must still be there.
            try:
                still = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                still = False
            if still:
                return fd
            os.close(fd)
            return None

    def _claim(self, id: str, blocking_until: float | None) -> Claim | None:
        _check_id(id)
        if id in self._claims:
            raise _Busy()
        fd = self._open_locked(id, blocking_until)
        if fd is None:
            return None
        try:
            meta = self._load_meta(id, fd)
            if meta is None:  # pragma: no cover - checked under the lock above
                os.close(fd)
                return None
            self._check_message_file(id)
            state, _ = self._load_state(id, meta)
        except _Corrupt as e:
            self._quarantine_files(id, e.path, e.why)
            os.close(fd)
            return None
        except BaseException as e:
            os.close(fd)
            if isinstance(e, OSError):
                raise QueueError(f"{self.directory}: cannot read message {id}: {reason(e)}") from None
            raise
        claim = Claim(self, id, fd, meta, state)
        self._claims[id] = claim
        return claim

    def claim(self, id: str) -> Claim | None:
        """
        Lock message C{id} without waiting, and read its metadata and state
        (a fresh state when it has none).

        @return: the claim; None when someone else holds the lock, the
            message is gone, or it could not be parsed (it is then
            quarantined and logged).
        @raise QueueError: a malformed id, or a file that cannot be read.
        """
        try:
            return self._claim(id, None)
        except _Busy:
            return None

    def lock(self, id: str, timeout: float) -> Claim:
        """
        Like L{claim}, but wait up to C{timeout} seconds for the lock.

        @raise QueueError: no such message, or still locked after C{timeout}
            (the gateway is delivering it).
        """
        try:
            claim = self._claim(id, time.monotonic() + timeout)
        except _Busy:
            raise QueueError(f"message {id} is being delivered; try again later") from None
        if claim is None:
            raise QueueError(f"no message {id} in {self.directory}")
        return claim

    # --- quarantine ------------------------------------------------------------

    def quarantine(self, id: str, why: str) -> None:
        """
        Move message C{id}'s files to C{quarantine/} and log it with C{why}
        (which names the problem, never the content). Uses this queue's
        claim on C{id} if it holds one (and releases it), else takes the lock
        without waiting: when another process holds it, nothing is moved.
        """
        _check_id(id)
        claim = self._claims.get(id)
        if claim is not None:
            try:
                self._quarantine_files(id, self._path(id, "json"), why)
            finally:
                claim.release()
            return
        try:
            fd = self._open_locked(id, None)
        except _Busy:
            self._log.warn("queue: message {id} is locked; not quarantined now ({why})", id=id, why=why)
            return
        if fd is None:
            return
        try:
            self._quarantine_files(id, self._path(id, "json"), why)
        finally:
            os.close(fd)

    def _quarantine_corrupt(self, id: str, e: _Corrupt) -> None:
        try:
            fd = self._open_locked(id, None)
        except (_Busy, QueueError):
            return  # someone is at it; the next look decides
        if fd is None:
            return
        try:
            self._quarantine_files(id, e.path, e.why)
        finally:
            os.close(fd)

    def _quarantine_files(self, id: str, path: str, why: str) -> None:
        """
        Move the files, log one line. The C{.eml} goes first (then nothing
        delivers the message any more), its C{.state} next, the C{.json} last:
        whatever step fails, the message's body is in C{quarantine/} or still
        beside its C{.json}, never an orphan the scan would delete, and the
        next look finishes the move.
        """
        target = os.path.join(self.directory, QUARANTINE)
        self._forget(id)
        try:
            self._make_quarantine(target)
            for extension in ("eml", "state", "json"):
                name = f"{id}.{extension}"
                try:
                    os.replace(os.path.join(self.directory, name), os.path.join(target, name))
                except FileNotFoundError:
                    pass
            fsync_directory(target)
            fsync_directory(self.directory)
        except OSError as e:
            self._log.error("queue: cannot quarantine message {id} ({file}: {why}): {reason}",
                            id=id, file=path, why=why, reason=reason(e))
            return
        self._log.warn("queue: quarantined message {id} in {target}: {file}: {why}",
                       id=id, target=target, file=path, why=why)

    def _make_quarantine(self, target: str) -> None:
        """
        Create C{quarantine/} if need be, owned like the spool directory (a
        C{sudo authgateway queue} must not leave the gateway a directory it
        cannot write).
        """
        try:
            os.mkdir(target, 0o700)
        except FileExistsError:
            return
        fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            keep_owner(fd, os.stat(self.directory))
        finally:
            os.close(fd)


class Claim:
    """
    A message locked by this process: its metadata, its state (to change and
    L{save}), the path of its message file. Release it (or leave the C{with}
    block) when done; L{finish} removes the message.
    """

    def __init__(self, queue: Queue, id: str, fd: int, meta: dict[str, Any], state: QueueState) -> None:
        self.id = id
        self.meta = meta
        self.state = state
        self.message_path = queue._path(id, "eml")
        self._queue = queue
        self._fd: int | None = fd

    def __repr__(self) -> str:
        held = "released" if self._fd is None else "held"
        return f"<Claim {self.id} {held}>"

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _check(self) -> int:
        """The locked C{.json}'s descriptor; L{QueueError} once released."""
        if self._fd is None:
            raise QueueError(f"message {self.id} is no longer claimed")
        return self._fd

    def save(self) -> None:
        """
        Write L{state} durably: a temporary file (truncated, fsynced), renamed
        over C{<id>.state}, the directory fsynced. The file gets the owner and
        group of the message's C{.json} (when root runs C{authgateway queue},
        the gateway must still be able to rewrite it). On failure (C{ENOSPC})
        the previous state is intact, the claim still held, the OSError raised.
        """
        json_fd = self._check()
        queue = self._queue
        data = self.state.to_json()
        temp = os.path.join(queue.directory, f".{self.id}.state.tmp")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                keep_owner(fd, os.fstat(json_fd))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, queue._path(self.id, "state"))
        except BaseException:
            try:
                remove(temp)
            except OSError:
                pass
            raise
        fsync_directory(queue.directory)

    def finish(self) -> None:
        """
        Remove the message: C{.json} first (then it is no longer a message),
        C{.eml}, C{.state}; then release the lock. An OSError removing the
        C{.json} propagates with the claim still held; leftovers after it are
        logged and left to L{Queue.scan}.
        """
        self._check()
        queue = self._queue
        remove(queue._path(self.id, "json"))
        queue._forget(self.id)
        try:
            for extension in ("eml", "state"):
                remove(queue._path(self.id, extension))
            fsync_directory(queue.directory)
        except OSError as e:
            queue._log.warn("queue: message {id} removed, but not its files: {reason}",
                            id=self.id, reason=reason(e))
        finally:
            self.release()

    def release(self) -> None:
        """Give the lock back; idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        claims = self._queue._claims
        if claims.get(self.id) is self:
            claims.pop(self.id, None)
        os.close(fd)


__all__ = [
    "Claim",
    "Entry",
    "ORPHAN_AGE",
    "Queue",
    "QueueError",
    "QueueState",
    "RecipientState",
    "STATUSES",
    "parse_meta",
    "recipients_of",
]
