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
so what you assert is what the front doors will see.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from gateway.acl import IAccessPolicy, authz_grants
from gateway.authinfo import AuthInfo, IAuthInfo
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


def authenticate(
    checker: ICredentialsChecker | Iterable[ICredentialsChecker],
    credentials: Any,
    groups: GroupMap | Mapping[str, Iterable[str]] = NO_GROUPS,
    acl: IAccessPolicy | None = None,
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
    """
    if not isinstance(groups, GroupMap):
        groups = GroupMap({g: tuple(m) for g, m in groups.items()})
    checkers = [checker] if ICredentialsChecker.providedBy(checker) else list(checker)
    portal = make_portal(Realm(groups=groups, authorize=authz_grants(acl)), checkers)
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
