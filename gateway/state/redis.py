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
clocks agree; each step is one Lua script (EVALSHA, EVAL on NOSCRIPT), so
two instances cannot both take the last place. Attempts in flight and
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
import txredisapi
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


class _Protocol(txredisapi.RedisProtocol):  # type: ignore[misc,name-defined]
    """txredisapi's protocol (hiredis parser when installed) on the link's reactor."""

    def _build_command(self, *args: Any, **kwargs: Any) -> bytes:
        if len(args) == 1 and type(args[0]) is Encoded:
            return args[0]
        return super()._build_command(*args, **kwargs)

    def connectionLost(self, why: Failure) -> None:
        super().connectionLost(why)
        self.factory.link._lost(self, why)


class _Factory(protocol.Factory):
    def __init__(self, link: Link) -> None:
        self.link = link

    def buildProtocol(self, addr: Any) -> _Protocol:
        # No timer per command: the link's watchdog ends a connection whose
        # oldest reply is overdue (L{Link._watch}).
        p = _Protocol(charset=None, replyTimeout=None, convertNumbers=False)
        p.callLater = self.link.reactor.callLater  # not the global reactor
        p.factory = self
        return p


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
        self._starting: list[defer.Deferred[None]] | None = []
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
        replies = [p.execute_command(*c, apply_timeout=False) for c in commands]
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
        for d in starting or ():
            d.callback(None)
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
        return self.run_encoded(script, 1 + len(keys) + len(args), resp(len(keys), *keys, *args))

    def run_encoded(self, script: Script, count: int, body: bytes) -> defer.Deferred[Any]:
        """L{run} with the C{count} elements after the SHA (number of keys, keys, arguments) in RESP."""
        return self._send(Encoded(b"*%d\r\n%s%s" % (count + 2, script.evalsha, body)), script)

    def command(self, *args: Any) -> defer.Deferred[Any]:
        """Send one command; fails with L{Unreachable}."""
        return self._send(Encoded(b"*%d\r\n%s" % (len(args), resp(*args))), None)

    def _send(self, command: Encoded, script: Script | None) -> defer.Deferred[Any]:
        p = self._protocol
        if p is None and self.running and self._starting is not None and len(self._starting) < self.max_pending:
            # The first connection is under way (a worker just started):
            # wait for it rather than fail the logins of its first moments.
            started: defer.Deferred[None] = defer.Deferred()
            self._starting.append(started)
            return started.addCallback(lambda _: self._send(command, script))
        if p is None or self.pending >= self.max_pending:
            self.errors += 1
            return defer.fail(Unreachable("not connected" if p is None else "too many commands waiting"))
        self.pending += 1
        try:
            d = p.execute_command(command)
        except txredisapi.ConnectionError:
            self.pending -= 1
            self.errors += 1
            return defer.fail(Unreachable("not connected"))
        self._sent.append(self.reactor.seconds())
        if script is not None:
            d.addErrback(self._noscript, p, script, command)
        return d.addBoth(self._answered)

    def _noscript(self, reason: Failure, p: _Protocol, script: Script, command: Encoded) -> Any:
        """Redis lacks the script (restarted, flushed): load it, send the command again."""
        if reason.check(txredisapi.ResponseError) and str(reason.value).startswith("NOSCRIPT"):
            if p.connected:
                loaded = p.execute_command("SCRIPT", "LOAD", script.text)
                return loaded.addCallback(lambda _: p.execute_command(command))
        return reason

    def _answered(self, result: Any) -> Any:
        self.pending -= 1
        if self._sent:
            self._sent.popleft()
        if not isinstance(result, Failure):
            return result
        self.errors += 1
        if result.check(txredisapi.ResponseError):  # the link is up: a script's or Redis's error
            self.error_log.warn(
                log, "error", "state: {name} answered an error: {error}",
                name=self.name, error=_one_line(str(result.value)),
            )
        raise Unreachable(result.getErrorMessage())

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


#: KEYS: peer failures, peer in flight, pair failures, pair in flight, user
#: failures, known device. ARGV: has peer, has user, window, peer limit,
#: pair limit, user ceiling, delay, max delay, max user delay, token,
#: seconds in flight. Returns {0, retry, limit} (refused) or {1, wait, known}.
ADMIT = Script(_now() + """
local window = tonumber(ARGV[3])
local cutoff = now - window
local retry, by = 0, ''
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
if ARGV[1] == '1' then hard(KEYS[1], KEYS[2], tonumber(ARGV[4]), 'peer') end
if ARGV[2] == '1' then hard(KEYS[3], KEYS[4], tonumber(ARGV[5]), 'pair') end
if retry > 0 then return {0, tostring(retry), by} end
local wait, known = 0, 0
if ARGV[2] == '1' then
  known = redis.call('EXISTS', KEYS[6])
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', cutoff)
  local excess = redis.call('ZCARD', KEYS[5]) - tonumber(ARGV[6])
  local delay = tonumber(ARGV[7])
  if excess >= 0 and delay > 0 and known == 0 then
    wait = math.min(delay * 2 ^ excess, tonumber(ARGV[8]), tonumber(ARGV[9]))
  end
end
local ttl = tonumber(ARGV[11])
local ms = math.ceil(ttl * 1000)
local function reserve(i)
  redis.call('ZADD', i, now + ttl, ARGV[10])
  redis.call('PEXPIRE', i, ms)
end
if ARGV[1] == '1' then reserve(KEYS[2]) end
if ARGV[2] == '1' then reserve(KEYS[4]) end
return {1, tostring(wait), known}
""")

#: KEYS: as L{ADMIT}. ARGV: has peer, has user, release, verdict (empty,
#: success, failure, peer_failure), token, window, peer limit, pair limit,
#: user failures kept, delay, max delay, known for. Returns the delay.
FINISH = Script("""
if ARGV[3] == '1' then
  if ARGV[1] == '1' then redis.call('ZREM', KEYS[2], ARGV[5]) end
  if ARGV[2] == '1' then redis.call('ZREM', KEYS[4], ARGV[5]) end
end
local verdict = ARGV[4]
if verdict == '' then return '0' end
if verdict == 'success' then
  if ARGV[2] == '1' then
    redis.call('DEL', KEYS[3])
    redis.call('SET', KEYS[6], '1', 'PX', math.ceil(tonumber(ARGV[12]) * 1000))
  end
  return '0'
end
""" + _now() + """
local window = tonumber(ARGV[6])
local cutoff = now - window
local ms = math.ceil(window * 1000)
local counted = 0
local function add(f, keep, hard)
  redis.call('ZREMRANGEBYSCORE', f, '-inf', cutoff)
  redis.call('ZADD', f, now, ARGV[5])
  redis.call('ZREMRANGEBYRANK', f, 0, -(keep + 1))
  redis.call('PEXPIRE', f, ms)
  if hard then counted = math.max(counted, redis.call('ZCARD', f)) end
end
if ARGV[1] == '1' then add(KEYS[1], tonumber(ARGV[7]), true) end
if ARGV[2] == '1' then
  add(KEYS[3], tonumber(ARGV[8]), true)
  redis.call('DEL', KEYS[6])
  if verdict == 'failure' then add(KEYS[5], tonumber(ARGV[9]), false) end
end
local delay = tonumber(ARGV[10])
if counted == 0 or delay <= 0 then return '0' end
return tostring(math.min(delay * 2 ^ (counted - 1), tonumber(ARGV[11])))
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


def _number(value: Any) -> float:
    return float(value.decode() if isinstance(value, bytes) else value)


class _Tokens:
    """Names of reservations and leases: unique across processes, cheap to make."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(6) + ":"
        self._count = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._count)}"


#: L{FINISH}'s release flag and verdict, in RESP.
_VERDICTS = {
    (release, verdict): resp("1" if release else "0", verdict or "")
    for release in (True, False) for verdict in (None, SUCCESS, FAILURE, PEER_FAILURE)
}


@implementer(IThrottle)
class RedisThrottle:
    """
    L{IThrottle} on Redis, with the semantics of L{Throttle} (whose limits
    it takes, and which it falls back to under C{--state-failure local}):
    one script to admit an attempt (check and reserve), one to finish it
    (release and record).
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
        self._in_flight: tuple[float, bytes] = (-1.0, b"")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("max_") or name in ("window", "delay", "known_for"):
            return getattr(self.local, name)  # the limits are the local throttle's
        raise AttributeError(name)

    @property
    def delayed(self) -> int:
        return self._delayed + self.local.delayed

    def _make_keys(self, peer: str | None, user: str | None) -> bytes:
        """The number of keys, the keys and the two flags (has peer, has user) in RESP."""
        p = self.prefix
        address = peer_key(peer)
        pair = account = ""
        if user:
            name = _fold(user)
            pair = state_digest(p, name, address or "")
            account = state_digest(p, name)
        return resp(
            6, f"{p}f:peer:{address}", f"{p}i:peer:{address}", f"{p}f:pair:{pair}",
            f"{p}i:pair:{pair}", f"{p}f:user:{account}", f"{p}k:{pair}",
            "1" if address is not None else "0", "1" if user else "0",
        )

    @functools.cached_property
    def _admit_limits(self) -> bytes:
        local = self.local
        return resp(local.window, local.max_peer_failures, local.max_failures,
                    local.max_user_failures, local.delay, local.max_delay, local.max_user_delay)

    @functools.cached_property
    def _finish_limits(self) -> bytes:
        local = self.local
        return resp(local.window, local.max_peer_failures, local.max_failures,
                    local.max_user_failures + 32, local.delay, local.max_delay, local.known_for)

    def admit(self, peer: str | None, user: str | None) -> defer.Deferred[Admission]:
        local = self.local
        token = self._token()
        if self._in_flight[0] != self.in_flight_for:
            self._in_flight = (self.in_flight_for, resp(self.in_flight_for))
        tok = token.encode()
        d = self.link.run_encoded(ADMIT, 1 + 6 + 11, b"%s%s$%d\r\n%s\r\n%s" % (
            self._keys(peer, user), self._admit_limits, len(tok), tok, self._in_flight[1],
        ))
        if d.called:  # not sent: the failure policy, without a Deferred more
            return d.addCallbacks(
                self._admitted, self.link.unavailable, callbackArgs=(peer, user, token),
                errbackArgs=(lambda: local.admit(peer, user),),
            )
        outcome: defer.Deferred[Admission] = defer.Deferred()

        def answered(result: Any) -> None:
            if outcome.called:
                # The caller left while the script ran: hanging up must not
                # be a free retry (as L{ThrottlingChecker} counts it).
                if isinstance(result, Admission):
                    self.finish(result, PEER_FAILURE).addErrback(lambda _: None)
                return  # (a failure: nobody to tell)
            if isinstance(result, Failure):
                outcome.errback(result)
            else:
                outcome.callback(result)

        d.addCallbacks(
            self._admitted, self.link.unavailable, callbackArgs=(peer, user, token),
            errbackArgs=(lambda: local.admit(peer, user),),
        ).addBoth(answered)
        return outcome

    def _admitted(self, reply: Any, peer: str | None, user: str | None, token: str) -> Admission:
        ok, number, third = reply
        if not int(ok):
            by = third.decode() if isinstance(third, bytes) else str(third)
            self.refused[by] += 1
            refused = Throttled(_number(number))
            refused.log_suppressed = self.refusal_log.admit(peer_key(peer))
            raise refused
        wait = _number(number)
        if wait:
            self._delayed += 1
        known = Throttle.lane_keys(peer, user) if int(third) else None
        return Admission(peer, user, wait, known, token, local=False)

    def finish(
        self, admission: Admission, verdict: str | None, release: bool = True
    ) -> defer.Deferred[float]:
        if admission.local:
            return self.local.finish(admission, verdict, release)
        peer, user = admission.peer, admission.user
        local = self.local
        tok = admission.token.encode()
        d = self.link.run_encoded(FINISH, 1 + 6 + 12, b"%s%s$%d\r\n%s\r\n%s" % (
            self._keys(peer, user), _VERDICTS[release, verdict], len(tok), tok,
            self._finish_limits,
        ))
        # Fallen back: its reservation was in Redis (it expires there); the
        # verdict counts here.
        return d.addCallbacks(_number, self.link.unavailable, errbackArgs=(
            lambda: local.finish_now(peer, user, verdict, release=False),
        ))


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
