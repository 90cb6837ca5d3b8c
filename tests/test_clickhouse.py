"""ClickHouse: batches, the bounded queue, failures; then the round trip with a real server."""

from __future__ import annotations

import json
import os
import re
import socket
import uuid
import zlib
from collections import Counter

from treq.testing import StubTreq
from twisted.internet import defer, reactor, task
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from tempesta_ts.buffers import BufferRegistry
from tempesta_ts.clickhouse import ROW_OVERHEAD, STOP_SECONDS, ClickHouse, line_row, schema
from tempesta_ts.config import Config
from tempesta_ts.incidents import Rules
from tempesta_ts.metrics import KNOWN_STATS
from tempesta_ts.netconsole import LogLine
from tempesta_ts.service import TroubleshootingService
from tests import clickhouse_server
from tests.captures import datagrams, expected_lines
from tests.waits import wait_until

HOST = "192.0.2.10"
PASSWORD = "s3cret-for-clickhouse"
DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "clickhouse.md")


class FakeClickHouse(Resource):
    """Answers as ClickHouse's HTTP interface would, and keeps what it was asked."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        #: (query, body, Authorization) of each request.
        self.requests: list[tuple[str, bytes, str | None]] = []
        #: None: 200; an int: that status; "hang": never answer.
        self.answer: int | str | None = None
        self.hanging = []
        #: (query, body) of each request answered 200.
        self.accepted: list[tuple[str, bytes]] = []
        #: Content-Encoding of each request.
        self.encodings: list[str | None] = []

    def render_POST(self, request):
        query = request.args.get(b"query", [b""])[0].decode()
        body = request.content.read()
        self.encodings.append(request.getHeader("content-encoding"))
        if self.encodings[-1] == "deflate":
            body = zlib.decompress(body)
        self.requests.append((query or body.decode(), body if query else b"", request.getHeader("authorization")))
        if self.answer == "hang":
            self.hanging.append(request)
            return NOT_DONE_YET
        if self.answer is not None:
            request.setResponseCode(self.answer)
            return (b"Code: 193, e.displayText() = DB::Exception: Wrong password for user tempesta, "
                    b"e.what() = DB::Exception\n")
        self.accepted.append(self.requests[-1][:2])
        return b""

    @property
    def inserts(self) -> list[tuple[str, list[dict]]]:
        """(table, rows) of each INSERT answered 200."""
        found = []
        for query, body in self.accepted:
            match = re.match(r"INSERT INTO (\w+)\.(\w+) FORMAT JSONEachRow", query)
            if match:
                found.append((match[2], [json.loads(row) for row in body.decode().splitlines()]))
        return found


class SinkTestCase(unittest.TestCase):
    """A ClickHouse sink on a task.Clock, talking to a FakeClickHouse through StubTreq."""

    def setUp(self):
        self.clock = task.Clock()
        self.stats = Counter()
        self.fake = FakeClickHouse()
        self.stub = StubTreq(self.fake)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def sink(self, max_bytes=1 << 20, **kw) -> ClickHouse:
        sink = ClickHouse("http://ch.example:8123", "tempesta_ts", kw.pop("user", None),
                          kw.pop("password", None), "ts-1", self.clock, self.stub, self.stats,
                          max_bytes, **kw)
        sink.startService()
        self.addCleanup(self.stop, sink)
        self.stub.flush()
        return sink

    def stop(self, sink):
        if sink.running:
            d = sink.stopService()
            self.clock.advance(STOP_SECONDS)
            self.stub.flush()
            return d

    def feed(self, sink, count, start=0, host=HOST):
        registry = BufferRegistry(10, 1000, 1 << 20, Counter())
        registry.every_line.append(sink.lines_added)
        for n in range(start, start + count):
            registry.receive_datagram(host, b"6,%d,%d,-;line %d\n" % (n, 1000 + n, n), 1_800_000_000.25 + n)

    def tick(self, seconds=1.0):
        self.clock.advance(seconds)
        self.stub.flush()

    def warnings(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e.get("log_level") in (LogLevel.warn, LogLevel.error)]


class BatchTests(SinkTestCase):
    """Rows leave in few large inserts, with every field of the line."""

    def test_tables_are_made_first_then_lines_go_in_one_insert_a_second(self):
        sink = self.sink()
        self.assertEqual([q for q, _, _ in self.fake.requests], schema("tempesta_ts"))
        self.feed(sink, 250)
        self.assertEqual(self.fake.inserts, [])
        self.tick()
        ((table, rows),) = self.fake.inserts
        self.assertEqual(table, "kernel_log")
        self.assertEqual([r["text"] for r in rows], [f"line {n}" for n in range(250)])
        self.assertEqual(self.stats["clickhouse_rows_sent"], 250)
        self.assertEqual(sink.queued_rows, 0)
        # Statements as they are, rows compressed.
        self.assertEqual(self.fake.encodings, [None, None, None, "deflate"])

    def test_a_full_batch_goes_at_once(self):
        sink = self.sink(batch_rows=100, max_batch_rows=100)
        self.feed(sink, 250)
        self.clock.advance(0)
        self.stub.flush()
        # Two full batches at once; the 50 left wait for the tick.
        self.assertEqual([len(rows) for _, rows in self.fake.inserts], [100, 100])
        self.tick()
        self.assertEqual([len(rows) for _, rows in self.fake.inserts], [100, 100, 50])

    def test_a_backlog_goes_in_larger_inserts(self):
        sink = self.sink(batch_rows=100, max_batch_rows=1000)
        self.fake.answer = "hang"
        self.feed(sink, 150)
        self.clock.advance(0)
        self.stub.flush()
        # While that insert hangs, 2,500 rows come; once it fails they go in three inserts.
        self.feed(sink, 2500, start=150)
        self.fake.answer = None
        self.tick(30)
        self.tick(1)
        self.assertEqual([len(rows) for _, rows in self.fake.inserts], [1000, 1000, 650])
        self.assertEqual(self.stats["clickhouse_rows_sent"], 2650)

    def test_a_row_holds_time_instance_collector_level_numbers_and_text(self):
        line = LogLine(1_800_000_000.123456, 'tfw: "quoted" \\ tab\there \x01 é ✓', 4, 17, 987654)
        row = json.loads(line_row(json.dumps("192.0.2.10"), json.dumps("ts-1"), line))
        self.assertEqual(row, {
            "received_at": 1_800_000_000, "received_us": 123456, "instance": "192.0.2.10",
            "collector": "ts-1", "level": 4, "seq": 17, "kernel_time_us": 987654,
            "text": 'tfw: "quoted" \\ tab\there \x01 é ✓',
        })
        # Text that needs no escape goes as it is; any that does, escaped.
        for text in ("tfw: é ✓ [tempesta fw] ok", "del \x7f", "nul \x00", "ls \u2028 ps \u2029", "q'uote"):
            self.assertEqual(json.loads(line_row('"a"', '"b"', LogLine(1.5, text)))["text"], text)
        plain = json.loads(line_row('"a"', '"b"', LogLine(1.5, "x")))
        self.assertEqual((plain["level"], plain["seq"], plain["kernel_time_us"]), (None, None, None))
        # No kernel's number: null rather than a batch ClickHouse refuses for ever.
        huge = json.loads(line_row('"a"', '"b"', LogLine(1.5, "x", None, 2**64, -1)))
        self.assertEqual((huge["seq"], huge["kernel_time_us"]), (None, None))

    def test_incidents_of_a_report_become_rows(self):
        sink = self.sink()
        sink.report_made({
            "report_id": "abc123", "created_at": "2027-01-15T08:00:05.000Z",
            "instance": {"address": HOST}, "collector": {"hostname": "ts-1"},
            "incidents": [
                {"kind": "warning", "title": "WARNING in tfw_pool_new", "module": "tempesta_fw",
                 "fingerprint": "9b1e", "line": "WARNING: CPU: 1 PID: 7 at x", "received_at":
                 "2027-01-15T08:00:00.123Z", "seq": 12, "kernel_time_us": 3000, "frames": []},
                {"kind": "bug", "title": "kernel BUG in y", "module": None, "fingerprint": "77",
                 "line": "kernel BUG at y", "received_at": "2027-01-15T08:00:01.000Z", "seq": None,
                 "kernel_time_us": None, "frames": []},
            ],
        })
        self.tick()
        ((table, rows),) = self.fake.inserts
        self.assertEqual(table, "incidents")
        self.assertEqual(rows[0], {
            "received_at": 1800000000, "received_us": 123000, "instance": HOST, "collector": "ts-1",
            "kind": "warning", "title": "WARNING in tfw_pool_new", "module": "tempesta_fw",
            "fingerprint": "9b1e", "report_id": "abc123", "line": "WARNING: CPU: 1 PID: 7 at x",
            "seq": 12, "kernel_time_us": 3000,
        })
        self.assertEqual((rows[1]["kind"], rows[1]["module"], rows[1]["seq"]), ("bug", None, None))

    def test_a_broken_report_is_counted_not_raised(self):
        sink = self.sink()
        sink.report_made({"report_id": "x"})
        self.assertEqual(self.stats["clickhouse_errors"], 1)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_user_and_password_go_as_basic_authentication_never_in_the_url(self):
        self.sink(user="tempesta", password=PASSWORD)
        query, _, authorization = self.fake.requests[0]
        self.assertTrue(authorization.startswith("Basic "))
        self.assertNotIn(PASSWORD, query)

    def test_the_documented_schema_is_the_one_made(self):
        with open(DOCS, encoding="utf-8") as f:
            blocks = re.findall(r"```sql\n(CREATE TABLE.*?)```", f.read(), re.S)

        def words(sql):
            return re.sub(r"\s+", " ", sql.replace("(", " ( ").replace(")", " ) ")).strip()

        self.assertEqual([words(b) for b in blocks], [words(s) for s in schema("tempesta_ts")[1:]])

    def test_every_counter_is_exported(self):
        for key in ("clickhouse_rows_sent", "clickhouse_rows_dropped", "clickhouse_insert_errors",
                    "clickhouse_errors"):
            self.assertIn(key, KNOWN_STATS)


class AwayTests(SinkTestCase):
    """While ClickHouse is away rows wait up to the bound; past it the oldest go, counted."""

    def test_rows_wait_then_the_oldest_are_dropped_and_the_rest_sent_in_order(self):
        # A bound that holds the newest 100 rows of 120.
        rows = [line_row('"192.0.2.10"', '"ts-1"', LogLine(1_800_000_000.25 + n, f"line {n}", 6, n, 1000 + n))
                for n in range(120)]
        sink = self.sink(max_bytes=sum(len(row) + ROW_OVERHEAD for row in rows[20:]), retry_max=4.0)
        self.fake.answer = 503
        self.feed(sink, 60)
        self.tick()
        self.assertEqual(sink.queued_rows, 60)
        self.feed(sink, 60, start=60)
        self.tick(4.0)
        # 120 rows in a queue of 100: the 20 oldest went.
        self.assertEqual(sink.queued_rows, 100)
        self.assertEqual(self.stats["clickhouse_rows_dropped"], 20)
        self.assertGreaterEqual(self.stats["clickhouse_insert_errors"], 2)
        self.fake.answer = None
        self.tick(4.0)
        sent = [r["text"] for _, rows in self.fake.inserts for r in rows]
        self.assertEqual(sent, [f"line {n}" for n in range(20, 120)])
        self.assertEqual(self.stats["clickhouse_rows_sent"], 100)

    def test_one_warning_per_burst_without_the_password_and_one_line_when_back(self):
        sink = self.sink(user="tempesta", password=PASSWORD, retry_max=1.0)
        self.fake.answer = 401
        for _ in range(20):
            self.feed(sink, 1)
            self.tick()
        warnings = self.warnings()
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("ClickHouse at http://ch.example:8123 failed: HTTP 401: Code: 193, e.displayText() = "
                      "DB::Exception: Wrong password for user tempesta", warnings[0])
        self.assertNotIn(PASSWORD, "\n".join(formatEvent(e) for e in self.events))
        self.fake.answer = None
        self.tick()
        back = [formatEvent(e) for e in self.events if "takes rows again" in formatEvent(e)]
        self.assertEqual(len(back), 1)
        self.assertEqual(sink.queued_rows, 0)

    def test_the_tables_are_made_again_after_a_failure(self):
        sink = self.sink()
        self.fake.answer = 500
        self.feed(sink, 1)
        self.tick()
        self.fake.answer = None
        del self.fake.requests[:]
        self.tick()
        queries = [q for q, _, _ in self.fake.requests]
        self.assertEqual(queries[:3], schema("tempesta_ts"))
        self.assertEqual(len(self.fake.inserts), 1)

    def test_retries_wait_longer_each_failure_up_to_the_bound(self):
        sink = self.sink(retry_max=4.0)
        self.fake.answer = 500
        self.feed(sink, 1)
        attempts = []
        for _ in range(12):
            self.tick()
            attempts.append(len(self.fake.requests))
        # Tried at 0 s (start), 1, 2 (wait 1), 4 (wait 2), 8 and 12 (wait 4).
        self.assertEqual(len(set(attempts)), 5, attempts)

    def test_ingest_never_waits_on_a_silent_clickhouse(self):
        sink = self.sink(max_bytes=64 << 20)
        self.fake.answer = "hang"
        registry = BufferRegistry(10, 100_000, 1 << 24, Counter())
        registry.every_line.append(sink.lines_added)
        for n in range(30_000):
            registry.receive_datagram(HOST, b"6,%d,1,-;x %d\n" % (n, n), 1_800_000_000.0)
            if n % 10_000 == 0:
                self.tick()
        # Every line went into the buffer; one insert is out, the rest wait.
        self.assertEqual(registry.stats["lines"], 30_000)
        self.assertEqual(len(registry.get(HOST).buffer), 30_000)
        self.assertEqual(len(self.fake.hanging), 1)
        self.assertGreater(sink.queued_rows, 0)
        # No answer within 30 s is a failed request; its rows wait again.
        self.tick(30)
        self.assertEqual(self.stats["clickhouse_insert_errors"], 1)
        self.assertEqual(sink.queued_rows, 30_000)
        self.assertIn("failed: no answer in time; 30000 rows wait", "\n".join(self.warnings()))

    def test_stop_sends_what_waits_and_counts_what_could_not_go(self):
        sink = self.sink()
        self.feed(sink, 10)
        d = sink.stopService()
        self.stub.flush()
        self.successResultOf(d)
        self.assertEqual(self.stats["clickhouse_rows_sent"], 10)

        self.setUp()
        sink = self.sink()
        self.fake.answer = "hang"
        self.feed(sink, 10)
        d = sink.stopService()
        self.stub.flush()
        self.assertNoResult(d)
        self.clock.advance(STOP_SECONDS)
        self.stub.flush()
        self.successResultOf(d)
        self.assertEqual(self.stats["clickhouse_rows_dropped"], 10)
        self.assertIn("Stopped with 10 rows not sent to ClickHouse", "\n".join(self.warnings()))


class WiringTests(unittest.TestCase):
    """The sink sees every line, whatever the tracker's line filter hides."""

    def test_line_filter_hides_lines_from_the_tracker_not_from_every_line_observers(self):
        registry = BufferRegistry(10, 1000, 1 << 20, Counter())
        registry.line_filter = Rules().line_filter
        everything, filtered = [], []
        registry.every_line.append(lambda instance, lines: everything.extend(lines))
        registry.observers.append(lambda instance, lines: filtered.extend(lines))
        grams = datagrams("extended-boot-and-warning.txt")
        for gram in grams:
            registry.receive_datagram(HOST, gram, 1.0)
        registry.flush(2.0)
        self.assertEqual([l.text for l in everything], expected_lines("extended-boot-and-warning.txt"))
        self.assertLess(len(filtered), len(everything) // 4)

    def test_every_line_observers_change_nothing_the_tracker_sees(self):
        seen = {}
        for every in (False, True):
            watched = set()
            registry = BufferRegistry(10, 1000, 1 << 20, Counter(), watched=watched)
            registry.line_filter = Rules().line_filter
            filtered = seen[every] = []
            if every:
                registry.every_line.append(lambda instance, lines: None)
            registry.observers.append(lambda instance, lines: filtered.extend(l.text for l in lines))
            for name in ("extended-sysrq-crash.txt", "plain-boot-and-warning.txt"):
                for gram in datagrams(name):
                    registry.receive_datagram(HOST, gram, 1.0)
                # A watched instance (an open incident) shows every line.
                watched.add(HOST)
                registry.receive_datagram(HOST, b"6,9999,1,-;an ordinary line\n", 2.0)
                watched.discard(HOST)
            registry.flush(3.0)
        self.assertEqual(seen[True], seen[False])
        self.assertIn("an ordinary line", seen[True])
        self.assertIn("Kernel panic - not syncing: sysrq triggered crash", seen[True])

    def test_off_without_clickhouse_url(self):
        svc = TroubleshootingService(Config(host="127.0.0.1", port=0, metrics_port=0, spool_dir=self.mktemp()), reactor)
        self.assertIsNone(svc.clickhouse)
        self.assertEqual(svc.registry.every_line, [])


def _skip_reason():
    return clickhouse_server.unavailable()


class RealServerTests(unittest.TestCase):
    """Against the installed clickhouse-server, started on free loopback ports."""

    skip = _skip_reason()
    shared = clickhouse_server.Shared()
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.server = yield self.shared.acquire(self)
        self.database = "t_" + uuid.uuid4().hex[:12]

    def start(self, **settings) -> TroubleshootingService:
        settings.setdefault("clickhouse_url", self.server.url)
        settings.setdefault("clickhouse_user", clickhouse_server.USER)
        settings.setdefault("clickhouse_password", clickhouse_server.PASSWORD)
        config = Config(host="127.0.0.1", port=0, metrics_port=0, spool_dir=self.mktemp(),
                        settle_seconds=0.2, clickhouse_database=self.database, **settings)
        svc = TroubleshootingService(config, reactor)
        svc.privilegedStartService()
        svc.startService()
        self.addCleanup(lambda: svc.stopService() if svc.running else None)
        return svc

    @defer.inlineCallbacks
    def send(self, svc, grams):
        """Datagrams over loopback, a hundred at a time as the server reads them."""
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        self.addCleanup(s.close)
        start = svc.stats["datagrams"]
        for n in range(0, len(grams), 100):
            for gram in grams[n : n + 100]:
                s.sendto(gram, svc.listeners.address)
            sent = min(n + 100, len(grams))
            yield wait_until(lambda: svc.stats["datagrams"] - start >= sent)

    def local_report(self, svc) -> dict:
        """The one report written stand-alone."""
        (name,) = os.listdir(os.path.join(svc.config.spool_dir, "local"))
        with open(os.path.join(svc.config.spool_dir, "local", name), encoding="utf-8") as f:
            return json.load(f)

    def select(self, sql):
        return self.server.query(sql.replace("tempesta_ts.", self.database + ".") + " FORMAT JSONEachRow")

    @defer.inlineCallbacks
    def rows(self, sql):
        text = yield self.select(sql)
        return [json.loads(line) for line in text.splitlines()]

    @defer.inlineCallbacks
    def test_lines_and_an_incident_go_in_and_read_back(self):
        name = "extended-boot-and-warning.txt"
        svc = self.start()
        yield self.send(svc, datagrams(name))
        expected = expected_lines(name)
        yield wait_until(lambda: svc.stats["reports_written_local"] == 1
                         and svc.stats["clickhouse_rows_sent"] >= len(expected) + 1, timeout=30)
        report = self.local_report(svc)
        lines = yield self.rows(
            "SELECT instance, collector, level, seq, kernel_time_us, text FROM tempesta_ts.kernel_log "
            "ORDER BY received_at, received_us, seq"
        )
        self.assertEqual([r["text"] for r in lines], expected)
        self.assertEqual({r["instance"] for r in lines}, {"127.0.0.1"})
        self.assertEqual({r["collector"] for r in lines}, {svc.pipeline.make_report.hostname})
        # UInt64 comes back quoted in JSON.
        self.assertEqual([int(r["seq"]) for r in lines][:3], [0, 1, 2])
        incidents = yield self.rows(
            "SELECT kind, title, module, fingerprint, report_id, line FROM tempesta_ts.incidents")
        self.assertEqual(incidents, [{
            key: report["incidents"][0][key] for key in ("kind", "title", "module", "fingerprint", "line")
        } | {"report_id": report["report_id"]}])
        self.assertEqual(svc.stats["clickhouse_insert_errors"], 0)

    @defer.inlineCallbacks
    def test_the_queries_of_the_documentation_run(self):
        svc = self.start()
        name = "extended-sysrq-crash.txt"
        yield self.send(svc, datagrams(name))
        yield wait_until(lambda: svc.stats["reports_written_local"] == 1, timeout=30)
        report = self.local_report(svc)
        yield wait_until(lambda: svc.stats["clickhouse_rows_sent"]
                         == len(expected_lines(name)) + len(report["incidents"]), timeout=30)
        with open(DOCS, encoding="utf-8") as f:
            queries = re.findall(r"```sql\n(.*?)```", f.read(), re.S)
        self.assertGreaterEqual(len(queries), 3)
        answers = []
        for sql in queries:
            sql = sql.strip().rstrip(";").replace("'192.0.2.10'", "'127.0.0.1'")
            if sql.startswith("CREATE") or sql.startswith("ALTER"):
                continue
            text = yield self.select(sql)
            answers.append(text)
        # Every query runs on this server; those about incidents and the instance's log find
        # what was sent (the search for Tempesta FW's errors finds nothing in this capture).
        self.assertEqual([bool(a) for a in answers], [True, True, True, False])

    @defer.inlineCallbacks
    def test_a_wrong_password_is_counted_and_logged_without_it(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        svc = self.start(clickhouse_password="not-" + clickhouse_server.PASSWORD)
        yield wait_until(lambda: svc.stats["clickhouse_insert_errors"] >= 1, timeout=30)
        text = "\n".join(formatEvent(e) for e in events)
        self.assertIn(f"ClickHouse at {self.server.url} failed: HTTP", text)
        self.assertNotIn(clickhouse_server.PASSWORD, text)

    @defer.inlineCallbacks
    def test_clickhouse_away_rows_wait_then_the_oldest_are_dropped_and_ingest_goes_on(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        closed = clickhouse_server.free_ports(1)[0]
        svc = self.start(clickhouse_url=f"http://127.0.0.1:{closed}", clickhouse_queue_max_bytes=1 << 20)
        grams = [b"6,%d,%d,-;tfw: request %d processed %s\n" % (n, n, n, b"x" * 200) for n in range(6000)]
        yield self.send(svc, grams)
        yield wait_until(lambda: svc.stats["lines"] == len(grams), timeout=30)
        yield wait_until(lambda: svc.stats["clickhouse_insert_errors"] >= 1)
        self.assertEqual(len(svc.registry.get("127.0.0.1").buffer), len(grams))
        self.assertGreater(svc.stats["clickhouse_rows_dropped"], 0)
        self.assertEqual(svc.stats["clickhouse_rows_sent"], 0)
        # What waits is the newest rows, within the bound.
        self.assertEqual(svc.clickhouse.queued_rows + svc.stats["clickhouse_rows_dropped"], len(grams))
        self.assertLessEqual(svc.clickhouse._lines.bytes, 1 << 20)
        warnings = [formatEvent(e) for e in events if "ClickHouse at" in formatEvent(e)]
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn(f"ClickHouse at http://127.0.0.1:{closed} failed: Connection was refused", warnings[0])
