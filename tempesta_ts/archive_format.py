"""The archive's files: their names, and one text line per kernel log line, written and read back.

A line is the receive time in UTC (ISO 8601, microseconds), a space, then the line in one of
netconsole's two forms, as the kernel sends it:

    2026-11-23T10:00:05.123456Z 4,1234,87654321,-;WARNING: CPU: 0 PID: 10 at fw/tls.c:294 ...
    2026-11-23T10:00:05.123456Z [   87.654321] WARNING: CPU: 0 PID: 10 at fw/tls.c:294 ...

the extended form ``<level>,<seq>,<kernel time in µs>,<flags>;<text>`` (that of /dev/kmsg;
the kernel's release may come first) and the console form ``[<l>][<seconds>.<µs>] <text>``
(``<level>`` first when the console sent it; either part left out when unknown). A datagram
that held one whole printable line is written as it came, with no work for each line; other
lines (fragments put together, several lines in one datagram, a dictionary, text with control
characters or a backslash) are written in the same forms, their text escaped as the server's
log escapes it (`tempesta_ts.log.escape`). Pure code: no Twisted, no disk.
"""

from __future__ import annotations

import calendar
import ipaddress
import os
import re
import time

from tempesta_ts.log import escape
from tempesta_ts.netconsole import Decoder, LogLine, unpack_record

#: The current file of an instance: ``<name>.log``; a rotated generation adds ``.<stamp>``,
#: and ``.gz`` once compressed; ``.tmp`` ends a compression under way.
SUFFIX = ".log"
_FILE = re.compile(
    r"(?P<name>[0-9A-Za-z._-]{1,200})\.log"
    r"(?:\.(?P<stamp>\d{8}T\d{6}\.\d{6}Z)(?P<gz>\.gz(?P<tmp>\.tmp)?)?)?\Z"
)
_SAFE = re.compile(r"[^0-9A-Za-z.]")
_NAME_ESCAPE = re.compile(r"_([0-9a-f]{2})|-")
_STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z\Z")
_TEXT_ESCAPE = re.compile(r"\\(?:([\\nrt])|x([0-9a-f]{2})|u([0-9a-f]{4})|U([0-9a-f]{8}))")
_NAMED = {"\\": "\\", "n": "\n", "r": "\r", "t": "\t"}
# The two forms, as netconsole.Decoder tells them apart in a datagram of one line.
_EXTENDED = re.compile(r"(\d{1,3}),(\d{1,19}),(\d{1,19}),[-c+](?:,caller=[TC]\d{1,10})?;", re.ASCII)
_COMMON_LINE = re.compile(
    r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{6})Z "
    r"(\d{1,3}),(\d{1,19}),(\d{1,19}),[-c+](?:,caller=[TC]\d{1,10})?;",
    re.ASCII,
)
_CONSOLE = re.compile(r"(?:<(\d{1,3})>)?(?:\[\s*(\d{1,10})\.(\d{6})\] ?)?", re.ASCII)
_MAX_RELEASE = 128


def file_name(address: str) -> str:
    """The name of an instance's files: its address, an IPv6 address with ``-`` for each ``:``
    (``2001:db8::1`` is ``2001-db8--1``); any other character but letters, digits and ``.``
    (a scope's ``%``, say) as ``_`` and two hex digits, so that a name gives back its address."""
    return _SAFE.sub(_escape_char, address)


def _escape_char(match: re.Match) -> str:
    char = match.group()
    return "-" if char == ":" else "".join(f"_{b:02x}" for b in char.encode("utf-8"))


def address_of(name: str) -> str:
    """The address whose files are named `name` (the reverse of `file_name`)."""
    if "_" not in name:
        return name.replace("-", ":")
    raw = _NAME_ESCAPE.sub(lambda m: ":" if m.group() == "-" else f"\x00{m.group(1)}", name)
    # Escaped bytes may make one UTF-8 character together.
    pieces = raw.split("\x00")
    out = bytearray(pieces[0].encode("utf-8"))
    for piece in pieces[1:]:
        out.append(int(piece[:2], 16))
        out += piece[2:].encode("utf-8")
    return out.decode("utf-8", "replace")


def parse_file_name(file: str) -> tuple[str, str | None, bool, bool] | None:
    """(name, stamp or None for the current file, compressed, a compression's temporary file)
    of an archive file's name; None for any other name."""
    m = _FILE.match(file)
    if m is None:
        return None
    return m["name"], m["stamp"], m["gz"] is not None, m["tmp"] is not None


def generation_stamp(when: float) -> str:
    """A rotated generation's stamp, ``20261123T100005.123456Z``: sorts as time does."""
    seconds, micros = divmod(int(round(when * 1_000_000)), 1_000_000)
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(seconds)) + f".{micros:06d}Z"


def receive_stamp(when: float) -> str:
    """An archive line's receive time, ``2026-11-23T10:00:05.123456Z``."""
    seconds, micros = divmod(int(round(when * 1_000_000)), 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(seconds)) + f"{micros:06d}Z"


class Stamps:
    """Receive times as archive line prefixes, remembered: the datagrams of one read share one
    receive time, spread over many instances."""

    def __init__(self) -> None:
        #: Receive time -> its prefix.
        self.known: dict[float, bytes] = {}
        self._second = -1
        self._date = b""

    def prefix(self, when: float) -> bytes:
        """``2026-11-23T10:00:05.123456Z `` (with its space)."""
        known = self.known.get(when)
        if known is None:
            if len(self.known) >= 4096:
                self.known.clear()
            seconds, micros = divmod(int(round(when * 1_000_000)), 1_000_000)
            if seconds != self._second:
                # strftime once a second, not once a read.
                self._second = seconds
                self._date = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(seconds)).encode()
            known = self.known[when] = self._date + b"%06dZ " % micros
        return known


def format_datagram(received_at: float, datagram: bytes) -> bytes:
    """The archive line of a datagram of one line that cannot go as it came (control bytes)."""
    record = Decoder().record(datagram, received_at)
    if not record:
        # Not a line of one datagram after all: its bytes, escaped, as a console line.
        text = datagram.rstrip(b"\r\n").decode("utf-8", "backslashreplace")
        return format_line(LogLine(received_at, text))
    return format_line(unpack_record(record)[0])


def format_line(line: LogLine) -> bytes:
    """The archive line of a line the server made (fragments put together, a line of several
    in a datagram, one with a dictionary)."""
    text = escape(line.text)
    stamp = receive_stamp(line.received_at)
    if line.seq is not None and line.kernel_time_us is not None:
        level = 6 if line.level is None else line.level
        out = f"{stamp} {level},{line.seq},{line.kernel_time_us},-;{text}\n"
    else:
        prefix = "" if line.level is None else f"<{line.level}>"
        if line.kernel_time_us is not None:
            prefix += "[%5d.%06d] " % divmod(line.kernel_time_us, 1_000_000)
        elif not prefix and _looks_like_a_prefix(text):
            # Read back, the text would be taken for a level, a time stamp or a header.
            text = f"\\x{ord(text[0]):02x}{text[1:]}"
        out = f"{stamp} {prefix}{text}\n"
    return out.encode("utf-8", "backslashreplace")


def _looks_like_a_prefix(text: str) -> bool:
    return bool(text) and (
        _CONSOLE.match(text).end() > 0 or _extended_header(text) is not None
    )


def _extended_header(payload: str) -> re.Match | None:
    m = _EXTENDED.match(payload)
    if m is None and payload[:1] != "[":
        # The kernel's release may come first (netconsole's "r" option).
        comma = payload.find(",", 1, _MAX_RELEASE + 1)
        if comma > 0 and ";" not in payload[:comma] and not payload[:comma].isdigit():
            m = _EXTENDED.match(payload, comma + 1)
    return m


def parse_received(stamp: str, cache: dict[str, int]) -> float | None:
    """Epoch seconds of an archive line's receive time; None when it is not one. `cache` holds
    the seconds of the dates seen (one strptime each)."""
    if len(stamp) != 27 or _STAMP.match(stamp) is None:
        return None
    head = stamp[:19]
    seconds = cache.get(head)
    if seconds is None:
        try:
            seconds = calendar.timegm(time.strptime(head, "%Y-%m-%dT%H:%M:%S"))
        except ValueError:
            return None
        if len(cache) > 4096:
            cache.clear()
        cache[head] = seconds
    return seconds + int(stamp[20:26]) / 1_000_000


def parse_line(raw: str, cache: dict[str, int]) -> LogLine | None:
    """The line an archive line was written from (without its dictionary); None when it is not
    an archive line (cut by a crash, or not written by the server)."""
    m = _COMMON_LINE.match(raw)
    if m is not None:
        # The common line, an extended one as it came, in one match.
        seconds = cache.get(m[1])
        if seconds is not None:
            text = raw[m.end() :]
            return LogLine(seconds + int(m[2]) / 1_000_000,
                           unescape(text) if "\\" in text else text,
                           int(m[3]) & 7, int(m[4]), int(m[5]))
    stamp, space, payload = raw.partition(" ")
    if not space:
        return None
    received = parse_received(stamp, cache)
    if received is None:
        return None
    m = _extended_header(payload)
    if m is not None:
        return LogLine(received, unescape(payload[m.end() :]), int(m[1]) & 7, int(m[2]), int(m[3]))
    m = _CONSOLE.match(payload)
    level = None if m[1] is None else int(m[1]) & 7
    kernel = None if m[2] is None else int(m[2]) * 1_000_000 + int(m[3])
    return LogLine(received, unescape(payload[m.end() :]), level, None, kernel)


def unescape(text: str) -> str:
    """The text `tempesta_ts.log.escape` was given."""
    if "\\" not in text:
        return text
    return _TEXT_ESCAPE.sub(_unescaped, text)


def _unescaped(match: re.Match) -> str:
    named, byte, short, long = match.groups()
    if named is not None:
        return _NAMED[named]
    code = int(byte or short or long, 16)
    return chr(code) if code <= 0x10FFFF else match.group()


def archive_directory(config) -> str | None:
    """Where the archive is: archive_dir; by default spool_dir/archive; None when turned off."""
    if config.archive_dir is None:
        return os.path.join(config.spool_dir, "archive")
    return config.archive_dir or None


def is_address(address: str) -> bool:
    """Whether a string is a source address (with its scope, if any)."""
    try:
        ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return False
    return True


def is_address_name(address: str, name: str) -> bool:
    """Whether a file's name is that of a source address (not a file put there by hand)."""
    return is_address(address) and file_name(address) == name
