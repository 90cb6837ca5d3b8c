"""Where a finished report goes: the IReportSink interface, and the stand-alone sink that writes
each report under spool_dir/local/.

The assembly (tempesta_ts/service.py) chooses one sink: LocalReports without support_host, the
Reporter (tempesta_ts/reporter.py: the spool, then the Support Server) with it. Other sinks (an
archive, a database) take reports through the same interface.
"""

from __future__ import annotations

import collections

from twisted.application import service
from twisted.application.service import IService
from twisted.internet import defer
from zope.interface import implementer

from tempesta_ts.log import get_logger
from tempesta_ts.spool import ReportTooLarge, Spool

#: How many ended reports a sink remembers for the status page.
MAX_OUTCOMES = 4096


class IReportSink(IService):
    """Something a finished report is handed to, started and stopped with the server."""

    def submit(report):
        """Take a report (the body of docs/support-api.md, a dict); the Deferred fires once the
        report is kept (on disk, or in memory until the disk lets it be written), or fails when
        it cannot be (counted and logged already)."""

    def state_of(report_id):
        """One word for a report handed over: pending, delivered, rejected, written, or
        unknown (dropped, or ended too long ago to remember)."""


class Outcomes:
    """How recent reports ended (delivered, rejected, written), by report_id, the oldest
    forgotten past `limit`."""

    def __init__(self, limit: int = MAX_OUTCOMES) -> None:
        self.limit = limit
        self._ended: collections.OrderedDict[str, tuple[str, int | None]] = (
            collections.OrderedDict()
        )

    def ended(self, report_id: str, outcome: str, attempts: int | None = None) -> None:
        """Remember how a report ended, and after how many attempts to deliver it."""
        self._ended[report_id] = (outcome, attempts)
        while len(self._ended) > self.limit:
            self._ended.popitem(last=False)

    def get(self, report_id: str) -> str:
        """How a report ended, or unknown."""
        return self._ended.get(report_id, ("unknown", None))[0]

    def attempts(self, report_id: str) -> int | None:
        """The attempts it took to deliver (or have rejected) a report; None if not known."""
        return self._ended.get(report_id, ("unknown", None))[1]


def write_failed(log, stats, report_id, directory: str, error: Exception) -> None:
    """Count and log a report that could not be written (a bad report_id, a full disk...)."""
    stats["spool_errors"] += 1
    reason = getattr(error, "strerror", None) or str(error)
    log.error(
        "Cannot write report {report_id} to {path}: {reason}",
        report_id=report_id,
        path=directory,
        reason=reason,
    )


@implementer(IReportSink)
class LocalReports(service.Service):
    """Stand-alone: each report is written durably as spool_dir/local/<time>Z-<report_id>.json
    and sent nowhere."""

    log = get_logger(__name__)

    def __init__(self, spool: Spool, stats) -> None:
        self.spool = spool
        self.stats = stats
        self._outcomes = Outcomes()

    def startService(self) -> None:
        # The spool is opened all the same: its lock keeps the processes of reuse_port apart,
        # and what a run with a Support Server left is pointed out.
        waiting = self.spool.open()
        self.spool.on_written_local = self._written
        super().startService()
        if waiting:
            self.log.warn(
                "{count} reports wait in {path} from a run with a Support Server; "
                "set support_host to send them",
                count=len(waiting),
                path=self.spool.pending_dir,
            )

    def stopService(self) -> defer.Deferred:
        super().stopService()
        self.spool.release()
        return defer.succeed(None)

    def submit(self, report: dict) -> defer.Deferred:
        """Fire with the path of the file written, or to be written once the disk lets it
        (the report is held in memory meanwhile)."""
        report_id = report.get("report_id")
        try:
            entry = self.spool.write_local(report)
        except ReportTooLarge:
            return defer.fail()  # neither written nor held: the spool counted and logged it
        except (OSError, ValueError) as e:
            write_failed(self.log, self.stats, report_id, self.spool.directory, e)
            return defer.fail()
        if not entry.held:
            self._written(report_id, entry.path)
        return defer.succeed(entry.path)

    def _written(self, report_id: str, path: str) -> None:
        self.stats["reports_written_local"] += 1
        self._outcomes.ended(report_id, "written")
        self.log.info(
            "Report {report_id} written to {path} (stand-alone: no support_host)",
            report_id=report_id,
            path=path,
        )

    def state_of(self, report_id: str) -> str:
        """written, pending (held in memory until the disk lets it be written, or left in
        pending/ by a run with a Support Server) or unknown."""
        if self.spool.get(report_id) is not None:
            return "pending"
        return self._outcomes.get(report_id)
