"""The server's state as one value, and the lines that say it.

`StatusSource` reads the parts (listeners, registry, tracker, spool, report sink) into a
`Snapshot` when asked: the one place that knows where each fact is kept. /status and
/status.json (tempesta_ts/web.py), /metrics (tempesta_ts/metrics.py), the start-up line and
systemd's status line only render the snapshot. Nothing here changes the parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from tempesta_ts import __version__
from tempesta_ts.hosts import bracketed, host_port
from tempesta_ts.metrics import KNOWN_STATS


@dataclass(frozen=True, slots=True)
class Listening:
    """Where the UDP and TCP listeners are, and whether they are up."""

    host: str
    #: The port bound, or the one configured while the listeners are down.
    port: int
    #: Both the UDP and the TCP listener are bound.
    up: bool
    #: The server runs (False once it is stopping).
    running: bool
    #: reuse_port: other processes share host:port.
    shared: bool
    #: The UDP receive buffer the kernel granted; None when left at the system default.
    receive_buffer: int | None
    #: The udp_receive_buffer_bytes setting.
    receive_buffer_asked: int

    @property
    def healthy(self) -> bool:
        """The server runs and both listeners are up."""
        return self.running and self.up

    @property
    def where(self) -> str:
        """``UDP and TCP host:port``."""
        return f"UDP and TCP {host_port(self.host, self.port)}"


@dataclass(frozen=True, slots=True)
class Mode:
    """Where reports go, and what the server takes in."""

    standalone: bool
    spool_dir: str
    #: The Support Server's URL as shown; None stand-alone.
    support_url: str | None
    client_id: str | None
    #: How the Support Server's certificate is checked: "none" (stand-alone), "unverified",
    #: "ca_file" or "system".
    tls: str
    ca_file: str | None
    system_info_dir: str | None
    #: allowed_sources as written; empty: every source.
    sources: tuple[str, ...]
    log_level: str

    @property
    def name(self) -> str:
        """stand-alone or support-server, as /status.json says it."""
        return "stand-alone" if self.standalone else "support-server"


@dataclass(frozen=True, slots=True)
class Delivery:
    """Reports settling, the spool, and their delivery (none stand-alone)."""

    settling: int
    pending: int
    bytes: int
    max_bytes: int
    #: When the oldest report waiting was spooled; None when none waits.
    oldest: float | None
    in_flight: int
    last_error: str | None
    #: One of delivery.FAILURE_KINDS, or None.
    last_error_kind: str | None
    #: Reports the disk refused, held in memory until written.
    held: int = 0


@dataclass(frozen=True, slots=True)
class Document:
    """An instance's latest system information, without its text."""

    received_at: float
    size: int
    format: str


@dataclass(frozen=True, slots=True)
class LastIncident:
    """An instance's latest incident and what became of its report."""

    kind: str
    #: Once its report was made; None while it settles.
    title: str | None
    line: str
    received_at: float
    report_id: str | None
    #: settling, folded, or the report sink's word (pending, delivered, written...).
    report_state: str


@dataclass(frozen=True, slots=True)
class InstanceStatus:
    """What the pages show of one instance."""

    address: str
    kernel_release: str | None
    first_seen: float
    last_seen: float
    lines: int
    bytes: int
    lines_pushed_out: int
    lost_messages: int
    system_info: Document | None
    last_incident: LastIncident | None


@dataclass(frozen=True, slots=True)
class Documents:
    """The TCP side: clients and the memory system information takes."""

    connections: int
    memory_bytes: int
    memory_max_bytes: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The whole server's state at one moment."""

    version: str
    now: float
    listening: Listening
    mode: Mode
    delivery: Delivery
    #: Every instance held, the least recently active first.
    instances: tuple[InstanceStatus, ...]
    max_instances: int
    #: Fragmented messages waiting for the rest of their fragments.
    fragments_pending: int
    documents: Documents
    #: Every stats key, known ones at 0 before they are first counted, sorted (a copy).
    counters: Mapping[str, int]
    #: What works less well than it should: {"what", "why", "since"} each (degraded.py).
    degraded: tuple[Mapping[str, Any], ...] = ()
    #: Rows waiting for ClickHouse; None when it is off.
    clickhouse_queued_rows: int | None = None
    #: The archive's bytes on disk and its lines not in their files yet (waiting, or held
    #: and journaled); None when it is off.
    archive_bytes: int | None = None
    archive_pending_lines: int | None = None


def support_url(config) -> str | None:
    """Where reports go, as a URL to show; None when stand-alone."""
    if config.standalone:
        return None
    return f"https://{bracketed(config.support_host)}:{config.support_port}{config.support_path}"


def tls_mode(config) -> str:
    """How the Support Server's certificate is checked (`Mode.tls`)."""
    if config.standalone:
        return "none"
    if config.skip_ssl_verification:
        return "unverified"
    return "ca_file" if config.support_ca_file else "system"


def counters(stats: Mapping[str, int]) -> dict[str, int]:
    """Every stats key, known ones at 0 before they are first counted, sorted."""
    merged = dict.fromkeys(KNOWN_STATS, 0)
    merged.update(stats)
    return dict(sorted(merged.items()))


def report_state(last, sink) -> str:
    """settling, folded, or the report sink's word for the report the incident went into."""
    if last.suppressed:
        return "folded"
    if last.report_id is None:
        return "settling"
    return sink.state_of(last.report_id)


class StatusSource:
    """Reads the server's parts into a `Snapshot`; calling it makes one."""

    def __init__(self, config, clock, *, service, listeners, udp, tcp, registry, tracker,
                 sink, spool, reporter=None, degradations=None, clickhouse=None,
                 archive=None) -> None:
        self.clock = clock
        self.service = service
        self.listeners = listeners
        self.udp = udp
        self.tcp = tcp
        self.registry = registry
        self.tracker = tracker
        self.sink = sink
        self.spool = spool
        #: The Reporter with a Support Server; None stand-alone (nothing is in flight).
        self.reporter = reporter
        self.degradations = degradations
        self.clickhouse = clickhouse
        self.archive = archive
        self.mode = Mode(
            standalone=config.standalone,
            spool_dir=config.spool_dir,
            support_url=support_url(config),
            client_id=config.support_client_id,
            tls=tls_mode(config),
            ca_file=config.support_ca_file,
            system_info_dir=config.system_info_dir,
            sources=tuple(map(str, config.allowed_sources)),
            log_level=config.log_level,
        )
        self._shared = config.reuse_port
        self._asked = config.udp_receive_buffer_bytes

    def listening(self) -> Listening:
        """Where the listeners are and whether they are up: what /healthz needs, cheaply."""
        host, port = self.listeners.where
        return Listening(
            host=host,
            port=port,
            up=self.listeners.up,
            running=bool(self.service.running),
            shared=self._shared,
            receive_buffer=self.udp.receive_buffer_granted,
            receive_buffer_asked=self._asked,
        )

    def __call__(self) -> Snapshot:
        registry, tcp = self.registry, self.tcp
        now = self.clock.seconds()
        degraded = () if self.degradations is None else tuple(self.degradations.current(now))
        return Snapshot(
            version=__version__,
            now=now,
            listening=self.listening(),
            mode=self.mode,
            delivery=self._delivery(),
            instances=tuple(self._instance(i) for i in registry),
            max_instances=registry.max_instances,
            fragments_pending=registry.pending_messages,
            documents=Documents(tcp.connections, tcp.memory_bytes, tcp.memory_max_bytes),
            counters=counters(registry.counters()),
            degraded=degraded,
            clickhouse_queued_rows=None if self.clickhouse is None else self.clickhouse.queued_rows,
            archive_bytes=None if self.archive is None else self.archive.bytes,
            archive_pending_lines=None if self.archive is None else self.archive.pending_lines,
        )

    def _delivery(self) -> Delivery:
        spool, reporter = self.spool, self.reporter
        return Delivery(
            settling=self.tracker.open_windows,
            pending=spool.count,
            bytes=spool.bytes,
            max_bytes=spool.max_bytes,
            oldest=spool.oldest_created,
            in_flight=reporter.in_flight if reporter is not None else 0,
            last_error=reporter.last_error if reporter is not None else None,
            last_error_kind=reporter.last_error_kind if reporter is not None else None,
            held=spool.held,
        )

    def instance_status(self, instance) -> InstanceStatus:
        """One instance (an `Instance` of the registry) as the pages show it."""
        return self._instance(instance)

    def _instance(self, instance) -> InstanceStatus:
        info, buffer = instance.system_info, instance.buffer
        document = None if info is None else Document(info.received_at, info.size, info.format)
        return InstanceStatus(
            address=instance.address,
            kernel_release=instance.kernel_release,
            first_seen=instance.first_seen,
            last_seen=instance.last_seen,
            lines=len(buffer),
            bytes=buffer.bytes,
            lines_pushed_out=buffer.dropped,
            lost_messages=instance.lost_messages,
            system_info=document,
            last_incident=self._last_incident(instance.address),
        )

    def _last_incident(self, address: str) -> LastIncident | None:
        last = self.tracker.last_incidents.get(address)
        if last is None:
            return None
        incident = last.incident
        description = incident.description
        return LastIncident(
            kind=incident.kind,
            title=None if description is None else description.title,
            line=incident.line.text,
            received_at=incident.line.received_at,
            report_id=last.report_id,
            report_state=report_state(last, self.sink),
        )



def describe_mode(mode: Mode) -> str:
    """Where reports go, in words."""
    if mode.standalone:
        return f"stand-alone: reports are written under {mode.spool_dir}/local/"
    return f"Support Server {mode.support_url} as client {mode.client_id}"


def describe_tls(mode: Mode) -> str:
    """How the Support Server's certificate is checked, in words."""
    return {
        "none": "TLS: not used",
        "unverified": "TLS: certificate NOT verified (skip_ssl_verification)",
        "ca_file": f"TLS: verified against {mode.ca_file}",
        "system": "TLS: verified against the system trust store",
    }[mode.tls]


def describe_receive_buffer(listening: Listening) -> str:
    """The UDP receive buffer the kernel granted, against the one asked for."""
    granted, asked = listening.receive_buffer, listening.receive_buffer_asked
    if granted is None:
        return "UDP receive buffer left at the system default"
    capped = "; net.core.rmem_max caps it)" if granted < asked else ")"
    return f"UDP receive buffer {granted} bytes (asked {asked}{capped}"


def startup_line(snapshot: Snapshot, metrics_url: str | None) -> str:
    """The one start-up line: where it listens, what it got, where reports go."""
    listening, mode = snapshot.listening, snapshot.mode
    shared = (
        f" (shared with other processes: reuse_port; system information in {mode.system_info_dir})"
        if listening.shared else ""
    )
    waiting = snapshot.delivery.pending
    spool = f"{waiting} reports wait in the spool" if waiting else "spool empty"
    sources = ", ".join(mode.sources) if mode.sources else "all sources"
    metrics = (
        f"metrics on {metrics_url}/metrics (status on /status)" if metrics_url else "metrics off"
    )
    return (
        f"tempesta-ts {snapshot.version} listening on {listening.where}{shared}; "
        f"{describe_receive_buffer(listening)}; {describe_mode(mode)}; {describe_tls(mode)}; "
        f"{spool}; accepting {sources}; {metrics}; log level {mode.log_level}"
    )


def systemd_status(listening: Listening) -> str:
    """One line for ``systemctl status``."""
    return f"listening on {listening.where}"
