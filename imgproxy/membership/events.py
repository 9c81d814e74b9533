"""serf's user events: named payloads gossiped to every member, and the recent ones.

A user event is broadcast like membership news, piggybacked on gossip, and every
member keeps the recent ones (by Lamport time) and sends them in each push-pull,
so a member that was away gets what it missed when it joins again. The wire
format is serf's (``messageUserEvent``, and the ``Events`` of its push-pull
state), so ``serf event NAME PAYLOAD`` on a serf agent of the cluster reaches our
nodes and ours reach serf's event handlers.

Pure: no I/O, no Twisted.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from imgproxy.membership.wire import MsgpackMap, WireError, pack_value, unpack_value

#: serf's ``messageUserEventType``: the first byte of a user event's memberlist user message.
SERF_USER_EVENT_TYPE = 3
#: serf's default ``EventBuffer``: how many Lamport times of recent events are kept.
EVENT_BUFFER = 512
#: serf's ``UserEventSizeLimit`` default: name and payload, in bytes.
USER_EVENT_SIZE_LIMIT = 512
#: Different events kept at one Lamport time (gossip from a hostile member is bounded).
EVENTS_PER_TIME = 64


@attrs.frozen
class UserEvent:
    ltime: int
    name: str
    payload: bytes


def encode_user_event(event: UserEvent) -> bytes:
    """A serf ``messageUserEvent``, ready to go out as a memberlist user message."""
    body = {"CC": False, "LTime": event.ltime, "Name": event.name, "Payload": event.payload}
    return bytes(pack_value(body, bytearray((SERF_USER_EVENT_TYPE,))))


def _ltime(value: object) -> int:
    if type(value) is not int or not 0 <= value < 1 << 64:
        raise WireError("a user event's LTime is not a Lamport time")
    return value


def _name(value: object) -> str:
    if not isinstance(value, bytes):
        raise WireError("a user event's Name is not a string")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise WireError("a user event's Name is not UTF-8") from None


def _payload(value: object) -> bytes:
    if value is None:
        return b""
    if not isinstance(value, bytes):
        raise WireError("a user event's Payload is not bytes")
    return bytes(value)


def _fields(value: object, what: str) -> dict[str, object]:
    if not isinstance(value, MsgpackMap):
        raise WireError(f"{what} is not a msgpack map")
    return {k.decode("latin-1"): v for k, v in value if isinstance(k, bytes)}


def decode_user_event(data: bytes) -> UserEvent:
    """Read a serf ``messageUserEvent`` (type byte included); :class:`WireError` if bad."""
    if not data or data[0] != SERF_USER_EVENT_TYPE:
        raise WireError("not a serf user event")
    value, _ = unpack_value(data, 1)
    fields = _fields(value, "a user event")
    return UserEvent(
        ltime=_ltime(fields.get("LTime")),
        name=_name(fields.get("Name")),
        payload=_payload(fields.get("Payload")),
    )


def encode_recent(events: Iterable[UserEvent]) -> list[dict[str, object]]:
    """The push-pull ``Events`` field: serf's ``[]*userEvents``, one entry per Lamport time."""
    by_time: dict[int, list[dict[str, object]]] = {}
    for event in events:
        by_time.setdefault(event.ltime, []).append({"Name": event.name, "Payload": event.payload})
    return [{"Events": named, "LTime": ltime} for ltime, named in sorted(by_time.items())]


def decode_recent(value: object) -> tuple[UserEvent, ...]:
    """The push-pull ``Events`` field read back; serf sends its whole ring, nils included."""
    if value is None:
        return ()
    if type(value) is not list:
        raise WireError("push-pull Events is not a list")
    events: list[UserEvent] = []
    for entry in value:
        if entry is None:
            continue
        fields = _fields(entry, "a push-pull Events entry")
        ltime = _ltime(fields.get("LTime"))
        named = fields.get("Events")
        if named is None:
            continue
        if type(named) is not list:
            raise WireError("a push-pull Events entry has malformed events")
        for item in named:
            event = _fields(item, "a push-pull event")
            events.append(
                UserEvent(ltime, _name(event.get("Name")), _payload(event.get("Payload")))
            )
    return tuple(events)


class EventLog:
    """serf's event clock and ring of recent events, as its ``handleUserEvent`` keeps them.

    An event is new once: the same name and payload at the same Lamport time is a
    duplicate (gossip delivers each several times). Events older than the ring,
    measured on the clock, are refused, as serf refuses them.
    """

    def __init__(self, size: int = EVENT_BUFFER) -> None:
        self._size = size
        # serf starts its event clock at 1: Lamport time 0 means "never".
        self._time = 1
        self._min_time = 0
        self._gap_reported = False
        self._ring: dict[int, tuple[int, list[tuple[str, bytes]]]] = {}

    @property
    def time(self) -> int:
        """The clock: the Lamport time the next event sent from here will carry."""
        return self._time

    def witness(self, ltime: int) -> None:
        """Move the clock past a time seen elsewhere (a Lamport clock's rule)."""
        if ltime >= self._time:
            self._time = ltime + 1

    def resume(self, clock: int) -> None:
        """Start from a clock saved before a restart: events before it were handled then.

        As serf's snapshot does: a node that comes back does not act again on the
        recent events every push-pull brings it, only on those it missed.
        """
        self._min_time = max(self._min_time, clock)
        self.witness(clock - 1)

    def lost_since_resume(self, remote_time: int) -> bool:
        """Whether events this node needed may be gone for good: it resumed from a
        saved clock so far behind ``remote_time`` (a peer's clock) that the peer's
        ring no longer reaches back to it. True once."""
        if self._gap_reported or self._min_time == 0:
            return False
        if remote_time - self._size <= self._min_time:
            return False
        self._gap_reported = True
        return True

    def create(self, name: str, payload: bytes) -> UserEvent:
        """A new event from this member, already recorded."""
        event = UserEvent(self._time, name, payload)
        self._time += 1
        self.record(event)
        return event

    def record(self, event: UserEvent) -> bool:
        """Keep ``event``; True if it is new (to be acted on and passed on)."""
        self.witness(event.ltime)
        if event.ltime < self._min_time:
            return False
        if self._time > self._size and event.ltime < self._time - self._size:
            return False
        index = event.ltime % self._size
        held = self._ring.get(index)
        entry = (event.name, event.payload)
        if held is not None and held[0] == event.ltime:
            if entry in held[1] or len(held[1]) >= EVENTS_PER_TIME:
                return False
            held[1].append(entry)
        else:
            self._ring[index] = (event.ltime, [entry])
        return True

    def recent(self) -> list[UserEvent]:
        """Every event the ring holds, oldest first."""
        return [
            UserEvent(ltime, name, payload)
            for ltime, named in sorted(self._ring.values())
            for name, payload in named
        ]
