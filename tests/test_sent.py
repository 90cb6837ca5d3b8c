"""Delivered reports stay visible in spool_dir/sent/, pruned by age and size."""

from __future__ import annotations

import os
from collections import Counter

from tempesta_ts.config import Config
from tempesta_ts.sent import DAY, PRUNE_SECONDS, SentReports
from tempesta_ts.spool import Spool
from tempesta_ts.spool_files import file_name
from tests.test_reporter import CLIENT, EPOCH, KEY, Answer, FakeSupport, ReporterTestCase, report


class SentReportsTests(ReporterTestCase):
    """A Reporter whose spool keeps what it delivered."""

    def sent_reporter(self, keep_days: float = 7, max_bytes: int = 1 << 20, support=None):
        self.sent = SentReports(self.spool_dir, keep_days, max_bytes, self.clock, self.stats)
        config = Config(support_host="support.test", support_client_id=CLIENT, support_api_key=KEY,
                        spool_dir=self.spool_dir)
        spool = Spool.of(config, self.stats, self.clock, keep_sent=self.sent.keep)
        self.sent.startService()
        self.addCleanup(self.sent.stopService)
        return self.reporter(support, spool=spool)

    def sent_names(self) -> list[str]:
        return sorted(os.listdir(os.path.join(self.spool_dir, "sent")))

    def test_a_delivered_report_moves_to_sent(self):
        rep = self.sent_reporter()
        self.submit(rep, report(1))
        self.assertEqual(self.stats["reports_delivered"], 1)
        (name,) = self.sent_names()
        self.assertTrue(name.endswith(f"-{1:032x}.json"), name)
        self.assertEqual(os.listdir(os.path.join(self.spool_dir, "pending")), [])
        self.assertEqual([r.report_id for r in self.sent.listing()], [f"{1:032x}"])
        self.assertEqual(self.stats["reports_kept_sent"], 1)

    def test_reports_older_than_sent_keep_days_are_pruned_on_the_timer(self):
        rep = self.sent_reporter(keep_days=1)
        self.submit(rep, report(1))
        self.clock.advance(DAY - PRUNE_SECONDS)
        self.submit(rep, report(2))
        self.assertEqual(len(self.sent_names()), 2)
        self.clock.advance(2 * PRUNE_SECONDS)
        self.assertEqual([r.report_id for r in self.sent.listing()], [f"{2:032x}"])
        self.assertEqual(self.stats["sent_reports_pruned"], 1)

    def test_the_oldest_go_first_past_sent_max_bytes(self):
        self.sent = SentReports(self.spool_dir, 7, 250, self.clock, Counter())
        directory = os.path.join(self.spool_dir, "sent")
        os.makedirs(directory)
        for n in range(3):
            with open(os.path.join(directory, file_name(self.clock.seconds() + n, f"{n:032x}")), "wb") as f:
                f.write(b"x" * 100)
        self.sent.prune()
        self.assertEqual([r.report_id for r in self.sent.listing()], [f"{2:032x}", f"{1:032x}"])

    def test_sent_keep_days_0_keeps_nothing(self):
        config = Config(spool_dir=self.spool_dir, support_host="h", support_client_id="c",
                        support_api_key="k", sent_keep_days=0)
        self.assertIsNone(SentReports.of(config, self.clock, self.stats))

    def test_without_sent_the_file_is_removed_as_before(self):
        rep = self.reporter()
        self.submit(rep, report(1))
        self.assertFalse(os.path.exists(os.path.join(self.spool_dir, "sent")))
        self.assertEqual(os.listdir(os.path.join(self.spool_dir, "pending")), [])

    def test_a_kept_report_shows_when_it_was_delivered_after_retries(self):
        rep = self.sent_reporter(support=FakeSupport([Answer(status=503)]))
        self.submit(rep, report(1))
        self.assertEqual(self.stats["reports_delivered"], 0)
        for _ in range(100):
            self.advance(10)
            if self.stats["reports_delivered"]:
                break
        [kept] = self.sent.listing()
        self.assertEqual(kept.created, EPOCH)
        self.assertEqual(kept.delivered, self.clock.seconds())
        self.assertGreater(kept.delivered, EPOCH)
        with open(kept.path, "rb") as f:
            self.assertEqual(self.sent.body(kept.report_id), f.read())

    def test_what_is_not_a_regular_file_is_neither_listed_nor_read_nor_in_the_pruning_s_way(self):
        self.sent = SentReports(self.spool_dir, 7, 1 << 20, self.clock, Counter())
        directory = os.path.join(self.spool_dir, "sent")
        os.makedirs(directory)
        fifo, folder = file_name(EPOCH, "fifo"), file_name(EPOCH, "folder")
        os.mkfifo(os.path.join(directory, fifo))
        os.mkdir(os.path.join(directory, folder))
        with open(os.path.join(directory, file_name(EPOCH - 8 * DAY, "old")), "wb") as f:
            f.write(b'{"report_id": "old"}')
        self.assertEqual([r.report_id for r in self.sent.listing()], ["old"])
        self.assertIsNone(self.sent.body("fifo"))  # answered at once: the open does not block
        self.assertIsNone(self.sent.body("folder"))
        self.assertIsNone(self.sent.body("old", max_bytes=10))
        self.assertEqual(self.sent.body("old"), b'{"report_id": "old"}')
        self.sent.prune()
        self.assertEqual(sorted(os.listdir(directory)), sorted([fifo, folder]))
        self.assertEqual(self.sent.stats["sent_reports_pruned"], 1)
