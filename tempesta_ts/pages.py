"""The operators' pages: /instances/{address} (the latest lines, incidents marked, system
information, reports), /reports (with those kept in spool_dir/sent/) and /reports/{id}.json,
and the rule that guards every page showing log text (tempesta_ts/page_access.py).

Rendered synchronously from `DetailSource` (tempesta_ts/detail.py) at request time. Kernel
lines and documents come from the wire: everything is escaped (webparts.wire), and the
Content-Security-Policy forbids scripts all the same.
"""

from __future__ import annotations

import json
from typing import Sequence
from urllib.parse import quote

from twisted.web import resource

from tempesta_ts.detail import InstanceDetail, ReportRow, SentRows
from tempesta_ts.page_access import may_read
from tempesta_ts.report import iso
from tempesta_ts.webparts import STYLE, ago, e, respond, size, when, wire

#: A JSON document this large or smaller is parsed to be shown indented; larger ones (and any
#: that does not parse) are shown as they came.
PRETTY_MAX_CHARS = 1024 * 1024
#: Characters of system information shown on an instance's page.
SHOWN_MAX_CHARS = 4 * 1024 * 1024
#: Characters of a last error in a table.
ERROR_CHARS = 300

_PAGE_STYLE = STYLE + "tr.i td{background:#fdd}td.t{font-weight:bold}pre{white-space:pre-wrap}"
_STATES = {"written": "written locally"}
HTML = "text/html; charset=utf-8"



def _query_token(request) -> bytes | None:
    values = request.args.get(b"token") if request.args else None
    return values[0] if values else None


def refused(request, token: str | None) -> bytes | None:
    """The 403 answer for a request that may not read log text, or None when it may."""
    peer = request.getClientAddress()
    host = getattr(peer, "host", None)
    if may_read(host, token, request.getHeader(b"authorization"), _query_token(request)):
        return None
    why = (
        "this page shows kernel log text; it answers loopback clients, and others that give "
        "the status token (Authorization: Bearer TOKEN or ?token=TOKEN)"
        if token else
        "this page shows kernel log text; it answers loopback clients only, as no "
        "status_token is set"
    )
    return respond(request, "text/plain; charset=utf-8", f"403 Forbidden: {why}\n", code=403)


def guarded(render):
    """A render method that answers 403 to whom may not read log text (`refused`)."""

    def render_guarded(self, request) -> bytes:
        answer = refused(request, self.web.status_token)
        return answer if answer is not None else render(self, request)

    render_guarded.__name__ = render.__name__
    render_guarded.__doc__ = render.__doc__
    return render_guarded


def link_suffix(request) -> str:
    """``?token=...`` for the links of a page asked for with ?token= (the next page needs it
    too); empty otherwise."""
    token = _query_token(request)
    return "" if not token else "?token=" + quote(token.decode("latin-1"), safe="")


def instance_href(address: str, suffix: str = "") -> str:
    """The link to an instance's page, escaped for an attribute."""
    return e("/instances/" + quote(address, safe=":") + suffix)


def _report_href(report_id: str, suffix: str) -> str:
    return e("/reports/" + quote(report_id, safe="") + ".json" + suffix)



def _head(title: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{e(title)}</title><style>{_PAGE_STYLE}</style></head>\n<body>\n"
    )


def _foot(suffix: str) -> str:
    return (
        f"<p><a href=\"{e('/status' + suffix)}\">/status</a> "
        f"<a href=\"{e('/reports' + suffix)}\">/reports</a> "
        "<a href=\"/metrics\">/metrics</a></p>\n</body></html>\n"
    )


def _report_table(rows: Sequence[ReportRow], now: float, suffix: str,
                  with_instance: bool = True) -> str:
    if not rows:
        return "<p>No report made since the server started.</p>\n"
    head = ("<th>Instance</th>" if with_instance else "") + (
        "<th>Made</th><th>Incidents</th><th>State</th><th>Size</th><th>Attempts</th>"
        "<th>Last error</th><th>Report</th>"
    )
    out = [f"<table>\n<tr>{head}</tr>\n"]
    for row in rows:
        error = row.last_error
        if error is not None and len(error) > ERROR_CHARS:
            error = error[:ERROR_CHARS] + "…"
        if row.report_id is None:
            body = "—"
        elif row.body_held:
            body = f"<a href=\"{_report_href(row.report_id, suffix)}\">{e(row.report_id)}</a>"
        else:
            body = f"{e(row.report_id)} (no longer held)"
        instance = (
            f"<td><a href=\"{instance_href(row.instance, suffix)}\">{e(row.instance)}</a></td>"
            if with_instance else ""
        )
        out.append(
            f"<tr>{instance}<td title=\"{e(iso(row.made_at))}\">{e(ago(row.made_at, now))}</td>"
            f"<td>{'<br>'.join(wire(t) for t in row.titles) or '—'}</td>"
            f"<td>{e(_STATES.get(row.state, row.state))}</td>"
            f"<td class=\"n\">{e(size(row.size))}</td><td class=\"n\">{e(row.attempts)}</td>"
            f"<td>{'—' if error is None else wire(error)}</td><td>{body}</td></tr>\n"
        )
    out.append("</table>\n")
    return "".join(out)


def _sent_table(sent: SentRows | None, now: float, suffix: str) -> str:
    if sent is None:
        return ("<p>Delivered reports are not kept (stand-alone, or sent_keep_days is 0).</p>\n")
    if not sent.total:
        return "<p>None is kept in spool_dir/sent/.</p>\n"
    shown = len(sent.reports)
    out = [f"<p>{sent.total:,} kept in spool_dir/sent/ ({e(size(sent.bytes))}), "
           "the most recently delivered first"]
    if sent.total > shown:
        out.append(f"; the {shown:,} newest are shown, {sent.total - shown:,} more are not "
                   "(ls spool_dir/sent/)")
    out.append(".</p>\n<table>\n<tr><th>Delivered (UTC)</th><th>Report</th><th>Size</th></tr>\n")
    for report in sent.reports:
        delivered = report.delivered or report.created
        out.append(
            f"<tr><td>{e(when(delivered, now))}</td>"
            f"<td><a href=\"{_report_href(report.report_id, suffix)}\">{e(report.report_id)}</a>"
            f"</td><td class=\"n\">{e(size(report.size))}</td></tr>\n"
        )
    out.append("</table>\n")
    return "".join(out)


def reports_page(rows: Sequence[ReportRow], now: float, suffix: str = "",
                 sent: SentRows | None = None) -> str:
    """/reports: incidents settling, then the reports made lately, the newest first; then the
    reports delivered and kept in spool_dir/sent/."""
    return (
        _head("tempesta-ts reports") + "<h1>Reports</h1>\n"
        "<p>Incidents settling, then the reports made since the server started (the latest "
        "1,000), the newest first. A report's JSON is what was handed over to be sent, after "
        "report_redactions and report_exclude_patterns.</p>\n"
        + _report_table(rows, now, suffix)
        + "<h2>Sent</h2>\n" + _sent_table(sent, now, suffix) + _foot(suffix)
    )


def system_info_text(text: str, format: str) -> tuple[str, bool]:
    """A document as shown: indented when it is JSON small enough to parse, else as it came;
    and whether it was indented."""
    if format == "json" and len(text) <= PRETTY_MAX_CHARS:
        try:
            return json.dumps(json.loads(text), indent=2, ensure_ascii=False), True
        except (ValueError, RecursionError):
            pass  # shown as it came: a document is never trusted to parse
    return text, False


def _system_info(detail: InstanceDetail) -> str:
    info = detail.system_info
    if info is None:
        return "<p>No system information received.</p>\n"
    out = [f"<p>Received {e(when(info.received_at, detail.now))}, {e(size(info.size))}"]
    if info.text is None:
        out.append(" (kept only in system_info_dir; it goes into the next report).</p>\n")
        return "".join(out)
    text, indented = system_info_text(info.text, info.format)
    out.append(", JSON, indented.</p>\n" if indented else f", {e(info.format)}.</p>\n")
    if len(text) > SHOWN_MAX_CHARS:
        out.append(f"<p>The first {SHOWN_MAX_CHARS:,} characters are shown.</p>\n")
        text = text[:SHOWN_MAX_CHARS]
    out.append(f"<pre>{wire_lines(text)}</pre>\n")
    return "".join(out)


def wire_lines(text: str) -> str:
    """A multi-line text from the wire, each line escaped, the line breaks kept."""
    return "\n".join(wire(line) for line in text.split("\n"))


def instance_page(detail: InstanceDetail, suffix: str = "") -> str:
    """/instances/{address}: the latest lines (incidents marked), system information, reports."""
    status, now = detail.status, detail.now
    address = status.address
    out = [
        _head(f"tempesta-ts {address}"),
        f"<h1>Instance {e(address)}</h1>\n<table>\n",
        "".join(f"<tr><th>{e(k)}</th><td>{v}</td></tr>\n" for k, v in (
            ("Kernel", e(status.kernel_release)),
            ("Last seen", e(when(status.last_seen, now))),
            ("First seen", e(when(status.first_seen, now))),
            ("Lines held", f"{status.lines:,} ({e(size(status.bytes))})"),
            ("Lines pushed out", f"{status.lines_pushed_out:,}"),
            ("Messages lost", f"{status.lost_messages:,}"),
        )),
        "</table>\n<h2>Reports</h2>\n",
        _report_table(detail.reports, now, suffix, with_instance=False),
        "<h2>System information</h2>\n",
        _system_info(detail),
    ]
    shown, incidents = len(detail.lines), sum(1 for line in detail.lines if line.incident)
    out.append(
        f"<h2>Log</h2>\n<p>The latest {shown:,} of {status.lines:,} lines held, oldest first; "
        f"{incidents} incident line{'s' if incidents != 1 else ''} marked.</p>\n"
    )
    if detail.lines:
        out.append("<table>\n<tr><th>Received (UTC)</th><th>Level</th><th>Incident</th>"
                   "<th>Line</th></tr>\n")
        for line in detail.lines:
            mark = line.incident
            out.append(
                ("<tr class=\"i\">" if mark else "<tr>")
                + f"<td>{e(iso(line.received_at)[11:])}</td><td class=\"n\">{e(line.level)}</td>"
                + (f"<td class=\"t\">{wire(mark)}</td>" if mark else "<td></td>")
                + f"<td><code>{wire(line.text)}</code></td></tr>\n"
            )
        out.append("</table>\n")
    out.append(_foot(suffix))
    return "".join(out)



class _Page(resource.Resource):
    """A page that reads the web service's detail source; the rest of its path is its own."""

    isLeaf = True

    def __init__(self, web) -> None:
        super().__init__()
        self.web = web


class InstanceResource(_Page):
    """/instances/{address}."""

    @guarded
    def render_GET(self, request) -> bytes:
        """An instance's page; 404 for an address no instance has."""
        path = [p for p in request.postpath if p]
        if len(path) != 1 or self.web.detail is None:
            return _not_found(request, "/instances/ADDRESS: an instance's address, as /status "
                                       "lists it")
        address = path[0].decode("utf-8", "replace")
        detail = self.web.detail.instance(address)
        if detail is None:
            return _not_found(request, "no instance is held at that address (it may have been "
                                       "dropped by max_instances)")
        return respond(request, HTML, instance_page(detail, link_suffix(request)))


class ReportsResource(_Page):
    """/reports and /reports/{id}.json."""

    @guarded
    def render_GET(self, request) -> bytes:
        """The list, or one report's JSON as it was handed over."""
        detail = self.web.detail
        path = [p for p in request.postpath if p]
        if not path and detail is not None:
            rows, sent = detail.reports()
            page = reports_page(rows, self.web.reactor.seconds(), link_suffix(request), sent)
            return respond(request, HTML, page)
        if detail is None or len(path) != 1 or not path[0].endswith(b".json"):
            return _not_found(request, "/reports lists the reports; /reports/ID.json is one")
        body = detail.report_json(path[0][: -len(b".json")].decode("utf-8", "replace"))
        if body is None:
            return _not_found(request, "no such report is held (the latest reports are kept "
                                       "in memory while the server runs, the delivered ones in "
                                       "spool_dir/sent/ for sent_keep_days)")
        return respond(request, "application/json", body)


def _not_found(request, why: str) -> bytes:
    return respond(request, "text/plain; charset=utf-8", f"404 Not Found: {why}\n", code=404)
