"""
A real SMTP/LMTP server we did not write, for the relay, delivery and
end-to-end tests: aiosmtpd 1.4.6 in its own thread, with a handler that
answers as a test tells it and records what it received; and certificates
(a test CA issuing server certificates) made with C{cryptography}.

Certificates::

    ca = make_ca()                        # TestCA: .certificate (twisted ssl.Certificate), .pem
    cert_pem, key_pem = ca.issue(["127.0.0.1", "localhost"])   # names: DNS names or IP addresses

The relay::

    relay = start_relay(test, users={"gw": "pw"}, ca=ca)       # stopped by test.addCleanup
    relay.url()                         # "smtp://127.0.0.1:PORT" (+ "?tls=none" without ca=)
    relay.handler.rcpt["busy@example.net"] = "451 4.2.0 busy"     # answer RCPT for that address
    relay.handler.rcpt["gone@example.net"] = "550 5.1.1 no such user"
    relay.handler.rcpt["x@example.net"] = ["451 4.3.0 later", "250 OK"]  # one per try, last repeats
    relay.handler.data = "451 4.3.0 try later"     # the answer to the end of data (default 250 ...)
    relay.handler.data = ["drop", "250 2.0.0 Ok"]  # per message in turn; the last one repeats
    relay.handler.data_for["c@example.net"] = "550 5.7.1 refused"   # by recipient: LMTP per
                                                   # recipient; SMTP: the first listed wins
    relay.handler.messages                         # list[Received]: every message answered 2xx
    relay.handler.attempts                         # list[Received]: every end of data, any answer
    relay.handler.connections                      # sessions opened (the start's own probe not counted)
    relay.handler.mail_params                      # list[list[str]]: each MAIL's raw parameters
    relay.handler.pipelining = False               # EHLO/LHLO without PIPELINING (offered by default)
    await/wait: relay.handler.wait_messages(n, reactor) -> Deferred firing once n messages arrived

An answer is an SMTP reply ("250 OK", "451 4.3.0 ...", "550 ..."), or the words
"drop" (the relay closes the connection at once, without a reply) or "stall"
(no reply at all, until the relay is stopped).

Options of L{start_relay}: C{ca} (a TestCA: STARTTLS offered with a
certificate for 127.0.0.1 it issued, and required before MAIL), C{users}
(AUTH PLAIN/LOGIN offered, over TLS only when C{ca} is given), C{mail_auth}
(True: accept and record MAIL's C{AUTH=} parameter; False, the default:
answer C{555} as stock aiosmtpd 1.4.6 does), C{names} (what the
certificate is for; default 127.0.0.1 and localhost), C{implicit} (with
C{ca}: TLS from the first octet, C{relay.url()} is C{smtps://}), C{lmtp} (an LMTP server on a
UNIX socket; C{relay.url()} is C{lmtp:///path}).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import defer, ssl
from twisted.trial.unittest import SynchronousTestCase

from tests.support import free_port, require_module

_DAY = datetime.timedelta(days=1)

# aiosmtpd 1.4.6 sets its own deprecated attribute on every login and warns about it.
warnings.filterwarnings("ignore", message="Session.login_data is deprecated")
# aiosmtpd logs each session's end (a TLS failure with its traceback) to "mail.log": keep it off stderr.
logging.getLogger("mail.log").addHandler(logging.NullHandler())


# -- certificates ------------------------------------------------------------


def _names(names: Sequence[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


@attrs.frozen
class TestCA:
    """A certificate authority of a test's own."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def certificate(self) -> ssl.Certificate:
        """As C{RelaySettings.ca} holds it."""
        return ssl.Certificate.loadPEM(self.pem)

    def intermediate(
        self, name: str = "authgateway test intermediate CA", key: ec.EllipticCurvePrivateKey | None = None
    ) -> TestCA:
        """
        An intermediate CA this one signs (made with C{make_ca(path_length=1)});
        with C{key}, a new certificate for an intermediate that exists.
        """
        key = key or ec.generate_private_key(ec.SECP256R1())
        return TestCA(key, _ca_certificate(name, key, self, 0))

    def issue(self, names: Sequence[str] = ("127.0.0.1", "localhost")) -> tuple[bytes, bytes]:
        """A server certificate for C{names} (DNS names or IP addresses): (cert PEM, key PEM)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY)
            .not_valid_after(now + _DAY)
            .add_extension(x509.SubjectAlternativeName(_names(names)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _ca_certificate(
    name: str, key: ec.EllipticCurvePrivateKey, issuer: TestCA | None, path_length: int | None
) -> x509.Certificate:
    """A CA certificate for C{key}, self-signed or signed by C{issuer}."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _DAY)
        .not_valid_after(now + _DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True,
                          crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True,
        )
        .sign(issuer.key if issuer else key, hashes.SHA256())
    )


def make_ca(name: str = "authgateway test CA", path_length: int | None = 0) -> TestCA:
    """
    A new CA (ECDSA P-256, valid a day either side of now); with
    C{path_length=1}, one that can sign an intermediate (L{TestCA.intermediate}).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    return TestCA(key, _ca_certificate(name, key, None, path_length))


def server_ssl_context(test: SynchronousTestCase, cert_pem: bytes, key_pem: bytes) -> Any:
    """A stdlib server C{ssl.SSLContext} serving that pair (written to files under the test's directory)."""
    import ssl as stdlib_ssl

    directory = os.path.abspath(test.mktemp())
    os.makedirs(directory)
    cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert_pem)
    with open(key_path, "wb") as f:
        f.write(key_pem)
    context = stdlib_ssl.SSLContext(stdlib_ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return context


# -- the relay -----------------------------------------------------------------


@attrs.define
class Received:
    """One end of data the relay saw, and what it answered."""

    mail_from: str
    rcpt_tos: list[str]
    mail_params: list[str]  # as sent (case kept), e.g. ["SIZE=42", "AUTH=daniel@example.com"]
    content: bytes  # dot-unstuffed, as the relay stored it
    answer: str
    login: str | None  # the user the client logged in to the relay as
    tls: bool


def _take(rule: Any) -> str:
    """The next answer of a rule: a string, or a list consumed in turn (the last repeats)."""
    if isinstance(rule, list):
        return rule.pop(0) if len(rule) > 1 else rule[0]
    return rule


class RelayHandler:
    """The aiosmtpd handler: answers as told (see the module docstring) and records."""

    def __init__(self, lmtp: bool = False) -> None:
        self.lmtp = lmtp
        self.rcpt: dict[str, Any] = {}
        self.data: Any = "250 2.0.0 Ok: queued"
        self.data_for: dict[str, Any] = {}
        self.messages: list[Received] = []
        self.attempts: list[Received] = []
        self.mail_params: list[list[str]] = []
        self.connections = 0
        self.pipelining = True

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        """
        Offer PIPELINING (RFC 2920) as Postfix does: aiosmtpd 1.4.6 reads
        one command line at a time from its stream either way, so it takes
        pipelined commands, but does not say so itself.
        """
        session.host_name = hostname
        if self.pipelining:
            responses.insert(1, "250-PIPELINING")
        return responses

    async def _act(self, server: Any, answer: str) -> str | None:
        if answer == "drop":
            server.transport.abort()
            return None
        if answer == "stall":
            await asyncio.sleep(3600)  # cancelled when the relay stops
        return answer

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        envelope.mail_from = address
        envelope.mail_options.extend(server.raw_mail_params)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        answer = await self._act(server, _take(self.rcpt.get(address, "250 OK")))
        if answer is None:
            return "421 4.4.2 dropped"
        if answer.startswith("2"):
            envelope.rcpt_tos.append(address)
        return answer

    async def handle_DATA(self, server, session, envelope):
        answers = []
        for rcpt in envelope.rcpt_tos:
            answers.append(_take(self.data_for[rcpt]) if rcpt in self.data_for else None)
        default = _take(self.data)
        if self.lmtp:
            answers = [a or default for a in answers]
        else:
            answers = [next((a for a in answers if a), default)]
        for special in ("drop", "stall"):
            if special in answers:
                await self._act(server, special)
                return "421 4.4.2 dropped"
        auth = session.auth_data
        login = auth.login.decode() if auth is not None and hasattr(auth, "login") else None
        received = Received(
            mail_from=envelope.mail_from, rcpt_tos=list(envelope.rcpt_tos),
            mail_params=list(envelope.mail_options), content=envelope.original_content or b"",
            answer="\r\n".join(answers), login=login,
            tls=session.ssl is not None or server.transport.get_extra_info("ssl_object") is not None,
        )
        self.attempts.append(received)
        if any(a.startswith("2") for a in answers):
            self.messages.append(received)
        return "\r\n".join(answers)  # LMTP: one reply line per recipient

    def wait_messages(self, count: int, clock: Any, timeout: float = 30.0) -> defer.Deferred[None]:
        """Fires once C{count} messages were accepted (polls; fails after C{timeout} seconds)."""
        from twisted.internet import task

        waited = [0.0]

        def check() -> None:
            if len(self.messages) >= count:
                loop.stop()
            elif waited[0] > timeout:
                raise AssertionError(f"the relay got {len(self.messages)} of {count} messages")
            waited[0] += 0.05

        loop = task.LoopingCall(check)
        loop.clock = clock
        return loop.start(0.05).addCallback(lambda _: None)


@attrs.define
class Relay:
    """A running aiosmtpd relay."""

    controller: Any
    handler: RelayHandler
    host: str | None
    port: int | None
    path: str | None
    tls: bool
    implicit: bool = False

    def url(self) -> str:
        if self.path is not None:
            return f"lmtp://{self.path}"
        if self.implicit:
            return f"smtps://{self.host}:{self.port}"
        return f"smtp://{self.host}:{self.port}" + ("" if self.tls else "?tls=none")


def _server_class(lmtp: bool, mail_auth: bool) -> type:
    smtp = require_module("aiosmtpd.smtp", "aiosmtpd")
    base = require_module("aiosmtpd.lmtp", "aiosmtpd").LMTP if lmtp else smtp.SMTP

    class RecordingServer(base):  # type: ignore[misc,valid-type]
        """Keeps MAIL's parameters as sent; takes AUTH= when told to."""

        def connection_made(self, transport: Any) -> None:
            self.event_handler.connections += 1
            super().connection_made(transport)

        async def smtp_MAIL(self, arg: str | None) -> None:
            params = (arg or "").partition(">")[2].split()
            self.raw_mail_params = params
            self.event_handler.mail_params.append(params)
            await super().smtp_MAIL(arg)

        def _getparams(self, params: Any) -> Any:
            result = super()._getparams(params)
            if mail_auth and result is not None:
                result.pop("AUTH", None)
            return result

    return RecordingServer


def start_relay(
    test: SynchronousTestCase,
    *,
    ca: TestCA | None = None,
    users: dict[str, str] | None = None,
    mail_auth: bool = False,
    lmtp: bool = False,
    names: Sequence[str] = ("127.0.0.1", "localhost"),
    implicit: bool = False,
) -> Relay:
    """Start an aiosmtpd relay for C{test} (see the module docstring); stopped at the test's end."""
    controller_module = require_module("aiosmtpd.controller", "aiosmtpd")
    smtp_module = require_module("aiosmtpd.smtp", "aiosmtpd")
    handler = RelayHandler(lmtp=lmtp)
    server_class = _server_class(lmtp, mail_auth)
    kwargs: dict[str, Any] = {"server_hostname": "relay.test", "data_size_limit": 64 * 1024 * 1024}
    if ca is not None and implicit:
        kwargs["ssl_context"] = server_ssl_context(test, *ca.issue(names))
    elif ca is not None:
        kwargs["tls_context"] = server_ssl_context(test, *ca.issue(names))
        kwargs["require_starttls"] = True
    if users is not None:
        def authenticator(server, session, envelope, mechanism, auth_data):
            ok = (
                isinstance(auth_data, smtp_module.LoginPassword)
                and users.get(auth_data.login.decode()) == auth_data.password.decode()
            )
            return smtp_module.AuthResult(success=ok, handled=False, auth_data=auth_data)

        kwargs["authenticator"] = authenticator
        kwargs["auth_require_tls"] = ca is not None

    class RelayController(controller_module.UnixSocketController if lmtp else controller_module.Controller):
        def factory(self) -> Any:
            return server_class(self.handler, **self.SMTP_kwargs)

    if lmtp:
        directory = tempfile.mkdtemp(prefix="relay-")  # a test's own directory is too long for AF_UNIX
        test.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "lmtp.sock")
        controller = RelayController(handler, unix_socket=path, **kwargs)
        host, port = None, None
    else:
        path, host, port = None, "127.0.0.1", free_port()
        controller = RelayController(handler, hostname=host, port=port, **kwargs)
    controller.start()
    handler.connections = 0  # the controller's own probe
    test.addCleanup(controller.stop)
    return Relay(controller, handler, host, port, path, ca is not None, implicit)
