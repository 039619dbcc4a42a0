# -*- test-case-name: tests.test_throttle -*-
"""
The first stage of the verification pipeline every front door shares:

    throttle  ->  checkers  ->  cache  ->  hash in a bounded thread pool

L{ThrottlingChecker} refuses a throttled peer or (user, peer) pair before
any checker runs, holds back attempts for a much-guessed user (for at most
C{max_user_delay}) and delays every failure; the checkers' hash
verifications then run through L{gateway.checkers.hashing}.

It asks its throttle through L{IThrottle}: one call before the check
(L{IThrottle.admit}: check and reserve) and one after (L{IThrottle.finish}:
release and record), so that a shared back end
(L{gateway.state.redis.RedisThrottle}) makes one round trip per step, and
the in-process L{Throttle} answers at once (C{defer.succeed}: no extra
reactor turn).
"""

from __future__ import annotations

import functools
import hashlib
import secrets
import unicodedata
from collections import Counter, OrderedDict, deque
from typing import Any

import attrs
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from gateway.addresses import peer_key
from gateway.checkers.hashing import Attempt, current_attempt, length_prefixed
from gateway.errors import Abandoned, PeerShareFull, Throttled
from gateway.ratelog import LogRateLimiter

_Key = tuple[str, Any]

#: Keys the user-name digests: names are not kept, and not guessable from a memory dump.
_DIGEST_KEY = secrets.token_bytes(32)


def _digest(*parts: str) -> bytes:
    return hashlib.blake2b(length_prefixed(*parts), digest_size=16, key=_DIGEST_KEY).digest()


def _fold(user: str) -> str:
    """
    One counter for every spelling a checker might take for the same user
    (case, Unicode compatibility forms, surrounding spaces): counting two
    users as one only costs delays, counting one as two would double a
    guesser's attempts.
    """
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", user).casefold()).strip()


#: What L{IThrottle.finish} records: a correct password; a failure counted
#: for the peer, the pair and the user; one counted for the peer and pair
#: only (abandoned, or over its peer's hash share); or nothing.
SUCCESS, FAILURE, PEER_FAILURE = "success", "failure", "peer_failure"


@attrs.define(eq=False)
class Admission:
    """
    An attempt L{IThrottle.admit} let through, reserved in flight until
    L{IThrottle.finish}.

    @ivar wait: seconds to wait before checking it (the user's ceiling).
    @ivar known: the hash pool's (pair, account) keys for a known device,
        None for a stranger (L{Throttle.known_keys}).
    @ivar token: names its reservation in a shared back end.
    @ivar local: whether the in-process throttle admitted it (a shared
        back end's fallback finishes it there too).
    """

    peer: str | None
    user: str | None
    wait: float = 0.0
    known: tuple[Any, Any] | None = None
    token: str = ""
    local: bool = True


class IThrottle(Interface):
    """The throttle as L{ThrottlingChecker} asks it: one call before a check, one after."""

    def admit(peer: str | None, user: str | None) -> defer.Deferred[Admission]:
        """
        Check an attempt and reserve it in flight (one step).

        @return: a Deferred firing with an L{Admission}; failing with
            L{Throttled} when the peer or pair has used up its attempts, or
            L{gateway.errors.StateUnavailable} when a shared back end cannot
            be reached under C{--state-failure closed}.
        """

    def finish(
        admission: Admission, verdict: str | None, release: bool = True
    ) -> defer.Deferred[float]:
        """
        Release the attempt's reservation (unless C{release} is false: done
        already) and record its C{verdict} (L{SUCCESS}, L{FAILURE},
        L{PEER_FAILURE} or None) in one step.

        @return: a Deferred firing with the seconds to wait before answering
            a failure (0 otherwise).
        """


@implementer(IThrottle)
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
        #: For the metrics: attempts refused, by the limit that refused them
        #: (C{peer}, C{pair}), and attempts made to wait by a user's ceiling.
        self.refused: Counter[str] = Counter()
        self.delayed = 0

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
        by = ""
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
                by = by or key[0]
            elif len(failures) + self._inflight.get(key, 0) >= limit:
                retry = max(retry, 1.0)  # until one of the attempts in flight ends
                by = by or key[0]
        if retry > 0:
            self.refused[by] += 1
            refused = Throttled(retry)
            refused.log_suppressed = self.refusal_log.admit(peer_key(peer))
            raise refused
        if wait:
            self.delayed += 1
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
        return self.lane_keys(peer, user)

    @classmethod
    def lane_keys(cls, peer: str | None, user: str | None) -> tuple[_Key, _Key] | None:
        """The (pair, account) keys of L{known_keys}, known device or not (None without a user)."""
        keys = cls.keys_for(peer, user)
        pair = next((key for key in keys if key[0] == "pair"), None)
        account = next((key for key in keys if key[0] == "user"), None)
        return None if pair is None or account is None else (pair, account)

    def admit(self, peer: str | None, user: str | None) -> defer.Deferred[Admission]:
        """L{IThrottle.admit}: L{check} and L{reserve}, answered at once."""
        try:
            wait = self.check(peer, user)
        except Throttled as e:
            return defer.fail(e)
        self.reserve(peer, user)
        return defer.succeed(Admission(peer, user, wait, self.known_keys(peer, user)))

    def finish(
        self, admission: Admission, verdict: str | None, release: bool = True
    ) -> defer.Deferred[float]:
        """L{IThrottle.finish}: L{release} and record the verdict, answered at once."""
        return defer.succeed(self.finish_now(admission.peer, admission.user, verdict, release))

    def finish_now(
        self, peer: str | None, user: str | None, verdict: str | None, release: bool = True
    ) -> float:
        """L{finish} without the Deferred (for a shared back end's fallback)."""
        if release:
            self.release(peer, user)
        if verdict == SUCCESS:
            self.succeeded(peer, user)
        elif verdict is not None:
            return self.failed(peer, user, across_peers=verdict == FAILURE)
        return 0.0

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

    def __init__(self, checker: ICredentialsChecker, throttle: IThrottle) -> None:
        self.checker = checker
        self.throttle = throttle

    @property
    def credentialInterfaces(self) -> tuple[Any, ...]:
        return tuple(self.checker.credentialInterfaces)

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[Any]:
        meta = getattr(credentials, "conn_meta", None)
        peer = getattr(meta, "peer_address", None)
        user = _claimed_user(credentials)
        # Held until the answer: waiting attempts count against the peer too.
        admitted = self.throttle.admit(peer, user)
        if admitted.called:
            # Answered at once (in-process): the caller gets the check's own
            # Deferred, pending exactly as long as the check is.
            now: list[Any] = []
            admitted.addBoth(now.append)
            if isinstance(now[0], Failure):
                return defer.fail(now[0])
            return self._admitted(now[0], credentials)
        return admitted.addCallback(self._admitted, credentials)

    def _admitted(self, admission: Admission, credentials: Any) -> defer.Deferred[Any]:
        throttle = self.throttle
        attempt = Attempt(admission.peer)

        def record(verdict: str | None, release: bool = True) -> defer.Deferred[float]:
            # The verdict is known: a back end that cannot record it must
            # not change the answer (its outage is logged where it happens).
            return throttle.finish(admission, verdict, release).addErrback(lambda _: 0.0)

        def succeeded(result: Any) -> Any:
            record(SUCCESS)
            return result

        def failed(reason: Failure) -> Any:
            if reason.check(defer.CancelledError) and attempt.running:
                record(None)
                # Abandoned while its verification waited in the hash queue
                # (perhaps behind others' load) or ran: the verdict decides.
                # A wrong password is charged to its peer and pair when the
                # hash says so, and reported as the failure it is; the right
                # one (its client gave up waiting) is not: a slow queue is
                # others' doing. A job dropped unrun judged nothing.
                def judged(wrong: bool) -> UnauthorizedLogin | None:
                    if not wrong:
                        return None
                    record(PEER_FAILURE, release=False)
                    return UnauthorizedLogin()

                return Failure(Abandoned(attempt.wrong().addCallback(judged)))
            if reason.check(defer.CancelledError, PeerShareFull):
                # The client left (or a front door's timer ended it) while the
                # attempt waited or was checked: without counting it, hanging
                # up would be a free retry; a peer over its own share of the
                # hash queue would retry at will. Its peer and pair pay, not
                # the user. A refusal caused by others' load (its network's
                # share, a full queue: NetworkShareFull, PoolFull) is never
                # counted: a neighbour must not lock a user out.
                record(PEER_FAILURE)
                return reason
            if not reason.check(UnauthorizedLogin):
                record(None)
                return reason

            def answer(delay: float) -> Any:
                if not delay:
                    return reason

                def left(cancelled: Failure) -> Failure:
                    # Hanging up during the delay (a success would have been
                    # answered by now) must not turn the failure into something
                    # else: the verdict is known, and it is this one.
                    cancelled.trap(defer.CancelledError)
                    return Failure(Abandoned(defer.succeed(reason.value)))

                later = task.deferLater(throttle.clock, delay, reason.raiseException)
                return later.addErrback(left)

            return record(FAILURE).addCallback(answer)

        def check() -> defer.Deferred[Any]:
            # The hash pool gives each peer a share, and known devices a reserve.
            attempt.known = admission.known
            token = current_attempt.set(attempt)
            try:
                return defer.maybeDeferred(self.checker.requestAvatarId, credentials)
            finally:
                current_attempt.reset(token)

        if admission.wait:
            # Before the check, whatever the password: an answer that came
            # sooner for the right one would tell it.
            d = task.deferLater(throttle.clock, admission.wait, check)
        else:
            d = check()
        return d.addCallbacks(succeeded, failed)
