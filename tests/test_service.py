"""The assembled service over real loopback sockets."""

from __future__ import annotations

import json
import os
import socket

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest

from tempesta_ts.buffers import SystemInfo
from tempesta_ts.config import Config
from tempesta_ts.errors import StartupError
from tempesta_ts.service import TroubleshootingService
from tempesta_ts.sysinfo import SystemInfoStore
from tests.captures import datagrams, expected_lines
from tests.waits import wait_until


class Sender(protocol.DatagramProtocol):
    """Sends datagrams from one loopback address."""

    def send_all(self, grams, address):
        for gram in grams:
            self.transport.write(gram, address)


class LoopbackTestCase(unittest.TestCase):
    """Starts services on 127.0.0.1 and senders on other loopback addresses."""

    def start(self, port=0, **settings) -> TroubleshootingService:
        # No web endpoint: its default port is fixed (tests/test_web.py covers it).
        settings.setdefault("metrics_port", 0)
        settings.setdefault("spool_dir", self.mktemp())
        svc = TroubleshootingService(Config(host="127.0.0.1", port=port, **settings), reactor)
        svc.privilegedStartService()
        self.addCleanup(svc.stopService)
        svc.startService()
        return svc

    def sender(self, host: str) -> Sender:
        proto = Sender()
        port = reactor.listenUDP(0, proto, interface=host)
        self.addCleanup(port.stopListening)
        return proto


class ServiceTests(LoopbackTestCase):
    """Datagrams from several sources and a TCP document reach the right buffers."""

    @defer.inlineCallbacks
    def test_datagrams_from_several_sources_and_a_document_reach_their_buffers(self):
        svc = self.start()
        address = svc.listeners.address
        captures = {
            "127.0.0.2": "plain-boot-and-warning.txt",
            "127.0.0.3": "extended-boot-and-warning.txt",
            "127.0.0.4": "extended-fragmented.txt",
        }
        for host, name in captures.items():
            self.sender(host).send_all(datagrams(name), address)

        def complete():
            return all(
                svc.registry.get(h) is not None and len(svc.registry.get(h).buffer) >= len(expected_lines(n))
                for h, n in captures.items()
            )

        yield wait_until(complete)
        for host, name in captures.items():
            texts = [l.text for l in svc.registry.get(host).buffer]
            self.assertEqual(texts, expected_lines(name), host)

        client = yield connectProtocol(
            TCP4ClientEndpoint(reactor, *address, bindAddress=("127.0.0.3", 0)), protocol.Protocol()
        )
        client.transport.write(b'<sys-info>{"sys_info": {"current_kernel": "6.1.0-56-amd64"}}</sys-info>')
        client.transport.loseConnection()
        yield wait_until(lambda: svc.registry.get("127.0.0.3").system_info is not None)
        self.assertEqual(svc.registry.get("127.0.0.3").system_info.format, "json")
        self.assertEqual(svc.stats["tcp_documents_accepted"], 1)

    def test_summary_names_addresses_buffer_target_and_tls(self):
        svc = self.start()
        summary = svc.summary()
        self.assertIn(f"UDP and TCP 127.0.0.1:{svc.listeners.address[1]}", summary)
        self.assertIn("UDP receive buffer", summary)
        self.assertIn("stand-alone", summary)
        self.assertIn("TLS: not used", summary)

    def test_udp_and_tcp_share_the_port(self):
        svc = self.start()
        port = svc.listeners.address[1]
        self.assertEqual(svc.listeners.tcp_port.getHost().port, port)

    def test_port_in_use_stops_the_start_with_one_clear_line(self):
        busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        busy.bind(("127.0.0.1", 0))
        self.addCleanup(busy.close)
        config = Config(host="127.0.0.1", port=busy.getsockname()[1], spool_dir=self.mktemp())
        svc = TroubleshootingService(config, reactor)
        with self.assertRaises(StartupError) as caught:
            svc.privilegedStartService()
        self.assertIn("cannot listen on UDP 127.0.0.1:", str(caught.exception))
        self.assertIn("in use", str(caught.exception))

    @defer.inlineCallbacks
    def test_stop_keeps_partial_lines(self):
        svc = self.start()
        self.sender("127.0.0.5").send_all([b"[    1.000000] cut in the midd"], svc.listeners.address)
        yield wait_until(lambda: svc.registry.get("127.0.0.5") is not None)
        yield svc.stopService()
        self.assertEqual([l.text for l in svc.registry.get("127.0.0.5").buffer], ["cut in the midd"])


class ReusePortTests(LoopbackTestCase):
    """Several processes on one port (reuse_port); here several services in one process."""

    def start(self, port=0, **settings) -> TroubleshootingService:
        return super().start(port, reuse_port=True, settle_seconds=0.1, **settings)

    @defer.inlineCallbacks
    def test_services_share_the_port_and_each_instance_stays_on_one(self):
        shared = self.mktemp()
        first = self.start(system_info_dir=shared)
        second = self.start(first.listeners.address[1], system_info_dir=shared)
        self.assertEqual(first.listeners.address, second.listeners.address)
        hosts = [f"127.0.0.{n}" for n in range(10, 30)]
        for host in hosts:
            grams = [b"6,%d,%d,-;line %d\n" % (n, n, n) for n in range(5)]
            self.sender(host).send_all(grams, first.listeners.address)
        yield wait_until(lambda: first.stats["lines"] + second.stats["lines"] == 100)
        for host in hosts:
            holders = [svc for svc in (first, second) if svc.registry.get(host) is not None]
            self.assertEqual(len(holders), 1, host)
            self.assertEqual(len(holders[0].registry.get(host).buffer), 5)

    @defer.inlineCallbacks
    def test_a_report_carries_the_system_info_another_process_took(self):
        shared = self.mktemp()
        svc = self.start(system_info_dir=shared)
        # What another process on the port took in over TCP, written where all of them look.
        SystemInfoStore(shared).save("127.0.0.7", SystemInfo(1.0, '{"taken": "elsewhere"}', "json"))
        self.sender("127.0.0.7").send_all([b"4,1,1,-;WARNING test message\n"], svc.listeners.address)
        local = os.path.join(svc.config.spool_dir, "local")
        yield wait_until(lambda: os.path.isdir(local) and os.listdir(local))
        (name,) = os.listdir(local)
        with open(os.path.join(local, name), encoding="utf-8") as f:
            report = json.load(f)
        self.assertEqual(report["system_info"]["text"], '{"taken": "elsewhere"}')

    @defer.inlineCallbacks
    def test_a_document_taken_over_tcp_is_kept_for_the_others(self):
        shared = self.mktemp()
        svc = self.start(system_info_dir=shared)
        client = yield connectProtocol(
            TCP4ClientEndpoint(reactor, *svc.listeners.address, bindAddress=("127.0.0.8", 0)),
            protocol.Protocol(),
        )
        client.transport.write(b'<sys-info>{"sys_info": {}}</sys-info>')
        client.transport.loseConnection()
        yield wait_until(lambda: SystemInfoStore(shared).load("127.0.0.8") is not None)
        self.assertEqual(SystemInfoStore(shared).load("127.0.0.8").text, '{"sys_info": {}}')

    def test_the_start_up_line_says_the_port_is_shared(self):
        shared = os.path.abspath(self.mktemp())
        svc = self.start(system_info_dir=shared)
        self.assertIn(
            ":%d (shared with other processes: reuse_port; system information in "
            "%s);" % (svc.listeners.address[1], shared),
            svc.summary(),
        )

    def test_a_second_process_on_the_same_spool_dir_is_refused(self):
        shared = self.mktemp()
        first = self.start(system_info_dir=shared)
        with self.assertRaises(StartupError) as caught:
            self.start(first.listeners.address[1], spool_dir=first.config.spool_dir, system_info_dir=shared)
        self.assertIn(f"is in use by another tempesta-ts process (pid {os.getpid()})", str(caught.exception))
