"""SIGHUP reloads the settings, SIGUSR1 reopens the log file: the diff, and the real twistd."""

from __future__ import annotations

import json
import os
import signal

from twisted.internet import defer, error, reactor, task
from twisted.logger import globalLogPublisher
from twisted.python.logfile import LogFile
from twisted.trial import unittest

from tempesta_ts import config as settings
from tempesta_ts import reload
from tempesta_ts.service import TroubleshootingService
from tests.processes import STARTED, TWISTD, spawn, warning_settling

SECONDS = 30


class DiffTests(unittest.TestCase):
    """What a reload may change live and what waits for a restart."""

    def test_live_keys_and_restart_keys_are_told_apart(self):
        old = settings.Config()
        new = settings.Config(port=6000, log_level="debug", allowed_sources=settings.CIDRS.parse_text("10.0.0.0/8"),
                              spool_dir="/elsewhere")
        live, restart = reload.diff(old, new)
        self.assertEqual(live, ["allowed_sources", "log_level"])
        self.assertEqual(restart, ["port", "spool_dir"])

    def test_keys_needing_a_restart_keep_their_running_value(self):
        old = settings.Config()
        new = settings.Config(port=6000, log_level="debug")
        applied = reload.in_force(old, new, ["log_level"])
        self.assertEqual((applied.port, applied.log_level), (5555, "debug"))

    def test_the_line_says_what_changed_and_what_needs_a_restart(self):
        self.assertEqual(
            reload.describe("/etc/t.conf", ["log_level"], ["port", "spool_dir"]),
            "Reloaded /etc/t.conf: changed log_level; needs a restart to change port, spool_dir "
            "(running values kept)",
        )
        self.assertEqual(reload.describe("/etc/t.conf", [], []), "Reloaded /etc/t.conf: nothing changed")


class SignalsTests(unittest.TestCase):
    """Signals.reload with a real service on a task.Clock: applied, or refused whole."""

    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.service = TroubleshootingService(
            settings.Config(port=0, host="127.0.0.1", spool_dir=self.mktemp(), metrics_port=0), task.Clock()
        )
        self.next = None
        self.signals = reload.Signals(task.Clock(), "t.conf", self.load, lambda: self.service.config,
                                      self.service.reconfigure)

    def load(self):
        if isinstance(self.next, Exception):
            raise self.next
        return self.next

    def said(self) -> list[str]:
        from twisted.logger import formatEvent
        return [formatEvent(e) for e in self.events if e.get("log_namespace", "").startswith("tempesta_ts.reload")]

    def test_allowed_sources_change_live_and_the_port_waits_for_a_restart(self):
        self.next = settings.replace(self.service.config, port=7000,
                                     allowed_sources=settings.CIDRS.parse_text("10.0.0.0/8"))
        self.signals.reload()
        self.assertFalse(self.service.intake.sources.allows("192.0.2.1"))
        self.assertTrue(self.service.intake.sources.allows("10.1.2.3"))
        self.assertEqual(self.service.config.port, 0)
        self.assertEqual(self.service.status.mode.sources, ("10.0.0.0/8",))
        self.assertEqual(self.said(), [
            "Reloaded t.conf: changed allowed_sources; needs a restart to change port (running values kept)"
        ])

    def test_ignore_patterns_change_live(self):
        self.next = settings.replace(self.service.config, ignore_patterns=("^WARNING: CPU: 1 PID: 1 ",))
        self.signals.reload()
        self.assertIsNone(self.service.tracker.rules.detect("WARNING: CPU: 1 PID: 1 at x.c:1 f+0x1/0x2"))

    def test_redactions_change_live(self):
        self.assertIsNone(self.service.pipeline.make_report.redactor)
        self.next = settings.replace(self.service.config,
                                     report_redactions=(("token=\\S+", "token=X"),))
        self.signals.reload()
        redactor = self.service.pipeline.make_report.redactor
        self.assertEqual(redactor.line("GET /?token=abc"), "GET /?token=X")
        self.assertEqual(self.said(), ["Reloaded t.conf: changed report_redactions"])

    def test_the_status_token_changes_live(self):
        service = TroubleshootingService(
            settings.Config(port=0, host="127.0.0.1", spool_dir=self.mktemp(), metrics_port=9),
            task.Clock(),
        )
        service.reconfigure(settings.replace(service.config, status_token="s3cret-token"))
        self.assertEqual(service.web.status_token, "s3cret-token")

    def test_a_bad_config_is_refused_and_the_old_stays(self):
        before = self.service.config
        self.next = settings.ConfigError("config file 't.conf': key 'port': 70000 is not valid")
        self.signals.reload()
        self.assertIs(self.service.config, before)
        self.assertEqual(self.said(), [
            "Reload refused, the running settings stay: config file 't.conf': key 'port': 70000 is not valid"
        ])

    def test_sigusr1_without_a_log_file_is_harmless(self):
        self.signals.reopen()
        self.assertEqual(self.said(), ["SIGUSR1: no log file to reopen (logging to standard output)"])

    def test_the_log_file_is_found_in_twistds_sigusr1_handler(self):
        log_file = LogFile.fromFullPath(self.mktemp())
        self.addCleanup(log_file.close)

        def rotateLog(signal, frame):
            log_file.rotate()

        self.assertIs(reload.find_log_file(rotateLog), log_file)
        self.assertIsNone(reload.find_log_file(signal.SIG_DFL))


def lines_of(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().splitlines()
    except OSError:
        return []


@defer.inlineCallbacks
def line_in_file(path: str, needle: str, seconds: float = SECONDS):
    """The first line of the file holding ``needle``, polled on the reactor."""
    for _ in range(int(seconds / 0.05)):
        for line in lines_of(path):
            if needle in line:
                return line
        yield task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"no {needle!r} in {path}:\n" + "\n".join(lines_of(path)[-20:]))


class TwistdSignalTests(unittest.TestCase):
    """The real twistd: SIGHUP reloads, SIGUSR1 reopens, neither kills it."""

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.conf = os.path.join(self.dir, "tap.conf")
        self.write({"host": "127.0.0.1", "port": 0, "spool_dir": os.path.join(self.dir, "spool"),
                    "metrics_port": 0, "settle_seconds": 5})

    def write(self, content: dict) -> None:
        with open(self.conf, "w") as f:
            json.dump(content, f)

    def change(self) -> None:
        with open(self.conf) as f:
            content = json.load(f)
        self.write({**content, "log_level": "warn", "port": 1234})

    def twistd(self, *twistd_args: str):
        return spawn(self, "twistd", [*TWISTD, *twistd_args, "tempesta-ts", "--config", self.conf])

    RELOADED = "Reloaded {}: changed log_level; needs a restart to change port (running values kept)"

    @defer.inlineCallbacks
    def test_nodaemon_to_stdout_sighup_reloads_and_sigusr1_is_harmless(self):
        child = self.twistd("-n", "--pidfile=")
        yield child.line_containing(STARTED, SECONDS)
        self.change()
        child.transport.signalProcess(signal.SIGHUP)
        yield child.line_containing(self.RELOADED.format(self.conf), SECONDS)
        self.write({"port": 70000})
        child.transport.signalProcess(signal.SIGHUP)
        yield child.line_containing("Reload refused, the running settings stay:", SECONDS)
        child.transport.signalProcess(signal.SIGUSR1)
        yield child.line_containing("SIGUSR1: no log file to reopen", SECONDS)
        self.assertTrue(child.running)
        child.transport.signalProcess("TERM")
        reason = yield child.ended(SECONDS)
        self.assertEqual(reason.signal, signal.SIGTERM, child.tail())

    @defer.inlineCallbacks
    def test_nodaemon_with_a_log_file_sigusr1_reopens_it_after_a_move(self):
        log = os.path.join(self.dir, "log")
        child = self.twistd("-n", "--pidfile=", "-l", log)
        yield line_in_file(log, STARTED)
        os.rename(log, log + ".old")
        child.transport.signalProcess(signal.SIGUSR1)
        yield line_in_file(log, f"SIGUSR1: reopened the log file {log}")
        self.change()
        child.transport.signalProcess(signal.SIGHUP)
        yield line_in_file(log, self.RELOADED.format(self.conf))
        self.assertTrue(child.running)
        child.transport.signalProcess("TERM")
        yield child.ended(SECONDS)

    @defer.inlineCallbacks
    def test_daemon_with_a_pid_file_survives_sighup_and_sigusr1(self):
        log, pidfile = os.path.join(self.dir, "log"), os.path.join(self.dir, "pid")
        parent = self.twistd(f"--pidfile={pidfile}", "-l", log)
        reason = yield parent.ended(SECONDS)
        self.assertIsInstance(reason, error.ProcessDone, parent.tail())
        yield line_in_file(log, STARTED)
        with open(pidfile) as f:
            pid = int(f.read())
        self.addCleanup(self.stop, pid)
        self.change()
        os.kill(pid, signal.SIGHUP)
        yield line_in_file(log, self.RELOADED.format(self.conf))
        os.kill(pid, signal.SIGUSR1)
        yield line_in_file(log, "SIGUSR1: reopened the log file")
        os.kill(pid, 0)  # still runs
        with open(pidfile) as f:
            self.assertEqual(int(f.read()), pid)

    @defer.inlineCallbacks
    def stop(self, pid: int):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        for _ in range(SECONDS * 20):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            yield task.deferLater(reactor, 0.05, lambda: None)
        os.kill(pid, signal.SIGKILL)

    @defer.inlineCallbacks
    def test_a_report_settling_during_sighup_is_written(self):
        child = self.twistd("-n", "--pidfile=")
        yield warning_settling(self, child, SECONDS)
        child.transport.signalProcess(signal.SIGHUP)
        yield child.line_containing("Reloaded", SECONDS)
        yield child.line_containing("stand-alone: no support_host", SECONDS)
        self.assertTrue(child.running)
        child.transport.signalProcess("TERM")
        yield child.ended(SECONDS)
