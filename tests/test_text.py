"""Tests for L{gateway.text}: quoting for one-line messages."""

from __future__ import annotations

import email.utils
import os
import time

from twisted.trial.unittest import SynchronousTestCase

from gateway.text import message_date, quote


class QuoteTests(SynchronousTestCase):
    def test_quote(self) -> None:
        self.assertEqual(quote('a"b\\c\n\x00'), '"a\\"b\\\\c\\n\\x00"')


class MessageDateTests(SynchronousTestCase):
    def setUp(self):
        old = os.environ.get("TZ")

        def restore():
            if old is None:
                os.environ.pop("TZ", None)
            else:
                os.environ["TZ"] = old
            time.tzset()

        self.addCleanup(restore)

    def test_as_email_utils(self):
        """The same text as the standard library's RFC 5322 date, in any zone."""
        for zone in ("UTC", "Europe/Berlin", "America/St_Johns", "Asia/Kolkata"):
            os.environ["TZ"] = zone
            time.tzset()
            for when in (0.0, 1_700_000_000.5, 1_790_000_000.0, 1_800_000_000.0):
                self.assertEqual(message_date(when), email.utils.formatdate(when, localtime=True))
