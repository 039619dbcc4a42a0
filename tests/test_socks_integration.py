"""
Loopback integration tests of the SOCKS5 front door: the real service started
by C{makeService}, talked to by clients we did not write (C{curl}
C{--socks5} and C{--socks5-hostname}, PySocks) and by raw sockets that speak
the wire format byte by byte: Firefox's single-method greeting, a handshake
split into one-byte segments, a handshake merged with the first payload into
one segment, a refused destination, and a 200 MB transfer checked with
SHA-256 on both ends.

Loopback destinations are refused by default, so the gateway is started with
C{--socks-allow} rules naming exactly the local servers' ports (by address
and by the name C{localhost}); any other loopback port or address stays
refused. Before a test ends, every session and every connection to the local
servers must have closed: no dirty reactor.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import struct
import subprocess
import time

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, protocol, reactor, task, threads
from twisted.protocols import policies, wire
from twisted.trial.unittest import TestCase
from twisted.web import resource, server

from gateway import tap
from tests.support import free_port, keep_signal_handlers, require_module, require_tool

BODY = b"hello through the SOCKS5 front door\n" * 10
USER, PASSWORD = b"daniel", b"tiger"





# -- a raw SOCKS5 client (blocking: run it through threads.deferToThread) ----


def greeting(*methods: int) -> bytes:
    return bytes([5, len(methods), *methods])


def userpass(user: bytes = USER, password: bytes = PASSWORD) -> bytes:
    return bytes([1, len(user)]) + user + bytes([len(password)]) + password


def connect_ipv4(host: str, port: int) -> bytes:
    return b"\x05\x01\x00\x01" + socket.inet_aton(host) + struct.pack("!H", port)


def connect_name(name: str, port: int) -> bytes:
    raw = name.encode("ascii")
    return b"\x05\x01\x00\x03" + bytes([len(raw)]) + raw + struct.pack("!H", port)


def recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise AssertionError(f"connection closed after {data!r}, wanted {size} bytes")
        data += chunk
    return data


def recv_reply(sock: socket.socket) -> tuple[int, str, int]:
    """A SOCKS5 reply: (REP, BND.ADDR, BND.PORT)."""
    head = recv_exact(sock, 4)
    assert head[0] == 5 and head[2] == 0, head
    if head[3] == 1:
        host = socket.inet_ntop(socket.AF_INET, recv_exact(sock, 4))
    elif head[3] == 4:
        host = socket.inet_ntop(socket.AF_INET6, recv_exact(sock, 16))
    else:
        raise AssertionError(f"unexpected ATYP in reply {head!r}")
    (port,) = struct.unpack("!H", recv_exact(sock, 2))
    return head[1], host, port


def recv_all(sock: socket.socket) -> bytes:
    """Everything until the other side closes."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def dial(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def open_tunnel(proxy_port: int, request: bytes) -> socket.socket:
    """Greeting, RFC 1929 login and C{request}; the socket once the reply says 0."""
    sock = dial(proxy_port)
    try:
        sock.sendall(greeting(2))
        assert recv_exact(sock, 2) == b"\x05\x02"
        sock.sendall(userpass())
        assert recv_exact(sock, 2) == b"\x01\x00"
        sock.sendall(request)
        rep, _, _ = recv_reply(sock)
        assert rep == 0, f"REP {rep}"
    except BaseException:
        sock.close()
        raise
    return sock


# -- the gateway and the local servers ----------------------------------------


class GatewayMixin:
    """
    Starts local servers (wrapped, so the test can wait for their connections
    to close) and the gateway's SOCKS front door with --auth
    memory:daniel:tiger on a free loopback port.
    """

    def serve(self, factory: protocol.Factory) -> tuple[int, policies.WrappingFactory]:
        """C{factory} on 127.0.0.1 (a free port): its port and its tracking wrapper."""
        wrapper = policies.WrappingFactory(factory)
        port = reactor.listenTCP(0, wrapper, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.wrappers.append(wrapper)
        return port.getHost().port, wrapper

    def start(self, *allow: str, extra: tuple[str, ...] = ()) -> None:
        self.socks_port = free_port()
        options = tap.Options()
        arguments = [
            "--data-dir", os.path.abspath(self.mktemp()), "--auth", "memory:daniel:tiger",
            "--socks", f"tcp:{self.socks_port}:interface=127.0.0.1",
            "--smtp", "none", "--http", "none",
            "--failure-delay", "0", "--failure-delay-max", "0",
        ]
        for rule in allow:
            arguments += ["--socks-allow", rule]
        options.parseOptions(arguments + list(extra))
        keep_signal_handlers(self)
        self.service = tap.makeService(options, reactor=reactor)
        [door] = [s for s in self.service if isinstance(s, StreamServerEndpointService)]
        self.socks_limit = door.factory.limit
        self.socks_factory = door.factory.wrappedFactory
        self.service.startService()
        self.addCleanup(self.service.stopService)
        # Runs first (cleanups are LIFO): no session left before the listeners stop.
        self.addCleanup(self.quiet)

    @defer.inlineCallbacks
    def quiet(self, timeout: float = 10):
        """Wait until every SOCKS session, outbound and local server connection has closed."""
        end = time.monotonic() + timeout
        factory, sessions = self.socks_factory, self.socks_limit.counts
        while sessions or factory.outbound_open or any(w.protocols for w in self.wrappers):
            if time.monotonic() > end:
                raise AssertionError(
                    f"still open after {timeout} s: sessions {dict(sessions)}, "
                    f"outbound {factory.outbound_open}, "
                    f"server connections {[len(w.protocols) for w in self.wrappers]}"
                )
            yield task.deferLater(reactor, 0.01, lambda: None)


class Body(resource.Resource):
    """L{BODY} at every path."""

    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain")
        return BODY


class LocalServersMixin(GatewayMixin):
    """An HTTP server serving L{BODY} and an echo server; the gateway may reach both."""

    #: More gateway options for a test class.
    extra: tuple[str, ...] = ()

    def setUp(self):
        self.wrappers = []
        site = server.Site(Body())
        site.log = lambda request: None
        self.http_port, _ = self.serve(site)
        self.echo_port, _ = self.serve(protocol.Factory.forProtocol(wire.Echo))
        self.start(
            f"127.0.0.1:{self.http_port}", f"localhost:{self.http_port}",
            f"127.0.0.1:{self.echo_port}", f"localhost:{self.echo_port}",
            extra=self.extra,
        )


# -- curl ---------------------------------------------------------------------


def curl(*args: str) -> subprocess.CompletedProcess:
    """Run curl (blocking); no proxy setting from the environment applies."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    return subprocess.run(
        ["curl", "-q", "--silent", "--show-error", "--max-time", "20", *args],
        capture_output=True, timeout=60, check=False, env=env,
    )


class CurlTests(LocalServersMixin, TestCase):
    """curl through the gateway to a local twisted.web server."""

    timeout = 60

    def setUp(self):
        require_tool("curl", "curl")
        super().setUp()

    def proxy(self) -> str:
        return f"127.0.0.1:{self.socks_port}"

    def assertFetched(self, result: subprocess.CompletedProcess) -> None:
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, BODY)

    @defer.inlineCallbacks
    def test_socks5_hostname(self):
        # The name goes to the gateway (ATYP 3), which resolves it.
        result = yield threads.deferToThread(
            curl, "--socks5-hostname", self.proxy(), "--proxy-user", "daniel:tiger",
            f"http://localhost:{self.http_port}/",
        )
        self.assertFetched(result)

    @defer.inlineCallbacks
    def test_socks5_local_resolution(self):
        # curl resolves, the gateway gets an IPv4 address (ATYP 1).
        result = yield threads.deferToThread(
            curl, "--socks5", self.proxy(), "--proxy-user", "daniel:tiger",
            f"http://localhost:{self.http_port}/",
        )
        self.assertFetched(result)

    @defer.inlineCallbacks
    def test_socks5_proxy_url(self):
        result = yield threads.deferToThread(
            curl, "--proxy", f"socks5h://daniel:tiger@{self.proxy()}",
            f"http://127.0.0.1:{self.http_port}/",
        )
        self.assertFetched(result)

    @defer.inlineCallbacks
    def test_wrong_password(self):
        for flag in ("--socks5-hostname", "--socks5"):
            result = yield threads.deferToThread(
                curl, flag, self.proxy(), "--proxy-user", "daniel:lion",
                f"http://localhost:{self.http_port}/",
            )
            self.assertEqual(result.returncode, 97, (flag, result.stderr))  # CURLE_PROXY
            self.assertEqual(result.stdout, b"")

    @defer.inlineCallbacks
    def test_unknown_user(self):
        result = yield threads.deferToThread(
            curl, "--socks5-hostname", self.proxy(), "--proxy-user", "mallory:tiger",
            f"http://localhost:{self.http_port}/",
        )
        self.assertEqual(result.returncode, 97, result.stderr)

    @defer.inlineCallbacks
    def test_no_proxy_user(self):
        # curl offers only "no authentication"; the gateway answers 05 FF.
        result = yield threads.deferToThread(
            curl, "--socks5-hostname", self.proxy(), f"http://localhost:{self.http_port}/",
        )
        self.assertEqual(result.returncode, 97, result.stderr)
        self.assertIn(b"authentication", result.stderr.lower())
        self.assertEqual(result.stdout, b"")


# -- PySocks ------------------------------------------------------------------


class PySocksTests(LocalServersMixin, TestCase):
    """PySocks' socksocket through the gateway to a local echo server."""

    timeout = 60

    def setUp(self):
        self.socks = require_module("socks", "PySocks")
        super().setUp()

    def echo(self, host: str, rdns: bool, password: str = "tiger") -> tuple[bytes, tuple]:
        sock = self.socks.socksocket()
        sock.set_proxy(self.socks.SOCKS5, "127.0.0.1", self.socks_port, rdns=rdns,
                       username="daniel", password=password)
        sock.settimeout(20)
        with sock:
            sock.connect((host, self.echo_port))
            bound = sock.get_proxy_sockname()
            payload = bytes(range(256)) * 64
            sock.sendall(payload)
            echoed = recv_exact(sock, len(payload))
            self.assertEqual(echoed, payload)
            sock.sendall(b"and once more")
            return recv_exact(sock, 13), bound

    @defer.inlineCallbacks
    def test_remote_dns(self):
        echoed, bound = yield threads.deferToThread(self.echo, "localhost", True)
        self.assertEqual(echoed, b"and once more")
        self.assertEqual(bound[0], "127.0.0.1")
        self.assertNotEqual(bound[1], 0)

    @defer.inlineCallbacks
    def test_local_dns(self):
        echoed, bound = yield threads.deferToThread(self.echo, "localhost", False)
        self.assertEqual(echoed, b"and once more")
        self.assertEqual(bound[0], "127.0.0.1")

    @defer.inlineCallbacks
    def test_ip_literal(self):
        echoed, _ = yield threads.deferToThread(self.echo, "127.0.0.1", True)
        self.assertEqual(echoed, b"and once more")

    @defer.inlineCallbacks
    def test_wrong_password(self):
        # PySocks wraps the negotiation's error in a GeneralProxyError.
        with self.assertRaises(self.socks.GeneralProxyError) as caught:
            yield threads.deferToThread(self.echo, "localhost", True, "lion")
        self.assertIsInstance(caught.exception.socket_err, self.socks.SOCKS5AuthError)


# -- raw sockets --------------------------------------------------------------


class RawClientTests(LocalServersMixin, TestCase):
    """The wire format as real clients send it, and the exact reply bytes."""

    timeout = 60

    @defer.inlineCallbacks
    def test_firefox_greeting_and_domain_request(self):
        # Firefox with a proxy password offers only 02, then RFC 1929, then a
        # CONNECT with the host name (remote DNS).
        def session():
            with dial(self.socks_port) as sock:
                sock.sendall(b"\x05\x01\x02")
                method = recv_exact(sock, 2)
                sock.sendall(userpass())
                auth = recv_exact(sock, 2)
                sock.sendall(connect_name("localhost", self.echo_port))
                reply = recv_reply(sock)
                sock.sendall(b"ping")
                return method, auth, reply, recv_exact(sock, 4)

        method, auth, (rep, host, port), echoed = yield threads.deferToThread(session)
        self.assertEqual(method, b"\x05\x02")
        self.assertEqual(auth, b"\x01\x00")
        self.assertEqual((rep, host), (0, "127.0.0.1"))
        self.assertNotEqual(port, 0)
        self.assertEqual(echoed, b"ping")

    @defer.inlineCallbacks
    def test_split_handshake(self):
        # Every byte in a segment of its own (TCP_NODELAY, a pause between sends).
        def session():
            with dial(self.socks_port) as sock:
                received = b""
                for part, answer in ((greeting(0, 2), 2), (userpass(), 2),
                                     (connect_name("localhost", self.echo_port), 10)):
                    for i in range(len(part)):
                        sock.sendall(part[i:i + 1])
                        time.sleep(0.002)
                    received += recv_exact(sock, answer)
                for i in range(5):
                    sock.sendall(b"split"[i:i + 1])
                    time.sleep(0.002)
                return received, recv_exact(sock, 5)

        received, echoed = yield threads.deferToThread(session)
        self.assertEqual(received[:4], b"\x05\x02\x01\x00")
        self.assertEqual(received[4:8], b"\x05\x00\x00\x01")
        self.assertEqual(received[8:12], socket.inet_aton("127.0.0.1"))
        self.assertNotEqual(received[12:14], b"\x00\x00")
        self.assertEqual(echoed, b"split")

    @defer.inlineCallbacks
    def test_merged_handshake(self):
        # Greeting, login, request and the first payload in one segment.
        payload = b"early bytes, sent before any answer\n" * 100

        def session():
            with dial(self.socks_port) as sock:
                sock.sendall(greeting(2) + userpass() + connect_name("localhost", self.echo_port)
                             + payload)
                method, auth = recv_exact(sock, 2), recv_exact(sock, 2)
                reply = recv_reply(sock)
                return method, auth, reply, recv_exact(sock, len(payload))

        method, auth, (rep, host, port), echoed = yield threads.deferToThread(session)
        self.assertEqual((method, auth), (b"\x05\x02", b"\x01\x00"))
        self.assertEqual((rep, host), (0, "127.0.0.1"))
        self.assertNotEqual(port, 0)
        self.assertEqual(echoed, payload)

    @defer.inlineCallbacks
    def test_merged_handshake_ipv4(self):
        def session():
            with dial(self.socks_port) as sock:
                sock.sendall(greeting(0, 2) + userpass() + connect_ipv4("127.0.0.1", self.echo_port)
                             + b"abc")
                head = recv_exact(sock, 4)
                reply = recv_reply(sock)
                return head, reply, recv_exact(sock, 3)

        head, (rep, host, _), echoed = yield threads.deferToThread(session)
        self.assertEqual(head, b"\x05\x02\x01\x00")
        self.assertEqual((rep, host, echoed), (0, "127.0.0.1", b"abc"))

    def refused(self, request: bytes) -> tuple[int, bytes]:
        """REP for C{request}, and what came after it before the close."""
        with dial(self.socks_port) as sock:
            sock.sendall(greeting(2) + userpass() + request)
            assert recv_exact(sock, 4) == b"\x05\x02\x01\x00"
            rep, _, _ = recv_reply(sock)
            return rep, recv_all(sock)

    @defer.inlineCallbacks
    def test_refused_loopback_port(self):
        # A loopback port no --socks-allow rule names (nothing needs to listen there).
        other = free_port()
        for request in (connect_ipv4("127.0.0.1", other), connect_name("localhost", other)):
            rep, after = yield threads.deferToThread(self.refused, request)
            self.assertEqual((rep, after), (2, b""), request)

    @defer.inlineCallbacks
    def test_refused_other_loopback_address(self):
        # 127.0.0.2 is loopback too, but only 127.0.0.1 is allowed.
        rep, after = yield threads.deferToThread(
            self.refused, connect_ipv4("127.0.0.2", self.echo_port)
        )
        self.assertEqual((rep, after), (2, b""))

    @defer.inlineCallbacks
    def test_wrong_password(self):
        def session():
            with dial(self.socks_port) as sock:
                sock.sendall(b"\x05\x01\x02" + userpass(password=b"lion"))
                return recv_all(sock)

        self.assertEqual((yield threads.deferToThread(session)), b"\x05\x02\x01\x01")

    @defer.inlineCallbacks
    def test_no_authentication_offered(self):
        def session():
            with dial(self.socks_port) as sock:
                sock.sendall(b"\x05\x01\x00")
                return recv_all(sock)

        self.assertEqual((yield threads.deferToThread(session)), b"\x05\xff")


class SessionLimitTests(LocalServersMixin, TestCase):
    """Sessions per user through the core's State (local state): the second is refused at login."""

    timeout = 60
    extra = ("--socks-max-sessions-per-user", "1")

    @defer.inlineCallbacks
    def test_second_session_of_a_user_refused(self):
        first = yield threads.deferToThread(
            open_tunnel, self.socks_port, connect_ipv4("127.0.0.1", self.echo_port)
        )

        def second():
            with dial(self.socks_port) as sock:
                sock.sendall(greeting(2) + userpass())
                return recv_all(sock)

        try:
            self.assertEqual((yield threads.deferToThread(second)), b"\x05\x02\x01\x01")
        finally:
            first.close()
        yield self.quiet()
        self.assertEqual(dict(self.socks_factory.sessions.counts), {})
        third = yield threads.deferToThread(
            open_tunnel, self.socks_port, connect_ipv4("127.0.0.1", self.echo_port)
        )
        third.close()


# -- bulk ---------------------------------------------------------------------

MIB = 1024 * 1024


class Source:
    """
    A plain-socket server (run in a thread) that sends C{size} bytes of
    deterministic pseudo-random data to its first client, then closes; it
    hashes what it sends. The data: a 1 MiB random block from a seeded PRNG,
    each MiB of the stream a rotation of it by a PRNG-chosen offset, so that
    a lost, repeated or reordered segment changes the digest.
    """

    def __init__(self, size: int, seed: int = 1928) -> None:
        self.size = size
        rng = random.Random(seed)
        self.block = memoryview(rng.randbytes(MIB))
        self.offsets = [rng.randrange(MIB) for _ in range(size // MIB + 1)]
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(30)
        self.port = self.listener.getsockname()[1]

    def serve(self) -> tuple[int, str]:
        digest, sent = hashlib.sha256(), 0
        try:
            sock, _ = self.listener.accept()
        finally:
            self.listener.close()
        with sock:
            sock.settimeout(30)
            for offset in self.offsets:
                for part in (self.block[offset:], self.block[:offset]):
                    part = part[: self.size - sent]
                    if part:
                        digest.update(part)
                        sock.sendall(part)
                        sent += len(part)
            sock.shutdown(socket.SHUT_WR)
            # Wait for the client's close, so the gateway sees both sides finish.
            sock.recv(1)
        return sent, digest.hexdigest()

    def close(self) -> None:
        self.listener.close()


def sink(proxy_port: int, source_port: int) -> tuple[int, str]:
    """Read through the proxy until the close: (bytes, SHA-256)."""
    digest, received = hashlib.sha256(), 0
    buffer = bytearray(MIB)
    view = memoryview(buffer)
    with open_tunnel(proxy_port, connect_ipv4("127.0.0.1", source_port)) as sock:
        sock.settimeout(30)
        while n := sock.recv_into(buffer):
            digest.update(view[:n])
            received += n
    return received, digest.hexdigest()


class BulkTransferTests(GatewayMixin, TestCase):
    """200 MB from a plain-socket source, through the gateway, intact."""

    timeout = 120
    size = 200 * 1000 * 1000

    def setUp(self):
        self.wrappers = []
        self.source = Source(self.size)
        self.addCleanup(self.source.close)
        self.start(f"127.0.0.1:{self.source.port}")

    @defer.inlineCallbacks
    def test_200_mb_sha256(self):
        started = time.monotonic()
        sent, received = yield defer.gatherResults(
            [threads.deferToThread(self.source.serve),
             threads.deferToThread(sink, self.socks_port, self.source.port)],
            consumeErrors=True,
        )
        elapsed = time.monotonic() - started
        self.assertEqual(sent[0], self.size)
        self.assertEqual(received, sent)
        # Not a benchmark (bench/socks_bench.py is): a stall would show here.
        self.assertLess(elapsed, 60, f"{self.size} bytes took {elapsed:.1f} s")
