"""The status snapshot: one value, made in one place, that every page and line renders."""

from __future__ import annotations

import dataclasses
import json

from treq.testing import StubTreq
from twisted.internet import task
from twisted.trial import unittest

from tempesta_ts.config import Config
from tempesta_ts.service import TroubleshootingService
from tempesta_ts.status import support_url, systemd_status
from tests.test_metrics import ServerCase
from tests.test_reporter import CLIENT, KEY, FakeSupport


class SnapshotTests(ServerCase):
    """What a snapshot holds, and that it does not change under it."""

    def test_a_snapshot_is_a_value_later_traffic_leaves_alone(self):
        svc = self.make()
        self.send(svc, "127.0.0.2", b"6,1,100,-;hello\n")
        before = svc.status()
        self.send(svc, "127.0.0.2", b"6,2,200,-;again\n")
        self.send(svc, "127.0.0.3", b"6,1,100,-;new\n")
        after = svc.status()
        self.assertEqual(before.counters["lines"], 1)
        self.assertEqual([i.lines for i in before.instances], [1])
        self.assertEqual(after.counters["lines"], 3)
        self.assertEqual([i.address for i in after.instances], ["127.0.0.2", "127.0.0.3"])
        with self.assertRaises(dataclasses.FrozenInstanceError):
            before.now = 0.0

    def test_pages_and_metrics_render_the_same_snapshot(self):
        svc = self.make()
        self.send(svc, "127.0.0.2", b"[   12.345678] WARNING test message\n")
        snapshot = svc.status()
        _, body = self.get(svc, "/status.json")
        document = json.loads(body)
        self.assertEqual(document["counters"], dict(snapshot.counters))
        self.assertEqual(document["spool"]["settling"], snapshot.delivery.settling)
        self.assertIn(f"tempesta_ts_reports_settling {snapshot.delivery.settling:.1f}",
                      self.scrape(svc))


class AddressTests(unittest.TestCase):
    """An IPv6 host is bracketed once, wherever it is shown."""

    def service(self, **settings) -> TroubleshootingService:
        values = dict(host="::1", port=5555, metrics_port=0, spool_dir=self.mktemp())
        values.update(settings)
        return TroubleshootingService(Config(**values), task.Clock(),
                                      http_client=StubTreq(FakeSupport()))

    def test_the_start_up_and_systemd_lines_bracket_an_ipv6_listener(self):
        svc = self.service()
        self.assertIn("listening on UDP and TCP [::1]:5555;", svc.summary())
        self.assertEqual(systemd_status(svc.status.listening()),
                         "listening on UDP and TCP [::1]:5555")

    def test_the_support_url_is_the_same_in_the_start_up_line_and_the_status(self):
        for host in ("::1", "[::1]"):
            svc = self.service(support_host=host, support_client_id=CLIENT, support_api_key=KEY)
            url = "https://[::1]:443/api/v1/reports"
            self.assertEqual(support_url(svc.config), url)
            self.assertEqual(svc.status().mode.support_url, url)
            self.assertIn(f"Support Server {url} as client {CLIENT};", svc.summary())
