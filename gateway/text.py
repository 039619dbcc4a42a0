# -*- test-case-name: tests.test_text -*-
"""Text helpers: printable and quoted text for one-line messages, UTC timestamps, message dates."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any


def printable(text: str) -> str:
    """
    C{text} safe for one line of a terminal or a log: every character that
    is not printable (controls, line ends, lone surrogates) escaped as
    Python writes it (C{\\n}, C{\\x1b}); printable Unicode kept.
    """
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def quote(text: str) -> str:
    """C{text} double-quoted, with anything that could break a one-line message escaped."""
    return '"' + printable(text.replace("\\", "\\\\").replace('"', '\\"')) + '"'


_UTC_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def utc_timestamp(when: datetime) -> str:
    """ISO-8601 UTC to the second, like C{2026-11-23T15:04:05Z}; naive means UTC."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).strftime(_UTC_FORMAT)


#: The last second L{utc_millis} formatted, and its text (events come many a second).
_last_second: list[Any] = [None, ""]


def utc_millis(seconds: float) -> str:
    """RFC 3339 UTC to the millisecond, like C{2026-11-23T15:04:05.123Z}, of a C{time.time()}."""
    whole, millis = divmod(round(seconds * 1000), 1000)
    last = _last_second
    if last[0] != whole:
        last[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        last[0] = whole
    return f"{last[1]}.{millis:03d}Z"


def parse_utc_timestamp(stamp: str) -> datetime:
    """
    The aware UTC datetime of a L{utc_timestamp} (C{2026-11-23T15:04:05Z});
    ValueError when C{stamp} is not one.
    """
    return datetime.strptime(stamp, _UTC_FORMAT).replace(tzinfo=timezone.utc)


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def message_date(when: float | None = None) -> str:
    """
    An RFC 5322 date-time in local time with its offset, like
    C{Mon, 23 Nov 2026 15:04:05 +0100} (English names whatever the locale):
    what a Received header carries, at a third of the cost of
    C{email.utils.formatdate}.
    """
    t = time.localtime(when)
    offset = (t.tm_gmtoff or 0) // 60
    sign = "-" if offset < 0 else "+"
    hours, minutes = divmod(abs(offset), 60)
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year:04d} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} {sign}{hours:02d}{minutes:02d}"
    )
