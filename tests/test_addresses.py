"""
Tests for L{gateway.addresses}: IP addresses as peers are counted (the host
parser has its own module, tests.test_web_hosts).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from gateway.addresses import (
    in_networks,
    ip_or_none,
    is_loopback,
    is_unspecified,
    network_keys,
    network_of,
    normalize_ip,
    parse_ip,
    peer_key,
)


class PeerKeyTests(SynchronousTestCase):
    def test_keys(self):
        self.assertEqual(peer_key("192.0.2.1"), "192.0.2.1")
        self.assertEqual(peer_key("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::/64")
        self.assertEqual(peer_key("2001:db8:1:2::9"), "2001:db8:1:2::/64")
        self.assertEqual(peer_key(None), None)
        self.assertEqual(peer_key("/run/sock"), "/run/sock")

    def test_dual_stack(self):
        """IPv4 clients of a dual-stack listener are each their own peer, not all of ::/64."""
        self.assertEqual(peer_key("::ffff:192.0.2.1"), "192.0.2.1")
        self.assertEqual(peer_key("::FFFF:198.51.100.7"), "198.51.100.7")
        self.assertEqual(peer_key("fe80::1%eth0"), "fe80::/64")


class ParseTests(SynchronousTestCase):
    """Every helper reads an address through L{parse_ip}, so they agree."""

    def test_spellings(self):
        for text, expected in [
            ("192.0.2.1", "192.0.2.1"),
            ("::ffff:192.0.2.1", "192.0.2.1"),
            ("2001:DB8::1", "2001:db8::1"),
            ("fe80::1%eth0", "fe80::1"),
        ]:
            self.assertEqual(str(parse_ip(text)), expected)
            self.assertEqual(normalize_ip(text), expected)
            self.assertEqual(ip_or_none(text), expected)

    def test_loopback_and_unspecified(self):
        """Any spelling (IPv4-mapped, scoped, upper case) through L{parse_ip}; a non-address is neither."""
        for text, loopback, unspecified in [
            ("127.0.0.1", True, False), ("127.9.9.9", True, False), ("::1", True, False),
            ("::ffff:127.0.0.1", True, False), ("::FFFF:7f00:1", True, False),
            ("0.0.0.0", False, True), ("::", False, True), ("::ffff:0.0.0.0", False, True),
            ("192.0.2.1", False, False), ("fe80::1%eth0", False, False),
            (None, False, False), ("", False, False), ("localhost", False, False),
            ("/run/sock", False, False),
        ]:
            self.assertEqual((is_loopback(text), is_unspecified(text)), (loopback, unspecified), text)

    def test_not_addresses(self):
        for text in ("", "example.com", "127.1", "0x7f.0.0.1", "/run/sock", "1.2.3.4.5"):
            self.assertIsNone(parse_ip(text))
            self.assertIsNone(ip_or_none(text))
            self.assertIsNone(network_of(text))
            self.assertFalse(in_networks(text, [ipaddress.ip_network("0.0.0.0/0")]))
            self.assertEqual(normalize_ip(text), text)  # not an address: unchanged
        self.assertIsNone(normalize_ip(None))
        self.assertIsNone(parse_ip(None))

    def test_networks(self):
        self.assertEqual(network_of("192.0.2.77"), "192.0.2.0/24")
        self.assertEqual(network_of("::ffff:192.0.2.77"), "192.0.2.0/24")
        self.assertEqual(network_of("2001:db8:1:2::1"), "2001:db8:1::/48")
        self.assertEqual(network_of("192.0.2.77", ipv4=16), "192.0.0.0/16")
        self.assertEqual(network_keys("2001:db8:1:2::1"), ("2001:db8:1:2::/64", "2001:db8:1::/48"))
        self.assertEqual(network_keys(None), ("?", "?"))
        self.assertTrue(in_networks("::ffff:10.1.2.3", [ipaddress.ip_network("10.0.0.0/8")]))
        self.assertFalse(in_networks("10.1.2.3", []))

    @given(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)))
    def test_mapped_is_the_ipv4_address(self, ip):
        """An address and its IPv4-mapped spelling are one peer everywhere."""
        if ip.version == 4:
            mapped = f"::ffff:{ip}"
            self.assertEqual(parse_ip(mapped), ip)
            self.assertEqual(peer_key(mapped), peer_key(str(ip)))
            self.assertEqual(network_of(mapped), network_of(str(ip)))
        else:
            self.assertEqual(parse_ip(ip.exploded), ip.ipv4_mapped or ip)
