"""
Tests for L{gateway.authinfo}: identities, contexts and the KumoMTA-shaped
AuthInfo JSON.
"""

from __future__ import annotations

import json

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from gateway.authinfo import (
    UNAUTHENTICATED,
    AuthInfo,
    IAuthInfo,
    Identity,
    IdentityContext,
)

#: The SMTP AUTH PLAIN return of the seed's Lua example, as JSON.
SEED_SMTP = {
    "identities": [
        {"identity": "sales", "context": "SmtpAuthPlainAuthorization"},
        {"identity": "daniel", "context": "SmtpAuthPlainAuthentication"},
    ],
    "groups": ["group1", "group2"],
}

#: The HTTP Basic return of the seed's Lua example, as JSON.
SEED_HTTP = {
    "identities": [{"identity": "daniel", "context": "HttpBasicAuth"}],
    "groups": ["group1", "group2"],
}


class IdentityContextTests(SynchronousTestCase):
    def test_values(self) -> None:
        """The seven contexts have exactly KumoMTA's names, in its order."""
        self.assertEqual(
            [c.value for c in IdentityContext],
            [
                "SmtpAuthPlainAuthorization",
                "SmtpAuthPlainAuthentication",
                "HttpBasicAuth",
                "BearerToken",
                "ProxyAuthRfc1929",
                "LocalSystem",
                "GenericAuth",
            ],
        )

    def test_str(self) -> None:
        """C{str()} of a context is its bare value, not C{IdentityContext.X}."""
        self.assertEqual(str(IdentityContext.HttpBasicAuth), "HttpBasicAuth")
        self.assertEqual(f"{IdentityContext.LocalSystem}", "LocalSystem")

    def test_lookupByValue(self) -> None:
        """A context is found from its string value."""
        self.assertIs(IdentityContext("BearerToken"), IdentityContext.BearerToken)


class IdentityTests(SynchronousTestCase):
    def test_defaultContext(self) -> None:
        """Without a context an identity is C{GenericAuth}."""
        self.assertIs(Identity("alice").context, IdentityContext.GenericAuth)

    def test_bytesIdentityDecoded(self) -> None:
        """A bytes identity is decoded as UTF-8."""
        ident = Identity("j\u00fcrgen".encode(), IdentityContext.HttpBasicAuth)
        self.assertEqual(ident.identity, "j\u00fcrgen")
        self.assertIsInstance(ident.identity, str)

    def test_nonStringIdentity(self) -> None:
        """An identity that is neither str nor bytes is a TypeError."""
        self.assertRaises(TypeError, Identity, 42)

    def test_strContextAccepted(self) -> None:
        """A context given as its string value becomes the enum member."""
        ident = Identity("alice", "ProxyAuthRfc1929")
        self.assertIs(ident.context, IdentityContext.ProxyAuthRfc1929)
        self.assertEqual(ident, Identity("alice", IdentityContext.ProxyAuthRfc1929))

    def test_unknownContext(self) -> None:
        """An unknown context is a ValueError that names it."""
        e = self.assertRaises(ValueError, Identity, "alice", "KerberosTicket")
        self.assertIn("'KerberosTicket'", str(e))

    def test_toJsonDict(self) -> None:
        """An identity serialises to C{{identity, context}} with the plain value."""
        self.assertEqual(
            Identity("alice", IdentityContext.BearerToken).to_json_dict(),
            {"identity": "alice", "context": "BearerToken"},
        )

    def test_frozen(self) -> None:
        """Identities are immutable."""
        ident = Identity("alice")
        self.assertRaises(attrs.exceptions.FrozenInstanceError, setattr, ident, "identity", "bob")


class AuthInfoTests(SynchronousTestCase):
    def test_interface(self) -> None:
        """L{AuthInfo} provides L{IAuthInfo}."""
        self.assertTrue(verifyObject(IAuthInfo, AuthInfo()))
        self.assertTrue(verifyObject(IAuthInfo, AuthInfo.from_json_dict(SEED_SMTP)))

    def test_toJsonSeedShape(self) -> None:
        """C{to_json} produces exactly the seed's shape: identities, groups, peer_address."""
        info = AuthInfo(
            identities=[
                Identity("sales", IdentityContext.SmtpAuthPlainAuthorization),
                Identity("daniel", IdentityContext.SmtpAuthPlainAuthentication),
            ],
            groups=["group1", "group2"],
            peer_address="127.0.0.1",
        )
        self.assertEqual(
            json.loads(info.to_json()),
            {
                "identities": [
                    {"identity": "sales", "context": "SmtpAuthPlainAuthorization"},
                    {"identity": "daniel", "context": "SmtpAuthPlainAuthentication"},
                ],
                "groups": ["group1", "group2"],
                "peer_address": "127.0.0.1",
            },
        )
        self.assertEqual(AuthInfo.from_json(info.to_json()), info)

    def test_toJsonEmpty(self) -> None:
        """An empty AuthInfo still has all three keys, C{peer_address} null."""
        self.assertEqual(
            json.loads(AuthInfo().to_json()),
            {"identities": [], "groups": [], "peer_address": None},
        )
        self.assertEqual(
            AuthInfo().to_json_dict(), {"identities": [], "groups": [], "peer_address": None}
        )

    def test_toJsonCompact(self) -> None:
        """C{to_json} is compact: no spaces after separators."""
        self.assertEqual(
            AuthInfo(groups=["a"]).to_json(),
            '{"identities":[],"groups":["a"],"peer_address":null}',
        )

    def test_fromSeedSmtpExample(self) -> None:
        """The seed's SMTP AUTH PLAIN return gives both identities and the groups."""
        info = AuthInfo.from_json(json.dumps(SEED_SMTP))
        self.assertEqual(
            info.identities,
            (
                Identity("sales", IdentityContext.SmtpAuthPlainAuthorization),
                Identity("daniel", IdentityContext.SmtpAuthPlainAuthentication),
            ),
        )
        self.assertEqual(info.groups, ("group1", "group2"))
        self.assertIsNone(info.peer_address)
        self.assertEqual(
            info.identity_for(IdentityContext.SmtpAuthPlainAuthorization), "sales"
        )
        self.assertEqual(
            info.identity_for(IdentityContext.SmtpAuthPlainAuthentication), "daniel"
        )

    def test_fromSeedHttpExample(self) -> None:
        """The seed's HTTP Basic return gives one C{HttpBasicAuth} identity."""
        info = AuthInfo.from_json_dict(SEED_HTTP)
        self.assertEqual(info.identities, (Identity("daniel", IdentityContext.HttpBasicAuth),))
        self.assertEqual(info.groups, ("group1", "group2"))

    def test_fromJsonBytes(self) -> None:
        """C{from_json} also accepts UTF-8 bytes."""
        info = AuthInfo.from_json(json.dumps(SEED_HTTP).encode("utf-8"))
        self.assertEqual(info, AuthInfo.from_json_dict(SEED_HTTP))

    def test_optionalFieldsMissing(self) -> None:
        """Every field is optional: C{{}} is the unauthenticated state."""
        self.assertEqual(AuthInfo.from_json("{}"), AuthInfo())
        self.assertEqual(AuthInfo.from_json("{}"), UNAUTHENTICATED)
        only_groups = AuthInfo.from_json_dict({"groups": ["g"]})
        self.assertEqual((only_groups.identities, only_groups.groups), ((), ("g",)))

    def test_badIdentityNames(self) -> None:
        """Empty names and control characters are refused: they would pass as logins or forge log lines."""
        for name in ("", "bob\nauth success", "a\x00b", "del\x7f", "c1\x85line", "sep\u2028x",
                     "bidi\u202egnp.exe", "zero\u200bwidth"):
            self.assertRaises(ValueError, AuthInfo.from_json_dict, {"identities": [{"identity": name}]})
        self.assertEqual(AuthInfo.from_json_dict({"identities": [{"identity": "Zoë Ågren"}]}).names(),
                         {"Zoë Ågren"})

    def test_badGroupNames(self) -> None:
        """Group names become Remote-Groups header values and log text: printable only."""
        for name in ("admins\r\nX-Injected: 1", "a\x85b", "sep\u2028x"):
            self.assertRaises(ValueError, AuthInfo.from_json_dict, {"groups": [name]})

    def test_peerAddressIsAnIP(self) -> None:
        """peer_address is an IP address (KumoMTA's IpAddr), canonicalised."""
        info = AuthInfo.from_json_dict({"peer_address": "::ffff:192.0.2.1"})
        self.assertEqual(info.peer_address, "192.0.2.1")
        self.assertEqual(AuthInfo(peer_address="2001:DB8::1").peer_address, "2001:db8::1")
        for bad in ("not an ip", "/run/authgateway.sock", ""):
            self.assertRaises(ValueError, AuthInfo.from_json_dict, {"peer_address": bad})

    def test_hugeOrDeepJson(self) -> None:
        """Oversized or deeply nested JSON is a ValueError, not a crash."""
        self.assertRaises(ValueError, AuthInfo.from_json, "[" * 100000)
        self.assertRaises(ValueError, AuthInfo.from_json, "[" * 5000 + "]" * 5000)
        self.assertRaises(ValueError, AuthInfo.from_json, '{"groups": ["' + "g" * 70000 + '"]}')

    def test_identityContextOptional(self) -> None:
        """An identity object without a context gets C{GenericAuth}."""
        info = AuthInfo.from_json_dict({"identities": [{"identity": "alice"}]})
        self.assertEqual(info.identities, (Identity("alice", IdentityContext.GenericAuth),))

    def test_peerAddressNull(self) -> None:
        """C{peer_address: null} reads as None and writes back as null."""
        info = AuthInfo.from_json('{"peer_address": null}')
        self.assertIsNone(info.peer_address)
        self.assertIsNone(json.loads(info.to_json())["peer_address"])

    def test_peerAddress(self) -> None:
        """A peer address string is kept as given."""
        info = AuthInfo.from_json('{"peer_address": "::1"}')
        self.assertEqual(info.peer_address, "::1")

    def test_nullListsAreEmpty(self) -> None:
        """C{identities: null} and C{groups: null} read as empty."""
        info = AuthInfo.from_json('{"identities": null, "groups": null}')
        self.assertEqual((info.identities, info.groups), ((), ()))

    def test_groupsDeduplicatedInOrder(self) -> None:
        """Duplicate groups are dropped, first occurrences keep their order."""
        info = AuthInfo(groups=["b", "a", "b", "c", "a"])
        self.assertEqual(info.groups, ("b", "a", "c"))
        self.assertEqual(
            AuthInfo.from_json('{"groups": ["x", "y", "x"]}').groups, ("x", "y")
        )

    def test_withGroups(self) -> None:
        """C{with_groups} appends new groups, drops duplicates, leaves the original alone."""
        info = AuthInfo(
            identities=[Identity("alice")], groups=["a", "b"], peer_address="192.0.2.1"
        )
        more = info.with_groups(["b", "c", "a", "d"])
        self.assertEqual(more.groups, ("a", "b", "c", "d"))
        self.assertEqual(more.identities, info.identities)
        self.assertEqual(more.peer_address, "192.0.2.1")
        self.assertEqual(info.groups, ("a", "b"))

    def test_withGroupsInvalid(self) -> None:
        """C{with_groups} refuses an empty group name."""
        self.assertRaises(TypeError, AuthInfo().with_groups, [""])

    def test_identityFor(self) -> None:
        """C{identity_for} gives the first identity of a context, or None."""
        info = AuthInfo(
            identities=[
                Identity("first", IdentityContext.HttpBasicAuth),
                Identity("tok", IdentityContext.BearerToken),
                Identity("second", IdentityContext.HttpBasicAuth),
            ]
        )
        self.assertEqual(info.identity_for(IdentityContext.HttpBasicAuth), "first")
        self.assertEqual(info.identity_for(IdentityContext.BearerToken), "tok")
        self.assertIsNone(info.identity_for(IdentityContext.LocalSystem))

    def test_names(self) -> None:
        """C{names} is the set of identity names, whatever their context."""
        info = AuthInfo.from_json_dict(
            {
                "identities": [
                    {"identity": "alice", "context": "SmtpAuthPlainAuthorization"},
                    {"identity": "alice", "context": "SmtpAuthPlainAuthentication"},
                    {"identity": "bob", "context": "LocalSystem"},
                ]
            }
        )
        self.assertEqual(info.names(), frozenset({"alice", "bob"}))
        self.assertEqual(AuthInfo().names(), frozenset())

    def test_isAuthenticated(self) -> None:
        """An AuthInfo is authenticated exactly when it has an identity; groups do not count."""
        self.assertFalse(AuthInfo(groups=["g"], peer_address="127.0.0.1").is_authenticated())
        self.assertTrue(AuthInfo(identities=[Identity("a")]).is_authenticated())

    def test_unauthenticated(self) -> None:
        """C{UNAUTHENTICATED} is empty: no identity, no group, no peer."""
        self.assertFalse(UNAUTHENTICATED.is_authenticated())
        self.assertEqual(UNAUTHENTICATED.identities, ())
        self.assertEqual(UNAUTHENTICATED.groups, ())
        self.assertIsNone(UNAUTHENTICATED.peer_address)
        self.assertTrue(IAuthInfo.providedBy(UNAUTHENTICATED))

    def test_frozen(self) -> None:
        """AuthInfo is immutable."""
        self.assertRaises(
            attrs.exceptions.FrozenInstanceError, setattr, UNAUTHENTICATED, "groups", ("x",)
        )

    def test_fromJsonDictPassesAuthInfoThrough(self) -> None:
        """C{from_json_dict} given an AuthInfo returns that same object."""
        info = AuthInfo(groups=["g"])
        self.assertIs(AuthInfo.from_json_dict(info), info)

    def test_constructorAcceptsDicts(self) -> None:
        """The constructor accepts identity dicts as well as L{Identity} objects."""
        self.assertEqual(
            AuthInfo(identities=[{"identity": "a", "context": "LocalSystem"}]).identities,
            (Identity("a", IdentityContext.LocalSystem),),
        )


class MalformedAuthInfoTests(SynchronousTestCase):
    """Every malformed input is a ValueError with its reason."""

    def assertMalformed(self, data: object, reason: str) -> ValueError:
        if isinstance(data, (str, bytes)):
            e = self.assertRaises(ValueError, AuthInfo.from_json, data)
        else:
            e = self.assertRaises(ValueError, AuthInfo.from_json_dict, data)
        self.assertIn(reason, str(e))
        return e

    def test_unknownTopLevelField(self) -> None:
        """An unknown top-level field is named."""
        self.assertMalformed({"groups": [], "roles": ["x"]}, "unknown AuthInfo field(s): roles")

    def test_unknownIdentityField(self) -> None:
        """An unknown field in an identity is named."""
        self.assertMalformed(
            {"identities": [{"identity": "a", "realm": "x"}]},
            "unknown identity field(s): realm",
        )

    def test_identityMissing(self) -> None:
        """An identity object without C{identity} is refused."""
        self.assertMalformed(
            {"identities": [{"context": "HttpBasicAuth"}]}, "needs an 'identity' field"
        )

    def test_identityNotString(self) -> None:
        """A non-string identity name is refused."""
        self.assertMalformed(
            '{"identities": [{"identity": 5}]}', "identity must be a string, not int"
        )

    def test_identityNotObject(self) -> None:
        """An identity that is a bare string instead of an object is refused."""
        self.assertMalformed('{"identities": ["daniel"]}', "an identity must be an object")

    def test_identitiesNotList(self) -> None:
        """C{identities} as an object or a string is refused."""
        self.assertMalformed(
            {"identities": {"identity": "a"}}, "identities must be a list"
        )
        self.assertMalformed({"identities": "daniel"}, "identities must be a list")

    def test_groupsString(self) -> None:
        """C{groups} as a string instead of a list is refused."""
        self.assertMalformed({"groups": "group1"}, "groups must be a list of strings")

    def test_groupsEmptyString(self) -> None:
        """C{groups} as an empty string is still not a list, and is refused."""
        self.assertMalformed({"groups": ""}, "groups must be a list of strings")

    def test_groupNotString(self) -> None:
        """A non-string group name is refused."""
        self.assertMalformed('{"groups": ["ok", 3]}', "group names must be non-empty strings")

    def test_groupEmpty(self) -> None:
        """An empty group name is refused."""
        self.assertMalformed('{"groups": [""]}', "group names must be non-empty strings")

    def test_peerAddressNotString(self) -> None:
        """A non-string peer address is refused."""
        self.assertMalformed('{"peer_address": 5}', "peer_address must be a string or null")

    def test_badJson(self) -> None:
        """Text that is not JSON is refused as such."""
        self.assertMalformed('{"groups": [', "AuthInfo is not valid JSON")

    def test_nonObjectJson(self) -> None:
        """JSON that is not an object is refused, naming its type."""
        self.assertMalformed("[]", "an AuthInfo must be an object, not list")
        self.assertMalformed('"daniel"', "an AuthInfo must be an object, not str")
        self.assertMalformed("null", "an AuthInfo must be an object, not NoneType")

    def test_badContext(self) -> None:
        """An unknown context is refused and named."""
        self.assertMalformed(
            '{"identities": [{"identity": "a", "context": "Kerberos"}]}',
            "unknown identity context 'Kerberos'",
        )


#: Printable text: what identity and group names may hold.
_names = st.text(st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"))
                 | st.just(" "), min_size=1)
_identities = st.lists(
    st.builds(Identity, _names, st.sampled_from(IdentityContext)), max_size=5
)
_groups = st.lists(_names, max_size=6)
_peers = st.none() | st.ip_addresses().map(str)


class AuthInfoPropertyTests(SynchronousTestCase):
    @settings(deadline=None)
    @given(identities=_identities, groups=_groups, peer=_peers)
    def test_jsonRoundTrip(self, identities, groups, peer) -> None:
        """Any AuthInfo survives C{to_json} then C{from_json} unchanged."""
        info = AuthInfo(identities=identities, groups=groups, peer_address=peer)
        self.assertEqual(AuthInfo.from_json(info.to_json()), info)
        self.assertEqual(AuthInfo.from_json_dict(info.to_json_dict()), info)
        self.assertEqual(info.identities, tuple(identities))
        self.assertEqual(info.groups, tuple(dict.fromkeys(groups)))
