"""The Twisted shell around ``SwimNode``: UDP gossip, TCP push-pull, seeds, events.

Thin by design: bytes in are decoded and handed to the pure state machine;
what it wants sent is encoded and written. A bad or hostile datagram or
stream is dropped and counted, and never raises out of the protocol.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IAddress, IResolutionReceiver
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from imgproxy.membership.events import (
    SERF_USER_EVENT_TYPE,
    USER_EVENT_SIZE_LIMIT,
    EventLog,
    UserEvent,
    decode_user_event,
    encode_user_event,
)
from imgproxy.membership.keyring import Keyring
from imgproxy.membership.messages import AckResp, Message, NodeState, Ping, PushPull
from imgproxy.membership.profiles import Profile
from imgproxy.membership.state import Address, Member, MemberEvent, SwimNode
from imgproxy.membership.tags import (
    SerfState,
    decode_serf_state,
    decode_tags,
    encode_serf_state,
    encode_tags,
)
from imgproxy.membership.wire import (
    StreamDecoder,
    WireError,
    decode_message,
    encode_message,
    encode_packet,
    encode_stream,
    unwrap_packet,
)

PROTOCOL_VERSION = 2
CRC_OVERHEAD = 5  # hasCrcMsg byte + CRC32
ENCRYPTION_OVERHEAD = 29  # version byte, 12-byte nonce, 16-byte GCM tag
# Delegate versions as serf advertises them: serf refuses members whose
# delegate range does not include its own protocol version.
DELEGATE_VSN = (2, 5, 4)
JOIN_RETRY_SECONDS = 2.0
#: A node that cannot join says so on its first try and then once a minute.
JOIN_WARN_EVERY = 30
#: Members (not seeds) a node syncs with right after it joined.
JOIN_SYNC_PEERS = 2
LEAVE_TIMEOUT = 5.0
STATE_POLL_SECONDS = 0.25


def state_name(member: Member) -> str:
    return {
        NodeState.ALIVE: "alive",
        NodeState.SUSPECT: "suspect",
        NodeState.DEAD: "failed",
        NodeState.LEFT: "left",
    }[member.state]


class MembershipCounters:
    """Traffic counters of the shell (the node counts protocol events itself)."""

    def __init__(self) -> None:
        self.packets_in = 0
        self.packets_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.dropped = 0
        self.push_pulls = 0
        self.push_pull_failures = 0


class GossipProtocol(DatagramProtocol):
    """UDP: every datagram is decoded and handed to the node; failures are counted."""

    _log = Logger()

    def __init__(self, membership: MembershipService) -> None:
        self._membership = membership

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        membership = self._membership
        if not membership.accepting:
            return  # the node is stopped; the port is closing
        counters = membership.counters
        counters.packets_in += 1
        counters.bytes_in += len(data)
        try:
            parts, truncated = unwrap_packet(data, keyring=membership.keyring)
            # Messages cut off the end of a compound are lost: count them as dropped.
            counters.dropped += truncated
            messages = []
            for part in parts:
                try:
                    messages.append(decode_message(part))
                except WireError:
                    counters.dropped += 1  # one bad message; memberlist skips it too
            if messages:
                membership.node.handle_packet(messages, (addr[0], addr[1]))
        except WireError:
            counters.dropped += 1
        except Exception:
            counters.dropped += 1
            self._log.failure("a datagram from {addr} could not be handled", addr=addr)


class _StreamProtocol(Protocol):
    """One TCP connection of push-pull or a TCP ping, in either direction.

    ``outbound`` is what the dialing side sends (a push-pull or a ping); the
    accepting side has none and answers what it reads. ``finished`` fires with
    the answer (a ``PushPull`` or an ``AckResp``), or None on any failure.
    """

    _log = Logger()

    def __init__(self, membership: MembershipService, outbound: PushPull | Ping | None) -> None:
        self._membership = membership
        self._outbound = outbound
        self._decoder = StreamDecoder(membership.keyring, inbound=outbound is None)
        self.finished: Deferred[Message | None] = Deferred()
        self._done = False

    def connectionMade(self) -> None:
        timeout = self._membership.profile.tcp_timeout
        self._timer = self._membership.reactor.callLater(timeout, self.abort)
        self._membership.streams.add(self)
        if self._outbound is not None:
            self.transport.write(self._encode(self._outbound))

    def _encode(self, message: Message) -> bytes:
        return encode_stream(
            message, keyring=self._membership.keyring, protocol_version=PROTOCOL_VERSION
        )

    def abort(self) -> None:
        """Give up on this exchange (timed out, or the service stops) and drop the connection."""
        self._finish(None)
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        try:
            messages = self._decoder.feed(data)
        except WireError as error:
            self._membership.counters.dropped += 1
            self._log.debug("dropping a stream from {peer}: {error}",
                            peer=self.transport.getPeer(), error=error)
            self._finish(None)
            self.transport.abortConnection()
            return
        for message in messages:
            self._handle(message)

    def _handle(self, message: Message) -> None:
        membership = self._membership
        if isinstance(message, PushPull):
            if self._outbound is None:
                # Accepting side: answer with our state, then fold theirs in.
                self.transport.write(self._encode(membership.local_state(message.join)))
                membership.merge(message)
                self._finish(message)
                self.transport.loseConnection()
            else:
                membership.merge(message)
                self._finish(message)
                self.transport.loseConnection()
        elif isinstance(message, Ping) and self._outbound is None:
            # memberlist's TCP fallback ping: acknowledge it on the stream.
            ack = membership.node.answer_stream_ping(message)
            if ack is not None:
                self.transport.write(self._encode(ack))
            self._finish(None)
            self.transport.loseConnection()
        elif isinstance(message, AckResp) and isinstance(self._outbound, Ping):
            self._finish(message)
            self.transport.loseConnection()
        else:
            self._finish(None)
            self.transport.loseConnection()

    def _finish(self, result: Message | None) -> None:
        if self._done:
            return
        self._done = True
        if self._timer.active():
            self._timer.cancel()
        self._membership.streams.discard(self)
        self.finished.callback(result)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self._done and hasattr(self, "_timer"):
            self._finish(None)


class _InboundFactory(Factory):
    noisy = False

    def __init__(self, membership: MembershipService) -> None:
        self._membership = membership

    def buildProtocol(self, addr: IAddress) -> Protocol | None:
        if not self._membership.accepting:
            return None  # refuses the connection: the node is stopped
        return _StreamProtocol(self._membership, None)


class MembershipService(Service):
    """Runs one ``SwimNode`` on a UDP and a TCP port, and tells listeners who is alive."""

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        name: str,
        bind: str,
        advertise: str,
        port: int,
        tags: dict[str, str],
        profile: Profile,
        keyring: Keyring | None,
        seeds: Iterable[tuple[str, int]] = (),
        rng: random.Random | None = None,
    ) -> None:
        self.reactor = reactor
        self.profile = profile
        self.keyring = keyring
        self.bind = bind
        self.port = port
        self.seeds = tuple(seeds)
        self.counters = MembershipCounters()
        self._tags = dict(tags)
        self._rng = rng or random.Random()
        self._listeners: list[Callable[[MemberEvent], None]] = []
        # Failed or departed members, with when: shown after the table reaps them.
        self._departed: dict[str, tuple[Member, float]] = {}
        self._state_listeners: list[Callable[[], None]] = []
        self._user_event_listeners: list[Callable[[UserEvent], None]] = []
        self._events_lost_listeners: list[Callable[[], None]] = []
        #: serf's user events: their clock and the recent ones, sent in every push-pull.
        self.events = EventLog()
        self._last_states: tuple[tuple[str, NodeState], ...] = ()
        self._state_poll = LoopingCall(self._check_states)
        self._state_poll.clock = reactor
        advertised = ipaddress.ip_address(advertise).packed
        self.node = SwimNode(
            name=name,
            addr=advertised,
            port=port,
            meta=encode_tags(self._tags),
            profile=profile,
            clock=reactor,
            send=self._send,
            on_event=self._on_event,
            request_push_pull=self._request_push_pull,
            rng=self._rng,
            vsn=(1, 5, PROTOCOL_VERSION, *DELEGATE_VSN),
            size_of=lambda message: len(encode_message(message)),
            packet_overhead=CRC_OVERHEAD + (ENCRYPTION_OVERHEAD if keyring else 0),
            tcp_ping=self._tcp_ping,
            on_user_message=self._user_message,
        )
        self._udp: Any = None
        self._tcp: Any = None
        self._joiner: LoopingCall | None = None
        self.joined = False
        self._failed_joins = 0
        #: Whether received packets and streams reach the node (from start until stop).
        self.accepting = False
        #: Open push-pull and TCP-ping connections, both ways; and connections being made.
        self.streams: set[_StreamProtocol] = set()
        self._connecting: set[Deferred[Any]] = set()

    # -- what the rest of the system uses --------------------------------------------

    def on_event(self, listener: Callable[[MemberEvent], None]) -> None:
        """Called with every join, update, leave and failure."""
        self._listeners.append(listener)

    def on_state_change(self, listener: Callable[[], None]) -> None:
        """Called when any member's state changes, suspicion included (polled)."""
        self._state_listeners.append(listener)

    def on_user_event(self, listener: Callable[[UserEvent], None]) -> None:
        """Called once with every user event, from any member (serf agents too) or this one."""
        self._user_event_listeners.append(listener)

    def on_events_lost(self, listener: Callable[[], None]) -> None:
        """Called once if this node, resumed from a saved event clock, was away through
        more events than members keep: some it missed are gone for good."""
        self._events_lost_listeners.append(listener)

    def send_user_event(self, name: str, payload: bytes) -> UserEvent:
        """Gossip a serf user event to every member; it reaches this node's listeners too.

        Raises ``ValueError`` past serf's limit on name and payload: the event has
        to fit, with the rest of a gossip packet, in one datagram.
        """
        if len(name.encode("utf-8")) + len(payload) > USER_EVENT_SIZE_LIMIT:
            raise ValueError(
                f"a user event's name and payload exceed {USER_EVENT_SIZE_LIMIT} bytes"
            )
        event = self.events.create(name, payload)
        encoded = encode_user_event(event)
        self.node.send_user_message_to_all(encoded)
        self.node.queue_user_message(encoded)
        self._deliver(event)
        return event

    def _user_message(self, payload: bytes) -> None:
        # serf's other messages (join and leave intents, queries) are serf's own business.
        if not payload or payload[0] != SERF_USER_EVENT_TYPE:
            return
        try:
            event = decode_user_event(payload)
        except WireError as error:
            self.counters.dropped += 1
            self._log.debug("dropping a user event: {error}", error=error)
            return
        if self.events.record(event):
            # Passed on as it came, as serf does: each member gossips it a few times.
            self.node.queue_user_message(payload)
            self._deliver(event)

    def _merge_events(self, user_state: bytes) -> None:
        """The recent events in a push-pull: what this node missed while it was away."""
        try:
            remote = decode_serf_state(user_state)
        except WireError:
            return  # not serf's state: a member that keeps no events
        if self.events.lost_since_resume(remote.event_ltime):
            for listener in list(self._events_lost_listeners):
                try:
                    listener()
                except Exception:
                    self._log.failure("an events-lost listener failed")
        if remote.event_ltime > 0:
            # No event has been sent at the remote's current time yet.
            self.events.witness(remote.event_ltime - 1)
        for event in remote.events:
            if self.events.record(event):
                self._deliver(event)

    def _deliver(self, event: UserEvent) -> None:
        for listener in list(self._user_event_listeners):
            try:
                listener(event)
            except Exception:
                self._log.failure("a user event listener failed")

    def _check_states(self) -> None:
        snapshot = tuple(sorted((m.name, m.state) for m in self.node.members()))
        if snapshot == self._last_states:
            return
        self._last_states = snapshot
        for listener in list(self._state_listeners):
            try:
                listener()
            except Exception:
                self._log.failure("a membership state listener failed")

    def members(self) -> list[Member]:
        return self.node.members()

    def tags_of(self, member: Member) -> dict[str, str]:
        try:
            return decode_tags(member.meta)
        except WireError:
            return {}

    def describe_members(self) -> list[dict[str, Any]]:
        """Every member for ``/health``: those in the table, and the ones it has reaped.

        The protocol forgets a failed or departed member after a short while; an
        operator (and ``serf members``) still expects to see it as failed or left
        until it comes back, so the shell remembers them for the reconnect timeout.
        """
        now = self.reactor.seconds()
        listed = {member.name: member for member in self.members()}
        for name, (member, since) in list(self._departed.items()):
            if now - since > self.profile.reconnect_timeout:
                del self._departed[name]
            elif name not in listed:
                listed[name] = member
        described = []
        for member in listed.values():
            tags = self.tags_of(member)
            described.append({
                "name": member.name,
                "role": tags.get("role", ""),
                "address": member.host,
                "gossip_port": member.port,
                "http_port": int(tags["http"]) if tags.get("http", "").isdigit() else None,
                "state": state_name(member),
                "incarnation": member.incarnation,
            })
        return sorted(described, key=lambda m: m["name"])

    # -- lifecycle --------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        # Listening before the reactor runs, as twistd's own listeners do: a gossip
        # port that cannot be had stops the process at once (lifecycle.NodeService)
        # instead of leaving a node that serves nothing.
        super().privilegedStartService()
        self._listen()

    def _listen(self) -> None:
        if self._udp is not None:
            return
        udp = self.reactor.listenUDP(self.port, GossipProtocol(self), interface=self.bind)
        try:
            self._tcp = self.reactor.listenTCP(
                self.port, _InboundFactory(self), interface=self.bind
            )
        except Exception:
            udp.stopListening()
            raise
        self._udp = udp

    def startService(self) -> None:
        super().startService()
        self._listen()
        self.accepting = True
        self.node.start()
        self._state_poll.start(STATE_POLL_SECONDS, now=False)
        if self.seeds:
            self._joiner = LoopingCall(self._try_join)
            self._joiner.clock = self.reactor
            self._joiner.start(JOIN_RETRY_SECONDS, now=True).addErrback(
                lambda f: self._log.failure("join loop failed", f)
            )

    @inlineCallbacks
    def stopService(self):  # type: ignore[no-untyped-def]
        super().stopService()
        if self._joiner is not None and self._joiner.running:
            self._joiner.stop()
        if self._state_poll.running:
            self._state_poll.stop()
        try:
            yield self.node.leave(LEAVE_TIMEOUT)
        except Exception:
            self._log.failure("leaving the cluster failed")
        self.node.stop()
        # Until the ports are closed, packets still arrive: a stopped node must not
        # handle them (an indirect ping would start a timer that nothing cancels).
        self.accepting = False
        for attempt in list(self._connecting):
            attempt.cancel()
        for stream in list(self.streams):
            stream.abort()
        if self._udp is not None:
            # Forgotten first: a timer firing while the port closes must find no
            # port to write to (a closing one has lost its socket).
            udp, self._udp = self._udp, None
            yield udp.stopListening()
        if self._tcp is not None:
            yield self._tcp.stopListening()

    # -- joining ----------------------------------------------------------------------

    @inlineCallbacks
    def _try_join(self):  # type: ignore[no-untyped-def]
        """Exchange state with every address of every seed; stop once one answered."""
        if self.joined:
            self._joiner.stop()
            return
        addresses, unresolved = yield self._resolve_seeds()
        me = self.node.address
        unknown = f" ({', '.join(unresolved)} did not resolve)" if unresolved else ""
        if not addresses:
            self._join_failed(f"no seed name resolved to an address{unknown}")
            return
        attempts = [self._push_pull(addr, join=True) for addr in addresses if addr != me]
        if not attempts:
            return  # the only seed is this node: it is the first member
        results = yield DeferredList(attempts, consumeErrors=True)
        if not any(ok and answer is not None for ok, answer in results):
            self._join_failed(f"none of {len(attempts)} seed address(es) answered{unknown}")
        else:
            self.joined = True
            self._log.info("joined the cluster through {count} seed address(es)",
                           count=sum(1 for ok, answer in results if ok and answer is not None))
            if self._joiner is not None and self._joiner.running:
                self._joiner.stop()
            self._sync_with_others(set(addresses))

    def _join_failed(self, reason: str) -> None:
        if self._failed_joins % JOIN_WARN_EVERY == 0:
            self._log.warn(
                "cannot join the cluster through {seeds}: {reason}; trying again every "
                "{seconds:g}s",
                seeds=", ".join(f"{host}:{port}" for host, port in self.seeds),
                reason=reason,
                seconds=JOIN_RETRY_SECONDS,
            )
        self._failed_joins += 1

    def _sync_with_others(self, seeds: set[Address]) -> None:
        """Right after joining, one more push-pull with a few members that are not seeds.

        A seed may have restarted a moment ago and know no recent events: the purges
        this node missed while away must not wait for the next periodic push-pull.
        """
        me = self.node.name
        others = [
            m.address for m in self.node.members()
            if m.name != me and m.state == NodeState.ALIVE and m.address not in seeds
        ]
        for addr in self._rng.sample(others, min(JOIN_SYNC_PEERS, len(others))):
            self._request_push_pull(addr, False)

    @inlineCallbacks
    def _resolve_seeds(self):  # type: ignore[no-untyped-def]
        """Every address of every seed, and the seed names that resolved to none."""
        addresses: list[Address] = []
        unresolved: list[str] = []
        for host, port in self.seeds:
            try:
                ipaddress.ip_address(host)
                addresses.append((host, port))
                continue
            except ValueError:
                pass
            found = yield resolve_all(self.reactor, host, port)
            addresses.extend(found)
            if not found:
                unresolved.append(host)
        return list(dict.fromkeys(addresses)), unresolved

    # -- the node's outputs -----------------------------------------------------------

    def _send(self, addr: Address, messages: list[Message]) -> None:
        if self._udp is None:
            return
        parts = []
        for message in messages:
            try:
                parts.append(encode_message(message))
            except WireError:
                self._log.failure("could not encode {message}", message=message)
        for packet in encode_packet(
            parts, keyring=self.keyring, protocol_version=PROTOCOL_VERSION, crc=True,
            budget=self.profile.udp_buffer_size,
        ):
            self.counters.packets_out += 1
            self.counters.bytes_out += len(packet)
            try:
                self._udp.write(packet, addr)
            except (OSError, ValueError) as error:
                # ValueError: Twisted's InvalidAddressError, e.g. a member that advertises
                # an IPv6 address to our IPv4 socket. Unreachable, not a bug.
                self._log.debug("sending to {addr} failed: {error}", addr=addr, error=error)

    def _request_push_pull(self, addr: Address, join: bool) -> None:
        self._push_pull(addr, join).addErrback(lambda _: None)

    def local_state(self, join: bool) -> PushPull:
        """Our member table, with the user state serf expects from every member."""
        state = self.node.local_state(join)
        names = {m.name: 1 for m in self.node.members()}
        serf_state = SerfState(
            status_ltimes=names,
            event_ltime=self.events.time,
            events=tuple(self.events.recent()),
        )
        return attrs.evolve(state, user_state=encode_serf_state(serf_state))

    def _connect(self, addr: Address, protocol: _StreamProtocol, timeout: float) -> Deferred:
        endpoint = HostnameEndpoint(self.reactor, addr[0], addr[1], timeout=timeout)
        d = endpoint.connect(_OneProtocolFactory(protocol))
        self._connecting.add(d)

        def connected(result: Any) -> Any:
            self._connecting.discard(d)
            return result

        return d.addBoth(connected).addCallback(lambda _: protocol.finished)

    def _tcp_ping(self, addr: Address, ping: Ping, timeout: float) -> Deferred[bool]:
        """memberlist's fallback probe: the ping over TCP; True if it is acknowledged."""
        protocol = _StreamProtocol(self, ping)
        d = self._connect(addr, protocol, timeout)
        d.addCallbacks(
            lambda ack: isinstance(ack, AckResp) and ack.seq_no == ping.seq_no,
            lambda _: False,
        )
        return d

    def _push_pull(self, addr: Address, join: bool) -> Deferred[PushPull | None]:
        self.counters.push_pulls += 1
        protocol = _StreamProtocol(self, self.local_state(join))
        d = self._connect(addr, protocol, self.profile.tcp_timeout)

        def failed(failure: Failure) -> None:
            self.counters.push_pull_failures += 1
            self._log.debug("push-pull with {addr} failed: {why}", addr=addr,
                            why=failure.getErrorMessage())
            return None

        def answered(result: PushPull | None) -> PushPull | None:
            if result is None:
                self.counters.push_pull_failures += 1
            return result

        return d.addCallbacks(answered, failed)

    def merge(self, remote: PushPull) -> None:
        if not self.accepting:
            return  # an exchange that finished after stop
        try:
            self.node.merge_remote_state(remote)
            self._merge_events(remote.user_state)
        except Exception:
            self.counters.dropped += 1
            self._log.failure("merging a remote state failed")

    def _on_event(self, event: MemberEvent) -> None:
        if event.kind in ("failed", "leave") and event.member.name != self.node.name:
            self._departed[event.member.name] = (event.member, self.reactor.seconds())
        elif event.kind == "join":
            self._departed.pop(event.member.name, None)
        self._log.info("member {name} {kind} ({host}:{port})", name=event.member.name,
                       kind=event.kind, host=event.member.host, port=event.member.port)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                self._log.failure("a membership listener failed")


class _OneProtocolFactory(Factory):
    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: IAddress) -> Protocol:
        return self._protocol


def watch_workers(membership: MembershipService, view: Any) -> None:
    """Keep a ``ClusterView`` (its workers and its suspects) in step with membership.

    Alive and suspect workers stay in the placement (a suspect usually refutes,
    and moving its keys away and back would cost two handoffs); a gateway
    routes around suspects until they are cleared.
    """
    from imgproxy.placement import WorkerRef

    def refresh(event: MemberEvent | None) -> None:
        workers = []
        suspects = set()
        failed = {}
        for member in membership.members():
            tags = membership.tags_of(member)
            port = tags.get("http", "")
            if tags.get("role") != "worker" or not (port.isdigit() and 0 < int(port) < 65536):
                continue
            worker = WorkerRef(member.name, member.host, int(port))
            if member.state == NodeState.DEAD:
                failed[member.name] = worker
            if member.state not in (NodeState.ALIVE, NodeState.SUSPECT):
                continue
            workers.append(worker)
            if member.state == NodeState.SUSPECT:
                suspects.add(member.name)
        departed = [event.member.name] if event is not None and event.kind == "leave" else []
        view.suspected = suspects
        view.failed = failed
        view.update(workers, departed_gracefully=departed)

    membership.on_event(refresh)
    membership.on_state_change(lambda: refresh(None))
    refresh(None)


@implementer(IResolutionReceiver)
class _Collector:
    """Collects every address of one host-name resolution."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.found: list[Address] = []
        self.done: Deferred[list[Address]] = Deferred()

    def resolutionBegan(self, resolution: Any) -> None:
        pass

    def addressResolved(self, address: Any) -> None:
        self.found.append((address.host, self.port))

    def resolutionComplete(self) -> None:
        self.done.callback(self.found)


def resolve_all(reactor: Any, host: str, port: int) -> Deferred[list[Address]]:
    """Every IPv4 address ``host`` resolves to (a compose service name stands for all replicas)."""
    collector = _Collector(port)
    reactor.nameResolver.resolveHostName(collector, host, port, addressTypes=[IPv4Address])
    return collector.done
