"""The benchmark's pure parts: corpus choice, URL shapes, the ceiling's transform, the verdicts.

Run with ``.venv/bin/python -m pytest -q bench/tests`` or ``.venv/bin/trial bench/tests``
(from the repository root); needs only Pillow.
"""

from __future__ import annotations

import io
import sys
import tempfile
import urllib.parse
from pathlib import Path

from PIL import Image
from twisted.trial.unittest import SynchronousTestCase

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import assemble  # noqa: E402
import avif_quality  # noqa: E402
import corpus  # noqa: E402 - bench/ is not a package; its modules import each other by name
import pillow_ceiling  # noqa: E402
import profiles  # noqa: E402
import report  # noqa: E402
from targets import Target  # noqa: E402


def _cand(name: str, fmt: str, size: tuple[int, int], mode: str = "RGB",
          progressive: bool = False, nbytes: int = 1000) -> corpus.Candidate:
    return corpus.Candidate(name, fmt, size[0], size[1], mode, progressive, nbytes)


def _jpeg(size: tuple[int, int], **save: object) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 60)).save(out, "JPEG", **save)
    return out.getvalue()


class CorpusPickTests(SynchronousTestCase):
    """corpus.pick chooses by format, progressiveness, size and bytes."""

    def setUp(self) -> None:
        self.cands = [
            _cand("a.jpg", "JPEG", (2560, 1600), progressive=True, nbytes=500),
            _cand("b.jpg", "JPEG", (2560, 1600), progressive=True, nbytes=700),
            _cand("c.jpg", "JPEG", (2560, 1600), progressive=False, nbytes=900),
            _cand("grey.jpg", "JPEG", (2560, 1600), mode="L", nbytes=5000),
            _cand("big.jpg", "JPEG", (5120, 2880), nbytes=100),
            _cand("big2.jpg", "JPEG", (5120, 2880), nbytes=200),
            _cand("alpha.png", "PNG", (2560, 1600), mode="RGBA", nbytes=10),
        ]

    def test_progressive_is_the_largest_progressive_rgb_at_the_headline_size(self) -> None:
        self.assertEqual(corpus.pick(self.cands)["progressive.jpg"].path, "b.jpg")

    def test_baseline_skips_greyscale(self) -> None:
        self.assertEqual(corpus.pick(self.cands)["baseline.jpg"].path, "c.jpg")

    def test_largest_is_most_pixels_then_most_bytes(self) -> None:
        self.assertEqual(corpus.pick(self.cands)["largest.jpg"].path, "big2.jpg")

    def test_alpha_png_is_taken_when_there_is_one(self) -> None:
        self.assertEqual(corpus.pick(self.cands)["alpha.png"].path, "alpha.png")

    def test_no_alpha_png_leaves_it_to_be_made(self) -> None:
        chosen = corpus.pick([c for c in self.cands if c.format != "PNG"])
        self.assertNotIn("alpha.png", chosen)


class TargetPathTests(SynchronousTestCase):
    """Each server's request path for the same resize."""

    def test_imgproxy_encodes_the_source_and_keeps_the_counter(self) -> None:
        t = Target("imgproxy", 1, "imgproxy", 8000)
        path = t.path("/v/run-{i}/p.jpg", 320, "{i}")
        self.assertTrue(path.startswith("/image?url=http%3A%2F%2F127.0.0.1%3A8000%2Fv%2Frun-{i}"))
        query = urllib.parse.parse_qs(path.split("?", 1)[1].replace("{i}", "7"))
        self.assertEqual(query["url"], ["http://127.0.0.1:8000/v/run-7/p.jpg"])
        self.assertEqual((query["w"], query["h"], query["q"]), (["320"], ["7"], ["80"]))

    def test_thumbor_width_only_and_fit_in_box(self) -> None:
        t = Target("thumbor", 1, "thumbor", 8000)
        self.assertEqual(t.path("/p.jpg", 320),
                         "/unsafe/320x0/filters:quality(80)/127.0.0.1:8000/p.jpg")
        self.assertEqual(t.path("/p.jpg", 320, 250),
                         "/unsafe/fit-in/320x250/filters:quality(80)/127.0.0.1:8000/p.jpg")

    def test_nginx_passes_the_box_as_arguments(self) -> None:
        t = Target("nginx", 1, "nginx", 8000)
        self.assertEqual(t.path("/p.jpg", 320), "/img/p.jpg?w=320")
        self.assertEqual(t.path("/p.jpg", 320, 250), "/img/p.jpg?w=320&h=250")


class CeilingTransformTests(SynchronousTestCase):
    """pillow_ceiling.transform does the work the servers are asked for."""

    def test_jpeg_becomes_a_progressive_jpeg_of_the_width(self) -> None:
        out = pillow_ceiling.transform(_jpeg((1280, 800)), 320, 80)
        with Image.open(io.BytesIO(out)) as im:
            self.assertEqual((im.format, im.size), ("JPEG", (320, 200)))
            self.assertTrue(im.info.get("progressive"))

    def test_png_with_alpha_stays_png_with_alpha(self) -> None:
        buf = io.BytesIO()
        Image.new("RGBA", (640, 400), (1, 2, 3, 100)).save(buf, "PNG")
        out = pillow_ceiling.transform(buf.getvalue(), 320, 80)
        with Image.open(io.BytesIO(out)) as im:
            self.assertEqual((im.format, im.mode, im.size), ("PNG", "RGBA", (320, 200)))

    def test_never_upscales(self) -> None:
        out = pillow_ceiling.transform(_jpeg((200, 100)), 320, 80)
        with Image.open(io.BytesIO(out)) as im:
            self.assertEqual(im.size, (200, 100))

    def test_run_counts_images_on_every_thread(self) -> None:
        result = pillow_ceiling.run(_jpeg((64, 40)), threads=2, seconds=0.2, width=32, quality=80)
        self.assertGreater(result["images"], 0)
        self.assertEqual(result["threads"], 2)


def _data(ours: dict, thumbor: dict, ceiling: float = 10.0) -> dict:
    return {
        "image_types": [["progressive JPEG", "progressive.jpg"]],
        "ceiling": {"progressive.jpg": {"img_per_s": ceiling}},
        "targets": {"imgproxy": ours, "thumbor": thumbor},
    }


class CheckTargetsTests(SynchronousTestCase):
    """report.check_targets turns a run into the issue's verdicts."""

    def test_hits_target_needs_five_times_thumbor_and_a_low_p99(self) -> None:
        fast = _data({"hits": {"rps": 5000, "p99_ms": 20}}, {"hits": {"rps": 1000}})
        slow_tail = _data({"hits": {"rps": 5000, "p99_ms": 30}}, {"hits": {"rps": 1000}})
        self.assertIn("holds", report.check_targets(fast)[0])
        self.assertIn("does not hold", report.check_targets(slow_tail)[0])

    def test_fresh_target_needs_both_ratios(self) -> None:
        def verdict(ours: float, theirs: float) -> str:
            data = _data({"fresh": {"progressive.jpg": {"rps": ours}}},
                         {"fresh": {"progressive.jpg": {"rps": theirs}}})
            return [x for x in report.check_targets(data) if "progressive.jpg" in x][0]

        self.assertIn("holds", verdict(9.0, 4.0))
        self.assertIn("does not hold", verdict(8.0, 4.0))  # 80% of the ceiling
        self.assertIn("does not hold", verdict(9.0, 5.0))  # 1.8x thumbor

    def test_missing_numbers_are_not_measured_rather_than_failed(self) -> None:
        lines = report.check_targets(_data({}, {}))
        self.assertTrue(all(line.endswith("not measured") for line in lines))

    def test_memory_must_be_under_300_mb_and_thumbors(self) -> None:
        mib = 2**20
        ok = _data({"memory": {"peak_rss": 200 * mib}}, {"memory": {"peak_rss": 250 * mib}})
        over = _data({"memory": {"peak_rss": 200 * mib}}, {"memory": {"peak_rss": 150 * mib}})
        pick = [x for x in report.check_targets(ok) if "memory" in x][0]
        self.assertIn("holds", pick)
        pick = [x for x in report.check_targets(over) if "memory" in x][0]
        self.assertIn("does not hold", pick)


class SummariseStacksTests(SynchronousTestCase):
    """profiles.summarise_stacks ranks functions by py-spy samples, idle threads left out."""

    def setUp(self) -> None:
        # not self.mktemp(): under pytest that puts a directory named after the module in
        # the working directory, which then shadows the module for trial
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.dir = Path(tmp.name)

    def test_self_and_total_shares_skip_idle_stacks(self) -> None:
        raw = self.dir / "stacks.txt"
        raw.write_text(
            "thread (0x1);main (app.py:1);decode (img.py:5) 6\n"
            "thread (0x1);main (app.py:1);encode (img.py:9) 2\n"
            "thread (0x2);main (app.py:1);decode (img.py:5);inner (c.py:1) 2\n"
            "thread (0x3);worker (pool.py:3);get (queue.py:171) 50\n"
        )
        text = "\n".join(profiles.summarise_stacks(raw))
        self.assertIn("10 busy samples", text)
        self.assertIn("| 60.0 | 80.0 | `decode (img.py:5)` |", text)
        self.assertIn("| 100.0 | `main (app.py:1)` |", text)
        self.assertNotIn("queue.py", text)

    def test_a_missing_file_says_why(self) -> None:
        lines = profiles.summarise_stacks(self.dir / "missing.txt")
        self.assertIn("py-spy failed", lines[0])


class AssembleTests(SynchronousTestCase):
    """BENCHMARKS.md sits at the top; the plots sit beside the reports."""

    def test_plot_links_point_into_the_results_folder(self) -> None:
        text = "![a](hits.png) ![b](soak-long-cluster.png) [c](other.md) ![d](https://x/y.png)"
        self.assertEqual(
            assemble.beside_the_reports(text),
            "![a](bench/results/hits.png) ![b](bench/results/soak-long-cluster.png) "
            "[c](other.md) ![d](https://x/y.png)",
        )


class AvifQualityMatchTests(SynchronousTestCase):
    SWEEP = [(40, 35.0), (50, 37.5), (60, 39.5), (70, 41.5)]

    def test_the_match_is_interpolated_between_the_sweep_points_around_it(self) -> None:
        self.assertEqual(avif_quality.matching_quality(38.5, self.SWEEP), 55.0)
        self.assertEqual(avif_quality.matching_quality(39.5, self.SWEEP), 60.0)

    def test_a_target_outside_the_sweep_is_its_nearest_end(self) -> None:
        self.assertEqual(avif_quality.matching_quality(30.0, self.SWEEP), 40.0)
        self.assertEqual(avif_quality.matching_quality(50.0, self.SWEEP), 70.0)

    def test_psnr_of_an_exact_copy_is_the_cap_and_drops_with_noise(self) -> None:
        photo = Image.effect_noise((64, 48), 40).convert("RGB")
        exact = io.BytesIO()
        photo.save(exact, "PNG")
        self.assertEqual(avif_quality.luma_psnr(photo, exact.getvalue()), 100.0)
        lossy = avif_quality.encoded(photo, "JPEG", 30)
        self.assertLess(avif_quality.luma_psnr(photo, lossy), 40.0)
