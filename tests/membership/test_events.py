"""serf's user events: the wire format, and the clock and ring every member keeps."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from imgproxy.membership.events import (
    EVENTS_PER_TIME,
    SERF_USER_EVENT_TYPE,
    EventLog,
    UserEvent,
    decode_recent,
    decode_user_event,
    encode_recent,
    encode_user_event,
)
from imgproxy.membership.tags import SerfState, decode_serf_state, encode_serf_state
from imgproxy.membership.wire import WireError, pack_value, unpack_value

EVENT = UserEvent(ltime=7, name="imgproxy-purge", payload=b"ab" * 32)


class UserEventWireTests(SynchronousTestCase):
    def test_a_user_event_is_serfs_message_type_3_with_its_field_names(self) -> None:
        data = encode_user_event(EVENT)
        self.assertEqual(data[0], SERF_USER_EVENT_TYPE)
        fields, _ = unpack_value(data, 1)
        self.assertEqual(
            {key: value for key, value in fields},
            {b"CC": False, b"LTime": 7, b"Name": b"imgproxy-purge", b"Payload": b"ab" * 32},
        )
        self.assertEqual(decode_user_event(data), EVENT)

    def test_what_serf_may_leave_out_or_add_is_read(self) -> None:
        # A nil payload (serf event with no payload), CC true, an unknown field.
        data = bytes([3]) + bytes(pack_value(
            {"CC": True, "LTime": 2, "Name": "deploy", "Payload": None, "New": 1}
        ))
        self.assertEqual(decode_user_event(data), UserEvent(2, "deploy", b""))

    def test_malformed_events_are_wire_errors(self) -> None:
        bad = [
            b"",
            bytes([4]) + bytes(pack_value({"LTime": 1, "Name": "x"})),  # a query
            bytes([3]) + bytes(pack_value([1, 2])),
            bytes([3]) + bytes(pack_value({"LTime": -1, "Name": "x"})),
            bytes([3]) + bytes(pack_value({"LTime": 1, "Name": 5})),
            bytes([3]) + bytes(pack_value({"LTime": 1, "Name": b"\xff\xfe"})),
            bytes([3]) + bytes(pack_value({"LTime": 1, "Name": "x", "Payload": 3})),
            bytes([3]) + b"\x84\xa5LTime",
        ]
        for data in bad:
            with self.assertRaises(WireError, msg=data.hex()):
                decode_user_event(data)


class RecentEventsWireTests(SynchronousTestCase):
    def test_events_at_one_time_share_an_entry_and_times_go_in_order(self) -> None:
        events = [UserEvent(9, "a", b"1"), UserEvent(4, "b", b"2"), UserEvent(9, "c", b"3")]
        encoded = encode_recent(events)
        self.assertEqual([entry["LTime"] for entry in encoded], [4, 9])
        self.assertEqual(len(encoded[1]["Events"]), 2)
        self.assertEqual(decode_recent(unpack_value(pack_value(encoded))[0]),
                         (events[1], events[0], events[2]))

    def test_serfs_whole_ring_with_its_empty_slots_is_read(self) -> None:
        ring = [None] * 512
        ring[5] = {"LTime": 517, "Events": [{"Name": "deploy", "Payload": b"v2"}]}
        ring[6] = {"LTime": 6, "Events": None}
        decoded = decode_recent(unpack_value(pack_value(ring))[0])
        self.assertEqual(decoded, (UserEvent(517, "deploy", b"v2"),))

    def test_the_events_travel_in_serfs_push_pull_state(self) -> None:
        state = SerfState(status_ltimes={"a": 1}, event_ltime=12,
                          events=(UserEvent(10, "x", b"p"), UserEvent(11, "y", b"")))
        self.assertEqual(decode_serf_state(encode_serf_state(state)), state)

    def test_malformed_rings_are_wire_errors(self) -> None:
        for value in (5, [5], [{"LTime": "x"}], [{"LTime": 1, "Events": 3}],
                      [{"LTime": 1, "Events": [7]}]):
            with self.assertRaises(WireError, msg=repr(value)):
                decode_recent(unpack_value(pack_value(value))[0])


class EventLogTests(SynchronousTestCase):
    def test_the_clock_starts_at_1_and_each_event_sent_takes_a_time(self) -> None:
        log = EventLog()
        self.assertEqual(log.time, 1)
        first = log.create("a", b"")
        second = log.create("a", b"")
        self.assertEqual((first.ltime, second.ltime, log.time), (1, 2, 3))
        self.assertEqual(log.recent(), [first, second])

    def test_an_event_is_new_once(self) -> None:
        log = EventLog()
        self.assertTrue(log.record(EVENT))
        self.assertFalse(log.record(EVENT))
        # Another event at the same time is a different event.
        self.assertTrue(log.record(UserEvent(EVENT.ltime, EVENT.name, b"other")))
        self.assertEqual(len(log.recent()), 2)

    def test_the_clock_moves_past_every_time_seen(self) -> None:
        log = EventLog()
        log.record(UserEvent(40, "x", b""))
        self.assertEqual(log.time, 41)
        log.witness(10)
        self.assertEqual(log.time, 41)
        self.assertEqual(log.create("y", b"").ltime, 41)

    def test_events_older_than_the_ring_are_refused_and_the_ring_overwrites(self) -> None:
        log = EventLog(size=8)
        self.assertTrue(log.record(UserEvent(3, "old", b"")))
        self.assertTrue(log.record(UserEvent(20, "new", b"")))  # clock 21: 13 and up kept
        self.assertFalse(log.record(UserEvent(12, "late", b"")))
        self.assertTrue(log.record(UserEvent(13, "in time", b"")))
        self.assertTrue(log.record(UserEvent(19, "x", b"")))  # the slot of 3 (19 % 8)
        self.assertEqual([e.name for e in log.recent()], ["in time", "x", "new"])

    def test_a_resumed_clock_skips_what_came_before_it(self) -> None:
        log = EventLog()
        log.resume(20)
        self.assertEqual(log.time, 20)
        self.assertFalse(log.record(UserEvent(19, "handled before the restart", b"")))
        self.assertTrue(log.record(UserEvent(20, "missed while away", b"")))

    def test_a_node_resumed_far_behind_the_ring_knows_it_lost_events_once(self) -> None:
        log = EventLog(size=512)
        self.assertFalse(log.lost_since_resume(5000))  # a fresh node has nothing to lose
        log.resume(100)
        self.assertFalse(log.lost_since_resume(612))  # the ring still reaches back to 100
        self.assertTrue(log.lost_since_resume(613))
        self.assertFalse(log.lost_since_resume(5000))

    def test_events_at_one_time_are_bounded(self) -> None:
        log = EventLog()
        for n in range(EVENTS_PER_TIME):
            self.assertTrue(log.record(UserEvent(5, "flood", b"%d" % n)))
        self.assertFalse(log.record(UserEvent(5, "flood", b"more")))
