"""``twistd imgproxy``: the options and the one composition root.

This is the only module that touches the global reactor; everything it builds
gets the reactor, the thread pool and the HTTP client passed in.
"""

from __future__ import annotations

import os
from typing import Any

import attrs
from twisted.application.service import IService, MultiService
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from imgproxy.config import (
    MEMBERSHIP_PROFILES,
    ROLES,
    Config,
    ConfigError,
    configuration_warnings,
    default_advertise_address,
    http_endpoint,
    http_port_of,
    parse_address,
    parse_duration,
    parse_networks,
    parse_positive_int,
    parse_secret,
    parse_seeds,
    parse_size,
)

_log = Logger()

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
        ["purge-key", None, None, "when set, DELETE /image is signed with it, not the signing key"],
        ["allow-networks", None, None, "comma-separated CIDRs origins may be on anyway"],
        ["max-source-bytes", None, "32M", "larger sources get 413"],
        ["max-source-pixels", None, "50000000", "sources with more pixels get 413"],
        ["fetch-timeout", None, "10s", "an origin slower than this gets 504"],
        ["fetch-concurrency", None, "16", "source downloads at once; more wait"],
        ["fetch-queue", None, "256", "source downloads that may wait before 503"],
        ["transform-threads", None, None, "image transform threads (default: the cores)"],
        ["transform-queue", None, "64", "transforms that may wait before 503"],
        ["max-frames", None, "500", "frames an animation may keep (not a still of it); more: 413"],
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
        "purge-key": ["IMGPROXY_PURGE_KEY"],
        "allow-private-sources": ["IMGPROXY_ALLOW_PRIVATE_SOURCES"],
        "allow-networks": ["IMGPROXY_ALLOW_NETWORKS"],
        "max-source-bytes": ["IMGPROXY_MAX_SOURCE_BYTES"],
        "max-source-pixels": ["IMGPROXY_MAX_SOURCE_PIXELS"],
        "fetch-timeout": ["IMGPROXY_FETCH_TIMEOUT"],
        "fetch-concurrency": ["IMGPROXY_FETCH_CONCURRENCY"],
        "fetch-queue": ["IMGPROXY_FETCH_QUEUE"],
        "transform-threads": ["IMGPROXY_TRANSFORM_THREADS"],
        "transform-queue": ["IMGPROXY_TRANSFORM_QUEUE"],
        "max-frames": ["IMGPROXY_MAX_FRAMES"],
        "membership-profile": ["IMGPROXY_MEMBERSHIP_PROFILE"],
        "load-epsilon": ["IMGPROXY_LOAD_EPSILON"],
    }

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        super().__init__()
        for name, variables in self.environment.items():
            self.docs[name] = f"{self.docs[name]} [env: {', '.join(variables)}]"
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
        if not str(self["cache-dir"]).strip():
            # An empty path is the working directory: its files would be mixed in.
            raise ConfigError("--cache-dir must not be empty")
        values = dict(
            role=role,
            http=http_endpoint(self["http"]),
            bind=parse_address(str(self["bind"]), "--bind", unspecified=True),
            advertise=(
                parse_address(self["advertise"], "--advertise", unspecified=False)
                if self["advertise"]
                else None
            ),
            gossip_port=gossip_port,
            gossip_port_given=self._given("gossip-port"),
            join=parse_seeds(self["join"], gossip_port),
            cluster_secret=parse_secret(self["cluster-secret"], "--cluster-secret"),
            cache_dir=str(self["cache-dir"]),
            cache_max_bytes=parse_size(self["cache-max-bytes"], "--cache-max-bytes"),
            cache_ttl=parse_duration(self["cache-ttl"], "--cache-ttl"),
            signing_key=signing_key.encode("utf-8") if signing_key else None,
            purge_key=self["purge-key"].encode("utf-8") if self["purge-key"] else None,
            allow_private_sources=bool(self["allow-private-sources"]),
            allow_networks=parse_networks(self["allow-networks"]),
            max_source_bytes=parse_size(self["max-source-bytes"], "--max-source-bytes"),
            max_source_pixels=parse_positive_int(
                self["max-source-pixels"], "--max-source-pixels"
            ),
            fetch_timeout=parse_duration(self["fetch-timeout"], "--fetch-timeout"),
            fetch_concurrency=parse_positive_int(
                self["fetch-concurrency"], "--fetch-concurrency"
            ),
            fetch_queue=parse_positive_int(self["fetch-queue"], "--fetch-queue"),
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
        try:
            # Parsing builds the endpoint without listening (nor touching a reactor).
            serverFromString(None, values["http"])
        except Exception as error:
            interface = values["http"].partition("interface=")[2]
            hint = (
                r" (write an IPv6 interface's colons as \:, as in interface=\:\:1)"
                if ":" in interface.replace("\\:", "")
                else ""
            )
            raise ConfigError(f"--http: {self['http']!r} is not usable: {error}{hint}") from None
        if not 0 <= http_port_of(values["http"]) <= 65535:
            raise ConfigError(f"--http: {self['http']!r} has a port outside 0..65535")
        return Config(**values)


def makeService(options: Options) -> IService:
    """Compose the node for ``options.config``: the only place that picks the reactor."""
    from twisted.internet import reactor

    return build_node(options.config, reactor)


def build_node(config: Config, reactor: Any) -> MultiService:
    """Every role's node: its HTTP site, its worker and/or gateway parts, its membership.

    Services stop one after another, in reverse order of addition: membership
    first (the cluster stops routing here), then a worker lingers so the new
    owners of its keys can pull them, then the HTTP listener closes and
    in-flight requests finish.
    """
    from twisted.application import strports

    from imgproxy.cluster import (
        PURGE_EVENT,
        ClusterView,
        key_shares,
        purge_event_payload,
    )
    from imgproxy.lifecycle import DrainService, LifecycleService, NodeService
    from imgproxy.metrics import NodeMetrics
    from imgproxy.web.public import ImageResource
    from imgproxy.web.site import (
        MAX_REQUEST_HEAD,
        WORKER_REQUEST_HEAD,
        JsonDocument,
        MetricsResource,
        NodeRoot,
        NodeSite,
    )
    from imgproxy.web.status import StatusPage, status_document

    for warning in configuration_warnings(config):
        _log.warn("{warning}", warning=warning)
    root = NodeService()
    metrics = NodeMetrics()
    advertise = config.advertise or default_advertise_address(config.bind)
    membership = build_membership(config, advertise, reactor) if config.runs_membership else None
    view = ClusterView(me=config.node_name)
    children: dict[bytes, Any] = {}
    images = None
    cache = None
    signer = None
    if config.cluster_secret is not None:
        from imgproxy.auth import RequestSigner

        signer = RequestSigner.from_secret(config.cluster_secret)

    if config.role in ("standalone", "worker"):
        images, cache = build_worker_part(config, reactor, metrics, root)
    client = None
    if config.role in ("gateway", "worker"):
        from imgproxy.gateway.client import WorkerClient

        client = WorkerClient(reactor, signer, produce_timeout=config.fetch_timeout + 60)
        LifecycleService("worker-client", on_stop=client.close).setServiceParent(root)

    if config.role == "standalone":
        assert images is not None
        backend: Any = images
    elif config.role == "gateway":
        from imgproxy.gateway.router import ClusterBackend
        from imgproxy.placement import BoundedLoad

        assert membership is not None

        def announce_purge(url: str) -> None:
            membership.send_user_event(PURGE_EVENT, purge_event_payload(url))

        backend = ClusterBackend(
            view,
            client,
            BoundedLoad(config.load_epsilon),
            reactor,
            metrics,
            announce_purge=announce_purge,
        )
    else:
        from imgproxy.worker.handoff import PeerHandoff
        from imgproxy.worker.internal import internal_api

        assert images is not None
        images.peers = PeerHandoff(view, client, reactor)
        backend = None
        children[b"v1"] = internal_api(images, signer, reactor, metrics)
    if backend is not None:
        children[b"image"] = ImageResource(
            backend,
            metrics,
            config.signing_key,
            int(config.cache_ttl),
            purge_key=config.purge_key,
        )

    me = {
        "name": config.node_name,
        "role": config.role,
        "address": advertise,
        "http_port": config.http_port,
        "gossip_port": config.gossip_port if membership is not None else None,
    }

    def members() -> list[dict[str, Any]]:
        if membership is None:
            return [{**me, "state": "alive", "incarnation": 0}]
        return membership.describe_members()

    def health() -> dict[str, Any]:
        listed = members()
        mine = next((m for m in listed if m["name"] == config.node_name), None)
        return {
            **me,
            "state": mine["state"] if mine else "alive",
            "incarnation": mine["incarnation"] if mine else 0,
            "members": listed,
        }

    def status() -> dict[str, Any]:
        shares = (
            {config.node_name: 1.0}
            if config.role == "standalone"
            else key_shares(view.current)
        )
        return {
            "node": me,
            "members": members(),
            "key_shares": shares,
            "cache": cache_status(cache) if cache is not None else {},
        }

    # 503 once this node leaves (it still answers while it drains): a load balancer's
    # health check stops sending it requests, as with any server shutting down.
    children[b"health"] = JsonDocument(
        health, status_of=lambda document: 503 if document["state"] == "left" else 200
    )
    children[b"metrics"] = MetricsResource(metrics)
    children[b"status.json"] = JsonDocument(lambda: status_document(status()))
    site = NodeSite(
        NodeRoot(children, index=StatusPage(status)),
        reactor,
        max_request_head=WORKER_REQUEST_HEAD if config.role == "worker" else MAX_REQUEST_HEAD,
    )
    DrainService(site, reactor).setServiceParent(root)
    strports.service(config.http, site, reactor=reactor).setServiceParent(root)

    if membership is not None:
        from imgproxy.membership.service import watch_workers

        watch_workers(membership, view)
        if images is not None:
            from imgproxy.worker.purges import GossipedPurges

            # Purges gossiped by the gateways, and those missed while away.
            purges = GossipedPurges(
                images.purge_source_key,
                membership.events,
                config.cache_dir,
                invalidate_all=images.cache.invalidate_all,
            )
            purges.resume()
            membership.on_user_event(purges)
            membership.on_events_lost(purges.events_lost)
        if config.role == "worker":
            # Stopped before the listener: the worker stays reachable a moment after
            # leaving, so the new owners of its keys can still pull them.
            LifecycleService(
                "handoff-linger", on_stop=lambda: linger(reactor, HANDOFF_LINGER_SECONDS)
            ).setServiceParent(root)
        membership.setServiceParent(root)
        add_membership_gauges(metrics, membership)
    return root


HANDOFF_LINGER_SECONDS = 3.0
DEAD_NODE_RECLAIM_SECONDS = 10.0
TRIM_INTERVAL_SECONDS = 5.0


def linger(reactor: Any, seconds: float) -> Any:
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)


def build_membership(config: Config, advertise: str, reactor: Any) -> Any:
    from imgproxy.membership.keyring import Keyring
    from imgproxy.membership.profiles import LAN, LOCAL
    from imgproxy.membership.service import MembershipService

    return MembershipService(
        reactor,
        name=config.node_name,
        bind=config.bind,
        advertise=advertise,
        port=config.gossip_port,
        tags={"role": config.role, "http": str(config.http_port)},
        # A restarted container often comes back on a new address: let it reclaim
        # its name after a short while instead of waiting for the reap.
        profile=attrs.evolve(
            LOCAL if config.membership_profile == "local" else LAN,
            dead_node_reclaim_time=DEAD_NODE_RECLAIM_SECONDS,
        ),
        keyring=Keyring([config.cluster_secret]) if config.cluster_secret else None,
        seeds=config.join,
    )


def build_worker_part(config: Config, reactor: Any, metrics: Any, root: MultiService) -> Any:
    """The cache, the fetcher and the transform pool, tied together in an ImageService."""
    from imgproxy.lifecycle import LifecycleService
    from imgproxy.memory import release_free_memory
    from imgproxy.worker.addresses import AddressPolicy
    from imgproxy.worker.cache import DiskCache
    from imgproxy.worker.fetch import FetchLimits, SourceFetcher
    from imgproxy.worker.images import ImageService
    from imgproxy.worker.pool import TransformPool
    from imgproxy.worker.transform import TransformLimits

    last_trim = [float("-inf")]

    def trim_when_idle() -> None:
        # Freed image buffers go back to the system once the burst is over.
        now = reactor.seconds()
        if now - last_trim[0] >= TRIM_INTERVAL_SECONDS:
            last_trim[0] = now
            pool.run_in_background(release_free_memory)

    pool = TransformPool(
        reactor, config.transform_threads, config.transform_queue, on_idle=trim_when_idle
    )
    pool.setServiceParent(root)
    cache = DiskCache(config.cache_dir, config.cache_max_bytes, config.cache_ttl, reactor)
    LifecycleService("cache", on_start=cache.start).setServiceParent(root)
    fetcher = SourceFetcher(
        reactor,
        AddressPolicy(config.allow_private_sources, config.allow_networks),
        FetchLimits(
            max_bytes=config.max_source_bytes,
            timeout=config.fetch_timeout,
            concurrency=config.fetch_concurrency,
            queue=config.fetch_queue,
        ),
        run_blocking=pool.run,
    )
    LifecycleService("fetcher", on_stop=fetcher.close).setServiceParent(root)
    images = ImageService(
        cache,
        fetcher,
        pool,
        TransformLimits(max_pixels=config.max_source_pixels, max_frames=config.max_frames),
        metrics,
    )
    add_node_gauges(metrics, cache, pool, fetcher)
    return images, cache


def cache_status(cache: Any) -> dict[str, Any]:
    stats = cache.stats
    lookups = stats.hits + stats.misses
    return {
        "entries": stats.entries,
        "bytes": stats.bytes,
        "hit_ratio": stats.hits / lookups if lookups else None,
    }


def add_node_gauges(metrics: Any, cache: Any, pool: Any, fetcher: Any) -> None:
    from imgproxy.metrics import counter, gauge

    def read() -> list[Any]:
        stats = cache.stats
        return [
            gauge("imgproxy_cache_entries", "Entries in the disk cache", stats.entries),
            gauge("imgproxy_cache_bytes", "Bytes in the disk cache", stats.bytes),
            gauge("imgproxy_cache_memory_bytes", "Bytes of small hot entries also kept in memory",
                  stats.memory_bytes),
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
            gauge("imgproxy_source_downloads", "Source downloads in progress",
                  fetcher.downloading),
            gauge("imgproxy_source_downloads_waiting", "Source downloads waiting for a turn",
                  fetcher.waiting),
        ]

    metrics.add_gauges(read)


def add_membership_gauges(metrics: Any, membership: Any) -> None:
    from prometheus_client.core import GaugeMetricFamily

    from imgproxy.membership.service import state_name
    from imgproxy.metrics import counter, gauge

    def read() -> list[Any]:
        by_state = GaugeMetricFamily(
            "imgproxy_members", "Members this node knows, by state", labels=["state"]
        )
        counts = {"alive": 0, "suspect": 0, "failed": 0, "left": 0}
        for member in membership.members():
            counts[state_name(member)] += 1
        for state, count in counts.items():
            by_state.add_metric([state], count)
        node, shell = membership.node, membership.counters
        return [
            by_state,
            counter("imgproxy_gossip_probes", "Probes sent", node.counters.probes),
            counter("imgproxy_gossip_failed_probes", "Probes without an ack",
                    node.counters.failed_probes),
            counter("imgproxy_gossip_suspicions", "Members suspected", node.counters.suspicions),
            counter("imgproxy_gossip_refutations", "Suspicions of this node refuted",
                    node.counters.refutations),
            gauge("imgproxy_gossip_health_score", "Lifeguard local health (0 is healthy)",
                  node.health_score),
            counter("imgproxy_gossip_packets_in", "UDP packets received", shell.packets_in),
            counter("imgproxy_gossip_packets_out", "UDP packets sent", shell.packets_out),
            counter("imgproxy_gossip_bytes_in", "UDP bytes received", shell.bytes_in),
            counter("imgproxy_gossip_bytes_out", "UDP bytes sent", shell.bytes_out),
            counter("imgproxy_gossip_dropped", "Bad packets or streams dropped", shell.dropped),
        ]

    metrics.add_gauges(read)
