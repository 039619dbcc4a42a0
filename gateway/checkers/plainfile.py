# -*- test-case-name: tests.test_plainfile -*-
"""
C{--auth file:PATH}: Twisted's clear-text C{user:password} file, the format
of C{twisted.cred.checkers.FilePasswordDB}, served the way the gateway's
other stores are.

C{FilePasswordDB} re-reads the whole file, without a size bound, on the
reactor thread at every login, and an unknown user scans it to the end
while a known one stops at its line. Here the file is a L{WatchedFile}:
parsed once into a table, reloaded (off the reactor thread in the gateway)
when it changes, and a login costs one look-up and one constant-time
comparison whether or not the user exists.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

import attrs
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from zope.interface import implementer

from gateway.checkers.files import FileChecker, frozen, records
from gateway.text import quote


@attrs.frozen
class PlainTable:
    """User -> clear-text password; the first line naming a user wins."""

    path: str
    passwords: Mapping[str, str] = attrs.field(converter=frozen, repr=False)
    problems: tuple[str, ...] = ()


def parse_plain(text: str, path: str = "<file>") -> PlainTable:
    """C{user:password[:...]} lines; blank and C{#} lines are passed over."""
    passwords: dict[str, str] = {}
    problems: list[str] = []
    for lineno, line in records(text, path, problems):
        user, colon, rest = line.partition(":")
        if not colon or not user:
            problems.append(f"{path}:{lineno}: expected USER:PASSWORD")
            continue
        if user in passwords:
            problems.append(f"{path}:{lineno}: duplicate user {quote(user)} (the first wins)")
            continue
        passwords[user] = rest.partition(":")[0]
    return PlainTable(path, passwords, tuple(problems))


@implementer(ICredentialsChecker)
class PlainFileChecker(FileChecker[PlainTable]):
    """
    Users of a clear-text C{user:password} file. Also answers
    C{IUsernameHashedPassword} credentials (CRAM-MD5 and kin), which need
    the clear text to check against.
    """

    credentialInterfaces = (IUsernamePassword, IUsernameHashedPassword)
    parse = staticmethod(parse_plain)
    #: What an unknown user's password is compared with.
    _nobody = secrets.token_urlsafe(32)

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[str]:
        def check(table: PlainTable) -> str:
            user = credentials.username
            if isinstance(user, bytes):
                user = user.decode("utf-8", "replace")
            stored = table.passwords.get(user)
            # Bytes: what Twisted's own credentials (CramMD5Credentials) take.
            expected = stored if stored is not None else self._nobody
            matched = credentials.checkPassword(expected.encode("utf-8"))
            if stored is None or not matched:
                raise UnauthorizedLogin()
            return user

        return self.file.current().addCallback(check)
