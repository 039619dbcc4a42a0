"""
Authenticated HTTP requests per second: the gateway's C{GET /whoami} with
Basic auth next to nginx C{auth_basic} on the same htpasswd file (one worker
process, and two), all started first and measured in one run with
interleaved repetitions.

    .venv/bin/python bench/http_bench.py [--duration 10] [--reps 3] [--connections 50]
        [--paths whoami,auth] [--users sha,bcrypt] [--nginx-workers 1,2] [--baseline TREE]

Needs C{wrk} and C{nginx} (Debian packages wrk, nginx) on the PATH; no root
needed: nginx runs from a temporary prefix with every path inside it.

The load is C{wrk -t1 -c50} (C{--wrk-threads}, C{--connections}) over
keep-alive with a fixed C{Authorization: Basic} header, run under the native
load generator's C{exec} (../shared/bench/loadgen, built offline on first
use, or $LOADGEN) so that wrk's CPU and the server's (nginx's master and
workers together) are printed next to each figure. Two users in one
htpasswd file that every server reads:

- C{{SHA}}: the legacy unsalted SHA-1 (C{{SHA}base64}), the cheapest hash
  both read (the gateway reads it with a warning; its CLI does not write it);
  nginx's cost per request is then mostly HTTP.
- C{bcrypt}: bcrypt cost 10 (C{$2b$10$}, written by C{authgateway user add}),
  which nginx verifies with libxcrypt on every request.

The gateway keeps successful verifications in its cache (C{--cache-ttl},
default 300 s), warmed by one request per user before measuring, so its
figure is a cache hit per request for either hash. It runs under twistd (one
reactor thread plus its hash threads; C{--smtp none --socks none}; one auth
event per request to its log file, as in production); nginx with
C{master_process on}, C{worker_processes} 1 or 2, C{access_log off} and
C{keepalive_requests} raised so that no server closes wrk's connections
during a run. Before measuring, each server must answer 401 without
credentials and 200 with them. The end prints the medians as a markdown
table. Everything binds 127.0.0.1, stops by itself (only the processes it
started) and removes its temporary directory.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Sequence

from benchlib import Bench, add_options, free_port, header, need_tools, version, wait_port

USERS = {
    # name: password
    "sha": "sha-password",
    "bcrypt": "bcrypt-password",
}
COLUMNS = {"sha": "req/s, {SHA} user", "bcrypt": "req/s, bcrypt-10 user"}

NGINX_CONF = textwrap.dedent(
    """\
    daemon off;
    master_process on;
    worker_processes {workers};
    pid {tmp}/nginx-{port}.pid;
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
            location ~ ^/(whoami|auth)$ {{
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
    return "Basic " + base64.b64encode(f"{user}:{USERS[user]}".encode()).decode()


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


def check(name: str, port: int) -> None:
    """401 without credentials, 200 with each user's (which warms the gateway's cache)."""
    status = get(port, None)
    if status != 401:
        raise SystemExit(f"{name}: GET /whoami without credentials answered {status}, not 401")
    for user in USERS:
        status = get(port, user)
        if status != 200:
            raise SystemExit(f"{name}: GET /whoami as {user} answered {status}, not 200")


def write_htpasswd(path: str) -> None:
    """The {SHA} line by hand (the CLI does not write it), the bcrypt one with the CLI."""
    digest = base64.b64encode(hashlib.sha1(USERS["sha"].encode()).digest()).decode()
    with open(path, "w") as f:
        f.write(f"sha:{{SHA}}{digest}\n")
    subprocess.run(
        [sys.executable, "-m", "gateway.cli", "user", "add", path, "bcrypt",
         "--password-stdin", "--scheme", "bcrypt", "--cost", "10"],
        input=USERS["bcrypt"] + "\n", text=True, check=True, stdout=subprocess.DEVNULL,
    )


def prepare(bench: Bench) -> str:
    """
    The htpasswd file every server reads and nginx's reply file, readable
    by nginx's workers (run as root, they switch to "nobody"): its path.
    """
    htpasswd = os.path.join(bench.tmp, "users.htpasswd")
    write_htpasswd(htpasswd)
    os.chmod(bench.tmp, 0o755)
    os.chmod(htpasswd, 0o644)
    with open(os.path.join(bench.tmp, "ok.txt"), "w") as f:
        f.write("ok\n")
    return htpasswd


def gateway_options(port: int, htpasswd: str) -> tuple[str, ...]:
    """The gateway's options in every HTTP benchmark: the htpasswd file, HTTP only."""
    return ("--auth", f"htpasswd:{htpasswd}", "--http", f"tcp:{port}:interface=127.0.0.1",
            "--smtp", "none", "--socks", "none")


def start_nginx(bench: Bench, htpasswd: str, workers: int) -> tuple[str, int, int]:
    """nginx with C{workers} worker processes on the htpasswd file: name, port, pid."""
    port = free_port()
    conf = os.path.join(bench.tmp, f"nginx-{port}.conf")
    with open(conf, "w") as f:
        f.write(NGINX_CONF.format(tmp=bench.tmp, port=port, htpasswd=htpasswd, workers=workers))
    proc = bench.start(["nginx", "-p", bench.tmp, "-c", conf, "-e",
                        os.path.join(bench.tmp, "nginx-error.log")])
    wait_port(port, proc)
    return (f"nginx {version('nginx')}, {workers} worker{'s' if workers > 1 else ''}", port,
            proc.pid)


def measure(bench: Bench, name: str, port: int, pid: int, user: str, connections: int,
            threads: int, aux: Sequence[int] = (), column: str | None = None,
            path: str = "whoami") -> None:
    """One wrk run as C{user} on C{/path} against the server C{pid} (C{aux}: more to show)."""
    duration = bench.args.duration
    result, out = bench.run(
        "exec", "--server-pid", pid, *(("--aux-pid", ",".join(map(str, aux))) if aux else ()),
        "--", "wrk", f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--timeout", "10s",
        "-H", f"Authorization: {authorization(user)}", f"http://127.0.0.1:{port}/{path}",
        timeout=duration + 60)
    rate = re.search(r"Requests/sec:\s*([\d.]+)", out)
    if result["exit"] != 0 or rate is None:
        raise SystemExit(f"wrk failed:\n{out}")
    notes = [m.group(0) for m in re.finditer(
        r"Non-2xx or 3xx responses:.*|Socket errors:.*", out)]
    note = f"   {'; '.join(notes)}!" if notes else ""
    bench.record(name, column or COLUMNS[user], float(rate.group(1)), result, "req", note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_options(parser, pause=0)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument("--nginx-workers", default="1,2",
                        help="comma-separated worker_processes values (default %(default)s)")
    parser.add_argument("--paths", default="whoami",
                        help="comma-separated paths: whoami, auth (forward-auth asking about"
                             " its own request; nginx answers both alike) (default %(default)s)")
    parser.add_argument("--users", default="sha,bcrypt",
                        help="comma-separated users: sha, bcrypt (default %(default)s)")
    parser.add_argument("--baseline", metavar="TREE",
                        help="also measure the gateway of another checkout, e.g. a"
                             " `git worktree add --detach /tmp/old REV`")
    args = parser.parse_args()
    need_tools(("wrk", "wrk"), ("nginx", "nginx"))
    with Bench(args, "http-bench") as bench:
        htpasswd = prepare(bench)
        servers: list[tuple[str, int, int]] = []  # name, port, pid

        def gateway(name: str, tree: str | None = None) -> None:
            port = free_port()
            # Another checkout's code first on the path; started outside any
            # checkout, so that the editable install does not win.
            env = dict(os.environ, PYTHONPATH=os.path.abspath(tree)) if tree else None
            proc = bench.gateway(name, *gateway_options(port, htpasswd), env=env,
                                 cwd=bench.tmp if tree else None)
            wait_port(port, proc)
            servers.append((name, port, proc.pid))

        gateway("authgateway")
        if args.baseline:
            gateway(f"baseline {os.path.basename(os.path.abspath(args.baseline))}", args.baseline)
        for workers in (int(w) for w in args.nginx_workers.split(",")):
            servers.append(start_nginx(bench, htpasswd, workers))
        for name, port, _ in servers:
            check(name, port)

        paths, users = args.paths.split(","), args.users.split(",")
        header(f"HTTP GET /{', /'.join(paths)}, Basic", args)
        print(f"wrk -t{args.wrk_threads} -c{args.connections}, keep-alive")
        for rep in range(args.reps):
            print(f"repetition {rep + 1}", flush=True)
            for path, user in ((p, u) for p in paths for u in users):
                column = COLUMNS[user] if paths == ["whoami"] else f"/{path}, {COLUMNS[user]}"
                for name, port, pid in servers:
                    measure(bench, name, port, pid, user, args.connections, args.wrk_threads,
                            column=column, path=path)
        bench.summary([("authgateway", name) for name, *_ in servers[1:]])


if __name__ == "__main__":
    main()
