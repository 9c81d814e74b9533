"""Gossiped purges: applied to the cache once, and not again after a restart."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

from twisted.trial.unittest import SynchronousTestCase

from imgproxy.cluster import PURGE_EVENT, purge_event_payload, purged_source_key
from imgproxy.errors import ProxyError
from imgproxy.membership.events import EventLog, UserEvent
from imgproxy.worker.purges import EVENT_CLOCK_FILE, GossipedPurges
from tests.worker.test_cache import hangs_fail_after

URL = "http://origin.test/a.jpg"
KEY = hashlib.sha256(URL.encode()).hexdigest()


class PurgeEventPayloadTests(SynchronousTestCase):
    def test_gateways_send_the_source_key(self) -> None:
        self.assertEqual(purge_event_payload(URL), KEY.encode())
        self.assertEqual(purged_source_key(purge_event_payload(URL)), KEY)

    def test_an_operator_may_send_the_url(self) -> None:
        self.assertEqual(purged_source_key(URL.encode()), KEY)
        self.assertEqual(purged_source_key(b"  " + URL.encode() + b"\n"), KEY)

    def test_any_spelling_of_the_url_or_key_names_the_source(self) -> None:
        self.assertEqual(purged_source_key(KEY.upper().encode()), KEY)
        self.assertEqual(purged_source_key(b"HTTP://Origin.test/./a.jpg#x"), KEY)

    def test_anything_else_names_no_source(self) -> None:
        for payload in (b"", b"a.jpg", KEY[:-1].encode(),
                        b"ftp://origin.test/a.jpg", b"http://", b"\xff\xfe"):
            self.assertIsNone(purged_source_key(payload), payload)


class GossipedPurgesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cache_dir = self.mktemp()
        os.makedirs(self.cache_dir)
        self.purged: list[str] = []
        self.invalidated: list[bool] = []

    def purges(self, purge: Callable[[str], object], events: EventLog) -> GossipedPurges:
        return GossipedPurges(
            purge, events, self.cache_dir, invalidate_all=lambda: self.invalidated.append(True)
        )

    def node(self) -> tuple[GossipedPurges, EventLog]:
        """A node's purge listener as a (re)start builds it."""
        events = EventLog()
        purges = self.purges(self.purged.append, events)
        purges.resume()
        return purges, events

    def deliver(self, purges: GossipedPurges, events: EventLog, event: UserEvent) -> None:
        """What the membership service does with an event: record, then tell listeners."""
        if events.record(event):
            purges(event)

    def test_a_purge_event_purges_its_source_and_other_events_are_ignored(self) -> None:
        purges, events = self.node()
        self.deliver(purges, events, UserEvent(3, "deploy", KEY.encode()))
        self.deliver(purges, events, UserEvent(4, PURGE_EVENT, b"not a source"))
        self.deliver(purges, events, UserEvent(5, PURGE_EVENT, KEY.encode()))
        self.assertEqual(self.purged, [KEY])

    def test_after_a_restart_only_the_purges_missed_meanwhile_are_applied(self) -> None:
        old = UserEvent(5, PURGE_EVENT, KEY.encode())
        purges, events = self.node()
        self.deliver(purges, events, old)
        self.purged.clear()
        # Back after a restart: a push-pull brings the recent events, old and new.
        missed = UserEvent(9, PURGE_EVENT, purge_event_payload("http://origin.test/b.jpg"))
        purges, events = self.node()
        for event in (old, missed):
            self.deliver(purges, events, event)
        self.assertEqual(self.purged, [purged_source_key(missed.payload)])

    def test_other_events_move_the_saved_clock_too(self) -> None:
        # Else a node that saw 600 deploy events and no purge would, after a restart,
        # look as if it had missed them all.
        purges, events = self.node()
        self.deliver(purges, events, UserEvent(700, "deploy", b"v2"))
        purges, events = self.node()
        self.assertEqual(events.time, 701)
        self.assertFalse(events.lost_since_resume(1000))

    def test_after_a_failed_purge_the_clock_stays_before_it(self) -> None:
        failing = [True]

        def purge(key: str) -> None:
            if failing[0]:
                raise ProxyError(503, "the purge is incomplete")
            self.purged.append(key)

        events = EventLog()
        purges = self.purges(purge, events)
        self.deliver(purges, events, UserEvent(5, PURGE_EVENT, KEY.encode()))
        failing[0] = False
        later = UserEvent(9, PURGE_EVENT, purge_event_payload("http://origin.test/b.jpg"))
        self.deliver(purges, events, later)
        # After a restart both come again: the failed one, and what followed it.
        purges, events = self.node()
        self.purged.clear()
        for event in (UserEvent(5, PURGE_EVENT, KEY.encode()), later):
            self.deliver(purges, events, event)
        self.assertEqual(len(self.purged), 2)

    def test_an_unreadable_clock_applies_every_recent_purge_again(self) -> None:
        with open(os.path.join(self.cache_dir, EVENT_CLOCK_FILE), "wb") as broken:
            broken.write(b"garbage")
        purges, events = self.node()
        self.deliver(purges, events, UserEvent(5, PURGE_EVENT, KEY.encode()))
        self.assertEqual(self.purged, [KEY])

    def test_a_purge_left_incomplete_is_applied_again_after_a_restart(self) -> None:
        def read_only_disk(key: str) -> None:
            raise ProxyError(503, "the purge is incomplete")

        events = EventLog()
        purges = self.purges(read_only_disk, events)
        purges.resume()
        self.deliver(purges, events, UserEvent(5, PURGE_EVENT, KEY.encode()))
        purges, events = self.node()
        self.deliver(purges, events, UserEvent(5, PURGE_EVENT, KEY.encode()))
        self.assertEqual(self.purged, [KEY])

    def test_purges_lost_for_good_make_the_whole_cache_stale(self) -> None:
        purges, _ = self.node()
        self.assertEqual(self.invalidated, [])
        purges.events_lost()
        self.assertEqual(self.invalidated, [True])

    def test_a_fifo_in_place_of_the_clock_is_not_read(self) -> None:
        os.mkfifo(os.path.join(self.cache_dir, EVENT_CLOCK_FILE))
        with hangs_fail_after(5):
            purges, events = self.node()
        self.deliver(purges, events, UserEvent(5, PURGE_EVENT, KEY.encode()))
        self.assertEqual(self.purged, [KEY])

    def test_a_cache_directory_that_cannot_be_written_costs_a_warning_only(self) -> None:
        self.cache_dir = os.path.join(self.cache_dir, "x", "y")
        purges = self.purges(self.purged.append, EventLog())
        purges(UserEvent(5, PURGE_EVENT, KEY.encode()))
        self.assertEqual(self.purged, [KEY])
