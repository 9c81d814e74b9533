"""Soak: a steady mix of hits and misses for a long while, resident memory sampled every second.

Starts a static origin on loopback (a few real photos from the benchmark corpus, when
``bench/setup.sh`` extracted it, plus many generated images), then a standalone node and a
small cluster (1 gateway, 2 workers), and runs the same closed-loop load against each, side by
side (or one after the other with ``--sequential``) for ``--duration`` seconds:

* hits: a request that already answered 200, picked from the most recent ones;
* misses: a new size of a known source URL, or a source URL never seen (``?v=N``);
* a few requests the contract answers with an error (origin 404, parameter 400): expected.

Every second it reads VmRSS, Threads and open descriptors of every imgproxy process from
``/proc``; at the end it fits a line to RSS over the second half of the run (MiB per minute)
and writes ``bench/results/soak.md`` and ``bench/results/soak-<target>.png``.

Pass: no unexpected status (no 5xx, no connection error), and every process's RSS trend over
the second half below ``--max-trend`` MiB/min.

Run with the bench venv (it has Pillow and matplotlib)::

    bench/.work/venv/bin/python bench/soak.py --duration 600

After the load each node gets a gdb probe (``malloc_stats()``, ``malloc_trim(0)``): memory
in use versus memory glibc keeps. Diagnostics: ``--tracemalloc`` (snapshots every 60 s in the
node's run directory, compared with ``--compare OLD NEW``), ``--node-env NAME=VALUE``
(e.g. ``MALLOC_ARENA_MAX=2``), ``--targets standalone`` and a longer ``--duration``.

Only loopback addresses are used; only processes started here are signalled, by pid.
"""

from __future__ import annotations

import argparse
import base64
import collections
import ctypes
import ctypes.util
import http.client
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parent.parent
BENCH = REPOSITORY / "bench"
CORPUS = BENCH / ".work" / "corpus"
RESULTS = BENCH / "results"
WORK = BENCH / ".work" / "soak"
TWISTD = REPOSITORY / ".venv" / "bin" / "twistd"

MIB = 1024 * 1024

# ``--tracemalloc``: twistd run under tracemalloc, the traced total written every 10 s and a
# snapshot every 60 s into the node's directory, to tell Python objects that pile up from
# memory the C allocator keeps (compare two snapshots with ``--compare A B``). Tracing
# starts 15 s after launch.
TRACED_TWISTD = r"""
import os, sys, threading, time, tracemalloc
out = os.environ["SOAK_TRACE_DIR"]
def record():
    # Tracing from the first import makes start-up take minutes (re compiles): begin once up.
    time.sleep(15)
    tracemalloc.start(8)
    tick = 0
    while True:
        time.sleep(10)  # a diagnostic side thread: wall-clock sampling is the point
        tick += 1
        current, peak = tracemalloc.get_traced_memory()
        with open(os.path.join(out, "traced.tsv"), "a") as f:
            f.write(f"{time.time():.1f}\t{current}\t{peak}\n")
        if tick % 6 == 0:
            tracemalloc.take_snapshot().dump(os.path.join(out, f"snapshot-{tick // 6:03d}.bin"))
threading.Thread(target=record, name="soak-tracemalloc", daemon=True).start()
sys.argv = ["twistd", *sys.argv[1:]]
from twisted.scripts.twistd import run
run()
"""

# --- processes ------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _die_with_parent() -> None:
    # Between fork and exec: a soak interrupted by ^C or a crash leaves no proxy behind.
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def free_port_on(addresses: Sequence[str], udp: bool = False) -> int:
    """A port free for TCP (and UDP when ``udp``) on every one of ``addresses``."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((addresses[0], 0))
            port = int(probe.getsockname()[1])
        try:
            for address in addresses:
                kinds = [socket.SOCK_STREAM] + ([socket.SOCK_DGRAM] if udp else [])
                for kind in kinds:
                    with socket.socket(socket.AF_INET, kind) as s:
                        s.bind((address, port))
        except OSError:
            continue
        return port
    raise OSError(f"no common free port on {addresses}")


def http_get(host: str, port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """One blocking GET on a fresh connection: (status, body)."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


class Node:
    """One ``twistd -n imgproxy`` child on ``address:port``, with its own cache and log."""

    # Set by main(): extra environment and tracing for every node.
    extra_env: dict[str, str] = {}
    traced = False

    def __init__(self, name: str, address: str, port: int, args: Sequence[str], base: Path,
                 member_name: str = "") -> None:
        self.name = name
        self.member_name = member_name or name
        self.address = address
        self.port = port
        self.base = base / name
        self.base.mkdir(parents=True, exist_ok=True)
        self.args = [
            "--http", f"tcp:{port}:interface={address}",
            "--cache-dir", str(self.base / "cache"),
            *args,
        ]
        self.log_path = self.base / "twistd.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def command(self) -> list[str]:
        if self.traced:
            python = str(TWISTD.parent / "python")
            return [python, "-c", TRACED_TWISTD, "-n", "--pidfile=", "imgproxy", *self.args]
        return [str(TWISTD), "-n", "--pidfile=", "imgproxy", *self.args]

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def launch(self) -> None:
        environ = {
            k: v for k, v in os.environ.items()
            if not k.startswith("IMGPROXY_") and k not in ("HTTP_PORT", "KNOWN_HOSTS",
                                                            "CLUSTER_SECRET")
        }
        # The checkout under test, whatever the venv has installed.
        environ["PYTHONPATH"] = str(REPOSITORY)
        environ.update(self.extra_env)
        if self.traced:
            environ["SOAK_TRACE_DIR"] = str(self.base)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command, cwd=self.base, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, env=environ, preexec_fn=_die_with_parent,
            )

    def health(self) -> dict[str, Any] | None:
        try:
            status, body = http_get(self.address, self.port, "/health", timeout=2.0)
        except (OSError, http.client.HTTPException):
            return None
        return json.loads(body) if status == 200 else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> int | None:
        """SIGTERM our child by its pid, SIGKILL after 15 s; its exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def wait_until(predicate: Any, timeout: float, what: str, nodes: Sequence[Node]) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for node in nodes:
            if not node.alive():
                tail = node.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{node.name} exited while waiting for {what}:\n{tail}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.25)  # polling child processes: no event to wait on


@dataclass
class Target:
    """What the load is aimed at: the node it talks to and every process to watch."""

    name: str
    entry: Node
    nodes: list[Node]

    def start(self) -> None:
        for node in self.nodes:
            node.launch()
        wait_until(lambda: all(n.health() is not None for n in self.nodes), 90,
                   f"{self.name} to answer /health", self.nodes)
        if len(self.nodes) > 1:
            names = {n.member_name for n in self.nodes}

            def converged() -> bool:
                for node in self.nodes:
                    health = node.health() or {}
                    alive = {m["name"] for m in health.get("members", [])
                             if m.get("state") == "alive"}
                    if not names <= alive:
                        return False
                return True

            wait_until(converged, 60, f"{self.name} membership to converge", self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        for node in self.nodes:
            node.stop()


def standalone_target(base: Path, address: str) -> Target:
    node = Node("standalone", address, free_port_on([address]),
                ["--allow-private-sources", *COMMON_ARGS], base)
    return Target("standalone", node, [node])


def cluster_target(base: Path, addresses: Sequence[str]) -> Target:
    """1 gateway + 2 workers on distinct loopback addresses, one gossip port, one secret."""
    gossip = free_port_on(addresses, udp=True)
    secret = base64.b64encode(os.urandom(16)).decode("ascii")
    roles = [("gateway", "g1"), ("worker", "w1"), ("worker", "w2")]
    nodes = []
    for (role, name), address in zip(roles, addresses, strict=True):
        seeds = ",".join(f"{a}:{gossip}" for a in addresses if a != address)
        args = [
            "--role", role, "--node-name", name, "--bind", address, "--advertise", address,
            "--gossip-port", str(gossip), "--join", seeds, "--cluster-secret", secret,
            "--membership-profile", "local", "--allow-private-sources", *COMMON_ARGS,
        ]
        nodes.append(Node(f"cluster-{name}", address, free_port_on([address]), args, base,
                          member_name=name))
    return Target("cluster", nodes[0], nodes)


# A cap well under the bytes the run writes, so eviction runs throughout the soak.
COMMON_ARGS: list[str] = ["--cache-max-bytes", "256M"]

# --- the origin -----------------------------------------------------------------------------


def generate_images(directory: Path, count: int, seed: int = 6) -> list[str]:
    """``count`` synthetic photos-like images (gradients, shapes, noise) in JPEG, PNG, WebP."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = random.Random(seed)
    names = []
    for n in range(count):
        width, height = rng.randint(480, 1600), rng.randint(360, 1200)
        base = Image.linear_gradient("L").resize((width, height))
        channels = [base.rotate(rng.choice((0, 90, 180, 270))).resize((width, height))
                    for _ in range(3)]
        image = Image.merge("RGB", channels)
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(10, 40)):
            x0, y0 = rng.randrange(width), rng.randrange(height)
            x1, y1 = x0 + rng.randint(10, width // 2), y0 + rng.randint(10, height // 2)
            colour = tuple(rng.randrange(256) for _ in range(3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1),
                                                                    fill=colour)
        noise = Image.effect_noise((width, height), rng.uniform(10, 40)).convert("RGB")
        image = Image.blend(image.filter(ImageFilter.GaussianBlur(1)), noise, 0.15)
        kind = ("jpg", "png", "webp")[n % 3]
        name = f"gen-{n:03d}.{kind}"
        if kind == "jpg":
            image.save(directory / name, "JPEG", quality=rng.randint(70, 92))
        elif kind == "png":
            image.save(directory / name, "PNG")
        else:
            image.save(directory / name, "WEBP", quality=80)
        names.append(name)
    return names


@dataclass
class Origin:
    """``python -m http.server`` over a directory (it ignores the query string)."""

    address: str
    directory: Path
    photos: list[str]
    generated: list[str]
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    def start(self, log: Path) -> None:
        self.port = free_port_on([self.address])
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "http.server", str(self.port), "--bind", self.address,
                 "--directory", str(self.directory)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )

        def ready() -> bool:
            try:
                return http_get(self.address, self.port, "/", 2.0)[0] == 200
            except OSError:
                return False

        wait_until(ready, 30, "the origin", [])

    def url(self, name: str) -> str:
        return f"http://{self.address}:{self.port}/{name}"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(10)


def prepare_origin(directory: Path, address: str, generated: int) -> Origin:
    directory.mkdir(parents=True, exist_ok=True)
    photos = []
    if CORPUS.is_dir():
        for path in sorted(CORPUS.iterdir()):
            if path.suffix in (".jpg", ".png", ".webp", ".gif"):
                shutil.copyfile(path, directory / path.name)
                photos.append(path.name)
    existing = sorted(p.name for p in directory.glob("gen-*"))
    names = existing if len(existing) == generated else generate_images(directory, generated)
    return Origin(address, directory, photos, names)


# --- the load ---------------------------------------------------------------------------------


@dataclass
class Result:
    at: float  # seconds since the load started
    kind: str  # "hit", "miss-size", "miss-source", "expect-404", "expect-400"
    status: int  # 0 for a connection error or time-out
    latency: float
    cache: str  # the X-Cache header, or ""


EXPECTED = {"hit": 200, "miss-size": 200, "miss-source": 200, "expect-404": 404,
            "expect-400": 400}


class Mix:
    """Chooses the next request; remembers what answered 200 so hits can repeat it."""

    def __init__(self, origin: Origin, miss_ratio: float, error_ratio: float, seed: int):
        self.origin = origin
        self.miss_ratio = miss_ratio
        self.error_ratio = error_ratio
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counter = 0
        self.sources: collections.deque[str] = collections.deque(maxlen=300)
        self.answered: collections.deque[str] = collections.deque(maxlen=1500)
        self.used: set[str] = set()

    def _source(self) -> str:
        self.counter += 1
        photos, generated = self.origin.photos, self.origin.generated
        pool = photos if photos and self.rng.random() < 0.15 else generated
        url = f"{self.origin.url(self.rng.choice(pool))}?v={self.counter}"
        self.sources.append(url)
        return url

    def _variant(self, url: str) -> str:
        while True:
            params: list[tuple[str, str]] = [("url", url), ("w", str(self.rng.randint(16, 900)))]
            roll = self.rng.random()
            if roll < 0.3:
                params += [("h", str(self.rng.randint(16, 900))),
                           ("fit", self.rng.choice(("cover", "fill", "contain")))]
            if self.rng.random() < 0.25:
                params.append(("format", self.rng.choice(("jpeg", "webp", "png"))))
            if self.rng.random() < 0.25:
                params.append(("q", str(self.rng.randint(40, 95))))
            query = "/image?" + urllib.parse.urlencode(params, quote_via=urllib.parse.quote)
            if query not in self.used:
                self.used.add(query)
                return query

    def next(self) -> tuple[str, str]:
        with self.lock:
            roll = self.rng.random()
            if roll < self.error_ratio:
                if self.rng.random() < 0.5:
                    self.counter += 1
                    missing = self.origin.url(f"missing-{self.counter}.jpg")
                    return "expect-404", "/image?" + urllib.parse.urlencode(
                        [("url", missing), ("w", "100")], quote_via=urllib.parse.quote)
                url = self.sources[-1] if self.sources else self.origin.url("x.jpg")
                return "expect-400", "/image?" + urllib.parse.urlencode(
                    [("url", url), ("w", self.rng.choice(("0", "99999", "abc")))],
                    quote_via=urllib.parse.quote)
            if roll < self.error_ratio + self.miss_ratio or not self.answered:
                if self.sources and self.rng.random() < 0.5:
                    return "miss-size", self._variant(self.rng.choice(self.sources))
                return "miss-source", self._variant(self._source())
            return "hit", self.rng.choice(self.answered)

    def answered_ok(self, query: str) -> None:
        with self.lock:
            self.answered.append(query)


class Client:
    """A keep-alive HTTP/1.1 connection, reopened after any failure."""

    def __init__(self, host: str, port: int, timeout: float):
        self.host, self.port, self.timeout = host, port, timeout
        self.connection: http.client.HTTPConnection | None = None
        self.reconnects = 0

    def get(self, path: str) -> tuple[int, str]:
        if self.connection is None:
            self.connection = http.client.HTTPConnection(self.host, self.port,
                                                         timeout=self.timeout)
            self.reconnects += 1
        try:
            self.connection.request("GET", path)
            response = self.connection.getresponse()
            response.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        if response.will_close:
            self.close()
        return response.status, response.getheader("X-Cache") or ""

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


@dataclass
class Load:
    """``concurrency`` threads sending the mix to one target until ``stop`` is set."""

    target: Target
    mix: Mix
    concurrency: int
    timeout: float
    results: list[Result] = field(default_factory=list)
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    reconnects: int = 0
    started: float = 0.0
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def begin(self, started: float) -> None:
        self.started = started
        for n in range(self.concurrency):
            thread = threading.Thread(target=self._run, name=f"{self.target.name}-{n}",
                                      daemon=True)
            self.threads.append(thread)
            thread.start()

    def _run(self) -> None:
        client = Client(self.target.entry.address, self.target.entry.port, self.timeout)
        while not self.stop.is_set():
            kind, query = self.mix.next()
            began = time.monotonic()
            try:
                status, cache = client.get(query)
            except (OSError, http.client.HTTPException) as error:
                status, cache = 0, ""
                self.failures[type(error).__name__] += 1
            ended = time.monotonic()
            # list.append is atomic under the GIL: no lock on the hot path.
            self.results.append(Result(began - self.started, kind, status, ended - began, cache))
            if status == 200 and kind != "hit":
                self.mix.answered_ok(query)
        client.close()
        self.reconnects += client.reconnects

    def end(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(self.timeout + 5)


# --- sampling ---------------------------------------------------------------------------------


def read_status(pid: int) -> dict[str, int]:
    """VmRSS (bytes), Threads, open descriptors and CPU seconds x100 of ``pid``."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key == "VmRSS":
                values["rss"] = int(rest.split()[0]) * 1024
            elif key == "Threads":
                values["threads"] = int(rest)
    values["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    values["cpu_ticks"] = int(fields[11]) + int(fields[12])  # utime + stime
    return values


@dataclass
class Sampler:
    """Reads every watched process once a second, on the second."""

    nodes: list[Node]
    started: float
    samples: dict[str, list[tuple[float, dict[str, int]]]] = field(default_factory=dict)
    load: list[tuple[float, float]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def begin(self) -> None:
        self.thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self.thread.start()

    def sample(self) -> None:
        now = time.monotonic() - self.started
        for node in self.nodes:
            try:
                values = read_status(node.pid)
            except (OSError, ValueError):
                continue
            self.samples.setdefault(node.name, []).append((now, values))
        with open("/proc/loadavg") as loadavg:
            self.load.append((now, float(loadavg.read().split()[0])))

    def _run(self) -> None:
        tick = 0
        while not self.stop.is_set():
            self.sample()
            tick += 1
            delay = self.started + tick - time.monotonic()
            if delay > 0:
                self.stop.wait(delay)

    def end(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(5)


@dataclass
class MallocProbe:
    """glibc's view of a node once the load stopped, and what ``malloc_trim(0)`` gave back."""

    rss_before: float  # MiB
    system: float  # MiB the allocator holds (all arenas and mmaps)
    in_use: float  # MiB of it actually allocated
    rss_after_trim: float  # MiB


def malloc_probe(node: Node) -> MallocProbe | None:
    """Attach gdb to ``node`` for a moment: ``malloc_stats()`` then ``malloc_trim(0)``.

    Freed memory that glibc keeps in its per-thread arenas counts as resident; a leak is
    memory still in use. Only run after the load stopped: the node pauses while attached.
    """
    gdb = shutil.which("gdb")
    if gdb is None or not node.alive():
        return None
    before = read_status(node.pid)["rss"] / MIB
    offset = node.log_path.stat().st_size
    try:
        subprocess.run(
            [gdb, "-p", str(node.pid), "-batch", "-nx", "-ex", "call (void)malloc_stats()",
             "-ex", "call (int)malloc_trim(0)"],
            capture_output=True, timeout=180, check=False,
        )
    except subprocess.TimeoutExpired:
        return None
    after = read_status(node.pid)["rss"] / MIB
    with open(node.log_path, "rb") as log:
        log.seek(offset)
        text = log.read().decode("utf-8", "replace")
    # malloc_stats writes to the C stderr, i.e. the log: the last "Total" block is ours.
    total = text.rpartition("Total (incl. mmap):")[2].splitlines()
    numbers = [int(line.split("=")[1]) for line in total[:3] if "bytes" in line]
    if len(numbers) < 2:
        return None
    return MallocProbe(before, numbers[0] / MIB, numbers[1] / MIB, after)


# --- analysis ---------------------------------------------------------------------------------


def slope_per_minute(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute (0 for under 2 points)."""
    if len(points) < 2:
        return 0.0
    xs = [x for x, _ in points]
    ys = [y for _, y in points]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread == 0:
        return 0.0
    return 60.0 * sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread


def slope_error_per_minute(points: Sequence[tuple[float, float]]) -> float:
    """Standard error of that slope, per minute: how much of it the noise alone explains."""
    if len(points) < 3:
        return float("nan")
    slope = slope_per_minute(points) / 60.0
    xs = [x for x, _ in points]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(y for _, y in points)
    residuals = sum((y - (mean_y + slope * (x - mean_x))) ** 2 for x, y in points)
    spread = sum((x - mean_x) ** 2 for x in xs)
    return 60.0 * (residuals / (len(points) - 2) / spread) ** 0.5


def window_minima(points: Sequence[tuple[float, float]], window: float
                  ) -> list[tuple[float, float]]:
    """The lowest value of each ``window`` seconds, at the window's middle.

    RSS under a decode-heavy load is a saw: a large image allocates tens of MiB and frees
    them again. A leak raises the floor of the saw; the floor's trend is the steadier signal.
    """
    buckets: dict[int, float] = {}
    for x, y in points:
        index = int(x // window)
        buckets[index] = min(y, buckets.get(index, y))
    return [((index + 0.5) * window, y) for index, y in sorted(buckets.items())]


def percentile(values: Sequence[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclass
class ProcessSummary:
    name: str
    pid: int
    rss_start: float  # MiB, first sample under load
    rss_warm: float  # MiB, at the start of the second half
    rss_peak: float
    rss_end: float
    trend_second_half: float  # MiB/min
    trend_after_warmup: float  # MiB/min, from --warmup seconds on
    trend_error: float  # standard error of trend_second_half
    floor_trend: float  # MiB/min of the 30-second minima over the second half
    threads: tuple[int, int]
    fds: tuple[int, int]
    cpu_seconds: float
    probe: MallocProbe | None


def summarise_process(node: Node, samples: list[tuple[float, dict[str, int]]],
                      duration: float, warmup: float,
                      probe: MallocProbe | None = None) -> ProcessSummary:
    rss = [(t, v["rss"] / MIB) for t, v in samples if t >= 0]
    half = [(t, r) for t, r in rss if t >= duration / 2]
    warm = [(t, r) for t, r in rss if t >= warmup]
    ticks = os.sysconf("SC_CLK_TCK")
    return ProcessSummary(
        name=node.name, pid=node.pid,
        rss_start=rss[0][1], rss_warm=half[0][1] if half else rss[-1][1],
        rss_peak=max(r for _, r in rss), rss_end=rss[-1][1],
        trend_second_half=slope_per_minute(half), trend_after_warmup=slope_per_minute(warm),
        trend_error=slope_error_per_minute(half),
        floor_trend=slope_per_minute(window_minima(half, 30.0)),
        threads=(samples[0][1]["threads"], samples[-1][1]["threads"]),
        fds=(samples[0][1]["fds"], samples[-1][1]["fds"]),
        cpu_seconds=(samples[-1][1]["cpu_ticks"] - samples[0][1]["cpu_ticks"]) / ticks,
        probe=probe,
    )


@dataclass
class TargetSummary:
    name: str
    duration: float
    requests: int
    by_kind: dict[str, collections.Counter[int]]
    cache_of_hits: collections.Counter[str]
    latency: dict[str, tuple[float, float, float, float]]  # p50, p90, p99, max in ms
    unexpected: collections.Counter[str]
    server_errors: int
    connection_errors: dict[str, int]
    processes: list[ProcessSummary]
    reconnects: int


def summarise(load: Load, sampler: Sampler, duration: float, warmup: float,
              probes: dict[str, MallocProbe | None]) -> TargetSummary:
    by_kind: dict[str, collections.Counter[int]] = {}
    latencies: dict[str, list[float]] = collections.defaultdict(list)
    unexpected: collections.Counter[str] = collections.Counter()
    cache_of_hits: collections.Counter[str] = collections.Counter()
    server_errors = 0
    for result in load.results:
        by_kind.setdefault(result.kind, collections.Counter())[result.status] += 1
        latencies[result.kind].append(result.latency * 1000)
        if result.status != EXPECTED[result.kind]:
            unexpected[f"{result.kind}: {result.status or 'connection error'}"] += 1
        if result.status >= 500:
            server_errors += 1
        if result.kind == "hit" and result.status == 200:
            cache_of_hits[result.cache] += 1
    latency = {
        kind: (percentile(v, 0.5), percentile(v, 0.9), percentile(v, 0.99), max(v))
        for kind, v in sorted(latencies.items())
    }
    processes = [
        summarise_process(node, sampler.samples[node.name], duration, warmup,
                          probes.get(node.name))
        for node in load.target.nodes if sampler.samples.get(node.name)
    ]
    return TargetSummary(
        name=load.target.name, duration=duration, requests=len(load.results),
        by_kind=by_kind, cache_of_hits=cache_of_hits, latency=latency, unexpected=unexpected,
        server_errors=server_errors, connection_errors=dict(load.failures),
        processes=processes, reconnects=load.reconnects,
    )


def verdict(summary: TargetSummary, max_trend: float) -> list[str]:
    """What failed, one line each (empty: passed)."""
    problems = []
    if summary.unexpected:
        problems.append(f"{sum(summary.unexpected.values())} unexpected responses "
                        f"({dict(summary.unexpected)})")
    if summary.server_errors:
        problems.append(f"{summary.server_errors} 5xx responses")
    for process in summary.processes:
        if process.trend_second_half >= max_trend:
            problems.append(f"{process.name}: RSS rises {process.trend_second_half:.2f} MiB/min "
                            f"over the second half (limit {max_trend})")
    return problems


# --- output -----------------------------------------------------------------------------------


def plot(summary: TargetSummary, load: Load, sampler: Sampler, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True,
                                         gridspec_kw={"height_ratios": [3, 1]})
    for process in summary.processes:
        points = [(t / 60, v["rss"] / MIB) for t, v in sampler.samples[process.name] if t >= 0]
        (line,) = top.plot([x for x, _ in points], [y for _, y in points], linewidth=1,
                           label=f"{process.name} (trend {process.trend_second_half:+.2f} MiB/min)")
        half = [(x, y) for x, y in points if x * 60 >= summary.duration / 2]
        if len(half) >= 2:
            slope = process.trend_second_half  # MiB per minute
            mean_x = statistics.fmean(x for x, _ in half)
            mean_y = statistics.fmean(y for _, y in half)
            xs = [half[0][0], half[-1][0]]
            top.plot(xs, [mean_y + slope * (x - mean_x) for x in xs], linestyle="--",
                     color=line.get_color(), linewidth=1.5)
    top.axvline(summary.duration / 120, color="grey", linewidth=0.8, linestyle=":")
    top.set_ylabel("resident memory (MiB)")
    top.set_ylim(bottom=0)
    top.set_title(f"imgproxy soak, {summary.name}: VmRSS every second "
                  "(dashed: linear fit over the second half)")
    top.legend(loc="lower right", fontsize=8)
    top.grid(alpha=0.3)
    seconds = int(summary.duration) + 1
    per_second = [0] * seconds
    bad = [0] * seconds
    for result in load.results:
        index = min(seconds - 1, int(result.at))
        per_second[index] += 1
        if result.status != EXPECTED[result.kind]:
            bad[index] += 1
    minutes = [s / 60 for s in range(seconds)]
    bottom.plot(minutes, per_second, linewidth=0.6, label="requests/s")
    bottom.plot(minutes, bad, linewidth=0.8, color="red", label="unexpected responses/s")
    bottom.set_xlabel("minutes")
    bottom.set_ylabel("req/s")
    bottom.legend(loc="upper right", fontsize=8)
    bottom.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def markdown(summaries: list[TargetSummary], verdicts: dict[str, list[str]],
             context: dict[str, Any], max_trend: float) -> str:
    lines = [
        "# Soak: mixed hits and misses, resident memory every second",
        "",
        f"Command: `{context['command']}`  ",
        f"Commit: `{context['commit']}`, run {context['when']} "
        f"({'side by side' if context['side_by_side'] else 'one after the other'}).  ",
        f"Machine: {os.cpu_count()} cores shared with other engineers; load average over the run "
        f"{context['load_mean']:.1f} (min {context['load_min']:.1f}, max "
        f"{context['load_max']:.1f}); `uptime` before: `{context['uptime_before']}`, after: "
        f"`{context['uptime_after']}`.",
        "",
        f"Load: {context['concurrency']} keep-alive connections per target, closed loop; "
        f"{context['miss_ratio']:.0%} misses (half a new size of a recent source URL, half a "
        f"source URL never seen, `?v=N`), {context['error_ratio']:.0%} requests the contract "
        "answers with an error (origin 404, bad parameter 400: expected, not counted as errors), "
        "the rest hits (a request that already answered 200, from the last 1500). "
        f"Origin: `python -m http.server` on loopback over {context['photos']} real photos "
        f"({', '.join(context['photo_names']) or 'none'}) and {context['generated']} generated "
        "images (480..1600 px, JPEG/PNG/WebP); 15% of new sources are real photos. "
        f"Nodes run with `{' '.join(COMMON_ARGS)}` so that eviction runs throughout"
        + (f", environment `{' '.join(context['node_env'])}`" if context["node_env"] else "")
        + (", under tracemalloc (slower)" if context["tracemalloc"] else "") + ".",
        "",
    ]
    for summary in summaries:
        problems = verdicts[summary.name]
        lines += [
            f"## {summary.name}: {'PASS' if not problems else 'FAIL'}",
            "",
            f"Duration {summary.duration:.0f} s, {summary.requests} requests "
            f"({summary.requests / summary.duration:.1f}/s), "
            f"unexpected responses: {sum(summary.unexpected.values())}, "
            f"5xx: {summary.server_errors}, connection errors: "
            f"{sum(summary.connection_errors.values())} {summary.connection_errors or ''}, "
            f"connections opened: {summary.reconnects}.",
            "",
            "| kind | requests | statuses | p50 ms | p90 ms | p99 ms | max ms |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
        ]
        for kind, statuses in sorted(summary.by_kind.items()):
            p50, p90, p99, top = summary.latency[kind]
            status_text = ", ".join(f"{s or 'conn.err'}: {n}" for s, n in sorted(statuses.items()))
            lines.append(f"| {kind} | {sum(statuses.values())} | {status_text} | {p50:.1f} | "
                         f"{p90:.1f} | {p99:.1f} | {top:.0f} |")
        hits = sum(summary.cache_of_hits.values())
        lines += [
            "",
            "X-Cache of the repeated requests: "
            + ", ".join(f"{k or 'none'} {v} ({v / hits:.1%})"
                        for k, v in summary.cache_of_hits.most_common()) + " "
            "(a MISS here is an entry evicted under the size cap, or still in flight).",
            "",
            "| process | RSS start MiB | at half time | peak | end | trend 2nd half MiB/min "
            f"(± std. error) | floor trend 2nd half | trend after {context['warmup']:.0f} s | "
            "threads | fds | CPU s |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |",
        ]
        for p in summary.processes:
            lines.append(
                f"| {p.name} | {p.rss_start:.1f} | {p.rss_warm:.1f} | {p.rss_peak:.1f} | "
                f"{p.rss_end:.1f} | {p.trend_second_half:+.3f} ± {p.trend_error:.3f} | "
                f"{p.floor_trend:+.3f} | {p.trend_after_warmup:+.3f} | "
                f"{p.threads[0]} → {p.threads[1]} | {p.fds[0]} → {p.fds[1]} | "
                f"{p.cpu_seconds:.0f} |")
        if any(p.probe for p in summary.processes):
            lines += [
                "",
                "After the load stopped, `gdb -p PID -batch -ex 'call (void)malloc_stats()' -ex "
                "'call (int)malloc_trim(0)'` on each node: what glibc holds, what of it is in "
                "use, and the resident memory before and after handing the free part back.",
                "",
                "| process | RSS MiB | malloc holds | in use | RSS after malloc_trim |",
                "| --- | ---: | ---: | ---: | ---: |",
            ]
            for p in summary.processes:
                if p.probe is not None:
                    lines.append(f"| {p.name} | {p.probe.rss_before:.1f} | {p.probe.system:.1f} | "
                                 f"{p.probe.in_use:.1f} | {p.probe.rss_after_trim:.1f} |")
        lines += [
            "",
            "Trend: least-squares slope of VmRSS over the second half of the run; floor trend: "
            "the same over the lowest value of each 30 s (what a leak raises).",
            "",
            f"![RSS over time, {summary.name}](soak-{summary.name}.png)",
            "",
        ]
        if problems:
            lines += [f"- FAIL: {problem}" for problem in problems] + [""]
        else:
            lines += [f"No unexpected response, no 5xx, every RSS trend over the second half "
                      f"below {max_trend} MiB/min.", ""]
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------------


def compare_snapshots(old: Path, new: Path, top: int = 25) -> None:
    """The lines (and their callers) whose live allocations grew most from ``old`` to ``new``."""
    import tracemalloc

    before, after = tracemalloc.Snapshot.load(str(old)), tracemalloc.Snapshot.load(str(new))
    total = sum(s.size for s in after.statistics("filename"))
    print(f"traced: {sum(s.size for s in before.statistics('filename')) / MIB:.1f} MiB -> "
          f"{total / MIB:.1f} MiB")
    for stat in after.compare_to(before, "traceback")[:top]:
        print(f"{stat.size_diff / 1024:+10.0f} KiB {stat.count_diff:+7d} blocks "
              f"(now {stat.size / 1024:.0f} KiB)")
        for line in stat.traceback.format(limit=4):
            print("    " + line)


def shell(command: str) -> str:
    return subprocess.run(command, shell=True, capture_output=True, text=True,
                          cwd=REPOSITORY).stdout.strip()


def run_targets(targets: list[Target], mix_for: Any, args: argparse.Namespace,
                summaries: list[TargetSummary], plots: list[Any], loads_out: list[float]) -> None:
    for target in targets:
        target.start()
    started = time.monotonic()
    sampler = Sampler([n for t in targets for n in t.nodes], started)
    loads = [Load(t, mix_for(t), args.concurrency, args.timeout) for t in targets]
    sampler.begin()
    for load in loads:
        load.begin(started)
    names = ", ".join(t.name for t in targets)
    print(f"soak: load on {names} for {args.duration:.0f} s", flush=True)
    next_report = 60.0
    try:
        while (elapsed := time.monotonic() - started) < args.duration:
            time.sleep(min(1.0, args.duration - elapsed))  # the script's own clock
            if elapsed >= next_report:
                next_report += 60
                for load in loads:
                    bad = sum(1 for r in load.results if r.status != EXPECTED[r.kind])
                    rss = {n.name: sampler.samples.get(n.name, [(0, {"rss": 0})])[-1][1]["rss"]
                           // MIB for n in load.target.nodes}
                    print(f"  {elapsed:5.0f} s {load.target.name}: {len(load.results)} requests, "
                          f"{bad} unexpected, RSS MiB {rss}", flush=True)
                for target in targets:
                    for node in target.nodes:
                        if not node.alive():
                            raise RuntimeError(f"{node.name} died: see {node.log_path}")
    finally:
        for load in loads:
            load.stop.set()
        for load in loads:
            load.end()
        sampler.sample()
        sampler.end()
        probes: dict[str, MallocProbe | None] = {}
        for target in targets:
            for node in target.nodes:
                if args.malloc_probe:
                    probes[node.name] = malloc_probe(node)
                try:
                    status, body = http_get(node.address, node.port, "/metrics", 10)
                    (node.base / "metrics.txt").write_bytes(body)
                except (OSError, http.client.HTTPException):
                    pass
            target.stop()
    duration = min(args.duration, time.monotonic() - started)
    loads_out.extend(v for _, v in sampler.load)
    for load in loads:
        summary = summarise(load, sampler, duration, args.warmup, probes)
        summaries.append(summary)
        plots.append((summary, load, sampler))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load per target")
    parser.add_argument("--concurrency", type=int, default=8, help="connections per target")
    parser.add_argument("--miss-ratio", type=float, default=0.2)
    parser.add_argument("--error-ratio", type=float, default=0.01,
                        help="share of requests the contract answers 404 or 400")
    parser.add_argument("--targets", default="standalone,cluster")
    parser.add_argument("--sequential", action="store_true",
                        help="one target after the other rather than side by side")
    parser.add_argument("--generated", type=int, default=60, help="generated origin images")
    parser.add_argument("--warmup", type=float, default=60.0)
    parser.add_argument("--max-trend", type=float, default=0.5, help="MiB/min")
    parser.add_argument("--timeout", type=float, default=60.0, help="per request, seconds")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument("--node-env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment for every node (e.g. MALLOC_ARENA_MAX=2)")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="run nodes under tracemalloc (slower), snapshots every 60 s")
    parser.add_argument("--no-malloc-probe", dest="malloc_probe", action="store_false",
                        help="skip the end-of-run gdb probe (malloc_stats, malloc_trim)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("OLD", "NEW"),
                        help="print what grew between two tracemalloc snapshots, and exit")
    args = parser.parse_args(argv)
    args.work = args.work.resolve()
    args.results = args.results.resolve()
    if args.compare:
        compare_snapshots(*args.compare)
        return 0
    Node.extra_env = dict(item.split("=", 1) for item in args.node_env)
    Node.traced = args.tracemalloc

    # Addresses of our own in 127/8, away from other engineers' 127.0.0.x tests.
    net = f"127.{random.randint(100, 250)}.{random.randint(0, 255)}"
    run_dir = args.work / time.strftime("run-%Y%m%dT%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    context: dict[str, Any] = {
        "command": " ".join(["bench/.work/venv/bin/python", "bench/soak.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "commit": shell("git rev-parse --short HEAD"),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "uptime_before": shell("uptime"),
        "side_by_side": not args.sequential,
        "concurrency": args.concurrency, "miss_ratio": args.miss_ratio,
        "error_ratio": args.error_ratio, "node_env": args.node_env,
        "tracemalloc": args.tracemalloc, "warmup": args.warmup, "generated": args.generated,
    }
    origin = prepare_origin(args.work / "origin", f"{net}.10", args.generated)
    context["photos"] = len(origin.photos)
    context["photo_names"] = origin.photos
    origin.start(run_dir / "origin.log")
    builders = {
        "standalone": lambda: standalone_target(run_dir, f"{net}.2"),
        "cluster": lambda: cluster_target(run_dir, [f"{net}.3", f"{net}.4", f"{net}.5"]),
    }
    targets = [builders[name]() for name in args.targets.split(",")]
    seeds = iter(range(args.seed, args.seed + 100))

    def mix_for(target: Target) -> Mix:
        return Mix(origin, args.miss_ratio, args.error_ratio, next(seeds))

    summaries: list[TargetSummary] = []
    plots: list[Any] = []
    load_values: list[float] = []
    try:
        groups = [[t] for t in targets] if args.sequential else [targets]
        for group in groups:
            run_targets(group, mix_for, args, summaries, plots, load_values)
    finally:
        for target in targets:
            target.stop()
        origin.stop()
    context["uptime_after"] = shell("uptime")
    context["load_mean"] = statistics.fmean(load_values) if load_values else 0.0
    context["load_min"] = min(load_values, default=0.0)
    context["load_max"] = max(load_values, default=0.0)

    args.results.mkdir(parents=True, exist_ok=True)
    verdicts = {s.name: verdict(s, args.max_trend) for s in summaries}
    for summary, load, sampler in plots:
        plot(summary, load, sampler, args.results / f"soak-{summary.name}.png")
        raw = {name: [(t, v) for t, v in points] for name, points in sampler.samples.items()
               if name in {p.name for p in summary.processes}}
        (run_dir / f"samples-{summary.name}.json").write_text(json.dumps(raw))
    text = markdown(summaries, verdicts, context, args.max_trend)
    (args.results / "soak.md").write_text(text)
    print(text)
    failed = False
    for name, problems in verdicts.items():
        print(f"soak {name}: {'PASS' if not problems else 'FAIL'}")
        for problem in problems:
            print(f"  - {problem}")
        failed = failed or bool(problems)
    print(f"run files: {run_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
