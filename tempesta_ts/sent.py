"""What left the site: delivered reports kept in ``spool_dir/sent/`` for ``sent_keep_days``,
bounded by ``sent_max_bytes``, pruned on a timer, so that a plain ``ls`` (and the operators'
pages, through `SentReports.listing`) shows what was sent."""

from __future__ import annotations

import os
from typing import NamedTuple

from twisted.application import service
from twisted.internet import task

from tempesta_ts.files import check_private_directory
from tempesta_ts.log import get_logger
from tempesta_ts.spool_files import parse_file_name

DAY = 86400.0
#: How often sent/ is pruned.
PRUNE_SECONDS = 3600.0


class SentReport(NamedTuple):
    """One report kept in sent/: its id, when it was spooled, its size and path."""

    report_id: str
    created: float
    size: int
    path: str


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
            os.rename(path, os.path.join(self.directory, os.path.basename(path)))
        except FileNotFoundError:
            return True  # nothing left to remove either
        except Exception as e:
            self.log.warn("Cannot keep the delivered report {path} in {sent}: {reason}; removed",
                          path=path, sent=self.directory, reason=getattr(e, "strerror", None) or str(e))
            return False
        self.stats["reports_kept_sent"] += 1
        return True

    def listing(self) -> list[SentReport]:
        """The reports kept, the newest first."""
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
                size = os.lstat(path).st_size
            except OSError:
                continue
            kept.append(SentReport(parsed[1], parsed[0], size, path))
        kept.sort(key=lambda r: r.created, reverse=True)
        return kept

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
