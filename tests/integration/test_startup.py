"""A node that cannot have its ports says so in one line and exits: no traceback, no hang.

Each test runs a real ``twistd -n imgproxy`` against a port this test holds.
"""

from __future__ import annotations

import socket
import subprocess
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from tests.processes import clean_environment, free_port, twistd_command

EXIT_WITHIN_SECONDS = 30


class PortInUseTests(SynchronousTestCase):
    def run_node(self, *args: str) -> subprocess.CompletedProcess[str]:
        cache = tempfile.mkdtemp(prefix="imgproxy-startup-")
        return subprocess.run(
            [*twistd_command(), "-n", "--pidfile=", "imgproxy", "--cache-dir", cache, *args],
            capture_output=True,
            text=True,
            env=clean_environment(),
            timeout=EXIT_WITHIN_SECONDS,
        )

    def hold(self, kind: int, port: int) -> None:
        held = socket.socket(socket.AF_INET, kind)
        held.bind(("127.0.0.1", port))
        if kind == socket.SOCK_STREAM:
            held.listen()
        self.addCleanup(held.close)

    def assert_refused_in_one_line(
        self, result: subprocess.CompletedProcess[str], port: int
    ) -> None:
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 1, output)
        self.assertNotIn("Traceback", output)
        self.assertIn(f"imgproxy: cannot listen on 127.0.0.1:{port}: Address already in use",
                      output)

    def test_a_gossip_port_in_use_ends_the_node_instead_of_leaving_it_half_started(self) -> None:
        # It used to keep running, its HTTP port open and nothing served on it.
        gossip = free_port(udp=True)
        self.hold(socket.SOCK_DGRAM, gossip)
        result = self.run_node(
            "--role", "worker", "--bind", "127.0.0.1", "--gossip-port", str(gossip),
            "--http", f"tcp:{free_port()}:interface=127.0.0.1",
        )
        self.assert_refused_in_one_line(result, gossip)

    def test_an_http_port_in_use_is_one_line_not_a_traceback(self) -> None:
        http = free_port()
        self.hold(socket.SOCK_STREAM, http)
        result = self.run_node("--http", f"tcp:{http}:interface=127.0.0.1")
        self.assert_refused_in_one_line(result, http)
