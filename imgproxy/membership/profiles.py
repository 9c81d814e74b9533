"""Timing and fan-out profiles for the SWIM state machine, as frozen values.

The numbers are memberlist's ``DefaultLANConfig`` and ``DefaultLocalConfig``
(config.go), in seconds, so an imgproxy node behaves like a serf agent on the
same network; the reconnect settings are serf's own defaults (serf/config.go).
Derive variants with ``attrs.evolve(LAN, ...)``.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Profile:
    """Every tunable of the membership protocol (memberlist's ``Config`` names, snake_case)."""

    name: str
    #: Deadline of one push-pull TCP exchange (the shell enforces it).
    tcp_timeout: float
    #: Members asked to ping a target indirectly after a failed direct ping.
    indirect_checks: int
    #: Broadcasts are sent ``retransmit_mult * ceil(log10(n + 1))`` times.
    retransmit_mult: int
    #: Suspicion lasts at least ``suspicion_mult * log10(n) * probe_interval``.
    suspicion_mult: int
    #: ... and at most this many times that minimum, without confirmations.
    suspicion_max_timeout_mult: int
    #: Period of the full-state TCP exchange with one random member.
    push_pull_interval: float
    #: How long a direct ping waits for its ack before going indirect.
    probe_timeout: float
    #: Period of the failure detector (one member probed per period).
    probe_interval: float
    #: Lifeguard: the probe interval stretches up to this multiple when we are unhealthy.
    awareness_max_multiplier: int
    #: Members that get each gossip round.
    gossip_nodes: int
    #: Period of the gossip round.
    gossip_interval: float
    #: Dead members still receive gossip (and stay in the table) this long.
    gossip_to_the_dead_time: float
    #: Largest packet we build, in bytes.
    udp_buffer_size: int = 1400
    #: A dead member may come back under a new address after this long (0: only once reaped).
    dead_node_reclaim_time: float = 0.0
    #: Skip memberlist's last-resort ping over TCP (used when the shell provides one).
    disable_tcp_pings: bool = False
    #: serf's reconnect: every this often, a push-pull with one random failed member, so
    #: that a healed partition becomes one cluster again (0 turns it off).
    reconnect_interval: float = 30.0
    #: ... for this long after it failed (serf's ReconnectTimeout).
    reconnect_timeout: float = 24 * 3600.0


LAN = Profile(
    name="lan",
    tcp_timeout=10.0,
    indirect_checks=3,
    retransmit_mult=4,
    suspicion_mult=4,
    suspicion_max_timeout_mult=6,
    push_pull_interval=30.0,
    probe_timeout=0.5,
    probe_interval=1.0,
    awareness_max_multiplier=8,
    gossip_nodes=3,
    gossip_interval=0.2,
    gossip_to_the_dead_time=30.0,
)
"""memberlist's ``DefaultLANConfig``."""

LOCAL = attrs.evolve(
    LAN,
    name="local",
    tcp_timeout=1.0,
    indirect_checks=1,
    retransmit_mult=2,
    suspicion_mult=3,
    push_pull_interval=15.0,
    probe_timeout=0.2,
    probe_interval=1.0,
    gossip_interval=0.1,
    gossip_to_the_dead_time=15.0,
    # A healed partition should be one cluster again within one push-pull interval.
    reconnect_interval=15.0,
)
"""memberlist's ``DefaultLocalConfig`` (loopback and single-host clusters)."""
