"""memberlist's wire format: golden packets from a real serf agent, round trips, fuzzing.

The fixtures in ``fixtures/serf_*.json`` are what ``serf agent`` 0.9 (memberlist 0.2,
protocol 2) sent a fake member; ``capture_serf_packets.py`` regenerates them.
"""

from __future__ import annotations

import json
import random
import socket
import zlib
from functools import cache
from pathlib import Path
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from imgproxy.membership.keyring import Keyring
from imgproxy.membership.messages import (
    AckResp,
    Alive,
    Dead,
    ErrResp,
    IndirectPing,
    Message,
    NackResp,
    NodeState,
    Ping,
    PushNodeState,
    PushPull,
    Suspect,
    UserMsg,
)
from imgproxy.membership.tags import (
    SerfState,
    decode_serf_state,
    decode_tags,
    encode_serf_state,
    encode_tags,
)
from imgproxy.membership.wire import (
    StreamDecoder,
    WireError,
    add_crc,
    add_label_header,
    compress_payload,
    decode_compound,
    decode_message,
    decode_packet,
    decode_stream,
    decompress_payload,
    encode_compound,
    encode_message,
    encode_packet,
    encode_stream,
    encryption_version,
    lzw_compress,
    lzw_decompress,
    pack_packets,
    pack_value,
    strip_crc,
    strip_label_header,
    unpack_value,
    unwrap_packet,
)

FIXTURES = Path(__file__).parent / "fixtures"
SERF_KEY = bytes(range(16))
A_ADDR = socket.inet_aton("127.0.0.21")
FAKE_ADDR = socket.inet_aton("127.0.0.23")
SERF_VSN = (1, 5, 2, 2, 5, 5)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# the round trips through every layer cost more per example
FUZZ_HEAVY = settings(FUZZ, max_examples=60)


@cache
def _fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"serf_{name}.json").read_text())


def _records(name: str, transport: str | None = None) -> list[dict[str, Any]]:
    return [r for r in _fixture(name)["records"] if transport in (None, r["transport"])]


def _packets(name: str) -> list[bytes]:
    return [bytes.fromhex(r["hex"]) for r in _records(name, "udp")]


def _streams(name: str) -> list[tuple[bytes, bool]]:
    """Captured TCP bytes and whether serf dialled us (so a label header may come first)."""
    return [(bytes.fromhex(r["hex"]), "reply" not in r["kind"]) for r in _records(name, "tcp")]


def _fixture_keyring(name: str) -> Keyring | None:
    return Keyring([SERF_KEY]) if name == "encrypted" else None


def _all_udp_messages(name: str) -> list[Message]:
    keyring = _fixture_keyring(name)
    return [m for p in _packets(name) for m in decode_packet(p, keyring=keyring)]


def _peel(packet: bytes) -> list[bytes]:
    """Strip CRC, compression and compound framing down to single messages."""
    if packet[0] == 12:
        return _peel(strip_crc(packet))
    if packet[0] == 9:
        return _peel(decompress_payload(packet))
    if packet[0] == 7:
        parts, truncated = decode_compound(packet)
        assert truncated == 0
        return [leaf for part in parts for leaf in _peel(part)]
    return [packet]


# --------------------------------------------------------------------------------------------
# golden packets from serf


class SerfPlaintextGoldenTests(SynchronousTestCase):
    """Serf's unencrypted packets decode to what the capture scenario did."""

    def test_every_captured_udp_packet_decodes(self) -> None:
        for packet in _packets("plain"):
            self.assertTrue(decode_packet(packet, keyring=None))

    def test_join_push_pull_carries_serf_tags_and_versions(self) -> None:
        joins = [d for d, inbound in _streams("plain") if inbound]
        [msg] = decode_stream(joins[0], keyring=None)
        assert isinstance(msg, PushPull)
        self.assertTrue(msg.join)
        [state] = msg.states
        self.assertEqual((state.name, state.addr, state.port), ("a", A_ADDR, 7946))
        self.assertEqual(state.state, NodeState.ALIVE)
        self.assertEqual(state.vsn, SERF_VSN)
        self.assertEqual(decode_tags(state.meta), {"role": "worker", "http": "8080"})
        # serf's own push-pull state (its messagePushPullType is 2) rides as user state
        self.assertEqual(msg.user_state[0], 2)

    def test_push_pull_reply_lists_serf_and_us(self) -> None:
        replies = [d for d, inbound in _streams("plain") if not inbound]
        messages = [m for d in replies for m in decode_stream(d, keyring=None, inbound=False)]
        [push_pull] = [m for m in messages if isinstance(m, PushPull)]
        self.assertFalse(push_pull.join)
        names = {s.name: decode_tags(s.meta) for s in push_pull.states}
        self.assertEqual(names["fake"], {"role": "gateway", "http": "8081"})
        self.assertEqual(names["a"], {"role": "worker", "http": "8080"})

    def test_serf_probes_with_pings_that_name_their_source(self) -> None:
        pings = [m for m in _all_udp_messages("plain") if isinstance(m, Ping)]
        self.assertTrue(pings)
        for ping in pings:
            self.assertEqual(ping.node, "fake")
            self.assertIn(ping.source_node, ("a", "b"))
            self.assertEqual(ping.source_port, 7946)
            self.assertEqual(len(ping.source_addr), 4)

    def test_a_lone_ping_is_sent_bare(self) -> None:
        # memberlist adds a CRC only when it looks the peer up by address (never for
        # named nodes) and compresses only when that saves bytes.
        lone_pings = [
            p
            for p in _packets("plain")
            if [type(m) for m in decode_packet(p, keyring=None)] == [Ping]
        ]
        self.assertTrue(lone_pings)
        self.assertTrue(all(p[0] == 0 for p in lone_pings))

    def test_serf_acks_our_ping_with_a_coordinate_payload(self) -> None:
        acks = [m for m in _all_udp_messages("plain") if isinstance(m, AckResp)]
        self.assertEqual({a.seq_no for a in acks}, {1001, 1002})
        # serf's ping delegate payload: version byte 1, then a msgpack coordinate
        self.assertEqual(acks[0].payload[0], 1)
        self.assertIn(b"Vec", acks[0].payload)

    def test_serf_nacks_an_indirect_ping_to_an_unreachable_node(self) -> None:
        nacks = [m for m in _all_udp_messages("plain") if isinstance(m, NackResp)]
        self.assertEqual(nacks, [NackResp(seq_no=1004)])

    def test_serf_asks_us_to_probe_a_failing_node_indirectly(self) -> None:
        asks = [m for m in _all_udp_messages("plain") if isinstance(m, IndirectPing)]
        self.assertTrue(asks)
        for ask in asks:
            self.assertTrue(ask.nack)  # we advertise protocol max 5, so nacks are wanted
            self.assertEqual(ask.port, 7946)
            self.assertTrue(ask.node == "b" or ask.node.startswith("rumour"), ask.node)

    def test_gossip_has_alive_suspect_dead_and_serf_user_messages(self) -> None:
        messages = _all_udp_messages("plain")
        alive = {m.node: m for m in messages if isinstance(m, Alive)}
        self.assertEqual(decode_tags(alive["b"].meta), {"role": "gateway", "http": "8082"})
        self.assertEqual(alive["rumour"].incarnation, 7)
        self.assertTrue(any(isinstance(m, Suspect) for m in messages))
        self.assertIn(Dead(incarnation=1, node="a", from_node="a"), messages)  # a leaving
        users = [m for m in messages if isinstance(m, UserMsg)]
        self.assertTrue(any(u.payload[0] == 1 for u in users))  # serf's join intent

    def test_gossip_is_crc_checked_and_may_be_compressed(self) -> None:
        gossip = [p for p in _packets("plain") if p[0] == 12]
        self.assertTrue(gossip)
        self.assertTrue(any(strip_crc(p)[0] == 9 for p in gossip))
        for packet in gossip:
            self.assertEqual(zlib.crc32(packet[5:]), int.from_bytes(packet[1:5], "big"))

    def test_reencoding_every_message_reproduces_serf_bytes(self) -> None:
        leaves = [leaf for p in _packets("plain") for leaf in _peel(p)]
        self.assertGreater(len(leaves), 20)
        for leaf in leaves:
            self.assertEqual(encode_message(decode_message(leaf)), leaf)

    def test_reencoding_framing_reproduces_serf_bytes(self) -> None:
        for packet in _packets("plain"):
            body = strip_crc(packet) if packet[0] == 12 else packet
            if packet[0] == 12:
                self.assertEqual(add_crc(body), packet)
            if body[0] == 9:
                inner = decompress_payload(body)
                # Go's LZW encoder is deterministic: ours must write the same codes.
                self.assertEqual(compress_payload(inner), body)
                body = inner
            if body[0] == 7:
                parts, _ = decode_compound(body)
                self.assertEqual(encode_compound(parts), body)

    def test_reencoding_streams_reproduces_serf_bytes(self) -> None:
        for data, inbound in _streams("plain"):
            [msg] = decode_stream(data, keyring=None, inbound=inbound)
            again = encode_stream(msg, keyring=None, protocol_version=2, compress=True)
            self.assertEqual(again, data)

    def test_serf_took_our_compressed_crc_compound(self) -> None:
        # capture_serf_packets.py sent rumour2 and rumour3 in one LZW + CRC compound
        for name in ("plain", "encrypted"):
            members = _fixture(name)["notes"]["members_a"]["members"]
            self.assertLessEqual({"rumour2", "rumour3"}, {m["name"] for m in members})

    def test_serf_logged_no_complaint_about_anything_we_sent(self) -> None:
        # What memberlist and serf log when a peer's bytes are wrong (net.go, delegate.go);
        # dialling the fake rumour nodes and shutting down are not our bytes.
        complaints = ("decode", "decrypt", "checksum", "remote state", "invalid", "unsupported")
        complaints += ("compress", "truncated", "label", "unexpected")
        for name in ("plain", "encrypted"):
            lines = [line.lower() for line in _fixture(name)["serf_log_problems"]]
            self.assertEqual([ln for ln in lines if any(c in ln for c in complaints)], [])

    def test_serf_listed_our_member_with_our_tags(self) -> None:
        members = _fixture("plain")["notes"]["members_a"]["members"]
        fake = next(m for m in members if m["name"] == "fake")
        self.assertEqual(fake["status"], "alive")
        self.assertEqual(fake["tags"], {"role": "gateway", "http": "8081"})


class SerfEncryptedGoldenTests(SynchronousTestCase):
    """Serf's packets under ``-encrypt``: AES-GCM version 1, the committed key."""

    def test_every_captured_udp_packet_decrypts_and_decodes(self) -> None:
        for packet in _packets("encrypted"):
            self.assertEqual(packet[0], encryption_version(2))
            self.assertTrue(decode_packet(packet, keyring=Keyring([SERF_KEY])))

    def test_decoded_gossip_matches_the_scenario(self) -> None:
        messages = _all_udp_messages("encrypted")
        self.assertIn(NackResp(seq_no=1004), messages)
        self.assertIn(Dead(incarnation=1, node="a", from_node="a"), messages)
        alive = {m.node for m in messages if isinstance(m, Alive)}
        self.assertLessEqual({"a", "b", "fake", "rumour"}, alive)

    def test_a_rotated_in_key_still_decrypts(self) -> None:
        keyring = Keyring([b"k" * 32, SERF_KEY], primary=b"k" * 32)
        for packet in _packets("encrypted"):
            self.assertTrue(decode_packet(packet, keyring=keyring))

    def test_the_wrong_key_is_refused(self) -> None:
        for packet in _packets("encrypted"):
            with self.assertRaises(WireError):
                decode_packet(packet, keyring=Keyring([b"x" * 16]))

    def test_without_a_keyring_encrypted_packets_do_not_decode(self) -> None:
        for packet in _packets("encrypted"):
            with self.assertRaises(WireError):
                decode_packet(packet, keyring=None)

    def test_same_nonce_reproduces_serf_ciphertext(self) -> None:
        keyring = Keyring([SERF_KEY])
        for packet in _packets("encrypted"):
            plain = keyring.decrypt(packet)
            self.assertEqual(keyring.encrypt(plain, 1, nonce=packet[1:13]), packet)

    def test_streams_decrypt_with_their_header_as_authenticated_data(self) -> None:
        keyring = Keyring([SERF_KEY])
        for data, inbound in _streams("encrypted"):
            self.assertEqual(data[0], 10)
            self.assertEqual(int.from_bytes(data[1:5], "big"), len(data) - 5)
            [msg] = decode_stream(data, keyring=keyring, inbound=inbound)
            self.assertIsInstance(msg, PushPull | AckResp)
            plain = keyring.decrypt(data[5:], data[:5])
            resealed = keyring.encrypt(plain, 1, data[:5], nonce=data[6:18])
            self.assertEqual(data[:5] + resealed, data)

    def test_encrypted_stream_refused_without_keyring_and_plain_refused_with_one(self) -> None:
        encrypted, _ = _streams("encrypted")[0]
        plain, _ = _streams("plain")[0]
        with self.assertRaises(WireError):
            decode_stream(encrypted, keyring=None)
        with self.assertRaises(WireError):
            decode_stream(plain, keyring=Keyring([SERF_KEY]))
        self.assertTrue(decode_stream(plain, keyring=Keyring([SERF_KEY]), verify_incoming=False))


# --------------------------------------------------------------------------------------------
# msgpack as Go's codec writes it


class GoMsgpackTests(SynchronousTestCase):
    """The encoder writes exactly what hashicorp/go-msgpack's default handle writes."""

    def test_strings_skip_str8(self) -> None:
        self.assertEqual(pack_value("x" * 31)[:1], b"\xbf")
        self.assertEqual(pack_value("x" * 32)[:3], b"\xda\x00\x20")
        self.assertEqual(pack_value("x" * 255)[:3], b"\xda\x00\xff")
        self.assertEqual(pack_value("x" * 70000)[:5], b"\xdb\x00\x01\x11\x70")

    def test_bytes_are_raw_strings_and_empty_bytes_are_nil(self) -> None:
        self.assertEqual(bytes(pack_value(b"\x01\x02")), b"\xa2\x01\x02")
        self.assertEqual(bytes(pack_value(b"")), b"\xc0")

    def test_integers_use_the_smallest_form(self) -> None:
        cases = {
            0: b"\x00",
            127: b"\x7f",
            128: b"\xcc\x80",
            255: b"\xcc\xff",
            256: b"\xcd\x01\x00",
            65536: b"\xce\x00\x01\x00\x00",
            2**32: b"\xcf\x00\x00\x00\x01\x00\x00\x00\x00",
            -1: b"\xff",
            -33: b"\xd0\xdf",
        }
        for value, expected in cases.items():
            self.assertEqual(bytes(pack_value(value)), expected)

    def test_struct_fields_are_sorted_by_go_name_and_omitempty_honoured(self) -> None:
        data = encode_message(Ping(seq_no=5, node="n"))
        self.assertEqual(data, b"\x00\x82\xa4Node\xa1n\xa5SeqNo\x05")
        ind = encode_message(IndirectPing(seq_no=1, target=b"\x01\x02\x03\x04", port=1, node="x"))
        _, pos = unpack_value(ind, 1)
        keys = [k.decode() for k, _ in unpack_value(ind, 1)[0]]
        self.assertEqual(keys, ["Nack", "Node", "Port", "SeqNo", "Target"])
        self.assertEqual(pos, len(ind))

    def test_vsn_is_written_as_raw_bytes(self) -> None:
        data = encode_message(Alive(incarnation=1, node="n", addr=b"", port=1, vsn=(1, 5, 2)))
        self.assertTrue(data.endswith(b"\xa3Vsn\xa3\x01\x05\x02"))

    def test_decoder_accepts_other_msgpack_writers(self) -> None:
        # str8, bin and any field order, as a newer Go codec or Python msgpack writes them
        body = {"Vsn": [1, 5, 2, 0, 0, 0], "Port": 7946, "Node": "n" * 40, "Addr": b"\x7f\0\0\1"}
        body |= {"Incarnation": 3, "Meta": b"", "Extra": [1.5, {"x": None}]}
        data = b"\x04" + msgpack.packb(body, use_bin_type=True)
        self.assertEqual(
            decode_message(data),
            Alive(
                incarnation=3, node="n" * 40, addr=b"\x7f\0\0\1", port=7946, vsn=(1, 5, 2, 0, 0, 0)
            ),
        )

    def test_missing_fields_take_go_zero_values(self) -> None:
        self.assertEqual(decode_message(b"\x00\x80"), Ping(seq_no=0, node=""))
        self.assertEqual(decode_message(b"\x02\x81\xa7Payload\xc0"), AckResp(seq_no=0))

    def test_out_of_range_and_mistyped_fields_are_refused(self) -> None:
        bad = [
            {"SeqNo": 2**32},
            {"SeqNo": -1},
            {"SeqNo": "1"},
            {"SourcePort": 70000},
            {"Node": 5},
            {"Node": b"\xff\xfe"},
        ]
        for body in bad:
            with self.assertRaises(WireError, msg=repr(body)):
                decode_message(b"\x00" + msgpack.packb(body, use_bin_type=False))
        with self.assertRaises(WireError):
            decode_message(b"\x00" + msgpack.packb([1, 2]))

    def test_unknown_node_state_is_refused(self) -> None:
        state = PushNodeState("n", b"", 1, b"", 1, NodeState.ALIVE)
        data = bytearray(encode_message(PushPull(join=False, states=(state,))))
        index = data.index(b"\xa5State") + 6
        data[index] = 9
        with self.assertRaises(WireError):
            decode_message(bytes(data))


# --------------------------------------------------------------------------------------------
# round trips

_u32 = st.integers(0, 2**32 - 1)
_u16 = st.integers(0, 2**16 - 1)
_name = st.text(max_size=40)
_addr = st.sampled_from([b"", bytes(4), socket.inet_aton("10.1.2.3"), bytes(range(16))])
_vsn = st.tuples(*[st.integers(0, 255)] * 6)
_blob = st.binary(max_size=300)
_node_state = st.builds(
    PushNodeState,
    name=_name,
    addr=_addr,
    port=_u16,
    meta=_blob,
    incarnation=_u32,
    state=st.sampled_from(NodeState),
    vsn=_vsn,
)
_packet_message = st.one_of(
    st.builds(
        Ping, seq_no=_u32, node=_name, source_addr=_addr, source_port=_u16, source_node=_name
    ),
    st.builds(
        IndirectPing,
        seq_no=_u32,
        target=_addr,
        port=_u16,
        node=_name,
        nack=st.booleans(),
        source_addr=_addr,
        source_port=_u16,
        source_node=_name,
    ),
    st.builds(AckResp, seq_no=_u32, payload=_blob),
    st.builds(NackResp, seq_no=_u32),
    st.builds(Suspect, incarnation=_u32, node=_name, from_node=_name),
    st.builds(Dead, incarnation=_u32, node=_name, from_node=_name),
    st.builds(Alive, incarnation=_u32, node=_name, addr=_addr, port=_u16, meta=_blob, vsn=_vsn),
    st.builds(UserMsg, payload=_blob),
)
_push_pull = st.builds(
    PushPull,
    join=st.booleans(),
    states=st.tuples() | st.lists(_node_state, max_size=5).map(tuple),
    user_state=_blob,
)
_stream_message = st.one_of(
    _push_pull,
    st.builds(Ping, seq_no=_u32, node=_name),
    st.builds(AckResp, seq_no=_u32, payload=_blob),
    st.builds(ErrResp, error=_name),
    st.builds(UserMsg, payload=_blob),
)
_keyring = st.sampled_from([None, Keyring([bytes(16)]), Keyring([bytes(range(32))])])
_label = st.sampled_from(["", "prod", "x" * 255])


class MessageRoundTripTests(SynchronousTestCase):
    """Every message type survives encode and decode unchanged."""

    def test_each_type_explicitly(self) -> None:
        messages: list[Message] = [
            Ping(seq_no=1, node="b", source_addr=FAKE_ADDR, source_port=7946, source_node="a"),
            IndirectPing(seq_no=2, target=A_ADDR, port=7946, node="x", nack=True),
            AckResp(seq_no=3, payload=b"\x01coord"),
            NackResp(seq_no=4),
            ErrResp(error="boom"),
            Suspect(incarnation=5, node="x", from_node="y"),
            Alive(incarnation=6, node="x", addr=A_ADDR, port=7946, meta=encode_tags({"a": "b"})),
            Dead(incarnation=7, node="x", from_node="x"),
            PushPull(join=True, states=(PushNodeState("x", A_ADDR, 1, b"", 2, NodeState.LEFT),)),
            UserMsg(payload=b"\x03anything"),
        ]
        for msg in messages:
            self.assertEqual(decode_message(encode_message(msg)), msg)

    @FUZZ
    @given(_packet_message | _push_pull)
    def test_any_message(self, msg: Message) -> None:
        self.assertEqual(decode_message(encode_message(msg)), msg)

    def test_values_go_could_not_decode_are_refused_when_encoding(self) -> None:
        for msg in (
            Ping(seq_no=2**32, node="x"),
            Alive(incarnation=-1, node="x", addr=b"", port=1),
            IndirectPing(seq_no=1, target=b"", port=70000, node="x"),
            Alive(incarnation=1, node="x", addr=b"", port=1, vsn=(256,)),
            PushPull(join=False, states=(PushNodeState("x", b"", 65536, b"", 1, NodeState.DEAD),)),
        ):
            with self.assertRaises(ValueError, msg=repr(msg)):
                encode_message(msg)

    def test_user_message_in_a_packet_is_its_raw_payload(self) -> None:
        self.assertEqual(encode_message(UserMsg(payload=b"\x01xy")), b"\x08\x01xy")

    def test_framing_types_are_not_messages(self) -> None:
        for first in (7, 9, 10, 12, 14, 99, 244):
            with self.assertRaises(WireError):
                decode_message(bytes((first,)) + b"\x80")


class PacketTests(SynchronousTestCase):
    """The UDP path: packing, compression, CRC, encryption, labels."""

    @FUZZ_HEAVY
    @given(
        st.lists(_packet_message, min_size=1, max_size=30),
        _keyring,
        st.booleans(),
        _label,
        st.integers(1, 5),
        st.booleans(),
    )
    def test_packets_round_trip_within_budget(
        self,
        messages: list[Message],
        keyring: Keyring | None,
        crc: bool,
        label: str,
        protocol_version: int,
        compress: bool,
    ) -> None:
        parts = [encode_message(m) for m in messages]
        packets = encode_packet(
            parts,
            keyring=keyring,
            protocol_version=protocol_version,
            crc=crc,
            label=label,
            budget=1400,
            compress=compress,
        )
        decoded = [m for p in packets for m in decode_packet(p, keyring=keyring, label=label)]
        self.assertEqual(decoded, messages)
        overhead = (5 if crc else 0) + (45 if keyring else 0) + (2 + len(label) if label else 0)
        for packet in packets:
            if len(packet) > 1400:
                # only a message too large for any packet may exceed the budget
                self.assertEqual(len(decode_packet(packet, keyring=keyring, label=label)), 1)
                self.assertGreater(len(packet), 1400 - overhead)

    def test_one_message_is_sent_bare_and_several_as_a_compound(self) -> None:
        one = encode_message(NackResp(seq_no=1))
        self.assertEqual(pack_packets([one]), [one])
        [compound] = pack_packets([one, one])
        self.assertEqual(compound[:2], b"\x07\x02")

    def test_packing_respects_the_budget_and_order(self) -> None:
        parts = [bytes((8,)) + bytes([i]) * 100 for i in range(40)]
        packets = pack_packets(parts, budget=500)
        self.assertTrue(all(len(p) <= 500 for p in packets))
        flat = [leaf for p in packets for leaf in _peel(p)]
        self.assertEqual(flat, parts)

    def test_packing_never_builds_a_compound_go_would_misread(self) -> None:
        # Go computes numParts*2 in uint8: 128 or more parts would be misread.
        packets = pack_packets([b"\x08"] * 300, budget=100000)
        self.assertTrue(all(p[1] <= 127 for p in packets))
        self.assertEqual(sum(p[1] for p in packets), 300)

    def test_protocol_version_one_uses_padded_encryption(self) -> None:
        keyring = Keyring([bytes(16)])
        [v0] = encode_packet([b"\x08x"], keyring=keyring, protocol_version=1, crc=False)
        [v1] = encode_packet([b"\x08x"], keyring=keyring, protocol_version=2, crc=False)
        self.assertEqual((v0[0], len(v0)), (0, 1 + 12 + 16 + 16))
        self.assertEqual((v1[0], len(v1)), (1, 1 + 12 + 2 + 16))

    def test_crc_mismatch_is_refused(self) -> None:
        [packet] = encode_packet([b"\x08hello"], keyring=None, protocol_version=2, crc=True)
        self.assertEqual(decode_packet(packet, keyring=None), [UserMsg(b"hello")])
        corrupt = packet[:-1] + b"X"
        with self.assertRaises(WireError):
            decode_packet(corrupt, keyring=None)

    def test_label_must_match_and_is_authenticated(self) -> None:
        keyring = Keyring([bytes(16)])
        [packet] = encode_packet(
            [b"\x08x"], keyring=keyring, protocol_version=2, crc=False, label="a"
        )
        self.assertEqual(packet[:3], b"\xf4\x01a")
        with self.assertRaises(WireError):
            decode_packet(packet, keyring=keyring, label="b")
        with self.assertRaises(WireError):
            decode_packet(packet, keyring=keyring)
        relabelled = add_label_header(strip_label_header(packet)[0], "b")
        with self.assertRaises(WireError):
            decode_packet(relabelled, keyring=keyring, label="b")

    def test_label_header_cannot_be_empty_or_truncated(self) -> None:
        for bad in (b"\xf4", b"\xf4\x00\x08x", b"\xf4\x05ab"):
            with self.assertRaises(WireError):
                strip_label_header(bad)

    def test_plaintext_passes_an_encrypting_member_only_when_not_verifying(self) -> None:
        keyring = Keyring([bytes(16)])
        with self.assertRaises(WireError):
            decode_packet(b"\x08x", keyring=keyring)
        self.assertEqual(
            decode_packet(b"\x08x", keyring=keyring, verify_incoming=False), [UserMsg(b"x")]
        )

    def test_truncated_compound_parts_are_dropped_and_counted(self) -> None:
        compound = encode_compound([b"\x08a", b"\x08bb", b"\x08ccc"])
        parts, truncated = decode_compound(compound[:-2])
        self.assertEqual((parts, truncated), ([b"\x08a", b"\x08bb"], 1))
        self.assertEqual(unwrap_packet(compound[:-2], keyring=None), ([b"\x08a", b"\x08bb"], 1))

    def test_nested_compound_and_compressed_messages_unwrap(self) -> None:
        inner = encode_compound([b"\x08a", compress_payload(b"\x08b")])
        packet = compress_payload(encode_compound([inner, b"\x08c"]))
        self.assertEqual(
            decode_packet(packet, keyring=None), [UserMsg(b"a"), UserMsg(b"b"), UserMsg(b"c")]
        )

    def test_hostile_nesting_is_refused(self) -> None:
        packet = b"\x08x"
        for _ in range(20):
            packet = encode_compound([packet])
        with self.assertRaises(WireError):
            decode_packet(packet, keyring=None)


class LzwTests(SynchronousTestCase):
    """Go's compress/lzw, LSB order, literal width 8."""

    @FUZZ
    @given(st.binary(max_size=2000) | st.text("ab", max_size=20000).map(str.encode))
    def test_round_trip(self, data: bytes) -> None:
        self.assertEqual(lzw_decompress(lzw_compress(data)), data)

    def test_round_trip_through_table_resets(self) -> None:
        rng = random.Random(7)
        data = bytes(rng.randrange(256) for _ in range(60000))
        self.assertEqual(lzw_decompress(lzw_compress(data)), data)

    def test_empty_input(self) -> None:
        self.assertEqual(lzw_decompress(lzw_compress(b"")), b"")

    def test_a_stream_without_its_end_code_is_refused(self) -> None:
        with self.assertRaises(WireError):
            lzw_decompress(lzw_compress(b"hello world")[:-2])

    def test_output_is_capped(self) -> None:
        with self.assertRaises(WireError):
            lzw_decompress(lzw_compress(b"\0" * 100000), max_size=1000)

    def test_unknown_algorithm_is_refused(self) -> None:
        body = pack_value({"Algo": 1, "Buf": lzw_compress(b"\x08x")}, bytearray(b"\x09"))
        with self.assertRaises(WireError):
            decompress_payload(bytes(body))


class StreamTests(SynchronousTestCase):
    """The TCP path, fed in arbitrary pieces as a Twisted protocol would."""

    @FUZZ_HEAVY
    @given(
        st.lists(_stream_message, min_size=1, max_size=3),
        _keyring,
        _label,
        st.booleans(),
        st.integers(1, 5),
        st.randoms(use_true_random=False),
    )
    def test_messages_survive_any_chunking(
        self,
        messages: list[Message],
        keyring: Keyring | None,
        label: str,
        compress: bool,
        protocol_version: int,
        rng: random.Random,
    ) -> None:
        data = add_label_header(b"", label) + b"".join(
            encode_stream(
                m,
                keyring=keyring,
                protocol_version=protocol_version,
                label=label,
                compress=compress,
            )
            for m in messages
        )
        decoder = StreamDecoder(keyring, label=label)
        got: list[Message] = []
        pos = 0
        while pos < len(data):
            step = rng.randint(1, 64)
            got += decoder.feed(data[pos : pos + step])
            pos += step
        self.assertEqual(got, messages)
        self.assertTrue(decoder.idle)

    def test_a_push_pull_with_no_states_completes_on_its_last_byte(self) -> None:
        data = encode_stream(PushPull(join=True, states=()), keyring=None, protocol_version=2)
        decoder = StreamDecoder()
        self.assertEqual(decoder.feed(data[:-1]), [])
        self.assertFalse(decoder.idle)
        self.assertEqual(decoder.feed(data[-1:]), [PushPull(join=True, states=())])

    def test_the_dialer_side_takes_no_label_header_but_authenticates_the_label(self) -> None:
        keyring = Keyring([bytes(16)])
        reply = encode_stream(AckResp(seq_no=9), keyring=keyring, protocol_version=2, label="l")
        self.assertEqual(
            StreamDecoder(keyring, label="l", inbound=False).feed(reply), [AckResp(seq_no=9)]
        )
        with self.assertRaises(WireError):
            StreamDecoder(keyring, label="other", inbound=False).feed(reply)

    def test_inbound_label_must_match(self) -> None:
        data = add_label_header(encode_stream(Ping(1, "x"), keyring=None, protocol_version=2), "a")
        self.assertEqual(StreamDecoder(label="a").feed(data), [Ping(1, "x")])
        with self.assertRaises(WireError):
            StreamDecoder(label="b").feed(data)
        with self.assertRaises(WireError):
            StreamDecoder().feed(data)

    def test_oversized_messages_are_refused_early(self) -> None:
        keyring = Keyring([bytes(16)])
        with self.assertRaises(WireError):
            StreamDecoder(keyring).feed(b"\x0a\xff\xff\xff\xff")
        header = pack_value({"Join": False, "Nodes": 0, "UserStateLen": 5000}, bytearray(b"\x06"))
        decoder = StreamDecoder(max_bytes=1000)
        with self.assertRaises(WireError):
            decoder.feed(bytes(header) + b"x" * 100)

    def test_a_failed_decoder_stays_failed(self) -> None:
        decoder = StreamDecoder()
        with self.assertRaises(WireError):
            decoder.feed(b"\x07")
        with self.assertRaises(WireError):
            decoder.feed(encode_stream(Ping(1, "x"), keyring=None, protocol_version=2))

    def test_a_stream_user_message_has_its_length_header(self) -> None:
        data = encode_stream(UserMsg(b"abc"), keyring=None, protocol_version=2)
        self.assertEqual(data, b"\x08\x81\xaaUserMsgLen\x03abc")

    def test_decode_stream_refuses_a_cut_off_message(self) -> None:
        data = encode_stream(
            PushPull(join=False, states=(), user_state=b"xyz"), keyring=None, protocol_version=2
        )
        with self.assertRaises(WireError):
            decode_stream(data[:-1], keyring=None)


class TagTests(SynchronousTestCase):
    """Serf's tags in a member's meta."""

    def test_round_trip(self) -> None:
        tags = {"role": "worker", "http": "8080", "long": "v" * 100}
        self.assertEqual(decode_tags(encode_tags(tags)), tags)

    def test_encoding_is_serf_layout_with_sorted_keys(self) -> None:
        self.assertEqual(
            encode_tags({"role": "worker", "http": "8080"}),
            b"\xff\x82\xa4http\xa48080\xa4role\xa6worker",
        )

    def test_serf_meta_from_the_capture_decodes(self) -> None:
        alive = [m for m in _all_udp_messages("plain") if isinstance(m, Alive) and m.node == "a"]
        self.assertEqual(decode_tags(alive[0].meta), {"role": "worker", "http": "8080"})

    def test_empty_meta_and_serf_legacy_role_meta(self) -> None:
        self.assertEqual(decode_tags(b""), {})
        self.assertEqual(decode_tags(b"web"), {"role": "web"})

    def test_garbage_is_refused(self) -> None:
        for bad in (
            b"\xff",
            b"\xff\x92\xa1a\xa1b",
            b"\xff\x81\xa1a\x01",
            b"\xff\x81\xa1a\xa2\xff\xfe",
        ):
            with self.assertRaises(WireError, msg=bad.hex()):
                decode_tags(bad)

    def test_serf_push_pull_state_from_the_capture_decodes(self) -> None:
        joins = [d for d, inbound in _streams("plain") if inbound]
        [msg] = decode_stream(joins[0], keyring=None)
        assert isinstance(msg, PushPull)
        state = decode_serf_state(msg.user_state)
        self.assertEqual(state.status_ltimes.keys(), {"a"})
        self.assertGreaterEqual(state.ltime, 1)

    def test_serf_push_pull_state_round_trip(self) -> None:
        state = SerfState(ltime=9, status_ltimes={"b": 2, "a": 1}, left_members=("c",))
        data = encode_serf_state(state)
        self.assertEqual(data[0], 2)
        self.assertEqual(decode_serf_state(data), state)

    def test_bad_serf_push_pull_states_are_refused(self) -> None:
        for bad in (b"", b"\x03\x80", b"\x02\x90", b"\x02\x81\xa5LTime\xa1x"):
            with self.assertRaises(WireError, msg=bad.hex()):
                decode_serf_state(bad)

    def test_tags_over_the_meta_limit_are_refused(self) -> None:
        with self.assertRaises(ValueError):
            encode_tags({"big": "x" * 600})


# --------------------------------------------------------------------------------------------
# fuzzing: nothing but WireError, ever


def _mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(4)
        if choice == 0 and buf:
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        elif choice == 1 and buf:
            del buf[rng.randrange(len(buf)) :]
        elif choice == 2:
            buf.insert(rng.randrange(len(buf) + 1), rng.randrange(256))
        elif buf:
            buf[rng.randrange(len(buf))] = rng.choice([0x00, 0x7F, 0xC0, 0xDA, 0xDF, 0xFF])
    return bytes(buf)


def _plain_goldens() -> list[bytes]:
    return _packets("plain") + [d for d, _ in _streams("plain")]


class FuzzTests(SynchronousTestCase):
    """Random and mutated input raises WireError and nothing else."""

    def _only_wire_errors(self, call: Any, data: bytes) -> None:
        try:
            call(data)
        except WireError:
            pass

    @FUZZ
    @given(st.binary(max_size=400), _keyring)
    def test_random_bytes_into_every_decoder(self, data: bytes, keyring: Keyring | None) -> None:
        self._only_wire_errors(lambda d: decode_packet(d, keyring=keyring), data)
        self._only_wire_errors(lambda d: decode_packet(d, keyring=None), data)
        self._only_wire_errors(decode_message, data)
        self._only_wire_errors(lambda d: StreamDecoder(keyring).feed(d), data)
        self._only_wire_errors(lambda d: StreamDecoder(None).feed(d), data)
        self._only_wire_errors(decode_tags, data)
        self._only_wire_errors(decode_serf_state, b"\x02" + data)
        self._only_wire_errors(decode_compound, data)
        self._only_wire_errors(decompress_payload, data)
        self._only_wire_errors(lzw_decompress, data)
        self._only_wire_errors(strip_crc, data)

    @FUZZ
    @given(st.integers(0, 10**6), st.randoms(use_true_random=False))
    def test_mutated_golden_packets(self, index: int, rng: random.Random) -> None:
        goldens = _plain_goldens()
        data = _mutate(goldens[index % len(goldens)], rng)
        self._only_wire_errors(lambda d: decode_packet(d, keyring=None), data)
        self._only_wire_errors(lambda d: StreamDecoder(None).feed(d), data)
        self._only_wire_errors(decode_message, data)
        self._only_wire_errors(lambda d: StreamDecoder(None, inbound=False).feed(d), data)

    @FUZZ
    @given(st.integers(0, 10**6), st.randoms(use_true_random=False))
    def test_mutated_packets_inside_valid_encryption(self, index: int, rng: random.Random) -> None:
        # Mutate the plaintext, then encrypt it properly, so the parser itself is reached.
        keyring = Keyring([SERF_KEY])
        goldens = _plain_goldens()
        plain = _mutate(goldens[index % len(goldens)], rng)
        packet = keyring.encrypt(plain, 1)
        self._only_wire_errors(lambda d: decode_packet(d, keyring=keyring), packet)
        header = b"\x0a" + (len(plain) + 29).to_bytes(4, "big")
        stream = header + keyring.encrypt(plain, 1, header)
        self._only_wire_errors(lambda d: StreamDecoder(keyring).feed(d), stream)

    @FUZZ
    @given(
        st.recursive(
            st.none()
            | st.booleans()
            | st.integers(-(2**63), 2**64 - 1)
            | st.text(max_size=5)
            | st.binary(max_size=5)
            | st.floats(allow_nan=False),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(st.text(max_size=12), inner, max_size=4)
            ),
            max_leaves=12,
        ),
        st.integers(0, 13),
    )
    def test_well_formed_msgpack_of_the_wrong_shape(self, body: Any, msg_type: int) -> None:
        data = bytes((msg_type,)) + msgpack.packb(body, use_bin_type=True)
        self._only_wire_errors(decode_message, data)
        self._only_wire_errors(lambda d: StreamDecoder(None).feed(d), data)
        self._only_wire_errors(decode_tags, b"\xff" + data[1:])
