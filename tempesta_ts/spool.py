"""The durable spool: reports as files under spool_dir, before and until their delivery.

Files only, no network. A report is on disk (written, fsynced, renamed into place) before it is
acknowledged, so a restart or an outage of the Support Server loses nothing; no symbolic link
planted in the directory is ever followed (tempesta_ts/files.py). A report the disk refuses (full,
failing) is held in memory within the same bound, sendable all the same, and written on a timer
as soon as the disk lets it. At start, what pending/ holds that is not a valid report is moved to
corrupt/, never sent.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import os
import stat
from dataclasses import dataclass
from typing import Callable

from tempesta_ts.errors import StartupError
from tempesta_ts.files import NotRegularFile, check_private_directory, open_regular, read_regular
from tempesta_ts.log import get_logger
from tempesta_ts.spool_files import (
    encode_report,
    file_name,
    invalid_report,
    parse_file_name,
    remove_quietly,
    write_durably,
)
from tempesta_ts.throttle import Throttle, held_back

#: One notice of dropped reports, or of failed writes while the disk refuses, at most this often.
NOTICE_INTERVAL = 60.0
#: How often reports held in memory are tried on the disk again.
HELD_RETRY_SECONDS = 5.0
#: Bytes written to tmp/ (and removed) to see whether the disk takes writes again, once the
#: reports held have all left memory: an empty file would fit on a full disk.
PROBE_BYTES = 4096
#: Reports held in memory written at one tick of the retry timer: each is fsynced, and the
#: reactor (the UDP hot path) must not wait for hundreds of them at once.
HELD_WRITES_PER_TICK = 64
#: Files moved to corrupt/ named one a line at each start; the rest in one more line.
CORRUPT_LINES = 10


class SpoolError(StartupError):
    """The spool directory cannot be used; the message says which and why, in one line."""


class SpoolInUse(Exception):
    """Another process holds the spool directory's lock; the argument is its pid."""


class ReportTooLarge(ValueError):
    """One report alone is larger than spool_max_bytes: it is refused."""


@dataclass(frozen=True)
class SpooledReport:
    """One report waiting: its file, size in bytes and when it was spooled. A report `held` in
    memory (the disk refused it) has no file yet: `path` is where it will be written."""

    report_id: str
    path: str
    size: int
    created: float
    held: bool = False


class Spool:
    """Reports on disk under spool_dir, durable across restarts, bounded by spool_max_bytes.

    ``pending/`` waits for delivery, ``rejected/`` holds what the server refused for good,
    ``local/`` what stand-alone mode writes, ``corrupt/`` what pending/ held that was no valid
    report, ``tmp/`` half-written files (cleared at load). Reports the disk refuses are held in
    memory, counted in the same bound, until a write every `retry_interval` succeeds.
    """

    log = get_logger(__name__)

    def __init__(self, directory: str, max_bytes: int, stats: collections.Counter, clock,
                 exclusive: bool = False, *, writer: Callable[[str, str, str, bytes], str] =
                 write_durably, retry_interval: float = HELD_RETRY_SECONDS,
                 keep_sent: Callable[[str], bool] | None = None) -> None:
        self.directory = directory
        #: Moves a delivered report's file to sent/ (tempesta_ts/sent.py); None: removed.
        self.keep_sent = keep_sent
        #: Lock the directory against other processes (the processes of reuse_port must not
        #: deliver each other's reports).
        self.exclusive = exclusive
        self._lock = None
        self.max_bytes = max_bytes
        self.stats = stats
        self.clock = clock
        #: Writes a file durably (write_durably); tests inject one that fails.
        self.writer = writer
        self.retry_interval = retry_interval
        self.pending_dir = os.path.join(directory, "pending")
        self.rejected_dir = os.path.join(directory, "rejected")
        self.local_dir = os.path.join(directory, "local")
        self.corrupt_dir = os.path.join(directory, "corrupt")
        self.tmp_dir = os.path.join(directory, "tmp")
        #: Called with (report_id, path) when a report held for local/ is written at last.
        self.on_written_local: Callable[[str, str], None] | None = None
        #: Since when writes fail (epoch seconds), None while the disk takes them.
        self.degraded_since: float | None = None
        self._entries: list[SpooledReport] = []
        self._by_id: dict[str, SpooledReport] = {}
        self._bytes = 0
        self._held: dict[str, bytes] = {}
        self._held_bytes = 0
        self._write_error: str | None = None
        self._noticed_at: float | None = None
        self._unnoticed = 0
        self._retry = None
        self._loaded = False
        self._drops = Throttle(NOTICE_INTERVAL)

    @classmethod
    def of(cls, config, stats, clock, keep_sent: Callable[[str], bool] | None = None) -> Spool:
        """The spool of a configuration: spool_dir, spool_max_bytes, locked under reuse_port."""
        return cls(config.spool_dir, config.spool_max_bytes, stats, clock,
                   exclusive=config.reuse_port, keep_sent=keep_sent)

    # Disk is touched only from load() on, so that directories are created after twistd has
    # dropped privileges, owned by the user that will write them.
    def load(self) -> None:
        """Create the directories and read pending/ (oldest first); idempotent. Raises OSError."""
        if self._loaded:
            return
        for path in (self.directory, self.pending_dir, self.rejected_dir, self.tmp_dir):
            os.makedirs(path, mode=0o700, exist_ok=True)
            check_private_directory(path, "spool_dir")
        if self.exclusive:
            self._take_lock()
        self._clear_tmp()
        found, corrupt = [], []
        for name in os.listdir(self.pending_dir):
            parsed = parse_file_name(name)
            path = os.path.join(self.pending_dir, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                self.stats["spool_errors"] += 1
                self.log.error(
                    "Ignoring {path} in the spool: a symbolic link or not a regular file; it is "
                    "never sent", path=path)
                continue
            if parsed is None:
                corrupt.append((name, "not a report file name"))
                continue
            created, report_id = parsed
            try:
                data = read_regular(path)
            except OSError as e:
                corrupt.append((name, f"unreadable: {e.strerror}"))
                continue
            why = invalid_report(data, report_id)
            if why is not None:
                corrupt.append((name, why))
                continue
            found.append(SpooledReport(report_id, path, len(data), created))
        self._set_aside(corrupt)
        found.sort(key=lambda e: (e.created, e.path))
        for entry in found:
            if entry.report_id in self._by_id:
                # The same report twice (never written so by us): the older copy is sent.
                continue
            self._add(entry)
        self._loaded = True
        # spool_max_bytes may have been lowered since the last run.
        self._enforce(keep=None)

    def _clear_tmp(self) -> None:
        removed = 0
        for name in os.listdir(self.tmp_dir):
            # Writes interrupted by a crash: never renamed into place, so never acknowledged.
            try:
                os.unlink(os.path.join(self.tmp_dir, name))
                removed += 1
            except OSError:
                pass
        if removed:
            self.log.info("Removed {count} half-written files left in {path} by an interrupted "
                          "run", count=removed, path=self.tmp_dir)

    def _set_aside(self, corrupt: list[tuple[str, str]]) -> None:
        """Move the files of pending/ that are no valid report to corrupt/: never sent, kept
        for a look."""
        if not corrupt:
            return
        self.stats["spool_corrupt_files"] += len(corrupt)
        try:
            os.makedirs(self.corrupt_dir, mode=0o700, exist_ok=True)
        except OSError as e:
            self.log.error("Cannot create {path} ({reason}): {count} files of pending/ that are "
                           "no valid report stay there, never sent", path=self.corrupt_dir,
                           reason=e.strerror, count=len(corrupt))
            return
        for number, (name, why) in enumerate(sorted(corrupt)):
            target = os.path.join(self.corrupt_dir, name)
            try:
                os.rename(os.path.join(self.pending_dir, name), target)
                moved = f"moved to {target}"
            except OSError as e:
                moved = f"left in place: cannot move it to {self.corrupt_dir} ({e.strerror})"
            if number < CORRUPT_LINES:
                self.log.error(
                    "Spool file {name} is not a valid report ({why}): {moved}; it is never sent",
                    name=name, why=why, moved=moved)
        if len(corrupt) > CORRUPT_LINES:
            self.log.error("{count} more files of pending/ are no valid report; moved to {path}",
                           count=len(corrupt) - CORRUPT_LINES, path=self.corrupt_dir)

    def open(self) -> list[SpooledReport]:
        """load() at start-up: the reports waiting, oldest first; SpoolError, in one line with
        the fix, when the directory cannot be used."""
        try:
            return self.pending()
        except SpoolInUse as e:
            raise SpoolError(
                f"spool_dir: {self.directory!r} is in use by another tempesta-ts process "
                f"(pid {e.args[0]}); expected a spool_dir of its own for each process of reuse_port"
            ) from None
        except OSError as e:
            raise SpoolError(
                f"spool_dir: cannot use {self.directory!r} ({e.strerror}); "
                "expected a directory the server's user can write"
            ) from None

    def write(self, report: dict) -> SpooledReport:
        """Spool a report durably, or hold it in memory when the disk refuses it (written later);
        then drop the oldest others past max_bytes.

        Raises OSError (pending/ unusable at load), ValueError (a bad report_id),
        ReportTooLarge.
        """
        self.load()
        body = encode_report(report)
        report_id = report["report_id"]
        if report_id in self._by_id:
            return self._by_id[report_id]
        self._refuse_if_too_large(report_id, len(body))
        created = self.clock.seconds()
        path, error = self._try_write(self.pending_dir, file_name(created, report_id), body)
        if error is not None:
            entry = self._hold(SpooledReport(report_id, path, len(body), created, True), body)
        else:
            entry = SpooledReport(report_id, path, len(body), created)
            self._add(entry)
            self.stats["reports_spooled"] += 1
        self._enforce(keep=entry)
        return entry

    def write_local(self, report: dict) -> SpooledReport:
        """Stand-alone: write the report durably as local/<created>-<report_id>.json, or hold it
        in memory (entry.held) until the disk lets it. Raises ValueError, ReportTooLarge (when
        it can be neither written nor held)."""
        body = encode_report(report)
        report_id = report["report_id"]
        if report_id in self._by_id:
            return self._by_id[report_id]
        created = self.clock.seconds()
        path, error = self._try_write(self.local_dir, file_name(created, report_id), body)
        if error is None:
            return SpooledReport(report_id, path, len(body), created)
        self._refuse_if_too_large(report_id, len(body))
        entry = self._hold(SpooledReport(report_id, path, len(body), created, True), body)
        self._enforce(keep=entry)
        return entry

    def _refuse_if_too_large(self, report_id: str, size: int) -> None:
        if size <= self.max_bytes:
            return
        self.stats["reports_dropped"] += 1
        self.log.error(
            "Report {report_id} refused: {size} bytes alone exceed spool_max_bytes={limit}; "
            "raise spool_max_bytes", report_id=report_id, size=size, limit=self.max_bytes)
        raise ReportTooLarge(
            f"report {report_id} is {size} bytes, more than spool_max_bytes={self.max_bytes}")

    def _try_write(self, directory: str, name: str, body: bytes) -> tuple[str, OSError | None]:
        """(the path, None) once written; (where it goes, the error) when the disk refused."""
        path = os.path.join(directory, name)
        try:
            if directory != self.pending_dir:
                for made in (self.directory, directory, self.tmp_dir):
                    os.makedirs(made, mode=0o700, exist_ok=True)
            path = self.writer(directory, self.tmp_dir, name, body)
        except OSError as e:
            self._write_failed(e, name, directory)
            return path, e
        if not self._held:
            self._recovered()
        return path, None

    # -- reports held in memory -------------------------------------------------------------

    def _hold(self, entry: SpooledReport, body: bytes) -> SpooledReport:
        self._held[entry.report_id] = body
        self._held_bytes += entry.size
        self._add(entry)
        self._arm_retry()
        return entry

    def _write_failed(self, error: OSError, name: str, directory: str) -> None:
        """Count a write the disk refused; one error line a burst, then one a NOTICE_INTERVAL."""
        self.stats["spool_write_errors"] += 1
        now = self.clock.seconds()
        self._write_error = error.strerror or str(error)
        if self.degraded_since is None:
            self.degraded_since = now
        if self._noticed_at is not None and now - self._noticed_at < NOTICE_INTERVAL:
            self._unnoticed += 1
            return
        since = (held_back(self._unnoticed, "more failed writes since the last notice")
                 if self._noticed_at is not None else "")
        self.log.error(
            "Cannot write {name} to {path}: {reason}; reports are held in memory (within "
            "spool_max_bytes) and written as soon as the disk lets them, tried every "
            "{interval:g} s{since}; free space in spool_dir",
            name=name, path=directory, reason=self._write_error, interval=self.retry_interval,
            since=since, unnoticed=self._unnoticed)
        self._noticed_at, self._unnoticed = now, 0

    def _recovered(self) -> None:
        if self._write_error is None:
            return
        self.log.info(
            "{path} takes writes again, {seconds:.0f} s after the first refused write; no report "
            "is held in memory any more", path=self.directory,
            seconds=self.clock.seconds() - self.degraded_since)
        self._write_error = self.degraded_since = self._noticed_at = None
        self._unnoticed = 0

    def _arm_retry(self, delay: float | None = None) -> None:
        if self._retry is None or not self._retry.active():
            delay = self.retry_interval if delay is None else delay
            self._retry = self.clock.callLater(delay, self._retry_writes)

    def _cancel_retry(self) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None

    def _retry_writes(self) -> None:
        # A timer body: never raises.
        self._retry = None
        written = 0
        try:
            written = self.write_held(limit=HELD_WRITES_PER_TICK)
        except Exception:
            self.stats["spool_errors"] += 1
            self.log.failure("Unexpected error writing the reports held in memory")
        if self._held and written == HELD_WRITES_PER_TICK:
            self._arm_retry(0)  # the disk takes them: the rest at the next turn of the reactor
        elif self._write_error is not None:
            self._arm_retry()

    def write_held(self, limit: int | None = None) -> int:
        """Write the reports held in memory, oldest first, until the disk refuses one (or
        `limit` are written); with none held, see whether the disk takes a write again. The
        number written."""
        written = 0
        held = [e for e in self._entries if e.held]
        for entry in held[:limit]:
            body = self._held[entry.report_id]
            directory, name = os.path.split(entry.path)
            path, error = self._try_write(directory, name, body)
            if error is not None:
                return written
            written += 1
            del self._held[entry.report_id]
            self._held_bytes -= entry.size
            if directory == self.pending_dir:
                self._replace(entry, SpooledReport(entry.report_id, path, entry.size,
                                                   entry.created))
                self.stats["reports_spooled"] += 1
            else:
                self.forget(entry)
                if self.on_written_local is not None:
                    self.on_written_local(entry.report_id, path)
            if not self._held:
                self._recovered()
        if not held and self._write_error is not None:
            self._probe()
        return written

    def _probe(self) -> None:
        try:
            path = self.writer(self.tmp_dir, self.tmp_dir, "probe", b"\0" * PROBE_BYTES)
        except OSError as e:
            self._write_failed(e, "a probe", self.tmp_dir)
            return
        remove_quietly(path)
        self._recovered()

    @property
    def held(self) -> int:
        """Reports held in memory: the disk refused them."""
        return len(self._held)

    @property
    def held_bytes(self) -> int:
        """Bytes of the reports held in memory (counted in `bytes` too)."""
        return self._held_bytes

    @property
    def degraded(self) -> str | None:
        """Why reports cannot be written (held in memory meanwhile), or None."""
        if self._write_error is None:
            return None
        if self._held:
            return f"{self._write_error}; {len(self._held)} reports held in memory"
        return self._write_error

    # -- the lock ---------------------------------------------------------------------------

    def _take_lock(self) -> None:
        path = os.path.join(self.directory, "lock")
        try:
            # Neither truncated on open nor followed: a link there must not cost its target.
            fd = open_regular(path, os.O_RDWR | os.O_CREAT)
        except NotRegularFile:
            raise SpoolError(
                f"spool_dir: {path!r} is a symbolic link or not a regular file; remove it "
                "(the server makes its own lock file)"
            ) from None
        lock = os.fdopen(fd, "r+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            lock.close()
            raise SpoolInUse(holder) from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        self._lock = lock

    def release(self) -> None:
        """At the stop: a last try at writing the reports held in memory (those the disk still
        refuses are lost, counted and logged), then let go of the directory's lock."""
        self._cancel_retry()
        if self._held:
            try:
                self.write_held()
            except Exception:
                self.stats["spool_errors"] += 1
                self.log.failure("Unexpected error writing the reports held in memory")
        if self._held:
            lost = [e for e in self._entries if e.held]
            self.stats["reports_lost"] += len(lost)
            self.log.error(
                "{count} reports held in memory are lost at the stop: {path} still refuses "
                "writes ({reason}): {report_ids}", count=len(lost), path=self.directory,
                reason=self._write_error, report_ids=[e.report_id for e in lost])
            for entry in lost:
                self.forget(entry)
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # -- pending reports --------------------------------------------------------------------

    def read(self, entry: SpooledReport) -> bytes:
        """A pending report's body, from memory while held. Raises OSError; NotRegularFile when
        its file has been replaced by a symbolic link or something else than a regular file."""
        current = self._by_id.get(entry.report_id, entry)
        if current.held:
            body = self._held.get(current.report_id)
            if body is None:
                raise FileNotFoundError(errno.ENOENT, "dropped from memory", current.path)
            return body
        return read_regular(current.path)

    def pending(self) -> list[SpooledReport]:
        """The reports waiting (held in memory too), oldest first."""
        self.load()
        return list(self._entries)

    def get(self, report_id: str) -> SpooledReport | None:
        """The pending entry of a report, if it is still pending."""
        return self._by_id.get(report_id)

    # An entry may have been written since it was handed out (held, then on disk): the
    # methods below go by its report_id, whatever entry they are given.

    def delivered(self, entry: SpooledReport) -> None:
        """Remove a delivered report, or move it to sent/ (its file may already be gone)."""
        current = self._by_id.get(entry.report_id, entry)
        if not current.held and (self.keep_sent is None or not self.keep_sent(current.path)):
            try:
                os.unlink(current.path)
            except FileNotFoundError:
                pass
        self.forget(current)

    def reject(self, entry: SpooledReport) -> str:
        """Move a report the server refused for good to rejected/; its new path."""
        current = self._by_id.get(entry.report_id, entry)
        name = os.path.basename(current.path)
        target = os.path.join(self.rejected_dir, name)
        try:
            if current.held:
                self.writer(self.rejected_dir, self.tmp_dir, name, self._held[current.report_id])
            else:
                os.rename(current.path, target)
        except FileNotFoundError:
            pass
        except (OSError, KeyError) as e:
            self.log.error("Cannot keep the rejected report {report_id} in {path}: {reason}",
                           report_id=current.report_id, path=self.rejected_dir,
                           reason=getattr(e, "strerror", None) or "dropped from memory")
        self.forget(current)
        return target

    def forget(self, entry: SpooledReport) -> None:
        """Stop tracking a report without touching the disk (its file is gone, or it was only
        in memory)."""
        current = self._by_id.pop(entry.report_id, None)
        if current is None:
            return
        self._entries.remove(current)
        self._bytes -= current.size
        if self._held.pop(current.report_id, None) is not None:
            self._held_bytes -= current.size

    @property
    def bytes(self) -> int:
        """Bytes of the reports pending, those held in memory included."""
        return self._bytes

    @property
    def count(self) -> int:
        """Number of reports pending, those held in memory included."""
        return len(self._entries)

    @property
    def oldest_created(self) -> float | None:
        """When the oldest pending report was spooled (epoch seconds), or None."""
        return self._entries[0].created if self._entries else None

    def _add(self, entry: SpooledReport) -> None:
        self._entries.append(entry)
        self._by_id[entry.report_id] = entry
        self._bytes += entry.size

    def _replace(self, old: SpooledReport, new: SpooledReport) -> None:
        self._entries[self._entries.index(old)] = new
        self._by_id[new.report_id] = new

    def _enforce(self, keep: SpooledReport | None) -> None:
        dropped = []
        for entry in list(self._entries):
            if self._bytes <= self.max_bytes:
                break
            if entry is keep:
                continue
            if not entry.held:
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    self.log.error("Cannot remove {path}: {error}", path=entry.path,
                                   error=e.strerror)
                    continue
            self.forget(entry)
            dropped.append(entry.report_id)
        if not dropped:
            return
        self.stats["reports_dropped"] += len(dropped)
        held = self._drops.hit("dropped", self.clock.seconds())
        if held is not None:
            self.log.error(
                "Spool over spool_max_bytes={limit}: dropped the oldest reports {report_ids}"
                "{more}; is the Support Server reachable?",
                more=held_back(held, "more dropped since the last notice"),
                limit=self.max_bytes,
                report_ids=dropped,
                held=held,
            )
