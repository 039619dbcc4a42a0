# -*- test-case-name: tests.test_workers -*-
"""
C{--workers N}: N processes serving the same listeners, one parent
supervising them.

The parent (L{Supervisor}) builds no core and no front door. It opens every
listener's socket once (no C{SO_REUSEPORT}: the port is its alone), which
every worker accepts on, one connection per wake-up; it keeps them while it
runs (a restarted worker adopts the same socket; the others accept
everything meanwhile) and closes its copies first at stop; it starts each
worker as a
C{twistd -n authgateway} child with C{reactor.spawnProcess}:

 - fd 0, a pipe from the parent: the worker's options (one line), then
   its end (the parent is gone) stops the worker, as does C{PR_SET_PDEATHSIG} (SIGTERM) on Linux;
 - fd 1, the parent's standard output (C{--audit-log -});
 - fd 2, a pipe: what the worker writes on standard error is logged;
 - fd 3 (L{LOG_FD}), a pipe: the worker's twisted.logger events, formatted, as JSON
   lines (its twistd runs with C{--logger} L{pipe_logger}), re-emitted in
   the parent's log tagged C{worker=K}, so the parent's C{--logfile} or
   C{--syslog} holds every process's lines (never blocking the worker:
   L{PipeWriter});
 - fd 4 on (L{FIRST_LISTENER_FD}), the listeners' sockets.

The worker's plugin options are the parent's as the operator gave them,
written as one JSON line on its fd 0 right after it starts (L{argv_line},
L{read_worker_argv}): never on its command line (which anyone can read
with C{ps}) nor in its environment (which C{/proc/PID/environ} keeps for its
whole life): they may hold passwords (C{--state}'s URL, C{--auth memory:}).
Its command line carries only the hidden options
C{--worker-slot K --worker-fds smtp=4,...}.

A worker that exits unexpectedly is logged and restarted after a backoff
(L{BACKOFF_FIRST} s doubling up to L{BACKOFF_MAX} s, back to the first after
L{BACKOFF_RESET} s up). SIGTERM or SIGINT stops the parent: no more
restarts, SIGTERM to every worker (they drain), SIGKILL to what is left after
C{--drain-timeout} plus L{STOP_GRACE} s; a second signal is forwarded (the
workers abort their sessions). SIGHUP (reload) and SIGUSR1 (audit log
reopen) are forwarded; to a worker still starting, once it says its
handlers are in place (L{READY}): before, their default action would kill
it. Every worker handles both (SIGUSR1 does nothing without an audit log).
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import select
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.interfaces import IReadDescriptor, IStreamServerEndpoint
from twisted.logger import LogLevel, Logger, eventAsText, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.connections import _keyword, _split
from gateway.ops import metrics as ops_metrics
from gateway.ops.signals import on_signal
from gateway.state.url import shown
from gateway.twistedinternals import accept_one_per_wakeup, keep_unix_socket_file, ssl_server_context

log = Logger()

#: The worker's descriptor its plugin options arrive on (one JSON line), then
#: its parent's pipe (L{WorkerWatch}); and the longest such line.
ARGV_FD = 0
MAX_ARGV = 1024 * 1024

#: The key of the record a worker sends on L{LOG_FD} once its signal
#: handlers are in place (L{attach_worker}); the parent holds SIGHUP and
#: SIGUSR1 for it until then.
READY = "authgateway_worker_ready"

#: The signals the parent holds for a worker not ready yet.
HELD = (signal.SIGHUP, signal.SIGUSR1)

#: The worker's descriptor of its log pipe, and of its first listener.
LOG_FD = 3
FIRST_LISTENER_FD = 4

#: The longest log line (one formatted event) or standard error line a worker may
#: send; a longer one is dropped, with one line saying so.
MAX_LOG_LINE = 64 * 1024

#: What a worker keeps of its log lines while its parent does not read
#: them; how long its flusher waits for the pipe at a time; how long it
#: waits for it at exit.
MAX_PENDING_LOG = 1024 * 1024
FLUSH_INTERVAL = 0.5
EXIT_DRAIN = 2.0

#: Restart backoff: the first wait, its cap, and the time up after which
#: a worker's next exit waits the first again.
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
BACKOFF_RESET = 60.0

#: Seconds past C{--drain-timeout} the parent waits for its workers at stop
#: before it kills them.
STOP_GRACE = 15.0

#: Seconds the parent waits for killed workers to be reaped.
KILL_GRACE = 5.0

#: The largest --workers (a bound on processes and descriptors).
MAX_WORKERS = 256

#: How a worker runs twistd (the same interpreter as the parent).
TWISTD = (sys.executable, "-c", "from twisted.scripts.twistd import run; run()")

#: TCP endpoint types, and their address family.
_TCP = {"tcp": socket.AF_INET, "tcp6": socket.AF_INET6, "ssl": socket.AF_INET}

#: Positional fields of each endpoint type, in Twisted's order.
_POSITIONAL = {"tcp": ("port", "interface", "backlog"), "tcp6": ("port", "backlog", "interface"),
               "ssl": ("port", "privateKey", "certKey", "sslmethod", "interface", "backlog"),
               "unix": ("address", "mode", "backlog", "lockfile")}


def worker_count(text: str) -> int:
    """The C{--workers} value: C{auto} (the CPU count) or a whole number from 1."""
    text = str(text).strip().lower()
    if text == "auto":
        return max(1, os.cpu_count() or 1)
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_WORKERS:
        raise ValueError(f"--workers {text!r}: must be a whole number from 1 to {MAX_WORKERS}, or auto")
    return value


worker_count.coerceDoc = "A whole number > 0, or auto (one per CPU)."  # type: ignore[attr-defined]


def _unescape(field: str) -> str:
    return field.replace("\\:", ":").replace("\\=", "=").replace("\\\\", "\\")


@attrs.frozen
class ListenerSpec:
    """What the parent needs to open one listener's socket(s)."""

    option: str
    description: str
    kind: str  # tcp, tcp6, unix or systemd
    arguments: Mapping[str, str] = attrs.field(factory=dict)


def parse_listener(option: str, description: str) -> ListenerSpec:
    """
    The L{ListenerSpec} of a listener's endpoint string (C{haproxy:} in front,
    and C{ssl:}'s TLS, are the worker's business); ValueError for the types
    the parent cannot open for its workers.
    """
    fields = _split(description)
    at = 1 if fields[0].strip().lower() == "haproxy" and len(fields) > 1 else 0
    kind = fields[at].strip().lower()
    if kind not in (*_TCP, "unix", "systemd"):
        raise ValueError(
            f"a {kind}: listener cannot be shared by workers (tcp:, tcp6:, ssl:, unix: and"
            " systemd: can)"
        )
    arguments: dict[str, str] = {}
    positional = iter(_POSITIONAL.get(kind, ()))
    for field in fields[at + 1:]:
        key = _keyword(field)
        if key is None:
            name = next(positional, None)
            if name is None:
                raise ValueError("too many fields")
            arguments[name] = _unescape(field)
        else:
            arguments[key] = _unescape(field[len(key) + 1:])
    return ListenerSpec(option, description, kind, arguments)


def open_tcp(spec: ListenerSpec, backlog: int) -> socket.socket:
    """
    The listener's one listening socket, shared by every worker: bound as
    one process binds it (C{SO_REUSEADDR}, never C{SO_REUSEPORT}, so a port
    in use is an error and no other process can take a share of it).
    """
    family = _TCP[spec.kind]
    host = spec.arguments.get("interface", "" if family == socket.AF_INET else "::")
    port = int(spec.arguments.get("port", "0"))
    backlog = int(spec.arguments.get("backlog", backlog))
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(backlog)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


@attrs.define
class OpenListener:
    """A listener's one socket in the parent, which every worker accepts on."""

    spec: ListenerSpec
    fd: int
    #: What the parent closes at stop (the socket, a Twisted UNIX port).
    closers: list[Callable[[], Any]]
    address: str

    def close(self) -> defer.Deferred[Any]:
        """Close the parent's copy (a UNIX listener's file is removed then)."""
        closing = [defer.maybeDeferred(close) for close in self.closers]
        self.closers = []
        return defer.gatherResults(closing).addErrback(
            lambda reason: log.failure("closing the {option} listener", reason, option=self.spec.option)
        )


def open_listener(reactor: Any, spec: ListenerSpec, backlog: int) -> OpenListener:
    """Open C{spec}'s socket for the workers (see the module's docstring)."""
    if spec.kind in _TCP:
        s = open_tcp(spec, backlog)
        host, port = s.getsockname()[:2]
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return OpenListener(spec, s.fileno(), [s.close], shown)
    if spec.kind == "unix":
        # Twisted's own listenUNIX (stale socket removal, lock file, mode);
        # the parent never accepts on it.
        port = reactor.listenUNIX(
            spec.arguments["address"], protocol.Factory(),
            backlog=int(spec.arguments.get("backlog", backlog)),
            mode=int(spec.arguments.get("mode", "666"), 8),
            wantPID=spec.arguments.get("lockfile", "1") not in ("0", "false"),
        )
        port.stopReading()
        return OpenListener(spec, port.fileno(), [port.stopListening], spec.arguments["address"])
    from twisted.internet import endpoints  # systemd: the socket systemd passed to the parent

    endpoint = endpoints.serverFromString(None, ":".join(_split(spec.description)[
        1 if spec.description.lower().startswith("haproxy:") else 0:]))
    return OpenListener(spec, endpoint.fileno, [], f"fd {endpoint.fileno}")


@implementer(IStreamServerEndpoint)
@attrs.frozen
class _SharedEndpoint:
    """
    An adopted socket the other workers accept on too: one connection per
    wake-up (the workers share the new connections), and a UNIX socket's
    file left in place when it stops.
    """

    endpoint: IStreamServerEndpoint

    def listen(self, factory: Any) -> defer.Deferred[Any]:
        def shared(port: Any) -> Any:
            accept_one_per_wakeup(port)
            keep_unix_socket_file(port)
            return port

        return self.endpoint.listen(factory).addCallback(shared)


@implementer(IStreamServerEndpoint)
@attrs.frozen
class _TLSEndpoint:
    """TLS over an adopted socket, as C{ssl:} serves it over its own."""

    endpoint: IStreamServerEndpoint
    context: Any

    def listen(self, factory: Any) -> defer.Deferred[Any]:
        from twisted.protocols.tls import TLSMemoryBIOFactory

        return self.endpoint.listen(TLSMemoryBIOFactory(self.context, False, factory))


def adopted_endpoint(reactor: Any, description: str, fd: int) -> IStreamServerEndpoint:
    """
    A worker's endpoint for a listener the parent opened: the inherited
    socket C{fd} (of its own address family), with the TLS of an C{ssl:}
    description, behind the PROXY protocol when it starts with C{haproxy:}.
    """
    probe = socket.socket(fileno=fd)
    try:
        family = probe.family
    finally:
        probe.detach()
    endpoint: IStreamServerEndpoint = _SharedEndpoint(AdoptedStreamServerEndpoint(reactor, fd, family))
    fields = _split(description)
    at = 1 if fields[0].strip().lower() == "haproxy" and len(fields) > 1 else 0
    if fields[at].strip().lower() == "ssl":
        from twisted.internet import endpoints

        context = ssl_server_context(endpoints.serverFromString(reactor, ":".join(fields[at:])))
        if context is None:
            raise ValueError("this Twisted keeps an ssl: endpoint's TLS settings elsewhere:"
                             " use tcp: on an implicit-TLS option")
        endpoint = _TLSEndpoint(endpoint, context)
    if at:
        from twisted.protocols.haproxy import proxyEndpoint

        endpoint = proxyEndpoint(endpoint)
    return endpoint


def parse_fds(text: str) -> dict[str, int]:
    """The C{--worker-fds} value: C{smtp=4,http=5} -> C{{"smtp": 4, "http": 5}}."""
    found: dict[str, int] = {}
    for item in filter(None, text.split(",")):
        name, _, fd = item.partition("=")
        if not fd.isdigit():
            raise ValueError(f"--worker-fds: bad item {item!r}")
        found[name] = int(fd)
    return found


def worker_arguments(argv: Iterable[str], metrics_socket: str | None) -> list[str]:
    """
    The plugin options a worker parses: the parent's as given, then the
    overrides (later options win): one process, and its metrics on its
    private UNIX socket when the parent serves C{--metrics}.
    """
    overrides = ["--workers", "1"]
    if metrics_socket is not None:
        overrides += ["--metrics", f"unix:{metrics_socket}"]
    return [*argv, *overrides]


def worker_command(slot: int, fds: Mapping[str, int], twistd: Iterable[str] = TWISTD) -> list[str]:
    """A worker's command line: no plugin option of the operator's (they may hold secrets)."""
    return [
        *twistd, "-n", "--pidfile=", "--logger", f"{__name__}.pipe_logger",
        "authgateway", "--worker-slot", str(slot),
        "--worker-fds", ",".join(f"{name}={fd}" for name, fd in fds.items()),
    ]


def argv_line(argv: list[str]) -> bytes:
    """A worker's plugin options as the parent writes them on its fd 0: one JSON line."""
    return json.dumps(argv).encode() + b"\n"


def read_worker_argv(fd: int | None = None) -> list[str]:
    """
    The worker's plugin options: the one line the parent writes on its
    fd 0 (L{argv_line}) right after starting it, read up to its newline and
    no further (the rest of fd 0 is L{WorkerWatch}'s), at most L{MAX_ARGV}
    bytes.
    """
    fd = ARGV_FD if fd is None else fd
    line = bytearray()
    while not line.endswith(b"\n"):
        if len(line) >= MAX_ARGV:
            raise ValueError(f"--worker-slot: options over {MAX_ARGV} bytes on fd {fd}")
        try:
            byte = os.read(fd, 1)  # one at a time: nothing past the line is taken
        except BlockingIOError:
            select.select([fd], [], [])
            continue
        except OSError as e:
            raise ValueError(f"--worker-slot: no options on fd {fd} ({e.strerror}):"
                             " only the parent starts workers") from None
        if not byte:
            raise ValueError(f"--worker-slot: no options on fd {fd}: only the parent starts workers")
        line += byte
    try:
        argv = json.loads(line)
    except ValueError:
        argv = None
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise ValueError(f"--worker-slot: the options on fd {fd} are not a list of strings")
    return argv


def _record_line(record: Mapping[str, Any]) -> bytes:
    return json.dumps(record).encode("utf-8", "replace") + b"\n"


class PipeWriter:
    """
    A worker's end of its log pipe, never blocking: what the pipe does not
    take at once waits in a buffer of at most C{limit} bytes, written on the
    next line and by a thread that waits (up to L{FLUSH_INTERVAL} s at a
    time) for the pipe to take it, which ends once nothing waits: a thread,
    not a timer, so that a busy or stopping reactor does not hold the lines
    back. A parent that stops reading (stopped, its syslog blocked) must
    not freeze its workers: lines past the bound are dropped and counted,
    and once the buffer drains one line says how many. Thread-safe (log
    observers may be called from any thread).
    """

    def __init__(self, fd: int, limit: int = MAX_PENDING_LOG) -> None:
        self.fd = fd
        self.limit = limit
        self._pending = bytearray()
        self._dropped = 0
        self._lock = threading.Lock()
        self._flusher: threading.Thread | None = None

    def write(self, line: bytes) -> None:
        """Send C{line} (whole, with its newline) or keep it, or drop it when full."""
        with self._lock:
            if len(self._pending) + len(line) > self.limit:
                self._dropped += 1
            else:
                self._pending += line
            self._flush()
            if self._pending and self._flusher is None:
                self._flusher = threading.Thread(target=self._flushing, name="log-pipe", daemon=True)
                self._flusher.start()

    def _flushing(self) -> None:
        """The flusher thread: until nothing waits."""
        while True:
            select.select([], [self.fd], [], FLUSH_INTERVAL)
            with self._lock:
                self._flush()
                if not (self._pending or self._dropped):
                    self._flusher = None
                    return

    def flush(self) -> None:
        """Send what the pipe takes now of what waits."""
        with self._lock:
            self._flush()

    def drain(self, timeout: float) -> None:
        """At exit: wait up to C{timeout} s for the pipe to take what waits."""
        end = time.monotonic() + timeout
        with self._lock:
            self._flush()
            while (self._pending or self._dropped) and (left := end - time.monotonic()) > 0:
                select.select([], [self.fd], [], left)
                self._flush()

    def _flush(self) -> None:
        while True:
            if not self._pending:
                if not self._dropped:
                    return
                self._pending += _record_line({
                    "time": time.time(), "level": LogLevel.warn.name, "namespace": __name__,
                    "system": None,
                    "text": f"{self._dropped} log lines dropped: the parent did not read them in time",
                })
                self._dropped = 0
            try:
                sent = os.write(self.fd, self._pending)
            except BlockingIOError:
                return
            except OSError:  # the parent is gone: nobody will read them
                self._pending.clear()
                self._dropped = 0
                return
            del self._pending[:sent]


def pipe_logger() -> Any:
    """
    A worker twistd's C{--logger}: each event formatted here, in the worker
    (which has the core to spare), and sent to the parent on L{LOG_FD} as
    one small JSON line (L{LogRelay} reads it): the parent only passes text
    on, instead of decoding and formatting every worker's events on its one
    core. The pipe is non-blocking (L{PipeWriter}).
    """
    os.set_blocking(LOG_FD, False)
    writer = PipeWriter(LOG_FD)
    atexit.register(writer.drain, EXIT_DRAIN)  # the last lines (twistd logs past the reactor's stop)

    def observe(event: dict[str, Any]) -> None:
        if event.get(READY) is True:
            writer.write(_record_line({READY: True}))
            return
        level = event.get("log_level")
        writer.write(_record_line({
            "time": event.get("log_time"),
            "level": getattr(level, "name", None),
            "namespace": event.get("log_namespace"),
            "system": event.get("log_system"),
            "text": eventAsText(event, includeTimestamp=False, includeSystem=False),
        }))

    return observe


#: Level names as L{pipe_logger} writes them.
_LEVELS = {level.name: level for level in LogLevel.iterconstants()}


class LineBuffer:
    """
    Splits a byte stream into lines of at most C{limit} bytes for C{line};
    a longer line is skipped up to its end, and C{dropped()} is called once
    for it.
    """

    def __init__(self, line: Callable[[bytes], Any], dropped: Callable[[], Any],
                 limit: int = MAX_LOG_LINE) -> None:
        self._line = line
        self._dropped = dropped
        self.limit = limit
        self._buffer = bytearray()
        self._skipping = False

    def feed(self, data: bytes) -> None:
        start = 0  # positions, not slices: a chunk of many lines is not copied per line
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                if start < len(data) and not self._skipping:
                    if len(self._buffer) + len(data) - start > self.limit:
                        self._buffer.clear()
                        self._skipping = True
                        self._dropped()
                    else:
                        self._buffer += data[start:]
                return
            if self._skipping:
                self._skipping = False
            elif len(self._buffer) + end - start > self.limit:
                self._buffer.clear()
                self._dropped()
            elif self._buffer:
                self._buffer += data[start:end]
                line = bytes(self._buffer)
                self._buffer.clear()
                self._line(line)
            else:
                self._line(data[start:end])
            start = end + 1

    def flush(self) -> None:
        """The end of the stream: a last line without its newline."""
        if self._buffer and not self._skipping:
            self._line(bytes(self._buffer))
        self._buffer.clear()
        self._skipping = False


class LogRelay:
    """
    A worker's JSON events (L{LOG_FD}) re-emitted into the parent's log,
    with C{worker} and C{worker_pid} added and C{worker=K} in the system
    shown by text observers.
    """

    def __init__(self, slot: Slot, publish: Callable[[dict[str, Any]], Any] = globalLogPublisher,
                 ready: Callable[[], Any] = lambda: None) -> None:
        self.slot = slot
        self._publish = publish
        self._ready = ready
        self.events = LineBuffer(self._event, self._too_long)
        self.stderr = LineBuffer(self._stderr, self._too_long)

    def _event(self, line: bytes) -> None:
        try:
            record = json.loads(line)
            if isinstance(record, dict) and record.get(READY) is True:
                self._ready()
                return
            text = record["text"]
            if not isinstance(text, str):
                raise ValueError("no text")
        except (ValueError, TypeError, KeyError):
            log.warn("worker {worker}: an unreadable log line was dropped", worker=self.slot.index)
            return
        level = _LEVELS.get(record.get("level"), LogLevel.info)
        namespace = record.get("namespace")
        namespace = namespace if isinstance(namespace, str) else "-"
        system = record.get("system")
        if not isinstance(system, str):
            system = f"{namespace}#{level.name}"
        when = record.get("time")
        self._publish({
            "log_format": "{log_text}",
            "log_text": text,
            "log_level": level,
            "log_namespace": namespace,
            "log_system": f"{system} worker={self.slot.index}",
            "log_time": when if isinstance(when, float) else time.time(),
            "worker": self.slot.index,
            "worker_pid": self.slot.pid,
        })

    def _stderr(self, line: bytes) -> None:
        log.warn("worker {worker} (pid {pid}) stderr: {line}", worker=self.slot.index,
                 pid=self.slot.pid, line=line.decode("utf-8", "replace"))

    def _too_long(self) -> None:
        log.warn("worker {worker}: a log line over {limit} bytes was dropped",
                 worker=self.slot.index, limit=MAX_LOG_LINE)


#: A private run directory's name starts so; the file in it names its parent.
RUN_DIR_PREFIX = "authgateway-"
RUN_DIR_PID = "parent.pid"


def make_run_dir(environ: Mapping[str, str]) -> str:
    """
    The parent's private directory (mode 0700) for its workers' metrics
    sockets: under systemd's C{$RUNTIME_DIRECTORY} when set (removed with
    the unit, whatever killed the parent), else the temporary directory,
    where those of this user's earlier parents that died without removing
    theirs (SIGKILL) are removed first (L{remove_stale_run_dirs}).
    """
    base = (environ.get("RUNTIME_DIRECTORY") or "").split(":")[0] or None
    if base is None:
        remove_stale_run_dirs(tempfile.gettempdir())
    return tempfile.mkdtemp(prefix=RUN_DIR_PREFIX, dir=base)


def claim_run_dir(path: str) -> None:
    """
    Record this process (the parent, after twistd daemonized it) in its run
    directory: until then, no other parent counts the directory stale.
    """
    with open(os.path.join(path, RUN_DIR_PID), "w", encoding="ascii") as f:
        f.write(f"{os.getpid()}\n")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    return True


def remove_stale_run_dirs(base: str) -> list[str]:
    """
    Remove the run directories in C{base} of this user whose parent (the
    pid in their L{RUN_DIR_PID}) is dead; one without that file (being
    made, or not ours) is left. Return the paths removed.
    """
    removed: list[str] = []
    try:
        names = [n for n in os.listdir(base) if n.startswith(RUN_DIR_PREFIX)]
    except OSError:
        return removed
    for name in names[:1000]:  # a bound on the work at start
        path = os.path.join(base, name)
        try:
            info = os.lstat(path)
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
                continue
            fd = os.open(os.path.join(path, RUN_DIR_PID), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                pid = int(os.read(fd, 32).strip() or b"0")
            finally:
                os.close(fd)
        except (OSError, ValueError):
            continue
        if pid > 0 and not _alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@attrs.define(eq=False)
class Slot:
    """One worker's place: its number, and the process holding it now."""

    index: int
    metrics_socket: str | None = None
    pid: int | None = None
    running: bool = False
    restarts: int = 0
    #: The process transport and its protocol while it runs.
    process: Any = attrs.field(default=None, repr=False)
    protocol: Any = attrs.field(default=None, repr=False)
    started_at: float = 0.0
    next_delay: float = BACKOFF_FIRST
    restart_call: Any = attrs.field(default=None, repr=False)
    #: The process said its signal handlers are in place (L{READY}).
    ready: bool = False
    #: Signals forwarded before it was ready, to deliver then (once each).
    held: list[int] = attrs.field(factory=list, repr=False)

    def gone(self) -> None:
        """The process ended (or never started): nothing of it is kept."""
        self.process, self.protocol, self.pid, self.running = None, None, None, False
        self.ready = False
        self.held.clear()


class WorkerProtocol(protocol.ProcessProtocol):
    """The parent's end of one worker's pipes."""

    def __init__(self, supervisor: Supervisor, slot: Slot) -> None:
        self.supervisor = supervisor
        self.slot = slot
        self.relay = LogRelay(slot, supervisor.publish, ready=lambda: supervisor.ready(slot, self))

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == LOG_FD:
            self.relay.events.feed(data)
        elif childFD == 2:
            self.relay.stderr.feed(data)

    def childConnectionLost(self, childFD: int) -> None:
        if childFD == LOG_FD:
            self.relay.events.flush()
        elif childFD == 2:
            self.relay.stderr.flush()

    def processEnded(self, reason: Failure) -> None:
        self.relay.events.flush()
        self.relay.stderr.flush()
        self.supervisor.ended(self.slot, self, reason)


def _how(reason: Failure) -> str:
    value = reason.value
    sig = getattr(value, "signal", None)
    if sig:
        try:
            return f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    return f"exit code {getattr(value, 'exitCode', None)}"


class Supervisor(service.Service):
    """
    The parent of C{--workers N}: opens the listeners (as root if twistd
    starts so: L{privilegedStartService}), starts the workers, restarts
    those that die, and stops them all when it stops.

    @ivar slots: the L{Slot}s, by index.
    @ivar draining: the stop has begun (no more restarts).
    """

    name = "workers"

    def __init__(
        self,
        reactor: Any,
        count: int,
        argv: list[str],
        listeners: Mapping[str, str],
        backlog: int,
        drain_timeout: float,
        state: str = "local",
        metrics: bool = False,
        spawn: Callable[..., Any] | None = None,
        twistd: Iterable[str] = TWISTD,
        environ: Mapping[str, str] | None = None,
        publish: Callable[[dict[str, Any]], Any] = globalLogPublisher,
        owner: tuple[int, int] | None = None,
    ) -> None:
        self.reactor = reactor
        self.argv = argv
        self.specs = [parse_listener(option, description) for option, description in listeners.items()]
        self.backlog = backlog
        self.drain_timeout = drain_timeout
        #: The --state URL without its password (the start line shows it).
        self.state = shown(state)
        self.twistd = tuple(twistd)
        self.environ = dict(os.environ if environ is None else environ)
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            self.environ.pop(name, None)  # the parent's systemd sockets are passed as listeners
        self.publish = publish
        self._spawn = spawn
        self._owner = owner
        self.run_dir = make_run_dir(self.environ) if metrics else None
        self.slots = [
            Slot(k, metrics_socket=os.path.join(self.run_dir, f"w{k}.sock") if self.run_dir else None)
            for k in range(count)
        ]
        self.draining = False
        self.open: list[OpenListener] = []
        self._signals = 0
        self._all_down: defer.Deferred[None] | None = None
        self._kill_call: Any = None

    def privilegedStartService(self) -> None:
        if not self.open:
            try:
                for spec in self.specs:
                    self.open.append(open_listener(self.reactor, spec, self.backlog))
            except BaseException:
                self._close_listeners()
                self._remove_run_dir()  # the start fails
                raise
            if self.run_dir is not None:
                claim_run_dir(self.run_dir)
            if self.run_dir is not None and self._owner is not None:
                os.chown(self.run_dir, *self._owner)  # twistd drops to --uid/--gid next
        super().privilegedStartService()

    def startService(self) -> None:
        if not self.open:  # started without twistd
            self.privilegedStartService()
        super().startService()
        for slot in self.slots:
            self._start(slot)
        log.info(
            "authgateway started: {count} workers (pids {pids}), state {state}, listeners {listeners}",
            count=len(self.slots),
            pids=", ".join(str(s.pid) for s in self.slots if s.pid is not None) or "none",
            state=self.state,
            listeners=", ".join(
                f"{o.spec.option}={o.spec.description} on {o.address}" for o in self.open
            ) or "none",
        )

    def _child_fds(self, slot: Slot) -> tuple[dict[int, Any], dict[str, int]]:
        child: dict[int, Any] = {0: "w", 1: 1, 2: "r", LOG_FD: "r"}
        names: dict[str, int] = {}
        for n, listener in enumerate(self.open):
            fd = FIRST_LISTENER_FD + n
            child[fd] = listener.fd
            names[listener.spec.option] = fd
        return child, names

    def _start(self, slot: Slot) -> None:
        slot.restart_call = None
        if self.draining:
            return
        child, names = self._child_fds(slot)
        command = worker_command(slot.index, names, self.twistd)
        worker = WorkerProtocol(self, slot)
        try:
            spawn = self._spawn if self._spawn is not None else self.reactor.spawnProcess
            process = spawn(worker, command[0], command, env=dict(self.environ), childFDs=child)
        except Exception as e:  # noqa: BLE001 - out of processes, descriptors...: try again later
            log.error("worker {worker} could not start: {error}", worker=slot.index, error=e)
            self._again(slot)
            return
        # Its options on its standard input: never in its environment,
        # which /proc/PID/environ shows for its whole life.
        process.writeToChild(0, argv_line(worker_arguments(self.argv, slot.metrics_socket)))
        slot.gone()
        slot.process, slot.protocol, slot.pid, slot.running = process, worker, process.pid, True
        slot.started_at = self.reactor.seconds()
        if slot.restarts:
            log.info("worker {worker} restarted: pid {pid} (restart {restarts})",
                     worker=slot.index, pid=slot.pid, restarts=slot.restarts)

    def ended(self, slot: Slot, worker: WorkerProtocol, reason: Failure) -> None:
        """A worker's process ended: restart it, unless the parent is stopping."""
        if worker is not slot.protocol:
            return
        pid = slot.pid
        slot.gone()
        if self.draining:
            log.info("worker {worker} (pid {pid}) stopped: {how}", worker=slot.index, pid=pid,
                     how=_how(reason))
            if self._all_down is not None and not any(s.running for s in self.slots):
                self._all_down, d = None, self._all_down
                d.callback(None)
            return
        delay = self._again(slot)
        log.warn("worker {worker} (pid {pid}) exited unexpectedly ({how}): restarting in {delay:g} s",
                 worker=slot.index, pid=pid, how=_how(reason), delay=delay)

    def _again(self, slot: Slot) -> float:
        """Schedule C{slot}'s restart with its backoff; return the wait."""
        if self.reactor.seconds() - slot.started_at >= BACKOFF_RESET:
            slot.next_delay = BACKOFF_FIRST
        delay = slot.next_delay
        slot.next_delay = min(delay * 2, BACKOFF_MAX)
        slot.restarts += 1
        slot.restart_call = self.reactor.callLater(delay, self._start, slot)
        return delay

    def forward(self, signum: int) -> None:
        """
        Send C{signum} to every running worker. SIGHUP and SIGUSR1 to a
        worker not ready yet (its handlers not in place: their default
        action would kill it) are held, and sent once when it is.
        """
        for slot in self.slots:
            if slot.process is None:
                continue
            if signum in HELD and not slot.ready:
                if signum not in slot.held:
                    slot.held.append(signum)
                continue
            self._send(slot, signum)

    def _send(self, slot: Slot, signum: int) -> None:
        try:
            slot.process.signalProcess(signum)
        except (error.ProcessExitedAlready, OSError):
            pass

    def ready(self, slot: Slot, worker: WorkerProtocol) -> None:
        """C{slot}'s worker has its signal handlers: send what was held for it."""
        if worker is not slot.protocol or slot.ready:
            return
        slot.ready = True
        held, slot.held = slot.held, []
        for signum in held:
            self._send(slot, signum)

    def terminate(self) -> None:
        """SIGTERM or SIGINT to the parent: the first stops it, the next are forwarded."""
        self._signals += 1
        if self._signals == 1 and not self.draining:
            self.reactor.stop()
        else:
            self.forward(signal.SIGTERM)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        self.draining = True
        for slot in self.slots:
            if slot.restart_call is not None and slot.restart_call.active():
                slot.restart_call.cancel()
            slot.restart_call = None
        # The parent's copies first: once the workers stop listening, the
        # sockets are closed and new connections are refused, not queued.
        closed = self._close_listeners()
        d: defer.Deferred[None] = defer.Deferred()
        if any(s.running for s in self.slots):
            self._all_down = d
            self.forward(signal.SIGTERM)
            log.info("stopping {count} worker(s)", count=sum(s.running for s in self.slots))
            self._kill_call = self.reactor.callLater(
                self.drain_timeout + STOP_GRACE, self._kill, d)
        else:
            d.callback(None)

        def done(result: Any) -> Any:
            if self._kill_call is not None and self._kill_call.active():
                self._kill_call.cancel()
            self._remove_run_dir()
            return closed

        return d.addBoth(done)

    def _kill(self, d: defer.Deferred[None]) -> None:
        late = [s for s in self.slots if s.running]
        log.warn("workers {workers} still running {seconds:g} s after SIGTERM: killing them",
                 workers=", ".join(f"{s.index} (pid {s.pid})" for s in late),
                 seconds=self.drain_timeout + STOP_GRACE)
        self.forward(signal.SIGKILL)

        def give_up() -> None:
            if self._all_down is d:
                self._all_down = None
                d.callback(None)

        self._kill_call = self.reactor.callLater(KILL_GRACE, give_up)

    def _close_listeners(self) -> defer.Deferred[Any]:
        closing = [listener.close() for listener in self.open]
        self.open = []
        return defer.gatherResults(closing).addCallback(lambda _: None)

    def _remove_run_dir(self) -> None:
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)


def install_signals(reactor: Any, supervisor: Supervisor) -> None:
    """
    The parent's signals: SIGTERM and SIGINT stop it (L{Supervisor.terminate}),
    SIGHUP and SIGUSR1 are forwarded to the workers (twistd's own SIGUSR1 log
    rotation still runs). Only when the reactor is not running yet (twistd).
    """
    if getattr(reactor, "running", False):
        return
    for signum in (signal.SIGTERM, signal.SIGINT):
        on_signal(reactor, signum, supervisor.terminate, chain=False, urgent=True)
    for signum in (signal.SIGHUP, signal.SIGUSR1):
        on_signal(reactor, signum, lambda signum=signum: supervisor.forward(signum))


def make_parent(options: Any, reactor: Any) -> service.MultiService:
    """
    C{makeService} of the parent: the supervisor, and the parent's own
    metrics listener (L{gateway.ops.metrics.serve_parent}) with C{--metrics}.
    """
    twistd_options = getattr(options, "parent", None)
    owner = None
    if twistd_options is not None and twistd_options.get("uid") is not None:
        owner = (twistd_options["uid"], twistd_options.get("gid") or -1)
    top = service.MultiService()
    supervisor = Supervisor(
        reactor,
        options["workers"],
        options["argv"],
        options["endpoints"],
        options["listen-backlog"],
        options["drain-timeout"],
        state=options["state"],
        metrics=options["metrics"] != "none",
        owner=owner,
    )
    supervisor.setServiceParent(top)
    install_signals(reactor, supervisor)
    ops_metrics.serve_parent(options, supervisor, top)  # with --metrics
    return top


# The worker's side.

PR_SET_PDEATHSIG = 1


def set_parent_death_signal(signum: int = signal.SIGTERM) -> bool:
    """Linux: the kernel sends C{signum} to this process when its parent dies."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


@implementer(IReadDescriptor)
class ParentWatch:
    """Reads the worker's fd 0, the parent's pipe: its end calls C{gone()}."""

    def __init__(self, fd: int, gone: Callable[[], Any]) -> None:
        self.fd = fd
        self.gone = gone

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> Any:
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        return None if data else error.ConnectionDone()

    def connectionLost(self, reason: Failure) -> None:
        self.gone()

    def logPrefix(self) -> str:
        return "parent-watch"


class WorkerWatch(service.Service):
    """A worker's watch over its parent (fd 0), while it runs."""

    name = "parent-watch"

    def __init__(self, reactor: Any, slot: int, fd: int = 0, kill: Callable[[int, int], Any] = os.kill) -> None:
        self.reactor = reactor
        self.slot = slot
        self.watch = ParentWatch(fd, self._gone)
        self._kill = kill
        self._watching = False

    def startService(self) -> None:
        super().startService()
        os.set_blocking(self.watch.fd, False)
        self.reactor.addReader(self.watch)
        self._watching = True

    def stopService(self) -> Any:
        if self._watching:
            self._watching = False
            self.reactor.removeReader(self.watch)
        return super().stopService()

    def _gone(self) -> None:
        if not self._watching:
            return
        self._watching = False
        log.warn("worker {worker}: the parent is gone: stopping", worker=self.slot)
        self._kill(os.getpid(), signal.SIGTERM)  # the same drain as any SIGTERM


def attach_worker(reactor: Any, options: Mapping[str, Any], top: service.MultiService) -> None:
    """
    A worker's own part: its own process group (a terminal's Ctrl-C or a
    group kill reaches the parent only, which forwards one SIGTERM: two
    would abort the drain), the parent death signal and the watch over fd 0.
    """
    try:
        os.setpgid(0, 0)
    except OSError:  # a session leader already: nothing to leave
        pass
    set_parent_death_signal()
    if options.get("audit-log") is None:  # else the audit log's reopen handles it
        on_signal(reactor, signal.SIGUSR1, lambda: None)  # forwarded to every worker: never fatal
    WorkerWatch(reactor, options["workerSlot"]).setServiceParent(top)
    # Last: every handler is in place (until the reactor runs, on_signal's
    # record the signal), so the parent may now send SIGHUP and SIGUSR1.
    log.debug("worker {worker}: signal handlers in place", worker=options["workerSlot"], **{READY: True})


__all__ = [
    "ARGV_FD", "HELD", "MAX_ARGV", "READY", "argv_line", "read_worker_argv", "BACKOFF_FIRST", "BACKOFF_MAX", "BACKOFF_RESET", "FIRST_LISTENER_FD", "LOG_FD",
    "LineBuffer", "ListenerSpec", "LogRelay", "MAX_LOG_LINE", "OpenListener", "ParentWatch", "PipeWriter",
    "make_run_dir", "remove_stale_run_dirs",
    "STOP_GRACE", "Slot", "Supervisor", "WorkerProtocol", "WorkerWatch", "adopted_endpoint",
    "attach_worker", "install_signals", "make_parent", "open_listener", "open_tcp",
    "parse_fds", "parse_listener", "pipe_logger", "set_parent_death_signal",
"worker_arguments", "worker_command", "worker_count",
]
