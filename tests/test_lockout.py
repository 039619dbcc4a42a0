"""
Nobody can lock an account out (issue 11, item 6), through each front door of
the service C{twistd authgateway} builds: wrong passwords for alice from one
peer refuse only that peer, never alice's right password from another peer;
distributed guessing of alice from many peers is slowed down (every attempt
for her waits before it is checked) but not refused.

The core is built from the command-line options on a L{MemoryReactorClock},
so the throttle's delays run on a clock the tests advance; the front doors
are driven through L{StringTransport} from chosen peer addresses. The
reproduction itself runs on loopback sockets too (L{LoopbackTests}).
"""

from __future__ import annotations

import base64
import http.client
import os
import smtplib
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from twisted.internet import defer, reactor, threads
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from gateway import tap
from gateway.checkers.throttle import Throttle
from gateway.smtp.server import SMTPDoor
from gateway.socks.server import SOCKSDoor
from gateway.web.server import HTTPDoor
from tests.support import free_port, keep_signal_handlers

ATTACKER = "192.0.2.66"
ALICE = "198.51.100.7"


def peer(host: str, port: int = 40000) -> IPv4Address | IPv6Address:
    return (IPv6Address if ":" in host else IPv4Address)("TCP", host, port)


class LockoutMixin:
    """The core of C{twistd authgateway --auth memory:alice:wonderland ...} on a clock."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        options = tap.Options()
        options.parseOptions([
            "--data-dir", self.mktemp(), "--auth", "memory:alice:wonderland",
            "--smtp-insecure-auth", "--http-insecure-auth",
        ])
        self.options = options
        self.core = tap.build_core(options["coreSettings"], self.reactor)

    def wait(self, seconds: float) -> None:
        self.reactor.advance(seconds)

    def answered(self, attempt: Any) -> str | None:
        """The attempt's answer, once the clock has run on until there is one."""
        waited = 0.0
        while attempt.answer() is None and waited < Throttle.max_delay:
            self.reactor.advance(0.25)
            waited += 0.25
        return attempt.answer()

    # Each front door: attempt(host, password) -> an answer that is read
    # after the test advanced the clock; answer() says "ok", "wrong",
    # "refused" (throttled) or None (not answered yet).

    def test_guesser_locks_out_only_itself(self) -> None:
        """Five wrong passwords for alice from one peer: her right one from another still gets in."""
        for _ in range(Throttle.max_failures):
            self.assertEqual(self.answered(self.attempt(ATTACKER, "guess")), "wrong")
        self.assertEqual(self.attempt(ATTACKER, "wonderland").answer(), "refused")
        self.assertEqual(self.attempt(ALICE, "wonderland").answer(), "ok")

    def test_dual_stack_peers_are_distinct(self) -> None:
        """On a dual-stack listener IPv4 clients arrive IPv4-mapped: still one peer each."""
        for _ in range(Throttle.max_failures):
            self.assertEqual(self.answered(self.attempt("::ffff:" + ATTACKER, "guess")), "wrong")
        self.assertEqual(self.attempt("::ffff:" + ATTACKER, "wonderland").answer(), "refused")
        self.assertEqual(self.attempt("::ffff:" + ALICE, "wonderland").answer(), "ok")

    def test_distributed_guessing_is_slowed(self) -> None:
        """
        Past --max-user-failures (from as many peers), every attempt for alice
        waits before it is checked, whatever its password and peer; none is
        refused, and alice's right password gets in after the wait.
        """
        for i in range(Throttle.max_user_failures):
            self.assertEqual(self.answered(self.attempt(f"10.0.{i}.1", "guess")), "wrong")
        guess = self.attempt("10.1.0.1", "guess")
        right = self.attempt(ALICE, "wonderland")
        self.assertIsNone(guess.answer())
        self.assertIsNone(right.answer())  # the right password waits too: no timing oracle
        self.wait(Throttle.delay)
        self.assertEqual(right.answer(), "ok")
        self.assertEqual(self.answered(guess), "wrong")
        # Alice's peer is now a known device: no wait from there.
        self.assertEqual(self.attempt(ALICE, "wonderland").answer(), "ok")

    def test_ceiling_wait_within_every_deadline(self):
        """
        25 wrong passwords for alice from 5 peers (each at its pair limit):
        her right password from a clean peer gets in within --user-delay-max
        (3 s), well below SOCKS's 10 s negotiation timeout, on every front
        door. Before, the wait grew to --failure-delay-max (15 s) and SOCKS's
        negotiation timer aborted the login the gateway itself was delaying.
        """
        guesses = [self.attempt(f"10.0.{i}.1", "guess")
                   for i in range(5) for _ in range(Throttle.max_failures)]  # all at once
        for _ in range(120):  # 30 s: all answered, well inside the failure window
            self.wait(0.25)
        self.assertEqual([g.answer() for g in guesses], ["wrong"] * 25)
        right = self.attempt(ALICE, "wonderland")
        waited = 0.0
        while right.answer() is None and waited < 3.0:  # the README's --user-delay-max
            self.reactor.advance(0.25)
            waited += 0.25
        self.assertEqual(right.answer(), "ok")


class HTTPBasicLockoutTests(LockoutMixin, SynchronousTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.site = HTTPDoor(self.core, self.options["httpSettings"]).listen(None, "http", None).factory

    def attempt(self, host: str, password: str) -> Any:
        channel = self.site.buildProtocol(peer(host))
        transport = StringTransport(peerAddress=peer(host), hostAddress=peer("127.0.0.1", 8080))
        channel.makeConnection(transport)
        self.addCleanup(lambda: channel.connectionLost(Failure(ConnectionDone())))
        token = base64.b64encode(f"alice:{password}".encode())
        channel.dataReceived(
            b"GET /whoami HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Basic " + token + b"\r\n\r\n"
        )
        return _HTTPAnswer(transport)


class _HTTPAnswer:
    def __init__(self, transport: StringTransport) -> None:
        self.transport = transport

    def answer(self) -> str | None:
        raw = self.transport.value()
        if not raw:
            return None
        status = int(raw.split(b" ", 2)[1])
        return {200: "ok", 401: "wrong", 429: "refused"}.get(status, f"HTTP {status}")


class SMTPLockoutTests(LockoutMixin, SynchronousTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.factory = SMTPDoor(self.core, self.options["smtpSettings"]).listen(None, "smtp", None).factory

    def attempt(self, host: str, password: str) -> Any:
        proto = self.factory.buildProtocol(peer(host))
        getattr(proto, "wrapped", proto).callLater = self.reactor.callLater  # inside the per-peer cap
        transport = StringTransport(peerAddress=peer(host), hostAddress=peer("127.0.0.1", 2525))
        proto.makeConnection(transport)
        proto.dataReceived(b"EHLO client.example\r\n")
        transport.clear()
        plain = base64.b64encode(f"\0alice\0{password}".encode())
        proto.dataReceived(b"AUTH PLAIN " + plain + b"\r\n")
        return _SMTPAnswer(transport)


class _SMTPAnswer:
    def __init__(self, transport: StringTransport) -> None:
        self.transport = transport

    def answer(self) -> str | None:
        raw = self.transport.value()
        if not raw:
            return None
        code = raw[:3]
        return {b"235": "ok", b"535": "wrong", b"454": "refused"}.get(code, raw.decode())


class SOCKSLockoutTests(LockoutMixin, SynchronousTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.factory = SOCKSDoor(self.core, self.options["socksSettings"]).listen(None, "socks", None).factory

    def attempt(self, host: str, password: str) -> Any:
        proto = self.factory.buildProtocol(peer(host))
        transport = StringTransport(peerAddress=peer(host), hostAddress=peer("127.0.0.1", 1080))
        proto.makeConnection(transport)
        proto.dataReceived(b"\x05\x01\x02")
        assert transport.value() == b"\x05\x02", transport.value()
        transport.clear()
        secret = password.encode()
        proto.dataReceived(b"\x01\x05alice" + bytes([len(secret)]) + secret)
        return _SOCKSAnswer(transport, self.reactor)


    def test_hanging_up_is_no_free_retry(self) -> None:
        """
        Past alice's ceiling every attempt waits; a guesser that hangs up
        during the wait and reconnects used to get a fresh attempt each time.
        Abandoned attempts now count for its peer and pair: after
        --max-failures of them it is refused, alice is not.
        """
        for i in range(Throttle.max_user_failures):
            self.assertEqual(self.answered(self.attempt(f"10.0.{i}.1", "guess")), "wrong")
        for _ in range(Throttle.max_failures):
            proto = self.factory.buildProtocol(peer(ATTACKER))
            transport = StringTransport(
                peerAddress=peer(ATTACKER), hostAddress=peer("127.0.0.1", 1080)
            )
            proto.makeConnection(transport)
            proto.dataReceived(b"\x05\x01\x02\x01\x05alice\x05guess")
            self.assertEqual(transport.value(), b"\x05\x02")  # waiting in the throttle
            proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.attempt(ATTACKER, "guess").answer(), "refused")
        self.assertEqual(self.answered(self.attempt(ALICE, "wonderland")), "ok")


class _SOCKSAnswer:
    """RFC 1929 says only success or failure: a refusal is a failure without any delay."""

    def __init__(self, transport: StringTransport, reactor: MemoryReactorClock) -> None:
        self.transport = transport
        self.asked = reactor.seconds()
        self.reactor = reactor

    def answer(self) -> str | None:
        raw = self.transport.value()
        if not raw:
            return None
        if raw == b"\x01\x00":
            return "ok"
        if raw == b"\x01\x01" and self.transport.disconnecting:
            return "refused" if self.reactor.seconds() == self.asked else "wrong"
        return repr(raw)


class OptionTests(SynchronousTestCase):
    def options(self, *args: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(["--data-dir", self.mktemp(), "--auth", "memory:a:b", *args])
        return options

    def test_defaults_from_the_throttle(self) -> None:
        core = tap.build_core(self.options()["coreSettings"], MemoryReactorClock())
        for name in ("max_failures", "max_peer_failures", "max_user_failures", "window",
                     "delay", "max_delay", "max_keys", "max_user_delay"):
            self.assertEqual(getattr(core.throttle, name), getattr(Throttle, name))

    def test_options(self) -> None:
        core = tap.build_core(
            self.options("--max-failures", "3", "--max-peer-failures", "7",
                         "--max-user-failures", "40")["coreSettings"],
            MemoryReactorClock(),
        )
        self.assertEqual(
            (core.throttle.max_failures, core.throttle.max_peer_failures,
             core.throttle.max_user_failures), (3, 7, 40)
        )

    def test_new_options(self) -> None:
        options = self.options("--user-delay-max", "5", "--socks-login-timeout", "40",
                               "--hash-queue-per-peer", "3", "--hash-queue-per-network", "9",
                               "--hash-queue-known", "4", "--socks-max-pending-logins-per-peer",
                               "2", "--socks-max-pending-logins-per-network", "6")
        core = tap.build_core(options["coreSettings"], MemoryReactorClock())
        socks = options["socksSettings"]
        self.assertEqual(core.throttle.max_user_delay, 5)
        self.assertEqual(socks.login_timeout, 40)
        pool = core.hash_pool
        self.assertEqual((pool.max_pending_per_peer, pool.max_pending_per_network,
                          pool.known_reserve), (3, 9, 4))
        self.assertEqual((socks.max_pending_logins_per_peer,
                          socks.max_pending_logins_per_network), (2, 6))

    def test_login_timeout_above_the_ceiling_wait(self) -> None:
        """The gateway must not time out a login it is itself delaying."""
        e = self.assertRaises(usage.UsageError, self.options,
                              "--user-delay-max", "30", "--socks-login-timeout", "30")
        self.assertIn("--socks-login-timeout must be above --user-delay-max", str(e))

    def test_limits_below_the_pair_refused(self) -> None:
        for option in ("--max-peer-failures", "--max-user-failures"):
            e = self.assertRaises(usage.UsageError, self.options, "--max-failures", "6", option, "5")
            self.assertIn(f"{option} must not be below --max-failures", str(e))


class LoopbackTests(TestCase):
    """
    The reproduction on real sockets: the gateway as C{twistd authgateway}
    builds it, a guesser at 127.0.0.2 and alice at 127.0.0.1, with C{smtplib},
    C{http.client} and a raw RFC 1929 client.
    """

    timeout = 60

    def setUp(self) -> None:
        self.ports = {name: free_port() for name in ("smtp", "http", "socks")}
        options = tap.Options()
        options.parseOptions([
            "--data-dir", os.path.abspath(self.mktemp()), "--auth", "memory:alice:wonderland",
            *(arg for name, port in self.ports.items()
              for arg in (f"--{name}", f"tcp:{port}:interface=127.0.0.1")),
            "--smtp-insecure-auth", "--smtp-hostname", "mx.test",
            "--failure-delay", "0", "--failure-delay-max", "0",
        ])
        keep_signal_handlers(self)
        self.service = tap.makeService(options, reactor=reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)

    def http(self, source: str, password: str) -> int:
        connection = http.client.HTTPConnection(
            "127.0.0.1", self.ports["http"], timeout=20, source_address=(source, 0)
        )
        try:
            token = base64.b64encode(f"alice:{password}".encode()).decode()
            connection.request("GET", "/whoami", headers={"Authorization": f"Basic {token}"})
            return connection.getresponse().status
        finally:
            connection.close()

    def smtp(self, source: str, password: str) -> int:
        with smtplib.SMTP("127.0.0.1", self.ports["smtp"], timeout=20,
                          source_address=(source, 0)) as client:
            client.ehlo("client.test")
            client.user, client.password = "alice", password
            try:
                code, _ = client.auth("PLAIN", client.auth_plain)
            except smtplib.SMTPAuthenticationError as e:
                code = e.smtp_code
            return code

    def socks(self, source: str, password: str) -> bytes:
        with socket.create_connection(("127.0.0.1", self.ports["socks"]), timeout=20,
                                      source_address=(source, 0)) as s:
            s.sendall(b"\x05\x01\x02")
            assert s.recv(2) == b"\x05\x02"
            secret = password.encode()
            s.sendall(b"\x01\x05alice" + bytes([len(secret)]) + secret)
            return s.recv(2)

    @defer.inlineCallbacks
    def test_guesser_does_not_lock_out_alice(self):
        for door, guesser, wrong, right, refused in [
            (self.http, "127.0.0.2", 401, 200, 429),
            (self.smtp, "127.0.0.3", 535, 235, 454),
            (self.socks, "127.0.0.4", b"\x01\x01", b"\x01\x00", b"\x01\x01"),
        ]:
            for _ in range(Throttle.max_failures):
                self.assertEqual((yield threads.deferToThread(door, guesser, "guess")), wrong)
            self.assertEqual((yield threads.deferToThread(door, guesser, "wonderland")), refused)
            self.assertEqual((yield threads.deferToThread(door, "127.0.0.1", "wonderland")), right)
            # Alice's login forgave nothing of the guesser's: still refused.
            self.assertEqual((yield threads.deferToThread(door, guesser, "wonderland")), refused)

    @defer.inlineCallbacks
    def test_ceiling_wait_longer_than_socks_negotiation(self):
        """
        On real sockets: 28 wrong passwords for alice from 7 addresses, then
        her right one from a clean address waits in the throttle (1.6 s here)
        longer than the SOCKS negotiation timeout (1 s here) and still gets
        in: the gateway does not time out a login it is itself delaying.
        """
        self.ports["socks"] = free_port()  # a gateway of its own, beside setUp's
        options = tap.Options()
        options.parseOptions([
            "--data-dir", os.path.abspath(self.mktemp()), "--auth", "memory:alice:wonderland",
            "--socks", f"tcp:{self.ports['socks']}:interface=127.0.0.1",
            "--smtp", "none", "--http", "none",  # not the default ports, which others may hold
            "--failure-delay", "0.1", "--failure-delay-max", "2", "--user-delay-max", "1.6",
            "--socks-negotiation-timeout", "1",
        ])
        keep_signal_handlers(self)
        service = tap.makeService(options, reactor=reactor)
        service.startService()
        self.addCleanup(service.stopService)

        def guesses() -> list[bytes]:
            # Four at once from each of seven networks: within each address's
            # (and network's) share of SOCKS logins in flight.
            with ThreadPoolExecutor(28) as pool:
                return list(pool.map(lambda i: self.socks(f"127.1.{i // 4 + 1}.1", "guess"),
                                     range(28)))

        self.assertEqual((yield threads.deferToThread(guesses)), [b"\x01\x01"] * 28)
        started = reactor.seconds()
        self.assertEqual((yield threads.deferToThread(self.socks, "127.0.0.1", "wonderland")),
                         b"\x01\x00")
        self.assertGreater(reactor.seconds() - started, 1.0)  # it did wait past the timeout

    @defer.inlineCallbacks
    def test_throttled_flood_is_not_a_log_flood(self):
        """200 throttled requests on one keep-alive connection: one log line for them."""
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        def flood() -> list[int]:
            connection = http.client.HTTPConnection(
                "127.0.0.1", self.ports["http"], timeout=20, source_address=("127.0.0.2", 0)
            )
            token = base64.b64encode(b"alice:guess").decode()
            statuses = []
            for _ in range(Throttle.max_failures + 200):
                connection.request("GET", "/whoami", headers={"Authorization": f"Basic {token}"})
                response = connection.getresponse()
                response.read()
                statuses.append(response.status)
            connection.close()
            return statuses

        statuses = yield threads.deferToThread(flood)
        self.assertEqual(statuses, [401] * Throttle.max_failures + [429] * 200)
        outcomes = [e.get("outcome") for e in events if e.get("log_namespace") == "gateway.auth"]
        self.assertEqual(outcomes.count("failure"), Throttle.max_failures)
        self.assertEqual(outcomes.count("throttled"), 1)
