# -*- test-case-name: tests.test_realm -*-
"""
The one realm: whatever a checker returned becomes an L{IAuthInfo}, and the
protocol avatars (message delivery, web resource, proxy session) are made
from that AuthInfo.

Front doors log in with L{login}, which passes the credentials as the mind so
that the realm knows the identity context and the peer, and which emits one
structured auth event per attempt (never with a secret), except for floods of
refusals (throttled, queue full), logged now and then with a count.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from gateway.addresses import ip_or_none, peer_key
from gateway.authinfo import AuthInfo, IAuthInfo, Identity, IdentityContext
from gateway.checkers import CheckerChain
from gateway.checkers.throttle import Throttle, ThrottlingChecker
from gateway.credentials import (
    IConnectionCredentials,
    identities_of,
    requested_authzid,
    safe_message,
    secrets_of,
)
from gateway.errors import (
    Abandoned,
    AuthBackendError,
    PoolFull,
    Reject,
    TemporaryFailure,
    Throttled,
)
from gateway.events import Events, LoginEvent, meta_fields
from gateway.groups import NO_GROUPS, GroupMap
from gateway.ratelog import LogRateLimiter, suppressed_note

#: Makes a protocol avatar from the session's AuthInfo and the login's mind.
AvatarFactory = Callable[[IAuthInfo, Any], Any]

#: The key of C{ConnectionMeta.state} under which the realm records the
#: authorization identity its C{authorize} hook (the ACL's grant) approved at
#: login, so that the session can ask the grant again (a reload may revoke
#: it); absent when no hook approved one (a checker's own approval is not asked again).
AUTHZ_GRANT = "gateway.realm.authz_grant"

_log = Logger(namespace="gateway.auth")


def _noop() -> None:
    pass


#: The logout the realm gives an avatar that has none: a front door may skip calling it.
NO_LOGOUT = _noop


@implementer(IRealm)
class Realm:
    """
    Maps every avatar id to an L{IAuthInfo}.

    @param groups: the C{--groups} file; its groups are added for every
        authenticated identity (not for a mere SMTP authorization identity).
    @param avatar_factories: interface -> L{AvatarFactory}, filled in by the
        front doors (see L{register_avatar}).
    """

    def __init__(
        self,
        groups: GroupMap = NO_GROUPS,
        avatar_factories: Mapping[type[Interface], AvatarFactory] | None = None,
        authorize: Callable[[AuthInfo, str], bool] | None = None,
    ) -> None:
        self.groups = groups
        self._factories: dict[type[Interface], AvatarFactory] = dict(avatar_factories or {})
        self.authorize = authorize

    def register_avatar(self, interface: type[Interface], factory: AvatarFactory) -> None:
        self._factories[interface] = factory

    def auth_info_for(self, avatar_id: Any, mind: Any = None) -> AuthInfo:
        """
        The session's AuthInfo for what a checker returned.

        @raise UnauthorizedLogin: when it carries no identity that proved
            itself (fail closed), or an authorization identity nothing approved.
        @raise TypeError: when the checker returned something unusable.
        """
        creds = mind if IConnectionCredentials.providedBy(mind) else None
        if isinstance(avatar_id, bytes):
            try:
                avatar_id = avatar_id.decode("utf-8")
            except UnicodeDecodeError:
                raise TypeError("checker returned an avatar id that is not UTF-8") from None
        if isinstance(avatar_id, str):
            if not avatar_id:
                raise UnauthorizedLogin()
            info = AuthInfo(identities=identities_of(creds, avatar_id))
        elif isinstance(avatar_id, (AuthInfo, Mapping)):
            try:
                info = AuthInfo.from_json_dict(avatar_id)
            except ValueError as e:
                raise TypeError(f"checker returned a malformed AuthInfo: {e}") from None
        else:
            raise TypeError(
                f"checker returned {type(avatar_id).__name__}; "
                "expected an avatar id (str/bytes), an AuthInfo or a dict"
            )
        if not info.is_authenticated():
            raise UnauthorizedLogin()
        pending = self._authorization(info, creds)
        # The connection's own peer wins, as KumoMTA's set_peer_address.
        peer = ip_or_none(creds.conn_meta.peer_address) if creds is not None else None
        members = [
            i.identity
            for i in info.identities
            if i.context is not IdentityContext.SmtpAuthPlainAuthorization
        ]
        groups = self.groups.groups_for(members)
        if (peer is not None and peer != info.peer_address) or groups:
            info = attrs.evolve(
                info,
                peer_address=peer if peer is not None else info.peer_address,
                groups=(*info.groups, *groups),
            )
        if creds is not None:
            creds.conn_meta.state.pop(AUTHZ_GRANT, None)
        if pending is None:
            return info
        # Asked with the session as it proved itself: groups and peer included,
        # the authorization identity not yet.
        if self.authorize is None or not self.authorize(info, pending):
            raise UnauthorizedLogin()
        if creds is not None:
            creds.conn_meta.state[AUTHZ_GRANT] = pending
        granted = Identity(pending, IdentityContext.SmtpAuthPlainAuthorization)
        return attrs.evolve(info, identities=(granted, *info.identities))

    def _authorization(self, info: AuthInfo, creds: Any) -> str | None:
        """
        Check the authorization identities of C{info} against what the client
        asked for, and return the authzid that still needs the C{authorize}
        hook's grant (None when nothing is left to grant).

        An authorization identity in a checker's AuthInfo is the checker's
        approval of exactly the requested authzid (with none requested: of
        one of the identities that proved themselves); naming any other one
        fails the login rather than silently replacing what the client asked
        for. A session must also have an identity that proved itself.

        @raise UnauthorizedLogin: when an identity is not approved.
        """
        authz = {
            i.identity
            for i in info.identities
            if i.context is IdentityContext.SmtpAuthPlainAuthorization
        }
        proven = {
            i.identity
            for i in info.identities
            if i.context is not IdentityContext.SmtpAuthPlainAuthorization
        }
        if not proven:
            raise UnauthorizedLogin()
        requested = requested_authzid(creds)
        if authz:
            if not authz <= ({requested} if requested else proven):
                raise UnauthorizedLogin()
            return None
        if not requested or requested in proven:
            return None
        try:
            Identity(requested, IdentityContext.SmtpAuthPlainAuthorization)
        except ValueError:  # control characters: it can never be an identity
            raise UnauthorizedLogin() from None
        return requested

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: type[Interface]):
        info = self.auth_info_for(avatarId, mind)
        for interface in interfaces:
            if interface is IAuthInfo:
                return IAuthInfo, info, _noop
            factory = self._factories.get(interface)
            if factory is not None:
                avatar = factory(info, mind)
                return interface, avatar, getattr(avatar, "logout", _noop)
        raise NotImplementedError(
            f"no avatar for {', '.join(i.__name__ for i in interfaces)}"
        )


class GatewayPortal(Portal):
    """
    A Portal that also keeps the rate limit of L{login}'s log lines:
    outcomes a client can repeat at will without being throttled (hanging
    up, unsupported credentials, input that makes a checker fail) are
    logged once a minute per peer and kind; and the L{Events} hub on which
    L{login} publishes one L{LoginEvent} per attempt (every attempt: the
    audit log and metrics are not rate-limited).
    """

    def __init__(
        self,
        realm: IRealm,
        checkers: Iterable[ICredentialsChecker],
        log_limiter: LogRateLimiter,
        events: Events | None = None,
    ) -> None:
        super().__init__(realm, checkers)
        self.log_limiter = log_limiter
        self.events = events if events is not None else Events()


def make_portal(
    realm: IRealm,
    checkers: Iterable[ICredentialsChecker],
    throttle: Throttle | None = None,
    events: Events | None = None,
) -> GatewayPortal:
    """
    A Portal whose every credentials interface goes to one L{CheckerChain},
    behind the shared failure L{Throttle} when one is given.
    """
    checker: ICredentialsChecker = CheckerChain(checkers)
    if throttle is not None:
        checker = ThrottlingChecker(checker, throttle)
    return GatewayPortal(
        realm, [checker], LogRateLimiter(throttle.clock if throttle is not None else None), events
    )


#: How a failed login is told, first match wins: the failure's type, the
#: C{outcome} of the auth log line and the L{LoginEvent}, and the event's
#: reason code (L{gateway.events.REASONS}). Anything else is an C{error}.
FAILURES: tuple[tuple[type[BaseException], str, str], ...] = (
    (Reject, "failure", "rejected"),
    (UnauthorizedLogin, "failure", "invalid_credentials"),
    (defer.CancelledError, "cancelled", "cancelled"),
    (UnhandledCredentials, "unsupported", "unsupported"),
    (Throttled, "throttled", "throttled"),
    (PoolFull, "temporary", "pool_full"),
    (AuthBackendError, "temporary", "backend_error"),
    (TemporaryFailure, "temporary", "temporary"),
)


def classify(reason: Failure) -> tuple[str, str]:
    """The C{(outcome, reason code)} of a failed login (L{FAILURES})."""
    for kind, outcome, code in FAILURES:
        if reason.check(kind):
            return outcome, code
    return "error", "backend_error"


def _frames(reason: Failure) -> str:
    """Where the error happened: file, line and function only, no values."""
    summary = traceback.StackSummary.from_list(
        [(filename, line, function, None) for function, filename, line, *_ in reason.frames]
    )
    return "".join(summary.format())


def login(
    portal: Portal,
    credentials: Any,
    *interfaces: type[Interface],
    log: Logger = _log,
    repeated: Callable[[Any], bool] | None = None,
) -> defer.Deferred[tuple[type[Interface], Any, Callable[[], None]]]:
    """
    C{portal.login} for the front doors: the credentials are the mind, the
    default interface is L{IAuthInfo}, and one C{auth} event is logged with
    protocol, mechanism, claimed identity, peer and outcome: C{success},
    C{failure}, C{throttled}, C{temporary}, C{unsupported}, C{error} or
    C{cancelled}. An attempt its client left after the checkers judged it
    (L{Abandoned}) is reported by their verdict once it is known: a wrong
    password is a C{failure} whatever the transport did (else hanging up
    during the failure delay would hide every guess from fail2ban).
    No event, and no failure it returns, carries a secret.
    C{repeated(auth_info)}, called on success, says whether the front door
    has logged this very success on this connection already (an HTTP
    keep-alive connection sending the same credentials from the same client
    for the same AuthInfo): such a success gets no line, only its event
    (audit log, metrics); every other outcome is logged as usual.
    Refusals a client can repeat at will (L{Throttled}, L{PoolFull}) are
    logged at most once a minute per peer (or queue), the line saying in
    C{suppressed} how many were left out since the last one; so are, per
    peer and kind, the outcomes no throttle counts or a client can cause
    at will: C{cancelled}, C{unsupported} and C{error} (with a portal from
    L{make_portal}).

    @return: a Deferred firing with C{(interface, avatar, logout)}, or failing
        with L{UnauthorizedLogin} (wrong credentials), a L{TemporaryFailure}
        (L{Throttled}, L{PoolFull}, or L{AuthBackendError} for any checker
        error), L{UnhandledCredentials} or C{CancelledError}.
    """
    meta = getattr(credentials, "conn_meta", None)
    # The fields of every log line and of the event: one dict, the event's names.
    fields = meta_fields(meta)
    fields["mechanism"] = getattr(credentials, "mechanism", None)
    fields["identity"] = getattr(credentials, "claimed_identity", None)
    what = "{protocol} {mechanism} identity={identity!r} peer={peer_address}"
    # A plain Portal (a user's own wiring) logs every event.
    limiter = portal.log_limiter if isinstance(portal, GatewayPortal) else None
    events = portal.events if isinstance(portal, GatewayPortal) and portal.events.sinks else None
    started = time.monotonic() if events is not None else 0.0

    def publish(outcome: str, reason: str, info: Any = None, left: bool = False) -> None:
        assert events is not None
        events.login(LoginEvent(
            time=time.time(), outcome=outcome, reason=reason, duration=time.monotonic() - started,
            auth_info=info, client_left=left, **fields,
        ))

    def admit(kind: str) -> int | None:
        """Whether this event gets a line (see L{make_portal}); the count left out."""
        return limiter.admit((kind, peer_key(fields["peer_address"]))) if limiter is not None else 0

    def succeeded(result: tuple[Any, Any, Any]) -> tuple[Any, Any, Any]:
        _, avatar, _ = result
        info = avatar if IAuthInfo.providedBy(avatar) else getattr(avatar, "auth_info", None)
        if repeated is None or not repeated(info):
            log.info(
                "auth success: " + what,
                outcome="success",
                identities=[i.to_json_dict() for i in info.identities] if info else None,
                groups=list(info.groups) if info else None,
                **fields,
            )
        if events is not None:
            publish("success", "ok", info)
        return result

    def failed(reason: Failure) -> Failure:
        if reason.check(Abandoned):
            # The client left, but the checkers judged (or are judging) the
            # credentials: the event is their verdict, when it is known (a
            # wrong password hidden by a hang-up is still a failure for
            # fail2ban); with none, the attempt was cancelled.
            def judged(verdict: UnauthorizedLogin | None) -> None:
                recorded(Failure(verdict) if verdict is not None else reason, left=True)

            def unjudged(_: Failure) -> None:
                recorded(reason, left=True)  # no verdict after all: cancelled

            reason.value.verdict.addCallbacks(judged, unjudged)
            return reason
        return recorded(reason)

    def recorded(reason: Failure, left: bool = False) -> Failure:
        """Publish and log a failed login's event; the failure the caller gets."""
        outcome, reason_code = classify(reason)
        if events is not None:
            publish(outcome, reason_code, left=left)
        gone = " (the client left)" if left else ""
        if reason_code == "rejected":
            log.info("auth failure: " + what + ": rejected with {code}" + gone, outcome="failure",
                     code=reason.value.code, client_left=left, **fields)
            if safe_message(reason.value, secrets_of(credentials)) != str(reason.value):
                return Failure(UnauthorizedLogin())  # its text would tell the secret
            return reason
        if outcome == "failure":
            log.info("auth failure: " + what + gone, outcome="failure", client_left=left, **fields)
            return Failure(UnauthorizedLogin())  # a checker's message stays here
        if outcome == "cancelled":
            suppressed = admit("cancelled")  # a client can abandon attempts at will
            if suppressed is not None:
                log.info("auth cancelled: " + what + suppressed_note(suppressed),
                         outcome="cancelled", suppressed=suppressed, **fields)
            return reason
        if outcome == "unsupported":
            suppressed = admit("unsupported")  # no checker runs, no throttle counts
            if suppressed is not None:
                log.warn("auth unsupported: " + what + ": no checker handles it"
                         + suppressed_note(suppressed),
                         outcome="unsupported", suppressed=suppressed, **fields)
            return reason
        why = safe_message(reason.value, secrets_of(credentials))
        if outcome in ("throttled", "temporary"):
            # A flood of refusals (throttled, queue full) gets a line now and
            # then, saying how many were left out; every other outcome one each.
            suppressed = reason.value.log_suppressed
            if suppressed is not None:
                log.warn("auth deferred: " + what + ": {why}" + suppressed_note(suppressed),
                         outcome=outcome, why=why, suppressed=suppressed, **fields)
            return reason
        # Input that makes a checker fail can be sent at will (and an outage
        # fails every login): one traceback a minute per peer and error type.
        suppressed = admit("error " + reason.type.__name__)
        if suppressed is not None:
            log.error(
                "auth error: " + what + ": {error_type}: {error}" + suppressed_note(suppressed)
                + "\n{traceback}",
                outcome="error",
                error_type=reason.type.__name__,
                error=why,
                traceback=_frames(reason),
                suppressed=suppressed,
                **fields,
            )
        return Failure(AuthBackendError())

    d = portal.login(credentials, credentials, *(interfaces or (IAuthInfo,)))
    return d.addCallbacks(succeeded, failed)
