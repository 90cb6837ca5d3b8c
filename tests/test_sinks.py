"""Report sinks: the assembly picks one by mode; the stand-alone one writes under local/."""

from __future__ import annotations

import os

from treq.testing import StubTreq
from twisted.logger import LogLevel
from zope.interface.verify import verifyObject

from tempesta_ts.config import Config
from tempesta_ts.reporter import Reporter
from tempesta_ts.service import TroubleshootingService
from tempesta_ts.sinks import IReportSink, LocalReports
from tempesta_ts.spool import Spool
from tests.test_reporter import CLIENT, KEY, FakeSupport, ReporterTestCase, report


class SinkTests(ReporterTestCase):
    """Which sink, and what the stand-alone one does beside writing."""

    def service(self, **settings) -> TroubleshootingService:
        config = Config(host="127.0.0.1", port=0, spool_dir=self.spool_dir, **settings)
        return TroubleshootingService(config, self.clock, http_client=StubTreq(FakeSupport()))

    def test_stand_alone_gets_local_reports_and_no_reporter(self):
        svc = self.service()
        self.assertIsInstance(svc.sink, LocalReports)
        self.assertIsNone(svc.reporter)
        self.assertIs(svc.sink.spool, svc.spool)
        self.assertIn(svc.sink, list(svc))

    def test_a_support_server_gets_the_reporter_as_its_sink(self):
        svc = self.service(support_host="support.test", support_client_id=CLIENT,
                           support_api_key=KEY)
        self.assertIsInstance(svc.sink, Reporter)
        self.assertIs(svc.sink, svc.reporter)
        self.assertIs(svc.reporter.spool, svc.spool)
        self.assertIn(svc.sink, list(svc))

    def test_both_sinks_provide_the_interface(self):
        spool = Spool(self.spool_dir, 10**6, self.stats, self.clock)
        verifyObject(IReportSink, LocalReports(spool, self.stats))
        verifyObject(IReportSink, self.reporter(start=False))

    def test_stand_alone_refuses_a_report_it_cannot_write_and_counts_it(self):
        sink = LocalReports(Spool(self.spool_dir, 10**6, self.stats, self.clock), self.stats)
        sink.startService()
        self.addCleanup(sink.stopService)
        self.failureResultOf(sink.submit(report(1, report_id="../x")), ValueError)
        self.assertEqual(self.stats["spool_errors"], 1)
        self.assertEqual(self.stats["reports_written_local"], 0)
        self.assertIn("Cannot write report ../x", self.texts(LogLevel.error)[0])
        self.assertEqual(sink.state_of("../x"), "unknown")

    def test_stand_alone_points_out_what_a_run_with_a_support_server_left(self):
        left = Spool(self.spool_dir, 10**6, self.stats, self.clock)
        entry = left.write(report(1))
        sink = LocalReports(Spool(self.spool_dir, 10**6, self.stats, self.clock), self.stats)
        sink.startService()
        self.addCleanup(sink.stopService)
        (warning,) = self.texts(LogLevel.warn)
        self.assertIn("1 reports wait in", warning)
        self.assertIn("set support_host to send them", warning)
        self.assertEqual(sink.state_of(entry.report_id), "pending")
        self.assertTrue(os.path.exists(entry.path))  # kept for a run with a Support Server
