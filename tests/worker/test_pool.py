"""TransformPool: blocking work on its own threads, a bounded line, 503 beyond it."""

from __future__ import annotations

import threading

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.trial.unittest import TestCase

from imgproxy.errors import ProxyError
from imgproxy.worker.pool import TransformPool


class TransformPoolTests(TestCase):
    def setUp(self) -> None:
        self.pool = TransformPool(reactor, threads=2, max_waiting=3)
        self.pool.startService()
        self.addCleanup(self.pool.stopService)

    @inlineCallbacks
    def test_work_runs_off_the_reactor_thread(self):
        name = yield self.pool.run(lambda: threading.current_thread().name)
        self.assertNotEqual(name, threading.current_thread().name)

    @inlineCallbacks
    def test_beyond_threads_plus_line_is_503_with_retry_after(self):
        gate = threading.Event()
        accepted = [self.pool.run(gate.wait, 10) for _ in range(5)]
        self.assertEqual(self.pool.in_progress, 5)
        refused = self.pool.run(gate.wait, 10)
        error = self.failureResultOf(refused, ProxyError).value
        self.assertEqual((error.status, error.retry_after), (503, 1))
        self.assertEqual(self.pool.refused, 1)
        gate.set()
        yield gatherResults(accepted)
        self.assertEqual(self.pool.in_progress, 0)
        result = yield self.pool.run(lambda: 42)
        self.assertEqual(result, 42)

    @inlineCallbacks
    def test_a_failing_call_frees_its_place(self):
        with self.assertRaises(ZeroDivisionError):
            yield self.pool.run(lambda: 1 / 0)
        self.assertEqual(self.pool.in_progress, 0)


class IdleCallbackTests(TestCase):
    @inlineCallbacks
    def test_on_idle_runs_when_the_last_call_ends(self):
        idle: list[int] = []
        pool = TransformPool(reactor, threads=2, max_waiting=3, on_idle=lambda: idle.append(1))
        pool.startService()
        self.addCleanup(pool.stopService)
        gate = threading.Event()
        first, second = pool.run(gate.wait, 10), pool.run(lambda: None)
        yield second
        self.assertEqual(idle, [])
        gate.set()
        yield first
        self.assertEqual(idle, [1])
