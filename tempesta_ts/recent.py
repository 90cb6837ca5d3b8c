"""The reports made lately, as the operators' pages list them (/reports, /reports/{id}.json).

`RecentReports` is one more report sink (tempesta_ts/pipeline.py hands it every report, after
report_redactions: it holds what leaves the site): a summary of each of the last MAX_REPORTS
reports, and the bodies of the newest within MAX_BODY_BYTES. Where each report stands
(pending, delivered...) is asked of the delivering sink when a page is made.
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer

#: Reports remembered for /reports.
MAX_REPORTS = 1000
#: Bytes of report bodies held for /reports/{id}.json, the newest first kept.
MAX_BODY_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ReportSummary:
    """What /reports shows of one report made."""

    report_id: str
    instance: str
    made_at: float
    #: The incidents' titles (kinds where a title is missing), in the report's order.
    titles: tuple[str, ...]
    kinds: tuple[str, ...]
    #: Bytes of the body as JSON (the spool's file, before any gzip).
    size: int
    #: Each incident's (received_at, seq, kernel_time_us) as the report gives them.
    incident_keys: tuple[tuple, ...] = ()


class RecentReports:
    """A report sink that remembers the reports handed to it, for the operators' pages."""

    def __init__(self, clock, max_reports: int = MAX_REPORTS,
                 max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.clock = clock
        self.max_reports = max_reports
        self.max_body_bytes = max_body_bytes
        self._summaries: collections.OrderedDict[str, ReportSummary] = collections.OrderedDict()
        self._bodies: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._body_bytes = 0

    def submit(self, report: dict[str, Any]) -> defer.Deferred:
        """Remember a report; never fails (the pages are no reason to lose one)."""
        try:
            self._remember(report)
        except Exception:  # a malformed report is the delivering sink's business
            pass
        return defer.succeed(None)

    def _remember(self, report: dict[str, Any]) -> None:
        report_id = str(report["report_id"])
        body = json.dumps(report, ensure_ascii=False).encode("utf-8")
        incidents = report.get("incidents") or ()
        summary = ReportSummary(
            report_id=report_id,
            instance=str((report.get("instance") or {}).get("address")),
            made_at=self.clock.seconds(),
            titles=tuple(str(i.get("title") or i.get("kind")) for i in incidents),
            kinds=tuple(str(i.get("kind")) for i in incidents),
            size=len(body),
            incident_keys=tuple(
                (i.get("received_at"), i.get("seq"), i.get("kernel_time_us")) for i in incidents
            ),
        )
        self._summaries.pop(report_id, None)
        self._summaries[report_id] = summary
        while len(self._summaries) > self.max_reports:
            old, _ = self._summaries.popitem(last=False)
            self._drop_body(old)
        self._drop_body(report_id)
        if len(body) <= self.max_body_bytes:
            self._bodies[report_id] = body
            self._body_bytes += len(body)
            while self._body_bytes > self.max_body_bytes:
                self._drop_body(next(iter(self._bodies)))

    def _drop_body(self, report_id: str) -> None:
        body = self._bodies.pop(report_id, None)
        if body is not None:
            self._body_bytes -= len(body)

    def summaries(self) -> list[ReportSummary]:
        """Every report remembered, the newest first."""
        return list(reversed(self._summaries.values()))

    def of_instance(self, address: str) -> list[ReportSummary]:
        """An instance's reports remembered, the newest first."""
        return [s for s in self.summaries() if s.instance == address]

    def body(self, report_id: str) -> bytes | None:
        """The body of a report as it was handed over (JSON), while it is held."""
        return self._bodies.get(report_id)
