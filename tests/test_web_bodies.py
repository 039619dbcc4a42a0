"""
Issue 11 items 4 (HTTP body deadline) and 5 (unauthenticated bodies): what
the gateway reads of a request body before it has decided on the request,
and for how long. Unit tests over a C{StringTransport} and a clock, and
real-socket tests against the service C{makeService} builds.
"""

from __future__ import annotations

import os
import socket
import time

from twisted.internet import defer, protocol, reactor, threads
from twisted.trial.unittest import TestCase

import gateway.web.server
from tests.test_web_guard import CapturingUpstream, GuardTestCase, ListConsumer, basic
from tests.test_web_integration import GatewayMixin


class EarlyDecisionTests(GuardTestCase):
    """Item 5: beyond --http-max-body, nothing is read before the request is let through."""

    def setUp(self):
        self.upstream = CapturingUpstream()
        self.make(proxy=self.upstream, upstream="http://up.test", max_body=1000)

    def head(self, framing, auth=None, path=b"/f", extra=b""):
        channel, transport = self.connect()
        lines = [b"POST " + path + b" HTTP/1.1", b"Host: up.test", framing]
        if auth is not None:
            lines.append(b"Authorization: " + auth)
        channel.dataReceived(b"\r\n".join(lines) + b"\r\n\r\n" + extra)
        return channel, transport

    def test_refused_at_once(self):
        """Above max_body (not only above 64 KiB), or chunked: 401 before any body, then closed."""
        for framing in (b"Content-Length: 50000000", b"Content-Length: 1001",
                        b"Transfer-Encoding: chunked"):
            for auth in (None, basic("daniel", "lion")):
                channel, transport = self.head(framing, auth, extra=b"x" * 500)
                out = transport.value()
                self.assertTrue(out.startswith(b"HTTP/1.1 401 "), (framing, auth, out[:60]))
                self.assertTrue(transport.disconnecting, framing)
                self.assertNotIn(b"100 Continue", out)
                channel.dataReceived(b"y" * 100000)  # in flight: dropped
                self.assertEqual(transport.value(), out)
        self.assertEqual(self.upstream.calls, [])

    def test_expect_continue_refused(self):
        channel, transport = self.head(b"Content-Length: 50000000\r\nExpect: 100-continue")
        out = transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 401 "), out[:60])
        self.assertNotIn(b"100 Continue", out)

    def test_acl_refusal_at_once(self):
        from tests.test_web_guard import Policy

        self.make(proxy=self.upstream, upstream="http://up.test", max_body=1000,
                  policy=Policy(("http/up.test/f", "post")))
        channel, transport = self.head(b"Content-Length: 5000", basic("daniel", "tiger"))
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 403 "))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.upstream.calls, [])

    def test_without_the_request_line(self):
        """
        A Twisted that no longer tells the request line before the body
        (L{gateway.twistedinternals.request_line}): the body is read first,
        within max_body, then decided.
        """
        self.patch(gateway.web.server, "request_line", lambda channel: None)
        channel, transport = self.head(b"Content-Length: 1001", basic("daniel", "tiger"))
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "))
        self.assertTrue(transport.disconnecting)
        channel, transport = self.head(b"Content-Length: 1000", basic("daniel", "tiger"))
        self.assertEqual(self.upstream.calls, [])
        channel.dataReceived(b"z" * 1000)
        self.assertEqual(len(self.upstream.calls), 1)

    def test_small_body_read_first(self):
        """Within max_body the body is read, then decided (the usual path)."""
        channel, transport = self.head(b"Content-Length: 1000")
        self.assertEqual(transport.value(), b"")
        channel.dataReceived(b"x" * 1000)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 401 "))

    def test_allowed_streams(self):
        channel, transport = self.head(b"Content-Length: 5000", basic("daniel", "tiger"))
        [(_, body)] = self.upstream.calls
        consumer = ListConsumer()
        body.startProducing(consumer)
        channel.dataReceived(b"z" * 5000)
        self.assertEqual(b"".join(consumer.chunks), b"z" * 5000)

    def test_own_resources_keep_the_small_limit(self):
        """With an upstream, /auth and /whoami bodies are still bounded by max_body."""
        for path in (b"/auth", b"/whoami", b"/%61uth"):
            channel, transport = self.head(b"Content-Length: 1001", basic("daniel", "tiger"), path)
            self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "), path)
            self.assertTrue(transport.disconnecting)
            channel, transport = self.head(b"Transfer-Encoding: chunked", basic("daniel", "tiger"),
                                           path)
            channel.dataReceived(b"3e9\r\n" + b"x" * 1001 + b"\r\n")
            self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "), path)


class BodyDeadlineTests(GuardTestCase):
    """Item 4: a body the gateway reads before deciding must arrive within the timeout."""

    def trickle(self, channel, transport, seconds, step=4):
        for _ in range(seconds // step):
            self.clock.advance(step)
            if transport.disconnecting:
                return
            channel.dataReceived(b"x")

    def test_trickled_body(self):
        self.make(timeout=30)
        channel, transport = self.connect()
        channel.dataReceived(b"POST /whoami HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 100\r\n"
                             b"Authorization: " + basic("daniel", "tiger") + b"\r\n\r\n")
        self.trickle(channel, transport, 40)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 "), transport.value()[:60])
        self.assertIn(b"body", transport.value())
        self.assertTrue(transport.disconnecting)

    def test_trickled_chunked_body(self):
        self.make(timeout=30)
        channel, transport = self.connect()
        channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"64\r\n")
        self.trickle(channel, transport, 40)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 "))

    def test_body_in_time(self):
        self.make(timeout=30)
        channel, transport = self.connect()
        channel.dataReceived(b"POST /whoami HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 7\r\n"
                             b"Authorization: " + basic("daniel", "tiger") + b"\r\n\r\n")
        self.trickle(channel, transport, 24)
        channel.dataReceived(b"x")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 405 "), transport.value()[:60])
        self.clock.advance(29)
        self.assertNotIn(b"408", transport.value())  # the body deadline was stopped

    def test_streamed_upload_not_bounded(self):
        """An authenticated upload streamed upstream is bounded by the idle timeout only."""
        upstream = CapturingUpstream()
        self.make(proxy=upstream, upstream="http://up.test", timeout=30)
        channel, transport = self.connect()
        channel.dataReceived(b"PUT /f HTTP/1.1\r\nHost: up.test\r\nContent-Length: 200000\r\n"
                             b"Authorization: " + basic("daniel", "tiger") + b"\r\n\r\n")
        [(_, body)] = upstream.calls
        body.startProducing(ListConsumer())
        self.trickle(channel, transport, 60)
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.disconnecting)


class _Counter(protocol.Protocol):
    def connectionMade(self):
        self.factory.connections += 1


class RealSocketTests(GatewayMixin, TestCase):
    """The same through the real listener, with a plain socket as the client."""

    timeout = 30

    def setUp(self):
        self.data = os.path.abspath(self.mktemp())
        self.upstream = protocol.ServerFactory.forProtocol(_Counter)
        self.upstream.connections = 0
        port = reactor.listenTCP(0, self.upstream, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.start("--auth", "memory:daniel:tiger", "--http-timeout", "1",
                   "--http-max-body", "1000",
                   "--http-upstream", f"http://127.0.0.1:{port.getHost().port}")

    def exchange(self, head: bytes) -> tuple[bytes, bool]:
        """Send C{head} only; the answer, and whether the server then closed the connection."""
        with socket.create_connection(("127.0.0.1", self.http_port), timeout=10) as sock:
            sock.sendall(head)
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
            closed = False
            try:
                while True:
                    chunk = sock.recv(4096)
                    if not chunk:
                        closed = True
                        break
                    answer += chunk
            except TimeoutError:
                closed = False
            except ConnectionResetError:
                closed = True
            return answer, closed

    @defer.inlineCallbacks
    def test_refused_before_any_body(self):
        """Item 5: Content-Length 50000000 and no credentials: 401 with no body sent, closed."""
        for auth in (b"", b"Authorization: Basic ZGFuaWVsOmxpb24=\r\n"):  # daniel:lion
            answer, closed = yield threads.deferToThread(
                self.exchange, b"PUT /upload HTTP/1.1\r\nHost: app.test\r\n" + auth
                + b"Content-Length: 50000000\r\n\r\n")
            self.assertTrue(answer.startswith(b"HTTP/1.1 401 "), answer[:80])
            self.assertTrue(closed)
        self.assertEqual(self.upstream.connections, 0)

    def trickle(self, head: bytes) -> tuple[bytes, float]:
        """Send C{head}, then a body byte every 0.2 s; the answer and when it came."""
        with socket.create_connection(("127.0.0.1", self.http_port), timeout=10) as sock:
            sock.sendall(head)
            sock.settimeout(0.2)
            start = time.monotonic()
            answer = b""
            while time.monotonic() - start < 4:
                try:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    answer += chunk
                except TimeoutError:
                    try:
                        sock.sendall(b"x")
                    except OSError:
                        break
            return answer, time.monotonic() - start

    @defer.inlineCallbacks
    def test_trickled_body(self):
        """Item 4: a body trickled after the headers gets 408 within --http-timeout."""
        answer, _ = yield threads.deferToThread(
            self.trickle, b"POST /whoami HTTP/1.1\r\nHost: app.test\r\nContent-Length: 900\r\n"
            b"Authorization: Basic ZGFuaWVsOnRpZ2Vy\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 408 "), answer[:80])
