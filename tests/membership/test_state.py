"""One SwimNode against scripted peers: each test feeds messages and reads what it sends."""

from __future__ import annotations

import random
from collections.abc import Callable

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from imgproxy.membership.messages import (
    AckResp,
    Alive,
    Dead,
    IndirectPing,
    Message,
    NackResp,
    NodeState,
    Ping,
    PushNodeState,
    PushPull,
    Suspect,
)
from imgproxy.membership.profiles import LAN, Profile
from imgproxy.membership.state import MemberEvent, SwimNode, host_of

ME = b"\x7f\x00\x00\x01"


def ip(last: int) -> bytes:
    return bytes([10, 0, 0, last])


class Harness:
    """A node named ``me`` on 127.0.0.1:7946 with a recording network."""

    def __init__(
        self,
        profile: Profile = LAN,
        start: bool = True,
        tcp_ping: Callable[[tuple[str, int], Ping, float], Deferred[bool]] | None = None,
    ) -> None:
        self.clock = Clock()
        self.sent: list[tuple[tuple[str, int], list[Message]]] = []
        self.events: list[MemberEvent] = []
        self.push_pulls: list[tuple[tuple[str, int], bool]] = []
        self.node = SwimNode(
            name="me",
            addr=ME,
            port=7946,
            meta=b"m0",
            profile=profile,
            clock=self.clock,
            send=lambda addr, msgs: self.sent.append((addr, list(msgs))),
            on_event=self.events.append,
            request_push_pull=lambda addr, join: self.push_pulls.append((addr, join)),
            rng=random.Random(4),
            tcp_ping=tcp_ping,
        )
        if start:
            self.node.start()

    def add_peer(self, last: int, incarnation: int = 1, vsn: tuple[int, ...] = (1, 5, 2, 0, 0, 0)):
        name = f"p{last}"
        self.node.handle_packet([Alive(incarnation, name, ip(last), 7946, b"", vsn)], ("x", 1))
        return name

    def run(self, seconds: float, step: float = 0.01) -> None:
        """Advance in small steps: ``Clock.advance`` runs a rescheduling timer once a call."""
        for _ in range(round(seconds / step)):
            self.clock.advance(step)

    def take(self) -> list[tuple[tuple[str, int], list[Message]]]:
        out, self.sent = self.sent, []
        return out

    def messages_of(self, kind: type) -> list[tuple[tuple[str, int], Message]]:
        return [(addr, m) for addr, msgs in self.sent for m in msgs if isinstance(m, kind)]

    def payloads_of(self, kind: type) -> list[tuple[tuple[str, int], Message]]:
        """The first message of each packet sent, when of ``kind`` (not the piggybacked)."""
        return [(addr, msgs[0]) for addr, msgs in self.sent if isinstance(msgs[0], kind)]

    def state(self, name: str) -> NodeState | None:
        m = self.node.member(name)
        return None if m is None else m.state

    def kinds(self) -> list[tuple[str, str]]:
        return [(e.kind, e.member.name) for e in self.events]


def probe_p2(h: Harness) -> Ping:
    """Advance until the node pings p2; return that ping."""
    for _ in range(200):
        h.clock.advance(0.05)
        for _, m in h.messages_of(Ping):
            if m.node == "p2":
                return m
            # Everyone else answers at once.
            h.node.handle_packet([AckResp(m.seq_no)], ("x", 1))
        h.take()
    raise AssertionError("p2 was never probed")


class StartTests(SynchronousTestCase):
    def test_start_announces_us_alive_at_incarnation_one(self) -> None:
        h = Harness()
        me = h.node.member("me")
        assert me is not None
        self.assertEqual((me.state, me.incarnation, me.meta), (NodeState.ALIVE, 1, b"m0"))
        self.assertEqual(h.kinds(), [("join", "me")])

    def test_join_asks_for_a_joining_push_pull_with_every_seed(self) -> None:
        h = Harness()
        h.node.join([("10.0.0.2", 7946), ("10.0.0.3", 7000)])
        self.assertEqual(h.push_pulls, [(("10.0.0.2", 7946), True), (("10.0.0.3", 7000), True)])

    def test_stop_cancels_every_timer(self) -> None:
        h = Harness()
        h.add_peer(2)
        h.clock.advance(0.6)
        h.node.stop()
        h.take()
        h.clock.advance(100)
        self.assertEqual(h.sent, [])
        self.assertEqual(h.clock.getDelayedCalls(), [])


class AliveTests(SynchronousTestCase):
    def test_a_new_member_joins_and_its_news_is_passed_on(self) -> None:
        h = Harness()
        h.add_peer(2)
        self.assertEqual(h.state("p2"), NodeState.ALIVE)
        self.assertEqual(h.kinds()[-1], ("join", "p2"))
        h.node.handle_packet([Ping(7, "me", ip(3), 7946, "p3")], ("10.0.0.3", 7946))
        ((addr, msgs),) = h.take()
        self.assertEqual(addr, ("10.0.0.3", 7946))
        self.assertEqual(msgs[0], AckResp(7))
        self.assertIn(Alive(1, "p2", ip(2), 7946, b""), msgs[1:])

    def test_old_incarnations_are_ignored(self) -> None:
        h = Harness()
        h.add_peer(2, incarnation=5)
        h.node.handle_packet([Alive(4, "p2", ip(2), 7946, b"new")], ("x", 1))
        m = h.node.member("p2")
        assert m is not None
        self.assertEqual((m.incarnation, m.meta), (5, b""))

    def test_new_metadata_is_an_update(self) -> None:
        h = Harness()
        h.add_peer(2)
        h.node.handle_packet([Alive(2, "p2", ip(2), 7946, b"tags")], ("x", 1))
        self.assertEqual(h.kinds()[-1], ("update", "p2"))

    def test_a_live_member_cannot_move_to_another_address(self) -> None:
        h = Harness()
        h.add_peer(2)
        h.node.handle_packet([Alive(9, "p2", ip(9), 7946, b"")], ("x", 1))
        m = h.node.member("p2")
        assert m is not None
        self.assertEqual((m.addr, m.incarnation), (ip(2), 1))

    def test_a_dead_member_may_move_after_the_reclaim_time(self) -> None:
        h = Harness(attrs.evolve(LAN, dead_node_reclaim_time=5.0))
        h.add_peer(2)
        h.node.handle_packet([Dead(1, "p2", "p3")], ("x", 1))
        h.node.handle_packet([Alive(1, "p2", ip(9), 7000, b"")], ("x", 1))
        self.assertEqual(h.state("p2"), NodeState.DEAD)
        h.clock.advance(6)
        h.node.handle_packet([Alive(1, "p2", ip(9), 7000, b"")], ("x", 1))
        m = h.node.member("p2")
        assert m is not None
        self.assertEqual((m.state, m.addr, m.port), (NodeState.ALIVE, ip(9), 7000))
        self.assertEqual(h.kinds()[-1], ("join", "p2"))

    def test_a_left_member_may_come_back_elsewhere_at_once(self) -> None:
        h = Harness()
        h.add_peer(2)
        h.node.handle_packet([Dead(1, "p2", "p2")], ("x", 1))
        h.node.handle_packet([Alive(1, "p2", ip(9), 7000, b"")], ("x", 1))
        self.assertEqual(h.state("p2"), NodeState.ALIVE)

    def test_bad_protocol_versions_are_refused(self) -> None:
        h = Harness()
        h.add_peer(2, vsn=(3, 2, 2, 0, 0, 0))
        self.assertIsNone(h.node.member("p2"))

    def test_metadata_set_before_start_is_announced_at_start(self) -> None:
        h = Harness(start=False)
        h.node.update_meta(b"early")
        h.node.start()
        me = h.node.member("me")
        assert me is not None
        self.assertEqual((me.incarnation, me.meta), (1, b"early"))

    def test_update_meta_bumps_our_incarnation_and_gossips_it(self) -> None:
        h = Harness()
        h.node.update_meta(b"m1")
        me = h.node.member("me")
        assert me is not None
        self.assertEqual((me.incarnation, me.meta), (2, b"m1"))
        h.node.handle_packet([Ping(1, "me", ip(3), 7946, "p3")], ("x", 1))
        self.assertIn(Alive(2, "me", ME, 7946, b"m1"), [m for _, m in h.messages_of(Alive)])


class RefutationTests(SynchronousTestCase):
    def test_suspicion_of_us_is_refuted_above_the_accusation(self) -> None:
        h = Harness()
        h.node.handle_packet([Suspect(7, "me", "p2")], ("x", 1))
        self.assertEqual(h.node.incarnation, 8)
        self.assertEqual(h.state("me"), NodeState.ALIVE)
        self.assertEqual(h.node.counters.refutations, 1)
        self.assertEqual(h.node.health_score, 1)
        h.node.handle_packet([Ping(1, "me", ip(3), 7946, "p3")], ("x", 1))
        self.assertIn(Alive(8, "me", ME, 7946, b"m0"), [m for _, m in h.messages_of(Alive)])

    def test_death_of_us_is_refuted(self) -> None:
        h = Harness()
        h.node.handle_packet([Dead(1, "me", "p2")], ("x", 1))
        self.assertEqual(h.state("me"), NodeState.ALIVE)
        self.assertEqual(h.node.incarnation, 2)

    def test_a_stale_alive_about_us_with_other_meta_is_refuted(self) -> None:
        h = Harness()
        h.node.handle_packet([Alive(1, "me", ME, 7946, b"old")], ("x", 1))
        self.assertEqual(h.node.incarnation, 2)

    def test_another_node_with_our_name_is_an_error_that_says_so(self) -> None:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        h = Harness()
        h.node.handle_packet([Alive(5, "me", ip(9), 7000, b"x")], ("x", 1))
        me = h.node.member("me")
        assert me is not None
        self.assertEqual((me.addr, me.port, h.node.incarnation), (ME, 7946, 1))
        [error] = [e for e in events if e.get("log_level") == LogLevel.error]
        self.assertIn("give each node its own name", formatEvent(error))
        self.assertIn("10.0.0.9", formatEvent(error))

    def test_our_own_news_coming_back_is_not_refuted(self) -> None:
        h = Harness()
        h.node.handle_packet([Alive(1, "me", ME, 7946, b"m0")], ("x", 1))
        self.assertEqual(h.node.incarnation, 1)

    def test_old_accusations_are_ignored(self) -> None:
        h = Harness()
        h.node.handle_packet([Suspect(5, "me", "p2")], ("x", 1))
        h.node.handle_packet([Suspect(3, "me", "p3")], ("x", 1))
        self.assertEqual(h.node.incarnation, 6)


class SuspicionTests(SynchronousTestCase):
    def test_suspect_then_dead_after_the_minimum_in_a_small_cluster(self) -> None:
        h = Harness()
        h.add_peer(2)
        h.node.handle_packet([Suspect(1, "p2", "p3")], ("x", 1))
        self.assertEqual(h.state("p2"), NodeState.SUSPECT)
        # n = 2 < k + 2: no confirmations expected, 4 * 1 s.
        h.clock.advance(3.99)
        self.assertEqual(h.state("p2"), NodeState.SUSPECT)
        h.clock.advance(0.02)
        self.assertEqual(h.state("p2"), NodeState.DEAD)
        self.assertEqual(h.kinds()[-1], ("failed", "p2"))

    def test_an_alive_with_a_higher_incarnation_clears_suspicion(self) -> None:
        h = Harness()
        h.add_peer(2)
        h.node.handle_packet([Suspect(1, "p2", "p3")], ("x", 1))
        h.node.handle_packet([Alive(2, "p2", ip(2), 7946, b"")], ("x", 1))
        h.clock.advance(60)
        self.assertEqual(h.state("p2"), NodeState.ALIVE)
        self.assertNotIn(("failed", "p2"), h.kinds())

    def test_confirmations_shorten_the_timeout_in_a_larger_cluster(self) -> None:
        h = Harness()
        for i in range(2, 10):
            h.add_peer(i)
        # n = 9: min 4 s, max 24 s, k = 2.
        h.node.handle_packet([Suspect(1, "p2", "p3")], ("x", 1))
        h.clock.advance(10)
        self.assertEqual(h.state("p2"), NodeState.SUSPECT)
        h.node.handle_packet([Suspect(1, "p2", "p4"), Suspect(1, "p2", "p5")], ("x", 1))
        h.clock.advance(0)
        self.assertEqual(h.state("p2"), NodeState.DEAD)

    def test_unconfirmed_suspicion_lasts_the_maximum(self) -> None:
        h = Harness()
        for i in range(2, 10):
            h.add_peer(i)
        h.node.stop()  # no probing of our own
        h.node.handle_packet([Suspect(1, "p2", "p3")], ("x", 1))
        h.clock.advance(23.9)
        self.assertEqual(h.state("p2"), NodeState.SUSPECT)
        h.clock.advance(0.2)
        self.assertEqual(h.state("p2"), NodeState.DEAD)

    def test_a_member_that_says_goodbye_has_left(self) -> None:
        h = Harness()
        h.add_peer(2)
        h.node.handle_packet([Dead(1, "p2", "p2")], ("x", 1))
        self.assertEqual(h.state("p2"), NodeState.LEFT)
        self.assertEqual(h.kinds()[-1], ("leave", "p2"))


def address_of(last: int) -> tuple[str, int]:
    return (host_of(ip(last)), 7946)


class DirectVerdictTests(SynchronousTestCase):
    """"dead" sent straight to the members heard accusing (a deviation from memberlist)."""

    def silent_node(self, peers: int) -> Harness:
        """A node knowing p2..p(peers + 1), stopped: no probes or gossip, only direct sends."""
        h = Harness()
        for i in range(2, peers + 2):
            h.add_peer(i)
        h.node.stop()
        return h

    def buried(self, peers: int, declared_by: str) -> Harness:
        """A silent node that was told p2 is dead (or, declared by p2 itself, left)."""
        h = self.silent_node(peers)
        h.node.handle_packet([Dead(1, "p2", declared_by)], ("x", 1))
        h.take()
        return h

    def test_the_verdict_goes_straight_to_every_accuser_heard(self) -> None:
        h = self.silent_node(8)
        h.node.handle_packet([Suspect(1, "p2", "p3")], ("x", 1))
        h.node.handle_packet([Suspect(1, "p2", "p4"), Suspect(1, "p2", "p5")], ("x", 1))
        h.node.handle_packet([Suspect(1, "p2", "p6")], ("x", 1))  # past k = 2: still heard
        h.take()
        h.clock.advance(24)
        self.assertEqual(h.state("p2"), NodeState.DEAD)
        verdicts = sorted(addr for addr, m in h.payloads_of(Dead) if m == Dead(1, "p2", "me"))
        self.assertEqual(verdicts, [address_of(i) for i in (3, 4, 5, 6)])

    def test_a_verdict_heard_from_a_peer_is_passed_to_the_other_accusers(self) -> None:
        h = self.silent_node(8)
        h.node.handle_packet([Suspect(1, "p2", "p3"), Suspect(1, "p2", "p4")], ("x", 1))
        h.take()
        h.node.handle_packet([Dead(1, "p2", "p3")], ("x", 1))
        # p3 declared it: it knows. p4 is told directly.
        direct = [addr for addr, m in h.payloads_of(Dead) if m == Dead(1, "p2", "p3")]
        self.assertEqual(direct, [address_of(4)])

    def test_a_goodbye_is_not_sent_to_accusers(self) -> None:
        h = self.silent_node(8)
        h.node.handle_packet([Suspect(1, "p2", "p3")], ("x", 1))
        h.take()
        h.node.handle_packet([Dead(1, "p2", "p2")], ("x", 1))
        self.assertEqual(h.state("p2"), NodeState.LEFT)
        self.assertEqual(h.payloads_of(Dead), [])

    def test_a_late_accuser_of_a_buried_member_is_told_it_is_dead(self) -> None:
        h = self.buried(4, declared_by="p3")
        h.node.handle_packet([Suspect(1, "p2", "p4")], ("x", 1))
        self.assertEqual(h.payloads_of(Dead), [(address_of(4), Dead(1, "p2", "me"))])
        self.assertEqual(h.node.counters.corrections, 1)

    def test_late_accusers_are_told_once_a_probe_interval(self) -> None:
        h = self.buried(4, declared_by="p3")
        for _ in range(3):
            h.node.handle_packet([Suspect(1, "p2", "p4")], ("x", 1))
        self.assertEqual(len(h.payloads_of(Dead)), 1)
        h.clock.advance(LAN.probe_interval)
        h.node.handle_packet([Suspect(1, "p2", "p4")], ("x", 1))
        self.assertEqual(len(h.payloads_of(Dead)), 2)

    def test_an_accuser_of_a_newer_incarnation_is_not_contradicted(self) -> None:
        h = self.buried(4, declared_by="p3")
        # p4 has seen p2 come back at incarnation 2: our verdict is older news.
        h.node.handle_packet([Suspect(2, "p2", "p4")], ("x", 1))
        self.assertEqual(h.payloads_of(Dead), [])

    def test_a_late_accuser_of_a_member_that_left_hears_the_goodbye(self) -> None:
        h = self.buried(4, declared_by="p2")
        h.node.handle_packet([Suspect(1, "p2", "p4")], ("x", 1))
        self.assertEqual(h.payloads_of(Dead), [(address_of(4), Dead(1, "p2", "p2"))])


class ProbeTests(SynchronousTestCase):
    def test_an_acked_probe_keeps_the_member_alive_and_improves_health(self) -> None:
        h = Harness()
        h.add_peer(2)
        h.node.handle_packet([Suspect(1, "me", "p2")], ("x", 1))
        self.assertEqual(h.node.health_score, 1)
        ping = probe_p2(h)
        h.node.handle_packet([AckResp(ping.seq_no)], ("10.0.0.2", 7946))
        self.assertEqual(h.node.health_score, 0)
        h.clock.advance(5)
        self.assertEqual(h.state("p2"), NodeState.ALIVE)

    def test_silence_leads_to_indirect_probes_then_suspicion(self) -> None:
        h = Harness()
        for i in (2, 3, 4, 5):
            h.add_peer(i)
        ping = probe_p2(h)
        h.take()
        h.clock.advance(LAN.probe_timeout)
        reqs = [(a, m) for a, m in h.messages_of(IndirectPing)]
        self.assertEqual(len(reqs), 3)
        self.assertTrue(all(m.node == "p2" and m.nack and m.seq_no == ping.seq_no for _, m in reqs))
        self.assertNotIn(("10.0.0.2", 7946), [a for a, _ in reqs])
        # One peer nacks: two expected nacks are missing.
        h.node.handle_packet([NackResp(ping.seq_no)], reqs[0][0])
        h.clock.advance(LAN.probe_interval - LAN.probe_timeout)
        self.assertEqual(h.state("p2"), NodeState.SUSPECT)
        self.assertEqual(h.node.health_score, 2)
        self.assertEqual(h.node.counters.failed_probes, 1)

    def test_an_indirect_ack_saves_the_member(self) -> None:
        h = Harness()
        for i in (2, 3):
            h.add_peer(i)
        ping = probe_p2(h)
        h.clock.advance(0.7)
        h.node.handle_packet([AckResp(ping.seq_no)], ("10.0.0.3", 7946))
        h.clock.advance(1)
        self.assertEqual(h.state("p2"), NodeState.ALIVE)

    def test_peers_of_old_protocols_are_not_expected_to_nack(self) -> None:
        h = Harness()
        h.add_peer(2)
        h.add_peer(3, vsn=(1, 3, 2, 0, 0, 0))
        probe_p2(h)
        h.clock.advance(LAN.probe_timeout)
        ((_, req),) = h.messages_of(IndirectPing)
        self.assertFalse(req.nack)
        h.clock.advance(1)
        self.assertEqual(h.node.health_score, 1)

    def test_probing_a_suspect_tells_it_so(self) -> None:
        h = Harness()
        h.add_peer(2)
        h.node.handle_packet([Suspect(1, "p2", "p3")], ("x", 1))
        h.take()
        probe_p2(h)
        ((addr, msgs),) = [(a, ms) for a, ms in h.sent if any(isinstance(m, Ping) for m in ms)]
        self.assertEqual(addr, ("10.0.0.2", 7946))
        self.assertEqual(msgs[1], Suspect(1, "p2", "me"))

    def test_an_unhealthy_node_waits_longer_before_suspecting(self) -> None:
        h = Harness()
        h.add_peer(2)
        h.node.handle_packet([Suspect(1, "me", "x"), Suspect(2, "me", "y")], ("x", 1))
        self.assertEqual(h.node.health_score, 2)
        ping = probe_p2(h)
        h.clock.advance(2.5)  # the probe now lasts 3 s
        h.node.handle_packet([AckResp(ping.seq_no)], ("10.0.0.2", 7946))
        self.assertEqual(h.state("p2"), NodeState.ALIVE)
        self.assertEqual(h.node.health_score, 1)

    def test_every_member_is_probed_once_a_pass(self) -> None:
        h = Harness()
        for i in range(2, 7):
            h.add_peer(i)
        seen: list[str] = []
        for _ in range(5):
            h.clock.advance(1.0)
            for _, m in h.messages_of(Ping):
                seen.append(m.node)
                h.node.handle_packet([AckResp(m.seq_no)], ("x", 1))
            h.take()
        self.assertEqual(sorted(seen), ["p2", "p3", "p4", "p5", "p6"])


class TcpFallbackTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.asked: list[tuple[tuple[str, int], Ping, float]] = []
        self.answers: list[Deferred[bool]] = []

    def tcp_ping(self, addr: tuple[str, int], ping: Ping, timeout: float) -> Deferred[bool]:
        self.asked.append((addr, ping, timeout))
        d: Deferred[bool] = Deferred()
        self.answers.append(d)
        return d

    def test_a_member_reached_over_tcp_is_not_suspected(self) -> None:
        h = Harness(tcp_ping=self.tcp_ping)
        h.add_peer(2)
        ping = probe_p2(h)
        h.clock.advance(LAN.probe_timeout)
        ((addr, tcp, timeout),) = self.asked
        self.assertEqual((addr, tcp.seq_no, tcp.node), (("10.0.0.2", 7946), ping.seq_no, "p2"))
        self.assertAlmostEqual(timeout, LAN.probe_interval - LAN.probe_timeout)
        self.answers[0].callback(True)
        h.clock.advance(1)
        self.assertEqual(h.state("p2"), NodeState.ALIVE)
        self.assertEqual(h.node.counters.failed_probes, 0)

    def test_a_failed_tcp_ping_still_leads_to_suspicion(self) -> None:
        h = Harness(tcp_ping=self.tcp_ping)
        h.add_peer(2)
        probe_p2(h)
        h.clock.advance(LAN.probe_timeout)
        self.answers[0].callback(False)
        h.clock.advance(1)
        self.assertEqual(h.state("p2"), NodeState.SUSPECT)

    def test_old_protocol_members_get_no_tcp_ping(self) -> None:
        h = Harness(tcp_ping=self.tcp_ping)
        h.add_peer(2, vsn=(1, 2, 2, 0, 0, 0))
        probe_p2(h)
        h.clock.advance(LAN.probe_timeout)
        self.assertEqual(self.asked, [])

    def test_a_stream_ping_is_answered_for_us_only(self) -> None:
        h = Harness()
        self.assertEqual(h.node.answer_stream_ping(Ping(9, "me")), AckResp(9))
        self.assertIsNone(h.node.answer_stream_ping(Ping(9, "other")))


class ReconnectTests(SynchronousTestCase):
    def test_failed_members_are_retried_with_a_joining_push_pull(self) -> None:
        h = Harness(attrs.evolve(LAN, push_pull_interval=0.0))
        h.add_peer(2)
        h.node.handle_packet([Dead(1, "p2", "p3")], ("x", 1))
        h.run(LAN.reconnect_interval + 1, step=0.1)
        self.assertEqual(h.push_pulls, [(("10.0.0.2", 7946), True)])

    def test_members_that_left_are_not_retried(self) -> None:
        h = Harness(attrs.evolve(LAN, push_pull_interval=0.0))
        h.add_peer(2)
        h.node.handle_packet([Dead(1, "p2", "p2")], ("x", 1))
        h.run(3 * LAN.reconnect_interval, step=0.1)
        self.assertEqual(h.push_pulls, [])


class PingHandlingTests(SynchronousTestCase):
    def test_a_ping_for_someone_else_is_ignored(self) -> None:
        h = Harness()
        h.node.handle_packet([Ping(1, "other", ip(3), 7946, "p3")], ("x", 1))
        self.assertEqual(h.sent, [])

    def test_without_a_source_the_ack_goes_back_to_the_sender(self) -> None:
        h = Harness()
        h.node.handle_packet([Ping(1, "me")], ("10.1.1.1", 5000))
        self.assertEqual(h.take()[0][0], ("10.1.1.1", 5000))

    def test_indirect_ping_relays_the_ack(self) -> None:
        h = Harness()
        req = IndirectPing(42, ip(2), 7946, "p2", True, ip(3), 7946, "p3")
        h.node.handle_packet([req], ("10.0.0.3", 7946))
        ((addr, msgs),) = h.take()
        self.assertEqual(addr, ("10.0.0.2", 7946))
        ping = msgs[0]
        assert isinstance(ping, Ping)
        self.assertEqual((ping.node, ping.source_node), ("p2", "me"))
        h.node.handle_packet([AckResp(ping.seq_no)], ("10.0.0.2", 7946))
        h.clock.advance(1)
        self.assertEqual([(a, ms[0]) for a, ms in h.take()], [(("10.0.0.3", 7946), AckResp(42))])

    def test_indirect_ping_nacks_when_the_target_is_silent(self) -> None:
        h = Harness()
        h.node.stop()
        req = IndirectPing(42, ip(2), 7946, "p2", True, ip(3), 7946, "p3")
        h.node.handle_packet([req], ("10.0.0.3", 7946))
        h.take()
        h.clock.advance(LAN.probe_timeout)
        self.assertEqual([(a, ms[0]) for a, ms in h.take()], [(("10.0.0.3", 7946), NackResp(42))])


class PushPullTests(SynchronousTestCase):
    def test_local_state_lists_every_member(self) -> None:
        h = Harness()
        h.add_peer(2, incarnation=3)
        state = h.node.local_state(join=True)
        self.assertTrue(state.join)
        self.assertEqual(
            sorted(state.states, key=lambda s: s.name),
            [
                PushNodeState("me", ME, 7946, b"m0", 1, NodeState.ALIVE),
                PushNodeState("p2", ip(2), 7946, b"", 3, NodeState.ALIVE),
            ],
        )

    def test_merge_takes_the_live_suspects_the_dead_and_honours_the_left(self) -> None:
        h = Harness()
        h.add_peer(2)
        h.add_peer(3)
        remote = PushPull(
            join=False,
            states=(
                PushNodeState("p2", ip(2), 7946, b"", 1, NodeState.DEAD),
                PushNodeState("p3", ip(3), 7946, b"", 1, NodeState.LEFT),
                PushNodeState("p4", ip(4), 7946, b"", 2, NodeState.ALIVE),
            ),
        )
        h.node.merge_remote_state(remote)
        self.assertEqual(
            (h.state("p2"), h.state("p3"), h.state("p4")),
            (NodeState.SUSPECT, NodeState.LEFT, NodeState.ALIVE),
        )

    def test_periodic_push_pull_picks_a_live_member(self) -> None:
        h = Harness()
        h.add_peer(2)
        h.clock.advance(LAN.push_pull_interval * 2)
        self.assertTrue(h.push_pulls)
        self.assertTrue(all(pp == (("10.0.0.2", 7946), False) for pp in h.push_pulls))


class LeaveTests(SynchronousTestCase):
    def test_leave_alone_resolves_at_once(self) -> None:
        h = Harness()
        d = h.node.leave(5.0)
        self.assertIs(self.successResultOf(d), True)
        self.assertEqual(h.state("me"), NodeState.LEFT)
        self.assertEqual(h.kinds()[-1], ("leave", "me"))

    def test_leave_resolves_once_the_goodbye_is_sent_out(self) -> None:
        h = Harness()
        h.add_peer(2)
        d = h.node.leave(60.0)
        self.assertNoResult(d)
        h.run(5)
        self.assertIs(self.successResultOf(d), True)
        goodbyes = [m for _, m in h.messages_of(Dead)]
        self.assertEqual(goodbyes, [Dead(1, "me", "me")] * 4)  # 4 * ceil(log10(3))

    def test_leave_times_out_when_nothing_can_be_sent(self) -> None:
        h = Harness()
        h.add_peer(2)
        h.node.stop()
        d = h.node.leave(2.0)
        h.clock.advance(2.0)
        self.assertIs(self.successResultOf(d), False)

    def test_stopping_during_a_leave_resolves_it_false(self) -> None:
        h = Harness()
        h.add_peer(2)
        d = h.node.leave(60.0)
        h.node.stop()
        self.assertIs(self.successResultOf(d), False)

    def test_after_leaving_accusations_are_not_refuted(self) -> None:
        h = Harness()
        h.add_peer(2)
        h.node.leave(1.0)
        h.node.handle_packet([Dead(5, "me", "p2"), Alive(9, "me", ME, 7946, b"")], ("x", 1))
        self.assertEqual(h.state("me"), NodeState.LEFT)
        self.assertEqual(h.node.counters.refutations, 0)


class ReapTests(SynchronousTestCase):
    def test_long_dead_members_are_forgotten(self) -> None:
        h = Harness()
        h.add_peer(2)
        h.add_peer(3)
        h.node.handle_packet([Dead(1, "p2", "p3")], ("x", 1))
        for _ in range(40):
            h.clock.advance(1.0)
            for _, m in h.messages_of(Ping):
                h.node.handle_packet([AckResp(m.seq_no)], ("x", 1))
            h.take()
        self.assertIsNone(h.node.member("p2"))
        self.assertEqual(h.state("p3"), NodeState.ALIVE)


class RestartedMemberTests(SynchronousTestCase):
    """memberlist issue 311: a member restarted from incarnation 0 that we hold dead above it."""

    def test_its_ping_is_answered_with_the_accusation(self) -> None:
        h = Harness()
        h.add_peer(2, incarnation=100)
        h.node.handle_packet([Dead(100, "p2", "p3")], ("x", 1))
        h.take()
        h.node.handle_packet([Ping(1, "me", ip(2), 7946, "p2")], ("10.0.0.2", 7946))
        ((addr, msgs),) = h.take()
        self.assertEqual(addr, ("10.0.0.2", 7946))
        self.assertEqual(msgs[:2], [AckResp(1), Suspect(100, "p2", "me")])

    def test_its_low_alive_is_answered_with_a_suspicion_not_ignored(self) -> None:
        h = Harness()
        h.add_peer(2, incarnation=100)
        h.node.handle_packet([Dead(100, "p2", "p3")], ("x", 1))
        h.node.handle_packet([Alive(1, "p2", ip(2), 7946, b"")], ("x", 1))
        self.assertEqual(h.state("p2"), NodeState.DEAD)
        h.node.handle_packet([Ping(1, "me", ip(4), 7946, "p4")], ("10.0.0.4", 7946))
        self.assertIn(Suspect(100, "p2", "me"), [m for _, m in h.messages_of(Suspect)])
        # Its refutation above the accusation brings it back.
        h.node.handle_packet([Alive(101, "p2", ip(2), 7946, b"")], ("x", 1))
        self.assertEqual(h.state("p2"), NodeState.ALIVE)

    def test_an_accusation_of_an_older_us_regossips_our_current_alive(self) -> None:
        h = Harness()
        h.node.handle_packet([Suspect(5, "me", "p2")], ("x", 1))
        h.run(1)  # let the refutation go out
        h.take()
        h.node.handle_packet([Dead(3, "me", "p2")], ("x", 1))
        self.assertEqual(h.node.incarnation, 6)
        h.node.handle_packet([Ping(1, "me", ip(3), 7946, "p3")], ("x", 1))
        self.assertIn(Alive(6, "me", ME, 7946, b"m0"), [m for _, m in h.messages_of(Alive)])

    def test_a_restarted_node_refutes_what_it_is_told(self) -> None:
        h = Harness()
        h.node.handle_packet([Suspect(100, "me", "p2")], ("x", 1))
        self.assertEqual(h.node.incarnation, 101)


class BadInputTests(SynchronousTestCase):
    def test_an_alive_with_a_malformed_address_is_ignored(self) -> None:
        h = Harness()
        h.node.handle_packet([Alive(1, "p2", b"\x01\x02\x03", 7946, b"")], ("x", 1))
        h.node.handle_packet([Alive(1, "p3", ip(3), 70000, b"")], ("x", 1))
        self.assertEqual([m.name for m in h.node.members()], ["me"])

    def test_a_bad_message_does_not_cost_the_rest_of_the_packet(self) -> None:
        h = Harness()
        bad = IndirectPing(1, b"\x01", 7946, "p9", True)
        h.node.handle_packet([bad, Alive(1, "p2", ip(2), 7946, b"")], ("x", 1))
        self.assertEqual(h.state("p2"), NodeState.ALIVE)

    def test_unknown_members_at_incarnation_zero_are_no_news(self) -> None:
        h = Harness()
        h.node.handle_packet([Alive(0, "p2", ip(2), 7946, b"")], ("x", 1))
        self.assertIsNone(h.node.member("p2"))

    def test_an_alive_without_a_port_means_ours(self) -> None:
        h = Harness()
        h.node.handle_packet([Alive(1, "p2", ip(2), 0, b"")], ("x", 1))
        m = h.node.member("p2")
        assert m is not None
        self.assertEqual(m.port, 7946)

    def test_a_failing_send_is_logged_not_raised(self) -> None:
        h = Harness()

        def broken(addr: tuple[str, int], msgs: list[Message]) -> None:
            raise OSError("network is unreachable")

        h.node._send = broken
        h.node.handle_packet([Ping(1, "me", ip(3), 7946, "p3")], ("x", 1))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(h.node.counters.messages_out["AckResp"], 1)


class AddressTests(SynchronousTestCase):
    def test_raw_addresses_print_as_hosts(self) -> None:
        self.assertEqual(host_of(ip(2)), "10.0.0.2")
        self.assertEqual(host_of(bytes(15) + b"\x01"), "::1")
