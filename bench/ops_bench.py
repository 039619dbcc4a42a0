"""
What metrics and the audit log cost: the same gateway with and without
C{--metrics} and C{--audit-log}, on the SMTP and HTTP workloads, measured in
one run with interleaved repetitions (the order alternates each repetition).

    .venv/bin/python bench/ops_bench.py [--duration 10] [--reps 5] [--clients 50]

Two gateways run side by side under twistd, each with its own log file (one
auth event per login, as in production), an htpasswd file holding one
C{{SHA}} user (the cheapest hash: the per-login cost of metrics and audit is
then the largest share it can be) and C{--smtp-insecure-auth} on loopback:

- "ops off": neither option.
- "ops on": C{--metrics tcp:PORT} (scraped once a second during its runs, more
  often than any Prometheus does) and C{--audit-log FILE} on the same tmpfs
  as the spool: one JSON line per login and per authorization decision.
- with C{--split}, also "metrics only" and "audit only".

SMTP: the native load generator (../shared/bench/loadgen, or $LOADGEN) with
C{--clients} connections, each doing connect, EHLO, AUTH PLAIN, MAIL, RCPT,
1 KB DATA, QUIT. HTTP: C{wrk -t1 -c50} over keep-alive, C{GET /whoami} with
Basic (a cache hit per request, so every request is a login and an audit
line) under the load generator's C{exec}. Each figure is printed with every
process's CPU; the end prints the medians and the on/off ratios. Everything
binds 127.0.0.1, stops by itself and removes its temporary directory.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import re
import threading
import urllib.request

from benchlib import Bench, add_options, free_port, header, need_tools, wait_port

USER, PASSWORD = "sha", "sha-password"
SMTP, HTTP = "sessions/s, SMTP", "req/s, HTTP Basic"


def scrape(port: int, stop: threading.Event, counts: list[int]) -> None:
    """GET /metrics once a second until C{stop}."""
    while not stop.wait(1.0):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            r.read()
        counts[0] += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_options(parser, reps=5, pause=10)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--split", action="store_true",
                        help="also run a gateway with metrics only and one with the audit log only")
    args = parser.parse_args()
    need_tools(("wrk", "wrk"))
    with Bench(args, "ops-bench") as bench:
        htpasswd = os.path.join(bench.tmp, "users.htpasswd")
        digest = base64.b64encode(hashlib.sha1(PASSWORD.encode()).digest()).decode()
        with open(htpasswd, "w") as f:
            f.write(f"{USER}:{{SHA}}{digest}\n")
        servers = []  # name, smtp port, http port, pid, metrics port
        names = ["ops off", "ops on"] + (["metrics only", "audit only"] if args.split else [])
        for name in names:
            smtp, http = free_port(), free_port()
            extra: list[str] = []
            metrics = None
            if name in ("ops on", "metrics only"):
                metrics = free_port()
                extra += ["--metrics", f"tcp:{metrics}:interface=127.0.0.1"]
            if name in ("ops on", "audit only"):
                slug = name.replace(" ", "-")
                extra += ["--audit-log", os.path.join(bench.tmp, f"{slug}.audit.log")]
            proc = bench.gateway(
                name, "--auth", f"htpasswd:{htpasswd}", "--smtp-insecure-auth",
                "--smtp", f"tcp:{smtp}:interface=127.0.0.1",
                "--http", f"tcp:{http}:interface=127.0.0.1", "--socks", "none", *extra)
            wait_port(smtp, proc)
            wait_port(http, proc)
            if metrics:
                wait_port(metrics, proc)
            servers.append((name, smtp, http, proc.pid, metrics))
            bench.check_login(name, ("smtp", f"127.0.0.1:{smtp}", "--user", USER), PASSWORD)
        authorization = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

        header("metrics and audit log, on vs off", args)
        print(f"SMTP: {args.clients} clients, AUTH PLAIN + 1 KB message per session;"
              " HTTP: wrk -t1 -c50 GET /whoami, Basic, keep-alive")
        for rep in range(args.reps):
            print(f"repetition {rep + 1}", flush=True)
            order = servers if rep % 2 == 0 else servers[::-1]
            for workload in (SMTP, HTTP):
                for name, smtp, http, pid, metrics in order:
                    stop, scrapes = threading.Event(), [0]
                    scraper = None
                    if metrics:
                        scraper = threading.Thread(target=scrape, args=(metrics, stop, scrapes))
                        scraper.start()
                    try:
                        if workload == SMTP:
                            result, _ = bench.run(
                                "smtp", f"127.0.0.1:{smtp}", "-c", args.clients, "-d",
                                args.duration, "--warmup", 1, "--user", USER, "--pass",
                                PASSWORD, "--server-pid", pid, timeout=args.duration + 60)
                            value = result["rate_per_s"]
                            errors = (result["proto_errors"] + result["io_errors"]
                                      + result["connect_errors"])
                            note = f"   {errors} errors!" if errors else ""
                        else:
                            result, out = bench.run(
                                "exec", "--server-pid", pid, "--", "wrk", "-t1", "-c50",
                                f"-d{args.duration:g}s", "--timeout", "10s",
                                "-H", f"Authorization: {authorization}",
                                f"http://127.0.0.1:{http}/whoami", timeout=args.duration + 60)
                            rate = re.search(r"Requests/sec:\s*([\d.]+)", out)
                            if result["exit"] != 0 or rate is None:
                                raise SystemExit(f"wrk failed:\n{out}")
                            value = float(rate.group(1))
                            bad = re.search(r"Non-2xx or 3xx responses:.*", out)
                            note = f"   {bad.group(0)}!" if bad else ""
                    finally:
                        stop.set()
                        if scraper is not None:
                            scraper.join()
                    if metrics:
                        note += f"   ({scrapes[0]} scrapes)"
                    bench.record(name, workload, value, result,
                                 "session" if workload == SMTP else "req", note)
                    if workload == SMTP:
                        bench.rest(min(1.0, result["ok"] / 10000))
        audit = os.path.join(bench.tmp, "ops-on.audit.log")
        if os.path.exists(audit):
            with open(audit, "rb") as f:
                lines = sum(1 for _ in f)
            print(f"\naudit log of ops on: {lines:,} lines, {os.path.getsize(audit):,} bytes")
        bench.summary([(name, "ops off") for name in names[1:]])


if __name__ == "__main__":
    main()
