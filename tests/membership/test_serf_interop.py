"""Interop with real HashiCorp ``serf agent`` processes, started here on 127.0.0.0/8.

Our nodes are real ``twistd -n imgproxy`` processes (``tests/processes.py``), serf's are
``/usr/bin/serf agent`` (Debian's ``serf``; ``make test`` installs it). Both sides use
memberlist's Local profile (``serf agent -profile local``, our ``--membership-profile
local``) to keep failure detection short. What a side says is read the way an operator
would: ``serf members -format json`` and our ``GET /health``.

Waiting here is polling real processes against a deadline: there is no clock to inject.
Every process started here is stopped by its own pid, also when a test fails.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import hashlib
import hmac
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.processes import (
    ImgproxyProcess,
    Reply,
    cluster_flags,
    free_port,
    loopback_address,
    start_all,
    stop_all,
)

pytestmark = pytest.mark.slow

SERF = shutil.which("serf")
KEY = base64.b64encode(bytes(range(16))).decode()
OTHER_KEY = base64.b64encode(bytes(range(100, 132))).decode()
# Local profile: detection takes ~4 s on an idle machine; a loaded one needs more.
DEADLINE = 45.0
# What memberlist logs for a stream sealed with a key it does not have.
REFUSED = "No installed keys could decrypt the message"

View = dict[str, dict[str, Any]]


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: an aborted test run leaves no serf agent behind.
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(1, signal.SIGTERM)


def wait_for(what: str, check: Callable[[], bool], timeout: float = DEADLINE) -> None:
    """Poll ``check`` until it holds; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.2)  # polling other processes: there is no event to wait on


class SerfAgent:
    """One ``serf agent`` on its own loopback address; only ever signalled by its pid."""

    def __init__(self, name: str, base_dir: Path, *, key: str | None = None,
                 join: Sequence[str] = (), tags: dict[str, str] | None = None,
                 extra: Sequence[str] = ()) -> None:
        self.name = name
        self.extra = list(extra)
        self.addr = loopback_address()
        self.port = free_port(self.addr, udp=True)
        self.rpc = f"{self.addr}:{free_port(self.addr)}"
        self.key = key
        self.join = list(join)
        self.tags = tags or {"role": "serf"}
        self.log_path = base_dir / f"{name}.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def gossip(self) -> str:
        return f"{self.addr}:{self.port}"

    def start(self) -> None:
        argv = [SERF, "agent", "-node", self.name, "-bind", self.gossip, "-rpc-addr", self.rpc,
                "-profile", "local", "-log-level", "debug"]
        for tag, value in self.tags.items():
            argv += ["-tag", f"{tag}={value}"]
        if self.key:
            argv += ["-encrypt", self.key]
        for seed in self.join:
            argv += ["-retry-join", seed, "-retry-interval", "1s"]
        argv += self.extra
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT,
                                             preexec_fn=_die_with_parent)

    def members(self) -> View | None:
        """``{name: {"status", "tags", "addr"}}`` from ``serf members``, None if it fails."""
        done = subprocess.run([SERF, "members", "-rpc-addr", self.rpc, "-format", "json"],
                              capture_output=True, text=True, timeout=10)
        if done.returncode != 0:
            return None
        return {m["name"]: m for m in json.loads(done.stdout)["members"]}

    def join_now(self, address: str) -> bool:
        """``serf join``: True if the agent joined ``address``."""
        done = subprocess.run([SERF, "join", "-rpc-addr", self.rpc, address],
                              capture_output=True, text=True, timeout=30)
        return done.returncode == 0

    def send_event(self, name: str, payload: str) -> None:
        """``serf event``: a user event, gossiped to every member."""
        subprocess.run([SERF, "event", "-rpc-addr", self.rpc, name, payload],
                       capture_output=True, text=True, timeout=10, check=True)

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            os.kill(self._process.pid, signal.SIGKILL)
        if self._process is not None:
            self._process.wait()

    def log_tail(self, size: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-size:]


class OurNode:
    """One of our nodes as a real twistd process, and what its /health says."""

    def __init__(self, name: str, role: str, base_dir: Path, *, key: str | None = None,
                 join: Sequence[str] = (), extra: Sequence[str] = ()) -> None:
        self.name = name
        self.addr = loopback_address()
        self.port = free_port(self.addr, udp=True)
        args = ["--role", role, *cluster_flags(self.addr, self.port, name), *extra]
        if join:
            args += ["--join", ",".join(join)]
        if key:
            args += ["--cluster-secret", key]
        self.process = ImgproxyProcess(args, interface=self.addr, base_dir=base_dir / name,
                                       name=name)

    @property
    def gossip(self) -> str:
        return f"{self.addr}:{self.port}"

    def members(self) -> View | None:
        try:
            health = self.process.request("/health", timeout=5).json()
        except (OSError, ValueError):
            return None
        return {m["name"]: {**m, "status": m["state"]} for m in health["members"]}


Node = SerfAgent | OurNode


def statuses(node: Node) -> dict[str, str]:
    view = node.members()
    return {} if view is None else {name: m["status"] for name, m in view.items()}


class InteropCase(SynchronousTestCase):
    def setUp(self) -> None:
        if SERF is None:
            raise SkipTest("serf is not installed (apt-get install serf)")
        self.base = Path(self.mktemp())
        self.base.mkdir(parents=True)
        self.agents: list[SerfAgent] = []
        self.ours: list[OurNode] = []

    def tearDown(self) -> None:
        for agent in self.agents:
            agent.kill()
        stop_all([node.process for node in self.ours])

    def serf(self, name: str, **kwargs: Any) -> SerfAgent:
        agent = SerfAgent(name, self.base, **kwargs)
        self.agents.append(agent)
        return agent

    def our(self, name: str, role: str, **kwargs: Any) -> OurNode:
        node = OurNode(name, role, self.base, **kwargs)
        self.ours.append(node)
        return node

    def wait_views(self, observers: Sequence[Node], expected: dict[str, str],
                   what: str, exact: bool = False) -> None:
        """Wait until every observer reports every member of ``expected`` in its state."""
        def holds() -> bool:
            for observer in observers:
                seen = statuses(observer)
                if exact and set(seen) != set(expected):
                    return False
                if any(seen.get(name) != state for name, state in expected.items()):
                    return False
            return True

        try:
            wait_for(what, holds)
        except AssertionError as error:
            views = {o.name: statuses(o) for o in observers}
            raise AssertionError(f"{error}\nviews: {views}\n"
                                 + "\n".join(a.log_tail() for a in self.agents[:1])) from None


class BothWaysTests(InteropCase):
    """Our nodes join a serf cluster and a serf agent joins ours; failures are seen across."""

    def run_both_ways(self, key: str | None) -> None:
        s1 = self.serf("s1", key=key)
        s1.start()
        s2 = self.serf("s2", key=key, join=[s1.gossip])
        s2.start()
        # Ours join the serf cluster; the serf agent s3 knows only our gateway.
        o1 = self.our("o1", "worker", key=key, join=[s1.gossip])
        o2 = self.our("o2", "gateway", key=key, join=[o1.gossip])
        s3 = self.serf("s3", key=key, join=[o2.gossip])
        start_all([o1.process, o2.process])
        s3.start()
        everyone = [s1, s2, s3, o1, o2]
        names = [n.name for n in everyone]
        self.wait_views(everyone, dict.fromkeys(names, "alive"),
                        "every member lists every member alive", exact=True)

        serf_view = s3.members()
        assert serf_view is not None
        self.assertEqual(serf_view["o1"]["tags"],
                         {"role": "worker", "http": str(o1.process.port)})
        self.assertEqual(serf_view["o2"]["tags"]["role"], "gateway")
        self.assertEqual(serf_view["o2"]["addr"], o2.gossip)
        our_view = o2.members()
        assert our_view is not None
        self.assertEqual((our_view["s2"]["role"], our_view["s2"]["address"]), ("serf", s2.addr))

        # kill -9 a serf agent and one of ours at once: each side sees both failed.
        s2.kill()
        o1.process.kill(signal.SIGKILL)
        o1.process.wait_exit()
        self.wait_views([s1, s3, o2], {"s2": "failed", "o1": "failed", "s1": "alive",
                                       "s3": "alive", "o2": "alive"},
                        "the survivors mark the killed serf agent and our killed node failed")

    def test_plaintext(self) -> None:
        self.run_both_ways(key=None)

    def test_encrypted(self) -> None:
        self.run_both_ways(key=KEY)


class WrongKeyTests(InteropCase):
    def test_a_wrong_key_keeps_the_clusters_apart(self) -> None:
        s1 = self.serf("s1", key=OTHER_KEY)
        s1.start()
        # o1 has the cluster key and tries to join s1, which has another one.
        o1 = self.our("o1", "worker", key=KEY, join=[s1.gossip])
        # s2 shares o1's key: it must get in, so the keys (not a broken node) decide.
        s2 = self.serf("s2", key=KEY, join=[o1.gossip])
        start_all([o1.process])
        s2.start()
        self.wait_views([o1, s2], {"o1": "alive", "s2": "alive"},
                        "the members with the same key form a cluster", exact=True)
        self.assertFalse(s1.join_now(o1.gossip), "serf joined through a node with another key")
        # o1 keeps retrying its join through s1 every 2 s: let s1 refuse three of them.
        wait_for("s1 refused o1's join three times",
                 lambda: s1.log_tail(100_000).count(REFUSED) >= 3)
        self.assertEqual(statuses(s1), {"s1": "alive"})
        self.assertEqual(statuses(o1), {"o1": "alive", "s2": "alive"})
        self.assertEqual(statuses(s2), {"o1": "alive", "s2": "alive"})

    def test_a_plaintext_serf_agent_cannot_join_an_encrypted_cluster(self) -> None:
        o1 = self.our("o1", "worker", key=KEY)
        start_all([o1.process])
        s1 = self.serf("s1")
        s1.start()
        wait_for("serf answers", lambda: s1.members() is not None)
        self.assertFalse(s1.join_now(o1.gossip))
        self.assertEqual(statuses(o1), {"o1": "alive"})
        self.assertEqual(statuses(s1), {"s1": "alive"})


class StaticOrigin:
    """``python -m http.server`` on 127.0.0.1 over a folder of small JPEGs."""

    def __init__(self, base_dir: Path, names: Sequence[str]) -> None:
        from PIL import Image

        self.folder = base_dir / "origin"
        self.folder.mkdir()
        for n, name in enumerate(names):
            Image.new("RGB", (40, 30), (40 * n, 90, 200)).save(self.folder / name, "JPEG")
        self.port = free_port("127.0.0.1")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1",
             "--directory", str(self.folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def kill(self) -> None:
        if self._process.poll() is None:
            os.kill(self._process.pid, signal.SIGKILL)
        self._process.wait()


class PurgeEventTests(InteropCase):
    """Purges travel as serf user events: from serf agents to ours and back, and a node
    that was away gets the ones it missed from the recent events of a push-pull."""

    def setUp(self) -> None:
        super().setUp()
        self.origin = StaticOrigin(self.base, ["a.jpg", "b.jpg"])
        self.addCleanup(self.origin.kill)

    def image(self, node: OurNode, name: str) -> Reply:
        url = quote(self.origin.url(name), safe="")
        return node.process.request(f"/image?url={url}&w=20", timeout=10)

    def cached(self, node: OurNode, name: str) -> None:
        """Ask until the node has the image: a MISS, then a HIT."""
        wait_for(f"{node.name} serves {name}", lambda: self.image(node, name).status == 200)
        self.assertEqual(self.image(node, name).header("x-cache"), "HIT")

    def test_a_serf_event_purges_our_cache_and_one_sent_while_we_were_away_too(self) -> None:
        s1 = self.serf("s1")
        s1.start()
        o1 = self.our("o1", "standalone", join=[s1.gossip], extra=["--allow-private-sources"])
        start_all([o1.process])
        self.wait_views([s1, o1], {"s1": "alive", "o1": "alive"}, "s1 and o1 see each other")
        self.cached(o1, "a.jpg")
        self.cached(o1, "b.jpg")

        # By URL, as an operator types it: purged within gossip's reach.
        s1.send_event("imgproxy-purge", self.origin.url("a.jpg"))
        wait_for("o1 purged a.jpg", lambda: self.image(o1, "a.jpg").header("x-cache") == "MISS")
        self.assertEqual(self.image(o1, "b.jpg").header("x-cache"), "HIT")

        # By source key, as our gateways send it, while o1 is down; it comes back on
        # the same disk cache and gets the event from s1's recent events as it joins.
        o1.process.stop()
        key = hashlib.sha256(self.origin.url("b.jpg").encode()).hexdigest()
        s1.send_event("imgproxy-purge", key)
        start_all([o1.process])
        self.wait_views([s1, o1], {"s1": "alive", "o1": "alive"}, "o1 is back")
        self.assertEqual(self.image(o1, "b.jpg").header("x-cache"), "MISS")
        self.assertEqual(self.image(o1, "a.jpg").header("x-cache"), "HIT")

    def test_a_gateways_purge_reaches_serf_event_handlers(self) -> None:
        received = self.base / "events.txt"
        s1 = self.serf("s1", extra=["-event-handler", f"user:imgproxy-purge=cat >> {received}"])
        s1.start()
        signing_key = "k" * 32
        o1 = self.our("o1", "gateway", join=[s1.gossip], extra=["--signing-key", signing_key])
        start_all([o1.process])
        self.wait_views([s1, o1], {"s1": "alive", "o1": "alive"}, "s1 and o1 see each other")

        url = self.origin.url("a.jpg")
        query = f"url={quote(url, safe='')}"
        sig = hmac.new(signing_key.encode(), query.encode(), hashlib.sha256).hexdigest()
        reply = o1.process.request(f"/image?{query}&sig={sig}", method="DELETE", timeout=10)
        self.assertEqual(reply.status, 503)  # no worker to purge now: it is announced anyway
        key = hashlib.sha256(url.encode()).hexdigest()
        wait_for("s1's event handler got the purge",
                 lambda: received.exists() and key in received.read_text())
