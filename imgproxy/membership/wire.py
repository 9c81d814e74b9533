"""memberlist's wire format, pure: msgpack bodies, compound and compressed packets, CRC,
labels, AES-GCM encryption, and the TCP push-pull stream.

Everything here mirrors HashiCorp memberlist (net.go, util.go, security.go) and the
``hashicorp/go-msgpack`` codec it uses with a default ``MsgpackHandle{}``:

* a Go struct is a msgpack map keyed by the Go field names, **sorted by name**;
* ``string`` and ``[]byte`` (which includes ``Vsn []uint8``) are both written as msgpack
  *str* (raw), never *bin*, and never with the ``str8`` header: lengths 32..65535 use
  ``str16``; a nil ``[]byte`` is ``nil``;
* integers use the smallest encoding (positive fixint, uint8, uint16, ...).

Decoding is tolerant where Go is (field order, str or bin for bytes, unknown fields,
trailing bytes after a UDP message body) and strict everywhere else: every malformed
input raises :class:`WireError` and nothing else.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from imgproxy.membership.messages import (
    AckResp,
    Alive,
    Dead,
    ErrResp,
    IndirectPing,
    Message,
    MessageType,
    NackResp,
    NodeState,
    Ping,
    PushNodeState,
    PushPull,
    Suspect,
    UserMsg,
)

if TYPE_CHECKING:
    from imgproxy.membership.keyring import Keyring

__all__ = [
    "DEFAULT_UDP_BUDGET",
    "MsgpackMap",
    "MAX_STREAM_BYTES",
    "StreamDecoder",
    "WireError",
    "add_crc",
    "add_label_header",
    "compress_payload",
    "decode_compound",
    "decode_message",
    "decode_packet",
    "decode_stream",
    "decompress_payload",
    "encode_compound",
    "encode_message",
    "encode_packet",
    "encode_stream",
    "encryption_version",
    "lzw_compress",
    "lzw_decompress",
    "pack_packets",
    "pack_value",
    "strip_crc",
    "strip_label_header",
    "unpack_value",
    "unwrap_packet",
]

#: memberlist's default ``UDPBufferSize``: the most a gossip packet may hold.
DEFAULT_UDP_BUDGET = 1400
#: memberlist's ``maxPushStateBytes``: the largest stream message we accept.
MAX_STREAM_BYTES = 20 * 1024 * 1024
#: memberlist's ``labelMaxSize``.
LABEL_MAX_SIZE = 255
# Go's decodeCompoundMessage computes ``numParts*2`` in uint8 arithmetic, so a compound
# of 128 or more parts is misread by every Go peer: never build one.
_MAX_COMPOUND_PARTS = 127
_MAX_PART_LEN = 0xFFFF
# Nested compound/compress messages are legal; a bound keeps hostile nesting cheap.
_MAX_NESTING = 8
_MSGPACK_MAX_DEPTH = 32
_LZW_ALGO = 0
_CRC_HEADER_LEN = 5
_ENCRYPT_OVERHEAD = {0: 45, 1: 29}  # version + nonce + (padding) + tag


class WireError(ValueError):
    """Bytes that are not a valid memberlist message, packet or stream."""


class _IncompleteError(WireError):
    """The input ended early; ``need`` is the least total length that could complete it."""

    def __init__(self, need: int) -> None:
        super().__init__(f"truncated: need at least {need} bytes")
        self.need = need


# --------------------------------------------------------------------------------------------
# msgpack, as hashicorp/go-msgpack's default MsgpackHandle writes and reads it


def _pack_len(out: bytearray, n: int, fix_base: int, fix_cutoff: int, b16: int, b32: int) -> None:
    if n < fix_cutoff:
        out.append(fix_base | n)
    elif n <= 0xFFFF:
        out.append(b16)
        out += n.to_bytes(2, "big")
    else:
        out.append(b32)
        out += n.to_bytes(4, "big")


def _pack_raw(out: bytearray, raw: bytes) -> None:
    # Go writes both strings and []byte as msgpack str and skips str8 (no WriteExt).
    _pack_len(out, len(raw), 0xA0, 32, 0xDA, 0xDB)
    out += raw


def _pack_int(out: bytearray, i: int) -> None:
    if i >= 0:
        if i <= 0x7F:
            out.append(i)
        elif i <= 0xFF:
            out += bytes((0xCC, i))
        elif i <= 0xFFFF:
            out.append(0xCD)
            out += i.to_bytes(2, "big")
        elif i <= 0xFFFFFFFF:
            out.append(0xCE)
            out += i.to_bytes(4, "big")
        elif i <= 0xFFFFFFFFFFFFFFFF:
            out.append(0xCF)
            out += i.to_bytes(8, "big")
        else:
            raise ValueError(f"integer {i} does not fit in 64 bits")
    elif i >= -32:
        out.append(i & 0xFF)
    elif i >= -0x80:
        out.append(0xD0)
        out += i.to_bytes(1, "big", signed=True)
    elif i >= -0x8000:
        out.append(0xD1)
        out += i.to_bytes(2, "big", signed=True)
    elif i >= -0x80000000:
        out.append(0xD2)
        out += i.to_bytes(4, "big", signed=True)
    elif i >= -0x8000000000000000:
        out.append(0xD3)
        out += i.to_bytes(8, "big", signed=True)
    else:
        raise ValueError(f"integer {i} does not fit in 64 bits")


def pack_value(value: Any, out: bytearray | None = None) -> bytearray:
    """Append ``value`` msgpack-encoded the way Go's codec writes it; return the buffer.

    ``None``, ``bool``, ``int``, ``str``, ``bytes`` (empty bytes stand for a nil slice and
    are written as nil, like Go's nil ``[]byte``), lists, and mappings (written in the
    mapping's order: pass Go's sorted field order for structs).
    """
    if out is None:
        out = bytearray()
    if value is None:
        out.append(0xC0)
    elif value is True:
        out.append(0xC3)
    elif value is False:
        out.append(0xC2)
    elif isinstance(value, int):
        _pack_int(out, value)
    elif isinstance(value, str):
        _pack_raw(out, value.encode("utf-8"))
    elif isinstance(value, bytes | bytearray | memoryview):
        if len(value) == 0:
            out.append(0xC0)
        else:
            _pack_raw(out, bytes(value))
    elif isinstance(value, Mapping):
        _pack_len(out, len(value), 0x80, 16, 0xDE, 0xDF)
        for k, v in value.items():
            pack_value(k, out)
            pack_value(v, out)
    elif isinstance(value, list | tuple):
        _pack_len(out, len(value), 0x90, 16, 0xDC, 0xDD)
        for v in value:
            pack_value(v, out)
    else:
        raise TypeError(f"cannot msgpack-encode {type(value).__name__}")
    return out


class _Raw(bytes):
    """A msgpack str or bin value (Go does not tell them apart for our fields)."""


class _Ext:
    """A msgpack ext value: only ever skipped."""


class MsgpackMap(list[tuple[Any, Any]]):
    """A decoded msgpack map: its ``(key, value)`` pairs in wire order.

    Pairs, not a dict, because keys may be unhashable (a list) in hostile input.
    """


_SIMPLE_VALUES: dict[int, Any] = {0xC0: None, 0xC2: False, 0xC3: True}


class _Reader:
    """Reads msgpack values from ``data`` at ``pos``; raises ``_IncompleteError`` at the end."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes | bytearray | memoryview, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise _IncompleteError(end)
        chunk = bytes(self.data[self.pos : end])
        self.pos = end
        return chunk

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise _IncompleteError(self.pos + 1)
        b = self.data[self.pos]
        self.pos += 1
        return b

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def sint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big", signed=True)

    def _count(self, n: int) -> int:
        # Every element takes at least one byte: a count beyond what is left cannot be
        # honest, and checking it keeps a tiny packet from allocating a huge container.
        if self.pos + n > len(self.data):
            raise _IncompleteError(self.pos + n)
        return n

    def value(self, depth: int = 0) -> Any:
        if depth > _MSGPACK_MAX_DEPTH:
            raise WireError("msgpack nesting too deep")
        b = self.byte()
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if 0x80 <= b <= 0x8F:
            return self._map(b & 0x0F, depth)
        if 0x90 <= b <= 0x9F:
            return self._array(b & 0x0F, depth)
        if 0xA0 <= b <= 0xBF:
            return _Raw(self.take(b & 0x1F))
        if b in _SIMPLE_VALUES:
            return _SIMPLE_VALUES[b]
        if b in (0xC4, 0xD9):
            return _Raw(self.take(self.uint(1)))
        if b in (0xC5, 0xDA):
            return _Raw(self.take(self.uint(2)))
        if b in (0xC6, 0xDB):
            return _Raw(self.take(self.uint(4)))
        if b in (0xCC, 0xCD, 0xCE, 0xCF):
            return self.uint(1 << (b - 0xCC))
        if b in (0xD0, 0xD1, 0xD2, 0xD3):
            return self.sint(1 << (b - 0xD0))
        if b == 0xCA:
            self.take(4)
            return 0.0
        if b == 0xCB:
            self.take(8)
            return 0.0
        if b in (0xD4, 0xD5, 0xD6, 0xD7, 0xD8):
            self.take(1 + (1 << (b - 0xD4)))
            return _Ext()
        if b in (0xC7, 0xC8, 0xC9):
            n = self.uint(1 << (b - 0xC7))
            self.take(1 + n)
            return _Ext()
        if b == 0xDC:
            return self._array(self.uint(2), depth)
        if b == 0xDD:
            return self._array(self.uint(4), depth)
        if b == 0xDE:
            return self._map(self.uint(2), depth)
        if b == 0xDF:
            return self._map(self.uint(4), depth)
        raise WireError(f"invalid msgpack byte 0x{b:02x}")

    def _array(self, n: int, depth: int) -> list[Any]:
        return [self.value(depth + 1) for _ in range(self._count(n))]

    def _map(self, n: int, depth: int) -> MsgpackMap:
        pairs = MsgpackMap()
        for _ in range(self._count(n)):
            key = self.value(depth + 1)
            pairs.append((key, self.value(depth + 1)))
        return pairs


def unpack_value(data: bytes | bytearray | memoryview, pos: int = 0) -> tuple[Any, int]:
    """Read one msgpack value at ``pos``: ``(value, next_pos)``.

    Strings and binaries come back as ``bytes``, maps as :class:`MsgpackMap`.
    Raises :class:`WireError` when the value is malformed or truncated.
    """
    reader = _Reader(data, pos)
    return reader.value(), reader.pos


# --------------------------------------------------------------------------------------------
# Go structs <-> field maps


def _fields(obj: Any, what: str) -> dict[str, Any]:
    if not isinstance(obj, MsgpackMap):
        raise WireError(f"{what}: expected a msgpack map, got {type(obj).__name__}")
    fields: dict[str, Any] = {}
    for key, value in obj:
        if isinstance(key, _Raw):
            # Field names are ASCII Go identifiers; anything else is an unknown field.
            fields[key.decode("latin-1")] = value
    return fields


def _uint(fields: dict[str, Any], name: str, bits: int) -> int:
    value = fields.get(name, 0)
    if value is None:
        return 0
    if type(value) is not int or not 0 <= value < (1 << bits):
        raise WireError(f"{name}: expected a uint{bits}, got {value!r}")
    return value


def _int(fields: dict[str, Any], name: str) -> int:
    value = fields.get(name, 0)
    if value is None:
        return 0
    if type(value) is not int or not -(1 << 63) <= value < (1 << 63):
        raise WireError(f"{name}: expected an int, got {value!r}")
    return value


def _bool(fields: dict[str, Any], name: str) -> bool:
    value = fields.get(name, False)
    if value is None:
        return False
    if type(value) is not bool:
        raise WireError(f"{name}: expected a bool, got {value!r}")
    return value


def _bytes(fields: dict[str, Any], name: str) -> bytes:
    value = fields.get(name)
    if value is None:
        return b""
    if not isinstance(value, _Raw):
        raise WireError(f"{name}: expected bytes, got {type(value).__name__}")
    return bytes(value)


def _str(fields: dict[str, Any], name: str) -> str:
    raw = _bytes(fields, name)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise WireError(f"{name}: not UTF-8") from e


def _vsn(fields: dict[str, Any]) -> tuple[int, ...]:
    value = fields.get("Vsn")
    if value is None:
        return ()
    if isinstance(value, _Raw):
        return tuple(value)
    # Go writes []uint8 as raw bytes; other msgpack writers may send an array.
    if type(value) is list and all(type(v) is int and 0 <= v <= 0xFF for v in value):
        return tuple(value)
    raise WireError("Vsn: expected bytes or an array of uint8")


def _node_state(fields: dict[str, Any]) -> NodeState:
    value = _int(fields, "State")
    try:
        return NodeState(value)
    except ValueError as e:
        raise WireError(f"State: unknown node state {value}") from e


# Go's field widths: a value beyond them would be refused by every Go peer's decoder.
_FIELD_BITS = {"SeqNo": 32, "Incarnation": 32, "Port": 16, "SourcePort": 16}


def _checked(fields: dict[str, Any]) -> dict[str, Any]:
    for name, bits in _FIELD_BITS.items():
        value = fields.get(name)
        if value is not None and not 0 <= value < (1 << bits):
            raise ValueError(f"{name} must fit in uint{bits}: {value}")
    return fields


def _check_vsn(vsn: tuple[int, ...]) -> bytes:
    if not all(0 <= v <= 0xFF for v in vsn):
        raise ValueError(f"Vsn values must be uint8: {vsn!r}")
    return bytes(vsn)


# Field order below is Go's: the codec sorts struct fields by name.


def _ping_fields(m: Ping) -> dict[str, Any]:
    fields: dict[str, Any] = {"Node": m.node, "SeqNo": m.seq_no}
    # SourceAddr, SourceNode and SourcePort are `codec:",omitempty"` in Go.
    if m.source_addr:
        fields["SourceAddr"] = m.source_addr
    if m.source_node:
        fields["SourceNode"] = m.source_node
    if m.source_port:
        fields["SourcePort"] = m.source_port
    return fields


def _indirect_ping_fields(m: IndirectPing) -> dict[str, Any]:
    fields: dict[str, Any] = {"Nack": m.nack, "Node": m.node, "Port": m.port, "SeqNo": m.seq_no}
    if m.source_addr:
        fields["SourceAddr"] = m.source_addr
    if m.source_node:
        fields["SourceNode"] = m.source_node
    if m.source_port:
        fields["SourcePort"] = m.source_port
    fields["Target"] = m.target
    return fields


def _alive_fields(m: Alive) -> dict[str, Any]:
    return {
        "Addr": m.addr,
        "Incarnation": m.incarnation,
        "Meta": m.meta,
        "Node": m.node,
        "Port": m.port,
        "Vsn": _check_vsn(m.vsn),
    }


def _push_node_state_fields(m: PushNodeState) -> dict[str, Any]:
    return {
        "Addr": m.addr,
        "Incarnation": m.incarnation,
        "Meta": m.meta,
        "Name": m.name,
        "Port": m.port,
        "State": int(m.state),
        "Vsn": _check_vsn(m.vsn),
    }


def _ping_from(f: dict[str, Any]) -> Ping:
    return Ping(
        seq_no=_uint(f, "SeqNo", 32),
        node=_str(f, "Node"),
        source_addr=_bytes(f, "SourceAddr"),
        source_port=_uint(f, "SourcePort", 16),
        source_node=_str(f, "SourceNode"),
    )


def _indirect_ping_from(f: dict[str, Any]) -> IndirectPing:
    return IndirectPing(
        seq_no=_uint(f, "SeqNo", 32),
        target=_bytes(f, "Target"),
        port=_uint(f, "Port", 16),
        node=_str(f, "Node"),
        nack=_bool(f, "Nack"),
        source_addr=_bytes(f, "SourceAddr"),
        source_port=_uint(f, "SourcePort", 16),
        source_node=_str(f, "SourceNode"),
    )


def _alive_from(f: dict[str, Any]) -> Alive:
    return Alive(
        incarnation=_uint(f, "Incarnation", 32),
        node=_str(f, "Node"),
        addr=_bytes(f, "Addr"),
        port=_uint(f, "Port", 16),
        meta=_bytes(f, "Meta"),
        vsn=_vsn(f),
    )


def _push_node_state_from(f: dict[str, Any]) -> PushNodeState:
    return PushNodeState(
        name=_str(f, "Name"),
        addr=_bytes(f, "Addr"),
        port=_uint(f, "Port", 16),
        meta=_bytes(f, "Meta"),
        incarnation=_uint(f, "Incarnation", 32),
        state=_node_state(f),
        vsn=_vsn(f),
    )


def _body(msg: Message) -> tuple[MessageType, dict[str, Any]]:
    """The type byte and Go field map of a message that is one msgpack struct."""
    match msg:
        case Ping():
            return MessageType.PING, _ping_fields(msg)
        case IndirectPing():
            return MessageType.INDIRECT_PING, _indirect_ping_fields(msg)
        case AckResp():
            return MessageType.ACK_RESP, {"Payload": msg.payload, "SeqNo": msg.seq_no}
        case NackResp():
            return MessageType.NACK_RESP, {"SeqNo": msg.seq_no}
        case ErrResp():
            return MessageType.ERR, {"Error": msg.error}
        case Suspect():
            fields = {"From": msg.from_node, "Incarnation": msg.incarnation, "Node": msg.node}
            return MessageType.SUSPECT, fields
        case Alive():
            return MessageType.ALIVE, _alive_fields(msg)
        case Dead():
            fields = {"From": msg.from_node, "Incarnation": msg.incarnation, "Node": msg.node}
            return MessageType.DEAD, fields
    raise TypeError(f"{type(msg).__name__} is not a single-struct message")


def _encode_push_pull(msg: PushPull) -> bytes:
    out = bytearray((MessageType.PUSH_PULL,))
    header = {"Join": msg.join, "Nodes": len(msg.states), "UserStateLen": len(msg.user_state)}
    pack_value(header, out)
    for state in msg.states:
        pack_value(_checked(_push_node_state_fields(state)), out)
    out += msg.user_state
    return bytes(out)


def encode_message(msg: Message) -> bytes:
    """One message as memberlist sends it in a packet: the type byte, then its body.

    Most bodies are a msgpack map of the Go struct; a :class:`UserMsg` is the type byte
    then the raw payload (memberlist's packet form); a :class:`PushPull` is the whole
    stream message: header, node states, user state.
    """
    if isinstance(msg, UserMsg):
        return bytes((MessageType.USER,)) + msg.payload
    if isinstance(msg, PushPull):
        return _encode_push_pull(msg)
    msg_type, fields = _body(msg)
    return bytes(pack_value(_checked(fields), bytearray((msg_type,))))


_STRUCT_DECODERS: dict[int, Any] = {
    MessageType.PING: _ping_from,
    MessageType.INDIRECT_PING: _indirect_ping_from,
    MessageType.ACK_RESP: lambda f: AckResp(
        seq_no=_uint(f, "SeqNo", 32), payload=_bytes(f, "Payload")
    ),
    MessageType.NACK_RESP: lambda f: NackResp(seq_no=_uint(f, "SeqNo", 32)),
    MessageType.ERR: lambda f: ErrResp(error=_str(f, "Error")),
    MessageType.SUSPECT: lambda f: Suspect(
        incarnation=_uint(f, "Incarnation", 32), node=_str(f, "Node"), from_node=_str(f, "From")
    ),
    MessageType.ALIVE: _alive_from,
    MessageType.DEAD: lambda f: Dead(
        incarnation=_uint(f, "Incarnation", 32), node=_str(f, "Node"), from_node=_str(f, "From")
    ),
}


def _read_struct(reader: _Reader, what: str) -> dict[str, Any]:
    return _fields(reader.value(), what)


def _read_push_pull_header(reader: _Reader) -> tuple[bool, int, int]:
    header = _read_struct(reader, "pushPullHeader")
    join = _bool(header, "Join")
    nodes = _int(header, "Nodes")
    user_len = _int(header, "UserStateLen")
    if nodes < 0 or user_len < 0:
        raise WireError("pushPullHeader: negative count")
    if user_len > MAX_STREAM_BYTES:
        raise WireError("pushPullHeader: user state larger than the limit")
    return join, nodes, user_len


def _read_stream_body(msg_type: int, reader: _Reader) -> Message:
    """The body of one stream message of ``msg_type``, read from ``reader``."""
    if msg_type == MessageType.PUSH_PULL:
        join, nodes, user_len = _read_push_pull_header(reader)
        states = []
        for _ in range(nodes):
            states.append(_push_node_state_from(_read_struct(reader, "pushNodeState")))
        return PushPull(join=join, states=tuple(states), user_state=reader.take(user_len))
    if msg_type == MessageType.USER:
        length = _int(_read_struct(reader, "userMsgHeader"), "UserMsgLen")
        if not 0 <= length <= MAX_STREAM_BYTES:
            raise WireError("userMsgHeader: bad length")
        return UserMsg(payload=reader.take(length))
    decoder = _STRUCT_DECODERS.get(msg_type)
    if decoder is None:
        raise WireError(f"message type {msg_type} has no stream form")
    return decoder(_read_struct(reader, MessageType(msg_type).name))


def decode_message(data: bytes) -> Message:
    """Decode one message (type byte and body) as :func:`encode_message` writes it.

    Framing types (compound, compress, encrypt, CRC, label) are not messages: use
    :func:`decode_packet` or :class:`StreamDecoder` for those. Raises :class:`WireError`.
    """
    if not data:
        raise WireError("empty message")
    msg_type = data[0]
    if msg_type == MessageType.USER:
        return UserMsg(payload=bytes(data[1:]))
    if msg_type != MessageType.PUSH_PULL and msg_type not in _STRUCT_DECODERS:
        raise WireError(f"not a message type: {msg_type}")
    reader = _Reader(data, 1)
    try:
        # Like Go's decoder, bytes after the body are ignored.
        return _read_stream_body(msg_type, reader)
    except _IncompleteError as e:
        raise WireError("message truncated") from e


# --------------------------------------------------------------------------------------------
# compound messages and packing


def encode_compound(parts: Sequence[bytes]) -> bytes:
    """memberlist's ``makeCompoundMessage``: type 7, a count byte, uint16 lengths, parts."""
    if len(parts) > 0xFF:
        raise ValueError("a compound message holds at most 255 parts")
    out = bytearray((MessageType.COMPOUND, len(parts)))
    for part in parts:
        if len(part) > _MAX_PART_LEN:
            raise ValueError("a compound part is at most 65535 bytes")
        out += len(part).to_bytes(2, "big")
    for part in parts:
        out += part
    return bytes(out)


def decode_compound(data: bytes) -> tuple[list[bytes], int]:
    """Split a compound message (starting with its type byte 7): ``(parts, truncated)``.

    As in Go, parts cut off by the end of the packet are dropped and counted, not an error.
    """
    if not data or data[0] != MessageType.COMPOUND:
        raise WireError("not a compound message")
    if len(data) < 2:
        raise WireError("compound message without its count")
    count = data[1]
    pos = 2 + 2 * count
    if len(data) < pos:
        raise WireError("compound message with truncated lengths")
    lengths = [int.from_bytes(data[2 + 2 * i : 4 + 2 * i], "big") for i in range(count)]
    parts: list[bytes] = []
    for index, length in enumerate(lengths):
        if len(data) < pos + length:
            return parts, count - index
        parts.append(bytes(data[pos : pos + length]))
        pos += length
    return parts, 0


def pack_packets(parts: Sequence[bytes], budget: int = DEFAULT_UDP_BUDGET) -> list[bytes]:
    """Pack messages, in order, into as few packets of at most ``budget`` bytes as fit.

    A packet with one message is that message as is; with more it is a compound message.
    A message larger than the budget goes alone (memberlist sends it anyway).
    """
    packets: list[bytes] = []
    batch: list[bytes] = []
    size = 2  # compound type and count bytes

    def flush() -> None:
        if len(batch) == 1:
            packets.append(bytes(batch[0]))
        elif batch:
            packets.append(encode_compound(batch))

    for part in parts:
        if len(part) > _MAX_PART_LEN:
            raise ValueError("a message larger than 65535 bytes cannot go in a packet")
        cost = 2 + len(part)
        if batch and (size + cost > budget or len(batch) == _MAX_COMPOUND_PARTS):
            flush()
            batch, size = [], 2
        batch.append(part)
        size += cost
    flush()
    return packets


# --------------------------------------------------------------------------------------------
# CRC, labels, compression


def add_crc(packet: bytes) -> bytes:
    """Prefix ``packet`` with memberlist's hasCrcMsg header: 12, CRC32 (IEEE) big-endian."""
    return bytes((MessageType.HAS_CRC,)) + zlib.crc32(packet).to_bytes(4, "big") + packet


def strip_crc(packet: bytes) -> bytes:
    """Check and remove a hasCrcMsg header; raise :class:`WireError` if absent or wrong."""
    if len(packet) < _CRC_HEADER_LEN or packet[0] != MessageType.HAS_CRC:
        raise WireError("not a CRC packet")
    body = bytes(packet[_CRC_HEADER_LEN:])
    if zlib.crc32(body) != int.from_bytes(packet[1:5], "big"):
        raise WireError("CRC mismatch")
    return body


def add_label_header(data: bytes, label: str) -> bytes:
    """Prefix a packet or stream with memberlist's label header (244, length, label).

    An empty label adds nothing, as in memberlist.
    """
    if not label:
        return bytes(data)
    raw = label.encode("utf-8")
    if len(raw) > LABEL_MAX_SIZE:
        raise ValueError(f"label longer than {LABEL_MAX_SIZE} bytes")
    return bytes((MessageType.HAS_LABEL, len(raw))) + raw + bytes(data)


def _split_label(data: bytes | bytearray) -> tuple[str, int] | None:
    """``(label, header length)``, or None when ``data`` does not start with a label."""
    if not data or data[0] != MessageType.HAS_LABEL:
        return "", 0
    if len(data) < 2 or len(data) < 2 + data[1]:
        return None
    size = data[1]
    if size == 0:
        raise WireError("label header cannot be empty when present")
    try:
        return bytes(data[2 : 2 + size]).decode("utf-8"), 2 + size
    except UnicodeDecodeError as e:
        raise WireError("label is not UTF-8") from e


def strip_label_header(data: bytes) -> tuple[bytes, str]:
    """Remove a label header if present: ``(rest, label)``; ``""`` when there is none."""
    split = _split_label(data)
    if split is None:
        raise WireError("label header truncated")
    label, length = split
    return bytes(data[length:]), label


def lzw_compress(data: bytes) -> bytes:
    """Go's ``compress/lzw`` writer with LSB order and literal width 8."""
    out = bytearray()
    bits = nbits = 0
    width, hi, overflow = 9, 257, 512

    def write(code: int) -> None:
        nonlocal bits, nbits
        bits |= code << nbits
        nbits += width
        while nbits >= 8:
            out.append(bits & 0xFF)
            bits >>= 8
            nbits -= 8

    def inc_hi() -> bool:
        """Advance the next code; False when the table was full and has been reset."""
        nonlocal width, hi, overflow
        hi += 1
        if hi == overflow:
            width += 1
            overflow <<= 1
        if hi == 4095:  # Go's maxCode: send a clear code and start a fresh table
            write(256)
            width, hi, overflow = 9, 257, 512
            table.clear()
            return False
        return True

    table: dict[int, int] = {}
    write(256)  # Go starts every stream with a clear code
    if data:
        code = data[0]
        for x in data[1:]:
            key = (code << 8) | x
            hit = table.get(key)
            if hit is not None:
                code = hit
                continue
            write(code)
            code = x
            if inc_hi():
                table[key] = hi
        write(code)
        inc_hi()
    write(257)
    if nbits:
        out.append(bits & 0xFF)
    return bytes(out)


def lzw_decompress(data: bytes, max_size: int = MAX_STREAM_BYTES) -> bytes:
    """Go's ``compress/lzw`` reader with LSB order and literal width 8.

    Raises :class:`WireError` on an invalid code, a missing end code, or output beyond
    ``max_size`` bytes.
    """
    entries: list[bytes] = [bytes((i,)) for i in range(256)] + [b"", b""]
    out = bytearray()
    width, hi, overflow = 9, 257, 512
    last: bytes | None = None
    bits = nbits = pos = 0
    while True:
        while nbits < width:
            if pos >= len(data):
                raise WireError("lzw: unexpected end of data")
            bits |= data[pos] << nbits
            pos += 1
            nbits += 8
        code = bits & ((1 << width) - 1)
        bits >>= width
        nbits -= width
        if code == 256:
            width, hi, overflow, last = 9, 257, 512, None
            del entries[258:]
            continue
        if code == 257:
            return bytes(out)
        if code < 256:
            current = entries[code]
        elif code == hi and last is not None:
            # The code being defined right now: the last string plus its own first byte.
            current = last + last[:1]
        elif code <= hi and code < len(entries):
            current = entries[code]
        else:
            raise WireError("lzw: invalid code")
        if last is not None:
            entry = last + current[:1]
            if hi < len(entries):
                entries[hi] = entry
            else:
                entries.append(entry)
        out += current
        if len(out) > max_size:
            raise WireError("lzw: output larger than the limit")
        last, hi = current, hi + 1
        if hi >= overflow:
            if width == 12:
                last = None
                hi -= 1
            else:
                width += 1
                overflow <<= 1


def compress_payload(data: bytes) -> bytes:
    """memberlist's compressMsg: type 9, then msgpack ``{Algo: 0, Buf: <lzw>}``."""
    body = {"Algo": _LZW_ALGO, "Buf": lzw_compress(data)}
    return bytes(pack_value(body, bytearray((MessageType.COMPRESS,))))


def _decompress_body(reader: _Reader) -> bytes:
    fields = _read_struct(reader, "compress")
    algo = _uint(fields, "Algo", 8)
    if algo != _LZW_ALGO:
        raise WireError(f"cannot decompress unknown algorithm {algo}")
    return lzw_decompress(_bytes(fields, "Buf"))


def decompress_payload(data: bytes) -> bytes:
    """Undo :func:`compress_payload`: ``data`` starts with the compressMsg type byte."""
    if not data or data[0] != MessageType.COMPRESS:
        raise WireError("not a compressed message")
    try:
        return _decompress_body(_Reader(data, 1))
    except _IncompleteError as e:
        raise WireError("compressed message truncated") from e


# --------------------------------------------------------------------------------------------
# UDP packets


def encryption_version(protocol_version: int) -> int:
    """memberlist's ``encryptionVersion``: 0 (padded) for protocol 1, else 1."""
    return 0 if protocol_version <= 1 else 1


def encode_packet(
    parts: Sequence[bytes],
    *,
    keyring: Keyring | None,
    protocol_version: int,
    crc: bool,
    label: str = "",
    budget: int = DEFAULT_UDP_BUDGET,
    compress: bool = False,
) -> list[bytes]:
    """Encoded messages to UDP datagrams the way memberlist's rawSendMsgPacket does.

    Packs ``parts`` (from :func:`encode_message`) into compound packets that, with every
    header below, fit ``budget``; then per packet: LZW compression if asked and smaller,
    the CRC header when ``crc`` (memberlist adds it for peers whose protocol max is 5 or
    more), AES-GCM with the keyring's primary key and the label as authenticated data,
    and the label header.
    """
    overhead = len(add_label_header(b"", label))
    if crc:
        overhead += _CRC_HEADER_LEN
    vsn = encryption_version(protocol_version)
    if keyring is not None:
        overhead += _ENCRYPT_OVERHEAD[vsn]
    packets = []
    for packet in pack_packets(parts, budget - overhead):
        if compress:
            squeezed = compress_payload(packet)
            if len(squeezed) < len(packet):
                packet = squeezed
        if crc:
            packet = add_crc(packet)
        if keyring is not None:
            packet = keyring.encrypt(packet, vsn, label.encode("utf-8"))
        packets.append(add_label_header(packet, label))
    return packets


def _flatten(data: bytes, parts: list[bytes], depth: int) -> int:
    """Append the leaf messages of a command to ``parts``; return the truncated count."""
    if depth > _MAX_NESTING:
        raise WireError("messages nested too deep")
    if not data:
        raise WireError("empty message")
    if data[0] == MessageType.COMPOUND:
        inner, truncated = decode_compound(data)
        for part in inner:
            truncated += _flatten(part, parts, depth + 1)
        return truncated
    if data[0] == MessageType.COMPRESS:
        return _flatten(decompress_payload(data), parts, depth + 1)
    parts.append(bytes(data))
    return 0


def unwrap_packet(
    data: bytes, *, keyring: Keyring | None, label: str = "", verify_incoming: bool = True
) -> tuple[list[bytes], int]:
    """Peel a UDP datagram as memberlist's ingestPacket does: ``(messages, truncated)``.

    Label header (must equal ``label``), decryption (with the label as authenticated
    data; a plaintext packet passes only when ``verify_incoming`` is off), CRC, then
    compound and compressed nesting down to single encoded messages, each still to be
    given to :func:`decode_message`. Use this to skip one bad message the way Go does.
    """
    data, packet_label = strip_label_header(data)
    if packet_label != label:
        raise WireError(f"packet label {packet_label!r} does not match {label!r}")
    if keyring is not None:
        try:
            data = keyring.decrypt(data, label.encode("utf-8"))
        except WireError:
            if verify_incoming:
                raise
    if len(data) >= _CRC_HEADER_LEN and data[0] == MessageType.HAS_CRC:
        data = strip_crc(data)
    parts: list[bytes] = []
    truncated = _flatten(data, parts, 0)
    return parts, truncated


def decode_packet(
    data: bytes, *, keyring: Keyring | None, label: str = "", verify_incoming: bool = True
) -> list[Message]:
    """Every message in a UDP datagram; :class:`WireError` if any of it is malformed.

    Compound parts cut off by the end of the packet are dropped, as memberlist does.
    """
    parts, _ = unwrap_packet(data, keyring=keyring, label=label, verify_incoming=verify_incoming)
    return [decode_message(part) for part in parts]


# --------------------------------------------------------------------------------------------
# TCP streams


def _stream_plaintext(msg: Message) -> bytes:
    if isinstance(msg, UserMsg):
        out = bytearray((MessageType.USER,))
        pack_value({"UserMsgLen": len(msg.payload)}, out)
        return bytes(out + msg.payload)
    return encode_message(msg)


def _encrypted_length(vsn: int, n: int) -> int:
    """memberlist's ``encryptedLength``: version, nonce, (PKCS7-padded) text and tag."""
    if vsn >= 1:
        return 1 + 12 + n + 16
    return 1 + 12 + n + (16 - n % 16) + 16


def _encrypt_stream(plain: bytes, keyring: Keyring, vsn: int, label: str) -> bytes:
    length = _encrypted_length(vsn, len(plain))
    header = bytes((MessageType.ENCRYPT,)) + length.to_bytes(4, "big")
    # Authenticated data: the encryptMsg type byte, the length, then the stream label.
    sealed = keyring.encrypt(plain, vsn, header + label.encode("utf-8"))
    return header + sealed


def encode_stream(
    msg: Message,
    *,
    keyring: Keyring | None,
    protocol_version: int,
    label: str = "",
    compress: bool = False,
) -> bytes:
    """One message as memberlist's rawSendMsgStream writes it on a TCP connection.

    A push-pull is its header, node states and user state; a user message carries a
    ``userMsgHeader``. Then optional compression, then with a keyring: type 10, a 4-byte
    length, and the AES-GCM payload authenticated with those 5 bytes plus ``label``.
    The connection's label header (:func:`add_label_header`) is the dialer's to write
    once, before its first message; it is not part of this.
    """
    plain = _stream_plaintext(msg)
    if compress:
        plain = compress_payload(plain)
    if keyring is None:
        return plain
    return _encrypt_stream(plain, keyring, encryption_version(protocol_version), label)


def _parse_plain_stream(data: bytes) -> Message:
    """A complete decrypted stream message; a compressed one is unpacked first."""
    if not data:
        raise WireError("empty stream message")
    try:
        if data[0] == MessageType.COMPRESS:
            data = _decompress_body(_Reader(data, 1))
            if not data:
                raise WireError("empty compressed stream message")
        return _read_stream_body(data[0], _Reader(data, 1))
    except _IncompleteError as e:
        raise WireError("stream message truncated") from e


class StreamDecoder:
    """Incremental decoder for one direction of a memberlist TCP connection.

    Feed it bytes as they arrive (``dataReceived``); :meth:`feed` returns the messages
    completed so far. ``inbound`` is the accepting side: it reads the optional label header
    the dialer sends first and requires it to equal ``label``; the dialer reading the reply
    gets no header. With a keyring, plaintext messages are refused unless
    ``verify_incoming`` is off; without one, encrypted messages are refused. A message
    over ``max_bytes`` is refused. After a :class:`WireError` the decoder stays failed.
    """

    def __init__(
        self,
        keyring: Keyring | None = None,
        *,
        label: str = "",
        inbound: bool = True,
        verify_incoming: bool = True,
        max_bytes: int = MAX_STREAM_BYTES,
    ) -> None:
        self._keyring = keyring
        self._label = label
        self._label_pending = inbound
        self._verify_incoming = verify_incoming
        self._max_bytes = max_bytes
        self._buf = bytearray()
        self._need = 1  # no step can succeed with fewer buffered bytes than this
        self._used = 0  # bytes of the current message already consumed
        self._failed: WireError | None = None
        # A plaintext push-pull is parsed state by state, so a slow sender costs one
        # state's parse per chunk, not a re-parse of everything received so far.
        self._push_pull: tuple[bool, int, int, list[PushNodeState]] | None = None

    def feed(self, data: bytes) -> list[Message]:
        """Take more bytes; return the messages they complete. Raises :class:`WireError`."""
        if self._failed is not None:
            raise self._failed
        self._buf += data
        try:
            return self._drain()
        except WireError as e:
            self._failed = WireError(str(e)) if isinstance(e, _IncompleteError) else e
            raise self._failed from e

    @property
    def idle(self) -> bool:
        """True when no message is partly received."""
        return not self._buf and self._push_pull is None

    def _drain(self) -> list[Message]:
        messages: list[Message] = []
        while len(self._buf) >= self._need:
            try:
                msg = self._step()
            except _IncompleteError as e:
                self._need = max(e.need, len(self._buf) + 1)
                if self._used + self._need > self._max_bytes + 5:
                    raise WireError("stream message larger than the limit") from e
                break
            self._need = 1
            if msg is not None:
                self._used = 0
                messages.append(msg)
        return messages

    def _consume(self, n: int) -> None:
        del self._buf[:n]
        self._used += n

    def _step(self) -> Message | None:
        buf = self._buf
        if self._label_pending:
            split = _split_label(buf)
            if split is None:
                raise _IncompleteError(2 if len(buf) < 2 else 2 + buf[1])
            label, length = split
            if label != self._label:
                raise WireError(f"stream label {label!r} does not match {self._label!r}")
            self._label_pending = False
            self._consume(length)
            self._used = 0
            return None
        if self._push_pull is not None:
            return self._continue_push_pull()
        msg_type = buf[0]
        if msg_type == MessageType.ENCRYPT:
            return self._step_encrypted()
        if self._keyring is not None and self._verify_incoming:
            raise WireError("encryption is configured but the remote stream is not encrypted")
        reader = _Reader(buf, 1)
        if msg_type == MessageType.PUSH_PULL:
            join, nodes, user_len = _read_push_pull_header(reader)
            self._consume(reader.pos)
            self._push_pull = (join, nodes, user_len, [])
            return self._continue_push_pull()
        if msg_type == MessageType.COMPRESS:
            fields = _read_struct(reader, "compress")
            self._consume(reader.pos)
            algo = _uint(fields, "Algo", 8)
            if algo != _LZW_ALGO:
                raise WireError(f"cannot decompress unknown algorithm {algo}")
            inner = lzw_decompress(_bytes(fields, "Buf"), self._max_bytes)
            if not inner:
                raise WireError("empty compressed stream message")
            try:
                return _read_stream_body(inner[0], _Reader(inner, 1))
            except _IncompleteError as e:
                raise WireError("compressed stream message truncated") from e
        msg = _read_stream_body(msg_type, reader)
        self._consume(reader.pos)
        return msg

    def _step_encrypted(self) -> Message:
        buf = self._buf
        if self._keyring is None:
            raise WireError("remote stream is encrypted and encryption is not configured")
        if len(buf) < 5:
            raise _IncompleteError(5)
        length = int.from_bytes(buf[1:5], "big")
        if length > self._max_bytes:
            raise WireError(f"remote stream message larger than the limit ({length})")
        if len(buf) < 5 + length:
            raise _IncompleteError(5 + length)
        header = bytes(buf[:5])
        sealed = bytes(buf[5 : 5 + length])
        self._consume(5 + length)
        plain = self._keyring.decrypt(sealed, header + self._label.encode("utf-8"))
        return _parse_plain_stream(plain)

    def _continue_push_pull(self) -> Message:
        assert self._push_pull is not None
        join, nodes, user_len, states = self._push_pull
        while len(states) < nodes:
            reader = _Reader(self._buf)
            states.append(_push_node_state_from(_read_struct(reader, "pushNodeState")))
            self._consume(reader.pos)
        reader = _Reader(self._buf)
        user_state = reader.take(user_len)
        self._consume(reader.pos)
        self._push_pull = None
        return PushPull(join=join, states=tuple(states), user_state=user_state)


def decode_stream(
    data: bytes,
    *,
    keyring: Keyring | None,
    label: str = "",
    inbound: bool = True,
    verify_incoming: bool = True,
) -> list[Message]:
    """Every message in a complete stream capture; :class:`WireError` if any is cut off."""
    decoder = StreamDecoder(keyring, label=label, inbound=inbound, verify_incoming=verify_incoming)
    messages = decoder.feed(data)
    if not decoder.idle:
        raise WireError("stream ends inside a message")
    return messages
