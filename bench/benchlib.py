"""
What the benchmark scripts share: the native load generator (built from
../shared/bench/loadgen) and its RESULT line, starting and stopping the
servers, free loopback ports, interleaved repetitions with their medians, and
the markdown summary. The scripts run as C{python bench/NAME.py}, so this
module is on their path.

Every server-side figure comes from the load generator (or wrk run under
C{loadgen exec}): a Python client on a 2-core machine saturates before a fast
server does, and then the benchmark measures the client. The load generator
prints each process's CPU over the measured window (100% = one core):
the server's (its children included), its own ("client"), the sink's ("aux")
and every other process's ("other"), so the bottleneck is visible.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOADGEN_BUILD = os.path.join(ROOT, "..", "shared", "bench", "loadgen", "build.sh")
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    """Until something listens on 127.0.0.1:C{port}; exits if C{proc} dies first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("server did not start")


def wait_unix(path: str, proc: subprocess.Popen, hello: bytes, answer: bytes,
              timeout: float = 30) -> None:
    """Until the UNIX socket C{path} answers C{hello} with C{answer}; exits if C{proc} dies first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with status {proc.returncode}")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(1)
                s.connect(path)
                s.sendall(hello)
                if s.recv(len(answer)) == answer:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"nothing answered on {path}")


def wait_workers(proc: subprocess.Popen, count: int, log: str, timeout: float = 60) -> list[int]:
    """
    Until the gateway C{proc} runs C{count} worker processes and its log
    has the start line of each (C{authgateway started: worker K, ...},
    relayed by the parent); returns the workers' pids. A listening port
    proves only the parent: the workers adopt its sockets a little later.
    """
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"gateway exited with status {proc.returncode} (see {log})")
        workers = descendants(proc.pid)
        try:
            with open(log) as f:
                started = len(set(re.findall(r"authgateway started: worker (\d+)", f.read())))
        except OSError:
            started = 0
        if len(workers) >= count and started >= count:
            return workers
        time.sleep(0.2)
    raise SystemExit(f"the gateway did not start {count} workers in {timeout:g} s (see {log})")


_OPTIONS: set[str] = set()


def gateway_has(option: str) -> bool:
    """Whether this checkout's C{twistd authgateway} takes C{option} (C{--workers}, ...)."""
    if not _OPTIONS:
        help_text = subprocess.run([TWISTD, "authgateway", "--help"], capture_output=True,
                                   text=True, check=False, cwd=ROOT).stdout
        # Only where an option is listed: other options' help mentions some.
        _OPTIONS.update(re.findall(r"^\s*(?:-\w, *)?(--[a-z][a-z0-9-]*)", help_text, re.M))
    return option in _OPTIONS


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL to its whole process group (workers and children too)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(10)


def version(package: str) -> str:
    """The upstream version of an installed Debian package, or "?"."""
    return subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True,
        check=False,
    ).stdout.split("+")[0].split("-")[0] or "?"


def need_tools(*tools: tuple[str, str]) -> None:
    """Exits naming the Debian package of the first (tool, package) not on the PATH."""
    for tool, package in tools:
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (Debian package {package})")


def add_options(parser: argparse.ArgumentParser, duration: float = 10, reps: int = 3,
                pause: float = 20) -> None:
    """The options every benchmark takes."""
    parser.add_argument("--duration", type=float, default=duration,
                        help="seconds measured per run (default %(default)s)")
    parser.add_argument("--reps", type=int, default=reps,
                        help="interleaved repetitions; the summary shows medians "
                             "(default %(default)s)")
    parser.add_argument("--pause", type=float, default=pause,
                        help="seconds between session runs, for TIME_WAIT sockets "
                             "(default %(default)s)")
    parser.add_argument("--loadgen", default=os.environ.get("LOADGEN"),
                        help="the loadgen binary (default: $LOADGEN, or build it with "
                             "../shared/bench/loadgen/build.sh)")


class Bench:
    """
    One benchmark run: the processes it started (stopped in reverse order at
    the end, by their own PIDs and process groups only), its temporary
    directories (removed), the load generator, and the figures of every
    repetition.
    """

    def __init__(self, args: argparse.Namespace, prefix: str) -> None:
        self.args = args
        self.prefix = prefix
        self.procs: list[subprocess.Popen] = []
        self.dirs: list[str] = []
        self.rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.loadgen = args.loadgen or build_loadgen()
        #: What the C{--aux-pid} processes are, in the figures' lines and table.
        self.aux_label = "sink"
        self.shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.tmp = self.tempdir(self.shm)

    def __enter__(self) -> Bench:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            stop(proc)
        for path in self.dirs:
            shutil.rmtree(path, ignore_errors=True)

    def tempdir(self, parent: str | None) -> str:
        path = tempfile.mkdtemp(prefix=f"authgateway-{self.prefix}-", dir=parent)
        self.dirs.append(path)
        return path

    def start(self, argv: Sequence[str], log: str | None = None, **kwargs: Any) -> subprocess.Popen:
        """A server in a session of its own, so that stopping it reaches its children."""
        out = open(os.path.join(self.tmp, log), "w") if log else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=out, start_new_session=True, **kwargs)
        finally:
            if log:
                out.close()
        self.procs.append(proc)
        return proc

    def gateway(
        self, name: str, *options: str, data_dir: str | None = None, **kwargs: Any
    ) -> subprocess.Popen:
        """authgateway under twistd with one log file, as in production."""
        slug = re.sub(r"\W+", "-", name)
        return self.start([
            TWISTD, "--pidfile=", "-n", "--logfile", self.log_of(name),
            "authgateway", "--data-dir", data_dir or os.path.join(self.tmp, slug), *options,
        ], **kwargs)

    def redis(self) -> tuple[subprocess.Popen, str]:
        """
        A redis-server of its own on a UNIX socket in the temporary directory
        (mode 0700, no TCP port, nothing saved): the process and the socket.
        """
        need_tools(("redis-server", "redis-server"))
        path = os.path.join(self.tmp, "redis.sock")
        proc = self.start(["redis-server", "--port", "0", "--unixsocket", path,
                           "--unixsocketperm", "700", "--save", "", "--appendonly", "no",
                           "--dir", self.tmp], log="redis.log")
        wait_unix(path, proc, b"PING\r\n", b"+PONG\r\n")
        return proc, path

    def log_of(self, name: str) -> str:
        """The log file L{gateway} gives the gateway called C{name}."""
        return os.path.join(self.tmp, re.sub(r"\W+", "-", name) + ".log")

    def check_login(
        self, name: str, workload: Sequence[object], password: str, refuses_wrong: bool = True
    ) -> None:
        """
        Before measuring: one loadgen session of C{workload} with a wrong
        password is refused (unless C{refuses_wrong} is false: a canned
        floor), and one with C{password} succeeds.
        """
        common = (*workload, "-c", 1, "-d", 5, "--warmup", 0, "--max-sessions", 1)
        if refuses_wrong:
            result, out = self.run(*common, "--pass", "wrong-" + password, timeout=30)
            if result["ok"]:
                raise SystemExit(f"{name}: a wrong password was accepted\n{out}")
        result, out = self.run(*common, "--pass", password, timeout=30)
        if result["ok"] != 1:
            raise SystemExit(f"{name}: the right password did not get a session through\n{out}")

    def sink(self, echo: int, discard: int) -> subprocess.Popen:
        """The loadgen's echo and discard servers; they end by themselves after an hour."""
        return self.start([self.loadgen, "sink", "--echo", f"127.0.0.1:{echo}",
                           "--discard", f"127.0.0.1:{discard}", "--lifetime", "3600"])

    def run(self, *argv: object, timeout: float) -> tuple[dict[str, Any], str]:
        """
        One loadgen command: its RESULT and everything it (or wrk) printed.
        The RESULT gains C{trees}: the CPU of each process of the
        C{--server-pid} and C{--aux-pid} trees apart (L{tree_cpu}), so that a
        parent and its workers (nginx's, the gateway's) are told apart.
        """
        cmd = [self.loadgen, *map(str, argv)]
        roots = [int(pid) for role in ("--server-pid", "--aux-pid")
                 for option, value in zip(cmd, cmd[1:]) if option == role
                 for pid in value.split(",")]
        before = process_table() if roots else {}
        started = time.monotonic()
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        for line in reversed(done.stdout.splitlines()):
            if line.startswith("RESULT "):
                result = json.loads(line[len("RESULT "):])
                if roots:
                    result["trees"] = tree_cpu(roots, before, process_table(),
                                               time.monotonic() - started)
                return result, done.stdout
        raise SystemExit(f"no RESULT from {' '.join(cmd)}:\n{done.stdout}{done.stderr}")

    def record(self, row: str, column: str, value: float, result: dict[str, Any],
               unit: str, note: str = "", keep: bool = True) -> None:
        """Prints one repetition's figure with each process's CPU and keeps it (if C{keep})."""
        server = result.get("server_cpu_pct")
        per = f" ({server / 100 * 1e6 / value:,.0f} us CPU/{unit})" if server and value else ""
        print(f"  {row:<26} {column:<14} {value:10,.1f}{per}   "
              f"{cpu_line(result, self.aux_label)}{note}",
              flush=True)
        if keep:
            self.rows.setdefault((row, column), []).append(
                dict(result, value=value, unit=unit, other_cpu_pct=other_cpu(result)))

    def rest(self, share: float = 1.0, pause: float | None = None) -> None:
        """
        Lets the last run's TIME_WAIT sockets age before the next session run:
        C{share} of C{pause} (default C{--pause}; a run with few sessions
        leaves few sockets).
        """
        pause = self.args.pause if pause is None else pause
        if pause > 0 and share > 0:
            time.sleep(pause * share)

    def summary(self, ratios: Sequence[tuple[str, str]] = ()) -> None:
        """
        The medians as a markdown table, one line per server and workload: the
        figure, the server's CPU per unit of work, and each process's CPU (% of
        one core); then the asked (ours, theirs) ratios of medians per workload.
        """
        sink = any("aux_cpu_pct" in r for runs in self.rows.values() for r in runs)
        trees = {key: median_trees(runs) for key, runs in self.rows.items()}
        processes = any(trees.values())
        print(f"\nMedians of {self.args.reps} runs of {self.args.duration:g} s "
              f"(CPU in % of one core):\n")
        print("| server | workload | figure | server CPU per unit | server CPU | client CPU |"
              + (f" {self.aux_label} CPU |" if sink else "") + " other CPU |"
              + (" each process (whole command) |" if processes else ""))
        print("|---|---|---:|---:|---:|---:|" + ("---:|" if sink else "") + "---:|"
              + ("---|" if processes else ""))
        for (name, column), runs in self.rows.items():
            def med(key: str) -> float:
                return statistics.median(r.get(key, 0.0) for r in runs)

            per = [r["server_cpu_pct"] / 100 * 1e6 / r["value"]
                   for r in runs if "server_cpu_pct" in r and r["value"]]
            cells = [name, column, f"{med('value'):,.0f}",
                     f"{statistics.median(per):,.0f} us/{runs[0]['unit']}" if per else "",
                     f"{med('server_cpu_pct'):.0f}%" if per else "",
                     f"{med('client_cpu_pct'):.0f}%"]
            if sink:
                cells.append(f"{med('aux_cpu_pct'):.0f}%")
            cells.append(f"{med('other_cpu_pct'):.0f}%")
            if processes:
                tree = trees[(name, column)]
                cells.append(format_trees(tree) if tree else "")
            print("| " + " | ".join(cells) + " |")
        columns = list(dict.fromkeys(column for _, column in self.rows))
        for ours, theirs in ratios:
            parts = []
            for column in columns:
                a, b = self.median(ours, column), self.median(theirs, column)
                if a and b:
                    parts.append(f"{column}: {a / b:.2f}x")
            if parts:
                print(f"\n{ours} / {theirs}: " + "; ".join(parts))
        print(flush=True)

    def median(self, row: str, column: str) -> float | None:
        runs = self.rows.get((row, column))
        return statistics.median(r["value"] for r in runs) if runs else None


def process_table() -> dict[int, tuple[int, str, int]]:
    """
    Every process on the machine: pid -> (parent pid, name, CPU ticks), the
    ticks counting its reaped children too (as the load generator counts).
    """
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        name = stat[stat.find("(") + 1:stat.rfind(")")]
        fields = stat[stat.rfind(")") + 2:].split()
        table[int(entry)] = (int(fields[1]), name, sum(int(v) for v in fields[11:15]))
    return table


def descendants(root: int, table: dict[int, tuple[int, str, int]] | None = None) -> list[int]:
    """The live processes under C{root} (children, grandchildren...), by pid."""
    table = process_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return sorted(found)


def tree_cpu(roots: Sequence[int], before: dict[int, tuple[int, str, int]],
             after: dict[int, tuple[int, str, int]], seconds: float) -> list[dict[str, Any]]:
    """
    Per root, its own CPU and each descendant's over C{seconds} between the
    two tables, % of one core (the descendants highest first). The window
    is the whole command, a little longer than the load generator's (its
    warm-up second too).
    """
    tick = os.sysconf("SC_CLK_TCK") * max(seconds, 1e-9) / 100

    def pct(pid: int) -> float:
        return (after[pid][2] - before.get(pid, (0, "", 0))[2]) / tick if pid in after else 0.0

    def name(root: int) -> str:
        comm = after.get(root, before.get(root, (0, "?", 0)))[1]
        return "sink" if comm == "loadgen" else comm  # the load generator's sink

    return [{"name": name(root), "pct": pct(root),
             "children": sorted((pct(pid) for pid in descendants(root, after)), reverse=True)}
            for root in roots]


def format_trees(trees: Sequence[dict[str, Any]]) -> str:
    """C{nginx 0% + 2 children 48%, 47%; redis-server 9%}: each root, then its descendants."""
    parts = []
    for tree in trees:
        part = f"{tree['name']} {tree['pct']:.0f}%"
        children = tree["children"]
        if len(children) > 4:
            part += f" + {len(children)} children {sum(children):.0f}% (max {children[0]:.0f}%)"
        elif children:
            part += f" + {len(children)} child{'ren' if len(children) > 1 else ''} " + \
                ", ".join(f"{c:.0f}%" for c in children)
        parts.append(part)
    return "; ".join(parts)


def several(trees: Sequence[dict[str, Any]] | None) -> bool:
    """Whether a breakdown says more than the columns: children, or processes besides a sink."""
    return bool(trees) and any(t["children"] or (i and t["name"] != "sink")
                               for i, t in enumerate(trees))


def median_trees(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The runs' breakdowns, each figure the median of its place (runs of one shape only)."""
    shapes = {tuple(len(t["children"]) for t in r.get("trees", ())) for r in runs}
    if len(shapes) != 1 or not several(runs[0].get("trees")):
        return None
    return [{"name": tree["name"],
             "pct": statistics.median(r["trees"][i]["pct"] for r in runs),
             "children": [statistics.median(r["trees"][i]["children"][j] for r in runs)
                          for j in range(len(tree["children"]))]}
            for i, tree in enumerate(runs[0]["trees"])]


def other_cpu(result: dict[str, Any]) -> float:
    """
    What the rest of the machine used over the window, % of one core: every
    busy tick of /proc/stat (softirq included) less the server's, the
    client's and the sink's. Computed rather than summed over processes,
    where one process reaping another's children can count minutes at once.
    """
    busy = result["machine_busy_pct"] * result["ncpus"]
    ours = sum(result.get(key, 0.0) for key in ("server_cpu_pct", "client_cpu_pct", "aux_cpu_pct"))
    return max(0.0, busy - ours)


def cpu_line(result: dict[str, Any], aux: str = "sink") -> str:
    """Each process's CPU over the measured window, % of one core (C{aux}: the aux processes' name)."""
    parts = []
    if "server_cpu_pct" in result:
        parts.append(f"server {result['server_cpu_pct']:.0f}%")
    parts.append(f"client {result['client_cpu_pct']:.0f}%")
    if "aux_cpu_pct" in result:
        parts.append(f"{aux} {result['aux_cpu_pct']:.0f}%")
    parts.append(f"other {other_cpu(result):.0f}% (softirq {result['softirq_cpu_pct']:.0f}%)")
    line = "CPU " + ", ".join(parts)
    if several(result.get("trees")):
        line += f" [{format_trees(result['trees'])}]"
    if "timewait_before" in result:
        line += f"; {result['timewait_before']} sockets in TIME_WAIT before"
    return line


def build_loadgen() -> str:
    """Builds the load generator offline (once; cargo keeps the build) and returns its path."""
    if not os.path.exists(LOADGEN_BUILD):
        raise SystemExit(f"{LOADGEN_BUILD} not found: pass --loadgen or set LOADGEN")
    env = dict(os.environ)
    env.setdefault("CARGO_TARGET_DIR", os.path.join(tempfile.gettempdir(),
                                                    "authgateway-loadgen-target"))
    out = subprocess.run([LOADGEN_BUILD], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"building the loadgen failed:\n{out.stderr}")
    return out.stdout.strip().splitlines()[-1]


def mount_type(path: str) -> str:
    """The file system type under C{path} ("tmpfs", "ext4", ...), from /proc/mounts."""
    path, best, kind = os.path.realpath(path), "", "?"
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            point = fields[1]
            inside = path == point or path.startswith(point.rstrip("/") + "/")
            if inside and len(point) > len(best):
                best, kind = point, fields[2]
    return kind


def header(what: str, args: argparse.Namespace) -> None:
    print(f"{what}: {os.cpu_count()} CPUs, {args.duration:g} s per run, {args.reps} "
          f"interleaved repetitions, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"command: {' '.join([os.path.relpath(sys.executable, ROOT), *sys.argv])}", flush=True)
