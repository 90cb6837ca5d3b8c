"""recvmmsg through ctypes gives what recvfrom gives, datagram for datagram."""

from __future__ import annotations

import socket
import sys

from twisted.trial import unittest

from tempesta_ts.recvmmsg import SLOTS, BatchReader


def pair(family: int, host: str) -> tuple[socket.socket, socket.socket]:
    receiver = socket.socket(family, socket.SOCK_DGRAM)
    receiver.bind((host, 0))
    receiver.setblocking(False)
    sender = socket.socket(family, socket.SOCK_DGRAM)
    sender.bind((host, 0))
    return receiver, sender


class BatchReaderTests(unittest.TestCase):
    """Datagrams and source addresses as recvfrom would give them."""

    def setUp(self):
        if not BatchReader.available():
            raise unittest.SkipTest("this C library has no recvmmsg")

    def read_all(self, receiver) -> list:
        reader, out = BatchReader(receiver), []
        with self.assertRaises(BlockingIOError):
            for _ in range(100):
                reader.read(out.append)
        return out

    def check_family(self, family, host):
        try:
            receiver, sender = pair(family, host)
        except OSError as e:
            raise unittest.SkipTest(f"no {host} here: {e}") from None
        self.addCleanup(receiver.close)
        self.addCleanup(sender.close)
        # The empty datagram, the largest one and more than one call's worth of lines.
        grams = [b"", b"x" * 65_000] + [b"6,%d,1,-;line\n" % n for n in range(SLOTS * 2 + 3)]
        for gram in grams:
            sender.sendto(gram, receiver.getsockname())
        out = self.read_all(receiver)
        self.assertEqual([data for data, _ in out], grams)
        self.assertEqual({address for _, address in out}, {sender.getsockname()})
        sender.sendto(b"one more", receiver.getsockname())
        self.assertEqual(receiver.recvfrom(100), (b"one more", out[0][1]))

    def test_ipv4_datagrams_and_sources_are_those_of_recvfrom(self):
        self.check_family(socket.AF_INET, "127.0.0.1")

    def test_ipv6_datagrams_and_sources_are_those_of_recvfrom(self):
        self.check_family(socket.AF_INET6, "::1")

    def test_one_call_returns_what_is_queued_up_to_its_slots(self):
        receiver, sender = pair(socket.AF_INET, "127.0.0.1")
        self.addCleanup(receiver.close)
        self.addCleanup(sender.close)
        for n in range(SLOTS + 5):
            sender.sendto(b"%d" % n, receiver.getsockname())
        reader, out = BatchReader(receiver), []
        self.assertEqual(reader.read(out.append), SLOTS)
        self.assertEqual(reader.read(out.append), 5)
        self.assertEqual([int(d) for d, _ in out], list(range(SLOTS + 5)))

    def test_a_scoped_ipv6_source_is_named_with_its_interface_as_recvfrom_names_it(self):
        receiver, sender = pair(socket.AF_INET, "127.0.0.1")
        self.addCleanup(receiver.close)
        self.addCleanup(sender.close)
        scope = socket.if_nametoindex("lo")
        raw = (
            socket.AF_INET6.to_bytes(2, sys.byteorder) + (6666).to_bytes(2, "big")
            + bytes(4) + socket.inet_pton(socket.AF_INET6, "fe80::1")
            + scope.to_bytes(4, sys.byteorder)
        )
        expected = socket.getnameinfo(("fe80::1", 6666, 0, scope), socket.NI_NUMERICHOST)[0]
        self.assertEqual(BatchReader(receiver)._address(raw), (expected, 6666, 0, scope))
        self.assertIn("%", expected)
