"""Timers that ignore wall-clock steps: the monotonic reactor clock, the clock watch, and the
real twistd under libfaketime stepped back an hour."""

from __future__ import annotations

import ctypes.util
import glob
import json
import os

from twisted.internet import defer, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from tempesta_ts import clock as clocks
from tempesta_ts.buffers import Instance, LogBuffer
from tempesta_ts.netconsole import Decoder
from tempesta_ts.pipeline import ReportMaker
from tests.processes import TWISTD, spawn, warning_settling

SECONDS = 30


class Wall:
    """A wall clock the test steps."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class MonotonicSecondsTests(unittest.TestCase):
    """The reactor's time follows the monotonic clock, starting at the wall time."""

    def setUp(self):
        self.mono = task.Clock()
        self.wall = Wall()
        self.seconds = clocks.MonotonicSeconds(self.wall, self.mono.seconds)

    def test_starts_at_the_wall_time_and_ignores_a_step_back(self):
        self.assertEqual(self.seconds(), self.wall.now)
        self.mono.advance(1)
        self.wall.now += 1 - 3600
        self.assertEqual(self.seconds(), 1_800_000_001.0)
        self.assertEqual(self.seconds.wall_offset(), -3600)

    def test_a_reactor_made_monotonic_keeps_its_pending_timers(self):
        reactor = type("R", (), {})()
        reactor.seconds = lambda: 5.0
        call = type("C", (), {"seconds": reactor.seconds})()
        reactor._pendingTimedCalls, reactor._newTimedCalls = [call], []
        installed = clocks.use_monotonic_time(reactor)
        self.assertIs(reactor.seconds, installed)
        self.assertIs(call.seconds, installed)
        self.assertIs(clocks.use_monotonic_time(reactor), installed)

    def test_reports_show_wall_time_after_a_step(self):
        reactor = task.Clock()
        reactor.seconds = self.seconds
        instance = Instance("192.0.2.1", self.seconds(), LogBuffer(100, 10000), Decoder())
        self.mono.advance(1)
        self.wall.now += 1 - 3600
        report = ReportMaker(reactor, "c", hostname="h")(instance, [], 0)
        # 1_800_000_001 - 3600, as the wall clock now says.
        self.assertEqual(report["created_at"], "2027-01-15T07:00:01.000Z")


class ClockWatchTests(unittest.TestCase):
    """One line when the wall clock jumps, none while it keeps time."""

    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.clock, self.wall = task.Clock(), Wall()
        self.watch = clocks.ClockWatch(self.clock, self.wall)
        self.watch.startService()
        self.addCleanup(self.watch.stopService)

    def said(self):
        return [formatEvent(e) for e in self.events if e.get("log_namespace", "").startswith("tempesta_ts.clock")]

    def tick(self, wall_step: float = 0.0):
        self.wall.now += 1 + wall_step
        self.clock.advance(1)

    def test_a_step_back_is_logged_once(self):
        self.tick()
        self.tick(-3600)
        self.tick()
        self.assertEqual(self.said(), [
            "The wall clock jumped back by 3600 s; timers keep to the monotonic clock, "
            "times shown and sent follow the wall clock"
        ])

    def test_a_step_forward_is_logged(self):
        self.tick(120)
        self.assertEqual(len(self.said()), 1)
        self.assertIn("jumped forward by 120 s", self.said()[0])

    def test_a_clock_keeping_time_says_nothing(self):
        for _ in range(10):
            self.tick(0.01)
        self.assertEqual(self.said(), [])


def libfaketime() -> str | None:
    for pattern in ("/usr/lib/*/faketime/libfaketime.so.1", "/usr/lib/faketime/libfaketime.so.1",
                    "/usr/local/lib/faketime/libfaketime.so.1"):
        found = glob.glob(pattern)
        if found:
            return found[0]
    return ctypes.util.find_library("faketime")


class FaketimeTests(unittest.TestCase):
    """The real twistd, its wall clock stepped back an hour by libfaketime."""

    @defer.inlineCallbacks
    def test_a_report_settles_on_time_when_the_wall_clock_steps_back_an_hour(self):
        library = libfaketime()
        if library is None:
            raise unittest.SkipTest("libfaketime is not installed (apt-get install libfaketime)")
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        stamp = os.path.join(base, "faketime")
        with open(stamp, "w") as f:
            f.write("+0\n")
        conf = os.path.join(base, "tap.conf")
        with open(conf, "w") as f:
            json.dump({"host": "127.0.0.1", "port": 0, "spool_dir": os.path.join(base, "spool"),
                       "metrics_port": 0, "settle_seconds": 1}, f)
        child = spawn(self, "twistd", [*TWISTD, "-n", "--pidfile=", "tempesta-ts", "--config", conf], env={
            "LD_PRELOAD": library, "FAKETIME_TIMESTAMP_FILE": stamp, "FAKETIME_NO_CACHE": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        })
        yield warning_settling(self, child, SECONDS)
        with open(stamp, "w") as f:
            f.write("-3600\n")
        # Settles one second after the warning, not an hour and a second.
        yield child.line_containing("stand-alone: no support_host", 10)
        yield child.line_containing("The wall clock jumped back by 3600 s", 10)
