"""What operators import as it is: contrib/prometheus/alerts.yml (checked by promtool where
Debian's prometheus package is installed) and contrib/grafana/ dashboards, whose every
Prometheus expression names metrics the server exports."""

from __future__ import annotations

import json
import os
import re
import shutil

from prometheus_client import generate_latest
from twisted.internet import defer, reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from tempesta_ts.config import Config
from tests.live import start_live

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALERTS = os.path.join(ROOT, "contrib", "prometheus", "alerts.yml")
GRAFANA = os.path.join(ROOT, "contrib", "grafana")
#: Metrics named in contrib/ that this server does not export itself: Prometheus' own `up`,
#: and the ClickHouse sink's drop counter (exported once ClickHouse is configured).
ELSEWHERE = {"up"}
METRIC = re.compile(r"\b(?:tempesta_ts_[a-z0-9_]+|process_[a-z0-9_]+|up)\b(?!\s*\()")


def named_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression reads."""
    return set(METRIC.findall(expr))


def prometheus_exprs() -> list[tuple[str, str]]:
    """(where, expr) of every Prometheus expression in contrib/."""
    found = []
    with open(ALERTS, encoding="utf-8") as f:
        text = f.read()
    for match in re.finditer(r"expr: (>-\n(?:\s{10}.*\n)+|.*)", text):
        found.append(("alerts.yml", match.group(1).replace(">-\n", "")))
    for name in os.listdir(GRAFANA):
        with open(os.path.join(GRAFANA, name), encoding="utf-8") as f:
            dashboard = json.load(f)
        for panel in dashboard["panels"]:
            for target in panel.get("targets", ()):
                if "expr" in target:
                    found.append((f"{name}: {panel['title']}", target["expr"]))
    return found


class AlertRulesTests(unittest.TestCase):
    """contrib/prometheus/alerts.yml."""

    @defer.inlineCallbacks
    def test_promtool_accepts_the_rules(self):
        promtool = shutil.which("promtool")
        if promtool is None:
            raise unittest.SkipTest("promtool is not installed (apt-get install -y prometheus)")
        out, err, code = yield getProcessOutputAndValue(
            promtool, ["check", "rules", ALERTS], env=dict(os.environ), reactor=reactor)
        self.assertEqual(code, 0, (out + err).decode("utf-8", "replace"))
        self.assertIn(b"SUCCESS", out)

    def test_the_rules_operations_md_promises_are_there(self):
        with open(ALERTS, encoding="utf-8") as f:
            text = f.read()
        for alert in ("TempestaTsInstanceSilent", "TempestaTsMessagesLost",
                      "TempestaTsReportsWaiting", "TempestaTsReportsFailing",
                      "TempestaTsSpoolNearlyFull", "TempestaTsSpoolDegraded",
                      "TempestaTsClickHouseRowsDropped"):
            self.assertIn(f"- alert: {alert}\n", text)
        with open(os.path.join(ROOT, "docs", "operations.md"), encoding="utf-8") as f:
            self.assertIn("contrib/prometheus/alerts.yml", f.read())


class ExportedMetricsTests(unittest.TestCase):
    """Every metric an alert or a dashboard reads is one the server exports."""

    def exported(self) -> set[str]:
        config = Config(host="127.0.0.1", port=0, spool_dir=self.mktemp())
        svc = start_live(self, config)
        # An instance, for the series of each instance.
        svc.udp.datagramReceived(b"6,1,100,-;hello\n", ("127.0.0.2", 6665))
        text = generate_latest(svc.web.registry).decode("utf-8")
        return {line.split("{")[0].split(" ")[0] for line in text.splitlines()
                if line and not line.startswith("#")}

    def test_every_expression_names_exported_metrics(self):
        exported = self.exported() | ELSEWHERE
        exprs = prometheus_exprs()
        self.assertGreater(len(exprs), 20)
        for where, expr in exprs:
            names = named_metrics(expr)
            self.assertTrue(names, f"{where}: {expr}")
            self.assertEqual(names - exported, set(), f"{where}: {expr}")

    def test_a_misspelt_metric_would_be_caught(self):
        self.assertEqual(named_metrics("rate(tempesta_ts_datagram_total[5m]) > 0"),
                         {"tempesta_ts_datagram_total"})
        self.assertNotIn("tempesta_ts_datagram_total", self.exported())


class DashboardTests(unittest.TestCase):
    """contrib/grafana/: JSON Grafana imports, with a data source chosen at import."""

    def load(self, name: str) -> dict:
        with open(os.path.join(GRAFANA, name), encoding="utf-8") as f:
            return json.load(f)

    def test_the_prometheus_dashboard_covers_ingest_loss_incidents_spool_and_deliveries(self):
        dashboard = self.load("tempesta-ts-prometheus.json")
        self.assertEqual(dashboard["__inputs"][0]["pluginId"], "prometheus")
        exprs = " ".join(e for _, e in prometheus_exprs())
        for metric in ("tempesta_ts_datagrams_received_total", "tempesta_ts_udp_socket_drops_total",
                       "tempesta_ts_lost_messages", "tempesta_ts_incidents_total",
                       "tempesta_ts_spool_bytes", "tempesta_ts_reports_delivered_total"):
            self.assertIn(metric, exprs)
        self.assertIn("sum by (kind)", exprs)

    def test_the_clickhouse_dashboard_reads_the_tables_of_tempesta_ts(self):
        dashboard = self.load("tempesta-ts-clickhouse.json")
        self.assertEqual(dashboard["__inputs"][0]["pluginId"], "grafana-clickhouse-datasource")
        sqls = [t["rawSql"] for p in dashboard["panels"] for t in p["targets"]]
        titles = [p["title"] for p in dashboard["panels"]]
        self.assertIn("Incidents by title per day", titles)
        self.assertIn("Instances with the most incidents", titles)
        for sql in sqls:
            tables = set(re.findall(r"\bFROM (\S+)", sql))
            self.assertLessEqual(tables, {"tempesta_ts.incidents", "tempesta_ts.kernel_log"}, sql)
            self.assertIn("$__timeFilter(", sql)
