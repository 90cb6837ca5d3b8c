"""What the operators' pages show beyond the snapshot: one instance's latest lines, incidents
marked, its system information and reports; the reports made lately and where each stands;
the reports delivered and kept in spool_dir/sent/.

`DetailSource` reads the registry, the tracker, the report sinks and `RecentReports` when a
page asks, as `StatusSource` (tempesta_ts/status.py) does for the snapshot; the pages get only
its three functions, never the parts. Nothing here changes the parts.
"""

from __future__ import annotations

import collections
import heapq
from dataclasses import dataclass

from tempesta_ts.recent import RecentReports, ReportSummary
from tempesta_ts.report import iso
from tempesta_ts.sent import SentReport, SentReports
from tempesta_ts.status import InstanceStatus

#: Lines of an instance shown on its page, the latest.
PAGE_LINES = 1000
#: Reports kept in spool_dir/sent/ listed on /reports, the most recently delivered.
SENT_ROWS = 100


@dataclass(frozen=True, slots=True)
class ShownLine:
    """One log line as an instance's page shows it."""

    received_at: float
    level: int | None
    text: str
    #: The incident it starts: its title once reported, else its kind; None for other lines.
    incident: str | None = None


@dataclass(frozen=True, slots=True)
class ReportRow:
    """One report on /reports or an instance's page."""

    #: None while the incident settles (no report yet).
    report_id: str | None
    instance: str
    made_at: float
    titles: tuple[str, ...]
    #: settling, pending, delivered, rejected, written (locally), or unknown.
    state: str
    size: int | None = None
    attempts: int | None = None
    last_error: str | None = None
    #: /reports/{id}.json can show its body.
    body_held: bool = False


@dataclass(frozen=True, slots=True)
class SentRows:
    """The reports kept in spool_dir/sent/ as /reports lists them: the most recently delivered
    first, at most SENT_ROWS; how many and how many bytes are kept in all."""

    reports: tuple[SentReport, ...]
    total: int
    bytes: int


@dataclass(frozen=True, slots=True)
class SystemInfoText:
    """An instance's latest document with its text (None when only system_info_dir has it)."""

    received_at: float
    size: int
    format: str
    text: str | None


@dataclass(frozen=True, slots=True)
class InstanceDetail:
    """What /instances/{address} shows."""

    now: float
    status: InstanceStatus
    lines: tuple[ShownLine, ...]
    system_info: SystemInfoText | None
    reports: tuple[ReportRow, ...]


class DetailSource:
    """Reads an instance's lines and the recent reports for the operators' pages."""

    def __init__(self, clock, *, registry, tracker, sink, recent: RecentReports, status,
                 reporter=None, sent: SentReports | None = None, page_lines: int = PAGE_LINES,
                 sent_rows: int = SENT_ROWS) -> None:
        self.clock = clock
        self.registry = registry
        self.tracker = tracker
        self.sink = sink
        self.recent = recent
        #: The StatusSource: an instance's status as /status shows it.
        self.status = status
        #: The Reporter with a Support Server (attempts, last failure); None stand-alone.
        self.reporter = reporter
        self.page_lines = page_lines
        #: spool_dir/sent/ (None stand-alone or with sent_keep_days 0).
        self.kept = sent
        self.sent_rows = sent_rows

    def instance(self, address: str) -> InstanceDetail | None:
        """An instance's page, or None when no instance has that address."""
        instance = self.registry.get(address)
        if instance is None:
            return None
        status = self.status.instance_status(instance)
        kept = self._kept_ids(self._listing())
        reports = [self._row(s, kept) for s in self.recent.of_instance(address)]
        settling = self._settling(address)
        if settling is not None:
            reports.insert(0, settling)
        info = instance.system_info
        document = None if info is None else SystemInfoText(
            info.received_at, info.size, info.format, None if info.on_disk else info.text
        )
        return InstanceDetail(
            now=self.clock.seconds(),
            status=status,
            lines=self._lines(instance, address),
            system_info=document,
            reports=tuple(reports),
        )

    def reports(self) -> tuple[tuple[ReportRow, ...], SentRows | None]:
        """Incidents settling, then every report remembered, the newest first; and the
        reports kept in spool_dir/sent/ (`sent`), from one reading of it."""
        listing = self._listing()
        settling = [self._settling(address) for address in list(self.tracker.last_incidents)]
        kept = self._kept_ids(listing)
        rows = tuple([r for r in settling if r is not None]
                     + [self._row(s, kept) for s in self.recent.summaries()])
        return rows, self._sent_rows(listing)

    def report_json(self, report_id: str) -> bytes | None:
        """A report's body as it was handed over (what leaves the site), while it is held in
        memory, else as it was delivered, while spool_dir/sent/ keeps it."""
        body = self.recent.body(report_id)
        if body is None and self.kept is not None:
            body = self.kept.body(report_id)
        return body

    def sent(self) -> SentRows | None:
        """The reports delivered and kept in spool_dir/sent/; None when none are kept."""
        return self._sent_rows(self._listing())

    def _listing(self) -> list[SentReport] | None:
        # Read once per page: spool_dir/sent/ may hold thousands.
        return None if self.kept is None else self.kept.listing()

    def _sent_rows(self, listing: list[SentReport] | None) -> SentRows | None:
        if listing is None:
            return None
        newest = heapq.nlargest(self.sent_rows, listing,
                                key=lambda r: (r.delivered or r.created, r.created))
        return SentRows(tuple(newest), len(listing), sum(r.size for r in listing))

    @staticmethod
    def _kept_ids(listing: list[SentReport] | None) -> frozenset[str]:
        # A row's body is shown from sent/ when memory no longer holds it.
        return frozenset() if listing is None else frozenset(r.report_id for r in listing)

    def _row(self, summary: ReportSummary, kept: frozenset[str]) -> ReportRow:
        state = self.sink.state_of(summary.report_id)
        attempts = error = None
        if self.reporter is not None:
            attempts, error = self.reporter.attempts_of(summary.report_id)
        return ReportRow(
            report_id=summary.report_id, instance=summary.instance, made_at=summary.made_at,
            titles=summary.titles, state=state, size=summary.size, attempts=attempts,
            last_error=error,
            body_held=summary.report_id in kept or self.recent.body(summary.report_id) is not None,
        )

    def _settling(self, address: str) -> ReportRow | None:
        last = self.tracker.last_incidents.get(address)
        if last is None or last.report_id is not None or last.suppressed:
            return None
        incident = last.incident
        return ReportRow(None, address, incident.line.received_at, (incident.kind,), "settling")

    def _lines(self, instance, address: str) -> tuple[ShownLine, ...]:
        latest = collections.deque(instance.buffer, maxlen=self.page_lines)
        titles: dict[tuple, str] = {}
        for summary in reversed(self.recent.of_instance(address)):
            titles.update(zip(summary.incident_keys, summary.titles))
        last = self.tracker.last_incidents.get(address)
        last_line = last.incident.line if last is not None else None
        detect = self.tracker.rules.detect
        shown = []
        for line in latest:
            mark = None
            found = detect(line.text)
            if found is not None:
                key = (iso(line.received_at), line.seq, line.kernel_time_us)
                mark = titles.get(key)
                if mark is None and last_line is not None and _same(line, last_line):
                    description = last.incident.description
                    mark = description.title if description is not None else None
                mark = mark or found.kind
            shown.append(ShownLine(line.received_at, line.level, line.text, mark))
        return tuple(shown)


def _same(a, b) -> bool:
    return (a.received_at, a.text, a.seq, a.kernel_time_us) == (
        b.received_at, b.text, b.seq, b.kernel_time_us)
