"""The real twistd stopped by SIGTERM or killed (kill -9) and started again: the next report
holds the lines sent before, from the archive, and a marker where the restart was."""

from __future__ import annotations

import json
import os
import socket

from twisted.internet import defer
from twisted.trial import unittest

from tempesta_ts.archive_restore import RESTART_MARKER
from tests.processes import STARTED, TWISTD, spawn
from tests.waits import wait_until

SECONDS = 30
SOURCE = "127.0.0.2"


class RestartTests(unittest.TestCase):
    """History across a restart, over loopback UDP and real files."""

    timeout = 120

    def setUp(self):
        self.spool = os.path.abspath(self.mktemp())
        self.sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sender.bind((SOURCE, 0))
        self.addCleanup(self.sender.close)
        self.seq = 0

    @defer.inlineCallbacks
    def start(self):
        self.child = spawn(self, "twistd", [
            *TWISTD, "-n", "--pidfile=", "tempesta-ts", "--host", "127.0.0.1", "--port", "0",
            "--metrics-port", "0", "--spool-dir", self.spool, "--settle-seconds", "0.2",
        ])
        line = yield self.child.line_containing(STARTED, SECONDS)
        self.port = int(line.split(STARTED, 1)[1].split(";", 1)[0].rsplit(":", 1)[1])

    def send(self, text: str) -> None:
        self.seq += 1
        self.sender.sendto(f"6,{self.seq},{self.seq * 1000},-;{text}\n".encode(),
                           ("127.0.0.1", self.port))

    def archived(self) -> int:
        try:
            with open(os.path.join(self.spool, "archive", f"{SOURCE}.log"), "rb") as f:
                return f.read().count(b"\n")
        except FileNotFoundError:
            return 0

    def reports(self) -> list[str]:
        local = os.path.join(self.spool, "local")
        return sorted(os.listdir(local)) if os.path.isdir(local) else []

    @defer.inlineCallbacks
    def restart_and_report(self, signal: str):
        """20 lines, the server stopped by `signal` and started again, an incident: its report."""
        yield self.start()
        for n in range(1, 21):
            self.send(f"line {n} before the restart")
        # What the archive has written is what survives a kill -9.
        yield wait_until(lambda: self.archived() == 20, timeout=SECONDS)
        self.child.transport.signalProcess(signal)
        yield self.child.ended(SECONDS)
        yield self.start()
        yield self.child.line_containing("Restored 20 lines of 1 instances", SECONDS)
        self.send("WARNING: CPU: 0 PID: 1 at kernel/test.c:1 after_restart+0x1/0x2")
        self.send("---[ end trace 0000000000000000 ]---")
        yield wait_until(lambda: self.reports(), timeout=SECONDS)
        with open(os.path.join(self.spool, "local", self.reports()[0]), encoding="utf-8") as f:
            report = json.load(f)
        self.child.transport.signalProcess("TERM")
        yield self.child.ended(SECONDS)
        return report

    def check(self, report: dict) -> None:
        texts = [entry["text"] for entry in report["log"]]
        self.assertEqual(
            texts,
            [f"line {n} before the restart" for n in range(1, 21)]
            + [RESTART_MARKER,
               "WARNING: CPU: 0 PID: 1 at kernel/test.c:1 after_restart+0x1/0x2",
               "---[ end trace 0000000000000000 ]---"],
        )
        self.assertEqual([entry["seq"] for entry in report["log"][:20]], list(range(1, 21)))
        marker = report["log"][20]
        self.assertEqual((marker["level"], marker["seq"], marker["kernel_time_us"]), (None, None, None))
        self.assertEqual(report["lost_messages"], 0)
        self.assertEqual(report["instance"]["address"], SOURCE)
        self.assertEqual(report["incidents"][0]["kind"], "warning")

    @defer.inlineCallbacks
    def test_a_group_writable_archive_dir_stops_the_start_with_one_line(self):
        archive = os.path.join(self.spool, "archive")
        os.makedirs(archive)
        os.chmod(archive, 0o770)
        child = spawn(self, "twistd", [*TWISTD, "-n", "--pidfile=", "tempesta-ts", "--host", "127.0.0.1",
                                       "--port", "0", "--metrics-port", "0", "--spool-dir", self.spool])
        yield child.ended(SECONDS)
        self.assertNotIn("Traceback", "\n".join(child.lines))
        self.assertIn(f"tempesta-ts: archive_dir: {archive!r} is writable by its group (mode 0770)",
                      child.lines[-1])

    @defer.inlineCallbacks
    def test_after_sigterm_and_a_start_the_report_holds_the_lines_sent_before(self):
        report = yield self.restart_and_report("TERM")
        self.check(report)

    @defer.inlineCallbacks
    def test_after_kill_9_and_a_start_the_report_holds_the_lines_sent_before(self):
        report = yield self.restart_and_report("KILL")
        self.check(report)
