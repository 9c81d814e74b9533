"""``ClusterView``: where a worker looks for a key before it asks the origin."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from imgproxy.cluster import ClusterView
from imgproxy.membership.service import watch_workers
from imgproxy.membership.state import Member, NodeState
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


class WatchedMembership:
    """Just what ``watch_workers`` reads of a MembershipService: members and their tags."""

    def __init__(self, members: list[tuple[str, str, NodeState]]) -> None:
        self.listeners: list = []
        self._members = [
            Member(name, bytes([127, 0, 0, 1 + i]), 7946, role.encode(), 1, state, 0.0)
            for i, (name, role, state) in enumerate(members)
        ]

    def members(self) -> list[Member]:
        return self._members

    def tags_of(self, member: Member) -> dict[str, str]:
        role, _, port = member.meta.decode().partition(":")
        return {"role": role, "http": port or "8080"}

    def on_event(self, listener) -> None:
        self.listeners.append(listener)

    def on_state_change(self, listener) -> None:
        self.listeners.append(listener)


def watched(members: list[tuple[str, str, NodeState]]) -> ClusterView:
    """A view kept by ``watch_workers`` over members (name, "role[:http port]", state)."""
    view = ClusterView()
    watch_workers(WatchedMembership(members), view)
    return view


class WatchWorkersTests(SynchronousTestCase):
    def test_alive_suspect_and_failed_workers_each_find_their_place(self) -> None:
        view = watched([
            ("a", "worker", NodeState.ALIVE),
            ("s", "worker", NodeState.SUSPECT),
            ("d", "worker", NodeState.DEAD),
            ("l", "worker", NodeState.LEFT),
            ("g", "gateway", NodeState.ALIVE),
            ("gd", "gateway", NodeState.DEAD),
        ])
        self.assertEqual(sorted(w.name for w in view.current.workers), ["a", "s"])
        self.assertEqual(view.suspected, {"s"})
        # A failed worker may come back with its cache; one that left said goodbye.
        self.assertEqual(list(view.failed), ["d"])
        self.assertEqual(view.failed["d"].host, "127.0.0.3")

    def test_a_member_without_a_usable_http_port_is_no_worker(self) -> None:
        # Anyone may gossip role=worker (a serf agent with tags): only a port counts.
        view = watched([
            ("ok", "worker:8080", NodeState.ALIVE),
            ("high", "worker:99999", NodeState.ALIVE),
            ("zero", "worker:0", NodeState.ALIVE),
            ("word", "worker:http", NodeState.ALIVE),
            ("sign", "worker:-1", NodeState.ALIVE),
        ])
        self.assertEqual([w.name for w in view.current.workers], ["ok"])
