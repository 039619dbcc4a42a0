"""
Tests for L{gateway.checkers.tokens}: the token file, its rewrites behind
C{authgateway token}, the constant-time look-up and the C{--auth
tokens:PATH} checker.
"""

from __future__ import annotations

import hmac
import os
from datetime import datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from gateway import testing
from gateway.checkers import tokens
from gateway.checkers.files import IReloadable, StoreError
from gateway.checkers.tokens import (
    TOKEN_PREFIX,
    TokenChecker,
    TokenEntry,
    add_token,
    list_tokens,
    new_token,
    parse_tokens,
    revoke,
    token_digest,
)
from tests.support import ManualPool, file_mode, read_file, store_path, write_file


def _digest(start: str) -> str:
    return (start + "0" * 64)[:64]


class TokenBasicsTests(SynchronousTestCase):
    def test_new_token(self) -> None:
        token = new_token()
        self.assertTrue(token.startswith(TOKEN_PREFIX))
        self.assertEqual(len(token), len(TOKEN_PREFIX) + 43)
        self.assertNotEqual(token, new_token())

    def test_digest(self) -> None:
        self.assertEqual(
            token_digest("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        )

    def test_entry_repr_hides_digest(self) -> None:
        digest = token_digest("t")
        entry = TokenEntry(digest, "alice", ("a",), "2026-11-23T15:04:05Z", 3)
        self.assertEqual(entry.token_id, digest[:12])
        self.assertNotIn(digest, repr(entry))
        self.assertIn(digest[:12], repr(entry))
        self.assertIn("alice", repr(entry))
        table = parse_tokens(f"{digest}:alice::\n")
        self.assertNotIn(digest, repr(table))


class ParseTokensTests(SynchronousTestCase):
    def test_entries(self) -> None:
        a, b = token_digest("a"), token_digest("b")
        table = parse_tokens(
            "# tokens\n\n"
            f"{a}:alice:admins, dev,,:2026-11-23T15:04:05Z\r\n"
            f"  {b}:bob::\n",
            "tk",
        )
        self.assertEqual(table.problems, ())
        self.assertEqual(
            table.by_digest[a], TokenEntry(a, "alice", ("admins", "dev"), "2026-11-23T15:04:05Z", 3)
        )
        self.assertEqual(table.by_digest[b], TokenEntry(b, "bob", (), "", 4))
        self.assertEqual(table.for_user("alice"), (table.by_digest[a],))
        self.assertEqual(len(table), 2)

    def test_problems(self) -> None:
        a = token_digest("a")
        text = "\n".join(
            [
                f"{a.upper()}:alice::",  # 1
                f"{a[:63]}:alice::",  # 2
                f"{a}::g:",  # 3
                f"{a}:alice:g",  # 4
                "no colon",  # 5
                f"{a}:alice::2026-11-23T15:04:05Z",  # 6
                f"{a}:bob::2026-11-23T15:04:05Z",  # 7
                f"{token_digest('b')}:bob:a b:",  # 8
                f"{token_digest('c')}:carol::2026-11-23T15:04:05Z:extra",  # 9
                f"{token_digest('d')}:dan::" + "x" * 8200,  # 10
            ]
        )
        table = parse_tokens(text, "tk")
        self.assertEqual(list(table.by_digest), [a])
        self.assertEqual(table.by_digest[a].lineno, 6)
        self.assertEqual(
            table.problems,
            (
                "tk:1: digest is not 64 lowercase hex digits",
                "tk:2: digest is not 64 lowercase hex digits",
                "tk:3: empty user name",
                "tk:4: expected DIGEST:USER:GROUPS:CREATED, found 3 fields",
                "tk:5: expected DIGEST:USER:GROUPS:CREATED, found 1 field",
                f"tk:7: duplicate token {a[:12]} (line 6 wins)",
                "tk:8: user \"bob\": group name \"a b\" contains ',', ':' or whitespace",
                "tk:9: CREATED is not an ISO-8601 time like 2026-11-23T15:04:05Z",
                "tk:10: line longer than 8192 characters",
            ),
        )

    @settings(max_examples=200, deadline=None)
    @given(st.text())
    def test_never_raises(self, text: str) -> None:
        table = parse_tokens(text)
        for problem in table.problems:
            self.assertNotIn("\n", problem)


class LookupTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.token = new_token()
        self.table = parse_tokens(f"{token_digest(self.token)}:alice:ops:\n")

    def test_found(self) -> None:
        entry = self.table.lookup(self.token)
        self.assertEqual((entry.user, entry.groups), ("alice", ("ops",)))

    def test_not_found(self) -> None:
        for token in [new_token(), self.token[:-1], self.token + "x", "", "\udcff",
                      token_digest(self.token)]:
            self.assertIsNone(self.table.lookup(token))

    def test_oversized_not_hashed(self) -> None:
        self.patch(tokens, "token_digest", lambda t: self.fail("hashed"))
        self.assertIsNone(self.table.lookup("x" * (tokens.MAX_TOKEN + 1)))

    def test_longest_allowed(self) -> None:
        token = "y" * tokens.MAX_TOKEN
        table = parse_tokens(f"{token_digest(token)}:bob::\n")
        self.assertEqual(table.lookup(token).user, "bob")

    def test_constant_time_comparison(self) -> None:
        """Known and unknown tokens alike end in one hmac.compare_digest."""
        calls: list[tuple[str, str]] = []
        real = hmac.compare_digest

        def compare_digest(a, b):
            calls.append((a, b))
            return real(a, b)

        self.patch(hmac, "compare_digest", compare_digest)
        digest = token_digest(self.token)
        self.assertIsNotNone(self.table.lookup(self.token))
        self.assertIsNone(self.table.lookup("agw_wrong"))
        self.assertEqual(len(calls), 2)
        self.assertEqual(calls[0], (digest, digest))
        self.assertEqual(calls[1][1], token_digest("agw_wrong"))


class TokenStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = store_path(self, "tokens")

    def clock(self, when: datetime):
        return lambda: when

    def test_add_creates_file(self) -> None:
        when = datetime(2026, 11, 23, 16, 4, 5, 999, tzinfo=timezone(timedelta(hours=1)))
        token, entry = add_token(self.path, "alice", groups=("ops", "dev"), now=self.clock(when))
        self.assertTrue(token.startswith(TOKEN_PREFIX))
        self.assertEqual(
            entry, TokenEntry(token_digest(token), "alice", ("ops", "dev"), "2026-11-23T15:04:05Z", 1)
        )
        data = read_file(self.path).decode()
        self.assertEqual(data, f"{token_digest(token)}:alice:ops,dev:2026-11-23T15:04:05Z\n")
        self.assertNotIn(token, data)
        self.assertNotIn(token[len(TOKEN_PREFIX):], data)
        self.assertEqual(file_mode(self.path), 0o600)
        self.assertEqual(list_tokens(self.path).lookup(token), entry)

    def test_naive_clock_is_utc(self) -> None:
        _, entry = add_token(self.path, "alice", now=self.clock(datetime(2026, 1, 2, 3, 4, 5)))
        self.assertEqual(entry.created, "2026-01-02T03:04:05Z")

    def test_default_clock(self) -> None:
        _, entry = add_token(self.path, "alice")
        created = datetime.strptime(entry.created, "%Y-%m-%dT%H:%M:%SZ")
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        self.assertLess(abs(now - created), timedelta(minutes=5))

    def test_add_preserves_other_lines(self) -> None:
        original = "# tokens\r\nbroken line\r\n" + f"{_digest('ab')}:bob::"
        write_file(self.path, original, mode=0o644)
        token, entry = add_token(self.path, "alice")
        data = read_file(self.path).decode()
        self.assertTrue(data.startswith(original + "\r\n"))
        self.assertTrue(data.endswith(f"{entry.digest}:alice::{entry.created}\r\n"))
        self.assertEqual(entry.lineno, 4)
        self.assertEqual(list_tokens(self.path).lookup(token).lineno, 4)
        self.assertEqual(file_mode(self.path), 0o600)

    def test_add_bad_names(self) -> None:
        self.assertRaises(StoreError, add_token, self.path, "a:b")
        self.assertRaises(StoreError, add_token, self.path, "")
        self.assertRaises(StoreError, add_token, self.path, "alice", groups=["a b"])
        self.assertFalse(os.path.exists(self.path))

    def test_add_missing_directory(self) -> None:
        path = os.path.join(os.path.dirname(self.path), "nope", "tokens")
        self.assertRaises(StoreError, add_token, path, "alice")

    def test_revoke_by_user(self) -> None:
        t1, e1 = add_token(self.path, "alice")
        t2, _ = add_token(self.path, "bob")
        t3, e3 = add_token(self.path, "alice")
        self.assertEqual(revoke(self.path, "alice"), [e1, e3])
        table = list_tokens(self.path)
        self.assertIsNone(table.lookup(t1))
        self.assertIsNone(table.lookup(t3))
        self.assertEqual(table.lookup(t2).user, "bob")
        self.assertEqual(file_mode(self.path), 0o600)

    def test_revoke_by_prefix(self) -> None:
        original = (
            "# keep me\n"
            f"{_digest('abcdef1')}:alice::\n"
            f"{_digest('abcdef2')}:bob::\n"
            f"{_digest('fedcba')}:carol::\n"
            "junk\n"
        )
        write_file(self.path, original)
        e = self.assertRaises(StoreError, revoke, self.path, "abcdef")
        self.assertEqual(
            str(e), f'{self.path}: token id "abcdef" is ambiguous: it matches 2 tokens'
        )
        self.assertEqual(read_file(self.path), original.encode())
        [entry] = revoke(self.path, "ABCDEF2")
        self.assertEqual((entry.user, entry.lineno), ("bob", 3))
        self.assertEqual(
            read_file(self.path).decode(),
            f"# keep me\n{_digest('abcdef1')}:alice::\n{_digest('fedcba')}:carol::\njunk\n",
        )

    def test_revoke_removes_duplicate_lines(self) -> None:
        """A duplicate digest line must not come back to life after a revoke."""
        d = _digest("abcdef")
        write_file(self.path, f"{d}:alice::\n{d}:mallory::\n")
        [entry] = revoke(self.path, "alice")
        self.assertEqual(entry.user, "alice")
        self.assertEqual(read_file(self.path), b"")

    def test_user_name_wins_over_prefix(self) -> None:
        write_file(self.path, f"{_digest('abcdef')}:alice::\n{_digest('123456')}:abcdef::\n")
        [entry] = revoke(self.path, "abcdef")
        self.assertEqual(entry.user, "abcdef")

    def test_revoke_by_clear_token(self) -> None:
        token, entry = add_token(self.path, "alice")
        add_token(self.path, "bob")
        self.assertEqual(revoke(self.path, f" {token}\n"), [entry])  # pasted with blanks
        for pasted in (token, f" {token}", f"Bearer {token}"):
            e = self.assertRaises(StoreError, revoke, self.path, pasted)
            self.assertNotIn(token[len(TOKEN_PREFIX):], str(e))

    def test_revoke_no_match(self) -> None:
        add_token(self.path, "alice")
        before = read_file(self.path)
        for key, message in [
            ("bob", 'no tokens for user "bob"'),
            ("abc12", 'no tokens for user "abc12" (a token id needs at least 6 hex digits)'),
            ("0" * 12, 'no user or token id "000000000000"'),
        ]:
            e = self.assertRaises(StoreError, revoke, self.path, key)
            self.assertEqual(str(e), f"{self.path}: {message}")
        self.assertEqual(read_file(self.path), before)

    def test_revoke_missing_file(self) -> None:
        e = self.assertRaises(StoreError, revoke, self.path, "alice")
        self.assertEqual(str(e), f"{self.path}: {os.strerror(2)}")
        self.assertRaises(StoreError, list_tokens, self.path)


class TokenCheckerTests(SynchronousTestCase):
    def setUp(self):
        self.path = self.mktemp()
        self.token, _ = add_token(self.path, "ci-bot", groups=("deploy",))
        self.checker = TokenChecker(self.path)

    def test_token(self):
        verifyObject(ICredentialsChecker, self.checker)
        verifyObject(IReloadable, self.checker)
        info = self.successResultOf(testing.authenticate(self.checker, testing.bearer(self.token)))
        testing.assert_auth_info(self, info, [("ci-bot", "BearerToken")], groups=["deploy"])
        for bad in ("", self.token[:-1], self.token + "x", "agw_" + "A" * 43):
            self.failureResultOf(
                testing.authenticate(self.checker, testing.bearer(bad)), UnauthorizedLogin
            )

    def test_add_and_revoke_picked_up_at_once(self):
        new, _ = add_token(self.path, "other")
        self.successResultOf(testing.authenticate(self.checker, testing.bearer(new)))
        revoke(self.path, "ci-bot")
        self.failureResultOf(
            testing.authenticate(self.checker, testing.bearer(self.token)), UnauthorizedLogin
        )

    def test_reload_off_the_reactor_thread(self):
        """With the service's loader, the token file is read there, not inline."""
        loads, clock = ManualPool(), task.Clock()
        self.checker.use_loader(loads.run, clock)
        new, _ = add_token(self.path, "other")
        d = testing.authenticate(self.checker, testing.bearer(new))
        self.assertNoResult(d)
        [(f, _, _)] = loads.jobs
        self.assertEqual(f, self.checker.file._read)
        loads.finish_all()
        self.successResultOf(d)

    def test_only_bearer(self):
        self.assertEqual(len(self.checker.credentialInterfaces), 1)
