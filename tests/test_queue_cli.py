"""
Tests for C{authgateway queue} (L{gateway.cli}): every subcommand through
L{gateway.cli.main} with captured streams on a spool written by the real
L{Spool}, against a lock held by another process, and once the installed
console script in a subprocess.
"""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
import time
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from gateway import cli, tap
from gateway.smtp import queue as queue_module
from gateway.smtp.queue import Queue
from tests.test_queue import HOLDER, spool_message

#: Parts of tests.test_spool.MESSAGE's header and body: never printed.
BODY = ("8-bit body", "leading dot", "Subject", "caf\u00e9")


class QueueCommandTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.spool = os.path.abspath(self.mktemp())
        os.makedirs(self.spool)
        self.queue = Queue(self.spool)

    def run_cli(self, *argv: str, spool: bool = True) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        args = ["queue", "--spool", self.spool, *argv] if spool else ["queue", *argv]
        code = cli.main(args, stdin=io.StringIO(), stdout=out, stderr=err)
        for text in BODY:
            self.assertNotIn(text, out.getvalue() + err.getvalue())
        self.assertNotIn("Traceback", err.getvalue())
        return code, out.getvalue(), err.getvalue()

    def assertFails(self, result: tuple[int, str, str], message: str) -> None:
        code, out, err = result
        self.assertEqual((code, out), (1, ""), err)
        self.assertEqual(err, f"authgateway: error: {message}\n")

    def message(self, **changes: Any) -> str:
        return spool_message(self.spool, **changes)

    def state(self, id: str) -> Any:
        found = self.queue.read(id)
        assert found is not None
        return found[1]

    def change(self, id: str, **values: Any) -> None:
        with self.queue.claim(id) as claim:
            for name, value in values.items():
                setattr(claim.state, name, value)
            claim.save()


class ListTests(QueueCommandTestCase):
    def test_empty(self) -> None:
        self.assertEqual(self.run_cli("list"), (0, "0 messages: 0 queued, 0 deferred, 0 held, 0 done\n", ""))

    def test_list(self) -> None:
        """One row per message, then the counts; sender, pending/total, state, next attempt, error."""
        new = self.message(mail_from="", rcpt_to=["x@example.net"])
        deferred = self.message()
        with self.queue.claim(deferred) as claim:
            claim.state.attempts = 1
            claim.state.next_attempt = time.time() + 3600 + 120
            claim.state.last_error = "451 4.3.0 " + "try later " * 10
            claim.state.recipients[0].status = "delivered"
            claim.save()
        held = self.message()
        self.change(held, held=True)

        def read(queue: Queue, id: str) -> None:
            raise AssertionError("list reads each message once, in the scan")

        self.patch(Queue, "read", read)
        code, out, err = self.run_cli("list")
        self.assertEqual((code, err), (0, ""))
        lines = out.splitlines()
        self.assertEqual(lines[0].split(), ["ID", "AGE", "SIZE", "FROM", "PENDING", "STATE", "NEXT", "LAST",
                                            "ERROR"])
        rows = {line.split()[0]: line.split(None, 7) for line in lines[1:4]}
        size = str(os.path.getsize(os.path.join(self.spool, f"{new}.eml")))
        self.assertEqual(rows[new][2:], [size, "<>", "1/1", "queued", "now", "-"])
        self.assertEqual(rows[deferred][3:7], ["sales@example.com", "1/2", "deferred", "in"])
        self.assertRegex(rows[deferred][7], r"\A1h0[12]m +451 4\.3\.0 try later try later try lat\.\.\.\Z")
        self.assertEqual(rows[held][5:7], ["held", "-"])
        self.assertEqual(lines[4:], ["", "3 messages: 1 queued, 1 deferred, 1 held, 0 done"])

    def test_quarantine_warning(self) -> None:
        """An unreadable message is quarantined, and the command says so on stderr."""
        bad = self.message()
        with open(os.path.join(self.spool, f"{bad}.json"), "w") as f:
            f.write("{")
        code, out, err = self.run_cli("list")
        self.assertEqual((code, out), (0, "0 messages: 0 queued, 0 deferred, 0 held, 0 done\n"))
        quarantine = os.path.join(self.spool, "quarantine")
        self.assertEqual(
            err,
            f"authgateway: warning: queue: quarantined message {bad} in {quarantine}: "
            f"{os.path.join(self.spool, bad)}.json: not valid JSON\n",
        )

    def test_missing_spool(self) -> None:
        missing = os.path.join(self.spool, "nope")
        result = cli.main(["queue", "list", "--spool", missing], stdout=io.StringIO(), stderr=(err := io.StringIO()))
        self.assertEqual(result, 1)
        self.assertEqual(err.getvalue(),
                         f"authgateway: error: {missing}: cannot list the queue: No such file or directory\n")

    def test_spool_after_subcommand(self) -> None:
        """--spool is accepted after the subcommand too, and wins over one before it."""
        self.message()
        out = io.StringIO()
        code = cli.main(["queue", "--spool", "/nonexistent", "list", "--spool", self.spool],
                        stdout=out, stderr=io.StringIO())
        self.assertEqual(code, 0)
        self.assertTrue(out.getvalue().endswith("1 message: 1 queued, 0 deferred, 0 held, 0 done\n"))

    def test_default_spool(self) -> None:
        """The default is where twistd authgateway spools by default."""
        self.assertEqual(cli.DEFAULT_SPOOL, os.path.join(tap.Options()["data-dir"], "spool"))
        args = cli.make_parser().parse_args(["queue", "list"])
        self.assertEqual((args.spool, args.wait), (cli.DEFAULT_SPOOL, cli.LOCK_WAIT))


class ShowTests(QueueCommandTestCase):
    def test_show(self) -> None:
        """Metadata and per-recipient state; control characters escaped; never the body."""
        id = self.message(rcpt_to=["a@example.net", "evil\x1b[31m@example.org"])
        with self.queue.claim(id) as claim:
            claim.state.attempts = 1
            claim.state.first_attempt = claim.state.last_attempt = "2026-11-26T10:05:00Z"
            claim.state.next_attempt = 1795000000.0
            claim.state.last_error = "451 4.2.0 mailbox busy"
            first = claim.state.recipients[0]
            first.status, first.relay, first.reply, first.at = (
                "delivered", "smtp://relay.example:25", "250 2.0.0 Ok: queued as X", "2026-11-26T10:05:00Z")
            claim.save()
        code, out, err = self.run_cli("show", id)
        self.assertEqual((code, err), (0, ""))
        lines = out.splitlines()
        fields = dict(line.split(":", 1) for line in lines[: lines.index("recipients:")])
        fields = {k: v.strip() for k, v in fields.items()}
        self.assertEqual(fields["id"], id)
        self.assertEqual(fields["from"], "<sales@example.com>")
        self.assertEqual((fields["authz_id"], fields["authn_id"]), ("sales", "daniel"))
        self.assertEqual(fields["protocol"], "ESMTPSA")
        self.assertEqual(fields["peer"], "192.0.2.7 port 40000")
        self.assertEqual(fields["state"], "deferred")
        self.assertEqual(fields["attempts"], "1 (first 2026-11-26T10:05:00Z, last 2026-11-26T10:05:00Z)")
        self.assertEqual(fields["next attempt"], "now")
        self.assertEqual(fields["last error"], "451 4.2.0 mailbox busy")
        recipients = lines[lines.index("recipients:") + 1:]
        self.assertEqual(recipients[0].split(), ["STATUS", "ADDRESS", "RELAY", "AT", "REPLY"])
        self.assertEqual(recipients[1].split(None, 4), ["delivered", "a@example.net", "smtp://relay.example:25",
                                                        "2026-11-26T10:05:00Z", "250 2.0.0 Ok: queued as X"])
        self.assertEqual(recipients[2].split(), ["pending", "evil\\x1b[31m@example.org", "-", "-", "-"])
        self.assertNotIn("\x1b", out)

    def test_escapes_in_metadata(self) -> None:
        """Whatever a planted .json holds, show prints no terminal escape."""
        id = self.message()
        path = os.path.join(self.spool, f"{id}.json")
        with open(path) as f:
            meta = json.load(f)
        meta.update(id="\x1b]0;OWNED\x07\x1b[2J", size="\x1b[31mRED", helo="\x1b[1m")
        with open(path, "w") as f:
            json.dump(meta, f)
        code, out, _ = self.run_cli("show", id)
        self.assertEqual(code, 0)
        self.assertNotIn("\x1b", out)
        self.assertNotIn("\x07", out)

    def test_unknown(self) -> None:
        unknown = "20261126T100000Z-0123456789abcdef"
        self.assertFails(self.run_cli("show", unknown), f"no message {unknown} in {self.spool}")
        self.assertFails(self.run_cli("show", "../x"), "not a message id: '../x'")


class ChangeTests(QueueCommandTestCase):
    def test_hold_release(self) -> None:
        id = self.message()
        self.assertEqual(self.run_cli("hold", id), (0, f"{id}: held\n", ""))
        self.assertTrue(self.state(id).held)
        self.assertEqual(self.run_cli("retry", id), (0, f"{id}: due now (held: release it to deliver)\n", ""))
        self.assertEqual(self.run_cli("release", id), (0, f"{id}: released\n", ""))
        self.assertFalse(self.state(id).held)

    def test_root_keeps_owner(self) -> None:
        """C{sudo authgateway queue hold} on a spool of the gateway's user leaves it the state file."""
        if os.geteuid() != 0:
            raise SkipTest("changing a file's owner needs root")
        id = self.message()
        for name in [".", *os.listdir(self.spool)]:
            os.chown(os.path.join(self.spool, name), 65534, 65534)
        self.assertEqual(self.run_cli("hold", id), (0, f"{id}: held\n", ""))
        st = os.stat(os.path.join(self.spool, f"{id}.state"))
        self.assertEqual((st.st_uid, st.st_gid), (65534, 65534))

    def test_retry_one(self) -> None:
        id = self.message()
        self.change(id, attempts=2, next_attempt=time.time() + 600)
        self.assertEqual(self.run_cli("retry", id), (0, f"{id}: due now\n", ""))
        state = self.state(id)
        self.assertEqual((state.next_attempt, state.attempts), (0.0, 2))

    def test_retry_all(self) -> None:
        """Every waiting message becomes due; held ones stay as they are, claimed ones are left alone."""
        waiting, held, busy, new = (self.message() for _ in range(4))
        later = time.time() + 600
        self.change(waiting, attempts=1, next_attempt=later)
        self.change(held, attempts=1, next_attempt=later, held=True)
        self.change(busy, attempts=1, next_attempt=later)
        claim = Queue(self.spool).claim(busy)
        self.addCleanup(claim.release)
        self.assertEqual(self.run_cli("retry"), (0, "1 message due now\n1 being delivered now, left alone\n", ""))
        self.assertEqual(self.state(waiting).next_attempt, 0.0)
        self.assertEqual(self.state(held).next_attempt, later)
        self.assertEqual(self.state(busy).next_attempt, later)
        self.assertIsNone(self.queue.read(new)[2])  # never attempted: untouched, no state file

    def test_delete(self) -> None:
        id = self.message()
        keep = self.message()
        self.change(id, attempts=1)
        self.assertEqual(self.run_cli("delete", id), (0, f"{id}: deleted\n", ""))
        self.assertEqual(sorted(os.listdir(self.spool)), [f"{keep}.eml", f"{keep}.json"])
        self.assertFails(self.run_cli("delete", id), f"no message {id} in {self.spool}")

    def test_being_delivered(self) -> None:
        """A message another process holds: the change waits --wait seconds, then one error line."""
        id = self.message()
        process = subprocess.Popen([sys.executable, "-c", HOLDER, os.path.join(self.spool, f"{id}.json")],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.addCleanup(process.wait, 60)
        self.addCleanup(process.stdout.close)
        self.assertEqual(process.stdout.readline(), "locked\n")
        for command in ("hold", "release", "retry", "delete"):
            self.assertFails(self.run_cli(command, id, "--wait", "0.05"),
                             f"message {id} is being delivered; try again later")
        process.stdin.close()
        self.assertEqual(process.wait(60), 0)
        self.assertEqual(self.run_cli("hold", id, "--wait", "0.05"), (0, f"{id}: held\n", ""))

    def test_save_fails(self) -> None:
        """A full disk is one error line; the state is unchanged."""
        id = self.message()

        def full(fd: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        self.patch(queue_module.os, "fsync", full)
        self.assertFails(self.run_cli("hold", id),
                         f"{id}: cannot save the queue state: {os.strerror(errno.ENOSPC)}")
        self.assertFalse(os.path.exists(os.path.join(self.spool, f"{id}.state")))

    def test_usage(self) -> None:
        code, out, err = self.run_cli("hold")
        self.assertEqual((code, out), (2, ""))
        self.assertIn("the following arguments are required: ID", err)


class ConsoleScriptTests(SynchronousTestCase):
    def test_installed_command(self) -> None:
        """The installed C{authgateway queue list} reads the default spool of the current directory."""
        directory = os.path.abspath(self.mktemp())
        spool = os.path.join(directory, cli.DEFAULT_SPOOL)
        os.makedirs(spool)
        id = spool_message(spool)
        script = os.path.join(os.path.dirname(sys.executable), "authgateway")
        self.assertTrue(os.path.exists(script), f"{script}: the console script is not installed")
        done = subprocess.run([script, "queue", "list"], cwd=directory, capture_output=True, text=True,
                              timeout=60, check=False)
        self.assertEqual((done.returncode, done.stderr), (0, ""))
        lines = done.stdout.splitlines()
        self.assertEqual(lines[1].split()[0], id)
        self.assertEqual(lines[-1], "1 message: 1 queued, 0 deferred, 0 held, 0 done")
