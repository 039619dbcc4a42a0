# -*- test-case-name: tests.test_socks_rules -*-
"""
Where a SOCKS client may connect to.

By default an authenticated user reaches globally reachable unicast
addresses only. Refused: every entry of the IANA IPv4 and IPv6
Special-Purpose Address Registries (L{SPECIAL}, each with its RFC), IPv4
and IPv6 multicast, the deprecated IPv4-compatible, SIIT and site-local
IPv6 forms, all IPv6 outside 2000::/3 (not allocated for global unicast),
the known cloud metadata addresses, the IPv4 inside IPv4-mapped, NAT64
(64:ff9b::/96) and 6to4 addresses when that IPv4 is refused, and port 25
(an open relay for spam). Addresses of the gateway's own host (its
listeners, whatever its interfaces) are refused by the server once
connected, when it sees that it reached itself, unless a rule names them.

C{--socks-allow RULE} widens this for everyone: a CIDR or a host name, each
with an optional C{:port} or C{:first-last} (IPv6 CIDRs in brackets:
C{[2001:db8::/32]:443}). A CIDR rule opens exactly what it names, special
addresses included. A host-name rule matches the name the client asked for
(exactly, or every subdomain with a leading dot: C{.example.com}) and then
allows what it resolves to, except the I{sensitive} addresses: loopback,
link-local, unspecified, multicast, broadcast and reserved, cloud metadata,
and any IPv6 address that embeds one of those (mapped, SIIT-translated,
IPv4-compatible, NAT64, 6to4, Teredo server or client, ISATAP): a DNS
record must not open those, only a CIDR rule can. The networks are written
out here rather than taken from C{ipaddress}' C{is_private} / C{is_global},
which were wrong before Python 3.12.4 (CVE-2024-4032) and know no metadata
addresses.

BIND (KumoMTA's egress source) may pick a privileged source port (1-1023)
only with an ACL rule whose key names that port (L{source_port_named}).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from gateway.acl import written_grant

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@attrs.frozen
class Special:
    """
    One special-purpose block: refused by default; when C{sensitive}, a
    host-name rule cannot open it either (only a CIDR rule can).

    @ivar reachable: IANA's "Globally Reachable" column (None: N/A or not
        in the registry). Informative only: even the globally reachable
        anycast services are not destinations a proxy user needs.
    """

    network: IPNetwork = attrs.field(converter=ipaddress.ip_network)
    name: str
    source: str
    sensitive: bool = False
    reachable: bool | None = False


#: The IANA IPv4 Special-Purpose Address Registry (2025), then multicast and
#: the cloud metadata addresses outside those blocks.
SPECIAL_V4: tuple[Special, ...] = (
    Special("0.0.0.0/8", '"This network"', "RFC 791", sensitive=True),
    Special("0.0.0.0/32", '"This host on this network"', "RFC 1122", sensitive=True),
    Special("10.0.0.0/8", "Private-Use", "RFC 1918"),
    Special("100.64.0.0/10", "Shared Address Space", "RFC 6598"),
    Special("127.0.0.0/8", "Loopback", "RFC 1122", sensitive=True),
    Special("169.254.0.0/16", "Link Local (cloud metadata 169.254.169.254)", "RFC 3927",
            sensitive=True),
    Special("172.16.0.0/12", "Private-Use", "RFC 1918"),
    Special("192.0.0.0/24", "IETF Protocol Assignments", "RFC 6890"),
    Special("192.0.0.0/29", "IPv4 Service Continuity Prefix", "RFC 7335"),
    Special("192.0.0.8/32", "IPv4 dummy address", "RFC 7600"),
    Special("192.0.0.9/32", "Port Control Protocol Anycast", "RFC 7723", reachable=True),
    Special("192.0.0.10/32", "Traversal Using Relays around NAT Anycast", "RFC 8155",
            reachable=True),
    Special("192.0.0.170/32", "NAT64/DNS64 Discovery", "RFC 8880, RFC 7050"),
    Special("192.0.0.171/32", "NAT64/DNS64 Discovery", "RFC 8880, RFC 7050"),
    Special("192.0.2.0/24", "Documentation (TEST-NET-1)", "RFC 5737"),
    Special("192.31.196.0/24", "AS112-v4", "RFC 7535", reachable=True),
    Special("192.52.193.0/24", "AMT", "RFC 7450", reachable=True),
    Special("192.88.99.0/24", "Deprecated (6to4 Relay Anycast)", "RFC 7526", reachable=None),
    Special("192.88.99.2/32", "6a44-relay anycast address", "RFC 6751"),
    Special("192.168.0.0/16", "Private-Use", "RFC 1918"),
    Special("192.175.48.0/24", "Direct Delegation AS112 Service", "RFC 7534", reachable=True),
    Special("198.18.0.0/15", "Benchmarking", "RFC 2544"),
    Special("198.51.100.0/24", "Documentation (TEST-NET-2)", "RFC 5737"),
    Special("203.0.113.0/24", "Documentation (TEST-NET-3)", "RFC 5737"),
    Special("240.0.0.0/4", "Reserved", "RFC 1112 section 4", sensitive=True),
    Special("255.255.255.255/32", "Limited Broadcast", "RFC 8190, RFC 919 section 7",
            sensitive=True),
    # Not in the special-purpose registry:
    Special("224.0.0.0/4", "Multicast", "RFC 5771", sensitive=True, reachable=None),
    Special("100.100.100.200/32", "Alibaba Cloud metadata", "Alibaba Cloud ECS", sensitive=True,
            reachable=None),
    Special("168.63.129.16/32", "Azure WireServer (metadata, health, DNS)", "Microsoft Azure",
            sensitive=True, reachable=None),
    Special("192.0.0.192/32", "Oracle Cloud metadata", "Oracle Cloud Infrastructure",
            sensitive=True, reachable=None),
)

#: The IANA IPv6 Special-Purpose Address Registry (2025), then multicast,
#: the deprecated forms and the cloud metadata addresses.
SPECIAL_V6: tuple[Special, ...] = (
    Special("::1/128", "Loopback Address", "RFC 4291", sensitive=True),
    Special("::/128", "Unspecified Address", "RFC 4291", sensitive=True),
    Special("::ffff:0:0/96", "IPv4-mapped Address", "RFC 4291"),
    Special("64:ff9b::/96", "IPv4-IPv6 Translat. (the embedded IPv4 decides)", "RFC 6052",
            reachable=True),
    Special("64:ff9b:1::/48", "IPv4-IPv6 Translat. (local-use NAT64)", "RFC 8215",
            sensitive=True),
    Special("100::/64", "Discard-Only Address Block", "RFC 6666"),
    Special("100:0:0:1::/64", "Dummy IPv6 Prefix", "RFC 9780"),
    Special("2001::/23", "IETF Protocol Assignments", "RFC 2928"),
    Special("2001::/32", "TEREDO", "RFC 4380, RFC 8190", reachable=None),
    Special("2001:1::1/128", "Port Control Protocol Anycast", "RFC 7723", reachable=True),
    Special("2001:1::2/128", "Traversal Using Relays around NAT Anycast", "RFC 8155",
            reachable=True),
    Special("2001:1::3/128", "DNS-SD Service Registration Protocol Anycast", "RFC 9665",
            reachable=True),
    Special("2001:2::/48", "Benchmarking", "RFC 5180, RFC Errata 1752"),
    Special("2001:3::/32", "AMT", "RFC 7450", reachable=True),
    Special("2001:4:112::/48", "AS112-v6", "RFC 7535", reachable=True),
    Special("2001:10::/28", "Deprecated (previously ORCHID)", "RFC 4843"),
    Special("2001:20::/28", "ORCHIDv2", "RFC 7343", reachable=True),
    Special("2001:30::/28", "Drone Remote ID Protocol Entity Tags (DETs) Prefix", "RFC 9374",
            reachable=True),
    Special("2001:db8::/32", "Documentation", "RFC 3849"),
    Special("2002::/16", "6to4 (the embedded IPv4 decides)", "RFC 3056", reachable=None),
    Special("2620:4f:8000::/48", "Direct Delegation AS112 Service", "RFC 7534", reachable=True),
    Special("3fff::/20", "Documentation", "RFC 9637"),
    Special("5f00::/16", "Segment Routing (SRv6) SIDs", "RFC 9602"),
    Special("fc00::/7", "Unique-Local", "RFC 4193, RFC 8190"),
    Special("fe80::/10", "Link-Local Unicast", "RFC 4291", sensitive=True),
    # Not in the special-purpose registry:
    Special("ff00::/8", "Multicast", "RFC 4291", sensitive=True, reachable=None),
    Special("::/96", "IPv4-compatible (deprecated)", "RFC 4291 section 2.5.5.1", reachable=None),
    Special("::ffff:0:0:0/96", "IPv4-translated (SIIT)", "RFC 2765", reachable=None),
    Special("fec0::/10", "Site-local (deprecated)", "RFC 3879", reachable=None),
    Special("fd00:ec2::/64", "AWS link-local services (IMDS ::254, NTP ::123, EKS ::23)",
            "Amazon EC2", sensitive=True, reachable=None),
    Special("fd20:ce::254/128", "Google Compute Engine metadata (IPv6-only VMs)",
            "Google Cloud", sensitive=True, reachable=None),
)

#: Every special block, both families.
SPECIAL: tuple[Special, ...] = SPECIAL_V4 + SPECIAL_V6

_V4_REFUSED = tuple(s.network for s in SPECIAL_V4)
_V6_REFUSED = tuple(s.network for s in SPECIAL_V6)
_V4_SENSITIVE = tuple(s.network for s in SPECIAL_V4 if s.sensitive)
_V6_SENSITIVE = tuple(s.network for s in SPECIAL_V6 if s.sensitive)
#: IANA's IPv6 Global Unicast allocation; the rest of the space is reserved.
_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")  # SIIT, RFC 2765
_COMPATIBLE = ipaddress.IPv6Network("::/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_6TO4 = ipaddress.IPv6Network("2002::/16")
_TEREDO = ipaddress.IPv6Network("2001::/32")
#: ISATAP interface identifiers (RFC 5214): 0000:5efe or 0200:5efe, then the IPv4.
_ISATAP_IIDS = frozenset({0x00005EFE, 0x02005EFE})
#: Where the same IPv4 destination is reached, so the IPv4 decides by default.
_TRANSLATORS = (_MAPPED, _NAT64, _6TO4)

#: Ports refused by default (SMTP: an open proxy relays spam).
REFUSED_PORTS = frozenset({25})


def _v4(value: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(value & 0xFFFFFFFF)


def embedded_ipv4s(address: IPAddress) -> tuple[ipaddress.IPv4Address, ...]:
    """
    Every IPv4 address an IPv6 address carries, the one packets go to first:
    IPv4-mapped, SIIT-translated, IPv4-compatible, NAT64 (64:ff9b::/96),
    6to4, Teredo (client, then server) and ISATAP. Local-use NAT64
    (64:ff9b:1::/48) may put the IPv4 at several offsets (RFC 6052), so that
    whole block is sensitive instead.
    """
    if isinstance(address, ipaddress.IPv4Address):
        return ()
    value = int(address)
    if address in _MAPPED or address in _TRANSLATED or address in _COMPATIBLE or address in _NAT64:
        return (_v4(value),)
    if address in _6TO4:
        return (_v4(value >> 80),)
    if address in _TEREDO:  # the client's IPv4 is stored inverted ("obfuscated")
        return (_v4(~value), _v4(value >> 64))
    if ((value >> 32) & 0xFFFFFFFF) in _ISATAP_IIDS:
        return (_v4(value),)
    return ()


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address sends to (see L{embedded_ipv4s}), if any."""
    found = embedded_ipv4s(address)
    return found[0] if found else None


def is_sensitive(address: IPAddress) -> bool:
    """
    Loopback, link-local, unspecified, multicast, reserved or metadata, in
    any IPv6 disguise: what no DNS answer may open.
    """
    if isinstance(address, ipaddress.IPv4Address):
        return any(address in n for n in _V4_SENSITIVE)
    if any(address in n for n in _V6_SENSITIVE):
        return True
    return any(is_sensitive(inner) for inner in embedded_ipv4s(address))


def is_public(address: IPAddress) -> bool:
    """False for every block in L{SPECIAL} and everything sensitive; see the module docstring."""
    if is_sensitive(address):
        return False
    if isinstance(address, ipaddress.IPv4Address):
        return not any(address in n for n in _V4_REFUSED)
    if any(address in n for n in _TRANSLATORS):
        inner = embedded_ipv4(address)
        return inner is not None and is_public(inner)
    return address in _GLOBAL_UNICAST and not any(address in n for n in _V6_REFUSED)


_PORTS = re.compile(r"(\d{1,5})(?:-(\d{1,5}))?")
#: What C{inet_aton(3)} may read as an IPv4 address: digits, hex, dots.
_LIBC_IPV4 = re.compile(r"[0-9a-fA-FxX.]{1,64}")


def libc_ipv4(text: str) -> ipaddress.IPv4Address | None:
    """
    The IPv4 address C{getaddrinfo} reads C{text} as without asking DNS
    (C{127.1}, C{2130706433}, C{0x7f.1}, octal C{0177.0.0.1}, C{0}), read
    by libc's own C{inet_aton}, or None: such a "name" must be checked and
    used as that address.
    """
    if not _LIBC_IPV4.fullmatch(text):
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(text))
    except (OSError, ValueError):
        return None


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
        if libc_ipv4(label) is not None:  # 127.1, 2130706433, 0x7f.1: never a name
            raise ValueError(f"{text!r}: libc reads this as an IPv4 address; write a dotted quad")
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
            # Only the mapped form is the same destination: a CIDR rule for
            # an IPv4 network does not open its 6to4, NAT64 or Teredo forms.
            inner = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
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
                not is_sensitive(a) or any(r.covers_address(a, port) for r in self.allow)
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


#: Source ports a BIND may pick only with a grant naming the port (0 is "any").
PRIVILEGED_PORTS = range(1, 1024)


def source_port_named(
    acl: Any, auth_info: Any, address: str, port: int, meta: Any = None
) -> bool:
    """
    Whether the ACL grants C{bind} on C{socks/source/ADDRESS/PORT} through a
    rule written for that port (L{written_grant}: its key names PORT, with
    C{*} allowed in place of the address, and the rule names C{bind}). A
    parent grant (C{socks/source/ADDRESS}, C{socks}), a C{*} port or a
    C{"*"} privilege does not count: privileged ports are never opened by a
    grant written for addresses.
    """
    return written_grant(acl, auth_info, f"socks/source/{address}/{port}", "bind",
                         literal_last=True, meta=meta)
