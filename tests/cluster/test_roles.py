"""Gateway and worker roles with real processes (issue 4).

Two gateways (127.0.0.2-3) and three workers (127.0.0.4-6), all on the same
HTTP and gossip ports, in front of a loopback origin on 127.0.0.1 that counts
the fetches of every image. The cluster is shared by the tests of a class and
made whole again before each test (``restore``); each test has its own origin,
whose fresh port makes every image URL a key no node has seen.
"""

from __future__ import annotations

import base64
import json
import signal
import time
from typing import Any
from urllib.parse import quote, urlencode

from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults
from twisted.trial.unittest import SkipTest

from imgproxy.auth import RequestSigner
from imgproxy.membership.profiles import LOCAL
from tests.cluster.helpers import (
    GossipPartition,
    RequestStream,
    SharedClusterTestCase,
    image_path,
    in_thread,
    pause,
    stop_shared_cluster,
    wait_for,
)
from tests.processes import Reply


def tearDownModule() -> None:
    """pytest runs this; under trial the cluster stops when the run exits."""
    stop_shared_cluster(__name__)


class ClusterTestCase(SharedClusterTestCase):
    """A shared 2-gateway, 3-worker cluster and a fresh origin of ``images`` JPEGs a test."""

    images = 60

    # -- helpers

    def get(self, gateway: Any, n: int) -> Deferred[Reply]:
        return in_thread(self.reactor, self.cluster.get, gateway, n)

    async def fetch_all(self, numbers: list[int], gateway: Any) -> list[Reply]:
        """Image ``n`` for every ``n`` through ``gateway``, one request at a time."""
        return [await self.get(gateway, n) for n in numbers]

    async def worker_requests(self, gateway: Any) -> dict[str, float]:
        return await in_thread(self.reactor, self.cluster.worker_requests, gateway)

    def fetches(self, n: int) -> int:
        return self.origin.hits[image_path(n)]

    def stream(self, numbers: list[int], **kwargs: Any) -> RequestStream:
        stream = RequestStream(
            [g.authority for g in self.cluster.gateways],
            [self.cluster.image_query(n) for n in numbers],
            **kwargs,
        )
        self.addCleanup(in_thread, self.reactor, stream.stop)
        return stream.start()


class PlacementTests(ClusterTestCase):
    images = 300

    async def test_every_image_is_served_by_its_owner_whichever_gateway_is_asked(self) -> None:
        g1, g2 = self.cluster.gateways
        numbers = list(range(self.images))
        before = {g.name: await self.worker_requests(g) for g in (g1, g2)}

        # Each gateway sends one request at a time (bounded load never overflows then);
        # the two gateways go at once, in opposite orders, so each image is first asked
        # at one gateway or the other.
        first, second = await gatherResults([
            Deferred.fromCoroutine(self.fetch_all(numbers, g1)),
            Deferred.fromCoroutine(self.fetch_all(numbers[::-1], g2)),
        ])

        self.assertEqual([r.status for r in first + second], [200] * (2 * self.images))
        # Two gets of one image: one fetch from the origin, one copy in one cache.
        self.assertEqual({self.fetches(n) for n in numbers}, {1})
        misplaced = {
            n: self.cluster.holders(n)
            for n in numbers
            if self.cluster.holders(n) != [self.cluster.owner_of(n)]
        }
        self.assertEqual(misplaced, {})
        owned = {w.name: 0 for w in self.cluster.workers}
        for n in numbers:
            owned[self.cluster.owner_of(n)] += 1
        for gateway in (g1, g2):
            after = await self.worker_requests(gateway)
            sent = {w: after.get(w, 0) - before[gateway.name].get(w, 0) for w in owned}
            self.assertEqual(sent, owned, f"requests {gateway.name} sent, by worker")
        # Rendezvous hashing spreads 300 keys over 3 workers: none gets under a sixth.
        self.assertGreater(min(owned.values()), self.images / 6)


class WorkerAuthenticationTests(ClusterTestCase):
    def internal(self, method: str, path: str, body: bytes = b"", **headers: str) -> Any:
        worker = self.cluster.workers[0]
        return in_thread(
            self.reactor, worker.request, path, method, headers=headers, body=body or None
        )

    def signed_headers(
        self, method: bytes, path: bytes, query: bytes, when: float
    ) -> dict[str, str]:
        signer = RequestSigner.from_secret(base64.b64decode(self.cluster.secret))
        signed = signer.sign(method, path, query, b"", when)
        return {name.decode(): value.decode() for name, value in signed.items()}

    async def test_a_request_without_a_valid_signature_is_403(self) -> None:
        query = urlencode([("url", self.cluster.source_url(1))], quote_via=quote)
        path = f"/v1/image?{query}"
        good = self.signed_headers(b"GET", b"/v1/image", query.encode(), time.time())
        forged = dict(good, **{"x-imgproxy-signature": "0" * 64})
        stale = self.signed_headers(b"GET", b"/v1/image", query.encode(), time.time() - 300)
        body = json.dumps({"url": self.cluster.source_url(1)}).encode()

        unsigned = await self.internal("GET", path)
        bad = await self.internal("GET", path, **forged)
        old = await self.internal("GET", path, **stale)
        produce = await self.internal("POST", "/v1/cache", body, **{
            "content-type": "application/json"
        })
        purge = await self.internal("DELETE", f"/v1/cache?{query}")
        authentic = await self.internal("GET", path, **good)

        for reply in (unsigned, bad, old, produce, purge):
            self.assertEqual(reply.status, 403, reply.body)
            self.assertEqual(reply.json()["status"], 403)
        self.assertEqual(self.fetches(1), 0)
        # The same request, signed with the cluster secret, gets through: "not cached".
        self.assertEqual(authentic.status, 404, authentic.body)


class HealthTests(ClusterTestCase):
    async def test_a_gateway_lists_every_worker_with_its_state(self) -> None:
        for gateway in self.cluster.gateways:
            health = await in_thread(self.reactor, gateway.health)

            self.assertEqual((health["name"], health["role"]), (gateway.name, "gateway"))
            workers = {m["name"]: m for m in health["members"] if m["role"] == "worker"}
            self.assertEqual(sorted(workers), ["w1", "w2", "w3"])
            for worker in self.cluster.workers:
                listed = workers[worker.name]
                self.assertEqual(listed["state"], "alive")
                self.assertEqual(listed["address"], worker.interface)
                self.assertEqual(listed["http_port"], worker.port)


class FailoverTests(ClusterTestCase):
    async def test_a_worker_killed_under_load_fails_at_most_a_thousandth_of_requests(
        self,
    ) -> None:
        victim = self.cluster.workers[2]
        stream = self.stream(list(range(self.images)), clients=4)
        await pause(self.reactor, 2.0)
        before = await self.worker_requests(self.cluster.gateways[0])

        victim.kill(signal.SIGKILL)
        await in_thread(self.reactor, victim.wait_exit)
        for gateway in self.cluster.gateways:
            await wait_for(
                self.reactor,
                lambda g=gateway: self.cluster.states(g).get(victim.name) == "failed",
                30, f"{gateway.name} declares {victim.name} failed",
            )
        await pause(self.reactor, 1.0)
        await in_thread(self.reactor, stream.stop)

        self.assertGreater(before.get(victim.name, 0), 0, "the victim was serving")
        self.assertGreater(len(stream.outcomes), 50, stream.summary())
        self.assertLessEqual(
            len(stream.failures), len(stream.outcomes) // 1000, stream.summary()
        )


class ScaleOutTests(ClusterTestCase):
    images = 150

    async def test_a_new_worker_pulls_its_keys_from_their_previous_owners(self) -> None:
        g1, g2 = self.cluster.gateways
        numbers = list(range(self.images))
        warm = await self.fetch_all(numbers, g1)
        self.assertEqual({r.status for r in warm}, {200})
        before = {n: self.cluster.owner_of(n) for n in numbers}

        newcomer = self.cluster.add_worker()
        self.addCleanup(self._remove, newcomer)
        await newcomer.start_async(self.reactor)
        await self.cluster.wait_converged(self.reactor, 30)
        moved = [n for n in numbers if self.cluster.owner_of(n) == newcomer.name]
        again = await self.fetch_all(numbers, g2)

        self.assertEqual({r.status for r in again}, {200})
        # Rendezvous hashing: only keys to the newcomer move, about a quarter of them.
        self.assertEqual(
            [n for n in numbers if self.cluster.owner_of(n) not in (before[n], newcomer.name)],
            [],
        )
        self.assertGreater(len(moved), self.images / 8)
        refetched = [n for n in moved if self.fetches(n) > 1]
        self.assertLessEqual(len(refetched), len(moved) * 0.05, f"{refetched} of {moved}")
        self.assertEqual([n for n in numbers if n not in moved and self.fetches(n) != 1], [])
        self.assertEqual([n for n in moved if newcomer.name not in self.cluster.holders(n)], [])

    async def _remove(self, newcomer: Any) -> None:
        await in_thread(self.reactor, newcomer.stop)
        self.cluster.workers.remove(newcomer)
        await self.cluster.wait_converged(self.reactor, 30)


class GracefulLeaveTests(ClusterTestCase):
    images = 45

    async def test_a_leaving_worker_fails_no_request_and_its_keys_are_pulled(self) -> None:
        g1 = self.cluster.gateways[0]
        leaver = self.cluster.workers[1]
        numbers = list(range(self.images))
        warm = await self.fetch_all(numbers, g1)
        self.assertEqual({r.status for r in warm}, {200})
        its_keys = [n for n in numbers if self.cluster.owner_of(n) == leaver.name]
        stream = self.stream(numbers, clients=2)
        await pause(self.reactor, 1.0)

        leaver.terminate()
        for gateway in self.cluster.gateways:
            await wait_for(
                self.reactor,
                lambda g=gateway: self.cluster.states(g).get(leaver.name, "left") == "left",
                20, f"{gateway.name} sees {leaver.name} leave", interval=0.05,
            )
        # Every key of the leaver asked at once, while it lingers.
        semaphore = DeferredSemaphore(4)
        moved = await gatherResults([
            semaphore.run(self.get, self.cluster.gateways[n % 2], n) for n in its_keys
        ])
        code = await in_thread(self.reactor, leaver.wait_exit)
        await pause(self.reactor, 0.5)
        await in_thread(self.reactor, stream.stop)

        # twistd exits with the signal that stopped it, once shut down in order.
        self.assertEqual(code, -signal.SIGTERM)
        self.assertIn("Server Shut Down.", leaver.log_tail(500))
        self.assertEqual({r.status for r in moved}, {200})
        self.assertEqual(stream.failures, [], stream.summary())
        self.assertGreater(len(its_keys), 5)
        self.assertEqual([n for n in its_keys if self.fetches(n) != 1], [])


class PartitionTests(ClusterTestCase):
    async def test_a_partitioned_worker_is_routed_around_and_rejoins_after_the_heal(
        self,
    ) -> None:
        if not GossipPartition.available():
            raise SkipTest("iptables is not usable here (needs root)")
        isolated = self.cluster.workers[0]
        partition = GossipPartition(isolated.interface, self.cluster.gossip_port)
        self.addCleanup(partition.heal)
        stream = self.stream(list(range(self.images)), clients=2)

        partition.cut()
        cut_at = time.monotonic()
        for gateway in self.cluster.gateways:
            await wait_for(
                self.reactor,
                lambda g=gateway: self.cluster.states(g).get(isolated.name) == "failed",
                30, f"{gateway.name} declares {isolated.name} failed",
            )
        detected = time.monotonic() - cut_at
        sent_before = [await self.worker_requests(g) for g in self.cluster.gateways]
        await pause(self.reactor, 2.0)
        sent_after = [await self.worker_requests(g) for g in self.cluster.gateways]
        partition.heal()
        rejoined = await self.cluster.wait_converged(self.reactor, 60)
        await in_thread(self.reactor, stream.stop)

        for before, after in zip(sent_before, sent_after, strict=True):
            self.assertEqual(after.get(isolated.name, 0), before.get(isolated.name, 0))
            self.assertGreater(sum(after.values()), sum(before.values()))
        self.assertEqual(stream.failures, [], stream.summary())
        print(f"\npartition: detected in {detected:.1f}s, one cluster {rejoined:.1f}s after heal")
        self.assertLessEqual(rejoined, LOCAL.push_pull_interval)
