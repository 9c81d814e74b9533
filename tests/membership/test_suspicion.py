"""Suspicion timing formulas, the suspicion timer and Lifeguard awareness."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from imgproxy.membership.awareness import Awareness
from imgproxy.membership.suspicion import (
    SuspicionTimer,
    push_pull_scale,
    remaining_suspicion_time,
    retransmit_limit,
    suspicion_timeout,
)


class SuspicionTimeoutTests(SynchronousTestCase):
    def test_small_clusters_get_the_multiplier_times_the_interval(self) -> None:
        for n in (0, 1, 3, 5, 10):
            self.assertEqual(suspicion_timeout(3, n, 1.0), 3.0, n)

    def test_grows_with_log10_of_the_cluster_size(self) -> None:
        self.assertAlmostEqual(suspicion_timeout(3, 100, 1.0), 6.0)
        self.assertAlmostEqual(suspicion_timeout(3, 1000, 1.0), 9.0)
        self.assertAlmostEqual(suspicion_timeout(4, 1000, 0.5), 6.0)

    def test_node_scale_is_truncated_to_thousandths_like_memberlist(self) -> None:
        # log10(50) = 1.69897...: memberlist keeps 1.698.
        self.assertAlmostEqual(suspicion_timeout(4, 50, 1.0), 4 * 1.698)


class RemainingSuspicionTimeTests(SynchronousTestCase):
    # memberlist's own table (suspicion_test.go): min 2 s, max 30 s, k = 3.
    def test_no_confirmations_wait_the_maximum(self) -> None:
        self.assertEqual(remaining_suspicion_time(0, 3, 0.0, 2.0, 30.0), 30.0)

    def test_each_confirmation_shrinks_logarithmically(self) -> None:
        self.assertAlmostEqual(remaining_suspicion_time(1, 3, 2.0, 2.0, 30.0), 14.0)
        self.assertAlmostEqual(remaining_suspicion_time(2, 3, 3.0, 2.0, 30.0), 4.81)

    def test_k_confirmations_reach_the_minimum(self) -> None:
        self.assertAlmostEqual(remaining_suspicion_time(3, 3, 4.0, 2.0, 30.0), -2.0)

    def test_never_below_the_minimum(self) -> None:
        self.assertAlmostEqual(remaining_suspicion_time(4, 3, 5.0, 2.0, 30.0), -3.0)

    def test_k_zero_means_the_minimum(self) -> None:
        self.assertEqual(remaining_suspicion_time(0, 0, 1.0, 4.0, 24.0), 3.0)


class ScaleFormulaTests(SynchronousTestCase):
    def test_retransmit_limit(self) -> None:
        self.assertEqual(retransmit_limit(3, 0), 0)
        self.assertEqual(retransmit_limit(3, 1), 3)
        self.assertEqual(retransmit_limit(3, 9), 3)
        self.assertEqual(retransmit_limit(3, 10), 6)
        self.assertEqual(retransmit_limit(3, 99), 6)
        self.assertEqual(retransmit_limit(4, 100), 12)

    def test_push_pull_scale(self) -> None:
        self.assertEqual(push_pull_scale(30.0, 1), 30.0)
        self.assertEqual(push_pull_scale(30.0, 32), 30.0)
        self.assertEqual(push_pull_scale(30.0, 33), 60.0)
        self.assertEqual(push_pull_scale(30.0, 64), 60.0)
        self.assertEqual(push_pull_scale(30.0, 65), 90.0)
        self.assertEqual(push_pull_scale(30.0, 1000), 180.0)


class SuspicionTimerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.fired: list[tuple[float, int]] = []

    def timer(self, k: int, lo: float = 2.0, hi: float = 30.0) -> SuspicionTimer:
        return SuspicionTimer(
            "accuser", k, lo, hi, self.clock, lambda n: self.fired.append((self.clock.seconds(), n))
        )

    def test_without_confirmations_fires_at_the_maximum(self) -> None:
        self.timer(3)
        self.clock.advance(29.9)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.fired, [(30.0, 0)])

    def test_k_zero_fires_at_the_minimum(self) -> None:
        self.timer(0)
        self.clock.advance(2.0)
        self.assertEqual(self.fired, [(2.0, 0)])

    def test_confirmations_pull_the_deadline_in(self) -> None:
        t = self.timer(3)
        self.clock.advance(1.0)
        self.assertTrue(t.confirm("b"))
        self.assertEqual(t.deadline(), 16.0)
        self.assertTrue(t.confirm("c"))
        self.assertAlmostEqual(t.deadline(), 7.81)
        self.clock.advance(6.81)
        self.assertEqual(self.fired, [(7.81, 2)])

    def test_the_first_accuser_and_repeats_do_not_count(self) -> None:
        t = self.timer(3)
        self.assertFalse(t.confirm("accuser"))
        self.assertTrue(t.confirm("b"))
        self.assertFalse(t.confirm("b"))
        self.assertEqual(t.confirmations, 1)

    def test_confirmations_beyond_k_are_not_news(self) -> None:
        t = self.timer(1)
        self.assertTrue(t.confirm("b"))
        self.assertFalse(t.confirm("c"))

    def test_a_late_confirmation_fires_at_once(self) -> None:
        t = self.timer(1)
        self.clock.advance(10.0)
        self.assertTrue(t.confirm("b"))
        self.assertEqual(self.fired, [])
        self.clock.advance(0)
        self.assertEqual(self.fired, [(10.0, 1)])

    def test_cancel_stops_it(self) -> None:
        t = self.timer(3)
        t.cancel()
        self.clock.advance(100)
        self.assertEqual(self.fired, [])
        self.assertIsNone(t.deadline())


class AwarenessTests(SynchronousTestCase):
    def test_starts_healthy_and_clamps_to_the_range(self) -> None:
        a = Awareness(8)
        self.assertEqual(a.score, 0)
        a.apply_delta(-1)
        self.assertEqual(a.score, 0)
        a.apply_delta(100)
        self.assertEqual(a.score, 7)

    def test_scales_timeouts_by_score_plus_one(self) -> None:
        a = Awareness(8)
        self.assertEqual(a.scale_timeout(1.0), 1.0)
        a.apply_delta(2)
        self.assertEqual(a.scale_timeout(0.5), 1.5)
        a.apply_delta(-1)
        self.assertEqual(a.scale_timeout(0.5), 1.0)
