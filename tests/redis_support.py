"""
A real C{redis-server} for the tests: started on a free loopback port and a
UNIX socket in a temporary directory, with no persistence, stopped after the
test (or when the test stops it itself, to see an outage).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.support import free_port, require_tool, stop_process


class RedisServer:
    """One redis-server process; L{stop} and L{start} again keep its port and socket."""

    def __init__(self, test: SynchronousTestCase, password: str | None = None) -> None:
        self.binary = require_tool("redis-server", "redis-server")
        self.directory = os.path.abspath(test.mktemp())
        os.makedirs(self.directory)
        self.port = free_port()
        self.unix_socket = os.path.join(self.directory, "redis.sock")
        if len(self.unix_socket) > 100:  # AF_UNIX paths are short: redis-server would exit 1
            short = tempfile.mkdtemp(prefix="redis-")
            test.addCleanup(shutil.rmtree, short, True)
            self.unix_socket = os.path.join(short, "redis.sock")
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None
        self.start()
        test.addCleanup(self.stop)

    @property
    def url(self) -> str:
        """The C{--state} URL of its TCP port (database 0)."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        """The C{--state} URL of its UNIX socket."""
        return f"unix://{self.unix_socket}"

    def start(self, timeout: float = 10.0) -> None:
        """Start it and wait (at most C{timeout} seconds) until it answers PING."""
        argv = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--unixsocket", self.unix_socket, "--unixsocketperm", "700",
            "--save", "", "--appendonly", "no", "--dir", self.directory,
            "--daemonize", "no", "--loglevel", "warning",
        ]
        if self.password:
            argv += ["--requirepass", self.password]
        self.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(self.directory, "redis.log"), "ab"),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            if self.ping():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer within {timeout} s")

    def command(self, *args: str) -> bytes:
        """Send one command (RESP) and return the raw reply (blocking; for assertions)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            request = [] if not self.password else [("AUTH", self.password)]
            request.append(args)
            payload = b"".join(
                b"*%d\r\n" % len(c) + b"".join(
                    b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in c
                )
                for c in request
            )
            s.sendall(payload)
            time.sleep(0.05)
            return s.recv(65536)

    def ping(self) -> bool:
        try:
            return b"PONG" in self.command("PING")
        except OSError:
            return False

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL after 5 s); safe to call twice."""
        process, self.process = self.process, None
        if process is not None:
            stop_process(process, 5)
