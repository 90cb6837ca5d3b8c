"""Netconsole's wire format: plain and extended datagrams, fragment reassembly, sequence gaps.

Linux netconsole (Documentation/networking/netconsole.rst) sends the kernel log over UDP in one
of two formats, recognised here per datagram:

- plain: console text, one or more lines; a line may be cut across datagrams;
- extended (``netconsole=+...``): ``[<release>,]<level>,<seq>,<usec>,<flags>[,k=v...];<text>\\n``
  then dictionary lines `` KEY=VALUE\\n``; messages over about 1000 bytes come in fragments
  that carry ``ncfrag=<offset>/<total>`` in the header.

A `Decoder` holds one instance's state and turns datagrams into complete `LogLine`s. Pure code:
time is passed in, nothing here schedules anything.
"""

from __future__ import annotations

import re
import struct
from collections import Counter, OrderedDict
from typing import NamedTuple

from tempesta_ts.sequence import DUPLICATE_MASK, SequenceTracker

#: A partial plain line is flushed after this much quiet from its instance.
PARTIAL_LINE_SECONDS = 1.0
#: A fragmented message whose fragments have not all come by then is kept incomplete.
FRAGMENT_SECONDS = 5.0
#: Messages being reassembled at once per instance; the oldest is flushed past it.
MAX_PENDING_MESSAGES = 16
#: Largest message body a fragment header may announce. The kernel's is under 75 KiB: the
#: record's text (CONSOLE_EXT_LOG_MAX, 8 KiB with its header), userdata (MAX_USERDATA_ITEMS
#: entries of 256 bytes: 16, or 256 in recent kernels) and sysdata (4 entries of 256 bytes).
MAX_MESSAGE_BYTES = 80 * 1024
#: Bytes held at once per instance for messages being reassembled, each twice as far as its
#: furthest byte received (its bytes, and which of them came); the oldest go past it.
MAX_PENDING_BYTES = 512 * 1024
#: A plain line longer than this without a newline is cut (the kernel's are under 1 KiB).
MAX_LINE_BYTES = 16 * 1024
#: The longest datagram the listener reads (a UDP payload is at most 65,527 bytes).
MAX_DATAGRAM_BYTES = 65_535

# The common datagram's header: level, sequence number, kernel time, flags and
# CONFIG_PRINTK_CALLER's caller id. Netconsole's "r" option puts the kernel release and a comma
# before it (a release is not all digits). Up to 19 digits a number fits the record's 64 bits;
# longer ones take the general path.
_COMMON_HEADER = re.compile(rb"(\d{1,3}),(\d{1,19}),(\d{1,19}),[-c+](?:,caller=[TC]\d{1,10})?;")
#: The longest kernel release the common path looks for before the header.
MAX_RELEASE_BYTES = 128
#: A line as the buffers keep it: its text's length, received_at, seq, kernel_time_us and
#: level, then the text as UTF-8. Records of one instance are kept back to back.
_RECORD = struct.Struct("<IdQQB")
#: Where a record's text starts.
RECORD_TEXT = _RECORD.size
# A field the line does not have (a plain line has no sequence number).
_NO_NUMBER = 2**64 - 1
_NO_LEVEL = 255
_PLAIN_PREFIX = re.compile(rb"(?:<(\d{1,3})>)?(?:\[\s*(\d{1,10})\.(\d{6})\] ?)?")
_INNER_STAMP = re.compile(rb"\[[ \t]*\d+\.\d+\]")
_ESCAPE = re.compile(rb"\\x([0-9a-fA-F]{2})")
_INCOMPLETE_GAP = " [...] "
_CUT_MARKER = " [line of %d bytes cut]"


class LogLine(NamedTuple):
    """One complete kernel log line, with what the format told about it.

    A NamedTuple rather than a frozen dataclass: one is made per line received, and a
    frozen dataclass costs four times as much to create.
    """

    received_at: float
    text: str
    level: int | None = None
    seq: int | None = None
    kernel_time_us: int | None = None
    #: The message's dictionary (``SUBSYSTEM=``, userdata, sysdata such as ``cpu=``).
    fields: tuple[tuple[str, str], ...] = ()
    #: True when some fragments of the message never arrived.
    incomplete: bool = False


def pack_line(line: LogLine) -> bytes:
    """A line as a record (see `unpack_record`); its dictionary and completeness are not kept."""
    text = line.text.encode("utf-8", "backslashreplace")
    return _RECORD.pack(
        len(text), line.received_at, _number(line.seq), _number(line.kernel_time_us),
        _NO_LEVEL if line.level is None else line.level,
    ) + text


def _number(value: int | None) -> int:
    # A number past 64 bits is no kernel's: it is kept as unknown.
    return value if value is not None and 0 <= value < _NO_NUMBER else _NO_NUMBER


def unpack_record(records: bytes, offset: int = 0) -> tuple[LogLine, int]:
    """The line whose record starts at `offset`, and where the next record starts."""
    length, received_at, seq, time_us, level = _RECORD.unpack_from(records, offset)
    start = offset + RECORD_TEXT
    line = LogLine(
        received_at,
        records[start : start + length].decode("utf-8", "backslashreplace"),
        None if level == _NO_LEVEL else level,
        None if seq == _NO_NUMBER else seq,
        None if time_us == _NO_NUMBER else time_us,
    )
    return line, start + length


def record_text_length(records: bytes, offset: int = 0) -> int:
    """The length of the text of the record at `offset`."""
    return _TEXT_LENGTH.unpack_from(records, offset)[0]


_TEXT_LENGTH = struct.Struct("<I")


class ExtendedHeader(NamedTuple):
    """The header of an extended-format datagram."""

    level: int
    seq: int
    time_us: int
    release: str | None = None
    frag_offset: int | None = None
    frag_total: int | None = None


class Malformed(ValueError):
    """A datagram claims the extended format but breaks its rules."""


def parse_extended_header(data: bytes) -> tuple[ExtendedHeader, bytes] | None:
    """Split an extended datagram into header and body; None when it is not extended format.

    Raises Malformed for a header that is extended format but impossible (a bad fragment).
    """
    end = data.find(b";", 0, 256)
    if end < 7:
        return None
    parts = data[:end].split(b",")
    release = None
    if parts[0] and not parts[0].isdigit():
        release = parts[0].decode("ascii", "backslashreplace")
        parts = parts[1:]
    if len(parts) < 4:
        return None
    level, seq, usec, flags = parts[:4]
    if not (level.isdigit() and seq.isdigit() and usec.isdigit()) or len(flags) > 1:
        return None
    frag_offset = frag_total = None
    for extra in parts[4:]:
        if extra.startswith(b"ncfrag="):
            offset, _, total = extra[7:].partition(b"/")
            if not (offset.isdigit() and total.isdigit()):
                raise Malformed(f"bad fragment header {extra!r}")
            frag_offset, frag_total = int(offset), int(total)
            if frag_total == 0 or frag_total > MAX_MESSAGE_BYTES:
                raise Malformed(f"fragment total {frag_total} out of range")
            if frag_offset + len(data) - end - 1 > frag_total:
                raise Malformed(f"fragment {frag_offset}/{frag_total} overruns its message")
    header = ExtendedHeader(int(level), int(seq), int(usec), release, frag_offset, frag_total)
    return header, data[end + 1 :]


def decode_text(raw: bytes) -> str:
    """Bytes to text; bytes that are not UTF-8 stay visible as ``\\xNN``."""
    return raw.decode("utf-8", "backslashreplace")


def _unescape(raw: bytes) -> bytes:
    # The kernel writes control bytes, bytes >= 0x7f and the backslash itself as \xNN.
    if b"\\" not in raw:
        return raw
    return _ESCAPE.sub(lambda m: bytes((int(m.group(1), 16),)), raw)


def parse_extended_body(body: bytes) -> tuple[list[str], tuple[tuple[str, str], ...]]:
    """The message's lines and its dictionary from an extended body."""
    text, _, rest = body.partition(b"\n")
    lines = decode_text(_unescape(text)).split("\n")
    fields = []
    for entry in rest.split(b"\n"):
        if entry.startswith(b" "):
            key, _, value = entry[1:].partition(b"=")
            fields.append((decode_text(key), decode_text(_unescape(value))))
    return lines, tuple(fields)


def parse_plain_line(raw: bytes, received_at: float) -> LogLine:
    """A plain console line, its ``<level>`` and ``[seconds]`` prefixes taken into fields."""
    m = _PLAIN_PREFIX.match(raw)
    level = time_us = None
    if m.end():
        if m.group(1) is not None:
            level = int(m.group(1)) & 7
        if m.group(2) is not None:
            time_us = int(m.group(2)) * 1_000_000 + int(m.group(3))
        raw = raw[m.end() :]
    return LogLine(received_at, decode_text(raw), level=level, kernel_time_us=time_us)


class _Reassembly:
    """The fragments of one extended message received so far, at their offsets.

    Held in two arrays as long as the furthest byte received, its bytes and which of them
    came: however the fragments overlap or repeat, a message never holds more than twice its
    declared length, and a first fragment alone takes no more than itself.
    """

    __slots__ = ("header", "total", "data", "have", "received", "started")

    def __init__(self, header: ExtendedHeader, started: float) -> None:
        self.header = header
        self.total = header.frag_total
        self.data = bytearray()
        self.have = bytearray()
        self.received = 0
        self.started = started

    def add(self, offset: int, chunk: bytes) -> int:
        """Store a fragment (parse_extended_header keeps it within the total); bytes new."""
        end = offset + len(chunk)
        if end > len(self.data):
            self.data += bytes(end - len(self.data))
            self.have += bytes(end - len(self.have))
        new = len(chunk) - self.have.count(1, offset, end)
        if new:
            self.data[offset:end] = chunk
            self.have[offset:end] = b"\x01" * len(chunk)
            self.received += new
        return new

    @property
    def complete(self) -> bool:
        """Every byte of the message came."""
        return self.received == self.total

    def body(self) -> tuple[bytes, bool]:
        """The message body and whether it is complete; gaps are marked in the text."""
        if self.complete:
            return bytes(self.data), True
        pieces, have, end = [], self.have, 0
        start = have.find(1)
        while start >= 0:
            if start > end:
                pieces.append(_INCOMPLETE_GAP.encode())
            end = have.find(0, start)
            if end < 0:
                end = len(have)
            pieces.append(self.data[start:end])
            start = have.find(1, end)
        if end < self.total:
            pieces.append(_INCOMPLETE_GAP.encode().rstrip())
        return b"".join(pieces), False


class Decoder:
    """One instance's netconsole stream: datagrams in, complete log lines out.

    A line longer than max_line_bytes (the buffer's buffer_max_bytes) is cut to it. Below
    MAX_DATAGRAM_BYTES that takes a check on the common path: such a decoder is a
    `_BoundedDecoder`, and the others do without it.
    """

    # One per instance, touched by every datagram: slots keep it small and quick to reach.
    __slots__ = ("stats", "release", "_release_raw", "sequence", "_partial", "_partial_at",
                 "_pending", "max_line_bytes")

    def __new__(cls, stats: Counter | None = None, max_line_bytes: int = 2**31) -> Decoder:
        if cls is Decoder and max_line_bytes < MAX_DATAGRAM_BYTES:
            cls = _BoundedDecoder
        return super().__new__(cls)

    def __init__(self, stats: Counter | None = None, max_line_bytes: int = 2**31) -> None:
        self.stats = stats if stats is not None else Counter()
        #: A line longer than this (bytes of UTF-8, the buffer's buffer_max_bytes) is cut.
        self.max_line_bytes = max_line_bytes
        self.release: str | None = None
        self._release_raw = b""
        self.sequence = SequenceTracker(self.stats)
        self._partial = b""
        self._partial_at = 0.0
        self._pending: OrderedDict[int, _Reassembly] = OrderedDict()

    @property
    def lost_messages(self) -> int:
        """Messages the kernel numbered that never arrived."""
        return self.sequence.lost

    @property
    def pending_messages(self) -> int:
        """Fragmented messages waiting for the rest of their fragments."""
        return len(self._pending)

    @property
    def pending_bytes(self) -> int:
        """Bytes held for the fragmented messages waiting (at most MAX_PENDING_BYTES)."""
        return sum(len(r.data) + len(r.have) for r in self._pending.values())

    @property
    def has_pending(self) -> bool:
        """True while a partial line or an unfinished fragmented message waits for time."""
        return bool(self._partial or self._pending)

    def record(self, data: bytes, now: float) -> bytes | None:
        """The common datagram, decoded in one piece into a packed record; None for the rest.

        The common datagram is one whole line: an extended message without dictionary or
        escapes, or a plain line. Its record is about as large as the datagram, where a
        `LogLine` costs three times its text. b"" means nothing to keep (a duplicate, a blank
        line). Anything else is left to `feed_other`.
        """
        # Only ASCII text reads the same as bytes and as str.
        if self._partial or not data.isascii():
            return None
        m = _COMMON_HEADER.match(data)
        release = b""
        if m is None:
            if data[:1] == b"[":
                # A plain line's time stamp, not a release: _plain_record leaves anything
                # that could still be an extended header to the general path.
                return self._plain_record(data, now)
            # A release first? Searched for by its comma, not by a pattern: a pattern that
            # must find where a release ends backtracks through every plain line.
            comma = data.find(b",", 1, MAX_RELEASE_BYTES + 1)
            m = _COMMON_HEADER.match(data, comma + 1) if comma > 0 else None
            if m is None:
                return self._plain_record(data, now)
            release = data[:comma]
            # bytes.find, not "in": "in" tries its operand as an integer first, and costs more.
            # A newline in it would split the datagram the archive writes as it came
            # (archive_queue.block_of counts newlines, it does not place them).
            if release.find(b";") >= 0 or release.isdigit() or release.find(b"\n") >= 0:
                return None
        start = m.end()
        end = data.find(b"\n", start)
        if end < 0:
            end = len(data)
        elif end != len(data) - 1:
            return None
        if data.find(b"\\", start) >= 0:
            return None
        seq, time_us = int(m[2]), int(m[3])
        sequence = self.sequence
        highest = sequence.highest
        if highest is not None and seq == highest + 1 and time_us:
            # SequenceTracker.accept's in-order case, inlined: it is nearly every datagram. The
            # time tells the message (accept takes its text where the time is 0).
            sequence.highest, sequence.highest_time = seq, time_us
            sequence.times[seq & DUPLICATE_MASK] = time_us
        elif not sequence.accept(seq, time_us, data[start:end]):
            self.stats["duplicate_messages"] += 1
            return b""
        if release and release != self._release_raw:
            self._release_raw = release
            self.release = release.decode("ascii")
        return _RECORD.pack(end - start, now, seq, time_us, int(m[1]) & 7) + data[start:end]

    def _plain_record(self, data: bytes, now: float) -> bytes | None:
        # A plain line whole in its datagram, as netconsole sends each one. A ";" near the
        # start could make it an extended header: parse_extended_header decides that.
        end = len(data) - 1
        if end < 0 or data.find(b"\n") != end or data.find(b";", 7, 256) >= 0:
            return None
        m = _PLAIN_PREFIX.match(data, 0, end)
        start = m.end()
        text = data[start:end].rstrip(b"\r")
        if not start:
            if not text or text.isspace():
                return b""
            # Another writer's text before a console time stamp (a merged line): the general
            # path, where observers see every line, so a kernel header after it is not missed.
            if text.find(b"] ") >= 0 and _INNER_STAMP.search(text) is not None:
                return None
        level = _NO_LEVEL if m[1] is None else int(m[1]) & 7
        time_us = _NO_NUMBER if m[2] is None else int(m[2]) * 1_000_000 + int(m[3])
        return _RECORD.pack(len(text), now, _NO_NUMBER, time_us, level) + text

    def feed(self, data: bytes, now: float) -> list[LogLine]:
        """Decode one datagram; return the lines it completes."""
        record = self.record(data, now)
        if record is None:
            return self.feed_other(data, now)
        return [unpack_record(record)[0]] if record else []

    def feed_other(self, data: bytes, now: float) -> list[LogLine]:
        """Decode a datagram that `record` left (plain, fragments, dictionary, escapes)."""
        try:
            parsed = parse_extended_header(data)
        except Malformed:
            self.stats["malformed_datagrams"] += 1
            return []
        if parsed is None:
            return self._cut_long(self._feed_plain(data, now))
        out = self._flush_partial(now) if self._partial else []
        header, body = parsed
        if header.release is not None:
            self.release, self._release_raw = header.release, b""
        if header.frag_total is None:
            out.extend(self._message(header, body, now, complete=True))
        else:
            out.extend(self._fragment(header, body, now))
        return self._cut_long(out)

    def expire(self, now: float) -> list[LogLine]:
        """Lines whose wait is over: a partial line after quiet, fragments past their time."""
        out = []
        if self._partial and now - self._partial_at >= PARTIAL_LINE_SECONDS:
            out.extend(self._flush_partial(now))
        while self._pending:
            seq, reassembly = next(iter(self._pending.items()))
            if now - reassembly.started < FRAGMENT_SECONDS:
                break
            del self._pending[seq]
            out.extend(self._give_up(reassembly, now))
        return self._cut_long(out)

    def flush(self, now: float) -> list[LogLine]:
        """Everything still waiting, as it is (at shutdown or eviction)."""
        out = self._flush_partial(now) if self._partial else []
        while self._pending:
            _, reassembly = self._pending.popitem(last=False)
            out.extend(self._give_up(reassembly, now))
        return self._cut_long(out)

    def _cut_long(self, lines: list[LogLine]) -> list[LogLine]:
        # A buffer keeps its newest line whole even over its bounds: no line may be longer.
        limit = self.max_line_bytes
        for i, line in enumerate(lines):
            # UTF-8 takes at most 4 bytes a character: most lines need no encoding to tell.
            if len(line.text) * 4 > limit:
                raw = line.text.encode("utf-8", "backslashreplace")
                if len(raw) > limit:
                    self.stats["long_lines_cut"] += 1
                    marker = _CUT_MARKER % len(raw)
                    text = raw[: max(0, limit - len(marker))].decode("utf-8", "ignore")
                    lines[i] = line._replace(text=text + marker)
        return lines

    def _feed_plain(self, data: bytes, now: float) -> list[LogLine]:
        if self._partial:
            data = self._partial + data
            self._partial = b""
        *complete, rest = data.split(b"\n")
        out = [parse_plain_line(raw.rstrip(b"\r"), now) for raw in complete if raw.strip()]
        if rest:
            if len(rest) > MAX_LINE_BYTES:
                self.stats["lines_cut"] += 1
                out.append(parse_plain_line(rest, now))
            else:
                self._partial = rest
                self._partial_at = now
        return out

    def _flush_partial(self, now: float) -> list[LogLine]:
        raw, self._partial = self._partial, b""
        return [parse_plain_line(raw, now)] if raw.strip() else []

    def _fragment(self, header: ExtendedHeader, chunk: bytes, now: float) -> list[LogLine]:
        self.stats["fragments_received"] += 1
        out = []
        reassembly = self._pending.get(header.seq)
        if reassembly is None or reassembly.total != header.frag_total:
            if reassembly is not None:
                del self._pending[header.seq]
                out.extend(self._give_up(reassembly, now))
            if len(self._pending) >= MAX_PENDING_MESSAGES:
                _, oldest = self._pending.popitem(last=False)
                out.extend(self._give_up(oldest, now))
            reassembly = self._pending[header.seq] = _Reassembly(header, now)
        grows = 2 * (header.frag_offset + len(chunk) - len(reassembly.data))
        if grows > 0 and self.pending_bytes + grows > MAX_PENDING_BYTES:
            # The oldest others go first (one message alone is well within the bound).
            for seq in [s for s in self._pending if s != header.seq]:
                out.extend(self._give_up(self._pending.pop(seq), now))
                if self.pending_bytes + grows <= MAX_PENDING_BYTES:
                    break
        new = reassembly.add(header.frag_offset, chunk)
        if 0 < new < len(chunk):
            # Never from a kernel: its fragments do not overlap.
            self.stats["fragments_overlapping"] += 1
        if reassembly.complete:
            del self._pending[header.seq]
            body, _ = reassembly.body()
            out.extend(self._message(reassembly.header, body, now, complete=True))
        return out

    def _give_up(self, reassembly: _Reassembly, now: float) -> list[LogLine]:
        body, complete = reassembly.body()
        if not complete:
            self.stats["fragments_expired"] += 1
        return self._message(reassembly.header, body, now, complete=complete)

    def _message(
        self, header: ExtendedHeader, body: bytes, now: float, complete: bool
    ) -> list[LogLine]:
        if not self.sequence.accept(header.seq, header.time_us, body.partition(b"\n")[0]):
            self.stats["duplicate_messages"] += 1
            return []
        texts, fields = parse_extended_body(body)
        for key, value in fields:
            if key == "release" and value:
                self.release, self._release_raw = value, b""
        level = header.level & 7
        # Empty lines of a multi-line message are dropped; an empty message stays one line.
        texts = [text for text in texts if text] or [""]
        return [
            LogLine(
                now,
                text,
                level=level,
                seq=header.seq,
                kernel_time_us=header.time_us,
                fields=fields,
                incomplete=not complete,
            )
            for text in texts
        ]


class _BoundedDecoder(Decoder):
    """A `Decoder` whose lines must be shorter than a datagram may be."""

    __slots__ = ()

    def record(self, data: bytes, now: float) -> bytes | None:
        """As `Decoder.record`; a datagram longer than a line may be takes the general path,
        which cuts its line."""
        if len(data) > self.max_line_bytes:
            return None
        return super().record(data, now)
