"""The incident report: the body of the Support Server interface (docs/support-api.md), v1.

Each incident is described (title, guilty module, frames, fingerprint: `tempesta_ts.titles`)
from its window in the instance's buffer when the report is made, never as lines arrive.
Pure code: everything it needs is passed in.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, Sequence

from tempesta_ts.buffers import Instance
from tempesta_ts.netconsole import LogLine
from tempesta_ts.titles import WINDOW_LINES, Description, describe

VERSION = 1


@dataclass(frozen=True, slots=True)
class Incident:
    """A log line that starts an incident, as detected."""

    kind: str
    line: LogLine
    rule: str
    signature: str
    #: Title, module, frames and fingerprint, once worked out from the incident's window.
    description: Description | None = None


def iso(ts: float | None) -> str | None:
    """Epoch seconds as the contract's UTC time: ``2026-11-23T10:00:05.123Z``."""
    if ts is None:
        return None
    moment = datetime.fromtimestamp(ts, timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def new_report_id() -> str:
    """A unique report id, stable across retries of that report (uuid4 hex)."""
    return uuid.uuid4().hex


def report_id_for(address: str, trigger: LogLine) -> str:
    """The id of the report an incident line starts: the same on every collector that received
    the line (docs/support-api.md, "Report ids"), random when the line has neither a kernel time
    nor a sequence number to tell it from the same text logged again."""
    if trigger.kernel_time_us is None and trigger.seq is None:
        return new_report_id()
    numbers = ("" if n is None else str(n) for n in (trigger.kernel_time_us, trigger.seq))
    material = "\n".join((address, *numbers, trigger.text))
    return hashlib.sha256(material.encode("utf-8", "backslashreplace")).hexdigest()[:32]


def _key(line: LogLine) -> tuple:
    # What a line keeps in the buffer (its dictionary and completeness are not kept).
    return line.received_at, line.text, line.seq, line.kernel_time_us


def describe_incidents(incidents: Sequence[Incident], lines: Sequence[LogLine]) -> list[Incident]:
    """The incidents with their descriptions, each from its window in the instance's buffer
    (`lines`, as read): its line and up to WINDOW_LINES - 1 lines after it, or only its own
    line when the buffer no longer has it. Incidents already described are kept as they are.
    """
    if all(incident.description is not None for incident in incidents):
        return list(incidents)
    first: dict[tuple, int] = {}
    wanted = {_key(incident.line) for incident in incidents}
    for n, line in enumerate(lines):
        key = _key(line)
        if key in wanted and key not in first:
            first[key] = n
    described = []
    for incident in incidents:
        if incident.description is None:
            start = first.get(_key(incident.line))
            if start is None:
                window = [incident.line.text]
            else:
                window = [line.text for line in lines[start : start + WINDOW_LINES]]
            incident = replace(incident, description=describe(incident.kind, window))
        described.append(incident)
    return described


def _incident_entry(incident: Incident, iso=iso) -> dict[str, Any]:
    description = incident.description
    return {
        "kind": incident.kind,
        "title": description.title,
        "module": description.module,
        "fingerprint": description.fingerprint,
        "frames": [frame.as_dict() for frame in description.frames],
        "line": incident.line.text,
        "received_at": iso(incident.line.received_at),
        "seq": incident.line.seq,
        "kernel_time_us": incident.line.kernel_time_us,
    }


def _log_entry(line: LogLine, iso=iso) -> dict[str, Any]:
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
    wall_offset: float = 0.0,
    trigger: LogLine | None = None,
) -> dict[str, Any]:
    """The report body for an instance: its whole buffer now, what was detected, its system info.

    ``wall_offset`` turns the times of the server's (monotonic) clock into wall time. The id,
    unless given, comes from the line that opened the report (`trigger`, by default the first
    incident's): `report_id_for`."""
    def at(ts: float | None) -> str | None:
        return iso(None if ts is None else ts + wall_offset)

    info = instance.system_info
    lines = list(instance.buffer)
    incidents = describe_incidents(incidents, lines)
    if report_id is None:
        if trigger is None and incidents:
            trigger = incidents[0].line
        report_id = new_report_id() if trigger is None else report_id_for(instance.address, trigger)
    return {
        "version": VERSION,
        "report_id": report_id,
        "client_id": client_id,
        "created_at": at(now),
        "collector": {"hostname": hostname, "version": version},
        "instance": {
            "address": instance.address,
            "kernel_release": instance.kernel_release,
            "first_seen": at(instance.first_seen),
            "last_seen": at(instance.last_seen),
        },
        "incidents": [_incident_entry(incident, at) for incident in incidents],
        "suppressed_incidents": suppressed,
        "log": [_log_entry(line, at) for line in lines],
        "log_dropped_lines": instance.buffer.dropped,
        "lost_messages": instance.lost_messages,
        "system_info": (
            {"received_at": at(info.received_at), "text": info.text} if info is not None else None
        ),
    }
