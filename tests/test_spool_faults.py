"""A full or failing spool disk loses no report: held in memory, delivered from there, written
once the disk lets it; one error line a burst; /status.json says what is degraded and why."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import tempfile

from twisted.logger import LogLevel
from twisted.trial import unittest

from tempesta_ts.degraded import Degradations
from tempesta_ts.sinks import LocalReports
from tempesta_ts.spool import HELD_RETRY_SECONDS, HELD_WRITES_PER_TICK, Spool, write_durably
from tests.test_metrics import ServerCase, samples, value
from tests.test_reporter import EPOCH, Answer, FakeSupport, ReporterTestCase, report, report_of_size

ENOSPC = os.strerror(errno.ENOSPC)


class FlakyDisk:
    """The spool's writer: write_durably, or ENOSPC while `full` (nothing left behind)."""

    def __init__(self, full: bool = True, error: int = errno.ENOSPC) -> None:
        self.full = full
        self.error = error
        self.refused = 0

    def __call__(self, directory: str, tmp_dir: str, name: str, data: bytes) -> str:
        if self.full:
            self.refused += 1
            raise OSError(self.error, os.strerror(self.error), os.path.join(directory, name))
        return write_durably(directory, tmp_dir, name, data)


class FaultCase(ReporterTestCase):
    """A spool on a disk that can be made to refuse writes."""

    def setUp(self):
        super().setUp()
        self.disk = FlakyDisk(full=False)

    def spool(self, max_bytes: int = 10**6) -> Spool:
        return Spool(self.spool_dir, max_bytes, self.stats, self.clock, writer=self.disk)

    def files(self, sub: str) -> list[str]:
        path = os.path.join(self.spool_dir, sub)
        return sorted(os.listdir(path)) if os.path.isdir(path) else []

    def tracebacks(self) -> list[dict]:
        return [e for e in self.events if e.get("log_failure") is not None]


class HeldInMemoryTests(FaultCase):
    """With a Support Server: what the disk refuses is held, sent, and written later."""

    def test_a_report_the_disk_refuses_is_delivered_straight_from_memory(self):
        rep = self.reporter(spool=self.spool())
        self.disk.full = True
        entry = self.submit(rep, report(1))
        self.assertTrue(entry.held)
        self.assertEqual(len(self.support.requests), 1)
        self.assertEqual(json.loads(self.support.requests[0]["raw"]), report(1))
        self.assertEqual(self.stats["reports_delivered"], 1)
        self.assertEqual(self.stats["reports_lost"], 0)
        self.assertEqual(self.stats["spool_write_errors"], 1)
        self.assertEqual((rep.spool.held, rep.spool.count, rep.spool.bytes), (0, 0, 0))
        self.assertEqual(self.files("pending"), [])
        # Nothing is held, but the disk has taken no write since: still said, until it does.
        self.assertEqual(rep.spool.degraded, ENOSPC)
        self.advance(HELD_RETRY_SECONDS)
        self.assertEqual(rep.spool.degraded, ENOSPC)
        self.disk.full = False
        self.advance(HELD_RETRY_SECONDS)  # a probe write succeeds
        self.assertIsNone(rep.spool.degraded)
        self.assertEqual(self.files("tmp"), [])
        self.assertEqual(self.tracebacks(), [])

    def test_held_reports_are_written_as_soon_as_the_disk_lets_them(self):
        rep = self.reporter(FakeSupport([Answer(503)] * 100), spool=self.spool())
        self.disk.full = True
        for n in (1, 2, 3):
            self.clock.advance(1)
            self.submit(rep, report(n))
        self.assertEqual(rep.spool.held, 3)
        self.assertEqual(rep.state_of(report(2)["report_id"]), "pending")
        self.assertEqual(self.stats["reports_spooled"], 0)
        self.assertEqual(self.stats["reports_lost"], 0)
        self.assertEqual(self.files("pending"), [])
        self.assertEqual(rep.spool.degraded, f"{ENOSPC}; 3 reports held in memory")
        self.assertEqual(rep.spool.degraded_since, EPOCH + 1)
        self.advance(HELD_RETRY_SECONDS)  # still full: retried, still held
        self.assertEqual(rep.spool.held, 3)
        self.disk.full = False
        self.advance(HELD_RETRY_SECONDS)
        self.assertEqual(rep.spool.held, 0)
        self.assertEqual(len(self.files("pending")), 3)
        self.assertEqual(self.stats["reports_spooled"], 3)
        self.assertIsNone(rep.spool.degraded)
        self.assertIsNone(rep.spool.degraded_since)
        # Oldest first, under the names of the time they were made, and sent from the disk.
        self.assertEqual([f.split("-", 1)[1] for f in self.files("pending")],
                         [report(n)["report_id"] + ".json" for n in (1, 2, 3)])
        self.support.answers.clear()
        self.advance(300)
        self.assertEqual(self.stats["reports_delivered"], 3)
        self.assertEqual(self.files("pending"), [])

    def test_a_report_written_while_in_flight_is_removed_once_delivered(self):
        rep = self.reporter(FakeSupport([Answer(hang=True)]), spool=self.spool())
        self.disk.full = True
        self.submit(rep, report(1))
        self.disk.full = False
        self.advance(HELD_RETRY_SECONDS)  # written to pending/ while its request hangs
        self.assertEqual(len(self.files("pending")), 1)
        [request] = self.support.hanging
        request.write(b"{}")
        request.finish()
        self.stub.flush()
        self.assertEqual(self.stats["reports_delivered"], 1)
        self.assertEqual(self.files("pending"), [])
        self.assertEqual(rep.spool.count, 0)

    def test_held_reports_count_in_spool_max_bytes(self):
        rep = self.reporter(FakeSupport([Answer(503)] * 10), spool=self.spool(max_bytes=1500))
        self.disk.full = True
        for n in (1, 2, 3):
            self.submit(rep, report_of_size(n, 700))
        self.assertEqual(self.stats["reports_dropped"], 1)
        self.assertEqual(rep.spool.held, 2)
        self.assertEqual(rep.spool.held_bytes, 1400)
        self.assertEqual(rep.spool.bytes, 1400)
        self.assertEqual(rep.state_of(report(1)["report_id"]), "unknown")

    def test_one_error_line_a_burst_and_never_a_traceback(self):
        rep = self.reporter(FakeSupport([Answer(503)] * 100), spool=self.spool())
        self.disk.full = True
        for n in range(10):
            self.submit(rep, report(n))
            self.advance(5)
        errors = [t for t in self.texts(LogLevel.error) if "Cannot write" in t]
        self.assertEqual(len(errors), 1)
        self.assertIn(ENOSPC, errors[0])
        self.assertIn("held in memory", errors[0])
        self.assertNotIn("more failed writes", errors[0])
        self.advance(60)  # still refused a minute on: one reminder, with the count held back
        errors = [t for t in self.texts(LogLevel.error) if "Cannot write" in t]
        self.assertEqual(len(errors), 2)
        self.assertRegex(errors[1], r"\d+ more failed writes since the last notice")
        self.disk.full = False
        self.advance(HELD_RETRY_SECONDS)
        self.assertTrue(any("takes writes again" in t for t in self.texts(LogLevel.info)))
        self.disk.full = True  # a new burst: its own first line at once
        self.submit(rep, report(99))
        errors = [t for t in self.texts(LogLevel.error) if "Cannot write" in t]
        self.assertEqual(len(errors), 3)
        self.assertEqual(self.tracebacks(), [])

    def test_a_stop_while_the_disk_still_refuses_counts_the_held_reports_lost(self):
        rep = self.reporter(FakeSupport([Answer(503)] * 10), spool=self.spool())
        self.disk.full = True
        self.submit(rep, report(1))
        self.submit(rep, report(2))
        self.successResultOf(rep.stopService())
        self.assertEqual(self.stats["reports_lost"], 2)
        [line] = [t for t in self.texts(LogLevel.error) if "lost at the stop" in t]
        self.assertIn("2 reports held in memory", line)
        self.assertEqual(rep.spool.count, 0)

    def test_a_stop_after_space_returned_writes_what_is_held(self):
        rep = self.reporter(FakeSupport([Answer(503)] * 10), spool=self.spool())
        self.disk.full = True
        self.submit(rep, report(1))
        self.disk.full = False
        self.successResultOf(rep.stopService())  # before the retry timer: written at the stop
        self.assertEqual(self.stats["reports_lost"], 0)
        self.assertEqual(len(self.files("pending")), 1)

    def test_many_held_reports_are_written_a_batch_at_a_time(self):
        spool = self.spool()
        self.disk.full = True
        for n in range(HELD_WRITES_PER_TICK + 6):
            spool.write(report(n + 1))
        self.disk.full = False
        self.assertEqual(spool.write_held(limit=HELD_WRITES_PER_TICK), HELD_WRITES_PER_TICK)
        self.assertEqual(spool.held, 6)
        self.assertEqual(spool.degraded, f"{ENOSPC}; 6 reports held in memory")
        self.clock.advance(HELD_RETRY_SECONDS)  # the timer goes on until none is left
        self.assertEqual(spool.held, 0)
        self.assertEqual(len(self.files("pending")), HELD_WRITES_PER_TICK + 6)
        self.assertIsNone(spool.degraded)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_read_only_disk_is_held_the_same(self):
        self.disk.error = errno.EROFS
        rep = self.reporter(FakeSupport([Answer(503)]), spool=self.spool())
        self.disk.full = True
        self.submit(rep, report(1))
        self.assertEqual(rep.spool.held, 1)
        self.assertIn(os.strerror(errno.EROFS), rep.spool.degraded)


class StandAloneTests(FaultCase):
    """Stand-alone: a report the disk refuses is written to local/ once space returns."""

    def test_a_refused_report_is_written_to_local_once_space_returns(self):
        sink = LocalReports(self.spool(), self.stats)
        sink.startService()
        self.addCleanup(sink.stopService)
        self.disk.full = True
        results = []
        sink.submit(report(1)).addBoth(results.append)
        [path] = results
        self.assertEqual(os.path.dirname(path), os.path.join(self.spool_dir, "local"))
        self.assertFalse(os.path.exists(path))
        self.assertEqual(sink.state_of(report(1)["report_id"]), "pending")
        self.assertEqual(self.stats["reports_written_local"], 0)
        self.assertEqual(self.stats["reports_lost"], 0)
        self.assertEqual(sink.spool.held, 1)
        self.disk.full = False
        self.clock.advance(HELD_RETRY_SECONDS)
        with open(path, "rb") as f:
            self.assertEqual(json.loads(f.read()), report(1))
        self.assertEqual(self.stats["reports_written_local"], 1)
        self.assertEqual(sink.state_of(report(1)["report_id"]), "written")
        self.assertEqual((sink.spool.held, sink.spool.count), (0, 0))
        self.assertIsNone(sink.spool.degraded)
        self.assertEqual(self.files("pending"), [])
        self.assertEqual(self.tracebacks(), [])

    def test_a_report_larger_than_the_bound_cannot_be_held_and_is_refused(self):
        sink = LocalReports(self.spool(max_bytes=1000), self.stats)
        sink.startService()
        self.addCleanup(sink.stopService)
        self.disk.full = True
        self.failureResultOf(sink.submit(report_of_size(1, 1001)))
        self.assertEqual(sink.spool.held, 0)
        self.disk.full = False
        # Larger than the bound, yet written at once while the disk takes it (as before).
        self.successResultOf(sink.submit(report_of_size(2, 1001)))
        self.assertEqual(self.stats["reports_written_local"], 1)


class DegradationsTests(unittest.TestCase):
    """The registry /status.json's degraded list is read from."""

    def test_components_say_why_and_since_when(self):
        class Part:
            degraded = None

        class Timed:
            degraded = "disk full"
            degraded_since = 5.0

        part, timed = Part(), Timed()
        found = Degradations()
        found.watch("archive", part)
        found.watch("spool", timed)
        self.assertEqual(found.current(10.0), [{"what": "spool", "why": "disk full", "since": 5.0}])
        part.degraded = "No space left on device"
        self.assertEqual(found.current(20.0)[0], {"what": "archive",
                                                  "why": "No space left on device", "since": 20.0})
        self.assertEqual(found.current(30.0)[0]["since"], 20.0)  # first seen, not each look
        part.degraded = None
        self.assertEqual([d["what"] for d in found.current(40.0)], ["spool"])
        part.degraded = "again"
        self.assertEqual(found.current(50.0)[0]["since"], 50.0)

    def test_a_component_that_fails_to_say_is_shown_degraded(self):
        class Broken:
            @property
            def degraded(self):
                raise RuntimeError("boom")

        found = Degradations()
        found.watch("archive", Broken())
        [entry] = found.current(1.0)
        self.assertEqual(entry["what"], "archive")


class StatusTests(ServerCase):
    """What an operator sees: /status.json, /status, /metrics and /healthz."""

    def full_server(self, support=None):
        svc = self.make(support)
        svc.spool.writer = self.disk = FlakyDisk()
        return svc

    def test_a_full_spool_disk_is_degraded_with_the_reason_and_no_report_is_lost(self):
        svc = self.full_server(FakeSupport([Answer(503)] * 10))
        doc = json.loads(self.get(svc, "/status.json")[1])
        self.assertEqual(doc["degraded"], [])
        health = self.get(svc, "/healthz")[0].code
        self.send(svc, "127.0.0.2", b"[   12.345678] WARNING test message\n")
        self.advance(1.0)  # settled: the report is made; the disk refuses it
        doc = json.loads(self.get(svc, "/status.json")[1])
        [spool] = doc["degraded"]
        self.assertEqual(spool["what"], "spool")
        self.assertEqual(spool["why"], f"{ENOSPC}; 1 reports held in memory")
        self.assertEqual(spool["since"], "2027-01-15T08:00:01.000Z")
        self.assertEqual(doc["spool"]["held"], 1)
        self.assertEqual(doc["spool"]["pending"], 1)
        self.assertEqual(doc["counters"]["reports_lost"], 0)
        self.assertEqual(doc["counters"]["spool_write_errors"], 1)
        # /healthz is about taking traffic, which a full spool disk does not stop.
        self.assertEqual(self.get(svc, "/healthz")[0].code, health)
        self.assertIn("spool: " + ENOSPC, self.get(svc, "/status")[1].decode())
        found = samples(self.scrape(svc))
        self.assertEqual(value(found, "tempesta_ts_reports_held_in_memory"), 1)
        self.assertEqual(value(found, "tempesta_ts_spool_write_errors_total"), 1)
        self.disk.full = False
        self.advance(HELD_RETRY_SECONDS)
        doc = json.loads(self.get(svc, "/status.json")[1])
        self.assertEqual(doc["degraded"], [])
        self.assertEqual(doc["spool"]["held"], 0)
        self.assertEqual(doc["spool"]["pending"], 1)  # on disk now, waiting for its retry
        self.assertEqual(value(samples(self.scrape(svc)), "tempesta_ts_reports_held_in_memory"), 0)


# --- a real small filesystem --------------------------------------------------------------


def mount_tiny_tmpfs(case: unittest.TestCase, size: str = "64k") -> str:
    """A tmpfs of `size` mounted on a fresh directory, unmounted at cleanup; SkipTest when
    the machine does not allow it."""
    if os.geteuid() != 0:
        raise unittest.SkipTest("mounting a tmpfs needs root")
    where = tempfile.mkdtemp(prefix="tempesta-ts-tmpfs-")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                           where], capture_output=True, text=True)
    if done.returncode != 0:
        os.rmdir(where)
        raise unittest.SkipTest(f"cannot mount a tmpfs: {done.stderr.strip() or done.returncode}")

    def unmount():
        subprocess.run(["umount", where], capture_output=True)
        os.rmdir(where)

    case.addCleanup(unmount)
    return where


def fill(directory: str) -> str:
    """Fill the filesystem of `directory` to the last byte with one file; its path."""
    path = os.path.join(directory, "filler")
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                f.write(b"x" * 4096)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                break
    return path


class RealFullDiskTests(FaultCase):
    """The same over a real tmpfs of 64 KiB filled to its last byte."""

    def setUp(self):
        super().setUp()
        self.spool_dir = os.path.join(mount_tiny_tmpfs(self), "spool")

    def real_spool(self) -> Spool:
        return Spool(self.spool_dir, 10**6, self.stats, self.clock)

    def test_a_full_tmpfs_holds_the_report_sends_it_and_writes_once_space_returns(self):
        rep = self.reporter(FakeSupport([Answer(503)] * 10), spool=self.real_spool())
        filler = fill(self.spool_dir)
        self.submit(rep, report_of_size(1, 8000))
        self.assertEqual(rep.spool.held, 1)
        self.assertEqual(self.files("pending"), [])
        self.assertEqual(self.files("tmp"), [])  # the half-written file was removed
        self.assertEqual(rep.spool.degraded, f"{ENOSPC}; 1 reports held in memory")
        self.assertEqual(len(self.support.requests), 1)  # sent from memory all the same
        [line] = [t for t in self.texts(LogLevel.error) if "Cannot write" in t]
        self.assertIn(ENOSPC, line)
        self.advance(HELD_RETRY_SECONDS)
        self.assertEqual(rep.spool.held, 1)  # still full
        os.unlink(filler)
        self.advance(HELD_RETRY_SECONDS)
        self.assertEqual(rep.spool.held, 0)
        [name] = self.files("pending")
        with open(os.path.join(self.spool_dir, "pending", name), "rb") as f:
            self.assertEqual(json.loads(f.read()), report_of_size(1, 8000))
        self.assertIsNone(rep.spool.degraded)
        self.support.answers.clear()
        self.advance(300)
        self.assertEqual(self.stats["reports_delivered"], 1)
        self.assertEqual(self.stats["reports_lost"], 0)
        self.assertEqual(self.tracebacks(), [])
        self.successResultOf(rep.stopService())

    def test_stand_alone_on_a_full_tmpfs_writes_to_local_once_space_returns(self):
        sink = LocalReports(self.real_spool(), self.stats)
        sink.startService()
        self.addCleanup(sink.stopService)
        filler = fill(self.spool_dir)
        path = self.successResultOf(sink.submit(report_of_size(1, 8000)))
        self.assertFalse(os.path.exists(path))
        self.assertEqual(sink.spool.held, 1)
        os.unlink(filler)
        self.clock.advance(HELD_RETRY_SECONDS)
        with open(path, "rb") as f:
            self.assertEqual(json.loads(f.read()), report_of_size(1, 8000))
        self.assertEqual(self.stats["reports_written_local"], 1)
        self.assertEqual(self.stats["reports_lost"], 0)
        self.assertEqual(self.tracebacks(), [])
