"""The public contract, end to end: a real ``twistd -n imgproxy`` against a loopback origin.

Tests share a proxy process per set of options (started on first use, stopped
when the run ends); each test gets its own origin on a fresh port and unique
paths, so no test sees another's cache.
Requests go out on client threads (``tests.processes``) while the reactor serves
the origin.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import shutil
import socket
import tempfile
import uuid
from typing import Any, ClassVar
from urllib.parse import quote, urlencode

from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase

from tests.origins import Origin, unused_port
from tests.processes import (
    ImgproxyProcess,
    Reply,
    free_port,
    live_origin,
    loopback_address,
    shared_imgproxy,
    spawn_imgproxy,
    start_all_async,
    stop_all,
)
from tests.worker.images import (
    BLUE,
    GREEN,
    RED,
    animated_gif,
    animated_webp,
    encode,
    jpeg_with_orientation,
    photo,
    srgb_profile,
    stripes,
)

SIGNING_KEY = "integration-signing-key"


def live_reactor() -> Any:
    # Tests (not the package) may use the global reactor: trial runs it.
    from twisted.internet import reactor

    return reactor


def decode(body: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(body))
    image.load()
    return image


def image_query(url: str, **params: Any) -> str:
    """``url=...&k=v...`` in that order, percent-encoded."""
    return urlencode([("url", url), *((k, str(v)) for k, v in params.items())], quote_via=quote)


def sign(query: str, key: str = SIGNING_KEY) -> str:
    """The contract's ``sig``: hex HMAC-SHA256 of the query string as sent, without ``sig``."""
    return hmac.new(key.encode(), query.encode(), hashlib.sha256).hexdigest()


SOURCES = {
    # name: (Pillow format, content type, extension)
    "jpeg": ("JPEG", "image/jpeg", "jpg"),
    "png": ("PNG", "image/png", "png"),
    "webp": ("WEBP", "image/webp", "webp"),
    "gif": ("GIF", "image/gif", "gif"),
}


class ProxyTestCase(TestCase):
    """One proxy process per distinct ``proxy_args``, shared by every class that uses
    them and stopped when the run ends; a fresh origin per test."""

    proxy_args: ClassVar[tuple[str, ...]] = ("--allow-private-sources",)
    origin_interface: ClassVar[str] = "127.0.0.1"
    timeout = 60

    _launched: ClassVar[bool] = False

    @classmethod
    def _proxy(cls, wait: bool = True) -> ImgproxyProcess:
        return shared_imgproxy(cls.proxy_args, *cls.proxy_args, name="standalone", wait=wait)

    def setUp(self) -> Deferred[None]:
        self.reactor = live_reactor()
        if not ProxyTestCase._launched:
            # Every configuration starts now, side by side, rather than class by class.
            ProxyTestCase._launched = True
            for subclass in {type(self), *ProxyTestCase.__subclasses__()}:
                subclass._proxy(wait=False)
        self.proxy = self._proxy()
        return Deferred.fromCoroutine(self._start_origin())

    async def _start_origin(self) -> None:
        self.origin = await self.start_origin(self.origin_interface)

    async def start_origin(self, interface: str) -> Origin:
        return await live_origin(self, self.reactor, interface)

    def serve(
        self,
        body: bytes,
        content_type: str = "image/jpeg",
        extension: str = "jpg",
        origin: Origin | None = None,
    ) -> tuple[str, str]:
        """Put ``body`` on the origin at a path no other test uses; (url, path)."""
        origin = origin or self.origin
        path = f"/{self._testMethodName}-{uuid.uuid4().hex[:12]}.{extension}"
        origin.add(path, body, content_type)
        return origin.url(path), path

    def serve_image(
        self, image: Image.Image, source: str = "jpeg", origin: Origin | None = None
    ) -> tuple[str, str]:
        fmt, content_type, extension = SOURCES[source]
        if fmt == "GIF":
            image = image.convert("P")
        return self.serve(encode(image, fmt), content_type, extension, origin)

    def get(self, query: str, headers: dict[str, str] | None = None) -> Deferred[Reply]:
        return self.proxy.request_async(self.reactor, f"/image?{query}", headers=headers)

    def call(self, method: str, path: str, **kwargs: Any) -> Deferred[Reply]:
        return self.proxy.request_async(self.reactor, path, method, **kwargs)

    def assert_error(self, reply: Reply, status: int, context: object = None) -> None:
        """The contract's error: that status and ``{"error": str, "status": code}``."""
        self.assertEqual(reply.status, status, (context, reply.body[:300]))
        self.assertTrue(
            (reply.header("content-type") or "").startswith("application/json"),
            reply.header("content-type"),
        )
        body = reply.json()
        self.assertEqual(set(body), {"error", "status"}, body)
        self.assertIsInstance(body["error"], str)
        self.assertTrue(body["error"])
        self.assertEqual(body["status"], status)


class ImageResponseTests(ProxyTestCase):
    """Headers, caching and conditional requests of a successful ``GET /image``."""

    async def test_first_request_misses_and_the_second_hits(self) -> None:
        url, path = self.serve_image(photo(400, 300))
        query = image_query(url, w=100)

        first = await self.get(query)
        second = await self.get(query)

        for reply in (first, second):
            self.assertEqual(reply.status, 200)
            self.assertEqual(reply.header("content-type"), "image/jpeg")
            self.assertEqual(reply.header("content-length"), str(len(reply.body)))
            self.assertTrue(reply.header("etag"))
            cache_control = [p.strip() for p in (reply.header("cache-control") or "").split(",")]
            self.assertIn("public", cache_control)
            max_age = [p for p in cache_control if p.startswith("max-age=")]
            self.assertEqual(len(max_age), 1, cache_control)
            self.assertGreater(int(max_age[0].partition("=")[2]), 0)
        self.assertEqual(first.header("x-cache"), "MISS")
        self.assertEqual(second.header("x-cache"), "HIT")
        self.assertEqual(first.header("etag"), second.header("etag"))
        self.assertEqual(first.body, second.body)
        self.assertEqual(decode(first.body).size, (100, 75))
        self.assertEqual(self.origin.hits[path], 1)

    async def test_if_none_match_with_the_etag_answers_304_without_a_body(self) -> None:
        url, _ = self.serve_image(photo(120, 90))
        query = image_query(url, w=60)
        etag = (await self.get(query)).header("etag")
        assert etag is not None

        matching = await self.get(query, {"If-None-Match": etag})
        listed = await self.get(query, {"If-None-Match": f'"nope", {etag}'})
        other = await self.get(query, {"If-None-Match": '"some-other-etag"'})

        self.assertEqual(matching.status, 304)
        self.assertEqual(matching.body, b"")
        self.assertEqual(matching.header("etag"), etag)
        self.assertEqual(listed.status, 304)
        self.assertEqual(other.status, 200)
        self.assertEqual(decode(other.body).size, (60, 45))

    async def test_head_sends_the_headers_and_the_length_but_no_body(self) -> None:
        url, _ = self.serve_image(photo(200, 100), "png")
        query = image_query(url, w=50)

        head = await self.call("HEAD", f"/image?{query}")
        get = await self.get(query)

        self.assertEqual(head.status, 200)
        self.assertEqual(head.body, b"")
        self.assertEqual(head.header("content-type"), "image/png")
        self.assertEqual(head.header("content-length"), str(len(get.body)))
        self.assertEqual(head.header("etag"), get.header("etag"))

    async def test_quality_changes_the_size_of_lossy_outputs(self) -> None:
        url, _ = self.serve_image(photo(400, 300))

        low, high = await gatherResults(
            [self.get(image_query(url, q=10)), self.get(image_query(url, q=95))]
        )

        self.assertEqual((low.status, high.status), (200, 200))
        self.assertLess(len(low.body) * 2, len(high.body))
        self.assertNotEqual(low.header("etag"), high.header("etag"))


class GeometryTests(ProxyTestCase):
    """Each ``fit`` and each combination of ``w`` and ``h``, read back from the image."""

    async def test_each_fit_gives_the_contract_size(self) -> None:
        url, path = self.serve_image(photo(400, 300))
        expected = {
            # (w, h, fit): size
            (100, 100, None): (100, 75),
            (100, 100, "contain"): (100, 75),
            (100, 100, "cover"): (100, 100),
            (100, 50, "fill"): (100, 50),
            (200, None, None): (200, 150),
            (None, 150, None): (200, 150),
            (None, None, None): (400, 300),
            # never upscale, unless both sides are given with cover or fill
            (800, 600, "contain"): (400, 300),
            (800, None, "cover"): (400, 300),
            (None, 900, "fill"): (400, 300),
            (800, 800, "cover"): (800, 800),
            (800, 100, "fill"): (800, 100),
        }
        queries = []
        for w, h, fit in expected:
            params = {k: v for k, v in (("w", w), ("h", h), ("fit", fit)) if v is not None}
            queries.append(image_query(url, **params))

        replies = await gatherResults([self.get(q) for q in queries])

        for (key, size), reply in zip(expected.items(), replies, strict=True):
            self.assertEqual(reply.status, 200, (key, reply.body[:200]))
            self.assertEqual(decode(reply.body).size, size, key)
        # Every variant was cut from one download of the source.
        self.assertEqual(self.origin.hits[path], 1)

    async def test_cover_crops_around_the_centre(self) -> None:
        url, _ = self.serve_image(stripes(300, 100, (RED, GREEN, BLUE)), "png")

        reply = await self.get(image_query(url, w=100, h=100, fit="cover"))

        image = decode(reply.body).convert("RGB")
        self.assertEqual(image.size, (100, 100))
        for x in (5, 50, 94):
            self.assertEqual(image.getpixel((x, 50)), GREEN)

    async def test_fill_stretches_without_cropping(self) -> None:
        url, _ = self.serve_image(stripes(300, 100, (RED, GREEN, BLUE)), "png")

        reply = await self.get(image_query(url, w=90, h=90, fit="fill"))

        image = decode(reply.body).convert("RGB")
        self.assertEqual(image.size, (90, 90))
        self.assertEqual(image.getpixel((5, 45)), RED)
        self.assertEqual(image.getpixel((45, 45)), GREEN)
        self.assertEqual(image.getpixel((84, 45)), BLUE)

    async def test_exif_orientation_is_applied_and_the_metadata_dropped(self) -> None:
        # Stored 200x100, left red, right blue; orientation 6 shows it turned a
        # quarter clockwise: 100x200, red on top.
        url, _ = self.serve(jpeg_with_orientation(6, 200, 100))

        reply = await self.get(image_query(url, w=50))

        image = decode(reply.body)
        self.assertEqual(image.size, (50, 100))
        top = image.convert("RGB").getpixel((25, 10))
        bottom = image.convert("RGB").getpixel((25, 90))
        self.assertGreater(top[0], 200)
        self.assertLess(top[2], 60)
        self.assertGreater(bottom[2], 200)
        self.assertLess(bottom[0], 60)
        self.assertNotIn(0x0112, image.getexif())
        self.assertNotIn("xmp", image.info)
        self.assertNotIn(b"imgproxy test camera", reply.body)


    async def test_the_colour_profile_is_kept(self) -> None:
        profile = srgb_profile()
        url, _ = self.serve(encode(photo(120, 90), "JPEG", icc_profile=profile))

        replies = await gatherResults(
            [self.get(image_query(url, w=60, format=fmt)) for fmt in ("jpeg", "png", "webp")]
        )

        for reply in replies:
            self.assertEqual(decode(reply.body).info.get("icc_profile"), profile)


class FormatTests(ProxyTestCase):
    """Output formats: explicit, the source's by default, and negotiated by ``Accept``."""

    async def test_each_output_format(self) -> None:
        url, _ = self.serve_image(photo(160, 120))
        formats = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF", "avif": "AVIF"}

        replies = await gatherResults(
            [self.get(image_query(url, w=80, format=name)) for name in formats]
        )

        for (name, pillow_name), reply in zip(formats.items(), replies, strict=True):
            self.assertEqual(reply.status, 200, (name, reply.body[:200]))
            self.assertEqual(reply.header("content-type"), f"image/{name}")
            image = decode(reply.body)
            self.assertEqual(image.format, pillow_name)
            self.assertEqual(image.size, (80, 60))

    async def test_the_default_format_is_the_source_format(self) -> None:
        urls = {name: self.serve_image(photo(160, 120), name)[0] for name in SOURCES}

        replies = await gatherResults([self.get(image_query(urls[name], w=40)) for name in SOURCES])

        for (name, (pillow_name, content_type, _)), reply in zip(
            SOURCES.items(), replies, strict=True
        ):
            self.assertEqual(reply.status, 200, (name, reply.body[:200]))
            self.assertEqual(reply.header("content-type"), content_type)
            self.assertEqual(decode(reply.body).format, pillow_name)
            self.assertEqual(decode(reply.body).size, (40, 30))

    async def test_animations_stay_animated_in_formats_that_can_animate(self) -> None:
        gif, _ = self.serve(animated_gif(3, 60, 40), "image/gif", "gif")
        webp, _ = self.serve(animated_webp(3, 60, 40), "image/webp", "webp")

        as_gif, as_webp, as_jpeg = await gatherResults(
            [
                self.get(image_query(gif, w=30)),
                self.get(image_query(webp, w=30)),
                self.get(image_query(gif, w=30, format="jpeg")),
            ]
        )

        for reply, pillow_name in ((as_gif, "GIF"), (as_webp, "WEBP")):
            image = decode(reply.body)
            self.assertEqual(image.format, pillow_name)
            self.assertEqual(image.size, (30, 20))
            self.assertEqual(getattr(image, "n_frames", 1), 3, pillow_name)
        self.assertEqual(decode(as_jpeg.body).format, "JPEG")
        self.assertEqual(decode(as_jpeg.body).size, (30, 20))

    async def test_format_auto_picks_avif_then_webp_then_the_source_format(self) -> None:
        url, path = self.serve_image(photo(160, 120))
        query = image_query(url, w=80, format="auto")
        cases = [
            ("image/avif,image/webp,image/*;q=0.8", "image/avif"),
            ("image/webp,image/avif", "image/avif"),
            ("image/webp,image/*,*/*;q=0.8", "image/webp"),
            ("image/avif;q=0,image/webp", "image/webp"),
            ("image/png,image/*;q=0.8", "image/jpeg"),
            ("*/*", "image/jpeg"),
        ]

        replies = await gatherResults([self.get(query, {"Accept": accept}) for accept, _ in cases])

        for (accept, content_type), reply in zip(cases, replies, strict=True):
            self.assertEqual(reply.status, 200, (accept, reply.body[:200]))
            self.assertEqual(reply.header("content-type"), content_type, accept)
            vary = {v.strip().lower() for h in reply.header_values("vary") for v in h.split(",")}
            self.assertIn("accept", vary, accept)
            self.assertEqual(decode(reply.body).format, content_type.split("/")[1].upper())
        self.assertEqual(self.origin.hits[path], 1)


    async def test_format_auto_without_accept_does_not_decide_for_later_requests(self) -> None:
        url, _ = self.serve_image(photo(160, 120))
        query = image_query(url, w=80, format="auto")

        without = await self.get(query)
        with_avif = await self.get(query, {"Accept": "image/avif"})
        with_webp = await self.get(query, {"Accept": "image/webp"})

        self.assertEqual(without.header("content-type"), "image/jpeg")
        self.assertEqual(with_avif.header("content-type"), "image/avif")
        self.assertEqual(with_webp.header("content-type"), "image/webp")


class BadRequestTests(ProxyTestCase):
    """400 for each malformed parameter; other client and origin errors."""

    async def test_each_bad_parameter_gets_400_with_a_json_reason(self) -> None:
        url, path = self.serve_image(photo(40, 30))
        queries = [
            "",
            "w=100",
            image_query("ftp://127.0.0.1/a.png"),
            image_query("not a url"),
            image_query("http://"),
            image_query("//127.0.0.1/a.png"),
            *(image_query(url, w=w) for w in ("0", "8193", "-5", "abc", "1.5", "")),
            *(image_query(url, h=h) for h in ("0", "9000", "x")),
            image_query(url, fit="stretch"),
            image_query(url, format="bmp"),
            image_query(url, format="tiff"),
            *(image_query(url, q=q) for q in ("0", "101", "high")),
        ]

        replies = await gatherResults([self.get(query) for query in queries])

        for query, reply in zip(queries, replies, strict=True):
            self.assert_error(reply, 400, query)
        self.assertEqual(self.origin.hits[path], 0)

    async def test_an_origin_404_is_a_404(self) -> None:
        reply = await self.get(image_query(self.origin.url("/missing.jpg"), w=10))

        self.assert_error(reply, 404)
        self.assertEqual(self.origin.hits["/missing.jpg"], 1)

    async def test_an_origin_500_is_a_502(self) -> None:
        self.origin.status("/broken.jpg", 500, b"oops")

        reply = await self.get(image_query(self.origin.url("/broken.jpg")))

        self.assert_error(reply, 502)

    async def test_a_refused_connection_is_a_502(self) -> None:
        url = f"http://127.0.0.1:{unused_port('127.0.0.1')}/a.jpg"

        self.assert_error(await self.get(image_query(url)), 502)

    async def test_html_and_text_are_415_whatever_their_content_type(self) -> None:
        html, _ = self.serve(b"<!doctype html><html><body>hi</body></html>", "text/html", "html")
        liar, _ = self.serve(b"this is plain text, not a JPEG at all\n" * 20, "image/jpeg")

        replies = await gatherResults([self.get(image_query(html)), self.get(image_query(liar))])

        for reply in replies:
            self.assert_error(reply, 415)

    async def test_delete_without_a_signing_key_is_403(self) -> None:
        url, path = self.serve_image(photo(40, 30))
        await self.get(image_query(url))

        reply = await self.call("DELETE", f"/image?{image_query(url)}")
        after = await self.get(image_query(url))

        self.assert_error(reply, 403)
        self.assertEqual(after.header("x-cache"), "HIT")
        self.assertEqual(self.origin.hits[path], 1)

    async def test_an_unknown_path_is_a_json_404(self) -> None:
        replies = await gatherResults(
            [self.call("GET", "/no/such/thing"), self.call("GET", "/imagex?url=a")]
        )

        for reply in replies:
            self.assert_error(reply, 404)


    async def test_an_unsupported_method_gets_a_json_error(self) -> None:
        reply = await self.call("POST", "/image?url=http%3A%2F%2F127.0.0.1%2Fa.jpg", body=b"x")

        self.assertGreaterEqual(reply.status, 400)
        self.assertLess(reply.status, 500)
        self.assert_error(reply, reply.status)

    async def test_a_source_url_with_its_own_query_string_is_served(self) -> None:
        body = encode(photo(80, 60), "JPEG")
        self.origin.add("/with-query.jpg", body, "image/jpeg")
        url = self.origin.url("/with-query.jpg?size=large&v=2")

        reply = await self.get(image_query(url, w=40))

        self.assertEqual(reply.status, 200)
        self.assertEqual(decode(reply.body).size, (40, 30))
        self.assertEqual(self.origin.hits["/with-query.jpg"], 1)


class ServiceEndpointTests(ProxyTestCase):
    """``/health``, ``/metrics`` and the status page."""

    async def test_health_describes_the_node_and_its_members(self) -> None:
        reply = await self.call("GET", "/health")

        self.assertEqual(reply.status, 200)
        self.assertTrue((reply.header("content-type") or "").startswith("application/json"))
        health = reply.json()
        self.assertIsInstance(health["name"], str)
        self.assertEqual(health["role"], "standalone")
        self.assertEqual(health["state"], "alive")
        self.assertGreaterEqual(len(health["members"]), 1)
        names = [member["name"] for member in health["members"]]
        self.assertIn(health["name"], names)
        for member in health["members"]:
            self.assertEqual(member["role"], "standalone")
            self.assertIsInstance(member["address"], str)
            self.assertEqual(member["state"], "alive")
            self.assertIsInstance(member["incarnation"], int)

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        reply = await self.call("GET", "/metrics")
        self.assertEqual(reply.status, 200)
        self.assertTrue((reply.header("content-type") or "").startswith("text/plain"))
        samples = {}
        for family in text_string_to_metric_families(reply.body.decode("utf-8")):
            if family.type != "counter":
                continue
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    async def test_metrics_count_hits_and_misses(self) -> None:
        url, _ = self.serve_image(photo(40, 30))
        before = await self.metrics()

        await self.get(image_query(url, w=20))
        await self.get(image_query(url, w=20))
        await self.get(image_query(url, w=20))
        after = await self.metrics()

        def delta(value: str) -> list[float]:
            return [
                after[key] - before.get(key, 0.0)
                for key in after
                if value in dict(key[1]).values() and key[0].endswith("_total")
            ]

        # Some counter, labelled hit and miss, saw exactly one miss and two hits.
        self.assertIn(1.0, delta("miss"))
        self.assertIn(2.0, delta("hit"))

    async def test_the_status_page_is_html_with_the_members_table(self) -> None:
        health = (await self.call("GET", "/health")).json()

        reply = await self.call("GET", "/")

        self.assertEqual(reply.status, 200)
        self.assertTrue((reply.header("content-type") or "").startswith("text/html"))
        page = reply.body.decode("utf-8")
        self.assertIn("<table", page)
        self.assertIn(health["name"], page)
        self.assertIn("standalone", page)


class CoalescingTests(ProxyTestCase):
    """Concurrent requests share one origin fetch."""

    async def test_twenty_identical_concurrent_requests_cost_one_fetch(self) -> None:
        url, path = self.serve_image(photo(800, 600))
        query = image_query(url, w=123)

        replies = await gatherResults([self.get(query) for _ in range(20)])

        self.assertEqual({reply.status for reply in replies}, {200})
        self.assertEqual(len({reply.body for reply in replies}), 1)
        self.assertEqual(len({reply.header("etag") for reply in replies}), 1)
        self.assertEqual(self.origin.hits[path], 1)

    async def test_five_concurrent_variants_of_one_source_cost_one_fetch(self) -> None:
        url, path = self.serve_image(photo(800, 600))
        widths = [40, 80, 120, 160, 200]

        replies = await gatherResults([self.get(image_query(url, w=w)) for w in widths])

        for width, reply in zip(widths, replies, strict=True):
            self.assertEqual(reply.status, 200)
            self.assertEqual(decode(reply.body).size, (width, width * 3 // 4))
        self.assertEqual(self.origin.hits[path], 1)


class SigningTests(ProxyTestCase):
    """With ``--signing-key``: ``sig`` checked on GET and DELETE."""

    proxy_args = ("--allow-private-sources", "--signing-key", SIGNING_KEY)

    async def test_a_missing_or_bad_signature_is_403_and_a_good_one_200(self) -> None:
        url, path = self.serve_image(photo(80, 60))
        query = image_query(url, w=40)
        reordered = f"w=40&{image_query(url)}"

        missing, bad, wrong_key, other_order, good, good_reordered = await gatherResults(
            [
                self.get(query),
                self.get(f"{query}&sig={'0' * 64}"),
                self.get(f"{query}&sig={sign(query, 'another key')}"),
                self.get(f"{reordered}&sig={sign(query)}"),
                self.get(f"{query}&sig={sign(query)}"),
                self.get(f"{reordered}&sig={sign(reordered)}"),
            ]
        )

        for reply in (missing, bad, wrong_key, other_order):
            self.assert_error(reply, 403)
        for reply in (good, good_reordered):
            self.assertEqual(reply.status, 200)
            self.assertEqual(decode(reply.body).size, (40, 30))

    async def test_a_signed_delete_purges_and_the_next_get_refetches(self) -> None:
        url, path = self.serve_image(photo(80, 60))
        queries = [image_query(url, w=40), image_query(url)]
        for query in queries:
            self.assertEqual((await self.get(f"{query}&sig={sign(query)}")).status, 200)
        self.assertEqual(self.origin.hits[path], 1)
        purge = image_query(url)

        unsigned = await self.call("DELETE", f"/image?{purge}")
        badly_signed = await self.call("DELETE", f"/image?{purge}&sig={sign(purge, 'nope')}")
        still_cached = await self.get(f"{queries[0]}&sig={sign(queries[0])}")
        purged = await self.call("DELETE", f"/image?{purge}&sig={sign(purge)}")
        after = [await self.get(f"{query}&sig={sign(query)}") for query in queries]

        self.assert_error(unsigned, 403)
        self.assert_error(badly_signed, 403)
        self.assertEqual(still_cached.header("x-cache"), "HIT")
        self.assertEqual(purged.status, 204)
        self.assertEqual(purged.body, b"")
        self.assertEqual([reply.status for reply in after], [200, 200])
        self.assertEqual(after[0].header("x-cache"), "MISS")
        # One new download served both variants again.
        self.assertEqual(self.origin.hits[path], 2)


class LimitTests(ProxyTestCase):
    """Source limits, the fetch timeout and the private-address guard."""

    proxy_args = (
        "--allow-networks", "127.0.0.1/32",
        "--max-source-bytes", "64K",
        "--max-source-pixels", "1000000",
        "--fetch-timeout", "1s",
    )

    async def test_a_source_within_the_limits_is_served(self) -> None:
        url, _ = self.serve_image(photo(300, 200))

        reply = await self.get(image_query(url, w=30))

        self.assertEqual(reply.status, 200)
        self.assertEqual(decode(reply.body).size, (30, 20))

    async def test_a_source_over_the_byte_limit_is_413(self) -> None:
        noise = Image.effect_noise((300, 300), 128).convert("RGB")
        body = encode(noise, "PNG")
        self.assertGreater(len(body), 64 << 10)
        url, _ = self.serve(body, "image/png", "png")
        endless = self.origin.endless("/endless.jpg")

        replies = await gatherResults(
            [self.get(image_query(url)), self.get(image_query(self.origin.url("/endless.jpg")))]
        )

        for reply in replies:
            self.assert_error(reply, 413)
        # The proxy hung up on the endless body instead of reading it all.
        self.assertGreater(await endless.dropped, 0)

    async def test_a_source_over_the_pixel_limit_is_413(self) -> None:
        small_file = encode(Image.new("RGB", (1200, 1000), GREEN), "PNG")
        self.assertLess(len(small_file), 64 << 10)
        url, _ = self.serve(small_file, "image/png", "png")

        self.assert_error(await self.get(image_query(url, w=10)), 413)

    async def test_an_origin_slower_than_the_fetch_timeout_is_504(self) -> None:
        self.origin.drip("/slow.jpg", None, first=b"\xff\xd8")
        # A listener that never accepts: the kernel completes the handshake, nobody answers.
        silent = socket.socket()
        self.addCleanup(silent.close)
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        silent_url = f"http://127.0.0.1:{silent.getsockname()[1]}/never.jpg"

        replies = await gatherResults(
            [
                self.get(image_query(self.origin.url("/slow.jpg"))),
                self.get(image_query(silent_url)),
            ]
        )

        for reply in replies:
            self.assert_error(reply, 504)

    async def test_an_origin_on_a_loopback_address_not_allowed_is_403(self) -> None:
        other = await self.start_origin(loopback_address())
        url, path = self.serve_image(photo(40, 30), origin=other)

        reply = await self.get(image_query(url))

        self.assert_error(reply, 403)
        self.assertEqual(other.hits[path], 0)


    async def test_a_redirect_to_an_address_not_allowed_is_403(self) -> None:
        other = await self.start_origin(loopback_address())
        url, path = self.serve_image(photo(40, 30), origin=other)
        self.origin.redirect("/hop.jpg", url)

        reply = await self.get(image_query(self.origin.url("/hop.jpg")))

        self.assert_error(reply, 403)
        self.assertEqual(self.origin.hits["/hop.jpg"], 1)
        self.assertEqual(other.hits[path], 0)


class CacheCapTests(ProxyTestCase):
    """``--cache-max-bytes``: the least recently used entries go first."""

    proxy_args = ("--allow-private-sources", "--cache-max-bytes", "400K")

    async def test_the_least_recently_used_entries_are_evicted_over_the_cap(self) -> None:
        bodies = [
            encode(Image.effect_noise((160, 160), 100).convert("RGB"), "PNG") for _ in range(16)
        ]
        # Sources alone are twice the cap, so the first ones cannot all stay.
        self.assertGreater(sum(map(len, bodies)), 2 * (400 << 10))
        sources = [self.serve(body, "image/png", "png") for body in bodies]
        for url, _ in sources:
            self.assertEqual((await self.get(image_query(url))).header("x-cache"), "MISS")

        newest = await self.get(image_query(sources[-1][0]))
        oldest = await self.get(image_query(sources[0][0]))

        self.assertEqual(newest.header("x-cache"), "HIT")
        self.assertEqual(oldest.header("x-cache"), "MISS")
        self.assertEqual(self.origin.hits[sources[0][1]], 2)
        self.assertEqual(self.origin.hits[sources[-1][1]], 1)


class RestartTests(TestCase):
    """The disk cache outlives the process."""

    timeout = 90

    async def test_a_restarted_proxy_serves_its_cache_without_asking_the_origin(self) -> None:
        reactor = live_reactor()
        origin = await live_origin(self, reactor, "127.0.0.1")
        path = f"/restart-{uuid.uuid4().hex[:12]}.jpg"
        origin.add(path, encode(photo(300, 200), "JPEG"), "image/jpeg")
        proxy = spawn_imgproxy(self, "--allow-private-sources")
        queries = [
            image_query(origin.url(path)),
            image_query(origin.url(path), w=100),
            image_query(origin.url(path), w=50, format="webp"),
        ]
        before = [await proxy.request_async(reactor, f"/image?{q}") for q in queries]
        self.assertEqual([r.header("x-cache") for r in before], ["MISS", "MISS", "MISS"])
        self.assertEqual(origin.hits[path], 1)

        await proxy.restart_async(reactor)
        after = await gatherResults(
            [proxy.request_async(reactor, f"/image?{q}") for q in queries]
        )

        self.assertEqual([r.status for r in after], [200, 200, 200])
        self.assertEqual([r.header("x-cache") for r in after], ["HIT", "HIT", "HIT"])
        self.assertEqual([r.header("etag") for r in after], [r.header("etag") for r in before])
        self.assertEqual([r.body for r in after], [r.body for r in before])
        self.assertEqual(origin.hits[path], 1)


class EnvironmentTests(TestCase):
    """Every option can come from the environment instead of a flag."""

    timeout = 90

    async def test_options_from_imgproxy_variables_and_http_port(self) -> None:
        reactor = live_reactor()
        origin = await live_origin(self, reactor, "127.0.0.1")
        path = "/env.png"
        origin.add(path, encode(photo(300, 200), "PNG"), "image/png")
        big = "/big.png"
        origin.add(big, encode(Image.new("RGB", (400, 300), RED), "PNG"), "image/png")
        base = tempfile.mkdtemp(prefix="imgproxy-env-")
        self.addCleanup(shutil.rmtree, base, True)
        interface = loopback_address()
        port = free_port(interface)
        variables = ImgproxyProcess(
            env={
                "IMGPROXY_HTTP": f"tcp:{port}:interface={interface}",
                "IMGPROXY_CACHE_DIR": os.path.join(base, "env-cache"),
                "IMGPROXY_NODE_NAME": "from-environment",
                "IMGPROXY_SIGNING_KEY": SIGNING_KEY,
                "IMGPROXY_ALLOW_PRIVATE_SOURCES": "true",
                "IMGPROXY_MAX_SOURCE_PIXELS": "100000",
            },
            interface=interface,
            port=port,
            base_dir=os.path.join(base, "variables"),
            add_defaults=False,
        )
        bare_port = free_port("0.0.0.0")
        legacy = ImgproxyProcess(
            env={"HTTP_PORT": str(bare_port), "IMGPROXY_CACHE_DIR": os.path.join(base, "c2")},
            port=bare_port,
            base_dir=os.path.join(base, "legacy"),
            add_defaults=False,
        )
        self.addCleanup(stop_all, [variables, legacy])
        await start_all_async(reactor, [variables, legacy])
        query = image_query(origin.url(path), w=30)
        big_query = image_query(origin.url(big), w=30)

        health, unsigned, signed, too_big, not_allowed = await gatherResults(
            [
                variables.request_async(reactor, "/health"),
                variables.request_async(reactor, f"/image?{query}"),
                variables.request_async(reactor, f"/image?{query}&sig={sign(query)}"),
                variables.request_async(reactor, f"/image?{big_query}&sig={sign(big_query)}"),
                legacy.request_async(reactor, f"/image?{query}"),
            ]
        )

        self.assertEqual(health.json()["name"], "from-environment")
        self.assertEqual(unsigned.status, 403)
        self.assertEqual(signed.status, 200)
        self.assertEqual(decode(signed.body).size, (30, 20))
        self.assertEqual(too_big.status, 413)
        self.assertTrue(os.listdir(os.path.join(base, "env-cache")))
        # HTTP_PORT (a bare port) was the listener; no private sources without the variable.
        self.assertEqual(not_allowed.status, 403)
        self.assertEqual(origin.hits[big], 1)
