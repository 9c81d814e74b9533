"""Purges gossiped by the gateways, applied to this node's cache exactly once.

Every gateway gossips each purge as a serf user event (``PURGE_EVENT``), and every
member keeps the recent ones and hands them over in push-pulls. So a worker that
was down or cut off when a source was purged gets the purge when it is back. To
apply only the purges it missed, and not every recent one again after each
restart, it keeps the event clock it has reached in its cache directory, as
serf's snapshot does.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from twisted.logger import Logger

from imgproxy.cluster import PURGE_EVENT, purged_source_key
from imgproxy.errors import ProxyError
from imgproxy.membership.events import EventLog, UserEvent
from imgproxy.worker.cache import read_small_file, write_small_file

#: The file, in the cache directory, that holds the event clock reached.
EVENT_CLOCK_FILE = "event-clock"


class GossipedPurges:
    """A user event listener that purges what purge events name from the cache."""

    _log = Logger()

    def __init__(
        self,
        purge_source_key: Callable[[str], object],
        events: EventLog,
        cache_dir: str,
        *,
        invalidate_all: Callable[[], None],
    ) -> None:
        """``invalidate_all`` makes every cached entry stale (``DiskCache.invalidate_all``)."""
        self._purge_source_key = purge_source_key
        self._invalidate_all = invalidate_all
        self._events = events
        self._path = os.path.join(cache_dir, EVENT_CLOCK_FILE)
        # Once a purge could not be applied, the clock stays where it was: a restart
        # applies that purge again (and everything after it).
        self._failed = False
        self._saved = 0

    def resume(self) -> None:
        """Skip the events handled before a restart (none after a fresh start)."""
        try:
            clock = int(read_small_file(self._path, 32).strip() or b"0")
        except FileNotFoundError:
            return
        except (OSError, ValueError) as error:
            # Then every recent purge is applied again: a few re-fetches, nothing served stale.
            self._log.warn("cannot read {path} ({error}): recent purges are applied again",
                           path=self._path, error=error)
            return
        if clock > 0:
            self._events.resume(clock)

    def events_lost(self) -> None:
        """Away through more purges than the cluster keeps: which of them concern this
        cache is unknown, so every entry it holds is fetched again before it is served."""
        self._log.warn("this node was away through more purges than the cluster keeps: "
                       "its cached images are fetched again before they are served")
        self._invalidate_all()

    def __call__(self, event: UserEvent) -> None:
        # Every event handled moves the saved clock, other names too: a node that saw
        # only other events for a while must not look, after a restart, as if it had
        # missed them all (and throw its cache away for it).
        if event.name == PURGE_EVENT:
            key = purged_source_key(event.payload)
            if key is None:
                # Debug: anyone who can gossip could otherwise fill the log with these.
                self._log.debug("ignoring a purge event that names no source: {payload!r}",
                                payload=event.payload[:100])
            else:
                try:
                    self._purge_source_key(key)
                except ProxyError as error:
                    # The clock is not saved: after a restart, this purge is applied again.
                    self._log.warn("gossiped purge of {key}: {reason}", key=key,
                                   reason=error.reason)
                    self._failed = True
        if not self._failed:
            self._save(self._events.time)

    def _save(self, clock: int) -> None:
        if clock == self._saved:
            return
        self._saved = clock
        try:
            write_small_file(self._path, b"%d\n" % clock)
        except OSError as error:
            self._log.warn("cannot save the event clock in {path}: {error}",
                           path=self._path, error=error)
