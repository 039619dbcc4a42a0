"""
KumoMTA-style BIND over real loopback sockets (issue 11 item 9): the gateway
started by C{makeService} with an C{--acl} that grants the source address,
a raw client, and an echo server that reports the source port it saw. A
privileged source port is refused with 02 unless a rule names the port; an
unprivileged one is used; the gateway's own listening port is refused by the
kernel.
"""

from __future__ import annotations

import os
import socket
import struct

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, protocol, reactor, threads
from twisted.trial.unittest import TestCase

from gateway import tap
from tests.support import free_port, keep_signal_handlers
from tests.test_socks_integration import (
    GatewayMixin,
    connect_ipv4,
    dial,
    greeting,
    recv_all,
    recv_exact,
    recv_reply,
    userpass,
)

ACL = """
[[acl."socks/destination"]]
allow = true
privileges = ["connect"]
identity.Authenticated = {}

[[acl."socks/source/127.0.0.1"]]
allow = true
privileges = ["bind"]
identity.Authenticated = {}
"""


class PeerPort(protocol.Protocol):
    """Answers with the source port the client connected from, then closes."""

    def connectionMade(self):
        self.transport.write(b"%d" % self.transport.getPeer().port)
        self.transport.loseConnection()


def bind_request(host: str, port: int) -> bytes:
    return b"\x05\x02\x00\x01" + socket.inet_aton(host) + struct.pack("!H", port)


def privileged_port() -> int:
    """A port below 1024 free on 127.0.0.1 (any, when not root: the gateway refuses first)."""
    for port in range(1023, 900, -1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return 1000


class BindTests(GatewayMixin, TestCase):
    def setUp(self):
        self.wrappers = []
        self.peer_port_server, _ = self.serve(protocol.Factory.forProtocol(PeerPort))
        acl = self.mktemp()
        with open(acl, "w") as f:
            f.write(ACL)
        self.socks_port = free_port()
        options = tap.Options()
        options.parseOptions([
            "--data-dir", os.path.abspath(self.mktemp()), "--auth", "memory:daniel:tiger",
            "--socks", f"tcp:{self.socks_port}:interface=127.0.0.1",
            "--smtp", "none", "--http", "none", "--acl", acl,
            "--failure-delay", "0", "--failure-delay-max", "0",
            "--socks-allow", f"127.0.0.1:{self.peer_port_server}",
        ])
        keep_signal_handlers(self)
        self.service = tap.makeService(options, reactor=reactor)
        [door] = [s for s in self.service if isinstance(s, StreamServerEndpointService)]
        self.socks_limit = door.factory.limit  # the per-peer cap around the SOCKS factory
        self.socks_factory = door.factory.wrappedFactory
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.addCleanup(self.quiet)

    def session(self, source_port: int) -> tuple[int, int | None, bytes]:
        """BIND 127.0.0.1:source_port, then CONNECT: (BIND REP, CONNECT REP, answer)."""
        with dial(self.socks_port) as sock:
            sock.sendall(greeting(2) + userpass())
            assert recv_exact(sock, 4) == b"\x05\x02\x01\x00"
            sock.sendall(bind_request("127.0.0.1", source_port))
            bound, _, _ = recv_reply(sock)
            if bound != 0:
                return bound, None, recv_all(sock)
            sock.sendall(connect_ipv4("127.0.0.1", self.peer_port_server))
            connected, _, _ = recv_reply(sock)
            return bound, connected, recv_all(sock)

    @defer.inlineCallbacks
    def test_privileged_source_port_refused(self):
        port = privileged_port()
        result = yield threads.deferToThread(self.session, port)
        self.assertEqual(result, (2, None, b""), port)

    @defer.inlineCallbacks
    def test_unprivileged_source_port_used(self):
        port = free_port()
        result = yield threads.deferToThread(self.session, port)
        self.assertEqual(result, (0, 0, b"%d" % port))

    @defer.inlineCallbacks
    def test_listening_port_refused_by_the_kernel(self):
        result = yield threads.deferToThread(self.session, self.socks_port)
        self.assertEqual(result, (0, 1, b""))
