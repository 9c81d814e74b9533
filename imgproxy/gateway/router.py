"""The gateway's image backend: route each source to its owner, fail over, bound the load."""

from __future__ import annotations

from prometheus_client import Counter
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from imgproxy.cluster import ClusterView
from imgproxy.errors import ProxyError
from imgproxy.gateway.client import WorkerBusy, WorkerClient, WorkerUnavailable
from imgproxy.metrics import NodeMetrics
from imgproxy.params import TransformSpec, source_key_of
from imgproxy.placement import BoundedLoad, WorkerRef
from imgproxy.worker.cache import CacheEntry
from imgproxy.worker.coalesce import Coalescer

DOWN_RECHECK_SECONDS = 2.0


class ClusterBackend:
    """Serves ``/image`` from the workers: owner first, the next in line on failure.

    A worker that refuses, resets or times out is marked down and skipped
    until membership reports it alive again or a ``/health`` probe answers;
    the request goes on at once to the next worker in the key's preference.
    """

    _log = Logger()

    def __init__(
        self,
        view: ClusterView,
        client: WorkerClient,
        bounded: BoundedLoad,
        clock: IReactorTime,
        metrics: NodeMetrics,
    ) -> None:
        self.view = view
        self._client = client
        self._bounded = bounded
        self._clock = clock
        self._variants: Coalescer[tuple[CacheEntry, bool]] = Coalescer()
        self.down: dict[str, float] = {}
        registry = metrics.registry
        self._per_worker = Counter(
            "imgproxy_gateway_worker_requests",
            "Requests a gateway sent, by worker",
            ["worker"],
            registry=registry,
        )
        self._failovers = Counter(
            "imgproxy_gateway_failovers",
            "Requests retried on another worker after a failure",
            registry=registry,
        )
        self._overflows = Counter(
            "imgproxy_gateway_overflows",
            "Requests sent past their owner because it was over the bounded-load cap",
            registry=registry,
        )
        view.on_change(self._membership_changed)

    def _membership_changed(self, view: ClusterView) -> None:
        # Membership says who is alive: a worker it lists gets another chance.
        alive = {w.name for w in view.current.workers}
        for name in list(self.down):
            if name in alive and self._clock.seconds() - self.down[name] > DOWN_RECHECK_SECONDS:
                del self.down[name]

    def cached(self, spec: TransformSpec) -> CacheEntry | None:
        return None

    def serve(self, spec: TransformSpec) -> Deferred[tuple[CacheEntry, bool]]:
        return self._variants.run(spec.cache_key, lambda: self._route(spec))

    def _excluded(self) -> set[str]:
        now = self._clock.seconds()
        for name, since in list(self.down.items()):
            if now - since > DOWN_RECHECK_SECONDS:
                # Let one request through as the probe: success clears it for good.
                del self.down[name]
        # Workers membership suspects are routed around until cleared or declared dead.
        return set(self.down) | self.view.suspected

    @inlineCallbacks
    def _route(self, spec: TransformSpec):  # type: ignore[no-untyped-def]
        preference = self.view.preference(spec.source_key)
        if not preference:
            raise ProxyError(503, "no worker is alive to serve this image", retry_after=1)
        tried: set[str] = set()
        while True:
            overflows_before = self._bounded.overflow_count
            worker = self._bounded.choose(preference, tried | self._excluded())
            if worker is None:
                # Only suspects (or workers that just failed) are left: try them
                # rather than refuse, a suspect is usually alive.
                worker = self._bounded.choose(preference, tried | set(self.down))
            if worker is None:
                # Which workers failed and why is in the log, not in the public answer.
                raise ProxyError(503, "no worker could serve this image", retry_after=1)
            if self._bounded.overflow_count != overflows_before:
                self._overflows.inc()
            if tried:
                self._failovers.inc()
            tried.add(worker.name)
            self._per_worker.labels(worker.name).inc()
            self._bounded.acquire(worker)
            try:
                result = yield self._ask(worker, spec)
            except WorkerBusy:
                continue
            except WorkerUnavailable as unavailable:
                self._log.warn(
                    "worker {worker} failed: {why}; failing over",
                    worker=worker.name,
                    why=unavailable.why,
                )
                self.down[worker.name] = self._clock.seconds()
                continue
            finally:
                self._bounded.release(worker)
            self.down.pop(worker.name, None)
            return result

    @inlineCallbacks
    def _ask(self, worker: WorkerRef, spec: TransformSpec):  # type: ignore[no-untyped-def]
        entry = yield self._client.lookup(worker, spec)
        if entry is not None:
            return entry, True
        produced = yield self._client.produce(worker, spec)
        return produced

    @inlineCallbacks
    def purge(self, url: str):  # type: ignore[no-untyped-def]
        """Purge from every worker that may hold the source: owner, previous owner, all alive."""
        source_key = source_key_of(url)
        targets: dict[str, WorkerRef] = {w.name: w for w in self.view.current.workers}
        for worker in self.view.handoff_candidates(source_key):
            targets.setdefault(worker.name, worker)
        results = yield DeferredList(
            [self._client.purge(w, url) for w in targets.values()], consumeErrors=True
        )
        failed = [f for ok, f in results if not ok]
        for failure in failed:
            if not failure.check(WorkerUnavailable):
                self._log.failure("purge failed", failure)
        if failed and len(failed) == len(results) and results:
            raise ProxyError(503, "no worker could be reached to purge this image", retry_after=1)
        return None
