"""Lifeguard's local health awareness (memberlist's awareness.go)."""

from __future__ import annotations


class Awareness:
    """A health score in ``0 .. max_multiplier - 1``; 0 is healthy.

    Failed probes, missed nacks and having to refute raise it; successful probes
    lower it. Timeouts are stretched by ``score + 1`` so that a node that is
    itself slow stops accusing healthy peers.
    """

    def __init__(self, max_multiplier: int) -> None:
        self._max = max_multiplier
        self._score = 0

    @property
    def score(self) -> int:
        """The current health score (0 is best)."""
        return self._score

    def apply_delta(self, delta: int) -> None:
        """Move the score by ``delta``, clamped to ``0 .. max_multiplier - 1``."""
        self._score = max(0, min(self._max - 1, self._score + delta))

    def scale_timeout(self, timeout: float) -> float:
        """``timeout`` stretched by the current score."""
        return timeout * (self._score + 1)
