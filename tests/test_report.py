"""The report body, field for field as docs/support-api.md says."""

from __future__ import annotations

import json

from twisted.trial import unittest

from tempesta_ts.buffers import BufferRegistry, SystemInfo
from tempesta_ts.report import Incident, build_report, iso

NOW = 1795408205.123456


class ReportTests(unittest.TestCase):
    """Every field of the contract, with the values a user would expect."""

    def report(self, with_info=True):
        registry = BufferRegistry(10, 3, 10_000)
        registry.receive_datagram("192.0.2.10", b"6.12.9,6,1,1000,-;one\n", NOW - 10)
        registry.receive_datagram("192.0.2.10", b"6.12.9,6,5,2000,-;two\n", NOW - 9)
        for n in range(6, 9):
            registry.receive_datagram("192.0.2.10", b"6.12.9,4,%d,3000,-;WARNING: n%d\n" % (n, n), NOW - 8)
        instance = registry.get("192.0.2.10")
        if with_info:
            registry.receive_system_info("192.0.2.10", SystemInfo(NOW - 5, '{"a": 1}', "json"))
        line = list(instance.buffer)[-1]
        return build_report(
            instance=instance,
            incidents=[Incident("warning", line, "warning", "sig")],
            suppressed=2,
            client_id="my-app-id",
            hostname="ts-1",
            version="1.0.0",
            now=NOW,
            report_id="3f0c",
        )

    def test_fields_are_exactly_the_contract(self):
        r = self.report()
        self.assertEqual(
            set(r),
            {"version", "report_id", "client_id", "created_at", "collector", "instance", "incidents",
             "suppressed_incidents", "log", "log_dropped_lines", "lost_messages", "system_info"},
        )
        self.assertEqual(set(r["instance"]), {"address", "kernel_release", "first_seen", "last_seen"})
        self.assertEqual(
            set(r["incidents"][0]),
            {"kind", "title", "module", "fingerprint", "frames", "line", "received_at", "seq", "kernel_time_us"},
        )
        self.assertEqual(set(r["log"][0]), {"received_at", "text", "level", "seq", "kernel_time_us"})
        json.dumps(r)

    def test_values(self):
        r = self.report()
        self.assertEqual((r["version"], r["report_id"], r["client_id"]), (1, "3f0c", "my-app-id"))
        self.assertEqual(r["created_at"], "2026-11-23T04:30:05.123Z")
        self.assertEqual(r["collector"], {"hostname": "ts-1", "version": "1.0.0"})
        self.assertEqual(r["instance"]["address"], "192.0.2.10")
        self.assertEqual(r["instance"]["kernel_release"], "6.12.9")
        self.assertEqual(r["incidents"][0]["line"], "WARNING: n8")
        self.assertEqual((r["incidents"][0]["seq"], r["incidents"][0]["kernel_time_us"]), (8, 3000))
        self.assertEqual(r["suppressed_incidents"], 2)
        self.assertEqual([e["text"] for e in r["log"]], ["WARNING: n6", "WARNING: n7", "WARNING: n8"])
        self.assertEqual(r["log"][0]["level"], 4)
        self.assertEqual(r["log_dropped_lines"], 2)
        self.assertEqual(r["lost_messages"], 3)
        self.assertEqual(r["system_info"], {"received_at": iso(NOW - 5), "text": '{"a": 1}'})

    def test_no_system_info_is_null(self):
        self.assertIsNone(self.report(with_info=False)["system_info"])

    def test_iso_times_are_utc_with_milliseconds(self):
        self.assertEqual(iso(0.0), "1970-01-01T00:00:00.000Z")
        self.assertEqual(iso(1.9999), "1970-01-01T00:00:01.999Z")
        self.assertIsNone(iso(None))

    def test_plain_lines_have_null_seq_and_level(self):
        registry = BufferRegistry(10, 3, 10_000)
        registry.receive_datagram("a", b"[    1.000000] hi\n", NOW)
        instance = registry.get("a")
        r = build_report(instance=instance, incidents=[Incident("bug", list(instance.buffer)[0], "r", "s")],
                         suppressed=0, client_id=None, hostname="h", version="v", now=NOW)
        self.assertEqual(r["log"][0], {"received_at": iso(NOW), "text": "hi", "level": None, "seq": None,
                                       "kernel_time_us": 1_000_000})
        self.assertEqual(len(r["report_id"]), 32)
        self.assertIsNone(r["instance"]["kernel_release"])
