"""The pipeline from lines to reports, as build_pipeline wires it for the server, the
benchmarks and the tests: observers, eviction callbacks, sinks and the report maker."""

from __future__ import annotations

from collections import Counter

from twisted.internet import defer, task
from twisted.logger import LogLevel, formatEvent
from twisted.trial import unittest

from tempesta_ts.buffers import SystemInfo
from tempesta_ts.config import Config
from tempesta_ts.pipeline import SERVER_NAMESPACE, EvictionNotices, ReportMaker, build_pipeline
from tempesta_ts.sysinfo import SystemInfoStore
from tests.test_logs import captured

HOST = "192.0.2.10"
WARNING = b"[   10.000000] WARNING: CPU: 1 PID: 42 at net/core/dev.c:123 dev_queue_xmit+0x1/0x2\n"
CONFIG = Config(max_instances=2, settle_seconds=5.0, cooldown_seconds=300.0)


class Kept:
    """A report sink that keeps what it is handed."""

    def __init__(self) -> None:
        self.reports: list[dict] = []

    def submit(self, report: dict) -> defer.Deferred:
        self.reports.append(report)
        return defer.succeed(report)


class PipelineTests(unittest.TestCase):
    """What build_pipeline connects, each part given it when made."""

    def setUp(self):
        self.clock = task.Clock()
        self.stats = Counter()

    def test_every_sink_is_handed_each_report(self):
        first, second = Kept(), Kept()
        pipeline = build_pipeline(CONFIG, self.clock, self.stats, [first, second])
        pipeline.registry.receive_datagram(HOST, WARNING, self.clock.seconds())
        self.clock.advance(5)
        self.assertEqual(len(first.reports), 1)
        self.assertEqual(first.reports, second.reports)
        self.assertEqual(first.reports[0]["incidents"][0]["kind"], "warning")

    def test_a_sink_that_cannot_keep_the_report_counts_it_lost(self):
        class Failing:
            def submit(self, report):
                return defer.fail(OSError("disk full"))

        kept = Kept()
        pipeline = build_pipeline(CONFIG, self.clock, self.stats, [kept, Failing()])
        pipeline.registry.receive_datagram(HOST, WARNING, self.clock.seconds())
        self.clock.advance(5)
        self.assertEqual(len(kept.reports), 1)
        self.assertEqual(self.stats["reports_lost"], 1)
        self.flushLoggedErrors(OSError)

    def test_line_observers_see_every_line_and_the_tracker_still_reports(self):
        seen = []
        kept = Kept()
        pipeline = build_pipeline(
            CONFIG, self.clock, self.stats, [kept],
            line_observers=[lambda instance, lines: seen.extend(line.text for line in lines)],
        )
        registry = pipeline.registry
        self.assertIsNone(registry.line_filter)
        registry.receive_datagram(HOST, b"4,1,1,-;an ordinary line\n", self.clock.seconds())
        registry.receive_datagram(HOST, b"4,2,2,-;WARNING: CPU: 1 PID: 42 at a.c:1 f+0x1/0x2\n",
                                  self.clock.seconds())
        self.assertEqual(seen, ["an ordinary line", "WARNING: CPU: 1 PID: 42 at a.c:1 f+0x1/0x2"])
        self.clock.advance(5)
        self.assertEqual(len(kept.reports), 1)

    def test_without_line_observers_the_tracker_sees_only_lines_that_can_start_an_incident(self):
        pipeline = build_pipeline(CONFIG, self.clock, self.stats, [Kept()])
        self.assertIs(pipeline.registry.line_filter, pipeline.tracker.rules.line_filter)
        self.assertEqual(pipeline.registry.observers, [pipeline.tracker.lines_added])

    def test_eviction_callbacks_run_before_the_open_window_is_reported(self):
        order = []

        class Noting(Kept):
            def submit(self, report):
                order.append(("report", report["instance"]["address"]))
                return super().submit(report)

        pipeline = build_pipeline(
            CONFIG, self.clock, self.stats, [Noting()],
            evicted=[lambda instance: order.append(("evicted", instance.address))],
        )
        registry = pipeline.registry
        registry.receive_datagram(HOST, WARNING, self.clock.seconds())
        registry.receive_datagram("192.0.2.11", b"hello\n", self.clock.seconds())
        registry.receive_datagram("192.0.2.12", b"hello\n", self.clock.seconds())
        self.assertEqual(order, [("evicted", HOST), ("report", HOST)])


class EvictionNoticeTests(unittest.TestCase):
    """Instances dropped by max_instances are warned of once a minute, with a count."""

    def test_a_burst_of_evictions_is_one_warning_then_a_count(self):
        events = captured(self)
        clock = task.Clock()
        pipeline = build_pipeline(CONFIG, clock, Counter(), [Kept()],
                                  evicted=[EvictionNotices(clock, CONFIG.max_instances)])
        for n in range(5):
            pipeline.registry.receive_datagram(f"192.0.2.{n}", b"x\n", clock.seconds())
        clock.advance(61)
        pipeline.registry.receive_datagram("192.0.2.99", b"x\n", clock.seconds())
        warned = [e for e in events if e.get("log_level") == LogLevel.warn]
        warnings = [formatEvent(e) for e in warned]
        self.assertEqual(len(warnings), 2)
        # Where operators have always found it.
        self.assertEqual({e["log_namespace"] for e in warned}, {SERVER_NAMESPACE})
        self.assertEqual(
            warnings[0],
            "Dropped instance 192.0.2.0 (least recently active) to stay within max_instances=2",
        )
        self.assertIn("(2 more dropped since the last notice)", warnings[1])


class ReportMakerTests(unittest.TestCase):
    """The report carries the instance's newest system information, from memory or disk."""

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1000)
        self.stats = Counter()
        self.store = SystemInfoStore(self.mktemp())
        self.store.prepare()
        self.kept = []
        self.make = ReportMaker(self.clock, "client", self.stats, store=self.store, keep=self.keep,
                                hostname="ts", version="0")
        self.registry = build_pipeline(CONFIG, self.clock, self.stats, [Kept()]).registry

    def keep(self, instance, info):
        self.kept.append((instance.address, info))

    def report(self):
        instance = self.registry.get(HOST)
        return self.make(instance, [], 0), instance

    def test_a_newer_document_on_disk_goes_into_the_report_and_is_kept(self):
        self.registry.receive_system_info(HOST, SystemInfo(10.0, "old", "text"))
        newer = SystemInfo(20.0, '{"newer": 1}', "json", "192.0.2.10")
        self.store.save(HOST, newer)
        report, instance = self.report()
        self.assertEqual(report["system_info"]["text"], '{"newer": 1}')
        self.assertEqual(report["collector"], {"hostname": "ts", "version": "0"})
        self.assertEqual(report["client_id"], "client")
        self.assertEqual(self.kept, [(HOST, newer)])
        # What memory holds is left to `keep` (the TCP side bounds it).
        self.assertEqual(instance.system_info.text, "old")

    def test_an_older_document_on_disk_gives_way_to_the_one_in_memory(self):
        self.registry.receive_system_info(HOST, SystemInfo(30.0, "in memory", "text"))
        self.store.save(HOST, SystemInfo(20.0, "on disk", "text"))
        report, _ = self.report()
        self.assertEqual(report["system_info"]["text"], "in memory")
        self.assertEqual(self.kept, [])

    def test_an_unreadable_document_is_counted_and_the_report_made_all_the_same(self):
        self.registry.receive_system_info(HOST, SystemInfo(30.0, "in memory", "text"))
        with open(self.store._path(HOST), "w") as f:
            f.write("not json")
        report, _ = self.report()
        self.assertEqual(report["system_info"]["text"], "in memory")
        self.assertEqual(self.stats["system_info_store_errors"], 1)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
