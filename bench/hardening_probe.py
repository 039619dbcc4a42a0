"""
Two denial-of-service probes of issue 11 against a real C{twistd authgateway}
on loopback, for this tree or another one (an older commit's work tree, to
compare in the same run):

- never-reads: one client sends EHLO lines (up to --mib MiB, 20 s at most)
  and never reads; the gateway's RSS before and after, and whether another
  client still gets its greeting.
- burst: --connects simultaneous connects to the SMTP port; how many got no
  greeting within 0.9 s (their SYN was dropped and waits for a retry) and
  how much the kernel's ListenOverflows counter grew.

    .venv/bin/python bench/hardening_probe.py [--tree DIR ...]

A tree is used through PYTHONPATH with this venv's Twisted and packages.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from benchlib import free_port, wait_port

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def start(tree: str, port: int, directory: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "authgateway", "--data-dir", os.path.join(directory, "data"),
         "--auth", "memory:daniel:tiger", "--smtp", f"tcp:{port}:interface=127.0.0.1",
         "--http", "none", "--socks", "none"],
        cwd=directory, env=dict(os.environ, PYTHONPATH=tree),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_port(port, proc)
    time.sleep(0.5)
    return proc


def rss_mb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) // 1024
    return -1


def listen_overflows() -> int:
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    names, values = lines[0].split(), lines[1].split()
    return int(values[names.index("ListenOverflows")])


def never_reads(proc: subprocess.Popen, port: int, mib: int) -> str:
    before = rss_mb(proc.pid)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(3)
    chunk = (b"EHLO " + b"x" * 60 + b"\r\n") * 1000
    sent, started = 0, time.monotonic()
    try:
        while sent < mib * 1024 * 1024 and time.monotonic() - started < 20:
            sock.sendall(chunk)
            sent += len(chunk)
    except OSError:  # stalled (the gateway stopped reading) or closed
        pass
    time.sleep(1)
    after = rss_mb(proc.pid)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as other:
            greeting = other.recv(100)[:3].decode()
    except OSError as e:
        greeting = type(e).__name__
    sock.close()
    return (f"sent {sent / 1048576:.1f} MiB without reading; RSS {before} -> {after} MB;"
            f" another client got {greeting}")


def burst(port: int, connects: int) -> str:
    before = listen_overflows()
    socks = []
    for _ in range(connects):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        socks.append(s)
    pending = {s.fileno(): s for s in socks}
    deadline = time.monotonic() + 0.9
    while pending and time.monotonic() < deadline:
        readable, _, _ = select.select(list(pending.values()), [], [], 0.05)
        for s in readable:  # a greeting: 220, or 421 past the per-peer cap
            pending.pop(s.fileno(), None)
    grown = listen_overflows() - before
    for s in socks:
        s.close()
    return (f"{connects} simultaneous connects: {len(pending)} without a greeting after 0.9 s;"
            f" ListenOverflows +{grown}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", help="a work tree (default: this one)")
    parser.add_argument("--mib", type=int, default=20)
    parser.add_argument("--connects", type=int, default=200)
    args = parser.parse_args()
    for tree in args.tree or [HERE]:
        for probe in ("never-reads", "burst"):
            directory = tempfile.mkdtemp()
            port = free_port()
            proc = start(tree, port, directory)
            try:
                result = never_reads(proc, port, args.mib) if probe == "never-reads" else \
                    burst(port, args.connects)
            finally:
                proc.terminate()
                proc.wait()
                shutil.rmtree(directory)
            print(f"{tree} {probe}: {result}", flush=True)


if __name__ == "__main__":
    main()
