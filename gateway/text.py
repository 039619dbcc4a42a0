# -*- test-case-name: tests.test_text -*-
"""Text helpers: quoting for one-line error messages, UTC timestamps."""

from __future__ import annotations

from datetime import datetime, timezone


def quote(text: str) -> str:
    """C{text} double-quoted, with anything that could break a one-line message escaped."""
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif char.isprintable():
            out.append(char)
        else:
            out.append(repr(char)[1:-1])
    return '"' + "".join(out) + '"'


def utc_timestamp(when: datetime) -> str:
    """ISO-8601 UTC to the second, like C{2026-11-23T15:04:05Z}; naive means UTC."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
