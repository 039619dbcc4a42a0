# -*- test-case-name: tests.test_hashing -*-
"""
Password-hash verification off the reactor thread: L{Verifier} runs
verifications in a L{HashPool} (never on the reactor thread, each peer and
network within its share of the queue, with places kept for known devices),
caches successes and lets concurrent identical checks share one
verification. L{current_attempt} tells the pool whose login a verification
belongs to (set by L{gateway.checkers.throttle.ThrottlingChecker}).
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import hmac
import secrets
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface

from gateway.addresses import network_keys
from gateway.clock import MONOTONIC
from gateway.errors import NetworkShareFull, PeerShareFull, PoolFull, ShuttingDown
from gateway.tally import LATENCY_BUCKETS, Tally
from gateway.ratelog import LogRateLimiter

_T = TypeVar("_T")


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


class IHashingChecker(Interface):
    """A checker whose verifications the service routes through its L{Verifier}."""

    def use_verifier(verifier: Verifier) -> None:
        """Verify hashes through C{verifier} from now on."""


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
    given this pool outside the gateway's portal, one that first waited for
    a reload) have no share
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
        #: L{abandon}: the stop does not join the threads.
        self._abandoned = False
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
        #: For the metrics: seconds each job spent in its thread, and the jobs
        #: refused (C{full}, C{peer_share}, C{network_share}, C{stopping}).
        self.timings = Tally(LATENCY_BUCKETS)
        self.refused: Counter[str] = Counter()

    def run(self, f: Callable[..., _T], *args: Any) -> defer.Deferred[_T]:
        """
        Run C{f(*args)} in a hash thread, or fail at once with L{PoolFull}
        (the queue, or its part for strangers, is full), L{PeerShareFull}
        (the attempt's peer has its share already) or L{NetworkShareFull}
        (its network has).
        """
        if self._stopping:
            self.refused["stopping"] += 1
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
            self.refused["full"] += 1
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
                self.refused["peer_share" if isinstance(share, PeerShareFull) else "network_share"] += 1
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
        took: list[float] = []  # written by the thread before its result reaches done()

        def job() -> _T:
            if self._stopping:  # queued when the service stopped: drop it
                raise ShuttingDown()
            if cancelled:  # its caller left before a thread took it
                raise defer.CancelledError()
            started = time.monotonic()
            try:
                return f(*args)
            finally:
                took.append(time.monotonic() - started)

        # Cancelling answers the caller at once, but the slot stays taken
        # until the thread is done with the job: a client that hangs up
        # cannot free the bound while the hash still runs.
        outcome: defer.Deferred[_T] = defer.Deferred(canceller=cancelled.append)

        def done(result: Any) -> None:
            self.pending -= 1
            if took:
                self.timings.observe(took[0])
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

        try:
            queued = deferToThreadPool(self.reactor, self.threadpool, job)
        except BaseException:
            # Never leave the counts above taken for a job that was not queued.
            done(Failure())
        else:
            queued.addBoth(done)
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
        self._abandoned = False
        if self._own:
            self.threadpool.start()
            self.loader.start()

    def abandon(self) -> None:
        """
        The stop was cut short (a second signal, or the drain's deadline):
        L{stopService} will not join the threads. They are daemon threads, so
        one hung in a checker cannot keep the process (nor block the reactor
        thread in a join).
        """
        self._abandoned = True

    def stopService(self) -> None:
        super().stopService()
        self._stopping = True
        if self._own and not self._abandoned:
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
    """
    Runs verifications in the caller's thread, so that a test sees the
    result at once (C{successResultOf}). What a L{Verifier} built without a
    pool uses: a hashing checker on its own (a unit test, or strcred's
    C{--auth htpasswd:} before the gateway's service hands it its own).
    Under the reactor, each verification then blocks the reactor thread
    for as long as the hash takes.
    """

    def run(self, f: Callable[..., _T], *args: Any) -> defer.Deferred[_T]:
        return defer.maybeDeferred(f, *args)


def length_prefixed(*parts: str) -> bytes:
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
    @param pool: where verifications run: a L{HashPool} (what the gateway's
        service passes), or by default an L{InlinePool} (the caller's thread).
    @param clock: times the cache; by default L{gateway.clock.MONOTONIC}.
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
        self.clock = clock if clock is not None else MONOTONIC
        self.ttl = ttl
        self.max_entries = max_entries
        self._key = secrets.token_bytes(32)
        self._cache: OrderedDict[bytes, float] = OrderedDict()
        self._inflight: dict[bytes, list[defer.Deferred[bool]]] = {}
        self.hits = self.misses = self.coalesced = 0

    def __repr__(self) -> str:
        return f"<Verifier cached={len(self._cache)} inflight={len(self._inflight)}>"

    def _cache_key(self, user: str, password: str, stored: str) -> bytes:
        return hmac.new(self._key, length_prefixed(user, password, stored), hashlib.sha256).digest()

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

    @property
    def cached(self) -> int:
        """Verified passwords in the cache now."""
        return len(self._cache)

    def clear(self) -> None:
        self._cache.clear()
