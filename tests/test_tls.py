"""
Tests for L{gateway.tls}: self-signed generation, loading and the default
certificate under the data directory.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl as stdlib_ssl
import stat
import subprocess

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL, crypto
from twisted.internet import defer, reactor, ssl, threads
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from gateway import tap, tls
from gateway.tls import (
    CertificateError,
    ensure_certificate,
    generate_self_signed,
    load_certificate,
)
from tests.relay_support import make_ca
from tests.support import free_port, keep_signal_handlers, pump_handshake, require_tool


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


class GenerateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.cert_path = os.path.join(self.dir, "cert.pem")
        self.key_path = os.path.join(self.dir, "key.pem")

    def test_filesPrivate(self) -> None:
        """The certificate and the key are written with mode 0600."""
        generate_self_signed(self.cert_path, self.key_path, "gw.example.test")
        self.assertEqual(_mode(self.cert_path), 0o600)
        self.assertEqual(_mode(self.key_path), 0o600)
        self.assertEqual(sorted(os.listdir(self.dir)), ["cert.pem", "key.pem"])

    def test_subjectAltNames(self) -> None:
        """The SANs are the host name, localhost, 127.0.0.1 and ::1."""
        generate_self_signed(self.cert_path, self.key_path, "gw.example.test")
        cert = x509.load_pem_x509_certificate(_read(self.cert_path))
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(
            san.get_values_for_type(x509.DNSName), ["gw.example.test", "localhost"]
        )
        self.assertEqual(
            san.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
        )
        cn = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
        self.assertEqual([a.value for a in cn], ["gw.example.test"])
        self.assertEqual(cert.issuer, cert.subject)

    def test_localhostNotDuplicated(self) -> None:
        """With host name C{localhost} the DNS SAN appears once."""
        generate_self_signed(self.cert_path, self.key_path, "localhost")
        cert = x509.load_pem_x509_certificate(_read(self.cert_path))
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["localhost"])

    def test_defaultHostname(self) -> None:
        """Without a host name the FQDN of this host is used."""
        self.patch(socket, "getfqdn", lambda *a: "fqdn.example.test")
        generate_self_signed(self.cert_path, self.key_path)
        cert = x509.load_pem_x509_certificate(_read(self.cert_path))
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(
            san.get_values_for_type(x509.DNSName), ["fqdn.example.test", "localhost"]
        )

    def test_ecKeyMatchingCertificate(self) -> None:
        """The key is an unencrypted EC P-256 key matching the certificate."""
        generate_self_signed(self.cert_path, self.key_path, "gw.example.test")
        key = serialization.load_pem_private_key(_read(self.key_path), password=None)
        self.assertIsInstance(key, ec.EllipticCurvePrivateKey)
        self.assertIsInstance(key.curve, ec.SECP256R1)
        cert = x509.load_pem_x509_certificate(_read(self.cert_path))
        self.assertEqual(cert.public_key(), key.public_key())

    def test_serverCertificate(self) -> None:
        """The certificate is a non-CA server certificate valid now."""
        generate_self_signed(self.cert_path, self.key_path, "gw.example.test")
        cert = x509.load_pem_x509_certificate(_read(self.cert_path))
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertFalse(bc.value.ca)
        self.assertTrue(bc.critical)
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(eku), [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH])
        validity = cert.not_valid_after_utc - cert.not_valid_before_utc
        self.assertGreater(validity, tls.SELF_SIGNED_VALIDITY)

    def test_overwriteKeepsModeAndLeavesNoTemp(self) -> None:
        """Regenerating over world-readable files leaves 0600 files and no temp files."""
        for p in (self.cert_path, self.key_path):
            _write(p, b"old")
            os.chmod(p, 0o644)
        generate_self_signed(self.cert_path, self.key_path, "gw.example.test")
        self.assertEqual((_mode(self.cert_path), _mode(self.key_path)), (0o600, 0o600))
        self.assertEqual(sorted(os.listdir(self.dir)), ["cert.pem", "key.pem"])
        self.assertTrue(_read(self.cert_path).startswith(b"-----BEGIN CERTIFICATE-----"))


    def victim(self) -> str:
        """A file outside the certificate directory that must not change."""
        other = os.path.abspath(self.mktemp())
        os.makedirs(other)
        return _write(os.path.join(other, "victim"), b"precious\n")

    def test_plantedTemporaryNameNotFollowed(self) -> None:
        """Symlinks planted at the old predictable temporary names are not written through."""
        victim = self.victim()
        for path in (self.cert_path, self.key_path):
            os.symlink(victim, f"{path}.tmp{os.getpid()}")
        generate_self_signed(self.cert_path, self.key_path, "gw.example.test")
        self.assertEqual(_read(victim), b"precious\n")
        load_certificate(self.cert_path, self.key_path)

    def test_symlinkAtTargetReplacedNotFollowed(self) -> None:
        """A symlink at the key's own path is replaced by the new file, never written through."""
        victim = self.victim()
        os.symlink(victim, self.key_path)
        generate_self_signed(self.cert_path, self.key_path, "gw.example.test")
        self.assertEqual(_read(victim), b"precious\n")
        self.assertFalse(os.path.islink(self.key_path))
        self.assertEqual(_mode(self.key_path), 0o600)

    def test_temporaryNamesUnpredictable(self) -> None:
        """Temporary files come from mkstemp in the same directory."""
        made: list[str] = []
        real = tls.tempfile.mkstemp

        def mkstemp(**kw: str) -> tuple[int, str]:
            fd, name = real(**kw)
            made.append(name)
            return fd, name

        self.patch(tls.tempfile, "mkstemp", mkstemp)
        generate_self_signed(self.cert_path, self.key_path, "gw.example.test")
        self.assertEqual(len(made), 2)
        for name in made:
            self.assertEqual(os.path.dirname(name), os.path.abspath(self.dir))
            self.assertNotIn(str(os.getpid()), os.path.basename(name))
        self.assertEqual(sorted(os.listdir(self.dir)), ["cert.pem", "key.pem"])

    def test_directorySynced(self) -> None:
        synced: list[bool] = []
        real = os.fsync

        def fsync(fd: int) -> None:
            synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
            real(fd)

        self.patch(os, "fsync", fsync)
        generate_self_signed(self.cert_path, self.key_path, "gw.example.test")
        self.assertEqual(synced, [False, True, False, True])


class LoadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.cert_path = os.path.join(self.dir, "cert.pem")
        self.key_path = os.path.join(self.dir, "key.pem")
        generate_self_signed(self.cert_path, self.key_path, "gw.example.test")

    def _serial(self) -> int:
        return x509.load_pem_x509_certificate(_read(self.cert_path)).serial_number

    def test_loadPair(self) -> None:
        """A certificate and key file load into a matching PrivateCertificate, no chain."""
        cert = load_certificate(self.cert_path, self.key_path)
        self.assertIsInstance(cert.leaf, ssl.PrivateCertificate)
        self.assertEqual(cert.chain, ())
        self.assertEqual(cert.leaf.original.get_serial_number(), self._serial())
        self.assertTrue(cert.leaf.privateKey.matches(cert.leaf.getPublicKey()))

    def test_loadCombined(self) -> None:
        """With no key path the key is read from the certificate file."""
        combined = _write(
            os.path.join(self.dir, "combined.pem"),
            _read(self.cert_path) + _read(self.key_path),
        )
        cert = load_certificate(combined)
        self.assertEqual(cert.leaf.original.get_serial_number(), self._serial())

    def test_loadCombinedKeyFirst(self) -> None:
        """A combined file may hold the key before the certificate."""
        combined = _write(
            os.path.join(self.dir, "combined.pem"),
            _read(self.key_path) + _read(self.cert_path),
        )
        cert = load_certificate(combined, None)
        self.assertEqual(cert.leaf.original.get_serial_number(), self._serial())

    def test_missingCertificateFile(self) -> None:
        """A missing certificate file is a CertificateError naming it."""
        missing = os.path.join(self.dir, "nope.pem")
        e = self.assertRaises(CertificateError, load_certificate, missing, self.key_path)
        self.assertIn(missing, str(e))
        self.assertIn("No such file", str(e))

    def test_missingKeyFile(self) -> None:
        """A missing key file is a CertificateError naming it."""
        missing = os.path.join(self.dir, "nokey.pem")
        e = self.assertRaises(CertificateError, load_certificate, self.cert_path, missing)
        self.assertIn(missing, str(e))
        self.assertIn("key", str(e))

    def test_noCertificate(self) -> None:
        """A file without a PEM certificate is a CertificateError naming it."""
        junk = _write(os.path.join(self.dir, "junk.pem"), b"hello, not a certificate\n")
        e = self.assertRaises(CertificateError, load_certificate, junk, self.key_path)
        self.assertIn(junk, str(e))
        self.assertIn("no PEM certificate", str(e))

    def test_keyOnlyAsCertificate(self) -> None:
        """A key file given as the certificate is a CertificateError naming it."""
        e = self.assertRaises(CertificateError, load_certificate, self.key_path)
        self.assertIn(self.key_path, str(e))
        self.assertIn("no PEM certificate", str(e))

    def test_keyNotAKey(self) -> None:
        """A key file holding no private key is a CertificateError naming it."""
        e = self.assertRaises(
            CertificateError, load_certificate, self.cert_path, self.cert_path
        )
        self.assertIn(self.cert_path, str(e))
        self.assertIn("private key", str(e))
        junk = _write(os.path.join(self.dir, "junk.key"), b"not a key")
        e = self.assertRaises(CertificateError, load_certificate, self.cert_path, junk)
        self.assertTrue(str(e).startswith(junk + ":"), str(e))

    def test_certificateWithoutKey(self) -> None:
        """A certificate file with no key and no key path is a CertificateError naming it."""
        e = self.assertRaises(CertificateError, load_certificate, self.cert_path)
        self.assertTrue(str(e).startswith(self.cert_path + ":"), str(e))
        self.assertIn("private key", str(e))

    def test_keyMismatch(self) -> None:
        """A key that does not match the certificate is a CertificateError naming both files."""
        other_cert = os.path.join(self.dir, "other-cert.pem")
        other_key = os.path.join(self.dir, "other-key.pem")
        generate_self_signed(other_cert, other_key, "other.example.test")
        e = self.assertRaises(CertificateError, load_certificate, self.cert_path, other_key)
        self.assertIn(self.cert_path, str(e))
        self.assertIn(other_key, str(e))
        self.assertIn("cannot load certificate", str(e))


def verified_handshake(server: SSL.Connection, root: x509.Certificate) -> list[str]:
    """
    An in-memory handshake of a client trusting only C{root} with C{server}:
    the subjects' common names of the chain the server sent; SSL.Error when
    the client could not verify it.
    """
    context = SSL.Context(SSL.TLS_METHOD)
    context.get_cert_store().add_cert(crypto.X509.from_cryptography(root))
    context.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errno, depth, ok: bool(ok))
    client = SSL.Connection(context, None)
    client.set_connect_state()
    server.set_accept_state()
    pump_handshake(client, server)
    client.do_handshake()  # done: raises if it is not
    return [c.get_subject().CN for c in client.get_peer_cert_chain()]


class ChainTests(SynchronousTestCase):
    """A certificate file holding the chain: every certificate after the first is served after it."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.root = make_ca("Test Root", path_length=1)
        self.intermediate = self.root.intermediate("Test Intermediate")
        self.leaf_pem, self.key_pem = self.intermediate.issue(["localhost"])
        self.key_path = _write(os.path.join(self.dir, "key.pem"), self.key_pem)

    def chain_file(self, *pems: bytes) -> str:
        return _write(os.path.join(self.dir, "fullchain.pem"), b"".join(pems))

    def test_chain_loaded(self) -> None:
        cert_path = self.chain_file(self.leaf_pem, self.intermediate.pem)
        served = load_certificate(cert_path, self.key_path)
        self.assertEqual(served.leaf.getSubject().commonName, b"localhost")
        self.assertEqual([c.getSubject().commonName for c in served.chain], [b"Test Intermediate"])
        self.assertIn(", issuer CN=Test Intermediate, 1 chain certificate(s)", tls.describe(served))

    def test_chain_served(self) -> None:
        """A client trusting only the root verifies the listener (implicit TLS or STARTTLS alike)."""
        served = load_certificate(self.chain_file(self.leaf_pem, self.intermediate.pem), self.key_path)
        listener = tls.ServerCertificate(served).server_tls((b"http/1.1",))
        self.assertEqual(verified_handshake(listener.serverConnectionForTLS(None), self.root.cert),
                         ["localhost", "Test Intermediate"])
        options = tls.server_tls(served)
        self.assertEqual(verified_handshake(SSL.Connection(options.getContext(), None), self.root.cert),
                         ["localhost", "Test Intermediate"])

    def test_without_chain_unverified(self) -> None:
        """The control: the leaf alone cannot be verified from the root."""
        served = load_certificate(self.chain_file(self.leaf_pem), self.key_path)
        listener = tls.ServerCertificate(served).server_tls(())
        self.assertRaises(SSL.Error, verified_handshake, listener.serverConnectionForTLS(None),
                          self.root.cert)

    def test_combined_with_key(self) -> None:
        """Key, certificate and chain in one file, in any order around the key."""
        cert_path = self.chain_file(self.leaf_pem, self.key_pem, self.intermediate.pem)
        served = load_certificate(cert_path)
        self.assertEqual(len(served.chain), 1)

    def test_equality(self) -> None:
        """Equal when the certificates are, chain included."""
        alone = load_certificate(self.chain_file(self.leaf_pem), self.key_path)
        chained = load_certificate(self.chain_file(self.leaf_pem, self.intermediate.pem), self.key_path)
        again = load_certificate(self.chain_file(self.leaf_pem, self.intermediate.pem), self.key_path)
        renewed = self.root.intermediate("Test Intermediate", key=self.intermediate.key)
        other = load_certificate(self.chain_file(self.leaf_pem, renewed.pem), self.key_path)
        self.assertEqual(chained, again)
        self.assertNotEqual(chained, alone)
        self.assertNotEqual(chained, other)

    def test_too_long(self) -> None:
        pems = [self.leaf_pem] + [self.intermediate.pem] * (tls.MAX_CHAIN + 1)
        cert_path = self.chain_file(*pems)
        e = self.assertRaises(CertificateError, load_certificate, cert_path, self.key_path)
        self.assertEqual(
            str(e), f"{cert_path}: {tls.MAX_CHAIN + 2} certificates; at most {tls.MAX_CHAIN + 1}"
            " (the server's and its chain)"
        )
        served = load_certificate(self.chain_file(*pems[:-1]), self.key_path)
        self.assertEqual(len(served.chain), tls.MAX_CHAIN)


#: An EC key on secp112r1, a curve the crypto library does not support.
SECP112R1_KEY = b"""-----BEGIN EC PRIVATE KEY-----
MD4CAQEEDn8oEnhBHwpuRCVZg/SZoAcGBSuBBAAGoSADHgAEW+Ge1m5e1JSBfEcv
9VXJUW7wXfN3vbHyETboSQ==
-----END EC PRIVATE KEY-----
"""


class UnsupportedKeyTests(SynchronousTestCase):
    """A key the crypto library cannot use is one line naming the file, at start too."""

    def test_load(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
        generate_self_signed(cert_path, key_path, "gw.test")
        _write(key_path, SECP112R1_KEY)
        e = self.assertRaises(CertificateError, load_certificate, cert_path, key_path)
        self.assertEqual(str(e), f"{key_path}: no usable unencrypted PEM private key"
                                 " (Curve 1.3.132.0.6 is not supported)")
        options = tap.Options()
        e = self.assertRaises(usage.UsageError, options.parseOptions, [
            "--data-dir", os.path.join(directory, "data"), "--auth", "memory:a:b",
            "--tls-cert", cert_path, "--tls-key", key_path,
        ])
        self.assertIn(f"{key_path}: no usable unencrypted PEM private key", str(e))


class EnsureTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.data_dir = self.mktemp()
        self.tls_dir = os.path.join(self.data_dir, "tls")

    def test_generatesOnce(self) -> None:
        """The first call generates a pair under DATA_DIR/tls; the second reuses it."""
        cert_path, key_path, cert = ensure_certificate(self.data_dir)
        self.assertEqual(
            (cert_path, key_path),
            (os.path.join(self.tls_dir, "cert.pem"), os.path.join(self.tls_dir, "key.pem")),
        )
        self.assertIsInstance(cert.leaf, ssl.PrivateCertificate)
        self.assertEqual(_mode(self.tls_dir), 0o700)
        self.assertEqual((_mode(cert_path), _mode(key_path)), (0o600, 0o600))
        before = (_read(cert_path), _read(key_path))

        again = ensure_certificate(self.data_dir)
        self.assertEqual(again[:2], (cert_path, key_path))
        self.assertEqual((_read(cert_path), _read(key_path)), before)
        self.assertEqual(
            again[2].leaf.original.get_serial_number(), cert.leaf.original.get_serial_number()
        )
        self.assertEqual(sorted(os.listdir(self.tls_dir)), ["cert.pem", "key.pem"])

    def test_regeneratesWhenKeyMissing(self) -> None:
        """If only the certificate is left, a new pair is generated."""
        cert_path, key_path, _ = ensure_certificate(self.data_dir)
        old = _read(cert_path)
        os.unlink(key_path)
        ensure_certificate(self.data_dir)
        self.assertTrue(os.path.exists(key_path))
        self.assertNotEqual(_read(cert_path), old)

    def test_givenFiles(self) -> None:
        """Given files are loaded as they are and nothing is generated."""
        os.makedirs(self.data_dir)
        cert_path = os.path.join(self.data_dir, "mine.pem")
        key_path = os.path.join(self.data_dir, "mine.key")
        generate_self_signed(cert_path, key_path, "mine.example.test")
        result = ensure_certificate(self.data_dir, cert_path, key_path)
        self.assertEqual(result[:2], (cert_path, key_path))
        self.assertEqual(result[2].leaf.getSubject().commonName, b"mine.example.test")
        self.assertFalse(os.path.exists(self.tls_dir))

    def test_givenCombinedFile(self) -> None:
        """A given combined file with no key path is loaded; the key path stays None."""
        os.makedirs(self.data_dir)
        cert_path = os.path.join(self.data_dir, "c.pem")
        key_path = os.path.join(self.data_dir, "k.pem")
        generate_self_signed(cert_path, key_path, "mine.example.test")
        combined = _write(os.path.join(self.data_dir, "both.pem"), _read(cert_path) + _read(key_path))
        result = ensure_certificate(self.data_dir, combined)
        self.assertEqual(result[:2], (combined, None))
        self.assertFalse(os.path.exists(self.tls_dir))

    def test_givenBrokenFile(self) -> None:
        """A given file that does not load is a CertificateError, not a fallback."""
        missing = os.path.join(self.data_dir, "missing.pem")
        e = self.assertRaises(CertificateError, ensure_certificate, self.data_dir, missing)
        self.assertIn(missing, str(e))
        self.assertFalse(os.path.exists(self.tls_dir))

    def test_unwritableDirectory(self) -> None:
        """A data directory that cannot be written is a CertificateError naming the tls dir."""
        if os.geteuid() == 0:
            raise self.skipTest("root ignores directory permissions")
        os.makedirs(self.data_dir)
        os.chmod(self.data_dir, 0o500)
        self.addCleanup(os.chmod, self.data_dir, 0o700)
        e = self.assertRaises(CertificateError, ensure_certificate, self.data_dir)
        self.assertIn(self.tls_dir, str(e))
        self.assertIn("Permission denied", str(e))

    def test_dataDirUnderFile(self) -> None:
        """A data directory beneath a regular file is a CertificateError naming the tls dir."""
        parent = _write(self.mktemp(), b"a regular file")
        data_dir = os.path.join(parent, "data")
        e = self.assertRaises(CertificateError, ensure_certificate, data_dir)
        self.assertIn(os.path.join(data_dir, "tls"), str(e))
        self.assertIn("Not a directory", str(e))

    def test_longHostName(self) -> None:
        """
        A host FQDN too long for a certificate CN (over 64 characters) does not
        escape as a bare ValueError: the default certificate is still made, or
        the failure is a CertificateError.
        """
        self.patch(socket, "getfqdn", lambda *a: "h" * 60 + ".example.test")
        try:
            cert_path, _, cert = ensure_certificate(self.data_dir)
        except CertificateError:
            return
        parsed = x509.load_pem_x509_certificate(_read(cert_path))
        san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertIn("localhost", san.get_values_for_type(x509.DNSName))


class ALPNTests(TestCase):
    """
    Every TLS listener completes the handshake with a client offering ALPN,
    as curl, browsers, Go and Node do (Twisted's own ALPN selector ended it
    with internal_error when nothing overlapped): the HTTP front door picks
    http/1.1, SMTP and SOCKS ignore the extension.
    """

    timeout = 60

    def setUp(self) -> None:
        self.ports = {name: free_port() for name in ("smtp", "smtps", "https", "socks-tls")}
        options = tap.Options()
        options.parseOptions([
            "--data-dir", os.path.abspath(self.mktemp()), "--auth", "memory:daniel:tiger",
            "--http", "none", "--socks", "none", "--smtp-hostname", "mx.test",
            *(arg for name, port in self.ports.items()
              for arg in (f"--{name}", f"tcp:{port}:interface=127.0.0.1")),
        ])
        keep_signal_handlers(self)
        service = tap.makeService(options, reactor=reactor)
        service.startService()
        self.addCleanup(service.stopService)

    def handshake(self, sock: socket.socket, offered: list[str]) -> stdlib_ssl.SSLSocket:
        context = stdlib_ssl.SSLContext(stdlib_ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = stdlib_ssl.CERT_NONE
        context.set_alpn_protocols(offered)
        return context.wrap_socket(sock)

    def connect(self, name: str) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.ports[name]), timeout=10)
        self.addCleanup(sock.close)
        return sock

    def sessions(self) -> dict[str, tuple[str | None, bytes]]:
        """Blocking: each listener's chosen protocol and first answer."""
        seen = {}
        for name, offered, send in [
            ("https", ["h2", "http/1.1"], b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n"),
            ("smtps", ["smtp", "h2"], b""),
            ("socks-tls", ["socks", "h2"], b"\x05\x01\x02"),
        ]:
            tls_sock = self.handshake(self.connect(name), offered)
            tls_sock.sendall(send)
            seen[name] = (tls_sock.selected_alpn_protocol(), tls_sock.recv(64))
        plain = self.connect("smtp")
        reader = plain.makefile("rb")
        reader.readline()
        plain.sendall(b"EHLO client.test\r\n")
        while reader.readline()[3:4] == b"-":
            pass
        plain.sendall(b"STARTTLS\r\n")
        reader.readline()
        tls_sock = self.handshake(plain, ["smtp"])
        tls_sock.sendall(b"NOOP\r\n")
        seen["smtp STARTTLS"] = (tls_sock.selected_alpn_protocol(), tls_sock.recv(64))
        return seen

    @defer.inlineCallbacks
    def test_alpn_offered(self):
        seen = yield threads.deferToThread(self.sessions)
        self.assertEqual(seen["https"][0], "http/1.1")
        self.assertTrue(seen["https"][1].startswith(b"HTTP/1.1 401 "), seen["https"])
        self.assertEqual(seen["smtps"], (None, b"220 mx.test ESMTP authgateway\r\n"))
        self.assertEqual(seen["socks-tls"], (None, b"\x05\x02"))
        self.assertEqual(seen["smtp STARTTLS"], (None, b"250 2.0.0 OK\r\n"))

    @defer.inlineCallbacks
    def test_curl_https(self):
        """curl (ALPN h2 and http/1.1 by default) reaches the HTTPS front door."""
        curl = require_tool("curl", "curl")
        done = yield threads.deferToThread(
            subprocess.run,
            [curl, "-sk", "-o", "/dev/null", "-w", "%{http_code} %{http_version}",
             "-u", "daniel:tiger", f"https://127.0.0.1:{self.ports['https']}/whoami"],
            capture_output=True, text=True, timeout=30,
        )
        self.assertEqual((done.returncode, done.stdout), (0, "200 1.1"), done.stderr)
