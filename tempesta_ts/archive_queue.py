"""The archive's queue: every instance's lines, in the order they came, in one list of bytes.

The path of a datagram appends to one list for all instances (`BufferRegistry.archive_queue`),
not to a container of its instance: with thousands of instances that second touch of the
instance's state a datagram, and the work an instance a second to take it, cost more than
the lines (docs/performance.md). The items, joined, are the journal's block of a second:

    STAMP <receive time prefix>       the receive time of the lines after it (a read's)
    RAW <file name> END <datagram>    a line as it came, written after the receive time
    MADE <file name> END <line>       an archive line the server formatted (`format_line`)

A datagram goes as it came when it is one printable line; `block_of` checks that for all of
a second's at once, at the speed of C, and rewrites the few that are not. The separators are
control bytes no written line holds (the server escapes them). `demux` gives each instance's
lines for its file. Pure code: no Twisted, no disk.
"""

from __future__ import annotations

import re
from typing import Iterable

from tempesta_ts.archive_format import file_name, format_datagram, format_line, parse_received
from tempesta_ts.netconsole import LogLine

STAMP = b"\x1d"
RAW = b"\x1e"
MADE = b"\x1c"
END = b"\x1f"
_STAMP, _RAW, _MADE = STAMP[0], RAW[0], MADE[0]
# What a written line holds: printable ASCII but the backslash (escaped), and its newline.
_PLAIN_OR_NEWLINE = bytes(range(0x20, 0x7F)).replace(b"\\", b"") + b"\n"
_PLAIN = _PLAIN_OR_NEWLINE[:-1]
# A journal block back as items: a receive time, or a tag and its whole line.
_ITEM = re.compile(rb"(\x1d[^\x1c-\x1f\n]*)|([\x1c\x1e][^\x1c-\x1f\n]*\x1f)([^\x1c-\x1f\n]*\n)")


def tag(address: str) -> bytes:
    """An instance's tag before each of its datagrams: RAW, its files' name, END."""
    return RAW + file_name(address).encode("ascii") + END


def name_of(tag: bytes) -> str:
    """The files' name in a tag."""
    return tag[1:-1].decode("ascii")


def stamp(prefix: bytes) -> bytes:
    """The item of a receive time, from its lines' prefix (`Stamps.prefix`)."""
    return STAMP + prefix


def made(instance_tag: bytes, lines: Iterable[LogLine]) -> list[bytes]:
    """The items of lines the server put together (fragments, several in a datagram)."""
    return _made_items(instance_tag, map(format_line, lines))


def lines_of(address: str, data: bytes) -> list[bytes]:
    """The items of archive lines of an instance (read back from the journal)."""
    return _made_items(tag(address), data.splitlines(keepends=True))


def _made_items(instance_tag: bytes, archive_lines: Iterable[bytes]) -> list[bytes]:
    made_tag = MADE + instance_tag[1:]
    items = []
    for line in archive_lines:
        items.append(made_tag)
        items.append(line)
    return items


def block_of(items: list[bytes], stamps: int) -> tuple[bytes, list[bytes], int]:
    """The journal block of a queue holding `stamps` receive times; the items, rewritten
    when a datagram is not one printable line; its lines."""
    block = b"".join(items)
    lines = (len(items) - stamps) // 2
    # Left of the printable bytes: a separator a receive time, two a tag, and each line's
    # newline right after its tag's. A datagram as it came (Decoder.record) can hold a
    # newline only at its end: so each is one printable line. One pass over the block.
    rest = block.translate(None, _PLAIN)
    if len(rest) == stamps + 3 * lines and rest.count(END + b"\n") == lines:
        return block, items, lines
    items = _rewritten(items)
    return b"".join(items), items, (len(items) - stamps) // 2


def _rewritten(items: list[bytes]) -> list[bytes]:
    """The items with each datagram that is not one printable line formatted by the server."""
    out = []
    received = 0.0
    cache: dict[str, int] = {}
    pairs = iter(items)
    for item in pairs:
        if item[0] == _STAMP:
            received = parse_received(item[1:-1].decode("ascii"), cache) or 0.0
            out.append(item)
            continue
        payload = next(pairs)
        if item[0] == _RAW and (
            payload.translate(None, _PLAIN_OR_NEWLINE) or payload.find(b"\n") != len(payload) - 1
        ):
            out.append(MADE + item[1:])
            out.append(format_datagram(received, payload))
        else:
            out.append(item)
            out.append(payload)
    return out


def demux(items: list[bytes], groups: dict[bytes, list[bytes]], position: int = 0,
          prefix: bytes = b"", lines: int = -1) -> tuple[int, bytes, int]:
    """Lines of a queue (as `block_of` gives it) to their instances, from `position` (after
    the receive time `prefix`), at most `lines` of them (all: -1): groups[tag] gets two pieces
    a line, in order. Where to go on, its receive time, and the lines left of `lines`."""
    end = len(items)
    while position < end and lines != 0:
        item = items[position]
        first = item[0]
        if first == _STAMP:
            prefix = item[1:]
            position += 1
            continue
        if first == _MADE:
            item = RAW + item[1:]
        pieces = groups.get(item)
        if pieces is None:
            pieces = groups[item] = []
        # A line the server made has its receive time in it.
        pieces.append(prefix if first == _RAW else b"")
        pieces.append(items[position + 1])
        position += 2
        lines -= 1
    return position, prefix, lines


def items_of(block: bytes) -> list[bytes]:
    """A journal block's items back; from a damaged or cut part on, nothing."""
    items = []
    position = 0
    for m in _ITEM.finditer(block):
        if m.start() != position:
            break
        position = m.end()
        if m[1] is not None:
            items.append(m[1])
        else:
            items.append(m[2])
            items.append(m[3])
    return items


def newest(items: list[bytes], lines: int) -> tuple[list[bytes], int, int]:
    """The newest `lines` lines of a queue (after the receive time of the first), how many
    older ones were left out, and the receive times kept."""
    # Forward: where a tag or a receive time is due, its first byte tells which; a datagram's
    # may be anything.
    tags = []
    stamps = []
    position = 0
    while position < len(items):
        if items[position][0] == _STAMP:
            stamps.append(position)
            position += 1
            continue
        tags.append(position)
        position += 2
    over = len(tags) - lines
    if over <= 0:
        return items, 0, len(stamps)
    if over == len(tags):
        # None kept (the bound is reached): there is no first line to start from.
        return [], over, 0
    start = tags[over]
    before = [at for at in stamps if at < start]
    kept = [items[before[-1]]] if before else []
    return kept + items[start:], over, len(kept) + len(stamps) - len(before)
