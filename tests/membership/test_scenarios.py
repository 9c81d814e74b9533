"""Whole-cluster behaviour in the deterministic simulation: joins, crashes, loss, pauses,
slow members, partitions, restarts and leaves. Each runs minutes of cluster time in
seconds of wall time."""

from __future__ import annotations

import random
import time

import attrs
from twisted.trial.unittest import SynchronousTestCase

from imgproxy.membership.messages import Dead, NodeState, Suspect
from imgproxy.membership.profiles import LAN, LOCAL, Profile
from imgproxy.membership.suspicion import suspicion_timeout
from tests.membership.simulation import Simulation, crash_detection

ALIVE, SUSPECT, DEAD, LEFT = NodeState.ALIVE, NodeState.SUSPECT, NodeState.DEAD, NodeState.LEFT


def converged_cluster(
    n: int, profile: Profile = LAN, seed: int = 1, **options: float
) -> tuple[Simulation, list[str]]:
    """``n`` nodes that joined through the first and all see each other alive."""
    sim = Simulation(profile, seed=seed, **options)
    names = sim.add_nodes(n)
    sim.join_all(names, names[0])
    took = sim.run_until(lambda: sim.all_see(names, names, ALIVE), 120)
    assert took is not None, "the cluster never converged"
    sim.run(5)
    return sim, names


class HarnessTests(SynchronousTestCase):
    """The simulation itself: the faults it injects are the faults asked for."""

    def test_a_paused_node_runs_nothing_until_resumed_then_all_in_order(self) -> None:
        sim = Simulation(LAN)
        sim.add_node("a", start=False)
        clock = sim.nodes["a"].clock
        ran: list[tuple[str, float]] = []
        clock.callLater(1.0, lambda: ran.append(("first", sim.now())))
        clock.callLater(2.0, lambda: ran.append(("second", sim.now())))
        sim.pause("a")
        sim.run(5)
        self.assertEqual(ran, [])
        sim.resume("a")
        self.assertEqual(ran, [("first", 5.0), ("second", 5.0)])

    def test_partitions_drop_packets_between_groups_only(self) -> None:
        sim, names = converged_cluster(4)
        a, b, c, d = names
        sim.partition([a, b], [c, d])
        got: list[str] = []
        for name in names:
            sim.nodes[name].swim.stop()  # only our two packets are in flight
            sim.nodes[name].swim.handle_packet = lambda msgs, addr, n=name: got.append(n)
        sim._send(sim.nodes[a], sim.nodes[b].address, [Suspect(1, "x", "y")])
        sim._send(sim.nodes[a], sim.nodes[c].address, [Suspect(1, "x", "y")])
        sim.run(0.1)
        self.assertEqual(got, [b])

    def test_link_delay_and_timer_lag(self) -> None:
        sim, names = converged_cluster(2)
        a, b = names
        for name in names:
            sim.nodes[name].swim.stop()
        sim.run(1)  # let what is in flight land
        sim.link_delay[(a, b)] = 0.5
        got: list[float] = []
        sim.nodes[b].swim.handle_packet = lambda msgs, addr: got.append(sim.now())
        sent_at = sim.now()
        sim._send(sim.nodes[a], sim.nodes[b].address, [Suspect(1, "x", "y")])
        sim.run(1)
        self.assertEqual(len(got), 1)
        self.assertGreaterEqual(got[0] - sent_at, 0.5)
        sim.set_slow(a, 0.0, timer_lag=0.25)
        fired: list[float] = []
        start = sim.now()
        sim.nodes[a].clock.callLater(1.0, lambda: fired.append(sim.now() - start))
        sim.run(2)
        self.assertEqual(fired, [1.25])


class JoinTests(SynchronousTestCase):
    def test_a_hundred_nodes_converge(self) -> None:
        started = time.monotonic()
        sim = Simulation(LAN, seed=7)
        names = sim.add_nodes(100)
        sim.join_all(names, names[0])
        took = sim.run_until(lambda: all(sim.alive_count(n) == 100 for n in names), 60)
        self.assertIsNotNone(took)
        self.assertEqual(sim.events("failed"), [])
        self.assertLess(time.monotonic() - started, 30, "the 100-node join must stay fast")


class CrashTests(SynchronousTestCase):
    def check_detection(self, profile: Profile, n: int) -> None:
        sim, names = converged_cluster(n, profile, seed=n)
        times = crash_detection(sim, names[-1], timeout=120)
        self.assertEqual(len(times), n - 1, "every survivor declares the crashed node dead")
        minimum = suspicion_timeout(profile.suspicion_mult, n, profile.probe_interval)
        maximum = profile.suspicion_max_timeout_mult * minimum
        # SWIM's bound: someone probes it within a pass, the probe fails, the suspicion
        # runs out, the news spreads.
        bound = (n - 1) * profile.probe_interval + profile.probe_interval + maximum + 2.0
        self.assertGreaterEqual(min(times), minimum)
        self.assertLessEqual(max(times), bound)
        self.assertEqual([o for o in sim.events("failed") if o.member != names[-1]], [])

    def test_lan_crash_of_one_in_three(self) -> None:
        self.check_detection(LAN, 3)

    def test_lan_crash_of_one_in_ten(self) -> None:
        self.check_detection(LAN, 10)

    def test_local_crash_of_one_in_five(self) -> None:
        self.check_detection(LOCAL, 5)


class DetectionTailTests(SynchronousTestCase):
    def test_no_survivor_waits_out_the_maximum_suspicion_at_local_n5(self) -> None:
        """With Local's RetransmitMult of 2, the few transmissions of "dead" in a
        five-node cluster missed one survivor in about one crash in twenty here, and it
        then sat out the maximum suspicion timeout (12.6 s) alone: 20 s detections.
        The verdict sent straight to the accusers closes that tail."""
        slowest = []
        for seed in range(40):
            sim, names = converged_cluster(5, LOCAL, seed=seed)
            times = crash_detection(sim, names[seed % 5], timeout=120)
            self.assertEqual(len(times), 4)
            slowest.append(times[-1])
        minimum = suspicion_timeout(LOCAL.suspicion_mult, 5, LOCAL.probe_interval)
        # A probe pass (4 s), the probe itself, the shortest suspicion, and slack for
        # the news to spread: far below a maximum-suspicion wait (> 12.6 s).
        self.assertLess(max(slowest), 4 * LOCAL.probe_interval + 1 + minimum + 3)


class LossTests(SynchronousTestCase):
    def test_fifty_nodes_at_ten_percent_loss_for_five_minutes_lose_no_one(self) -> None:
        sim, names = converged_cluster(50, seed=3)
        sim.loss = 0.10
        sim.run(300)
        self.assertGreater(sim.packets_dropped, 0)
        self.assertEqual(sim.events("failed"), [])
        self.assertTrue(sim.all_see(names, names, ALIVE))


class PauseTests(SynchronousTestCase):
    def test_a_short_pause_is_suspected_refuted_and_never_fatal(self) -> None:
        sim, names = converged_cluster(10)
        paused = names[3]
        others = [n for n in names if n != paused]
        before = sim.nodes[paused].swim.incarnation
        sim.pause(paused)
        suspected = sim.run_until(
            lambda: any(sim.state_of(o, paused) == SUSPECT for o in others), 3.5
        )
        self.assertIsNotNone(suspected, "the paused node is suspected")
        # Paused for less than the suspicion minimum (4 s here).
        sim.run_to(sim.now() - (suspected or 0) + 3.5)
        sim.resume(paused)
        took = sim.run_until(lambda: sim.all_see(names, [paused], ALIVE), 10)
        self.assertIsNotNone(took)
        self.assertGreater(sim.nodes[paused].swim.incarnation, before)
        self.assertGreaterEqual(sim.nodes[paused].swim.counters.refutations, 1)
        sim.run(30)
        self.assertEqual(sim.events("failed"), [])

    def test_a_long_pause_is_fatal_then_the_node_comes_back_by_itself(self) -> None:
        sim, names = converged_cluster(10)
        paused = names[3]
        others = [n for n in names if n != paused]
        before = sim.nodes[paused].swim.incarnation
        sim.pause(paused)
        sim.run(60)
        # Every other member declared it dead (some have forgotten it since).
        self.assertEqual({o.observer for o in sim.events("failed", paused)}, set(others))
        self.assertTrue(all(sim.state_of(o, paused) in (DEAD, None) for o in others))
        sim.resume(paused)
        took = sim.run_until(lambda: sim.all_see(names, names, ALIVE), 30)
        self.assertIsNotNone(took)
        self.assertGreater(sim.nodes[paused].swim.incarnation, before)
        rejoined = {o.observer for o in sim.events("join", paused) if o.observer != paused}
        self.assertEqual(rejoined, set(others))


class SlowNodeTests(SynchronousTestCase):
    def run_slow(self, awareness_max_multiplier: int) -> tuple[Simulation, str]:
        profile = attrs.evolve(LAN, awareness_max_multiplier=awareness_max_multiplier)
        sim, names = converged_cluster(10, profile, seed=2)
        slow = names[2]
        # Its event loop lags: every ack it gets is handled 2 x ProbeTimeout late.
        sim.set_slow(slow, 2 * profile.probe_timeout)
        sim.run(300)
        return sim, slow

    def test_a_slow_prober_gets_no_healthy_member_declared_dead(self) -> None:
        sim, slow = self.run_slow(LAN.awareness_max_multiplier)
        self.assertEqual([o for o in sim.events("failed") if o.member != slow], [])
        self.assertGreater(sim.nodes[slow].swim.counters.failed_probes, 0)

    def test_lifeguard_makes_the_slow_prober_accuse_far_less(self) -> None:
        with_lifeguard, slow = self.run_slow(LAN.awareness_max_multiplier)
        without, _ = self.run_slow(1)
        accusations = with_lifeguard.nodes[slow].swim.counters.suspicions
        self.assertLess(accusations * 3, without.nodes[slow].swim.counters.suspicions)


class PartitionTests(SynchronousTestCase):
    def test_two_halves_split_then_heal_into_one_cluster(self) -> None:
        sim, names = converged_cluster(10)
        left, right = names[:5], names[5:]
        sim.partition(left, right)
        split = sim.run_until(
            lambda: sim.all_see(left, right, DEAD) and sim.all_see(right, left, DEAD), 120
        )
        self.assertIsNotNone(split, "each half declares the other dead")
        self.assertTrue(sim.all_see(left, left, ALIVE) and sim.all_see(right, right, ALIVE))
        sim.run(120)  # long past gossip to the dead: only push-pull can merge them
        sim.heal()
        healed = sim.run_until(lambda: sim.all_see(names, names, ALIVE), 300)
        self.assertIsNotNone(healed)


class RestartTests(SynchronousTestCase):
    def restart_on_new_port(self, profile: Profile) -> float:
        sim, names = converged_cluster(10, profile)
        node = names[4]
        sim.crash(node)
        sim.run(2)
        sim.add_node(node, port=31000)
        sim.join(node, [names[0]])

        def everyone_sees_the_new_one() -> bool:
            for observer in names:
                m = sim.nodes[observer].swim.member(node)
                if m is None or m.port != 31000 or m.state != ALIVE:
                    return False
            return True

        took = sim.run_until(everyone_sees_the_new_one, 300)
        self.assertIsNotNone(took)
        return took or 0.0

    def test_restart_with_the_same_name_on_a_new_port(self) -> None:
        # memberlist's default: the old address is forgotten once reaped.
        took = self.restart_on_new_port(LAN)
        self.assertLess(took, LAN.gossip_to_the_dead_time + 2 * LAN.push_pull_interval)

    def test_dead_node_reclaim_lets_it_back_sooner(self) -> None:
        took = self.restart_on_new_port(attrs.evolve(LAN, dead_node_reclaim_time=5.0))
        self.assertLess(took, 20)

    def test_mass_restart_with_incarnations_reset_converges(self) -> None:
        """Every node goes down and comes back fresh (incarnation 0) within 45 s, long
        enough for the others to declare it dead at its old, high incarnation."""
        rng = random.Random(5)
        sim, names = converged_cluster(10, seed=5)
        for name in names:
            # Drive incarnations high, as a long-lived cluster's are.
            accused = rng.randrange(10, 200)
            sim.nodes[name].swim.handle_packet([Suspect(accused, name, "x")], ("127.0.0.1", 1))
        sim.run(10)
        plan: list[tuple[float, bool, str]] = []
        for name in names:
            down = sim.now() + rng.uniform(0, 30)
            plan += [(down, False, name), (down + rng.uniform(2, 15), True, name)]
        for when, up, name in sorted(plan):
            sim.run_to(when)
            if not up:
                sim.crash(name)
                continue
            sim.restart(name)
            seeds = [n for n in sim.live_names() if n != name]
            if seeds:
                sim.join(name, [rng.choice(seeds)])
        self.assertGreater(len(sim.events("failed")), 0, "members died at high incarnations")
        took = sim.run_until(lambda: sim.all_see(names, names, ALIVE), 60)
        self.assertIsNotNone(took)
        self.assertLess(took or 0, 10)

    def test_a_stale_dead_at_a_higher_incarnation_does_not_hide_a_live_node(self) -> None:
        """memberlist issue 311, made deterministic: push-pull and reconnect are off, so
        nothing but our answer to the accused can bring it back before reaping."""
        profile = attrs.evolve(LAN, push_pull_interval=0.0, reconnect_interval=0.0)
        sim, names = converged_cluster(6, profile)
        holder, node = names[1], names[5]
        # The holder alone hears that the node died at an incarnation it never reached:
        # everything the holder says about it is lost.
        for other in names:
            sim.link_loss[(holder, other)] = 1.0
        sim.nodes[holder].swim.handle_packet([Dead(100, node, "x")], ("127.0.0.1", 1))
        sim.run(1.0)
        sim.link_loss.clear()
        self.assertEqual(sim.state_of(holder, node), DEAD)
        self.assertLess(sim.nodes[node].swim.incarnation, 100)
        took = sim.run_until(lambda: sim.all_see(names, [node], ALIVE), 10)
        self.assertIsNotNone(took, "the node is visible again well before it is reaped")
        self.assertGreater(sim.nodes[node].swim.incarnation, 100)


class LeaveTests(SynchronousTestCase):
    def test_a_graceful_leave_is_left_not_failed(self) -> None:
        sim, names = converged_cluster(10)
        leaving = names[2]
        done = sim.nodes[leaving].swim.leave(10.0)
        others = [n for n in names if n != leaving]
        took = sim.run_until(lambda: sim.all_see(others, [leaving], LEFT), 10)
        self.assertIsNotNone(took)
        sim.run(5)
        self.assertIs(self.successResultOf(done), True)
        sim.crash(leaving)  # the shell stops it once the goodbye is out
        sim.run(60)
        self.assertEqual(sim.events("failed"), [])
        self.assertEqual({o.observer for o in sim.events("leave", leaving)}, set(names))
