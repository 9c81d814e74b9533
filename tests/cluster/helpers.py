"""A real cluster on loopback for the cluster tests and ``bench/cluster.py``.

``LoopbackCluster`` starts gateways and workers as ``twistd -n imgproxy``
processes (``tests.processes``), each on its own 127.0.0.X address with the same
HTTP and gossip ports, in front of a loopback test origin (``tests.origins``)
that serves a distinct small JPEG at ``/img/<n>.jpg`` and counts hits.
``RequestStream`` is a steady stream of image requests from client threads that
records every outcome; ``GossipPartition`` cuts one address's gossip with
iptables and heals it. Waiting on real processes is polling against a wall-clock
deadline (there is no event to wait on), always through the reactor so the
origin keeps serving meanwhile.
"""

from __future__ import annotations

import atexit
import base64
import functools
import http.client
import io
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from urllib.parse import quote, urlencode

import attrs
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from imgproxy.params import source_key_of
from imgproxy.placement import Placement, WorkerRef
from tests.origins import Origin, start_origin
from tests.processes import (
    ImgproxyProcess,
    Reply,
    close_origin,
    in_thread,
    request,
    start_all_async,
    stop_all,
)

GATEWAY_ADDRESSES = ("127.0.0.2", "127.0.0.3")
WORKER_ADDRESSES = ("127.0.0.4", "127.0.0.5", "127.0.0.6", "127.0.0.7", "127.0.0.8")
ORIGIN_ADDRESS = "127.0.0.1"


def live_reactor() -> Any:
    """The global reactor: tests and scripts (not the package) may use it."""
    from twisted.internet import reactor

    return reactor


def common_free_port(addresses: Iterable[str]) -> int:
    """A port free for TCP and UDP on every one of ``addresses`` right now."""
    addresses = list(addresses)
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((addresses[0], 0))
            port = int(probe.getsockname()[1])
        sockets: list[socket.socket] = []
        try:
            for address in addresses:
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    s = socket.socket(socket.AF_INET, kind)
                    sockets.append(s)
                    s.bind((address, port))
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
        return port
    raise OSError(f"no port free on all of {addresses}")


@functools.lru_cache(maxsize=2048)
def small_jpeg(n: int) -> bytes:
    """A distinct 48x32 JPEG for every ``n``."""
    colour = ((n * 37) % 256, (n * 91) % 256, (n * 173) % 256)
    buffer = io.BytesIO()
    Image.new("RGB", (48, 32), colour).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def image_path(n: int) -> str:
    return f"/img/{n}.jpg"


def pause(reactor: Any, seconds: float) -> Deferred[None]:
    """Let ``seconds`` of wall time pass with the reactor running (real processes only)."""
    return deferLater(reactor, seconds, lambda: None)


async def wait_for(
    reactor: Any,
    check: Callable[[], Any],
    timeout: float,
    what: str,
    interval: float = 0.1,
) -> float:
    """Poll the blocking ``check`` on a thread until it returns a true value; the seconds
    it took. ``AssertionError`` naming ``what`` after ``timeout`` seconds."""
    started = time.monotonic()
    last: Any = None
    while True:
        try:
            last = await in_thread(reactor, check)
        except (OSError, http.client.HTTPException, ValueError) as error:
            last = error
            ok = False
        else:
            ok = bool(last)
        if ok:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not true within {timeout:g}s (last: {last!r})")
        await pause(reactor, interval)


def metric_values(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample of metric ``name`` (a sample name, ``_total`` included) by its labels."""
    values: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                values[tuple(sorted(sample.labels.items()))] = sample.value
    return values


@attrs.define
class Outcome:
    """One request of a ``RequestStream``: when, where, and the status (0: no answer)."""

    started: float
    ended: float
    gateway: str
    path: str
    status: int
    error: str = ""


class RequestStream:
    """``clients`` threads each sending image requests back to back until stopped.

    Each request goes to the next gateway in turn, for the next path of
    ``paths`` (cycled from a per-thread offset). A request that gets no answer
    within ``timeout`` seconds, or any status but 200, is a failure. With
    ``retry_other_gateway``, a request a gateway did not answer at all (refused,
    reset, timed out) is sent once more to another gateway, as a load balancer in
    front of the gateways would; both attempts are recorded.
    """

    def __init__(
        self,
        gateways: Sequence[str],
        paths: Sequence[str],
        clients: int = 4,
        timeout: float = 10.0,
        retry_other_gateway: bool = False,
    ) -> None:
        self.gateways = list(gateways)
        self.paths = list(paths)
        self.clients = clients
        self.timeout = timeout
        self.retry_other_gateway = retry_other_gateway
        self.outcomes: list[Outcome] = []  # list.append is atomic
        self.retried: list[Outcome] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> RequestStream:
        for index in range(self.clients):
            thread = threading.Thread(
                target=self._run, args=(index,), name=f"request-stream-{index}", daemon=True
            )
            self._threads.append(thread)
            thread.start()
        return self

    def stop(self) -> None:
        """Stop and join the threads (blocking; use ``in_thread`` from the reactor)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout * 2 + 5)

    def _one(self, gateway: str, path: str) -> Outcome:
        started = time.monotonic()
        try:
            reply = request(f"http://{gateway}{path}", timeout=self.timeout)
            status, error = reply.status, "" if reply.status == 200 else reply.body[:200].decode(
                "utf-8", "replace"
            )
        except (OSError, http.client.HTTPException) as e:
            status, error = 0, f"{type(e).__name__}: {e}"
        return Outcome(started, time.monotonic(), gateway, path, status, error)

    def _run(self, index: int) -> None:
        turn = index
        while not self._stop.is_set():
            gateway = self.gateways[turn % len(self.gateways)]
            path = self.paths[(turn * 7919 + index) % len(self.paths)]
            turn += 1
            outcome = self._one(gateway, path)
            if outcome.status == 0 and self.retry_other_gateway and len(self.gateways) > 1:
                self.retried.append(outcome)
                other = self.gateways[turn % len(self.gateways)]
                if other == gateway:
                    other = self.gateways[(turn + 1) % len(self.gateways)]
                outcome = self._one(other, path)
            self.outcomes.append(outcome)

    # -- what happened

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != 200]

    def between(self, start: float, end: float) -> list[Outcome]:
        """Requests that started in ``[start, end)`` (``time.monotonic`` seconds)."""
        return [o for o in self.outcomes if start <= o.started < end]

    def summary(self) -> str:
        statuses = Counter(o.status for o in self.outcomes)
        latencies = sorted(o.ended - o.started for o in self.outcomes) or [0.0]
        worst = latencies[-1]
        p99 = latencies[int(len(latencies) * 0.99) - 1 if len(latencies) > 1 else 0]
        return (
            f"{len(self.outcomes)} requests, {len(self.failures)} failed, statuses "
            f"{dict(sorted(statuses.items()))}, p99 {p99 * 1000:.0f} ms, max {worst * 1000:.0f} ms"
        )


class GossipPartition:
    """Drops every gossip packet (UDP and TCP) to and from one address with iptables.

    The rules carry a comment unique to this object and are removed by ``heal``
    (safe to call twice); register ``heal`` as a cleanup before ``cut``.
    """

    def __init__(self, address: str, gossip_port: int) -> None:
        self.address = address
        self.port = gossip_port
        self.comment = f"imgproxy-test-{os.getpid()}-{id(self):x}"
        self._rules: list[list[str]] = []

    @staticmethod
    def available() -> bool:
        """Whether iptables can be used here (root, and the binary present)."""
        if os.geteuid() != 0 or shutil.which("iptables") is None:
            return False
        probe = subprocess.run(
            ["iptables", "-w", "-S", "INPUT"], capture_output=True, timeout=10
        )
        return probe.returncode == 0

    def _rule_specs(self) -> list[list[str]]:
        specs = []
        for protocol in ("udp", "tcp"):
            for direction, other in (("-s", "-d"), ("-d", "-s")):
                specs.append([
                    direction, self.address, "!", other, self.address,
                    "-p", protocol, "--dport", str(self.port),
                    "-m", "comment", "--comment", self.comment, "-j", "DROP",
                ])
        return specs

    def cut(self) -> None:
        # Also at exit: a run interrupted mid-partition must not leave the rules behind.
        atexit.register(self.heal)
        for spec in self._rule_specs():
            subprocess.run(["iptables", "-w", "-I", "INPUT", *spec], check=True, timeout=10)
            self._rules.append(spec)

    def heal(self) -> None:
        while self._rules:
            spec = self._rules.pop()
            subprocess.run(["iptables", "-w", "-D", "INPUT", *spec], timeout=10)




class LoopbackCluster:
    """Gateways and workers on 127.0.0.X addresses, same ports, one origin on 127.0.0.1.

    ``start`` brings up ``gateways`` gateways and ``workers`` workers and waits
    until every node sees every other one alive. Workers are named ``w1``,
    ``w2``..., gateways ``g1``, ``g2``...
    """

    def __init__(
        self,
        gateways: int = 2,
        workers: int = 3,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.base_dir = tempfile.mkdtemp(prefix="imgproxy-cluster-")
        self.secret = base64.b64encode(os.urandom(16)).decode("ascii")
        self.extra_args = list(extra_args)
        everyone = [*GATEWAY_ADDRESSES, *WORKER_ADDRESSES]
        self.http_port = common_free_port(everyone)
        self.gossip_port = common_free_port(everyone)
        self.origin: Origin | None = None
        self.gateways = [self._node("gateway", f"g{i + 1}", GATEWAY_ADDRESSES[i])
                         for i in range(gateways)]
        self.workers = [self._node("worker", f"w{i + 1}", WORKER_ADDRESSES[i])
                        for i in range(workers)]

    # -- nodes

    def _node(self, role: str, name: str, address: str) -> ImgproxyProcess:
        seeds = [a for a in (*GATEWAY_ADDRESSES, WORKER_ADDRESSES[0]) if a != address]
        args = [
            "--role", role,
            "--node-name", name,
            "--bind", address,
            "--advertise", address,
            "--gossip-port", str(self.gossip_port),
            "--join", ",".join(f"{seed}:{self.gossip_port}" for seed in seeds),
            "--cluster-secret", self.secret,
            "--membership-profile", "local",
            "--allow-private-sources",
            *self.extra_args,
        ]
        return ImgproxyProcess(
            args,
            interface=address,
            port=self.http_port,
            base_dir=os.path.join(self.base_dir, name),
            name=name,
        )

    def add_worker(self) -> ImgproxyProcess:
        """A new worker (not started) on the next free worker address."""
        index = len(self.workers)
        worker = self._node("worker", f"w{index + 1}", WORKER_ADDRESSES[index])
        self.workers.append(worker)
        return worker

    @property
    def nodes(self) -> list[ImgproxyProcess]:
        return [*self.gateways, *self.workers]

    def node(self, name: str) -> ImgproxyProcess:
        return next(n for n in self.nodes if n.name == name)

    def worker_ref(self, worker: ImgproxyProcess) -> WorkerRef:
        return WorkerRef(worker.name, worker.interface, worker.port)

    def placement(self, workers: Iterable[ImgproxyProcess] | None = None) -> Placement:
        """The placement every gateway should compute over ``workers`` (default: all)."""
        chosen = self.workers if workers is None else workers
        return Placement([self.worker_ref(w) for w in chosen])

    # -- the origin and the image URLs

    def source_url(self, n: int) -> str:
        assert self.origin is not None
        return self.origin.url(image_path(n))

    def image_query(self, n: int, width: int = 24) -> str:
        """``/image?url=...&w=...`` of image ``n``."""
        query = urlencode([("url", self.source_url(n)), ("w", str(width))], quote_via=quote)
        return f"/image?{query}"

    def owner_of(self, n: int, workers: Iterable[ImgproxyProcess] | None = None) -> str:
        owner = self.placement(workers).owner(source_key_of(self.source_url(n)))
        assert owner is not None
        return owner.name

    def holders(self, n: int) -> list[str]:
        """Workers whose cache directory holds image ``n``'s source or a variant of it."""
        key = source_key_of(self.source_url(n))
        found = []
        for worker in self.workers:
            if os.path.isdir(os.path.join(worker.cache_dir, key[0:2], key[2:4], key)):
                found.append(worker.name)
        return found

    # -- life cycle

    async def serve_images(self, reactor: Any, images: int) -> Origin:
        """A fresh origin serving ``images`` distinct JPEGs; it replaces the previous one
        (close that with ``close_origin``). A new origin has a new port, so its image URLs
        are keys no node has seen."""
        origin = await start_origin(reactor, ORIGIN_ADDRESS)
        for n in range(images):
            origin.add(image_path(n), small_jpeg(n), "image/jpeg")
        self.origin = origin
        return origin

    async def start(self, reactor: Any, converge_timeout: float = 60.0) -> None:
        """Start every node and wait until they all see each other alive."""
        await start_all_async(reactor, self.nodes)
        await self.wait_converged(reactor, converge_timeout)

    async def restore(self, reactor: Any, timeout: float = 60.0) -> None:
        """Bring every node back (resume stopped ones, start dead ones) and wait until the
        cluster is whole again: what a test that hurt it leaves behind."""
        for node in self.nodes:
            node.kill(signal.SIGCONT)
        dead = [node for node in self.nodes if not node.running]
        if dead:
            await start_all_async(reactor, dead)
        await self.wait_converged(reactor, timeout)

    def stop_blocking(self) -> None:
        """Stop every node (SIGCONT, SIGTERM, then SIGKILL) and remove the files."""
        for node in self.nodes:
            node.kill(signal.SIGCONT)  # a stopped node must hear its SIGTERM
        stop_all(self.nodes, 10.0)
        shutil.rmtree(self.base_dir, ignore_errors=True)

    async def stop(self, reactor: Any) -> None:
        """``stop_blocking`` on a thread, then the origin."""
        await in_thread(reactor, self.stop_blocking)
        if self.origin is not None:
            await close_origin(reactor, self.origin)

    # -- what the nodes say

    def states(self, node: ImgproxyProcess) -> dict[str, str]:
        """``name -> state`` of every member ``node`` lists in its /health (blocking)."""
        reply = node.request("/health", timeout=2.0)
        return {m["name"]: m["state"] for m in reply.json()["members"]}

    def converged(self, expected: Sequence[ImgproxyProcess] | None = None) -> bool:
        """Every node of ``expected`` (default: the running ones) lists exactly those alive."""
        members = [n for n in (expected or self.nodes) if n.running]
        names = {n.name for n in members}
        for node in members:
            states = self.states(node)
            alive = {name for name, state in states.items() if state == "alive"}
            if alive != names:
                return False
        return True

    async def wait_converged(
        self, reactor: Any, timeout: float, expected: Sequence[ImgproxyProcess] | None = None
    ) -> float:
        return await wait_for(
            reactor, lambda: self.converged(expected), timeout, "the cluster converges"
        )

    def worker_requests(self, gateway: ImgproxyProcess) -> dict[str, float]:
        """``imgproxy_gateway_worker_requests_total`` of ``gateway``, by worker (blocking)."""
        text = gateway.request("/metrics", timeout=5.0).body.decode("utf-8")
        values = metric_values(text, "imgproxy_gateway_worker_requests_total")
        return {dict(labels)["worker"]: value for labels, value in values.items()}

    def metric(self, node: ImgproxyProcess, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        text = node.request("/metrics", timeout=5.0).body.decode("utf-8")
        return metric_values(text, name)

    def get(self, gateway: ImgproxyProcess, n: int, width: int = 24) -> Reply:
        """``GET`` image ``n`` through ``gateway`` (blocking)."""
        return gateway.request(self.image_query(n, width), timeout=15.0)


_shared: dict[Any, LoopbackCluster] = {}


async def shared_cluster(key: Any, reactor: Any, **kwargs: Any) -> LoopbackCluster:
    """One cluster per ``key`` (a test module), started on first use and made whole
    again (``restore``) on every later one; starting one stops the others.
    ``stop_shared_cluster(key)`` stops it (from ``tearDownModule``, which pytest runs);
    otherwise it stops when the run exits."""
    cluster = _shared.get(key)
    if cluster is None:
        # One cluster at a time: under trial, a module's cluster lives until the run
        # exits, and two of them would share two cores.
        for other in list(_shared):
            await in_thread(reactor, stop_shared_cluster, other)
        cluster = _shared[key] = LoopbackCluster(**kwargs)
        atexit.register(stop_shared_cluster, key)
        try:
            await cluster.start(reactor)
        except BaseException:
            stop_shared_cluster(key)
            raise
    else:
        await cluster.restore(reactor)
    return cluster


def stop_shared_cluster(key: Any) -> None:
    cluster = _shared.pop(key, None)
    if cluster is not None:
        cluster.stop_blocking()


class SharedClusterTestCase(TestCase):
    """Tests against their module's shared cluster, with a fresh origin of ``images``
    JPEGs each (its new port makes every image URL a key no node has seen)."""

    timeout = 150
    images = 60

    def setUp(self) -> Deferred[None]:
        self.reactor = live_reactor()
        return Deferred.fromCoroutine(self._set_up())

    async def _set_up(self) -> None:
        self.cluster = await shared_cluster(type(self).__module__, self.reactor)
        self.origin = await self.cluster.serve_images(self.reactor, self.images)
        self.addCleanup(lambda: Deferred.fromCoroutine(close_origin(self.reactor, self.origin)))
