"""A tiny Service for collaborators that only need a start and a stop call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger


class LifecycleService(Service):
    """Calls ``on_start`` when the service starts and ``on_stop`` when it stops.

    A failing start is logged, not raised: the node keeps serving (a cache
    whose index cannot be rebuilt still serves misses).
    """

    _log = Logger()

    def __init__(
        self,
        name: str,
        on_start: Callable[[], Any] | None = None,
        on_stop: Callable[[], Any] | None = None,
    ) -> None:
        self.name = name
        self._on_start = on_start
        self._on_stop = on_stop

    def startService(self) -> None:
        super().startService()
        if self._on_start is not None:
            maybeDeferred(self._on_start).addErrback(
                lambda f: self._log.failure("starting {name} failed", f, name=self.name)
            )

    def stopService(self) -> Any:
        super().stopService()
        if self._on_stop is not None:
            return maybeDeferred(self._on_stop).addErrback(
                lambda f: self._log.failure("stopping {name} failed", f, name=self.name)
            )
        return None


class SequentialService(MultiService):
    """A MultiService that stops its children one at a time, last added first.

    ``MultiService`` stops them all at once; a node needs order: leave the
    cluster, linger, stop listening, then drain.
    """

    _log = Logger()

    @inlineCallbacks
    def stopService(self):  # type: ignore[no-untyped-def]
        Service.stopService(self)
        for service in reversed(list(self)):
            try:
                yield maybeDeferred(service.stopService)
            except Exception:
                self._log.failure("stopping {service} failed", service=service)


class NodeService(SequentialService):
    """A node's root service: a port it cannot listen on ends the process at once.

    twistd answers such a failure with a traceback, or (for a listener started
    once the reactor runs) not at all: the process then lives on, half started.
    Every listener here listens before the reactor runs, and a refusal becomes a
    one-line reason and exit status 1.
    """

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            if isinstance(e.port, bytes):  # a UNIX socket's path
                address = e.port.decode("utf-8", "replace")
            else:
                address = f"{e.interface or '*'}:{e.port}"
            reason = e.socketError.strerror if isinstance(e.socketError, OSError) else e.socketError
            raise SystemExit(f"imgproxy: cannot listen on {address}: {reason}") from None
        except OSError as e:
            # A UNIX socket in a directory that is not there, or not ours.
            # (For a symlink, as Twisted's socket lock makes, the second name is the path.)
            path = e.filename2 or e.filename
            if isinstance(path, bytes):
                path = path.decode("utf-8", "replace")
            where = f" on {path}" if path else ""
            raise SystemExit(f"imgproxy: cannot listen{where}: {e.strerror or e}") from None


class DrainService(Service):
    """On stop, waits until the site's in-flight requests have finished (or a deadline)."""

    _log = Logger()

    def __init__(self, site: Any, clock: IReactorTime, deadline: float = 10.0,
                 poll: float = 0.05) -> None:
        self.name = "drain"
        self._site = site
        self._clock = clock
        self._deadline = deadline
        self._poll = poll

    def stopService(self) -> Deferred[None]:
        super().stopService()
        done: Deferred[None] = Deferred()
        give_up_at = self._clock.seconds() + self._deadline

        def check() -> None:
            if self._site.in_flight > 0 and self._clock.seconds() < give_up_at:
                self._clock.callLater(self._poll, check)
                return
            if self._site.in_flight > 0:
                self._log.warn("{count} requests still in flight at shutdown",
                               count=self._site.in_flight)
            done.callback(None)

        check()
        return done
