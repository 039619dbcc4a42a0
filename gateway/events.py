# -*- test-case-name: tests.test_events -*-
"""
The events an operator's tools consume: one L{LoginEvent} per login attempt
and one L{AuthzEvent} per authorization decision, published on the core's
L{Events} hub to its sinks (the audit log, metrics).

With no sink, nothing is built: publishers check L{Events.sinks} first, so
an operator who asked for neither pays one attribute test per login.
No event ever holds a password or token: only what L{gateway.realm.login}
and the access policy already log.
"""

from __future__ import annotations

from typing import Any, Protocol

import attrs

from gateway.authinfo import IAuthInfo


@attrs.define
class LoginEvent:
    """
    One login attempt and its outcome. Not frozen: a frozen attrs class
    takes 2.6 times as long to build, and one is built per login. Sinks
    read it and never change it.
    """

    #: Wall-clock time of the outcome (seconds since the epoch).
    time: float
    #: C{"smtp"}, C{"http"}, C{"socks"} (ConnectionMeta.protocol), or None.
    protocol: str | None
    #: The listener that accepted the connection (C{"smtps"}), or None.
    listener: str | None
    #: The SASL mechanism or HTTP scheme or C{"RFC1929"}, or None.
    mechanism: str | None
    #: The identity the client claimed (never a secret), or None.
    identity: str | None
    #: C{success}, C{failure}, C{throttled}, C{temporary}, C{unsupported},
    #: C{error} or C{cancelled} (the C{outcome} of the auth log line).
    outcome: str
    #: A stable code for why (L{REASONS}).
    reason: str
    peer_address: str | None
    peer_port: int | None
    tls: bool | None
    #: Seconds from the attempt to its outcome.
    duration: float
    #: The session on success, else None.
    auth_info: IAuthInfo | None = None
    #: The client left before the answer (hung up, timed out); the outcome
    #: is still the checkers' verdict when they reached one (a C{failure}).
    client_left: bool = False


#: The reason codes of L{LoginEvent}, documented in the README's audit schema.
REASONS = (
    "ok",                   # success
    "invalid_credentials",  # wrong password or token, unknown user
    "rejected",             # a checker's Reject (its own code and text)
    "throttled",            # too many failures: refused before any check
    "pool_full",            # the hash queue was full
    "backend_error",        # a checker failed (temporary)
    "temporary",            # another temporary failure
    "unsupported",          # no checker handles these credentials
    "cancelled",            # the client left before any verdict
)


@attrs.define
class AuthzEvent:
    """One authorization decision of the access policy (not frozen, as L{LoginEvent})."""

    time: float
    protocol: str | None
    listener: str | None
    resource: str
    privilege: str
    allowed: bool
    auth_info: IAuthInfo | None
    peer_address: str | None
    peer_port: int | None
    tls: bool | None


class Sink(Protocol):
    def login(self, event: LoginEvent) -> None: ...

    def authz(self, event: AuthzEvent) -> None: ...


class Events:
    """The hub: publishers call L{login}/L{authz}; each sink gets every event."""

    def __init__(self) -> None:
        #: The sinks, in the order added. Publishers test it before building an event.
        self.sinks: list[Sink] = []

    def add(self, sink: Sink) -> None:
        self.sinks.append(sink)

    def login(self, event: LoginEvent) -> None:
        for sink in self.sinks:
            sink.login(event)

    def authz(self, event: AuthzEvent) -> None:
        for sink in self.sinks:
            sink.authz(event)


def meta_fields(meta: Any) -> dict[str, Any]:
    """protocol, listener, peer address and port, TLS of a ConnectionMeta (or None)."""
    return {
        "protocol": getattr(meta, "protocol", None),
        "listener": getattr(meta, "listener", None),
        "peer_address": getattr(meta, "peer_address", None),
        "peer_port": getattr(meta, "peer_port", None),
        "tls": getattr(meta, "tls", None),
    }


__all__ = ["AuthzEvent", "Events", "LoginEvent", "REASONS", "Sink", "meta_fields"]
