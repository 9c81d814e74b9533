"""Monitoring, proven against the real thing: Prometheus, the Grafana dashboard, the status page.

The shared pieces of the three test modules live here:

- the dashboard (``docker/grafana/dashboards/imgproxy.json``) read as a list of
  ``DashboardTarget`` and the metric names each PromQL expression uses
  (``metric_names``);
- the compose Prometheus configuration (``docker/prometheus/prometheus.yml``) turned
  into a loopback copy whose DNS discovery is swapped for static targets
  (``loopback_config``);
- ``ensure_debs``, which installs a Debian package the test needs or says why not;
- ``plan_cluster`` and ``start_cluster``: a gateway and workers as real
  ``twistd -n imgproxy`` processes on random 127.x addresses, in front of a loopback
  origin serving JPEGs;
- ``LoopbackDns``: a DNS server on a loopback address, for Prometheus's service
  discovery (``dns_discovery_config`` keeps the configuration's discovery as written);
- ``PrometheusServer``: Debian's ``prometheus`` binary on loopback, with the HTTP API,
  optionally with its own ``/etc/resolv.conf`` pointing at a ``LoopbackDns``.

Waiting on real processes is polling against a wall-clock deadline (there is no event to
wait on), through the reactor, so the origin it runs keeps serving meanwhile.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, fail, gatherResults, maybeDeferred, succeed
from twisted.internet.task import deferLater
from twisted.names import dns
from twisted.names.error import DNSNameError
from twisted.names.server import DNSServerFactory

from imgproxy.params import source_key_of
from imgproxy.placement import Placement, WorkerRef
from tests.origins import Origin, start_origin
from tests.processes import (
    ImgproxyProcess,
    cluster_flags,
    free_port,
    in_thread,
    loopback_address,
    stop_all,
)

REPOSITORY = Path(__file__).resolve().parent.parent.parent
DOCKER = REPOSITORY / "docker"
DASHBOARD_PATH = DOCKER / "grafana" / "dashboards" / "imgproxy.json"
PROMETHEUS_CONFIG_PATH = DOCKER / "prometheus" / "prometheus.yml"
GRAFANA_DATASOURCES_PATH = DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_PROVIDER_PATH = DOCKER / "grafana" / "provisioning" / "dashboards" / "imgproxy.yml"
ARTIFACTS = REPOSITORY / "test-artifacts"

T = TypeVar("T")


# --- the dashboard ------------------------------------------------------------------------


@attrs.frozen
class DashboardTarget:
    """One query of one dashboard panel."""

    panel: str
    ref_id: str
    expr: str
    legend: str
    datasource_uid: str | None

    def __str__(self) -> str:
        return f"{self.panel!r} {self.ref_id}: {self.expr}"


def load_dashboard(path: Path = DASHBOARD_PATH) -> dict[str, Any]:
    """The dashboard JSON as a dict."""
    return json.loads(path.read_text("utf-8"))


def dashboard_panels(dashboard: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those folded inside rows included."""
    found: list[dict[str, Any]] = []
    for panel in dashboard.get("panels", []):
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def dashboard_targets(dashboard: Mapping[str, Any]) -> list[DashboardTarget]:
    """Every query of every panel, in the dashboard's order."""
    return [
        DashboardTarget(
            panel=panel.get("title", ""),
            ref_id=target.get("refId", ""),
            expr=target.get("expr", ""),
            legend=target.get("legendFormat", ""),
            datasource_uid=(target.get("datasource") or panel.get("datasource") or {}).get("uid"),
        )
        for panel in dashboard_panels(dashboard)
        for target in panel.get("targets", [])
    ]


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
# Not preceded by a digit, a dot or a letter: `1e3`, `0.99` and `5m` hold no metric name.
_IDENTIFIER = re.compile(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = frozenset({
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
    "group_left", "group_right", "inf", "nan", "atan2",
})


def metric_names(expr: str) -> frozenset[str]:
    """The metric names a PromQL expression selects.

    Label matchers, grouping clauses, ranges and strings are cut out first; what
    is left is functions (a name before ``(``), keywords, numbers and metric names.
    """
    if "__name__" in expr:
        raise ValueError(f"selecting by __name__ hides the metric name: {expr}")
    text = _STRING.sub(" ", expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        rest = text[match.end():].lstrip()
        if rest.startswith("("):
            continue  # a function or an aggregation
        if match.group().lower() in _KEYWORDS:
            continue
        names.add(match.group())
    return frozenset(names)


def legend_labels(legend: str) -> frozenset[str]:
    """The labels a ``legendFormat`` shows (``{{worker}}`` -> ``worker``)."""
    return frozenset(re.findall(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}", legend))


def exported_names(metrics_text: str) -> frozenset[str]:
    """Every sample name in a ``/metrics`` page (``_total``, ``_bucket``... included)."""
    return frozenset(
        sample.name
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
    )


# --- the Prometheus configuration ------------------------------------------------------------


@attrs.frozen
class DnsDiscovery:
    """A job's ``dns_sd_configs`` entry, as far as the loopback copy needs it."""

    job: str
    names: tuple[str, ...]
    type: str
    port: int


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _flow_list(value: str) -> list[str]:
    value = value.strip()
    if value.startswith("[") and value.endswith("]"):
        return [item.strip().strip("'\"") for item in value[1:-1].split(",") if item.strip()]
    return [value.strip("'\"")]


def _dns_blocks(lines: list[str]) -> Iterable[tuple[int, int, str, dict[str, str]]]:
    """(start, end, job, fields) of each ``dns_sd_configs:`` block (one entry each)."""
    job = ""
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        if stripped.startswith("- job_name:"):
            job = stripped.split(":", 1)[1].strip().strip("'\"")
        if stripped == "dns_sd_configs:":
            start, depth = i, _indent(lines[i])
            i += 1
            fields: dict[str, str] = {}
            while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > depth):
                key, _, value = lines[i].strip().lstrip("- ").partition(":")
                if key in fields:
                    raise ValueError(f"job {job}: one dns_sd_configs entry a job, please")
                if value.strip():
                    fields[key] = value.strip()
                i += 1
            yield start, i, job, fields
            continue
        i += 1


def dns_discoveries(config_text: str) -> list[DnsDiscovery]:
    """The DNS service discovery of every job in a Prometheus configuration."""
    return [
        DnsDiscovery(
            job=job,
            names=tuple(_flow_list(fields.get("names", "[]"))),
            type=fields.get("type", "SRV"),
            port=int(fields.get("port", "0")),
        )
        for _, _, job, fields in _dns_blocks(config_text.splitlines())
    ]


def loopback_config(
    config_text: str,
    targets: Mapping[str, Sequence[str]],
    prometheus_authority: str,
    scrape_interval: str = "1s",
) -> str:
    """``config_text`` with each DNS discovery replaced by static targets.

    ``targets`` maps a DNS name (``gateway``, ``worker``) to the ``host:port`` of
    every process it stands for; Prometheus's own job scrapes ``prometheus_authority``.
    Everything else (job names, paths, relabelling) stays as written, so what the
    test proves holds for the compose configuration.
    """
    lines = config_text.splitlines()
    out: list[str] = []
    position = 0
    for start, end, job, fields in _dns_blocks(lines):
        out.extend(lines[position:start])
        pad = " " * _indent(lines[start])
        addresses = [a for name in _flow_list(fields.get("names", "[]")) for a in targets[name]]
        if not addresses:
            raise ValueError(f"job {job}: no loopback target")
        out.append(f"{pad}static_configs:")
        out.append(f"{pad}  - targets: [{', '.join(addresses)}]")
        position = end
    out.extend(lines[position:])
    text = "\n".join(out) + "\n"
    text = re.sub(r"(?m)^(\s*scrape_interval:).*$", rf"\1 {scrape_interval}", text)
    text = re.sub(r"(?m)^(\s*scrape_timeout:).*$", rf"\1 {scrape_interval}", text)
    return text.replace("localhost:9090", prometheus_authority)


# --- Debian packages ----------------------------------------------------------------------

_debs: dict[str, str | None] = {}


def ensure_debs(*packages: str) -> str | None:
    """Install the Debian packages if missing; None when they are there, else why not."""
    key = " ".join(packages)
    if key not in _debs:
        try:
            done = subprocess.run(
                [str(REPOSITORY / "scripts" / "ensure-debs"), *packages],
                capture_output=True, text=True, timeout=600,
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            _debs[key] = f"cannot install Debian package(s) {key}: {error}"
        else:
            _debs[key] = None if done.returncode == 0 else (
                f"cannot install Debian package(s) {key}: {(done.stderr or done.stdout)[-500:]}"
            )
    return _debs[key]


# --- waiting --------------------------------------------------------------------------------


async def poll(
    reactor: Any,
    check: Callable[[], T | None],
    timeout: float,
    what: str,
    interval: float = 0.25,
) -> T:
    """Run blocking ``check`` on a thread until it returns something other than None.

    ``check`` may raise ``AssertionError`` to say "not yet, and here is why"; the
    last reason goes into the failure after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    last: str = "never checked"
    while True:
        try:
            result = await in_thread(reactor, check)
        except (AssertionError, OSError) as error:
            result, last = None, str(error)
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s; last: {last[:2000]}")
        await deferLater(reactor, interval, lambda: None)


# --- a cluster on loopback ------------------------------------------------------------------


def distinct_jpeg(index: int, size: tuple[int, int] = (96, 64)) -> bytes:
    """A small JPEG that differs from every other index (noise, seeded by the index)."""
    noise = Image.effect_noise(size, 20 + index).convert("RGB")
    tint = Image.new("RGB", size, ((index * 67) % 256, (index * 151) % 256, (index * 29) % 256))
    buffer = io.BytesIO()
    Image.blend(noise, tint, 0.5).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


@attrs.define
class LoopbackCluster:
    """One gateway and its workers as real processes, and the origin they fetch from."""

    gateway: ImgproxyProcess
    workers: list[ImgproxyProcess]
    origin: Origin
    image_urls: list[str]

    @property
    def processes(self) -> list[ImgproxyProcess]:
        return [self.gateway, *self.workers]

    def image_path(self, url: str, **params: object) -> str:
        """The gateway's ``/image`` path for ``url`` with transform ``params``."""
        query = [("url", url), *((k, str(v)) for k, v in params.items())]
        return "/image?" + urllib.parse.urlencode(query, quote_via=urllib.parse.quote)

    def owner_of(self, url: str) -> ImgproxyProcess:
        """The worker that owns ``url``'s images while every worker is alive."""
        placement = Placement([WorkerRef(w.name, w.interface, w.port) for w in self.workers])
        owner = placement.owner(source_key_of(url))
        assert owner is not None
        return next(w for w in self.workers if w.name == owner.name)

    def members_alive(self) -> bool | None:
        """True once the gateway sees every process alive (blocking; None: not yet)."""
        names = {p.name for p in self.processes}
        health = self.gateway.health()
        alive = {m["name"] for m in health["members"] if m["state"] == "alive"}
        if not names <= alive:
            raise AssertionError(f"gateway sees alive {sorted(alive)}, expected {sorted(names)}")
        shares = self.gateway.request("/status.json").json()["key_shares"]
        if set(shares) != {w.name for w in self.workers}:
            raise AssertionError(f"gateway places keys on {sorted(shares)}")
        return True


async def plan_cluster(
    testcase: Any,
    reactor: Any,
    workers: int = 2,
    images: int = 8,
    worker_args: Sequence[str] = (),
    same_port: bool = False,
) -> LoopbackCluster:
    """An origin (running) serving ``images`` JPEGs, and a gateway and ``workers``
    workers (not started yet: see ``start_cluster``); all stopped at clean-up.

    Each node has its own random 127.x address (other tests run at the same
    time); its HTTP address is known before it starts, so a Prometheus
    configuration can name it. ``same_port`` puts every node's HTTP listener on
    one port, as in containers (DNS discovery gives addresses, not ports).
    """
    origin = await start_origin(reactor, "127.0.0.1")
    testcase.addCleanup(origin.stop)
    urls = []
    for index in range(images):
        path = f"/monitoring/{index}.jpg"
        origin.add(path, distinct_jpeg(index), "image/jpeg")
        urls.append(origin.url(path))

    base_dir = tempfile.mkdtemp(prefix="imgproxy-monitoring-")
    testcase.addCleanup(shutil.rmtree, base_dir, True)
    addresses = [loopback_address() for _ in range(workers + 1)]
    port = common_free_port(addresses) if same_port else None
    gateway_address = addresses[0]
    gateway_gossip = free_port(gateway_address, udp=True)
    gateway = ImgproxyProcess(
        ["--role", "gateway", *cluster_flags(gateway_address, gateway_gossip, "gateway-1")],
        interface=gateway_address, port=port, base_dir=base_dir, name="gateway-1",
    )
    nodes = [gateway]
    for index, address in enumerate(addresses[1:], start=1):
        name = f"worker-{index}"
        nodes.append(ImgproxyProcess(
            [
                "--role", "worker", *cluster_flags(address, free_port(address, udp=True), name),
                "--join", f"{gateway_address}:{gateway_gossip}",
                "--allow-private-sources", *worker_args,
            ],
            interface=address, port=port, base_dir=base_dir, name=name,
        ))
    testcase.addCleanup(stop_all, nodes)
    return LoopbackCluster(gateway=gateway, workers=nodes[1:], origin=origin, image_urls=urls)


async def start_cluster(reactor: Any, cluster: LoopbackCluster, timeout: float = 30) -> None:
    """Start every node of ``cluster``; done once the gateway sees every member alive."""
    # Launched here, on the reactor's thread: a child dies with the thread that launched it.
    for node in cluster.processes:
        node.launch()
    await in_thread(reactor, lambda: [node.wait_ready() for node in cluster.processes])
    await poll(reactor, cluster.members_alive, timeout, "the cluster forming")


# --- a DNS server for Prometheus's service discovery -------------------------------------------


class LoopbackDns:
    """An authoritative DNS server on ``address:53`` (UDP and TCP) answering A queries.

    ``records`` maps a name (``worker``) to its addresses and may change while it
    runs, the way Docker's DNS answers change as replicas come and go. Other names
    get NXDOMAIN, other types an empty answer.
    """

    def __init__(self, address: str, records: dict[str, list[str]]) -> None:
        self.address = address
        self.records = records
        self.queries: list[tuple[str, int]] = []
        self._ports: list[Any] = []

    def query(self, query: dns.Query, timeout: Any = None) -> Deferred[Any]:
        """The ``IResolver.query`` the server's resolver chain calls."""
        name = query.name.name.decode("ascii", "replace").rstrip(".").lower()
        self.queries.append((name, query.type))
        addresses = self.records.get(name)
        if addresses is None:
            return fail(DNSNameError(name))
        if query.type != dns.A:
            return succeed(([], [], []))
        answers = [
            dns.RRHeader(name=query.name.name, type=dns.A, ttl=1, auth=True,
                         payload=dns.Record_A(address, ttl=1))
            for address in addresses
        ]
        return succeed((answers, [], []))

    def start(self, reactor: Any) -> None:
        """Listen on port 53 of ``address`` (root only, like any port under 1024)."""
        factory = DNSServerFactory(authorities=[self])
        self._ports = [
            reactor.listenUDP(53, dns.DNSDatagramProtocol(factory), interface=self.address),
            reactor.listenTCP(53, factory, interface=self.address),
        ]

    def stop(self) -> Deferred[Any]:
        return gatherResults([maybeDeferred(port.stopListening) for port in self._ports])

    def resolv_conf(self) -> str:
        """A resolv.conf that sends every lookup here (and only here)."""
        return f"nameserver {self.address}\noptions timeout:1 attempts:2\n"


def dns_discovery_config(
    config_text: str, port: int, prometheus_authority: str, scrape_interval: str = "1s"
) -> str:
    """``config_text`` unchanged but for the discovered port, the scrape interval and
    Prometheus's own address: the DNS discovery itself stays exactly as written."""
    lines = config_text.splitlines()
    for start, end, _, _ in list(_dns_blocks(lines)):
        for i in range(start, end):
            lines[i] = re.sub(r"^(\s*)port:\s*\d+\s*$", rf"\g<1>port: {port}", lines[i])
    text = "\n".join(lines) + "\n"
    text = re.sub(r"(?m)^(\s*scrape_interval:).*$", rf"\1 {scrape_interval}", text)
    text = re.sub(r"(?m)^(\s*scrape_timeout:).*$", rf"\1 {scrape_interval}", text)
    return text.replace("localhost:9090", prometheus_authority)


def common_free_port(addresses: Iterable[str]) -> int:
    """A TCP port free on every one of ``addresses`` right now."""
    addresses = list(addresses)
    for _ in range(100):
        port = free_port(addresses[0])
        try:
            for address in addresses[1:]:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                    probe.bind((address, port))
        except OSError:
            continue
        return port
    raise OSError(f"no port free on all of {addresses}")


# --- Prometheus ------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: an aborted test run leaves no Prometheus.
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class PrometheusServer:
    """Debian's ``prometheus`` on ``127.0.0.1``, with its own storage in ``base_dir``.

    ``authority`` is known before ``launch`` so the configuration can name it.
    """

    def __init__(self, base_dir: str | os.PathLike[str], binary: str = "prometheus") -> None:
        self.base_dir = Path(base_dir)
        self.binary = binary
        self.port = free_port("127.0.0.1")
        self.authority = f"127.0.0.1:{self.port}"
        self.config_path = self.base_dir / "prometheus.yml"
        self.log_path = self.base_dir / "prometheus.log"
        self._process: subprocess.Popen[bytes] | None = None

    def launch(self, config_text: str, resolv_conf: str | None = None) -> None:
        """Write the configuration and start the server (returns at once).

        With ``resolv_conf``, Prometheus runs in a mount namespace of its own where
        that file is ``/etc/resolv.conf``: its DNS lookups go where the test says,
        and nothing else on the machine sees the change.
        """
        self.config_path.write_text(config_text, "utf-8")
        command = [
            self.binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.base_dir / 'data'}",
            f"--web.listen-address={self.authority}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ]
        if resolv_conf is not None:
            resolv = self.base_dir / "resolv.conf"
            resolv.write_text(resolv_conf, "ascii")
            # unshare and sh both exec: the pid stays Prometheus's, and so does the
            # parent-death signal.
            command = [
                "unshare", "--mount", "--propagation", "private", "--",
                "/bin/sh", "-c", 'mount --bind "$0" /etc/resolv.conf && exec "$@"',
                str(resolv), *command,
            ]
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.base_dir, preexec_fn=_die_with_parent,
            )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; safe to call twice."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def log_tail(self, characters: int = 2000) -> str:
        try:
            return self.log_path.read_text("utf-8", errors="replace")[-characters:]
        except FileNotFoundError:
            return ""

    def _get(self, path: str, **params: str) -> Any:
        if self._process is None or self._process.poll() is not None:
            raise RuntimeError("prometheus is not running:\n" + self.log_tail())
        url = f"http://{self.authority}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read().decode("utf-8"))

    def targets(self) -> list[dict[str, Any]]:
        """The active targets (``/api/v1/targets``)."""
        return self._get("/api/v1/targets", state="active")["data"]["activeTargets"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector (``/api/v1/query``); raises on a bad expression."""
        answer = self._get("/api/v1/query", query=expr)
        if answer.get("status") != "success":
            raise ValueError(f"{expr}: {answer}")
        data = answer["data"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]


def finite_values(result: list[dict[str, Any]]) -> list[float]:
    """The finite sample values of a query result (NaN and infinities left out)."""
    values = [float(series["value"][1]) for series in result]
    return [v for v in values if math.isfinite(v)]
