"""Sequence gaps are logged once per burst per instance, from the expiry timer."""

from __future__ import annotations

from twisted.internet import task
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial import unittest

from tempesta_ts.buffers import BufferRegistry
from tempesta_ts.service import EXPIRE_INTERVAL, GAP_TICKS, RegistryService


class GapNoticeTests(unittest.TestCase):
    """RegistryService names the instances losing messages, once a burst."""

    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.clock = task.Clock()
        self.registry = BufferRegistry(10, 100, 10000)
        self.service = RegistryService(self.registry, self.clock)
        self.service.startService()
        self.addCleanup(self.service.stopService)

    def send(self, host: str, *seqs: int) -> None:
        for seq in seqs:
            self.registry.receive_datagram(host, b"6,%d,0,-;m\n" % seq, self.clock.seconds())

    def said(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e.get("log_level") == LogLevel.warn]

    def tick(self, seconds: float = GAP_TICKS * EXPIRE_INTERVAL) -> None:
        for _ in range(round(seconds / EXPIRE_INTERVAL)):
            self.clock.advance(EXPIRE_INTERVAL)

    def test_a_burst_of_gaps_is_logged_once_per_instance(self):
        self.send("192.0.2.1", 0, 1, 5, 6)
        self.send("192.0.2.2", 0, 10)
        self.tick()
        self.send("192.0.2.1", 10, 20)
        self.tick()
        said = self.said()
        self.assertEqual(sorted(said), [
            "192.0.2.1: 3 netconsole messages lost (gaps in the sequence numbers) since the last "
            "notice, 3 in all; raise the sender's buffers or the network's capacity",
            "192.0.2.2: 9 netconsole messages lost (gaps in the sequence numbers) since the last "
            "notice, 9 in all; raise the sender's buffers or the network's capacity",
        ])
        self.tick(60)
        self.assertIn("192.0.2.1: 12 netconsole messages lost (gaps in the sequence numbers) since "
                      "the last notice, 15 in all; raise the sender's buffers or the network's capacity",
                      self.said())
        self.assertEqual(len(self.said()), 3)

    def test_no_gap_no_line(self):
        self.send("192.0.2.1", 0, 1, 2)
        self.tick(60)
        self.assertEqual(self.said(), [])
