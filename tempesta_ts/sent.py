"""What left the site: delivered reports kept in ``spool_dir/sent/`` for ``sent_keep_days``,
bounded by ``sent_max_bytes``, pruned on a timer, so that a plain ``ls`` (and the operators'
pages, through `SentReports.listing` and `SentReports.body`) shows what was sent."""

from __future__ import annotations

import os
import stat
from typing import NamedTuple

from twisted.application import service
from twisted.internet import task

from tempesta_ts.files import check_private_directory
from tempesta_ts.log import get_logger
from tempesta_ts.spool_files import parse_file_name, valid_report_id

DAY = 86400.0
#: How often sent/ is pruned.
PRUNE_SECONDS = 3600.0
#: Bytes of a kept report read back for a page; a larger file is not shown.
BODY_MAX_BYTES = 32 * 1024 * 1024


class SentReport(NamedTuple):
    """One report kept in sent/: its id, when it was spooled, its size and path, and when it
    was delivered (its file's modification time, set as it moved into sent/)."""

    report_id: str
    created: float
    size: int
    path: str
    delivered: float | None = None


class SentReports(service.Service):
    """Keeps delivered report files (moved from pending/, never copied) and prunes them by age
    and total size, the oldest first."""

    log = get_logger(__name__)

    def __init__(self, spool_dir: str, keep_days: float, max_bytes: int, clock, stats,
                 interval: float = PRUNE_SECONDS) -> None:
        self.directory = os.path.join(spool_dir, "sent")
        self.keep_seconds = keep_days * DAY
        self.max_bytes = max_bytes
        self.clock = clock
        self.stats = stats
        self._ready = False
        self._loop = task.LoopingCall(self.prune)
        self._loop.clock = clock

    @classmethod
    def of(cls, config, clock, stats) -> SentReports | None:
        """The sent/ of a configuration; None when sent_keep_days is 0 (delivered reports are
        removed)."""
        if not config.sent_keep_days:
            return None
        return cls(config.spool_dir, config.sent_keep_days, config.sent_max_bytes, clock, stats)

    def startService(self) -> None:
        super().startService()
        # After twistd dropped privileges; pruned now (a restart after days), then hourly.
        self._loop.start(PRUNE_SECONDS, now=True)

    def stopService(self):
        if self._loop.running:
            self._loop.stop()
        return super().stopService()

    def keep(self, path: str) -> bool:
        """Move a delivered report's file into sent/; False when it could not be (the caller
        removes it then)."""
        try:
            if not self._ready:
                os.makedirs(self.directory, mode=0o700, exist_ok=True)
                check_private_directory(self.directory, "spool_dir")
                self._ready = True
            target = os.path.join(self.directory, os.path.basename(path))
            os.rename(path, target)
        except FileNotFoundError:
            return True  # nothing left to remove either
        except Exception as e:
            self.log.warn("Cannot keep the delivered report {path} in {sent}: {reason}; removed",
                          path=path, sent=self.directory, reason=getattr(e, "strerror", None) or str(e))
            return False
        self.stats["reports_kept_sent"] += 1
        now = self.clock.seconds()
        try:
            # The file's time becomes the delivery's, for the pages (a rename keeps the old one).
            os.utime(target, (now, now), follow_symlinks=False)
        except OSError:
            pass  # it keeps its spooling time: shown as delivered a little early, no more
        return True

    def listing(self) -> list[SentReport]:
        """The reports kept (regular files named like a report), the newest first."""
        kept = []
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        for name in names:
            parsed = parse_file_name(name)
            if parsed is None:
                continue
            path = os.path.join(self.directory, name)
            try:
                found = os.lstat(path)
            except OSError:
                continue
            if not stat.S_ISREG(found.st_mode):
                continue  # not the server's: neither shown nor removed
            kept.append(SentReport(parsed[1], parsed[0], found.st_size, path, found.st_mtime))
        kept.sort(key=lambda r: r.created, reverse=True)
        return kept

    def body(self, report_id: str, max_bytes: int = BODY_MAX_BYTES) -> bytes | None:
        """A kept report's file as it was delivered, the latest of that id; None when the id is
        not 1 to 128 of [A-Za-z0-9_-], none is kept, it is a link or not a regular file, or it
        is larger than max_bytes."""
        if not valid_report_id(report_id):
            return None
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            directory = os.open(self.directory, flags | os.O_DIRECTORY)
        except OSError:
            return None
        try:
            # The id is only compared with the names listed, never made into a path; no link is
            # followed (sent/ itself included) and a FIFO does not block the open.
            named = []
            for name in os.listdir(directory):
                parsed = parse_file_name(name)
                if parsed is not None and parsed[1] == report_id:
                    named.append((parsed[0], name))
            if not named:
                return None
            fd = os.open(max(named)[1], flags | os.O_NONBLOCK, dir_fd=directory)
            try:
                found = os.fstat(fd)
                if not stat.S_ISREG(found.st_mode) or found.st_size > max_bytes:
                    return None
                chunks, left = [], max_bytes + 1
                while left > 0:
                    chunk = os.read(fd, min(left, 1 << 20))
                    if not chunk:
                        break
                    chunks.append(chunk)
                    left -= len(chunk)
            finally:
                os.close(fd)
        except OSError:
            return None
        finally:
            os.close(directory)
        data = b"".join(chunks)
        return data if len(data) <= max_bytes else None

    def prune(self) -> None:
        """Remove what is older than sent_keep_days, then the oldest past sent_max_bytes."""
        try:
            kept = self.listing()
            oldest = self.clock.seconds() - self.keep_seconds
            total = 0
            for report in kept:
                total += report.size
                if report.created < oldest or total > self.max_bytes:
                    try:
                        os.unlink(report.path)
                    except FileNotFoundError:
                        pass
                    self.stats["sent_reports_pruned"] += 1
        except Exception:
            self.log.failure("Could not prune {sent}", sent=self.directory)
