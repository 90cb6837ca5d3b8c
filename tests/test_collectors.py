"""Two collectors of one instance (netconsole sending to two targets) name its incidents' reports
alike, so that the Support Server keeps one (docs/support-api.md, "Report ids")."""

from __future__ import annotations

import json
import os
import re
import socket

from twisted.internet import defer
from twisted.trial import unittest

from tests.captures import datagrams
from tests.processes import STARTED, TWISTD, spawn
from tests.waits import wait_until

SECONDS = 30
#: The instances: each sends its capture to both collectors.
CAPTURES = {"127.0.0.2": "extended-boot-and-warning.txt", "127.0.0.3": "plain-boot-and-warning.txt"}


def without_times(incidents: list[dict]) -> list[dict]:
    return [{k: v for k, v in incident.items() if k != "received_at"} for incident in incidents]


class TwoCollectorsTests(unittest.TestCase):
    """Two real twistd processes, stand-alone, fed the same datagrams over loopback."""

    @defer.inlineCallbacks
    def collector(self, name: str):
        """A running collector: (process, its UDP port, its spool_dir)."""
        spool = os.path.abspath(self.mktemp())
        child = spawn(self, name, [
            *TWISTD, "-n", "--pidfile=", "tempesta-ts", "--metrics-port", "0", "--host", "127.0.0.1",
            "--port", "0", "--spool-dir", spool, "--settle-seconds", "0.5",
        ])
        line = yield child.line_containing(STARTED, SECONDS)
        port = int(re.search(r"127\.0\.0\.1:(\d+)", line)[1])
        return child, port, spool

    def reports(self, spool: str) -> dict[str, dict]:
        """The reports written stand-alone, by instance address."""
        directory = os.path.join(spool, "local")
        found = {}
        for name in os.listdir(directory) if os.path.isdir(directory) else ():
            if name.endswith(".json"):
                with open(os.path.join(directory, name), encoding="utf-8") as f:
                    report = json.load(f)
                found[report["instance"]["address"]] = report
        return found

    @defer.inlineCallbacks
    def test_two_collectors_fed_the_same_datagrams_write_the_same_report_ids(self):
        first, first_port, first_spool = yield self.collector("collector-1")
        second, second_port, second_spool = yield self.collector("collector-2")
        for address, capture in CAPTURES.items():
            sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.addCleanup(sender.close)
            sender.bind((address, 0))
            # As netconsole does with two targets: each message to one, then to the other.
            for gram in datagrams(capture):
                sender.sendto(gram, ("127.0.0.1", first_port))
                sender.sendto(gram, ("127.0.0.1", second_port))
        yield wait_until(lambda: len(self.reports(first_spool)) == len(CAPTURES)
                         and len(self.reports(second_spool)) == len(CAPTURES), timeout=SECONDS)
        one, other = self.reports(first_spool), self.reports(second_spool)
        for address in CAPTURES:
            self.assertRegex(one[address]["report_id"], r"\A[0-9a-f]{32}\Z")
            self.assertEqual(one[address]["report_id"], other[address]["report_id"], address)
            # The same incidents, received a little apart.
            self.assertEqual(without_times(one[address]["incidents"]), without_times(other[address]["incidents"]))
        self.assertNotEqual(one["127.0.0.2"]["report_id"], one["127.0.0.3"]["report_id"])
        for child in (first, second):
            child.transport.signalProcess("TERM")
            yield child.ended(SECONDS)
