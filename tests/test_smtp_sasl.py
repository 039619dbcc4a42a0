"""
Tests for L{gateway.smtp.sasl}: strict base64, PLAIN and LOGIN, and plug-in
mechanisms.
"""

from __future__ import annotations

import base64

from hypothesis import given
from hypothesis import strategies as st
from twisted.cred.credentials import CramMD5Credentials
from twisted.mail.interfaces import IChallengeResponse
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from gateway import testing
from gateway.credentials import ISASLCredentials
from gateway.smtp import sasl


class DecodeTests(SynchronousTestCase):
    def test_strict(self):
        self.assertEqual(sasl.decode(base64.b64encode(b"\0daniel\0tiger")), b"\0daniel\0tiger")
        for bad in (b"!!AGRhbmllbAB0aWdlcg==!!", b"AGRhbmllbAB0aWdlcg", b"AG=RhbmllbAB0aWdlcg=",
                    b"AGRh bmll", b"===="):
            e = self.assertRaises(sasl.SASLError, sasl.decode, bad)
            self.assertEqual((e.code, e.enhanced), (501, "5.5.2"))
            self.assertNotIn(bad.decode(), e.text)

    def test_cancel_and_empty(self):
        e = self.assertRaises(sasl.SASLError, sasl.decode, b"*")
        self.assertEqual((e.code, e.enhanced), (501, "5.7.0"))
        self.assertEqual(sasl.decode(b"=", initial=True), b"")
        self.assertRaises(sasl.SASLError, sasl.decode, b"=")  # only an initial response
        self.assertEqual(sasl.decode(b""), b"")

    @given(st.binary(max_size=200))
    def test_round_trip(self, data):
        self.assertEqual(sasl.decode(sasl.encode(data)), data)

    @given(st.binary(max_size=64))
    def test_anything_else_is_a_sasl_error(self, line):
        try:
            sasl.decode(line)
        except sasl.SASLError:
            pass


class PlainTests(SynchronousTestCase):
    def exchange(self, response):
        mechanism = sasl.Plain()
        verifyObject(IChallengeResponse, mechanism)
        self.assertEqual(mechanism.getChallenge(), b"")
        mechanism.setResponse(response)
        self.assertFalse(mechanism.moreChallenges())
        return mechanism.credentials(testing.conn_meta("smtp"))

    def test_fields_kept_apart(self):
        creds = self.exchange(b"sales\0daniel\0tiger")
        self.assertTrue(ISASLCredentials.providedBy(creds))
        self.assertEqual((creds.authzid, creds.authcid, creds.password), ("sales", "daniel", "tiger"))
        self.assertEqual(creds.mechanism, "PLAIN")
        self.assertEqual(self.exchange("\0d\u00e4niel\0p\u00e4ss".encode()).authcid, "d\u00e4niel")

    def test_malformed(self):
        for response in (b"daniel\0tiger", b"a\0b\0c\0d", b"\0\0tiger", b"\0daniel\0\xff",
                         b"\0" + b"u" * 256 + b"\0pw"):
            e = self.assertRaises(sasl.SASLError, sasl.Plain().setResponse, response)
            self.assertEqual((e.code, e.enhanced), (501, "5.5.2"))
            self.assertNotIn("tiger", str(e))

    def test_255_octets_fine(self):
        self.assertEqual(len(self.exchange(b"\0" + b"u" * 255 + b"\0pw").authcid), 255)


class LoginTests(SynchronousTestCase):
    def test_challenges(self):
        mechanism = sasl.Login()
        self.assertEqual(mechanism.getChallenge(), b"Username:")
        mechanism.setResponse(b"daniel")
        self.assertTrue(mechanism.moreChallenges())
        self.assertEqual(mechanism.getChallenge(), b"Password:")
        mechanism.setResponse(b"tiger")
        self.assertFalse(mechanism.moreChallenges())
        creds = mechanism.credentials(testing.conn_meta("smtp"))
        self.assertEqual((creds.authcid, creds.password, creds.authzid), ("daniel", "tiger", ""))
        self.assertNotIn("tiger", repr(mechanism) + repr(creds))


class PluginTests(SynchronousTestCase):
    def test_load(self):
        name, factory = sasl.load_mechanism("cram-md5=twisted.cred.credentials.CramMD5Credentials")
        self.assertEqual((name, factory), ("CRAM-MD5", CramMD5Credentials))
        self.assertTrue(sasl.is_plaintext(sasl.Plain))
        self.assertTrue(sasl.is_plaintext(CramMD5Credentials))  # unknown: treated as plaintext

    def test_load_errors(self):
        for spec, words in [
            ("CRAM-MD5", "expected NAME=dotted.Name"),
            ("X=no.such.Thing", "cannot import"),
            ("X=twisted.cred.credentials.IUsernamePassword", "does not provide IChallengeResponse"),
            ("X=gateway.smtp.sasl.MAX_AUTH_LINE", "is not a class or factory"),
        ]:
            e = self.assertRaises(ValueError, sasl.load_mechanism, spec)
            self.assertIn(words, str(e))

    def test_credentials_of_plugin(self):
        mechanism = CramMD5Credentials(b"mx.test")
        meta = testing.conn_meta("smtp")
        self.assertIs(sasl.credentials_of(mechanism, meta), mechanism)
        self.assertIs(mechanism.conn_meta, meta)
