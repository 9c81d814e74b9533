"""The gateway's image backend: route each source to its owner, fail over, bound the load."""

from __future__ import annotations

import math
from collections.abc import Callable

from prometheus_client import Counter, Gauge
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from imgproxy.cluster import ClusterView
from imgproxy.errors import ProxyError
from imgproxy.gateway.client import WorkerBusy, WorkerClient, WorkerUnavailable
from imgproxy.metrics import NodeMetrics
from imgproxy.params import TransformSpec, source_key_of
from imgproxy.placement import BoundedLoad, Placement, WorkerRef
from imgproxy.worker.cache import CacheEntry
from imgproxy.worker.coalesce import Coalescer

DOWN_RECHECK_SECONDS = 2.0
#: A failed worker may hold a source's copies when it is this far up the source's
#: order among all workers, failed ones included: its owner, and where bounded-load
#: overflow and failover put copies.
PURGE_HOLDER_RANKS = 3
#: Purges one gateway keeps, per worker, to replay when the worker is back.
MAX_PENDING_PURGES = 10_000
#: The latest purges a gateway remembers, to replay to any worker that joins: one
#: that was away longer than membership lists the failed may hold any of them.
RECENT_PURGES = 1_000
#: Replayed purges in flight to one worker at a time.
REPLAY_CONCURRENCY = 8


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
        announce_purge: Callable[[str], object] | None = None,
    ) -> None:
        """``announce_purge(url)``: gossips the purge to every member (a serf user
        event), which keeps it among its recent events for workers that are away."""
        self.view = view
        self._announce_purge = announce_purge
        self._client = client
        self._bounded = bounded
        self._clock = clock
        self._variants: Coalescer[tuple[CacheEntry, bool]] = Coalescer()
        self.down: dict[str, float] = {}
        # Source URLs a worker missed the purge of, by worker: it gets no request
        # from this gateway until it has applied them.
        self.pending_purges: dict[str, dict[str, None]] = {}
        self._replay_calls: dict[str, IDelayedCall] = {}
        self._replaying: set[str] = set()
        self._recent_purges: dict[str, None] = {}
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
        Gauge(
            "imgproxy_gateway_pending_purges",
            "Purges a worker missed and this gateway still has to replay to it",
            registry=registry,
        ).set_function(lambda: sum(len(urls) for urls in self.pending_purges.values()))
        Gauge(
            "imgproxy_gateway_workers_held_out",
            "Workers this gateway sends nothing until they applied the purges they missed",
            registry=registry,
        ).set_function(lambda: len(self.pending_purges))
        view.on_change(self._membership_changed)

    def _membership_changed(self, view: ClusterView) -> None:
        # Membership says who is alive: a worker it lists gets another chance.
        alive = {w.name for w in view.current.workers}
        joined = alive - {w.name for w in view.previous.workers}
        if self._recent_purges:
            for name in joined:
                # Back after who knows how long, with its disk cache: the recent
                # purges first (a new worker's are no-ops), then requests.
                pending = self.pending_purges.setdefault(name, {})
                pending.update(self._recent_purges)
        for name in alive:
            # A series from 0 as soon as the worker is known: a rate over the
            # first requests then sees them rise (a series born at its first
            # request would start at its count, and its rate would miss them).
            self._per_worker.labels(name)
        for name in list(self.down):
            if name in alive and self._clock.seconds() - self.down[name] > DOWN_RECHECK_SECONDS:
                del self.down[name]
        for name in self.pending_purges:
            if name in alive:
                self._schedule_replay(name, 0)

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
        excluded = set(self.down) | self.view.suspected
        if self.pending_purges:
            excluded.update(self.pending_purges)
        return excluded

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
                # rather than refuse, a suspect is usually alive.  Never one that
                # may still serve what was purged.
                worker = self._bounded.choose(
                    preference, tried | set(self.down) | set(self.pending_purges)
                )
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
        # A worker held out may still hold what was purged: the one asked to
        # produce must not copy it from there by handoff.
        produced = yield self._client.produce(worker, spec, tuple(self.pending_purges))
        return produced

    @inlineCallbacks
    def purge(self, url: str):  # type: ignore[no-untyped-def]
        """Purge from every worker that may hold the source: all alive ones, and a
        failed one that may come back with it (a departed one that lingers, if it
        answers).

        A worker that cannot be reached keeps the purge pending here: this gateway
        sends it nothing until it has applied it.  The answer is 503 then, since
        other gateways do not know: the client should retry.  Any worker that joins
        later first gets this gateway's last ``RECENT_PURGES`` purges.
        """
        source_key = source_key_of(url)
        # Requests from now on are not joined to ones under way, which may bring
        # back what is being purged.
        self._variants.detach(source_key + "/")
        if self._announce_purge is not None:
            try:
                self._announce_purge(url)
            except Exception:
                # The direct purges below still run; only the gossiped copy is lost.
                self._log.failure("announcing the purge of {url} failed", url=url)
        self._recent_purges.pop(url, None)
        self._recent_purges[url] = None
        if len(self._recent_purges) > RECENT_PURGES:
            del self._recent_purges[next(iter(self._recent_purges))]
        targets: dict[str, WorkerRef] = {w.name: w for w in self.view.current.workers}
        for worker in self._failed_holders(source_key):
            targets.setdefault(worker.name, worker)
        if not targets:
            raise ProxyError(503, "no worker is alive to purge this image", retry_after=1)
        # A worker that left lingers a moment for handoffs: purged if it is still
        # there, and not waited for (should it come back, it is replayed to).
        lingering = [
            w for w in self.view.handoff_candidates(source_key) if w.name not in targets
        ]
        for worker in lingering:
            self._client.purge(worker, url).addErrback(lambda _: None)
        results = yield DeferredList(
            [self._client.purge(w, url) for w in targets.values()], consumeErrors=True
        )
        unreached = []
        refused = False
        for worker, (ok, failure) in zip(targets.values(), results, strict=True):
            if ok:
                continue
            if failure.check(WorkerUnavailable):
                self._log.warn("purge not applied on {worker}: {why}", worker=worker.name,
                               why=failure.value.why)
                unreached.append(worker)
                self._remember_purge(worker.name, url)
            else:
                # An answer, not an outage: replaying it would only get the same one.
                self._log.failure("purge refused by {worker}", failure, worker=worker.name)
                refused = True
        if refused:
            raise ProxyError(502, "a worker refused to purge this image")
        if unreached:
            raise ProxyError(
                503,
                f"purged from {len(targets) - len(unreached)} of {len(targets)} workers; "
                f"{len(unreached)} could not be reached and may still hold the image: retry",
                retry_after=math.ceil(DOWN_RECHECK_SECONDS),
            )
        return None

    async def _replay_in_batches(self, worker: WorkerRef, pending: dict[str, None]) -> None:
        """A few purges at a time (thousands at once would swamp this gateway), and
        none more once the worker proves unreachable: the next round retries."""
        urls = list(pending)
        for start in range(0, len(urls), REPLAY_CONCURRENCY):
            batch = urls[start : start + REPLAY_CONCURRENCY]
            results = await DeferredList(
                [self._client.purge(worker, url) for url in batch], consumeErrors=True
            )
            unreachable = False
            for url, (ok, failure) in zip(batch, results, strict=True):
                if ok:
                    pending.pop(url, None)
                elif failure.check(WorkerUnavailable):
                    unreachable = True
                else:
                    # Refused, not unreachable: trying again would not change the
                    # answer, and holding the worker out for ever would be worse.
                    self._log.failure(
                        "replayed purge refused by {worker}", failure, worker=worker.name
                    )
                    pending.pop(url, None)
            if unreachable:
                return

    def _failed_holders(self, source_key: str) -> list[WorkerRef]:
        if not self.view.failed:
            return []
        everyone = [*self.view.current.workers, *self.view.failed.values()]
        ranked = Placement(everyone).preference(source_key)[:PURGE_HOLDER_RANKS]
        return [w for w in ranked if w.name in self.view.failed]

    def _remember_purge(self, name: str, url: str) -> None:
        pending = self.pending_purges.setdefault(name, {})
        if url not in pending and len(pending) >= MAX_PENDING_PURGES:
            self._log.error(
                "more than {limit} purges pending on {worker}: this one is not kept",
                limit=MAX_PENDING_PURGES, worker=name,
            )
            return
        pending[url] = None
        if self.view.current.member(name) is not None:
            self._schedule_replay(name, DOWN_RECHECK_SECONDS)

    def _schedule_replay(self, name: str, delay: float) -> None:
        if name in self._replaying:
            return  # it schedules the next round itself while purges remain
        call = self._replay_calls.get(name)
        if call is None:
            self._replay_calls[name] = self._clock.callLater(delay, self._start_replay, name)
        elif call.getTime() - self._clock.seconds() > delay:
            call.reset(delay)  # back sooner than planned (membership says alive)

    def _start_replay(self, name: str) -> None:
        del self._replay_calls[name]
        Deferred.fromCoroutine(self._replay(name))

    async def _replay(self, name: str) -> None:
        worker = self.view.current.member(name)
        pending = self.pending_purges.get(name)
        if worker is None or not pending:
            return  # failed again (membership's return brings it back), or nothing left
        self._replaying.add(name)
        try:
            await self._replay_in_batches(worker, pending)
        finally:
            self._replaying.discard(name)
        if pending:
            self._schedule_replay(name, DOWN_RECHECK_SECONDS)
        else:
            del self.pending_purges[name]
            self._log.info("{worker} applied the purges it had missed", worker=name)
