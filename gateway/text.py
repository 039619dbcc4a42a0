# -*- test-case-name: tests.test_stores -*-
"""Text helpers for one-line, user-facing error messages."""

from __future__ import annotations


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
