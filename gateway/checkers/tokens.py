# -*- test-case-name: tests.test_tokens -*-
"""
The Bearer token file: one C{DIGEST:USER:GROUPS:CREATED} line per token.

Only the SHA-256 digest of a token is stored, so the file does not hold a
usable secret; the clear token is returned once by L{add_token}. A token is
known by its I{token id}, the first 12 hex digits of its digest, which is what
C{authgateway token list} shows and C{token revoke} accepts.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

import attrs
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.strcred import ICheckerFactory
from twisted.internet import defer
from twisted.plugin import IPlugin
from zope.interface import implementer

from gateway.authinfo import AuthInfo
from gateway.checkers.files import (
    FileChecker,
    StoreError,
    append_line,
    atomic_write,
    check_groups,
    check_rewritable,
    check_user_name,
    first_field,
    frozen,
    locked,
    parse_groups_field,
    read_existing,
    read_text,
    records,
    split_bom,
    split_lines,
)
from gateway.credentials import MAX_TOKEN, IBearerToken, identities_of
from gateway.text import quote, utc_timestamp

TOKEN_PREFIX = "agw_"

#: How many hex digits of the digest make a token id.
TOKEN_ID_LENGTH = 12

#: The shortest digest prefix C{revoke} accepts.
MIN_PREFIX = 6

_DIGEST = re.compile(r"[0-9a-f]{64}")
_PREFIX = re.compile(r"[0-9a-f]+")
_NO_DIGEST = "0" * 64


def new_token() -> str:
    """A fresh token: L{TOKEN_PREFIX} and 256 random bits, URL-safe."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """The stored form of C{token}: the hex SHA-256 of its UTF-8 bytes."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


@attrs.frozen(repr=False)
class TokenEntry:
    """One token of the file: its digest and whom it authenticates."""

    digest: str
    user: str
    groups: tuple[str, ...] = ()
    created: str = ""
    lineno: int = 0

    @property
    def token_id(self) -> str:
        """The short name of the token: the first 12 hex digits of its digest."""
        return self.digest[:TOKEN_ID_LENGTH]

    def __repr__(self) -> str:
        return (
            f"TokenEntry(token_id={self.token_id!r}, user={self.user!r}, "
            f"groups={self.groups!r}, created={self.created!r}, lineno={self.lineno!r})"
        )


@attrs.frozen
class TokenTable:
    """The usable tokens of one file, by digest, and what was wrong with the rest."""

    path: str
    by_digest: Mapping[str, TokenEntry] = attrs.field(
        converter=frozen, hash=False, repr=False
    )
    problems: tuple[str, ...] = ()

    def lookup(self, token: str) -> TokenEntry | None:
        """
        The entry for a presented token, or C{None}. The final comparison is
        constant-time; tokens longer than L{MAX_TOKEN} are not even hashed.
        """
        if not token or len(token) > MAX_TOKEN:
            return None
        try:
            digest = token_digest(token)
        except UnicodeEncodeError:
            return None
        entry = self.by_digest.get(digest)
        stored = entry.digest if entry is not None else _NO_DIGEST
        if hmac.compare_digest(stored, digest) and entry is not None:
            return entry
        return None

    def for_user(self, user: str) -> tuple[TokenEntry, ...]:
        """The tokens of C{user}, in file order."""
        return tuple(e for e in self.by_digest.values() if e.user == user)

    def __len__(self) -> int:
        return len(self.by_digest)


def _is_time(text: str) -> bool:
    try:
        datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except ValueError:
        return False
    return True


def parse_tokens(text: str, path: str = "<tokens>") -> TokenTable:
    """
    Parse token-file text. Blank and C{#} lines are ignored, CRLF is accepted;
    a malformed line is skipped and reported as C{PATH:LINE: reason}.
    """
    entries: dict[str, TokenEntry] = {}
    problems: list[str] = []
    for lineno, line in records(text, path, problems):
        fields = line.split(":", 3)  # CREATED has colons of its own
        if len(fields) != 4:
            problems.append(
                f"{path}:{lineno}: expected DIGEST:USER:GROUPS:CREATED, "
                f"found {len(fields)} field{'s' if len(fields) != 1 else ''}"
            )
            continue
        digest, user, group_field, created = fields
        if not _DIGEST.fullmatch(digest):
            problems.append(f"{path}:{lineno}: digest is not 64 lowercase hex digits")
            continue
        if not user:
            problems.append(f"{path}:{lineno}: empty user name")
            continue
        if digest in entries:
            problems.append(
                f"{path}:{lineno}: duplicate token {digest[:TOKEN_ID_LENGTH]} "
                f"(line {entries[digest].lineno} wins)"
            )
            continue
        if created and not _is_time(created):
            problems.append(
                f"{path}:{lineno}: CREATED is not an ISO-8601 time like 2026-11-23T15:04:05Z"
            )
            continue
        groups, problem = parse_groups_field(group_field)
        if problem:
            problems.append(f"{path}:{lineno}: user {quote(user)}: {problem}")
            continue
        entries[digest] = TokenEntry(digest, user, groups, created, lineno)
    return TokenTable(path, entries, tuple(problems))


def add_token(
    path: str | os.PathLike[str],
    user: str,
    *,
    groups: Iterable[str] = (),
    now: Callable[[], datetime] | None = None,
) -> tuple[str, TokenEntry]:
    """
    Make a token for C{user} and store its digest, creating the file if needed.

    @param now: the clock, returning an aware (or UTC naive) datetime.
    @return: the clear token, which is not kept anywhere, and its entry.
    @raise StoreError: bad user or group name, or the file cannot be written.
    """
    name = os.fspath(path)
    check_user_name(user)
    group_names = check_groups(groups)
    created = utc_timestamp((now or _utcnow)())
    check_rewritable(name)
    with locked(name):
        bom, body = split_bom(read_existing(name, follow_links=False) or "")
        taken = {first_field(line) for line in split_lines(body)}
        token = new_token()
        while token_digest(token) in taken:  # pragma: no cover - 2**-256
            token = new_token()
        entry_fields = (token_digest(token), user, ",".join(group_names), created)
        body = append_line(body, ":".join(entry_fields))
        atomic_write(name, bom + body)
    lineno = len(split_lines(body))
    return token, TokenEntry(entry_fields[0], user, group_names, created, lineno)


def revoke(path: str | os.PathLike[str], user_or_prefix: str) -> list[TokenEntry]:
    """
    Revoke every token of a user, or the one token whose digest starts with
    a prefix of at least L{MIN_PREFIX} hex digits (its token id), or a clear
    token pasted whole. A user name is tried first.

    @return: the revoked entries, in file order.
    @raise StoreError: missing file, nothing matches, or an ambiguous prefix.
    """
    name = os.fspath(path)
    key = user_or_prefix
    check_rewritable(name)
    with locked(name):
        text = read_text(name, follow_links=False)
        table = parse_tokens(text, name)
        targets = list(table.for_user(key))
        if not targets and TOKEN_PREFIX in key:  # a pasted token: never echo it
            entry = table.lookup(key.strip())
            if entry is None:
                raise StoreError(f"{name}: no such token (the token is not shown)")
            targets = [entry]
        if not targets:
            prefix = key.lower()
            if not _PREFIX.fullmatch(prefix) or len(prefix) < MIN_PREFIX:
                hint = ""
                if _PREFIX.fullmatch(prefix):
                    hint = f" (a token id needs at least {MIN_PREFIX} hex digits)"
                raise StoreError(f"{name}: no tokens for user {quote(key)}{hint}")
            targets = [e for e in table.by_digest.values() if e.digest.startswith(prefix)]
            if not targets:
                raise StoreError(f"{name}: no user or token id {quote(key)}")
            if len(targets) > 1:
                raise StoreError(
                    f"{name}: token id {quote(key)} is ambiguous: "
                    f"it matches {len(targets)} tokens"
                )
        revoked = {e.digest for e in targets}
        bom, body = split_bom(text)
        kept = [line for line in split_lines(body) if first_field(line) not in revoked]
        atomic_write(name, bom + "".join(kept))
    return targets


def list_tokens(path: str | os.PathLike[str]) -> TokenTable:
    """
    Read and parse the token file at C{path}.

    @raise StoreError: the file is missing or unreadable.
    """
    name = os.fspath(path)
    return parse_tokens(read_text(name), name)


@implementer(ICredentialsChecker)
class TokenChecker(FileChecker[TokenTable]):
    """
    C{--auth tokens:PATH}: Bearer tokens (HTTP now, SMTP OAUTHBEARER/XOAUTH2
    later) looked up by SHA-256 digest. Hashing a token costs microseconds,
    so it runs inline. The file is looked at on every login and reloaded once
    it changes, in the service's reload thread (a token file may be large),
    inline for a checker used on its own.
    """

    credentialInterfaces = (IBearerToken,)
    parse = staticmethod(parse_tokens)

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[AuthInfo]:
        def look_up(table: TokenTable) -> AuthInfo:
            entry = table.lookup(credentials.token)
            if entry is None:
                raise UnauthorizedLogin()
            return AuthInfo(identities_of(credentials, entry.user), entry.groups)

        return self.file.current().addCallback(look_up)


@implementer(ICheckerFactory, IPlugin)
class TokenCheckerFactory:
    """The C{--auth tokens:PATH} plugin."""

    authType = "tokens"
    argStringFormat = "PATH"
    authHelp = (
        "Bearer tokens stored as SHA-256 digests with their user and groups; "
        "manage them with 'authgateway token'. Re-read when the file changes."
    )
    credentialInterfaces = (IBearerToken,)

    def generateChecker(self, argstring: str) -> TokenChecker:
        if not argstring:
            raise StoreError("a file name is required")
        return TokenChecker(argstring)
