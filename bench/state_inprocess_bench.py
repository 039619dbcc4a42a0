"""
What C{--state redis://} adds to one login, against C{--state local}: COUNT
logins one after the other through the gateway's Portal (throttle, an
in-memory checker, the realm) on the real reactor, the throttle's counters
in this process or in a real redis-server (started here on a UNIX socket
or a loopback port, not traced by valgrind: only the gateway's side is
counted).

    .venv/bin/python bench/state_inprocess_bench.py VARIANT COUNT [wrong]
    bench/state_instructions.sh      # instructions per login of each variant

VARIANT is C{local}, C{redis} (TCP loopback) or C{unix}; C{CONCURRENCY=N}
in the environment runs N logins at a time (default 1: one after the
other, each paying its reactor turns alone). With C{wrong},
every login is a wrong password (admit, check, record the failure), else a
right one; each from its own peer, so none is throttled. Prints the
wall-clock logins/s too (noisy on a shared machine; valgrind's count of
instructions is not).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import UsernamePassword
from twisted.internet import defer, reactor, task

from gateway.authinfo import IAuthInfo
from gateway.checkers.throttle import Throttle
from gateway.realm import Realm, make_portal
from gateway.state import open_state


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def run(variant: str, count: int, wrong: bool, concurrency: int) -> None:
    tmp = tempfile.mkdtemp(prefix="statebench-")
    redis = None
    try:
        url = "local"
        if variant != "local":
            port, sock = free_port(), os.path.join(tmp, "redis.sock")
            redis = subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--unixsocket", sock,
                 "--save", "", "--appendonly", "no", "--dir", tmp, "--loglevel", "warning"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            url = f"unix://{sock}" if variant == "unix" else f"redis://127.0.0.1:{port}/0"
        state = open_state(url, "closed", Throttle(reactor, delay=0, max_delay=0), reactor)
        if state.service is not None:
            state.service.startService()
            while not state.up:
                await task.deferLater(reactor, 0.05, lambda: None)
        checker = InMemoryUsernamePasswordDatabaseDontUse(daniel=b"tiger")
        portal = make_portal(Realm(), [checker], state.throttle)
        password = b"wrong" if wrong else b"tiger"

        async def login(i: int) -> None:
            creds = UsernamePassword(b"daniel", password)
            peer = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"  # none throttled
            creds.conn_meta = SimpleNamespace(peer_address=peer)  # type: ignore[attr-defined]
            try:
                await portal.login(creds, None, IAuthInfo)
            except Exception:  # noqa: BLE001  (a wrong password)
                if not wrong:
                    raise

        for i in range(20):  # warm-up: scripts loaded, caches filled
            await login(i)
        started = time.perf_counter()
        for i in range(0, count, concurrency):  # CONCURRENCY logins at a time
            await defer.gatherResults([
                defer.ensureDeferred(login(1000 + i + j)) for j in range(min(concurrency, count - i))
            ])
        took = time.perf_counter() - started
        print(f"{variant}{' wrong' if wrong else ''}: {count} logins in {took:.3f} s,"
              f" {count / took:,.0f} logins/s", file=sys.stderr)
        if state.service is not None:
            await state.service.stopService()
    finally:
        if redis is not None:
            redis.terminate()
            redis.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    variant, count = sys.argv[1], int(sys.argv[2])
    wrong = len(sys.argv) > 3 and sys.argv[3] == "wrong"

    def start() -> None:
        done = defer.ensureDeferred(run(variant, count, wrong, int(os.environ.get("CONCURRENCY", "1"))))
        done.addErrback(lambda f: f.printTraceback())
        done.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()


if __name__ == "__main__":
    main()
