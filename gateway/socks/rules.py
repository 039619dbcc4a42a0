# -*- test-case-name: tests.test_socks_rules -*-
"""
Where a SOCKS client may connect to.

By default an authenticated user reaches public addresses only. Refused:
loopback, private (RFC 1918, ULA), shared (RFC 6598), link-local (including
169.254.169.254), multicast, unspecified, reserved and documentation ranges,
the IPv4 inside IPv4-mapped, 6to4 and NAT64 IPv6 addresses when that IPv4 is
refused, and port 25 (an open relay for spam). Addresses of the gateway's
own host (its listeners, whatever its interfaces) are refused by the server
once connected, when it sees that it reached itself, unless a rule names them.

C{--socks-allow RULE} widens this for everyone: a CIDR or a host name, each
with an optional C{:port} or C{:first-last} (IPv6 CIDRs in brackets:
C{[2001:db8::/32]:443}). A host-name rule matches the name the client asked
for (exactly, or every subdomain with a leading dot: C{.example.com}) and
then allows what it resolves to, except loopback, link-local (cloud
metadata), unspecified and multicast addresses: a DNS record must not open
those, only a CIDR rule can. The networks are written out here rather
than taken from C{ipaddress}' C{is_private} / C{is_global}, which were wrong
before Python 3.12.4 (CVE-2024-4032).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence

import attrs

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_V4_REFUSED = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8",  # "this network", unspecified
        "10.0.0.0/8",  # RFC 1918
        "100.64.0.0/10",  # shared address space (carrier NAT)
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local, cloud metadata
        "172.16.0.0/12",  # RFC 1918
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # TEST-NET-1
        "192.88.99.0/24",  # 6to4 relay anycast
        "192.168.0.0/16",  # RFC 1918
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # TEST-NET-2
        "203.0.113.0/24",  # TEST-NET-3
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, broadcast
    )
)
_V6_REFUSED = tuple(
    ipaddress.IPv6Network(n)
    for n in (
        "::/128",  # unspecified
        "::1/128",  # loopback
        "::/96",  # IPv4-compatible (deprecated)
        "100::/64",  # discard
        "2001:db8::/32",  # documentation
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
        "fec0::/10",  # site-local (deprecated)
        "ff00::/8",  # multicast
    )
)
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_6TO4 = ipaddress.IPv6Network("2002::/16")

#: Ports refused by default (SMTP: an open proxy relays spam).
REFUSED_PORTS = frozenset({25})


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, NAT64, 6to4), if any."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address in _MAPPED or address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _6TO4:
        return ipaddress.IPv4Address((int(address) >> 80) & 0xFFFFFFFF)
    return None


_NEVER_BY_NAME = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4",
        "::/128", "::1/128", "fe80::/10", "ff00::/8",
    )
)


def _sensitive(address: IPAddress) -> bool:
    """Loopback, link-local, unspecified or multicast, in any IPv6 disguise."""
    inner = embedded_ipv4(address)
    if inner is not None:
        return _sensitive(inner)
    return any(address in n for n in _NEVER_BY_NAME if n.version == address.version)


def is_public(address: IPAddress) -> bool:
    """False for every range the module docstring lists."""
    inner = embedded_ipv4(address)
    if inner is not None:
        return is_public(inner)
    if isinstance(address, ipaddress.IPv4Address):
        return not any(address in n for n in _V4_REFUSED)
    return not any(address in n for n in _V6_REFUSED)


_PORTS = re.compile(r"(\d{1,5})(?:-(\d{1,5}))?")


@attrs.frozen
class AllowRule:
    """One C{--socks-allow}: a network or a host name, and a port range."""

    network: IPNetwork | None = None
    host: str | None = None  # lower case; a leading "." matches subdomains
    ports: tuple[int, int] = (0, 65535)

    @classmethod
    def parse(cls, text: str) -> AllowRule:
        """@raise ValueError: with a one-line reason."""
        spec = text.strip()
        ports = (0, 65535)
        if spec.startswith("["):  # [v6 or v6/len]:port
            end = spec.find("]")
            if end < 0:
                raise ValueError(f"{text!r}: missing ']'")
            target, rest = spec[1:end], spec[end + 1 :]
            if rest:
                if not rest.startswith(":"):
                    raise ValueError(f"{text!r}: expected ':port' after ']'")
                ports = _port_range(text, rest[1:])
        elif spec.count(":") == 1:
            target, port_text = spec.split(":")
            ports = _port_range(text, port_text)
        else:
            target = spec
        if not target:
            raise ValueError(f"{text!r}: no address or host name")
        try:
            return cls(network=ipaddress.ip_network(target, strict=False), ports=ports)
        except ValueError:
            pass
        host = target.lower().rstrip(".")
        label = host.removeprefix(".")
        if not label or not re.fullmatch(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*", label):
            raise ValueError(f"{text!r}: not a CIDR or a host name")
        return cls(host=host, ports=ports)

    def covers_port(self, port: int) -> bool:
        return self.ports[0] <= port <= self.ports[1]

    def covers_name(self, name: str, port: int) -> bool:
        if self.host is None or not self.covers_port(port):
            return False
        name = name.lower().rstrip(".")
        if self.host.startswith("."):
            return name.endswith(self.host) or name == self.host[1:]
        return name == self.host

    def covers_address(self, address: IPAddress, port: int) -> bool:
        if self.network is None or not self.covers_port(port):
            return False
        if address.version != self.network.version:
            inner = embedded_ipv4(address)
            return inner is not None and inner in self.network
        return address in self.network


def _port_range(text: str, spec: str) -> tuple[int, int]:
    m = _PORTS.fullmatch(spec)
    if m is None:
        raise ValueError(f"{text!r}: a port is a number or first-last")
    first = int(m.group(1))
    last = int(m.group(2)) if m.group(2) else first
    if not 0 < first <= last <= 65535:
        raise ValueError(f"{text!r}: ports must be 1-65535, first <= last")
    return first, last


@attrs.frozen
class DestinationRules:
    """The default refusals, widened by the C{--socks-allow} rules."""

    allow: Sequence[AllowRule] = ()

    def permits(self, name: str | None, addresses: Iterable[IPAddress], port: int) -> bool:
        """
        Whether a connection to C{port} on every one of C{addresses} (what
        C{name}, if the client gave one, resolved to) is allowed. A single
        refused address refuses the request: the client cannot pick.
        """
        addresses = list(addresses)
        if not addresses:
            return False
        if name is not None and any(r.covers_name(name, port) for r in self.allow):
            return all(
                not _sensitive(a) or any(r.covers_address(a, port) for r in self.allow)
                for a in addresses
            )
        return all(self._permits_address(a, port) for a in addresses)

    def allows_local(self, address: IPAddress, port: int) -> bool:
        """An address of the gateway's own host is reached only when a rule names it."""
        return any(r.covers_address(address, port) for r in self.allow)

    def _permits_address(self, address: IPAddress, port: int) -> bool:
        if any(r.covers_address(address, port) for r in self.allow):
            return True
        return port not in REFUSED_PORTS and is_public(address)
