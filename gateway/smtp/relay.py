# -*- test-case-name: tests.test_relay,tests.test_relay_integration -*-
"""
The relay client: where queued mail goes (C{--relay URL}) and a small
SMTP/LMTP client that takes it there.

L{parse_relay} reads a relay URL into a L{RelayTarget}; L{connect} opens a
connection to one (greeting, EHLO or LHLO, STARTTLS verified with
service-identity, AUTH PLAIN or LOGIN) and gives a L{RelayConnection}, whose
L{RelayConnection.send} carries one message at a time (RSET between them)
and answers with one L{Reply} per recipient, never an error for what the
relay says. When the relay offers PIPELINING (RFC 2920), RSET, MAIL, every
RCPT and DATA go in one write and their replies are read in order; the
handshake (STARTTLS, AUTH) is never pipelined.

Our own client rather than C{twisted.mail.smtp}, which installs the global
reactor when imported. Replies are read by the sans-I/O L{ReplyParser}
(lines and replies bounded, garbage a L{ProtocolError}); the message file is
streamed from disk, dot-stuffed by L{DotStuffer}, by a pull producer, so a
message is never held in memory whole. Every wait has a timeout from
L{RelaySettings}; a timeout, a lost connection or garbage ends the
connection and gives C{451 4.4.2} to every recipient without a reply.
"""

from __future__ import annotations

import base64
import os
import re
from collections import deque
from collections.abc import Sequence
from typing import IO, Any
from urllib.parse import parse_qsl, urlsplit

import attrs
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, error, interfaces, protocol, ssl
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.addresses import BadHost, split_authority
from gateway.fileio import open_regular, reason

__all__ = [
    "DotStuffer",
    "ProtocolError",
    "RelayAuth",
    "RelayConnection",
    "RelayError",
    "RelaySettings",
    "RelayTarget",
    "Reply",
    "ReplyParser",
    "SendResult",
    "connect",
    "parse_relay",
    "xtext_encode",
]

#: A reply line without its line end (RFC 5321 allows 512 octets; servers send more).
MAX_REPLY_LINE = 4096
#: Lines of one reply (an EHLO answer has one per extension).
MAX_REPLY_LINES = 100
#: Characters of L{Reply.text} kept (recorded in the queue state and in bounces).
MAX_REPLY_TEXT = 1000
#: The octets read from the message file at a time.
CHUNK_SIZE = 65536
#: The most a QUIT waits for its answer.
QUIT_TIMEOUT = 10.0

DEFAULT_PORTS = {"smtp": 25, "smtps": 465, "lmtp": 24}


class RelayError(Exception):
    """
    A relay could not be used (connect, greeting, TLS, AUTH, a lost
    connection, a timeout): one line, never a password. C{temporary} is
    False where trying again cannot help (a 5xx to AUTH).
    """

    def __init__(self, message: str, temporary: bool = True) -> None:
        super().__init__(message)
        self.temporary = temporary


class ProtocolError(Exception):
    """The relay sent something that is not an SMTP reply (or one too long)."""

    #: The replies completed before it, in the same input: they still count.
    replies: list[Reply] = []


# -- relay URLs ---------------------------------------------------------------


@attrs.frozen
class RelayTarget:
    """A relay, as C{--relay URL} names it."""

    url: str
    scheme: str
    host: str | None
    port: int | None
    path: str | None
    tls: str

    @property
    def lmtp(self) -> bool:
        return self.scheme == "lmtp"


_TLS_CHOICES = {
    "smtp": {"starttls": "starttls", "none": "none", "insecure": "insecure"},
    "smtps": {"implicit": "implicit", "insecure": "insecure"},
    "lmtp": {"none": "none"},
}
_DEFAULT_TLS = {"smtp": "starttls", "smtps": "implicit", "lmtp": "none"}


def parse_relay(url: str) -> RelayTarget:
    """
    Read a relay URL: C{smtp://host[:25]} (STARTTLS required),
    C{smtps://host[:465]} (implicit TLS), C{lmtp://host[:24]} or
    C{lmtp:///path/to.sock}; an IPv6 address in brackets; C{?tls=none}
    (no TLS, smtp and lmtp) or C{?tls=insecure} (TLS without verification,
    for tests). Nothing else: a user or password in the URL is refused
    (passwords are read from a file, see L{RelayAuth}).

    @raise ValueError: one line naming the problem.
    """
    if not url.isascii() or not url.isprintable() or " " in url:
        raise ValueError("relay URL: only printable ASCII without spaces")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_TLS:
        raise ValueError("relay URL: the scheme must be smtp://, smtps:// or lmtp://")
    if "@" in parts.netloc:
        raise ValueError("relay URL: no user or password in the URL (use --relay-auth USER:FILE)")
    if parts.fragment or url.endswith("#"):
        raise ValueError("relay URL: no fragment")
    tls = _DEFAULT_TLS[scheme]
    if parts.query or url.endswith("?"):
        try:
            query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True)
        except ValueError:
            raise ValueError("relay URL: a malformed query") from None
        if len(query) != 1 or query[0][0] != "tls":
            raise ValueError("relay URL: the only parameter is tls=none or tls=insecure")
        tls = query[0][1]
        if tls not in ("none", "insecure"):
            raise ValueError("relay URL: tls must be none or insecure")
        if tls not in _TLS_CHOICES[scheme]:
            raise ValueError(f"relay URL: tls={tls} cannot be used with {scheme}://")
    if scheme == "lmtp" and not parts.netloc:
        path = parts.path
        if not path.startswith("/") or path == "/" or "%" in path:
            raise ValueError("relay URL: lmtp:///path needs an absolute socket path")
        shown = f"lmtp://{path}"
        return RelayTarget(url=shown, scheme=scheme, host=None, port=None, path=path, tls=tls)
    if parts.path not in ("", "/"):
        raise ValueError(f"relay URL: no path after the host of {scheme}://")
    try:
        host, port = split_authority(parts.netloc)
    except BadHost as e:
        raise ValueError(f"relay URL: {e}") from None
    if port == 0:
        raise ValueError("relay URL: port 0")
    port = port or DEFAULT_PORTS[scheme]
    shown = f"{scheme}://{host}:{port}"
    if tls != _DEFAULT_TLS[scheme]:
        shown += f"?tls={tls}"
    bare = host[1:-1] if host.startswith("[") else host
    return RelayTarget(url=shown, scheme=scheme, host=bare, port=port, path=None, tls=tls)


def _secret_repr(value: str) -> str:
    return "<hidden>"


@attrs.frozen
class RelayAuth:
    """The user and password the gateway logs in to the relay with."""

    user: str
    password: str = attrs.field(repr=_secret_repr)

    def __str__(self) -> str:
        return f"RelayAuth(user={self.user!r})"

    @classmethod
    def from_option(cls, value: str) -> RelayAuth:
        """
        C{--relay-auth USER:FILE}: the password is the first line of FILE
        (never the command line, where C{ps} shows it).

        @raise ValueError: one line naming the problem, never the password.
        """
        user, colon, path = value.partition(":")
        if not colon or not user or not path:
            raise ValueError("--relay-auth takes USER:FILE")
        if "\0" in user or not user.isprintable():
            raise ValueError("--relay-auth: the user has a control character")
        try:
            with open(path, "rb") as f:
                data = f.read(4096)
        except OSError as e:
            raise ValueError(f"--relay-auth: cannot read {path}: {reason(e)}") from None
        first = data.split(b"\n", 1)[0].rstrip(b"\r")
        try:
            password = first.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"--relay-auth: the password in {path} is not UTF-8") from None
        if not password:
            raise ValueError(f"--relay-auth: {path} has no password on its first line")
        if "\0" in password:
            raise ValueError(f"--relay-auth: the password in {path} has a NUL")
        return cls(user, password)


@attrs.frozen
class RelaySettings:
    """How the gateway relays: the targets in failover order, trust, login, timeouts."""

    targets: tuple[RelayTarget, ...]
    ca: tuple[ssl.Certificate, ...] | None = None  # None: the system's trust store
    auth: RelayAuth | None = None
    helo: str = "localhost"
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    data_timeout: float = 600.0

    def client_tls(self, target: RelayTarget) -> Any:
        """The client TLS options for C{target}: verified against C{ca}, or not at all for tls=insecure."""
        if target.tls == "insecure":
            return ssl.CertificateOptions()
        trust = ssl.platformTrust() if self.ca is None else ssl.trustRootFromCertificates(list(self.ca))
        assert target.host is not None
        return ssl.optionsForClientTLS(target.host, trustRoot=trust)


# -- replies ------------------------------------------------------------------


@attrs.frozen
class Reply:
    """One SMTP reply: its code and its text (all lines joined by a space, printable, bounded)."""

    code: int
    text: str
    lines: tuple[str, ...] = attrs.field(default=(), eq=False, repr=False)

    def __str__(self) -> str:
        return f"{self.code} {self.text}" if self.text else str(self.code)

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500


#: What a recipient gets when the connection ends before its reply.
LOST = Reply(451, "4.4.2 connection to the relay lost")


def _lost(why: Exception, target: RelayTarget) -> Reply:
    """L{LOST}, saying why (a timeout, an unexpected reply, TLS...), for the state and the log."""
    text = str(why).removeprefix(f"{target.url}: ")
    return Reply(451, _bounded(f"4.4.2 {text}"))

_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]|$)")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def _printable(raw: bytes) -> str:
    return _UNPRINTABLE.sub("?", raw.decode("ascii", "replace"))


def _bounded(text: str) -> str:
    return text if len(text) <= MAX_REPLY_TEXT else text[: MAX_REPLY_TEXT - 3] + "..."


class ReplyParser:
    """
    The octets a relay sends in, L{Reply} values out (sans-I/O). Lines end
    with LF (a CR before it is dropped); a line is bounded by
    L{MAX_REPLY_LINE}, a reply by L{MAX_REPLY_LINES}; anything that is not a
    reply line, or a multi-line reply changing its code, is a
    L{ProtocolError} (after which the parser is of no further use).
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._lines: list[str] = []
        self._code: int | None = None

    def feed(self, data: bytes) -> list[Reply]:
        """The replies completed by C{data}."""
        self._buffer += data
        replies = []
        start = 0
        while True:
            end = self._buffer.find(b"\n", start)
            if end < 0:
                break
            line = self._buffer[start:end]
            start = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            try:
                if len(line) > MAX_REPLY_LINE:
                    raise ProtocolError("a reply line too long")
                reply = self._line(line)
            except ProtocolError as e:
                e.replies = replies  # complete before it: they still count
                raise
            if reply is not None:
                replies.append(reply)
        self._buffer = self._buffer[start:]
        if len(self._buffer) > MAX_REPLY_LINE + 1:
            error = ProtocolError("a reply line too long")
            error.replies = replies
            raise error
        return replies

    @property
    def pending(self) -> bool:
        """Whether part of a reply has arrived (a line or the lines before a last one)."""
        return bool(self._buffer or self._lines)

    def _line(self, line: bytes) -> Reply | None:
        match = _REPLY_LINE.match(line)
        if match is None:
            raise ProtocolError("a reply line that is not NNN text")
        code = int(match.group(1))
        if self._code is not None and code != self._code:
            raise ProtocolError("a multi-line reply that changes its code")
        self._code = code
        self._lines.append(_printable(line[4:]))
        if match.group(2) == b"-":
            if len(self._lines) >= MAX_REPLY_LINES:
                raise ProtocolError("a reply with too many lines")
            return None
        lines, self._lines, self._code = tuple(self._lines), [], None
        text = _bounded(" ".join(t for t in lines if t))
        return Reply(code, text, lines)


# -- message text ------------------------------------------------------------


class DotStuffer:
    """
    Message text to DATA's wire form (RFC 5321 section 4.5.2), in chunks
    cut anywhere: a dot is doubled at the start of each line (after any LF,
    so a bare LF cannot make an end of data either), and L{end} gives the
    end-of-data line, preceded by a CRLF if the text did not end with one.
    """

    def __init__(self) -> None:
        self._at_line_start = True
        self._last = b"\n"
        self._previous = b"\r"

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        out = chunk.replace(b"\n.", b"\n..")
        if self._at_line_start and chunk[:1] == b".":
            out = b"." + out
        self._at_line_start = chunk.endswith(b"\n")
        self._previous = chunk[-2:-1] if len(chunk) > 1 else self._last
        self._last = chunk[-1:]
        return out

    def end(self) -> bytes:
        if self._last == b"\n" and self._previous == b"\r":
            return b".\r\n"
        return b"\r\n.\r\n"


def xtext_encode(value: str) -> str:
    """RFC 3461 xtext: octets outside C{!}..C{~}, C{+} and C{=} as C{+XX}."""
    out = []
    for octet in value.encode("utf-8"):
        if 0x21 <= octet <= 0x7E and octet not in (0x2B, 0x3D):
            out.append(chr(octet))
        else:
            out.append(f"+{octet:02X}")
    return "".join(out)


_PATH_TEXT = re.compile(r"[\x20-\x7e]*")


def _sendable(address: str) -> bool:
    """
    Whether an address can go into a command line as it is: printable ASCII
    (a quoted local part may hold a space, C{<} or C{>}; the front doors held
    it to RFC 5321), never a control character or 8-bit octet.
    """
    return bool(_PATH_TEXT.fullmatch(address))


# -- the client ----------------------------------------------------------------


@attrs.frozen
class SendResult:
    """What became of one message: a reply per recipient, and whether the connection goes on."""

    replies: tuple[Reply, ...]
    usable: bool


@implementer(interfaces.IPullProducer)
class _MessageProducer:
    """Reads the message file (its caller closes it) a chunk at a time as the transport asks, dot-stuffed."""

    def __init__(self, file: IO[bytes], connection: RelayConnection) -> None:
        self._file = file
        self._connection = connection
        self._stuffer = DotStuffer()
        self.done: defer.Deferred[None] = defer.Deferred()

    def resumeProducing(self) -> None:
        if self.done.called:
            return
        try:
            chunk = self._file.read(CHUNK_SIZE)
        except OSError as e:
            self._finish(Failure(e))
            return
        transport = self._connection.transport
        assert transport is not None
        self._connection.progress()
        if chunk:
            transport.write(self._stuffer.feed(chunk))
            return
        transport.unregisterProducer()
        transport.write(self._stuffer.end())
        self._finish(None)

    def stopProducing(self) -> None:
        self._finish(Failure(RelayError("connection to the relay lost while sending the message")))

    def _finish(self, failure: Failure | None) -> None:
        if self.done.called:
            return
        if failure is None:
            self.done.callback(None)
        else:
            self.done.errback(failure)


def _refuses_parameters(reply: Reply) -> bool:
    """A refusal of MAIL's parameters: 555 (RFC 5321), or a 501/504 saying so."""
    return reply.code == 555 or (reply.code in (501, 504) and "param" in reply.text.lower())


def _lost_reason(why: Failure, target: RelayTarget) -> str:
    if why.check(VerificationError):
        return f"TLS failure: the certificate is not for {target.host}"
    if why.check(SSL.Error):
        try:
            detail = str(why.value.args[0][0][2])  # [(library, function, reason), ...]
        except (IndexError, TypeError):
            return "TLS failure"
        return f"TLS failure: {detail}"
    if why.check(error.ConnectionDone):
        return "connection closed by the relay"
    return "connection to the relay lost"


@attrs.define
class _Wait:
    """A reply awaited: its Deferred, its timeout, and its timer once it is the next reply due."""

    deferred: defer.Deferred[Reply]
    timeout: float
    timer: Any = None


class RelayConnection(protocol.Protocol):
    """
    One connection to a relay. Replies are awaited in order, each with its
    timeout, counted from the reply before it (or from the command, when
    none is due): a relay working through pipelined commands one at a time
    is not cut short, one that stalls is. Whatever ends the connection (a
    timeout, garbage, the peer, TLS) fails every wait with a L{RelayError}
    and later sends answer C{451 4.4.2} at once.
    """

    def __init__(self, settings: RelaySettings, target: RelayTarget, clock: Any) -> None:
        self.settings = settings
        self.target = target
        self._clock = clock
        self._parser = ReplyParser()
        self._waiting: deque[_Wait] = deque()
        self._greeting: defer.Deferred[Reply] | None = None
        self._stream_timer: Any = None
        self._broken: RelayError | None = None
        self._closed: defer.Deferred[None] = defer.Deferred()
        self.extensions: dict[str, str] = {}
        self.tls = target.tls == "implicit" or (target.tls == "insecure" and target.scheme == "smtps")
        self._mail_auth = True  # whether MAIL may carry AUTH= (off after a 555 to it)
        self._used = False  # a message was sent: RSET before the next one
        self._busy = False
        self._quitting = False
        self._producer: _MessageProducer | None = None
        self._unread: deque[Reply] = deque()  # replies read but not yet handed to their waits

    def __repr__(self) -> str:
        return f"<RelayConnection {self.target.url}>"

    @property
    def alive(self) -> bool:
        """Whether the connection can carry a message (the relay may close it between messages)."""
        return self._broken is None and not self._quitting

    # -- transport events

    def connectionMade(self) -> None:
        # Small writes waiting for a reply (a command, the end of data after the
        # text): Nagle's algorithm would hold each behind the relay's delayed ACK.
        no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if no_delay is not None:
            no_delay(True)
        self._greeting = self._expect(self.settings.command_timeout)

    def dataReceived(self, data: bytes) -> None:
        if self._broken is not None:
            return
        error: ProtocolError | None = None
        try:
            replies = self._parser.feed(data)
        except ProtocolError as e:
            replies, error = e.replies, e
        self._unread = deque(replies)
        while self._unread and self._broken is None:
            reply = self._unread.popleft()
            if not self._waiting:
                what = "closing" if reply.code == 421 else "an unexpected reply"
                self._break(RelayError(f"{self.target.url}: {what}: {reply}"))
                return
            wait = self._waiting.popleft()
            wait.timer.cancel()
            if self._waiting:
                self._start(self._waiting[0])
            wait.deferred.callback(reply)
        if error is not None:  # after the good replies before it (a 250 then junk is still a 250)
            self._break(RelayError(f"{self.target.url}: {error}"))

    def connectionLost(self, why: Failure = protocol.connectionDone) -> None:
        self._break(RelayError(f"{self.target.url}: {_lost_reason(why, self.target)}"), abort=False)
        self._cancel_stream_timer()
        if not self._closed.called:
            self._closed.callback(None)

    # -- waits

    def _expect(self, timeout: float) -> defer.Deferred[Reply]:
        d: defer.Deferred[Reply] = defer.Deferred()
        if self._broken is not None:
            d.errback(self._broken)
            return d
        wait = _Wait(d, timeout)
        if not self._waiting:
            self._start(wait)
        self._waiting.append(wait)
        return d

    def _start(self, wait: _Wait) -> None:
        """C{wait} is the next reply due: its timeout runs from now."""
        wait.timer = self._clock.callLater(wait.timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._break(RelayError(f"{self.target.url}: timed out waiting for the relay"))

    def progress(self) -> None:
        """The message stream moved: restart its stall timer (a relay that stops reading)."""
        self._cancel_stream_timer()
        self._stream_timer = self._clock.callLater(self.settings.command_timeout, self._timed_out)

    def _cancel_stream_timer(self) -> None:
        if self._stream_timer is not None and self._stream_timer.active():
            self._stream_timer.cancel()
        self._stream_timer = None

    def _break(self, why: RelayError, abort: bool = True) -> None:
        """End the connection: every wait fails with C{why}."""
        if self._broken is None:
            self._broken = why
        waiting, self._waiting = self._waiting, deque()
        for wait in waiting:
            if wait.timer is not None and wait.timer.active():
                wait.timer.cancel()
            wait.deferred.errback(self._broken)
        if self._producer is not None:
            self._producer.stopProducing()
        if abort and self.transport is not None:
            self.transport.abortConnection()

    def _command(self, line: bytes, timeout: float | None = None) -> defer.Deferred[Reply]:
        return self._commands([line], timeout)[0]

    def _commands(self, lines: Sequence[bytes], timeout: float | None = None) -> list[defer.Deferred[Reply]]:
        """Send C{lines} in one write (a pipelined group when there are several): a wait per reply."""
        if self._broken is None and (self._unread or self._parser.pending):
            # Replies already here for commands not written yet: the relay
            # answers what it cannot have read (as after STARTTLS).
            self._break(RelayError(f"{self.target.url}: a reply before its command"))
        if self._broken is None:
            assert self.transport is not None
            self.transport.write(b"".join(line + b"\r\n" for line in lines))
        return [self._expect(self.settings.command_timeout if timeout is None else timeout) for _ in lines]

    # -- the session

    async def handshake(self) -> RelayConnection:
        """
        Greeting, EHLO/LHLO, STARTTLS, EHLO again, AUTH: a connection ready
        for mail, or a L{RelayError} (and the connection aborted).
        """
        try:
            return await self._handshake()
        except RelayError as e:
            self._break(e)
            raise

    async def _handshake(self) -> RelayConnection:
        url = self.target.url
        assert self._greeting is not None, "handshake before the connection is made"
        greeting = await self._greeting
        if greeting.code != 220:
            raise RelayError(f"{url}: greeting {greeting}", temporary=greeting.temporary)
        await self._hello()
        if self.target.tls in ("starttls", "insecure") and not self.tls:
            if "STARTTLS" not in self.extensions:
                raise RelayError(f"{url}: STARTTLS is required but not offered")
            reply = await self._command(b"STARTTLS")
            if reply.code != 220:
                raise RelayError(f"{url}: STARTTLS refused: {reply}", temporary=reply.temporary)
            if self._parser.pending or self._unread:  # sent before TLS, to be read as if after it
                raise RelayError(f"{url}: text after the STARTTLS reply")
            assert self.transport is not None
            self.transport.startTLS(self.settings.client_tls(self.target))
            self.tls = True
            await self._hello()
        if self.settings.auth is not None:
            await self._login(self.settings.auth)
        return self

    async def _hello(self) -> None:
        verb = b"LHLO " if self.target.lmtp else b"EHLO "
        reply = await self._command(verb + self.settings.helo.encode("ascii"))
        if reply.code != 250:
            raise RelayError(f"{self.target.url}: {verb.decode().strip()} refused: {reply}",
                             temporary=reply.temporary)
        self.extensions = {}
        for line in reply.lines[1:]:
            keyword, _, params = line.partition(" ")
            if "=" in keyword:  # the old "AUTH=PLAIN LOGIN" spelling
                keyword, _, params = line.partition("=")
            if keyword:
                self.extensions.setdefault(keyword.upper(), params.strip())

    async def _login(self, auth: RelayAuth) -> None:
        url = self.target.url
        if not (self.tls or self.target.tls == "none"):
            raise RelayError(f"{url}: no AUTH without TLS", temporary=False)
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        user, password = auth.user.encode("utf-8"), auth.password.encode("utf-8")
        if "PLAIN" in mechanisms:
            reply = await self._command(b"AUTH PLAIN " + base64.b64encode(b"\0" + user + b"\0" + password))
        elif "LOGIN" in mechanisms:
            reply = await self._command(b"AUTH LOGIN")
            if reply.code == 334:
                reply = await self._command(base64.b64encode(user))
            if reply.code == 334:
                reply = await self._command(base64.b64encode(password))
        else:
            raise RelayError(f"{url}: the relay offers neither AUTH PLAIN nor LOGIN", temporary=False)
        if reply.code == 334:  # a challenge we have no answer for: cancel it
            reply = await self._command(b"*")
        if reply.code != 235:
            raise RelayError(f"{url}: AUTH refused: {reply}", temporary=not 500 <= reply.code < 600)

    def send(
        self, mail_from: str, recipients: Sequence[str], message_path: str, size: int, auth: str | None
    ) -> defer.Deferred[SendResult]:
        """
        Relay one message: a L{Reply} per recipient, in order. Never fails
        for what the relay answers or for a lost connection (those are
        replies); fails only with the C{OSError} of a message file that
        cannot be opened, or is not a regular file (nothing was sent) or
        for a programming error (a send while another runs).

        C{auth} is the C{AUTH=} identity (RFC 4954 section 5), sent
        xtext-encoded when the relay offers AUTH (C{<>} for None); a 555,
        or a 501/504 naming parameters, to such a MAIL gets RSET and the
        MAIL again without it (after a 555 this connection sends it no more).
        """
        if self._busy:
            return defer.fail(RuntimeError("RelayConnection.send while a message is being sent"))
        try:
            file = os.fdopen(open_regular(message_path), "rb")  # no link, no FIFO planted in the spool
        except OSError as e:
            return defer.fail(e)
        self._busy = True
        replies: list[Reply | None] = [None] * len(recipients)

        def done(result: Any) -> SendResult | Failure:
            self._busy = False
            if isinstance(result, Failure):
                if not result.check(RelayError):
                    return result
                self._break(result.value)
            lost = LOST if self._broken is None else _lost(self._broken, self.target)
            final = tuple(lost if r is None else r for r in replies)
            return SendResult(final, usable=self._broken is None and not self._quitting)

        d = defer.ensureDeferred(self._send(mail_from, recipients, file, size, auth, replies))
        d.addBoth(lambda result: (file.close(), result)[1])
        return d.addBoth(done)

    async def _send(
        self, mail_from: str, recipients: Sequence[str], file: IO[bytes], size: int,
        auth: str | None, replies: list[Reply | None],
    ) -> None:
        if self._broken is not None or self._quitting:
            return
        if not _sendable(mail_from):
            replies[:] = [Reply(553, "5.1.7 sender address not sendable (not sent)")] * len(recipients)
            return
        reset, with_auth = self._used, self._sends_auth()
        self._used = True
        while await self._transaction(reset, self._mail_line(mail_from, size, auth, with_auth), with_auth,
                                      recipients, file, replies):
            # MAIL refused AUTH=: the message goes again without it. 555:
            # the relay takes no AUTH= at all (aiosmtpd 1.4.6), so this
            # connection stops sending it; a 501/504 may be about this value
            # only, so only this message goes on without it.
            reset, with_auth = True, False

    async def _transaction(
        self, reset: bool, mail: bytes, with_auth: bool, recipients: Sequence[str], file: IO[bytes],
        replies: list[Reply | None],
    ) -> bool:
        """
        One try at a message: RSET (after an earlier one), MAIL, RCPT, DATA,
        the text. With PIPELINING they go in one write up to DATA, and every
        reply is still read, in order, by the rules of the one-at-a-time
        exchange: the RCPTs' replies after a refused MAIL, and DATA's when no
        RCPT was accepted, are nobody's outcome. True when MAIL refused
        C{AUTH=} and the message is to go again without it.
        """
        sendable = [index for index, recipient in enumerate(recipients) if _sendable(recipient)]
        rcpts = {index: b"RCPT TO:<" + recipients[index].encode("ascii") + b">" for index in sendable}
        pending: deque[defer.Deferred[Reply]] | None = None
        if "PIPELINING" in self.extensions:
            lines = [b"RSET"] * reset + [mail] + list(rcpts.values()) + [b"DATA"] * bool(rcpts)
            pending = deque(self._commands(lines))

        def reply_to(line: bytes) -> defer.Deferred[Reply]:
            return self._command(line) if pending is None else pending.popleft()

        try:
            if reset:
                reply = await reply_to(b"RSET")
                if reply.code != 250:
                    raise RelayError(f"{self.target.url}: RSET refused: {reply}")
            reply = self._expected(await reply_to(mail), (250,), "MAIL")
            if reply.code != 250:
                refused_auth = with_auth and _refuses_parameters(reply)
                if refused_auth and reply.code == 555:
                    self._mail_auth = False
                if not refused_auth:
                    replies[:] = [reply] * len(recipients)
                self._closing(reply)
                if pending:  # every RCPT's reply, then DATA's
                    while len(pending) > 1:
                        self._closing(self._expected(await pending.popleft(), (250, 251), "RCPT"))
                    await self._no_message(self._expected(await pending.popleft(), (354,), "DATA"))
                return refused_auth
            accepted = []
            for index in range(len(recipients)):
                if index not in rcpts:
                    replies[index] = Reply(553, "5.1.3 recipient address not sendable (not sent)")
                    continue
                reply = self._expected(await reply_to(rcpts[index]), (250, 251), "RCPT")
                if reply.code in (250, 251):
                    accepted.append(index)
                else:
                    replies[index] = reply
                    self._closing(reply)
            if not rcpts or (not accepted and pending is None):
                return False
            reply = self._expected(await reply_to(b"DATA"), (354,), "DATA")
            if not accepted:
                await self._no_message(reply)
                return False
        finally:
            for wait in pending or ():
                wait.addErrback(lambda _: None)  # the connection broke: the first awaited said so
        if reply.code != 354:
            for index in accepted:
                replies[index] = reply
            self._closing(reply)
            return False
        await self._stream(file)
        # SMTP answers the message once for all; LMTP once per accepted recipient.
        groups = [[index] for index in accepted] if self.target.lmtp else [accepted]
        waits = [self._expect(self.settings.data_timeout) for _ in groups]
        try:
            for group, wait in zip(groups, waits):
                # Only a 250 delivers (221, 252, a stray 354: a relay out of step).
                reply = self._expected(await wait, (250,), "the end of data")
                for index in group:
                    replies[index] = reply
                self._closing(reply)
        finally:
            for wait in waits:
                wait.addErrback(lambda _: None)
        return False

    async def _no_message(self, reply: Reply) -> None:
        """
        DATA's reply when no recipient was accepted (pipelined): nobody's
        outcome. A relay that answers 354 all the same gets the end of data
        alone (RFC 2920 section 3.1), and the session ends: it is out of step
        with what it said.
        """
        self._closing(reply)
        if reply.code != 354:
            return
        await self._command(b".", self.settings.data_timeout)
        raise RelayError(f"{self.target.url}: 354 to DATA with no recipient accepted")

    def _expected(self, reply: Reply, going_on: tuple[int, ...], command: str) -> Reply:
        """
        C{reply} if it is one of C{going_on} or a refusal (4xx, 5xx); any
        other (a 2xx or 3xx that command cannot have: a relay out of step,
        answering twice) ends the connection, so that no recipient is ever
        taken as delivered for a reply that was not about its message.
        """
        if reply.code in going_on or 400 <= reply.code < 600:
            return reply
        raise RelayError(f"{self.target.url}: an unexpected reply to {command}: {reply}")

    def _sends_auth(self) -> bool:
        """Whether MAIL carries C{AUTH=}: the relay offers AUTH and has not refused the parameter."""
        return self._mail_auth and "AUTH" in self.extensions

    def _mail_line(self, mail_from: str, size: int, auth: str | None, with_auth: bool) -> bytes:
        line = f"MAIL FROM:<{mail_from}>"
        if "SIZE" in self.extensions:
            line += f" SIZE={size}"
        if "8BITMIME" in self.extensions:  # the front doors take 8-bit text (RFC 6152)
            line += " BODY=8BITMIME"
        if with_auth:
            line += " AUTH=" + ("<>" if auth is None else xtext_encode(auth))
        return line.encode("ascii")

    def _closing(self, reply: Reply) -> None:
        """A 421 says the relay closes the connection: it will carry nothing more."""
        if reply.code == 421:
            self._break(RelayError(f"{self.target.url}: closing: {reply}"))

    async def _stream(self, file: IO[bytes]) -> None:
        producer = self._producer = _MessageProducer(file, self)
        assert self.transport is not None
        self.progress()
        self.transport.registerProducer(producer, False)
        try:
            await producer.done
        except OSError as e:  # half a message was sent: only closing the connection takes it back
            self._break(RelayError(f"{self.target.url}: cannot read the message file: {reason(e)}"))
        finally:
            self._producer = None
            self._cancel_stream_timer()
        if self._broken is not None:
            raise self._broken

    def quit(self) -> defer.Deferred[None]:
        """
        QUIT and close: fires once the connection is closed, at most about
        twice L{QUIT_TIMEOUT} seconds later (then aborted); never fails.
        """
        closed: defer.Deferred[None] = defer.Deferred()

        def fire(_: Any) -> None:
            if abort.active():
                abort.cancel()
            closed.callback(None)

        abort = self._clock.callLater(2 * QUIT_TIMEOUT, self._abort)
        self._closed.addBoth(fire)
        if self._broken is None and not self._quitting and not self._busy:
            self._quitting = True
            reply = self._command(b"QUIT", timeout=min(QUIT_TIMEOUT, self.settings.command_timeout))
            reply.addErrback(lambda _: None)
            reply.addCallback(lambda _: self._lose())
        elif not self._quitting:
            self._break(RelayError(f"{self.target.url}: closed"))
        return closed

    def _lose(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()


class _Factory(protocol.Factory):
    noisy = False  # no "Starting factory" line per relay connection

    def __init__(self, settings: RelaySettings, target: RelayTarget, clock: Any) -> None:
        self.settings, self.target, self.clock = settings, target, clock

    def buildProtocol(self, addr: Any) -> RelayConnection:
        return RelayConnection(self.settings, self.target, self.clock)


def _endpoint(reactor: Any, settings: RelaySettings, target: RelayTarget) -> Any:
    if target.path is not None:
        return UNIXClientEndpoint(reactor, target.path, timeout=settings.connect_timeout)
    assert target.host is not None and target.port is not None
    endpoint = HostnameEndpoint(reactor, target.host, target.port, timeout=settings.connect_timeout)
    if target.scheme == "smtps":
        return wrapClientTLS(settings.client_tls(target), endpoint)
    return endpoint


def connect(reactor: Any, settings: RelaySettings, target: RelayTarget) -> defer.Deferred[RelayConnection]:
    """
    A connection to C{target} ready for mail (greeting, EHLO or LHLO,
    STARTTLS, AUTH done), or a L{RelayError}.
    """
    endpoint = _endpoint(reactor, settings, target)
    d = endpoint.connect(_Factory(settings, target, reactor))
    d.addTimeout(settings.connect_timeout, reactor)

    def connected(connection: RelayConnection) -> defer.Deferred[RelayConnection]:
        def failed(f: Failure) -> Failure:
            if connection.transport is not None:
                connection.transport.abortConnection()
            connection._broken = connection._broken or RelayError(f"{target.url}: closed")
            return f

        return defer.ensureDeferred(connection.handshake()).addErrback(failed)

    def not_connected(f: Failure) -> Failure:
        if f.check(RelayError):
            return f
        if f.check(defer.TimeoutError, error.TimeoutError, error.ConnectingCancelledError):
            why = "timed out"
        elif f.check(error.DNSLookupError):
            why = "host name not found"
        elif f.check(error.ConnectionRefusedError):
            why = "connection refused"
        elif f.check(error.ConnectError) or f.check(OSError):
            why = reason(f.value) if f.check(OSError) else "cannot connect"
        else:
            return f
        return Failure(RelayError(f"{target.url}: {why}"))

    d.addCallback(connected)
    return d.addErrback(not_connected)

