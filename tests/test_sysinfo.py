"""The TCP listener for system information, over StringTransport with a Clock."""

from __future__ import annotations

import ipaddress
import json
from collections import Counter

from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from tempesta_ts.access import SourceFilter
from tempesta_ts.buffers import BufferRegistry
from tempesta_ts.intake import Intake
from tempesta_ts.sysinfo import SystemInfoFactory


class Connection:
    """A client connected to the factory through a StringTransport."""

    def __init__(self, factory, host="192.0.2.10"):
        self.proto = factory.buildProtocol(IPv4Address("TCP", host, 40000))
        if self.proto is not None:
            self.transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
            self.proto.makeConnection(self.transport)

    def send(self, data: bytes, chunk: int = 65536):
        for i in range(0, len(data), chunk):
            self.proto.dataReceived(data[i : i + chunk])

    def close(self):
        self.proto.connectionLost(None)


class SystemInfoTests(unittest.TestCase):
    """Documents in, the instance's latest system information out; bounds enforced."""

    def setUp(self):
        self.clock = task.Clock()
        self.stats = Counter()
        self.registry = BufferRegistry(10, 100, 10_000, self.stats)
        self.factory = self.make()

    def make(self, allowed=(), max_bytes=64 * 1024 * 1024, max_connections=8):
        sources = SourceFilter(ipaddress.ip_network(n) for n in allowed)
        intake = Intake(self.registry, self.clock, sources, self.stats)
        return SystemInfoFactory(intake, max_bytes, 30.0, max_connections)

    def info(self, host="192.0.2.10"):
        instance = self.registry.get(host)
        return instance.system_info if instance else None

    def test_vendor_document_of_hundreds_of_kib_on_one_line(self):
        doc = {"sys_info": {"cpu": [{"flags": "fpu vme " * 200}] * 200}, "sysctl_config": {}}
        body = json.dumps(doc).encode()
        self.assertGreater(len(body), 16 * 1024 * 10)
        c = Connection(self.factory)
        c.send(b"<sys-info>" + body + b"</sys-info>", chunk=1400)
        self.assertEqual(json.loads(self.info().text), doc)
        self.assertEqual(self.info().format, "json")
        c.close()
        self.assertEqual(self.stats["tcp_documents_accepted"], 1)

    def test_closing_tag_split_across_reads(self):
        c = Connection(self.factory)
        c.send(b"<sys-info>{\"a\": 1}</sys-")
        self.assertIsNone(self.info())
        c.send(b"info>")
        self.assertEqual(self.info().text, '{"a": 1}')

    def test_plain_text_ended_by_full_close(self):
        c = Connection(self.factory)
        c.send(b"Linux host 6.12.9\nMemTotal: 1000 kB\n")
        self.assertIsNone(self.info())
        c.close()
        self.assertEqual(self.info().text, "Linux host 6.12.9\nMemTotal: 1000 kB")
        self.assertEqual(self.info().format, "text")

    def test_plain_text_ended_by_half_close(self):
        c = Connection(self.factory)
        c.send(b"uname: 6.12.9\n")
        c.proto.readConnectionLost()
        self.assertEqual(self.info().text, "uname: 6.12.9")
        self.assertTrue(c.transport.disconnecting)
        c.close()
        self.assertEqual(self.stats["tcp_documents_accepted"], 1)

    def test_invalid_utf8_is_kept_visibly(self):
        c = Connection(self.factory)
        c.send(b"<sys-info>caf\xe9</sys-info>")
        self.assertEqual(self.info().text, "caf\\xe9")

    def test_oversized_document_is_discarded_counted_and_connection_closed(self):
        factory = self.make(max_bytes=100_000)
        c = Connection(factory)
        c.send(b"<sys-info>" + b"x" * 200_000)
        self.assertTrue(c.transport.disconnected)
        c.close()
        self.assertIsNone(self.info())
        self.assertEqual(self.stats["tcp_documents_refused"], 1)
        self.flushLoggedErrors()

    def test_oversized_document_whole_in_one_read_is_discarded_too(self):
        factory = self.make(max_bytes=100_000)
        c = Connection(factory)
        c.send(b"<sys-info>" + b"x" * 200_000 + b"</sys-info>", chunk=300_000)
        self.assertTrue(c.transport.disconnected)
        c.close()
        self.assertIsNone(self.info())
        self.assertEqual(self.stats["tcp_documents_refused"], 1)
        self.flushLoggedErrors()

    def test_reset_connection_does_not_replace_good_system_information(self):
        c = Connection(self.factory)
        c.send(b"<sys-info>good</sys-info>")
        c.send(b"<sys-info>{\"cut\": ")
        c.proto.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.info().text, "good")
        self.assertEqual(self.stats["tcp_documents_cut"], 1)

    def test_idle_client_is_disconnected_and_its_partial_document_dropped(self):
        c = Connection(self.factory)
        c.send(b"<sys-info>{\"partial\":")
        self.clock.advance(29)
        self.assertFalse(c.transport.disconnected)
        self.clock.advance(2)
        self.assertTrue(c.transport.disconnected)
        c.close()
        self.assertIsNone(self.info())
        self.assertEqual(self.stats["tcp_idle_timeouts"], 1)

    def test_connections_over_the_limit_are_refused(self):
        factory = self.make(max_connections=2)
        a, b = Connection(factory), Connection(factory)
        self.assertIsNone(Connection(factory).proto)
        self.assertEqual(self.stats["tcp_connections_refused"], 1)
        a.close()
        self.assertIsNotNone(Connection(factory).proto)
        b.close()

    def test_sources_outside_allowed_sources_are_refused(self):
        factory = self.make(allowed=["10.0.0.0/8"])
        self.assertIsNone(Connection(factory, host="192.0.2.1").proto)
        self.assertIsNotNone(Connection(factory, host="10.0.0.1").proto)
        self.assertEqual(self.stats["sources_rejected"], 1)

    def test_two_documents_on_one_connection(self):
        c = Connection(self.factory)
        c.send(b"<sys-info>1</sys-info><sys-info>2</sys-info>")
        self.assertEqual(self.info().text, "2")
        self.assertEqual(self.stats["tcp_documents_accepted"], 2)
