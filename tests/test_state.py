"""
The state back ends (L{gateway.state}): the C{--state} URL; the Redis link's
failure policy and transitions against a scripted fake Redis (a memory
reactor and a StringTransport); and the Lua scripts against a real
C{redis-server} (L{tests.redis_support.RedisServer}): the throttle's
semantics, atomicity under concurrent admits, two instances sharing
limits, expiry, prefix, database, password, UNIX socket, TLS, session
leases, and an outage under both policies.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, task
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from gateway.checkers.throttle import FAILURE, PEER_FAILURE, SUCCESS, IThrottle, Throttle
from gateway.errors import StateUnavailable, Throttled
from gateway.state import ISessionLimits, LocalSessions, State, open_state
from gateway.state.redis import (
    RENEW, Link, RedisSessions, RedisThrottle, StateURL, parse_state_url, state_digest,
)
from gateway.tls import generate_self_signed
from gateway.state.url import shown
from tests.redis_support import RedisServer
from tests.support import free_port

SECRET = "S3cret-redis-pw"


class URLTests(SynchronousTestCase):
    """C{--state}: what each URL means, and what is refused."""

    def test_local(self) -> None:
        self.assertIsNone(parse_state_url("local"))
        self.assertIsNone(parse_state_url(" LOCAL "))

    def test_redis(self) -> None:
        url = parse_state_url(f"redis://alice:{SECRET}@redis.example:6380/3?prefix=gw1:")
        self.assertEqual(
            (url.scheme, url.host, url.port, url.db, url.username, url.password, url.prefix),
            ("redis", "redis.example", 6380, 3, "alice", SECRET, "gw1:"),
        )
        self.assertEqual(url.display, "redis://alice@redis.example:6380/3?prefix=gw1%3A")

    def test_defaults(self) -> None:
        url = parse_state_url("redis://10.0.0.1")
        self.assertEqual((url.port, url.db, url.prefix, url.password), (6379, 0, "authgateway:", None))
        self.assertEqual(parse_state_url("redis://[::1]:7000/").display, "redis://[::1]:7000/0")

    def test_password_only(self) -> None:
        url = parse_state_url(f"redis://:{SECRET}@127.0.0.1/0")
        self.assertEqual((url.username, url.password), (None, SECRET))

    def test_rediss_ca(self) -> None:
        url = parse_state_url("rediss://redis.example/1?ca=/etc/ssl/redis-ca.pem")
        self.assertEqual((url.scheme, url.ca, url.db), ("rediss", "/etc/ssl/redis-ca.pem", 1))

    def test_unix(self) -> None:
        url = parse_state_url(f"unix://:{SECRET}@/run/redis/redis.sock?db=2")
        self.assertEqual((url.scheme, url.path, url.db, url.password),
                         ("unix", "/run/redis/redis.sock", 2, SECRET))
        self.assertEqual(url.display, "unix:///run/redis/redis.sock?db=2")

    def test_refused(self) -> None:
        for text in (
            "memcached://x", "redis://", "redis://h/x", "redis://h/1?db=2", "unix://rel/path",
            "redis://h?ca=/x", "redis://h/0?color=red", "redis://h:99999/0", "redis://h/0?prefix=",
            "unix:///s?db=-1", "redis://h:0/0",
        ):
            with self.assertRaises(ValueError, msg=text):
                parse_state_url(text)

    def test_password_never_shown(self) -> None:
        """Not in the repr, the display, nor any refusal's message."""
        url = parse_state_url(f"redis://u:{SECRET}@h:1/0")
        self.assertNotIn(SECRET, repr(url))
        self.assertNotIn(SECRET, url.display)
        self.assertEqual(shown(f"redis://u:{SECRET}@h:1/0"), "redis://u@h:1/0")
        self.assertEqual(shown("local"), "local")
        for bad in (f"redis://u:{SECRET}@h:1/x", f"redis://u:{SECRET}@h/0?what=1",
                    f"redis://u:{SECRET}@h:port/0"):
            with self.assertRaises(ValueError) as e:
                parse_state_url(bad)
            self.assertNotIn(SECRET, str(e.exception))

    @given(st.text(max_size=80))
    def test_any_text(self, text: str) -> None:
        """Any text is a URL, local, or a ValueError; nothing else."""
        try:
            parse_state_url(text)
        except ValueError:
            pass
        try:
            parse_state_url("redis://" + text)
        except ValueError:
            pass

    def test_open_state_local(self) -> None:
        throttle = Throttle(task.Clock())
        state = open_state("local", "closed", throttle, task.Clock())
        self.assertIs(state.throttle, throttle)
        self.assertIsInstance(state.sessions, LocalSessions)
        self.assertEqual((state.name, state.up, state.errors, state.fallback, state.service),
                         ("local", True, 0, False, None))

    def test_open_state_redis(self) -> None:
        state = open_state(f"redis://:{SECRET}@127.0.0.1:1/0", "local", Throttle(task.Clock()),
                           MemoryReactorClock())
        self.assertIsInstance(state.throttle, RedisThrottle)
        self.assertIsInstance(state.sessions, RedisSessions)
        verifyObject(IThrottle, state.throttle)
        verifyObject(ISessionLimits, state.sessions)
        self.assertEqual(state.name, "redis://127.0.0.1:1/0")
        self.assertNotIn(SECRET, repr(state))
        self.assertFalse(state.up)
        self.assertTrue(state.fallback)
        with self.assertRaises(ValueError):
            open_state("redis://h/0", "open", Throttle(task.Clock()), task.Clock())

    def test_digests(self) -> None:
        """Names as digests: the same in every process for one prefix, different per prefix."""
        self.assertEqual(state_digest("authgateway:", "daniel"), state_digest("authgateway:", "daniel"))
        self.assertNotEqual(state_digest("authgateway:", "daniel"), state_digest("gw2:", "daniel"))
        self.assertNotIn("daniel", state_digest("authgateway:", "daniel"))


class ScriptedEndpoint:
    """A fake Redis: each connection gets a StringTransport; the test writes the replies."""

    def __init__(self) -> None:
        self.connections: list[tuple[Any, StringTransport]] = []
        self.refuse = False

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        if self.refuse:
            return defer.fail(ConnectionRefusedError("connection refused"))
        p = factory.buildProtocol(None)
        transport = StringTransport()
        p.makeConnection(transport)
        self.connections.append((p, transport))
        return defer.succeed(p)

    @property
    def last(self) -> tuple[Any, StringTransport]:
        return self.connections[-1]


class Logged:
    """Collects the log lines of a test."""

    def __init__(self, test: SynchronousTestCase) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        test.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def lines(self, word: str = "state:") -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events if word in formatEvent(e)]


class LinkPolicyTests(SynchronousTestCase):
    """The failure policy and the transitions, against a scripted fake Redis."""

    def make(self, failure: str = "closed", url: str = f"redis://:{SECRET}@127.0.0.1:6379/2",
             **kw: Any) -> tuple[State, ScriptedEndpoint, MemoryReactorClock]:
        reactor = MemoryReactorClock()
        endpoint = ScriptedEndpoint()
        state = open_state(url, failure, Throttle(reactor, max_failures=2, delay=0), reactor)
        state.link._endpoint = endpoint
        for name, value in kw.items():
            setattr(state.link, name, value)
        self.logged = Logged(self)
        state.service.startService()
        self.addCleanup(state.service.stopService)
        return state, endpoint, reactor

    def handshake(self, endpoint: ScriptedEndpoint, replies: bytes = b"+OK\r\n+OK\r\n:1\r\n") -> None:
        p, transport = endpoint.last
        p.dataReceived(replies)

    def test_handshake(self) -> None:
        """AUTH, SELECT and PING, then up; the password on the wire only."""
        state, endpoint, _ = self.make()
        p, transport = endpoint.last
        sent = transport.value()
        self.assertIn(b"AUTH", sent)
        self.assertIn(SECRET.encode(), sent)
        self.assertIn(b"SELECT", sent)
        self.assertFalse(state.up)
        self.handshake(endpoint)
        self.assertTrue(state.up)
        self.assertEqual(self.logged.lines(), ["state: redis://127.0.0.1:6379/2 connected: limits are shared"])

    def test_admit_one_script(self) -> None:
        """One EVALSHA per admit; its reply decides."""
        state, endpoint, reactor = self.make()
        self.handshake(endpoint)
        p, transport = endpoint.last
        transport.clear()
        d = state.throttle.admit("192.0.2.1", "daniel")
        reactor.advance(0)  # the turn's operations go out, in one script
        self.assertEqual(transport.value().count(b"EVALSHA"), 1)
        self.assertNotIn(b"daniel", transport.value())
        p.dataReceived(b"*3\r\n:1\r\n$1\r\n0\r\n:1\r\n")
        admission = self.successResultOf(d)
        self.assertEqual((admission.wait, admission.local), (0.0, False))
        self.assertIsNotNone(admission.known)
        transport.clear()
        d = state.throttle.finish(admission, FAILURE)
        reactor.advance(0)  # the turn's operations go out, in one script
        p.dataReceived(b"*1\r\n$3\r\n0.5\r\n")  # a batch's reply: one element per finish
        self.assertEqual(self.successResultOf(d), 0.5)

    def test_refused_reply(self) -> None:
        state, endpoint, reactor = self.make()
        self.handshake(endpoint)
        p, _ = endpoint.last
        d = state.throttle.admit("192.0.2.1", "daniel")
        reactor.advance(0)  # the turn's operations go out, in one script
        p.dataReceived(b"*3\r\n:0\r\n$4\r\n42.5\r\n$4\r\npair\r\n")
        self.assertEqual(self.failureResultOf(d, Throttled).value.retry_after, 42.5)
        self.assertEqual(state.throttle.refused["pair"], 1)

    def test_noscript(self) -> None:
        """
        A Redis without the script (restarted) gets the command again as
        EVAL with the body: no SCRIPT LOAD, which the README's ACL does not
        allow (it used to be SCRIPT LOAD, then EVALSHA again).
        """
        state, endpoint, reactor = self.make()
        self.handshake(endpoint)
        p, transport = endpoint.last
        transport.clear()
        d = state.throttle.admit("192.0.2.1", "daniel")
        reactor.advance(0)  # the turn's operations go out, in one script
        sent = transport.value()
        transport.clear()
        p.dataReceived(b"-NOSCRIPT No matching script\r\n")
        again = transport.value()
        self.assertNotIn(b"SCRIPT", again)
        self.assertTrue(again.startswith(sent[:sent.index(b"\r\n")] + b"\r\n$4\r\nEVAL\r\n"), again[:40])
        self.assertIn(b"redis.call('TIME')", again)
        self.assertTrue(again.endswith(sent[sent.index(b"\r\n$1\r\n6\r\n"):]))  # the same keys and arguments
        p.dataReceived(b"*3\r\n:1\r\n$1\r\n0\r\n:0\r\n")
        self.assertIsNone(self.successResultOf(d).known)
        self.assertEqual((state.errors, state.up, state.link.pending), (0, True, 0))

    def refused(self, endpoint: ScriptedEndpoint) -> None:
        """The first connection fails (and the next ones too)."""
        endpoint.refuse = True
        p, _ = endpoint.last
        p.connectionLost(Failure(ConnectionRefusedError("connection refused")))

    def test_first_connection_awaited(self) -> None:
        """A link just started: logins wait for its first connection, then go on."""
        state, endpoint, _ = self.make()
        d = state.throttle.admit("192.0.2.1", "daniel")
        self.assertNoResult(d)
        self.handshake(endpoint)
        p, transport = endpoint.last
        self.assertIn(b"EVALSHA", transport.value())
        p.dataReceived(b"*3\r\n:1\r\n$1\r\n0\r\n:0\r\n")
        self.assertFalse(self.successResultOf(d).local)

    def test_first_connection_fails(self) -> None:
        """... or fail as the policy says when it fails."""
        state, endpoint, reactor = self.make()
        d = state.throttle.admit("192.0.2.1", "daniel")
        reactor.advance(0)  # the turn's operations go out, in one script
        self.refused(endpoint)
        self.failureResultOf(d, StateUnavailable)

    def test_closed_before_connect(self) -> None:
        """closed: no connection means a temporary failure, at once."""
        state, endpoint, _ = self.make()
        self.refused(endpoint)
        self.failureResultOf(state.throttle.admit("192.0.2.1", "daniel"), StateUnavailable)
        self.failureResultOf(state.sessions.acquire("socks-user", "daniel", 1), StateUnavailable)
        self.assertEqual(state.errors, 2)
        self.assertFalse(state.fallback)

    def test_local_fallback(self) -> None:
        """local: the in-process limits stand in, and hold."""
        state, endpoint, _ = self.make("local")
        self.refused(endpoint)
        self.assertTrue(state.fallback)
        for _ in range(2):
            admission = self.successResultOf(state.throttle.admit("192.0.2.1", "daniel"))
            self.assertTrue(admission.local)
            self.successResultOf(state.throttle.finish(admission, FAILURE))
        self.failureResultOf(state.throttle.admit("192.0.2.1", "daniel"), Throttled)
        lease = self.successResultOf(state.sessions.acquire("socks-user", "daniel", 1))
        self.assertIsNone(self.successResultOf(state.sessions.acquire("socks-user", "daniel", 1)))
        lease.release()
        self.assertIsNotNone(self.successResultOf(state.sessions.acquire("socks-user", "daniel", 1)))

    def test_transitions_logged_once(self) -> None:
        """Down, up, down again: one line each, never per login; reconnects by itself."""
        state, endpoint, reactor = self.make()
        self.handshake(endpoint)
        p, transport = endpoint.last
        endpoint.refuse = True
        p.connectionLost(Failure(ConnectionRefusedError("gone")))
        self.assertFalse(state.up)
        for _ in range(5):
            self.failureResultOf(state.throttle.admit("192.0.2.1", "daniel"), StateUnavailable)
            reactor.advance(3)
        endpoint.refuse = False
        reactor.advance(15)
        self.handshake(endpoint)
        self.assertTrue(state.up)
        reactor.advance(state.link.stable_after)  # said once it held
        lines = self.logged.lines()
        self.assertEqual(len(lines), 3, lines)
        self.assertIn("unreachable", lines[1])
        self.assertIn("--state-failure closed: logins fail temporarily", lines[1])
        self.assertIn("reachable again", lines[2])
        for line in lines:
            self.assertNotIn(SECRET, line)

    def test_first_connect_fails(self) -> None:
        """A gateway started without its Redis says so once."""
        reactor = MemoryReactorClock()
        endpoint = ScriptedEndpoint()
        endpoint.refuse = True
        state = open_state("redis://127.0.0.1:1/0", "local", Throttle(reactor), reactor)
        state.link._endpoint = endpoint
        logged = Logged(self)
        state.service.startService()
        self.addCleanup(state.service.stopService)
        for _ in range(10):
            reactor.advance(10)
        lines = logged.lines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("use this process's own limits", lines[0])

    def test_auth_refused(self) -> None:
        """A wrong password: down (logged once, without the password), retried."""
        state, endpoint, reactor = self.make()
        self.handshake(endpoint, b"-WRONGPASS invalid username-password pair\r\n+OK\r\n:1\r\n")
        self.assertFalse(state.up)
        self.assertTrue(endpoint.last[1].disconnecting or endpoint.last[1].disconnected)
        lines = self.logged.lines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("WRONGPASS", lines[0])
        self.assertNotIn(SECRET, lines[0])

    def test_reply_timeout(self) -> None:
        """A reply overdue: the connection is dropped, the login fails temporarily."""
        state, endpoint, reactor = self.make(reply_timeout=2.0)
        self.handshake(endpoint)
        p, transport = endpoint.last
        d = state.throttle.admit("192.0.2.1", "daniel")
        reactor.advance(0)  # the turn's operations go out, in one script
        self.assertNoResult(d)
        reactor.advance(1.5)
        self.assertFalse(transport.disconnecting)
        reactor.advance(1.0)
        self.assertTrue(transport.disconnecting)  # aborted
        p.connectionLost(Failure(ConnectionAbortedError()))
        self.failureResultOf(d, StateUnavailable)
        self.assertFalse(state.up)

    def test_bounded_pending(self) -> None:
        """Commands waiting past the bound fail at once, like an unreachable Redis."""
        state, endpoint, reactor = self.make(max_pending=3)
        self.handshake(endpoint)
        waiting = [state.throttle.admit(f"192.0.2.{i}", "daniel") for i in range(3)]
        for d in waiting:
            self.assertNoResult(d)
        self.failureResultOf(state.throttle.admit("192.0.2.9", "daniel"), StateUnavailable)

    def test_error_reply(self) -> None:
        """
        An error reply (OOM, NOPERM, READONLY after a failover, BUSY...): the
        link is down (it used to stay up, every login failing or falling
        back unseen), said once, the connection ended; a new connection's
        probe script decides when it is back.
        """
        state, endpoint, reactor = self.make("local")
        self.handshake(endpoint)
        p, transport = endpoint.last
        d = state.throttle.admit("192.0.2.1", "daniel")
        reactor.advance(0)  # the turn's operations go out, in one script
        p.dataReceived(b"-OOM command not allowed when used memory > 'maxmemory'\r\n")
        self.assertTrue(self.successResultOf(d).local)
        self.assertEqual((state.up, state.fallback, state.errors), (False, True, 1))
        self.assertTrue(transport.disconnecting)
        p.connectionLost(Failure(ConnectionAbortedError()))
        self.assertTrue(self.successResultOf(state.throttle.admit("192.0.2.1", "daniel")).local)
        for _ in range(3):  # reconnected; the probe is refused too: still down, nothing more said
            reactor.advance(10)
            self.handshake(endpoint, b"+OK\r\n+OK\r\n-OOM command not allowed\r\n")
            self.assertFalse(state.up)
        reactor.advance(10)
        self.handshake(endpoint)
        self.assertEqual((state.up, state.fallback), (True, False))
        reactor.advance(state.link.stable_after)
        lines = self.logged.lines()
        self.assertEqual(len(lines), 3, lines)
        self.assertIn("refuses the gateway's commands (OOM command not allowed", lines[1])
        self.assertIn("use this process's own limits", lines[1])
        self.assertIn("reachable again", lines[2])

    def test_overflow_down(self) -> None:
        """Past C{max_pending} commands waiting: down (said once) until half are answered."""
        state, endpoint, reactor = self.make("local", max_pending=3)
        self.handshake(endpoint)
        p, _ = endpoint.last
        waiting = []
        for i in range(3):
            waiting.append(state.throttle.admit(f"192.0.2.{i}", "daniel"))
            reactor.advance(0)  # one script each
        self.assertTrue(self.successResultOf(state.throttle.admit("192.0.2.9", "daniel")).local)
        self.assertEqual((state.up, state.fallback), (False, True))
        self.assertTrue(self.successResultOf(state.throttle.admit("192.0.2.9", "daniel")).local)
        p.dataReceived(b"*3\r\n:1\r\n$1\r\n0\r\n:0\r\n")
        self.assertFalse(state.up)  # 2 of 3 still waiting
        p.dataReceived(b"*3\r\n:1\r\n$1\r\n0\r\n:0\r\n")
        self.assertTrue(state.up)
        self.assertFalse(self.successResultOf(waiting[1]).local)
        reactor.advance(state.link.stable_after)
        lines = self.logged.lines()
        self.assertEqual(len(lines), 3, lines)
        self.assertIn("falls behind (3 commands waiting)", lines[1])

    def test_ready_is_a_script(self) -> None:
        """
        A Redis that answers but runs no script (CLIENT PAUSE WRITE during a
        failover) is not up: the connection times out, the backoff grows,
        one line down and one up for the whole pause (PING used to mark it
        up after each abort, with the backoff reset: a line per cycle).
        """
        state, endpoint, reactor = self.make()
        self.handshake(endpoint)
        p, transport = endpoint.last
        self.assertIn(b"EVAL", transport.value())
        self.assertIn(b"authgateway:probe", transport.value())
        self.assertNotIn(b"PING", transport.value())
        d = state.throttle.admit("192.0.2.1", "daniel")
        reactor.advance(3)  # overdue: aborted
        p.connectionLost(Failure(ConnectionAbortedError()))
        self.failureResultOf(d, StateUnavailable)
        connected: list[float] = []
        for _ in range(60):
            reactor.advance(0.5)
            p, transport = endpoint.last
            if transport.disconnecting:
                if p.connected:  # the connect timeout
                    p.connectionLost(Failure(ConnectionAbortedError()))
            elif not connected or connected[-1][0] is not p:
                p.dataReceived(b"+OK\r\n+OK\r\n")  # AUTH, SELECT; the script waits
                connected.append((p, reactor.seconds()))
            self.assertFalse(state.up)
        connected = [t for _, t in connected]
        self.assertGreater(connected[-1] - connected[-2], connected[1] - connected[0])  # backing off
        reactor.advance(20)
        self.handshake(endpoint)
        self.assertTrue(state.up)
        reactor.advance(state.link.stable_after)
        lines = self.logged.lines()
        self.assertEqual(len(lines), 3, lines)
        self.assertIn("reachable again", lines[2])

    def test_held_leases_restored(self) -> None:
        """A new connection puts back every lease held, before the link is up (a Redis restarted empty)."""
        state, endpoint, reactor = self.make()
        self.handshake(endpoint)
        p, transport = endpoint.last
        d = state.sessions.acquire("socks-user", "daniel", 2)
        p.dataReceived(b":1\r\n")
        self.assertIsNotNone(self.successResultOf(d))
        (token, name), = state.sessions.held.items()
        p.connectionLost(Failure(ConnectionResetError("restarted")))
        reactor.advance(1)
        p, transport = endpoint.last
        sent = transport.value()
        self.assertIn(b"EVAL", sent)
        self.assertIn(token.encode(), sent)
        self.assertIn(name.encode(), sent)
        self.assertLess(sent.index(b"probe"), sent.index(token.encode()))
        p.dataReceived(b"+OK\r\n+OK\r\n:1\r\n")
        self.assertFalse(state.up)  # the leases are not back yet
        p.dataReceived(b":1\r\n")
        self.assertTrue(state.up)

    def test_cancelled_callers(self) -> None:
        """
        Callers that leave during a round trip touch nothing of the link (they
        used to count as errors, free a waiting slot early, shift the
        watchdog's clock, and record a failure locally too); a place
        granted meanwhile is given back.
        """
        state, endpoint, reactor = self.make("local")
        self.handshake(endpoint)
        p, transport = endpoint.last
        link = state.link
        admission = self.successResultOf(self.admitted(state, reactor, p, "192.0.2.1"))
        acquired = state.sessions.acquire("socks-user", "daniel", 1)
        ran = link.run(RENEW, ["authgateway:s:x"], (30, "t"))
        finished = state.throttle.finish(admission, FAILURE)
        reactor.advance(0)
        sent_at = list(link._sent)
        for d in (acquired, ran, finished):
            d.cancel()
            self.failureResultOf(d, defer.CancelledError)
        self.assertEqual((link.errors, link.pending, list(link._sent)), (0, 3, sent_at))
        transport.clear()
        p.dataReceived(b":1\r\n:1\r\n*1\r\n$3\r\n0.5\r\n")
        self.assertIn(b"ZREM", transport.value())  # the late place given back
        p.dataReceived(b":1\r\n")
        self.assertEqual((link.errors, link.pending, len(link._sent), state.up), (0, 0, 0, True))
        self.assertEqual(state.sessions.held, {})
        self.assertFalse(state.throttle.local._windows)  # the failure is Redis's alone

    def test_cancelled_admit(self) -> None:
        """A caller that leaves while the script runs: its place is released and charged."""
        state, endpoint, reactor = self.make()
        self.handshake(endpoint)
        p, transport = endpoint.last
        d = state.throttle.admit("192.0.2.1", "daniel")
        reactor.advance(0)  # the turn's operations go out, in one script
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        transport.clear()
        p.dataReceived(b"*3\r\n:1\r\n$1\r\n0\r\n:0\r\n")
        self.assertIn(b"peer_failure", transport.value())

    def test_one_script_per_turn(self) -> None:
        """The operations of one reactor turn go out as one EVALSHA; each caller gets its part."""
        state, endpoint, reactor = self.make()
        self.handshake(endpoint)
        p, transport = endpoint.last
        first = self.successResultOf(self.admitted(state, reactor, p, "192.0.2.1"))
        transport.clear()
        finished = state.throttle.finish(first, FAILURE)
        admits = [state.throttle.admit(f"192.0.2.{n}", "daniel") for n in (2, 3)]
        self.assertEqual(transport.value(), b"")  # not before the turn ends
        reactor.advance(0)
        sent = transport.value()
        self.assertEqual(sent.count(b"EVALSHA"), 1)
        self.assertLess(sent.index(b"f111failure"), sent.index(b"a11"))  # in their order
        self.assertEqual(state.link.pending, 3)
        p.dataReceived(b"*7\r\n$3\r\n0.5\r\n:1\r\n$1\r\n0\r\n:0\r\n:0\r\n$2\r\n30\r\n$4\r\npair\r\n")
        self.assertEqual(self.successResultOf(finished), 0.5)
        self.assertIsNone(self.successResultOf(admits[0]).known)
        self.assertEqual(self.failureResultOf(admits[1], Throttled).value.retry_after, 30)
        self.assertEqual(state.link.pending, 0)

    def test_reply_queues_next_batch(self) -> None:
        """What a reply's callers queue (a login's finish, the next admit) goes out when the read is done."""
        state, endpoint, reactor = self.make()
        self.handshake(endpoint)
        p, transport = endpoint.last
        d = state.throttle.admit("192.0.2.1", "daniel")
        reactor.advance(0)
        d.addCallback(lambda a: (state.throttle.finish(a, SUCCESS), state.throttle.admit("192.0.2.2", "x")))
        transport.clear()
        p.dataReceived(b"*3\r\n:1\r\n$1\r\n0\r\n:0\r\n")
        self.assertEqual(transport.value().count(b"EVALSHA"), 1)  # no timer waited for
        self.assertIn(b"f111success", transport.value())

    def test_lost_while_loading(self) -> None:
        """The connection lost while the script loads: the operation fails, it does not hang."""
        state, endpoint, reactor = self.make()
        self.handshake(endpoint)
        p, transport = endpoint.last
        d = state.throttle.admit("192.0.2.1", "daniel")
        reactor.advance(0)
        p.dataReceived(b"-NOSCRIPT No matching script\r\n")
        p.connectionLost(Failure(ConnectionResetError("gone")))
        self.failureResultOf(d, StateUnavailable)
        self.assertEqual(state.link.pending, 0)

    def admitted(self, state: State, reactor: MemoryReactorClock, p: Any, peer: str) -> defer.Deferred[Any]:
        d = state.throttle.admit(peer, "daniel")
        reactor.advance(0)
        p.dataReceived(b"*3\r\n:1\r\n$1\r\n0\r\n:0\r\n")
        return d

    def test_stop_closes(self) -> None:
        state, endpoint, _ = self.make()
        self.handshake(endpoint)
        state.service.stopService()
        self.assertTrue(endpoint.last[1].disconnecting)


class RealRedisMixin:
    """A real redis-server and states made on it, stopped after each test."""

    def setUp(self) -> None:
        self.redis = RedisServer(self)
        self.logged = Logged(self)

    def state(self, url: str | None = None, failure: str = "closed", **limits: Any) -> State:
        from twisted.internet import reactor

        limits = {"max_failures": 5, "max_peer_failures": 10, "delay": 0, **limits}
        state = open_state(url or self.redis.url, failure, Throttle(reactor, **limits), reactor)
        state.link.stable_after = 0.1
        state.service.startService()
        self.addCleanup(state.service.stopService)
        return state

    async def up(self, *states: State) -> None:
        await wait_up(*states)

    async def down(self, *states: State) -> None:
        for _ in range(250):
            if not any(s.up for s in states):
                return
            await sleep(0.02)
        raise AssertionError("the link did not go down")

    async def fail(self, state: State, peer: str, user: str) -> float:
        admission = await state.throttle.admit(peer, user)
        return await state.throttle.finish(admission, FAILURE)

    def keys(self, pattern: str = "*") -> list[str]:
        reply = self.redis.command("KEYS", pattern).decode()
        return re.findall(r"\$\d+\r\n([^\r]*)\r\n", reply)


def sleep(seconds: float) -> defer.Deferred[None]:
    from twisted.internet import reactor

    return task.deferLater(reactor, seconds, lambda: None)


class ThrottleOnRedis(RealRedisMixin, TestCase):
    """The throttle's scripts on a real redis-server."""

    async def test_pair_limit_shared(self) -> None:
        """5 failures spread over two instances refuse the 6th on either."""
        one, two = self.state(), self.state()
        await self.up(one, two)
        for n in range(5):
            await self.fail((one, two)[n % 2], "192.0.2.1", "daniel")
        for state in (one, two):
            with self.assertRaises(Throttled) as e:
                await state.throttle.admit("192.0.2.1", "Daniel ")  # folded: the same user
            self.assertGreater(e.exception.retry_after, 50)
        self.assertEqual(one.throttle.refused["pair"] + two.throttle.refused["pair"], 2)
        await one.throttle.admit("192.0.2.1", "bob")  # another user from that peer: 5 of 10

    async def test_peer_limit(self) -> None:
        state = self.state()
        await self.up(state)
        for n in range(10):
            await self.fail(state, "2001:db8::1", f"user{n}")
        with self.assertRaises(Throttled):
            await state.throttle.admit("2001:db8::2", "someone")  # the same /64
        self.assertEqual(state.throttle.refused["peer"], 1)

    async def test_concurrent_admits(self) -> None:
        """Many admits at once from two instances: exactly max_failures get in flight."""
        one, two = self.state(), self.state()
        await self.up(one, two)
        attempts = [(one, two)[n % 2].throttle.admit("192.0.2.7", "carol") for n in range(30)]
        results = await defer.DeferredList(attempts, consumeErrors=True)
        admitted = [r for ok, r in results if ok]
        refused = [r for ok, r in results if not ok]
        self.assertEqual(len(admitted), 5)
        self.assertTrue(all(f.check(Throttled) for f in refused))
        for admission in admitted:  # released: room again
            await one.throttle.finish(admission, None)
        await one.throttle.admit("192.0.2.7", "carol")

    async def test_batch_in_order(self) -> None:
        """One turn's release and the next admit, in one script: the release counts first."""
        state = self.state(max_failures=1, max_peer_failures=1)
        await self.up(state)
        first = await state.throttle.admit("192.0.2.1", "daniel")
        with self.assertRaises(Throttled):  # its place is taken while it is in flight
            await state.throttle.admit("192.0.2.1", "daniel")
        released = state.throttle.finish(first, None)
        second = state.throttle.admit("192.0.2.1", "daniel")  # the same turn: the same script
        self.assertEqual(await released, 0.0)
        self.assertFalse((await second).local)

    async def test_delay_doubles(self) -> None:
        state = self.state(delay=0.5, max_delay=1.5)
        await self.up(state)
        delays = [await self.fail(state, "192.0.2.1", "daniel") for _ in range(4)]
        self.assertEqual(delays, [0.5, 1.0, 1.5, 1.5])

    async def test_known_device(self) -> None:
        """A success forgives its pair and makes the peer a known device; a failure ends that."""
        state = self.state(max_user_failures=5, delay=0.5, max_user_delay=3)
        await self.up(state)
        for n in range(4):
            await self.fail(state, "192.0.2.1", "daniel")
        admission = await state.throttle.admit("192.0.2.1", "daniel")
        self.assertIsNone(admission.known)
        await state.throttle.finish(admission, SUCCESS)
        for n in range(5):  # the pair starts again; the user reaches its ceiling
            await self.fail(state, f"10.0.0.{n}", "daniel")
        known = await state.throttle.admit("192.0.2.1", "daniel")
        self.assertEqual((known.wait, known.known), (0.0, Throttle.lane_keys("192.0.2.1", "daniel")))
        stranger = await state.throttle.admit("198.51.100.1", "daniel")
        self.assertEqual(stranger.wait, 3.0)  # 0.5 * 2 ** 4, capped by --user-delay-max
        await state.throttle.finish(known, FAILURE)
        again = await state.throttle.admit("192.0.2.1", "daniel")
        self.assertIsNone(again.known)
        self.assertEqual(state.throttle.delayed, 6)  # every stranger past the ceiling

    async def test_peer_failure(self) -> None:
        state = self.state(max_user_failures=5, delay=0.5, max_user_delay=3)
        await self.up(state)
        for n in range(6):
            admission = await state.throttle.admit(f"10.0.1.{n}", "erin")
            await state.throttle.finish(admission, PEER_FAILURE)
        self.assertEqual((await state.throttle.admit("198.51.100.2", "erin")).wait, 0.0)

    async def test_window_and_ttls(self) -> None:
        """Failures leave the window; every key has an expiry; no name in a key."""
        state = self.state(window=1, max_failures=2, max_peer_failures=2)
        await self.up(state)
        await self.fail(state, "192.0.2.1", "daniel")
        await self.fail(state, "192.0.2.1", "daniel")
        with self.assertRaises(Throttled):
            await state.throttle.admit("192.0.2.1", "daniel")
        keys = self.keys()
        self.assertTrue(keys)
        for key in keys:
            self.assertTrue(key.startswith("authgateway:"), key)
            self.assertNotIn("daniel", key)
            ttl = int(self.redis.command("PTTL", key).strip(b":\r\n"))
            self.assertGreater(ttl, 0, key)
        await sleep(1.1)
        await state.throttle.admit("192.0.2.1", "daniel")

    async def test_in_flight_expires(self) -> None:
        """A crashed worker's attempts in flight stop counting by themselves."""
        state = self.state(max_failures=1, max_peer_failures=1)
        state.throttle.in_flight_for = 0.3
        await self.up(state)
        await state.throttle.admit("192.0.2.1", "daniel")  # never finished
        with self.assertRaises(Throttled):
            await state.throttle.admit("192.0.2.1", "daniel")
        await sleep(0.4)
        await state.throttle.admit("192.0.2.1", "daniel")

    async def test_prefix_and_db(self) -> None:
        """Another prefix, or another database, shares nothing."""
        base = self.redis.url.rsplit("/", 1)[0]
        one = self.state(f"{base}/0")
        other_prefix = self.state(f"{base}/0?prefix=gw2:")
        other_db = self.state(f"{base}/5")
        await self.up(one, other_prefix, other_db)
        for _ in range(5):
            await self.fail(one, "192.0.2.1", "daniel")
        with self.assertRaises(Throttled):
            await one.throttle.admit("192.0.2.1", "daniel")
        await other_prefix.throttle.admit("192.0.2.1", "daniel")
        await other_db.throttle.admit("192.0.2.1", "daniel")
        self.assertTrue(self.keys("gw2:*"))
        in_db5 = self.redis.command("EVAL", "redis.call('SELECT', 5) return redis.call('DBSIZE')", "0")
        self.assertNotEqual(in_db5.strip(), b":0")

    async def test_unix_socket(self) -> None:
        state = self.state(self.redis.unix_url + "?prefix=unix:")
        await self.up(state)
        await self.fail(state, "192.0.2.1", "daniel")
        self.assertTrue(self.keys("unix:f:pair:*"))

    async def test_outage_closed(self) -> None:
        """Redis stopped: closed fails logins temporarily; back: shared again; one line each."""
        state = self.state()
        await self.up(state)
        self.redis.stop()
        await self.down(state)
        for _ in range(3):
            with self.assertRaises(StateUnavailable):
                await state.throttle.admit("192.0.2.1", "daniel")
        self.redis.start()
        await self.up(state)
        await self.fail(state, "192.0.2.1", "daniel")
        await sleep(0.2)  # "reachable again" once it held (stable_after)
        lines = self.logged.lines()
        self.assertEqual([("unreachable" in l, "again" in l) for l in lines],
                         [(False, False), (True, False), (False, True)], lines)

    async def test_write_pause(self) -> None:
        """
        CLIENT PAUSE WRITE (a failover): PING answers, scripts wait. Down for
        the pause, said once; up after it, said once (PING marked it up after
        every abort: a line pair and a login wait per cycle).
        """
        state = self.state(failure="local")
        state.link.reply_timeout, state.link.connect_timeout = 0.3, 0.4
        await self.up(state)
        self.redis.command("CLIENT", "PAUSE", "2500", "WRITE")
        self.assertTrue((await state.throttle.admit("192.0.2.1", "daniel")).local)  # overdue
        self.assertFalse(state.up)
        for n in range(10):
            self.assertFalse(state.up)
            self.assertTrue((await state.throttle.admit(f"192.0.2.{n + 2}", "daniel")).local)  # at once
            await sleep(0.1)
        await self.up(state)
        await sleep(0.3)
        lines = self.logged.lines()
        self.assertTrue([("unreachable" in l, "again" in l) for l in lines]
                        == [(False, False), (True, False), (False, True)], lines)

    async def test_outage_local(self) -> None:
        state = self.state(failure="local", max_failures=2)
        await self.up(state)
        admission = await state.throttle.admit("192.0.2.1", "daniel")
        self.redis.stop()
        await self.down(state)
        self.assertTrue(state.fallback)
        # Admitted by Redis, finished here: counted locally.
        await state.throttle.finish(admission, FAILURE)
        await self.fail(state, "192.0.2.1", "daniel")
        with self.assertRaises(Throttled):
            await state.throttle.admit("192.0.2.1", "daniel")
        self.redis.start()
        await self.up(state)
        await state.throttle.admit("192.0.2.1", "daniel")  # Redis's limits again (empty)
        self.assertFalse(state.fallback)


def readme_acl() -> list[str]:
    """The rules of the README's C{user authgateway ...} line (Scaling out), verbatim."""
    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    with open(readme) as f:
        lines = [line.split() for line in f if line.startswith("user authgateway ")]
    if len(lines) != 1:
        raise AssertionError(f"the README has {len(lines)} 'user authgateway' lines, not one")
    return lines[0][2:]


class ACLOnRedis(RealRedisMixin, TestCase):
    """The README's ACL, as written there, on a real redis-server."""

    def setUp(self) -> None:
        super().setUp()
        rules = readme_acl()
        self.assertIn(">LONG-RANDOM-PASSWORD", rules)
        rules = [f">{SECRET}" if r == ">LONG-RANDOM-PASSWORD" else r for r in rules]
        self.assertIn(b"+OK", self.redis.command("ACL", "SETUSER", "authgateway", *rules))
        self.url = f"redis://authgateway:{SECRET}@127.0.0.1:{self.redis.port}/0"

    async def test_everything_allowed(self) -> None:
        """
        Throttle and sessions work under it, also after SCRIPT FLUSH (a
        restart): NOSCRIPT is answered with EVAL, which the ACL allows (SCRIPT
        LOAD, which it does not, failed every script forever).
        """
        one, two = self.state(self.url), self.state(self.url, failure="local")
        await self.up(one, two)
        for flush in range(2):
            for state in (one, two):
                await self.fail(state, "192.0.2.1", "daniel")
                lease = await state.sessions.acquire("socks-user", "daniel", 5)
                self.assertIsNotNone(lease)
                await state.sessions.renew()
                lease.release()
            self.assertIn(b"+OK", self.redis.command("SCRIPT", "FLUSH"))
        await self.fail(one, "192.0.2.1", "daniel")
        self.assertEqual((one.errors, two.errors, one.up, two.up, two.fallback), (0, 0, True, True, False))
        self.assertEqual(len(self.logged.lines()), 2, self.logged.lines())  # connected, twice

    async def test_refused_at_start(self) -> None:
        """A prefix outside the user's keys: down from the start, one line naming NOPERM; local falls back."""
        state = self.state(self.url + "?prefix=other:", failure="local")
        for _ in range(100):
            if self.logged.lines("NOPERM"):
                break
            await sleep(0.02)
        self.assertEqual((state.up, state.fallback), (False, True))
        admission = await state.throttle.admit("192.0.2.1", "daniel")
        self.assertTrue(admission.local)
        await sleep(1.0)  # retried meanwhile: still one line
        lines = self.logged.lines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("refuses the gateway's commands (NOPERM", lines[0])
        self.assertIn("the Redis user needs the README's ACL", lines[0])
        self.assertNotIn(SECRET, lines[0])

    async def test_revoked(self) -> None:
        """A permission taken away while up: down at the first refusal, one line; back when given again."""
        state = self.state(self.url, failure="local")
        await self.up(state)
        self.redis.command("ACL", "SETUSER", "authgateway", "-zadd")
        self.redis.command("SCRIPT", "FLUSH")
        admission = await state.throttle.admit("192.0.2.1", "daniel")
        self.assertTrue(admission.local)
        self.assertEqual((state.up, state.fallback), (False, True))
        self.redis.command("ACL", "SETUSER", "authgateway", "+zadd")
        await self.up(state)
        self.assertFalse((await state.throttle.admit("192.0.2.1", "daniel")).local)
        await sleep(0.2)
        lines = self.logged.lines()
        self.assertTrue([("README's ACL" in l, "again" in l) for l in lines]
                        == [(False, False), (True, False), (False, True)], lines)


async def wait_up(*states: State) -> None:
    """Wait (at most 5 s) until every one of C{states} is connected and ready."""
    for _ in range(250):
        if all(s.up for s in states):
            return
        await sleep(0.02)
    raise AssertionError("the link did not come up")


class AuthOnRedis(TestCase):
    """A password, and TLS, on a real redis-server."""

    async def test_password(self) -> None:
        redis = RedisServer(self, password=SECRET)
        logged = Logged(self)
        from twisted.internet import reactor

        good = open_state(redis.url, "closed", Throttle(reactor), reactor)
        bad = open_state(redis.url.replace(SECRET, "wrong"), "closed", Throttle(reactor), reactor)
        for state in (good, bad):
            state.service.startService()
            self.addCleanup(state.service.stopService)
        for _ in range(200):
            if good.up and bad.errors == 0 and logged.lines("unreachable"):
                break
            await sleep(0.02)
        self.assertTrue(good.up)
        self.assertFalse(bad.up)
        await good.throttle.admit("192.0.2.1", "daniel")
        with self.assertRaises(StateUnavailable):
            await bad.throttle.admit("192.0.2.1", "daniel")
        for line in logged.lines():
            self.assertNotIn(SECRET, line)
            self.assertNotIn("wrong", line.replace("WRONGPASS", ""))

    async def test_password_file(self) -> None:
        """C{--state-password-file}: the password reaches Redis, never the options' URL or argv."""
        from gateway import tap

        redis = RedisServer(self, password=SECRET)
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(SECRET + "\n")
        argv = ["--data-dir", self.mktemp(), "--auth", "memory:a:b", "--state",
                f"redis://127.0.0.1:{redis.port}/0", "--state-password-file", path]
        options = tap.Options()
        options.parseOptions(argv)
        self.assertNotIn(SECRET, " ".join(options["argv"]))
        self.assertNotIn(SECRET, repr(options["coreSettings"]))
        from twisted.internet import reactor

        settings = options["coreSettings"]
        state = open_state(settings.state, "closed", Throttle(reactor), reactor,
                           password=settings.state_password)
        state.service.startService()
        self.addCleanup(state.service.stopService)
        await wait_up(state)
        await state.throttle.admit("192.0.2.1", "daniel")

    async def test_tls(self) -> None:
        """rediss:// verifies the server against ?ca= and the host name."""
        redis = RedisServer(self)
        directory = redis.directory
        cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
        generate_self_signed(cert, key, "localhost")
        port = free_port()
        process = subprocess.Popen(
            # Also on 127.0.0.2, which the certificate does not name: the host name check, not a refusal.
            [redis.binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "127.0.0.2",
             "--tls-cert-file", cert, "--tls-key-file", key, "--tls-auth-clients", "no",
             "--save", "", "--dir", directory, "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.addCleanup(process.wait, 5)
        self.addCleanup(process.terminate)
        for _ in range(250):  # listening: the states' first attempt meets TLS, not a refusal
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                await sleep(0.02)
        from twisted.internet import reactor

        verified = open_state(f"rediss://localhost:{port}/0?ca={cert}", "closed", Throttle(reactor), reactor)
        untrusted = open_state(f"rediss://localhost:{port}/0", "closed", Throttle(reactor), reactor)
        wrong_name = open_state(f"rediss://127.0.0.2:{port}/0?ca={cert}", "closed",
                                Throttle(reactor), reactor)
        logged = Logged(self)
        for state in (verified, untrusted, wrong_name):
            state.service.startService()
            self.addCleanup(state.service.stopService)
        await wait_up(verified)
        await verified.throttle.admit("192.0.2.1", "daniel")
        await sleep(0.3)
        self.assertFalse(untrusted.up)
        self.assertFalse(wrong_name.up)
        lines = logged.lines(f"rediss://localhost:{port}/0 ")
        self.assertEqual(len(lines), 1, lines)  # said as what it is, not "connection lost"
        self.assertIn("unreachable (TLS: certificate verify failed", lines[0])
        lines = logged.lines(f"rediss://127.0.0.2:{port}/0")
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("IPAddressMismatch", lines[0])  # refused for the name, not the route


class SessionsOnRedis(RealRedisMixin, TestCase):
    """Session leases on a real redis-server."""

    async def test_limit_shared(self) -> None:
        one, two = self.state(), self.state()
        await self.up(one, two)
        first = await one.sessions.acquire("socks-user", "daniel", 2)
        second = await two.sessions.acquire("socks-user", "daniel", 2)
        self.assertIsNone(await one.sessions.acquire("socks-user", "daniel", 2))
        self.assertIsNotNone(await one.sessions.acquire("socks-peer", "192.0.2.1", 2))
        first.release()
        first.release()  # idempotent
        for _ in range(50):
            third = await two.sessions.acquire("socks-user", "daniel", 2)
            if third is not None:
                break
            await sleep(0.02)
        self.assertIsNotNone(third)
        self.assertIsNotNone(second)
        self.assertFalse([k for k in self.keys() if "daniel" in k])

    async def test_leases_expire(self) -> None:
        """A holder that died: its places come back; a live one keeps them."""
        live, dead = self.state(), self.state()
        for state in (live, dead):
            state.sessions.lease_for = 0.6
            state.sessions.renew_every = 0.2
        await self.up(live, dead)
        kept = await live.sessions.acquire("socks-user", "daniel", 2)
        await dead.sessions.acquire("socks-user", "daniel", 2)
        dead.sessions.stop()  # as if its process died: no more renewals
        await sleep(1.0)
        self.assertIsNotNone(await live.sessions.acquire("socks-user", "daniel", 2))
        self.assertIsNone(await live.sessions.acquire("socks-user", "daniel", 2))
        kept.release()

    async def test_restart_keeps_held_leases(self) -> None:
        """
        Redis restarted empty: the leases held are put back before any
        acquire is answered (the renewal used to add them on top of new
        ones: twice the places).
        """
        state = self.state()
        await self.up(state)
        held = [await state.sessions.acquire("socks-user", "daniel", 2) for _ in range(2)]
        self.assertNotIn(None, held)
        self.redis.stop()
        await self.down(state)
        self.redis.start()
        await self.up(state)
        self.assertIsNone(await state.sessions.acquire("socks-user", "daniel", 2))
        held[0].release()
        for _ in range(50):
            if await state.sessions.acquire("socks-user", "daniel", 2) is not None:
                break
            await sleep(0.02)
        else:
            self.fail("the place released did not come back")

    async def test_outage(self) -> None:
        closed, local = self.state(), self.state(failure="local")
        await self.up(closed, local)
        self.redis.stop()
        await self.down(closed, local)
        with self.assertRaises(StateUnavailable):
            await closed.sessions.acquire("socks-user", "daniel", 1)
        lease = await local.sessions.acquire("socks-user", "daniel", 1)
        self.assertIsNone(await local.sessions.acquire("socks-user", "daniel", 1))
        lease.release()  # never raises, never waits


class OptionsAndMetricsTests(SynchronousTestCase):
    """C{--state} and C{--state-failure} in C{twistd authgateway}, and the three state families."""

    def _secret_file(self, text: str = SECRET) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_local_default(self) -> None:
        from tests.test_metrics import gateway, scrape, value

        top = gateway(self)
        self.assertEqual(top.core.state.name, "local")
        self.assertIsInstance(top.core.throttle, Throttle)
        families = scrape(top)
        self.assertEqual(
            [value(families, n) for n in ("authgateway_state_up", "authgateway_state_errors_total",
                                          "authgateway_state_fallback")],
            [1, 0, 0],
        )

    def test_redis(self) -> None:
        """The core's throttle and sessions are Redis's; the link is a core service; no password out."""
        from tests.test_metrics import gateway, scrape, value

        top = gateway(self, "--state", f"redis://:{SECRET}@127.0.0.1:1/3?prefix=gw:",
                      "--state-failure", "local", "--max-failures", "3")
        core = top.core
        self.assertIsInstance(core.throttle, RedisThrottle)
        self.assertEqual(core.throttle.max_failures, 3)
        self.assertIs(core.state.throttle, core.throttle)
        self.assertIn(core.state.service, core.services)
        self.assertEqual(core.state.name, "redis://127.0.0.1:1/3?prefix=gw%3A")
        self.assertNotIn(SECRET, repr(core.state))
        self.assertTrue(core.throttle.admit("192.0.2.1", "daniel").called)  # fallen back at once
        families = scrape(top)
        self.assertEqual(
            [value(families, n) for n in ("authgateway_state_up", "authgateway_state_errors_total",
                                          "authgateway_state_fallback")],
            [0, 1, 1],
        )
        from prometheus_client.exposition import generate_latest

        self.assertNotIn(SECRET, generate_latest(top.site.registry).decode())

    def test_usage_errors(self) -> None:
        from twisted.python import usage

        from gateway import tap

        for args, words in (
            (["--state", f"mongodb://:{SECRET}@x"], "--state: must be local"),
            (["--state", f"redis://:{SECRET}@h/x"], "--state: the database must be a number"),
            (["--state-failure", "open"], "--state-failure 'open': must be closed or local"),
            (["--state-password-file", self._secret_file()], "needs a Redis --state"),
            (["--state", f"redis://:{SECRET}@h/0", "--state-password-file", self._secret_file()],
             "holds a password already"),
            (["--state", "redis://h/0", "--state-password-file", self._secret_file(f"{SECRET}\nx")],
             "must hold one line"),
            (["--state", "redis://h/0", "--state-password-file", self._secret_file("")],
             "must hold one line"),
            (["--state", "redis://h/0", "--state-password-file", self._secret_file("x" * 2000)],
             "larger than 1024 bytes"),
            (["--state", "redis://h/0", "--state-password-file", "/nonexistent/pw"],
             "No such file"),
        ):
            options = tap.Options()
            with self.assertRaises(usage.UsageError) as e:
                options.parseOptions(["--data-dir", self.mktemp(), "--auth", "memory:a:b", *args])
            self.assertIn(words, str(e.exception))
            self.assertNotIn(SECRET, str(e.exception))
