"""Serf's node metadata: tags as the byte 0xFF then a msgpack map of strings.

``serf members`` reads a member's tags (and so its role) from memberlist's ``Meta``;
serf writes them with the same Go msgpack codec as memberlist (see :mod:`wire`).
"""

from __future__ import annotations

from collections.abc import Mapping

from imgproxy.membership.wire import MsgpackMap, WireError, pack_value, unpack_value

__all__ = ["META_MAX_SIZE", "TAG_MAGIC_BYTE", "decode_tags", "encode_tags"]

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
