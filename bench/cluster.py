"""Cluster figures with real processes: failover, handoff, re-convergence, load spread.

Run from the checkout (as root for the partition, which uses iptables)::

    .venv/bin/python bench/cluster.py [--images 1000] [--kill-seconds 30] [--kills 3]
        [--out FILE]

Starts 2 gateways and 3 workers (``twistd -n imgproxy``) on 127.0.0.2-6 with the
``local`` membership profile, an origin on 127.0.0.1 (``tests/cluster/helpers.py``),
then measures, in this order on the same cluster:

1. requests per worker: every image once through each gateway (one request at a
   time per gateway), as the gateways' ``imgproxy_gateway_worker_requests_total``;
2. scale-out: a fourth worker joins, every image is asked again; origin fetches
   of the keys that moved to it (the handoff should serve nearly all);
3. kill -9 of a worker under a steady stream of requests, ``--kills`` times (a
   different worker each round, restarted after): failed requests;
4. SIGSTOP of a worker under the stream: failed requests, and the time until the
   gateways stop sending to it;
5. gossip partition of a worker (iptables): time until it is declared failed, and
   time until the cluster is one again after the heal, for a short partition and one
   longer than ``gossip_to_the_dead_time`` (the dead are then reaped, so only serf's
   reconnect can merge the two sides).

Prints a markdown report and writes it to ``--out`` (default bench/results/cluster.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY))

from twisted.internet import task  # noqa: E402
from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults  # noqa: E402

from imgproxy.membership.profiles import LOCAL  # noqa: E402
from tests.cluster.helpers import (  # noqa: E402
    GossipPartition,
    LoopbackCluster,
    RequestStream,
    image_path,
    in_thread,
    pause,
    wait_for,
)


def spread(counts: dict[str, float]) -> str:
    values = [v for v in counts.values()]
    mean = statistics.mean(values) if values else 0
    cells = ", ".join(f"{name} {int(v)}" for name, v in sorted(counts.items()))
    return f"{cells} (busiest/mean {max(values) / mean:.3f})" if mean else cells


class Bench:
    def __init__(self, reactor: Any, options: argparse.Namespace) -> None:
        self.reactor = reactor
        self.options = options
        self.cluster = LoopbackCluster()
        self.lines: list[str] = []

    def say(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    async def fetch_everything(self, per_gateway: int) -> list[int]:
        """Every image through every gateway; ``per_gateway`` requests in flight at each."""
        cluster = self.cluster
        statuses: list[int] = []

        async def one_gateway(gateway: Any, order: list[int]) -> None:
            semaphore = DeferredSemaphore(per_gateway)
            replies = await gatherResults([
                semaphore.run(in_thread, self.reactor, cluster.get, gateway, n) for n in order
            ])
            statuses.extend(r.status for r in replies)

        numbers = list(range(self.options.images))
        await gatherResults([
            Deferred.fromCoroutine(one_gateway(gateway, numbers[::1 if i % 2 == 0 else -1]))
            for i, gateway in enumerate(cluster.gateways)
        ])
        return statuses

    async def sent_per_worker(self) -> dict[str, float]:
        total: Counter[str] = Counter()
        for gateway in self.cluster.gateways:
            total.update(await in_thread(self.reactor, self.cluster.worker_requests, gateway))
        return dict(total)

    def stream(self, clients: int) -> RequestStream:
        return RequestStream(
            [g.authority for g in self.cluster.gateways],
            [self.cluster.image_query(n) for n in range(self.options.images)],
            clients=clients,
        ).start()

    async def run(self) -> None:
        cluster, options = self.cluster, self.options
        began = time.monotonic()
        await cluster.serve_images(self.reactor, options.images)
        await cluster.start(self.reactor, 120)
        self.say("# Cluster figures (real processes on loopback)")
        self.say()
        self.say(f"Command: `.venv/bin/python bench/cluster.py --images {options.images} "
                 f"--kill-seconds {options.kill_seconds:g} --kills {options.kills}`  ")
        self.say(f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
                 f"{platform.node()}, {os.cpu_count()} cores, load average at start "
                 f"{os.getloadavg()[0]:.1f}; 2 gateways, 3 workers, `--membership-profile "
                 f"local` (push-pull interval {LOCAL.push_pull_interval:g} s, probe interval "
                 f"{LOCAL.probe_interval:g} s).")
        self.say(f"Cluster started and converged in {time.monotonic() - began:.1f} s.")
        self.say()
        await self.distribution()
        await self.scale_out()
        await self.kill_under_load()
        await self.stop_under_load()
        await self.partitions()

    async def distribution(self) -> None:
        cluster, images = self.cluster, self.options.images
        before = await self.sent_per_worker()
        statuses = await self.fetch_everything(per_gateway=1)
        after = await self.sent_per_worker()
        sent = {w: after.get(w, 0) - before.get(w, 0) for w in after}
        owned = Counter(cluster.owner_of(n) for n in range(images))
        misplaced = sum(1 for n in range(images) if cluster.holders(n) != [cluster.owner_of(n)])
        self.say("## Requests per worker")
        self.say()
        self.say(f"{images} distinct images, each asked once at each gateway (one request in "
                 f"flight per gateway): {Counter(statuses)[200]} of {len(statuses)} answered 200.")
        self.say()
        self.say(f"- keys owned (rendezvous placement): {spread(dict(owned))}")
        self.say(f"- requests the gateways sent, by worker: {spread(sent)}")
        self.say(f"- images cached anywhere but on their owner: {misplaced}; origin fetches: "
                 f"{sum(cluster.origin.hits.values())} for {images} images")
        self.say()

    async def scale_out(self) -> None:
        cluster, images = self.cluster, self.options.images
        hits_before = {n: cluster.origin.hits[image_path(n)] for n in range(images)}
        newcomer = cluster.add_worker()
        await newcomer.start_async(self.reactor)
        converged = await cluster.wait_converged(self.reactor, 60)
        moved = [n for n in range(images) if cluster.owner_of(n) == newcomer.name]
        statuses = await self.fetch_everything(per_gateway=2)
        refetched = [n for n in moved if cluster.origin.hits[image_path(n)] > hits_before[n]]
        others = [n for n in range(images)
                  if n not in moved and cluster.origin.hits[image_path(n)] > hits_before[n]]
        handoffs = await in_thread(
            self.reactor, cluster.metric, newcomer, "imgproxy_handoffs_total"
        )
        self.say("## Origin fetches for moved keys after adding a worker (target <= 5%)")
        self.say()
        self.say(f"A fourth worker joined (cluster whole {converged:.1f} s after it answered "
                 f"/health); every image asked again at both gateways, two in flight per "
                 f"gateway: {Counter(statuses)[200]} of {len(statuses)} answered 200.")
        self.say()
        self.say(f"- keys moved to the new worker: {len(moved)} of {images} "
                 f"({len(moved) / images:.1%}; the minimum is 1/4)")
        self.say(f"- moved keys fetched from the origin again: **{len(refetched)} "
                 f"({len(refetched) / max(1, len(moved)):.2%})**")
        self.say(f"- keys that did not move fetched again: {len(others)}")
        self.say(f"- the new worker's handoff lookups: "
                 f"{ {dict(k)['result']: int(v) for k, v in handoffs.items()} }")
        self.say()

    async def kill_under_load(self) -> None:
        cluster, seconds, rounds = self.cluster, self.options.kill_seconds, self.options.kills
        self.say("## Failed requests while a worker is killed under load (target <= 0.1%)")
        self.say()
        self.say(f"8 client threads, each sending requests back to back to the two gateways "
                 f"in turn over the {self.options.images} images (4 workers), for "
                 f"{seconds:g} s; `kill -9` of one worker after {seconds / 3:g} s; the worker "
                 f"is then restarted and the cluster made whole before the next round.")
        self.say()
        self.say("| round | killed | requests | failed | p99 | slowest near the kill "
                 "| declared failed after |")
        self.say("| --- | --- | --- | --- | --- | --- | --- |")
        total = failed = 0
        for round_number in range(rounds):
            victim = cluster.workers[1 + round_number % (len(cluster.workers) - 1)]
            stream = self.stream(clients=8)
            await pause(self.reactor, seconds / 3)
            killed_at = time.monotonic()
            victim.kill(signal.SIGKILL)
            await in_thread(self.reactor, victim.wait_exit)
            detected = 0.0
            for gateway in cluster.gateways:
                detected = max(detected, await wait_for(
                    self.reactor,
                    lambda g=gateway, v=victim.name: cluster.states(g).get(v) == "failed",
                    60, "the victim is declared failed",
                ))
            await pause(self.reactor, max(0.0, seconds * 2 / 3 - (time.monotonic() - killed_at)))
            await in_thread(self.reactor, stream.stop)
            around = stream.between(killed_at - 1, killed_at + detected + 1)
            worst = max((o.ended - o.started for o in around), default=0.0)
            latencies = sorted(o.ended - o.started for o in stream.outcomes) or [0.0]
            p99 = latencies[max(0, int(len(latencies) * 0.99) - 1)]
            total += len(stream.outcomes)
            failed += len(stream.failures)
            self.say(f"| {round_number + 1} | {victim.name} | {len(stream.outcomes)} | "
                     f"{len(stream.failures)} | {p99 * 1000:.0f} ms | {worst * 1000:.0f} ms | "
                     f"{detected:.1f} s |")
            for outcome in stream.failures[:5]:
                print(f"failed: {outcome}", flush=True)
            await cluster.restore(self.reactor, 60)
        self.say()
        self.say(f"All rounds: {total} requests, **{failed} failed "
                 f"({failed / max(1, total):.3%})**. \"slowest near the kill\": requests "
                 f"started from 1 s before the kill to 1 s after both gateways listed the "
                 f"worker as failed.")
        self.say()

    async def stop_under_load(self) -> None:
        cluster = self.cluster
        frozen = cluster.workers[2]
        stream = self.stream(clients=8)
        await pause(self.reactor, 3.0)
        stopped_at = time.monotonic()
        frozen.kill(signal.SIGSTOP)
        suspected = 0.0
        for gateway in cluster.gateways:
            suspected = max(suspected, await wait_for(
                self.reactor,
                lambda g=gateway: cluster.states(g).get(frozen.name) in ("suspect", "failed"),
                60, "the frozen worker is suspected",
            ))
        sent_before = await self.sent_per_worker()
        await pause(self.reactor, 3.0)
        sent_after = await self.sent_per_worker()
        frozen.kill(signal.SIGCONT)
        whole = await cluster.wait_converged(self.reactor, 60)
        await in_thread(self.reactor, stream.stop)
        around = stream.between(stopped_at - 1, stopped_at + suspected)
        worst = max((o.ended - o.started for o in around), default=0.0)
        self.say("## SIGSTOP of a worker under load")
        self.say()
        self.say(f"- requests: {len(stream.outcomes)}, failed: **{len(stream.failures)}**; "
                 f"{stream.summary()}")
        self.say(f"- both gateways listed it suspect or failed {suspected:.1f} s after the "
                 f"SIGSTOP; requests sent to it in the 3 s after that: "
                 f"{int(sent_after.get(frozen.name, 0) - sent_before.get(frozen.name, 0))}")
        self.say(f"- slowest request between the SIGSTOP and the suspicion: {worst * 1000:.0f} ms")
        self.say(f"- after SIGCONT, the cluster was whole again in {whole:.1f} s")
        self.say()

    async def partitions(self) -> None:
        cluster = self.cluster
        self.say("## Re-convergence after a gossip partition (target: one push-pull interval, "
                 f"{LOCAL.push_pull_interval:g} s)")
        self.say()
        if not GossipPartition.available():
            self.say("Not measured: iptables is not usable here (run as root).")
            return
        self.say("One worker's gossip (UDP and TCP to and from its gossip port) dropped with "
                 "iptables; HTTP untouched. Times from the cut to both gateways listing it "
                 "failed, and from the heal to every node listing every node alive.")
        self.say()
        self.say("| partition | declared failed after | held for | one cluster again after heal |")
        self.say("| --- | --- | --- | --- |")
        isolated = cluster.workers[0]
        for label, hold in (("short", 0.0), ("long", LOCAL.gossip_to_the_dead_time + 10)):
            partition = GossipPartition(isolated.interface, cluster.gossip_port)
            try:
                partition.cut()
                cut_at = time.monotonic()
                detected = 0.0
                for gateway in cluster.gateways:
                    detected = max(detected, await wait_for(
                        self.reactor,
                        lambda g=gateway: cluster.states(g).get(isolated.name) == "failed",
                        60, "the isolated worker is declared failed",
                    ))
                await pause(self.reactor, hold)
                held = time.monotonic() - cut_at
            finally:
                partition.heal()
            try:
                healed = f"{await cluster.wait_converged(self.reactor, 120):.1f} s"
            except AssertionError:
                healed = "not within 120 s"
            self.say(f"| {label} | {detected:.1f} s | {held:.1f} s | **{healed}** |")
        self.say()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--kill-seconds", type=float, default=30.0)
    parser.add_argument("--kills", type=int, default=3, help="kill -9 rounds")
    parser.add_argument("--out", default=str(REPOSITORY / "bench" / "results" / "cluster.md"))
    options = parser.parse_args()

    async def run(reactor: Any) -> None:
        bench = Bench(reactor, options)
        try:
            await bench.run()
        finally:
            await bench.cluster.stop(reactor)
        Path(options.out).write_text("\n".join(bench.lines) + "\n")

    task.react(lambda reactor: Deferred.fromCoroutine(run(reactor)))


if __name__ == "__main__":
    main()
