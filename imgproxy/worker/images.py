"""The worker's job: a variant from the cache, or fetched, transformed and cached.

``ImageService`` ties the pieces together: the disk cache, the source
fetcher, the transform pool and two coalescers (one per variant, one per
source), so N identical concurrent requests cost one fetch and one transform,
and N variants of one source cost one origin fetch.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Protocol

from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.logger import Logger

from imgproxy.errors import ProxyError
from imgproxy.params import TransformSpec, source_key_of
from imgproxy.worker.cache import CacheEntry, DiskCache, PurgeIncomplete, source_cache_key
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

#: Purges an ImageService remembers, to keep work begun before one out of the cache.
REMEMBERED_PURGES = 10_000


class SourceFetcher(Protocol):
    def fetch(self, url: str) -> Deferred[FetchedSource]: ...


class PeerCache(Protocol):
    """Where a new owner looks before the origin: the key's previous owner."""

    def find(self, spec: TransformSpec | None, url: str) -> Deferred[CacheEntry | None]: ...

    def avoid(self, names: Iterable[str]) -> None:
        """Read nothing from these peers for a while: a gateway holds them out."""


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
        # Purges by number, latest per source: what was downloading or rendering
        # when its source was purged is served to those who asked, never stored.
        self._purges = 0
        self._last_purge: OrderedDict[str, int] = OrderedDict()

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
        """Remove the source and every cached variant of ``url``; returns how many.

        Raises ``ProxyError(503)`` when files of it stay on disk: this node does
        not serve them, but would after a restart, so the purge is to be retried.
        """
        return self.purge_source_key(source_key_of(url))

    def purge_source_key(self, source_key: str) -> int:
        """``purge_source`` by the source's key (what a gossiped purge names)."""
        # A request from now on starts its own download and render: joining one
        # that began before the purge would hand it what was purged.
        self._sources.detach(source_key + "/")
        self._variants.detach(source_key + "/")
        self._purges += 1
        self._last_purge.pop(source_key, None)
        self._last_purge[source_key] = self._purges
        if len(self._last_purge) > REMEMBERED_PURGES:
            self._last_purge.popitem(last=False)
        try:
            return self.cache.purge_source(source_key)
        except PurgeIncomplete as incomplete:
            raise ProxyError(
                503, f"the purge is incomplete: {incomplete}; retry", retry_after=5
            ) from None

    def _purged_since(self, source_key: str, since: int) -> bool:
        last = self._last_purge.get(source_key)
        if last is not None:
            return last > since
        # Not remembered: unknown only if purges made since have been forgotten.
        oldest = next(iter(self._last_purge.values()), since + 1)
        return oldest > since + 1

    def _keep(
        self,
        since: int,
        source_key: str,
        key: str,
        body: bytes,
        content_type: str,
        url: str,
        created: float | None = None,
    ) -> CacheEntry:
        """``cache.put``, unless the source was purged since the work began."""
        store = not self._purged_since(source_key, since)
        return self.cache.put(key, body, content_type, url, created, store=store)

    def purge(self, url: str) -> Deferred[None]:
        """The ``ImageBackend`` view of ``purge_source``."""
        try:
            self.purge_source(url)
        except ProxyError as error:
            return fail(error)
        return succeed(None)

    @inlineCallbacks
    def _produce(self, spec: TransformSpec):  # type: ignore[no-untyped-def]
        entry = self.cache.get(spec.cache_key)
        if entry is not None:
            return entry
        since = self._purges
        if self.peers is not None:
            handed = yield self._from_peer(spec, spec.url)
            if handed is not None:
                return self._keep(
                    since, spec.source_key, spec.cache_key, handed.body, handed.content_type,
                    spec.url,
                )
        source = yield self.source(spec.url)
        started = self._timer()
        try:
            transformed: TransformedImage = yield self._pool.run(
                transform_image, source.body, spec, self._limits
            )
        finally:
            self._metrics.observe_transform(self._timer() - started)
        # As old as its source: a variant rendered late from a cached source does not
        # outlive it (the origin's changes show for every variant after one TTL).
        return self._keep(
            since, spec.source_key, spec.cache_key, transformed.body,
            transformed.content_type, spec.url, source.created,
        )

    def source(self, url: str) -> Deferred[CacheEntry]:
        """The source's original bytes: cached, from a peer, or fetched (coalesced)."""
        source_key = source_key_of(url)
        key = source_cache_key(source_key)
        entry = self.cache.get(key)
        if entry is not None:
            return succeed(entry)
        return self._sources.run(key, lambda: self._load_source(url, source_key, key))

    @inlineCallbacks
    def _load_source(self, url: str, source_key: str, key: str):  # type: ignore[no-untyped-def]
        since = self._purges
        if self.peers is not None:
            handed = yield self._from_peer(None, url)
            if handed is not None:
                return self._keep(since, source_key, key, handed.body, handed.content_type, url)
        started = self._timer()
        try:
            fetched: FetchedSource = yield self._fetcher.fetch(url)
        finally:
            self._metrics.observe_fetch(self._timer() - started)
        # Probe before caching: a bomb or a non-image is refused, never stored.
        info: SourceInfo = yield self._pool.run(probe_source, fetched.body, self._limits)
        return self._keep(since, source_key, key, fetched.body, info.content_type, url)

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
