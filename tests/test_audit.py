"""
Tests for L{gateway.ops.audit}: the schema and order of the JSON lines, one
event per line whatever a client sent, capped fields, the file (mode,
append, reopen on SIGUSR1), a failing disk that costs events but never a
login, standard output, and the wiring into C{twistd authgateway}.
"""

from __future__ import annotations

import errno
import json
import os
import signal

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from gateway import tap, testing
from gateway.acl import AllowAuthenticated, Policy, ask, may_send_as, written_grant
from gateway.authinfo import AuthInfo, Identity, IdentityContext
from gateway.ops import audit
from gateway.ops.audit import AuditLog, attach_audit_log, authz_line, login_line
from gateway.fileio import reason
from gateway.events import AuthzEvent, Events, LoginEvent
from tests.support import file_mode, keep_signal_handlers, read_file

#: 2026-11-26T11:40:01.123Z
WHEN = 1795693201.123

SESSION = AuthInfo(
    identities=(Identity("daniel", IdentityContext.HttpBasicAuth),),
    groups=("staff",),
    peer_address="192.0.2.7",
)


def login_event(**changes) -> LoginEvent:
    fields = dict(
        time=WHEN, protocol="smtp", listener="smtps", mechanism="PLAIN", identity="daniel",
        outcome="failure", reason="invalid_credentials", peer_address="192.0.2.7",
        peer_port=40123, tls=True, duration=0.0123456, auth_info=None,
    )
    fields.update(changes)
    return LoginEvent(**fields)


def authz_event(**changes) -> AuthzEvent:
    fields = dict(
        time=WHEN, protocol="http", listener="https", resource="http/app.example/admin",
        privilege="get", allowed=False, auth_info=SESSION, peer_address="192.0.2.7",
        peer_port=40124, tls=True,
    )
    fields.update(changes)
    return AuthzEvent(**fields)


def login_record(event: LoginEvent) -> dict:
    return json.loads(login_line(event))


def authz_record(event: AuthzEvent) -> dict:
    return json.loads(authz_line(event))


def lines(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode("ascii").splitlines()]


class RecordTests(SynchronousTestCase):
    """The schema: keys, their order and types."""

    def test_login_failure(self) -> None:
        line = login_line((login_event()))
        self.assertEqual(
            line,
            b'{"time": "2026-11-26T11:40:01.123Z", "event": "login", "outcome": "failure",'
            b' "reason": "invalid_credentials", "protocol": "smtp", "listener": "smtps",'
            b' "peer_address": "192.0.2.7", "peer_network": "192.0.2.7", "peer_port": 40123,'
            b' "tls": true,'
            b' "mechanism": "PLAIN", "identity": "daniel", "identities": null,'
            b' "groups": null, "duration_ms": 12.346, "client_left": false}\n',
        )

    def test_login_success(self) -> None:
        record = login_record(login_event(outcome="success", reason="ok", auth_info=SESSION))
        self.assertEqual(record["identities"], [{"identity": "daniel", "context": "HttpBasicAuth"}])
        self.assertEqual(record["groups"], ["staff"])

    def test_authz(self) -> None:
        record = authz_record(authz_event())
        self.assertEqual(list(record), [
            "time", "event", "outcome", "protocol", "listener", "peer_address", "peer_network",
            "peer_port", "tls", "identities", "groups", "resource", "privilege", "allowed",
        ])
        self.assertEqual(
            (record["event"], record["outcome"], record["resource"], record["privilege"],
             record["allowed"], record["listener"]),
            ("authz", "denied", "http/app.example/admin", "get", False, "https"),
        )
        self.assertEqual(authz_record(authz_event(allowed=True))["outcome"], "allowed")

    def test_authz_without_session(self) -> None:
        """A SOCKS client without login: empty identities, not null."""
        record = authz_record(authz_event(auth_info=AuthInfo()))
        self.assertEqual((record["identities"], record["groups"]), ([], []))

    def test_unknown_connection(self) -> None:
        """A login with no ConnectionMeta (a user's own wiring): nulls."""
        record = login_record(login_event(protocol=None, listener=None, peer_address=None,
                                          peer_port=None, tls=None, mechanism=None, identity=None))
        self.assertEqual({k: record[k] for k in ("protocol", "peer_address", "tls", "identity")},
                         dict.fromkeys(("protocol", "peer_address", "tls", "identity")))

    def test_peer_network(self) -> None:
        """
        The throttle's key of the peer, before any text a client chose: an
        IPv6 peer's /64 (what fail2ban bans), an IPv4 (or IPv4-mapped) peer's
        address, null without an IP address.
        """
        cases = {
            "2001:db8:1:2::7": "2001:db8:1:2::/64",
            "2001:DB8:1:2:ffff:1:2:3": "2001:db8:1:2::/64",
            "fe80::1%eth0": "fe80::/64",
            "::ffff:192.0.2.7": "192.0.2.7",
            "192.0.2.7": "192.0.2.7",
            "/run/authgateway.sock": None,
            None: None,
        }
        for address, network in cases.items():
            for line in (login_line(login_event(peer_address=address)),
                         authz_line(authz_event(peer_address=address))):
                record = json.loads(line)
                self.assertEqual(record["peer_network"], network, address)
                keys = list(record)
                self.assertEqual(keys.index("peer_network"), keys.index("peer_address") + 1)
        self.assertLess(login_line(login_event()).index(b'"peer_network"'),
                        login_line(login_event()).index(b'"identity"'))

    def test_time(self) -> None:
        self.assertEqual(login_record(login_event(time=0.0))["time"], "1970-01-01T00:00:00.000Z")
        self.assertEqual(login_record(login_event(time=WHEN + 0.0009))["time"],
                         "2026-11-26T11:40:01.124Z")


class EscapingTests(SynchronousTestCase):
    """One event is one line of printable ASCII, whatever a client sent."""

    def assertOneLine(self, line: bytes) -> dict:
        self.assertTrue(line.endswith(b"\n"))
        self.assertNotIn(b"\n", line[:-1])
        self.assertNotIn(b"\r", line)
        self.assertTrue(all(0x20 <= b < 0x7F for b in line[:-1]), line)
        record = json.loads(line)
        # Formatted by hand, exactly as json.dumps would (the filter relies on ", " and ": ").
        self.assertEqual(line, json.dumps(record).encode() + b"\n")
        return record

    def test_hostile_identity(self) -> None:
        hostile = 'x"\n{"time": "2026", "peer_address": "203.0.113.9"}\r\x00\x1b[31m\u2028\u00e9\udcff'
        record = self.assertOneLine(login_line((login_event(identity=hostile))))
        self.assertEqual(record["identity"], hostile)
        self.assertEqual(record["peer_address"], "192.0.2.7")

    def test_odd_values(self) -> None:
        """A user's checker or door may hand over odd types: still one valid line."""
        record = self.assertOneLine(login_line(login_event(
            peer_port="40123", tls=None, duration=float("inf"), identity=42,
            auth_info=AuthInfo(identities=(Identity("b\u00f6b", IdentityContext.GenericAuth),),
                               groups=("caf\u00e9",)),
        )))
        self.assertEqual((record["peer_port"], record["tls"], record["duration_ms"], record["identity"]),
                         (None, None, None, "42"))
        self.assertEqual((record["identities"][0]["identity"], record["groups"]), ("b\u00f6b", ["caf\u00e9"]))

    def test_bytes_identity(self) -> None:
        """Bytes (a user's checker or door) are decoded, undecodable bytes escaped."""
        record = self.assertOneLine(login_line((login_event(identity=b"b\xffob"))))
        self.assertEqual(record["identity"], "b\\xffob")

    @given(st.text(max_size=400), st.text(max_size=40))
    def test_any_text(self, identity: str, resource: str) -> None:
        record = self.assertOneLine(login_line((login_event(identity=identity))))
        self.assertEqual(record["identity"], identity[: audit.MAX_TEXT])
        self.assertEqual("truncated" in record, len(identity) > audit.MAX_TEXT)
        record = self.assertOneLine(authz_line((authz_event(resource=resource))))
        self.assertEqual(record["resource"], resource)


class TruncationTests(SynchronousTestCase):
    def test_long_identity(self) -> None:
        record = login_record(login_event(identity="a" * 10_000))
        self.assertEqual(record["identity"], "a" * audit.MAX_TEXT)
        self.assertEqual(record["truncated"], ["identity"])
        self.assertEqual(list(record)[-1], "truncated")

    def test_long_resource_and_many_groups(self) -> None:
        info = AuthInfo(
            identities=(Identity("d" * 300, IdentityContext.BearerToken),),
            groups=tuple(f"g{i}" for i in range(100)),
        )
        record = authz_record(authz_event(resource="http/" + "x" * 1000, auth_info=info))
        self.assertEqual(len(record["resource"]), audit.MAX_TEXT)
        self.assertEqual(len(record["groups"]), audit.MAX_ITEMS)
        self.assertEqual(len(record["identities"][0]["identity"]), audit.MAX_TEXT)
        self.assertEqual(sorted(record["truncated"]), ["groups", "identities", "resource"])

    def test_short_fields_not_marked(self) -> None:
        self.assertNotIn("truncated", login_record(login_event(identity="a" * audit.MAX_TEXT)))

    def test_cut_fields_marked_every_time(self) -> None:
        """A fragment formatted once (L{audit._cached}) still names what it cut on every line."""
        event = login_event(listener="l" * 1000, peer_address=None)
        for _ in range(3):
            record = login_record(event)
            self.assertEqual(record["truncated"], ["listener"])
            self.assertEqual(record["listener"], "l" * audit.MAX_TEXT)


class FragmentTests(SynchronousTestCase):
    def test_bounded(self) -> None:
        """Peers and sessions without end never grow the fragments past L{MAX_FRAGMENTS}."""
        for i in range(audit.MAX_FRAGMENTS + 10):
            info = AuthInfo(identities=(Identity(f"user{i}", IdentityContext.HttpBasicAuth),))
            login_line(login_event(auth_info=info, peer_address=f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"))
            self.assertLessEqual(len(audit._FRAGMENTS), audit.MAX_FRAGMENTS)

    def test_same_line_as_formatted_afresh(self) -> None:
        event = login_event()
        first = login_line(event)
        audit._FRAGMENTS.clear()
        self.assertEqual(login_line(event), first)
        self.assertEqual(login_line(event), first)


class BatchTests(SynchronousTestCase):
    """With a reactor, the events of a turn are written together at its end."""

    def setUp(self) -> None:
        self.writes: list[bytes] = []
        self.reactor = MemoryReactorClock()
        self.log = AuditLog(
            "-", write=lambda fd, data: self.writes.append(bytes(data)) or len(data),
            reactor=self.reactor,
        )
        self.log.startService()

    def test_one_write_per_turn(self) -> None:
        self.log.login(login_event())
        self.log.authz(authz_event())
        self.assertEqual(self.writes, [])
        self.reactor.advance(0)
        self.assertEqual(len(self.writes), 1)
        self.assertEqual([r["event"] for r in lines(self.writes[0])], ["login", "authz"])
        self.assertEqual(self.log.written, 2)

    def test_bounded_batch(self) -> None:
        for _ in range(audit.MAX_BATCH):
            self.log.login(login_event())
        self.assertEqual(len(self.writes), 1)
        self.assertEqual(len(lines(self.writes[0])), audit.MAX_BATCH)

    def test_stop_writes_the_batch(self) -> None:
        self.log.login(login_event())
        self.log.stopService()
        self.assertEqual(len(lines(b"".join(self.writes))), 1)
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class Captured:
    """Log events of the global publisher during a test."""

    def __init__(self, test: SynchronousTestCase) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        test.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def texts(self) -> list[str]:
        return [formatEvent(e) for e in self.events if "audit" in formatEvent(e)]


class FileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.mkdir(self.directory)
        self.path = os.path.join(self.directory, "audit.log")

    def started(self, **kwargs) -> AuditLog:
        log = AuditLog(self.path, **kwargs)
        log.startService()
        self.addCleanup(lambda: log.running and log.stopService())
        return log

    def test_written_at_once(self) -> None:
        """Each event is in the file when the call returns: nothing is buffered."""
        log = self.started()
        log.login(login_event())
        self.assertEqual(lines(read_file(self.path))[0]["outcome"], "failure")
        log.authz(authz_event())
        self.assertEqual([r["event"] for r in lines(read_file(self.path))], ["login", "authz"])

    def test_mode_and_append(self) -> None:
        """A new file is 0640 (under the usual umask 022); an existing one is appended to."""
        previous = os.umask(0o022)
        self.addCleanup(os.umask, previous)
        log = self.started()
        self.assertEqual(file_mode(self.path), audit.MODE)
        log.login(login_event())
        log.stopService()
        self.started().login(login_event(outcome="success", reason="ok"))
        self.assertEqual([r["outcome"] for r in lines(read_file(self.path))], ["failure", "success"])

    def test_reopen(self) -> None:
        """After a rotation moved the file, reopen writes to a new one at the path."""
        captured = Captured(self)
        log = self.started()
        log.login(login_event(identity="before"))
        os.rename(self.path, self.path + ".1")
        log.login(login_event(identity="moved"))  # still the old descriptor
        log.reopen()
        log.login(login_event(identity="after"))
        self.assertEqual([r["identity"] for r in lines(read_file(self.path + ".1"))],
                         ["before", "moved"])
        self.assertEqual([r["identity"] for r in lines(read_file(self.path))], ["after"])
        self.assertIn(f"audit log {self.path} reopened", captured.texts())

    def test_reopen_failure_keeps_the_old_file(self) -> None:
        captured = Captured(self)
        log = self.started()
        os.rename(self.path, self.path + ".1")
        os.mkdir(self.path)  # nothing can be opened there now
        log.reopen()
        log.login(login_event())
        self.assertEqual(len(lines(read_file(self.path + ".1"))), 1)
        self.assertEqual(len(captured.texts()), 1)
        self.assertIn("cannot open", captured.texts()[0])

    def test_not_a_regular_file(self) -> None:
        """
        A FIFO, or a link to a device, is refused before it is opened (a
        write could block for ever), saying so; the gateway does not start
        without the audit log asked for (it used to run on, events lost).
        """
        os.mkfifo(self.path)
        link = os.path.join(self.directory, "null.log")
        os.symlink(os.devnull, link)
        for path in (self.path, link):
            e = self.assertRaises(OSError, audit.open_log, path)
            self.assertEqual(reason(e), "not a regular file")
            e = self.assertRaises(ValueError, audit.check_path, path)
            self.assertEqual(str(e), f"{path}: not a regular file")
            log = AuditLog(path)
            e = self.assertRaises(audit.AuditLogUnavailable, log.startService)
            self.assertEqual(str(e), f"twistd authgateway: error: --audit-log {path}:"
                                     " cannot open: not a regular file")
            self.assertFalse(log.running)

    def test_cannot_open_at_start(self) -> None:
        """Passed check_path, then cannot be opened (a dangling link): a SystemExit."""
        os.symlink(os.path.join(self.directory, "missing", "audit.log"), self.path)
        audit.check_path(self.path)
        e = self.assertRaises(SystemExit, AuditLog(self.path).startService)
        self.assertIn("cannot open: No such file or directory", str(e))

    def test_mode_whatever_the_umask(self) -> None:
        """A unit's UMask=0077 must not make a new log unreadable to its readers' group."""
        previous = os.umask(0o077)
        self.addCleanup(os.umask, previous)
        self.started()
        self.assertEqual(file_mode(self.path), audit.MODE)
        os.chmod(self.path, 0o600)  # an existing file keeps its mode
        log = AuditLog(self.path)
        log.startService()
        log.stopService()
        self.assertEqual(file_mode(self.path), 0o600)

    def test_stopped(self) -> None:
        """Events before start or after stop are not written (the file is closed)."""
        log = AuditLog(self.path)
        log.login(login_event())
        log.startService()
        log.stopService()
        log.login(login_event())
        self.assertEqual(read_file(self.path), b"")

    def test_write_failure(self) -> None:
        """
        ENOSPC: no exception reaches the login, one line for the episode,
        and one when writing works again, with the count lost.
        """
        captured = Captured(self)
        full = [True]

        def write(fd, data):
            if full[0]:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return os.write(fd, data)

        log = self.started(write=write)
        for _ in range(5):
            log.login(login_event())
        full[0] = False
        log.login(login_event(identity="back"))
        self.assertEqual([r["identity"] for r in lines(read_file(self.path))], ["back"])
        self.assertEqual((log.lost, log.written), (5, 1))
        self.assertEqual(captured.texts(), [
            f"audit log {self.path}: cannot write: No space left on device;"
            " events are lost until it can",
            f"audit log {self.path}: writing again, 5 events were lost",
        ])

    def test_partial_write(self) -> None:
        """A line cut by a full disk is ended before the next one: every whole line parses."""
        calls = []

        def write(fd, data):
            calls.append(len(data))
            if len(calls) == 1:
                return os.write(fd, bytes(data[:10]))
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, "full")
            return os.write(fd, data)

        log = self.started(write=write)
        log.login(login_event(identity="cut"))
        log.login(login_event(identity="whole"))
        broken, whole = read_file(self.path).split(b"\n")[:2]
        self.assertEqual(len(broken), 10)
        self.assertEqual(json.loads(whole)["identity"], "whole")

    def test_bug_never_reaches_the_login(self) -> None:
        class Broken:
            @property
            def identities(self):
                raise RuntimeError("bug")

        captured = Captured(self)
        log = self.started()
        log.login(login_event(outcome="success", reason="ok", auth_info=Broken()))
        log.login(login_event(outcome="success", reason="ok", auth_info=Broken()))
        self.assertEqual(log.lost, 2)
        self.assertEqual(len(captured.texts()), 1)  # rate-limited
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_stdout(self) -> None:
        """C{-}: lines go to descriptor 1 itself, which stop never closes."""
        written = []
        log = AuditLog("-", write=lambda fd, data: written.append((fd, bytes(data))) or len(data))
        log.startService()
        log.login(login_event())
        log.reopen()  # nothing to reopen
        log.stopService()
        [(fd, line)] = written
        self.assertEqual((fd, json.loads(line)["event"]), (1, "login"))
        os.fstat(1)  # still open

    def test_event_after_stop_counted_lost(self) -> None:
        """An event arriving once the log has stopped is not written, but counted lost."""
        log = self.started()
        log.stopService()
        log.login(login_event())
        log.authz(authz_event())
        self.assertEqual((log.written, log.lost), (0, 2))

    def test_check_path(self) -> None:
        audit.check_path("-")
        audit.check_path(self.path)  # a new file in a writable directory
        self.assertFalse(os.path.exists(self.path))  # not created by the check
        e = self.assertRaises(ValueError, audit.check_path,
                              os.path.join(self.directory, "missing", "audit.log"))
        self.assertIn("no such directory", str(e))
        self.assertRaises(ValueError, audit.check_path, self.directory)


class PolicyEventTests(SynchronousTestCase):
    """Authorization decisions reach the sinks with the connection's facts."""

    ACL = """
        [[acl."smtp/sender/example.com/daniel"]]
        allow = true
        identity = { Individual = "daniel" }
        privileges = ["send"]

        [[acl."http"]]
        allow = true
        identity = { Individual = "daniel" }
        privileges = ["get"]
    """

    def setUp(self) -> None:
        self.events = Events()
        self.decisions: list[AuthzEvent] = []
        self.events.add(type("Sink", (), {
            "login": lambda s, e: None, "authz": lambda s, e: self.decisions.append(e),
        })())
        self.policy = Policy(testing.policy(self.ACL), self.events)
        self.meta = testing.conn_meta("smtp", "198.51.100.3", listener="smtps")
        self.daniel = AuthInfo(identities=(Identity("daniel", IdentityContext.SmtpAuthPlainAuthentication),))

    def test_ask_passes_meta(self) -> None:
        self.assertTrue(ask(self.policy, self.daniel, "http/app.example/x", "get", self.meta))
        [event] = self.decisions
        self.assertEqual((event.listener, event.peer_address, event.peer_port, event.tls, event.allowed),
                         ("smtps", "198.51.100.3", 49152, True, True))

    def test_ask_any_policy(self) -> None:
        """A policy of the interface alone (a test's, a user's) is asked without meta."""
        self.assertTrue(ask(AllowAuthenticated(), self.daniel, "http", "get", self.meta))
        self.assertEqual(self.decisions, [])

    def test_sender_binding_published(self) -> None:
        self.assertTrue(may_send_as(self.policy, self.daniel, "daniel@example.com", self.meta))
        self.assertFalse(may_send_as(self.policy, self.daniel, "ceo@example.com", self.meta))
        self.assertEqual(
            [(e.resource, e.privilege, e.allowed, e.listener) for e in self.decisions],
            [("smtp/sender/example.com/daniel", "send", True, "smtps"),
             ("smtp/sender/example.com/ceo", "send", False, "smtps")],
        )

    def test_written_grant_without_policy_wrapper(self) -> None:
        """The bare ACL (no hub) decides the same and publishes nothing."""
        self.assertTrue(written_grant(self.policy.current, self.daniel,
                                      "smtp/sender/example.com/daniel", "send"))
        self.assertEqual(self.decisions, [])

    def test_into_the_log(self) -> None:
        path = os.path.abspath(self.mktemp())
        log = AuditLog(path)
        self.events.add(log)
        log.startService()
        self.addCleanup(log.stopService)
        may_send_as(self.policy, self.daniel, "ceo@example.com", self.meta)
        [record] = lines(read_file(path))
        self.assertEqual(
            {k: record[k] for k in ("event", "outcome", "listener", "resource", "identities")},
            {"event": "authz", "outcome": "denied", "listener": "smtps",
             "resource": "smtp/sender/example.com/ceo",
             "identities": [{"identity": "daniel", "context": "SmtpAuthPlainAuthentication"}]},
        )


class FakeReactor:
    """callWhenRunning at once; callFromThread records."""

    def __init__(self) -> None:
        self.called: list = []

    def callWhenRunning(self, f, *args):
        f(*args)

    def callFromThread(self, f, *args):
        self.called.append(f)


class WiringTests(SynchronousTestCase):
    def options(self, *args: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(["--data-dir", self.mktemp(), "--auth", "memory:a:b", *args])
        return options

    def test_default_none(self) -> None:
        options = self.options()
        self.assertIsNone(options["audit-log"])
        keep_signal_handlers(self)
        svc = tap.makeService(options, reactor=MemoryReactorClock())
        self.assertEqual([s for s in svc if isinstance(s, AuditLog)], [])
        self.assertEqual(svc.core.events.sinks, [])

    def test_attached(self) -> None:
        """A sink of the hub and a core service (started before, stopped after the listeners)."""
        path = os.path.abspath(self.mktemp())
        keep_signal_handlers(self)
        reactor = MemoryReactorClock()
        svc = tap.makeService(self.options("--audit-log", path), reactor=reactor)
        [log] = [s for s in svc if isinstance(s, AuditLog)]
        self.assertIn(log, svc.core.events.sinks)
        self.assertLess(list(svc).index(log), len(svc.core.services))
        svc.startService()
        self.assertTrue(os.path.exists(path))
        stopping = svc.stopService()
        self.assertFalse(svc.core.hash_pool.running)
        self.assertTrue(log.running)  # stopped after the other core services, a turn later
        reactor.advance(0)
        self.successResultOf(stopping)
        self.assertFalse(log.running)

    def test_bad_path(self) -> None:
        e = self.assertRaises(usage.UsageError, self.options,
                              "--audit-log", os.path.join(self.mktemp(), "x", "audit.log"))
        self.assertIn("--audit-log", str(e))
        self.assertIn("no such directory", str(e))

    def test_sigusr1_reopens_and_chains(self) -> None:
        """SIGUSR1 schedules the reopen in the reactor thread, then calls twistd's handler."""
        previous_calls = []
        original = signal.signal(signal.SIGUSR1, lambda n, f: previous_calls.append(n))
        self.addCleanup(signal.signal, signal.SIGUSR1, original)
        reactor = FakeReactor()
        core = type("Core", (), {"events": Events(), "reactor": reactor, "services": []})()
        core.attach = core.services.append
        log = attach_audit_log(core, os.path.abspath(self.mktemp()))
        self.assertEqual((core.events.sinks, core.services), ([log], [log]))
        signal.getsignal(signal.SIGUSR1)(signal.SIGUSR1, None)
        self.assertEqual(reactor.called, [log.reopen])
        self.assertEqual(previous_calls, [signal.SIGUSR1])
        self.assertIsNone(attach_audit_log(core, None))
