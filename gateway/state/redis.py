# -*- test-case-name: tests.test_state -*-
"""
The gateway's limits in Redis (C{--state redis://...}), shared by every
worker and every instance that names the same server, database and prefix.

Layout: every key starts with the prefix (C{authgateway:}, or C{?prefix=}
in the URL) and has an expiry, so nothing outlives its use:

    PREFIX f:peer:ADDR, f:pair:D, f:user:D   failures (ZSET, score = Redis time)
    PREFIX i:peer:ADDR, i:pair:D             attempts in flight (ZSET, score = expiry)
    PREFIX k:D                               known device of a user (string, PX)
    PREFIX s:SCOPE:D                         session leases (ZSET, score = expiry)

Time is Redis's (C{TIME} inside the scripts), so instances with skewed
clocks agree; each update runs in one Lua script (EVALSHA, loaded on
NOSCRIPT), so two instances cannot both take the last place: a throttle's
step is one operation of L{BATCH}, and the steps of one reactor turn go out
as one call (one round trip, one reply split back to their callers). Attempts in flight and
leases are members whose score is their expiry: a crashed worker's places
come back by themselves (leases are renewed by their holder while it
lives).

User names (and SOCKS session keys) reach Redis only as digests (D above):
BLAKE2b keyed with a key derived from the prefix. A per-process random key
(as the in-process throttle uses) cannot work across instances, and a
random key kept in Redis (SET NX) would sit next to the digests it keys:
whoever can read Redis could test guessed names against either. The fixed
key costs no round trip and no race at start, keeps names out of
C{redis-cli}, dumps and replicas, and differs per prefix; it does not hide
a guessed name from someone who can read Redis. Peer addresses are kept as
they are (the operator's own view of who is throttled).

Failure policy (C{--state-failure}): when Redis cannot be reached (not
connected, a reply overdue, too many commands waiting, an error reply),
C{closed} fails the operation with L{StateUnavailable} (the login is a
temporary failure); C{local} runs it on this process's own limits (the
classes of C{--state local}). Each change between reachable and not is
logged once, naming the URL without its password and the policy.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import itertools
import secrets
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import hiredis
from twisted.application import service
from twisted.internet import defer, endpoints, protocol, ssl, task
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.addresses import peer_key
from gateway.checkers.hashing import length_prefixed
from gateway.checkers.throttle import (
    FAILURE, PEER_FAILURE, SUCCESS, Admission, IThrottle, Throttle, _fold,
)
from gateway.errors import StateUnavailable, Throttled
from gateway.ratelog import LogRateLimiter
from gateway.state import ISessionLimits, Lease, LocalSessions
from gateway.state.url import DEFAULT_PREFIX, FAILURE_POLICIES, StateURL, parse_state_url
from gateway.tls import load_ca_file
from gateway.twistedinternals import write_now

log = Logger()

class Unreachable(Exception):
    """Redis did not answer this command (the failure policy decides what follows)."""


@attrs.frozen
class Script:
    """A Lua script and its SHA1 (sent with EVALSHA; EVAL when Redis does not have it)."""

    text: bytes = attrs.field(converter=lambda s: s.encode() if isinstance(s, str) else s)

    @functools.cached_property
    def sha(self) -> str:
        return hashlib.sha1(self.text).hexdigest()

    @functools.cached_property
    def evalsha(self) -> bytes:
        """EVALSHA and the SHA, in RESP."""
        return resp(b"EVALSHA", self.sha.encode())


def resp(*args: Any) -> bytes:
    """C{args} as RESP bulk strings (a command's elements without its array header)."""
    out = []
    for a in args:
        if not isinstance(a, bytes):
            a = (repr(a) if isinstance(a, float) else str(a)).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class Encoded(bytes):
    """A whole command already in RESP, sent as it is (built once from cached parts)."""


class ErrorReply(Exception):
    """An error reply from Redis (a script's error, NOSCRIPT, OOM, WRONGPASS...)."""


class _Protocol(protocol.Protocol):
    """
    A minimal RESP client on hiredis's parser: each command sent pushes a
    plain callable, each reply pops and calls the oldest (Redis answers in
    order). No Deferred, timer or conversion per command: the throttle's
    hot path sends one command per reactor turn and splits its reply itself.
    """

    def __init__(self, link: Link) -> None:
        self.link = link
        self._reader = hiredis.Reader(replyError=ErrorReply)
        self.waiting: collections.deque[Callable[[Any], None]] = collections.deque()

    def send(self, command: bytes, done: Callable[[Any], None]) -> None:
        """Write C{command}; C{done} gets its reply, an L{ErrorReply}, or a Failure when the connection ends."""
        write_now(self.transport, command)  # no wait for the next reactor pass
        self.waiting.append(done)

    def command(self, *args: Any) -> defer.Deferred[Any]:
        """Send one command built from C{args}; a Deferred of its reply (errback on an error reply)."""
        d: defer.Deferred[Any] = defer.Deferred()

        def done(reply: Any) -> None:
            if isinstance(reply, (Exception, Failure)):
                d.errback(reply)
            else:
                d.callback(reply)

        self.send(b"*%d\r\n%s" % (len(args), resp(*args)), done)
        return d

    def dataReceived(self, data: bytes) -> None:
        reader, waiting, link = self._reader, self.waiting, self.link
        reader.feed(data)
        link.dispatching = True
        try:
            reply = reader.gets()
            while reply is not False:
                if not waiting:  # a reply nobody asked for: not Redis
                    self.transport.abortConnection()
                    return
                waiting.popleft()(reply)
                reply = reader.gets()
        except hiredis.ProtocolError:
            self.transport.abortConnection()
        finally:
            link.dispatching = False
        link.replied()

    def connectionLost(self, why: Failure = protocol.connectionDone) -> None:
        waiting, self.waiting = self.waiting, collections.deque()
        lost = Failure(ConnectionLost(why.getErrorMessage()))
        for done in waiting:
            done(lost)
        self.link._lost(self, why)


class ConnectionLost(Exception):
    """The connection to Redis ended before the reply came."""


class _Factory(protocol.Factory):
    def __init__(self, link: Link) -> None:
        self.link = link

    def buildProtocol(self, addr: Any) -> _Protocol:
        # No timer per command: the link's watchdog ends a connection whose
        # oldest reply is overdue (L{Link._watch}).
        return _Protocol(self.link)


class Link(service.Service):
    """
    One connection to Redis, kept up while the gateway runs (reconnecting
    with backoff), with a connect timeout, a reply timeout and a bound on
    commands waiting for their reply; and the failure policy.
    C{endpoint} replaces the URL's (tests).

    @ivar up: whether commands are sent now.
    @ivar errors: commands that failed (not connected, overdue, too many
        waiting, error replies), for C{authgateway_state_errors_total}.
    """

    def __init__(
        self,
        url: StateURL,
        reactor: Any,
        failure: str = "closed",
        connect_timeout: float = 5.0,
        reply_timeout: float = 2.0,
        max_pending: int = 1000,
        endpoint: Any = None,
    ) -> None:
        if failure not in FAILURE_POLICIES:
            raise ValueError(f"the failure policy must be one of {', '.join(FAILURE_POLICIES)}")
        self.url = url
        self.reactor = reactor
        self.failure = failure
        self.connect_timeout = connect_timeout
        self.reply_timeout = reply_timeout
        self.max_pending = max_pending
        self._endpoint = endpoint
        self.name = url.display
        self.up = False
        self.errors = 0
        self.pending = 0
        #: The connection commands go to (None while down), the one being
        #: prepared or in use, the attempt under way and the next one.
        self._protocol: _Protocol | None = None
        self._current: _Protocol | None = None
        self._connecting: defer.Deferred[Any] | None = None
        self._retry: Any = None
        self._attempts = 0
        #: The last state logged (None: none yet).
        self._logged: bool | None = None
        #: Commands waiting for the first connection's outcome (None once known).
        self._starting: list[Callable[[], None]] | None = []
        #: Whether replies are being dispatched now (what they queue is
        #: flushed when they are all dispatched: L{replied}).
        self.dispatching = False
        #: Called after each read's replies (L{RedisThrottle}'s batch).
        self.flushers: list[Callable[[], None]] = []
        #: When each command waiting for its reply was sent, oldest first
        #: (Redis answers in order).
        self._sent: collections.deque[float] = collections.deque()
        self._watchdog = task.LoopingCall(self._watch)
        self._watchdog.clock = reactor
        self.error_log = LogRateLimiter(reactor)

    def __repr__(self) -> str:
        return f"<Link {self.name} up={self.up}>"

    @property
    def fallback(self) -> bool:
        """Whether the in-process limits stand in for Redis now."""
        return not self.up and self.failure == "local"

    def endpoint(self) -> Any:
        """The client endpoint of the URL (verified TLS for C{rediss://})."""
        url = self.url
        if url.scheme == "unix":
            return endpoints.UNIXClientEndpoint(self.reactor, url.path, timeout=self.connect_timeout)
        tcp = endpoints.HostnameEndpoint(
            self.reactor, url.host, url.port, timeout=self.connect_timeout
        )
        if url.scheme == "redis":
            return tcp
        trust = ssl.platformTrust() if url.ca is None else ssl.trustRootFromCertificates(
            list(load_ca_file(url.ca))
        )
        return endpoints.wrapClientTLS(ssl.optionsForClientTLS(url.host, trustRoot=trust), tcp)

    def startService(self) -> None:
        super().startService()
        self._attempts = 0
        self._watchdog.start(min(self.reply_timeout / 4, 1.0), now=False)
        self._connect()

    def _watch(self) -> None:
        """End the connection when its oldest command waited more than C{reply_timeout}."""
        p = self._protocol
        if p is not None and self._sent and self.reactor.seconds() - self._sent[0] > self.reply_timeout:
            p.transport.abortConnection()

    def stopService(self) -> Any:
        super().stopService()
        self._went(False)  # anything still waiting for the first connection fails
        if self._watchdog.running:
            self._watchdog.stop()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._connecting is not None:
            self._connecting.cancel()
        current, self._current, self._protocol = self._current, None, None
        self.up = False
        if current is not None:
            current.transport.loseConnection()

    def _connect(self) -> None:
        """One connection attempt; a failed one is retried with backoff (L{_schedule})."""
        self._retry = None
        if not self.running:
            return
        d = self._connecting = (self._endpoint or self.endpoint()).connect(_Factory(self))
        d.addCallback(self._prepare).addErrback(self._failed)

    def _failed(self, reason: Failure) -> None:
        self._connecting = None
        if not self.running:
            return
        self._went(False, reason.getErrorMessage())
        self._schedule()

    def _schedule(self) -> None:
        """Reconnect after 0.25 s, doubling with each failed attempt up to 10 s."""
        if not self.running or self._retry is not None or self._connecting is not None:
            return
        delay = min(0.25 * 2 ** min(self._attempts, 10), 10.0)
        self._attempts += 1
        self._retry = self.reactor.callLater(delay, self._connect)

    def _prepare(self, p: _Protocol) -> defer.Deferred[Any]:
        """AUTH, SELECT and PING, within the connect timeout; then the link is up."""
        self._current = p
        no_delay = getattr(p.transport, "setTcpNoDelay", None)
        if no_delay is not None:  # one small command, its reply awaited: no Nagle wait
            try:
                no_delay(True)
            except OSError:  # a UNIX socket under TLS
                pass
        commands: list[tuple[Any, ...]] = []
        url = self.url
        if url.password is not None:
            commands.append(("AUTH", url.username, url.password) if url.username else ("AUTH", url.password))
        if url.db:
            commands.append(("SELECT", url.db))
        commands.append(("PING",))
        replies = [p.command(*c) for c in commands]
        timer = self.reactor.callLater(self.connect_timeout, p.transport.abortConnection)

        def ready(_: Any) -> None:
            if timer.active():
                timer.cancel()
            self._connecting = None
            if self._current is not p:  # lost meanwhile
                return self._schedule()
            self._attempts = 0
            self._protocol = p
            self._went(True)

        def refused(reason: Failure) -> Failure:
            if timer.active():
                timer.cancel()
            first = reason.value.subFailure if isinstance(reason.value, defer.FirstError) else reason
            if self._current is p:
                self._current = None
                p.transport.abortConnection()
            return first

        return defer.gatherResults(replies, consumeErrors=True).addCallbacks(ready, refused)

    def _lost(self, p: _Protocol, why: Failure) -> None:
        if self._current is not p:
            return
        self._current = None
        self._sent.clear()
        if self._protocol is p:
            self._protocol = None
            self._went(False, why.getErrorMessage())
            self._schedule()

    def _went(self, up: bool, why: str = "") -> None:
        self.up = up
        starting, self._starting = self._starting, None
        for retry in starting or ():
            retry()
        if self._logged is up or not self.running:
            return
        first, self._logged = self._logged is None, up
        if up:
            log.info(
                "state: {name} {how}: limits are shared",
                name=self.name, how="connected" if first else "reachable again",
            )
        else:
            log.warn(
                "state: {name} unreachable ({why}); --state-failure {policy}: logins {effect}"
                " until it is back",
                name=self.name, why=_one_line(why), policy=self.failure,
                effect="fail temporarily" if self.failure == "closed"
                else "use this process's own limits",
            )

    def run(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> defer.Deferred[Any]:
        """Run C{script} (EVALSHA; loaded when Redis lacks it); fails with L{Unreachable}."""
        return self._deferred(Encoded(
            b"*%d\r\n%s%s" % (3 + len(keys) + len(args), script.evalsha, resp(len(keys), *keys, *args))
        ), script)

    def command(self, *args: Any) -> defer.Deferred[Any]:
        """Send one command; fails with L{Unreachable}."""
        return self._deferred(Encoded(b"*%d\r\n%s" % (len(args), resp(*args))), None)

    def _deferred(self, command: Encoded, script: Script | None) -> defer.Deferred[Any]:
        refused = self.take()
        if refused is not None:
            return defer.fail(refused)
        d: defer.Deferred[Any] = defer.Deferred()

        def done(reply: Any) -> None:
            if isinstance(reply, Failure):
                d.errback(reply)
            else:
                d.callback(reply)

        self.call(command, script, done)
        return d

    def take(self, ops: int = 1) -> Unreachable | None:
        """
        Count C{ops} operations as waiting for Redis (None), or say why
        Redis cannot take them now (counted as errors): not connected
        (the first connection's attempt excepted: they wait for it), or
        C{max_pending} operations waiting already. L{call} sends them.
        """
        if self._protocol is None and not (self.running and self._starting is not None):
            self.errors += ops
            return Unreachable("not connected")
        if self.pending + ops > self.max_pending:
            self.errors += ops
            return Unreachable("too many commands waiting")
        self.pending += ops
        return None

    def call(
        self, command: Encoded, script: Script | None, done: Callable[[Any], None], ops: int = 1
    ) -> None:
        """
        Send C{command}, carrying C{ops} operations counted by L{take}:
        C{done} gets its reply, or a Failure of L{Unreachable} (not sent,
        connection lost, overdue, an error reply). A script Redis lacks is
        loaded and the command sent again.
        """
        p = self._protocol
        if p is None and self.running and self._starting is not None:
            # The first connection is under way (a worker just started):
            # wait for it rather than fail the logins of its first moments.
            self._starting.append(lambda: self.call(command, script, done, ops))
            return
        if p is None:
            self.pending -= ops
            self.errors += ops
            done(Failure(Unreachable("not connected")))
            return
        self._sent.append(self.reactor.seconds())

        retried = False

        def answered(reply: Any) -> None:
            nonlocal retried
            if (
                script is not None and not retried and isinstance(reply, ErrorReply)
                and str(reply).startswith("NOSCRIPT")
            ):
                retried = True
                # Redis lacks the script (restarted, flushed): load it, send again.
                def loaded(reply: Any) -> None:
                    if isinstance(reply, Failure):  # lost meanwhile
                        answered(reply)
                    else:  # (a refused LOAD: the command's own error tells)
                        p.send(command, answered)

                p.send(b"*3\r\n%s" % resp(b"SCRIPT", b"LOAD", script.text), loaded)
                return
            self.pending -= ops
            if self._sent:
                self._sent.popleft()
            if isinstance(reply, (Exception, Failure)):
                done(self._error(reply, ops))
            else:
                done(reply)

        p.send(command, answered)

    def _error(self, reply: Exception | Failure, ops: int) -> Failure:
        """An error reply or a lost connection, counted (and logged at most once a minute for a reply)."""
        self.errors += ops
        if isinstance(reply, ErrorReply):  # the link is up: a script's or Redis's error
            self.error_log.warn(
                log, "error", "state: {name} answered an error: {error}",
                name=self.name, error=_one_line(str(reply)),
            )
            return Failure(Unreachable(str(reply)))
        return Failure(Unreachable(reply.getErrorMessage() if isinstance(reply, Failure) else str(reply)))

    def replied(self) -> None:
        """A read's replies are dispatched: what they queued goes out now, in one command each."""
        for flush in self.flushers:
            flush()

    def unavailable(self, reason: Failure, local: Callable[[], Any]) -> Any:
        """
        The failure policy for an operation Redis did not do: C{local()}
        under C{local}, L{StateUnavailable} under C{closed}.
        """
        reason.trap(Unreachable)
        if self.failure == "local":
            return local()
        raise StateUnavailable()


def _one_line(text: str) -> str:
    return " ".join(text.split())[:200]


@functools.lru_cache(maxsize=16)
def _digest_key(prefix: str) -> bytes:
    return hashlib.sha256(b"authgateway state digests\0" + prefix.encode()).digest()


def state_digest(prefix: str, *parts: str) -> str:
    """A user name (or any key naming a person) as it is kept in Redis (see the module docstring)."""
    return hashlib.blake2b(
        length_prefixed(*parts), digest_size=16, key=_digest_key(prefix)
    ).hexdigest()


def _now() -> str:
    return (
        "local t = redis.call('TIME')\n"
        "local now = tonumber(t[1]) + tonumber(t[2]) / 1000000\n"
    )


#: The throttle's operations of one reactor turn, in order, in one script
#: (one round trip, one TIME: they all happen at the same instant).
#: KEYS: six per operation: peer failures, peer in flight, pair failures,
#: pair in flight, user failures, known device. ARGV: window, peer limit,
#: pair limit, user ceiling, delay, max delay, max user delay, user
#: failures kept, known for, seconds in flight; then two per operation:
#: its code and its token. The code is C{a} (admit: check and reserve) or
#: C{f} (finish: release and record), the flags has peer and has user
#: (C{0}/C{1}), and for a finish the release flag and the verdict (empty,
#: C{success}, C{failure}, C{peer_failure}). Returns, flat, for an admit
#: {0, retry, limit} (refused) or {1, wait, known}; for a finish, its delay.
BATCH = Script(_now() + """
local window = tonumber(ARGV[1])
local cutoff = now - window
local window_ms = math.ceil(window * 1000)
local peer_limit, pair_limit = tonumber(ARGV[2]), tonumber(ARGV[3])
local ceiling, delay = tonumber(ARGV[4]), tonumber(ARGV[5])
local max_delay, max_user_delay = tonumber(ARGV[6]), tonumber(ARGV[7])
local user_kept, known_ms = tonumber(ARGV[8]), math.ceil(tonumber(ARGV[9]) * 1000)
local ttl = tonumber(ARGV[10])
local ttl_ms = math.ceil(ttl * 1000)
local out = {}

local retry, by
local function hard(f, i, limit, kind)
  redis.call('ZREMRANGEBYSCORE', f, '-inf', cutoff)
  local n = redis.call('ZCARD', f)
  if n >= limit then
    local oldest = redis.call('ZRANGE', f, 0, 0, 'WITHSCORES')
    retry = math.max(retry, tonumber(oldest[2]) + window - now)
    if by == '' then by = kind end
    return
  end
  redis.call('ZREMRANGEBYSCORE', i, '-inf', now)
  if n + redis.call('ZCARD', i) >= limit then
    retry = math.max(retry, 1)
    if by == '' then by = kind end
  end
end

local function reserve(i, token)
  redis.call('ZADD', i, now + ttl, token)
  redis.call('PEXPIRE', i, ttl_ms)
end

local function admit(k, peer, user, token)
  retry, by = 0, ''
  if peer then hard(KEYS[k + 1], KEYS[k + 2], peer_limit, 'peer') end
  if user then hard(KEYS[k + 3], KEYS[k + 4], pair_limit, 'pair') end
  if retry > 0 then
    out[#out + 1] = 0; out[#out + 1] = tostring(retry); out[#out + 1] = by
    return
  end
  local wait, known = 0, 0
  if user then
    known = redis.call('EXISTS', KEYS[k + 6])
    redis.call('ZREMRANGEBYSCORE', KEYS[k + 5], '-inf', cutoff)
    local excess = redis.call('ZCARD', KEYS[k + 5]) - ceiling
    if excess >= 0 and delay > 0 and known == 0 then
      wait = math.min(delay * 2 ^ excess, max_delay, max_user_delay)
    end
  end
  if peer then reserve(KEYS[k + 2], token) end
  if user then reserve(KEYS[k + 4], token) end
  out[#out + 1] = 1; out[#out + 1] = tostring(wait); out[#out + 1] = known
end

local counted
local function add(f, token, keep, counts)
  redis.call('ZREMRANGEBYSCORE', f, '-inf', cutoff)
  redis.call('ZADD', f, now, token)
  redis.call('ZREMRANGEBYRANK', f, 0, -(keep + 1))
  redis.call('PEXPIRE', f, window_ms)
  if counts then counted = math.max(counted, redis.call('ZCARD', f)) end
end

local function finish(k, peer, user, release, verdict, token)
  if release then
    if peer then redis.call('ZREM', KEYS[k + 2], token) end
    if user then redis.call('ZREM', KEYS[k + 4], token) end
  end
  if verdict == '' then return '0' end
  if verdict == 'success' then
    if user then
      redis.call('DEL', KEYS[k + 3])
      redis.call('SET', KEYS[k + 6], '1', 'PX', known_ms)
    end
    return '0'
  end
  counted = 0
  if peer then add(KEYS[k + 1], token, peer_limit, true) end
  if user then
    add(KEYS[k + 3], token, pair_limit, true)
    redis.call('DEL', KEYS[k + 6])
    if verdict == 'failure' then add(KEYS[k + 5], token, user_kept, false) end
  end
  if counted == 0 or delay <= 0 then return '0' end
  return tostring(math.min(delay * 2 ^ (counted - 1), max_delay))
end

for n = 0, (#ARGV - 10) / 2 - 1 do
  local code, token = ARGV[11 + 2 * n], ARGV[12 + 2 * n]
  local peer, user = string.byte(code, 2) == 49, string.byte(code, 3) == 49
  if string.byte(code, 1) == 97 then
    admit(6 * n, peer, user, token)
  else
    out[#out + 1] = finish(6 * n, peer, user, string.byte(code, 4) == 49, string.sub(code, 5), token)
  end
end
return out
""")

#: KEYS: the scope's leases. ARGV: limit, token, seconds a lease lasts
#: unrenewed. Returns 1 (taken) or 0 (all places taken).
ACQUIRE = Script(_now() + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
local ttl = tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[2])
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl * 1000))
return 1
""")

#: KEYS: leases' sets; ARGV: seconds, then one token per key. Puts back a
#: lease Redis lost (a restart): the session it counts is still open.
RENEW = Script(_now() + """
local ttl = tonumber(ARGV[1])
local ms = math.ceil(ttl * 1000)
for n, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + ttl, ARGV[n + 1])
  redis.call('PEXPIRE', key, ms)
end
return #KEYS
""")


def _none(_: Any) -> None:
    """Swallows the outcome of a step nobody waits for (its failure is counted and logged by the link)."""


def _number(value: Any) -> float:
    return float(value.decode() if isinstance(value, bytes) else value)


class _Tokens:
    """Names of reservations and leases: unique across processes, cheap to make."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(6) + ":"
        self._count = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._count)}"


#: L{BATCH}'s operation codes (see there), in RESP.
_CODES = {
    code: resp(code) for code in (
        [f"a{p}{u}" for p in "01" for u in "01"]
        + [f"f{p}{u}{r}{v or ''}" for p in "01" for u in "01" for r in "01"
           for v in (None, SUCCESS, FAILURE, PEER_FAILURE)]
    )
}


@implementer(IThrottle)
class RedisThrottle:
    """
    L{IThrottle} on Redis, with the semantics of L{Throttle} (whose limits
    it takes, and which it falls back to under C{--state-failure local}):
    an admit (check and reserve) and a finish (release and record) are
    each one operation of L{BATCH}; the operations of one reactor turn go
    out as one script call, run by Redis in their order (atomically), and
    each reply goes back to its caller.

    The batch is sent when the turn's replies are all dispatched (what a
    reply's callbacks queued: the finish of a login and the admit of the
    next) or else at the next turn (C{callLater(0)}), never later: an
    attempt's release is not held back for a batch to fill, so a finished
    attempt stops counting in flight as soon as it would one at a time.
    """

    #: Seconds an attempt counts in flight unless finished sooner (a
    #: crashed worker's attempts stop counting after this).
    in_flight_for = 60.0

    def __init__(self, link: Link, local: Throttle, prefix: str = DEFAULT_PREFIX) -> None:
        self.link = link
        self.local = local
        self.prefix = prefix
        self.clock = local.clock
        #: Shared with the local throttle: the metrics count both.
        self.refused = local.refused
        self.refusal_log = local.refusal_log
        self._delayed = 0
        self._token = _Tokens()
        self._keys = functools.lru_cache(maxsize=4096)(self._make_keys)
        #: The operations of this turn: their keys and arguments in RESP,
        #: and what to do with each one's reply.
        self._queue_keys: list[bytes] = []
        self._queue_args: list[bytes] = []
        self._queue_ops: list[tuple[Any, ...]] = []
        self._timer: Any = None
        self._limits_for: tuple[float, bytes] = (-1.0, b"")
        link.flushers.append(self.flush)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("max_") or name in ("window", "delay", "known_for"):
            return getattr(self.local, name)  # the limits are the local throttle's
        raise AttributeError(name)

    @property
    def delayed(self) -> int:
        return self._delayed + self.local.delayed

    def _make_keys(self, peer: str | None, user: str | None) -> tuple[bytes, str]:
        """The six keys in RESP, and the flags (has peer, has user) of the operation's code."""
        p = self.prefix
        address = peer_key(peer)
        pair = account = ""
        if user:
            name = _fold(user)
            pair = state_digest(p, name, address or "")
            account = state_digest(p, name)
        return resp(
            f"{p}f:peer:{address}", f"{p}i:peer:{address}", f"{p}f:pair:{pair}",
            f"{p}i:pair:{pair}", f"{p}f:user:{account}", f"{p}k:{pair}",
        ), ("1" if address is not None else "0") + ("1" if user else "0")

    def _limits(self) -> bytes:
        """L{BATCH}'s first ten arguments in RESP (made again when C{in_flight_for} changes)."""
        if self._limits_for[0] == self.in_flight_for:
            return self._limits_for[1]
        local = self.local
        self._limits_for = (self.in_flight_for, resp(local.window, local.max_peer_failures, local.max_failures,
                    local.max_user_failures, local.delay, local.max_delay, local.max_user_delay,
                    local.max_user_failures + 32, local.known_for, self.in_flight_for))
        return self._limits_for[1]

    def _queue(self, peer: str | None, user: str | None, code: str, token: str, op: tuple[Any, ...]) -> None:
        keys, flags = self._keys(peer, user)
        tok = token.encode()
        self._queue_keys.append(keys)
        self._queue_args.append(b"%s$%d\r\n%s\r\n" % (_CODES[code[0] + flags + code[1:]], len(tok), tok))
        self._queue_ops.append(op)
        if len(self._queue_ops) == 1 and self._timer is None and not self.link.dispatching:
            self._timer = self.clock.callLater(0, self.flush)

    def flush(self) -> None:
        """Send the operations queued, as one L{BATCH} call (the link's hook and the timer's)."""
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        ops = self._queue_ops
        if not ops:
            return
        keys, args = self._queue_keys, self._queue_args
        self._queue_keys, self._queue_args, self._queue_ops = [], [], []
        n = len(ops)
        limits = self._limits()
        self.link.call(Encoded(b"*%d\r\n%s$%d\r\n%d\r\n%s%s%s" % (
            3 + 8 * n + 10, BATCH.evalsha, len(str(6 * n)), 6 * n,
            b"".join(keys), limits, b"".join(args),
        )), BATCH, functools.partial(self._replied, ops), n)

    def _replied(self, ops: list[tuple[Any, ...]], reply: Any) -> None:
        """Each operation's part of a batch's reply to its caller (or the failure to each)."""
        if isinstance(reply, Failure):
            for op in ops:
                op[0](reply, *op[1:])
            return
        at = 0
        for op in ops:
            at = op[0](reply, *op[1:], at=at)

    def admit(self, peer: str | None, user: str | None) -> defer.Deferred[Admission]:
        refused = self.link.take()
        if refused is not None:  # not sent: the failure policy, at once
            return self._unavailable(refused, lambda: self.local.admit(peer, user))
        token = self._token()
        outcome: defer.Deferred[Admission] = defer.Deferred()
        self._queue(peer, user, "a", token, (self._admitted, outcome, peer, user, token))
        return outcome

    def _admitted(
        self, reply: Any, outcome: defer.Deferred[Admission], peer: str | None, user: str | None,
        token: str, at: int = 0,
    ) -> int:
        result: defer.Deferred[Admission]
        if type(reply) is list:
            ok, number, third = reply[at:at + 3]
            if ok == 1:  # admitted: the common case, without a Deferred more
                wait = 0.0 if number == b"0" else _number(number)
                if wait:
                    self._delayed += 1
                known = Throttle.lane_keys(peer, user) if third == 1 else None
                admission = Admission(peer, user, wait, known, token, local=False)
                if not outcome.called:
                    outcome.callback(admission)
                else:
                    # The caller left while the script ran: hanging up must
                    # not be a free retry (as L{ThrottlingChecker} counts it).
                    self.finish(admission, PEER_FAILURE).addErrback(_none)
                return at + 3
            by = third.decode() if isinstance(third, bytes) else str(third)
            self.refused[by] += 1
            refused = Throttled(_number(number))
            refused.log_suppressed = self.refusal_log.admit(peer_key(peer))
            result = defer.fail(refused)
        else:
            result = self._unavailable(reply.value, lambda: self.local.admit(peer, user))
        if outcome.called:  # (as above; a local admission is finished locally)
            result.addCallback(lambda a: self.finish(a, PEER_FAILURE)).addErrback(_none)
        else:
            result.chainDeferred(outcome)
        return at + 3

    def finish(
        self, admission: Admission, verdict: str | None, release: bool = True
    ) -> defer.Deferred[float]:
        if admission.local:
            return self.local.finish(admission, verdict, release)
        peer, user = admission.peer, admission.user
        refused = self.link.take()
        if refused is not None:
            return self._unavailable(refused, lambda: defer.succeed(self._finish_here(peer, user, verdict)))
        d: defer.Deferred[float] = defer.Deferred()
        self._queue(peer, user, f"f{'1' if release else '0'}{verdict or ''}", admission.token,
                    (self._finished, d, peer, user, verdict))
        return d

    def _finish_here(self, peer: str | None, user: str | None, verdict: str | None) -> float:
        # Fallen back: its reservation was in Redis (it expires there); the
        # verdict counts here.
        return self.local.finish_now(peer, user, verdict, release=False)

    def _finished(
        self, reply: Any, d: defer.Deferred[float], peer: str | None, user: str | None,
        verdict: str | None, at: int = 0,
    ) -> int:
        if isinstance(reply, Failure):
            self._unavailable(
                reply.value, lambda: defer.succeed(self._finish_here(peer, user, verdict))
            ).chainDeferred(d)
        else:
            delay = reply[at]
            d.callback(0.0 if delay == b"0" else _number(delay))
        return at + 1

    def _unavailable(self, reason: BaseException, local: Callable[[], defer.Deferred[Any]]) -> defer.Deferred[Any]:
        """The link's failure policy, as a Deferred already fired."""
        try:
            return self.link.unavailable(Failure(reason), local)
        except StateUnavailable as e:
            return defer.fail(e)


@implementer(ISessionLimits)
class RedisSessions:
    """
    L{ISessionLimits} on Redis: a ZSET of leases per (scope, key) whose
    scores are their expiries, renewed in batches while held (one script
    every C{renew_every} seconds for all of this process's leases).
    """

    lease_for = 30.0
    renew_every = 10.0
    #: Leases renewed per script.
    batch = 500

    def __init__(self, link: Link, local: LocalSessions, prefix: str = DEFAULT_PREFIX) -> None:
        self.link = link
        self.local = local
        self.prefix = prefix
        #: token -> the key of its set, for the leases this process holds.
        self.held: dict[str, str] = {}
        self._token = _Tokens()
        self._renewer = task.LoopingCall(self.renew)
        self._renewer.clock = link.reactor

    def acquire(self, scope: str, key: str, limit: int) -> defer.Deferred[Lease | None]:
        name = f"{self.prefix}s:{scope}:{state_digest(self.prefix, key)}"
        token = self._token()

        def answered(taken: Any) -> Lease | None:
            if not int(taken):
                return None
            self.held[token] = name
            if not self._renewer.running:
                self._renewer.start(self.renew_every, now=False)
            return Lease(lambda: self._release(token))

        return self.link.run(ACQUIRE, [name], (limit, token, self.lease_for)).addCallbacks(
            answered, self.link.unavailable,
            errbackArgs=(lambda: self.local.acquire(scope, key, limit),),
        )

    def _release(self, token: str) -> None:
        name = self.held.pop(token, None)
        if name is None:
            return
        if not self.held and self._renewer.running:
            self._renewer.stop()
        # Not waited for; unreachable, the lease expires by itself.
        self.link.command("ZREM", name, token).addErrback(lambda _: None)

    def renew(self) -> defer.Deferred[Any]:
        """Extend every lease held (the LoopingCall's step)."""
        held = list(self.held.items())
        batches = []
        for start in range(0, len(held), self.batch):
            chunk = held[start:start + self.batch]
            batches.append(self.link.run(
                RENEW, [name for _, name in chunk], (self.lease_for, *(t for t, _ in chunk))
            ).addErrback(lambda _: None))
        return defer.gatherResults(batches)

    def stop(self) -> None:
        if self._renewer.running:
            self._renewer.stop()


class StateService(service.MultiService):
    """The link and the session renewal, started and stopped with the gateway."""

    def __init__(self, link: Link, sessions: RedisSessions) -> None:
        super().__init__()
        self.link = link
        self.sessions = sessions
        link.setServiceParent(self)

    def stopService(self) -> Any:
        self.sessions.stop()
        return super().stopService()
