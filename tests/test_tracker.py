"""Settle windows and cooldown, with a task.Clock."""

from __future__ import annotations

from collections import Counter

from twisted.internet import defer, task
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial import unittest

from tempesta_ts.config import Config
from tempesta_ts.netconsole import Decoder, parse_plain_line
from tempesta_ts.pipeline import build_pipeline
from tempesta_ts.report import build_report
from tests.captures import datagrams

HOST = "192.0.2.10"
WARNING = b"[   10.000000] WARNING: CPU: %d PID: %d at net/core/dev.c:123 dev_queue_xmit+0x1/0x2\n"
# One WARN_ON in an allocator, reached from two callers: one line, two bugs.
ALLOC_WARNING = (
    b"[   20.000000] WARNING: CPU: 1 PID: 7 at mm/page_alloc.c:4360 __alloc_pages+0x2cc/0x340\n"
    b"[   20.000001] RIP: 0010:__alloc_pages+0x2cc/0x340\n"
    b"[   20.000002] Call Trace:\n"
    b"[   20.000003]  <TASK>\n"
    b"[   20.000004]  %s+0x1f/0x60 [tempesta_fw]\n"
    b"[   20.000005]  tfw_http_msg_process+0x5a/0x120 [tempesta_fw]\n"
    b"[   20.000006]  </TASK>\n"
)


class TrackerTests(unittest.TestCase):
    """What is detected becomes one report per window, at the right time."""

    def setUp(self):
        self.clock = task.Clock()
        self.stats = Counter()
        self.reports = []
        config = Config(max_instances=10, buffer_max_lines=10_000, buffer_max_bytes=10_000_000,
                        settle_seconds=5.0, cooldown_seconds=300.0)
        # The case is the report sink: submit() keeps each report.
        pipeline = build_pipeline(config, self.clock, self.stats, [self],
                                  make_report=self.make_report)
        self.registry, self.tracker = pipeline.registry, pipeline.tracker

    def make_report(self, instance, incidents, suppressed, trigger=None):
        return build_report(
            instance=instance,
            incidents=incidents,
            suppressed=suppressed,
            client_id="c",
            hostname="ts",
            version="0",
            now=self.clock.seconds(),
            trigger=trigger,
        )

    def submit(self, report):
        self.reports.append(report)
        return defer.succeed(report)

    def send(self, data: bytes, host: str = HOST):
        self.registry.receive_datagram(host, data, self.clock.seconds())

    def test_report_waits_for_quiet_and_holds_the_whole_trace(self):
        self.send(WARNING % (1, 42))
        self.clock.advance(4)
        self.send(b"[   10.100000] Call Trace:\n")
        self.clock.advance(4)
        self.send(b"[   10.200000]  dump_stack+0x1/0x2\n")
        self.clock.advance(4.9)
        self.assertEqual(self.reports, [])
        self.clock.advance(0.1)
        (report,) = self.reports
        self.assertEqual([i["kind"] for i in report["incidents"]], ["warning"])
        self.assertEqual([e["text"] for e in report["log"]][-2:], ["Call Trace:", " dump_stack+0x1/0x2"])

    def test_end_marker_sends_at_once(self):
        self.send(WARNING % (1, 42))
        self.send(b"[   10.300000] ---[ end trace 0000000000000000 ]---\n")
        self.assertEqual(len(self.reports), 1)
        self.assertEqual(self.tracker.open_windows, 0)

    def test_chatty_instance_cannot_hold_its_report_forever(self):
        self.send(WARNING % (1, 42))
        for _ in range(100):
            self.clock.advance(1)
            self.send(b"[   11.000000] still talking\n")
        self.assertEqual(len(self.reports), 1)

    def test_incidents_within_one_window_make_one_report(self):
        self.send(WARNING % (1, 42))
        self.send(b"[   10.500000] BUG: kernel NULL pointer dereference, address: 0000000000000008\n")
        self.clock.advance(5)
        (report,) = self.reports
        self.assertEqual([i["kind"] for i in report["incidents"]], ["warning", "oops"])

    def test_same_warning_within_cooldown_is_folded_into_the_next_report(self):
        self.send(WARNING % (1, 42))
        self.clock.advance(5)
        self.send(WARNING % (3, 77))
        self.clock.advance(5)
        self.send(WARNING % (0, 99))
        self.clock.advance(5)
        self.assertEqual(len(self.reports), 1)
        self.send(b"[   20.000000] BUG: soft lockup - CPU#0 stuck for 22s! [swapper/0:0]\n")
        self.clock.advance(5)
        self.assertEqual(len(self.reports), 2)
        self.assertEqual(self.reports[1]["suppressed_incidents"], 2)

    def test_same_warning_after_cooldown_is_reported_again(self):
        self.send(WARNING % (1, 42))
        self.clock.advance(5)
        self.clock.advance(300)
        self.send(WARNING % (1, 42))
        self.clock.advance(5)
        self.assertEqual(len(self.reports), 2)

    def test_crashes_are_never_suppressed(self):
        for _ in range(3):
            self.send(b"[    1.000000] BUG: kernel NULL pointer dereference, address: 0000000000000008\n")
            self.clock.advance(5)
        self.assertEqual(len(self.reports), 3)

    def test_instances_have_their_own_windows(self):
        self.send(WARNING % (1, 42), host="192.0.2.1")
        self.send(WARNING % (1, 42), host="192.0.2.2")
        self.clock.advance(5)
        self.assertEqual(sorted(r["instance"]["address"] for r in self.reports), ["192.0.2.1", "192.0.2.2"])

    def test_close_all_reports_open_windows_at_once(self):
        self.send(WARNING % (1, 42))
        d = self.tracker.close_all()
        self.assertEqual(len(self.reports), 1)
        self.successResultOf(d)

    def test_a_failing_report_does_not_stop_the_others_at_shutdown(self):
        self.send(WARNING % (1, 42), host="192.0.2.1")
        self.send(WARNING % (1, 42), host="192.0.2.2")
        made = self.make_report
        calls = []

        def flaky(instance, incidents, suppressed, trigger):
            calls.append(instance.address)
            if len(calls) == 1:
                raise RuntimeError("boom")
            return made(instance, incidents, suppressed, trigger)

        self.tracker.make_report = flaky
        self.successResultOf(self.tracker.close_all())
        self.assertEqual(len(self.reports), 1)
        self.assertEqual(self.stats["tracker_errors"], 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_evicted_instance_is_reported_before_it_goes(self):
        self.registry.max_instances = 1
        self.send(WARNING % (1, 42), host="192.0.2.1")
        self.send(b"hello\n", host="192.0.2.2")
        self.assertEqual([r["instance"]["address"] for r in self.reports], ["192.0.2.1"])

    def test_real_panic_capture_gives_one_crash_report_with_the_whole_trace(self):
        for gram in datagrams("extended-sysrq-crash.txt"):
            self.send(gram)
        self.clock.advance(5)
        (report,) = self.reports
        kinds = [i["kind"] for i in report["incidents"]]
        self.assertEqual(kinds[0], "crash")
        texts = [e["text"] for e in report["log"]]
        self.assertIn("Kernel panic - not syncing: sysrq triggered crash", texts)
        self.assertEqual(texts[-1], "Rebooting in 1 seconds..")

    def test_vendor_test_warning_is_reported(self):
        for gram in datagrams("plain-boot-and-warning.txt"):
            self.send(gram)
        self.clock.advance(5)
        (report,) = self.reports
        self.assertEqual(report["incidents"][0]["line"], "WARNING test message")
        self.assertEqual(report["incidents"][0]["kind"], "warning")


class RecordPathTrackerTests(TrackerTests):
    """The same behaviour when lines come as extended messages kept as packed records, which
    the registry shows the tracker only when they can start an incident (its line filter)."""

    def setUp(self):
        super().setUp()
        self.assertIs(self.registry.line_filter, self.tracker.rules.line_filter)
        self.seq = 0

    def send(self, data: bytes, host: str = HOST):
        line = parse_plain_line(data.rstrip(b"\n"), 0.0)
        if data.count(b"\n") == 1 and data.endswith(b"\n") and line.kernel_time_us is not None:
            gram = b"4,%d,%d,-;%s\n" % (self.seq + 1, line.kernel_time_us + self.seq, line.text.encode())
            # Lines with escapes or non-ASCII text take the general path, as they would.
            if Decoder().record(gram, 0.0):
                self.seq += 1
                data = gram
        super().send(data, host)


class LastIncidentTests(TrackerTests):
    """The status page's view: each instance's latest incident and its report."""

    def test_latest_incident_names_its_report_once_sent(self):
        self.send(WARNING % (1, 42))
        last = self.tracker.last_incidents[HOST]
        self.assertEqual((last.incident.kind, last.report_id), ("warning", None))
        self.clock.advance(5)
        self.assertEqual(self.tracker.last_incidents[HOST].report_id, self.reports[0]["report_id"])

    def test_folded_incident_is_shown_as_suppressed(self):
        self.send(WARNING % (1, 42))
        self.clock.advance(5)
        self.send(WARNING % (2, 43))
        # A repeat is told by its fingerprint, which needs the trace: settling until then.
        self.assertFalse(self.tracker.last_incidents[HOST].suppressed)
        self.clock.advance(5)
        self.assertTrue(self.tracker.last_incidents[HOST].suppressed)

    def test_latest_incident_has_its_title_once_reported(self):
        self.send(WARNING % (1, 42))
        self.assertIsNone(self.tracker.last_incidents[HOST].incident.description)
        self.clock.advance(5)
        description = self.tracker.last_incidents[HOST].incident.description
        self.assertEqual(description.title, "WARNING in dev_queue_xmit")


class FingerprintFoldingTests(TrackerTests):
    """Cooldown folds repeats of one bug, told by kind and title, not by the trigger line."""

    def test_same_line_with_another_guilty_frame_is_another_bug(self):
        self.send(ALLOC_WARNING % b"tfw_pool_new")
        self.clock.advance(5)
        self.send(ALLOC_WARNING % b"tfw_cache_copy_resp")
        self.clock.advance(5)
        titles = [r["incidents"][0]["title"] for r in self.reports]
        self.assertEqual(titles, ["WARNING in tfw_pool_new", "WARNING in tfw_cache_copy_resp"])
        self.assertEqual({r["incidents"][0]["module"] for r in self.reports}, {"tempesta_fw"})

    def test_repeat_of_a_reported_bug_is_counted_not_sent(self):
        self.send(ALLOC_WARNING % b"tfw_pool_new")
        self.clock.advance(5)
        self.send(ALLOC_WARNING.replace(b"CPU: 1 PID: 7", b"CPU: 3 PID: 99") % b"tfw_pool_new")
        self.clock.advance(5)
        self.assertEqual(len(self.reports), 1)
        self.assertEqual(self.stats["incidents_suppressed"], 1)
        self.send(b"[   30.000000] BUG: kernel NULL pointer dereference, address: 0000000000000008\n")
        self.clock.advance(5)
        self.assertEqual(self.reports[1]["suppressed_incidents"], 1)

    def test_window_with_a_repeat_and_a_new_bug_lists_only_the_new_one(self):
        self.send(WARNING % (1, 42))
        self.clock.advance(5)
        self.send(WARNING % (2, 43))
        self.send(b"[   10.500000] BUG: kernel NULL pointer dereference, address: 0000000000000008\n")
        self.clock.advance(5)
        self.assertEqual([i["kind"] for i in self.reports[1]["incidents"]], ["oops"])
        self.assertEqual(self.reports[1]["suppressed_incidents"], 1)

    def test_window_opened_by_a_folded_repeat_is_named_by_that_line(self):
        # This collector reported the warning and folds its repeat; one that restarted since
        # does not. Both name the report by the line that opened the window: one id.
        self.send(WARNING % (1, 42))
        self.clock.advance(5)
        repeat = (WARNING % (2, 43)).replace(b"10.000000", b"40.000000")
        bug = b"[   40.500000] BUG: kernel NULL pointer dereference, address: 0000000000000008\n"
        self.send(repeat + bug)
        self.clock.advance(5)
        first, folding = self.reports
        self.setUp()
        self.send(repeat + bug)
        self.clock.advance(5)
        (restarted,) = self.reports
        self.assertEqual([i["kind"] for i in folding["incidents"]], ["oops"])
        self.assertEqual([i["kind"] for i in restarted["incidents"]], ["warning", "oops"])
        self.assertEqual(folding["report_id"], restarted["report_id"])
        self.assertNotEqual(first["report_id"], folding["report_id"])

    def test_two_lines_naming_one_bug_in_one_window_are_listed_once(self):
        # Two WARN_ONs of one function (other lines, other signatures): one title, one bug.
        self.send(b"[   10.000000] WARNING: CPU: 0 PID: 1 at net/core/dev.c:123 dev_queue_xmit+0x1/0x2\n")
        self.send(b"[   10.100000] WARNING: CPU: 0 PID: 1 at net/core/dev.c:130 dev_queue_xmit+0x9/0x2\n")
        self.clock.advance(5)
        (report,) = self.reports
        self.assertEqual([i["title"] for i in report["incidents"]], ["WARNING in dev_queue_xmit"])
        self.assertEqual(report["suppressed_incidents"], 1)

    def test_crash_with_a_reported_fingerprint_is_reported_again(self):
        for _ in range(2):
            self.send(b"[    1.000000] BUG: kernel NULL pointer dereference, address: 0000000000000008\n")
            self.clock.advance(5)
        self.assertEqual(len(self.reports), 2)
        self.assertEqual(self.reports[0]["incidents"][0]["fingerprint"],
                         self.reports[1]["incidents"][0]["fingerprint"])

    def test_report_is_announced_with_its_title(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.send(ALLOC_WARNING % b"tfw_pool_new")
        self.clock.advance(5)
        said = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.info]
        self.assertIn(
            f"Report {self.reports[0]['report_id']} for {HOST}: warning: WARNING in tfw_pool_new (tempesta_fw); "
            "detected 5.0 s earlier on: WARNING: CPU: 1 PID: 7 at mm/page_alloc.c:4360 __alloc_pages+0x2cc/0x340",
            said,
        )

    def said(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e.get("log_level") == LogLevel.info]

    def listen(self) -> None:
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def test_escalation_in_one_window_is_logged_with_the_most_severe_kind(self):
        self.listen()
        self.send(b"[    1.000000] kernel BUG at net/core/dev.c:10!\n")
        self.send(b"[    1.000001] Oops: invalid opcode: 0000 [#1] PREEMPT SMP\n")
        self.send(b"[    1.000002] Kernel panic - not syncing: Fatal exception\n")
        self.clock.advance(5)
        said = self.said()
        self.assertIn(f"{HOST}: escalated from bug to oops: Oops: invalid opcode: 0000 [#1] PREEMPT SMP", said)
        self.assertIn(f"{HOST}: escalated from oops to crash: Kernel panic - not syncing: Fatal exception", said)
        (report_line,) = [s for s in said if s.startswith("Report ")]
        self.assertIn(f"for {HOST}: crash: ", report_line)

    def test_repeats_folded_by_the_cooldown_are_logged_once_per_burst(self):
        self.listen()
        for _ in range(4):
            self.send(WARNING % (1, 42))
            self.clock.advance(5)
        folded = [s for s in self.said() if "folded into the next report" in s]
        self.assertEqual(folded, [
            f"{HOST}: WARNING in dev_queue_xmit reported within cooldown_seconds=300; folded into the next report"
        ])
        self.assertFalse([s for s in self.said() if "(0 " in s])

    def test_repeats_in_one_window_are_counted_in_the_report_line(self):
        self.listen()
        self.send(WARNING % (1, 42))
        self.send(WARNING % (1, 42))
        self.clock.advance(5)
        (report_line,) = [s for s in self.said() if s.startswith("Report ")]
        self.assertIn("WARNING in dev_queue_xmit (1 repeats folded)", report_line)

    def test_repeat_within_cooldown_is_announced_quietly(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.send(WARNING % (1, 42))
        self.clock.advance(5)
        self.send(WARNING % (1, 42))
        self.clock.advance(5)
        said = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.info]
        self.assertEqual(len([s for s in said if s.startswith("warning on")]), 1)
        self.assertEqual(len([s for s in said if s.startswith("Report ")]), 1)

    def test_a_failing_title_does_not_lose_the_report(self):
        from tempesta_ts import tracker

        def broken(incidents, lines):
            raise RuntimeError("boom")

        self.patch(tracker, "describe_incidents", broken)
        self.send(WARNING % (1, 42))
        self.clock.advance(5)
        (report,) = self.reports
        self.assertEqual(report["incidents"][0]["title"],
                         "WARNING: CPU: NUM PID: NUM at net/core/dev.c:LINE dev_queue_xmit")
        self.assertEqual(self.stats["tracker_errors"], 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
