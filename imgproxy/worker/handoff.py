"""Scale-out handoff: a key's new owner reads the previous owner's copy before the origin."""

from __future__ import annotations

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger

from imgproxy.cluster import ClusterView
from imgproxy.errors import ProxyError
from imgproxy.gateway.client import WorkerClient, WorkerUnavailable
from imgproxy.params import TransformSpec, source_key_of

# A peer that holds the key answers from its cache in milliseconds; one that does
# not answer within this is not worth more of the request's time than the origin.
HANDOFF_TIMEOUT = 1.0


class PeerHandoff:
    """Asks the other workers that may hold a key (its owner now and before) for it.

    Stale copies are accepted: the bytes of a source or variant do not go bad
    with age, and the new owner stores them with a fresh creation time only
    for the variant it was asked for.
    """

    _log = Logger()

    def __init__(self, view: ClusterView, client: WorkerClient) -> None:
        self._view = view
        self._client = client

    @inlineCallbacks
    def find(self, spec: TransformSpec | None, url: str):  # type: ignore[no-untyped-def]
        for worker in self._view.handoff_candidates(source_key_of(url)):
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
