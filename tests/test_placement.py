"""Key placement: rendezvous hashing over the alive workers, and the bounded-load choice."""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from imgproxy.params import source_key_of
from imgproxy.placement import (
    BoundedLoad,
    Placement,
    WorkerRef,
    _score,
    key_hash,
    member_seed,
    previous_owner,
)

# The machine is shared and loaded: hypothesis must judge by examples, not by time.
examples = settings(deadline=None, max_examples=60)


def worker(name: str, port: int = 8080) -> WorkerRef:
    return WorkerRef(name=name, host=f"{name}.internal", port=port)


def workers(count: int, prefix: str = "worker-") -> list[WorkerRef]:
    return [worker(f"{prefix}{i}") for i in range(count)]


def url_keys(count: int, start: int = 0) -> list[str]:
    return [source_key_of(f"https://img.example/{i}.jpg") for i in range(start, start + count)]


names = st.text(min_size=1, max_size=12)
member_lists = st.lists(names, min_size=1, max_size=40, unique=True).map(
    lambda ns: [worker(n) for n in ns]
)
source_keys = st.one_of(
    st.binary(min_size=32, max_size=32).map(lambda b: b.hex()),
    st.text(max_size=40),
)


class KeyHashTests(SynchronousTestCase):
    def test_sha256_hex_uses_its_first_64_bits(self) -> None:
        key = source_key_of("https://img.example/a.jpg")
        self.assertEqual(key_hash(key), int(key[:16], 16))

    @examples
    @given(st.text(max_size=40))
    def test_any_text_hashes_to_64_bits_without_raising(self, text: str) -> None:
        value = key_hash(text)
        self.assertTrue(0 <= value < 2**64)

    def test_signs_and_spaces_are_hashed_not_parsed(self) -> None:
        # int(..., 16) would accept each of these, one of them as a negative number.
        for odd in ("-fffffffffffffff0", " fffffffffffffff", "0x" + "f" * 14, "f_" * 8):
            digest = hashlib.blake2b(odd.encode(), digest_size=8).digest()
            self.assertEqual(key_hash(odd), int.from_bytes(digest, "big"), odd)

    def test_member_seeds_differ_by_name(self) -> None:
        seeds = {member_seed(f"worker-{i}") for i in range(1000)}
        self.assertEqual(len(seeds), 1000)


class ScoreTests(SynchronousTestCase):
    def test_the_score_is_splitmix64s_finaliser(self) -> None:
        # splitmix64 seeded with 0 outputs mix(k * golden gamma) for k = 1, 2, ...:
        # its published first outputs pin the mix, which every gateway version must share.
        gamma = 0x9E3779B97F4A7C15
        self.assertEqual(_score(gamma, 0), 0xE220A8397B1DCDAF)
        self.assertEqual(_score((2 * gamma) % 2**64, 0), 0x6E789E6AA1B965F4)
        self.assertEqual(_score(0, gamma), 0xE220A8397B1DCDAF)

    @examples
    @given(st.lists(names, max_size=70, unique=True), source_keys)
    def test_packed_scores_equal_the_scalar_definition(self, ns: list[str], key: str) -> None:
        placement = Placement(worker(n) for n in ns)
        expected = [_score(member_seed(w.name), key_hash(key)) for w in placement.workers]
        self.assertEqual(list(placement.scores(key)), expected)

    def test_preference_is_ordered_by_score(self) -> None:
        placement = Placement(workers(64))
        for key in url_keys(200):
            scores = dict(zip(placement.workers, placement.scores(key), strict=True))
            ranked = [scores[w] for w in placement.preference(key)]
            self.assertEqual(ranked, sorted(ranked, reverse=True))


class PlacementTests(SynchronousTestCase):
    def test_no_workers_means_no_owner(self) -> None:
        placement = Placement([])
        self.assertIsNone(placement.owner(url_keys(1)[0]))
        self.assertEqual(placement.preference(url_keys(1)[0]), [])
        self.assertEqual(placement.workers, ())

    def test_one_worker_owns_everything(self) -> None:
        only = worker("solo")
        placement = Placement([only])
        for key in url_keys(50):
            self.assertEqual(placement.owner(key), only)
            self.assertEqual(placement.preference(key), [only])

    @examples
    @given(member_lists, st.randoms(use_true_random=False), source_keys)
    def test_every_member_order_gives_the_same_preference(
        self, members: list[WorkerRef], rng: random.Random, key: str
    ) -> None:
        shuffled = list(members)
        rng.shuffle(shuffled)
        first, second = Placement(members), Placement(shuffled)
        self.assertEqual(first.workers, second.workers)
        self.assertEqual(first.preference(key), second.preference(key))
        self.assertEqual(first.owner(key), second.owner(key))

    @examples
    @given(member_lists, source_keys)
    def test_preference_is_a_permutation_of_the_workers(
        self, members: list[WorkerRef], key: str
    ) -> None:
        placement = Placement(members)
        preference = placement.preference(key)
        self.assertEqual(sorted(preference, key=lambda w: w.name), list(placement.workers))
        self.assertEqual(Counter(w.name for w in preference), Counter(w.name for w in members))

    @examples
    @given(member_lists, source_keys)
    def test_owner_is_first_in_preference(self, members: list[WorkerRef], key: str) -> None:
        cold = Placement(members, memo_size=0)
        self.assertEqual(cold.owner(key), cold.preference(key)[0])

    def test_duplicate_names_keep_one_entry_whatever_the_order(self) -> None:
        a, b = WorkerRef("w", "10.0.0.2", 80), WorkerRef("w", "10.0.0.1", 90)
        self.assertEqual(Placement([a, b]).workers, (b,))
        self.assertEqual(Placement([b, a]).workers, (b,))

    @examples
    @given(member_lists, names, st.lists(source_keys, min_size=1, max_size=30))
    def test_a_new_worker_takes_keys_only_for_itself(
        self, members: list[WorkerRef], newcomer: str, keys: list[str]
    ) -> None:
        if newcomer in {w.name for w in members}:
            return
        added = worker(newcomer)
        before, after = Placement(members), Placement([*members, added])
        for key in keys:
            self.assertIn(after.owner(key), (before.owner(key), added))
            # The others keep their relative order: failover paths do not shuffle either.
            rest = [w for w in after.preference(key) if w != added]
            self.assertEqual(rest, before.preference(key))

    @examples
    @given(member_lists.filter(lambda ms: len(ms) >= 2), st.data())
    def test_a_removed_workers_keys_go_to_their_second_choice_and_no_others_move(
        self, members: list[WorkerRef], data: st.DataObject
    ) -> None:
        gone = data.draw(st.sampled_from(members))
        before = Placement(members)
        after = Placement(w for w in members if w != gone)
        for key in data.draw(st.lists(source_keys, min_size=1, max_size=30)):
            preference = before.preference(key)
            if preference[0] == gone:
                self.assertEqual(after.owner(key), preference[1])
            else:
                self.assertEqual(after.owner(key), preference[0])

    def test_keys_spread_evenly(self) -> None:
        placement = Placement(workers(8))
        owned = Counter(placement.owner(key).name for key in url_keys(16000))
        self.assertEqual(len(owned), 8)
        for name, count in owned.items():
            # 2000 expected, binomial sd ~41: a broken mix lands far outside 5 sd.
            self.assertLess(abs(count - 2000), 210, name)

    def test_second_choices_spread_evenly(self) -> None:
        placement = Placement(workers(4))
        pairs = Counter(tuple(w.name for w in placement.preference(k)[:2]) for k in url_keys(12000))
        self.assertEqual(len(pairs), 12)
        for pair, count in pairs.items():
            # 1000 expected per ordered pair, sd ~30.
            self.assertLess(abs(count - 1000), 160, pair)

    def test_the_memo_never_changes_an_answer(self) -> None:
        members = workers(16)
        cold = Placement(members, memo_size=0)
        tiny = Placement(members, memo_size=3)
        keys = url_keys(40)
        for _ in range(2):
            for key in keys:
                self.assertEqual(tiny.preference(key), cold.preference(key))
                self.assertEqual(tiny.owner(key), cold.owner(key))

    def test_preference_returns_a_fresh_list(self) -> None:
        placement = Placement(workers(3))
        key = url_keys(1)[0]
        placement.preference(key).reverse()
        self.assertEqual(placement.preference(key), Placement(workers(3)).preference(key))


class PreviousOwnerTests(SynchronousTestCase):
    def test_scale_out_names_the_old_owner_exactly_for_moved_keys(self) -> None:
        members = workers(5)
        newcomer = worker("worker-new")
        before, after = Placement(members), Placement([*members, newcomer])
        moved = 0
        for key in url_keys(3000):
            if after.owner(key) == newcomer:
                moved += 1
                self.assertEqual(previous_owner(before, after, key), before.owner(key))
            else:
                self.assertIsNone(previous_owner(before, after, key))
        self.assertGreater(moved, 0)

    def test_a_departed_owner_has_nothing_to_hand_off(self) -> None:
        members = workers(4)
        before, after = Placement(members), Placement(members[1:])
        key = next(k for k in url_keys(200) if before.owner(k) == members[0])
        self.assertIsNone(previous_owner(before, after, key))

    def test_the_old_owner_comes_with_its_current_endpoint(self) -> None:
        members = workers(3)
        newcomer = worker("worker-new")
        before = Placement(members)
        moved_port = [WorkerRef(w.name, w.host, 9000) for w in members]
        after = Placement([*moved_port, newcomer])
        key = next(k for k in url_keys(500) if after.owner(k) == newcomer)
        self.assertEqual(previous_owner(before, after, key), after.member(before.owner(key).name))
        self.assertEqual(previous_owner(before, after, key).port, 9000)

    def test_no_members_before_or_after(self) -> None:
        key = url_keys(1)[0]
        self.assertIsNone(previous_owner(Placement([]), Placement(workers(2)), key))
        self.assertIsNone(previous_owner(Placement(workers(2)), Placement([]), key))

    def test_an_unchanged_membership_moves_nothing(self) -> None:
        before, after = Placement(workers(7)), Placement(reversed(workers(7)))
        for key in url_keys(300):
            self.assertIsNone(previous_owner(before, after, key))


def reference_cap(epsilon: float, counts: list[int]) -> int:
    """The bound from its definition, in exact arithmetic."""
    return math.ceil((1 + Fraction(epsilon)) * Fraction(sum(counts) + 1, len(counts)))


class BoundedLoadTests(SynchronousTestCase):
    def test_cap_is_ceil_of_one_plus_epsilon_times_mean_with_the_new_request(self) -> None:
        load = BoundedLoad(epsilon=0.25)
        members = workers(16)
        for i in range(63):
            load.acquire(members[i % 16])
        self.assertEqual(load.cap(members), 5)  # ceil(1.25 * 64 / 16)
        self.assertEqual(BoundedLoad(0.25).cap(members), 1)  # idle: ceil(1.25 / 16)
        self.assertEqual(load.cap([]), 0)

    def test_owner_is_chosen_while_under_its_cap(self) -> None:
        load = BoundedLoad()
        members = workers(4)
        self.assertEqual(load.choose(members), members[0])
        self.assertEqual(load.overflow_count, 0)

    def test_a_busy_owner_overflows_to_the_next_in_preference(self) -> None:
        load = BoundedLoad(epsilon=0.25)
        members = workers(4)
        load.acquire(members[0])  # cap for the next request: ceil(1.25 * 2 / 4) = 1
        self.assertEqual(load.choose(members), members[1])
        self.assertEqual(load.overflow_count, 1)
        load.acquire(members[1])  # cap ceil(1.25 * 3 / 4) = 1: owner and second are full
        self.assertEqual(load.choose(members), members[2])
        self.assertEqual(load.overflow_count, 2)

    def test_excluded_workers_are_skipped_without_counting_overflow(self) -> None:
        load = BoundedLoad()
        members = workers(3)
        self.assertEqual(load.choose(members, excluded={members[0].name}), members[1])
        self.assertEqual(load.overflow_count, 0)

    def test_excluded_workers_do_not_count_toward_the_mean(self) -> None:
        load = BoundedLoad(epsilon=0.0)
        members = workers(2)
        for _ in range(10):
            load.acquire(members[0])
        self.assertEqual(load.cap(members, excluded={members[0].name}), 1)
        self.assertEqual(load.choose(members, excluded={members[0].name}), members[1])

    def test_nothing_to_choose_when_every_worker_is_excluded(self) -> None:
        load = BoundedLoad()
        members = workers(2)
        self.assertIsNone(load.choose(members, excluded={w.name for w in members}))
        self.assertIsNone(load.choose([]))

    def test_acquire_and_release_count_in_flight_requests(self) -> None:
        load = BoundedLoad()
        w = worker("a")
        load.acquire(w)
        load.acquire(w)
        self.assertEqual(load.in_flight("a"), 2)
        load.release(w)
        load.release(w)
        self.assertEqual(load.in_flight("a"), 0)
        self.assertEqual(load.in_flight("never-seen"), 0)

    def test_release_without_acquire_is_refused(self) -> None:
        load = BoundedLoad()
        self.assertRaises(ValueError, load.release, worker("a"))

    def test_epsilon_must_be_a_finite_non_negative_number(self) -> None:
        for bad in (-0.1, float("nan"), float("inf")):
            self.assertRaises(ValueError, BoundedLoad, bad)

    @examples
    @given(
        st.integers(min_value=1, max_value=20),
        st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0]),
        st.lists(st.tuples(st.booleans(), st.integers(0, 10**6)), min_size=1, max_size=300),
        st.frozensets(st.integers(0, 19), max_size=3),
    )
    def test_a_simulated_run_never_exceeds_the_cap(
        self,
        size: int,
        epsilon: float,
        steps: list[tuple[bool, int]],
        excluded_indices: frozenset[int],
    ) -> None:
        members = workers(size)
        excluded = {members[i].name for i in excluded_indices if i < size}
        placement = Placement(members)
        load = BoundedLoad(epsilon)
        running: list[WorkerRef] = []
        overflows = 0
        for arrive, draw in steps:
            if not arrive and running:
                load.release(running.pop(draw % len(running)))
                continue
            preference = placement.preference(source_key_of(f"https://img.example/{draw}"))
            candidates = [w for w in preference if w.name not in excluded]
            chosen = load.choose(preference, excluded)
            if not candidates:
                self.assertIsNone(chosen)
                continue
            cap = reference_cap(epsilon, [load.in_flight(w.name) for w in candidates])
            self.assertIn(chosen, candidates)
            self.assertLessEqual(load.in_flight(chosen.name) + 1, cap)
            # Overflow goes to the *first* candidate with room, in preference order.
            for earlier in candidates[: candidates.index(chosen)]:
                self.assertGreaterEqual(load.in_flight(earlier.name), cap)
            overflows += chosen != candidates[0]
            load.acquire(chosen)
            running.append(chosen)
        self.assertEqual(load.overflow_count, overflows)
        for w in members:
            self.assertEqual(load.in_flight(w.name), running.count(w))

    def test_a_hot_key_is_spread_instead_of_piling_on_its_owner(self) -> None:
        load = BoundedLoad(epsilon=0.25)
        placement = Placement(workers(8))
        preference = placement.preference(hashlib.sha256(b"hot").hexdigest())
        for _ in range(80):
            load.acquire(load.choose(preference))
        busiest = max(load.in_flight(w.name) for w in placement.workers)
        self.assertLessEqual(busiest, math.ceil(1.25 * 80 / 8))
        self.assertEqual(sum(load.in_flight(w.name) for w in placement.workers), 80)
