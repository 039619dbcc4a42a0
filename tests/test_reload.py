"""
Tests for L{gateway.ops.reload} and the certificate holder of L{gateway.tls}:
SIGHUP re-reads the ACL, the groups and the certificate; a bad file keeps
its old version with one log line; reloads never overlap.
"""

from __future__ import annotations

import datetime
import gc
import os
import signal

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import defer, ssl, task
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from gateway import tap, testing
from gateway.authinfo import AuthInfo, Identity, IdentityContext
from gateway.errors import ShuttingDown
from gateway.ops import reload
from gateway.realm import login
from gateway.tls import MAX_PEM, ServerCertificate, generate_self_signed, load_certificate
from tests.relay_support import make_ca
from tests.support import ManualPool, keep_signal_handlers, pump_handshake, write_file
from tests.test_tls import SECP112R1_KEY, verified_handshake

ALLOW_DANIEL = '[[acl."http"]]\nallow = true\nprivileges = ["GET"]\nidentity.Individual = "daniel"\n'
ALLOW_STAFF = '[[acl."http"]]\nallow = true\nprivileges = ["GET"]\nidentity.Group = "staff"\n'
DANIEL = AuthInfo(identities=[Identity("daniel", IdentityContext.HttpBasicAuth)])
NOW = datetime.datetime.now(datetime.timezone.utc)


def write_certificate(
    cert_path: str,
    key_path: str,
    name: str,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> int:
    """A self-signed certificate for C{name} with the given validity; its serial."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    serial = x509.random_serial_number()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(not_before or NOW - datetime.timedelta(days=1))
        .not_valid_after(not_after or NOW + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    write_file(key_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    return serial


def handshake(server: SSL.Connection, alpn: tuple[bytes, ...] = ()) -> tuple[int, bytes]:
    """An in-memory TLS handshake with C{server}: the serial the client saw and the ALPN protocol."""
    server.set_accept_state()
    context = SSL.Context(SSL.TLS_METHOD)
    if alpn:
        context.set_alpn_protos(list(alpn))
    client = SSL.Connection(context, None)
    client.set_connect_state()
    pump_handshake(client, server)
    client.do_handshake()  # done: raises if it is not
    return client.get_peer_certificate().get_serial_number(), client.get_alpn_proto_negotiated()


class Lines:
    """The log lines of one namespace, formatted."""

    def __init__(self, test: SynchronousTestCase, namespace: str = "gateway.ops.reload") -> None:
        self.events: list[dict] = []

        def observe(event: dict) -> None:
            if event.get("log_namespace") == namespace:
                self.events.append(event)

        globalLogPublisher.addObserver(observe)
        test.addCleanup(globalLogPublisher.removeObserver, observe)

    def take(self) -> list[tuple[str, str]]:
        """The (level, text) of each line since the last call."""
        events, self.events = self.events, []
        return [(e["log_level"].name, formatEvent(e)) for e in events]


class ServerCertificateTests(SynchronousTestCase):
    """The holder every TLS listener reads its context from."""

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.paths = [os.path.join(self.dir, n) for n in ("a.pem", "a.key", "b.pem", "b.key")]
        self.serial_a = write_certificate(self.paths[0], self.paths[1], "a.test")
        self.serial_b = write_certificate(self.paths[2], self.paths[3], "b.test")
        self.a = load_certificate(self.paths[0], self.paths[1])
        self.b = load_certificate(self.paths[2], self.paths[3])

    def test_interface(self) -> None:
        holder = ServerCertificate(self.a)
        listener = holder.server_tls((b"http/1.1",))
        self.assertTrue(verifyObject(IOpenSSLServerConnectionCreator, listener))
        self.assertIs(listener.getContext(), listener.getContext())  # made once, not per call

    def test_replace(self) -> None:
        """Every listener's next handshake has the new certificate; each keeps its ALPN choice."""
        holder = ServerCertificate(self.a)
        http = holder.server_tls((b"h2", b"http/1.1"))
        smtp = holder.server_tls(())
        self.assertEqual(handshake(http.serverConnectionForTLS(None), (b"http/1.1",)),
                         (self.serial_a, b"http/1.1"))
        before = smtp.serverConnectionForTLS(None)  # a session that began before the reload
        holder.replace(self.b)
        self.assertIs(holder.current, self.b)
        self.assertEqual(handshake(http.serverConnectionForTLS(None), (b"http/1.1", b"h2")),
                         (self.serial_b, b"h2"))
        self.assertEqual(handshake(smtp.serverConnectionForTLS(None), (b"x",)), (self.serial_b, b""))
        self.assertEqual(handshake(before)[0], self.serial_a)

    def test_replace_all_or_nothing(self) -> None:
        """A listener whose new context cannot be made leaves every listener as it was."""
        holder = ServerCertificate(self.a)
        first, second = holder.server_tls(()), holder.server_tls(())
        old = first.getContext(), second.getContext()

        def broken(certificate):
            raise SSL.Error("no")

        second.context_for = broken
        self.assertRaises(SSL.Error, holder.replace, self.b)
        self.assertEqual((first.getContext(), second.getContext()), old)
        self.assertIs(holder.current, self.a)


class ReloaderTests(SynchronousTestCase):
    """The reloader on a core built as twistd builds it, reads run by hand."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.acl = os.path.join(self.dir, "acl.toml")
        self.groups = os.path.join(self.dir, "groups")
        self.cert = os.path.join(self.dir, "cert.pem")
        self.key = os.path.join(self.dir, "key.pem")
        write_file(self.acl, ALLOW_STAFF)
        write_file(self.groups, "staff: alice\n")
        self.serial = write_certificate(self.cert, self.key, "old.test")
        options = tap.Options()
        options.parseOptions([
            "--data-dir", os.path.join(self.dir, "data"), "--auth", "memory:daniel:tiger",
            "--acl", self.acl, "--groups", self.groups, "--tls-cert", self.cert, "--tls-key", self.key,
        ])
        self.core = tap.build_core(options["coreSettings"], task.Clock())
        self.pool = ManualPool()
        self.reloader = reload.Reloader(self.core, reload.ReloadFiles(
            certificate=self.cert, key=self.key, acl=self.acl, groups=self.groups,
            load_acl=tap.acl_loader(False),
        ), load=self.pool.run)
        self.lines = Lines(self)

    def reload(self) -> None:
        d = self.reloader.reload()
        self.assertEqual(len(self.pool.jobs), 1)  # the files are read off the reactor thread
        self.pool.finish_all()
        self.assertIsNone(self.successResultOf(d))

    def allowed(self) -> bool:
        return self.core.policy.query_resource_access(DANIEL, "http", "GET")

    def groups_of(self, user: str) -> tuple[str, ...]:
        return self.core.realm.auth_info_for(user).groups

    def serial_now(self) -> int:
        return self.core.certificate.leaf.original.get_serial_number()

    def test_nothing_changed(self) -> None:
        policy, groups, certificate = self.core.policy.current, self.core.realm.groups, self.core.certificate
        self.reload()
        self.assertEqual(self.lines.take(), [
            ("info", "reload: ACL unchanged, groups unchanged, TLS certificate unchanged"),
        ])
        self.assertIs(self.core.policy.current, policy)
        self.assertIs(self.core.realm.groups, groups)
        self.assertIs(self.core.certificate, certificate)

    def test_acl(self) -> None:
        """A new ACL decides the next question, and the one line says so."""
        self.assertFalse(self.allowed())
        write_file(self.acl, ALLOW_DANIEL)
        self.reload()
        self.assertTrue(self.allowed())
        self.assertEqual(self.lines.take(), [
            ("info", f"reload: ACL changed ({self.acl}), groups unchanged, TLS certificate unchanged"),
        ])

    def test_acl_grants(self) -> None:
        """The realm's authz grants ask the same policy: a reload changes them too."""
        self.assertFalse(self.core.realm.authorize(DANIEL, "ceo"))
        write_file(self.acl, '[[acl."smtp/authz/ceo"]]\nallow = true\nprivileges = ["authorize"]\n'
                             'identity.Individual = "daniel"\n')
        self.reload()
        self.assertTrue(self.core.realm.authorize(DANIEL, "ceo"))

    def assertKept(self, what: str, expected_problem: str, path: str) -> None:
        """One warning naming the file and the problem; the summary says kept, not the file."""
        [(level, line), (info_level, summary)] = self.lines.take()
        self.assertEqual(level, "warn")
        self.assertTrue(line.startswith(f"reload: keeping the old {what}: "), line)
        self.assertIn(path, line)
        self.assertIn(expected_problem, line)
        self.assertEqual(info_level, "info")
        self.assertIn(f"{what} kept", summary)
        self.assertNotIn(path, summary)

    def test_acl_bad(self) -> None:
        """A parse error, a key no request could reach, a missing file: the old ACL stays."""
        policy = self.core.policy.current
        for text, problem in (
            ('[[acl."http"]]\nallow = "yes"\nprivileges = ["GET"]\nidentity.Any = {}\n', f"{self.acl}:1:"),
            ('[[acl."smtp/sender/example.com/CEO"]]\nallow = true\nprivileges = ["send"]\n'
             "identity.Any = {}\n", "lower case"),
            (None, "No such file or directory"),
        ):
            if text is None:
                os.unlink(self.acl)
            else:
                write_file(self.acl, text)
            self.reload()
            self.assertKept("ACL", problem, self.acl)
            self.assertIs(self.core.policy.current, policy)

    def test_groups(self) -> None:
        self.assertEqual(self.groups_of("daniel"), ())
        write_file(self.groups, "staff: alice daniel\n")
        self.reload()
        self.assertEqual(self.groups_of("daniel"), ("staff",))
        info = self.core.realm.auth_info_for("daniel")  # the ACL's group rule sees the new groups
        self.assertTrue(self.core.policy.query_resource_access(info, "http", "GET"))
        self.assertEqual(self.lines.take(), [
            ("info", f"reload: ACL unchanged, groups changed ({self.groups}),"
                     " TLS certificate unchanged"),
        ])

    def test_groups_bad(self) -> None:
        groups = self.core.realm.groups
        write_file(self.groups, "staff alice daniel\n")
        self.reload()
        self.assertKept("groups", f"{self.groups}:1:", self.groups)
        self.assertIs(self.core.realm.groups, groups)

    def test_certificate(self) -> None:
        listener = self.core.tls.server_tls(())
        serial = write_certificate(self.cert, self.key, "new.test")
        self.reload()
        self.assertEqual(self.serial_now(), serial)
        self.assertEqual(handshake(listener.serverConnectionForTLS(None))[0], serial)
        [(level, line)] = self.lines.take()
        self.assertEqual(level, "info")
        self.assertIn(f"TLS certificate changed ({self.cert}: subject CN=new.test, serial {serial:#x},", line)

    def test_certificate_bad(self) -> None:
        """A mismatched key, an expired or future certificate, garbage: the old one stays."""
        other_key = os.path.join(self.dir, "other.key")
        day = datetime.timedelta(days=1)
        cases = [
            (lambda: write_certificate(self.cert, other_key, "new.test"), "do not match", self.cert),
            (lambda: write_certificate(self.cert, self.key, "new.test", not_after=NOW - day),
             "certificate expired on", self.cert),
            (lambda: write_certificate(self.cert, self.key, "new.test", not_before=NOW + day),
             "certificate not valid before", self.cert),
            (lambda: write_file(self.cert, "not a certificate\n"), "no PEM certificate found", self.cert),
            (lambda: os.unlink(self.key), "No such file or directory", self.key),
            (lambda: write_file(self.cert, b"#" * (MAX_PEM + 1)), f"larger than {MAX_PEM} bytes",
             self.cert),
        ]
        for make, problem, path in cases:
            make()
            self.reload()
            self.assertKept("TLS certificate", problem, path)
            self.assertEqual(self.serial_now(), self.serial)

    def test_certificate_chain(self) -> None:
        """
        The chain is part of the certificate: one added, or an intermediate
        renewed behind the same server certificate, is a change that new
        handshakes get; the same chain again is no change.
        """
        root = make_ca("Test Root", path_length=1)
        intermediate = root.intermediate("Test Intermediate")
        leaf_pem, key_pem = intermediate.issue(["localhost"])
        write_file(self.key, key_pem)
        write_file(self.cert, leaf_pem)
        self.reload()
        listener = self.core.tls.server_tls(())
        self.assertRaises(SSL.Error, verified_handshake, listener.serverConnectionForTLS(None), root.cert)
        self.lines.take()
        for chain, change in ((intermediate, "changed"), (intermediate, "unchanged"),
                              (root.intermediate("Test Intermediate", key=intermediate.key), "changed")):
            write_file(self.cert, leaf_pem + chain.pem)
            self.reload()
            [(_, line)] = self.lines.take()
            self.assertIn(f"TLS certificate {change}", line)
            self.assertEqual([c.digest() for c in self.core.certificate.chain],
                             [ssl.Certificate.loadPEM(chain.pem).digest()])
            self.assertEqual(verified_handshake(listener.serverConnectionForTLS(None), root.cert),
                             ["localhost", "Test Intermediate"])
        self.assertIn("issuer CN=Test Intermediate, 1 chain certificate(s)", line)

    def test_certificate_unsupported_key(self) -> None:
        """A key the crypto library does not support: one line; the other files still reload."""
        write_file(self.key, SECP112R1_KEY)
        write_file(self.groups, "staff: daniel\n")
        self.reload()
        self.assertKept("TLS certificate", f"{self.key}: no usable unencrypted PEM private key"
                                           " (Curve 1.3.132.0.6 is not supported)", self.key)
        self.assertEqual(self.serial_now(), self.serial)
        self.assertEqual(self.groups_of("daniel"), ("staff",))

    def test_one_file_unexpected_error(self) -> None:
        """Any exception reading one file is that file's one line; the others still reload."""

        def broken(path: str) -> None:
            raise RuntimeError("parser bug\nsecond line")

        self.reloader = reload.Reloader(self.core, attrs.evolve(self.reloader.files, load_acl=broken),
                                        load=self.pool.run)
        write_file(self.groups, "staff: daniel\n")
        self.reload()
        self.assertKept("ACL", f"{self.acl}: RuntimeError: parser bug\\nsecond line", self.acl)
        self.assertEqual(self.groups_of("daniel"), ("staff",))
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_one_bad_others_reload(self) -> None:
        write_file(self.acl, "[[[")
        write_file(self.groups, "staff: daniel\n")
        serial = write_certificate(self.cert, self.key, "new.test")
        self.reload()
        self.assertEqual(self.groups_of("daniel"), ("staff",))
        self.assertEqual(self.serial_now(), serial)
        [(_, bad), (_, summary)] = self.lines.take()
        self.assertIn(self.acl, bad)
        self.assertTrue(summary.startswith("reload: ACL kept, groups changed"), summary)
        self.assertIn("TLS certificate changed", summary)

    def test_no_overlap(self) -> None:
        """SIGHUPs during a reload: one more reload after it, then every caller hears."""
        first = self.reloader.reload()
        write_file(self.acl, ALLOW_DANIEL)
        later = [self.reloader.reload() for _ in range(3)]
        self.assertEqual(len(self.pool.jobs), 1)
        self.pool.finish_all()  # the first reload; the second starts
        self.assertIsNone(self.successResultOf(first))
        self.assertEqual([d.called for d in later], [False] * 3)
        self.assertEqual(len(self.pool.jobs), 1)
        self.pool.finish_all()
        self.assertEqual([self.successResultOf(d) for d in later], [None] * 3)
        self.assertEqual(self.pool.jobs, [])
        self.assertTrue(self.allowed())
        self.assertEqual(len(self.lines.take()), 2)  # one line per reload

    def test_stop_waits(self) -> None:
        self.reloader.startService()
        self.reloader.reload()
        stopped = self.reloader.stopService()
        self.assertNoResult(stopped)
        self.pool.finish_all()
        self.successResultOf(stopped)
        self.assertIsNone(self.reloader.stopService())

    def test_shutting_down(self) -> None:
        reloader = reload.Reloader(self.core, self.reloader.files,
                                   load=lambda *a: defer.fail(ShuttingDown()))
        self.successResultOf(reloader.reload())
        self.assertEqual(self.lines.take(), [("info", "reload skipped: the gateway is stopping")])

    def test_unexpected_error(self) -> None:
        """A bug in a reload is logged with its traceback; the next reload still runs."""
        reloader = reload.Reloader(self.core, self.reloader.files,
                                   load=lambda *a: defer.fail(RuntimeError("bug")))
        self.successResultOf(reloader.reload())
        self.successResultOf(reloader.reload())
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)


class InstallTests(SynchronousTestCase):
    """C{install}: SIGHUP reloads while the reloader runs, and holds it weakly."""

    def setUp(self) -> None:
        self.addCleanup(signal.signal, signal.SIGHUP, signal.getsignal(signal.SIGHUP))
        self.reactor = MemoryReactorClock()
        self.called: list = []
        self.reactor.callFromThread = lambda f, *a: self.called.append(f)

    def test_sighup(self) -> None:
        data = self.mktemp()
        cert = os.path.join(os.path.dirname(data) or ".", "gw.pem")
        generate_self_signed(cert, cert + ".key", "gw.test")
        options = tap.Options()
        options.parseOptions(["--data-dir", data, "--auth", "memory:a:b"])
        core = tap.build_core(options["coreSettings"], self.reactor)
        reloader = reload.install(self.reactor, core, reload.ReloadFiles(certificate=cert, key=cert + ".key"))
        reloads: list = []
        reloader.reload = lambda: reloads.append(1)
        [(install, _, _)] = self.reactor.whenRunningHooks
        install()
        os.kill(os.getpid(), signal.SIGHUP)
        [hangup] = self.called
        hangup()
        self.assertEqual(reloads, [])  # not started
        reloader.startService()
        hangup()
        self.assertEqual(reloads, [1])
        del reloader
        gc.collect()
        hangup()  # the reloader is gone: nothing, no error

    def test_makeService(self) -> None:
        """twistd's service has the reloader, reading the generated pair when no --tls-cert."""
        data = os.path.abspath(self.mktemp())
        options = tap.Options()
        options.parseOptions(["--data-dir", data, "--auth", "memory:a:b"])
        keep_signal_handlers(self)
        service = tap.makeService(options, reactor=self.reactor)
        reloader = service.getServiceNamed("reload")
        self.assertEqual(reloader.files, reload.ReloadFiles(
            certificate=os.path.join(data, "tls", "cert.pem"),
            key=os.path.join(data, "tls", "key.pem"),
            load_acl=reloader.files.load_acl,
        ))


class ACLLoaderTests(SynchronousTestCase):
    """A reload reads the ACL as the start does: no path skips the front doors' key checks."""

    def test_loader_required(self) -> None:
        self.assertRaises(TypeError, reload.ReloadFiles, certificate="c.pem", acl="acl.toml")

    def test_reload_refuses_what_start_refuses(self) -> None:
        """An C{http/} key in a form no request reaches is refused on SIGHUP as at start."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        acl = os.path.join(directory, "acl.toml")
        write_file(acl, '[[acl."http/app.test"]]\nallow = true\nprivileges = ["get"]\n'
                        'identity.Group = "staff"\n')
        options = tap.Options()
        options.parseOptions(["--data-dir", os.path.join(directory, "data"), "--auth", "memory:a:b",
                              "--acl", acl])
        keep_signal_handlers(self)
        service = tap.makeService(options, reactor=MemoryReactorClock())
        files = service.getServiceNamed("reload").files
        write_file(acl, '[[acl."http/App.Test"]]\nallow = true\nprivileges = ["get"]\n'
                        'identity.Group = "staff"\n')
        read = reload.read_files(files, datetime.datetime.now(datetime.timezone.utc))
        self.assertIn("acl", read.problems)
        self.assertIn("App.Test", read.problems["acl"])
        with self.assertRaises(usage.UsageError):
            tap.Options().parseOptions(["--data-dir", os.path.join(directory, "d2"),
                                        "--auth", "memory:a:b", "--acl", acl])


class LoginGroupsTests(SynchronousTestCase):
    """Reloaded groups reach a real login through the portal."""

    def test_login(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        groups = os.path.join(directory, "groups")
        write_file(groups, "staff: alice\n")
        options = tap.Options()
        options.parseOptions(["--data-dir", os.path.join(directory, "data"),
                              "--auth", "memory:daniel:tiger", "--groups", groups])
        core = tap.build_core(options["coreSettings"], task.Clock())
        reloader = reload.Reloader(core, reload.ReloadFiles(
            certificate=options["certPath"], key=options["keyPath"], groups=groups,
        ), load=lambda f, *a: defer.maybeDeferred(f, *a))
        write_file(groups, "staff: daniel\n")
        self.successResultOf(reloader.reload())
        _, info, _ = self.successResultOf(login(core.portal, testing.sasl_plain("daniel", "tiger")))
        self.assertEqual(info.groups, ("staff",))
