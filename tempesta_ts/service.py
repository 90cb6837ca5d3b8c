"""Assembly: buffer registry, UDP and TCP listeners, incident tracker and report sink in one
MultiService, started and stopped in the order that loses nothing."""

from __future__ import annotations

import socket
from functools import partial
from typing import Sequence

from twisted.application import service
from twisted.internet import task
from twisted.internet.defer import gatherResults, inlineCallbacks, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from tempesta_ts import __version__
from tempesta_ts.access import SourceFilter
from tempesta_ts.archive import Archive
from tempesta_ts.buffers import BufferRegistry, Instance, SystemInfo
from tempesta_ts.config import Config
from tempesta_ts.errors import StartupError, describe_listen_error
from tempesta_ts.incidents import Rules
from tempesta_ts.intake import Intake
from tempesta_ts.log import escape, get_logger
from tempesta_ts.metrics import KNOWN_STATS
from tempesta_ts.netconsole import LogLine
from tempesta_ts.report import Incident, build_report
from tempesta_ts.reporter import Reporter
from tempesta_ts.sinks import IReportSink, LocalReports
from tempesta_ts.spool import Spool
from tempesta_ts.sysinfo import SystemInfoFactory, SystemInfoStore, listen_documents
from tempesta_ts.throttle import Throttle
from tempesta_ts.tracker import IncidentTracker
from tempesta_ts.udp import NetconsoleProtocol, listen_netconsole
from tempesta_ts.web import WebService

#: How often waiting partial lines and fragments are looked at.
EXPIRE_INTERVAL = 0.25


class RegistryService(service.Service):
    """Owns the buffer registry and the timer that completes partial lines and fragments."""

    log = get_logger(__name__)

    def __init__(self, registry: BufferRegistry, clock) -> None:
        self.registry = registry
        self.clock = clock
        self._loop = task.LoopingCall(self._expire)
        self._loop.clock = clock
        self._throttle = Throttle(60.0)

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
        except Exception:
            self.registry.stats["timer_errors"] += 1
            held = self._throttle.hit("expire", self.clock.seconds())
            if held is not None:
                self.log.failure("Failed to expire waiting lines ({held} more held back)", held=held)


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

    def stopService(self):
        super().stopService()
        ports = [p for p in (self.udp_port, self.tcp_port) if p is not None]
        self.udp_port = self.tcp_port = None
        return gatherResults([maybeDeferred(p.stopListening) for p in ports])


class TroubleshootingService(service.MultiService):
    """The whole tempesta-ts server."""

    log = get_logger(__name__)
    announcements = Logger(namespace=__name__)

    def __init__(self, config: Config, reactor, http_client=None) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        # A plain dict of every known counter rather than a Counter: the hot path adds to
        # some of them for every datagram, and only an exact dict gets CPython's fast path.
        self.stats: dict[str, int] = dict.fromkeys(KNOWN_STATS, 0)
        self.registry = BufferRegistry(
            config.max_instances, config.buffer_max_lines, config.buffer_max_bytes, self.stats
        )
        intake = Intake(self.registry, reactor, SourceFilter(config.allowed_sources), self.stats)
        self.udp = NetconsoleProtocol(intake, config.udp_receive_buffer_bytes)
        self.system_info_store = (
            SystemInfoStore(config.system_info_dir) if config.system_info_dir else None
        )
        self.tcp = SystemInfoFactory(
            intake, config.tcp_max_bytes, config.tcp_idle_seconds, config.tcp_max_connections,
            self.system_info_store,
            memory_max_bytes=config.system_info_memory_max_bytes,
            document_seconds=config.tcp_document_seconds,
            max_connections_per_source=config.tcp_max_connections_per_source,
        )
        self.spool = Spool.of(config, self.stats, reactor)
        # Where finished reports go: written locally (stand-alone), or delivered.
        self.reporter: Reporter | None = None
        if config.standalone:
            self.sink: IReportSink = LocalReports(self.spool, self.stats)
        else:
            self.reporter = self.sink = Reporter(
                config, reactor, self.stats, http_client=http_client, spool=self.spool
            )
        self.tracker = IncidentTracker(
            Rules(config.incident_patterns, config.ignore_patterns),
            reactor,
            config.settle_seconds,
            config.cooldown_seconds,
            self._make_report,
            self.sink.submit,
            self.stats,
        )
        self.hostname = socket.gethostname()
        # Started in this order, stopped in reverse (see stopService).
        self.sink.setServiceParent(self)
        self.registry_service = RegistryService(self.registry, reactor)
        self.registry_service.setServiceParent(self)
        # Every line on disk, and the buffers rebuilt from it before the listeners start.
        self.archive = Archive.of(config, self.registry, reactor, self.stats)
        if self.archive is not None:
            self.archive.setServiceParent(self)
        self.listeners = ListenerService(
            reactor, config.host, config.port, self.udp, self.tcp, config.reuse_port
        )
        self.listeners.setServiceParent(self)
        # After the listeners: a failure to bind the main port is reported first.
        self.web: WebService | None = None
        if config.metrics_port:
            self.web = WebService(self, reactor, config.metrics_host, config.metrics_port)
            self.web.setServiceParent(self)
            if self.reporter is not None:
                self.reporter.on_delivered = self.web.collector.delivered
        if config.log_level == "debug":
            self.registry.observers.append(self._log_lines)
        else:
            # The tracker needs only lines that can start an incident, or all of a watched one.
            self.registry.line_filter = self.tracker.rules.line_filter
        self.registry.observers.append(self.tracker.lines_added)
        self.registry.evicted.append(self._log_eviction)
        self.registry.evicted.append(self.tracker.forget)
        self._evictions = Throttle(60.0)

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
        ordered = (self.listeners, self.registry_service, self.archive, self.sink, self.web)
        for other in [c for c in self if c not in ordered]:
            yield maybeDeferred(other.stopService)
        yield self.listeners.stopService()
        yield self.registry_service.stopService()
        if self.archive is not None:
            # After the waiting lines were completed: they are written too.
            yield self.archive.stopService()
        yield self.tracker.close_all()
        yield self.sink.stopService()
        if self.web is not None:
            yield self.web.stopService()

    def _make_report(self, instance: Instance, incidents: Sequence[Incident], suppressed: int) -> dict:
        shown = instance.system_info
        if self.system_info_store is not None:
            shown = self._newest_system_info(instance)
        # A document kept only on disk lends its text to this report, not to memory.
        held, instance.system_info = instance.system_info, shown
        try:
            return build_report(
                instance=instance,
                incidents=incidents,
                suppressed=suppressed,
                client_id=self.config.support_client_id,
                hostname=self.hostname,
                version=__version__,
                now=self.reactor.seconds(),
            )
        finally:
            instance.system_info = held

    def _newest_system_info(self, instance: Instance) -> SystemInfo | None:
        """The instance's newest document with its text, read from system_info_dir when memory
        holds an older one or only a note of it (system_info_memory_max_bytes)."""
        # Another process on the port (reuse_port), or this one before a restart, may have
        # taken a newer document from the instance.
        current = instance.system_info
        try:
            stored = self.system_info_store.load(instance.address)
        except (OSError, ValueError, KeyError, TypeError):
            self.stats["system_info_store_errors"] += 1
            self.log.failure("Could not read the system information of {instance} in {path}",
                             instance=instance.address, path=self.system_info_store.directory)
            stored = None
        if stored is not None and (
            current is None or current.on_disk or stored.received_at > current.received_at
        ):
            self.tcp.hold(instance, stored)
            return stored
        # A note whose text could not be read back is no document.
        return None if current is not None and current.on_disk else current

    def startService(self) -> None:
        if self.system_info_store is not None:
            # After twistd has dropped privileges: made by, and checked for, the server's user.
            self.system_info_store.prepare()
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
        """The start-up summary: where it listens, what it got, where reports go."""
        c = self.config
        host, port = self.listeners.address
        shown = f"[{host}]" if ":" in host else host
        granted = self.udp.receive_buffer_granted
        if granted is None:
            rcvbuf = "UDP receive buffer left at the system default"
        else:
            rcvbuf = f"UDP receive buffer {granted} bytes (asked {c.udp_receive_buffer_bytes}"
            rcvbuf += "; net.core.rmem_max caps it)" if granted < c.udp_receive_buffer_bytes else ")"
        if c.standalone:
            target = f"stand-alone: reports are written under {c.spool_dir}/local/"
            tls = "TLS: not used"
        else:
            target = (
                f"Support Server https://{c.support_host}:{c.support_port}{c.support_path} "
                f"as client {c.support_client_id}"
            )
            if c.skip_ssl_verification:
                tls = "TLS: certificate NOT verified (skip_ssl_verification)"
            elif c.support_ca_file:
                tls = f"TLS: verified against {c.support_ca_file}"
            else:
                tls = "TLS: verified against the system trust store"
        metrics = (
            f"metrics on {self.web.url}/metrics (status on /status)"
            if self.web is not None
            else "metrics off"
        )
        sources = "all sources" if not c.allowed_sources else ", ".join(map(str, c.allowed_sources))
        waiting = self.spool.count
        spool = f"{waiting} reports wait in the spool" if waiting else "spool empty"
        shared = (
            f" (shared with other processes: reuse_port; system information in {c.system_info_dir})"
            if c.reuse_port else ""
        )
        return (
            f"tempesta-ts {__version__} listening on UDP and TCP {shown}:{port}{shared}; {rcvbuf}; "
            f"{target}; {tls}; {spool}; accepting {sources}; {metrics}; log level {c.log_level}"
        )

    def _log_lines(self, instance: Instance, lines: Sequence[LogLine]) -> None:
        for line in lines:
            self.log.debug(
                "{instance} {text}", instance=instance.address, text=escape(line.text), seq=line.seq
            )

    def _log_eviction(self, instance: Instance) -> None:
        held = self._evictions.hit("evict", self.reactor.seconds())
        if held is not None:
            self.log.warn(
                "Dropped instance {instance} (least recently active) to stay within "
                "max_instances={limit} ({held} more dropped since the last notice)",
                instance=instance.address,
                limit=self.config.max_instances,
                held=held,
            )
