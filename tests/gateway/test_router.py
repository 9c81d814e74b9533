"""The gateway's routing: owner first, failover at once, suspects avoided, errors kept."""

from __future__ import annotations

from prometheus_client import generate_latest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from imgproxy.cluster import ClusterView
from imgproxy.errors import ProxyError
from imgproxy.gateway.client import WorkerBusy, WorkerUnavailable
from imgproxy.gateway.router import DOWN_RECHECK_SECONDS, REPLAY_CONCURRENCY, ClusterBackend
from imgproxy.metrics import NodeMetrics
from imgproxy.params import TransformSpec
from imgproxy.placement import BoundedLoad, WorkerRef
from imgproxy.worker.cache import CacheEntry

WORKERS = [WorkerRef(f"w{i}", f"127.0.0.{10 + i}", 8080) for i in range(3)]
SPEC = TransformSpec("http://origin.test/a.jpg", width=10)


def entry(worker: str) -> CacheEntry:
    return CacheEntry(SPEC.cache_key, worker.encode(), "image/jpeg", 0.0, '"e"', SPEC.url)


class FakeWorkers:
    """Each worker's behaviour, set by the test: 'hit', 'miss', an exception, or a Deferred."""

    def __init__(self) -> None:
        self.behaviour: dict[str, object] = {}
        self.asked: list[tuple[str, str]] = []
        self.purged: list[str] = []
        self.held_out: list[tuple[str, ...]] = []

    def _outcome(self, worker: WorkerRef, call: str):
        self.asked.append((call, worker.name))
        behaviour = self.behaviour.get(worker.name, "miss")
        if isinstance(behaviour, Exception):
            return fail(behaviour)
        if isinstance(behaviour, Deferred):
            return behaviour
        return succeed(behaviour)

    def lookup(self, worker: WorkerRef, spec: TransformSpec, stale_ok: bool = False):
        return self._outcome(worker, "lookup").addCallback(
            lambda b: entry(worker.name) if b == "hit" else None
        )

    def produce(self, worker: WorkerRef, spec: TransformSpec, held_out=()):
        self.held_out.append(tuple(held_out))
        return self._outcome(worker, "produce").addCallback(lambda b: (entry(worker.name), False))

    def purge(self, worker: WorkerRef, url: str):
        self.purged.append(worker.name)
        return self._outcome(worker, "purge").addCallback(lambda _: None)


class ClusterBackendTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.view = ClusterView()
        self.view.update(WORKERS)
        self.workers = FakeWorkers()
        self.metrics = NodeMetrics()
        self.backend = ClusterBackend(
            self.view, self.workers, BoundedLoad(0.25), self.clock, self.metrics
        )
        self.order = [w.name for w in self.view.preference(SPEC.source_key)]

    def served_by(self) -> str:
        body, _ = self.successResultOf(self.backend.serve(SPEC))
        return body.body.decode()

    def test_owner_serves_a_hit_without_produce(self) -> None:
        self.workers.behaviour[self.order[0]] = "hit"
        result = self.successResultOf(self.backend.serve(SPEC))
        self.assertEqual(result[0].body.decode(), self.order[0])
        self.assertTrue(result[1])
        self.assertEqual(self.workers.asked, [("lookup", self.order[0])])

    def test_miss_at_the_owner_is_produced_there(self) -> None:
        self.assertEqual(self.served_by(), self.order[0])
        self.assertEqual(self.workers.asked,
                         [("lookup", self.order[0]), ("produce", self.order[0])])

    def test_unreachable_owner_fails_over_at_once_and_is_skipped_after(self) -> None:
        self.workers.behaviour[self.order[0]] = WorkerUnavailable(WORKERS[0], "refused")
        self.assertEqual(self.served_by(), self.order[1])
        self.workers.asked.clear()
        self.assertEqual(self.served_by(), self.order[1])
        self.assertNotIn(self.order[0], [name for _, name in self.workers.asked])

    def test_a_down_worker_is_tried_again_after_the_recheck_time(self) -> None:
        self.workers.behaviour[self.order[0]] = WorkerUnavailable(WORKERS[0], "refused")
        self.served_by()
        self.workers.behaviour[self.order[0]] = "hit"
        self.clock.advance(DOWN_RECHECK_SECONDS + 0.1)
        self.assertEqual(self.served_by(), self.order[0])
        self.assertNotIn(self.order[0], self.backend.down)

    def test_busy_owner_passes_the_request_on_without_being_marked_down(self) -> None:
        self.workers.behaviour[self.order[0]] = WorkerBusy(WORKERS[0], "busy")
        self.assertEqual(self.served_by(), self.order[1])
        self.assertNotIn(self.order[0], self.backend.down)

    def test_worker_errors_keep_their_status_without_failover(self) -> None:
        for status in (404, 413, 415, 502, 504):
            self.workers.behaviour[self.order[0]] = ProxyError(status, "origin trouble")
            failure = self.failureResultOf(self.backend.serve(SPEC), ProxyError)
            self.assertEqual(failure.value.status, status)
        self.assertEqual({name for _, name in self.workers.asked}, {self.order[0]})

    def test_every_worker_down_is_503(self) -> None:
        for worker in WORKERS:
            self.workers.behaviour[worker.name] = WorkerUnavailable(worker, "refused")
        failure = self.failureResultOf(self.backend.serve(SPEC), ProxyError)
        self.assertEqual(failure.value.status, 503)

    def test_every_known_worker_has_a_request_count_from_zero(self) -> None:
        newcomer = WorkerRef("w9", "127.0.0.99", 8080)
        self.view.update([*WORKERS, newcomer])
        text = generate_latest(self.metrics.registry).decode()
        self.assertIn('imgproxy_gateway_worker_requests_total{worker="w9"} 0.0', text)

    def test_the_public_503_names_no_worker_address_or_exception(self) -> None:
        for worker in WORKERS:
            refused = WorkerUnavailable(worker, "ConnectionRefusedError")
            self.workers.behaviour[worker.name] = refused
        reason = self.failureResultOf(self.backend.serve(SPEC), ProxyError).value.reason
        for secret in ("127.0.0", "ConnectionRefused", *(w.name for w in WORKERS)):
            self.assertNotIn(secret, reason)

    def test_no_worker_at_all_is_503(self) -> None:
        self.view.update([])
        failure = self.failureResultOf(self.backend.serve(SPEC), ProxyError)
        self.assertEqual((failure.value.status, failure.value.retry_after), (503, 1))

    def test_suspected_owner_is_routed_around(self) -> None:
        self.view.suspected = {self.order[0]}
        self.assertEqual(self.served_by(), self.order[1])

    def test_only_suspects_left_are_still_tried(self) -> None:
        self.view.suspected = {w.name for w in WORKERS}
        self.assertEqual(self.served_by(), self.order[0])

    def test_identical_concurrent_requests_collapse_at_the_gateway(self) -> None:
        pending: Deferred = Deferred()
        self.workers.behaviour[self.order[0]] = pending
        first, second = self.backend.serve(SPEC), self.backend.serve(SPEC)
        pending.callback("hit")
        self.assertEqual(self.successResultOf(first), self.successResultOf(second))
        self.assertEqual(self.workers.asked, [("lookup", self.order[0])])

    def test_purge_reaches_every_worker(self) -> None:
        self.successResultOf(self.backend.purge(SPEC.url))
        self.assertEqual(sorted(self.workers.purged), [w.name for w in WORKERS])

    def test_a_request_after_a_purge_is_not_joined_to_one_from_before(self) -> None:
        pending: Deferred = Deferred()
        self.workers.behaviour[self.order[0]] = pending
        before = self.backend.serve(SPEC)
        self.workers.behaviour[self.order[0]] = "hit"
        self.successResultOf(self.backend.purge(SPEC.url))
        after = self.backend.serve(SPEC)
        self.successResultOf(after)  # answered by a request of its own
        self.assertEqual([call for call, _ in self.workers.asked].count("lookup"), 2)
        self.assertNoResult(before)  # still waiting for what it asked before the purge
        pending.callback("hit")
        self.successResultOf(before)

    def test_every_purge_is_announced_to_the_cluster_reached_or_not(self) -> None:
        announced: list[str] = []
        backend = ClusterBackend(self.view, self.workers, BoundedLoad(0.25), self.clock,
                                 NodeMetrics(), announce_purge=announced.append)
        self.successResultOf(backend.purge(SPEC.url))
        self.workers.behaviour[self.order[0]] = WorkerUnavailable(WORKERS[0], "timeout")
        self.failureResultOf(backend.purge("http://origin.test/b.jpg"), ProxyError)
        self.assertEqual(announced, [SPEC.url, "http://origin.test/b.jpg"])

    def test_a_failed_announcement_does_not_stop_the_purge(self) -> None:
        def broken(url: str) -> None:
            raise ValueError("gossip is down")

        backend = ClusterBackend(self.view, self.workers, BoundedLoad(0.25), self.clock,
                                 NodeMetrics(), announce_purge=broken)
        self.successResultOf(backend.purge(SPEC.url))
        self.assertEqual(sorted(self.workers.purged), [w.name for w in WORKERS])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_a_worker_that_missed_a_purge_serves_nothing_until_it_applied_it(self) -> None:
        owner = self.order[0]
        self.workers.behaviour[owner] = WorkerUnavailable(WORKERS[0], "timeout")
        failure = self.failureResultOf(self.backend.purge(SPEC.url), ProxyError)
        self.assertEqual((failure.value.status, failure.value.retry_after), (503, 2))
        self.assertIn("2 of 3 workers", failure.value.reason)
        text = generate_latest(self.metrics.registry).decode()
        self.assertIn("imgproxy_gateway_pending_purges 1.0", text)
        self.assertIn("imgproxy_gateway_workers_held_out 1.0", text)
        self.workers.behaviour[owner] = "hit"
        self.assertEqual(self.served_by(), self.order[1])
        # Replayed after the recheck time; then the owner serves again.
        self.workers.purged.clear()
        self.clock.advance(DOWN_RECHECK_SECONDS)
        self.assertEqual(self.workers.purged, [owner])
        self.assertEqual(self.backend.pending_purges, {})
        self.assertEqual(self.served_by(), owner)

    def test_a_replay_that_fails_is_tried_again(self) -> None:
        owner = self.order[0]
        self.workers.behaviour[owner] = WorkerUnavailable(WORKERS[0], "timeout")
        self.failureResultOf(self.backend.purge(SPEC.url), ProxyError)
        self.clock.advance(DOWN_RECHECK_SECONDS)
        self.assertIn(owner, self.backend.pending_purges)
        self.workers.behaviour[owner] = "miss"
        self.clock.advance(DOWN_RECHECK_SECONDS)
        self.assertEqual(self.backend.pending_purges, {})

    def test_a_failed_worker_that_may_hold_the_source_is_purged_when_it_is_back(self) -> None:
        # The owner crashed: membership lists it failed, its cache is on its disk.
        owner = self.view.current.member(self.order[0])
        alive = [w for w in WORKERS if w.name != owner.name]
        self.view.update(alive)
        self.view.failed = {owner.name: owner}
        self.workers.behaviour[owner.name] = WorkerUnavailable(owner, "refused")
        failure = self.failureResultOf(self.backend.purge(SPEC.url), ProxyError)
        self.assertEqual(failure.value.status, 503)
        self.assertEqual(sorted(self.workers.purged), sorted(w.name for w in WORKERS))
        # Back with its cache: the purge goes first, then requests.
        self.workers.purged.clear()
        self.workers.behaviour[owner.name] = "hit"
        self.view.failed = {}
        self.view.update(WORKERS)
        self.assertEqual(self.workers.purged, [])  # not before the reactor turns
        self.assertEqual(self.served_by(), self.order[1])
        self.clock.advance(0)
        self.assertEqual(self.workers.purged, [owner.name])
        self.assertEqual(self.served_by(), owner.name)

    def test_a_failed_worker_far_down_the_sources_order_does_not_hold_up_a_purge(self) -> None:
        many = [WorkerRef(f"m{i}", f"127.0.1.{i}", 8080) for i in range(12)]
        self.view.update(many)
        ranked = self.view.preference(SPEC.source_key)
        last = ranked[-1]
        self.view.update([w for w in many if w != last])
        self.view.failed = {last.name: last}
        self.workers.behaviour[last.name] = WorkerUnavailable(last, "refused")
        self.successResultOf(self.backend.purge(SPEC.url))
        self.assertNotIn(last.name, self.workers.purged)

    def test_a_replay_goes_a_few_at_a_time_and_stops_at_the_first_outage(self) -> None:
        owner = self.view.current.member(self.order[0])
        self.workers.behaviour[owner.name] = WorkerUnavailable(owner, "timeout")
        for n in range(5 * REPLAY_CONCURRENCY):
            self.failureResultOf(self.backend.purge(f"http://origin.test/{n}.jpg"), ProxyError)
        self.workers.purged.clear()
        self.clock.advance(DOWN_RECHECK_SECONDS)
        # Still unreachable: one batch tried, not every pending purge at once.
        self.assertEqual(self.workers.purged, [owner.name] * REPLAY_CONCURRENCY)
        self.workers.behaviour[owner.name] = "miss"
        self.clock.advance(DOWN_RECHECK_SECONDS)
        self.assertEqual(self.backend.pending_purges, {})

    def test_a_worker_that_joins_gets_the_recent_purges_before_any_request(self) -> None:
        # Away longer than membership remembers the failed: it may hold anything.
        self.successResultOf(self.backend.purge(SPEC.url))
        owner = self.order[0]
        self.view.update([w for w in WORKERS if w.name != owner])
        self.workers.purged.clear()
        self.workers.behaviour[owner] = "hit"
        self.view.update(WORKERS)
        self.assertEqual(self.served_by(), self.order[1])
        self.clock.advance(0)
        self.assertEqual(self.workers.purged, [owner])
        self.assertEqual(self.served_by(), owner)

    def test_the_worker_serving_meanwhile_is_told_not_to_copy_from_the_one_held_out(self) -> None:
        # The owner is back with its disk cache, the purge not yet replayed: the
        # next worker must not pull the purged image from it by handoff.
        self.successResultOf(self.backend.purge(SPEC.url))
        owner = self.order[0]
        self.view.update([w for w in WORKERS if w.name != owner])
        self.view.update(WORKERS)
        self.assertEqual(self.served_by(), self.order[1])
        self.assertEqual(self.workers.held_out, [(owner,)])
        self.clock.advance(0)
        self.workers.held_out.clear()
        self.assertEqual(self.served_by(), owner)
        self.assertEqual(self.workers.held_out, [()])

    def test_a_worker_that_left_for_good_does_not_hold_up_purges(self) -> None:
        owner = self.view.current.member(self.order[0])
        self.view.update([w for w in WORKERS if w != owner], departed_gracefully=[owner.name])
        self.workers.behaviour[owner.name] = WorkerUnavailable(owner, "refused")
        self.successResultOf(self.backend.purge(SPEC.url))
        self.assertIn(owner.name, self.workers.purged)  # tried while it may linger
        self.assertEqual(self.backend.pending_purges, {})

    def test_a_worker_that_refuses_a_purge_is_a_502_and_not_held_out(self) -> None:
        self.workers.behaviour[self.order[0]] = ProxyError(400, "bad url")
        failure = self.failureResultOf(self.backend.purge(SPEC.url), ProxyError)
        self.assertEqual(failure.value.status, 502)
        self.assertEqual(self.backend.pending_purges, {})
        self.flushLoggedErrors(ProxyError)

    def test_a_replay_refused_outright_is_dropped(self) -> None:
        owner = self.order[0]
        self.workers.behaviour[owner] = WorkerUnavailable(WORKERS[0], "timeout")
        self.failureResultOf(self.backend.purge(SPEC.url), ProxyError)
        self.workers.behaviour[owner] = ProxyError(400, "bad url")
        self.clock.advance(DOWN_RECHECK_SECONDS)
        self.assertEqual(self.backend.pending_purges, {})
        self.flushLoggedErrors(ProxyError)

    def test_purge_with_no_worker_at_all_is_503(self) -> None:
        self.view.update([])
        failure = self.failureResultOf(self.backend.purge(SPEC.url), ProxyError)
        self.assertEqual(failure.value.status, 503)

    def test_purge_with_no_reachable_worker_is_503(self) -> None:
        for worker in WORKERS:
            self.workers.behaviour[worker.name] = WorkerUnavailable(worker, "refused")
        failure = self.failureResultOf(self.backend.purge(SPEC.url), ProxyError)
        self.assertEqual(failure.value.status, 503)


class ClusterViewTests(SynchronousTestCase):
    def test_handoff_candidates_are_the_owners_now_and_before(self) -> None:
        view = ClusterView(me="new")
        view.update(WORKERS)
        key = SPEC.source_key
        before = view.current.owner(key)
        view.update([*WORKERS, WorkerRef("new", "127.0.0.20", 8080)])
        candidates = view.handoff_candidates(key)
        if view.current.owner(key).name == "new":
            self.assertEqual([c.name for c in candidates], [before.name])
        else:
            self.assertEqual([c.name for c in candidates], [view.current.owner(key).name])

    def test_a_failed_worker_is_not_a_candidate_but_a_departed_one_is(self) -> None:
        key = SPEC.source_key
        view = ClusterView(me="someone-else")
        view.update(WORKERS)
        owner = view.current.owner(key)
        rest = [w for w in WORKERS if w.name != owner.name]
        view.update(rest)
        self.assertNotIn(owner.name, [c.name for c in view.handoff_candidates(key)])
        view.update(WORKERS)
        view.update(rest, departed_gracefully=[owner.name])
        self.assertIn(owner.name, [c.name for c in view.handoff_candidates(key)])

    def test_update_with_the_same_workers_changes_nothing(self) -> None:
        view = ClusterView()
        calls: list[object] = []
        view.on_change(calls.append)
        self.assertTrue(view.update(WORKERS))
        self.assertFalse(view.update(list(reversed(WORKERS))))
        self.assertEqual(len(calls), 1)
