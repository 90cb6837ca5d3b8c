"""The operator's HTTP endpoint: /metrics, /status, /status.json and /healthz (the operators'
pages, /instances/... and /reports..., are in tempesta_ts/pages.py).

Every page is rendered synchronously from a snapshot of the server's state made at request time
(tempesta_ts/status.py), so a scrape costs nothing between scrapes. Log lines come from the
wire: the HTML page escapes everything.
"""

from __future__ import annotations

import heapq
import ipaddress
import json
from typing import Any, Callable

from prometheus_client.exposition import choose_encoder
from twisted.application import service
from twisted.internet.defer import maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.web import resource, server

from tempesta_ts import __version__
from tempesta_ts.detail import DetailSource, SentRows
from tempesta_ts.errors import StartupError, describe_listen_error
from tempesta_ts.hosts import host_port
from tempesta_ts.log import get_logger
from tempesta_ts.metrics import ServerCollector, make_registry
from tempesta_ts.pages import InstanceResource, ReportsResource, guarded, instance_href, link_suffix
from tempesta_ts.report import iso
from tempesta_ts.status import Delivery, InstanceStatus, Listening, Snapshot, describe_mode
from tempesta_ts.webparts import HEADERS as _HEADERS
from tempesta_ts.webparts import STYLE as _STYLE
from tempesta_ts.webparts import duration
from tempesta_ts.webparts import e as _e
from tempesta_ts.webparts import respond as _respond
from tempesta_ts.webparts import when as _when

#: Instances listed on the HTML page, most recently seen first; /status.json lists all.
MAX_ROWS = 500
#: Characters of an incident line on the HTML page.
HTML_LINE_CHARS = 300
#: Characters of an incident line in /status.json (the kernel's lines are under 1 KiB; this
#: bounds what a forged one costs when 10,000 instances are listed).
JSON_LINE_CHARS = 4096


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def instance_status(instance: InstanceStatus) -> dict[str, Any]:
    """One instance as /status.json lists it."""
    info, last = instance.system_info, instance.last_incident
    return {
        "address": instance.address,
        "kernel_release": instance.kernel_release,
        "first_seen": iso(instance.first_seen),
        "last_seen": iso(instance.last_seen),
        "lines": instance.lines,
        "bytes": instance.bytes,
        "lines_pushed_out": instance.lines_pushed_out,
        "lost_messages": instance.lost_messages,
        "system_info": (
            None
            if info is None
            else {"received_at": iso(info.received_at), "size": info.size, "format": info.format}
        ),
        "last_incident": (
            None
            if last is None
            else {
                "kind": last.kind,
                "title": last.title,
                "line": _clip(last.line, JSON_LINE_CHARS),
                "received_at": iso(last.received_at),
                "report_id": last.report_id,
                "report_state": last.report_state,
            }
        ),
    }


def _address_key(address: str) -> tuple:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return (9, 0, address)
    return (ip.version, int(ip), address)


def spool_status(delivery: Delivery) -> dict[str, Any]:
    """The spool and delivery (none stand-alone), as /status.json shows them."""
    return {
        "pending": delivery.pending,
        "bytes": delivery.bytes,
        "oldest": iso(delivery.oldest),
        "in_flight": delivery.in_flight,
        "last_error": delivery.last_error,
        "last_error_kind": delivery.last_error_kind,
        "max_bytes": delivery.max_bytes,
        "settling": delivery.settling,
        "held": delivery.held,
    }


def degraded_status(snapshot: Snapshot) -> list[dict[str, Any]]:
    """What is degraded and why, since when (ISO 8601), as /status.json shows it."""
    return [dict(d, since=iso(d["since"])) for d in snapshot.degraded]


def sent_status(sent: SentRows | None) -> dict[str, Any] | None:
    """The reports kept in spool_dir/sent/, as /status.json counts them (as it does the
    pending ones); None when delivered reports are not kept."""
    if sent is None:
        return None
    newest = sent.reports[0] if sent.reports else None
    return {
        "kept": sent.total,
        "bytes": sent.bytes,
        "newest": None if newest is None else iso(newest.delivered or newest.created),
    }


def status_document(snapshot: Snapshot, started_at: float,
                    sent: SentRows | None = None) -> dict[str, Any]:
    """The whole /status.json document."""
    now, listening = snapshot.now, snapshot.listening
    instances = sorted(snapshot.instances, key=lambda i: _address_key(i.address))
    return {
        "version": snapshot.version,
        "now": iso(now),
        "started_at": iso(started_at),
        "uptime_seconds": round(max(0.0, now - started_at), 3),
        "healthy": listening.healthy,
        "listening": {"host": listening.host, "port": listening.port},
        "mode": snapshot.mode.name,
        "support_url": snapshot.mode.support_url,
        "counters": dict(snapshot.counters),
        "instances": [instance_status(i) for i in instances],
        "spool": spool_status(snapshot.delivery),
        "sent": sent_status(sent),
        "degraded": degraded_status(snapshot),
    }



def _rows(pairs) -> str:
    return "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>\n" for k, v in pairs)


_INSTANCE_HEADER = (
    "<tr><th>Address</th><th>Kernel</th><th>Last seen</th><th>First seen</th><th>Lines</th>"
    "<th>Bytes</th><th>Pushed out</th><th>Lost</th><th>System info</th><th>Last incident</th>"
    "</tr>\n"
)


def _instance_row(instance: InstanceStatus, now: float, suffix: str = "") -> str:
    info, last = instance.system_info, instance.last_incident
    sysinfo = (
        "—" if info is None
        else f"{_e(info.size)} chars {_e(info.format)}, {_e(_when(info.received_at, now))}"
    )
    if last is None:
        incident = "—"
    else:
        report = "" if last.report_id is None else f" {_e(last.report_id)}"
        incident = (
            f"<b>{_e(last.kind)}</b> {_e(duration(now - last.received_at))} ago; "
            f"report{report}: {_e(last.report_state)}<br>"
            + ("" if last.title is None else f"{_e(last.title)}<br>")
            + f"<code>{_e(_clip(last.line, HTML_LINE_CHARS))}</code>"
        )
    cells = (
        f"<a href=\"{instance_href(instance.address, suffix)}\">{_e(instance.address)}</a>",
        _e(instance.kernel_release),
        _e(_when(instance.last_seen, now)),
        _e(iso(instance.first_seen)),
    )
    numbers = (instance.lines, instance.bytes, instance.lines_pushed_out, instance.lost_messages)
    return (
        "<tr>" + "".join(f"<td>{c}</td>" for c in cells)
        + "".join(f'<td class="n">{n}</td>' for n in numbers)
        + f"<td>{sysinfo}</td><td>{incident}</td></tr>\n"
    )


def status_page(snapshot: Snapshot, started_at: float, max_rows: int = MAX_ROWS,
                suffix: str = "") -> str:
    """The /status page: plain tables, readable in lynx or w3m; `suffix` (``?token=...``) is
    carried by its links to the other pages that show log text."""
    now, listening, delivery = snapshot.now, snapshot.listening, snapshot.delivery
    version = _e(snapshot.version)
    out = [
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>tempesta-ts {version} status</title><style>{_STYLE}</style></head>",
        f"<body>\n<h1>tempesta-ts {version}</h1>\n<table>\n",
        _rows([
            ("Listening", f"{_e(listening.where)} ({'up' if listening.healthy else 'DOWN'})"),
            ("Mode", _e(describe_mode(snapshot.mode))),
            ("Started", _e(_when(started_at, now))),
            ("Now", _e(iso(now))),
            ("Degraded", "; ".join(
                f"{_e(d['what'])}: {_e(d['why'])} (since {_e(d['since'])})"
                for d in degraded_status(snapshot)) or "no"),
        ]),
        "</table>\n<h2>Reports</h2>\n<table>\n",
        _rows([
            ("Settling", _e(delivery.settling)),
            ("Pending in the spool", _e(delivery.pending)),
            ("Spool bytes", f"{_e(delivery.bytes)} of {_e(delivery.max_bytes)}"),
            ("Oldest pending", _e(_when(delivery.oldest, now))),
            ("In flight", _e(delivery.in_flight)),
            ("Held in memory (the disk refuses them)", _e(delivery.held)),
            ("Last error", _e(delivery.last_error)),
            ("Recent reports", f"<a href=\"{_e('/reports' + suffix)}\">/reports</a>"),
        ]),
        "</table>\n",
    ]
    total = len(snapshot.instances)
    rows = heapq.nlargest(max_rows, snapshot.instances, key=lambda i: i.last_seen)
    out.append(f"<h2>Instances ({total})</h2>\n")
    if total > len(rows):
        out.append(
            f"<p>The {len(rows)} most recently seen are shown; {total - len(rows)} more are not. "
            "<a href=\"/status.json\">/status.json</a> lists them all.</p>\n"
        )
    elif total:
        out.append("<p>Most recently seen first.</p>\n")
    else:
        out.append("<p>No instance has sent anything yet.</p>\n")
    if rows:
        out.append("<table>\n" + _INSTANCE_HEADER)
        out.extend(_instance_row(instance, now, suffix) for instance in rows)
        out.append("</table>\n")
    out.append("<h2>Counters</h2>\n<table>\n")
    out.append("".join(
        f'<tr><th>{_e(k)}</th><td class="n">{_e(v)}</td></tr>\n'
        for k, v in snapshot.counters.items()
    ))
    out.append(
        f"</table>\n<p><a href=\"{_e('/status.json' + suffix)}\">/status.json</a> "
        f"<a href=\"{_e('/reports' + suffix)}\">/reports</a> "
        "<a href=\"/metrics\">/metrics</a> <a href=\"/healthz\">/healthz</a></p>\n"
        "</body></html>\n"
    )
    return "".join(out)



class MetricsResource(resource.Resource):
    """Prometheus exposition of a registry, rendered synchronously."""

    isLeaf = True

    def __init__(self, registry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request) -> bytes:
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        body = encoder(self.registry)
        request.setResponseCode(200)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return body


class StatusResource(resource.Resource):
    """/status (HTML) or /status.json (everything the page shows and every instance)."""

    isLeaf = True

    def __init__(self, web: WebService, as_json: bool) -> None:
        super().__init__()
        self.web = web
        self.as_json = as_json

    @guarded
    def render_GET(self, request) -> bytes:
        """The page or the document (they show incident lines: loopback or the token)."""
        snapshot = self.web.snapshot()
        if self.as_json:
            # spool_dir/sent/ is read here, not in the snapshot: /metrics never reads it.
            sent = self.web.detail.sent() if self.web.detail is not None else None
            document = status_document(snapshot, self.web.started_at, sent)
            return _respond(request, "application/json", json.dumps(document) + "\n")
        page = status_page(snapshot, self.web.started_at, suffix=link_suffix(request))
        return _respond(request, "text/html; charset=utf-8", page)


class HealthResource(resource.Resource):
    """/healthz: 200 while both listeners are up, 503 otherwise."""

    isLeaf = True

    def __init__(self, listening: Callable[[], Listening]) -> None:
        super().__init__()
        self.listening = listening

    def render_GET(self, request) -> bytes:
        listening = self.listening()
        if listening.healthy:
            return _respond(request, "text/plain; charset=utf-8", "ok\n")
        reason = "stopping" if not listening.running else "not listening"
        return _respond(request, "text/plain; charset=utf-8", f"{reason}\n", code=503)


class IndexResource(resource.Resource):
    """/: links to the others."""

    isLeaf = True

    def render_GET(self, request) -> bytes:
        page = (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>tempesta-ts {_e(__version__)}</title></head><body>\n"
            f"<h1>tempesta-ts {_e(__version__)}</h1>\n<ul>\n"
            "<li><a href=\"/status\">/status</a>: instances, incidents, reports</li>\n"
            "<li><a href=\"/status.json\">/status.json</a>: the same, all instances, JSON</li>\n"
            "<li><a href=\"/reports\">/reports</a>: the reports made lately, where each stands, "
            "and those delivered and kept</li>\n"
            "<li><a href=\"/metrics\">/metrics</a>: Prometheus metrics</li>\n"
            "<li><a href=\"/healthz\">/healthz</a>: 200 while listening</li>\n"
            "</ul></body></html>\n"
        )
        return _respond(request, "text/html; charset=utf-8", page)


class QuietSite(server.Site):
    """A Site that writes no access log line: a scrape every 15 s would fill the log."""

    noisy = False

    def log(self, request) -> None:
        pass

    def getResourceFor(self, request):
        # Every answer, /metrics and the error pages (404, 405) too, forbids sniffing and scripts.
        for name, value in _HEADERS.items():
            request.setHeader(name, value)
        return super().getResourceFor(request)


def make_site(web: WebService) -> QuietSite:
    """The site: every page under one root."""
    root = resource.Resource()
    root.putChild(b"", IndexResource())
    root.putChild(b"metrics", MetricsResource(web.registry))
    root.putChild(b"status", StatusResource(web, as_json=False))
    root.putChild(b"status.json", StatusResource(web, as_json=True))
    root.putChild(b"healthz", HealthResource(web.listeners))
    root.putChild(b"instances", InstanceResource(web))
    root.putChild(b"reports", ReportsResource(web))
    site = QuietSite(root, reactor=web.reactor)
    site.displayTracebacks = False
    return site


class WebService(service.Service):
    """Serves the pages on metrics_host:metrics_port, bound before twistd drops privileges."""

    log = get_logger(__name__)

    def __init__(self, reactor, host: str, port: int, snapshot: Callable[[], Snapshot],
                 listeners: Callable[[], Listening], collector: ServerCollector, *,
                 detail: DetailSource | None = None, status_token: str | None = None) -> None:
        self.reactor = reactor
        self.host = host
        #: 0 picks a free port (tests); the configuration's 0 means no WebService at all.
        self.port = port
        #: The server's state now (tempesta_ts/status.py), and its listeners' alone (cheaper).
        self.snapshot = snapshot
        self.listeners = listeners
        self.collector = collector
        #: The operators' pages' reader (an instance's lines, the recent reports).
        self.detail = detail
        #: Lets non-loopback clients read the pages that show log text (page_access.py).
        self.status_token = status_token
        self.registry = make_registry(collector)
        self.started_at = reactor.seconds()
        self.site = make_site(self)
        self.listening = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self.listening is not None:
            return
        try:
            self.listening = self.reactor.listenTCP(
                self.port, self.site, interface=self.host, backlog=16
            )
        except CannotListenError as e:
            why = describe_listen_error(
                "TCP", self.host, self.port, e.socketError,
                host_flag="--metrics-host", port_flag="--metrics-port",
            )
            raise StartupError(f"metrics_port: {why} (0 turns the endpoint off)") from None

    def startService(self) -> None:
        # ``twist`` (unlike twistd) never calls privilegedStartService.
        if self.listening is None:
            self.privilegedStartService()
        self.started_at = self.reactor.seconds()
        super().startService()

    def stopService(self):
        super().stopService()
        port, self.listening = self.listening, None
        return maybeDeferred(port.stopListening) if port is not None else succeed(None)

    @property
    def address(self) -> tuple[str, int]:
        """Host and port really bound."""
        return self.host, self.listening.getHost().port

    @property
    def url(self) -> str:
        """The base URL, as configured (the port as bound once listening)."""
        port = self.listening.getHost().port if self.listening is not None else self.port
        return f"http://{host_port(self.host, port)}"
