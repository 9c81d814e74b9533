"""Scale-out handoff: which peers a new owner reads from, and which it must not."""

from __future__ import annotations

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from imgproxy.params import TransformSpec
from imgproxy.placement import WorkerRef
from imgproxy.worker.cache import CacheEntry
from imgproxy.worker.handoff import AVOID_SECONDS, MAX_AVOIDED, PeerHandoff

SPEC = TransformSpec("http://origin.test/a.jpg", width=10)
PEERS = [WorkerRef("w1", "127.0.0.11", 8080), WorkerRef("w2", "127.0.0.12", 8080)]


class TwoCandidates:
    """A view whose handoff candidates for every key are w1, then w2."""

    def handoff_candidates(self, source_key: str) -> list[WorkerRef]:
        return list(PEERS)


class PeersThatHoldIt:
    def __init__(self) -> None:
        self.asked: list[str] = []

    def lookup(self, worker, spec, stale_ok=False, timeout=None):
        self.asked.append(worker.name)
        return succeed(CacheEntry(spec.cache_key, worker.name.encode(), "image/jpeg", 0.0,
                                  '"e"', spec.url))


class PeerHandoffTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.client = PeersThatHoldIt()
        self.handoff = PeerHandoff(TwoCandidates(), self.client, self.clock)

    def copied_from(self) -> str:
        return self.successResultOf(self.handoff.find(SPEC, SPEC.url)).body.decode()

    def test_the_first_candidate_that_holds_it_answers(self) -> None:
        self.assertEqual(self.copied_from(), "w1")
        self.assertEqual(self.client.asked, ["w1"])

    def test_a_peer_a_gateway_holds_out_is_not_read_from(self) -> None:
        self.handoff.avoid(["w1"])
        self.assertEqual(self.copied_from(), "w2")
        self.assertEqual(self.client.asked, ["w2"])

    def test_a_peer_is_read_from_again_once_no_gateway_has_named_it_for_a_while(self) -> None:
        self.handoff.avoid(["w1"])
        self.clock.advance(AVOID_SECONDS)
        self.assertEqual(self.copied_from(), "w2")
        self.handoff.avoid(["w1"])  # named again: the time starts over
        self.clock.advance(AVOID_SECONDS)
        self.assertEqual(self.copied_from(), "w2")
        self.clock.advance(0.1)
        self.assertEqual(self.copied_from(), "w1")

    def test_every_candidate_held_out_means_no_copy(self) -> None:
        self.handoff.avoid(["w1", "w2"])
        self.assertIsNone(self.successResultOf(self.handoff.find(SPEC, SPEC.url)))
        self.assertEqual(self.client.asked, [])

    def test_a_flood_of_names_is_bounded_and_expired_ones_make_room(self) -> None:
        self.handoff.avoid(f"x{n}" for n in range(MAX_AVOIDED))
        self.handoff.avoid(["w1"])  # no room: not remembered
        self.assertEqual(self.copied_from(), "w1")
        self.clock.advance(AVOID_SECONDS + 1)
        self.handoff.avoid(["w1"])
        self.assertEqual(self.copied_from(), "w2")
