"""
Tests for L{gateway.cli}, the C{authgateway} command: every subcommand and
error path in-process, the C{python -m gateway.cli} entry point in a
subprocess, and Apache's C{htpasswd -v} reading a file we wrote.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from gateway import cli, realm, tap, testing
from gateway.checkers import hashes, htpasswd, tokens
from gateway.errors import PoolFull
from tests.support import planted_directory_link, require_tool, victim_file

PASSWORD = "Tr0ub4dor&3-cli"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


class CommandTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.mkdir(self.directory)
        self.users = os.path.join(self.directory, "users")
        self.tokens = os.path.join(self.directory, "tokens")

    def run_cli(self, *argv: str, stdin: io.StringIO | str = "") -> tuple[int, str, str]:
        if isinstance(stdin, str):
            stdin = io.StringIO(stdin)
        out, err = io.StringIO(), io.StringIO()
        code = cli.main(list(argv), stdin=stdin, stdout=out, stderr=err)
        self.assertNotIn(PASSWORD, out.getvalue() + err.getvalue())
        self.assertNotIn("Traceback", err.getvalue())
        return code, out.getvalue(), err.getvalue()

    def assertFails(self, result: tuple[int, str, str], message: str) -> None:
        """Exit 1, nothing on stdout, exactly one C{authgateway: error:} line."""
        code, out, err = result
        self.assertEqual((code, out), (1, ""), err)
        self.assertEqual(err, f"authgateway: error: {message}\n")

    def add(self, user: str = "alice", *extra: str, password: str = PASSWORD):
        return self.run_cli(
            "user", "add", self.users, user, "--password-stdin", "--cost", "4", *extra,
            stdin=password + "\n",
        )


class UserAddTests(CommandTestCase):
    def test_password_stdin_creates_file(self) -> None:
        code, out, err = self.add("alice", "--groups", "admins, dev")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out, f"created {self.users}\nadded user alice (bcrypt)\n")
        entry = htpasswd.list_users(self.users).entries["alice"]
        self.assertEqual(entry.groups, ("admins", "dev"))
        self.assertTrue(hashes.verify(PASSWORD, entry.hash))
        self.assertEqual(os.stat(self.users).st_mode & 0o777, 0o600)

        code, out, err = self.add("bob")
        self.assertEqual((code, out, err), (0, "added user bob (bcrypt)\n", ""))

    def test_reads_one_line_only(self) -> None:
        code, _, _ = self.run_cli(
            "user", "add", self.users, "alice", "--password-stdin", "--cost", "4",
            stdin=PASSWORD + "\r\nsecond line\n",
        )
        self.assertEqual(code, 0)
        entry = htpasswd.list_users(self.users).entries["alice"]
        self.assertTrue(hashes.verify(PASSWORD, entry.hash))

    def test_no_final_newline_and_inner_spaces_kept(self) -> None:
        code, _, _ = self.run_cli(
            "user", "add", self.users, "alice", "--password-stdin", "--cost", "4",
            stdin=f" {PASSWORD} ",
        )
        self.assertEqual(code, 0)
        entry = htpasswd.list_users(self.users).entries["alice"]
        self.assertTrue(hashes.verify(f" {PASSWORD} ", entry.hash))

    def test_other_scheme(self) -> None:
        code, out, _ = self.run_cli(
            "user", "add", self.users, "alice", "--password-stdin",
            "--scheme", "sha512-crypt", "--cost", "1000", stdin=PASSWORD,
        )
        self.assertEqual(code, 0)
        self.assertIn("(sha512-crypt)", out)
        self.assertEqual(htpasswd.list_users(self.users).entries["alice"].scheme, "sha512-crypt")

    def test_empty_password(self) -> None:
        self.assertFails(self.add(password=""), "empty password")
        self.assertFails(
            self.run_cli("user", "add", self.users, "alice", "--password-stdin", stdin="\r\n"),
            "empty password",
        )
        self.assertFalse(os.path.exists(self.users))

    def test_no_input(self) -> None:
        self.assertFails(
            self.run_cli("user", "add", self.users, "alice", "--password-stdin", stdin=""),
            "no password on standard input",
        )

    def test_not_a_terminal(self) -> None:
        self.patch(cli, "getpass", lambda prompt: self.fail("prompted"))
        self.assertFails(
            self.run_cli("user", "add", self.users, "alice", stdin=PASSWORD + "\n"),
            "standard input is not a terminal: use --password-stdin to read the password from it",
        )
        self.assertFalse(os.path.exists(self.users))

    def test_terminal_prompts_twice(self) -> None:
        prompts: list[str] = []

        def getpass(prompt: str) -> str:
            prompts.append(prompt)
            return PASSWORD

        self.patch(cli, "getpass", getpass)
        code, out, err = self.run_cli(
            "user", "add", self.users, "alice", "--cost", "4", stdin=TTY()
        )
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out, f"created {self.users}\nadded user alice (bcrypt)\n")
        self.assertEqual(prompts, ["Password for alice: ", "Retype password: "])
        entry = htpasswd.list_users(self.users).entries["alice"]
        self.assertTrue(hashes.verify(PASSWORD, entry.hash))

    def test_terminal_mismatch(self) -> None:
        answers = iter([PASSWORD, PASSWORD + "x"])
        self.patch(cli, "getpass", lambda prompt: next(answers))
        self.assertFails(
            self.run_cli("user", "add", self.users, "alice", stdin=TTY()),
            "passwords do not match",
        )
        self.assertFalse(os.path.exists(self.users))

    def test_terminal_eof(self) -> None:
        def getpass(prompt: str) -> str:
            raise EOFError()

        self.patch(cli, "getpass", getpass)
        self.assertFails(
            self.run_cli("user", "add", self.users, "alice", stdin=TTY()), "no password entered"
        )

    def test_interrupted(self) -> None:
        def getpass(prompt: str) -> str:
            raise KeyboardInterrupt()

        self.patch(cli, "getpass", getpass)
        code, out, err = self.run_cli("user", "add", self.users, "alice", stdin=TTY())
        self.assertEqual((code, out, err), (130, "", "\n"))

    def test_duplicate_user(self) -> None:
        self.add()
        before = _read(self.users)
        self.assertFails(self.add(), f'{self.users}: user "alice" already exists')
        self.assertEqual(_read(self.users), before)

    def test_bad_user_and_group(self) -> None:
        self.assertFails(self.add("a:b"), "user name \"a:b\" contains ':'")
        self.assertFails(
            self.add("alice", "--groups", "ok,not ok"),
            "group name \"not ok\" contains ',', ':' or whitespace",
        )

    def test_bad_cost(self) -> None:
        self.assertFails(
            self.run_cli(
                "user", "add", self.users, "alice", "--password-stdin", "--cost", "99",
                stdin=PASSWORD,
            ),
            "bcrypt cost must be an integer from 4 to 17",
        )

    def test_password_too_long_for_bcrypt(self) -> None:
        long_password = PASSWORD * 6
        code, out, err = self.add(password=long_password)
        self.assertEqual((code, out), (1, ""))
        self.assertTrue(err.startswith("authgateway: error: bcrypt uses only"), err)
        self.assertEqual(err.count("\n"), 1)
        self.assertNotIn(long_password, err)

    def test_missing_directory(self) -> None:
        users = os.path.join(self.directory, "nope", "users")
        code, out, err = self.run_cli(
            "user", "add", users, "alice", "--password-stdin", stdin=PASSWORD
        )
        self.assertFails((code, out, err), f"{os.path.dirname(users)}: no such directory")

    def test_unknown_scheme_is_a_usage_error(self) -> None:
        code, out, err = self.run_cli(
            "user", "add", self.users, "alice", "--password-stdin", "--scheme", "md5",
            stdin=PASSWORD,
        )
        self.assertEqual((code, out), (2, ""))
        self.assertIn("invalid choice: 'md5'", err)
        self.assertTrue(err.startswith("usage: authgateway user add"), err)


class UserDelListTests(CommandTestCase):
    def test_delete(self) -> None:
        self.add("alice")
        self.add("bob")
        code, out, err = self.run_cli("user", "del", self.users, "alice")
        self.assertEqual((code, out, err), (0, "deleted user alice\n", ""))
        self.assertEqual(list(htpasswd.list_users(self.users).entries), ["bob"])

    def test_delete_unknown_user(self) -> None:
        self.add("bob")
        self.assertFails(
            self.run_cli("user", "del", self.users, "alice"), f'{self.users}: no user "alice"'
        )

    def test_delete_missing_file(self) -> None:
        self.assertFails(
            self.run_cli("user", "del", self.users, "alice"),
            f"{self.users}: {os.strerror(2)}",
        )

    def test_list(self) -> None:
        self.add("alice", "--groups", "admins,dev")
        self.add("bob")
        with open(self.users, "a", encoding="utf-8") as f:
            f.write("broken line\ncarol:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n")
        code, out, err = self.run_cli("user", "list", self.users)
        self.assertEqual(code, 0)
        self.assertEqual(
            out,
            "USER   HASH           GROUPS\n"
            "alice  bcrypt cost 4  admins,dev\n"
            "bob    bcrypt cost 4  -\n"
            "carol  sha1           -\n",
        )
        self.assertNotIn("$2b$", out + err)
        self.assertNotIn("W6ph5", out + err)
        self.assertEqual(
            err,
            f"authgateway: warning: {self.users}:3: no ':' between user name and hash\n"
            f"authgateway: warning: {self.users}: weak legacy hashes in use (sha1); "
            "delete and re-add those users\n",
        )

    def test_list_empty(self) -> None:
        with open(self.users, "w") as f:
            f.write("# nobody yet\n")
        self.assertEqual(self.run_cli("user", "list", self.users), (0, "", ""))

    def test_list_missing_file(self) -> None:
        self.assertFails(
            self.run_cli("user", "list", self.users), f"{self.users}: {os.strerror(2)}"
        )

    def test_list_not_utf8(self) -> None:
        with open(self.users, "wb") as f:
            f.write(b"\xff\n")
        self.assertFails(self.run_cli("user", "list", self.users), f"{self.users}:1: not valid UTF-8")


class TokenCommandTests(CommandTestCase):
    def add_token(self, user: str = "alice", *extra: str) -> str:
        code, out, err = self.run_cli("token", "add", self.tokens, user, *extra)
        self.assertEqual(code, 0, err)
        return out.strip()

    def test_add(self) -> None:
        code, out, err = self.run_cli("token", "add", self.tokens, "alice", "--groups", "ops")
        self.assertEqual(code, 0)
        token = out.strip()
        self.assertEqual(out, token + "\n")
        self.assertTrue(token.startswith(tokens.TOKEN_PREFIX))
        entry = tokens.list_tokens(self.tokens).lookup(token)
        self.assertEqual((entry.user, entry.groups), ("alice", ("ops",)))
        self.assertNotIn(token, _read(self.tokens))
        self.assertNotIn(token, err)
        self.assertEqual(
            err,
            f"authgateway: created {self.tokens}\n"
            f"authgateway: token {entry.token_id} for alice: copy it now, "
            "it is not stored and cannot be shown again\n",
        )
        code, out, err = self.run_cli("token", "add", self.tokens, "alice")
        self.assertNotIn("created", err)
        self.assertNotEqual(out.strip(), token)

    def test_add_errors(self) -> None:
        self.assertFails(self.run_cli("token", "add", self.tokens, ""), "user name is empty")
        missing = os.path.join(self.directory, "nope", "tokens")
        code, out, err = self.run_cli("token", "add", missing, "alice")
        self.assertFails((code, out, err), f"{os.path.dirname(missing)}: {os.strerror(2)}")

    def test_list(self) -> None:
        self.add_token("alice", "--groups", "ops,dev")
        self.add_token("bob")
        with open(self.tokens, "a") as f:
            f.write("junk\n")
        table = tokens.list_tokens(self.tokens)
        alice, bob = table.by_digest.values()
        code, out, err = self.run_cli("token", "list", self.tokens)
        self.assertEqual(code, 0)
        width = len(alice.created)
        self.assertEqual(
            out,
            f"TOKEN ID      USER   GROUPS   {'CREATED'.ljust(width)}".rstrip() + "\n"
            f"{alice.token_id}  alice  ops,dev  {alice.created}\n"
            f"{bob.token_id}  bob    -        {bob.created}\n",
        )
        self.assertNotIn(alice.digest, out)
        self.assertEqual(
            err,
            f"authgateway: warning: {self.tokens}:3: expected DIGEST:USER:GROUPS:CREATED, "
            "found 1 field\n",
        )

    def test_list_missing_file(self) -> None:
        self.assertFails(
            self.run_cli("token", "list", self.tokens), f"{self.tokens}: {os.strerror(2)}"
        )

    def test_revoke_by_user(self) -> None:
        self.add_token("alice")
        self.add_token("alice")
        kept = self.add_token("bob")
        ids = [e.token_id for e in tokens.list_tokens(self.tokens).for_user("alice")]
        code, out, err = self.run_cli("token", "revoke", self.tokens, "alice")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out, "".join(f"revoked {i} (alice)\n" for i in ids))
        table = tokens.list_tokens(self.tokens)
        self.assertEqual([e.user for e in table.by_digest.values()], ["bob"])
        self.assertIsNotNone(table.lookup(kept))

    def test_revoke_by_id(self) -> None:
        self.add_token("alice")
        [entry] = tokens.list_tokens(self.tokens).by_digest.values()
        code, out, err = self.run_cli("token", "revoke", self.tokens, entry.token_id[:8])
        self.assertEqual((code, out, err), (0, f"revoked {entry.token_id} (alice)\n", ""))
        self.assertEqual(len(tokens.list_tokens(self.tokens)), 0)

    def test_revoke_errors(self) -> None:
        digest = "abcdef" + "0" * 58
        with open(self.tokens, "w") as f:
            f.write(f"{digest}:alice::\nabcdef{'1' * 58}:bob::\n")
        self.assertFails(
            self.run_cli("token", "revoke", self.tokens, "abcdef"),
            f'{self.tokens}: token id "abcdef" is ambiguous: it matches 2 tokens',
        )
        self.assertFails(
            self.run_cli("token", "revoke", self.tokens, "carol"),
            f'{self.tokens}: no tokens for user "carol"',
        )
        self.assertFails(
            self.run_cli("token", "revoke", self.tokens, "999999"),
            f'{self.tokens}: no user or token id "999999"',
        )
        missing = os.path.join(self.directory, "missing")
        self.assertFails(
            self.run_cli("token", "revoke", missing, "alice"), f"{missing}: {os.strerror(2)}"
        )

    def test_revoke_never_echoes_a_token(self) -> None:
        token = self.add_token("alice")
        self.run_cli("token", "revoke", self.tokens, token)
        code, out, err = self.run_cli("token", "revoke", self.tokens, token)
        self.assertFails((code, out, err), f"{self.tokens}: no such token (the token is not shown)")


class UsageTests(CommandTestCase):
    def test_no_arguments(self) -> None:
        code, out, err = self.run_cli()
        self.assertEqual((code, out), (2, ""))
        self.assertIn("authgateway: error: the following arguments are required", err)

    def test_missing_subcommand(self) -> None:
        code, _, err = self.run_cli("user")
        self.assertEqual(code, 2)
        self.assertTrue(err.startswith("usage: authgateway user"), err)

    def test_help(self) -> None:
        code, out, err = self.run_cli("--help")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("usage: authgateway", out)
        code, out, err = self.run_cli("user", "add", "--help")
        self.assertEqual(code, 0)
        self.assertIn("--password-stdin", out)
        for scheme in hashes.CLI_SCHEMES:
            self.assertIn(scheme, out)

    def test_stray_arguments_not_echoed(self) -> None:
        """A password typed on the command line by mistake is not repeated."""
        code, out, err = self.run_cli("user", "add", self.users, "alice", PASSWORD)
        self.assertEqual((code, out), (2, ""))
        self.assertIn("unrecognized arguments (not shown", err)
        self.assertFalse(os.path.exists(self.users))

    def test_bad_cost_type(self) -> None:
        code, _, err = self.run_cli("user", "add", self.users, "alice", "--cost", "many")
        self.assertEqual(code, 2)
        self.assertIn("invalid int value", err)

    def test_unexpected_error_is_one_line(self) -> None:
        def add_user(*args, **kwargs):
            raise RuntimeError(f"leaking {PASSWORD}\nsecond line")

        self.patch(htpasswd, "add_user", add_user)
        self.assertFails(self.add(), "unexpected RuntimeError")

    def test_defaults_to_sys_streams(self) -> None:
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        self.patch(sys, "stdin", io.StringIO(PASSWORD + "\n"))
        self.patch(sys, "argv", ["authgateway", "user", "add", self.users, "alice",
                                 "--password-stdin", "--cost", "4"])
        self.assertEqual(cli.main(), 0)
        self.assertIn("added user alice", out.getvalue())
        self.assertEqual(err.getvalue(), "")


class EntryPointTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.mkdir(self.directory)
        self.users = os.path.join(self.directory, "users")

    def run_module(self, *argv: str, input: str = "") -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, PYTHONPATH=REPO)
        return subprocess.run(
            [sys.executable, "-m", "gateway.cli", *argv],
            input=input,
            capture_output=True,
            text=True,
            env=env,
            cwd=self.directory,
            timeout=60,
            check=False,
        )

    def test_python_m(self) -> None:
        done = self.run_module(
            "user", "add", self.users, "alice", "--password-stdin", "--cost", "4",
            input=PASSWORD + "\n",
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout, f"created {self.users}\nadded user alice (bcrypt)\n")
        self.assertEqual(done.stderr, "")
        entry = htpasswd.list_users(self.users).entries["alice"]
        self.assertTrue(hashes.verify(PASSWORD, entry.hash))

    def test_python_m_error(self) -> None:
        done = self.run_module("user", "list", self.users)
        self.assertEqual(done.returncode, 1)
        self.assertEqual(done.stderr, f"authgateway: error: {self.users}: {os.strerror(2)}\n")


class ApacheHtpasswdTests(SynchronousTestCase):
    """Apache's own C{htpasswd -v} accepts the bcrypt entries we write."""

    def setUp(self) -> None:
        self.tool = require_tool("htpasswd", "apache2-utils")
        directory = self.mktemp()
        os.mkdir(directory)
        self.users = os.path.join(directory, "users")

    def verify(self, user: str, password: str) -> int:
        done = subprocess.run(
            [self.tool, "-v", "-i", self.users, user],
            input=password + "\n",
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return done.returncode

    def test_bcrypt_verifies(self) -> None:
        code = cli.main(
            ["user", "add", self.users, "alice", "--password-stdin", "--cost", "5"],
            stdin=io.StringIO(PASSWORD + "\n"), stdout=io.StringIO(), stderr=io.StringIO(),
        )
        self.assertEqual(code, 0)
        self.assertEqual(self.verify("alice", PASSWORD), 0)
        self.assertEqual(self.verify("alice", PASSWORD + "x"), 3)


class SymlinkedStoreTests(CommandTestCase):
    """
    A store that is a symbolic link is refused by every rewriting command:
    a link planted by whoever can write the data directory must not make
    C{sudo authgateway user add} replace its target (think /etc/shadow).
    """

    def setUp(self) -> None:
        super().setUp()
        self.victim = victim_file(self)

    def assertRefused(self, link: str, *argv: str, stdin: str = "") -> None:
        code, out, err = self.run_cli(*argv, stdin=stdin)
        self.assertEqual((code, out), (1, ""), err)
        self.assertIn(f"{link} is a symbolic link (to {self.victim})", err)
        self.assertIn("give the real path", err)
        self.assertEqual(_read(self.victim), "root:x\n")
        self.assertEqual(os.stat(self.victim).st_mode & 0o777, 0o640)

    def test_every_rewrite_refused(self) -> None:
        for link in (self.users, self.tokens):
            os.symlink(self.victim, link)
        self.assertRefused(
            self.users, "user", "add", self.users, "mallory", "--password-stdin", "--cost", "4",
            stdin=PASSWORD + "\n",
        )
        self.assertRefused(self.users, "user", "del", self.users, "root")
        self.assertRefused(self.tokens, "token", "add", self.tokens, "mallory")
        self.assertRefused(self.tokens, "token", "revoke", self.tokens, "root")

    def test_planted_directory_link_refused(self) -> None:
        """A store's directory reached through someone else's link (C{linkdir -> /etc})."""
        victim, link = planted_directory_link(self)
        code, _, err = self.run_cli(
            "user", "add", os.path.join(link, "users"), "z", "--password-stdin",
            stdin="pw-z-12345\n",
        )
        self.assertNotEqual(code, 0)
        self.assertIn("symbolic link owned by uid 4242", err)
        self.assertEqual(_read(os.path.join(victim, "users")), "keep:me\n")

    def test_dangling_link_not_created(self) -> None:
        os.unlink(self.victim)
        os.symlink(self.victim, self.users)
        self.assertEqual(self.add()[0], 1)
        self.assertFalse(os.path.lexists(self.victim))

    def test_real_path_works_and_link_reads(self) -> None:
        """The operator rewrites the real file; the link still reads (user list, the gateway)."""
        os.unlink(self.victim)
        os.symlink(self.victim, self.users)
        real = self.users
        self.users = self.victim
        self.assertEqual(self.add()[0], 0)
        code, out, _ = self.run_cli("user", "list", real)
        self.assertEqual(code, 0)
        self.assertIn("alice", out)


class RunningGatewayTests(TestCase):
    """
    C{authgateway user/token ...} against the files a running gateway's
    checkers watch (wired by L{tap.build_core}, hash pool started): the very
    next login sees the change, even while the hash queue is full.
    """

    def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.mkdir(directory)
        self.users = os.path.join(directory, "users")
        self.tokens = os.path.join(directory, "tokens")
        self.cli("user", "add", self.users, "bob", "--password-stdin", "--cost", "4",
                 stdin=PASSWORD + "\n")
        self.bot_token = self.cli("token", "add", self.tokens, "bot").strip()
        options = tap.Options()
        options.parseOptions([
            "--data-dir", os.path.join(directory, "data"),
            "--auth", f"htpasswd:{self.users}", "--auth", f"tokens:{self.tokens}",
            "--hash-threads", "1", "--hash-queue", "1", "--failure-delay", "0",
        ])
        self.htpasswd, self.token_checker = options["credCheckers"]
        self.core = tap.build_core(options["coreSettings"], reactor)
        self.core.hash_pool.startService()
        self.addCleanup(self.core.hash_pool.stopService)

    def cli(self, *argv: str, stdin: str = "") -> str:
        out, err = io.StringIO(), io.StringIO()
        code = cli.main(list(argv), stdin=io.StringIO(stdin), stdout=out, stderr=err)
        self.assertEqual(code, 0, err.getvalue())
        return out.getvalue()

    def login(self, creds: object) -> defer.Deferred:
        return realm.login(self.core.portal, creds)

    def test_wired_to_the_reload_thread(self) -> None:
        for checker in (self.htpasswd, self.token_checker):
            self.assertEqual(checker.file.loader, self.core.hash_pool.load)
            self.assertIs(checker.file.clock, reactor)

    @defer.inlineCallbacks
    def test_user_add_then_del(self):
        self.cli("user", "add", self.users, "alice", "--password-stdin", "--cost", "4",
                 stdin=PASSWORD + "\n")
        _, info, _ = yield self.login(testing.http_basic("alice", PASSWORD))
        self.assertEqual(info.names(), {"alice"})
        yield self.login(testing.http_basic("bob", PASSWORD))
        self.cli("user", "del", self.users, "bob")
        yield self.assertFailure(self.login(testing.http_basic("bob", PASSWORD)), UnauthorizedLogin)

    @defer.inlineCallbacks
    def test_token_add_then_revoke(self):
        token = self.cli("token", "add", self.tokens, "ci").strip()
        _, info, _ = yield self.login(testing.bearer(token))
        self.assertEqual(info.names(), {"ci"})
        self.cli("token", "revoke", self.tokens, "ci")
        yield self.assertFailure(self.login(testing.bearer(token)), UnauthorizedLogin)

    @defer.inlineCallbacks
    def test_reload_while_hash_queue_full(self):
        """A full hash queue neither delays nor refuses the reloads."""
        release = threading.Event()
        self.addCleanup(release.set)
        busy = self.core.hash_pool.run(release.wait, 30)
        self.assertEqual(self.core.hash_pool.pending, self.core.hash_pool.max_pending)
        token = self.cli("token", "add", self.tokens, "ci").strip()
        _, info, _ = yield self.login(testing.bearer(token))
        self.assertEqual(info.names(), {"ci"})
        self.cli("user", "add", self.users, "carol", "--password-stdin", "--cost", "5",
                 stdin=PASSWORD + "\n")
        yield self.assertFailure(self.login(testing.http_basic("carol", PASSWORD)), PoolFull)
        self.assertIn("carol", self.htpasswd.table.entries)  # reloaded all the same
        self.assertIn("bcrypt cost 5", self.htpasswd.file.value.dummies)
        release.set()
        yield busy
        _, info, _ = yield self.login(testing.http_basic("carol", PASSWORD))
        self.assertEqual(info.names(), {"carol"})
