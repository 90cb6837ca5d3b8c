"""From lines to reports: the buffer registry, the incident tracker and the report maker, wired
one way for the server (tempesta_ts/service.py), bench/hotpath.py and the tests.

`build_pipeline` gives each part what it needs when it is made: the registry its line
observers, eviction callbacks and line filter; the tracker its rules, timings, report maker and
report sinks. More observers (an archive of every line) and sinks (a database) are arguments.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred

from tempesta_ts import __version__
from tempesta_ts.archive_format import archive_directory
from tempesta_ts.buffers import BufferRegistry, Instance, LinesObserver, SystemInfo
from tempesta_ts.clock import wall_offset_of
from tempesta_ts.config import Config
from tempesta_ts.incidents import Rules
from tempesta_ts.log import escape, get_logger
from tempesta_ts.netconsole import LogLine
from tempesta_ts.redact import Redactor
from tempesta_ts.report import Incident, build_report
from tempesta_ts.throttle import Throttle, held_back
from tempesta_ts.tracker import IncidentTracker

#: The namespace of the lines logged here (every line at debug level, evictions, a document
#: that cannot be read back) since the service logged them: operators filter by it.
SERVER_NAMESPACE = "tempesta_ts.service.TroubleshootingService"
# A module-level Logger, not a class attribute: as a descriptor it would take the class's name.
_log = get_logger(SERVER_NAMESPACE)

#: Keeps a document read back from disk as the instance's system information (in memory if
#: there is room: `SystemInfoFactory.hold`).
Keep = Callable[[Instance, SystemInfo], None]


class ReportMaker:
    """Makes the report of an instance's incidents (tempesta_ts/report.py) with the instance's
    newest system information, read back from system_info_dir when one is set."""

    def __init__(self, clock, client_id: str | None, stats=None, *, store=None,
                 keep: Keep | None = None, hostname: str | None = None,
                 version: str = __version__, redactor: Redactor | None = None) -> None:
        self.clock = clock
        self.client_id = client_id
        self.stats = stats
        #: The SystemInfoStore of system_info_dir, or None; `keep` then holds what it gives.
        self.store = store
        self.keep = keep
        self.hostname = socket.gethostname() if hostname is None else hostname
        #: Times are on the clock's (monotonic) time line; reports show them as wall time.
        self.wall_offset = wall_offset_of(clock)
        self.version = version
        #: report_redactions and report_exclude_patterns: what the sinks get may leave the site.
        self.redactor = redactor

    def __call__(self, instance: Instance, incidents: Sequence[Incident], suppressed: int,
                 trigger: LogLine | None = None) -> dict:
        shown = instance.system_info
        if self.store is not None:
            shown = self.newest_system_info(instance)
        # A document kept only on disk lends its text to this report, not to memory.
        held, instance.system_info = instance.system_info, shown
        try:
            report = build_report(
                instance=instance,
                incidents=incidents,
                suppressed=suppressed,
                client_id=self.client_id,
                hostname=self.hostname,
                version=self.version,
                now=self.clock.seconds(),
                wall_offset=self.wall_offset(),
                trigger=trigger,
            )
        finally:
            instance.system_info = held
        return report if self.redactor is None else self.redactor(report)

    def newest_system_info(self, instance: Instance) -> SystemInfo | None:
        """The instance's newest document with its text, read from system_info_dir when memory
        holds an older one or only a note of it (system_info_memory_max_bytes)."""
        # Another process on the port (reuse_port), or this one before a restart, may have
        # taken a newer document from the instance.
        current = instance.system_info
        try:
            stored = self.store.load(instance.address)
        except (OSError, ValueError, KeyError, TypeError):
            self.stats["system_info_store_errors"] += 1
            _log.failure("Could not read the system information of {instance} in {path}",
                             instance=instance.address, path=self.store.directory)
            stored = None
        if stored is not None and (
            current is None or current.on_disk or stored.received_at > current.received_at
        ):
            self.keep(instance, stored)
            return stored
        # A note whose text could not be read back is no document.
        return None if current is not None and current.on_disk else current


class EvictionNotices:
    """Warns of instances dropped to stay within max_instances, once a minute at most."""

    def __init__(self, clock, limit: int) -> None:
        self.clock = clock
        self.limit = limit
        self._throttle = Throttle(60.0)

    def __call__(self, instance: Instance) -> None:
        held = self._throttle.hit("evict", self.clock.seconds())
        if held is not None:
            _log.warn(
                "Dropped instance {instance} (least recently active) to stay within "
                "max_instances={limit}{more}",
                more=held_back(held, "more dropped since the last notice"),
                instance=instance.address,
                limit=self.limit,
                held=held,
            )


def log_lines(instance: Instance, lines: Sequence[LogLine]) -> None:
    """A line observer for log_level debug: every line received, at debug level."""
    for line in lines:
        _log.debug(
            "{instance} {text}", instance=instance.address, text=escape(line.text), seq=line.seq
        )


def submit_to(sinks: Sequence[Any]) -> Callable[[dict], Deferred]:
    """Hand each report to every sink (each has ``submit(report)``, as `IReportSink`); the
    Deferred fires once all have it, and fails when one could not keep it."""
    if len(sinks) == 1:
        return sinks[0].submit

    def submit(report: dict) -> Deferred:
        every = gatherResults([maybeDeferred(sink.submit, report) for sink in sinks],
                              consumeErrors=True)
        # The first sink's own failure, not gatherResults' wrapper of it, for the log.
        return every.addErrback(lambda failure: failure.value.subFailure)

    return submit


@dataclass(frozen=True)
class Pipeline:
    """The registry the listeners feed, the tracker watching it, the maker of its reports."""

    registry: BufferRegistry
    tracker: IncidentTracker
    make_report: ReportMaker


def build_pipeline(
    config: Config,
    clock,
    stats,
    sinks: Sequence[Any],
    *,
    make_report: ReportMaker | None = None,
    line_observers: Sequence[LinesObserver] = (),
    every_line: Sequence[LinesObserver] = (),
    evicted: Sequence[Callable[[Instance], None]] = (),
) -> Pipeline:
    """Registry, tracker and report maker as `config` says, reports handed to `sinks`.

    `line_observers` see every line before the tracker does; with any, lines are not filtered
    for the tracker (the filter spares decoding lines no one else looks at). `evicted` are
    called with each instance dropped, before the tracker reports its open window.
    """
    if make_report is None:
        make_report = ReportMaker(clock, config.support_client_id, stats,
                                  redactor=Redactor.of(config))
    tracker = IncidentTracker(
        Rules(config.incident_patterns, config.ignore_patterns),
        clock,
        config.settle_seconds,
        config.cooldown_seconds,
        make_report,
        submit_to(sinks),
        stats,
    )
    registry = BufferRegistry(
        config.max_instances,
        config.buffer_max_lines,
        config.buffer_max_bytes,
        stats,
        observers=[*line_observers, tracker.lines_added],
        # The tracker needs only lines that can start an incident, or all of a watched one.
        line_filter=None if line_observers else tracker.rules.line_filter,
        evicted=[*evicted, tracker.forget],
        watched=tracker.watched,
        every_line=every_line,
        # The archive takes what each instance received, once a second.
        keep_unwritten=archive_directory(config) is not None,
    )
    return Pipeline(registry, tracker, make_report)


def reconfigure_pipeline(pipeline: Pipeline, config: Config) -> None:
    """Take reloaded rules, timings and redactions (SIGHUP): new windows use them, open ones
    keep their rules; log_level debug adds the observer logging every line, leaving it removes it."""
    tracker, registry = pipeline.tracker, pipeline.registry
    pipeline.make_report.redactor = Redactor.of(config)
    tracker.reconfigure(Rules(config.incident_patterns, config.ignore_patterns),
                        config.settle_seconds, config.cooldown_seconds)
    if config.log_level == "debug" and log_lines not in registry.observers:
        registry.observers.insert(0, log_lines)
    elif config.log_level != "debug" and log_lines in registry.observers:
        registry.observers.remove(log_lines)
    # The filter spares decoding only while the tracker is the one observer.
    alone = registry.observers == [tracker.lines_added]
    registry.line_filter = tracker.rules.line_filter if alone else None
