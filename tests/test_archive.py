"""The archive in the server: every line on disk within a second, bounded, a failing disk only
counted; the buffers rebuilt from it at start."""

from __future__ import annotations

import errno
import os

from twisted.internet import defer, task
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest

from tempesta_ts import archive as archive_module
from tempesta_ts import archive_queue, archive_restore
from tempesta_ts.archive import Archive, archive_directory
from tempesta_ts.archive_restore import RESTART_MARKER
from tempesta_ts.archive_format import Stamps
from tempesta_ts.buffers import BufferRegistry
from tempesta_ts.config import Config, parse_flag
from tempesta_ts.errors import StartupError
from tempesta_ts.metrics import KNOWN_STATS
from tempesta_ts.service import TroubleshootingService
from tests.processes import run

T = 1_795_000_000.0


def extended(seq: int, text: str = "tfw: request processed", level: int = 6) -> bytes:
    return f"{level},{seq},{seq * 1000},-;{text}\n".encode()


class ArchiveTestCase(unittest.TestCase):
    """A registry and its archive on a Clock and a temporary directory."""

    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        self.clock = task.Clock()
        self.clock.advance(T)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def start(self, max_lines=100, max_instances=10, write=os.write, max_bytes=64 * 1024,
              keep=3, total=10**9) -> Archive:
        self.stats = dict.fromkeys(KNOWN_STATS, 0)
        self.registry = BufferRegistry(max_instances, max_lines, 10**6, self.stats,
                                       keep_unwritten=True)
        archive = Archive(self.directory, self.registry, self.clock, self.stats, max_bytes, keep,
                          total, write=write)
        archive.startService()
        self.addCleanup(lambda: archive.running and archive.stopService())
        return archive

    def send(self, address: str, *datagrams: bytes) -> None:
        for datagram in datagrams:
            self.registry.receive_datagram(address, datagram, self.clock.seconds())

    def archived(self, address: str = "10.0.0.1") -> list[str]:
        path = os.path.join(self.directory, address.replace(":", "-") + ".log")
        if not os.path.exists(path):
            return []
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()

    def logged(self, level: LogLevel) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events
                if e.get("log_level") == level and e.get("log_namespace", "").startswith("tempesta_ts.archive")]


class WritingTests(ArchiveTestCase):
    """Every line reaches its instance's file within a second."""

    def test_every_line_is_on_disk_a_second_later_with_its_receive_time(self):
        self.start()
        self.send("10.0.0.1", extended(1), b"[   12.345678] a plain line\n")
        self.clock.advance(0.5)
        self.send("2001:db8::1", extended(7, "from IPv6"))
        self.assertEqual(self.archived(), [])
        self.clock.advance(0.5)
        self.assertEqual(self.archived(), [
            "2026-11-18T11:06:40.000000Z 6,1,1000,-;tfw: request processed",
            "2026-11-18T11:06:40.000000Z [   12.345678] a plain line",
        ])
        self.assertEqual(self.archived("2001:db8::1"),
                         ["2026-11-18T11:06:40.500000Z 6,7,7000,-;from IPv6"])
        self.assertEqual(self.stats["archive_lines"], 3)

    def test_lines_made_from_fragments_and_by_the_timer_are_written_in_order(self):
        self.start()
        body = "BUG: a long message in two fragments"
        self.send("10.0.0.1", extended(1),
                  f"4,2,2000,-,ncfrag=0/{len(body)};{body[:10]}".encode(),
                  f"4,2,2000,-,ncfrag=10/{len(body)};{body[10:]}".encode(),
                  b"a partial plain line without its newline")
        self.clock.advance(1.0)
        self.registry.expire(self.clock.seconds())
        self.clock.advance(1.0)
        self.assertEqual([line.split(" ", 1)[1] for line in self.archived()], [
            "6,1,1000,-;tfw: request processed",
            "4,2,2000,-;BUG: a long message in two fragments",
            "a partial plain line without its newline",
        ])

    def test_more_lines_in_a_second_than_the_buffer_holds_are_all_written(self):
        self.start(max_lines=20)
        self.send("10.0.0.1", *[extended(n) for n in range(1, 501)])
        self.clock.advance(1.0)
        self.assertEqual(len(self.archived()), 500)
        self.assertEqual(len(self.registry.get("10.0.0.1").buffer), 20)

    def test_a_flush_takes_turns_with_the_reactor(self):
        self.patch(archive_module, "STEP_LINES", 100)
        self.patch(archive_module, "WRITE_COST", 0)
        turns = []
        # Each slice of the archive's work ends after one step: a reactor turn each.
        self.patch(archive_module, "_Slice", lambda: lambda: turns.append(self.stats["archive_lines"]) or True)
        self.start()
        for n in range(1, 11):
            self.send(f"10.0.0.{n}", *[extended(seq) for seq in range(1, 101)])
        self.clock.advance(1.0)
        self.assertEqual(self.stats["archive_lines"], 1000)
        # Sorting the lines by instance takes turns too, then each turn writes 100.
        self.assertEqual([n for n in turns if n][:10], [100 * n for n in range(1, 11)])
        self.assertGreaterEqual(len(turns), 20)

    def test_one_flooding_instance_is_written_in_steps_too(self):
        self.patch(archive_module, "STEP_LINES", 100)
        turns = []
        self.patch(archive_module, "_Slice", lambda: lambda: turns.append(self.stats["archive_lines"]) or True)
        self.start(max_bytes=10**6)
        for n in range(10):
            self.clock.advance(0.01)
            self.send("10.0.0.1", *[extended(n * 100 + seq) for seq in range(1, 101)])
        self.clock.advance(1.0)
        self.assertEqual([n for n in turns if n][:10], [100 * n for n in range(1, 11)])
        self.assertEqual([int(line.split(",")[1]) for line in self.archived()], list(range(1, 1001)))

    def test_a_run_cut_into_steps_keeps_its_receive_time_in_each_piece(self):
        self.patch(archive_module, "STEP_LINES", 100)
        self.start(max_bytes=10**6)
        self.send("10.0.0.1", *[extended(seq) for seq in range(1, 251)])
        received = self.clock.seconds()
        self.clock.advance(0.5)
        self.send("10.0.0.1", extended(251))
        self.clock.advance(1.0)
        lines = self.archived()
        self.assertEqual(len(lines), 251)
        stamps = {line.split(" ", 1)[0] for line in lines[:250]}
        self.assertEqual(stamps, {Stamps().prefix(received).decode().strip()})
        self.assertNotIn(lines[250].split(" ", 1)[0], stamps)

    def test_a_stop_in_the_middle_of_a_flush_finishes_it_in_order(self):
        self.patch(archive_module, "STEP_LINES", 100)
        archive = self.start(max_bytes=10**6)
        self.send("10.0.0.1", *[extended(seq) for seq in range(1, 501)])
        archive._take()
        archive._running = archive._steps()
        next(archive._running)
        self.send("10.0.0.1", extended(501))
        archive.stopService()
        self.assertEqual([int(line.split(",")[1]) for line in self.archived()], list(range(1, 502)))

    def test_an_evicted_instance_has_its_last_lines_written(self):
        self.start(max_instances=2)
        self.send("10.0.0.1", extended(1, "before eviction"))
        self.send("10.0.0.2", extended(1))
        self.send("10.0.0.3", extended(1))
        self.assertIsNone(self.registry.get("10.0.0.1"))
        self.clock.advance(1.0)
        self.assertEqual([line.split(";", 1)[1] for line in self.archived()], ["before eviction"])

    def test_a_stop_writes_what_came_in_its_last_second(self):
        archive = self.start()
        self.send("10.0.0.1", extended(1), b"partial")
        self.clock.advance(0.3)
        self.registry.flush(self.clock.seconds())
        archive.stopService()
        self.assertEqual(len(self.archived()), 2)

    def test_past_the_bound_of_unwritten_lines_the_oldest_are_dropped_and_counted(self):
        self.start()
        self.patch(archive_module, "PENDING_MAX_LINES", 100)
        for n in range(1, 301):
            # A separate receive time each: a run each.
            self.clock.advance(0.001)
            self.send("10.0.0.%d" % (n % 3 + 1), extended(n))
        self.clock.advance(1.0)
        written = sum(len(self.archived(f"10.0.0.{i}")) for i in (1, 2, 3))
        self.assertEqual(written + self.stats["archive_lines_dropped"], 300)
        self.assertGreaterEqual(written, 100)
        self.assertEqual(len(self.logged(LogLevel.warn)), 1)

    def test_a_second_taken_when_the_bound_of_unwritten_lines_is_reached_is_dropped_counted(self):
        archive = self.start()
        self.patch(archive_module, "PENDING_MAX_LINES", 10)
        # A write to the files takes long (a slow disk): the seconds taken meanwhile wait.
        archive._loop.stop()
        self.send("10.0.0.1", *[extended(n) for n in range(1, 11)])
        archive._take()
        self.send("10.0.0.1", *[extended(n) for n in range(11, 16)])
        archive._take()
        self.assertEqual((self.stats["archive_lines_dropped"], archive.pending_lines), (5, 10))
        for _ in archive._steps():
            pass
        self.assertEqual([int(line.split(",")[1]) for line in self.archived()],
                         list(range(1, 11)))

    def test_the_path_of_a_datagram_appends_its_tag_and_itself_to_one_queue(self):
        self.start()
        datagrams = [extended(n) for n in range(1, 65)]
        self.send("10.0.0.1", *datagrams[:32])
        self.send("10.0.0.2", *datagrams[32:])
        queue = self.registry.archive_queue
        # The receive time once, then a tag and the datagram as it came: no container a
        # datagram, nothing kept on the instance.
        self.assertEqual(queue[0], archive_queue.stamp(Stamps().prefix(self.clock.seconds())))
        self.assertEqual(queue[1::2], [archive_queue.tag("10.0.0.1")] * 32
                         + [archive_queue.tag("10.0.0.2")] * 32)
        self.assertEqual(queue[2::2], datagrams)
        self.assertEqual(self.registry.unwritten_lines, 64)


class FullDiskTests(ArchiveTestCase):
    """A full or failing disk costs archive lines, counted, never ingest; one line a burst."""

    def test_a_full_disk_drops_archive_lines_counts_them_and_says_why_once(self):
        full = [True]

        def write(fd, data):
            if full[0]:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return os.write(fd, data)

        archive = self.start(write=write)
        for second in range(5):
            self.send("10.0.0.1", extended(second * 2 + 1), extended(second * 2 + 2))
            self.send("10.0.0.2", extended(second + 1))
            self.clock.advance(1.0)
        self.assertEqual(self.stats["archive_lines_dropped"], 15)
        self.assertEqual(self.stats["archive_write_errors"], 10)
        self.assertEqual(self.stats["lines"], 15)
        self.assertEqual(len(self.registry.get("10.0.0.1").buffer), 10)
        self.assertRegex(archive.degraded, r"\Aarchive: cannot write /.*/10\.0\.0\.[12]\.log "
                                           r"\(No space left on device\); 15 lines dropped\Z")
        errors = self.logged(LogLevel.error)
        self.assertEqual(len(errors), 1, errors)
        self.assertIn("No space left on device", errors[0])
        self.assertFalse([e for e in self.events if e.get("log_failure") is not None])

        full[0] = False
        self.send("10.0.0.1", extended(11))
        self.clock.advance(1.0)
        self.assertIsNone(archive.degraded)
        self.assertEqual(len(self.archived()), 1)
        self.assertIn("writing again", self.logged(LogLevel.info)[-1])

    def test_an_archive_needs_a_registry_that_keeps_what_it_received(self):
        registry = BufferRegistry(10, 100, 10**6)
        with self.assertRaises(ValueError):
            Archive(self.directory, registry, self.clock, {}, 1 << 20, 3, 1 << 30)

    def test_too_few_descriptors_for_the_instances_is_said_at_start(self):
        self.registry = BufferRegistry(5000, 100, 10**6, keep_unwritten=True)
        archive = Archive(self.directory, self.registry, self.clock,
                          dict.fromkeys(KNOWN_STATS, 0), 1 << 20, 3, 1 << 30, max_open=704)
        archive.startService()
        self.addCleanup(archive.stopService)
        self.assertIn("704 files held open at most", self.logged(LogLevel.warn)[-1])

    def test_an_archive_directory_that_cannot_be_made_leaves_ingest_running(self):
        with open(self.directory, "w") as f:
            f.write("a file where the directory should be")
        archive = self.start()
        self.send("10.0.0.1", extended(1))
        self.clock.advance(1.0)
        self.assertEqual(self.stats["lines"], 1)
        self.assertEqual(self.stats["archive_lines_dropped"], 1)
        self.assertIn("cannot use", archive.degraded)

    def test_a_directory_others_can_write_stops_the_start(self):
        os.makedirs(self.directory, mode=0o700)
        os.chmod(self.directory, 0o770)
        with self.assertRaises(StartupError):
            self.start()


class RealFullDiskTests(ArchiveTestCase):
    """A real filesystem that fills up: a 64 KiB tmpfs."""

    @defer.inlineCallbacks
    def setUp(self):
        super().setUp()
        if os.geteuid() != 0:
            raise unittest.SkipTest("mounting a small tmpfs needs root")
        mountpoint = os.path.abspath(self.mktemp())
        os.makedirs(mountpoint)
        _, err, code = yield run("/bin/mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs",
                                 mountpoint)
        if code != 0:
            raise unittest.SkipTest(f"cannot mount a tmpfs here: {err.decode(errors='replace')}")
        self.addCleanup(run, "/bin/umount", mountpoint)
        self.directory = os.path.join(mountpoint, "archive")
        # Room taken by something else, freed later by the operator.
        self.filler = os.path.join(mountpoint, "filler")
        with open(self.filler, "wb") as f:
            f.write(b"x" * 32 * 1024)

    def test_a_full_filesystem_drops_archive_lines_not_ingest_and_recovers_when_freed(self):
        archive = self.start(max_bytes=10**6)
        sent = 0
        for second in range(4):
            self.send("10.0.0.1", *[extended(sent + n, "x" * 40) for n in range(1, 301)])
            sent += 300
            self.clock.advance(1.0)
        self.assertEqual(self.stats["lines"], 1200)
        self.assertGreater(self.stats["archive_lines_dropped"], 0)
        self.assertGreater(self.stats["archive_write_errors"], 0)
        self.assertEqual(self.stats["archive_lines"] + self.stats["archive_lines_dropped"], 1200)
        self.assertIn("No space left on device", archive.degraded)
        self.assertEqual(len(self.logged(LogLevel.error)), 1)
        # Whole lines only, each read back.
        lines = self.archived()
        self.assertEqual(len(lines), self.stats["archive_lines"])
        self.assertTrue(all(line.endswith("x" * 40) for line in lines))

        os.remove(self.filler)
        self.send("10.0.0.1", extended(sent + 1, "after the operator freed room"))
        self.clock.advance(1.0)
        self.assertIsNone(archive.degraded)
        self.assertTrue(self.archived()[-1].endswith("after the operator freed room"))


class RestoreTests(ArchiveTestCase):
    """At start each buffer is rebuilt from the end of its file."""

    def restart(self, **kw) -> Archive:
        self.archive.stopService()
        self.clock.advance(60.0)
        self.archive = self.start(**kw)
        return self.archive

    def test_a_restart_rebuilds_each_buffer_with_a_marker_after_the_archived_lines(self):
        self.archive = self.start()
        self.send("10.0.0.1", *[extended(n, f"line {n}") for n in range(1, 21)])
        self.send("2001:db8::1", b"[    1.000000] plain \x1b line\n")
        self.restart()
        instance = self.registry.get("10.0.0.1")
        lines = list(instance.buffer)
        self.assertEqual([line.text for line in lines], [f"line {n}" for n in range(1, 21)] + [RESTART_MARKER])
        self.assertEqual((lines[-1].level, lines[-1].seq, lines[-1].received_at), (None, None, T + 60))
        self.assertEqual((lines[0].seq, lines[0].kernel_time_us, lines[0].level), (1, 1000, 6))
        self.assertEqual(instance.first_seen, T)
        (other, marker) = list(self.registry.get("2001:db8::1").buffer)
        self.assertEqual((other.text, other.kernel_time_us), ("plain \x1b line", 1_000_000))
        self.assertEqual(self.stats["archive_lines_restored"], 21)
        self.assertEqual(self.stats["lines"], 0)
        self.assertIn("Restored 21 lines of 2 instances", self.logged(LogLevel.info)[-1])

    def test_restored_lines_are_not_written_again_nor_seen_as_new(self):
        self.archive = self.start()
        self.send("10.0.0.1", extended(1, "Kernel panic - not syncing: before the restart"))
        self.restart()
        seen = []
        self.registry.observers.append(lambda instance, lines: seen.extend(lines))
        self.send("10.0.0.1", extended(2))
        self.clock.advance(1.0)
        self.assertEqual([line.text for line in seen], ["tfw: request processed"])
        self.assertEqual(len(self.archived()), 2)

    def test_sequence_numbers_go_on_across_a_restart_without_losses(self):
        self.archive = self.start()
        self.send("10.0.0.1", *[extended(n) for n in range(100, 120)])
        self.restart()
        self.send("10.0.0.1", extended(120))
        self.assertEqual(self.registry.get("10.0.0.1").lost_messages, 0)
        # A real gap still counts, and a reboot (numbers from 0) is seen as one.
        self.send("10.0.0.1", extended(125))
        self.assertEqual(self.registry.get("10.0.0.1").lost_messages, 4)
        self.send("10.0.0.1", extended(0), extended(1))
        self.assertEqual(self.registry.get("10.0.0.1").lost_messages, 4)
        self.assertEqual(self.stats["duplicate_messages"], 0)

    def test_a_message_sent_again_after_a_restart_is_a_duplicate(self):
        self.archive = self.start()
        self.send("10.0.0.1", *[extended(n) for n in range(1, 11)])
        self.restart()
        self.send("10.0.0.1", extended(10))
        self.assertEqual(self.stats["duplicate_messages"], 1)

    def test_the_restore_stays_within_the_buffer_bounds(self):
        self.archive = self.start(max_lines=1000)
        self.send("10.0.0.1", *[extended(n) for n in range(1, 501)])
        self.restart(max_lines=50)
        lines = list(self.registry.get("10.0.0.1").buffer)
        self.assertEqual(len(lines), 50)
        self.assertEqual(lines[0].seq, 452)
        self.assertEqual(self.registry.get("10.0.0.1").buffer.dropped, 0)

    def test_the_most_recently_written_instances_are_restored_up_to_max_instances(self):
        self.archive = self.start(max_instances=10)
        for n in range(1, 6):
            self.send(f"10.0.0.{n}", extended(1))
            self.clock.advance(1.0)
        self.restart(max_instances=3)
        self.assertEqual(sorted(i.address for i in self.registry), ["10.0.0.3", "10.0.0.4", "10.0.0.5"])
        # The most recently written is the most recently active: evicted last.
        self.send("10.0.0.9", extended(1))
        self.assertIsNone(self.registry.get("10.0.0.3"))

    def test_past_the_time_allowed_the_instances_written_longest_ago_start_empty(self):
        self.archive = self.start()
        for n in range(1, 4):
            self.send(f"10.0.0.{n}", extended(1))
            self.clock.advance(1.0)
        self.patch(archive_restore, "RESTORE_SECONDS", -1)
        self.restart()
        self.assertEqual([i.address for i in self.registry], ["10.0.0.3"])
        self.assertIn("2 instances not restored", self.logged(LogLevel.warn)[-1])

    def test_a_file_not_named_by_an_address_is_left_alone(self):
        self.archive = self.start()
        self.send("10.0.0.1", extended(1))
        self.archive.stopService()
        with open(os.path.join(self.directory, "notes.log"), "w") as f:
            f.write("2026-11-18T11:06:40.000000Z 6,1,1,-;not an instance\n")
        self.archive = self.start()
        self.assertEqual([i.address for i in self.registry], ["10.0.0.1"])

    def test_an_unreadable_file_leaves_its_instance_empty_and_the_rest_restored(self):
        self.archive = self.start()
        self.send("10.0.0.1", extended(1))
        self.send("10.0.0.2", extended(1))
        self.archive.stopService()
        os.remove(os.path.join(self.directory, "10.0.0.1.log"))
        os.symlink("/etc/passwd", os.path.join(self.directory, "10.0.0.1.log"))
        self.archive = self.start()
        self.assertIsNone(self.registry.get("10.0.0.1"))
        self.assertIsNotNone(self.registry.get("10.0.0.2"))


class ConfigTests(unittest.TestCase):
    """archive_dir: on by default in spool_dir, off when empty."""

    def test_the_archive_is_in_spool_dir_by_default_and_off_when_empty(self):
        self.assertEqual(archive_directory(Config(spool_dir="/var/lib/tempesta-ts")),
                         "/var/lib/tempesta-ts/archive")
        self.assertEqual(archive_directory(Config(archive_dir="/srv/archive")), "/srv/archive")
        self.assertIsNone(archive_directory(Config(archive_dir=parse_flag("archive_dir", ""))))

    def test_the_server_starts_its_archive_and_none_when_off(self):
        spool = self.mktemp()
        on = TroubleshootingService(Config(spool_dir=spool, metrics_port=0), task.Clock())
        self.assertEqual(on.archive.directory, os.path.join(spool, "archive"))
        self.assertIn(on.archive, list(on))
        off = TroubleshootingService(Config(spool_dir=spool, metrics_port=0, archive_dir=""),
                                     task.Clock())
        self.assertIsNone(off.archive)
        self.assertFalse(off.registry.keep_unwritten)
