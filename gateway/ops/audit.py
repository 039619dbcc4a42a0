# -*- test-case-name: tests.test_audit -*-
"""
The audit log (C{--audit-log PATH|-}): one JSON object per line for every
login attempt (L{LoginEvent}) and every authorization decision
(L{AuthzEvent}) published on the core's events hub, for an operator's
tools (fail2ban, a SIEM). The schema is in the README, "Audit log".

The events of one reactor turn are formatted together at its end and
written with one C{write(2)} on a descriptor opened with C{O_APPEND} (at
most L{MAX_BATCH} at a time): a tailing reader sees each event within the
turn, a crash loses at most that turn's, and under load the formatting
runs in a tight loop instead of once in the middle of every request (a
login line cost about 19 us there against 4.5 us in a loop). Keys come in a
fixed order (fail2ban's filter relies on it: the peer address and network
come before any text a client chose), strings are capped (L{MAX_TEXT}) and every control
or non-ASCII character is escaped by JSON, so one event is one line whatever
a client sent. A failing disk (ENOSPC) costs events, never a login: the
failure is logged once per episode, with the count lost when writing works
again. SIGUSR1 reopens the file (after logrotate moved it); twistd's own
handler, which rotates its log, is still called.
"""

from __future__ import annotations

import errno
import math
import os
import signal
import stat
from json.encoder import encode_basestring_ascii as _quote  # type: ignore[attr-defined]
from typing import Any

from twisted.application import service
from twisted.logger import Logger

from gateway.addresses import ip_or_none, peer_key
from gateway.fileio import reason
from gateway.events import AuthzEvent, LoginEvent
from gateway.ops.signals import on_signal
from gateway.ratelog import LogRateLimiter, suppressed_note
from gateway.text import utc_millis

log = Logger()

#: The longest string kept in a field; a longer one is cut and named in C{truncated}.
MAX_TEXT = 256
#: The most identities or groups kept in a line; more are cut and named in C{truncated}.
MAX_ITEMS = 64
#: Mode of a new audit log: the owner writes, its group (a log reader's,
#: like fail2ban's or Debian's C{adm}) reads, nobody else. No secret is in it,
#: but identities and addresses are.
MODE = 0o640
#: The path meaning standard output.
STDOUT = "-"
#: Events kept for the end of the reactor turn at most; more are written at once.
MAX_BATCH = 1024


def _text(value: Any, name: str, truncated: list[str]) -> str:
    """
    C{value} as a JSON string, capped at L{MAX_TEXT} characters (a cut adds
    C{name} to C{truncated}); None is C{null}. Escaped by the json module's
    own (C) function: quotes, controls and every non-ASCII character.
    """
    if value is None:
        return "null"
    if type(value) is not str or len(value) > MAX_TEXT:
        if isinstance(value, bytes):
            value = value.decode("utf-8", "backslashreplace")
        elif not isinstance(value, str):
            value = str(value)
        if len(value) > MAX_TEXT:
            if name not in truncated:
                truncated.append(name)
            value = value[:MAX_TEXT]
    return _quote(value)


#: JSON of a boolean, or of anything else (None) as null.
_BOOLEAN = {True: "true", False: "false"}


#: Fragments of the fields that repeat from event to event (a peer, a
#: listener, an outcome, a session), each formatted once: (JSON, the names
#: of the fields it cut). Bounded: cleared when full.
_FRAGMENTS: dict[Any, tuple[str, tuple[str, ...]]] = {}
MAX_FRAGMENTS = 4096


def _cached(key: tuple[Any, ...], build: Any, truncated: list[str]) -> str:
    """
    The fragment C{build(key, cut)} makes for C{key} (formatted once), the
    names of the fields it cut added to C{truncated}.
    """
    try:
        hit = _FRAGMENTS.get(key)
    except TypeError:  # an unhashable value: formatted each time
        return build(key, truncated)  # type: ignore[no-any-return]
    if hit is None:
        cut: list[str] = []
        hit = build(key, cut), tuple(cut)
        if len(_FRAGMENTS) >= MAX_FRAGMENTS:
            _FRAGMENTS.clear()
        _FRAGMENTS[key] = hit
    if hit[1]:
        truncated.extend(hit[1])
    return hit[0]


def _session(key: tuple[Any, ...], cut: list[str]) -> str:
    """The C{identities} and C{groups} keys of (_, identities, groups), each list and string capped."""
    _, identities, groups = key
    for name, items in (("identities", identities), ("groups", groups)):
        if len(items) > MAX_ITEMS:
            cut.append(name)
    listed = ", ".join(
        f'{{"identity": {_text(i.identity, "identities", cut)},'
        f' "context": {_text(i.context.value, "identities", cut)}}}'
        for i in identities[:MAX_ITEMS]
    )
    named = ", ".join(_text(g, "groups", cut) for g in groups[:MAX_ITEMS])
    return f'"identities": [{listed}], "groups": [{named}]'


def _session_of(info: Any, absent: str, truncated: list[str]) -> str:
    """The C{identities} and C{groups} keys of C{info} (formatted once per session), or C{absent}."""
    if info is None:
        return absent
    return _cached(("session", tuple(info.identities), tuple(info.groups)), _session, truncated)


def _where(key: tuple[Any, ...], cut: list[str]) -> str:
    """
    protocol, listener, peer_address and peer_network of (_, protocol,
    listener, address): keys every line has. C{peer_network} is the
    throttle's key of the peer (the IPv4 address, the IPv6 /64: one host
    usually owns a whole /64), what fail2ban bans; null without an IP address.
    """
    _, protocol, listener, address = key
    network = peer_key(ip_or_none(address))
    return (
        f'"protocol": {_text(protocol, "protocol", cut)},'
        f' "listener": {_text(listener, "listener", cut)},'
        f' "peer_address": {_text(address, "peer_address", cut)},'
        f' "peer_network": {_text(network, "peer_network", cut)}'
    )


def _login_head(key: tuple[Any, ...], cut: list[str]) -> str:
    """outcome and reason of (_, outcome, reason, protocol, listener, address), then L{_where}."""
    _, outcome, reason, *where = key
    return (
        f'"outcome": {_text(outcome, "outcome", cut)}, "reason": {_text(reason, "reason", cut)}, '
        + _where((None, *where), cut)
    )


def _tail(port: Any, tls: Any) -> str:
    """peer_port and tls."""
    return (
        f' "peer_port": {port if type(port) is int else "null"},'
        f' "tls": {_BOOLEAN.get(tls, "null")}'
    )


def _end(truncated: list[str]) -> bytes:
    """The line's end: C{truncated} when a field was cut."""
    if not truncated:
        return b"}\n"
    return (', "truncated": [' + ", ".join(map(_quote, truncated)) + "]}\n").encode("ascii")


def login_line(event: LoginEvent) -> bytes:
    """
    The audit line of a login attempt: ASCII JSON, its keys in the
    documented order, a newline. Formatted by hand (a dict through
    C{json.dumps} takes twice as long: a line per login), every string
    through L{_text}, the fields that repeat from login to login formatted
    once (L{_cached}).
    """
    truncated: list[str] = []
    session = _session_of(event.auth_info, '"identities": null, "groups": null', truncated)
    head = _cached(
        ("login", event.outcome, event.reason, event.protocol, event.listener,
         event.peer_address),
        _login_head, truncated,
    )
    duration = round(event.duration * 1000, 3)
    line = (
        f'{{"time": "{utc_millis(event.time)}", "event": "login", {head},'
        f'{_tail(event.peer_port, event.tls)},'
        f' "mechanism": {_text(event.mechanism, "mechanism", truncated)},'
        f' "identity": {_text(event.identity, "identity", truncated)},'
        f' {session}, "duration_ms": {repr(duration) if math.isfinite(duration) else "null"},'
        f' "client_left": {_BOOLEAN[event.client_left is True]}'
    )
    return line.encode("ascii") + _end(truncated)


def authz_line(event: AuthzEvent) -> bytes:
    """The audit line of an authorization decision, as L{login_line}."""
    truncated: list[str] = []
    session = _session_of(event.auth_info, '"identities": [], "groups": []', truncated)
    where = _cached(
        ("where", event.protocol, event.listener, event.peer_address), _where, truncated
    )
    allowed = event.allowed is True
    line = (
        f'{{"time": "{utc_millis(event.time)}", "event": "authz",'
        f' "outcome": "{"allowed" if allowed else "denied"}", {where},'
        f'{_tail(event.peer_port, event.tls)}, {session},'
        f' "resource": {_text(event.resource, "resource", truncated)},'
        f' "privilege": {_text(event.privilege, "privilege", truncated)},'
        f' "allowed": {_BOOLEAN[allowed]}'
    )
    return line.encode("ascii") + _end(truncated)


def open_log(path: str) -> int:
    """
    A descriptor appending to the regular file C{path}. A new file gets
    L{MODE} whatever the umask (a unit's C{UMask=0077} would make it
    unreadable to the log reader's group); an existing one keeps its mode.
    A FIFO or device (or a link to one) is refused before it is opened:
    opening one could act on it, and a write to it could block the reactor
    for ever.

    @raise OSError: it cannot be opened, or is not a regular file (then
        without an errno, its text saying so).
    """
    created = not _regular_or_missing(path)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    fd = os.open(path, flags, MODE)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced since the check
            raise OSError(_NOT_REGULAR)
        if created:
            os.fchmod(fd, MODE)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


#: Why a path that exists but is no regular file is refused.
_NOT_REGULAR = "not a regular file"


def _regular_or_missing(path: str) -> bool:
    """
    Whether C{path} (followed if a link) exists.

    @raise OSError: it exists and is not a regular file.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(mode):
        raise OSError(_NOT_REGULAR)
    return True


def check_path(path: str) -> None:
    """
    Whether the gateway could write the audit log at C{path}, checked
    without creating it (the gateway opens it when it starts, as the user
    it runs as).

    @raise ValueError: naming the problem.
    """
    if path == STDOUT:
        return
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory")
    try:
        _regular_or_missing(path)
    except OSError as e:
        raise ValueError(f"{path}: {reason(e)}") from None
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise ValueError(f"{path}: {os.strerror(errno.EACCES)}")
        return
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"{directory}: no such directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"{directory}: {os.strerror(errno.EACCES)}")


class AuditLogUnavailable(SystemExit):
    """
    The audit log cannot be opened when the gateway starts: a C{SystemExit},
    so that twistd ends with this one line on stderr and a non-zero status.
    """


class AuditLog(service.Service):
    """
    The audit log: a sink of the events hub (L{login}, L{authz}) and a
    service attached to the core, which opens the file when the gateway
    starts and closes it when it stops (after the front doors: the events
    of sessions drained at stop are written).

    @param path: the file, or C{"-"} for standard output (the descriptor
        itself: under twistd, C{sys.stdout} is its log).
    @param write: C{os.write}, or a test's.
    @param reactor: where the end of a turn is scheduled (L{flush}); without
        one, each event is written when it happens.
    """

    name = "audit-log"
    #: Stopped after the other core services (L{gateway.ops.drain.stops_last}).
    stops_last = True

    def __init__(
        self, path: str, write: Any = os.write, opener: Any = open_log, reactor: Any = None
    ) -> None:
        self.path = path
        self._write = write
        self._open = opener
        self._reactor = reactor
        #: Events waiting for the end of the turn: (formatter, event).
        self._batch: list[tuple[Any, Any]] = []
        self._flushing: Any = None
        self._fd: int | None = None
        #: A write failed: this episode is logged, its events counted.
        self._failing = False
        #: Events lost (since start), and in the current episode of failures.
        self.lost = 0
        self._lost_now = 0
        self._bugs = LogRateLimiter()
        #: The last failed write left part of a line: the next one ends it first.
        self._partial = False
        #: Events written (since start).
        self.written = 0

    def __repr__(self) -> str:
        return f"<AuditLog {self.path!r} written={self.written} lost={self.lost}>"

    # -- the service -------------------------------------------------------

    def startService(self) -> None:
        """
        Open the file; one that cannot be opened stops the gateway from
        starting (L{AuditLogUnavailable}): running without the audit log the
        operator asked for would blind fail2ban unnoticed.
        """
        if self._fd is None and self.path != STDOUT:
            try:
                self._fd = self._open(self.path)
            except OSError as e:
                raise AuditLogUnavailable(
                    f"twistd authgateway: error: --audit-log {self.path}: cannot open: {reason(e)}"
                ) from None
        elif self._fd is None:
            self._fd = 1
        super().startService()

    def stopService(self) -> None:
        self.flush()
        super().stopService()
        self.close()

    def flush(self) -> None:
        """Format and write the events waiting for the end of the turn."""
        if self._flushing is not None:
            if self._flushing.active():
                self._flushing.cancel()
            self._flushing = None
        batch, self._batch = self._batch, []
        if not batch:
            return
        try:
            lines = [make(event) for make, event in batch]
        except Exception:  # a bug: one event at a time, the bad ones counted lost
            lines = [line for line in (self._format(m, e) for m, e in batch) if line is not None]
        if lines:
            self._append(b"".join(lines), len(lines))

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None and self.path != STDOUT:
            os.close(fd)

    def reopen(self) -> None:
        """
        Open the path again (on SIGUSR1, after a rotation moved the file):
        new lines go to the new file; if it cannot be opened, they keep
        going to the old descriptor, and the problem is logged.
        """
        if self.path == STDOUT or not self.running:
            return
        fd = self._opened()
        if fd is None:
            return
        self.flush()  # what happened before the rotation goes to the old file
        self.close()
        self._fd = fd
        self._partial = False
        log.info("audit log {path} reopened", path=self.path)

    def _opened(self) -> int | None:
        if self.path == STDOUT:
            return 1
        try:
            return self._open(self.path)
        except OSError as e:
            log.error("audit log {path}: cannot open: {why}", path=self.path, why=reason(e))
            return None

    # -- the sink ----------------------------------------------------------

    def login(self, event: LoginEvent) -> None:
        self._record(login_line, event)

    def authz(self, event: AuthzEvent) -> None:
        self._record(authz_line, event)

    def _record(self, make: Any, event: Any) -> None:
        """Keep one event for the end of the turn (or write it now, without a reactor)."""
        if not self.running:  # stopped (or not started): the event is lost, and counted
            self.lost += 1
            return
        if self._reactor is None:
            line = self._format(make, event)
            if line is not None:
                self._append(line, 1)
            return
        self._batch.append((make, event))
        if len(self._batch) >= MAX_BATCH:
            self.flush()
        elif self._flushing is None:
            self._flushing = self._reactor.callLater(0, self.flush)

    def _format(self, make: Any, event: Any) -> bytes | None:
        """One event's line; a bug here is logged and the event counted lost, never raised."""
        try:
            return make(event)  # type: ignore[no-any-return]
        except Exception:
            self.lost += 1
            suppressed = self._bugs.admit("bug")
            if suppressed is not None:
                log.failure(
                    "audit log: an event could not be written" + suppressed_note(suppressed),
                    suppressed=suppressed,
                )
            return None

    def _append(self, line: bytes, count: int) -> None:
        """Write C{line} (C{count} events' lines), all of it or count them lost."""
        fd = self._fd
        if fd is None:  # the open failed: SIGUSR1 tries again
            self.lost += count
            return
        data = b"\n" + line if self._partial else line
        pending = memoryview(data)
        try:
            while pending:
                pending = pending[self._write(fd, pending):]
        except OSError as e:
            if len(pending) < len(data):
                self._partial = True  # part of it is in the file
            self.lost += count
            self._lost_now += count
            if not self._failing:
                self._failing = True
                log.error(
                    "audit log {path}: cannot write: {why}; events are lost until it can",
                    path=self.path, why=reason(e),
                )
            return
        self._partial = False
        self.written += count
        if self._failing:
            self._failing = False
            log.warn("audit log {path}: writing again, {lost} events were lost",
                     path=self.path, lost=self._lost_now)
            self._lost_now = 0


def attach_audit_log(core: Any, path: str | None) -> AuditLog | None:
    """
    With C{--audit-log PATH}, the audit log: a sink of C{core.events}, a
    service of the core, reopened on SIGUSR1.
    """
    if path is None:
        return None
    audit = AuditLog(path, reactor=core.reactor)
    core.events.add(audit)
    core.attach(audit)
    on_signal(core.reactor, signal.SIGUSR1, audit.reopen)
    return audit


__all__ = [
    "AuditLog", "AuditLogUnavailable", "MAX_BATCH", "MAX_ITEMS", "MAX_TEXT", "MODE", "attach_audit_log",
    "authz_line", "check_path", "login_line", "open_log",
]
