"""
Submission with relaying on: messages per second submitted and relayed,
queue depth over time, and the end-to-end latency from the client's C{250}
to the sink's receipt, with an aiosmtpd 1.4.6 sink as the smarthost.

    pip install aiosmtpd==1.4.6        # into the venv that runs the benchmark
    .venv/bin/python bench/relay_bench.py [--duration 10] [--reps 3] [--clients 50]

The load is the native load generator (../shared/bench/loadgen): each of
C{--clients} connections in a loop does connect, banner, EHLO, AUTH PLAIN, MAIL,
RCPT, a 1 KB message, QUIT, over loopback with plaintext AUTH allowed. The
gateway (spool on tmpfs, or C{--disk-dir}) relays every message to the sink
(C{--relay smtp://127.0.0.1:PORT?tls=none}, C{--relay-connections}), which
counts what arrives and when (it offers PIPELINING, as Postfix does, unless
C{--sink-pipelining off}). While the load runs:

- the queue depth (complete messages in the spool) is sampled every 0.25 s;
- a probe submits one message every C{--probe-interval} seconds with smtplib
  (a header C{X-Probe: N}) and notes when its C{250} came; the sink notes
  when that message arrived. Their difference is the end-to-end latency.
  The probe adds a few messages per second: it does not load the gateway.

A second gateway without C{--relay} (it keeps what it accepts) takes the
same load in turn: the gateway's own submission rate, in the same run.

After the load stops the queue must drain (bounded by C{--drain-timeout});
"relayed/s" counts the messages the sink received from the start of the load
until the queue was empty, over that time. Each run prints each process's CPU
(gateway, loadgen, sink) as the other benchmarks do. Everything binds
127.0.0.1, stops by itself and removes its temporary directories.
"""

from __future__ import annotations

import argparse
import os
import smtplib
import statistics
import sys
import textwrap
import threading
import time
from typing import Any

from benchlib import Bench, add_options, free_port, header, mount_type, wait_port

USER, PASSWORD = "daniel", "tiger"

# The smarthost: aiosmtpd with a handler that appends "receipt-time probe-or-dash"
# per message to a file (line-buffered; the benchmark reads it afterwards).
SINK = textwrap.dedent(
    r"""
    import asyncio, re, sys, time
    from aiosmtpd.smtp import SMTP

    log = open(sys.argv[2], "a", buffering=1)
    PROBE = re.compile(rb"^X-Probe: (\S+)\r?$", re.M)
    PIPELINING = sys.argv[3] == "1"

    class Handler:
        async def handle_EHLO(self, server, session, envelope, hostname, responses):
            session.host_name = hostname
            if PIPELINING:  # as Postfix does; aiosmtpd reads a command at a time either way
                responses.insert(1, "250-PIPELINING")
            return responses

        async def handle_DATA(self, server, session, envelope):
            now = time.time()
            head = envelope.original_content.split(b"\r\n\r\n", 1)[0]
            probe = PROBE.search(head)
            log.write(f"{now:.6f} {probe.group(1).decode() if probe else '-'} {len(envelope.rcpt_tos)}\n")
            return "250 2.0.0 OK"

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: SMTP(Handler()), "127.0.0.1", int(sys.argv[1]),
                                          backlog=1024)
        print("ready", flush=True)
        await server.serve_forever()

    asyncio.run(main())
    """
)


def queue_depth(spool: str) -> int:
    try:
        return sum(1 for name in os.listdir(spool) if name.endswith(".json") and name[0] != ".")
    except OSError:
        return 0


class Sampler(threading.Thread):
    """Queue depth every 0.25 s while running."""

    def __init__(self, spool: str) -> None:
        super().__init__(daemon=True)
        self.spool = spool
        self.samples: list[tuple[float, int]] = []
        self.running = True

    def run(self) -> None:
        start = time.monotonic()
        while self.running:
            self.samples.append((time.monotonic() - start, queue_depth(self.spool)))
            time.sleep(0.25)


class Probe(threading.Thread):
    """One message every C{interval} seconds; C{sent[n]} is when probe n got its 250."""

    def __init__(self, port: int, interval: float, tag: str) -> None:
        super().__init__(daemon=True)
        self.port, self.interval, self.tag = port, interval, tag
        self.sent: dict[str, float] = {}
        self.errors = 0
        self.running = True
        self.number = 0

    def run(self) -> None:
        while self.running:
            self.number += 1
            probe = f"{self.tag}{self.number}"
            message = (f"From: {USER}@example.com\r\nTo: sink@example.net\r\nX-Probe: {probe}\r\n"
                       f"Subject: probe {probe}\r\n\r\nprobe\r\n")
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as client:
                    client.login(USER, PASSWORD)
                    client.sendmail(f"{USER}@example.com", ["sink@example.net"], message)
                    self.sent[probe] = time.time()
            except (OSError, smtplib.SMTPException):
                self.errors += 1
            time.sleep(self.interval)


def received(log: str) -> list[tuple[float, str]]:
    try:
        with open(log) as f:
            return [(float(t), p) for t, p, _ in (line.split() for line in f if line.strip())]
    except FileNotFoundError:
        return []


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_options(parser)
    parser.add_argument("--clients", type=int, default=50, help="connections (default %(default)s)")
    parser.add_argument("--relay-connections", type=int, default=4,
                        help="the gateway's --relay-connections (default %(default)s)")
    parser.add_argument("--disk-dir", default=None,
                        help="put the spool on this directory's file system (default: tmpfs)")
    parser.add_argument("--probe-interval", type=float, default=0.1)
    parser.add_argument("--sink-pipelining", choices=("on", "off"), default="on",
                        help="whether the sink offers PIPELINING, as Postfix does (default %(default)s)")
    parser.add_argument("--drain-timeout", type=float, default=120)
    args = parser.parse_args()
    try:
        import aiosmtpd
    except ImportError:
        raise SystemExit("pip install aiosmtpd==1.4.6 into this venv") from None
    with Bench(args, "relay-bench") as bench:
        base = bench.tempdir(args.disk_dir) if args.disk_dir else bench.tmp
        sink_port, smtp_port = free_port(), free_port()
        sink_log = os.path.join(bench.tmp, "sink.log")
        sink = bench.start([sys.executable, "-W", "ignore", "-c", SINK, str(sink_port), sink_log,
                            "1" if args.sink_pipelining == "on" else "0"])
        wait_port(sink_port, sink)
        data_dir = os.path.join(base, "gw")
        spool = os.path.join(data_dir, "spool")

        def gateway(name: str, port: int, data_dir: str, *extra: str) -> Any:
            proc = bench.gateway(
                name, "--auth", f"memory:{USER}:{PASSWORD}",
                "--smtp", f"tcp:{port}:interface=127.0.0.1", "--smtp-insecure-auth",
                "--smtp-max-connections-per-peer", "1000", "--http", "none", "--socks", "none",
                *extra, data_dir=data_dir)
            wait_port(port, proc)
            bench.check_login(name, ("smtp", f"127.0.0.1:{port}", "--user", USER), PASSWORD)
            return proc

        relaying = gateway("authgateway, relay on", smtp_port, data_dir,
                           "--relay", f"smtp://127.0.0.1:{sink_port}?tls=none",
                           "--relay-connections", str(args.relay_connections))
        # The same gateway keeping what it accepts (no --relay): its own submission rate.
        plain_port = free_port()
        plain = gateway("authgateway, relay off", plain_port, os.path.join(base, "plain"))
        header("Submission with relaying", args)
        print(f"gateway spool on {mount_type(spool)}, aiosmtpd {aiosmtpd.__version__} sink "
              f"(PIPELINING {args.sink_pipelining}), "
              f"{args.clients} clients, --relay-connections {args.relay_connections}")
        for rep in range(args.reps):
            print(f"repetition {rep + 1}", flush=True)
            before = len(received(sink_log))
            sampler, probe = Sampler(spool), Probe(smtp_port, args.probe_interval, f"r{rep}p")
            start = time.time()
            sampler.start()
            probe.start()
            result, _ = bench.run(
                "smtp", f"127.0.0.1:{smtp_port}", "-c", args.clients, "-d", args.duration,
                "--warmup", 0, "--user", USER, "--pass", PASSWORD,
                "--server-pid", relaying.pid, "--aux-pid", sink.pid, timeout=args.duration + 60)
            probe.running = False
            load_end, depth_at_end = time.time(), queue_depth(spool)
            deadline = time.monotonic() + args.drain_timeout
            while queue_depth(spool) and time.monotonic() < deadline:
                time.sleep(0.1)
            drained = time.time()
            sampler.running = False
            probe.join(timeout=35)
            sampler.join(timeout=5)
            left = queue_depth(spool)
            got = received(sink_log)[before:]
            relayed = len(got)
            latencies = [t - probe.sent[p] for t, p in got if p in probe.sent]
            errors = result["proto_errors"] + result["io_errors"] + result["connect_errors"]
            note = f"   {errors} errors! {result['error_samples'][:1]}" if errors else ""
            bench.record("authgateway, relay on", "submitted/s", result["rate_per_s"], result,
                         "message", note)
            depths = [d for _, d in sampler.samples]
            relay_rate = relayed / (drained - start) if drained > start else 0.0
            bench.rows.setdefault(("authgateway, relay on", "relayed/s"), []).append(
                dict(result, value=relay_rate, unit="message"))
            print(f"  relayed {relayed} ({relay_rate:,.0f}/s from the start until the queue was"
                  f" empty, {drained - load_end:.1f} s after the load), {left} left in the queue;"
                  f" loadgen counted {result['ok']} sessions in its window (those in flight at its"
                  f" end were relayed too), the probe {len(probe.sent)}")
            print(f"  queue depth: max {max(depths, default=0)}, median {statistics.median(depths or [0])},"
                  f" at the end of the load {depth_at_end};"
                  " every second: " + " ".join(str(d) for t, d in sampler.samples[::4]))
            if latencies:
                print(f"  end-to-end latency ({len(latencies)} probes, {probe.errors} probe errors):"
                      f" p50 {percentile(latencies, 0.5) * 1000:,.1f} ms,"
                      f" p99 {percentile(latencies, 0.99) * 1000:,.1f} ms,"
                      f" max {max(latencies) * 1000:,.1f} ms", flush=True)
            bench.rest(min(1.0, result["ok"] / 10000))
            result, _ = bench.run(
                "smtp", f"127.0.0.1:{plain_port}", "-c", args.clients, "-d", args.duration,
                "--warmup", 0, "--user", USER, "--pass", PASSWORD, "--server-pid", plain.pid,
                timeout=args.duration + 60)
            bench.record("authgateway, relay off", "submitted/s", result["rate_per_s"], result,
                         "message")
            bench.rest(min(1.0, result["ok"] / 10000))
        bench.summary([("authgateway, relay on", "authgateway, relay off")])


if __name__ == "__main__":
    main()
