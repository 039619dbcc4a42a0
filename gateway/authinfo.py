# -*- test-case-name: tests.test_authinfo -*-
"""
The authentication state of a session: who authenticated, in what context,
which groups they belong to and where they connected from.

The JSON shape is exactly KumoMTA's AuthInfo object::

    {"identities": [{"identity": "daniel", "context": "SmtpAuthPlainAuthentication"}],
     "groups": ["group1"], "peer_address": "127.0.0.1"}
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
from zope.interface import Attribute, Interface, implementer

from gateway.addresses import ip_or_none

#: The longest AuthInfo JSON text accepted (a checker's answer, not a file).
MAX_JSON = 65536


class IdentityContext(str, enum.Enum):
    """Where an identity came from (the seven contexts of KumoMTA)."""

    SmtpAuthPlainAuthorization = "SmtpAuthPlainAuthorization"
    SmtpAuthPlainAuthentication = "SmtpAuthPlainAuthentication"
    HttpBasicAuth = "HttpBasicAuth"
    BearerToken = "BearerToken"
    ProxyAuthRfc1929 = "ProxyAuthRfc1929"
    LocalSystem = "LocalSystem"
    GenericAuth = "GenericAuth"

    def __str__(self) -> str:
        return self.value


def _to_context(value: IdentityContext | str) -> IdentityContext:
    try:
        return IdentityContext(value)
    except ValueError:
        known = ", ".join(c.value for c in IdentityContext)
        raise ValueError(f"unknown identity context {value!r} (known: {known})") from None


def _to_identity_name(value: str | bytes) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if not isinstance(value, str):
        raise TypeError(f"identity must be a string, not {type(value).__name__}")
    if not value:
        raise ValueError("identity must not be empty")
    if not value.isprintable():  # controls, C1, line/paragraph separators, bidi and zero-width marks
        raise ValueError("identity must not contain control or invisible characters")
    return value


@attrs.frozen
class Identity:
    """One authenticated (or authorization) identity with its provenance."""

    identity: str = attrs.field(converter=_to_identity_name)
    context: IdentityContext = attrs.field(
        default=IdentityContext.GenericAuth, converter=_to_context
    )

    def to_json_dict(self) -> dict[str, str]:
        return {"identity": self.identity, "context": self.context.value}


class IAuthInfo(Interface):
    """
    The authentication state of one session, shared by every front door.

    Avatars handed out by the realm for SMTP, HTTP and SOCKS are adapted from it.
    """

    identities = Attribute("tuple of L{Identity}, in the order they were established")
    groups = Attribute("tuple of group names (str), without duplicates")
    peer_address = Attribute("the peer's IP address as a string, or None")

    def is_authenticated() -> bool:
        """True when at least one identity is present."""

    def identity_for(context: IdentityContext) -> str | None:
        """The first identity of the given context, or None."""

    def names() -> frozenset[str]:
        """Every identity name, whatever its context."""

    def to_json_dict() -> dict[str, Any]:
        """The KumoMTA-shaped dict."""


def _identities(value: Iterable[Identity | Mapping[str, Any]]) -> tuple[Identity, ...]:
    if isinstance(value, (str, bytes, Mapping)):
        raise TypeError("identities must be a list of {identity, context} objects")
    return tuple(v if isinstance(v, Identity) else _identity_from_dict(v) for v in value)


def _groups(value: Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, (str, bytes, Mapping)):
        raise TypeError("groups must be a list of strings")
    out: dict[str, None] = {}
    for group in value:
        if not isinstance(group, str) or not group:
            raise TypeError(f"group names must be non-empty strings, not {group!r}")
        if not group.isprintable():  # they become header values (Remote-Groups) and log text
            raise ValueError("group names must not contain control or invisible characters")
        out[group] = None
    return tuple(out)


def _peer(value: str | None) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError("peer_address must be a string or null")
    ip = ip_or_none(value)
    if ip is None:
        raise ValueError(f"peer_address must be an IP address, not {value[:64]!r}")
    return ip


def _empty_if_absent(value: Any) -> Any:
    """Missing, null, and Lua's empty table serialised as C{{}}, mean none."""
    if value is None or (isinstance(value, Mapping) and not value):
        return ()
    return value


def _identity_from_dict(data: Mapping[str, Any]) -> Identity:
    if not isinstance(data, Mapping):
        raise TypeError(f"an identity must be an object, not {type(data).__name__}")
    extra = set(data) - {"identity", "context"}
    if extra:
        raise ValueError(f"unknown identity field(s): {', '.join(sorted(extra))}")
    if "identity" not in data:
        raise ValueError("an identity needs an 'identity' field")
    return Identity(data["identity"], data.get("context", IdentityContext.GenericAuth))


@implementer(IAuthInfo)
@attrs.frozen
class AuthInfo:
    """Immutable L{IAuthInfo}. Build variations with L{attrs.evolve}."""

    identities: tuple[Identity, ...] = attrs.field(default=(), converter=_identities)
    groups: tuple[str, ...] = attrs.field(default=(), converter=_groups)
    peer_address: str | None = attrs.field(default=None, converter=_peer)

    def is_authenticated(self) -> bool:
        return bool(self.identities)

    def identity_for(self, context: IdentityContext | str) -> str | None:
        context = _to_context(context)
        for ident in self.identities:
            if ident.context is context:
                return ident.identity
        return None

    def names(self) -> frozenset[str]:
        return frozenset(i.identity for i in self.identities)

    def with_groups(self, groups: Iterable[str]) -> AuthInfo:
        """A copy with C{groups} appended (duplicates dropped, order kept)."""
        return attrs.evolve(self, groups=(*self.groups, *groups))

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "identities": [i.to_json_dict() for i in self.identities],
            "groups": list(self.groups),
            "peer_address": self.peer_address,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_json_dict(), separators=(",", ":"))

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> AuthInfo:
        """
        Build from the KumoMTA shape; every field is optional.

        @raise ValueError: for anything that is not that shape, with the reason.
        """
        if isinstance(data, AuthInfo):
            return data
        if not isinstance(data, Mapping):
            raise ValueError(f"an AuthInfo must be an object, not {type(data).__name__}")
        extra = set(data) - {"identities", "groups", "peer_address"}
        if extra:
            raise ValueError(f"unknown AuthInfo field(s): {', '.join(sorted(extra))}")
        try:
            return cls(
                identities=_empty_if_absent(data.get("identities")),
                groups=_empty_if_absent(data.get("groups")),
                peer_address=data.get("peer_address"),
            )
        except (TypeError, ValueError) as e:  # UnicodeDecodeError is a ValueError
            raise ValueError(f"malformed AuthInfo: {e}") from None

    @classmethod
    def from_json(cls, text: str | bytes) -> AuthInfo:
        if len(text) > MAX_JSON:
            raise ValueError(f"AuthInfo JSON is longer than {MAX_JSON} characters")
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
            raise ValueError(f"AuthInfo is not valid JSON: {e}") from None
        return cls.from_json_dict(data)


#: The state of a session before anyone has authenticated.
UNAUTHENTICATED = AuthInfo()
