# -*- test-case-name: tests.test_demo -*-
"""
C{python -m gateway.demo DATA_DIR}: prepare a data directory for C{make run}:
a self-signed certificate and an htpasswd file with a demo user, made by
C{authgateway user add}, whose generated password is printed once.
"""

from __future__ import annotations

import io
import os
import secrets
import sys
from typing import TextIO

from gateway import cli
from gateway.tls import CertificateError, ensure_certificate

DEMO_USER = "demo"
USERS_FILE = "users.htpasswd"


def prepare(data_dir: str, out: TextIO | None = None) -> str:
    """Create what is missing under C{data_dir}; return the htpasswd path."""
    out = out or sys.stdout
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    cert_path, _, _ = ensure_certificate(data_dir)
    users = os.path.join(data_dir, USERS_FILE)
    if os.path.exists(users):
        out.write(f"demo user {DEMO_USER!r}: password unchanged (see {users})\n")
    else:
        password = secrets.token_urlsafe(18)
        errors = io.StringIO()
        status = cli.main(
            ["user", "add", users, DEMO_USER, "--password-stdin", "--groups", "demo"],
            stdin=io.StringIO(password + "\n"),
            stdout=io.StringIO(),
            stderr=errors,
        )
        if status:
            raise OSError(errors.getvalue().strip())
        out.write(
            f"demo user {DEMO_USER!r} created in {users}; its password, shown only now: "
            f"{password}\n"
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
