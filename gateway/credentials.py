# -*- test-case-name: tests.test_credentials -*-
"""
Credentials for every front door. Each carries the L{ConnectionMeta} of its
connection and knows which L{IdentityContext} its identities get.

Usernames and passwords are C{str} (the protocols decode UTF-8); they still
match checkers that store C{bytes}, such as Twisted's own C{FilePasswordDB}.
Reprs never show a password or token.
"""

from __future__ import annotations

import hmac
from typing import Any, ClassVar

import attrs
from twisted.cred.credentials import ICredentials, IUsernamePassword
from zope.interface import Attribute, implementer

from gateway.authinfo import Identity, IdentityContext
from gateway.meta import ConnectionMeta


class IConnectionCredentials(ICredentials):
    """Credentials that know their connection and their identity context."""

    conn_meta = Attribute("the L{ConnectionMeta} of the connection they arrived on")
    context = Attribute("the L{IdentityContext} of the authenticated identity")
    claimed_identity = Attribute(
        "the name the client claimed (str), or None when it gave none (tokens); "
        "safe to log"
    )
    mechanism = Attribute("the wire mechanism: PLAIN, LOGIN, Basic, Bearer, RFC1929, ...")

    def identities_for(avatar_id: str) -> tuple[Identity, ...]:
        """The identities of a session whose checker returned C{avatar_id}."""


class ISASLCredentials(IConnectionCredentials, IUsernamePassword):
    """SMTP SASL username/password credentials; authzid is kept apart."""

    authzid = Attribute("the authorization identity requested (str, may be empty)")


class IHTTPBasicCredentials(IConnectionCredentials, IUsernamePassword):
    """HTTP Basic (RFC 7617) credentials."""


class IRFC1929Credentials(IConnectionCredentials, IUsernamePassword):
    """SOCKS5 username/password (RFC 1929) credentials."""


class IBearerToken(IConnectionCredentials):
    """An opaque bearer token (RFC 6750)."""

    token = Attribute("the token (str); a secret")

    def checkToken(expected: str | bytes) -> bool:
        """Constant-time comparison with a stored token."""


#: The longest user name, authzid or password accepted (RFC 4616 and RFC 1929
#: allow 255 octets; HTTP has no limit, so leave room).
MAX_FIELD = 1024
#: The longest bearer token accepted (JWTs can be large).
MAX_TOKEN = 8192


def _text(what: str, limit: int = MAX_FIELD):
    def convert(value: str | bytes) -> str:
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                value = None
            if value is None:
                # Raised outside the handler: the decode error holds the secret bytes.
                raise ValueError(f"{what} is not valid UTF-8")
        if not isinstance(value, str):
            raise TypeError(f"{what} must be str or bytes")
        if len(value) > limit:
            raise ValueError(f"{what} is longer than {limit} characters")
        return value

    return convert


def constant_time_equal(given: str | bytes, expected: str | bytes) -> bool:
    """Compare two secrets in time independent of where they differ."""
    if isinstance(given, str):
        given = given.encode("utf-8")
    if isinstance(expected, str):
        expected = expected.encode("utf-8")
    return hmac.compare_digest(given, expected)


@implementer(IConnectionCredentials, IUsernamePassword)
@attrs.frozen(eq=False)
class UsernamePassword:
    """
    A username and password from some front door. Subclasses fix the context.

    C{checkPassword} accepts the stored password as C{str} or C{bytes}.
    """

    username: str = attrs.field(converter=_text("username"))
    password: str = attrs.field(converter=_text("password"), repr=False)
    conn_meta: ConnectionMeta = attrs.field(factory=lambda: ConnectionMeta("generic"))
    mechanism: str = "PLAIN"

    context: ClassVar[IdentityContext] = IdentityContext.GenericAuth

    @property
    def claimed_identity(self) -> str:
        return self.username

    def checkPassword(self, password: str | bytes) -> bool:
        return constant_time_equal(self.password, password)

    def identities_for(self, avatar_id: str) -> tuple[Identity, ...]:
        return (Identity(avatar_id, self.context),)


@implementer(ISASLCredentials)
@attrs.frozen(eq=False)
class SASLCredentials(UsernamePassword):
    """
    SMTP AUTH PLAIN / LOGIN credentials: C{username} is the authcid.

    An empty authzid means "act as the authcid" (RFC 4616; KumoMTA does the same).
    """

    authzid: str = attrs.field(default="", converter=_text("authzid"), kw_only=True)

    context: ClassVar[IdentityContext] = IdentityContext.SmtpAuthPlainAuthentication

    @property
    def authcid(self) -> str:
        return self.username

    @property
    def effective_authzid(self) -> str:
        """The authzid the checker sees: the authcid when none was given."""
        return self.authzid or self.username

    def identities_for(self, avatar_id: str) -> tuple[Identity, ...]:
        """
        The authorization and authentication identities of C{avatar_id}; only
        the authentication identity when the client asked to act as someone
        else, since nothing has approved that yet (see L{identities_of}).
        """
        authn = Identity(avatar_id, IdentityContext.SmtpAuthPlainAuthentication)
        if self.authzid and self.authzid != avatar_id:
            return (authn,)
        return (Identity(avatar_id, IdentityContext.SmtpAuthPlainAuthorization), authn)


@implementer(IHTTPBasicCredentials)
@attrs.frozen(eq=False)
class HTTPBasicCredentials(UsernamePassword):
    mechanism: str = "Basic"
    context: ClassVar[IdentityContext] = IdentityContext.HttpBasicAuth


@implementer(IRFC1929Credentials)
@attrs.frozen(eq=False)
class RFC1929Credentials(UsernamePassword):
    mechanism: str = "RFC1929"
    context: ClassVar[IdentityContext] = IdentityContext.ProxyAuthRfc1929


@implementer(IBearerToken)
@attrs.frozen(eq=False)
class BearerToken:
    """An HTTP Bearer token (or an SMTP OAUTHBEARER/XOAUTH2 one)."""

    token: str = attrs.field(converter=_text("token", MAX_TOKEN), repr=False)
    conn_meta: ConnectionMeta = attrs.field(factory=lambda: ConnectionMeta("generic"))
    mechanism: str = "Bearer"

    context: ClassVar[IdentityContext] = IdentityContext.BearerToken
    claimed_identity: ClassVar[None] = None

    def checkToken(self, expected: str | bytes) -> bool:
        return constant_time_equal(self.token, expected)

    def identities_for(self, avatar_id: str) -> tuple[Identity, ...]:
        return (Identity(avatar_id, self.context),)


def requested_authzid(credentials: Any) -> str:
    """The authzid SASL credentials ask for ("" for none, and for other credentials)."""
    return credentials.authzid if ISASLCredentials.providedBy(credentials) else ""


def identities_of(
    credentials: Any, avatar_id: str, *, authzid_approved: bool = False
) -> tuple[Identity, ...]:
    """
    The identities a login as C{avatar_id} with C{credentials} proves, in the
    context of the credentials' protocol (C{GenericAuth} for credentials that
    do not come from a front door).

    SASL credentials asking to act as someone else (an authzid other than
    C{avatar_id}) get the authorization identity only when
    C{authzid_approved}: pass it only after your own code decided that
    C{avatar_id} may act as that authzid. Otherwise they get just the
    authentication identity, and the realm decides (L{gateway.realm.Realm}:
    the ACL may grant it, else the login fails). An unchecked authzid never
    becomes an identity (RFC 4616 section 2).
    """
    if not IConnectionCredentials.providedBy(credentials):
        return (Identity(avatar_id, IdentityContext.GenericAuth),)
    identities = tuple(credentials.identities_for(avatar_id))
    authzid = requested_authzid(credentials)
    if authzid_approved and authzid and authzid != avatar_id:
        return (Identity(authzid, IdentityContext.SmtpAuthPlainAuthorization), *identities)
    return identities


def secrets_of(credentials: Any) -> tuple[str, ...]:
    """The secret strings carried by C{credentials}."""
    return tuple(
        s
        for s in (getattr(credentials, "password", None), getattr(credentials, "token", None))
        if isinstance(s, str) and s
    )


def _spellings(secret: str) -> set[str]:
    """How a secret may appear in an exception's text: as is, or escaped by repr."""
    raw = secret.encode("utf-8", "surrogatepass")
    return {secret, repr(secret)[1:-1], repr(raw)[2:-1], raw.decode("latin-1")} - {""}


def safe_message(error: BaseException, secrets: tuple[str, ...]) -> str:
    """
    An exception's message for a log line, or a placeholder when any
    spelling of a secret occurs in it. Never a partial redaction: replacing
    the secret inside other text would reveal it (a password "defer" would
    turn "twisted/internet/defer.py" into a hint).
    """
    text, shown = str(error), repr(error)
    for secret in secrets:
        if any(form in text or form in shown for form in _spellings(secret)):
            return "(message withheld: it may contain the credentials)"
    return text[:500]
