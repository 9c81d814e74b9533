"""Real ``twistd -n imgproxy`` processes for end-to-end tests, and a small blocking HTTP client.

Usage in a trial ``TestCase`` (the real reactor runs while the test waits)::

    proxy = spawn_imgproxy(self, "--allow-private-sources")   # started, cleaned up
    reply = await proxy.request_async(reactor, "/image?url=...")
    reply.status, reply.header("x-cache"), reply.body, reply.json()

Blocking code (scripts, threads) uses ``proxy.request(...)`` and ``start()``/``stop()``
directly. ``request_async`` runs the blocking client on a private thread pool, so
the reactor stays free to serve a loopback origin that the proxy fetches from.

A cluster is several processes with distinct loopback addresses::

    gossip = free_port("127.0.0.1", udp=True)   # same port, distinct addresses
    worker = ImgproxyProcess(["--role", "worker", *cluster_flags("127.0.0.3", gossip, "w1")],
                             interface="127.0.0.3", base_dir=self.mktemp())
    gateway = ImgproxyProcess(["--role", "gateway", *cluster_flags("127.0.0.2", gossip, "g1"),
                               "--join", f"127.0.0.3:{gossip}"], interface="127.0.0.2", ...)
    start_all([worker, gateway]); self.addCleanup(stop_all, [gateway, worker])

A proxy process keeps its connections to an origin alive, which trial reports as
a dirty reactor: ``origin = await live_origin(self, reactor)`` starts a
``tests.origins`` origin that hangs up on them when the test ends.

Each process logs to ``<base_dir>/<name>.log`` (``log_text()`` reads it); failures
to start raise ``ProcessFailed`` with the tail of that log. Children get SIGTERM
when the process that launched them dies (Linux ``PR_SET_PDEATHSIG``), so an
aborted test run leaves no proxy behind. Only processes started here are ever
signalled, always by their own pid.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import errno
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

REPOSITORY = Path(__file__).resolve().parent.parent

# Variables the proxy reads: a test's process starts without the caller's values of them.
IMGPROXY_VARIABLES = ("HTTP_PORT", "KNOWN_HOSTS", "CLUSTER_SECRET")


class ProcessFailed(RuntimeError):
    """The process exited, or never answered /health in time; the message has its log tail."""


# --- addresses and ports ---------------------------------------------------------------


def free_port(interface: str = "127.0.0.1", udp: bool = False) -> int:
    """A port free on ``interface`` right now (TCP, and UDP too when ``udp``)."""
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, socket.SOCK_STREAM) as tcp:
            tcp.bind((interface, 0))
            port = int(tcp.getsockname()[1])
        if not udp:
            return port
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as datagram:
                datagram.bind((interface, port))
        except OSError:
            continue
        return port
    raise OSError(f"no port free for both TCP and UDP on {interface}")


def loopback_address() -> str:
    """A random 127.0.0.0/8 address other than 127.0.0.1 (Linux routes all of it to lo).

    Random rather than sequential: other engineers' tests run at the same time.
    """
    return f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(2, 254)}"


def cluster_flags(address: str, gossip_port: int, node_name: str) -> list[str]:
    """The flags that put a node's membership on ``address:gossip_port`` under ``node_name``."""
    return [
        "--bind", address,
        "--advertise", address,
        "--gossip-port", str(gossip_port),
        "--node-name", node_name,
        "--membership-profile", "local",
    ]


def clean_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any imgproxy variable, then ``extra`` on top."""
    environ = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("IMGPROXY_") and name not in IMGPROXY_VARIABLES
    }
    # The checkout under test comes first, whatever is installed in the venv.
    paths = [str(REPOSITORY), *filter(None, environ.get("PYTHONPATH", "").split(os.pathsep))]
    environ["PYTHONPATH"] = os.pathsep.join(paths)
    environ.update(extra or {})
    return environ


# --- a blocking HTTP client ---------------------------------------------------------------


@attrs.frozen
class Reply:
    """One HTTP response, read in full. Header names are lower case; values as sent."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        """The last value of header ``name`` (any case), or None."""
        name = name.lower()
        values = [value for key, value in self.headers if key == name]
        return values[-1] if values else None

    def header_values(self, name: str) -> list[str]:
        """Every value of header ``name``, in order."""
        name = name.lower()
        return [value for key, value in self.headers if key == name]

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body.decode("utf-8"))


def request(
    url: str,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 30.0,
) -> Reply:
    """Send one request on a fresh connection and read the whole response (blocking).

    ``http.client`` rather than treq: it shows ``Content-Length`` as sent and
    handles HEAD (no body) the way the server meant it.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise ValueError(f"only http:// URLs: {url!r}")
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    connection = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    try:
        connection.request(method, target, body=body, headers=dict(headers or {}))
        response = connection.getresponse()
        data = response.read()
        return Reply(
            status=response.status,
            reason=response.reason,
            headers=tuple((key.lower(), value) for key, value in response.getheaders()),
            body=data,
        )
    finally:
        connection.close()


class _DaemonThreadPool(ThreadPool):
    # Daemon threads: interpreter exit waits for other threads *before* atexit
    # handlers run, so a pool stopped from atexit would hang the test run.
    @staticmethod
    def threadFactory(*args: Any, **kwargs: Any) -> threading.Thread:  # noqa: N802
        return threading.Thread(*args, daemon=True, **kwargs)


_client_pool: ThreadPool | None = None


def _pool() -> ThreadPool:
    global _client_pool
    if _client_pool is None:
        # Enough threads for a burst of concurrent requests (coalescing tests send 20+).
        _client_pool = _DaemonThreadPool(minthreads=0, maxthreads=48, name="imgproxy-test-client")
        _client_pool.start()
        atexit.register(_client_pool.stop)
    return _client_pool


def request_async(reactor: Any, url: str, **kwargs: Any) -> Deferred[Reply]:
    """``request`` on a thread, so the reactor goes on running (and serving origins)."""
    return deferToThreadPool(reactor, _pool(), request, url, **kwargs)


def in_thread(reactor: Any, function: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
    """Any blocking call (``start``, ``stop``, ``restart``) on the client thread pool."""
    return deferToThreadPool(reactor, _pool(), function, *args, **kwargs)


# --- a loopback origin that a proxy process talks to -----------------------------------


async def close_origin(reactor: Any, origin: Any) -> None:
    """Stop listening and hang up on the proxy's kept-alive connections (trial wants a
    clean reactor after each test)."""
    address = (origin.interface, origin.port)
    await origin.stop()
    for _ in range(100):
        lingering = [
            selectable
            for selectable in {*reactor.getReaders(), *reactor.getWriters()}
            if isinstance(selectable, tcp.Server)
            and (selectable.getHost().host, selectable.getHost().port) == address
        ]
        if not lingering:
            return
        for connection in lingering:
            connection.abortConnection()
        await deferLater(reactor, 0.01, lambda: None)


async def live_origin(testcase: Any, reactor: Any, interface: str = "127.0.0.1") -> Any:
    """A ``tests.origins`` origin on ``interface``, closed (connections too) when the
    test ends."""
    from tests.origins import start_origin

    origin = await start_origin(reactor, interface)
    testcase.addCleanup(lambda: Deferred.fromCoroutine(close_origin(reactor, origin)))
    return origin


# --- the process ----------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: no imports, no allocation-heavy work.
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def twistd_command() -> list[str]:
    """The venv's ``twistd`` script, or the same entry point through this interpreter."""
    script = Path(sys.executable).parent / "twistd"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class ImgproxyProcess:
    """One ``twistd -n imgproxy`` child listening for HTTP on ``interface:port``.

    ``args`` are the imgproxy options. Unless ``add_defaults`` is false, the
    fixture adds ``--http tcp:PORT:interface=INTERFACE`` and ``--cache-dir``
    (a fresh directory under ``base_dir``), which the caller may then give through
    ``env`` instead (pass ``port`` so the fixture knows where to look).
    ``env`` is added to a copy of this environment stripped of imgproxy variables.

    Launch from a thread that lives as long as the child should: the child gets
    SIGTERM when that thread ends.
    """

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        interface: str = "127.0.0.1",
        port: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        name: str = "imgproxy",
        add_defaults: bool = True,
        ready_path: str = "/health",
        ready_timeout: float = 60.0,
    ) -> None:
        self.args = list(args)
        self.env = dict(env or {})
        self.interface = interface
        self._auto_port = port is None
        self.port = port if port is not None else free_port(interface)
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="imgproxy-process-"))
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else self.base_dir / "cache"
        self.name = name
        self.add_defaults = add_defaults
        self.ready_path = ready_path
        self.ready_timeout = ready_timeout
        self.log_path = self.base_dir / f"{name}.log"
        self.returncode: int | None = None
        self.ready = False  # answered ready_path since the last launch
        self._process: subprocess.Popen[bytes] | None = None

    # -- addresses

    @property
    def authority(self) -> str:
        """``host:port`` of the HTTP listener."""
        host = f"[{self.interface}]" if ":" in self.interface else self.interface
        return f"{host}:{self.port}"

    def url(self, path: str = "/") -> str:
        """The absolute URL of ``path`` (which may carry a query) on this process."""
        return f"http://{self.authority}{path}"

    @property
    def pid(self) -> int:
        """The child's pid (the last one, after a restart)."""
        if self._process is None:
            raise ProcessFailed(f"{self.name} was never started")
        return self._process.pid

    @property
    def running(self) -> bool:
        """Whether the child is alive."""
        return self._process is not None and self._process.poll() is None

    def command(self) -> list[str]:
        """The full command line the child runs."""
        extra: list[str] = []
        if self.add_defaults:
            endpoint_host = self.interface.replace(":", "\\:")
            extra = [
                "--http", f"tcp:{self.port}:interface={endpoint_host}",
                "--cache-dir", str(self.cache_dir),
            ]
        return [*twistd_command(), "-n", "--pidfile=", "imgproxy", *extra, *self.args]

    # -- life cycle

    def launch(self) -> None:
        """Start the child and return at once (see ``wait_ready``)."""
        if self.running:
            raise ProcessFailed(f"{self.name} is already running as pid {self.pid}")
        with open(self.log_path, "ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} {' '.join(self.command())}\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.base_dir,
                env=clean_environment(self.env),
                preexec_fn=_die_with_parent,
            )
        self.returncode = None
        self.ready = False

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until ``ready_path`` answers 200; ``ProcessFailed`` if the child dies first."""
        deadline = time.monotonic() + (self.ready_timeout if timeout is None else timeout)
        delay = 0.02
        while True:
            if self._process is None or self._process.poll() is not None:
                self.returncode = None if self._process is None else self._process.returncode
                raise ProcessFailed(
                    f"{self.name} exited with {self.returncode} before answering:\n"
                    + self.log_tail()
                )
            try:
                if request(self.url(self.ready_path), timeout=2.0).status == 200:
                    self.ready = True
                    return
            except (OSError, http.client.HTTPException):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ProcessFailed(
                    f"{self.name} did not answer {self.ready_path} in time:\n" + self.log_tail()
                )
            time.sleep(delay)  # polling a child process: there is no event to wait on
            delay = min(delay * 1.5, 0.25)

    def start(self, timeout: float | None = None) -> ImgproxyProcess:
        """Launch (unless launched already) and wait until ready. An automatically chosen
        port that another process took in between is replaced by a new one (a few times)."""
        for attempt in range(4):
            if not self.running:  # else launched already: just wait for it
                self.launch()
            try:
                self.wait_ready(timeout)
                return self
            except ProcessFailed:
                if not (self._auto_port and attempt < 3 and self._port_was_taken()):
                    raise
                self.port = free_port(self.interface)
        raise AssertionError("unreachable")

    def _port_was_taken(self) -> bool:
        tail = self.log_tail(4000)
        return "Address already in use" in tail or f"[Errno {errno.EADDRINUSE}]" in tail

    def start_async(self, reactor: Any) -> Deferred[ImgproxyProcess]:
        """``start`` without blocking the reactor: launched here (not on a thread: the
        child dies with the thread that launched it), waited for on a thread."""
        self.launch()

        def wait() -> ImgproxyProcess:
            self.wait_ready()
            return self

        return in_thread(reactor, wait)

    def restart_async(self, reactor: Any) -> Deferred[ImgproxyProcess]:
        """``restart`` without blocking the reactor (stop and wait on a thread, launch here)."""
        d = in_thread(reactor, self.stop)
        d.addCallback(lambda _: setattr(self, "_auto_port", False))
        d.addCallback(lambda _: self.start_async(reactor))
        return d

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL; the exit code (None if
        never started). Safe to call twice."""
        self.terminate()
        return self.wait_exit(timeout)

    def terminate(self) -> None:
        """Send SIGTERM if the child is running (see ``wait_exit``)."""
        if self.running:
            assert self._process is not None
            self._process.send_signal(signal.SIGTERM)

    def wait_exit(self, timeout: float = 15.0) -> int | None:
        """Wait for the child to exit, SIGKILL it after ``timeout``; its exit code."""
        process = self._process
        if process is None:
            return None
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            with open(self.log_path, "ab") as log:
                log.write(f"--- killed with SIGKILL after {timeout}s\n".encode())
        self.returncode = process.returncode
        return self.returncode

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the child (no wait; ``wait_exit`` reaps it)."""
        if self.running:
            assert self._process is not None
            self._process.send_signal(sig)

    def restart(self, timeout: float | None = None) -> ImgproxyProcess:
        """Stop (SIGTERM) and start again with the same options, port and cache directory."""
        self.stop()
        self._auto_port = False  # clients hold the old URL
        return self.start(timeout)

    def remove_files(self) -> None:
        """Delete ``base_dir`` (log, and the cache when it lives there); stop first."""
        shutil.rmtree(self.base_dir, ignore_errors=True)

    # -- talking to it

    def request(self, path: str, method: str = "GET", **kwargs: Any) -> Reply:
        """``request`` to ``path`` on this process (blocking)."""
        return request(self.url(path), method, **kwargs)

    def request_async(
        self, reactor: Any, path: str, method: str = "GET", **kwargs: Any
    ) -> Deferred[Reply]:
        """``request`` to ``path`` on this process, on a thread."""
        return request_async(reactor, self.url(path), method=method, **kwargs)

    def health(self) -> Any:
        """``GET /health`` parsed (blocking)."""
        return self.request("/health").json()

    # -- its log

    def log_text(self) -> str:
        """Everything the child wrote so far (all its runs)."""
        try:
            return self.log_path.read_text("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, characters: int = 3000) -> str:
        """The end of the log, for error messages."""
        return self.log_text()[-characters:]

    def __repr__(self) -> str:
        state = f"pid {self._process.pid}" if self.running and self._process else "stopped"
        return f"<ImgproxyProcess {self.name} {self.url('')} {state}>"


def start_all(processes: Iterable[ImgproxyProcess], timeout: float | None = None) -> None:
    """Launch every process, then wait for each: they start side by side."""
    processes = list(processes)
    for process in processes:
        process.launch()
    try:
        for process in processes:
            process.wait_ready(timeout)
    except ProcessFailed:
        stop_all(processes)
        raise


def start_all_async(reactor: Any, processes: Iterable[ImgproxyProcess]) -> Deferred[None]:
    """``start_all`` without blocking the reactor: launched here, waited for on a thread."""
    processes = list(processes)
    for process in processes:
        process.launch()

    def wait() -> None:
        try:
            for process in processes:
                process.wait_ready()
        except ProcessFailed:
            stop_all(processes)
            raise

    return in_thread(reactor, wait)


def stop_all(processes: Iterable[ImgproxyProcess], timeout: float = 15.0) -> None:
    """SIGTERM every process at once, then wait for (or SIGKILL) each."""
    processes = list(processes)
    for process in processes:
        process.terminate()
    for process in processes:
        process.wait_exit(timeout)


def spawn_imgproxy(
    testcase: Any, *args: str, start: bool = True, **kwargs: Any
) -> ImgproxyProcess:
    """An ``ImgproxyProcess`` started (unless ``start`` is false) and stopped by
    ``testcase.addCleanup``; its files go to a temporary directory removed afterwards
    (unless ``base_dir`` is given)."""
    if "base_dir" not in kwargs:
        # Not testcase.mktemp(): under pytest that lands in the checkout.
        kwargs["base_dir"] = tempfile.mkdtemp(prefix="imgproxy-process-")
        testcase.addCleanup(shutil.rmtree, kwargs["base_dir"], True)
    process = ImgproxyProcess(args, **kwargs)
    testcase.addCleanup(process.stop)
    if start:
        process.start()
    return process


_shared: dict[Any, ImgproxyProcess] = {}


def shared_imgproxy(key: Any, *args: str, wait: bool = True, **kwargs: Any) -> ImgproxyProcess:
    """One running process per ``key`` (e.g. a TestCase class), started on first use.

    With ``wait=False`` it is only launched (a later call waits for it): several
    shared processes then start side by side. trial has no class-level tear-down,
    so the process lives until ``stop_shared(key)`` (e.g. from ``tearDownClass``,
    which pytest runs) or, at the latest, until the test run exits. A process
    that died is started again.
    """
    process = _shared.get(key)
    if process is None:
        kwargs.setdefault("base_dir", tempfile.mkdtemp(prefix="imgproxy-shared-"))
        kwargs.setdefault("name", getattr(key, "__name__", "shared"))
        process = ImgproxyProcess(args, **kwargs)
        _shared[key] = process
        atexit.register(stop_shared, key)
    if process.running and process.ready:
        return process
    if not wait:
        if not process.running:
            process.launch()
        return process
    return process.start()


def stop_shared(key: Any) -> None:
    """Stop the shared process of ``key`` (if any) and remove its files."""
    process = _shared.pop(key, None)
    if process is not None:
        process.stop()
        shutil.rmtree(process.base_dir, ignore_errors=True)
