"""Per-instance log buffers and the registry that bounds how many instances are held.

An instance is a source address. Each holds a ring buffer of its latest complete log lines,
bounded in lines and bytes, with what it knows of the instance. Pure code: time is passed in.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, Callable, Container, Iterable, Iterator, Sequence

from tempesta_ts import archive_queue
from tempesta_ts.archive_format import Stamps
from tempesta_ts.netconsole import (
    RECORD_TEXT,
    Decoder,
    LogLine,
    pack_line,
    record_text_length,
    unpack_record,
)

if TYPE_CHECKING:
    from tempesta_ts.incidents import LineFilter


@dataclass(frozen=True, slots=True)
class SystemInfo:
    """A document an instance sent over TCP, such as the System Verification Script's."""

    received_at: float
    text: str
    #: "json" when the text is braced like a JSON object or array, else "text".
    format: str
    peer: str = ""
    #: Set for a document kept only on disk (system_info_dir), its text then empty: the
    #: length of the text there, read back when a report is made.
    stored_size: int | None = None

    @property
    def size(self) -> int:
        """Length of the text in characters."""
        return len(self.text) if self.stored_size is None else self.stored_size

    @property
    def on_disk(self) -> bool:
        """Whether only system_info_dir holds the text."""
        return self.stored_size is not None


#: Records sealed together into one bytes object: a line then costs its text and a 29-byte
#: header, where a bytes object of its own would add 33 more and a deque slot 8.
CHUNK_LINES = 16


class LogBuffer:
    """A ring of log lines bounded by count and by bytes of text; counts what it pushed out.

    Lines are kept as packed records (`netconsole.pack_line`), the newest in a short list,
    older ones sealed CHUNK_LINES at a time into one bytes object. Memory lets go of a whole
    chunk at a time, once every line in it is out of the bounds; until then reading skips
    those lines. So appending a line costs no more when the buffer is full, and a buffer
    holds at most 2 * CHUNK_LINES - 1 lines more than it shows. Reading gives `LogLine`s.
    """

    __slots__ = ("max_lines", "max_bytes", "_chunks", "_chunk_bytes", "_newest", "stored",
                 "stored_bytes", "released", "_hidden_at")

    def __init__(self, max_lines: int, max_bytes: int) -> None:
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self._chunks: deque[bytes] = deque()
        #: Bytes of text in each chunk of _chunks.
        self._chunk_bytes: deque[int] = deque()
        self._newest: list[bytes] = []
        #: Lines and bytes of UTF-8 text in memory, those out of the bounds included.
        self.stored = 0
        self.stored_bytes = 0
        #: Lines memory let go of since the instance was first seen.
        self.released = 0
        # _hidden()'s answer and the count of lines ever appended it was for.
        self._hidden_at: tuple[int, tuple[int, int]] = (0, (0, 0))

    def append_record(self, record: bytes) -> int:
        """Append a packed record; return how many older lines memory let go of."""
        newest = self._newest
        newest.append(record)
        self.stored += 1
        self.stored_bytes += len(record) - RECORD_TEXT
        if len(newest) == CHUNK_LINES:
            return self._seal()
        return 0

    def extend(self, lines: Sequence[LogLine]) -> int:
        """Append lines, oldest first; return how many older lines memory let go of."""
        return sum(self.append_record(pack_line(line)) for line in lines)

    def _seal(self) -> int:
        chunk = b"".join(self._newest)
        self._newest.clear()
        self._chunks.append(chunk)
        self._chunk_bytes.append(len(chunk) - CHUNK_LINES * RECORD_TEXT)
        # The oldest chunk goes once the lines after it fill a bound by themselves: every
        # line in it is then out. The newest chunk always stays.
        released = 0
        chunks, sizes = self._chunks, self._chunk_bytes
        while len(chunks) > 1 and (
            self.stored - CHUNK_LINES >= self.max_lines
            or self.stored_bytes - sizes[0] > self.max_bytes
        ):
            chunks.popleft()
            self.stored -= CHUNK_LINES
            self.stored_bytes -= sizes.popleft()
            released += CHUNK_LINES
        self.released += released
        return released

    def _hidden(self) -> tuple[int, int]:
        """Lines at the start of memory that are out of the bounds, and their bytes of text."""
        appended = self.stored + self.released
        if self._hidden_at[0] == appended:
            return self._hidden_at[1]
        lines = text = 0
        if self.stored > self.max_lines or self.stored_bytes > self.max_bytes:
            records = self._records(chain(self._chunks, self._newest))
            # The newest line always stays, even when it alone is over max_bytes.
            while self.stored - lines > self.max_lines or (
                self.stored_bytes - text > self.max_bytes and self.stored - lines > 1
            ):
                chunk, offset = next(records)
                text += record_text_length(chunk, offset)
                lines += 1
        self._hidden_at = (appended, (lines, text))
        return lines, text

    @staticmethod
    def _records(chunks: Iterable[bytes]) -> Iterator[tuple[bytes, int]]:
        for chunk in chunks:
            offset = 0
            while offset < len(chunk):
                yield chunk, offset
                offset += RECORD_TEXT + record_text_length(chunk, offset)

    @property
    def hidden_lines(self) -> int:
        """Lines out of the bounds that memory still holds (until their chunk goes)."""
        return self._hidden()[0]

    @property
    def bytes(self) -> int:
        """Bytes of UTF-8 text of the lines held."""
        return self.stored_bytes - self._hidden()[1]

    @property
    def dropped(self) -> int:
        """Lines pushed out by the bounds since the instance was first seen."""
        return self.released + self._hidden()[0]

    def __len__(self) -> int:
        return self.stored - self._hidden()[0]

    def __iter__(self) -> Iterator[LogLine]:
        hidden = self._hidden()[0]
        # A copy: the reader may go on after more lines came.
        for n, (chunk, offset) in enumerate(self._records(list(self._chunks) + self._newest)):
            if n >= hidden:
                yield unpack_record(chunk, offset)[0]


class Instance:
    """One Tempesta FW server, known by its source address."""

    __slots__ = ("address", "first_seen", "last_seen", "buffer", "decoder", "system_info",
                 "tag")

    def __init__(self, address: str, now: float, buffer: LogBuffer, decoder: Decoder) -> None:
        self.address = address
        self.first_seen = now
        self.last_seen = now
        self.buffer = buffer
        self.decoder = decoder
        self.system_info: SystemInfo | None = None
        #: With BufferRegistry.keep_unwritten, what comes before each of its lines in the
        #: archive's queue (`archive_queue.tag`).
        self.tag = b""

    @property
    def kernel_release(self) -> str | None:
        """The kernel release, from netconsole's release prepend or sysdata, when sent."""
        return self.decoder.release

    @property
    def lost_messages(self) -> int:
        """Messages lost in sequence gaps (extended format only)."""
        return self.decoder.lost_messages


#: Called with the instance and the lines just appended to its buffer.
LinesObserver = Callable[[Instance, Sequence[LogLine]], None]


class BufferRegistry:
    """All instances, bounded by max_instances, least recently active dropped first."""

    def __init__(
        self,
        max_instances: int,
        buffer_max_lines: int,
        buffer_max_bytes: int,
        stats: Counter | None = None,
        *,
        observers: Iterable[LinesObserver] = (),
        line_filter: LineFilter | None = None,
        evicted: Iterable[Callable[[Instance], None]] = (),
        watched: Container[str] = frozenset(),
        every_line: Iterable[LinesObserver] = (),
        keep_unwritten: bool = False,
    ) -> None:
        self.max_instances = max_instances
        self.buffer_max_lines = buffer_max_lines
        self.buffer_max_bytes = buffer_max_bytes
        self.stats = stats if stats is not None else Counter()
        self._instances: OrderedDict[str, Instance] = OrderedDict()
        #: Instances whose decoder waits for time (partial line, fragments).
        self._waiting: set[str] = set()
        #: Called with each instance and the lines just appended to its buffer, in order.
        self.observers: list[LinesObserver] = list(observers)
        #: Observers that see every line whatever line_filter hides from `observers` (a copy
        #: of the log elsewhere: ClickHouse); called first.
        self.every_line: list[LinesObserver] = list(every_line)
        #: Per first byte of a line, what it must contain and match for the observers to see
        #: it (`Rules.line_filter`); None: they see every line. Watched instances show all.
        self.line_filter: LineFilter | None = line_filter
        #: Called with each instance dropped by max_instances, in order.
        self.evicted: list[Callable[[Instance], None]] = list(evicted)
        #: Addresses whose every line the observers see whatever the filter: the tracker's,
        #: which it keeps while an incident's window is open (the trace, the end marker).
        self.watched = watched
        #: For the archive: every instance's lines since it last took them, in one list in
        #: the order they came (`archive_queue`; `take_unwritten`); None without it.
        self.keep_unwritten = keep_unwritten
        self.archive_queue: list[bytes] | None = [] if keep_unwritten else None
        #: Receive times in archive_queue, and the last one put there.
        self._queue_stamps = 0
        self._queue_at = -1.0
        self._stamps = Stamps()

    def __len__(self) -> int:
        return len(self._instances)

    def __iter__(self) -> Iterator[Instance]:
        return iter(list(self._instances.values()))

    def get(self, address: str) -> Instance | None:
        """The instance at an address, if held."""
        return self._instances.get(address)

    def touch(self, address: str, now: float) -> Instance:
        """The instance at an address, created if new, marked as the most recently active."""
        instance = self._instances.get(address)
        if instance is None:
            instance = Instance(
                address,
                now,
                LogBuffer(self.buffer_max_lines, self.buffer_max_bytes),
                Decoder(self.stats, self.buffer_max_bytes),
            )
            if self.keep_unwritten:
                instance.tag = archive_queue.tag(address)
            self._instances[address] = instance
            self.stats["instances_created"] += 1
            while len(self._instances) > self.max_instances:
                _, oldest = self._instances.popitem(last=False)
                self._evict(oldest, now)
        else:
            self._instances.move_to_end(address)
        instance.last_seen = now
        return instance

    def receive_datagram(self, address: str, data: bytes, now: float) -> None:
        """Decode a netconsole datagram from an instance into its buffer."""
        instance = self._instances.get(address)
        if instance is None:
            instance = self.touch(address, now)
        else:
            # touch(), inlined: this runs for every datagram.
            self._instances.move_to_end(address)
            instance.last_seen = now
        decoder = instance.decoder
        record = decoder.record(data, now)
        if record is None:
            lines = decoder.feed_other(data, now)
            if decoder.has_pending:
                self._waiting.add(address)
            if lines:
                self._append(instance, lines)
        elif record:
            stats = self.stats
            stats["lines"] += 1
            pushed = instance.buffer.append_record(record)
            if pushed:
                stats["lines_pushed_out"] += pushed
            # For the archive, the datagram as it came, after its instance's tag and the
            # receive time of its read: two appends to one list, whatever the instance.
            queue = self.archive_queue
            if queue is not None:
                if now != self._queue_at:
                    self._queue_at = now
                    self._queue_stamps += 1
                    queue.append(archive_queue.stamp(self._stamps.prefix(now)))
                queue.append(instance.tag)
                queue.append(data)
            if self.every_line:
                self._to_every_line(instance, record)
                return
            if not self.observers:
                return
            # Most lines cannot start an incident: they are not even decoded to text.
            # (_shows is the same test; inlined here, where every datagram passes.)
            table = self.line_filter
            if table is not None and address not in self.watched and len(record) > RECORD_TEXT:
                entry = table[record[RECORD_TEXT]]
                if entry is None:
                    return
                # bytes.find, not "in": "in" tries the needle as an integer first.
                needle, pattern = entry
                if needle and record.find(needle, RECORD_TEXT) < 0:
                    return
                if pattern.match(record, RECORD_TEXT) is None:
                    return
            line = unpack_record(record)[0]
            for observer in self.observers:
                observer(instance, (line,))

    def _to_every_line(self, instance: Instance, record: bytes) -> None:
        """A record to the every-line observers, then, if line_filter shows it, to the others;
        decoded once for all."""
        lines = (unpack_record(record)[0],)
        for observer in self.every_line:
            observer(instance, lines)
        if self.observers and self._shows(instance, record):
            for observer in self.observers:
                observer(instance, lines)

    def _shows(self, instance: Instance, record: bytes) -> bool:
        """Whether line_filter lets the observers see a record: one that could start an
        incident, or any of a watched instance."""
        table = self.line_filter
        if table is None or instance.address in self.watched or len(record) <= RECORD_TEXT:
            return True
        entry = table[record[RECORD_TEXT]]
        if entry is None:
            return False
        needle, pattern = entry
        if needle and record.find(needle, RECORD_TEXT) < 0:
            return False
        return pattern.match(record, RECORD_TEXT) is not None

    def take_unwritten(self) -> tuple[list[bytes], int]:
        """For the archive: the queue of every instance's lines (`archive_queue`) and how many
        receive times it holds, now taken."""
        taken = self.archive_queue, self._queue_stamps
        self.archive_queue = []
        self._queue_stamps = 0
        self._queue_at = -1.0
        return taken

    @property
    def unwritten_lines(self) -> int:
        """Lines in the archive's queue."""
        if self.archive_queue is None:
            return 0
        return (len(self.archive_queue) - self._queue_stamps) // 2

    def receive_system_info(self, address: str, info: SystemInfo) -> Instance:
        """Keep a document as the instance's latest system information."""
        instance = self.touch(address, info.received_at)
        instance.system_info = info
        return instance

    def expire(self, now: float) -> int:
        """Complete what waited long enough (partial lines, fragments); return lines added."""
        added = 0
        for address in list(self._waiting):
            instance = self._instances.get(address)
            if instance is None:
                self._waiting.discard(address)
                continue
            lines = instance.decoder.expire(now)
            if not instance.decoder.has_pending:
                self._waiting.discard(address)
            if lines:
                self._append(instance, lines)
                added += len(lines)
        return added

    def flush(self, now: float) -> int:
        """Complete everything still waiting, as it is; return lines added."""
        added = 0
        for address in list(self._waiting):
            instance = self._instances.get(address)
            if instance is not None:
                lines = instance.decoder.flush(now)
                if lines:
                    self._append(instance, lines)
                    added += len(lines)
        self._waiting.clear()
        return added

    def _append(self, instance: Instance, lines: Sequence[LogLine]) -> None:
        self.stats["lines"] += len(lines)
        self.stats["lines_pushed_out"] += instance.buffer.extend(lines)
        queue = self.archive_queue
        if queue is not None:
            queue.extend(archive_queue.made(instance.tag, lines))
        for observer in self.every_line:
            observer(instance, lines)
        for observer in self.observers:
            observer(instance, lines)

    def _evict(self, instance: Instance, now: float) -> None:
        # What waited for more (a partial line, fragments of a panic) is kept as it is, so
        # that observers (the incident tracker) see it before the instance goes.
        if instance.address in self._waiting:
            self._waiting.discard(instance.address)
            lines = instance.decoder.flush(now)
            if lines:
                self._append(instance, lines)
        self.stats["instances_evicted"] += 1
        self.stats["lines_pushed_out"] += instance.buffer.hidden_lines
        for callback in self.evicted:
            callback(instance)

    @property
    def pending_messages(self) -> int:
        """Fragmented messages waiting for the rest of their fragments, all instances."""
        # Only instances in _waiting can have any: a scrape does not walk the whole registry.
        instances = self._instances
        return sum(instances[a].decoder.pending_messages for a in self._waiting if a in instances)

    def counters(self) -> dict[str, int]:
        """The shared counters as they stand now: lines_pushed_out also counts the lines out
        of the bounds that buffers still hold (memory lets go of them a chunk at a time)."""
        out = dict(self.stats)
        hidden = sum(i.buffer.hidden_lines for i in self._instances.values())
        out["lines_pushed_out"] = out.get("lines_pushed_out", 0) + hidden
        return out

    @property
    def buffered_bytes(self) -> int:
        """Bytes of log text held across all instances."""
        return sum(i.buffer.bytes for i in self._instances.values())
