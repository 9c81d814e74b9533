"""Which worker owns an image: rendezvous hashing over the alive workers, plus bounded load.

Pure: no I/O, no Twisted. A ``Placement`` is an immutable snapshot of one member
list; the gateway builds a new one whenever membership changes and asks it, per
request, for the workers in order of preference for the request's *source key*
(so every variant of one image lives on one worker).

Rendezvous (highest random weight) hashing: each worker scores the key with a
64-bit hash of (worker, key) and the highest score owns it. Every gateway that
knows the same members computes the same order, whatever order it learnt them
in; adding a worker moves only the keys the new worker now wins, and removing
one moves only the keys it owned.

The score is splitmix64's finaliser applied to ``seed(worker) XOR hash(key)``:
the per-worker seed is computed once per snapshot, the key's hash is the first
64 bits of its sha256 hex. To keep the per-request cost low at 64 workers in
pure Python, the scores of all workers are computed at once on one big integer
that holds each worker's 64-bit lane in a 128-bit slot (SIMD within a
register): a 64x64-bit product fits its slot, so lanes never carry into each
other. ``_score`` is the scalar definition the lanes must agree with.
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
from collections.abc import Container, Iterable, Sequence

import attrs

_MASK64 = (1 << 64) - 1
_LANE_BITS = 128
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_HEX16 = re.compile(r"[0-9a-fA-F]{16}")
DEFAULT_MEMO_SIZE = 4096


@attrs.frozen
class WorkerRef:
    """A worker's identity (its unique member name) and its HTTP endpoint."""

    name: str
    host: str
    port: int


def key_hash(source_key: str) -> int:
    """The 64-bit hash of a source key: its first 16 hex digits when it is a sha256 hex.

    Anything else (a key that is not hex) is hashed with blake2b, so no input
    raises and every input still spreads evenly.
    """
    if _HEX16.match(source_key):
        return int(source_key[:16], 16)
    data = source_key.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def member_seed(name: str) -> int:
    """A worker's 64-bit rendezvous seed, derived from its member name alone."""
    data = name.encode("utf-8", "surrogatepass")
    return int.from_bytes(
        hashlib.blake2b(data, digest_size=8, person=b"imgproxy-place").digest(), "big"
    )


def _score(seed: int, key: int) -> int:
    """One worker's score for one key: splitmix64's finaliser of ``seed ^ key``."""
    x = seed ^ key
    x = ((x ^ (x >> 30)) * _MIX1) & _MASK64
    x = ((x ^ (x >> 27)) * _MIX2) & _MASK64
    return x ^ (x >> 31)


class Placement:
    """The placement of keys over one list of alive workers: an immutable snapshot.

    Workers are identified by name; if a name appears more than once, the entry
    with the smallest ``(host, port)`` is kept, so the result never depends on
    the order the members were given in. ``workers`` is sorted by name.
    """

    workers: tuple[WorkerRef, ...]

    def __init__(self, workers: Iterable[WorkerRef], *, memo_size: int = DEFAULT_MEMO_SIZE) -> None:
        by_name: dict[str, WorkerRef] = {}
        for worker in sorted(workers, key=lambda w: (w.name, w.host, w.port)):
            by_name.setdefault(worker.name, worker)
        self.workers = tuple(by_name.values())
        self._by_name = by_name
        self._seeds = tuple(member_seed(w.name) for w in self.workers)
        lanes = replicate = low = 0
        for i, seed in enumerate(self._seeds):
            shift = _LANE_BITS * i
            lanes |= seed << shift
            replicate |= 1 << shift
            low |= _MASK64 << shift
        self._lanes = lanes
        self._replicate = replicate
        self._low = low
        self._order = range(len(self.workers))
        self._words = struct.Struct(f"<{2 * len(self.workers)}Q")
        # Hot keys (image traffic is Zipf-like) skip the scoring; cleared when full
        # so the memo stays bounded without LRU bookkeeping per request.
        self._memo: dict[int, tuple[WorkerRef, ...]] = {}
        self._memo_size = memo_size

    def __repr__(self) -> str:
        return f"Placement({[w.name for w in self.workers]!r})"

    def __len__(self) -> int:
        return len(self.workers)

    def member(self, name: str) -> WorkerRef | None:
        """The worker of that name in this snapshot, or ``None``."""
        return self._by_name.get(name)

    def scores(self, source_key: str) -> Sequence[int]:
        """Every worker's score for the key, in the order of ``workers``."""
        return self._scores(key_hash(source_key))

    def _scores(self, key: int) -> Sequence[int]:
        count = len(self.workers)
        if count == 0:
            return ()
        low = self._low
        x = self._lanes ^ (key * self._replicate)
        x = (((x ^ (x >> 30)) & low) * _MIX1) & low
        x = (((x ^ (x >> 27)) & low) * _MIX2) & low
        x = (x ^ (x >> 31)) & low
        # Each 128-bit slot is two little-endian 64-bit words: the score, then zero.
        return self._words.unpack(x.to_bytes(16 * count, "little"))[::2]

    def preference(self, source_key: str) -> list[WorkerRef]:
        """All workers, best first: the owner, then where to go when it fails or is busy."""
        key = key_hash(source_key)
        cached = self._memo.get(key)
        if cached is None:
            scores = self._scores(key)
            # A stable sort over name-sorted workers: equal scores (equal seeds,
            # never in practice) still order the same on every gateway.
            ranked = sorted(self._order, key=scores.__getitem__, reverse=True)
            workers = self.workers
            cached = tuple([workers[i] for i in ranked])
            if len(self._memo) >= self._memo_size:
                self._memo.clear()
            if self._memo_size > 0:
                self._memo[key] = cached
        return list(cached)

    def owner(self, source_key: str) -> WorkerRef | None:
        """The worker that owns the key, or ``None`` when there are no workers."""
        key = key_hash(source_key)
        cached = self._memo.get(key)
        if cached is not None:
            return cached[0]
        scores = self._scores(key)
        if not scores:
            return None
        # index() finds the first maximum: the same tie rule as ``preference``.
        return self.workers[scores.index(max(scores))]


def previous_owner(before: Placement, after: Placement, source_key: str) -> WorkerRef | None:
    """Where a key's cached variants may still be after a membership change.

    The key's owner in ``before`` when it is not the owner in ``after`` and is
    still a member of ``after`` (a worker that left has nothing to hand off); it
    is returned as ``after`` knows it, with its current endpoint. ``None`` otherwise.
    """
    old = before.owner(source_key)
    if old is None:
        return None
    new = after.owner(source_key)
    if new is not None and new.name == old.name:
        return None
    return after.member(old.name)


class BoundedLoad:
    """A gateway's in-flight requests per worker, and the bounded-load choice of worker.

    Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam):
    a worker may take a new request only while its in-flight count is under
    ``ceil((1 + epsilon) * mean)``, the mean taken over the candidate workers
    with the new request counted. A hot key overflows to the next worker in its
    preference instead of piling onto its owner.
    """

    def __init__(self, epsilon: float = 0.25) -> None:
        if not epsilon >= 0 or math.isinf(epsilon):
            raise ValueError(f"epsilon must be a finite number >= 0, not {epsilon!r}")
        self.epsilon = epsilon
        self.overflow_count = 0
        self._in_flight: dict[str, int] = {}

    def in_flight(self, name: str) -> int:
        """How many requests this gateway has in flight at the named worker."""
        return self._in_flight.get(name, 0)

    def cap(self, preference: Sequence[WorkerRef], excluded: Container[str] = ()) -> int:
        """The in-flight bound a new request must respect; 0 when no worker is a candidate."""
        counts = self._in_flight
        total = 1
        candidates = 0
        for worker in preference:
            if worker.name not in excluded:
                total += counts.get(worker.name, 0)
                candidates += 1
        if candidates == 0:
            return 0
        return math.ceil((1.0 + self.epsilon) * total / candidates)

    def choose(
        self, preference: Sequence[WorkerRef], excluded: Container[str] = ()
    ) -> WorkerRef | None:
        """The first worker in ``preference`` under the cap, skipping ``excluded`` names.

        ``None`` only when every worker is excluded: the in-flight counts of the
        candidates sum to less than ``candidates * cap``, so one is always under it.
        """
        cap = self.cap(preference, excluded)
        counts = self._in_flight
        first = True
        for worker in preference:
            if worker.name in excluded:
                continue
            if counts.get(worker.name, 0) < cap:
                if not first:
                    self.overflow_count += 1
                return worker
            first = False
        return None

    def acquire(self, worker: WorkerRef) -> None:
        """Count a request sent to the worker."""
        self._in_flight[worker.name] = self._in_flight.get(worker.name, 0) + 1

    def release(self, worker: WorkerRef) -> None:
        """Count a request to the worker as finished; one ``release`` per ``acquire``."""
        count = self._in_flight.get(worker.name, 0)
        if count <= 0:
            raise ValueError(f"release of {worker.name!r} without a matching acquire")
        if count == 1:
            # Departed workers leave no entries behind.
            del self._in_flight[worker.name]
        else:
            self._in_flight[worker.name] = count - 1
