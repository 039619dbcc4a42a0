"""
SOCKS5 sessions per second and bulk throughput: the gateway next to Dante
(danted) and microsocks, all with username/password (RFC 1929) logins, all
started first and measured in one run with interleaved repetitions.

    .venv/bin/python bench/socks_bench.py [--duration 10] [--reps 3] [--pause 65] [--clients 50]
        [--bulk-mib 2048] [--baseline TREE]

Needs C{danted} and C{microsocks} (Debian packages dante-server, microsocks)
and root: Dante's C{username} method checks a system user, so the benchmark
creates a throwaway one (C{authgw-bench}, no home, no shell) and deletes it at
the end. Its password is SHA-512-crypt with 1000 rounds, the cheapest hash
the shadow tools write (Debian's default, yescrypt, costs Dante tens of
milliseconds per login); the gateway checks C{--auth memory:daniel:tiger},
microsocks its C{-u}/C{-P} pair, neither hashes.

The load is the native load generator (../shared/bench/loadgen, built offline
on first use, or $LOADGEN), and its C{sink} is the target:

- C{sessions}: C{--clients} connections, each in a loop: connect, greeting,
  RFC 1929 login, CONNECT to the sink's echo port, 64 bytes echoed, close.
  Runs pause C{--pause} seconds (default 65) in between, longer than
  Linux keeps a socket in TIME_WAIT (60 s), so that every run starts with
  none: Dante binds its outbound socket before connecting (C{bind} to the
  C{external} address, port 0), a port search that slows down as TIME_WAIT
  sockets pile up; the gateway and microsocks just connect.
- C{bulk}: C{--bulk-mib} MiB from the load generator to the sink's discard
  port through 1 tunnel, then split over 4 concurrent tunnels (a run that
  takes more than two minutes fails and is not counted); C{direct-bulk}, the same bytes with
  no proxy, is the physical reference.

The gateway runs under twistd (one reactor thread; C{--smtp none --http
none}, C{--socks-allow 127.0.0.1}; every client is 127.0.0.1, so its
per-address session and pending-login bounds are raised; one C{socks
session} log event per session to its log file, as in production); Dante
with its default processes; microsocks with a thread per client. Before
measuring, each server must refuse a wrong password and give the right one
an echoing tunnel. Each figure is printed with each process's CPU over the
measured window (100% = one core; Dante's children count as the server) and
the end prints the medians as a markdown table. Everything binds 127.0.0.1,
stops by itself (only the processes it started), removes its temporary
directory and the throwaway user.
"""

from __future__ import annotations

import argparse
import os
import pwd
import subprocess
import textwrap
from collections.abc import Sequence

from benchlib import Bench, add_options, free_port, header, need_tools, version, wait_port

USER, PASSWORD = "daniel", "tiger"
SYSTEM_USER, SYSTEM_PASSWORD = "authgw-bench", "bench-password-1928"
BULK_MAX_SECONDS = 120  # a bulk run moves its MiB or fails

DANTE_CONF = textwrap.dedent(
    """\
    logoutput: stderr
    internal: 127.0.0.1 port = {port}
    external: 127.0.0.1
    clientmethod: none
    socksmethod: username
    user.privileged: root
    user.unprivileged: root
    client pass {{
        from: 127.0.0.0/8 to: 0.0.0.0/0
    }}
    socks pass {{
        from: 127.0.0.0/8 to: 0.0.0.0/0
    }}
    """
)


def add_system_user(user: str = SYSTEM_USER) -> None:
    """The throwaway system user Dante checks, with a cheap SHA-512-crypt password."""
    try:
        pwd.getpwnam(user)
    except KeyError:
        pass
    else:
        raise SystemExit(f"user {user} exists (a previous run?): userdel {user}")
    subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", user], check=True)
    subprocess.run(["chpasswd", "-c", "SHA512", "-s", "1000"],
                   input=f"{user}:{SYSTEM_PASSWORD}\n", text=True, check=True)


def gateway_options(port: int) -> tuple[str, ...]:
    """
    The gateway's options in every SOCKS benchmark: SOCKS only, loopback
    destinations allowed, and the per-address bounds raised (every client
    is 127.0.0.1).
    """
    return ("--auth", f"memory:{USER}:{PASSWORD}",
            "--socks", f"tcp:{port}:interface=127.0.0.1", "--socks-allow", "127.0.0.1",
            "--socks-max-sessions-per-peer", "100000", "--socks-max-sessions-per-user",
            "100000", "--socks-max-pending-logins-per-peer", "1024",
            "--socks-max-pending-logins-per-network", "1024", "--smtp", "none",
            "--http", "none")


def start_dante(bench: Bench, user: str = SYSTEM_USER) -> tuple[str, int, int, str, str]:
    """danted with its default processes, logins checked against C{user}: name, port, pid, user, password."""
    port = free_port()
    conf = os.path.join(bench.tmp, "danted.conf")
    with open(conf, "w") as f:
        f.write(DANTE_CONF.format(port=port))
    proc = bench.start(["danted", "-f", conf, "-p", os.path.join(bench.tmp, "danted.pid")],
                       log="danted.log")
    wait_port(port, proc)
    return f"Dante {version('dante-server')}", port, proc.pid, user, SYSTEM_PASSWORD


def measure_sessions(bench: Bench, name: str, port: int, pid: int, user: str, password: str,
                     echo: int, aux: Sequence[int], clients: int, pause: float | None = None,
                     column: str | None = None) -> None:
    """
    One sessions run through the proxy C{pid} to the echo port (C{aux}: the
    sink and any other process whose CPU to show), then the pause.
    """
    result, _ = bench.run(
        "socks", f"127.0.0.1:{port}", "--target", f"127.0.0.1:{echo}",
        "-c", clients, "-d", bench.args.duration, "--warmup", 1, "--user", user,
        "--pass", password, "--server-pid", pid, "--aux-pid", ",".join(map(str, aux)),
        timeout=bench.args.duration + 60)
    errors = result["proto_errors"] + result["io_errors"] + result["connect_errors"]
    note = f"   {errors} errors! {result['error_samples'][:1]}" if errors else ""
    bench.record(name, column or f"sessions/s, {clients} clients", result["rate_per_s"], result,
                 "session", note)
    bench.rest(pause=pause)


def measure_bulk(bench: Bench, servers: Sequence[tuple[str, int, int, str, str]], discard: int,
                 sink: int, mib: int, tunnels: int) -> None:
    """C{mib} MiB over C{tunnels} tunnels: straight to the discard port, then through each proxy."""
    column = f"MiB/s, {tunnels} tunnel{'s' if tunnels > 1 else ''}"
    size = ("--mib", mib // tunnels, "-p", tunnels, "--max-seconds", BULK_MAX_SECONDS,
            "--aux-pid", sink)
    result, _ = bench.run("direct-bulk", f"127.0.0.1:{discard}", *size,
                          timeout=BULK_MAX_SECONDS + 30)
    bench.record("direct (no proxy)", column, result["mib_per_s"], result, "MiB")
    for name, port, pid, user, password in servers:
        result, _ = bench.run(
            "socks-bulk", f"127.0.0.1:{port}", "--target", f"127.0.0.1:{discard}", *size,
            "--user", user, "--pass", password, "--server-pid", pid,
            timeout=BULK_MAX_SECONDS + 30)
        note = (f"   {result['errors']} errors (time limit?): not counted"
                if result["errors"] else "")
        bench.record(name, column, result["mib_per_s"], result, "MiB", note,
                     keep=not result["errors"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_options(parser, pause=65)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--bulk-mib", type=int, default=2048,
                        help="MiB per bulk run, split over its tunnels (default %(default)s)")
    parser.add_argument("--baseline", metavar="TREE",
                        help="also run the gateway of another checkout (e.g. a worktree of "
                             "main), first on PYTHONPATH, as a row of its own")
    args = parser.parse_args()
    need_tools(("danted", "dante-server"), ("microsocks", "microsocks"))
    if os.geteuid() != 0:
        raise SystemExit("needs root: Dante's username method checks a system user")
    user_added = False
    try:
        with Bench(args, "socks-bench") as bench:
            add_system_user()
            user_added = True
            echo, discard = free_port(), free_port()
            sink = bench.sink(echo, discard)
            servers: list[tuple[str, int, int, str, str]] = []  # name, port, pid, user, password

            gateways = [("authgateway", "gw", None)]
            if args.baseline:
                tree = os.path.abspath(args.baseline)
                gateways.append((f"authgateway {os.path.basename(tree)}", "gw-baseline",
                                 dict(os.environ, PYTHONPATH=tree)))
            for name, slug, env in gateways:
                port = free_port()
                proc = bench.gateway(slug, *gateway_options(port), env=env)
                wait_port(port, proc)
                servers.append((name, port, proc.pid, USER, PASSWORD))
            servers.append(start_dante(bench))

            port = free_port()
            proc = bench.start(["microsocks", "-i", "127.0.0.1", "-p", str(port), "-u", USER,
                                "-P", PASSWORD])
            wait_port(port, proc)
            servers.append((f"microsocks {version('microsocks')}", port, proc.pid, USER,
                            PASSWORD))
            wait_port(echo, sink)
            wait_port(discard, sink)
            for name, port, _, user, password in servers:
                bench.check_login(name, ("socks", f"127.0.0.1:{port}", "--target",
                                         f"127.0.0.1:{echo}", "--user", user), password)

            header("SOCKS5", args)
            print(f"sessions: {args.clients} clients, greeting, RFC 1929 login, CONNECT, "
                  f"64 bytes echoed, close; bulk: {args.bulk_mib} MiB to a discard sink")
            for rep in range(args.reps):
                print(f"repetition {rep + 1}", flush=True)
                for name, port, pid, user, password in servers:
                    measure_sessions(bench, name, port, pid, user, password, echo, [sink.pid],
                                     args.clients)
                for tunnels in (1, 4):
                    measure_bulk(bench, servers, discard, sink.pid, args.bulk_mib, tunnels)
            ours = servers[0][0]
            bench.summary([(ours, name) for name, *_ in servers[1:]])
    finally:
        if user_added:
            subprocess.run(["userdel", SYSTEM_USER], check=False)


if __name__ == "__main__":
    main()
