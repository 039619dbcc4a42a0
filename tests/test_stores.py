"""
Tests for the file stores: L{gateway.checkers.files} (atomic rewrites and
locking), L{gateway.checkers.htpasswd} and L{gateway.checkers.tokens}.
"""

from __future__ import annotations

import fcntl
import hmac
import os
import stat
import threading
from datetime import datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from gateway.checkers import files, hashes, tokens
from gateway.checkers.files import StoreError, atomic_write, locked, read_text
from gateway.checkers.htpasswd import (
    PasswordEntry,
    add_user,
    delete_user,
    list_users,
    parse_htpasswd,
)
from gateway.checkers.tokens import (
    TOKEN_PREFIX,
    TokenEntry,
    add_token,
    list_tokens,
    new_token,
    parse_tokens,
    revoke,
    token_digest,
)

#: bcrypt's cheapest cost keeps this module fast.
CHEAP = {"scheme": "bcrypt", "cost": 4}
PASSWORD = "Tr0ub4dor&3-in-tests"


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _write(path: str, data: str | bytes, mode: int = 0o600) -> None:
    with open(path, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    os.chmod(path, mode)


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _dir_with(test: SynchronousTestCase, name: str = "store") -> str:
    directory = test.mktemp()
    os.mkdir(directory)
    return os.path.join(directory, name)


def _bcrypt4(password: str = PASSWORD) -> str:
    return hashes.make_hash(password, "bcrypt", cost=4)


#: Fixed, valid hashes of each scheme (the password is irrelevant here).
BCRYPT = _bcrypt4("irrelevant")
APR1 = "$apr1$abcdefgh$" + "b" * 22
SHA1 = "{SHA}" + "W6ph5Mm5Pz8GgiULbPgzG37mj9g="



class DirectoryLinkTests(SynchronousTestCase):
    """
    A store's directory reached through a link owned by someone else (the
    owner of a data directory, planting C{linkdir -> /etc}) is refused;
    links owned by root or by the user running the command are followed.
    """

    def setUp(self) -> None:
        if os.geteuid() != 0:
            raise SkipTest("giving a link to another owner needs root")
        base = os.path.abspath(self.mktemp())
        self.victim = os.path.join(base, "victim")
        os.makedirs(self.victim)
        _write(os.path.join(self.victim, "users"), "keep:me\n", mode=0o644)
        self.link = os.path.join(base, "linkdir")
        os.symlink(self.victim, self.link)

    def planted(self, path: str | None = None) -> None:
        os.lchown(path or self.link, 4242, 4242)

    def test_untrusted_link_refused(self) -> None:
        self.planted()
        target = os.path.join(self.link, "users")
        for attempt in (lambda: atomic_write(target, "x\n"), lambda: locked(target).__enter__(),
                        lambda: files.check_rewritable(target)):
            e = self.assertRaises(StoreError, attempt)
            self.assertIn("owned by uid 4242", str(e))
        self.assertEqual(_read(os.path.join(self.victim, "users")), b"keep:me\n")
        self.assertEqual(_mode(os.path.join(self.victim, "users")), 0o644)

    def test_through_a_trusted_link_to_an_untrusted_one(self) -> None:
        """A link of ours pointing into a path that holds a planted link: refused too."""
        self.planted()
        ours = os.path.join(os.path.dirname(self.link), "ours")
        os.symlink(os.path.join(self.link, "."), ours)
        self.assertRaises(StoreError, atomic_write, os.path.join(ours, "users"), "x\n")

    def test_own_link_followed(self) -> None:
        atomic_write(os.path.join(self.link, "users"), "new:one\n")
        self.assertEqual(_read(os.path.join(self.victim, "users")), b"new:one\n")

    def test_cli_refuses(self) -> None:
        import io

        from gateway import cli

        self.planted()
        err = io.StringIO()
        code = cli.main(["user", "add", os.path.join(self.link, "users"), "z", "--password-stdin"],
                        stdin=io.StringIO("pw-z-12345\n"), stdout=io.StringIO(), stderr=err)
        self.assertNotEqual(code, 0)
        self.assertIn("symbolic link owned by uid 4242", err.getvalue())
        self.assertEqual(_read(os.path.join(self.victim, "users")), b"keep:me\n")

class AtomicWriteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = _dir_with(self)
        self.directory = os.path.dirname(self.path)

    def leftovers(self) -> list[str]:
        return sorted(set(os.listdir(self.directory)) - {"store"})

    def test_creates_with_mode_0600(self) -> None:
        atomic_write(self.path, "h\u00e9llo\n")
        self.assertEqual(_read(self.path), "h\u00e9llo\n".encode())
        self.assertEqual(_mode(self.path), 0o600)
        self.assertEqual(self.leftovers(), [])

    def test_other_mode(self) -> None:
        atomic_write(self.path, "x", mode=0o640)
        self.assertEqual(_mode(self.path), 0o640)

    def test_replaces_by_rename(self) -> None:
        """The new content is a new inode; a reader holding the old one still sees it."""
        _write(self.path, "old\n", mode=0o644)
        before = os.stat(self.path).st_ino
        with open(self.path, "rb") as reader:
            atomic_write(self.path, "new\n")
            self.assertEqual(reader.read(), b"old\n")
        self.assertNotEqual(os.stat(self.path).st_ino, before)
        self.assertEqual(_read(self.path), b"new\n")
        self.assertEqual(_mode(self.path), 0o600)
        self.assertEqual(self.leftovers(), [])

    def test_failed_rename_keeps_old_file(self) -> None:
        _write(self.path, "old\n")

        def replace(src, dst, **kw):
            raise OSError(28, os.strerror(28))

        self.patch(os, "replace", replace)
        e = self.assertRaises(StoreError, atomic_write, self.path, "new\n")
        self.assertIn(os.strerror(28), str(e))
        self.assertEqual(_read(self.path), b"old\n")
        self.assertEqual(self.leftovers(), [])

    def test_failed_write_keeps_old_file(self) -> None:
        _write(self.path, "old\n")

        def fsync(fd):
            raise OSError(5, os.strerror(5))

        self.patch(os, "fsync", fsync)
        self.assertRaises(StoreError, atomic_write, self.path, "new\n")
        self.assertEqual(_read(self.path), b"old\n")
        self.assertEqual(self.leftovers(), [])

    def test_interrupted_write_keeps_old_file(self) -> None:
        """Not only OSError: anything raised mid-write removes the temporary file."""
        _write(self.path, "old\n")

        def fchmod(fd, mode):
            raise KeyboardInterrupt()

        self.patch(os, "fchmod", fchmod)
        self.assertRaises(KeyboardInterrupt, atomic_write, self.path, "new\n")
        self.assertEqual(_read(self.path), b"old\n")
        self.assertEqual(self.leftovers(), [])

    def test_keeps_owner(self) -> None:
        """A rewrite by root keeps the file's owner and group (mode 0600)."""
        if os.getuid() != 0:
            raise SkipTest("changing a file's owner needs root")
        atomic_write(self.path, "old\n")
        os.chown(self.path, 65534, 65534)
        atomic_write(self.path, "new\n")
        st = os.stat(self.path)
        self.assertEqual((st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)), (65534, 65534, 0o600))

    def victim(self) -> str:
        """A file elsewhere (think /etc/shadow) with a link to it at the store's path."""
        real_dir = os.path.abspath(self.mktemp())
        os.makedirs(real_dir)
        target = os.path.join(real_dir, "shadow")
        _write(target, "root:x\n", mode=0o640)
        os.symlink(target, self.path)
        return target

    def test_symlink_refused(self) -> None:
        """A symlinked store is never written through: an error names the real path."""
        target = self.victim()
        e = self.assertRaises(StoreError, atomic_write, self.path, "new\n")
        self.assertIn("symbolic link", str(e))
        self.assertIn(target, str(e))
        self.assertEqual((_read(target), _mode(target)), (b"root:x\n", 0o640))
        self.assertTrue(os.path.islink(self.path))
        self.assertEqual(self.leftovers(), [])

    def test_dangling_symlink_refused(self) -> None:
        """A link to a file that does not exist yet does not create it."""
        target = os.path.join(os.path.abspath(self.mktemp()), "cron")
        os.makedirs(os.path.dirname(target))
        os.symlink(target, self.path)
        self.assertRaises(StoreError, atomic_write, self.path, "new\n")
        self.assertFalse(os.path.lexists(target))

    def test_not_a_regular_file(self) -> None:
        os.mkfifo(self.path)
        e = self.assertRaises(StoreError, atomic_write, self.path, "new\n")
        self.assertIn("not a regular file", str(e))

    def test_link_swapped_in_after_the_check(self) -> None:
        """A link planted between the check and the rename is replaced, not followed."""
        _write(self.path, "old\n")
        real_dir = os.path.abspath(self.mktemp())
        os.makedirs(real_dir)
        target = os.path.join(real_dir, "shadow")
        _write(target, "root:x\n", mode=0o640)
        real_create = files._create_temporary

        def create(dir_fd: int, base: str) -> tuple[int, str]:
            os.unlink(self.path)
            os.symlink(target, self.path)
            return real_create(dir_fd, base)

        self.patch(files, "_create_temporary", create)
        atomic_write(self.path, "new\n")
        self.assertFalse(os.path.islink(self.path))
        self.assertEqual(_read(self.path), b"new\n")
        self.assertEqual((_read(target), _mode(target)), (b"root:x\n", 0o640))

    def test_temporary_names_unpredictable(self) -> None:
        """A file planted at a temporary name is neither followed nor reused."""
        names: list[str] = []
        real_create = files._create_temporary

        def create(dir_fd: int, base: str) -> tuple[int, str]:
            fd, name = real_create(dir_fd, base)
            names.append(name)
            return fd, name

        self.patch(files, "_create_temporary", create)
        atomic_write(self.path, "one\n")
        atomic_write(self.path, "two\n")
        self.assertEqual(len(set(names)), 2)
        self.assertTrue(all(name.startswith(".store.") for name in names))

    def test_link_swapped_in_before_reading(self) -> None:
        """A link planted after the early check is not read through either."""
        from gateway.checkers import htpasswd as htpasswd_module

        self.patch(htpasswd_module, "check_rewritable", lambda name: None)
        self.patch(tokens, "check_rewritable", lambda name: None)
        target = self.victim()
        for rewrite in (
            lambda: add_user(self.path, "mallory", PASSWORD, **CHEAP),
            lambda: delete_user(self.path, "root"),
            lambda: add_token(self.path, "mallory"),
            lambda: revoke(self.path, "root"),
        ):
            e = self.assertRaises(StoreError, rewrite)
            self.assertIn("symbolic link", str(e))
        self.assertEqual((_read(target), _mode(target)), (b"root:x\n", 0o640))
        self.assertTrue(os.path.islink(self.path))

    def test_fifo_not_read(self) -> None:
        """A FIFO at a store's path is an error at once, for readers too, not a hang."""
        os.mkfifo(self.path)
        for read in (read_text, list_users, list_tokens, lambda p: delete_user(p, "x")):
            e = self.assertRaises(StoreError, read, self.path)
            self.assertIn("not a regular file", str(e))

    def test_rewriters_refuse_symlinks_before_reading(self) -> None:
        """add/del/token add/revoke refuse a linked store without reading its target."""
        target = self.victim()
        for rewrite in (
            lambda: add_user(self.path, "mallory", PASSWORD, **CHEAP),
            lambda: delete_user(self.path, "root"),
            lambda: add_token(self.path, "mallory"),
            lambda: revoke(self.path, "root"),
        ):
            e = self.assertRaises(StoreError, rewrite)
            self.assertIn("symbolic link", str(e))
        self.assertEqual((_read(target), _mode(target)), (b"root:x\n", 0o640))

    def test_missing_directory(self) -> None:
        path = os.path.join(self.directory, "nope", "store")
        e = self.assertRaises(StoreError, atomic_write, path, "x")
        self.assertIn(os.strerror(2), str(e))

    def test_directory_is_synced(self) -> None:
        synced: list[int] = []
        real = os.fsync

        def fsync(fd: int) -> None:
            synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
            real(fd)

        self.patch(os, "fsync", fsync)
        atomic_write(self.path, "x")
        self.assertEqual(synced, [False, True])


class LockedTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = _dir_with(self)
        self.directory = os.path.dirname(self.path)

    def try_lock(self) -> bool:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)
        return True

    def test_exclusive_on_directory(self) -> None:
        with locked(self.path):
            self.assertFalse(self.try_lock())
        self.assertTrue(self.try_lock())

    def test_released_on_error(self) -> None:
        with self.assertRaises(ZeroDivisionError), locked(self.path):
            raise ZeroDivisionError()
        self.assertTrue(self.try_lock())

    def test_no_lock_file(self) -> None:
        with locked(self.path):
            pass
        self.assertEqual(os.listdir(self.directory), [])

    def test_missing_directory(self) -> None:
        path = os.path.join(self.directory, "nope", "store")
        self.assertRaises(StoreError, locked(path).__enter__)

    def test_concurrent_rewriters_lose_nothing(self) -> None:
        """Threads adding tokens at once: every line survives the read-modify-write."""
        errors: list[BaseException] = []

        def add(n: int) -> None:
            try:
                add_token(self.path, f"user{n}")
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=add, args=(n,)) for n in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        table = list_tokens(self.path)
        self.assertEqual(sorted(e.user for e in table.by_digest.values()),
                         sorted(f"user{n}" for n in range(12)))
        self.assertEqual(table.problems, ())


class ReadTextTests(SynchronousTestCase):
    def test_missing(self) -> None:
        path = _dir_with(self)
        e = self.assertRaises(StoreError, read_text, path)
        self.assertEqual(str(e), f"{path}: {os.strerror(2)}")

    def test_not_utf8(self) -> None:
        path = _dir_with(self)
        _write(path, b"alice:x\nb\xffob:y\n")
        e = self.assertRaises(StoreError, read_text, path)
        self.assertEqual(str(e), f"{path}:2: not valid UTF-8")

    def test_utf8(self) -> None:
        path = _dir_with(self)
        _write(path, "j\u00fcrgen:x\r\n")
        self.assertEqual(read_text(path), "j\u00fcrgen:x\r\n")


class ParseHtpasswdTests(SynchronousTestCase):
    def test_entries(self) -> None:
        table = parse_htpasswd(
            "# users\n"
            "\n"
            "   # indented comment\n"
            f"alice:{BCRYPT}\r\n"
            f"bob:{APR1}:Bob Smith, room 12\n"
            f"carol:{SHA1}:groups= admins, ,dev,admins\n"
            f"  dave:{BCRYPT}:groups=\n",
            "pw",
        )
        self.assertEqual(table.problems, ())
        self.assertEqual(list(table.entries), ["alice", "bob", "carol", "dave"])
        self.assertEqual(table.entries["alice"], PasswordEntry("alice", BCRYPT, (), 4))
        self.assertEqual(table.entries["bob"].groups, ())
        self.assertEqual(table.entries["bob"].hash, APR1)
        self.assertEqual(table.entries["carol"].groups, ("admins", "dev"))
        self.assertEqual(table.entries["carol"].lineno, 6)
        self.assertEqual(table.entries["dave"].groups, ())
        self.assertEqual(table.entries["alice"].scheme, "bcrypt")
        self.assertEqual(table.legacy, frozenset({"apr1", "sha1"}))
        self.assertEqual(len(table), 4)

    def test_byte_order_mark(self) -> None:
        table = parse_htpasswd(f"\ufeffalice:{BCRYPT}\n")
        self.assertEqual(list(table.entries), ["alice"])
        self.assertEqual(table.legacy, frozenset())

    def test_repr_hides_hash(self) -> None:
        table = parse_htpasswd(f"alice:{BCRYPT}\n")
        self.assertNotIn(BCRYPT, repr(table))
        self.assertNotIn(BCRYPT, repr(table.entries["alice"]))
        self.assertIn("alice", repr(table.entries["alice"]))

    def test_problems(self) -> None:
        """Each bad line is skipped and reported with its number; the rest load."""
        long_line = "eve:" + "x" * 9000
        text = "\n".join(
            [
                "no colon here",  # 1
                f":{BCRYPT}",  # 2
                "frank:",  # 3
                "gina:plaintext-secret",  # 4
                "hank:$1$saltsalt$Wj2aoS9zVWm0Nk9NjGbJ3.",  # 5
                f"ivan:{BCRYPT}:groups=ok,not ok",  # 6
                f"alice:{BCRYPT}",  # 7
                f"alice:{APR1}",  # 8
                long_line,  # 9
                f"judy:{BCRYPT}",  # 10
            ]
        )
        table = parse_htpasswd(text, "/etc/pw")
        self.assertEqual(list(table.entries), ["alice", "judy"])
        self.assertEqual(table.entries["alice"].hash, BCRYPT)
        self.assertEqual(
            table.problems,
            (
                "/etc/pw:1: no ':' between user name and hash",
                "/etc/pw:2: empty user name",
                '/etc/pw:3: empty hash for user "frank"',
                '/etc/pw:4: user "gina": plaintext passwords are not supported',
                '/etc/pw:5: user "hank": plain MD5-crypt ($1$) is not supported',
                '/etc/pw:6: user "ivan": group name "not ok" contains \',\', \':\' or whitespace',
                '/etc/pw:8: duplicate user "alice" (line 7 wins)',
                "/etc/pw:9: line longer than 8192 characters",
            ),
        )
        joined = "\n".join(table.problems)
        self.assertNotIn("plaintext-secret", joined)
        self.assertNotIn("Wj2aoS9z", joined)
        self.assertNotIn(BCRYPT, joined)

    def test_first_line_wins_even_if_unusable(self) -> None:
        """As in Apache: a later line cannot stand in for a broken first one."""
        table = parse_htpasswd(f"alice:garbage\nalice:{BCRYPT}\n", "pw")
        self.assertEqual(dict(table.entries), {})
        self.assertEqual(len(table.problems), 2)
        self.assertEqual(table.problems[1], 'pw:2: duplicate user "alice" (line 1 wins)')

    @settings(max_examples=200, deadline=None)
    @given(st.text())
    def test_never_raises(self, text: str) -> None:
        table = parse_htpasswd(text)
        for problem in table.problems:
            self.assertTrue(problem.startswith("<htpasswd>:"))
            self.assertNotIn("\n", problem)


class HtpasswdStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = _dir_with(self, "users")
        self.directory = os.path.dirname(self.path)

    def test_add_creates_file(self) -> None:
        self.assertTrue(add_user(self.path, "alice", PASSWORD, groups=["admins", "dev"], **CHEAP))
        self.assertEqual(_mode(self.path), 0o600)
        table = list_users(self.path)
        entry = table.entries["alice"]
        self.assertEqual(entry.groups, ("admins", "dev"))
        self.assertEqual(hashes.cost_of(entry.hash), "bcrypt cost 4")
        self.assertTrue(hashes.verify(PASSWORD, entry.hash))
        self.assertEqual(_read(self.path), f"alice:{entry.hash}:groups=admins,dev\n".encode())
        self.assertNotIn(PASSWORD.encode(), _read(self.path))
        self.assertEqual(os.listdir(self.directory), ["users"])

    def test_add_other_schemes(self) -> None:
        add_user(self.path, "alice", PASSWORD, scheme="sha512-crypt", cost=1000)
        add_user(self.path, "bob", PASSWORD, scheme="argon2id", cost=1)
        table = list_users(self.path)
        self.assertEqual(table.entries["alice"].scheme, "sha512-crypt")
        self.assertEqual(table.entries["bob"].scheme, "argon2id")
        self.assertTrue(hashes.verify(PASSWORD, table.entries["bob"].hash))

    def test_add_preserves_other_lines(self) -> None:
        """Comments, CRLF, nginx comments and broken lines survive byte for byte."""
        original = (
            "\ufeff# managed by hand\r\n"
            f"bob:{APR1}:Bob, room 12\r\n"
            "this line is broken\r\n"
            "\r\n"
            f"carol:{SHA1}"  # no final newline
        )
        _write(self.path, original, mode=0o644)
        inode = os.stat(self.path).st_ino
        self.assertFalse(add_user(self.path, "alice", PASSWORD, **CHEAP))
        data = _read(self.path).decode("utf-8")
        self.assertTrue(data.startswith(original + "\r\nalice:$2b$04$"), data)
        self.assertTrue(data.endswith("\r\n"))
        self.assertEqual(data.count("\n"), 6)
        self.assertEqual(_mode(self.path), 0o600)
        self.assertNotEqual(os.stat(self.path).st_ino, inode)
        self.assertEqual(list(list_users(self.path).entries), ["bob", "carol", "alice"])

    def test_add_duplicate(self) -> None:
        add_user(self.path, "alice", PASSWORD, **CHEAP)
        before = _read(self.path)
        e = self.assertRaises(StoreError, add_user, self.path, "alice", "other", **CHEAP)
        self.assertEqual(str(e), f'{self.path}: user "alice" already exists')
        self.assertEqual(_read(self.path), before)

    def test_add_duplicate_of_broken_line(self) -> None:
        """A broken line still claims its user (it would win in Apache)."""
        _write(self.path, "alice:garbage\n")
        self.assertRaises(StoreError, add_user, self.path, "alice", PASSWORD, **CHEAP)

    def test_duplicate_found_before_hashing(self) -> None:
        add_user(self.path, "alice", PASSWORD, **CHEAP)
        self.patch(hashes, "make_hash", lambda *a, **k: self.fail("hashed"))
        self.assertRaises(StoreError, add_user, self.path, "alice", PASSWORD)

    def test_hash_computed_outside_lock(self) -> None:
        real = hashes.make_hash
        held: list[bool] = []

        def make_hash(*args, **kwargs):
            fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append(False)
            except BlockingIOError:
                held.append(True)
            finally:
                os.close(fd)
            return real(*args, **kwargs)

        self.patch(hashes, "make_hash", make_hash)
        add_user(self.path, "alice", PASSWORD, **CHEAP)
        self.assertEqual(held, [False])

    def test_bad_user_names(self) -> None:
        for user, reason in [
            ("", "user name is empty"),
            ("a:b", "user name \"a:b\" contains ':'"),
            (" alice", "user name \" alice\" starts or ends with whitespace"),
            ("alice\t", "user name \"alice\\t\" starts or ends with whitespace"),
            ("al\nice", "user name \"al\\nice\" contains control characters"),
            ("al\x00ice", "user name \"al\\x00ice\" contains control characters"),
            ("#alice", "user name \"#alice\" starts with '#', which marks a comment"),
            ("\u00e9" * 128, "user name is longer than 255 bytes"),
        ]:
            e = self.assertRaises(StoreError, add_user, self.path, user, PASSWORD, **CHEAP)
            self.assertEqual(str(e), reason)
        add_user(self.path, "\u00e9" * 127 + "x", PASSWORD, **CHEAP)  # 255 bytes
        add_user(self.path, "first last", PASSWORD, **CHEAP)
        self.assertEqual(len(list_users(self.path)), 2)

    def test_bad_group_names(self) -> None:
        for group in ["", "a,b", "a:b", "a b", "tab\t"]:
            self.assertRaises(
                StoreError, add_user, self.path, "alice", PASSWORD, groups=[group], **CHEAP
            )
        self.assertRaises(TypeError, add_user, self.path, "alice", PASSWORD, groups="admins")
        self.assertFalse(os.path.exists(self.path))

    def test_bad_scheme_and_password(self) -> None:
        for kwargs in [
            {"scheme": "md5"},
            {"scheme": "bcrypt", "cost": 3},
            {"scheme": "bcrypt", "cost": 4, "password": "x" * 73},
            {"scheme": "bcrypt", "cost": 4, "password": ""},
            {"scheme": "bcrypt", "cost": 4, "password": "bad\udcffsurrogate"},
        ]:
            password = kwargs.pop("password", PASSWORD)
            e = self.assertRaises(StoreError, add_user, self.path, "alice", password, **kwargs)
            self.assertNotIn(password or "\0", str(e))
            self.assertNotIn(PASSWORD, str(e))
        self.assertFalse(os.path.exists(self.path))

    def test_relative_path_in_current_directory(self) -> None:
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(self.directory)
        self.assertTrue(add_user("users", "alice", PASSWORD, **CHEAP))
        _, entry = add_token("tokens", "alice")
        self.assertEqual(revoke("tokens", "alice"), [entry])
        delete_user("users", "alice")
        self.assertEqual(sorted(os.listdir(".")), ["tokens", "users"])

    def test_missing_directory(self) -> None:
        path = os.path.join(self.directory, "nope", "users")
        e = self.assertRaises(StoreError, add_user, path, "alice", PASSWORD, **CHEAP)
        self.assertIn("nope", str(e))

    def test_delete(self) -> None:
        original = (
            "# comment\r\n"
            f"alice:{BCRYPT}\r\n"
            "junk line\r\n"
            f"bob:{APR1}:groups=x\r\n"
            f"alice:{APR1}\r\n"
            "\r\n"
        )
        _write(self.path, original, mode=0o644)
        delete_user(self.path, "alice")
        # Every line of alice goes, so the duplicate cannot take over.
        self.assertEqual(
            _read(self.path).decode(),
            f"# comment\r\njunk line\r\nbob:{APR1}:groups=x\r\n\r\n",
        )
        self.assertEqual(_mode(self.path), 0o600)
        e = self.assertRaises(StoreError, delete_user, self.path, "alice")
        self.assertEqual(str(e), f'{self.path}: no user "alice"')
        delete_user(self.path, "bob")
        self.assertEqual(_read(self.path), b"# comment\r\njunk line\r\n\r\n")

    def test_delete_missing_file(self) -> None:
        e = self.assertRaises(StoreError, delete_user, self.path, "alice")
        self.assertEqual(str(e), f"{self.path}: {os.strerror(2)}")

    def test_list_missing_file(self) -> None:
        e = self.assertRaises(StoreError, list_users, self.path)
        self.assertEqual(str(e), f"{self.path}: {os.strerror(2)}")

    def test_list_reports_problems(self) -> None:
        _write(self.path, f"alice:{BCRYPT}\nbroken\n")
        table = list_users(self.path)
        self.assertEqual(table.path, self.path)
        self.assertEqual(table.problems, (f"{self.path}:2: no ':' between user name and hash",))


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
        token = "y" * 4096
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
        self.path = _dir_with(self, "tokens")

    def clock(self, when: datetime):
        return lambda: when

    def test_add_creates_file(self) -> None:
        when = datetime(2026, 11, 23, 16, 4, 5, 999, tzinfo=timezone(timedelta(hours=1)))
        token, entry = add_token(self.path, "alice", groups=("ops", "dev"), now=self.clock(when))
        self.assertTrue(token.startswith(TOKEN_PREFIX))
        self.assertEqual(
            entry, TokenEntry(token_digest(token), "alice", ("ops", "dev"), "2026-11-23T15:04:05Z", 1)
        )
        data = _read(self.path).decode()
        self.assertEqual(data, f"{token_digest(token)}:alice:ops,dev:2026-11-23T15:04:05Z\n")
        self.assertNotIn(token, data)
        self.assertNotIn(token[len(TOKEN_PREFIX):], data)
        self.assertEqual(_mode(self.path), 0o600)
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
        _write(self.path, original, mode=0o644)
        token, entry = add_token(self.path, "alice")
        data = _read(self.path).decode()
        self.assertTrue(data.startswith(original + "\r\n"))
        self.assertTrue(data.endswith(f"{entry.digest}:alice::{entry.created}\r\n"))
        self.assertEqual(entry.lineno, 4)
        self.assertEqual(list_tokens(self.path).lookup(token).lineno, 4)
        self.assertEqual(_mode(self.path), 0o600)

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
        self.assertEqual(_mode(self.path), 0o600)

    def test_revoke_by_prefix(self) -> None:
        original = (
            "# keep me\n"
            f"{_digest('abcdef1')}:alice::\n"
            f"{_digest('abcdef2')}:bob::\n"
            f"{_digest('fedcba')}:carol::\n"
            "junk\n"
        )
        _write(self.path, original)
        e = self.assertRaises(StoreError, revoke, self.path, "abcdef")
        self.assertEqual(
            str(e), f'{self.path}: token id "abcdef" is ambiguous: it matches 2 tokens'
        )
        self.assertEqual(_read(self.path), original.encode())
        [entry] = revoke(self.path, "ABCDEF2")
        self.assertEqual((entry.user, entry.lineno), ("bob", 3))
        self.assertEqual(
            _read(self.path).decode(),
            f"# keep me\n{_digest('abcdef1')}:alice::\n{_digest('fedcba')}:carol::\njunk\n",
        )

    def test_revoke_removes_duplicate_lines(self) -> None:
        """A duplicate digest line must not come back to life after a revoke."""
        d = _digest("abcdef")
        _write(self.path, f"{d}:alice::\n{d}:mallory::\n")
        [entry] = revoke(self.path, "alice")
        self.assertEqual(entry.user, "alice")
        self.assertEqual(_read(self.path), b"")

    def test_user_name_wins_over_prefix(self) -> None:
        _write(self.path, f"{_digest('abcdef')}:alice::\n{_digest('123456')}:abcdef::\n")
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
        before = _read(self.path)
        for key, message in [
            ("bob", 'no tokens for user "bob"'),
            ("abc12", 'no tokens for user "abc12" (a token id needs at least 6 hex digits)'),
            ("0" * 12, 'no user or token id "000000000000"'),
        ]:
            e = self.assertRaises(StoreError, revoke, self.path, key)
            self.assertEqual(str(e), f"{self.path}: {message}")
        self.assertEqual(_read(self.path), before)

    def test_revoke_missing_file(self) -> None:
        e = self.assertRaises(StoreError, revoke, self.path, "alice")
        self.assertEqual(str(e), f"{self.path}: {os.strerror(2)}")
        self.assertRaises(StoreError, list_tokens, self.path)


class NameRulesTests(SynchronousTestCase):
    def test_quote(self) -> None:
        self.assertEqual(files.quote('a"b\\c\n\x00'), '"a\\"b\\\\c\\n\\x00"')

    def test_split_lines_round_trip(self) -> None:
        for text in ["", "a", "a\n", "a\r\nb", "\n\n", "a\nb\n"]:
            self.assertEqual("".join(files.split_lines(text)), text)
        self.assertEqual(files.split_lines("a\r\nb"), ["a\r\n", "b"])

    def test_append_line(self) -> None:
        self.assertEqual(files.append_line("", "x"), "x\n")
        self.assertEqual(files.append_line("a", "x"), "a\nx\n")
        self.assertEqual(files.append_line("a\r\n", "x"), "a\r\nx\r\n")

