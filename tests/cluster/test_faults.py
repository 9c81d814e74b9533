"""Faults against a real cluster under a steady request stream (issue 6, the cluster part).

SIGSTOP of a worker, kill -9 and SIGSTOP of a gateway, a worker restarted under
load. (kill -9 of a worker and a gossip partition, with the time to re-converge,
are in ``test_roles``.) The stream's clients stand in for users behind a load
balancer: a request a gateway does not answer at all is sent once more to the
other gateway, and counted as failed only if that fails too.
"""

from __future__ import annotations

import signal
import time
from typing import Any

from twisted.internet.defer import DeferredSemaphore, gatherResults

from tests.cluster.helpers import (
    RequestStream,
    SharedClusterTestCase,
    image_path,
    in_thread,
    pause,
    stop_shared_cluster,
    wait_for,
)


def tearDownModule() -> None:
    """pytest runs this; under trial the cluster stops when the run exits."""
    stop_shared_cluster(__name__)


class FaultTestCase(SharedClusterTestCase):
    images = 40

    async def warm(self, in_flight: int = 4) -> None:
        """Every image once through the first gateway, so the stream is steady (hits).

        With ``in_flight=1`` bounded load never overflows: each image lands on its owner.
        """
        g1 = self.cluster.gateways[0]
        semaphore = DeferredSemaphore(in_flight)
        replies = await gatherResults([
            semaphore.run(in_thread, self.reactor, self.cluster.get, g1, n)
            for n in range(self.images)
        ])
        self.assertEqual({r.status for r in replies}, {200})

    def stream(self, **kwargs: Any) -> RequestStream:
        stream = RequestStream(
            [g.authority for g in self.cluster.gateways],
            [self.cluster.image_query(n) for n in range(self.images)],
            **kwargs,
        )
        self.addCleanup(in_thread, self.reactor, stream.stop)
        return stream.start()

    async def wait_state(self, observers: list[Any], name: str, states: set[str]) -> float:
        """Until every observer lists ``name`` in one of ``states``; the seconds it took."""
        started = time.monotonic()
        for observer in observers:
            await wait_for(
                self.reactor,
                lambda o=observer: self.cluster.states(o).get(name) in states,
                30, f"{observer.name} lists {name} as {'/'.join(sorted(states))}",
            )
        return time.monotonic() - started

    async def worker_requests(self, gateway: Any) -> dict[str, float]:
        return await in_thread(self.reactor, self.cluster.worker_requests, gateway)

    def assert_at_most_a_thousandth_failed(self, stream: RequestStream) -> None:
        self.assertGreater(len(stream.outcomes), 30, stream.summary())
        self.assertLessEqual(len(stream.failures), len(stream.outcomes) // 1000, stream.summary())


class WorkerFaultTests(FaultTestCase):
    async def test_a_stopped_worker_is_routed_around_once_suspected(self) -> None:
        frozen = self.cluster.workers[1]
        gateways = self.cluster.gateways
        await self.warm()
        stream = self.stream(clients=4)
        await pause(self.reactor, 1.0)

        frozen.kill(signal.SIGSTOP)
        self.addCleanup(frozen.kill, signal.SIGCONT)
        await self.wait_state(gateways, frozen.name, {"suspect", "failed"})
        before = [await self.worker_requests(g) for g in gateways]
        # Requests caught by the SIGSTOP take up to two lookup timeouts (the failover's
        # new owner asks the frozen one for its copy too): 4 s covers them.
        await pause(self.reactor, 4.0)
        after = [await self.worker_requests(g) for g in gateways]
        frozen.kill(signal.SIGCONT)
        back = await self.cluster.wait_converged(self.reactor, 30)
        await in_thread(self.reactor, stream.stop)

        for sent_before, sent_after in zip(before, after, strict=True):
            self.assertEqual(sent_after.get(frozen.name, 0), sent_before.get(frozen.name, 0))
            self.assertGreater(sum(sent_after.values()), sum(sent_before.values()))
        self.assert_at_most_a_thousandth_failed(stream)
        print(f"\nSIGSTOP worker: {stream.summary()}; whole again {back:.1f}s after SIGCONT")

    async def test_a_restarted_worker_serves_its_cached_entries_within_seconds(self) -> None:
        g1 = self.cluster.gateways[0]
        restarted = self.cluster.workers[0]
        await self.warm(in_flight=1)
        mine = [n for n in range(self.images) if self.cluster.owner_of(n) == restarted.name]
        stream = self.stream(clients=2)
        await pause(self.reactor, 1.0)

        await restarted.restart_async(self.reactor)
        began = time.monotonic()  # it answers /health: started, its cache scan under way
        await self.cluster.wait_converged(self.reactor, 30)
        fetches_before = {n: self.origin.hits[image_path(n)] for n in mine}

        def served_from_its_cache() -> bool:
            hits = self.cluster.metric(restarted, "imgproxy_image_requests_total")
            return hits.get((("cache", "hit"),), 0) > 0

        await wait_for(self.reactor, served_from_its_cache, 20, "a hit at the restarted worker")
        serving = time.monotonic() - began
        await in_thread(self.reactor, stream.stop)
        # One request at a time: bounded load sends each to its owner.
        replies = [await in_thread(self.reactor, self.cluster.get, g1, n) for n in mine]

        self.assertGreater(len(mine), 3)
        self.assertEqual({r.header("x-cache") for r in replies}, {"HIT"})
        # Its own disk cache answers: the origin is not asked again for its keys.
        self.assertEqual({n: self.origin.hits[image_path(n)] for n in mine}, fetches_before)
        self.assertLess(serving, 15)
        self.assert_at_most_a_thousandth_failed(stream)
        print(f"\nrestarted worker: hits again {serving:.1f}s after it answered /health; "
              f"{stream.summary()}")


class GatewayFaultTests(FaultTestCase):
    async def test_a_killed_gateway_costs_nothing_behind_a_retrying_client(self) -> None:
        g1, g2 = self.cluster.gateways
        await self.warm()
        stream = self.stream(clients=4, retry_other_gateway=True)
        await pause(self.reactor, 1.0)

        g2.kill(signal.SIGKILL)
        await in_thread(self.reactor, g2.wait_exit)
        detected = await self.wait_state([g1, *self.cluster.workers], g2.name, {"failed"})
        await pause(self.reactor, 1.0)
        await in_thread(self.reactor, stream.stop)

        self.assertEqual([o for o in stream.outcomes if o.gateway == g1.authority
                          and o.status != 200], [])
        self.assertGreater(len(stream.retried), 0, "some requests went to the dead gateway")
        self.assertEqual({o.gateway for o in stream.retried}, {g2.authority})
        self.assert_at_most_a_thousandth_failed(stream)
        print(f"\nkill -9 gateway: {len(stream.retried)} requests retried at the other "
              f"gateway; {stream.summary()}; declared failed after {detected:.1f}s")

    async def test_a_stopped_gateway_costs_nothing_behind_a_retrying_client(self) -> None:
        g1, g2 = self.cluster.gateways
        await self.warm()
        stream = self.stream(clients=4, retry_other_gateway=True, timeout=3.0)
        await pause(self.reactor, 1.0)

        g2.kill(signal.SIGSTOP)
        self.addCleanup(g2.kill, signal.SIGCONT)
        await self.wait_state([g1, *self.cluster.workers], g2.name, {"suspect", "failed"})
        # Stopped for longer than the clients' timeout: what it holds is retried.
        await pause(self.reactor, 3.5)
        g2.kill(signal.SIGCONT)
        back = await self.cluster.wait_converged(self.reactor, 30)
        await in_thread(self.reactor, stream.stop)

        self.assertGreater(len(stream.retried), 0, "some requests went to the stopped gateway")
        self.assert_at_most_a_thousandth_failed(stream)
        print(f"\nSIGSTOP gateway: {len(stream.retried)} requests retried at the other "
              f"gateway; {stream.summary()}; whole again {back:.1f}s after SIGCONT")
