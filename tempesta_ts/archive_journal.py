"""The archive's journal: lines held back from their instance's file, on disk within a second.

With many instances sending at once, writing each one's file every second costs a system
call (and an inode update) an instance a second: more than the lines themselves. Their lines
are then held in memory a while and written to each file in one go, and meanwhile appended,
every instance's together, to this one file (``.journal`` in the archive directory) with one
write a second, so that a kill loses no more than before. Records:

    +<address> <length>\\n<length bytes of archive lines>
    =<address>\\n            (what was held for that address is in its file now)

Emptied each time nothing is held. Read back at start: what is not marked written goes to the
files. No Twisted.
"""

from __future__ import annotations

import os
from typing import Callable

from tempesta_ts.archive_files import append_whole
from tempesta_ts.files import open_regular

#: The journal's name in the archive directory (hidden: not an instance's file).
NAME = ".journal"
#: A record's header is short; a longer "line" is not one (a damaged file).
_HEADER_MAX = 256


def record(address: str, data: bytes) -> bytes:
    """A record's header, to go before its archive lines `data`."""
    return b"+%s %d\n" % (address.encode(), len(data))


def mark(address: str) -> bytes:
    """The mark saying that what was held for an address is in its file."""
    return b"=%s\n" % address.encode()


class Journal:
    """The journal file: records appended in one write, emptied, read back."""

    def __init__(self, directory: str, write: Callable[[int, bytes], int] = os.write) -> None:
        self.path = os.path.join(directory, NAME)
        self.write = write
        self._fd: int | None = None
        #: Bytes in the file.
        self.size = 0

    def append(self, pieces: list[bytes]) -> None:
        """Append records and marks (`record`, `mark`), in order and in one write. Raises
        OSError; then the file is cut back to what it held."""
        if not pieces:
            return
        data = b"".join(pieces)
        append_whole(self.write, self._descriptor(), data, self.size)
        self.size += len(data)

    def clear(self) -> None:
        """Empty the journal: everything it held is in the instances' files. Raises OSError."""
        if self._fd is None and not os.path.lexists(self.path):
            # None was ever needed: none is made.
            self.size = 0
            return
        if self.size or self._fd is None:
            os.ftruncate(self._descriptor(), 0)
        self.size = 0

    def read(self) -> list[tuple[str, bytes]]:
        """What the journal holds that is not marked written, (address, archive lines) in the
        order written, an address's records joined; a damaged end is left out."""
        if self._fd is None and not os.path.lexists(self.path):
            return []
        fd = self._descriptor()
        size = os.fstat(fd).st_size
        data = os.pread(fd, size, 0) if size else b""
        self.size = size
        held: dict[str, list[bytes]] = {}
        position = 0
        while position < len(data):
            end = data.find(b"\n", position, position + _HEADER_MAX)
            if end < 0:
                break
            header = data[position + 1 : end].decode("utf-8", "replace")
            kind = data[position : position + 1]
            if kind == b"=":
                held.pop(header, None)
                position = end + 1
                continue
            address, _, length = header.rpartition(" ")
            if kind != b"+" or not address or not (length.isascii() and length.isdigit()):
                break
            body = data[end + 1 : end + 1 + int(length)]
            if len(body) != int(length):
                break
            # Whole lines only: a record is never cut, but a damaged one could be.
            held.setdefault(address, []).append(body[: body.rfind(b"\n") + 1])
            position = end + 1 + int(length)
        # In the order each address was first held (a mark and later records start anew).
        return [(address, b"".join(chunks)) for address, chunks in held.items()]

    def _descriptor(self) -> int:
        if self._fd is None:
            self._fd = open_regular(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
            self.size = os.fstat(self._fd).st_size
        return self._fd

    def close(self) -> None:
        """Close the file (it stays, empty or not, for the next start)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class HeldLines:
    """Archive lines held back from their instances' files, by address, with their count
    (a bytearray and an int each: no container an instance for the garbage collector)."""

    def __init__(self) -> None:
        self._data: dict[str, bytearray] = {}
        self._counts: dict[str, int] = {}
        #: Bytes and lines held in all.
        self.bytes = 0
        self.lines = 0
        #: When the first of them was held (None when none is).
        self.since: float | None = None

    def __len__(self) -> int:
        return len(self._data)

    def addresses(self) -> list[str]:
        """The addresses with lines held, first held first."""
        return list(self._data)

    def add(self, address: str, data: bytes, count: int, now: float) -> int:
        """Hold `count` lines for an address; the bytes it now has held."""
        held = self._data.get(address)
        if held is None:
            held = self._data[address] = bytearray(data)
            self._counts[address] = count
        else:
            held += data
            self._counts[address] += count
        self.bytes += len(data)
        self.lines += count
        if self.since is None:
            self.since = now
        return len(held)

    def pop(self, address: str) -> tuple[bytearray, int] | None:
        """What an address has held, and how many lines, taken; None when nothing."""
        held = self._data.pop(address, None)
        if held is None:
            return None
        count = self._counts.pop(address)
        self.bytes -= len(held)
        self.lines -= count
        if not self._data:
            self.since = None
        return held, count
