# -*- test-case-name: tests.test_groups -*-
"""
The C{--groups} file (Apache htgroup format): group name -> members, read
once at start-up into an immutable L{GroupMap}, so a bad file stops the start
with file, line and reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from types import MappingProxyType

import attrs

from gateway.checkers.files import StoreError, read_text
from gateway.text import quote as _quote


class ConfigError(Exception):
    """A group or ACL file cannot be used; the message is one line naming file, line and reason."""


def read_config(path: str | os.PathLike[str]) -> str:
    """The UTF-8 contents of a configuration file, or L{ConfigError} saying why not."""
    try:
        return read_text(path)
    except StoreError as e:
        raise ConfigError(str(e)) from None


def _group_members(value: Mapping[str, Iterable[str]]) -> Mapping[str, tuple[str, ...]]:
    if not isinstance(value, Mapping):
        raise TypeError("groups must be a mapping of group name to members")
    out: dict[str, tuple[str, ...]] = {}
    for group, members in value.items():
        if not isinstance(group, str) or not group:
            raise ValueError(f"group names must be non-empty strings, not {group!r}")
        if isinstance(members, (str, bytes)):
            raise TypeError(f"members of group {group!r} must be a list of names, not a string")
        unique: dict[str, None] = {}
        for member in members:
            if not isinstance(member, str) or not member:
                raise ValueError(f"members of group {group!r} must be non-empty strings")
            unique[member] = None
        out[group] = tuple(unique)
    return MappingProxyType(out)


@attrs.frozen
class GroupMap:
    """Group name -> members, in file order; answers which groups a user is in."""

    members: Mapping[str, tuple[str, ...]] = attrs.field(converter=_group_members, hash=False)
    _by_user: Mapping[str, frozenset[str]] = attrs.field(
        init=False, repr=False, eq=False, hash=False
    )

    def __attrs_post_init__(self) -> None:
        by_user: dict[str, set[str]] = {}
        for group, members in self.members.items():
            for member in members:
                by_user.setdefault(member, set()).add(group)
        object.__setattr__(
            self, "_by_user", {user: frozenset(groups) for user, groups in by_user.items()}
        )

    def groups_for(self, names: Iterable[str]) -> tuple[str, ...]:
        """The groups any of C{names} belongs to, in file order, without duplicates."""
        if isinstance(names, (str, bytes)):
            raise TypeError("groups_for() takes a collection of names, not one string")
        found: set[str] = set()
        for name in names:
            found |= self._by_user.get(name, frozenset())
        if not found:
            return ()
        return tuple(group for group in self.members if group in found)

    def __len__(self) -> int:
        return len(self.members)


#: No groups at all: what the gateway uses without C{--groups}.
NO_GROUPS = GroupMap({})


def parse_groups(text: str, source: str = "<string>") -> GroupMap:
    """
    Parse htgroup text: C{group: user1 user2} lines, C{#} comment lines.

    A group may span several lines; its members are merged in order.

    @param source: the file name used in error messages.
    @raise ConfigError: for a malformed line, as C{source:line: reason}.
    """
    groups: dict[str, dict[str, None]] = {}
    for lineno, raw in enumerate(text.removeprefix("\ufeff").split("\n"), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        group, colon, members = line.partition(":")
        group = group.strip()
        if not colon:
            raise ConfigError(f"{source}:{lineno}: expected 'group: members', found no ':'")
        if not group:
            raise ConfigError(f"{source}:{lineno}: empty group name before ':'")
        if any(char.isspace() for char in group):
            raise ConfigError(
                f"{source}:{lineno}: group name {_quote(group)} contains whitespace"
            )
        merged = groups.setdefault(group, {})
        for member in members.split():
            merged[member] = None
    return GroupMap({group: tuple(members) for group, members in groups.items()})


def load_group_file(path: str | os.PathLike[str]) -> GroupMap:
    """Read and parse an htgroup file (see L{parse_groups})."""
    return parse_groups(read_config(path), os.fspath(path))


