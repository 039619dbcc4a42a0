# -*- test-case-name: tests.test_spool,tests.test_files -*-
"""File helpers the stores, the spool and the certificate writer share."""

from __future__ import annotations

import os


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
