"""
Scale-out (issue 15): the gateway with one worker and with two, with local
limits and with its limits in Redis, next to aiosmtpd, Dante and nginx with
one and two workers: every server started first, then every workload in one
run with interleaved repetitions, and the ratios the issue's targets name.

    .venv/bin/pip install aiosmtpd==1.4.6        # the SMTP peer, bench only
    .venv/bin/python bench/scale_bench.py [--duration 10] [--reps 3] [--pause 20]
        [--socks-pause 65] [--only smtp,socks,http,state]

Needs root (Dante's C{username} method checks a throwaway system user,
C{authgw-scale}, deleted at the end), C{redis-server}, C{danted}, C{nginx}
and C{wrk} (Debian packages redis-server, dante-server, nginx, wrk). The
load is the native load generator (../shared/bench/loadgen, built offline on
first use, or $LOADGEN), and wrk run under it for HTTP.

The servers, each front door in a gateway of its own (the options of
C{smtp_bench.py}, C{socks_bench.py} and C{http_bench.py}):

- C{authgateway w1}: one process, limits in the process (C{--state local}).
- C{authgateway w1, redis}: one process, C{--state unix://...} on a
  redis-server the benchmark starts on a UNIX socket in its temporary
  directory (the C{state} comparison).
- C{authgateway w2, redis}: C{--workers 2} (which requires a shared
  C{--state}) on the same Redis, another DB.
- aiosmtpd 1.4.6 (SMTP), Dante (SOCKS, its default processes), nginx with
  C{worker_processes 1} and C{2} on the same htpasswd file (HTTP).

Every client is 127.0.0.1, so each gateway's per-address login limits
(C{--max-failures}, C{--max-peer-failures}, which count attempts in flight
too) are raised as the SOCKS benchmark raises its per-address session
bounds: with the limits in Redis a login is in flight for a round trip,
and fifty clients behind one address are not fifty guessers.

The workloads (C{--only} picks some):

- C{smtp}: sessions/s of C{--clients} SMTP AUTH clients (connect, EHLO,
  AUTH PLAIN, MAIL, RCPT, 1 KB DATA, QUIT) against w1, w2 and aiosmtpd.
- C{socks}: SOCKS5 sessions/s (greeting, RFC 1929 login, CONNECT, 64 bytes
  echoed, close) against w1, w2 and Dante, with C{--socks-pause} between
  runs (Dante binds before it connects, slower with TIME_WAIT sockets
  about); bulk MiB/s through 1 and 4 tunnels, next to no proxy.
- C{http}: C{GET /whoami} req/s with Basic (C{wrk -t1 -c50}, keep-alive) on
  a C{{SHA}} user and a bcrypt cost 10 user (a cache hit for the gateway),
  against w1, w2 and nginx with 1 and 2 workers.
- C{state}: the cost of the limits in Redis on the login-heavy workloads,
  one worker: SMTP sessions (a login each) and HTTP C{{SHA}} requests (a
  login each) on w1 and w1 with Redis.

Without C{--workers} or C{--state} in this checkout the gateways that need
them are left out (said at the start) and the rest is measured. Each figure
is printed with each process's CPU over the measured window (100% = one
core; a server's children included), and, for multi-process servers, the
parent's and each child's apart (nginx's workers, the gateway's workers,
Dante's processes) and Redis's; the end prints the medians as a markdown
table, the ratios, and each target of the issue met or missed. Everything
binds 127.0.0.1, stops by itself (only the processes it started) and
removes its temporary directories and the system user.
"""

from __future__ import annotations

import argparse
import os
import subprocess
from collections.abc import Sequence

import http_bench
import smtp_bench
import socks_bench
from benchlib import (Bench, add_options, free_port, gateway_has, header, need_tools,
                      wait_port, wait_workers)

SECTIONS = ("smtp", "socks", "http", "state")
W1, W1_REDIS, W2_REDIS = "authgateway w1", "authgateway w1, redis", "authgateway w2, redis"
SYSTEM_USER = "authgw-scale"  # not socks_bench's: the two may run at once
# Every client is 127.0.0.1: attempts in flight of one address must not refuse it.
LIMITS = ("--max-failures", "100000", "--max-peer-failures", "100000",
          "--max-user-failures", "100000")


def start_gateway(bench: Bench, name: str, port: int, options: Sequence[str],
                  workers: int) -> int:
    """One gateway, waited for until it (and each of its workers) serves: its pid."""
    log = bench.log_of(name)
    errors = os.path.basename(log) + ".stderr"  # a usage error goes there, not to the log
    proc = bench.gateway(name, *options, *LIMITS, log=errors)
    try:
        wait_port(port, proc)
        if workers > 1:
            wait_workers(proc, workers, log)
    except SystemExit as e:
        tails = []
        for path in (log, os.path.join(bench.tmp, errors)):
            if os.path.exists(path):
                with open(path) as f:
                    tails.append(f.read()[-2000:])
        raise SystemExit(f"{name}: {e}; it said:\n" + "".join(tails)) from None
    return proc.pid


def targets(bench: Bench, rows: Sequence[tuple[str, str, str, str, float]]) -> None:
    """Each target of the issue: the ratio of this run's medians, met or missed."""
    print("Targets (ratios of medians of this run):\n")
    for label, ours, theirs, column, target in rows:
        a, b = bench.median(ours, column), bench.median(theirs, column)
        if a is None or b is None:
            print(f"- {label}: not measured")
            continue
        ratio = a / b
        print(f"- {label}: {ratio:.2f}x ({a:,.0f} / {b:,.0f}; target >= {target:g}x: "
              f"{'met' if ratio >= target else 'MISSED'})")
    print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_options(parser)
    parser.add_argument("--socks-pause", type=float, default=65,
                        help="seconds between SOCKS session runs, longer than TIME_WAIT lasts "
                             "(default %(default)s)")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help="comma-separated workloads (default %(default)s)")
    parser.add_argument("--clients", type=int, default=50,
                        help="SMTP and SOCKS clients (default %(default)s)")
    parser.add_argument("--connections", type=int, default=50,
                        help="wrk connections (default %(default)s)")
    parser.add_argument("--bulk-mib", type=int, default=2048,
                        help="MiB per SOCKS bulk run, split over its tunnels (default %(default)s)")
    args = parser.parse_args()
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    if not only or only - set(SECTIONS):
        parser.error(f"--only takes some of {','.join(SECTIONS)}")
    if "socks" in only:
        need_tools(("danted", "dante-server"))
        if os.geteuid() != 0:
            raise SystemExit("needs root: Dante's username method checks a system user "
                             "(or leave socks out with --only)")
    if only & {"http", "state"}:
        need_tools(("wrk", "wrk"), ("nginx", "nginx"))

    has_state, has_workers = gateway_has("--state"), gateway_has("--workers")
    smtp_on, http_on = bool(only & {"smtp", "state"}), bool(only & {"http", "state"})
    if not has_state:
        print("this checkout has no --state: no gateway with its limits in Redis "
              "(state comparison and --workers 2 left out)")
    elif not has_workers and only - {"state"}:
        print("this checkout has no --workers: no two-worker gateway")
    w1_redis = has_state and "state" in only
    w2 = has_state and has_workers and bool(only - {"state"})
    user_added = False
    try:
        with Bench(args, "scale-bench") as bench:
            bench.aux_label = "sink/Redis"
            redis_pid, state = 0, ""
            if w1_redis or w2:
                redis, socket_path = bench.redis()
                redis_pid, state = redis.pid, f"unix://{socket_path}"
            # name, options, workers, whether its limits are in Redis
            configs = [(W1, ("--workers", "1") if has_workers else (), 1, False)]
            if w1_redis:
                configs.append((W1_REDIS, ("--state", f"{state}?db=1"), 1, True))
            if w2:
                configs.append((W2_REDIS, ("--workers", "2", "--state", f"{state}?db=2"), 2,
                                True))

            # SMTP: (name, port, pid, aux pids)
            smtp: list[tuple[str, int, int, list[int]]] = []
            if smtp_on:
                for name, options, workers, redis_state in configs:
                    if name == W2_REDIS and "smtp" not in only:
                        continue
                    port = free_port()
                    pid = start_gateway(bench, f"{name} smtp", port,
                                        (*smtp_bench.gateway_options(port), *options), workers)
                    smtp.append((name, port, pid, [redis_pid] if redis_state else []))
                if "smtp" in only:
                    smtp.append((*smtp_bench.start_aiosmtpd(bench), []))
                for name, port, *_ in smtp:
                    bench.check_login(name, ("smtp", f"127.0.0.1:{port}", "--user",
                                             smtp_bench.USER), smtp_bench.PASSWORD)

            # SOCKS: (name, port, pid, user, password), and aux pids by name
            socks: list[tuple[str, int, int, str, str]] = []
            socks_aux: dict[str, list[int]] = {}
            dante = ""
            echo = discard = sink_pid = 0
            if "socks" in only:
                socks_bench.add_system_user(SYSTEM_USER)
                user_added = True
                echo, discard = free_port(), free_port()
                sink = bench.sink(echo, discard)
                sink_pid = sink.pid
                for name, options, workers, redis_state in configs:
                    if name == W1_REDIS:
                        continue
                    port = free_port()
                    pid = start_gateway(bench, f"{name} socks", port,
                                        (*socks_bench.gateway_options(port), *options), workers)
                    socks.append((name, port, pid, socks_bench.USER, socks_bench.PASSWORD))
                    socks_aux[name] = [sink_pid, redis_pid] if redis_state else [sink_pid]
                socks.append(socks_bench.start_dante(bench, SYSTEM_USER))
                dante = socks[-1][0]
                socks_aux[dante] = [sink_pid]
                wait_port(echo, sink)
                wait_port(discard, sink)
                for name, port, _, user, password in socks:
                    bench.check_login(name, ("socks", f"127.0.0.1:{port}", "--target",
                                             f"127.0.0.1:{echo}", "--user", user), password)

            # HTTP: (name, port, pid, aux pids, users)
            http: list[tuple[str, int, int, list[int], Sequence[str]]] = []
            nginx: dict[int, str] = {}
            if http_on:
                htpasswd = http_bench.prepare(bench)
                users = list(http_bench.USERS) if "http" in only else ["sha"]
                for name, options, workers, redis_state in configs:
                    if name == W2_REDIS and "http" not in only:
                        continue
                    port = free_port()
                    pid = start_gateway(
                        bench, f"{name} http", port,
                        (*http_bench.gateway_options(port, htpasswd), *options), workers)
                    http.append((name, port, pid, [redis_pid] if redis_state else [],
                                 ["sha"] if name == W1_REDIS else users))
                if "http" in only:
                    for workers in (1, 2):
                        name, port, pid = http_bench.start_nginx(bench, htpasswd, workers)
                        nginx[workers] = name
                        http.append((name, port, pid, [], users))
                for name, port, *_ in http:
                    http_bench.check(name, port)

            header("Scale-out", args)
            for name, options, workers, _ in configs:
                print(f"{name}: {' '.join(options) or 'no --workers, no --state'}; "
                      f"{' '.join(LIMITS)}")
            smtp_column = f"sessions/s, {args.clients} clients"
            socks_column = f"sessions/s, {args.clients} clients"
            for rep in range(args.reps):
                print(f"repetition {rep + 1}", flush=True)
                if smtp:
                    print(" SMTP AUTH sessions", flush=True)
                    for name, port, pid, aux in smtp:
                        smtp_bench.measure(bench, name, port, pid, args.clients, aux,
                                           column="SMTP " + smtp_column)
                if socks:
                    print(" SOCKS5 sessions and bulk", flush=True)
                    for name, port, pid, user, password in socks:
                        socks_bench.measure_sessions(
                            bench, name, port, pid, user, password, echo, socks_aux[name],
                            args.clients, pause=args.socks_pause,
                            column="SOCKS " + socks_column)
                    for tunnels in (1, 4):
                        socks_bench.measure_bulk(bench, socks, discard, sink_pid,
                                                 args.bulk_mib, tunnels)
                for user in (u for u in http_bench.USERS if any(u in row[-1] for row in http)):
                    print(f" HTTP GET /whoami, {http_bench.COLUMNS[user]}", flush=True)
                    for name, port, pid, aux, users in http:
                        if user in users:
                            http_bench.measure(bench, name, port, pid, user, args.connections,
                                               1, aux)

            aio = next((name for name, *_ in smtp if name.startswith("aiosmtpd")), "")
            bench.summary([(W2_REDIS, W1), (W1_REDIS, W1), (W1, aio), (W2_REDIS, aio),
                           (W1, dante), (W2_REDIS, dante), (W1, nginx.get(1, "")),
                           (W2_REDIS, nginx.get(2, ""))])
            sha, bcrypt = http_bench.COLUMNS["sha"], http_bench.COLUMNS["bcrypt"]
            targets(bench, [
                ("SMTP sessions/s, workers 2 / workers 1", W2_REDIS, W1,
                 "SMTP " + smtp_column, 1.6),
                ("HTTP {SHA} req/s, workers 2 / workers 1", W2_REDIS, W1, sha, 1.6),
                ("HTTP bcrypt (cached) req/s, workers 2 / workers 1", W2_REDIS, W1, bcrypt, 1.6),
                ("SOCKS sessions/s, workers 2 / Dante", W2_REDIS, dante,
                 "SOCKS " + socks_column, 1.0),
                ("HTTP {SHA} req/s, workers 1 / nginx 1 worker", W1, nginx.get(1, ""), sha,
                 0.25),
                ("HTTP {SHA} req/s, workers 2 / nginx 2 workers", W2_REDIS, nginx.get(2, ""),
                 sha, 0.25),
                ("SMTP logins/s (a session each), Redis / local, 1 worker", W1_REDIS, W1,
                 "SMTP " + smtp_column, 0.85),
                ("HTTP {SHA} logins/s (a request each), Redis / local, 1 worker", W1_REDIS,
                 W1, sha, 0.85),
            ])
    finally:
        if user_added:
            subprocess.run(["userdel", SYSTEM_USER], check=False)


if __name__ == "__main__":
    main()
