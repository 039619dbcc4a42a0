# -*- test-case-name: tests.test_smtp_codec -*-
"""
A sans-I/O SMTP submission codec: the octets of a session in, events out,
and replies formatted; no transport, no reactor, no policy.

In the style of h11, the protocol around it feeds what it reads to
L{ServerCodec.receive_data} and takes events one at a time with
L{ServerCodec.next_event} (None: more input is needed) while it can answer
them. It acts on each event before taking the next, so a reply that waits
(a login, a spool commit) holds the lines after it (RFC 2920 ordering), and
it tells the codec how to read what follows: L{ServerCodec.expect_data}
after C{354}, L{ServerCodec.expect_auth} while a SASL exchange runs,
L{ServerCodec.expect_command} when it ends. The message text switches back
to commands by itself at its end-of-data line::

    COMMAND -> Command | Malformed | LineTooLong
    AUTH    -> AuthResponse | LineTooLong
    DATA    -> MessageText* [DataRefused] EndOfData  -> COMMAND

Lines end with CRLF only: a bare LF never ends a line, so a message cannot
smuggle a second one past the end-of-data marker; a command with a bare CR
or LF is L{Malformed}, and message text with one is refused (C{554 5.6.11}).
Every line is bounded (L{MAX_COMMAND_LINE}, L{MAX_DATA_LINE}): the rest of a
line too long is skipped as it arrives, never held. Input is taken in time
linear in its size however it is split: lines are taken by moving a read
position, the buffer is compacted at most once per read, a partial line is
not searched again from its start, and message text is taken a block of
lines at a time.

The argument parsers (L{parse_mail}, L{parse_rcpt}, L{helo_name},
L{address}, L{xtext}, L{auth_mailbox}) hold what the client says that is
recorded to RFC 5321 without SMTPUTF8, and raise L{CommandError} with the
reply to give.
"""

from __future__ import annotations

import collections
import enum
import ipaddress
import re

import attrs

#: A command or AUTH line (RFC 4954 allows 12288 octets for AUTH).
MAX_COMMAND_LINE = 12288
#: A text line of a message, without its CRLF (RFC 5321 section 4.5.3.1.6).
MAX_DATA_LINE = 998


class Mode(enum.Enum):
    """How the next line is read."""

    COMMAND = "COMMAND"
    AUTH = "AUTH"
    DATA = "DATA"


@attrs.frozen
class Command:
    """A command: its verb in upper case (as sent if not ASCII) and the rest of the line."""

    verb: str
    argument: bytes = attrs.field(repr=False)  # AUTH's initial response is a secret


@attrs.frozen
class Malformed:
    """A command line that is no command; the reply to give."""

    code: int
    enhanced: str
    text: str


@attrs.frozen
class LineTooLong:
    """A command or AUTH line over L{MAX_COMMAND_LINE}; the rest of it is skipped."""


@attrs.frozen
class AuthResponse:
    """One SASL response line, stripped."""

    line: bytes = attrs.field(repr=False)


@attrs.frozen
class MessageText:
    """Message text, dot-unstuffed, whole lines with their CRLFs."""

    text: bytes = attrs.field(repr=False)


@attrs.frozen
class DataRefused:
    """The message is refused (its text so far can go); no more text is given until the end."""


@attrs.frozen
class EndOfData:
    """The end-of-data line; C{error} is the reply of the first refusal, if any."""

    error: tuple[int, str, str] | None


Event = Command | Malformed | LineTooLong | AuthResponse | MessageText | DataRefused | EndOfData

BARE_CR_LF = Malformed(501, "5.5.2", "Syntax error: bare CR or LF in command")
BAD_SYNTAX = Malformed(500, "5.5.2", "Error: bad syntax")
LINE_TOO_LONG = (500, "5.5.6", "Line too long")
TOO_BIG = (552, "5.3.4", "Message size exceeds fixed limit")
BARE_IN_TEXT = (554, "5.6.11", "Bare <CR> or <LF> in message text")
NUL_IN_TEXT = (554, "5.6.0", "NUL in message text")
#: A first line starting with a blank would continue the gateway's own
#: Received header (RFC 5322 2.2.3): a client could write into its trace.
FOLDED_START = (554, "5.6.0", "Message text must not start with a folded line")


def _line_start(text: bytes, index: int) -> int:
    """Where the CRLF-ended line holding C{text[index]} starts."""
    cut = text.rfind(b"\r\n", 0, index)
    return cut + 2 if cut >= 0 else 0


class ServerCodec:
    """
    The server side of one SMTP session's input: framing, commands and
    message text. Holds no more than the protocol lets it receive; the
    protocol bounds that (it stops reading while events wait).
    """

    def __init__(self) -> None:
        #: Input received; what is before C{_pos} has been taken. Lines are
        #: taken by moving C{_pos}, never by copying the rest of the buffer,
        #: which is compacted at most once per read (L{receive_data}); a
        #: read is appended in place. No CRLF starts before C{_scan} (a line
        #: arriving an octet at a time is not searched again from its start).
        self._buffer = bytearray()
        self._pos = 0
        self._scan = 0
        self._skipping = False  # discarding the rest of an overlong line
        self._events: collections.deque[Event] = collections.deque()
        self.mode = Mode.COMMAND
        self._max_size = 0
        self._data_size = 0
        self._data_error: tuple[int, str, str] | None = None

    # -- what the protocol says ---------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Octets read from the client; take the events with L{next_event}."""
        if self._pos:  # what was taken goes, once per read: taking a line only moves _pos
            del self._buffer[: self._pos]
            self._scan = max(0, self._scan - self._pos)
            self._pos = 0
        self._buffer += data

    def expect_command(self) -> None:
        self.mode = Mode.COMMAND

    def expect_auth(self) -> None:
        """A SASL exchange runs: lines are responses until L{expect_command}."""
        self.mode = Mode.AUTH

    def expect_data(self, max_size: int) -> None:
        """Message text follows, of at most C{max_size} octets once dot-unstuffed."""
        self.mode = Mode.DATA
        self._max_size = max_size
        self._data_size = 0
        self._data_error = None

    def discard_input(self) -> None:
        """Forget what was received and not taken (what was pipelined after STARTTLS)."""
        self._buffer, self._pos, self._scan, self._skipping = bytearray(), 0, 0, False
        self._events.clear()

    @property
    def buffered(self) -> int:
        """Octets received and not taken yet."""
        return len(self._buffer) - self._pos

    def line_waiting(self) -> bool:
        """Whether a complete line waits to be taken."""
        return bool(self._events) or self._find_line_end() >= 0

    # -- events ---------------------------------------------------------------

    def next_event(self) -> Event | None:
        """
        The next event, or None until more input arrives. Each line is found
        from C{_pos} on and C{_pos} moves past it, so the work is linear in
        the input however it is made.
        """
        events = self._events
        while not events:
            if self.mode is Mode.DATA and not self._skipping and self._data_block():
                continue
            buffer, start = self._buffer, self._pos
            end = self._find_line_end()
            if end < 0:
                # A partial line: a CR at its end may be half of the CRLF.
                length = len(buffer) - start - buffer.endswith(b"\r", start)
                # (No line of MAX_DATA_LINE octets is too long, whatever the mode.)
                if length > MAX_DATA_LINE and self._too_long(length, buffer.startswith(b".", start)):
                    if not self._skipping:
                        self._overlong()
                    self._pos = start + length
                break
            self._pos = end + 2
            if self._skipping:  # the tail of an overlong line
                self._skipping = False
                continue
            if end - start > MAX_DATA_LINE and self._too_long(end - start, buffer.startswith(b".", start)):
                self._overlong()
                self._skipping = False
                continue
            if self.mode is Mode.COMMAND:  # the common case, without the queue
                return _command(bytes(buffer[start:end]))
            self._line(bytes(buffer[start:end]))
        return events.popleft() if events else None

    def _find_line_end(self) -> int:
        """Where the next CRLF starts, or -1; never searches the same octets twice."""
        end = self._buffer.find(b"\r\n", max(self._pos, self._scan))
        if end < 0:
            self._scan = max(self._pos, len(self._buffer) - 1)  # a CR at the end may be half
        return end

    def _too_long(self, length: int, stuffed: bool) -> bool:
        """Whether a line of C{length} octets (C{stuffed}: starting with a dot) is too long."""
        if self.mode is not Mode.DATA:
            return length > MAX_COMMAND_LINE
        # RFC 5321 4.5.3.1.6: a dot added by dot-stuffing does not count.
        return length > MAX_DATA_LINE + stuffed

    def _overlong(self) -> None:
        self._skipping = True
        if self.mode is Mode.DATA:
            self._refuse(LINE_TOO_LONG)  # the first error is the reply, however the text is split
        else:
            self._events.append(LineTooLong())

    def _line(self, line: bytes) -> None:
        """The events of one complete line (without its CRLF)."""
        if self.mode is Mode.DATA:
            self._data_line(line)
        elif self.mode is Mode.AUTH:
            self._events.append(AuthResponse(line.strip()))
        else:
            self._events.append(_command(line))

    def _data_line(self, line: bytes) -> None:
        if line == b".":
            self._end_of_data()
        else:
            self._data_text((line[1:] if line.startswith(b".") else line) + b"\r\n")


    # -- message text ---------------------------------------------------------

    def _data_block(self) -> bool:
        """
        Take the complete lines of message text from C{_pos} on at once, up to
        and including the end-of-data line; False leaves the next line to the
        line-by-line path (no complete line yet, or the first line that is too
        long, whose precise handling is there). Same result as line by line,
        far fewer Python steps for a message of many lines; each call scans
        what it takes, and a line too long is looked for once per block, so
        the work stays linear in the input.
        """
        buffer, start = self._buffer, self._pos
        if buffer.startswith(b".\r\n", start):
            self._pos = start + 3
            self._end_of_data()
            return True
        end = buffer.find(b"\r\n.\r\n", start)
        if end >= 0:
            cut, after = end + 2, end + 5
        else:
            cut = buffer.rfind(b"\r\n", start) + 2
            if cut < start + 2:
                return False
            after = cut
        block = bytes(buffer[start:cut])
        if self._data_error is None:  # a message already refused needs no more checks
            lines = block.split(b"\r\n")
            if max(map(len, lines)) > MAX_DATA_LINE:
                # The first line too long (a stuffed dot does not count), if any:
                # the lines before it are taken here, it goes line by line.
                first = next(
                    (
                        i
                        for i, line in enumerate(lines)
                        if len(line) > MAX_DATA_LINE + line.startswith(b".")
                    ),
                    None,
                )
                if first is not None:
                    if first == 0:
                        return False
                    cut = start + sum(map(len, lines[:first])) + 2 * first
                    block, after, end = block[: cut - start], cut, -1
        self._pos = after
        # Dot-unstuffing: every line loses one leading dot.
        self._data_text((block[1:] if block.startswith(b".") else block).replace(b"\r\n.", b"\r\n"))
        if end >= 0:
            self._end_of_data()
        return True

    def _data_text(self, text: bytes) -> None:
        """Message text, dot-unstuffed, whole lines with their CRLFs."""
        if self._data_error is not None:  # already refused: read to the end
            return
        allowed = self._max_size - self._data_size  # the message itself, as SIZE counts
        over = len(text) > allowed
        if self._data_size == 0 and text[:1] in (b" ", b"\t"):
            self._refuse(FOLDED_START)
            return
        crlf = text.count(b"\r\n")
        bad = []
        if text.count(b"\r") != crlf or text.count(b"\n") != crlf:
            # A bare CR or LF: a next hop that takes it for a line end could
            # read an end of data (<LF>.<CR><LF>) and a smuggled message here.
            masked = text.replace(b"\r\n", b"  ")
            bad.append((min(i for i in (masked.find(b"\r"), masked.find(b"\n")) if i >= 0),
                        BARE_IN_TEXT))
        if b"\0" in text:  # RFC 5322 and RFC 6152 forbid it; a next hop may drop it
            bad.append((text.find(b"\0"), NUL_IN_TEXT))
        if bad:
            # The error of the first line that has one is the reply, as line
            # by line, however the text was split.
            where, error = min(bad)
            if not over or _line_start(text, where) <= _line_start(text, allowed):
                self._refuse(error)
                return
        if over:
            self._refuse(TOO_BIG)
            return
        self._data_size += len(text)
        self._events.append(MessageText(text))

    def _refuse(self, error: tuple[int, str, str]) -> None:
        if self._data_error is None:
            self._data_error = error
            self._events.append(DataRefused())

    def _end_of_data(self) -> None:
        self.mode = Mode.COMMAND
        self._events.append(EndOfData(self._data_error))
        self._data_error = None


def _command(line: bytes) -> Command | Malformed:
    """A command line's event."""
    if b"\n" in line or b"\r" in line:
        # Only CRLF ends a line (RFC 5321 2.3.8); a bare CR or LF in a command
        # is an error, and a bare LF made Twisted's MAIL/RCPT expressions
        # backtrack quadratically. Other bytes get each command's reply.
        return BARE_CR_LF
    parts = line.strip().split(None, 1)
    if not parts:
        return BAD_SYNTAX
    # Not ASCII: the replacement character keeps it from naming a command.
    verb = parts[0].decode("ascii", "replace").upper()
    return Command(verb, parts[1] if len(parts) > 1 else b"")


# -- replies --------------------------------------------------------------------


def reply(code: int, enhanced: str, text: str) -> bytes:
    """A one-line reply with its RFC 3463 enhanced status code."""
    return f"{code} {enhanced} {text}\r\n".encode()


def reply_lines(code: int, lines: list[bytes]) -> bytes:
    """A reply of one or more lines (C{NNN-} for all but the last), as for EHLO."""
    head = b"%d-" % code
    return b"".join([head + line + b"\r\n" for line in lines[:-1]]) + b"%d %s\r\n" % (code, lines[-1])


# -- arguments ------------------------------------------------------------------


class CommandError(Exception):
    """A command's argument refused; the reply to give (never holding client data but keywords)."""

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        super().__init__(text)
        self.code, self.enhanced, self.text = code, enhanced, text


#: Twisted's (twisted.mail.smtp) MAIL and RCPT expressions, kept as they are
#: for the same syntax: a string of quoted strings, backslash-escaped
#: characters, atom characters and C{@.,:}. The protocol never gives them a
#: line with a CR or LF, on which they backtrack.
_ATOM = rb"[-A-Za-z0-9!\#$%&'*+/=?^_`{|}~]"
_QSTRING = rb'("[^"]*"|\\.|' + _ATOM + rb"|[@.,:])+"
_MAIL = re.compile(
    rb"""\s*FROM:\s*(?P<path><> # Empty <>
                      |<""" + _QSTRING + rb"""> # <addr>
                      |""" + _QSTRING + rb""" # addr
                      )\s*(\s(?P<opts>.*))? # Optional WS + ESMTP options
                      $""",
    re.I | re.X,
)
_RCPT = re.compile(
    rb"\s*TO:\s*(?P<path><" + _QSTRING + rb"""> # <addr>
                      |""" + _QSTRING + rb""" # addr
                      )\s*(\s(?P<opts>.*))? # Optional WS + ESMTP options
                      $""",
    re.I | re.X,
)
#: Twisted's address tokens: quoted strings, escaped characters, atom
#: characters, or any one character.
_TOKENS = re.compile(rb'((?:"[^"]*"|\\.|' + _ATOM + rb")+|.)")
_ATOM_CHAR = re.compile(_ATOM)

#: A path as RFC 5321 writes it without SMTPUTF8: printable ASCII only (no
#: control character, no NUL, no DEL, no 8-bit octet, quoted or not).
_PRINTABLE_PATH = re.compile(rb"[\x20-\x7e]+")
#: A local part: atoms and dots, or a quoted string of qtextSMTP and
#: quoted-pairSMTP (RFC 5321 section 4.1.2).
_LOCAL_PART = re.compile(
    rb"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+"
    rb'|"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
)
#: A domain: dot-separated labels of letters, digits, hyphens (and the
#: underscores real host names carry).
_DOMAIN = re.compile(rb"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
#: A HELO/EHLO name that is a domain (a trailing dot allowed); address
#: literals are read by L{helo_name}.
_HELO_NAME = re.compile(rb"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?")
#: An RFC 3461 xtext: xchar (printable ASCII but C{+} and C{=}) or C{+} and
#: two upper-case hex digits.
_XTEXT = re.compile(rb"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
_XTEXT_HEXCHAR = re.compile(rb"\+([0-9A-F]{2})")
#: An ESMTP parameter keyword (RFC 5321 section 4.1.2), safe to echo.
_ESMTP_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")


class AddressError(ValueError):
    """Not a mailbox we take."""


def _split_address(path: bytes, default_domain: bytes) -> tuple[bytes, bytes]:
    """
    The local part and domain of a path, read as Twisted's
    C{twisted.mail.smtp.Address} reads it: angle brackets and a source route
    dropped, no domain meaning C{default_domain}.
    """
    tokens = [t for t in _TOKENS.split(path) if t]
    local: list[bytes] = []
    domain: list[bytes] = []
    i, last = 0, len(tokens)
    while i < last:
        token = tokens[i]
        if token == b"<":
            if tokens[last - 1] != b">":
                raise AddressError("Unbalanced <>")
            i, last = i + 1, last - 1
        elif token == b"@":
            i += 1
            if not local:  # a source route
                while i < last and tokens[i] != b":":
                    i += 1
                if i == last:
                    raise AddressError("Malformed source route")
                i += 1
            elif domain:
                raise AddressError("Too many @")
            else:
                domain = [b""]
        elif len(token) == 1 and not _ATOM_CHAR.match(token) and token != b".":
            raise AddressError("Parse error")
        else:
            (domain if domain else local).append(token)
            i += 1
    local_part, domain_part = b"".join(local), b"".join(domain)
    if local_part and not domain_part:
        domain_part = default_domain
    return local_part, domain_part


def address(path: bytes, default_domain: bytes) -> str:
    """
    The mailbox of an RFC 5321 path (C{<local@domain>}), as recorded: read
    as Twisted reads it, then held to RFC 5321, which Twisted's reading is
    not (it takes control characters and NUL in quoted strings and after a
    backslash). An empty C{default_domain} requires a domain.

    @raise AddressError: not a mailbox we take.
    """
    if not _PRINTABLE_PATH.fullmatch(path):
        raise AddressError("not printable ASCII")
    local, domain = _split_address(path, default_domain)
    if not _LOCAL_PART.fullmatch(local) or not _DOMAIN.fullmatch(domain):
        raise AddressError("not an RFC 5321 mailbox")
    return (local + b"@" + domain).decode("ascii")


def xtext(value: bytes) -> bytes:
    """
    Decode an RFC 3461 xtext parameter value: C{+} and two upper-case hex
    digits stand for an octet; nothing else is an escape.

    @raise ValueError: not xtext.
    """
    if not _XTEXT.fullmatch(value):
        raise ValueError("not xtext")
    return _XTEXT_HEXCHAR.sub(lambda m: bytes((int(m.group(1), 16),)), value)


def auth_mailbox(value: bytes) -> str:
    """
    The mailbox of a C{MAIL FROM} C{AUTH=} parameter (RFC 4954 section 5):
    C{<>} or an addr-spec, once the xtext is decoded.

    @raise ValueError: anything else.
    """
    mailbox = xtext(value)
    if mailbox == b"<>":
        return "<>"
    if b"<" in mailbox or b">" in mailbox:
        raise ValueError("not an addr-spec")
    try:
        return address(b"<" + mailbox + b">", b"")
    except AddressError:
        raise ValueError("not an addr-spec") from None


def helo_name(argument: bytes) -> str | None:
    """
    The client's name from a HELO/EHLO argument: a domain, or an IPv4 or
    IPv6 address literal (RFC 5321 4.1.3), of at most 255 octets; None for
    anything else. The name reaches the C{Received:} header (where a
    general literal's C{(}, C{)} or C{;} would end the comment and hide the
    peer address), the spool's JSON and the checkers' C{$senderhelo}.
    """
    words = argument.split()
    if not words or len(words[0]) > 255:
        return None
    word = words[0]
    if _HELO_NAME.fullmatch(word):
        return word.decode("ascii")
    if not (word.startswith(b"[") and word.endswith(b"]")):
        return None
    literal = word[1:-1].decode("ascii", "replace")
    if literal[:5].lower() == "ipv6:":
        literal, version = literal[5:], 6
    else:
        version = 4
    try:
        ok = ipaddress.ip_address(literal).version == version and "%" not in literal
    except ValueError:
        return None
    return word.decode("ascii") if ok else None


@attrs.frozen
class MailFrom:
    """A parsed C{MAIL FROM}: the sender (C{""} for C{<>}) and its parameters, keywords upper-case."""

    sender: str
    parameters: dict[str, str]


MAIL_SYNTAX = (501, "5.5.4", "Syntax: MAIL FROM:<address> [parameters]")


def parse_mail(argument: bytes, default_domain: bytes, max_size: int) -> MailFrom:
    """
    The argument of C{MAIL}: a path and the parameters we take (C{SIZE}
    up to C{max_size}, C{BODY}, C{AUTH}).

    @raise CommandError: the reply that refuses it.
    """
    m = _MAIL.match(argument)
    if m is None:
        raise CommandError(*MAIL_SYNTAX)
    parameters = _mail_parameters(m.group("opts") or b"", max_size)
    path = m.group("path")
    if path == b"<>":
        return MailFrom("", parameters)
    try:
        return MailFrom(address(path, default_domain), parameters)
    except AddressError:
        raise CommandError(553, "5.1.7", "Bad sender address syntax") from None


def _mail_parameters(opts: bytes, max_size: int) -> dict[str, str]:
    params: dict[str, str] = {}
    for item in opts.split():
        key, _, value = item.partition(b"=")
        name = key.decode("ascii", "replace").upper()
        if not _ESMTP_KEYWORD.fullmatch(name):  # echoed in replies: a keyword only
            raise CommandError(*MAIL_SYNTAX)
        if name in params:
            raise CommandError(503, "5.5.4", f"Duplicate {name} parameter")
        if name == "SIZE":
            if not value.isdigit():
                raise CommandError(501, "5.5.4", "Syntax: SIZE=<octets>")
            # int() refuses 4300 digits and more (CPython's limit): a long
            # value is simply too large.
            if len(value) > 20 or int(value) > max_size:
                raise CommandError(*TOO_BIG)
        elif name == "BODY":
            if value.upper() not in (b"7BIT", b"8BITMIME"):
                raise CommandError(501, "5.5.4", "Syntax: BODY=7BIT|8BITMIME")
        elif name == "AUTH":
            try:
                value = auth_mailbox(value).encode()
            except ValueError:
                raise CommandError(501, "5.5.4", "Syntax: AUTH=<xtext mailbox or <>>") from None
        else:
            raise CommandError(555, "5.5.4", f"Unsupported parameter {name[:32]}")
        params[name] = value.decode("utf-8", "replace")
    return params


def parse_rcpt(argument: bytes, default_domain: bytes) -> str:
    """
    The recipient of C{RCPT}; no parameters are taken.

    @raise CommandError: the reply that refuses it.
    """
    m = _RCPT.match(argument)
    if m is None:
        raise CommandError(501, "5.5.4", "Syntax: RCPT TO:<address>")
    if m.group("opts"):
        raise CommandError(555, "5.5.4", "RCPT parameters are not supported")
    try:
        return address(m.group("path"), default_domain)
    except AddressError:
        raise CommandError(553, "5.1.3", "Bad recipient address syntax") from None
