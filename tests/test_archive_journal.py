"""The archive's journal: with many instances, lines held back from their files are on disk
within a second all the same, and a kill loses none of them."""

from __future__ import annotations

import errno
import itertools
import os

from twisted.internet import task
from twisted.logger import LogLevel
from twisted.trial import unittest

from tempesta_ts import archive as archive_module
from tempesta_ts.archive import Archive
from tempesta_ts.archive_restore import RESTART_MARKER
from tempesta_ts import archive_queue
from tempesta_ts.archive_format import Stamps, file_name
from tempesta_ts.archive_journal import NAME, Journal, block_record, mark, record
from tempesta_ts.buffers import BufferRegistry
from tempesta_ts.files import NotRegularFile
from tempesta_ts.metrics import KNOWN_STATS
from tests.test_archive import ArchiveTestCase, extended

ADDRESSES = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]


class Killed(BaseException):
    """The process killed at that point: nothing after it runs."""


class JournalFileTests(unittest.TestCase):
    """The file itself: records, marks, a damaged end, no link followed."""

    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory, mode=0o700)

    def test_records_read_back_less_what_is_marked_written(self):
        journal = Journal(self.directory)
        one, two = b"2026-11-30T10:00:00.000000Z one\n", b"2026-11-30T10:00:01.000000Z two\n"
        journal.append([record("10.0.0.1", one), one, record("10.0.0.2", one), one])
        journal.append([mark("10.0.0.1"), record("10.0.0.1", two), two,
                        record("10.0.0.2", two), two])
        journal.close()
        self.assertEqual(Journal(self.directory).read(), [("10.0.0.2", one + two), ("10.0.0.1", two)])

    def test_a_second_s_block_reads_back_by_instance_less_what_is_marked_written(self):
        prefix = Stamps().prefix(1_795_000_000.0)
        a, b = archive_queue.tag("10.0.0.1"), archive_queue.tag("2001:db8::1")
        first = [archive_queue.stamp(prefix), a, b"6,1,1,-;one\n", b, b"6,2,2,-;two\n",
                 a, b"6,3,3,-;three\n"]
        block, _, _ = archive_queue.block_of(first, 1)
        journal = Journal(self.directory)
        journal.append([block_record(block), block])
        # A long one written in steps: its first line is in its file, then all of it.
        journal.append([mark("10.0.0.1", len(prefix + b"6,1,1,-;one\n"))])
        self.assertEqual(Journal(self.directory).read(), [
            ("10.0.0.1", prefix + b"6,3,3,-;three\n"), ("2001:db8::1", prefix + b"6,2,2,-;two\n")])
        journal.append([mark("2001:db8::1")])
        self.assertEqual(Journal(self.directory).read(), [("10.0.0.1", prefix + b"6,3,3,-;three\n")])

    def test_a_damaged_end_is_left_out(self):
        journal = Journal(self.directory)
        line = b"2026-11-30T10:00:00.000000Z whole\n"
        journal.append([record("10.0.0.1", line), line])
        journal.close()
        with open(os.path.join(self.directory, NAME), "ab") as f:
            f.write(b"+10.0.0.2 500\n2026-11-30T10:00:00.000000Z cut sho")
        self.assertEqual(Journal(self.directory).read(), [("10.0.0.1", line)])

    def test_emptied_it_holds_nothing(self):
        journal = Journal(self.directory)
        line = b"2026-11-30T10:00:00.000000Z line\n"
        journal.append([record("10.0.0.1", line), line])
        journal.clear()
        self.assertEqual(os.path.getsize(journal.path), 0)
        self.assertEqual(journal.read(), [])

    def test_none_is_made_until_needed(self):
        journal = Journal(self.directory)
        self.assertEqual(journal.read(), [])
        journal.clear()
        self.assertFalse(os.path.lexists(journal.path))

    def test_a_link_planted_as_the_journal_is_not_followed(self):
        target = os.path.join(self.directory, "elsewhere")
        open(target, "w").close()
        os.symlink(target, os.path.join(self.directory, NAME))
        with self.assertRaises(NotRegularFile):
            Journal(self.directory).append([b"+10.0.0.1 0\n"])
        self.assertEqual(os.path.getsize(target), 0)


class HeldLinesTests(ArchiveTestCase):
    """More instances than DIRECT_INSTANCES: lines held, journaled, written in time."""

    def setUp(self):
        super().setUp()
        self.patch(archive_module, "DIRECT_INSTANCES", 2)

    def send_all(self, first: int, count: int = 1) -> None:
        for address in ADDRESSES:
            self.send(address, *[extended(seq) for seq in range(first, first + count)])

    def restart(self, clock=None, write=os.write) -> Archive:
        """Another archive on the same directory, as a start after a kill makes it."""
        registry = BufferRegistry(10, 100, 10**6, self.stats, keep_unwritten=True)
        again = Archive(self.directory, registry, clock or self.clock, self.stats, 64 * 1024, 3,
                        10**9, write=write)
        again.startService()
        self.addCleanup(again.stopService)
        return again

    def journal_path(self) -> str:
        return os.path.join(self.directory, NAME)

    def journal(self) -> list[tuple[str, bytes]]:
        return Journal(self.directory).read()

    def test_lines_are_in_the_journal_within_a_second_and_in_their_files_later(self):
        self.start()
        self.send_all(1, 3)
        self.clock.advance(1.0)
        self.assertEqual([self.archived(address) for address in ADDRESSES], [[], [], []])
        self.assertEqual([(address, data.count(b"\n")) for address, data in self.journal()],
                         [(address, 3) for address in ADDRESSES])
        # Nothing more comes: the held lines go to their files all the same.
        self.clock.pump([1.0] * int(archive_module.HOLD_SECONDS + 1))
        self.assertEqual([len(self.archived(address)) for address in ADDRESSES], [3, 3, 3])
        self.assertEqual(self.journal(), [])
        self.assertEqual(self.stats["archive_lines"], 9)

    def test_a_kill_loses_no_held_line(self):
        self.start()
        self.send_all(1, 5)
        self.clock.advance(1.0)
        # A kill: no stop. The next start writes the journal to the files, then restores.
        self.stats = dict.fromkeys(KNOWN_STATS, 0)
        again = self.restart()
        registry = again.registry
        self.assertEqual([len(self.archived(address)) for address in ADDRESSES], [5, 5, 5])
        self.assertEqual(self.journal(), [])
        texts = [line.text for line in registry.get("10.0.0.2").buffer]
        self.assertEqual(texts, ["tfw: request processed"] * 5 + [RESTART_MARKER])
        self.assertIn("15 lines of 3 instances written from the journal",
                      self.logged(LogLevel.info)[0])

    def held_then_written(self) -> None:
        """A second's lines held and journaled; the next second, past a bound, all written."""
        self.send_all(1)
        self.clock.advance(1.0)
        self.assertEqual(len(self.journal()), 3)
        self.send_all(2)
        self.clock.advance(1.0)
        self.assertEqual([len(self.archived(address)) for address in ADDRESSES], [2, 2, 2])
        self.assertEqual(self.journal(), [])

    def test_past_the_bound_of_what_is_held_everything_goes_to_the_files(self):
        # A second's three lines are 161 bytes held, their journal 166.
        self.patch(archive_module, "HOLD_MAX_BYTES", 165)
        self.start()
        self.held_then_written()

    def test_past_the_bound_of_the_journal_everything_goes_to_the_files(self):
        self.patch(archive_module, "HOLD_MAX_BYTES", 200)
        self.start()
        self.held_then_written()

    def test_the_journal_takes_at_most_an_eighth_of_the_archive_s_bound(self):
        self.start(total=8 * 200)
        self.held_then_written()

    def held_then_writing(self, count: int, write_cost: int = 10):
        """`count` lines of each instance held; then a quiet second (one more line of
        10.0.0.1): the steps of the write of them all to the files, not run yet."""
        self.patch(archive_module, "STEP_LINES", 10)
        self.patch(archive_module, "WRITE_COST", write_cost)
        self.archive = self.start()
        self.send_all(1, count)
        self.clock.advance(1.0)
        self.archive._loop.stop()
        self.send("10.0.0.1", extended(count + 1))
        self.archive._take()
        return self.archive._steps()

    def test_a_kill_in_the_middle_of_writing_the_held_lines_writes_none_twice(self):
        # The write goes a file a step; the kill comes after its first step.
        next(self.held_then_writing(2))
        self.assertEqual([len(self.archived(address)) for address in ADDRESSES], [3, 0, 0])
        self.restart(clock=task.Clock())
        self.assertEqual([len(self.archived(address)) for address in ADDRESSES], [3, 2, 2])

    def seqs(self, address: str) -> list[int]:
        return [int(line.split(",")[1]) for line in self.archived(address)]

    def test_a_kill_while_a_long_held_run_is_written_in_steps_loses_and_repeats_nothing(self):
        steps = self.held_then_writing(25, write_cost=0)
        # 10.0.0.1's 26 lines go 10 at a time: the kill comes after two steps of them.
        for _ in range(50):
            next(steps)
            if self.archived("10.0.0.1"):
                break
        next(steps)
        self.assertEqual(self.seqs("10.0.0.1"), list(range(1, 21)))
        self.restart(clock=task.Clock())
        self.assertEqual([self.seqs(address) for address in ADDRESSES],
                         [list(range(1, 27)), list(range(1, 26)), list(range(1, 26))])

    def a_second_comes_while_held_lines_are_written(self, write_cost: int = 10):
        """Lines held, then written in steps; after the first step, another second's come
        (and go to the journal at once)."""
        steps = self.held_then_writing(2, write_cost)
        next(steps)
        self.send_all(4, 2)
        self.archive._take()
        return steps

    def test_lines_taken_while_held_ones_are_written_are_journaled_and_kept_after(self):
        steps = self.a_second_comes_while_held_lines_are_written()
        for _ in steps:
            pass
        self.assertEqual([self.seqs(address) for address in ADDRESSES],
                         [[1, 2, 3], [1, 2], [1, 2]])
        self.assertEqual([(address, data.count(b"\n")) for address, data in self.journal()],
                         [(address, 2) for address in ADDRESSES])
        # A kill now: the next start writes them, and nothing twice.
        self.restart(clock=task.Clock())
        self.assertEqual([self.seqs(address) for address in ADDRESSES],
                         [[1, 2, 3, 4, 5], [1, 2, 4, 5], [1, 2, 4, 5]])

    def test_a_kill_while_held_lines_are_written_keeps_what_came_meanwhile(self):
        steps = self.a_second_comes_while_held_lines_are_written()
        # 10.0.0.2's held lines reach its file (and the journal says so); its new ones are
        # only in the journal when the kill comes.
        while len(self.archived("10.0.0.2")) < 2:
            next(steps)
        self.restart(clock=task.Clock())
        self.assertEqual([self.seqs(address) for address in ADDRESSES],
                         [[1, 2, 3, 4, 5], [1, 2, 4, 5], [1, 2, 4, 5]])

    def test_a_kill_while_the_journal_is_written_anew_after_a_write_repeats_no_line(self):
        # The last files written end no step: their marks were gathered, not yet written.
        steps = self.a_second_comes_while_held_lines_are_written(write_cost=1)
        journal = self.archive.journal

        def killed_before_the_rename(fd, data):
            # The kept lines are in the new journal; the kill comes before it replaces the old.
            written = os.write(fd, data)
            if os.readlink(f"/proc/self/fd/{fd}").endswith(".new"):
                raise Killed()
            return written

        journal.write = killed_before_the_rename
        with self.assertRaises(Killed):
            for _ in steps:
                pass
        self.restart(clock=task.Clock())
        self.assertEqual([self.seqs(address) for address in ADDRESSES],
                         [[1, 2, 3, 4, 5], [1, 2, 4, 5], [1, 2, 4, 5]])

    def test_a_journal_the_start_cannot_write_stays_held_and_is_written_later(self):
        killed = self.start()
        self.send_all(1, 2)
        self.clock.advance(1.0)
        killed._loop.stop()
        failing = {"on": True}

        def full(fd, data):
            if failing["on"] and os.fstat(fd).st_ino != os.stat(self.journal_path()).st_ino:
                raise OSError(errno.ENOSPC, "No space left on device")
            return os.write(fd, data)

        again = self.restart(write=full)
        self.assertEqual(again.pending_lines, 6)
        self.assertEqual(len(self.journal()), 3)
        failing["on"] = False
        self.clock.pump([1.0] * int(archive_module.HOLD_SECONDS + 1))
        self.assertEqual([len(self.archived(address)) for address in ADDRESSES], [2, 2, 2])
        self.assertEqual(self.journal(), [])

    def test_a_stop_writes_the_held_lines_and_empties_the_journal(self):
        archive = self.start()
        self.send_all(1, 2)
        self.clock.advance(1.0)
        self.send_all(3)
        archive.stopService()
        self.assertEqual([len(self.archived(address)) for address in ADDRESSES], [3, 3, 3])
        self.assertEqual(self.journal(), [])

    def test_with_few_instances_no_journal_is_made(self):
        self.patch(archive_module, "DIRECT_INSTANCES", 256)
        archive = self.start()
        self.send_all(1)
        self.clock.advance(1.0)
        archive.stopService()
        self.assertEqual([len(self.archived(address)) for address in ADDRESSES], [1, 1, 1])
        self.assertFalse(os.path.lexists(self.journal_path()))

    def test_few_instances_again_have_their_files_written_each_second(self):
        self.start()
        self.send_all(1)
        self.clock.advance(1.0)
        self.send("10.0.0.1", extended(2))
        self.clock.advance(1.0)
        self.assertEqual([len(self.archived(address)) for address in ADDRESSES], [2, 1, 1])
        self.assertEqual(self.journal(), [])

    def test_a_journal_that_cannot_be_written_keeps_the_lines_for_their_files(self):
        journal_path = self.journal_path()

        def no_journal(fd, data):
            if os.path.exists(journal_path) and os.fstat(fd).st_ino == os.stat(journal_path).st_ino:
                raise OSError(errno.ENOSPC, "No space left on device")
            return os.write(fd, data)

        self.start(write=no_journal)
        self.send_all(1, 2)
        self.clock.advance(1.0)
        self.assertEqual(self.stats["archive_write_errors"], 1)
        self.assertIn("cannot write " + journal_path, self.logged(LogLevel.error)[0])
        self.clock.pump([1.0] * int(archive_module.HOLD_SECONDS + 1))
        self.assertEqual([len(self.archived(address)) for address in ADDRESSES], [2, 2, 2])
        self.assertEqual(self.stats["archive_lines_dropped"], 0)

    def test_a_second_the_journal_could_not_take_is_journaled_with_the_next(self):
        # A write of the journal fails once, the next works; then a long run of 10.0.0.1 goes
        # to its file in steps, marked by bytes, and the kill comes after its first step.
        self.patch(archive_module, "STEP_LINES", 10)
        self.patch(archive_module, "WRITE_COST", 0)
        failing = {"on": True}

        def journal_full_once(fd, data):
            if failing["on"] and os.readlink(f"/proc/self/fd/{fd}").endswith(NAME):
                failing["on"] = False
                raise OSError(errno.ENOSPC, "No space left on device")
            return os.write(fd, data)

        archive = self.start(write=journal_full_once)
        archive._loop.stop()
        self.send_all(1, 12)
        archive._take()
        self.assertEqual(self.stats["archive_write_errors"], 1)
        self.send_all(13, 13)
        archive._take()
        steps = archive._steps()
        while not self.archived("10.0.0.1"):
            next(steps)
        self.restart(clock=task.Clock())
        self.assertEqual([self.seqs(address) for address in ADDRESSES],
                         [list(range(1, 26))] * 3)


class KillAnywhereTests(ArchiveTestCase):
    """A kill at any point of held lines going to their files: each file holds its lines in
    order; none lost that was taken, none twice (but those of a file written just before the
    kill, whose mark was to follow)."""

    ADDRESSES = ["10.0.0.1", "fe80::1%eth0", "2001:db8::5"]

    def setUp(self):
        super().setUp()
        self.patch(archive_module, "DIRECT_INSTANCES", 2)
        self.patch(archive_module, "STEP_LINES", 4)
        self.patch(archive_module, "WRITE_COST", 1)

    def seqs(self, address: str) -> list[int]:
        path = os.path.join(self.directory, file_name(address) + ".log")
        if not os.path.exists(path):
            return []
        with open(path, "rb") as f:
            return [int(line.split(b" ", 1)[1].split(b",")[1]) for line in f]

    def run_killed(self, yields: int = -1, writes: int = -1, after: bool = False
                   ) -> tuple[dict, bool]:
        """Seconds held, written in steps, more coming meanwhile (some lines made by the
        server: non-ASCII text), killed after `yields` steps or at the `writes`th write
        (before it, or `after`); then a start. The lines each instance had when last
        taken, and whether a write to a file came just before the kill."""
        self.directory = os.path.abspath(self.mktemp())
        trace = []

        def write(fd, data):
            trace.append(os.readlink(f"/proc/self/fd/{fd}").endswith(".log"))
            if len(trace) == writes and not after:
                trace.pop()
                raise Killed()
            written = os.write(fd, data)
            if len(trace) == writes:
                raise Killed()
            return written

        archive = self.start(write=write)
        archive._loop.stop()
        sent = dict.fromkeys(self.ADDRESSES, 0)
        taken = {}

        def second(count, addresses=self.ADDRESSES):
            for address in addresses:
                for _ in range(count):
                    seq = sent[address] = sent[address] + 1
                    text = "caf\u00e9" if seq % 3 == 0 else "plain"
                    self.send(address, f"6,{seq},{seq * 1000},-;{text}\n".encode())
            self.clock.advance(0.3)
            archive._take()
            taken.update(sent)

        steps = 0

        def write_all(meanwhile):
            nonlocal steps
            for at, _ in enumerate(archive._steps()):
                steps += 1
                if steps == yields:
                    raise Killed()
                if at in meanwhile:
                    second(*meanwhile[at])

        try:
            second(6)
            second(3, self.ADDRESSES[:1])
            write_all({1: (2,), 3: (3, self.ADDRESSES[1:])})
            second(2)
            write_all({0: (1,)})
        except Killed:
            pass
        self.stats = dict.fromkeys(KNOWN_STATS, 0)
        registry = BufferRegistry(10, 100, 10**6, self.stats, keep_unwritten=True)
        again = Archive(self.directory, registry, task.Clock(), self.stats, 64 * 1024, 3,
                        10**9)
        again.startService()
        again.stopService()
        # The killed one leaves its descriptors, and no stop of its own.
        archive.running = False
        archive.files.close()
        archive.journal.close()
        return taken, bool(trace) and trace[-1]

    def test_a_kill_between_any_two_steps_loses_and_repeats_no_line(self):
        for yields in range(1, 24):
            taken, _ = self.run_killed(yields=yields)
            for address in self.ADDRESSES:
                seqs = self.seqs(address)
                self.assertEqual(seqs, list(range(1, len(seqs) + 1)), (yields, address))
                self.assertGreaterEqual(len(seqs), taken.get(address, 0), (yields, address))

    def test_a_kill_at_any_write_loses_no_line_taken(self):
        for writes, after in itertools.product(range(1, 40), (False, True)):
            taken, after_a_file = self.run_killed(writes=writes, after=after)
            for address in self.ADDRESSES:
                seqs = self.seqs(address)
                where = (writes, after, address, seqs)
                self.assertEqual(sorted(set(seqs)), list(range(1, len(set(seqs)) + 1)), where)
                self.assertGreaterEqual(len(set(seqs)), taken.get(address, 0), where)
                if not after_a_file:
                    self.assertEqual(len(seqs), len(set(seqs)), where)
