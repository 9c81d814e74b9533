"""NodeSite: the batched access log and the in-flight count."""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from imgproxy.web.site import (
    MAX_REQUEST_HEAD,
    REQUEST_SECONDS,
    WORKER_REQUEST_HEAD,
    JsonDocument,
    NodeRoot,
    NodeSite,
    origin_form,
)
from tests.web.wire import exchange


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


class WireExchange(SynchronousTestCase):
    """Feeds raw bytes to a NodeSite's channel and returns the raw response."""

    def exchange(self, data: bytes, root: NodeRoot | None = None, **site_options: Any) -> bytes:
        from twisted.internet import reactor

        reactor_calls = set(reactor.getDelayedCalls())
        response = exchange(root or NodeRoot({}), data, **site_options)
        # The channel's idle timeout went to the injected clock, not to the reactor.
        self.assertEqual(set(reactor.getDelayedCalls()), reactor_calls)
        return response


class ProtocolErrorTests(WireExchange):
    """Errors Twisted would answer in HTML, an empty body or not at all are JSON here."""

    def assertJsonStatus(self, response: bytes, status: int) -> None:
        head, _, body = response.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 %d " % status), head)
        self.assertIn(b'"status": %d' % status, body)

    def test_a_large_declared_body_is_refused_before_it_is_read(self) -> None:
        response = self.exchange(
            b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 300000000\r\n\r\nxxxx"
        )
        self.assertJsonStatus(response, 413)

    def test_a_chunked_body_past_the_cap_is_refused(self) -> None:
        chunk = b"4000\r\n" + b"y" * 0x4000 + b"\r\n"
        response = self.exchange(
            b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 6
        )
        self.assertJsonStatus(response, 413)

    def test_malformed_request_line_is_json_400(self) -> None:
        response = self.exchange(b"GARBAGE\r\n\r\n")
        self.assertJsonStatus(response, 400)
        self.assertRegex(response, rb"\r\ndate: \w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT\r\n")
        self.assertIn(b"\r\nserver: imgproxy\r\n", response)
        self.assertIn(b"\r\ncache-control: no-store\r\n", response)
        self.assertIn(b"\r\nx-content-type-options: nosniff\r\n", response)

    def test_an_overlong_request_line_is_json_414(self) -> None:
        self.assertJsonStatus(self.exchange(b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n"), 414)

    def test_an_overlong_header_or_too_many_headers_are_json_431(self) -> None:
        long_header = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20000 + b"\r\n\r\n"
        self.assertJsonStatus(self.exchange(long_header), 431)
        many = b"".join(b"X-%d: 1\r\n" % n for n in range(600))
        self.assertJsonStatus(self.exchange(b"GET / HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n"), 431)

    def test_a_worker_reads_the_longest_line_a_gateway_can_make_of_a_public_one(self) -> None:
        # A public line just under the limit, its URL all "/" (kept as is in a query),
        # re-encoded by the gateway as "%2F": three times as long, plus signature headers.
        line = b"GET /health?url=" + b"%2F" * (MAX_REQUEST_HEAD - 100) + b" HTTP/1.1\r\n"
        headers = b"Host: x\r\nX-Imgproxy-Signature: " + b"f" * 200 + b"\r\n\r\n"
        root = NodeRoot({b"health": JsonDocument(lambda: {"ok": True})})
        response = self.exchange(line + headers, root, max_request_head=WORKER_REQUEST_HEAD)
        self.assertTrue(response.startswith(b"HTTP/1.1 200 "), response[:200])

    def test_star_is_json_405_except_for_options(self) -> None:
        get = self.exchange(b"GET * HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertJsonStatus(get, 405)
        head = self.exchange(b"HEAD * HTTP/1.1\r\nHost: x\r\n\r\n")
        length = b"Content-Length: %d\r\n" % len(get.partition(b"\r\n\r\n")[2])
        self.assertIn(length, head)
        self.assertTrue(head.endswith(b"\r\n\r\n"), head)
        options = self.exchange(b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(options.startswith(b"HTTP/1.1 200"), options)


class LineEndingTests(WireExchange):
    """Lines may end in CRLF or in a bare LF (RFC 9112 2.2), as nginx reads them."""

    def exchange(self, data: bytes, root: NodeRoot | None = None, **site_options: Any) -> bytes:
        health = NodeRoot({b"health": JsonDocument(lambda: {"ok": True})})
        return super().exchange(data, root or health, **site_options)

    def assertAnswers(self, response: bytes, *statuses: int) -> None:
        """The responses on the connection had these statuses, in this order."""
        found = [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", response)]
        self.assertEqual(found, list(statuses), response)

    def test_a_request_in_bare_lf_is_answered_not_left_waiting(self) -> None:
        response = self.exchange(b"GET /health HTTP/1.1\nHost: x\n\n")
        self.assertTrue(response.startswith(b"HTTP/1.1 200 "), response[:80])

    def test_pipelined_requests_in_any_line_ends_are_each_answered(self) -> None:
        cases = {
            "mixed line ends": (
                b"GET /health HTTP/1.1\r\nHost: x\n\r\n"
                b"GET /nope HTTP/1.1\nHost: x\r\n\n",
                (200, 404),
            ),
            # (It waited out the idle timeout: Twisted's chunk decoder looks for CRLF only.)
            "a chunked body framed with bare LF": (
                b"POST /health HTTP/1.1\nHost: x\nTransfer-Encoding: chunked\n\n"
                b"3\nabc\n0\n\n"
                b"GET /health HTTP/1.1\nHost: x\n\n",
                (405, 200),
            ),
        }
        for name, (data, statuses) in cases.items():
            with self.subTest(name):
                self.assertAnswers(self.exchange(data), *statuses)

    def test_a_chunked_body_with_bad_framing_is_400(self) -> None:
        response = self.exchange(
            b"POST /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"zz\r\nabc\r\n0\r\n\r\n"
        )
        self.assertTrue(response.startswith(b"HTTP/1.1 400 "), response[:60])

    def test_the_length_limits_hold_for_bare_lf_lines_too(self) -> None:
        long_line = self.exchange(b"GET /" + b"a" * 20000 + b" HTTP/1.1\nHost: x\n\n")
        self.assertTrue(long_line.startswith(b"HTTP/1.1 414 "), long_line[:80])
        long_header = self.exchange(b"GET / HTTP/1.1\nX-Big: " + b"b" * 20000 + b"\n\n")
        self.assertTrue(long_header.startswith(b"HTTP/1.1 431 "), long_header[:80])


class ServerHeaderTests(WireExchange):
    def test_responses_name_the_product_but_not_the_framework_or_its_version(self) -> None:
        root = NodeRoot({b"health": JsonDocument(lambda: {"ok": True})})
        for target in (b"/health", b"/nothing"):
            response = self.exchange(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n", root)
            head = response.partition(b"\r\n\r\n")[0].lower()
            self.assertIn(b"\r\nserver: imgproxy\r\n", head, target)
            self.assertNotIn(b"twisted", head, target)


class RoutingTests(WireExchange):
    """Exactly the contract's paths: no prefix matches, no empty segments, any target form."""

    def setUp(self) -> None:
        self.root = NodeRoot(
            {b"health": JsonDocument(lambda: {"ok": True})},
            index=JsonDocument(lambda: {"index": True}),
        )

    def status_of(self, target: bytes) -> int:
        response = self.exchange(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n", self.root)
        return int(response.split(b" ", 2)[1])

    def test_named_paths_and_the_index(self) -> None:
        self.assertEqual(self.status_of(b"/health"), 200)
        self.assertEqual(self.status_of(b"/"), 200)
        self.assertEqual(self.status_of(b"/nothing"), 404)

    def test_a_leaf_is_not_a_prefix(self) -> None:
        for target in (b"/health/x", b"/health/", b"/health/../health/x"):
            self.assertEqual(self.status_of(target), 404, target)

    def test_an_empty_first_segment_is_not_the_index(self) -> None:
        self.assertEqual(self.status_of(b"//health"), 404)
        self.assertEqual(self.status_of(b"//"), 404)

    def test_absolute_form_targets_are_served_like_paths(self) -> None:
        self.assertEqual(self.status_of(b"http://x/health"), 200)
        self.assertEqual(self.status_of(b"HTTPS://x:8080/health?a=1"), 200)
        self.assertEqual(self.status_of(b"http://x"), 200)  # the index
        self.assertEqual(self.status_of(b"ftp://x/health"), 404)

    def test_origin_form(self) -> None:
        cases = {
            b"http://h/image?url=a": b"/image?url=a",
            b"http://h:1?x": b"/?x",
            b"http://h": b"/",
            b"http://user@h/p": b"/p",
            b"garbage": b"garbage",
            b"ftp://h/p": b"ftp://h/p",
        }
        for target, expected in cases.items():
            self.assertEqual(origin_form(target), expected, target)


class HeadTests(WireExchange):
    def test_head_gets_the_length_of_get_no_body_and_no_log_line(self) -> None:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        root = NodeRoot({b"health": JsonDocument(lambda: {"ok": True})})
        for path in (b"/health", b"/nowhere"):
            get = self.exchange(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n", root)
            head = self.exchange(b"HEAD " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n", root)
            get_head, _, body = get.partition(b"\r\n\r\n")
            self.assertTrue(body)
            self.assertTrue(head.endswith(b"\r\n\r\n"), head)
            self.assertIn(b"Content-Length: %d\r\n" % len(body), head)
            self.assertEqual(head.split(b"\r\n")[0], get_head.split(b"\r\n")[0])
        warnings = [e for e in events if "HEAD request" in str(e.get("log_format", ""))]
        self.assertEqual(warnings, [])


class JsonDocumentTests(WireExchange):
    def test_the_status_follows_the_document(self) -> None:
        state = {"state": "alive"}
        health = JsonDocument(
            lambda: dict(state), status_of=lambda doc: 503 if doc["state"] == "left" else 200
        )
        request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        self.assertTrue(self.exchange(request, NodeRoot({b"health": health})).startswith(
            b"HTTP/1.1 200 "))
        state["state"] = "left"
        leaving = self.exchange(request, NodeRoot({b"health": health}))
        self.assertTrue(leaving.startswith(b"HTTP/1.1 503 "), leaving[:60])
        self.assertTrue(leaving.endswith(b'{"state": "left"}'), leaving[-60:])


class StatusPageHeaderTests(WireExchange):
    def test_the_status_page_may_not_be_framed_or_load_anything_foreign(self) -> None:
        from imgproxy.web.status import StatusPage

        status = {
            "node": {"name": "n1", "role": "standalone", "address": "127.0.0.1"},
            "members": [],
            "key_shares": {"n1": 1.0},
            "cache": {},
        }
        response = self.exchange(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                                 NodeRoot({}, index=StatusPage(lambda: status)))
        head = response.partition(b"\r\n\r\n")[0].lower()
        self.assertTrue(head.startswith(b"http/1.1 200"), head)
        self.assertIn(b"frame-ancestors 'none'", head)
        self.assertIn(b"default-src 'none'", head)


class RequestDeadlineTests(SynchronousTestCase):
    """A request has REQUEST_SECONDS from its first byte, however it trickles."""

    def setUp(self) -> None:
        from twisted.internet.testing import StringTransport

        self.clock = Clock()
        site = NodeSite(NodeRoot({b"health": JsonDocument(lambda: {"ok": True})}), self.clock)
        self.channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)
        self.addCleanup(self.channel.connectionLost, None)

    def test_a_head_sent_a_byte_a_second_is_cut_at_the_deadline(self) -> None:
        head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
        for second, byte in enumerate(head[: int(REQUEST_SECONDS)]):
            self.channel.dataReceived(bytes([byte]))
            self.assertEqual(self.transport.value(), b"", second)
            self.clock.advance(1)
        self.channel.dataReceived(b"a")
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 408 "))
        self.channel.dataReceived(b"more\r\n\r\n")
        self.assertEqual(self.transport.value().count(b"HTTP/1.1"), 1)
        self.assertTrue(self.transport.disconnecting)
        self.assertIn(b'"status": 408', self.transport.value())

    def test_a_body_sent_a_byte_a_second_is_cut_at_the_deadline_too(self) -> None:
        self.channel.dataReceived(
            b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
        )
        for second in range(int(REQUEST_SECONDS)):
            self.clock.advance(1)
            if second < REQUEST_SECONDS - 1:
                self.channel.dataReceived(b"b")
                self.assertEqual(self.transport.value(), b"", second)
        self.channel.dataReceived(b"b")
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 408 "))

    def test_a_request_that_stops_arriving_gets_408_at_the_idle_timeout(self) -> None:
        for unfinished in (
            b"GET /he",
            b"GET /health HTTP/1.1\r\nHost: x\r\n",
            b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc",
            b"\r\nGET /health HTTP/1.1\r\nHost: x\r\n",  # after a stray empty line
        ):
            self.setUp()
            self.channel.dataReceived(unfinished)
            self.clock.advance(self.channel.timeOut - 1)
            self.assertEqual(self.transport.value(), b"", unfinished)
            self.clock.advance(1)
            self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 408 "), unfinished)
            self.assertTrue(self.transport.disconnecting, unfinished)

    def test_a_request_pipelined_behind_another_and_left_unfinished_gets_408(self) -> None:
        self.channel.dataReceived(
            b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n"
        )
        self.assertEqual(self.transport.value().count(b"HTTP/1.1 200 "), 1)
        self.transport.clear()
        self.clock.advance(self.channel.timeOut)
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 408 "), self.transport.value())

    def test_a_prompt_request_and_an_idle_keep_alive_are_left_alone(self) -> None:
        self.channel.dataReceived(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 200 "))
        self.transport.clear()
        self.channel.dataReceived(b"\r\n")  # a stray empty line starts no request
        self.clock.advance(REQUEST_SECONDS * 1.5)  # idle between requests: no head yet
        self.assertEqual(self.transport.value(), b"")
        self.channel.dataReceived(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 200 "))
        self.transport.clear()
        self.clock.advance(self.channel.timeOut)  # an idle keep-alive just closes
        self.assertEqual(self.transport.value(), b"")
        self.assertTrue(self.transport.disconnecting)


class TransferEncodingTests(WireExchange):
    def test_only_chunked_is_a_transfer_coding_a_request_may_use(self) -> None:
        for coding in (b"identity", b"gzip", b"chunked, identity", b"x"):
            response = self.exchange(
                b"POST /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: " + coding
                + b"\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            self.assertTrue(response.startswith(b"HTTP/1.1 400 "), (coding, response[:60]))
            self.assertEqual(response.count(b"HTTP/1.1"), 1, coding)
