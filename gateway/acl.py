# -*- test-case-name: tests.test_acl -*-
"""
The C{--acl} file (TOML modelled on KumoMTA's C{kumo.aaa.load_acl_map}) and
the access policies: C{query_resource_access(auth_info, resource, privilege)}.

The file is read once at start-up and compiled into immutable values, so a
bad file stops the start with file, line and reason, and a query parses
nothing.
"""

from __future__ import annotations

import ipaddress
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, Union

import attrs
from zope.interface import Interface, implementer

from gateway.addresses import parse_ip
from gateway.authinfo import AuthInfo, IAuthInfo, Identity, IdentityContext
from gateway.events import AuthzEvent, meta_fields
from gateway.groups import ConfigError, read_config
from gateway.text import quote as _quote

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]


class IAccessPolicy(Interface):
    """Decides whether a session may use a privilege on a resource."""

    def query_resource_access(auth_info: IAuthInfo, resource: str, privilege: str) -> bool:
        """
        True when C{auth_info} may exercise C{privilege} on C{resource}.

        @param resource: a C{/}-separated path such as C{smtp/sender/alice}.
        """


@implementer(IAccessPolicy)
@attrs.frozen
class AllowAuthenticated:
    """The policy without C{--acl}: any authenticated session may do anything."""

    def query_resource_access(self, auth_info: IAuthInfo, resource: str, privilege: str) -> bool:
        return auth_info.is_authenticated()


@implementer(IAccessPolicy)
class Policy:
    """
    The policy the front doors ask (C{core.policy}): it holds the C{current}
    policy, which a reload (SIGHUP) replaces whole with L{replace}, so a
    query sees either the old ACL or the new one, never a mix; and it
    publishes each decision as an L{AuthzEvent} on C{events} when they have
    sinks (the audit log). A front door passes the connection's
    C{ConnectionMeta} as C{meta} so the event says where it was asked.
    """

    def __init__(self, current: IAccessPolicy, events: Any = None) -> None:
        self.current = current
        #: The core's L{gateway.events.Events} hub, or None.
        self.events = events

    def replace(self, policy: IAccessPolicy) -> None:
        """From now on, decide with C{policy}."""
        self.current = policy

    def query_resource_access(
        self, auth_info: IAuthInfo, resource: str, privilege: str, meta: Any = None
    ) -> bool:
        allowed = bool(self.current.query_resource_access(auth_info, resource, privilege))
        self.publish(auth_info, resource, privilege, allowed, meta)
        return allowed

    def publish(
        self, auth_info: IAuthInfo, resource: str, privilege: str, allowed: bool, meta: Any = None
    ) -> None:
        """
        Publish a decision as an L{AuthzEvent} when the hub has sinks: this
        policy's own, or one taken on the policy it holds (L{written_grant}).
        """
        events = self.events
        if events is not None and events.sinks:
            fields = meta_fields(meta)
            if fields["peer_address"] is None:
                fields["peer_address"] = getattr(auth_info, "peer_address", None)
            events.authz(AuthzEvent(
                time=time.time(), resource=resource, privilege=privilege, allowed=allowed,
                auth_info=auth_info, **fields,
            ))


def current_policy(policy: IAccessPolicy | None) -> IAccessPolicy | None:
    """The policy a L{Policy} holds now (any other policy is itself)."""
    return policy.current if isinstance(policy, Policy) else policy


def ask(
    policy: IAccessPolicy, auth_info: IAuthInfo, resource: str, privilege: str, meta: Any = None
) -> bool:
    """
    C{policy.query_resource_access}, telling a L{Policy} the connection's
    C{meta} (for the event it publishes); any other policy (a test's, a
    user's) is asked with the interface's three arguments.
    """
    if isinstance(policy, Policy):
        return policy.query_resource_access(auth_info, resource, privilege, meta)
    return bool(policy.query_resource_access(auth_info, resource, privilege))


def authz_resource(authzid: str) -> str | None:
    """
    The ACL resource that grants acting as C{authzid}: C{smtp/authz/<authzid>},
    or None when the name would not be exactly one resource segment (a C{/}
    would let a grant for C{ceo} cover C{ceo/x}, as the query walks up).
    """
    if not authzid or "/" in authzid:
        return None
    return f"smtp/authz/{authzid}"


def authz_grants(policy: IAccessPolicy | None) -> Callable[[IAuthInfo, str], bool]:
    """
    The realm's C{authorize} hook from the C{--acl} policy: acting as another
    SMTP identity needs privilege C{authorize} on L{authz_resource}, granted
    by a rule written for it (L{written_grant}: a parent C{smtp} rule or a
    C{"*"} privilege never grants it); without an ACL (C{None}) nobody may.
    The hook is asked about the identities that proved themselves (the
    authorization identity is not in the session yet). L{AllowAuthenticated},
    the policy without C{--acl}, grants nothing either.
    """

    def authorize(auth_info: IAuthInfo, authzid: str) -> bool:
        return may_act_as(policy, auth_info, authzid)

    return authorize


def may_act_as(
    policy: IAccessPolicy | None, auth_info: IAuthInfo, authzid: str, meta: Any = None
) -> bool:
    """
    The grant of L{authz_grants}: whether the identities of C{auth_info} that
    proved themselves may act as C{authzid}; an authorization identity in
    C{auth_info} is left out of the question, as the realm asked it at login
    (so an open session's grant can be asked again: a reload may revoke it).
    """
    resource = authz_resource(authzid)
    if resource is None:
        return False
    proven = tuple(
        i for i in auth_info.identities if i.context is not IdentityContext.SmtpAuthPlainAuthorization
    )
    if len(proven) != len(auth_info.identities):
        auth_info = AuthInfo(identities=proven, groups=auth_info.groups,
                             peer_address=auth_info.peer_address)
    return written_grant(policy, auth_info, resource, "authorize", meta=meta)


#: An RFC 5321 Dot-string: the local part sender binding compares.
_DOT_STRING = re.compile(r"[A-Za-z0-9!#$%&'*+=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+=?^_`{|}~-]+)*")


def binding_local(local: str) -> str | None:
    """
    A local part as sender binding compares it: unquoted, its quoted pairs
    resolved, in lower case (C{"ceo"}, C{"c\\eo"} and C{CEO} are one
    mailbox for any real system); None when it is then no Dot-string
    without a C{/} (no ACL key could name it the same way).
    """
    if len(local) >= 2 and local.startswith('"') and local.endswith('"'):
        local = re.sub(r"\\(.)", r"\1", local[1:-1])
    return local.lower() if _DOT_STRING.fullmatch(local) else None


def may_send_as(
    policy: IAccessPolicy | None, auth_info: IAuthInfo, sender: str, meta: Any = None
) -> bool:
    """
    Sender binding: whether C{auth_info} may use C{sender} as the envelope
    sender, through C{smtp/sender/DOMAIN/LOCAL} (or C{smtp/sender/DOMAIN})
    with privilege C{send} granted by a rule written at those levels
    (L{written_grant}): a broad rule ("authenticated users may use C{smtp}",
    privileges C{"*"}) is no licence to send as anyone. The null sender and
    a local part L{binding_local} cannot compare are never granted. With
    a L{Policy}, the decision on the resource is published (L{written_grant}).
    """
    local, _, domain = sender.rpartition("@")
    compared = binding_local(local)
    if not sender or not compared or "/" in domain:
        return False
    resource = f"smtp/sender/{domain.lower()}/{compared}"
    return written_grant(policy, auth_info, resource, "send", min_depth=3, meta=meta)


def written_grant(
    policy: IAccessPolicy | None,
    auth_info: IAuthInfo,
    resource: str,
    privilege: str,
    *,
    literal_last: bool = False,
    min_depth: int | None = None,
    meta: Any = None,
) -> bool:
    """
    Whether the ACL grants C{privilege} on C{resource} through a rule written
    for it: a key of the resource's own depth (its exact key, or C{*} in
    place of some segments; with C{literal_last}, never of the last one; with
    C{min_depth}, a parent key at least that deep counts too) that names
    C{privilege} itself, not C{"*"}. The first such rule that applies
    decides, and the ordinary query must agree. For grants too strong to
    come from a broad rule written for something else ("authenticated users
    may use SMTP"): acting as another identity, a privileged source port.
    Only an L{AccessControlMap} (held by a L{Policy} or not) can say where
    a grant came from, so any other policy grants nothing here. A L{Policy}
    publishes the outcome as its decision, with the connection's C{meta}.
    """
    allowed = _written_grant(current_policy(policy), auth_info, resource, privilege,
                             literal_last, min_depth)
    if isinstance(policy, Policy):
        policy.publish(auth_info, resource, privilege, allowed, meta)
    return allowed


def _written_grant(
    policy: IAccessPolicy | None,
    auth_info: IAuthInfo,
    resource: str,
    privilege: str,
    literal_last: bool,
    min_depth: int | None,
) -> bool:
    if not isinstance(policy, AccessControlMap):
        return False
    if not policy.query_resource_access(auth_info, resource, privilege):
        return False
    segments = resource.split("/")
    deepest = len(segments)
    for key, rule in policy.rules_for(resource):
        if not (min_depth or deepest) <= len(key) <= deepest:
            continue
        if literal_last and (len(key) != deepest or key[-1] != segments[-1]):
            continue
        if privilege in rule.privileges and rule.criterion.matches(auth_info):
            return rule.allow
    return False


# --- criteria -----------------------------------------------------------------


def acting_names(auth_info: IAuthInfo) -> frozenset[str]:
    """
    The names a session acts as. An SMTP session with an authorization
    identity acts as that identity (the authzid, once approved), not as the
    authentication identity that proved it; any other identity acts as itself.
    Without an authorization identity, every identity counts.
    """
    identities = auth_info.identities
    if any(i.context is IdentityContext.SmtpAuthPlainAuthorization for i in identities):
        return frozenset(
            i.identity
            for i in identities
            if i.context is not IdentityContext.SmtpAuthPlainAuthentication
        )
    return frozenset(i.identity for i in identities)


@attrs.frozen
class IndividualIdentity:
    """
    C{Individual = "name"}: the session acts as C{name} (L{acting_names}).

    C{Individual = {identity = "name", context = "Context"}}: the session has
    the identity C{name} in exactly that context, e.g. the SMTP
    authentication identity (who proved) or authorization identity (whom the
    session acts as).
    """

    name: str
    context: IdentityContext | None = None

    def matches(self, auth_info: IAuthInfo) -> bool:
        if self.context is None:
            return self.name in acting_names(auth_info)
        return any(
            i.identity == self.name and i.context is self.context for i in auth_info.identities
        )


@attrs.frozen
class GroupIdentity:
    """C{Group = "name"}: the session is in group C{name}."""

    name: str

    def matches(self, auth_info: IAuthInfo) -> bool:
        return self.name in auth_info.groups


@attrs.frozen
class AuthenticatedIdentity:
    """C{Authenticated = {}}: the session has at least one identity."""

    def matches(self, auth_info: IAuthInfo) -> bool:
        return auth_info.is_authenticated()


@attrs.frozen
class UnauthenticatedIdentity:
    """C{Unauthenticated = {}}: the session has no identity."""

    def matches(self, auth_info: IAuthInfo) -> bool:
        return not auth_info.is_authenticated()


@attrs.frozen
class AnyIdentity:
    """C{Any = {}}: every session."""

    def matches(self, auth_info: IAuthInfo) -> bool:
        return True


@attrs.frozen
class MachineIdentity:
    """C{Machine = "addr"} or C{"net/len"}: the peer address is in that network."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network

    def matches(self, auth_info: IAuthInfo) -> bool:
        peer = auth_info.peer_address
        ip = parse_ip(peer) if isinstance(peer, str) else None
        return ip is not None and ip in self.network


@attrs.frozen
class AllOf:
    """C{AllOf = [...]}: every criterion matches."""

    criteria: tuple[Criterion, ...] = attrs.field(converter=tuple)

    def matches(self, auth_info: IAuthInfo) -> bool:
        return all(c.matches(auth_info) for c in self.criteria)


@attrs.frozen
class AnyOf:
    """C{AnyOf = [...]}: at least one criterion matches."""

    criteria: tuple[Criterion, ...] = attrs.field(converter=tuple)

    def matches(self, auth_info: IAuthInfo) -> bool:
        return any(c.matches(auth_info) for c in self.criteria)


@attrs.frozen
class Not:
    """C{Not = {...}}: the criterion does not match."""

    criterion: Criterion

    def matches(self, auth_info: IAuthInfo) -> bool:
        return not self.criterion.matches(auth_info)


Criterion = Union[
    IndividualIdentity,
    GroupIdentity,
    AuthenticatedIdentity,
    UnauthenticatedIdentity,
    AnyIdentity,
    MachineIdentity,
    AllOf,
    AnyOf,
    Not,
]


@attrs.frozen
class Rule:
    """One C{[[acl."resource"]]} entry: who it is about, for which privileges, and the verdict."""

    allow: bool
    privileges: frozenset[str] = attrs.field(converter=frozenset)
    criterion: Criterion

    def applies(self, auth_info: IAuthInfo, privilege: str) -> bool:
        """True when this rule decides the query (privilege covered and criterion met)."""
        covered = privilege in self.privileges or "*" in self.privileges
        return covered and self.criterion.matches(auth_info)


# --- ACL map ------------------------------------------------------------------


def _resource_problem(resource: str) -> str | None:
    if not resource:
        return "empty resource name"
    if "" in resource.split("/"):
        return "empty path segment in resource name"
    return None


def _acl_entries(value: Mapping[str, Iterable[Rule]]) -> Mapping[str, tuple[Rule, ...]]:
    if not isinstance(value, Mapping):
        raise TypeError("acl must be a mapping of resource name to rules")
    out: dict[str, tuple[Rule, ...]] = {}
    for resource, rules in value.items():
        if not isinstance(resource, str):
            raise TypeError(f"resource names must be strings, not {resource!r}")
        problem = _resource_problem(resource)
        if problem:
            raise ValueError(f"{problem}: {_quote(resource)}")
        rules = tuple(rules)
        if not all(isinstance(rule, Rule) for rule in rules):
            raise TypeError(f"rules for {_quote(resource)} must be Rule instances")
        out[resource] = rules
    return MappingProxyType(out)


_Pattern = tuple[tuple[str, ...], tuple[Rule, ...]]


@implementer(IAccessPolicy)
@attrs.frozen
class AccessControlMap:
    """
    Resource name -> ordered rules, in file order; built by L{load_acl_file}.

    A query for C{a/b/c} looks at C{a/b/c}, then C{a/b}, then C{a}; at each
    level the exact key's rules come before those of matching C{*} keys. The
    first rule that applies decides; none applying is a denial.
    """

    acl: Mapping[str, tuple[Rule, ...]] = attrs.field(converter=_acl_entries, hash=False)
    _exact: Mapping[str, tuple[Rule, ...]] = attrs.field(
        init=False, repr=False, eq=False, hash=False
    )
    _patterns: Mapping[int, tuple[_Pattern, ...]] = attrs.field(
        init=False, repr=False, eq=False, hash=False
    )

    def __attrs_post_init__(self) -> None:
        exact: dict[str, tuple[Rule, ...]] = {}
        patterns: dict[int, list[_Pattern]] = {}
        for resource, rules in self.acl.items():
            segments = tuple(resource.split("/"))
            if "*" in segments:
                patterns.setdefault(len(segments), []).append((segments, rules))
            else:
                exact[resource] = rules
        object.__setattr__(self, "_exact", exact)
        object.__setattr__(self, "_patterns", {n: tuple(p) for n, p in patterns.items()})

    def _candidates(self, segments: list[str]) -> Iterator[tuple[tuple[str, ...], Rule]]:
        for depth in range(len(segments), 0, -1):
            key = tuple(segments[:depth])
            for rule in self._exact.get("/".join(key), ()):
                yield key, rule
            for pattern, rules in self._patterns.get(depth, ()):
                if all(p == "*" or p == s for p, s in zip(pattern, segments)):
                    for rule in rules:
                        yield pattern, rule

    def rules_for(self, resource: str) -> Iterator[tuple[tuple[str, ...], Rule]]:
        """
        (key as segments, rule) for every rule a query for C{resource} looks
        at, in query order: for a caller that must know whether a grant was
        written for this very resource or for a parent of it. A malformed
        resource name (empty, or with an empty segment) has none.
        """
        if _resource_problem(resource):
            return iter(())
        return self._candidates(resource.split("/"))

    def query_resource_access(self, auth_info: IAuthInfo, resource: str, privilege: str) -> bool:
        """
        See L{IAccessPolicy}. A malformed resource name (empty, or with an
        empty segment) is denied rather than matched against a parent.
        """
        for _, rule in self.rules_for(resource):
            if rule.applies(auth_info, privilege):
                return rule.allow
        return False


# --- ACL file -----------------------------------------------------------------

#: How deep C{criteria} may nest; keeps queries far from the recursion limit.
MAX_CRITERIA_DEPTH = 32

_KEY = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\\n]|\\.)*"|'[^'\n]*')"""
_DOTTED = rf"{_KEY}(?:[ \t]*\.[ \t]*{_KEY})*"
_ARRAY_HEADER = re.compile(rf"[ \t]*\[\[[ \t]*({_DOTTED})[ \t]*\]\]")
_TABLE_HEADER = re.compile(rf"[ \t]*\[[ \t]*({_DOTTED})[ \t]*\]")
_KEY_VALUE = re.compile(rf"[ \t]*({_DOTTED})[ \t]*=")


def _key_path(dotted: str) -> tuple[str, ...] | None:
    """Decode a TOML dotted key (quotes, escapes) by letting the TOML parser do it."""
    try:
        node: Any = tomllib.loads(f"{dotted} = 0")
    except tomllib.TOMLDecodeError:
        return None
    path = []
    while isinstance(node, dict) and len(node) == 1:
        key, node = next(iter(node.items()))
        path.append(key)
    return tuple(path)


@attrs.frozen
class _Mention:
    line: int
    path: tuple[str, ...]
    array_header: bool


def _mentions(text: str) -> list[_Mention]:
    """
    Where keys are defined, by a line scan (tomllib reports no positions).

    Good enough for error messages; a key-like line inside a multi-line string
    can mislead it, which only costs a less precise line number.
    """
    found = []
    table: tuple[str, ...] = ()
    for lineno, line in enumerate(text.split("\n"), 1):
        for pattern, header, array in (
            (_ARRAY_HEADER, True, True),
            (_TABLE_HEADER, True, False),
            (_KEY_VALUE, False, False),
        ):
            match = pattern.match(line)
            if match:
                path = _key_path(match.group(1))
                if path is None:
                    break
                if header:
                    table = path
                else:
                    path = table + path
                found.append(_Mention(lineno, path, array))
                break
    return found


class _Invalid(Exception):
    """A reason a value is unusable; the loader adds where it was."""


_TOML_TYPES = {str: "a string", bool: "a boolean", int: "an integer", float: "a float",
               list: "an array", dict: "a table"}


def _kind(value: Any) -> str:
    return _TOML_TYPES.get(type(value), "a date/time")


def _only_key(value: Any, where: str, kinds: tuple[str, ...]) -> tuple[str, Any]:
    expected = ", ".join(kinds)
    if not isinstance(value, dict):
        raise _Invalid(f"{where} must be a table with one of {expected}, not {_kind(value)}")
    if len(value) != 1:
        if not value:
            raise _Invalid(f"{where} is empty; expected one of {expected}")
        keys = ", ".join(sorted(value))
        raise _Invalid(f"{where} must have exactly one key, not {len(value)} ({keys})")
    ((key, inner),) = value.items()
    if key not in kinds:
        raise _Invalid(f"{where}: unknown key {_quote(key)} (expected one of {expected})")
    return key, inner


_IDENTITY_KINDS = (
    "Individual", "Group", "Authenticated", "Unauthenticated", "Any", "Machine", "MachineSet",
)
_UNIT_IDENTITIES = {
    "Authenticated": AuthenticatedIdentity(),
    "Unauthenticated": UnauthenticatedIdentity(),
    "Any": AnyIdentity(),
}


def _identity(value: Any, where: str) -> Criterion:
    kind, inner = _only_key(value, where, _IDENTITY_KINDS)
    where = f"{where}.{kind}"
    if kind in _UNIT_IDENTITIES:
        if inner != {}:
            found = "a non-empty table" if isinstance(inner, dict) else _kind(inner)
            raise _Invalid(f"{where} must be an empty table {{}}, not {found}")
        return _UNIT_IDENTITIES[kind]
    if kind == "Individual" and isinstance(inner, dict):
        return _individual_in_context(inner, where)
    if kind == "MachineSet":
        if not isinstance(inner, list) or not inner:
            found = "an empty array" if inner == [] else _kind(inner)
            raise _Invalid(f"{where} must be a non-empty array of addresses, not {found}")
        return AnyOf(tuple(_machine(item, f"{where}[{i}]") for i, item in enumerate(inner)))
    if not isinstance(inner, str) or not inner:
        found = "an empty string" if inner == "" else _kind(inner)
        shape = " or an {identity, context} table" if kind == "Individual" else ""
        raise _Invalid(f"{where} must be a non-empty string{shape}, not {found}")
    if kind == "Individual":
        return IndividualIdentity(inner)
    if kind == "Group":
        return GroupIdentity(inner)
    return _machine(inner, where)


_INDIVIDUAL_KEYS = ("identity", "context")


def _individual_in_context(value: dict[str, Any], where: str) -> IndividualIdentity:
    """C{Individual = {identity = "name", context = "Context"}}: both keys required."""
    unknown = [key for key in value if key not in _INDIVIDUAL_KEYS]
    if unknown:
        names = ", ".join(_quote(key) for key in unknown)
        raise _Invalid(f"{where}: unknown key {names} (expected identity, context)")
    for required in _INDIVIDUAL_KEYS:
        if required not in value:
            raise _Invalid(f"{where}: missing required key {_quote(required)}")
    name, context = value["identity"], value["context"]
    if not isinstance(name, str) or not name:
        found = "an empty string" if name == "" else _kind(name)
        raise _Invalid(f"{where}.identity must be a non-empty string, not {found}")
    if not isinstance(context, str):
        raise _Invalid(f"{where}.context must be a string, not {_kind(context)}")
    try:
        identity = Identity(name, context)
    except ValueError as e:
        raise _Invalid(f"{where}: {e}") from None
    return IndividualIdentity(identity.identity, identity.context)


def _machine(inner: Any, where: str) -> MachineIdentity:
    if not isinstance(inner, str):
        raise _Invalid(f"{where} must be a string, not {_kind(inner)}")
    try:
        return MachineIdentity(ipaddress.ip_network(inner))
    except ValueError as e:
        raise _Invalid(f"{where}: {_quote(inner)} is not an IP address or network ({e})") from None


_CRITERIA_KINDS = ("Identity", "AllOf", "AnyOf", "Not")


def _criterion(value: Any, where: str, depth: int = 1) -> Criterion:
    if depth > MAX_CRITERIA_DEPTH:
        raise _Invalid(f"{where}: criteria nested more than {MAX_CRITERIA_DEPTH} levels deep")
    kind, inner = _only_key(value, where, _CRITERIA_KINDS)
    where = f"{where}.{kind}"
    if kind == "Identity":
        return _identity(inner, where)
    if kind == "Not":
        return Not(_criterion(inner, where, depth + 1))
    if not isinstance(inner, list) or not inner:
        raise _Invalid(f"{where} must be a non-empty array of criteria tables")
    items = (_criterion(item, f"{where} #{i}", depth + 1) for i, item in enumerate(inner, 1))
    return AllOf(items) if kind == "AllOf" else AnyOf(items)


_RULE_KEYS = ("allow", "privileges", "identity", "criteria")


def _rule(value: Any) -> Rule:
    if not isinstance(value, dict):
        raise _Invalid(f"must be a table, not {_kind(value)}")
    unknown = [key for key in value if key not in _RULE_KEYS]
    if unknown:
        names = ", ".join(_quote(key) for key in unknown)
        raise _Invalid(f"unknown key {names} (expected {', '.join(_RULE_KEYS)})")
    for required in ("allow", "privileges"):
        if required not in value:
            raise _Invalid(f"missing required key {_quote(required)}")
    allow = value["allow"]
    if not isinstance(allow, bool):
        raise _Invalid(f"allow must be true or false, not {_kind(allow)}")
    privileges = value["privileges"]
    if not isinstance(privileges, list):
        raise _Invalid(f"privileges must be an array of strings, not {_kind(privileges)}")
    if not privileges:
        raise _Invalid("privileges must not be empty")
    for i, privilege in enumerate(privileges, 1):
        if not isinstance(privilege, str) or not privilege:
            found = "an empty string" if privilege == "" else _kind(privilege)
            raise _Invalid(f"privileges #{i} must be a non-empty string, not {found}")
    if ("identity" in value) == ("criteria" in value):
        if "identity" in value:
            raise _Invalid("has both identity and criteria; use one")
        raise _Invalid("needs identity or criteria")
    if "identity" in value:
        criterion = _identity(value["identity"], "identity")
    else:
        criterion = _criterion(value["criteria"], "criteria")
    return Rule(allow, privileges, criterion)


class _Locator:
    """Line numbers for error messages, scanned only when an error needs one."""

    def __init__(self, text: str, source: str) -> None:
        self._text = text
        self._source = source
        self._found: list[_Mention] | None = None

    def _all(self) -> list[_Mention]:
        if self._found is None:
            self._found = _mentions(self._text)
        return self._found

    def _where(self, line: int | None) -> str:
        return f"{self._source}:{line}" if line else self._source

    def first(self, *path: str) -> str:
        """
        C{source:line} of the first mention of C{path} or a key below it;
        failing that, of its nearest mentioned parent (an inline table).
        """
        for length in range(len(path), 0, -1):
            for mention in self._all():
                if mention.path[:length] == path[:length]:
                    return self._where(mention.line)
        return self._source

    def rule(self, resource: str, n: int) -> str:
        """C{source:line} of the C{n}th C{[[acl."resource"]]} header."""
        headers = [m for m in self._all() if m.array_header and m.path == ("acl", resource)]
        if len(headers) >= n:
            return self._where(headers[n - 1].line)
        return self.first("acl", resource)


def parse_acl(text: str, source: str = "<string>") -> AccessControlMap:
    """
    Compile ACL TOML text (C{[[acl."resource"]]} entries) into an L{AccessControlMap}.

    @param source: the file name used in error messages.
    @raise ConfigError: for a TOML syntax error or any rule that is not exactly
        the documented shape, naming the file, the rule's header line and why.
    """
    text = text.removeprefix("\ufeff")
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: {e}") from None
    except RecursionError:
        raise ConfigError(f"{source}: values nested too deeply") from None
    where = _Locator(text, source)
    for key in document:
        if key != "acl":
            raise ConfigError(f"{where.first(key)}: unknown top-level key {_quote(key)}"
                              " (only acl is allowed)")
    acl = document.get("acl", {})
    if not isinstance(acl, dict):
        raise ConfigError(f"{where.first('acl')}: acl must be a table of arrays of tables,"
                          f" not {_kind(acl)}")
    compiled: dict[str, tuple[Rule, ...]] = {}
    for resource, entries in acl.items():
        label = f"acl {_quote(resource)}"
        problem = _resource_problem(resource)
        if problem:
            raise ConfigError(f"{where.rule(resource, 1)}: {label}: {problem}")
        if not isinstance(entries, list):
            raise ConfigError(f"{where.rule(resource, 1)}: {label}: must be an array of tables"
                              f" ([[acl.{_quote(resource)}]]), not {_kind(entries)}")
        rules = []
        for n, entry in enumerate(entries, 1):
            try:
                rules.append(_rule(entry))
            except _Invalid as e:
                raise ConfigError(f"{where.rule(resource, n)}: {label} rule {n}: {e}") from None
        compiled[resource] = tuple(rules)
    return AccessControlMap(compiled)


def load_acl_file(path: str | os.PathLike[str]) -> AccessControlMap:
    """Read and compile an ACL file (see L{parse_acl})."""
    return parse_acl(read_config(path), os.fspath(path))


#: A front door's check of an ACL's keys: raises C{ValueError} for a key no
#: request could reach (see L{load_policy}).
KeyCheck = Callable[[AccessControlMap], None]


def load_policy(path: str | os.PathLike[str], checks: Iterable[KeyCheck]) -> AccessControlMap:
    """
    The C{--acl} file, compiled and checked, as at start so on reload: each
    of C{checks} (the front doors' own, given by the composition root)
    refuses keys of its resources no request could reach.

    @raise ConfigError: one line naming the file and the problem.
    """
    policy = load_acl_file(path)
    try:
        for check in checks:
            check(policy)
    except ValueError as e:
        raise ConfigError(f"{os.fspath(path)}: {e}") from None
    return policy
