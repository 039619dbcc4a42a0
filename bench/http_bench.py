"""
Authenticated HTTP requests per second: the gateway's C{GET /whoami} with
Basic auth next to nginx C{auth_basic} on the same htpasswd file, in the
same run.

    .venv/bin/python bench/http_bench.py [--seconds 10] [--connections 50]

Needs C{wrk} and C{nginx} (Debian packages wrk, nginx) on the PATH; no root:
nginx runs from a temporary prefix with every path inside it.

The load is C{wrk -t2 -c50} over keep-alive with a fixed C{Authorization:
Basic} header, one run per server and per user:

- C{cheap}: SHA-512-crypt with 1000 rounds (C{$6$rounds=1000$}), the
  cheapest hash that both sides verify and that C{authgateway user add}
  writes (C{--scheme sha512-crypt --cost 1000}, the SHA-crypt minimum).
  nginx verifies it with crypt(3) (glibc/libxcrypt), the gateway with
  passlib. bcrypt and argon2id are the CLI's other schemes; libxcrypt has no
  argon2, and the legacy C{{SHA}} and C{$apr1$} (cheaper still) are read by
  the gateway only with a warning and are not written by the CLI.
- C{bcrypt10}: bcrypt cost 10 (C{$2b$10$}), which libxcrypt also verifies.

Both users are made with the C{authgateway} command in one htpasswd file
that both servers read. nginx opens and verifies that file on every request;
the gateway keeps successful verifications in its cache (C{--cache-ttl},
default 300 s), warmed by one request before measuring, so the gateway's
figure is a cache hit per request for either hash, and the two hashes show
how much nginx pays per request for each.

The gateway runs under twistd in its own process (one reactor thread plus
its hash threads; C{--smtp none --socks none}; it logs one auth event per
request to its log file, as in production); nginx with C{master_process on},
C{worker_processes auto}, C{access_log off} and C{keepalive_requests} raised
so that neither server closes wrk's connections during a run. Before each
run, one request without credentials must get 401 and one with them 200.
Server CPU is read from /proc/PID/stat (for nginx the master and all its
workers); 100% is one core. wrk's CPU is printed too: on a small machine it
competes with the servers for the same cores. Everything binds 127.0.0.1,
stops by itself and removes its temporary directory.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

from benchlib import children_of, cpu_seconds, free_port, stop, wait_port

USERS = {
    # name: (password, authgateway user add options)
    "cheap": ("cheap-password", ["--scheme", "sha512-crypt", "--cost", "1000"]),
    "bcrypt10": ("bcrypt-password", ["--scheme", "bcrypt", "--cost", "10"]),
}

NGINX_CONF = textwrap.dedent(
    """\
    daemon off;
    master_process on;
    worker_processes auto;
    pid {tmp}/nginx.pid;
    error_log {tmp}/nginx-error.log warn;
    events {{ worker_connections 1024; }}
    http {{
        access_log off;
        client_body_temp_path {tmp}/client_body;
        proxy_temp_path {tmp}/proxy;
        fastcgi_temp_path {tmp}/fastcgi;
        uwsgi_temp_path {tmp}/uwsgi;
        scgi_temp_path {tmp}/scgi;
        keepalive_requests 100000000;
        keepalive_timeout 60s;
        server {{
            listen 127.0.0.1:{port};
            # Not "return 200": return runs in the rewrite phase, before
            # auth_basic's access phase, and would answer without any check.
            location = /whoami {{
                auth_basic "x";
                auth_basic_user_file {htpasswd};
                default_type text/plain;
                alias {tmp}/ok.txt;
            }}
        }}
    }}
    """
)



def authorization(user: str) -> str:
    password = USERS[user][0]
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()






def get(port: int, user: str | None) -> int:
    """One request, to check the credentials and warm the gateway's cache."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Authorization": authorization(user)} if user else {}
    try:
        connection.request("GET", "/whoami", headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def wrk(port: int, user: str, connections: int, seconds: float) -> tuple[float, int, float]:
    """(requests/s, non-2xx responses, wrk's CPU seconds) of one wrk run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s",
         "-H", f"Authorization: {authorization(user)}", f"http://127.0.0.1:{port}/whoami"],
        capture_output=True, text=True, check=True, timeout=seconds + 60,
    ).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    rate = re.search(r"Requests/sec:\s*([\d.]+)", out)
    if rate is None:
        raise SystemExit(f"cannot read wrk's output:\n{out}")
    bad = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)
    if errors:
        print(f"    wrk: {errors.group(0)}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return float(rate.group(1)), int(bad.group(1)) if bad else 0, cpu


def measure(name: str, port: int, server: subprocess.Popen, user: str, connections: int,
            seconds: float, children: bool = False) -> float:
    status = get(port, None)
    if status != 401:
        raise SystemExit(f"{name}: GET /whoami without credentials answered {status}, not 401")
    status = get(port, user)
    if status != 200:
        raise SystemExit(f"{name}: GET /whoami as {user} answered {status}, not 200")
    before, t = cpu_seconds(server.pid, children), time.monotonic()
    rate, bad, client_cpu = wrk(port, user, connections, seconds)
    wall = time.monotonic() - t
    server_cpu = cpu_seconds(server.pid, children) - before
    note = f"   {bad} non-2xx!" if bad else ""
    print(f"{name:<12} {user:<9} {rate:9.1f} req/s   server CPU {server_cpu / wall * 100:5.1f}% "
          f"({server_cpu / max(rate * wall, 1) * 1e6:5.0f} us/req)   "
          f"wrk CPU {client_cpu / wall * 100:5.1f}%{note}")
    return rate



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=50)
    args = parser.parse_args()
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (Debian package {tool})")
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    tmp = tempfile.mkdtemp(prefix="authgateway-http-bench-", dir=shm)
    procs: list[subprocess.Popen] = []
    try:
        htpasswd = os.path.join(tmp, "users.htpasswd")
        for user, (password, options) in USERS.items():
            subprocess.run(
                [sys.executable, "-m", "gateway.cli", "user", "add", htpasswd, user,
                 "--password-stdin", *options],
                input=password + "\n", text=True, check=True, stdout=subprocess.DEVNULL,
            )
        # Run as root, nginx's workers switch to "nobody": they must reach the files.
        os.chmod(tmp, 0o755)
        os.chmod(htpasswd, 0o644)

        gw_port, nginx_port = free_port(), free_port()
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        gateway = subprocess.Popen(
            [twistd, "--pidfile=", "-n", "--logfile", os.path.join(tmp, "gw.log"), "authgateway",
             "--data-dir", os.path.join(tmp, "gw"), "--auth", f"htpasswd:{htpasswd}",
             "--http", f"tcp:{gw_port}:interface=127.0.0.1", "--smtp", "none", "--socks", "none"],
            start_new_session=True,
        )
        procs.append(gateway)
        conf = os.path.join(tmp, "nginx.conf")
        with open(os.path.join(tmp, "ok.txt"), "w") as f:
            f.write("ok\n")
        with open(conf, "w") as f:
            f.write(NGINX_CONF.format(tmp=tmp, port=nginx_port, htpasswd=htpasswd))
        nginx = subprocess.Popen(
            ["nginx", "-p", tmp, "-c", conf, "-e", os.path.join(tmp, "nginx-error.log")],
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        procs.append(nginx)
        wait_port(gw_port, gateway)
        wait_port(nginx_port, nginx)
        workers = len(children_of(nginx.pid))
        print(f"{os.cpu_count()} CPUs; wrk -t2 -c{args.connections}, {args.seconds:g} s per run; "
              f"keep-alive; nginx {workers} workers")
        for user in USERS:
            ours = measure("authgateway", gw_port, gateway, user, args.connections, args.seconds)
            theirs = measure("nginx", nginx_port, nginx, user, args.connections, args.seconds,
                             children=True)
            print(f"{'':<12} {user:<9} ratio authgateway/nginx {ours / theirs:.2f}x")
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
