"""Which AVIF quality matches a JPEG quality, measured on real photos.

Usage: avif_quality.py WALLPAPER_TREE [--width 640] [--photos 8]

``q`` means the same thing for every lossy output: a JPEG's quality. WebP's
encoder is on about the same scale; libavif's is not (its 80 is much finer, and
larger, than a JPEG's 80). For each JPEG quality this script finds the AVIF
quality whose mean luma PSNR equals the JPEG's, over the JPEG photos of Debian's
plasma-workspace-wallpapers (``apt-get download plasma-workspace-wallpapers``,
then ``dpkg -x``), each first resized to ``--width`` as a thumbnail would be.
It prints a Markdown table and the points for ``transform.AVIF_QUALITY_POINTS``.
"""

from __future__ import annotations

import argparse
import io
import math
import os
from pathlib import Path

from PIL import Image, ImageChops

from imgproxy.worker.transform import AVIF_SPEED, WEBP_METHOD, avif_quality

JPEG_QUALITIES = (10, 20, 30, 40, 50, 60, 70, 80, 85, 90, 95)
AVIF_SWEEP = tuple(range(0, 101, 5))


def photos(tree: Path, count: int, width: int) -> list[Image.Image]:
    """The first ``count`` distinct JPEG photos under ``tree``, resized to ``width``."""
    seen_photos: set[Path] = set()
    found = []
    for root, _dirs, files in sorted(os.walk(tree)):
        for name in sorted(files):
            path = Path(root) / name
            if path.suffix.lower() not in {".jpg", ".jpeg"} or "screenshot" in name:
                continue
            # The package ships one photo under several screen sizes: keep the first.
            if path.parent.parent in seen_photos:
                continue
            seen_photos.add(path.parent.parent)
            with Image.open(path) as image:
                photo = image.convert("RGB")
            photo.thumbnail((width, width * 4), Image.Resampling.LANCZOS)
            found.append(photo)
            if len(found) == count:
                return found
    return found


def encoded(photo: Image.Image, fmt: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        photo.save(buffer, fmt, quality=quality, optimize=True, progressive=True)
    elif fmt == "WEBP":
        photo.save(buffer, fmt, quality=quality, method=WEBP_METHOD)
    else:
        photo.save(buffer, fmt, quality=quality, speed=AVIF_SPEED)
    return buffer.getvalue()


def luma_psnr(reference: Image.Image, data: bytes) -> float:
    with Image.open(io.BytesIO(data)) as decoded:
        difference = ImageChops.difference(reference.convert("L"), decoded.convert("L"))
    squares = sum(count * value * value for value, count in enumerate(difference.histogram()))
    mse = squares / (reference.width * reference.height)
    return 100.0 if mse == 0 else 10 * math.log10(255 * 255 / mse)


def measure(refs: list[Image.Image], fmt: str, quality: int) -> tuple[int, float]:
    """Total bytes and mean luma PSNR of ``refs`` encoded at ``quality``."""
    total, psnrs = 0, []
    for photo in refs:
        data = encoded(photo, fmt, quality)
        total += len(data)
        psnrs.append(luma_psnr(photo, data))
    return total, sum(psnrs) / len(psnrs)


def matching_quality(target: float, sweep: list[tuple[int, float]]) -> float:
    """The AVIF quality whose PSNR is ``target``, interpolated along the sweep."""
    for (q0, p0), (q1, p1) in zip(sweep, sweep[1:], strict=False):
        if p0 <= target <= p1:
            return q0 + (q1 - q0) * (target - p0) / (p1 - p0) if p1 > p0 else q0
    return float(sweep[0][0] if target < sweep[0][1] else sweep[-1][0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tree", type=Path)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--photos", type=int, default=8)
    args = parser.parse_args()
    refs = photos(args.tree, args.photos, args.width)
    print(f"{len(refs)} photos at {args.width} px wide, AVIF speed {AVIF_SPEED}\n")
    sweep = [(q, measure(refs, "AVIF", q)[1]) for q in AVIF_SWEEP]
    print("| q | JPEG bytes | JPEG PSNR | WebP bytes | WebP PSNR | matching AVIF quality "
          "| AVIF bytes at imgproxy's mapping | its PSNR |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    points = []
    for q in JPEG_QUALITIES:
        jpeg_bytes, jpeg_psnr = measure(refs, "JPEG", q)
        webp_bytes, webp_psnr = measure(refs, "WEBP", q)
        match = matching_quality(jpeg_psnr, sweep)
        points.append((q, round(match)))
        avif_bytes, avif_psnr = measure(refs, "AVIF", avif_quality(q))
        print(f"| {q} | {jpeg_bytes} | {jpeg_psnr:.2f} | {webp_bytes} | {webp_psnr:.2f} "
              f"| {match:.1f} | {avif_bytes} ({avif_quality(q)}) | {avif_psnr:.2f} |")
    print(f"\nmeasured points (JPEG q, AVIF quality): {points}")


if __name__ == "__main__":
    main()
