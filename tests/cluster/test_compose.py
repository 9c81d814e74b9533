"""End to end: the compose project, scaled, serving images, losing a worker, gaining one.

Builds the images (the base image and the wheelhouse first, as `make docker-base` and
`scripts/wheelhouse` do), brings up `docker-compose.yml` plus the test-only
`docker-compose.test.yml` (an origin container; every gateway and the balancer published on
127.0.0.1 only) under a project name of its own, and always takes it down again with its
volumes. It talks to nothing but loopback and the containers it started.

Waiting on containers is polling against a deadline: these are real processes in real
containers, there is no clock to inject. Figures (timings, requests and failures while a
worker died) go to test-artifacts/compose-e2e.json.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
from PIL import Image
from twisted.trial.unittest import SkipTest, SynchronousTestCase

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
FILES = ("-f", "docker-compose.yml", "-f", "docker-compose.test.yml")
ORIGIN = "http://origin:8000"
ARTIFACTS = ROOT / "test-artifacts"
# Distinct sources in the request stream: enough that every worker owns some of them.
STREAM_KEYS = 60
# Client threads of the request stream, so also the most requests in flight at any moment.
STREAM_THREADS = 4

T = TypeVar("T")


def docker_unavailable() -> str | None:
    """Why this machine cannot run the test, or None when it can."""
    if shutil.which("docker") is None:
        return "no docker command on this machine"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        return f"the docker engine does not answer: {info.stderr.strip()[:200]}"
    compose = subprocess.run(
        [str(SCRIPTS / "compose"), "version"], capture_output=True, text=True, timeout=60
    )
    if compose.returncode != 0:
        return "neither `docker compose` nor `docker-compose` is installed"
    return None


def compose_environment(project: str) -> dict[str, str]:
    """The caller's environment less any compose or imgproxy setting of its own."""
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("IMGPROXY_", "COMPOSE_", "PROMETHEUS_", "GRAFANA_"))
    }
    environ.update(
        COMPOSE_PROJECT_NAME=project,
        # "127.0.0.1:" + ":8080" in docker-compose.yml: a free host port, on loopback only.
        IMGPROXY_PUBLISH="127.0.0.1:",
        IMGPROXY_CLUSTER_SECRET=base64.b64encode(os.urandom(32)).decode("ascii"),
        IMGPROXY_SIGNING_KEY="",
    )
    return environ


def run(command: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
    """Run ``command`` in the repository; its output, or a failure that shows it."""
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {done.returncode}\n"
            f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return done.stdout


def poll_until(check: Callable[[], T | None], timeout: float, what: str) -> T:
    """The first truthy result of ``check``, called until ``timeout`` seconds have gone."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            result = check()
        except (OSError, ValueError, KeyError) as e:  # not up yet: connection refused, bad JSON
            result, last = None, e
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f}s (last: {last!r})")
        time.sleep(0.25)


@contextmanager
def timed(figures: dict[str, Any], name: str) -> Iterator[None]:
    start = time.monotonic()
    yield
    figures[name] = round(time.monotonic() - start, 1)


@attrs.frozen
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


def get(port: int, path: str, timeout: float = 20) -> Response:
    """GET ``path`` from 127.0.0.1:``port``; HTTP error statuses are answers, not exceptions."""
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return Response(response.status, dict(response.headers.items()), response.read())
    except urllib.error.HTTPError as e:
        return Response(e.code, dict(e.headers.items()), e.read())


def image_path(source: str, **params: Any) -> str:
    return "/image?" + urllib.parse.urlencode({"url": f"{ORIGIN}{source}", **params})


def health(port: int) -> dict[str, Any]:
    response = get(port, "/health", timeout=5)
    if response.status != 200:
        raise ValueError(f"/health answered {response.status}")
    return json.loads(response.body)


def alive(members: list[dict[str, Any]], role: str) -> set[str]:
    """Names of the members of ``role`` that a /health document lists as alive."""
    return {m["name"] for m in members if m["role"] == role and m["state"] == "alive"}


class Compose:
    """The compose project under test, by its unique project name."""

    def __init__(self, project: str) -> None:
        self.project = project
        self.environ = compose_environment(project)

    def __call__(self, *args: str, timeout: float = 900) -> str:
        return run([str(SCRIPTS / "compose"), *FILES, "-p", self.project, *args],
                   timeout, self.environ)

    def containers(self, service: str) -> list[dict[str, Any]]:
        """``docker inspect`` of the service's containers, running or not."""
        ids = run(
            ["docker", "ps", "-aq",
             "--filter", f"label=com.docker.compose.project={self.project}",
             "--filter", f"label=com.docker.compose.service={service}"],
            60,
        ).split()
        return json.loads(run(["docker", "inspect", *ids], 60)) if ids else []

    def healthy(self, service: str, count: int) -> list[dict[str, Any]] | None:
        """The service's running containers when exactly ``count`` run and all are healthy."""
        running = [c for c in self.containers(service) if c["State"]["Running"]]
        if len(running) != count:
            return None
        if any(c["State"].get("Health", {}).get("Status") != "healthy" for c in running):
            return None
        return running

    def down(self) -> None:
        """Stop and remove everything of the project, its volumes too; safe to repeat."""
        try:
            self("down", "-v", "--remove-orphans", "-t", "15", timeout=300)
        finally:
            leftovers = run(
                ["docker", "ps", "-aq", "--filter",
                 f"label=com.docker.compose.project={self.project}"],
                60,
            ).split()
            if leftovers:
                run(["docker", "rm", "-fv", *leftovers], 120)

    def logs(self) -> str:
        try:
            return self("logs", "--no-color", "--tail", "80", timeout=120)
        except AssertionError as e:
            return str(e)


def published_port(container: dict[str, Any], port: str = "8080/tcp") -> int:
    """The host port a container publishes ``port`` on; it must be bound on loopback only."""
    bindings = container["NetworkSettings"]["Ports"][port]
    assert bindings and {b["HostIp"] for b in bindings} == {"127.0.0.1"}, bindings
    return int(bindings[0]["HostPort"])


@attrs.frozen
class Outcome:
    """One request of a ``RequestStream``: when it started and ended, and how it went."""

    started: float
    ended: float
    key: int
    status: int | None
    detail: str

    @property
    def ok(self) -> bool:
        return self.status == 200


class RequestStream:
    """Threads sending image requests through one port until stopped; every outcome kept."""

    def __init__(self, port: int, threads: int = STREAM_THREADS) -> None:
        self.port = port
        self._keys = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.outcomes: list[Outcome] = []
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                key = next(self._keys) % STREAM_KEYS
            started = time.monotonic()
            try:
                response = get(self.port, image_path(f"/img/{key}.jpg", w=64), timeout=20)
                status: int | None = response.status
                detail = "" if response.status == 200 else response.body[:200].decode("latin-1")
            except OSError as e:
                status, detail = None, f"{type(e).__name__}: {e}"
            with self._lock:
                self.outcomes.append(Outcome(started, time.monotonic(), key, status, detail))

    def started_between(self, start: float, end: float = float("inf")) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if start <= o.started < end]

    def keys_served_since(self, moment: float) -> set[int]:
        return {o.key for o in self.started_between(moment) if o.ok}


@pytest.mark.slow
class ComposeClusterTests(SynchronousTestCase):
    """`docker compose up --scale gateway=2 --scale worker=3` is one working cluster."""

    def setUp(self) -> None:
        # Building the images takes minutes: `make test` stays quick, `make test-docker`
        # (which .ci/run calls after it) sets this and runs the whole thing.
        if os.environ.get("IMGPROXY_DOCKER_TESTS") != "1":
            raise SkipTest("the compose end-to-end test runs with `make test-docker`")
        reason = docker_unavailable()
        if reason:
            raise SkipTest(reason)

    def test_scaled_cluster_serves_survives_a_dead_worker_and_scales(self) -> None:
        figures: dict[str, Any] = {}
        self.addCleanup(self._write_figures, figures)
        with timed(figures, "docker_base_s"):
            run([str(SCRIPTS / "docker-base")], 1200)
        with timed(figures, "wheelhouse_s"):
            run([str(SCRIPTS / "wheelhouse")], 600, {**os.environ, "PYTHON": sys.executable})

        compose = Compose(f"imgproxytest{uuid.uuid4().hex[:10]}")
        self.addCleanup(compose.down)
        try:
            self._scenario(compose, figures)
        except BaseException:
            # The containers' own account of what went wrong, before cleanup removes them.
            print(compose.logs(), file=sys.stderr)
            raise

    def _scenario(self, compose: Compose, figures: dict[str, Any]) -> None:
        # worker and origin run the image the gateway service builds.
        with timed(figures, "build_s"):
            compose("build", "gateway", "lb")
        with timed(figures, "up_to_healthy_s"):
            compose("up", "-d", "--scale", "gateway=2", "--scale", "worker=3")
            for service, count in [("gateway", 2), ("worker", 3), ("lb", 1), ("origin", 1)]:
                poll_until(lambda s=service, n=count: compose.healthy(s, n), 180,
                           f"{count} healthy {service} containers")
        gateways = compose.healthy("gateway", 2)
        workers = compose.healthy("worker", 3)
        assert gateways and workers
        gateway_ports = [published_port(c) for c in gateways]
        lb_port = published_port(compose.healthy("lb", 1)[0])  # type: ignore[index]
        gateway_names = {c["Config"]["Hostname"] for c in gateways}
        worker_names = {c["Config"]["Hostname"] for c in workers}

        with timed(figures, "cluster_formed_s"):
            for port in gateway_ports:
                poll_until(
                    lambda p=port: alive(health(p)["members"], "worker") == worker_names
                    and alive(health(p)["members"], "gateway") == gateway_names,
                    60, f"gateway on port {port} knowing all five members alive",
                )

        self._images_through_every_gateway(gateway_ports, lb_port)
        self._balancer_spreads_over_every_gateway(lb_port, gateway_names)
        self._worker_killed_under_a_request_stream(
            compose, workers[0], gateway_ports, lb_port, figures
        )
        gateways, workers = self._scaled_up(compose, lb_port, figures)

        with timed(figures, "stop_s"):
            self._stopped_gracefully(compose, gateways + workers)
        with timed(figures, "down_s"):
            compose.down()
        self.assertEqual(compose.containers("worker") + compose.containers("gateway"), [])

    def _images_through_every_gateway(self, gateway_ports: list[int], lb_port: int) -> None:
        path = image_path("/photo.jpg", w=100)
        first = get(gateway_ports[0], path)
        self.assertEqual((first.status, first.headers["Content-Type"]), (200, "image/jpeg"))
        self.assertEqual(Image.open(io.BytesIO(first.body)).size, (100, 75))
        self.assertEqual(first.headers["X-Cache"], "MISS")
        # The worker that owns the key cached it: every other gateway finds it there.
        for port in gateway_ports[1:] + [lb_port]:
            again = get(port, path)
            self.assertEqual((again.status, again.headers["X-Cache"]), (200, "HIT"))
            self.assertEqual(again.body, first.body)
        for port in gateway_ports:
            webp = get(port, image_path("/logo.png", w=150, format="webp"))
            self.assertEqual((webp.status, webp.headers["Content-Type"]), (200, "image/webp"))
            self.assertEqual(Image.open(io.BytesIO(webp.body)).size, (150, 100))
        missing = get(lb_port, image_path("/nothing-here.jpg"))
        self.assertEqual(missing.status, 404)
        self.assertEqual(json.loads(missing.body)["status"], 404)

    def _balancer_spreads_over_every_gateway(self, lb_port: int, names: set[str]) -> None:
        seen: set[str] = set()

        def every_gateway_answered() -> bool:
            seen.update(health(lb_port)["name"] for _ in range(10))
            return seen == names

        poll_until(every_gateway_answered, 30, f"the balancer reaching all {len(names)} gateways")
        self.assertEqual(seen, names)

    def _worker_killed_under_a_request_stream(
        self,
        compose: Compose,
        victim: dict[str, Any],
        gateway_ports: list[int],
        lb_port: int,
        figures: dict[str, Any],
    ) -> None:
        stream = RequestStream(lb_port)
        stream.start()
        try:
            # Warm up: every key cached once, spread over all three workers.
            poll_until(lambda: len(stream.keys_served_since(0)) == STREAM_KEYS, 120,
                       "every stream key served once")
            victim_name = victim["Config"]["Hostname"]
            killed_at = time.monotonic()
            run(["docker", "kill", victim["Id"]], 60)
            for port in gateway_ports:
                poll_until(
                    lambda p=port: victim_name not in alive(health(p)["members"], "worker"),
                    60, f"gateway on port {port} noticing the killed worker",
                )
            noticed_at = time.monotonic()
            # After that, the stream goes once more through every key: all of them served.
            poll_until(
                lambda: len(stream.keys_served_since(noticed_at)) == STREAM_KEYS, 120,
                "every stream key served by the surviving workers",
            )
        finally:
            stream.stop()
        # A request belongs to the phase it started in: one that went to the worker just
        # before it died may well end after the gateways noticed.
        during = stream.started_between(killed_at, noticed_at)
        after = stream.started_between(noticed_at)
        failures_during = [o for o in during if not o.ok]
        failures_after = [o for o in after if not o.ok]
        figures["worker_kill"] = {
            "requests_total": len(stream.outcomes),
            "detected_after_s": round(noticed_at - killed_at, 1),
            "requests_until_detected": len(during),
            "failures_until_detected": len(failures_during),
            "requests_after_detected": len(after),
            "failures_after_detected": len(failures_after),
            "failures": [
                {"started_s": round(o.started - killed_at, 2),
                 "took_s": round(o.ended - o.started, 2),
                 "key": o.key, "status": o.status, "detail": o.detail}
                for o in failures_during + failures_after
            ][:10],
        }
        if failures_during or failures_after:
            # What the gateways said about them: the detail an operator would look for.
            lines = compose("logs", "--no-color", "gateway", timeout=120).splitlines()
            figures["worker_kill"]["gateway_log"] = [
                line for line in lines if "fail" in line.lower() or "error" in line.lower()
            ][:40]
        # Once the cluster knows, nothing may fail. Before, the gateways fail over to the next
        # worker; at most the requests in flight when the worker died may be lost.
        self.assertEqual(failures_after, [], figures)
        self.assertLessEqual(len(failures_during), STREAM_THREADS, figures)

    def _scaled_up(
        self, compose: Compose, lb_port: int, figures: dict[str, Any]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Four workers and a third gateway: the cluster and the balancer take them in."""
        with timed(figures, "scale_up_s"):
            compose("up", "-d", "--no-recreate", "--scale", "gateway=3", "--scale", "worker=4")
            workers = poll_until(lambda: compose.healthy("worker", 4), 180,
                                 "four healthy worker containers")
            gateways = poll_until(lambda: compose.healthy("gateway", 3), 180,
                                  "three healthy gateway containers")
            worker_names = {c["Config"]["Hostname"] for c in workers}
            gateway_names = {c["Config"]["Hostname"] for c in gateways}
            for port in [published_port(c) for c in gateways]:
                poll_until(
                    lambda p=port: alive(health(p)["members"], "worker") == worker_names
                    and alive(health(p)["members"], "gateway") == gateway_names,
                    60, f"gateway on port {port} knowing three gateways and four workers alive",
                )
        # The balancer re-resolves the service name: the new gateway gets requests too.
        self._balancer_spreads_over_every_gateway(lb_port, gateway_names)
        for key in range(STREAM_KEYS):
            response = get(lb_port, image_path(f"/img/{key}.jpg", w=48))
            self.assertEqual(response.status, 200, response.body[:200])
        return gateways, workers

    def _stopped_gracefully(self, compose: Compose, nodes: list[dict[str, Any]]) -> None:
        """SIGTERM ends every node in time, on its own, with exit status 0."""
        compose("stop", "-t", "20", timeout=300)
        ids = [c["Id"] for c in nodes]
        states = {c["Config"]["Hostname"]: c["State"] for c in json.loads(
            run(["docker", "inspect", *ids], 60))}
        self.assertEqual(
            {name: (state["Running"], state["ExitCode"]) for name, state in states.items()},
            {name: (False, 0) for name in states},
        )

    def _write_figures(self, figures: dict[str, Any]) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "compose-e2e.json").write_text(json.dumps(figures, indent=2) + "\n")


def load_healthcheck() -> Any:
    """docker/healthcheck.py, which the image runs as a script, loaded as a module."""
    spec = importlib.util.spec_from_file_location(
        "imgproxy_healthcheck", ROOT / "docker" / "healthcheck.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _StatusHandler(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        body = b'{"state": "alive"}' if self.path == "/health" else b"{}"
        self.send_response(self.status if self.path == "/health" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class HealthCheckTests(SynchronousTestCase):
    """The container health check finds the node's port the way the node does, and asks it."""

    def setUp(self) -> None:
        self.healthcheck = load_healthcheck()

    def test_port_defaults_to_8080(self) -> None:
        self.assertEqual(self.healthcheck.http_port({}), 8080)

    def test_port_from_a_strports_description(self) -> None:
        self.assertEqual(self.healthcheck.http_port({"IMGPROXY_HTTP": "tcp:9000"}), 9000)
        self.assertEqual(
            self.healthcheck.http_port({"IMGPROXY_HTTP": "tcp:port=9001:interface=0.0.0.0"}),
            9001,
        )

    def test_port_from_the_bare_http_port_variable_unless_imgproxy_http_is_set(self) -> None:
        self.assertEqual(self.healthcheck.http_port({"HTTP_PORT": "7000"}), 7000)
        self.assertEqual(
            self.healthcheck.http_port({"HTTP_PORT": "7000", "IMGPROXY_HTTP": "tcp:7001"}), 7001
        )

    def _exit_status_against(self, status: int) -> int:
        handler = type("Handler", (_StatusHandler,), {"status": status})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 5)
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        environ = {"IMGPROXY_HTTP": f"tcp:{server.server_address[1]}"}
        with mock_environ(environ):
            return self.healthcheck.main()

    def test_healthy_when_health_answers_200(self) -> None:
        self.assertEqual(self._exit_status_against(200), 0)

    def test_unhealthy_when_health_answers_an_error(self) -> None:
        self.assertEqual(self._exit_status_against(503), 1)

    def test_unhealthy_when_nothing_listens(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            free_port = probe.getsockname()[1]
        with mock_environ({"IMGPROXY_HTTP": f"tcp:{free_port}"}):
            self.assertEqual(self.healthcheck.main(), 1)


@contextmanager
def mock_environ(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with only ``values`` for the node's HTTP settings, restored after."""
    saved = {key: os.environ.get(key) for key in ("IMGPROXY_HTTP", "HTTP_PORT")}
    for key in saved:
        os.environ.pop(key, None)
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
