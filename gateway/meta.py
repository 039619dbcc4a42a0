# -*- test-case-name: tests.test_credentials -*-
"""
Connection metadata: what KumoMTA calls C{conn_meta} and Halon exposes as
C{$senderip}, C{$serverport}, C{$tlsstarted}, C{$senderhelo} and C{$context}.

One L{ConnectionMeta} exists per connection; every credential built on that
connection carries it, so checkers see the peer, the listener and the TLS state,
and may keep per-session data in L{ConnectionMeta.state}.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress, ISSLTransport, ITransport

from gateway.addresses import normalize_ip


def _split_address(address: IAddress | None) -> tuple[str | None, int | None]:
    if isinstance(address, (IPv4Address, IPv6Address)):
        return address.host, address.port
    if isinstance(address, UNIXAddress):
        name = address.name
        return (name.decode("utf-8", "replace") if isinstance(name, bytes) else name), None
    return None, None


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
