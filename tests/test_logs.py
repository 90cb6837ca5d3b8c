"""What reaches the log from outside: rate-limited across sources."""

from __future__ import annotations

import ipaddress
from collections import Counter

from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from tempesta_ts.access import SourceFilter
from tempesta_ts.buffers import BufferRegistry
from tempesta_ts.intake import Intake
from tempesta_ts.sysinfo import SystemInfoFactory
from tempesta_ts.udp import NetconsoleProtocol


def captured(case: unittest.TestCase) -> list[dict]:
    """Every log event published while the test runs."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    case.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


class RefusalFloodTests(unittest.TestCase):
    """Refused sources are named a few at a time, however many there are."""

    def setUp(self):
        self.events = captured(self)
        self.clock = task.Clock()
        self.stats = Counter()
        registry = BufferRegistry(100, 10_000, 10_000_000, self.stats)
        sources = SourceFilter([ipaddress.ip_network("10.0.0.0/8")])
        self.intake = Intake(registry, self.clock, sources, self.stats)

    def notices(self) -> list[str]:
        return [t for t in map(formatEvent, self.events) if t.startswith("Rejected ")]

    def test_3000_refused_sources_in_a_second_write_a_handful_of_lines(self):
        udp = NetconsoleProtocol(self.intake)
        tcp = SystemInfoFactory(self.intake, 1000, 10.0, 10)
        first = ipaddress.ip_address("198.18.0.1")
        for n in range(3000):
            self.clock.advance(1 / 6000)
            udp.datagramReceived(b"x\n", (str(first + n), 6665))
            self.assertIsNone(tcp.buildProtocol(IPv4Address("TCP", str(first + n), 40000)))
        self.assertEqual(self.stats["sources_rejected"], 6000)
        self.assertLessEqual(len(self.notices()), 5)
        self.clock.advance(60)
        udp.datagramReceived(b"x\n", ("203.0.113.9", 6665))
        self.assertEqual(self.stats["sources_rejected"], 6001)
        last = self.notices()[-1]
        self.assertTrue(last.startswith("Rejected UDP from 203.0.113.9"), last)
        self.assertIn(f"and {6000 - len(self.notices()) + 1} other refused sources", last)

    def test_a_lone_refused_source_is_still_named_at_once_and_each_minute(self):
        udp = NetconsoleProtocol(self.intake)
        for _ in range(10):
            udp.datagramReceived(b"x\n", ("192.0.2.1", 6665))
        self.clock.advance(61)
        udp.datagramReceived(b"x\n", ("192.0.2.1", 6665))
        self.assertEqual(len(self.notices()), 2)
        self.assertIn("(9 more from it held back", self.notices()[1])
        self.assertIn("and 0 other refused sources", self.notices()[1])
