"""Files and directories on real disk: no symbolic link in the spool or among the system
information is followed, temporary names cannot be guessed, and the directories are private."""

from __future__ import annotations

import json
import os
import stat

from twisted.internet import reactor
from twisted.logger import LogLevel
from twisted.trial import unittest

from tempesta_ts.buffers import SystemInfo
from tempesta_ts.config import Config
from tempesta_ts.errors import StartupError
from tempesta_ts.reporter import BACKOFF_CAP, Reporter
from tempesta_ts.service import TroubleshootingService
from tempesta_ts.spool import Spool, file_name
from tempesta_ts.sysinfo import SystemInfoStore
from tests.test_reporter import EPOCH, Answer, FakeSupport, ReporterTestCase, report

PRECIOUS = b"SECRET-CONTENT of a file the server's user can read\n"


def mode_of(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


class Victim:
    """A file outside the spool that a planted link points to; it must stay as it is."""

    def __init__(self, test: unittest.TestCase) -> None:
        self.test = test
        self.path = os.path.abspath(test.mktemp())
        with open(self.path, "wb") as f:
            f.write(PRECIOUS)

    def assert_intact(self) -> None:
        with open(self.path, "rb") as f:
            self.test.assertEqual(f.read(), PRECIOUS)


class SpoolLinkTests(ReporterTestCase):
    """The spool reads and writes its own regular files only."""

    def sent(self) -> bytes:
        return b"".join(r["raw"] for r in self.support.requests)

    def test_a_pending_report_replaced_by_a_symlink_is_never_sent(self):
        victim = Victim(self)
        rep = self.reporter(FakeSupport([Answer(503)]))
        entry = self.submit(rep, report(1))
        self.assertEqual(len(self.support.requests), 1)
        os.unlink(entry.path)
        os.symlink(victim.path, entry.path)
        self.advance(BACKOFF_CAP)
        self.advance(86400)
        self.assertEqual(len(self.support.requests), 1)
        self.assertNotIn(b"SECRET", self.sent())
        errors = [t for t in self.texts(LogLevel.error) if entry.path in t]
        self.assertEqual(len(errors), 1, self.texts())
        self.assertIn(f"Report {entry.report_id} not sent: {entry.path} is now a symbolic link",
                      errors[0])
        self.assertEqual(self.stats["spool_errors"], 1)
        self.assertEqual(rep.spool.count, 0)
        self.assertEqual(rep.state_of(entry.report_id), "unknown")
        self.assertTrue(os.path.islink(entry.path))
        victim.assert_intact()
        rep.stopService()

    def test_a_pending_report_replaced_by_a_directory_is_never_sent(self):
        rep = self.reporter(FakeSupport([Answer(503)]))
        entry = self.submit(rep, report(1))
        os.unlink(entry.path)
        os.mkdir(entry.path)
        self.advance(BACKOFF_CAP)
        self.assertEqual(len(self.support.requests), 1)
        self.assertEqual(self.stats["spool_errors"], 1)
        self.assertEqual(len([t for t in self.texts(LogLevel.error) if entry.path in t]), 1)
        rep.stopService()

    def test_a_symlink_found_in_pending_at_start_is_ignored_and_never_sent(self):
        victim = Victim(self)
        pending = os.path.join(self.spool_dir, "pending")
        os.makedirs(pending, mode=0o700)
        planted = os.path.join(pending, file_name(EPOCH, report(7)["report_id"]))
        os.symlink(victim.path, planted)
        rep = self.reporter()
        self.advance(86400)
        self.assertEqual(self.support.requests, [])
        self.assertEqual(rep.spool.count, 0)
        errors = [t for t in self.texts(LogLevel.error) if planted in t]
        self.assertEqual(errors, [f"Ignoring {planted} in the spool: a symbolic link or not a "
                                  "regular file; it is never sent"])
        self.assertEqual(self.stats["spool_errors"], 1)
        self.assertTrue(os.path.islink(planted))
        victim.assert_intact()
        rep.stopService()

    def test_a_symlink_at_the_lock_stops_the_start_and_spares_its_target(self):
        victim = Victim(self)
        os.makedirs(self.spool_dir, mode=0o700)
        lock = os.path.join(self.spool_dir, "lock")
        os.symlink(victim.path, lock)
        rep = Reporter(self.config(reuse_port=True, system_info_dir=self.mktemp()), self.clock,
                       self.stats, http_client=object())
        caught = self.assertRaises(StartupError, rep.startService)
        self.assertEqual(str(caught), f"spool_dir: {lock!r} is a symbolic link or not a regular "
                                      "file; remove it (the server makes its own lock file)")
        victim.assert_intact()

    def test_the_lock_file_is_the_servers_own_and_holds_its_pid(self):
        rep = Reporter(self.config(reuse_port=True, system_info_dir=self.mktemp()), self.clock,
                       self.stats, http_client=object())
        rep.startService()
        lock = os.path.join(self.spool_dir, "lock")
        with open(lock) as f:
            self.assertEqual(f.read(), f"{os.getpid()}\n")
        self.assertEqual(mode_of(lock), 0o600)
        self.successResultOf(rep.stopService())

    def test_a_link_planted_at_a_temporary_name_is_not_written_through(self):
        victim = Victim(self)
        spool = Spool(self.spool_dir, 10**6, self.stats, self.clock)
        spool.load()
        # The name a write used to go through: tmp/<file name>.tmp.
        name = file_name(self.clock.seconds(), report(1)["report_id"])
        os.symlink(victim.path, os.path.join(spool.tmp_dir, name + ".tmp"))
        entry = spool.write(report(1))
        victim.assert_intact()
        self.assertFalse(os.path.islink(entry.path))
        with open(entry.path, "rb") as f:
            self.assertEqual(json.loads(f.read()), report(1))
        self.assertEqual(mode_of(entry.path), 0o600)
        local = spool.write_local(report(2))
        self.assertEqual(mode_of(local.path), 0o600)
        self.assertEqual(os.listdir(spool.tmp_dir), [name + ".tmp"])


class SystemInfoFileTests(unittest.TestCase):
    """The system information store on disk."""

    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory, mode=0o700)
        self.store = SystemInfoStore(self.directory)

    def test_a_link_planted_at_the_old_temporary_name_is_not_written_through(self):
        victim = Victim(self)
        planted = os.path.join(self.directory, f"127.0.0.7.json.{os.getpid()}.tmp")
        os.symlink(victim.path, planted)
        self.store.save("127.0.0.7", SystemInfo(1.0, '{"kept": 1}', "json", "127.0.0.7"))
        victim.assert_intact()
        path = os.path.join(self.directory, "127.0.0.7.json")
        self.assertEqual(mode_of(path), 0o600)
        self.assertEqual(self.store.load("127.0.0.7").text, '{"kept": 1}')
        self.assertEqual(sorted(os.listdir(self.directory)), ["127.0.0.7.json", os.path.basename(planted)])

    def test_a_document_replaced_by_a_symlink_is_not_read(self):
        elsewhere = os.path.abspath(self.mktemp())
        with open(elsewhere, "w") as f:
            json.dump({"received_at": 9.0, "text": "SECRET", "format": "text", "peer": "x"}, f)
        os.symlink(elsewhere, os.path.join(self.directory, "127.0.0.7.json"))
        caught = self.assertRaises(OSError, self.store.load, "127.0.0.7")
        self.assertIn("symbolic link", str(caught))

    def test_a_missing_document_is_none(self):
        self.assertIsNone(self.store.load("127.0.0.9"))


class DirectoryTests(unittest.TestCase):
    """spool_dir and system_info_dir: only the server's user may write them, or no start."""

    def service(self, **settings) -> TroubleshootingService:
        settings.setdefault("spool_dir", os.path.abspath(self.mktemp()))
        config = Config(host="127.0.0.1", port=0, metrics_port=0, **settings)
        return TroubleshootingService(config, reactor)

    def refused(self, **settings) -> str:
        svc = self.service(**settings)
        self.addCleanup(svc.stopService)
        caught = self.assertRaises(StartupError, svc.startService)
        self.assertIsNone(svc.listeners.udp_port)
        message = str(caught)
        self.assertNotIn("\n", message)
        return message

    def directory(self, mode: int) -> str:
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        os.chmod(path, mode)
        return path

    def test_a_group_writable_spool_dir_stops_the_start_with_the_fix(self):
        path = self.directory(0o770)
        self.assertEqual(
            self.refused(spool_dir=path),
            f"spool_dir: {path!r} is writable by its group (mode 0770), who could plant or "
            f"replace the files the server reads back; expected only the server's user to write "
            f"it: chmod go-w {path}",
        )

    def test_a_writable_pending_directory_stops_the_start(self):
        path = self.directory(0o755)
        os.mkdir(os.path.join(path, "pending"))
        os.chmod(os.path.join(path, "pending"), 0o777)
        message = self.refused(spool_dir=path)
        self.assertIn(f"spool_dir: '{path}/pending' is writable by its group and others (mode "
                      "0777)", message)
        self.assertIn(f"chmod go-w {path}/pending", message)

    def test_an_others_writable_system_info_dir_stops_the_start(self):
        path = self.directory(0o703)
        message = self.refused(system_info_dir=path)
        self.assertIn(f"system_info_dir: {path!r} is writable by others (mode 0703)", message)
        self.assertIn(f"chmod go-w {path}", message)

    def test_a_directory_of_another_user_stops_the_start(self):
        if os.geteuid() != 0:
            raise unittest.SkipTest("only root can give a directory to another user")
        path = self.directory(0o700)
        os.chown(path, 65534, 65534)
        message = self.refused(system_info_dir=path)
        self.assertIn(f"system_info_dir: {path!r} belongs to user ", message)
        self.assertIn("(65534), not to the server's user", message)
        self.assertIn(f"chown 0 {path}", message)

    def test_directories_made_by_the_server_are_0700_and_an_owners_0755_is_accepted(self):
        spool = self.directory(0o755)
        shared = os.path.join(os.path.abspath(self.mktemp()), "system-info")
        svc = self.service(spool_dir=spool, system_info_dir=shared)
        svc.startService()
        self.addCleanup(svc.stopService)
        self.assertEqual(mode_of(shared), 0o700)
        for sub in ("pending", "rejected", "tmp"):
            self.assertEqual(mode_of(os.path.join(spool, sub)), 0o700, sub)
