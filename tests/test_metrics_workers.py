"""
The parent's metrics listener with C{--workers N}
(L{gateway.ops.metrics.serve_parent}): a fake supervisor whose slots point
at real worker metrics listeners (whole gateways built by C{makeService},
each serving C{--metrics unix:PATH}) and at misbehaving ones (down,
hanging, junk, too large); the merged scrape parsed and checked by the real
C{promtool}; C{/healthz} and C{/readyz} following the slots and the
workers' own readiness; draining.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any

import attrs
from hypothesis import given, settings, strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families
from twisted.application import service
from twisted.internet import defer, protocol, reactor, threads
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import resource, server

from gateway import tap
from gateway.ops import metrics
from tests.redis_support import RedisServer
from tests.support import free_port, keep_signal_handlers, read_log, require_tool
from tests.test_metrics import event, listener


@attrs.define
class Slot:
    """What the parent reads of a supervisor's slot (L{gateway.ops.workers.Slot})."""

    index: int
    metrics_socket: str
    pid: int | None = 4000
    running: bool = True
    restarts: int = 0


@attrs.define
class Supervisor:
    slots: list[Slot]
    draining: bool = False
    reactor: Any = None


def short_directory(test: SynchronousTestCase) -> str:
    """A new directory with a short path (UNIX socket paths stay under 100 bytes)."""
    path = tempfile.mkdtemp(prefix="agw-wm-")
    test.addCleanup(shutil.rmtree, path, True)
    return path


def worker_gateway(test: SynchronousTestCase, socket_path: str) -> Any:
    """A whole gateway on the real reactor, started, serving its metrics on C{socket_path}."""
    options = tap.Options()
    options.parseOptions([
        "--data-dir", test.mktemp(), "--auth", "memory:daniel:tiger",
        "--metrics", f"unix:{socket_path}", "--smtp", "tcp:0:interface=127.0.0.1",
        "--http", "tcp:0:interface=127.0.0.1", "--socks", "tcp:0:interface=127.0.0.1",
        "--hash-threads", "1", "--failure-delay", "0",
    ])
    keep_signal_handlers(test)
    top = tap.makeService(options, reactor=reactor)
    top.privilegedStartService()
    top.startService()
    test.addCleanup(top.stopService)
    top.site = top.getServiceNamed("metrics").factory.wrappedFactory
    top.core = top.site.readiness.core
    return top


class Answering(resource.Resource):
    """A fake worker's metrics listener: every path answers C{body} with C{code}; counts requests."""

    isLeaf = True

    def __init__(self, body: bytes, code: int = 200) -> None:
        super().__init__()
        self.body, self.code, self.requests = body, code, 0

    def render_GET(self, request: server.Request) -> bytes:
        self.requests += 1
        request.setResponseCode(self.code)
        return self.body


def get(url: str, accept: str | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


class ParentTests(TestCase):
    """The parent's listener over real sockets, its workers real gateways or fakes."""

    timeout = 60

    def setUp(self) -> None:
        self.directory = short_directory(self)
        self.supervisor = Supervisor([])
        self.port = free_port()
        self.parent = service.MultiService()
        self.workers = metrics.serve_parent(
            {"metrics": f"tcp:{self.port}:interface=127.0.0.1", "drain-timeout": 1},
            self.supervisor, self.parent, reactor=reactor)
        self.workers.timeout = 1.0  # a hanging worker costs the test a second, not five
        self.parent.startService()
        self.addCleanup(self.stop_parent)
        self.logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def stop_parent(self) -> Any:
        for slot in self.supervisor.slots:
            slot.running = False
        return self.parent.stopService()

    def socket(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def add_worker(self) -> Any:
        """A slot with a real gateway's metrics listener behind it."""
        index = len(self.supervisor.slots)
        path = self.socket(f"w{index}.sock")
        top = worker_gateway(self, path)
        self.supervisor.slots.append(Slot(index, path, pid=5000 + index))
        return top

    def add_fake(self, factory: Any = None, **slot: Any) -> Slot:
        """A slot whose socket serves C{factory} (None: nothing listens there)."""
        index = len(self.supervisor.slots)
        path = self.socket(f"w{index}.sock")
        if factory is not None:
            port = reactor.listenUNIX(path, factory)
            self.addCleanup(port.stopListening)
        self.supervisor.slots.append(Slot(index, path, **slot))
        return self.supervisor.slots[-1]

    def get(self, path: str, accept: str | None = None) -> defer.Deferred[tuple[int, dict[str, str], bytes]]:
        self.workers.taken = None  # every test scrape asks the workers
        return threads.deferToThread(get, f"http://127.0.0.1:{self.port}{path}", accept)

    @defer.inlineCallbacks
    def scrape(self) -> Any:
        code, headers, body = yield self.get("/metrics")
        self.assertEqual((code, headers.get("Connection")), (200, "close"))
        return body.decode()

    @defer.inlineCallbacks
    def test_merged(self):
        """
        Two real workers: each one's samples with its C{worker} label, one
        HELP and TYPE per family, the parent's own families; promtool finds
        nothing to say, and the OpenMetrics answer parses too.
        """
        promtool = require_tool("promtool", "prometheus")
        first, second = self.add_worker(), self.add_worker()
        self.supervisor.slots[1].restarts = 3
        first.core.events.login(event())
        for _ in range(2):
            second.core.events.login(event(outcome="failure", reason="invalid_credentials"))
        text = yield self.scrape()
        values = samples(text)
        attempts = "authgateway_login_attempts_total"
        labels = dict(protocol="smtp", listener="smtp", mechanism="PLAIN")
        self.assertEqual(values[(attempts, tuple(sorted(
            {**labels, "outcome": "success", "reason": "ok", "worker": "0"}.items())))], 1)
        self.assertEqual(values[(attempts, tuple(sorted(
            {**labels, "outcome": "failure", "reason": "invalid_credentials", "worker": "1"}.items())))], 2)
        self.assertEqual(values[("authgateway_login_duration_seconds_count",
                                 (("protocol", "smtp"), ("worker", "1")))], 2)
        self.assertEqual(values[("authgateway_ready", (("worker", "0"),))], 1)
        self.assertEqual(values[("authgateway_workers", (("state", "running"),))], 2)
        self.assertEqual(values[("authgateway_workers", (("state", "down"),))], 0)
        self.assertEqual(values[("authgateway_worker_restarts_total", (("worker", "1"),))], 3)
        self.assertEqual(values[("authgateway_worker_scrape_errors_total", (("worker", "0"),))], 0)
        worker_samples = [labels for (name, labels) in values if not name.startswith("authgateway_worker")]
        self.assertTrue(all(dict(labels).get("worker") in ("0", "1") for labels in worker_samples))
        types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
        self.assertEqual(len(types), len(set(types)))
        self.assertIn("authgateway_login_attempts_total", types)
        checked = yield threads.deferToThread(
            subprocess.run, [promtool, "check", "metrics"], input=text.encode(), capture_output=True,
            timeout=30, check=False)
        self.assertEqual((checked.returncode, checked.stdout, checked.stderr), (0, b"", b""), text)
        code, headers, body = yield self.get("/metrics", accept="application/openmetrics-text")
        self.assertEqual(code, 200)
        self.assertIn("openmetrics", headers["Content-Type"])
        names = {family.name for family in openmetrics_families(body.decode())}
        self.assertIn("authgateway_worker_restarts", names)

    @defer.inlineCallbacks
    def test_worker_down(self):
        """A slot whose worker is down is counted down, not as a scrape error."""
        self.add_worker()
        self.add_fake(running=False, pid=None)
        values = samples((yield self.scrape()))
        self.assertEqual(values[("authgateway_workers", (("state", "down"),))], 1)
        self.assertEqual(values[("authgateway_worker_scrape_errors_total", (("worker", "1"),))], 0)
        self.assertFalse([k for k in values if ("worker", "1") in k[1] and "worker_" not in k[0]])

    @defer.inlineCallbacks
    def assert_left_out(self, slot: Slot, why: str) -> Any:
        """Two scrapes: C{slot} left out and counted each time, the other worker served; logged once."""
        for count in (1, 2):
            values = samples((yield self.scrape()))
            self.assertEqual(values[("authgateway_worker_scrape_errors_total",
                                     (("worker", str(slot.index)),))], count)
            self.assertEqual(values[("authgateway_ready", (("worker", "0"),))], 1)
            self.assertFalse([k for k in values if ("worker", str(slot.index)) in k[1]
                              and "worker_" not in k[0]])
        lines = [e for e in self.logged if "left out of the scrape" in e.get("log_format", "")]
        self.assertEqual(len(lines), 1)
        self.assertEqual(lines[0]["worker"], slot.index)
        self.assertIn(why, lines[0]["why"])
        return values

    @defer.inlineCallbacks
    def test_worker_not_listening(self):
        """A running worker whose socket nobody listens on: left out, counted; back, logged back."""
        self.add_worker()
        slot = self.add_fake(None)
        yield self.assert_left_out(slot, "")
        port = reactor.listenUNIX(slot.metrics_socket, server.Site(Answering(b"up 1\n")))
        self.addCleanup(port.stopListening)
        values = samples((yield self.scrape()))
        self.assertEqual(values[("up", (("worker", "1"),))], 1)
        self.assertTrue([e for e in self.logged if "scraped again" in e.get("log_format", "")])

    def test_worker_hanging(self):
        """A worker that accepts and never answers: left out after the timeout."""
        self.add_worker()
        slot = self.add_fake(protocol.Factory.forProtocol(protocol.Protocol))
        return self.assert_left_out(slot, "no answer within 1 s")

    def test_worker_junk(self):
        self.add_worker()
        slot = self.add_fake(server.Site(Answering(b"<html>this is not {metrics</html>\n")))
        return self.assert_left_out(slot, "not Prometheus text")

    def test_worker_error_status(self):
        self.add_worker()
        slot = self.add_fake(server.Site(Answering(b"up 1\n", code=500)))
        return self.assert_left_out(slot, "answered 500")

    def test_worker_too_large(self):
        """A body over the limit is cut off at the limit, not read to its end."""
        self.add_worker()
        self.workers.metrics_limit = 64 * 1024
        slot = self.add_fake(server.Site(Answering(b"up 1\n" * 100_000)))
        return self.assert_left_out(slot, "over 65536 bytes")

    @defer.inlineCallbacks
    def test_one_scrape_at_a_time(self):
        """Scrapes while one is under way wait for it: each worker is asked once."""
        fake = Answering(b"up 1\n")
        self.add_fake(server.Site(fake))
        self.workers.taken = None
        answers = yield defer.gatherResults([
            threads.deferToThread(get, f"http://127.0.0.1:{self.port}/metrics") for _ in range(4)])
        self.assertEqual([code for code, _, _ in answers], [200] * 4)
        self.assertLessEqual(fake.requests, 2)  # one, or two if the first scrape ended in between
        before = fake.requests
        yield threads.deferToThread(get, f"http://127.0.0.1:{self.port}/metrics")
        self.assertEqual(fake.requests, before)  # within SNAPSHOT_AGE: the last snapshot

    @defer.inlineCallbacks
    def readyz(self) -> Any:
        code, headers, body = yield self.get("/readyz")
        self.assertEqual(headers["Content-Type"], "application/json")
        return code, json.loads(body)

    @defer.inlineCallbacks
    def test_readiness(self):
        """Ready while every slot runs and is ready; each worker's own checks shown."""
        self.add_worker()
        second = self.add_worker()
        code, body = yield self.readyz()
        self.assertEqual((code, body["status"]), (200, "ready"), body)
        self.assertEqual(set(body["checks"]), {"draining", "worker-0", "worker-1"})
        check = body["checks"]["worker-1"]
        self.assertEqual((check["ok"], check["state"], check["pid"], check["code"]),
                         (True, "running", 5001, 200))
        self.assertEqual(check["checks"]["listeners"]["states"]["http"], "listening")

        http = listener(second, "http")
        yield http.stopService()
        code, body = yield self.readyz()
        self.assertEqual((code, body["status"]), (503, "not ready"))
        self.assertEqual((body["checks"]["worker-0"]["ok"], body["checks"]["worker-1"]["ok"]), (True, False))
        self.assertEqual(body["checks"]["worker-1"]["code"], 503)
        self.assertEqual(body["checks"]["worker-1"]["checks"]["listeners"]["states"]["http"], "stopped")
        http.startService()
        self.assertEqual((yield self.readyz())[0], 200)

        self.supervisor.slots[1].running, self.supervisor.slots[1].pid = False, None
        code, body = yield self.readyz()
        self.assertEqual((code, body["checks"]["worker-1"]),
                         (503, {"ok": False, "pid": None, "restarts": 0, "state": "down"}))
        self.assertEqual((yield self.get("/healthz"))[0], 200)  # one worker still runs

    @defer.inlineCallbacks
    def test_readiness_of_a_broken_worker(self):
        """A worker that hangs, or answers something that is not a /readyz: not ready, said why."""
        self.add_worker()
        self.add_fake(protocol.Factory.forProtocol(protocol.Protocol))
        self.add_fake(server.Site(Answering(b"<html>")))
        code, body = yield self.readyz()
        self.assertEqual(code, 503)
        self.assertEqual(body["checks"]["worker-1"]["error"], "no answer within 1 s")
        self.assertEqual(body["checks"]["worker-2"]["error"], "not the answer of a /readyz")
        self.assertTrue(body["checks"]["worker-0"]["ok"])

    @defer.inlineCallbacks
    def test_draining(self):
        """While the supervisor drains: /readyz 503 (the workers still shown), /healthz 200."""
        self.add_worker()
        self.supervisor.draining = True
        code, body = yield self.readyz()
        self.assertEqual((code, body["status"], body["checks"]["draining"]),
                         (503, "draining", {"ok": False, "draining": True}))
        self.assertTrue(body["checks"]["worker-0"]["ok"])
        self.assertEqual((yield self.get("/healthz"))[0], 200)

    @defer.inlineCallbacks
    def test_health(self):
        """/healthz: 200 while a worker runs, 503 when none does."""
        self.add_fake(None)
        self.add_fake(None)
        code, _, body = yield self.get("/healthz")
        self.assertEqual((code, json.loads(body)),
                         (200, {"status": "ok", "workers": {"running": 2, "down": 0}}))
        for slot in self.supervisor.slots:
            slot.running = False
        code, _, body = yield self.get("/healthz")
        self.assertEqual((code, json.loads(body)),
                         (503, {"status": "no worker running", "workers": {"running": 0, "down": 2}}))


class ListenerTests(SynchronousTestCase):
    """The parent's listener on a memory reactor: the caps, and stopping after the workers."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.supervisor = Supervisor([Slot(0, "/nonexistent/w0.sock")], reactor=self.reactor)
        self.parent = service.MultiService()
        self.workers = metrics.serve_parent(  # on the supervisor's reactor
            {"metrics": "tcp:9100:interface=127.0.0.1", "drain-timeout": 10}, self.supervisor, self.parent)
        self.listening = self.parent.getServiceNamed("metrics")

    def test_none(self) -> None:
        parent = service.MultiService()
        self.assertIsNone(metrics.serve_parent({"metrics": "none"}, self.supervisor, parent))
        self.assertEqual(list(parent), [])

    def test_caps(self) -> None:
        """The single-process listener's caps and channel (one request, deadlines)."""
        capped = self.listening.factory
        self.assertIsInstance(capped, metrics._Capped)
        self.assertEqual((capped.limit, capped.per_peer), (metrics.MAX_CONNECTIONS, metrics.MAX_PER_PEER))
        self.assertIs(capped.wrappedFactory.protocol, metrics._Channel)
        self.assertEqual(capped.wrappedFactory.timeOut, metrics.TIMEOUT)

    def test_stops_after_the_workers(self) -> None:
        """Stopping waits while a worker runs (it answers 503 meanwhile), then stops listening."""
        self.parent.startService()
        self.assertEqual(len(self.reactor.tcpServers), 1)
        stopping = self.parent.stopService()
        self.reactor.advance(5)
        self.assertNoResult(stopping)
        self.supervisor.slots[0].running = False
        self.reactor.advance(1)
        self.successResultOf(stopping)

    def test_stops_at_the_bound(self) -> None:
        """A worker that never ends does not hold the parent's stop past drain-timeout + 20 s."""
        self.parent.startService()
        stopping = self.parent.stopService()
        self.reactor.advance(29)
        self.assertNoResult(stopping)
        self.reactor.advance(2)
        self.successResultOf(stopping)


class FetchTests(SynchronousTestCase):
    """L{metrics.fetch_worker} on a memory reactor: every way it ends, bounded."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.d = metrics.fetch_worker(self.reactor, "/run/w0.sock", b"/metrics", limit=100)
        (path, factory, timeout, _), = self.reactor.unixClients
        self.assertEqual((path, timeout), ("/run/w0.sock", metrics.WORKER_TIMEOUT))
        self.transport = StringTransport()
        self.proto = factory.buildProtocol(None)
        self.proto.makeConnection(self.transport)

    def test_request(self) -> None:
        self.assertTrue(self.transport.value().startswith(b"GET /metrics HTTP/1.1\r\n"))

    def test_answer(self) -> None:
        self.proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nup 1\n")
        self.assertEqual(self.successResultOf(self.d), (200, b"up 1\n"))

    def test_silent(self) -> None:
        """No answer within the timeout: the connection aborted, the reason said."""
        self.reactor.advance(metrics.WORKER_TIMEOUT)
        failure = self.failureResultOf(self.d, metrics.WorkerAnswerError)
        self.assertEqual(failure.getErrorMessage(), "no answer within 5 s")
        self.assertTrue(self.transport.disconnecting)

    def test_trickling_body(self) -> None:
        """The timeout covers the body too."""
        self.proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nup")
        self.reactor.advance(metrics.WORKER_TIMEOUT)
        failure = self.failureResultOf(self.d, metrics.WorkerAnswerError)
        self.assertEqual(failure.getErrorMessage(), "no answer within 5 s")
        self.assertEqual(self.transport.producerState, "stopped")  # the socket's: closed

    def test_too_large(self) -> None:
        """Past the limit: refused and aborted at once, whatever the length said."""
        self.proto.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.proto.dataReceived(b"40\r\n" + b"x" * 64 + b"\r\n")
        self.assertNoResult(self.d)
        self.proto.dataReceived(b"40\r\n" + b"x" * 64 + b"\r\n")
        failure = self.failureResultOf(self.d, metrics.WorkerAnswerError)
        self.assertEqual(failure.getErrorMessage(), "answer over 100 bytes")
        self.assertEqual(self.transport.producerState, "stopped")

    def test_closed_without_answer(self) -> None:
        self.proto.connectionLost(Failure(ConnectionResetError("reset by peer")))
        self.assertEqual(self.failureResultOf(self.d, metrics.WorkerAnswerError).getErrorMessage(),
                         "reset by peer")

    def test_cut_short(self) -> None:
        self.proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nup")
        self.proto.connectionLost(Failure(ConnectionResetError("reset")))
        self.assertIn("cut short", self.failureResultOf(self.d, metrics.WorkerAnswerError).getErrorMessage())


def exposition(*, worker_types: bool = True) -> bytes:
    """Text of a registry with a counter, histogram, summary and gauge (with C{_created} samples)."""
    registry = CollectorRegistry()
    Counter("jobs", "Jobs done.", ["kind"], registry=registry).labels("a").inc(3)
    Histogram("job_seconds", "Job time.", registry=registry).observe(0.3)
    Summary("job_bytes", "Job size.", registry=registry).observe(10)
    Gauge("queue", "Queued.", registry=registry).set(2)
    return generate_latest(registry)


class _Families:
    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> list[Any]:
        return self.families


class MergeTests(SynchronousTestCase):
    """L{metrics.worker_families} and L{metrics.merge_families}: what promtool will read."""

    def merged(self, *texts: bytes) -> list[Any]:
        families, refused = metrics._parse_all([(str(i), t) for i, t in enumerate(texts)], [])
        self.assertEqual(refused, {})
        return families

    def test_created_back_in_its_family(self) -> None:
        """The parser's separate C{_created} gauges go back to their counter, histogram, summary."""
        families = {f.name: f for f in self.merged(exposition(), exposition())}
        self.assertEqual(set(families), {"jobs", "job_seconds", "job_bytes", "queue"})
        self.assertEqual(families["jobs"].type, "counter")
        self.assertEqual([(s.name, s.labels["worker"]) for s in families["jobs"].samples],
                         [("jobs_total", "0"), ("jobs_created", "0"), ("jobs_total", "1"),
                          ("jobs_created", "1")])
        text = openmetrics.generate_latest(_Families(list(families.values()))).decode()
        names = {f.name for f in openmetrics_families(text)}
        self.assertEqual(names, {"jobs", "job_seconds", "job_bytes", "queue"})

    def test_promtool(self) -> None:
        promtool = require_tool("promtool", "prometheus")
        text = generate_latest(_Families(self.merged(exposition(), exposition(), exposition())))
        done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                              timeout=30, check=False)
        self.assertEqual((done.returncode, done.stdout, done.stderr), (0, b"", b""), text.decode())

    def test_types_and_names_kept_apart(self) -> None:
        """A family whose type or sample names clash with an earlier one is left out, not mixed in."""
        families = self.merged(b"# TYPE a_total counter\na_total 1\n", b"# TYPE a gauge\na 2\n",
                               b"a_total 3\n", b"# TYPE a_total counter\na_total 4\n")
        self.assertEqual([(f.name, f.type, [(s.name, s.value) for s in f.samples]) for f in families],
                         [("a", "counter", [("a_total", 1), ("a_total", 4)])])

    def test_parent_names_reserved(self) -> None:
        parent = metrics.WorkerMetrics(MemoryReactorClock(), Supervisor([Slot(0, "x")])).families()
        families, _ = metrics._parse_all(
            [("0", b"# TYPE authgateway_workers gauge\nauthgateway_workers 9\n"
                   b"authgateway_worker_restarts_total 9\nup 1\n")], parent)
        self.assertEqual([f.name for f in families], ["up"])

    def test_refused(self) -> None:
        families, refused = metrics._parse_all(
            [("0", b"up 1\n"), ("1", b"\xff\xfe"), ("2", b"not {metrics")], [])
        self.assertEqual([f.name for f in families], ["up"])
        self.assertEqual(refused, {"1": "not Prometheus text: UnicodeDecodeError",
                                   "2": "not Prometheus text: ValueError"})

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.text(alphabet=st.sampled_from(list('ab_{}="\\\n# 1eE+-.NaIf,TYPE counter gauge'
                                                         ' histogram summary _total _created le')),
                            max_size=80), max_size=3))
    def test_any_text(self, texts: list[str]) -> None:
        """Whatever the workers answer: no exception, and the merged families format."""
        families, _ = metrics._parse_all([(str(i), t.encode()) for i, t in enumerate(texts)], [])
        generate_latest(_Families(families))


TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


class WorkersScrapeTests(SynchronousTestCase):
    """
    A real C{twistd authgateway --workers 2 --metrics ...} (its state on a
    real redis-server's UNIX socket): the parent's scrape holds both
    workers' samples and promtool accepts it; a worker killed shows in
    C{/readyz} and the restart counter, and comes back ready.
    """

    def setUp(self) -> None:
        options = tap.Options().defaults
        if "workers" not in options:
            self.skipTest("--workers is not an option of this build yet (the workers part)")
        if "state" not in options:
            self.skipTest("--state is not an option of this build yet (the state part):"
                          " --workers 2 needs a shared --state")
        if not os.path.exists(TWISTD):
            self.skipTest(f"no twistd next to {sys.executable}")
        self.curl = require_tool("curl", "curl")
        self.promtool = require_tool("promtool", "prometheus")
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.log = os.path.join(self.dir, "twistd.log")
        self.ports = {name: free_port() for name in ("http", "metrics")}
        redis = RedisServer(self)
        self.proc = subprocess.Popen(
            [TWISTD, "--pidfile=", "-n", "--logfile", self.log, "authgateway",
             "--data-dir", os.path.join(self.dir, "data"), "--auth", "memory:alice:wonder",
             "--http", f"tcp:{self.ports['http']}:interface=127.0.0.1", "--http-insecure-auth",
             "--metrics", f"tcp:{self.ports['metrics']}:interface=127.0.0.1",
             "--workers", "2", "--state", redis.unix_url],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(self.reap)

    def reap(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # the workers end with their parent (PR_SET_PDEATHSIG)
        self.proc.wait()

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            code, _, body = get(f"http://127.0.0.1:{self.ports['metrics']}{path}")
            return code, body
        except OSError:
            return 0, b""

    def ready(self, what: str, condition: Any = lambda body: True) -> dict[str, Any]:
        """Polls /readyz until it answers 200 and C{condition} holds of its body."""
        end = time.monotonic() + 60
        while True:
            code, body = self.get("/readyz")
            if code == 200 and condition(json.loads(body)):
                return json.loads(body)
            if time.monotonic() > end or self.proc.poll() is not None:
                self.fail(f"never {what}: {code} {body!r}\n{read_log(self.log)[-6000:]}")
            time.sleep(0.1)

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        code, text = self.get("/metrics")
        self.assertEqual(code, 200)
        checked = subprocess.run([self.promtool, "check", "metrics"], input=text, capture_output=True,
                                 timeout=30, check=False)
        self.assertEqual((checked.returncode, checked.stdout, checked.stderr), (0, b"", b""))
        return samples(text.decode())

    def test_scrape_kill_return(self) -> None:
        body = self.ready("ready")
        pids = [body["checks"][f"worker-{k}"]["pid"] for k in (0, 1)]
        self.assertEqual(len(set(pids)), 2)
        for _ in range(16):
            subprocess.run([self.curl, "-sS", "--max-time", "20", "-o", "/dev/null", "-u", "alice:wonder",
                            f"http://127.0.0.1:{self.ports['http']}/whoami"], check=True, timeout=30)
        values = self.scrape()
        ok = {dict(labels)["worker"]: value for (name, labels), value in values.items()
              if name == "authgateway_http_responses_total" and ("code", "200") in labels}
        self.assertEqual((set(ok), sum(ok.values())), ({"0", "1"}, 16))  # sum without(worker)
        self.assertEqual(values[("authgateway_workers", (("state", "running"),))], 2)

        os.kill(pids[1], signal.SIGKILL)
        self.assertEqual(self.get("/healthz")[0], 200)  # worker 0 still serves
        body = self.ready("back", lambda body: body["checks"]["worker-1"]["pid"] not in (None, pids[1]))
        self.assertEqual(body["checks"]["worker-1"]["restarts"], 1)
        # A scrape is reused for a second, and a worker's own families lag its /readyz a little.
        end = time.monotonic() + 15
        while True:
            values = self.scrape()
            fresh = (values.get(("authgateway_worker_restarts_total", (("worker", "1"),))) == 1
                     and values.get(("authgateway_ready", (("worker", "1"),))) == 1)
            if fresh or time.monotonic() > end:
                break
            time.sleep(0.3)
        self.assertEqual(values[("authgateway_worker_restarts_total", (("worker", "1"),))], 1)
        self.assertEqual(values[("authgateway_ready", (("worker", "1"),))], 1)

        self.proc.send_signal(signal.SIGTERM)
        self.assertEqual(self.proc.wait(90), 0)
