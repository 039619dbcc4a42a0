"""
L{gateway.ops.workers}: the parent of C{--workers N} (sockets, the workers'
command lines and environment, restarts with backoff, signals, the stop, the
log relay) with fake processes on a L{MemoryReactorClock}, and the worker's
side (adopted sockets, the watch over its parent).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import signal
import threading
import time
import socket
import ssl
import subprocess
from typing import Any

from twisted.internet import defer, error, protocol, reactor, threads
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from gateway import tap
from gateway.ops import workers
from gateway.tls import ensure_certificate
from tests.support import keep_signal_handlers

SECRET = "s3cret-pw"


def options(*argv: str) -> tap.Options:
    parsed = tap.Options()
    parsed.parseOptions(list(argv))
    return parsed


class FakeProcess:
    """A process transport: records the signals it is sent."""

    def __init__(self, pid: int) -> None:
        self.pid: int | None = pid
        self.signals: list[int] = []
        self.written: dict[int, bytes] = {}

    def writeToChild(self, fd: int, data: bytes) -> None:
        self.written[fd] = self.written.get(fd, b"") + data

    def signalProcess(self, signum: Any) -> None:
        if self.pid is None:
            raise error.ProcessExitedAlready()
        self.signals.append(signum)


class FakeSpawn:
    """C{reactor.spawnProcess}: records each call, hands out pids from 100."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.processes: list[tuple[FakeProcess, Any]] = []

    def __call__(self, proto: Any, executable: str, args: list[str], env: dict[str, str],
                 childFDs: dict[int, Any]) -> FakeProcess:
        process = FakeProcess(100 + len(self.processes))
        self.calls.append(dict(executable=executable, args=args, env=env, childFDs=childFDs))
        self.processes.append((process, proto))
        proto.makeConnection(process)
        return process

    def ready(self, index: int) -> None:
        """The worker says its signal handlers are in place (its ready record)."""
        self.processes[index][1].childDataReceived(workers.LOG_FD, _record(**{workers.READY: True}) + b"\n")

    def end(self, index: int, exit_code: int | None = None, sig: int | None = None) -> None:
        process, proto = self.processes[index]
        process.pid = None
        if sig is None and exit_code == 0:
            reason = Failure(error.ProcessDone(0))
        else:
            reason = Failure(error.ProcessTerminated(exitCode=exit_code, signal=sig))
        proto.processEnded(reason)


class ArgvTests(SynchronousTestCase):
    """What a worker is started with: its options never on its command line."""

    def setUp(self) -> None:
        self.data = self.mktemp()

    def test_recorded(self) -> None:
        argv = ["--data-dir", self.data, "--auth", f"memory:a:{SECRET}", "--smtp", "none"]
        self.assertEqual(options(*argv)["argv"], argv)

    def test_workers_option(self) -> None:
        self.assertEqual(workers.worker_count("auto"), max(1, os.cpu_count() or 1))
        self.assertEqual(workers.worker_count(" 3 "), 3)
        for bad in ("0", "-1", "x", "1.5", str(workers.MAX_WORKERS + 1)):
            self.assertRaises(ValueError, workers.worker_count, bad)
        self.assertEqual(tap.Options()["workers"], 1)

    def test_command_line(self) -> None:
        command = workers.worker_command(1, {"smtp": 4, "http": 5}, twistd=["twistd"])
        self.assertEqual(command, [
            "twistd", "-n", "--pidfile=", "--logger", "gateway.ops.workers.pipe_logger",
            "authgateway", "--worker-slot", "1", "--worker-fds", "smtp=4,http=5",
        ])

    def test_arguments(self) -> None:
        self.assertEqual(workers.worker_arguments(["--a", "b"], None), ["--a", "b", "--workers", "1"])
        self.assertEqual(
            workers.worker_arguments(["--metrics", "tcp:9000"], "/run/x/w0.sock"),
            ["--metrics", "tcp:9000", "--workers", "1", "--metrics", "unix:/run/x/w0.sock"],
        )

    def pipe(self, data: bytes, close: bool = True) -> int:
        """A pipe holding C{data}, as the worker's fd 0 (L{workers.ARGV_FD})."""
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        os.write(write, data)
        if close:
            os.close(write)
        else:
            self.addCleanup(os.close, write)
        self.patch(workers, "ARGV_FD", read)
        return read

    def test_worker_reads_its_options(self) -> None:
        """A worker's options come from its fd 0, one line; what follows is left there."""
        argv = ["--data-dir", self.data, "--auth", f"memory:a:{SECRET}", "--smtp", "none",
                "--http", "none", "--socks", "none", "--workers", "1"]
        read = self.pipe(workers.argv_line(argv) + b"after")
        parsed = options("--worker-slot", "1", "--worker-fds", "smtp=4")
        self.assertEqual((parsed["workerSlot"], parsed["workerFds"]), (1, {"smtp": 4}))
        self.assertEqual(parsed["argv"], argv)
        self.assertEqual(os.read(read, 100), b"after")

    def test_worker_needs_its_options(self) -> None:
        self.pipe(b"")
        e = self.assertRaises(usage.UsageError, options, "--worker-slot", "0", "--worker-fds", "")
        self.assertIn("no options on fd", str(e))
        for bad in (b"{}\n", b"not json\n", b'["a", 1]\n', b'["a"]'):
            self.pipe(bad)
            self.assertRaises(ValueError, workers.read_worker_argv)

    def test_worker_options_bounded(self) -> None:
        """A line without end is refused at MAX_ARGV bytes, not read forever."""
        self.patch(workers, "MAX_ARGV", 100)
        self.pipe(b"[" + b'"a",' * 60, close=False)
        e = self.assertRaises(ValueError, workers.read_worker_argv)
        self.assertIn("over 100 bytes", str(e))
        e = self.assertRaises(usage.UsageError, options, "--worker-slot", "0", "--auth", "memory:a:b")
        self.assertIn("nothing else", str(e))

    def test_no_worker_option_in_help(self) -> None:
        self.assertNotIn("worker-slot", str(tap.Options()))
        self.assertNotIn("worker-fds", str(tap.Options()))

    def test_workers_need_shared_state(self) -> None:
        e = self.assertRaises(usage.UsageError, options, "--data-dir", self.data, "--auth",
                              "memory:a:b", "--workers", "2")
        self.assertIn("--workers 2 needs a shared --state", str(e))
        self.assertIn("redis-server", str(e))
        self.assertFalse(os.path.exists(self.data))  # refused before writing anything

    def test_workers_refuse_other_listeners(self) -> None:
        e = self.assertRaises(usage.UsageError, options, "--data-dir", self.data, "--auth",
                              "memory:a:b", "--workers", "2", "--smtps", "onion:465")
        self.assertIn("a onion: listener cannot be shared by workers", str(e))

    def test_supervisor_spawn(self) -> None:
        """Neither the command line nor the environment hold a secret: fd 0 has the options."""
        spawn = FakeSpawn()
        argv = ["--auth", f"memory:a:{SECRET}", "--state", f"redis://:{SECRET}@127.0.0.1/0"]
        supervisor = workers.Supervisor(
            MemoryReactorClock(), 2, argv, {"smtp": "tcp:0:interface=127.0.0.1"}, 50, 30.0,
            state=f"redis://:{SECRET}@127.0.0.1/0", spawn=spawn, twistd=["twistd"],
            environ={"PATH": "/bin", "LISTEN_FDS": "3"}, metrics=True,
        )
        with capturedLogs() as events:
            supervisor.startService()
        self.addCleanup(shutil.rmtree, supervisor.run_dir, True)
        self.addCleanup(supervisor.stopService)
        self.assertEqual(len(spawn.calls), 2)
        for k, call in enumerate(spawn.calls):
            self.assertNotIn(SECRET, " ".join(call["args"]))
            self.assertEqual(call["args"][-4:], ["--worker-slot", str(k), "--worker-fds", "smtp=4"])
            self.assertEqual(call["env"], {"PATH": "/bin"})
            self.assertNotIn(SECRET, repr(call["env"]))
            process = spawn.processes[k][0]
            self.assertEqual(process.written, {0: workers.argv_line([
                *argv, "--workers", "1", "--metrics", f"unix:{supervisor.slots[k].metrics_socket}",
            ])})
            self.assertEqual({fd: call["childFDs"][fd] for fd in (0, 1, 2, 3)},
                             {0: "w", 1: 1, 2: "r", 3: "r"})
            self.assertEqual(call["childFDs"][4], supervisor.open[0].fd)  # one socket for all
        self.assertEqual([(s.index, s.pid, s.running) for s in supervisor.slots],
                         [(0, 100, True), (1, 101, True)])
        self.assertTrue(all(len(s.metrics_socket) < 100 for s in supervisor.slots))
        self.assertEqual(os.stat(supervisor.run_dir).st_mode & 0o777, 0o700)
        with open(os.path.join(supervisor.run_dir, workers.RUN_DIR_PID)) as f:
            self.assertEqual(f.read(), f"{os.getpid()}\n")
        [line] = [e for e in events if "authgateway started" in e["log_format"]]
        self.assertEqual(line["pids"], "100, 101")
        self.assertEqual(line["state"], "redis://127.0.0.1:6379/0")
        self.assertNotIn(SECRET, repr(supervisor.slots))



class RunDirTests(SynchronousTestCase):
    """The private run directory: under $RUNTIME_DIRECTORY, or stale ones removed."""

    def setUp(self) -> None:
        self.base = tempfile.mkdtemp(prefix="ag-")
        self.addCleanup(shutil.rmtree, self.base, True)

    def test_runtime_directory(self) -> None:
        path = workers.make_run_dir({"RUNTIME_DIRECTORY": f"{self.base}:/elsewhere"})
        self.assertEqual(os.path.dirname(path), self.base)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o700)

    def test_stale_removed(self) -> None:
        """A dir whose parent is dead goes; a live parent's, or one not claimed yet, stays."""
        dead = subprocess.Popen(["true"])
        dead.wait()

        def made(pid: int | None) -> str:
            path = tempfile.mkdtemp(prefix=workers.RUN_DIR_PREFIX, dir=self.base)
            if pid is not None:
                with open(os.path.join(path, workers.RUN_DIR_PID), "w") as f:
                    f.write(f"{pid}\n")
            return path

        stale, live, unclaimed = made(dead.pid), made(os.getpid()), made(None)
        other = os.path.join(self.base, "other-dir")
        os.mkdir(other)
        self.assertEqual(workers.remove_stale_run_dirs(self.base), [stale])
        self.assertEqual(sorted(os.listdir(self.base)),
                         sorted(os.path.basename(p) for p in (live, unclaimed, other)))
        workers.claim_run_dir(unclaimed)
        self.assertEqual(workers.remove_stale_run_dirs(self.base), [])

    def test_default_cleans_the_temporary_directory(self) -> None:
        self.patch(tempfile, "tempdir", self.base)
        dead = subprocess.Popen(["true"])
        dead.wait()
        stale = tempfile.mkdtemp(prefix=workers.RUN_DIR_PREFIX)
        workers.claim_run_dir(stale)
        with open(os.path.join(stale, workers.RUN_DIR_PID), "w") as f:
            f.write(f"{dead.pid}\n")
        path = workers.make_run_dir({})
        self.assertEqual(os.listdir(self.base), [os.path.basename(path)])


class Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class SocketTests(TestCase):
    """The parent's sockets: per worker for TCP, shared for UNIX."""

    def test_parse(self) -> None:
        spec = workers.parse_listener("smtp", "haproxy:tcp6:2525:interface=\\:\\:1:backlog=7")
        self.assertEqual((spec.kind, dict(spec.arguments)),
                         ("tcp6", {"port": "2525", "interface": "::1", "backlog": "7"}))
        spec = workers.parse_listener("http", "unix:/run/a.sock:mode=660")
        self.assertEqual(dict(spec.arguments), {"address": "/run/a.sock", "mode": "660"})
        self.assertEqual(workers.parse_listener("socks", "systemd:domain=INET:index=0").kind, "systemd")
        spec = workers.parse_listener("smtps", "ssl:465:k.pem:certKey=c.pem:interface=10.0.0.1")
        self.assertEqual(dict(spec.arguments),
                         {"port": "465", "privateKey": "k.pem", "certKey": "c.pem", "interface": "10.0.0.1"})
        self.assertRaises(ValueError, workers.parse_listener, "smtps", "onion:465")

    def test_tcp_one_socket(self) -> None:
        """One listening socket (port 0 resolved), without SO_REUSEPORT."""
        spec = workers.parse_listener("smtp", "tcp:0:interface=127.0.0.1")
        s = workers.open_tcp(spec, 16)
        self.addCleanup(s.close)
        self.assertNotEqual(s.getsockname()[1], 0)
        self.assertFalse(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT))
        self.assertTrue(s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))

    def test_tcp_port_taken(self) -> None:
        """
        A port another socket holds is an error, with or without
        SO_REUSEPORT; and once the parent holds it, no other socket can
        take a share of its connections with SO_REUSEPORT.
        """
        for reuse in (0, 1):
            taken = socket.socket()
            self.addCleanup(taken.close)
            taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, reuse)
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            spec = workers.parse_listener("smtp", f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1")
            self.assertRaises(OSError, workers.open_tcp, spec, 16)
        ours = workers.open_tcp(workers.parse_listener("smtp", "tcp:0:interface=127.0.0.1"), 16)
        self.addCleanup(ours.close)
        thief = socket.socket()
        self.addCleanup(thief.close)
        thief.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        thief.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.assertRaises(OSError, thief.bind, ours.getsockname())

    @defer.inlineCallbacks
    def test_adopt_tcp(self) -> None:
        """A worker's endpoint on an inherited TCP socket accepts connections."""
        spec = workers.parse_listener("http", "tcp:0:interface=127.0.0.1")
        opened = workers.open_listener(reactor, spec, 16)
        self.addCleanup(opened.close)
        endpoint = workers.adopted_endpoint(reactor, "tcp:0", os.dup(opened.fd))
        port = yield endpoint.listen(protocol.Factory.forProtocol(protocol.Protocol))
        self.addCleanup(port.stopListening)
        self.assertEqual(port.getHost().port, int(opened.address.rsplit(":", 1)[1]))

    @defer.inlineCallbacks
    def test_adopt_ssl(self) -> None:
        """An ssl: listener: the worker serves TLS with the endpoint's certificate."""
        cert, key, _ = ensure_certificate(self.mktemp())
        description = f"ssl:0:privateKey={key}:certKey={cert}:interface=127.0.0.1"
        opened = workers.open_listener(reactor, workers.parse_listener("smtps", description), 16)
        self.addCleanup(opened.close)
        endpoint = workers.adopted_endpoint(reactor, description, os.dup(opened.fd))
        port = yield endpoint.listen(protocol.Factory.forProtocol(Echo))
        self.addCleanup(port.stopListening)

        def client() -> bytes:
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10) as raw:
                with context.wrap_socket(raw) as tls:
                    tls.sendall(b"ping")
                    return tls.recv(4)

        self.assertEqual((yield threads.deferToThread(client)), b"ping")

    @defer.inlineCallbacks
    def test_unix_shared(self) -> None:
        """
        One UNIX socket for all; a worker stopping leaves its file, the
        parent's close removes it.
        """
        directory = tempfile.mkdtemp(prefix="ag-")  # AF_UNIX paths are short
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "s.sock")
        opened = workers.open_listener(reactor, workers.parse_listener("http", f"unix:{path}"), 16)
        endpoint = workers.adopted_endpoint(reactor, f"unix:{path}", os.dup(opened.fd))
        port = yield endpoint.listen(protocol.Factory.forProtocol(protocol.Protocol))
        yield port.stopListening()
        self.assertTrue(os.path.exists(path))
        yield opened.close()
        self.assertFalse(os.path.exists(path))


class SupervisionTests(SynchronousTestCase):
    """Restarts with backoff, signals forwarded, the stop."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.spawn = FakeSpawn()
        self.supervisor = workers.Supervisor(
            self.clock, 2, ["--auth", "memory:a:b"], {}, 50, 30.0, spawn=self.spawn,
            twistd=["twistd"], environ={},
        )
        with capturedLogs():
            self.supervisor.startService()

    def test_backoff(self) -> None:
        """0.5 s doubling to 30 s while it keeps dying; 0.5 s again after 60 s up."""
        slot = self.supervisor.slots[1]
        waits = []
        with capturedLogs() as events:
            for _ in range(9):
                self.spawn.end(len(self.spawn.processes) - 1 if slot.pid else 1, sig=signal.SIGKILL)
                self.assertEqual((slot.running, slot.pid), (False, None))
                call = slot.restart_call
                waits.append(call.getTime() - self.clock.seconds())
                self.clock.advance(waits[-1])
                self.assertEqual((slot.running, slot.pid), (True, self.spawn.processes[-1][0].pid))
        self.assertEqual(waits, [0.5, 1, 2, 4, 8, 16, 30, 30, 30])
        self.assertEqual(slot.restarts, 9)
        self.clock.advance(workers.BACKOFF_RESET)
        self.spawn.end(len(self.spawn.processes) - 1, exit_code=1)
        self.assertEqual(slot.restart_call.getTime() - self.clock.seconds(), 0.5)
        exited = [e for e in events if "exited unexpectedly" in e["log_format"]]
        self.assertEqual((exited[0]["worker"], exited[0]["pid"], exited[0]["how"]),
                         (1, 101, "killed by SIGKILL"))
        restarted = [e for e in events if "restarted" in e["log_format"]]
        self.assertEqual((restarted[0]["worker"], restarted[0]["pid"]), (1, 102))
        self.assertEqual(self.supervisor.slots[0].restarts, 0)

    def test_stale_end_ignored(self) -> None:
        """Only the slot's current process counts."""
        with capturedLogs():
            self.spawn.end(0, exit_code=3)
            self.clock.advance(0.5)
            self.spawn.processes[0][1].processEnded(Failure(error.ProcessDone(0)))
        self.assertEqual((self.supervisor.slots[0].running, self.supervisor.slots[0].pid), (True, 102))

    def test_forward(self) -> None:
        self.spawn.ready(0)
        self.spawn.ready(1)
        with capturedLogs():
            self.spawn.end(1, exit_code=1)
        self.supervisor.forward(signal.SIGHUP)
        self.supervisor.forward(signal.SIGUSR1)
        self.assertEqual(self.spawn.processes[0][0].signals, [signal.SIGHUP, signal.SIGUSR1])
        self.assertEqual(self.spawn.processes[1][0].signals, [])

    def test_held_until_ready(self) -> None:
        """
        SIGHUP and SIGUSR1 for a worker still starting are held (their
        default action would kill it), then sent once each when it is ready;
        SIGTERM is not held. A restarted worker starts not ready again.
        """
        self.spawn.ready(1)
        with capturedLogs() as events:
            for signum in (signal.SIGHUP, signal.SIGUSR1, signal.SIGHUP):
                self.supervisor.forward(signum)
        self.assertEqual(events, [])  # the ready record is no log line
        first, second = self.spawn.processes[0][0], self.spawn.processes[1][0]
        self.assertEqual(first.signals, [])
        self.assertEqual(second.signals, [signal.SIGHUP, signal.SIGUSR1, signal.SIGHUP])
        self.spawn.ready(0)
        self.assertEqual(first.signals, [signal.SIGHUP, signal.SIGUSR1])
        self.spawn.ready(0)  # said twice: nothing sent twice
        self.assertEqual(first.signals, [signal.SIGHUP, signal.SIGUSR1])
        with capturedLogs():
            self.spawn.end(1, sig=signal.SIGKILL)
            self.supervisor.forward(signal.SIGHUP)  # no process: nothing held for the next
            self.clock.advance(workers.BACKOFF_FIRST)
            self.supervisor.forward(signal.SIGUSR1)
            self.supervisor.forward(signal.SIGTERM)
        third = self.spawn.processes[2][0]
        self.assertEqual(third.signals, [signal.SIGTERM])
        self.spawn.ready(2)
        self.assertEqual(third.signals, [signal.SIGTERM, signal.SIGUSR1])

    def test_terminate_then_forward(self) -> None:
        """The first SIGTERM stops the parent (the reactor), the next reach the workers."""
        self.supervisor.terminate()
        self.assertTrue(self.clock.hasStopped)
        self.assertEqual(self.spawn.processes[0][0].signals, [])
        self.supervisor.terminate()
        self.assertEqual(self.spawn.processes[0][0].signals, [signal.SIGTERM])

    def test_stop(self) -> None:
        """SIGTERM to every worker; done when all ended; no restart then."""
        with capturedLogs():
            d = self.supervisor.stopService()
            self.assertTrue(self.supervisor.draining)
            self.assertEqual([p.signals for p, _ in self.spawn.processes],
                             [[signal.SIGTERM], [signal.SIGTERM]])
            self.assertNoResult(d)
            self.spawn.end(0, exit_code=0)
            self.assertNoResult(d)
            self.spawn.end(1, sig=signal.SIGTERM)
        self.successResultOf(d)
        self.clock.advance(100)
        self.assertEqual(len(self.spawn.processes), 2)
        self.assertEqual([s.running for s in self.supervisor.slots], [False, False])

    def test_stop_closes_sockets_first(self) -> None:
        """
        The parent closes its copy of every socket before SIGTERM reaches
        the workers: while they drain, a new connection is refused, never
        left waiting on a socket nobody accepts on.
        """
        spawn = FakeSpawn()
        supervisor = workers.Supervisor(
            self.clock, 2, [], {"smtp": "tcp:0:interface=127.0.0.1"}, 50, 30.0, spawn=spawn,
            twistd=["twistd"], environ={},
        )
        with capturedLogs():
            supervisor.startService()
        port = int(supervisor.open[0].address.rsplit(":", 1)[1])
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        seen: list[bool] = []
        spawn.processes[0][0].signalProcess = lambda signum: seen.append(supervisor.open == [])
        with capturedLogs():
            d = supervisor.stopService()
        self.assertEqual(seen, [True])
        self.assertRaises(ConnectionRefusedError, socket.create_connection, ("127.0.0.1", port), 5)
        with capturedLogs():
            spawn.end(0, exit_code=0)
            spawn.end(1, exit_code=0)
        self.successResultOf(d)

    def test_stop_cancels_restart(self) -> None:
        with capturedLogs():
            self.spawn.end(0, exit_code=1)
            d = self.supervisor.stopService()
            self.spawn.end(1, exit_code=0)
        self.successResultOf(d)
        self.clock.advance(100)
        self.assertEqual(len(self.spawn.processes), 2)

    def test_stop_kills_late_workers(self) -> None:
        """Still running --drain-timeout + STOP_GRACE after SIGTERM: SIGKILL."""
        with capturedLogs() as events:
            d = self.supervisor.stopService()
            self.clock.advance(30.0 + workers.STOP_GRACE - 0.1)
            self.assertEqual(self.spawn.processes[0][0].signals, [signal.SIGTERM])
            self.clock.advance(0.1)
            self.assertEqual(self.spawn.processes[0][0].signals, [signal.SIGTERM, signal.SIGKILL])
            self.spawn.end(0, sig=signal.SIGKILL)
            self.spawn.end(1, sig=signal.SIGKILL)
        self.successResultOf(d)
        self.assertTrue(any("killing them" in e["log_format"] for e in events))

    def test_stop_gives_up_on_unreaped(self) -> None:
        with capturedLogs():
            d = self.supervisor.stopService()
            self.clock.advance(30.0 + workers.STOP_GRACE)
            self.assertNoResult(d)
            self.clock.advance(workers.KILL_GRACE)
        self.successResultOf(d)

    def test_spawn_failure_retried(self) -> None:
        def broken(*args: Any, **kwargs: Any) -> Any:
            raise OSError("no more processes")

        supervisor = workers.Supervisor(self.clock, 1, [], {}, 50, 30.0, spawn=broken,
                                        twistd=["twistd"], environ={})
        with capturedLogs() as events:
            supervisor.startService()
        self.assertEqual(supervisor.slots[0].restart_call.getTime() - self.clock.seconds(), 0.5)
        self.assertTrue(any("could not start" in e["log_format"] for e in events))
        supervisor.stopService()


class LogRelayTests(SynchronousTestCase):
    """A worker's events in the parent's log, bounded."""

    def setUp(self) -> None:
        self.published: list[dict[str, Any]] = []
        self.slot = workers.Slot(1, pid=4242)
        self.relay = workers.LogRelay(self.slot, self.published.append)

    def test_event(self) -> None:
        line = _record(text="reload: ACL", level="info", namespace="gateway.ops.reload", time=1.0)
        with capturedLogs():
            self.relay.events.feed(line[:10])
            self.assertEqual(self.published, [])
            self.relay.events.feed(line[10:] + b"\n")
        [event] = self.published
        self.assertEqual(
            (event["worker"], event["worker_pid"], formatEvent(event), event["log_level"],
             event["log_time"]),
            (1, 4242, "reload: ACL", LogLevel.info, 1.0),
        )
        self.assertEqual(event["log_system"], "gateway.ops.reload#info worker=1")

    def test_system_kept(self) -> None:
        line = _record(text="x", system="SubmissionFactory,3,127.0.0.1")
        self.relay.events.feed(line + b"\n")
        self.assertEqual(self.published[0]["log_system"], "SubmissionFactory,3,127.0.0.1 worker=1")

    def test_text_is_not_a_format(self) -> None:
        """Braces in a worker's text are shown as they are, never formatted again."""
        self.relay.events.feed(_record(text="{log_text} {0} {x!r}", level="nonsense") + b"\n")
        [event] = self.published
        self.assertEqual((formatEvent(event), event["log_level"]), ("{log_text} {0} {x!r}", LogLevel.info))

    def test_too_long(self) -> None:
        """A line over the bound is dropped with one note; the next line is read."""
        with capturedLogs() as events:
            self.relay.events.feed(b"x" * (workers.MAX_LOG_LINE + 1))
            self.relay.events.feed(b"y" * workers.MAX_LOG_LINE * 2)
            self.relay.events.feed(b"z\n" + _record(text="ok") + b"\n")
            self.relay.events.feed(b"w" * 10 + b"v" * workers.MAX_LOG_LINE + b"\n")
        notes = [e for e in events if "was dropped" in e["log_format"]]
        self.assertEqual(len(notes), 2)
        self.assertEqual([formatEvent(e) for e in self.published], ["ok"])

    def test_lines(self) -> None:
        """Many lines in one chunk, a line split over chunks, a last line without newline."""
        lines: list[bytes] = []
        buffer = workers.LineBuffer(lines.append, lambda: self.fail("dropped"), limit=10)
        buffer.feed(b"".join(b"%d\n" % n for n in range(1000)) + b"ab")
        buffer.feed(b"c\n\nlast")
        buffer.flush()
        self.assertEqual(lines, [b"%d" % n for n in range(1000)] + [b"abc", b"", b"last"])

    def test_unreadable(self) -> None:
        with capturedLogs() as events:
            self.relay.events.feed(b"{not json\n[1]\n" + _record(text=None) + b"\n")
        self.assertEqual(self.published, [])
        self.assertEqual(len(events), 3)
        self.assertIn("unreadable", events[0]["log_format"])

    def test_stderr(self) -> None:
        with capturedLogs() as events:
            self.relay.stderr.feed(b"Traceback (most recent call last):\n  File")
            self.relay.stderr.flush()
        self.assertEqual([e["line"] for e in events], ["Traceback (most recent call last):", "  File"])
        self.assertEqual(events[0]["pid"], 4242)

    def test_pipe_logger_round_trip(self) -> None:
        """What L{pipe_logger} writes, the relay reads."""
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        saved = os.dup(workers.LOG_FD) if _open(workers.LOG_FD) else None
        os.dup2(write, workers.LOG_FD)
        os.close(write)
        ready: list[bool] = []
        self.relay = workers.LogRelay(self.slot, self.published.append, ready=lambda: ready.append(True))
        drains: list[Any] = []
        self.patch(workers.atexit, "register", lambda *a: drains.append(a))
        try:
            observer = workers.pipe_logger()
            observer(dict(log_format="hello {who}", who="you", log_level=LogLevel.warn,
                          log_namespace="n", log_time=2.0))
            observer({"log_format": "ready", workers.READY: True})
            self.assertFalse(os.get_blocking(workers.LOG_FD))
        finally:
            if saved is not None:
                os.dup2(saved, workers.LOG_FD)
                os.close(saved)
            else:
                os.close(workers.LOG_FD)
        self.relay.events.feed(os.read(read, 65536))
        [event] = self.published
        self.assertEqual(
            (formatEvent(event), event["log_level"], event["log_namespace"], event["log_time"]),
            ("hello you", LogLevel.warn, "n", 2.0),
        )
        self.assertEqual(ready, [True])
        [(drain, timeout)] = drains
        self.assertEqual(timeout, workers.EXIT_DRAIN)

    def test_pipe_nobody_reads(self) -> None:
        """
        A parent that does not read: the worker never blocks, keeps at most
        its bound, drops and counts the rest, and says how many once the
        pipe drains; lines are never cut.
        """
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        self.addCleanup(os.close, write)
        os.set_blocking(write, False)
        writer = workers.PipeWriter(write, limit=10_000)
        lines = [_record(text=f"{n:06d}" + "x" * 990) + b"\n" for n in range(300)]  # ~300 KB
        for line in lines:
            writer.write(line)  # a blocking write would hang here
        self.assertLessEqual(len(writer._pending), 10_000)
        self.patch(workers, "FLUSH_INTERVAL", 0.01)
        received = b""
        os.set_blocking(read, False)
        deadline = time.monotonic() + 10
        while b"dropped" not in received and time.monotonic() < deadline:
            try:
                received += os.read(read, 1 << 20)  # the flusher thread sends the rest: no flush() here
            except BlockingIOError:
                time.sleep(0.01)
        *texts, note = [json.loads(line)["text"] for line in received.splitlines()]
        self.assertEqual(texts, [json.loads(line)["text"] for line in lines[:len(texts)]])
        self.assertLess(len(texts), 300)
        self.assertEqual(note, f"{300 - len(texts)} log lines dropped: the parent did not read them in time")
        writer.write(lines[0])  # drained: the next line goes at once, no second note
        self.assertEqual(os.read(read, 1 << 20), lines[0])
        deadline = time.monotonic() + 10
        while writer._flusher is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertIsNone(writer._flusher)  # nothing waits: the thread ended

    def test_pipe_threads(self) -> None:
        """Lines written from several threads arrive whole, none lost while the pipe keeps up."""
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        self.addCleanup(os.close, write)
        os.set_blocking(write, False)
        writer = workers.PipeWriter(write, limit=1 << 24)

        def send(k: int) -> None:
            for n in range(500):
                writer.write(_record(text=f"{k}-{n}" + "y" * 300) + b"\n")

        threads_ = [threading.Thread(target=send, args=(k,)) for k in range(4)]
        for t in threads_:
            t.start()
        for t in threads_:
            t.join()
        received = b""
        os.set_blocking(read, False)
        while True:
            writer.flush()
            try:
                received += os.read(read, 1 << 20)
            except BlockingIOError:
                if not writer._pending:
                    break
        texts = sorted(json.loads(line)["text"] for line in received.splitlines())
        self.assertEqual(texts, sorted(f"{k}-{n}" + "y" * 300 for k in range(4) for n in range(500)))


def _record(**fields: Any) -> bytes:
    """A log line as L{workers.pipe_logger} writes it."""
    return json.dumps(fields).encode()


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


class WorkerSideTests(SynchronousTestCase):
    def test_parent_gone(self) -> None:
        """The parent's pipe closing stops the worker with SIGTERM (its drain)."""
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        kills: list[tuple[int, int]] = []
        clock = MemoryReactorClock()
        watch = workers.WorkerWatch(clock, 3, fd=read, kill=lambda *a: kills.append(a))
        watch.startService()
        self.assertIn(watch.watch, clock.readers)
        os.write(write, b"x")
        self.assertIsNone(watch.watch.doRead())
        os.close(write)
        why = watch.watch.doRead()
        self.assertIsInstance(why, error.ConnectionDone)
        with capturedLogs() as events:
            watch.watch.connectionLost(Failure(why))
        self.assertEqual(kills, [(os.getpid(), signal.SIGTERM)])
        self.assertEqual(events[0]["worker"], 3)
        watch.watch.connectionLost(Failure(why))
        self.assertEqual(len(kills), 1)

    def test_watch_stops(self) -> None:
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        self.addCleanup(os.close, write)
        clock = MemoryReactorClock()
        watch = workers.WorkerWatch(clock, 0, fd=read, kill=lambda *a: self.fail("killed"))
        watch.startService()
        watch.stopService()
        self.assertNotIn(watch.watch, clock.readers)

    def test_parent_death_signal(self) -> None:
        if not os.uname().sysname == "Linux":
            self.skipTest("PR_SET_PDEATHSIG is Linux's")
        self.assertTrue(workers.set_parent_death_signal(0))  # 0: cleared again


class ParentServiceTests(SynchronousTestCase):
    def test_make_service(self) -> None:
        """With --workers N > 1 makeService builds no core: the supervisor only."""
        keep_signal_handlers(self)
        data = self.mktemp()
        parsed = tap.Options()
        parsed.parseOptions(["--data-dir", data, "--auth", "memory:a:b", "--smtp", "tcp:0",
                             "--http", "none", "--socks", "none"])
        parsed["workers"] = 2
        clock = MemoryReactorClock()
        top = tap.makeService(parsed, clock)
        supervisor = top.getServiceNamed("workers")
        self.assertIsInstance(supervisor, workers.Supervisor)
        self.assertEqual(len(supervisor.slots), 2)
        self.assertFalse(supervisor.draining)
        self.assertEqual([s.metrics_socket for s in supervisor.slots], [None, None])

    def test_make_service_metrics(self) -> None:
        """With --metrics the parent serves it (gateway.ops.metrics.serve_parent)."""
        keep_signal_handlers(self)
        parsed = tap.Options()
        parsed.parseOptions(["--data-dir", self.mktemp(), "--auth", "memory:a:b", "--smtp", "tcp:0",
                             "--http", "none", "--socks", "none", "--metrics", "tcp:0"])
        parsed["workers"] = 2
        top = tap.makeService(parsed, MemoryReactorClock())
        supervisor = top.getServiceNamed("workers")
        self.addCleanup(shutil.rmtree, supervisor.run_dir, True)
        self.assertEqual(len(list(top)), 2)
        self.assertTrue(all(s.metrics_socket.startswith(supervisor.run_dir) for s in supervisor.slots))


class FakeSignalReactor:
    """What L{gateway.ops.signals.on_signal} uses of a reactor, run at once."""

    running = False

    def __init__(self) -> None:
        self.hooks: list[Any] = []

    def callWhenRunning(self, f: Any) -> None:
        self.hooks.append(f)

    def callFromThread(self, f: Any) -> None:
        f()


class ParentSignalTests(SynchronousTestCase):
    """The parent's handlers: SIGTERM and SIGINT stop it, SIGHUP and SIGUSR1 are forwarded."""

    def test_signals(self) -> None:
        keep_signal_handlers(self)
        fake = FakeSignalReactor()
        spawn = FakeSpawn()
        supervisor = workers.Supervisor(MemoryReactorClock(), 2, [], {}, 50, 30.0, spawn=spawn,
                                        twistd=["twistd"], environ={})
        with capturedLogs():
            supervisor.startService()
        workers.install_signals(fake, supervisor)
        spawn.ready(0)
        spawn.ready(1)
        for hook in fake.hooks:
            hook()
        for signum in (signal.SIGHUP, signal.SIGUSR1):
            signal.getsignal(signum)(signum, None)
        self.assertEqual([p.signals for p, _ in spawn.processes],
                         [[signal.SIGHUP, signal.SIGUSR1]] * 2)
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        self.assertTrue(supervisor.reactor.hasStopped)
        signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
        self.assertEqual(spawn.processes[0][0].signals[-1], signal.SIGTERM)
