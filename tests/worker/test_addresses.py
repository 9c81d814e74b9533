"""The pure address table of the SSRF guard: no packets are ever sent here."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network, ip_address

from twisted.trial.unittest import SynchronousTestCase

from imgproxy.worker.addresses import (
    AddressPolicy,
    embedded_ipv4,
    non_public_reason,
    parse_ip_literal,
)

REFUSED = {
    "10.0.0.1": "private (RFC 1918)",
    "172.16.0.1": "private (RFC 1918)",
    "172.31.255.255": "private (RFC 1918)",
    "192.168.1.1": "private (RFC 1918)",
    "169.254.169.254": "link-local",
    "100.64.0.1": "carrier-grade NAT (RFC 6598)",
    "127.0.0.1": "loopback",
    "127.255.255.254": "loopback",
    "0.0.0.0": "unspecified",
    "0.1.2.3": "this network (0.0.0.0/8)",
    "192.0.0.8": "IETF protocol assignments (192.0.0.0/24)",
    "192.0.2.1": "documentation",
    "198.18.0.1": "benchmarking",
    "198.19.255.255": "benchmarking",
    "224.0.0.1": "multicast",
    "240.0.0.1": "reserved",
    "255.255.255.255": "broadcast",
    "::1": "loopback",
    "::": "unspecified",
    "fe80::1": "link-local",
    "fe80::1%eth0": "link-local",
    "fec0::1": "site-local (deprecated)",
    "fc00::1": "unique-local",
    "fd12::1": "unique-local",
    "ff02::1": "multicast",
    "2001:db8::1": "documentation",
    "2001:2::1": "benchmarking",
    "100::1": "discard-only (RFC 6666)",
    "5f00::1": "reserved",
    "::ffff:127.0.0.1": "IPv4-mapped 127.0.0.1: loopback",
    "::ffff:10.0.0.1": "IPv4-mapped 10.0.0.1: private (RFC 1918)",
    "::ffff:169.254.169.254": "IPv4-mapped 169.254.169.254: link-local",
    "::ffff:0:127.0.0.1": "IPv4-translated 127.0.0.1: loopback",
    "::127.0.0.1": "IPv4-compatible 127.0.0.1: loopback",
    "64:ff9b::7f00:1": "NAT64 127.0.0.1: loopback",
    "64:ff9b::a00:1": "NAT64 10.0.0.1: private (RFC 1918)",
    # RFC 6052 /48 layout: 127.0 in bits 48..63, the "u" octet, then .0.1.
    "64:ff9b:1:7f00:0:100::": "local-use NAT64 127.0.0.1: loopback",
    "2002:7f00:1::1": "6to4 127.0.0.1: loopback",
    "2002:a9fe:a9fe::1": "6to4 169.254.169.254: link-local",
    # Teredo stores its client address inverted: 80ff:fffe is 127.0.0.1.
    "2001:0:4136:e378:8000:63bf:80ff:fffe": "Teredo client 127.0.0.1: loopback",
    "2001:0:a00:1:8000:63bf:f7f7:f7f7": "Teredo server 10.0.0.1: private (RFC 1918)",
}

PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.216.34",
    "2606:4700::1111",
    "2a00:1450:4001:80b::200e",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",
    "2002:808:808::1",
]


class NonPublicReasonTests(SynchronousTestCase):
    def test_refused_addresses_have_their_reason(self) -> None:
        for text, reason in REFUSED.items():
            with self.subTest(address=text):
                self.assertEqual(non_public_reason(ip_address(text)), reason)

    def test_public_unicast_addresses_have_no_reason(self) -> None:
        for text in PUBLIC:
            with self.subTest(address=text):
                self.assertIsNone(non_public_reason(ip_address(text)))

    def test_block_edges(self) -> None:
        # Just outside the special blocks is public; just inside is not.
        self.assertIsNone(non_public_reason(ip_address("100.63.255.255")))
        self.assertIsNotNone(non_public_reason(ip_address("100.127.255.255")))
        self.assertIsNone(non_public_reason(ip_address("100.128.0.0")))
        self.assertIsNone(non_public_reason(ip_address("172.15.255.255")))
        self.assertIsNone(non_public_reason(ip_address("172.32.0.0")))
        self.assertIsNone(non_public_reason(ip_address("198.17.255.255")))
        self.assertIsNone(non_public_reason(ip_address("198.20.0.0")))
        self.assertIsNone(non_public_reason(ip_address("223.255.255.255")))
        self.assertIsNone(non_public_reason(ip_address("2001:200::1")))
        self.assertEqual(non_public_reason(ip_address("1fff:ffff::1")), "reserved")
        self.assertEqual(non_public_reason(ip_address("4000::1")), "reserved")


class EmbeddedIPv4Tests(SynchronousTestCase):
    def test_plain_ipv6_carries_no_ipv4(self) -> None:
        self.assertEqual(embedded_ipv4(ip_address("2606:4700::1111")), [])
        self.assertEqual(embedded_ipv4(ip_address("::1")), [])
        self.assertEqual(embedded_ipv4(ip_address("::")), [])

    def test_each_form_names_the_ipv4_it_leads_to(self) -> None:
        self.assertEqual(
            embedded_ipv4(ip_address("2001:0:4136:e378:8000:63bf:80ff:fffe")),
            [
                ("Teredo server", ip_address("65.54.227.120")),
                ("Teredo client", ip_address("127.0.0.1")),
            ],
        )
        self.assertEqual(
            embedded_ipv4(ip_address("64:ff9b::c000:221")),
            [("NAT64", ip_address("192.0.2.33"))],
        )


class AddressPolicyTests(SynchronousTestCase):
    def test_default_refuses_every_non_public_address(self) -> None:
        policy = AddressPolicy()
        for text, reason in REFUSED.items():
            with self.subTest(address=text):
                self.assertEqual(policy.refusal(ip_address(text)), reason)

    def test_default_allows_public_addresses(self) -> None:
        policy = AddressPolicy()
        for text in PUBLIC:
            with self.subTest(address=text):
                self.assertIsNone(policy.refusal(ip_address(text)))

    def test_allowed_networks_admit_only_their_cidr(self) -> None:
        policy = AddressPolicy(allowed_networks=(IPv4Network("127.0.0.5/32"),))
        self.assertIsNone(policy.refusal(ip_address("127.0.0.5")))
        self.assertEqual(policy.refusal(ip_address("127.0.0.1")), "loopback")
        self.assertEqual(policy.refusal(ip_address("127.0.0.6")), "loopback")
        self.assertEqual(policy.refusal(ip_address("10.0.0.1")), "private (RFC 1918)")
        self.assertEqual(policy.refusal(ip_address("::1")), "loopback")
        self.assertIsNone(policy.refusal(ip_address("8.8.8.8")))

    def test_allowed_ipv4_network_admits_its_mapped_form_only(self) -> None:
        policy = AddressPolicy(allowed_networks=(IPv4Network("127.0.0.5/32"),))
        self.assertIsNone(policy.refusal(ip_address("::ffff:127.0.0.5")))
        self.assertIsNotNone(policy.refusal(ip_address("::ffff:127.0.0.1")))
        # NAT64 and 6to4 lead elsewhere (a translator, a relay): not the same host.
        self.assertIsNotNone(policy.refusal(ip_address("64:ff9b::7f00:5")))

    def test_allowed_ipv6_network(self) -> None:
        policy = AddressPolicy(allowed_networks=(IPv6Network("fd00:1::/32"),))
        self.assertIsNone(policy.refusal(ip_address("fd00:1::7")))
        self.assertEqual(policy.refusal(ip_address("fd00:2::7")), "unique-local")
        self.assertEqual(policy.refusal(ip_address("10.0.0.1")), "private (RFC 1918)")

    def test_networks_may_be_given_as_text(self) -> None:
        policy = AddressPolicy(allowed_networks=("10.1.0.0/16", "fd00::/8"))
        self.assertEqual(
            policy.allowed_networks, (IPv4Network("10.1.0.0/16"), IPv6Network("fd00::/8"))
        )
        self.assertIsNone(policy.refusal(ip_address("10.1.2.3")))
        self.assertIsNotNone(policy.refusal(ip_address("10.2.0.1")))

    def test_allow_private_admits_everything(self) -> None:
        policy = AddressPolicy(allow_private=True)
        for text in [*REFUSED, *PUBLIC]:
            with self.subTest(address=text):
                self.assertIsNone(policy.refusal(ip_address(text)))


class ParseIPLiteralTests(SynchronousTestCase):
    def test_ordinary_literals(self) -> None:
        self.assertEqual(parse_ip_literal("127.0.0.1"), ip_address("127.0.0.1"))
        self.assertEqual(parse_ip_literal("::1"), ip_address("::1"))
        self.assertEqual(parse_ip_literal("[::1]"), ip_address("::1"))
        self.assertEqual(parse_ip_literal("[::ffff:127.0.0.1]"), ip_address("::ffff:7f00:1"))
        self.assertEqual(parse_ip_literal("fe80::1%eth0"), ip_address("fe80::1%eth0"))

    def test_numeric_spellings_that_resolvers_accept(self) -> None:
        # What C's inet_aton (and so getaddrinfo) makes of them.
        for text in ("2130706433", "0177.0.0.1", "0x7f.1", "0x7F000001", "127.1", "127.0.1"):
            with self.subTest(host=text):
                self.assertEqual(parse_ip_literal(text), ip_address("127.0.0.1"))
        self.assertEqual(parse_ip_literal("0"), ip_address("0.0.0.0"))
        self.assertEqual(parse_ip_literal("10.1"), ip_address("10.0.0.1"))

    def test_names_and_malformed_numbers_are_not_literals(self) -> None:
        for text in (
            "example.com",
            "1e100.net",
            "deadbeef",
            "1.2.3.4.5",
            "256.1.1.1",
            "1.16777216",
            "08.1.1.1",
            "0x",
            "0x7_f.1",
            "+1",
            "1_0.0.0.1",
            "1.2.3.",
            "",
            "[example.com]",
            "::ffff:127.0.0.1.evil",
        ):
            with self.subTest(host=text):
                self.assertIsNone(parse_ip_literal(text))
