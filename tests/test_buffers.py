"""Per-instance buffers and the registry's bounds, without Twisted."""

from __future__ import annotations

from collections import Counter, deque

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from tempesta_ts.buffers import CHUNK_LINES, BufferRegistry, LogBuffer, SystemInfo
from tempesta_ts.incidents import Rules
from tempesta_ts.netconsole import PARTIAL_LINE_SECONDS, Decoder, LogLine
from tests.captures import datagrams, expected_lines


def line(text: str) -> LogLine:
    return LogLine(0.0, text)


class LogBufferTests(unittest.TestCase):
    """The ring keeps the newest lines within its bounds and counts what it pushed out."""

    def test_line_bound_pushes_out_the_oldest(self):
        buf = LogBuffer(max_lines=3, max_bytes=10_000)
        buf.extend([line(str(i)) for i in range(5)])
        self.assertEqual([l.text for l in buf], ["2", "3", "4"])
        self.assertEqual(buf.dropped, 2)

    def test_byte_bound_pushes_out_the_oldest(self):
        buf = LogBuffer(max_lines=100, max_bytes=25)
        buf.extend([line("x" * 10) for _ in range(4)])
        self.assertEqual(len(buf), 2)
        self.assertEqual(buf.bytes, 20)
        self.assertEqual(buf.dropped, 2)

    def test_one_line_over_the_byte_bound_is_still_kept(self):
        buf = LogBuffer(max_lines=100, max_bytes=10)
        buf.extend([line("a"), line("y" * 50)])
        self.assertEqual([l.text for l in buf], ["y" * 50])

    def test_records_and_lines_share_the_bounds_and_read_back_in_order(self):
        buf = LogBuffer(max_lines=3, max_bytes=10_000)
        decoder = Decoder()
        for n in range(1, 4):
            buf.append_record(decoder.record(b"6,%d,%d,-;record %d\n" % (n, n * 10, n), float(n)))
            buf.extend(decoder.feed(b"plain %d\n" % n, float(n)))
        self.assertEqual([l.text for l in buf], ["plain 2", "record 3", "plain 3"])
        self.assertEqual(buf.bytes, sum(len(l.text) for l in buf))
        self.assertEqual(buf.dropped, 3)
        self.assertEqual(list(buf)[1], LogLine(3.0, "record 3", 6, 3, 30))


class ChunkedLogBufferTests(unittest.TestCase):
    """Lines sealed into chunks read back exactly as a plain ring of lines would hold them."""

    @given(
        st.integers(1, 40),
        st.integers(1, 400),
        st.lists(st.tuples(st.text(max_size=30), st.one_of(st.none(), st.integers(0, 2**64 - 2))), max_size=120),
    )
    def test_same_lines_as_a_plain_ring(self, max_lines, max_bytes, appended):
        buf = LogBuffer(max_lines, max_bytes)
        model: deque[LogLine] = deque()
        pushed = 0
        for n, (text, seq) in enumerate(appended):
            new = LogLine(float(n), text, n % 8, seq, None if seq is None else seq // 2)
            pushed += buf.extend([new])
            model.append(new)
            size = lambda: sum(len(l.text.encode("utf-8", "backslashreplace")) for l in model)  # noqa: E731
            while len(model) > max_lines or (size() > max_bytes and len(model) > 1):
                model.popleft()
        self.assertEqual(list(buf), list(model))
        self.assertEqual((len(buf), buf.bytes), (len(model), size() if appended else 0))
        self.assertEqual(buf.dropped, len(appended) - len(model))
        # Memory lets go of whole chunks: what it still holds beyond the bounds is bounded.
        self.assertLessEqual(pushed, buf.dropped)
        self.assertLess(buf.stored - len(buf), 2 * CHUNK_LINES)

    def test_a_chunk_goes_once_all_its_lines_are_pushed_out(self):
        buf = LogBuffer(max_lines=CHUNK_LINES, max_bytes=10**6)
        buf.extend([line(f"{n}") for n in range(CHUNK_LINES * 3)])
        self.assertEqual([l.text for l in buf], [f"{n}" for n in range(CHUNK_LINES * 2, CHUNK_LINES * 3)])
        self.assertLessEqual(len(buf._chunks), 2)


class RegistryTests(unittest.TestCase):
    """Instances by source address, bounded by max_instances."""

    def test_instances_are_kept_apart_by_address(self):
        reg = BufferRegistry(10, 100, 10_000)
        reg.receive_datagram("10.0.0.1", b"one\n", 1.0)
        reg.receive_datagram("10.0.0.2", b"two\n", 2.0)
        self.assertEqual([l.text for l in reg.get("10.0.0.1").buffer], ["one"])
        self.assertEqual([l.text for l in reg.get("10.0.0.2").buffer], ["two"])

    def test_counters_count_every_line_pushed_out_of_the_bounds(self):
        stats = Counter()
        reg = BufferRegistry(10, 5, 10_000, stats)
        for n in range(40):
            reg.receive_datagram("10.0.0.1", b"6,%d,%d,-;line %d\n" % (n, n, n), 1.0)
        self.assertEqual(reg.counters()["lines_pushed_out"], 35)
        self.assertEqual(len(reg.get("10.0.0.1").buffer), 5)
        # Memory lets go of whole chunks; the rest is counted as pushed out as it goes.
        self.assertLessEqual(stats["lines_pushed_out"], 35)
        reg.receive_datagram("10.0.0.2", b"x\n", 2.0)
        reg.max_instances = 1
        reg.touch("10.0.0.3", 3.0)
        self.assertEqual(reg.counters()["lines_pushed_out"], 35)

    def test_least_recently_active_instance_is_dropped_first(self):
        stats = Counter()
        reg = BufferRegistry(2, 100, 10_000, stats)
        evicted = []
        reg.evicted.append(lambda i: evicted.append(i.address))
        reg.receive_datagram("a", b"1\n", 1.0)
        reg.receive_datagram("b", b"1\n", 2.0)
        reg.receive_datagram("a", b"2\n", 3.0)
        reg.receive_datagram("c", b"1\n", 4.0)
        self.assertEqual(sorted(i.address for i in reg), ["a", "c"])
        self.assertEqual(evicted, ["b"])
        self.assertEqual(stats["instances_evicted"], 1)

    def test_eviction_keeps_what_waited_for_more(self):
        reg = BufferRegistry(1, 100, 10_000)
        seen = []
        reg.observers.append(lambda instance, lines: seen.extend((instance.address, l.text) for l in lines))
        reg.receive_datagram("a", b"0,7,100,-,ncfrag=0/40;Kernel panic - not syncing: ", 1.0)
        reg.receive_datagram("b", b"half a line", 2.0)
        self.assertIn(("a", "Kernel panic - not syncing:  [...]"), seen)
        reg.receive_datagram("c", b"x\n", 3.0)
        self.assertIn(("b", "half a line"), seen)

    def test_first_and_last_seen(self):
        reg = BufferRegistry(2, 100, 10_000)
        reg.receive_datagram("a", b"1\n", 1.0)
        reg.receive_datagram("a", b"2\n", 5.0)
        instance = reg.get("a")
        self.assertEqual((instance.first_seen, instance.last_seen), (1.0, 5.0))

    def test_partial_line_completes_on_expiry(self):
        reg = BufferRegistry(2, 100, 10_000)
        reg.receive_datagram("a", b"half", 1.0)
        self.assertEqual(reg.expire(1.1), 0)
        self.assertEqual(reg.expire(1.0 + PARTIAL_LINE_SECONDS), 1)
        self.assertEqual([l.text for l in reg.get("a").buffer], ["half"])

    def test_flush_completes_everything_waiting(self):
        reg = BufferRegistry(2, 100, 10_000)
        reg.receive_datagram("a", b"half", 1.0)
        reg.receive_datagram("b", b"4,1,0,-,ncfrag=0/10;01234", 1.0)
        self.assertEqual(reg.flush(1.0), 2)
        self.assertEqual(reg.expire(100.0), 0)

    def test_observers_see_appended_lines(self):
        reg = BufferRegistry(2, 100, 10_000)
        seen = []
        reg.observers.append(lambda instance, lines: seen.extend((instance.address, l.text) for l in lines))
        reg.receive_datagram("a", b"x\ny\n", 1.0)
        self.assertEqual(seen, [("a", "x"), ("a", "y")])

    def test_observers_see_only_lines_that_can_start_an_incident(self):
        reg = BufferRegistry(2, 100, 10_000)
        reg.line_filter = Rules().line_filter
        seen = []
        reg.observers.append(lambda instance, lines: seen.extend(l.text for l in lines))
        for n, text in enumerate([b"ordinary line", b"WARNING: CPU: 0 PID: 1 at x.c:1 f+0x1/0x2", b""], 1):
            reg.receive_datagram("a", b"4,%d,%d,-;%s\n" % (n, n, text), 1.0)
        self.assertEqual(seen, ["WARNING: CPU: 0 PID: 1 at x.c:1 f+0x1/0x2", ""])
        self.assertEqual(len(reg.get("a").buffer), 3)

    def test_observers_see_every_line_of_a_watched_instance(self):
        seen, watched = [], set()
        reg = BufferRegistry(
            2, 100, 10_000, line_filter=Rules().line_filter, watched=watched,
            observers=[lambda instance, lines: seen.extend(l.text for l in lines)],
        )
        reg.receive_datagram("a", b"4,1,1,-;before\n", 1.0)
        watched.add("a")
        reg.receive_datagram("a", b"4,2,2,-; dump_stack+0x1/0x2\n", 1.0)
        self.assertEqual(seen, [" dump_stack+0x1/0x2"])

    def test_system_info_is_the_latest_document(self):
        reg = BufferRegistry(2, 100, 10_000)
        reg.receive_system_info("a", SystemInfo(1.0, "old", "text"))
        reg.receive_system_info("a", SystemInfo(2.0, "{}", "json"))
        self.assertEqual(reg.get("a").system_info.text, "{}")

    def test_capture_replay_fills_buffer_exactly(self):
        reg = BufferRegistry(2, 100_000, 10_000_000)
        for i, gram in enumerate(datagrams("extended-sysrq-crash.txt")):
            reg.receive_datagram("192.0.2.10", gram, float(i))
        texts = [l.text for l in reg.get("192.0.2.10").buffer]
        self.assertEqual(texts, expected_lines("extended-sysrq-crash.txt"))

    def test_memory_stays_bounded_under_a_flood_of_sources(self):
        reg = BufferRegistry(50, 10, 1000)
        for n in range(5000):
            reg.receive_datagram(f"10.{n // 256}.{n % 256}.1", b"x" * 200 + b"\n" * 20, float(n))
        self.assertEqual(len(reg), 50)
        self.assertLessEqual(reg.buffered_bytes, 50 * 1000)
