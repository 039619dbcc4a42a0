"""The SOCKS destination rules: the default refusals and --socks-allow."""

from __future__ import annotations

import ipaddress

from twisted.trial.unittest import SynchronousTestCase

from gateway.socks.rules import AllowRule, DestinationRules, embedded_ipv4, is_public


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
