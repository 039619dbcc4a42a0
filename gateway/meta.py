# -*- test-case-name: tests.test_credentials -*-
"""
Connection metadata: what KumoMTA calls C{conn_meta} and Halon exposes as
C{$senderip}, C{$serverport}, C{$tlsstarted}, C{$senderhelo} and C{$context}.

One L{ConnectionMeta} exists per connection; every credential built on that
connection carries it, so checkers see the peer, the listener and the TLS state,
and may keep per-session data in L{ConnectionMeta.state}.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress, ISSLTransport, ITransport


def _split_address(address: IAddress | None) -> tuple[str | None, int | None]:
    if isinstance(address, (IPv4Address, IPv6Address)):
        return address.host, address.port
    if isinstance(address, UNIXAddress):
        name = address.name
        return (name.decode("utf-8", "replace") if isinstance(name, bytes) else name), None
    return None, None


@functools.lru_cache(maxsize=4096)  # peers repeat; parsing is most of a cheap login's cost
def normalize_ip(host: str | None) -> str | None:
    """
    The canonical text of an IP address (IPv4-mapped IPv6 folded to IPv4,
    scope dropped), or C{host} unchanged when it is not an IP address.
    """
    if host is None:
        return None
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


@functools.lru_cache(maxsize=4096)
def ip_or_none(host: str | None) -> str | None:
    """The canonical text of C{host} if it is an IP address, else None."""
    host = normalize_ip(host)
    try:
        ipaddress.ip_address(host or "")
    except ValueError:
        return None
    return host


def in_networks(
    address: str | None,
    networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> bool:
    """Whether C{address} (any spelling, IPv4-mapped included) is in one of C{networks}."""
    address = ip_or_none(address)
    if address is None or not networks:
        return False
    ip = ipaddress.ip_address(address)
    return any(ip in network for network in networks)


@attrs.define(eq=False)
class ConnectionMeta:
    """
    Facts about one connection, plus a mutable per-session C{state} mapping.

    @ivar protocol: C{"smtp"}, C{"http"}, C{"socks"} or another front door name.
    @ivar listener: the name of the listener that accepted the connection
        (the option that defined it, e.g. C{"smtps"}).
    @ivar peer_address: the client's IP address as text, or None.
    @ivar local_address: the address of our side of the socket, or None.
    @ivar tls: whether the connection is protected by TLS right now.
    @ivar helo: the HELO/EHLO name the SMTP client gave, or None.
    @ivar state: free-form per-connection data that checkers and policy share.
    """

    protocol: str
    listener: str | None = None
    peer_address: str | None = attrs.field(default=None, converter=normalize_ip)
    peer_port: int | None = None
    local_address: str | None = attrs.field(default=None, converter=normalize_ip)
    local_port: int | None = None
    tls: bool = False
    helo: str | None = None
    state: dict[str, Any] = attrs.field(factory=dict, repr=False)

    @classmethod
    def from_transport(
        cls, protocol: str, transport: ITransport, listener: str | None = None
    ) -> ConnectionMeta:
        """Fill in the addresses and TLS state from a connected transport."""
        peer, peer_port = _split_address(transport.getPeer())
        local, local_port = _split_address(transport.getHost())
        return cls(
            protocol=protocol,
            listener=listener,
            peer_address=peer,
            peer_port=peer_port,
            local_address=local,
            local_port=local_port,
            tls=ISSLTransport.providedBy(transport),
        )

    def to_json_dict(self) -> dict[str, Any]:
        """The connection facts (not C{state}) for logs and metadata files."""
        return attrs.asdict(self, filter=lambda a, _: a.name != "state")
