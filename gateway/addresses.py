# -*- test-case-name: tests.test_addresses,tests.test_web_hosts -*-
"""
Addresses, in one place: IP addresses as peers are counted (canonical text,
the keys of per-peer and per-network limits, network membership), and host
names as clients write them (the one strict host canonicaliser and URL
authority parser the HTTP front door uses).
"""

from __future__ import annotations

import functools
import ipaddress
import re
import unicodedata
from collections.abc import Sequence

import idna

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=4096)  # peers repeat; parsing is most of a cheap login's cost
def parse_ip(host: str | None) -> IPAddress | None:
    """
    The IP address C{host} spells, IPv4-mapped IPv6 folded to IPv4 and the
    scope dropped; None when it is not one. Every helper below parses here.
    """
    if not host:
        return None
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@functools.lru_cache(maxsize=4096)
def normalize_ip(host: str | None) -> str | None:
    """
    The canonical text of an IP address (IPv4-mapped IPv6 folded to IPv4,
    scope dropped), or C{host} unchanged when it is not an IP address.
    """
    ip = parse_ip(host)
    return host if ip is None else str(ip)


@functools.lru_cache(maxsize=4096)
def ip_or_none(host: str | None) -> str | None:
    """The canonical text of C{host} if it is an IP address, else None."""
    ip = parse_ip(host)
    return None if ip is None else str(ip)


@functools.lru_cache(maxsize=4096)
def network_of(address: str | None, ipv4: int = 24, ipv6: int = 48) -> str | None:
    """
    The network an address counts under when a few neighbours must not be
    taken for many peers (connection caps, hash queue and login shares): its
    IPv4 C{/ipv4} or IPv6 C{/ipv6} (IPv4-mapped folded, scope dropped); None
    for no IP address.
    """
    ip = parse_ip(address)
    if ip is None:
        return None
    length = ipv4 if ip.version == 4 else ipv6
    return str(ipaddress.ip_network((ip, length), strict=False))


def is_loopback(host: str | None) -> bool:
    """Whether C{host} is a loopback address (any spelling, IPv4-mapped included)."""
    ip = parse_ip(host)
    return ip is not None and ip.is_loopback


def is_unspecified(host: str | None) -> bool:
    """Whether C{host} is the unspecified address (C{0.0.0.0}, C{::}), any spelling."""
    ip = parse_ip(host)
    return ip is not None and ip.is_unspecified


def in_networks(address: str | None, networks: Sequence[IPNetwork]) -> bool:
    """Whether C{address} (any spelling, IPv4-mapped included) is in one of C{networks}."""
    ip = parse_ip(address) if networks else None
    return ip is not None and any(ip in network for network in networks)


@functools.lru_cache(maxsize=4096)
def peer_key(address: str | None) -> str | None:
    """
    The throttling key of a peer address: the address itself for IPv4 (also
    when IPv4-mapped, as on a dual-stack listener), its /64 for IPv6 (one
    host usually owns a whole /64; the scope is dropped); a peer that is not
    an IP address (a UNIX socket's name) is itself.
    """
    if not address:
        return None
    ip = parse_ip(address)
    if ip is None:
        return address
    if ip.version == 6:
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@functools.lru_cache(maxsize=4096)
def network_keys(address: str | None) -> tuple[str, str]:
    """
    The keys of a peer's shares: its own (L{peer_key}: the IPv4 address, the
    IPv6 /64) and its network's (the IPv4 /24, the IPv6 /48). A peer without
    an address (a UNIX socket) is one peer, "?".
    """
    own = peer_key(address) or "?"
    return own, network_of(address) or own


#: One DNS label in A-label form: letters, digits and inner hyphens, 1-63 octets.
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
#: A label a URL parser reads as a number (WHATWG "ends in a number"): decimal, hex, octal.
_NUMERIC = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)")
#: An IPv4 address in the one spelling every parser reads alike.
_DOTTED_QUAD = re.compile(r"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}")
_PORT = re.compile(r"[0-9]{1,5}")


class BadHost(ValueError):
    """A host that is neither a DNS host name nor an IP literal."""


def _has_ascii_letter(text: str) -> bool:
    return any("a" <= c <= "z" or "A" <= c <= "Z" for c in text)


@functools.lru_cache(maxsize=4096)
def folds_to_ascii(char: str) -> bool:
    """
    Whether a non-ASCII character becomes an ASCII letter under some case
    mapping (C{upper()}, C{lower()}, C{casefold()}): the dotless and dotted
    Turkish I (U+0131, U+0130), the long s, the Kelvin sign, ligatures such
    as U+FB00, and U+00DF (C{SS}). Java's C{equalsIgnoreCase}, .NET's
    OrdinalIgnoreCase and Go's C{EqualFold} match C{admın} with C{ADMIN}
    while a comparison in lower case does not, so names holding one cannot
    be matched the way such a server would.
    """
    if char.isascii():
        return False
    return any(_has_ascii_letter(f(char)) for f in (str.upper, str.lower, str.casefold))


@functools.lru_cache(maxsize=4096)
def compatible_with_ascii(char: str) -> bool:
    """
    Whether a non-ASCII character's compatibility form (NFKC) holds an ASCII
    character: fullwidth letters, U+FF0F (a fullwidth C{/}), U+2024 (a dot
    leader), superscript digits, ligatures. Servers that normalise (NFKC, or
    Windows' "best fit" conversion to a code page) read them as ASCII.
    """
    if char.isascii():
        return False
    return any(c.isascii() for c in unicodedata.normalize("NFKC", char))


def parse_host(host: str | bytes) -> str:
    """
    The canonical form of a host (no port): a DNS host name as lower-case
    A-labels (IDNA) without a final dot, an IPv4 address as a dotted quad,
    an IPv6 address compressed and in brackets.

    Only spellings every URL parser reads alike are accepted: C{127.1},
    C{0x7f.0.0.1}, C{0177.0.0.1}, a bare or zoned IPv6 address, a
    percent-encoded or empty label, C{_} or any byte outside printable ASCII
    in an ASCII name are refused, so the name the ACL sees is the name the
    client reaches.

    @raise BadHost: why not (the host itself is not echoed).
    """
    if isinstance(host, bytes):
        try:
            host = host.decode("utf-8")
        except UnicodeDecodeError:
            raise BadHost("a host that is not UTF-8") from None
    if not host or len(host) > 253 + 1:
        raise BadHost("an empty or overlong host")
    if host.startswith("["):
        return _parse_ipv6_literal(host)
    if host.isascii():
        name = host.lower()
    else:
        if any(not c.isprintable() or c.isspace() for c in host):
            raise BadHost("a control or blank character in the host")
        try:
            name = idna.encode(host, uts46=True, transitional=False).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError):
            raise BadHost("a host name that is not valid IDNA") from None
    if name.endswith("."):
        name = name[:-1]
    labels = name.split(".")
    if _NUMERIC.fullmatch(labels[-1]):  # a URL parser reads it as an IPv4 address
        if not _DOTTED_QUAD.fullmatch(name) or any(int(p) > 255 for p in labels):
            raise BadHost("an IPv4 address not written as a dotted quad")
        return name
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise BadHost("not a DNS host name (letters, digits, inner hyphens; 1-63 per label)")
    for label in labels:
        if label.startswith("xn--") or label[2:4] == "--":
            try:
                unicode = idna.decode(label)  # a valid A-label, not any "xn--" string
            except (idna.IDNAError, UnicodeError, ValueError):
                raise BadHost("a host name label that is not valid IDNA") from None
            if any(folds_to_ascii(c) for c in unicode):
                # xn--admn-nza.test is "admın.test": a case-insensitive
                # comparison, or transitional IDNA (straße -> strasse),
                # reads another host than the ACL.
                raise BadHost("a host name with a letter that another case mapping reads as ASCII")
    return name


def _parse_ipv6_literal(host: str) -> str:
    if not host.endswith("]") or host.count("[") != 1 or host.count("]") != 1:
        raise BadHost("an unclosed IPv6 literal")
    inner = host[1:-1]
    if not inner or not all(c in "0123456789abcdefABCDEF:." for c in inner):
        raise BadHost("an IPv6 literal with a zone, or not an address")
    try:
        ip = ipaddress.IPv6Address(inner)
    except ValueError:
        raise BadHost("an IPv6 literal that is not an address") from None
    return f"[{ip.compressed}]"


def canonical_host(host: str | bytes | None) -> str | None:
    """L{parse_host}, or None for an unusable host."""
    if host is None:
        return None
    try:
        return parse_host(host)
    except BadHost:
        return None


def split_authority(authority: str | bytes) -> tuple[str, int | None]:
    """
    The canonical host and the port of C{host[:port]} (a Host header value or
    a URL's authority without userinfo).

    @raise BadHost: a bad host, or a port that is empty, not digits, above
        65535, or follows several colons.
    """
    if isinstance(authority, bytes):
        if not all(0x21 <= b < 0x7F for b in authority):
            raise BadHost("a byte outside printable ASCII in the authority")
        authority = authority.decode("ascii")
    elif not authority.isascii() or not authority.isprintable() or " " in authority:
        raise BadHost("a character outside printable ASCII in the authority")
    if "%" in authority or "@" in authority or "\\" in authority:
        raise BadHost("percent-encoding, userinfo or a backslash in the authority")
    if authority.startswith("["):
        end = authority.find("]")
        host, rest = authority[: end + 1], authority[end + 1 :]
        if end < 0 or (rest and not rest.startswith(":")):
            raise BadHost("an IPv6 literal followed by something other than a port")
    else:
        host, colon, port_text = authority.partition(":")
        rest = colon + port_text
    port = None
    if rest:
        digits = rest[1:]
        if not _PORT.fullmatch(digits) or int(digits) > 65535:
            raise BadHost("a port that is empty, not a number, or above 65535")
        port = int(digits)
    return parse_host(host), port
