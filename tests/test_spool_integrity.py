"""Spool integrity at start: what pending/ holds that is no valid report goes to corrupt/, never
to the Support Server; leftovers of interrupted writes in tmp/ are removed. Real files."""

from __future__ import annotations

import json
import os

from twisted.logger import LogLevel

from tempesta_ts.spool import CORRUPT_LINES, encode_report, file_name
from tests.test_reporter import EPOCH, ReporterTestCase, report


class IntegrityTests(ReporterTestCase):
    """Files planted in spool_dir before a start, as a crash or a hand would leave them."""

    def plant(self, sub: str, name: str, data: bytes) -> str:
        directory = os.path.join(self.spool_dir, sub)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(self.spool_dir, 0o700)
        path = os.path.join(directory, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def plant_report(self, number: int, data: bytes | None = None, at: float = EPOCH) -> str:
        name = file_name(at, report(number)["report_id"])
        body = encode_report(report(number)) if data is None else data
        self.plant("pending", name, body)
        return name

    def files(self, sub: str) -> list[str]:
        path = os.path.join(self.spool_dir, sub)
        return sorted(os.listdir(path)) if os.path.isdir(path) else []

    def sent_ids(self) -> list[str]:
        return [json.loads(r["raw"])["report_id"] for r in self.support.requests]

    def test_a_truncated_report_is_moved_to_corrupt_and_never_sent(self):
        truncated = self.plant_report(1, encode_report(report(1))[:-40])
        good = self.plant_report(2, at=EPOCH + 1)
        self.reporter()
        self.stub.flush()
        self.assertEqual(self.sent_ids(), [report(2)["report_id"]])
        self.assertEqual(self.files("corrupt"), [truncated])
        with open(os.path.join(self.spool_dir, "corrupt", truncated), "rb") as f:
            self.assertEqual(f.read(), encode_report(report(1))[:-40])  # kept as it was
        self.assertNotIn(good, self.files("corrupt"))
        self.assertEqual(self.stats["spool_corrupt_files"], 1)
        [line] = [t for t in self.texts(LogLevel.error) if truncated in t]
        self.assertIn("not JSON (truncated?)", line)
        self.assertIn("never sent", line)

    def test_every_kind_of_invalid_report_is_set_aside_with_its_reason(self):
        other = report(9)["report_id"]
        planted = {
            self.plant_report(1, b""): "empty",
            self.plant_report(2, b"\xff\xfe{}"): "not UTF-8",
            self.plant_report(3, b"[1, 2]"): "not a JSON object",
            self.plant_report(4, json.dumps({"version": 1}).encode()): "report_id None",
            self.plant_report(5, encode_report(report(9))): f"report_id '{other}'",
            self.plant_report(6, b"[" * 100_000): "not JSON",  # too deep to parse
        }
        self.plant("pending", "notes.txt", b"hello")
        self.reporter()
        self.stub.flush()
        self.assertEqual(self.support.requests, [])
        self.assertEqual(self.files("pending"), [])
        self.assertEqual(self.files("corrupt"), sorted([*planted, "notes.txt"]))
        self.assertEqual(self.stats["spool_corrupt_files"], 7)
        errors = self.texts(LogLevel.error)
        self.assertEqual(len(errors), 7)  # one line each
        for name, reason in planted.items():
            [line] = [t for t in errors if name in t]
            self.assertIn(reason, line)
        self.assertTrue(any("notes.txt" in t and "not a report file name" in t for t in errors))

    def test_many_corrupt_files_are_named_up_to_a_limit_then_counted(self):
        for n in range(CORRUPT_LINES + 5):
            self.plant_report(n + 1, b"{")
        self.reporter()
        self.stub.flush()
        self.assertEqual(self.support.requests, [])
        self.assertEqual(len(self.files("corrupt")), CORRUPT_LINES + 5)
        errors = self.texts(LogLevel.error)
        self.assertEqual(len(errors), CORRUPT_LINES + 1)
        self.assertIn("5 more files of pending/ are no valid report", errors[-1])

    def test_a_valid_report_is_sent_whole_and_nothing_is_set_aside(self):
        self.plant_report(1)
        self.reporter()
        self.stub.flush()
        self.assertEqual(json.loads(self.support.requests[0]["raw"]), report(1))
        self.assertEqual(self.files("corrupt"), [])
        self.assertEqual(self.stats["spool_corrupt_files"], 0)

    def test_leftovers_in_tmp_are_removed_with_one_line(self):
        self.plant("tmp", "20270115T080000.000000Z-x.json.abc.tmp", b'{"report_id"')
        self.plant("tmp", "probe", b"\0" * 10)
        self.reporter()
        self.assertEqual(self.files("tmp"), [])
        [line] = [t for t in self.texts(LogLevel.info) if "half-written" in t]
        self.assertIn("Removed 2 half-written files", line)
        self.assertEqual(self.support.requests, [])
