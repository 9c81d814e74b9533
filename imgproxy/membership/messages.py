"""memberlist's messages as frozen values: what the codec encodes and the state machine speaks.

Field names and types follow memberlist's Go structs (net.go), which its msgpack
codec writes as maps keyed by the Go field name. Addresses are raw bytes
(4 for IPv4, 16 for IPv6), as Go's ``net.IP`` is.
"""

from __future__ import annotations

import enum

import attrs


class MessageType(enum.IntEnum):
    """The first byte of every memberlist packet or stream message."""

    PING = 0
    INDIRECT_PING = 1
    ACK_RESP = 2
    SUSPECT = 3
    ALIVE = 4
    DEAD = 5
    PUSH_PULL = 6
    COMPOUND = 7
    USER = 8
    COMPRESS = 9
    ENCRYPT = 10
    NACK_RESP = 11
    HAS_CRC = 12
    ERR = 13
    HAS_LABEL = 244


class NodeState(enum.IntEnum):
    """memberlist's ``NodeStateType``."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


@attrs.frozen
class Ping:
    seq_no: int
    node: str
    source_addr: bytes = b""
    source_port: int = 0
    source_node: str = ""


@attrs.frozen
class IndirectPing:
    seq_no: int
    target: bytes
    port: int
    node: str
    nack: bool = False
    source_addr: bytes = b""
    source_port: int = 0
    source_node: str = ""


@attrs.frozen
class AckResp:
    seq_no: int
    payload: bytes = b""


@attrs.frozen
class NackResp:
    seq_no: int


@attrs.frozen
class ErrResp:
    error: str


@attrs.frozen
class Suspect:
    incarnation: int
    node: str
    from_node: str


@attrs.frozen
class Alive:
    incarnation: int
    node: str
    addr: bytes
    port: int
    meta: bytes = b""
    # pmin, pmax, pcur, dmin, dmax, dcur
    vsn: tuple[int, ...] = (1, 5, 2, 0, 0, 0)


@attrs.frozen
class Dead:
    incarnation: int
    node: str
    from_node: str


@attrs.frozen
class PushNodeState:
    name: str
    addr: bytes
    port: int
    meta: bytes
    incarnation: int
    state: NodeState
    vsn: tuple[int, ...] = (1, 5, 2, 0, 0, 0)


@attrs.frozen
class PushPull:
    """A push-pull exchange over TCP: the header's ``Join`` plus every node state."""

    join: bool
    states: tuple[PushNodeState, ...]
    user_state: bytes = b""


@attrs.frozen
class UserMsg:
    payload: bytes


Message = (
    Ping
    | IndirectPing
    | AckResp
    | NackResp
    | ErrResp
    | Suspect
    | Alive
    | Dead
    | PushPull
    | UserMsg
)
