"""
Tests for L{gateway.smtp.server}'s bounds on work and memory: taking input
is linear in its size, and the server is the producer of its transport
(a client that does not read its replies is not answered, then not read).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet import interfaces

from gateway.smtp.server import CLOSE_GRACE, MAX_BUFFERED_INPUT, MAX_PENDING_INPUT
from tests.smtp_support import (
    PEER,
    Client,
    PendingChecker,
    ServerTestCase,
    StartTLSTransport,
    finals,
    plain,
)


class LinearInputTests(ServerTestCase):
    """
    Taking lines is linear in the input, whatever the input is made of: a
    line never costs a copy or a scan of everything after it (one pipelined
    message of empty lines and one line too long held the reactor minutes).
    The work is counted, not timed.
    """

    def unread(self, proto: Any) -> int:
        return len(proto._buffer) - proto._pos

    def count_block_scans(self, client: Client, budget: int) -> list[int]:
        """Sum the input each C{_data_block} call may scan; fail once over C{budget}."""
        proto, scanned = client.proto._codec, [0]
        original = proto._data_block

        def counting() -> bool:
            scanned[0] += self.unread(proto)
            if scanned[0] > budget:
                self.fail(f"scanned {scanned[0]} octets for {budget // 4} of input")
            return original()

        proto._data_block = counting
        return scanned

    def count_data_lines(self, client: Client) -> list[bytes]:
        """The lines of message text that went line by line."""
        proto, seen = client.proto._codec, []
        original = proto._data_line

        def counting(line: bytes) -> None:
            seen.append(line)
            original(line)

        proto._data_line = counting
        return seen

    def test_empty_lines_then_a_long_line_is_linear(self) -> None:
        """256 KiB of empty lines, a 1000-octet line, C{.}: a few scans, not one per line."""
        client = self.authenticated()
        self.start_data(client)
        wire = b"\r\n" * (128 * 1024 - 600) + b"x" * 1000 + b"\r\n.\r\n"
        scanned = self.count_block_scans(client, 4 * len(wire))
        by_line = self.count_data_lines(client)
        self.assertReplies(client.send(wire), [b"500 5.5.6"])
        self.assertLessEqual(scanned[0], 4 * len(wire))
        self.assertEqual(by_line, [])
        self.assertNothingStored()
        self.assertReplies(client.send(b"NOOP\r\n"), [b"250 2.0.0"])

    def test_many_long_lines_are_linear(self) -> None:
        """Short and long lines alternating: still a bounded number of scans."""
        client = self.authenticated()
        self.start_data(client)
        wire = (b"a\r\n" * 50 + b"y" * 1200 + b"\r\n") * 150 + b".\r\n"
        self.count_block_scans(client, 4 * len(wire))
        self.assertReplies(client.send(wire), [b"500 5.5.6"])
        self.assertNothingStored()

    def test_stuffed_999_octet_line_and_short_lines_in_one_block(self) -> None:
        """A dot-stuffed line of 999 octets is not too long: taken in a block with the rest."""
        client = self.authenticated()
        self.start_data(client)
        by_line = self.count_data_lines(client)
        stuffed = b"." + b"." + b"x" * 997
        wire = b"a\r\n" * 200 + stuffed + b"\r\n" + b"b\r\n" * 200 + b".\r\n"
        self.assertReplies(client.send(wire), [b"250 2.0.0"])
        self.assertEqual(by_line, [])
        ((message, _),) = self.stored()
        self.assertTrue(message.endswith(b"a\r\n" * 200 + stuffed[1:] + b"\r\n" + b"b\r\n" * 200))

    def test_pipelined_commands_do_not_copy_the_buffer(self) -> None:
        """Each command line is taken without copying the lines after it."""
        client = self.authenticated()
        proto, copied, last = client.proto._codec, [0], [None]
        original = proto._line

        def counting(line: bytes) -> None:
            if proto._buffer is not last[0]:  # a new buffer object: a copy was made
                last[0] = proto._buffer
                copied[0] += len(proto._buffer)
            original(line)

        proto._line = counting
        wire = b"NOOP\r\n" * 2000
        replies = client.send(wire)
        self.assertEqual(len(replies), 2000)
        self.assertLessEqual(copied[0], 2 * len(wire))

    def test_line_an_octet_at_a_time_is_linear(self) -> None:
        """
        A 12000-octet command line arriving an octet per read: the buffer
        is neither copied nor searched from the line's start at every read.
        """
        client = self.authenticated()
        proto, scanned, copied = client.proto._codec, [0], [0]

        class Counting(bytearray):
            def find(self, sub: Any, start: int = 0, *end: int) -> int:
                scanned[0] += len(self) - start
                return super().find(sub, start, *end)

        if isinstance(proto._buffer, bytearray):  # searches counted where they can be
            proto._buffer = Counting(proto._buffer)
        last = proto._buffer
        line = b"NOOP " + b"x" * 12000 + b"\r\n"
        for i in range(len(line)):
            client.proto.dataReceived(line[i : i + 1])
            if proto._buffer is not last:  # a new buffer object: a copy was made
                last = proto._buffer
                copied[0] += len(last)
        self.assertReplies(client.read(), [b"250 2.0.0"])
        self.assertLessEqual(copied[0] + scanned[0], 4 * len(line))


class BufferingTransport(StartTLSTransport):
    """
    Like Twisted's FileDescriptor: a write that takes the buffer above
    C{buffer_size} pauses the registered streaming producer; L{drain} empties
    the buffer and resumes it.
    """

    def __init__(self, buffer_size: int) -> None:
        super().__init__()
        self.buffer_size = buffer_size
        self.producer_paused = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None and len(self.value()) > self.buffer_size:
            self.producer_paused = True
            self.producer.pauseProducing()

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def drain(self) -> bytes:
        data = self.value()
        self.clear()
        if self.producer is not None and self.producer_paused:
            self.producer_paused = False
            self.producer.resumeProducing()
        return data


class BackpressureTests(ServerTestCase):
    """Issue 11 item 3: a client that sends and never reads cannot grow the write buffer."""

    def test_registered_as_streaming_producer(self) -> None:
        client = self.connect()
        self.assertIs(client.transport.producer, client.proto)
        self.assertTrue(client.transport.streaming)
        self.assertTrue(interfaces.IPushProducer.providedBy(client.proto))

    def test_write_pause_stops_answering_and_reading(self) -> None:
        """
        pauseProducing from the transport: lines wait unanswered, reading stops
        once MAX_PENDING_INPUT waits; resume answers them and reads again.
        """
        client = self.trusted_session()
        client.proto.pauseProducing()
        self.assertEqual(client.send(b"NOOP\r\nHELP\r\n"), [])
        self.assertEqual(client.transport.producerState, "producing")
        count = MAX_PENDING_INPUT // 6
        self.assertEqual(client.send(b"NOOP\r\n" * count), [])
        self.assertEqual(client.transport.producerState, "paused")
        client.proto.resumeProducing()
        self.assertEqual(client.transport.producerState, "producing")
        self.assertReplies(client.read(), [b"250 2.0.0", b"214 2.0.0"] + [b"250 2.0.0"] * count)

    def buffering(self, buffer_size: int) -> Client:
        """A new session of C{self.factory} over a L{BufferingTransport}, past the greeting."""
        transport = BufferingTransport(buffer_size)
        proto = self.factory.buildProtocol(PEER)
        proto.callLater = self.clock.callLater
        proto.makeConnection(transport)
        self.assertTrue(transport.drain().startswith(b"220 "))
        return Client(proto, transport)

    def test_ehlo_flood_bounded(self) -> None:
        """Many EHLO lines at once: answering stops at the buffer bound, and goes on when drained."""
        self.connect(trusted_networks=(ipaddress.ip_network("192.0.2.0/24"),))  # EHLO is no junk
        client = self.buffering(4096)
        count = MAX_PENDING_INPUT // 21 + 1000  # more than MAX_PENDING_INPUT unanswered
        client.proto.dataReceived(b"EHLO client.example\r\n" * count)
        self.assertEqual(client.transport.producerState, "paused")
        self.assertLess(len(client.transport.value()), 4096 + 1024)
        total = 0
        while client.transport.producer_paused:
            total += client.transport.drain().count(b"\r\n250 ")
        total += client.transport.value().count(b"\r\n250 ")
        self.assertEqual(total, count)
        self.assertEqual(client.transport.producerState, "producing")

    def test_pending_reply_and_write_pause_are_separate_reasons(self) -> None:
        """A drained write buffer does not resume reading while a reply is pending, nor the reverse."""
        checker = PendingChecker()
        client = self.tls_session(checkers=[checker])
        client.send(b"AUTH PLAIN " + plain() + b"\r\n" + b"NOOP\r\n" * (MAX_PENDING_INPUT // 6 + 1))
        self.assertEqual(client.transport.producerState, "paused")
        client.proto.pauseProducing()
        client.proto.resumeProducing()  # the write buffer drained: the login is still pending
        self.assertEqual(client.transport.producerState, "paused")
        self.assertEqual(client.read(), [])
        client.proto.pauseProducing()  # full again
        checker.calls[0][1].callback("daniel")  # the login ends: the write buffer is still full
        self.assertEqual(client.transport.producerState, "paused")
        self.assertReplies(client.read(), [b"235 2.7.0"])
        client.proto.resumeProducing()
        self.assertEqual(client.transport.producerState, "producing")
        self.assertEqual(len(finals(client.read())), MAX_PENDING_INPUT // 6 + 1)

    def test_input_bounded_when_transport_ignores_pause(self) -> None:
        client = self.trusted_session()
        client.proto.pauseProducing()
        client.proto.dataReceived(b"NOOP\r\n" * (MAX_BUFFERED_INPUT // 6 + 1))
        self.assertReplies(client.read(), [b"421 4.7.0"])
        self.assertTrue(client.closed)
        self.assertEqual(client.proto._codec._buffer, b"")

    def test_close_unregisters_then_aborts_a_client_that_does_not_read(self) -> None:
        """A registered producer would keep TCP and TLS transports from closing."""
        client = self.connect()
        client.proto.pauseProducing()
        client.proto.resumeProducing()
        self.assertReplies(client.send(b"QUIT\r\n"), [b"221 2.0.0"])
        self.assertIsNone(client.transport.producer)
        self.assertTrue(client.closed)
        self.assertFalse(client.transport.disconnected)
        self.clock.advance(CLOSE_GRACE)
        self.assertTrue(client.transport.disconnected)  # abortConnection

    def test_close_grace_cancelled_when_lost(self) -> None:
        client = self.connect()
        client.send(b"QUIT\r\n")
        client.proto.connectionLost(Exception("closed"))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_idle_timeout_aborts_a_client_that_does_not_read(self) -> None:
        client = self.connect(timeout=30)
        client.proto.pauseProducing()
        self.clock.advance(30)
        self.assertReplies(client.read(), [b"421 4.4.2"])
        self.clock.advance(CLOSE_GRACE)
        self.assertTrue(client.transport.disconnected)

    def test_lines_unanswered_do_not_reset_idle_timer(self) -> None:
        """A client that sends a line now and then but never reads is idle all the same."""
        client = self.trusted_session(timeout=30)
        client.proto.pauseProducing()
        for _ in range(2):
            self.clock.advance(14)
            client.proto.dataReceived(b"NOOP\r\n")
        self.clock.advance(2)
        self.assertReplies(client.read(), [b"421 4.4.2"])
        self.assertTrue(client.closed)

    def test_starttls_starts_unpaused(self) -> None:
        """
        Twisted's startTLS re-registers the producer with a fresh TLS layer
        that will not resume a pause from before: the session must not stay
        paused for ever when the 220 filled the buffer.
        """
        self.connect()
        client = self.buffering(0)
        client.proto.dataReceived(b"EHLO client.example\r\n")
        client.transport.drain()
        client.proto.dataReceived(b"STARTTLS\r\n")
        self.assertTrue(client.transport.tls_started)
        self.assertReplies(client.read(), [b"220 2.0.0"])
        self.assertTrue(client.transport.producer_paused)
        client.transport.producer_paused = False  # what the new TLS layer knows
        client.proto.dataReceived(b"EHLO client.example\r\n")
        self.assertTrue(finals(client.read())[-1].startswith(b"250 "))
