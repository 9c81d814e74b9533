"""Prometheus metrics of one node, in a registry of its own (tests build many nodes)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class NodeMetrics:
    """Every metric a node exports; cheap to update on the hit path."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "imgproxy_http_requests", "HTTP requests answered, by endpoint and status",
            ["endpoint", "status"], registry=r,
        )
        self.cache_results = Counter(
            "imgproxy_image_requests", "Image requests by cache result (hit or miss)",
            ["cache"], registry=r,
        )
        self.request_seconds = Histogram(
            "imgproxy_request_duration_seconds", "Time to answer an image request",
            ["cache"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.fetch_seconds = Histogram(
            "imgproxy_fetch_duration_seconds", "Time to download a source from its origin",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.transform_seconds = Histogram(
            "imgproxy_transform_duration_seconds", "Time to transform one image (queue included)",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.handoffs = Counter(
            "imgproxy_handoffs", "Lookups at a key's previous owner, by result (hit or miss)",
            ["result"], registry=r,
        )
        # Bound children: the hit path then costs one increment, not a label lookup.
        self._hit = self.cache_results.labels("hit")
        self._miss = self.cache_results.labels("miss")
        self._hit_seconds = self.request_seconds.labels("hit")
        self._miss_seconds = self.request_seconds.labels("miss")
        self._statuses: dict[tuple[str, int], Counter] = {}

    def count_request(self, endpoint: str, status: int) -> None:
        child = self._statuses.get((endpoint, status))
        if child is None:
            child = self._statuses[(endpoint, status)] = self.requests.labels(endpoint, str(status))
        child.inc()

    def count_image(self, hit: bool, seconds: float) -> None:
        if hit:
            self._hit.inc()
            self._hit_seconds.observe(seconds)
        else:
            self._miss.inc()
            self._miss_seconds.observe(seconds)

    def observe_fetch(self, seconds: float) -> None:
        self.fetch_seconds.observe(seconds)

    def observe_transform(self, seconds: float) -> None:
        self.transform_seconds.observe(seconds)

    def count_handoff(self, result: str) -> None:
        self.handoffs.labels(result).inc()

    def add_gauges(self, read: Callable[[], Iterable[Metric]]) -> None:
        """Export values read at scrape time (cache size, queue depth, members)."""
        self.registry.register(_ReadAtScrape(read))


class _ReadAtScrape(Collector):
    def __init__(self, read: Callable[[], Iterable[Metric]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        return list(self._read())

    def describe(self) -> Iterable[Metric]:
        return []


def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)
