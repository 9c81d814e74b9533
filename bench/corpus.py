"""Pick the benchmark corpus out of Debian's plasma-workspace-wallpapers.

Usage: corpus.py WALLPAPER_TREE OUT_DIR

Writes into OUT_DIR, with a ``corpus.json`` manifest describing each file:
  progressive.jpg  a 2560x1600 progressive JPEG photo (the headline image)
  baseline.jpg     a 2560x1600 baseline JPEG photo
  largest.jpg      the largest JPEG photo (most pixels, then most bytes)
  alpha.png        a 2560x1600 PNG with an alpha channel (made from a photo if none)
  photo.webp       made from the progressive photo (lossy, quality 90)
  animated.gif     8 frames made from the 2560x1600 photos, 640x400
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

HEADLINE_SIZE = (2560, 1600)


@dataclass(frozen=True)
class Candidate:
    """One image found in the wallpaper tree."""

    path: str
    format: str
    width: int
    height: int
    mode: str
    progressive: bool
    bytes: int


def scan(tree: Path) -> list[Candidate]:
    """Every JPEG and PNG under ``tree`` that is not a screenshot, one per distinct content."""
    found: dict[tuple[str, int], Candidate] = {}
    for root, _dirs, files in os.walk(tree):
        for name in sorted(files):
            path = Path(root) / name
            if "screenshot" in name or path.suffix.lower() not in {".jpg", ".jpeg", ".png"}:
                continue
            try:
                with Image.open(path) as im:
                    progressive = bool(im.info.get("progressive") or im.info.get("progression"))
                    cand = Candidate(
                        str(path), im.format or "", im.width, im.height, im.mode,
                        progressive, path.stat().st_size,
                    )
            except OSError:
                continue
            # The package ships one file under many names (one per screen size); keep one.
            key = (str(path.parent.parent), cand.bytes)
            if key not in found or path.stem == f"{cand.width}x{cand.height}":
                found[key] = cand
    return sorted(found.values(), key=lambda c: c.path)


def pick(cands: list[Candidate]) -> dict[str, Candidate]:
    """Choose the corpus images; deterministic for a given package version."""
    rgb_jpegs = [c for c in cands if c.format == "JPEG" and c.mode == "RGB"]
    at_size = [c for c in rgb_jpegs if (c.width, c.height) == HEADLINE_SIZE]
    progressive = max((c for c in at_size if c.progressive), key=lambda c: c.bytes)
    baseline = max((c for c in at_size if not c.progressive), key=lambda c: c.bytes)
    largest = max(rgb_jpegs, key=lambda c: (c.width * c.height, c.bytes))
    chosen = {"progressive.jpg": progressive, "baseline.jpg": baseline, "largest.jpg": largest}
    alpha = [
        c for c in cands
        if c.format == "PNG" and c.mode == "RGBA" and (c.width, c.height) == HEADLINE_SIZE
    ]
    if alpha:
        chosen["alpha.png"] = max(alpha, key=lambda c: c.bytes)
    return chosen


def describe(path: Path, origin: str) -> dict:
    """The manifest entry of one corpus file."""
    with Image.open(path) as im:
        return {
            "file": path.name,
            "format": im.format,
            "width": im.width,
            "height": im.height,
            "mode": im.mode,
            "progressive": bool(im.info.get("progressive") or im.info.get("progression")),
            "frames": getattr(im, "n_frames", 1),
            "bytes": path.stat().st_size,
            "from": origin,
        }


def make_alpha_png(photo: Path, out: Path) -> None:
    """A PNG with a real alpha channel: the photo under a radial-ish vignette mask."""
    with Image.open(photo) as im:
        rgba = im.convert("RGBA")
    mask = Image.new("L", rgba.size, 0)
    draw = ImageDraw.Draw(mask)
    w, h = rgba.size
    for step in range(64):
        inset = step * min(w, h) // 160
        draw.ellipse((inset, inset, w - inset, h - inset), fill=step * 4)
    rgba.putalpha(mask)
    rgba.save(out, "PNG", optimize=False)


def make_webp(photo: Path, out: Path) -> None:
    """A lossy WebP of the photo, the way a CDN would have stored it."""
    with Image.open(photo) as im:
        im.convert("RGB").save(out, "WEBP", quality=90, method=4)


def make_gif(photos: list[Path], out: Path) -> None:
    """An animated GIF, 640x400, one frame per photo (looped), 8 frames."""
    frames = []
    for i in range(8):
        with Image.open(photos[i % len(photos)]) as im:
            frame = im.convert("RGB").resize((640, 400), Image.Resampling.LANCZOS)
        frames.append(frame.quantize(colors=256, method=Image.Quantize.MEDIANCUT))
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=200, loop=0)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    tree, out = Path(argv[1]), Path(argv[2])
    out.mkdir(parents=True, exist_ok=True)
    cands = scan(tree)
    chosen = pick(cands)
    manifest = {}
    for name, cand in chosen.items():
        shutil.copyfile(cand.path, out / name)
        manifest[name] = describe(out / name, os.path.relpath(cand.path, tree))
    if "alpha.png" not in chosen:
        make_alpha_png(out / "progressive.jpg", out / "alpha.png")
        manifest["alpha.png"] = describe(out / "alpha.png", "made from progressive.jpg")
    make_webp(out / "progressive.jpg", out / "photo.webp")
    manifest["photo.webp"] = describe(out / "photo.webp", "made from progressive.jpg, q=90")
    headline = [Path(c.path) for c in cands if c.format == "JPEG" and c.mode == "RGB"
                and (c.width, c.height) == HEADLINE_SIZE]
    make_gif(headline, out / "animated.gif")
    manifest["animated.gif"] = describe(out / "animated.gif", "made from 8 of the 2560x1600 JPEGs")
    manifest_path = out / "corpus.json"
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
