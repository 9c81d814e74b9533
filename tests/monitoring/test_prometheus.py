"""The compose Prometheus configuration, checked by promtool and run for real on loopback.

Debian's ``prometheus`` scrapes a small real cluster (one gateway, two workers)
through a loopback copy of ``docker/prometheus/prometheus.yml``, while the test
sends misses, hits and, after killing a worker, failovers; then every expression
the Grafana dashboard uses must return data through ``/api/v1/query``.

The configuration's DNS discovery runs as written too: Prometheus gets a private
``/etc/resolv.conf`` (a mount namespace of its own) naming a loopback DNS server
that answers ``gateway`` and ``worker`` with the replicas' addresses, the way
Docker's DNS does, and a replica added to the answer is scraped within a refresh.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.error import CannotListenError
from twisted.names import dns
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from tests.monitoring import (
    PROMETHEUS_CONFIG_PATH,
    DnsDiscovery,
    LoopbackCluster,
    LoopbackDns,
    PrometheusServer,
    dashboard_targets,
    dns_discoveries,
    dns_discovery_config,
    ensure_debs,
    finite_values,
    legend_labels,
    load_dashboard,
    loopback_config,
    plan_cluster,
    poll,
    start_cluster,
)
from tests.processes import Reply, in_thread, loopback_address


def live_reactor() -> Any:
    # Tests (not the package) may use the global reactor: trial runs it.
    from twisted.internet import reactor

    return reactor


def require_prometheus() -> None:
    reason = ensure_debs("prometheus")
    if reason is not None:
        raise SkipTest(reason)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)


class ConfigurationTests(SynchronousTestCase):
    """What promtool and the loopback copy say about the compose configuration."""

    def setUp(self) -> None:
        require_prometheus()
        self.config = PROMETHEUS_CONFIG_PATH.read_text("utf-8")
        self.directory = Path(tempfile.mkdtemp(prefix="imgproxy-promtool-"))
        self.addCleanup(shutil.rmtree, self.directory, True)

    def test_promtool_accepts_the_compose_configuration(self) -> None:
        checked = promtool("check", "config", str(PROMETHEUS_CONFIG_PATH))
        self.assertEqual(checked.returncode, 0, checked.stdout + checked.stderr)

    def test_every_gateway_and_worker_replica_is_found_through_dns(self) -> None:
        self.assertEqual(
            dns_discoveries(self.config),
            [
                DnsDiscovery(job="gateway", names=("gateway",), type="A", port=8080),
                DnsDiscovery(job="worker", names=("worker",), type="A", port=8080),
            ],
        )

    def test_the_loopback_copy_swaps_discovery_for_static_targets_and_keeps_the_rest(self) -> None:
        copy = loopback_config(
            self.config,
            {"gateway": ["127.0.0.2:8001"], "worker": ["127.0.0.3:8002", "127.0.0.4:8003"]},
            "127.0.0.1:9999",
        )
        path = self.directory / "loopback.yml"
        path.write_text(copy, "utf-8")
        checked = promtool("check", "config", str(path))
        self.assertEqual(checked.returncode, 0, checked.stdout + checked.stderr + copy)
        self.assertNotIn("dns_sd_configs", copy)
        self.assertIn("- targets: [127.0.0.3:8002, 127.0.0.4:8003]", copy)
        self.assertIn("- targets: [127.0.0.1:9999]", copy)
        self.assertIn("scrape_interval: 1s", copy)
        # Job names and relabelling, which the dashboard relies on, are untouched.
        for line in ("job_name: gateway", "job_name: worker", "replacement: worker"):
            self.assertIn(line, copy)

    def test_promtool_parses_every_dashboard_expression(self) -> None:
        # As recording rules, each expression goes through Prometheus's own parser.
        targets = dashboard_targets(load_dashboard())
        rules = {
            "groups": [{
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:expression_{i}", "expr": target.expr}
                    for i, target in enumerate(targets)
                ],
            }]
        }
        path = self.directory / "rules.yml"
        path.write_text(json.dumps(rules), "utf-8")  # JSON is YAML
        checked = promtool("check", "rules", str(path))
        self.assertEqual(checked.returncode, 0, checked.stdout + checked.stderr)
        self.assertIn(f"{len(targets)} rules found", checked.stdout)

    def test_promtool_refuses_a_broken_expression(self) -> None:
        # The check above can fail: a typo in an expression is caught.
        path = self.directory / "rules.yml"
        rules = {"groups": [{"name": "g", "rules": [
            {"record": "broken", "expr": "sum by (worker (rate(x[1m]))"}
        ]}]}
        path.write_text(json.dumps(rules), "utf-8")
        self.assertNotEqual(promtool("check", "rules", str(path)).returncode, 0)


@pytest.mark.slow  # real processes: 20-40 s on a busy 2-core machine
class ScrapeTests(TestCase):
    """Real Prometheus, a real cluster, and every dashboard expression queried."""

    timeout = 60

    def setUp(self) -> None:
        require_prometheus()
        self.reactor = live_reactor()

    def launch_prometheus(self, cluster: LoopbackCluster) -> PrometheusServer:
        directory = tempfile.mkdtemp(prefix="imgproxy-prometheus-")
        self.addCleanup(shutil.rmtree, directory, True)
        prometheus = PrometheusServer(directory)
        config = loopback_config(
            PROMETHEUS_CONFIG_PATH.read_text("utf-8"),
            {
                "gateway": [cluster.gateway.authority],
                "worker": [worker.authority for worker in cluster.workers],
            },
            prometheus.authority,
        )
        prometheus.launch(config)
        self.addCleanup(prometheus.stop)
        return prometheus

    async def get_each(self, cluster: LoopbackCluster, paths: list[str]) -> list[Reply]:
        # One at a time: with requests in parallel, bounded load may send one past
        # its owner, and the hits below would not be certain.
        return [await cluster.gateway.request_async(self.reactor, path) for path in paths]

    async def drive_traffic(self, cluster: LoopbackCluster) -> None:
        """Misses, then hits, then a worker killed and requests that fail over."""
        misses = [cluster.image_path(url, w=40) for url in cluster.image_urls]
        replies = await self.get_each(cluster, misses)
        self.assertEqual([r.header("x-cache") for r in replies], ["MISS"] * len(misses))
        replies = await self.get_each(cluster, misses)
        self.assertEqual([r.header("x-cache") for r in replies], ["HIT"] * len(misses))
        # SIGKILL: connections to it are refused at once, long before membership
        # suspects it, so the gateway fails over on the first request it owns.
        victim = cluster.owner_of(cluster.image_urls[0])
        victim.kill()
        await in_thread(self.reactor, victim.wait_exit)
        fresh = [cluster.image_path(url, w=24) for url in cluster.image_urls]
        replies = await self.get_each(cluster, fresh)
        self.assertEqual([r.status for r in replies], [200] * len(fresh))

    async def test_every_dashboard_expression_returns_data(self) -> None:
        targets = dashboard_targets(load_dashboard())
        cluster = await plan_cluster(self, self.reactor, workers=2, images=8)
        # Prometheus starts while the nodes do (it retries a target until it answers).
        prometheus = self.launch_prometheus(cluster)
        await start_cluster(self.reactor, cluster)

        def every_node_scraped() -> bool | None:
            health = {t["labels"]["instance"]: t["health"] for t in prometheus.targets()}
            expected = {p.authority for p in cluster.processes}
            if not all(health.get(authority) == "up" for authority in expected):
                raise AssertionError(f"targets: {health}")
            return True

        # Traffic only after the first scrape: rates then see the counters rise.
        await poll(self.reactor, every_node_scraped, 20, "prometheus scraping every node")
        await self.drive_traffic(cluster)
        metrics = await cluster.gateway.request_async(self.reactor, "/metrics")
        self.assertRegex(metrics.body.decode(), r"(?m)^imgproxy_gateway_failovers_total [1-9]")

        def every_expression_answers() -> dict[str, list[dict[str, Any]]] | None:
            results = {}
            missing = []
            for target in targets:
                result = prometheus.query(target.expr)
                if not finite_values(result):
                    missing.append(f"{target} -> {result}")
                results[target.expr] = result
            if missing:
                raise AssertionError("no data yet for:\n" + "\n".join(missing))
            return results

        results = await poll(
            self.reactor, every_expression_answers, 30, "every dashboard expression with data"
        )

        # Legends name labels the series really have (else Grafana shows blanks).
        for target in targets:
            for series in results[target.expr]:
                for label in legend_labels(target.legend):
                    self.assertIn(label, series["metric"], f"{target}: legend {target.legend}")
        # The distribution panel shows every worker the gateway sent requests to.
        per_worker = results["sum by (worker) (rate(imgproxy_gateway_worker_requests_total[1m]))"]
        self.assertEqual(
            {series["metric"]["worker"] for series in per_worker},
            {worker.name for worker in cluster.workers},
        )


@pytest.mark.slow  # real processes: 20-40 s on a busy 2-core machine
class DnsDiscoveryTests(TestCase):
    """The compose configuration's own DNS discovery, answered by a loopback DNS server."""

    timeout = 60

    def setUp(self) -> None:
        require_prometheus()
        if os.geteuid() != 0 or shutil.which("unshare") is None:
            raise SkipTest("needs root and unshare: a DNS server on port 53, a private resolv.conf")
        self.reactor = live_reactor()

    async def test_every_replica_is_scraped_and_a_new_one_found_within_a_refresh(self) -> None:
        cluster = await plan_cluster(self, self.reactor, workers=2, images=0, same_port=True)
        gateway, first, second = cluster.processes
        # At first the name `worker` stands for one replica, as after `docker compose up`.
        resolver = LoopbackDns(
            loopback_address(), {"gateway": [gateway.interface], "worker": [first.interface]}
        )
        try:
            resolver.start(self.reactor)
        except CannotListenError as error:
            raise SkipTest(f"cannot serve DNS on {resolver.address}:53: {error}") from None
        self.addCleanup(resolver.stop)
        directory = tempfile.mkdtemp(prefix="imgproxy-prometheus-")
        self.addCleanup(shutil.rmtree, directory, True)
        prometheus = PrometheusServer(directory)
        config = dns_discovery_config(
            PROMETHEUS_CONFIG_PATH.read_text("utf-8"), gateway.port, prometheus.authority
        )
        prometheus.launch(config, resolv_conf=resolver.resolv_conf())
        self.addCleanup(prometheus.stop)
        await start_cluster(self.reactor, cluster)

        def scraped(expected: dict[str, set[str]]) -> Callable[[], bool | None]:
            def check() -> bool | None:
                found: dict[str, set[str]] = {"gateway": set(), "worker": set()}
                for target in prometheus.targets():
                    job = target["labels"]["job"]
                    if job in found and target["health"] == "up":
                        self.assertEqual(target["labels"]["role"], job)
                        found[job].add(target["labels"]["instance"])
                if found != expected:
                    raise AssertionError(f"scraped {found}, expected {expected}")
                return True
            return check

        await poll(
            self.reactor,
            scraped({"gateway": {gateway.authority}, "worker": {first.authority}}),
            20, "the discovered replicas scraped",
        )
        # `--scale worker=2`: the name now stands for both; the config's refresh finds it.
        resolver.records["worker"] = [first.interface, second.interface]
        both = {first.authority, second.authority}
        await poll(
            self.reactor,
            scraped({"gateway": {gateway.authority}, "worker": both}),
            20, "the new replica scraped",
        )
        self.assertIn(("worker", dns.A), resolver.queries)
