"""The SOCKS destination rules: the default refusals, the special-purpose registries and --socks-allow."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from gateway.socks.rules import (
    SPECIAL,
    AllowRule,
    DestinationRules,
    embedded_ipv4,
    embedded_ipv4s,
    is_public,
    is_sensitive,
    libc_ipv4,
)


def ip(text):
    return ipaddress.ip_address(text)


class DefaultTests(SynchronousTestCase):
    def test_refused(self):
        for text in ("127.0.0.1", "127.1.2.3", "10.0.0.1", "172.16.5.4", "192.168.1.1",
                     "169.254.169.254", "100.64.0.1", "0.0.0.0", "224.0.0.1", "255.255.255.255",
                     "192.0.2.1", "::1", "::", "fe80::1", "fc00::1", "fd12:3456::1", "ff02::1",
                     "::ffff:127.0.0.1", "::ffff:10.1.1.1", "64:ff9b::a9fe:a9fe",
                     "2002:7f00:1::1", "2001:db8::1", "::127.0.0.1"):
            self.assertFalse(is_public(ip(text)), text)

    def test_public(self):
        for text in ("93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111",
                     "::ffff:93.184.216.34", "64:ff9b::808:808", "2002:808:808::1"):
            self.assertTrue(is_public(ip(text)), text)

    def test_embedded(self):
        self.assertEqual(embedded_ipv4(ip("::ffff:1.2.3.4")), ip("1.2.3.4"))
        self.assertEqual(embedded_ipv4(ip("64:ff9b::102:304")), ip("1.2.3.4"))
        self.assertEqual(embedded_ipv4(ip("2002:102:304::")), ip("1.2.3.4"))
        self.assertIsNone(embedded_ipv4(ip("2606:4700::1")))
        self.assertIsNone(embedded_ipv4(ip("1.2.3.4")))

    def test_port_25(self):
        rules = DestinationRules()
        self.assertFalse(rules.permits(None, [ip("93.184.216.34")], 25))
        self.assertTrue(rules.permits(None, [ip("93.184.216.34")], 587))

    def test_one_bad_address_refuses_all(self):
        """A name resolving to a public and a private address (rebinding) is refused."""
        rules = DestinationRules()
        self.assertFalse(rules.permits("evil.test", [ip("93.184.216.34"), ip("127.0.0.1")], 80))
        self.assertFalse(rules.permits("nothing.test", [], 80))


class AllowTests(SynchronousTestCase):
    def test_parse(self):
        cases = {
            "10.0.0.0/8": AllowRule(network=ipaddress.ip_network("10.0.0.0/8")),
            "10.1.2.3:443": AllowRule(network=ipaddress.ip_network("10.1.2.3/32"), ports=(443, 443)),
            "10.0.0.0/8:8000-8100": AllowRule(network=ipaddress.ip_network("10.0.0.0/8"),
                                              ports=(8000, 8100)),
            "[fd00::/8]:22": AllowRule(network=ipaddress.ip_network("fd00::/8"), ports=(22, 22)),
            "fd00::1": AllowRule(network=ipaddress.ip_network("fd00::1/128")),
            "Intranet.Example.": AllowRule(host="intranet.example"),
            ".corp.example:443": AllowRule(host=".corp.example", ports=(443, 443)),
        }
        for text, rule in cases.items():
            self.assertEqual(AllowRule.parse(text), rule, text)

    def test_bad(self):
        for text in ("", ":80", "10.0.0.0/8:0", "10.0.0.0/8:70000", "host:9-8", "[::1", "[::1]x",
                     "a b", "host:port", "-bad.example", "."):
            self.assertRaises(ValueError, AllowRule.parse, text)

    def test_widen_by_network(self):
        rules = DestinationRules((AllowRule.parse("10.0.0.0/8:443"), AllowRule.parse("192.0.2.7")))
        self.assertTrue(rules.permits(None, [ip("10.2.3.4")], 443))
        self.assertFalse(rules.permits(None, [ip("10.2.3.4")], 80))
        self.assertTrue(rules.permits(None, [ip("::ffff:10.2.3.4")], 443))
        self.assertTrue(rules.permits(None, [ip("192.0.2.7")], 25))  # a rule covers port 25 too
        self.assertTrue(rules.allows_local(ip("192.0.2.7"), 8080))
        self.assertFalse(rules.allows_local(ip("127.0.0.1"), 8080))

    def test_widen_by_name(self):
        rules = DestinationRules((AllowRule.parse(".corp.example:443"), AllowRule.parse("db.test")))
        self.assertTrue(rules.permits("wiki.corp.example", [ip("10.0.0.5")], 443))
        self.assertTrue(rules.permits("CORP.example.", [ip("10.0.0.5")], 443))
        self.assertFalse(rules.permits("wiki.corp.example", [ip("10.0.0.5")], 80))
        self.assertFalse(rules.permits("evilcorp.example", [ip("10.0.0.5")], 443))
        self.assertTrue(rules.permits("db.test", [ip("192.168.3.4")], 5432))
        self.assertFalse(rules.permits("x.db.test", [ip("192.168.3.4")], 5432))

    def test_names_never_open_loopback_or_metadata(self):
        """A DNS record under an allowed name cannot point the proxy at itself or the metadata service."""
        rules = DestinationRules((AllowRule.parse(".corp.example"),))
        for address in ("127.0.0.1", "169.254.169.254", "::1", "::ffff:127.0.0.1", "fe80::1",
                        "0.0.0.0", "224.0.0.1"):
            self.assertFalse(rules.permits("x.corp.example", [ip(address)], 80), address)
        both = DestinationRules((AllowRule.parse(".corp.example"), AllowRule.parse("127.0.0.1:5432")))
        self.assertTrue(both.permits("db.corp.example", [ip("127.0.0.1")], 5432))
        self.assertFalse(rules.permits(None, [ip("10.0.0.5")], 443))  # the name rule needs the name


# --- the special-purpose registries (issue 11 item 9) -------------------------

#: The IANA special-purpose registries' entries, written out again here so the
#: table in rules.py cannot lose one unnoticed.
REGISTRY_V4 = (
    "0.0.0.0/8", "0.0.0.0/32", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.0.0.0/29", "192.0.0.8/32", "192.0.0.9/32",
    "192.0.0.10/32", "192.0.0.170/32", "192.0.0.171/32", "192.0.2.0/24", "192.31.196.0/24",
    "192.52.193.0/24", "192.88.99.0/24", "192.88.99.2/32", "192.168.0.0/16", "192.175.48.0/24",
    "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "240.0.0.0/4", "255.255.255.255/32",
)
REGISTRY_V6 = (
    "::1/128", "::/128", "::ffff:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48", "100::/64",
    "100:0:0:1::/64", "2001::/23", "2001::/32", "2001:1::1/128", "2001:1::2/128",
    "2001:1::3/128", "2001:2::/48", "2001:3::/32", "2001:4:112::/48", "2001:10::/28",
    "2001:20::/28", "2001:30::/28", "2001:db8::/32", "2002::/16", "2620:4f:8000::/48",
    "3fff::/20", "5f00::/16", "fc00::/7", "fe80::/10",
)
#: Not in the registries, refused as well.
OTHER = ("224.0.0.0/4", "ff00::/8", "::/96", "::ffff:0:0:0/96", "fec0::/10")
#: Known cloud metadata (and neighbouring service) addresses: sensitive.
METADATA = ("169.254.169.254", "fd00:ec2::254", "fd00:ec2::23", "fd00:ec2::123",
            "100.100.100.200", "168.63.129.16", "192.0.0.192", "fd20:ce::254")
#: Sensitive: no name rule opens them.
SENSITIVE = ("0.0.0.0/8", "0.0.0.0/32", "127.0.0.0/8", "169.254.0.0/16", "240.0.0.0/4",
             "255.255.255.255/32", "224.0.0.0/4", "::1/128", "::/128", "fe80::/10", "ff00::/8",
             "64:ff9b:1::/48")

NAME_RULE = DestinationRules((AllowRule.parse(".corp.example"),))


def ends(network):
    """The first and last address of C{network}."""
    return network[0], network[-1]


def disguises(v4):
    """Every IPv6 form that carries the IPv4 address C{v4}."""
    n = int(ipaddress.IPv4Address(v4))
    public = int(ipaddress.IPv4Address("93.184.216.34"))
    nat64_local = int(ipaddress.IPv6Address("64:ff9b:1::"))
    forms = {
        "mapped": (0xFFFF << 32) | n,
        "SIIT translated": (0xFFFF << 48) | n,
        "IPv4-compatible": n,
        "NAT64 64:ff9b::/96": int(ipaddress.IPv6Address("64:ff9b::")) | n,
        # RFC 6052 section 2.2 layouts inside the local-use prefix (bits 64-71 are zero).
        "NAT64 local /48": nat64_local | ((n >> 16) << 64) | ((n & 0xFFFF) << 48),
        "NAT64 local /56": nat64_local | ((n >> 24) << 64) | ((n & 0xFFFFFF) << 32),
        "NAT64 local /64": nat64_local | (n << 24),
        "NAT64 local /96": nat64_local | n,
        "6to4": (0x2002 << 112) | (n << 80) | 1,
        "Teredo server": (0x20010000 << 96) | (n << 64) | (~public & 0xFFFFFFFF),
        "Teredo client": (0x20010000 << 96) | (public << 64) | (~n & 0xFFFFFFFF),
        "ISATAP": (0x26000000 << 96) | (0x5EFE << 32) | n,
        "ISATAP (u bit)": (0x26000000 << 96) | (0x02005EFE << 32) | n,
    }
    return {kind: ipaddress.IPv6Address(value) for kind, value in forms.items()}


class RegistryTests(SynchronousTestCase):
    def test_table_has_every_entry(self):
        table = {str(s.network) for s in SPECIAL}
        for text in REGISTRY_V4 + REGISTRY_V6 + OTHER:
            self.assertIn(str(ipaddress.ip_network(text)), table, text)
        for text in METADATA:
            self.assertTrue(any(ip(text) in s.network and s.sensitive for s in SPECIAL), text)
        for s in SPECIAL:
            self.assertTrue(s.source, s)

    def test_every_entry_refused_by_default(self):
        """First and last address of every block, both by is_public and by the rules."""
        rules = DestinationRules()
        for s in SPECIAL:
            for address in ends(s.network):
                self.assertFalse(is_public(address), f"{address} ({s.name})")
                self.assertFalse(rules.permits(None, [address], 443), f"{address} ({s.name})")
        for text in METADATA:
            self.assertFalse(rules.permits(None, [ip(text)], 80), text)

    def test_sensitive_refused_under_a_name_rule(self):
        for s in SPECIAL:
            if s.sensitive:
                for address in ends(s.network):
                    self.assertTrue(is_sensitive(address), f"{address} ({s.name})")
                    self.assertFalse(NAME_RULE.permits("x.corp.example", [address], 443),
                                     f"{address} ({s.name})")
        for text in SENSITIVE:
            for address in ends(ipaddress.ip_network(text)):
                self.assertFalse(NAME_RULE.permits("x.corp.example", [address], 443), address)
        for text in METADATA:
            self.assertFalse(NAME_RULE.permits("x.corp.example", [ip(text)], 80), text)

    def test_name_rule_still_opens_private(self):
        """What a name rule is for: internal hosts behind private addresses."""
        for text in ("10.0.0.5", "172.16.0.1", "192.168.1.1", "100.64.0.1", "fd12:3456::1",
                     "fd00:ec3::254", "2001:db8::1"):
            self.assertTrue(NAME_RULE.permits("x.corp.example", [ip(text)], 443), text)

    def test_disguises_refused_under_a_name_rule(self):
        """127.0.0.1 and the metadata address in every IPv6 form: never opened by a name."""
        for v4 in ("127.0.0.1", "169.254.169.254", "0.0.0.0", "100.100.100.200",
                   "168.63.129.16", "224.0.0.1"):
            for kind, address in disguises(v4).items():
                why = f"{v4} as {kind}: {address}"
                self.assertTrue(is_sensitive(address), why)
                self.assertFalse(is_public(address), why)
                self.assertFalse(NAME_RULE.permits("x.corp.example", [address], 80), why)
                self.assertFalse(DestinationRules().permits(None, [address], 80), why)

    def test_disguises_of_public_addresses(self):
        """The translators that reach the same IPv4 follow it; the deprecated forms are refused."""
        forms = disguises("93.184.216.34")
        for kind in ("mapped", "NAT64 64:ff9b::/96", "6to4"):
            self.assertTrue(is_public(forms[kind]), kind)
        for kind in ("SIIT translated", "IPv4-compatible", "NAT64 local /96", "Teredo client"):
            self.assertFalse(is_public(forms[kind]), kind)

    def test_embedded_forms(self):
        for kind, address in disguises("127.0.0.1").items():
            if not kind.startswith("NAT64 local"):  # a block, not a layout
                self.assertIn(ip("127.0.0.1"), embedded_ipv4s(address), kind)
        teredo = disguises("127.0.0.1")["Teredo server"]
        self.assertEqual(embedded_ipv4s(teredo), (ip("93.184.216.34"), ip("127.0.0.1")))
        self.assertEqual(embedded_ipv4(ip("::7f00:1")), ip("127.0.0.1"))
        self.assertEqual(embedded_ipv4(ip("::ffff:0:7f00:1")), ip("127.0.0.1"))

    def test_reported(self):
        """The addresses of the report, under a name rule."""
        for text in ("fd00:ec2::254", "100.100.100.200", "::7f00:1", "2001:0:a9fe:a9fe::1",
                     "64:ff9b:1::7f00:1", "::ffff:0:7f00:1", "::ffff:0:a9fe:a9fe"):
            self.assertFalse(NAME_RULE.permits("x.corp.example", [ip(text)], 80), text)

    def test_outside_global_unicast(self):
        """IPv6 outside 2000::/3 is reserved by IANA: refused."""
        for text in ("400::1", "1000::1", "4000::1", "8000::1", "e000::1", "fb00::1"):
            self.assertFalse(is_public(ip(text)), text)
        self.assertTrue(is_public(ip("2a00:1450:4001::1")))

    def test_cidr_rule_opens_every_entry(self):
        """Operators who really want one of these name it with a CIDR."""
        for s in SPECIAL:
            cidr = AllowRule(network=s.network)
            for address in ends(s.network):
                self.assertTrue(DestinationRules((cidr,)).permits(None, [address], 443), address)
                both = DestinationRules((AllowRule.parse(".corp.example"), cidr))
                self.assertTrue(both.permits("x.corp.example", [address], 443), address)
        self.assertTrue(DestinationRules((AllowRule.parse("[fd00:ec2::254]:80"),)).permits(
            "imds.corp.example", [ip("fd00:ec2::254")], 80))

    def test_ipv4_cidr_does_not_open_other_disguises(self):
        """An IPv4 CIDR covers the mapped form only, not 6to4, NAT64 or Teredo."""
        rules = DestinationRules((AllowRule.parse("127.0.0.0/8"),))
        self.assertTrue(rules.permits(None, [ip("::ffff:127.0.0.1")], 80))
        for kind, address in disguises("127.0.0.1").items():
            if kind != "mapped":
                self.assertFalse(rules.permits(None, [address], 80), kind)


class LibcLiteralTests(SynchronousTestCase):
    def test_libc_ipv4(self):
        cases = {"127.1": "127.0.0.1", "2130706433": "127.0.0.1", "0x7f.1": "127.0.0.1",
                 "0x7F000001": "127.0.0.1", "0177.0.0.1": "127.0.0.1", "0127.0.0.1": "87.0.0.1",
                 "0": "0.0.0.0", "10.1": "10.0.0.1"}
        for text, address in cases.items():
            self.assertEqual(libc_ipv4(text), ip(address), text)
        for text in ("example.com", "127.0.0.1.", "4294967296", "08.1.1.1", "1.2.3.4.5",
                     "127.0.0.1 x", "abc", "", "::1"):
            self.assertIsNone(libc_ipv4(text), text)

    def test_rule_rejects_libc_literal_names(self):
        """A host rule that libc would read as an address would match no name: refused."""
        for text in ("127.1", "2130706433", "0x7f.1:80", ".1"):
            self.assertRaises(ValueError, AllowRule.parse, text)


class DisguisePropertyTests(SynchronousTestCase):
    @given(st.integers(0, 2**32 - 1))
    @settings(max_examples=300, deadline=None)
    def test_sensitive_in_every_disguise(self, value):
        """An IPv4 that is sensitive stays so in every IPv6 form; a public one is never public in a deprecated form."""
        v4 = ipaddress.IPv4Address(value)
        forms = disguises(str(v4))
        if is_sensitive(v4):
            for kind, address in forms.items():
                self.assertTrue(is_sensitive(address), kind)
                self.assertFalse(is_public(address), kind)
        for kind in ("mapped", "NAT64 64:ff9b::/96", "6to4"):
            self.assertEqual(is_public(forms[kind]), is_public(v4), kind)
