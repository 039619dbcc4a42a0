"""
The graceful drain on a real C{twistd -n authgateway} process, started by
the test on free ports with a temporary data directory, and sent SIGTERM
with sessions open on every front door: an SMTP client (smtplib) in the
middle of DATA finishes its message, gets 250 and then 421, and the message
is in the spool; an idle SMTP session gets C{421 4.3.2}; an idle HTTP
keep-alive connection is closed; a curl request in flight (held by the
upstream) completes with C{Connection: close}; a SOCKS tunnel runs until
the deadline and is then cut; new connections are refused; the process
exits 0. A second SIGTERM ends the drain at once, and the wait for a relay
transaction in flight: the message stays queued and is relayed after a restart.
"""

from __future__ import annotations

import base64
import os
import signal
import smtplib
import socket
import ssl
import struct
import subprocess
import sys
import time
from typing import Any

from twisted.internet import defer, protocol, reactor, threads
from twisted.protocols import wire
from twisted.trial.unittest import TestCase
from twisted.web import resource, server

from gateway.ops.drain import ABORT_EXIT_GRACE, EXIT_GRACE, SERVICES_GRACE
from tests.support import free_port, require_tool
from tests.relay_support import start_relay
from tests.test_delivery_integration import queue_files, submit, until

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
HEAD = b"From: daniel@example.com\r\nTo: a@example.net\r\nSubject: drained\r\n\r\nfirst half\r\n"
TAIL = b"second half\r\n.\r\n"
BASIC = b"Basic " + base64.b64encode(b"daniel:tiger")


class Held(resource.Resource):
    """The upstream: holds each request until the test releases it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[server.Request] = []

    def render_GET(self, request: server.Request) -> object:
        self.requests.append(request)
        return server.NOT_DONE_YET

    def release(self) -> None:
        for request in self.requests:
            request.setHeader(b"content-type", b"text/plain")
            request.write(b"upstream answer\n")
            request.finish()
        self.requests = []


def refused(port: int) -> bool:
    """Whether a new connection to C{port} is refused."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


def read_to_eof(sock: socket.socket) -> bytes:
    """Everything until the gateway closes (or resets) the connection."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def _client_tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the gateway's self-signed certificate
    return context


def http_keep_alive(port: int, tls: bool = False) -> socket.socket:
    """An HTTP/1.1 connection that had one answered request and stays open."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    if tls:
        sock = _client_tls().wrap_socket(sock)
    sock.sendall(b"GET /whoami HTTP/1.1\r\nHost: gw.test\r\nAuthorization: " + BASIC + b"\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        body += sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"connection: close" not in head.lower(), head
    return sock


def socks_tunnel(port: int, echo: int) -> socket.socket:
    """A SOCKS5 tunnel (RFC 1929 login) to the echo server, checked with one round trip."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"\x05\x01\x02")
    assert sock.recv(2) == b"\x05\x02"
    sock.sendall(b"\x01\x06daniel\x05tiger")
    assert sock.recv(2) == b"\x01\x00"
    sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", echo))
    reply = sock.recv(10)
    assert reply[:2] == b"\x05\x00", reply
    echoed(sock, b"ping")
    return sock


def echoed(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(len(data) - len(got))
        assert chunk, "tunnel closed"
        got += chunk
    assert got == data, got


def in_data(port: int) -> smtplib.SMTP:
    """An authenticated session in the middle of DATA: the first half of the message sent."""
    client = smtplib.SMTP("127.0.0.1", port, timeout=30)
    client.login("daniel", "tiger")
    client.mail("daniel@example.com")
    client.rcpt("a@example.net")
    code, _ = client.docmd("DATA")
    assert code == 354, code
    client.sock.sendall(HEAD)
    return client


class DrainTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        if not os.path.exists(TWISTD):
            self.skipTest(f"no twistd next to {sys.executable}")
        self.curl = require_tool("curl", "curl")
        self.data = os.path.abspath(self.mktemp())
        os.makedirs(self.data)
        self.smtp, self.http, self.socks = free_port(), free_port(), free_port()
        self.upstream = Held()
        site = server.Site(self.upstream)
        site.log = lambda request: None  # type: ignore[method-assign]
        self.upstream_port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.upstream_port.stopListening)
        self.echo_port = reactor.listenTCP(
            0, protocol.Factory.forProtocol(wire.Echo), interface="127.0.0.1"
        )
        self.addCleanup(self.echo_port.stopListening)

    def twistd(self, drain_timeout: str, *extra: str) -> subprocess.Popen[bytes]:
        echo = self.echo_port.getHost().port
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        proc = subprocess.Popen(
            [TWISTD, "--pidfile=", "-n", "--logfile", os.path.join(self.data, "twistd.log"),
             "authgateway", "--data-dir", self.data, "--auth", "memory:daniel:tiger",
             "--smtp", f"tcp:{self.smtp}:interface=127.0.0.1", "--smtp-insecure-auth",
             "--smtp-hostname", "gw.test",
             "--http", f"tcp:{self.http}:interface=127.0.0.1",
             "--http-upstream", f"http://127.0.0.1:{self.upstream_port.getHost().port}",
             "--socks", f"tcp:{self.socks}:interface=127.0.0.1",
             "--socks-allow", f"127.0.0.1:{echo}",
             "--drain-timeout", drain_timeout, *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr(), env=env)

        def reap() -> None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

        self.addCleanup(reap)
        return proc

    @defer.inlineCallbacks
    def started(self, drain_timeout: str, *extra: str, ports: tuple[int, ...] = ()):
        proc = self.twistd(drain_timeout, *extra)
        for port in (self.smtp, self.http, self.socks, *ports):
            yield until(lambda port=port: not refused(port), what=f"twistd to listen on {port}")
        return proc

    def log(self) -> str:
        with open(os.path.join(self.data, "twistd.log"), errors="replace") as f:
            return f.read()

    def _stderr(self) -> Any:
        """twistd's standard error, kept in a file (the hard exit writes its line there)."""
        self.stderr_path = os.path.abspath(self.mktemp())
        f = open(self.stderr_path, "wb")  # noqa: SIM115 - the child holds it
        self.addCleanup(f.close)
        return f

    def stderr(self) -> str:
        with open(self.stderr_path, errors="replace") as f:
            return f.read()

    def spooled(self) -> list[str]:
        spool = os.path.join(self.data, "spool")
        return sorted(name for name in os.listdir(spool) if name.endswith(".eml"))

    def closeLater(self, resource_: object) -> None:
        self.addCleanup(resource_.close)  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_drain(self):
        proc = yield self.started("10")
        sending = yield threads.deferToThread(in_data, self.smtp)
        self.closeLater(sending)
        idle = yield threads.deferToThread(smtplib.SMTP, "127.0.0.1", self.smtp, None, 30)
        self.closeLater(idle)
        yield threads.deferToThread(idle.ehlo)
        keep_alive = yield threads.deferToThread(http_keep_alive, self.http)
        self.closeLater(keep_alive)
        tunnel = yield threads.deferToThread(
            socks_tunnel, self.socks, self.echo_port.getHost().port)
        self.closeLater(tunnel)
        curl = threads.deferToThread(
            subprocess.run,
            [self.curl, "-sS", "-i", "--max-time", "60", "-u", "daniel:tiger",
             f"http://127.0.0.1:{self.http}/held"],
            capture_output=True, timeout=90, check=False)
        yield until(lambda: self.upstream.requests, what="curl's request at the upstream")

        proc.send_signal(signal.SIGTERM)
        for port in (self.smtp, self.http, self.socks):  # no new connection
            yield until(lambda port=port: refused(port), what=f"port {port} to close")
        # The tunnel carries on while the drain lasts.
        yield threads.deferToThread(echoed, tunnel, b"still open")
        # The idle SMTP session is told at once; the idle keep-alive connection closed.
        reply = yield threads.deferToThread(idle.getreply)
        self.assertEqual(reply, (421, b"4.3.2 gw.test Service shutting down"))
        rest = yield threads.deferToThread(read_to_eof, keep_alive)
        self.assertEqual(rest, b"")
        # The message in DATA is finished, spooled, acknowledged, then 421.
        yield threads.deferToThread(sending.sock.sendall, TAIL)
        code, text = yield threads.deferToThread(sending.getreply)
        self.assertEqual(code, 250, text)
        self.assertIn(b"queued as", text)
        reply = yield threads.deferToThread(sending.getreply)
        self.assertEqual(reply, (421, b"4.3.2 gw.test Service shutting down"))
        [eml] = self.spooled()
        self.assertIn(eml[:-4].encode(), text)
        with open(os.path.join(self.data, "spool", eml), "rb") as f:
            self.assertTrue(f.read().endswith(b"first half\r\nsecond half\r\n"))
        # The request in flight completes, and its connection closes after it.
        self.upstream.release()
        done = yield curl
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertTrue(done.stdout.startswith(b"HTTP/1.1 200"), done.stdout)
        self.assertIn(b"\r\nconnection: close\r\n", done.stdout.lower())
        self.assertTrue(done.stdout.endswith(b"upstream answer\n"), done.stdout)
        # The tunnel is cut at the deadline; the process exits 0.
        yield threads.deferToThread(read_to_eof, tunnel)
        code = yield threads.deferToThread(proc.wait, 60)
        self.assertEqual(code, 0)
        log = self.log()
        self.assertIn("draining 5 session(s) (smtp 2, http 2, socks 1) for up to 10 s", log)
        self.assertIn("4 session(s) finished, 1 aborted (socks 1)", log)

    @defer.inlineCallbacks
    def test_second_sigterm(self):
        """A second SIGTERM aborts the drain at once; a message cut off in DATA was never accepted."""
        proc = yield self.started("600")
        sending = yield threads.deferToThread(in_data, self.smtp)
        self.closeLater(sending)
        tunnel = yield threads.deferToThread(
            socks_tunnel, self.socks, self.echo_port.getHost().port)
        self.closeLater(tunnel)
        proc.send_signal(signal.SIGTERM)
        yield until(lambda: refused(self.smtp), what="the SMTP port to close")
        yield until(lambda: "draining 2 session(s)" in self.log(), what="the drain to start")
        proc.send_signal(signal.SIGTERM)
        code = yield threads.deferToThread(proc.wait, 60)  # far below the 600 s drain
        self.assertEqual(code, 0)
        self.assertEqual((yield threads.deferToThread(read_to_eof, tunnel)), b"")
        self.assertEqual(os.listdir(os.path.join(self.data, "spool")), [])  # no temporary file either
        self.assertIn("drain aborted after", self.log())
        self.assertIn("0 session(s) finished, 2 aborted (smtp 1, socks 1)", self.log())

    @defer.inlineCallbacks
    def test_stop_mid_relay(self):
        """
        A stop while a message is being relayed (the relay stalls after its
        DATA) loses nothing: a second SIGTERM ends delivery's wait, the
        message stays queued, and the next start relays it.
        """
        relay = start_relay(self)
        relay.handler.data = ["stall", "250 2.0.0 Ok"]
        proc = yield self.started("600", "--relay", relay.url(), "--relay-retry", "1s")
        yield submit(self.smtp, ["a@example.net"])
        spool = os.path.join(self.data, "spool")
        [id] = {name.split(".")[0] for name in queue_files(spool)}
        yield until(lambda: len(relay.handler.data) == 1, what="the relay's DATA to stall")
        proc.send_signal(signal.SIGTERM)
        yield until(lambda: "drain ended" in self.log(), what="the drain (no session) to end")
        self.assertIsNone(proc.poll())  # delivery waits for the message in flight
        proc.send_signal(signal.SIGTERM)
        code = yield threads.deferToThread(proc.wait, 60)
        self.assertEqual(code, 0)
        self.assertLessEqual({f"{id}.eml", f"{id}.json"}, set(queue_files(spool)))  # still queued
        self.twistd("600", "--relay", relay.url(), "--relay-retry", "1s")
        yield relay.handler.wait_messages(1, reactor, timeout=60)
        yield until(lambda: not queue_files(spool), what="the queue to empty")
        [message] = relay.handler.messages
        self.assertEqual(message.rcpt_tos, ["a@example.net"])

    @defer.inlineCallbacks
    def test_idle_clients_hold_no_drain(self):
        """
        Clients without an account hold no drain: a request line whose
        headers never come, idle SMTPS and HTTPS sessions that never send
        their TLS close_notify (each gets its 421 or close), and half a SOCKS
        greeting all end within seconds of SIGTERM, far below --drain-timeout,
        and count as finished.
        """
        smtps, https = free_port(), free_port()
        proc = yield self.started(
            "60", "--smtps", f"tcp:{smtps}:interface=127.0.0.1",
            "--https", f"tcp:{https}:interface=127.0.0.1", ports=(smtps, https))

        def connect() -> list[socket.socket]:
            idle_smtps = _client_tls().wrap_socket(socket.create_connection(("127.0.0.1", smtps), timeout=30))
            assert idle_smtps.recv(512).startswith(b"220 gw.test "), "no greeting"
            partial = socket.create_connection(("127.0.0.1", self.http), timeout=30)
            partial.sendall(b"GET /whoami HTTP/1.1\r\nHost: gw.test\r\n")
            greeting = socket.create_connection(("127.0.0.1", self.socks), timeout=30)
            greeting.sendall(b"\x05")
            return [idle_smtps, http_keep_alive(https, tls=True), partial, greeting]

        clients = yield threads.deferToThread(connect)
        for client in clients:
            self.closeLater(client)
        yield until(lambda: self.log().count("auth success") >= 1, what="the HTTPS login")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = yield threads.deferToThread(proc.wait, 60)
        elapsed = time.monotonic() - started
        self.assertEqual(code, 0)
        self.assertLess(elapsed, 15, self.log())  # CLOSED_GRACE and a poll, not the 60 s deadline
        answers = yield threads.deferToThread(lambda: [read_to_eof(c) for c in clients])
        self.assertEqual(answers[0], b"421 4.3.2 gw.test Service shutting down\r\n")
        self.assertEqual(answers[1:], [b"", b"", b""])
        self.assertIn("draining 4 session(s) (smtp 1, http 2, socks 1) for up to 60 s", self.log())
        self.assertIn("4 session(s) finished, 0 aborted (none)", self.log())

    @defer.inlineCallbacks
    def test_stop_bounded_by_drain_timeout(self):
        """
        A relay that stalls holds the stop no longer than --drain-timeout and
        SERVICES_GRACE (not delivery's own 30 s): delivery took no new work
        from the drain's start and got what was left of the deadline; the
        warning counts the message in flight; it stays queued.
        """
        relay = start_relay(self)
        relay.handler.data = ["stall", "250 2.0.0 Ok"]
        proc = yield self.started("3", "--relay", relay.url(), "--relay-retry", "1s")
        yield submit(self.smtp, ["a@example.net"])
        spool = os.path.join(self.data, "spool")
        [id] = {name.split(".")[0] for name in queue_files(spool)}
        yield until(lambda: len(relay.handler.data) == 1, what="the relay's DATA to stall")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = yield threads.deferToThread(proc.wait, 60)
        elapsed = time.monotonic() - started
        self.assertEqual(code, 0)
        self.assertLess(elapsed, 3 + SERVICES_GRACE + 2, self.log())
        self.assertIn("delivery: 1 message(s) still in flight at stop", self.log())
        self.assertLessEqual({f"{id}.eml", f"{id}.json"}, set(queue_files(spool)))

    @defer.inlineCallbacks
    def test_hung_thread(self):
        """
        A checker hung in a worker thread (the reactor joins its pool at
        shutdown, blocking) does not keep the process: a second SIGTERM ends
        it within ABORT_EXIT_GRACE, exit status 0, the message accepted
        before still spooled.
        """
        proc = yield self.started("600", "--checker", "tests.blocking_checker.auth_block")
        yield submit(self.smtp, ["a@example.net"])  # as daniel (memory:): accepted and spooled
        [eml] = self.spooled()
        hung = yield threads.deferToThread(socket.create_connection, ("127.0.0.1", self.smtp), 30)
        self.closeLater(hung)
        yield threads.deferToThread(
            hung.sendall, b"EHLO x\r\nAUTH PLAIN " + base64.b64encode(b"\0carol\0pw") + b"\r\n")
        yield threads.deferToThread(time.sleep, 1)  # the check runs in its thread
        proc.send_signal(signal.SIGTERM)
        yield until(lambda: "draining" in self.log(), what="the drain to start")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = yield threads.deferToThread(proc.wait, 60)
        self.assertEqual(code, 0)
        self.assertLess(time.monotonic() - started, ABORT_EXIT_GRACE + 3, self.log())
        self.assertIn("exiting now", self.stderr())
        self.assertEqual(self.spooled(), [eml])

    @defer.inlineCallbacks
    def test_hung_thread_one_signal(self):
        """With one SIGTERM the hung thread holds the exit until the drain's deadline plus EXIT_GRACE."""
        proc = yield self.started("1", "--checker", "tests.blocking_checker.auth_block")
        hung = yield threads.deferToThread(socket.create_connection, ("127.0.0.1", self.smtp), 30)
        self.closeLater(hung)
        yield threads.deferToThread(
            hung.sendall, b"EHLO x\r\nAUTH PLAIN " + base64.b64encode(b"\0carol\0pw") + b"\r\n")
        yield threads.deferToThread(time.sleep, 1)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = yield threads.deferToThread(proc.wait, 60)
        self.assertEqual(code, 0)
        self.assertLess(time.monotonic() - started, 1 + EXIT_GRACE + 3, self.log())
        self.assertIn("exiting now", self.stderr())
