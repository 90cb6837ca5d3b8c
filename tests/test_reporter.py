"""Delivery to the Support Server: the spool, the request, retries, TLS over real loopback."""

from __future__ import annotations

import email.utils
import gzip
import json
import os
import socket
from collections import Counter

from OpenSSL import SSL
from treq.testing import StubTreq
from twisted.internet import defer, error, reactor, task
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web.client import ResponseNeverReceived

from tempesta_ts import __version__
from tempesta_ts.config import Config, ConfigError
from tempesta_ts.delivery import GZIP_THRESHOLD, describe_failure, parse_retry_after
from tempesta_ts.https_policy import HTTPSPolicy, UnverifiedTLS
from tempesta_ts.reporter import Reporter
from tempesta_ts.sinks import LocalReports
from tempesta_ts.spool import (
    ReportTooLarge,
    Spool,
    SpooledReport,
    encode_report,
    file_name,
    parse_file_name,
)
from tests.https_server import (
    SupportResource,
    TrackingSite,
    listen,
    make_certificates,
    stop_loopback,
)
from tests.waits import wait_until

KEY = "s3cret-api-key-never-logged"
CLIENT = "client-42"
EPOCH = 1_800_000_000.0


def report(number: int = 1, **extra) -> dict:
    """A report in the body format of support-api.md."""
    body = {
        "version": 1,
        "report_id": f"{number:032x}",
        "client_id": CLIENT,
        "created_at": "2027-01-15T08:00:00.000Z",
        "collector": {"hostname": "ts-1", "version": __version__},
        "instance": {
            "address": "192.0.2.10",
            "kernel_release": None,
            "first_seen": "2027-01-15T07:59:00.000Z",
            "last_seen": "2027-01-15T08:00:00.000Z",
        },
        "incidents": [{
            "kind": "warning",
            "line": "WARNING: CPU: 1 PID: 42 at net/core/dev.c:123 – é",
            "received_at": "2027-01-15T08:00:00.000Z",
            "seq": None,
            "kernel_time_us": None,
        }],
        "suppressed_incidents": 0,
        "log": [],
        "log_dropped_lines": 0,
        "lost_messages": 0,
        "system_info": None,
    }
    body.update(extra)
    return body


def report_of_size(number: int, size: int) -> dict:
    """A report whose JSON body is exactly `size` bytes."""
    base = len(encode_report(report(number, padding="")))
    assert size >= base, f"a report is at least {base} bytes"
    return report(number, padding="x" * (size - base))


class MaxRandom:
    """Full jitter at its ceiling, so that delays are known; records each ceiling asked."""

    def __init__(self) -> None:
        self.ceilings: list[float] = []

    def uniform(self, low: float, high: float) -> float:
        self.ceilings.append(high)
        return high


class Answer:
    """One canned answer: status, headers, body; `hang` keeps the request open."""

    def __init__(self, status=200, headers=None, body=b'{"status": "accepted"}', hang=False):
        self.status = status
        self.headers = headers or {}
        self.body = body
        self.hang = hang


class FakeSupport(resource.Resource):
    """The Support Server behind StubTreq: records requests, answers from a script (then 200)."""

    isLeaf = True

    def __init__(self, answers=()) -> None:
        super().__init__()
        self.answers = list(answers)
        self.requests: list[dict] = []
        self.hanging: list = []
        self.default = Answer()

    def render_POST(self, request):
        headers = {k.lower(): list(v) for k, v in request.requestHeaders.getAllRawHeaders()}
        raw = request.content.read()
        gzipped = headers.get(b"content-encoding") == [b"gzip"]
        self.requests.append({
            "path": request.path, "headers": headers, "raw": raw,
            "body": gzip.decompress(raw) if gzipped else raw,
        })
        answer = self.answers.pop(0) if self.answers else self.default
        if answer.hang:
            self.hanging.append(request)
            return server.NOT_DONE_YET
        request.setResponseCode(answer.status)
        for name, value in answer.headers.items():
            request.setHeader(name, value)
        return answer.body

    def keys(self) -> list[bytes]:
        return [r["headers"][b"idempotency-key"][0] for r in self.requests]


class ReporterTestCase(unittest.TestCase):
    """A Reporter on a Clock with StubTreq; log events captured."""

    def setUp(self):
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.clock = task.Clock()
        self.clock.advance(EPOCH)
        self.spool_dir = self.mktemp()
        self.stats = Counter()
        self.rng = MaxRandom()

    def config(self, **settings) -> Config:
        values = dict(support_host="support.test", support_client_id=CLIENT,
                      support_api_key=KEY, spool_dir=self.spool_dir)
        values.update(settings)
        return Config(**values)

    def reporter(self, support: FakeSupport | None = None, start=True, **kw) -> Reporter:
        self.support = support if support is not None else FakeSupport()
        self.stub = StubTreq(self.support)
        rep = Reporter(self.config(**kw.pop("settings", {})), self.clock, self.stats,
                       http_client=self.stub, rng=self.rng, **kw)
        if start:
            rep.startService()
        return rep

    def submit(self, rep: Reporter, body: dict):
        result = []
        rep.submit(body).addBoth(result.append)
        self.stub.flush()
        self.assertEqual(len(result), 1, "submit fires at once: the write is synchronous")
        if isinstance(result[0], Exception) or hasattr(result[0], "raiseException"):
            result[0].raiseException()
        return result[0]

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.stub.flush()

    def texts(self, level=None) -> list[str]:
        return [formatEvent(e) for e in self.events
                if level is None or e.get("log_level") == level]

    def pending_files(self) -> list[str]:
        path = os.path.join(self.spool_dir, "pending")
        return sorted(os.listdir(path)) if os.path.isdir(path) else []


class RequestTests(ReporterTestCase):
    """What goes on the wire: headers, body, compression."""

    def test_headers_and_body_are_those_of_the_contract(self):
        rep = self.reporter()
        body = report(1)
        self.submit(rep, body)
        self.assertEqual(len(self.support.requests), 1)
        got = self.support.requests[0]
        self.assertEqual(got["path"], b"/api/v1/reports")
        h = got["headers"]
        self.assertEqual(h[b"content-type"], [b"application/json"])
        self.assertEqual(h[b"x-client-id"], [CLIENT.encode()])
        self.assertEqual(h[b"authorization"], [f"Bearer {KEY}".encode()])
        self.assertEqual(h[b"idempotency-key"], [body["report_id"].encode()])
        self.assertEqual(h[b"user-agent"], [f"tempesta-ts/{__version__}".encode()])
        self.assertNotIn(b"content-encoding", h)
        self.assertNotIn(b"cookie", h)
        # Transport headers only beside the contract's (treq always asks for gzip answers).
        extra = set(h) - {b"content-type", b"x-client-id", b"authorization", b"idempotency-key",
                          b"user-agent"}
        self.assertLessEqual(extra, {b"host", b"content-length", b"connection", b"accept-encoding"})
        # UTF-8 JSON, not \\u escapes.
        self.assertEqual(got["raw"], json.dumps(body, ensure_ascii=False).encode("utf-8"))
        self.assertIn("– é".encode("utf-8"), got["raw"])
        self.assertEqual(json.loads(got["raw"]), body)
        self.assertEqual(self.stats["reports_delivered"], 1)
        self.assertEqual(self.pending_files(), [])

    def test_custom_path_and_port(self):
        rep = self.reporter(settings={"support_path": "/in/reports", "support_port": 8443})
        self.assertEqual(rep.url, "https://support.test:8443/in/reports")
        self.submit(rep, report(1))
        self.assertEqual(self.support.requests[0]["path"], b"/in/reports")

    def test_gzip_only_when_the_body_is_larger_than_64_KiB(self):
        rep = self.reporter()
        at_limit = report_of_size(1, GZIP_THRESHOLD)
        above = report_of_size(2, GZIP_THRESHOLD + 1)
        self.assertEqual(len(encode_report(at_limit)), 65536)
        self.submit(rep, at_limit)
        self.submit(rep, above)
        first, second = self.support.requests
        self.assertNotIn(b"content-encoding", first["headers"])
        self.assertEqual(len(first["raw"]), 65536)
        self.assertEqual(second["headers"][b"content-encoding"], [b"gzip"])
        self.assertLess(len(second["raw"]), 65537)
        self.assertEqual(second["body"], encode_report(above))
        self.assertEqual(second["headers"][b"content-length"], [str(len(second["raw"])).encode()])

    def test_ipv6_literal_host_is_bracketed_in_the_host_header(self):
        rep = self.reporter(settings={"support_host": "2001:db8::1", "support_port": 8443})
        self.submit(rep, report(1))
        self.assertEqual(self.support.requests[0]["headers"][b"host"], [b"[2001:db8::1]:8443"])

    def test_a_report_id_unfit_for_a_file_name_is_refused(self):
        rep = self.reporter()
        d = rep.submit(report(1, report_id="../../etc/passwd"))
        self.failureResultOf(d, ValueError)
        self.assertEqual(self.support.requests, [])
        self.assertEqual(self.stats["spool_errors"], 1)


class RetryTests(ReporterTestCase):
    """Transient failures, Retry-After, credentials refused."""

    def test_503_then_200_keeps_the_idempotency_key_and_body(self):
        rep = self.reporter(FakeSupport([Answer(503), Answer(503)]))
        entry = self.submit(rep, report(7))
        self.assertEqual(len(self.support.requests), 1)
        self.assertEqual(rep.states[entry.report_id].last_status, 503)
        self.assertEqual(rep.state_of(entry.report_id), "pending")
        self.assertEqual(rep.last_error, "HTTP 503 from the Support Server")
        self.advance(1.0)  # first backoff: full jitter up to 1 s
        self.assertEqual(len(self.support.requests), 2)
        self.advance(2.0)
        self.assertEqual(len(self.support.requests), 3)
        self.assertEqual(self.support.keys(), [entry.report_id.encode()] * 3)
        self.assertEqual(len({r["raw"] for r in self.support.requests}), 1)
        self.assertEqual(self.stats["reports_retried"], 2)
        self.assertEqual(self.stats["reports_delivered"], 1)
        self.assertEqual(self.pending_files(), [])
        self.assertIsNone(rep.last_error)
        self.assertEqual(rep.states, {})
        self.assertEqual(rep.state_of(entry.report_id), "delivered")
        self.assertEqual(rep.state_of("never-seen"), "unknown")

    def test_backoff_doubles_with_full_jitter_up_to_the_cap(self):
        support = FakeSupport()
        support.default = Answer(500)
        rep = self.reporter(support)
        self.submit(rep, report(1))
        for _ in range(11):
            delay = rep.states[report(1)["report_id"]].next_attempt - self.clock.seconds()
            self.advance(delay)
        self.assertEqual(self.rng.ceilings, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300])
        self.assertEqual(len(self.support.requests), 12)
        self.assertEqual(len(self.pending_files()), 1)

    def test_jitter_may_retry_sooner_than_the_ceiling(self):
        rep = self.reporter(FakeSupport([Answer(502)]))
        rep.rng = type("Low", (), {"uniform": staticmethod(lambda a, b: a + (b - a) / 4)})()
        self.submit(rep, report(1))
        self.advance(0.25)
        self.assertEqual(len(self.support.requests), 2)

    def test_429_retry_after_seconds_is_waited(self):
        rep = self.reporter(FakeSupport([Answer(429, {b"retry-after": b"120"})]))
        self.submit(rep, report(1))
        self.advance(119.9)
        self.assertEqual(len(self.support.requests), 1)
        self.advance(0.1)
        self.assertEqual(len(self.support.requests), 2)
        self.assertEqual(self.stats["reports_delivered"], 1)

    def test_retry_after_http_date_is_waited(self):
        date = email.utils.formatdate(EPOCH + 90, usegmt=True).encode()
        rep = self.reporter(FakeSupport([Answer(503, {b"retry-after": date})]))
        self.submit(rep, report(1))
        self.advance(89.5)
        self.assertEqual(len(self.support.requests), 1)
        self.advance(0.5)
        self.assertEqual(len(self.support.requests), 2)

    def test_retry_after_is_capped_at_an_hour(self):
        rep = self.reporter(FakeSupport([Answer(503, {b"retry-after": b"999999"})]))
        self.submit(rep, report(1))
        self.advance(3599)
        self.assertEqual(len(self.support.requests), 1)
        self.advance(1)
        self.assertEqual(len(self.support.requests), 2)

    def test_408_and_unlisted_statuses_are_transient(self):
        for status in (408, 404, 301, 599):
            self.stats.clear()
            rep = self.reporter(FakeSupport([Answer(status)]))
            self.submit(rep, report(status))
            self.assertEqual(self.stats["reports_retried"], 1, status)
            self.advance(1)
            self.assertEqual(self.stats["reports_delivered"], 1, status)
            rep.stopService()

    def test_401_names_the_client_never_the_key_and_retries_at_the_cap(self):
        rep = self.reporter(FakeSupport([Answer(401), Answer(403)]))
        self.submit(rep, report(1))
        errors = self.texts(LogLevel.error)
        self.assertEqual(len(errors), 1)
        self.assertIn(CLIENT, errors[0])
        self.assertIn("401", errors[0])
        self.assertIn("credentials", rep.last_error)
        self.advance(299.9)
        self.assertEqual(len(self.support.requests), 1)
        self.advance(0.1)
        self.assertEqual(len(self.support.requests), 2)  # 403: the same again
        self.advance(300)
        self.assertEqual(len(self.support.requests), 3)
        self.assertEqual(self.stats["reports_delivered"], 1)
        self.assertEqual(self.rng.ceilings, [])  # never the jittered backoff
        for event in self.events:
            self.assertNotIn(KEY, formatEvent(event))
            self.assertNotIn(KEY, repr(event))

    def test_a_key_echoed_by_the_server_is_not_logged(self):
        echo = f'{{"error": "bad key {KEY}"}}'.encode()
        rep = self.reporter(FakeSupport([Answer(400, body=echo)]))
        self.submit(rep, report(1))
        text = " ".join(self.texts())
        self.assertIn("bad key ********", text)
        self.assertNotIn(KEY, text)

    def test_transient_failures_are_logged_once_per_burst(self):
        support = FakeSupport()
        support.default = Answer(503)
        rep = self.reporter(support, max_in_flight=10)
        for n in range(5):
            self.submit(rep, report(n))
        warnings = [t for t in self.texts(LogLevel.warn) if "not delivered" in t]
        self.assertEqual(len(warnings), 1)
        self.assertIn("HTTP 503", warnings[0])
        self.advance(61)
        warnings = [t for t in self.texts(LogLevel.warn) if "not delivered" in t]
        self.assertEqual(len(warnings), 2)
        self.assertRegex(warnings[1], r"\(\d+ similar failures since the last notice\)")

    def test_a_single_failure_has_no_zero_count_suffix(self):
        rep = self.reporter(FakeSupport([Answer(503)]))
        self.submit(rep, report(1))
        (warning,) = [t for t in self.texts(LogLevel.warn) if "not delivered" in t]
        self.assertNotIn("similar failures", warning)

    def test_the_delivery_line_names_the_instance_kind_and_title(self):
        rep = self.reporter(FakeSupport())
        body = report(1)
        body["incidents"][0]["title"] = "WARNING in dev_queue_xmit"
        self.submit(rep, body)
        (line,) = [t for t in self.texts(LogLevel.info) if "delivered (HTTP" in t]
        self.assertTrue(line.startswith(
            f"Report {1:032x} for 192.0.2.10: warning: WARNING in dev_queue_xmit delivered (HTTP 200, attempt 1"
        ), line)

    def test_a_hanging_request_times_out_and_is_retried(self):
        rep = self.reporter(FakeSupport([Answer(hang=True)]))
        self.submit(rep, report(1))
        self.advance(29.9)
        self.assertEqual(rep.in_flight, 1)
        self.advance(0.1)
        self.assertEqual(rep.in_flight, 0)
        self.assertIn("timeout", rep.last_error)
        self.assertEqual(self.stats["reports_retried"], 1)
        self.advance(1)
        self.assertEqual(self.stats["reports_delivered"], 1)


class RejectionTests(ReporterTestCase):
    """400, 413, 422: kept under rejected/, never sent again."""

    def test_rejected_reports_move_to_rejected_and_are_never_resent(self):
        for number, status in enumerate((400, 413, 422)):
            body = b"E" * 150 + b"F" * 150
            rep = self.reporter(FakeSupport([Answer(status, body=body)]))
            entry = self.submit(rep, report(number))
            self.assertEqual(self.stats["reports_rejected"], number + 1)
            self.assertEqual(rep.state_of(entry.report_id), "rejected")
            self.assertIn(os.path.basename(entry.path),
                          os.listdir(os.path.join(self.spool_dir, "rejected")))
            self.assertNotIn(os.path.basename(entry.path), self.pending_files())
            error = [t for t in self.texts(LogLevel.error) if entry.report_id in t]
            self.assertEqual(len(error), 1)
            self.assertIn(f"HTTP {status}", error[0])
            self.assertIn("E" * 150 + "F" * 50, error[0])
            self.assertNotIn("F" * 51, error[0])
            self.advance(86400)
            self.assertEqual(len(self.support.requests), 1)
            rep.stopService()


class FlowTests(ReporterTestCase):
    """In-flight bound, spool bound, restarts, stand-alone, shutdown."""

    def test_default_in_flight_bound_serves_a_crash_storm(self):
        self.assertEqual(self.reporter(FakeSupport()).max_in_flight, 32)

    def test_in_flight_is_bounded_and_the_rest_queue_oldest_first(self):
        support = FakeSupport()
        support.default = Answer(hang=True)
        rep = self.reporter(support, max_in_flight=4)
        for n in range(6):
            self.clock.advance(1)
            self.submit(rep, report(n))
        self.assertEqual(rep.in_flight, 4)
        self.assertEqual(self.support.keys(), [report(n)["report_id"].encode() for n in range(4)])
        first = support.hanging.pop(0)
        first.setResponseCode(200)
        first.finish()
        self.stub.flush()
        self.assertEqual(self.stats["reports_delivered"], 1)
        self.assertEqual(rep.in_flight, 4)
        self.assertEqual(len(self.support.requests), 5)
        self.assertEqual(self.support.keys()[4], report(4)["report_id"].encode())

    def test_the_spool_bound_drops_the_oldest_with_an_error(self):
        spool = Spool(self.spool_dir, 1500, self.stats, self.clock)
        size = len(encode_report(report_of_size(0, 700)))
        written = []
        for n in range(3):
            self.clock.advance(1)
            written.append(spool.write(report_of_size(n, 700)))
        self.assertEqual([e.report_id for e in spool.pending()],
                         [written[1].report_id, written[2].report_id])
        self.assertEqual(spool.bytes, 2 * size)
        self.assertEqual(spool.count, 2)
        self.assertEqual(spool.oldest_created, written[1].created)
        self.assertFalse(os.path.exists(written[0].path))
        self.assertEqual(self.stats["reports_dropped"], 1)
        errors = self.texts(LogLevel.error)
        self.assertEqual(len(errors), 1)
        self.assertIn(written[0].report_id, errors[0])
        # A burst: counted, logged again only after the interval.
        spool.write(report_of_size(3, 700))
        self.assertEqual(self.stats["reports_dropped"], 2)
        self.assertEqual(len(self.texts(LogLevel.error)), 1)

    def test_a_report_larger_than_the_bound_is_refused_and_drops_nothing(self):
        spool = Spool(self.spool_dir, 1500, self.stats, self.clock)
        kept = spool.write(report_of_size(1, 700))
        self.assertRaises(ReportTooLarge, spool.write, report_of_size(2, 1501))
        self.assertEqual(spool.pending(), [kept])
        self.assertEqual(len(self.pending_files()), 1)
        self.assertEqual(self.stats["reports_dropped"], 1)
        self.assertIn("spool_max_bytes", self.texts(LogLevel.error)[0])

    def test_the_newest_report_is_kept_even_when_it_fills_the_bound(self):
        spool = Spool(self.spool_dir, 1500, self.stats, self.clock)
        spool.write(report_of_size(1, 700))
        newest = spool.write(report_of_size(2, 1500))
        self.assertEqual(spool.pending(), [newest])

    def test_the_bound_is_enforced_at_load_and_a_report_is_spooled_once(self):
        spool = Spool(self.spool_dir, 10**6, self.stats, self.clock)
        first = spool.write(report_of_size(1, 700))
        self.assertIs(spool.write(report_of_size(1, 700)), first)
        self.clock.advance(1)
        second = spool.write(report_of_size(2, 700))
        smaller = Spool(self.spool_dir, 1000, self.stats, self.clock)
        self.assertEqual(smaller.pending(), [second])
        self.assertEqual(self.stats["reports_dropped"], 1)

    def test_written_files_are_durable_json_named_by_time_and_id(self):
        spool = Spool(self.spool_dir, 10**6, self.stats, self.clock)
        entry = spool.write(report(5))
        name = os.path.basename(entry.path)
        self.assertEqual(parse_file_name(name), (EPOCH, report(5)["report_id"]))
        with open(entry.path, "rb") as f:
            self.assertEqual(json.loads(f.read()), report(5))
        self.assertEqual(os.stat(entry.path).st_mode & 0o777, 0o600)
        self.assertEqual(os.listdir(spool.tmp_dir), [])
        self.assertEqual(entry, SpooledReport(report(5)["report_id"], entry.path,
                                              len(encode_report(report(5))), EPOCH))

    def test_a_restart_sends_what_the_spool_holds_oldest_first(self):
        first = self.reporter(start=False)
        for n in (3, 1, 2):
            self.clock.advance(1)
            self.submit(first, report(n))
        self.assertEqual(self.support.requests, [])  # not started: spooled only
        first.stopService()
        # Leftovers of a crash: a half-written file and a stranger.
        with open(os.path.join(self.spool_dir, "tmp", "x.json.tmp"), "wb") as f:
            f.write(b"{")
        with open(os.path.join(self.spool_dir, "pending", "README"), "wb") as f:
            f.write(b"not a report")
        second = self.reporter(start=False)
        self.assertEqual(second.spool.count, 0)  # the disk is read at start-up
        second.startService()
        self.stub.flush()
        self.assertEqual(self.support.keys(), [report(n)["report_id"].encode() for n in (3, 1, 2)])
        self.assertEqual(self.stats["reports_delivered"], 3)
        # The stranger is no report: set aside in corrupt/, never sent.
        self.assertEqual(self.pending_files(), [])
        self.assertEqual(os.listdir(os.path.join(self.spool_dir, "corrupt")), ["README"])
        self.assertEqual(os.listdir(os.path.join(self.spool_dir, "tmp")), [])
        self.assertTrue(any("3 reports" in t for t in self.texts(LogLevel.info)))

    def test_stand_alone_writes_local_json_and_sends_nothing(self):
        config = Config(spool_dir=self.spool_dir)
        rep = LocalReports(Spool.of(config, self.stats, self.clock), self.stats)
        rep.startService()
        results = []
        rep.submit(report(9)).addCallback(results.append)
        [path] = results
        self.assertEqual(os.path.dirname(path), os.path.join(self.spool_dir, "local"))
        self.assertEqual(os.path.basename(path), file_name(EPOCH, report(9)["report_id"]))
        with open(path, "rb") as f:
            self.assertEqual(f.read(), encode_report(report(9)))
        self.assertEqual(self.stats["reports_written_local"], 1)
        self.assertEqual(rep.state_of(report(9)["report_id"]), "written")
        self.assertIsNone(getattr(rep, "client", None))  # no HTTP client, no connection pool
        self.assertTrue(any(path in t for t in self.texts(LogLevel.info)))
        self.assertEqual(self.pending_files(), [])
        self.successResultOf(rep.stopService())

    def test_stop_cancels_a_hanging_request_after_the_grace_and_keeps_the_report(self):
        rep = self.reporter(FakeSupport([Answer(hang=True)]))
        entry = self.submit(rep, report(1))
        d = rep.stopService()
        self.advance(4.9)
        self.assertNoResult(d)
        self.advance(0.1)
        self.successResultOf(d)
        self.assertEqual(rep.in_flight, 0)
        self.assertEqual(self.pending_files(), [os.path.basename(entry.path)])
        self.assertEqual(self.stats["reports_retried"], 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        # Nothing more is attempted once stopped.
        self.advance(3600)
        self.assertEqual(len(self.support.requests), 1)

    def test_stop_waits_for_a_request_that_ends_within_the_grace(self):
        support = FakeSupport([Answer(hang=True)])
        rep = self.reporter(support)
        self.submit(rep, report(1))
        d = rep.stopService()
        self.advance(1)
        request = support.hanging.pop()
        request.setResponseCode(200)
        request.finish()
        self.stub.flush()
        self.successResultOf(d)
        self.assertEqual(self.stats["reports_delivered"], 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_failure_during_the_grace_is_kept_for_the_next_run(self):
        support = FakeSupport([Answer(hang=True)])
        rep = self.reporter(support)
        self.submit(rep, report(1))
        d = rep.stopService()
        request = support.hanging.pop()
        request.setResponseCode(503)
        request.finish()
        self.stub.flush()
        self.successResultOf(d)
        self.assertEqual(len(self.pending_files()), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_on_delivered_gets_the_time_from_spool_to_delivery(self):
        seen = []
        rep = self.reporter(FakeSupport([Answer(503)]),
                            on_delivered=lambda report_id, seconds: seen.append((report_id, seconds)))
        self.submit(rep, report(1))
        self.advance(1)
        self.assertEqual(seen, [(report(1)["report_id"], 1.0)])


class PieceTests(unittest.TestCase):
    """Small pure pieces."""

    def test_file_names_round_trip_and_sort_by_time(self):
        names = [file_name(t, "ab") for t in (0.0, 1.5, EPOCH, EPOCH + 0.000001)]
        self.assertEqual(names, sorted(names))
        self.assertEqual(names[0], "19700101T000000.000000Z-ab.json")
        self.assertEqual(parse_file_name(names[3]), (EPOCH + 0.000001, "ab"))
        self.assertIsNone(parse_file_name("README"))

    def test_retry_after(self):
        self.assertEqual(parse_retry_after(b"30", EPOCH), 30.0)
        self.assertIsNone(parse_retry_after(None, EPOCH))
        self.assertIsNone(parse_retry_after(b"soon", EPOCH))
        self.assertIsNone(parse_retry_after(b"-5", EPOCH))
        date = email.utils.formatdate(EPOCH + 42, usegmt=True).encode()
        self.assertEqual(parse_retry_after(date, EPOCH), 42.0)
        past = email.utils.formatdate(EPOCH - 42, usegmt=True).encode()
        self.assertEqual(parse_retry_after(past, EPOCH), 0.0)

    def test_failures_are_described_with_the_fix(self):
        def why(exc):
            failed = describe_failure(Failure(exc), "support.test", 443)
            return failed.cause, failed.why

        def tls(reason):
            return ResponseNeverReceived([Failure(SSL.Error([("SSL routines", "", reason)]))])

        kind, text = why(tls("certificate verify failed"))
        self.assertEqual(kind, "tls-verify")
        self.assertIn("support.test", text)
        self.assertIn("support_ca_file", text)
        self.assertIn("skip_ssl_verification", text)
        self.assertEqual(why(tls("wrong version number")),
                         ("tls", "TLS handshake with support.test:443 failed: wrong version number"))
        self.assertEqual(why(error.ConnectionRefusedError()),
                         ("refused", "connection refused by support.test:443"))
        self.assertEqual(why(error.DNSLookupError("support.test")),
                         ("dns", "cannot resolve support.test (DNS)"))
        self.assertEqual(why(error.TimeoutError())[0], "timeout")
        self.assertEqual(why(ResponseNeverReceived([Failure(error.ConnectionDone())]))[0], "lost")

    def test_unverified_tls_sends_sni_for_names_only(self):
        self.assertEqual(UnverifiedTLS("support.tfw.dev").server_name, b"support.tfw.dev")
        self.assertIsNone(UnverifiedTLS("192.0.2.1").server_name)
        self.assertIsNone(UnverifiedTLS("2001:db8::1").server_name)

    def test_a_ca_file_without_certificates_is_a_config_error(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("not a certificate\n")
        e = self.assertRaises(ConfigError, HTTPSPolicy, "support.test", path, True)
        self.assertIn("support_ca_file", str(e))


# --- real TLS over loopback ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackTLSTests(unittest.TestCase):
    """The real client against a real HTTPS server on 127.0.0.1 (and ::1), real reactor."""

    timeout = 15

    def setUp(self):
        self.certs = make_certificates(self.mktemp())
        self.spool_dir = self.mktemp()
        self.stats = Counter()
        self.reporters: list[Reporter] = []
        self.servers: list = []
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(self.stop_all)

    @defer.inlineCallbacks
    def stop_all(self):
        yield stop_loopback(self.reporters, self.servers)
        globalLogPublisher.removeObserver(self.events.append)
        for event in self.events:
            self.assertNotIn(KEY, formatEvent(event))

    def serve(self, statuses=(), port: int = 0, interface: str = "127.0.0.1"):
        support = SupportResource(statuses)
        site = TrackingSite(support)
        listening = listen(reactor, site, self.certs, port, interface)
        self.servers.append((site, listening))
        return support, listening.getHost().port

    def start(self, port: int, host: str = "127.0.0.1", stats=None, **settings) -> Reporter:
        config = Config(support_host=host, support_port=port, support_client_id=CLIENT,
                        support_api_key=KEY, spool_dir=self.spool_dir, **settings)
        rep = Reporter(config, reactor, stats if stats is not None else self.stats,
                       backoff_base=0.05, backoff_cap=0.2, connect_timeout=2, response_timeout=3)
        rep.startService()
        self.reporters.append(rep)
        return rep

    @defer.inlineCallbacks
    def test_a_private_ca_and_an_ip_address_host(self):
        support, port = self.serve()
        rep = self.start(port, support_ca_file=self.certs.ca_file)
        small, large = report(1), report_of_size(2, 200_000)
        yield rep.submit(small)
        yield rep.submit(large)
        yield wait_until(lambda: self.stats["reports_delivered"] == 2)
        first, second = sorted(support.received, key=lambda r: r.body != encode_report(small))
        self.assertEqual(first.method, b"POST")
        self.assertEqual(first.path, b"/api/v1/reports")
        self.assertEqual(first.body, json.dumps(small, ensure_ascii=False).encode("utf-8"))
        self.assertEqual(first.headers[b"content-type"], [b"application/json"])
        self.assertEqual(first.headers[b"authorization"], [f"Bearer {KEY}".encode()])
        self.assertEqual(first.headers[b"x-client-id"], [CLIENT.encode()])
        self.assertEqual(first.headers[b"idempotency-key"], [small["report_id"].encode()])
        self.assertEqual(first.headers[b"user-agent"], [f"tempesta-ts/{__version__}".encode()])
        self.assertEqual(first.headers[b"host"], [f"127.0.0.1:{port}".encode()])
        # Exactly the contract's headers, plus what HTTP/1.1 itself needs.
        self.assertEqual(set(first.headers), {
            b"content-type", b"x-client-id", b"authorization", b"idempotency-key", b"user-agent",
            b"host", b"content-length"})
        self.assertIsNone(first.server_name)  # no SNI for an IP address (RFC 6066)
        self.assertEqual(second.headers[b"content-encoding"], [b"gzip"])
        self.assertEqual(second.body, encode_report(large))
        self.assertEqual(rep.spool.count, 0)
        self.assertIsNone(rep.last_error)

    @defer.inlineCallbacks
    def test_a_private_ca_and_a_dns_name_sends_sni(self):
        support, port = self.serve()
        rep = self.start(port, host="localhost", support_ca_file=self.certs.ca_file)
        yield rep.submit(report(1))
        yield wait_until(lambda: self.stats["reports_delivered"] == 1)
        self.assertEqual(support.received[0].server_name, b"localhost")

    @defer.inlineCallbacks
    def test_an_ipv6_literal_host(self):
        try:
            support, port = self.serve(interface="::1")
        except Exception as e:
            raise unittest.SkipTest(f"no IPv6 loopback: {e}") from None
        rep = self.start(port, host="::1", support_ca_file=self.certs.ca_file)
        yield rep.submit(report(1))
        yield wait_until(lambda: self.stats["reports_delivered"] == 1)
        self.assertEqual(support.received[0].headers[b"host"], [f"[::1]:{port}".encode()])

    @defer.inlineCallbacks
    def test_an_ip_address_the_certificate_does_not_name_fails_verification(self):
        support, port = self.serve(interface="127.0.0.2")
        rep = self.start(port, host="127.0.0.2", support_ca_file=self.certs.ca_file)
        yield rep.submit(report(1))
        yield wait_until(lambda: self.stats["reports_retried"] >= 1)
        self.assertEqual(support.received, [])
        self.assertIn("does not name 127.0.0.2", rep.last_error)

    @defer.inlineCallbacks
    def test_the_system_store_does_not_trust_a_private_ca(self):
        support, port = self.serve()
        rep = self.start(port)
        yield rep.submit(report(1))
        yield wait_until(lambda: self.stats["reports_retried"] >= 2)
        self.assertEqual(support.received, [])
        self.assertEqual(self.stats["reports_delivered"], 0)
        self.assertIn("TLS verification failed for 127.0.0.1", rep.last_error)
        self.assertIn("support_ca_file", rep.last_error)
        self.assertEqual(rep.spool.count, 1)

    @defer.inlineCallbacks
    def test_skip_ssl_verification_delivers_and_still_sends_sni(self):
        support, port = self.serve()
        rep = self.start(port, host="localhost", skip_ssl_verification=True)
        yield rep.submit(report(1))
        yield wait_until(lambda: self.stats["reports_delivered"] == 1)
        self.assertEqual(support.received[0].server_name, b"localhost")

    @defer.inlineCallbacks
    def test_a_server_down_then_up(self):
        port = free_port()
        rep = self.start(port, support_ca_file=self.certs.ca_file)
        yield rep.submit(report(1))
        yield wait_until(lambda: self.stats["reports_retried"] >= 2)
        self.assertIn("connection refused", rep.last_error)
        support, _ = self.serve(port=port)
        yield wait_until(lambda: self.stats["reports_delivered"] == 1)
        self.assertEqual(len(support.received), 1)

    @defer.inlineCallbacks
    def test_a_second_reporter_delivers_what_the_first_left(self):
        support, port = self.serve(statuses=[503] * 1000)
        first = self.start(port, support_ca_file=self.certs.ca_file)
        yield first.submit(report(1))
        yield wait_until(lambda: self.stats["reports_retried"] >= 1)
        yield first.stopService()
        self.assertEqual(first.spool.count, 1)
        support.statuses.clear()
        stats = Counter()
        self.start(port, stats=stats, support_ca_file=self.certs.ca_file)
        yield wait_until(lambda: stats["reports_delivered"] == 1)
        keys = {r.headers[b"idempotency-key"][0] for r in support.received}
        self.assertEqual(keys, {report(1)["report_id"].encode()})
        self.assertEqual(os.listdir(os.path.join(self.spool_dir, "pending")), [])
