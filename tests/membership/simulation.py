"""A deterministic in-memory network of SwimNodes, all driven by one :class:`Clock`.

Links can lose packets (seeded), delay them, and be cut by partitions; a node can
crash, restart, be paused (its timers and its inbox freeze, like a stopped
process) or be slow (its packets are handled late). Push-pull is a direct call
of both sides' ``local_state``/``merge_remote_state``, as the TCP shell would do.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.error import AlreadyCalled, AlreadyCancelled
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import implementer

from imgproxy.membership.messages import Message, NodeState, Ping
from imgproxy.membership.profiles import Profile
from imgproxy.membership.state import MemberEvent, SwimNode

Address = tuple[str, int]
LOOPBACK = bytes([127, 0, 0, 1])


_PENDING, _FROZEN, _CALLED, _CANCELLED = range(4)


@implementer(IDelayedCall)
class _Call:
    """A pending call of :class:`Clock`; ``owner`` is the node clock it belongs to, if any."""

    __slots__ = ("clock", "func", "owner", "state", "time")

    def __init__(
        self, clock: Clock, time: float, func: Callable[[], Any], owner: NodeClock | None
    ) -> None:
        self.clock = clock
        self.time = time
        self.func = func
        self.owner = owner
        self.state = _PENDING

    def getTime(self) -> float:
        return self.time

    def active(self) -> bool:
        return self.state in (_PENDING, _FROZEN)

    def cancel(self) -> None:
        if self.state == _CANCELLED:
            raise AlreadyCancelled()
        if self.state == _CALLED:
            raise AlreadyCalled()
        self.state = _CANCELLED

    def reset(self, secondsFromNow: float) -> None:
        if self.state == _CANCELLED:
            raise AlreadyCancelled()
        if self.state == _CALLED:
            raise AlreadyCalled()
        if self.state == _PENDING:
            # The old heap entry goes stale: its time no longer matches.
            self.time = self.clock.rightNow + secondsFromNow
            self.clock._push(self)

    def delay(self, secondsLater: float) -> None:
        self.reset(self.time + secondsLater - self.clock.rightNow)

    def run(self) -> None:
        if self.state in (_PENDING, _FROZEN):
            self.state = _CALLED
            self.func()


@implementer(IReactorTime)
class Clock:
    """A deterministic clock like ``twisted.internet.task.Clock``, on a heap.

    Twisted's re-sorts every pending call after each call it runs, which a hundred
    gossiping nodes cannot afford.
    """

    def __init__(self) -> None:
        self.rightNow = 0.0
        self._heap: list[tuple[float, int, _Call]] = []
        self._tie = itertools.count()

    def seconds(self) -> float:
        return self.rightNow

    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return self.call_at(self.rightNow + delay, partial(callable, *args, **kw), None)

    def call_at(self, when: float, func: Callable[[], Any], owner: NodeClock | None) -> _Call:
        call = _Call(self, when, func, owner)
        self._push(call)
        return call

    def getDelayedCalls(self) -> Sequence[IDelayedCall]:
        return [c for _, _, c in self._heap if c.state == _PENDING]

    def next_time(self) -> float | None:
        """When the earliest pending call is due, or None."""
        heap = self._heap
        while heap:
            when, _, call = heap[0]
            if call.state != _PENDING or when != call.time:
                heapq.heappop(heap)
            else:
                return when
        return None

    def advance(self, amount: float) -> None:
        """Move time forward by ``amount`` and run every call that has come due."""
        self.rightNow += amount
        while True:
            when = self.next_time()
            if when is None or when > self.rightNow:
                return
            _, _, call = heapq.heappop(self._heap)
            owner = call.owner
            if owner is not None and owner.paused:
                call.state = _FROZEN
                owner.frozen.append(call)
            else:
                call.state = _CALLED
                call.func()

    def _push(self, call: _Call) -> None:
        heapq.heappush(self._heap, (call.time, next(self._tie), call))


@implementer(IReactorTime)
class NodeClock:
    """One node's view of time: the shared clock, unless the node is paused."""

    def __init__(self, shared: Clock) -> None:
        self.shared = shared
        self.paused = False
        self.frozen: list[_Call] = []
        #: A lagging event loop runs every timer this much late.
        self.lag = 0.0

    def seconds(self) -> float:
        return self.shared.rightNow

    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        func = partial(callable, *args, **kw) if args or kw else callable
        return self.shared.call_at(self.shared.rightNow + delay + self.lag, func, self)

    def getDelayedCalls(self) -> list[IDelayedCall]:
        return []

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        """Run, in time order, everything that came due while paused."""
        self.paused = False
        frozen, self.frozen = sorted(self.frozen, key=lambda c: c.time), []
        for call in frozen:
            call.run()


@attrs.frozen
class Observation:
    """One membership event seen by one node, with the time it was seen."""

    time: float
    observer: str
    kind: str
    member: str
    incarnation: int


@attrs.define(eq=False)
class SimNode:
    """A node of the simulation and its harness-side state."""

    name: str
    port: int
    swim: SwimNode
    clock: NodeClock
    crashed: bool = False
    #: Extra delay before this node gets to handle an incoming packet.
    delivery_lag: float = 0.0

    @property
    def address(self) -> Address:
        return ("127.0.0.1", self.port)


class Simulation:
    """N SwimNodes over an in-memory network, driven by one :class:`Clock`."""

    def __init__(
        self,
        profile: Profile,
        seed: int = 0,
        latency: float = 0.001,
        jitter: float = 0.001,
        loss: float = 0.0,
    ) -> None:
        self.profile = profile
        self.clock = Clock()
        self.rng = random.Random(seed)
        self.latency = latency
        self.jitter = jitter
        self.loss = loss
        #: Loss and extra delay of one direction of one link, by (sender, receiver) name.
        self.link_loss: dict[tuple[str, str], float] = {}
        self.link_delay: dict[tuple[str, str], float] = {}
        self.nodes: dict[str, SimNode] = {}
        self.by_address: dict[Address, SimNode] = {}
        self.partition_of: dict[str, int] = {}
        self.observations: list[Observation] = []
        self.packets_sent = 0
        #: Whether probes may fall back to a ping over (lossless) TCP, as memberlist's do.
        self.tcp_pings = True
        self.packets_dropped = 0
        self._next_port = 20000

    # -- building the cluster ---------------------------------------------------------

    def add_node(self, name: str, port: int | None = None, start: bool = True) -> SwimNode:
        """Create (or replace, as a fresh process) node ``name`` and start it."""
        old = self.nodes.get(name)
        if old is not None:
            self.crash(name)
        if port is None:
            port = self._next_port
            self._next_port += 1
        clock = NodeClock(self.clock)
        holder: list[SimNode] = []
        swim = SwimNode(
            name=name,
            addr=LOOPBACK,
            port=port,
            meta=b"",
            profile=self.profile,
            clock=clock,
            send=lambda addr, msgs: self._send(holder[0], addr, msgs),
            on_event=lambda ev: self._observe(holder[0], ev),
            request_push_pull=lambda addr, join: self._push_pull(holder[0], addr, join),
            rng=random.Random(self.rng.getrandbits(64)),
            tcp_ping=lambda addr, ping, timeout: self._tcp_ping(holder[0], addr, ping, timeout),
        )
        node = SimNode(name, port, swim, clock)
        holder.append(node)
        self.nodes[name] = node
        self.by_address[node.address] = node
        if start:
            swim.start()
        return swim

    def add_nodes(self, count: int, prefix: str = "node") -> list[str]:
        """Add ``count`` started nodes; returns their names."""
        names = [f"{prefix}{i}" for i in range(len(self.nodes), len(self.nodes) + count)]
        for name in names:
            self.add_node(name)
        return names

    def join(self, name: str, seeds: list[str]) -> None:
        """Node ``name`` joins through the named seeds."""
        self.nodes[name].swim.join([self.nodes[s].address for s in seeds])

    def join_all(self, names: list[str], seed: str) -> None:
        """Every node of ``names`` but ``seed`` joins through ``seed``."""
        for name in names:
            if name != seed:
                self.join(name, [seed])

    # -- faults -----------------------------------------------------------------------

    def crash(self, name: str) -> None:
        """Kill ``name``: no more timers, packets to it vanish."""
        node = self.nodes[name]
        node.crashed = True
        node.swim.stop()
        if self.by_address.get(node.address) is node:
            del self.by_address[node.address]

    def restart(self, name: str, port: int | None = None) -> SwimNode:
        """Crash ``name`` and start a fresh process of the same name (incarnation from 0)."""
        return self.add_node(name, port=self.nodes[name].port if port is None else port)

    def pause(self, name: str) -> None:
        """Freeze ``name``'s timers and inbox (SIGSTOP)."""
        self.nodes[name].clock.pause()

    def resume(self, name: str) -> None:
        """Thaw ``name``: what came due while paused runs now, in order."""
        self.nodes[name].clock.resume()

    def set_slow(self, name: str, delivery_lag: float, timer_lag: float = 0.0) -> None:
        """``name`` handles every incoming packet ``delivery_lag`` seconds late and runs
        every timer ``timer_lag`` seconds late."""
        self.nodes[name].delivery_lag = delivery_lag
        self.nodes[name].clock.lag = timer_lag

    def partition(self, *groups: list[str]) -> None:
        """Only members of the same group can talk; nodes in no group talk to no one."""
        self.partition_of = {name: i for i, group in enumerate(groups) for name in group}

    def heal(self) -> None:
        """Remove every partition."""
        self.partition_of = {}

    # -- running ----------------------------------------------------------------------

    def now(self) -> float:
        return self.clock.seconds()

    def run(self, duration: float) -> None:
        """Advance the shared clock by ``duration``, each call at its own time."""
        self.run_to(self.clock.seconds() + duration)

    def run_to(self, target: float) -> None:
        while True:
            when = self.clock.next_time()
            if when is None or when > target:
                break
            self.clock.advance(max(0.0, when - self.clock.seconds()))
        self.clock.advance(max(0.0, target - self.clock.seconds()))

    def run_until(
        self, predicate: Callable[[], bool], timeout: float, poll: float = 0.1
    ) -> float | None:
        """Run until ``predicate()`` holds; the time it took, or None after ``timeout``."""
        start = self.now()
        while True:
            if predicate():
                return self.now() - start
            if self.now() - start >= timeout:
                return None
            self.run(poll)

    # -- looking at the cluster -------------------------------------------------------

    def live_names(self) -> list[str]:
        return [n for n, node in self.nodes.items() if not node.crashed]

    def view(self, observer: str) -> dict[str, NodeState]:
        """``observer``'s opinion of every member it knows."""
        return {m.name: m.state for m in self.nodes[observer].swim.members()}

    def state_of(self, observer: str, member: str) -> NodeState | None:
        m = self.nodes[observer].swim.member(member)
        return None if m is None else m.state

    def all_see(self, observers: list[str], members: list[str], state: NodeState) -> bool:
        """Every observer holds every member in ``state``."""
        return all(self.state_of(o, m) == state for o in observers for m in members)

    def alive_count(self, observer: str) -> int:
        return sum(1 for s in self.view(observer).values() if s == NodeState.ALIVE)

    def events(self, kind: str | None = None, member: str | None = None) -> list[Observation]:
        return [
            o
            for o in self.observations
            if (kind is None or o.kind == kind) and (member is None or o.member == member)
        ]

    # -- the network ------------------------------------------------------------------

    def _observe(self, node: SimNode, event: MemberEvent) -> None:
        self.observations.append(
            Observation(
                self.now(), node.name, event.kind, event.member.name, event.member.incarnation
            )
        )

    def _can_talk(self, a: str, b: str) -> bool:
        if not self.partition_of:
            return True
        pa, pb = self.partition_of.get(a), self.partition_of.get(b)
        return pa is not None and pa == pb

    def _send(self, sender: SimNode, addr: Address, messages: list[Message]) -> None:
        if sender.crashed:
            return
        self.packets_sent += 1
        target = self.by_address.get(addr)
        if target is None or not self._can_talk(sender.name, target.name):
            self.packets_dropped += 1
            return
        loss = self.link_loss.get((sender.name, target.name), self.loss)
        if loss and self.rng.random() < loss:
            self.packets_dropped += 1
            return
        delay = self.latency + self.rng.random() * self.jitter + target.delivery_lag
        delay += self.link_delay.get((sender.name, target.name), 0.0)
        packet = list(messages)
        from_addr = sender.address

        def deliver() -> None:
            if not target.crashed:
                target.swim.handle_packet(packet, from_addr)

        # Through the receiver's clock, so a paused receiver holds it in its inbox.
        self.clock.call_at(self.clock.rightNow + delay, deliver, target.clock)

    def _reachable_over_tcp(self, initiator: SimNode, peer: SimNode | None) -> bool:
        return (
            not initiator.crashed
            and peer is not None
            and not peer.crashed
            and not peer.clock.paused
            and not initiator.clock.paused
            and self._can_talk(initiator.name, peer.name)
        )

    def _tcp_ping(
        self, initiator: SimNode, addr: Address, ping: Ping, timeout: float
    ) -> Deferred[bool]:
        """A ping over TCP: not lost, but slow nodes answer late and dead ones never."""
        result: Deferred[bool] = Deferred()
        peer = self.by_address.get(addr)
        # Both ends handle the exchange as late as their event loops lag.
        rtt = 2 * self.latency + initiator.delivery_lag
        rtt += peer.delivery_lag if peer is not None else 0.0

        def answer() -> None:
            if result.called:
                return
            ack = peer.swim.answer_stream_ping(ping) if peer is not None else None
            result.callback(ack is not None and ack.seq_no == ping.seq_no)

        def give_up() -> None:
            if not result.called:
                result.callback(False)

        if self.tcp_pings and rtt < timeout and self._reachable_over_tcp(initiator, peer):
            self.clock.callLater(rtt, answer)
        self.clock.callLater(timeout, give_up)
        return result

    def _push_pull(self, initiator: SimNode, addr: Address, join: bool) -> None:
        def exchange() -> None:
            peer = self.by_address.get(addr)
            if peer is None or not self._reachable_over_tcp(initiator, peer):
                return
            ours = initiator.swim.local_state(join)
            theirs = peer.swim.local_state(join)
            peer.swim.merge_remote_state(ours)
            initiator.swim.merge_remote_state(theirs)

        self.clock.callLater(2 * self.latency, exchange)


def crash_detection(sim: Simulation, victim: str, timeout: float) -> list[float]:
    """Crash ``victim``; seconds until each survivor declared it dead (survivors that
    did not within ``timeout`` are missing from the list)."""
    survivors = [n for n in sim.live_names() if n != victim]
    crashed_at = sim.now()
    sim.crash(victim)
    sim.run_until(lambda: sim.all_see(survivors, [victim], NodeState.DEAD), timeout)
    return sorted(
        o.time - crashed_at
        for o in sim.events("failed", victim)
        if o.time >= crashed_at and o.observer in survivors
    )


def detection_table(sizes: tuple[int, ...] = (3, 5, 10), seeds: int = 10) -> str:
    """Crash-detection times (mean and max over all survivors and seeds) per profile and size."""
    from imgproxy.membership.profiles import LAN, LOCAL

    lines = ["profile  n  first(mean)  all(mean)  all(max)  [seconds from crash to dead]"]
    for profile in (LAN, LOCAL):
        for n in sizes:
            firsts, lasts = [], []
            for seed in range(seeds):
                sim = Simulation(profile, seed=seed)
                names = sim.add_nodes(n)
                sim.join_all(names, names[0])
                sim.run_until(partial(sim.all_see, names, names, NodeState.ALIVE), 60)
                sim.run(5 + sim.rng.random() * 5)
                times = crash_detection(sim, names[sim.rng.randrange(n)], timeout=300)
                firsts.append(times[0])
                lasts.append(times[-1])
            lines.append(
                f"{profile.name:7} {n:2} {sum(firsts) / seeds:11.2f} "
                f"{sum(lasts) / seeds:10.2f} {max(lasts):9.2f}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Crash-detection times in the simulation.")
    parser.add_argument("--seeds", type=int, default=10, help="crashes per profile and size")
    parser.add_argument("--sizes", default="3,5,10", help="cluster sizes, comma-separated")
    arguments = parser.parse_args()
    sizes = tuple(int(size) for size in arguments.sizes.split(","))
    print(detection_table(sizes, arguments.seeds))
