# -*- test-case-name: tests.test_checkers -*-
"""
Plain functions as checkers, with the seed signatures::

    def auth_plain(authz, authc, password, conn_meta): ...   # smtp_server_auth_plain
    def auth_basic(user, password, conn_meta): ...           # http_server_validate_auth_basic
    def auth_socks(username, password, conn_meta): ...       # proxy_server_auth_rfc1929

Like the Lua originals, a function may take fewer parameters (the trailing
ones are not passed), and returns C{True}/C{False} or an AuthInfo-shaped dict.
It may also return a Deferred or be a coroutine function.

C{True} approves the authentication identity (the user whose password was
checked), never the authzid an SMTP client asked for: acting as someone else
needs an AuthInfo naming that authorization identity, or an ACL grant.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from zope.interface import implementer

from gateway.authinfo import AuthInfo
from gateway.credentials import (
    IConnectionCredentials,
    IHTTPBasicCredentials,
    IRFC1929Credentials,
    ISASLCredentials,
)

_SASL_FIRST_NAMES = frozenset({"authz", "authzid", "authz_id"})


def _arity(func: Callable[..., Any]) -> tuple[int, int, str | None]:
    """
    How many positional arguments C{func} accepts (4 for *args), how many it
    requires, and the name of the first one.

    @raise TypeError: when the function cannot be called as a checker.
    """
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        raise TypeError("its signature cannot be read") from None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = sum(p.default is p.empty for p in positional)
    required_kw = [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
    if required_kw:
        raise TypeError(f"keyword-only parameters are not supported: {', '.join(required_kw)}")
    if required > 4:
        raise TypeError(f"it requires {required} arguments; a checker gets at most 4")
    accepted = 4 if any(p.kind is p.VAR_POSITIONAL for p in params) else min(len(positional), 4)
    if accepted < 2:
        raise TypeError("a checker function takes at least (user, password)")
    return accepted, required, positional[0].name if positional else None


@implementer(ICredentialsChecker)
class CallableChecker:
    """
    Adapt a function into an L{ICredentialsChecker}.

    @param sasl: pass C{(authz, authc, password, conn_meta)} instead of
        C{(username, password, conn_meta)}. By default this is chosen from the
        function: four positional parameters, or a first one named C{authz}.
    @param credentialInterfaces: which credentials the function is asked
        about; by default every username/password credential of the gateway.
    """

    def __init__(
        self,
        func: Callable[..., Any],
        *,
        sasl: bool | None = None,
        credentialInterfaces: tuple[Any, ...] = (
            ISASLCredentials,
            IHTTPBasicCredentials,
            IRFC1929Credentials,
        ),
    ) -> None:
        self.func = func
        self._nargs, required, first = _arity(func)
        if sasl is None:
            sasl = required == 4 or first in _SASL_FIRST_NAMES
        self.sasl = sasl
        self.credentialInterfaces = credentialInterfaces

    def __repr__(self) -> str:
        name = getattr(self.func, "__qualname__", repr(self.func))
        return f"<CallableChecker {name} sasl={self.sasl}>"

    def _arguments(self, credentials: Any) -> tuple[Any, ...]:
        meta = credentials.conn_meta if IConnectionCredentials.providedBy(credentials) else None
        if self.sasl:
            authz = getattr(credentials, "effective_authzid", credentials.username)
            args = (authz, credentials.username, credentials.password, meta)
        else:
            args = (credentials.username, credentials.password, meta)
        return args[: self._nargs]

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[Any]:
        d = defer.maybeDeferred(self.func, *self._arguments(credentials))
        return d.addCallback(self._interpret, credentials)

    def _interpret(self, result: Any, credentials: Any) -> str | AuthInfo | Mapping[str, Any]:
        if result is True:
            # True approves the authentication identity only, even when the
            # function saw the authzid: the realm then asks the ACL about a
            # foreign one. Granting it takes an AuthInfo that names it.
            return credentials.username
        if result is False or result is None:
            raise UnauthorizedLogin()
        if isinstance(result, (AuthInfo, Mapping)):
            return result  # the realm validates it, as for any checker
        raise TypeError(
            f"{self!r} returned {type(result).__name__}; expected bool or an AuthInfo-shaped dict"
        )


def smtp_server_auth_plain(func: Callable[..., Any]) -> CallableChecker:
    """C{func(authz, authc, password, conn_meta)}, asked about SMTP AUTH only."""
    return CallableChecker(func, sasl=True, credentialInterfaces=(ISASLCredentials,))


def http_server_validate_auth_basic(func: Callable[..., Any]) -> CallableChecker:
    """C{func(user, password, conn_meta)}, asked about HTTP Basic only."""
    return CallableChecker(func, sasl=False, credentialInterfaces=(IHTTPBasicCredentials,))


def proxy_server_auth_rfc1929(func: Callable[..., Any]) -> CallableChecker:
    """C{func(username, password, conn_meta)}, asked about SOCKS5 RFC 1929 only."""
    return CallableChecker(func, sasl=False, credentialInterfaces=(IRFC1929Credentials,))
