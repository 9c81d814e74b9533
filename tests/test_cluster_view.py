"""``ClusterView``: where a worker looks for a key before it asks the origin."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from imgproxy.cluster import ClusterView
from imgproxy.params import source_key_of
from imgproxy.placement import Placement, WorkerRef

WORKERS = [WorkerRef(f"w{i}", f"127.0.0.{10 + i}", 8080) for i in range(3)]
NEWCOMER = WorkerRef("new", "127.0.0.20", 8080)
KEYS = [source_key_of(f"http://origin.test/{n}.jpg") for n in range(200)]


class HandoffCandidateTests(SynchronousTestCase):
    def test_a_joining_worker_that_learns_everyone_at_once_asks_the_previous_owner(self) -> None:
        # A new worker first knows only itself, then the whole cluster from one push-pull:
        # its ``previous`` placement never had the keys' former owners in it.
        view = ClusterView(me=NEWCOMER.name)
        view.update([NEWCOMER])
        view.update([*WORKERS, NEWCOMER])
        before = Placement(WORKERS)
        moved = [k for k in KEYS if view.current.owner(k) == NEWCOMER]

        asked = {k: [w.name for w in view.handoff_candidates(k)] for k in moved}

        self.assertGreater(len(moved), 20)
        self.assertEqual(asked, {k: [before.owner(k).name] for k in moved})


class SuspectedPeersTests(SynchronousTestCase):
    def test_a_suspected_worker_is_not_asked_for_a_handoff(self) -> None:
        workers = [WorkerRef(f"w{i}", f"127.0.0.{10 + i}", 8080) for i in range(3)]
        view = ClusterView(me="w0")
        view.update(workers)
        key = "ab" * 32
        everyone = {c.name for c in view.handoff_candidates(key)}
        self.assertTrue(everyone)
        view.suspected = set(everyone)
        self.assertEqual(view.handoff_candidates(key), [])
