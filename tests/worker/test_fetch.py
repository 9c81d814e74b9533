"""SourceFetcher: the SSRF guard, redirects, byte limit, timeouts and origin statuses.

Live tests run the real reactor against origins on 127.0.0.0/8 (and ::1 when
it can be bound); timeout tests run the same origin and fetcher on a
``MemoryReactorClock``, connected by ``iosim``, so time only moves when a test
advances it.
"""

from __future__ import annotations

import gzip
import zlib
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThreadPool
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.test.iosim import ConnectionCompleter, IOPump
from twisted.trial.unittest import SynchronousTestCase, TestCase

from imgproxy.errors import ProxyError
from imgproxy.quietpool import MAX_INTERIM_RESPONSES
from imgproxy.worker.addresses import AddressPolicy
from imgproxy.worker.fetch import FetchedSource, FetchLimits, SourceFetcher, request_url
from tests.origins import (
    Origin,
    StaticResolver,
    make_tls_authority,
    start_origin,
    unused_port,
)

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 100
LOOPBACK = AddressPolicy(allowed_networks=("127.0.0.0/8",))
ONLY_127_0_0_5 = AddressPolicy(allowed_networks=("127.0.0.5/32",))


def about(error: ProxyError) -> tuple[int, str]:
    """What a test compares: exceptions themselves compare by identity."""
    return (error.status, error.reason)


def live_reactor() -> Any:
    # Tests (not the package) may use the global reactor: trial runs it.
    from twisted.internet import reactor

    return reactor


class LiveFetchTestCase(TestCase):
    """Shared set-up: an origin on 127.0.0.1 and helpers to make fetchers."""

    def setUp(self) -> Deferred[None]:
        self.reactor = live_reactor()
        self.resolver = StaticResolver({})
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        self.origin = await self.start_origin("127.0.0.1")

    async def start_origin(self, interface: str, **kwargs: Any) -> Origin:
        origin = await start_origin(self.reactor, interface, **kwargs)
        self.addCleanup(origin.stop)
        return origin

    def fetcher(
        self,
        policy: AddressPolicy = LOOPBACK,
        limits: FetchLimits | None = None,
        **kwargs: Any,
    ) -> SourceFetcher:
        fetcher = SourceFetcher(
            self.reactor,
            policy,
            limits if limits is not None else FetchLimits(max_bytes=1 << 20, timeout=5.0),
            resolver=self.resolver,
            **kwargs,
        )
        # One reactor turn first: a response refused in the middle of a read
        # (413) may still finish that read and go back to the pool after the
        # test's own code is done.
        self.addCleanup(lambda: deferLater(self.reactor, 0, fetcher.close))
        return fetcher

    async def fetch_error(self, fetcher: SourceFetcher, url: str) -> ProxyError:
        try:
            result = await fetcher.fetch(url)
        except ProxyError as e:
            return e
        self.fail(f"fetching {url} succeeded: {result!r}")


class FetchBasicsTests(LiveFetchTestCase):
    async def test_200_gives_the_body_and_content_type(self) -> None:
        self.origin.add("/cat.png", PNG, "image/png")
        result = await self.fetcher().fetch(self.origin.url("/cat.png"))
        self.assertEqual(
            result,
            FetchedSource(url=self.origin.url("/cat.png"), body=PNG, content_type="image/png"),
        )

    async def test_chunked_body_without_length(self) -> None:
        self.origin.add("/chunked", PNG * 50, "image/png", chunked=True)
        result = await self.fetcher().fetch(self.origin.url("/chunked"))
        self.assertEqual(result.body, PNG * 50)

    async def test_request_headers(self) -> None:
        self.resolver = StaticResolver({"loopback.test": ["127.0.0.1"]})
        self.origin.add("/a", PNG)
        url = f"http://loopback.test:{self.origin.port}/a"
        await self.fetcher(user_agent="imgproxy-test/1").fetch(url)
        [seen] = self.origin.requests
        self.assertEqual(seen.method, "GET")
        self.assertEqual(seen.header("user-agent"), "imgproxy-test/1")
        # The name, not the address it was connected to, is the Host.
        self.assertEqual(seen.header("host"), f"loopback.test:{self.origin.port}")
        # A compressed body could inflate past the byte limit in one read.
        self.assertEqual(seen.header("accept-encoding"), "identity")
        self.assertIsNone(seen.header("cookie"))

    async def test_a_body_compressed_though_asked_for_identity_is_decompressed(self) -> None:
        # Servers that gzip every response (or serve a.png.gz as a.png) exist.
        fetcher = self.fetcher()
        raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        bodies = {
            "gzip": gzip.compress(PNG),
            "x-gzip": gzip.compress(PNG),
            "deflate": zlib.compress(PNG),
            "Deflate": raw_deflate.compress(PNG) + raw_deflate.flush(),  # what some send
            "identity, gzip": gzip.compress(PNG),
        }
        for coding, body in bodies.items():
            with self.subTest(coding=coding):
                path = "/" + coding.replace(" ", "").replace(",", "-")
                self.origin.add(path, body, "image/png", headers={"Content-Encoding": coding})
                self.assertEqual((await fetcher.fetch(self.origin.url(path))).body, PNG)

    async def test_decompressing_runs_off_the_reactor_thread_and_nothing_else_does(
        self,
    ) -> None:
        # Inflating max_bytes takes tens of milliseconds: every other request would wait.
        ran: list[str] = []
        threads = ThreadPool(1, 1)
        threads.start()
        self.addCleanup(threads.stop)

        def run_blocking(function: Any, *args: Any) -> Deferred[Any]:
            ran.append(function.__name__)
            return deferToThreadPool(self.reactor, threads, function, *args)

        fetcher = self.fetcher(run_blocking=run_blocking)
        self.origin.add("/gz", gzip.compress(PNG), "image/png",
                        headers={"Content-Encoding": "gzip"})
        self.origin.add("/plain", PNG, "image/png")
        self.assertEqual((await fetcher.fetch(self.origin.url("/plain"))).body, PNG)
        self.assertEqual(ran, [])
        self.assertEqual((await fetcher.fetch(self.origin.url("/gz"))).body, PNG)
        self.assertEqual(ran, ["_inflated"])

    async def test_a_body_labelled_compressed_that_is_not_is_passed_on_as_it_came(self) -> None:
        self.origin.add("/z", PNG, "image/png", headers={"Content-Encoding": "gzip"})
        self.assertEqual((await self.fetcher().fetch(self.origin.url("/z"))).body, PNG)

    async def test_what_cannot_be_decompressed_within_the_limit_is_refused(self) -> None:
        fetcher = self.fetcher(limits=FetchLimits(max_bytes=1 << 16, timeout=5.0))
        self.origin.add("/bomb", gzip.compress(b"\0" * (1 << 20)), "image/png",
                        headers={"Content-Encoding": "gzip"})
        self.origin.add("/cut", gzip.compress(PNG * 40)[:-30], "image/png",
                        headers={"Content-Encoding": "gzip"})
        self.origin.add("/br", PNG, "image/png", headers={"Content-Encoding": "br"})
        self.assertEqual((await self.fetch_error(fetcher, self.origin.url("/bomb"))).status, 413)
        cut = await self.fetch_error(fetcher, self.origin.url("/cut"))
        self.assertEqual(about(cut), (502, "the origin sent a truncated gzip body"))
        br = await self.fetch_error(fetcher, self.origin.url("/br"))
        self.assertEqual(br.status, 502)
        self.assertIn("(br)", br.reason)

    async def test_a_corrupt_compressed_body_is_502_and_gzip_members_are_joined(self) -> None:
        fetcher = self.fetcher()
        zipped = bytearray(gzip.compress(PNG))
        zipped[-8] ^= 0xFF  # the CRC-32 of the gzip trailer
        wrapped = bytearray(zlib.compress(PNG))
        wrapped[-1] ^= 0xFF  # the Adler-32 of the zlib trailer
        for path, body, coding in (("/crc", zipped, "gzip"), ("/adler", wrapped, "deflate")):
            self.origin.add(path, bytes(body), "image/png", headers={"Content-Encoding": coding})
            error = await self.fetch_error(fetcher, self.origin.url(path))
            self.assertEqual(about(error), (502, f"the origin sent a corrupt {coding} body"))
        # Two gzip members one after the other (``cat a.gz b.gz``) are one body.
        members = gzip.compress(PNG[:50]) + gzip.compress(PNG[50:])
        self.origin.add("/members", members, "image/png", headers={"Content-Encoding": "gzip"})
        self.assertEqual((await fetcher.fetch(self.origin.url("/members"))).body, PNG)

    async def test_a_206_of_the_whole_image_is_the_image_and_any_other_is_502(self) -> None:
        fetcher = self.fetcher()
        whole = {"Content-Range": f"bytes 0-{len(PNG) - 1}/{len(PNG)}"}
        self.origin.add("/whole", PNG, "image/png", status=206, headers=whole)
        self.assertEqual((await fetcher.fetch(self.origin.url("/whole"))).body, PNG)
        part = {"Content-Range": f"bytes 0-9/{len(PNG)}"}
        self.origin.add("/part", PNG[:10], "image/png", status=206, headers=part)
        self.assertEqual((await self.fetch_error(fetcher, self.origin.url("/part"))).status, 502)
        self.origin.add("/bare", PNG, "image/png", status=206)
        self.assertEqual((await self.fetch_error(fetcher, self.origin.url("/bare"))).status, 502)

    async def test_fragment_and_user_info_are_not_sent(self) -> None:
        self.origin.add("/a", PNG)
        url = f"http://someone:secret@127.0.0.1:{self.origin.port}/a#frag"
        result = await self.fetcher().fetch(url)
        self.assertEqual(result.body, PNG)
        [seen] = self.origin.requests
        self.assertIsNone(seen.header("authorization"))
        self.assertEqual(seen.header("host"), f"127.0.0.1:{self.origin.port}")

    async def test_a_fetch_logs_nothing_about_its_connections(self) -> None:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.origin.add("/a", PNG)
        await self.fetcher().fetch(self.origin.url("/a"))
        self.assertEqual([formatEvent(e) for e in events if "factory" in formatEvent(e)], [])

    async def test_connection_is_reused(self) -> None:
        self.origin.add("/a", PNG)
        fetcher = self.fetcher()
        await fetcher.fetch(self.origin.url("/a"))
        await fetcher.fetch(self.origin.url("/a"))
        self.assertEqual(self.origin.hits["/a"], 2)
        self.assertEqual(self.origin.connections, 1)


class _InterimThenAnswer(Protocol):
    """A raw origin: ``interim`` "100 Continue" responses, then its 200 (if it gets there)."""

    def __init__(self, interim: int) -> None:
        self.interim = interim

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" not in data:
            return
        self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n" * self.interim)
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n%s"
            % (len(PNG), PNG)
        )


class InterimResponseTests(LiveFetchTestCase):
    """Interim (1xx) responses nobody asked for: a few are skipped, endless ones cut off."""

    async def raw_origin(self, interim: int) -> str:
        factory = Factory.forProtocol(lambda: _InterimThenAnswer(interim))
        port = self.reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}/a.png"

    def interim_lines(self) -> list[dict]:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    async def test_a_few_are_skipped_with_one_log_line(self) -> None:
        events = self.interim_lines()
        url = await self.raw_origin(MAX_INTERIM_RESPONSES)
        self.assertEqual((await self.fetcher().fetch(url)).body, PNG)
        logged = [e for e in events if e.get("code") == 100]
        self.assertEqual(len(logged), 1)

    async def test_a_flood_of_them_is_cut_off_with_one_warning(self) -> None:
        events = self.interim_lines()
        url = await self.raw_origin(5000)
        error = await self.fetch_error(self.fetcher(), url)
        self.assertEqual(error.status, 502)
        logged = [formatEvent(e) for e in events if "interim" in formatEvent(e)
                  or e.get("code") == 100]
        self.assertEqual(len(logged), 2, logged)


class OriginStatusTests(LiveFetchTestCase):
    async def test_404_and_410_are_404(self) -> None:
        self.origin.status("/gone", 410)
        fetcher = self.fetcher()
        error = await self.fetch_error(fetcher, self.origin.url("/missing"))
        self.assertEqual(about(error), (404, "the origin answered 404"))
        error = await self.fetch_error(fetcher, self.origin.url("/gone"))
        self.assertEqual(about(error), (404, "the origin answered 410"))

    async def test_other_errors_are_502(self) -> None:
        fetcher = self.fetcher()
        for code in (500, 503, 403, 401, 400, 204, 206, 300):
            with self.subTest(code=code):
                self.origin.status(f"/s{code}", code)
                error = await self.fetch_error(fetcher, self.origin.url(f"/s{code}"))
                self.assertEqual(about(error), (502, f"the origin answered {code}"))

    async def test_304_and_redirect_without_location_are_502(self) -> None:
        self.origin.status("/304", 304)
        self.origin.status("/302", 302)
        fetcher = self.fetcher()
        error = await self.fetch_error(fetcher, self.origin.url("/304"))
        self.assertEqual(about(error), (502, "the origin answered 304"))
        error = await self.fetch_error(fetcher, self.origin.url("/302"))
        self.assertEqual(about(error), (502, "the origin answered 302 without a Location"))

    async def test_refused_port_is_502(self) -> None:
        url = f"http://127.0.0.1:{unused_port()}/a"
        error = await self.fetch_error(self.fetcher(), url)
        self.assertEqual(about(error), (502, "the origin refused the connection"))

    async def test_a_name_that_does_not_resolve_is_502(self) -> None:
        error = await self.fetch_error(self.fetcher(), "http://nowhere.test/a")
        self.assertEqual(
            about(error), (502, "the origin's host name 'nowhere.test' does not resolve")
        )

    async def test_hang_up_without_answer_is_502(self) -> None:
        self.origin.reset("/reset")
        error = await self.fetch_error(self.fetcher(), self.origin.url("/reset"))
        self.assertEqual(error.status, 502)

    async def test_body_cut_short_is_502(self) -> None:
        self.origin.truncate("/short", b"x" * 10, declared_length=1000)
        error = await self.fetch_error(self.fetcher(), self.origin.url("/short"))
        self.assertEqual(error.status, 502)
        self.assertIn("closed the connection", error.reason)

    async def test_a_bad_initial_url_is_400(self) -> None:
        error = await self.fetch_error(self.fetcher(), "ftp://127.0.0.1/a")
        self.assertEqual(error.status, 400)


class RedirectTests(LiveFetchTestCase):
    async def test_a_chain_of_five_redirects_is_followed(self) -> None:
        self.origin.add("/final", PNG, "image/png")
        first = self.origin.redirect_chain("/hop", 5, "/final")
        result = await self.fetcher().fetch(self.origin.url(first))
        self.assertEqual(result.body, PNG)
        self.assertEqual(result.url, self.origin.url("/final"))
        self.assertEqual([self.origin.hits[f"/hop{i}"] for i in range(5)], [1] * 5)

    async def test_the_sixth_redirect_is_502(self) -> None:
        self.origin.add("/final", PNG)
        first = self.origin.redirect_chain("/hop", 6, "/final")
        error = await self.fetch_error(self.fetcher(), self.origin.url(first))
        self.assertEqual(about(error), (502, "too many redirects (more than 5)"))
        self.assertEqual(self.origin.hits["/final"], 0)

    async def test_max_redirects_is_configurable(self) -> None:
        self.origin.add("/final", PNG)
        first = self.origin.redirect_chain("/hop", 2, "/final")
        fetcher = self.fetcher(limits=FetchLimits(timeout=5.0, max_redirects=1))
        error = await self.fetch_error(fetcher, self.origin.url(first))
        self.assertEqual(about(error), (502, "too many redirects (more than 1)"))

    async def test_a_redirect_loop_is_502(self) -> None:
        self.origin.redirect("/a", "/b")
        self.origin.redirect("/b", self.origin.url("/a"))
        error = await self.fetch_error(self.fetcher(), self.origin.url("/a"))
        self.assertEqual(about(error), (502, "the origin redirects in a loop"))
        self.assertEqual((self.origin.hits["/a"], self.origin.hits["/b"]), (1, 1))

    async def test_every_redirect_status_is_followed(self) -> None:
        self.origin.add("/final", PNG)
        fetcher = self.fetcher()
        for code in (301, 302, 303, 307, 308):
            with self.subTest(code=code):
                self.origin.redirect(f"/r{code}", "final", status=code)
                result = await fetcher.fetch(self.origin.url(f"/r{code}"))
                self.assertEqual(result.url, self.origin.url("/final"))

    async def test_a_location_with_spaces_or_raw_bytes_is_followed_as_browsers_do(self) -> None:
        fetcher = self.fetcher()
        self.origin.add("/a%20b.png", PNG)
        self.origin.add("/caf%E9.png", PNG)
        self.origin.redirect("/spaced", "/a b.png")
        self.origin.redirect("/latin1", "/caf\xe9.png")  # sent as Latin-1: the byte E9
        self.assertEqual((await fetcher.fetch(self.origin.url("/spaced"))).body, PNG)
        self.assertEqual((await fetcher.fetch(self.origin.url("/latin1"))).body, PNG)

    async def test_a_location_with_a_backslash_before_its_query_is_502(self) -> None:
        # A browser goes to another host for the first three; urljoin stays on this one.
        fetcher = self.fetcher()
        self.origin.add("/ok.png", PNG)
        for location in ("\\\\127.0.0.2/ok.png", "/\\127.0.0.2/ok.png",
                         "http:\\\\127.0.0.2/ok.png", "/dir\\ok.png"):
            with self.subTest(location=location):
                self.origin.redirect("/bs", location)
                error = await self.fetch_error(fetcher, self.origin.url("/bs"))
                self.assertEqual(about(error)[0], 502)
                self.assertIn("backslash", error.reason)
        self.origin.redirect("/query", "/ok.png?path=a\\b")
        self.assertEqual((await fetcher.fetch(self.origin.url("/query"))).body, PNG)

    async def test_redirects_to_other_schemes_are_502(self) -> None:
        fetcher = self.fetcher()
        for location in ("file:///etc/passwd", "ftp://127.0.0.1/x", "gopher://127.0.0.1:70/"):
            with self.subTest(location=location):
                self.origin.redirect("/away", location)
                error = await self.fetch_error(fetcher, self.origin.url("/away"))
                self.assertEqual(error.status, 502)
                self.assertIn("redirected badly", error.reason)


class AddressGuardTests(LiveFetchTestCase):
    """The SSRF guard against real sockets on loopback."""

    async def test_default_policy_refuses_loopback_without_a_request(self) -> None:
        self.origin.add("/a", PNG)
        error = await self.fetch_error(self.fetcher(AddressPolicy()), self.origin.url("/a"))
        self.assertEqual(
            about(error), (403, "the source address 127.0.0.1 is not allowed: loopback")
        )
        self.assertEqual(self.origin.connections, 0)

    async def test_every_spelling_of_loopback_is_refused(self) -> None:
        self.origin.add("/a", PNG)
        fetcher = self.fetcher(AddressPolicy())
        port = self.origin.port
        for host in (
            "2130706433",
            "0177.0.0.1",
            "0x7f.1",
            "127.1",
            "[::ffff:127.0.0.1]",
            "0.0.0.0",
        ):
            with self.subTest(host=host):
                error = await self.fetch_error(fetcher, f"http://{host}:{port}/a")
                self.assertEqual(error.status, 403)
        self.assertEqual(self.origin.connections, 0)

    async def test_the_same_spellings_do_reach_the_origin_when_allowed(self) -> None:
        # Proves the refusals above are the policy's, not unreachable hosts.
        self.origin.add("/a", PNG)
        fetcher = self.fetcher(AddressPolicy(allow_private=True))
        port = self.origin.port
        for host in ("2130706433", "0177.0.0.1", "0x7f.1", "127.1", "[::ffff:127.0.0.1]"):
            with self.subTest(host=host):
                result = await fetcher.fetch(f"http://{host}:{port}/a")
                self.assertEqual(result.body, PNG)

    async def test_a_pooled_connection_is_not_reused_for_another_host(self) -> None:
        allowed = await self.start_origin("127.0.0.5")
        allowed.add("/a", PNG)
        self.resolver = StaticResolver({"a.test": ["127.0.0.5"], "b.test": ["127.0.0.1"]})
        fetcher = self.fetcher(ONLY_127_0_0_5)
        await fetcher.fetch(f"http://a.test:{allowed.port}/a")
        error = await self.fetch_error(fetcher, f"http://b.test:{allowed.port}/a")
        self.assertEqual(
            about(error), (403, "the source address of b.test is not allowed: loopback")
        )
        self.assertEqual(allowed.hits["/a"], 1)

    async def _redirect_from_allowed_origin(self, location: str) -> ProxyError:
        allowed = await self.start_origin("127.0.0.5")
        allowed.redirect("/go", location)
        return await self.fetch_error(self.fetcher(ONLY_127_0_0_5), allowed.url("/go"))

    async def test_redirect_to_127_0_0_1_is_refused(self) -> None:
        self.origin.add("/", PNG)
        error = await self._redirect_from_allowed_origin(self.origin.url("/"))
        self.assertEqual(
            about(error), (403, "the source address 127.0.0.1 is not allowed: loopback")
        )
        self.assertEqual(self.origin.connections, 0)

    async def test_redirect_to_mapped_loopback_is_refused(self) -> None:
        self.origin.add("/", PNG)
        error = await self._redirect_from_allowed_origin(
            f"http://[::ffff:127.0.0.1]:{self.origin.port}/"
        )
        self.assertEqual(error.status, 403)
        self.assertIn("IPv4-mapped 127.0.0.1: loopback", error.reason)
        self.assertEqual(self.origin.connections, 0)

    async def test_redirect_to_ipv6_loopback_is_refused(self) -> None:
        try:
            v6 = await self.start_origin("::1")
        except CannotListenError as e:
            self.skipTest(f"cannot bind ::1 on this machine ({e}): no IPv6 loopback")
        v6.add("/", PNG)
        # The target really is reachable: only the policy stands in the way.
        reachable = await self.fetcher(AddressPolicy(allow_private=True)).fetch(v6.url("/"))
        self.assertEqual(reachable.body, PNG)
        error = await self._redirect_from_allowed_origin(v6.url("/"))
        self.assertEqual(about(error), (403, "the source address ::1 is not allowed: loopback"))
        self.assertEqual(v6.hits["/"], 1)

    async def test_redirect_to_a_name_for_loopback_is_refused(self) -> None:
        self.resolver = StaticResolver({"loopback.test": ["127.0.0.1"]})
        self.origin.add("/", PNG)
        error = await self._redirect_from_allowed_origin(
            f"http://loopback.test:{self.origin.port}/"
        )
        self.assertEqual(
            about(error), (403, "the source address of loopback.test is not allowed: loopback")
        )
        self.assertEqual(self.resolver.lookups, ["loopback.test"])
        self.assertEqual(self.origin.connections, 0)

    async def test_redirect_within_the_allowed_network_is_followed(self) -> None:
        allowed = await self.start_origin("127.0.0.5")
        allowed.add("/img", PNG)
        allowed.redirect("/go", "/img")
        result = await self.fetcher(ONLY_127_0_0_5).fetch(allowed.url("/go"))
        self.assertEqual(result.body, PNG)


class ByteLimitTests(LiveFetchTestCase):
    LIMIT = 100_000

    def limited(self) -> SourceFetcher:
        return self.fetcher(limits=FetchLimits(max_bytes=self.LIMIT, timeout=5.0))

    async def test_endless_body_without_length_is_413_and_dropped(self) -> None:
        stream = self.origin.endless("/endless", chunk=16 << 10)
        error = await self.fetch_error(self.limited(), self.origin.url("/endless"))
        self.assertEqual(
            about(error), (413, f"the source is larger than the limit of {self.LIMIT} bytes")
        )
        # The origin sees the hang-up: the fetcher stopped reading for good.
        sent = await stream.dropped
        self.assertGreater(sent, self.LIMIT)
        self.assertFalse(stream.completed.called)

    async def test_declared_length_over_the_limit_is_413_without_reading(self) -> None:
        stream = self.origin.endless("/huge", declared_length=1 << 30, chunk=16 << 10)
        error = await self.fetch_error(self.limited(), self.origin.url("/huge"))
        self.assertEqual(error.status, 413)
        sent = await stream.dropped
        self.assertLess(sent, 1 << 30)
        self.assertFalse(stream.completed.called)

    async def test_exactly_the_limit_is_accepted(self) -> None:
        self.origin.add("/exact", b"x" * self.LIMIT)
        self.origin.add("/exact-chunked", b"x" * self.LIMIT, chunked=True)
        fetcher = self.limited()
        self.assertEqual(len((await fetcher.fetch(self.origin.url("/exact"))).body), self.LIMIT)
        result = await fetcher.fetch(self.origin.url("/exact-chunked"))
        self.assertEqual(len(result.body), self.LIMIT)

    async def test_one_byte_over_the_limit_is_413(self) -> None:
        self.origin.add("/over", b"x" * (self.LIMIT + 1))
        self.origin.add("/over-chunked", b"x" * (self.LIMIT + 1), chunked=True)
        fetcher = self.limited()
        for path in ("/over", "/over-chunked"):
            with self.subTest(path=path):
                error = await self.fetch_error(fetcher, self.origin.url(path))
                self.assertEqual(error.status, 413)

    async def test_endless_headers_are_cut_off(self) -> None:
        # ~2.3 MB of headers before a tiny body: past the body limit plus the
        # allowance for headers, so the connection is dropped, not parsed.
        junk = {f"X-Junk-{i}": "y" * 100 for i in range(20_000)}
        self.origin.add("/headers", PNG, headers=junk)
        error = await self.fetch_error(self.limited(), self.origin.url("/headers"))
        self.assertEqual(error.status, 502)
        self.assertIn("too large before its body", error.reason)  # we hung up, not the origin

    async def test_headers_within_the_allowance_are_fine(self) -> None:
        junk = {f"X-Junk-{i}": "y" * 100 for i in range(1_000)}
        self.origin.add("/headers", PNG, headers=junk)
        result = await self.limited().fetch(self.origin.url("/headers"))
        self.assertEqual(result.body, PNG)


class TLSTests(LiveFetchTestCase):
    async def _tls_origin(self) -> tuple[Origin, Any]:
        authority = make_tls_authority(["tls.test"])
        origin = await self.start_origin("127.0.0.1", tls=authority)
        origin.add("/a", PNG, "image/png")
        self.resolver = StaticResolver({"tls.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
        return origin, authority.trust_root

    def test_the_tls_options_and_the_endpoint_provide_their_interfaces(self) -> None:
        from twisted.internet.interfaces import (
            IOpenSSLClientConnectionCreator,
            IStreamClientEndpoint,
        )
        from zope.interface.verify import verifyClass, verifyObject

        from imgproxy.worker.fetch import _CheckedEndpoint, identity_checked_tls

        verifyClass(IStreamClientEndpoint, _CheckedEndpoint)
        for host in ("tls.test", "127.0.0.1", "::1"):
            verifyObject(IOpenSSLClientConnectionCreator, identity_checked_tls(host, None))

    async def test_https_with_a_trusted_certificate(self) -> None:
        origin, trust_root = await self._tls_origin()
        fetcher = self.fetcher(tls_trust_root=trust_root)
        result = await fetcher.fetch(f"https://tls.test:{origin.port}/a")
        self.assertEqual(result.body, PNG)

    async def test_untrusted_certificate_is_502(self) -> None:
        origin, _ = await self._tls_origin()
        fetcher = self.fetcher(tls_trust_root=make_tls_authority().trust_root)
        error = await self.fetch_error(fetcher, f"https://tls.test:{origin.port}/a")
        self.assertEqual(
            about(error),
            (502, "the TLS connection to the origin failed: certificate verify failed"),
        )
        self.assertEqual(origin.hits["/a"], 0)

    async def test_certificate_for_another_name_is_502(self) -> None:
        origin, trust_root = await self._tls_origin()
        fetcher = self.fetcher(tls_trust_root=trust_root)
        error = await self.fetch_error(fetcher, f"https://other.test:{origin.port}/a")
        self.assertEqual(
            about(error),
            (
                502,
                "the TLS connection to the origin failed: "
                "its certificate is not valid for the host name",
            ),
        )
        self.assertEqual(origin.hits["/a"], 0)

    async def test_a_certificate_that_names_no_host_is_502_without_a_logged_error(self) -> None:
        # No subjectAltName at all: Twisted's own check logged a critical traceback.
        authority = make_tls_authority([])
        origin = await self.start_origin("127.0.0.1", tls=authority)
        origin.add("/a", PNG, "image/png")
        self.resolver = StaticResolver({"tls.test": ["127.0.0.1"]})
        fetcher = self.fetcher(tls_trust_root=authority.trust_root)
        for url in (f"https://tls.test:{origin.port}/a", f"https://127.0.0.1:{origin.port}/a"):
            error = await self.fetch_error(fetcher, url)
            self.assertEqual(
                about(error),
                (502, "the TLS connection to the origin failed: "
                      "its certificate is not valid for the host name"),
            )
        self.assertEqual(origin.hits["/a"], 0)

    async def test_an_ip_address_certificate_is_checked_as_an_address(self) -> None:
        authority = make_tls_authority(["127.0.0.1"])
        origin = await self.start_origin("127.0.0.1", tls=authority)
        origin.add("/a", PNG, "image/png")
        fetcher = self.fetcher(tls_trust_root=authority.trust_root)
        self.assertEqual((await fetcher.fetch(f"https://127.0.0.1:{origin.port}/a")).body, PNG)


class ClockedOrigin:
    """Fetcher and origin on one MemoryReactorClock: no wall time, no real sockets."""

    limits = FetchLimits(max_bytes=1 << 20, timeout=10.0)

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.origin = self.successResultOf(start_origin(self.reactor, "127.0.0.5", port=8080))
        self.resolver = StaticResolver(
            {
                "origin.test": ["127.0.0.5"],
                "private.test": ["10.0.0.1"],
                "mixed.test": ["8.8.8.8", "10.0.0.1"],
            },
            hang=["hang.test"],
        )
        self.fetcher = SourceFetcher(
            self.reactor, ONLY_127_0_0_5, self.limits, resolver=self.resolver
        )

    def connect(self) -> IOPump:
        pump = ConnectionCompleter(self.reactor).succeedOnce()
        assert pump is not None, "the fetcher did not try to connect"
        pump.flush()
        return pump

    def proxy_error(self, d: Deferred[Any]) -> ProxyError:
        failure: Failure = self.failureResultOf(d, ProxyError)  # type: ignore[attr-defined]
        assert isinstance(failure.value, ProxyError)
        return failure.value


class ClockedFetchTests(ClockedOrigin, SynchronousTestCase):
    def test_a_fetch_completes_on_the_memory_reactor(self) -> None:
        self.origin.add("/a", PNG, "image/png")
        d = self.fetcher.fetch("http://origin.test:8080/a")
        self.connect()
        self.assertEqual(self.successResultOf(d).body, PNG)

    def test_a_name_for_a_private_address_is_refused_before_connecting(self) -> None:
        d = self.fetcher.fetch("http://private.test:8080/a")
        self.assertEqual(
            about(self.proxy_error(d)),
            (403, "the source address of private.test is not allowed: private (RFC 1918)"),
        )
        self.assertEqual(self.resolver.lookups, ["private.test"])
        self.assertEqual(self.reactor.tcpClients, [])

    def test_one_refused_address_refuses_the_whole_name(self) -> None:
        d = self.fetcher.fetch("http://mixed.test/a")
        self.assertEqual(self.proxy_error(d).status, 403)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_an_ip_literal_is_checked_without_a_lookup(self) -> None:
        d = self.fetcher.fetch("http://10.0.0.1/a")
        self.assertEqual(
            about(self.proxy_error(d)),
            (403, "the source address 10.0.0.1 is not allowed: private (RFC 1918)"),
        )
        self.assertEqual(self.resolver.lookups, [])
        self.assertEqual(self.reactor.tcpClients, [])

    def test_the_checked_address_is_the_one_connected_to(self) -> None:
        self.fetcher.fetch("http://origin.test:8080/a")
        [(host, port, *_)] = self.reactor.tcpClients
        self.assertEqual((host, port), ("127.0.0.5", 8080))
        self.assertEqual(self.resolver.lookups, ["origin.test"])

    def test_a_connection_that_never_completes_is_504_at_the_timeout(self) -> None:
        d = self.fetcher.fetch("http://origin.test:8080/a")
        self.reactor.advance(9.9)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        self.assertEqual(about(self.proxy_error(d)), (504, "the origin did not answer within 10s"))
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)

    def test_a_name_that_never_resolves_is_504(self) -> None:
        d = self.fetcher.fetch("http://hang.test/a")
        self.reactor.advance(10)
        self.assertEqual(self.proxy_error(d).status, 504)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_headers_then_silence_is_504(self) -> None:
        stream = self.origin.drip("/stall", None, first=b"abc")
        d = self.fetcher.fetch("http://origin.test:8080/stall")
        pump = self.connect()
        self.reactor.advance(10)
        pump.flush()
        self.assertEqual(self.proxy_error(d).status, 504)
        self.assertTrue(stream.dropped.called)

    def test_a_slow_drip_is_504_at_the_total_timeout(self) -> None:
        stream = self.origin.drip("/drip", 1.0)
        d = self.fetcher.fetch("http://origin.test:8080/drip")
        pump = self.connect()
        # A byte every second keeps arriving: the timeout is total, not idle.
        for _ in range(9):
            self.reactor.advance(1.0)
            pump.flush()
            self.assertNoResult(d)
        self.assertEqual(stream.sent, 9)
        self.reactor.advance(1.0)
        pump.flush()
        self.assertEqual(about(self.proxy_error(d)), (504, "the origin did not answer within 10s"))
        self.assertTrue(stream.dropped.called)

    def test_the_timeout_counts_across_redirects(self) -> None:
        self.origin.redirect("/r", "/stall")
        self.origin.drip("/stall", None)
        d = self.fetcher.fetch("http://origin.test:8080/r")
        self.reactor.advance(6)
        pump = self.connect()
        self.assertNoResult(d)
        self.reactor.advance(4)
        pump.flush()
        self.assertEqual(self.proxy_error(d).status, 504)

    def test_success_cancels_the_timer(self) -> None:
        self.origin.add("/a", PNG)
        d = self.fetcher.fetch("http://origin.test:8080/a")
        self.connect()
        self.successResultOf(d)
        self.assertNotIn(10.0, [call.getTime() for call in self.reactor.getDelayedCalls()])

    def test_cancelling_the_fetch_is_not_a_timeout(self) -> None:
        d = self.fetcher.fetch("http://origin.test:8080/a")
        d.cancel()
        self.failureResultOf(d, CancelledError)


class DownloadTurnTests(ClockedOrigin, SynchronousTestCase):
    """At most ``concurrency`` downloads at once, ``queue`` more waiting, then 503."""

    limits = FetchLimits(max_bytes=1 << 20, timeout=10.0, concurrency=2, queue=1)

    def test_past_the_queue_is_503_at_once(self) -> None:
        running = [self.fetcher.fetch("http://hang.test/a") for _ in range(2)]
        waiting = self.fetcher.fetch("http://origin.test:8080/a")
        self.assertEqual((self.fetcher.downloading, self.fetcher.waiting), (2, 1))
        refused = self.proxy_error(self.fetcher.fetch("http://origin.test:8080/b"))
        self.assertEqual((refused.status, refused.retry_after), (503, 1))
        self.assertEqual(self.resolver.lookups, ["hang.test", "hang.test"])
        for d in [*running, waiting]:
            d.cancel()
            self.failureResultOf(d, CancelledError)
        self.assertEqual((self.fetcher.downloading, self.fetcher.waiting), (0, 0))

    def test_a_finished_download_hands_its_turn_to_the_next(self) -> None:
        self.origin.add("/a", PNG)
        self.origin.add("/b", PNG)
        first = self.fetcher.fetch("http://origin.test:8080/a")
        hanging = self.fetcher.fetch("http://hang.test/x")
        self.addCleanup(lambda: self.failureResultOf(hanging.cancel() or hanging))
        third = self.fetcher.fetch("http://origin.test:8080/b")
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertNoResult(third)
        pump = self.connect()
        self.assertEqual(self.successResultOf(first).body, PNG)
        # The waiting download ran in the turn the first one gave back (over the
        # connection the first one returned to the pool).
        pump.flush()
        self.assertEqual(self.successResultOf(third).body, PNG)
        self.assertEqual((self.fetcher.downloading, self.fetcher.waiting), (1, 0))

    def test_the_wait_counts_toward_the_timeout(self) -> None:
        running = [self.fetcher.fetch("http://hang.test/a") for _ in range(2)]
        waiting = self.fetcher.fetch("http://origin.test:8080/a")
        self.reactor.advance(10)
        for d in [*running, waiting]:
            self.assertEqual(self.proxy_error(d).status, 504)
        self.assertEqual((self.fetcher.downloading, self.fetcher.waiting), (0, 0))


class RequestURLTests(SynchronousTestCase):
    def test_ipv6_hosts_are_written_compressed(self) -> None:
        self.assertEqual(
            request_url("http://[::ffff:127.0.0.1]:8080/a"), b"http://[::ffff:7f00:1]:8080/a"
        )

    def test_user_info_and_fragment_are_dropped(self) -> None:
        self.assertEqual(
            request_url("HTTP://u:p@Example.COM/a?b=1#top"), b"http://example.com/a?b=1"
        )

    def test_user_info_cannot_hide_the_host(self) -> None:
        self.assertEqual(request_url("http://127.0.0.1:80@evil.test/"), b"http://evil.test/")

    def test_non_ascii_is_encoded(self) -> None:
        self.assertEqual(
            request_url("http://bücher.test/ä ö?q=ü"),
            b"http://xn--bcher-kva.test/%C3%A4%20%C3%B6?q=%C3%BC",
        )

    def test_existing_escapes_are_kept(self) -> None:
        self.assertEqual(request_url("http://a.test/%41%2F?x=%26"), b"http://a.test/%41%2F?x=%26")

    def test_empty_path_is_slash(self) -> None:
        self.assertEqual(request_url("https://a.test:8443"), b"https://a.test:8443/")

    def test_international_names_are_idna_2008_as_in_browsers(self) -> None:
        # IDNA 2003 would map the sharp s to "ss": another domain.
        self.assertEqual(request_url("http://faß.test/"), b"http://xn--fa-hia.test/")
        self.assertEqual(request_url("http://BÜCHER.test/"), b"http://xn--bcher-kva.test/")

    def test_unencodable_host_is_502(self) -> None:
        with self.assertRaises(ProxyError) as caught:
            request_url("http://a..b/")
        self.assertEqual(caught.exception.status, 502)
