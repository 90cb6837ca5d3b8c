"""System information over real loopback sockets: the memory bound, hostile documents, slow
clients."""

from __future__ import annotations

import json
import os

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from tests.test_service import LoopbackTestCase
from tests.waits import wait_until


class Client(protocol.Protocol):
    """A TCP client that knows when the server closed it."""

    def __init__(self):
        self.closed = defer.Deferred()

    def connectionLost(self, reason=None):
        self.closed.callback(None)


class SystemInfoLoopbackTests(LoopbackTestCase):
    """Documents sent by real TCP clients from loopback addresses."""

    @defer.inlineCallbacks
    def connect(self, svc, host: str) -> defer.Deferred:
        endpoint = TCP4ClientEndpoint(reactor, *svc.listeners.address, bindAddress=(host, 0))
        client = yield connectProtocol(endpoint, Client())
        self.addCleanup(self.abort, client)
        return client

    @staticmethod
    def abort(client):
        if client.transport.connected:
            client.transport.abortConnection()

    @defer.inlineCallbacks
    def send(self, svc, host: str, document: bytes):
        client = yield self.connect(svc, host)
        client.transport.write(document)
        client.transport.loseConnection()
        yield client.closed

    def report_of(self, svc, host: str):
        """Make an incident on `host` and read back its report (stand-alone: spool_dir/local)."""
        self.sender(host).send_all([b"4,1,1,-;WARNING test message\n"], svc.listeners.address)
        local = os.path.join(svc.config.spool_dir, "local")
        found = wait_until(lambda: os.path.isdir(local) and os.listdir(local))

        def read(_):
            (name,) = os.listdir(local)
            with open(os.path.join(local, name), encoding="utf-8") as f:
                return json.load(f)

        return found.addCallback(read)

    @defer.inlineCallbacks
    def test_two_hundred_thousand_nested_lists_reach_the_instance_and_the_report(self):
        svc = self.start(settle_seconds=0.1)
        document = b"[" * 200_000 + b"]" * 200_000
        yield self.send(svc, "127.0.0.2", b"<sys-info>" + document + b"</sys-info>")
        yield wait_until(lambda: svc.stats["tcp_documents_accepted"] == 1)
        self.assertEqual(svc.registry.get("127.0.0.2").system_info.text, document.decode())
        report = yield self.report_of(svc, "127.0.0.2")
        self.assertEqual(report["system_info"]["text"], document.decode())
        self.assertEqual(svc.stats["tcp_errors"], 0)

    @defer.inlineCallbacks
    def test_documents_past_the_memory_bound_are_refused_without_system_info_dir(self):
        svc = self.start(system_info_memory_max_bytes=1024 * 1024)
        document = b'<sys-info>{"pad": "' + b"x" * 400_000 + b'"}</sys-info>'
        for host in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
            yield self.send(svc, host, document)
        stats = svc.stats
        yield wait_until(
            lambda: stats["tcp_documents_accepted"] + stats["tcp_documents_over_memory"] == 3
        )
        self.assertEqual(svc.stats["tcp_documents_accepted"], 2)
        self.assertEqual(svc.stats["tcp_documents_over_memory"], 1)
        self.assertIsNone(svc.registry.get("127.0.0.4"))
        self.assertLessEqual(svc.tcp.memory_bytes, 1024 * 1024)
        self.assertEqual(svc.tcp.in_progress, 0)
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_past_the_memory_bound_a_document_lives_on_disk_and_reaches_the_report(self):
        svc = self.start(system_info_memory_max_bytes=1024 * 1024, system_info_dir=self.mktemp(),
                         settle_seconds=0.1)
        for n, host in enumerate(("127.0.0.2", "127.0.0.3", "127.0.0.4")):
            text = '{"pad": "%s"}' % (str(n) * 400_000)
            yield self.send(svc, host, b"<sys-info>" + text.encode() + b"</sys-info>")
        yield wait_until(lambda: svc.stats["tcp_documents_accepted"] == 3)
        info = svc.registry.get("127.0.0.4").system_info
        self.assertTrue(info.on_disk)
        self.assertEqual(info.size, len(text))
        self.assertLessEqual(svc.tcp.memory_bytes, 1024 * 1024)
        self.assertEqual(svc.stats["system_info_kept_on_disk"], 1)
        report = yield self.report_of(svc, "127.0.0.4")
        self.assertEqual(report["system_info"]["text"], text)
        # Read for the report, not kept in memory past the bound.
        self.assertLessEqual(svc.tcp.memory_bytes, 1024 * 1024)

    @defer.inlineCallbacks
    def test_trickling_clients_from_one_address_leave_room_for_a_real_document(self):
        svc = self.start(tcp_max_connections=8)
        trickling = []
        for _ in range(8):
            client = yield self.connect(svc, "127.0.0.3")
            client.transport.write(b"<")
            trickling.append(client)
        yield wait_until(lambda: svc.stats["tcp_source_connections_refused"] == 4)
        self.assertEqual(svc.tcp.connections, 4)
        yield self.send(svc, "127.0.0.2", b'<sys-info>{"sys_info": {}}</sys-info>')
        yield wait_until(lambda: svc.stats["tcp_documents_accepted"] == 1)
        self.assertEqual(svc.registry.get("127.0.0.2").system_info.text, '{"sys_info": {}}')

    @defer.inlineCallbacks
    def test_a_client_sending_a_byte_now_and_then_is_closed_at_tcp_document_seconds(self):
        svc = self.start(tcp_document_seconds=0.5, tcp_idle_seconds=30)
        client = yield self.connect(svc, "127.0.0.3")
        opened = reactor.seconds()
        trickle = task.LoopingCall(client.transport.write, b"x")
        trickle.start(0.05)
        self.addCleanup(lambda: trickle.running and trickle.stop())
        yield client.closed
        self.assertGreaterEqual(reactor.seconds() - opened, 0.45)
        self.assertEqual(svc.stats["tcp_document_timeouts"], 1)
        self.assertEqual(svc.stats["tcp_idle_timeouts"], 0)
        self.assertIsNone(svc.registry.get("127.0.0.3"))
