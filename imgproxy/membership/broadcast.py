"""The transmit-limited broadcast queue (memberlist's queue.go), over message values.

Every piece of news is sent a limited number of times, piggybacked on pings, acks
and gossip. Fresh news goes first; a newer broadcast about a member replaces any
older one still queued about the same member.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from imgproxy.membership.messages import Message
from imgproxy.membership.suspicion import retransmit_limit


@attrs.define(eq=False)
class _Queued:
    name: str | None
    message: Message
    size: int
    seq: int
    transmits: int = 0
    on_finished: Callable[[], None] | None = None

    def order(self) -> tuple[int, int, int]:
        # Fewest transmits first; among equals the largest, then the newest.
        return (self.transmits, -self.size, -self.seq)

    def finish(self) -> None:
        if self.on_finished is not None:
            callback, self.on_finished = self.on_finished, None
            callback()


class TransmitLimitedQueue:
    """Queued broadcasts, each handed out at most ``retransmit_limit(mult, n)`` times."""

    def __init__(
        self,
        retransmit_mult: int,
        num_nodes: Callable[[], int],
        size_of: Callable[[Message], int],
    ) -> None:
        self._mult = retransmit_mult
        self._num_nodes = num_nodes
        self._size_of = size_of
        self._items: list[_Queued] = []
        self._by_name: dict[str, _Queued] = {}
        self._seq = 0

    def __len__(self) -> int:
        return len(self._items)

    def queue(
        self,
        name: str | None,
        message: Message,
        on_finished: Callable[[], None] | None = None,
    ) -> None:
        """Queue ``message``; it replaces what is queued under the same ``name``.

        ``on_finished`` is called once the message has been sent its last time or
        was replaced (memberlist's ``Finished``). ``name=None`` never replaces anything.
        """
        self._seq += 1
        if name is not None:
            old = self._by_name.pop(name, None)
            if old is not None:
                self._items.remove(old)
                old.finish()
        item = _Queued(name, message, self._size_of(message), self._seq, 0, on_finished)
        self._items.append(item)
        if name is not None:
            self._by_name[name] = item

    def get_broadcasts(self, overhead: int, limit: int) -> list[Message]:
        """Messages that fit in ``limit`` bytes, ``overhead`` bytes charged for each.

        Each returned message has one more transmit counted and leaves the queue
        when it reaches the transmit limit.
        """
        if not self._items:
            return []
        transmit_limit = retransmit_limit(self._mult, self._num_nodes())
        used = 0
        out: list[Message] = []
        # Within a transmit tier the largest message that fits goes first; since the
        # free space only shrinks, one pass in priority order picks the same ones.
        for item in sorted(self._items, key=_Queued.order):
            free = limit - used - overhead
            if free <= 0:
                break
            if item.size > free:
                continue
            used += overhead + item.size
            out.append(item.message)
            item.transmits += 1
            if item.transmits >= transmit_limit:
                self._remove(item)
                item.finish()
        if not self._items:
            self._seq = 0
        return out

    def prune(self, max_retain: int) -> None:
        """Drop the most-sent messages until at most ``max_retain`` remain."""
        for item in sorted(self._items, key=_Queued.order)[max_retain:]:
            self._remove(item)
            item.finish()

    def reset(self) -> None:
        """Drop everything, calling each ``on_finished``."""
        items, self._items, self._by_name = self._items, [], {}
        self._seq = 0
        for item in items:
            item.finish()

    def queued(self) -> list[tuple[Message, int]]:
        """``(message, transmits)`` of every queued broadcast, in sending order."""
        return [(i.message, i.transmits) for i in sorted(self._items, key=_Queued.order)]

    def _remove(self, item: _Queued) -> None:
        self._items.remove(item)
        if item.name is not None and self._by_name.get(item.name) is item:
            del self._by_name[item.name]
