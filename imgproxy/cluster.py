"""What a node knows of the cluster's workers: the placement now and just before.

Pure bookkeeping, fed by membership events. Gateways route with ``current``;
a worker that newly owns a key asks the key's owner under ``previous`` (a
worker that still has it, or one that left gracefully and lingers) before the
origin. Also the purge event every gateway gossips, which every worker applies.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable

from imgproxy.errors import ProxyError
from imgproxy.params import check_source_url, source_key_of
from imgproxy.placement import Placement, WorkerRef

#: The serf user event a gateway gossips for every purge, so that every member keeps
#: it among its recent events and a worker that was away applies it when it is back.
PURGE_EVENT = "imgproxy-purge"
_SOURCE_KEY = re.compile(r"[0-9a-f]{64}")


def purge_event_payload(url: str) -> bytes:
    """The source's key: a URL may be far longer than a gossip datagram holds."""
    return source_key_of(url).encode("ascii")


def purged_source_key(payload: bytes) -> str | None:
    """The source key a purge event names, or None.

    Gateways send the key; an operator may send the URL itself, with
    ``serf event imgproxy-purge https://...`` on any serf agent of the cluster.
    """
    text = payload.decode("utf-8", "replace").strip()
    lowered = text.lower()
    if _SOURCE_KEY.fullmatch(lowered):
        return lowered
    if lowered.startswith(("http://", "https://")):
        try:
            return source_key_of(check_source_url(text))
        except ProxyError:
            return None
    return None


class ClusterView:
    """The alive workers as placements, plus workers that left gracefully."""

    def __init__(self, me: str | None = None) -> None:
        self.me = me
        self.current = Placement(())
        self.previous = Placement(())
        self._departed: dict[str, WorkerRef] = {}
        # Workers membership suspects: not asked for handoffs (a frozen peer would
        # cost the whole lookup timeout before the origin is tried), and routed
        # around by a gateway until cleared.
        self.suspected: set[str] = set()
        # Workers membership declared failed (not departed) and still lists: one
        # may come back with its cache, so a purge must reach it too.
        self.failed: dict[str, WorkerRef] = {}
        self._listeners: list[Callable[[ClusterView], None]] = []

    def on_change(self, listener: Callable[[ClusterView], None]) -> None:
        self._listeners.append(listener)

    def update(self, workers: Iterable[WorkerRef], departed_gracefully: Iterable[str] = ()) -> bool:
        """Adopt the alive worker set; returns whether it changed anything."""
        workers = tuple(sorted(set(workers), key=lambda w: w.name))
        if workers == tuple(sorted(self.current.workers, key=lambda w: w.name)):
            return False
        alive = {w.name for w in workers}
        for name in departed_gracefully:
            old = self.current.member(name)
            if old is not None and name not in alive:
                self._departed[name] = old
        for name in list(self._departed):
            if name in alive:
                del self._departed[name]
        self.previous = self.current
        self.current = Placement(workers)
        for listener in list(self._listeners):
            listener(self)
        return True

    def preference(self, source_key: str) -> list[WorkerRef]:
        return self.current.preference(source_key)

    def handoff_candidates(self, source_key: str) -> list[WorkerRef]:
        """Workers other than this one that may hold the key: its owner now, its owner
        among the others (the owner before this worker joined), and its owner before the
        last change (a worker that left gracefully and lingers)."""
        candidates: list[WorkerRef] = []
        preference = self.current.preference(source_key)
        owner_now = preference[0] if preference else None
        # Rendezvous hashing: without this worker, the key would belong to the next one
        # in its preference. A worker that just joined often learns the whole cluster in
        # one push-pull, so ``previous`` never held that owner.
        others = [w for w in preference if w.name != self.me]
        owner_among_others = others[0] if others else None
        owner_before = self.previous.owner(source_key)
        for worker in (owner_now, owner_among_others, owner_before):
            if worker is None or worker.name == self.me:
                continue
            if worker.name in {c.name for c in candidates} or worker.name in self.suspected:
                continue
            if self.current.member(worker.name) is None and worker.name not in self._departed:
                continue  # failed, not departed: nothing to pull from it
            candidates.append(self.current.member(worker.name) or worker)
        return candidates


_SHARE_SAMPLES = 4096
_shares_memo: dict[tuple[str, ...], dict[str, float]] = {}


def key_shares(placement: Placement) -> dict[str, float]:
    """The share of keys each worker owns, measured on a fixed sample of keys.

    Memoised per member set: the status page asks every few seconds, the
    answer only changes with membership.
    """
    names = tuple(sorted(w.name for w in placement.workers))
    cached = _shares_memo.get(names)
    if cached is not None:
        return cached
    counts = dict.fromkeys(names, 0)
    for i in range(_SHARE_SAMPLES):
        owner = placement.owner(hashlib.sha256(b"sample-%d" % i).hexdigest())
        if owner is not None:
            counts[owner.name] += 1
    shares = {name: count / _SHARE_SAMPLES for name, count in counts.items()}
    if len(_shares_memo) > 64:
        _shares_memo.clear()
    _shares_memo[names] = shares
    return shares
