# -*- test-case-name: tests.test_smtp_sasl -*-
"""
SASL mechanisms for SMTP AUTH (RFC 4954): PLAIN (RFC 4616) and LOGIN built
in, and any Twisted L{IChallengeResponse} class registered by name.

A mechanism is a Twisted C{IChallengeResponse}: the server sends
C{getChallenge()}, hands each decoded client response to C{setResponse()}
and asks again while C{moreChallenges()}. The built-ins also provide
L{ISASLMechanism}, which turns the finished exchange into the gateway's
L{SASLCredentials} (authzid and authcid kept apart, with the connection's
metadata); a third-party mechanism object is itself the credentials given to
the Portal, as in Twisted's own ESMTP (e.g. C{CramMD5Credentials}).
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from twisted.mail.interfaces import IChallengeResponse
from twisted.python.reflect import namedAny
from zope.interface import Attribute, implementer

from gateway.credentials import SASLCredentials
from gateway.meta import ConnectionMeta
from gateway.smtp.codec import MAX_COMMAND_LINE

#: Longest AUTH command or response line (RFC 4954 section 4).
MAX_AUTH_LINE = MAX_COMMAND_LINE
#: Longest PLAIN field in octets (RFC 4616 section 2).
MAX_PLAIN_FIELD = 255

_BASE64 = re.compile(rb"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")


class SASLError(Exception):
    """An AUTH exchange ends with this reply; the text never holds client data."""

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        super().__init__(f"{code} {enhanced} {text}")
        self.code = code
        self.enhanced = enhanced
        self.text = text


def cancelled() -> SASLError:
    return SASLError(501, "5.7.0", "Authentication cancelled")


def malformed(what: str = "response") -> SASLError:
    return SASLError(501, "5.5.2", f"Malformed {what}")


def decode(line: bytes, initial: bool = False) -> bytes:
    """
    Decode one client response: strict base64 (RFC 4648 alphabet, padding
    only at the end); C{*} cancels; C{=} is an empty initial response.

    @raise SASLError: 501 5.7.0 for C{*}, 501 5.5.2 for anything not base64.
    """
    if line == b"*":
        raise cancelled()
    if initial and line == b"=":
        return b""
    if not _BASE64.fullmatch(line):
        raise SASLError(501, "5.5.2", "Invalid base64 data")
    try:
        return base64.b64decode(line, validate=True)
    except binascii.Error:  # pragma: no cover - the pattern already checked
        raise SASLError(501, "5.5.2", "Invalid base64 data") from None


def encode(challenge: bytes) -> bytes:
    return base64.b64encode(challenge)


class ISASLMechanism(IChallengeResponse):
    """A mechanism that builds the gateway's credentials when it is done."""

    name = Attribute("the mechanism name, upper case")
    plaintext = Attribute("True when the password crosses the wire: offered under TLS only")

    def credentials(conn_meta: ConnectionMeta) -> Any:
        """The credentials to log in with, once C{moreChallenges()} is False."""


def _text(field: bytes, what: str) -> str:
    if len(field) > MAX_PLAIN_FIELD:
        raise malformed(f"{what} (longer than {MAX_PLAIN_FIELD} octets)")
    try:
        return field.decode("utf-8")
    except UnicodeDecodeError:
        pass
    raise malformed(f"{what} (not UTF-8)")


@implementer(ISASLMechanism)
class Plain:
    """RFC 4616: one response C{authzid NUL authcid NUL passwd}; empty challenge."""

    name = "PLAIN"
    plaintext = True
    initial_response = True

    def __init__(self) -> None:
        self._fields: tuple[str, str, str] | None = None

    def __repr__(self) -> str:
        return "<Plain>"

    def getChallenge(self) -> bytes:
        return b""

    def setResponse(self, response: bytes) -> None:
        parts = response.split(b"\0")
        if len(parts) != 3:
            raise malformed("PLAIN response")
        authzid, authcid, password = (
            _text(p, what) for p, what in zip(parts, ("authzid", "authcid", "password"))
        )
        if not authcid:
            raise malformed("PLAIN response (empty authcid)")
        self._fields = (authzid, authcid, password)

    def moreChallenges(self) -> bool:
        return self._fields is None

    def credentials(self, conn_meta: ConnectionMeta) -> SASLCredentials:
        assert self._fields is not None
        authzid, authcid, password = self._fields
        return SASLCredentials(authcid, password, conn_meta, mechanism=self.name, authzid=authzid)


@implementer(ISASLMechanism)
class Login:
    """
    The de-facto LOGIN mechanism: challenges C{Username:} then C{Password:}
    (the texts every client expects; Go and curl break on others).
    """

    name = "LOGIN"
    plaintext = True
    #: Clients (smtplib among them) send the user name with the AUTH command.
    initial_response = True

    def __init__(self) -> None:
        self._user: str | None = None
        self._password: str | None = None

    def __repr__(self) -> str:
        return "<Login>"

    def getChallenge(self) -> bytes:
        return b"Username:" if self._user is None else b"Password:"

    def setResponse(self, response: bytes) -> None:
        if self._user is None:
            self._user = _text(response, "user name")
            if not self._user:
                raise malformed("user name (empty)")
        else:
            self._password = _text(response, "password")

    def moreChallenges(self) -> bool:
        return self._password is None

    def credentials(self, conn_meta: ConnectionMeta) -> SASLCredentials:
        assert self._user is not None and self._password is not None
        return SASLCredentials(self._user, self._password, conn_meta, mechanism=self.name)


#: The mechanisms every gateway knows, in the order they are advertised.
BUILTIN: dict[str, Any] = {"PLAIN": Plain, "LOGIN": Login}


def is_plaintext(factory: Any) -> bool:
    """Whether a mechanism sends the password itself: only under TLS. Unknown: yes."""
    return bool(getattr(factory, "plaintext", True))


def credentials_of(mechanism: Any, conn_meta: ConnectionMeta) -> Any:
    """What to log in with once a mechanism is done."""
    if ISASLMechanism.providedBy(mechanism):
        return mechanism.credentials(conn_meta)
    try:  # a third-party IChallengeResponse: let its checker see the connection
        mechanism.conn_meta = conn_meta
    except AttributeError:
        pass
    return mechanism


def load_mechanism(spec: str) -> tuple[str, Any]:
    """
    C{NAME=dotted.Name}: a class (or zero-argument factory) of objects
    providing Twisted's C{IChallengeResponse}, offered as SASL mechanism NAME.

    @raise ValueError: with a one-line reason.
    """
    name, sep, dotted = spec.partition("=")
    name = name.strip().upper()
    if not sep or not re.fullmatch(r"[A-Z0-9_-]{1,20}", name) or not dotted:
        raise ValueError(f"{spec!r}: expected NAME=dotted.Name (NAME: letters, digits, - and _)")
    try:
        factory = namedAny(dotted)
    except Exception as e:  # noqa: BLE001 - any import problem is the user's to see
        raise ValueError(f"cannot import {dotted!r}: {e}") from None
    if not callable(factory):
        raise ValueError(f"{dotted!r} is not a class or factory")
    if not IChallengeResponse.implementedBy(factory) and not callable(
        getattr(factory, "getChallenge", None)
    ):
        raise ValueError(f"{dotted!r} does not provide IChallengeResponse")
    return name, factory
