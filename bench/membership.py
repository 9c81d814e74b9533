"""Membership figures: imgproxy's SWIM nodes next to HashiCorp serf, real processes on loopback.

Run as root: ``.venv/bin/python bench/membership.py`` (about 30 minutes, then the
simulation section; ``--quick`` for a smoke run). Each cluster's figures are also printed
as one JSON line, so ``--report-from LOG...`` can combine several runs into one report.

The script re-executes itself in a private network namespace (``unshare -n``),
so the clusters have a loopback of their own: nothing else's traffic is counted, other
processes on the machine keep their 127.0.0.x addresses, and the iptables rules that
count bytes and drop packets live and die with the namespace.

For every implementation (``ours``: ``twistd -n imgproxy --role gateway``; ``serf``:
``serf agent``), profile (``lan``, memberlist's default; ``local``, ``serf agent -profile
local`` and our ``--membership-profile local``; probe interval 1 s in all four) and size n,
one cluster of n processes is started on 127.0.1.1..n, the others joining the first, and:

* **bytes** (n = 10 only): every node's outgoing gossip (UDP and TCP on the gossip port) is
  counted for ``--steady`` seconds by one iptables rule per node address; no one polls the
  nodes meanwhile. Figures are IP packet bytes (headers included) per node per second; for
  ours, the payload counted by ``imgproxy_gossip_bytes_out_total`` is shown too.
* **pause**: one node is stopped with SIGSTOP for each of ``--pauses`` seconds, then
  continued; every member's view is polled (10 Hz) until 15 s later. Any member reported
  ``failed`` by anyone is a false death.
* **slow** (n = 10 only): one node is duty-cycled, stopped 0.4 s out of every 0.6 s, for
  ``--slow`` seconds: its event loop lags, so its acks come late and its timers fire late
  (Lifeguard's case). False deaths are counted as above, split into the slow node and the
  healthy ones.
* **loss** (n = 10 only): 10 % of all UDP packets are dropped (iptables ``statistic``) for
  ``--loss-time`` seconds; TCP is untouched, as memberlist assumes. False deaths as above.
* **kill**: ``--kills`` times, a node (never the seed) is killed with SIGKILL; the time from
  the kill until each survivor's view says ``failed`` is taken from the 10 Hz polls; the
  figure is the time until *every* survivor did. The victim is restarted under the same
  name and the cluster re-converges before the next kill.

Views are read the way a user would: our ``GET /health`` and serf's RPC ``members`` (the
call behind ``serf members``), each node polled by its own thread. The packet-loss and
slow-prober scenarios are also run on our state machine in the deterministic simulation
(``tests/membership/simulation.py``) for larger n and longer times.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgpack

ROOT = Path(__file__).resolve().parent.parent
TWISTD = ROOT / ".venv" / "bin" / "twistd"
SERF = shutil.which("serf") or "/usr/bin/serf"
GOSSIP_PORT = 7946
HTTP_PORT = 8080
RPC_PORT = 7373
POLL_SECONDS = 0.1
NETNS_FLAG = "IMGPROXY_MEMBERSHIP_BENCH_NETNS"
COMMAND_PREFIX = "# command: "
DEFAULT_LOSS_SECONDS = 45.0


def address(index: int) -> str:
    """Node ``index``'s loopback address (only ever inside the private namespace)."""
    return f"127.0.1.{index + 1}"


# --- serf's RPC ------------------------------------------------------------------------


def _text(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class SerfRPC:
    """The two calls of serf's msgpack RPC protocol that the bench needs."""

    def __init__(self, host: str, port: int, timeout: float = 1.0) -> None:
        self._sock = socket.create_connection((host, port), timeout=timeout)
        self._unpacker = msgpack.Unpacker(raw=True)
        self._seq = 0
        self._call("handshake", {"Version": 1}, has_body=False)

    def close(self) -> None:
        self._sock.close()

    def members(self) -> dict[str, str]:
        """``{name: status}`` as ``serf members`` would print it."""
        body = self._call("members", None, has_body=True)
        return {
            _text(m[b"Name"]): _text(m[b"Status"]) for m in body.get(b"Members") or []
        }

    def _call(self, command: str, body: Any, has_body: bool) -> Any:
        seq = self._seq
        self._seq += 1
        out = msgpack.packb({"Command": command, "Seq": seq})
        if body is not None:
            out += msgpack.packb(body)
        self._sock.sendall(out)
        header = self._read()
        error = _text(header.get(b"Error", b""))
        if error:
            raise RuntimeError(f"serf rpc {command}: {error}")
        return self._read() if has_body else None

    def _read(self) -> Any:
        while True:
            for value in self._unpacker:
                return value
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("serf rpc closed")
            self._unpacker.feed(chunk)


# --- nodes -----------------------------------------------------------------------------


class Node:
    """One started process of a cluster; ``view()`` is what it says of every member."""

    def __init__(self, impl: str, profile: str, index: int, seed: str | None, work: Path) -> None:
        self.impl = impl
        self.profile = profile
        self.index = index
        self.name = f"{impl}{index}"
        self.addr = address(index)
        self.seed = seed
        self.work = work
        self.proc: subprocess.Popen[bytes] | None = None
        self._client: Any = None

    def argv(self) -> list[str]:
        if self.impl == "serf":
            argv = [SERF, "agent", "-node", self.name, "-bind", f"{self.addr}:{GOSSIP_PORT}",
                    "-rpc-addr", f"{self.addr}:{RPC_PORT}", "-profile", self.profile,
                    "-tag", "role=bench", "-log-level", "info"]
            if self.seed:
                argv += ["-retry-join", f"{self.seed}:{GOSSIP_PORT}", "-retry-interval", "1s"]
            return argv
        argv = [str(TWISTD), "-n", "--pidfile=", "imgproxy", "--role", "gateway",
                "--node-name", self.name, "--bind", self.addr, "--advertise", self.addr,
                "--gossip-port", str(GOSSIP_PORT), "--membership-profile", self.profile,
                "--http", f"tcp:{HTTP_PORT}:interface={self.addr}",
                "--cache-dir", str(self.work / f"{self.name}-cache")]
        if self.seed:
            argv += ["--join", f"{self.seed}:{GOSSIP_PORT}"]
        return argv

    def start(self) -> None:
        log = open(self.work / f"{self.name}.log", "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.work)
        log.close()

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signum)

    def kill(self) -> None:
        """SIGKILL, and reap it (only ever this node's own pid)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGCONT)
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._drop_client()

    def _drop_client(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = None

    def view(self) -> dict[str, str] | None:
        """``{member: state}`` (alive, suspect, failed, left...), or None if it did not answer."""
        try:
            if self.impl == "serf":
                if self._client is None:
                    self._client = SerfRPC(self.addr, RPC_PORT)
                return self._client.members()
            if self._client is None:
                self._client = http.client.HTTPConnection(self.addr, HTTP_PORT, timeout=1.0)
            self._client.request("GET", "/health")
            health = json.loads(self._client.getresponse().read())
            return {m["name"]: m["state"] for m in health["members"]}
        except (OSError, ValueError, KeyError, RuntimeError, http.client.HTTPException):
            self._drop_client()
            return None

    def gossip_payload_bytes(self) -> int | None:
        """Ours only: ``imgproxy_gossip_bytes_out_total`` from /metrics."""
        if self.impl != "ours":
            return None
        conn = http.client.HTTPConnection(self.addr, HTTP_PORT, timeout=2.0)
        try:
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        found = re.search(r"^imgproxy_gossip_bytes_out_total (\S+)$", text, re.M)
        return int(float(found.group(1))) if found else None


class Cluster:
    """n nodes of one implementation and profile; node 0 is the seed."""

    def __init__(self, impl: str, profile: str, size: int, work: Path) -> None:
        self.nodes = [
            Node(impl, profile, i, None if i == 0 else address(0), work) for i in range(size)
        ]

    @property
    def names(self) -> list[str]:
        return [n.name for n in self.nodes]

    def start(self, timeout: float) -> float:
        """Start every node; seconds until every one lists every one alive."""
        began = time.monotonic()
        self.nodes[0].start()
        time.sleep(0.5)
        for node in self.nodes[1:]:
            node.start()
        self.wait_converged(timeout)
        return time.monotonic() - began

    def wait_converged(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            views = [node.view() for node in self.nodes]
            if all(v is not None and all(v.get(n) == "alive" for n in self.names)
                   for v in views):
                return
            time.sleep(0.25)
        raise TimeoutError(f"cluster {self.names} did not converge in {timeout:.0f} s")

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


class Watch:
    """Polls every node's view on its own thread and keeps each change with its time."""

    def __init__(self, nodes: Sequence[Node]) -> None:
        self.changes: list[tuple[float, str, str, str]] = []  # (time, observer, member, state)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._poll, args=(n,), daemon=True)
                         for n in nodes]

    def __enter__(self) -> Watch:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _poll(self, node: Node) -> None:
        last: dict[str, str] = {}
        while not self._stop.is_set():
            view = node.view()
            now = time.monotonic()
            if view is not None:
                with self._lock:
                    for member, state in view.items():
                        if last.get(member) != state:
                            self.changes.append((now, node.name, member, state))
                last = view
            self._stop.wait(POLL_SECONDS)

    def first(self, observer: str, member: str, state: str, since: float) -> float | None:
        with self._lock:
            for when, who, what, how in self.changes:
                if when >= since and who == observer and what == member and how == state:
                    return when
        return None

    def deaths(self, since: float) -> list[tuple[str, str]]:
        """Every (observer, member) that went to ``failed`` after ``since``."""
        with self._lock:
            return sorted({(who, what) for when, who, what, how in self.changes
                           if when >= since and how == "failed"})


# --- counting bytes and dropping packets (inside the private namespace) -------------------


def iptables(*args: str) -> str:
    return subprocess.run(["iptables", "-w", *args], check=True, capture_output=True,
                          text=True).stdout


def count_rules(nodes: Sequence[Node]) -> None:
    for node in nodes:
        iptables("-A", "OUTPUT", "-s", node.addr, "-p", "udp", "--sport", str(GOSSIP_PORT))
        iptables("-A", "OUTPUT", "-s", node.addr, "-p", "tcp", "--dport", str(GOSSIP_PORT))
        iptables("-A", "OUTPUT", "-s", node.addr, "-p", "tcp", "--sport", str(GOSSIP_PORT))


def counted_bytes() -> dict[str, int]:
    """Bytes counted per source address by the rules of :func:`count_rules`."""
    totals: dict[str, int] = {}
    saved = subprocess.run(["iptables-save", "-c", "-t", "filter"], check=True,
                           capture_output=True, text=True).stdout
    for found in re.finditer(r"^\[\d+:(\d+)\] -A OUTPUT -s ([\d.]+)/32 -p (?:udp|tcp) ",
                             saved, re.M):
        totals[found.group(2)] = totals.get(found.group(2), 0) + int(found.group(1))
    return totals


def steady_bytes(cluster: Cluster, seconds: float) -> dict[str, float]:
    iptables("-F", "OUTPUT")
    count_rules(cluster.nodes)
    payload_before = [n.gossip_payload_bytes() for n in cluster.nodes]
    began = time.monotonic()
    time.sleep(seconds)
    counted = counted_bytes()
    took = time.monotonic() - began
    payload_after = [n.gossip_payload_bytes() for n in cluster.nodes]
    iptables("-F", "OUTPUT")
    per_node = [counted.get(n.addr, 0) / took for n in cluster.nodes]
    result = {"mean": statistics.mean(per_node), "min": min(per_node), "max": max(per_node)}
    if all(p is not None for p in payload_before + payload_after):
        diffs = [b - a for a, b in zip(payload_before, payload_after, strict=True)]  # type: ignore[operator]
        result["payload_mean"] = statistics.mean(diffs) / took
    return result


# --- scenarios ---------------------------------------------------------------------------


def pause(cluster: Cluster, target: Node, seconds: float, settle: float = 15.0) -> list[str]:
    """SIGSTOP ``target`` for ``seconds``; the false deaths anyone reported."""
    with Watch(cluster.nodes) as watch:
        time.sleep(1.0)
        since = time.monotonic()
        target.signal(signal.SIGSTOP)
        time.sleep(seconds)
        target.signal(signal.SIGCONT)
        time.sleep(settle)
    return [f"{who} saw {what} failed" for who, what in watch.deaths(since)]


def slow(cluster: Cluster, target: Node, seconds: float, settle: float = 10.0) -> list[str]:
    """Duty-cycle ``target`` (stopped 0.4 s of every 0.6 s); the false deaths reported."""
    with Watch(cluster.nodes) as watch:
        time.sleep(1.0)
        since = time.monotonic()
        end = since + seconds
        while time.monotonic() < end:
            target.signal(signal.SIGSTOP)
            time.sleep(0.4)
            target.signal(signal.SIGCONT)
            time.sleep(0.2)
        time.sleep(settle)
    return [f"{who} saw {what} failed" for who, what in watch.deaths(since)]


def loss(cluster: Cluster, seconds: float, rate: float = 0.10) -> list[str]:
    """Drop ``rate`` of all UDP for ``seconds``; the false deaths reported."""
    rule = ["OUTPUT", "-p", "udp", "-m", "statistic", "--mode", "random",
            "--probability", str(rate), "-j", "DROP"]
    with Watch(cluster.nodes) as watch:
        time.sleep(1.0)
        since = time.monotonic()
        iptables("-A", *rule)
        try:
            time.sleep(seconds)
        finally:
            iptables("-D", *rule)
        time.sleep(5.0)
    return [f"{who} saw {what} failed" for who, what in watch.deaths(since)]


def kill_detection(cluster: Cluster, victim: Node, timeout: float = 60.0) -> float | None:
    """SIGKILL ``victim``; seconds until every survivor's view says it failed."""
    survivors = [n for n in cluster.nodes if n is not victim]
    with Watch(survivors) as watch:
        time.sleep(1.0)
        killed_at = time.monotonic()
        victim.kill()
        deadline = killed_at + timeout
        while time.monotonic() < deadline:
            seen = [watch.first(s.name, victim.name, "failed", killed_at) for s in survivors]
            if all(t is not None for t in seen):
                return max(seen) - killed_at  # type: ignore[type-var,operator]
            time.sleep(POLL_SECONDS)
    return None


def run_cluster(impl: str, profile: str, size: int, args: argparse.Namespace,
                work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    cluster = Cluster(impl, profile, size, work / f"{impl}-{profile}-{size}")
    for node in cluster.nodes:
        node.work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"impl": impl, "profile": profile, "n": size}
    try:
        result["converged_s"] = cluster.start(timeout=180)
        log(f"{impl} {profile} n={size}: converged in {result['converged_s']:.1f} s")
        time.sleep(3.0)
        if size >= 10 and args.steady > 0:
            result["bytes"] = steady_bytes(cluster, args.steady)
            log(f"  bytes/node/s: {result['bytes']}")
        if size >= 5:
            target = cluster.nodes[size // 2]
            result["pause"] = {}
            for seconds in args.pauses:
                result["pause"][seconds] = pause(cluster, target, seconds)
                log(f"  pause {seconds} s: {result['pause'][seconds] or 'no deaths'}")
                cluster.wait_converged(60)
        if size >= 10 and args.slow > 0:
            target = cluster.nodes[2]
            deaths = slow(cluster, target, args.slow)
            result["slow"] = {
                "healthy": [d for d in deaths if not d.endswith(f" {target.name} failed")],
                "slow_node": [d for d in deaths if d.endswith(f" {target.name} failed")],
            }
            log(f"  slow prober: {result['slow']}")
            cluster.wait_converged(120)
        if size >= 10 and args.loss_time > 0:
            result["loss"] = loss(cluster, args.loss_time)
            result["loss_seconds"] = args.loss_time
            log(f"  10% UDP loss: {result['loss'] or 'no deaths'}")
            cluster.wait_converged(60)
        result["kills"] = []
        for k in range(args.kills):
            victim = cluster.nodes[1 + k % (size - 1)]
            took = kill_detection(cluster, victim)
            result["kills"].append(took)
            log(f"  kill {victim.name}: all survivors saw it failed after {took} s")
            if k + 1 < args.kills:
                victim.start()
                cluster.wait_converged(120)
                time.sleep(3.0)
    except Exception as error:  # keep the other configurations' figures
        result["error"] = repr(error)
        log(f"  FAILED: {error!r}")
    finally:
        cluster.stop()
    return result


# --- the simulation (ours only) -----------------------------------------------------------


def simulated(quick: bool) -> list[str]:
    """Loss and slow-prober false deaths of our state machine in the simulation harness."""
    from functools import partial

    from imgproxy.membership.messages import NodeState
    from imgproxy.membership.profiles import LAN, LOCAL
    from tests.membership.simulation import Simulation

    seeds = 2 if quick else 5
    duration = 60.0 if quick else 300.0
    rows = ["| scenario | profile | n | simulated time | runs | false deaths |",
            "| --- | --- | ---: | ---: | ---: | ---: |"]

    def converged(profile: Any, n: int, seed: int) -> tuple[Simulation, list[str]]:
        sim = Simulation(profile, seed=seed)
        names = sim.add_nodes(n)
        sim.join_all(names, names[0])
        sim.run_until(partial(sim.all_see, names, names, NodeState.ALIVE), 120)
        return sim, names

    for profile in (LAN, LOCAL):
        for n, rate in ((10, 0.10), (50, 0.10), (10, 0.20)):
            deaths = 0
            for seed in range(seeds):
                sim, _ = converged(profile, n, seed)
                sim.loss = rate
                sim.run(duration)
                deaths += len(sim.events("failed"))
            rows.append(f"| {rate:.0%} packet loss | {profile.name} | {n} | {duration:.0f} s "
                        f"| {seeds} | {deaths} |")
        for lag_probes in (1, 2):
            healthy = slow_deaths = 0
            for seed in range(seeds):
                sim, names = converged(profile, 10, seed)
                slow_one = names[2]
                sim.set_slow(slow_one, lag_probes * profile.probe_timeout)
                sim.run(duration)
                for event in sim.events("failed"):
                    if event.member == slow_one:
                        slow_deaths += 1
                    else:
                        healthy += 1
            rows.append(f"| slow prober, acks {lag_probes}x probe timeout late "
                        f"| {profile.name} | 10 | {duration:.0f} s | {seeds} "
                        f"| {healthy} healthy, {slow_deaths} of the slow node |")
    return rows


# --- report ------------------------------------------------------------------------------


def fmt(values: Sequence[float | None]) -> str:
    done = [v for v in values if v is not None]
    missing = len(values) - len(done)
    if not done:
        return "none detected"
    text = (f"{statistics.mean(done):.2f} (median {statistics.median(done):.2f}, "
            f"min {min(done):.2f}, max {max(done):.2f}; {len(done)} kills)")
    return text + (f", {missing} not detected in 60 s" if missing else "")


def report(results: list[dict[str, Any]], sim_rows: list[str], commands: Sequence[str],
           note: str = "") -> str:
    produced = "; ".join(f"`{c}`" for c in commands)
    lines = [
        "## Membership: imgproxy vs serf",
        "",
        f"Produced by {produced} on {platform.node()} ({os.cpu_count()} cores, shared with "
        f"other work: load average {os.getloadavg()[0]:.1f} when this was written), serf "
        f"`{serf_version()}`.",
        "Real processes on the loopback of a private network namespace; views polled at 10 Hz,",
        "so every time below carries up to 0.1 s of polling delay, on both sides alike.",
        *(["", note] if note else []),
        "",
        "### Time until every survivor marks a SIGKILLed node failed (seconds)",
        "",
        "Each cell: mean (median, min, max) over the kills, and how many kills.",
        "",
        "| profile | n | ours | serf | mean difference (ours - serf) |",
        "| --- | ---: | --- | --- | ---: |",
    ]
    by = {(r["impl"], r["profile"], r["n"]): r for r in results}
    keys = sorted({(r["profile"], r["n"]) for r in results})
    for profile, n in keys:
        cells, means = [], []
        for impl in ("ours", "serf"):
            r = by.get((impl, profile, n))
            done = [k for k in (r or {}).get("kills", []) if k is not None]
            means.append(statistics.mean(done) if done else None)
            if r is None:
                cells.append("not run")
            elif "error" in r and not r.get("kills"):
                cells.append(f"error: {r['error']}")
            else:
                cells.append(fmt(r.get("kills", [])))
        diff = f"{means[0] - means[1]:+.2f}" if None not in means else "n/a"
        lines.append(f"| {profile} | {n} | {cells[0]} | {cells[1]} | {diff} |")
    lines += ["", "### False \"failed\" declarations (real processes)", "",
              "A paused node is suspected after a failed probe, then declared failed when the",
              "suspicion timeout (at least the minimum shown, 4 s for lan and 3 s for local up to",
              "n = 10) runs out before it refutes. Cells: how many (observer, member) pairs "
              "reported `failed`.", "",
              "| scenario | profile | n | ours | serf |", "| --- | --- | ---: | --- | --- |"]

    def deaths(r: dict[str, Any] | None, path: Callable[[dict[str, Any]], Any]) -> str:
        if r is None:
            return "not run"
        try:
            found = path(r)
        except (KeyError, TypeError):
            return "not run"
        if isinstance(found, dict):
            return (f"{len(found['healthy'])} of healthy members, "
                    f"{len(found['slow_node'])} of the slow node")
        return f"{len(found)}" + (f" ({'; '.join(found[:3])})" if found else "")

    for profile, n in keys:
        r_ours, r_serf = by.get(("ours", profile, n)), by.get(("serf", profile, n))
        pauses = sorted({s for r in (r_ours, r_serf) if r for s in r.get("pause", {})})
        for seconds in pauses:
            least = min_suspicion(profile, n)
            verdict = ("longer: a failure is legitimate" if seconds > least
                       else "not longer: any failure is false")
            lines.append(f"| SIGSTOP {seconds:g} s (min suspicion {least:g} s: {verdict}) "
                         f"| {profile} | {n} | "
                         f"{deaths(r_ours, lambda r, s=seconds: r['pause'][s])} | "
                         f"{deaths(r_serf, lambda r, s=seconds: r['pause'][s])} |")
        if any(r and "slow" in r for r in (r_ours, r_serf)):
            lines.append(f"| slow prober ({0.4:g} s stopped of every 0.6 s) | {profile} | {n} | "
                         f"{deaths(r_ours, lambda r: r['slow'])} | "
                         f"{deaths(r_serf, lambda r: r['slow'])} |")
        if any(r and "loss" in r for r in (r_ours, r_serf)):
            took = {(r or {}).get("loss_seconds", DEFAULT_LOSS_SECONDS) for r in (r_ours, r_serf)}
            loss_time = "/".join(f"{t:g} s" for t in sorted(took))
            lines.append(f"| 10% UDP loss for {loss_time} | {profile} | {n} | "
                         f"{deaths(r_ours, lambda r: r['loss'])} | "
                         f"{deaths(r_serf, lambda r: r['loss'])} |")
    lines += ["", "### Bytes sent per node per second, steady cluster of 10", "",
              "IP packets (headers included) from each node's gossip port, counted by iptables "
              "rules in the namespace; for ours also the UDP payload that "
              "`imgproxy_gossip_bytes_out_total` counts.", "",
              "| profile | ours (min..max) | ours payload (metrics) | serf (min..max) |",
              "| --- | --- | --- | --- |"]
    for profile in sorted({p for p, _ in keys}):
        cells = []
        for impl in ("ours", "serf"):
            b = (by.get((impl, profile, 10)) or {}).get("bytes")
            cells.append(f"{b['mean']:.0f} ({b['min']:.0f}..{b['max']:.0f})" if b else "not run")
        b = (by.get(("ours", profile, 10)) or {}).get("bytes") or {}
        payload = f"{b['payload_mean']:.0f}" if "payload_mean" in b else "n/a"
        lines.append(f"| {profile} | {cells[0]} | {payload} | {cells[1]} |")
    errors = [f"- {r['impl']} {r['profile']} n={r['n']}: {r['error']}"
              for r in results if "error" in r]
    if errors:
        lines += ["", "Errors:", *errors]
    lines += ["", "### Our state machine in the simulation harness", "",
              "`tests/membership/simulation.py`: in-memory network, loss on every UDP packet, "
              "TCP fallback pings lossless.", "", *sim_rows, ""]
    return "\n".join(lines)


def merge_logs(paths: Sequence[Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """The results and commands printed by earlier runs, one entry per cluster kind.

    Kill times add up across runs; the other figures of a later run replace earlier ones.
    """
    merged: dict[tuple[str, str, int], dict[str, Any]] = {}
    commands: list[str] = []
    for path in paths:
        for line in path.read_text().splitlines():
            if line.startswith(COMMAND_PREFIX):
                commands.append(line[len(COMMAND_PREFIX):])
            if not line.startswith("{"):
                continue
            result = json.loads(line)
            key = (result["impl"], result["profile"], result["n"])
            into = merged.setdefault(key, {"impl": key[0], "profile": key[1], "n": key[2],
                                           "kills": []})
            into["kills"] += result.get("kills", [])
            if result.get("pause"):
                into.setdefault("pause", {}).update(
                    {float(k): v for k, v in result["pause"].items()})
            for field in ("bytes", "slow", "loss", "loss_seconds", "error"):
                if field in result:
                    into[field] = result[field]
    return list(merged.values()), commands


def min_suspicion(profile: str, n: int) -> float:
    from imgproxy.membership.profiles import LAN, LOCAL
    from imgproxy.membership.suspicion import suspicion_timeout

    p = LAN if profile == "lan" else LOCAL
    return suspicion_timeout(p.suspicion_mult, n, p.probe_interval)


def serf_version() -> str:
    out = subprocess.run([SERF, "version"], capture_output=True, text=True).stdout
    return out.splitlines()[0].strip() if out else "unknown"


def enter_namespace(argv: Sequence[str]) -> None:
    """Re-run this script in a new network namespace, with its loopback up."""
    if os.environ.get(NETNS_FLAG) == "1":
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        return
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        sys.exit("bench/membership.py needs root and unshare(1) for its network namespace")
    env = dict(os.environ, **{NETNS_FLAG: "1"})
    os.execvpe("unshare", ["unshare", "-n", "--", sys.executable, __file__, *argv], env)


def parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impls", default="ours,serf")
    p.add_argument("--profiles", default="lan,local")
    p.add_argument("--sizes", default="3,5,10")
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--pauses", default="2,4", help="SIGSTOP durations in seconds")
    p.add_argument("--steady", type=float, default=20.0, help="bytes window (n=10)")
    p.add_argument("--slow", type=float, default=30.0, help="slow-prober duration (n=10)")
    p.add_argument("--loss-time", type=float, default=DEFAULT_LOSS_SECONDS,
                   help="10%% UDP loss time (n=10)")
    p.add_argument("--no-sim", action="store_true", help="skip the simulation section")
    p.add_argument("--quick", action="store_true", help="a smoke run: n=3 and 5, one kill")
    p.add_argument("--out", type=Path, default=None, help="write the markdown here")
    p.add_argument("--report-from", type=Path, nargs="+", default=None, metavar="LOG",
                   help="run nothing: write the report from the output of earlier runs")
    args = p.parse_args(argv)
    args.impls = args.impls.split(",")
    args.profiles = args.profiles.split(",")
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.pauses = [float(s) for s in args.pauses.split(",") if s]
    if args.quick:
        args.sizes, args.kills, args.pauses = [3, 5], 1, [2.0]
    return args


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    sys.path.insert(0, str(ROOT))
    if args.report_from:
        results, commands = merge_logs(args.report_from)
        sim_rows = [] if args.no_sim else simulated(args.quick)
        note = ("The real-process figures combine the runs above (the kill times of all of "
                "them together), as they printed them, gathered by `bench/membership.py "
                f"--report-from`{'' if args.no_sim else ', which also ran the simulation'}.")
        write_report(report(results, sim_rows, commands, note), args.out)
        return
    enter_namespace(argv)
    began = time.monotonic()
    print(f"{COMMAND_PREFIX}.venv/bin/python bench/membership.py {shlex.join(argv)}", flush=True)

    def log(line: str) -> None:
        print(f"[{time.monotonic() - began:6.0f} s] {line}", flush=True)

    results = []
    with tempfile.TemporaryDirectory(prefix="membership-bench-") as tmp:
        for size in args.sizes:
            for profile in args.profiles:
                for impl in args.impls:
                    results.append(run_cluster(impl, profile, size, args, Path(tmp), log))
                    print(json.dumps(results[-1]), flush=True)
    sim_rows = [] if args.no_sim else simulated(args.quick)
    commands = [f".venv/bin/python bench/membership.py {shlex.join(argv)} "
                f"({(time.monotonic() - began) / 60:.0f} min)"]
    write_report(report(results, sim_rows, commands), args.out)


def write_report(text: str, out: Path | None) -> None:
    print(text)
    if out is not None:
        out.write_text(text)


if __name__ == "__main__":
    main()
