"""NodeSite: the batched access log and the in-flight count."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from imgproxy.web.site import NodeSite


class FinishedRequest:
    def __init__(self, uri: bytes, code: int = 200, length: int = 10) -> None:
        self.method = b"GET"
        self.uri = uri
        self.code = code
        self.sentLength = length

    def getClientAddress(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.9", 5555)


class AccessLogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.site = NodeSite(Resource(), self.clock, flush_interval=1.0, batch_size=3)
        self.events: list[dict] = []
        observer = self.events.append
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def access_events(self) -> list[dict]:
        return [e for e in self.events if "access_lines" in e]

    def test_lines_are_batched_until_the_interval(self) -> None:
        self.site.log(FinishedRequest(b"/image?url=a"))
        self.site.log(FinishedRequest(b"/health", 200, 5))
        self.assertEqual(self.access_events(), [])
        self.clock.advance(1.0)
        [event] = self.access_events()
        self.assertEqual([r["uri"] for r in event["requests"]], ["/image?url=a", "/health"])
        self.assertIn('127.0.0.9 "GET /health" 200 5', event["access_lines"])

    def test_a_full_batch_is_logged_at_once(self) -> None:
        for i in range(3):
            self.site.log(FinishedRequest(b"/x%d" % i, 404))
        [event] = self.access_events()
        self.assertEqual([r["status"] for r in event["requests"]], [404, 404, 404])
        self.clock.advance(5)
        self.assertEqual(len(self.access_events()), 1)

    def test_stopping_flushes_what_is_pending(self) -> None:
        self.site.log(FinishedRequest(b"/last"))
        self.site.stopFactory()
        self.assertEqual(self.access_events()[0]["requests"][0]["uri"], "/last")
