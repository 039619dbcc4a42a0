# -*- test-case-name: tests.test_cli -*-
"""
The C{authgateway} command: manage the password (htpasswd) and token files
the gateway reads.

    authgateway user add FILE USER [--groups a,b] [--password-stdin] [--scheme S] [--cost N]
    authgateway user del FILE USER
    authgateway user list FILE
    authgateway token add FILE USER [--groups a,b]
    authgateway token revoke FILE USER|TOKEN-ID
    authgateway token list FILE

An error is one line, C{authgateway: error: ...}, and exit status 1; usage
errors exit with 2. Passwords and tokens never appear in an error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from contextlib import redirect_stderr, redirect_stdout
from getpass import getpass
from typing import IO, Any, NoReturn

import attrs

from gateway.checkers import hashes, htpasswd, tokens
from gateway.checkers.files import StoreError

PROG = "authgateway"


class CommandError(Exception):
    """A one-line error for the user; no secrets in the message."""


@attrs.frozen
class Streams:
    stdin: IO[str]
    stdout: IO[str]
    stderr: IO[str]

    def out(self, line: str = "") -> None:
        self.stdout.write(line + "\n")

    def err(self, line: str) -> None:
        self.stderr.write(line + "\n")

    def warn(self, message: str) -> None:
        self.err(f"{PROG}: warning: {_one_line(message)}")


def _one_line(message: str) -> str:
    return " ".join(message.splitlines())


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # Leftover arguments could be a password typed on the command line.
        if message.startswith("unrecognized arguments:"):
            message = "unrecognized arguments (not shown: one may be a secret)"
        super().error(message)


def _group_list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _columns(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


# --- passwords ----------------------------------------------------------------


def _strip_newline(line: str) -> str:
    if line.endswith("\r\n"):
        return line[:-2]
    return line.removesuffix("\n")


def _read_password(args: argparse.Namespace, io: Streams) -> str:
    """The new password: one line of stdin, or typed twice at a terminal."""
    if args.password_stdin:
        line = io.stdin.readline()
        if not line:
            raise CommandError("no password on standard input")
        password = _strip_newline(line)
    else:
        isatty = getattr(io.stdin, "isatty", None)
        if not (isatty and isatty()):
            raise CommandError(
                "standard input is not a terminal: use --password-stdin to read "
                "the password from it"
            )
        try:
            password = getpass(f"Password for {args.user}: ")
            again = getpass("Retype password: ")
        except EOFError:
            raise CommandError("no password entered") from None
        if password != again:
            raise CommandError("passwords do not match")
    if not password:
        raise CommandError("empty password")
    try:
        password.encode("utf-8")
    except UnicodeEncodeError:
        raise CommandError("password is not valid UTF-8") from None
    return password


# --- subcommands --------------------------------------------------------------


def user_add(args: argparse.Namespace, io: Streams) -> int:
    password = _read_password(args, io)
    created = htpasswd.add_user(
        args.file,
        args.user,
        password,
        groups=args.groups,
        scheme=args.scheme,
        cost=args.cost,
    )
    if created:
        io.out(f"created {args.file}")
    io.out(f"added user {args.user} ({args.scheme})")
    return 0


def user_del(args: argparse.Namespace, io: Streams) -> int:
    htpasswd.delete_user(args.file, args.user)
    io.out(f"deleted user {args.user}")
    return 0


def _describe_hash(entry: htpasswd.PasswordEntry) -> str:
    try:
        return hashes.cost_of(entry.hash)
    except ValueError:
        return entry.scheme


def user_list(args: argparse.Namespace, io: Streams) -> int:
    table = htpasswd.list_users(args.file)
    rows = [
        (e.user, _describe_hash(e), ",".join(e.groups) or "-")
        for e in table.entries.values()
    ]
    if rows:
        for line in _columns([("USER", "HASH", "GROUPS"), *rows]):
            io.out(line)
    for problem in table.problems:
        io.warn(problem)
    if table.legacy:
        io.warn(
            f"{args.file}: weak legacy hashes in use ({', '.join(sorted(table.legacy))}); "
            "delete and re-add those users"
        )
    return 0


def token_add(args: argparse.Namespace, io: Streams) -> int:
    existed = os.path.lexists(args.file)
    token, entry = tokens.add_token(args.file, args.user, groups=args.groups)
    if not existed:
        io.err(f"{PROG}: created {args.file}")
    io.out(token)
    io.err(
        f"{PROG}: token {entry.token_id} for {entry.user}: copy it now, "
        "it is not stored and cannot be shown again"
    )
    return 0


def token_revoke(args: argparse.Namespace, io: Streams) -> int:
    for entry in tokens.revoke(args.file, args.target):
        io.out(f"revoked {entry.token_id} ({entry.user})")
    return 0


def token_list(args: argparse.Namespace, io: Streams) -> int:
    table = tokens.list_tokens(args.file)
    rows = [
        (e.token_id, e.user, ",".join(e.groups) or "-", e.created or "-")
        for e in table.by_digest.values()
    ]
    if rows:
        for line in _columns([("TOKEN ID", "USER", "GROUPS", "CREATED"), *rows]):
            io.out(line)
    for problem in table.problems:
        io.warn(problem)
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Manage the password and token files of authgateway.")
    kinds = parser.add_subparsers(dest="kind", metavar="{user,token}", required=True)

    user = kinds.add_parser("user", help="htpasswd users (bcrypt by default)")
    user_cmds = user.add_subparsers(dest="command", metavar="{add,del,list}", required=True)

    add = user_cmds.add_parser("add", help="add a user, creating FILE if needed")
    add.add_argument("file", metavar="FILE")
    add.add_argument("user", metavar="USER")
    add.add_argument("--groups", type=_group_list, default=(), metavar="A,B",
                     help="comma-separated groups, stored as nginx's third field")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from the first line of standard input")
    add.add_argument("--scheme", choices=hashes.CLI_SCHEMES, default="bcrypt")
    add.add_argument("--cost", type=int, metavar="N",
                     help="work factor (bcrypt rounds, argon2 time cost, crypt rounds)")
    add.set_defaults(run=user_add)

    delete = user_cmds.add_parser("del", help="delete a user")
    delete.add_argument("file", metavar="FILE")
    delete.add_argument("user", metavar="USER")
    delete.set_defaults(run=user_del)

    show = user_cmds.add_parser("list", help="list users, hash schemes and groups")
    show.add_argument("file", metavar="FILE")
    show.set_defaults(run=user_list)

    token = kinds.add_parser("token", help="Bearer tokens (only digests are stored)")
    token_cmds = token.add_subparsers(dest="command", metavar="{add,revoke,list}", required=True)

    add = token_cmds.add_parser("add", help="make a token and print it once")
    add.add_argument("file", metavar="FILE")
    add.add_argument("user", metavar="USER")
    add.add_argument("--groups", type=_group_list, default=(), metavar="A,B")
    add.set_defaults(run=token_add)

    revoke = token_cmds.add_parser("revoke", help="revoke a user's tokens, or one token by id")
    revoke.add_argument("file", metavar="FILE")
    revoke.add_argument("target", metavar="USER|TOKEN-ID")
    revoke.set_defaults(run=token_revoke)

    show = token_cmds.add_parser("list", help="list token ids, users, groups and dates")
    show.add_argument("file", metavar="FILE")
    show.set_defaults(run=token_list)
    return parser


def _exit_status(code: Any) -> int:
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def main(
    argv: list[str] | None = None,
    *,
    stdin: IO[str] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """Run the command; return its exit status instead of exiting."""
    io = Streams(
        stdin=sys.stdin if stdin is None else stdin,
        stdout=sys.stdout if stdout is None else stdout,
        stderr=sys.stderr if stderr is None else stderr,
    )
    parser = make_parser()
    with redirect_stdout(io.stdout), redirect_stderr(io.stderr):
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:
            return _exit_status(e.code)
    try:
        return args.run(args, io)
    except (StoreError, CommandError) as e:
        io.err(f"{PROG}: error: {_one_line(str(e))}")
    except KeyboardInterrupt:
        io.err("")
        return 130
    except Exception as e:  # No traceback, and no message: it could hold a secret.
        io.err(f"{PROG}: error: unexpected {type(e).__name__}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
