"""
Authenticated submission sessions per second: the gateway (spool on tmpfs
and spool on disk) next to aiosmtpd 1.4.6, all started first and measured in
one run with interleaved repetitions.

    pip install aiosmtpd==1.4.6        # into the venv that runs the benchmark
    .venv/bin/python bench/smtp_bench.py [--duration 10] [--reps 3] [--clients 50,1]

The load is the native load generator (../shared/bench/loadgen, built offline
on first use, or $LOADGEN): each of C{--clients} connections in a loop does
connect, banner, EHLO, AUTH PLAIN with an initial response, MAIL, RCPT, a
1 KB message, QUIT and waits for the close, over loopback with plaintext AUTH
allowed (C{--smtp-insecure-auth}). The gateway checks C{--auth
memory:daniel:tiger} and commits each message to its spool (message and
metadata, fsynced): one gateway on /dev/shm (tmpfs), one on /var/tmp (disk,
or C{--disk-dir}). aiosmtpd uses an equivalent in-memory authenticator,
C{auth_require_tls=False}, and writes each message to a file on tmpfs
without fsync. C{--floor} adds a bare Twisted server answering the same
dialogue with canned replies (no parsing, auth, spool or log).

Each figure is printed with each process's CPU over the measured window (100%
= one core) and the server's CPU per session; the end prints the medians as
a markdown table. Before measuring, each server must refuse a wrong password
and accept the right one. Runs pause C{--pause} seconds in between so the
TIME_WAIT sockets of one run do not slow the next one's connects. Everything
binds 127.0.0.1, stops by itself (only the processes it started) and removes
its temporary directories.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Sequence

from benchlib import Bench, add_options, free_port, header, mount_type, wait_port

USER, PASSWORD = "daniel", "tiger"

AIOSMTPD_SERVER = textwrap.dedent(
    """
    import asyncio, os, sys, uuid
    from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

    USERS = {b"daniel": b"tiger"}
    spool = sys.argv[2]

    def authenticator(server, session, envelope, mechanism, auth_data):
        ok = isinstance(auth_data, LoginPassword) and USERS.get(auth_data.login) == auth_data.password
        return AuthResult(success=ok)

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            path = os.path.join(spool, uuid.uuid4().hex)
            with open(path, "wb") as f:
                f.write(envelope.original_content)
            return "250 OK"

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SMTP(Handler(), authenticator=authenticator, auth_require_tls=False),
            "127.0.0.1", int(sys.argv[1]), backlog=1024)
        print("ready", flush=True)
        await server.serve_forever()

    asyncio.run(main())
    """
)

# The floor: a Twisted server that answers the same dialogue with canned
# replies and does nothing else (no parsing, auth, spool or log): what a
# one-process Twisted server spends per session before doing any work.
FLOOR_SERVER = textwrap.dedent(
    r"""
    import sys
    from twisted.internet import protocol, reactor

    REPLIES = {b"EHLO": b"250-bench\r\n250 AUTH PLAIN\r\n", b"AUTH": b"235 2.7.0 OK\r\n",
               b"MAIL": b"250 2.1.0 OK\r\n", b"RCPT": b"250 2.1.5 OK\r\n",
               b"DATA": b"354 2.0.0 Go\r\n", b"QUIT": b"221 2.0.0 Bye\r\n"}

    class Canned(protocol.Protocol):
        def connectionMade(self):
            self.buffer, self.data = b"", False
            self.transport.write(b"220 bench ESMTP\r\n")

        def dataReceived(self, data):
            self.buffer += data
            while (end := self.buffer.find(b"\r\n")) >= 0:
                line, self.buffer = self.buffer[:end], self.buffer[end + 2:]
                if self.data:
                    if line == b".":
                        self.data = False
                        self.transport.write(b"250 2.0.0 Queued\r\n")
                    continue
                verb = line[:4].upper()
                self.transport.write(REPLIES.get(verb, b"500 5.5.2 Unknown\r\n"))
                self.data = verb == b"DATA"
                if verb == b"QUIT":
                    self.transport.loseConnection()

    reactor.listenTCP(int(sys.argv[1]), protocol.Factory.forProtocol(Canned), interface="127.0.0.1",
                      backlog=1024)
    reactor.run()
    """
)


def gateway_options(port: int) -> tuple[str, ...]:
    """The gateway's options in every SMTP benchmark: C{memory:} auth, plaintext AUTH, SMTP only."""
    return ("--auth", f"memory:{USER}:{PASSWORD}", "--smtp", f"tcp:{port}:interface=127.0.0.1",
            "--smtp-insecure-auth", "--http", "none", "--socks", "none")


def start_aiosmtpd(bench: Bench) -> tuple[str, int, int]:
    """aiosmtpd with the same user, spooling to the temporary directory: name, port, pid."""
    try:
        import aiosmtpd
    except ImportError:
        raise SystemExit("pip install aiosmtpd==1.4.6 into this venv") from None
    port = free_port()
    spool = os.path.join(bench.tmp, "aio")
    os.makedirs(spool, exist_ok=True)
    proc = bench.start([sys.executable, "-W", "ignore", "-c", AIOSMTPD_SERVER, str(port), spool])
    wait_port(port, proc)
    return f"aiosmtpd {aiosmtpd.__version__}", port, proc.pid


def measure(bench: Bench, name: str, port: int, pid: int, count: int,
            aux: Sequence[int] = (), column: str | None = None) -> None:
    """
    One run of C{count} clients' sessions against the server C{pid}
    (C{aux}: more processes whose CPU to show, a Redis say), recorded
    under C{name} and C{column}, then the pause for its TIME_WAIT sockets.
    """
    result, _ = bench.run(
        "smtp", f"127.0.0.1:{port}", "-c", count, "-d", bench.args.duration,
        "--warmup", 1, "--user", USER, "--pass", PASSWORD, "--server-pid", pid,
        *(("--aux-pid", ",".join(map(str, aux))) if aux else ()),
        timeout=bench.args.duration + 60)
    errors = result["proto_errors"] + result["io_errors"] + result["connect_errors"]
    note = f"   {errors} errors! {result['error_samples'][:1]}" if errors else ""
    column = column or f"sessions/s, {count} client{'s' if count > 1 else ''}"
    bench.record(name, column, result["rate_per_s"], result, "session", note)
    # Fewer sessions leave fewer TIME_WAIT sockets: a shorter pause.
    bench.rest(min(1.0, result["ok"] / 10000))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_options(parser)
    parser.add_argument("--clients", default="50,1",
                        help="comma-separated connection counts (default %(default)s)")
    parser.add_argument("--disk-dir", default="/var/tmp",
                        help="where the on-disk spool goes (default %(default)s)")
    parser.add_argument("--floor", action="store_true",
                        help="also measure a bare Twisted server with canned replies")
    parser.add_argument("--baseline", metavar="TREE",
                        help="also measure the gateway of another checkout (spool on tmpfs),"
                             " e.g. a `git worktree add --detach /tmp/old REV`")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    with Bench(args, "smtp-bench") as bench:
        disk = bench.tempdir(args.disk_dir)
        servers: list[tuple[str, int, int, bool]] = []  # name, port, pid, is the floor

        def gateway(name: str, data_dir: str, tree: str | None = None) -> None:
            port = free_port()
            # Another checkout's code first on the path; started outside any
            # checkout, so that the editable install does not win.
            env = dict(os.environ, PYTHONPATH=os.path.abspath(tree)) if tree else None
            proc = bench.gateway(name, *gateway_options(port), data_dir=data_dir, env=env,
                                 cwd=bench.tmp if tree else None)
            wait_port(port, proc)
            servers.append((name, port, proc.pid, False))

        gateway(f"authgateway, spool {mount_type(bench.tmp)}", os.path.join(bench.tmp, "gw"))
        gateway(f"authgateway, spool {mount_type(disk)}", os.path.join(disk, "gw"))
        if args.baseline:
            gateway(f"baseline {os.path.basename(os.path.abspath(args.baseline))},"
                    f" spool {mount_type(bench.tmp)}", os.path.join(bench.tmp, "base"),
                    args.baseline)
        servers.append((*start_aiosmtpd(bench), False))
        if args.floor:
            port = free_port()
            proc = bench.start([sys.executable, "-c", FLOOR_SERVER, str(port)])
            wait_port(port, proc)
            servers.append(("bare Twisted (floor)", port, proc.pid, True))
        for name, port, _, floor in servers:
            bench.check_login(name, ("smtp", f"127.0.0.1:{port}", "--user", USER), PASSWORD,
                              refuses_wrong=not floor)

        header("SMTP AUTH sessions", args)
        print("session: connect, banner, EHLO, AUTH PLAIN, MAIL, RCPT, 1 KB DATA, QUIT, close")
        for rep in range(args.reps):
            print(f"repetition {rep + 1}", flush=True)
            for count in clients:
                for name, port, pid, _ in servers:
                    measure(bench, name, port, pid, count)
        aio = next(name for name, *_ in servers if name.startswith("aiosmtpd"))
        ours = [name for name, *_ in servers if not name.startswith(("aiosmtpd", "bare"))]
        bench.summary([(name, aio) for name in ours])


if __name__ == "__main__":
    main()
