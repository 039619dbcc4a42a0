# -*- test-case-name: tests.test_hashes -*-
"""
Password hashes as found in Apache and nginx htpasswd files: recognise,
verify, create and imitate them.

Everything here blocks (bcrypt, argon2 and SHA-crypt are slow on purpose), so
callers run it in a thread pool. Error messages name a scheme and a reason,
never a stored hash or a password.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable

import argon2
import attrs
import bcrypt
from argon2.exceptions import (
    HashingError,
    InvalidHashError,
    VerificationError,
    VerifyMismatchError,
)
from passlib import exc as passlib_exc  # type: ignore[import-untyped]
from passlib.hash import (  # type: ignore[import-untyped]
    apr_md5_crypt,
    sha256_crypt,
    sha512_crypt,
)

__all__ = [
    "CLI_SCHEMES",
    "LEGACY_SCHEMES",
    "UnsupportedHash",
    "cost_of",
    "dummy_like",
    "make_hash",
    "scheme_of",
    "verify",
]


class UnsupportedHash(ValueError):
    """
    A stored hash we cannot verify; the message names the scheme or the reason,
    never the hash itself.
    """


#: The schemes L{make_hash} writes.
CLI_SCHEMES = ("bcrypt", "argon2id", "sha512-crypt")

#: Schemes that are read and verified, but deserve a warning from the caller.
LEGACY_SCHEMES = frozenset({"apr1", "sha1", "ssha"})

#: bcrypt (every implementation Apache or OpenBSD ever shipped) reads only this much.
BCRYPT_MAX_BYTES = 72

_BCRYPT_DEFAULT_COST = 12
_SHA512_DEFAULT_ROUNDS = 100_000
_SHA_CRYPT_IMPLICIT_ROUNDS = 5000
_SHA_CRYPT_ROUNDS = range(1000, 999_999_999 + 1)
_BCRYPT_COSTS = range(4, 31 + 1)

# Work factors a stored hash may ask for. Anything above makes every login
# (and every unknown-user check, through the dummy hash) hold a hash thread
# for seconds or gigabytes: one bad line would be a denial of service.
MAX_BCRYPT_COST = 17  # htpasswd's own maximum; ~10 s here
MAX_SHA_CRYPT_ROUNDS = 2_000_000  # ~1.2 s here
MAX_ARGON2_MEMORY_KIB = 1024 * 1024  # 1 GiB
MAX_ARGON2_TIME = 32
MAX_ARGON2_PARALLELISM = 16

# The schemes whose writers are C programs that stop at a NUL byte: a password
# containing one can never be the password the hash was made from.
_C_STRING_SCHEMES = frozenset({"bcrypt", "sha256-crypt", "sha512-crypt", "apr1"})

_H64 = "./0-9A-Za-z"
# 22 salt characters (the last carries only 2 bits, so it is one of ".Oeu")
# and 31 of digest.
_BCRYPT_RE = re.compile(
    rf"\$(2[aby])\$([0-9]{{2}})\$[{_H64}]{{21}}[.Oeu][{_H64}]{{31}}", re.ASCII
)
_ARGON2_RE = re.compile(
    r"\$(argon2id|argon2i)\$(?:v=(?:16|19)\$)?m=([0-9]+),t=([0-9]+),p=([0-9]+)"
    r"\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+",
    re.ASCII,
)
_SHA_CRYPT_RE = re.compile(
    rf"\$([56])\$(?:rounds=([0-9]+)\$)?[{_H64}]{{0,16}}\$([{_H64}]+)", re.ASCII
)
_SHA_CRYPT_CHECKSUM = {"5": 43, "6": 86}
_APR1_RE = re.compile(rf"\$apr1\$[{_H64}]{{0,8}}\$[{_H64}]{{22}}", re.ASCII)
_DES_RE = re.compile(rf"[{_H64}]{{13}}", re.ASCII)
_BSDI_DES_RE = re.compile(rf"_[{_H64}]{{19}}", re.ASCII)

# Recognised but refused: prefix -> reason. Longest prefixes first.
_REFUSED_PREFIXES = (
    ("$argon2d$", "argon2d is not supported (use argon2id)"),
    ("$2x$", "bcrypt $2x$ (crypt_blowfish's sign-extension bug) is not supported"),
    ("$2$", "original bcrypt ($2$) is not supported"),
    ("$1$", "plain MD5-crypt ($1$) is not supported"),
    ("$3$", "NT hash ($3$) is not supported"),
    ("$7$", "scrypt ($7$) is not supported"),
    ("$y$", "yescrypt ($y$) is not supported"),
    ("$gy$", "gost-yescrypt ($gy$) is not supported"),
    ("$sha1$", "NetBSD sha1crypt ($sha1$) is not supported"),
    ("$md5", "SunMD5 crypt is not supported"),
    ("{PLAIN}", "plaintext passwords are not supported"),
    ("{CLEARTEXT}", "plaintext passwords are not supported"),
    ("{MD5}", "{MD5} hashes are not supported"),
    ("{SMD5}", "{SMD5} hashes are not supported"),
    ("{CRYPT}", "{CRYPT} hashes are not supported"),
    ("{SHA256}", "{SHA256} hashes are not supported"),
    ("{SSHA256}", "{SSHA256} hashes are not supported"),
    ("{SHA512}", "{SHA512} hashes are not supported"),
    ("{SSHA512}", "{SSHA512} hashes are not supported"),
)


@attrs.frozen
class _Parsed:
    """What a structural look at a stored hash found."""

    scheme: str
    #: bcrypt cost or SHA-crypt rounds; 0 for the others.
    cost: int = 0
    #: Human description of the parameters, for L{cost_of}.
    description: str = ""
    #: {SSHA} salt length in bytes.
    salt_size: int = 0


def _b64decode(text: str) -> bytes | None:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return None


def _parse(stored: str) -> _Parsed:
    """Recognise C{stored} by its shape alone; raise L{UnsupportedHash} otherwise."""
    if not isinstance(stored, str):
        raise TypeError("a stored hash must be str")
    if not stored:
        raise UnsupportedHash("empty hash: the entry has no password")
    for prefix, reason in _REFUSED_PREFIXES:
        if stored.startswith(prefix):
            raise UnsupportedHash(reason)

    if stored.startswith(("$2a$", "$2b$", "$2y$")):
        m = _BCRYPT_RE.fullmatch(stored)
        if m is None:
            raise UnsupportedHash("malformed bcrypt hash")
        cost = int(m.group(2))
        if cost not in _BCRYPT_COSTS:
            raise UnsupportedHash("malformed bcrypt hash (cost must be 04 to 31)")
        if cost > MAX_BCRYPT_COST:
            raise UnsupportedHash(f"bcrypt cost {cost} is above the limit of {MAX_BCRYPT_COST}")
        return _Parsed("bcrypt", cost, f"bcrypt cost {cost}")

    if stored.startswith(("$argon2id$", "$argon2i$")):
        scheme = "argon2id" if stored.startswith("$argon2id$") else "argon2i"
        m = _ARGON2_RE.fullmatch(stored)
        if m is None:
            raise UnsupportedHash(f"malformed {scheme} hash")
        memory, time, parallelism = m.group(2, 3, 4)
        for value, limit, what in (
            (memory, MAX_ARGON2_MEMORY_KIB, "memory (m, KiB)"),
            (time, MAX_ARGON2_TIME, "time cost (t)"),
            (parallelism, MAX_ARGON2_PARALLELISM, "parallelism (p)"),
        ):
            if int(value) > limit:
                raise UnsupportedHash(f"{scheme} {what} {int(value)} is above the limit of {limit}")
        description = f"{scheme} t={int(time)} m={int(memory)} p={int(parallelism)}"
        return _Parsed(scheme, 0, description)

    if stored.startswith(("$5$", "$6$")):
        scheme = "sha256-crypt" if stored[1] == "5" else "sha512-crypt"
        m = _SHA_CRYPT_RE.fullmatch(stored)
        if m is None or len(m.group(3)) != _SHA_CRYPT_CHECKSUM[m.group(1)]:
            raise UnsupportedHash(f"malformed {scheme} hash")
        if m.group(2) is None:
            rounds = _SHA_CRYPT_IMPLICIT_ROUNDS
        else:
            rounds = int(m.group(2))
            if m.group(2).startswith("0") or rounds not in _SHA_CRYPT_ROUNDS:
                raise UnsupportedHash(
                    f"malformed {scheme} hash (rounds must be 1000 to 999999999)"
                )
        if rounds > MAX_SHA_CRYPT_ROUNDS:
            raise UnsupportedHash(
                f"{scheme} rounds {rounds} are above the limit of {MAX_SHA_CRYPT_ROUNDS}"
            )
        return _Parsed(scheme, rounds, f"{scheme} rounds {rounds}")

    if stored.startswith("$apr1$"):
        if _APR1_RE.fullmatch(stored) is None:
            raise UnsupportedHash("malformed apr1 hash")
        return _Parsed("apr1", 0, "apr1")

    if stored.startswith("{SHA}"):
        digest = _b64decode(stored[len("{SHA}") :])
        if digest is None or len(digest) != 20:
            raise UnsupportedHash("malformed {SHA} hash (want base64 of 20 bytes)")
        return _Parsed("sha1", 0, "sha1")

    if stored.startswith("{SSHA}"):
        raw = _b64decode(stored[len("{SSHA}") :])
        if raw is None or len(raw) <= 20:
            raise UnsupportedHash(
                "malformed {SSHA} hash (want base64 of a 20-byte digest and a salt)"
            )
        return _Parsed("ssha", 0, "ssha", salt_size=len(raw) - 20)

    if stored.startswith(("$", "{")):
        raise UnsupportedHash("unrecognised hash format")
    if _BSDI_DES_RE.fullmatch(stored):
        raise UnsupportedHash("BSDi extended DES crypt is not supported")
    if _DES_RE.fullmatch(stored):
        raise UnsupportedHash("DES crypt is not supported")
    if stored.startswith(("!", "*")):
        raise UnsupportedHash("locked or disabled entry ('!' or '*'), not a hash")
    raise UnsupportedHash("plaintext passwords are not supported")


def scheme_of(stored: str) -> str:
    """
    Name the scheme of a stored hash: C{bcrypt}, C{argon2id}, C{argon2i},
    C{sha256-crypt}, C{sha512-crypt}, C{apr1}, C{sha1} or C{ssha}.

    A cheap structural check, no hashing. Anything else raises
    L{UnsupportedHash} saying why (plain MD5-crypt, DES, plaintext, malformed...).
    """
    return _parse(stored).scheme


def cost_of(stored: str) -> str:
    """
    A short description of the work factor of C{stored}, such as
    C{"bcrypt cost 10"}, C{"sha512-crypt rounds 5000"},
    C{"argon2id t=3 m=65536 p=4"} or C{"apr1"}; never any salt or digest.
    """
    return _parse(stored).description


def _verify_bcrypt(secret: bytes, stored: str) -> bool:
    # bcrypt 5 refuses passwords over 72 bytes; Apache and OpenBSD silently
    # used the first 72 when the hash was made, so do the same here.
    try:
        return bcrypt.checkpw(secret[:BCRYPT_MAX_BYTES], stored.encode("ascii"))
    except ValueError:
        raise UnsupportedHash("malformed bcrypt hash") from None


_ARGON2 = argon2.PasswordHasher()


def _verify_argon2(secret: bytes, stored: str) -> bool:
    try:
        return _ARGON2.verify(stored, secret)
    except VerifyMismatchError:
        return False
    except InvalidHashError:
        raise UnsupportedHash("malformed argon2 hash") from None
    except VerificationError as e:
        # libargon2's fixed error strings ("Decoding failed", ...); no input in them.
        raise UnsupportedHash(f"argon2 cannot verify this hash: {e}") from None


def _passlib_verifier(handler, scheme: str) -> Callable[[bytes, str], bool]:
    def verify_with(secret: bytes, stored: str) -> bool:
        try:
            return bool(handler.verify(secret, stored))
        except passlib_exc.PasswordValueError:
            # Over passlib's size cap: no password that long was ever stored.
            return False
        except ValueError:
            raise UnsupportedHash(f"malformed {scheme} hash") from None

    return verify_with


def _verify_sha1(secret: bytes, stored: str) -> bool:
    digest = base64.b64decode(stored[len("{SHA}") :])
    return hmac.compare_digest(hashlib.sha1(secret).digest(), digest)


def _verify_ssha(secret: bytes, stored: str) -> bool:
    raw = base64.b64decode(stored[len("{SSHA}") :])
    digest, salt = raw[:20], raw[20:]
    return hmac.compare_digest(hashlib.sha1(secret + salt).digest(), digest)


_VERIFIERS: dict[str, Callable[[bytes, str], bool]] = {
    "bcrypt": _verify_bcrypt,
    "argon2id": _verify_argon2,
    "argon2i": _verify_argon2,
    "sha256-crypt": _passlib_verifier(sha256_crypt, "sha256-crypt"),
    "sha512-crypt": _passlib_verifier(sha512_crypt, "sha512-crypt"),
    "apr1": _passlib_verifier(apr_md5_crypt, "apr1"),
    "sha1": _verify_sha1,
    "ssha": _verify_ssha,
}


def verify(password: str, stored: str) -> bool:
    """
    Whether C{password} (encoded UTF-8) matches C{stored}. Blocking.

    Raises L{UnsupportedHash} when the hash is one we do not handle or is
    malformed; a wrong password is only ever C{False}.
    """
    if not isinstance(password, str):
        raise TypeError("password must be str")
    scheme = _parse(stored).scheme
    try:
        secret = password.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates: no client sent this as UTF-8, so it matches nothing.
        return False
    if b"\0" in secret and scheme in _C_STRING_SCHEMES:
        return False
    return _VERIFIERS[scheme](secret, stored)


def _check_cost(cost: object, allowed: range, what: str) -> int:
    if type(cost) is not int or cost not in allowed:
        raise ValueError(
            f"{what} must be an integer from {allowed.start} to {allowed.stop - 1}"
        )
    return cost


def make_hash(password: str, scheme: str = "bcrypt", *, cost: int | None = None) -> str:
    """
    Hash C{password} for an htpasswd file. Blocking.

    C{scheme} is one of L{CLI_SCHEMES}. C{cost} is the bcrypt cost (log2
    rounds, default 12), the argon2id time cost (other parameters are
    argon2-cffi's defaults) or the sha512-crypt rounds (default 100000).
    """
    if scheme not in CLI_SCHEMES:
        raise ValueError(
            f"unknown hash scheme {scheme!r}; choose one of {', '.join(CLI_SCHEMES)}"
        )
    if not isinstance(password, str):
        raise TypeError("password must be str")
    if not password:
        raise ValueError("refusing to hash an empty password")
    try:
        secret = password.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("password is not encodable as UTF-8") from None
    if b"\0" in secret:
        raise ValueError("password contains NUL, where htpasswd tools cut it off")

    if scheme == "bcrypt":
        if len(secret) > BCRYPT_MAX_BYTES:
            raise ValueError(
                f"bcrypt uses only the first {BCRYPT_MAX_BYTES} bytes of a password; "
                f"this one has {len(secret)}"
            )
        rounds = _BCRYPT_DEFAULT_COST
        if cost is not None:
            rounds = _check_cost(cost, range(4, MAX_BCRYPT_COST + 1), "bcrypt cost")
        salt = bcrypt.gensalt(rounds=rounds, prefix=b"2b")
        return bcrypt.hashpw(secret, salt).decode("ascii")
    if scheme == "argon2id":
        hasher = _ARGON2
        if cost is not None:
            time_cost = _check_cost(cost, range(1, MAX_ARGON2_TIME + 1), "argon2id time cost")
            hasher = argon2.PasswordHasher(time_cost=time_cost)
        return hasher.hash(secret)
    rounds = _SHA512_DEFAULT_ROUNDS
    if cost is not None:
        rounds = _check_cost(
            cost, range(1000, MAX_SHA_CRYPT_ROUNDS + 1), "sha512-crypt rounds"
        )
    return sha512_crypt.using(rounds=rounds).hash(secret)


def dummy_like(stored: str) -> str:
    """
    A hash of a fresh random password, with the scheme and work factor of
    C{stored}: verifying any password against it costs what verifying against
    C{stored} costs. Use it for unknown users, so they take as long to reject
    as a wrong password. Raises L{UnsupportedHash} like L{scheme_of}.
    """
    parsed = _parse(stored)
    secret = secrets.token_urlsafe(24).encode("ascii")
    scheme = parsed.scheme
    if scheme == "bcrypt":
        made = bcrypt.hashpw(secret, bcrypt.gensalt(rounds=parsed.cost, prefix=b"2b"))
        return stored[:4] + made.decode("ascii")[4:]
    if scheme in ("argon2id", "argon2i"):
        try:
            parameters = argon2.extract_parameters(stored)
            return argon2.PasswordHasher.from_parameters(parameters).hash(secret)
        except (InvalidHashError, HashingError):
            raise UnsupportedHash(f"malformed {scheme} hash") from None
    if scheme in ("sha256-crypt", "sha512-crypt"):
        handler = sha256_crypt if scheme == "sha256-crypt" else sha512_crypt
        return handler.using(rounds=parsed.cost).hash(secret)
    if scheme == "apr1":
        return apr_md5_crypt.hash(secret)
    if scheme == "sha1":
        return "{SHA}" + base64.b64encode(hashlib.sha1(secret).digest()).decode("ascii")
    salt = secrets.token_bytes(parsed.salt_size)
    digest = hashlib.sha1(secret + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode("ascii")
