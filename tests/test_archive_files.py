"""The archive's lines and files: the format read back, names, rotation, bounds, open files."""

from __future__ import annotations

import errno
import gzip
import os
import stat
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from tempesta_ts import archive_files, archive_queue
from tempesta_ts.archive_files import ArchiveFiles, descriptor_budget
from tempesta_ts.archive_format import (
    Stamps,
    address_of,
    file_name,
    format_line,
    parse_file_name,
    parse_line,
)
from tempesta_ts.errors import StartupError
from tempesta_ts.files import NotRegularFile
from tempesta_ts.netconsole import Decoder, LogLine, unpack_record

T = 1_795_000_000.123456  # 2026-11-18T11:06:40.123456Z


def written(entries: list) -> bytes:
    """What the archive writes to an instance's file of what it received: receive times
    (float), each before the datagrams (bytes) received then, and tuples of lines it made."""
    tag = archive_queue.tag("10.0.0.1")
    items: list[bytes] = []
    stamps = 0
    for entry in entries:
        if isinstance(entry, float):
            items.append(archive_queue.stamp(Stamps().prefix(entry)))
            stamps += 1
        elif isinstance(entry, bytes):
            items += [tag, entry]
        else:
            items += archive_queue.made(tag, list(entry))
    _, items, _ = archive_queue.block_of(items, stamps)
    groups: dict = {}
    archive_queue.demux(items, groups)
    return b"".join(groups.get(tag, []))


def read_back(data: bytes) -> list[LogLine]:
    cache: dict = {}
    return [parse_line(raw, cache) for raw in data.decode("utf-8").splitlines()]


class FormatTests(unittest.TestCase):
    """One text line per kernel line, read back as it was."""

    def test_a_run_of_printable_datagrams_is_written_as_it_came_after_its_receive_time(self):
        run = [T, b"6,1234,87654321,-;tfw: request processed\n", b"[   12.345678] plain line\n",
               b"5.10.35-tfw,4,1235,87654400,-;with the release first\n"]
        self.assertEqual(
            written(run).decode(),
            "2026-11-18T11:06:40.123456Z 6,1234,87654321,-;tfw: request processed\n"
            "2026-11-18T11:06:40.123456Z [   12.345678] plain line\n"
            "2026-11-18T11:06:40.123456Z 5.10.35-tfw,4,1235,87654400,-;with the release first\n",
        )

    def test_what_is_written_reads_back_as_the_decoder_made_it(self):
        datagrams = [b"6,1234,87654321,-;tfw: request processed\n", b"[   12.345678] plain line\n",
                     b"<3>[    1.000001] console with a level\n", b"no prefix at all\n",
                     b"5.10.35-tfw,4,1235,87654400,-,caller=T12;release and caller\n"]
        decoded = [unpack_record(Decoder().record(d, T))[0] for d in datagrams]
        self.assertEqual(read_back(written([T, *datagrams])), decoded)

    def test_control_bytes_and_backslashes_are_escaped_and_read_back(self):
        run = [T, b"[    5.000000] \x1b[31mred\x1b[0m C:\\path\r\n", b"6,7,8,-;bell\x07\n"]
        text = written(run).decode()
        self.assertEqual(
            text,
            "2026-11-18T11:06:40.123456Z [    5.000000] \\x1b[31mred\\x1b[0m C:\\\\path\n"
            "2026-11-18T11:06:40.123456Z 6,7,8,-;bell\\x07\n",
        )
        self.assertEqual([line.text for line in read_back(text.encode())],
                         ["\x1b[31mred\x1b[0m C:\\path", "bell\x07"])

    def test_a_line_the_server_made_is_written_in_the_same_forms(self):
        lines = [
            LogLine(T, "reassembled \u202e fragment", 4, 99, 5_000_001),
            LogLine(T, "a plain line", 6, None, 12_000_000),
            LogLine(T, "nothing known"),
            LogLine(T, "<3>looks like a level"),
            LogLine(T, "6,1,2,-;looks like a header"),
        ]
        text = b"".join(map(format_line, lines))
        self.assertEqual(
            text.decode(),
            "2026-11-18T11:06:40.123456Z 4,99,5000001,-;reassembled \\u202e fragment\n"
            "2026-11-18T11:06:40.123456Z <6>[   12.000000] a plain line\n"
            "2026-11-18T11:06:40.123456Z nothing known\n"
            "2026-11-18T11:06:40.123456Z \\x3c3>looks like a level\n"
            "2026-11-18T11:06:40.123456Z \\x36,1,2,-;looks like a header\n",
        )
        self.assertEqual(read_back(text), lines)

    def test_what_an_instance_kept_is_written_in_order_runs_and_lines_alike(self):
        entries = [T, b"6,1,1,-;first\n", b"6,2,2,-;second\n", (LogLine(T + 1, "made", 4, 3, 3),),
                   T + 2, b"[    1.000000] third\n"]
        self.assertEqual([(line.text, round(line.received_at - T)) for line in
                          read_back(written(entries))],
                         [("first", 0), ("second", 0), ("made", 1), ("third", 2)])

    def test_odd_datagrams_of_one_instance_stay_one_line_each(self):
        # No newline at the end, and one inside a release: together they count right, but
        # each is still checked and stays one line.
        odd = [b"6,1,1,-;no newline", b"rel\nease,6,2,2,-;two newlines\n", b"6,3,3,-;nul\x00\n"]
        for datagrams in ([odd[0], odd[1]], [odd[2]], odd):
            data = written([T, *datagrams])
            self.assertEqual(data.count(b"\n"), len(datagrams), data)
            self.assertTrue(all(line is not None for line in read_back(data)), data)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.binary(max_size=80), min_size=1, max_size=5))
    def test_any_datagrams_of_a_run_stay_one_line_each(self, datagrams):
        datagrams = [d for d in datagrams if Decoder().record(d, T)]
        if not datagrams:
            return
        data = written([T, *datagrams])
        self.assertEqual(data.count(b"\n"), len(datagrams))
        self.assertEqual(read_back(data), [unpack_record(Decoder().record(d, T))[0] for d in datagrams])

    @settings(max_examples=300, deadline=None)
    @given(
        text=st.text(),
        level=st.one_of(st.none(), st.integers(0, 7)),
        seq=st.one_of(st.none(), st.integers(0, 2**63)),
        # A console line's time stamp has at most 10 digits of seconds, as the kernel's.
        kernel=st.one_of(st.none(), st.integers(0, 10**16 - 1)),
        micros=st.integers(0, 4_000_000_000 * 1_000_000),
    )
    def test_any_line_reads_back_as_it_was(self, text, level, seq, kernel, micros):
        line = LogLine(micros / 1_000_000, text, level, seq, kernel)
        data = format_line(line)
        self.assertEqual(data.count(b"\n"), 1)
        (back,) = read_back(data)
        if seq is not None and kernel is not None and level is None:
            # The extended form always has a level: netconsole's messages always do.
            level = 6
        self.assertEqual((back.text, back.level, back.seq, back.kernel_time_us),
                         (text.encode("utf-8", "surrogatepass").decode("utf-8", "surrogatepass"),
                          level, seq if kernel is not None else None, kernel))
        self.assertEqual(round(back.received_at * 1_000_000), micros)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=300))
    def test_any_datagram_of_a_run_stays_one_line_and_reads_back(self, datagram):
        record = Decoder().record(datagram, T)
        if not record:
            return
        data = written([T, datagram])
        self.assertEqual(data.count(b"\n"), 1)
        (back,) = read_back(data)
        self.assertEqual(back, unpack_record(record)[0])

    def test_lines_that_are_not_archive_lines_are_left_out(self):
        cache: dict = {}
        for raw in ("", "2026-11-18T06:13:20.1234Z cut", "garbage", "2026-13-40T06:13:20.123456Z x"):
            self.assertIsNone(parse_line(raw, cache), raw)


class NameTests(unittest.TestCase):
    """One file per instance, named by its address, safe for any shell and any filesystem."""

    def test_ipv4_is_its_address_and_ipv6_has_dashes_for_colons(self):
        self.assertEqual(file_name("10.0.0.1"), "10.0.0.1")
        self.assertEqual(file_name("2001:db8::1"), "2001-db8--1")
        self.assertEqual(file_name("::ffff:10.0.0.1"), "--ffff-10.0.0.1")
        self.assertEqual(file_name("fe80::1%eth-0"), "fe80--1_25eth_2d0")

    @given(st.text(min_size=1, max_size=60))
    def test_a_name_gives_back_its_address(self, address):
        name = file_name(address)
        self.assertRegex(name, r"\A[0-9A-Za-z._-]+\Z")
        self.assertEqual(address_of(name), address.encode("utf-8", "replace").decode("utf-8", "replace"))

    def test_file_names_are_parsed(self):
        self.assertEqual(parse_file_name("10.0.0.1.log"), ("10.0.0.1", None, False, False))
        self.assertEqual(parse_file_name("10.0.0.1.log.20261118T110640.123456Z"),
                         ("10.0.0.1", "20261118T110640.123456Z", False, False))
        self.assertEqual(parse_file_name("2001-db8--1.log.20261118T110640.123456Z.gz"),
                         ("2001-db8--1", "20261118T110640.123456Z", True, False))
        self.assertEqual(parse_file_name("x.log.20261118T110640.123456Z.gz.tmp")[3], True)
        self.assertIsNone(parse_file_name("notes.txt"))


class FilesTests(unittest.TestCase):
    """The files on disk."""

    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        self.stats = Counter()

    def files(self, max_bytes=10_000, keep=3, total=10**9, **kw) -> ArchiveFiles:
        files = ArchiveFiles(self.directory, max_bytes, keep, total, self.stats, **kw)
        files.prepare()
        return files

    def line(self, n: int, size: int = 100) -> bytes:
        return (f"2026-11-18T11:06:40.123456Z 6,{n},{n},-;" + "x" * size + "\n").encode()

    def compress_all(self, files: ArchiveFiles) -> None:
        while files.to_compress:
            for _ in files.compress(*files.to_compress.popleft()):
                pass

    def test_files_are_0600_and_the_directory_0700(self):
        files = self.files()
        files.append("10.0.0.1", self.line(1), T)
        self.assertEqual(stat.S_IMODE(os.stat(self.directory).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(files.path("10.0.0.1")).st_mode), 0o600)

    def test_a_directory_others_can_write_stops_the_start(self):
        os.makedirs(self.directory)
        os.chmod(self.directory, 0o777)
        with self.assertRaises(StartupError) as caught:
            self.files()
        self.assertIn("archive_dir", str(caught.exception))

    def test_a_symbolic_link_planted_as_a_file_is_not_written_through(self):
        files = self.files()
        target = os.path.abspath(self.mktemp())
        with open(target, "wb") as f:
            f.write(b"precious\n")
        os.symlink(target, files.path("10.0.0.1"))
        with self.assertRaises(NotRegularFile):
            files.append("10.0.0.1", self.line(1), T)
        with open(target, "rb") as f:
            self.assertEqual(f.read(), b"precious\n")

    def test_rotation_keeps_archive_keep_generations_gzip_readable_the_newest_plain(self):
        files = self.files(max_bytes=1000, keep=3)
        written = []
        for n in range(60):
            line = self.line(n)
            files.append("10.0.0.1", line, T + n)
            written.append(line)
            self.compress_all(files)
        names = sorted(os.listdir(self.directory))
        self.assertEqual(len(names), 4, names)
        current, *generations = names
        self.assertEqual(current, "10.0.0.1.log")
        self.assertTrue(generations[0].endswith(".gz") and generations[1].endswith(".gz"))
        self.assertFalse(generations[2].endswith(".gz"))
        content = b""
        for name in generations:
            path = os.path.join(self.directory, name)
            opener = gzip.open if name.endswith(".gz") else open
            with opener(path, "rb") as f:
                content += f.read()
            self.assertLessEqual(os.path.getsize(path), 1000)
        with open(files.path("10.0.0.1"), "rb") as f:
            content += f.read()
        # Every line of the kept generations, whole and in order, the oldest gone.
        self.assertTrue(b"".join(written).endswith(content))
        self.assertGreater(self.stats["archive_rotations"], 3)
        self.assertEqual(self.stats["archive_files_removed"], self.stats["archive_rotations"] - 3)
        self.assertEqual(files.total, sum(os.path.getsize(os.path.join(self.directory, n)) for n in names))

    def test_compression_goes_a_chunk_a_step(self):
        self.patch(archive_files, "COMPRESS_CHUNK", 1000)
        files = self.files(max_bytes=20_000, keep=3)
        for n in range(400):
            files.append("10.0.0.1", self.line(n), T + n)
        steps = list(files.compress(*files.to_compress.popleft()))
        self.assertGreaterEqual(len(steps), 19)

    def test_the_total_bound_removes_the_oldest_generations_first(self):
        files = self.files(max_bytes=1000, keep=5, total=4000)
        for n in range(30):
            for address in ("10.0.0.1", "10.0.0.2"):
                files.append(address, self.line(n), T + n)
                self.compress_all(files)
                files.enforce(keep=address)
        self.assertLessEqual(files.total, 4000)
        on_disk = sum(os.path.getsize(os.path.join(self.directory, n)) for n in os.listdir(self.directory))
        self.assertEqual(files.total, on_disk)
        # Both instances keep their current file and their newest lines.
        for address in ("10.0.0.1", "10.0.0.2"):
            with open(files.path(address), "rb") as f:
                self.assertTrue(f.read().endswith(self.line(29)))
        stamps = sorted(parse_file_name(n)[1] for n in os.listdir(self.directory) if parse_file_name(n)[1])
        self.assertTrue(all(stamp >= "20261118T110650" for stamp in stamps), stamps)

    def test_open_files_stay_bounded_with_thousands_of_instances(self):
        files = self.files(max_open=32)
        before = len(os.listdir("/proc/self/fd"))
        for n in range(3000):
            files.append(f"10.1.{n // 250}.{n % 250}", self.line(n), T)
        self.assertEqual(files.open_files, 32)
        self.assertLessEqual(len(os.listdir("/proc/self/fd")), before + 32)
        self.assertEqual(len(os.listdir(self.directory)), 3000)
        files.close()
        self.assertEqual(files.open_files, 0)

    def test_instances_with_files_are_bounded_the_longest_unwritten_go(self):
        files = self.files(max_names=100)
        for n in range(150):
            files.append(f"10.1.0.{n}", self.line(n), T + n)
        files.enforce()
        self.assertEqual(len(os.listdir(self.directory)), 100)
        self.assertFalse(os.path.exists(files.path("10.1.0.49")))
        self.assertTrue(os.path.exists(files.path("10.1.0.50")))

    def limit(self, soft):
        import resource

        before = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, before)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, before[1]))
        return before[1]

    def test_the_archive_holds_a_descriptor_for_each_instance_raising_the_soft_limit(self):
        import resource

        hard = self.limit(1024)
        if hard != resource.RLIM_INFINITY and hard < 5000 + 320:
            raise unittest.SkipTest(f"the hard RLIMIT_NOFILE ({hard}) is below 5320")
        self.assertEqual(descriptor_budget(5000, 320), 5000)
        self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE)[0], 5320)

    def test_the_archive_holds_fewer_descriptors_when_the_limit_cannot_be_raised(self):
        self.limit(1024)

        def forbidden(*args):
            raise OSError(errno.EPERM, "Operation not permitted")

        self.patch(archive_files.resource, "setrlimit", forbidden)
        self.assertEqual(descriptor_budget(5000, 320), 1024 - 320)
        self.assertEqual(descriptor_budget(100, 320), 100)

    def test_a_failed_write_leaves_whole_lines_only(self):
        calls = []

        def half_then_full(fd, data):
            calls.append(len(data))
            if len(calls) == 1:
                return os.write(fd, data)
            if len(calls) == 2:
                return os.write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")

        files = self.files(write=half_then_full)
        files.append("10.0.0.1", self.line(1), T)
        with self.assertRaises(OSError):
            files.append("10.0.0.1", self.line(2) * 3, T)
        with open(files.path("10.0.0.1"), "rb") as f:
            self.assertEqual(f.read(), self.line(1))
        self.assertEqual(files.total, len(self.line(1)))

    def test_a_line_cut_by_a_crash_is_left_out_and_cut_off_before_the_next(self):
        files = self.files()
        os.makedirs(self.directory, exist_ok=True)
        with open(files.path("10.0.0.1"), "wb") as f:
            f.write(self.line(1) + b"2026-11-18T11:06:40.123456Z 6,2,2,-;cut sh")
        files = self.files()
        self.assertEqual([line.seq for line in files.tail("10.0.0.1", 10, 10**6)[0]], [1])
        files.append("10.0.0.1", self.line(3), T)
        self.assertEqual([line.seq for line in files.tail("10.0.0.1", 10, 10**6)[0]], [1, 3])
        with open(files.path("10.0.0.1"), "rb") as f:
            self.assertEqual(f.read(), self.line(1) + self.line(3))

    def test_the_tail_reads_only_the_end_of_a_large_file(self):
        files = self.files(max_bytes=10**9)
        big = b"".join(self.line(n) for n in range(100_000))
        files.append("10.0.0.1", big, T)
        read = []
        real = os.pread
        self.patch(os, "pread", lambda fd, size, offset: read.append(size) or real(fd, size, offset))
        lines, _ = files.tail("10.0.0.1", 50, 10**6)
        self.assertEqual([line.seq for line in lines], list(range(99_950, 100_000)))
        self.assertLessEqual(sum(read), 2 * archive_files.READ_BLOCK)

    def test_the_tail_goes_on_in_the_plain_generation_after_a_rotation(self):
        files = self.files(max_bytes=2000)
        for n in range(25):
            files.append("10.0.0.1", self.line(n), T + n)
        lines, _ = files.tail("10.0.0.1", 15, 10**6)
        self.assertEqual([line.seq for line in lines], list(range(10, 25)))

    def test_leftovers_of_a_stop_are_cleared_at_start(self):
        files = self.files(max_bytes=1000, keep=5)
        for n in range(40):
            files.append("10.0.0.1", self.line(n), T + n)
        pending = files.to_compress[0][1].stamp
        partial = files.path("10.0.0.1", pending, compressed=True) + ".tmp"
        with open(partial, "wb") as f:
            f.write(b"half a gzip")
        files = self.files(max_bytes=1000, keep=5)
        self.assertFalse(os.path.exists(partial))
        self.assertIn(pending, [g.stamp for _, g in files.to_compress])
        self.compress_all(files)
        names = os.listdir(self.directory)
        self.assertEqual(len([n for n in names if n.endswith(".gz")]), 4, names)
