"""Hostile tests: real ``twistd imgproxy`` processes attacked through loopback origins.

Shared here: the running proxies (one per set of options, started on first use
and stopped when the test run exits), a persistent HTTP client, and readers for
``/metrics`` and a process's memory (``/proc/PID/status``).
"""

from __future__ import annotations

import atexit
import http.client
import os
import re
import shutil
import tempfile
from typing import Any
from urllib.parse import quote, urlencode

from prometheus_client.parser import text_string_to_metric_families

from tests.processes import ImgproxyProcess, Reply

# Options of the proxy most hostile tests share: private sources allowed (the
# origins are on loopback), small limits so that attacks are quick.
PERMISSIVE = (
    "--allow-private-sources",
    "--max-source-bytes", "1M",
    "--max-source-pixels", "4000000",
    "--fetch-timeout", "2s",
)
FETCH_TIMEOUT = 2.0
MAX_SOURCE_BYTES = 1 << 20
# What a 504 may take beyond the fetch timeout: process scheduling on a loaded machine.
TIMEOUT_MARGIN = 1.5

RESTRICTED = ("--allow-networks", "127.0.0.5/32", "--fetch-timeout", "2s")
# Every shared configuration is launched on the first request for any of them: the
# processes start side by side, which saves a start-up's wait per configuration.
SHARED_CONFIGURATIONS = (PERMISSIVE, RESTRICTED)

_shared: dict[tuple[str, ...], ImgproxyProcess] = {}


def _launch(args: tuple[str, ...]) -> ImgproxyProcess:
    base_dir = tempfile.mkdtemp(prefix="imgproxy-hostile-")
    process = ImgproxyProcess(args, base_dir=base_dir, name="hostile")
    _shared[args] = process

    def stop() -> None:
        process.stop()
        shutil.rmtree(base_dir, ignore_errors=True)

    atexit.register(stop)
    process.launch()
    return process


def shared_proxy(*args: str) -> ImgproxyProcess:
    """A running proxy with these options, shared by every test that asks for the same ones.

    Launched (from the calling thread, which must outlive it: the reactor thread)
    on first use, together with the other ``SHARED_CONFIGURATIONS``, or again if
    it died; stopped when the test run exits.
    """
    process = _shared.get(args)
    if process is None:
        for configuration in {args, *SHARED_CONFIGURATIONS}:
            if configuration not in _shared:
                _launch(configuration)
        process = _shared[args]
    if process.running:
        process.wait_ready()
    else:
        process.start()
    return process


def live_reactor() -> Any:
    """The global reactor, which trial runs during a test (tests may use it; the package not)."""
    from twisted.internet import reactor

    return reactor


def report(text: str) -> None:
    """Print a figure for RELIABILITY.md when ``IMGPROXY_HOSTILE_REPORT`` is set (pytest -s)."""
    if os.environ.get("IMGPROXY_HOSTILE_REPORT"):
        print(f"\n[hostile] {text}")


def image_path(url: str, **params: Any) -> str:
    """``/image?url=...&k=v``, percent-encoded, parameters in that order."""
    pairs = [("url", url), *((k, str(v)) for k, v in params.items())]
    return "/image?" + urlencode(pairs, quote_via=quote)


def memory_kb(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak resident) of process ``pid``, in kB."""
    with open(f"/proc/{pid}/status") as status:
        text = status.read()
    return {name: int(value) for name, value in re.findall(r"(VmRSS|VmHWM):\s+(\d+) kB", text)}


def metric(text: str, name: str, **labels: str) -> float:
    """The value of sample ``name`` with ``labels`` in Prometheus ``text``; 0 when absent."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def assert_json_error(reply: Reply, status: int | None = None) -> None:
    """``reply`` is an error with the contract's JSON body ``{"error": str, "status": int}``
    whose status is the response's (and ``status``, when given)."""
    if status is not None and reply.status != status:
        raise AssertionError(f"expected {status}, got {reply.status}: {reply.body[:300]!r}")
    if reply.header("content-type") != "application/json":
        raise AssertionError(f"error {reply.status} is not JSON: {reply.headers}")
    body = reply.json()
    if not (
        isinstance(body, dict)
        and set(body) == {"error", "status"}
        and isinstance(body["error"], str)
        and body["error"]
        and body["status"] == reply.status
    ):
        raise AssertionError(f"bad error body for {reply.status}: {reply.body[:300]!r}")


class PersistentClient:
    """One keep-alive HTTP/1.1 connection to a proxy, reopened when the server closes it."""

    def __init__(self, process: ImgproxyProcess, timeout: float = 30.0) -> None:
        self._host = process.interface
        self._port = process.port
        self._timeout = timeout
        self._connection: http.client.HTTPConnection | None = None

    def get(self, target: str, headers: dict[str, str] | None = None) -> Reply:
        """``GET target``; retried once on a fresh connection if the kept one was closed."""
        for attempt in (1, 2):
            if self._connection is None:
                self._connection = http.client.HTTPConnection(
                    self._host, self._port, timeout=self._timeout
                )
            try:
                self._connection.request("GET", target, headers=headers or {})
                response = self._connection.getresponse()
                body = response.read()
            except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
                self.close()
                if attempt == 2:
                    raise
                continue
            reply = Reply(
                status=response.status,
                reason=response.reason,
                headers=tuple((k.lower(), v) for k, v in response.getheaders()),
                body=body,
            )
            if response.will_close:
                self.close()
            return reply
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
