"""Test images built in memory with Pillow: no binary fixtures in the tree."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image, ImageCms, ImageDraw

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    """``image`` saved as ``fmt`` (a Pillow format name) with ``options``."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def decode(data: bytes) -> Image.Image:
    """Open ``data`` with Pillow (for assertions on outputs)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def photo(width: int = 400, height: int = 300, mode: str = "RGB") -> Image.Image:
    """Smooth gradients with sharp lines and noise: detail for lossy codecs to spend bytes on."""
    gradient = Image.linear_gradient("L").resize((width, height))
    radial = Image.radial_gradient("L").resize((width, height))
    noise = Image.effect_noise((width, height), 48).convert("L")
    image = Image.merge("RGB", (gradient, radial, Image.blend(gradient, noise, 0.5)))
    draw = ImageDraw.Draw(image)
    for x in range(0, width, max(1, width // 12)):
        draw.line((x, 0, width - x, height), fill=(255, 255, 0), width=2)
    return image.convert(mode)


def stripes(width: int, height: int, colours: tuple[tuple[int, int, int], ...]) -> Image.Image:
    """Vertical bands of ``colours``, of equal width, left to right."""
    image = Image.new("RGB", (width, height))
    band = width // len(colours)
    for i, colour in enumerate(colours):
        image.paste(
            colour, (i * band, 0, width if i == len(colours) - 1 else (i + 1) * band, height)
        )
    return image


def srgb_profile() -> bytes:
    """An sRGB ICC profile, as bytes to embed."""
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


# Display P3's primaries, adapted to the ICC's D50 white (as in Apple's profile).
DISPLAY_P3_PRIMARIES = (
    (0.5151, 0.2412, -0.0011),
    (0.2920, 0.6922, 0.0419),
    (0.1571, 0.0666, 0.7841),
)
_D50 = (0.9642, 1.0, 0.8249)


def _s15f16(*values: float) -> bytes:
    return b"".join(struct.pack(">i", round(value * 65536)) for value in values)


def _icc(space: bytes, tags: list[tuple[bytes, bytes]]) -> bytes:
    """A version 2 display-class ICC profile of ``space`` with ``tags`` (signature, body)."""
    table_end = 128 + 4 + 12 * len(tags)
    entries, bodies = [], b""
    for signature, body in tags:
        offset = table_end + len(bodies)
        entries.append(struct.pack(">4sII", signature, offset, len(body)))
        bodies += body + bytes(-len(body) % 4)
    size = table_end + len(bodies)
    header = (
        struct.pack(">I4sI4s4s4s", size, b"lcms", 0x02100000, b"mntr", space, b"XYZ ")
        + bytes(12)  # date
        + b"acsp"
        + bytes(24)  # platform, flags, manufacturer, model, attributes
        + struct.pack(">I", 0)  # perceptual intent
        + _s15f16(*_D50)
        + bytes(4 + 16 + 28)  # creator, id, reserved
    )
    return header + struct.pack(">I", len(tags)) + b"".join(entries) + bodies


def _description(text: str) -> bytes:
    ascii_text = text.encode("ascii") + b"\x00"
    return (
        b"desc" + bytes(4) + struct.pack(">I", len(ascii_text)) + ascii_text
        + bytes(8)  # no Unicode description
        + bytes(3 + 67)  # no ScriptCode description
    )


def _gamma_curve(gamma: float) -> bytes:
    return b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256)) + bytes(2)


def _xyz(x: float, y: float, z: float) -> bytes:
    return b"XYZ " + bytes(4) + _s15f16(x, y, z)


def rgb_profile(
    description: str = "Test Display P3",
    primaries: tuple[tuple[float, float, float], ...] = DISPLAY_P3_PRIMARIES,
    gamma: float = 2.2,
) -> bytes:
    """A matrix/TRC RGB ICC profile with these D50-adapted primaries and one gamma."""
    curve = _gamma_curve(gamma)
    return _icc(
        b"RGB ",
        [
            (b"desc", _description(description)),
            (b"wtpt", _xyz(*_D50)),
            (b"rXYZ", _xyz(*primaries[0])),
            (b"gXYZ", _xyz(*primaries[1])),
            (b"bXYZ", _xyz(*primaries[2])),
            (b"rTRC", curve),
            (b"gTRC", curve),
            (b"bTRC", curve),
        ],
    )


def grey_profile(gamma: float = 1.0, description: str = "Test linear grey") -> bytes:
    """A grey ICC profile with one gamma curve (1.0: the samples are linear light)."""
    return _icc(
        b"GRAY",
        [
            (b"desc", _description(description)),
            (b"wtpt", _xyz(*_D50)),
            (b"kTRC", _gamma_curve(gamma)),
        ],
    )


def in_srgb(image: Image.Image, icc_profile: bytes) -> Image.Image:
    """What ``image``, whose pixels are in ``icc_profile``'s space, looks like in sRGB."""
    source = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
    converted = ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"),
                                          outputMode="RGB")
    assert converted is not None
    return converted


def jpeg_with_orientation(orientation: int, width: int = 200, height: int = 100) -> bytes:
    """A JPEG stored as left half red, right half blue, tagged with an EXIF
    ``orientation`` and carrying an XMP packet (both must not survive)."""
    image = stripes(width, height, (RED, BLUE))
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "imgproxy test camera"
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://ns.adobe.com/xap/1.0/"/></x:xmpmeta>'
    return encode(image, "JPEG", quality=95, exif=exif.tobytes(), xmp=xmp)


def cmyk_jpeg(width: int = 64, height: int = 48, icc_profile: bytes | None = None) -> bytes:
    """A CMYK JPEG: left half pure cyan ink, right half no ink (white)."""
    image = Image.new("CMYK", (width, height), (0, 0, 0, 0))
    image.paste((255, 0, 0, 0), (0, 0, width // 2, height))
    options = {"icc_profile": icc_profile} if icc_profile else {}
    return encode(image, "JPEG", quality=95, **options)


def png_16bit(width: int = 64, height: int = 32) -> bytes:
    """A 16-bit greyscale PNG: left half 0x8000 (mid grey), right half 0xFFFF (white)."""
    image = Image.new("I;16", (width, height), 0x8000)
    image.paste(0xFFFF, (width // 2, 0, width, height))
    return encode(image, "PNG")


def palette_png_with_transparency(width: int = 60, height: int = 40) -> bytes:
    """A palette PNG: transparent left half, opaque red right half."""
    image = Image.new("P", (width, height), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    image.paste(1, (width // 2, 0, width, height))
    return encode(image, "PNG", transparency=0)


def palette_png_with_alpha_table(width: int = 30, height: int = 10) -> bytes:
    """A palette PNG with per-entry alpha, in thirds: clear, half-clear red, opaque green."""
    image = Image.new("P", (width, height), 0)
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (253 * 3))
    image.paste(1, (width // 3, 0, 2 * width // 3, height))
    image.paste(2, (2 * width // 3, 0, width, height))
    return encode(image, "PNG", transparency=bytes([0, 128, 255]))


def rgba_png(width: int = 60, height: int = 40) -> bytes:
    """An RGBA PNG: fully transparent left half, opaque blue right half."""
    image = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    image.paste((0, 0, 255, 255), (width // 2, 0, width, height))
    return encode(image, "PNG")


ANIMATION_COLOURS = (RED, GREEN, BLUE, (255, 255, 0), (0, 255, 255), (255, 0, 255))


def animation_frames(count: int, width: int, height: int) -> list[Image.Image]:
    """``count`` frames, each a different solid colour with a white square."""
    frames = []
    for i in range(count):
        frame = Image.new("RGB", (width, height), ANIMATION_COLOURS[i % len(ANIMATION_COLOURS)])
        ImageDraw.Draw(frame).rectangle((i, i, i + width // 4, i + height // 4), fill="white")
        frames.append(frame)
    return frames


def animated_gif(count: int = 3, width: int = 80, height: int = 60, duration: int = 70) -> bytes:
    """An animated GIF of ``count`` distinct frames, looping forever."""
    frames = animation_frames(count, width, height)
    return encode(
        frames[0], "GIF", save_all=True, append_images=frames[1:], duration=duration, loop=0
    )


def animated_webp(count: int = 3, width: int = 80, height: int = 60, duration: int = 70) -> bytes:
    """An animated WebP of ``count`` distinct frames, looping forever."""
    frames = animation_frames(count, width, height)
    return encode(
        frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=duration, loop=0
    )


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_claiming(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG whose IHDR claims ``width`` x ``height`` (a pixel bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def webp_claiming(width: int, height: int) -> bytes:
    """A WebP whose VP8X chunk claims a ``width`` x ``height`` canvas."""
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00"
    vp8x += (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small baseline JPEG whose frame header (SOF0) claims ``width`` x ``height``."""
    data = bytearray(encode(Image.new("RGB", (16, 16), RED), "JPEG", quality=90))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def avif_claiming(width: int, height: int) -> bytes:
    """A small AVIF whose image spatial extents (ispe) claim ``width`` x ``height``."""
    data = bytearray(encode(Image.new("RGB", (16, 16), RED), "AVIF", speed=10))
    ispe = data.index(b"ispe")
    data[ispe + 8 : ispe + 16] = struct.pack(">II", width, height)
    return bytes(data)


def oriented(pillow_format: str, orientation: int, width: int = 200, height: int = 100) -> bytes:
    """Red-left, blue-right stripes saved as ``pillow_format`` with an EXIF ``orientation``."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stripes(width, height, (RED, BLUE)), pillow_format, exif=exif.tobytes())


def plays(data: bytes) -> int:
    """How many times an animation plays in all, 0 for ever, as browsers read each format."""
    from imgproxy.worker import avif

    if data[4:12] in (b"ftypavis", b"ftypavif"):
        return avif.plays(data)
    image = decode(data)
    count = image.info.get("loop")
    if image.format == "GIF":  # a count of repeats after the first play
        return 1 if count is None else (0 if count == 0 else count + 1)
    return count


def animated_avif_headers(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, creation and modification times) of an AVIF sequence's mvhd, tkhd and mdhd."""
    from imgproxy.worker import avif

    found = []

    def walk(start: int, end: int) -> None:
        for kind, body_start, body_end in avif.boxes(data, start, end):
            if kind in (b"moov", b"trak", b"mdia"):
                walk(body_start, body_end)
            elif kind in (b"mvhd", b"tkhd", b"mdhd"):
                width = 8 if data[body_start] == 1 else 4
                found.append((kind, data[body_start + 4 : body_start + 4 + 2 * width]))

    walk(0, len(data))
    return found
