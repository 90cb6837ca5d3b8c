"""The archive's queue: every instance's lines in one list, checked as one block, each
instance's lines back in order, the journal's block read back, the newest kept past a bound."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from tempesta_ts import archive_queue
from tempesta_ts.archive_format import Stamps
from tempesta_ts.buffers import BufferRegistry
from tempesta_ts.netconsole import Decoder, LogLine

T = 1_795_000_000.123456  # 2026-11-18T11:06:40.123456Z
A, B = archive_queue.tag("10.0.0.1"), archive_queue.tag("2001:db8::1")


def stamp(when: float) -> bytes:
    return archive_queue.stamp(Stamps().prefix(when))


def by_instance(items: list[bytes]) -> dict[str, bytes]:
    groups: dict[bytes, list[bytes]] = {}
    archive_queue.demux(items, groups)
    return {archive_queue.name_of(tag): b"".join(pieces) for tag, pieces in groups.items()}


class QueueTests(unittest.TestCase):

    def test_a_second_of_two_instances_goes_to_each_in_order(self):
        items = [stamp(T), A, b"6,1,1,-;one\n", B, b"6,7,7,-;seven\n", stamp(T + 0.5),
                 A, b"6,2,2,-;two\n", *archive_queue.made(B, [LogLine(T + 0.6, "made", 4, 8, 8)])]
        block, checked, lines = archive_queue.block_of(items, 2)
        self.assertIs(checked, items)
        self.assertEqual(lines, 4)
        self.assertEqual(by_instance(items), {
            "10.0.0.1": b"2026-11-18T11:06:40.123456Z 6,1,1,-;one\n"
                        b"2026-11-18T11:06:40.623456Z 6,2,2,-;two\n",
            "2001-db8--1": b"2026-11-18T11:06:40.123456Z 6,7,7,-;seven\n"
                           b"2026-11-18T11:06:40.723456Z 4,8,8,-;made\n",
        })
        # The journal's block gives the same back.
        self.assertEqual(archive_queue.items_of(block), items)

    def test_a_datagram_holding_separators_cannot_write_to_another_instance(self):
        forged = b"6,1,1,-;x\n" + B + b"6,9,9,-;forged\n"
        items = [stamp(T), A, forged]
        block, checked, lines = archive_queue.block_of(items, 1)
        self.assertEqual(lines, 1)
        self.assertEqual(list(by_instance(checked)), ["10.0.0.1"])
        self.assertEqual(by_instance(archive_queue.items_of(block)), by_instance(checked))
        (line,) = by_instance(checked)["10.0.0.1"].splitlines()
        self.assertIn(b"\\x1e2001-db8--1\\x1f", line)

    def test_a_datagram_without_its_newline_gets_one(self):
        items = [stamp(T), A, b"6,1,1,-;no newline", A, b"6,2,2,-;fine\n"]
        _, checked, lines = archive_queue.block_of(items, 1)
        self.assertEqual(lines, 2)
        self.assertEqual(by_instance(checked)["10.0.0.1"].count(b"\n"), 2)

    def test_a_block_cut_short_gives_its_whole_lines_back(self):
        items = [stamp(T), A, b"6,1,1,-;one\n", B, b"6,2,2,-;two\n"]
        block, _, _ = archive_queue.block_of(items, 1)
        self.assertEqual(by_instance(archive_queue.items_of(block[: block.index(B) + 3])),
                         by_instance(items[:3]))

    def test_past_a_bound_the_newest_lines_are_kept_after_their_receive_time(self):
        items = [stamp(T), A, b"6,1,1,-;1\n", A, b"6,2,2,-;2\n", stamp(T + 1), A, b"6,3,3,-;3\n"]
        self.assertEqual(archive_queue.newest(items, 2),
                         ([stamp(T), A, b"6,2,2,-;2\n", stamp(T + 1), A, b"6,3,3,-;3\n"], 1, 2))
        self.assertEqual(archive_queue.newest(items, 1), ([stamp(T + 1), A, b"6,3,3,-;3\n"], 2, 1))
        self.assertEqual(archive_queue.newest(items, 5), (items, 0, 2))
        self.assertEqual(archive_queue.newest(items, 0), ([], 3, 0))

    def test_the_lines_of_one_instance_are_taken_a_few_at_a_time(self):
        items = [stamp(T)]
        for n in range(5):
            items += [A, b"6,%d,1,-;x\n" % n]
        groups: dict = {}
        position, prefix, left = archive_queue.demux(items, groups, lines=2)
        self.assertEqual((position, left, len(groups[A])), (5, 0, 4))
        position, prefix, left = archive_queue.demux(items, groups, position, prefix, 10)
        self.assertEqual((position, left, len(groups[A])), (11, 7, 10))
        self.assertEqual(b"".join(groups[A]).count(b"2026-11-18T11:06:40.123456Z "), 5)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.tuples(st.booleans(), st.binary(max_size=60)), min_size=1, max_size=8))
    def test_any_datagrams_stay_one_line_each_of_their_instance(self, sent):
        # What the path of a datagram queues as it came: what the decoder takes whole.
        sent = [(first, datagram) for first, datagram in sent if Decoder().record(datagram, T)]
        if not sent:
            return
        items = [stamp(T)]
        for first, datagram in sent:
            items += [A if first else B, datagram]
        block, checked, lines = archive_queue.block_of(items, 1)
        self.assertEqual(lines, len(sent))
        out = by_instance(checked)
        for tag, name in ((A, "10.0.0.1"), (B, "2001-db8--1")):
            self.assertEqual(out.get(name, b"").count(b"\n"), sum(1 for first, _ in sent
                                                                  if first == (tag is A)))
        self.assertEqual(by_instance(archive_queue.items_of(block)), out)

    def test_a_newline_in_a_kernel_release_cannot_split_a_line_nor_hide_the_next_ones(self):
        # The release netconsole may send before the header: a datagram the decoder takes
        # whole goes to the queue as it came, unless block_of sees it is not one line.
        registry = BufferRegistry(10, 100, 10**6, keep_unwritten=True)
        for address, datagram in (("10.0.0.1", b"ab\ncd,6,1,0,-;hello"),
                                  ("2001:db8::1", b"6,2,2,-;two\n"),
                                  ("10.0.0.1", b"6,3,3,-;three\n")):
            registry.receive_datagram(address, datagram, T)
        block, checked, lines = archive_queue.block_of(*registry.take_unwritten())
        out = by_instance(checked)
        self.assertEqual(out["10.0.0.1"].count(b"\n"), 2)
        self.assertTrue(all(line.startswith(b"2026-11-18T11:06:40.123456Z ")
                            for line in out["10.0.0.1"].splitlines()))
        # Read back from the journal after a kill: every instance's lines, none lost.
        self.assertEqual(by_instance(archive_queue.items_of(block)), out)
