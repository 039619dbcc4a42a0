# -*- test-case-name: tests.test_stores -*-
"""
Storage shared by the password and token files: UTF-8 reads, atomic rewrites
(temporary file, fsync, rename, fsync of the directory) and a lock that
serialises concurrent rewriters, plus the name rules both files share.

A reader never sees a half-written file: it opens either the old inode or
the new one.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from twisted.logger import Logger

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


def _reason(e: OSError) -> str:
    return os.strerror(e.errno) if e.errno else str(e)


def _read_bytes(name: str) -> tuple[os.stat_result, bytes]:
    """The file's status and contents (at most L{MAX_FILE} bytes), or L{StoreError}."""
    try:
        with open(name, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read(MAX_FILE + 1)
    except OSError as e:
        raise StoreError(f"{name}: {_reason(e)}") from None
    if len(data) > MAX_FILE:
        raise StoreError(f"{name}: larger than {MAX_FILE} bytes")
    return st, data


def read_text(path: str | os.PathLike[str]) -> str:
    """The UTF-8 contents of C{path}, or L{StoreError} saying why not."""
    name = os.fspath(path)
    return decode_utf8(_read_bytes(name)[1], name)


def decode_utf8(data: bytes, name: str) -> str:
    """C{data} as text, or L{StoreError} naming the first bad line of C{name}."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise StoreError(f"{name}:{line}: not valid UTF-8") from None


def read_existing(path: str | os.PathLike[str]) -> str | None:
    """Like L{read_text}, but C{None} when C{path} does not exist."""
    try:
        return read_text(path)
    except StoreError:
        if not os.path.lexists(path):
            return None
        raise


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: str, mode: int = 0o600) -> None:
    """
    Replace C{path} with C{data} (UTF-8) by writing a temporary file in the same
    directory and renaming it over C{path}; on any failure the old file is left
    as it was and the temporary file is removed.

    @raise StoreError: when the file cannot be written.
    """
    name = os.fspath(path)
    target = os.path.realpath(name)  # a symlink stays one; its target is replaced
    directory = os.path.dirname(target)
    try:
        owner = os.stat(target)
    except OSError:
        owner = None
    try:
        fd, temp = tempfile.mkstemp(
            dir=directory, prefix=f".{os.path.basename(target)}.", suffix=".tmp"
        )
    except OSError as e:
        raise StoreError(f"{directory_of(name)}: {_reason(e)}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), mode)
            if owner is not None:
                _keep_owner(f.fileno(), owner)
        os.replace(temp, target)
    except BaseException as e:
        try:
            os.unlink(temp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise StoreError(f"{name}: cannot write: {_reason(e)}") from None
        raise
    try:
        _fsync_directory(directory)
    except OSError as e:
        raise StoreError(f"{directory_of(name)}: cannot sync: {_reason(e)}") from None


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


def _keep_owner(fd: int, previous: os.stat_result) -> None:
    """
    Give the new file the old one's owner and group, so that a rewrite by
    root (C{sudo authgateway user del}) stays readable by a gateway running
    as its own user. Without the right to do so, the file stays ours.
    """
    try:
        os.fchown(fd, previous.st_uid, previous.st_gid)
    except PermissionError:
        pass


@contextmanager
def locked(path: str | os.PathLike[str]) -> Iterator[None]:
    """
    Hold an exclusive C{flock} on the directory containing C{path}, so that
    read-modify-write cycles of processes and threads rewriting it do not
    interleave. The lock is on the directory, not the file: the file's inode
    changes with every rewrite, and no lock file is left behind.

    @raise StoreError: when the directory cannot be opened.
    """
    directory = os.path.dirname(os.path.realpath(path))  # where atomic_write writes
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise StoreError(f"{directory_of(path)}: {_reason(e)}") from None
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


class WatchedFile(Generic[_T]):
    """
    A file parsed into a value and parsed again when it changes, so that a
    running gateway picks up C{authgateway user add} without a restart.

    L{current} looks at the file at most every C{interval} seconds; a change
    is a new inode (an atomic rename), size or modification time. A reload
    reads and parses in C{loader} (a thread pool, so that a large file never
    stalls the reactor) and swaps the new value in when it is ready; until
    then, and when a reload fails (the file vanished, is unreadable or not
    UTF-8), the last good value stays in use and the error is logged once.

    @param parse: C{parse(text, path)}, the value's constructor; it runs in
        the loader's thread, so it must not touch shared state.
    @param on_load: called with each new value, in the reactor thread, before
        it is used (to log the file's problems, for instance).
    @param loader: C{loader(f, *args) -> Deferred}; None reads inline.
    @param now: the clock, C{time.monotonic} unless a test injects one.
    @raise StoreError: when the first read (always inline) fails.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        parse: Callable[[str, str], _T],
        on_load: Callable[[_T], None] | None = None,
        loader: Callable[..., Any] | None = None,
        now: Callable[[], float] = time.monotonic,
        interval: float = 1.0,
    ) -> None:
        self.path = os.fspath(path)
        self._parse = parse
        self._on_load = on_load or (lambda value: None)
        self.loader = loader
        self._now = now
        self.interval = interval
        self._failing: str | None = None
        self._loading = False
        self._signature, value = self._read()
        self._on_load(value)
        self.value = value
        self._checked = now()

    def __repr__(self) -> str:
        return f"<WatchedFile {self.path!r}>"

    @staticmethod
    def _signature_of(st: os.stat_result) -> tuple[int, ...]:
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def _read(self) -> tuple[tuple[int, ...], _T]:
        st, data = _read_bytes(self.path)
        return self._signature_of(st), self._parse(decode_utf8(data, self.path), self.path)

    def current(self) -> _T:
        """The value; starts a reload first if the file changed since the last look."""
        now = self._now()
        if self._loading or now - self._checked < self.interval:
            return self.value
        self._checked = now
        try:
            changed = self._signature_of(os.stat(self.path)) != self._signature
        except OSError as e:
            self._failed(f"{self.path}: {_reason(e)}")
            return self.value
        if not changed:
            self._failing = None
        elif self.loader is None:
            try:
                self._loaded(self._read())
            except StoreError as e:
                self._failed(str(e))
        else:
            self._loading = True
            d = self.loader(self._read)
            d.addCallback(self._loaded)
            d.addErrback(lambda f: self._failed(str(f.value)))
            d.addBoth(self._done_loading)
        return self.value

    def _loaded(self, read: tuple[tuple[int, ...], _T]) -> None:
        self._signature, value = read
        self._on_load(value)
        self.value = value
        self._failing = None
        _log.info("reloaded {path}", path=self.path)

    def _failed(self, problem: str) -> None:
        if problem != self._failing:
            _log.error("cannot reload {problem}; still using the last good version",
                       problem=problem)
            self._failing = problem

    def _done_loading(self, _: Any) -> None:
        self._loading = False
