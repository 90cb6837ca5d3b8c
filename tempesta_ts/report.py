"""The incident report: the body of the Support Server interface (docs/support-api.md), v1.

Pure code: everything it needs is passed in.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Sequence

from tempesta_ts.buffers import Instance
from tempesta_ts.netconsole import LogLine

VERSION = 1


@dataclass(frozen=True, slots=True)
class Incident:
    """A log line that starts an incident, as detected."""

    kind: str
    line: LogLine
    rule: str
    signature: str


def iso(ts: float | None) -> str | None:
    """Epoch seconds as the contract's UTC time: ``2026-11-23T10:00:05.123Z``."""
    if ts is None:
        return None
    moment = datetime.fromtimestamp(ts, timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def new_report_id() -> str:
    """A unique report id, stable across retries of that report (uuid4 hex)."""
    return uuid.uuid4().hex


def _log_entry(line: LogLine) -> dict[str, Any]:
    return {
        "received_at": iso(line.received_at),
        "text": line.text,
        "level": line.level,
        "seq": line.seq,
        "kernel_time_us": line.kernel_time_us,
    }


def build_report(
    *,
    instance: Instance,
    incidents: Sequence[Incident],
    suppressed: int,
    client_id: str | None,
    hostname: str,
    version: str,
    now: float,
    report_id: str | None = None,
) -> dict[str, Any]:
    """The report body for an instance: its whole buffer now, what was detected, its system info."""
    info = instance.system_info
    return {
        "version": VERSION,
        "report_id": report_id or new_report_id(),
        "client_id": client_id,
        "created_at": iso(now),
        "collector": {"hostname": hostname, "version": version},
        "instance": {
            "address": instance.address,
            "kernel_release": instance.kernel_release,
            "first_seen": iso(instance.first_seen),
            "last_seen": iso(instance.last_seen),
        },
        "incidents": [
            {
                "kind": incident.kind,
                "line": incident.line.text,
                "received_at": iso(incident.line.received_at),
                "seq": incident.line.seq,
                "kernel_time_us": incident.line.kernel_time_us,
            }
            for incident in incidents
        ],
        "suppressed_incidents": suppressed,
        "log": [_log_entry(line) for line in instance.buffer],
        "log_dropped_lines": instance.buffer.dropped,
        "lost_messages": instance.lost_messages,
        "system_info": (
            {"received_at": iso(info.received_at), "text": info.text} if info is not None else None
        ),
    }
