"""Serf's node metadata: tags as the byte 0xFF then a msgpack map of strings.

``serf members`` reads a member's tags (and so its role) from memberlist's ``Meta``;
serf writes them with the same Go msgpack codec as memberlist (see :mod:`wire`).
Also serf's push-pull user state, which serf expects from every member it syncs with.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from imgproxy.membership.events import UserEvent, decode_recent, encode_recent
from imgproxy.membership.wire import MsgpackMap, WireError, pack_value, unpack_value

__all__ = [
    "META_MAX_SIZE",
    "SERF_PUSH_PULL_TYPE",
    "TAG_MAGIC_BYTE",
    "SerfState",
    "decode_serf_state",
    "decode_tags",
    "encode_serf_state",
    "encode_tags",
]

#: serf's ``tagMagicByte``: meta starting with it holds tags, anything else a bare role.
TAG_MAGIC_BYTE = 0xFF
#: memberlist's ``MetaMaxSize``: a node's meta may not be longer.
META_MAX_SIZE = 512


def encode_tags(tags: Mapping[str, str]) -> bytes:
    """Tags as serf encodes them; keys sorted so equal tags give equal bytes.

    Raises ``ValueError`` if the result is over memberlist's 512-byte meta limit.
    """
    meta = bytes(pack_value(dict(sorted(tags.items())), bytearray((TAG_MAGIC_BYTE,))))
    if len(meta) > META_MAX_SIZE:
        raise ValueError(f"encoded tags are {len(meta)} bytes, over the {META_MAX_SIZE} limit")
    return meta


def _text(raw: object, what: str) -> str:
    if not isinstance(raw, bytes):
        raise WireError(f"tag {what} is not a string")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise WireError(f"tag {what} is not UTF-8") from e


def decode_tags(meta: bytes) -> dict[str, str]:
    """A member's tags from its meta: ``{}`` for empty meta.

    Meta without the magic byte is serf's old role-only form, ``{"role": meta}``.
    Raises :class:`WireError` when the tags are not a msgpack map of strings.
    """
    if not meta:
        return {}
    if meta[0] != TAG_MAGIC_BYTE:
        return {"role": _text(bytes(meta), "role")}
    value, _ = unpack_value(meta, 1)
    if not isinstance(value, MsgpackMap):
        raise WireError("tags are not a msgpack map")
    return {_text(k, "name"): _text(v, "value") for k, v in value}


#: serf's ``messagePushPullType``: the first byte of the user state serf puts in push-pulls.
SERF_PUSH_PULL_TYPE = 2


@attrs.frozen
class SerfState:
    """serf's push-pull user state (``messagePushPull``).

    A member that sends none makes serf log ``Remote state is zero bytes`` on every
    push-pull. ``ltime`` is serf's Lamport clock; ``status_ltimes`` maps each member to the
    Lamport time of its last join intent; ``left_members`` are members that left;
    ``event_ltime`` is the user events' clock and ``events`` the recent user events.
    """

    ltime: int = 1
    status_ltimes: Mapping[str, int] = attrs.field(factory=dict)
    left_members: tuple[str, ...] = ()
    event_ltime: int = 1
    query_ltime: int = 1
    events: tuple[UserEvent, ...] = ()


def encode_serf_state(state: SerfState) -> bytes:
    """The push-pull user state serf's delegate writes: type 2, then its msgpack struct."""
    body = {
        "EventLTime": state.event_ltime,
        "Events": encode_recent(state.events) or None,
        "LTime": state.ltime,
        "LeftMembers": list(state.left_members),
        "QueryLTime": state.query_ltime,
        "StatusLTimes": dict(sorted(state.status_ltimes.items())),
    }
    return bytes(pack_value(body, bytearray((SERF_PUSH_PULL_TYPE,))))


def _ltime(value: object, what: str) -> int:
    if value is None:
        return 0
    if type(value) is not int or not 0 <= value < 1 << 64:
        raise WireError(f"{what} is not a Lamport time")
    return value


def decode_serf_state(data: bytes) -> SerfState:
    """Read serf's push-pull user state; :class:`WireError` if bad."""
    if not data or data[0] != SERF_PUSH_PULL_TYPE:
        raise WireError("not a serf push-pull state")
    value, _ = unpack_value(data, 1)
    if not isinstance(value, MsgpackMap):
        raise WireError("serf push-pull state is not a msgpack map")
    fields = {k.decode("latin-1"): v for k, v in value if isinstance(k, bytes)}
    statuses = fields.get("StatusLTimes")
    if statuses is None:
        statuses = MsgpackMap()
    left = fields.get("LeftMembers")
    if left is None:
        left = []
    if not isinstance(statuses, MsgpackMap) or type(left) is not list:
        raise WireError("serf push-pull state has malformed members")
    return SerfState(
        ltime=_ltime(fields.get("LTime"), "LTime"),
        status_ltimes={_text(k, "name"): _ltime(v, "status LTime") for k, v in statuses},
        left_members=tuple(_text(name, "left member") for name in left),
        event_ltime=_ltime(fields.get("EventLTime"), "EventLTime"),
        query_ltime=_ltime(fields.get("QueryLTime"), "QueryLTime"),
        events=decode_recent(fields.get("Events")),
    )
