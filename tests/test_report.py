"""The report body, field for field as docs/support-api.md says."""

from __future__ import annotations

import hashlib
import json

from twisted.trial import unittest

from tempesta_ts.buffers import BufferRegistry, SystemInfo
from tempesta_ts.netconsole import LogLine
from tempesta_ts.report import Incident, build_report, iso, report_id_for

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


class ReportIdTests(unittest.TestCase):
    """Collectors that received the same lines name the same incident's report alike."""

    GRAMS = [
        b"6,1,1000,-;eth0: link up\n",
        b"4,2,2000,-;WARNING: CPU: 1 PID: 42 at net/core/dev.c:123 dev_queue_xmit+0x1/0x2\n",
        b"4,3,2001,-;Call Trace:\n",
    ]

    def build(self, grams, received_at, address="192.0.2.10", hostname="ts-1"):
        registry = BufferRegistry(10, 100, 100_000)
        for n, gram in enumerate(grams):
            registry.receive_datagram(address, gram, received_at + n * 0.001)
        instance = registry.get(address)
        trigger = list(instance.buffer)[1]
        return build_report(instance=instance, incidents=[Incident("warning", trigger, "warning", "s")],
                            suppressed=0, client_id="c", hostname=hostname, version="1", now=received_at + 5)

    def test_two_collectors_fed_the_same_lines_give_one_id(self):
        # Received 3 ms apart by two hosts, reported at other times: the same id.
        first = self.build(self.GRAMS, NOW, hostname="ts-1")
        second = self.build(self.GRAMS, NOW + 0.003, hostname="ts-2")
        self.assertEqual(first["report_id"], second["report_id"])
        self.assertRegex(first["report_id"], r"\A[0-9a-f]{32}\Z")

    def test_id_is_the_documented_sha256(self):
        line = LogLine(NOW, "WARNING: x", 4, 2, 2000)
        expected = hashlib.sha256(b"192.0.2.10\n2000\n2\nWARNING: x").hexdigest()[:32]
        self.assertEqual(report_id_for("192.0.2.10", line), expected)
        plain = LogLine(NOW, "WARNING: x", None, None, 2000)
        expected = hashlib.sha256(b"192.0.2.10\n2000\n\nWARNING: x").hexdigest()[:32]
        self.assertEqual(report_id_for("192.0.2.10", plain), expected)

    def test_another_instance_time_number_or_text_is_another_id(self):
        line = LogLine(NOW, "WARNING: x", 4, 2, 2000)
        ids = {
            report_id_for("192.0.2.10", line),
            report_id_for("192.0.2.11", line),
            report_id_for("192.0.2.10", line._replace(kernel_time_us=2001)),
            report_id_for("192.0.2.10", line._replace(seq=3)),
            report_id_for("192.0.2.10", line._replace(text="WARNING: y")),
        }
        self.assertEqual(len(ids), 5)

    def test_line_without_kernel_time_or_number_gets_a_random_id(self):
        grams = [b"eth0: link up\n", b"WARNING: CPU: 1 PID: 42 at net/core/dev.c:123 x+0x1/0x2\n"]
        first, second = self.build(grams, NOW), self.build(grams, NOW)
        self.assertNotEqual(first["report_id"], second["report_id"])
        self.assertRegex(first["report_id"], r"\A[0-9a-f]{32}\Z")

    def test_given_id_is_kept(self):
        registry = BufferRegistry(10, 100, 100_000)
        registry.receive_datagram("a", self.GRAMS[1], NOW)
        instance = registry.get("a")
        r = build_report(instance=instance, incidents=[Incident("warning", list(instance.buffer)[0], "w", "s")],
                         suppressed=0, client_id="c", hostname="h", version="1", now=NOW, report_id="x1")
        self.assertEqual(r["report_id"], "x1")
