"""Which IP addresses an origin may live on: the pure half of the SSRF guard.

Pure: no sockets, no DNS. The fetcher resolves a host once, asks
``AddressPolicy.refusal`` about every address, and connects only to an address
that was allowed, so what is checked here is exactly what is connected to.

Public means "global unicast": IPv4 outside every special-purpose block, IPv6
inside 2000::/3 and outside its special blocks. IPv6 forms that carry an IPv4
address (mapped, translated, compatible, NAT64, 6to4, Teredo) are judged by
the IPv4 address they lead to, so ``::ffff:127.0.0.1`` is as refused as
``127.0.0.1``.
"""

from __future__ import annotations

import ipaddress
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import attrs

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

# Order matters only where blocks nest: the first match names the reason.
_IPV4_SPECIAL: tuple[tuple[IPv4Network, str], ...] = tuple(
    (IPv4Network(cidr), reason)
    for cidr, reason in (
        ("0.0.0.0/32", "unspecified"),
        # Linux connects 0.0.0.0/8 to the local host, not to "this network".
        ("0.0.0.0/8", "this network (0.0.0.0/8)"),
        ("10.0.0.0/8", "private (RFC 1918)"),
        ("100.64.0.0/10", "carrier-grade NAT (RFC 6598)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private (RFC 1918)"),
        ("192.0.0.0/24", "IETF protocol assignments (192.0.0.0/24)"),
        ("192.0.2.0/24", "documentation"),
        ("192.88.99.0/24", "reserved (6to4 relay anycast)"),
        ("192.168.0.0/16", "private (RFC 1918)"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("255.255.255.255/32", "broadcast"),
        ("240.0.0.0/4", "reserved"),
    )
)

_IPV6_SPECIAL: tuple[tuple[IPv6Network, str], ...] = tuple(
    (IPv6Network(cidr), reason)
    for cidr, reason in (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("100::/64", "discard-only (RFC 6666)"),
        ("2001:2::/48", "benchmarking"),
        ("2001::/23", "IETF protocol assignments (2001::/23)"),
        ("2001:db8::/32", "documentation"),
        ("3fff::/20", "documentation"),
        ("fc00::/7", "unique-local"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local (deprecated)"),
        ("ff00::/8", "multicast"),
    )
)

_GLOBAL_UNICAST_V6 = IPv6Network("2000::/3")
_MAPPED = IPv6Network("::ffff:0:0/96")
_TRANSLATED = IPv6Network("::ffff:0:0:0/96")
_COMPATIBLE = IPv6Network("::/96")
_NAT64 = IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = IPv6Network("64:ff9b:1::/48")
_SIX_TO_FOUR = IPv6Network("2002::/16")
_TEREDO = IPv6Network("2001::/32")


def _low32(ip: IPv6Address) -> IPv4Address:
    return IPv4Address(int(ip) & 0xFFFFFFFF)


def _nat64_local_v4(ip: IPv6Address) -> IPv4Address:
    # RFC 6052 layout for a /48 prefix: 16 bits in bits 48..63, then the
    # reserved "u" octet (bits 64..71), then the last 16 bits in 72..87.
    value = int(ip)
    high = (value >> 64) & 0xFFFF
    low = (value >> 40) & 0xFFFF
    return IPv4Address((high << 16) | low)


def embedded_ipv4(ip: IPv6Address) -> list[tuple[str, IPv4Address]]:
    """The IPv4 addresses an IPv6 address leads to, each with the name of its form.

    Empty for an IPv6 address that carries no IPv4 address. Teredo carries two
    (its server and its client), both of which must be acceptable.
    """
    if ip in _MAPPED:
        return [("IPv4-mapped", _low32(ip))]
    if ip in _TRANSLATED:
        return [("IPv4-translated", _low32(ip))]
    if ip in _NAT64:
        return [("NAT64", _low32(ip))]
    if ip in _NAT64_LOCAL:
        return [("local-use NAT64", _nat64_local_v4(ip))]
    if ip in _SIX_TO_FOUR:
        sixtofour = ip.sixtofour
        assert sixtofour is not None
        return [("6to4", sixtofour)]
    if ip in _TEREDO:
        teredo = ip.teredo
        assert teredo is not None
        server, client = teredo
        return [("Teredo server", server), ("Teredo client", client)]
    # ::/96 minus :: and ::1 (which are judged as themselves).
    if ip in _COMPATIBLE and int(ip) > 1:
        return [("IPv4-compatible", _low32(ip))]
    return []


def _ipv4_reason(ip: IPv4Address) -> str | None:
    for network, reason in _IPV4_SPECIAL:
        if ip in network:
            return reason
    return None


def non_public_reason(ip: IPAddress) -> str | None:
    """``None`` for a public unicast address, else a short reason why not.

    Reasons read like ``"loopback"``, ``"private (RFC 1918)"`` or, for an IPv6
    form carrying an IPv4 address, ``"IPv4-mapped 127.0.0.1: loopback"``.
    """
    if isinstance(ip, IPv4Address):
        return _ipv4_reason(ip)
    # A zone index ("fe80::1%eth0") does not change what the address is.
    ip = IPv6Address(int(ip))
    for form, inner in embedded_ipv4(ip):
        reason = _ipv4_reason(inner)
        if reason is not None:
            return f"{form} {inner}: {reason}"
    if embedded_ipv4(ip):
        return None
    for network, reason in _IPV6_SPECIAL:
        if ip in network:
            return reason
    if ip not in _GLOBAL_UNICAST_V6:
        return "reserved"
    return None


def _same_destination(ip: IPAddress) -> IPAddress:
    # An IPv4-mapped address reaches exactly the IPv4 host on a dual-stack
    # socket, so an allowed IPv4 network admits its mapped form too.
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _to_networks(values: object) -> tuple[IPNetwork, ...]:
    if isinstance(values, IPv4Network | IPv6Network | str):
        values = (values,)
    return tuple(ipaddress.ip_network(v, strict=False) for v in values)  # type: ignore[union-attr]


@attrs.frozen
class AddressPolicy:
    """Which origin addresses the fetcher may connect to.

    By default only public unicast addresses; ``allowed_networks`` admits some
    non-public networks anyway (``--allow-networks``), ``allow_private`` admits
    every address (``--allow-private-sources``).
    """

    allow_private: bool = False
    allowed_networks: tuple[IPNetwork, ...] = attrs.field(default=(), converter=_to_networks)

    def refusal(self, ip: IPAddress) -> str | None:
        """``None`` when the fetcher may connect to ``ip``, else the reason it may not."""
        if self.allow_private:
            return None
        reason = non_public_reason(ip)
        if reason is None:
            return None
        destination = _same_destination(IPv6Address(int(ip)) if ip.version == 6 else ip)
        for network in self.allowed_networks:
            if destination.version == network.version and destination in network:
                return None
        return reason


def _inet_aton_part(text: str) -> int | None:
    # C's inet_aton: 0x-prefixed hex, 0-prefixed octal, else decimal. The
    # character checks keep out what int() would also take ("_", "+", spaces).
    if text[:2].lower() == "0x":
        digits = text[2:]
        if digits and all(c in "0123456789abcdefABCDEF" for c in digits):
            return int(digits, 16)
        return None
    if not all(c in "0123456789" for c in text):
        return None
    if len(text) > 1 and text[0] == "0":
        return int(text, 8) if all(c in "01234567" for c in text) else None
    return int(text)


def _numeric_ipv4(host: str) -> IPv4Address | None:
    """``2130706433``, ``0177.0.0.1``, ``0x7f.1``, ``127.1``: what inet_aton accepts."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4 or not all(parts) or not all(p.isascii() for p in parts):
        return None
    values = [_inet_aton_part(p) for p in parts]
    if any(v is None for v in values):
        return None
    numbers = [v for v in values if v is not None]
    # Every part but the last is one byte; the last fills the bytes left.
    last_bits = 8 * (5 - len(numbers))
    if any(n > 0xFF for n in numbers[:-1]) or numbers[-1] >= 1 << last_bits:
        return None
    value = 0
    for n in numbers[:-1]:
        value = value << 8 | n
    return IPv4Address(value << last_bits | numbers[-1])


def parse_ip_literal(host: str) -> IPAddress | None:
    """The IP address a URL's host names literally, or ``None`` for a DNS name.

    Takes ``[::1]`` and ``::1``, zone indexes, and the numeric IPv4 spellings
    that system resolvers accept (``2130706433``, ``0177.0.0.1``, ``127.1``),
    so that such hosts are checked as the address they stand for.
    """
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if ":" in host:
        return None
    return _numeric_ipv4(host)
