"""The attackers' origin: hostile behaviours and hostile images, on loopback only.

Builds on ``tests.origins`` (a twisted.web origin with endless, drip, redirect,
truncate and reset behaviours) and adds what the hostile tests need:

- ``HostileOrigin.start(reactor, interface)``: an origin with named behaviours
  (``silent``, ``drip_forever``, ``stall``, ``oversized``, ``redirect_loop``,
  ``lying_types``...) that each return the path to request;
- image builders, all made in memory: ``bomb_png`` (a header claiming
  50,000 x 50,000 pixels over a real, partial zlib stream), ``many_frames_gif``,
  ``truncated_jpeg``, ``cmyk_jpeg``, ``png_16bit_rgb``, ``palette_png_with_transparency``,
  ``exif_rotated_jpeg``, ``noise_png``, and ``HTML``.

Every listener binds a 127.0.0.0/8 address or ``::1``; nothing here resolves or
connects anywhere else.
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from typing import Any

import attrs
from PIL import Image
from twisted.internet import tcp
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from tests.origins import Origin, Stream, _Leaf, start_origin

RED = (255, 0, 0)
BLUE = (0, 0, 255)

HTML = (
    b"<!doctype html>\n<html><head><title>not an image</title></head>"
    b"<body><img src=cat.png></body></html>\n"
)


# --- images -------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    """``image`` saved as Pillow format ``fmt``."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def decode(data: bytes) -> Image.Image:
    """``data`` opened and loaded by Pillow (for checking outputs)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def png_from_rows(
    width: int, height: int, bit_depth: int, colour_type: int, idat: bytes
) -> bytes:
    """A PNG with that IHDR and one IDAT chunk of ``idat`` (already compressed)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def bomb_png(side: int = 50_000, rows: int = 400) -> bytes:
    """A decompression bomb: an RGB PNG claiming ``side`` x ``side`` pixels.

    Its IDAT really is zlib-compressed image data (the first ``rows`` rows of
    black, about 1000:1), so a decoder that trusted the header would allocate
    ``side * side * 3`` bytes (7.5 GB for 50,000) before finding the rest missing.
    """
    row = b"\x00" * (1 + side * 3)
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(row) for _ in range(rows)]
    parts.append(compressor.flush(zlib.Z_SYNC_FLUSH))  # no end of stream: "more to come"
    return png_from_rows(side, side, 8, 2, b"".join(parts))


def many_frames_gif(frames: int = 3000) -> bytes:
    """A valid animated GIF of ``frames`` 1x1 frames, written by hand.

    (Pillow would merge identical frames, so it cannot write this.)
    """
    header = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0)  # 2-colour global table
    palette = bytes([0, 0, 0, 255, 255, 255])
    loop = b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    # One pixel of colour 0: LZW minimum code size 2 -> clear (4), 0, end (5) in 3-bit codes.
    pixel = b"\x02\x02\x44\x01\x00"
    frame = (
        b"\x21\xf9\x04\x00\x0a\x00\x00\x00"  # graphic control: 100 ms
        + b"\x2c"
        + struct.pack("<HHHHB", 0, 0, 1, 1, 0)
        + pixel
    )
    return header + palette + loop + frame * frames + b"\x3b"


def stripes(width: int, height: int, left: tuple[int, ...], right: tuple[int, ...]) -> Image.Image:
    """An RGB image: the left half ``left``, the right half ``right``."""
    image = Image.new("RGB", (width, height), left)
    image.paste(right, (width // 2, 0, width, height))
    return image


def truncated_jpeg() -> bytes:
    """The first half of a 200x150 baseline JPEG."""
    whole = encode(noise_image(200, 150, seed=7), "JPEG", quality=90)
    return whole[: len(whole) // 2]


def garbage_after_magic() -> bytes:
    """PNG magic bytes followed by noise: looks like an image for eight bytes."""
    return b"\x89PNG\r\n\x1a\n" + random.Random(3).randbytes(2000)


def cmyk_jpeg(width: int = 64, height: int = 48) -> bytes:
    """A CMYK JPEG: left half full cyan ink, right half full magenta + yellow (red)."""
    image = Image.new("CMYK", (width, height), (255, 0, 0, 0))
    image.paste((0, 255, 255, 0), (width // 2, 0, width, height))
    return encode(image, "JPEG", quality=95)


def png_16bit_rgb(width: int = 64, height: int = 32) -> bytes:
    """A 16-bit-per-channel RGB PNG, written by hand: left half red, right half blue."""
    red = struct.pack(">HHH", 0xFFFF, 0, 0)
    blue = struct.pack(">HHH", 0, 0, 0xFFFF)
    row = b"\x00" + red * (width // 2) + blue * (width - width // 2)
    return png_from_rows(width, height, 16, 2, zlib.compress(row * height))


def palette_png_with_transparency(width: int = 60, height: int = 40) -> bytes:
    """A palette PNG with a tRNS chunk: left half transparent, right half opaque red."""
    image = Image.new("P", (width, height), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    image.paste(1, (width // 2, 0, width, height))
    return encode(image, "PNG", transparency=0)


def exif_rotated_jpeg(width: int = 80, height: int = 40) -> bytes:
    """A JPEG stored left red / right blue, 80x40, with EXIF orientation 6 (turn 90° clockwise).

    Shown upright it is 40x80 with red on top and blue below.
    """
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "hostile test camera"
    return encode(stripes(width, height, RED, BLUE), "JPEG", quality=95, exif=exif.tobytes())


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    """Random RGB pixels: incompressible, so a PNG of it is about ``3 * width * height`` bytes."""
    pixels = random.Random(seed).randbytes(width * height * 3)
    return Image.frombytes("RGB", (width, height), pixels)


def noise_png(width: int, height: int, seed: int) -> bytes:
    """``noise_image`` as a PNG."""
    return encode(noise_image(width, height, seed), "PNG", compress_level=1)


# --- behaviours ---------------------------------------------------------------------------


@implementer(IPullProducer)
class _Repeat:
    """Writes ``chunk`` whenever the transport wants more, until stopped."""

    def __init__(self, transport: Any, chunk: bytes, counter: RawOrigin) -> None:
        self._transport = transport
        self._chunk = chunk
        self._counter = counter
        self._stopped = False

    def resumeProducing(self) -> None:
        if not self._stopped:
            self._counter.sent += len(self._chunk)
            self._transport.write(self._chunk)

    def stopProducing(self) -> None:
        self._stopped = True


class _RawResponder(Protocol):
    """Once the request's head is in, write ``head``, then ``repeat`` for ever (if given)."""

    def __init__(self, origin: RawOrigin) -> None:
        self._origin = origin
        self._received = b""
        self._answered = False

    def dataReceived(self, data: bytes) -> None:
        self._received += data
        if self._answered or b"\r\n\r\n" not in self._received:
            return
        self._answered = True
        assert self.transport is not None
        self.transport.write(self._origin.head)
        self._origin.sent += len(self._origin.head)
        if self._origin.repeat:
            self.transport.registerProducer(
                _Repeat(self.transport, self._origin.repeat, self._origin), False
            )
        else:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self._origin.closed.called:
            self._origin.closed.callback(self._origin.sent)


@attrs.define(eq=False)
class RawOrigin:
    """A TCP origin that answers any request with raw bytes: ``head``, then ``repeat`` for
    ever (a header flood, a status line that never ends...). ``closed`` fires with the bytes
    sent when the first connection ends."""

    head: bytes
    repeat: bytes = b""
    sent: int = 0
    closed: Deferred[int] = attrs.field(factory=Deferred)
    _port: Any = None

    @classmethod
    def start(cls, reactor: Any, head: bytes, repeat: bytes = b"") -> RawOrigin:
        origin = cls(head, repeat)
        factory = Factory.forProtocol(lambda: _RawResponder(origin))
        origin._port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        return origin

    def url(self, path: str = "/raw.png") -> str:
        return f"http://127.0.0.1:{self._port.getHost().port}{path}"

    def stop(self) -> Deferred[None]:
        return self._port.stopListening() or succeed(None)


class _Silent(_Leaf):
    """Read the request, then never answer (not even the status line)."""

    def __init__(self, origin: Origin, path: str, stream: Stream) -> None:
        super().__init__(origin, path)
        self._stream = stream

    def respond(self, request: Request) -> int:
        self._stream.responses += 1
        self._stream._watch(request)
        return NOT_DONE_YET


@attrs.define(eq=False)
class HostileOrigin:
    """An ``Origin`` with hostile behaviours by name; every method returns the path to ask."""

    origin: Origin
    _reactor: Any

    @classmethod
    def start(cls, reactor: Any, interface: str = "127.0.0.1") -> Deferred[HostileOrigin]:
        """Listen on ``interface`` (any free port)."""
        return start_origin(reactor, interface=interface).addCallback(cls, reactor)

    def stop(self) -> Deferred[None]:
        """Stop listening and abort every connection still open to this origin (the
        proxy keeps connections alive; trial wants a clean reactor after each test)."""
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        host = (self.origin.interface, self.origin.port)
        await self.origin.stop()
        for _ in range(200):
            open_here = [
                selectable
                for selectable in {*self._reactor.getReaders(), *self._reactor.getWriters()}
                if isinstance(selectable, tcp.Server)
                and (selectable.getHost().host, selectable.getHost().port) == host
            ]
            if not open_here:
                return
            for connection in open_here:
                connection.abortConnection()
            await deferLater(self._reactor, 0.01, lambda: None)

    def url(self, path: str) -> str:
        return self.origin.url(path)

    @property
    def port(self) -> int:
        return self.origin.port

    def hits(self, path: str) -> int:
        """Requests this origin has seen for ``path``."""
        return self.origin.hits[path]

    def serve(self, path: str, body: bytes, content_type: str | None = "image/png") -> str:
        self.origin.add(path, body, content_type)
        return path

    def silent(self, path: str = "/silent") -> tuple[str, Stream]:
        """Accept the connection and the request, then say nothing, for ever."""
        stream = Stream()
        self.origin._set(path, _Silent(self.origin, path, stream))
        return path, stream

    def stall(self, path: str = "/stall") -> tuple[str, Stream]:
        """Send the status line, the headers and 100 body bytes, then nothing more."""
        return path, self.origin.drip(path, None, first=b"\xff\xd8\xff" + b"\x00" * 97)

    def drip_forever(self, path: str = "/drip", interval: float = 0.1) -> tuple[str, Stream]:
        """A JPEG start, then one byte every ``interval`` seconds, never ending."""
        return path, self.origin.drip(path, interval, b"\x00", first=b"\xff\xd8\xff")

    def endless(self, path: str = "/endless") -> tuple[str, Stream]:
        """A body without a length that never ends, sent as fast as it is read."""
        return path, self.origin.endless(path)

    def oversized_declared(self, path: str = "/declared-huge") -> tuple[str, Stream]:
        """A Content-Length of 1 GB, the body sent as fast as it is read."""
        return path, self.origin.endless(path, declared_length=1 << 30)

    def oversized_chunked(self, path: str, body_bytes: int) -> str:
        """A finite body of ``body_bytes`` (a valid PNG start, then padding), chunked, no length."""
        body = noise_png(16, 16, seed=1)
        body += b"\x00" * max(0, body_bytes - len(body))
        self.origin.add(path, body, "image/png", chunked=True)
        return path

    def oversized_with_length(self, path: str, body_bytes: int) -> str:
        """A finite body of ``body_bytes`` with an honest Content-Length."""
        body = noise_png(16, 16, seed=2)
        body += b"\x00" * max(0, body_bytes - len(body))
        self.origin.add(path, body, "image/png")
        return path

    def redirect_loop(self, path: str = "/loop-a") -> str:
        """``path`` -> ``path``-b -> ``path`` -> ..."""
        self.origin.redirect(path, f"{path}-b")
        self.origin.redirect(f"{path}-b", path)
        return path

    def redirect_to(self, path: str, location: str, status: int = 302) -> str:
        """Redirect ``path`` to ``location`` (absolute, possibly on another origin)."""
        self.origin.redirect(path, location, status)
        return path
