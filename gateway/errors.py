# -*- test-case-name: tests.test_throttle -*-
"""
The outcomes of a login other than success or a wrong password, in one place:
what L{gateway.realm.login} promises its front doors, and what a checker may
raise.

A L{TemporaryFailure} is not a wrong password: the front doors answer it with
454 4.7.0 (SMTP), 503 or 429 (HTTP) or close (SOCKS). A L{Reject} is a
checker's own answer to a failed login, sent to the client as written.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer


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


class StateUnavailable(TemporaryFailure):
    """
    The shared state (Redis) cannot be reached and the operator chose
    C{--state-failure closed}: no login is checked without its limits.
    """

    def __init__(self) -> None:
        super().__init__("the shared state is unavailable")


class ShuttingDown(TemporaryFailure):
    """The gateway is stopping; queued verifications are dropped, not run."""

    def __init__(self) -> None:
        super().__init__("the gateway is shutting down")


class Abandoned(defer.CancelledError):
    """
    A login its client left (or a front door's timer ended) after its
    checkers had started judging it: still a C{CancelledError} to the front
    door, but the verdict is not lost. L{gateway.realm.login} reports the
    attempt by its verdict (a wrong password stays a C{failure} in the audit
    log, whatever the transport did), else as C{cancelled}.

    @ivar verdict: fires once the checkers' verdict is known: the
        L{UnauthorizedLogin} (or L{Reject}) they judged the credentials
        with, or None (right credentials, or never judged).
    """

    def __init__(self, verdict: defer.Deferred[Any]) -> None:
        super().__init__("the client left before the answer")
        self.verdict = verdict
