# -*- test-case-name: tests.test_testing -*-
"""
Helpers for unit-testing your own checker under C{trial}.

    from twisted.trial.unittest import SynchronousTestCase
    from gateway import testing

    class MyCheckerTests(SynchronousTestCase):
        def test_daniel(self):
            creds = testing.http_basic("daniel", "tiger")
            info = self.successResultOf(testing.authenticate(MyChecker(), creds))
            testing.assert_auth_info(self, info, [("daniel", "HttpBasicAuth")], groups=["staff"])

L{authenticate} runs the same Portal, checker chain and realm as the gateway,
so what you assert is what the front doors will see. Nothing here needs a
reactor: a hashing checker verifies inline on its own (L{inline_verifier}
with a C{task.Clock} shows its cache), a grant of a foreign SMTP authzid is a
plain function (C{authorize=}), and an ACL is TOML text (L{policy}).
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.trial.unittest import SynchronousTestCase

from gateway.acl import AccessControlMap, IAccessPolicy, authz_grants, parse_acl
from gateway.authinfo import AuthInfo, IAuthInfo
from gateway.checkers import hashes
from gateway.checkers.hashing import InlinePool, Verifier
from gateway.credentials import (
    BearerToken,
    HTTPBasicCredentials,
    RFC1929Credentials,
    SASLCredentials,
)
from gateway.groups import NO_GROUPS, GroupMap
from gateway.meta import ConnectionMeta
from gateway.realm import Realm, make_portal

_DEFAULT_PORTS = {"smtp": 587, "http": 443, "socks": 1080}


def conn_meta(
    protocol: str = "smtp",
    peer: str = "192.0.2.10",
    *,
    tls: bool = True,
    listener: str | None = None,
    local: str = "127.0.0.1",
    local_port: int | None = None,
    helo: str | None = None,
    state: Mapping[str, Any] | None = None,
) -> ConnectionMeta:
    """Connection metadata as a front door would build it."""
    return ConnectionMeta(
        protocol=protocol,
        listener=listener or protocol,
        peer_address=peer,
        peer_port=49152,
        local_address=local,
        local_port=local_port or _DEFAULT_PORTS.get(protocol),
        tls=tls,
        helo=helo if helo is not None else ("client.example" if protocol == "smtp" else None),
        state=dict(state or {}),
    )


def sasl_plain(
    authcid: str, password: str, authzid: str = "", *, mechanism: str = "PLAIN", **meta: Any
) -> SASLCredentials:
    """SMTP AUTH PLAIN (or LOGIN) credentials; C{meta} goes to L{conn_meta}."""
    return SASLCredentials(
        authcid, password, conn_meta("smtp", **meta), mechanism=mechanism, authzid=authzid
    )


def http_basic(user: str, password: str, **meta: Any) -> HTTPBasicCredentials:
    return HTTPBasicCredentials(user, password, conn_meta("http", **meta))


def bearer(token: str, **meta: Any) -> BearerToken:
    return BearerToken(token, conn_meta("http", **meta))


def rfc1929(username: str, password: str, **meta: Any) -> RFC1929Credentials:
    meta.setdefault("tls", False)
    return RFC1929Credentials(username, password, conn_meta("socks", **meta))


def inline_verifier(clock: IReactorTime | None = None, ttl: float = 300.0) -> Verifier:
    """
    A L{Verifier} of the gateway's hash schemes that verifies in the
    caller's thread, for a checker providing C{IHashingChecker} (such as
    C{HtpasswdChecker(path, verifier=testing.inline_verifier())}): its
    logins fire at once. Pass a C{task.Clock} to see successes cached for
    C{ttl} seconds (its C{hits}, C{misses} counters) and expire.
    """
    return Verifier(hashes.verify, InlinePool(), clock, ttl)


def policy(toml: str) -> AccessControlMap:
    """
    An ACL as C{--acl} would load it, from TOML text (indentation removed,
    so a triple-quoted string may follow the test's); ask it with
    C{query_resource_access(info, resource, privilege)}, or pass it to
    L{authenticate} as C{acl}.

    @raise gateway.groups.ConfigError: what a malformed C{--acl} file stops
        the start with (file C{<testing.policy>}, line, reason).
    """
    return parse_acl(textwrap.dedent(toml), "<testing.policy>")


def authenticate(
    checker: ICredentialsChecker | Iterable[ICredentialsChecker],
    credentials: Any,
    groups: GroupMap | Mapping[str, Iterable[str]] = NO_GROUPS,
    acl: IAccessPolicy | None = None,
    authorize: Callable[[IAuthInfo, str], bool] | None = None,
) -> defer.Deferred[AuthInfo]:
    """
    Log in through a Portal like the gateway's and fire with the session's
    L{AuthInfo}; fails with C{UnauthorizedLogin} exactly when the gateway
    would answer 535 / 401 / RFC 1929 status 1. Any other error of the
    checker or the realm fails as itself, for the test to see (the gateway
    logs it and answers with a temporary failure).

    @param groups: a L{GroupMap} or a plain C{{group: [members]}} mapping,
        standing in for the C{--groups} file.
    @param acl: the C{--acl} policy (L{gateway.acl.parse_acl}), whose
        C{smtp/authz/<authzid>} grants let an SMTP login act as someone else;
        without one, as without C{--acl}, nobody may.
    @param authorize: instead of C{acl}, the grant itself:
        C{authorize(auth_info, authzid) -> bool}, asked (with the session
        that proved itself, groups included) whether it may act as a foreign
        SMTP C{authzid}.
    @raise TypeError: when both C{acl} and C{authorize} are given.
    """
    if acl is not None and authorize is not None:
        raise TypeError("authenticate() takes acl or authorize, not both")
    if authorize is None:
        authorize = authz_grants(acl)
    if not isinstance(groups, GroupMap):
        groups = GroupMap({g: tuple(m) for g, m in groups.items()})
    checkers = [checker] if ICredentialsChecker.providedBy(checker) else list(checker)
    portal = make_portal(Realm(groups=groups, authorize=authorize), checkers)
    d = portal.login(credentials, credentials, IAuthInfo)
    return d.addCallback(lambda result: result[1])


def assert_auth_info(
    case: SynchronousTestCase,
    info: IAuthInfo,
    identities: Iterable[str | tuple[str, str]],
    groups: Iterable[str] | None = None,
    peer_address: str | None = None,
) -> None:
    """
    Assert the identities (names, or C{(name, context)} pairs, in order), and
    optionally the groups (any order) and peer address of an AuthInfo.
    """
    expected = list(identities)
    if all(isinstance(i, str) for i in expected):
        case.assertEqual([i.identity for i in info.identities], expected)
    else:
        case.assertEqual([(i.identity, i.context.value) for i in info.identities], expected)
    if groups is not None:
        case.assertEqual(sorted(info.groups), sorted(groups))
    if peer_address is not None:
        case.assertEqual(info.peer_address, peer_address)
