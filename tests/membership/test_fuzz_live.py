"""100,000 mutated and random datagrams into a live node on the real reactor and loopback.

One in-process ``MembershipService`` (the target) and one real peer, each on its own UDP
and TCP socket on a random 127.0.0.0/8 address. Most of the fuzz goes straight into
``GossipProtocol.datagramReceived`` (fast, and any exception it let out would fail the
test); a few thousand datagrams travel over a real UDP socket. Throughout, the peer keeps
probing the target for real. Afterwards: nothing was logged as an error, every member
in the table is well formed, the target still lists itself and the peer alive, and it
answers a ping from a fresh socket.

Fuzzed "alive" messages invent members at arbitrary addresses. The target would probe
them, so its reactor is wrapped: packets and connections go only to this test's own
addresses and are dropped (and counted) otherwise, so no one else is ever contacted.
"""

from __future__ import annotations

import ipaddress
import json
import random
from typing import Any

import pytest
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import (
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorTime,
    IReactorUDP,
)
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from imgproxy.membership.messages import (
    AckResp,
    Alive,
    Dead,
    IndirectPing,
    Message,
    NackResp,
    NodeState,
    Ping,
    Suspect,
    UserMsg,
)
from imgproxy.membership.profiles import LAN
from imgproxy.membership.service import MembershipService
from imgproxy.membership.state import MemberEvent
from imgproxy.membership.tags import encode_tags
from imgproxy.membership.wire import (
    WireError,
    add_crc,
    compress_payload,
    decode_packet,
    encode_compound,
    encode_message,
)
from tests.processes import free_port, loopback_address

pytestmark = pytest.mark.slow  # 20-40 s on a busy 2-core machine

TOTAL = 100_000
OVER_THE_SOCKET = 4_000
CHUNK = 500
VSN = (1, 5, 2, 2, 5, 4)


class _BlockedConnector:
    """What ``connectTCP`` returns for a destination outside the test."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    def stopConnecting(self) -> None:
        pass

    def disconnect(self) -> None:
        pass

    def getDestination(self) -> Any:
        return (self.host, self.port)


class _FilteredPort:
    """A UDP port that writes only to allowed hosts."""

    def __init__(self, port: Any, guard: LoopbackGuard) -> None:
        self._port = port
        self._guard = guard

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        if addr[0] in self._guard.allowed:
            self._port.write(data, addr)
        else:
            self._guard.blocked_packets += 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._port, name)


@implementer(IReactorTime, IReactorUDP, IReactorTCP, IReactorPluggableNameResolver)
class LoopbackGuard:
    """The real reactor, with traffic only to ``allowed`` hosts (this test's own)."""

    def __init__(self, real: Any, allowed: set[str]) -> None:
        self._real = real
        self.allowed = allowed
        self.blocked_packets = 0
        self.blocked_connections = 0

    def listenUDP(self, port: int, protocol: Any, interface: str = "",
                  maxPacketSize: int = 8192) -> _FilteredPort:
        return _FilteredPort(self._real.listenUDP(port, protocol, interface, maxPacketSize), self)

    def connectTCP(self, host: str, port: int, factory: Any, timeout: float = 30,
                   bindAddress: Any = None) -> Any:
        if host in self.allowed:
            return self._real.connectTCP(host, port, factory, timeout, bindAddress)
        self.blocked_connections += 1
        connector = _BlockedConnector(host, port)
        self._real.callLater(0, factory.clientConnectionFailed, connector,
                             Failure(ConnectError(string=f"{host} is outside the test")))
        return connector

    @property
    def nameResolver(self) -> Any:
        return self._real.nameResolver

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class Collector(DatagramProtocol):
    """A real client socket: sends fuzz and pings, keeps the acks it gets."""

    def __init__(self) -> None:
        self.acks: list[int] = []

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        try:
            messages = decode_packet(data, keyring=None)
        except WireError:
            return
        self.acks += [m.seq_no for m in messages if isinstance(m, AckResp)]


def corpus(target: str, target_ip: bytes, peer: str) -> list[bytes]:
    """Valid datagrams of every kind the protocol has, about us, the peer and strangers."""
    stranger = bytes([127, 0, 0, 3])
    messages: list[Message] = [
        Ping(1, target, stranger, 7000, "stranger"),
        Ping(2, target),
        IndirectPing(3, target_ip, 7946, target, True, stranger, 7000, "stranger"),
        AckResp(4, b"payload"),
        NackResp(5),
        Suspect(1, "stranger", "fuzzer"),
        Suspect(1, peer, "fuzzer"),
        Suspect(1, target, "fuzzer"),
        Alive(1, "stranger", stranger, 7000, encode_tags({"role": "worker", "http": "80"}), VSN),
        Alive(2, target, target_ip, 7946, b"", VSN),
        Dead(1, "stranger", "fuzzer"),
        Dead(1, peer, "fuzzer"),
        UserMsg(b"user payload"),
    ]
    singles = [encode_message(m) for m in messages]
    compound = encode_compound(singles)
    return [
        *singles,
        *(add_crc(s) for s in singles),
        compound,
        add_crc(compound),
        compress_payload(compound),
        add_crc(compress_payload(encode_compound(singles[:4]))),
        encode_compound([compound, singles[0]]),
    ]


INTERESTING = [b"\x00", b"\xff", b"\xc0", b"\xc1", b"\xdb\xff\xff\xff\xff", b"\xdf\xff\xff",
               b"\x7f", b"\x80", b"\xcf" + b"\xff" * 8, b"\xd9\xff", b"\x0c", b"\x07", b"\x09"]


def mutate(rng: random.Random, seeds: list[bytes]) -> bytes:
    """One fuzz datagram: a seed mutated a few times, or plain random bytes."""
    if rng.random() < 0.1:
        return rng.randbytes(rng.randrange(0, 1500))
    data = bytearray(rng.choice(seeds))
    for _ in range(rng.randrange(1, 5)):
        op = rng.randrange(7)
        pos = rng.randrange(len(data) + 1)
        if op == 0 and data:  # flip bits
            data[pos % len(data)] ^= 1 << rng.randrange(8)
        elif op == 1 and data:  # set a byte
            data[pos % len(data)] = rng.randrange(256)
        elif op == 2:  # insert bytes
            data[pos:pos] = rng.choice(INTERESTING) if rng.random() < 0.5 else rng.randbytes(
                rng.randrange(1, 9))
        elif op == 3:  # delete a range
            del data[pos:pos + rng.randrange(1, 9)]
        elif op == 4:  # truncate
            del data[pos:]
        elif op == 5 and data:  # duplicate a range
            end = min(len(data), pos + rng.randrange(1, 32))
            data[pos:pos] = data[pos:end]
        else:  # splice with another seed
            other = rng.choice(seeds)
            data = data[:pos] + other[rng.randrange(len(other) + 1):]
    return bytes(data)


def check_table(test: TestCase, service: MembershipService) -> None:
    """Every member well formed; we are alive under our own address; JSON-able view."""
    members = service.members()
    for member in members:
        test.assertIsInstance(member.name, str)
        test.assertIn(len(member.addr), (4, 16))
        test.assertTrue(0 <= member.port <= 0xFFFF)
        test.assertIn(member.state, list(NodeState))
        test.assertGreaterEqual(member.incarnation, 0)
    test.assertEqual(len({m.name for m in members}), len(members), "one entry per name")
    me = service.node.member(service.node.name)
    assert me is not None
    test.assertEqual((me.state, me.address), (NodeState.ALIVE, service.node.address))
    json.dumps(service.describe_members())


class LiveFuzzTests(TestCase):
    timeout = 120

    def start(self, service: MembershipService) -> None:
        service.startService()
        self.addCleanup(service.stopService)

    @inlineCallbacks
    def wait_until(self, what: str, check: Any, timeout: float = 20.0):  # type: ignore[no-untyped-def]
        waited = 0.0
        while not check():
            if waited > timeout:
                self.fail(f"not within {timeout} s: {what}")
            yield deferLater(global_reactor, 0.05, lambda: None)
            waited += 0.05

    def sees_alive(self, observer: MembershipService, name: str) -> bool:
        member = observer.node.member(name)
        return member is not None and member.state == NodeState.ALIVE

    @inlineCallbacks
    def test_fuzzed_datagrams_leave_the_node_working(self):  # type: ignore[no-untyped-def]
        target_addr, peer_addr, client_addr = (loopback_address() for _ in range(3))
        guard = LoopbackGuard(global_reactor, {target_addr, peer_addr, client_addr})
        target_port = free_port(target_addr, udp=True)
        target = MembershipService(
            reactor=guard, name="target", bind=target_addr, advertise=target_addr,
            port=target_port, tags={"role": "worker", "http": "8080"}, profile=LAN,
            keyring=None, rng=random.Random(1),
        )
        peer = MembershipService(
            reactor=guard, name="peer", bind=peer_addr, advertise=peer_addr,
            port=free_port(peer_addr, udp=True), tags={"role": "gateway"}, profile=LAN,
            keyring=None, seeds=[(target_addr, target_port)], rng=random.Random(2),
        )
        self.start(target)
        self.start(peer)
        yield self.wait_until("the peer and the target see each other",
                              lambda: self.sees_alive(target, "peer")
                              and self.sees_alive(peer, "target"))

        collector = Collector()
        client = global_reactor.listenUDP(0, collector, interface=client_addr)
        self.addCleanup(client.stopListening)
        seeds = corpus("target", ipaddress.ip_address(target_addr).packed, "peer")
        rng = random.Random(20261129)
        protocol = target._udp._port.protocol
        fake_sender = (client_addr, client.getHost().port)
        probes_before = peer.node.counters.probes
        peer_events: list[MemberEvent] = []
        peer.on_event(lambda e: peer_events.append(e) if e.member.name == "target" else None)

        direct = TOTAL - OVER_THE_SOCKET
        for start in range(0, direct, CHUNK):
            for _ in range(min(CHUNK, direct - start)):
                protocol.datagramReceived(mutate(rng, seeds), fake_sender)
            # Let the reactor run: real pings from the peer are answered meanwhile.
            yield deferLater(global_reactor, 0, lambda: None)
        received_before = target.counters.packets_in
        for _batch in range(0, OVER_THE_SOCKET, 200):
            for _ in range(200):
                client.write(mutate(rng, seeds), (target_addr, target_port))
            yield deferLater(global_reactor, 0.002, lambda: None)
        yield self.wait_until(
            "most datagrams sent over the socket arrived",
            lambda: target.counters.packets_in - received_before >= OVER_THE_SOCKET * 0.9,
        )

        self.assertGreater(target.counters.dropped, TOTAL // 2, "most fuzz is refused")
        check_table(self, target)
        # The target kept answering the peer's probes: suspected at worst while a chunk
        # kept its loop busy, never declared failed.
        self.assertEqual([e for e in peer_events if e.kind == "failed"], [])
        # Forged accusations of the peer are accepted (without a cluster key nothing is
        # authenticated), and anti-entropy undoes them: the peer learns of one from a
        # push-pull and refutes it, and the next push-pull carries the refutation.
        for _ in range(2):
            answer = yield peer._push_pull((target_addr, target_port), join=False)
            self.assertIsNotNone(answer)
        yield self.wait_until("the target lists the peer alive again",
                              lambda: self.sees_alive(target, "peer"))
        self.assertGreater(peer.node.counters.probes, probes_before, "the peer kept probing")

        seq = 900_001
        client.write(add_crc(encode_message(Ping(seq, "target"))), (target_addr, target_port))
        yield self.wait_until("the target answers a real ping", lambda: seq in collector.acks)
        check_table(self, target)
