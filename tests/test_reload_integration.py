"""
Live reload of a real C{twistd -n authgateway}: after a SIGHUP, the real
C{openssl s_client} sees the new certificate on an implicit-TLS listener
(C{--smtps}, C{--https}, ALPN kept) and over STARTTLS, while a TLS session
opened before keeps working with the old one; C{curl} sees an ACL change (forward-auth C{/auth});
a broken ACL keeps the old policy and the log names the file.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess

from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from tests.support import free_port, read_log, require_tool, write_file
from tests.test_delivery_integration import TWISTD, until
from tests.relay_support import make_ca
from tests.test_reload import write_certificate

DENY_DANIEL = '[[acl."http"]]\nallow = true\nprivileges = ["get"]\nidentity.Individual = "alice"\n'
ALLOW_DANIEL = '[[acl."http"]]\nallow = true\nprivileges = ["get"]\nidentity.Individual = "daniel"\n'


def run(*argv: str, stdin: bytes = b"") -> defer.Deferred[subprocess.CompletedProcess]:
    return threads.deferToThread(
        subprocess.run, list(argv), input=stdin, capture_output=True, timeout=30, check=False
    )


class GatewayProcess(TestCase):
    """A real twistd running the gateway on loopback, and what asks it."""

    timeout = 120

    def write_pair(self) -> None:
        """The certificate and key the gateway starts with."""
        self.serial = write_certificate(self.cert, self.key, "before.test")

    def setUp(self) -> None:
        if not os.path.exists(TWISTD):
            self.skipTest(f"no twistd next to {TWISTD}")
        self.openssl = require_tool("openssl", "openssl")
        self.curl = require_tool("curl", "curl")
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.cert = os.path.join(self.dir, "cert.pem")
        self.key = os.path.join(self.dir, "key.pem")
        self.acl = os.path.join(self.dir, "acl.toml")
        self.log = os.path.join(self.dir, "twistd.log")
        self.ports = {name: free_port() for name in ("smtp", "smtps", "http", "https")}
        self.write_pair()
        write_file(self.acl, DENY_DANIEL)
        listeners = []
        for name, port in self.ports.items():
            listeners += [f"--{name}", f"tcp:{port}:interface=127.0.0.1"]
        self.proc = subprocess.Popen(
            [TWISTD, "--pidfile=", "-n", "--logfile", self.log, "authgateway",
             "--data-dir", os.path.join(self.dir, "data"), "--auth", "memory:daniel:tiger",
             "--tls-cert", self.cert, "--tls-key", self.key, "--acl", self.acl,
             "--socks", "none", *listeners],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def reap() -> None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()

        self.addCleanup(reap)
        return until(self.listening, what="twistd to listen")

    def listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"twistd exited {self.proc.returncode}:\n{self.read_log()}")
        if "authgateway started" not in self.read_log():
            return False
        for port in self.ports.values():
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                return False
        return True

    def read_log(self) -> str:
        return read_log(self.log)

    @defer.inlineCallbacks
    def hangup(self):
        """SIGHUP, then the reload's summary line (the last line it logs)."""
        summaries = re.compile(r"reload: (?:ACL|groups|TLS).*")
        count = len(summaries.findall(self.read_log()))
        os.kill(self.proc.pid, signal.SIGHUP)
        yield until(lambda: summaries.findall(self.read_log())[count:], what="the reload's log line")
        return self.read_log()

    @defer.inlineCallbacks
    def certificate_seen(self, name: str, *options: str):
        """The serial and subject C{openssl s_client} reports on listener C{name}; ALPN too."""
        done = yield run(self.openssl, "s_client", "-connect", f"127.0.0.1:{self.ports[name]}",
                         "-servername", "localhost", *options)
        out = done.stdout.decode("ascii", "replace")
        pem = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", out, re.S)
        self.assertIsNotNone(pem, out + done.stderr.decode("ascii", "replace"))
        x509 = yield run(self.openssl, "x509", "-noout", "-serial", "-subject",
                         stdin=pem.group(0).encode())
        fields = dict(
            line.split("=", 1) for line in x509.stdout.decode().splitlines() if "=" in line
        )
        alpn = re.search(r"ALPN protocol: (\S+)", out)
        return int(fields["serial"], 16), fields["subject"].strip(), alpn and alpn.group(1)

    def forward_auth(self) -> defer.Deferred[subprocess.CompletedProcess]:
        """daniel's forward-auth question about his own request (ACL resource http/127.0.0.1/auth)."""
        return run(self.curl, "-s", "-o", "/dev/null", "-w", "%{http_code}", "-u", "daniel:tiger",
                   f"http://127.0.0.1:{self.ports['http']}/auth")

    def open_session(self) -> ssl.SSLSocket:
        """An SMTPS session, greeted, left open across the reload."""
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        raw = socket.create_connection(("127.0.0.1", self.ports["smtps"]), timeout=20)
        session = context.wrap_socket(raw)
        self.addCleanup(session.close)
        self.assertTrue(session.recv(4096).startswith(b"220 "))
        return session


class ReloadTests(GatewayProcess):
    @defer.inlineCallbacks
    def test_certificate_and_acl(self):
        before = (self.serial, "CN = before.test")
        seen = yield self.certificate_seen("smtps")
        self.assertEqual(seen, (*before, None))
        seen = yield self.certificate_seen("https", "-alpn", "h2,http/1.1")
        self.assertEqual(seen, (*before, "http/1.1"))
        seen = yield self.certificate_seen("smtp", "-starttls", "smtp")
        self.assertEqual(seen, (*before, None))
        done = yield self.forward_auth()
        self.assertEqual(done.stdout, b"403")
        session = yield threads.deferToThread(self.open_session)

        serial = write_certificate(self.cert, self.key, "after.test")
        write_file(self.acl, ALLOW_DANIEL)
        log = yield self.hangup()
        self.assertIn(f"reload: ACL changed ({self.acl}), TLS certificate changed ({self.cert}: "
                      f"subject CN=after.test, serial {serial:#x}", log)
        after = (serial, "CN = after.test")
        seen = yield self.certificate_seen("smtps")
        self.assertEqual(seen, (*after, None))
        seen = yield self.certificate_seen("https", "-alpn", "h2,http/1.1")
        self.assertEqual(seen, (*after, "http/1.1"))
        seen = yield self.certificate_seen("smtp", "-starttls", "smtp")
        self.assertEqual(seen, (*after, None))
        done = yield self.forward_auth()
        self.assertEqual(done.stdout, b"200")

        # The session opened before still works, on the certificate it began with.
        def ehlo() -> bytes:
            session.sendall(b"EHLO client.test\r\n")
            return session.recv(4096)

        reply = yield threads.deferToThread(ehlo)
        self.assertTrue(reply.startswith(b"250"), reply)
        der = session.getpeercert(binary_form=True)
        pem = ssl.DER_cert_to_PEM_cert(der).encode()
        x509 = yield run(self.openssl, "x509", "-noout", "-serial", stdin=pem)
        self.assertEqual(int(x509.stdout.decode().split("=", 1)[1], 16), self.serial)

        # A broken ACL: the old policy stays, and one line names the file.
        write_file(self.acl, '[[acl."http"]]\nallow = "yes"\n')
        log = yield self.hangup()
        [line] = [line for line in log.splitlines() if self.acl in line and "keeping" in line]
        self.assertIn(f"reload: keeping the old ACL: {self.acl}:1:", line)
        self.assertIn("reload: ACL kept, TLS certificate unchanged", log)
        done = yield self.forward_auth()
        self.assertEqual(done.stdout, b"200")
        self.assertIsNone(self.proc.poll())


class ChainTests(GatewayProcess):
    """
    A certificate file with its intermediate (a real CA's fullchain.pem):
    C{openssl s_client} trusting only the root verifies every TLS listener
    at start and after a reload that changes the intermediate.
    """

    def write_pair(self) -> None:
        self.root = make_ca("Test Root", path_length=1)
        self.write_chain(self.root.intermediate("Test Intermediate A"))
        self.root_path = os.path.join(self.dir, "root.pem")
        write_file(self.root_path, self.root.pem)

    def write_chain(self, intermediate) -> None:
        cert_pem, key_pem = intermediate.issue(["localhost", "127.0.0.1"])
        write_file(self.cert, cert_pem + intermediate.pem)
        write_file(self.key, key_pem)

    @defer.inlineCallbacks
    def verified(self, name: str, *options: str):
        """The verify return code line and the chain's subjects s_client reports on listener C{name}."""
        done = yield run(self.openssl, "s_client", "-connect", f"127.0.0.1:{self.ports[name]}",
                         "-servername", "localhost", "-showcerts", "-CAfile", self.root_path,
                         *options)
        out = done.stdout.decode("ascii", "replace")
        code = sorted(set(re.findall(r"Verify return code: .*", out)))  # once per ticket too
        subjects = re.findall(r"^ *\d+ s:(.*)$", out, re.M)
        return code, [s.strip() for s in subjects]

    @defer.inlineCallbacks
    def test_chain_verified(self):
        for intermediate in ("A", "B"):
            for name, options in (("smtps", ()), ("https", ("-alpn", "http/1.1")),
                                  ("smtp", ("-starttls", "smtp"))):
                code, subjects = yield self.verified(name, *options)
                self.assertEqual(code, ["Verify return code: 0 (ok)"], (name, intermediate))
                self.assertEqual(subjects, ["CN = localhost", f"CN = Test Intermediate {intermediate}"],
                                 name)
            if intermediate == "A":
                self.write_chain(self.root.intermediate("Test Intermediate B"))
                log = yield self.hangup()
                self.assertIn("TLS certificate changed", log)
                self.assertIn("issuer CN=Test Intermediate B, 1 chain certificate(s)", log)
