"""The UDP listener, driven by direct datagramReceived calls (MemoryReactor has no UDP)."""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections import Counter

from twisted.internet import defer, reactor, task
from twisted.internet.error import CannotListenError
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from tempesta_ts import netconsole
from tempesta_ts.access import SourceFilter
from tempesta_ts.buffers import BufferRegistry
from tempesta_ts.incidents import Rules
from tempesta_ts.intake import Intake
from tempesta_ts.tracker import IncidentTracker
from tempesta_ts.udp import (
    MIN_BUFFER_TO_REST,
    READ_PAUSE_SECONDS,
    NetconsolePort,
    NetconsoleProtocol,
    enlarge_receive_buffer,
    listen_netconsole,
)
from tests.captures import datagrams, expected_lines
from tests.waits import wait_until


def make(allowed=()):
    clock = task.Clock()
    stats = Counter()
    registry = BufferRegistry(100, 10_000, 10_000_000, stats)
    sources = SourceFilter(ipaddress.ip_network(n) for n in allowed)
    return NetconsoleProtocol(Intake(registry, clock, sources, stats)), registry, clock, stats


class NetconsoleProtocolTests(unittest.TestCase):
    """Datagrams in, buffers filled; bad input is counted and never escapes."""

    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def test_datagrams_fill_the_instance_buffer(self):
        proto, registry, clock, stats = make()
        for gram in datagrams("plain-boot-and-warning.txt"):
            clock.advance(0.001)
            proto.datagramReceived(gram, ("192.0.2.10", 6665))
        texts = [l.text for l in registry.get("192.0.2.10").buffer]
        self.assertEqual(texts, expected_lines("plain-boot-and-warning.txt"))
        self.assertEqual(stats["datagrams"], len(datagrams("plain-boot-and-warning.txt")))

    def test_ipv4_mapped_sources_are_the_ipv4_instance(self):
        proto, registry, _, _ = make()
        proto.datagramReceived(b"hello\n", ("::ffff:192.0.2.7", 6665, 0, 0))
        self.assertIsNotNone(registry.get("192.0.2.7"))

    def test_sources_outside_allowed_sources_are_rejected_and_logged_once_a_minute(self):
        proto, registry, clock, stats = make(allowed=["10.0.0.0/8"])
        for _ in range(100):
            proto.datagramReceived(b"x\n", ("192.0.2.1", 6665))
        proto.datagramReceived(b"x\n", ("10.1.2.3", 6665))
        self.assertIsNone(registry.get("192.0.2.1"))
        self.assertIsNotNone(registry.get("10.1.2.3"))
        self.assertEqual(stats["sources_rejected"], 100)
        notices = [e for e in self.events if "Rejected UDP from 192.0.2.1" in formatEvent(e)]
        self.assertEqual(len(notices), 1)
        clock.advance(61)
        proto.datagramReceived(b"x\n", ("192.0.2.1", 6665))
        notices = [e for e in self.events if "Rejected UDP from 192.0.2.1" in formatEvent(e)]
        self.assertEqual((len(notices), notices[-1]["held"]), (2, 99))

    def test_a_failure_inside_never_escapes_and_is_logged_once_per_burst(self):
        proto, registry, clock, stats = make()

        def broken(*args):
            raise RuntimeError("boom")

        registry.receive_datagram = broken
        for _ in range(50):
            proto.datagramReceived(b"x\n", ("192.0.2.1", 6665))
        self.assertEqual(stats["udp_errors"], 50)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_one_failing_datagram_of_a_batch_does_not_stop_the_rest(self):
        proto, registry, _, stats = make()
        receive = registry.receive_datagram

        def fragile(host, data, now):
            if data == b"bad\n":
                raise RuntimeError("boom")
            receive(host, data, now)

        registry.receive_datagram = fragile
        proto.datagramsReceived([(b"one\n", ("192.0.2.1", 1)), (b"bad\n", ("192.0.2.1", 1)),
                                 (b"two\n", ("192.0.2.1", 1))])
        self.assertEqual([l.text for l in registry.get("192.0.2.1").buffer], ["one", "two"])
        self.assertEqual((stats["datagrams"], stats["bytes"], stats["udp_errors"]), (3, 12, 1))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_garbage_is_kept_visibly_and_malformed_headers_counted(self):
        proto, registry, _, stats = make()
        proto.datagramReceived(b"\xff\xfe\x00garbage\n", ("192.0.2.1", 1))
        proto.datagramReceived(b"4,1,0,-,ncfrag=0/99999999;x", ("192.0.2.1", 1))
        texts = [l.text for l in registry.get("192.0.2.1").buffer]
        self.assertEqual(texts, ["\\xff\\xfe\x00garbage"])
        self.assertEqual(stats["malformed_datagrams"], 1)


class StrayInputTests(unittest.TestCase):
    """Stray numbers and overlapping fragments over the protocol (issue 9, items 2 and 3a)."""

    PANIC = b"Kernel panic - not syncing: Fatal exception in interrupt"

    def make(self, buffer_max_bytes=10_000_000):
        clock = task.Clock()
        stats = Counter()
        registry = BufferRegistry(100, 10_000, buffer_max_bytes, stats)
        tracker = IncidentTracker(Rules(), clock, 5.0, 300.0, None, None, stats)
        registry.observers.append(tracker.lines_added)
        proto = NetconsoleProtocol(Intake(registry, clock, SourceFilter(()), stats))
        return proto, registry, tracker, stats

    def test_a_forged_sequence_number_hides_no_later_panic(self):
        proto, registry, tracker, stats = self.make()
        source = ("192.0.2.9", 6666)
        for seq in range(100):
            proto.datagramReceived(b"6,%d,%d,-;line %d\n" % (seq, 1_000_000 + seq, seq), source)
        proto.datagramReceived(b"6,9999999999999999999,1010300,-;forged\n", source)
        proto.datagramReceived(b"0,100,1010400,-;" + self.PANIC + b"\n", source)
        instance = registry.get("192.0.2.9")
        self.assertEqual([l.text for l in instance.buffer][-2:], ["forged", self.PANIC.decode()])
        self.assertEqual(tracker.open_windows, 1)
        self.assertEqual((instance.lost_messages, stats["duplicate_messages"]), (0, 0))

    def test_the_lower_of_two_kernels_behind_one_address_is_heard(self):
        proto, registry, tracker, stats = self.make()
        source = ("192.0.2.9", 6666)
        # The quieter kernel has numbered fewer messages, in a longer uptime.
        for i in range(50):
            proto.datagramReceived(b"6,%d,%d,-;high\n" % (9000 + i, 8_000_000_000 + i), source)
            proto.datagramReceived(b"6,%d,%d,-;low\n" % (300 + i, 9_000_000_000 + i), source)
        proto.datagramReceived(b"0,350,9000000100,-;" + self.PANIC + b"\n", source)
        texts = [l.text for l in registry.get("192.0.2.9").buffer]
        self.assertEqual(len(texts), 101)
        self.assertEqual(texts[-1], self.PANIC.decode())
        self.assertEqual(tracker.open_windows, 1)

    def test_overlapping_fragments_from_one_source_stay_bounded(self):
        limit = 32 * 1024
        proto, registry, _, stats = self.make(buffer_max_bytes=limit)
        source = ("192.0.2.9", 6666)
        held = 0
        for seq in range(16):
            for offset in range(200):
                gram = b"4,%d,1000,-,ncfrag=%d/65000;" % (seq, offset) + b"x" * 64_000
                proto.datagramReceived(gram, source)
                held = max(held, registry.get("192.0.2.9").decoder.pending_bytes)
        registry.flush(1.0)
        instance = registry.get("192.0.2.9")
        self.assertLessEqual(held, netconsole.MAX_PENDING_BYTES)
        # Each message kept incomplete, cut to the buffer; the buffer holds the newest.
        self.assertEqual((stats["lines"], stats["long_lines_cut"]), (16, 16))
        self.assertLessEqual(max(len(l.text.encode()) for l in instance.buffer), limit)
        self.assertLessEqual(instance.buffer.bytes, limit)
        self.assertTrue(all(l.text.endswith(" bytes cut]") for l in instance.buffer))

    def test_a_datagram_longer_than_the_buffer_leaves_a_cut_line(self):
        proto, registry, _, stats = self.make(buffer_max_bytes=4096)
        for gram in (b"6,1,1000,-;" + b"e" * 40_000 + b"\n", b"p" * 40_000 + b"\n"):
            proto.datagramReceived(gram, ("192.0.2.9", 6666))
            (line,) = list(registry.get("192.0.2.9").buffer)[-1:]
            self.assertEqual(len(line.text), 4096)
            self.assertTrue(line.text.endswith(" [line of 40000 bytes cut]"))
        self.assertEqual(stats["long_lines_cut"], 2)


class ReceiveBufferTests(unittest.TestCase):
    """The socket's receive buffer is enlarged and what the kernel granted is known."""

    def test_granted_size_is_reported(self):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        granted = enlarge_receive_buffer(sock, 4 * 1024 * 1024)
        self.assertGreater(granted, 100_000)
        self.assertLessEqual(granted, 4 * 1024 * 1024)


class FailingOnce:
    """Stands in for `real`, whose `method` fails once with ENOMEM, then works."""

    def __init__(self, real, method: str) -> None:
        self._real, self._method, self._failed = real, method, False

    def __getattr__(self, name):
        found = getattr(self._real, name)
        if name != self._method or self._failed:
            return found

        def fail(*args):
            self._failed = True
            raise OSError(errno.ENOMEM, "Cannot allocate memory")

        return fail


class NetconsolePortTests(unittest.TestCase):
    """The listening port reads in batches, rests once drained, and can share its port."""

    def listen(self, proto, port=0, **kw):
        listening = NetconsolePort(port, proto, "127.0.0.1", 65535, reactor, **kw)
        listening.startListening()
        self.addCleanup(listening.stopListening)
        return listening

    def send(self, port, count, start=0):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        for n in range(start, start + count):
            sock.sendto(b"6,%d,%d,-;line %d\n" % (n, n, n), ("127.0.0.1", port.getHost().port))

    @defer.inlineCallbacks
    def test_a_drained_socket_rests_then_the_queued_datagrams_are_read(self):
        proto, registry, _, stats = make()
        port = self.listen(proto, pause=1.0)
        self.send(port, 20)
        yield wait_until(lambda: stats["datagrams"] == 20)
        self.assertNotIn(port, reactor.getReaders())
        self.send(port, 5, start=20)
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(stats["datagrams"], 20, "resting: the kernel queues meanwhile")
        yield wait_until(lambda: stats["datagrams"] == 25, timeout=5)
        texts = [l.text for l in next(iter(registry)).buffer]
        self.assertEqual(texts, [f"line {n}" for n in range(25)])

    @defer.inlineCallbacks
    def test_stopping_while_resting_leaves_no_timer_behind(self):
        proto, _, _, stats = make()
        port = self.listen(proto, pause=30.0)
        self.send(port, 3)
        yield wait_until(lambda: stats["datagrams"] == 3)
        self.assertIsNotNone(port._resume)
        yield port.stopListening()
        self.assertIsNone(port._resume)

    def test_reuse_port_lets_several_listeners_share_one_port(self):
        first = self.listen(make()[0], reuse_port=True)
        second = self.listen(make()[0], first.getHost().port, reuse_port=True)
        self.assertEqual(first.getHost().port, second.getHost().port)
        self.assertRaises(CannotListenError, self.listen, make()[0], first.getHost().port)

    def test_only_a_large_receive_buffer_lets_reading_rest(self):
        for wanted in (65536, 8 * 1024 * 1024):
            proto, _, _, _ = make()
            proto.receive_buffer_wanted = wanted
            port = listen_netconsole(reactor, 0, proto, "127.0.0.1")
            self.addCleanup(port.stopListening)
            room = proto.receive_buffer_granted >= MIN_BUFFER_TO_REST
            self.assertEqual(port.pause, READ_PAUSE_SECONDS if room else 0.0, wanted)

    @defer.inlineCallbacks
    def test_a_socket_error_is_counted_and_reading_goes_on(self):
        for batch_reads, attribute, method in ((False, "socket", "recvfrom"),
                                               (True, "reader", "read")):
            proto, registry, _, stats = make()
            port = self.listen(proto, pause=0.01, batch_reads=batch_reads)
            if getattr(port, attribute) is None:
                continue  # this C library has no recvmmsg
            real = getattr(port, attribute)
            setattr(port, attribute, FailingOnce(real, method))
            self.addCleanup(setattr, port, attribute, real)
            self.send(port, 3)
            yield wait_until(lambda stats=stats: stats["datagrams"] == 3)
            self.assertEqual(stats["udp_errors"], 1, method)
            self.assertEqual(len(self.flushLoggedErrors(OSError)), 1, method)

    @defer.inlineCallbacks
    def test_batch_reads_and_recvfrom_give_the_same_lines(self):
        results = []
        for batch_reads in (True, False):
            proto, registry, _, stats = make()
            port = self.listen(proto, batch_reads=batch_reads)
            self.send(port, 200)
            yield wait_until(lambda stats=stats: stats["datagrams"] == 200)
            (instance,) = registry
            results.append([(l.text, l.seq) for l in instance.buffer])
        self.assertEqual(results[0], results[1])
        self.assertEqual(len(results[0]), 200)
