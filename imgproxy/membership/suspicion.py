"""Lifeguard suspicion timers (memberlist's suspicion.go and the timeout formulas of util.go)."""

from __future__ import annotations

import math
from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime


def suspicion_timeout(suspicion_mult: int, n: int, interval: float) -> float:
    """The minimum suspicion time: ``suspicion_mult * max(1, log10(n)) * interval``.

    memberlist truncates the node scale to thousandths; so do we, to agree on the
    exact figure.
    """
    node_scale = max(1.0, math.log10(max(1.0, float(n))))
    return suspicion_mult * math.floor(node_scale * 1000) * interval / 1000


def retransmit_limit(retransmit_mult: int, n: int) -> int:
    """How many times a broadcast is sent: ``retransmit_mult * ceil(log10(n + 1))``."""
    return retransmit_mult * math.ceil(math.log10(n + 1))


def push_pull_scale(interval: float, n: int) -> float:
    """The push-pull period, stretched once the cluster passes 32 members."""
    threshold = 32
    if n <= threshold:
        return interval
    multiplier = math.ceil(math.log2(n) - math.log2(threshold)) + 1
    return multiplier * interval


def remaining_suspicion_time(
    n: int, k: int, elapsed: float, min_timeout: float, max_timeout: float
) -> float:
    """Time left before a suspect is declared dead, given ``n`` of ``k`` confirmations.

    The timeout falls from ``max_timeout`` towards ``min_timeout`` logarithmically
    with the number of independent confirmations, floored to the millisecond.
    """
    if k < 1:
        return min_timeout - elapsed
    frac = math.log(n + 1.0) / math.log(k + 1.0)
    raw = max_timeout - frac * (max_timeout - min_timeout)
    timeout = math.floor(1000.0 * raw) / 1000.0
    timeout = max(timeout, min_timeout)
    return timeout - elapsed


class SuspicionTimer:
    """The countdown for one suspect member, shortened by independent confirmations.

    ``on_timeout`` gets the number of confirmations seen when the time runs out.
    With ``k < 1`` no confirmations are expected and the timer runs for ``min_timeout``.
    """

    def __init__(
        self,
        from_node: str,
        k: int,
        min_timeout: float,
        max_timeout: float,
        clock: IReactorTime,
        on_timeout: Callable[[int], None],
    ) -> None:
        self._k = k
        self._min = min_timeout
        self._max = max_timeout
        self._clock = clock
        self._on_timeout = on_timeout
        self._confirmations = {from_node}
        self._accusers = {from_node}
        self._n = 0
        self._start = clock.seconds()
        timeout = max_timeout if k >= 1 else min_timeout
        self._call: IDelayedCall | None = clock.callLater(timeout, self._fire)

    @property
    def confirmations(self) -> int:
        """Independent confirmations counted so far (the first accuser excluded)."""
        return self._n

    @property
    def accusers(self) -> frozenset[str]:
        """Every member heard accusing the suspect, past the ``k`` that count too."""
        return frozenset(self._accusers)

    def deadline(self) -> float | None:
        """Clock time the timer fires at, or None once it has fired or been cancelled."""
        if self._call is None or not self._call.active():
            return None
        return self._call.getTime()

    def confirm(self, from_node: str) -> bool:
        """Count ``from_node``'s accusation; True if it was new information worth re-gossiping."""
        self._accusers.add(from_node)
        if self._n >= self._k or from_node in self._confirmations:
            return False
        self._confirmations.add(from_node)
        self._n += 1
        elapsed = self._clock.seconds() - self._start
        remaining = remaining_suspicion_time(self._n, self._k, elapsed, self._min, self._max)
        if self._call is not None and self._call.active():
            self._call.cancel()
            # Fire from the clock rather than re-entrantly from inside message handling.
            self._call = self._clock.callLater(max(0.0, remaining), self._fire)
        return True

    def cancel(self) -> None:
        """Stop the timer; it never fires afterwards."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _fire(self) -> None:
        self._call = None
        self._on_timeout(self._n)
