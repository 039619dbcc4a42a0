# -*- test-case-name: tests.test_cli -*-
"""
The C{authgateway} command: manage the password (htpasswd) and token files
the gateway reads, and the delivery queue on its spool.

    authgateway user add FILE USER [--groups a,b] [--password-stdin] [--scheme S] [--cost N]
    authgateway user del FILE USER
    authgateway user list FILE
    authgateway token add FILE USER [--groups a,b]
    authgateway token revoke FILE USER|TOKEN-ID
    authgateway token list FILE
    authgateway queue [--spool DIR] list|show ID|retry [ID]|delete ID|hold ID|release ID

An error is one line, C{authgateway: error: ...}, and exit status 1; usage
errors exit with 2. Passwords and tokens never appear in an error.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from contextlib import redirect_stderr, redirect_stdout
from datetime import datetime, timezone
from getpass import getpass
from typing import IO, Any, NoReturn

import attrs

from twisted.logger import Logger, LogLevel, formatEvent

from gateway.checkers import hashes, htpasswd, tokens
from gateway.checkers.files import StoreError
from gateway.fileio import reason
from gateway.smtp.queue import Claim, Entry, Queue, QueueError, QueueState, STATUSES
from gateway.text import parse_utc_timestamp, printable, utc_timestamp

PROG = "authgateway"

#: The spool C{twistd authgateway} uses by default (C{--data-dir}'s default + C{spool}).
DEFAULT_SPOOL = os.path.join("authgateway-data", "spool")

#: How long a queue change waits for a message the gateway is delivering (seconds).
LOCK_WAIT = 10.0

#: Characters of a message's last error shown by C{queue list}.
ERROR_WIDTH = 40


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


# --- queue --------------------------------------------------------------------


def _duration(seconds: float) -> str:
    """A short human duration: C{45s}, C{12m}, C{3h05m}, C{2d04h}."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _age(received_at: str, now: float) -> str:
    try:
        when = parse_utc_timestamp(received_at)
    except ValueError:
        return "?"
    return _duration(now - when.timestamp())


def _next(state: QueueState | Entry, now: float) -> str:
    if state.held or state.done:
        return "-"
    if state.next_attempt <= now:
        return "now"
    return f"in {_duration(state.next_attempt - now)}"


def _truncate(text: str | None, width: int) -> str:
    if not text:
        return "-"
    text = printable(text)
    return text if len(text) <= width else text[: width - 3] + "..."


def _queue(args: argparse.Namespace, io: Streams) -> Queue:
    """The queue on C{--spool}; what its scan logs (quarantines) is printed as warnings."""

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level", LogLevel.info) >= LogLevel.warn:
            io.warn(formatEvent(event))

    return Queue(args.spool, log=Logger(observer=observe))


def queue_list(args: argparse.Namespace, io: Streams) -> int:
    queue = _queue(args, io)
    entries = queue.scan()
    now = time.time()
    rows = [
        (
            entry.id,
            _age(entry.received_at, now),
            "?" if entry.size is None else str(entry.size),
            printable(entry.mail_from or "<>"),
            f"{entry.pending}/{entry.recipients}",
            entry.status,
            _next(entry, now),
            _truncate(entry.last_error, ERROR_WIDTH),
        )
        for entry in entries
    ]
    if rows:
        header = ("ID", "AGE", "SIZE", "FROM", "PENDING", "STATE", "NEXT", "LAST ERROR")
        for line in _columns([header, *rows]):
            io.out(line)
        io.out()
    counts = queue.counts(entries)
    total = sum(counts.values())
    summary = ", ".join(f"{counts[status]} {status}" for status in STATUSES)
    io.out(f"{total} message{'' if total == 1 else 's'}: {summary}")
    return 0


def _when(timestamp: float) -> str:
    return utc_timestamp(datetime.fromtimestamp(timestamp, timezone.utc))


def queue_show(args: argparse.Namespace, io: Streams) -> int:
    queue = _queue(args, io)
    found = queue.read(args.id)
    if found is None:
        raise CommandError(f"no message {args.id} in {args.spool}")
    meta, state, _ = found
    now = time.time()
    peer = meta.get("peer") or {}
    tls = meta.get("tls")

    def text(value: Any) -> str:
        return "-" if value is None else printable(str(value))

    fields = [
        ("id", text(meta.get("id", args.id))),
        ("received", f"{text(meta['received_at'])} ({_age(meta['received_at'], now)} ago)"),
        ("size", f"{text(meta.get('size'))} bytes"),
        ("protocol", text(meta.get("protocol"))),
        ("from", f"<{printable(meta['mail_from'])}>"),
        ("authz_id", text(meta.get("authz_id"))),
        ("authn_id", text(meta.get("authn_id"))),
        ("peer", f"{text(peer.get('address'))} port {text(peer.get('port'))}"
                 if isinstance(peer, dict) else "-"),
        ("helo", text(meta.get("helo"))),
        ("tls", " ".join(printable(str(v)) for v in tls.values()) if isinstance(tls, dict) else "-"),
        ("state", state.status),
        ("attempts", f"{state.attempts} (first {text(state.first_attempt)}, "
                     f"last {text(state.last_attempt)})"),
        ("next attempt", "-" if state.held or state.done else
            "now" if state.next_attempt <= now else
            f"{_when(state.next_attempt)} ({_next(state, now)})"),
        ("last error", text(state.last_error)),
        ("bounce", text(state.bounce_id)),
    ]
    for name, value in fields:
        io.out(f"{name + ':':<14}{value}")
    io.out("recipients:")
    rows = [
        (r.status, printable(r.address), text(r.relay), text(r.at), text(r.reply))
        for r in state.recipients
    ]
    for line in _columns([("  STATUS", "ADDRESS", "RELAY", "AT", "REPLY"),
                          *[("  " + row[0], *row[1:]) for row in rows]]):
        io.out(line)
    return 0


def _change(args: argparse.Namespace, io: Streams, change: Any) -> int:
    """Lock message C{args.id} (waiting up to C{--wait}), apply C{change(claim)}, save."""
    queue = _queue(args, io)
    with queue.lock(args.id, args.wait) as claim:
        message = change(claim)
        try:
            claim.save()
        except OSError as e:
            raise CommandError(f"{args.id}: cannot save the queue state: {reason(e)}") from None
    io.out(f"{args.id}: {message}")
    return 0


def _retry(claim: Claim) -> str:
    claim.state.next_attempt = 0.0
    return "due now (held: release it to deliver)" if claim.state.held else "due now"


def _hold(claim: Claim) -> str:
    claim.state.held = True
    return "held"


def _release(claim: Claim) -> str:
    claim.state.held = False
    return "released"


def queue_retry(args: argparse.Namespace, io: Streams) -> int:
    if args.id is not None:
        return _change(args, io, _retry)
    # Every message that waits: those being delivered right now need no retry.
    queue = _queue(args, io)
    due = busy = 0
    for entry in queue.scan():
        if entry.held or entry.done or entry.next_attempt == 0:
            continue
        claim = queue.claim(entry.id)
        if claim is None:
            busy += 1
            continue
        with claim:
            if claim.state.held or claim.state.done:
                continue
            claim.state.next_attempt = 0.0
            try:
                claim.save()
            except OSError as e:
                raise CommandError(f"{entry.id}: cannot save the queue state: {reason(e)}") from None
        due += 1
    io.out(f"{due} message{'' if due == 1 else 's'} due now")
    if busy:
        io.out(f"{busy} being delivered now, left alone")
    return 0


def queue_delete(args: argparse.Namespace, io: Streams) -> int:
    queue = _queue(args, io)
    with queue.lock(args.id, args.wait) as claim:
        try:
            claim.finish()
        except OSError as e:
            raise CommandError(f"{args.id}: cannot delete: {reason(e)}") from None
    io.out(f"{args.id}: deleted")
    return 0


def queue_hold(args: argparse.Namespace, io: Streams) -> int:
    return _change(args, io, _hold)


def queue_release(args: argparse.Namespace, io: Streams) -> int:
    return _change(args, io, _release)


def _add_queue_parser(kinds: Any) -> None:
    def options(parser: argparse.ArgumentParser) -> None:
        # Accepted before and after the subcommand; the subcommand's own
        # copies leave what was given before it alone (SUPPRESS).
        parser.add_argument("--spool", metavar="DIR", default=argparse.SUPPRESS,
                            help=f"the gateway's spool directory (default: {DEFAULT_SPOOL})")
        parser.add_argument("--wait", metavar="S", type=float, default=argparse.SUPPRESS,
                            help="seconds to wait for a message being delivered "
                                 f"(default: {LOCK_WAIT:g})")

    queue = kinds.add_parser("queue", help="the delivery queue (safe while the gateway runs)")
    options(queue)
    queue.set_defaults(spool=DEFAULT_SPOOL, wait=LOCK_WAIT)
    cmds = queue.add_subparsers(dest="command", metavar="{list,show,retry,delete,hold,release}", required=True)
    for name, run, help, id_nargs in (
        ("list", queue_list, "one line per message, then counts by state; never bodies", 0),
        ("show", queue_show, "a message's metadata and per-recipient state; never its body", 1),
        ("retry", queue_retry, "make a message (or every waiting one) due now", "?"),
        ("delete", queue_delete, "remove a message from the queue (no bounce)", 1),
        ("hold", queue_hold, "keep a message from being delivered", 1),
        ("release", queue_release, "let a held message be delivered again", 1),
    ):
        cmd = cmds.add_parser(name, help=help)
        options(cmd)
        if id_nargs == 1:
            cmd.add_argument("id", metavar="ID")
        elif id_nargs == "?":
            cmd.add_argument("id", metavar="ID", nargs="?")
        cmd.set_defaults(run=run)


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Manage the password and token files and the queue of authgateway.")
    kinds = parser.add_subparsers(dest="kind", metavar="{user,token,queue}", required=True)

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

    _add_queue_parser(kinds)
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
    except (StoreError, CommandError, QueueError) as e:
        io.err(f"{PROG}: error: {_one_line(str(e))}")
    except KeyboardInterrupt:
        io.err("")
        return 130
    except Exception as e:  # No traceback, and no message: it could hold a secret.
        io.err(f"{PROG}: error: unexpected {type(e).__name__}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
