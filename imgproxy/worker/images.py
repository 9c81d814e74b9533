"""The worker's job: a variant from the cache, or fetched, transformed and cached.

``ImageService`` ties the pieces together: the disk cache, the source
fetcher, the transform pool and two coalescers (one per variant, one per
source), so N identical concurrent requests cost one fetch and one transform,
and N variants of one source cost one origin fetch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.logger import Logger

from imgproxy.errors import ProxyError
from imgproxy.params import TransformSpec, source_key_of
from imgproxy.worker.cache import CacheEntry, DiskCache, source_cache_key
from imgproxy.worker.coalesce import Coalescer
from imgproxy.worker.fetch import FetchedSource
from imgproxy.worker.pool import TransformPool
from imgproxy.worker.transform import (
    SourceInfo,
    TransformedImage,
    TransformLimits,
    probe_source,
    transform_image,
)


class SourceFetcher(Protocol):
    def fetch(self, url: str) -> Deferred[FetchedSource]: ...


class PeerCache(Protocol):
    """Where a new owner looks before the origin: the key's previous owner."""

    def find(self, spec: TransformSpec | None, url: str) -> Deferred[CacheEntry | None]: ...


class ImageMetrics(Protocol):
    def observe_fetch(self, seconds: float) -> None: ...
    def observe_transform(self, seconds: float) -> None: ...
    def count_handoff(self, result: str) -> None: ...


class ImageService:
    """Serves variants from the cache and produces the missing ones."""

    _log = Logger()

    def __init__(
        self,
        cache: DiskCache,
        fetcher: SourceFetcher,
        pool: TransformPool,
        limits: TransformLimits,
        metrics: ImageMetrics,
        peers: PeerCache | None = None,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.cache = cache
        self._fetcher = fetcher
        self._pool = pool
        self._limits = limits
        self._metrics = metrics
        self.peers = peers
        self._timer = timer
        self._variants: Coalescer[CacheEntry] = Coalescer()
        self._sources: Coalescer[CacheEntry] = Coalescer()

    def cached(self, spec: TransformSpec) -> CacheEntry | None:
        """The hit path: a fresh cached variant, or None."""
        return self.cache.get(spec.cache_key)

    def render(self, spec: TransformSpec) -> Deferred[CacheEntry]:
        """The miss path: produce, cache and return the variant (coalesced)."""
        return self._variants.run(spec.cache_key, lambda: self._produce(spec))

    def serve(self, spec: TransformSpec) -> Deferred[tuple[CacheEntry, bool]]:
        """The ``ImageBackend`` view of ``render``: a produced variant is a miss."""
        return self.render(spec).addCallback(lambda entry: (entry, False))

    def purge_source(self, url: str) -> int:
        """Remove the source and every cached variant of ``url``; returns how many."""
        return self.cache.purge_source(source_key_of(url))

    def purge(self, url: str) -> Deferred[None]:
        """The ``ImageBackend`` view of ``purge_source``."""
        self.purge_source(url)
        return succeed(None)

    @inlineCallbacks
    def _produce(self, spec: TransformSpec):  # type: ignore[no-untyped-def]
        entry = self.cache.get(spec.cache_key)
        if entry is not None:
            return entry
        if self.peers is not None:
            handed = yield self._from_peer(spec, spec.url)
            if handed is not None:
                return self.cache.put(spec.cache_key, handed.body, handed.content_type, spec.url)
        source = yield self.source(spec.url)
        started = self._timer()
        try:
            transformed: TransformedImage = yield self._pool.run(
                transform_image, source.body, spec, self._limits
            )
        finally:
            self._metrics.observe_transform(self._timer() - started)
        return self.cache.put(
            spec.cache_key, transformed.body, transformed.content_type, spec.url
        )

    def source(self, url: str) -> Deferred[CacheEntry]:
        """The source's original bytes: cached, from a peer, or fetched (coalesced)."""
        key = source_cache_key(source_key_of(url))
        entry = self.cache.get(key)
        if entry is not None:
            return succeed(entry)
        return self._sources.run(key, lambda: self._load_source(url, key))

    @inlineCallbacks
    def _load_source(self, url: str, key: str):  # type: ignore[no-untyped-def]
        if self.peers is not None:
            handed = yield self._from_peer(None, url)
            if handed is not None:
                return self.cache.put(key, handed.body, handed.content_type, url)
        started = self._timer()
        try:
            fetched: FetchedSource = yield self._fetcher.fetch(url)
        finally:
            self._metrics.observe_fetch(self._timer() - started)
        # Probe before caching: a bomb or a non-image is refused, never stored.
        info: SourceInfo = yield self._pool.run(probe_source, fetched.body, self._limits)
        return self.cache.put(key, fetched.body, info.content_type, url)

    @inlineCallbacks
    def _from_peer(self, spec: TransformSpec | None, url: str):  # type: ignore[no-untyped-def]
        assert self.peers is not None
        try:
            entry = yield self.peers.find(spec, url)
        except ProxyError:
            entry = None
        except Exception:
            self._log.failure("asking the previous owner of {url} failed", url=url)
            entry = None
        self._metrics.count_handoff("hit" if entry is not None else "miss")
        return entry
