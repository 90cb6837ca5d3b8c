"""The archive's files on disk: one per instance, rotated into gzip generations, bounded per
instance and in all, and read back from their end.

``<name>.log`` is an instance's current file (`archive_format.file_name`). Past max_bytes it
becomes the generation ``<name>.log.<stamp>`` and a new current file starts; the generation
stays plain until the next rotation (so that a restart finds history right after one), then is
compressed to ``<name>.log.<stamp>.gz``. Past `keep` generations an instance's oldest goes;
past total_max_bytes, the oldest generations of all instances, then the current files written
longest ago. No symbolic link is followed, files are 0600, and a bounded number of descriptors
is held (`descriptor_budget`). Compressing is a generator, one chunk a step, for the caller to spread over time.
No Twisted.
"""

from __future__ import annotations

import errno
import os
import resource
import zlib
from collections import OrderedDict, deque
from typing import Callable, Iterator

from tempesta_ts.archive_format import (
    SUFFIX,
    file_name,
    generation_stamp,
    parse_file_name,
    parse_line,
)
from tempesta_ts.files import check_private_directory, open_regular
from tempesta_ts.netconsole import LogLine

#: Descriptors of current files held open at most: one for each instance held, so that
#: writing an instance's lines costs a write, not an open, a check of its end and a close
#: (ten times as much: with 10,000 instances, most of the archive's time).
OPEN_FILES = 65536
#: Descriptors left to everything else (listeners, TCP clients, HTTPS, ClickHouse) beside
#: tcp_max_connections.
RESERVED_FILES = 256
#: Bytes compressed a step: a few milliseconds of the reactor at level 1.
COMPRESS_CHUNK = 256 * 1024
#: gzip -1: five to six times smaller, about 100 MiB/s; -6 would take four times the CPU for a
#: fifth less disk.
COMPRESS_LEVEL = 1
#: Bytes read a time from a file's end at restore.
READ_BLOCK = 64 * 1024

# Read too: the end of the file is looked at when it is opened.
_APPEND = os.O_RDWR | os.O_APPEND | os.O_CREAT


class Generation:
    """A rotated file of an instance: its stamp, size on disk, and whether it is compressed."""

    __slots__ = ("stamp", "size", "compressed", "queued")

    def __init__(self, stamp: str, size: int, compressed: bool) -> None:
        self.stamp = stamp
        self.size = size
        self.compressed = compressed
        #: Waiting for, or under, compression.
        self.queued = False


class InstanceFiles:
    """What the archive holds of one instance: its current file and generations, oldest first."""

    __slots__ = ("name", "size", "generations", "written_at", "checked")

    def __init__(self, name: str) -> None:
        self.name = name
        self.size = 0
        self.generations: list[Generation] = []
        self.written_at = 0.0
        #: The current file's end was looked at since this process opened or made it.
        self.checked = False


def descriptor_budget(wanted: int, reserved: int = RESERVED_FILES) -> int:
    """Descriptors the archive may hold: `wanted` (one per instance held, at most OPEN_FILES),
    within RLIMIT_NOFILE less `reserved`; the soft limit is raised towards the hard one for
    it where the process may (systemd's default soft limit is 1024)."""
    wanted = min(wanted, OPEN_FILES)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted + reserved:
        target = wanted + reserved
        if hard != resource.RLIM_INFINITY:
            target = min(hard, target)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            # Forbidden (a seccomp filter, say): the archive makes do with fewer.
            pass
    if soft == resource.RLIM_INFINITY:
        return max(16, wanted)
    return max(16, min(wanted, soft - reserved))


def write_all(write: Callable[[int, bytes], int], fd: int, data: bytes) -> None:
    """Write all of data (os.write may take only part); raises OSError."""
    done = write(fd, data)
    if done == len(data):
        # Nearly always: one call.
        return
    view = memoryview(data)[done:]
    while view:
        view = view[write(fd, view) :]


def append_whole(write: Callable[[int, bytes], int], fd: int, data: bytes, size: int) -> None:
    """Append all of data to a file of `size` bytes; raises OSError, and then cuts the file
    back to `size`, so that it holds whole lines only."""
    try:
        write_all(write, fd, data)
    except OSError:
        try:
            os.ftruncate(fd, size)
        except OSError:
            pass
        raise


class ArchiveFiles:
    """The files under the archive directory, indexed in memory once scanned at start."""

    def __init__(
        self,
        directory: str,
        max_bytes: int,
        keep: int,
        total_max_bytes: int,
        stats: dict,
        max_names: int = 100_000,
        write: Callable[[int, bytes], int] = os.write,
        max_open: int = 1024,
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.keep = keep
        self.total_max_bytes = total_max_bytes
        #: Instances with files: a flood of new source addresses must not leave a file for
        #: each for ever; those written longest ago go first.
        self.max_names = max_names
        self.max_open = max_open
        self.stats = stats
        #: os.write, or a stand-in for tests (a full disk).
        self.write = write
        #: Bytes of every file held, current files and generations.
        self.total = 0
        self.ready = False
        self._index: dict[str, InstanceFiles] = {}
        #: Address -> file name, remembered: a flush writes thousands.
        self._names: dict[str, str] = {}
        self._open: OrderedDict[str, int] = OrderedDict()
        #: Generations waiting to be compressed, oldest first.
        self.to_compress: deque[tuple[InstanceFiles, Generation]] = deque()
        #: (path, OSError) of what failed where nothing could raise (removing a file).
        self.failures: list[tuple[str, OSError]] = []

    def path(self, name: str, stamp: str | None = None, compressed: bool = False) -> str:
        """The path of an instance's current file, or of one of its generations."""
        tail = "" if stamp is None else f".{stamp}" + (".gz" if compressed else "")
        return os.path.join(self.directory, f"{name}{SUFFIX}{tail}")

    def prepare(self) -> None:
        """Make the directory (0700) and index what it holds. Raises StartupError when others
        could write it, OSError when it cannot be made or read."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        check_private_directory(self.directory, "archive_dir")
        self._scan()
        self.ready = True

    def _scan(self) -> None:
        self._index.clear()
        self.total = 0
        twins = []
        with os.scandir(self.directory) as entries:
            for entry in entries:
                parsed = parse_file_name(entry.name)
                if parsed is None or not entry.is_file(follow_symlinks=False):
                    continue
                name, stamp, compressed, tmp = parsed
                if tmp:
                    # A compression cut short by a stop: its plain generation is still there.
                    self._remove(entry.path)
                    continue
                st = entry.stat(follow_symlinks=False)
                files = self._files(name)
                self.total += st.st_size
                if stamp is None:
                    files.size = st.st_size
                    files.written_at = max(files.written_at, st.st_mtime)
                    continue
                files.generations.append(Generation(stamp, st.st_size, compressed))
                if not compressed:
                    files.written_at = max(files.written_at, st.st_mtime)
        for files in self._index.values():
            files.generations.sort(key=lambda g: (g.stamp, not g.compressed))
            kept: list[Generation] = []
            for generation in files.generations:
                if kept and kept[-1].stamp == generation.stamp:
                    # Stopped between the rename of the .gz and the removal of the plain file.
                    twins.append((files, generation))
                    continue
                kept.append(generation)
            files.generations = kept
        for files, twin in twins:
            self.total -= twin.size
            self._remove(self.path(files.name, twin.stamp, twin.compressed))
        for files in self._index.values():
            self._queue_compression(files)

    def _files(self, name: str) -> InstanceFiles:
        files = self._index.get(name)
        if files is None:
            files = self._index[name] = InstanceFiles(name)
        return files

    def names(self) -> list[str]:
        """Instances with a file, the most recently written last."""
        return sorted(self._index, key=lambda name: self._index[name].written_at)

    def append(self, address: str, data: bytes, now: float) -> None:
        """Append lines to an instance's current file, rotating it first if they would take it
        past max_bytes. Raises OSError; then the file is as it was (nothing half-written)."""
        name = self._names.get(address)
        if name is None:
            if len(self._names) >= self.max_names:
                self._names.clear()
            name = self._names[address] = file_name(address)
        files = self._files(name)
        if files.size and files.size + len(data) > self.max_bytes:
            self._rotate(files, now)
        fd = self._descriptor(files)
        try:
            append_whole(self.write, fd, data, files.size)
        except OSError:
            self._close(files.name)
            raise
        files.size += len(data)
        files.written_at = now
        self.total += len(data)

    def _descriptor(self, files: InstanceFiles) -> int:
        fd = self._open.get(files.name)
        if fd is not None:
            self._open.move_to_end(files.name)
            return fd
        while len(self._open) >= self.max_open:
            self._close(next(iter(self._open)))
        fd = open_regular(self.path(files.name), _APPEND)
        try:
            size = os.fstat(fd).st_size
            if not files.checked and size and os.pread(fd, 1, size - 1) != b"\n":
                # The end of a write cut by a crash: the file keeps whole lines only.
                size = _last_line_end(fd, size)
                os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            raise
        files.checked = True
        # Someone else may have changed the file since (truncated it, say): its size counts.
        self.total += size - files.size
        files.size = size
        self._open[files.name] = fd
        return fd

    def _close(self, name: str) -> None:
        fd = self._open.pop(name, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        """Close every descriptor held."""
        for name in list(self._open):
            self._close(name)

    @property
    def open_files(self) -> int:
        """Descriptors held now."""
        return len(self._open)

    def _rotate(self, files: InstanceFiles, now: float) -> None:
        self._close(files.name)
        current = self.path(files.name)
        if self.keep == 0:
            self._remove(current)
            self.total -= files.size
        else:
            stamp = generation_stamp(now)
            taken = {g.stamp for g in files.generations}
            while stamp in taken:
                now += 0.000001
                stamp = generation_stamp(now)
            os.rename(current, self.path(files.name, stamp))
            # Its bytes stay in the total, as a generation's.
            files.generations.append(Generation(stamp, files.size, False))
        files.size = 0
        self.stats["archive_rotations"] += 1
        while len(files.generations) > self.keep:
            self._drop_generation(files, files.generations[0])
        self._queue_compression(files)

    def _queue_compression(self, files: InstanceFiles) -> None:
        # The newest generation stays plain: a restart right after a rotation reads its end.
        for generation in files.generations[:-1]:
            if not generation.compressed and not generation.queued:
                generation.queued = True
                self.to_compress.append((files, generation))

    def _drop_generation(self, files: InstanceFiles, generation: Generation) -> None:
        files.generations.remove(generation)
        self.total -= generation.size
        self.stats["archive_files_removed"] += 1
        self._remove(self.path(files.name, generation.stamp, generation.compressed))

    def _remove(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            self.failures.append((path, e))

    def compress(self, files: InstanceFiles, generation: Generation) -> Iterator[None]:
        """Compress a plain generation to .gz, a chunk a step; a generation removed meanwhile
        is left alone. Raises OSError; then the plain generation stays."""
        if generation not in files.generations or generation.compressed:
            generation.queued = False
            return
        plain = self.path(files.name, generation.stamp)
        target = self.path(files.name, generation.stamp, compressed=True)
        partial = target + ".tmp"
        self._remove(partial)
        source = open_regular(plain)
        out = None
        done = False
        try:
            out = open_regular(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            packer = zlib.compressobj(COMPRESS_LEVEL, zlib.DEFLATED, 31)
            while True:
                chunk = os.read(source, COMPRESS_CHUNK)
                if not chunk:
                    break
                write_all(self.write, out, packer.compress(chunk))
                yield
                if generation not in files.generations:
                    return
            write_all(self.write, out, packer.flush())
            size = os.fstat(out).st_size
            os.rename(partial, target)
            done = True
        finally:
            generation.queued = False
            os.close(source)
            if out is not None:
                os.close(out)
            if not done:
                self._remove(partial)
        self._remove(plain)
        self.total += size - generation.size
        generation.size = size
        generation.compressed = True

    def enforce(self, keep: str | None = None) -> int:
        """Keep the archive within total_max_bytes and max_names: remove the oldest
        generations, then the files of the instances written longest ago (never those of the
        address `keep`); the files removed."""
        removed = 0
        if self.total > self.total_max_bytes:
            oldest = sorted(
                ((g.stamp, files.name, files, g)
                 for files in self._index.values() for g in files.generations),
                key=lambda entry: entry[:2],
            )
            for _, _, files, generation in oldest:
                if self.total <= self.total_max_bytes:
                    break
                self._drop_generation(files, generation)
                removed += 1
        kept = None if keep is None else file_name(keep)
        if self.total > self.total_max_bytes or len(self._index) > self.max_names:
            for name in self.names():
                if self.total <= self.total_max_bytes and len(self._index) <= self.max_names:
                    break
                if name != kept:
                    removed += self._drop_instance(self._index[name])
        return removed

    def _drop_instance(self, files: InstanceFiles) -> int:
        """Remove all of an instance's files; how many there were."""
        removed = 0
        for generation in list(files.generations):
            self._drop_generation(files, generation)
            removed += 1
        if files.size or os.path.lexists(self.path(files.name)):
            self._close(files.name)
            self._remove(self.path(files.name))
            self.total -= files.size
            files.size = 0
            self.stats["archive_files_removed"] += 1
            removed += 1
        del self._index[files.name]
        return removed

    def tail(self, name: str, max_lines: int, max_bytes: int) -> tuple[list[LogLine], float]:
        """The last lines of an instance, oldest first, at most max_lines and max_bytes of
        text, from the end of its current file then of its plain generation; and when it was
        last written. Reads only the end of each. Raises OSError."""
        files = self._index[name]
        paths = [self.path(name)] if files.size else []
        if files.generations and not files.generations[-1].compressed:
            paths.append(self.path(name, files.generations[-1].stamp))
        lines: list[LogLine] = []
        size = 0
        cache: dict[str, int] = {}
        # Lines that do not parse (cut by a crash) are read too, but not without end.
        budget = 4 * max_bytes + 128 * max_lines
        for path in paths:
            for raw in _backwards(path, budget):
                line = parse_line(raw.decode("utf-8", "replace"), cache)
                if line is None:
                    continue
                text = line.text
                length = len(text) if text.isascii() else len(text.encode("utf-8", "backslashreplace"))
                if len(lines) >= max_lines or size + length > max_bytes:
                    return lines[::-1], files.written_at
                lines.append(line)
                size += length
        return lines[::-1], files.written_at


def _last_line_end(fd: int, size: int) -> int:
    """Where the last whole line of a file ends (0 when there is none)."""
    position = size
    while position > 0:
        block = min(READ_BLOCK, position)
        position -= block
        found = os.pread(fd, block, position).rfind(b"\n")
        if found >= 0:
            return position + found + 1
    return 0


def _backwards(path: str, budget: int) -> Iterator[bytes]:
    """A file's whole lines from its end, the last first, until `budget` bytes were read; an
    unfinished last line (a write cut by a crash) is left out."""
    try:
        fd = open_regular(path)
    except FileNotFoundError:
        return
    try:
        position = os.fstat(fd).st_size
        # The start of a line whose end was read; None until the file's last newline is found.
        head: bytes | None = None
        while position > 0 and budget > 0:
            size = min(READ_BLOCK, position)
            position -= size
            budget -= size
            block = os.pread(fd, size, position)
            if len(block) != size:
                raise OSError(errno.EIO, "the file changed while read", path)
            if head is None:
                last = block.rfind(b"\n")
                if last < 0:
                    continue
                block, head = block[:last], b""
            pieces = (block + head).split(b"\n")
            head = pieces[0]
            for raw in reversed(pieces[1:]):
                if raw:
                    yield raw
        if position == 0 and head:
            yield head
    finally:
        os.close(fd)
