"""
The PROXY protocol behind a real HAProxy: the gateway's three front doors
(the services C{makeService} builds, on the real reactor) with
C{--proxy-protocol-from 127.0.0.1/32}, HAProxy (started here on loopback,
C{mode tcp}) forwarding to each with C{send-proxy} and C{send-proxy-v2},
and clients we did not write bound to 127.0.0.2 and 127.0.0.3: C{smtplib}
(the spool's C{Received:} and metadata), C{curl} (C{/whoami}'s
C{peer_address}) and PySocks (an ACL C{Machine} rule on the client
address). A client sending a PROXY header of its own straight to a front
door is refused.
"""

from __future__ import annotations

import json
import os
import smtplib
import socket
import ssl
import subprocess
import time

from twisted.internet import defer, protocol, reactor, task, threads
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols import wire
from twisted.trial.unittest import TestCase

from gateway import tap
from tests.support import free_port, keep_signal_handlers, require_module, require_tool

ACL = """
[[acl."socks/destination"]]
allow = true
privileges = ["connect"]
identity.Machine = "127.0.0.2"

[[acl."http"]]
allow = true
privileges = ["*"]
identity.Authenticated = {}
"""

SPOOF = b"PROXY TCP4 203.0.113.9 127.0.0.1 4242 25\r\n"


def wait_listening(port: int, timeout: float = 15) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def haproxy_config(routes: dict[str, tuple[int, int, str]]) -> str:
    """A C{mode tcp} HAProxy: for each name, frontend port -> gateway port with C{send-proxy...}."""
    text = ["defaults", "    mode tcp", "    timeout connect 5s",
            "    timeout client 30s", "    timeout server 30s", ""]
    for name, (front, back, option) in routes.items():
        text += [f"frontend {name}", f"    bind 127.0.0.1:{front}",
                 f"    default_backend {name}", f"backend {name}",
                 f"    server gw 127.0.0.1:{back} {option}", ""]
    return "\n".join(text)


class BehindHAProxyTests(TestCase):
    timeout = 120

    def setUp(self):
        self.haproxy_path = require_tool("haproxy", "haproxy")
        require_tool("curl", "curl")
        self.socks = require_module("socks", "PySocks")
        echo = reactor.listenTCP(0, protocol.Factory.forProtocol(wire.Echo),
                                 interface="127.0.0.1")
        self.addCleanup(echo.stopListening)
        self.echo_port = echo.getHost().port
        self.ports = {door: free_port() for door in ("smtp", "http", "https", "socks")}
        data = os.path.abspath(self.mktemp())
        os.makedirs(data)
        acl = os.path.join(data, "acl.toml")
        with open(acl, "w") as f:
            f.write(ACL)
        options = tap.Options()
        options.parseOptions([
            "--data-dir", data, "--auth", "memory:daniel:tiger", "--acl", acl,
            "--smtp", f"tcp:{self.ports['smtp']}:interface=127.0.0.1",
            "--http", f"tcp:{self.ports['http']}:interface=127.0.0.1",
            "--https", f"tcp:{self.ports['https']}:interface=127.0.0.1",
            "--socks", f"tcp:{self.ports['socks']}:interface=127.0.0.1",
            "--smtp-hostname", "gw.example",
            "--socks-allow", f"127.0.0.1:{self.echo_port}",
            # The relay may reach the gateway's own SMTP listener, from 127.0.0.1: a
            # network of --proxy-protocol-from (test_socks_relay_is_no_proxy).
            "--socks-allow", f"127.0.0.1:{self.ports['smtp']}",
            "--smtp-trusted-network", "10.9.0.0/16",
            "--proxy-protocol-from", "127.0.0.1/32",
            "--failure-delay", "0", "--failure-delay-max", "0",
        ])
        keep_signal_handlers(self)
        self.service = tap.makeService(options, reactor=reactor)
        self.core = self.service.core
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.fronts = {}
        routes = {}
        for door, back in self.ports.items():
            for version, option in (("v1", "send-proxy"), ("v2", "send-proxy-v2")):
                front = self.fronts[door, version] = free_port()
                routes[f"{door}_{version}"] = (front, back, option)
        config = os.path.join(data, "haproxy.cfg")
        with open(config, "w") as f:
            f.write(haproxy_config(routes))
        self.haproxy = subprocess.Popen(
            [self.haproxy_path, "-db", "-f", config],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        self.addCleanup(self.stop_haproxy)
        return threads.deferToThread(
            lambda: [wait_listening(port) for port in self.fronts.values()]
        )

    @defer.inlineCallbacks
    def stop_haproxy(self):
        self.haproxy.terminate()
        yield threads.deferToThread(self.haproxy.wait, 10)
        self.haproxy.stderr.close()
        end = time.monotonic() + 10
        while any(self.core.connections.sessions.values()) and time.monotonic() < end:
            yield task.deferLater(reactor, 0.02, lambda: None)

    def spooled(self) -> list[tuple[bytes, dict]]:
        spool = self.core.spool
        found = []
        for id in spool.ids():
            message, meta = spool.load(id)
            found.append((message, meta if isinstance(meta, dict) else json.loads(meta)))
        return found

    @defer.inlineCallbacks
    def test_smtp(self):
        """
        The spool's Received: header and metadata name the client HAProxy saw,
        also after STARTTLS (the same transport, its peer kept).
        """
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        for version in ("v1", "v2"):
            port = self.fronts["smtp", version]

            def submit():
                with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example",
                                  source_address=("127.0.0.2", 0), timeout=20) as smtp:
                    smtp.starttls(context=context)
                    smtp.login("daniel", "tiger")
                    smtp.sendmail("daniel@example.com", ["rcpt@example.org"],
                                  f"Subject: {version}\r\n\r\nhello\r\n")

            yield threads.deferToThread(submit)
        spooled = self.spooled()
        self.assertEqual(len(spooled), 2)
        for message, meta in spooled:
            received = message.split(b"\r\n", 1)[0].decode()
            self.assertTrue(received.startswith("Received: from client.example"), received)
            self.assertIn("[127.0.0.2]", received)
            self.assertNotIn("127.0.0.1", received)
            self.assertEqual(meta["peer"]["address"], "127.0.0.2")
            self.assertEqual(meta["auth_info"]["peer_address"], "127.0.0.2")
            self.assertIsNotNone(meta["tls"])

    @defer.inlineCallbacks
    def test_http_whoami(self):
        """/whoami's peer_address is the client, also on --https (the header before TLS)."""
        for door, version in (("http", "v1"), ("http", "v2"), ("https", "v1"), ("https", "v2")):
            url = f"{door}://127.0.0.1:{self.fronts[door, version]}/whoami"
            result = yield threads.deferToThread(
                subprocess.run,
                ["curl", "-q", "--silent", "--show-error", "--max-time", "20", "--insecure",
                 "--interface", "127.0.0.2", "-u", "daniel:tiger", url],
                capture_output=True, timeout=60, check=False,
                env={k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")},
            )
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertEqual(json.loads(result.stdout)["peer_address"], "127.0.0.2")

    @defer.inlineCallbacks
    def test_socks_machine_rule(self):
        """The ACL's Machine rule sees the client: 127.0.0.2 may connect, 127.0.0.3 may not."""
        socks = self.socks

        def tunnel(port, source):
            sock = socks.create_connection(
                ("127.0.0.1", self.echo_port), timeout=20, source_address=(source, 0),
                proxy_type=socks.SOCKS5, proxy_addr="127.0.0.1", proxy_port=port,
                proxy_rdns=False, proxy_username="daniel", proxy_password="tiger",
            )
            with sock:
                sock.sendall(b"ping")
                return sock.recv(4)

        for version in ("v1", "v2"):
            port = self.fronts["socks", version]
            echoed = yield threads.deferToThread(tunnel, port, "127.0.0.2")
            self.assertEqual(echoed, b"ping")
            with self.assertRaises(socks.ProxyError) as e:
                yield threads.deferToThread(tunnel, port, "127.0.0.3")
            self.assertIn("not allowed by ruleset", str(e.exception))

    @defer.inlineCallbacks
    def test_spoofed_header_refused(self):
        """A client's own header, straight to any listener (TLS too): closed, nothing served."""

        def spoof(port):
            with socket.create_connection(("127.0.0.1", port), timeout=20,
                                          source_address=("127.0.0.2", 0)) as sock:
                greeting = sock.recv(1024) if port == self.ports["smtp"] else b""
                sock.sendall(SPOOF + b"EHLO x\r\n")
                rest = b""
                try:
                    while chunk := sock.recv(1024):
                        rest += chunk
                except ConnectionResetError:  # aborted: a reset, not a FIN
                    pass
                return greeting, rest

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for door, port in self.ports.items():
            greeting, rest = yield threads.deferToThread(spoof, port)
            if door == "smtp":
                self.assertTrue(greeting.startswith(b"220 "), greeting)
            self.assertEqual(rest, b"", door)
        self.assertEqual(self.spooled(), [])
        lines = sorted(formatEvent(e) for e in events
                       if e.get("log_namespace") == "gateway.proxyproto")
        self.assertEqual(lines, [
            f"{door}: refusing a PROXY header from 127.0.0.2, not a proxy of --proxy-protocol-from"
            for door in ("http", "https", "smtp", "socks")
        ])

    @defer.inlineCallbacks
    def test_socks_relay_is_no_proxy(self):
        """
        A SOCKS tunnel to the gateway's own SMTP listener comes from 127.0.0.1,
        a proxy network here, but it is the gateway's relay: served as any
        peer (the greeting at once), and a header through it naming a trusted
        network is refused, nothing submitted without AUTH.
        """
        socks = self.socks

        def through_socks():
            sock = socks.create_connection(
                ("127.0.0.1", self.ports["smtp"]), timeout=20, source_address=("127.0.0.2", 0),
                proxy_type=socks.SOCKS5, proxy_addr="127.0.0.1", proxy_port=self.ports["socks"],
                proxy_rdns=False, proxy_username="daniel", proxy_password="tiger",
            )
            with sock:
                sock.settimeout(2)  # before the fix: no greeting until a header
                greeting = sock.recv(1024)
                sock.settimeout(20)
                sock.sendall(
                    b"PROXY TCP4 10.9.1.1 127.0.0.1 1 25\r\nEHLO x\r\n"
                    b"MAIL FROM:<ceo@example.com>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
                    b"Subject: forged\r\n\r\nhi\r\n.\r\nQUIT\r\n"
                )
                rest = b""
                try:
                    while chunk := sock.recv(1024):
                        rest += chunk
                except OSError:
                    pass
                return greeting, rest

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        greeting, rest = yield threads.deferToThread(through_socks)
        self.assertTrue(greeting.startswith(b"220 "), greeting)
        self.assertEqual(rest, b"")
        self.assertEqual(self.spooled(), [])
        lines = [formatEvent(e) for e in events if e.get("log_namespace") == "gateway.proxyproto"]
        self.assertEqual(lines, ["smtp: refusing a PROXY header from 127.0.0.1, not a proxy of"
                                 " --proxy-protocol-from"])
