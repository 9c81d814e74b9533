"""A dedicated thread pool for blocking image work, with a bounded waiting line."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from imgproxy.errors import ProxyError


class TransformPool(Service):
    """Runs blocking calls on its own ``ThreadPool``; refuses work beyond the line.

    The reactor's default pool is shared with DNS resolution, so image work
    never goes there. Beyond ``threads + max_waiting`` calls in progress, new
    work is refused with 503 and ``Retry-After`` instead of queueing memory
    without bound.
    """

    def __init__(
        self,
        reactor: IReactorFromThreads,
        threads: int,
        max_waiting: int,
        on_idle: Callable[[], None] | None = None,
    ) -> None:
        """``on_idle``: called on the reactor thread whenever the last call in progress ends."""
        self._reactor = reactor
        self._on_idle = on_idle
        self.threads = threads
        self.max_waiting = max_waiting
        self.pool = ThreadPool(minthreads=threads, maxthreads=threads, name="imgproxy-transform")
        self.in_progress = 0
        self.refused = 0

    @property
    def waiting(self) -> int:
        """Calls accepted but not yet running on a thread."""
        return max(0, self.in_progress - self.threads)

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()

    def run_in_background(self, function: Callable[[], Any]) -> None:
        """Run ``function`` on a pool thread, outside the waiting line, result ignored."""
        self.pool.callInThread(function)

    def run(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if self.in_progress >= self.threads + self.max_waiting:
            self.refused += 1
            return fail(ProxyError(503, "the server is busy transforming images", retry_after=1))
        self.in_progress += 1
        d = deferToThreadPool(self._reactor, self.pool, function, *args)

        def done(result: Any) -> Any:
            self.in_progress -= 1
            if self.in_progress == 0 and self._on_idle is not None:
                self._on_idle()
            return result

        return d.addBoth(done)
