# -*- test-case-name: tests.test_spool,tests.test_files,tests.test_queue -*-
"""File helpers the stores, the spool, the queue and the certificate writer share."""

from __future__ import annotations

import os
import stat


def reason(e: BaseException) -> str:
    """
    Why an operation failed, for a one-line message: the system's text for
    an OSError, else only the exception's type (its text may hold data).
    """
    if isinstance(e, OSError):
        return os.strerror(e.errno) if e.errno else str(e) or type(e).__name__
    return type(e).__name__


def fsync_directory(directory: str) -> None:
    """Make the renames and creations in C{directory} durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_regular(path: str) -> int:
    """
    A read-only descriptor of the regular file at C{path}, for files others
    may plant in a directory the gateway reads (the spool): a symbolic link
    is not followed (C{ELOOP}), a FIFO or device is refused (reading one
    could block the thread for ever), and so is a file with another hard
    link (a link to a secret elsewhere would be read and relayed).

    @raise OSError: the file cannot be opened, or is not a regular file.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError("not a regular file")
        if st.st_nlink > 1:  # a hard link to a file elsewhere (0: just replaced or removed)
            raise OSError("a file with other links")
    except BaseException:
        os.close(fd)
        raise
    return fd


def remove(path: str) -> bool:
    """Unlink C{path}; False when it was already gone."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def keep_owner(fd: int, previous: os.stat_result) -> None:
    """
    Give the file behind C{fd} the owner and group of C{previous}, so that a
    file written by root (C{sudo authgateway user del}, C{sudo authgateway
    queue hold}) stays readable and writable by a gateway running as its own
    user. Without the right to do so, the file stays ours.
    """
    try:
        os.fchown(fd, previous.st_uid, previous.st_gid)
    except PermissionError:
        pass
