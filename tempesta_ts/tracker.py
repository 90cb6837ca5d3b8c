"""From incident lines to reports: settle windows and cooldown, per instance.

After an instance's first incident line the tracker waits for ``settle_seconds`` of quiet from
that instance (each new line restarts the wait, up to a maximum) so that the call trace and the
end marker are in the report; an end marker sends at once. Incidents within one window go into
one report. When the window closes its incidents are described (title, module, frames,
fingerprint: the trace is in by then); warnings and errors whose fingerprint the instance
reported within ``cooldown_seconds`` are only counted, into the next report's
``suppressed_incidents``, and a window of nothing else sends no report. Crash, oops and bug are
never suppressed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from twisted.internet.defer import Deferred, DeferredList

from tempesta_ts.buffers import Instance
from tempesta_ts.incidents import KINDS, Rules, is_end_marker, signature
from tempesta_ts.log import escape, get_logger
from tempesta_ts.netconsole import LogLine
from tempesta_ts.report import Incident, describe_incidents
from tempesta_ts.throttle import Throttle
from tempesta_ts.titles import plain

#: Kinds that are reported every time, whatever the cooldown.
NEVER_SUPPRESSED = frozenset({"crash", "oops", "bug"})
#: Lower is more severe: KINDS lists the kinds from the worst.
SEVERITY = {kind: rank for rank, kind in enumerate(KINDS)}
#: A window is closed at the latest this many settle periods after it opened (a chatty
#: instance must not hold its report back for ever), and never later than MAX_WINDOW_SECONDS.
MAX_WINDOW_FACTOR = 10
MAX_WINDOW_SECONDS = 300.0
#: Cooldown entries kept per instance (distinct fingerprints, and signatures of incidents seen
#: lately), the oldest forgotten first.
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

    __slots__ = ("instance", "incidents", "signatures", "opened", "timer", "folded", "kind")

    def __init__(self, instance: Instance, opened: float) -> None:
        self.instance = instance
        self.incidents: list[Incident] = []
        self.signatures: set[str] = set()
        self.opened = opened
        self.timer = None
        #: Repeats of an incident already in this window, counted not listed.
        self.folded = 0
        #: The most severe kind seen in the window (KINDS is in order of severity).
        self.kind: str | None = None


class IncidentTracker:
    """Watches every line appended to the buffers and turns incidents into reports."""

    log = get_logger(__name__)

    def __init__(
        self,
        rules: Rules,
        clock,
        settle_seconds: float,
        cooldown_seconds: float,
        make_report: Callable[[Instance, Sequence[Incident], int, LogLine], dict[str, Any]],
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
        #: address -> fingerprint -> when it was last reported.
        self._reported: dict[str, dict[str, float]] = {}
        #: address -> signature -> when a window with it closed: a repeat is announced quietly.
        self._recent: dict[str, dict[str, float]] = {}
        #: address -> incidents folded since that instance's last report.
        self._suppressed: Counter = Counter()
        self._pending: set[Deferred] = set()
        self._throttle = Throttle(60.0)
        #: Addresses with an open window: the registry shows these every line (`watched`).
        self.watched: set[str] = set()
        #: address -> the instance's latest incident, for the status page.
        self.last_incidents: dict[str, LastIncident] = {}

    def reconfigure(self, rules: Rules, settle_seconds: float, cooldown_seconds: float) -> None:
        """Reloaded rules and timings (SIGHUP); windows already open keep their timers."""
        self.rules = rules
        self.settle = settle_seconds
        self.cooldown = cooldown_seconds
        self.max_window = min(MAX_WINDOW_SECONDS, max(settle_seconds * MAX_WINDOW_FACTOR, settle_seconds))

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
        self._recent.pop(instance.address, None)
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

    def _incident(self, instance: Instance, window: _Window | None, line: LogLine, detection) -> _Window:
        now = self.clock.seconds()
        kind = detection.kind
        sig = signature(kind, line.text)
        self.stats[f"incidents_{kind}"] += 1
        incident = Incident(kind, line, detection.rule, sig)
        self.last_incidents[instance.address] = LastIncident(incident)
        if window is None:
            window = self._windows[instance.address] = _Window(instance, now)
            # Every line counts now (the trace, the end marker), not only incident lines.
            self.watched.add(instance.address)
            # Whether it repeats what was reported is known once the trace is in; a line seen
            # in a window lately is most likely a repeat, announced only at debug level.
            seen = self._recent.get(instance.address, {}).get(sig)
            announce = self.log.debug if seen is not None and now - seen < self.cooldown else self.log.info
            announce(
                "{kind} on {instance}: {line}; reporting after {settle} s of quiet",
                kind=kind,
                instance=instance.address,
                line=escape(line.text),
                settle=self.settle,
            )
        elif window.kind is not None and SEVERITY[kind] < SEVERITY[window.kind]:
            # A BUG that becomes an Oops, then a panic: the log says so when it happens.
            self.log.info(
                "{instance}: escalated from {was} to {kind}: {line}",
                instance=instance.address, was=window.kind, kind=kind, line=escape(line.text),
            )
        if window.kind is None or SEVERITY[kind] < SEVERITY[window.kind]:
            window.kind = kind
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
        instance = window.instance
        self.watched.discard(address)
        if window.timer is not None and window.timer.active():
            window.timer.cancel()
        now = self.clock.seconds()
        incidents = self._describe(window)
        kept, repeats = self._fold(address, incidents)
        recent = self._recent.setdefault(address, {})
        for incident in incidents:
            _touch(recent, incident.signature, now)
        if not kept:
            # Everything in the window was reported within the cooldown: counted, not sent.
            self._suppressed[address] += window.folded + repeats
            self._show(address, incidents, None)
            # Once per burst per instance at info level; the rest of the burst at debug level.
            held = self._throttle.hit(("folded", address), now)
            (self.log.info if held is not None else self.log.debug)(
                "{instance}: {titles} reported within cooldown_seconds={cooldown:g}; folded into "
                "the next report{more}",
                instance=address, titles="; ".join(i.description.title for i in incidents),
                cooldown=self.cooldown, more=f" ({held} more folded since the last notice)" if held else "",
            )
            return
        suppressed = self._suppressed.pop(address, 0) + window.folded + repeats
        # The window's first incident line names the report (its id), even when the cooldown
        # folded it: a collector that restarted since, and so did not fold it, names it alike.
        report = self.make_report(instance, kept, suppressed, window.incidents[0].line)
        self._show(address, incidents, report["report_id"], kept)
        reported = self._reported.setdefault(address, {})
        for incident in kept:
            _touch(reported, incident.description.fingerprint, now)
        folded = window.folded + repeats
        self.log.info(
            "Report {report_id} for {instance}: {kind}: {titles}{folded}; detected {ago:.1f} s "
            "earlier on: {line}",
            report_id=report["report_id"],
            instance=address,
            kind=window.kind or kept[0].kind,
            titles="; ".join(_shown(incident) for incident in kept),
            folded=f" ({folded} repeats folded)" if folded else "",
            ago=now - window.opened,
            line=escape(window.incidents[0].line.text) if window.incidents else "",
        )
        self.stats["reports_created"] += 1
        d = self.submit(report)
        self._pending.add(d)

        def done(result):
            self._pending.discard(d)
            return result

        def failed(failure):
            # The sink has said why in the log already: one line here, no traceback.
            self.stats["reports_lost"] += 1
            self.log.error(
                "Report {report_id} of {instance} is lost: {why}",
                report_id=report["report_id"],
                instance=address,
                why=failure.getErrorMessage(),
            )

        d.addBoth(done).addErrback(failed)

    def _describe(self, window: _Window) -> list[Incident]:
        try:
            return describe_incidents(window.incidents, list(window.instance.buffer))
        except Exception:
            # A title is not worth a lost report: the incident goes out named by its line.
            self.stats["tracker_errors"] += 1
            if self._throttle.hit("describe", self.clock.seconds()) is not None:
                self.log.failure("Failed to describe the incidents of {instance}",
                                 instance=window.instance.address)
            return [replace(i, description=plain(i.kind, i.line.text)) for i in window.incidents]

    def _fold(self, address: str, incidents: list[Incident]) -> tuple[list[Incident], int]:
        """The incidents to report, and how many are repeats folded by fingerprint: of one
        reported within the cooldown, or of one earlier in the window."""
        reported = self._reported.get(address, {})
        kept: list[Incident] = []
        fingerprints: set[str] = set()
        repeats = 0
        for incident in incidents:
            fingerprint = incident.description.fingerprint
            if incident.kind not in NEVER_SUPPRESSED:
                last = reported.get(fingerprint)
                if last is not None and incident.line.received_at - last < self.cooldown:
                    repeats += 1
                    self.stats["incidents_suppressed"] += 1
                    continue
                if fingerprint in fingerprints:
                    repeats += 1
                    continue
            fingerprints.add(fingerprint)
            kept.append(incident)
        return kept, repeats

    def _show(self, address: str, incidents: list[Incident], report_id: str | None,
              kept: Sequence[Incident] = ()) -> None:
        """The status page's latest incident, now with its title, and what became of it."""
        last = self.last_incidents.get(address)
        if last is None or last.report_id is not None:
            return
        # The latest incident is in the window, or folded into one of it with its signature.
        described = next((i for i in reversed(incidents) if i.signature == last.incident.signature), None)
        if described is None:
            return
        incident = replace(last.incident, description=described.description)
        if any(incident is described for incident in kept):
            self.last_incidents[address] = LastIncident(incident, report_id)
        else:
            self.last_incidents[address] = LastIncident(incident, suppressed=True)


def _touch(times: dict[str, float], key: str, now: float) -> None:
    # Most recent last, so that the oldest entries are the ones forgotten past the bound.
    times.pop(key, None)
    times[key] = now
    while len(times) > MAX_SIGNATURES:
        del times[next(iter(times))]


def _shown(incident: Incident) -> str:
    module = incident.description.module
    return f"{incident.description.title} ({module})" if module else incident.description.title
