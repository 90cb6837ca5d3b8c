"""End to end: a real crash trace over UDP in, one report out at a real local HTTPS server."""

from __future__ import annotations

import json
import os

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest

from tempesta_ts import __version__
from tempesta_ts.config import Config
from tempesta_ts.service import TroubleshootingService
from tests.captures import datagrams, expected_lines
from tests.https_server import SupportResource, TrackingSite, listen, make_certificates
from tests.waits import wait_until

KEY = "k3y-never-logged"
SYSINFO = {"sys_info": {"current_kernel": "6.1.0-56-amd64", "cpu": [{"flags": "sse4_2 avx2"}]}}


def fragmented(gram: bytes, size: int = 40) -> list[bytes]:
    """An extended datagram cut into ncfrag fragments of `size` body bytes, as netconsole does."""
    header, _, body = gram.partition(b";")
    if len(body) <= size:
        return [gram]
    return [
        header + b",ncfrag=%d/%d;" % (offset, len(body)) + body[offset : offset + size]
        for offset in range(0, len(body), size)
    ]


class Sender(protocol.DatagramProtocol):
    """Sends datagrams from one loopback address."""


class DeliveryTests(unittest.TestCase):
    """The whole path: netconsole in, detection, settle, spool, HTTPS out."""

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        certs = make_certificates(self.mktemp())
        self.support = SupportResource()
        self.site = TrackingSite(self.support)
        self.https = listen(reactor, self.site, certs)
        self.spool = os.path.abspath(self.mktemp())
        config = Config(
            host="127.0.0.1",
            port=0,
            spool_dir=self.spool,
            settle_seconds=0.3,
            support_host="127.0.0.1",
            support_port=self.https.getHost().port,
            support_client_id="my-app-id",
            support_api_key=KEY,
            support_ca_file=certs.ca_file,
            metrics_port=0,
        )
        self.svc = TroubleshootingService(config, reactor)
        self.svc.privilegedStartService()
        self.svc.startService()
        self.addCleanup(self.stop)
        yield None

    @defer.inlineCallbacks
    def stop(self):
        yield self.svc.stopService()
        yield self.https.stopListening()
        yield wait_until(lambda: not self.site.open_channels)

    def send(self, host: str, grams):
        sender = Sender()
        port = reactor.listenUDP(0, sender, interface=host)
        self.addCleanup(port.stopListening)
        for gram in grams:
            sender.transport.write(gram, self.svc.listeners.address)

    @defer.inlineCallbacks
    def send_sysinfo(self, host: str, document: bytes):
        endpoint = TCP4ClientEndpoint(reactor, *self.svc.listeners.address, bindAddress=(host, 0))
        client = yield connectProtocol(endpoint, protocol.Protocol())
        client.transport.write(document)
        client.transport.loseConnection()
        yield wait_until(lambda: self.svc.registry.get(host) and self.svc.registry.get(host).system_info)

    @defer.inlineCallbacks
    def test_crash_traces_in_every_format_arrive_as_one_report_each(self):
        document = b"<sys-info>" + json.dumps(SYSINFO).encode() + b"</sys-info>"
        sources = {
            "127.0.0.2": ("plain-sysrq-crash.txt", datagrams("plain-sysrq-crash.txt")),
            "127.0.0.3": ("extended-sysrq-crash.txt", datagrams("extended-sysrq-crash.txt")),
            "127.0.0.4": (
                "extended-sysrq-crash.txt",
                [f for g in datagrams("extended-sysrq-crash.txt") for f in fragmented(g)],
            ),
        }
        for host in sources:
            yield self.send_sysinfo(host, document)
        for host, (_, grams) in sources.items():
            self.send(host, grams)
        yield self.support.wait_for(3)
        yield wait_until(lambda: self.svc.stats["reports_delivered"] == 3)
        reports = {}
        for received in self.support.received:
            body = json.loads(received.body)
            reports[body["instance"]["address"]] = (received, body)
        self.assertEqual(sorted(reports), sorted(sources))
        for host, (name, _) in sources.items():
            received, body = reports[host]
            self.assertEqual(received.headers[b"authorization"], [f"Bearer {KEY}".encode()])
            self.assertEqual(received.headers[b"x-client-id"], [b"my-app-id"])
            self.assertEqual(received.headers[b"idempotency-key"], [body["report_id"].encode()])
            self.assertEqual(body["version"], 1)
            self.assertEqual(body["client_id"], "my-app-id")
            self.assertEqual(body["collector"]["version"], __version__)
            self.assertEqual(body["incidents"][0]["kind"], "crash")
            self.assertIn("Kernel panic - not syncing: sysrq triggered crash",
                          [i["line"] for i in body["incidents"]])
            # The whole trace: every line the kernel sent, in order.
            self.assertEqual([e["text"] for e in body["log"]], expected_lines(name), host)
            self.assertEqual(body["lost_messages"], 0)
            self.assertEqual(body["log_dropped_lines"], 0)
            self.assertEqual(json.loads(body["system_info"]["text"]), SYSINFO)
            self.assertEqual(body["suppressed_incidents"], 0)
        self.assertEqual(reports["127.0.0.3"][1]["log"][0]["seq"], 0)
        self.assertIsNone(reports["127.0.0.2"][1]["log"][0]["seq"])
        self.assertEqual(os.listdir(os.path.join(self.spool, "pending")), [])

    @defer.inlineCallbacks
    def test_vendor_test_warning_is_delivered(self):
        self.send("127.0.0.5", datagrams("extended-boot-and-warning.txt"))
        yield self.support.wait_for(1)
        body = json.loads(self.support.received[0].body)
        self.assertEqual([(i["kind"], i["line"]) for i in body["incidents"]], [("warning", "WARNING test message")])

    @defer.inlineCallbacks
    def test_stop_spools_open_windows(self):
        self.svc.tracker.settle = 60.0
        self.send("127.0.0.6", datagrams("plain-boot-and-warning.txt"))
        yield wait_until(lambda: self.svc.tracker.open_windows == 1)
        self.https.stopListening()
        yield self.svc.stopService()
        pending = os.listdir(os.path.join(self.spool, "pending"))
        self.assertEqual(len(pending), 1)
        with open(os.path.join(self.spool, "pending", pending[0])) as f:
            self.assertEqual(json.load(f)["incidents"][0]["line"], "WARNING test message")
