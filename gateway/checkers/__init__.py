# -*- test-case-name: tests.test_checkers -*-
"""
Credential checkers and the pieces that put several of them behind one Portal.

A Portal keeps one checker per credentials interface, so the gateway registers
one L{CheckerChain} for all of them: it asks every configured checker that can
handle the credentials, in command-line order, until one accepts.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import attrs
from twisted.cred.checkers import FilePasswordDB, ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.reflect import namedAny
from zope.interface import implementer

from gateway.checkers.functions import (
    CallableChecker,
    http_server_validate_auth_basic,
    proxy_server_auth_rfc1929,
    smtp_server_auth_plain,
)
from gateway.credentials import safe_message, secrets_of
from gateway.errors import Reject, TemporaryFailure

log = Logger()

__all__ = [
    "CallableChecker",
    "CheckerChain",
    "Reject",
    "TemporaryFailure",
    "CheckerLoadError",
    "http_server_validate_auth_basic",
    "load_checker",
    "native_checker",
    "proxy_server_auth_rfc1929",
    "smtp_server_auth_plain",
]


@implementer(ICredentialsChecker)
class CheckerChain:
    """
    Ask each checker that handles the credentials until one accepts.

    C{UnauthorizedLogin} from one checker passes the credentials to the next.
    If none accepts and any of them failed otherwise (a backend outage), that
    failure wins, so an outage becomes a temporary failure rather than a wrong
    password. A checker answering C{None} or C{False} is a rejection.
    """

    def __init__(self, checkers: Iterable[ICredentialsChecker] = ()) -> None:
        self.checkers: list[ICredentialsChecker] = [native_checker(c) for c in checkers]

    @property
    def credentialInterfaces(self) -> tuple[Any, ...]:
        seen: dict[Any, None] = {}
        for checker in self.checkers:
            seen.update(dict.fromkeys(checker.credentialInterfaces))
        return tuple(seen)

    def _checkers_for(self, credentials: object) -> list[ICredentialsChecker]:
        return [
            c
            for c in self.checkers
            if any(i.providedBy(credentials) for i in c.credentialInterfaces)
        ]

    def requestAvatarId(self, credentials: object) -> defer.Deferred[Any]:
        candidates = self._checkers_for(credentials)
        if not candidates:
            return defer.fail(UnhandledCredentials(
                f"no checker handles {type(credentials).__name__} credentials"
            ))
        if len(candidates) == 1:  # the common case, without the loop's overhead
            d = defer.maybeDeferred(candidates[0].requestAvatarId, credentials)
            return d.addCallback(_accepted)
        return self._ask_each(candidates, credentials)

    @defer.inlineCallbacks
    def _ask_each(self, candidates: list[ICredentialsChecker], credentials: object):
        error: Failure | None = None
        for checker in candidates:
            try:
                result = yield defer.maybeDeferred(checker.requestAvatarId, credentials)
            except Reject:
                raise  # the checker chose the answer: no other checker may override it
            except UnauthorizedLogin:
                continue
            except defer.CancelledError:
                raise
            except Exception as e:
                error = error or Failure()
                if isinstance(e, TemporaryFailure):  # throttled, pool full: logged once, later
                    continue
                log.warn(
                    "checker {checker!r} failed: {error_type}: {error}",
                    checker=checker,
                    error_type=type(e).__name__,
                    error=safe_message(e, secrets_of(credentials)),
                )
                continue
            if result is None or result is False:
                continue
            return result
        if error is not None:
            error.raiseException()
        raise UnauthorizedLogin()


def _accepted(result: Any) -> Any:
    if result is None or result is False:
        raise UnauthorizedLogin()
    return result


@implementer(IUsernamePassword)
@attrs.frozen(eq=False)
class _BytesView:
    """The same credentials with C{bytes} username and password."""

    _credentials: Any

    @property
    def username(self) -> bytes:
        return self._credentials.username.encode("utf-8")

    @property
    def password(self) -> bytes:
        return self._credentials.password.encode("utf-8")

    def checkPassword(self, password: str | bytes) -> bool:
        return self._credentials.checkPassword(password)


@implementer(ICredentialsChecker)
@attrs.frozen
class BytesCredentialsChecker:
    """
    Present C{str} credentials to a checker that keys its users by C{bytes}
    (Twisted's C{FilePasswordDB}, used by C{--auth file:PATH}).
    """

    checker: ICredentialsChecker

    @property
    def credentialInterfaces(self) -> tuple[Any, ...]:
        return tuple(self.checker.credentialInterfaces)

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[Any]:
        if isinstance(getattr(credentials, "username", None), str):
            credentials = _BytesView(credentials)
        return defer.maybeDeferred(self.checker.requestAvatarId, credentials)


#: Checker classes of Twisted's strcred plugins that expect bytes credentials.
_BYTES_CHECKERS: tuple[type, ...] = (FilePasswordDB,)


def native_checker(checker: ICredentialsChecker) -> ICredentialsChecker:
    """Wrap C{checker} if it needs C{bytes} credentials; else return it."""
    if isinstance(checker, _BYTES_CHECKERS):
        return BytesCredentialsChecker(checker)
    return checker


class CheckerLoadError(Exception):
    """A C{--checker} name that does not lead to a checker; one-line message."""


def _required_positional(func: Any) -> int | None:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return None
    return sum(
        p.default is p.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        for p in params
    )


def load_checker(name: str) -> ICredentialsChecker:
    """
    Turn a dotted name into a checker: an L{ICredentialsChecker} instance, a
    class or zero-argument factory producing one, or a plain function with a
    seed signature (adapted by L{CallableChecker}).
    """
    try:
        obj = namedAny(name)
    except Exception as e:
        raise CheckerLoadError(f"cannot import checker {name!r}: {e}") from None
    if ICredentialsChecker.providedBy(obj) and not isinstance(obj, type):
        return obj
    if isinstance(obj, type) or (callable(obj) and _required_positional(obj) == 0):
        try:
            made = obj()
        except Exception as e:
            raise CheckerLoadError(f"checker {name!r} failed to start: {e}") from None
        if not ICredentialsChecker.providedBy(made):
            raise CheckerLoadError(
                f"{name!r} made a {type(made).__name__}, not an ICredentialsChecker"
            )
        return made
    if callable(obj):
        try:
            return CallableChecker(obj)
        except TypeError as e:
            raise CheckerLoadError(f"checker function {name!r}: {e}") from None
    raise CheckerLoadError(f"{name!r} is neither a checker nor a callable")
