"""
SOCKS5 sessions per second and bulk throughput: the gateway next to Dante
(danted) and microsocks, all with username/password (RFC 1929) logins, in
the same run.

    .venv/bin/python bench/socks_bench.py [--seconds 10] [--clients 50] [--bulk-mib 1024]

Needs C{danted} and C{microsocks} (Debian packages dante-server, microsocks)
and root: Dante's C{username} method checks a system user, so the benchmark
creates a throwaway one (C{authgw-bench}, no home, no shell) and deletes it at
the end. Its password is SHA-512-crypt with 1000 rounds, the cheapest hash
the shadow tools write (Debian's default, yescrypt, costs Dante milliseconds
per login); the gateway checks C{--auth memory:daniel:tiger}, microsocks its
C{-u}/C{-P} pair, neither hashes.

Two measurements per server:

- C{sessions/s}: C{--clients} concurrent clients, each in a loop: connect,
  greeting offering 02 only, RFC 1929 login, CONNECT to a loopback echo
  server (ATYP 1), 64 bytes echoed, close. One message per round trip, no
  pipelining. The load generator is an asyncio process of its own.
- C{bulk MiB/s}: C{--bulk-mib} MiB from a loopback source to a client
  through one tunnel, then split over 4 concurrent tunnels; a run stops
  early after C{--seconds}. The same transfer straight over loopback, with
  no proxy, is the reference: what the two Python endpoints can move.

The echo server (asyncio) and the bulk source (one thread per connection,
C{sendall} of a pre-made 4 MiB buffer, the GIL released) run in a process of
their own; the bulk client reads with C{recv_into} into a 1 MiB buffer in a
thread per tunnel, so neither end is the bottleneck. The gateway runs under
twistd in its own process (one reactor thread; C{--smtp none --http none},
C{--socks-allow 127.0.0.1}, the per-address and per-user session bounds
raised since every client is the same user from 127.0.0.1, one C{socks
session} log event per session to its log file, as in production); Dante
with its default processes (its CPU includes its children); microsocks with
a thread per client. Before each
server is measured, one login with a wrong password must be refused and one
tunnel must echo. Server CPU is read from /proc/PID/stat, 100% is one core;
the load generator's and the echo/source process's CPU are printed too: on a
small machine they compete with the servers for the same cores. Everything
binds 127.0.0.1, stops by itself, removes its temporary directory and the
throwaway user.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import pwd
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

from benchlib import children_of, cpu_seconds, free_port, stop, wait_port

USER, PASSWORD = "daniel", "tiger"
SYSTEM_USER, SYSTEM_PASSWORD = "authgw-bench", "bench-password-1928"
PAYLOAD = bytes(range(64))
MIB = 1024 * 1024

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



def greeting() -> bytes:
    return b"\x05\x01\x02"


def userpass(user: str, password: str) -> bytes:
    u, p = user.encode(), password.encode()
    return bytes([1, len(u)]) + u + bytes([len(p)]) + p


def connect_request(port: int) -> bytes:
    return b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", port)


# -- the echo server and the bulk source (their own process) ------------------


class Echo(asyncio.Protocol):
    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False  # close


BUFFER = memoryview(os.urandom(4 * MIB))


def send_bulk(sock: socket.socket) -> None:
    """Read an 8-byte count, send that many bytes, close."""
    with sock:
        try:
            sock.settimeout(60)
            header = b""
            while len(header) < 8:
                chunk = sock.recv(8 - len(header))
                if not chunk:
                    return
                header += chunk
            (left,) = struct.unpack("!Q", header)
            while left > 0:
                part = BUFFER[: min(left, len(BUFFER))]
                sock.sendall(part)
                left -= len(part)
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1)  # until the client closes
        except OSError:
            pass  # the client stopped early (time limit)


def bulk_source(listener: socket.socket) -> None:
    while True:
        sock, _ = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=send_bulk, args=(sock,), daemon=True).start()


def servers_main(echo_port: int, source_port: int, seconds: float) -> None:
    """The echo server and the bulk source; ends by itself after C{seconds}."""
    listener = socket.create_server(("127.0.0.1", source_port), backlog=128)
    threading.Thread(target=bulk_source, args=(listener,), daemon=True).start()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, "127.0.0.1", echo_port, backlog=1024)
        print("ready", flush=True)
        async with server:
            await asyncio.sleep(seconds)

    asyncio.run(main())


# -- the load generators (their own process) ----------------------------------


class Session(asyncio.Protocol):
    """Greeting, login, CONNECT, 64 bytes echoed, close: one step per round trip."""

    transport: asyncio.Transport

    def __init__(self, steps: list[tuple[bytes, bytes]], done: asyncio.Future) -> None:
        self.steps = steps
        self.done = done
        self.step = 0
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.steps[0][0])

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        expected = self.steps[self.step][1]
        if len(self.buffer) < len(expected):
            return
        got, self.buffer = self.buffer, b""
        # The CONNECT reply's BND.ADDR/PORT vary: compare its first four bytes only.
        if got[:4] != expected[:4] or (len(expected) != 10 and got != expected):
            self.fail(f"step {self.step}: expected {expected!r}, got {got!r}")
            return
        self.step += 1
        if self.step == len(self.steps):
            self.transport.close()
        else:
            self.transport.write(self.steps[self.step][0])

    def fail(self, why: str) -> None:
        if not self.done.done():
            self.done.set_exception(RuntimeError(why))
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            if self.step == len(self.steps):
                self.done.set_result(None)
            else:
                self.done.set_exception(RuntimeError(f"closed at step {self.step}: {exc}"))


async def sessions_load(port: int, echo_port: int, clients: int, seconds: float,
                        user: str, password: str) -> tuple[int, int, str]:
    loop = asyncio.get_running_loop()
    steps = [
        (greeting(), b"\x05\x02"),
        (userpass(user, password), b"\x01\x00"),
        (connect_request(echo_port), b"\x05\x00\x00\x01" + bytes(6)),
        (PAYLOAD, PAYLOAD),
    ]
    done = errors = 0
    first_error = ""
    end = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done, errors, first_error
        while time.monotonic() < end:
            finished = loop.create_future()
            try:
                await loop.create_connection(
                    functools.partial(Session, steps, finished), "127.0.0.1", port
                )
                await asyncio.wait_for(finished, 30)
                done += 1
            except (TimeoutError, OSError, RuntimeError) as e:
                errors += 1
                first_error = first_error or repr(e)

    await asyncio.gather(*(worker() for _ in range(clients)))
    return done, errors, first_error


def sessions_client(port: int, echo_port: int, clients: int, seconds: float,
                    user: str, password: str) -> None:
    start = resource.getrusage(resource.RUSAGE_SELF)
    t = time.monotonic()
    done, errors, first_error = asyncio.run(
        sessions_load(port, echo_port, clients, seconds, user, password)
    )
    wall = time.monotonic() - t
    end = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (end.ru_utime - start.ru_utime) + (end.ru_stime - start.ru_stime)
    print(f"{done} {wall} {cpu} {errors} {first_error!r}")


def recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise RuntimeError(f"closed after {data!r}, wanted {size} bytes")
        data += chunk
    return data


def tunnel(proxy_port: int, source_port: int, user: str, password: str) -> socket.socket:
    """A connection to the source: through the proxy, or straight (C{proxy_port} 0)."""
    sock = socket.create_connection(("127.0.0.1", proxy_port or source_port), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if proxy_port:
        sock.sendall(greeting())
        if recv_exact(sock, 2) != b"\x05\x02":
            raise RuntimeError("method not accepted")
        sock.sendall(userpass(user, password))
        if recv_exact(sock, 2) != b"\x01\x00":
            raise RuntimeError("login refused")
        sock.sendall(connect_request(source_port))
        reply = recv_exact(sock, 10)
        if reply[1] != 0:
            raise RuntimeError(f"CONNECT answered REP {reply[1]}")
    return sock


def bulk_client(proxy_port: int, source_port: int, tunnels: int, total: int, seconds: float,
                user: str, password: str) -> None:
    """C{total} bytes over C{tunnels} concurrent connections, or what C{seconds} allow."""
    socks = [tunnel(proxy_port, source_port, user, password) for _ in range(tunnels)]
    counts = [0] * tunnels
    barrier = threading.Barrier(tunnels + 1)
    deadline = [0.0]

    def read(i: int) -> None:
        sock, buffer = socks[i], bytearray(MIB)
        barrier.wait()
        sock.sendall(struct.pack("!Q", total // tunnels))
        with sock:
            while time.monotonic() < deadline[0]:
                n = sock.recv_into(buffer)
                if not n:
                    return
                counts[i] += n

    threads = [threading.Thread(target=read, args=(i,)) for i in range(tunnels)]
    for thread in threads:
        thread.start()
    start = resource.getrusage(resource.RUSAGE_SELF)
    t = time.monotonic()
    deadline[0] = t + seconds
    barrier.wait()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - t
    end = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (end.ru_utime - start.ru_utime) + (end.ru_stime - start.ru_stime)
    print(f"{sum(counts)} {wall} {cpu}")


# -- the conductor ------------------------------------------------------------






class Server:
    def __init__(self, name: str, port: int, proc: subprocess.Popen, user: str, password: str,
                 children: bool = False) -> None:
        self.name, self.port, self.proc = name, port, proc
        self.user, self.password, self.children = user, password, children

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid, self.children)

    def check(self, echo_port: int) -> None:
        """A wrong password is refused; the right one gets an echoing tunnel."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(greeting())
            if recv_exact(sock, 2) != b"\x05\x02":
                raise SystemExit(f"{self.name}: username/password method not accepted")
            sock.sendall(userpass(self.user, "wrong-" + self.password))
            status = sock.recv(2)
            if status[1:2] == b"\x00":
                raise SystemExit(f"{self.name}: a wrong password was accepted")
        with tunnel(self.port, echo_port, self.user, self.password) as sock:
            sock.sendall(PAYLOAD)
            if recv_exact(sock, len(PAYLOAD)) != PAYLOAD:
                raise SystemExit(f"{self.name}: the tunnel did not echo")


def run_client(*argv: object, timeout: float) -> list[str]:
    """A load generator process (it measures its own CPU): the words it printed."""
    return subprocess.run(
        [sys.executable, __file__, "--client", *map(str, argv)],
        capture_output=True, text=True, check=True, timeout=timeout,
    ).stdout.split(maxsplit=4)


def measure_sessions(server: Server, echo_port: int, clients: int, seconds: float,
                     helper: subprocess.Popen) -> float:
    before, helper_before, t = server.cpu(), cpu_seconds(helper.pid), time.monotonic()
    out = run_client("sessions", server.port, echo_port, clients, seconds,
                        server.user, server.password, timeout=seconds + 120)
    elapsed = time.monotonic() - t
    server_cpu = server.cpu() - before
    helper_cpu = cpu_seconds(helper.pid) - helper_before
    done, wall, client_cpu, errors = int(out[0]), float(out[1]), float(out[2]), int(out[3])
    rate = done / wall
    note = f"   {errors} errors! first: {out[4]}" if errors else ""
    print(f"{server.name:<22} {clients:>3} clients  {rate:8.1f} sessions/s   "
          f"server CPU {server_cpu / elapsed * 100:5.1f}% "
          f"({server_cpu / max(done, 1) * 1e6:4.0f} us/session)   "
          f"client CPU {client_cpu / wall * 100:5.1f}%   "
          f"echo CPU {helper_cpu / elapsed * 100:5.1f}%{note}")
    return rate


def measure_bulk(name: str, server: Server | None, source_port: int, tunnels: int, total: int,
                 seconds: float, helper: subprocess.Popen) -> float:
    before = server.cpu() if server else 0.0
    helper_before, t = cpu_seconds(helper.pid), time.monotonic()
    out = run_client("bulk", server.port if server else 0, source_port, tunnels, total,
                        seconds, server.user if server else "-", server.password if server else "-",
                        timeout=seconds + 120)
    elapsed = time.monotonic() - t
    moved, wall, client_cpu = int(out[0]), float(out[1]), float(out[2])
    rate = moved / MIB / wall
    server_note = ""
    if server:
        server_cpu = server.cpu() - before
        server_note = (f"server CPU {server_cpu / elapsed * 100:5.1f}% "
                       f"({server_cpu / max(moved / MIB, 1) * 1e6:5.0f} us/MiB)   ")
    source_cpu = cpu_seconds(helper.pid) - helper_before
    short = "" if moved >= total - total % tunnels else f"   (time limit: {moved / MIB:.0f} MiB)"
    print(f"{name:<22} {tunnels:>3} tunnel{'s' if tunnels > 1 else ' '} {rate:8.1f} MiB/s   "
          f"{server_note}client CPU {client_cpu / wall * 100:5.1f}%   "
          f"source CPU {source_cpu / elapsed * 100:5.1f}%{short}")
    return rate



def version(package: str) -> str:
    return subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True,
        check=False,
    ).stdout.split("+")[0].split("-")[0] or "?"


def add_system_user() -> None:
    try:
        pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        pass
    else:
        raise SystemExit(f"user {SYSTEM_USER} exists (a previous run?): userdel {SYSTEM_USER}")
    subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", SYSTEM_USER], check=True)
    subprocess.run(["chpasswd", "-c", "SHA512", "-s", "1000"],
                   input=f"{SYSTEM_USER}:{SYSTEM_PASSWORD}\n", text=True, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--bulk-mib", type=int, default=1024)
    args = parser.parse_args()
    for tool, package in (("danted", "dante-server"), ("microsocks", "microsocks")):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (Debian package {package})")
    if os.geteuid() != 0:
        raise SystemExit("needs root: Dante's username method checks a system user")
    total = args.bulk_mib * MIB
    # Long enough for every measurement, then the helper process ends by itself.
    lifetime = 6 * (args.seconds + 5) + 15 * (args.seconds + 5) + 120
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    tmp = tempfile.mkdtemp(prefix="authgateway-socks-bench-", dir=shm)
    procs: list[subprocess.Popen] = []
    user_added = False
    try:
        add_system_user()
        user_added = True
        echo_port, source_port = free_port(), free_port()
        gw_port, dante_port, micro_port = free_port(), free_port(), free_port()
        helper = subprocess.Popen(
            [sys.executable, __file__, "--servers", str(echo_port), str(source_port),
             str(lifetime)],
            stdout=subprocess.DEVNULL, start_new_session=True,
        )
        procs.append(helper)
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        gateway = subprocess.Popen(
            [twistd, "--pidfile=", "-n", "--logfile", os.path.join(tmp, "gw.log"), "authgateway",
             "--data-dir", os.path.join(tmp, "gw"), "--auth", f"memory:{USER}:{PASSWORD}",
             "--socks", f"tcp:{gw_port}:interface=127.0.0.1", "--socks-allow", "127.0.0.1",
             # Every client is 127.0.0.1: the per-address bound (64) would refuse
             # new sessions while earlier ones are still closing.
             "--socks-max-sessions-per-peer", "100000",
             "--socks-max-sessions-per-user", "100000",
             "--smtp", "none", "--http", "none"],
            start_new_session=True,
        )
        procs.append(gateway)
        conf = os.path.join(tmp, "danted.conf")
        with open(conf, "w") as f:
            f.write(DANTE_CONF.format(port=dante_port))
        with open(os.path.join(tmp, "danted.log"), "w") as log:
            dante = subprocess.Popen(
                ["danted", "-f", conf, "-p", os.path.join(tmp, "danted.pid")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )
        procs.append(dante)
        micro = subprocess.Popen(
            ["microsocks", "-i", "127.0.0.1", "-p", str(micro_port), "-u", USER, "-P", PASSWORD],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        procs.append(micro)
        for port, proc in ((echo_port, helper), (source_port, helper), (gw_port, gateway),
                           (dante_port, dante), (micro_port, micro)):
            wait_port(port, proc)
        servers = [
            Server("authgateway", gw_port, gateway, USER, PASSWORD),
            Server(f"dante {version('dante-server')}", dante_port, dante, SYSTEM_USER,
                   SYSTEM_PASSWORD, children=True),
            Server(f"microsocks {version('microsocks')}", micro_port, micro, USER, PASSWORD),
        ]
        for server in servers:
            server.check(echo_port)
        print(f"{os.cpu_count()} CPUs; sessions: {args.seconds:g} s per run; bulk: "
              f"{args.bulk_mib} MiB per run (at most {args.seconds:g} s); dante "
              f"{len(children_of(dante.pid))} child processes")
        print("sessions: greeting, RFC 1929 login, CONNECT, 64 bytes echoed, close")
        rates: dict[tuple[str, object], float] = {}
        for server in servers:
            rates[server.name, "sessions"] = measure_sessions(
                server, echo_port, args.clients, args.seconds, helper)
        for tunnels in (1, 4):
            print(f"bulk: {args.bulk_mib} MiB from a loopback source over {tunnels} "
                  f"tunnel{'s' if tunnels > 1 else ''}")
            measure_bulk("direct (no proxy)", None, source_port, tunnels, total, args.seconds,
                         helper)
            for server in servers:
                rates[server.name, tunnels] = measure_bulk(
                    server.name, server, source_port, tunnels, total, args.seconds, helper)
        ours, dante_name, micro_name = (s.name for s in servers)
        print("ratios:")
        for what, label in (("sessions", "sessions/s"), (1, "bulk, 1 tunnel"),
                            (4, "bulk, 4 tunnels")):
            print(f"  {label:<16} "
                  f"authgateway/dante {rates[ours, what] / rates[dante_name, what]:5.2f}x   "
                  f"authgateway/microsocks {rates[ours, what] / rates[micro_name, what]:5.2f}x")
    finally:
        for proc in reversed(procs):
            stop(proc)
        if user_added:
            subprocess.run(["userdel", SYSTEM_USER], check=False)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 9 and sys.argv[1:3] == ["--client", "sessions"]:
        sessions_client(int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]),
                        float(sys.argv[6]), sys.argv[7], sys.argv[8])
    elif len(sys.argv) == 10 and sys.argv[1:3] == ["--client", "bulk"]:
        bulk_client(int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]),
                    float(sys.argv[7]), sys.argv[8], sys.argv[9])
    elif len(sys.argv) == 5 and sys.argv[1] == "--servers":
        servers_main(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    else:
        main()
