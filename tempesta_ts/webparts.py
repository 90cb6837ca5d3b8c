"""What every page of the operator's endpoint shares: the answer's headers, escaping, and
times and sizes in human units ("3 min ago", "1.5 MiB"). Pure but for `respond`, which sets a
request's code and headers."""

from __future__ import annotations

import html
from typing import Any

from tempesta_ts.log import escape
from tempesta_ts.report import iso

HEADERS = {
    b"cache-control": b"no-store",
    b"x-content-type-options": b"nosniff",
    # No script, no external asset: even an escaping bug could not run anything.
    b"content-security-policy": b"default-src 'none'; style-src 'unsafe-inline'",
    b"referrer-policy": b"no-referrer",
}

STYLE = (
    "body{font-family:sans-serif}table{border-collapse:collapse;margin-bottom:1em}"
    "th,td{border:1px solid #aaa;padding:2px 6px;text-align:left;vertical-align:top}"
    "td.n{text-align:right}code{white-space:pre-wrap;word-break:break-all}"
)


def respond(request, content_type: str, body: str | bytes, code: int = 200) -> bytes:
    """Set the code and headers of an answer; its body as bytes."""
    request.setResponseCode(code)
    request.setHeader(b"content-type", content_type.encode("ascii"))
    for name, value in HEADERS.items():
        request.setHeader(name, value)
    return body.encode("utf-8") if isinstance(body, str) else body


def e(value: Any) -> str:
    """A value as HTML text, None as a dash."""
    return html.escape("—" if value is None else str(value), quote=True)


def wire(text: str) -> str:
    """Text from the wire (kernel lines, documents) as HTML: controls, bidi and invisible
    characters shown as escapes (log.escape), then HTML-escaped."""
    return html.escape(escape(text), quote=True)


def duration(seconds: float) -> str:
    """A rough human duration: 42 s, 5 min, 3 h 20 min, 2 d 4 h."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def ago(ts: float | None, now: float) -> str:
    """"3 min ago", or a dash."""
    return "—" if ts is None else f"{duration(now - ts)} ago"


def when(ts: float | None, now: float) -> str:
    """The UTC time and how long ago: ``2026-11-23T10:00:05.123Z (3 min ago)``."""
    return "—" if ts is None else f"{iso(ts)} ({ago(ts, now)})"


def size(n: int | None) -> str:
    """Bytes in human units: 512 B, 4.0 KiB, 1.5 MiB, 2.0 GiB."""
    if n is None:
        return "—"
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
    return f"{n:.1f} GiB"  # pragma: no cover
