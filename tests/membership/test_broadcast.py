"""The transmit-limited broadcast queue: priorities, invalidation, byte budget, limits."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from imgproxy.membership.broadcast import TransmitLimitedQueue
from imgproxy.membership.messages import Alive, Dead, Message, Suspect, UserMsg


def size_of(message: Message) -> int:
    # Test messages carry their size in their payload or name, so budgets are exact.
    if isinstance(message, UserMsg):
        return len(message.payload)
    return 10


class QueueTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.nodes = 1
        self.queue = TransmitLimitedQueue(2, lambda: self.nodes, size_of)

    def test_newer_news_about_a_member_replaces_older(self) -> None:
        finished: list[str] = []
        self.queue.queue("a", Suspect(1, "a", "x"), lambda: finished.append("suspect"))
        self.queue.queue("a", Alive(2, "a", b"\x7f\0\0\1", 1))
        self.queue.queue("b", Dead(1, "b", "x"))
        self.assertEqual(finished, ["suspect"])
        sent = self.queue.get_broadcasts(2, 1400)
        self.assertEqual(set(sent), {Alive(2, "a", b"\x7f\0\0\1", 1), Dead(1, "b", "x")})

    def test_unnamed_broadcasts_never_replace(self) -> None:
        self.queue.queue(None, UserMsg(b"1"))
        self.queue.queue(None, UserMsg(b"2"))
        self.assertEqual(len(self.queue), 2)

    def test_each_broadcast_is_sent_retransmit_limit_times(self) -> None:
        finished: list[bool] = []
        self.nodes = 10  # limit = 2 * ceil(log10(11)) = 4
        self.queue.queue("a", Dead(1, "a", "x"), lambda: finished.append(True))
        rounds = [self.queue.get_broadcasts(2, 1400) for _ in range(5)]
        self.assertEqual([len(r) for r in rounds], [1, 1, 1, 1, 0])
        self.assertEqual(finished, [True])
        self.assertEqual(len(self.queue), 0)

    def test_least_sent_first_then_largest_then_newest(self) -> None:
        self.nodes = 100
        self.queue.queue(None, UserMsg(b"old"))
        self.queue.get_broadcasts(0, 3)  # "old" has now been sent once
        self.queue.queue(None, UserMsg(b"small"))
        self.queue.queue(None, UserMsg(b"larger!"))
        self.queue.queue(None, UserMsg(b"newer"))
        order = [m for m, _ in self.queue.queued()]
        self.assertEqual(
            order,
            [UserMsg(b"larger!"), UserMsg(b"newer"), UserMsg(b"small"), UserMsg(b"old")],
        )

    def test_fills_the_byte_budget_with_what_fits(self) -> None:
        self.nodes = 100
        for payload in (b"x" * 50, b"y" * 30, b"z" * 15):
            self.queue.queue(None, UserMsg(payload))
        # 2 bytes of overhead each: 52 fits, 32 does not fit in the 18 left, 17 does.
        sent = self.queue.get_broadcasts(2, 70)
        self.assertEqual(sent, [UserMsg(b"x" * 50), UserMsg(b"z" * 15)])
        # The unsent one leads the next round; the small one still fits behind it.
        self.assertEqual(self.queue.get_broadcasts(2, 70), [UserMsg(b"y" * 30), UserMsg(b"z" * 15)])

    def test_nothing_fits_in_no_room(self) -> None:
        self.queue.queue("a", Dead(1, "a", "x"))
        self.assertEqual(self.queue.get_broadcasts(2, 2), [])
        self.assertEqual(len(self.queue), 1)

    def test_the_limit_follows_the_cluster_size(self) -> None:
        self.queue.queue("a", Dead(1, "a", "x"))
        self.queue.get_broadcasts(2, 1400)
        self.queue.get_broadcasts(2, 1400)
        self.assertEqual(len(self.queue), 0)  # n = 1: limit 2
        self.nodes = 1000  # limit 2 * 4 = 8
        self.queue.queue("a", Dead(1, "a", "x"))
        for _ in range(7):
            self.queue.get_broadcasts(2, 1400)
        self.assertEqual(len(self.queue), 1)

    def test_prune_keeps_the_freshest(self) -> None:
        self.nodes = 100
        finished: list[str] = []
        self.queue.queue("a", Dead(1, "a", "x"), lambda: finished.append("a"))
        self.queue.get_broadcasts(2, 1400)
        self.queue.queue("b", Dead(1, "b", "x"), lambda: finished.append("b"))
        self.queue.prune(1)
        self.assertEqual(finished, ["a"])
        self.assertEqual([m for m, _ in self.queue.queued()], [Dead(1, "b", "x")])

    def test_reset_finishes_everything(self) -> None:
        finished: list[str] = []
        self.queue.queue("a", Dead(1, "a", "x"), lambda: finished.append("a"))
        self.queue.queue(None, UserMsg(b"u"), lambda: finished.append("u"))
        self.queue.reset()
        self.assertEqual(sorted(finished), ["a", "u"])
        self.assertEqual(len(self.queue), 0)
