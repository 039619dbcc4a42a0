# -*- test-case-name: tests.test_socks_codec -*-
"""
A sans-I/O SOCKS5 server codec: RFC 1928 plus RFC 1929 username/password.

In the style of h11 and wsproto, L{ServerCodec} is a pure state machine with
no sockets, no reactor and no policy. The protocol around it feeds received
bytes to L{ServerCodec.receive_data}, which returns parsed I{events}
(L{Greeting}, L{UserPass}, L{Request}, then L{Data} in the relay phase), and
answers each event with the matching C{send_*} method, which returns the
bytes to write and moves the state on::

    GREETING -> METHOD -send_method(NO_AUTH)-------------------> REQUEST
                       -send_method(USERPASS)-> AUTH -> AUTH_PENDING
                                  -send_auth_result(True)-------> REQUEST
    REQUEST -> REQUEST_PENDING -send_reply(SUCCEEDED), CONNECT--> RELAY
                               -send_reply(SUCCEEDED), BIND-----> REQUEST
    any refusal (NO_ACCEPTABLE, failed auth, error reply) or ProtocolError -> CLOSED

Only the message expected in the current state is parsed. A client that
pipelines (greeting, auth and request in one segment, or payload right after
its CONNECT) has the early bytes kept in order until a C{send_*} call moves the
state on; the protocol then calls C{receive_data(b"")} to parse them. Nothing
is parsed while the codec waits for the server, at most L{EARLY_DATA_LIMIT}
bytes may wait there, and every message is length-bounded (L{MAX_GREETING},
L{MAX_AUTH}, L{MAX_REQUEST}), so a client cannot make the codec buffer more.

Malformed input raises L{ProtocolError} and closes the codec. Calling a
C{send_*} method in the wrong state is a programming error: C{RuntimeError};
a bad argument to it is a C{ValueError}. Neither changes the state.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import struct
from collections.abc import Callable

import attrs

VERSION = 5
AUTH_VERSION = 1  # RFC 1929 sub-negotiation version

NO_AUTH, USERPASS, NO_ACCEPTABLE = 0x00, 0x02, 0xFF
CONNECT, BIND, UDP_ASSOCIATE = 1, 2, 3
ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6 = 1, 3, 4

#: Per-state caps on buffered, not-yet-parsed bytes of the message being read.
#: They are the largest well-formed messages (2 + 255; 3 + 255 + 255;
#: 4 + 1 + 255 + 2), so the length-prefixed parser never reaches them: the
#: check is a backstop should the parser ever wait for more than it should.
MAX_GREETING, MAX_AUTH, MAX_REQUEST = 257, 513, 262

#: How many early bytes may wait while the codec waits for the server.
EARLY_DATA_LIMIT = 64 * 1024


class Reply(enum.IntEnum):
    """The REP field of a reply (RFC 1928 section 6)."""

    SUCCEEDED = 0
    GENERAL_FAILURE = 1
    NOT_ALLOWED = 2
    NETWORK_UNREACHABLE = 3
    HOST_UNREACHABLE = 4
    CONNECTION_REFUSED = 5
    TTL_EXPIRED = 6
    COMMAND_NOT_SUPPORTED = 7
    ADDRESS_TYPE_NOT_SUPPORTED = 8


class State(enum.Enum):
    GREETING = "GREETING"
    METHOD = "METHOD"
    AUTH = "AUTH"
    AUTH_PENDING = "AUTH_PENDING"
    REQUEST = "REQUEST"
    REQUEST_PENDING = "REQUEST_PENDING"
    RELAY = "RELAY"
    CLOSED = "CLOSED"


@attrs.frozen
class Greeting:
    """The client's offered authentication methods, in its order (maybe none)."""

    methods: tuple[int, ...]


@attrs.frozen
class UserPass:
    """An RFC 1929 username/password request; either field may be empty."""

    username: bytes
    password: bytes = attrs.field(repr=False)


@attrs.frozen
class Request:
    """A SOCKS request: C{host} is normalised IP text or an ASCII name."""

    command: int
    atyp: int
    host: str
    port: int


@attrs.frozen
class Data:
    """Relayed bytes, after a successful CONNECT reply."""

    data: bytes


Event = Greeting | UserPass | Request | Data


class ProtocolError(Exception):
    """
    Malformed input. C{reply} is the REP to send before closing in the request
    phase (L{encode_reply} builds it), C{None} before (just close). The message
    never echoes what the client sent (credentials, names), only byte values.
    """

    def __init__(self, message: str, reply: Reply | None = None) -> None:
        super().__init__(message)
        self.reply = reply


def encode_reply(reply: Reply, host: str | None = None, port: int = 0) -> bytes:
    """C{05 REP 00 ATYP BND.ADDR BND.PORT}; C{host=None} means C{0.0.0.0}."""
    reply = Reply(reply)
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port out of range: {port!r}")
    address = ipaddress.ip_address("0.0.0.0" if host is None else host)
    atyp = ATYP_IPV4 if address.version == 4 else ATYP_IPV6
    return bytes([VERSION, reply, 0, atyp]) + address.packed + struct.pack("!H", port)


# Parsers: given the buffer, return (event, bytes consumed), None when the
# message is incomplete, or raise ProtocolError. Fields are checked as soon as
# they arrive, in wire order, so the outcome does not depend on how the bytes
# were split.

_Parsed = tuple[Event, int] | None
_HOSTNAME = re.compile(rb"[\x21-\x7e]+")  # printable ASCII, no space


def _parse_greeting(buf: bytearray) -> _Parsed:
    if buf and buf[0] != VERSION:
        raise ProtocolError(f"unsupported SOCKS version {buf[0]}")
    if len(buf) < 2 or len(buf) < 2 + buf[1]:
        return None
    end = 2 + buf[1]
    return Greeting(tuple(buf[2:end])), end


def _parse_auth(buf: bytearray) -> _Parsed:
    if buf and buf[0] != AUTH_VERSION:
        raise ProtocolError(f"unsupported username/password version {buf[0]}")
    if len(buf) < 2 or len(buf) < 3 + buf[1]:
        return None
    plen_at = 2 + buf[1]
    end = plen_at + 1 + buf[plen_at]
    if len(buf) < end:
        return None
    return UserPass(bytes(buf[2:plen_at]), bytes(buf[plen_at + 1 : end])), end


def _parse_request(buf: bytearray) -> _Parsed:
    failure = Reply.GENERAL_FAILURE
    if buf and buf[0] != VERSION:
        raise ProtocolError(f"unsupported SOCKS version {buf[0]}", failure)
    if len(buf) >= 3 and buf[2] != 0:
        raise ProtocolError("non-zero reserved byte in request", failure)
    if len(buf) < 4:
        return None
    atyp = buf[3]
    if atyp == ATYP_IPV4:
        start, size = 4, 4
    elif atyp == ATYP_IPV6:
        start, size = 4, 16
    elif atyp == ATYP_DOMAIN:
        if len(buf) < 5:
            return None
        start, size = 5, buf[4]
        if size == 0:
            raise ProtocolError("empty domain name", failure)
    else:
        raise ProtocolError(f"unknown address type {atyp}", Reply.ADDRESS_TYPE_NOT_SUPPORTED)
    end = start + size + 2
    if len(buf) < end:
        return None
    raw = bytes(buf[start : start + size])
    if atyp == ATYP_DOMAIN:
        if not _HOSTNAME.fullmatch(raw):
            raise ProtocolError("domain name has a byte outside printable ASCII", failure)
        host = raw.decode("ascii")
    else:
        host = str(ipaddress.ip_address(raw))
    (port,) = struct.unpack("!H", buf[end - 2 : end])
    return Request(buf[1], atyp, host, port), end


#: The reading states: what is parsed there, its cap (read at call time) and
#: the state after it.
_READERS: dict[State, tuple[Callable[[bytearray], _Parsed], Callable[[], int], State]] = {
    State.GREETING: (_parse_greeting, lambda: MAX_GREETING, State.METHOD),
    State.AUTH: (_parse_auth, lambda: MAX_AUTH, State.AUTH_PENDING),
    State.REQUEST: (_parse_request, lambda: MAX_REQUEST, State.REQUEST_PENDING),
}

#: The request phase, where a ProtocolError is owed a reply (unless the
#: parser chose a more precise one).
_REQUEST_PHASE = (State.REQUEST, State.REQUEST_PENDING)

_AFTER_METHOD = {NO_AUTH: State.REQUEST, USERPASS: State.AUTH, NO_ACCEPTABLE: State.CLOSED}


class ServerCodec:
    """The server side of one SOCKS5 session; see the module docstring."""

    def __init__(self) -> None:
        self._state = State.GREETING
        self._buffer = bytearray()
        self._event: Greeting | Request | None = None  # the one being answered

    @property
    def state(self) -> str:
        return self._state.value

    def receive_data(self, data: bytes) -> list[Event]:
        """Buffer C{data}, return the events now parsed (C{b""} is allowed)."""
        if self._state is State.CLOSED:
            raise ProtocolError("SOCKS5 session is closed")
        self._buffer += data
        try:
            return self._parse()
        except ProtocolError:
            self._state = State.CLOSED
            self._buffer.clear()
            raise

    def _parse(self) -> list[Event]:
        if self._state is State.RELAY:
            data, self._buffer = bytes(self._buffer), bytearray()
            return [Data(data)] if data else []
        events: list[Event] = []
        if self._state in _READERS:
            parse, cap, after = _READERS[self._state]
            parsed = parse(self._buffer)
            if parsed is None:
                if len(self._buffer) > cap():
                    raise ProtocolError(f"{self.state} message too long", self._failure())
                return events
            event, size = parsed
            del self._buffer[:size]
            self._state = after
            if isinstance(event, (Greeting, Request)):
                self._event = event
            events.append(event)
        if len(self._buffer) > EARLY_DATA_LIMIT:
            raise ProtocolError("too much data before the server answered", self._failure())
        return events

    def _failure(self) -> Reply | None:
        return Reply.GENERAL_FAILURE if self._state in _REQUEST_PHASE else None

    def _expect(self, state: State) -> None:
        if self._state is not state:
            raise RuntimeError(f"not allowed in state {self.state} (expected {state.value})")

    def send_method(self, method: int) -> bytes:
        """Choose the authentication method: C{05 METHOD}."""
        self._expect(State.METHOD)
        assert isinstance(self._event, Greeting)
        if method != NO_ACCEPTABLE and method not in self._event.methods:
            raise ValueError(f"method {method!r} was not offered by the client")
        if method not in _AFTER_METHOD:
            raise ValueError(f"method {method!r} is not supported by this codec")
        self._state = _AFTER_METHOD[method]
        return bytes([VERSION, method])

    def send_auth_result(self, ok: bool) -> bytes:
        """Answer the L{UserPass}: C{01 00} (success) or C{01 01} (failure)."""
        self._expect(State.AUTH_PENDING)
        self._state = State.REQUEST if ok else State.CLOSED
        return bytes([AUTH_VERSION, 0 if ok else 1])

    def send_reply(self, reply: Reply, host: str | None = None, port: int = 0) -> bytes:
        """Answer the L{Request}; see L{encode_reply} for the encoding."""
        self._expect(State.REQUEST_PENDING)
        assert isinstance(self._event, Request)
        encoded = encode_reply(reply, host, port)
        if reply != Reply.SUCCEEDED:
            self._state = State.CLOSED
        elif self._event.command == CONNECT:
            self._state = State.RELAY
        elif self._event.command == BIND:
            self._state = State.REQUEST
        else:
            raise ValueError(f"cannot succeed command {self._event.command}")
        return encoded
