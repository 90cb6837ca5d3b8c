"""From incident lines to reports: settle windows and cooldown, per instance.

After an instance's first incident line the tracker waits for ``settle_seconds`` of quiet from
that instance (each new line restarts the wait, up to a maximum) so that the call trace and the
end marker are in the report; an end marker sends at once. Incidents within one window go into
one report. Same-signature warnings and errors of an instance within ``cooldown_seconds`` of a
report are only counted, into the next report's ``suppressed_incidents``; crash, oops and bug
are never suppressed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from twisted.internet.defer import Deferred, DeferredList

from tempesta_ts.buffers import Instance
from tempesta_ts.incidents import Rules, is_end_marker, signature
from tempesta_ts.log import escape, get_logger
from tempesta_ts.netconsole import LogLine
from tempesta_ts.report import Incident
from tempesta_ts.throttle import Throttle

#: Kinds that are reported every time, whatever the cooldown.
NEVER_SUPPRESSED = frozenset({"crash", "oops", "bug"})
#: A window is closed at the latest this many settle periods after it opened (a chatty
#: instance must not hold its report back for ever), and never later than MAX_WINDOW_SECONDS.
MAX_WINDOW_FACTOR = 10
MAX_WINDOW_SECONDS = 300.0
#: Cooldown entries kept per instance (distinct signatures), the oldest forgotten first.
MAX_SIGNATURES = 256


@dataclass(frozen=True, slots=True)
class LastIncident:
    """An instance's latest incident and the report it went into (None while settling, or
    when it was folded into a later report by the cooldown)."""

    incident: Incident
    report_id: str | None = None
    suppressed: bool = False


class _Window:
    """An instance's open report: its incidents so far and the timer that closes it."""

    __slots__ = ("instance", "incidents", "signatures", "opened", "timer", "folded")

    def __init__(self, instance: Instance, opened: float) -> None:
        self.instance = instance
        self.incidents: list[Incident] = []
        self.signatures: set[str] = set()
        self.opened = opened
        self.timer = None
        #: Repeats of an incident already in this window, counted not listed.
        self.folded = 0


class IncidentTracker:
    """Watches every line appended to the buffers and turns incidents into reports."""

    log = get_logger(__name__)

    def __init__(
        self,
        rules: Rules,
        clock,
        settle_seconds: float,
        cooldown_seconds: float,
        make_report: Callable[[Instance, Sequence[Incident], int], dict[str, Any]],
        submit: Callable[[dict[str, Any]], Deferred],
        stats: Counter,
    ) -> None:
        self.rules = rules
        self.clock = clock
        self.settle = settle_seconds
        self.cooldown = cooldown_seconds
        self.max_window = min(MAX_WINDOW_SECONDS, max(settle_seconds * MAX_WINDOW_FACTOR, settle_seconds))
        self.make_report = make_report
        self.submit = submit
        self.stats = stats
        self._windows: dict[str, _Window] = {}
        #: address -> signature -> when it was last reported.
        self._reported: dict[str, dict[str, float]] = {}
        #: address -> incidents folded since that instance's last report.
        self._suppressed: Counter = Counter()
        self._pending: set[Deferred] = set()
        self._throttle = Throttle(60.0)
        #: address -> the instance's latest incident, for the status page.
        self.last_incidents: dict[str, LastIncident] = {}

    @property
    def open_windows(self) -> int:
        """Reports waiting for their settle time."""
        return len(self._windows)

    def lines_added(self, instance: Instance, lines: Sequence[LogLine]) -> None:
        """The registry's observer: look at every new line of an instance."""
        try:
            self._look(instance, lines)
        except Exception:
            self.stats["tracker_errors"] += 1
            if self._throttle.hit("look", self.clock.seconds()) is not None:
                self.log.failure("Failed to look for incidents in lines from {instance}", instance=instance.address)

    def forget(self, instance: Instance) -> None:
        """An evicted instance: its open window is reported now, its cooldowns forgotten."""
        if instance.address in self._windows:
            self._close(instance.address)
        self._reported.pop(instance.address, None)
        self._suppressed.pop(instance.address, None)
        self.last_incidents.pop(instance.address, None)

    def close_all(self) -> Deferred:
        """Report every open window now (at shutdown); fires once all reports are on disk."""
        for address in list(self._windows):
            self._settled(address)
        return DeferredList(list(self._pending), consumeErrors=True)

    def _look(self, instance: Instance, lines: Sequence[LogLine]) -> None:
        address = instance.address
        window = self._windows.get(address)
        end = False
        for line in lines:
            detection = self.rules.detect(line.text)
            if detection is not None:
                window = self._incident(instance, window, line, detection)
            if window is not None and is_end_marker(line.text):
                end = True
        if window is None:
            return
        if end:
            self._close(address)
        else:
            self._rearm(window)

    def _incident(self, instance: Instance, window: _Window | None, line: LogLine, detection) -> _Window | None:
        now = self.clock.seconds()
        kind = detection.kind
        sig = signature(kind, line.text)
        self.stats[f"incidents_{kind}"] += 1
        incident = Incident(kind, line, detection.rule, sig)
        if kind not in NEVER_SUPPRESSED:
            last = self._reported.get(instance.address, {}).get(sig)
            if last is not None and now - last < self.cooldown:
                self._suppressed[instance.address] += 1
                self.stats["incidents_suppressed"] += 1
                self.last_incidents[instance.address] = LastIncident(incident, suppressed=True)
                return window
        self.last_incidents[instance.address] = LastIncident(incident)
        if window is None:
            window = self._windows[instance.address] = _Window(instance, now)
            # Every line counts now (the trace, the end marker), not only incident lines.
            instance.watched = True
            self.log.info(
                "{kind} on {instance}: {line}; reporting after {settle} s of quiet",
                kind=kind,
                instance=instance.address,
                line=escape(line.text),
                settle=self.settle,
            )
        if sig in window.signatures and kind not in NEVER_SUPPRESSED:
            window.folded += 1
        else:
            window.signatures.add(sig)
            window.incidents.append(incident)
        return window

    def _rearm(self, window: _Window) -> None:
        now = self.clock.seconds()
        due = min(now + self.settle, window.opened + self.max_window)
        if window.timer is not None and window.timer.active():
            window.timer.reset(max(0.0, due - now))
        else:
            window.timer = self.clock.callLater(max(0.0, due - now), self._settled, window.instance.address)

    def _settled(self, address: str) -> None:
        try:
            self._close(address)
        except Exception:
            self.stats["tracker_errors"] += 1
            self.log.failure("Failed to report the incident of {instance}", instance=address)

    def _close(self, address: str) -> None:
        window = self._windows.pop(address)
        window.instance.watched = False
        if window.timer is not None and window.timer.active():
            window.timer.cancel()
        now = self.clock.seconds()
        suppressed = self._suppressed.pop(address, 0) + window.folded
        report = self.make_report(window.instance, window.incidents, suppressed)
        last = self.last_incidents.get(address)
        if last is not None and not last.suppressed and last.report_id is None:
            self.last_incidents[address] = replace(last, report_id=report["report_id"])
        reported = self._reported.setdefault(address, {})
        for incident in window.incidents:
            reported.pop(incident.signature, None)
            reported[incident.signature] = now
        while len(reported) > MAX_SIGNATURES:
            del reported[next(iter(reported))]
        self.stats["reports_created"] += 1
        d = self.submit(report)
        self._pending.add(d)

        def done(result):
            self._pending.discard(d)
            return result

        def failed(failure):
            self.stats["reports_lost"] += 1
            self.log.failure(
                "Could not write the report {report_id} of {instance}",
                failure,
                report_id=report["report_id"],
                instance=address,
            )

        d.addBoth(done).addErrback(failed)
