"""Stopping a node in order: one service after another, and draining in-flight requests."""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from imgproxy.lifecycle import DrainService, LifecycleService, NodeService, SequentialService


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


class PortInUse(Service):
    def privilegedStartService(self) -> None:
        raise CannotListenError("127.0.0.1", 7946, OSError(98, "Address already in use"))


class FailingStart(Service):
    def __init__(self, error: Exception) -> None:
        self.error = error

    def privilegedStartService(self) -> None:
        raise self.error


class NodeServiceTests(SynchronousTestCase):
    def exit_reason(self, error: Exception) -> object:
        root = NodeService()
        FailingStart(error).setServiceParent(root)
        with self.assertRaises(SystemExit) as exited:
            root.privilegedStartService()
        return exited.exception.code

    def test_a_unix_socket_is_named_by_its_path(self) -> None:
        in_use = CannotListenError("", b"/run/imgproxy.sock", "Cannot acquire lock")
        self.assertEqual(
            self.exit_reason(in_use),
            "imgproxy: cannot listen on /run/imgproxy.sock: Cannot acquire lock",
        )
        # Twisted's lock beside the socket, in a directory that is not there.
        missing = FileNotFoundError(2, "No such file or directory", "123", None, b"/no/s.lock")
        self.assertEqual(
            self.exit_reason(missing),
            "imgproxy: cannot listen on /no/s.lock: No such file or directory",
        )

    def test_a_port_it_cannot_listen_on_ends_the_process_with_one_line(self) -> None:
        root = NodeService()
        PortInUse().setServiceParent(root)
        with self.assertRaises(SystemExit) as exited:
            root.privilegedStartService()
        reason = "imgproxy: cannot listen on 127.0.0.1:7946: Address already in use"
        self.assertEqual(exited.exception.code, reason)

    def test_it_stops_its_children_in_order_like_any_sequential_service(self) -> None:
        self.assertIsInstance(NodeService(), SequentialService)


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
