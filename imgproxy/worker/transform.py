"""Source bytes in, transformed image bytes out: the Pillow core of the worker.

Pure and blocking: no I/O, no Twisted, no shared mutable state (but for
Pillow's bomb threshold, which is only ever raised to the configured limit),
so it runs on the worker's decoding thread pool.  Every failure an input can cause
is a ``ProxyError``: 415 for what is not a supported image, 413 for what is
too large to decode, 502 for what is broken.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Iterator
from contextlib import contextmanager

import attrs

# The plugins are imported explicitly so that they are registered before any
# worker thread opens an image: Pillow's lazy plugin loading is not thread-safe.
from PIL import (
    AvifImagePlugin,  # noqa: F401
    GifImagePlugin,  # noqa: F401
    Image,
    ImageCms,
    ImageMath,
    ImageSequence,
    JpegImagePlugin,  # noqa: F401
    PngImagePlugin,  # noqa: F401
    WebPImagePlugin,  # noqa: F401
)

from imgproxy.errors import ProxyError
from imgproxy.params import CONTENT_TYPES, TransformSpec
from imgproxy.worker import avif

#: Formats this module reads and writes, by the name the contract uses.
SUPPORTED_FORMATS = ("jpeg", "png", "webp", "gif", "avif")
#: Output formats that keep an animated source animated (PNG keeps only an animated PNG so).
ANIMATED_OUTPUTS = frozenset({"webp", "gif", "avif"})
#: An animation may decode at most this many times ``max_pixels``, all frames together.
FRAME_PIXEL_BUDGET = 4
#: GIF frame delays up to this (ms) are played as GIF_SHORT_DELAY_PLAYED_AS by browsers.
GIF_SHORT_DELAY = 10
GIF_SHORT_DELAY_PLAYED_AS = 100

# JPEGs decode through the DCT at 1/2..1/8 scale to no less than the target
# ("shrink on load", as libvips and thumbor do), then Lanczos with a reducing gap.
# Measured on a 5120x2880 JPEG to 320 px: against a full decode and a plain
# Lanczos this keeps ~37.5 dB PSNR; decoding to twice the target kept ~45.8 dB,
# but cost a third more CPU on baseline JPEGs (33 vs 24 ms a 2560x1600 photo,
# bench/results/proxy.md) and 2% more output bytes than thumbor at the same
# quality. Bicubic lost ~5 dB and was no faster; a gap of 3 is 6 dB better than
# 2 when nothing is drafted.
JPEG_DRAFT_FACTOR = 1.0
RESAMPLE = Image.Resampling.LANCZOS
REDUCING_GAP = 3.0

PNG_COMPRESS_LEVEL = 6
#: ``q`` is a JPEG's quality for every lossy output. WebP's encoder is on about
#: that scale; libavif's is finer (its 80 looks like a JPEG's 90, at about the
#: bytes of a JPEG's 80): these are the AVIF qualities whose luma PSNR equals a
#: JPEG's at each q, on the Plasma wallpaper photos at 640 px
#: (bench/avif_quality.py, BENCHMARKS.md).
AVIF_QUALITY_POINTS = (
    (0, 0), (30, 33), (50, 43), (60, 47), (70, 53), (80, 63), (85, 68), (90, 77), (95, 89),
    (100, 100),
)
WEBP_METHOD = 4
AVIF_SPEED = 8
# WebP keeps its play count in 16 bits (a GIF's 65535 repeats are one play more).
_MAX_WEBP_PLAYS = 0xFFFF
_WEBP_ALPHA_FLAG = 0x10

_PILLOW_FORMATS = {
    "jpeg": "JPEG",
    "png": "PNG",
    "webp": "WEBP",
    "gif": "GIF",
    "avif": "AVIF",
}

# What some common non-images look like, to say what was received instead.
_KNOWN_OTHERS = (
    (b"BM", "a BMP image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"\x00\x00\x01\x00", "an ICO image"),
    (b"%PDF", "a PDF document"),
    (b"8BPS", "a Photoshop document"),
    (b"\xff\x0a", "a JPEG XL image"),
    (b"\x00\x00\x00\x0cJXL ", "a JPEG XL image"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x1f\x8b", "a gzip archive"),
)

_UNSUPPORTED = "the source is not an image of a supported format (jpeg, png, webp, gif, avif)"
_CORRUPT = "the source image is truncated or corrupt"

# EXIF orientation -> the transpose that displays the stored pixels upright.
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = frozenset({5, 6, 7, 8})
# GIF's alpha is all or nothing: opaque from half up.
_HALF_ALPHA = [0] * 128 + [255] * 128
_EXIF_ORIENTATION_TAG = 0x0112


@attrs.frozen
class SourceInfo:
    """What a source image is, read from its header without decoding its pixels."""

    format: str
    width: int
    height: int
    frames: int
    content_type: str
    #: A lossless JPEG: libjpeg decodes it at full scale only, never drafted.
    full_scale_only: bool = False


@attrs.frozen
class TransformLimits:
    """How much a single source may cost to decode."""

    max_pixels: int = 50_000_000
    max_frames: int = 500


@attrs.frozen
class TransformedImage:
    """An encoded output image and what a response needs to describe it."""

    body: bytes
    output_format: str
    content_type: str
    width: int
    height: int


@attrs.frozen
class Geometry:
    """How one upright image becomes the output, in displayed orientation.

    The centred region ``crop_width`` x ``crop_height`` of the source (the
    whole of it except for ``cover``) is scaled to ``width`` x ``height``.
    """

    source_width: int
    source_height: int
    crop_width: float
    crop_height: float
    width: int
    height: int

    @property
    def is_identity(self) -> bool:
        return (self.crop_width, self.crop_height, self.width, self.height) == (
            self.source_width,
            self.source_height,
            self.source_width,
            self.source_height,
        )

    def swapped(self) -> Geometry:
        """The same geometry with the axes exchanged (for 90-degree EXIF orientations)."""
        return Geometry(
            source_width=self.source_height,
            source_height=self.source_width,
            crop_width=self.crop_height,
            crop_height=self.crop_width,
            width=self.height,
            height=self.width,
        )

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The crop region in an image of ``width`` x ``height`` (the source, maybe drafted)."""
        sx = width / self.source_width
        sy = height / self.source_height
        left = (self.source_width - self.crop_width) / 2 * sx
        top = (self.source_height - self.crop_height) / 2 * sy
        return (left, top, left + self.crop_width * sx, top + self.crop_height * sy)


def _round(value: float) -> int:
    return max(1, int(value + 0.5))


def output_geometry(
    width: int, height: int, box_width: int | None, box_height: int | None, fit: str
) -> Geometry:
    """The contract's ``w``/``h``/``fit`` rules for an upright ``width`` x ``height`` image.

    One of the box's sides alone keeps the aspect ratio; neither keeps the
    size; only ``cover`` and ``fill`` with both sides may upscale.
    """
    whole = Geometry(width, height, width, height, width, height)
    if box_width is None and box_height is None:
        return whole
    if box_width is None or box_height is None or fit == "contain":
        scale_x = box_width / width if box_width is not None else math.inf
        scale_y = box_height / height if box_height is not None else math.inf
        if min(scale_x, scale_y) >= 1:
            return whole
        if scale_x <= scale_y:
            assert box_width is not None
            size = (box_width, _round(height * scale_x))
        else:
            assert box_height is not None
            size = (_round(width * scale_y), box_height)
        return attrs.evolve(whole, width=size[0], height=size[1])
    if fit == "fill":
        return attrs.evolve(whole, width=box_width, height=box_height)
    # cover: scale so the box is filled, then keep its centre.
    scale = max(box_width / width, box_height / height)
    return Geometry(
        width,
        height,
        crop_width=min(width, box_width / scale),
        crop_height=min(height, box_height / scale),
        width=box_width,
        height=box_height,
    )


def sniff_format(data: bytes) -> str:
    """The format that ``data``'s magic bytes announce, or 415."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[4:8] == b"ftyp":
        if _isobmff_brands(data) & {b"avif", b"avis"}:
            return "avif"
        raise ProxyError(
            415, "the source is a HEIF or other ISO media file, not AVIF; " + _UNSUPPORTED
        )
    if not data:
        raise ProxyError(415, "the source is empty")
    for magic, what in _KNOWN_OTHERS:
        if data.startswith(magic):
            raise ProxyError(415, f"the source is {what}; {_UNSUPPORTED}")
    head = data[:256].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"<"):
        what = "an SVG image" if b"<svg" in data[:4096].lower() else "HTML or XML"
        raise ProxyError(415, f"the source is {what}; {_UNSUPPORTED}")
    raise ProxyError(415, _UNSUPPORTED)


def _isobmff_brands(data: bytes) -> set[bytes]:
    (box_size,) = struct.unpack(">I", data[:4])
    end = min(len(data), max(box_size, 16), 4096)
    brands = {data[8:12]}
    brands.update(data[i : i + 4] for i in range(16, end - 3, 4))
    return brands


def _header_size(fmt: str, data: bytes) -> tuple[int, int] | None:
    """The pixel size the header declares, read before any decoder sees the data.

    Pillow's own parsers would find it too, but its bomb guard warns on the
    way, and the WebP decoder allocates the canvas as soon as it is opened.
    ``None`` when the header is too broken to say; the decoder then fails.
    """
    if fmt == "png" and len(data) >= 24 and data[12:16] == b"IHDR":
        return struct.unpack(">II", data[16:24])
    if fmt == "gif" and len(data) >= 10:
        return struct.unpack("<HH", data[6:10])
    if fmt == "webp" and len(data) >= 30:
        return _webp_size(data)
    if fmt == "jpeg":
        return _jpeg_size(data)
    if fmt == "avif":
        return avif.still_size(data)
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    if chunk == b"VP8 ":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and data[20] == 0x2F:
        (bits,) = struct.unpack("<I", data[21:25])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


# Start-of-frame markers (every coding process; not DHT, JPG or DAC).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers that stand alone, without a length.
_JPEG_BARE = frozenset({0x01, *range(0xD0, 0xD9)})


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    frame = _jpeg_frame(data)
    return None if frame is None else (frame.width, frame.height)


@attrs.frozen
class _JpegFrame:
    """A JPEG's frame header: its coding process (the SOF marker), sample precision, size."""

    marker: int
    precision: int
    width: int
    height: int


# Coding processes: baseline, extended and progressive Huffman (what every JPEG in the
# wild is), lossless Huffman (decoded, but only at full scale); arithmetic coding and
# precisions other than 8 bits are not decoded by Pillow's libjpeg.
_JPEG_DECODED = frozenset({0xC0, 0xC1, 0xC2, 0xC3})
_JPEG_LOSSLESS = 0xC3


def _jpeg_frame(data: bytes) -> _JpegFrame | None:
    position = 2
    while position + 9 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
        elif marker in _JPEG_BARE:
            position += 2
        elif marker in _JPEG_SOF:
            precision, height, width = struct.unpack(">BHH", data[position + 4 : position + 9])
            return _JpegFrame(marker, precision, width, height)
        elif marker == 0xDA:  # start of scan: no frame header before it
            return None
        else:
            (length,) = struct.unpack(">H", data[position + 2 : position + 4])
            position += 2 + length
    return None


def _check_pixels(width: int, height: int, limits: TransformLimits) -> None:
    if width * height > limits.max_pixels:
        raise ProxyError(
            413,
            f"the source image is {width}x{height}, more than the limit of "
            f"{limits.max_pixels} pixels",
        )


def _check_frames(width: int, height: int, frames: int, limits: TransformLimits) -> None:
    if frames > limits.max_frames:
        raise ProxyError(
            413, f"the source image has {frames} frames, more than the limit of {limits.max_frames}"
        )
    budget = FRAME_PIXEL_BUDGET * limits.max_pixels
    if frames * width * height > budget:
        raise ProxyError(
            413,
            f"the source animation has {frames} frames of {width}x{height}, more than "
            f"the limit of {budget} pixels in all",
        )


def _follow_pillow_guard(limits: TransformLimits) -> None:
    # Pillow's own bomb guard is one process-wide threshold: it warns above
    # MAX_IMAGE_PIXELS and refuses above twice that.  It stays as a backstop
    # (GIF frames may grow the canvas while seeking, past our header check),
    # but never below our own limit, so an image we allow never warns.
    # Monotonic and idempotent, hence safe from several threads.
    current = Image.MAX_IMAGE_PIXELS
    if current is not None and current < limits.max_pixels:
        Image.MAX_IMAGE_PIXELS = limits.max_pixels


@contextmanager
def _mapped_errors() -> Iterator[None]:
    """Turn whatever Pillow or its codecs raise on bad input into a ``ProxyError``."""
    try:
        yield
    except ProxyError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ProxyError(413, "the source image has more pixels than allowed") from e
    except MemoryError as e:
        raise ProxyError(413, "the source image needs more memory to decode than allowed") from e
    except Exception as e:
        # Pillow's plugins raise OSError, SyntaxError, ValueError, EOFError,
        # struct.error, IndexError, KeyError, TypeError... on malformed input;
        # a broken file must be a 502, never a 500.  The cause stays chained.
        raise ProxyError(502, _CORRUPT) from e


def _open(data: bytes, fmt: str, limits: TransformLimits) -> tuple[Image.Image, SourceInfo]:
    # A JPEG's frame header is read once: its coding process, its size.
    frame = _jpeg_frame(data) if fmt == "jpeg" else None
    if frame is not None:
        _check_jpeg_process(frame)
    header_size = (frame.width, frame.height) if frame is not None else _header_size(fmt, data)
    if header_size is not None:
        _check_pixels(*header_size, limits)
    _follow_pillow_guard(limits)
    # Only the plugin the magic bytes chose may read it.
    image = Image.open(io.BytesIO(data), formats=[_PILLOW_FORMATS[fmt]])
    width, height = image.size
    _check_pixels(width, height, limits)
    # A JPEG with more frames is an MPO (stereo pairs, previews): show the first.
    # The frame limits apply only where the frames are kept (see _transform).
    frames = 1 if fmt == "jpeg" else int(getattr(image, "n_frames", 1))
    info = SourceInfo(
        format=fmt,
        width=width,
        height=height,
        frames=frames,
        content_type=CONTENT_TYPES[fmt],
        full_scale_only=frame is not None and frame.marker == _JPEG_LOSSLESS,
    )
    return image, info


def _check_jpeg_process(frame: _JpegFrame) -> None:
    if frame.marker not in _JPEG_DECODED:
        raise ProxyError(415, "the source is an arithmetic-coded JPEG, which is not supported")
    if frame.precision != 8:
        raise ProxyError(
            415, f"the source is a {frame.precision}-bit JPEG; only 8-bit JPEGs are supported"
        )


def probe_source(data: bytes, limits: TransformLimits) -> SourceInfo:
    """Identify a source by its magic bytes and check it against ``limits``.

    Reads headers only (and, for animations, the frame structure): 415 for
    what is not a supported image, 413 for a frame over the pixel limit.  The
    frame limits wait for a request that keeps the animation: a still of a
    long one is fine.
    """
    fmt = sniff_format(data)
    with _mapped_errors():
        _image, info = _open(data, fmt, limits)
    return info


def transform_image(data: bytes, spec: TransformSpec, limits: TransformLimits) -> TransformedImage:
    """Decode ``data``, apply ``spec``'s size, fit, format and quality, and encode.

    Thread-safe and pure: bytes in, bytes out.  The output is upright (EXIF
    orientation applied), carries the source's colour profile and no other
    metadata, and is animated when both the source and the format are.
    """
    fmt = sniff_format(data)
    out_format = spec.output_format or fmt
    if out_format not in SUPPORTED_FORMATS:
        raise ProxyError(400, f"output format {out_format!r} is not supported")
    with _mapped_errors():
        image, info = _open(data, fmt, limits)
        with image:
            geometry, body = _transform(image, info, spec, out_format, limits, data)
    return TransformedImage(
        body=body,
        output_format=out_format,
        content_type=CONTENT_TYPES[out_format],
        width=geometry.width,
        height=geometry.height,
    )


def _transform(
    image: Image.Image,
    info: SourceInfo,
    spec: TransformSpec,
    out_format: str,
    limits: TransformLimits,
    source: bytes,
) -> tuple[Geometry, bytes]:
    animated = info.frames > 1 and _keeps_animation(info.format, out_format)
    orientation = _orientation(image)
    width, height = info.width, info.height
    if orientation in _SWAPS_AXES:
        width, height = height, width
    if animated:
        # A still, even from a long animation, decodes one frame: no frame limit.
        _check_frames(info.width, info.height, info.frames, limits)
    geometry = output_geometry(width, height, spec.width, spec.height, spec.fit)
    _check_output(geometry, info.frames if animated else 1, limits)
    # Geometry in the stored orientation: the pixels are resized before they
    # are turned upright, which is cheaper on the smaller image.
    stored = geometry.swapped() if orientation in _SWAPS_AXES else geometry
    icc_profile = image.info.get("icc_profile") or None
    if animated:
        frames, durations = _render_animation(image, stored, orientation)
        if info.format == "gif" and out_format != "gif":
            durations = [_as_browsers_play_gif(duration) for duration in durations]
        play_count = _play_count(image, info.format, source)
    else:
        # A palette image that needs no resampling keeps its exact palette,
        # unless it is going to GIF with per-entry alpha (GIF has one
        # transparent index; Pillow's RGBA path picks it).  A resampled one
        # stays true colour: quantizing it back (without libimagequant)
        # blurs its alpha, opaque pixels included.
        keep_palette = image.mode == "P" and (
            out_format == "png"
            or (out_format == "gif" and not isinstance(image.info.get("transparency"), bytes))
        )
        drafts = info.format == "jpeg" and not info.full_scale_only
        frames = [_render_still(image, drafts, stored, orientation, keep_palette)]
        durations, play_count = [], 1
    return geometry, _encode(frames, durations, play_count, out_format, spec.quality, icc_profile)


def _keeps_animation(source_format: str, out_format: str) -> bool:
    # An animated PNG stays one as PNG; a GIF asked for as PNG becomes a still,
    # as with thumbor and imgproxy: few expect a .png to move.
    return out_format in ANIMATED_OUTPUTS or out_format == source_format == "png"


def _as_browsers_play_gif(duration: int) -> int:
    """A GIF frame's delay in milliseconds as browsers play it.

    Browsers (and most viewers) play a GIF delay of 0 or 10 ms as 100 ms. Not
    every WebP or AVIF player does the same for its own frames, so the delay is
    written as a GIF viewer shows it.
    """
    return GIF_SHORT_DELAY_PLAYED_AS if duration <= GIF_SHORT_DELAY else duration


def _play_count(image: Image.Image, source_format: str, source: bytes) -> int:
    """How many times the source animation plays in all; ``avif.FOREVER`` (0) for ever.

    Each format counts its own way: a GIF's NETSCAPE block counts repeats after
    the first play (none: it plays once), WebP and APNG count plays, and Pillow
    reads no count from AVIF.  Browsers read them so (Chromium's decoders).
    """
    if source_format == "avif":
        return avif.plays(source)
    count = image.info.get("loop")
    if source_format == "gif":
        if count is None:
            return 1
        return avif.FOREVER if count == 0 else int(count) + 1
    return avif.FOREVER if count is None else int(count)


def _check_output(geometry: Geometry, frames: int, limits: TransformLimits) -> None:
    # A still output may be anything the parameters allow (8192x8192 at most, as
    # the contract's range says, thumbor and imgproxy too). cover and fill may
    # upscale every frame of an animation though: all frames together are held to
    # the same budget as the source's.
    if frames <= 1:
        return
    pixels = geometry.width * geometry.height
    budget = FRAME_PIXEL_BUDGET * limits.max_pixels
    if frames * pixels > budget:
        raise ProxyError(
            400,
            f"the requested output, {frames} frames of {geometry.width}x{geometry.height}, "
            f"is more than the limit of {budget} pixels in all",
        )


def _orientation(image: Image.Image) -> int:
    exif = image.info.get("exif")
    return _exif_orientation(exif) if isinstance(exif, bytes) else 1


def _exif_orientation(exif: bytes) -> int:
    """The orientation tag of IFD0, or 1 (as stored) when absent or unreadable.

    Read by hand: Pillow's EXIF parser warns on every corrupt tag (and on PNG
    decodes the whole image first), while only one short is needed here.
    """
    if exif.startswith(b"Exif\x00\x00"):
        exif = exif[6:]
    byte_order = {b"II*\x00": "<", b"MM\x00*": ">"}.get(exif[:4])
    if byte_order is None:
        return 1
    try:
        (ifd,) = struct.unpack_from(byte_order + "I", exif, 4)
        (count,) = struct.unpack_from(byte_order + "H", exif, ifd)
        for index in range(count):
            tag, kind, number = struct.unpack_from(byte_order + "HHI", exif, ifd + 2 + 12 * index)
            if tag == _EXIF_ORIENTATION_TAG:
                if kind != 3 or number != 1:  # one SHORT
                    return 1
                (value,) = struct.unpack_from(byte_order + "H", exif, ifd + 2 + 12 * index + 8)
                return value if value in _ORIENTATION_TRANSPOSE else 1
    except struct.error:
        return 1
    return 1


def _render_still(
    image: Image.Image, drafts: bool, stored: Geometry, orientation: int, keep_palette: bool
) -> Image.Image:
    if stored.is_identity and keep_palette:
        # Nothing to resample: the palette (and its transparency) stays exact.
        image.load()
        return _upright(image, orientation)
    if drafts and not stored.is_identity:
        # Decode through the DCT at 1/2, 1/4 or 1/8 scale, to no less than
        # JPEG_DRAFT_FACTOR times what the resampling below needs.
        need_x = stored.source_width * stored.width / stored.crop_width
        need_y = stored.source_height * stored.height / stored.crop_height
        image.draft(
            None,
            (math.ceil(need_x * JPEG_DRAFT_FACTOR), math.ceil(need_y * JPEG_DRAFT_FACTOR)),
        )
    return _render_frame(image, stored, orientation)


def _render_frame(image: Image.Image, stored: Geometry, orientation: int) -> Image.Image:
    frame = _working_mode(image)
    if not stored.is_identity:
        frame = frame.resize(
            (stored.width, stored.height),
            RESAMPLE,
            box=stored.crop_box(*frame.size),
            reducing_gap=REDUCING_GAP,
        )
    return _upright(frame, orientation)


def _upright(image: Image.Image, orientation: int) -> Image.Image:
    method = _ORIENTATION_TRANSPOSE.get(orientation)
    return image if method is None else image.transpose(method)


def _render_animation(
    image: Image.Image, stored: Geometry, orientation: int
) -> tuple[list[Image.Image], list[int]]:
    frames = []
    durations = []
    # One decoded frame at a time (Pillow composes each onto the previous);
    # only the resized frames are kept, within the budget checked above.
    for frame in ImageSequence.Iterator(image):
        if frame.size != (stored.source_width, stored.source_height):
            # A GIF frame may grow the canvas past what the header said.
            raise ProxyError(413, "a frame of the source animation is larger than its canvas")
        rgba = frame.convert("RGBA")
        # WebP and AVIF set a frame's duration only once it is decoded.
        durations.append(int(round(frame.info.get("duration", 0) or 0)))
        frames.append(_render_frame(rgba, stored, orientation))
    return frames, durations


def _working_mode(image: Image.Image) -> Image.Image:
    """The image in a mode that resamples well: L, LA, RGB, RGBA or CMYK."""
    mode = image.mode
    if mode in ("L", "RGB") and "transparency" in image.info:
        return image.convert("LA" if mode == "L" else "RGBA")
    if mode in ("L", "LA", "RGB", "RGBA", "CMYK"):
        return image
    if mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        # 16-bit samples to 8: scale, as convert("L") would clip at 255.
        samples = image.convert("I")
        grey = samples.point(lambda v: v * (1 / 256)).convert("L")
        key = image.info.get("transparency")
        if isinstance(key, int):
            # The transparent value is one 16-bit sample: matched before scaling,
            # or the 255 others that share its top byte would vanish with it.
            alpha = ImageMath.lambda_eval(lambda a: abs(a["s"] - key) * 255, s=samples)
            return Image.merge("LA", (grey, alpha.convert("L")))
        return grey
    if mode == "1":
        return image.convert("L")
    if mode == "La":
        return image.convert("LA")
    return image.convert("RGBA" if image.has_transparency_data else "RGB")


def _on_white(image: Image.Image) -> Image.Image:
    """Composite an image with alpha onto white, for formats without alpha."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    background.alpha_composite(rgba)
    return background.convert("L" if image.mode in ("LA", "La") else "RGB")


def _cmyk_to_rgb(image: Image.Image, icc_profile: bytes | None) -> Image.Image:
    if icc_profile and _icc_colour_space(icc_profile) == b"CMYK":
        transform = _srgb_transform(icc_profile, "CMYK", "RGB")
        if transform is not None:
            return transform.apply(image)
    return image.convert("RGB")


def _srgb_transform(
    icc_profile: bytes, in_mode: str, out_mode: str
) -> ImageCms.ImageCmsTransform | None:
    """LittleCMS from the embedded profile to sRGB; ``None`` if it cannot read the profile."""
    try:
        return ImageCms.buildTransform(
            ImageCms.ImageCmsProfile(io.BytesIO(icc_profile)),
            ImageCms.createProfile("sRGB"),
            in_mode,
            out_mode,
        )
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None


def _icc_colour_space(icc_profile: bytes) -> bytes:
    return icc_profile[16:20]


def _output_mode(image: Image.Image, out_format: str, icc_profile: bytes | None) -> Image.Image:
    mode = image.mode
    if mode == "CMYK":
        image, mode = _cmyk_to_rgb(image, icc_profile), "RGB"
    if out_format == "jpeg":
        if mode == "P":
            image = image.convert("RGBA" if image.has_transparency_data else "RGB")
            mode = image.mode
        if mode in ("LA", "RGBA"):
            return _on_white(image)
        return image
    if out_format in ("webp", "avif"):
        if mode in ("L", "P"):
            return image.convert("RGBA" if image.has_transparency_data else "RGB")
        if mode == "LA":
            return image.convert("RGBA")
        return image
    if out_format == "gif":
        if mode == "LA":
            image, mode = image.convert("RGBA"), "RGBA"
        if mode == "RGBA":
            return _binary_alpha(image)
        if mode == "RGB":
            # Fast octree: ~50x quicker than Pillow's default median cut for
            # GIF, within a few dB.  (RGBA goes to Pillow, which uses it too
            # and keeps the transparent index.)
            return image.quantize(256, method=Image.Quantize.FASTOCTREE)
    return image


def _binary_alpha(image: Image.Image) -> Image.Image:
    """RGBA with every alpha cut to 0 or 255 at half, for GIF's one transparent index.

    Pillow's GIF writer makes only alpha 0 transparent: the faint fringe that
    resampling leaves around every edge would come out solid, as a halo of
    ghost lines.  Browsers and libvips cut at half too.
    """
    red, green, blue, alpha = image.split()
    return Image.merge("RGBA", (red, green, blue, alpha.point(_HALF_ALPHA)))


def _output_keeps_profile(out_format: str, mode: str, icc_profile: bytes) -> bool:
    """Whether the output can carry the source's profile beside pixels in its space."""
    if out_format == "gif":  # Pillow writes no ICC into a GIF
        return False
    if _icc_colour_space(icc_profile) == b"GRAY":
        # WebP and AVIF have no grey mode: the pixels become RGB.
        return out_format in ("jpeg", "png") and mode in ("L", "LA")
    return True


def _to_srgb(frames: list[Image.Image], icc_profile: bytes) -> list[Image.Image]:
    """The frames' pixels taken from the profile's colour space to sRGB.

    For an output that cannot carry the profile: sent without it, the raw
    values of a Display P3 photo look washed out and those of a grey profile
    too dark or too light.  Frames the profile does not describe, or a profile
    LittleCMS cannot read, go out as they are.
    """
    space = _icc_colour_space(icc_profile)
    mode = frames[0].mode
    if space == b"GRAY" and mode in ("L", "LA"):
        in_mode, out_mode = "L", "RGB"
    elif space == b"RGB " and mode in ("RGB", "RGBA", "P"):
        # LittleCMS carries RGBA's alpha through untouched.
        in_mode = out_mode = "RGBA" if frames[0].has_transparency_data else "RGB"
    else:
        return frames
    transform = _srgb_transform(icc_profile, in_mode, out_mode)
    if transform is None:
        return frames
    return [_apply_profile(frame, in_mode, transform) for frame in frames]


def _apply_profile(
    frame: Image.Image, in_mode: str, transform: ImageCms.ImageCmsTransform
) -> Image.Image:
    converted = transform.apply(frame if frame.mode == in_mode else frame.convert(in_mode))
    if frame.mode == "LA":  # grey with alpha: the grey becomes RGB, the alpha stays
        converted.putalpha(frame.getchannel("A"))
    return converted


def _profile_fits(icc_profile: bytes | None, image: Image.Image) -> bytes | None:
    """The profile, if it describes the output's colour space; otherwise none."""
    if not icc_profile:
        return None
    space = _icc_colour_space(icc_profile)
    if image.mode in ("RGB", "RGBA", "P") and space == b"RGB ":
        return icc_profile
    if image.mode in ("L", "LA") and space == b"GRAY":
        return icc_profile
    return None


def _clean(image: Image.Image) -> Image.Image:
    # Savers fall back on image.info for EXIF, XMP, text chunks and more:
    # keep only what the pixels need.
    kept = {"transparency": image.info["transparency"]} if "transparency" in image.info else {}
    image.info = kept
    return image


def _encode(
    frames: list[Image.Image],
    durations: list[int],
    play_count: int,
    out_format: str,
    quality: int,
    icc_profile: bytes | None,
) -> bytes:
    cmyk_source = frames[0].mode == "CMYK"
    if (
        icc_profile
        and not cmyk_source
        and not _output_keeps_profile(out_format, frames[0].mode, icc_profile)
    ):
        frames = _to_srgb(frames, icc_profile)
    outputs = [_clean(_output_mode(frame, out_format, icc_profile)) for frame in frames]
    if len(outputs) == 1 and out_format in ("png", "webp", "avif"):
        outputs[0] = _without_opaque_alpha(outputs[0])
    first = outputs[0]
    # A CMYK profile does not describe the RGB that replaced it.
    profile = None if cmyk_source else _profile_fits(icc_profile, first)
    options: dict[str, object] = {}
    if profile is not None and out_format != "gif":
        options["icc_profile"] = profile
    if out_format == "jpeg":
        options.update(quality=quality, optimize=True, progressive=True)
    elif out_format == "png":
        options.update(optimize=False, compress_level=PNG_COMPRESS_LEVEL)
    elif out_format == "webp":
        options.update(quality=quality, method=WEBP_METHOD)
    elif out_format == "avif":
        options.update(quality=avif_quality(quality), speed=AVIF_SPEED)
    if len(outputs) > 1:
        options.update(save_all=True, append_images=outputs[1:], duration=durations)
        if out_format == "gif":
            # Whole frames with alpha: clear each before the next is drawn.
            options["disposal"] = 2
            # A count of repeats; none (no NETSCAPE block) means "play once".
            if play_count != 1:
                options["loop"] = min(play_count - 1, 0xFFFF) if play_count else 0
        elif out_format == "webp":
            options["loop"] = min(play_count, _MAX_WEBP_PLAYS)
        elif out_format == "png":
            options["loop"] = play_count
    buffer = io.BytesIO()
    first.save(buffer, _PILLOW_FORMATS[out_format], **options)
    if out_format == "avif" and len(outputs) > 1:
        return avif.finish_sequence(buffer.getvalue(), play_count)
    if out_format == "webp" and len(outputs) > 1 and any(_translucent(f) for f in outputs):
        return _mark_webp_alpha(buffer.getvalue())
    return buffer.getvalue()


def avif_quality(quality: int) -> int:
    """The AVIF encoder quality that looks like a JPEG at ``quality`` (1..100)."""
    points = AVIF_QUALITY_POINTS
    for (q0, a0), (q1, a1) in zip(points, points[1:], strict=False):
        if quality <= q1:
            return round(a0 + (a1 - a0) * (quality - q0) / (q1 - q0))
    return points[-1][1]


def _without_opaque_alpha(image: Image.Image) -> Image.Image:
    """The image without its alpha channel if every pixel is opaque.

    Sources often carry an alpha channel they never use; left in, it costs a
    PNG a tenth more bytes (the WebP and AVIF encoders drop it themselves).
    """
    if image.mode in ("RGBA", "LA") and image.getchannel("A").getextrema()[0] == 255:
        return image.convert("RGB" if image.mode == "RGBA" else "L")
    return image


def _translucent(frame: Image.Image) -> bool:
    return frame.mode == "RGBA" and frame.getextrema()[3][0] < 255


def _mark_webp_alpha(data: bytes) -> bytes:
    """An animated WebP with VP8X's alpha flag set.

    libwebp's animation encoder crops each frame to what changed and sets the
    flag only when a cropped frame has alpha; a sticker whose margin is
    transparent in every frame then has none, and decoders show the margin
    black.  The flag says the canvas may be transparent, which it is.
    """
    if data[12:16] != b"VP8X":
        return data
    flags = data[20] | _WEBP_ALPHA_FLAG
    return data[:20] + bytes([flags]) + data[21:]
