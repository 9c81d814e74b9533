"""Processes the benchmark starts: each in its own process group, all stopped on the way out."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path


def free_port() -> int:
    """A loopback TCP port that is free now, and free for UDP too (gossip uses both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port


class Managed:
    """One started command, in a new session so that its whole tree can be signalled."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, cwd: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        cwd.mkdir(parents=True, exist_ok=True)
        self._logf = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.argv, cwd=cwd, stdout=self._logf, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to the process group, SIGKILL after ``grace`` seconds."""
        try:
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    self.proc.wait(grace)
                except subprocess.TimeoutExpired:
                    pass
            # Children can outlive a leader that exited: sweep the group either way.
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        finally:
            self._logf.close()


class ProcessSet:
    """Everything one run started; ``stop_all`` stops them newest first."""

    def __init__(self) -> None:
        self.procs: list[Managed] = []

    def start(self, *args, **kwargs) -> Managed:
        m = Managed(*args, **kwargs)
        self.procs.append(m)
        return m

    def stop(self, m: Managed) -> None:
        m.stop()
        if m in self.procs:
            self.procs.remove(m)

    def stop_all(self) -> None:
        while self.procs:
            self.stop(self.procs[-1])


def http_get(url: str, timeout: float = 60.0, headers: dict[str, str] | None = None
             ) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-cased names) and body; HTTP errors are answers, not exceptions."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def wait_http(url: str, proc: Managed | None, timeout: float) -> tuple[bool, str]:
    """Poll ``url`` until it answers at all; give up when ``proc`` dies or time runs out."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            return False, f"{proc.name} exited with {proc.proc.returncode}"
        try:
            status, _h, _b = http_get(url, timeout=2.0)
            return True, f"HTTP {status}"
        except OSError as e:
            last = str(e)
        time.sleep(0.2)
    return False, f"no answer from {url} in {timeout:.0f} s ({last})"
