# -*- test-case-name: tests.test_demo -*-
"""
C{python -m gateway.demo DATA_DIR}: prepare a data directory for C{make run}:
a self-signed certificate and a demo user whose generated password is printed
once, when it is created.
"""

from __future__ import annotations

import os
import secrets
import sys
from typing import TextIO

from gateway.tls import CertificateError, ensure_certificate

DEMO_USER = "demo"
USERS_FILE = "demo-users.txt"


def prepare(data_dir: str, out: TextIO | None = None) -> str:
    """Create what is missing under C{data_dir}; return the users file path."""
    out = out or sys.stdout
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    cert_path, _, _ = ensure_certificate(data_dir)
    users = os.path.join(data_dir, USERS_FILE)
    try:
        fd = os.open(users, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        out.write(f"demo user {DEMO_USER!r}: password unchanged (see {users})\n")
    else:
        password = secrets.token_urlsafe(18)
        with os.fdopen(fd, "w") as f:
            f.write(f"{DEMO_USER}:{password}\n")
        out.write(
            f"demo user {DEMO_USER!r} created; its password, shown only now: {password}\n"
        )
    out.write(f"self-signed certificate: {cert_path}\n")
    return users


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m gateway.demo DATA_DIR\n")
        return 2
    try:
        prepare(args[0])
    except (OSError, CertificateError) as e:
        sys.stderr.write(f"gateway.demo: {e}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
