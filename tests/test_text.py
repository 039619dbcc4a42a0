"""Tests for L{gateway.text}: printable and quoted text, UTC timestamps, message dates."""

from __future__ import annotations

import email.utils
import os
import time
from datetime import datetime, timezone

from twisted.trial.unittest import SynchronousTestCase

from gateway.text import message_date, parse_utc_timestamp, printable, quote, utc_timestamp


class QuoteTests(SynchronousTestCase):
    def test_quote(self) -> None:
        self.assertEqual(quote('a"b\\c\n\x00'), '"a\\"b\\\\c\\n\\x00"')


class PrintableTests(SynchronousTestCase):
    def test_printable(self) -> None:
        """Controls, line ends and lone surrogates are escaped; printable Unicode and quotes are kept."""
        self.assertEqual(printable('caf\u00e9 "a\\b"\r\n\x1b[31m\ud800'),
                         'caf\u00e9 "a\\b"\\r\\n\\x1b[31m\\ud800')


class UtcTimestampTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        when = datetime(2026, 11, 23, 15, 4, 5, tzinfo=timezone.utc)
        self.assertEqual(parse_utc_timestamp(utc_timestamp(when)), when)
        self.assertEqual(parse_utc_timestamp("2026-11-23T15:04:05Z").tzinfo, timezone.utc)

    def test_invalid(self) -> None:
        for stamp in ("", "2026-11-23 15:04:05", "2026-11-23T15:04:05+01:00", "2026-13-23T15:04:05Z"):
            self.assertRaises(ValueError, parse_utc_timestamp, stamp)


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
