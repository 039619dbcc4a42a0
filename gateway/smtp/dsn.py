# -*- test-case-name: tests.test_dsn -*-
"""
Bounces: the RFC 3464 delivery status notification the queue sends to a
message's envelope sender when recipients failed for good.

The report is a C{multipart/report; report-type=delivery-status} (RFC 6522)
of three parts: a short explanation for people, the C{message/delivery-status}
fields for programs, and the original message's headers as
C{text/rfc822-headers} (bounded; the body is never returned). It is written
by hand rather than with L{email}, so that every line ends with CRLF, is
7-bit and at most 998 octets, and nothing taken from the message, its
envelope or a relay's reply can start a header line of its own.
"""

from __future__ import annotations

import binascii
import email.utils
import ipaddress
import os
import re
import secrets
import textwrap
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

from gateway.fileio import open_regular
from gateway.smtp.spool import Envelope
from gateway.text import parse_utc_timestamp

#: What the original message contributes at most: its header block, cut at a line end.
HEADERS_LIMIT = 64 * 1024

SUBJECT = "Undelivered Mail Returned to Sender"

#: The longest field value we write (before folding); a reply is cut to it.
_MAX_VALUE = 900

#: Where the explanation and folded fields wrap.
_WIDTH = 76

#: A reply: its code, then maybe an RFC 3463 enhanced status code.
_REPLY = re.compile(r"\A([2-5])[0-9]{2}(?:[ -]+([2-5])\.([0-9]{1,3})\.([0-9]{1,3})(?![0-9.]))?")

_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")

#: (recipient, reply, relay URL) of each failed recipient.
_Failures = Sequence[tuple[str, str | None, str | None]]


def _ascii(text: str) -> str:
    """
    C{text} as printable ASCII: anything else (CR, LF, controls, 8-bit)
    becomes a backslash escape, so it can never end a header line.
    """
    if _PRINTABLE_ASCII.fullmatch(text):
        return text
    return "".join(
        char if " " <= char <= "~" else char.encode("unicode_escape").decode("ascii")
        for char in text
    )


#: Where a field may be folded: before a run of spaces between two non-spaces.
_FOLD = re.compile(r"(?<=[^ ]) +(?=[^ ])")


def _field(name: str, value: str) -> str:
    """
    One header-style field, C{value} made printable ASCII, cut to a bound
    (so no line is longer than 998 octets) and folded before spaces where
    it can be (RFC 5322 section 2.2.3: unfolding gives the value back).
    """
    value = _ascii(value)
    if len(value) > _MAX_VALUE:
        value = value[: _MAX_VALUE - 3] + "..."
    text = f"{name}: {value}"
    lines = []
    start = 0
    folds = [m.start() for m in _FOLD.finditer(text, len(name) + 2)]
    while len(text) - start > _WIDTH:
        before = [i for i in folds if start < i <= start + _WIDTH]
        after = [i for i in folds if i > start + _WIDTH]
        if not before and not after:
            break
        cut = before[-1] if before else after[0]
        lines.append(text[start:cut])
        start = cut
    lines.append(text[start:])
    return "\r\n".join(lines) + "\r\n"


def _status(reply: str | None) -> tuple[str, bool]:
    """
    The RFC 3463 status of a failed recipient, and whether it failed because
    its time ran out: a 5xx reply is permanent (its enhanced code if it has
    a matching one, else 5.0.0); anything else (the last 4xx reply, or no
    reply at all) means the queue gave up on it: 4.4.7, delivery time expired.
    """
    m = _REPLY.match(reply or "")
    if m is None or m.group(1) != "5":
        return "4.4.7", True
    if m.group(2) == "5":
        return f"5.{int(m.group(3))}.{int(m.group(4))}", False
    return "5.0.0", False


def _is_reply(reply: str | None) -> bool:
    return reply is not None and _REPLY.match(reply) is not None


def _remote_mta(relay: str | None) -> str | None:
    """The relay's host name for C{Remote-MTA} (an IP in brackets); None if it has none."""
    if not relay:
        return None
    try:
        host = urlsplit(relay).hostname
    except ValueError:
        return None
    if not host:
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    return f"[IPv6:{address}]" if address.version == 6 else f"[{address}]"


def _date(when: datetime) -> str:
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return email.utils.format_datetime(when)


def _arrival(received_at: Any) -> str | None:
    """The spool's C{received_at} (C{2026-11-26T10:00:00Z}) as an RFC 5322 date, if it is one."""
    if not isinstance(received_at, str):
        return None
    try:
        return _date(parse_utc_timestamp(received_at))
    except ValueError:
        return None


def _header_block(data: bytes, limit: int, complete: bool) -> bytes:
    """
    The header block at the start of C{data}: up to the blank line, without
    it, at most C{limit} octets. A block longer than that (or with no blank
    line before the end, C{complete} saying whether C{data} is the whole
    message) is cut after its last whole line.
    """
    if not data or data.startswith(b"\r\n"):
        return b""
    end = data.find(b"\r\n\r\n")
    if end != -1 and end + 2 <= limit:
        return data[: end + 2]
    head = data[:limit]
    if complete and len(data) <= limit and not head.endswith(b"\r\n"):
        return head + b"\r\n"  # the whole message is one header block without its last CRLF
    cut = head.rfind(b"\r\n")
    return b"" if cut == -1 else head[: cut + 2]


def read_headers(path: str, limit: int = HEADERS_LIMIT) -> bytes:
    """
    The header block of the spooled message at C{path} (blocking), ending
    with CRLF, at most C{limit} octets; only that much of the file is read.

    @raise OSError: the file cannot be read.
    """
    with os.fdopen(open_regular(path), "rb") as f:  # no link, no FIFO planted in the spool
        data = f.read(limit + 2)  # + the blank line's CRLF after a block of exactly C{limit}
    return _header_block(data, limit, complete=len(data) < limit + 2)


def _seven_bit(data: bytes) -> bool:
    """C{data} may go as it is in a 7bit part: ASCII, no NUL, CRLF only, lines <= 998 octets."""
    if not data.isascii() or b"\x00" in data:
        return False
    lines = data.split(b"\r\n")
    return all(b"\r" not in line and b"\n" not in line and len(line) <= 998 for line in lines)


def _quoted_printable(data: bytes) -> bytes:
    """
    RFC 2045 quoted-printable of C{data} whose line breaks are its CRLFs
    (a bare CR or LF is encoded as data); lines of at most 76 octets.
    """
    # Line by line as binary, so a bare CR or LF becomes =0D / =0A; the
    # only LFs left are the soft line breaks, which get their CR.
    encoded = (binascii.b2a_qp(line, istext=False) for line in data.split(b"\r\n"))
    return b"\r\n".join(line.replace(b"=\n", b"=\r\n") for line in encoded)


def _headers_part(headers: bytes) -> str:
    """The C{text/rfc822-headers} part: as it is when 7-bit clean, else quoted-printable."""
    if _seven_bit(headers):
        return (
            "Content-Type: text/rfc822-headers\r\n"
            "Content-Description: Undelivered Message Headers\r\n"
            "Content-Transfer-Encoding: 7bit\r\n\r\n" + headers.decode("ascii")
        )
    try:
        headers.decode("utf-8")
        charset = "utf-8"  # RFC 6532 headers
    except UnicodeDecodeError:
        charset = "unknown-8bit"  # RFC 1428
    return (
        f"Content-Type: text/rfc822-headers; charset={charset}\r\n"
        "Content-Description: Undelivered Message Headers\r\n"
        "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
        + _quoted_printable(headers).decode("ascii")
    )


def _explanation(
    reporting_mta: str, meta: Mapping[str, Any], failures: _Failures
) -> str:
    """The text/plain part: what happened, for the sender to read."""
    paragraphs = [
        f"This is the mail system at host {reporting_mta}.",
        "I'm sorry to have to inform you that your message could not be delivered "
        "to one or more recipients. Its headers are attached below.",
    ]
    received, id = meta.get("received_at"), meta.get("id")
    if isinstance(received, str) and isinstance(id, str):
        paragraphs.append(_ascii(f"The message (queue id {id}) was received at {received}."))
    for recipient, reply, relay in failures:
        _, expired = _status(reply)
        remote = _remote_mta(relay)  # the host, not the URL (its port and TLS mode are ours)
        where = f"{remote} said" if remote else "the reply was"
        if expired and _is_reply(reply):
            text = f"<{recipient}>: delivery time expired; {where}: {reply}"
        elif expired:
            text = f"<{recipient}>: {reply or 'delivery time expired'}"
        else:
            text = f"<{recipient}>: {where}: {reply}"
        paragraphs.append(_ascii(text)[:_MAX_VALUE])
    lines: list[str] = []
    for paragraph in paragraphs:
        lines.extend(textwrap.wrap(paragraph, width=_WIDTH, break_long_words=True) or [""])
        lines.append("")
    return "\r\n".join(lines)


def _delivery_status(
    reporting_mta: str, meta: Mapping[str, Any], failures: _Failures
) -> str:
    """The C{message/delivery-status} body: per-message fields, then one group per recipient."""
    groups = [_field("Reporting-MTA", f"dns; {reporting_mta}")]
    arrival = _arrival(meta.get("received_at"))
    if arrival is not None:
        groups[0] += _field("Arrival-Date", arrival)
    for recipient, reply, relay in failures:
        status, _ = _status(reply)
        group = _field("Final-Recipient", f"rfc822; {recipient}")
        group += "Action: failed\r\n"
        group += f"Status: {status}\r\n"
        remote = _remote_mta(relay)
        if remote is not None:
            group += _field("Remote-MTA", f"dns; {remote}")
        if _is_reply(reply):
            group += _field("Diagnostic-Code", f"smtp; {reply}")
        groups.append(group)
    return "\r\n".join(groups)


def bounce(
    meta: Mapping[str, Any],
    headers: bytes,
    failures: Sequence[tuple[str, str, str | None]],
    reporting_mta: str,
    now: datetime,
) -> tuple[Envelope, bytes]:
    """
    The delivery status notification for a message whose C{failures}
    (recipient, the relay's reply like C{550 5.1.1 ...}, the relay's URL or
    None) failed for good, and its envelope: from the null sender to the
    message's sender, so a bounce is never bounced.

    @param meta: the message's spool metadata (C{mail_from}, C{received_at}, C{protocol}).
    @param headers: the message's header block (see L{read_headers}); cut to
        L{HEADERS_LIMIT} at a line end if longer.
    @param reporting_mta: our host name (C{From: MAILER-DAEMON@...}, C{Reporting-MTA}).
    @raise ValueError: the message has the null sender (or one that is not
        printable ASCII, which no SMTP or injection client can give), is
        itself a bounce (never bounce a bounce), or there is nothing to report.
    """
    sender = meta.get("mail_from")
    if not isinstance(sender, str) or sender in ("", "<>"):
        raise ValueError("no bounce for the null sender")
    if not _PRINTABLE_ASCII.fullmatch(sender):  # the codec never takes one: corrupt metadata
        raise ValueError("the sender is not an address a bounce can go to")
    if meta.get("protocol") == "DSN":
        raise ValueError("no bounce for a bounce")
    if not failures:
        raise ValueError("no failed recipient to report")
    host = _ascii(reporting_mta)
    headers = _header_block(headers, HEADERS_LIMIT, complete=True)
    parts = [
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "Content-Description: Notification\r\n"
        "Content-Transfer-Encoding: 7bit\r\n\r\n" + _explanation(host, meta, failures),
        "Content-Type: message/delivery-status\r\n"
        "Content-Description: Delivery report\r\n"
        "Content-Transfer-Encoding: 7bit\r\n\r\n" + _delivery_status(host, meta, failures),
        _headers_part(headers),
    ]
    body = "".join(parts)
    boundary = f"=_authgateway-{secrets.token_hex(12)}"
    while boundary in body:  # pragma: no cover - 96 random bits
        boundary = f"=_authgateway-{secrets.token_hex(12)}"
    message = (
        _field("From", f"Mail Delivery System <MAILER-DAEMON@{host}>")
        + _field("To", f"<{sender}>")
        + f"Subject: {SUBJECT}\r\n"
        + f"Date: {_date(now)}\r\n"
        + _field("Message-ID", f"<{secrets.token_hex(16)}@{host}>")
        + "Auto-Submitted: auto-replied\r\n"
        + "MIME-Version: 1.0\r\n"
        + "Content-Type: multipart/report; report-type=delivery-status;\r\n"
        + f'\tboundary="{boundary}"\r\n'
        + "Content-Transfer-Encoding: 7bit\r\n"
        + "\r\n"
        + "This is a MIME-encapsulated message.\r\n"
        + "".join(f"\r\n--{boundary}\r\n{part}" for part in parts)
        + f"\r\n--{boundary}--\r\n"
    )
    envelope = Envelope(
        mail_from="",
        rcpt_to=(sender,),
        helo=None,
        auth_info=None,
        peer_address=None,
        peer_port=None,
        local_address=None,
        local_port=None,
        tls=None,
        protocol="DSN",
    )
    return envelope, message.encode("ascii")
