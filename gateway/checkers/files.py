# -*- test-case-name: tests.test_files -*-
"""
Storage shared by the password and token files: UTF-8 reads, atomic rewrites
(temporary file, fsync, rename, fsync of the directory) and a lock that
serialises concurrent rewriters, plus the name rules both files share.

A reader never sees a half-written file: it opens either the old inode or
the new one.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from gateway.clock import MONOTONIC
from gateway.fileio import keep_owner, reason
from gateway.text import quote

#: Longest line the parsers accept; anything longer is reported and skipped.
MAX_LINE = 8192

#: Largest password or token file read (a million bcrypt users is ~70 MB).
MAX_FILE = 128 * 1024 * 1024

#: Longest user name accepted by the stores, in UTF-8 bytes.
MAX_USER_BYTES = 255


class StoreError(Exception):
    """A store cannot be read or changed; the message is one line, free of secrets."""


def directory_of(path: str | os.PathLike[str]) -> str:
    """The directory holding C{path}, as the user would write it."""
    return os.path.dirname(os.fspath(path)) or os.curdir


def _read_bytes(
    name: str, follow_links: bool = True, limit: int = MAX_FILE
) -> tuple[os.stat_result, bytes]:
    """
    The file's status and contents (at most C{limit} bytes), or L{StoreError}.
    Only a regular file is read (a FIFO would block); with C{follow_links}
    false, a symbolic link is refused as L{atomic_write} refuses it.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    if not follow_links:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(name, flags)
    except OSError as e:
        if e.errno == errno.ELOOP and not follow_links and os.path.islink(name):
            _refuse_link(name, os.lstat(name))
        raise StoreError(f"{name}: {reason(e)}") from None
    try:
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise StoreError(f"{name}: not a regular file")
            data = f.read(limit + 1)
    except OSError as e:
        raise StoreError(f"{name}: {reason(e)}") from None
    if len(data) > limit:
        raise StoreError(f"{name}: larger than {limit} bytes")
    return st, data


def read_bytes(path: str | os.PathLike[str], limit: int = MAX_FILE) -> bytes:
    """The contents of the regular file C{path} (at most C{limit} bytes), or L{StoreError}."""
    return _read_bytes(os.fspath(path), limit=limit)[1]


def read_text(path: str | os.PathLike[str], follow_links: bool = True) -> str:
    """
    The UTF-8 contents of C{path}, or L{StoreError} saying why not. Rewrites
    read with C{follow_links=False}: what they write back is then never the
    contents of a link's target.
    """
    name = os.fspath(path)
    return decode_utf8(_read_bytes(name, follow_links)[1], name)


def decode_utf8(data: bytes, name: str) -> str:
    """C{data} as text, or L{StoreError} naming the first bad line of C{name}."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise StoreError(f"{name}:{line}: not valid UTF-8") from None


def read_existing(path: str | os.PathLike[str], follow_links: bool = True) -> str | None:
    """Like L{read_text}, but C{None} when C{path} does not exist."""
    try:
        return read_text(path, follow_links)
    except StoreError:
        if not os.path.lexists(path):
            return None
        raise


def _refuse_link(name: str, st: os.stat_result) -> None:
    """Refuse to rewrite a store that is not a plain file (a symlink above all)."""
    if stat.S_ISLNK(st.st_mode):
        raise StoreError(
            f"{name} is a symbolic link (to {os.path.realpath(name)}); a store is never "
            "rewritten through a link: give the real path"
        )
    if not stat.S_ISREG(st.st_mode):
        raise StoreError(f"{name}: not a regular file")


#: Symbolic links followed at most while checking a store's directory.
MAX_LINKS = 40


def _check_links(directory: str) -> None:
    """
    Refuse a directory reached through a symbolic link owned by anyone but
    root or the user running this: whoever owns such a link (the service
    user owning a data directory, say) could point a rewrite by root at
    /etc. The path is resolved component by component, as the kernel does,
    so a trusted link to a place holding an untrusted one is caught too.
    """
    trusted = {0, os.geteuid()}
    pending = os.path.abspath(directory).split(os.sep)[1:]
    resolved, links = os.sep, 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            resolved = os.path.dirname(resolved)
            continue
        candidate = os.path.join(resolved, part)
        try:
            st = os.lstat(candidate)
        except OSError:
            return  # missing or unreadable: opening it fails with the reason
        if not stat.S_ISLNK(st.st_mode):
            resolved = candidate
            continue
        if st.st_uid not in trusted:
            raise StoreError(
                f"{directory}: {candidate} is a symbolic link owned by uid {st.st_uid}; a store"
                " is rewritten only through links owned by root or by you: give the real path"
            )
        links += 1
        if links > MAX_LINKS:
            raise StoreError(f"{directory}: too many levels of symbolic links")
        target = os.readlink(candidate)
        if target.startswith(os.sep):
            resolved = os.sep
        pending[:0] = target.split(os.sep)


def _open_directory(directory: str) -> int:
    """
    The store's directory, opened: only through trusted links
    (L{_check_links}), checked again once open so that a link swapped in
    (and out) meanwhile is caught.
    """
    _check_links(directory)
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise StoreError(f"{directory}: {reason(e)}") from None
    try:
        _check_links(directory)
        opened, now = os.fstat(fd), os.stat(directory)
        if (opened.st_dev, opened.st_ino) != (now.st_dev, now.st_ino):
            raise StoreError(f"{directory}: changed while it was being opened")
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_rewritable(path: str | os.PathLike[str]) -> None:
    """
    Refuse early, before reading, a store that L{atomic_write} would refuse:
    an existing C{path} that is a symbolic link or not a regular file.

    @raise StoreError: saying why, and naming the link's real path.
    """
    name = os.fspath(path)
    _check_links(directory_of(name))
    try:
        st = os.lstat(name)
    except FileNotFoundError:
        return
    except OSError as e:
        raise StoreError(f"{name}: {reason(e)}") from None
    _refuse_link(name, st)


def _create_temporary(dir_fd: int, base: str) -> tuple[int, str]:
    """A new file with an unpredictable name next to C{base}, made with O_EXCL and O_NOFOLLOW."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        temp = f".{base}.{secrets.token_hex(8)}.tmp"
        try:
            return os.open(temp, flags, 0o600, dir_fd=dir_fd), temp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary name")


def atomic_write(path: str | os.PathLike[str], data: str, mode: int = 0o600) -> None:
    """
    Replace C{path} with C{data} (UTF-8) by writing a temporary file in the same
    directory and renaming it over C{path}; on any failure the old file is left
    as it was and the temporary file is removed.

    C{path} itself must not be a symbolic link: a link planted by whoever can
    write the store's directory would otherwise make C{sudo authgateway user
    add} replace (and chmod) its target, such as /etc/shadow; its directory
    is reached through links owned by root or the user only. The directory is
    opened once and every step works relative to it, so a link swapped in
    after the check is replaced by the rename, never followed.

    @raise StoreError: when the file cannot be written or is a symbolic link.
    """
    name = os.fspath(path)
    directory = directory_of(name)
    base = os.path.basename(name)
    dir_fd = _open_directory(directory)
    try:
        try:
            previous: os.stat_result | None = os.stat(base, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            previous = None
        except OSError as e:
            raise StoreError(f"{name}: {reason(e)}") from None
        if previous is not None:
            _refuse_link(name, previous)
        try:
            fd, temp = _create_temporary(dir_fd, base)
        except OSError as e:
            raise StoreError(f"{directory}: {reason(e)}") from None
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
                os.fchmod(f.fileno(), mode)
                if previous is not None:
                    keep_owner(f.fileno(), previous)
            os.replace(temp, base, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException as e:
            try:
                os.unlink(temp, dir_fd=dir_fd)
            except OSError:
                pass
            if isinstance(e, OSError):
                raise StoreError(f"{name}: cannot write: {reason(e)}") from None
            raise
        try:
            os.fsync(dir_fd)
        except OSError as e:
            raise StoreError(f"{directory}: cannot sync: {reason(e)}") from None
    finally:
        os.close(dir_fd)


def frozen(mapping: Mapping[str, _V]) -> Mapping[str, _V]:
    """A read-only copy: the tables of the stores are shared, never changed."""
    return MappingProxyType(dict(mapping))


def records(text: str, path: str, problems: list[str]) -> Iterator[tuple[int, str]]:
    """
    The numbered lines of a store's text that hold something: a byte-order
    mark, blank and C{#} lines are passed over, CRLF is accepted, and an
    overlong line is reported into C{problems} and skipped.
    """
    for lineno, raw in enumerate(text.removeprefix("\ufeff").split("\n"), 1):
        if len(raw) > MAX_LINE:
            problems.append(f"{path}:{lineno}: line longer than {MAX_LINE} characters")
            continue
        line = raw.strip()
        if line and not line.startswith("#"):
            yield lineno, line


def first_field(line: str) -> str | None:
    """
    The key a raw line of a store starts with (user or digest), or C{None}
    for blank, comment, overlong or colon-less lines: what a rewrite matches.
    """
    line = line.removesuffix("\n")
    if len(line) > MAX_LINE:
        return None
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    key, colon, _ = line.partition(":")
    return key if colon and key else None


@contextmanager
def locked(path: str | os.PathLike[str]) -> Iterator[None]:
    """
    Hold an exclusive C{flock} on the directory containing C{path}, so that
    read-modify-write cycles of processes and threads rewriting it do not
    interleave. The lock is on the directory, not the file: the file's inode
    changes with every rewrite, and no lock file is left behind.

    @raise StoreError: when the directory cannot be opened.
    """
    fd = _open_directory(directory_of(path))  # where atomic_write writes
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def split_lines(text: str) -> list[str]:
    """
    C{text} split at C{"\\n"} only, each piece keeping its line ending, so that
    C{"".join(split_lines(text)) == text} and piece I{n} is line I{n + 1}.
    """
    lines = text.split("\n")
    pieces = [line + "\n" for line in lines[:-1]]
    if lines[-1]:
        pieces.append(lines[-1])
    return pieces


def split_bom(text: str) -> tuple[str, str]:
    """C{text} as (byte order mark or C{""}, the rest), so rewrites keep a BOM."""
    if text.startswith("\ufeff"):
        return "\ufeff", text[1:]
    return "", text


def append_line(text: str, line: str) -> str:
    """C{text} with C{line} added at the end, in the file's own line ending."""
    newline = "\r\n" if "\r\n" in text else "\n"
    if text and not text.endswith("\n"):
        text += newline
    return text + line + newline


def check_user_name(user: str) -> None:
    """
    Refuse a user name the files cannot hold unambiguously.

    @raise StoreError: empty, C{:}, control characters, leading C{#}, surrounding
        whitespace, or longer than L{MAX_USER_BYTES} UTF-8 bytes.
    """
    if not user:
        raise StoreError("user name is empty")
    shown = quote(user[:64])
    if ":" in user:
        raise StoreError(f"user name {shown} contains ':'")
    if user != user.strip():
        raise StoreError(f"user name {shown} starts or ends with whitespace")
    if any(not char.isprintable() and char != " " for char in user):
        raise StoreError(f"user name {shown} contains control characters")
    if user.startswith("#"):
        raise StoreError(f"user name {shown} starts with '#', which marks a comment")
    try:
        size = len(user.encode("utf-8"))
    except UnicodeEncodeError:
        raise StoreError(f"user name {shown} is not valid Unicode") from None
    if size > MAX_USER_BYTES:
        raise StoreError(f"user name is longer than {MAX_USER_BYTES} bytes")


def group_problem(group: str) -> str | None:
    """Why C{group} cannot be a group name, or C{None} if it can."""
    if not group:
        return "empty group name"
    if any(char in ",:" or char.isspace() for char in group):
        return f"group name {quote(group)} contains ',', ':' or whitespace"
    if not group.isprintable():
        return f"group name {quote(group)} contains control characters"
    return None


def check_groups(groups: Iterable[str]) -> tuple[str, ...]:
    """C{groups} as a tuple without duplicates, or L{StoreError} for a bad name."""
    if isinstance(groups, (str, bytes)):
        raise TypeError("groups must be a collection of names, not one string")
    unique: dict[str, None] = {}
    for group in groups:
        problem = group_problem(group)
        if problem:
            raise StoreError(problem)
        unique[group] = None
    return tuple(unique)


def parse_groups_field(field: str) -> tuple[tuple[str, ...], str | None]:
    """
    A comma-separated group list: the names (stripped, empties dropped, no
    duplicates) and the first problem found, if any.
    """
    names: dict[str, None] = {}
    for item in field.split(","):
        item = item.strip()
        if not item:
            continue
        problem = group_problem(item)
        if problem:
            return (), problem
        names[item] = None
    return tuple(names), None


_T = TypeVar("_T")
_V = TypeVar("_V")
_log = Logger()


class IReloadable(Interface):
    """A checker serving a L{WatchedFile}: the service says where reloads run."""

    def use_loader(load: Callable[..., defer.Deferred[Any]], clock: IReactorTime) -> None:
        """Read and parse changed files through C{load(f) -> Deferred}, waiting on C{clock}."""


#: How long a login waits for a reload it noticed before using the old value.
RELOAD_WAIT = 5.0

#: How long after a failed reload the same (unchanged) file is tried again.
RELOAD_RETRY = 5.0


def _inline(f: Callable[..., _T], *args: Any) -> defer.Deferred[_T]:
    return defer.maybeDeferred(f, *args)


class WatchedFile(Generic[_T]):
    """
    A file parsed into a value and parsed again when it changes, so that a
    running gateway picks up C{authgateway user add} at the very next login.

    L{current} looks at the file (one C{stat}) on every call; a change is a
    new inode (an atomic rename), size or modification time. Once a change is
    noticed, the callers wait for the reload (all of them for the same one),
    each at most C{wait} seconds, after which it gets the old value and a
    warning is logged. A reload reads and parses through C{loader} (the
    service's reload thread, so that a large file never stalls the reactor
    and a full hash queue never delays it); inline when there is none. When a
    reload fails (the file vanished, is unreadable or not UTF-8), the last
    good value stays in use, the error is logged once, and the same file is
    tried again only after C{retry} seconds or once it changes again.

    @param parse: C{parse(text, path)}, the value's constructor; it runs in
        the loader's thread, so it may read but must not change shared state.
    @param on_load: called with each new value, in the reactor thread, before
        it is used (to log the file's problems, for instance).
    @param loader: C{loader(f) -> Deferred}; None reads inline.
    @param clock: needed with a C{loader}, to bound the wait; without one,
        the retry after a failed reload is timed by L{gateway.clock.MONOTONIC}.
    @raise StoreError: when the first read (always inline) fails.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        parse: Callable[[str, str], _T],
        on_load: Callable[[_T], None] | None = None,
        loader: Callable[..., defer.Deferred[Any]] | None = None,
        clock: IReactorTime | None = None,
        wait: float = RELOAD_WAIT,
        retry: float = RELOAD_RETRY,
    ) -> None:
        if loader is not None and clock is None:
            raise ValueError("a loader needs a clock to bound the wait for it")
        self.path = os.fspath(path)
        self._parse = parse
        self._on_load = on_load or (lambda value: None)
        self.loader = loader
        self.clock = clock
        self.wait = wait
        self.retry = retry
        self._failing: str | None = None
        self._failed_signature: tuple[int, ...] | None = None
        self._retry_at = 0.0
        self._loading = False
        self._waiters: dict[defer.Deferred[_T], Any] = {}
        self._slow_logged = False
        self._signature, value = self._read()
        self._on_load(value)
        self.value = value

    def __repr__(self) -> str:
        return f"<WatchedFile {self.path!r}>"

    @property
    def failing(self) -> bool:
        """Whether the last reload failed (the last good version is in use)."""
        return self._failing is not None

    def use_loader(self, loader: Callable[..., defer.Deferred[Any]], clock: IReactorTime) -> None:
        """Reload through C{loader} from now on, waiting at most C{wait} seconds of C{clock}."""
        self.loader = loader
        self.clock = clock

    @staticmethod
    def _signature_of(st: os.stat_result) -> tuple[int, ...]:
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def _read(self) -> tuple[tuple[int, ...], _T]:
        st, data = _read_bytes(self.path)
        return self._signature_of(st), self._parse(decode_utf8(data, self.path), self.path)

    def _now(self) -> float:
        return (self.clock or MONOTONIC).seconds()

    def _changed(self) -> bool:
        """Whether the file differs from the value in use and deserves a read now."""
        try:
            signature = self._signature_of(os.stat(self.path))
        except OSError as e:
            self._failed(f"{self.path}: {reason(e)}")
            return False
        if signature == self._signature:
            self._failing = None
            return False
        return signature != self._failed_signature or self._now() >= self._retry_at

    def current(self) -> defer.Deferred[_T]:
        """
        The value, reloaded first if the file changed: a Deferred that has
        fired already unless a reload is under way.
        """
        if not self._loading:
            if not self._changed():
                return defer.succeed(self.value)
            self._start()
            if not self._loading:  # done inline
                return defer.succeed(self.value)
        return self._wait()

    def _start(self) -> None:
        self._loading = True
        self._slow_logged = False
        run = self.loader or _inline
        try:
            d = run(self._read)
        except Exception:
            d = defer.fail()
        d.addCallbacks(self._loaded, self._load_failed)
        d.addBoth(self._settle)

    def _wait(self) -> defer.Deferred[_T]:
        d: defer.Deferred[_T] = defer.Deferred(canceller=self._forget)
        assert self.clock is not None  # a reload still running has a loader, so a clock
        self._waiters[d] = self.clock.callLater(self.wait, self._too_slow, d)
        return d

    def _forget(self, d: defer.Deferred[_T]) -> None:
        timer = self._waiters.pop(d, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _too_slow(self, d: defer.Deferred[_T]) -> None:
        del self._waiters[d]
        if not self._slow_logged:
            self._slow_logged = True
            _log.warn(
                "reloading {path} takes longer than {wait}s; answering from the previous version",
                path=self.path, wait=self.wait,
            )
        d.callback(self.value)

    def _loaded(self, read: tuple[tuple[int, ...], _T]) -> None:
        self._signature, value = read
        self._on_load(value)
        self.value = value
        self._failing = None
        self._failed_signature = None
        _log.info("reloaded {path}", path=self.path)

    def _load_failed(self, reason: Failure) -> None:
        try:
            self._failed_signature = self._signature_of(os.stat(self.path))
        except OSError:
            self._failed_signature = None
        self._retry_at = self._now() + self.retry
        if reason.check(StoreError):
            self._failed(str(reason.value))
        else:  # no message: a parser's exception could quote a line of the file
            self._failed(f"{self.path}: unexpected {reason.type.__name__}")

    def _settle(self, _: Any) -> None:
        self._loading = False
        if not self._waiters:
            return
        if self._changed():  # changed again while it was read: the waiters want that one
            self._start()
            return
        waiters, self._waiters = self._waiters, {}
        for d, timer in waiters.items():
            if timer.active():
                timer.cancel()
            d.callback(self.value)

    def _failed(self, problem: str) -> None:
        if problem != self._failing:
            _log.error("cannot reload {problem}; still using the last good version",
                       problem=problem)
            self._failing = problem


@implementer(IReloadable)
class FileChecker(Generic[_T]):
    """
    What the checkers of the stores share: a L{WatchedFile} parsed by
    L{parse}, reloaded through the service's loader (L{IReloadable}), and the
    problems of each new table logged (lines skipped, never fatal).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        loader: Callable[..., defer.Deferred[Any]] | None = None,
        clock: Any = None,
    ) -> None:
        self.file: WatchedFile[_T] = WatchedFile(path, self.parse, self._loaded, loader, clock)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.file.path!r}>"

    def parse(self, text: str, path: str) -> _T:
        """The table of C{text}; runs in the loader's thread."""
        raise NotImplementedError

    def use_loader(self, load: Callable[..., defer.Deferred[Any]], clock: IReactorTime) -> None:
        self.file.use_loader(load, clock)

    def _loaded(self, table: _T) -> None:
        for problem in getattr(table, "problems", ()):
            _log.warn("{problem}; line skipped", problem=problem)
