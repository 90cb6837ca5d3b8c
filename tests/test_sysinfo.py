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
from tempesta_ts.sysinfo import SystemInfoFactory, SystemInfoStore


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

    def make(self, allowed=(), max_bytes=64 * 1024 * 1024, max_connections=8, store=None, **kw):
        sources = SourceFilter(ipaddress.ip_network(n) for n in allowed)
        intake = Intake(self.registry, self.clock, sources, self.stats)
        return SystemInfoFactory(intake, max_bytes, 30.0, max_connections, store, **kw)

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


def padded(size: int, fill: bytes = b"x") -> bytes:
    """A tagged JSON document of about `size` bytes."""
    return b'<sys-info>{"pad": "' + fill * size + b'"}</sys-info>'


class MemoryBoundTests(unittest.TestCase):
    """system_info_memory_max_bytes: documents kept and documents under way together."""

    def setUp(self):
        self.clock = task.Clock()
        self.stats = Counter()
        self.registry = BufferRegistry(10, 100, 10_000, self.stats)

    def make(self, store=None, memory_max_bytes=300_000, **kw):
        intake = Intake(self.registry, self.clock, SourceFilter(()), self.stats)
        return SystemInfoFactory(intake, 64 * 1024 * 1024, 30.0, 8, store,
                                 memory_max_bytes=memory_max_bytes, **kw)

    def info(self, host):
        instance = self.registry.get(host)
        return instance.system_info if instance else None

    def test_a_document_past_the_bound_is_refused_without_system_info_dir(self):
        factory = self.make()
        a = Connection(factory, "192.0.2.1")
        a.send(padded(200_000))
        b = Connection(factory, "192.0.2.2")
        b.send(padded(200_000), chunk=1400)
        self.assertTrue(b.transport.disconnected)
        a.close()
        b.close()
        self.assertEqual(len(self.info("192.0.2.1").text), 200_011)
        self.assertIsNone(self.info("192.0.2.2"))
        self.assertEqual(self.stats["tcp_documents_over_memory"], 1)
        self.assertEqual(self.stats["tcp_documents_accepted"], 1)
        self.assertEqual(factory.in_progress, 0)
        self.assertLessEqual(factory.memory_bytes, 300_000)

    def test_documents_under_way_count_against_the_bound(self):
        factory = self.make()
        held = [Connection(factory, f"192.0.2.{n}") for n in range(1, 4)]
        for c in held:
            c.send(b"<sys-info>" + b"x" * 120_000)
        # Two fit; the third would take the total past 300,000 bytes.
        self.assertEqual([c.transport.disconnected for c in held], [False, False, True])
        self.assertEqual(factory.in_progress, 2 * 120_010)
        self.assertEqual(self.stats["tcp_documents_over_memory"], 1)
        for c in held:
            c.close()
        self.assertEqual(factory.in_progress, 0)
        self.assertIsNone(self.info("192.0.2.3"))
        self.assertEqual(self.stats["tcp_documents_unterminated"], 2)

    def test_an_instance_replacing_its_document_frees_the_old_one(self):
        factory = self.make()
        for n in range(3):
            c = Connection(factory, "192.0.2.1")
            c.send(padded(100_000, b"%d" % n))
            c.close()
        self.assertEqual(self.stats["tcp_documents_accepted"], 3)
        self.assertIn('"pad": "222', self.info("192.0.2.1").text)
        self.assertLess(factory.memory_bytes, 101_000)

    def test_past_the_bound_a_document_is_kept_on_disk_and_only_noted_in_memory(self):
        store = SystemInfoStore(self.mktemp())
        factory = self.make(store)
        a = Connection(factory, "192.0.2.1")
        a.send(padded(200_000))
        b = Connection(factory, "192.0.2.2")
        b.send(padded(200_000, b"y"), chunk=1400)
        self.assertFalse(b.transport.disconnected)
        a.close()
        b.close()
        kept = self.info("192.0.2.2")
        self.assertTrue(kept.on_disk)
        self.assertEqual(kept.text, "")
        self.assertEqual(kept.size, 200_011)
        self.assertEqual(kept.format, "json")
        self.assertEqual(store.load("192.0.2.2").text, '{"pad": "' + "y" * 200_000 + '"}')
        self.assertEqual(self.stats["system_info_kept_on_disk"], 1)
        self.assertEqual(self.stats["tcp_documents_accepted"], 2)
        self.assertEqual(factory.in_progress, 0)
        self.assertLessEqual(factory.memory_bytes, 300_000)

    def test_a_document_under_way_goes_on_on_disk_whatever_the_reads_cut(self):
        # The closing tag may be cut anywhere by the reads, also inside the bytes written
        # out before the tag's end came. A second document follows on the same connection.
        first = b'<sys-info>{"first": "' + b"a" * 3000 + b'"}</sys-info>'
        second = b'<sys-info>{"second": 2}</sys-info>'
        for chunk in (1, 5, 10, 11, 12, 1000, 4096):
            self.registry = BufferRegistry(10, 100, 10_000, self.stats)
            store = SystemInfoStore(self.mktemp())
            factory = self.make(store, memory_max_bytes=1024)
            c = Connection(factory, "192.0.2.9")
            c.send(first, chunk=chunk)
            self.assertEqual(store.load("192.0.2.9").text, '{"first": "' + "a" * 3000 + '"}', chunk)
            c.send(second, chunk=chunk)
            c.close()
            self.assertEqual(self.info("192.0.2.9").text, '{"second": 2}', chunk)
            self.assertEqual(store.load("192.0.2.9").text, '{"second": 2}', chunk)
            self.assertFalse(c.transport.disconnected, chunk)
            self.assertEqual(factory.in_progress, 0, chunk)

    def test_a_document_on_disk_ended_by_the_peer_closing_is_kept(self):
        store = SystemInfoStore(self.mktemp())
        factory = self.make(store, memory_max_bytes=1024)
        c = Connection(factory, "192.0.2.9")
        c.send(b"Linux host 6.12.9\n" * 500, chunk=700)
        c.proto.readConnectionLost()
        c.close()
        self.assertEqual(store.load("192.0.2.9").text, ("Linux host 6.12.9\n" * 500).strip())
        self.assertEqual(self.info("192.0.2.9").format, "text")

    def test_a_document_on_disk_over_tcp_max_bytes_is_discarded(self):
        store = SystemInfoStore(self.mktemp())
        intake = Intake(self.registry, self.clock, SourceFilter(()), self.stats)
        factory = SystemInfoFactory(intake, 10_000, 30.0, 8, store, memory_max_bytes=1024)
        c = Connection(factory, "192.0.2.9")
        c.send(padded(20_000), chunk=1000)
        self.assertTrue(c.transport.disconnected)
        c.close()
        self.assertIsNone(self.info("192.0.2.9"))
        self.assertIsNone(store.load("192.0.2.9"))
        self.assertEqual(self.stats["tcp_documents_refused"], 1)
        self.flushLoggedErrors()

    def test_a_reset_on_disk_document_is_cut_and_lets_go_of_its_file(self):
        store = SystemInfoStore(self.mktemp())
        factory = self.make(store, memory_max_bytes=1024)
        c = Connection(factory, "192.0.2.9")
        c.send(b"<sys-info>" + b"x" * 5000, chunk=1000)
        spill = c.proto._spill
        self.assertIsNotNone(spill)
        c.proto.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(spill.closed)
        self.assertEqual(self.stats["tcp_documents_cut"], 1)
        self.assertIsNone(self.info("192.0.2.9"))

    def test_two_hundred_thousand_nested_lists_are_kept_as_text(self):
        # json.loads raised RecursionError on it: the document was lost, a traceback logged.
        document = b"[" * 200_000 + b"]" * 200_000
        factory = self.make(memory_max_bytes=64 * 1024 * 1024)
        c = Connection(factory, "192.0.2.9")
        c.send(b"<sys-info>" + document + b"</sys-info>")
        c.close()
        self.assertEqual(self.info("192.0.2.9").text, document.decode())
        self.assertEqual(self.info("192.0.2.9").format, "json")
        self.assertEqual(self.stats["tcp_documents_accepted"], 1)
        self.assertEqual(self.stats["tcp_errors"], 0)


class SlowClientTests(unittest.TestCase):
    """tcp_document_seconds and tcp_max_connections_per_source: slow clients leave room."""

    def setUp(self):
        self.clock = task.Clock()
        self.stats = Counter()
        self.registry = BufferRegistry(10, 100, 10_000, self.stats)

    def make(self, max_connections=8, **kw):
        intake = Intake(self.registry, self.clock, SourceFilter(()), self.stats)
        return SystemInfoFactory(intake, 64 * 1024 * 1024, 30.0, max_connections, **kw)

    def test_a_client_sending_a_byte_every_2_s_is_closed_at_tcp_document_seconds(self):
        factory = self.make(document_seconds=60.0)
        c = Connection(factory)
        c.send(b"<sys-info>")
        for _ in range(29):
            self.clock.advance(2)
            c.send(b"x")
        self.assertFalse(c.transport.disconnected)
        self.clock.advance(2)
        self.assertTrue(c.transport.disconnected)
        c.close()
        self.assertIsNone(self.registry.get("192.0.2.10"))
        self.assertEqual(self.stats["tcp_document_timeouts"], 1)
        self.assertEqual(self.stats["tcp_idle_timeouts"], 0)
        self.assertEqual(factory.in_progress, 0)
        self.assertEqual(factory.connections, 0)

    def test_each_document_on_a_connection_has_its_own_deadline(self):
        factory = self.make(document_seconds=60.0)
        c = Connection(factory)
        self.clock.advance(25)
        c.send(b"<sys-info>1</sys-info>")
        self.clock.advance(25)
        c.send(b"<sys-info>2")
        self.clock.advance(25)
        c.send(b"</sys-info>")
        self.assertFalse(c.transport.disconnected)
        self.assertEqual(self.registry.get("192.0.2.10").system_info.text, "2")
        self.assertEqual(self.stats["tcp_document_timeouts"], 0)
        c.close()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_one_address_cannot_take_every_slot(self):
        factory = self.make(max_connections=8, max_connections_per_source=2)
        slow = [Connection(factory, "192.0.2.66") for _ in range(3)]
        self.assertEqual([c.proto is None for c in slow], [False, False, True])
        self.assertEqual(self.stats["tcp_source_connections_refused"], 1)
        other = Connection(factory, "192.0.2.7")
        other.send(b"<sys-info>{}</sys-info>")
        self.assertEqual(self.registry.get("192.0.2.7").system_info.text, "{}")
        slow[0].close()
        self.assertIsNotNone(Connection(factory, "192.0.2.66").proto)
