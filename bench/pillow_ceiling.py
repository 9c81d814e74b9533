"""The in-process ceiling: a raw Pillow decode-resize-encode loop, no HTTP, no cache.

Usage: pillow_ceiling.py IMAGE [--threads 2] [--seconds 10] [--width 320] [--quality 80] [--json]

Each thread decodes the image from bytes already in memory, shrinks it to fit ``--width``
(keeping the aspect ratio; JPEG sources use ``draft`` so libjpeg's DCT scaling does most of the
work, as a good implementation would), applies the EXIF orientation, and encodes it in the
source's format: JPEG at ``--quality`` as a progressive optimised JPEG with the ICC profile kept,
WebP at ``--quality``, PNG with Pillow's defaults, GIF (first frame). It prints images per second.
Pillow releases the GIL while decoding, resizing and encoding, so N threads use N cores.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import threading
import time

from PIL import Image, ImageOps


def transform(data: bytes, width: int, quality: int, draft_factor: float = 1.0) -> bytes:
    """One decode-resize-encode of ``data`` to ``width`` pixels wide, in its own format.

    A JPEG is drafted (decoded at 1/2, 1/4 or 1/8 scale) to no less than ``draft_factor``
    times the target size: 1 is what thumbor does; more keeps more detail for the resampling.
    """
    im = Image.open(io.BytesIO(data))
    fmt = im.format or "JPEG"
    icc = im.info.get("icc_profile")
    height = max(1, round(im.height * width / im.width))
    if fmt == "JPEG":
        im.draft("RGB", (math.ceil(width * draft_factor), math.ceil(height * draft_factor)))
    if im.getexif().get(0x0112, 1) != 1:
        im = ImageOps.exif_transpose(im)
    if width < im.width:
        im = im.resize((width, height), Image.Resampling.LANCZOS, reducing_gap=3.0)
    out = io.BytesIO()
    if fmt == "JPEG":
        if im.mode not in ("RGB", "L"):
            im = im.convert("RGB")
        im.save(out, "JPEG", quality=quality, progressive=True, optimize=True, icc_profile=icc)
    elif fmt == "WEBP":
        im.save(out, "WEBP", quality=quality, icc_profile=icc)
    elif fmt == "GIF":
        im.save(out, "GIF")
    else:
        im.save(out, "PNG", icc_profile=icc)
    return out.getvalue()


def run(data: bytes, threads: int, seconds: float, width: int, quality: int,
        draft_factor: float = 1.0) -> dict:
    """Run ``threads`` loops for ``seconds``; the counts and the rate."""
    counts = [0] * threads
    latencies: list[list[float]] = [[] for _ in range(threads)]
    out_bytes = len(transform(data, width, quality, draft_factor))  # also warms the imports
    start = threading.Barrier(threads + 1)
    deadline = [0.0]

    def loop(idx: int) -> None:
        start.wait()
        while True:
            t0 = time.perf_counter()
            if t0 >= deadline[0]:
                return
            transform(data, width, quality, draft_factor)
            latencies[idx].append(time.perf_counter() - t0)
            counts[idx] += 1

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    t_begin = time.perf_counter()
    cpu_begin = time.process_time()
    deadline[0] = t_begin + seconds
    start.wait()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - t_begin
    cpu = time.process_time() - cpu_begin
    done = sum(counts)
    all_lat = sorted(x for per in latencies for x in per)
    return {
        "threads": threads,
        "seconds": round(elapsed, 3),
        "images": done,
        "img_per_s": round(done / elapsed, 2),
        "cpu_s": round(cpu, 3),
        "cpu_ms_per_img": round(1000 * cpu / done, 2) if done else None,
        "latency_ms_p50": round(1000 * all_lat[len(all_lat) // 2], 2) if all_lat else None,
        "output_bytes": out_bytes,
        "width": width,
        "quality": quality,
        "draft_factor": draft_factor,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--quality", type=int, default=80)
    parser.add_argument("--draft-factor", type=float, default=1.0,
                        help="draft JPEGs to this many times the target (default 1, as thumbor)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    with open(args.image, "rb") as f:
        data = f.read()
    result = run(data, args.threads, args.seconds, args.width, args.quality, args.draft_factor)
    result["image"] = os.path.basename(args.image)
    result["pillow"] = Image.__version__
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['image']}: {result['img_per_s']} img/s on {result['threads']} threads "
            f"({result['images']} in {result['seconds']} s, p50 {result['latency_ms_p50']} ms, "
            f"{result['cpu_ms_per_img']} CPU ms each, "
            f"{result['output_bytes']} bytes out, Pillow {result['pillow']})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
