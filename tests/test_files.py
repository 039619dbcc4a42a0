"""
Tests for L{gateway.checkers.files}, what the password and token files
share: atomic rewrites, the lock, UTF-8 reads, links refused, and the
L{WatchedFile} that reloads a changed file.
"""

from __future__ import annotations

import fcntl
import os
import stat
import threading

from twisted.internet import defer, task
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from gateway.checkers import files, htpasswd, tokens
from gateway.checkers.files import StoreError, WatchedFile, atomic_write, locked, read_text
from gateway.checkers.htpasswd import add_user, delete_user, list_users
from gateway.checkers.tokens import add_token, list_tokens, revoke
from tests.support import (
    CHEAP,
    PASSWORD,
    ManualPool,
    file_mode,
    planted_directory_link,
    read_file,
    store_path,
    victim_file,
    write_file,
)


class DirectoryLinkTests(SynchronousTestCase):
    """
    A store's directory reached through a link owned by someone else (the
    owner of a data directory, planting C{linkdir -> /etc}) is refused;
    links owned by root or by the user running the command are followed.
    """

    def setUp(self) -> None:
        self.victim, self.link = planted_directory_link(self)

    def test_untrusted_link_refused(self) -> None:
        target = os.path.join(self.link, "users")
        for attempt in (lambda: atomic_write(target, "x\n"), lambda: locked(target).__enter__(),
                        lambda: files.check_rewritable(target)):
            e = self.assertRaises(StoreError, attempt)
            self.assertIn("owned by uid 4242", str(e))
        self.assertEqual(read_file(os.path.join(self.victim, "users")), b"keep:me\n")
        self.assertEqual(file_mode(os.path.join(self.victim, "users")), 0o644)

    def test_through_a_trusted_link_to_an_untrusted_one(self) -> None:
        """A link of ours pointing into a path that holds a planted link: refused too."""
        ours = os.path.join(os.path.dirname(self.link), "ours")
        os.symlink(os.path.join(self.link, "."), ours)
        self.assertRaises(StoreError, atomic_write, os.path.join(ours, "users"), "x\n")

    def test_own_link_followed(self) -> None:
        os.lchown(self.link, os.geteuid(), os.getegid())  # a link of our own
        atomic_write(os.path.join(self.link, "users"), "new:one\n")
        self.assertEqual(read_file(os.path.join(self.victim, "users")), b"new:one\n")


class AtomicWriteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = store_path(self)
        self.directory = os.path.dirname(self.path)

    def leftovers(self) -> list[str]:
        return sorted(set(os.listdir(self.directory)) - {"store"})

    def test_creates_with_mode_0600(self) -> None:
        atomic_write(self.path, "h\u00e9llo\n")
        self.assertEqual(read_file(self.path), "h\u00e9llo\n".encode())
        self.assertEqual(file_mode(self.path), 0o600)
        self.assertEqual(self.leftovers(), [])

    def test_other_mode(self) -> None:
        atomic_write(self.path, "x", mode=0o640)
        self.assertEqual(file_mode(self.path), 0o640)

    def test_replaces_by_rename(self) -> None:
        """The new content is a new inode; a reader holding the old one still sees it."""
        write_file(self.path, "old\n", mode=0o644)
        before = os.stat(self.path).st_ino
        with open(self.path, "rb") as reader:
            atomic_write(self.path, "new\n")
            self.assertEqual(reader.read(), b"old\n")
        self.assertNotEqual(os.stat(self.path).st_ino, before)
        self.assertEqual(read_file(self.path), b"new\n")
        self.assertEqual(file_mode(self.path), 0o600)
        self.assertEqual(self.leftovers(), [])

    def test_failed_rename_keeps_old_file(self) -> None:
        write_file(self.path, "old\n")

        def replace(src, dst, **kw):
            raise OSError(28, os.strerror(28))

        self.patch(os, "replace", replace)
        e = self.assertRaises(StoreError, atomic_write, self.path, "new\n")
        self.assertIn(os.strerror(28), str(e))
        self.assertEqual(read_file(self.path), b"old\n")
        self.assertEqual(self.leftovers(), [])

    def test_failed_write_keeps_old_file(self) -> None:
        write_file(self.path, "old\n")

        def fsync(fd):
            raise OSError(5, os.strerror(5))

        self.patch(os, "fsync", fsync)
        self.assertRaises(StoreError, atomic_write, self.path, "new\n")
        self.assertEqual(read_file(self.path), b"old\n")
        self.assertEqual(self.leftovers(), [])

    def test_interrupted_write_keeps_old_file(self) -> None:
        """Not only OSError: anything raised mid-write removes the temporary file."""
        write_file(self.path, "old\n")

        def fchmod(fd, mode):
            raise KeyboardInterrupt()

        self.patch(os, "fchmod", fchmod)
        self.assertRaises(KeyboardInterrupt, atomic_write, self.path, "new\n")
        self.assertEqual(read_file(self.path), b"old\n")
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

    def test_symlink_refused(self) -> None:
        """A symlinked store is never written through: an error names the real path."""
        target = victim_file(self, link=self.path)
        e = self.assertRaises(StoreError, atomic_write, self.path, "new\n")
        self.assertIn("symbolic link", str(e))
        self.assertIn(target, str(e))
        self.assertEqual((read_file(target), file_mode(target)), (b"root:x\n", 0o640))
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
        write_file(self.path, "old\n")
        target = victim_file(self)
        real_create = files._create_temporary

        def create(dir_fd: int, base: str) -> tuple[int, str]:
            os.unlink(self.path)
            os.symlink(target, self.path)
            return real_create(dir_fd, base)

        self.patch(files, "_create_temporary", create)
        atomic_write(self.path, "new\n")
        self.assertFalse(os.path.islink(self.path))
        self.assertEqual(read_file(self.path), b"new\n")
        self.assertEqual((read_file(target), file_mode(target)), (b"root:x\n", 0o640))

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


class StoreAccessTests(SynchronousTestCase):
    """
    How both stores' readers and rewriters (htpasswd and tokens) use this
    module: never through a link or a FIFO, and relative paths work.
    """

    def setUp(self) -> None:
        self.path = store_path(self)
        self.directory = os.path.dirname(self.path)

    def assertRewritesRefused(self) -> None:
        """add/del/token add/revoke each refuse the linked store; its target is untouched."""
        target = victim_file(self, link=self.path)
        for rewrite in (
            lambda: add_user(self.path, "mallory", PASSWORD, **CHEAP),
            lambda: delete_user(self.path, "root"),
            lambda: add_token(self.path, "mallory"),
            lambda: revoke(self.path, "root"),
        ):
            e = self.assertRaises(StoreError, rewrite)
            self.assertIn("symbolic link", str(e))
        self.assertEqual((read_file(target), file_mode(target)), (b"root:x\n", 0o640))

    def test_rewriters_refuse_symlinks_before_reading(self) -> None:
        """add/del/token add/revoke refuse a linked store without reading its target."""
        self.assertRewritesRefused()

    def test_link_swapped_in_before_reading(self) -> None:
        """A link planted after the early check is not read through either."""
        self.patch(htpasswd, "check_rewritable", lambda name: None)
        self.patch(tokens, "check_rewritable", lambda name: None)
        self.assertRewritesRefused()
        self.assertTrue(os.path.islink(self.path))

    def test_fifo_not_read(self) -> None:
        """A FIFO at a store's path is an error at once, for readers too, not a hang."""
        os.mkfifo(self.path)
        for read in (read_text, list_users, list_tokens, lambda p: delete_user(p, "x")):
            e = self.assertRaises(StoreError, read, self.path)
            self.assertIn("not a regular file", str(e))

    def test_relative_path_in_current_directory(self) -> None:
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(self.directory)
        self.assertTrue(add_user("users", "alice", PASSWORD, **CHEAP))
        _, entry = add_token("tokens", "alice")
        self.assertEqual(revoke("tokens", "alice"), [entry])
        delete_user("users", "alice")
        self.assertEqual(sorted(os.listdir(".")), ["tokens", "users"])


class LockedTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = store_path(self)
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
        path = store_path(self)
        e = self.assertRaises(StoreError, read_text, path)
        self.assertEqual(str(e), f"{path}: {os.strerror(2)}")

    def test_not_utf8(self) -> None:
        path = store_path(self)
        write_file(path, b"alice:x\nb\xffob:y\n")
        e = self.assertRaises(StoreError, read_text, path)
        self.assertEqual(str(e), f"{path}:2: not valid UTF-8")

    def test_utf8(self) -> None:
        path = store_path(self)
        write_file(path, "j\u00fcrgen:x\r\n")
        self.assertEqual(read_text(path), "j\u00fcrgen:x\r\n")


class NameRulesTests(SynchronousTestCase):
    def test_split_lines_round_trip(self) -> None:
        for text in ["", "a", "a\n", "a\r\nb", "\n\n", "a\nb\n"]:
            self.assertEqual("".join(files.split_lines(text)), text)
        self.assertEqual(files.split_lines("a\r\nb"), ["a\r\n", "b"])

    def test_append_line(self) -> None:
        self.assertEqual(files.append_line("", "x"), "x\n")
        self.assertEqual(files.append_line("a", "x"), "a\nx\n")
        self.assertEqual(files.append_line("a\r\n", "x"), "a\r\nx\r\n")


class LateLoader:
    """A loader that reads at once but answers when the test says so."""

    def __init__(self):
        self.jobs = []

    def __call__(self, f, *args):
        d = defer.Deferred()
        try:
            result = f(*args)
        except Exception:
            result = Failure()
        self.jobs.append((result, d))
        return d

    def finish_all(self):
        jobs, self.jobs = self.jobs, []
        for result, d in jobs:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)


class WatchedFileTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.path = self.mktemp()
        atomic_write(self.path, "one\n")
        self.parsed = []

    def parse(self, text, path):
        self.parsed.append(text)
        return text.strip()

    def watched(self, loader=None):
        return WatchedFile(self.path, self.parse, loader=loader,
                           clock=self.clock if loader else None)

    def test_change_seen_by_the_next_call(self):
        """No interval: the very next call after a rewrite answers from the new file."""
        watched = self.watched()
        atomic_write(self.path, "two\n")
        self.assertEqual(self.successResultOf(watched.current()), "two")
        self.assertEqual(self.successResultOf(watched.current()), "two")
        self.assertEqual(len(self.parsed), 2)  # unchanged: not parsed again

    def test_same_size_in_place_change(self):
        """An in-place rewrite of the same size is seen through its mtime."""
        watched = self.watched()
        st = os.stat(self.path)
        with open(self.path, "w") as f:
            f.write("six\n")
        os.utime(self.path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        self.assertEqual(self.successResultOf(watched.current()), "six")

    def test_keeps_last_good(self):
        """A vanished or broken file keeps the last good value and is logged once."""
        watched = self.watched()
        os.unlink(self.path)
        with capturedLogs() as events:
            for _ in range(3):
                self.assertEqual(self.successResultOf(watched.current()), "one")
        self.assertEqual(len(events), 1)
        self.assertIn("cannot reload", formatEvent(events[0]))
        with open(self.path, "wb") as f:
            f.write(b"bad \xff\n")
        with capturedLogs() as events:
            self.assertEqual(self.successResultOf(watched.current()), "one")
        self.assertIn("not valid UTF-8", formatEvent(events[0]))
        atomic_write(self.path, "three\n")
        self.assertEqual(self.successResultOf(watched.current()), "three")

    def test_broken_file_not_read_on_every_call(self):
        """A file that failed to load is read again only once it changes or after a while."""
        watched = self.watched()
        reads = []
        real = files._read_bytes
        self.patch(files, "_read_bytes", lambda name: reads.append(name) or real(name))
        with open(self.path, "wb") as f:
            f.write(b"bad \xff\n")
        with capturedLogs():
            for _ in range(5):
                self.assertEqual(self.successResultOf(watched.current()), "one")
        self.assertEqual(len(reads), 1)

    def test_waits_for_the_reload(self):
        """Once a change is noticed, callers wait for the reload, and share it."""
        pool = ManualPool()
        watched = self.watched(pool.run)
        atomic_write(self.path, "two\n")
        first, second = watched.current(), watched.current()
        self.assertNoResult(first)
        self.assertNoResult(second)
        self.assertEqual(len(pool.jobs), 1)
        pool.finish_all()
        self.assertEqual(self.successResultOf(first), "two")
        self.assertEqual(self.successResultOf(second), "two")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.successResultOf(watched.current()), "two")

    def test_wait_is_bounded(self):
        """A reload slower than C{wait} answers from the old value, with one warning."""
        pool = ManualPool()
        watched = self.watched(pool.run)
        atomic_write(self.path, "two\n")
        with capturedLogs() as events:
            first, second = watched.current(), watched.current()
            self.clock.advance(watched.wait)
        self.assertEqual(self.successResultOf(first), "one")
        self.assertEqual(self.successResultOf(second), "one")
        self.assertEqual(len(events), 1)
        self.assertIn("takes longer than", formatEvent(events[0]))
        late = watched.current()
        pool.finish_all()
        self.assertEqual(self.successResultOf(late), "two")

    def test_changed_again_while_loading(self):
        """A waiter gets the file as it was when it asked, not an older read."""
        loader = LateLoader()
        watched = self.watched(loader)
        atomic_write(self.path, "two\n")
        d = watched.current()
        atomic_write(self.path, "three\n")
        loader.finish_all()  # "two", read before the second change
        self.assertNoResult(d)
        loader.finish_all()
        self.assertEqual(self.successResultOf(d), "three")

    def test_cancelled_waiter(self):
        pool = ManualPool()
        watched = self.watched(pool.run)
        atomic_write(self.path, "two\n")
        d = watched.current()
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        pool.finish_all()
        self.assertEqual(watched.value, "two")

    def test_failed_reload_answers_waiters(self):
        pool = LateLoader()
        watched = self.watched(pool)
        with open(self.path, "wb") as f:
            f.write(b"bad \xff\n")
        d = watched.current()
        with capturedLogs() as events:
            pool.finish_all()
        self.assertEqual(self.successResultOf(d), "one")
        self.assertIn("not valid UTF-8", formatEvent(events[0]))

    def test_parser_error_not_quoted(self):
        """An unexpected exception in the parser is logged by type only."""
        watched = WatchedFile(self.path, lambda text, path: text)

        def parse(text, path):
            raise ValueError(f"cannot use {text!r}")

        watched._parse = parse
        atomic_write(self.path, "secret-line\n")
        with capturedLogs() as events:
            self.assertEqual(self.successResultOf(watched.current()), "one\n")
        text = " ".join(formatEvent(e) for e in events)
        self.assertIn("unexpected ValueError", text)
        self.assertNotIn("secret-line", text)

    def test_loader_needs_clock(self):
        self.assertRaises(ValueError, WatchedFile, self.path, self.parse, loader=ManualPool().run)

    def test_first_read_fails(self):
        e = self.assertRaises(StoreError, WatchedFile, self.mktemp(), self.parse)
        self.assertIn("No such file or directory", str(e))
