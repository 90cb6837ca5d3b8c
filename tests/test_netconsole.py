"""Netconsole's wire format, without Twisted: real captures, table tests and properties."""

from __future__ import annotations

import random
import tracemalloc
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from tempesta_ts import netconsole
from tempesta_ts import sequence as netconsole_sequence
from tempesta_ts.netconsole import (
    RECORD_TEXT,
    Decoder,
    LogLine,
    SequenceTracker,
    parse_extended_header,
    unpack_record,
)
from tests.captures import EXTENDED_CAPTURES, PLAIN_CAPTURES, datagrams, expected_lines


def feed_all(decoder: Decoder, grams, start: float = 0.0) -> list:
    lines = []
    for i, gram in enumerate(grams):
        lines.extend(decoder.feed(gram, start + i * 0.001))
    return lines


def fragments(seq: int, body: bytes, cuts: list[int], header: bytes = b"4,{seq},1000,-") -> list:
    """The datagrams netconsole sends for `body` cut at the given offsets."""
    head = header.replace(b"{seq}", str(seq).encode())
    edges = [0] + sorted(set(c for c in cuts if 0 < c < len(body))) + [len(body)]
    return [
        head + b",ncfrag=%d/%d;" % (a, len(body)) + body[a:b] for a, b in zip(edges, edges[1:])
    ]


class CaptureReplayTests(unittest.TestCase):
    """What a real kernel sent comes out whole, once, in order."""

    def test_every_captured_line_comes_out_once_in_order(self):
        for name in PLAIN_CAPTURES + EXTENDED_CAPTURES:
            decoder = Decoder()
            lines = feed_all(decoder, datagrams(name)) + decoder.flush(1e9)
            self.assertEqual([l.text for l in lines], expected_lines(name), name)
            self.assertEqual(decoder.lost_messages, 0, name)

    def test_vendor_test_warning_arrives_in_both_formats(self):
        for name in ("plain-boot-and-warning.txt", "extended-boot-and-warning.txt"):
            texts = [l.text for l in feed_all(Decoder(), datagrams(name))]
            i = texts.index("WARNING test message")
            self.assertEqual(texts[i - 1 : i + 2], ["test-message", "WARNING test message", "after the warning"])

    def test_extended_lines_carry_level_seq_and_kernel_time(self):
        lines = feed_all(Decoder(), datagrams("extended-boot-and-warning.txt"))
        first = lines[0]
        self.assertTrue(first.text.startswith("Linux version 6.1.0-56-amd64"))
        self.assertEqual((first.level, first.seq, first.kernel_time_us), (5, 0, 0))
        warning = next(l for l in lines if l.text == "WARNING test message")
        # 12 is facility user (1) and level warning (4).
        self.assertEqual((warning.level, warning.seq, warning.kernel_time_us), (4, 374, 5674757))

    def test_plain_lines_have_the_timestamp_prefix_taken_into_kernel_time(self):
        lines = feed_all(Decoder(), datagrams("plain-boot-and-warning.txt"))
        warning = next(l for l in lines if l.text == "WARNING test message")
        self.assertEqual(warning.kernel_time_us, 6_055_580)
        self.assertIsNone(warning.seq)

    def test_dictionary_lines_are_attached_to_their_message_not_logged(self):
        lines = feed_all(Decoder(), datagrams("extended-boot-and-warning.txt"))
        acpi = next(l for l in lines if "_OSC: OS supports" in l.text)
        self.assertEqual(acpi.fields, (("SUBSYSTEM", "acpi"), ("DEVICE", "+acpi:PNP0A03:00")))
        self.assertFalse(any(l.text.startswith(" SUBSYSTEM=") for l in lines))

    def test_fragmented_message_is_reassembled(self):
        lines = feed_all(Decoder(), datagrams("extended-fragmented.txt"))
        long = next(l for l in lines if l.text.startswith("start 000"))
        self.assertEqual(long.text, "start " + "0" * 975 + " end")
        self.assertFalse(long.incomplete)

    def test_panic_trace_is_complete_in_both_formats(self):
        for name in ("plain-sysrq-crash.txt", "extended-sysrq-crash.txt"):
            texts = [l.text for l in feed_all(Decoder(), datagrams(name))]
            self.assertIn("Kernel panic - not syncing: sysrq triggered crash", texts, name)
            self.assertTrue(any(t.startswith("Call Trace:") for t in texts), name)


class PlainFormatTests(unittest.TestCase):
    """Plain console text: lines cut across datagrams, odd bytes, prefixes."""

    def test_line_cut_across_datagrams_is_joined(self):
        d = Decoder()
        self.assertEqual(d.feed(b"[    1.000000] first half, ", 0.0), [])
        self.assertTrue(d.has_pending)
        lines = d.feed(b"second half\n[    1.000001] next\n", 0.1)
        self.assertEqual([l.text for l in lines], ["first half, second half", "next"])
        self.assertFalse(d.has_pending)

    def test_partial_line_is_flushed_after_quiet(self):
        d = Decoder()
        d.feed(b"no newline yet", 10.0)
        self.assertEqual(d.expire(10.0 + netconsole.PARTIAL_LINE_SECONDS / 2), [])
        lines = d.expire(10.0 + netconsole.PARTIAL_LINE_SECONDS)
        self.assertEqual([l.text for l in lines], ["no newline yet"])
        self.assertFalse(d.has_pending)

    def test_utf8_character_cut_across_datagrams_is_whole(self):
        text = "тест ✓\n".encode()
        d = Decoder()
        lines = d.feed(text[:3], 0) + d.feed(text[3:], 0)
        self.assertEqual([l.text for l in lines], ["тест ✓"])

    def test_invalid_utf8_is_kept_visibly(self):
        lines = Decoder().feed(b"bad \xff\xfe bytes\n", 0)
        self.assertEqual([l.text for l in lines], ["bad \\xff\\xfe bytes"])

    def test_overlong_partial_line_is_cut_not_held(self):
        d = Decoder()
        lines = d.feed(b"x" * (netconsole.MAX_LINE_BYTES + 1), 0)
        self.assertEqual(len(lines), 1)
        self.assertFalse(d.has_pending)

    def test_prefixes(self):
        table = [
            (b"[    6.052722] test-message", "test-message", None, 6_052_722),
            (b"<4>[   12.000001] warned", "warned", 4, 12_000_001),
            (b"[12345.123456][    T1] caller id stays", "[    T1] caller id stays", None, 12_345_123_456),
            (b"no prefix at all", "no prefix at all", None, None),
            (b"[not a time] text", "[not a time] text", None, None),
        ]
        for raw, text, level, usec in table:
            line = netconsole.parse_plain_line(raw, 0)
            self.assertEqual((line.text, line.level, line.kernel_time_us), (text, level, usec), raw)

    def test_blank_lines_are_skipped(self):
        lines = Decoder().feed(b"\n\r\none\n\n", 0)
        self.assertEqual([l.text for l in lines], ["one"])


class ExtendedFormatTests(unittest.TestCase):
    """Extended format: headers, release prepend, escapes, fragments, sequence numbers."""

    def test_header_table(self):
        table = [
            (b"6,1,0,-;x", (6, 1, 0, None, None, None)),
            (b"12,373,9650092,-,ncfrag=0/986;x", (12, 373, 9650092, None, 0, 986)),
            (b"6.12.9,4,5,6,-;x", (4, 5, 6, "6.12.9", None, None)),
            (b"6.12.9-tfw,4,5,6,c,caller=T12;x", (4, 5, 6, "6.12.9-tfw", None, None)),
            (b"6,1,0,+,caller=C0,ncfrag=10/20;0123456789", (6, 1, 0, None, 10, 20)),
        ]
        for raw, want in table:
            header, _ = parse_extended_header(raw)
            got = (header.level, header.seq, header.time_us, header.release, header.frag_offset, header.frag_total)
            self.assertEqual(got, want, raw)

    def test_text_that_only_looks_odd_is_plain(self):
        for raw in (b"hello; world", b"1,2;three", b"a,b,c,d;e", b"6,1,x,-;y", b"", b";;;;;;;;"):
            self.assertIsNone(parse_extended_header(raw), raw)

    def test_release_prepend_is_kept_as_the_kernel_release(self):
        d = Decoder()
        lines = d.feed(b"6.12.9,6,0,0,-;Linux version 6.12.9\n", 0)
        self.assertEqual(lines[0].text, "Linux version 6.12.9")
        self.assertEqual(d.release, "6.12.9")

    def test_sysdata_release_and_userdata_are_fields(self):
        d = Decoder()
        gram = b"4,7,100,-;hello\n cpu=1\n taskname=bash\n release=6.15.0\n msgid=3\n dc=eu-1\n"
        (line,) = d.feed(gram, 0)
        self.assertEqual(line.text, "hello")
        self.assertEqual(dict(line.fields)["taskname"], "bash")
        self.assertEqual(dict(line.fields)["dc"], "eu-1")
        self.assertEqual(d.release, "6.15.0")

    def test_escaped_bytes_are_unescaped_and_newlines_split_lines(self):
        (a, b) = Decoder().feed(b"6,1,0,-;one\\x0atwo \\x5c \\xe2\\x9c\\x93\n", 0)
        self.assertEqual((a.text, b.text), ("one", "two \\ \u2713"))
        self.assertEqual((a.seq, b.seq), (1, 1))

    def test_fragments_in_any_order_reassemble(self):
        body = b"A" * 1500 + b"\n SUBSYSTEM=net\n"
        grams = fragments(9, body, [700, 1400])
        for order in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):
            d = Decoder()
            lines = []
            for i in order:
                lines += d.feed(grams[i], 0)
            self.assertEqual([l.text for l in lines], ["A" * 1500], order)
            self.assertEqual(lines[0].fields, (("SUBSYSTEM", "net"),))
            self.assertFalse(d.has_pending)

    def test_missing_fragment_is_kept_incomplete_after_timeout(self):
        stats = Counter()
        d = Decoder(stats)
        grams = fragments(3, b"B" * 1200 + b"\n", [600])
        self.assertEqual(d.feed(grams[0], 0.0), [])
        self.assertEqual(d.expire(netconsole.FRAGMENT_SECONDS - 0.1), [])
        (line,) = d.expire(netconsole.FRAGMENT_SECONDS)
        self.assertTrue(line.incomplete)
        self.assertTrue(line.text.startswith("B" * 600))
        self.assertTrue(line.text.endswith("[...]"))
        self.assertEqual(stats["fragments_expired"], 1)

    def test_absurd_fragment_headers_are_malformed_not_held(self):
        stats = Counter()
        d = Decoder(stats)
        for raw in (
            b"4,1,0,-,ncfrag=0/999999999;x",
            b"4,1,0,-,ncfrag=0/0;x",
            b"4,1,0,-,ncfrag=90/100;" + b"x" * 20,
            b"4,1,0,-,ncfrag=a/b;x",
        ):
            self.assertEqual(d.feed(raw, 0), [], raw)
        self.assertEqual(stats["malformed_datagrams"], 4)
        self.assertFalse(d.has_pending)

    def test_pending_messages_per_instance_are_bounded(self):
        d = Decoder()
        out = []
        for seq in range(netconsole.MAX_PENDING_MESSAGES + 5):
            out += d.feed(fragments(seq, b"C" * 100 + b"\n", [50])[0], 0)
        self.assertEqual(len(out), 5)
        self.assertTrue(all(l.incomplete for l in out))
        self.assertEqual(len(d._pending), netconsole.MAX_PENDING_MESSAGES)


class SequenceTests(unittest.TestCase):
    """Gaps count as lost, duplicates drop, a reboot restarts the numbering."""

    def test_gap_counts_lost_messages(self):
        d = Decoder()
        for seq in (0, 1, 5, 6):
            d.feed(b"6,%d,0,-;m\n" % seq, 0)
        self.assertEqual(d.lost_messages, 3)

    def test_duplicates_are_dropped(self):
        stats = Counter()
        d = Decoder(stats)
        out = []
        for seq in (5, 6, 6, 7, 5):
            out += d.feed(b"6,%d,0,-;m%d\n" % (seq, seq), 0)
        self.assertEqual([l.text for l in out], ["m5", "m6", "m7"])
        self.assertEqual(stats["duplicate_messages"], 2)
        self.assertEqual(d.lost_messages, 0)

    def test_late_message_fills_its_gap(self):
        t = SequenceTracker()
        self.assertEqual([t.accept(s) for s in (10, 12, 11)], [True, True, True])
        self.assertEqual(t.lost, 0)

    def test_reboot_restarts_numbering_without_loss(self):
        t = SequenceTracker()
        for seq in range(3000, 3100):
            t.accept(seq)
        self.assertTrue(t.accept(0))
        self.assertTrue(t.accept(1))
        self.assertEqual(t.lost, 0)
        self.assertEqual(t.highest, 1)

    def test_short_lived_instance_reboot_is_a_restart(self):
        t = SequenceTracker()
        for seq in range(0, 50):
            t.accept(seq)
        # Seq 0 starts every boot's numbering, so it is taken even though 0 was seen.
        self.assertEqual([t.accept(s) for s in (0, 1, 2)], [True, True, True])
        self.assertEqual(t.lost, 0)

    def test_first_datagrams_overtaken_are_not_a_restart(self):
        t = SequenceTracker()
        self.assertEqual([t.accept(s) for s in (101, 100, 102, 103)], [True] * 4)
        self.assertEqual((t.lost, t.highest), (0, 103))


class RebootTests(unittest.TestCase):
    """A reboot whose first messages were filtered out is told by the kernel clock."""

    def test_new_boot_within_the_window_is_not_taken_for_duplicates(self):
        t = SequenceTracker()
        for seq in range(800):
            self.assertTrue(t.accept(seq, seq * 10_000))
        accepted = [t.accept(seq, (seq - 300) * 10_000) for seq in range(300, 810)]
        self.assertEqual(accepted, [True] * 510)
        self.assertEqual(t.lost, 0)

    def test_late_message_after_a_long_jump_is_not_a_duplicate(self):
        t = SequenceTracker()
        t.accept(100, 1_000)
        t.accept(1200, 2_000)
        self.assertTrue(t.accept(1199, 1_999))
        self.assertEqual(t.lost, 1098)

    def test_very_late_message_is_not_a_reboot(self):
        t = SequenceTracker()
        for seq in range(0, 5000, 2):
            t.accept(seq, seq * 100)
        lost = t.lost
        # Never seen (only even numbers were): kept, though too late to count.
        self.assertTrue(t.accept(3001, 3001 * 100))
        t.accept(4999, 4999 * 100)
        self.assertEqual((t.lost, t.highest), (lost, 4999))

    def test_duplicate_has_the_same_time(self):
        t = SequenceTracker()
        for seq in range(10):
            t.accept(seq, 5_000_000 + seq)
        self.assertFalse(t.accept(4, 5_000_004))


PANIC = b"Kernel panic - not syncing: Fatal exception in interrupt"


def extended(seq: int, usec: int, text: bytes) -> bytes:
    return b"6,%d,%d,-;%s\n" % (seq, usec, text)


class StrayNumberTests(unittest.TestCase):
    """Sequence numbers count losses and duplicates; they never hide a line (issue 9, item 2)."""

    def test_an_absurd_sequence_number_hides_nothing_after_it(self):
        stats = Counter()
        d = Decoder(stats)
        grams = [extended(s, 1_000_000 + s, b"line %d" % s) for s in range(10)]
        grams += [b"6,9999999999999999999,1010300,-;forged\n", extended(10, 1_010_400, PANIC)]
        grams += [extended(s, 1_010_400 + s, b"line %d" % s) for s in range(11, 20)]
        texts = [l.text for l in feed_all(d, grams)]
        self.assertIn(PANIC.decode(), texts)
        self.assertEqual(len(texts), 21)
        self.assertEqual((d.lost_messages, stats["duplicate_messages"]), (0, 0))
        self.assertEqual(stats["out_of_order_messages"], 1)

    def test_a_forged_number_within_the_bound_does_not_poison_the_tracker(self):
        for forged in (netconsole_sequence.MAX_SEQ, 150, 10**9, 0, 3):
            d = Decoder()
            grams = [extended(s, 5_000_000 + s, b"x") for s in range(100, 110)]
            grams.append(extended(forged, 5_000_200, b"forged"))
            grams += [extended(s, 5_000_300 + s, b"x") for s in range(110, 200)]
            # A real loss after it is still counted.
            grams += [extended(s, 5_000_400 + s, b"x") for s in range(205, 210)]
            lines = feed_all(d, grams)
            self.assertEqual(len(lines), 10 + 1 + 90 + 5, forged)
            self.assertEqual((d.lost_messages, d.sequence.highest), (5, 209), forged)

    def test_two_kernels_at_one_address_lose_no_line(self):
        # (first number, kernel time) of each: B lower, higher, near, far; booted before/after.
        table = [
            ((5000, 9_000_000_000), (200, 3_000_000_000)),
            ((200, 3_000_000_000), (5000, 9_000_000_000)),
            ((5000, 3_000_000_000), (200, 9_000_000_000)),
            ((1000, 9_000_000_000), (1100, 9_000_500_000)),
            ((1100, 9_000_500_000), (1000, 9_000_000_000)),
            ((10, 1_000_000), (12, 1_000_000)),
        ]
        for (a_seq, a_time), (b_seq, b_time) in table:
            stats = Counter()
            d = Decoder(stats)
            grams = []
            for i in range(300):
                grams.append(extended(a_seq + i, a_time + i * 1000, b"A %d" % i))
                grams.append(extended(b_seq + i, b_time + i * 1000, b"B %d" % i))
            grams.append(extended(b_seq + 300, b_time + 300_000, PANIC))
            texts = [l.text for l in feed_all(d, grams)]
            self.assertEqual(len(texts), 601, (a_seq, b_seq))
            self.assertEqual(texts[-1], PANIC.decode())
            self.assertEqual(stats["duplicate_messages"], 0)
            # The loss counts mean nothing here, but they stay bounded.
            self.assertLessEqual(d.lost_messages, netconsole_sequence.MAX_GAP)

    def test_the_same_message_twice_is_dropped_once(self):
        # Two netconsole targets on one collector: each message twice, in order or not.
        for order in ("paired", "interleaved"):
            stats = Counter()
            d = Decoder(stats)
            grams = [extended(s, 7_000_000 + s * 10, b"m%d" % s) for s in range(1000, 1100)]
            if order == "paired":
                twice = [g for g in grams for _ in range(2)]
            else:
                twice = [g for pair in zip(grams[0::2], grams[1::2]) for g in pair * 2]
            texts = [l.text for l in feed_all(d, twice)]
            self.assertEqual(texts, ["m%d" % s for s in range(1000, 1100)], order)
            self.assertEqual((stats["duplicate_messages"], d.lost_messages), (100, 0), order)

    def test_another_message_under_a_number_seen_is_kept(self):
        stats = Counter()
        d = Decoder(stats)
        feed_all(d, [extended(s, 2_000_000 + s, b"x") for s in range(10)])
        (line,) = d.feed(extended(5, 2_000_500, PANIC), 1.0)
        self.assertEqual(line.text, PANIC.decode())
        self.assertEqual((stats["out_of_order_messages"], stats["duplicate_messages"]), (1, 0))

    def test_one_jump_adds_at_most_max_gap_to_the_loss(self):
        t = SequenceTracker()
        t.accept(10, 1_000)
        # A jump is taken once a second message continues it; within one boot it is a loss.
        self.assertEqual([t.accept(s, 2_000 + s) for s in (10**12, 10**12 + 1)], [True, True])
        self.assertEqual((t.lost, t.highest), (netconsole_sequence.MAX_GAP, 10**12 + 1))
        self.assertTrue(t.accept(2**63, 3_000))
        self.assertEqual(t.lost, netconsole_sequence.MAX_GAP)

    def test_messages_at_kernel_time_0_are_told_by_their_text(self):
        # tempesta-ts-probe numbers every run from 0, at time 0; some runs send a warning.
        stats = Counter()
        d = Decoder(stats)
        grams = [b"6,0,0,-;probe %s\n" % run for run in (b"a", b"b", b"c")]
        grams += [b"6,0,0,-;probe d\n", b"4,1,0,-;warning d\n", b"6,0,0,-;probe e\n"]
        grams += [b"6,0,0,-;probe f\n", b"4,1,0,-;warning f\n"]
        texts = [l.text for l in feed_all(d, grams)]
        self.assertEqual(len(texts), len(grams))
        self.assertEqual(stats["duplicate_messages"], 0)
        # Early boot lines (time 0) sent to two targets: each once.
        stats = Counter()
        d = Decoder(stats)
        grams = [extended(s, 0, b"boot %d" % s) for s in range(5) for _ in range(2)]
        texts = [l.text for l in feed_all(d, grams)]
        self.assertEqual(texts, ["boot %d" % s for s in range(5)])
        self.assertEqual(stats["duplicate_messages"], 5)

    def test_a_reboot_sent_to_two_targets_gives_its_first_line_once(self):
        stats = Counter()
        d = Decoder(stats)
        feed_all(d, [extended(s, 90_000_000 + s, b"old") for s in range(3000, 3100)])
        grams = [extended(0, 0, b"Linux version"), extended(1, 0, b"Command line")]
        texts = [l.text for l in feed_all(d, [g for g in grams for _ in range(2)])]
        self.assertEqual(texts, ["Linux version", "Command line"])
        self.assertEqual((d.sequence.highest, d.lost_messages, stats["sequence_restarts"]), (1, 0, 1))


def overlapping_attack(messages: int = 16, fragments: int = 200, size: int = 64_000):
    """From one source: each message sent as fragments at offsets 0, 1, 2... of `size` bytes.

    Made one at a time: all of them would take 200 MB."""
    for seq in range(messages):
        for offset in range(fragments):
            yield b"4,%d,1000,-,ncfrag=%d/65000;" % (seq, offset) + bytes([65 + seq % 26]) * size


class FragmentBoundTests(unittest.TestCase):
    """A fragmented message never holds more than it declares (issue 9, item 3a)."""

    def test_overlapping_fragments_hold_no_more_than_their_declared_length(self):
        stats = Counter()
        d = Decoder(stats)
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        before = tracemalloc.get_traced_memory()[0]
        longest = held = now = 0
        # Not enumerate() nor zip(): they keep their last pair, and so a datagram, for reuse.
        for gram in overlapping_attack():
            now += 0.0001
            lines = d.feed(gram, now)
            longest = max([longest] + [len(l.text) for l in lines])
            del lines, gram
            # Measured, not taken from the decoder: what it holds after each datagram.
            held = max(held, tracemalloc.get_traced_memory()[0] - before)
        # MAX_PENDING_BYTES (512 KiB) and some bookkeeping; it was 200 MiB.
        self.assertLess(held, 576 * 1024)
        self.assertLessEqual(d.pending_bytes, netconsole.MAX_PENDING_BYTES)
        lines = d.flush(1.0)
        longest = max([longest] + [len(l.text) for l in lines])
        self.assertLessEqual(longest, 65_000 + len(" [...]"))
        self.assertTrue(all(l.incomplete for l in lines))
        self.assertEqual(stats["fragments_overlapping"], 16 * 199)
        self.assertEqual(d.pending_bytes, 0)

    def test_fragments_that_repeat_or_overlap_still_make_the_message(self):
        body = b"0123456789" * 150 + b"\n"
        grams = fragments(5, body, [500, 1000])
        # A second target sends it all again; a stray fragment overlaps two of them.
        extra = b"4,5,1000,-,ncfrag=400/%d;" % len(body) + body[400:700]
        stats = Counter()
        d = Decoder(stats)
        lines = feed_all(d, [grams[0], extra, grams[1], grams[2]] + grams)
        self.assertEqual([l.text for l in lines], [body[:-1].decode()])
        # The stray overlaps the first fragment, and the second overlaps the stray.
        self.assertEqual((stats["fragments_overlapping"], stats["duplicate_messages"]), (2, 1))
        self.assertFalse(d.has_pending)

    def test_gaps_of_an_incomplete_message_are_marked_where_they_are(self):
        body = b"A" * 300 + b"B" * 300 + b"C" * 300 + b"\n"
        grams = fragments(8, body, [300, 600, 900])
        d = Decoder()
        feed_all(d, [grams[1]])
        (line,) = d.flush(1.0)
        self.assertEqual(line.text, " [...] " + "B" * 300 + " [...]")
        d = Decoder()
        feed_all(d, [grams[0], grams[2]])
        (line,) = d.flush(2.0)
        self.assertEqual(line.text, "A" * 300 + " [...] " + "C" * 300 + " [...]")

    def test_a_first_fragment_alone_holds_no_more_than_itself(self):
        # Many sources flooding first fragments that announce 60,000 bytes (bench/memory.py).
        d = Decoder()
        d.feed(b"6,1,2,-,ncfrag=0/60000;" + b"x" * 100, 0)
        self.assertEqual(d.pending_bytes, 2 * 100)
        d.feed(b"6,1,2,-,ncfrag=59900/60000;" + b"y" * 100, 0)
        self.assertEqual(d.pending_bytes, 2 * 60_000)

    def test_declared_length_above_the_kernels_largest_is_malformed(self):
        stats = Counter()
        d = Decoder(stats)
        d.feed(b"4,1,0,-,ncfrag=0/%d;x" % (netconsole.MAX_MESSAGE_BYTES + 1), 0)
        d.feed(b"4,2,0,-,ncfrag=0/%d;x" % netconsole.MAX_MESSAGE_BYTES, 0)
        self.assertEqual((stats["malformed_datagrams"], d.pending_messages), (1, 1))


class LongLineTests(unittest.TestCase):
    """A line longer than its buffer may hold is cut with a marker, on every path."""

    def test_a_line_longer_than_the_limit_is_cut_with_a_marker(self):
        text = "x" * 3000
        body = text.encode() + b"\n"
        for name, grams in (
            ("common", [b"6,1,2,-;" + body]),
            ("dictionary", [b"6,1,2,-;" + body + b" SUBSYSTEM=x\n"]),
            ("fragments", fragments(1, body, [1000, 2000])),
            ("plain", [body]),
            ("plain, not ASCII", ["é".encode() * 1500 + b"\n"]),
        ):
            stats = Counter()
            d = Decoder(stats, max_line_bytes=1024)
            (line,) = feed_all(d, grams)
            self.assertLessEqual(len(line.text.encode()), 1024, name)
            self.assertTrue(line.text.endswith(" [line of 3000 bytes cut]"), name)
            self.assertEqual(stats["long_lines_cut"], 1, name)

    def test_a_line_within_the_limit_is_whole(self):
        d = Decoder(max_line_bytes=1024)
        body = b"y" * (1024 - len("6,1,2,-;\n"))
        (line,) = d.feed(b"6,1,2,-;" + body + b"\n", 0)
        self.assertEqual(line.text, body.decode())
        (line,) = d.feed(b"z" * 1024 + b"\n", 0)
        self.assertEqual(line.text, "z" * 1024)


class PropertyTests(unittest.TestCase):
    """Properties over generated input."""

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=2048))
    def test_any_bytes_never_raise(self, data):
        d = Decoder()
        d.feed(data, 0)
        d.feed(b"6,1,2,-,ncfrag=" + data[:40] + b";" + data, 1)
        d.expire(1e6)
        d.flush(1e6)

    @settings(max_examples=200, deadline=None)
    @given(
        st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=3000),
        st.lists(st.integers(min_value=1, max_value=3000), max_size=6),
        st.randoms(use_true_random=False),
    )
    def test_any_split_in_any_order_reassembles(self, text, cuts, rnd):
        escaped = "".join(
            c if " " <= c < "\x7f" and c != "\\" else "".join("\\x%02x" % b for b in c.encode())
            for c in text
        ).encode()
        body = escaped + b"\n"
        grams = fragments(42, body, cuts)
        rnd.shuffle(grams)
        d = Decoder()
        lines = feed_all(d, grams)
        expected = [t for t in text.split("\n") if t] or [""]
        self.assertEqual([l.text for l in lines], expected)
        self.assertFalse(d.has_pending)

    @settings(max_examples=100, deadline=None)
    @given(st.lists(st.integers(min_value=1, max_value=200), max_size=10))
    def test_any_split_of_plain_text_gives_the_same_lines(self, cuts):
        text = b"".join(datagrams("plain-sysrq-crash.txt")[:40])
        edges = [0] + sorted(set(c for c in cuts if c < len(text))) + [len(text)]
        d = Decoder()
        lines = feed_all(d, [text[a:b] for a, b in zip(edges, edges[1:])])
        whole = Decoder().feed(text, 0)
        self.assertEqual([l.text for l in lines], [l.text for l in whole])


class FastPathTests(unittest.TestCase):
    """The packed record of the common datagram decodes as the general path does."""

    @settings(max_examples=300)
    @given(
        st.sampled_from([b"", b"6.12.9-tempesta,", b"5,"]),
        st.integers(0, 255),
        st.one_of(st.integers(0, 2**40), st.integers(2**63, 10**21)),
        st.integers(0, 2**40),
        st.sampled_from(b"-c+"),
        st.sampled_from([b"", b",caller=T123", b",caller=C1"]),
        st.binary(max_size=300),
        st.sampled_from([b"", b"\n", b"\n SUBSYSTEM=net\n"]),
    )
    def test_fast_path_agrees_with_the_general_path(self, release, level, seq, usec, flag, caller, text, tail):
        gram = release + b"%d,%d,%d,%c" % (level, seq, usec, flag) + caller + b";" + text + tail
        fast, general = Decoder(), Decoder()
        self.assertEqual(fast.feed(gram, 1.0), general.feed_other(gram, 1.0))
        self.assertEqual(fast.release, general.release)
        self.assertEqual(fast.feed(gram, 2.0), general.feed_other(gram, 2.0))

    @settings(max_examples=300)
    @given(
        st.sampled_from([b"", b"<4>", b"<12>", b"<x>"]),
        st.sampled_from([b"", b"[    6.052722] ", b"[12345.123456]", b"[  1.2] ", b"[    0.000000] "]),
        st.binary(max_size=300),
        st.sampled_from([b"", b"\n", b"\r\n", b"\n\n"]),
    )
    def test_plain_fast_path_agrees_with_the_general_path(self, level, time, text, tail):
        gram = level + time + text + tail
        fast, general = Decoder(), Decoder()
        self.assertEqual(fast.feed(gram, 1.0), general.feed_other(gram, 1.0))
        self.assertEqual(fast.feed(gram, 2.0), general.feed_other(gram, 2.0))
        self.assertEqual(fast.flush(3.0), general.flush(3.0))

    @settings(max_examples=500)
    @given(
        st.sampled_from([b"", b"6,", b"6.1.0,", b"6.1.0,6,", b"4,7,", b"[ 1.000000] ", b"<6>"]),
        st.binary(max_size=200),
    )
    def test_any_datagram_decodes_the_same_on_both_paths(self, start, rest):
        gram = start + rest
        fast, general = Decoder(), Decoder()
        self.assertEqual(fast.feed(gram, 1.0), general.feed_other(gram, 1.0))
        self.assertEqual(fast.release, general.release)
        self.assertEqual(fast.stats, general.stats)

    def test_plain_line_is_kept_as_its_text_and_a_fixed_header(self):
        gram = b"<4>[   12.000001] WARNING: CPU: 0 PID: 1 at kernel/x.c:1\n"
        record = Decoder().record(gram, 5.0)
        self.assertEqual(
            unpack_record(record)[0],
            LogLine(5.0, "WARNING: CPU: 0 PID: 1 at kernel/x.c:1", 4, None, 12_000_001),
        )

    def test_a_merged_console_line_takes_the_general_path_whole(self):
        # Another writer's text before a kernel time stamp: no record (its observers must see
        # it), the line kept whole, with no kernel time of its own.
        gram = b"syzkaller login: [   16.305150] INFO: task syz:3795 blocked for more than 143 seconds.\n"
        self.assertIsNone(Decoder().record(gram, 1.0))
        self.assertEqual(
            Decoder().feed(gram, 1.0),
            [LogLine(1.0, gram[:-1].decode())],
        )
        self.assertIsNotNone(Decoder().record(b"syzkaller login: [tempesta fw] not a stamp\n", 1.0))

    def test_a_comma_early_in_a_line_decodes_as_on_the_general_path(self):
        gram = b"[    1.000000] a,6,1,2,-;x\n"
        self.assertEqual(Decoder().feed(gram, 1.0), Decoder().feed_other(gram, 1.0))
        self.assertIsNone(Decoder().record(b"12345,6,1,2,-;all digits is no release\n", 1.0))

    def test_common_datagram_is_kept_as_its_text_and_a_fixed_header(self):
        gram = b"6,42,1000,-;[tempesta fw] Warning: frang: connections rate exceeded\n"
        record = Decoder().record(gram, 5.0)
        self.assertEqual(len(record), RECORD_TEXT + len(gram) - len(b"6,42,1000,-;\n"))
        self.assertEqual(
            unpack_record(record)[0],
            LogLine(5.0, "[tempesta fw] Warning: frang: connections rate exceeded", 6, 42, 1000),
        )

    def test_a_release_change_is_seen_by_both_paths(self):
        d = Decoder()
        d.feed(b"6.1.0,6,1,1000,-;one\n", 1.0)
        d.feed(b"6.2.0,6,2,10,-;again\n SUBSYSTEM=x\n", 2.0)
        self.assertEqual(d.release, "6.2.0")
        d.feed(b"6.1.0,6,3,20,-;back\n", 3.0)
        self.assertEqual(d.release, "6.1.0")


class ShuffledCaptureTests(unittest.TestCase):
    """Reordering of a real extended capture loses nothing and counts nothing lost."""

    def test_reordered_extended_datagrams_lose_nothing(self):
        grams = datagrams("extended-boot-and-warning.txt")
        rnd = random.Random(7)
        # Swap neighbours, as a congested network does, not whole-sale shuffling.
        for i in range(0, len(grams) - 1, 3):
            if rnd.random() < 0.5:
                grams[i], grams[i + 1] = grams[i + 1], grams[i]
        d = Decoder()
        lines = feed_all(d, grams)
        self.assertEqual(sorted(l.text for l in lines), sorted(expected_lines("extended-boot-and-warning.txt")))
        self.assertEqual(d.lost_messages, 0)
