"""
Tests for L{gateway.checkers.hashes}: htpasswd hash schemes, checked against
hashes made by the real tools (htpasswd, mkpasswd, argon2, openssl) and
against fixed vectors those tools made once.
"""

from __future__ import annotations

import base64
import inspect
import subprocess
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from gateway.checkers import hashes as hashes_module
from gateway.checkers.hashes import (
    CLI_SCHEMES,
    LEGACY_SCHEMES,
    UnsupportedHash,
    cost_of,
    dummy_like,
    make_hash,
    scheme_of,
    verify,
)
from tests.support import require_tool

ASCII_PW = "correct horse"
UTF8_PW = "pässwörd-€-🔑"

# (stored, password, scheme, cost_of) made once by the tools named, with the
# tool reading the password from stdin.
VECTORS = [
    # htpasswd -niB -C 4 u
    ("$2y$04$eSmnHVgdxPMmAxsBtpUP5u6slHSYujIiWtMxH8bzdbxMXxN6HIXqW",
     ASCII_PW, "bcrypt", "bcrypt cost 4"),
    ("$2y$04$uNIQgopf7JKKf1RwNTM4Uu1AHOnIopOsJp3iYhorUgeGkQWIsdWxi",
     UTF8_PW, "bcrypt", "bcrypt cost 4"),
    # mkpasswd -s -m bcrypt -R 5
    ("$2b$05$yOOnWGgLa1Cr5pkibZaRI.SpfYVcHEyWxRdIIeR19mlNoZsN3vU1i",
     ASCII_PW, "bcrypt", "bcrypt cost 5"),
    ("$2b$05$XurEsme.tlI3scUIoJqpauiYTcDV7jhStY4jxuVpExzBnFNEnz4hW",
     UTF8_PW, "bcrypt", "bcrypt cost 5"),
    # mkpasswd -s -m bcrypt-a -R 5
    ("$2a$05$OLqtpv1cj9R8Kt2gKcCT1eBwnT3A2Vi2efCkV95cRkVaxdO/Ee9ZW",
     ASCII_PW, "bcrypt", "bcrypt cost 5"),
    ("$2a$05$J1Fg5zfH93TbxLjE6fZRCuB7gDhEbPSPb5YJYj8z/SUwDN7YA7.8q",
     UTF8_PW, "bcrypt", "bcrypt cost 5"),
    # argon2 saltsalt1234 -id -t 1 -m 10 -e
    ("$argon2id$v=19$m=1024,t=1,p=1$c2FsdHNhbHQxMjM0$2znN3lYxg7x9+fxXgdmSphgyarengch/cgSd/hVX9Go",
     ASCII_PW, "argon2id", "argon2id t=1 m=1024 p=1"),
    ("$argon2id$v=19$m=1024,t=1,p=1$c2FsdHNhbHQxMjM0$SKpuZEh0uQny7N3LLwWjFJAH38+JKfbuAZAr6fKpfeg",
     UTF8_PW, "argon2id", "argon2id t=1 m=1024 p=1"),
    # argon2 saltsalt1234 -i -t 1 -m 10 -e -v 10
    ("$argon2i$v=16$m=1024,t=1,p=1$c2FsdHNhbHQxMjM0$8p32NFpCo8EZwtjPDxP1ErEwqRG5XHQhMFmSbrd4unw",
     ASCII_PW, "argon2i", "argon2i t=1 m=1024 p=1"),
    # mkpasswd -s -m sha256crypt -S saltsalt1234
    ("$5$saltsalt1234$Nk/oArSKWtNFdJlfdBNGOUvo8k.Hnhb7qU9E4YNaU6D",
     ASCII_PW, "sha256-crypt", "sha256-crypt rounds 5000"),
    ("$5$saltsalt1234$7n1tOidyE93r.aQDFs5FNpqqEnemxVUvYMIryXRYUi7",
     UTF8_PW, "sha256-crypt", "sha256-crypt rounds 5000"),
    # mkpasswd -s -m sha512crypt -S saltsalt1234
    ("$6$saltsalt1234$M8GGCob./MqCOUWUQxq4XOl8FnuNyyYdj0jCin/o9QM/EBySXpLLm39j7cRyl3UBfp47AbtzG9Vd9WeahiSTK/",
     ASCII_PW, "sha512-crypt", "sha512-crypt rounds 5000"),
    ("$6$saltsalt1234$DiEt2dlkwxchGpGLRab0kJvE0JBxccbEpS/Uzw8YV7oPgODe1IkS2.HeynFmgvPIrDNmVjA3463cPpJzKqGqc.",
     UTF8_PW, "sha512-crypt", "sha512-crypt rounds 5000"),
    # mkpasswd -s -m sha512crypt -R 1000 -S saltsalt1234
    ("$6$rounds=1000$saltsalt1234$joeOFMzBVQ8yUPqd5hjR/.7ZBu0cZCh0Inb8IhUvgUaZEsw4tKlCYLG/v3YLBQjjT9rTR8C9pOKX.iSB2zCR40",
     ASCII_PW, "sha512-crypt", "sha512-crypt rounds 1000"),
    ("$6$rounds=1000$saltsalt1234$0qLJQDXs9Ig6AW6DlQQK9eprvXMU7rB.3pqpP4UolmhADvojkogI.3.IRsHSFtDKHFeJqr/ER8GxfT2nKYmC0/",
     UTF8_PW, "sha512-crypt", "sha512-crypt rounds 1000"),
    # htpasswd -ni -m u
    ("$apr1$WUnnNu7M$y0.ozIQk2aYrV42ICpoWQ0", ASCII_PW, "apr1", "apr1"),
    ("$apr1$tmUk1JMT$Di0MGzqeCtarnBAvMWNlp.", UTF8_PW, "apr1", "apr1"),
    # htpasswd -ni -s u
    ("{SHA}L55TUjtiq8FBorTWAZ0jy6g129A=", ASCII_PW, "sha1", "sha1"),
    ("{SHA}Kxnq8Zwxl2IA/DmlWt/KzplwXGg=", UTF8_PW, "sha1", "sha1"),
    # { printf %s "$pw" NaCl1234 | openssl dgst -sha1 -binary; printf NaCl1234; } | base64
    ("{SSHA}N5AvglyQgpuw+E6FIPXO/4H4ClROYUNsMTIzNA==", ASCII_PW, "ssha", "ssha"),
    ("{SSHA}Gf0QphcoHI7lNPX3hgK5KTN4q2VOYUNsMTIzNA==", UTF8_PW, "ssha", "ssha"),
]

#: htpasswd -niB -C 4 u of "x" * 71 + "é": 73 UTF-8 bytes, cut inside the "é".
TRUNCATED_BCRYPT = "$2y$04$p8jsmiTpBzmv6xI2Z2QajeyTxJ0RLH04rA1JRQvYSIqcy0ymngIuu"


def wrong_passwords(password: str) -> list[str]:
    return ["", password + "x", password[:-1], password.upper(), password + "\0"]


#: The text of gateway.checkers.hashes, where every fixed message is written.
_HASHES_SOURCE = inspect.getsource(hashes_module)


class VectorTests(SynchronousTestCase):
    """The fixed vectors: recognised, verified, described."""

    def test_every_scheme_covered(self) -> None:
        self.assertEqual(
            {scheme for _, _, scheme, _ in VECTORS},
            {"bcrypt", "argon2id", "argon2i", "sha256-crypt", "sha512-crypt",
             "apr1", "sha1", "ssha"},
        )
        self.assertEqual(
            {stored[:4] for stored, _, scheme, _ in VECTORS if scheme == "bcrypt"},
            {"$2a$", "$2b$", "$2y$"},
        )

    def test_right_password_verifies(self) -> None:
        for stored, password, _, _ in VECTORS:
            self.assertIs(verify(password, stored), True, stored)

    def test_wrong_password_does_not(self) -> None:
        for stored, password, _, _ in VECTORS:
            for wrong in wrong_passwords(password):
                self.assertIs(verify(wrong, stored), False, (stored, wrong))

    def test_password_of_the_other_vector(self) -> None:
        for stored, password, _, _ in VECTORS:
            other = UTF8_PW if password == ASCII_PW else ASCII_PW
            self.assertIs(verify(other, stored), False, stored)

    def test_scheme_and_cost(self) -> None:
        for stored, _, scheme, cost in VECTORS:
            self.assertEqual(scheme_of(stored), scheme)
            self.assertEqual(cost_of(stored), cost)

    def test_legacy_schemes(self) -> None:
        self.assertEqual(LEGACY_SCHEMES, frozenset({"apr1", "sha1", "ssha"}))
        self.assertEqual(CLI_SCHEMES, ("bcrypt", "argon2id", "sha512-crypt"))

    def test_unencodable_password(self) -> None:
        """A str that is not UTF-8 (a lone surrogate) matches nothing and raises nothing."""
        for stored, _, _, _ in VECTORS:
            self.assertIs(verify("\udc80", stored), False)

    def test_cost_never_reveals_salt_or_digest(self) -> None:
        for stored, _, _, _ in VECTORS:
            tail = stored.rsplit("$", 1)[-1].rsplit("}", 1)[-1]
            self.assertNotIn(tail[:8], cost_of(stored))
            self.assertNotIn("saltsalt", cost_of(stored))
            self.assertNotIn("c2FsdHNhbHQx", cost_of(stored))

    def test_very_long_password(self) -> None:
        """Past passlib's 4096-byte cap a password is simply wrong."""
        for stored, _, _, _ in VECTORS:
            self.assertIs(verify(ASCII_PW * 400, stored), False)

    @settings(max_examples=40, deadline=None)
    @given(st.one_of(st.text(), st.text(max_size=4).map(lambda s: ASCII_PW + s)))
    def test_arbitrary_password(self, password: str) -> None:
        """Any str is True only for the right password, and never raises."""
        for stored, right, _, _ in VECTORS:
            self.assertIs(verify(password, stored), password == right)


class BcryptTruncationTests(SynchronousTestCase):
    """bcrypt reads 72 bytes: verify does as Apache did, make_hash refuses more."""

    def test_verify_uses_first_72_bytes(self) -> None:
        stored = TRUNCATED_BCRYPT
        self.assertTrue(verify("x" * 71 + "é", stored))
        self.assertTrue(verify("x" * 71 + "é" + "anything after", stored))
        # "è" is C3 A8, "é" is C3 A9: only C3 is within the 72 bytes.
        self.assertTrue(verify("x" * 71 + "è", stored))
        self.assertFalse(verify("x" * 71, stored))
        self.assertFalse(verify("x" * 70 + "é", stored))

    def test_make_hash_rejects_over_72_bytes(self) -> None:
        password = "y" * 71 + "é"
        with self.assertRaises(ValueError) as caught:
            make_hash(password, "bcrypt", cost=4)
        message = str(caught.exception)
        self.assertEqual(
            message, "bcrypt uses only the first 72 bytes of a password; this one has 73"
        )
        self.assertNotIn("yyyy", message)

    def test_make_hash_accepts_72_bytes(self) -> None:
        password = "y" * 70 + "é"
        stored = make_hash(password, "bcrypt", cost=4)
        self.assertTrue(verify(password, stored))
        self.assertFalse(verify("y" * 70 + "è", stored))

    def test_other_schemes_use_whole_password(self) -> None:
        password = "z" * 100
        for scheme, cost in (("sha512-crypt", 1000), ("argon2id", 1)):
            stored = make_hash(password, scheme, cost=cost)
            self.assertTrue(verify(password, stored))
            self.assertFalse(verify("z" * 99, stored))


# (stored, reason that the message must contain)
REJECTED = [
    ("", "empty hash"),
    ("$1$saltsalt$qjXMvbEw8oaL.CzflDugX/", "plain MD5-crypt ($1$) is not supported"),
    ("sa3tHJ3/KuYvI", "DES crypt is not supported"),
    ("_J9..CCCCXBrJUJV154M", "BSDi extended DES crypt is not supported"),
    ("correct horse", "plaintext passwords are not supported"),
    ("hunter2", "plaintext passwords are not supported"),
    ("{PLAIN}hunter2", "plaintext passwords are not supported"),
    ("$2b$10$tooShortForBcrypt0123456789", "malformed bcrypt hash"),
    ("$2b$03$yOOnWGgLa1Cr5pkibZaRI.SpfYVcHEyWxRdIIeR19mlNoZsN3vU1i", "malformed bcrypt hash (cost"),
    ("$2b$32$yOOnWGgLa1Cr5pkibZaRI.SpfYVcHEyWxRdIIeR19mlNoZsN3vU1i", "malformed bcrypt hash (cost"),
    ("$2b$5$yOOnWGgLa1Cr5pkibZaRI.SpfYVcHEyWxRdIIeR19mlNoZsN3vU1ix", "malformed bcrypt hash"),
    ("$2b$05$yOOnWGgLa1Cr5pkibZaRI.SpfYVcHEyWxRdIIeR19mlNoZsN3vU1i\n", "malformed bcrypt hash"),
    ("$2b$05$yOOnWGgLa1Cr5pkibZaRIZSpfYVcHEyWxRdIIeR19mlNoZsN3vU1i", "malformed bcrypt hash"),
    ("$2x$05$yOOnWGgLa1Cr5pkibZaRI.SpfYVcHEyWxRdIIeR19mlNoZsN3vU1i", "$2x$"),
    ("$2$05$yOOnWGgLa1Cr5pkibZaRI.SpfYVcHEyWxRdIIeR19mlNoZsN3vU1i", "original bcrypt"),
    ("$argon2d$v=19$m=1024,t=1,p=1$c2FsdHNhbHQxMjM0$2znN3lYxg7x9+fxXgdmSphgyarengch/cgSd/hVX9Go",
     "argon2d is not supported"),
    ("$argon2id$v=19$m=1024,t=1$c2FsdHNhbHQxMjM0$2znN3lYxg7x9+fxXgdmSphgyarengch/cgSd/hVX9Go",
     "malformed argon2id hash"),
    ("$argon2id$v=7$m=1024,t=1,p=1$c2FsdHNhbHQxMjM0$2znN3lYxg7x9+fxXgdmSphgyarengch/cgSd/hVX9Go",
     "malformed argon2id hash"),
    ("$argon2i$garbage", "malformed argon2i hash"),
    ("$6$saltsalt1234$tooShort", "malformed sha512-crypt hash"),
    ("$5$saltsalt1234$M8GGCob./MqCOUWUQxq4XOl8FnuNyyYdj0jCin/o9QM/EBySXpLLm39j7cRyl3UBfp47AbtzG9Vd9WeahiSTK/",
     "malformed sha256-crypt hash"),
    ("$6$rounds=999$saltsalt1234$joeOFMzBVQ8yUPqd5hjR/.7ZBu0cZCh0Inb8IhUvgUaZEsw4tKlCYLG/v3YLBQjjT9rTR8C9pOKX.iSB2zCR40",
     "malformed sha512-crypt hash (rounds"),
    ("$6$rounds=01000$saltsalt1234$joeOFMzBVQ8yUPqd5hjR/.7ZBu0cZCh0Inb8IhUvgUaZEsw4tKlCYLG/v3YLBQjjT9rTR8C9pOKX.iSB2zCR40",
     "malformed sha512-crypt hash (rounds"),
    ("$6$saltsaltsaltsalt1$M8GGCob./MqCOUWUQxq4XOl8FnuNyyYdj0jCin/o9QM/EBySXpLLm39j7cRyl3UBfp47AbtzG9Vd9WeahiSTK/",
     "malformed sha512-crypt hash"),
    ("$apr1$WUnnNu7M$y0.ozIQk2aYrV42ICpoWQ", "malformed apr1 hash"),
    ("$apr1$WUnnNu7MX$y0.ozIQk2aYrV42ICpoWQ0", "malformed apr1 hash"),
    ("{SHA}L55TUjtiq8FBorTWAZ0jy6g129A", "malformed {SHA} hash"),
    ("{SHA}" + base64.b64encode(b"\x01" * 19).decode(), "malformed {SHA} hash"),
    ("{SSHA}" + base64.b64encode(b"\x01" * 20).decode(), "malformed {SSHA} hash"),
    ("{SSHA}not*base64", "malformed {SSHA} hash"),
    ("{MD5}X03MO1qnZdYdgyfeuILPmQ==", "{MD5} hashes are not supported"),
    ("{SSHA512}X03MO1qnZdYdgyfeuILPmQ==", "{SSHA512} hashes are not supported"),
    ("{sha}L55TUjtiq8FBorTWAZ0jy6g129A=", "unrecognised hash format"),
    ("$y$j9T$saltsaltsalt$abcdefghijklmnopqrstuvwxyzABCDEFGHIJKL", "yescrypt ($y$) is not supported"),
    ("$7$CU..../....saltsalt$abcdefghijklmnopqrstuvwxyzABCDEFGHIJKL", "scrypt ($7$) is not supported"),
    ("$9$whatever$abcdefghijklmnopqrstuvwxyzABCDEFGHIJKL", "unrecognised hash format"),
    ("!$6$saltsalt1234$M8GGCob./MqCOUWUQxq4XOl8FnuNyyYdj0jCin/o9QM/EBySXpLLm39j7cRyl3UBfp47AbtzG9Vd9WeahiSTK/",
     "locked or disabled"),
    ("*", "locked or disabled"),
]


class RejectionTests(SynchronousTestCase):
    """Hashes we do not take: a precise reason, and never the hash in it."""

    def assert_rejected(self, call, stored: str, reason: str) -> None:
        with self.assertRaises(UnsupportedHash) as caught:
            call(stored)
        message = str(caught.exception)
        self.assertIn(reason, message, stored)
        if len(stored) >= 8:
            self.assertNotIn(stored, message)
            self.assertNotIn(stored[-8:], message)

    def test_scheme_of(self) -> None:
        for stored, reason in REJECTED:
            self.assert_rejected(scheme_of, stored, reason)

    def test_work_factor_limits(self) -> None:
        """A line asking for minutes or gigabytes per check is refused when read."""
        bcrypt18 = "$2b$18$" + "a" * 21 + "." + "b" * 31
        argon_big = "$argon2id$v=19$m=4194304,t=3,p=4$c2FsdHNhbHQ$" + "A" * 43
        argon_slow = "$argon2id$v=19$m=65536,t=100,p=4$c2FsdHNhbHQ$" + "A" * 43
        sha_slow = "$6$rounds=50000000$salt$" + "a" * 86
        for stored, reason in [
            (bcrypt18, "bcrypt cost 18 is above the limit of 17"),
            (argon_big, "argon2id memory (m, KiB) 4194304 is above the limit"),
            (argon_slow, "argon2id time cost (t) 100 is above the limit"),
            (sha_slow, "sha512-crypt rounds 50000000 are above the limit"),
        ]:
            self.assert_rejected(scheme_of, stored, reason)
            self.assert_rejected(dummy_like, stored, reason)

    def test_verify(self) -> None:
        for stored, reason in REJECTED:
            self.assert_rejected(lambda s: verify(ASCII_PW, s), stored, reason)

    def test_dummy_like_and_cost_of(self) -> None:
        for stored, reason in REJECTED:
            self.assert_rejected(dummy_like, stored, reason)
            self.assert_rejected(cost_of, stored, reason)

    def test_is_value_error(self) -> None:
        self.assertTrue(issubclass(UnsupportedHash, ValueError))

    def test_library_rejects_what_looks_fine(self) -> None:
        """Right shape, wrong content: argon2's own refusal is UnsupportedHash too."""
        for stored, reason in (
            ("$argon2id$v=19$m=1024,t=1,p=1$c2FsdHNhbHQxMjM0$A", "Decoding failed"),
            ("$argon2id$v=19$m=1,t=1,p=1$c2FsdHNhbHQxMjM0$2znN3lYxg7x9+fxXgdmSphgyarengch/cgSd/hVX9Go",
             "Memory cost is too small"),
        ):
            self.assertEqual(scheme_of(stored), "argon2id")
            self.assert_rejected(lambda s: verify(ASCII_PW, s), stored, reason)
            self.assert_rejected(dummy_like, stored, "malformed argon2id hash")

    def test_not_a_string(self) -> None:
        self.assertRaises(TypeError, scheme_of, b"$2b$05$...")
        self.assertRaises(TypeError, verify, b"pw", VECTORS[0][0])

    @settings(max_examples=300, deadline=None)
    @given(
        st.sampled_from(["", "$", "$2b$", "$2y$04$", "$argon2id$", "$argon2i$v=19$",
                         "$5$", "$6$", "$6$rounds=", "$apr1$", "{SHA}", "{SSHA}", "{", "_", "!"]),
        st.text(min_size=8),
    )
    def test_arbitrary_text(self, prefix: str, tail: str) -> None:
        """Any text is a scheme name or an UnsupportedHash that does not quote it."""
        stored = prefix + tail
        try:
            scheme = scheme_of(stored)
        except UnsupportedHash as e:
            # A tail that is a piece of the module's own text ("password")
            # may be in a fixed message without being quoted from the input.
            if tail not in _HASHES_SOURCE:
                self.assertNotIn(tail, str(e))
        else:
            self.assertIn(scheme, {"bcrypt", "argon2id", "argon2i", "sha256-crypt",
                                   "sha512-crypt", "apr1", "sha1", "ssha"})


class SchemeOfTests(SynchronousTestCase):
    """Accepted shapes beyond those of the vectors (which L{VectorTests} covers)."""

    def test_argon2_without_version(self) -> None:
        """Argon2 1.0 (v=16) encodings may leave out the v= field."""
        stored = "$argon2i$m=1024,t=1,p=1$c2FsdHNhbHQxMjM0$8p32NFpCo8EZwtjPDxP1ErEwqRG5XHQhMFmSbrd4unw"
        self.assertEqual(scheme_of(stored), "argon2i")
        self.assertTrue(verify(ASCII_PW, stored))
        self.assertFalse(verify(UTF8_PW, stored))

    def test_ssha_any_salt_length(self) -> None:
        for size in (1, 4, 8, 32):
            stored = "{SSHA}" + base64.b64encode(b"\0" * 20 + b"s" * size).decode()
            self.assertEqual(scheme_of(stored), "ssha")


class MakeHashTests(SynchronousTestCase):
    """Hashes for the CLI: each scheme round-trips with its cost."""

    def test_bcrypt(self) -> None:
        stored = make_hash(UTF8_PW, cost=4)
        self.assertTrue(stored.startswith("$2b$04$"))
        self.assertEqual(cost_of(stored), "bcrypt cost 4")
        self.assertTrue(verify(UTF8_PW, stored))
        self.assertFalse(verify(ASCII_PW, stored))

    def test_bcrypt_default_cost(self) -> None:
        stored = make_hash(ASCII_PW)
        self.assertEqual(cost_of(stored), "bcrypt cost 12")

    def test_argon2id(self) -> None:
        stored = make_hash(UTF8_PW, "argon2id", cost=1)
        self.assertEqual(scheme_of(stored), "argon2id")
        self.assertEqual(cost_of(stored), "argon2id t=1 m=65536 p=4")
        self.assertTrue(verify(UTF8_PW, stored))
        self.assertFalse(verify(ASCII_PW, stored))

    def test_argon2id_defaults(self) -> None:
        self.assertEqual(cost_of(make_hash(ASCII_PW, "argon2id")), "argon2id t=3 m=65536 p=4")

    def test_sha512_crypt(self) -> None:
        stored = make_hash(UTF8_PW, "sha512-crypt", cost=1000)
        self.assertTrue(stored.startswith("$6$rounds=1000$"))
        self.assertTrue(verify(UTF8_PW, stored))
        self.assertFalse(verify(ASCII_PW, stored))

    def test_sha512_crypt_default_rounds(self) -> None:
        stored = make_hash(ASCII_PW, "sha512-crypt")
        self.assertEqual(cost_of(stored), "sha512-crypt rounds 100000")
        self.assertTrue(verify(ASCII_PW, stored))

    def test_sha512_crypt_5000_rounds_is_implicit(self) -> None:
        stored = make_hash(ASCII_PW, "sha512-crypt", cost=5000)
        self.assertEqual(cost_of(stored), "sha512-crypt rounds 5000")
        self.assertTrue(verify(ASCII_PW, stored))

    def test_salted(self) -> None:
        for scheme, cost in (("bcrypt", 4), ("argon2id", 1), ("sha512-crypt", 1000)):
            self.assertNotEqual(
                make_hash(ASCII_PW, scheme, cost=cost), make_hash(ASCII_PW, scheme, cost=cost)
            )

    def test_unknown_scheme(self) -> None:
        for scheme in ("md5", "apr1", "sha256-crypt", "BCRYPT"):
            with self.assertRaises(ValueError) as caught:
                make_hash(ASCII_PW, scheme)
            for known in CLI_SCHEMES:
                self.assertIn(known, str(caught.exception))

    def test_empty_password(self) -> None:
        for scheme in CLI_SCHEMES:
            self.assertRaises(ValueError, make_hash, "", scheme, cost=None)

    def test_nul_or_unencodable_password(self) -> None:
        for password in ("a\0b", "a\udc80b"):
            with self.assertRaises(ValueError) as caught:
                make_hash(password, "bcrypt", cost=4)
            self.assertNotIn(password, str(caught.exception))

    def test_bad_cost(self) -> None:
        for scheme, cost in (("bcrypt", 3), ("bcrypt", 32), ("bcrypt", True),
                             ("sha512-crypt", 999), ("argon2id", 0), ("bcrypt", "12")):
            self.assertRaises(ValueError, make_hash, ASCII_PW, scheme, cost=cost)

    @settings(max_examples=30, deadline=None)
    @given(st.text(min_size=1, max_size=18).filter(lambda s: "\0" not in s
                                                   and not any(0xD800 <= ord(c) < 0xE000 for c in s)))
    def test_round_trip(self, password: str) -> None:
        stored = make_hash(password, "bcrypt", cost=4)
        self.assertTrue(verify(password, stored))
        self.assertFalse(verify(password + "\u00e9", stored))


class DummyLikeTests(SynchronousTestCase):
    """dummy_like: same scheme and work factor, another (random) password."""

    def test_same_scheme_and_cost(self) -> None:
        for stored, password, scheme, cost in VECTORS:
            dummy = dummy_like(stored)
            self.assertEqual(scheme_of(dummy), scheme)
            self.assertEqual(cost_of(dummy), cost)
            self.assertNotEqual(dummy, stored)
            self.assertIs(verify(password, dummy), False, stored)

    def test_keeps_bcrypt_prefix(self) -> None:
        for stored, _, scheme, _ in VECTORS:
            if scheme == "bcrypt":
                self.assertEqual(dummy_like(stored)[:7], stored[:7])

    def test_keeps_ssha_salt_size(self) -> None:
        stored = "{SSHA}" + base64.b64encode(b"\0" * 20 + b"s" * 12).decode()
        self.assertEqual(len(base64.b64decode(dummy_like(stored)[6:])), 32)

    def test_implicit_rounds(self) -> None:
        """A $6$ hash with no rounds= costs 5000 rounds, and so does its dummy."""
        stored = "$6$saltsalt1234$M8GGCob./MqCOUWUQxq4XOl8FnuNyyYdj0jCin/o9QM/EBySXpLLm39j7cRyl3UBfp47AbtzG9Vd9WeahiSTK/"
        dummy = dummy_like(stored)
        self.assertEqual(cost_of(dummy), "sha512-crypt rounds 5000")

    def test_fresh_each_time(self) -> None:
        stored = VECTORS[0][0]
        self.assertNotEqual(dummy_like(stored), dummy_like(stored))


def run(argv: list[str], password: str) -> str:
    """Run a tool with the password on stdin; its first output line."""
    result = subprocess.run(
        argv, input=password.encode("utf-8"), capture_output=True, check=True, timeout=30
    )
    return result.stdout.decode("ascii").splitlines()[0]


def htpasswd(password: str, *flags: str) -> str:
    line = run([require_tool("htpasswd", "apache2-utils"), "-ni", *flags, "user"], password)
    user, _, stored = line.partition(":")
    assert user == "user", line
    return stored


def mkpasswd(password: str, *flags: str) -> str:
    return run([require_tool("mkpasswd", "whois"), "-s", *flags], password)


def argon2_cli(password: str, *flags: str) -> str:
    return run([require_tool("argon2", "argon2"), "somesaltsalt", *flags, "-e"], password)


def openssl_ssha(password: str, salt: bytes) -> str:
    openssl = require_tool("openssl", "openssl")
    digest = subprocess.run(
        [openssl, "dgst", "-sha1", "-binary"],
        input=password.encode("utf-8") + salt, capture_output=True, check=True, timeout=30,
    ).stdout
    return "{SSHA}" + base64.b64encode(digest + salt).decode("ascii")


class ExternalToolTests(SynchronousTestCase):
    """Hashes made now by the tools admins actually use."""

    def check(self, stored: str, scheme: str, password: str, cost: str | None = None) -> None:
        self.assertEqual(scheme_of(stored), scheme)
        if cost is not None:
            self.assertEqual(cost_of(stored), cost)
        self.assertIs(verify(password, stored), True, stored)
        for wrong in wrong_passwords(password):
            self.assertIs(verify(wrong, stored), False, (stored, wrong))

    def test_htpasswd_bcrypt(self) -> None:
        for password in (ASCII_PW, UTF8_PW):
            stored = htpasswd(password, "-B", "-C", "4")
            self.assertTrue(stored.startswith("$2y$04$"))
            self.check(stored, "bcrypt", password, "bcrypt cost 4")

    def test_mkpasswd_bcrypt(self) -> None:
        for method, prefix in (("bcrypt", "$2b$05$"), ("bcrypt-a", "$2a$05$")):
            for password in (ASCII_PW, UTF8_PW):
                stored = mkpasswd(password, "-m", method, "-R", "5")
                self.assertTrue(stored.startswith(prefix))
                self.check(stored, "bcrypt", password, "bcrypt cost 5")

    def test_bcrypt_truncation(self) -> None:
        long = "k" * 72 + "tail"
        for stored in (htpasswd(long, "-B", "-C", "4"), mkpasswd(long, "-m", "bcrypt", "-R", "5")):
            self.assertTrue(verify(long, stored))
            self.assertTrue(verify("k" * 72, stored))
            self.assertTrue(verify("k" * 72 + "other tail", stored))
            self.assertFalse(verify("k" * 71, stored))

    def test_argon2(self) -> None:
        for password in (ASCII_PW, UTF8_PW):
            self.check(argon2_cli(password, "-id", "-t", "1", "-m", "10"),
                       "argon2id", password, "argon2id t=1 m=1024 p=1")
            self.check(argon2_cli(password, "-i", "-t", "1", "-m", "10", "-p", "2"),
                       "argon2i", password, "argon2i t=1 m=1024 p=2")

    def test_sha_crypt(self) -> None:
        for password in (ASCII_PW, UTF8_PW):
            self.check(htpasswd(password, "-2"), "sha256-crypt", password, "sha256-crypt rounds 5000")
            self.check(htpasswd(password, "-5"), "sha512-crypt", password, "sha512-crypt rounds 5000")
            stored = htpasswd(password, "-5", "-r", "1000")
            self.assertTrue(stored.startswith("$6$rounds=1000$"))
            self.check(stored, "sha512-crypt", password, "sha512-crypt rounds 1000")
            self.check(mkpasswd(password, "-m", "sha256crypt", "-R", "2000"),
                       "sha256-crypt", password, "sha256-crypt rounds 2000")
            stored = mkpasswd(password, "-m", "sha512crypt")
            self.assertNotIn("rounds=", stored)
            self.check(stored, "sha512-crypt", password, "sha512-crypt rounds 5000")
            # Explicit rounds=5000 is the same cost as the implicit default.
            self.check(mkpasswd(password, "-m", "sha512crypt", "-R", "5000"),
                       "sha512-crypt", password, "sha512-crypt rounds 5000")

    def test_apr1(self) -> None:
        for password in (ASCII_PW, UTF8_PW):
            self.check(htpasswd(password, "-m"), "apr1", password, "apr1")

    def test_sha1(self) -> None:
        for password in (ASCII_PW, UTF8_PW):
            self.check(htpasswd(password, "-s"), "sha1", password, "sha1")

    def test_ssha(self) -> None:
        for password in (ASCII_PW, UTF8_PW):
            for salt in (b"abcd", b"\x00\xff\x10\x80salty"):
                self.check(openssl_ssha(password, salt), "ssha", password, "ssha")

    def test_unsupported_tool_output(self) -> None:
        self.assert_reason(mkpasswd(ASCII_PW, "-m", "md5crypt"), "plain MD5-crypt ($1$)")
        self.assert_reason(mkpasswd(ASCII_PW, "-m", "descrypt"), "DES crypt")
        self.assert_reason(mkpasswd(ASCII_PW, "-m", "yescrypt"), "yescrypt")
        self.assert_reason(htpasswd(ASCII_PW, "-d"), "DES crypt")
        self.assert_reason(htpasswd(ASCII_PW, "-p"), "plaintext")
        self.assert_reason(argon2_cli(ASCII_PW, "-d", "-t", "1", "-m", "10"), "argon2d")

    def assert_reason(self, stored: str, reason: str) -> None:
        with self.assertRaises(UnsupportedHash) as caught:
            verify(ASCII_PW, stored)
        self.assertIn(reason, str(caught.exception))
        self.assertNotIn(stored, str(caught.exception))

    def test_htpasswd_verifies_ours(self) -> None:
        """Apache's own check (htpasswd -v) accepts what make_hash writes."""
        tool = require_tool("htpasswd", "apache2-utils")
        for scheme, cost in (("bcrypt", 4), ("sha512-crypt", 1000)):
            for password in (ASCII_PW, UTF8_PW):
                with tempfile.NamedTemporaryFile("w", suffix=".htpasswd") as f:
                    f.write(f"user:{make_hash(password, scheme, cost=cost)}\n")
                    f.flush()
                    for attempt, code in ((password, 0), (password + "x", 3)):
                        result = subprocess.run(
                            [tool, "-vi", f.name, "user"], input=attempt.encode("utf-8"),
                            capture_output=True, check=False, timeout=30,
                        )
                        self.assertEqual(result.returncode, code, (scheme, result.stderr))
