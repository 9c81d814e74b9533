"""Scale-out handoff: a key's new owner reads the previous owner's copy before the origin."""

from __future__ import annotations

from collections.abc import Iterable

from twisted.internet.defer import inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from imgproxy.cluster import ClusterView
from imgproxy.errors import ProxyError
from imgproxy.gateway.client import WorkerClient, WorkerUnavailable
from imgproxy.params import TransformSpec, source_key_of

# A peer that holds the key answers from its cache in milliseconds; one that does
# not answer within this is not worth more of the request's time than the origin.
HANDOFF_TIMEOUT = 1.0
#: How long a peer that a gateway holds out is not read from. Gateways name it on
#: every request they send while they hold it out; this only has to outlast the
#: gaps between those requests and the time their purges take to reach it.
AVOID_SECONDS = 30.0
#: Names remembered at most (a cluster without a secret lets anyone send them).
MAX_AVOIDED = 1024


class PeerHandoff:
    """Asks the other workers that may hold a key (its owner now and before) for it.

    Stale copies are accepted: the bytes of a source or variant do not go bad
    with age, and the new owner stores them with a fresh creation time only
    for the variant it was asked for. Purged ones are not: a worker that was
    away when a source was purged still holds it until a gateway has replayed
    the purge, and the gateways name such workers (``avoid``) meanwhile.
    """

    _log = Logger()

    def __init__(self, view: ClusterView, client: WorkerClient, clock: IReactorTime) -> None:
        self._view = view
        self._client = client
        self._clock = clock
        self._avoided: dict[str, float] = {}

    def avoid(self, names: Iterable[str]) -> None:
        now = self._clock.seconds()
        for name in names:
            if name not in self._avoided and len(self._avoided) >= MAX_AVOIDED:
                self._forget_expired(now)
                if len(self._avoided) >= MAX_AVOIDED:
                    continue
            self._avoided[name] = now

    def _forget_expired(self, now: float) -> None:
        for name, since in list(self._avoided.items()):
            if now - since > AVOID_SECONDS:
                del self._avoided[name]

    def _avoiding(self, name: str) -> bool:
        since = self._avoided.get(name)
        if since is None:
            return False
        if self._clock.seconds() - since > AVOID_SECONDS:
            del self._avoided[name]
            return False
        return True

    @inlineCallbacks
    def find(self, spec: TransformSpec | None, url: str):  # type: ignore[no-untyped-def]
        for worker in self._view.handoff_candidates(source_key_of(url)):
            if self._avoided and self._avoiding(worker.name):
                continue
            try:
                if spec is not None:
                    entry = yield self._client.lookup(
                        worker, spec, stale_ok=True, timeout=HANDOFF_TIMEOUT
                    )
                else:
                    entry = yield self._client.lookup_source(worker, url, timeout=HANDOFF_TIMEOUT)
            except (WorkerUnavailable, ProxyError) as error:
                self._log.debug(
                    "handoff from {worker} failed: {error}", worker=worker.name, error=error
                )
                continue
            if entry is not None:
                return entry
        return None
