"""``twistd imgproxy``: the options and the one composition root.

This is the only module that touches the global reactor; everything it builds
gets the reactor, the thread pool and the HTTP client passed in.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.python import usage

from imgproxy.config import (
    MEMBERSHIP_PROFILES,
    ROLES,
    Config,
    ConfigError,
    http_endpoint,
    parse_duration,
    parse_networks,
    parse_positive_int,
    parse_secret,
    parse_seeds,
    parse_size,
)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class Options(usage.Options):
    """Every option of the contract; each also read from its environment variable."""

    synopsis = "[options]"
    longdesc = (
        "A distributed image cache proxy. GET /image?url=...&w=...&h=... resizes and "
        "caches; --role picks standalone (default), gateway or worker."
    )

    optParameters = [
        ["role", None, "standalone", "standalone, gateway or worker"],
        ["http", None, "tcp:8080", "strports description of the HTTP listener"],
        ["bind", None, "0.0.0.0", "address the gossip (UDP and TCP) listener binds"],
        ["advertise", None, None, "address other members use to reach this node"],
        ["gossip-port", None, "7946", "UDP and TCP port of the membership protocol"],
        ["node-name", None, None, "unique member name (default: the host name)"],
        ["join", None, None, "comma-separated host[:port] seeds"],
        ["cluster-secret", None, None, "base64 of a 16, 24 or 32 byte key"],
        ["cache-dir", None, "./imgproxy-cache", "on-disk cache directory"],
        ["cache-max-bytes", None, "1G", "cache size cap (K, M, G)"],
        ["cache-ttl", None, "7d", "age after which an entry is stale (s, m, h, d)"],
        ["signing-key", None, None, "when set, /image requires a valid sig"],
        ["allow-networks", None, None, "comma-separated CIDRs origins may be on anyway"],
        ["max-source-bytes", None, "32M", "larger sources get 413"],
        ["max-source-pixels", None, "50000000", "sources with more pixels get 413"],
        ["fetch-timeout", None, "10s", "an origin slower than this gets 504"],
        ["transform-threads", None, None, "image transform threads (default: the cores)"],
        ["transform-queue", None, "64", "transforms that may wait before 503"],
        ["max-frames", None, "200", "animation frames kept; longer animations get 413"],
        ["membership-profile", None, "lan", "memberlist timing profile: lan or local"],
        ["load-epsilon", None, "0.25", "bounded-load slack: in-flight cap is (1+e) x mean"],
    ]
    optFlags = [
        ["allow-private-sources", None, "allow origins on non-public addresses"],
    ]

    # option name -> environment variables, the first one set wins
    environment = {
        "role": ["IMGPROXY_ROLE"],
        "http": ["IMGPROXY_HTTP", "HTTP_PORT"],
        "bind": ["IMGPROXY_BIND"],
        "advertise": ["IMGPROXY_ADVERTISE"],
        "gossip-port": ["IMGPROXY_GOSSIP_PORT"],
        "node-name": ["IMGPROXY_NODE_NAME"],
        "join": ["IMGPROXY_JOIN", "KNOWN_HOSTS"],
        "cluster-secret": ["IMGPROXY_CLUSTER_SECRET", "CLUSTER_SECRET"],
        "cache-dir": ["IMGPROXY_CACHE_DIR"],
        "cache-max-bytes": ["IMGPROXY_CACHE_MAX_BYTES"],
        "cache-ttl": ["IMGPROXY_CACHE_TTL"],
        "signing-key": ["IMGPROXY_SIGNING_KEY"],
        "allow-private-sources": ["IMGPROXY_ALLOW_PRIVATE_SOURCES"],
        "allow-networks": ["IMGPROXY_ALLOW_NETWORKS"],
        "max-source-bytes": ["IMGPROXY_MAX_SOURCE_BYTES"],
        "max-source-pixels": ["IMGPROXY_MAX_SOURCE_PIXELS"],
        "fetch-timeout": ["IMGPROXY_FETCH_TIMEOUT"],
        "transform-threads": ["IMGPROXY_TRANSFORM_THREADS"],
        "transform-queue": ["IMGPROXY_TRANSFORM_QUEUE"],
        "max-frames": ["IMGPROXY_MAX_FRAMES"],
        "membership-profile": ["IMGPROXY_MEMBERSHIP_PROFILE"],
        "load-epsilon": ["IMGPROXY_LOAD_EPSILON"],
    }

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        super().__init__()
        self.environ = dict(os.environ if environ is None else environ)
        self.from_environment: set[str] = set()
        for name, variables in self.environment.items():
            for variable in variables:
                if variable in self.environ:
                    self._set_from_environment(name, variable, self.environ[variable])
                    break

    def _set_from_environment(self, name: str, variable: str, value: str) -> None:
        if name == "allow-private-sources":
            lowered = value.strip().lower()
            if lowered not in _TRUE | _FALSE:
                raise usage.UsageError(f"{variable}: expected true or false, not {value!r}")
            self[name] = 1 if lowered in _TRUE else 0
        else:
            self[name] = value
        self.from_environment.add(name)

    def postOptions(self) -> None:
        try:
            self.config = self.to_config()
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        if self.config.role != "standalone":
            raise usage.UsageError(
                f"--role {self.config.role} is not available yet: "
                "only standalone runs in this version"
            )

    def _given(self, name: str) -> bool:
        defaults = dict((p[0], p[2]) for p in self.optParameters)
        return name in self.from_environment or self[name] != defaults.get(name)

    def to_config(self) -> Config:
        role = str(self["role"]).strip().lower()
        if role not in ROLES:
            raise ConfigError(f"--role must be one of {', '.join(ROLES)}, not {self['role']!r}")
        profile = str(self["membership-profile"]).strip().lower()
        if profile not in MEMBERSHIP_PROFILES:
            choices = ", ".join(MEMBERSHIP_PROFILES)
            raise ConfigError(f"--membership-profile must be one of {choices}")
        gossip_port = parse_positive_int(self["gossip-port"], "--gossip-port")
        if gossip_port > 65535:
            raise ConfigError("--gossip-port must be from 1 to 65535")
        try:
            epsilon = float(self["load-epsilon"])
        except ValueError:
            raise ConfigError("--load-epsilon must be a number") from None
        if not 0 < epsilon <= 10:
            raise ConfigError("--load-epsilon must be more than 0 and at most 10")
        signing_key = self["signing-key"]
        node_name = self["node-name"]
        if node_name is not None and not str(node_name).strip():
            raise ConfigError("--node-name must not be empty")
        values = dict(
            role=role,
            http=http_endpoint(self["http"]),
            bind=str(self["bind"]).strip(),
            advertise=self["advertise"] or None,
            gossip_port=gossip_port,
            gossip_port_given=self._given("gossip-port"),
            join=parse_seeds(self["join"], gossip_port),
            cluster_secret=parse_secret(self["cluster-secret"], "--cluster-secret"),
            cache_dir=str(self["cache-dir"]),
            cache_max_bytes=parse_size(self["cache-max-bytes"], "--cache-max-bytes"),
            cache_ttl=parse_duration(self["cache-ttl"], "--cache-ttl"),
            signing_key=signing_key.encode("utf-8") if signing_key else None,
            allow_private_sources=bool(self["allow-private-sources"]),
            allow_networks=parse_networks(self["allow-networks"]),
            max_source_bytes=parse_size(self["max-source-bytes"], "--max-source-bytes"),
            max_source_pixels=parse_positive_int(
                self["max-source-pixels"], "--max-source-pixels"
            ),
            fetch_timeout=parse_duration(self["fetch-timeout"], "--fetch-timeout"),
            transform_queue=parse_positive_int(self["transform-queue"], "--transform-queue"),
            max_frames=parse_positive_int(self["max-frames"], "--max-frames"),
            membership_profile=profile,
            load_epsilon=epsilon,
        )
        if node_name:
            values["node_name"] = str(node_name).strip()
        if self["transform-threads"]:
            values["transform_threads"] = parse_positive_int(
                self["transform-threads"], "--transform-threads"
            )
        if not values["http"].startswith(("tcp:", "unix:", "ssl:", "tcp6:")):
            raise ConfigError(
                f"--http: {self['http']!r} is not a strports description like tcp:8080"
            )
        return Config(**values)


def makeService(options: Options) -> IService:
    """Compose the node for ``options.config``: the only place that picks the reactor."""
    from twisted.internet import reactor

    return build_standalone(options.config, reactor)


def build_standalone(config: Config, reactor: Any) -> MultiService:
    """Gateway and worker in one process: no network hop between them."""
    from twisted.application import strports

    from imgproxy.lifecycle import LifecycleService
    from imgproxy.metrics import NodeMetrics
    from imgproxy.web.public import ImageResource
    from imgproxy.web.site import HealthResource, MetricsResource, NodeRoot, NodeSite
    from imgproxy.worker.addresses import AddressPolicy
    from imgproxy.worker.cache import DiskCache
    from imgproxy.worker.fetch import FetchLimits, SourceFetcher
    from imgproxy.worker.images import ImageService
    from imgproxy.worker.pool import TransformPool
    from imgproxy.worker.transform import TransformLimits

    root = MultiService()
    metrics = NodeMetrics()
    pool = TransformPool(reactor, config.transform_threads, config.transform_queue)
    pool.setServiceParent(root)
    cache = DiskCache(config.cache_dir, config.cache_max_bytes, config.cache_ttl, reactor)
    LifecycleService("cache", on_start=cache.start).setServiceParent(root)
    fetcher = SourceFetcher(
        reactor,
        AddressPolicy(config.allow_private_sources, config.allow_networks),
        FetchLimits(max_bytes=config.max_source_bytes, timeout=config.fetch_timeout),
    )
    LifecycleService("fetcher", on_stop=fetcher.close).setServiceParent(root)
    images = ImageService(
        cache,
        fetcher,
        pool,
        TransformLimits(max_pixels=config.max_source_pixels, max_frames=config.max_frames),
        metrics,
    )
    add_node_gauges(metrics, cache, pool)
    site = NodeSite(
        NodeRoot(
            {
                b"image": ImageResource(
                    images, metrics, config.signing_key, int(config.cache_ttl)
                ),
                b"health": HealthResource(lambda: standalone_health(config)),
                b"metrics": MetricsResource(metrics),
            }
        )
    )
    strports.service(config.http, site, reactor=reactor).setServiceParent(root)
    return root


def standalone_health(config: Config) -> dict[str, Any]:
    address = config.advertise or config.bind
    me = {
        "name": config.node_name,
        "role": config.role,
        "address": address,
        "http_port": config.http_port,
        "state": "alive",
        "incarnation": 0,
    }
    return {**me, "members": [me]}


def add_node_gauges(metrics: Any, cache: Any, pool: Any) -> None:
    from imgproxy.metrics import counter, gauge

    def read() -> list[Any]:
        stats = cache.stats
        return [
            gauge("imgproxy_cache_entries", "Entries in the disk cache", stats.entries),
            gauge("imgproxy_cache_bytes", "Bytes in the disk cache", stats.bytes),
            counter("imgproxy_cache_evictions", "Entries evicted to stay under the cap",
                    stats.evictions),
            counter("imgproxy_cache_corrupt_dropped", "Corrupt entries found and dropped",
                    stats.corrupt_dropped),
            counter("imgproxy_cache_write_errors", "Entries that could not be written",
                    stats.write_errors),
            gauge("imgproxy_transform_queue_depth", "Transforms waiting for a thread",
                  pool.waiting),
            gauge("imgproxy_transforms_in_progress", "Transforms running or waiting",
                  pool.in_progress),
            counter("imgproxy_transforms_refused", "Transforms refused with 503", pool.refused),
        ]

    metrics.add_gauges(read)
