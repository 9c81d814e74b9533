"""The origin of the compose test: a tiny HTTP server of generated images.

Runs inside the imgproxy image (which has Pillow), as the `origin` service that
docker-compose.test.yml adds; standard library and Pillow only, no imgproxy import.

  /photo.jpg        a 640x480 JPEG
  /logo.png         a 300x200 PNG with transparency
  /img/<n>.jpg      a distinct 160x120 JPEG for every n (many keys spread over the workers)
  /health           200, for the container's health check
  anything else     404
"""

from __future__ import annotations

import io
import re
import sys
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image, ImageDraw


def encode(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, quality=90) if fmt == "JPEG" else image.save(out, fmt)
    return out.getvalue()


def photo() -> bytes:
    image = Image.new("RGB", (640, 480))
    draw = ImageDraw.Draw(image)
    for x in range(0, 640, 8):
        draw.rectangle([x, 0, x + 7, 479], fill=(x * 255 // 640, 96, 255 - x * 255 // 640))
    draw.ellipse([220, 140, 420, 340], fill=(250, 220, 40))
    return encode(image, "JPEG")


def logo() -> bytes:
    image = Image.new("RGBA", (300, 200), (0, 0, 0, 0))
    ImageDraw.Draw(image).rounded_rectangle([20, 20, 280, 180], 30, fill=(30, 120, 200, 200))
    return encode(image, "PNG")


@lru_cache(maxsize=4096)
def numbered(n: int) -> bytes:
    image = Image.new("RGB", (160, 120), ((n * 37) % 256, (n * 91) % 256, (n * 173) % 256))
    ImageDraw.Draw(image).text((10, 50), f"image {n}", fill=(255, 255, 255))
    return encode(image, "JPEG")


FIXED = {"/photo.jpg": ("image/jpeg", photo()), "/logo.png": ("image/png", logo())}
NUMBERED = re.compile(r"^/img/(\d{1,6})\.jpg$")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?", 1)[0]
        match = NUMBERED.match(path)
        if path == "/health":
            self.reply(200, "text/plain", b"ok\n")
        elif path in FIXED:
            self.reply(200, *FIXED[path])
        elif match:
            self.reply(200, "image/jpeg", numbered(int(match.group(1))))
        else:
            self.reply(404, "text/plain", b"not found\n")

    def reply(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
    ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
