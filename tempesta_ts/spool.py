"""The durable spool: reports as files under spool_dir, before and until their delivery.

Files only, no network. A report is on disk (written, fsynced, renamed into place) before it is
acknowledged, so a restart or an outage of the Support Server loses nothing; no symbolic link
planted in the directory is ever followed (tempesta_ts/files.py).
"""

from __future__ import annotations

import calendar
import collections
import fcntl
import json
import os
import re
import stat
import tempfile
import time
from dataclasses import dataclass
from typing import Mapping

from tempesta_ts.errors import StartupError
from tempesta_ts.files import NotRegularFile, check_private_directory, open_regular, read_regular
from tempesta_ts.log import get_logger
from tempesta_ts.throttle import Throttle

#: One notice of dropped reports at most this often.
NOTICE_INTERVAL = 60.0

# report_id becomes part of a file name and a header value: keep it to safe characters.
_REPORT_ID = re.compile(r"[A-Za-z0-9_-]{1,128}\Z")
_NAME = re.compile(r"(\d{8}T\d{6})\.(\d{6})Z-([A-Za-z0-9_-]{1,128})\.json\Z")


class SpoolError(StartupError):
    """The spool directory cannot be used; the message says which and why, in one line."""


class SpoolInUse(Exception):
    """Another process holds the spool directory's lock; the argument is its pid."""


class ReportTooLarge(ValueError):
    """One report alone is larger than spool_max_bytes: it is refused."""


@dataclass(frozen=True)
class SpooledReport:
    """One report waiting in pending/: its file, size in bytes and when it was spooled."""

    report_id: str
    path: str
    size: int
    created: float


def encode_report(report: Mapping) -> bytes:
    """The request body: the report as JSON, UTF-8; raises ValueError on a bad report_id."""
    report_id = report.get("report_id")
    if not isinstance(report_id, str) or not _REPORT_ID.match(report_id):
        raise ValueError(f"report_id {report_id!r} is not 1 to 128 of [A-Za-z0-9_-]")
    return json.dumps(report, ensure_ascii=False, allow_nan=False).encode("utf-8")


def file_name(created: float, report_id: str) -> str:
    """``20261123T100005.123456Z-<report_id>.json``: sorts by time, readable, no colons."""
    seconds, micros = divmod(int(round(created * 1_000_000)), 1_000_000)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(seconds))
    return f"{stamp}.{micros:06d}Z-{report_id}.json"


def parse_file_name(name: str) -> tuple[float, str] | None:
    """(created, report_id) from a spool file name, or None when it is not one."""
    match = _NAME.match(name)
    if match is None:
        return None
    stamp, micros, report_id = match.groups()
    try:
        seconds = calendar.timegm(time.strptime(stamp, "%Y%m%dT%H%M%S"))
    except ValueError:
        return None
    return seconds + int(micros) / 1_000_000, report_id


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(directory: str, tmp_dir: str, name: str, data: bytes) -> str:
    """Write data as directory/name atomically and durably: temp file, fsync, rename, fsync dir."""
    path = os.path.join(directory, name)
    # Reports quote kernel logs: readable by the server's user only (mkstemp: 0600). A name
    # nobody can guess, created exclusively: a link planted in tmp/ is never written through.
    fd, tmp_path = tempfile.mkstemp(prefix=name + ".", suffix=".tmp", dir=tmp_dir)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp_path)
        raise
    os.close(fd)
    os.rename(tmp_path, path)
    _fsync_directory(directory)
    return path


class Spool:
    """Reports on disk under spool_dir, durable across restarts, bounded by spool_max_bytes.

    ``pending/`` waits for delivery, ``rejected/`` holds what the server refused for good,
    ``local/`` what stand-alone mode writes, ``tmp/`` half-written files (cleared at load).
    """

    log = get_logger(__name__)

    def __init__(self, directory: str, max_bytes: int, stats: collections.Counter, clock,
                 exclusive: bool = False) -> None:
        self.directory = directory
        #: Lock the directory against other processes (the processes of reuse_port must not
        #: deliver each other's reports).
        self.exclusive = exclusive
        self._lock = None
        self.max_bytes = max_bytes
        self.stats = stats
        self.clock = clock
        self.pending_dir = os.path.join(directory, "pending")
        self.rejected_dir = os.path.join(directory, "rejected")
        self.local_dir = os.path.join(directory, "local")
        self.tmp_dir = os.path.join(directory, "tmp")
        self._entries: list[SpooledReport] = []
        self._by_id: dict[str, SpooledReport] = {}
        self._bytes = 0
        self._loaded = False
        self._drops = Throttle(NOTICE_INTERVAL)

    @classmethod
    def of(cls, config, stats, clock) -> Spool:
        """The spool of a configuration: spool_dir, spool_max_bytes, locked under reuse_port."""
        return cls(config.spool_dir, config.spool_max_bytes, stats, clock,
                   exclusive=config.reuse_port)

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
        for name in os.listdir(self.tmp_dir):
            # Writes interrupted by a crash: never renamed into place, so never acknowledged.
            try:
                os.unlink(os.path.join(self.tmp_dir, name))
            except OSError:
                pass
        found = []
        for name in os.listdir(self.pending_dir):
            parsed = parse_file_name(name)
            path = os.path.join(self.pending_dir, name)
            if parsed is None:
                self.log.warn("Ignoring {path} in the spool: not a report file name", path=path)
                continue
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
            size = st.st_size
            created, report_id = parsed
            found.append(SpooledReport(report_id, path, size, created))
        found.sort(key=lambda e: (e.created, e.path))
        for entry in found:
            if entry.report_id in self._by_id:
                # The same report twice (never written so by us): the older copy is sent.
                continue
            self._add(entry)
        self._loaded = True
        # spool_max_bytes may have been lowered since the last run.
        self._enforce(keep=None)

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
        """Spool a report durably, then drop the oldest others past max_bytes.

        Raises OSError, ValueError (a bad report_id), ReportTooLarge.
        """
        self.load()
        body = encode_report(report)
        report_id = report["report_id"]
        if report_id in self._by_id:
            return self._by_id[report_id]
        if len(body) > self.max_bytes:
            self.stats["reports_dropped"] += 1
            self.log.error(
                "Report {report_id} refused: {size} bytes alone exceed spool_max_bytes={limit}; "
                "raise spool_max_bytes",
                report_id=report_id,
                size=len(body),
                limit=self.max_bytes,
            )
            raise ReportTooLarge(
                f"report {report_id} is {len(body)} bytes, "
                f"more than spool_max_bytes={self.max_bytes}"
            )
        created = self.clock.seconds()
        path = write_durably(self.pending_dir, self.tmp_dir, file_name(created, report_id), body)
        entry = SpooledReport(report_id, path, len(body), created)
        self._add(entry)
        self.stats["reports_spooled"] += 1
        self._enforce(keep=entry)
        return entry

    def write_local(self, report: dict) -> str:
        """Stand-alone: write the report durably as local/<created>-<report_id>.json; its path."""
        body = encode_report(report)
        for path in (self.directory, self.local_dir, self.tmp_dir):
            os.makedirs(path, mode=0o700, exist_ok=True)
        name = file_name(self.clock.seconds(), report["report_id"])
        return write_durably(self.local_dir, self.tmp_dir, name, body)

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
        """Let go of the directory's lock, if held."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def read(self, entry: SpooledReport) -> bytes:
        """A pending report's body. Raises OSError; NotRegularFile when its file has been
        replaced by a symbolic link or something else than a regular file."""
        return read_regular(entry.path)

    def pending(self) -> list[SpooledReport]:
        """The reports waiting, oldest first."""
        self.load()
        return list(self._entries)

    def get(self, report_id: str) -> SpooledReport | None:
        """The pending entry of a report, if it is still pending."""
        return self._by_id.get(report_id)

    def delivered(self, entry: SpooledReport) -> None:
        """Remove a delivered report (its file may already be gone)."""
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            pass
        self.forget(entry)

    def reject(self, entry: SpooledReport) -> str:
        """Move a report the server refused for good to rejected/; its new path."""
        target = os.path.join(self.rejected_dir, os.path.basename(entry.path))
        try:
            os.rename(entry.path, target)
        except FileNotFoundError:
            pass
        self.forget(entry)
        return target

    def forget(self, entry: SpooledReport) -> None:
        """Stop tracking an entry without touching the disk (its file is gone)."""
        if self._by_id.get(entry.report_id) is entry:
            del self._by_id[entry.report_id]
            self._entries.remove(entry)
            self._bytes -= entry.size

    @property
    def bytes(self) -> int:
        """Bytes of the reports pending."""
        return self._bytes

    @property
    def count(self) -> int:
        """Number of reports pending."""
        return len(self._entries)

    @property
    def oldest_created(self) -> float | None:
        """When the oldest pending report was spooled (epoch seconds), or None."""
        return self._entries[0].created if self._entries else None

    def _add(self, entry: SpooledReport) -> None:
        self._entries.append(entry)
        self._by_id[entry.report_id] = entry
        self._bytes += entry.size

    def _enforce(self, keep: SpooledReport | None) -> None:
        dropped = []
        for entry in list(self._entries):
            if self._bytes <= self.max_bytes:
                break
            if entry is keep:
                continue
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass
            except OSError as e:
                self.log.error("Cannot remove {path}: {error}", path=entry.path, error=e.strerror)
                continue
            self.forget(entry)
            dropped.append(entry.report_id)
        if not dropped:
            return
        self.stats["reports_dropped"] += len(dropped)
        held = self._drops.hit("dropped", self.clock.seconds())
        if held is not None:
            self.log.error(
                "Spool over spool_max_bytes={limit}: dropped the oldest reports {report_ids} "
                "({held} more dropped since the last notice); is the Support Server reachable?",
                limit=self.max_bytes,
                report_ids=dropped,
                held=held,
            )
