"""Key placement figures: movement on scale-out, balance, bounded load under Zipf traffic, cost.

Run from the checkout: ``.venv/bin/python bench/placement.py`` (``--quick`` for a
smaller, noisier run). Prints a markdown section for BENCHMARKS.md. Every random
choice comes from a seeded ``random.Random``, so a rerun prints the same
figures except the timings.

Compared against ``imgproxy.placement`` (rendezvous hashing):
- ``sha256 mod n``: the owner is ``int(source_key, 16) % n``;
- Maglev (Eisenbud et al., NSDI 2016): a lookup table of prime size filled
  round-robin from per-worker permutations; the owner is ``table[hash % size]``.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import heapq
import itertools
import math
import random
import statistics
import sys
import time
import timeit
from collections import Counter
from collections.abc import Callable, Sequence

from imgproxy.params import source_key_of
from imgproxy.placement import BoundedLoad, Placement, WorkerRef, _score, key_hash, member_seed

MAGLEV_SIZE = 65537  # prime, > 100 x the largest worker count measured (Maglev's advice)
SEED = 20261129


def make_workers(count: int) -> list[WorkerRef]:
    return [WorkerRef(f"worker-{i}", f"10.0.{i // 250}.{i % 250 + 1}", 8080) for i in range(count)]


def make_keys(count: int, salt: str = "") -> list[str]:
    return [source_key_of(f"https://img.example/{salt}photos/{i}.jpg") for i in range(count)]


# --- the alternatives -------------------------------------------------------------------------


def _h64(text: str, person: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8, person=person).digest())


class Maglev:
    """Maglev's lookup table over the workers' names: O(1) lookups, rebuilt on every change."""

    def __init__(self, workers: Sequence[WorkerRef], size: int = MAGLEV_SIZE) -> None:
        self.workers = sorted(workers, key=lambda w: w.name)
        self.size = size
        count = len(self.workers)
        offsets = [_h64(w.name, b"maglev-offset") % size for w in self.workers]
        skips = [_h64(w.name, b"maglev-skip") % (size - 1) + 1 for w in self.workers]
        next_index = [0] * count
        table = [-1] * size
        filled = 0
        while filled < size:
            for i in range(count):
                slot = (offsets[i] + next_index[i] * skips[i]) % size
                while table[slot] >= 0:
                    next_index[i] += 1
                    slot = (offsets[i] + next_index[i] * skips[i]) % size
                table[slot] = i
                next_index[i] += 1
                filled += 1
                if filled == size:
                    break
        self.table = table

    def owner(self, source_key: str) -> WorkerRef:
        return self.workers[self.table[key_hash(source_key) % self.size]]


def mod_n_owner(workers: Sequence[WorkerRef], source_key: str) -> WorkerRef:
    return workers[int(source_key, 16) % len(workers)]


def owners_rendezvous(workers: Sequence[WorkerRef], keys: Sequence[str]) -> list[str]:
    placement = Placement(workers, memo_size=0)
    return [placement.owner(k).name for k in keys]


def owners_mod_n(workers: Sequence[WorkerRef], keys: Sequence[str]) -> list[str]:
    return [mod_n_owner(workers, k).name for k in keys]


def owners_maglev(workers: Sequence[WorkerRef], keys: Sequence[str]) -> list[str]:
    table = Maglev(workers)
    return [table.owner(k).name for k in keys]


SCHEMES: dict[str, Callable[[Sequence[WorkerRef], Sequence[str]], list[str]]] = {
    "rendezvous (ours)": owners_rendezvous,
    "Maglev, table 65537": owners_maglev,
    "sha256 mod n": owners_mod_n,
}


# --- movement and balance ---------------------------------------------------------------------


def movement(keys: Sequence[str], sizes: Sequence[int]) -> list[str]:
    lines = [
        f"Keys that change owner going from n to n+1 workers ({len(keys):,} URLs). "
        "Ratio: moved share / 1/(n+1), the least any scheme must move. "
        "Between survivors: keys moved from one old worker to another old worker.",
        "",
        "| scheme | n | moved | moved share | ratio to 1/(n+1) | moved between survivors |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, owners_of in SCHEMES.items():
        for n in sizes:
            members = make_workers(n + 1)
            newcomer = members[-1].name
            before = owners_of(members[:-1], keys)
            after = owners_of(members, keys)
            moved = sum(b != a for b, a in zip(before, after, strict=True))
            between = sum(b != a and a != newcomer for b, a in zip(before, after, strict=True))
            share = moved / len(keys)
            lines.append(
                f"| {name} | {n} | {moved:,} | {share:.4f} | {share * (n + 1):.3f} | {between:,} |"
            )
    return lines


def busiest_over_mean(owners: Sequence[str], count: int) -> float:
    counts = Counter(owners)
    return max(counts.values()) / (len(owners) / count)


def chi_square(owners: Sequence[str], count: int) -> float:
    counts = Counter(owners)
    expected = len(owners) / count
    return sum((counts.get(f"worker-{i}", 0) - expected) ** 2 / expected for i in range(count))


def ideal_busiest_over_mean(keys: int, count: int, trials: int, rng: random.Random) -> list[float]:
    """busiest/mean when each key picks a worker uniformly and independently at random."""
    results = []
    for _ in range(trials):
        counts = Counter(rng.randrange(count) for _ in range(keys))
        results.append(max(counts.values()) / (keys / count))
    return results


def balance(keys: Sequence[str], count: int, key_sets: int, trials: int, large: int) -> list[str]:
    members = make_workers(count)
    lines = [
        f"Keys per worker, {len(keys):,} URLs over {count} workers: busiest / mean "
        f"(target <= 1.05). chi-square over the {count} counts has {count - 1} degrees of "
        f"freedom (mean {count - 1}, sd {math.sqrt(2 * (count - 1)):.1f} if uniform).",
        "",
        "| scheme | busiest / mean | chi-square |",
        "| --- | ---: | ---: |",
    ]
    for name, owners_of in SCHEMES.items():
        owners = owners_of(members, keys)
        lines.append(
            f"| {name} | {busiest_over_mean(owners, count):.3f} | {chi_square(owners, count):.1f} |"
        )
    rng = random.Random(SEED)
    ideal = ideal_busiest_over_mean(len(keys), count, trials, rng)
    under = sum(r <= 1.05 for r in ideal) / len(ideal)
    spread = []
    for salt in range(key_sets):
        owners = owners_rendezvous(members, make_keys(len(keys), salt=f"set{salt}/"))
        spread.append(busiest_over_mean(owners, count))
    lines += [
        "",
        f"Over {key_sets} other sets of {len(keys):,} URLs, rendezvous gives busiest / mean "
        f"median {statistics.median(spread):.3f}, min {min(spread):.3f}, max {max(spread):.3f}. "
        f"An ideal placement (every key on a uniformly random worker, {trials} trials) gives "
        f"median {statistics.median(ideal):.3f}, min {min(ideal):.3f}, max {max(ideal):.3f}, "
        f"and is <= 1.05 in {under:.0%} of trials.",
    ]
    many = owners_rendezvous(members, make_keys(large, salt="large/"))
    ideal_many = ideal_busiest_over_mean(large, count, 5, rng)
    lines += [
        "",
        f"With {large:,} URLs the sampling noise is {math.sqrt(len(keys) / large):.2f} times as "
        f"large: rendezvous gives busiest / mean {busiest_over_mean(many, count):.3f} "
        f"(chi-square {chi_square(many, count):.1f}); the ideal placement gives "
        f"{statistics.median(ideal_many):.3f} (median of 5 trials).",
    ]
    return lines


# --- bounded load under Zipf traffic ----------------------------------------------------------


class ZipfKeys:
    """Draws keys with P(rank r) proportional to r ** -exponent."""

    def __init__(self, universe: int, exponent: float, rng: random.Random) -> None:
        self.keys = make_keys(universe, salt="zipf/")
        self.cumulative = list(itertools.accumulate(r**-exponent for r in range(1, universe + 1)))
        self.rng = rng

    def draw(self) -> str:
        point = self.rng.random() * self.cumulative[-1]
        return self.keys[bisect.bisect_right(self.cumulative, point)]


def simulate(
    policy: str,
    *,
    workers: int,
    clients: int,
    gateways: int,
    requests: int,
    warmup: int,
    universe: int,
    exponent: float,
    epsilon: float = 0.25,
) -> dict[str, float]:
    """A closed system: each client sends a request, waits for it, sends the next.

    Service times are exponential with mean 1, independent of the worker (a
    worker serves its requests in parallel), so a worker's time-averaged
    in-flight count is the share of traffic routed to it times the clients.
    Clients are split round-robin over ``gateways``, each with its own
    ``BoundedLoad`` that sees only its own requests, as real gateways do.
    """
    rng = random.Random(SEED)
    zipf = ZipfKeys(universe, exponent, random.Random(SEED + 1))
    members = make_workers(workers)
    placement = Placement(members)
    index = {w.name: i for i, w in enumerate(placement.workers)}
    loads = [BoundedLoad(epsilon) for _ in range(gateways)]
    in_flight = [0] * workers
    area = [0.0] * workers
    events: list[tuple[float, int, int, WorkerRef]] = []
    sequence = itertools.count()
    owner_hits = 0
    cache_hits = 0
    cached: set[tuple[str, str]] = set()
    peak = 0
    now = 0.0
    start = 0.0

    def send(client: int, at: float) -> None:
        nonlocal owner_hits, cache_hits
        key = zipf.draw()
        preference = placement.preference(key)
        if policy == "owner":
            chosen = preference[0]
        else:
            load = loads[client % gateways]
            chosen = load.choose(preference)
            load.acquire(chosen)
        owner_hits += chosen == preference[0]
        # Unbounded caches: a worker misses a key only the first time it serves it.
        cache_hits += (chosen.name, key) in cached
        cached.add((chosen.name, key))
        in_flight[index[chosen.name]] += 1
        heapq.heappush(events, (at + rng.expovariate(1.0), next(sequence), client, chosen))

    for client in range(clients):
        send(client, 0.0)
    for done in range(warmup + requests):
        at, _, client, finished = heapq.heappop(events)
        if done >= warmup:
            for i, count in enumerate(in_flight):
                area[i] += count * (at - now)
        else:
            start = at
            owner_hits = cache_hits = 0
        now = at
        in_flight[index[finished.name]] -= 1
        if policy != "owner":
            loads[client % gateways].release(finished)
        send(client, at)
        if done >= warmup:
            peak = max(peak, max(in_flight))
    mean = clients / workers
    averages = [a / (now - start) for a in area]
    return {
        "time_avg": max(averages) / mean,
        "peak": peak / mean,
        "owner_share": owner_hits / requests,
        "hit_rate": cache_hits / requests,
    }


def bounded_load(quick: bool) -> list[str]:
    workers, clients = 16, 64
    universe, exponent = 100_000, 1.1
    requests = 30_000 if quick else 300_000
    warmup = requests // 10
    lines = [
        f"In-flight requests per worker under Zipf({exponent}) traffic over {universe:,} "
        f"images, {workers} workers, a closed system of {clients} clients (each sends its "
        f"next request when the last one ends), exponential service times, {requests:,} "
        f"requests after {warmup:,} of warm-up. busiest / mean of the time-averaged "
        f"in-flight count (target <= 1.25 with bounded load), the peak instantaneous "
        f"busiest / mean, the share of requests served by the key's owner, and the cache "
        f"hit rate if every worker kept everything it served (an overflowed hot key is "
        f"cached on the overflow worker too, so it misses only once there).",
        "",
        "| routing | gateways | time-averaged busiest / mean | peak busiest / mean "
        "| served by owner | cache hit rate |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    cases = [
        ("owner", "rendezvous owner, unbounded", 1, 0.25),
        ("bounded", "bounded load, epsilon 0.25", 1, 0.25),
        ("bounded", "bounded load, epsilon 0.25", 3, 0.25),
        ("bounded", "bounded load, epsilon 0.1", 1, 0.1),
        ("bounded", "bounded load, epsilon 0.5", 1, 0.5),
    ]
    for policy, label, gateways, epsilon in cases:
        result = simulate(
            policy,
            workers=workers,
            clients=clients,
            gateways=gateways,
            requests=requests,
            warmup=warmup,
            universe=universe,
            exponent=exponent,
            epsilon=epsilon,
        )
        lines.append(
            f"| {label} | {gateways} | {result['time_avg']:.2f} | {result['peak']:.2f} "
            f"| {result['owner_share']:.1%} | {result['hit_rate']:.1%} |"
        )
    spread = unbounded_spread(workers, universe, exponent, name_sets=3 if quick else 8)
    lines += [
        "",
        f"Unbounded routing depends on where the hottest keys land: its busiest / mean "
        f"(the busiest worker's share of traffic x {workers}, computed exactly from the Zipf "
        f"probabilities) over {len(spread)} different sets of worker names: "
        + ", ".join(f"{r:.2f}" for r in spread)
        + f" (median {statistics.median(spread):.2f}).",
    ]
    return lines


def unbounded_spread(workers: int, universe: int, exponent: float, name_sets: int) -> list[float]:
    keys = make_keys(universe, salt="zipf/")
    weights = [r**-exponent for r in range(1, universe + 1)]
    total = sum(weights)
    results = []
    for name_set in range(name_sets):
        members = [WorkerRef(f"set{name_set}-worker-{i}", "10.0.0.1", 8080) for i in range(workers)]
        placement = Placement(members, memo_size=0)
        share: Counter[str] = Counter()
        for key, weight in zip(keys, weights, strict=True):
            share[placement.owner(key).name] += weight
        results.append(max(share.values()) / total * workers)
    return results


# --- cost -------------------------------------------------------------------------------------


def per_call_us(call: Callable[[str], object], keys: Sequence[str], repeat: int) -> float:
    """CPU time per call: the best of ``repeat`` short passes over ``keys``.

    Process CPU time, not wall time, and the minimum over many short passes:
    on a shared, loaded machine that is the figure least disturbed by others.
    """

    def one_pass() -> None:
        for key in keys:
            call(key)

    best = min(timeit.repeat(one_pass, number=1, repeat=repeat, timer=time.process_time))
    return best / len(keys) * 1e6


def scalar_preference(workers: Sequence[WorkerRef]) -> Callable[[str], list[WorkerRef]]:
    """The same ranking, one worker at a time in a Python loop (what the packed form replaces)."""
    seeds = [(member_seed(w.name), w) for w in workers]

    def preference(source_key: str) -> list[WorkerRef]:
        key = key_hash(source_key)
        ranked = sorted(seeds, key=lambda sw: _score(sw[0], key), reverse=True)
        return [w for _, w in ranked]

    return preference


def blake2b_preference(workers: Sequence[WorkerRef]) -> Callable[[str], list[WorkerRef]]:
    """Rendezvous with blake2b(worker name + key) as the score: the obvious, slower way."""
    named = [(w.name.encode(), w) for w in workers]

    def preference(source_key: str) -> list[WorkerRef]:
        key = source_key.encode()
        ranked = sorted(
            named, key=lambda nw: hashlib.blake2b(nw[0] + key, digest_size=8).digest(), reverse=True
        )
        return [w for _, w in ranked]

    return preference


def cost(sizes: Sequence[int], quick: bool) -> list[str]:
    keys = make_keys(200, salt="cost/")
    repeat = 10 if quick else 100
    lines = [
        f"CPU time per request in microseconds (best of {repeat} passes over {len(keys):,} "
        f"distinct keys; Python {sys.version.split()[0]}, {machine()}). Cold: a key not seen "
        "since the snapshot was built. Warm: a hot key, answered from the snapshot's memo "
        "(4,096 keys). choose: BoundedLoad.choose over the preference, 1 request in flight "
        "per worker.",
        "",
        "| workers | preference, cold | owner, cold | preference, warm | choose "
        "| scalar loop, cold | blake2b per worker, cold | Maglev owner "
        "| build Placement (ms) | build Maglev (ms) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n in sizes:
        members = make_workers(n)
        cold = Placement(members, memo_size=0)
        warm = Placement(members)
        for key in keys:
            warm.preference(key)
        load = BoundedLoad()
        for w in members:
            load.acquire(w)
        prefs = {k: cold.preference(k) for k in keys}
        table = Maglev(members)
        started = time.perf_counter()
        Placement(members)
        build_placement = (time.perf_counter() - started) * 1e3
        started = time.perf_counter()
        Maglev(members)
        build_maglev = (time.perf_counter() - started) * 1e3
        figures = [
            per_call_us(cold.preference, keys, repeat),
            per_call_us(cold.owner, keys, repeat),
            per_call_us(warm.preference, keys, repeat),
            per_call_us(lambda k: load.choose(prefs[k]), keys, repeat),  # noqa: B023
            per_call_us(scalar_preference(members), keys, repeat),
            per_call_us(blake2b_preference(members), keys, repeat),
            per_call_us(table.owner, keys, repeat),
        ]
        cells = " | ".join(f"{f:.1f}" for f in figures)
        lines.append(f"| {n} | {cells} | {build_placement:.2f} | {build_maglev:.0f} |")
    return lines


def machine() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer keys and requests")
    args = parser.parse_args(argv)
    quick = args.quick
    key_count = 20_000 if quick else 100_000
    keys = make_keys(key_count)
    sections = [
        ["## Key placement", ""],
        movement(keys, [4, 16, 64]),
        balance(
            keys,
            64,
            key_sets=3 if quick else 10,
            trials=20 if quick else 200,
            large=100_000 if quick else 1_000_000,
        ),
        bounded_load(quick),
        cost([3, 16, 64], quick),
    ]
    for section in sections:
        print("\n".join(section))
        print()
        sys.stdout.flush()


if __name__ == "__main__":
    main()
