"""The spool's files: the body a report is written as, the names of its files, the durable write
and the check that a file read back at start is the report its name says.

Pure file code: no Twisted, no state (tempesta_ts/spool.py keeps the spool).
"""

from __future__ import annotations

import calendar
import json
import os
import re
import tempfile
import time
from typing import Mapping

# report_id becomes part of a file name and a header value: keep it to safe characters.
_REPORT_ID = re.compile(r"[A-Za-z0-9_-]{1,128}\Z")
_NAME = re.compile(r"(\d{8}T\d{6})\.(\d{6})Z-([A-Za-z0-9_-]{1,128})\.json\Z")


def valid_report_id(report_id) -> bool:
    """Whether a report id is 1 to 128 of [A-Za-z0-9_-]: safe in a file name and a header."""
    return isinstance(report_id, str) and _REPORT_ID.match(report_id) is not None


def encode_report(report: Mapping) -> bytes:
    """The request body: the report as JSON, UTF-8; raises ValueError on a bad report_id."""
    report_id = report.get("report_id")
    if not valid_report_id(report_id):
        raise ValueError(f"report_id {report_id!r} is not 1 to 128 of [A-Za-z0-9_-]")
    return json.dumps(report, ensure_ascii=False, allow_nan=False).encode("utf-8")


def file_name(created: float, report_id: str) -> str:
    """``20261123T100005.123456Z-<report_id>.json``: sorts by time, readable, no colons."""
    seconds, micros = divmod(int(round(created * 1_000_000)), 1_000_000)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(seconds))
    return f"{stamp}.{micros:06d}Z-{report_id}.json"


def parse_file_name(name: str) -> tuple[float, str] | None:
    """(created, report_id) from a spool file name, or None when it is not one."""
    match = _NAME.match(name)
    if match is None:
        return None
    stamp, micros, report_id = match.groups()
    try:
        seconds = calendar.timegm(time.strptime(stamp, "%Y%m%dT%H%M%S"))
    except ValueError:
        return None
    return seconds + int(micros) / 1_000_000, report_id


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(directory: str, tmp_dir: str, name: str, data: bytes) -> str:
    """Write data as directory/name atomically and durably: temp file, fsync, rename, fsync dir.

    Raises OSError and leaves nothing behind: neither the temporary file nor, when the
    directory cannot be synced, a file in place that a retry under the same name would replace.
    """
    path = os.path.join(directory, name)
    # Reports quote kernel logs: readable by the server's user only (mkstemp: 0600). A name
    # nobody can guess, created exclusively: a link planted in tmp/ is never written through.
    fd, tmp_path = tempfile.mkstemp(prefix=name + ".", suffix=".tmp", dir=tmp_dir)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp_path, path)
    except BaseException:
        remove_quietly(tmp_path)
        raise
    try:
        _fsync_directory(directory)
    except OSError:
        remove_quietly(path)
        raise
    return path


def remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def invalid_report(data: bytes, report_id: str) -> str | None:
    """Why the content of a spool file named for `report_id` is not that report, or None."""
    try:
        document = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        return "not UTF-8"
    except (ValueError, RecursionError):
        return "not JSON (truncated?)" if data else "empty"
    if not isinstance(document, dict):
        return "not a JSON object"
    found = document.get("report_id")
    if found != report_id:
        return f"its report_id {repr(found)[:80]} is not the one of its name"
    return None
