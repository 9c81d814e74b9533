"""Side-by-side benchmark: imgproxy (standalone and cluster), thumbor, nginx, raw Pillow.

Runs everything in one go on loopback and writes bench/results/proxy.json, the markdown report
bench/results/proxy.md and its PNG plots. Every process it starts is stopped on the way out,
failures included. Run it through ``bench/run-all`` (``make bench``), which installs the peers
first; ``--help`` lists the knobs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import measure
import report
from procs import ProcessSet
from targets import RUN, STARTERS, WORK, start_origin

RESULTS = Path(__file__).resolve().parent / "results"
ALL_TARGETS = ["imgproxy", "imgproxy-cluster", "thumbor", "nginx"]
# the image types of the fresh-transform rows: (label, corpus file)
IMAGE_TYPES = [
    ("progressive JPEG", "progressive.jpg"),
    ("baseline JPEG", "baseline.jpg"),
    ("PNG (alpha)", "alpha.png"),
    ("WebP", "photo.webp"),
]
BYTES_SOURCES = ["progressive.jpg", "baseline.jpg", "alpha.png", "photo.webp", "animated.gif",
                 "largest.jpg"]


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    def version(argv: list[str]) -> str:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=20)
            return (p.stdout + p.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "unknown"
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "mem_gib": round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": version(["nginx", "-v"]),
        "wrk": version(["wrk", "-v"]),
        "thumbor": version([str(WORK / "thumbor-venv" / "bin" / "thumbor"), "--version"]),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "git": version(["git", "-C", str(RESULTS.parent.parent), "log", "-1", "--oneline"]),
    }


def bench_target(name: str, ps: ProcessSet, origin_port: int, args: argparse.Namespace,
                 out: Path, log) -> dict:
    """Start one target, measure it, stop it. Raises when it cannot start."""
    starter = STARTERS[name]
    if name == "thumbor":
        target = starter(ps, origin_port, threads=args.thumbor_threads)
    elif name == "nginx":
        target = starter(ps, origin_port, workers=args.nginx_workers)
    else:
        target = starter(ps, origin_port)
    res: dict = {"note": target.note, "fresh": {}, "fresh_uncached": {}}
    try:
        # memory first: the process is fresh, the largest photo not fetched yet
        log(f"{name}: memory under {args.mem_concurrency} concurrent misses of largest.jpg")
        before = measure.load()
        res["memory"] = measure.memory(target, "/largest.jpg", args.mem_concurrency)
        res["memory"]["load_before"] = before
        m = res["memory"]
        log(f"  peak RSS {m['peak_rss'] / 2**20:.0f} MiB (idle {m['idle_rss'] / 2**20:.0f}), "
            f"{m['ok']}/{m['concurrent']} ok in {m['wall_s']} s")
        log(f"{name}: cache hits, {args.hit_seconds} s")
        profile = None
        if args.profile and target.kind in args.profile:
            profile = args.out / f"profile-{name}.md"
            profile.write_text(f"# py-spy profile of {name} under the benchmark\n\n"
                               f"{target.note}; sampled at 200 Hz, idle threads left out.\n\n")
            res["profile"] = profile.name
        res["hits"] = measure.hits(target, "/progressive.jpg", args.hit_seconds,
                                   out / f"{name}-hits", profile)
        h = res["hits"]
        log(f"  {h['rps']} req/s p50 {h['p50_ms']} ms p99 {h['p99_ms']} ms "
            f"{h['cpu_ms_per_req']} CPU ms/req errors {h['errors']} load {h['load_before']}")
        for _label, file in IMAGE_TYPES:
            if args.images and file not in args.images:
                continue
            for cached in (True, False):
                key = "fresh" if cached else "fresh_uncached"
                if not cached and args.no_uncached:
                    continue
                log(f"{name}: fresh transforms of {file}, source {'cached' if cached else 'new'}")
                r = measure.fresh(target, "/" + file, cached, args.fresh_seconds,
                                  f"{name}-{int(time.time())}",
                                  out / f"{name}-{key}-{file.replace('.', '-')}",
                                  mode=args.fresh_mode,
                                  profile=profile if cached else None)
                res[key][file] = r
                log(f"  {r['rps']} img/s p50 {r['p50_ms']} ms p99 {r['p99_ms']} ms "
                    f"{r['cpu_ms_per_req']} CPU ms/img errors {r['errors']} "
                    f"load {r['load_before']}")
        res["bytes"] = measure.output_bytes(target, ["/" + f for f in BYTES_SOURCES])
        for p in target.procs:
            if not p.alive():
                res["died"] = f"{p.name} exited with {p.proc.returncode}"
    finally:
        for p in target.procs:
            ps.stop(p)
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default=",".join(ALL_TARGETS),
                        help="comma-separated, from " + ", ".join(ALL_TARGETS))
    parser.add_argument("--hit-seconds", type=int, default=15)
    parser.add_argument("--fresh-seconds", type=int, default=15)
    parser.add_argument("--ceiling-seconds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="threads of the Pillow ceiling (default: the cores)")
    parser.add_argument("--ceiling-draft-factor", type=float, default=1.0,
                        help="the ceiling drafts JPEGs to this many times the target: 1 (the "
                             "default) as thumbor does; imgproxy drafts to 2x for quality")
    parser.add_argument("--mem-concurrency", type=int, default=32)
    parser.add_argument("--images", type=lambda s: s.split(","), default=None,
                        help="only these corpus files for fresh transforms")
    parser.add_argument("--fresh-mode", choices=["box", "width"], default="box",
                        help="box: w=320&h=201+i (the w=320 work under new keys, the default); "
                             "width: w=200+i")
    parser.add_argument("--no-uncached", action="store_true",
                        help="skip the fresh transforms with uncached sources")
    parser.add_argument("--thumbor-threads", type=int, default=0,
                        help="thumbor's ENGINE_THREADPOOL_SIZE (its default, 0, is none)")
    parser.add_argument("--nginx-workers", type=int, default=1)
    parser.add_argument("--profile", type=lambda s: s.split(","), default=[],
                        help="py-spy these kinds of target during the hit and cached-source "
                             "fresh runs (imgproxy, thumbor); writes results/profile-NAME.md. "
                             "Sampling costs the target some speed: not for the headline run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--report-only", action="store_true",
                        help="re-render proxy.md and the plots from proxy.json")
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    raw = WORK / "wrk-out"
    raw.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        report.write(json.loads((out / "proxy.json").read_text()), out)
        return 0

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(targets) - set(ALL_TARGETS)
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    corpus = json.loads((WORK / "corpus" / "corpus.json").read_text())
    data: dict = {
        "command": " ".join(shlex.quote(a) for a in [sys.argv[0], *sys.argv[1:]]),
        # what the user typed, when it came through bench/run-all (make bench)
        "entry": os.environ.get("BENCH_ENTRY", ""),
        "machine": machine(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "corpus": corpus,
        "image_types": IMAGE_TYPES,
        "ceiling": {},
        "targets": {},
        "skipped": {},
    }
    data["settings"]["out"] = str(out)
    log(f"machine: {data['machine']}")
    ps = ProcessSet()
    RUN.mkdir(parents=True, exist_ok=True)

    def terminated(signum: int, _frame: object) -> None:
        raise SystemExit(f"stopped by signal {signum}")  # unwinds through the finally below

    signal.signal(signal.SIGTERM, terminated)
    signal.signal(signal.SIGHUP, terminated)

    def ceilings(when: str) -> None:
        # Run before and after the servers; the best pass is the ceiling, since other work on
        # the machine can only ever pull a pass down.
        for _label, file in IMAGE_TYPES:
            if args.images and file not in args.images:
                continue
            log(f"Pillow ceiling ({when}): {file} on {args.threads} threads, "
                f"{args.ceiling_seconds} s")
            c = measure.ceiling(WORK / "corpus" / file, args.threads, args.ceiling_seconds,
                                args.ceiling_draft_factor)
            c["when"] = when
            log(f"  {c['img_per_s']} img/s (p50 {c['latency_ms_p50']} ms, "
                f"{c['cpu_ms_per_img']} CPU ms/img) load {c['load_before']}")
            passes = [*data["ceiling"].get(file, {}).get("passes", []), c]
            best = max(passes, key=lambda x: x["img_per_s"])
            data["ceiling"][file] = {
                **best, "passes": passes,
                "cpu_ms_per_img": min(x["cpu_ms_per_img"] for x in passes if x["cpu_ms_per_img"]),
            }

    try:
        ceilings("before")
        origin, origin_port = start_origin(ps, WORK / "corpus")
        data["origin"] = f"nginx on 127.0.0.1:{origin_port} (1 worker, sendfile)"
        for name in targets:
            try:
                data["targets"][name] = bench_target(name, ps, origin_port, args, raw, log)
            except Exception as e:  # one target failing must not lose the others' numbers
                msg = str(e).strip()
                log(f"{name}: SKIPPED: {msg.splitlines()[0] if msg else type(e).__name__}")
                data["skipped"][name] = msg[-1500:] or traceback.format_exc()[-1500:]
            # write as we go, so an interrupted run still leaves its numbers
            (out / "proxy.json").write_text(json.dumps(data, indent=1) + "\n")
        ps.stop(origin)
        ceilings("after")
    finally:
        ps.stop_all()
    data["load_after"] = measure.load()
    (out / "proxy.json").write_text(json.dumps(data, indent=1) + "\n")
    report.write(data, out)
    log(f"wrote {out / 'proxy.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
