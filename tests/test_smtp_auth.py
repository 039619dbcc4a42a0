"""
Tests for L{gateway.smtp.server}'s SMTP AUTH: the SASL exchanges, what each
checker outcome answers, the authorization identity, and the limits on a
session that has not authenticated (the deadline, the junk command budget).
"""

from __future__ import annotations

import base64
import hmac
from hashlib import md5
from typing import Any

from twisted.cred.credentials import CramMD5Credentials

from gateway.checkers import smtp_server_auth_plain
from gateway.errors import PoolFull, Reject, Throttled
from gateway.realm import Realm
from gateway.smtp import sasl
from gateway.smtp.server import CLOSE_GRACE, MAX_COMMAND_LINE
from tests.smtp_support import (
    Client,
    FailingChecker,
    ServerTestCase,
    TokenChecker,
    TokenMechanism,
    b64,
    memory_db,
    plain,
)


class AuthExchangeTests(ServerTestCase):
    def test_plain_initial_response(self) -> None:
        client = self.tls_session()
        self.assertEqual(
            client.send(b"AUTH PLAIN " + plain() + b"\r\n"),
            [b"235 2.7.0 Authentication successful"],
        )
        self.assertNotIn(b"AUTH PLAIN", b"\n".join(self.ehlo(client)))

    def test_plain_empty_challenge(self) -> None:
        """Without an initial response PLAIN sends C{334 } with its trailing space."""
        client = self.tls_session()
        self.assertEqual(client.send(b"AUTH PLAIN\r\n"), [b"334 "])
        self.assertReplies(client.send(plain() + b"\r\n"), [b"235 2.7.0"])

    def test_login_challenges(self) -> None:
        client = self.tls_session()
        self.assertEqual(client.send(b"AUTH LOGIN\r\n"), [b"334 " + b64("Username:")])
        self.assertEqual(client.send(b64("daniel") + b"\r\n"), [b"334 " + b64("Password:")])
        self.assertReplies(client.send(b64("tiger") + b"\r\n"), [b"235 2.7.0"])

    def test_login_initial_response(self) -> None:
        client = self.tls_session()
        self.assertEqual(
            client.send(b"AUTH LOGIN " + b64("daniel") + b"\r\n"), [b"334 " + b64("Password:")]
        )
        self.assertReplies(client.send(b64("tiger") + b"\r\n"), [b"235 2.7.0"])

    def test_mechanism_case_insensitive(self) -> None:
        client = self.tls_session()
        self.assertReplies(client.send(b"auth plain " + plain() + b"\r\n"), [b"235 2.7.0"])

    def test_mixed_case_login(self) -> None:
        client = self.tls_session()
        self.assertEqual(client.send(b"AUTH LoGiN\r\n"), [b"334 " + b64("Username:")])

    def test_cancel(self) -> None:
        client = self.tls_session()
        client.send(b"AUTH PLAIN\r\n")
        self.assertReplies(client.send(b"*\r\n"), [b"501 5.7.0"])
        client.send(b"AUTH LOGIN\r\n")
        client.send(b64("daniel") + b"\r\n")
        self.assertReplies(client.send(b"*\r\n"), [b"501 5.7.0"])
        self.assertReplies(client.send(b"NOOP\r\n"), [b"250 2.0.0"])
        self.assertReplies(client.send(b"AUTH PLAIN " + plain() + b"\r\n"), [b"235 2.7.0"])

    def test_cancel_initial_response(self) -> None:
        self.assertReplies(self.tls_session().send(b"AUTH PLAIN *\r\n"), [b"501 5.7.0"])

    def test_bad_base64(self) -> None:
        client = self.tls_session()
        for bad in (b"!!" + plain() + b"!!", b"ZGFu\x00", b"ZGFuaWVs=", b"ZGF=uaWVs", b"Zm9v Zg=="):
            self.assertReplies(client.send(b"AUTH PLAIN " + bad + b"\r\n"), [b"501 5.5.2"])
        client.send(b"AUTH PLAIN\r\n")
        self.assertReplies(client.send(b"!!" + plain() + b"!!\r\n"), [b"501 5.5.2"])
        self.assertIsNone(client.proto.auth_info)
        self.assertReplies(client.send(b"AUTH PLAIN " + plain() + b"\r\n"), [b"235 2.7.0"])

    def test_bare_auth(self) -> None:
        """C{AUTH} alone: 501 5.5.4 and the connection stays usable (twisted#7753)."""
        client = self.tls_session()
        self.assertReplies(client.send(b"AUTH\r\n"), [b"501 5.5.4"])
        self.assertReplies(client.send(b"AUTH  \r\n"), [b"501 5.5.4"])
        self.assertFalse(client.closed)
        self.assertReplies(client.send(b"AUTH PLAIN " + plain() + b"\r\n"), [b"235 2.7.0"])

    def test_unknown_mechanism(self) -> None:
        client = self.tls_session()
        self.assertReplies(client.send(b"AUTH GSSAPI\r\n"), [b"504 5.5.4"])
        self.assertReplies(client.send(b"AUTH \xff\r\n"), [b"504 5.5.4"])

    def test_excluded_mechanism(self) -> None:
        client = self.connect("implicit", mechanisms={"PLAIN": sasl.Plain})
        ext = self.extensions(self.ehlo(client))
        self.assertIn(b"AUTH PLAIN", ext)
        self.assertReplies(client.send(b"AUTH LOGIN\r\n"), [b"504 5.5.4"])

    def test_already_authenticated(self) -> None:
        client = self.authenticated()
        self.assertReplies(client.send(b"AUTH PLAIN " + plain() + b"\r\n"), [b"503 5.5.1"])

    def test_auth_inside_transaction(self) -> None:
        client = self.trusted_session("implicit")
        self.assertReplies(client.send(b"MAIL FROM:<a@b.example>\r\n"), [b"250 2.1.0"])
        self.assertReplies(client.send(b"AUTH PLAIN " + plain() + b"\r\n"), [b"503 5.5.1"])
        self.assertIsNone(client.proto.auth_info)

    def test_auth_before_ehlo(self) -> None:
        client = self.connect("implicit")
        self.assertReplies(client.send(b"AUTH PLAIN " + plain() + b"\r\n"), [b"503 5.5.1"])
        client.send(b"HELO client.example\r\n")
        self.assertReplies(client.send(b"AUTH PLAIN " + plain() + b"\r\n"), [b"503 5.5.1"])

    def test_bad_credentials(self) -> None:
        client = self.tls_session()
        self.assertReplies(
            client.send(b"AUTH PLAIN " + plain(password="lion") + b"\r\n"), [b"535 5.7.8"]
        )
        self.assertReplies(
            client.send(b"AUTH PLAIN " + plain(authcid="nobody") + b"\r\n"), [b"535 5.7.8"]
        )
        self.assertFalse(client.closed)
        self.assertReplies(client.send(b"MAIL FROM:<a@b.example>\r\n"), [b"530 5.7.0"])

    def test_three_failures_close(self) -> None:
        client = self.tls_session()
        bad = b"AUTH PLAIN " + plain(password="lion") + b"\r\n"
        self.assertReplies(client.send(bad + bad), [b"535 5.7.8", b"535 5.7.8"])
        self.assertFalse(client.closed)
        self.assertReplies(client.send(bad + b"NOOP\r\n"), [b"535 5.7.8", b"421 4.7.0"])
        self.assertTrue(client.closed)

    def test_empty_initial_response(self) -> None:
        """C{=} is a zero-length initial response, handed to the mechanism as such."""
        checker = TokenChecker()
        mechanisms = dict(sasl.BUILTIN, TOKEN=TokenMechanism)
        client = self.connect(mechanisms=mechanisms, checkers=[self.db, checker])
        self.ehlo(client)
        self.assertReplies(client.send(b"AUTH TOKEN =\r\n"), [b"235 2.7.0"])
        self.assertEqual(checker.seen, [b""])
        self.assertEqual(client.proto.auth_info.identities[0].identity, "guest")

    def test_empty_response_after_challenge(self) -> None:
        """An empty line answering C{334 } is a zero-length response."""
        checker = TokenChecker()
        mechanisms = dict(sasl.BUILTIN, TOKEN=TokenMechanism)
        client = self.connect(mechanisms=mechanisms, checkers=[self.db, checker])
        self.ehlo(client)
        self.assertEqual(client.send(b"AUTH TOKEN\r\n"), [b"334 "])
        self.assertReplies(client.send(b"\r\n"), [b"235 2.7.0"])
        self.assertEqual(checker.seen, [b""])

    def test_empty_initial_response_plain(self) -> None:
        """For PLAIN, an empty response is malformed."""
        self.assertReplies(self.tls_session().send(b"AUTH PLAIN =\r\n"), [b"501 5.5.2"])

    def test_plain_field_limits(self) -> None:
        client = self.tls_session()
        long = "d" * 256
        for response in (
            plain(authcid=long),
            plain(password=long),
            plain(authzid=long),
            b64(b"\0dani\xffel\0tiger"),
            b64(b"\0daniel\0ti\xc3ger"),
            b64(b"daniel\0tiger"),
            b64(b"\0\0tiger"),
        ):
            self.assertReplies(client.send(b"AUTH PLAIN " + response + b"\r\n"), [b"501 5.5.2"])
        self.assertFalse(client.closed)

    def test_plain_field_255_octets(self) -> None:
        """255 octets of UTF-8 (multi-byte characters) are within the limit."""
        password = "\u00e9" * 127 + "x"  # 255 octets
        self.db = memory_db("daniel", password)
        client = self.tls_session()
        self.assertReplies(
            client.send(b"AUTH PLAIN " + plain(password=password) + b"\r\n"), [b"235 2.7.0"]
        )

    def test_auth_line_limit(self) -> None:
        """An AUTH line of 12288 octets is read (and judged); a longer one is 500 5.5.6."""
        client = self.tls_session()
        prefix = b"AUTH PLAIN "
        fits = prefix + b"QUJD" * ((MAX_COMMAND_LINE - len(prefix)) // 4)
        fits += b"A" * (MAX_COMMAND_LINE - len(fits))
        self.assertEqual(len(fits), MAX_COMMAND_LINE)
        self.assertReplies(client.send(fits + b"\r\n"), [b"501 5.5.2"])
        self.assertReplies(client.send(fits + b"AAAA\r\nNOOP\r\n"), [b"500 5.5.6", b"250 2.0.0"])

    def test_overlong_response(self) -> None:
        """A challenge response over 12288 octets ends the exchange with 500 5.5.6."""
        client = self.tls_session()
        self.assertEqual(client.send(b"AUTH PLAIN\r\n"), [b"334 "])
        self.assertReplies(
            client.send(b"QUJD" * (MAX_COMMAND_LINE // 4 + 1) + b"\r\nNOOP\r\n"),
            [b"500 5.5.6", b"250 2.0.0"],
        )
        self.assertReplies(client.send(b"AUTH PLAIN " + plain() + b"\r\n"), [b"235 2.7.0"])

    def test_initial_response_server_first(self) -> None:
        """A server-first plug-in mechanism (CRAM-MD5) refuses an initial response."""
        mechanisms = dict(sasl.BUILTIN, **{"CRAM-MD5": CramMD5Credentials})
        client = self.connect("implicit", mechanisms=mechanisms)
        self.assertIn(b"AUTH PLAIN LOGIN CRAM-MD5", self.extensions(self.ehlo(client)))
        self.assertReplies(
            client.send(b"AUTH CRAM-MD5 " + b64("daniel x") + b"\r\n"), [b"501 5.7.0"]
        )
        self.assertReplies(client.send(b"NOOP\r\n"), [b"250 2.0.0"])

    def test_plugin_mechanism_exchange(self) -> None:
        """CRAM-MD5 registered by name: challenge, response, 235."""
        self.db.addUser(b"daniel", b"tiger")  # CramMD5Credentials carries a bytes username
        client = self.connect("implicit", mechanisms={"CRAM-MD5": CramMD5Credentials})
        self.ehlo(client)
        (line,) = client.send(b"AUTH cram-md5\r\n")
        self.assertTrue(line.startswith(b"334 "), line)
        challenge = base64.b64decode(line[4:])
        digest = hmac.HMAC(b"tiger", challenge, digestmod=md5).hexdigest()
        self.assertReplies(client.send(b64("daniel " + digest) + b"\r\n"), [b"235 2.7.0"])
        self.assertEqual(client.proto.auth_info.identities[0].identity, "daniel")

    def test_mechanism_that_cannot_start(self) -> None:
        def broken() -> None:
            raise RuntimeError("no")

        broken.plaintext = False  # type: ignore[attr-defined]
        client = self.connect("implicit", mechanisms={"BROKEN": broken})
        self.ehlo(client)
        self.assertReplies(client.send(b"AUTH BROKEN\r\n"), [b"454 4.7.0"])
        self.flushLoggedErrors(RuntimeError)


class CheckerOutcomeTests(ServerTestCase):
    def outcome(self, error: Exception) -> Client:
        client = self.tls_session(checkers=[FailingChecker(error)])
        self.result = client.send(b"AUTH PLAIN " + plain() + b"\r\n")
        return client

    def test_backend_error(self) -> None:
        """Any exception but UnauthorizedLogin is a temporary failure: 454, not 451."""
        client = self.outcome(RuntimeError("database down"))
        self.assertReplies(self.result, [b"454 4.7.0"])
        self.assertNotIn(b"database", b"".join(self.result))
        self.assertFalse(client.closed)

    def test_throttled(self) -> None:
        self.outcome(Throttled(30))
        self.assertReplies(self.result, [b"454 4.7.0"])

    def test_throttled_counts_as_failure(self) -> None:
        """A session that keeps trying a throttled pair is closed like one guessing."""
        client = self.outcome(Throttled(30))
        lines = client.send(b"AUTH PLAIN " + plain() + b"\r\nAUTH PLAIN " + plain() + b"\r\n")
        self.assertReplies(lines, [b"454 4.7.0", b"454 4.7.0", b"421 4.7.0"])
        self.assertTrue(client.closed)

    def test_pipelined_answers_at_once_flat_stack(self) -> None:
        """
        Thousands of pipelined commands answered at once (a full hash queue
        refuses every AUTH) get every reply, in order, without the handler
        of each reply running inside the previous one: a client choosing the
        depth must not choose where a RecursionError lands.
        """
        client = self.outcome(PoolFull())
        count = 3000
        lines = client.send((b"AUTH PLAIN " + plain() + b"\r\n") * count + b"NOOP\r\n")
        self.assertReplies(lines, [b"454 4.7.0"] * count + [b"250 2.0.0"])
        self.assertFalse(client.closed)

    def test_pool_full(self) -> None:
        self.outcome(PoolFull())
        self.assertReplies(self.result, [b"454 4.7.0"])

    def test_temporary_failures_do_not_count(self) -> None:
        client = self.outcome(PoolFull())
        for _ in range(3):
            self.assertReplies(client.send(b"AUTH PLAIN " + plain() + b"\r\n"), [b"454 4.7.0"])
        self.assertFalse(client.closed)

    def test_unhandled_credentials(self) -> None:
        """No checker for the credentials: 454."""
        client = self.tls_session(checkers=[TokenChecker()])
        self.assertReplies(client.send(b"AUTH PLAIN " + plain() + b"\r\n"), [b"454 4.7.0"])

    def test_reject_own_code(self) -> None:
        client = self.outcome(Reject(432, "4.7.12", "A password transition is needed"))
        self.assertEqual(self.result, [b"432 4.7.12 A password transition is needed"])
        self.assertFalse(client.closed)

    def test_reject_disconnect(self) -> None:
        client = self.outcome(
            Reject(534, "5.7.9", "Authentication mechanism is too weak", disconnect=True)
        )
        self.assertEqual(self.result, [b"534 5.7.9 Authentication mechanism is too weak"])
        self.assertTrue(client.closed)

    def test_reject_counts_as_failure(self) -> None:
        client = self.outcome(Reject(535, "5.7.8", "No such mailbox"))
        client.send(b"AUTH PLAIN " + plain() + b"\r\n")
        self.assertReplies(
            client.send(b"AUTH PLAIN " + plain() + b"\r\n"), [b"535 5.7.8", b"421 4.7.0"]
        )
        self.assertTrue(client.closed)

    def test_reject_text_with_password_withheld(self) -> None:
        """A rejection whose text holds the password is answered as a plain 535."""
        self.outcome(Reject(550, "5.7.1", "password tiger is wrong"))
        self.assertReplies(self.result, [b"535 5.7.8"])
        self.assertNotIn(b"tiger", b"".join(self.result))


class AuthorizationIdentityTests(ServerTestCase):
    def identities(self, client: Client) -> list[tuple[str, str]]:
        return [(i.identity, i.context.value) for i in client.proto.auth_info.identities]

    def test_empty_authzid_is_authcid(self) -> None:
        client = self.authenticated()
        self.assertEqual(
            self.identities(client),
            [("daniel", "SmtpAuthPlainAuthorization"), ("daniel", "SmtpAuthPlainAuthentication")],
        )

    def test_authzid_equal_to_authcid(self) -> None:
        client = self.tls_session()
        self.assertReplies(
            client.send(b"AUTH PLAIN " + plain(authzid="daniel") + b"\r\n"), [b"235 2.7.0"]
        )

    def test_foreign_authzid_refused(self) -> None:
        client = self.tls_session()
        self.assertReplies(
            client.send(b"AUTH PLAIN " + plain(authzid="sales") + b"\r\n"), [b"535 5.7.8"]
        )
        self.assertIsNone(client.proto.auth_info)

    def test_seed_function_sees_both_and_approves(self) -> None:
        calls = []

        def auth_plain(authz: str, authc: str, password: str, conn_meta: Any) -> Any:
            calls.append((authz, authc, password, conn_meta.tls, conn_meta.peer_address,
                          conn_meta.helo))
            if authc != "daniel" or password != "tiger":
                return False
            if authz == "sales":  # True would approve daniel only (issue 11 item 7)
                return {"identities": [
                    {"identity": "sales", "context": "SmtpAuthPlainAuthorization"},
                    {"identity": "daniel", "context": "SmtpAuthPlainAuthentication"},
                ]}
            return authz == "daniel"

        client = self.tls_session(checkers=[smtp_server_auth_plain(auth_plain)])
        self.assertReplies(
            client.send(b"AUTH PLAIN " + plain(authzid="sales") + b"\r\n"), [b"235 2.7.0"]
        )
        self.assertEqual(calls, [("sales", "daniel", "tiger", True, "192.0.2.7", "client.example")])
        self.assertEqual(
            self.identities(client),
            [("sales", "SmtpAuthPlainAuthorization"), ("daniel", "SmtpAuthPlainAuthentication")],
        )

    def test_seed_function_empty_authzid(self) -> None:
        calls = []

        def auth_plain(authz: str, authc: str, password: str, conn_meta: Any) -> bool:
            calls.append((authz, authc))
            return password == "tiger"

        client = self.tls_session(checkers=[smtp_server_auth_plain(auth_plain)])
        self.assertReplies(client.send(b"AUTH PLAIN " + plain() + b"\r\n"), [b"235 2.7.0"])
        self.assertEqual(calls, [("daniel", "daniel")])

    def test_seed_function_refuses_authzid(self) -> None:
        def auth_plain(authz: str, authc: str, password: str, conn_meta: Any) -> bool:
            return authz == authc and password == "tiger"

        client = self.tls_session(checkers=[smtp_server_auth_plain(auth_plain)])
        self.assertReplies(
            client.send(b"AUTH PLAIN " + plain(authzid="sales") + b"\r\n"), [b"535 5.7.8"]
        )

    def test_realm_authorize_grants(self) -> None:
        asked = []

        def authorize(info: Any, authzid: str) -> bool:
            asked.append((sorted(info.names()), authzid))
            return authzid == "sales"

        client = self.tls_session(realm=Realm(authorize=authorize))
        self.assertReplies(
            client.send(b"AUTH PLAIN " + plain(authzid="sales") + b"\r\n"), [b"235 2.7.0"]
        )
        self.assertEqual(asked, [(["daniel"], "sales")])
        self.assertEqual(
            self.identities(client),
            [("sales", "SmtpAuthPlainAuthorization"), ("daniel", "SmtpAuthPlainAuthentication")],
        )
        self.assertReplies(
            self.tls_session(realm=Realm(authorize=authorize)).send(
                b"AUTH PLAIN " + plain(authzid="boss") + b"\r\n"
            ),
            [b"535 5.7.8"],
        )

    def test_metadata_records_both(self) -> None:
        client = self.tls_session(realm=Realm(authorize=lambda info, authzid: True))
        client.send(b"AUTH PLAIN " + plain(authzid="sales") + b"\r\n")
        self.start_data(client)
        self.assertReplies(client.send(b"hi\r\n.\r\n"), [b"250 2.0.0"])
        ((_, meta),) = self.stored()
        self.assertEqual((meta["authz_id"], meta["authn_id"]), ("sales", "daniel"))


class AuthDeadlineTests(ServerTestCase):
    """Issue 11 item 4: NOOP no longer keeps an unauthenticated session for ever."""

    def test_deadline_despite_activity(self) -> None:
        client = self.connect(auth_deadline=10, timeout=300)
        for _ in range(3):
            self.clock.advance(3)
            self.assertReplies(client.send(b"NOOP\r\n"), [b"250 2.0.0"])
        self.clock.advance(1)
        self.assertEqual(client.read(), [b"421 4.7.0 mx.test Authentication took too long, closing connection"])
        self.assertTrue(client.closed)
        self.assertEqual(client.send(b"NOOP\r\n"), [])

    def test_deadline_during_auth_exchange(self) -> None:
        client = self.tls_session(auth_deadline=10)
        self.assertReplies(client.send(b"AUTH LOGIN\r\n"), [b"334 "])
        self.clock.advance(10)
        self.assertReplies(client.read(), [b"421 4.7.0"])
        self.assertTrue(client.closed)

    def test_deadline_ends_with_auth(self) -> None:
        client = self.authenticated(auth_deadline=10, timeout=300)
        self.clock.advance(100)
        self.assertEqual(client.read(), [])
        self.assertFalse(client.closed)

    def test_trusted_network_has_no_deadline(self) -> None:
        client = self.trusted_session(auth_deadline=10, timeout=300)
        self.clock.advance(100)
        self.assertFalse(client.closed)

    def test_deadline_again_after_starttls_forgets_auth(self) -> None:
        client = self.connect(auth_deadline=10, timeout=300, insecure_auth=True)
        self.ehlo(client)
        self.assertReplies(client.send(b"AUTH PLAIN " + plain() + b"\r\n"), [b"235 2.7.0"])
        self.assertReplies(client.send(b"STARTTLS\r\n"), [b"220 2.0.0"])
        self.clock.advance(10)
        self.assertReplies(client.read(), [b"421 4.7.0"])

    def test_starttls_keeps_failures(self) -> None:
        """Failed AUTHs count for the connection: STARTTLS does not give three more."""
        client = self.connect(insecure_auth=True)
        self.ehlo(client)
        bad = b"AUTH PLAIN " + plain(password="x") + b"\r\n"
        self.assertReplies(client.send(bad * 2), [b"535 5.7.8"] * 2)
        self.assertReplies(client.send(b"STARTTLS\r\n"), [b"220 2.0.0"])
        self.ehlo(client)
        self.assertReplies(client.send(bad), [b"535 5.7.8", b"421 4.7.0"])
        self.assertTrue(client.closed)

    def test_deadline_then_silent_client_aborted(self) -> None:
        client = self.connect(auth_deadline=10)
        client.proto.pauseProducing()
        self.clock.advance(10)
        self.clock.advance(CLOSE_GRACE)
        self.assertTrue(client.transport.disconnected)


class JunkCommandTests(ServerTestCase):
    """Issue 11 item 4: commands that lead nowhere before AUTH are limited (smtpd_junk_command_limit)."""

    JUNK = [
        b"NOOP", b"RSET", b"HELP", b"VRFY daniel", b"EXPN staff", b"FROB", b"", b"EHLO again.example",
        b"HELO again.example", b"STARTTLS x", b"AUTH", b"AUTH FROB", b"MAIL FROM:<a@b.example>",
        b"RCPT TO:<a@b.example>", b"DATA", b"AUTH LOGIN\r\n*", b"AUTH PLAIN\r\n%%%",
    ]

    def test_each_kind_counts(self) -> None:
        for junk in self.JUNK:
            client = self.tls_session(junk_commands=2)
            for _ in range(2):
                client.send(junk + b"\r\n")
            self.assertFalse(client.closed, junk)
            lines = client.send(junk + b"\r\n")
            self.assertEqual(
                lines[-1],
                b"421 4.7.0 mx.test Too many commands without authentication, closing connection",
                junk,
            )
            self.assertTrue(client.closed, junk)

    def test_overlong_lines_count(self) -> None:
        client = self.tls_session(junk_commands=1)
        client.send(b"NOOP " + b"x" * MAX_COMMAND_LINE + b"\r\n")
        lines = client.send(b"NOOP " + b"x" * MAX_COMMAND_LINE + b"\r\n")
        self.assertReplies(lines, [b"500 5.5.6", b"421 4.7.0"])

    def test_the_way_to_auth_is_not_junk(self) -> None:
        """EHLO, STARTTLS, EHLO again, AUTH, and failed logins (counted apart) cost nothing."""
        client = self.connect(junk_commands=1)
        self.ehlo(client)
        self.assertReplies(client.send(b"STARTTLS\r\n"), [b"220 2.0.0"])
        self.ehlo(client)
        self.assertReplies(client.send(b"NOOP\r\n"), [b"250 2.0.0"])
        self.assertReplies(client.send(b"AUTH PLAIN " + plain(password="x") + b"\r\n"), [b"535 5.7.8"])
        self.assertReplies(client.send(b"AUTH LOGIN\r\n"), [b"334 "])
        self.assertReplies(client.send(b64("daniel") + b"\r\n"), [b"334 "])
        self.assertReplies(client.send(b64("tiger") + b"\r\n"), [b"235 2.7.0"])
        self.assertReplies(client.send(b"NOOP\r\n" * 30), [b"250 2.0.0"] * 30)
        self.assertFalse(client.closed)

    def test_not_reset_by_starttls(self) -> None:
        client = self.connect(junk_commands=2)
        self.ehlo(client)
        client.send(b"NOOP\r\nNOOP\r\n")
        self.assertReplies(client.send(b"STARTTLS\r\n"), [b"220 2.0.0"])
        self.ehlo(client)
        self.assertReplies(client.send(b"NOOP\r\n"), [b"250 2.0.0", b"421 4.7.0"])

    def test_trusted_network_not_limited(self) -> None:
        client = self.trusted_session(junk_commands=1)
        self.assertReplies(client.send(b"NOOP\r\n" * 5), [b"250 2.0.0"] * 5)
        self.assertFalse(client.closed)
