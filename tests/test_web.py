"""/status, /status.json, /healthz and the endpoint itself: binding, turning off, quiet logs."""

from __future__ import annotations

import json
import re
import socket

from twisted.internet import defer, error, reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from twisted.web.client import Agent, readBody

from tempesta_ts import __version__
from tempesta_ts.config import Config
from tempesta_ts.errors import StartupError
from tempesta_ts.metrics import KNOWN_STATS
from tempesta_ts.service import TroubleshootingService
from tempesta_ts.web import MAX_ROWS, WebService, duration
from tests.test_metrics import ServerCase, http_get
from tests.test_reporter import EPOCH, Answer, FakeSupport
from tests.live import start_live

TOP_KEYS = {
    "version", "now", "started_at", "listening", "mode", "support_url", "counters", "instances",
    "spool",
}
INSTANCE_KEYS = {
    "address", "kernel_release", "first_seen", "last_seen", "lines", "bytes", "lines_pushed_out",
    "lost_messages", "system_info", "last_incident",
}
INCIDENT_KEYS = {"kind", "title", "line", "received_at", "report_id", "report_state"}
SPOOL_KEYS = {"pending", "bytes", "oldest", "in_flight", "last_error"}
ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")
SCRIPT_LINE = b"[   12.345678] WARNING: CPU: 0 PID: 1 at <script>alert('x')</script> & more\n"
SYSINFO = b'{"sys_info": {"current_kernel": "6.1.0-56-amd64"}}'


class StatusCase(ServerCase):
    """Pages of a server on a Clock."""

    def document(self, svc) -> dict:
        response, body = self.get(svc, "/status.json")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        return json.loads(body)

    def page(self, svc) -> str:
        response, body = self.get(svc, "/status")
        self.assertEqual(response.code, 200)
        content_type = response.headers.getRawHeaders("content-type")
        self.assertEqual(content_type, ["text/html; charset=utf-8"])
        return body.decode("utf-8")

    def system_info(self, svc, host: str, raw: bytes) -> None:
        svc.tcp.accept(host, raw)


class StatusJSONTests(StatusCase):
    """The document another tool reads: its keys and types are a contract."""

    def test_schema_after_traffic(self):
        svc = self.make()
        self.send(svc, "127.0.0.10", b"6,1,100,-;hello\n", b"6,3,200,-;again\n")
        self.send(svc, "127.0.0.9", b"5.10.0-tfw,6,1,100,-;booted\n")
        self.system_info(svc, "127.0.0.9", SYSINFO)
        self.send(svc, "127.0.0.2", SCRIPT_LINE)
        self.advance(0.5)
        doc = self.document(svc)

        self.assertLessEqual(TOP_KEYS, set(doc))
        self.assertEqual(doc["version"], __version__)
        self.assertRegex(doc["now"], ISO)
        self.assertRegex(doc["started_at"], ISO)
        self.assertEqual(doc["listening"], {"host": "127.0.0.1", "port": 0})
        self.assertEqual(doc["mode"], "stand-alone")
        self.assertIsNone(doc["support_url"])
        self.assertLessEqual(set(KNOWN_STATS), set(doc["counters"]))
        self.assertEqual(doc["counters"]["datagrams"], 4)
        self.assertTrue(all(isinstance(v, int) for v in doc["counters"].values()))
        self.assertLessEqual(SPOOL_KEYS, set(doc["spool"]))
        self.assertEqual(
            {k: doc["spool"][k] for k in SPOOL_KEYS},
            {"pending": 0, "bytes": 0, "oldest": None, "in_flight": 0, "last_error": None},
        )

        # By address, as addresses sort: .2, .9, .10.
        addresses = [i["address"] for i in doc["instances"]]
        self.assertEqual(addresses, ["127.0.0.2", "127.0.0.9", "127.0.0.10"])
        for instance in doc["instances"]:
            self.assertLessEqual(INSTANCE_KEYS, set(instance))
            self.assertRegex(instance["first_seen"], ISO)
            self.assertRegex(instance["last_seen"], ISO)
        warned, booted, hello = doc["instances"]
        self.assertEqual(hello["lost_messages"], 1)
        self.assertEqual(hello["lines"], 2)
        self.assertEqual(hello["bytes"], len("hello") + len("again"))
        self.assertIsNone(hello["system_info"])
        self.assertIsNone(hello["last_incident"])
        self.assertEqual(booted["kernel_release"], "5.10.0-tfw")
        self.assertEqual(
            booted["system_info"],
            {"received_at": "2027-01-15T08:00:00.000Z", "size": len(SYSINFO), "format": "json"},
        )
        incident = warned["last_incident"]
        self.assertEqual(set(incident), INCIDENT_KEYS)
        self.assertEqual(incident["kind"], "warning")
        self.assertEqual(incident["line"], SCRIPT_LINE.decode()[15:-1])
        self.assertRegex(incident["received_at"], ISO)
        self.assertIsNone(incident["report_id"])
        self.assertEqual(incident["report_state"], "settling")
        self.assertIsNone(incident["title"])

        self.advance(0.5)
        incident = self.document(svc)["instances"][0]["last_incident"]
        self.assertRegex(incident["report_id"], r"\A[0-9a-f]{32}\Z")
        self.assertEqual(incident["report_state"], "written")
        self.assertEqual(incident["title"], "WARNING: CPU: NUM PID: NUM at <script>alert('x')</script> & more")

    def test_report_states_with_a_support_server(self):
        svc = self.make(FakeSupport([Answer(status=503)]), cooldown_seconds=300.0)
        self.send(svc, "127.0.0.2", b"[   12.345678] WARNING test message\n")
        self.advance(1.0)
        doc = self.document(svc)
        self.assertEqual(doc["mode"], "support-server")
        self.assertEqual(doc["support_url"], "https://support.test:443/api/v1/reports")
        incident = doc["instances"][0]["last_incident"]
        self.assertEqual(incident["report_state"], "pending")
        spool = doc["spool"]
        self.assertEqual(spool["pending"], 1)
        self.assertGreater(spool["bytes"], 0)
        self.assertEqual(spool["oldest"], "2027-01-15T08:00:01.000Z")
        self.assertEqual(spool["last_error"], "HTTP 503 from the Support Server")

        self.advance(1.0)  # the retry is accepted
        doc = self.document(svc)
        self.assertEqual(doc["instances"][0]["last_incident"]["report_state"], "delivered")
        self.assertEqual(doc["spool"]["pending"], 0)
        self.assertIsNone(doc["spool"]["last_error"])

        # The same warning within the cooldown is folded, not reported, once its window closes.
        self.send(svc, "127.0.0.2", b"[   20.000000] WARNING test message\n")
        incident = self.document(svc)["instances"][0]["last_incident"]
        self.assertEqual(incident["report_state"], "settling")
        self.advance(1.0)
        incident = self.document(svc)["instances"][0]["last_incident"]
        self.assertEqual(incident["report_state"], "folded")
        self.assertEqual(incident["title"], "WARNING test message")
        self.assertIsNone(incident["report_id"])

    def test_every_instance_is_listed(self):
        svc = self.make()
        for n in range(MAX_ROWS + 5):
            svc.registry.touch(f"10.0.{n // 256}.{n % 256}", EPOCH + n)
        self.assertEqual(len(self.document(svc)["instances"]), MAX_ROWS + 5)


class StatusPageTests(StatusCase):
    """The HTML page: escaped, capped, readable without a browser's help."""

    def test_lines_from_the_wire_are_escaped(self):
        svc = self.make()
        self.send(svc, "127.0.0.2", SCRIPT_LINE)
        self.system_info(svc, "127.0.0.2", b"<sys-info>plain <b>text</b>")
        self.advance(1.0)
        page = self.page(svc)
        self.assertNotIn("<script>", page)
        self.assertNotIn("<b>text", page)
        self.assertIn("&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more", page)
        self.assertIn("127.0.0.2", page)
        self.assertIn("<b>warning</b>", page)
        self.assertIn(": written", page)
        self.assertIn("written<br>WARNING: CPU: NUM PID: NUM at &lt;script&gt;", page)
        self.assertIn("stand-alone", page)
        self.assertIn(f"tempesta-ts {__version__}", page)
        self.assertNotIn("<script", page.lower())
        self.assertNotIn("http://", page.replace('href="/', ""))
        for key in KNOWN_STATS:
            self.assertIn(f"<th>{key}</th>", page)

    def test_headers_forbid_scripts(self):
        svc = self.make()
        response, _ = self.get(svc, "/status")
        policy = response.headers.getRawHeaders("content-security-policy")[0]
        self.assertIn("default-src 'none'", policy)
        self.assertEqual(response.headers.getRawHeaders("x-content-type-options"), ["nosniff"])

    def test_many_instances_most_recent_first_and_capped(self):
        svc = self.make()
        total = MAX_ROWS + 37
        for n in range(total):
            svc.registry.touch(f"10.0.{n // 256}.{n % 256}", EPOCH + n)
        page = self.page(svc)
        rows = re.findall(r"<tr><td><a href=\"/instances/[^\"]+\">(10\.0\.\d+\.\d+)</a></td>", page)
        self.assertEqual(len(rows), MAX_ROWS)
        newest = total - 1
        self.assertEqual(rows[0], f"10.0.{newest // 256}.{newest % 256}")
        self.assertIn("37 more are not", page)
        self.assertIn(f"Instances ({total})", page)

    def test_empty_server(self):
        page = self.page(self.make())
        self.assertIn("No instance has sent anything yet", page)

    def test_durations(self):
        self.assertEqual(duration(42.9), "42 s")
        self.assertEqual(duration(300), "5 min")
        self.assertEqual(duration(3 * 3600 + 20 * 60), "3 h 20 min")
        self.assertEqual(duration(2 * 86400 + 4 * 3600), "2 d 4 h")

    def test_index_and_unknown_paths(self):
        svc = self.make()
        response, body = self.get(svc, "/")
        self.assertEqual(response.code, 200)
        for path in (b"/status", b"/status.json", b"/metrics", b"/healthz"):
            self.assertIn(b'href="' + path + b'"', body)
        response, _ = self.get(svc, "/nothing")
        self.assertEqual(response.code, 404)


class HealthTests(StatusCase):
    """/healthz without sockets: the service is not running."""

    def test_not_running_is_503(self):
        svc = self.make()
        response, body = self.get(svc, "/healthz")
        self.assertEqual(response.code, 503)
        self.assertEqual(body, b"stopping\n")


class EndpointTests(unittest.TestCase):
    """The real server on loopback."""

    def config(self, **settings) -> Config:
        return Config(host="127.0.0.1", port=0, spool_dir=self.mktemp(), **settings)

    def start(self, **settings) -> TroubleshootingService:
        return start_live(self, self.config(**settings))

    @defer.inlineCallbacks
    def test_healthz_while_listening_then_503(self):
        svc = self.start()
        address = svc.web.address
        status, headers, body = yield http_get(address, "/healthz")
        self.assertEqual((status, body), (200, b"ok\n"))
        self.assertEqual(headers["cache-control"], "no-store")
        yield svc.listeners.stopService()
        status, _, body = yield http_get(address, "/healthz")
        self.assertEqual((status, body), (503, b"not listening\n"))
        # The endpoint is stopped last, once the rest has drained.
        yield svc.stopService()
        self.assertIsNone(svc.web.listening)
        yield self.assertFailure(http_get(address, "/healthz"), error.ConnectionRefusedError)

    @defer.inlineCallbacks
    def test_status_json_over_loopback(self):
        svc = self.start()
        status, headers, body = yield http_get(svc.web.address, "/status.json")
        self.assertEqual(status, 200)
        doc = json.loads(body)
        self.assertEqual(doc["listening"], {"host": "127.0.0.1", "port": svc.listeners.address[1]})
        self.assertTrue(doc["healthy"])

    @defer.inlineCallbacks
    def test_every_answer_forbids_sniffing_and_scripts_metrics_and_404_too(self):
        svc = self.start()
        agent = Agent(reactor)
        pages = [(b"GET", path, 200) for path in ("/", "/status", "/status.json", "/metrics",
                                                   "/healthz")]
        pages += [(b"GET", "/nothing", 404), (b"POST", "/metrics", 405)]
        for method, path, code in pages:
            response = yield agent.request(method, (svc.web.url + path).encode("ascii"))
            yield readBody(response)
            self.assertEqual(response.code, code, path)
            headers = response.headers
            self.assertEqual(headers.getRawHeaders(b"x-content-type-options"), [b"nosniff"], path)
            self.assertEqual(headers.getRawHeaders(b"content-security-policy"),
                             [b"default-src 'none'; style-src 'unsafe-inline'"], path)

    @defer.inlineCallbacks
    def test_requests_write_no_log_lines(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        svc = self.start()
        del events[:]
        for path in ("/metrics", "/status", "/healthz", "/status.json", "/nothing"):
            yield http_get(svc.web.address, path)
        yield svc.stopService()
        texts = [formatEvent(e) for e in events]
        self.assertEqual([t for t in texts if "GET" in t or "HTTP" in t or "Site" in t], [])

    def test_summary_names_the_metrics_address(self):
        svc = self.start()
        self.assertIn(f"metrics on http://127.0.0.1:{svc.web.address[1]}/metrics", svc.summary())

    def test_metrics_port_0_turns_the_endpoint_off(self):
        svc = TroubleshootingService(self.config(metrics_port=0), reactor)
        self.assertIsNone(svc.web)
        self.assertFalse([s for s in svc if isinstance(s, WebService)])
        self.assertIsNone(getattr(svc.reporter, "on_delivered", None))  # stand-alone: no reporter
        svc.privilegedStartService()
        svc.startService()
        self.addCleanup(svc.stopService)
        self.assertIn("metrics off", svc.summary())

    def test_a_busy_metrics_port_stops_the_start_with_one_line(self):
        busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        self.addCleanup(busy.close)
        port = busy.getsockname()[1]
        svc = TroubleshootingService(self.config(metrics_port=port), reactor)
        self.addCleanup(svc.listeners.stopService)
        with self.assertRaises(StartupError) as caught:
            svc.privilegedStartService()
        message = str(caught.exception)
        self.assertEqual(
            message,
            f"metrics_port: cannot listen on TCP 127.0.0.1:{port}: the port is in use by another "
            "program; stop it or choose another --metrics-port (0 turns the endpoint off)",
        )
        self.assertNotIn("\n", message)
