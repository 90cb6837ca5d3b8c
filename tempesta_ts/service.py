"""Assembly: the parts of the server made from the Config and wired once (the buffer registry,
tracker and report maker by tempesta_ts/pipeline.py), the UDP and TCP listeners, the report
sink and the web endpoint, in one MultiService started and stopped in the order that loses
nothing."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

from twisted.application import service
from twisted.internet import task
from twisted.internet.defer import gatherResults, inlineCallbacks, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from tempesta_ts.access import SourceFilter
from tempesta_ts.archive import Archive
from tempesta_ts.buffers import BufferRegistry
from tempesta_ts.clickhouse import ClickHouse
from tempesta_ts.config import Config
from tempesta_ts.degraded import Degradations
from tempesta_ts.detail import DetailSource
from tempesta_ts.errors import StartupError, describe_listen_error
from tempesta_ts.intake import Intake
from tempesta_ts.log import get_logger, quiet_port_notices, set_level
from tempesta_ts.metrics import KNOWN_STATS, DeliveryTimes, ServerCollector
from tempesta_ts.pipeline import (
    EvictionNotices,
    ReportMaker,
    build_pipeline,
    log_lines,
    reconfigure_pipeline,
)
from tempesta_ts.recent import RecentReports
from tempesta_ts.redact import Redactor
from tempesta_ts.reporter import Reporter
from tempesta_ts.sent import SentReports
from tempesta_ts.sinks import IReportSink, LocalReports
from tempesta_ts.spool import Spool
from tempesta_ts.status import StatusSource, startup_line, tls_mode
from tempesta_ts.sysinfo import SystemInfoFactory, SystemInfoStore, listen_documents
from tempesta_ts.throttle import Throttle, held_back
from tempesta_ts.udp import NetconsoleProtocol, listen_netconsole
from tempesta_ts.web import WebService

#: How often waiting partial lines and fragments are looked at.
EXPIRE_INTERVAL = 0.25
#: Sequence gaps are looked for every this many expiry ticks (5 s), off the hot path.
GAP_TICKS = 20


class RegistryService(service.Service):
    """Owns the buffer registry and the timer that completes partial lines and fragments."""

    log = get_logger(__name__)

    def __init__(self, registry: BufferRegistry, clock) -> None:
        self.registry = registry
        self.clock = clock
        self._loop = task.LoopingCall(self._expire)
        self._loop.clock = clock
        self._throttle = Throttle(60.0)
        #: address -> messages lost as last logged.
        self._lost: dict[str, int] = {}
        self._ticks = 0

    def startService(self) -> None:
        super().startService()
        self._loop.start(EXPIRE_INTERVAL, now=False)

    def stopService(self):
        if self._loop.running:
            self._loop.stop()
        # What waits for more (a partial line, an unfinished message) is kept as it is.
        self.registry.flush(self.clock.seconds())
        return super().stopService()

    def _expire(self) -> None:
        try:
            self.registry.expire(self.clock.seconds())
            self._ticks += 1
            if self._ticks % GAP_TICKS == 0:
                self.notice_gaps()
        except Exception:
            self.registry.stats["timer_errors"] += 1
            held = self._throttle.hit("expire", self.clock.seconds())
            if held is not None:
                self.log.failure("Failed to expire waiting lines{more}", held=held,
                                 more=held_back(held, "more held back"))


    def notice_gaps(self) -> None:
        """Log messages lost to sequence gaps, once per burst per instance."""
        now = self.clock.seconds()
        lost = {}
        for instance in self.registry:
            total = instance.lost_messages
            seen = self._lost.get(instance.address, 0)
            lost[instance.address] = seen
            if total <= seen:
                continue
            if self._throttle.hit(("gaps", instance.address), now) is None:
                continue
            lost[instance.address] = total
            self.log.warn(
                "{instance}: {count} netconsole messages lost (gaps in the sequence numbers) "
                "since the last notice, {total} in all; raise the sender's buffers or the "
                "network's capacity",
                instance=instance.address, count=total - seen, total=total,
            )
        # Instances evicted since are forgotten.
        self._lost = lost


class ListenerService(service.Service):
    """Binds UDP and TCP on the same host and port, before twistd drops privileges.

    With port 0 the TCP port is picked first and UDP takes the same number (a factory can
    listen again at once; the datagram protocol only after its old port has let go of it).
    """

    log = get_logger(__name__)

    def __init__(self, reactor, host: str, port: int, udp: NetconsoleProtocol, tcp: SystemInfoFactory,
                 reuse_port: bool = False):
        self.reactor = reactor
        self.reuse_port = reuse_port
        self.host = host
        self.port = port
        self.udp = udp
        self.tcp = tcp
        self.udp_port = None
        self.tcp_port = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        attempts = 20 if self.port == 0 else 1
        for attempt in range(attempts):
            self.tcp_port = self._listen("TCP", partial(listen_documents, self.reactor), self.port,
                                         self.tcp, interface=self.host, reuse_port=self.reuse_port)
            port = self.tcp_port.getHost().port
            try:
                self.udp_port = self._listen("UDP", partial(listen_netconsole, self.reactor), port,
                                             self.udp, interface=self.host, reuse_port=self.reuse_port)
                return
            except StartupError:
                self.tcp_port.stopListening()
                self.tcp_port = None
                if attempt == attempts - 1:
                    raise

    def startService(self) -> None:
        # ``twist`` (unlike twistd) never calls privilegedStartService.
        if self.udp_port is None:
            self.privilegedStartService()
        super().startService()

    def _listen(self, proto: str, listen, port: int, factory, **kw):
        try:
            return listen(port, factory, **kw)
        except CannotListenError as e:
            raise StartupError(describe_listen_error(proto, self.host, port, e.socketError)) from None

    @property
    def address(self) -> tuple[str, int]:
        """Host and port really bound."""
        return self.host, self.udp_port.getHost().port

    @property
    def up(self) -> bool:
        """Both the UDP and the TCP listener are bound."""
        return self.udp_port is not None and self.tcp_port is not None

    @property
    def where(self) -> tuple[str, int]:
        """Where the listeners are bound, or configured to bind while they are down."""
        return self.address if self.udp_port is not None else (self.host, self.port)

    def udp_socket(self):
        """The bound UDP socket (/proc/net/udp knows it by its inode), or None while down."""
        return None if self.udp_port is None else self.udp_port.getHandle()

    def stopService(self):
        super().stopService()
        ports = [p for p in (self.udp_port, self.tcp_port) if p is not None]
        self.udp_port = self.tcp_port = None
        return gatherResults([maybeDeferred(p.stopListening) for p in ports])


class TroubleshootingService(service.MultiService):
    """The whole tempesta-ts server: its parts, made and wired here, started and stopped in
    the order that loses nothing."""

    log = get_logger(__name__)
    announcements = Logger(namespace=__name__)

    def __init__(self, config: Config, reactor, http_client=None,
                 config_file: str | None = None) -> None:
        super().__init__()
        self.config = config
        #: The JSON file the settings came from (named in the start-up line), or None.
        self.config_file = config_file
        self.reactor = reactor
        # A plain dict of every known counter rather than a Counter: the hot path adds to
        # some of them for every datagram, and only an exact dict gets CPython's fast path.
        self.stats: dict[str, int] = dict.fromkeys(KNOWN_STATS, 0)
        #: Delivered reports kept in spool_dir/sent/ (None: removed once delivered).
        self.sent = SentReports.of(config, reactor, self.stats) if not config.standalone else None
        self.spool = Spool.of(config, self.stats, reactor,
                              keep_sent=self.sent.keep if self.sent is not None else None)
        # What works less well than it should, and why (/status.json "degraded"): other parts
        # join with watch(name, component), the component having a `degraded` property.
        self.degradations = Degradations()
        self.degradations.watch("spool", self.spool)
        # How long deliveries take, for /metrics (when it is on).
        delivery_times = DeliveryTimes() if config.metrics_port else None
        # Where finished reports go: written locally (stand-alone), or delivered.
        self.reporter: Reporter | None = None
        if config.standalone:
            self.sink: IReportSink = LocalReports(self.spool, self.stats)
        else:
            self.reporter = self.sink = Reporter(
                config, reactor, self.stats, http_client=http_client, spool=self.spool,
                on_delivered=delivery_times.delivered if delivery_times is not None else None,
            )
        self.system_info_store = (
            SystemInfoStore(config.system_info_dir) if config.system_info_dir else None
        )
        # The one loop: the registry feeds the tracker, whose reports hold documents read back
        # from system_info_dir in the memory the TCP side bounds, and the TCP side feeds the
        # registry. It is closed by name: `tcp` is made below, before any report can be.
        tcp: SystemInfoFactory
        make_report = ReportMaker(
            reactor, config.support_client_id, self.stats, store=self.system_info_store,
            keep=lambda instance, info: tcp.hold(instance, info),
            redactor=Redactor.of(config),
        )
        # The reports made lately, for the operators' pages (/reports).
        self.recent = RecentReports(reactor)
        # ClickHouse (clickhouse_url): every line, whatever line_filter hides from the tracker,
        # and the incidents of every report made.
        self.clickhouse = ClickHouse.of(config, reactor, self.stats, make_report.hostname)
        extra_sinks = [] if self.clickhouse is None else [self.clickhouse]
        pipeline = build_pipeline(
            config, reactor, self.stats, [self.sink, self.recent, *extra_sinks],
            make_report=make_report,
            line_observers=[log_lines] if config.log_level == "debug" else [],
            every_line=[] if self.clickhouse is None else [self.clickhouse.lines_added],
            evicted=[EvictionNotices(reactor, config.max_instances)],
        )
        self.pipeline = pipeline
        self.registry, self.tracker = pipeline.registry, pipeline.tracker
        self.intake = intake = Intake(self.registry, reactor, SourceFilter(config.allowed_sources), self.stats)
        self.udp = NetconsoleProtocol(intake, config.udp_receive_buffer_bytes)
        self.tcp = tcp = SystemInfoFactory(
            intake, config.tcp_max_bytes, config.tcp_idle_seconds, config.tcp_max_connections,
            self.system_info_store,
            memory_max_bytes=config.system_info_memory_max_bytes,
            document_seconds=config.tcp_document_seconds,
            max_connections_per_source=config.tcp_max_connections_per_source,
        )
        # Started in this order, stopped in reverse (see stopService).
        if self.sent is not None:
            self.sent.setServiceParent(self)
        self.sink.setServiceParent(self)
        if self.clickhouse is not None:
            self.clickhouse.setServiceParent(self)
        self.registry_service = RegistryService(self.registry, reactor)
        self.registry_service.setServiceParent(self)
        # Every line on disk, and the buffers rebuilt from it before the listeners start.
        self.archive = Archive.of(config, self.registry, reactor, self.stats)
        if self.archive is not None:
            self.archive.setServiceParent(self)
            self.degradations.watch("archive", self.archive)
        self.listeners = ListenerService(
            reactor, config.host, config.port, self.udp, self.tcp, config.reuse_port
        )
        self.listeners.setServiceParent(self)
        #: The server's state as one value, for the pages, /metrics and the start-up line.
        self.status = StatusSource(
            config, reactor, service=self, listeners=self.listeners, udp=self.udp, tcp=self.tcp,
            registry=self.registry, tracker=self.tracker, sink=self.sink, spool=self.spool,
            reporter=self.reporter, degradations=self.degradations, clickhouse=self.clickhouse,
            archive=self.archive,
        )
        #: Other parts that take reloaded settings live: each has ``reconfigure(config)`` and
        #: adds its keys to reload.RELOADABLE (the archive, ClickHouse, redactions).
        self.reconfigurable: list = []
        # After the listeners: a failure to bind the main port is reported first.
        self.web: WebService | None = None
        if config.metrics_port:
            collector = ServerCollector(self.status, self.listeners.udp_socket, delivery_times)
            detail = DetailSource(reactor, registry=self.registry, tracker=self.tracker,
                                  sink=self.sink, recent=self.recent, status=self.status,
                                  reporter=self.reporter, sent=self.sent)
            self.web = WebService(reactor, config.metrics_host, config.metrics_port,
                                  self.status, self.status.listening, collector,
                                  detail=detail, status_token=config.status_token)
            self.web.setServiceParent(self)

    def reconfigure(self, config: Config) -> None:
        """Make reloaded settings live (SIGHUP, tempesta_ts/reload.py): only the keys of
        `reload.RELOADABLE` differ from the running ones. The Reporter goes first: a CA bundle
        that does not parse refuses the reload (ConfigError) before anything changed."""
        if self.reporter is not None:
            self.reporter.reconfigure(config)
        set_level(config.log_level)
        self.intake.sources = SourceFilter(config.allowed_sources)
        reconfigure_pipeline(self.pipeline, config)
        if self.web is not None:
            self.web.status_token = config.status_token
        for component in self.reconfigurable:
            component.reconfigure(config)
        self.config = config
        # What the pages and the start-up line show of the mode follows.
        self.status.mode = replace(
            self.status.mode, tls=tls_mode(config), ca_file=config.support_ca_file,
            sources=tuple(map(str, config.allowed_sources)), log_level=config.log_level,
        )

    @inlineCallbacks
    def stopService(self):
        """Listeners off, waiting lines completed, open incidents reported, then delivery ends;
        the web endpoint last.

        MultiService would stop its children all at once; nothing accepted may be lost, so the
        order is explicit. Children added by others (the systemd notifier) stop first: they
        announce the stop. The web endpoint outlives the rest so that /healthz says 503 while
        the server drains and /metrics shows the last reports leaving the spool.
        """
        if not self.running:
            return
        service.Service.stopService(self)
        ordered = (self.listeners, self.registry_service, self.archive, self.sink, self.clickhouse,
                   self.web)
        for other in [c for c in self if c not in ordered]:
            yield maybeDeferred(other.stopService)
        yield self.listeners.stopService()
        yield self.registry_service.stopService()
        if self.archive is not None:
            # After the waiting lines were completed: they are written too.
            yield self.archive.stopService()
        yield self.tracker.close_all()
        yield self.sink.stopService()
        if self.clickhouse is not None:
            yield self.clickhouse.stopService()
        if self.web is not None:
            yield self.web.stopService()

    def privilegedStartService(self) -> None:
        # The ports bound here are named in the one start-up line, not one line each.
        with quiet_port_notices():
            super().privilegedStartService()

    def startService(self) -> None:
        if self.system_info_store is not None:
            # After twistd has dropped privileges: made by, and checked for, the server's user.
            self.system_info_store.prepare()
        with quiet_port_notices():
            super().startService()
        # twistd starts services before the reactor runs and installs its signal handlers:
        # "listening" is said once a SIGTERM would be handled cleanly.
        self.reactor.callWhenRunning(self._announce)

    def _announce(self) -> None:
        if not self.running or self.listeners.udp_port is None:
            return
        # The one start-up line is shown whatever log_level filters (operators grep for it).
        self.announcements.info(self.summary())
        if self.config.skip_ssl_verification and not self.config.standalone:
            self.log.warn(
                "skip_ssl_verification is set: the Support Server's certificate is not checked, "
                "so reports and the API key could go to an impostor. Prefer support_ca_file "
                "with the server's CA."
            )

    def summary(self) -> str:
        """The start-up line: where it listens, what it got, where reports go."""
        line = startup_line(self.status(), self.web.url if self.web is not None else None)
        where = f"config {self.config_file}" if self.config_file else "no config file"
        return f"{line}; {where}"
