# -*- test-case-name: tests.test_pipeline -*-
"""
The verification pipeline every front door shares:

    throttle  ->  checkers  ->  cache  ->  hash in a bounded thread pool

L{ThrottlingChecker} refuses a throttled peer or (user, peer) pair before
any checker runs, holds back attempts for a much-guessed user (for at most
C{max_user_delay}) and delays every failure; L{Verifier} runs password-hash
verifications in a L{HashPool} (never on the reactor thread, each peer and
network within its share of the queue, with places kept for known devices),
caches successes and lets concurrent identical checks share one verification.

A L{TemporaryFailure} is not a wrong password: the front doors answer it with
454 4.7.0 (SMTP), 503 or 429 (HTTP) or close (SOCKS).
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import hmac
import ipaddress
import re
import secrets
import threading
import time
import unicodedata
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from twisted.application import service
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer

from gateway.meta import network_of, normalize_ip
from gateway.ratelog import LogRateLimiter

_T = TypeVar("_T")



class TemporaryFailure(Exception):
    """The check could not be done now; the client may try again later."""

    #: How many refusals like this one went unlogged before it; C{None}: do
    #: not log this one (a flood a L{LogRateLimiter} is keeping out of the log).
    log_suppressed: int | None = 0


class AuthBackendError(TemporaryFailure):
    """A checker failed (an outage, a bug); its details went to the log only."""

    def __init__(self) -> None:
        super().__init__("the authentication backend failed")


class PoolFull(TemporaryFailure):
    """Too many hash verifications are already waiting for a thread."""

    def __init__(self) -> None:
        super().__init__("password verification queue is full")


class PeerShareFull(PoolFull):
    """
    This peer (IPv4 address, IPv6 /64) already has its share of the hash
    queue: its own doing, so counted against the peer and pair, as a failure
    would be.
    """

    def __init__(self) -> None:
        TemporaryFailure.__init__(self, "this address's share of the verification queue is full")


class NetworkShareFull(PoolFull):
    """
    This peer's network (IPv4 /24, IPv6 /48) already has its share of the
    hash queue. Other addresses' load, not this peer's: never counted
    against the peer or its pair (a neighbour must not lock a user out).
    """

    def __init__(self) -> None:
        TemporaryFailure.__init__(self, "this network's share of the verification queue is full")


class Attempt:
    """
    A login whose checkers are running, as the hash pool sees it: whose it
    is, and the verifications it has queued or running, so that an attempt
    its client abandons is judged by its verdict (see L{ThrottlingChecker}).

    @ivar peer: the client's address.
    @ivar known: C{None} for a stranger; for a known device, the (pair,
        account) counter keys its places in the reserve are counted under.
    """

    __slots__ = ("peer", "known", "running", "_wrong", "_waiters")

    def __init__(self, peer: str | None, known: tuple[Any, Any] | None = None) -> None:
        self.peer = peer
        self.known = known
        #: Verifications queued or running for it.
        self.running = 0
        self._wrong = False
        self._waiters: list[defer.Deferred[bool]] = []

    def started(self) -> None:
        self.running += 1

    def settled(self, result: Any) -> None:
        """One of its verifications ended with C{result} (C{False}: a wrong password)."""
        self.running -= 1
        self._wrong = self._wrong or result is False
        if self.running <= 0:
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(self._wrong)

    def wrong(self) -> defer.Deferred[bool]:
        """
        Fires when its verifications have ended: whether one found a wrong
        password (an error, or a job dropped unrun, is not one).
        """
        if self.running <= 0:
            return defer.succeed(self._wrong)
        d: defer.Deferred[bool] = defer.Deferred()
        self._waiters.append(d)
        return d


#: The attempt whose checkers are running, set by L{ThrottlingChecker}
#: around its checkers, read by L{HashPool.run}.
current_attempt: contextvars.ContextVar[Attempt | None] = contextvars.ContextVar(
    "current_attempt", default=None
)


class Throttled(TemporaryFailure):
    """Too many recent failures from this peer, or for this user from this peer."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"too many failed logins; retry in {retry_after:.0f}s")
        #: Seconds until the oldest counted failure leaves the window.
        self.retry_after = retry_after


class Reject(UnauthorizedLogin):
    """
    A checker's own answer to a failed login (the Halon seed's Reject): the
    front door replies with exactly this code, enhanced code and text, and
    closes the connection when C{disconnect} is set. It counts as a failure
    and stops the checker chain. The text goes to the client: no secrets.
    """

    def __init__(
        self, code: int = 535, enhanced: str = "5.7.8", text: str = "Authentication failed",
        disconnect: bool = False,
    ) -> None:
        if not (400 <= code <= 599) or not re.fullmatch(r"[45]\.\d{1,3}\.\d{1,3}", enhanced):
            raise ValueError("a rejection needs a 4xx/5xx code and an enhanced code like 5.7.8")
        if str(code)[0] != enhanced[0] or any(c in text for c in "\r\n"):
            raise ValueError("code and enhanced code must agree; the text is one line")
        super().__init__(text)
        self.code = code
        self.enhanced = enhanced
        self.text = text
        self.disconnect = disconnect


class IHashingChecker(Interface):
    """A checker whose verifications the service routes through its L{Verifier}."""

    def use_verifier(verifier: Verifier) -> None:
        """Verify hashes through C{verifier} from now on."""


class ShuttingDown(TemporaryFailure):
    """The gateway is stopping; queued verifications are dropped, not run."""

    def __init__(self) -> None:
        super().__init__("the gateway is shutting down")


class HashPool(service.Service):
    """
    A thread pool for blocking hash verifications, started and stopped with
    the service, with a bound on the verifications waiting for a thread.

    @param threads: worker threads (bcrypt, argon2 and SHA-crypt release the
        GIL, so one per core pays).
    @param max_pending: verifications queued or running before L{run}
        answers L{PoolFull} at once instead of adding latency.
    @param threadpool: run in this pool instead of one of our own (which is
        then neither started nor stopped by us).
    @param max_pending_per_peer: verifications one peer (IPv4 address, IPv6
        /64) may have queued or running; past it, L{PeerShareFull}.
    @param max_pending_per_network: the same for its network (IPv4 /24, IPv6
        /48): many addresses of one network are still one share.
    @param known_reserve: slots only known devices (a peer with a recent
        success for the user it names) may take: returning users are served
        while strangers fill the rest. A known device's verification takes
        the I{known lane} (the whole queue, not held to the peer and network
        shares, nor counted in them) only while its (user, peer) pair has no
        other one there and its account has fewer than C{known_per_account}
        there: one account (an attacker's own, used from many addresses)
        cannot hold the reserve. Past that it is a stranger's. The right
        password needs no second place: identical checks share one
        verification and successes are cached (an MTA fleet behind one
        address).

    The shares apply to verifications started by a L{ThrottlingChecker}
    (which says whose they are, see L{current_attempt}); others (a checker
    under another plugin, one that first waited for a reload) have no share
    but are strangers': the reserve stays free. Small pools keep their shares
    coherent: the reserve is at most a quarter of C{max_pending}.

    File reloads (L{load}) have a thread of their own, outside the bound:
    a queue full of hashes must neither delay nor refuse them.
    """

    name = "hash-pool"

    def __init__(
        self,
        reactor: Any,
        threads: int = 2,
        max_pending: int = 64,
        threadpool: ThreadPool | None = None,
        max_pending_per_peer: int = 2,
        max_pending_per_network: int = 8,
        known_reserve: int = 16,
    ) -> None:
        if (
            threads < 1 or max_pending < 1 or max_pending_per_peer < 1
            or max_pending_per_network < 1 or known_reserve < 0
        ):
            raise ValueError("a hash pool needs at least one thread and one slot")
        self.reactor = reactor
        self.max_pending = max_pending
        self.known_reserve = min(known_reserve, max_pending // 4)
        #: Known-lane places one account may hold at once: a quarter of the reserve.
        self.known_per_account = max(1, self.known_reserve // 4)
        self.max_pending_per_peer = max_pending_per_peer
        self.max_pending_per_network = max(max_pending_per_network, max_pending_per_peer)
        self.pending = 0
        #: Verifications queued or running per peer key and per network key.
        self._by_peer: Counter[str] = Counter()
        self._by_network: Counter[str] = Counter()
        #: Known-lane verifications per (user, peer) pair and per account.
        self._known_by_pair: Counter[Any] = Counter()
        self._known_by_account: Counter[Any] = Counter()
        self._own = threadpool is None
        self._stopping = False
        if threadpool is None:
            threadpool = _daemon_pool(threads, "authgateway-hash")
            loader = _daemon_pool(1, "authgateway-load")
        else:
            loader = threadpool
        self.threadpool = threadpool
        #: The one thread reading and parsing changed password and token files.
        self.loader = loader
        #: A full queue under a flood is logged once a minute, not per login.
        self.full_log = LogRateLimiter(reactor)

    @classmethod
    def shared(cls, max_pending: int = 64) -> HashPool:
        """
        A bounded pool on the global reactor's thread pool: what a hashing
        checker uses when no service gave it one (for instance
        C{--auth htpasswd:} under another twistd plugin).
        """
        from twisted.internet import reactor

        return cls(reactor, max_pending=max_pending, threadpool=reactor.getThreadPool())

    def run(self, f: Callable[..., _T], *args: Any) -> defer.Deferred[_T]:
        """
        Run C{f(*args)} in a hash thread, or fail at once with L{PoolFull}
        (the queue, or its part for strangers, is full), L{PeerShareFull}
        (the attempt's peer has its share already) or L{NetworkShareFull}
        (its network has).
        """
        if self._stopping:
            return defer.fail(ShuttingDown())
        attempt = current_attempt.get()
        peer, known = (attempt.peer, attempt.known) if attempt is not None else (None, None)
        keys = network_keys(peer) if attempt is not None else ()
        lane = None
        if known is not None:
            pair, account = known
            if (
                not self._known_by_pair[pair]
                and self._known_by_account[account] < self.known_per_account
            ):
                lane = known
        limit = self.max_pending if lane else self.max_pending - self.known_reserve
        if self.pending >= limit:
            full = PoolFull()
            full.log_suppressed = self.full_log.admit("full")
            return defer.fail(full)
        if keys and lane is None:
            share: PoolFull | None = None
            if self._by_peer[keys[0]] >= self.max_pending_per_peer:
                share = PeerShareFull()
            elif self._by_network[keys[1]] >= self.max_pending_per_network:
                share = NetworkShareFull()
            if share is not None:
                share.log_suppressed = self.full_log.admit(("share", keys[1]))
                return defer.fail(share)
        self.pending += 1
        if attempt is not None:
            attempt.started()
        # A known-lane job is counted in its pair's and account's places
        # only: strangers of its network must not be refused for it.
        if lane is not None:
            self._known_by_pair[lane[0]] += 1
            self._known_by_account[lane[1]] += 1
        elif keys:
            self._by_peer[keys[0]] += 1
            self._by_network[keys[1]] += 1
        cancelled: list[Any] = []

        def job() -> _T:
            if self._stopping:  # queued when the service stopped: drop it
                raise ShuttingDown()
            if cancelled:  # its caller left before a thread took it
                raise defer.CancelledError()
            return f(*args)

        # Cancelling answers the caller at once, but the slot stays taken
        # until the thread is done with the job: a client that hangs up
        # cannot free the bound while the hash still runs.
        outcome: defer.Deferred[_T] = defer.Deferred(canceller=cancelled.append)

        def done(result: Any) -> None:
            self.pending -= 1
            if lane is not None:
                _decrement(self._known_by_pair, lane[0])
                _decrement(self._known_by_account, lane[1])
            elif keys:
                _decrement(self._by_peer, keys[0])
                _decrement(self._by_network, keys[1])
            if attempt is not None:
                attempt.settled(result)
            if not outcome.called:
                outcome.callback(result)  # a Failure errbacks

        deferToThreadPool(self.reactor, self.threadpool, job).addBoth(done)
        return outcome

    def load(self, f: Callable[..., _T], *args: Any) -> defer.Deferred[_T]:
        """
        Run a file reload in the reload thread: never counted against
        C{max_pending}, never queued behind hashes.
        """
        if self._stopping:
            return defer.fail(ShuttingDown())
        return deferToThreadPool(self.reactor, self.loader, f, *args)

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        if self._own:
            self.threadpool.start()
            self.loader.start()

    def stopService(self) -> None:
        super().stopService()
        self._stopping = True
        if self._own:
            # Waits only for the hashes (and the reload) already running;
            # queued jobs are dropped.
            self.threadpool.stop()
            self.loader.stop()


def _decrement(counter: Counter[Any], key: Any) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


def _daemon_pool(threads: int, name: str) -> ThreadPool:
    pool = ThreadPool(minthreads=threads, maxthreads=threads, name=name)
    # Hashing and reading keep no state worth waiting for: a pool that was
    # never stopped (a failed start) must not hold the process open.
    pool.threadFactory = functools.partial(threading.Thread, daemon=True)
    return pool


class InlinePool:
    """Runs verifications in the caller's thread: for unit tests only."""

    def run(self, f: Callable[..., _T], *args: Any) -> defer.Deferred[_T]:
        return defer.maybeDeferred(f, *args)


def _length_prefixed(*parts: str) -> bytes:
    out = bytearray()
    for part in parts:
        data = part.encode("utf-8", "surrogatepass")
        out += len(data).to_bytes(8, "big") + data
    return bytes(out)


class Verifier:
    """
    Verify passwords against stored hashes through a pool, with a cache.

    Successes are cached for C{ttl} seconds under HMAC(per-process random key,
    length-prefixed user, password, stored hash): the key is unambiguous, and a
    password change (a new stored hash) misses by construction. Failures are
    not cached. Concurrent identical verifications share one pool job; each
    caller gets its own Deferred, so one caller cancelling does not cancel
    the others.

    A verification may bring I{decoys}: hashes checked in the same pool job
    after the real one, their verdicts ignored, so that every login of a
    store does the same work whoever it names (see L{HtpasswdChecker}).

    @param verify: C{verify(password, stored) -> bool}, blocking.
    """

    def __init__(
        self,
        verify: Callable[[str, str], bool],
        pool: Any = None,
        clock: IReactorTime | None = None,
        ttl: float = 300.0,
        max_entries: int = 10000,
    ) -> None:
        self._verify = verify
        self.pool = pool if pool is not None else InlinePool()
        self.clock = clock if clock is not None else _MONOTONIC
        self.ttl = ttl
        self.max_entries = max_entries
        self._key = secrets.token_bytes(32)
        self._cache: OrderedDict[bytes, float] = OrderedDict()
        self._inflight: dict[bytes, list[defer.Deferred[bool]]] = {}
        self.hits = self.misses = self.coalesced = 0

    def __repr__(self) -> str:
        return f"<Verifier cached={len(self._cache)} inflight={len(self._inflight)}>"

    def _cache_key(self, user: str, password: str, stored: str) -> bytes:
        return hmac.new(self._key, _length_prefixed(user, password, stored), hashlib.sha256).digest()

    def verify(
        self, user: str, password: str, stored: str, decoys: Sequence[str] = ()
    ) -> defer.Deferred[bool]:
        """
        Whether C{password} matches C{stored}, after also checking it against
        each of C{decoys} (whose verdicts are ignored) in the same pool job.
        """
        key = self._cache_key(user, password, stored)
        now = self.clock.seconds()
        expires = self._cache.get(key)
        if expires is not None:
            if expires > now:
                self._cache.move_to_end(key)
                self.hits += 1
                return defer.succeed(True)
            del self._cache[key]
        mine: defer.Deferred[bool] = defer.Deferred()
        waiters = self._inflight.get(key)
        if waiters is not None:
            self.coalesced += 1
            waiters.append(mine)
        else:
            self.misses += 1
            self._inflight[key] = [mine]
            job = self.pool.run(self._verify_with_decoys, password, stored, tuple(decoys))
            job.addBoth(self._settled, key)
        return mine

    def _verify_with_decoys(self, password: str, stored: str, decoys: tuple[str, ...]) -> bool:
        """Blocking: the verdict on C{stored}; the decoys only cost their time."""
        verdict = self._verify(password, stored)
        for decoy in decoys:
            try:
                self._verify(password, decoy)
            except Exception:  # a decoy's problem is not the login's
                pass
        return verdict

    def _settled(self, result: Any, key: bytes) -> None:
        waiters = self._inflight.pop(key)
        if result is True and self.ttl > 0:
            self._cache[key] = self.clock.seconds() + self.ttl
            self._cache.move_to_end(key)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        for d in waiters:
            if not d.called:  # a caller may have cancelled its wait
                if isinstance(result, Failure):
                    d.errback(result)
                else:
                    d.callback(result)

    def clear(self) -> None:
        self._cache.clear()


class _Monotonic:
    """The clock used when none is injected (a checker outside the service)."""

    seconds = staticmethod(time.monotonic)


_MONOTONIC = _Monotonic()


@functools.lru_cache(maxsize=4096)
def peer_key(address: str | None) -> str | None:
    """
    The throttling key of a peer address: the address itself for IPv4 (also
    when IPv4-mapped, as on a dual-stack listener), its /64 for IPv6 (one
    host usually owns a whole /64; the scope is dropped).
    """
    if not address:
        return None
    try:
        ip = ipaddress.ip_address(normalize_ip(address) or "")
    except ValueError:
        return address
    if ip.version == 6:
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@functools.lru_cache(maxsize=4096)
def network_keys(address: str | None) -> tuple[str, str]:
    """
    The keys of a peer's shares: its own (L{peer_key}: the IPv4 address, the
    IPv6 /64) and its network's (the IPv4 /24, the IPv6 /48). A peer without
    an address (a UNIX socket) is one peer, "?".
    """
    own = peer_key(address) or "?"
    return own, network_of(address) or own


_Key = tuple[str, Any]

#: Keys the user-name digests: names are not kept, and not guessable from a memory dump.
_DIGEST_KEY = secrets.token_bytes(32)


def _digest(*parts: str) -> bytes:
    return hashlib.blake2b(_length_prefixed(*parts), digest_size=16, key=_DIGEST_KEY).digest()


def _fold(user: str) -> str:
    """
    One counter for every spelling a checker might take for the same user
    (case, Unicode compatibility forms, surrounding spaces): counting two
    users as one only costs delays, counting one as two would double a
    guesser's attempts.
    """
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", user).casefold()).strip()


class Throttle:
    """
    Failed logins counted in a sliding window of C{window} seconds, so that
    a guesser can deny only itself:

      - per peer (IPv6 by /64) and per (user, peer) pair, hard limits: once
        the failures plus the attempts still being checked reach
        C{max_peer_failures} (peer) or C{max_failures} (pair), further
        attempts are refused (L{Throttled}) until the oldest failure leaves
        the window; concurrent guesses count as much as sequential ones.
      - per user across all peers, a soft ceiling: once C{max_user_failures}
        failures for one user are in the window, every attempt for that user
        waits before it is checked (C{delay}, doubling with each further
        failure, up to C{max_user_delay}), whatever the password: distributed
        guessing slows down, the right password still gets in. Peers that
        logged in as that user within C{known_for} seconds ("known devices")
        do not wait. The wait has a cap of its own, well below every front
        door's deadline (SOCKS negotiation 10 s, HTTP clients' own timeouts):
        a wait that outlasted them would deny the user it exists to let in.

    Each failure is answered after a delay that starts at C{delay} and
    doubles with every failure counted for its peer or pair, up to
    C{max_delay} (as Dovecot does). A success clears its pair's failures
    but not its peer's count (else wrong x4 + right from an account the
    guesser owns would cycle forever), and makes the peer a known device of
    the user until C{known_for} seconds pass or the pair's next failure (a
    wrong password from a known device is no longer one's). At most
    C{max_keys} counters and known devices are remembered each; the least
    recently used go first. The counters keep user names only as keyed
    digests.

    The class attributes are the defaults (C{twistd authgateway} takes its
    option defaults from them).
    """

    max_failures = 5
    max_peer_failures = 10
    max_user_failures = 20
    window = 60.0
    delay = 0.5
    max_delay = 15.0
    #: Cap of the user ceiling's wait before a check (the right password waits it too).
    max_user_delay = 3.0
    max_keys = 100_000
    #: Seconds a peer stays a known device of a user after a successful login.
    known_for = 7 * 24 * 3600.0

    def __init__(
        self,
        clock: IReactorTime,
        max_failures: int = max_failures,
        window: float = window,
        delay: float = delay,
        max_delay: float = max_delay,
        max_keys: int = max_keys,
        max_peer_failures: int = max_peer_failures,
        max_user_failures: int = max_user_failures,
        max_user_delay: float = max_user_delay,
    ) -> None:
        if (
            max_failures < 1 or max_peer_failures < 1 or max_user_failures < 1
            or window <= 0 or delay < 0 or max_delay < delay or max_keys < 1
            or max_user_delay < 0
        ):
            raise ValueError("throttle limits must be positive, with max_delay >= delay")
        # The peer and user limits are never below the pair's (a caller that
        # raises max_failures alone keeps a coherent throttle).
        max_peer_failures = max(max_peer_failures, max_failures)
        max_user_failures = max(max_user_failures, max_failures)
        self.clock = clock
        self.max_failures = max_failures
        self.max_peer_failures = max_peer_failures
        self.max_user_failures = max_user_failures
        self.window = window
        self.delay = delay
        self.max_delay = max_delay
        self.max_user_delay = max_user_delay
        self.max_keys = max_keys
        self._limits = {"peer": max_peer_failures, "pair": max_failures}
        #: Failure times per key.
        self._windows: OrderedDict[_Key, deque[Any]] = OrderedDict()
        self._inflight: dict[_Key, int] = {}
        #: Pair key -> when it stops being a known device.
        self._known: OrderedDict[_Key, float] = OrderedDict()
        #: Refusals are logged once a minute per peer, not per attempt.
        self.refusal_log = LogRateLimiter(clock, max_keys=min(max_keys, 10_000))

    @staticmethod
    @functools.lru_cache(maxsize=4096)  # asked several times per login
    def keys_for(peer: str | None, user: str | None) -> tuple[_Key, ...]:
        """
        The counters of an attempt: C{("peer", key)}, C{("pair", digest)},
        C{("user", digest)}, each present when its parts are known. Without a
        peer address (a UNIX socket) every client counts as one peer.
        """
        keys: list[_Key] = []
        peer = peer_key(peer)
        if peer is not None:
            keys.append(("peer", peer))
        if user:
            name = _fold(user)
            keys.append(("pair", _digest(name, peer or "")))
            keys.append(("user", _digest(name)))
        return tuple(keys)

    def _recent(self, key: _Key, now: float) -> deque[Any]:
        failures = self._windows.get(key)
        if failures is None:
            return deque()
        cutoff = now - self.window
        while failures and failures[0] <= cutoff:
            failures.popleft()
        if not failures:
            del self._windows[key]
        return failures

    def check(self, peer: str | None, user: str | None) -> float:
        """
        Whether an attempt may be checked now.

        @return: seconds to wait before checking it (the user's ceiling).
        @raise Throttled: when the peer or the (user, peer) pair has used up
            its attempts.
        """
        now = self.clock.seconds()
        retry = 0.0
        wait = 0.0
        keys = self.keys_for(peer, user)
        for key in keys:
            failures = self._recent(key, now)
            limit = self._limits.get(key[0])
            if limit is None:  # the user: a ceiling that delays, never refuses
                excess = len(failures) - self.max_user_failures
                if excess >= 0 and self.delay and not self._is_known(keys, now):
                    wait = min(self.delay * 2 ** excess, self.max_delay, self.max_user_delay)
            elif len(failures) >= limit:
                retry = max(retry, failures[0] + self.window - now)
            elif len(failures) + self._inflight.get(key, 0) >= limit:
                retry = max(retry, 1.0)  # until one of the attempts in flight ends
        if retry > 0:
            refused = Throttled(retry)
            refused.log_suppressed = self.refusal_log.admit(peer_key(peer))
            raise refused
        return wait

    def is_known(self, peer: str | None, user: str | None) -> bool:
        """Whether C{peer} logged in as C{user} within C{known_for} seconds (a known device)."""
        return self._is_known(self.keys_for(peer, user), self.clock.seconds())

    def known_keys(self, peer: str | None, user: str | None) -> tuple[_Key, _Key] | None:
        """
        For a known device, the (pair, account) keys its verifications are
        counted under in the hash queue's reserve; C{None} for a stranger.
        """
        keys = self.keys_for(peer, user)
        if not self._is_known(keys, self.clock.seconds()):
            return None
        pair = next(key for key in keys if key[0] == "pair")
        account = next(key for key in keys if key[0] == "user")
        return pair, account

    def _is_known(self, keys: tuple[_Key, ...], now: float) -> bool:
        for key in keys:
            if key[0] == "pair":
                until = self._known.get(key)
                if until is not None and until > now:
                    return True
        return False

    def reserve(self, peer: str | None, user: str | None) -> None:
        """Count an attempt against its peer and pair as in flight until L{release}."""
        for key in self.keys_for(peer, user):
            if key[0] != "user":  # others' attempts in flight must not refuse a user
                self._inflight[key] = self._inflight.get(key, 0) + 1

    def release(self, peer: str | None, user: str | None) -> None:
        for key in self.keys_for(peer, user):
            if key[0] != "user":
                left = self._inflight.pop(key, 1) - 1
                if left > 0:
                    self._inflight[key] = left

    def failed(self, peer: str | None, user: str | None, across_peers: bool = True) -> float:
        """
        Count a failure; return how long to wait before answering it.

        @param across_peers: count it for the user across peers too; not for
            an attempt its client abandoned (or one over its peer's share of
            the hash queue): those are the peer's doing, and must not bring
            the user's ceiling closer for everyone else.
        """
        now = self.clock.seconds()
        keys = self.keys_for(peer, user)
        counted = 0
        for key in keys:
            if key[0] == "user" and not across_peers:
                continue
            failures = self._recent(key, now)
            if key not in self._windows:
                size = self._limits.get(key[0], self.max_user_failures + 32)
                failures = self._windows[key] = deque(maxlen=size)
            failures.append(now)
            self._windows.move_to_end(key)
            if key[0] == "pair":
                # A failure ends known-device status until the next success:
                # a pair that knew the password once does not keep the
                # reserve (and the skipped shares) for guessing.
                self._known.pop(key, None)
            if key[0] != "user":  # the user's ceiling delays before the check instead
                counted = max(counted, len(failures))
        while len(self._windows) > self.max_keys:
            self._windows.popitem(last=False)
        if not counted or not self.delay:
            return 0.0
        return min(self.delay * 2 ** (counted - 1), self.max_delay)

    def succeeded(self, peer: str | None, user: str | None) -> None:
        """
        A correct password: the pair's failures are forgiven and the peer
        becomes a known device of the user. The peer's count stays (a success
        costs no hashing when cached: forgiving the peer would let a guesser
        with an account of its own cycle wrong x4 + right forever), and so
        does the user's (it is what slows a distributed guesser down).
        """
        keys = self.keys_for(peer, user)
        pair = next((key for key in keys if key[0] == "pair"), None)
        if pair is None:
            return
        self._windows.pop(pair, None)
        self._known[pair] = self.clock.seconds() + self.known_for
        self._known.move_to_end(pair)
        while len(self._known) > self.max_keys:
            self._known.popitem(last=False)


def _claimed_user(credentials: Any) -> str | None:
    user = getattr(credentials, "claimed_identity", None) or getattr(credentials, "username", None)
    if isinstance(user, bytes):
        user = user.decode("utf-8", "replace")
    return user if isinstance(user, str) else None


@implementer(ICredentialsChecker)
class ThrottlingChecker:
    """
    The first stage of every login: refuse throttled peers and pairs before
    any checker (and so any hashing) runs; hold back attempts for a user past
    its ceiling before checking them; count failures and answer each one only
    after the throttle's growing delay. A success is never delayed after its
    check.
    """

    def __init__(self, checker: ICredentialsChecker, throttle: Throttle) -> None:
        self.checker = checker
        self.throttle = throttle

    @property
    def credentialInterfaces(self) -> tuple[Any, ...]:
        return tuple(self.checker.credentialInterfaces)

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[Any]:
        meta = getattr(credentials, "conn_meta", None)
        peer = getattr(meta, "peer_address", None)
        user = _claimed_user(credentials)
        try:
            wait = self.throttle.check(peer, user)
        except Throttled as e:
            return defer.fail(e)
        # Held until the answer: waiting attempts count against the peer too.
        self.throttle.reserve(peer, user)
        attempt = Attempt(peer)

        def succeeded(result: Any) -> Any:
            self.throttle.release(peer, user)
            self.throttle.succeeded(peer, user)
            return result

        def failed(reason: Failure) -> Any:
            self.throttle.release(peer, user)
            if reason.check(defer.CancelledError) and attempt.running:
                # Abandoned while its verification waited in the hash queue
                # (perhaps behind others' load) or ran: the verdict decides.
                # A wrong password is charged to its peer and pair when the
                # hash says so; the right one (its client gave up waiting)
                # is not: a slow queue is others' doing.
                def judged(wrong: bool) -> None:
                    if wrong:
                        self.throttle.failed(peer, user, across_peers=False)

                attempt.wrong().addCallback(judged)
                return reason
            if reason.check(defer.CancelledError, PeerShareFull):
                # The client left (or a front door's timer ended it) while the
                # attempt waited or was checked: without counting it, hanging
                # up would be a free retry; a peer over its own share of the
                # hash queue would retry at will. Its peer and pair pay, not
                # the user. A refusal caused by others' load (its network's
                # share, a full queue: NetworkShareFull, PoolFull) is never
                # counted: a neighbour must not lock a user out.
                self.throttle.failed(peer, user, across_peers=False)
                return reason
            if not reason.check(UnauthorizedLogin):
                return reason
            delay = self.throttle.failed(peer, user)
            if not delay:
                return reason
            return task.deferLater(self.throttle.clock, delay, reason.raiseException)

        def check() -> defer.Deferred[Any]:
            # The hash pool gives each peer a share, and known devices a reserve.
            attempt.known = self.throttle.known_keys(peer, user)
            token = current_attempt.set(attempt)
            try:
                return defer.maybeDeferred(self.checker.requestAvatarId, credentials)
            finally:
                current_attempt.reset(token)

        if wait:
            # Before the check, whatever the password: an answer that came
            # sooner for the right one would tell it.
            d = task.deferLater(self.throttle.clock, wait, check)
        else:
            d = check()
        return d.addCallbacks(succeeded, failed)
