"""
Tests for L{gateway.acl}: the TOML ACL and the access policies.
"""

from __future__ import annotations

import ipaddress
import os

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from gateway.acl import (
    AccessControlMap,
    AllOf,
    AllowAuthenticated,
    AnyIdentity,
    AnyOf,
    GroupIdentity,
    IAccessPolicy,
    IndividualIdentity,
    MachineIdentity,
    Not,
    Rule,
    acting_names,
    authz_grants,
    authz_resource,
    load_acl_file,
    parse_acl,
)
from gateway.authinfo import AuthInfo, IAuthInfo, Identity, IdentityContext
from gateway.groups import (
    ConfigError,
)


def info(*names: str, groups: tuple[str, ...] = (), peer: str | None = None) -> AuthInfo:
    return AuthInfo(
        identities=[Identity(n, IdentityContext.HttpBasicAuth) for n in names],
        groups=groups,
        peer_address=peer,
    )


ANON = info()


def smtp(authz: str | None, authn: str) -> AuthInfo:
    """An SMTP session: C{authn} proved itself and acts as C{authz} (None: no authorization identity)."""
    identities = [Identity(authn, IdentityContext.SmtpAuthPlainAuthentication)]
    if authz is not None:
        identities.insert(0, Identity(authz, IdentityContext.SmtpAuthPlainAuthorization))
    return AuthInfo(identities=identities)


def rule(resource: str, allow: bool, privileges: str, body: str) -> str:
    """One C{[[acl."resource"]]} entry; C{privileges} is the TOML array text."""
    return (
        f'[[acl."{resource}"]]\n'
        f"allow = {'true' if allow else 'false'}\n"
        f"privileges = {privileges}\n"
        f"{body}\n"
    )


def allow_if(body: str, resource: str = "r", privileges: str = '["p"]') -> AccessControlMap:
    return parse_acl(rule(resource, True, privileges, body))


class AllowAuthenticatedTests(SynchronousTestCase):
    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IAccessPolicy, AllowAuthenticated()))

    def test_authenticated(self) -> None:
        """Any resource and privilege: allowed exactly when authenticated."""
        policy = AllowAuthenticated()
        self.assertTrue(policy.query_resource_access(info("daniel"), "smtp/sender/x", "send"))
        self.assertTrue(policy.query_resource_access(info("daniel"), "anything", "*"))
        self.assertFalse(policy.query_resource_access(ANON, "smtp/sender/x", "send"))


class IdentityTests(SynchronousTestCase):
    def allowed(self, body: str, auth_info: AuthInfo) -> bool:
        return allow_if(body).query_resource_access(auth_info, "r", "p")

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IAccessPolicy, parse_acl("")))

    def test_individual(self) -> None:
        """Individual matches any of the session's identity names (no SMTP authzid here)."""
        body = 'identity.Individual = "daniel"'
        self.assertTrue(self.allowed(body, info("daniel")))
        self.assertTrue(self.allowed(body, info("sales", "daniel")))
        self.assertFalse(self.allowed(body, info("bob", groups=("daniel",))))
        self.assertFalse(self.allowed(body, ANON))

    def test_individual_is_whom_the_session_acts_as(self) -> None:
        """
        In an SMTP session acting as someone else, a plain Individual matches
        the authorization identity (sender binding: who the session acts as),
        not the authentication identity that proved it.
        """
        body = 'identity.Individual = "daniel"'
        self.assertFalse(self.allowed(body, smtp("ceo", "daniel")))
        self.assertTrue(self.allowed(body, smtp("daniel", "daniel")))
        self.assertTrue(self.allowed(body, smtp(None, "daniel")))
        self.assertTrue(self.allowed('identity.Individual = "ceo"', smtp("ceo", "daniel")))
        self.assertEqual(acting_names(smtp("ceo", "daniel")), {"ceo"})
        self.assertEqual(acting_names(smtp(None, "daniel")), {"daniel"})
        self.assertEqual(acting_names(info("a", "b")), {"a", "b"})
        self.assertEqual(acting_names(ANON), frozenset())

    def test_individual_in_context(self) -> None:
        """C{Individual = {identity, context}} matches that identity in that context only."""
        authn = 'identity.Individual = { identity = "daniel", context = "SmtpAuthPlainAuthentication" }'
        authz = 'identity.Individual = { identity = "daniel", context = "SmtpAuthPlainAuthorization" }'
        basic = 'identity.Individual = { identity = "daniel", context = "HttpBasicAuth" }'
        self.assertTrue(self.allowed(authn, smtp("ceo", "daniel")))
        self.assertFalse(self.allowed(authz, smtp("ceo", "daniel")))
        self.assertTrue(self.allowed(authz, smtp("daniel", "boss")))
        self.assertFalse(self.allowed(authn, smtp("daniel", "boss")))
        self.assertFalse(self.allowed(authn, info("daniel")))
        self.assertTrue(self.allowed(basic, info("daniel")))
        self.assertFalse(self.allowed(basic, smtp("daniel", "daniel")))
        self.assertFalse(self.allowed(basic, ANON))
        self.assertEqual(
            allow_if(basic),
            allow_if('criteria.Identity.Individual = {context = "HttpBasicAuth", identity = "daniel"}'),
        )
        self.assertEqual(
            allow_if(authn).acl["r"][0].criterion,
            IndividualIdentity("daniel", IdentityContext.SmtpAuthPlainAuthentication),
        )

    def test_group(self) -> None:
        body = 'identity.Group = "staff"'
        self.assertTrue(self.allowed(body, info("a", groups=("x", "staff"))))
        self.assertFalse(self.allowed(body, info("staff")))

    def test_authenticated(self) -> None:
        body = "identity.Authenticated = {}"
        self.assertTrue(self.allowed(body, info("a")))
        self.assertFalse(self.allowed(body, ANON))

    def test_unauthenticated(self) -> None:
        body = "identity.Unauthenticated = {}"
        self.assertFalse(self.allowed(body, info("a")))
        self.assertTrue(self.allowed(body, ANON))

    def test_any(self) -> None:
        body = "identity.Any = {}"
        self.assertTrue(self.allowed(body, info("a")))
        self.assertTrue(self.allowed(body, ANON))

    def test_inline_table_form(self) -> None:
        """C{identity = {Group = ...}} is the same as the dotted form."""
        self.assertEqual(
            allow_if('identity = { Group = "staff" }'), allow_if('identity.Group = "staff"')
        )


class MachineTests(SynchronousTestCase):
    def allowed(self, machine: str, peer: str | None) -> bool:
        policy = allow_if(f'identity.Machine = "{machine}"')
        return policy.query_resource_access(info("a", peer=peer), "r", "p")

    def test_ipv4_address(self) -> None:
        self.assertTrue(self.allowed("192.0.2.7", "192.0.2.7"))
        self.assertFalse(self.allowed("192.0.2.7", "192.0.2.8"))

    def test_ipv4_network(self) -> None:
        self.assertTrue(self.allowed("10.0.0.0/8", "10.200.3.4"))
        self.assertFalse(self.allowed("10.0.0.0/8", "11.0.0.1"))

    def test_ipv6(self) -> None:
        self.assertTrue(self.allowed("2001:db8::/32", "2001:db8:1::5"))
        self.assertFalse(self.allowed("2001:db8::/32", "2001:db9::5"))
        self.assertTrue(self.allowed("::1", "::1"))
        self.assertTrue(self.allowed("fe80::/10", "fe80::1%eth0"))

    def test_ipv4_mapped(self) -> None:
        """An IPv4-mapped IPv6 peer matches IPv4 networks (and still the mapped range)."""
        self.assertTrue(self.allowed("10.0.0.0/8", "::ffff:10.1.2.3"))
        self.assertFalse(self.allowed("10.0.0.0/8", "::ffff:11.1.2.3"))
        self.assertFalse(self.allowed("::ffff:0:0/96", "::ffff:10.1.2.3"))  # AuthInfo folds it

    def test_machine_set(self) -> None:
        """KumoMTA's C{MachineSet}: any of several addresses or networks."""
        policy = allow_if('identity.MachineSet = ["192.0.2.7", "10.0.0.0/8"]')
        for peer, allowed in (("192.0.2.7", True), ("10.9.9.9", True), ("192.0.2.8", False), (None, False)):
            self.assertEqual(policy.query_resource_access(info("a", peer=peer), "r", "p"), allowed)

    def test_version_mismatch(self) -> None:
        self.assertFalse(self.allowed("::/0", "10.1.2.3"))
        self.assertFalse(self.allowed("0.0.0.0/0", "2001:db8::1"))

    def test_no_or_bad_peer(self) -> None:
        """No peer address, or one that is not an IP address, never matches."""
        self.assertFalse(self.allowed("0.0.0.0/0", None))

        @implementer(IAuthInfo)
        class Loose:  # another IAuthInfo provider, not validated like AuthInfo
            identities = (Identity("a"),)
            groups = ()

            def __init__(self, peer):
                self.peer_address = peer

        policy = allow_if('identity.Machine = "0.0.0.0/0"')
        for peer in ("not-an-ip", "10.1.2.3:25", "", 7):
            self.assertFalse(policy.query_resource_access(Loose(peer), "r", "p"))

    def test_compiled(self) -> None:
        """The network is parsed at load time."""
        (compiled,) = allow_if('identity.Machine = "10.0.0.0/8"').acl["r"]
        self.assertEqual(compiled.criterion, MachineIdentity(ipaddress.ip_network("10.0.0.0/8")))


class CriteriaTests(SynchronousTestCase):
    def allowed(self, criteria: str, auth_info: AuthInfo) -> bool:
        policy = allow_if(f"criteria = {criteria}")
        return policy.query_resource_access(auth_info, "r", "p")

    def test_identity(self) -> None:
        criteria = '{ Identity = { Group = "staff" } }'
        self.assertTrue(self.allowed(criteria, info("a", groups=("staff",))))
        self.assertFalse(self.allowed(criteria, info("a")))

    def test_all_of(self) -> None:
        criteria = '{ AllOf = [ {Identity = {Group = "staff"}}, {Identity = {Individual = "a"}} ] }'
        self.assertTrue(self.allowed(criteria, info("a", groups=("staff",))))
        self.assertFalse(self.allowed(criteria, info("b", groups=("staff",))))
        self.assertFalse(self.allowed(criteria, info("a")))

    def test_any_of(self) -> None:
        criteria = '{ AnyOf = [ {Identity = {Group = "staff"}}, {Identity = {Individual = "a"}} ] }'
        self.assertTrue(self.allowed(criteria, info("a")))
        self.assertTrue(self.allowed(criteria, info("b", groups=("staff",))))
        self.assertFalse(self.allowed(criteria, info("b")))

    def test_not(self) -> None:
        criteria = '{ Not = { Identity = { Machine = "10.0.0.0/8" } } }'
        self.assertTrue(self.allowed(criteria, info("a", peer="192.0.2.1")))
        self.assertTrue(self.allowed(criteria, info("a")))
        self.assertFalse(self.allowed(criteria, info("a", peer="10.0.0.1")))

    def test_nested(self) -> None:
        """Staff from the office network, or boss from anywhere, unless an intern."""
        criteria = """{ AllOf = [
            { AnyOf = [
                { AllOf = [ {Identity = {Group = "staff"}},
                            {Identity = {Machine = "192.0.2.0/24"}} ] },
                { Identity = { Individual = "boss" } } ] },
            { Not = { Not = { Not = { Identity = { Group = "interns" } } } } } ] }"""
        self.assertTrue(self.allowed(criteria, info("a", groups=("staff",), peer="192.0.2.9")))
        self.assertFalse(self.allowed(criteria, info("a", groups=("staff",), peer="198.51.100.1")))
        self.assertTrue(self.allowed(criteria, info("boss", peer="198.51.100.1")))
        self.assertFalse(self.allowed(criteria, info("boss", groups=("interns",))))
        self.assertFalse(
            self.allowed(criteria, info("a", groups=("staff", "interns"), peer="192.0.2.9"))
        )

    def test_dotted_form(self) -> None:
        """The brief's example: C{criteria.AnyOf = [...]}."""
        policy = parse_acl(
            '[[acl."http/*/admin"]]\nallow = false\nprivileges = ["GET", "POST"]\n'
            'criteria.AnyOf = [ {Identity = { Group = "interns" }},'
            ' {Not = {Identity = {Machine = "10.0.0.0/8"}}} ]\n'
            '[[acl."http/*/admin"]]\nallow = true\nprivileges = ["*"]\nidentity.Any = {}\n'
        )
        def query(auth_info: AuthInfo, privilege: str) -> bool:
            return policy.query_resource_access(auth_info, "http/x/admin", privilege)

        self.assertFalse(query(info("a", peer="192.0.2.1"), "GET"))
        self.assertFalse(query(info("a", groups=("interns",), peer="10.0.0.1"), "POST"))
        self.assertTrue(query(info("a", peer="10.0.0.1"), "GET"))
        self.assertTrue(query(info("a", peer="192.0.2.1"), "PUT"))

    def test_compiled_shape(self) -> None:
        (compiled,) = allow_if(
            'criteria.AllOf = [{Identity = {Any = {}}}, {AnyOf = [{Not = {Identity = {Group = "g"}}}]}]'
        ).acl["r"]
        self.assertEqual(
            compiled,
            Rule(True, frozenset({"p"}), AllOf((AnyIdentity(), AnyOf((Not(GroupIdentity("g")),))))),
        )


class PrivilegeTests(SynchronousTestCase):
    def test_listed(self) -> None:
        """A rule only decides for the privileges it lists (case-sensitively)."""
        policy = allow_if("identity.Any = {}", privileges='["GET", "POST"]')
        self.assertTrue(policy.query_resource_access(ANON, "r", "GET"))
        self.assertTrue(policy.query_resource_access(ANON, "r", "POST"))
        self.assertFalse(policy.query_resource_access(ANON, "r", "get"))
        self.assertFalse(policy.query_resource_access(ANON, "r", "PUT"))

    def test_star(self) -> None:
        """C{"*"} in the list covers any privilege."""
        policy = allow_if("identity.Any = {}", privileges='["GET", "*"]')
        for privilege in ("GET", "DELETE", "send", "*"):
            self.assertTrue(policy.query_resource_access(ANON, "r", privilege))

    def test_uncovered_rule_skipped(self) -> None:
        """A matching rule for another privilege does not stop the search."""
        policy = parse_acl(
            rule("r", False, '["relay"]', "identity.Any = {}")
            + rule("r", True, '["send", "relay"]', "identity.Any = {}")
        )
        self.assertTrue(policy.query_resource_access(ANON, "r", "send"))
        self.assertFalse(policy.query_resource_access(ANON, "r", "relay"))


class AuthzGrantTests(SynchronousTestCase):
    """C{authz_grants}: the realm's hook for acting as another SMTP identity."""

    ACL = (
        rule("smtp/authz/ceo", True, '["authorize"]',
             'identity.Individual = { identity = "daniel", context = "SmtpAuthPlainAuthentication" }')
        + rule("smtp/authz/*", True, '["authorize"]', 'identity.Group = "assistants"')
        + rule("smtp/authz/boss", True, '["send"]', "identity.Any = {}")
    )

    def test_resource(self) -> None:
        self.assertEqual(authz_resource("ceo"), "smtp/authz/ceo")
        self.assertEqual(authz_resource("sales@example.com"), "smtp/authz/sales@example.com")
        for bad in ("", "/", "ceo/x", "a//b", "/ceo", "ceo/"):
            self.assertIsNone(authz_resource(bad), bad)

    def test_grants(self) -> None:
        authorize = authz_grants(parse_acl(self.ACL))
        daniel = smtp(None, "daniel")
        self.assertTrue(authorize(daniel, "ceo"))
        self.assertFalse(authorize(daniel, "boss"))  # privilege send, not authorize
        self.assertFalse(authorize(smtp(None, "ceo"), "ceo"))
        self.assertFalse(authorize(info("daniel"), "ceo"))  # HttpBasicAuth did not prove it
        assistant = AuthInfo(identities=smtp(None, "alice").identities, groups=["assistants"])
        self.assertTrue(authorize(assistant, "boss"))
        self.assertTrue(authorize(assistant, "*"))  # a name like any other
        self.assertFalse(authorize(daniel, "*"))  # not a wildcard in a query
        for name in ("ceo/x", "boss/x", "x/ceo", ""):
            self.assertFalse(authorize(daniel, name), name)
            self.assertFalse(authorize(assistant, name), name)

    def test_without_acl(self) -> None:
        """Without C{--acl} nobody may act as someone else."""
        self.assertFalse(authz_grants(None)(smtp(None, "daniel"), "ceo"))
        self.assertFalse(authz_grants(AllowAuthenticated())(smtp(None, "daniel"), "ceo"))


class ResolutionTests(SynchronousTestCase):
    def test_first_match_wins(self) -> None:
        """Within a key, rules are tried in file order and the first that applies decides."""
        policy = parse_acl(
            rule("r", True, '["p"]', 'identity.Group = "vip"')
            + rule("r", False, '["p"]', 'identity.Group = "staff"')
            + rule("r", True, '["p"]', "identity.Authenticated = {}")
        )
        self.assertTrue(policy.query_resource_access(info("a", groups=("vip", "staff")), "r", "p"))
        self.assertFalse(policy.query_resource_access(info("a", groups=("staff",)), "r", "p"))
        self.assertTrue(policy.query_resource_access(info("a"), "r", "p"))
        self.assertFalse(policy.query_resource_access(ANON, "r", "p"))

    def test_default_deny(self) -> None:
        """With an ACL, nothing applying is a denial; an empty ACL denies everything."""
        policy = allow_if('identity.Group = "staff"', resource="smtp")
        self.assertFalse(policy.query_resource_access(info("a"), "smtp", "p"))
        self.assertFalse(policy.query_resource_access(info("a", groups=("staff",)), "http", "p"))
        self.assertFalse(parse_acl("").query_resource_access(info("a"), "smtp", "p"))
        self.assertFalse(parse_acl("# only a comment\n").query_resource_access(info("a"), "x", "p"))

    def test_exact_before_wildcard(self) -> None:
        """At one level the exact key comes first, even when a C{*} key is earlier in the file."""
        policy = parse_acl(
            rule("smtp/*", True, '["p"]', "identity.Any = {}")
            + rule("smtp/relay", False, '["p"]', "identity.Any = {}")
        )
        self.assertFalse(policy.query_resource_access(ANON, "smtp/relay", "p"))
        self.assertTrue(policy.query_resource_access(ANON, "smtp/sender", "p"))

    def test_wildcards_in_file_order(self) -> None:
        policy = parse_acl(
            rule("*/b", False, '["p"]', "identity.Any = {}")
            + rule("a/*", True, '["p"]', "identity.Any = {}")
        )
        self.assertFalse(policy.query_resource_access(ANON, "a/b", "p"))
        self.assertTrue(policy.query_resource_access(ANON, "a/c", "p"))
        reversed_policy = parse_acl(
            rule("a/*", True, '["p"]', "identity.Any = {}")
            + rule("*/b", False, '["p"]', "identity.Any = {}")
        )
        self.assertTrue(reversed_policy.query_resource_access(ANON, "a/b", "p"))

    def test_wildcard_whole_segment(self) -> None:
        """C{*} matches exactly one whole segment; other stars are literal."""
        policy = parse_acl(
            rule("http/*/admin", True, '["p"]', "identity.Any = {}")
            + rule("x/b*", True, '["p"]', "identity.Any = {}")
        )
        self.assertTrue(policy.query_resource_access(ANON, "http/listener1/admin", "p"))
        self.assertTrue(policy.query_resource_access(ANON, "http/listener1/admin/users", "p"))
        self.assertFalse(policy.query_resource_access(ANON, "http/admin", "p"))
        self.assertFalse(policy.query_resource_access(ANON, "http/a/b/admin", "p"))
        self.assertFalse(policy.query_resource_access(ANON, "x/bc", "p"))
        self.assertTrue(policy.query_resource_access(ANON, "x/b*", "p"))

    def test_parent_applies_to_children(self) -> None:
        """A rule on C{smtp} covers C{smtp/sender/x}; a child's rule does not cover its parent."""
        policy = parse_acl(
            rule("smtp", True, '["send"]', 'identity.Group = "staff"')
            + rule("http/api", True, '["GET"]', "identity.Any = {}")
        )
        staff = info("a", groups=("staff",))
        self.assertTrue(policy.query_resource_access(staff, "smtp/sender/x", "send"))
        self.assertTrue(policy.query_resource_access(staff, "smtp", "send"))
        self.assertFalse(policy.query_resource_access(staff, "smtp/sender/x", "relay"))
        self.assertFalse(policy.query_resource_access(staff, "http", "GET"))
        self.assertFalse(policy.query_resource_access(staff, "smtpx", "send"))

    def test_specific_overrides_parent(self) -> None:
        """A deeper deny wins over a parent's allow, for that subtree only."""
        policy = parse_acl(
            rule("smtp", True, '["*"]', "identity.Authenticated = {}")
            + rule("smtp/sender/*", False, '["send"]', 'identity.Individual = "spammer"')
        )
        self.assertFalse(policy.query_resource_access(info("spammer"), "smtp/sender/x", "send"))
        self.assertFalse(policy.query_resource_access(info("spammer"), "smtp/sender/x/y", "send"))
        self.assertTrue(policy.query_resource_access(info("spammer"), "smtp/sender/x", "relay"))
        self.assertTrue(policy.query_resource_access(info("spammer"), "smtp/sender", "send"))
        self.assertTrue(policy.query_resource_access(info("daniel"), "smtp/sender/x", "send"))

    def test_specific_allow_overrides_parent_deny(self) -> None:
        policy = parse_acl(
            rule("http", False, '["*"]', "identity.Any = {}")
            + rule("http/public", True, '["GET"]', "identity.Any = {}")
        )
        self.assertTrue(policy.query_resource_access(ANON, "http/public/index", "GET"))
        self.assertFalse(policy.query_resource_access(ANON, "http/public/index", "POST"))
        self.assertFalse(policy.query_resource_access(ANON, "http/private", "GET"))

    def test_malformed_query_resource_denied(self) -> None:
        """An empty name or empty segment is denied, not matched against a parent."""
        policy = allow_if("identity.Any = {}", resource="a")
        self.assertTrue(policy.query_resource_access(ANON, "a/b", "p"))
        for resource in ("", "a//b", "a/", "/a", "/"):
            self.assertFalse(policy.query_resource_access(ANON, resource, "p"), resource)

    def test_key_syntaxes(self) -> None:
        """Quoted, literal, spaced and bare header keys, inline arrays and [acl] tables."""
        texts = [
            "[[acl.smtp]]\nallow = true\nprivileges = ['p']\nidentity.Any = {}\n",
            "[[ acl . 'smtp' ]]\nallow = true\nprivileges = ['p']\nidentity.Any = {}\n",
            'acl.smtp = [{allow = true, privileges = ["p"], identity = {Any = {}}}]\n',
            '[acl]\nsmtp = [{allow = true, privileges = ["p"], identity = {Any = {}}}]\n',
        ]
        expected = allow_if("identity.Any = {}", resource="smtp")
        for text in texts:
            self.assertEqual(parse_acl(text), expected, text)

    def test_built_directly(self) -> None:
        """An AccessControlMap can be built from Rule objects; bad resource names are refused."""
        policy = AccessControlMap({"a/*": [Rule(True, ["x"], AnyIdentity())]})
        self.assertTrue(policy.query_resource_access(ANON, "a/b", "x"))
        self.assertIn("AnyIdentity()", repr(policy))
        self.assertRaises(ValueError, AccessControlMap, {"a//b": []})
        self.assertRaises(TypeError, AccessControlMap, {"a": ["not a rule"]})

    def test_load_file(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(rule("smtp", True, '["send"]', 'identity.Group = "staff"'))
        policy = load_acl_file(path)
        self.assertIsInstance(policy, AccessControlMap)
        self.assertTrue(policy.query_resource_access(info("a", groups=("staff",)), "smtp/x", "send"))


class ACLErrorTests(SynchronousTestCase):
    """Every malformed file names the file, the rule's header line and the reason."""

    def load_error(self, text: str | bytes) -> tuple[str, str]:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(text.encode() if isinstance(text, str) else text)
        message = str(self.assertRaises(ConfigError, load_acl_file, path))
        self.assertNotIn("\n", message)
        return path, message

    def assertRuleError(
        self, text: str, line: int, reason: str, resource: str = "r", n: int = 1
    ) -> None:
        path, message = self.load_error(text)
        prefix = f'{path}:{line}: acl "{resource}" rule {n}: '
        self.assertTrue(message.startswith(prefix), f"{message!r} does not start with {prefix!r}")
        self.assertIn(reason, message)

    def assertBodyError(self, body: str, reason: str, privileges: str = '["p"]') -> None:
        """The bad rule is the second one, on line 6 after a comment and a good rule."""
        text = "# acl\n" + rule("r", True, '["p"]', "identity.Any = {}") + rule(
            "r", True, privileges, body
        )
        self.assertRuleError(text, 6, reason, n=2)

    def test_unknown_rule_key(self) -> None:
        self.assertBodyError('identity.Any = {}\nalow = true', 'unknown key "alow"')

    def test_allow_type(self) -> None:
        self.assertRuleError(
            '[[acl."r"]]\nallow = "yes"\nprivileges = ["p"]\nidentity.Any = {}\n',
            1, "allow must be true or false, not a string",
        )

    def test_missing_keys(self) -> None:
        self.assertRuleError(
            '\n[[acl."r"]]\nprivileges = ["p"]\nidentity.Any = {}\n', 2, 'missing required key "allow"'
        )
        self.assertRuleError(
            '\n[[acl."r"]]\nallow = true\nidentity.Any = {}\n', 2, 'missing required key "privileges"'
        )

    def test_privileges(self) -> None:
        self.assertBodyError("identity.Any = {}", "privileges must not be empty", privileges="[]")
        self.assertBodyError("identity.Any = {}", "privileges must be an array", privileges='"p"')
        self.assertBodyError(
            "identity.Any = {}", "privileges #2 must be a non-empty string, not an integer",
            privileges='["p", 1]',
        )
        self.assertBodyError(
            "identity.Any = {}", "privileges #1 must be a non-empty string, not an empty string",
            privileges='[""]',
        )

    def test_identity_and_criteria(self) -> None:
        self.assertBodyError(
            "identity.Any = {}\ncriteria.Identity.Any = {}", "has both identity and criteria"
        )
        self.assertBodyError("", "needs identity or criteria")

    def test_identity_table(self) -> None:
        self.assertBodyError('identity.Bogus = "x"', 'identity: unknown key "Bogus"')
        self.assertBodyError(
            'identity = {Group = "a", Individual = "b"}', "identity must have exactly one key, not 2"
        )
        self.assertBodyError("identity = {}", "identity is empty")
        self.assertBodyError('identity = "Any"', "identity must be a table")

    def test_identity_values(self) -> None:
        self.assertBodyError('identity.Group = ""', "identity.Group must be a non-empty string")
        self.assertBodyError(
            "identity.Individual = 3", "identity.Individual must be a non-empty string"
        )
        self.assertBodyError(
            "identity.Authenticated = true", "identity.Authenticated must be an empty table"
        )
        self.assertBodyError("identity.Any = {x = 1}", "identity.Any must be an empty table")

    def test_individual_in_context_errors(self) -> None:
        """The {identity, context} form: both keys, a known context, a usable name."""
        for table, reason in [
            ('{ identity = "d", context = "Bogus" }',
             "identity.Individual: unknown identity context 'Bogus' (known: SmtpAuthPlainAuthorization,"),
            ('{ identity = "d", context = "smtpauthplainauthentication" }', "unknown identity context"),
            ('{ identity = "d", context = "" }', "unknown identity context"),
            ('{ identity = "d", context = 3 }', "identity.Individual.context must be a string, not an integer"),
            ('{ identity = "d" }', 'identity.Individual: missing required key "context"'),
            ('{ context = "HttpBasicAuth" }', 'identity.Individual: missing required key "identity"'),
            ('{ identity = "d", context = "HttpBasicAuth", group = "g" }',
             'identity.Individual: unknown key "group" (expected identity, context)'),
            ("{}", 'identity.Individual: missing required key "identity"'),
            ('{ identity = "", context = "HttpBasicAuth" }',
             "identity.Individual.identity must be a non-empty string, not an empty string"),
            ('{ identity = ["d"], context = "HttpBasicAuth" }',
             "identity.Individual.identity must be a non-empty string, not an array"),
            ('{ identity = "a\\u0001b", context = "HttpBasicAuth" }',
             "identity.Individual: identity must not contain control or invisible characters"),
        ]:
            self.assertBodyError(f"identity.Individual = {table}", reason)
        self.assertBodyError(
            'criteria.Not.Identity.Individual = { identity = "d", context = "Nope" }',
            "criteria.Not.Identity.Individual: unknown identity context 'Nope'",
        )
        self.assertBodyError(
            "identity.Individual = []",
            "identity.Individual must be a non-empty string or an {identity, context} table",
        )

    def test_machine(self) -> None:
        self.assertBodyError(
            'identity.Machine = "10.0.0.300"', 'identity.Machine: "10.0.0.300" is not an IP address'
        )
        self.assertBodyError('identity.Machine = "10.1.2.3/8"', "has host bits set")
        self.assertBodyError('identity.Machine = "example.com"', "is not an IP address")
        self.assertBodyError("identity.Machine = 10", "identity.Machine must be a non-empty string")
        self.assertBodyError("identity.MachineSet = []", "identity.MachineSet must be a non-empty array")
        self.assertBodyError('identity.MachineSet = "10.0.0.1"', "identity.MachineSet must be a non-empty array")
        self.assertBodyError(
            'identity.MachineSet = ["10.0.0.1", "bogus"]', 'identity.MachineSet[1]: "bogus" is not an IP'
        )
        self.assertBodyError("identity.MachineSet = [1]", "identity.MachineSet[0] must be a string")

    def test_criteria_table(self) -> None:
        self.assertBodyError("criteria.Maybe = {}", 'criteria: unknown key "Maybe"')
        self.assertBodyError(
            "criteria = {Not = {Identity = {Any = {}}}, Identity = {Any = {}}}",
            "criteria must have exactly one key",
        )
        self.assertBodyError(
            "criteria.AnyOf = [{Identity = {Any = {}}}, {Not = {Identity = {Nobody = {}}}}]",
            'criteria.AnyOf #2.Not.Identity: unknown key "Nobody"',
        )
        self.assertBodyError('criteria.Identity = {Group = "a", Any = {}}',
                             "criteria.Identity must have exactly one key")

    def test_criteria_values(self) -> None:
        self.assertBodyError("criteria.AllOf = []", "criteria.AllOf must be a non-empty array")
        self.assertBodyError("criteria.AnyOf = {}", "criteria.AnyOf must be a non-empty array")
        self.assertBodyError("criteria.AllOf = [1]", "criteria.AllOf #1 must be a table")
        self.assertBodyError('criteria.Not = "Any"', "criteria.Not must be a table")

    def test_criteria_too_deep(self) -> None:
        deep = "{Not = " * 40 + "{Identity = {Any = {}}}" + "}" * 40
        self.assertBodyError(f"criteria = {deep}", "nested more than 32 levels deep")

    def test_rule_counted_per_resource(self) -> None:
        """Rule numbers count per resource; the line is that rule's own header."""
        text = (
            rule("a", True, '["p"]', "identity.Any = {}")
            + rule("b", True, '["p"]', "identity.Any = {}")
            + rule("a", True, '["p"]', "identity.Any = {}")
            + rule("a", True, '["p"]', "identity.Whom = {}")
        )
        self.assertRuleError(text, 13, 'unknown key "Whom"', resource="a", n=3)

    def test_header_syntaxes_located(self) -> None:
        """Spaced, literal-quoted and bare headers are all found."""
        good = "[[acl.r]]\nallow = true\nprivileges = ['p']\nidentity.Any = {}\n"
        bad = "\n[[ acl . 'r' ]]  # second\nallow = 1\nprivileges = ['p']\nidentity.Any = {}\n"
        self.assertRuleError(good + bad, 6, "allow must be true or false", n=2)
        escaped = '[[acl."s\\u002Ft"]]\nallow = true\nprivileges = ["p"]\nidentity = 1\n'
        self.assertRuleError("\n" + escaped, 2, "identity must be a table", resource="s/t")

    def test_inline_rules_located(self) -> None:
        """Without a header, the line is where the resource is first mentioned."""
        self.assertRuleError(
            '# x\n[acl]\nother = []\nr = [{allow = true, privileges = ["p"], identity = 1}]\n',
            4, "identity must be a table",
        )
        self.assertRuleError(
            '\nacl = { r = [ {allow = true, privileges = ["p"]} ] }\n', 2,
            "needs identity or criteria",
        )

    def test_rule_not_a_table(self) -> None:
        self.assertRuleError("\n\nacl.r = [1]\n", 3, "must be a table, not an integer")

    def test_bad_resource_names(self) -> None:
        """Empty names and empty segments are refused, at the header's line."""
        for resource, reason in [
            ("", "empty resource name"),
            ("a//b", "empty path segment"),
            ("/a", "empty path segment"),
            ("a/", "empty path segment"),
        ]:
            path, message = self.load_error(
                "# c\n" + rule(resource, True, '["p"]', "identity.Any = {}")
            )
            self.assertTrue(message.startswith(f'{path}:2: acl "{resource}": '), message)
            self.assertIn(reason, message)

    def test_resource_not_array(self) -> None:
        path, message = self.load_error('\n[acl."r"]\nallow = true\n')
        self.assertTrue(message.startswith(f'{path}:2: acl "r": '), message)
        self.assertIn("must be an array of tables", message)

    def test_acl_not_table(self) -> None:
        path, message = self.load_error("# c\nacl = 1\n")
        self.assertEqual(message, f"{path}:2: acl must be a table of arrays of tables, not an integer")

    def test_unknown_top_level_key(self) -> None:
        path, message = self.load_error(
            rule("r", True, '["p"]', "identity.Any = {}") + '\n[acls."x"]\ny = 1\n'
        )
        self.assertEqual(message, f'{path}:6: unknown top-level key "acls" (only acl is allowed)')

    def test_toml_syntax(self) -> None:
        """TOML syntax errors keep tomllib's line and column."""
        path, message = self.load_error(
            '[[acl."r"]]\nallow = true\nprivileges = ["p" "q"]\nidentity.Any = {}\n'
        )
        self.assertTrue(message.startswith(f"{path}: "), message)
        self.assertIn("line 3", message)

    def test_toml_too_deep(self) -> None:
        path, message = self.load_error("x = " + "[" * 3000 + "]" * 3000)
        self.assertEqual(message, f"{path}: values nested too deeply")

    def test_not_utf8(self) -> None:
        path, message = self.load_error(b'# ok\n# caf\xe9\n[[acl."r"]]\n')
        self.assertTrue(message.startswith(f"{path}:2: "), message)
        self.assertIn("UTF-8", message)

    def test_missing_file(self) -> None:
        path = os.path.abspath(self.mktemp())
        message = str(self.assertRaises(ConfigError, load_acl_file, path))
        self.assertEqual(message, f"{path}: No such file or directory")

    def test_unprintable_resource_quoted(self) -> None:
        """A resource name with a newline still gives a one-line message."""
        path, message = self.load_error('[[acl."a\\nb"]]\nallow = 1\nprivileges = ["p"]\n')
        self.assertIn('acl "a\\nb" rule 1', message)

    def test_default_source(self) -> None:
        message = str(self.assertRaises(ConfigError, parse_acl, "x = 1"))
        self.assertTrue(message.startswith("<string>:1: "), message)


#: Pieces of plausible and implausible ACL files, to get past the TOML parser.
ACL_FRAGMENTS = st.sampled_from([
    '[[acl."a/b"]]', "[[acl.a]]", "[[ acl . '*/x' ]]", '[[acl.""]]', '[[acl."a//b"]]',
    "[acl]", "[acl.a]", "acl = 1", "[other]", "x = 1",
    "allow = true", "allow = false", 'allow = "yes"',
    'privileges = ["send"]', 'privileges = ["*"]', "privileges = []", 'privileges = ["a", 1]',
    'identity.Group = "g"', "identity.Any = {}", "identity.Authenticated = {x = 1}",
    'identity.Machine = "10.0.0.0/8"', 'identity.Machine = "::ffff:0:0/96"', 'identity.Machine = "x"',
    "identity = {}", 'identity.Individual = ""',
    'identity.Individual = {identity = "a", context = "SmtpAuthPlainAuthentication"}',
    'identity.Individual = {identity = "a", context = "Bogus"}', 'identity.Individual = {identity = "a"}',
    'criteria.Identity.Individual = {identity = "a", context = "HttpBasicAuth", x = 1}',
    "criteria.Not = {Identity = {Any = {}}}", "criteria.AllOf = []",
    'criteria.AnyOf = [{Identity = {Individual = "x"}}, 3]',
    "criteria = {Not = {Not = {Identity = {Unauthenticated = {}}}}}",
    'a = [{allow = false, privileges = ["*"], identity = {Authenticated = {}}}]',
    '"a/*" = [{allow = true, privileges = ["p"], criteria = {AnyOf = [{Identity = {Any = {}}}]}}]',
    "# comment", "", "[[", "]]", '"', "=",
])


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(st.one_of(st.text(), st.lists(st.one_of(ACL_FRAGMENTS, st.text(max_size=8)),
                                         max_size=12).map("\n".join)))
    def test_parse_acl_total(self, text: str) -> None:
        """Any text is either an AccessControlMap or a one-line ConfigError."""
        try:
            policy = parse_acl(text, "f.toml")
        except ConfigError as e:
            self.assertTrue(str(e).startswith("f.toml"), str(e))
            self.assertNotIn("\n", str(e))
        else:
            self.assertIsInstance(policy, AccessControlMap)
            for resource in ("a", "a/b", "a/b/c", "x/y"):
                self.assertIn(policy.query_resource_access(info("a"), resource, "send"), (True, False))
