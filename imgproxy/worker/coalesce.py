"""Collapse identical concurrent work: N callers of one key share one result."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure

T = TypeVar("T")


class Coalescer(Generic[T]):
    """Runs ``work()`` once per key at a time; concurrent callers get the same outcome.

    Each caller gets its own Deferred, so one caller cancelling or adding
    callbacks never disturbs the others. The key is forgotten as soon as the
    work ends: later callers start afresh (the cache answers them by then).
    """

    def __init__(self) -> None:
        self._waiting: dict[str, list[Deferred[T]]] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def in_flight(self, key: str) -> bool:
        return key in self._waiting

    def run(self, key: str, work: Callable[[], Any]) -> Deferred[T]:
        mine: Deferred[T] = Deferred()
        waiters = self._waiting.get(key)
        if waiters is not None:
            waiters.append(mine)
            return mine
        waiters = self._waiting[key] = [mine]
        maybeDeferred(work).addBoth(self._finish, key, waiters)
        return mine

    def detach(self, prefix: str) -> int:
        """Let later callers of keys starting with ``prefix`` start afresh; how many.

        The work under way goes on for those already waiting on it: what a purge
        does to work that began before it.
        """
        detached = [key for key in self._waiting if key.startswith(prefix)]
        for key in detached:
            del self._waiting[key]
        return len(detached)

    def _finish(self, outcome: T | Failure, key: str, waiters: list[Deferred[T]]) -> None:
        if self._waiting.get(key) is waiters:
            del self._waiting[key]
        # Returning None: every waiter got the outcome, so a failure is not
        # also logged as unhandled here.
        for waiter in waiters:
            if isinstance(outcome, Failure):
                waiter.errback(outcome)
            else:
                waiter.callback(outcome)
