"""Bad sources against the real process: bombs, floods, stalls, lies, broken and odd images.

One shared proxy (``PERMISSIVE``: loopback origins allowed, 1 MB and 4 MP limits,
a 2 s fetch timeout); each test has its own hostile origin on a fresh port.
"""

from __future__ import annotations

import functools
import gzip
import time
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase

from tests.hostile import (
    FETCH_TIMEOUT,
    MAX_SOURCE_BYTES,
    PERMISSIVE,
    TIMEOUT_MARGIN,
    assert_json_error,
    image_path,
    live_reactor,
    memory_kb,
    report,
    shared_proxy,
)
from tests.hostile.origin import (
    HTML,
    HostileOrigin,
    RawOrigin,
    Stream,
    bomb_png,
    cmyk_jpeg,
    decode,
    exif_rotated_jpeg,
    garbage_after_magic,
    many_frames_gif,
    noise_png,
    palette_png_with_transparency,
    png_16bit_rgb,
    truncated_jpeg,
)
from tests.processes import Reply, in_thread, request

# A decoded 50,000 x 50,000 RGB image is 7.5 GB; anything near that is a decode.
MEMORY_JUMP_KB = 100 * 1024


@functools.cache
def _bomb() -> bytes:
    return bomb_png()


def _close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 40) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


class BadSourceTestCase(TestCase):
    timeout = 60

    def setUp(self) -> Deferred[None]:
        self.reactor = live_reactor()
        self.proxy = shared_proxy(*PERMISSIVE)
        return HostileOrigin.start(self.reactor).addCallback(self._started)

    def _started(self, origin: HostileOrigin) -> None:
        self.origin = origin
        self.addCleanup(origin.stop)

    def get(self, path: str, **params: Any) -> Deferred[Reply]:
        return self.proxy.request_async(self.reactor, image_path(self.origin.url(path), **params))

    def timed_get(self, path: str, **params: Any) -> Deferred[tuple[Reply, float]]:
        """The reply and the seconds it took, measured on the client thread."""
        url = self.proxy.url(image_path(self.origin.url(path), **params))

        def timed() -> tuple[Reply, float]:
            started = time.monotonic()
            reply = request(url)
            return reply, time.monotonic() - started

        return in_thread(self.reactor, timed)

    async def dropped(self, stream: Stream, within: float = 10.0) -> int:
        """The bytes the origin had sent when the proxy hung up (fails if it never does)."""
        d = stream.dropped
        d.addTimeout(within, self.reactor)
        return await d


class LimitTests(BadSourceTestCase):
    """Too many pixels, frames or bytes: 413, found cheaply."""

    async def test_pixel_bomb_gets_413_before_decoding_without_a_memory_jump(self) -> None:
        path = self.origin.serve("/bomb.png", _bomb())
        before = memory_kb(self.proxy.pid)
        replies = [await self.get(path), await self.get(path, w=100, format="jpeg")]
        after = memory_kb(self.proxy.pid)
        report(f"bomb: memory before {before} after {after} (kB)")
        for reply in replies:
            assert_json_error(reply, 413)
            self.assertIn("50000x50000", reply.json()["error"])
        self.assertLess(after["VmHWM"] - before["VmHWM"], MEMORY_JUMP_KB, (before, after))
        self.assertLess(after["VmRSS"] - before["VmRSS"], MEMORY_JUMP_KB, (before, after))

    async def test_gif_with_thousands_of_frames_gets_413_but_its_still_is_served(self) -> None:
        path = self.origin.serve("/frames.gif", many_frames_gif(3000), "image/gif")
        reply = await self.get(path, w=10)
        assert_json_error(reply, 413)
        self.assertIn("3000 frames", reply.json()["error"])
        still = await self.get(path, w=10, format="png")
        self.assertEqual((still.status, still.header("content-type")), (200, "image/png"))

    async def test_declared_huge_body_gets_413_and_is_not_read(self) -> None:
        path, stream = self.origin.oversized_declared()
        reply = await self.get(path)
        assert_json_error(reply, 413)
        sent = await self.dropped(stream)
        report(f"1 GB declared: the origin had sent {sent} bytes when the proxy hung up")
        # 1 GB declared; the proxy refused on the header and hung up at once.
        self.assertLess(sent, 16 << 20)

    async def test_endless_body_without_length_gets_413_and_the_connection_is_dropped(
        self,
    ) -> None:
        path, stream = self.origin.endless()
        before = memory_kb(self.proxy.pid)
        reply = await self.get(path)
        assert_json_error(reply, 413)
        sent = await self.dropped(stream)
        after = memory_kb(self.proxy.pid)
        report(f"endless body: {sent} bytes sent before the drop; memory {before} -> {after}")
        self.assertGreater(sent, MAX_SOURCE_BYTES)  # it did read up to the limit...
        self.assertLess(sent, 32 * MAX_SOURCE_BYTES)  # ...and stopped soon after
        self.assertLess(after["VmRSS"] - before["VmRSS"], MEMORY_JUMP_KB, (before, after))

    async def test_finite_bodies_over_the_limit_get_413_with_or_without_a_length(self) -> None:
        chunked = self.origin.oversized_chunked("/big-chunked.png", 4 * MAX_SOURCE_BYTES)
        declared = self.origin.oversized_with_length("/big-length.png", 4 * MAX_SOURCE_BYTES)
        for path in (chunked, declared):
            assert_json_error(await self.get(path, w=10), 413)

    async def test_body_just_under_the_limit_is_not_refused_for_its_size(self) -> None:
        # 590x590 noise is about 1,044,000 bytes of PNG: under 1 MiB.
        body = noise_png(590, 590, seed=11)
        self.assertLess(len(body), MAX_SOURCE_BYTES)
        path = self.origin.serve("/just-under.png", body)
        reply = await self.get(path, w=20)
        self.assertEqual(reply.status, 200, reply.body[:200])
        self.assertEqual(decode(reply.body).size, (20, 20))


class SlowOriginTests(BadSourceTestCase):
    """Origins that never finish: 504 within the fetch timeout, and the proxy hangs up."""

    async def test_silent_stalled_and_dripping_origins_get_504_within_the_timeout(self) -> None:
        behaviours = [self.origin.silent(), self.origin.stall(), self.origin.drip_forever()]
        results = await gatherResults([self.timed_get(path) for path, _ in behaviours])
        for (path, stream), (reply, seconds) in zip(behaviours, results, strict=True):
            report(f"{path}: {reply.status} after {seconds:.2f}s")
            assert_json_error(reply, 504)
            self.assertGreaterEqual(seconds, FETCH_TIMEOUT - 0.05, path)
            self.assertLess(seconds, FETCH_TIMEOUT + TIMEOUT_MARGIN, path)
            await self.dropped(stream)
        # A dripping origin kept sending until the proxy gave up on it.
        self.assertGreater(behaviours[2][1].sent, 3)


class NotAnImageTests(BadSourceTestCase):
    """Whatever the Content-Type says, the bytes decide: 415 for what is not an image."""

    async def test_non_images_get_415(self) -> None:
        cases = {
            "/page.html": (HTML, "text/html"),
            "/lying.png": (HTML, "image/png"),  # HTML that claims to be a PNG
            "/empty.jpg": (b"", "image/jpeg"),
            "/notes.txt": (b"just some text\n" * 20, "image/jpeg"),
            "/doc.pdf": (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n" + b"0" * 500, "application/pdf"),
            "/vector.svg": (b'<svg xmlns="http://www.w3.org/2000/svg"/>', "image/svg+xml"),
        }
        for path, (body, content_type) in cases.items():
            self.origin.serve(path, body, content_type)
            for params in ({}, {"w": 10, "format": "webp"}):
                reply = await self.get(path, **params)
                assert_json_error(reply, 415)

    async def test_an_image_labelled_as_html_is_still_served(self) -> None:
        path = self.origin.serve("/hidden.png", noise_png(40, 30, seed=5), "text/html")
        reply = await self.get(path, w=20)
        self.assertEqual(reply.status, 200, reply.body[:200])
        self.assertEqual(reply.header("content-type"), "image/png")
        self.assertEqual(decode(reply.body).size, (20, 15))


class BrokenSourceTests(BadSourceTestCase):
    """Broken bytes and broken origins: 502 (or 415), never 500."""

    async def test_truncated_and_corrupt_images_get_502_or_415(self) -> None:
        paths = [
            self.origin.serve("/truncated.jpg", truncated_jpeg(), "image/jpeg"),
            self.origin.serve("/garbage.png", garbage_after_magic(), "image/png"),
            self.origin.serve("/header-only.gif", b"GIF89a\x10\x00\x10\x00", "image/gif"),
            self.origin.serve("/cut.webp", b"RIFF\x00\x10\x00\x00WEBPVP8 ", "image/webp"),
        ]
        for path in paths:
            for params in ({}, {"w": 30}, {"w": 30, "format": "png"}):
                reply = await self.get(path, **params)
                self.assertIn(reply.status, (502, 415), (path, params, reply.body[:200]))
                assert_json_error(reply)

    async def test_origin_failures_get_502_and_404(self) -> None:
        origin = self.origin.origin
        origin.truncate("/short.jpg", b"\xff\xd8\xff" + b"\x00" * 100, declared_length=5000)
        origin.reset("/reset.jpg")
        origin.status("/error.jpg", 500)
        origin.status("/gone.jpg", 404)
        expected = {"/short.jpg": 502, "/reset.jpg": 502, "/error.jpg": 502, "/gone.jpg": 404}
        for path, status in expected.items():
            assert_json_error(await self.get(path), status)

    async def test_raw_protocol_abuse_by_the_origin_gets_502(self) -> None:
        flood = RawOrigin.start(
            self.reactor, b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n",
            repeat=b"X-Flood: " + b"a" * 1000 + b"\r\n",
        )
        endless_line = RawOrigin.start(self.reactor, b"HTTP/1.1 200 ", repeat=b"O" * 4096)
        not_http = RawOrigin.start(self.reactor, b"SSH-2.0-OpenSSH_9.6\r\n" + b"\x00" * 64)
        bad_status = RawOrigin.start(self.reactor, b"HTTP/1.1 2OO OK\r\n\r\n")
        bad_length = RawOrigin.start(
            self.reactor, b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n\x89PNG"
        )
        for origin in (flood, endless_line, not_http, bad_status, bad_length):
            self.addCleanup(origin.stop)
            reply = await self.proxy.request_async(self.reactor, image_path(origin.url()))
            assert_json_error(reply, 502)
        # The header flood was cut off at the limit (plus room for headers), not read for ever.
        self.assertLess(await flood.closed, 4 * MAX_SOURCE_BYTES)
        self.assertLess(await endless_line.closed, 4 * MAX_SOURCE_BYTES)

    async def test_a_compressed_body_is_inflated_but_a_bomb_only_up_to_the_byte_limit(
        self,
    ) -> None:
        # Asked for identity, sent gzip anyway (as some servers do): the image is served.
        body = gzip.compress(noise_png(20, 20, seed=9))
        self.origin.origin.add("/zipped.png", body, "image/png",
                               headers={"Content-Encoding": "gzip"})
        reply = await self.get("/zipped.png")
        self.assertEqual(reply.status, 200)
        # A zip bomb is inflated no further than the byte limit: 413.
        bomb = gzip.compress(b"\0" * (4 * MAX_SOURCE_BYTES))
        self.assertLess(len(bomb), MAX_SOURCE_BYTES // 100)
        self.origin.origin.add("/bomb.png", bomb, "image/png",
                               headers={"Content-Encoding": "gzip"})
        assert_json_error(await self.get("/bomb.png"), 413)

    async def test_redirect_loops_and_long_chains_get_502(self) -> None:
        loop = self.origin.redirect_loop()
        self.origin.serve("/end.png", noise_png(8, 8, seed=1))
        chain = self.origin.origin.redirect_chain("/hop", 12, "/end.png")
        for path in (loop, chain):
            reply = await self.get(path)
            assert_json_error(reply, 502)
            self.assertIn("redirect", reply.json()["error"])


class OddImageTests(BadSourceTestCase):
    """Unusual but valid images: 200 with the right pixels and no metadata."""

    async def test_cmyk_jpeg_comes_out_as_rgb_with_the_right_colours(self) -> None:
        path = self.origin.serve("/cmyk.jpg", cmyk_jpeg(64, 48), "image/jpeg")
        for params in ({}, {"w": 32, "format": "png"}):
            reply = await self.get(path, **params)
            self.assertEqual(reply.status, 200, reply.body[:200])
            image = decode(reply.body)
            self.assertIn(image.mode, ("RGB", "L", "P", "RGBA"))
            rgb = image.convert("RGB")
            width, height = rgb.size
            left = rgb.getpixel((width // 4, height // 2))
            right = rgb.getpixel((3 * width // 4, height // 2))
            self.assertTrue(_close(left, (0, 255, 255), 70), (params, left))  # cyan
            self.assertTrue(_close(right, (255, 0, 0), 70), (params, right))  # red

    async def test_16_bit_png_comes_out_as_8_bit_with_the_right_colours(self) -> None:
        path = self.origin.serve("/deep.png", png_16bit_rgb(64, 32))
        for params in ({}, {"w": 32}):
            reply = await self.get(path, **params)
            self.assertEqual(reply.status, 200, reply.body[:200])
            self.assertEqual(reply.header("content-type"), "image/png")
            image = decode(reply.body)
            self.assertIn(image.mode, ("RGB", "RGBA", "P"))
            rgb = image.convert("RGB")
            width, height = rgb.size
            self.assertEqual(rgb.getpixel((2, height // 2)), (255, 0, 0))
            self.assertEqual(rgb.getpixel((width - 3, height // 2)), (0, 0, 255))

    async def test_palette_png_keeps_its_transparency(self) -> None:
        path = self.origin.serve("/palette.png", palette_png_with_transparency(60, 40))
        for params in ({}, {"w": 30}, {"w": 30, "format": "webp"}):
            reply = await self.get(path, **params)
            self.assertEqual(reply.status, 200, reply.body[:200])
            rgba = decode(reply.body).convert("RGBA")
            width, height = rgba.size
            self.assertEqual(rgba.getpixel((2, height // 2))[3], 0, params)
            right = rgba.getpixel((width - 3, height // 2))
            self.assertTrue(_close(right, (255, 0, 0, 255), 10), (params, right))

    async def test_exif_rotated_jpeg_comes_out_upright_without_exif(self) -> None:
        path = self.origin.serve("/rotated.jpg", exif_rotated_jpeg(80, 40), "image/jpeg")
        for params, size in (({}, (40, 80)), ({"h": 40}, (20, 40)), ({"w": 20, "format": "png"},
                                                                       (20, 40))):
            reply = await self.get(path, **params)
            self.assertEqual(reply.status, 200, reply.body[:200])
            image = decode(reply.body)
            self.assertEqual(image.size, size, params)
            rgb = image.convert("RGB")
            top = rgb.getpixel((size[0] // 2, 2))
            bottom = rgb.getpixel((size[0] // 2, size[1] - 3))
            self.assertTrue(_close(top, (255, 0, 0)), (params, top))
            self.assertTrue(_close(bottom, (0, 0, 255)), (params, bottom))
            self.assertEqual(dict(image.getexif()), {}, params)
            self.assertNotIn(b"Exif\x00\x00", reply.body)
            self.assertNotIn(b"hostile test camera", reply.body)

