"""Tests for L{gateway.text}: quoting for one-line messages."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from gateway.text import quote


class QuoteTests(SynchronousTestCase):
    def test_quote(self) -> None:
        self.assertEqual(quote('a"b\\c\n\x00'), '"a\\"b\\\\c\\n\\x00"')
