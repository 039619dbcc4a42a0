"""
Tests for L{gateway.tap} and the twistd plugin: discovery, options, errors as
one line, the wired Portal, and a real C{twistd -n authgateway} run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from twisted.application.service import IServiceMaker, MultiService
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, reactor, task
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import IPlugin, getPlugins
from twisted.python import usage
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from gateway import tap, testing
from gateway.acl import AccessControlMap, AllowAuthenticated
from gateway.authinfo import AuthInfo
from gateway.checkers import hashes
from gateway.checkers.files import atomic_write
from gateway.realm import login
from gateway.smtp.server import SubmissionFactory
from gateway.socks.server import SOCKSFactory
from gateway.web.server import GatewaySite
from tests.support import keep_signal_handlers

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


class PluginTests(SynchronousTestCase):
    def test_found(self):
        """twistd finds exactly one authgateway plugin, and it is ours."""
        makers = [p for p in getPlugins(IServiceMaker) if p.tapname == "authgateway"]
        self.assertEqual(len(makers), 1)
        [maker] = makers
        verifyObject(IServiceMaker, maker)
        verifyObject(IPlugin, maker)
        self.assertIsInstance(maker.options(), tap.Options)
        self.assertIs(maker.makeService, tap.makeService)


class OptionsTests(SynchronousTestCase):
    def parse(self, *args, auth=("--auth", "memory:daniel:tiger")):
        self.data = self.mktemp()
        options = tap.Options()
        options.parseOptions(["--data-dir", self.data, *auth, *args])
        return options

    def assertUsage(self, words, *args, **kw):
        e = self.assertRaises(usage.UsageError, self.parse, *args, **kw)
        self.assertIn(words, str(e))
        self.assertNotIn("\n", str(e))
        return str(e)

    def test_defaults(self):
        options = self.parse()
        self.assertEqual(
            options["endpoints"],
            {
                "smtp": "tcp:2525:interface=127.0.0.1",
                "http": "tcp:8080:interface=127.0.0.1",
                "socks": "tcp:1080:interface=127.0.0.1",
            },
        )
        self.assertTrue(os.path.isfile(os.path.join(self.data, "tls", "cert.pem")))
        self.assertEqual(os.stat(os.path.join(self.data, "tls", "key.pem")).st_mode & 0o777, 0o600)
        self.assertIsInstance(options["policy"], AllowAuthenticated)

    def test_none_disables(self):
        options = self.parse("--smtp", "none", "--http", "NONE", "--smtps", "tcp:4650")
        self.assertEqual(set(options["endpoints"]), {"smtps", "socks"})

    def test_bad_endpoint(self):
        self.assertUsage("--smtp 'tcp:notaport'", "--smtp", "tcp:notaport")
        self.assertUsage("--socks 'bogus:1'", "--socks", "bogus:1")

    def test_memory_authenticates(self):
        clock = task.Clock()
        core = tap.build_core(self.parse()["coreSettings"], reactor=clock)
        _, info, _ = self.successResultOf(login(core.portal, testing.sasl_plain("daniel", "tiger")))
        self.assertIsInstance(info, AuthInfo)
        self.assertEqual(info.names(), {"daniel"})
        d = login(core.portal, testing.http_basic("daniel", "x"))
        self.assertNoResult(d)  # the throttle delays every failure
        clock.advance(0.5)
        self.failureResultOf(d, UnauthorizedLogin)

    def test_file_authenticates(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("daniel:tiger\n")
        core = tap.build_core(self.parse(auth=("--auth", f"file:{path}"))["coreSettings"], reactor=task.Clock())
        _, info, _ = self.successResultOf(login(core.portal, testing.rfc1929("daniel", "tiger")))
        self.assertEqual(info.names(), {"daniel"})

    def test_several_backends(self):
        """Repeated --auth/--checker all count, in order (the Portal keeps one per interface)."""
        options = self.parse(
            "--auth", "memory:bob:secret", "--checker", "tests.test_checkers.seed_proxy_auth",
        )
        core = tap.build_core(options["coreSettings"], reactor=task.Clock())
        for creds in (
            testing.sasl_plain("daniel", "tiger"),
            testing.http_basic("bob", "secret"),
            testing.rfc1929("proxyuser", "secretpassword"),
        ):
            self.successResultOf(login(core.portal, creds))

    def test_groups_and_acl(self):
        groups, acl = self.mktemp(), self.mktemp()
        with open(groups, "w") as f:
            f.write("staff: daniel\n")
        with open(acl, "w") as f:
            f.write('[[acl."smtp"]]\nallow = true\nprivileges = ["send"]\nidentity.Group = "staff"\n')
        options = self.parse("--groups", groups, "--acl", acl)
        self.assertIsInstance(options["policy"], AccessControlMap)
        core = tap.build_core(options["coreSettings"], reactor=task.Clock())
        _, info, _ = self.successResultOf(login(core.portal, testing.sasl_plain("daniel", "tiger")))
        self.assertEqual(info.groups, ("staff",))
        self.assertTrue(core.policy.query_resource_access(info, "smtp/sender/x", "send"))
        self.assertFalse(core.policy.query_resource_access(info, "smtp/sender/x", "relay"))

    def test_bad_values(self):
        """Each bad value is one line naming the problem."""
        missing = os.path.abspath(self.mktemp())
        bad_groups = self.mktemp()
        with open(bad_groups, "w") as f:
            f.write("staff daniel\n")
        bad_acl = self.mktemp()
        with open(bad_acl, "w") as f:
            f.write('[[acl."smtp"]]\nallow = "yes"\nprivileges = ["send"]\nidentity.Any = {}\n')
        self.assertUsage("--auth bogus: unknown auth type (known:", "--auth", "bogus:x")
        self.assertUsage(f"--auth file:{missing}: No such file or directory", "--auth", f"file:{missing}")
        self.assertUsage("--auth file:: a file name is required", "--auth", "file:")
        self.assertUsage(f"--auth htpasswd: {missing}: No such file", "--auth", f"htpasswd:{missing}")
        self.assertUsage("--auth tokens: a file name is required", "--auth", "tokens:")
        self.assertUsage("--auth memory: give USER:PASSWORD", "--auth", "memory:")
        self.assertUsage("--checker: cannot import", "--checker", "no.such.Checker")
        self.assertUsage(f"cannot read TLS certificate {missing}", "--tls-cert", missing)
        self.assertUsage("--tls-key needs --tls-cert", "--tls-key", missing)
        self.assertUsage(f"{bad_groups}:1:", "--groups", bad_groups)
        self.assertUsage(f"{bad_acl}:1:", "--acl", bad_acl)
        self.assertUsage(missing, "--acl", missing)
        self.assertUsage(
            "--auth anonymous: checks credentials no front door of the gateway uses",
            "--auth", "anonymous",
        )

    def test_smtp_options(self):
        acl = self.mktemp()
        with open(acl, "w") as f:
            f.write("")
        self.assertUsage("--smtp-sender-binding needs --acl", "--smtp-sender-binding")
        upper = self.mktemp()
        with open(upper, "w") as f:
            f.write('[[acl."smtp/sender/example.com/CEO"]]\nallow = false\nprivileges = ["send"]\n'
                    "identity.Any = {}\n")
        self.assertUsage("write smtp/sender keys in lower case", "--acl", upper)
        options = self.parse(
            "--acl", acl,
            "--smtp-hostname", "mx.test", "--smtp-max-size", "1000", "--smtp-max-recipients", "3",
            "--smtp-timeout", "9", "--smtp-mechanism", "CRAM-MD5=twisted.cred.credentials.CramMD5Credentials",
            "--smtp-mechanisms", "login,cram-md5", "--smtp-trusted-network", "10.0.0.0/8",
            "--smtp-insecure-auth", "--smtp-sender-binding",
        )
        settings = options["smtpSettings"]
        self.assertEqual(list(settings.mechanisms), ["LOGIN", "CRAM-MD5"])
        self.assertEqual(
            (settings.hostname, settings.max_size, settings.max_recipients, settings.timeout),
            ("mx.test", 1000, 3, 9.0),
        )
        self.assertEqual([str(n) for n in settings.trusted_networks], ["10.0.0.0/8"])
        self.assertTrue(settings.insecure_auth and settings.sender_binding)
        self.assertTrue(os.path.isdir(os.path.join(self.data, "spool")))
        defaults = self.parse()["smtpSettings"]
        self.assertEqual(list(defaults.mechanisms), ["PLAIN", "LOGIN"])
        self.assertFalse(defaults.insecure_auth or defaults.sender_binding)

    def test_bad_smtp_options(self):
        self.assertUsage("--smtp-mechanisms: unknown mechanism 'XOAUTH9'", "--smtp-mechanisms", "PLAIN,XOAUTH9")
        self.assertUsage("--smtp-mechanism 'CRAM': expected NAME=dotted.Name", "--smtp-mechanism", "CRAM")
        self.assertUsage("--smtp-trusted-network 'ten'", "--smtp-trusted-network", "ten")
        self.assertUsage("--smtp-max-size '0'", "--smtp-max-size", "0")

    def test_no_secret_in_errors(self):
        message = self.assertUsage("--auth memory:", auth=("--auth", "memory:daniel:tiger:odd"))
        self.assertNotIn("tiger", message)

    def test_no_backend(self):
        self.assertUsage("no authentication backend", auth=())

    def test_data_dir_unusable(self):
        blocker = self.mktemp()
        open(blocker, "w").close()
        options = tap.Options()
        e = self.assertRaises(
            usage.UsageError,
            options.parseOptions,
            ["--data-dir", os.path.join(blocker, "d"), "--auth", "memory:a:b"],
        )
        self.assertIn("--data-dir", str(e))

    def test_one_line_under_twistd(self):
        """As a twistd subcommand, a usage error exits with one line, not the help text."""
        options = tap.Options()
        options.parent = object()
        e = self.assertRaises(SystemExit, options.parseOptions, ["--auth", "bogus:x"])
        self.assertTrue(str(e.code).startswith("twistd authgateway: error: --auth bogus:"))


class RelayOptionsTests(SynchronousTestCase):
    """The --relay* options: durations, the settings they build, their checks."""

    parse = OptionsTests.parse
    assertUsage = OptionsTests.assertUsage

    def test_durations(self):
        self.assertEqual([tap.parse_duration(t) for t in ("90", "90s", "5m", "1.5h", "5d", " 2M ")],
                         [90, 90, 300, 5400, 432000, 120])
        for bad in ("", "m", "0", "-1m", "1w", "nan", "infs", "1e999d"):
            self.assertRaises(ValueError, tap.parse_duration, bad)
        for seconds in (1, 59, 60, 90, 300, 3600, 5400, 86400, 432000, 0.5):
            self.assertEqual(tap.parse_duration(tap.format_duration(seconds)), seconds)
        self.assertEqual(tap.format_duration(3600), "1h")

    def test_defaults(self):
        """Without --relay there is no delivery (messages stay for a consumer)."""
        options = self.parse()
        self.assertIsNone(options["deliverySettings"])
        self.assertEqual((options["relay-retry"], options["relay-max-age"]), ("1m,5m,15m,1h", "5d"))

    def test_relay(self):
        """--relay (repeatable, in order) and its companions make the delivery settings."""
        from gateway.smtp.relay import RelayAuth
        from gateway.tls import ensure_certificate

        ca, _, certificate = ensure_certificate(self.mktemp())
        password = self.mktemp()
        with open(password, "w") as f:
            f.write("tiger\nignored\n")
        options = self.parse(
            "--smtp-hostname", "gw.example",
            "--relay", "smtp://mail.example.net:587", "--relay", "lmtp:///run/lmtp.sock",
            "--relay-ca", ca, "--relay-auth", f"gateway:{password}",
            "--relay-connections", "2", "--relay-retry", "30s,2m", "--relay-max-age", "1d",
            "--relay-timeout", "60", "--relay-inflow-delay", "0",
        )
        settings = options["deliverySettings"]
        self.assertEqual([t.url for t in settings.relay.targets],
                         ["smtp://mail.example.net:587", "lmtp:///run/lmtp.sock"])
        self.assertEqual(settings.relay.auth, RelayAuth("gateway", "tiger"))
        self.assertEqual([c.digest() for c in settings.relay.ca], [certificate.leaf.digest()])
        self.assertEqual((settings.relay.helo, settings.relay.command_timeout), ("gw.example", 60))
        self.assertEqual((settings.connections, settings.retry, settings.max_age),
                         (2, (30.0, 120.0), 86400.0))
        self.assertEqual(settings.inflow_delay, 0.0)
        self.assertEqual(tap.Options().defaults["relay-inflow-delay"], 1.0)
        defaults = self.parse("--relay", "smtps://mail.example.net")["deliverySettings"]
        self.assertEqual((defaults.relay.ca, defaults.relay.auth), (None, None))
        self.assertEqual((defaults.connections, defaults.retry, defaults.max_age),
                         (4, (60.0, 300.0, 900.0, 3600.0), 432000.0))
        self.assertEqual(defaults.relay.command_timeout, tap.Options().defaults["relay-timeout"])

    def test_bad_relay(self):
        """Bad relay options stop the start with one line, never echoing a password."""
        message = self.assertUsage("--relay URL: no user or password in the URL",
                                   "--relay", "smtp://u:tiger@mail.example.net")
        self.assertNotIn("tiger", message)
        self.assertUsage("--relay URL: the scheme must be", "--relay", "http://mail.example.net")
        self.assertUsage("--relay-ca: cannot load CA file", "--relay", "smtp://m.example",
                         "--relay-ca", self.mktemp())
        self.assertUsage("--relay-auth takes USER:FILE", "--relay", "smtp://m.example",
                         "--relay-auth", "gateway")

    def test_bad(self):
        self.assertUsage("--relay-retry: '1x' is not a duration", "--relay-retry", "1m,1x")
        self.assertUsage("--relay-max-age: '0' is not a duration", "--relay-max-age", "0")
        self.assertUsage("--relay-connections '0'", "--relay-connections", "0")
        self.assertUsage("--relay-ca needs --relay", "--relay-ca", "ca.pem")
        self.assertUsage("--relay-auth needs --relay", "--relay-auth", "u:file")


class MakeServiceTests(SynchronousTestCase):
    def test_service(self):
        options = tap.Options()
        options.parseOptions(["--data-dir", self.mktemp(), "--auth", "memory:a:b"])
        reactor = MemoryReactorClock()
        keep_signal_handlers(self)
        svc = tap.makeService(options, reactor=reactor)
        self.assertIsInstance(svc, MultiService)
        self.assertEqual(svc.core.data_dir, os.path.abspath(options["data-dir"]))
        self.addCleanup(svc.stopService)
        svc.startService()
        self.assertTrue(svc.running)
        listening = {port: (factory, interface) for port, factory, _, interface in reactor.tcpServers}
        self.assertEqual(sorted(listening), [1080, 2525, 8080])  # default --socks, --smtp, --http
        self.assertEqual({interface for _, interface in listening.values()}, {"127.0.0.1"})
        inner = {port: factory.wrappedFactory for port, (factory, _) in listening.items()}
        self.assertIsInstance(inner[2525], SubmissionFactory)
        self.assertIsInstance(inner[8080], GatewaySite)
        self.assertIsInstance(inner[1080], SOCKSFactory)


class DeliveryWiringTests(SynchronousTestCase):
    def test_delivery_service(self):
        """With --relay, makeService runs a Delivery on the core's spool, before the listeners."""
        from gateway.smtp.delivery import Delivery

        options = tap.Options()
        options.parseOptions(["--data-dir", self.mktemp(), "--auth", "memory:a:b",
                              "--smtp-hostname", "gw.example", "--relay", "smtp://m.example"])
        keep_signal_handlers(self)
        svc = tap.makeService(options, reactor=MemoryReactorClock())
        [delivery] = [s for s in svc if isinstance(s, Delivery)]
        self.assertIs(delivery.spool, svc.core.spool)
        self.assertEqual(delivery.queue.directory, svc.core.spool.directory)
        self.assertEqual((delivery.hostname, delivery.settings), ("gw.example", options["deliverySettings"]))
        self.assertLess(list(svc).index(delivery), len(svc.core.services))

    def test_no_delivery_without_relay(self):
        from gateway.smtp.delivery import Delivery

        options = tap.Options()
        options.parseOptions(["--data-dir", self.mktemp(), "--auth", "memory:a:b"])
        keep_signal_handlers(self)
        svc = tap.makeService(options, reactor=MemoryReactorClock())
        self.assertEqual([s for s in svc if isinstance(s, Delivery)], [])


class FrontDoorTableTests(SynchronousTestCase):
    """
    Implicit TLS follows the table's row, never the listener's name: a door
    listening under any name wraps its factory in TLS exactly when given a
    context, and its sessions carry the name it was given.
    """

    def test_tls_from_the_row(self):
        from twisted.protocols.tls import TLSMemoryBIOFactory

        options = tap.Options()
        options.parseOptions(["--data-dir", self.mktemp(), "--auth", "memory:a:b"])
        core = tap.build_core(options["coreSettings"], MemoryReactorClock())
        context = core.certificate.options()
        for name, (make, settings) in tap.DOORS.items():
            door = make(core, options[settings])
            for tls in (None, context):
                factory = door.listen(None, "custom", tls).factory
                self.assertEqual(factory.listener, "custom")
                self.assertEqual(
                    isinstance(factory.wrappedFactory, TLSMemoryBIOFactory), tls is not None,
                    (name, tls),
                )

    def test_rows(self):
        """Each TLS listener is served by the same door as its plain twin."""
        rows = {row.option: row for row in tap.FRONT_DOORS}
        for plain, secure in (("smtp", "smtps"), ("http", "https"), ("socks", "socks-tls")):
            self.assertEqual(rows[plain].door, rows[secure].door)
            self.assertEqual((rows[plain].implicit_tls, rows[secure].implicit_tls), (False, True))
        self.assertEqual(set(tap.DOORS), {row.door for row in tap.FRONT_DOORS})


class PipelineWiringTests(TestCase):
    """The service owns the hash pool; htpasswd checkers verify through it."""

    def setUp(self):
        self.htpasswd = self.mktemp()
        atomic_write(self.htpasswd, f"daniel:{hashes.make_hash('tiger', 'bcrypt', cost=4)}\n")

    def options(self, *args):
        options = tap.Options()
        options.parseOptions(
            ["--data-dir", self.mktemp(), "--smtp", "none", "--auth", f"htpasswd:{self.htpasswd}",
             *args]
        )
        return options

    def test_pipeline_options(self):
        options = self.options(
            "--hash-threads", "3", "--hash-queue", "7", "--cache-ttl", "0", "--cache-size", "5",
            "--max-failures", "2", "--failure-window", "9", "--failure-delay", "0",
            "--failure-delay-max", "0", "--throttle-keys", "11",
        )
        core = tap.build_core(options["coreSettings"], reactor=task.Clock())
        self.assertEqual(core.hash_pool.threadpool.max, 3)
        self.assertEqual(core.hash_pool.max_pending, 7)
        self.assertEqual((core.verifier.ttl, core.verifier.max_entries), (0, 5))
        self.assertEqual(
            (core.throttle.max_failures, core.throttle.window, core.throttle.max_keys), (2, 9, 11)
        )
        [checker] = options["credCheckers"]
        self.assertIs(checker.verifier, core.verifier)

    def test_bad_pipeline_options(self):
        for args, words in [
            (("--hash-queue", "0"), "--hash-queue '0': must be a whole number > 0"),
            (("--cache-ttl", "soon"), "--cache-ttl 'soon': must be a number >= 0"),
            (("--failure-delay", "2", "--failure-delay-max", "1"), "--failure-delay-max must not"),
        ]:
            e = self.assertRaises(usage.UsageError, self.options, *args)
            self.assertIn(words, str(e))

    @defer.inlineCallbacks
    def test_verification_off_the_reactor_thread(self):
        keep_signal_handlers(self)
        svc = tap.makeService(self.options(), reactor=reactor)
        svc.startService()
        self.addCleanup(svc.stopService)
        self.assertTrue(svc.core.hash_pool.running)
        threads_seen = []
        verify = svc.core.verifier._verify
        svc.core.verifier._verify = lambda *a: threads_seen.append(threading.current_thread()) or verify(*a)
        _, info, _ = yield login(svc.core.portal, testing.http_basic("daniel", "tiger"))
        self.assertEqual(info.names(), {"daniel"})
        self.assertNotIn(threading.main_thread(), threads_seen)
        self.assertEqual(len(threads_seen), 1)
        yield login(svc.core.portal, testing.http_basic("daniel", "tiger"))
        self.assertEqual(len(threads_seen), 1)  # cached
        self.assertEqual(svc.core.verifier.hits, 1)


def _require_twistd():
    if not os.path.exists(TWISTD):
        if os.environ.get("CI") == "true":
            raise AssertionError(f"{TWISTD} is missing")
        raise SkipTest(f"no twistd next to {sys.executable}")


class TwistdProcessTests(SynchronousTestCase):
    """The real C{twistd authgateway}, run from an empty directory."""

    def run_twistd(self, *args, logfile="-"):
        _require_twistd()
        self.cwd = os.path.abspath(self.mktemp())
        os.makedirs(self.cwd)
        proc = subprocess.Popen(
            [TWISTD, "--pidfile=", "-n", f"--logfile={logfile}", "authgateway", *args],
            cwd=self.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        return proc

    def wait_for_log(self, proc, path, text, timeout=30):
        """Poll the log file until C{text} appears, the process ends, or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    if text in f.read():
                        return
            time.sleep(0.05)
        proc.kill()
        out, err = proc.communicate(timeout=30)
        log = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
        self.fail(f"{text!r} not logged within {timeout}s:\n{log}{out}{err}")

    def test_start_and_sigterm(self):
        data = os.path.abspath(self.mktemp())
        log = os.path.abspath(self.mktemp())
        proc = self.run_twistd("--auth", "memory:daniel:tiger", "--data-dir", data,
                               "--smtp", "none", "--http", "none", "--socks", "none",
                               logfile=log)
        self.wait_for_log(proc, log, "authgateway started")
        self.assertTrue(os.path.isfile(os.path.join(data, "tls", "cert.pem")))
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        with open(log, encoding="utf-8") as f:
            logged = f.read()
        # Twisted >= 19.7 re-raises the stopping signal once shut down cleanly.
        self.assertIn(proc.returncode, (0, -signal.SIGTERM), logged + out + err)
        self.assertIn("Server Shut Down", logged)
        self.assertIn("Main loop terminated", logged)
        self.assertNotIn("Traceback", logged + out + err)
        self.assertNotIn("tiger", logged + out + err)

    def test_bad_option_one_line(self):
        proc = self.run_twistd("--auth", "bogus:x")
        out, err = proc.communicate(timeout=60)
        self.assertNotEqual(proc.returncode, 0)
        self.assertEqual(out, "")
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn("--auth bogus: unknown auth type", err)

    def test_help(self):
        proc = self.run_twistd("--help")
        out, err = proc.communicate(timeout=60)
        self.assertEqual(proc.returncode, 0, err)
        for option in ("--smtp=", "--smtps=", "--http=", "--socks=", "--auth=", "--checker=",
                       "--groups=", "--acl=", "--tls-cert=", "--tls-key=", "--data-dir="):
            self.assertIn(option, out)
