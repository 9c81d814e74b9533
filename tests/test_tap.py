"""``twistd imgproxy`` options: every contract option, from flags and from the environment."""

from __future__ import annotations

import base64
import ipaddress

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from imgproxy.config import (
    ConfigError,
    configuration_warnings,
    parse_duration,
    parse_seeds,
    parse_size,
)
from imgproxy.tap import Options

KEY16 = base64.b64encode(b"0123456789abcdef").decode()


def options(argv: list[str], environ: dict[str, str] | None = None) -> Options:
    opts = Options(environ=environ or {})
    opts.parseOptions(argv)
    return opts


class DefaultsTests(SynchronousTestCase):
    def test_contract_defaults(self) -> None:
        config = options([]).config
        self.assertEqual(config.role, "standalone")
        self.assertEqual(config.http, "tcp:8080")
        self.assertEqual(config.bind, "0.0.0.0")
        self.assertEqual(config.gossip_port, 7946)
        self.assertEqual(config.cache_dir, "./imgproxy-cache")
        self.assertEqual(config.cache_max_bytes, 1 << 30)
        self.assertEqual(config.cache_ttl, 7 * 86400)
        self.assertEqual(config.max_source_bytes, 32 << 20)
        self.assertEqual(config.max_source_pixels, 50_000_000)
        self.assertEqual(config.fetch_timeout, 10)
        self.assertFalse(config.allow_private_sources)
        self.assertIsNone(config.signing_key)
        self.assertIsNone(config.cluster_secret)
        self.assertFalse(config.runs_membership)


class FlagTests(SynchronousTestCase):
    def test_every_option_from_flags(self) -> None:
        config = options([
            "--http", "tcp:9000", "--bind", "127.0.0.2", "--advertise", "127.0.0.3",
            "--gossip-port", "8000", "--node-name", "n1", "--join", "a,b:7000,[::1]:7001",
            "--cluster-secret", KEY16, "--cache-dir", "/tmp/c", "--cache-max-bytes", "512M",
            "--cache-ttl", "2h", "--signing-key", "k", "--allow-private-sources",
            "--allow-networks", "127.0.0.5/32,fd00::/8", "--max-source-bytes", "1M",
            "--max-source-pixels", "1000", "--fetch-timeout", "3s",
        ]).config
        self.assertEqual(config.http, "tcp:9000")
        self.assertEqual(config.http_port, 9000)
        self.assertEqual((config.bind, config.advertise), ("127.0.0.2", "127.0.0.3"))
        self.assertEqual(config.join, (("a", 8000), ("b", 7000), ("::1", 7001)))
        self.assertEqual(config.cluster_secret, b"0123456789abcdef")
        self.assertEqual(config.cache_max_bytes, 512 << 20)
        self.assertEqual(config.cache_ttl, 7200)
        self.assertEqual(config.signing_key, b"k")
        self.assertTrue(config.allow_private_sources)
        self.assertEqual(config.allow_networks[0], ipaddress.ip_network("127.0.0.5/32"))
        self.assertEqual((config.max_source_bytes, config.max_source_pixels), (1 << 20, 1000))
        self.assertEqual(config.fetch_timeout, 3)
        self.assertTrue(config.runs_membership)

    def test_bad_values_are_usage_errors(self) -> None:
        for argv in (["--cache-max-bytes", "lots"], ["--cache-ttl", "soon"],
                     ["--cluster-secret", "c2hvcnQ="], ["--cluster-secret", "!!"],
                     ["--allow-networks", "10.0.0.0/33"], ["--role", "boss"],
                     ["--gossip-port", "70000"], ["--join", "host:0"], ["--http", "nonsense"],
                     ["--http", "tcp:notaport"], ["--http", "tcp:99999"],
                     ["--http", "tcp:8080:interface=127.0.0.1:bogus=1"],
                     ["--max-source-pixels", "-5"], ["--node-name", " "], ["--cache-dir", ""],
                     ["--bind", "999.1.1.1"], ["--bind", "no-such-host.invalid"],
                     ["--advertise", "0.0.0.0"], ["--advertise", "::"],
                     ["--advertise", "not an address"]):
            with self.subTest(argv=argv), self.assertRaises(usage.UsageError):
                options(argv)

    def test_bind_and_advertise_may_be_host_names(self) -> None:
        config = options(["--bind", "localhost", "--advertise", "localhost"]).config
        self.assertIn(config.bind, ("127.0.0.1", "::1"))
        self.assertIn(config.advertise, ("127.0.0.1", "::1"))
        self.assertEqual(options(["--bind", " ::1 "]).config.bind, "::1")

    def test_an_ipv6_interface_with_bare_colons_gets_a_hint(self) -> None:
        with self.assertRaises(usage.UsageError) as caught:
            options(["--http", "tcp:8080:interface=::1"])
        self.assertIn(r"interface=\:\:1", str(caught.exception))
        self.assertEqual(
            options(["--http", r"tcp:8080:interface=\:\:1"]).config.http,
            r"tcp:8080:interface=\:\:1",
        )

    def test_help_names_every_environment_variable(self) -> None:
        help_text = " ".join(str(Options(environ={})).split())
        for variables in Options.environment.values():
            self.assertIn(f"[env: {', '.join(variables)}]", help_text)

    def test_a_cluster_role_without_a_secret_is_warned_about(self) -> None:
        for role in ("gateway", "worker"):
            [warning] = configuration_warnings(options(["--role", role]).config)
            self.assertIn("--cluster-secret", warning)
            self.assertEqual(
                configuration_warnings(options(["--role", role, "--cluster-secret", KEY16]).config),
                [],
            )
        self.assertEqual(configuration_warnings(options([]).config), [])

    def test_cluster_roles_run_membership(self) -> None:
        for role in ("gateway", "worker"):
            with self.subTest(role=role):
                config = options(["--role", role]).config
                self.assertEqual(config.role, role)
                self.assertTrue(config.runs_membership)


class EnvironmentTests(SynchronousTestCase):
    def test_every_imgproxy_variable(self) -> None:
        config = options([], {
            "IMGPROXY_HTTP": "tcp:8181", "IMGPROXY_BIND": "127.0.0.9",
            "IMGPROXY_GOSSIP_PORT": "7000", "IMGPROXY_NODE_NAME": "env-node",
            "IMGPROXY_JOIN": "seed", "IMGPROXY_CLUSTER_SECRET": KEY16,
            "IMGPROXY_CACHE_DIR": "/tmp/e", "IMGPROXY_CACHE_MAX_BYTES": "2G",
            "IMGPROXY_CACHE_TTL": "30m", "IMGPROXY_SIGNING_KEY": "sk",
            "IMGPROXY_ALLOW_PRIVATE_SOURCES": "true", "IMGPROXY_ALLOW_NETWORKS": "127.0.0.5/32",
            "IMGPROXY_MAX_SOURCE_BYTES": "5M", "IMGPROXY_MAX_SOURCE_PIXELS": "77",
            "IMGPROXY_FETCH_TIMEOUT": "2s", "IMGPROXY_ADVERTISE": "127.0.0.10",
        }).config
        self.assertEqual(config.http, "tcp:8181")
        self.assertEqual(config.node_name, "env-node")
        self.assertEqual(config.join, (("seed", 7000),))
        self.assertEqual(config.cache_max_bytes, 2 << 30)
        self.assertEqual(config.cache_ttl, 1800)
        self.assertTrue(config.allow_private_sources)
        self.assertEqual(config.max_source_pixels, 77)
        self.assertEqual(config.advertise, "127.0.0.10")
        self.assertTrue(config.gossip_port_given)

    def test_seed_aliases(self) -> None:
        config = options([], {"HTTP_PORT": "8099", "KNOWN_HOSTS": "w1,w2",
                              "CLUSTER_SECRET": KEY16}).config
        self.assertEqual(config.http, "tcp:8099")
        self.assertEqual(config.join, (("w1", 7946), ("w2", 7946)))
        self.assertEqual(config.cluster_secret, b"0123456789abcdef")

    def test_imgproxy_variable_wins_over_alias(self) -> None:
        config = options([], {"HTTP_PORT": "8099", "IMGPROXY_HTTP": "tcp:8100"}).config
        self.assertEqual(config.http, "tcp:8100")

    def test_flag_wins_over_environment(self) -> None:
        config = options(["--http", "tcp:1234"], {"IMGPROXY_HTTP": "tcp:8100"}).config
        self.assertEqual(config.http, "tcp:1234")

    def test_bad_boolean_in_environment(self) -> None:
        with self.assertRaises(usage.UsageError):
            options([], {"IMGPROXY_ALLOW_PRIVATE_SOURCES": "maybe"})


class ParserTests(SynchronousTestCase):
    def test_sizes(self) -> None:
        self.assertEqual(parse_size("512"), 512)
        self.assertEqual(parse_size("64K"), 64 << 10)
        self.assertEqual(parse_size("1g"), 1 << 30)
        self.assertEqual(parse_size("1.5M"), int(1.5 * (1 << 20)))
        for bad in ("", "M", "0", "-1K", "1Q"):
            with self.subTest(bad=bad), self.assertRaises(ConfigError):
                parse_size(bad)

    def test_durations(self) -> None:
        self.assertEqual(parse_duration("7d"), 604800)
        self.assertEqual(parse_duration("90"), 90)
        self.assertEqual(parse_duration("250ms"), 0.25)
        for bad in ("", "d", "0s", "5y"):
            with self.subTest(bad=bad), self.assertRaises(ConfigError):
                parse_duration(bad)

    def test_seeds(self) -> None:
        self.assertEqual(parse_seeds("a, b:1 ,[fe80::1]:2,", 7946),
                         (("a", 7946), ("b", 1), ("fe80::1", 2)))
