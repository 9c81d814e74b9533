"""The Grafana dashboard: valid, wired to the provisioned data source, and made only of
metrics that live gateway and worker processes export."""

from __future__ import annotations

import re
from typing import Any

import pytest
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.monitoring import (
    GRAFANA_DATASOURCES_PATH,
    GRAFANA_PROVIDER_PATH,
    REPOSITORY,
    dashboard_panels,
    dashboard_targets,
    exported_names,
    legend_labels,
    load_dashboard,
    metric_names,
    plan_cluster,
    start_cluster,
)

# Panel types Grafana 10 and 11 ship with.
PANEL_TYPES = {
    "timeseries", "stat", "gauge", "bargauge", "table", "piechart", "text", "row",
    "heatmap", "histogram", "barchart", "state-timeline", "status-history",
}
GRID_COLUMNS = 24

# The list: requests per worker, hit ratio, latency percentiles, transform time,
# cache size and evictions, members by state, failovers, handoffs.
REQUIRED_METRICS = {
    "imgproxy_gateway_worker_requests_total",
    "imgproxy_image_requests_total",
    "imgproxy_request_duration_seconds_bucket",
    "imgproxy_transform_duration_seconds_bucket",
    "imgproxy_cache_bytes",
    "imgproxy_cache_evictions_total",
    "imgproxy_members",
    "imgproxy_gateway_failovers_total",
    "imgproxy_handoffs_total",
}
REQUESTS_PER_WORKER = "sum by (worker) (rate(imgproxy_gateway_worker_requests_total[1m]))"


def yaml_scalar(text: str, key: str) -> str:
    """The value of the first ``key: value`` line (enough for our small provisioning files)."""
    match = re.search(rf"(?m)^\s*-?\s*{re.escape(key)}:\s*(\S+)\s*$", text)
    if match is None:
        raise AssertionError(f"no {key} in:\n{text}")
    return match.group(1).strip("'\"")


class MetricNamesTests(SynchronousTestCase):
    """``metric_names``, which the checks below rest on."""

    def test_finds_the_metrics_of_a_rate_ratio(self) -> None:
        expr = (
            'sum(rate(imgproxy_image_requests_total{job="gateway",cache="hit"}[5m]))'
            ' / sum(rate(imgproxy_image_requests_total{job="gateway"}[5m]))'
        )
        self.assertEqual(metric_names(expr), {"imgproxy_image_requests_total"})

    def test_skips_functions_grouping_labels_numbers_and_durations(self) -> None:
        expr = (
            "histogram_quantile(0.99, sum by (le, cache) "
            "(rate(imgproxy_request_duration_seconds_bucket[1m] offset 5m))) > bool 1e3"
        )
        self.assertEqual(metric_names(expr), {"imgproxy_request_duration_seconds_bucket"})

    def test_finds_every_operand_of_a_binary_expression(self) -> None:
        expr = "a_total / on (instance) group_left (role) b_info or c unless d"
        self.assertEqual(metric_names(expr), {"a_total", "b_info", "c", "d"})

    def test_ignores_label_values_that_look_like_names(self) -> None:
        expr = 'max by (state) (imgproxy_members{state=~"alive|suspect", job!="x_y"})'
        self.assertEqual(metric_names(expr), {"imgproxy_members"})

    def test_refuses_a_selector_by_name_label(self) -> None:
        self.assertRaises(ValueError, metric_names, '{__name__="imgproxy_members"}')


class DashboardTests(SynchronousTestCase):
    """The dashboard file and the Grafana provisioning around it."""

    def setUp(self) -> None:
        self.dashboard = load_dashboard()
        self.panels = [p for p in dashboard_panels(self.dashboard) if p.get("type") != "row"]
        self.targets = dashboard_targets(self.dashboard)
        self.datasources = GRAFANA_DATASOURCES_PATH.read_text("utf-8")

    def test_is_a_grafana_dashboard(self) -> None:
        for key, kind in (("uid", str), ("title", str), ("schemaVersion", int), ("panels", list)):
            self.assertIsInstance(self.dashboard.get(key), kind, key)
        self.assertGreaterEqual(self.dashboard["schemaVersion"], 36)  # Grafana 9.4 and later
        self.assertRegex(self.dashboard["uid"], r"^[A-Za-z0-9_-]{1,40}$")
        ids = [panel.get("id") for panel in dashboard_panels(self.dashboard)]
        self.assertTrue(all(isinstance(i, int) for i in ids), ids)
        self.assertEqual(len(ids), len(set(ids)), "panel ids must be unique")

    def test_every_panel_has_a_known_type_a_place_and_queries(self) -> None:
        self.assertGreater(len(self.panels), 0)
        for panel in self.panels:
            title = panel.get("title")
            self.assertTrue(title, panel)
            self.assertIn(panel.get("type"), PANEL_TYPES, title)
            grid = panel.get("gridPos", {})
            for key in ("h", "w", "x", "y"):
                self.assertIsInstance(grid.get(key), int, f"{title}: gridPos.{key}")
            self.assertTrue(0 <= grid["x"] and grid["x"] + grid["w"] <= GRID_COLUMNS, title)
            self.assertGreater(grid["h"], 0, title)
            targets = panel.get("targets", [])
            self.assertGreater(len(targets), 0, f"{title}: no query")
            ref_ids = [t.get("refId") for t in targets]
            self.assertEqual(len(ref_ids), len(set(ref_ids)), f"{title}: refIds {ref_ids}")
            for target in targets:
                self.assertTrue(target.get("expr", "").strip(), f"{title}: empty expr")

    def test_no_two_panels_overlap(self) -> None:
        cells: dict[tuple[int, int], str] = {}
        for panel in self.panels:
            grid = panel["gridPos"]
            for x in range(grid["x"], grid["x"] + grid["w"]):
                for y in range(grid["y"], grid["y"] + grid["h"]):
                    other = cells.setdefault((x, y), panel["title"])
                    self.assertEqual(other, panel["title"], f"overlap at {(x, y)}")

    def test_every_query_uses_the_provisioned_prometheus(self) -> None:
        self.assertEqual(yaml_scalar(self.datasources, "type"), "prometheus")
        self.assertEqual(yaml_scalar(self.datasources, "url"), "http://prometheus:9090")
        uid = yaml_scalar(self.datasources, "uid")
        for panel in self.panels:
            self.assertEqual(panel.get("datasource"), {"type": "prometheus", "uid": uid},
                             panel["title"])
        for target in self.targets:
            self.assertEqual(target.datasource_uid, uid, str(target))

    def test_the_provider_loads_the_folder_compose_mounts(self) -> None:
        provider = GRAFANA_PROVIDER_PATH.read_text("utf-8")
        self.assertEqual(yaml_scalar(provider, "type"), "file")
        path = yaml_scalar(provider, "path")
        compose = (REPOSITORY / "docker-compose.yml").read_text("utf-8")
        self.assertIn(f"./docker/grafana/dashboards:{path}", compose)
        self.assertIn("./docker/grafana/provisioning:/etc/grafana/provisioning", compose)

    def test_shows_every_figure_the_operators_asked_for(self) -> None:
        used = set().union(*(metric_names(t.expr) for t in self.targets))
        self.assertEqual(REQUIRED_METRICS - used, set())
        self.assertIn(REQUESTS_PER_WORKER, [t.expr for t in self.targets])
        quantiles = {
            q for t in self.targets if "imgproxy_request_duration_seconds_bucket" in t.expr
            for q in re.findall(r"histogram_quantile\((0\.\d+)", t.expr)
        }
        self.assertGreaterEqual(quantiles, {"0.5", "0.9", "0.99"})

    def test_legends_name_only_labels_the_query_keeps(self) -> None:
        # After `sum by (a, b)`, only a and b are left for the legend to show.
        for target in self.targets:
            kept = re.findall(r"\bby\s*\(([^)]*)\)", target.expr)
            if not kept or "{{" not in target.legend:
                continue
            labels = {label.strip() for group in kept for label in group.split(",")}
            self.assertLessEqual(legend_labels(target.legend), labels, str(target))


@pytest.mark.slow  # real processes: 20-40 s on a busy 2-core machine
class ExportedMetricsTests(TestCase):
    """Every metric name in the dashboard, on the live ``/metrics`` of a gateway and a worker."""

    timeout = 60

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor

    async def test_every_metric_the_dashboard_uses_is_exported(self) -> None:
        cluster = await plan_cluster(self, self.reactor, workers=1, images=1)
        await start_cluster(self.reactor, cluster)
        # A miss and a hit: labelled series (per worker, per cache result) exist only
        # once something was counted.
        path = cluster.image_path(cluster.image_urls[0], w=32)
        for expected in ("MISS", "HIT"):
            reply = await cluster.gateway.request_async(self.reactor, path)
            self.assertEqual(reply.header("x-cache"), expected)
        exported: set[str] = set()
        for node in cluster.processes:
            reply = await node.request_async(self.reactor, "/metrics")
            self.assertEqual(reply.status, 200, node.name)
            exported |= exported_names(reply.body.decode("utf-8"))
        self.assertIn("imgproxy_gateway_worker_requests_total", exported)
        unknown = {
            str(target): sorted(metric_names(target.expr) - exported)
            for target in dashboard_targets(load_dashboard())
            if metric_names(target.expr) - exported
        }
        self.assertEqual(unknown, {})
