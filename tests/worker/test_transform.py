"""The image transform: the contract's w/h/fit/format/q rules, limits and hostile input."""

from __future__ import annotations

import random
import warnings
from concurrent.futures import ThreadPoolExecutor

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from twisted.trial.unittest import SynchronousTestCase

from imgproxy.errors import ProxyError
from imgproxy.params import TransformSpec
from imgproxy.worker import avif
from imgproxy.worker.transform import (
    Geometry,
    SourceInfo,
    TransformedImage,
    TransformLimits,
    _header_size,
    avif_quality,
    output_geometry,
    probe_source,
    sniff_format,
    transform_image,
)
from tests.worker import images

LIMITS = TransformLimits()
URL = "http://origin.test/image"


def spec(**fields: object) -> TransformSpec:
    return TransformSpec(url=URL, **fields)  # type: ignore[arg-type]


def close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 40) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def frame_durations(body: bytes) -> list[int | None]:
    """Each frame's duration in an encoded animation (WebP and AVIF set it once decoded)."""
    out = images.decode(body)
    durations = []
    for index in range(out.n_frames):
        out.seek(index)
        out.load()
        durations.append(out.info.get("duration"))
    return durations


class OutputGeometryTests(SynchronousTestCase):
    """The pure size arithmetic, in displayed orientation."""

    def test_no_box_keeps_the_size(self) -> None:
        self.assertEqual(output_geometry(400, 300, None, None, "cover").width, 400)
        self.assertTrue(output_geometry(400, 300, None, None, "fill").is_identity)

    def test_contain_fits_inside_the_box(self) -> None:
        g = output_geometry(400, 300, 100, 100, "contain")
        self.assertEqual((g.width, g.height), (100, 75))
        g = output_geometry(300, 400, 100, 100, "contain")
        self.assertEqual((g.width, g.height), (75, 100))

    def test_one_side_keeps_the_aspect_ratio_whatever_the_fit(self) -> None:
        for fit in ("contain", "cover", "fill"):
            g = output_geometry(400, 300, 200, None, fit)
            self.assertEqual((g.width, g.height), (200, 150), fit)
            g = output_geometry(400, 300, None, 60, fit)
            self.assertEqual((g.width, g.height), (80, 60), fit)

    def test_contain_and_one_side_never_upscale(self) -> None:
        self.assertTrue(output_geometry(400, 300, 800, 800, "contain").is_identity)
        self.assertTrue(output_geometry(400, 300, 1000, None, "cover").is_identity)
        self.assertTrue(output_geometry(400, 300, None, 301, "fill").is_identity)

    def test_cover_and_fill_with_both_sides_may_upscale(self) -> None:
        g = output_geometry(40, 30, 200, 200, "cover")
        self.assertEqual((g.width, g.height, g.crop_width, g.crop_height), (200, 200, 30, 30))
        g = output_geometry(40, 30, 200, 100, "fill")
        self.assertEqual((g.width, g.height, g.crop_width, g.crop_height), (200, 100, 40, 30))

    def test_cover_crops_the_overflow_around_the_centre(self) -> None:
        g = output_geometry(300, 100, 100, 100, "cover")
        self.assertEqual((g.crop_width, g.crop_height), (100, 100))
        self.assertEqual(g.crop_box(300, 100), (100, 0, 200, 100))
        # The crop box scales with a drafted (reduced) decode of the same source.
        self.assertEqual(g.crop_box(150, 50), (50, 0, 100, 50))

    def test_a_very_thin_image_keeps_at_least_one_pixel(self) -> None:
        g = output_geometry(4000, 2, 100, None, "contain")
        self.assertEqual((g.width, g.height), (100, 1))

    @settings(max_examples=300, deadline=None)
    @given(
        width=st.integers(1, 10_000),
        height=st.integers(1, 10_000),
        box_width=st.one_of(st.none(), st.integers(1, 8192)),
        box_height=st.one_of(st.none(), st.integers(1, 8192)),
        fit=st.sampled_from(("contain", "cover", "fill")),
    )
    def test_the_rules_hold_for_any_size(
        self, width: int, height: int, box_width: int | None, box_height: int | None, fit: str
    ) -> None:
        g = output_geometry(width, height, box_width, box_height, fit)
        both = box_width is not None and box_height is not None
        self.assertGreaterEqual(min(g.width, g.height), 1)
        self.assertTrue(0 < g.crop_width <= width and 0 < g.crop_height <= height)
        if both and fit in ("cover", "fill"):
            self.assertEqual((g.width, g.height), (box_width, box_height))
        else:
            # Never larger than the source, never outside the box.
            self.assertLessEqual(g.width, width)
            self.assertLessEqual(g.height, height)
            self.assertLessEqual(g.width, box_width or width)
            self.assertLessEqual(g.height, box_height or height)
        if not (both and fit == "fill"):
            # The aspect ratio of what is kept: one side follows from the other
            # to within a pixel (rounding, and never less than one pixel).
            kept = g.crop_width / g.crop_height
            self.assertTrue(
                abs(g.width - g.height * kept) <= 1 or abs(g.height - g.width / kept) <= 1,
                (g, kept),
            )

    def test_swapped_exchanges_the_axes(self) -> None:
        g = Geometry(400, 300, 300, 300, 100, 100).swapped()
        self.assertEqual(g, Geometry(300, 400, 300, 300, 100, 100))


class FitTests(SynchronousTestCase):
    """Exact output sizes and what lands in them."""

    def setUp(self) -> None:
        # 300x100: red, green and blue thirds.
        self.source = images.encode(
            images.stripes(300, 100, (images.RED, images.GREEN, images.BLUE)), "PNG"
        )

    def transform(self, **fields: object) -> tuple[TransformedImage, Image.Image]:
        result = transform_image(self.source, spec(**fields), LIMITS)
        output = images.decode(result.body)
        self.assertEqual(output.size, (result.width, result.height))
        return result, output.convert("RGB")

    def test_contain_keeps_everything_inside_the_box(self) -> None:
        _, out = self.transform(width=150, height=150, fit="contain")
        self.assertEqual(out.size, (150, 50))
        self.assertTrue(close(out.getpixel((5, 25)), images.RED))
        self.assertTrue(close(out.getpixel((144, 25)), images.BLUE))

    def test_cover_fills_the_box_with_the_centre(self) -> None:
        _, out = self.transform(width=50, height=50, fit="cover")
        self.assertEqual(out.size, (50, 50))
        for xy in ((2, 2), (47, 47), (25, 25)):
            self.assertTrue(close(out.getpixel(xy), images.GREEN), xy)

    def test_fill_stretches_to_the_box(self) -> None:
        _, out = self.transform(width=90, height=120, fit="fill")
        self.assertEqual(out.size, (90, 120))
        self.assertTrue(close(out.getpixel((5, 110)), images.RED))
        self.assertTrue(close(out.getpixel((45, 5)), images.GREEN))
        self.assertTrue(close(out.getpixel((85, 60)), images.BLUE))

    def test_cover_upscales_when_both_sides_are_given(self) -> None:
        _, out = self.transform(width=600, height=400, fit="cover")
        self.assertEqual(out.size, (600, 400))

    def test_width_alone_keeps_the_aspect_ratio(self) -> None:
        _, out = self.transform(width=60)
        self.assertEqual(out.size, (60, 20))

    def test_height_alone_keeps_the_aspect_ratio(self) -> None:
        _, out = self.transform(height=10, fit="cover")
        self.assertEqual(out.size, (30, 10))

    def test_no_upscale_with_contain_or_a_single_side(self) -> None:
        for fields in (
            {"width": 900, "height": 900},
            {"width": 900},
            {"height": 200, "fit": "fill"},
        ):
            result, out = self.transform(**fields)
            self.assertEqual(out.size, (300, 100), fields)
            self.assertEqual((result.width, result.height), (300, 100))

    def test_no_parameters_keep_the_size_and_the_format(self) -> None:
        result, out = self.transform()
        self.assertEqual(out.size, (300, 100))
        self.assertEqual((result.output_format, result.content_type), ("png", "image/png"))


class DraftedJpegFitTests(SynchronousTestCase):
    """The same fits from a JPEG large enough to be decoded at 1/2..1/8 scale."""

    def setUp(self) -> None:
        thirds = images.stripes(2400, 800, (images.RED, images.GREEN, images.BLUE))
        self.source = images.encode(thirds, "JPEG", quality=95)

    def transform(self, **fields: object) -> Image.Image:
        result = transform_image(self.source, spec(**fields), LIMITS)
        output = images.decode(result.body)
        self.assertEqual(output.size, (result.width, result.height))
        return output

    def test_contain(self) -> None:
        out = self.transform(width=150, height=150)
        self.assertEqual(out.size, (150, 50))
        self.assertTrue(close(out.getpixel((5, 25)), images.RED))
        self.assertTrue(close(out.getpixel((75, 25)), images.GREEN))
        self.assertTrue(close(out.getpixel((144, 25)), images.BLUE))

    def test_cover_crops_the_centre_of_the_drafted_image(self) -> None:
        out = self.transform(width=50, height=50, fit="cover")
        self.assertEqual(out.size, (50, 50))
        for xy in ((1, 1), (48, 48), (25, 25)):
            self.assertTrue(close(out.getpixel(xy), images.GREEN), xy)

    def test_fill(self) -> None:
        out = self.transform(width=90, height=120, fit="fill")
        self.assertEqual(out.size, (90, 120))
        self.assertTrue(close(out.getpixel((5, 110)), images.RED))
        self.assertTrue(close(out.getpixel((85, 60)), images.BLUE))

    def test_one_side(self) -> None:
        self.assertEqual(self.transform(width=61).size, (61, 20))
        self.assertEqual(self.transform(height=7).size, (21, 7))


class FormatTests(SynchronousTestCase):
    """Each output format, from each kind of source."""

    def test_every_output_format_round_trips(self) -> None:
        source = images.encode(images.photo(200, 150), "PNG")
        pillow_names = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF", "avif": "AVIF"}
        for fmt, pillow_name in pillow_names.items():
            result = transform_image(source, spec(width=100, output_format=fmt), LIMITS)
            out = images.decode(result.body)
            self.assertEqual(out.format, pillow_name)
            self.assertEqual(out.size, (100, 75), fmt)
            self.assertEqual(result.output_format, fmt)
            self.assertEqual(result.content_type, f"image/{fmt}")

    def test_every_source_mode_converts_to_every_output_format(self) -> None:
        photo = images.photo(32, 24)
        sources = {
            "1 (png)": images.encode(photo.convert("1"), "PNG"),
            "L (jpeg)": images.encode(photo.convert("L"), "JPEG"),
            "LA (png)": images.encode(photo.convert("LA"), "PNG"),
            "P (gif)": images.encode(photo.convert("P"), "GIF"),
            "RGB (webp)": images.encode(photo, "WEBP"),
            "RGBA (avif)": images.encode(photo.convert("RGBA"), "AVIF", speed=10),
            "CMYK (jpeg)": images.encode(photo.convert("CMYK"), "JPEG"),
            "I;16 (png)": images.png_16bit(32, 24),
        }
        for name, source in sources.items():
            for fmt in ("jpeg", "png", "webp", "gif", "avif"):
                result = transform_image(source, spec(width=16, output_format=fmt), LIMITS)
                out = images.decode(result.body)
                self.assertEqual((out.format.lower(), out.size), (fmt, (16, 12)), (name, fmt))

    def test_an_alpha_channel_no_pixel_uses_is_dropped(self) -> None:
        opaque = images.encode(images.photo(64, 48).convert("RGBA"), "PNG")
        opaque_grey = images.encode(images.photo(64, 48).convert("LA"), "PNG")
        for source, fmt, mode in (
            (opaque, "png", "RGB"), (opaque, "webp", "RGB"), (opaque, "avif", "RGB"),
            (opaque_grey, "png", "L"),
        ):
            result = transform_image(source, spec(width=32, output_format=fmt), LIMITS)
            self.assertEqual(images.decode(result.body).mode, mode, fmt)

    def test_an_alpha_channel_some_pixel_uses_is_kept(self) -> None:
        for fmt in ("png", "webp", "avif"):
            result = transform_image(images.rgba_png(60, 40), spec(output_format=fmt), LIMITS)
            out = images.decode(result.body).convert("RGBA")
            self.assertEqual(out.getpixel((5, 5))[3], 0, fmt)
            self.assertEqual(out.getpixel((55, 5))[3], 255, fmt)

    def test_an_mpo_is_shown_as_its_first_image(self) -> None:
        left, right = images.stripes(40, 30, (images.RED,)), images.stripes(40, 30, (images.BLUE,))
        source = images.encode(left, "MPO", save_all=True, append_images=[right])
        self.assertEqual(probe_source(source, LIMITS), SourceInfo("jpeg", 40, 30, 1, "image/jpeg"))
        out = images.decode(transform_image(source, spec(width=20), LIMITS).body)
        self.assertEqual((out.format, out.size), ("JPEG", (20, 15)))
        self.assertTrue(close(out.getpixel((10, 7)), images.RED))

    def test_default_output_is_the_source_format(self) -> None:
        for pillow_name, fmt in (
            ("JPEG", "jpeg"),
            ("WEBP", "webp"),
            ("GIF", "gif"),
            ("AVIF", "avif"),
        ):
            source = images.encode(images.photo(64, 48), pillow_name)
            result = transform_image(source, spec(width=32), LIMITS)
            self.assertEqual(result.output_format, fmt)
            self.assertEqual(images.decode(result.body).format, pillow_name)

    def test_jpeg_output_is_progressive(self) -> None:
        source = images.encode(images.photo(), "PNG")
        out = images.decode(transform_image(source, spec(output_format="jpeg"), LIMITS).body)
        self.assertTrue(out.info.get("progressive") or out.info.get("progression"))

    def test_quality_affects_the_size_of_lossy_formats(self) -> None:
        source = images.encode(images.photo(), "PNG")
        for fmt in ("jpeg", "webp", "avif"):
            low = transform_image(source, spec(output_format=fmt, quality=20), LIMITS)
            high = transform_image(source, spec(output_format=fmt, quality=95), LIMITS)
            self.assertLess(len(low.body) * 1.5, len(high.body), fmt)

    def test_q_is_a_jpeg_quality_for_avif_too(self) -> None:
        # libavif's scale is finer than a JPEG's: its 63 matches a JPEG's 80
        # (bench/avif_quality.py), and q=80 must not make AVIF the largest format.
        self.assertEqual(avif_quality(80), 63)
        self.assertEqual((avif_quality(1), avif_quality(100)), (1, 100))
        qualities = [avif_quality(q) for q in range(1, 101)]
        self.assertEqual(qualities, sorted(qualities))
        source = images.encode(images.photo(), "PNG")
        sizes = {
            fmt: len(transform_image(source, spec(output_format=fmt, quality=80), LIMITS).body)
            for fmt in ("jpeg", "webp", "avif")
        }
        self.assertLess(sizes["avif"], sizes["jpeg"], sizes)

    def test_rgba_to_jpeg_is_composited_on_white(self) -> None:
        result = transform_image(images.rgba_png(), spec(output_format="jpeg"), LIMITS)
        out = images.decode(result.body)
        self.assertEqual(out.mode, "RGB")
        self.assertTrue(close(out.getpixel((5, 20)), (255, 255, 255), 8))
        self.assertTrue(close(out.getpixel((55, 20)), images.BLUE))

    def test_rgba_keeps_its_alpha_in_webp_and_avif(self) -> None:
        for fmt in ("webp", "avif", "png"):
            result = transform_image(images.rgba_png(), spec(width=30, output_format=fmt), LIMITS)
            out = images.decode(result.body).convert("RGBA")
            self.assertEqual(out.getpixel((2, 10))[3], 0, fmt)
            self.assertGreater(out.getpixel((28, 10))[3], 240, fmt)

    def test_palette_png_keeps_its_transparency(self) -> None:
        source = images.palette_png_with_transparency()
        for fields, mode in (
            ({}, "P"),
            ({"output_format": "gif"}, "P"),
            ({"width": 30, "output_format": "gif"}, "P"),
            ({"width": 30}, "RGBA"),
        ):
            out = images.decode(transform_image(source, spec(**fields), LIMITS).body)
            self.assertEqual(out.mode, mode, fields)
            rgba = out.convert("RGBA")
            self.assertEqual(rgba.getpixel((1, 1))[3], 0, fields)
            self.assertEqual(rgba.getpixel((rgba.width - 2, 1)), (255, 0, 0, 255), fields)

    def test_palette_alpha_table_keeps_its_transparency_in_every_format(self) -> None:
        source = images.palette_png_with_alpha_table()
        for fields in (
            {},
            {"width": 15},
            {"output_format": "gif"},
            {"width": 15, "output_format": "gif"},
            {"output_format": "webp"},
        ):
            out = images.decode(transform_image(source, spec(**fields), LIMITS).body)
            rgba = out.convert("RGBA")
            self.assertEqual(rgba.getpixel((1, 1))[3], 0, fields)
            self.assertEqual(rgba.getpixel((rgba.width - 1, 1))[3], 255, fields)

    def test_palette_png_to_webp_keeps_its_transparency(self) -> None:
        source = images.palette_png_with_transparency()
        out = images.decode(transform_image(source, spec(output_format="webp"), LIMITS).body)
        rgba = out.convert("RGBA")
        self.assertEqual(rgba.getpixel((1, 1))[3], 0)
        self.assertTrue(close(rgba.getpixel((58, 1)), (255, 0, 0, 255)))

    def test_16_bit_png_is_scaled_to_8_bits(self) -> None:
        for fmt in ("png", "jpeg", "webp"):
            result = transform_image(images.png_16bit(), spec(width=32, output_format=fmt), LIMITS)
            out = images.decode(result.body).convert("L")
            # 0x8000 is mid grey, not clipped to white.
            self.assertTrue(close((out.getpixel((4, 8)),), (128,), 6), fmt)
            self.assertTrue(close((out.getpixel((30, 8)),), (255,), 6), fmt)

    def test_cmyk_jpeg_becomes_rgb(self) -> None:
        result = transform_image(images.cmyk_jpeg(), spec(width=32), LIMITS)
        out = images.decode(result.body)
        self.assertEqual(out.mode, "RGB")
        self.assertTrue(close(out.getpixel((3, 10)), (0, 255, 255), 50))
        self.assertTrue(close(out.getpixel((29, 10)), (255, 255, 255), 20))

    def test_cmyk_jpeg_with_an_unusable_profile_still_converts(self) -> None:
        bogus = bytes(16) + b"CMYK" + bytes(108)
        result = transform_image(images.cmyk_jpeg(icc_profile=bogus), spec(), LIMITS)
        out = images.decode(result.body)
        self.assertEqual(out.mode, "RGB")
        self.assertNotIn("icc_profile", out.info)


class MetadataTests(SynchronousTestCase):
    """EXIF orientation applied, then every metadata but the colour profile dropped."""

    def test_orientation_6_is_rotated_upright(self) -> None:
        # Stored 200x100, red left, blue right; orientation 6 shows it turned
        # clockwise: 100x200, red on top.
        result = transform_image(images.jpeg_with_orientation(6), spec(), LIMITS)
        out = images.decode(result.body)
        self.assertEqual(out.size, (100, 200))
        self.assertEqual((result.width, result.height), (100, 200))
        self.assertTrue(close(out.getpixel((50, 20)), images.RED))
        self.assertTrue(close(out.getpixel((50, 180)), images.BLUE))

    def test_the_box_applies_to_the_displayed_orientation(self) -> None:
        result = transform_image(images.jpeg_with_orientation(6), spec(width=50), LIMITS)
        self.assertEqual(images.decode(result.body).size, (50, 100))
        result = transform_image(
            images.jpeg_with_orientation(6), spec(width=80, height=80, fit="cover"), LIMITS
        )
        out = images.decode(result.body)
        self.assertEqual(out.size, (80, 80))
        self.assertTrue(close(out.getpixel((40, 5)), images.RED))
        self.assertTrue(close(out.getpixel((40, 75)), images.BLUE))

    def test_every_orientation_comes_out_upright(self) -> None:
        # Orientation -> where the stored left (red) half ends up when shown.
        red_at = {
            1: "left",
            2: "right",
            3: "right",
            4: "left",
            5: "top",
            6: "top",
            7: "bottom",
            8: "bottom",
        }
        probes = {"left": (5, 50), "right": (195, 50), "top": (50, 5), "bottom": (50, 195)}
        for orientation, side in red_at.items():
            out = images.decode(
                transform_image(images.jpeg_with_orientation(orientation), spec(), LIMITS).body
            )
            self.assertTrue(close(out.getpixel(probes[side]), images.RED), orientation)

    def test_orientation_is_read_from_every_source_format(self) -> None:
        for pillow_format in ("JPEG", "PNG", "WEBP", "AVIF"):
            source = images.oriented(pillow_format, 6)
            out = images.decode(transform_image(source, spec(output_format="png"), LIMITS).body)
            self.assertEqual(out.size, (100, 200), pillow_format)
            self.assertTrue(close(out.getpixel((50, 5)), images.RED), pillow_format)

    def test_broken_exif_shows_the_image_as_stored(self) -> None:
        image = images.stripes(20, 10, (images.RED, images.BLUE))
        for exif in (b"Exif\x00\x00MM\x00*\x00\x00\xff\xff", b"Exif\x00\x00II*\x00", b"junk"):
            source = images.encode(image, "JPEG", exif=exif)
            # Pillow's JPEG parser itself warns about the EXIF (for its DPI): just noise.
            with warnings.catch_warnings(record=True):
                result = transform_image(source, spec(), LIMITS)
            self.assertEqual((result.width, result.height), (20, 10))

    def test_no_exif_or_xmp_survives(self) -> None:
        for fmt in ("jpeg", "png", "webp", "avif"):
            body = transform_image(
                images.jpeg_with_orientation(6), spec(width=40, output_format=fmt), LIMITS
            ).body
            out = images.decode(body)
            self.assertEqual(dict(out.getexif()), {}, fmt)
            self.assertNotIn(b"imgproxy test camera", body, fmt)
            self.assertNotIn(b"ns.adobe.com/xap", body, fmt)

    def test_the_icc_profile_is_kept(self) -> None:
        profile = images.srgb_profile()
        source = images.encode(images.photo(120, 90), "JPEG", icc_profile=profile)
        for fmt in ("jpeg", "png", "webp", "avif"):
            result = transform_image(source, spec(width=60, output_format=fmt), LIMITS)
            self.assertEqual(images.decode(result.body).info.get("icc_profile"), profile, fmt)

    def test_a_grey_profile_is_not_attached_to_colour_output(self) -> None:
        grey_profile = bytes(16) + b"GRAY" + bytes(108)
        source = images.encode(Image.new("L", (20, 20), 100), "PNG", icc_profile=grey_profile)
        kept = images.decode(transform_image(source, spec(), LIMITS).body)
        self.assertEqual(kept.info.get("icc_profile"), grey_profile)
        dropped = images.decode(transform_image(source, spec(output_format="webp"), LIMITS).body)
        self.assertNotIn("icc_profile", dropped.info)


class ColourTests(SynchronousTestCase):
    """An output that cannot carry the source's profile gets its pixels in sRGB instead."""

    P3_RED = (200, 50, 50)

    def p3_source(self, fmt: str = "PNG", mode: str = "RGB") -> bytes:
        image = Image.new("RGB", (40, 30), self.P3_RED)
        if mode == "RGBA":
            image.putalpha(Image.linear_gradient("L").resize((40, 30)))
        return images.encode(image, fmt, icc_profile=images.rgb_profile())

    def test_a_display_p3_photo_as_gif_is_converted_to_srgb(self) -> None:
        expected = images.in_srgb(Image.new("RGB", (1, 1), self.P3_RED), images.rgb_profile())
        for source in (self.p3_source(), self.p3_source("JPEG")):
            out = images.decode(transform_image(source, spec(output_format="gif"), LIMITS).body)
            self.assertNotIn("icc_profile", out.info)
            self.assertTrue(close(out.convert("RGB").getpixel((20, 15)),
                                  expected.getpixel((0, 0)), tolerance=6))

    def test_transparency_survives_the_conversion(self) -> None:
        out = images.decode(
            transform_image(self.p3_source(mode="RGBA"), spec(output_format="gif"), LIMITS).body
        ).convert("RGBA")
        self.assertEqual(out.getpixel((20, 0))[3], 0)
        self.assertEqual(out.getpixel((20, 29))[3], 255)

    def test_an_rgb_profile_travels_with_every_other_format(self) -> None:
        for fmt in ("jpeg", "png", "webp", "avif"):
            body = transform_image(self.p3_source(), spec(output_format=fmt), LIMITS).body
            out = images.decode(body)
            self.assertEqual(out.info.get("icc_profile"), images.rgb_profile(), fmt)
            self.assertTrue(close(out.convert("RGB").getpixel((20, 15)), self.P3_RED, 6), fmt)

    def test_grey_with_a_grey_profile_becomes_srgb_where_grey_cannot_stay(self) -> None:
        # Linear-light grey 128 is sRGB 188: sent raw, it would look far too dark.
        profile = images.grey_profile(gamma=1.0)
        for source_format in ("JPEG", "PNG"):
            source = images.encode(Image.new("L", (40, 30), 128), source_format,
                                   icc_profile=profile)
            for fmt in ("webp", "avif", "gif"):
                out = images.decode(transform_image(source, spec(output_format=fmt), LIMITS).body)
                self.assertNotIn("icc_profile", out.info, fmt)
                self.assertTrue(
                    close(out.convert("RGB").getpixel((20, 15)), (188, 188, 188), 4), fmt
                )
            for fmt in ("jpeg", "png"):
                out = images.decode(transform_image(source, spec(output_format=fmt), LIMITS).body)
                self.assertEqual((out.mode, out.info.get("icc_profile")), ("L", profile), fmt)
                self.assertTrue(close((out.getpixel((20, 15)),), (128,), 2), fmt)

    def test_grey_with_alpha_keeps_its_alpha_when_converted(self) -> None:
        image = Image.new("LA", (40, 30), (128, 255))
        image.paste((128, 0), (0, 0, 20, 30))
        source = images.encode(image, "PNG", icc_profile=images.grey_profile())
        out = images.decode(transform_image(source, spec(output_format="webp"), LIMITS).body)
        self.assertEqual(out.mode, "RGBA")
        self.assertEqual(out.getpixel((5, 15))[3], 0)
        self.assertTrue(close(out.getpixel((30, 15)), (188, 188, 188, 255), 4))

    def test_an_unreadable_profile_leaves_the_pixels_as_they_are(self) -> None:
        broken = bytes(16) + b"RGB " + bytes(108)
        source = images.encode(Image.new("RGB", (40, 30), self.P3_RED), "PNG",
                               icc_profile=broken)
        out = images.decode(transform_image(source, spec(output_format="gif"), LIMITS).body)
        self.assertTrue(close(out.convert("RGB").getpixel((20, 15)), self.P3_RED, 6))


class SixteenBitTests(SynchronousTestCase):
    def test_a_16_bit_grey_transparent_value_is_one_sample_not_256(self) -> None:
        ramp = Image.new("I;16", (256, 1))
        ramp.putdata([i * 257 for i in range(256)])
        source = images.encode(ramp, "PNG", transparency=100 * 257)
        out = images.decode(transform_image(source, spec(output_format="png"), LIMITS).body)
        alpha = [out.convert("LA").getpixel((x, 0))[1] for x in range(256)]
        self.assertEqual([x for x, a in enumerate(alpha) if a == 0], [100])
        # As JPEG, the transparent sample is flattened on white, like any alpha.
        out = images.decode(transform_image(source, spec(output_format="jpeg"), LIMITS).body)
        self.assertGreater(out.convert("L").getpixel((100, 0)), 200)


class GifTransparencyTests(SynchronousTestCase):
    def test_gif_alpha_is_cut_at_half(self) -> None:
        # GIF has one transparent index: what was mostly transparent must not
        # come out solid (resampled edges would grow a halo of ghost lines).
        image = Image.new("RGBA", (256, 4), images.BLUE + (255,))
        image.putalpha(Image.linear_gradient("L").rotate(90, expand=True).resize((256, 4)))
        ramp = [image.getpixel((x, 0))[3] for x in range(256)]
        source = images.encode(image, "PNG")
        out = images.decode(transform_image(source, spec(output_format="gif"), LIMITS).body)
        alpha = [out.convert("RGBA").getpixel((x, 0))[3] for x in range(256)]
        self.assertEqual(alpha, [255 if a >= 128 else 0 for a in ramp])

    def test_a_resized_transparent_shape_does_not_grow(self) -> None:
        image = Image.new("RGBA", (200, 200), (0, 0, 0, 0))
        image.paste(images.RED + (255,), (50, 50, 150, 150))
        source = images.encode(image, "PNG")
        out = images.decode(transform_image(source, spec(width=97, output_format="gif"),
                                            LIMITS).body)
        opaque = sum(out.convert("RGBA").getchannel("A").histogram()[1:])
        # The square covers a quarter of the 97x97 output: about 48.5 squared.
        self.assertLess(abs(opaque - 48.5 * 48.5), 2 * 97)


class AnimationTests(SynchronousTestCase):
    def test_animated_gif_stays_animated_as_gif_webp_and_avif(self) -> None:
        for fmt in ("gif", "webp", "avif"):
            result = transform_image(
                images.animated_gif(3), spec(width=40, output_format=fmt), LIMITS
            )
            out = images.decode(result.body)
            self.assertEqual(out.n_frames, 3, fmt)
            self.assertEqual(out.size, (40, 30), fmt)
            if fmt != "avif":  # Pillow neither writes nor reads an AVIF repetition count
                self.assertEqual(out.info.get("loop"), 0, fmt)
            for index, colour in enumerate(images.ANIMATION_COLOURS[:3]):
                out.seek(index)
                self.assertTrue(close(out.convert("RGB").getpixel((35, 25)), colour), (fmt, index))
                self.assertEqual(out.info.get("duration"), 70, (fmt, index))

    def test_short_gif_delays_are_written_as_browsers_play_them(self) -> None:
        # Browsers play a GIF delay of 0 or 10 ms as 100 ms; WebP and AVIF frames
        # play as long as they say, so a converted GIF would race through its frames.
        frames = images.animation_frames(4, 32, 24)
        source = images.encode(
            frames[0], "GIF", save_all=True, append_images=frames[1:], duration=[0, 10, 20, 0]
        )
        for fmt, expected in (("webp", [100, 100, 20, 100]), ("avif", [100, 100, 20, 100]),
                              ("gif", [0, 10, 20, 0])):
            result = transform_image(source, spec(width=16, output_format=fmt), LIMITS)
            self.assertEqual(frame_durations(result.body), expected, fmt)

    def test_frame_timings_survive_from_every_animated_format(self) -> None:
        timings = [50, 100, 200, 400]
        frames = images.animation_frames(4, 32, 24)
        sources = {
            fmt: images.encode(
                frames[0], fmt.upper(), save_all=True, append_images=frames[1:], duration=timings
            )
            for fmt in ("gif", "webp", "avif")
        }
        for source_format, source in sources.items():
            for fmt in ("gif", "webp", "avif"):
                result = transform_image(source, spec(width=16, output_format=fmt), LIMITS)
                self.assertEqual(frame_durations(result.body), timings, (source_format, fmt))

    def test_an_animation_that_plays_once_still_plays_once(self) -> None:
        frames = images.animation_frames(2, 20, 20)
        source = images.encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
        self.assertNotIn("loop", images.decode(source).info)
        gif = images.decode(transform_image(source, spec(), LIMITS).body)
        self.assertEqual((gif.n_frames, gif.info.get("loop")), (2, None))
        webp = images.decode(transform_image(source, spec(output_format="webp"), LIMITS).body)
        self.assertEqual((webp.n_frames, webp.info.get("loop")), (2, 1))

    def test_the_play_count_survives_from_every_animated_format_to_every_other(self) -> None:
        frames = images.animation_frames(2, 20, 20)

        def animation(fmt: str, **options: object) -> bytes:
            return images.encode(frames[0], fmt, save_all=True, append_images=frames[1:],
                                 duration=100, **options)

        # Each format counts its own way (a GIF counts repeats, the others plays):
        # (source, plays in all, 0 for ever).
        sources = [
            (animation("GIF"), 1),
            (animation("GIF", loop=0), 0),
            (animation("GIF", loop=2), 3),
            (animation("WEBP", loop=0), 0),
            (animation("WEBP", loop=1), 1),
            (animation("WEBP", loop=4), 4),
            (animation("PNG", loop=0), 0),
            (animation("PNG", loop=1), 1),
            (animation("PNG", loop=5), 5),
            (animation("AVIF"), 0),  # libavif's default: for ever
            (avif.finish_sequence(animation("AVIF"), 3), 3),
            (avif.finish_sequence(animation("AVIF"), 1), 1),
        ]
        for source, plays in sources:
            self.assertEqual(images.plays(source), plays)
            for fmt in ("gif", "webp", "avif", "png"):
                if fmt == "png" and sniff_format(source) != "png":
                    continue
                body = transform_image(source, spec(width=10, output_format=fmt), LIMITS).body
                self.assertEqual(images.decode(body).n_frames, 2, (sniff_format(source), fmt))
                self.assertEqual(images.plays(body), plays, (sniff_format(source), plays, fmt))

    def test_an_avif_sequence_carries_no_wall_clock(self) -> None:
        # libavif stamps the encoding time into three headers: the same frames
        # would give other bytes (and another ETag) one second later.
        raw = images.animated_avif_headers(images.encode(
            images.animation_frames(2, 20, 20)[0], "AVIF", save_all=True,
            append_images=images.animation_frames(2, 20, 20)[1:], duration=100))
        self.assertNotEqual({times for _, times in raw}, {bytes(16)})
        body = transform_image(images.animated_gif(2), spec(output_format="avif"), LIMITS).body
        headers = images.animated_avif_headers(body)
        # One track for the colour, one for the alpha.
        self.assertEqual([kind for kind, _ in headers], [b"mvhd"] + [b"tkhd", b"mdhd"] * 2)
        self.assertEqual({times for _, times in headers}, {bytes(16)})

    def test_an_animated_png_stays_animated_as_png(self) -> None:
        frames = images.animation_frames(3, 40, 30)
        source = images.encode(frames[0], "PNG", save_all=True, append_images=frames[1:],
                               duration=[40, 80, 120], loop=0)
        out = images.decode(transform_image(source, spec(width=20), LIMITS).body)
        self.assertEqual((out.format, out.n_frames, out.size), ("PNG", 3, (20, 15)))
        seen = []
        for index, colour in enumerate(images.ANIMATION_COLOURS[:3]):
            out.seek(index)
            seen.append(out.info.get("duration"))
            self.assertTrue(close(out.convert("RGB").getpixel((17, 12)), colour), index)
        self.assertEqual(seen, [40, 80, 120])

    def test_a_transparent_margin_stays_transparent_in_an_animated_webp(self) -> None:
        # Every frame transparent around an opaque middle: the encoder crops the
        # margin away, and the file must still say the canvas has alpha.
        frames = []
        for colour in images.ANIMATION_COLOURS[:3]:
            frame = Image.new("RGBA", (60, 60), (0, 0, 0, 0))
            frame.paste(colour + (255,), (10, 10, 50, 50))
            frames.append(frame)
        source = images.encode(frames[0], "GIF", save_all=True, append_images=frames[1:],
                               duration=100, loop=0, disposal=2)
        out = images.decode(transform_image(source, spec(output_format="webp"), LIMITS).body)
        for index in range(3):
            out.seek(index)
            rgba = out.convert("RGBA")
            self.assertEqual(rgba.getpixel((2, 2))[3], 0, index)
            self.assertEqual(rgba.getpixel((30, 30))[3], 255, index)

    def test_animated_webp_stays_animated(self) -> None:
        result = transform_image(images.animated_webp(4), spec(height=30), LIMITS)
        out = images.decode(result.body)
        self.assertEqual((out.format, out.n_frames, out.size), ("WEBP", 4, (40, 30)))

    def test_animation_to_a_still_format_is_its_first_frame(self) -> None:
        for fmt in ("jpeg", "png"):
            result = transform_image(
                images.animated_gif(3), spec(width=40, output_format=fmt), LIMITS
            )
            out = images.decode(result.body)
            self.assertEqual(getattr(out, "n_frames", 1), 1, fmt)
            self.assertTrue(close(out.convert("RGB").getpixel((35, 25)), images.RED), fmt)

    def test_probe_counts_frames(self) -> None:
        info = probe_source(images.animated_gif(5), LIMITS)
        self.assertEqual(info, SourceInfo("gif", 80, 60, 5, "image/gif"))

    def test_too_many_frames_is_413(self) -> None:
        limits = TransformLimits(max_frames=4)
        for source in (images.animated_gif(5), images.animated_webp(5)):
            with self.assertRaises(ProxyError) as caught:
                transform_image(source, spec(width=10), limits)
            self.assertEqual(caught.exception.status, 413)
            self.assertIn("frames", caught.exception.reason)

    def test_too_many_pixels_in_all_frames_is_413(self) -> None:
        # Each 100x100 frame is within the limit; five of them are over 4x it.
        limits = TransformLimits(max_pixels=10_000)
        with self.assertRaises(ProxyError) as caught:
            transform_image(images.animated_gif(5, 100, 100), spec(width=10), limits)
        self.assertEqual(caught.exception.status, 413)
        result = transform_image(images.animated_gif(4, 100, 100), spec(width=10), limits)
        self.assertEqual(images.decode(result.body).n_frames, 4)

    def test_a_still_of_a_long_animation_is_not_held_to_the_frame_limits(self) -> None:
        # Only the first frame is decoded for a still, as thumbor and imgproxy do.
        limits = TransformLimits(max_pixels=10_000, max_frames=4)
        long_animation = images.animated_gif(6, 100, 100)
        self.assertEqual(probe_source(long_animation, limits).frames, 6)
        for fmt in ("jpeg", "png"):
            result = transform_image(long_animation, spec(width=10, output_format=fmt), limits)
            out = images.decode(result.body)
            self.assertEqual((out.format.lower(), getattr(out, "n_frames", 1)), (fmt, 1))


class LimitTests(SynchronousTestCase):
    def test_probe_describes_a_still(self) -> None:
        source = images.encode(images.photo(64, 48), "JPEG")
        self.assertEqual(probe_source(source, LIMITS), SourceInfo("jpeg", 64, 48, 1, "image/jpeg"))

    def test_a_png_header_claiming_50000x50000_is_413_before_decoding(self) -> None:
        bomb = images.png_claiming(50_000, 50_000)
        self.assertLess(len(bomb), 200)
        for call in (
            probe_source,
            lambda data, limits: transform_image(data, spec(width=10), limits),
        ):
            with self.assertRaises(ProxyError) as caught:
                call(bomb, LIMITS)
            self.assertEqual(caught.exception.status, 413)
            self.assertIn("50000x50000", caught.exception.reason)

    def test_jpeg_and_avif_headers_over_the_limit_are_413_without_pillow_warnings(self) -> None:
        for bomb in (images.jpeg_claiming(20_000, 5_000), images.avif_claiming(20_000, 5_000)):
            with warnings.catch_warnings():
                # Pillow's bomb guard would warn above 89M pixels: ours must speak first.
                warnings.simplefilter("error")
                with self.assertRaises(ProxyError) as caught:
                    transform_image(bomb, spec(width=10), LIMITS)
            self.assertEqual(caught.exception.status, 413)
            self.assertIn("20000x5000", caught.exception.reason)

    def test_header_sizes_are_read_right_in_every_variant(self) -> None:
        # The size is read by hand before Pillow sees the data; it must agree
        # with Pillow for each way these formats store it.
        image = images.photo(123, 45)
        rgba = image.convert("RGBA")
        exif = Image.Exif()
        exif[0x010F] = "a camera maker with a long name" * 20
        sources = {
            "baseline jpeg": images.encode(image, "JPEG"),
            "progressive jpeg": images.encode(image, "JPEG", progressive=True),
            "jpeg with exif and icc": images.encode(
                image, "JPEG", exif=exif.tobytes(), icc_profile=images.srgb_profile()
            ),
            "png": images.encode(image, "PNG"),
            "gif": images.encode(image, "GIF"),
            "lossy webp (VP8)": images.encode(image, "WEBP"),
            "lossless webp (VP8L)": images.encode(image, "WEBP", lossless=True),
            "webp with alpha (VP8X)": images.encode(rgba, "WEBP"),
            "avif": images.encode(image, "AVIF", speed=10),
        }
        for name, source in sources.items():
            fmt = sniff_format(source)
            self.assertEqual(_header_size(fmt, source), (123, 45), name)
            with self.assertRaises(ProxyError, msg=name) as caught:
                probe_source(source, TransformLimits(max_pixels=123 * 45 - 1))
            self.assertIn("123x45", caught.exception.reason, name)

    def test_a_webp_canvas_over_the_limit_is_413(self) -> None:
        with self.assertRaises(ProxyError) as caught:
            probe_source(images.webp_claiming(16_000, 16_000), LIMITS)
        self.assertEqual(caught.exception.status, 413)

    def test_the_limit_is_configurable(self) -> None:
        source = images.encode(images.photo(100, 100), "JPEG")
        probe_source(source, TransformLimits(max_pixels=10_000))
        with self.assertRaises(ProxyError) as caught:
            probe_source(source, TransformLimits(max_pixels=9_999))
        self.assertEqual(caught.exception.status, 413)

    def test_a_still_output_may_upscale_to_the_whole_parameter_range(self) -> None:
        # The pixel limit is the source's: w and h up to 8192 are valid (contract).
        source = images.encode(images.photo(10, 10), "PNG")
        limits = TransformLimits(max_pixels=500_000)
        result = transform_image(source, spec(width=800, height=700, fit="fill"), limits)
        self.assertEqual((result.width, result.height), (800, 700))
        largest = spec(width=8192, height=8192, fit="cover", output_format="jpeg")
        result = transform_image(source, largest, limits)
        self.assertEqual((result.width, result.height), (8192, 8192))
        self.assertEqual(images.decode(result.body).size, (8192, 8192))

    def test_an_upscaled_animation_over_the_budget_is_400(self) -> None:
        # Five frames of 300x300 are over 4 x 100_000 pixels; one is not.
        source = images.animated_gif(5, 20, 20)
        limits = TransformLimits(max_pixels=100_000)
        big = spec(width=300, height=300, fit="cover")
        with self.assertRaises(ProxyError) as caught:
            transform_image(source, big, limits)
        self.assertEqual(caught.exception.status, 400)
        still = transform_image(source, attrs.evolve(big, output_format="png"), limits)
        self.assertEqual((still.width, still.height), (300, 300))

    def test_a_limit_above_pillows_own_is_honoured(self) -> None:
        # Pillow refuses more than twice its MAX_IMAGE_PIXELS by itself; a PNG
        # this size under a larger configured limit is decoded (and found truncated).
        self.addCleanup(setattr, Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
        bomb = images.png_claiming(20_000, 10_000)
        with self.assertRaises(ProxyError) as caught:
            probe_source(bomb, TransformLimits(max_pixels=50_000_000))
        self.assertEqual(caught.exception.status, 413)
        info = probe_source(bomb, TransformLimits(max_pixels=400_000_000))
        self.assertEqual((info.width, info.height), (20_000, 10_000))


class BadInputTests(SynchronousTestCase):
    def assertStatus(self, data: bytes, *statuses: int) -> ProxyError:
        with self.assertRaises(ProxyError) as caught:
            transform_image(data, spec(width=10), LIMITS)
        self.assertIn(caught.exception.status, statuses)
        self.assertTrue(caught.exception.reason)
        return caught.exception

    def test_empty_body_is_415(self) -> None:
        self.assertIn("empty", self.assertStatus(b"", 415).reason)

    def test_html_is_415(self) -> None:
        error = self.assertStatus(b"\n<!doctype html><html><body>Not found</body></html>", 415)
        self.assertIn("HTML", error.reason)

    def test_svg_bmp_and_tiff_are_415(self) -> None:
        svg = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>'
        self.assertIn("SVG", self.assertStatus(svg, 415).reason)
        small = images.photo(8, 8)
        self.assertIn("BMP", self.assertStatus(images.encode(small, "BMP"), 415).reason)
        self.assertIn("TIFF", self.assertStatus(images.encode(small, "TIFF"), 415).reason)

    def test_heic_like_iso_media_is_415(self) -> None:
        self.assertStatus(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", 415)

    def test_the_content_is_judged_not_its_name(self) -> None:
        # PNG bytes are a PNG whatever the origin claimed.
        source = images.encode(images.photo(20, 20), "PNG")
        self.assertEqual(probe_source(source, LIMITS).format, "png")

    def test_truncated_jpeg_is_502(self) -> None:
        source = images.encode(images.photo(), "JPEG")
        self.assertIn("truncated", self.assertStatus(source[: len(source) // 2], 502).reason)

    def test_truncated_headers_are_refused(self) -> None:
        for source in (
            images.encode(images.photo(), "JPEG"),
            images.rgba_png(),
            images.animated_gif(),
        ):
            for length in (3, 10, 30, 100):
                self.assertStatus(source[:length], 415, 502)

    def test_truncated_png_gif_and_webp_are_502(self) -> None:
        for source in (
            images.encode(images.photo(), "PNG"),
            images.animated_gif(),
            images.encode(images.photo(), "WEBP"),
        ):
            self.assertStatus(source[: len(source) * 2 // 3], 502)


def _mutated(source: bytes, seed: int, flips: int) -> bytes:
    rng = random.Random(seed)
    data = bytearray(source)
    for _ in range(flips):
        operation = rng.randrange(4)
        where = rng.randrange(len(data))
        if operation == 0:
            data[where] = rng.randrange(256)
        elif operation == 1:
            del data[where:]
        elif operation == 2:
            data[where:where] = rng.randbytes(rng.randrange(1, 8))
        else:
            del data[where : where + rng.randrange(1, 16)]
        if not data:
            break
    return bytes(data)


_SEEDS = {
    "jpeg": images.encode(images.photo(24, 16), "JPEG", quality=50),
    "progressive jpeg": images.encode(images.photo(24, 16), "JPEG", progressive=True),
    "png": images.rgba_png(24, 16),
    "palette png": images.palette_png_with_transparency(24, 16),
    "gif": images.animated_gif(3, 24, 16),
    "webp": images.animated_webp(2, 24, 16),
    "avif": images.encode(images.photo(24, 16), "AVIF", speed=10),
}
_FUZZ_LIMITS = TransformLimits(max_pixels=200_000, max_frames=10)
_FUZZ_SPECS = st.builds(
    TransformSpec,
    url=st.just(URL),
    width=st.one_of(st.none(), st.integers(1, 40)),
    height=st.one_of(st.none(), st.integers(1, 40)),
    fit=st.sampled_from(("contain", "cover", "fill")),
    output_format=st.sampled_from((None, "jpeg", "png", "webp", "gif")),
)


class JpegVariantTests(SynchronousTestCase):
    """JPEG coding processes Pillow's libjpeg does not decode are a 415, not a "corrupt" 502."""

    def with_frame_header(self, marker: int, precision: int) -> bytes:
        source = bytearray(images.encode(images.photo(64, 48), "JPEG"))
        start = source.index(b"\xff\xc0")
        source[start + 1] = marker
        source[start + 4] = precision
        return bytes(source)

    def test_arithmetic_coding_is_415(self) -> None:
        for marker in (0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            with self.assertRaises(ProxyError) as caught:
                transform_image(self.with_frame_header(marker, 8), spec(width=10), LIMITS)
            self.assertEqual(caught.exception.status, 415, hex(marker))
            self.assertIn("arithmetic", caught.exception.reason)

    def test_more_than_8_bits_is_415(self) -> None:
        for marker, precision in ((0xC1, 12), (0xC3, 16)):
            with self.assertRaises(ProxyError) as caught:
                probe_source(self.with_frame_header(marker, precision), LIMITS)
            self.assertEqual(caught.exception.status, 415)
            self.assertIn(f"{precision}-bit", caught.exception.reason)

    def test_a_lossless_jpeg_is_marked_to_decode_at_full_scale(self) -> None:
        # libjpeg cannot draft one: decoded at 1/2..1/8 scale it fails.
        self.assertTrue(probe_source(self.with_frame_header(0xC3, 8), LIMITS).full_scale_only)
        self.assertFalse(probe_source(self.with_frame_header(0xC0, 8), LIMITS).full_scale_only)

    def test_extended_huffman_8_bit_is_decoded(self) -> None:
        result = transform_image(self.with_frame_header(0xC1, 8), spec(width=10), LIMITS)
        self.assertEqual((result.width, result.height), (10, 8))


class HostileInputTests(SynchronousTestCase):
    """Whatever the bytes, the only exception is a ProxyError."""

    def check(self, data: bytes, transform_spec: TransformSpec) -> None:
        try:
            result = transform_image(data, transform_spec, _FUZZ_LIMITS)
        except ProxyError as e:
            self.assertIn(e.status, (413, 415, 502))
        else:
            self.assertTrue(result.body)

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
    @given(data=st.binary(max_size=512), transform_spec=_FUZZ_SPECS)
    def test_random_bytes(self, data: bytes, transform_spec: TransformSpec) -> None:
        self.check(data, transform_spec)

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        prefix=st.sampled_from(
            (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"RIFF\0\0\0\0WEBP")
        ),
        rest=st.binary(max_size=256),
        transform_spec=_FUZZ_SPECS,
    )
    def test_random_bytes_behind_valid_magic(
        self, prefix: bytes, rest: bytes, transform_spec: TransformSpec
    ) -> None:
        self.check(prefix + rest, transform_spec)

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        name=st.sampled_from(sorted(_SEEDS)),
        seed=st.integers(0, 2**32),
        flips=st.integers(1, 6),
        transform_spec=_FUZZ_SPECS,
    )
    def test_mutated_valid_images(
        self, name: str, seed: int, flips: int, transform_spec: TransformSpec
    ) -> None:
        self.check(_mutated(_SEEDS[name], seed, flips), transform_spec)


class ConcurrencyTests(SynchronousTestCase):
    def test_parallel_transforms_equal_serial_ones(self) -> None:
        jobs = [
            (images.encode(images.photo(300, 200), "JPEG"), spec(width=120, output_format="webp")),
            (images.animated_gif(3), spec(width=40)),
            (images.rgba_png(), spec(width=20, height=20, fit="cover", output_format="jpeg")),
            (images.png_16bit(), spec(output_format="avif")),
        ] * 4
        serial = [transform_image(data, s, LIMITS).body for data, s in jobs]
        with ThreadPoolExecutor(max_workers=4) as pool:
            parallel = list(
                pool.map(lambda job: transform_image(job[0], job[1], LIMITS).body, jobs)
            )
        self.assertEqual(parallel, serial)
