"""The measurements: wrk runs, concurrent-miss memory sampling, output bytes, the Pillow ceiling."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from PIL import Image
from procs import http_get
from profiles import summarise_stacks
from targets import BENCH, ROOT, Target

WRK = BENCH / "wrk"


def load() -> list[float]:
    """The 1, 5 and 15 minute load averages, to print beside every number."""
    return [round(x, 2) for x in os.getloadavg()]


def wrk(target: Target, script: str, env: dict[str, str], threads: int, conns: int,
        seconds: int, out: Path, profile: Path | None = None) -> dict:
    """One wrk run with ``script``; its report.lua JSON, its stdout and the load before it.

    With ``profile``, py-spy samples each of the target's processes during the run and the
    busiest functions are summarised into ``profile`` (markdown); the raw stacks stay beside
    the wrk output.
    """
    report = out.with_suffix(".json")
    report.unlink(missing_ok=True)
    argv = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--latency", "--timeout", "60s",
            "-s", str(WRK / script), target.base]
    spies = _start_profilers(target, seconds, out) if profile else []
    before = load()
    cpu0 = tree_cpu(target.pids())
    proc = subprocess.run(argv, env={**os.environ, **env, "WRK_REPORT": str(report)},
                          capture_output=True, text=True, timeout=seconds + 120)
    cpu = tree_cpu(target.pids()) - cpu0
    if profile:
        _finish_profilers(spies, profile, f"{target.name}: {out.name}")
    out.with_suffix(".txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not report.exists():
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr or proc.stdout}")
    data = json.loads(report.read_text())
    secs = data["duration_us"] / 1e6
    pct = {p: us / 1000 for p, us in data["latency_us"]["percentiles"]}
    return {
        "command": " ".join(f"{k}={v}" for k, v in env.items()) + " " + " ".join(argv),
        "load_before": before,
        "requests": data["requests"],
        "seconds": round(secs, 3),
        "rps": round(data["requests"] / secs, 2),
        "p50_ms": round(pct["50"], 2),
        "p90_ms": round(pct["90"], 2),
        "p99_ms": round(pct["99"], 2),
        "max_ms": round(data["latency_us"]["max"] / 1000, 2),
        "errors": data["errors"],
        # CPU seconds the server's processes used during the run: unlike req/s, the cost per
        # request barely moves when other work shares the cores
        "cpu_s": round(cpu, 3),
        "cpu_ms_per_req": round(1000 * cpu / data["requests"], 3) if data["requests"] else None,
        "percentiles_ms": [[float(p), round(us / 1000, 3)]
                           for p, us in data["latency_us"]["percentiles"]],
        "wrk_stdout": out.with_suffix(".txt").name,
    }


def _start_profilers(target: Target, seconds: int, out: Path) -> list[tuple[str, Path, object]]:
    spy = Path(sys.executable).parent / "py-spy"
    spies = []
    for p in target.procs:
        raw = out.parent / f"{out.name}-{p.name}.pyspy.txt"
        argv = [str(spy), "record", "--pid", str(p.pid), "--duration", str(seconds),
                "--rate", "200", "--nonblocking", "--threads", "--format", "raw",
                "--output", str(raw)]
        spies.append((p.name, raw, subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                                    stderr=subprocess.DEVNULL)))
    return spies


def _finish_profilers(spies: list, profile: Path, title: str) -> None:
    sections = [f"## {title}", ""]
    for name, raw, popen in spies:
        try:
            popen.wait(timeout=60)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()
        sections += [f"### {name}", "", *summarise_stacks(raw), ""]
    with open(profile, "a") as f:
        f.write("\n".join(sections) + "\n")


def hits(target: Target, source: str, seconds: int, out: Path,
         profile: Path | None = None) -> dict:
    """Cache hits: one URL at w=320, warmed first, hammered at 32 connections."""
    path = target.path(source, 320)
    for _ in range(2):
        status, headers, body = http_get(target.base + path)
        if status != 200:
            raise RuntimeError(f"{target.name}: warm-up of {path} got {status}: {body[:200]!r}")
    result = wrk(target, "hit.lua", {"WRK_PATH": path}, 2, 32, seconds, out, profile)
    result["x_cache"] = headers.get("x-cache")
    result["path"] = path
    return result


def fresh(target: Target, source: str, cached_source: bool, seconds: int, run_id: str,
          out: Path, mode: str = "box", profile: Path | None = None) -> dict:
    """Fresh transforms: every request a new cache key.

    ``mode`` "box" asks for w=320, h=201+i: the very w=320 result under a new key each time, so
    the work is the ceiling's; "width" asks for w=200+i (the output grows by a pixel a request,
    and past w=320 a 2560-wide JPEG can only be drafted to 1/4 instead of 1/8).
    With ``cached_source`` the source is fetched once before; else each request names the
    source by a new URL (``/v/RUN-i/...`` on the origin), so each one is fetched too.
    """
    if cached_source:
        src = source
        status, _h, body = http_get(target.base + target.path(src, 320, 200))
        if status != 200:
            raise RuntimeError(f"{target.name}: warm-up of {src} got {status}: {body[:200]!r}")
    else:
        src = f"/v/{run_id}-{{i}}{source}"
        probe = target.path(src, 320, 200).replace("{i}", "probe")
        status, _h, body = http_get(target.base + probe)
        if status != 200:
            raise RuntimeError(f"{target.name}: probe {probe} got {status}: {body[:200]!r}")
    if mode == "box":
        template, i0 = target.path(src, 320, "{i}"), "201"
    else:
        template, i0 = target.path(src, "{i}"), "200"
    result = wrk(target, "fresh.lua", {"WRK_TEMPLATE": template, "WRK_I0": i0},
                 1, 4, seconds, out, profile)
    result["template"] = template
    return result


def tree_cpu(pids: list[int]) -> float:
    """User plus system CPU seconds of the processes and all their live descendants."""
    total = 0.0
    seen: set[int] = set()
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for p in procs:
            if p.pid in seen:
                continue
            seen.add(p.pid)
            try:
                t = p.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += t.user + t.system
    return total


def _tree_memory(pids: list[int]) -> tuple[int, dict[int, int]]:
    """Summed VmRSS of the processes and all their descendants; VmHWM of each."""
    procs: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs[pid] = p
            for c in p.children(recursive=True):
                procs[c.pid] = c
        except psutil.NoSuchProcess:
            continue
    total = 0
    hwm: dict[int, int] = {}
    for pid in procs:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                    elif line.startswith("VmHWM:"):
                        hwm[pid] = int(line.split()[1]) * 1024
        except OSError:
            continue
    return total, hwm


def memory(target: Target, source: str, concurrent: int = 32, timeout: float = 180.0) -> dict:
    """Peak resident memory while ``concurrent`` distinct misses of ``source`` run at once.

    Run it first on a freshly started server, so that the source is not cached either.
    Samples every 100 ms: the summed VmRSS of the server's process tree and each VmHWM.
    """
    idle, _ = _tree_memory(target.pids())
    paths = [target.path(source, 320, 1000 + k) for k in range(concurrent)]
    statuses: list[int | str] = [0] * concurrent
    barrier = threading.Barrier(concurrent + 1)
    t0 = time.monotonic()
    finished = [0.0] * concurrent

    def one(k: int) -> None:
        barrier.wait()
        try:
            statuses[k], _h, _b = http_get(target.base + paths[k], timeout=timeout)
        except OSError as e:
            statuses[k] = f"{type(e).__name__}: {e}"
        finished[k] = time.monotonic() - t0

    threads = [threading.Thread(target=one, args=(k,), daemon=True) for k in range(concurrent)]
    for th in threads:
        th.start()
    samples: list[list[float]] = []
    hwm_peak: dict[int, int] = {}
    barrier.wait()
    t0 = time.monotonic()
    end_after = None
    while True:
        now = time.monotonic() - t0
        rss, hwm = _tree_memory(target.pids())
        for pid, v in hwm.items():
            hwm_peak[pid] = max(hwm_peak.get(pid, 0), v)
        samples.append([round(now, 2), rss])
        if end_after is None and not any(th.is_alive() for th in threads):
            end_after = now + 1.0  # a second of tail, to see memory come back down
        if (end_after is not None and now >= end_after) or now > timeout + 5:
            break
        time.sleep(0.1)
    ok = sum(1 for s in statuses if s == 200)
    return {
        "source": source,
        "concurrent": concurrent,
        "idle_rss": idle,
        "peak_rss": max(s[1] for s in samples),
        "peak_hwm_max": max(hwm_peak.values()) if hwm_peak else 0,
        "peak_hwm_sum": sum(hwm_peak.values()),
        "ok": ok,
        "statuses": sorted({str(s) for s in statuses}),
        "wall_s": round(max(finished), 2),
        "samples": samples,
        "load_before": None,
    }


def output_bytes(target: Target, sources: list[str]) -> dict:
    """Bytes, format and size of the w=320 q=80 result of each source."""
    result = {}
    for src in sources:
        status, headers, body = http_get(target.base + target.path(src, 320))
        entry = {"status": status, "bytes": len(body), "content_type": headers.get("content-type")}
        if status == 200:
            try:
                with Image.open(io.BytesIO(body)) as im:
                    entry.update(format=im.format, width=im.width, height=im.height,
                                 frames=getattr(im, "n_frames", 1),
                                 progressive=bool(im.info.get("progressive")))
            except OSError as e:
                entry["decode_error"] = str(e)
        result[src] = entry
    return result


def ceiling(image: Path, threads: int, seconds: int, draft_factor: float = 1.0) -> dict:
    """The raw Pillow ceiling, run with the project's own venv (the Pillow imgproxy uses)."""
    python = ROOT / ".venv" / "bin" / "python"
    argv = [str(python), str(BENCH / "pillow_ceiling.py"), str(image), "--threads", str(threads),
            "--seconds", str(seconds), "--draft-factor", str(draft_factor), "--json"]
    before = load()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120, check=True)
    result = json.loads(proc.stdout)
    result["load_before"] = before
    result["command"] = " ".join(argv)
    return result
