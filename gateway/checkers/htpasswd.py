# -*- test-case-name: tests.test_htpasswd -*-
"""
Apache/nginx htpasswd files: C{user:hash} lines, parsed into an immutable
L{PasswordTable}, and the rewrites behind C{authgateway user add/del/list}.

nginx allows a third, free-form field; when it starts with C{groups=} we read
it as a comma-separated group list. A line that cannot be used is skipped and
reported as C{PATH:LINE: reason}; it never stops the other users, and its hash
is never shown. As in Apache, the first line naming a user wins.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.strcred import ICheckerFactory
from twisted.internet import defer
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from gateway.authinfo import AuthInfo
from gateway.checkers import hashes
from gateway.checkers.files import (
    FileChecker,
    StoreError,
    append_line,
    atomic_write,
    check_groups,
    check_rewritable,
    check_user_name,
    directory_of,
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
from gateway.checkers.hashing import IHashingChecker, Verifier
from gateway.credentials import identities_of
from gateway.text import quote

_GROUPS = "groups="

_log = Logger()


@attrs.frozen
class PasswordEntry:
    """One user of an htpasswd file; the repr leaves the hash out."""

    user: str
    hash: str = attrs.field(repr=False)
    groups: tuple[str, ...] = ()
    lineno: int = 0
    #: The hash scheme, such as C{bcrypt} or C{apr1}, and its work factor
    #: (L{hashes.cost_of}); worked out once, when the line is read.
    scheme: str = attrs.field(
        default=attrs.Factory(lambda self: hashes.scheme_of(self.hash), takes_self=True)
    )
    cost: str = attrs.field(
        default=attrs.Factory(lambda self: hashes.cost_of(self.hash), takes_self=True)
    )


@attrs.frozen
class PasswordTable:
    """The usable entries of one htpasswd file, and what was wrong with the rest."""

    path: str
    entries: Mapping[str, PasswordEntry] = attrs.field(converter=frozen, hash=False)
    problems: tuple[str, ...] = ()

    @property
    def legacy(self) -> frozenset[str]:
        """The weak schemes in use (apr1, sha1, ...): users to re-add with bcrypt."""
        return frozenset(e.scheme for e in self.entries.values()) & hashes.LEGACY_SCHEMES

    def __len__(self) -> int:
        return len(self.entries)


def parse_htpasswd(text: str, path: str = "<htpasswd>") -> PasswordTable:
    """
    Parse htpasswd text. Blank and C{#} lines are ignored, CRLF is accepted.

    @param path: the file name used in problem reports.
    """
    entries: dict[str, PasswordEntry] = {}
    first_line: dict[str, int] = {}
    problems: list[str] = []
    for lineno, line in records(text, path, problems):
        user, colon, rest = line.partition(":")
        if not colon:
            problems.append(f"{path}:{lineno}: no ':' between user name and hash")
            continue
        if not user:
            problems.append(f"{path}:{lineno}: empty user name")
            continue
        if user in first_line:
            problems.append(
                f"{path}:{lineno}: duplicate user {quote(user)} "
                f"(line {first_line[user]} wins)"
            )
            continue
        first_line[user] = lineno
        hash_, _, comment = rest.partition(":")
        if not hash_:
            problems.append(f"{path}:{lineno}: empty hash for user {quote(user)}")
            continue
        try:
            scheme = hashes.scheme_of(hash_)
        except hashes.UnsupportedHash as e:
            problems.append(f"{path}:{lineno}: user {quote(user)}: {e}")
            continue
        groups: tuple[str, ...] = ()
        if comment.startswith(_GROUPS):
            groups, problem = parse_groups_field(comment[len(_GROUPS) :])
            if problem:
                problems.append(f"{path}:{lineno}: user {quote(user)}: {problem}")
                continue
        entries[user] = PasswordEntry(user, hash_, groups, lineno, scheme)
    return PasswordTable(path, entries, tuple(problems))


def add_user(
    path: str | os.PathLike[str],
    user: str,
    password: str,
    *,
    groups: Iterable[str] = (),
    scheme: str = "bcrypt",
    cost: int | None = None,
) -> bool:
    """
    Add C{user} to the htpasswd file at C{path}, creating the file if needed.
    The hash is computed before the file is locked.

    @return: whether the file was created.
    @raise StoreError: bad user or group name, user already present, bad
        scheme/cost/password, or the file or its directory cannot be used.
    """
    name = os.fspath(path)
    check_user_name(user)
    group_names = check_groups(groups)
    directory = directory_of(name)
    if not os.path.isdir(directory):
        raise StoreError(f"{directory}: no such directory")
    check_rewritable(name)
    _refuse_duplicate(name, read_existing(name, follow_links=False), user)
    try:
        password.encode("utf-8")
    except UnicodeEncodeError:
        raise StoreError("password is not valid Unicode") from None
    try:
        stored = hashes.make_hash(password, scheme, cost=cost)
    except ValueError as e:
        raise StoreError(str(e)) from None
    line = f"{user}:{stored}"
    if group_names:
        line += f":{_GROUPS}{','.join(group_names)}"
    with locked(name):
        text = read_existing(name, follow_links=False)
        _refuse_duplicate(name, text, user)
        bom, body = split_bom(text or "")
        atomic_write(name, bom + append_line(body, line))
    return text is None


def _refuse_duplicate(name: str, text: str | None, user: str) -> None:
    if text is None:
        return
    _, body = split_bom(text)
    if any(first_field(line) == user for line in split_lines(body)):
        raise StoreError(f"{name}: user {quote(user)} already exists")


def delete_user(path: str | os.PathLike[str], user: str) -> None:
    """
    Remove every line naming C{user} (a later duplicate must not take over).

    @raise StoreError: the file is missing or has no such user.
    """
    name = os.fspath(path)
    check_rewritable(name)
    with locked(name):
        bom, body = split_bom(read_text(name, follow_links=False))
        lines = split_lines(body)
        kept = [line for line in lines if first_field(line) != user]
        if len(kept) == len(lines):
            raise StoreError(f"{name}: no user {quote(user)}")
        atomic_write(name, bom + "".join(kept))


def list_users(path: str | os.PathLike[str]) -> PasswordTable:
    """
    Read and parse the htpasswd file at C{path}.

    @raise StoreError: the file is missing or unreadable.
    """
    name = os.fspath(path)
    return parse_htpasswd(read_text(name), name)


#: More distinct hash costs than this in one file earn a warning: every
#: login verifies one hash of each.
MANY_COST_CLASSES = 3


@attrs.frozen
class _Served:
    """A parsed file and one dummy hash per cost class (L{hashes.cost_of}) in it."""

    table: PasswordTable
    dummies: Mapping[str, str] = attrs.field(converter=frozen, repr=False)


@implementer(ICredentialsChecker, IHashingChecker)
class HtpasswdChecker(FileChecker[_Served]):
    """
    C{--auth htpasswd:PATH}: users of an Apache/nginx htpasswd file.

    Verification goes through a L{Verifier}: in the gateway, the service's
    (its bounded L{gateway.checkers.hashing.HashPool} and cache, given by
    L{use_verifier}). A checker built on its own (a unit test; strcred's
    C{--auth htpasswd:} until the service hands it its own) verifies inline,
    in the caller's thread, so a test sees the result at once; its file
    reload is inline too. Used under another twistd plugin it would
    therefore hash on the reactor thread: pass it
    C{Verifier(hashes.verify, pool)} with a started C{HashPool} (a child
    service of that plugin's) instead.

    Every login costs the same whoever it names: the file's hashes fall into
    cost classes (bcrypt cost 12, {SHA}, ...), and each login verifies exactly
    one hash of every class in one pool job: the user's own hash for its
    class and a dummy for each other class (an unknown user: a dummy of every
    class). In a file mixing bcrypt and {SHA}, a known {SHA} user therefore
    costs a bcrypt too, and an unknown one no less than a known bcrypt user.

    The file is looked at on every login and reloaded once it changes (in the
    service's reload thread, inline for a checker used on its own); problems
    are logged, never fatal.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(
        self,
        path: str | os.PathLike[str],
        verifier: Verifier | None = None,
        loader: Callable[..., defer.Deferred[Any]] | None = None,
        clock: Any = None,
    ) -> None:
        # Inline unless given one; the gateway's service replaces it (use_verifier).
        self.verifier = verifier if verifier is not None else Verifier(hashes.verify)
        self._legacy_warned = False
        self._classes_warned = False
        self._dummies: Mapping[str, str] = {}
        super().__init__(path, loader, clock)

    def use_verifier(self, verifier: Verifier) -> None:
        self.verifier = verifier

    def parse(self, text: str, path: str) -> _Served:
        """
        Parse and make the dummies of new cost classes (in the reload thread:
        a bcrypt dummy takes as long as a login); known classes keep theirs.
        """
        table = parse_htpasswd(text, path)
        known = self._dummies
        templates: dict[str, str] = {}
        for entry in table.entries.values():
            templates.setdefault(entry.cost, entry.hash)
        dummies = {
            cost: known.get(cost) or hashes.dummy_like(template)
            for cost, template in templates.items()
        }
        return _Served(table, dummies)

    def _loaded(self, served: _Served) -> None:
        table = served.table
        self._dummies = served.dummies
        super()._loaded(table)
        if table.legacy and not self._legacy_warned:
            self._legacy_warned = True
            _log.warn(
                "{path}: weak legacy hashes in use ({schemes}); re-add those users "
                "with 'authgateway user add' (bcrypt)",
                path=table.path,
                schemes=", ".join(sorted(table.legacy)),
            )
        if len(served.dummies) > MANY_COST_CLASSES and not self._classes_warned:
            self._classes_warned = True
            _log.warn(
                "{path}: {count} different hash costs ({costs}); every login verifies one "
                "hash of each so that unknown users cost what known ones do: re-add users "
                "with one scheme and cost",
                path=table.path,
                count=len(served.dummies),
                costs=", ".join(sorted(served.dummies)),
            )

    @property
    def table(self) -> PasswordTable:
        """The table in use now (without looking for a change)."""
        return self.file.value.table

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[Any]:
        user, password = credentials.username, credentials.password
        if isinstance(user, bytes) or isinstance(password, bytes):
            try:
                user, password = _text(user), _text(password)
            except UnicodeDecodeError:
                return defer.fail(UnauthorizedLogin())
        return self.file.current().addCallback(self._check, credentials, user, password)

    def _check(self, served: _Served, credentials: Any, user: str, password: str) -> Any:
        entry = served.table.entries.get(user)
        if entry is not None:
            stored = entry.hash
            decoys = [dummy for cost, dummy in served.dummies.items() if cost != entry.cost]
        elif served.dummies:
            stored, *decoys = served.dummies.values()
        else:  # an empty file: nobody to pretend to be
            raise UnauthorizedLogin()

        def verified(ok: bool) -> AuthInfo:
            if not ok or entry is None:
                raise UnauthorizedLogin()
            return AuthInfo(identities_of(credentials, entry.user), entry.groups)

        return self.verifier.verify(user, password, stored, decoys).addCallback(verified)


def _text(value: str | bytes) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


@implementer(ICheckerFactory, IPlugin)
class HtpasswdCheckerFactory:
    """The C{--auth htpasswd:PATH} plugin."""

    authType = "htpasswd"
    argStringFormat = "PATH"
    authHelp = (
        "An Apache/nginx htpasswd file (bcrypt, argon2id, SHA-crypt; legacy apr1, "
        "{SHA}, {SSHA} with a warning). A third field 'groups=a,b' gives groups. "
        "Re-read when it changes; manage it with 'authgateway user'."
    )
    credentialInterfaces = (IUsernamePassword,)

    def generateChecker(self, argstring: str) -> HtpasswdChecker:
        if not argstring:
            raise StoreError("a file name is required")
        return HtpasswdChecker(argstring)
