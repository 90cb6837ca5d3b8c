"""The archive: every log line of every instance on disk, and the buffers rebuilt from it at start.

The path of a datagram only appends it, after its instance's tag, to one list for all
instances (`archive_queue`). Once a second (FLUSH_SECONDS) the archive takes that list, checks
it at the speed of C, and writes each instance's lines to its file, a few thousand lines a
reactor turn. With many instances sending at once, it holds the lines back from their files
instead (a write an instance a second costs more than the lines) and writes the second's list
to the journal in one go; every HOLD_SECONDS, or sooner when the held lines reach their bound,
it writes them all to their files. What waits is bounded: past the bounds, and when the disk
fails, lines are counted dropped; the archive never holds ingest back. docs/operations.md
describes the files.
"""

from __future__ import annotations

import os
import resource
import time
from typing import Iterator

from twisted.application import service
from twisted.internet import task
from twisted.python.failure import Failure

from tempesta_ts import archive_queue, archive_restore
from tempesta_ts.archive_files import RESERVED_FILES, ArchiveFiles, descriptor_budget
from tempesta_ts.archive_format import address_of, archive_directory, file_name, is_address
from tempesta_ts.archive_journal import CUT, Journal, block_record, mark
from tempesta_ts.buffers import BufferRegistry
from tempesta_ts.errors import StartupError
from tempesta_ts.log import get_logger
from tempesta_ts.throttle import Throttle

#: How far the archive may be behind the buffers.
FLUSH_SECONDS = 1.0
#: Work a step of a flush, in lines (a few ms); a write counts WRITE_COST (it may open, or
#: make, a file).
STEP_LINES = 4000
WRITE_COST = 100
#: A second's lines go to their files at once when they are of at most this many instances
#: (as far as the archive can tell without looking at each line: the instances held, the
#: lines, and the instances of the last write). Otherwise they are held back, in the
#: journal within the second, until HOLD_SECONDS pass or HOLD_MAX_BYTES are held.
DIRECT_INSTANCES = 256
HOLD_SECONDS = 10.0
HOLD_MAX_BYTES = 64 * 1024 * 1024
#: How long the archive's work may hold the reactor before it lets others run.
SLICE_SECONDS = 0.005
#: Lines taken from the instances and not written yet, all together; past it the oldest go
#: (the disk is slower than the traffic).
PENDING_MAX_LINES = 500_000
#: One notice of a recurring failure at most this often.
NOTICE_SECONDS = 60.0


def _records(blocks: list[list[bytes]], last: bytes | None = None) -> list[bytes]:
    """The journal's records of blocks taken (the last one given joined, if it is)."""
    records = []
    for at, items in enumerate(blocks):
        joined = last if last is not None and at == len(blocks) - 1 else b"".join(items)
        records += [block_record(joined), joined]
    return records


class _Slice:
    """A Cooperator's termination predicate: true once SLICE_SECONDS of a turn are spent."""

    def __init__(self) -> None:
        self.end = time.monotonic() + SLICE_SECONDS

    def __call__(self) -> bool:
        return time.monotonic() >= self.end


class Archive(service.Service):
    """Writes every instance's lines to its archive file; restores the buffers at start."""

    log = get_logger(__name__)

    def __init__(
        self,
        directory: str,
        registry: BufferRegistry,
        clock,
        stats: dict,
        max_bytes: int,
        keep: int,
        total_max_bytes: int,
        write=os.write,
        max_open: int = 1024,
    ) -> None:
        self.registry = registry
        self.clock = clock
        self.stats = stats
        self.files = ArchiveFiles(
            directory, max_bytes, keep, total_max_bytes, stats,
            max_names=max(10 * registry.max_instances, 10_000), write=write, max_open=max_open,
        )
        self.journal = Journal(directory, write=write)
        # The journal is beside the archive's bound: it takes at most an eighth of it.
        self._hold_max_bytes = min(HOLD_MAX_BYTES, total_max_bytes // 8)
        #: What the archive took from the registry and has not written to the files yet:
        #: queues (`archive_queue.block_of`), oldest first; their lines, and the bytes of
        #: those held back (in the journal).
        self._blocks: list[list[bytes]] = []
        self._lines = 0
        self._held_bytes = 0
        #: Lines of _blocks not held back: bounded by PENDING_MAX_LINES.
        self._waiting_lines = 0
        #: When the first line held back was taken; None while none is.
        self._held_since: float | None = None
        #: The lines taken are to go to their files now, not to be held.
        self._write_now = False
        #: The journal holds lines not in their files yet; the first _journaled of _blocks
        #: are in it (and, while a write to the files goes on, what that write takes).
        self._in_journal = False
        self._journaled = 0
        #: Instances of the last write to the files (None before the first).
        self._last_instances: int | None = None
        #: What the flush under way puts in the journal: blocks and marks, in order.
        self._journal_entries: list[bytes] = []
        #: Set by `flush` (at stop): nothing is held back, everything goes to the files.
        self._final_flush = False
        #: The journal the last run left was written to the files (`replay`).
        self._replayed = False
        #: The flush under way: a stop finishes it (a cut one would lose the rest).
        self._running: Iterator[None] | None = None
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = clock
        self._cooperator: task.Cooperator | None = None
        #: Work left in the step of the flush under way (`_spent`).
        self._budget = STEP_LINES
        self._flushing = None
        self._compressing = None
        self._problem: str | None = None
        self._dropped_since_problem = 0
        self._errors_in_flush = 0
        self._notices = Throttle(NOTICE_SECONDS)
        if not registry.keep_unwritten:
            raise ValueError("the archive needs a registry made with keep_unwritten=True")

    @classmethod
    def of(cls, config, registry: BufferRegistry, clock, stats: dict) -> Archive | None:
        """The archive of a configuration; None when archive_dir turns it off."""
        directory = archive_directory(config)
        if directory is None:
            return None
        # A descriptor for each instance held (and for those just evicted, written once more).
        max_open = descriptor_budget(config.max_instances + 16,
                                     RESERVED_FILES + config.tcp_max_connections)
        return cls(directory, registry, clock, stats, config.archive_max_bytes,
                   config.archive_keep, config.archive_total_max_bytes, max_open=max_open)

    @property
    def directory(self) -> str:
        """The archive's directory."""
        return self.files.directory

    @property
    def degraded(self) -> str | None:
        """Why the archive loses lines now, in a few words; None while it writes them all."""
        if self._problem is None:
            return None
        return f"archive: {self._problem}; {self._dropped_since_problem} lines dropped"

    @property
    def bytes(self) -> int:
        """Bytes the archive's files and its journal take on disk."""
        return self.files.total + self.journal.size

    @property
    def pending_lines(self) -> int:
        """Lines taken from the instances and not in their files yet (the held ones are in
        the journal)."""
        return self._lines + self.registry.unwritten_lines

    # Start and stop.

    def startService(self) -> None:
        """Index the directory and rebuild the buffers from it, before any datagram is read."""
        super().startService()
        try:
            self.files.prepare()
        except StartupError:
            raise
        except OSError as e:
            # The server runs without it: ingest matters more than its copy on disk.
            self._trouble(f"cannot use {self.directory} ({e.strerror})", "prepare")
        else:
            self.replay()
            self.restore()
        if self.files.max_open < self.registry.max_instances:
            self.log.warn(
                "Archive: {max_open} files held open at most (RLIMIT_NOFILE {limit}) for "
                "max_instances {instances}: with more instances sending, each write opens and "
                "closes a file; raise the limit (LimitNOFILE= under systemd, --ulimit nofile= "
                "with Docker)", max_open=self.files.max_open, instances=self.registry.max_instances,
                limit=resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        # The archive's work is cut into steps of SLICE_SECONDS at most, a reactor turn each.
        clock = self.clock
        self._cooperator = task.Cooperator(
            terminationPredicateFactory=_Slice, scheduler=lambda step: clock.callLater(0, step)
        )
        self._loop.start(FLUSH_SECONDS, now=False)

    def stopService(self):
        """Write every line still unwritten; what is being compressed is finished at the next
        start."""
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        if self._cooperator is not None:
            self._cooperator.stop()
        self._flushing = self._compressing = None
        try:
            self.flush()
        except Exception:
            self.stats["timer_errors"] += 1
            self.log.failure("Failed to write the archive at stop")
        self.files.close()
        self.journal.close()

    def flush(self) -> None:
        """Write every unwritten line now, in one go (at stop)."""
        running, self._running = self._running, None
        if running is not None:
            # A flush cut by the stop: the rest of it first, in order.
            for _ in running:
                pass
        self._take()
        if self.files.ready or self._retry_prepare():
            self._final_flush = True
            try:
                for _ in self._steps():
                    pass
            finally:
                self._final_flush = False

    # Writing.

    def _tick(self) -> None:
        try:
            self._take()
            since = self._held_since
            due = since is not None and self.clock.seconds() - since >= HOLD_SECONDS
            if (self._flushing is None and self._blocks and (self._write_now or due)
                    and (self.files.ready or self._retry_prepare())):
                self._errors_in_flush = 0
                self._running = self._steps()
                self._flushing = self._cooperator.cooperate(self._running).whenDone()
                self._flushing.addBoth(self._flushed)
        except Exception:
            self._failure("flush")

    def _take(self) -> None:
        """Take the registry's queue: held back (and in the journal), or to be written now."""
        items, stamps = self.registry.take_unwritten()
        if not items:
            return
        block, items, lines = archive_queue.block_of(items, stamps)
        room = max(0, PENDING_MAX_LINES - self._waiting_lines)
        if lines > room:
            items, dropped, _ = archive_queue.newest(items, room)
            block = b"".join(items)
            lines -= dropped
            self._dropped(dropped, "pending",
                          f"lines over the archive's bound of {PENDING_MAX_LINES} unwritten lines "
                          "dropped: the disk is slower than the traffic")
            if not lines:
                return
        many = min(lines, len(self.registry), self._last_instances or lines)
        hold = (
            not self._final_flush
            and many > DIRECT_INSTANCES
            and self._held_bytes + len(block) <= self._hold_max_bytes
            and self.journal.size + len(block) <= self._hold_max_bytes
        )
        self._blocks.append(items)
        self._lines += lines
        if hold:
            self._held_bytes += len(block)
            if self._held_since is None:
                self._held_since = self.clock.seconds()
        else:
            self._waiting_lines += lines
            self._write_now = True
        if hold or self._in_journal:
            # In the journal in order, what came before it too: a kill loses no held line,
            # and the marks of a long write count bytes of the same lines.
            self._in_journal = True
            self._journal_blocks(self._blocks, block)

    def _journal_blocks(self, blocks: list[list[bytes]], last: bytes | None = None) -> bool:
        """Write to the journal the blocks from the first not in it yet (the last one given
        joined, if it is); False when it failed (they go again with the next ones)."""
        self._journal_entries += _records(blocks[self._journaled :], last)
        if not self._journal_out():
            return False
        self._journaled = len(blocks)
        return True

    def _retry_prepare(self) -> bool:
        try:
            self.files.prepare()
        except (OSError, StartupError) as e:
            reason = e.strerror if isinstance(e, OSError) else str(e)
            self._trouble(f"cannot use {self.directory} ({reason})", "prepare")
            # What was taken cannot wait for ever: it is dropped, counted.
            self._dropped(self._lines)
            self._hand_over()
            self._lines = 0
            return False
        if not self._replayed:
            self.replay()
        return True

    def _flushed(self, result) -> None:
        self._flushing = None
        if not isinstance(result, Failure) or result.check(task.SchedulerStopped) is None:
            self._running = None
        if isinstance(result, Failure):
            self._step_failed(result, "flush")
        elif self._errors_in_flush == 0 and self._problem is not None:
            self.log.info("Archive: writing again to {directory} ({dropped} lines were dropped)",
                          directory=self.directory, dropped=self._dropped_since_problem)
            self._problem = None
            self._dropped_since_problem = 0

    def _steps(self) -> Iterator[None]:
        """Write every line taken when the flush began to its file, a step of about
        STEP_LINES at a time; then keep the archive within its bounds. (What comes meanwhile
        waits for the next flush.)"""
        journaled = self._in_journal
        # Marks by bytes count what is in memory: they hold for the journal only when it
        # has every block of the write (a block it could not take would shift them).
        whole = True
        if journaled and self._journaled < len(self._blocks):
            whole = self._journal_blocks(self._blocks)
        if journaled:
            self._journal_entries.append(CUT)
        blocks = self._hand_over()
        self._budget = STEP_LINES
        groups: dict[bytes, list[bytes]] = {}
        for items in blocks:
            position, prefix = 0, b""
            while position < len(items):
                lines = max(1, self._budget)
                position, prefix, left = archive_queue.demux(items, groups, position, prefix,
                                                             lines)
                if self._spent(lines - left):
                    yield
        del blocks
        self._last_instances = len(groups)
        for tag in list(groups):
            pieces = groups.pop(tag)
            address = address_of(archive_queue.name_of(tag))
            # Two pieces a line: a long one goes in steps, the journal told of each.
            for start in range(0, len(pieces), 2 * STEP_LINES):
                piece = pieces[start : start + 2 * STEP_LINES]
                data = b"".join(piece)
                count = len(piece) // 2
                self._lines -= count
                if not self._append(address, data, count):
                    self._dropped(count)
                last = start + 2 * STEP_LINES >= len(pieces)
                if journaled and (last or whole):
                    self._journal_entries.append(mark(address, None if last else len(data)))
                if self._spent(count + WRITE_COST):
                    yield
        self._end_journal()
        self.files.enforce()
        self._check_files()
        self._compress()

    def _hand_over(self) -> list[list[bytes]]:
        """The blocks taken, for a write to the files (or to be dropped); what is taken next
        starts anew."""
        blocks, self._blocks = self._blocks, []
        self._journaled = self._held_bytes = self._waiting_lines = 0
        self._held_since = None
        self._write_now = False
        return blocks

    def _spent(self, cost: int) -> bool:
        """Count work of the step under way; True when the step is over: the journal then
        gets what the step gathered, and the flush lets the reactor run."""
        self._budget -= cost
        if self._budget > 0:
            return False
        self._budget = STEP_LINES
        self._journal_out()
        return True

    def _journal_out(self) -> bool:
        """Write to the journal what the flush gathered so far (at each step: a kill in the
        middle of a flush finds the marks of what reached the files); False when it failed."""
        entries, self._journal_entries = self._journal_entries, []
        if not entries:
            return True
        try:
            self.journal.append(entries)
        except OSError as e:
            # What is held stays in memory and goes to the files all the same; the marks
            # and the cuts wait for the next write (a block's header starts "#", its lines a
            # separator).
            self._journal_entries = [entry for entry in entries if entry[:1] in (b"=", b"|")]
            self.stats["archive_write_errors"] += 1
            self._errors_in_flush += 1
            self._trouble(f"cannot write {self.journal.path} ({e.strerror})", "journal")
            return False
        return True

    def _end_journal(self) -> None:
        """The lines the journal held are in their files: it keeps just what came meanwhile,
        or is emptied."""
        if not self._replayed:
            # The journal of the last run stays until written to the files.
            self._journal_out()
            return
        kept = self._blocks if self._in_journal else []
        pieces = _records(kept)
        try:
            if pieces:
                # The marks of the last step first: the new journal may take long to write
                # (every second taken meanwhile), and a kill before it is renamed over would
                # find that step's lines unmarked, to be written again.
                self._journal_out()
                self.journal.replace(pieces)
            else:
                self.journal.clear()
        except OSError as e:
            # The journal as it is says the same, only longer.
            self.stats["archive_write_errors"] += 1
            what = "write" if pieces else "empty"
            self._trouble(f"cannot {what} {self.journal.path} ({e.strerror})", "journal")
            self._journal_out()
        else:
            self._journal_entries = []
            self._in_journal = bool(pieces)
            self._journaled = len(kept)

    def _append(self, address: str, data: bytes, count: int) -> bool:
        """Append to an instance's file, counted; False (the failure counted and said) when
        the disk refuses."""
        try:
            self.files.append(address, data, self.clock.seconds())
        except OSError as e:
            self.stats["archive_write_errors"] += 1
            self._errors_in_flush += 1
            where = self.files.path(file_name(address))
            self._trouble(f"cannot write {where} ({e.strerror})", "write")
            return False
        self.stats["archive_lines"] += count
        return True

    def _check_files(self) -> None:
        failures, self.files.failures = self.files.failures, []
        for path, error in failures:
            self.stats["archive_write_errors"] += 1
            self._errors_in_flush += 1
            self._trouble(f"cannot remove {path} ({error.strerror})", "remove")

    def _compress(self) -> None:
        if self._compressing is None and self._cooperator is not None and self.files.to_compress:
            self._compressing = self._cooperator.cooperate(self._compress_all()).whenDone()
            self._compressing.addBoth(self._compressed)

    def _compress_all(self) -> Iterator[None]:
        queue = self.files.to_compress
        while queue:
            files, generation = queue.popleft()
            try:
                yield from self.files.compress(files, generation)
            except OSError as e:
                self.stats["archive_write_errors"] += 1
                path = self.files.path(files.name, generation.stamp)
                self._trouble(f"cannot compress {path} ({e.strerror})", "compress")
            self._check_files()

    def _compressed(self, result) -> None:
        self._compressing = None
        if isinstance(result, Failure):
            self._step_failed(result, "compress")

    def _step_failed(self, failure: Failure, what: str) -> None:
        # A stop ends the work under way: the stop writes what is left, the next start
        # compresses what was not.
        if failure.check(task.SchedulerStopped) is None:
            self.stats["timer_errors"] += 1
            if self._notices.hit(("failure", what), self.clock.seconds()) is not None:
                self.log.failure("Archive: failed in {what}", failure, what=what)

    # Failures: counted, one line a burst, the reason kept for the status page.

    def _dropped(self, count: int, key=None, why: str | None = None) -> None:
        self.stats["archive_lines_dropped"] += count
        if self._problem is not None:
            self._dropped_since_problem += count
        if why is not None:
            held = self._notices.hit(key, self.clock.seconds())
            if held is not None:
                self.log.warn("Archive: {count} {why} ({held} more such notices held back)",
                              count=count, why=why, held=held)

    def _trouble(self, problem: str, key: str) -> None:
        if self._problem is None:
            self._dropped_since_problem = 0
        self._problem = problem
        held = self._notices.hit(("trouble", key), self.clock.seconds())
        if held is not None:
            self.log.error(
                "Archive: {problem}; archive lines are dropped until it works again, ingest goes "
                "on ({held} more failures since the last notice)", problem=problem, held=held)

    def _failure(self, what: str) -> None:
        self.stats["timer_errors"] += 1
        if self._notices.hit(("failure", what), self.clock.seconds()) is not None:
            self.log.failure("Archive: failed in {what}", what=what)

    # Restore.

    def replay(self) -> int:
        """Write to their files the lines the journal holds (held back when the process was
        killed); the lines written. What cannot be written is held, to be tried again."""
        self._replayed = True
        lines = instances = 0
        try:
            held = self.journal.read()
        except (OSError, ValueError) as e:
            self.stats["archive_read_errors"] += 1
            self._trouble(f"cannot read {self.journal.path} ({e})", "journal")
            return 0
        # The marks below are about all the journal holds.
        self._journal_entries.append(CUT)
        for address, data in held:
            count = data.count(b"\n")
            if data and is_address(address):
                if not self._append(address, data, count):
                    # Held, as if just taken, in the journal as they are.
                    self._blocks.append(archive_queue.lines_of(address, data))
                    self._lines += count
                    self._held_bytes += len(data)
                    self._held_since = self.clock.seconds()
                    self._in_journal = True
                    self._journaled = len(self._blocks)
                    continue
                instances += 1
                lines += count
            self._journal_entries.append(mark(address))
        if self._blocks:
            self._journal_out()
        else:
            self._end_journal()
        if lines:
            self.log.info("Archive: {lines} lines of {instances} instances written from the "
                          "journal to their files", lines=lines, instances=instances)
        return lines

    def restore(self) -> int:
        """Rebuild the buffers from the archive's ends (`archive_restore`); the lines
        restored."""
        now = self.clock.seconds()
        done = archive_restore.restore(self.registry, self.files, now)
        for name, reason in done.unreadable:
            self.stats["archive_read_errors"] += 1
            if self._notices.hit("read", now) is not None:
                self.log.warn("Archive: cannot read {name} back ({error}); its instance starts "
                              "empty", name=self.files.path(name), error=reason)
        if done.left:
            self.log.warn("Archive: {left} instances not restored, the restore took over "
                          "{limit} s; they start empty", left=done.left,
                          limit=archive_restore.RESTORE_SECONDS)
        self.stats["archive_lines_restored"] += done.lines
        if done.instances:
            self.log.info(
                "Restored {lines} lines of {instances} instances from the archive {directory} in "
                "{seconds:.1f} s", lines=done.lines, instances=done.instances,
                directory=self.directory, seconds=done.seconds)
        return done.lines
