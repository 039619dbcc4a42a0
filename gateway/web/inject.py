# -*- test-case-name: tests.test_web_inject -*-
"""
C{POST /api/inject/v1}: KumoMTA's injection API on the HTTP front door. An
authenticated client hands over a message as JSON::

    {"envelope_sender": "a@example.com",
     "recipients": [{"email": "b@example.net"}],
     "content": "Subject: hi\\r\\n\\r\\nbody"}

and it is spooled like a submitted one (C{protocol: "HTTP"}, the caller's
AuthInfo, peer and TLS; a C{Received: ... with HTTP} header), then relayed
like any message.

The message is held to the SMTP door's rules: addresses as C{MAIL} and
C{RCPT} take them (L{gateway.smtp.codec.address}; the sender may be C{""}),
C{--smtp-max-recipients}, C{--smtp-max-size} once decoded, lines of 998
octets, LF made CRLF and a bare CR refused (no SMTP smuggling downstream),
sender binding with C{--smtp-sender-binding}. The ACL decides on resource
C{smtp/inject}, privilege C{inject} (without C{--acl}: any authenticated
identity). Only the exact path C{/api/inject/v1} is the API; any other
spelling (C{/api/inject/v1/}, C{/API/...}, C{%2f}, dot segments) is not.

The body is bounded by L{InjectSettings.max_body}: a body above
C{--http-max-body} (or chunked) is authenticated before any of it is read
(L{gateway.web.server.GatewayRequest}), so an unauthenticated client makes
the gateway read no more than for any other path. It lands in the
request's body file, not in memory; it is parsed once complete, on the
reactor thread (a bounded cost: see the README).
"""

from __future__ import annotations

import json
import re
from typing import IO, TYPE_CHECKING, Any

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server

from gateway.acl import IAccessPolicy, ask, may_send_as
from gateway.smtp import codec
from gateway.smtp.codec import MAX_DATA_LINE
from gateway.smtp.spool import Envelope, Spool, SpoolError, received_header
from gateway.tls import tls_details
from gateway.web.messages import header, refusal
from gateway.web.resources import forbid
from gateway.web.settings import InjectSettings

if TYPE_CHECKING:
    from gateway.web.resources import Session
    from gateway.web.server import GatewayRequest

log = Logger()

#: The API's one path, exactly as written on the request line.
PATH = b"/api/inject/v1"
#: What the ACL is asked.
RESOURCE, PRIVILEGE = "smtp/inject", "inject"
#: RFC 5321 4.5.3.1.3: a path is at most 256 octets, its brackets included.
MAX_ADDRESS = 254

_TOP = frozenset({"envelope_sender", "recipients", "content"})
_RECIPIENT = frozenset({"email"})
#: The grid L{_has_long_line} looks for lines too long on: a line of
#: MAX_DATA_LINE + 1 octets and its CR hold a whole window of it.
_WINDOW = (MAX_DATA_LINE + 2) // 2


class BadInjection(ValueError):
    """A request the API refuses: its status, and the JSON field at fault (or None)."""

    def __init__(self, text: str, field: str | None = None, code: int = 400) -> None:
        super().__init__(text)
        self.text, self.field, self.code = text, field, code

    def to_json(self) -> dict[str, Any]:
        error: dict[str, Any] = {"error": self.text}
        if self.field is not None:
            error["field"] = self.field
        return error


@attrs.frozen
class Injection:
    """A parsed request: the envelope, and the message with CRLF line ends."""

    sender: str
    recipients: tuple[str, ...]
    content: bytes


def _address(value: Any, field: str, null: bool = False) -> str:
    """A mailbox as C{MAIL}/C{RCPT} take it (the sender may be C{""})."""
    if not isinstance(value, str):
        raise BadInjection("must be a string", field)
    if null and value == "":
        return ""
    if len(value) > MAX_ADDRESS:
        raise BadInjection(f"longer than {MAX_ADDRESS} octets", field)
    if not value.isascii() or "<" in value or ">" in value:
        raise BadInjection("not an RFC 5321 mailbox (printable ASCII, local@domain)", field)
    try:
        return codec.address(b"<" + value.encode("ascii") + b">", b"")
    except codec.AddressError:
        raise BadInjection("not an RFC 5321 mailbox (printable ASCII, local@domain)", field) from None


def _content(value: Any, max_size: int) -> bytes:
    """The message: UTF-8, LF made CRLF, ending in CRLF, bounded in size and line length."""
    field = "content"
    if not isinstance(value, str) or not value:
        raise BadInjection("must be a non-empty string (the RFC 5322 message)", field)
    try:
        data = value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800")
        raise BadInjection("not valid Unicode (a lone surrogate)", field) from None
    del value
    if data[:1] in (b" ", b"\t"):  # it would continue the gateway's Received header
        raise BadInjection("the message must not start with a folded line", field)
    if b"\0" in data:
        raise BadInjection("a NUL in the message", field)
    crlf = data.count(b"\r\n")
    if data.count(b"\r") != crlf:
        raise BadInjection("a bare CR (not followed by LF) in the message", field)
    if data.count(b"\n") != crlf:  # LF line ends (no bare CR is left to pair with one)
        data = (data.replace(b"\r\n", b"\n") if crlf else data).replace(b"\n", b"\r\n")
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if len(data) > max_size:
        raise BadInjection(f"message larger than {max_size} octets", field, 413)
    if _has_long_line(data):
        raise BadInjection(f"a line longer than {MAX_DATA_LINE} octets", field)
    return data


def _has_long_line(data: bytes) -> bool:
    """
    Whether C{data} (CRLF line ends) has a line longer than L{MAX_DATA_LINE}
    octets, in linear time and a few Python steps whatever its mix of lines:
    such a line and its CR are a run of at least C{2 * _WINDOW} octets
    without an LF, which holds a whole window of the grid stepped through
    here; only a window without an LF needs its line measured.
    """
    position, size = 0, len(data)
    while position + _WINDOW <= size:
        if data.find(b"\n", position, position + _WINDOW) >= 0:
            position += _WINDOW
            continue
        start = data.rfind(b"\n", 0, position) + 1
        end = data.find(b"\n", position + _WINDOW)
        end = size if end < 0 else end
        if end - start - 1 > MAX_DATA_LINE:  # less its CR
            return True
        position = end + 1
    return False


class _BoundedJSON:
    """
    A JSON reader that stops after C{budget} values: json.loads would spend
    seconds and a gigabyte on a body of millions of empty values
    (C{[{},{},...]}) before the request's schema could be checked. Strings,
    the bulk of a real request, are scanned by json's own C scanner; every
    other step counts against the budget, and nesting is bounded. Duplicate
    keys are refused: two readers could pick different ones.
    """

    _BLANKS = re.compile(r"[ \t\n\r]*")
    _NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
    _LITERALS = {"true": True, "false": False, "null": None}
    _DEPTH = 8
    _LONGEST_NUMBER = 64

    def __init__(self, text: str, budget: int) -> None:
        self.text, self.pos, self.budget = text, 0, budget

    def document(self) -> Any:
        value = self._value(0)
        self._skip()
        if self.pos != len(self.text):
            self._fail("extra data")
        return value

    def _fail(self, what: str) -> None:
        line = self.text.count("\n", 0, self.pos) + 1
        column = self.pos - self.text.rfind("\n", 0, self.pos)
        raise BadInjection(f"not JSON at line {line} column {column}: {what}")

    def _skip(self) -> None:
        self.pos = self._BLANKS.match(self.text, self.pos).end()

    def _value(self, depth: int) -> Any:
        self.budget -= 1
        if self.budget < 0:
            raise BadInjection("too many JSON values for an injection")
        if depth > self._DEPTH:
            self._fail("nested too deeply")
        self._skip()
        char = self.text[self.pos:self.pos + 1]
        if char == '"':
            return self._string()
        if char == "{":
            return self._object(depth)
        if char == "[":
            return self._array(depth)
        for word, value in self._LITERALS.items():
            if self.text.startswith(word, self.pos):
                self.pos += len(word)
                return value
        number = self._NUMBER.match(self.text, self.pos)
        if number is None:
            self._fail("a value was expected")
        literal = number.group()
        if len(literal) > self._LONGEST_NUMBER:  # int() refuses 4300 digits; no field is a number
            self._fail("a number too long")
        self.pos = number.end()
        return float(literal) if set(literal) & set(".eE") else int(literal)

    def _string(self) -> str:
        try:
            value, self.pos = json.decoder.scanstring(self.text, self.pos + 1, True)
        except json.JSONDecodeError as e:
            self.pos = e.pos
            self._fail(e.msg.lower())
        return value

    def _punctuation(self, expected: str) -> str:
        self._skip()
        char = self.text[self.pos:self.pos + 1]
        if not char or char not in expected:
            self._fail(f"one of {expected!r} was expected")
        self.pos += 1
        return char

    def _object(self, depth: int) -> dict[str, Any]:
        self.pos += 1
        out: dict[str, Any] = {}
        self._skip()
        if self.text.startswith("}", self.pos):
            self.pos += 1
            return out
        while True:
            self._skip()
            if not self.text.startswith('"', self.pos):
                self._fail("a key was expected")
            key = self._string()
            if key in out:
                raise BadInjection(f"duplicate key {json.dumps(key)[:64]}", None)
            self._punctuation(":")
            out[key] = self._value(depth + 1)
            if self._punctuation(",}") == "}":
                return out

    def _array(self, depth: int) -> list[Any]:
        self.pos += 1
        out: list[Any] = []
        self._skip()
        if self.text.startswith("]", self.pos):
            self.pos += 1
            return out
        while True:
            out.append(self._value(depth + 1))
            if self._punctuation(",]") == "]":
                return out


#: Values a request may have besides its recipients' (object, 3 keys and
#: values, the list), and per recipient (its object and e-mail), with room.
_VALUES_BASE, _VALUES_PER_RECIPIENT = 16, 4


def parse(body: bytes, settings: InjectSettings) -> Injection:
    """
    The injection a JSON body asks for: strict UTF-8 JSON, an object with
    exactly C{envelope_sender}, C{recipients} (1 to C{max_recipients}
    objects with an C{email}) and C{content}.

    @raise BadInjection: naming the field at fault.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInjection("the body is not UTF-8") from None
    del body
    budget = _VALUES_BASE + _VALUES_PER_RECIPIENT * settings.max_recipients
    request = _BoundedJSON(text, budget).document()
    del text
    if not isinstance(request, dict):
        raise BadInjection("the body must be a JSON object")
    unknown = sorted(set(request) - _TOP)
    if unknown:
        raise BadInjection("not supported here", unknown[0][:64])
    missing = sorted(_TOP - set(request))
    if missing:
        raise BadInjection("missing", missing[0])
    sender = _address(request["envelope_sender"], "envelope_sender", null=True)
    recipients = request["recipients"]
    if not isinstance(recipients, list) or not recipients:
        raise BadInjection("must be a non-empty list of {\"email\": ...} objects", "recipients")
    if len(recipients) > settings.max_recipients:
        raise BadInjection(f"more than {settings.max_recipients} recipients", "recipients")
    addresses = []
    for index, recipient in enumerate(recipients):
        field = f"recipients[{index}]"
        if not isinstance(recipient, dict) or "email" not in recipient:
            raise BadInjection("must be an object with an \"email\"", field)
        unknown = sorted(set(recipient) - _RECIPIENT)
        if unknown:
            raise BadInjection("not supported here", f"{field}.{unknown[0][:64]}")
        addresses.append(_address(recipient["email"], f"{field}.email"))
    content = _content(request.pop("content"), settings.max_size)
    return Injection(sender, tuple(addresses), content)


class _Sink:
    """Where a body streamed after the decision goes: the request's own body file."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file = file

    def write(self, data: bytes) -> None:
        self.file.write(data)


class InjectAPI:
    """The injection API's shared parts; L{resource} is what a session's request gets."""

    path = PATH

    def __init__(self, policy: IAccessPolicy, spool: Spool, settings: InjectSettings) -> None:
        self.policy = policy
        self.spool = spool
        self.settings = settings

    def resource(self, session: Session) -> resource.IResource:
        return Inject(self, session)


class Inject(resource.Resource):
    """C{POST /api/inject/v1} for one authenticated request."""

    isLeaf = True

    def __init__(self, api: InjectAPI, session: Session) -> None:
        super().__init__()
        self.api = api
        self.session = session
        self._gone = False  # the client left: nothing to answer

    def render(self, request: GatewayRequest) -> Any:
        api, session = self.api, self.session
        if request.method != b"POST":
            return refusal(request, 405, "Method not allowed", headers=[(b"allow", b"POST")])
        if not ask(api.policy, session.info, RESOURCE, PRIVILEGE, session.meta):
            return forbid(request, session)
        media = (header(request, b"content-type") or b"").partition(b";")[0].strip().lower()
        if media != b"application/json":
            # Never a form a browser may post across sites without asking
            # (text/plain): a cached Basic login must not inject mail.
            return refusal(request, 415, "Unsupported media type: send application/json")
        request.notifyFinish().addErrback(self._left)
        upload = request.gateway_upload
        if upload is None:  # read before the decision: already in the body file
            defer.maybeDeferred(self._inject, request).addErrback(self._crashed, request)
            return server.NOT_DONE_YET
        finished = upload.startProducing(_Sink(request.content))
        finished.addCallback(lambda _: self._inject(request))
        finished.addErrback(self._crashed, request)
        return server.NOT_DONE_YET

    def _crashed(self, reason: Failure, request: GatewayRequest) -> None:
        """A bug or a failed upload: logged, and answered, so that the request and its body file end."""
        log.failure("HTTP injection failed", reason)
        if not self._gone and not request.finished:
            self._answer(request, 500, {"error": "internal error", "field": None})

    def _left(self, reason: Failure) -> None:
        self._gone = True

    def _answer(self, request: GatewayRequest, code: int, value: dict[str, Any]) -> None:
        """A JSON answer, unless the client is gone."""
        if self._gone:
            return
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        data = json.dumps(value).encode() + b"\n"
        request.setHeader(b"content-length", b"%d" % len(data))
        request.write(data)
        request.finish()

    def _inject(self, request: GatewayRequest) -> None:
        api, session = self.api, self.session
        if self._gone:
            return
        content = request.content
        content.seek(0)
        try:
            injection = parse(content.read(), api.settings)
            if api.settings.sender_binding and not may_send_as(
                api.policy, session.info, injection.sender, session.meta
            ):
                raise BadInjection("not an address this identity may send as", "envelope_sender", 403)
        except BadInjection as e:
            self._answer(request, e.code, e.to_json())
            return
        content.truncate(0)  # the JSON's copy is no longer needed
        # Held, like SMTP's MAIL, while the delivery queue falls behind (bounded).
        admitted = api.spool.admit()
        if admitted is None:
            self._spool(request, injection)
        else:
            admitted.addCallback(lambda _: self._spool(request, injection))
            admitted.addErrback(self._crashed, request)

    def _spool(self, request: GatewayRequest, injection: Injection) -> None:
        api = self.api
        if self._gone:
            return
        envelope = self._envelope(request, injection)
        try:
            writer = api.spool.open()
        except SpoolError as e:
            log.error("cannot open a spool file: {error}", error=str(e))
            self._unavailable(request)
            return
        writer.write(received_header(envelope, api.settings.hostname, writer.id))
        writer.write(injection.content)
        del injection
        d = defer.maybeDeferred(writer.finish, envelope)
        d.addCallbacks(self._stored, self._failed, callbackArgs=(request, envelope),
                       errbackArgs=(request,))

    def _envelope(self, request: GatewayRequest, injection: Injection) -> Envelope:
        meta = request.gateway_meta
        assert meta is not None  # set by the guard's decision
        direct = not request.gateway_via_proxy
        transport = getattr(request.channel, "transport", None)
        return Envelope(
            mail_from=injection.sender,
            rcpt_to=injection.recipients,
            helo=None,
            auth_info=self.session.info,
            peer_address=meta.peer_address,
            peer_port=getattr(request.getClientAddress(), "port", None) if direct else None,
            local_address=meta.local_address,
            local_port=meta.local_port,
            # Through a trusted proxy, its word that the client used TLS.
            tls=(tls_details(transport) if direct else {}) if meta.tls else None,
            protocol="HTTP",
        )

    def _stored(self, id: str, request: GatewayRequest, envelope: Envelope) -> None:
        log.info(
            "message {id} accepted over HTTP from {authn} ({peer}) for {count} recipient(s)",
            id=id,
            authn=envelope.authn_id,
            peer=envelope.peer_address,
            count=len(envelope.rcpt_to),
        )
        count = len(envelope.rcpt_to)
        self._answer(request, 200, {
            "id": id, "success_count": count, "fail_count": 0,
            "failed_recipients": [], "errors": [],
        })

    def _failed(self, reason: Failure, request: GatewayRequest) -> None:
        log.error("cannot spool a message: {error}", error=str(reason.value))
        self._unavailable(request)

    def _unavailable(self, request: GatewayRequest) -> None:
        request.setHeader(b"retry-after", b"60")
        self._answer(request, 503, {"error": "the message could not be queued; try again later"})


__all__ = ["PATH", "BadInjection", "Inject", "InjectAPI", "Injection", "parse"]
