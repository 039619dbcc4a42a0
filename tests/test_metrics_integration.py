"""
A real C{twistd authgateway --metrics ...}: logins with clients we did not
write on every front door (smtplib, curl, PySocks), then C{/metrics}
scraped (parsed by prometheus_client, checked by promtool) and C{/readyz}.
"""

from __future__ import annotations

import json
import os
import smtplib
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, protocol, reactor, task, threads
from twisted.protocols import wire
from twisted.trial.unittest import TestCase

from gateway.checkers.htpasswd import add_user
from tests.support import CHEAP, free_port, require_module, require_tool, stop_process

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
HOSTILE = 'mallory"} evil{'


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=20) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class ScrapeTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        if not os.path.exists(TWISTD):
            self.skipTest(f"no twistd next to {sys.executable}")
        self.curl = require_tool("curl", "curl")
        self.promtool = require_tool("promtool", "prometheus")
        self.socks = require_module("socks", "PySocks")
        self.data = os.path.abspath(self.mktemp())
        os.makedirs(self.data)
        users = os.path.join(self.data, "users")
        add_user(users, "daniel", "tiger", **CHEAP)  # real hashes: the hash pool and cache work
        echo = reactor.listenTCP(0, protocol.Factory.forProtocol(wire.Echo), interface="127.0.0.1")
        self.addCleanup(echo.stopListening)
        self.echo_port = echo.getHost().port
        self.ports = {name: free_port() for name in ("smtp", "http", "socks", "metrics")}
        self.proc = subprocess.Popen(
            [TWISTD, "--pidfile=", "-n", "--logfile", os.path.join(self.data, "twistd.log"),
             "authgateway", "--data-dir", self.data, "--auth", f"htpasswd:{users}",
             *(arg for name, port in self.ports.items()
               for arg in (f"--{name}", f"tcp:{port}:interface=127.0.0.1")),
             "--smtp-insecure-auth", "--socks-allow", f"127.0.0.1:{self.echo_port}",
             "--failure-delay", "0", "--failure-delay-max", "0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(self.reap)

    def reap(self) -> None:
        stop_process(self.proc, 20)

    @defer.inlineCallbacks
    def ready(self) -> Any:
        """Polls /readyz until it answers 200 (all listeners up); its body."""
        end = time.monotonic() + 30
        while True:
            try:
                code, body = yield threads.deferToThread(
                    get, f"http://127.0.0.1:{self.ports['metrics']}/readyz")
                if code == 200:
                    return json.loads(body)
            except OSError:
                pass
            if time.monotonic() > end or self.proc.poll() is not None:
                raise AssertionError("the gateway never became ready")
            yield task.deferLater(reactor, 0.1, lambda: None)

    def smtp(self) -> None:
        with smtplib.SMTP("127.0.0.1", self.ports["smtp"], timeout=20) as client:
            with self.assertRaises(smtplib.SMTPAuthenticationError):
                client.login(HOSTILE, "guess")
            client.login("daniel", "tiger")
            client.sendmail("daniel@example.com", ["bob@example.org"], "Subject: hi\r\n\r\nhello\r\n")

    def http(self, user: str, password: str) -> str:
        done = subprocess.run(
            [self.curl, "-s", "-o", "/dev/null", "-w", "%{http_code}", "-u", f"{user}:{password}",
             f"http://127.0.0.1:{self.ports['http']}/whoami"],
            capture_output=True, text=True, timeout=30, check=False)
        return done.stdout

    def tunnel(self, password: str) -> bytes:
        sock = self.socks.socksocket()
        sock.set_proxy(self.socks.SOCKS5, "127.0.0.1", self.ports["socks"],
                       username="daniel", password=password)
        sock.settimeout(20)
        with sock:
            sock.connect(("127.0.0.1", self.echo_port))
            sock.sendall(b"x" * 1000)
            got = b""
            while len(got) < 1000:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                got += chunk
            return got

    @defer.inlineCallbacks
    def test_scrape_after_logins(self):
        body = yield self.ready()
        self.assertEqual(body["checks"]["listeners"]["states"],
                         {"smtp": "listening", "http": "listening", "socks": "listening"})
        yield threads.deferToThread(self.smtp)
        self.assertEqual((yield threads.deferToThread(self.http, "daniel", "tiger")), "200")
        self.assertEqual((yield threads.deferToThread(self.http, HOSTILE, "guess")), "401")
        self.assertEqual(len((yield threads.deferToThread(self.tunnel, "tiger"))), 1000)
        with self.assertRaises(self.socks.ProxyError):
            yield threads.deferToThread(self.tunnel, "guess")

        def metric_text() -> bytes:
            code, text = get(f"http://127.0.0.1:{self.ports['metrics']}/metrics")
            self.assertEqual(code, 200)
            return text

        # A SOCKS session's counts land when its connection is gone: poll briefly.
        end = time.monotonic() + 10
        while True:
            text = yield threads.deferToThread(metric_text)
            samples = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text.decode())
                for s in family.samples
            }

            def value(name: str, **labels: str) -> float:
                return samples.get((name, tuple(sorted(labels.items()))), 0)

            if value("authgateway_socks_replies_total", reply="0") or time.monotonic() > end:
                break
            yield task.deferLater(reactor, 0.1, lambda: None)

        logins = "authgateway_login_attempts_total"
        for door, mechanism in (("smtp", "PLAIN"), ("http", "Basic"), ("socks", "RFC1929")):
            self.assertEqual(value(logins, protocol=door, listener=door, mechanism=mechanism,
                                   outcome="success", reason="ok"), 1, door)
            self.assertEqual(value(logins, protocol=door, listener=door, mechanism=mechanism,
                                   outcome="failure", reason="invalid_credentials"), 1, door)
        # SMTP: both logins in one session; HTTP and SOCKS: one connection each.
        for door, sessions in (("smtp", 1), ("http", 2), ("socks", 2)):
            self.assertEqual(value("authgateway_sessions_total", door=door), sessions, door)
        self.assertGreaterEqual(value("authgateway_hash_verification_seconds_count"), 1)
        self.assertGreaterEqual(value("authgateway_cache_hits_total"), 1)  # the same password again
        self.assertEqual(value("authgateway_spool_messages_total", protocol="ESMTPA"), 1)
        self.assertGreater(value("authgateway_spool_bytes_total", protocol="ESMTPA"), 20)
        self.assertEqual(value("authgateway_socks_bytes_total", direction="up"), 1000)
        self.assertEqual(value("authgateway_socks_bytes_total", direction="down"), 1000)
        self.assertEqual(value("authgateway_http_responses_total", code="200"), 1)
        self.assertEqual(value("authgateway_http_responses_total", code="401"), 1)
        self.assertEqual(value("authgateway_ready"), 1)
        labels = {v for (_, pairs) in samples for _, v in pairs}
        self.assertFalse([v for v in labels if "mallory" in v or "daniel" in v or "127.0.0.1" in v])
        checked = yield threads.deferToThread(
            subprocess.run, [self.promtool, "check", "metrics"], input=text,
            capture_output=True, timeout=30, check=False)
        self.assertEqual((checked.returncode, checked.stdout, checked.stderr), (0, b"", b""))
        code, _ = yield threads.deferToThread(
            get, f"http://127.0.0.1:{self.ports['metrics']}/readyz")
        self.assertEqual(code, 200)
        # Nothing the metrics listener answers is logged per request.
        with open(os.path.join(self.data, "twistd.log"), errors="replace") as f:
            self.assertNotIn("/metrics", f.read())
