"""The Twisted shell around SwimNode, driven through twisted.internet.testing fakes.

A ``MemoryReactorClock`` (with a recording UDP port added: it has none) stands for the
reactor, ``StringTransport`` and ``iosim`` for TCP connections. Nothing touches a socket.
"""

from __future__ import annotations

import random
from typing import Any

import attrs
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError, ConnectionRefusedError, InvalidAddressError
from twisted.internet.interfaces import IHostnameResolver, IHostResolution
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from imgproxy.membership.events import UserEvent, decode_user_event, encode_user_event
from imgproxy.membership.keyring import Keyring
from imgproxy.membership.messages import (
    AckResp,
    Alive,
    Dead,
    IndirectPing,
    Message,
    NodeState,
    Ping,
    PushNodeState,
    PushPull,
    UserMsg,
)
from imgproxy.membership.profiles import LAN
from imgproxy.membership.service import (
    JOIN_RETRY_SECONDS,
    JOIN_WARN_EVERY,
    GossipProtocol,
    MembershipService,
    resolve_all,
)
from imgproxy.membership.tags import (
    SerfState,
    decode_serf_state,
    encode_serf_state,
    encode_tags,
)
from imgproxy.membership.wire import (
    StreamDecoder,
    add_crc,
    decode_packet,
    encode_compound,
    encode_message,
    encode_packet,
    encode_stream,
)

KEY = bytes(range(16))
PEER = ("127.0.0.9", 7946)
PEER_IP = bytes([127, 0, 0, 9])


class RecordingUDPPort:
    """What ``listenUDP`` returns: records every datagram written."""

    def __init__(self, port: int, protocol: Any, interface: str) -> None:
        self.port = port
        self.interface = interface
        self.protocol = protocol
        self.written: list[tuple[bytes, tuple[str, int]]] = []
        self.listening = True
        self.fail_writes = False
        self.closed: Deferred[None] = succeed(None)

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        if not self.listening:
            # What a closing udp.Port does: its socket is already gone.
            raise AttributeError("'Port' object has no attribute 'socket'")
        if self.fail_writes:
            raise OSError(101, "Network is unreachable")
        if ":" in addr[0]:
            # What Twisted's IPv4 udp.Port does with an IPv6 destination.
            raise InvalidAddressError(addr[0], "IPv4 port write() called with IPv6 address")
        self.written.append((data, addr))

    def stopListening(self) -> Deferred[None]:
        self.listening = False
        return self.closed


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        pass


@implementer(IHostnameResolver)
class TableResolver:
    """Resolves names from a table, IP literals to themselves; records every lookup."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.lookups: list[str] = []

    def resolveHostName(self, receiver: Any, hostName: str, portNumber: int = 0,
                        addressTypes: Any = None, transportSemantics: str = "TCP") -> Any:
        self.lookups.append(hostName)
        resolution = _Resolution(hostName)
        receiver.resolutionBegan(resolution)
        for host in self.table.get(hostName, [hostName]):
            receiver.addressResolved(IPv4Address("TCP", host, portNumber))
        receiver.resolutionComplete()
        return resolution


class FakeReactor(MemoryReactorClock):
    """MemoryReactorClock plus ``listenUDP`` and a table-driven name resolver."""

    def __init__(self, names: dict[str, list[str]] | None = None) -> None:
        super().__init__()
        self.udp_ports: list[RecordingUDPPort] = []
        self.nameResolver = TableResolver(names or {})

    def listenUDP(self, port: int, protocol: Any, interface: str = "",
                  maxPacketSize: int = 8192) -> RecordingUDPPort:
        udp = RecordingUDPPort(port, protocol, interface)
        protocol.makeConnection(udp)
        self.udp_ports.append(udp)
        return udp


def make_service(
    reactor: FakeReactor,
    name: str = "me",
    addr: str = "127.0.0.1",
    keyring: Keyring | None = None,
    seeds: tuple[tuple[str, int], ...] = (),
) -> MembershipService:
    return MembershipService(
        reactor=reactor, name=name, bind=addr, advertise=addr, port=7946,
        tags={"role": "worker", "http": "8080"}, profile=LAN, keyring=keyring,
        seeds=seeds, rng=random.Random(7),
    )


def peer_alive(name: str = "peer", addr: bytes = PEER_IP, incarnation: int = 1) -> Alive:
    return Alive(incarnation, name, addr, 7946, encode_tags({"role": "gateway"}),
                 (1, 5, 2, 2, 5, 4))


def datagram(*messages: Message, keyring: Keyring | None = None) -> bytes:
    packets = encode_packet([encode_message(m) for m in messages], keyring=keyring,
                            protocol_version=2, crc=True)
    assert len(packets) == 1
    return packets[0]


def peer_state(name: str = "peer", state: NodeState = NodeState.ALIVE) -> PushNodeState:
    return PushNodeState(name, PEER_IP, 7946, encode_tags({"role": "gateway"}), 3, state,
                         (1, 5, 2, 2, 5, 4))


def sent_messages(udp: RecordingUDPPort, keyring: Keyring | None = None) -> list[
        tuple[tuple[str, int], Message]]:
    """Every message in every datagram the service wrote, with its destination."""
    return [(addr, m) for data, addr in udp.written
            for m in decode_packet(data, keyring=keyring)]


def stream_messages(data: bytes, keyring: Keyring | None = None) -> list[Message]:
    """Decode what one side of a TCP connection wrote (as the other side would)."""
    return StreamDecoder(keyring, inbound=False).feed(data)


class Started(SynchronousTestCase):
    """A started service on a fake reactor."""

    keyring: Keyring | None = None

    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.service = make_service(self.reactor, keyring=self.keyring)
        self.service.startService()
        self.udp = self.reactor.udp_ports[0]
        self.protocol: GossipProtocol = self.udp.protocol

    def tearDown(self) -> None:
        if self.service.running:
            self.service.node.stop()

    def names(self) -> dict[str, NodeState]:
        return {m.name: m.state for m in self.service.members()}


class ListenerTests(Started):
    def test_listens_on_udp_and_tcp_at_the_bind_address_and_gossip_port(self) -> None:
        self.assertEqual((self.udp.port, self.udp.interface), (7946, "127.0.0.1"))
        [(port, _factory, _backlog, interface)] = self.reactor.tcpServers
        self.assertEqual((port, interface), (7946, "127.0.0.1"))

    def test_lists_itself_alive_with_its_tags(self) -> None:
        [me] = self.service.describe_members()
        self.assertEqual(
            {k: me[k] for k in ("name", "role", "address", "http_port", "state")},
            {"name": "me", "role": "worker", "address": "127.0.0.1", "http_port": 8080,
             "state": "alive"},
        )


class PrivilegedListenTests(SynchronousTestCase):
    """The ports are taken before the reactor runs, as twistd's own listeners are."""

    def test_the_ports_are_taken_in_the_privileged_start_and_once(self) -> None:
        reactor = FakeReactor()
        service = make_service(reactor)
        service.privilegedStartService()
        self.assertEqual((len(reactor.udp_ports), len(reactor.tcpServers)), (1, 1))
        service.startService()
        self.addCleanup(service.node.stop)
        self.assertEqual((len(reactor.udp_ports), len(reactor.tcpServers)), (1, 1))

    def test_a_tcp_port_in_use_gives_the_udp_port_back(self) -> None:
        reactor = FakeReactor()

        def refused(*args: Any, **kwargs: Any) -> None:
            raise CannotListenError("127.0.0.1", 7946, OSError(98, "Address already in use"))

        reactor.listenTCP = refused  # type: ignore[method-assign]
        service = make_service(reactor)
        self.assertRaises(CannotListenError, service.privilegedStartService)
        self.assertFalse(reactor.udp_ports[0].listening)


class DatagramTests(Started):
    def test_a_valid_datagram_reaches_the_node_and_is_counted(self) -> None:
        data = datagram(peer_alive())
        self.protocol.datagramReceived(data, PEER)
        self.assertEqual(self.names()["peer"], NodeState.ALIVE)
        counters = self.service.counters
        self.assertEqual((counters.packets_in, counters.bytes_in, counters.dropped),
                         (1, len(data), 0))

    def test_hostile_datagrams_are_dropped_counted_and_never_raise(self) -> None:
        self.protocol.datagramReceived(datagram(peer_alive()), PEER)
        before = self.service.members()
        hostile = [
            b"",
            b"\x00",
            b"\xff" * 3000,
            add_crc(b"\x02\x81")[:-1],  # truncated CRC'd packet
            bytes([12]) + b"\x00\x00\x00\x00" + encode_message(peer_alive("x")),  # bad CRC
            encode_compound([encode_message(peer_alive("y"))])[:-3],  # cut compound
            bytes([10]) + b"\x01" * 60,  # "encrypted" without a keyring
            bytes([2]) + b"\x85\xa5SeqNo\xcf" + b"\xff" * 8,  # cut msgpack
            bytes([9]) + b"\xc1" * 10,  # compress with a reserved msgpack byte
        ]
        for data in hostile:
            self.protocol.datagramReceived(data, PEER)
        self.assertEqual(self.service.counters.dropped, len(hostile))
        self.assertEqual(self.service.members(), before)

    def test_a_bad_part_of_a_compound_is_dropped_and_the_rest_handled(self) -> None:
        good = encode_message(peer_alive())
        bad = bytes([4]) + b"\x81\xa4Node\x07"  # alive whose name is not a string
        packet = add_crc(encode_compound([bad, good]))
        self.protocol.datagramReceived(packet, PEER)
        self.assertEqual(self.service.counters.dropped, 1)
        self.assertIn("peer", self.names())

    def test_a_datagram_whose_handling_fails_is_dropped_not_raised(self) -> None:
        def broken(messages: Any, addr: Any) -> None:
            raise RuntimeError("a bug in the state machine")

        self.patch(self.service.node, "handle_packet", broken)
        self.protocol.datagramReceived(datagram(peer_alive()), PEER)
        self.assertEqual(self.service.counters.dropped, 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_a_ping_is_answered_with_an_ack_to_the_sender(self) -> None:
        self.protocol.datagramReceived(datagram(Ping(42, "me")), PEER)
        acks = [(addr, m) for addr, m in sent_messages(self.udp) if isinstance(m, AckResp)]
        self.assertEqual(acks, [(PEER, AckResp(42))])
        self.assertEqual(self.service.counters.packets_out, len(self.udp.written))

    def test_a_failing_send_is_logged_and_survived(self) -> None:
        self.udp.fail_writes = True
        self.protocol.datagramReceived(datagram(Ping(42, "me")), PEER)
        self.assertEqual(self.udp.written, [])
        self.assertEqual(self.service.counters.dropped, 0)

    def test_a_member_with_an_ipv6_address_costs_no_error_on_an_ipv4_socket(self) -> None:
        ipv6 = Alive(1, "six", bytes(15) + b"\x01", 7946, b"", (1, 5, 2, 2, 5, 4))
        self.protocol.datagramReceived(datagram(ipv6, peer_alive()), PEER)
        for _ in range(20):  # a few probe rounds: both members get probed
            self.reactor.advance(LAN.probe_interval / 2)
        self.assertTrue(any(addr == PEER for _, addr in self.udp.written))
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertGreater(self.service.node.counters.probes, 2)


class EncryptedDatagramTests(Started):
    keyring = Keyring([KEY])

    def test_a_datagram_sealed_with_the_cluster_key_is_accepted(self) -> None:
        self.protocol.datagramReceived(datagram(peer_alive(), keyring=self.keyring), PEER)
        self.assertIn("peer", self.names())

    def test_plaintext_and_wrong_key_datagrams_are_dropped(self) -> None:
        self.protocol.datagramReceived(datagram(peer_alive("plain")), PEER)
        self.protocol.datagramReceived(
            datagram(peer_alive("other"), keyring=Keyring([bytes(16)])), PEER)
        self.assertEqual(self.service.counters.dropped, 2)
        self.assertEqual(set(self.names()), {"me"})

    def test_what_it_sends_is_sealed_with_the_cluster_key(self) -> None:
        self.protocol.datagramReceived(datagram(Ping(5, "me"), keyring=self.keyring), PEER)
        self.assertEqual(len(self.udp.written), 1)
        self.assertIn((PEER, AckResp(5)), sent_messages(self.udp, self.keyring))


class InboundStreamTests(Started):
    """The TCP server side: push-pull answers, TCP pings, hostile streams."""

    def connect(self) -> tuple[Any, StringTransport]:
        [(_port, factory, _backlog, _iface)] = self.reactor.tcpServers
        protocol = factory.buildProtocol(IPv4Address("TCP", *PEER))
        transport = StringTransport(peerAddress=IPv4Address("TCP", *PEER))
        protocol.makeConnection(transport)
        return protocol, transport

    def encode(self, message: Message) -> bytes:
        return encode_stream(message, keyring=self.keyring, protocol_version=2)

    def test_a_push_pull_is_answered_with_our_table_and_theirs_is_merged(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(self.encode(PushPull(join=True, states=(peer_state(),))))
        [answer] = stream_messages(transport.value(), self.keyring)
        assert isinstance(answer, PushPull)
        self.assertEqual([s.name for s in answer.states], ["me"])
        self.assertEqual(self.names(), {"me": NodeState.ALIVE, "peer": NodeState.ALIVE})
        self.assertTrue(transport.disconnecting)

    def test_a_push_pull_in_small_pieces_is_reassembled(self) -> None:
        protocol, transport = self.connect()
        data = self.encode(PushPull(join=False, states=(peer_state(),)))
        for i in range(len(data)):
            protocol.dataReceived(data[i:i + 1])
        self.assertIn("peer", self.names())
        self.assertIsInstance(stream_messages(transport.value(), self.keyring)[0], PushPull)

    def test_a_tcp_ping_for_us_is_acknowledged_on_the_stream(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(self.encode(Ping(77, "me")))
        self.assertEqual(stream_messages(transport.value(), self.keyring), [AckResp(77)])
        self.assertTrue(transport.disconnecting)

    def test_a_tcp_ping_for_another_node_gets_no_ack(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(self.encode(Ping(78, "someone-else")))
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)

    def test_a_garbage_stream_is_dropped_counted_and_aborted(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(b"\x06\xff\xfe" + b"\x00" * 40)
        self.assertEqual(self.service.counters.dropped, 1)
        self.assertTrue(transport.disconnected)
        self.assertEqual(set(self.names()), {"me"})

    def test_a_stalled_stream_is_aborted_after_the_tcp_timeout(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(self.encode(PushPull(join=False, states=(peer_state(),)))[:5])
        self.reactor.advance(LAN.tcp_timeout - 0.1)
        self.assertFalse(transport.disconnected)
        self.reactor.advance(0.2)
        self.assertTrue(transport.disconnected)


class EncryptedInboundStreamTests(InboundStreamTests):
    keyring = Keyring([KEY])

    def test_a_plaintext_push_pull_is_refused(self) -> None:
        protocol, transport = self.connect()
        data = encode_stream(PushPull(join=True, states=(peer_state(),)), keyring=None,
                             protocol_version=2)
        protocol.dataReceived(data)
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnected)
        self.assertEqual(set(self.names()), {"me"})


class UserEventTests(Started):
    """serf's user events: delivered once, gossiped on, carried in push-pulls."""

    def setUp(self) -> None:
        super().setUp()
        self.delivered: list[UserEvent] = []
        self.service.on_user_event(self.delivered.append)
        self.protocol.datagramReceived(datagram(peer_alive()), PEER)

    def gossiped_events(self) -> list[UserEvent]:
        return [decode_user_event(m.payload) for _, m in sent_messages(self.udp)
                if isinstance(m, UserMsg)]

    def gossip_rounds(self, rounds: int = 3) -> None:
        for _ in range(rounds):
            self.reactor.advance(self.service.profile.gossip_interval)

    def test_an_event_from_a_member_is_delivered_once_and_passed_on(self) -> None:
        event = UserEvent(5, "imgproxy-purge", b"k" * 64)
        for _ in range(3):  # gossip brings it several times
            self.protocol.datagramReceived(datagram(UserMsg(encode_user_event(event))), PEER)
        self.assertEqual(self.delivered, [event])
        self.gossip_rounds()
        self.assertIn(event, self.gossiped_events())
        self.assertEqual(self.service.events.time, 6)

    def test_an_event_sent_here_is_delivered_here_and_gossiped(self) -> None:
        event = self.service.send_user_event("imgproxy-purge", b"k" * 64)
        self.assertEqual(self.delivered, [event])
        # Sent at once to every member, before any gossip round: a gateway that
        # stops right after a purge does not take the purge with it.
        self.assertEqual(
            [(addr, decode_user_event(m.payload)) for addr, m in sent_messages(self.udp)
             if isinstance(m, UserMsg)],
            [(PEER, event)],
        )
        self.gossip_rounds()
        self.assertIn(event, self.gossiped_events())

    def test_an_event_too_large_for_a_datagram_is_refused(self) -> None:
        with self.assertRaises(ValueError):
            self.service.send_user_event("imgproxy-purge", b"u" * 600)
        self.assertEqual(self.delivered, [])

    def test_serfs_other_messages_are_ignored_and_broken_events_dropped(self) -> None:
        join_intent = bytes([1]) + b"\x82\xa5LTime\x01\xa4Node\xa1x"
        self.protocol.datagramReceived(datagram(UserMsg(join_intent)), PEER)
        self.assertEqual(self.service.counters.dropped, 0)
        self.protocol.datagramReceived(datagram(UserMsg(bytes([3]) + b"\x93")), PEER)
        self.assertEqual(self.service.counters.dropped, 1)
        self.assertEqual(self.delivered, [])

    def test_the_recent_events_go_out_in_our_push_pull_state(self) -> None:
        event = self.service.send_user_event("imgproxy-purge", b"k" * 64)
        state = decode_serf_state(self.service.local_state(join=False).user_state)
        self.assertEqual((state.events, state.event_ltime), ((event,), event.ltime + 1))

    def test_a_node_away_through_more_events_than_kept_is_told_once(self) -> None:
        lost: list[bool] = []
        self.service.on_events_lost(lambda: lost.append(True))
        self.service.events.resume(10)
        user_state = encode_serf_state(SerfState(event_ltime=10 + 512 + 1))
        remote = PushPull(join=True, states=(peer_state(),), user_state=user_state)
        self.service.merge(remote)
        self.service.merge(remote)
        self.assertEqual(lost, [True])

    def test_events_missed_while_away_arrive_in_a_push_pull_once(self) -> None:
        missed = (UserEvent(30, "imgproxy-purge", b"a" * 64), UserEvent(31, "deploy", b""))
        user_state = encode_serf_state(SerfState(event_ltime=40, events=missed))
        remote = PushPull(join=False, states=(peer_state(),), user_state=user_state)
        self.service.merge(remote)
        self.service.merge(remote)
        self.assertEqual(self.delivered, list(missed))
        self.assertEqual(self.service.events.time, 40)
        # Learnt in a push-pull, not gossiped again: every member gets them that way.
        self.gossip_rounds()
        self.assertEqual(self.gossiped_events(), [])


class OutboundPushPullTests(Started):
    def test_a_push_pull_sends_our_table_and_merges_the_answer(self) -> None:
        result = self.service._push_pull(PEER, join=False)
        self.reactor.advance(0)
        [(host, port, factory, _timeout, _bind)] = self.reactor.tcpClients
        self.assertEqual((host, port), PEER)
        protocol = factory.buildProtocol(IPv4Address("TCP", *PEER))
        transport = StringTransport()
        protocol.makeConnection(transport)
        [ours] = stream_messages(transport.value())
        assert isinstance(ours, PushPull)
        self.assertEqual(([s.name for s in ours.states], ours.join), (["me"], False))
        answer = PushPull(join=False, states=(peer_state(),))
        protocol.dataReceived(encode_stream(answer, keyring=None, protocol_version=2))
        self.assertEqual(self.successResultOf(result), answer)
        self.assertIn("peer", self.names())

    def test_a_refused_push_pull_fires_none_and_is_counted(self) -> None:
        result = self.service._push_pull(PEER, join=False)
        self.reactor.advance(0)
        [connector] = self.reactor.connectors
        [(_h, _p, factory, _t, _b)] = self.reactor.tcpClients
        factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
        self.reactor.advance(1)
        self.assertIsNone(self.successResultOf(result))
        self.assertEqual(self.service.counters.push_pull_failures, 1)


class OutboundTcpPingTests(Started):
    """memberlist's fallback probe: a ping over TCP, true only for the matching ack."""

    def ping_answered_with(self, answer: Message | None) -> bool | None:
        result = self.service._tcp_ping(PEER, Ping(31, "peer"), 1.0)
        self.reactor.advance(0)
        [(_h, _p, factory, _timeout, _bind)] = self.reactor.tcpClients
        protocol = factory.buildProtocol(IPv4Address("TCP", *PEER))
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertEqual(stream_messages(transport.value()), [Ping(31, "peer")])
        if answer is None:
            protocol.connectionLost(Failure(ConnectionRefusedError()))
        else:
            protocol.dataReceived(encode_stream(answer, keyring=None, protocol_version=2))
        return self.successResultOf(result)

    def test_the_matching_ack_is_contact(self) -> None:
        self.assertIs(self.ping_answered_with(AckResp(31)), True)

    def test_an_ack_for_another_probe_is_not(self) -> None:
        self.assertIs(self.ping_answered_with(AckResp(30)), False)

    def test_a_connection_closed_without_an_answer_is_not(self) -> None:
        self.assertIs(self.ping_answered_with(None), False)

    def test_a_refused_connection_is_not(self) -> None:
        result = self.service._tcp_ping(PEER, Ping(32, "peer"), 1.0)
        self.reactor.advance(0)
        [connector] = self.reactor.connectors
        [(_h, _p, factory, _t, _b)] = self.reactor.tcpClients
        factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
        self.reactor.advance(1)
        self.assertIs(self.successResultOf(result), False)


class IosimPushPullTests(SynchronousTestCase):
    def test_two_services_learn_each_other_through_one_push_pull(self) -> None:
        keyring = Keyring([KEY])
        reactor_a, reactor_b = FakeReactor(), FakeReactor()
        a = make_service(reactor_a, "a", "127.0.0.1", keyring)
        b = make_service(reactor_b, "b", "127.0.0.2", keyring)
        a.startService()
        b.startService()
        self.addCleanup(a.node.stop)
        self.addCleanup(b.node.stop)

        result = a._push_pull(("127.0.0.2", 7946), join=True)
        reactor_a.advance(0)
        [(_h, _p, client_factory, _t, _bind)] = reactor_a.tcpClients
        [(_port, server_factory, _backlog, _iface)] = reactor_b.tcpServers
        client = client_factory.buildProtocol(IPv4Address("TCP", "127.0.0.2", 7946))
        server = server_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        client_transport = iosim.FakeTransport(client, isServer=False)
        server_transport = iosim.FakeTransport(server, isServer=True)
        pump = iosim.connect(server, server_transport, client, client_transport)
        pump.flush()

        self.assertIsInstance(self.successResultOf(result), PushPull)
        for service in (a, b):
            self.assertEqual({m.name: m.state for m in service.members()},
                             {"a": NodeState.ALIVE, "b": NodeState.ALIVE})
        [described] = [m for m in a.describe_members() if m["name"] == "b"]
        self.assertEqual((described["address"], described["role"]), ("127.0.0.2", "worker"))


class JoinTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeReactor({"seeds.cluster": ["127.0.0.5", "127.0.0.6"]})
        self.service = make_service(self.reactor, seeds=(("seeds.cluster", 7946),))
        self.addCleanup(self.service.node.stop)

    def attempts(self) -> list[tuple[str, int]]:
        return [(host, port) for host, port, *_ in self.reactor.tcpClients]

    def refuse_all(self, start: int) -> None:
        for connector, (_h, _p, factory, *_rest) in zip(
            self.reactor.connectors[start:], self.reactor.tcpClients[start:], strict=True
        ):
            factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
        self.reactor.advance(1)

    def test_a_seed_name_stands_for_every_address_it_resolves_to(self) -> None:
        self.service.startService()
        self.reactor.advance(0)
        self.assertEqual(self.reactor.nameResolver.lookups[0], "seeds.cluster")
        self.assertEqual(sorted(self.attempts()), [("127.0.0.5", 7946), ("127.0.0.6", 7946)])

    def test_a_join_that_fails_is_warned_about_once_then_once_a_minute(self) -> None:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        def warnings() -> list[str]:
            return [formatEvent(e) for e in events if e.get("log_level") == LogLevel.warn
                    and "cannot join" in formatEvent(e)]

        self.service.startService()
        self.reactor.advance(0)
        self.refuse_all(0)
        self.assertEqual(warnings(), [
            "cannot join the cluster through seeds.cluster:7946: none of 2 seed address(es) "
            f"answered; trying again every {JOIN_RETRY_SECONDS:g}s"
        ])
        for round_ in range(1, JOIN_WARN_EVERY):
            self.reactor.advance(JOIN_RETRY_SECONDS)
            self.refuse_all(2 * round_)
        self.assertEqual(len(warnings()), 1)
        self.reactor.advance(JOIN_RETRY_SECONDS)
        self.refuse_all(2 * JOIN_WARN_EVERY)
        self.assertEqual(len(warnings()), 2)

    def test_a_seed_name_that_resolves_to_nothing_is_warned_about(self) -> None:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        reactor = FakeReactor({"nowhere.invalid": []})
        service = make_service(reactor, seeds=(("nowhere.invalid", 7946),))
        self.addCleanup(service.node.stop)
        service.startService()
        reactor.advance(0)
        self.assertIn("no seed name resolved to an address (nowhere.invalid did not resolve)",
                      " ".join(formatEvent(e) for e in events))

    def test_join_is_retried_until_a_seed_answers_then_stops(self) -> None:
        self.service.startService()
        self.reactor.advance(0)
        self.refuse_all(0)
        self.assertFalse(self.service.joined)
        self.reactor.advance(JOIN_RETRY_SECONDS)
        self.assertEqual(len(self.attempts()), 4, "a second round after the retry delay")

        # The second round: one seed refuses, the other answers.
        self.refuse_all(3)
        _h, _p, factory, *_ = self.reactor.tcpClients[2]
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.5", 7946))
        protocol.makeConnection(StringTransport())
        answer = PushPull(join=False, states=(peer_state("seed"),))
        protocol.dataReceived(encode_stream(answer, keyring=None, protocol_version=2))
        self.reactor.advance(0)

        self.assertTrue(self.service.joined)
        self.assertIn("seed", {m.name for m in self.service.members()})
        self.reactor.advance(JOIN_RETRY_SECONDS * 3)
        seeds = {("127.0.0.5", 7946), ("127.0.0.6", 7946)}
        self.assertEqual(len([a for a in self.attempts() if a in seeds]), 4,
                         "no more attempts once joined")
        # Then one sync with a member that is not a seed (the seed may know no events).
        self.assertEqual([a for a in self.attempts() if a not in seeds], [PEER])

    def test_our_own_address_among_the_seeds_is_skipped(self) -> None:
        reactor = FakeReactor({"all.cluster": ["127.0.0.1", "127.0.0.6"]})
        service = make_service(reactor, seeds=(("all.cluster", 7946),))
        service.startService()
        self.addCleanup(service.node.stop)
        reactor.advance(0)
        self.assertEqual([(h, p) for h, p, *_ in reactor.tcpClients], [("127.0.0.6", 7946)])

    def test_resolve_all_returns_every_ipv4_address(self) -> None:
        found = self.successResultOf(resolve_all(self.reactor, "seeds.cluster", 7000))
        self.assertEqual(found, [("127.0.0.5", 7000), ("127.0.0.6", 7000)])


class StopTests(Started):
    def test_stopping_broadcasts_our_leave_then_closes_the_ports(self) -> None:
        self.protocol.datagramReceived(datagram(peer_alive()), PEER)
        self.udp.written.clear()
        stopped = self.service.stopService()
        # The leave goes out with the next gossip rounds, before the ports close.
        for _ in range(100):
            self.reactor.advance(LAN.gossip_interval)
        self.successResultOf(stopped)
        deads = [m for addr, m in sent_messages(self.udp)
                 if addr == PEER and isinstance(m, Dead)]
        self.assertTrue(deads)
        self.assertEqual({(d.node, d.from_node) for d in deads}, {("me", "me")})
        self.assertFalse(self.udp.listening)
        self.assertEqual(self.names()["me"], NodeState.LEFT)

    def test_nothing_is_sent_to_a_port_that_is_closing(self) -> None:
        self.udp.closed = Deferred()
        stopping = self.service.stopService()
        for _ in range(100):
            self.reactor.advance(LAN.gossip_interval)
        self.assertNoResult(stopping)  # the port is still closing
        self.service._send(PEER, [Ping(11, "peer")])
        self.assertEqual(self.flushLoggedErrors(AttributeError), [])
        self.udp.closed.callback(None)
        self.successResultOf(stopping)

    def test_a_stopped_node_ignores_what_arrives_before_the_ports_close(self) -> None:
        self.successResultOf(self.service.stopService())
        self.udp.written.clear()
        indirect = IndirectPing(9, PEER_IP, 7946, "peer", True, PEER_IP, 7946, "peer")
        self.protocol.datagramReceived(datagram(indirect, Ping(10, "me")), PEER)
        self.assertEqual((self.udp.written, self.reactor.getDelayedCalls()), ([], []))
        [(_port, factory, _backlog, _iface)] = self.reactor.tcpServers
        self.assertIsNone(factory.buildProtocol(IPv4Address("TCP", *PEER)))

    def test_stopping_cancels_connections_being_made_and_aborts_open_streams(self) -> None:
        pending = self.service._push_pull(PEER, join=False)
        self.reactor.advance(0)
        [(_port, factory, _backlog, _iface)] = self.reactor.tcpServers
        inbound = factory.buildProtocol(IPv4Address("TCP", *PEER))
        transport = StringTransport()
        inbound.makeConnection(transport)
        inbound.dataReceived(b"\x06")  # the first byte of a push-pull, then nothing

        self.successResultOf(self.service.stopService())

        self.assertIsNone(self.successResultOf(pending))
        self.assertTrue(transport.disconnected)
        self.assertEqual((self.service.streams, self.reactor.getDelayedCalls()), (set(), []))

    def test_stopping_alone_closes_at_once(self) -> None:
        stopped = self.service.stopService()
        self.successResultOf(stopped)
        self.assertFalse(self.udp.listening)
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class ReapedMembersTests(SynchronousTestCase):
    """A failed or departed member stays listed as such after the table forgets it."""

    def test_failed_member_listed_until_it_rejoins(self) -> None:
        from imgproxy.membership.messages import NodeState
        from imgproxy.membership.state import Member, MemberEvent

        reactor = FakeReactor()
        service = make_service(reactor)
        gone = Member("peer", PEER_IP, 7946, encode_tags({"role": "worker"}), 3,
                      NodeState.DEAD, 0.0)
        service._on_event(MemberEvent("failed", gone))
        listed = {m["name"]: m for m in service.describe_members()}
        self.assertEqual(listed["peer"]["state"], "failed")
        self.assertEqual(listed["peer"]["incarnation"], 3)
        back = attrs.evolve(gone, state=NodeState.ALIVE, incarnation=4)
        service._on_event(MemberEvent("join", back))
        self.assertNotIn("peer", {m["name"] for m in service.describe_members()})

    def test_forgotten_after_the_reconnect_timeout(self) -> None:
        from imgproxy.membership.messages import NodeState
        from imgproxy.membership.state import Member, MemberEvent

        reactor = FakeReactor()
        service = make_service(reactor)
        gone = Member("peer", PEER_IP, 7946, b"", 3, NodeState.LEFT, 0.0)
        service._on_event(MemberEvent("leave", gone))
        self.assertEqual({m["name"]: m["state"] for m in service.describe_members()}["peer"],
                         "left")
        reactor.advance(LAN.reconnect_timeout + 1)
        self.assertNotIn("peer", {m["name"] for m in service.describe_members()})
