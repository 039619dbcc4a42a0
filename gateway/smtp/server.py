# -*- test-case-name: tests.test_smtp_session,tests.test_smtp_auth,tests.test_smtp_transaction,tests.test_smtp_data,tests.test_smtp_limits -*-
"""
The ESMTP submission server: a Twisted protocol around the sans-I/O
L{gateway.smtp.codec}, with what a submission front door needs (see
shared/reference/smtp-auth.md): AUTH only under TLS, PLAIN keeping the
authzid, strict base64, STARTTLS that forgets everything said before it,
replies in order under pipelining, enhanced status codes, 454 for backend
failures, bounded lines, messages and waits, and a durable spool that
records who sent each message.

The codec frames and parses the input (lines end with CRLF only, every line
is bounded, message text is dot-unstuffed and held to the size limit, what
is recorded is held to RFC 5321 without SMTPUTF8); this module does the I/O:
the login, STARTTLS, the spool, timers, backpressure and the session's
state.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application import internet
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet import defer, interfaces, protocol
from twisted.logger import Logger
from twisted.protocols import policies
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.acl import IAccessPolicy, may_act_as, may_send_as
from gateway.addresses import in_networks
from gateway.authinfo import AuthInfo, IAuthInfo
from gateway.connections import Refused, authenticated, limit_connections, login_running
from gateway.errors import Reject, TemporaryFailure, Throttled
from gateway.meta import ConnectionMeta
from gateway.realm import AUTHZ_GRANT, login
from gateway.smtp import codec, sasl
from gateway.smtp.codec import MAX_COMMAND_LINE, MAX_DATA_LINE
from gateway.smtp.spool import Envelope, Spool, SpoolError, SpoolWriter, received_header
from gateway.tls import tls_details

if TYPE_CHECKING:
    from gateway.core import Core

log = Logger()

#: Pipelined input held while a reply is pending, before we stop reading.
MAX_PENDING_INPUT = 64 * 1024
#: Input held at most, whatever the reason (a transport delivers one more read
#: after it is paused; more than this means it ignored the pause).
MAX_BUFFERED_INPUT = 4 * MAX_PENDING_INPUT
#: Seconds a closing connection may take to flush its last replies to a client
#: that does not read them, before it is aborted.
CLOSE_GRACE = 15.0


@attrs.frozen
class SMTPSettings:
    """What the operator chose for the SMTP listeners."""

    hostname: str = attrs.field(factory=socket.getfqdn)
    #: Offered mechanisms, in order: name -> IChallengeResponse factory.
    mechanisms: Mapping[str, Any] = attrs.field(factory=lambda: dict(sasl.BUILTIN))
    max_size: int = 35 * 1024 * 1024
    max_recipients: int = 100
    timeout: float = 300.0
    #: Offer plaintext mechanisms without TLS (never by default).
    insecure_auth: bool = False
    #: Peers that may submit without authenticating.
    trusted_networks: tuple[Any, ...] = ()
    #: Authenticated identities may use only MAIL FROM addresses the ACL grants.
    sender_binding: bool = False
    max_auth_failures: int = 3
    #: Seconds from the greeting until a successful AUTH, for a peer that may
    #: not submit without one (not for trusted networks).
    auth_deadline: float = 120.0
    #: Commands that do not lead to AUTH (NOOP, RSET, HELP, VRFY, unknown, a
    #: repeated EHLO, a failed STARTTLS or AUTH exchange...) allowed before it
    #: (Postfix's smtpd_junk_command_limit), for a peer that needs AUTH.
    junk_commands: int = 20
    #: Commands answered with a 5xx error allowed in a session, before AUTH
    #: or after it, trusted networks too (Postfix's smtpd_hard_error_limit):
    #: one more is answered and the session closed. A refused sender under
    #: sender binding writes an audit line; this bounds one session's share.
    max_errors: int = 20
    #: Connections one peer (IPv6 by /64) may hold on --smtp and --smtps together.
    max_connections_per_peer: int = 50


class SubmissionFactory(protocol.ServerFactory):
    """Builds a L{SubmissionServer} per connection, sharing the core."""

    def __init__(
        self,
        portal: Any,
        policy: IAccessPolicy,
        spool: Spool,
        settings: SMTPSettings,
        listener: str,
        tls: Any = None,
        implicit_tls: bool = False,
    ) -> None:
        self.portal = portal
        self.policy = policy
        self.spool = spool
        self.settings = settings
        self.listener = listener
        self.tls = tls  # a context factory for STARTTLS, or None
        self.implicit_tls = implicit_tls

    def buildProtocol(self, addr: Any) -> SubmissionServer:
        proto = SubmissionServer(self)
        proto.factory = self
        return proto


def check_acl_keys(policy: Any) -> None:
    """
    Refuse C{smtp/sender/...} ACL keys that could never match: sender binding
    compares addresses in lower case (L{gateway.acl.binding_local}).

    @raise ValueError: naming the first such key.
    """
    for key in getattr(policy, "acl", {}):
        if key.startswith("smtp/sender/") and key != key.lower():
            raise ValueError(
                f"{key!r}: sender binding compares addresses in lower case;"
                " write smtp/sender keys in lower case"
            )


@implementer(interfaces.IPushProducer)
class SubmissionServer(protocol.Protocol, policies.TimeoutMixin):
    """
    One submission session: drives a L{codec.ServerCodec} and does what it
    does not (the login, STARTTLS, the spool, timers). Replies carry RFC
    3463 enhanced codes.

    It is the streaming producer of its own transport: when the transport's
    write buffer is full (a client that sends commands and does not read the
    replies), it stops answering until the buffer drains, and stops reading
    once L{MAX_PENDING_INPUT} waits, as while a reply is pending.
    """

    def __init__(self, factory: SubmissionFactory) -> None:
        self.factory = factory
        self.settings = factory.settings
        self.portal = factory.portal
        self.host = self.settings.hostname.encode("idna")
        self.timeout = self.settings.timeout
        self._codec = codec.ServerCodec()
        self._busy = False  # a reply is pending: later lines wait
        self._processing = False  # L{_process} is running (not re-entered)
        #: Failed AUTHs on this connection: STARTTLS does not forgive them.
        self._auth_failures = 0
        self._pending: defer.Deferred[Any] | None = None
        self._lost = False
        self._closing = False  # _close() was called: nothing more is answered
        self._output_paused = False  # the transport's write buffer is full
        self._reading_paused = False  # we told the transport to stop reading
        self._registered = False  # registered as the transport's producer
        self._can_start_tls = False
        self._abort_call: Any = None
        self._deadline_call: Any = None
        #: Commands that led nowhere while AUTH is needed; never reset (not by
        #: STARTTLS either), so a client cannot start over.
        self._junk = 0
        #: Replies with a 5xx code in this session: never reset (L{SMTPSettings.max_errors}).
        self._errors = 0
        #: The gateway is stopping (L{drain}): the session ends at its next command.
        self._draining = False
        #: From DATA's 354 until its end of data is handled (the codec's mode
        #: is back to commands as soon as it has read the final dot).
        self._in_data = False
        self._reset_session()

    # -- session state ----------------------------------------------------

    def _reset_session(self) -> None:
        """Back to the state right after the greeting (also after STARTTLS)."""
        self._ehlo = False
        self._helo_name: str | None = None
        self.auth_info: AuthInfo | None = None
        self._mechanism: Any = None
        self._reset_transaction()

    def _reset_transaction(self) -> None:
        self._from: str | None = None
        self._mail_auth: str | None = None
        self._to: list[str] = []
        self._writer: SpoolWriter | None = None

    def connectionMade(self) -> None:
        self.meta = ConnectionMeta.from_transport("smtp", self.transport, listener=self.factory.listener)
        self._can_start_tls = (
            interfaces.ITLSTransport.providedBy(self.transport)
            and self.factory.tls is not None
            and not self.meta.tls
        )
        self.transport.registerProducer(self, True)
        self._registered = True
        self.setTimeout(self.timeout)
        self._start_auth_deadline()
        self.transport.write(codec.reply_lines(220, [self.host + b" ESMTP authgateway"]))

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._lost = True
        self.setTimeout(None)
        self._cancel_auth_deadline()
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
        if self._pending is not None:
            self._pending.cancel()  # a login still running: the client is gone
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        self._mechanism = None

    def timeoutConnection(self) -> None:
        self.reply(421, "4.4.2", f"{self.settings.hostname} Idle timeout, closing connection")
        self._close()

    def reply(self, code: int, enhanced: str, text: str) -> None:
        """
        A one-line reply with its enhanced status code (none once closing).
        Past L{SMTPSettings.max_errors} 5xx replies, the session ends after it.
        """
        if self._closing:
            return
        self.transport.write(codec.reply(code, enhanced, text))
        if code >= 500:
            self._errors += 1
            if self._errors > self.settings.max_errors:
                self._too_many("errors")

    def _too_many(self, what: str) -> None:
        """A session's budget (junk commands, errors) is spent: C{421 4.7.0}, then close."""
        if self._closing:
            return
        self.reply(421, "4.7.0", f"{self.settings.hostname} Too many {what}, closing connection")
        self._close()

    def _close(self) -> None:
        """
        Close once the replies written so far are sent; a client that does not
        read them is cut off after L{CLOSE_GRACE} seconds. Nothing more is
        answered.
        """
        if self._closing:
            return
        self._closing = True
        self.setTimeout(None)
        self._cancel_auth_deadline()
        if self._registered:
            # A registered (and maybe paused) producer keeps TCP and TLS
            # transports from closing: they wait for it to unregister.
            self._registered = False
            self.transport.unregisterProducer()
        self.transport.loseConnection()
        if not self._lost:
            self._abort_call = self.callLater(CLOSE_GRACE, self._abort)

    def _abort(self) -> None:
        self._abort_call = None
        if not self._lost:
            self.transport.abortConnection()

    # -- the gateway stops (gateway.ops.drain) ------------------------------------

    def drain(self) -> None:
        """
        The gateway is stopping: a session waiting for a command (or for a
        SASL response) gets C{421 4.3.2} and is closed now; one in C{DATA}, or
        with a login, a C{MAIL} admission or a spool write running, finishes
        that and gets its reply (a message's 250 once it is spooled), then the
        421. A message cut off in C{DATA} was never accepted.
        """
        self._draining = True
        self._drain_if_idle()

    def _drain_if_idle(self) -> bool:
        """Answer 421 and close if the session is draining and waits for the client; True then."""
        if self._busy or self._closing or self._lost or self._in_data:
            return False
        self.reply(421, "4.3.2", f"{self.settings.hostname} Service shutting down")
        self._close()
        return True

    # -- budgets: the unauthenticated session's deadline and junk commands, errors --

    def _start_auth_deadline(self) -> None:
        if self._deadline_call is None and not self._may_submit():
            self._deadline_call = self.callLater(
                self.settings.auth_deadline, self._auth_deadline_passed
            )

    def _cancel_auth_deadline(self) -> None:
        if self._deadline_call is not None and self._deadline_call.active():
            self._deadline_call.cancel()
        self._deadline_call = None

    def _auth_deadline_passed(self) -> None:
        self._deadline_call = None
        if self._may_submit() or self._closing or self._lost:
            return
        self.reply(
            421, "4.7.0",
            f"{self.settings.hostname} Authentication took too long, closing connection",
        )
        self._close()

    def _count_junk(self) -> bool:
        """Count one command that needed AUTH and led nowhere; True when counted."""
        if self._may_submit():
            return False
        self._junk += 1
        return True

    def _not_junk(self) -> None:
        """The command just counted led towards AUTH after all (EHLO, STARTTLS, a login)."""
        if not self._may_submit() and self._junk > 0:
            self._junk -= 1

    def _check_junk(self) -> None:
        if self._junk > self.settings.junk_commands:
            self._too_many("commands without authentication")

    # -- backpressure: IPushProducer, called by the transport ----------------

    def pauseProducing(self) -> None:
        """The transport's write buffer is full: stop answering (and soon reading)."""
        self._output_paused = True
        self._update_reading()

    def resumeProducing(self) -> None:
        """The transport's write buffer drained: answer what is buffered, read on."""
        self._output_paused = False
        self._process()

    def stopProducing(self) -> None:
        self._output_paused = True

    def _update_reading(self) -> None:
        """
        Reading is paused while lines are not answered, for either reason (a
        full write buffer, a pending reply), and much input already waits;
        one reason ending never resumes reading while the other holds.

        A full write buffer does not stop reading at once: a TLS layer pauses
        its producer while its handshake is unfinished (our greeting, on
        C{--smtps}, is written before it), and the handshake needs reading.
        """
        if self._lost or self._closing:
            return
        waiting = self._busy or self._output_paused
        want = waiting and self._codec.buffered > MAX_PENDING_INPUT
        if want != self._reading_paused:
            self._reading_paused = want
            if want:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    # -- input: the codec's events, one at a time -----------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._codec.receive_data(data)
        self._process()
        if self._codec.buffered > MAX_BUFFERED_INPUT and not self._closing:
            # Only a transport that ignores pauseProducing gets here.
            self._codec.discard_input()
            self.reply(421, "4.7.0", f"{self.settings.hostname} Too much input, closing connection")
            self._close()

    def _process(self) -> None:
        """
        Act on the codec's events, in order, while nothing holds them. Never
        re-entered: a reply that is ready at once (L{_wait}'s Deferred fired
        inside its handler) lets this loop go on, so a client pipelining
        thousands of commands that answer at once (a throttled AUTH) costs
        one stack frame, not one per command.
        """
        if self._processing:
            return
        self._processing = True
        try:
            self._process_events()
        finally:
            self._processing = False
        self._update_reading()

    def _process_events(self) -> None:
        codec_ = self._codec
        if not self._output_paused and codec_.line_waiting():
            # Once per read, not per line; and not while the client leaves our
            # replies unread: sending without reading is no sign of life.
            self.resetTimeout()
        transport = self.transport
        while (
            not self._busy
            and not self._output_paused
            and not self._closing
            and not self._lost
            and not transport.disconnecting
        ):
            if self._draining and self._drain_if_idle():
                break
            event = codec_.next_event()
            if event is None:
                break
            handler = _HANDLERS[type(event)]
            handler(self, event)

    def _on_command(self, event: codec.Command) -> None:
        counted = self._count_junk()
        _COMMANDS.get(event.verb, SubmissionServer.do_UNKNOWN)(self, event.argument)
        if counted and self._codec.mode is codec.Mode.COMMAND:
            self._check_junk()

    def _on_malformed(self, event: codec.Malformed) -> None:
        counted = self._count_junk()
        self.reply(event.code, event.enhanced, event.text)
        if counted:
            self._check_junk()

    def _on_line_too_long(self, event: codec.LineTooLong) -> None:
        if self._codec.mode is codec.Mode.AUTH:
            self._end_auth()
        self._on_malformed(codec.Malformed(*codec.LINE_TOO_LONG))

    def _on_auth_response(self, event: codec.AuthResponse) -> None:
        self._respond(event.line, initial=False)

    def _on_message_text(self, event: codec.MessageText) -> None:
        if self._writer is not None:
            self._writer.write(event.text)

    def _on_data_refused(self, event: codec.DataRefused) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    def _wait(self, d: defer.Deferred[Any]) -> None:
        """Hold every later line until C{d} has replied (RFC 2920 ordering)."""
        self._busy = True
        self._pending = d

        def done(result: Any) -> None:
            self._busy = False
            self._pending = None
            if result is not None and isinstance(result, Failure):
                log.failure("SMTP handler failed", result)
            self._process()

        d.addBoth(done)

    # -- commands -------------------------------------------------------------

    def do_UNKNOWN(self, rest: bytes) -> None:
        self.reply(500, "5.5.2", "Command not recognized")

    def _extensions(self) -> list[bytes]:
        ext = [b"PIPELINING", b"ENHANCEDSTATUSCODES", b"8BITMIME", b"SIZE %d" % self.settings.max_size]
        if self._can_start_tls:
            ext.append(b"STARTTLS")
        offered = self._offered()
        if offered and self.auth_info is None:
            ext.append(b"AUTH " + " ".join(offered).encode())
        return ext

    def _offered(self) -> list[str]:
        """The mechanisms on offer now: plaintext ones only under TLS."""
        tls_ok = self.meta.tls or self.settings.insecure_auth
        return [
            name
            for name, factory in self.settings.mechanisms.items()
            if tls_ok or not sasl.is_plaintext(factory)
        ]

    def do_EHLO(self, rest: bytes) -> None:
        if not self._greeted(rest, ehlo=True):
            self.reply(501, "5.5.4", "Syntax: EHLO domain or address literal")
            return
        peer = (self.meta.peer_address or "unknown").encode()
        self.transport.write(codec.reply_lines(250, [self.host + b" Hello " + peer, *self._extensions()]))

    def do_HELO(self, rest: bytes) -> None:
        if not self._greeted(rest, ehlo=False):
            self.reply(501, "5.5.4", "Syntax: HELO domain or address literal")
            return
        self.transport.write(codec.reply_lines(250, [self.host]))

    def _greeted(self, rest: bytes, ehlo: bool) -> bool:
        """Record the client's name (L{codec.helo_name}); False, and nothing changed, if it is none."""
        name = codec.helo_name(rest)
        if name is None:
            return False
        if self._helo_name is None:
            self._not_junk()  # the first greeting (again after STARTTLS) is no junk
        self._helo_name = self.meta.helo = name
        self._ehlo = ehlo
        self._abort_transaction()
        return True

    def do_NOOP(self, rest: bytes) -> None:
        self.reply(250, "2.0.0", "OK")

    def do_RSET(self, rest: bytes) -> None:
        self._abort_transaction()
        self.reply(250, "2.0.0", "Reset state")

    def do_QUIT(self, rest: bytes) -> None:
        self.reply(221, "2.0.0", "Bye")
        self._close()

    def do_VRFY(self, rest: bytes) -> None:
        if self._refused():
            return
        self.reply(252, "2.5.0", "Cannot VRFY user; try RCPT")

    do_EXPN = do_VRFY

    def do_HELP(self, rest: bytes) -> None:
        self.reply(214, "2.0.0", "See RFC 5321 and RFC 4954")

    def _abort_transaction(self) -> None:
        if self._writer is not None:
            self._writer.abort()
        self._reset_transaction()

    # -- STARTTLS ---------------------------------------------------------------

    def do_STARTTLS(self, rest: bytes) -> None:
        if rest.strip():
            self.reply(501, "5.5.4", "Syntax: STARTTLS (no parameters)")
        elif self.meta.tls:
            self.reply(503, "5.5.1", "TLS already active")
        elif not self._can_start_tls:
            self.reply(454, "4.7.0", "TLS not available")
        else:
            self.reply(220, "2.0.0", "Ready to start TLS")
            # Whatever the client sent after STARTTLS in plaintext is dropped
            # (CVE-2011-0411), and everything said before is forgotten.
            self._codec.discard_input()
            self._not_junk()
            self._reset_session()
            self.transport.startTLS(self.factory.tls)
            self.meta.tls = True
            self.meta.helo = None
            self._can_start_tls = False
            # startTLS re-registered us with the TLS layer, which starts
            # unpaused and pauses us again if its buffer fills.
            self._output_paused = False
            self._start_auth_deadline()  # again, if an AUTH before TLS had ended it

    # -- AUTH -------------------------------------------------------------------

    def do_AUTH(self, rest: bytes) -> None:
        parts = rest.split(None, 1)
        if not self._ehlo:
            self.reply(503, "5.5.1", "Send EHLO first")
        elif self.auth_info is not None:
            self.reply(503, "5.5.1", "Already authenticated")
        elif self._from is not None:
            self.reply(503, "5.5.1", "AUTH not permitted during a mail transaction")
        elif not parts:
            self.reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
        else:
            name = parts[0].decode("ascii", "replace").upper()
            factory = self.settings.mechanisms.get(name)
            if factory is None:
                self.reply(504, "5.5.4", "Unrecognized authentication type")
            elif name not in self._offered():
                self.reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
            else:
                self._start_auth(factory, parts[1] if len(parts) > 1 else None)

    def _start_auth(self, factory: Any, initial: bytes | None) -> None:
        try:
            mechanism = factory()
        except Exception:  # noqa: BLE001 - a plug-in mechanism that cannot start
            log.failure("SASL mechanism {factory!r} failed to start", factory=factory)
            self.reply(454, "4.7.0", "Temporary authentication failure")
            return
        self._mechanism = mechanism
        self._codec.expect_auth()
        if initial is None:
            self._challenge()
            return
        if not getattr(mechanism, "initial_response", False) and mechanism.getChallenge():
            # A server-first mechanism (CRAM-MD5): the client must wait for the challenge.
            self._auth_error(sasl.SASLError(501, "5.7.0", "Initial response not allowed"))
            return
        self._respond(initial, initial=True)

    def _challenge(self) -> None:
        self.transport.write(codec.reply_lines(334, [sasl.encode(self._mechanism.getChallenge())]))

    def _end_auth(self) -> None:
        self._codec.expect_command()
        self._mechanism = None

    def _respond(self, line: bytes, initial: bool) -> None:
        mechanism = self._mechanism
        try:
            mechanism.setResponse(sasl.decode(line, initial=initial))
        except sasl.SASLError as e:
            self._auth_error(e)
            return
        except Exception:  # noqa: BLE001 - a plug-in mechanism's parse error
            self._auth_error(sasl.malformed())
            return
        if mechanism.moreChallenges():
            self._challenge()
            return
        self._end_auth()
        self._not_junk()  # a login attempt: counted by max_auth_failures instead
        credentials = sasl.credentials_of(mechanism, self.meta)
        d = login_running(self.transport, login(self.portal, credentials, IAuthInfo))
        d.addCallbacks(self._authenticated, self._auth_failed)
        self._wait(d)

    def _auth_error(self, error: sasl.SASLError) -> None:
        self._end_auth()
        self.reply(error.code, error.enhanced, error.text)
        self._check_junk()  # the AUTH command of an exchange that led to no login

    def _authenticated(self, result: tuple[Any, Any, Any]) -> None:
        _, info, _ = result
        self.auth_info = info
        authenticated(self.transport)  # out of the budget's unauthenticated share
        self._cancel_auth_deadline()
        self.reply(235, "2.7.0", "Authentication successful")

    def _auth_failed(self, reason: Failure) -> None:
        if reason.check(Reject):
            rejection = reason.value
            self._auth_failures += 1
            self.reply(rejection.code, rejection.enhanced, rejection.text)
            if rejection.disconnect:
                self._close()
                return
        elif reason.check(UnauthorizedLogin):
            self._auth_failures += 1
            self.reply(535, "5.7.8", "Authentication credentials invalid")
        elif reason.check(defer.CancelledError):
            return
        elif reason.check(TemporaryFailure, UnhandledCredentials):
            if reason.check(Throttled):
                # Its own failures refused this pair or peer: retrying in the
                # same session cannot succeed until the window passes.
                self._auth_failures += 1
            self.reply(454, "4.7.0", "Temporary authentication failure")
        else:  # login() turns checker errors into AuthBackendError; anything else is ours
            log.failure("SMTP login failed", reason)
            self.reply(454, "4.7.0", "Temporary authentication failure")
        if self._auth_failures >= self.settings.max_auth_failures:
            self.reply(421, "4.7.0", "Too many failed authentications, closing connection")
            self._close()

    # -- the transaction ----------------------------------------------------

    def _may_submit(self) -> bool:
        if self.auth_info is not None:
            return True
        return in_networks(self.meta.peer_address, self.settings.trusted_networks)

    def _refused(self) -> bool:
        """Answer 530 when this session may not submit (yet)."""
        if self._may_submit():
            return False
        self.reply(530, "5.7.0", "Authentication required")
        return True

    def do_MAIL(self, rest: bytes) -> None:
        if self._refused():
            return
        if self._helo_name is None:
            self.reply(503, "5.5.1", "Send HELO/EHLO first")
            return
        if self._from is not None:
            self.reply(503, "5.5.1", "Nested MAIL command")
            return
        try:
            mail = codec.parse_mail(rest, self.host, self.settings.max_size)
        except codec.CommandError as e:
            self.reply(e.code, e.enhanced, e.text)
            return
        if self.settings.sender_binding and not self._sender_allowed(mail.sender):
            self.reply(553, "5.7.1", "Sender address not allowed for this identity")
            return
        mail_auth = self._trusted_mail_auth(mail.parameters.get("AUTH"))

        def accept(_: object = None) -> None:
            self._from = mail.sender
            self._mail_auth = mail_auth
            self.reply(250, "2.1.0", "Sender OK")

        # With a relay behind it, the queue may hold a new transaction back
        # for a moment (bounded) while it catches up.
        admitted = self.factory.spool.admit()
        if admitted is None:
            accept()
        else:
            admitted.addCallbacks(accept, _client_gone)
            self._wait(admitted)

    def _trusted_mail_auth(self, mailbox: str | None) -> str | None:
        """
        The C{AUTH=} mailbox to record (RFC 4954 section 5): as given only from
        an authenticated session, and with sender binding only a mailbox the
        identity may also use as MAIL FROM; otherwise C{<>}, as if the client
        had sent C{AUTH=<>}. None when the parameter was not given.
        """
        if mailbox is None or mailbox == "<>":
            return mailbox
        if self.auth_info is None:  # a trusted network: nobody vouches for it
            return "<>"
        if self.settings.sender_binding and not self._sender_allowed(mailbox):
            return "<>"
        return mailbox

    def _sender_allowed(self, sender: str) -> bool:
        """
        Sender binding (L{gateway.acl.may_send_as}) for the session's
        identity. A session acting as another identity by the ACL's grant
        (L{gateway.realm.AUTHZ_GRANT}) needs that grant now too: a reload
        that revoked it binds the session to nothing.
        """
        if self.auth_info is None:  # a trusted network: no identity to bind
            return True
        policy = self.factory.policy
        granted = self.meta.state.get(AUTHZ_GRANT)
        if granted is not None and not may_act_as(policy, self.auth_info, granted, self.meta):
            return False
        return may_send_as(policy, self.auth_info, sender, self.meta)

    def do_RCPT(self, rest: bytes) -> None:
        if self._refused():
            return
        if self._from is None:
            self.reply(503, "5.5.1", "Need MAIL before RCPT")
            return
        try:
            recipient = codec.parse_rcpt(rest, self.host)
        except codec.CommandError as e:
            self.reply(e.code, e.enhanced, e.text)
            return
        if len(self._to) >= self.settings.max_recipients:
            self.reply(452, "4.5.3", "Too many recipients")
            return
        self._to.append(recipient)
        self.reply(250, "2.1.5", "Recipient OK")

    def do_DATA(self, rest: bytes) -> None:
        if self._refused():
            return
        if rest.strip():
            self.reply(501, "5.5.4", "Syntax: DATA (no parameters)")
            return
        if self._from is None or not self._to:
            self.reply(503, "5.5.1", "Need MAIL and RCPT before DATA")
            return
        try:
            self._writer = self.factory.spool.open()
        except SpoolError as e:
            log.error("cannot open a spool file: {error}", error=str(e))
            self.reply(451, "4.3.0", "Requested action aborted: local error in processing")
            return
        self._codec.expect_data(self.settings.max_size)
        self._in_data = True
        self._writer.write(self._received_header(self._writer.id))
        self.reply(354, "2.0.0", "End data with <CR><LF>.<CR><LF>")

    def _on_end_of_data(self, event: codec.EndOfData) -> None:
        writer = self._writer
        envelope = self._envelope() if writer is not None else None
        self._in_data = False
        self._reset_transaction()
        if event.error is not None or writer is None:
            self.reply(*(event.error or (451, "4.3.0", "Requested action aborted")))
            return
        d = defer.maybeDeferred(writer.finish, envelope)

        def stored(message_id: str) -> None:
            log.info(
                "message {id} accepted from {authn} ({peer}) for {count} recipient(s)",
                id=message_id,
                authn=envelope.authn_id,
                peer=envelope.peer_address,
                count=len(envelope.rcpt_to),
            )
            self.reply(250, "2.0.0", f"Ok: queued as {message_id}")

        def failed(reason: Failure) -> None:
            if reason.check(defer.CancelledError):  # the client left; the commit goes on
                return
            log.error("cannot spool a message: {error}", error=str(reason.value))
            self.reply(451, "4.3.0", "Requested action aborted: local error in processing")

        d.addCallbacks(stored, failed)
        self._wait(d)

    # -- what gets recorded -----------------------------------------------

    def _protocol_word(self) -> str:
        """RFC 3848: ESMTP plus S for TLS and A for authenticated."""
        return "ESMTP" + ("S" if self.meta.tls else "") + ("A" if self.auth_info else "")

    def _tls_info(self) -> dict[str, str] | None:
        return tls_details(self.transport) if self.meta.tls else None

    def _envelope(self) -> Envelope:
        return Envelope(
            mail_from=self._from or "",
            rcpt_to=tuple(self._to),
            helo=self._helo_name,
            auth_info=self.auth_info,
            peer_address=self.meta.peer_address,
            peer_port=self.meta.peer_port,
            local_address=self.meta.local_address,
            local_port=self.meta.local_port,
            tls=self._tls_info(),
            protocol=self._protocol_word(),
            mail_auth=self._mail_auth,
        )

    def _received_header(self, message_id: str) -> bytes:
        return received_header(self._envelope(), self.settings.hostname, message_id)


def _client_gone(reason: Failure) -> None:
    """A wait the session cancelled because its client left: nothing to answer."""
    reason.trap(defer.CancelledError)


#: The commands, by verb (anything else is L{SubmissionServer.do_UNKNOWN}).
_COMMANDS = {
    name[3:]: method
    for name, method in vars(SubmissionServer).items()
    if name.startswith("do_") and name != "do_UNKNOWN"
}
#: What the server does with each of the codec's events.
_HANDLERS: dict[type, Any] = {
    codec.Command: SubmissionServer._on_command,
    codec.Malformed: SubmissionServer._on_malformed,
    codec.LineTooLong: SubmissionServer._on_line_too_long,
    codec.AuthResponse: SubmissionServer._on_auth_response,
    codec.MessageText: SubmissionServer._on_message_text,
    codec.DataRefused: SubmissionServer._on_data_refused,
    codec.EndOfData: SubmissionServer._on_end_of_data,
}


#: The refusals of a connection over a bound (gateway.connections).
_REFUSALS = {
    Refused.PEER: b"421 4.7.0 Too many connections from your address\r\n",
    Refused.BUSY: b"421 4.3.2 Too many connections, try again later\r\n",
}


class SMTPDoor:
    """
    The SMTP front door: C{--smtp} (STARTTLS) and C{--smtps} (implicit TLS)
    listeners, one connection cap per peer for both (trusted networks
    exempt); a peer over it gets C{421 4.7.0} on a plain listener, and is
    closed before the handshake on an implicit-TLS one.
    """

    #: SMTP has no ALPN name of its own: the extension is ignored.
    alpn: tuple[bytes, ...] = ()

    def __init__(self, core: Core, settings: SMTPSettings) -> None:
        self.core = core
        self.settings = settings

    def listen(
        self, endpoint: Any, name: str, tls: Any | None
    ) -> internet.StreamServerEndpointService:
        core = self.core
        factory = SubmissionFactory(
            core.portal,
            core.policy,
            core.spool,
            self.settings,
            name,
            tls=core.tls.server_tls(self.alpn) if tls is None else None,  # STARTTLS
            implicit_tls=tls is not None,
        )
        limited = limit_connections(
            core,
            factory,
            "smtp",
            name,
            self.settings.max_connections_per_peer,
            weight=2,  # the socket and, during DATA, a spool file
            exempt=self.settings.trusted_networks,
            refusals=_REFUSALS,
            tls=tls,
        )
        return internet.StreamServerEndpointService(endpoint, limited)


__all__ = [
    "CLOSE_GRACE",
    "MAX_BUFFERED_INPUT",
    "MAX_COMMAND_LINE",
    "MAX_DATA_LINE",
    "MAX_PENDING_INPUT",
    "SMTPSettings",
    "SubmissionFactory",
    "SubmissionServer",
    "SMTPDoor",
]
