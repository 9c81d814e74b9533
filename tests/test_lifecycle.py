"""Stopping a node in order: one service after another, and draining in-flight requests."""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from imgproxy.lifecycle import DrainService, LifecycleService, SequentialService


class SlowStop(Service):
    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self._log_list = log
        self.stopping: Deferred | None = None

    def stopService(self) -> Deferred:
        super().stopService()
        self._log_list.append(f"stop {self.name}")
        self.stopping = Deferred()
        return self.stopping


class SequentialServiceTests(SynchronousTestCase):
    def test_children_stop_last_first_each_after_the_previous(self) -> None:
        log: list[str] = []
        root = SequentialService()
        first, second = SlowStop("first", log), SlowStop("second", log)
        first.setServiceParent(root)
        second.setServiceParent(root)
        root.startService()
        done = root.stopService()
        self.assertEqual(log, ["stop second"])
        second.stopping.callback(None)
        self.assertEqual(log, ["stop second", "stop first"])
        self.assertNoResult(done)
        first.stopping.callback(None)
        self.successResultOf(done)

    def test_a_failing_stop_does_not_keep_the_others_running(self) -> None:
        log: list[str] = []
        root = SequentialService()
        first = SlowStop("first", log)
        first.setServiceParent(root)
        LifecycleService("broken", on_stop=lambda: 1 / 0).setServiceParent(root)
        root.startService()
        done = root.stopService()
        self.assertEqual(log, ["stop first"])
        first.stopping.callback(None)
        self.successResultOf(done)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class FakeSite:
    in_flight = 0


class DrainServiceTests(SynchronousTestCase):
    def test_stop_waits_for_in_flight_requests(self) -> None:
        clock, site = Clock(), FakeSite()
        site.in_flight = 2
        drain = DrainService(site, clock, deadline=10.0, poll=0.1)
        drain.startService()
        done = drain.stopService()
        clock.advance(1.0)
        self.assertNoResult(done)
        site.in_flight = 0
        clock.advance(0.1)
        self.successResultOf(done)

    def test_stop_gives_up_at_the_deadline(self) -> None:
        clock, site = Clock(), FakeSite()
        site.in_flight = 1
        drain = DrainService(site, clock, deadline=2.0, poll=0.5)
        drain.startService()
        done = drain.stopService()
        clock.advance(1.5)
        self.assertNoResult(done)
        clock.advance(0.5)
        self.successResultOf(done)
