"""Prometheus metrics, read from the server's counters and state at scrape time.

Nothing here runs on the datagram path: the listeners count into the shared ``stats`` dict,
and `ServerCollector` turns a snapshot of the server (tempesta_ts/status.py: the counters,
the instances, the spool and delivery) into metric families when /metrics is asked for.
docs/operations.md lists every metric.
"""

from __future__ import annotations

import bisect
import os
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from tempesta_ts.incidents import KINDS

if TYPE_CHECKING:
    from tempesta_ts.status import Snapshot

PREFIX = "tempesta_ts_"

#: Delivery times from spooled to accepted: a healthy server answers well under a second, an
#: outage holds reports back for minutes to an hour (the longest retry wait is 300 s).
DELIVERY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                    1800.0, 3600.0)

#: stats key, metric name (without ``_total``), help. Each is exposed as a counter.
COUNTERS = (
    ("datagrams", "datagrams_received",
     "UDP datagrams received, before the allowed_sources check."),
    ("bytes", "received_bytes", "Bytes of UDP datagrams received."),
    ("lines", "log_lines", "Complete log lines appended to the instances' buffers."),
    ("malformed_datagrams", "malformed_datagrams",
     "Datagrams in the extended format with an impossible header, dropped."),
    ("duplicate_messages", "duplicate_messages",
     "Extended-format messages received twice (same sequence number and kernel time), dropped."),
    ("out_of_order_messages", "out_of_order_messages",
     "Extended-format messages kept that did not fit their instance's numbering (too late to "
     "count, another message under a number seen, a number out of range or breaking it)."),
    ("sequence_restarts", "sequence_restarts",
     "Instances whose numbering started afresh: a reboot, or another numbering taken up."),
    ("fragments_received", "fragments_received", "Fragments of long extended-format messages."),
    ("fragments_expired", "fragments_expired",
     "Fragmented messages kept incomplete: not all fragments came within 5 s."),
    ("fragments_overlapping", "fragments_overlapping",
     "Fragments overlapping bytes already received (never from a kernel), held within the "
     "declared length."),
    ("lines_cut", "lines_cut", "Plain lines cut at 16 KiB for want of a newline."),
    ("long_lines_cut", "long_lines_cut",
     "Lines longer than buffer_max_bytes, cut to it with a marker."),
    ("sources_rejected", "sources_rejected",
     "Datagrams and TCP connections refused: source not in allowed_sources."),
    ("tcp_documents_accepted", "tcp_documents_accepted",
     "Documents (system information) received over TCP and kept."),
    ("tcp_documents_refused", "tcp_documents_refused",
     "TCP documents over tcp_max_bytes, discarded."),
    ("tcp_documents_unterminated", "tcp_documents_unterminated",
     "TCP documents ended by the peer without </sys-info>, kept as they came."),
    ("tcp_documents_cut", "tcp_documents_cut",
     "TCP documents discarded: the connection was reset before the document ended."),
    ("tcp_connections_refused", "tcp_connections_refused",
     "TCP connections refused: tcp_max_connections clients were connected."),
    ("tcp_idle_timeouts", "tcp_idle_timeouts", "TCP clients disconnected after tcp_idle_seconds."),
    ("tcp_document_timeouts", "tcp_document_timeouts",
     "TCP clients disconnected: their document did not end within tcp_document_seconds."),
    ("tcp_source_connections_refused", "tcp_source_connections_refused",
     "TCP connections refused: tcp_max_connections_per_source clients from that address "
     "were connected."),
    ("tcp_documents_over_memory", "tcp_documents_over_memory",
     "TCP documents refused: system_info_memory_max_bytes was reached and no system_info_dir "
     "could keep them."),
    ("system_info_kept_on_disk", "system_info_kept_on_disk",
     "Documents kept only in system_info_dir, past system_info_memory_max_bytes."),
    ("instances_created", "instances_created", "Instances (source addresses) first seen."),
    ("instances_evicted", "instances_evicted",
     "Instances dropped, least recently active first, to stay within max_instances."),
    ("lines_pushed_out", "lines_pushed_out",
     "Log lines pushed out of the buffers by buffer_max_lines or buffer_max_bytes."),
    ("incidents_suppressed", "incidents_suppressed",
     "Incidents folded into an earlier report by cooldown_seconds."),
    ("reports_created", "reports_created", "Reports made from incidents."),
    ("reports_spooled", "reports_spooled", "Reports written to the spool for delivery."),
    ("reports_written_local", "reports_written_local",
     "Reports written under spool_dir/local/ (stand-alone)."),
    ("reports_delivered", "reports_delivered", "Reports accepted by the Support Server (2xx)."),
    ("reports_kept_sent", "reports_kept_sent",
     "Delivered reports kept in spool_dir/sent/ (sent_keep_days)."),
    ("sent_reports_pruned", "sent_reports_pruned",
     "Reports removed from spool_dir/sent/ past sent_keep_days or sent_max_bytes."),
    ("reports_retried", "reports_retried", "Failed delivery attempts that will be retried."),
    ("reports_rejected", "reports_rejected",
     "Reports refused for good by the Support Server (400, 413, 422), kept in rejected/."),
    ("reports_dropped", "reports_dropped",
     "Reports dropped from the spool by spool_max_bytes, or alone larger than it."),
    ("reports_lost", "reports_lost",
     "Reports neither written to disk nor held in memory, or still held at the stop."),
    ("spool_write_errors", "spool_write_errors",
     "Writes to spool_dir that failed (a full or failing disk); the reports are held in memory "
     "and the write is retried."),
    ("spool_corrupt_files", "spool_corrupt_files",
     "Files of spool_dir/pending/ that were no valid report at start, moved to corrupt/."),
    ("clickhouse_rows_sent", "clickhouse_rows_sent",
     "Rows ClickHouse took (kernel_log and incidents)."),
    ("clickhouse_rows_dropped", "clickhouse_rows_dropped",
     "Rows never sent to ClickHouse: the oldest, past clickhouse_queue_max_bytes while it was "
     "away, or left at shutdown."),
    ("clickhouse_insert_errors", "clickhouse_insert_errors",
     "Failed requests to ClickHouse (inserts, making the tables); their rows wait and are "
     "sent again."),
    ("archive_lines", "archive_lines", "Log lines written to the archive (archive_dir)."),
    ("archive_lines_dropped", "archive_lines_dropped",
     "Log lines that never reached the archive: its disk failed (full), or their buffer let "
     "go of them first."),
    ("archive_write_errors", "archive_write_errors",
     "Writes, rotations, compressions and removals in the archive that failed."),
    ("archive_read_errors", "archive_read_errors",
     "Archive files that could not be read back at start."),
    ("archive_lines_restored", "archive_lines_restored",
     "Log lines put back into the buffers from the archive at start."),
    ("archive_rotations", "archive_rotations", "Archive files rotated by archive_max_bytes."),
    ("archive_files_removed", "archive_files_removed",
     "Archive files removed by archive_keep, archive_total_max_bytes or the bound on the "
     "instances it keeps files of."),
)

#: stats key -> the ``part`` label of tempesta_ts_errors_total.
ERRORS = (
    ("udp_errors", "udp"),
    ("tcp_errors", "tcp"),
    ("system_info_store_errors", "system_info_store"),
    ("timer_errors", "timer"),
    ("tracker_errors", "tracker"),
    ("spool_errors", "spool"),
    ("clickhouse_errors", "clickhouse"),
)

#: Every stats key the server is known to count, so that a status shows zeros too.
KNOWN_STATS = tuple(
    sorted(
        {key for key, _, _ in COUNTERS}
        | {key for key, _ in ERRORS}
        | {f"incidents_{kind}" for kind in KINDS}
    )
)


class Histogram:
    """Observations counted into fixed buckets; plain attributes, read at scrape time."""

    def __init__(self, buckets: Iterable[float]) -> None:
        self.bounds = tuple(sorted(buckets))
        #: One count per bound, then the count above the last bound (+Inf).
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation (``le`` semantics: a value equal to a bound is in it)."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        """Observations so far."""
        return sum(self.counts)

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        """The histogram as a metric family with cumulative buckets."""
        buckets, total = [], 0
        for bound, count in zip(self.bounds + (float("inf"),), self.counts):
            total += count
            buckets.append((floatToGoString(bound), total))
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=self.sum)


def read_udp_receive_buffer_errors(proc: str) -> int | None:
    """The host's (network namespace's) UDP RcvbufErrors, IPv4 plus IPv6; None if unreadable."""
    total, found = 0, False
    try:
        with open(os.path.join(proc, "net", "snmp"), encoding="ascii") as f:
            rows = [line.split() for line in f if line.startswith("Udp: ")]
        if len(rows) >= 2 and "RcvbufErrors" in rows[0]:
            total += int(rows[1][rows[0].index("RcvbufErrors")])
            found = True
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open(os.path.join(proc, "net", "snmp6"), encoding="ascii") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2 and parts[0] == "Udp6RcvbufErrors":
                    total += int(parts[1])
                    found = True
    except (OSError, ValueError):
        pass
    return total if found else None


def read_udp_socket(proc: str, inode: int) -> tuple[int, int] | None:
    """(bytes queued, datagrams dropped) of the UDP socket with this inode, from
    /proc/net/udp or udp6; None when it is not there."""
    wanted = str(inode)
    for name in ("udp", "udp6"):
        try:
            with open(os.path.join(proc, "net", name), encoding="ascii") as f:
                next(f, None)
                for line in f:
                    # sl local rem st tx_queue:rx_queue tr:tm retrnsmt uid timeout inode ref
                    # pointer drops
                    parts = line.split()
                    if len(parts) >= 13 and parts[9] == wanted:
                        queued = int(parts[4].partition(":")[2], 16)
                        return queued, int(parts[12])
        except (OSError, ValueError):
            continue
    return None


class DeliveryTimes(Histogram):
    """Seconds from spooled to accepted; the Reporter's on_delivered hook feeds it."""

    def __init__(self) -> None:
        super().__init__(DELIVERY_BUCKETS)

    def delivered(self, report_id: str, seconds: float) -> None:
        """The Reporter's on_delivered hook."""
        self.observe(seconds)


class ServerCollector(Collector):
    """Every tempesta_ts_ metric, rendered from a snapshot of the server when scraped."""

    def __init__(self, snapshot: Callable[[], Snapshot], udp_socket: Callable[[], Any],
                 delivery: DeliveryTimes | None = None, proc: str = "/proc") -> None:
        #: The server's state now (tempesta_ts/status.py).
        self.snapshot = snapshot
        #: The listening UDP socket (for its inode in /proc/net/udp), or None while down.
        self.udp_socket = udp_socket
        self.delivery = delivery if delivery is not None else DeliveryTimes()
        self.proc = proc

    def collect(self) -> Iterator[Metric]:
        snapshot = self.snapshot()
        stats = snapshot.counters

        info = GaugeMetricFamily(
            PREFIX + "build_info", "The tempesta-ts version, as a label; always 1.",
            labels=["version"],
        )
        info.add_metric([snapshot.version], 1)
        yield info

        for key, name, documentation in COUNTERS:
            yield CounterMetricFamily(PREFIX + name, documentation, value=stats.get(key, 0))

        errors = CounterMetricFamily(
            PREFIX + "errors",
            "Unexpected failures caught (each logged with its traceback, rate-limited), by part.",
            labels=["part"],
        )
        for key, part in ERRORS:
            errors.add_metric([part], stats.get(key, 0))
        yield errors

        incidents = CounterMetricFamily(
            PREFIX + "incidents", "Incident lines detected, by kind (folded ones included).",
            labels=["kind"],
        )
        kinds = set(KINDS) | {
            key[len("incidents_"):] for key in stats
            if key.startswith("incidents_") and key != "incidents_suppressed"
        }
        for kind in sorted(kinds):
            incidents.add_metric([kind], stats.get(f"incidents_{kind}", 0))
        yield incidents

        yield from self._instances(snapshot)
        yield from self._reports(snapshot)
        yield from self._udp(snapshot)
        if snapshot.clickhouse_queued_rows is not None:
            yield GaugeMetricFamily(
                PREFIX + "clickhouse_queued_rows", "Rows waiting to be sent to ClickHouse.",
                value=snapshot.clickhouse_queued_rows,
            )
        if snapshot.archive_bytes is not None:
            yield GaugeMetricFamily(
                PREFIX + "archive_bytes", "Bytes of the archive's files and journal on disk.",
                value=snapshot.archive_bytes,
            )
            yield GaugeMetricFamily(
                PREFIX + "archive_pending_lines",
                "Lines the archive took that are not in their file yet: waiting for their "
                "write, or held back and in the journal (more than 256 instances at once).",
                value=snapshot.archive_pending_lines,
            )

    def _instances(self, snapshot: Snapshot) -> Iterator[Metric]:
        lines = buffered = lost = 0
        last_seen = GaugeMetricFamily(
            PREFIX + "instance_last_seen_timestamp_seconds",
            "When each instance held last sent anything (Unix time); one series per instance.",
            labels=["address"],
        )
        for instance in snapshot.instances:
            lines += instance.lines
            buffered += instance.bytes
            lost += instance.lost_messages
            last_seen.add_metric([instance.address], instance.last_seen)
        yield GaugeMetricFamily(PREFIX + "instances", "Instances held.", value=len(snapshot.instances))
        yield GaugeMetricFamily(
            PREFIX + "instances_max", "The max_instances setting.", value=snapshot.max_instances
        )
        yield GaugeMetricFamily(
            PREFIX + "buffered_lines", "Log lines held in the instances' buffers.", value=lines
        )
        yield GaugeMetricFamily(
            PREFIX + "buffered_bytes", "Bytes of log text held in the instances' buffers.",
            value=buffered,
        )
        yield GaugeMetricFamily(
            PREFIX + "lost_messages",
            "Messages missing from the sequence numbers of the instances held (extended format); "
            "goes down when a late message fills a gap or an instance is dropped.",
            value=lost,
        )
        yield GaugeMetricFamily(
            PREFIX + "fragmented_messages_pending",
            "Fragmented messages waiting for the rest of their fragments.",
            value=snapshot.fragments_pending,
        )
        yield GaugeMetricFamily(
            PREFIX + "tcp_connections", "TCP clients connected.", value=snapshot.documents.connections
        )
        yield GaugeMetricFamily(
            PREFIX + "system_info_memory_bytes",
            "Memory system information takes: the instances' documents and those under way.",
            value=snapshot.documents.memory_bytes,
        )
        yield GaugeMetricFamily(
            PREFIX + "system_info_memory_max_bytes", "The system_info_memory_max_bytes setting.",
            value=snapshot.documents.memory_max_bytes,
        )
        yield last_seen

    def _reports(self, snapshot: Snapshot) -> Iterator[Metric]:
        delivery = snapshot.delivery
        yield GaugeMetricFamily(
            PREFIX + "reports_settling",
            "Reports waiting for settle_seconds of quiet from their instance.",
            value=delivery.settling,
        )
        yield GaugeMetricFamily(
            PREFIX + "reports_pending", "Reports in the spool waiting for delivery.",
            value=delivery.pending,
        )
        yield GaugeMetricFamily(
            PREFIX + "reports_in_flight", "Deliveries under way.", value=delivery.in_flight
        )
        yield GaugeMetricFamily(
            PREFIX + "reports_held_in_memory",
            "Reports the disk refused, held in memory (within spool_max_bytes) until written.",
            value=delivery.held,
        )
        yield GaugeMetricFamily(
            PREFIX + "spool_bytes", "Bytes of the reports waiting in the spool.", value=delivery.bytes
        )
        yield GaugeMetricFamily(
            PREFIX + "spool_max_bytes", "The spool_max_bytes setting.", value=delivery.max_bytes
        )
        oldest = delivery.oldest
        age = 0.0 if oldest is None else max(0.0, snapshot.now - oldest)
        yield GaugeMetricFamily(
            PREFIX + "oldest_pending_report_age_seconds",
            "How long the oldest report has waited in the spool; 0 when none waits.",
            value=age,
        )
        yield self.delivery.family(
            PREFIX + "report_delivery_seconds",
            "Time from a report's spooling to its acceptance by the Support Server.",
        )

    def _udp(self, snapshot: Snapshot) -> Iterator[Metric]:
        granted = snapshot.listening.receive_buffer
        if granted is not None:
            yield GaugeMetricFamily(
                PREFIX + "udp_receive_buffer_bytes",
                "UDP receive buffer granted by the kernel (net.core.rmem_max caps it).",
                value=granted,
            )
        yield GaugeMetricFamily(
            PREFIX + "listening", "1 while the UDP and TCP listeners are up, else 0.",
            value=int(snapshot.listening.up),
        )
        handle = self.udp_socket()
        if handle is not None:
            try:
                inode = os.fstat(handle.fileno()).st_ino
            except (OSError, AttributeError):
                inode = None
            socket = read_udp_socket(self.proc, inode) if inode is not None else None
            if socket is not None:
                queued, drops = socket
                yield GaugeMetricFamily(
                    PREFIX + "udp_receive_queue_bytes",
                    "Bytes waiting in the UDP socket's receive buffer, as the kernel accounts "
                    "them (with overhead, against twice the buffer granted).",
                    value=queued,
                )
                yield CounterMetricFamily(
                    PREFIX + "udp_socket_drops",
                    "Datagrams the kernel dropped at the UDP socket, mostly for a full receive "
                    "buffer (/proc/net/udp drops).",
                    value=drops,
                )
        errors = read_udp_receive_buffer_errors(self.proc)
        if errors is not None:
            yield CounterMetricFamily(
                PREFIX + "udp_receive_buffer_errors",
                "UDP datagrams the kernel dropped for a full receive buffer, all sockets of the "
                "host's network namespace (/proc/net/snmp RcvbufErrors, IPv4 and IPv6).",
                value=errors,
            )


def make_registry(collector: ServerCollector, process: bool = True) -> CollectorRegistry:
    """A registry of the server's own (never the global one): its collector, and the process's
    memory, CPU and file descriptors."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    if process:
        ProcessCollector(registry=registry)
    return registry
