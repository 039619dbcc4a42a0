"""
Tests for L{gateway.events} as L{gateway.realm.login} feeds it: one
L{LoginEvent} per attempt, with the outcome and reason code of every way a
login ends, the connection's facts, the session on success, and no secret.
"""

from __future__ import annotations

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.cred.portal import Portal
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from gateway import testing
from gateway.authinfo import IAuthInfo
from gateway.checkers import CallableChecker
from gateway.checkers.throttle import Throttle
from gateway.errors import (
    Abandoned,
    AuthBackendError,
    PoolFull,
    Reject,
    ShuttingDown,
    TemporaryFailure,
    Throttled,
)
from gateway.events import REASONS, Events, LoginEvent, meta_fields
from gateway.realm import Realm, classify, login, make_portal
from tests.support import FixedChecker

SECRET = "s3cret-Passw0rd-in-events"


class Recorder:
    """A sink keeping every event."""

    def __init__(self) -> None:
        self.logins: list[LoginEvent] = []
        self.authzs: list[object] = []

    def login(self, event: LoginEvent) -> None:
        self.logins.append(event)

    def authz(self, event: object) -> None:
        self.authzs.append(event)


@implementer(ICredentialsChecker)
class Raising:
    """A checker whose check raises C{error} (as an outage or a bug would)."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, error: Exception) -> None:
        self.error = error

    def requestAvatarId(self, credentials):
        raise self.error


class LoginEventTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.sink = Recorder()
        self.events = Events()
        self.events.add(self.sink)

    def attempt(self, checker, credentials=None, throttle=None):
        """One login through a portal on the hub; its single event."""
        portal = make_portal(Realm(), [checker], throttle, self.events)
        credentials = credentials or testing.sasl_plain(
            "daniel", SECRET, peer="198.51.100.7", listener="smtps"
        )
        d = login(portal, credentials)
        d.addErrback(lambda _: None)
        return d

    def outcome(self, checker, credentials=None):
        self.attempt(checker, credentials)
        [event] = self.sink.logins
        self.assertNotIn(SECRET, repr(event))
        self.assertIn(event.reason, REASONS)
        return event.outcome, event.reason

    def test_success(self) -> None:
        """The connection's facts, the claimed identity, the session, a duration."""
        self.attempt(CallableChecker(lambda u, p: p == SECRET))
        [event] = self.sink.logins
        self.assertEqual(
            (event.outcome, event.reason, event.protocol, event.listener, event.mechanism,
             event.identity, event.peer_address, event.peer_port, event.tls),
            ("success", "ok", "smtp", "smtps", "PLAIN", "daniel", "198.51.100.7", 49152, True),
        )
        self.assertTrue(IAuthInfo.providedBy(event.auth_info))
        self.assertEqual({i.identity for i in event.auth_info.identities}, {"daniel"})
        self.assertGreaterEqual(event.duration, 0)
        self.assertNotIn(SECRET, repr(event))

    def test_wrong_password(self) -> None:
        self.assertEqual(self.outcome(CallableChecker(lambda u, p: False)),
                         ("failure", "invalid_credentials"))
        self.assertIsNone(self.sink.logins[0].auth_info)

    def test_rejected(self) -> None:
        """A checker's own Reject is a failure with its own reason."""
        self.assertEqual(self.outcome(FixedChecker(Reject(535, "5.7.8", "go away"))),
                         ("failure", "rejected"))

    def test_throttled(self) -> None:
        """A real throttle: after the allowed failures, the next attempt is refused."""
        throttle = Throttle(task.Clock(), max_failures=1, max_peer_failures=1, delay=0, max_delay=0)
        checker = CallableChecker(lambda u, p: False)
        self.attempt(checker, throttle=throttle)
        self.attempt(checker, throttle=throttle)
        self.assertEqual([(e.outcome, e.reason) for e in self.sink.logins],
                         [("failure", "invalid_credentials"), ("throttled", "throttled")])

    def test_pool_full(self) -> None:
        self.assertEqual(self.outcome(FixedChecker(PoolFull())), ("temporary", "pool_full"))

    def test_backend_error(self) -> None:
        """A checker's exception is an error; one that says it is a backend error, temporary."""
        self.assertEqual(self.outcome(Raising(ConnectionError("ldap down"))),
                         ("error", "backend_error"))
        self.sink.logins.clear()
        self.assertEqual(self.outcome(FixedChecker(AuthBackendError())),
                         ("temporary", "backend_error"))

    def test_temporary(self) -> None:
        self.assertEqual(self.outcome(FixedChecker(TemporaryFailure("later"))),
                         ("temporary", "temporary"))
        self.sink.logins.clear()
        self.assertEqual(self.outcome(FixedChecker(ShuttingDown())), ("temporary", "temporary"))

    def test_unsupported(self) -> None:
        """Credentials no checker handles (a Bearer token, no token checker)."""
        self.assertEqual(
            self.outcome(CallableChecker(lambda u, p: True), testing.bearer(SECRET)),
            ("unsupported", "unsupported"),
        )
        self.assertIsNone(self.sink.logins[0].identity)

    def test_cancelled(self) -> None:
        """The client left while the check ran."""
        @implementer(ICredentialsChecker)
        class Pending:
            credentialInterfaces = (IUsernamePassword,)

            def requestAvatarId(self, credentials):
                return defer.Deferred()

        d = self.attempt(Pending())
        d.cancel()
        [event] = self.sink.logins
        self.assertEqual((event.outcome, event.reason), ("cancelled", "cancelled"))

    def test_every_door(self) -> None:
        """HTTP Basic, Bearer and RFC 1929 attempts say their door and mechanism."""
        checker = CallableChecker(lambda u, p: False)
        for credentials, expected in [
            (testing.http_basic("bob", SECRET, peer="2001:db8::1"), ("http", "Basic", "bob")),
            (testing.rfc1929("carol", SECRET), ("socks", "RFC1929", "carol")),
        ]:
            self.attempt(checker, credentials)
            event = self.sink.logins[-1]
            self.assertEqual((event.protocol, event.mechanism, event.identity), expected)
            self.assertNotIn(SECRET, repr(event))
        self.assertEqual(self.sink.logins[0].peer_address, "2001:db8::1")

    def test_every_reason_documented(self) -> None:
        """The reasons the realm can give are the documented list, each once."""
        self.assertEqual(len(set(REASONS)), len(REASONS))
        self.assertEqual(
            set(REASONS),
            {"ok", "invalid_credentials", "rejected", "throttled", "pool_full",
             "backend_error", "temporary", "unsupported", "cancelled"},
        )

    def test_no_sink_no_event(self) -> None:
        """Without a sink nothing is published; a plain Portal has no hub at all."""
        portal = make_portal(Realm(), [CallableChecker(lambda u, p: True)])
        self.successResultOf(login(portal, testing.http_basic("bob", SECRET)))
        plain = Portal(Realm(), [CallableChecker(lambda u, p: True)])
        self.successResultOf(login(plain, testing.http_basic("bob", SECRET)))
        self.assertEqual(self.sink.logins, [])

    def test_every_sink_gets_every_event(self) -> None:
        other = Recorder()
        self.events.add(other)
        self.attempt(CallableChecker(lambda u, p: False))
        self.assertEqual(other.logins, self.sink.logins)

    def test_log_line_and_event_agree(self) -> None:
        """
        Every way a login fails is told once (L{classify}): the auth log
        line and the event carry the same outcome, and the same connection
        fields under the same names.
        """
        for error, expected in [
            (Reject(), ("failure", "rejected")),
            (UnauthorizedLogin(), ("failure", "invalid_credentials")),
            (defer.CancelledError(), ("cancelled", "cancelled")),
            (UnhandledCredentials(), ("unsupported", "unsupported")),
            (Throttled(60), ("throttled", "throttled")),
            (PoolFull(), ("temporary", "pool_full")),
            (AuthBackendError(), ("temporary", "backend_error")),
            (TemporaryFailure("busy"), ("temporary", "temporary")),
            (ZeroDivisionError(), ("error", "backend_error")),
        ]:
            self.assertEqual(classify(Failure(error)), expected, error)
            lines: list[dict] = []
            portal = make_portal(Realm(), [FixedChecker(error)], None, self.events)
            credentials = testing.sasl_plain("daniel", SECRET, peer="198.51.100.7")
            login(portal, credentials, log=Logger(observer=lines.append)).addErrback(lambda _: None)
            event = self.sink.logins[-1]
            self.assertEqual((event.outcome, event.reason), expected, error)
            [line] = lines
            self.assertEqual(line["outcome"], event.outcome, error)
            self.assertEqual(
                {k: line[k] for k in meta_fields(None)},
                {k: getattr(event, k) for k in meta_fields(None)},
            )

    def test_abandoned_verdict_failed(self) -> None:
        """
        An abandoned attempt whose verdict fails instead of firing is
        recorded as cancelled, not left as an unhandled error.
        """
        verdict: defer.Deferred[object] = defer.Deferred()
        self.attempt(FixedChecker(Abandoned(verdict)))
        self.assertEqual(self.sink.logins, [])
        verdict.errback(RuntimeError("the pool went away"))
        [event] = self.sink.logins
        self.assertEqual((event.outcome, event.reason, event.client_left),
                         ("cancelled", "cancelled", True))
        self.assertEqual(self.flushLoggedErrors(RuntimeError), [])

    def test_unhandled_is_not_unauthorized(self) -> None:
        """The two cred failures are told apart (a scanner is not a guesser)."""
        self.assertFalse(issubclass(UnhandledCredentials, UnauthorizedLogin))


class MetaFieldsTests(SynchronousTestCase):
    def test_fields(self) -> None:
        meta = testing.conn_meta("socks", "192.0.2.9", tls=False, listener="socks-tls")
        self.assertEqual(meta_fields(meta), {
            "protocol": "socks", "listener": "socks-tls", "peer_address": "192.0.2.9",
            "peer_port": 49152, "tls": False,
        })

    def test_none(self) -> None:
        self.assertEqual(set(meta_fields(None).values()), {None})
