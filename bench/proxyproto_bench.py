"""
What C{--proxy-protocol-from} costs the gateway: three gateways behind one
HAProxy (C{mode tcp}), measured in one run with interleaved repetitions
(the order alternates each repetition).

    .venv/bin/python bench/proxyproto_bench.py [--duration 10] [--reps 5] [--clients 50]

- "off": no C{--proxy-protocol-from}; HAProxy sends no header.
- "header": C{--proxy-protocol-from 127.0.0.1/32}; HAProxy C{send-proxy-v2}
  (each connection is parsed, then handed to the front door).
- "guard": C{--proxy-protocol-from 192.0.2.1/32} (HAProxy is not a trusted
  proxy); no header: each connection's first bytes are checked for a
  signature.

HAProxy is in every path, so the difference is the gateway's own. SMTP: the
native load generator (../shared/bench/loadgen, or $LOADGEN) with
C{--clients} connections each doing connect, EHLO, AUTH PLAIN, MAIL, RCPT,
1 KB DATA, QUIT (the per-connection cost). SOCKS: C{--bulk-mib} MiB through
one tunnel to the sink's discard port (the per-byte cost). Each figure is
printed with every process's CPU; the end prints the medians and the ratios
to "off". Everything binds 127.0.0.1, stops by itself (only the processes it
started) and removes its temporary directory.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import textwrap

from benchlib import Bench, add_options, free_port, header, need_tools, version, wait_port

USER, PASSWORD = "daniel", "tiger"
SMTP, BULK = "sessions/s, SMTP", "MiB/s, SOCKS 1 tunnel"
BULK_MAX_SECONDS = 120
MODES = {  # name: (--proxy-protocol-from, HAProxy server option)
    "off": (None, ""),
    "header": ("127.0.0.1/32", "send-proxy-v2"),
    "guard": ("192.0.2.1/32", ""),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_options(parser, reps=5, pause=10)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--bulk-mib", type=int, default=2048)
    args = parser.parse_args()
    need_tools(("haproxy", "haproxy"))
    with Bench(args, "proxyproto-bench") as bench:
        echo, discard = free_port(), free_port()
        sink = bench.sink(echo, discard)
        servers = []  # name, smtp front, socks front, pid
        routes = []
        for name, (networks, option) in MODES.items():
            smtp, socks = free_port(), free_port()
            extra = ["--proxy-protocol-from", networks] if networks else []
            proc = bench.gateway(
                name, "--auth", f"memory:{USER}:{PASSWORD}", "--smtp-insecure-auth",
                "--smtp", f"tcp:{smtp}:interface=127.0.0.1", "--http", "none",
                "--socks", f"tcp:{socks}:interface=127.0.0.1", "--socks-allow", "127.0.0.1",
                *extra)
            wait_port(smtp, proc)
            wait_port(socks, proc)
            fronts = free_port(), free_port()
            for door, front, back in (("smtp", fronts[0], smtp), ("socks", fronts[1], socks)):
                routes.append(f"""\
                    frontend {door}_{name}
                        bind 127.0.0.1:{front}
                        default_backend {door}_{name}
                    backend {door}_{name}
                        server gw 127.0.0.1:{back} {option}
                    """)
            servers.append((name, fronts[0], fronts[1], proc.pid))
        config = os.path.join(bench.tmp, "haproxy.cfg")
        with open(config, "w") as f:
            f.write(textwrap.dedent("""\
                global
                    maxconn 4000
                defaults
                    mode tcp
                    timeout connect 5s
                    timeout client 5m
                    timeout server 5m
                """) + "".join(textwrap.dedent(r) for r in routes))
        check = subprocess.run(["haproxy", "-c", "-f", config], capture_output=True, text=True,
                               check=False)
        if check.returncode:
            raise SystemExit(f"haproxy -c:\n{check.stdout}{check.stderr}")
        haproxy = bench.start(["haproxy", "-db", "-f", config], log="haproxy.log")
        for _, smtp, socks, _ in servers:
            wait_port(smtp, haproxy)
            wait_port(socks, haproxy)
        wait_port(discard, sink)
        for name, smtp, _, _ in servers:
            bench.check_login(name, ("smtp", f"127.0.0.1:{smtp}", "--user", USER), PASSWORD)

        header(f"PROXY protocol behind HAProxy {version('haproxy')}", args)
        print(f"SMTP: {args.clients} clients, AUTH PLAIN + 1 KB message per session;"
              f" SOCKS: {args.bulk_mib} MiB through one tunnel")
        for rep in range(args.reps):
            print(f"repetition {rep + 1}", flush=True)
            order = servers if rep % 2 == 0 else servers[::-1]
            for name, smtp, _, pid in order:
                result, _ = bench.run(
                    "smtp", f"127.0.0.1:{smtp}", "-c", args.clients, "-d", args.duration,
                    "--warmup", 1, "--user", USER, "--pass", PASSWORD, "--server-pid", pid,
                    "--aux-pid", haproxy.pid, timeout=args.duration + 60)
                errors = result["proto_errors"] + result["io_errors"] + result["connect_errors"]
                note = f"   {errors} errors!" if errors else ""
                bench.record(name, SMTP, result["rate_per_s"], result, "session", note)
                bench.rest(min(1.0, result["ok"] / 10000))
            for name, _, socks, pid in order:
                result, _ = bench.run(
                    "socks-bulk", f"127.0.0.1:{socks}", "--target", f"127.0.0.1:{discard}",
                    "--mib", args.bulk_mib, "-p", 1, "--max-seconds", BULK_MAX_SECONDS,
                    "--user", USER, "--pass", PASSWORD, "--server-pid", pid,
                    "--aux-pid", haproxy.pid, timeout=BULK_MAX_SECONDS + 30)
                note = (f"   {result['errors']} errors (time limit?): not counted"
                        if result["errors"] else "")
                bench.record(name, BULK, result["mib_per_s"], result, "MiB", note,
                             keep=not result["errors"])
        bench.summary([("header", "off"), ("guard", "off")])


if __name__ == "__main__":
    main()
