"""
Authenticated submission sessions per second (issue 4), the gateway next to
aiosmtpd 1.4.6 in the same run.

    pip install aiosmtpd==1.4.6        # into the venv that runs the benchmark
    .venv/bin/python bench/smtp_bench.py [--seconds 10] [--clients 1,50]

Each session: connect, EHLO, AUTH PLAIN with an initial response, MAIL, RCPT,
a 1 KB message, QUIT, over loopback with plaintext AUTH allowed
(--smtp-insecure-auth). Both servers run in their own process; the gateway
authenticates with --auth memory:daniel:tiger and writes its spool (message +
metadata, fsynced) to a tmpfs directory; aiosmtpd uses an equivalent
in-memory authenticator and writes each message to a file in the same tmpfs.
The load generator is an asyncio process of its own; its CPU time and the
server's are printed so that it is clear which side is the bottleneck.
Everything binds 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

from benchlib import cpu_seconds, free_port, wait_port

BODY = ("Subject: bench\r\n\r\n" + ("x" * 76 + "\r\n") * 13).encode()  # ~1 KB
AUTH = base64.b64encode(b"\0daniel\0tiger")

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
            "127.0.0.1", int(sys.argv[1]))
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

    reactor.listenTCP(int(sys.argv[1]), protocol.Factory.forProtocol(Canned), interface="127.0.0.1")
    reactor.run()
    """
)



async def expect(reader: asyncio.StreamReader, code: bytes) -> None:
    while True:
        line = await reader.readline()
        if not line.startswith(code):
            raise RuntimeError(f"expected {code!r}, got {line!r}")
        if line[3:4] == b" ":
            return


async def session(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await expect(reader, b"220")
    for command, code in (
        (b"EHLO bench.test", b"250"),
        (b"AUTH PLAIN " + AUTH, b"235"),
        (b"MAIL FROM:<daniel@example.com>", b"250"),
        (b"RCPT TO:<bob@example.org>", b"250"),
        (b"DATA", b"354"),
    ):
        writer.write(command + b"\r\n")
        await expect(reader, code)
    writer.write(BODY + b".\r\n")
    await expect(reader, b"250")
    writer.write(b"QUIT\r\n")
    await expect(reader, b"221")
    writer.close()
    await writer.wait_closed()


async def load(port: int, clients: int, seconds: float) -> int:
    done = 0
    end = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < end:
            await session(port)
            done += 1

    await asyncio.gather(*(worker() for _ in range(clients)))
    return done


def client_main(port: int, clients: int, seconds: float) -> None:
    start = resource.getrusage(resource.RUSAGE_SELF)
    t = time.monotonic()
    done = asyncio.run(load(port, clients, seconds))
    wall = time.monotonic() - t
    end = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (end.ru_utime - start.ru_utime) + (end.ru_stime - start.ru_stime)
    print(f"{done} {wall} {cpu}")




def measure(name: str, port: int, server: subprocess.Popen, clients: int, seconds: float) -> float:
    before = cpu_seconds(server.pid)
    out = subprocess.run(
        [sys.executable, __file__, "--client", str(port), str(clients), str(seconds)],
        capture_output=True, text=True, check=True, timeout=seconds + 120,
    ).stdout.split()
    server_cpu = cpu_seconds(server.pid) - before
    done, wall, client_cpu = int(out[0]), float(out[1]), float(out[2])
    rate = done / wall
    print(f"{name:<22} {clients:>3} clients  {rate:8.1f} sessions/s   "
          f"server CPU {server_cpu / wall * 100:5.1f}% ({server_cpu / done * 1e6:4.0f} us/session)   "
          f"client CPU {client_cpu / wall * 100:5.1f}%")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", default="1,50")
    args = parser.parse_args()
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    tmp = tempfile.mkdtemp(prefix="authgateway-smtp-bench-", dir=shm)
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    gw_port, aio_port, floor_port = free_port(), free_port(), free_port()
    gateway = subprocess.Popen(
        [twistd, "--pidfile=", "-n", "--logfile", os.path.join(tmp, "gw.log"), "authgateway",
         "--data-dir", os.path.join(tmp, "gw"), "--auth", "memory:daniel:tiger",
         "--smtp", f"tcp:{gw_port}:interface=127.0.0.1", "--smtp-insecure-auth",
         "--http", "none", "--socks", "none"],
    )
    os.makedirs(os.path.join(tmp, "aio"))
    aio = subprocess.Popen(
        [sys.executable, "-W", "ignore", "-c", AIOSMTPD_SERVER, str(aio_port),
         os.path.join(tmp, "aio")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,  # aiosmtpd warns about its own deprecated login_data
    )
    floor = subprocess.Popen([sys.executable, "-c", FLOOR_SERVER, str(floor_port)])
    try:
        wait_port(gw_port, gateway)
        wait_port(aio_port, aio)
        wait_port(floor_port, floor)
        print(f"{os.cpu_count()} CPUs; {args.seconds:.0f} s per run; spools on {shm or tmp}")
        for clients in (int(c) for c in args.clients.split(",")):
            ours = measure("authgateway", gw_port, gateway, clients, args.seconds)
            theirs = measure("aiosmtpd 1.4.6", aio_port, aio, clients, args.seconds)
            measure("bare Twisted (floor)", floor_port, floor, clients, args.seconds)
            print(f"{'':<22} {clients:>3} clients  ratio authgateway/aiosmtpd {ours / theirs:.2f}x")
    finally:
        for proc in (gateway, aio, floor):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--client":
        client_main(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    else:
        main()
