"""SWIM with Lifeguard as a sans-I/O state machine: memberlist's state.go without sockets.

A :class:`SwimNode` is driven from outside. The shell hands it decoded packets
(:meth:`SwimNode.handle_packet`) and push-pull states (:meth:`SwimNode.local_state`,
:meth:`SwimNode.merge_remote_state`); the node answers through three injected
callables: ``send(addr, messages)`` for one UDP packet (the first message is the
payload, the rest are piggybacked broadcasts that the codec packs into a compound
message), ``request_push_pull(addr, join)`` for one TCP state exchange, and
``on_event(MemberEvent)`` for membership changes. Every timer goes through the
injected ``IReactorTime``; every random choice through the injected ``random.Random``.

What the shell does:

- each datagram: decode, then ``node.handle_packet(messages, (host, port))``;
- ``send``: encode ``messages`` as one packet (compound when more than one); it
  should not raise (errors are logged and the packet is lost, as UDP would);
- ``request_push_pull(addr, join)``: connect, send ``node.local_state(join)``, read the
  peer's state, ``node.merge_remote_state(theirs)``; on failure just log (``join``
  retries are the shell's);
- an incoming push-pull: reply ``node.local_state(theirs.join)``, then merge theirs;
- an incoming ping over TCP: reply ``node.answer_stream_ping(ping)`` when not None;
- optionally ``tcp_ping(addr, ping, timeout)``: memberlist's fallback probe over TCP.

Events include our own ``join`` at :meth:`SwimNode.start` and ``leave`` at
:meth:`SwimNode.leave`. Deviations from memberlist's probe: none; like memberlist
the direct ping waits an unscaled ``probe_timeout``, and Lifeguard stretches the
whole probe (the wait for indirect acks and nacks) to ``(score + 1) * probe_interval``.

Deliberate differences from memberlist (each is a comment where it happens):

- the protocol version check of a push-pull (``verifyProtocol``) is not done;
- dead *and left* members are reaped after ``gossip_to_the_dead_time`` (newer memberlist);
- serf's reconnect (a periodic push-pull with a failed member) lives here, so that a
  healed partition merges without a serf layer above;
- memberlist issue 311: a member we hold dead or left at an incarnation above the
  one it now claims is told so, so that it refutes instead of staying invisible;
  and an accusation of an older incarnation of ourselves makes us gossip our
  current alive again instead of being ignored;
- the verdict "dead" goes, besides the broadcasts, straight to every member we heard
  accuse the dead one, and a suspect about a member we already hold dead or left is
  answered, to the accuser only, with our "dead" (memberlist relies on the broadcasts
  alone, and an accuser that missed them waits out the maximum suspicion timeout).
"""

from __future__ import annotations

import collections
import functools
import ipaddress
import math
import random
from collections.abc import Callable, Sequence
from typing import Literal

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from imgproxy.membership.awareness import Awareness
from imgproxy.membership.broadcast import TransmitLimitedQueue
from imgproxy.membership.messages import (
    AckResp,
    Alive,
    Dead,
    ErrResp,
    IndirectPing,
    Message,
    NackResp,
    NodeState,
    Ping,
    PushNodeState,
    PushPull,
    Suspect,
    UserMsg,
)
from imgproxy.membership.profiles import Profile
from imgproxy.membership.suspicion import (
    SuspicionTimer,
    push_pull_scale,
    suspicion_timeout,
)

Address = tuple[str, int]
EventKind = Literal["join", "update", "leave", "failed"]

#: memberlist's vsn vector: protocol min, max, current; delegate min, max, current.
DEFAULT_VSN: tuple[int, ...] = (1, 5, 2, 0, 0, 0)
#: Bytes a compound message spends on its header and on each part (memberlist's net.go).
COMPOUND_HEADER_OVERHEAD = 2
COMPOUND_OVERHEAD = 2
# Bounds the memory of answered accusations; a flood only costs a few extra answers.
MAX_TRACKED_CORRECTIONS = 1024
#: User messages queued for gossip at most (serf's ``MaxQueueDepth``): the most-sent go.
MAX_USER_BROADCASTS = 4096


@functools.lru_cache(maxsize=4096)
def host_of(addr: bytes) -> str:
    """The printable form of a raw 4- or 16-byte address."""
    return str(ipaddress.ip_address(addr))


def estimate_size(message: Message) -> int:
    """A rough, slightly generous size of ``message`` as memberlist's msgpack encodes it.

    msgpack maps carry the Go field names (about ten bytes each with the value's
    header); strings and bytes add their length.
    """
    size = 1
    for field in attrs.fields(type(message)):
        value = getattr(message, field.name)
        size += 12
        if isinstance(value, bytes | str):
            size += len(value)
        elif isinstance(value, tuple):
            size += len(value)
    return size


def _valid_address(addr: bytes, port: int) -> bool:
    return len(addr) in (4, 16) and 0 <= port <= 0xFFFF


@attrs.frozen
class Member:
    """What this node believes about one member, itself included."""

    name: str
    addr: bytes
    port: int
    meta: bytes
    incarnation: int
    state: NodeState
    #: Clock time of the last change of ``state``.
    state_change: float
    vsn: tuple[int, ...] = DEFAULT_VSN

    @property
    def host(self) -> str:
        """``addr`` as text (``"10.0.0.1"`` or ``"::1"``)."""
        return host_of(self.addr)

    @property
    def address(self) -> Address:
        """Where the member's UDP and TCP listeners are."""
        return (self.host, self.port)

    @property
    def dead_or_left(self) -> bool:
        """True when the member is ``DEAD`` or ``LEFT``."""
        return self.state in (NodeState.DEAD, NodeState.LEFT)


@attrs.frozen
class MemberEvent:
    """A membership change: ``join`` (new or back from dead), ``update`` (metadata),
    ``leave`` (it said goodbye) or ``failed`` (declared dead)."""

    kind: EventKind
    member: Member


@attrs.define
class SwimCounters:
    """Counters of the protocol, for metrics."""

    probes: int = 0
    failed_probes: int = 0
    suspicions: int = 0
    refutations: int = 0
    #: Suspects of members we already buried, answered with our "dead" (see below).
    corrections: int = 0
    messages_in: collections.Counter[str] = attrs.field(factory=collections.Counter)
    messages_out: collections.Counter[str] = attrs.field(factory=collections.Counter)


@attrs.define(eq=False)
class _AckHandler:
    on_ack: Callable[[bytes], None]
    on_nack: Callable[[], None] | None
    reaper: IDelayedCall | None = None


@attrs.define(eq=False)
class _Probe:
    seq_no: int
    target: Member
    awareness_delta: int = 0
    expected_nacks: int = 0
    nacks: int = 0
    done: bool = False
    direct_timer: IDelayedCall | None = None
    deadline: float = 0.0
    tcp_contact: bool = False


class SwimNode:
    """One member of the cluster: member table, failure detector, gossip and push-pull."""

    _log = Logger()

    def __init__(
        self,
        name: str,
        addr: bytes,
        port: int,
        meta: bytes,
        profile: Profile,
        clock: IReactorTime,
        send: Callable[[Address, list[Message]], None],
        on_event: Callable[[MemberEvent], None],
        request_push_pull: Callable[[Address, bool], None],
        rng: random.Random,
        size_of: Callable[[Message], int] = estimate_size,
        packet_overhead: int = 0,
        vsn: tuple[int, ...] = DEFAULT_VSN,
        tcp_ping: Callable[[Address, Ping, float], Deferred[bool]] | None = None,
        on_user_message: Callable[[bytes], None] | None = None,
    ) -> None:
        """``packet_overhead``: bytes the shell adds to each packet (encryption, label).

        ``tcp_ping(addr, ping, timeout)``: memberlist's fallback probe, a ping over a TCP
        stream; fires True if the matching ack came back within ``timeout``. Without
        it, probes are UDP only.

        ``on_user_message(payload)``: a user message that came in a packet (memberlist's
        ``NotifyMsg``); ``queue_user_message`` gossips one.
        """
        self.name = name
        self.profile = profile
        self.counters = SwimCounters()
        self._addr = addr
        self._port = port
        self._meta = meta
        self._vsn = vsn
        self._clock = clock
        self._send = send
        self._on_event = on_event
        self._request_push_pull = request_push_pull
        self._tcp_ping = tcp_ping
        self._on_user_message = on_user_message
        self._rng = rng
        self._size_of = size_of
        self._packet_overhead = packet_overhead

        self._members: dict[str, Member] = {}
        # The probe order: a list of names, shuffled on each pass.
        self._order: list[str] = []
        self._probe_index = 0
        self._seq_no = 0
        self._incarnation = 0
        self._awareness = Awareness(profile.awareness_max_multiplier)
        self._broadcasts = TransmitLimitedQueue(profile.retransmit_mult, self._num_nodes, size_of)
        # User messages go in the room membership news leaves, as memberlist's delegate
        # broadcasts do: they never hold up news of who is alive.
        self._user_broadcasts = TransmitLimitedQueue(
            profile.retransmit_mult, self._num_nodes, size_of
        )
        self._suspicions: dict[str, SuspicionTimer] = {}
        # When we last told an accuser (by accuser and member) that its suspect is dead.
        self._corrections: dict[tuple[str, str], float] = {}
        # Failed members we try to reach again, kept after they are reaped from the table.
        self._failed: dict[str, Member] = {}
        self._ack_handlers: dict[int, _AckHandler] = {}
        self._probe: _Probe | None = None
        self._probe_pending = False
        self._timers: dict[str, IDelayedCall] = {}
        self._other_calls: set[IDelayedCall] = set()
        self._running = False
        self._left = False
        self._leave_waiter: Deferred[bool] | None = None

    # -- public API -------------------------------------------------------------------

    @property
    def health_score(self) -> int:
        """Lifeguard's health score: 0 is healthy, up to ``awareness_max_multiplier - 1``."""
        return self._awareness.score

    @property
    def incarnation(self) -> int:
        """Our own current incarnation number."""
        return self._incarnation

    @property
    def address(self) -> Address:
        """Our advertised ``(host, port)``."""
        return (host_of(self._addr), self._port)

    def start(self) -> None:
        """Announce ourselves alive (incarnation 1 on a fresh node) and start the timers."""
        if self._running:
            return
        self._running = True
        if self.name not in self._members:
            self._set_alive()
        # Random staggers keep members from ticking in lockstep.
        profile = self.profile
        self._schedule("probe", self._rng.random() * profile.probe_interval, self._probe_tick)
        self._schedule("gossip", self._rng.random() * profile.gossip_interval, self._gossip_tick)
        pp = self.profile.push_pull_interval
        if pp > 0:
            self._schedule("push_pull", self._rng.random() * pp, self._push_pull_tick)
        if profile.reconnect_interval > 0:
            self._schedule("reconnect", profile.reconnect_interval, self._reconnect_tick)

    def stop(self) -> None:
        """Cancel every timer; the node stays inert until :meth:`start`."""
        self._running = False
        for call in list(self._timers.values()) + list(self._other_calls):
            if call.active():
                call.cancel()
        self._timers.clear()
        self._other_calls.clear()
        for timer in self._suspicions.values():
            timer.cancel()
        self._suspicions.clear()
        for handler in self._ack_handlers.values():
            if handler.reaper is not None and handler.reaper.active():
                handler.reaper.cancel()
        self._ack_handlers.clear()
        if self._probe is not None and self._probe.direct_timer is not None:
            if self._probe.direct_timer.active():
                self._probe.direct_timer.cancel()
        self._probe = None
        self._probe_pending = False
        # A leave still waiting for its goodbye to go out never will now.
        self._finish_leave(False)

    def join(self, seeds: list[Address]) -> None:
        """Ask the shell for a joining push-pull with every seed address."""
        for addr in seeds:
            self._request_push_pull(addr, True)

    def leave(self, timeout: float = 5.0) -> Deferred[bool]:
        """Broadcast that we are leaving.

        The Deferred fires True once the news has been sent its full number of
        times (or at once when no one else is alive), False after ``timeout``.
        """
        if self._left:
            return Deferred.fromResult(True) if self._leave_waiter is None else self._chain_leave()
        self._left = True
        me = self._members.get(self.name)
        if me is None:
            return Deferred.fromResult(True)
        waiter: Deferred[bool] = Deferred()
        self._leave_waiter = waiter
        self._dead_node(Dead(me.incarnation, self.name, self.name))
        if not self._any_alive():
            self._finish_leave(True)
            return waiter

        def expire() -> None:
            self._finish_leave(False)

        self._call_later(timeout, expire)
        return waiter

    def update_meta(self, meta: bytes) -> None:
        """Change our metadata and gossip it under a new incarnation."""
        me = self._members.get(self.name)
        self._meta = meta
        if me is None:
            return  # not started: start() announces the new metadata
        alive = Alive(self._next_incarnation(), self.name, me.addr, me.port, meta, self._vsn)
        self._alive_node(alive, bootstrap=True)

    def handle_packet(self, messages: list[Message], from_addr: Address) -> None:
        """Process every message of one received UDP packet."""
        for message in messages:
            self.counters.messages_in[type(message).__name__] += 1
            try:
                self._handle(message, from_addr)
            except Exception:
                # One bad message (or a bug) must not cost us the rest of the packet.
                self._log.failure("failed to handle {message!r}", message=message)

    def answer_stream_ping(self, ping: Ping) -> AckResp | None:
        """The ack for a ping that came over TCP, or None if it is for another node."""
        if ping.node and ping.node != self.name:
            return None
        self.counters.messages_in["Ping"] += 1
        return AckResp(ping.seq_no)

    def local_state(self, join: bool) -> PushPull:
        """Our whole member table, for a push-pull exchange."""
        states = tuple(
            PushNodeState(m.name, m.addr, m.port, m.meta, m.incarnation, m.state, m.vsn)
            for m in (self._members[n] for n in self._order)
        )
        return PushPull(join=join, states=states)

    def merge_remote_state(self, remote: PushPull) -> None:
        """Fold a peer's member table into ours (memberlist's ``mergeState``)."""
        for r in remote.states:
            if r.state == NodeState.ALIVE:
                self._alive_node(Alive(r.incarnation, r.name, r.addr, r.port, r.meta, r.vsn))
            elif r.state == NodeState.LEFT:
                self._dead_node(Dead(r.incarnation, r.name, r.name))
            else:
                # A peer's "dead" is only a reason to suspect: we may still hear from it.
                self._suspect_node(Suspect(r.incarnation, r.name, self.name))

    def members(self) -> list[Member]:
        """Every member we know of, ourselves included, in any state."""
        return [self._members[n] for n in self._order]

    def member(self, name: str) -> Member | None:
        """What we know of ``name``, or None."""
        return self._members.get(name)

    # -- timers -----------------------------------------------------------------------

    def _schedule(self, key: str, delay: float, fn: Callable[[], None]) -> None:
        self._timers[key] = self._clock.callLater(delay, fn)

    def _call_later(self, delay: float, fn: Callable[[], None]) -> IDelayedCall:
        def run() -> None:
            self._other_calls.discard(call)
            fn()

        call = self._clock.callLater(delay, run)
        self._other_calls.add(call)
        return call

    def _cancel(self, call: IDelayedCall | None) -> None:
        if call is not None:
            if call.active():
                call.cancel()
            self._other_calls.discard(call)

    def _probe_tick(self) -> None:
        self._schedule("probe", self.profile.probe_interval, self._probe_tick)
        # Like Go's ticker with its one-slot channel: a tick during a probe is kept
        # and runs as soon as that probe ends; further ticks are dropped.
        if self._probe is not None:
            self._probe_pending = True
            return
        self._probe_next()

    def _gossip_tick(self) -> None:
        self._schedule("gossip", self.profile.gossip_interval, self._gossip_tick)
        self._gossip()

    def _push_pull_tick(self) -> None:
        interval = push_pull_scale(self.profile.push_pull_interval, self._num_nodes())
        self._schedule("push_pull", interval, self._push_pull_tick)
        peers = self._random_members(
            1, lambda m: m.name != self.name and m.state == NodeState.ALIVE
        )
        if peers:
            self._request_push_pull(peers[0].address, False)

    def _reconnect_tick(self) -> None:
        """serf's reconnect: a joining push-pull with one random failed member."""
        self._schedule("reconnect", self.profile.reconnect_interval, self._reconnect_tick)
        now = self._clock.seconds()
        for name, m in list(self._failed.items()):
            if now - m.state_change > self.profile.reconnect_timeout:
                del self._failed[name]
        if not self._failed:
            return
        alive = sum(1 for m in self._members.values() if not m.dead_or_left)
        # Throttled like serf: a few failures among many live members are rarely retried.
        if self._rng.random() > len(self._failed) / max(1, alive):
            return
        names = sorted(self._failed)
        target = self._failed[names[self._rng.randrange(len(names))]]
        self._request_push_pull(target.address, True)

    # -- failure detection ------------------------------------------------------------

    def _probe_next(self) -> None:
        checked = 0
        while checked < len(self._order):
            if self._probe_index >= len(self._order):
                self._reset_nodes()
                self._probe_index = 0
                checked += 1
                continue
            member = self._members[self._order[self._probe_index]]
            self._probe_index += 1
            if member.name == self.name or member.dead_or_left:
                checked += 1
                continue
            self._probe_node(member)
            return

    def _reset_nodes(self) -> None:
        """At the end of a probe pass: reap long-dead members and reshuffle."""
        now = self._clock.seconds()
        keep: list[str] = []
        for name in self._order:
            m = self._members[name]
            if (
                name != self.name
                and m.dead_or_left
                and now - m.state_change > self.profile.gossip_to_the_dead_time
            ):
                del self._members[name]
                timer = self._suspicions.pop(name, None)
                if timer is not None:
                    timer.cancel()
            else:
                keep.append(name)
        self._rng.shuffle(keep)
        self._order = keep

    def _probe_node(self, target: Member) -> None:
        self.counters.probes += 1
        interval = self._awareness.scale_timeout(self.profile.probe_interval)
        seq_no = self._next_seq_no()
        probe = _Probe(seq_no, target, deadline=self._clock.seconds() + interval)
        self._probe = probe
        ping = Ping(seq_no, target.name, self._addr, self._port, self.name)

        def on_ack(payload: bytes) -> None:
            self._end_probe(probe, success=True)

        def on_nack() -> None:
            probe.nacks += 1

        self._set_ack_handler(seq_no, on_ack, on_nack, interval, lambda: self._end_probe(probe))
        if target.state == NodeState.ALIVE:
            self._send_msg(target.address, ping)
        else:
            # The buddy system: tell a suspect it is suspected, so it can refute at once.
            self._send_packet(
                target.address, [ping, Suspect(target.incarnation, target.name, self.name)]
            )
        # Until proven otherwise the probe succeeds and our health improves.
        probe.awareness_delta = -1
        probe.direct_timer = self._call_later(
            self.profile.probe_timeout, lambda: self._probe_indirect(probe)
        )

    def _probe_indirect(self, probe: _Probe) -> None:
        if probe.done:
            return
        target = probe.target
        peers = self._random_members(
            self.profile.indirect_checks,
            lambda m: m.name not in (self.name, target.name) and m.state == NodeState.ALIVE,
        )
        for peer in peers:
            # Only peers speaking protocol 4 or later answer with nacks.
            nack = len(peer.vsn) > 1 and peer.vsn[1] >= 4
            if nack:
                probe.expected_nacks += 1
            req = IndirectPing(
                probe.seq_no,
                target.addr,
                target.port,
                target.name,
                nack,
                self._addr,
                self._port,
                self.name,
            )
            self._send_msg(peer.address, req)
        # Also a ping over TCP: a member cut off from UDP but reachable over TCP must
        # not be declared dead (it could still push-pull misinformation otherwise).
        if (
            self._tcp_ping is not None
            and not self.profile.disable_tcp_pings
            and len(target.vsn) > 1
            and target.vsn[1] >= 3
        ):
            ping = Ping(probe.seq_no, target.name, self._addr, self._port, self.name)
            timeout = max(0.0, probe.deadline - self._clock.seconds())

            def contacted(ok: bool) -> None:
                if ok and not probe.done:
                    probe.tcp_contact = True

            def failed(reason: object) -> None:
                self._log.debug("fallback ping of {member} failed", member=target.name)

            maybeDeferred(self._tcp_ping, target.address, ping, timeout).addCallbacks(
                contacted, failed
            )

    def _end_probe(self, probe: _Probe, success: bool = False) -> None:
        if probe.done:
            return
        probe.done = True
        self._cancel(probe.direct_timer)
        if self._probe is probe:
            self._probe = None
        if not success and probe.tcp_contact:
            self._log.warn(
                "reached {member} over TCP but not over UDP: network may be misconfigured",
                member=probe.target.name,
            )
            success = True
        if success:
            self._awareness.apply_delta(probe.awareness_delta)
        else:
            self.counters.failed_probes += 1
            if probe.expected_nacks > 0:
                # Peers that should have nacked but did not point at our own ill health.
                delta = max(0, probe.expected_nacks - probe.nacks)
            else:
                delta = 1
            self._awareness.apply_delta(delta)
            target = probe.target
            self._log.debug("suspect {member} has failed, no acks received", member=target.name)
            self._suspect_node(Suspect(target.incarnation, target.name, self.name))
        if self._probe_pending and self._running:
            self._probe_pending = False
            self._call_later(0, self._resume_probing)

    def _resume_probing(self) -> None:
        if self._probe is None and self._running:
            self._probe_next()

    def _set_ack_handler(
        self,
        seq_no: int,
        on_ack: Callable[[bytes], None],
        on_nack: Callable[[], None] | None,
        timeout: float,
        on_expire: Callable[[], None] | None = None,
    ) -> None:
        handler = _AckHandler(on_ack, on_nack)

        def reap() -> None:
            if self._ack_handlers.get(seq_no) is handler:
                del self._ack_handlers[seq_no]
            if on_expire is not None:
                on_expire()

        handler.reaper = self._call_later(timeout, reap)
        self._ack_handlers[seq_no] = handler

    def _next_seq_no(self) -> int:
        self._seq_no = (self._seq_no + 1) & 0xFFFFFFFF
        return self._seq_no

    def _next_incarnation(self) -> int:
        self._incarnation += 1
        return self._incarnation

    # -- message handling -------------------------------------------------------------

    def _handle(self, message: Message, from_addr: Address) -> None:
        match message:
            case Ping():
                self._handle_ping(message, from_addr)
            case IndirectPing():
                self._handle_indirect_ping(message, from_addr)
            case AckResp():
                handler = self._ack_handlers.pop(message.seq_no, None)
                if handler is not None:
                    self._cancel(handler.reaper)
                    handler.on_ack(message.payload)
            case NackResp():
                handler = self._ack_handlers.get(message.seq_no)
                if handler is not None and handler.on_nack is not None:
                    handler.on_nack()
            case Alive():
                if message.port == 0:
                    # Protocol 1 sent no port: it was the same as ours.
                    message = attrs.evolve(message, port=self._port)
                self._alive_node(message)
            case Suspect():
                self._suspect_node(message)
            case Dead():
                self._dead_node(message)
            case UserMsg():
                if self._on_user_message is not None:
                    self._on_user_message(message.payload)
            case ErrResp() | PushPull():
                pass

    def _reply_address(self, addr: bytes, port: int, from_addr: Address) -> Address:
        if _valid_address(addr, port) and port > 0:
            return (host_of(addr), port)
        return from_addr

    def _handle_ping(self, ping: Ping, from_addr: Address) -> None:
        if ping.node and ping.node != self.name:
            self._log.warn("got ping for unexpected node {node}", node=ping.node)
            return
        to = self._reply_address(ping.source_addr, ping.source_port, from_addr)
        extra: list[Message] = []
        pinger = self._members.get(ping.source_node) if ping.source_node else None
        if pinger is not None and pinger.dead_or_left and not self._left:
            # memberlist issue 311: we hold the pinger dead at an incarnation it may not
            # know about (it restarted from 0); tell it, so that it refutes above it.
            extra.append(Suspect(pinger.incarnation, pinger.name, self.name))
        self._send_msg(to, AckResp(ping.seq_no), extra)

    def _handle_indirect_ping(self, ind: IndirectPing, from_addr: Address) -> None:
        # Protocol 1 sent no port: it was the same as ours.
        port = ind.port or self._port
        if not _valid_address(ind.target, port):
            return
        seq_no = self._next_seq_no()
        requester = self._reply_address(ind.source_addr, ind.source_port, from_addr)
        acked = False
        nack_call: IDelayedCall | None = None

        def relay(payload: bytes) -> None:
            nonlocal acked
            acked = True
            self._cancel(nack_call)
            self._send_msg(requester, AckResp(ind.seq_no))

        self._set_ack_handler(seq_no, relay, None, self.profile.probe_timeout)
        ping = Ping(seq_no, ind.node, self._addr, self._port, self.name)
        self._send_msg((host_of(ind.target), port), ping)
        if ind.nack:

            def nack() -> None:
                if not acked:
                    self._send_msg(requester, NackResp(ind.seq_no))

            nack_call = self._call_later(self.profile.probe_timeout, nack)

    # -- the member table -------------------------------------------------------------

    def _set_alive(self) -> None:
        alive = Alive(
            self._next_incarnation(), self.name, self._addr, self._port, self._meta, self._vsn
        )
        self._alive_node(alive, bootstrap=True)

    def _refute(self, me: Member, accused_inc: int) -> Member:
        inc = self._next_incarnation()
        if accused_inc >= inc:
            self._incarnation = inc = accused_inc + 1
        self.counters.refutations += 1
        # Having to refute means others cannot hear us well: count it against our health.
        self._awareness.apply_delta(1)
        me = attrs.evolve(me, incarnation=inc)
        self._members[me.name] = me
        alive = Alive(inc, me.name, me.addr, me.port, me.meta, me.vsn)
        self._broadcasts.queue(me.name, alive)
        return me

    def _alive_node(self, a: Alive, bootstrap: bool = False) -> None:
        if self._left and a.node == self.name:
            return
        if not _valid_address(a.addr, a.port) or not a.node:
            self._log.warn("ignoring alive for {node}: bad address", node=a.node)
            return
        if len(a.vsn) >= 3:
            pmin, pmax = a.vsn[0], a.vsn[1]
            if pmin == 0 or pmax == 0 or pmin > pmax:
                self._log.warn("ignoring alive for {node}: bad protocol versions", node=a.node)
                return
        state = self._members.get(a.node)
        updates_node = False
        now = self._clock.seconds()
        if state is None and a.incarnation == 0:
            # Members start at incarnation 1: this is no news (memberlist would keep a
            # phantom dead entry for it).
            return
        if state is None:
            state = Member(a.node, a.addr, a.port, a.meta, 0, NodeState.DEAD, now, a.vsn)
            self._members[a.node] = state
            # A random place in the probe order keeps the detection bound low on average.
            n = len(self._order)
            offset = self._rng.randrange(n) if n else 0
            self._order.append(a.node)
            self._order[offset], self._order[n] = self._order[n], self._order[offset]
        elif state.addr != a.addr or state.port != a.port:
            reclaim = self.profile.dead_node_reclaim_time
            can_reclaim = reclaim > 0 and now - state.state_change > reclaim
            if state.state == NodeState.LEFT or (state.state == NodeState.DEAD and can_reclaim):
                self._log.info("updating address of left or failed member {node}", node=state.name)
                updates_node = True
            elif state.name == self.name:
                # Two nodes given one name (the host name, by default): neither sees
                # the other, and nothing else would say why.
                self._log.error(
                    "another member, at {theirs}, has this node's name {node}: the cluster "
                    "cannot tell them apart; give each node its own name",
                    node=state.name,
                    theirs=(host_of(a.addr), a.port),
                )
                return
            else:
                self._log.warn(
                    "conflicting address for {node}: ours {ours}, theirs {theirs}",
                    node=state.name,
                    ours=(state.host, state.port),
                    theirs=(host_of(a.addr), a.port),
                )
                return

        is_local = state.name == self.name
        if not is_local and not updates_node and a.incarnation <= state.incarnation:
            if state.dead_or_left and a.incarnation < state.incarnation and not bootstrap:
                # memberlist issue 311: the member restarted from a low incarnation and
                # will never outbid our "dead" unless someone tells it. Suspect (not dead)
                # so the others wait for its refutation instead of flapping it to dead.
                self._broadcasts.queue(
                    state.name, Suspect(state.incarnation, state.name, self.name)
                )
            return
        if is_local and a.incarnation < state.incarnation:
            return

        self._clear_suspicion(a.node)
        old_state, old_meta = state.state, state.meta
        if not bootstrap and is_local:
            # Same incarnation and same content: our own news coming back; else a
            # stale or conflicting claim about us, which we outbid.
            if (
                a.incarnation == state.incarnation
                and a.meta == state.meta
                and tuple(a.vsn) == tuple(state.vsn)
            ):
                return
            self._log.warn("refuting an alive message for ourselves")
            state = self._refute(state, a.incarnation)
        else:
            self._broadcasts.queue(a.node, a)
            if is_local:
                self._incarnation = max(self._incarnation, a.incarnation)
            state = attrs.evolve(
                state,
                incarnation=a.incarnation,
                meta=a.meta,
                addr=a.addr,
                port=a.port,
                vsn=tuple(a.vsn) if a.vsn else state.vsn,
            )
            if state.state != NodeState.ALIVE:
                state = attrs.evolve(state, state=NodeState.ALIVE, state_change=now)
            self._members[a.node] = state

        self._failed.pop(a.node, None)
        if old_state in (NodeState.DEAD, NodeState.LEFT):
            self._emit("join", state)
        elif old_meta != state.meta:
            self._emit("update", state)

    def _suspect_node(self, s: Suspect) -> None:
        state = self._members.get(s.node)
        if state is None:
            return
        if s.incarnation < state.incarnation:
            self._restate_if_self(state)
            return
        timer = self._suspicions.get(s.node)
        if timer is not None:
            # A new, independent accuser shortens the countdown and is worth re-gossiping.
            if timer.confirm(s.from_node):
                self._broadcasts.queue(s.node, s)
            return
        if state.state != NodeState.ALIVE:
            if state.dead_or_left:
                self._correct_stale_accuser(s, state)
            return
        if state.name == self.name:
            self._log.warn("refuting a suspect message from {node}", node=s.from_node)
            self._refute(state, s.incarnation)
            return
        self._broadcasts.queue(s.node, s)
        self.counters.suspicions += 1
        change_time = self._clock.seconds()
        state = attrs.evolve(
            state, incarnation=s.incarnation, state=NodeState.SUSPECT, state_change=change_time
        )
        self._members[s.node] = state

        # Aim to hit the nominal timeout two probe intervals short of the multiplier.
        k = self.profile.suspicion_mult - 2
        n = self._num_nodes()
        # Without enough other members to confirm (ourselves and the suspect aside),
        # expect no confirmations.
        if n - 2 < k:
            k = 0
        min_timeout = suspicion_timeout(self.profile.suspicion_mult, n, self.profile.probe_interval)
        max_timeout = self.profile.suspicion_max_timeout_mult * min_timeout
        name = s.node

        def timed_out(confirmations: int) -> None:
            current = self._members.get(name)
            if self._suspicions.get(name) is timer_ref[0]:
                del self._suspicions[name]
            if (
                current is not None
                and current.state == NodeState.SUSPECT
                and current.state_change == change_time
            ):
                self._log.info(
                    "marking {member} as failed, suspect timeout reached "
                    "({confirmations} peer confirmations)",
                    member=name,
                    confirmations=confirmations,
                )
                self._dead_node(
                    Dead(current.incarnation, name, self.name), timer_ref[0].accusers
                )

        timer_ref: list[SuspicionTimer] = []
        timer_ref.append(
            SuspicionTimer(s.from_node, k, min_timeout, max_timeout, self._clock, timed_out)
        )
        self._suspicions[name] = timer_ref[0]

    def _dead_node(self, d: Dead, accusers: frozenset[str] = frozenset()) -> None:
        state = self._members.get(d.node)
        if state is None:
            return
        if d.incarnation < state.incarnation:
            self._restate_if_self(state)
            return
        accusers = accusers | self._clear_suspicion(d.node)
        if state.dead_or_left:
            return
        if state.name == self.name:
            if not self._left:
                self._log.warn("refuting a dead message from {node}", node=d.from_node)
                self._refute(state, d.incarnation)
                return
            self._broadcasts.queue(d.node, d, lambda: self._finish_leave(True))
        else:
            self._broadcasts.queue(d.node, d)
        left = d.node == d.from_node
        state = attrs.evolve(
            state,
            incarnation=d.incarnation,
            state=NodeState.LEFT if left else NodeState.DEAD,
            state_change=self._clock.seconds(),
        )
        self._members[d.node] = state
        if left:
            self._failed.pop(d.node, None)
        elif d.node != self.name:
            self._failed[d.node] = state
        self._emit("leave" if left else "failed", state)
        if not left:
            self._tell_accusers(d, accusers)

    def _tell_accusers(self, d: Dead, accusers: frozenset[str]) -> None:
        """Send the verdict straight to each member heard suspecting the dead one.

        Their own countdowns are still running, and in a small cluster the few
        transmissions of "dead" (RetransmitMult x ceil(log10(n + 1)), some of them to
        the dead member itself) can all miss one of them, which then waits out the
        maximum suspicion timeout with nobody left to confirm it. memberlist relies on
        the broadcasts alone; this costs one packet per accuser per death.
        """
        for name in sorted(accusers - {self.name, d.from_node}):
            accuser = self._members.get(name)
            if accuser is not None and not accuser.dead_or_left:
                self._send_msg(accuser.address, d)

    def _correct_stale_accuser(self, s: Suspect, state: Member) -> None:
        """Someone suspects a member we already hold dead or left: it missed the news.

        memberlist ignores such a suspect, so an accuser that missed both
        transmissions of "dead" runs its own suspicion to the maximum timeout with no
        one left to confirm it (everybody else stopped suspecting when they buried the
        member): the long tail of detection time. We answer the accuser directly with
        our verdict, at most once per probe interval per member, and only when its
        suspect is not about a newer incarnation than the one we buried.
        """
        if s.incarnation > state.incarnation or s.from_node == self.name:
            return
        accuser = self._members.get(s.from_node)
        if accuser is None or accuser.dead_or_left:
            return
        now = self._clock.seconds()
        key = (s.from_node, s.node)
        if now - self._corrections.get(key, -math.inf) < self.profile.probe_interval:
            return
        if len(self._corrections) >= MAX_TRACKED_CORRECTIONS:
            self._corrections.clear()
        self._corrections[key] = now
        declared_by = state.name if state.state == NodeState.LEFT else self.name
        self.counters.corrections += 1
        self._send_msg(accuser.address, Dead(state.incarnation, state.name, declared_by))

    def _restate_if_self(self, me: Member) -> None:
        """Someone still accuses an older incarnation of us: it missed our news, so
        gossip our current alive again (memberlist stays silent and lets push-pull fix
        it; a member that restarted on a new address then waits for that)."""
        if me.name == self.name and not self._left and me.state == NodeState.ALIVE:
            alive = Alive(me.incarnation, me.name, me.addr, me.port, me.meta, me.vsn)
            self._broadcasts.queue(me.name, alive)

    def _clear_suspicion(self, name: str) -> frozenset[str]:
        """Stop the countdown for ``name``; the members heard accusing it."""
        timer = self._suspicions.pop(name, None)
        if timer is None:
            return frozenset()
        timer.cancel()
        return timer.accusers

    # -- gossip and sending -----------------------------------------------------------

    def _gossip(self) -> None:
        if not len(self._broadcasts) and not len(self._user_broadcasts):
            # Nothing to say: skip choosing peers (memberlist chooses, then says nothing).
            return
        now = self._clock.seconds()

        def wanted(m: Member) -> bool:
            if m.name == self.name:
                return False
            if m.state in (NodeState.ALIVE, NodeState.SUSPECT):
                return True
            if m.state == NodeState.DEAD:
                return now - m.state_change <= self.profile.gossip_to_the_dead_time
            return False

        peers = self._random_members(self.profile.gossip_nodes, wanted)
        budget = self.profile.udp_buffer_size - COMPOUND_HEADER_OVERHEAD - self._packet_overhead
        for peer in peers:
            messages = self._take_broadcasts(budget)
            if not messages:
                return
            self._send_packet(peer.address, messages)

    def _send_msg(self, addr: Address, message: Message, extra: Sequence[Message] = ()) -> None:
        """Send ``message`` (and ``extra``) with as many queued broadcasts as fit."""
        used = self._size_of(message) + sum(self._size_of(m) + COMPOUND_OVERHEAD for m in extra)
        budget = (
            self.profile.udp_buffer_size - used - COMPOUND_HEADER_OVERHEAD - self._packet_overhead
        )
        piggyback = self._take_broadcasts(budget)
        self._send_packet(addr, [message, *extra, *piggyback])

    def _take_broadcasts(self, budget: int) -> list[Message]:
        """Queued membership news that fits in ``budget`` bytes, then user messages."""
        messages = self._broadcasts.get_broadcasts(COMPOUND_OVERHEAD, budget)
        if len(self._user_broadcasts):
            used = sum(self._size_of(m) + COMPOUND_OVERHEAD for m in messages)
            messages += self._user_broadcasts.get_broadcasts(COMPOUND_OVERHEAD, budget - used)
        return messages

    def send_user_message_to_all(self, payload: bytes) -> None:
        """Send ``payload`` at once to every member alive or suspect, one packet each.

        For news too important to leave to gossip alone: a sender that stops right
        after, or the few members random gossip misses, would otherwise learn it
        only at their next push-pull.
        """
        message = UserMsg(payload)
        for member in list(self._members.values()):
            if member.name != self.name and member.state in (NodeState.ALIVE, NodeState.SUSPECT):
                self._send_packet(member.address, [message])

    def queue_user_message(self, payload: bytes) -> None:
        """Gossip ``payload`` as a memberlist user message, a limited number of times."""
        self._user_broadcasts.queue(None, UserMsg(payload))
        self._user_broadcasts.prune(MAX_USER_BROADCASTS)

    def _send_packet(self, addr: Address, messages: list[Message]) -> None:
        for m in messages:
            self.counters.messages_out[type(m).__name__] += 1
        try:
            self._send(addr, messages)
        except Exception:
            self._log.failure("failed to send to {addr}", addr=addr)

    # -- helpers ----------------------------------------------------------------------

    def _num_nodes(self) -> int:
        return len(self._order)

    def _random_members(self, k: int, keep: Callable[[Member], bool]) -> list[Member]:
        """Up to ``k`` distinct random members passing ``keep``.

        A lazy Fisher-Yates shuffle: O(k) random draws in a healthy cluster, and unlike
        memberlist's bounded random draws it never misses an eligible member.
        """
        names = list(self._order)
        n = len(names)
        picked: list[Member] = []
        for i in range(n):
            if len(picked) >= k:
                break
            j = self._rng.randrange(i, n)
            names[i], names[j] = names[j], names[i]
            member = self._members[names[i]]
            if keep(member):
                picked.append(member)
        return picked

    def _any_alive(self) -> bool:
        return any(m.name != self.name and not m.dead_or_left for m in self._members.values())

    def _emit(self, kind: EventKind, member: Member) -> None:
        try:
            self._on_event(MemberEvent(kind, member))
        except Exception:
            self._log.failure("membership event handler failed")

    def _finish_leave(self, sent: bool) -> None:
        waiter, self._leave_waiter = self._leave_waiter, None
        if waiter is not None:
            waiter.callback(sent)

    def _chain_leave(self) -> Deferred[bool]:
        # A second leave() while the first is pending resolves with it.
        first = self._leave_waiter
        assert first is not None
        second: Deferred[bool] = Deferred()

        def relay(result: bool) -> bool:
            second.callback(result)
            return result

        first.addCallback(relay)
        return second
