# -*- test-case-name: tests.test_tls -*-
"""
The gateway's certificate: loaded from PEM files with its chain (the
intermediates after it in the file, served after it: L{CertificateChain}),
or a self-signed pair generated once under the data directory for the
default run; the TLS
options every listener serves it with (L{server_tls}); and the holder that
lets a reload (SIGHUP) give new handshakes a new certificate
(L{ServerCertificate}).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import tempfile
from collections.abc import Sequence
from typing import Any

import attrs
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLContextFactory, IOpenSSLServerConnectionCreator
from zope.interface import implementer

from gateway.checkers.files import StoreError, read_bytes
from gateway.fileio import fsync_directory
from gateway.text import printable, quote

SELF_SIGNED_VALIDITY = datetime.timedelta(days=825)

#: Largest certificate (chain) or key file read.
MAX_PEM = 1024 * 1024
#: Most chain certificates after the server's own (each is sent in every
#: handshake; real chains have one to three).
MAX_CHAIN = 8


class CertificateError(Exception):
    """A certificate or key that cannot be used; the message names the file."""


def _write_private(path: str, data: bytes) -> None:
    """
    Replace C{path} with C{data}, mode 0600: written to an unpredictable name
    made exclusively in the same directory (C{mkstemp}: O_EXCL, O_NOFOLLOW),
    synced, renamed over C{path}, then the directory synced. A symlink
    planted at C{path} is replaced by the rename, never written through.
    """
    directory = os.path.dirname(path) or os.curdir
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_directory(directory)


def _certificate_hostname() -> str:
    """This host's name if a certificate can carry it (ASCII, CN of 64 octets at most)."""
    name = socket.getfqdn()
    if name and name.isascii() and len(name) <= 64:
        return name
    return "localhost"


def generate_self_signed(cert_path: str, key_path: str, hostname: str | None = None) -> None:
    """
    Write a self-signed ECDSA P-256 certificate for C{hostname} (default: this
    host's name), also valid for localhost, 127.0.0.1 and ::1.
    """
    hostname = hostname or _certificate_hostname()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dict.fromkeys([hostname, "localhost"])]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + SELF_SIGNED_VALIDITY)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    _write_private(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))


def _read(path: str, what: str) -> bytes:
    """A certificate or key file: a regular file, bounded in size."""
    try:
        return read_bytes(path, MAX_PEM)
    except StoreError as e:
        raise CertificateError(f"cannot read TLS {what} {e}") from None


def load_ca_file(path: str) -> tuple[ssl.Certificate, ...]:
    """
    The CA certificates in PEM file C{path} (a peer's trust roots);
    ValueError with a one-line message when there are none.
    """
    try:
        with open(path, "rb") as f:
            pem = f.read()
        certificates = x509.load_pem_x509_certificates(pem)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load CA file {quote(path)}: {e}") from None
    return tuple(
        ssl.Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM)) for c in certificates
    )


@attrs.frozen
class CertificateChain:
    """
    What the TLS listeners serve: the certificate with its private key, then
    the certificates of its chain (the intermediates, as the file lists them
    after it), which clients need to reach their trust roots. Equal when the
    certificates are (a key always matches its certificate).
    """

    #: The server's own certificate and its key.
    leaf: ssl.PrivateCertificate
    #: The certificates sent after it, in the file's order.
    chain: tuple[ssl.Certificate, ...] = ()

    def options(self) -> ssl.CertificateOptions:
        """TLS options serving the certificate, its key and its chain."""
        return ssl.CertificateOptions(
            privateKey=self.leaf.privateKey.original,
            certificate=self.leaf.original,
            extraCertChain=[c.original for c in self.chain],
        )


def load_certificate(cert_path: str, key_path: str | None = None) -> CertificateChain:
    """
    Load a certificate, the rest of its chain (every further certificate of
    the file, at most L{MAX_CHAIN}) and its private key from PEM files; with
    no C{key_path} the key is expected in the certificate file. OpenSSL must
    accept them together (a context is made once).

    @raise CertificateError: with a one-line reason naming the file, for
        anything that cannot be served (a key the crypto library does not
        support included).
    """
    cert_pem = _read(cert_path, "certificate")
    key_pem = _read(key_path, "key") if key_path else cert_pem
    where = cert_path if not key_path else f"{cert_path} / {key_path}"
    try:
        certificates = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise CertificateError(f"{cert_path}: no PEM certificate found") from None
    if len(certificates) > 1 + MAX_CHAIN:
        raise CertificateError(
            f"{cert_path}: {len(certificates)} certificates; at most {1 + MAX_CHAIN}"
            " (the server's and its chain)"
        )
    try:
        serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise CertificateError(
            f"{key_path or cert_path}: no usable unencrypted PEM private key ({_reason(e)})"
        ) from None
    try:
        leaf = ssl.PrivateCertificate.loadPEM(
            certificates[0].public_bytes(serialization.Encoding.PEM) + b"\n" + key_pem
        )
        chain = tuple(ssl.Certificate(crypto.X509.from_cryptography(c)) for c in certificates[1:])
        served = CertificateChain(leaf, chain)
        served.options().getContext()
    except Exception as e:  # noqa: BLE001 - pyOpenSSL and OpenSSL raise several kinds
        raise CertificateError(f"{where}: cannot load certificate: {_reason(e)}") from None
    return served


def _reason(e: Exception) -> str:
    """An exception as one line of a message (its class when it says nothing)."""
    return printable(str(e)) or type(e).__name__


def ensure_certificate(
    data_dir: str, cert_path: str | None = None, key_path: str | None = None
) -> tuple[str, str | None, CertificateChain]:
    """
    The certificate to serve: the given files, or a self-signed pair under
    C{DATA_DIR/tls/} generated the first time. Returns (cert path, key path, cert).
    """
    if cert_path is None:
        tls_dir = os.path.join(data_dir, "tls")
        cert_path = os.path.join(tls_dir, "cert.pem")
        key_path = os.path.join(tls_dir, "key.pem")
        if not (os.path.exists(cert_path) and os.path.exists(key_path)):
            try:
                os.makedirs(tls_dir, mode=0o700, exist_ok=True)
                generate_self_signed(cert_path, key_path)
            except OSError as e:
                raise CertificateError(
                    f"cannot write a self-signed certificate under {tls_dir}: {e.strerror}"
                ) from None
            except ValueError as e:
                raise CertificateError(f"cannot make a self-signed certificate: {e}") from None
    return cert_path, key_path, load_certificate(cert_path, key_path)


def server_tls(
    certificate: CertificateChain, protocols: Sequence[bytes] = ()
) -> ssl.CertificateOptions:
    """
    The TLS options of a listener (implicit TLS or STARTTLS), answering ALPN
    itself: the first of C{protocols} the client offers, else no protocol,
    and the handshake goes on (RFC 7301 section 3.2 lets a server ignore the
    extension; the front door then speaks the only protocol it has).

    Twisted's own selector ends the handshake with an C{internal_error} alert
    whenever nothing overlaps, and it finds a factory's protocols only when
    the factory is directly under TLS (ours sits under the handshake
    deadline): every client offering ALPN (curl, browsers, Go, Node) was
    refused. Each call makes its own context, so a listener's choice never
    leaks into another's.
    """
    options = certificate.options()
    ours = tuple(protocols)

    def select(connection: SSL.Connection, offered: list[bytes]) -> bytes | object:
        for protocol in ours:
            if protocol in offered:
                return protocol
        return SSL.NO_OVERLAPPING_PROTOCOLS

    options.getContext().set_alpn_select_callback(select)
    return options


def check_validity(
    cert_path: str, certificate: CertificateChain, now: datetime.datetime
) -> None:
    """
    Refuse a certificate that is not valid at C{now} (expired, or not yet
    valid): every client would refuse it.

    @raise CertificateError: naming C{cert_path} and the date.
    """
    x = certificate.leaf.original.to_cryptography()
    if now < x.not_valid_before_utc:
        raise CertificateError(
            f"{cert_path}: certificate not valid before {x.not_valid_before_utc:%Y-%m-%d %H:%M:%S}Z"
        )
    if now >= x.not_valid_after_utc:
        raise CertificateError(
            f"{cert_path}: certificate expired on {x.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z"
        )


def describe(certificate: CertificateChain) -> str:
    """Subject, serial, end of validity and issuer of C{certificate}, for a log line."""
    x = certificate.leaf.original.to_cryptography()
    line = (
        f"subject {x.subject.rfc4514_string()}, serial {x.serial_number:#x},"
        f" valid until {x.not_valid_after_utc:%Y-%m-%d}"
    )
    if certificate.chain:
        line += f", issuer {x.issuer.rfc4514_string()}, {len(certificate.chain)} chain certificate(s)"
    return printable(line)


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLContextFactory)
class ListenerTLS:
    """
    One listener's TLS (implicit or STARTTLS): the certificate its
    L{ServerCertificate} holds now, with the listener's ALPN choice
    (L{server_tls}). The OpenSSL context is made once per certificate, not
    per connection: a handshake costs what it costs with L{server_tls}.
    A session keeps the context it started with.
    """

    def __init__(self, certificate: CertificateChain, protocols: Sequence[bytes]) -> None:
        self.protocols = tuple(protocols)
        self._context = self.context_for(certificate)

    def context_for(self, certificate: CertificateChain) -> SSL.Context:
        """The context this listener would serve C{certificate} with."""
        return server_tls(certificate, self.protocols).getContext()

    def use(self, context: SSL.Context) -> None:
        """New handshakes use C{context} (from L{context_for})."""
        self._context = context

    def getContext(self) -> SSL.Context:
        return self._context

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self._context, None)


class ServerCertificate:
    """
    The certificate the gateway serves (C{core.tls}): each listener gets its
    context factory from L{server_tls}; L{replace} gives all of them the new
    certificate at once, for the next handshakes.
    """

    def __init__(self, certificate: CertificateChain) -> None:
        #: The certificate (and chain) new handshakes get.
        self.current = certificate
        self._listeners: list[ListenerTLS] = []

    def server_tls(self, protocols: Sequence[bytes] = ()) -> ListenerTLS:
        """A listener's TLS, answering ALPN with C{protocols} (see L{server_tls})."""
        listener = ListenerTLS(self.current, protocols)
        self._listeners.append(listener)
        return listener

    def replace(self, certificate: CertificateChain) -> None:
        """
        Serve C{certificate} from the next handshake on. Every listener's
        context is made before any is swapped: on an error nothing changed.
        """
        contexts = [listener.context_for(certificate) for listener in self._listeners]
        for listener, context in zip(self._listeners, contexts):
            listener.use(context)
        self.current = certificate


def tls_details(transport: Any) -> dict[str, str]:
    """
    The TLS version and cipher of a connection, as the spool records them
    (C{{"version": "TLSv1.3", "cipher": ...}}); empty when the transport has
    no OpenSSL connection to ask.
    """
    try:
        connection = transport.getHandle()
        return {
            "version": connection.get_protocol_version_name(),
            "cipher": connection.get_cipher_name(),
        }
    except Exception:  # noqa: BLE001 - a transport without an OpenSSL handle
        return {}

