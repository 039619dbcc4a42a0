"""
Tests for L{gateway.socks.codec}: the sans-I/O SOCKS5 (RFC 1928/1929) server codec.
"""

from __future__ import annotations

import ipaddress
import itertools
import struct
from collections.abc import Callable, Iterable
from typing import ClassVar

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from gateway.socks import codec
from gateway.socks.codec import (
    ATYP_DOMAIN,
    ATYP_IPV4,
    ATYP_IPV6,
    BIND,
    CONNECT,
    EARLY_DATA_LIMIT,
    MAX_AUTH,
    MAX_GREETING,
    MAX_REQUEST,
    NO_ACCEPTABLE,
    NO_AUTH,
    UDP_ASSOCIATE,
    USERPASS,
    Data,
    Event,
    Greeting,
    ProtocolError,
    Reply,
    Request,
    ServerCodec,
    UserPass,
    encode_reply,
)

SECRET = b"s3cr3t-Pa55"


# -- client messages ----------------------------------------------------------


def greeting(*methods: int) -> bytes:
    return bytes([5, len(methods), *methods])


def auth(username: bytes, password: bytes) -> bytes:
    return bytes([1, len(username)]) + username + bytes([len(password)]) + password


def request(command: int, atyp: int, address: bytes, port: int) -> bytes:
    return bytes([5, command, 0, atyp]) + address + struct.pack("!H", port)


def ipv4(host: str, port: int, command: int = CONNECT) -> bytes:
    return request(command, ATYP_IPV4, ipaddress.IPv4Address(host).packed, port)


def ipv6(host: str, port: int, command: int = CONNECT) -> bytes:
    return request(command, ATYP_IPV6, ipaddress.IPv6Address(host).packed, port)


def domain(name: bytes, port: int, command: int = CONNECT) -> bytes:
    return request(command, ATYP_DOMAIN, bytes([len(name)]) + name, port)


CONVERSATION = (
    greeting(NO_AUTH, USERPASS)
    + auth(b"daniel", SECRET)
    + domain(b"mx.example.com", 25)
    + b"EHLO me\r\n"
)
CONVERSATION_EVENTS = [
    Greeting((NO_AUTH, USERPASS)),
    UserPass(b"daniel", SECRET),
    Request(CONNECT, ATYP_DOMAIN, "mx.example.com", 25),
]


# -- driving a codec ----------------------------------------------------------


def at(state: str, *, methods: tuple[int, ...] = (NO_AUTH, USERPASS)) -> ServerCodec:
    """A codec brought to C{state} by a well-behaved client and server."""
    c = ServerCodec()
    if state == "GREETING":
        return c
    c.receive_data(greeting(*methods))
    if state == "METHOD":
        return c
    if state in ("AUTH", "AUTH_PENDING"):
        c.send_method(USERPASS)
        if state == "AUTH_PENDING":
            c.receive_data(auth(b"u", b"p"))
        return c
    c.send_method(NO_AUTH)
    if state == "REQUEST":
        return c
    c.receive_data(ipv4("192.0.2.1", 25))
    if state == "REQUEST_PENDING":
        return c
    c.send_reply(Reply.SUCCEEDED)
    assert state == "RELAY"
    return c


Answer = Callable[[ServerCodec, Event], bytes]


def polite(c: ServerCodec, event: Event) -> bytes:
    """Accept everything: USERPASS (else NO_AUTH), success, bound addresses."""
    if isinstance(event, Greeting):
        return c.send_method(USERPASS if USERPASS in event.methods else NO_AUTH)
    if isinstance(event, UserPass):
        return c.send_auth_result(True)
    assert isinstance(event, Request)
    return c.send_reply(Reply.SUCCEEDED, "192.0.2.9", 4242)


def strict(c: ServerCodec, event: Event) -> bytes:
    """The answers of the brief's fuzzing property."""
    if isinstance(event, Greeting):
        return c.send_method(USERPASS if USERPASS in event.methods else NO_ACCEPTABLE)
    if isinstance(event, UserPass):
        return c.send_auth_result(True)
    assert isinstance(event, Request)
    if event.command == CONNECT:
        return c.send_reply(Reply.SUCCEEDED)
    return c.send_reply(Reply.COMMAND_NOT_SUPPORTED)


def converse(chunks: Iterable[bytes], answer: Answer = polite) -> tuple[list[Event], bytes, bytes]:
    """
    Feed C{chunks}, answering each event as soon as it appears and re-parsing
    the buffer after each answer. Returns (events other than Data, relayed
    bytes, bytes the server sent).
    """
    c = ServerCodec()
    events: list[Event] = []
    relayed = sent = b""
    for chunk in chunks:
        if c.state == "CLOSED":
            break
        new = c.receive_data(chunk)
        while new:
            for event in new:
                if isinstance(event, Data):
                    relayed += event.data
                else:
                    events.append(event)
                    sent += answer(c, event)
            new = c.receive_data(b"") if c.state != "CLOSED" else []
    return events, relayed, sent


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


# -- tests --------------------------------------------------------------------


class GreetingTests(SynchronousTestCase):
    def test_greeting(self) -> None:
        """The methods come out in the client's order; the state is METHOD."""
        c = ServerCodec()
        self.assertEqual(c.state, "GREETING")
        self.assertEqual(c.receive_data(greeting(2, 0, 0x80)), [Greeting((2, 0, 0x80))])
        self.assertEqual(c.state, "METHOD")

    def test_no_methods(self) -> None:
        """NMETHODS=0 is a Greeting with no methods, which NO_ACCEPTABLE answers."""
        c = ServerCodec()
        self.assertEqual(c.receive_data(b"\x05\x00"), [Greeting(())])
        self.assertEqual(c.send_method(NO_ACCEPTABLE), b"\x05\xff")
        self.assertEqual(c.state, "CLOSED")

    def test_incomplete(self) -> None:
        """An incomplete greeting is kept until its last byte arrives."""
        c = ServerCodec()
        self.assertEqual(c.receive_data(b""), [])
        self.assertEqual(c.receive_data(b"\x05"), [])
        self.assertEqual(c.receive_data(b"\x02\x00"), [])
        self.assertEqual(c.state, "GREETING")
        self.assertEqual(c.receive_data(b"\x02"), [Greeting((0, 2))])

    def test_bad_version(self) -> None:
        """A SOCKS4 (or HTTP) client is refused at the first byte, with no reply."""
        for first in (b"\x04", b"GET / HTTP/1.1\r\n"):
            c = ServerCodec()
            e = self.assertRaises(ProtocolError, c.receive_data, first)
            self.assertIsNone(e.reply)
            self.assertEqual(c.state, "CLOSED")

    def test_largest(self) -> None:
        """255 methods: a MAX_GREETING-byte greeting."""
        data = greeting(*range(255))
        self.assertEqual(len(data), MAX_GREETING)
        self.assertEqual(ServerCodec().receive_data(data), [Greeting(tuple(range(255)))])


class MethodTests(SynchronousTestCase):
    def test_no_auth(self) -> None:
        c = at("METHOD")
        self.assertEqual(c.send_method(NO_AUTH), b"\x05\x00")
        self.assertEqual(c.state, "REQUEST")

    def test_userpass(self) -> None:
        c = at("METHOD")
        self.assertEqual(c.send_method(USERPASS), b"\x05\x02")
        self.assertEqual(c.state, "AUTH")

    def test_no_acceptable(self) -> None:
        """NO_ACCEPTABLE need not be offered; it closes the codec."""
        c = at("METHOD")
        self.assertEqual(c.send_method(NO_ACCEPTABLE), b"\x05\xff")
        self.assertEqual(c.state, "CLOSED")
        e = self.assertRaises(ProtocolError, c.receive_data, b"\x01")
        self.assertIsNone(e.reply)

    def test_not_offered(self) -> None:
        """Choosing a method the client did not offer is a ValueError; the state stays."""
        c = at("METHOD", methods=(NO_AUTH,))
        self.assertRaises(ValueError, c.send_method, USERPASS)
        self.assertEqual(c.state, "METHOD")

    def test_unsupported(self) -> None:
        """An offered method the codec cannot speak (GSSAPI) is a ValueError."""
        c = at("METHOD", methods=(1,))
        self.assertRaises(ValueError, c.send_method, 1)
        self.assertEqual(c.state, "METHOD")


class AuthTests(SynchronousTestCase):
    def test_userpass(self) -> None:
        c = at("AUTH")
        self.assertEqual(c.receive_data(auth(b"daniel", SECRET)), [UserPass(b"daniel", SECRET)])
        self.assertEqual(c.state, "AUTH_PENDING")

    def test_empty_fields(self) -> None:
        """ULEN=0 and PLEN=0 are parsed; refusing them is the checker's business."""
        for user, password in ((b"u", b""), (b"", b"p"), (b"", b"")):
            c = at("AUTH")
            self.assertEqual(c.receive_data(auth(user, password)), [UserPass(user, password)])

    def test_largest(self) -> None:
        """255-byte username and password: a MAX_AUTH-byte message, any byte values."""
        data = auth(bytes(range(255)), bytes(range(255, 0, -1)))
        self.assertEqual(len(data), MAX_AUTH)
        self.assertEqual(at("AUTH").receive_data(data), [UserPass(bytes(range(255)), bytes(range(255, 0, -1)))])

    def test_bad_version(self) -> None:
        """A sub-negotiation version other than 1 closes without a reply."""
        c = at("AUTH")
        e = self.assertRaises(ProtocolError, c.receive_data, b"\x05" + auth(b"u", SECRET)[1:])
        self.assertIsNone(e.reply)
        self.assertNotIn(SECRET.decode(), repr(e) + str(e))
        self.assertEqual(c.state, "CLOSED")

    def test_success(self) -> None:
        c = at("AUTH_PENDING")
        self.assertEqual(c.send_auth_result(True), b"\x01\x00")
        self.assertEqual(c.state, "REQUEST")

    def test_failure(self) -> None:
        c = at("AUTH_PENDING")
        self.assertEqual(c.send_auth_result(False), b"\x01\x01")
        self.assertEqual(c.state, "CLOSED")

    def test_password_hidden(self) -> None:
        """The repr of a UserPass shows the username, never the password."""
        text = repr(UserPass(b"daniel", SECRET))
        self.assertIn("daniel", text)
        self.assertNotIn(SECRET.decode(), text)
        self.assertNotIn("password", text)


class RequestTests(SynchronousTestCase):
    def parse(self, data: bytes) -> list[Event]:
        return at("REQUEST").receive_data(data)

    def reject(self, data: bytes) -> ProtocolError:
        c = at("REQUEST")
        e = self.assertRaises(ProtocolError, c.receive_data, data)
        self.assertEqual(c.state, "CLOSED")
        return e

    def test_ipv4(self) -> None:
        self.assertEqual(self.parse(ipv4("192.0.2.1", 0x1234)), [Request(CONNECT, ATYP_IPV4, "192.0.2.1", 0x1234)])

    def test_ipv6_normalised(self) -> None:
        """IPv6 hosts come out in their compressed canonical form."""
        for wire, text in (("0:0:0:0:0:0:0:1", "::1"), ("2001:0DB8:0:0:0:0:0:1", "2001:db8::1")):
            [event] = self.parse(ipv6(wire, 443))
            self.assertEqual(event, Request(CONNECT, ATYP_IPV6, text, 443))

    def test_domain(self) -> None:
        self.assertEqual(self.parse(domain(b"xn--bcher-kva.example", 25)), [Request(CONNECT, ATYP_DOMAIN, "xn--bcher-kva.example", 25)])

    def test_domain_longest(self) -> None:
        """A 255-octet name: a MAX_REQUEST-byte request."""
        data = domain(b"a" * 255, 25)
        self.assertEqual(len(data), MAX_REQUEST)
        self.assertEqual(self.parse(data), [Request(CONNECT, ATYP_DOMAIN, "a" * 255, 25)])

    def test_domain_empty(self) -> None:
        """A zero-length name is refused with GENERAL_FAILURE, at its length byte."""
        self.assertEqual(self.reject(bytes([5, 1, 0, 3, 0])).reply, Reply.GENERAL_FAILURE)

    def test_domain_bad_bytes(self) -> None:
        """Non-ASCII, control, space and DEL bytes are refused; the name is not echoed."""
        for name in ("bücher.example".encode(), b"a\x00b", b"evil\r\nhost", b"x y.example", b"a\x7f"):
            e = self.reject(domain(name, 25))
            self.assertEqual(e.reply, Reply.GENERAL_FAILURE)
            self.assertNotIn(name.decode("latin-1"), str(e))

    def test_unknown_atyp(self) -> None:
        """An unknown ATYP is refused with reply 08 as soon as its byte arrives."""
        for atyp in (0, 2, 5, 255):
            self.assertEqual(self.reject(bytes([5, 1, 0, atyp])).reply, Reply.ADDRESS_TYPE_NOT_SUPPORTED)

    def test_bad_version(self) -> None:
        self.assertEqual(self.reject(b"\x04").reply, Reply.GENERAL_FAILURE)

    def test_reserved(self) -> None:
        """A non-zero RSV byte is refused (strictly) with GENERAL_FAILURE."""
        self.assertEqual(self.reject(b"\x05\x01\x01").reply, Reply.GENERAL_FAILURE)

    def test_any_command(self) -> None:
        """Unknown commands and port 0 are parsed: the server answers them."""
        for command in (UDP_ASSOCIATE, 0, 0x42, 255):
            self.assertEqual(self.parse(ipv4("192.0.2.1", 0, command)), [Request(command, ATYP_IPV4, "192.0.2.1", 0)])

    def test_incomplete(self) -> None:
        """Every proper prefix of a request waits in REQUEST."""
        for data in (ipv4("192.0.2.1", 25), ipv6("::1", 25), domain(b"example.com", 25)):
            for i in range(len(data)):
                c = at("REQUEST")
                self.assertEqual(c.receive_data(data[:i]), [])
                self.assertEqual(c.state, "REQUEST")


class ReplyTests(SynchronousTestCase):
    def test_encoding(self) -> None:
        """IPv4, IPv6 and no address (0.0.0.0:0), port big-endian."""
        self.assertEqual(encode_reply(Reply.SUCCEEDED, "192.0.2.1", 0x1234), b"\x05\x00\x00\x01\xc0\x00\x02\x01\x12\x34")
        self.assertEqual(encode_reply(Reply.SUCCEEDED, "::1", 25), b"\x05\x00\x00\x04" + bytes(15) + b"\x01\x00\x19")
        self.assertEqual(encode_reply(Reply.NOT_ALLOWED), b"\x05\x02\x00\x01" + bytes(6))

    def test_bad_arguments(self) -> None:
        """A host name, a bad port or an unknown REP is a ValueError; the state stays."""
        c = at("REQUEST_PENDING")
        self.assertRaises(ValueError, c.send_reply, Reply.SUCCEEDED, "mx.example.com", 25)
        self.assertRaises(ValueError, c.send_reply, Reply.SUCCEEDED, "192.0.2.1", 65536)
        self.assertRaises(ValueError, c.send_reply, 9)
        self.assertEqual(c.state, "REQUEST_PENDING")

    def test_connect(self) -> None:
        c = at("REQUEST_PENDING")
        self.assertEqual(c.send_reply(Reply.SUCCEEDED, "192.0.2.9", 4242), encode_reply(Reply.SUCCEEDED, "192.0.2.9", 4242))
        self.assertEqual(c.state, "RELAY")

    def test_failure(self) -> None:
        """Any non-zero reply closes, whatever the command."""
        for reply in list(Reply)[1:]:
            c = at("REQUEST_PENDING")
            self.assertEqual(c.send_reply(reply), encode_reply(reply))
            self.assertEqual(c.state, "CLOSED")

    def test_bind_then_connect(self) -> None:
        """BIND (the wanted source address) succeeds back to REQUEST, then CONNECT relays."""
        c = at("REQUEST")
        self.assertEqual(c.receive_data(ipv4("198.51.100.7", 0, BIND)), [Request(BIND, ATYP_IPV4, "198.51.100.7", 0)])
        c.send_reply(Reply.SUCCEEDED, "198.51.100.7", 0)
        self.assertEqual(c.state, "REQUEST")
        self.assertEqual(c.receive_data(domain(b"mx.example.com", 25)), [Request(CONNECT, ATYP_DOMAIN, "mx.example.com", 25)])
        c.send_reply(Reply.SUCCEEDED, "198.51.100.7", 40000)
        self.assertEqual(c.receive_data(b"EHLO"), [Data(b"EHLO")])

    def test_second_bind(self) -> None:
        """A second BIND is parsed like any request: refusing it is the server's job."""
        c = at("REQUEST")
        c.receive_data(ipv4("198.51.100.7", 0, BIND))
        c.send_reply(Reply.SUCCEEDED)
        self.assertEqual(c.receive_data(ipv4("198.51.100.8", 0, BIND)), [Request(BIND, ATYP_IPV4, "198.51.100.8", 0)])
        c.send_reply(Reply.NOT_ALLOWED)
        self.assertEqual(c.state, "CLOSED")

    def test_success_for_other_commands(self) -> None:
        """SUCCEEDED for UDP ASSOCIATE or an unknown command is a ValueError."""
        for command in (UDP_ASSOCIATE, 0x42):
            c = at("REQUEST")
            c.receive_data(ipv4("192.0.2.1", 25, command))
            self.assertRaises(ValueError, c.send_reply, Reply.SUCCEEDED)
            self.assertEqual(c.state, "REQUEST_PENDING")
            c.send_reply(Reply.COMMAND_NOT_SUPPORTED)
            self.assertEqual(c.state, "CLOSED")


class WrongStateTests(SynchronousTestCase):
    """Calling a send_* method in the wrong state is a RuntimeError (a bug in the caller)."""

    SENDS: ClassVar[dict[str, Callable[[ServerCodec], bytes]]] = {
        "METHOD": lambda c: c.send_method(NO_AUTH),
        "AUTH_PENDING": lambda c: c.send_auth_result(True),
        "REQUEST_PENDING": lambda c: c.send_reply(Reply.SUCCEEDED),
    }

    def test_wrong_state(self) -> None:
        for state in ("GREETING", "METHOD", "AUTH", "AUTH_PENDING", "REQUEST", "REQUEST_PENDING", "RELAY"):
            for allowed, send in self.SENDS.items():
                if allowed == state:
                    continue
                c = at(state)
                self.assertRaises(RuntimeError, send, c)
                self.assertEqual(c.state, state)

    def test_closed(self) -> None:
        c = at("METHOD")
        c.send_method(NO_ACCEPTABLE)
        for send in self.SENDS.values():
            self.assertRaises(RuntimeError, send, c)


class RelayTests(SynchronousTestCase):
    def test_data(self) -> None:
        """In RELAY every byte comes out as Data; nothing buffered means no event."""
        c = at("RELAY")
        self.assertEqual(c.receive_data(b""), [])
        self.assertEqual(c.receive_data(b"\x05\x01\x00"), [Data(b"\x05\x01\x00")])

    def test_early_data(self) -> None:
        """Bytes in the same read as the CONNECT request are kept, then relayed first."""
        c = at("REQUEST")
        self.assertEqual(c.receive_data(ipv4("192.0.2.1", 25) + b"EHLO"), [Request(CONNECT, ATYP_IPV4, "192.0.2.1", 25)])
        self.assertEqual(c.receive_data(b" me"), [])
        c.send_reply(Reply.SUCCEEDED)
        self.assertEqual(c.receive_data(b"\r\n"), [Data(b"EHLO me\r\n")])
        self.assertEqual(c.receive_data(b"QUIT"), [Data(b"QUIT")])


class PipeliningTests(SynchronousTestCase):
    def test_merged(self) -> None:
        """Everything in one read is parsed a step at a time, as the server answers."""
        c = ServerCodec()
        self.assertEqual(c.receive_data(CONVERSATION), [Greeting((NO_AUTH, USERPASS))])
        self.assertEqual(c.receive_data(b""), [])  # still waiting for send_method
        c.send_method(USERPASS)
        self.assertEqual(c.receive_data(b""), [UserPass(b"daniel", SECRET)])
        c.send_auth_result(True)
        self.assertEqual(c.receive_data(b""), [Request(CONNECT, ATYP_DOMAIN, "mx.example.com", 25)])
        c.send_reply(Reply.SUCCEEDED)
        self.assertEqual(c.receive_data(b""), [Data(b"EHLO me\r\n")])

    def test_early_bytes_after_refusal(self) -> None:
        """Bytes pipelined after a refused method are never parsed."""
        c = ServerCodec()
        c.receive_data(CONVERSATION)
        c.send_method(NO_ACCEPTABLE)
        self.assertRaises(ProtocolError, c.receive_data, b"")

    def test_every_split(self) -> None:
        """Two pieces, split at every byte boundary: the same outcome as one read."""
        whole = converse([CONVERSATION])
        self.assertEqual(whole, (CONVERSATION_EVENTS, b"EHLO me\r\n", b"\x05\x02\x01\x00" + encode_reply(Reply.SUCCEEDED, "192.0.2.9", 4242)))
        for i in range(len(CONVERSATION) + 1):
            self.assertEqual(converse([CONVERSATION[:i], CONVERSATION[i:]]), whole, i)

    def test_byte_at_a_time(self) -> None:
        self.assertEqual(converse([bytes([b]) for b in CONVERSATION]), converse([CONVERSATION]))


class LimitTests(SynchronousTestCase):
    def test_caps_are_the_largest_messages(self) -> None:
        """
        The caps equal the largest well-formed messages (see the *_largest
        tests), so a length-prefixed message can never be incomplete beyond
        its cap: just under it, the codec still waits.
        """
        self.assertEqual(ServerCodec().receive_data(greeting(*range(255))[:-1]), [])
        self.assertEqual(at("AUTH").receive_data(auth(b"u" * 255, b"p" * 255)[:-1]), [])
        self.assertEqual(at("REQUEST").receive_data(domain(b"a" * 255, 25)[:-1]), [])

    def test_cap_backstop(self) -> None:
        """With smaller caps, an incomplete message beyond its cap is an error."""
        self.patch(codec, "MAX_GREETING", 3)
        self.patch(codec, "MAX_AUTH", 3)
        self.patch(codec, "MAX_REQUEST", 3)
        cases = [
            (ServerCodec(), greeting(1, 2, 3)[:-1], None),
            (at("AUTH"), auth(b"u", SECRET)[:-1], None),
            (at("REQUEST"), domain(b"example.com", 25)[:-1], Reply.GENERAL_FAILURE),
        ]
        for c, data, reply in cases:
            self.assertEqual(c.receive_data(data[:3]), [])
            e = self.assertRaises(ProtocolError, c.receive_data, data[3:])
            self.assertIs(e.reply, reply)
            self.assertNotIn(SECRET.decode(), str(e))
            self.assertEqual(c.state, "CLOSED")

    def test_early_data_limit(self) -> None:
        """At most EARLY_DATA_LIMIT bytes may wait for the server."""
        for state, reply in (("METHOD", None), ("AUTH_PENDING", None), ("REQUEST_PENDING", Reply.GENERAL_FAILURE)):
            c = at(state)
            self.assertEqual(c.receive_data(bytes(EARLY_DATA_LIMIT)), [])
            e = self.assertRaises(ProtocolError, c.receive_data, b"x")
            self.assertIs(e.reply, reply)
            self.assertEqual(c.state, "CLOSED")

    def test_early_data_limit_same_read(self) -> None:
        """The limit also applies to the bytes after a message parsed in the same read."""
        c = ServerCodec()
        self.assertEqual(c.receive_data(greeting(NO_AUTH) + bytes(EARLY_DATA_LIMIT)), [Greeting((NO_AUTH,))])
        self.assertRaises(ProtocolError, ServerCodec().receive_data, greeting(NO_AUTH) + bytes(EARLY_DATA_LIMIT + 1))

    def test_no_limit_in_relay(self) -> None:
        self.assertEqual(at("RELAY").receive_data(bytes(EARLY_DATA_LIMIT * 2)), [Data(bytes(EARLY_DATA_LIMIT * 2))])


class ProtocolErrorTests(SynchronousTestCase):
    def test_closed_after_error(self) -> None:
        """After a ProtocolError every receive_data raises one too, with no reply."""
        c = at("REQUEST")
        self.assertRaises(ProtocolError, c.receive_data, bytes([5, 1, 0, 9]))
        e = self.assertRaises(ProtocolError, c.receive_data, b"")
        self.assertIsNone(e.reply)

    def test_repr(self) -> None:
        e = ProtocolError("empty domain name", Reply.GENERAL_FAILURE)
        self.assertEqual(repr(e), "ProtocolError('empty domain name')")
        self.assertEqual(e.reply, Reply.GENERAL_FAILURE)


# -- properties ---------------------------------------------------------------

_HOSTNAMES = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=255)


@st.composite
def requests(draw: st.DrawFn, command: int = CONNECT) -> tuple[bytes, Request]:
    """A valid request in wire form and the Request the codec should return."""
    port = draw(st.integers(0, 0xFFFF))
    kind = draw(st.sampled_from([ATYP_IPV4, ATYP_IPV6, ATYP_DOMAIN]))
    if kind == ATYP_DOMAIN:
        name = draw(_HOSTNAMES)
        return domain(name.encode(), port, command), Request(command, ATYP_DOMAIN, name, port)
    address = draw(st.ip_addresses(v=4 if kind == ATYP_IPV4 else 6))
    return request(command, kind, address.packed, port), Request(command, kind, str(address), port)


@st.composite
def conversations(draw: st.DrawFn) -> tuple[bytes, list[Event], bytes]:
    """A valid client conversation: wire bytes, events, relayed bytes."""
    methods = draw(st.lists(st.integers(0, 255), unique=True, max_size=20).map(lambda m: tuple(m) if USERPASS in m else (*m, USERPASS)))
    user, password = draw(st.binary(max_size=255)), draw(st.binary(max_size=255))
    wire = greeting(*methods) + auth(user, password)
    events: list[Event] = [Greeting(methods), UserPass(user, password)]
    if draw(st.booleans()):
        bind, bind_event = draw(requests(BIND))
        wire += bind
        events.append(bind_event)
    connect, connect_event = draw(requests())
    trailing = draw(st.binary(max_size=300))
    return wire + connect + trailing, [*events, connect_event], trailing


@st.composite
def garbage(draw: st.DrawFn) -> bytes:
    """Arbitrary bytes, or a valid conversation with bytes changed, cut or added."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=600))
    data = bytearray(draw(conversations())[0])
    for _ in range(draw(st.integers(0, 3))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        del data[draw(st.integers(0, len(data))) :]
    return bytes(data) + draw(st.binary(max_size=20))


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(st.data())
    def test_split_invariance(self, data: st.DataObject) -> None:
        """Any split of a valid conversation gives the events and relay of one read."""
        wire, events, trailing = data.draw(conversations())
        cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=12))
        whole = converse([wire])
        self.assertEqual(whole[:2], (events, trailing))
        self.assertEqual(converse(split(wire, cuts)), whole)

    @settings(max_examples=200, deadline=None)
    @given(st.data())
    def test_only_protocol_errors(self, data: st.DataObject) -> None:
        """Any bytes, in any chunks, raise nothing but ProtocolError, which closes."""
        wire = data.draw(garbage())
        cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=12))
        c = ServerCodec()
        try:
            for chunk in split(wire, cuts):
                before = c.state
                if before == "CLOSED":
                    return
                new = c.receive_data(chunk)
                while new and c.state != "CLOSED":
                    for event in new:
                        if not isinstance(event, Data):
                            strict(c, event)
                    before = c.state
                    new = c.receive_data(b"") if c.state != "CLOSED" else []
        except ProtocolError as e:
            self.assertEqual(c.state, "CLOSED")
            if before in ("GREETING", "METHOD", "AUTH", "AUTH_PENDING"):
                self.assertIsNone(e.reply)
            else:
                self.assertIsInstance(e.reply, Reply)
            self.assertRaises(ProtocolError, c.receive_data, b"")
