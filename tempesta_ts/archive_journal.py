"""The archive's journal: lines held back from their instance's file, on disk within a second.

With many instances sending at once, writing each one's file every second costs a system
call (and an inode update) an instance a second: more than the lines themselves. Their lines
are then held in memory a while and written to each file in one go, and meanwhile appended,
every instance's together, to this one file (``.journal`` in the archive directory) with one
write a second, so that a kill loses no more than before. Records:

    #<length>\\n<length bytes: a second's queue, every instance's lines (archive_queue)>
    =<address>\\n            (what was held for that address is in its file now)
    =<address> <bytes>\\n    (the first bytes of it are: a long one is written in steps)
    |\\n                     (a write to the files starts: the marks after it are about the
                             lines before it)
    +<address> <length>\\n<length bytes of archive lines>   (written by earlier versions)

Emptied each time nothing is held. Read back at start: what is not marked written goes to the
files. No Twisted.
"""

from __future__ import annotations

import os
from typing import Callable

from tempesta_ts import archive_queue
from tempesta_ts.archive_files import append_whole
from tempesta_ts.archive_format import address_of
from tempesta_ts.files import open_regular

#: The journal's name in the archive directory (hidden: not an instance's file).
NAME = ".journal"
#: A record's header is short; a longer "line" is not one (a damaged file).
_HEADER_MAX = 256


def record(address: str, data: bytes) -> bytes:
    """A record's header, to go before its archive lines `data`."""
    return b"+%s %d\n" % (address.encode(), len(data))


#: Written when the held lines start going to their files: the marks after it are about the
#: lines before it (lines taken meanwhile come after it).
CUT = b"|\n"


def block_record(block: bytes) -> bytes:
    """A block's header, to go before a second's queue joined (`archive_queue.block_of`)."""
    return b"#%d\n" % len(block)


def mark(address: str, written: int | None = None) -> bytes:
    """The mark saying that what was held for an address is in its file (its first `written`
    bytes, when given)."""
    if written is None:
        return b"=%s\n" % address.encode()
    return b"=%s %d\n" % (address.encode(), written)


class Journal:
    """The journal file: records appended in one write, emptied, read back."""

    def __init__(self, directory: str, write: Callable[[int, bytes], int] = os.write) -> None:
        self.path = os.path.join(directory, NAME)
        self.write = write
        self._fd: int | None = None
        #: Bytes in the file.
        self.size = 0

    def append(self, pieces: list[bytes]) -> None:
        """Append records and marks (`block_record`, `mark`), in order and in one write. Raises
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
        # Lines in a write to the files under way (before its cut), and lines taken since.
        held: dict[str, list[bytes]] = {}
        fresh: dict[str, list[bytes]] = {}
        cut = False
        position = 0
        names: dict[bytes, str] = {}
        while position < len(data):
            end = data.find(b"\n", position, position + _HEADER_MAX)
            if end < 0:
                break
            header = data[position + 1 : end].decode("utf-8", "replace")
            kind = data[position : position + 1]
            if kind == b"|":
                _after(held, fresh)
                fresh = {}
                cut = True
                position = end + 1
                continue
            if kind == b"=":
                address, _, written = header.rpartition(" ")
                if not (address and written.isascii() and written.isdigit()):
                    address, written = header, ""
                # (Journals of earlier versions have no cut: a mark covers all before it.)
                for lines in (held,) if cut else (held, fresh):
                    if written and address in lines:
                        lines[address] = [b"".join(lines[address])[int(written):]]
                    elif not written:
                        lines.pop(address, None)
                position = end + 1
                continue
            if kind == b"#":
                if not (header.isascii() and header.isdigit()):
                    break
                block = data[end + 1 : end + 1 + int(header)]
                if len(block) != int(header):
                    break
                groups: dict[bytes, list[bytes]] = {}
                archive_queue.demux(archive_queue.items_of(block), groups)
                for tag, pieces in groups.items():
                    address = names.get(tag)
                    if address is None:
                        address = names[tag] = address_of(archive_queue.name_of(tag))
                    fresh.setdefault(address, []).append(b"".join(pieces))
                position = end + 1 + int(header)
                continue
            address, _, length = header.rpartition(" ")
            if kind != b"+" or not address or not (length.isascii() and length.isdigit()):
                break
            body = data[end + 1 : end + 1 + int(length)]
            if len(body) != int(length):
                break
            # Whole lines only: a record is never cut, but a damaged one could be.
            fresh.setdefault(address, []).append(body[: body.rfind(b"\n") + 1])
            position = end + 1 + int(length)
        _after(held, fresh)
        # In the order each address was first held (a mark and later records start anew).
        return [(address, b"".join(chunks)) for address, chunks in held.items() if chunks]

    def replace(self, pieces: list[bytes]) -> None:
        """Make the journal hold just these records, in one step (a new file renamed over
        it). Raises OSError; then the journal is as it was."""
        data = b"".join(pieces)
        new = self.path + ".new"
        fd = open_regular(new, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC)
        try:
            append_whole(self.write, fd, data, 0)
            os.replace(new, self.path)
        except OSError:
            os.close(fd)
            raise
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        self.size = len(data)

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


def _after(held: dict[str, list[bytes]], fresh: dict[str, list[bytes]]) -> None:
    """Each address's fresh lines after those it has held."""
    for address, chunks in fresh.items():
        held.setdefault(address, []).extend(chunks)
